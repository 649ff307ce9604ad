"""One sweep over the whole surface with two tenants: every object one tenant's key makes (a file, a batch and its
output file, a message batch, a stored response) is a 404 to another tenant's key on every route that reaches it
(read, content, results, cancel, delete, continue, through C{/v1}, Anthropic's routes and C{/p/}), as an unknown id
is; its lists show none of them (nor C{has_more}, nor a cursor); the admin routes are the master key's; and no log
line names a key, the client's or the provider's."""

import io
import json

import pytest_twisted
import treq
from twisted.logger import formatEvent, globalLogPublisher

from tests.support import in_thread, openai_client, start_fake, start_gateway, stop_all

MASTER = "master-k"
PROVIDER_KEY = "sk-provider-0123456789"
BARE = "meta-llama/Llama-3.1-8B-Instruct"
MODEL = f"vllm/{BARE}"
HI = [{"role": "user", "content": "hi"}]


async def call(http, gw, method, path, key, body=None):
    response = await http.request(method, gw.url + path, data=None if body is None else json.dumps(body).encode(),
                                  headers={"authorization": f"Bearer {key}"})
    return response.code, json.loads(await treq.content(response))


@pytest_twisted.ensureDeferred
async def test_another_tenant_reaches_none_of_a_teams_objects_anywhere(reactor, http, tmp_path):
    events = []
    globalLogPublisher.addObserver(events.append)
    vllm = await start_fake(reactor)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": vllm.base_url, "VLLM_API_KEY": PROVIDER_KEY,
                                       "GOMODEL_MASTER_KEY": MASTER, "GOMODEL_DATA_DIR": str(tmp_path)})
    team = None
    try:
        keys = []
        for fields in ({"name": "a", "user_path": "/team/a"}, {"name": "b"}):
            code, made = await call(http, gw, "POST", "/admin/api/v1/auth-keys", MASTER, fields)
            assert code == 201, made
            keys.append(made["value"])
        a, b = keys
        team = openai_client(gw, a)
        line = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": HI, "max_tokens": 5}}
        file = await in_thread(team.files.create, file=("in.jsonl", io.BytesIO(json.dumps(line).encode())),
                               purpose="batch")
        batch = await in_thread(team.batches.create, input_file_id=file.id, endpoint="/v1/chat/completions",
                                completion_window="24h")
        await gw.service.batch_runner.settled(batch.id)
        output = (await in_thread(team.batches.retrieve, batch.id)).output_file_id
        code, message_batch = await call(http, gw, "POST", "/v1/messages/batches", a, {"requests": [
            {"custom_id": "m", "params": {"model": MODEL, "max_tokens": 5, "messages": HI}}]})
        assert code == 200, message_batch
        response = await in_thread(team.responses.create, model=MODEL, input="the team's plans")
        await gw.service.store.responses.get(response.id)  # queued behind the write: stored now
        mb, rid = message_batch["id"], response.id

        not_found = {  # what another tenant gets: the same 404 as for an id nobody made
            "file_not_found": [("GET", f"/v1/files/{i}") for i in (file.id, output)]
            + [("GET", f"/v1/files/{i}/content") for i in (file.id, output)]
            + [("DELETE", f"/v1/files/{i}") for i in (file.id, output)],
            "batch_not_found": [("GET", f"/v1/batches/{batch.id}"), ("POST", f"/v1/batches/{batch.id}/cancel"),
                                ("GET", f"/v1/batches/{batch.id}/results"), ("GET", f"/v1/batches/{mb}")],
            "response_not_found": [(method, prefix + path) for prefix in ("/v1", "/p/vllm/v1")
                                   for method, path in (("GET", f"/responses/{rid}"),
                                                        ("GET", f"/responses/{rid}/input_items"),
                                                        ("POST", f"/responses/{rid}/cancel"),
                                                        ("DELETE", f"/responses/{rid}"))],
            "not_found_error": [("GET", f"/v1/messages/batches/{mb}"), ("POST", f"/v1/messages/batches/{mb}/cancel"),
                                ("DELETE", f"/v1/messages/batches/{mb}"), ("GET", f"/v1/messages/batches/{mb}/results"),
                                ("GET", f"/v1/messages/batches?after_id={mb}"),
                                ("GET", f"/v1/messages/batches/{batch.id}")],
        }
        for expected, tries in not_found.items():
            for method, path in tries:
                code, body = await call(http, gw, method, path, b)
                error = body["error"]
                assert code == 404 and error.get("code", error["type"]) == expected, (method, path, body)
        code, body = await call(http, gw, "POST", "/v1/responses", b,
                                {"model": MODEL, "input": "go on", "previous_response_id": rid})
        assert (code, body["error"]["code"]) == (400, "previous_response_not_found")
        # Its lists: none of the team's, no more to come, and the team's ids are no cursors.
        for path in ("/v1/files", "/v1/files?limit=1", f"/v1/files?after={file.id}", "/v1/batches",
                     "/v1/batches?limit=1", f"/v1/batches?after={batch.id}", "/v1/messages/batches",
                     "/v1/messages/batches?limit=1"):
            code, body = await call(http, gw, "GET", path, b)
            assert code == 200 and (body["data"], body["has_more"]) == ([], False), (path, body)
        # What the provider's account stores, and the admin API, are the master key's alone.
        for path in (f"/p/vllm/v1/files/{file.id}", f"/p/vllm/v1/batches/{batch.id}", "/p/vllm/v1/vector_stores",
                     f"/p/vllm/v1/messages/batches/{mb}", "/p/vllm/v1/chat/completions"):
            code, body = await call(http, gw, "GET", path, b)
            assert code == 403, (path, body)
        for path in ("/admin/api/v1/auth-keys", "/admin/api/v1/usage/summary", "/admin/api/v1/usage/log"):
            code, body = await call(http, gw, "GET", path, b)
            assert (code, body["error"]["code"]) == (403, "master_key_required"), path
        code, body = await call(http, gw, "GET", "/v1/usage", b)  # its own usage: none of the team's requests
        assert code == 200 and body["usage"]["total_requests"] == 0, body
        # The team and the master key still see all of it.
        for key in (a, MASTER):
            for path in (f"/v1/files/{output}", f"/v1/batches/{batch.id}", f"/v1/messages/batches/{mb}",
                         f"/v1/responses/{rid}"):
                code, body = await call(http, gw, "GET", path, key)
                assert code == 200, (path, body)
    finally:
        globalLogPublisher.removeObserver(events.append)
        if team is not None:
            team.close()
        await stop_all(gw, vllm)
    logged = "\n".join(formatEvent(event) + repr(event) for event in events)
    for secret in (a, b, MASTER, PROVIDER_KEY):
        assert secret not in logged
