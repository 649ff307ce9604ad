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
