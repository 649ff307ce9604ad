"""Every route a real vLLM serves is one the passthrough knows: operational (refused), the whole server's (the
master key's alone), one taking a managed key's C{cache_salt} and C{priority}, or its clients' own. A vLLM release
that adds a route fails here until it is put in one of them (vLLM 0.32 added C{abort_requests}, which aborts every
tenant's requests, and C{kv_event_sources}, which names its publishers' addresses: both went to any key)."""

import pytest

from gomodel.api.passthrough import ADMIN_ROUTES, CLIENT_ROUTES, KEYED_ROUTES, OPERATOR_ROUTES, PRIORITY_ROUTES
from tests.integration.support import request, root_of


def _known(path: str) -> bool:
    bare = path.strip("/")
    bare = bare[3:] if bare.startswith("v1/") else bare
    return (bare in ADMIN_ROUTES or bare.split("/", 1)[0] in ADMIN_ROUTES or bare.split("/", 1)[0] in OPERATOR_ROUTES
            or bare in KEYED_ROUTES or bare in PRIORITY_ROUTES or bare in CLIENT_ROUTES)


@pytest.mark.parametrize("server", ["chat_url", "chat_key_url", "embed_url", "rerank_url"])
def test_every_route_of_a_real_vllm_is_one_the_passthrough_knows(vllm, server):
    spec = request("GET", root_of(getattr(vllm, server)) + "/openapi.json",
                   headers={"Authorization": f"Bearer {vllm.chat_key}"}).json()
    unknown = sorted(path for path in spec["paths"] if not _known(path))
    assert not unknown, (f"vLLM serves {unknown}: put each in gomodel.api.passthrough's ADMIN_ROUTES, OPERATOR_ROUTES, "
                         "KEYED_ROUTES, PRIORITY_ROUTES or CLIENT_ROUTES")


def test_the_sets_name_each_route_once():
    sets = (ADMIN_ROUTES, OPERATOR_ROUTES, KEYED_ROUTES, PRIORITY_ROUTES, CLIENT_ROUTES)
    assert all(not a & b for i, a in enumerate(sets) for b in sets[i + 1:])


@pytest.mark.parametrize("path", ["/openapi.json", "/v1/models", "/health"])
def test_head_through_the_passthrough_answers_as_vllm_does(vllm, gateway, path):
    """A HEAD through C{/p/} gets vLLM's own status and headers: C{/openapi.json}'s C{Content-Length} is its GET
    body's (not 0), and the routes vLLM serves to GET alone are its 405 with C{Allow: GET}."""
    theirs = request("HEAD", vllm.chat_root + path)
    mine = request("HEAD", gateway.root + "/p/vllm" + path, headers=gateway.auth)
    assert mine.status == theirs.status and mine.body == b"", (mine, theirs)
    for name in ("content-length", "content-type", "allow"):
        assert mine.headers.get(name) == theirs.headers.get(name), (name, mine.headers, theirs.headers)
    if theirs.status == 200:
        assert int(mine.headers["content-length"]) == len(request("GET", vllm.chat_root + path).body) > 0


@pytest.mark.parametrize("path", ["/v1/models/", "/docs/"])
def test_a_path_vllm_redirects_never_shows_its_address(vllm, gateway, path):
    """vLLM (FastAPI) answers a path with a trailing slash by a 307 to its own absolute URL; through C{/p/} the
    client gets the place it names, and nothing of the upstream's address."""
    theirs = request("GET", vllm.chat_root + path)
    assert theirs.status == 307 and theirs.headers["location"] == vllm.chat_root + path.rstrip("/"), theirs
    mine = request("GET", gateway.root + "/p/vllm" + path, headers=gateway.auth)
    landed = request("GET", gateway.root + "/p/vllm" + path.rstrip("/"), headers=gateway.auth)
    assert (mine.status, mine.headers.get("content-type")) == (landed.status, landed.headers.get("content-type"))
    location = mine.headers.get("location", "")
    assert mine.status in (200, 307) and root_of(vllm.chat_url).split("//")[1] not in location + str(mine.body)
    if mine.status == 307:
        assert location.endswith("/p/vllm" + path.rstrip("/")), mine
