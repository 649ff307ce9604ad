"""/v1/batches: the openai SDK against the gateway and the fake vLLM, restarts, and the runner on a clock."""

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tracemalloc

import openai
import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from gomodel.auth.keys import KeyRing
from gomodel.batches import validating
from gomodel.batches.runner import BatchRunner
from gomodel.batches.validating import CustomIds
from gomodel.proxy.exchange import Exchange
from gomodel.config import Timeouts
from gomodel.errors import Conflict, ModelNotFound, NotFound, StorageUnavailable, UpstreamUnreachable
from gomodel.routing.registry import Route
from gomodel.store import SQLiteStore, new_file_id
from tests.stores import backend, storage, store  # noqa: F401 (fixtures)
from tests.stores import batch as batch_record, put_blob
from tests.support import (dead_base_url, in_thread, openai_client, ready_pool, start_fake, start_gateway, stop_all,
                           until, with_timeout)

MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"
UPSTREAM_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
KEY = "batch-key"
AUTH = {"authorization": f"Bearer {KEY}"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chat_line(custom_id, url="/v1/chat/completions", **body):
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                     "fake_marker": custom_id, **body}}


def jsonl(lines) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def parse_jsonl(data: bytes):
    return [json.loads(line) for line in data.splitlines() if line.strip()]


@pytest_twisted.async_yield_fixture()
async def gw(reactor, fake, tmp_path):
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": KEY,
                                            "GOMODEL_DATA_DIR": str(tmp_path), "BATCH_CONCURRENCY_PER_PROVIDER": "2"})
    yield gateway
    await gateway.service.stopService()


async def start_batch(sdk, lines, endpoint="/v1/chat/completions", **kwargs):
    uploaded = await in_thread(sdk.files.create, file=("input.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return await in_thread(sdk.batches.create, input_file_id=uploaded.id, endpoint=endpoint,
                           completion_window=kwargs.pop("completion_window", "24h"), **kwargs)


async def finished(gw, sdk, batch_id):
    await gw.service.batch_runner.settled(batch_id)
    return await in_thread(sdk.batches.retrieve, batch_id)


async def file_lines(sdk, file_id):
    if file_id is None:
        return []
    return parse_jsonl((await in_thread(sdk.files.content, file_id)).content)


# -- the SDK, end to end ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sdk_batch_runs_to_completion(sdk, gw, fake, http):
    lines = [chat_line("a", top_k=3, chat_template_kwargs={"enable_thinking": False}), chat_line("b"),
             chat_line("bad", fake_status=400, fake_body=json.dumps({"error": {
                 "message": "max_tokens is too large", "type": "BadRequestError", "param": "max_tokens",
                 "code": 400}}))]
    created = await start_batch(sdk, lines, metadata={"job": "nightly"})
    assert created.id.startswith("batch_")
    assert (created.object, created.endpoint, created.completion_window) == (
        "batch", "/v1/chat/completions", "24h")
    assert created.status in ("validating", "in_progress")
    assert created.expires_at == created.created_at + 24 * 3600
    assert created.metadata == {"job": "nightly"}

    batch = await finished(gw, sdk, created.id)
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 2, "failed": 1}
    assert batch.errors is None
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.failed_at is None and batch.cancelled_at is None and batch.expired_at is None
    raw = json.loads(await treq.content(await http.get(f"{gw.url}/v1/batches/{batch.id}", headers=AUTH)))
    assert list(raw) == ["id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status",
                         "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at",
                         "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
                         "cancelled_at", "request_counts", "metadata", "model", "usage"]

    output = await file_lines(sdk, batch.output_file_id)
    assert [line["custom_id"] for line in output] == ["a", "b"]
    for line in output:
        assert line["id"].startswith("batch_req_")
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["request_id"] == f"{batch.id}-{lines.index(next(x for x in lines if x['custom_id'] == line['custom_id'])) + 1}"
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["kv_transfer_params"] == {"fake": True}  # vLLM's extras kept
    [error] = await file_lines(sdk, batch.error_file_id)
    assert error["custom_id"] == "bad"
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["message"] == "max_tokens is too large"

    # What vLLM got: the upstream model id, every other field untouched, no stream.
    sent = {r.body["fake_marker"]: r.body for r in fake.requests if r.path == b"/v1/chat/completions"}
    assert sent["a"] == dict(lines[0]["body"], model=UPSTREAM_MODEL)
    assert all("stream" not in body for body in sent.values())

    outputs = await in_thread(lambda: list(sdk.files.list(purpose="batch_output")))
    assert {f.id for f in outputs} == {batch.output_file_id, batch.error_file_id}
    assert {f.filename for f in outputs} == {f"{batch.id}_output.jsonl", f"{batch.id}_error.jsonl"}

    listed = await in_thread(lambda: list(sdk.batches.list()))
    assert [b.id for b in listed] == [batch.id]

    # Our extension: every result, in input order, as JSONL.
    response = await http.get(f"{gw.url}/v1/batches/{batch.id}/results", headers=AUTH)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/jsonl"]
    assert [r["custom_id"] for r in parse_jsonl(await treq.content(response))] == ["a", "b", "bad"]


@pytest_twisted.ensureDeferred
async def test_a_batch_reports_the_tokens_its_answered_lines_used(sdk, gw):
    """OpenAI's C{usage} of a batch: the tokens of its answered lines, summed, in any endpoint's naming (chat's,
    the Responses API's); None for a batch that never ran a line."""
    lines = [chat_line("a"), chat_line("b", fake_cached=4), chat_line("bad", fake_status=400, fake_body="{}")]
    batch = await finished(gw, sdk, (await start_batch(sdk, lines)).id)
    assert batch.status == "completed"
    assert batch.usage.model_dump() == {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 4},
                                        "output_tokens": 6, "output_tokens_details": {"reasoning_tokens": 0},
                                        "total_tokens": 42}
    line = {"custom_id": "r", "method": "POST", "url": "/v1/responses", "body": {"model": MODEL, "input": "Hi"}}
    responses = await finished(gw, sdk, (await start_batch(sdk, [line, dict(line, custom_id="s")],
                                                           endpoint="/v1/responses")).id)
    assert (responses.usage.input_tokens, responses.usage.output_tokens, responses.usage.total_tokens) == (38, 6, 44)
    failed = await finished(gw, sdk, (await start_batch(sdk, [b"{not json"])).id)
    assert failed.status == "failed" and failed.usage is None


@pytest_twisted.ensureDeferred
async def test_a_keys_batch_lines_are_its_usage_but_not_its_rpm_or_tpm(gw, http):
    """Batch lines run beside a key's online traffic, not within its C{rpm} and C{tpm} (OpenAI counts batches
    against a separate queue limit, not the per-minute ones): a key allowed one request a minute has a batch
    of three lines answered, and its next online request passes; the lines' tokens are the key's usage
    (C{GET /v1/usage}, the admin API's usage by key)."""
    made = await http.post(f"{gw.url}/admin/api/v1/auth-keys", headers=AUTH,
                           data=json.dumps({"name": "batcher", "rpm": 1, "tpm": 100}).encode())
    key = json.loads(await treq.content(made))
    client = openai_client(gw, key["value"], timeout=20)
    try:
        created = await start_batch(client, [chat_line(f"l{i}") for i in range(3)])
        batch = await finished(gw, client, created.id)
        assert batch.request_counts.completed == 3
        answer = await in_thread(client.chat.completions.create, model=MODEL, max_tokens=5,
                                 messages=[{"role": "user", "content": "hi"}])
        await gw.service.usage.flush()
        own = await http.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {key['value']}"})
        usage = json.loads(await treq.content(own))["usage"]
        assert usage["total_requests"] == 4
        assert usage["total_tokens"] == batch.usage.total_tokens + answer.usage.total_tokens
        by_key = json.loads(await treq.content(await http.get(f"{gw.url}/admin/api/v1/usage/keys", headers=AUTH)))
        [row] = [row for row in by_key["data"] if row["auth_key_id"] == key["id"]]
        assert (row["requests"], row["total_tokens"]) == (4, usage["total_tokens"])
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_batch_names_its_model_when_its_lines_name_one(sdk, gw):
    """OpenAI's C{model} of a batch: the model its lines name, once validated; None while validating and for a
    batch whose lines name several (ours: OpenAI takes one model per batch)."""
    created = await start_batch(sdk, [chat_line("a"), chat_line("b")])
    assert created.model is None
    assert (await finished(gw, sdk, created.id)).model == MODEL
    mixed = await finished(gw, sdk, (await start_batch(sdk, [chat_line("a"), chat_line("b", model=UPSTREAM_MODEL)])).id)
    assert mixed.status == "completed" and mixed.model is None


@pytest_twisted.ensureDeferred
async def test_a_lines_provider_hint_chooses_its_provider_as_online(reactor, fake, tmp_path):
    """A line's C{provider} (GoModel's routing hint) routes its bare id as an online request's does: validated
    as that provider's model (the batch's C{model}), sent there without it; one that is not a string fails
    validation."""
    from tests.support import start_fake
    b = await start_fake(reactor)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "VLLM_B_BASE_URL": b.base_url,
                                       "GOMODEL_MASTER_KEY": KEY, "GOMODEL_DATA_DIR": str(tmp_path)})
    sdk = openai_client(gw, KEY, timeout=20)
    try:
        batch = await finished(gw, sdk, (await start_batch(sdk, [chat_line("a", model=UPSTREAM_MODEL,
                                                                            provider="vllm-b")])).id)
        assert (batch.status, batch.model) == ("completed", "vllm-b/" + UPSTREAM_MODEL)
        [sent] = [r for r in b.requests if r.path == b"/v1/chat/completions"]
        assert sent.body["model"] == UPSTREAM_MODEL and "provider" not in sent.body
        assert not [r for r in fake.requests if r.path == b"/v1/chat/completions"]
        bad = await finished(gw, sdk, (await start_batch(sdk, [chat_line("a", provider=1)])).id)
        assert bad.status == "failed" and bad.errors.data[0].code == "invalid_type"
        assert bad.errors.data[0].param == "body.provider"
    finally:
        await stop_all(gw, b, clients=(sdk,))


@pytest_twisted.ensureDeferred
async def test_a_responses_batch_lines_responses_are_kept_as_online_ones_are(http, gw):
    """A C{/v1/responses} line's response is kept by the gateway, as an online create's is (unless the line says
    C{"store": false}): it is retrieved, its input items listed, and a managed key of the batch's tenant continues
    it online; before, each was a 404, and the follow-up a 400 previous_response_not_found."""
    clients = []
    for name in ("team", "other"):
        made = await http.post(gw.url + "/admin/api/v1/auth-keys", headers=AUTH,
                               data=json.dumps({"name": name, "user_path": f"/{name}"}).encode())
        clients.append(openai_client(gw, json.loads(await treq.content(made))["value"]))
    team, other = clients
    try:
        lines = [{"custom_id": c, "method": "POST", "url": "/v1/responses",
                  "body": {"model": MODEL, "input": f"Hi {c}", **extra}}
                 for c, extra in (("kept", {}), ("unkept", {"store": False}))]
        batch = await finished(gw, team, (await start_batch(team, lines, endpoint="/v1/responses")).id)
        kept, unkept = (line["response"]["body"]["id"] for line in await file_lines(team, batch.output_file_id))
        assert (await in_thread(team.responses.retrieve, kept)).id == kept
        items = await in_thread(team.responses.input_items.list, kept)
        assert [item.content[0].text for item in items.data] == ["Hi kept"]
        follow_up = await in_thread(team.responses.create, model=MODEL, input="And?", previous_response_id=kept)
        assert follow_up.previous_response_id == kept
        with pytest.raises(openai.NotFoundError):
            await in_thread(team.responses.retrieve, unkept)
        with pytest.raises(openai.NotFoundError):  # another tenant's
            await in_thread(other.responses.retrieve, kept)
    finally:
        team.close()
        other.close()


async def team_keys(http, gateway, clients):
    """Managed keys alice (team a), mover and bob (team b), by name; an openai client of each added to C{clients}."""
    keys = {}
    for name, path in (("alice", "/team/a"), ("mover", "/team/b"), ("bob", "/team/b")):
        made = await http.post(gateway.url + "/admin/api/v1/auth-keys", headers=AUTH,
                               data=json.dumps({"name": name, "user_path": path}).encode())
        keys[name] = json.loads(await treq.content(made))
        clients.append(openai_client(gateway, keys[name]["value"]))
    return keys


async def moved_while_held(reactor, http, gateway, fake, key):
    """Move C{key} to team a once the fake holds its batch's first line, then let that line be answered: the line
    holds the provider's one slot, the next waits for it, and the last one is read once it got it (after the move)."""
    await with_timeout(reactor, fake.when_held(1), 10)
    moved = await http.patch(gateway.url + f"/admin/api/v1/auth-keys/{key['id']}", headers=AUTH,
                             data=json.dumps({"user_path": "/team/a"}).encode())
    assert moved.code == 200, await treq.content(moved)
    fake.release_holds()


@pytest_twisted.ensureDeferred
async def test_a_line_continues_no_response_of_a_team_its_key_joined_after_the_batch_started(reactor, fake, http,
                                                                                             tmp_path):
    """A batch's responses and output are its tenant's (the team its key was in when it made it), wherever the key
    moved since: a line continues no stored response of the team the key moved to. Before, a key moved from team b
    to team a while its batch ran continued team a's conversation into team b's output and stored responses, which
    every member of team b read and continued."""
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": KEY,
                                            "GOMODEL_DATA_DIR": str(tmp_path), "BATCH_CONCURRENCY_PER_PROVIDER": "1"})
    clients = []
    try:
        keys = await team_keys(http, gateway, clients)
        alice, mover, bob = clients
        plans = await in_thread(alice.responses.create, model=MODEL, input="team a's plans")
        await gateway.service.store.responses.get(plans.id)  # (kept: stored once read)
        lines = [{"custom_id": custom_id, "method": "POST", "url": "/v1/responses", "body": dict(body, model=MODEL)}
                 for custom_id, body in (("first", {"input": "hi", "fake_hold": True}), ("waits", {"input": "hi"}),
                                         ("next", {"input": "go on", "previous_response_id": plans.id}))]
        batch = await start_batch(mover, lines, endpoint="/v1/responses")
        await moved_while_held(reactor, http, gateway, fake, keys["mover"])
        await gateway.service.batch_runner.settled(batch.id)
        ended = await in_thread(bob.batches.retrieve, batch.id)  # (team b's batch, as it was made)
        assert ended.request_counts.completed == 2, ended
        errors = await file_lines(bob, ended.error_file_id)
        assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("next", "previous_response_not_found")]
        sent = [json.dumps(r.body) for r in fake.forwarded(b"/v1/responses")]
        assert sum("team a's plans" in body for body in sent) == 1  # (alice's own: none of the batch's went on)
        # A batch it makes now is team a's: its line goes on with team a's plans, for team a.
        again = await finished(gateway, mover, (await start_batch(mover, lines[2:], endpoint="/v1/responses")).id)
        [line] = await file_lines(alice, again.output_file_id)
        assert line["response"]["body"]["previous_response_id"] == plans.id
    finally:
        await stop_all(gateway, clients=clients)


@pytest_twisted.ensureDeferred
async def test_every_line_of_a_batch_takes_its_tenants_cache_salt_wherever_its_key_moved_since(reactor, fake, http,
                                                                                                tmp_path):
    """A batch's lines share vLLM's prefix cache with the team it is (the one its key was in when it made it), as
    its output and stored responses do, wherever the key moved since. Before, the lines read after the key moved
    from team b to team a took team a's C{cache_salt}: team a shared the prefix cache with team b's batch prompts
    (and could time them), and team b's own requests missed their batch's warm cache."""
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": KEY,
                                            "GOMODEL_DATA_DIR": str(tmp_path), "BATCH_CONCURRENCY_PER_PROVIDER": "1"})
    clients, salts = [], {}
    try:
        keys = await team_keys(http, gateway, clients)
        alice, mover, bob = clients
        for name, client in (("a", alice), ("b", bob)):
            await in_thread(client.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "hi"}])
            salts[name] = fake.last_request(b"/v1/chat/completions").body["cache_salt"]
        assert salts["a"] != salts["b"]
        lines = [chat_line("first", fake_hold=True), chat_line("waits"), chat_line("next", cache_salt="mine")]
        batch = await start_batch(mover, lines)
        await moved_while_held(reactor, http, gateway, fake, keys["mover"])
        ended = await finished(gateway, bob, batch.id)
        assert ended.request_counts.completed == 3, ended
        sent = {r.body["fake_marker"]: r.body.get("cache_salt") for r in fake.forwarded(b"/v1/chat/completions")
                if "fake_marker" in r.body}
        assert sent == {"first": salts["b"], "waits": salts["b"], "next": salts["b"]}
        # A batch it makes now is team a's: its lines share team a's cache.
        await finished(gateway, mover, (await start_batch(mover, [chat_line("now")])).id)
        assert fake.last_request(b"/v1/chat/completions").body["cache_salt"] == salts["a"]
    finally:
        await stop_all(gateway, clients=clients)


@pytest_twisted.ensureDeferred
async def test_output_expires_after_gives_the_output_and_error_files_their_expiry(sdk, gw):
    lines = [chat_line("a"), chat_line("bad", fake_status=400, fake_body="{}")]
    created = await start_batch(sdk, lines, output_expires_after={"anchor": "created_at", "seconds": 7200})
    batch = await finished(gw, sdk, created.id)
    for file_id in (batch.output_file_id, batch.error_file_id):
        written = await in_thread(sdk.files.retrieve, file_id)
        assert written.expires_at == written.created_at + 7200
    # None given: BATCH_OUTPUT_EXPIRES_AFTER's 30 days (before, the files and the results were kept for good).
    default = await finished(gw, sdk, (await start_batch(sdk, lines)).id)
    for file_id in (default.output_file_id, default.error_file_id):
        written = await in_thread(sdk.files.retrieve, file_id)
        assert written.expires_at == written.created_at + 30 * 86400


@pytest_twisted.ensureDeferred
async def test_batch_output_expires_after_0_keeps_the_files_and_results_of_a_batch_made_without_one(
        reactor, fake, tmp_path, http):
    """C{BATCH_OUTPUT_EXPIRES_AFTER=0}: the output and error files of a batch made without C{output_expires_after}
    never expire, and its results stay whatever is done to its files; one made with it still expires."""
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": KEY,
                                            "GOMODEL_DATA_DIR": str(tmp_path), "BATCH_OUTPUT_EXPIRES_AFTER": "0"})
    sdk = openai_client(gateway, KEY)
    try:
        lines = [chat_line("a"), chat_line("bad", fake_status=400, fake_body="{}")]
        kept = await finished(gateway, sdk, (await start_batch(sdk, lines)).id)
        assert (await in_thread(sdk.files.retrieve, kept.output_file_id)).expires_at is None
        await in_thread(sdk.files.delete, kept.output_file_id)
        with sqlite3.connect(tmp_path / "gomodel.db") as conn:
            conn.execute("UPDATE files SET expires_at = 1 WHERE id = ?", (kept.error_file_id,))
        response = await http.get(f"{gateway.url}/v1/batches/{kept.id}/results", headers=AUTH)
        assert [r["custom_id"] for r in parse_jsonl(await treq.content(response))] == ["a", "bad"]
        asked = await finished(gateway, sdk, (await start_batch(
            sdk, lines, output_expires_after={"anchor": "created_at", "seconds": 7200})).id)
        written = await in_thread(sdk.files.retrieve, asked.output_file_id)
        assert written.expires_at == written.created_at + 7200
    finally:
        sdk.close()
        await gateway.service.stopService()


@pytest_twisted.ensureDeferred
async def test_results_go_with_the_output_files_that_expired(sdk, gw, http, tmp_path):
    """C{GET /v1/batches/{id}/results} of a batch made with C{output_expires_after} serves the results of its
    files that have not expired: an expired output file's answers are gone there too (before, they were served
    as long as the gateway ran, past the expiry the client asked for); so do those of a batch made without one
    (BATCH_OUTPUT_EXPIRES_AFTER's: before, they stayed whatever was done to its files)."""
    lines = [chat_line("a"), chat_line("bad", fake_status=400, fake_body="{}")]
    expiring = await finished(gw, sdk, (await start_batch(
        sdk, lines, output_expires_after={"anchor": "created_at", "seconds": 3600})).id)
    default = await finished(gw, sdk, (await start_batch(sdk, lines)).id)

    async def results(batch):
        response = await http.get(f"{gw.url}/v1/batches/{batch.id}/results", headers=AUTH)
        assert response.code == 200
        return [r["custom_id"] for r in parse_jsonl(await treq.content(response))]

    def expire(file_id):
        with sqlite3.connect(tmp_path / "gomodel.db") as conn:
            conn.execute("UPDATE files SET expires_at = 1 WHERE id = ?", (file_id,))

    assert await results(expiring) == ["a", "bad"]
    expire(expiring.error_file_id)
    assert await results(expiring) == ["a"]
    expire(expiring.output_file_id)
    assert await results(expiring) == []
    await in_thread(sdk.files.delete, default.output_file_id)
    assert await results(default) == ["bad"]
    expire(default.error_file_id)
    assert await results(default) == []


@pytest_twisted.ensureDeferred
async def test_deleting_an_output_file_deletes_the_answers_it_held_from_the_store(sdk, gw):
    """C{DELETE /v1/files/{id}} of a batch's output or error file takes the answers it held out of the store, as
    its expiry does at the files sweep (its results route no longer serves them); before, they stayed in the
    database for good, served nowhere, though the client had deleted them. A message batch's stay (Anthropic's
    results are no file's), and so do those of a batch whose files never expire."""
    lines = [chat_line("a"), chat_line("bad", fake_status=400, fake_body="{}")]
    batch = await finished(gw, sdk, (await start_batch(sdk, lines)).id)
    store = gw.service.store.batches
    assert [r[1] for r in await store.read_results(batch.id, -1, 10)] == ["a", "bad"]
    await in_thread(sdk.files.delete, batch.output_file_id)
    assert [r[1] for r in await store.read_results(batch.id, -1, 10)] == ["bad"]
    await in_thread(sdk.files.delete, batch.error_file_id)
    assert await store.read_results(batch.id, -1, 10) == []


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("endpoint, body, path, kind", [
    ("/v1/embeddings", {"input": ["a", "b"]}, b"/v1/embeddings", "list"),
    ("/v1/completions", {"prompt": "Hello"}, b"/v1/completions", "text_completion"),
    ("/v1/rerank", {"query": "q", "documents": ["x", "y"]}, b"/v1/rerank", None),
    ("/v1/score", {"text_1": "a", "text_2": "b"}, b"/v1/score", "list"),
    ("/v1/responses", {"input": "Hi"}, b"/v1/responses", "response"),
])
async def test_batch_endpoints_reach_the_matching_vllm_route(sdk, gw, fake, endpoint, body, path, kind):
    line = {"custom_id": "one", "method": "POST", "url": endpoint, "body": {"model": MODEL, **body}}
    batch = await finished(gw, sdk, (await start_batch(sdk, [line], endpoint=endpoint)).id)
    assert batch.status == "completed", batch
    [output] = await file_lines(sdk, batch.output_file_id)
    assert output["response"]["status_code"] == 200
    assert output["response"]["body"].get("object") == kind
    [sent] = [r for r in fake.requests if r.method == b"POST"]
    assert sent.path == path
    assert sent.body == dict(line["body"], model=UPSTREAM_MODEL)


@pytest_twisted.ensureDeferred
async def test_a_line_an_upstream_answers_with_a_stream_gets_the_one_answer_it_makes(reactor, sdk, gw, fake):
    """A line (which never streams) that an upstream answers with an event stream anyway gets the one
    chat.completion the stream makes, as an online request does; a stream that does not end properly is the
    line's error (before: the events were no JSON, the line a bad_upstream_response). One whose upstream holds its
    body open past [DONE] is cut a second after it, as a relayed stream is (before: the line waited
    HTTP_RESPONSE_HEADER_TIMEOUT, then failed)."""
    lines = [chat_line("a", fake_stream_anyway=True),
             chat_line("cut", fake_stream_anyway=True, fake_sse=['{"id":"c","choices":[]}']),
             chat_line("held", fake_stream_anyway=True, fake_after_done="hold")]
    batch = await with_timeout(reactor, ensureDeferred(finished(gw, sdk, (await start_batch(sdk, lines)).id)), 10)
    outputs = await file_lines(sdk, batch.output_file_id)
    assert [output["custom_id"] for output in outputs] == ["a", "held"]
    for output in outputs:
        assert output["response"]["status_code"] == 200
        answer = output["response"]["body"]
        assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"] == "héhéhé"
    [error] = await file_lines(sdk, batch.error_file_id)
    assert error["custom_id"] == "cut" and error["error"]["code"] == "bad_upstream_response"
    assert "without [DONE]" in error["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_a_responses_line_to_a_provider_without_a_responses_api_is_translated_to_chat(reactor, tmp_path):
    """A C{/v1/responses} line whose provider has no C{/responses} (FastAPI's 404: Ollama, an OpenAI-compatible
    server) is sent again translated to chat completions, as the same request online is: its answer is a response
    object, kept, and its follow-up line is sent the stored conversation (before: the 404 in the error file)."""
    fake = await start_fake(reactor, responses=False)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": KEY,
                                       "GOMODEL_DATA_DIR": str(tmp_path)})
    sdk = openai_client(gw, KEY)
    try:
        lines = [{"custom_id": "one", "method": "POST", "url": "/v1/responses",
                  "body": {"model": MODEL, "input": "Remember 42.", "instructions": "Be brief."}}]
        batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
        assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("completed", 1, 0)
        (out,) = await file_lines(sdk, batch.output_file_id)
        body = out["response"]["body"]
        assert out["response"]["status_code"] == 200 and body["object"] == "response"
        assert body["output"][0]["content"][0]["text"] == "héhéhé" and body["instructions"] == "Be brief."
        assert batch.usage.input_tokens > 0
        chat = [r.body for r in fake.requests if r.path == b"/v1/chat/completions"][-1]
        assert chat["messages"] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Remember 42."}]
        kept = await in_thread(sdk.responses.retrieve, body["id"])
        assert kept.output_text == "héhéhé"
        lines = [{"custom_id": "two", "method": "POST", "url": "/v1/responses",
                  "body": {"model": MODEL, "input": "What number?", "previous_response_id": body["id"]}}]
        batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
        (out,) = await file_lines(sdk, batch.output_file_id)
        assert out["response"]["body"]["previous_response_id"] == body["id"]
        chat = [r.body for r in fake.requests if r.path == b"/v1/chat/completions"][-1]
        assert "Remember 42." in json.dumps(chat["messages"]) and chat["messages"][-1]["content"] == "What number?"
    finally:
        sdk.close()
        await stop_all(gw, fake)


@pytest_twisted.ensureDeferred
async def test_responses_lines_to_a_provider_without_a_responses_api_are_refused_natively_once(reactor, tmp_path):
    """Once a provider answered it has no C{/responses}, the next C{/v1/responses} lines, and online requests,
    go to it translated at once: one memory for both (before: each line was refused natively first, 404 after
    404, and an online request learnt it again)."""
    fake = await start_fake(reactor, responses=False)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": KEY,
                                       "GOMODEL_DATA_DIR": str(tmp_path), "BATCH_CONCURRENCY_PER_PROVIDER": "1"})
    sdk = openai_client(gw, KEY)
    try:
        lines = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/responses",
                  "body": {"model": MODEL, "input": f"Say {i}."}} for i in range(6)]
        batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
        assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("completed", 6, 0)
        assert all(out["response"]["body"]["object"] == "response"
                   for out in await file_lines(sdk, batch.output_file_id))
        online = await in_thread(sdk.responses.create, model=MODEL, input="hi")
        assert online.output_text == "héhéhé"
        refused = [r for r in fake.requests if r.path == b"/v1/responses"]
        assert len(refused) == 1  # (the first line's)
        assert len([r for r in fake.requests if r.path == b"/v1/chat/completions"]) == 7
    finally:
        sdk.close()
        await stop_all(gw, fake)


@pytest_twisted.ensureDeferred
async def test_a_responses_line_translated_at_once_falls_back_as_online(reactor, tmp_path):
    """A C{/v1/responses} line sent translated at once (its first target is known to have no C{/responses}) follows
    the configured fallbacks when that target fails, as the same request online does (before: it had none, and the
    line failed with its first target's error); a fallback with a Responses API of its own gets it natively, as
    online (before: translated to chat completions there too, its answer rebuilt from a chat completion)."""
    first = await start_fake(reactor, responses=False)
    second = await start_fake(reactor)
    rules = {f"vllm-a/{UPSTREAM_MODEL}": [f"vllm-b/{UPSTREAM_MODEL}"]}
    gw = await start_gateway(reactor, {"VLLM_A_BASE_URL": first.base_url, "VLLM_B_BASE_URL": second.base_url,
                                       "FAILOVER_RULES_JSON": json.dumps(rules), "GOMODEL_MASTER_KEY": KEY,
                                       "GOMODEL_DATA_DIR": str(tmp_path)})
    sdk = openai_client(gw, KEY)
    try:
        online = await in_thread(sdk.responses.create, model=f"vllm-a/{UPSTREAM_MODEL}", input="hi")
        assert online.output_text == "héhéhé"  # (translated: vllm-a is known to have no /responses from now on)
        first.steer = {"fake_status": 503, "fake_body": '{"error": {"message": "overloaded"}}'}  # (failing now)
        lines = [{"custom_id": "one", "method": "POST", "url": "/v1/responses",
                  "body": {"model": f"vllm-a/{UPSTREAM_MODEL}", "input": "Say 1."}}]
        batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
        assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 0)
        (out,) = await file_lines(sdk, batch.output_file_id)
        body = out["response"]["body"]
        assert body["object"] == "response" and body["output"][0]["content"][0]["text"] == "héhéhé"
        assert first.last_request().path == b"/v1/chat/completions"  # (translated at once)
        [native] = [r for r in second.requests if r.path in (b"/v1/chat/completions", b"/v1/responses")]
        assert native.path == b"/v1/responses" and native.body["input"] == "Say 1."  # (natively there)
        assert body["id"] in second.stored_responses  # (its own response object, as its instance keeps it)
        assert (await in_thread(sdk.responses.retrieve, body["id"])).output_text == "héhéhé"
    finally:
        sdk.close()
        await stop_all(gw, first, second)


@pytest_twisted.ensureDeferred
async def test_a_native_fallbacks_stream_nobody_asked_for_is_collected_as_the_path_it_was_sent(reactor, tmp_path):
    """A translated C{/v1/responses} line's fallback gets it natively (C{/responses}); an upstream that streams its
    answer anyway is collected as a Responses stream, the path sent there (before: as a chat completions stream, the
    first target's path, and the line failed)."""
    first = await start_fake(reactor, responses=False)
    second = await start_fake(reactor)
    rules = {f"vllm-a/{UPSTREAM_MODEL}": [f"vllm-b/{UPSTREAM_MODEL}"]}
    gw = await start_gateway(reactor, {"VLLM_A_BASE_URL": first.base_url, "VLLM_B_BASE_URL": second.base_url,
                                       "FAILOVER_RULES_JSON": json.dumps(rules), "GOMODEL_MASTER_KEY": KEY,
                                       "GOMODEL_DATA_DIR": str(tmp_path)})
    sdk = openai_client(gw, KEY)
    try:
        await in_thread(sdk.responses.create, model=f"vllm-a/{UPSTREAM_MODEL}", input="hi")  # (known translated)
        first.steer = {"fake_status": 503, "fake_body": '{"error": {"message": "overloaded"}}'}
        second.steer = {"fake_stream_anyway": True}
        lines = [{"custom_id": "one", "method": "POST", "url": "/v1/responses",
                  "body": {"model": f"vllm-a/{UPSTREAM_MODEL}", "input": "Say 1."}}]
        batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
        assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 0)
        (out,) = await file_lines(sdk, batch.output_file_id)
        body = out["response"]["body"]
        assert body["object"] == "response" and body["output"][0]["content"][0]["text"] == "héhéhé"
        assert second.last_request().path == b"/v1/responses"
    finally:
        sdk.close()
        await stop_all(gw, first, second)


@pytest_twisted.ensureDeferred
async def test_a_translated_lines_native_fallback_without_a_responses_api_is_sent_it_translated(reactor, tmp_path):
    """A C{/v1/responses} line sent translated at once falls back to a provider not known to lack C{/responses},
    asked natively there; its "no such route" sends the line there again translated, as online (before: no second
    chance, the line failed with that 404)."""
    first = await start_fake(reactor, responses=False)
    second = await start_fake(reactor, responses=False)
    rules = {f"vllm-a/{UPSTREAM_MODEL}": [f"vllm-b/{UPSTREAM_MODEL}"]}
    gw = await start_gateway(reactor, {"VLLM_A_BASE_URL": first.base_url, "VLLM_B_BASE_URL": second.base_url,
                                       "FAILOVER_RULES_JSON": json.dumps(rules), "GOMODEL_MASTER_KEY": KEY,
                                       "GOMODEL_DATA_DIR": str(tmp_path)})
    sdk = openai_client(gw, KEY)
    try:
        await in_thread(sdk.responses.create, model=f"vllm-a/{UPSTREAM_MODEL}", input="hi")  # (known translated)
        first.steer = {"fake_status": 503, "fake_body": '{"error": {"message": "overloaded"}}'}
        lines = [{"custom_id": "one", "method": "POST", "url": "/v1/responses",
                  "body": {"model": f"vllm-a/{UPSTREAM_MODEL}", "input": "Say 1."}}]
        batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
        assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 0)
        (out,) = await file_lines(sdk, batch.output_file_id)
        body = out["response"]["body"]
        assert body["object"] == "response" and body["output"][0]["content"][0]["text"] == "héhéhé"
        asked = [r.path for r in second.requests if r.path in (b"/v1/chat/completions", b"/v1/responses")]
        assert asked == [b"/v1/responses", b"/v1/chat/completions"]  # (natively, then translated there)
    finally:
        sdk.close()
        await stop_all(gw, first, second)


@pytest_twisted.ensureDeferred
async def test_a_responses_line_falling_back_to_a_provider_without_a_responses_api_is_translated_there(
        reactor, tmp_path):
    """A C{/v1/responses} line whose first target fails goes on to its fallback; one without a Responses API (its
    404 Not Found) gets it translated to chat completions, as the same request online does (before: that 404 was
    the line's error)."""
    first = await start_fake(reactor)
    second = await start_fake(reactor, responses=False)
    first.steer = {"fake_status": 503, "fake_body": '{"error": {"message": "overloaded"}}'}
    rules = {f"vllm-a/{UPSTREAM_MODEL}": [f"vllm-b/{UPSTREAM_MODEL}"]}
    gw = await start_gateway(reactor, {"VLLM_A_BASE_URL": first.base_url, "VLLM_B_BASE_URL": second.base_url,
                                       "FAILOVER_RULES_JSON": json.dumps(rules), "GOMODEL_MASTER_KEY": KEY,
                                       "GOMODEL_DATA_DIR": str(tmp_path)})
    sdk = openai_client(gw, KEY)
    try:
        lines = [{"custom_id": "one", "method": "POST", "url": "/v1/responses",
                  "body": {"model": f"vllm-a/{UPSTREAM_MODEL}", "input": "Say 1."}}]
        batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
        assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 0)
        (out,) = await file_lines(sdk, batch.output_file_id)
        assert out["response"]["body"]["object"] == "response"
        assert out["response"]["body"]["output"][0]["content"][0]["text"] == "héhéhé"
        assert [r.path for r in second.requests if r.path.startswith(b"/v1/c")] == [b"/v1/chat/completions"]
    finally:
        sdk.close()
        await stop_all(gw, first, second)


@pytest_twisted.ensureDeferred
async def test_a_line_continuing_a_response_nobody_holds_ends_in_previous_response_not_found(sdk, gw, fake):
    """The master key's line continuing an id neither the gateway nor its upstream holds, or one deleted through
    the gateway (its upstream still holds it), ends in OpenAI's C{previous_response_not_found}, as the same
    request online does (before: vLLM's 404 in the error file; the deleted one continued upstream)."""
    kept = await in_thread(sdk.responses.create, model=MODEL, input="hi")
    await in_thread(sdk.responses.delete, kept.id)
    assert kept.id in fake.stored_responses  # (vLLM still holds it)
    lines = [{"custom_id": custom_id, "method": "POST", "url": "/v1/responses",
              "body": {"model": MODEL, "input": "more", "previous_response_id": previous}}
             for custom_id, previous in (("unknown", "resp_nobody"), ("deleted", kept.id))]
    batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
    assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("completed", 0, 2)
    errors = await file_lines(sdk, batch.error_file_id)
    assert {e["custom_id"]: (e["response"], e["error"]["code"]) for e in errors} == {
        "unknown": (None, "previous_response_not_found"), "deleted": (None, "previous_response_not_found")}
    assert "resp_nobody" in {e["custom_id"]: e["error"]["message"] for e in errors}["unknown"]
    continued = [r.body["previous_response_id"] for r in fake.requests if r.path == b"/v1/responses"
                 and r.body.get("previous_response_id") is not None]
    assert continued == ["resp_nobody"]  # (asked upstream: the gateway does not know whether it holds it)


@pytest_twisted.ensureDeferred
async def test_a_line_naming_a_conversation_or_a_stored_prompt_at_a_native_vllm_ends_in_unsupported_value(
        sdk, gw, fake):
    """A C{/v1/responses} line naming a conversation (or a stored prompt) for a vLLM, whose Responses API keeps
    neither, ends in the 400 the same request gets online, unsent (before: vLLM ignored the conversation and
    answered without its items)."""
    lines = [{"custom_id": custom_id, "method": "POST", "url": "/v1/responses",
              "body": dict({"model": MODEL, "input": "more"}, **extra)}
             for custom_id, extra in (("conversation", {"conversation": "conv_1"}), ("prompt", {"prompt": {"id": "p"}}),
                                      ("plain", {}))]
    batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 2)
    errors = await file_lines(sdk, batch.error_file_id)
    assert {e["custom_id"]: e["error"]["code"] for e in errors} == {"conversation": "unsupported_value",
                                                                    "prompt": "unsupported_value"}
    assert [r.body["input"] for r in fake.requests if r.path == b"/v1/responses"] == ["more"]


# OpenAI's words for an C{include} value its Responses API cannot include (as online: test_responses_lifecycle).
_UNKNOWN_INCLUDE = ("Invalid value: 'nope'. Supported values are: 'file_search_call.results', 'web_search_call.results', "
                    "'web_search_call.action.sources', 'message.input_image.image_url', "
                    "'computer_call_output.output.image_url', 'code_interpreter_call.outputs', "
                    "'reasoning.encrypted_content', and 'message.output_text.logprobs'.")


@pytest_twisted.ensureDeferred
async def test_a_line_naming_what_include_cannot_name_ends_in_openais_error_unsent(sdk, gw, fake):
    """A C{/v1/responses} line whose C{include} names what OpenAI's Responses API cannot include (or is no list)
    ends in the error the same request gets online, its words, and is sent nowhere (before: sent to vLLM, the
    line's error vLLM's own 400)."""
    lines = [{"custom_id": custom_id, "method": "POST", "url": "/v1/responses",
              "body": dict({"model": MODEL, "input": custom_id}, **extra)}
             for custom_id, extra in (("typo", {"include": ["nope"]}), ("typed", {"include": "nope"}),
                                      ("plain", {"include": ["message.output_text.logprobs"]}))]
    batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 2)
    errors = {e["custom_id"]: e for e in await file_lines(sdk, batch.error_file_id)}
    assert errors["typo"]["response"] is None and errors["typo"]["error"] == {"code": "invalid_value",
                                                                            "message": _UNKNOWN_INCLUDE}
    assert errors["typed"]["error"] == {"code": "invalid_type", "message": "include must be a list of strings."}
    assert [r.body["input"] for r in fake.requests if r.path == b"/v1/responses"] == ["plain"]


@pytest_twisted.ensureDeferred
async def test_a_line_continuing_a_background_response_not_over_ends_in_openais_error_unsent(sdk, gw, fake):
    """A line continuing a background response still queued or in progress at its instance ends in the error the
    same request gets online (C{previous_response_not_over}), no create sent for it (before: sent to vLLM, which
    went on from what it had so far); the gateway asks its instance, so one over there since is continued."""
    running = await in_thread(sdk.responses.create, model=MODEL, input="long job", background=True)
    assert running.status == "queued"
    for status in ("queued", "in_progress"):
        fake.stored_responses[running.id]["status"] = status
        creates = sum(r.method == b"POST" and r.path == b"/v1/responses" for r in fake.requests)
        lines = [{"custom_id": "next", "method": "POST", "url": "/v1/responses",
                  "body": {"model": MODEL, "input": "and then?", "previous_response_id": running.id}}]
        batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
        assert (batch.request_counts.completed, batch.request_counts.failed) == (0, 1), status
        [error] = await file_lines(sdk, batch.error_file_id)
        assert error["response"] is None and error["error"] == {
            "code": "previous_response_not_over",
            "message": f"Previous response with id '{running.id}' is still {status}: it can be continued once it "
                       "is over (or cancelled)."}, status
        assert sum(r.method == b"POST" and r.path == b"/v1/responses" for r in fake.requests) == creates, status
    fake.stored_responses[running.id]["status"] = "completed"  # (over at its instance; the gateway's copy: not)
    batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 0)
    [out] = await file_lines(sdk, batch.output_file_id)
    assert out["response"]["body"]["previous_response_id"] == running.id
    assert fake.last_request().body["previous_response_id"] == running.id


@pytest_twisted.ensureDeferred
async def test_a_line_whose_previous_response_id_is_no_id_ends_in_the_online_error_unsent(sdk, gw, fake):
    """A line whose C{previous_response_id} is no response id (no string, empty) ends in the error the same request
    gets online, sent nowhere (before: the master key's went to vLLM as it came)."""
    lines = [{"custom_id": custom_id, "method": "POST", "url": "/v1/responses",
              "body": {"model": MODEL, "input": custom_id, "previous_response_id": previous}}
             for custom_id, previous in (("number", 123), ("list", ["resp_1"]), ("empty", ""), ("none", None))]
    batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 3)
    message = "previous_response_id must be a response id (a non-empty string) or null."
    assert {e["custom_id"]: e["error"] for e in await file_lines(sdk, batch.error_file_id)} == {
        "number": {"code": "invalid_type", "message": message}, "list": {"code": "invalid_type", "message": message},
        "empty": {"code": "invalid_value", "message": message}}
    assert [r.body["input"] for r in fake.requests if r.path == b"/v1/responses"] == ["none"]


@pytest_twisted.ensureDeferred
async def test_a_line_whose_metadata_is_past_openais_limits_ends_in_the_online_error_unsent(sdk, gw, fake):
    """A C{/v1/responses} line whose C{metadata} is past OpenAI's limits (16 string pairs, keys up to 64 characters,
    values up to 512) ends in the error the same request gets online, sent nowhere and never stored (before: vLLM
    took it, and the gateway kept and echoed it)."""
    lines = [{"custom_id": custom_id, "method": "POST", "url": "/v1/responses",
              "body": {"model": MODEL, "input": custom_id, "metadata": metadata}}
             for custom_id, metadata in (("many", {str(i): "v" for i in range(17)}), ("long", {"k": "v" * 513}),
                                         ("typed", {"k": 1}), ("most", {f"{i:064d}": "v" * 512 for i in range(16)}))]
    batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 3)
    message = ("'metadata' must be an object of at most 16 string pairs (keys up to 64 characters, values up to "
               "512).")
    assert {e["custom_id"]: e["error"] for e in await file_lines(sdk, batch.error_file_id)} == {
        custom_id: {"code": "invalid_value", "message": message} for custom_id in ("many", "long", "typed")}
    assert [r.body["input"] for r in fake.requests if r.path == b"/v1/responses"] == ["most"]


@pytest_twisted.ensureDeferred
async def test_a_line_continuing_a_response_its_restarted_instance_forgot_sends_the_conversation(sdk, gw, fake):
    """A line continuing a stored response that vLLM no longer holds (it restarted: its 404 names it) is sent
    again with the stored conversation as explicit input, as the same request online is; its answer names the
    response it follows (before: vLLM's 404 in the error file)."""
    first = await in_thread(sdk.responses.create, model=MODEL, input="Remember 42.")
    fake.stored_responses.clear()  # vLLM restarted
    lines = [{"custom_id": "next", "method": "POST", "url": "/v1/responses",
              "body": {"model": MODEL, "input": "What number?", "previous_response_id": first.id}}]
    batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
    assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("completed", 1, 0)
    (out,) = await file_lines(sdk, batch.output_file_id)
    assert out["response"]["status_code"] == 200 and out["response"]["body"]["previous_response_id"] == first.id
    replayed = [r.body for r in fake.requests if r.path == b"/v1/responses"][-1]
    assert "previous_response_id" not in replayed and "Remember 42." in json.dumps(replayed["input"])
    assert replayed["input"][-1] == {"role": "user", "content": "What number?"}
    kept = await in_thread(sdk.responses.retrieve, out["response"]["body"]["id"])  # (kept, linked)
    assert kept.previous_response_id == first.id


@pytest_twisted.ensureDeferred
async def test_a_line_continuing_a_conversation_whose_earlier_turn_was_deleted_never_sends_that_turn(sdk, gw, fake):
    """As online: the conversation goes on from the turns after the one deleted, sent explicitly (before: vLLM,
    which still holds the whole conversation, went on with the deleted turn)."""
    first = await in_thread(sdk.responses.create, model=MODEL, input="My PIN is 1234.")
    second = await in_thread(sdk.responses.create, model=MODEL, input="Remember 42.", previous_response_id=first.id)
    await in_thread(sdk.responses.delete, first.id)
    lines = [{"custom_id": "next", "method": "POST", "url": "/v1/responses",
              "body": {"model": MODEL, "input": "What number?", "previous_response_id": second.id}}]
    batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
    (out,) = await file_lines(sdk, batch.output_file_id)
    assert out["response"]["status_code"] == 200 and out["response"]["body"]["previous_response_id"] == second.id
    sent = [r.body for r in fake.requests if r.path == b"/v1/responses"][-1]
    assert "previous_response_id" not in sent and "1234" not in json.dumps(sent)
    assert sent["input"] == [{"role": "user", "content": "Remember 42."}, {"role": "assistant", "content": "héhéhé"},
                             {"role": "user", "content": "What number?"}]
    kept = await in_thread(sdk.responses.retrieve, out["response"]["body"]["id"])
    assert kept.previous_response_id == second.id


@pytest_twisted.ensureDeferred
async def test_a_line_halted_while_it_reads_the_conversation_to_send_again_is_not_sent(reactor, sdk, gw, fake,
                                                                                    monkeypatch):
    """A batch cancelled while a line reads the stored conversation it is to be sent again with (its instance
    forgot the response it continues) sends nothing more: the line is left unanswered, as the lines in flight
    are; before, it was sent anyway, its answer awaited and recorded after the cancel (a stop waited for it)."""
    from gomodel.batches import runner as runner_module

    reading, read = Deferred(), runner_module.with_history
    first = await in_thread(sdk.responses.create, model=MODEL, input="Remember 42.")
    fake.stored_responses.clear()  # vLLM restarted
    monkeypatch.setattr(runner_module, "with_history", lambda *args: reading.addCallback(
        lambda _: ensureDeferred(read(*args))))
    lines = [{"custom_id": "next", "method": "POST", "url": "/v1/responses",
              "body": {"model": MODEL, "input": "What number?", "previous_response_id": first.id}}]
    created = await start_batch(sdk, lines, endpoint="/v1/responses")
    await until(reactor, lambda: len([r for r in fake.requests if r.path == b"/v1/responses"]) == 2)
    await in_thread(sdk.batches.cancel, created.id)
    reading.callback(None)
    batch = await finished(gw, sdk, created.id)
    assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("cancelled", 0, 0)
    assert len([r for r in fake.requests if r.path == b"/v1/responses"]) == 2  # (the first, its line's 404)


@pytest_twisted.ensureDeferred
async def test_lines_whose_drawn_target_went_down_complete_from_the_other_target(reactor, tmp_path):
    """A virtual model's line drawn to a target that has no ready replica by the time it is sent (it went down
    while the line waited for room at its provider) is answered by the other target instead of waiting for the
    first to come back; so is the line that target held without an answer as it went down (its connection
    closed)."""
    from tests.fakes.fleet import FakeReplica

    a, b = FakeReplica(reactor, name="a"), FakeReplica(reactor, name="b")
    await a.start()
    await b.start()
    virtual = [{"source": "llama", "targets": [{"model": f"vllm-a/{UPSTREAM_MODEL}", "weight": 99},
                                               {"model": f"vllm-b/{UPSTREAM_MODEL}", "weight": 1}]}]
    gw = await start_gateway(reactor, {
        "VLLM_A_BASE_URL": a.base_url, "VLLM_B_BASE_URL": b.base_url, "VIRTUAL_MODELS": json.dumps(virtual),
        "BATCH_CONCURRENCY_PER_PROVIDER": "1", "REPLICA_HEALTH_INTERVAL": "50ms", "GOMODEL_MASTER_KEY": KEY,
        "GOMODEL_DATA_DIR": str(tmp_path)})
    sdk = openai_client(gw, KEY)
    [replica] = gw.registry.provider("vllm-a").replicas
    try:
        a.hang = True  # the first line stays in flight at a: the next one drawn to a waits for room there
        lines = [{"custom_id": c, "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "llama", "messages": [{"role": "user", "content": c}], "max_tokens": 5}}
                 for c in ("first", "second", "third")]
        created = await start_batch(sdk, lines)
        waiting = gw.service.batch_runner.semaphore("vllm-a").waiting
        await until(reactor, lambda: a.inference_requests and waiting, what="a line waiting for vllm-a")
        a.health_status = 503  # a goes down
        await until(reactor, lambda: not replica.ready, what="vllm-a not ready")
        a.hang = False
        await with_timeout(reactor, Deferred.fromCoroutine(gw.service.batch_runner.settled(created.id)), 10)
        batch = await in_thread(sdk.batches.retrieve, created.id)
        assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("completed", 3, 0)
        assert [(r.body["messages"][0]["content"], r.outcome) for r in a.inference_requests] == [("first", "lost")]
        assert sorted(r.body["messages"][0]["content"] for r in b.inference_requests) == ["first", "second", "third"]
        assert all(r.body["model"] == UPSTREAM_MODEL for r in b.inference_requests)
    finally:
        await stop_all(gw, a, b, clients=(sdk,))


@pytest_twisted.ensureDeferred
async def test_lines_whose_first_target_has_no_ready_replica_go_to_its_failover_candidate(reactor, tmp_path, fake):
    """A line for a model whose provider never came up (nothing listens at its base URL) is answered by the
    model's failover candidate instead of waiting for a ready replica."""
    rules = {f"vllm-dead/{UPSTREAM_MODEL}": [f"vllm-live/{UPSTREAM_MODEL}"]}
    gw = await start_gateway(reactor, {
        "VLLM_DEAD_BASE_URL": await dead_base_url(reactor), "VLLM_DEAD_MODELS": UPSTREAM_MODEL,
        "VLLM_LIVE_BASE_URL": fake.base_url, "FAILOVER_RULES_JSON": json.dumps(rules), "GOMODEL_MASTER_KEY": KEY,
        "GOMODEL_DATA_DIR": str(tmp_path)})
    sdk = openai_client(gw, KEY)
    try:
        lines = [chat_line(c, model=f"vllm-dead/{UPSTREAM_MODEL}") for c in ("a", "b")]
        created = await start_batch(sdk, lines)
        await with_timeout(reactor, Deferred.fromCoroutine(gw.service.batch_runner.settled(created.id)), 10)
        batch = await in_thread(sdk.batches.retrieve, created.id)
        assert (batch.status, batch.request_counts.completed) == ("completed", 2)
        assert sorted(r.body["fake_marker"] for r in fake.requests if r.method == b"POST") == ["a", "b"]
    finally:
        sdk.close()
        await gw.service.stopService()


async def _falling_back(reactor, tmp_path):
    """A gateway (C{BATCH_CONCURRENCY_PER_PROVIDER} 2) whose vllm-a answers 503 and fails over to vllm-b,
    which holds every request (C{hang}); C{peak[0]}: the most requests vllm-b had open at once."""
    from tests.fakes.fleet import FakeReplica

    a, b = FakeReplica(reactor, name="a"), FakeReplica(reactor, name="b")
    await a.start()
    await b.start()
    a.fail_status = 503
    b.hang = True
    peak = [0]

    def arrived(record):  # (fired as the request arrives, before it is served)
        if record.is_inference:
            peak[0] = max(peak[0], sum(1 for r in b.inference_requests if r.outcome is None))
        b.next_request().addCallback(arrived)

    b.next_request().addCallback(arrived)
    rules = {f"vllm-a/{UPSTREAM_MODEL}": [f"vllm-b/{UPSTREAM_MODEL}"]}
    gw = await start_gateway(reactor, {
        "VLLM_A_BASE_URL": a.base_url, "VLLM_B_BASE_URL": b.base_url, "FAILOVER_RULES_JSON": json.dumps(rules),
        "BATCH_CONCURRENCY_PER_PROVIDER": "2", "GOMODEL_MASTER_KEY": KEY, "GOMODEL_DATA_DIR": str(tmp_path)})
    return gw, a, b, peak


def _line_to(provider, custom_id):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": f"{provider}/{UPSTREAM_MODEL}", "messages": [{"role": "user", "content": custom_id}],
                     "max_tokens": 5}}


async def _waiting_at_b(reactor, gw, sdk, peak, count):
    """A batch of two lines for vllm-b and C{count} for vllm-a, started; once b0 and b1 are held at vllm-b and
    each a-line, refused by vllm-a, waits for room at vllm-b: the batch and the two providers' slots."""
    lines = [_line_to("vllm-b", f"b{i}") for i in range(2)] + [_line_to("vllm-a", f"a{i}") for i in range(count)]
    created = await start_batch(sdk, lines)
    slots_a, slots_b = gw.service.batch_runner.semaphore("vllm-a"), gw.service.batch_runner.semaphore("vllm-b")
    await until(reactor, lambda: len(slots_b.waiting) == count or peak[0] > 2, what="the a-lines waiting at vllm-b")
    assert peak[0] == 2
    return created, slots_a, slots_b


@pytest_twisted.ensureDeferred
async def test_lines_falling_back_hold_the_slots_of_the_provider_they_reach(reactor, tmp_path):
    """A line that falls back to another provider holds a slot of that provider there, no longer its first
    target's: vllm-b never has more than BATCH_CONCURRENCY_PER_PROVIDER batch requests in flight, its own
    lines and those falling back to it together, and vllm-a's slots stay free while its lines wait for
    vllm-b's; every line is answered, by vllm-b."""
    gw, a, b, peak = await _falling_back(reactor, tmp_path)
    sdk = openai_client(gw, KEY)
    runner = gw.service.batch_runner
    try:
        created, slots_a, slots_b = await _waiting_at_b(reactor, gw, sdk, peak, 4)
        assert sorted(r.body["messages"][0]["content"] for r in b.inference_requests) == ["b0", "b1"]
        assert sorted(r.body["messages"][0]["content"] for r in a.inference_requests) == ["a0", "a1", "a2", "a3"]
        assert (slots_a.tokens, slots_a.waiting) == (2, [])
        b.hang = False
        await with_timeout(reactor, Deferred.fromCoroutine(runner.settled(created.id)), 10)
        batch = await in_thread(sdk.batches.retrieve, created.id)
        assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("completed", 6, 0)
        output = await file_lines(sdk, batch.output_file_id)
        assert sorted(line["custom_id"] for line in output) == ["a0", "a1", "a2", "a3", "b0", "b1"]
        assert all(line["response"]["status_code"] == 200 for line in output)
        assert sorted(r.body["messages"][0]["content"] for r in b.inference_requests) == [
            "a0", "a1", "a2", "a3", "b0", "b1"]
        assert all(r.body["model"] == UPSTREAM_MODEL for r in b.inference_requests)
        assert peak[0] == 2
        assert (slots_a.tokens, slots_b.tokens, slots_a.waiting, slots_b.waiting) == (2, 2, [], [])
    finally:
        await stop_all(gw, a, b, clients=(sdk,))


@pytest_twisted.ensureDeferred
async def test_a_batch_cancelled_while_lines_wait_for_a_fallbacks_slot_ends_cleanly(reactor, tmp_path):
    """Cancelled while its lines wait for room at the provider they fall back to, a batch ends C{cancelled}:
    the waits are dropped (nothing sent there), the requests in flight aborted, and every slot given back
    once, none taken by a wait that never got it."""
    gw, a, b, peak = await _falling_back(reactor, tmp_path)
    sdk = openai_client(gw, KEY)
    runner = gw.service.batch_runner
    try:
        created, slots_a, slots_b = await _waiting_at_b(reactor, gw, sdk, peak, 3)
        await in_thread(sdk.batches.cancel, created.id)
        await with_timeout(reactor, Deferred.fromCoroutine(runner.settled(created.id)), 10)
        batch = await in_thread(sdk.batches.retrieve, created.id)
        assert batch.status == "cancelled"
        assert batch.request_counts.model_dump() == {"total": 5, "completed": 0, "failed": 0}
        assert (batch.output_file_id, batch.error_file_id) == (None, None)
        assert (slots_a.tokens, slots_b.tokens, slots_a.waiting, slots_b.waiting) == (2, 2, [], [])
        held = b.inference_requests
        assert sorted(r.body["messages"][0]["content"] for r in held) == ["b0", "b1"]
        for record in held:  # aborted
            how, _ = await with_timeout(reactor, record.closed, 2)
            assert how == "lost"
        assert len(a.inference_requests) == 3
    finally:
        b.hang = False
        await stop_all(gw, a, b, clients=(sdk,))


@pytest_twisted.ensureDeferred
async def test_bad_input_file_fails_validation_naming_the_lines(sdk, gw, fake):
    lines = [
        chat_line("ok"),
        b"{not json",
        chat_line("ok"),  # duplicate custom_id
        chat_line("wrong-url", url="/v1/embeddings"),
        chat_line("unknown-model", model="vllm/no-such-model"),
        b"",  # blank lines are skipped (and still counted as lines)
        chat_line("streams", stream=True),
        dict(chat_line("get"), method="GET"),
        {"method": "POST", "url": "/v1/chat/completions", "body": {"model": MODEL}},
        dict(chat_line("no-body"), body=[1]),
        chat_line("nul\u0000"),  # (PostgreSQL cannot keep it: the batch would fail to start, again and again)
    ]
    batch = await finished(gw, sdk, (await start_batch(sdk, lines)).id)
    assert batch.status == "failed"
    assert batch.failed_at is not None and batch.in_progress_at is None
    assert batch.request_counts.model_dump() == {"total": 0, "completed": 0, "failed": 0}
    assert batch.output_file_id is None and batch.error_file_id is None
    errors = [(e.line, e.code, e.param) for e in batch.errors.data]
    assert errors == [
        (2, "invalid_json_line", None),
        (3, "duplicate_custom_id", "custom_id"),
        (4, "mismatched_endpoint", "url"),
        (5, "model_not_found", "body.model"),
        (7, "streaming_unsupported", "body.stream"),
        (8, "invalid_method", "method"),
        (9, "missing_custom_id", "custom_id"),
        (10, "invalid_body", "body"),
        (11, "invalid_custom_id", "custom_id"),
    ]
    assert all(e.message for e in batch.errors.data)
    assert not [r for r in fake.requests if r.method == b"POST"]  # nothing was sent

    # A UTF-8 byte order mark before the first line is no content; before another, it is.
    bom = b"\xef\xbb\xbf"
    marked = await finished(gw, sdk, (await start_batch(sdk, [bom + json.dumps(chat_line("m1")).encode(),
                                                              bom + json.dumps(chat_line("m2")).encode()])).id)
    assert [(e.line, e.code) for e in marked.errors.data] == [(2, "invalid_json_line")]
    blank = await finished(gw, sdk, (await start_batch(sdk, [bom, json.dumps(chat_line("m1")).encode(),
                                                             bom + b"  "])).id)
    assert [(e.line, e.code) for e in blank.errors.data] == [(3, "invalid_json_line")]  # a mark alone: blank

    empty = await finished(gw, sdk, (await start_batch(sdk, [b"", b""])).id)
    assert empty.status == "failed"
    assert [e.code for e in empty.errors.data] == ["empty_file"]


@pytest_twisted.ensureDeferred
async def test_a_bad_lines_error_shows_a_value_it_names_cut_short(sdk, gw, http):
    """A validation error naming what a line holds (its C{url}, a C{custom_id} used before, a model that cannot be
    used) shows at most the start of it: the batch object stays small however long the value; before, each
    message held the value whole (up to the 64 MiB of a line, a thousand times over), in every retrieve and list
    of the batch."""
    huge = "x" * (1024 * 1024)
    lines = [chat_line(huge), chat_line("wrong-url", url="/v1/" + huge), chat_line(huge),
             chat_line("unknown-model", model="vllm/" + huge)]
    batch = await finished(gw, sdk, (await start_batch(sdk, lines)).id)
    assert batch.status == "failed"
    assert [(e.line, e.code) for e in batch.errors.data] == [(2, "mismatched_endpoint"), (3, "duplicate_custom_id"),
                                                             (4, "model_not_found")]
    for error in batch.errors.data:
        assert len(error.message) < 600, error.message[:100]
        assert "xxxx" in error.message  # (the start of what it names)
    response = await http.get(f"{gw.url}/v1/batches/{batch.id}", headers=AUTH)
    assert len(await treq.content(response)) < 4096


@pytest_twisted.ensureDeferred
async def test_a_failed_batch_serves_the_results_it_has(sdk, gw, http):
    """C{GET /v1/batches/{id}/results} of a batch that ended C{failed}: those of the lines answered before it
    was given up (an C{internal_error}, with its output and error files), none for one failed at validation;
    before, a 409 C{batch_not_finished}, as if it were still running, for ever."""
    given_up = await finished(gw, sdk, (await start_batch(sdk, [chat_line("a"), chat_line("b")])).id)
    await gw.service.store.batches.update(given_up.id, {"status": "failed", "completed_at": None,
                                                        "failed_at": given_up.completed_at})  # (as give_up ends it)
    invalid = await finished(gw, sdk, (await start_batch(sdk, [b"{not json"])).id)
    assert invalid.status == "failed"
    for batch, custom_ids in ((given_up, ["a", "b"]), (invalid, [])):
        response = await http.get(f"{gw.url}/v1/batches/{batch.id}/results", headers=AUTH)
        assert response.code == 200
        assert [r["custom_id"] for r in parse_jsonl(await treq.content(response))] == custom_ids


@pytest_twisted.ensureDeferred
async def test_a_batch_reads_its_lines_and_results_a_bounded_number_of_bytes_at_a_time(sdk, gw, http, monkeypatch):
    """Validation, dispatch, the output and error files and C{/results} read input lines, requests and results
    in slices of at most C{PAGE_BYTES} (and one line more, whatever its size): a batch of large lines (long
    documents to embed, their vectors) is never held hundreds of them at once; before, a slice was a thousand
    input lines, 256 requests or 500 results of any size (a 500-line page of 4096-dimension vectors: gigabytes)."""
    from gomodel.api import batches as batches_api
    from gomodel.batches import concluding, runner, validating

    for module in (validating, runner, concluding, batches_api):
        monkeypatch.setattr(module, "PAGE_BYTES", 1500)
    stored = gw.service.store
    seen = []

    def recorded(name, read, size):
        def reading(*args, **kwargs):
            assert kwargs.get("max_bytes") == 1500 or args[2] == 1, (name, args, kwargs)  # (1: one row at most)
            return read(*args, **kwargs).addCallback(lambda got: seen.append((name, [
                size(row) for row in (got[0] if name == "read_lines" else got) if row is not None])) or got)
        return reading

    monkeypatch.setattr(stored.blobs, "read_lines", recorded("read_lines", stored.blobs.read_lines, len))
    monkeypatch.setattr(stored.batches, "pending", recorded("pending", stored.batches.pending, lambda r: len(r[2])))
    monkeypatch.setattr(stored.batches, "read_results",
                        recorded("read_results", stored.batches.read_results, lambda r: len(r[3])))
    lines = [chat_line(f"c{i}", fake_status=400 if i % 3 == 0 else None) for i in range(12)]
    for line in lines:
        if line["body"]["fake_status"] is None:
            del line["body"]["fake_status"]
    batch = await finished(gw, sdk, (await start_batch(sdk, lines)).id)
    assert batch.status == "completed" and batch.request_counts.total == 12
    response = await http.get(f"{gw.url}/v1/batches/{batch.id}/results", headers=AUTH)
    assert [r["custom_id"] for r in parse_jsonl(await treq.content(response))] == [f"c{i}" for i in range(12)]
    assert {name for name, _ in seen} == {"read_lines", "pending", "read_results"}
    for name, sizes in seen:
        assert len(sizes) <= 1 or sum(sizes) <= 1500, (name, sizes)
    assert max(len(sizes) for _, sizes in seen) > 1  # (a slice takes several lines where they fit)


@pytest_twisted.ensureDeferred
async def test_a_responses_line_asking_to_run_in_the_background_fails_validation(sdk, gw, fake):
    """A C{/v1/responses} line with C{"background": true} is a bad line (its answer would be a response still
    queued, never its result, and what it went on to generate never charged); before, the batch completed with
    that stub as the line's output."""
    lines = [{"custom_id": c, "method": "POST", "url": "/v1/responses",
              "body": {"model": MODEL, "input": "Hi", **extra}}
             for c, extra in (("plain", {}), ("off", {"background": False}), ("bg", {"background": True}))]
    batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
    assert batch.status == "failed"
    assert [(e.line, e.code, e.param) for e in batch.errors.data] == [(3, "background_unsupported",
                                                                       "body.background")]
    assert not [r for r in fake.requests if r.method == b"POST"]


@pytest_twisted.ensureDeferred
async def test_a_responses_line_whose_store_is_no_boolean_fails_validation(sdk, gw, fake):
    """A C{/v1/responses} line whose C{store} is no boolean is a bad line, as online (a 400): vLLM reads C{"no"}
    as false and keeps nothing, while the gateway, which takes only false, kept the line's answer."""
    lines = [{"custom_id": c, "method": "POST", "url": "/v1/responses",
              "body": {"model": MODEL, "input": "Hi", **extra}}
             for c, extra in (("plain", {}), ("off", {"store": False}), ("no", {"store": "no"}))]
    batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/responses")).id)
    assert batch.status == "failed"
    assert [(e.line, e.code, e.param) for e in batch.errors.data] == [(3, "invalid_type", "body.store")]
    assert not [r for r in fake.requests if r.method == b"POST"]


@pytest_twisted.ensureDeferred
async def test_an_embeddings_line_asking_for_vllms_binary_bytes_fails_validation(sdk, gw, fake):
    """An C{/v1/embeddings} line with vLLM's C{"encoding_format": "bytes"} or C{"bytes_only"} is a bad line (its
    answer, raw float32 vectors, fits no JSONL line); before, vLLM computed it and it ended in the error file as a
    502, uncharged (C{"bytes_only"} until later)."""
    lines = [{"custom_id": c, "method": "POST", "url": "/v1/embeddings",
              "body": {"model": MODEL, "input": ["a"], "encoding_format": fmt}}
             for c, fmt in (("float", "float"), ("base64", "base64"), ("bytes", "bytes"), ("only", "bytes_only"))]
    batch = await finished(gw, sdk, (await start_batch(sdk, lines, endpoint="/v1/embeddings")).id)
    assert batch.status == "failed"
    assert [(e.line, e.code, e.param) for e in batch.errors.data] == [(3, "invalid_value", "body.encoding_format"),
                                                                      (4, "invalid_value", "body.encoding_format")]
    assert not [r for r in fake.requests if r.method == b"POST"]


@pytest_twisted.ensureDeferred
async def test_batch_requests_that_cannot_be_created(sdk, gw, http):
    uploaded = await in_thread(sdk.files.create, file=("x.jsonl", jsonl([chat_line("a")])), purpose="batch")
    notes = await in_thread(sdk.files.create, file=("notes.txt", b"hello"), purpose="user_data")
    cases = [
        ({"input_file_id": uploaded.id, "endpoint": "/v1/images", "completion_window": "24h"}, 400, "endpoint"),
        ({"endpoint": "/v1/chat/completions"}, 400, "input_file_id"),
        ({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions"}, 404, "input_file_id"),
        ({"input_file_id": notes.id, "endpoint": "/v1/chat/completions"}, 400, "input_file_id"),
        ({"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", "completion_window": "soon"}, 400,
         "completion_window"),
        ({"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", "metadata": {"k": 1}}, 400, "metadata"),
        # Only ASCII digits, with nothing around them (else echoed back as sent).
        ({"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", "completion_window": "\uff12\uff14h"},
         400, "completion_window"),
        ({"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", "completion_window": " 24H "}, 400,
         "completion_window"),
    ] + [({"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", "output_expires_after": policy}, 400,
          "output_expires_after")
         for policy in ({"anchor": "completed_at", "seconds": 3600}, {"anchor": "created_at", "seconds": 3599},
                        {"anchor": "created_at", "seconds": 2592001}, {"anchor": "created_at", "seconds": "3600"},
                        {"anchor": "created_at", "seconds": 3600.5}, {"anchor": "created_at", "seconds": True},
                        {"anchor": "created_at"}, {"seconds": 3600}, 3600, "1h")]
    for body, status, param in cases:
        response = await http.post(gw.url + "/v1/batches", data=json.dumps(body).encode(), headers=AUTH)
        error = json.loads(await treq.content(response))["error"]
        assert (response.code, error["param"]) == (status, param), (body, error)
    for method, path in (("GET", ""), ("POST", "/cancel"), ("GET", "/results")):
        response = await http.request(method, f"{gw.url}/v1/batches/batch_nope{path}", headers=AUTH)
        assert response.code == 404
        assert json.loads(await treq.content(response))["error"]["code"] == "batch_not_found"

    # A gateway extension: windows other than 24h.
    short = await in_thread(sdk.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                            completion_window="1h")
    assert short.expires_at == short.created_at + 3600
    done = await finished(gw, sdk, short.id)
    response = await http.post(f"{gw.url}/v1/batches/{done.id}/cancel", headers=AUTH)
    assert response.code == 409
    assert json.loads(await treq.content(response))["error"]["code"] == "batch_not_cancellable"


@pytest_twisted.ensureDeferred
async def test_cancel_keeps_the_partial_output_and_aborts_requests_in_flight(reactor, sdk, gw, fake, http):
    lines = [chat_line("c0"), chat_line("c1")] + [chat_line(f"h{i}", fake_hold=True) for i in range(2, 6)]
    created = await start_batch(sdk, lines)
    # Concurrency 2: c0 and c1 are answered, then h2 and h3 are held in flight.
    await until(reactor, lambda: fake.marker_counts.get("h3") == 1 and fake.marker_answers.get("c1") == 1)
    pending = await in_thread(sdk.batches.retrieve, created.id)
    assert pending.status == "in_progress"
    response = await http.get(f"{gw.url}/v1/batches/{created.id}/results", headers=AUTH)
    assert response.code == 409
    assert json.loads(await treq.content(response))["error"]["code"] == "batch_not_finished"

    cancelling = await in_thread(sdk.batches.cancel, created.id)
    assert cancelling.status in ("cancelling", "cancelled")
    assert cancelling.cancelling_at is not None
    batch = await finished(gw, sdk, created.id)
    assert batch.status == "cancelled"
    assert batch.cancelled_at >= batch.cancelling_at
    assert batch.request_counts.model_dump() == {"total": 6, "completed": 2, "failed": 0}
    assert (batch.usage.input_tokens, batch.usage.total_tokens) == (36, 42)  # what was answered
    assert [line["custom_id"] for line in await file_lines(sdk, batch.output_file_id)] == ["c0", "c1"]
    assert batch.error_file_id is None
    held = [r for r in fake.requests if (r.body or {}).get("fake_hold")]
    assert [r.body["fake_marker"] for r in held] == ["h2", "h3"]  # h4 and h5 were never sent
    for record in held:  # vLLM saw the requests in flight go away
        how, _ = await with_timeout(reactor, record.closed, 2)
        assert how == "lost"
    assert (await in_thread(sdk.batches.cancel, created.id)).status == "cancelled"  # idempotent


@pytest_twisted.ensureDeferred
async def test_cancelling_an_ended_batch_is_409_and_a_cancelled_one_is_idempotent(reactor, http, fake, tmp_path,
                                                                                 storage):
    """Through the gateway, on each store: a batch C{completed}, C{failed} or C{expired} answers 409
    C{batch_not_cancellable} in OpenAI's envelope (the SDK's C{ConflictError}) and is left as it was;
    one C{cancelled} answers 200 with the batch, as it is, however often it is asked."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": KEY,
                                       "GOMODEL_DATA_DIR": str(tmp_path), **storage})
    sdk = openai_client(gw, KEY)
    try:
        done = await finished(gw, sdk, (await start_batch(sdk, [chat_line("a")])).id)
        assert done.status == "completed"
        batches = gw.service.store.batches

        async def cancel():
            response = await http.post(f"{gw.url}/v1/batches/{done.id}/cancel", headers=AUTH)
            if response.code == 409:  # (the SDKs would send it twice more, to the same answer)
                assert response.headers.getRawHeaders("x-should-retry") == ["false"]
            return response.code, json.loads(await treq.content(response))

        for status in ("completed", "failed", "expired"):
            if status != "completed":  # (an end the runner never takes up again)
                await batches.update(done.id, {"status": status})
            before = await batches.get(done.id)
            code, answer = await cancel()
            assert code == 409, answer
            assert answer == {"error": {
                "message": f"Cannot cancel the batch {done.id}: its status is '{status}', and only a batch "
                           "'validating' or 'in_progress' can be cancelled.",
                "type": "invalid_request_error", "param": None, "code": "batch_not_cancellable"}}
            with pytest.raises(openai.ConflictError) as refused:
                await in_thread(sdk.batches.cancel, done.id)
            assert refused.value.body["code"] == "batch_not_cancellable"
            assert await batches.get(done.id) == before

        await batches.update(done.id, {"status": "cancelled", "cancelling_at": 5, "cancelled_at": 6})
        response = await http.get(f"{gw.url}/v1/batches/{done.id}", headers=AUTH)
        retrieved = json.loads(await treq.content(response))
        for _ in range(2):
            code, answer = await cancel()
            assert code == 200, answer
            assert (answer["status"], answer["cancelling_at"], answer["cancelled_at"]) == ("cancelled", 5, 6)
            assert answer == retrieved
            assert (await in_thread(sdk.batches.cancel, done.id)).status == "cancelled"
    finally:
        sdk.close()
        await gw.service.stopService()


# -- durability -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_restarted_gateway_resumes_the_batch_exactly_once(reactor, fake, tmp_path):
    # (the lines held are cut when the drain runs out of time)
    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_DATA_DIR": str(tmp_path), "BATCH_CONCURRENCY_PER_PROVIDER": "2",
           "SHUTDOWN_TIMEOUT": "0.3s"}
    lines = [chat_line(f"a{i}") for i in range(3)] + [chat_line(f"h{i}", fake_hold=True) for i in range(3, 6)]
    first = await start_gateway(reactor, env)
    client = openai.OpenAI(base_url=first.url + "/v1", api_key="x", max_retries=0, timeout=20)
    try:
        created = await start_batch(client, lines)
        # a0..a2 answered and recorded, h3 and h4 in flight, h5 waiting its turn.
        await until(reactor, lambda: fake.marker_counts.get("h4") == 1)
        batch = await first.service.store.batches.get(created.id)
        assert (batch["status"], batch["completed"]) == ("in_progress", 3)
    finally:
        client.close()
        await first.service.stopService()

    fake.release_holds()  # the next gateway's requests are answered at once
    output = await _completed_on_a_new_gateway(reactor, env, created.id, 6)
    assert sorted(line["custom_id"] for line in output) == [line["custom_id"] for line in lines]
    assert [line["custom_id"] for line in output] == [line["custom_id"] for line in lines]  # input order
    # Each line answered once; answered lines were never sent again; the two
    # cut off by the stop were sent again, once.
    assert fake.marker_answers == {line["custom_id"]: 1 for line in lines}
    assert fake.marker_counts == {"a0": 1, "a1": 1, "a2": 1, "h3": 2, "h4": 2, "h5": 1}


@pytest_twisted.ensureDeferred
async def test_a_drain_sends_no_new_line_and_records_the_lines_in_flight_before_the_batch_resumes(reactor, fake,
                                                                                                  tmp_path):
    """Once the gateway's stop (its drain) begins, no batch line is sent any more; the lines in flight are
    answered and recorded within SHUTDOWN_TIMEOUT, and the batch, still in_progress, resumes at the next start
    without sending them again. Before, the runner kept starting lines during the drain and the stop cut those
    in flight (vLLM's work on them wasted: each was sent again at the next start)."""
    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_DATA_DIR": str(tmp_path), "BATCH_CONCURRENCY_PER_PROVIDER": "2",
           "SHUTDOWN_TIMEOUT": "20s"}
    lines = [chat_line(f"l{i}", fake_hold=True) for i in range(6)]
    first = await start_gateway(reactor, env)
    client = openai.OpenAI(base_url=first.url + "/v1", api_key="x", max_retries=0, timeout=20)
    try:
        created = await start_batch(client, lines)
        runner = first.service.batch_runner
        await fake.when_held(2)
        assert runner.semaphore("vllm").tokens == 0
    finally:
        client.close()
    in_flight = dict(fake.marker_counts)
    assert in_flight == {"l0": 1, "l1": 1}
    stopping = first.service.stopService()
    await deferLater(reactor, 0.3, lambda: None)
    assert not stopping.called  # (the drain waits for the two lines)
    fake.release_holds()  # answered now: any line sent from here on is answered at once
    await with_timeout(reactor, stopping, 10)
    assert fake.marker_counts == in_flight  # no new line reached the upstream
    assert fake.marker_answers == in_flight
    assert _recorded_lines(tmp_path / "gomodel.db", created.id) == set(in_flight)
    with sqlite3.connect(tmp_path / "gomodel.db") as conn:
        assert conn.execute("SELECT status FROM batches WHERE id = ?", (created.id,)).fetchone() == ("in_progress",)

    output = await _completed_on_a_new_gateway(reactor, env, created.id, 6)
    assert [line["custom_id"] for line in output] == [line["custom_id"] for line in lines]
    assert fake.marker_counts == {line["custom_id"]: 1 for line in lines}  # each line sent once


@pytest_twisted.ensureDeferred
async def test_a_batch_whose_last_lines_are_answered_during_the_drain_is_completed_before_the_stop(reactor, fake,
                                                                                                   tmp_path):
    """The last lines of a batch in flight when the drain begins, answered during it (within SHUTDOWN_TIMEOUT):
    the batch is concluded before the services stop, completed with its output file, as it would have been
    without the drain, and the next start sends nothing again. Before, it was released in_progress, every line
    answered, and stayed so until the next start concluded it (a client polling it saw in_progress meanwhile)."""
    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_DATA_DIR": str(tmp_path), "BATCH_CONCURRENCY_PER_PROVIDER": "2",
           "SHUTDOWN_TIMEOUT": "20s"}
    lines = [chat_line("a0"), chat_line("h1", fake_hold=True), chat_line("h2", fake_hold=True)]
    first = await start_gateway(reactor, env)
    client = openai.OpenAI(base_url=first.url + "/v1", api_key="x", max_retries=0, timeout=20)
    try:
        created = await start_batch(client, lines)
        await until(reactor, lambda: fake.marker_counts == {"a0": 1, "h1": 1, "h2": 1}
                    and _recorded_lines(tmp_path / "gomodel.db", created.id) == {"a0"})
    finally:
        client.close()
    stopping = first.service.stopService()
    await until(reactor, lambda: first.service.batch_runner.draining)
    assert not stopping.called  # (the drain waits for the two lines)
    fake.release_holds()  # the last lines are answered after the drain began
    await with_timeout(reactor, stopping, 10)
    with sqlite3.connect(tmp_path / "gomodel.db") as conn:
        row = conn.execute("SELECT status, total, completed, failed, output_file_id IS NOT NULL FROM batches "
                           "WHERE id = ?", (created.id,)).fetchone()
    assert row == ("completed", 3, 3, 0, 1)  # with its output file, before the process would exit

    output = await _completed_on_a_new_gateway(reactor, env, created.id, 3)
    assert [line["custom_id"] for line in output] == ["a0", "h1", "h2"]
    assert fake.marker_counts == {"a0": 1, "h1": 1, "h2": 1}  # each line sent once


@pytest_twisted.ensureDeferred
async def test_a_lines_retry_backoff_the_drain_cuts_sends_nothing_more_and_the_line_is_answered_at_the_next_start(
        reactor, fake, tmp_path):
    """A line backing off before it is sent again (its upstream's 503 asked for 30 s) when the drain begins: the
    drain ends its wait at once (it does not hold the stop for the 30 s, nor until SHUTDOWN_TIMEOUT), the line is
    neither sent again nor recorded as failed (no error line: it stays pending, the batch in_progress), and the
    next start sends it once more, its answer then in the output file as the upstream gave it."""
    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_DATA_DIR": str(tmp_path), "SHUTDOWN_TIMEOUT": "60s"}
    lines = [chat_line("a0"), chat_line("r1", fake_fail_times=1, fake_fail_headers={"Retry-After": "30"})]
    first = await start_gateway(reactor, env)
    client = openai.OpenAI(base_url=first.url + "/v1", api_key="x", max_retries=0, timeout=20)
    runner = first.service.batch_runner
    try:
        created = await start_batch(client, lines)
        await until(reactor, lambda: fake.marker_answers == {"a0": 1, "r1": 1}
                    and any(job.sleeping for job in runner._jobs.values()), what="r1 backing off")
    finally:
        client.close()
    stopping = first.service.stopService()
    assert not any(job.sleeping for job in runner._jobs.values())  # the drain cut the backoff as it began
    await with_timeout(reactor, stopping, 10)
    assert fake.marker_counts == {"a0": 1, "r1": 1}  # r1 was not sent again, during the drain or after it
    assert not runner._jobs  # (nothing is left to send it: no backoff timer either, conftest's no_leftover_calls)
    assert _recorded_lines(tmp_path / "gomodel.db", created.id) == {"a0"}
    with sqlite3.connect(tmp_path / "gomodel.db") as conn:
        assert conn.execute("SELECT status, completed, failed FROM batches WHERE id = ?",
                            (created.id,)).fetchone() == ("in_progress", 1, 0)

    output = await _completed_on_a_new_gateway(reactor, env, created.id, 2)
    assert [(line["custom_id"], line["response"]["status_code"], line["response"]["body"]["object"])
            for line in output] == [("a0", 200, "chat.completion"), ("r1", 200, "chat.completion")]
    assert fake.marker_counts == {"a0": 1, "r1": 2}  # r1 sent once more, by the next start


async def _completed_on_a_new_gateway(reactor, env, batch_id, total):
    """Start a gateway on C{env}, wait for it to complete batch C{batch_id} (resumed there: its C{total} lines all
    completed), stop it: the lines of its output file."""
    gateway = await start_gateway(reactor, env)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=20)
    try:
        batch = await finished(gateway, client, batch_id)
        assert batch.status == "completed"
        assert batch.request_counts.model_dump() == {"total": total, "completed": total, "failed": 0}
        return await file_lines(client, batch.output_file_id)
    finally:
        client.close()
        await gateway.service.stopService()


def _twistd(env):
    run_env = dict(os.environ, **env)
    run_env["PYTHONPATH"] = REPO + os.pathsep + run_env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                             "-n", "--pidfile=", "gomodel", "--listen", "tcp:0:interface=127.0.0.1"],
                            env=run_env, cwd=str(env["GOMODEL_DATA_DIR"]), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


async def _port_of(reactor, process, log):
    """The port twistd listens on, read from its log ("GatewaySite starting on N")."""
    os.set_blocking(process.stdout.fileno(), False)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        chunk = process.stdout.read()
        if chunk:
            log.extend(chunk)
            for line in bytes(log).splitlines():
                if b"GatewaySite starting on " in line:
                    return int(line.rsplit(b" ", 1)[1])
        assert process.poll() is None, bytes(log).decode()
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("twistd never listened:\n" + bytes(log).decode())


def _recorded_lines(db_path, batch_id):
    with sqlite3.connect(db_path) as conn:
        return {row[0] for row in conn.execute("SELECT custom_id FROM batch_results WHERE batch_id = ?",
                                               (batch_id,))}


@pytest_twisted.ensureDeferred
async def test_killed_gateway_resumes_without_losing_or_repeating_lines(reactor, fake, tmp_path):
    """SIGKILL mid-batch (no clean stop at all), then a new process on the same data directory."""
    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_DATA_DIR": str(tmp_path), "BATCH_CONCURRENCY_PER_PROVIDER": "3"}
    lines = [chat_line(f"l{i}", fake_delay=0.01 * (i % 3)) for i in range(12)] + [
        chat_line(f"h{i}", fake_hold=True) for i in range(12, 16)]
    log = bytearray()
    process = _twistd(env)
    try:
        port = await _port_of(reactor, process, log)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=20)
        try:
            created = await start_batch(client, lines)
        finally:
            client.close()
        await fake.when_held(3)  # (three of the held lines sent: 3 at a time)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
    recorded = _recorded_lines(tmp_path / "gomodel.db", created.id)
    assert recorded == {f"l{i}" for i in range(12)}

    fake.release_holds()
    process = _twistd(env)
    log = bytearray()
    try:
        port = await _port_of(reactor, process, log)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=20)
        try:
            async def done():
                return (await in_thread(client.batches.retrieve, created.id)).status == "completed"
            deadline = time.monotonic() + 20
            while not await done():
                assert time.monotonic() < deadline, bytes(log).decode()
                await deferLater(reactor, 0.05, lambda: None)
            batch = await in_thread(client.batches.retrieve, created.id)
            output = await file_lines(client, batch.output_file_id)
        finally:
            client.close()
    finally:
        process.terminate()
        process.wait()
        process.stdout.close()
    assert batch.request_counts.model_dump() == {"total": 16, "completed": 16, "failed": 0}
    assert [line["custom_id"] for line in output] == [line["custom_id"] for line in lines]
    for custom_id in recorded:  # recorded before the kill: never sent again
        assert fake.marker_counts[custom_id] == 1
    assert all(fake.marker_answers[line["custom_id"]] >= 1 for line in lines)


# -- the runner on a clock: retries, expiry, concurrency ------------------------------------------


class StubResponse:
    def __init__(self, code, body=b"{}", headers=None):
        self.code = code
        self.headers = Headers(headers or {})
        self._body = body

    def deliverBody(self, protocol):
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


class Sent:
    def __init__(self, path, body, request_id):
        self.path = path
        self.body = json.loads(body)
        self.request_id = request_id
        self.answer = Deferred()


class StubProvider:
    """A provider whose answers the test gives, one request at a time."""

    name = "stub"
    type = "vllm"
    hidden = ()

    def __init__(self):
        self.sent = []
        self._waiters = []

    def url(self, path, native=False):
        return path

    def send(self, method, url, body, request_id, headers=None, content_type=None):
        sent = Sent(url, body, request_id)
        self.sent.append(sent)
        # Tell the test on the next turn of the reactor: the caller must get
        # (and wait on) the answer Deferred before the test answers it.
        from twisted.internet import reactor

        reactor.callLater(0, self._notify)
        return sent.answer

    def _notify(self):
        for n, d in list(self._waiters):
            if len(self.sent) >= n:
                self._waiters.remove((n, d))
                d.callback(self.sent[n - 1])

    def wait_sent(self, n):
        """Fires with the C{n}-th request once it was sent."""
        if len(self.sent) >= n:
            return succeed(self.sent[n - 1])
        d = Deferred()
        self._waiters.append((n, d))
        return d

    def outstanding(self):
        return [s for s in self.sent if not s.answer.called]


class StubRegistry:
    def __init__(self, provider):
        self.provider = provider

    def resolve(self, model):
        if not model.startswith("stub/"):
            raise ModelNotFound(model)
        return Route(self.provider, model[len("stub/"):])

    def plan(self, model, affinity_of=None):
        return [self.resolve(model)]

    def targets(self, model):
        return [self.resolve(model)]

    def ready(self):
        return succeed(None)


def ok_body(n):
    return json.dumps({"object": "chat.completion", "n": n}).encode()


@pytest_twisted.async_yield_fixture()
async def bench(reactor, tmp_path):
    """A real store on tmp_path; a runner on a task.Clock in front of a StubProvider."""
    clock = Clock()
    store = SQLiteStore(str(tmp_path), reactor, clock=clock)
    store.startService()
    await store.started()
    provider = StubProvider()

    class Bench:
        pass

    bench = Bench()
    bench.clock, bench.store, bench.provider, bench.runners = clock, store, provider, []

    def runner(batches=None, clock=clock, **kwargs):
        r = BatchRunner(batches or store.batches, store.blobs, StubRegistry(ready_pool(provider, clock)), clock,
                        Exchange(clock, Timeouts()), **kwargs)
        r.startService()
        bench.runners.append(r)
        return r

    async def batch(r, count, window=3600.0, messages=(), **kwargs):
        content = jsonl({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "stub/m", "messages": list(messages), "i": i}} for i in range(count))
        file_id = new_file_id()
        size = await put_blob(store.blobs, file_id, content)
        record = await store.files.add(file_id, size, "input.jsonl", "batch")
        return await r.create("/v1/chat/completions", record["id"], "1h", window, None, **kwargs)

    bench.runner, bench.batch = runner, batch
    yield bench
    for r in bench.runners:
        await r.stopService()
    await store.stopService()


@pytest_twisted.ensureDeferred
async def test_cancel_leaves_a_cancelling_or_cancelled_batch_and_refuses_every_other_end(store):
    """L{BatchRunner.cancel} on each store: C{cancelling} and C{cancelled} come back as they are (idempotent);
    C{finalizing}, C{completed}, C{failed} and C{expired} raise L{Conflict} (409, C{batch_not_cancellable})
    and change nothing; an unknown batch is C{batch_not_found}."""
    runner = BatchRunner(store.batches, store.blobs, StubRegistry(ready_pool(StubProvider(), store.clock)),
                         store.clock, Exchange(store.clock, Timeouts()), poll_interval=0)
    for status in ("cancelling", "cancelled"):
        added = await store.batches.add(batch_record(f"batch_{status}", status, cancelling_at=500,
                                                     cancelled_at=600 if status == "cancelled" else None))
        for _ in range(2):
            assert await runner.cancel(added["id"]) == added
        assert await store.batches.get(added["id"]) == added
    for status in ("finalizing", "completed", "failed", "expired"):
        added = await store.batches.add(batch_record(f"batch_{status}", status))
        with pytest.raises(Conflict) as refused:
            await runner.cancel(added["id"])
        error = refused.value
        assert (error.status, error.type, error.code, error.param) == (409, "invalid_request_error",
                                                                       "batch_not_cancellable", None)
        assert f"batch_{status}" in error.message and f"'{status}'" in error.message
        assert await store.batches.get(added["id"]) == added
    with pytest.raises(NotFound) as unknown:
        await runner.cancel("batch_nope")
    assert (unknown.value.status, unknown.value.code) == (404, "batch_not_found")


async def lines_of(store, file_id):
    if file_id is None:
        return []
    size = await store.blobs.size(file_id)
    return parse_jsonl(await store.blobs.read(file_id, 0, size))


@pytest_twisted.ensureDeferred
async def test_a_batch_of_a_key_made_since_the_last_key_refresh_runs_as_that_key(bench, reactor):
    # The key (allowed another model only) was made on another process after this one last read the keys.
    keys = KeyRing(bench.store.keys, bench.clock)
    await bench.store.keys.add({"id": "k_new", "hash": "h-new", "redacted": "sk-...w", "name": "new",
                                "user_path": None, "created_at": 1000, "models": ["stub/other"],
                                "own_cache_salt": False})
    runner = bench.runner(keys=keys)
    created = await bench.batch(runner, 1, tenant="k:k_new", auth_key_id="k_new")
    await with_timeout(reactor, Deferred.fromCoroutine(runner.settled(created["id"])), 5)  # (a line sent: never)
    batch = await bench.store.batches.get(created["id"])
    assert batch["status"] == "failed"  # validated as the key: its model is not allowed
    assert [(e["code"], e["line"]) for e in batch["errors"]] == [("model_access_denied", 1)]
    assert bench.provider.sent == []


@pytest_twisted.ensureDeferred
async def test_a_spent_quota_ends_a_line_without_a_retry(bench):
    """OpenAI's 429 insufficient_quota is no rate limit: the line gets it at once, not after BATCH_MAX_ATTEMPTS
    sends with backoff."""
    runner = bench.runner(max_attempts=4)
    created = await bench.batch(runner, 1)
    first = await bench.provider.wait_sent(1)
    first.answer.callback(StubResponse(429, json.dumps({"error": {
        "message": "You exceeded your current quota.", "type": "insufficient_quota", "param": None,
        "code": "insufficient_quota"}}).encode()))
    await runner.settled(created["id"])
    batch = await bench.store.batches.get(created["id"])
    assert (batch["status"], batch["completed"], batch["failed"]) == ("completed", 0, 1)
    assert len(bench.provider.sent) == 1


@pytest_twisted.ensureDeferred
async def test_a_lines_long_tool_call_ids_are_made_short_for_an_openai_provider(bench):
    """As online (L{gomodel.translate.call_ids}): OpenAI refuses ids past 40 characters, vLLM makes 46."""
    bench.provider.type = "openai"
    long_id = "chatcmpl-tool-" + "0123456789abcdef" * 2
    runner = bench.runner()
    created = await bench.batch(runner, 1, messages=[
        {"role": "assistant", "tool_calls": [{"id": long_id, "type": "function",
                                              "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": long_id, "content": "ok"}])
    first = await bench.provider.wait_sent(1)
    call, result = first.body["messages"]
    assert call["tool_calls"][0]["id"] == result["tool_call_id"] and len(result["tool_call_id"]) <= 40
    first.answer.callback(StubResponse(200, ok_body(1)))
    await runner.settled(created["id"])


@pytest_twisted.ensureDeferred
async def test_transient_failures_are_retried_with_backoff_then_succeed(bench):
    runner = bench.runner(max_attempts=4)
    created = await bench.batch(runner, 1)
    first = await bench.provider.wait_sent(1)
    assert first.path == "/chat/completions"
    assert first.body == {"model": "m", "messages": [], "i": 0}
    assert first.request_id == f"{created['id']}-1".encode()
    first.answer.callback(StubResponse(503, b'{"error":"busy"}'))
    assert len(bench.provider.sent) == 1
    bench.clock.advance(0.99)
    assert len(bench.provider.sent) == 1  # still backing off
    bench.clock.advance(0.01)
    second = await bench.provider.wait_sent(2)
    second.answer.errback(UpstreamUnreachable("connection refused"))
    bench.clock.advance(2)  # the delay doubles
    third = await bench.provider.wait_sent(3)
    third.answer.callback(StubResponse(429, b"{}", {"retry-after": ["7"]}))
    bench.clock.advance(4)
    assert len(bench.provider.sent) == 3  # Retry-After (7 s) beats the 4 s backoff
    bench.clock.advance(3)
    fourth = await bench.provider.wait_sent(4)
    fourth.answer.callback(StubResponse(200, ok_body(4), {"x-request-id": ["upstream-id"]}))
    await runner.settled(created["id"])
    batch = await bench.store.batches.get(created["id"])
    assert (batch["status"], batch["completed"], batch["failed"]) == ("completed", 1, 0)
    [line] = await lines_of(bench.store, batch["output_file_id"])
    assert line["response"] == {"status_code": 200, "request_id": "upstream-id",
                                "body": {"object": "chat.completion", "n": 4}}


class FallbackRegistry(StubRegistry):
    """Every C{stub/} model at the pool C{first}, falling back to the pool C{then}."""

    def __init__(self, first, then):
        super().__init__(first)
        self.then = then

    def plan(self, model, affinity_of=None):
        return [self.resolve(model), Route(self.then, model[len("stub/"):])]


@pytest_twisted.ensureDeferred
async def test_a_retried_line_holds_the_slot_of_each_target_it_is_sent_to(bench):
    """Concurrency 1: a line that falls back to b gives a's slot to the next line; once every target failed
    it backs off holding b's, and its retry (from a) gives b's slot to the line waiting for it."""
    a, b = StubProvider(), StubProvider()
    a.name, b.name = "a", "b"
    registry = FallbackRegistry(ready_pool(a, bench.clock), ready_pool(b, bench.clock))
    runner = BatchRunner(bench.store.batches, bench.store.blobs, registry, bench.clock,
                         Exchange(bench.clock, Timeouts()), concurrency=1)
    runner.startService()
    bench.runners.append(runner)
    slots_a, slots_b = runner.semaphore("a"), runner.semaphore("b")
    created = await bench.batch(runner, 2)
    (await a.wait_sent(1)).answer.callback(StubResponse(429))  # r0: on to b, a's slot to r1
    r0_at_b = await b.wait_sent(1)
    assert len(a.sent) == 2
    r1_at_a = await a.wait_sent(2)
    assert (r0_at_b.body["i"], r1_at_a.body["i"]) == (0, 1)
    r0_at_b.answer.callback(StubResponse(429))  # every target failed: r0 backs off
    r1_at_a.answer.callback(StubResponse(429))  # r1: on to b, where r0 still holds the slot
    assert (len(a.sent), len(b.sent)) == (2, 1)
    assert (slots_a.tokens, slots_b.tokens, len(slots_b.waiting)) == (1, 0, 1)
    bench.clock.advance(1)  # r0 goes back to a: b's slot goes to r1
    assert (len(a.sent), len(b.sent)) == (3, 2)
    r1_at_b, r0_at_a = await b.wait_sent(2), await a.wait_sent(3)
    assert (r1_at_b.body["i"], r0_at_a.body["i"]) == (1, 0)
    assert (a.outstanding(), b.outstanding()) == ([r0_at_a], [r1_at_b])
    r0_at_a.answer.callback(StubResponse(200, ok_body(0)))
    r1_at_b.answer.callback(StubResponse(200, ok_body(1)))
    await runner.settled(created["id"])
    batch = await bench.store.batches.get(created["id"])
    assert (batch["status"], batch["completed"], batch["failed"]) == ("completed", 2, 0)
    assert (slots_a.tokens, slots_b.tokens, slots_a.waiting, slots_b.waiting) == (1, 1, [], [])


@pytest_twisted.ensureDeferred
async def test_exhausted_retries_and_final_errors_go_to_the_error_file(bench):
    runner = bench.runner(max_attempts=2)
    created = await bench.batch(runner, 3)
    await bench.provider.wait_sent(3)
    r0, r1, r2 = bench.provider.sent
    r0.answer.callback(StubResponse(503, b'{"error":"busy"}'))
    r1.answer.callback(StubResponse(400, b'{"detail":"bad field"}'))  # final at once
    r2.answer.errback(UpstreamUnreachable("The upstream provider 'stub' is unreachable."))
    bench.clock.advance(1)
    await bench.provider.wait_sent(5)
    retried = {s.body["i"]: s for s in bench.provider.sent[3:]}
    assert sorted(retried) == [0, 2]
    retried[0].answer.callback(StubResponse(503, b'{"error":"busy"}'))  # the last attempt
    retried[2].answer.errback(UpstreamUnreachable("The upstream provider 'stub' is unreachable."))
    await runner.settled(created["id"])
    batch = await bench.store.batches.get(created["id"])
    assert (batch["status"], batch["completed"], batch["failed"]) == ("completed", 0, 3)
    assert batch["output_file_id"] is None
    errors = {line["custom_id"]: line for line in await lines_of(bench.store, batch["error_file_id"])}
    assert errors["r0"]["response"]["status_code"] == 503
    assert errors["r1"]["response"]["status_code"] == 400
    assert errors["r1"]["response"]["body"]["error"]["message"] == "bad field"  # FastAPI's detail, wrapped
    assert errors["r2"]["response"] is None
    assert errors["r2"]["error"]["code"] == "upstream_unreachable"
    assert [s.body["i"] for s in bench.provider.sent].count(1) == 1  # a 400 is final


@pytest_twisted.ensureDeferred
async def test_expiry_cancels_what_is_in_flight_and_fails_the_rest(bench):
    runner = bench.runner(concurrency=2)
    created = await bench.batch(runner, 5, window=600)
    assert created["expires_at"] == created["created_at"] + 600
    first = await bench.provider.wait_sent(1)
    second = await bench.provider.wait_sent(2)
    assert len(bench.provider.sent) == 2  # two per provider at a time
    first.answer.callback(StubResponse(200, ok_body(0)))
    third = await bench.provider.wait_sent(3)
    assert third.body["i"] == 2
    bench.clock.advance(600)
    assert second.answer.called and third.answer.called  # cancelled: vLLM would abort them
    await runner.settled(created["id"])
    batch = await bench.store.batches.get(created["id"])
    assert batch["status"] == "expired"
    assert batch["expired_at"] == created["created_at"] + 600
    assert (batch["total"], batch["completed"], batch["failed"]) == (5, 1, 4)
    assert [line["custom_id"] for line in await lines_of(bench.store, batch["output_file_id"])] == ["r0"]
    expired = await lines_of(bench.store, batch["error_file_id"])
    assert [line["custom_id"] for line in expired] == ["r1", "r2", "r3", "r4"]
    assert {line["error"]["code"] for line in expired} == {"batch_expired"}
    assert len(bench.provider.sent) == 3


@pytest_twisted.ensureDeferred
async def test_a_batch_past_its_window_at_start_expires_without_sending(bench, reactor):
    runner = bench.runner()
    created = await bench.batch(runner, 2, window=10)
    await bench.provider.wait_sent(2)
    await runner.stopService()  # stopped with both lines in flight
    assert all(s.answer.called for s in bench.provider.sent)
    bench.clock.advance(3600)
    resumed = bench.runner()
    await resumed.settled(created["id"])
    batch = await bench.store.batches.get(created["id"])
    assert (batch["status"], batch["failed"]) == ("expired", 2)
    assert len(bench.provider.sent) == 2


@pytest_twisted.ensureDeferred
async def test_a_message_batch_past_its_window_before_it_started_ends_with_each_request_expired(bench):
    """A message batch (Anthropic's results name every request) that no runner took before its window ended:
    each request is recorded expired, none is sent."""
    content = jsonl({"custom_id": f"r{i}", "method": "POST", "url": "/v1/messages",
                     "body": {"model": "stub/m", "max_tokens": 1, "messages": [], "i": i}} for i in range(3))
    file_id = new_file_id()
    await bench.store.files.add(file_id, await put_blob(bench.store.blobs, file_id, content), "in.jsonl", "batch")
    idle = BatchRunner(bench.store.batches, bench.store.blobs, None, bench.clock, None)  # (not started: it claims none)
    created = await idle.create("/v1/messages", file_id, "24h", 600, None, total=3)
    bench.clock.advance(3600)
    runner = bench.runner()
    await runner.settled(created["id"])
    batch = await bench.store.batches.get(created["id"])
    assert (batch["status"], batch["total"], batch["completed"], batch["failed"]) == ("expired", 3, 0, 3)
    expired = await lines_of(bench.store, batch["error_file_id"])
    assert [line["custom_id"] for line in expired] == ["r0", "r1", "r2"]
    assert {line["error"]["code"] for line in expired} == {"batch_expired"}
    assert bench.provider.sent == []


@pytest_twisted.ensureDeferred
async def test_a_cancellation_stored_by_another_process_reaches_the_one_running_the_batch(bench):
    """--workers: any process may store a cancellation; the claim holder sees it at its next poll."""
    owner = bench.runner()
    other = bench.runner()
    created = await bench.batch(owner, 3)  # created here: claimed here
    assert created["status"] == "validating"
    await bench.provider.wait_sent(3)
    bench.provider.sent[0].answer.callback(StubResponse(200, ok_body(0)))
    cancelling = await other.cancel(created["id"])  # the other process cannot claim it: leased
    assert cancelling["status"] == "cancelling"
    assert not bench.provider.sent[1].answer.called
    bench.clock.advance(1)  # the owner's next look at the store
    await owner.settled(created["id"])
    assert all(s.answer.called for s in bench.provider.sent)
    batch = await bench.store.batches.get(created["id"])
    assert (batch["status"], batch["completed"], batch["failed"]) == ("cancelled", 1, 0)
    assert [line["custom_id"] for line in await lines_of(bench.store, batch["output_file_id"])] == ["r0"]
    assert len(bench.provider.sent) == 3


def test_a_validation_holds_a_digest_of_each_custom_id_not_the_id():
    """A custom_id may be as long as its line (64 MiB): the validation holds a 16-byte digest of each (before,
    each whole: a file's worth at most, for each batch validating), and only the first HELD_IDS of them."""
    tracemalloc.start()
    try:
        ids = CustomIds()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20):
            assert not ids.used("x" * 2**20 + str(i))
        assert ids.used("x" * 2**20 + "7")
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 64 * 1024  # (20 MiB of custom_ids before)
    few = CustomIds(limit=2)
    assert [few.used(cid) for cid in ("a", "b", "a", "c", "d")] == [False, False, True, False, False]
    assert few.overflowed


@pytest_twisted.ensureDeferred
async def test_custom_ids_past_those_held_in_memory_are_checked_in_the_store(bench, monkeypatch):
    """Lines past the first HELD_IDS (2 here): one that repeats a custom_id held is found at once, those
    that repeat one not held are found in the store once every line is stored; either fails the batch, naming
    the line, and nothing is sent."""
    monkeypatch.setattr(validating, "HELD_IDS", 2)
    runner = bench.runner()

    async def validated(custom_ids, unique=False):
        content = jsonl({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "stub/m", "messages": []}} for cid in custom_ids)
        file_id = new_file_id()
        await bench.store.files.add(file_id, await put_blob(bench.store.blobs, file_id, content), "in.jsonl", "batch")
        created = await runner.create("/v1/chat/completions", file_id, "1h", 3600, None)
        for n in range(len(custom_ids) if unique else 0):  # (a valid batch runs: its lines are answered)
            (await bench.provider.wait_sent(n + 1)).answer.callback(StubResponse(200, ok_body(n)))
        await runner.settled(created["id"])
        return await bench.store.batches.get(created["id"])

    for custom_ids, lines in ((["a", "b", "c", "a"], [4]), (["a", "b", "c", "d", "c", "e", "d"], [5, 7])):
        batch = await validated(custom_ids)
        assert batch["status"] == "failed"
        assert [(e["code"], e["line"], e["param"]) for e in batch["errors"]] == [
            ("duplicate_custom_id", line, "custom_id") for line in lines]
        assert "is used by an earlier line" in batch["errors"][0]["message"]
        assert await bench.store.batches.pending(batch["id"], 0, 10) == []  # (its requests dropped)
    assert bench.provider.sent == []
    assert (await validated(["a", "b", "c", "d"], unique=True))["status"] == "completed"


class KeptUsage:
    """A usage ledger keeping what it is given: C{(request id, status, usage, client_gone, estimated)}."""

    def __init__(self):
        self.kept = []

    def keep(self, request_id, timestamp, provider, provider_name, replica, model, endpoint, status_code, stream,
             usage, duration_ms=None, ttft_ms=None, client_gone=False, estimated=False, **kwargs):
        self.kept.append((request_id, status_code, usage, client_gone, estimated))


@pytest_twisted.ensureDeferred
async def test_lines_in_flight_at_cancel_expiry_or_stop_are_usage_estimated_from_their_prompt(bench):
    """vLLM read the prompt of a line cancelled in flight (a batch cancelled, expired, or the gateway
    stopping): its usage is kept, estimated from its prompt, as an online request whose client left is (a
    499, C{client_gone}); a line never sent is not."""
    prompt = [{"role": "user", "content": "x" * 36}]  # 10 tokens, estimated (40 characters)
    for stop in ("cancel", "expire", "shutdown"):
        ledger = KeptUsage()
        runner = bench.runner(concurrency=2, usage=ledger)
        created = await bench.batch(runner, 4, window=600, messages=prompt)
        sent = len(bench.provider.sent)
        (await bench.provider.wait_sent(sent + 1)).answer.callback(StubResponse(200, ok_body(0)))
        await bench.provider.wait_sent(sent + 3)  # r1 and r2 in flight, r3 waits for a slot
        if stop == "cancel":
            await runner.cancel(created["id"])
        elif stop == "expire":
            bench.clock.advance(600)
        else:
            await runner.stopService()
        await runner.settled(created["id"])
        bid = created["id"]
        assert sorted(ledger.kept) == [(f"{bid}-1", 200, None, False, False),
                                       (f"{bid}-2", 499, {"prompt_tokens": 10}, True, True),
                                       (f"{bid}-3", 499, {"prompt_tokens": 10}, True, True)], stop
        if stop != "shutdown":
            await runner.stopService()


class Unfinished(StubResponse):
    """A response whose body starts and never ends."""

    def deliverBody(self, protocol):
        protocol.dataReceived(b'{"object": "chat.')


@pytest_twisted.ensureDeferred
async def test_a_line_cut_while_its_answer_arrives_or_while_it_backs_off_is_usage_estimated_too(bench):
    """A line cancelled while its answer's body was arriving, or while it backed off after a send that reached
    its replica and broke off, is kept as one cancelled in flight: vLLM read its prompt."""
    prompt = [{"role": "user", "content": "x" * 36}]  # 10 tokens, estimated (40 characters)
    ledger = KeptUsage()
    runner = bench.runner(concurrency=2, usage=ledger)
    created = await bench.batch(runner, 2, messages=prompt)
    (await bench.provider.wait_sent(1)).answer.callback(Unfinished(200))
    lost = UpstreamUnreachable("The upstream provider 'stub' lost the connection.")
    lost.sent = True
    (await bench.provider.wait_sent(2)).answer.errback(lost)  # (it backs off a second, then tries again)
    await runner.cancel(created["id"])
    await runner.settled(created["id"])
    bid = created["id"]
    assert sorted(ledger.kept) == [(f"{bid}-1", 499, {"prompt_tokens": 10}, True, True),
                                   (f"{bid}-2", 499, {"prompt_tokens": 10}, True, True)]


class OverlappingWrites:
    """The real batch store, counting the most result writes it had under way at once."""

    def __init__(self, batches):
        self._batches = batches
        self.writing = self.most = 0

    def __getattr__(self, name):
        return getattr(self._batches, name)

    def record_results(self, *args):
        self.writing += 1
        self.most = max(self.most, self.writing)

        def done(result):
            self.writing -= 1
            return result

        return self._batches.record_results(*args).addBoth(done)


@pytest_twisted.ensureDeferred
async def test_lines_failing_before_they_are_sent_are_recorded_one_at_a_time(bench):
    """Lines that fail before they are sent (their model gone, their key deactivated, its budget spent) are
    recorded one after the other: before, a batch of such lines had every one of its writes under way at once
    (a million lines whose model went away: a million results and Deferreds held while the store caught up)."""
    batches = OverlappingWrites(bench.store.batches)
    runner = bench.runner(batches=batches)
    content = jsonl({"custom_id": f"r{i}", "method": "POST", "url": "/v1/messages",
                     "body": {"model": "gone/m", "max_tokens": 1, "messages": []}} for i in range(300))
    file_id = new_file_id()
    await bench.store.files.add(file_id, await put_blob(bench.store.blobs, file_id, content), "in.jsonl", "batch")
    created = await runner.create("/v1/messages", file_id, "24h", 3600, None)  # (its lines' models checked as sent)
    await runner.settled(created["id"])
    batch = await bench.store.batches.get(created["id"])
    assert (batch["status"], batch["completed"], batch["failed"]) == ("completed", 0, 300)
    assert batches.most == 1


class CountedReads:
    """The real batch store, counting the batch records its reads return."""

    def __init__(self, batches):
        self._batches = batches
        self.records = 0

    def __getattr__(self, name):
        return getattr(self._batches, name)

    def _counted(self, got):
        self.records += len(got) if isinstance(got, list) else got is not None
        return got

    def unfinished(self):
        return self._batches.unfinished().addCallback(self._counted)

    def get(self, batch_id):
        return self._batches.get(batch_id).addCallback(self._counted)


@pytest_twisted.ensureDeferred
async def test_a_runners_poll_reads_the_batches_it_holds_not_every_batch_waiting(bench):
    """Each second a runner looks for cancellations of the batches it holds: it reads those, not every
    unfinished batch; before, it read (and decoded) every batch waiting in the store, each second on each
    process (5,000 batches waiting: 0.1 s of the store's thread a second)."""
    batches = CountedReads(bench.store.batches)
    runner = bench.runner(batches=batches, max_claimed=1)
    created = await bench.batch(runner, 1)
    await bench.provider.wait_sent(1)  # held, unanswered: the runner is full
    for i in range(300):  # (held by another process: running there)
        await bench.store.batches.add(batch_record(f"batch_elsewhere_{i:03}", "in_progress"))
        await bench.store.batches.claim(f"batch_elsewhere_{i:03}", "process-2", 3600)
    await bench.store.batches.update(created["id"], {"status": "cancelling"})  # (as another process stores it)
    batches.records = 0
    bench.clock.advance(1)  # the runner's next look at the store
    await runner.settled(created["id"])
    assert (await bench.store.batches.get(created["id"]))["status"] == "cancelled"
    assert batches.records < 20


@pytest_twisted.ensureDeferred
async def test_a_batch_whose_owner_stopped_renewing_is_taken_over_without_repeating_a_line(bench):
    """A process that stalls (its heartbeat never runs) loses its lease; another one resumes the batch.

    The stalled one's late answers are fenced off: no line is recorded twice,
    no recorded line is sent again.
    """
    stalled = bench.runner(clock=Clock(), poll_interval=0)  # its own clock never moves: no heartbeat
    created = await bench.batch(stalled, 3)
    await bench.provider.wait_sent(3)
    bench.provider.sent[0].answer.callback(StubResponse(200, ok_body(0)))  # r0 recorded by the stalled one
    await until_recorded(bench.store, created["id"], 1)
    taker = bench.runner()
    bench.clock.advance(31)  # the lease (30 s) ran out; the taker's poll claims the batch
    sent = await bench.provider.wait_sent(5)
    assert sorted(s.body["i"] for s in bench.provider.sent[3:5]) == [1, 2]  # never r0 again
    bench.provider.sent[1].answer.callback(StubResponse(200, ok_body(1)))  # the stalled one's late answer
    for s in bench.provider.sent[3:5]:
        s.answer.callback(StubResponse(200, ok_body(s.body["i"])))
    await taker.settled(created["id"])
    await stalled.settled(created["id"])
    assert sent.answer.called and bench.provider.sent[2].answer.called  # the stalled one stopped sending
    batch = await bench.store.batches.get(created["id"])
    assert (batch["status"], batch["completed"], batch["failed"]) == ("completed", 3, 0)
    assert [line["custom_id"] for line in await lines_of(bench.store, batch["output_file_id"])] == ["r0", "r1", "r2"]
    assert len(bench.provider.sent) == 5


async def until_recorded(store, batch_id, count):
    from twisted.internet import reactor

    for _ in range(200):
        batch = await store.batches.get(batch_id)
        if batch["completed"] + batch["failed"] >= count:
            return
        await deferLater(reactor, 0.005, lambda: None)
    raise AssertionError("never recorded")


class UnwritableResults:
    """The real batch store, except that results cannot be written (a full disk)."""

    def __init__(self, batches):
        self._batches = batches
        self.writable = False

    def __getattr__(self, name):
        return getattr(self._batches, name)

    def record_results(self, batch_id, results, token):
        if self.writable:
            return self._batches.record_results(batch_id, results, token)
        return fail(StorageUnavailable("The gateway's storage failed (No space left on device)."))


@pytest_twisted.ensureDeferred
async def test_a_batch_whose_results_cannot_be_written_backs_off_instead_of_resending(bench):
    """D11: before, the 1 s poll restarted the batch and sent the unrecorded line again every second."""
    batches = UnwritableResults(bench.store.batches)
    runner = bench.runner(batches=batches, backoff_start=1.0, backoff_max=8.0)
    created = await bench.batch(runner, 1)
    for _ in range(30):  # 30 s of polls, answering whatever is sent
        await deferLater(reactor_(), 0.002, lambda: None)
        for s in bench.provider.outstanding():
            s.answer.callback(StubResponse(200, ok_body(0)))
        await deferLater(reactor_(), 0.002, lambda: None)
        bench.clock.advance(1)
    # Released with backoffs of 1, 2, 4, 8, 8 s (capped): a handful of sends, not 30.
    assert 3 <= len(bench.provider.sent) <= 6, len(bench.provider.sent)
    batches.writable = True
    bench.clock.advance(8)
    await bench.provider.wait_sent(len(bench.provider.sent))
    for _ in range(5):
        await deferLater(reactor_(), 0.002, lambda: None)
        for s in bench.provider.outstanding():
            s.answer.callback(StubResponse(200, ok_body(0)))
    await runner.settled(created["id"])
    await until_status(bench.store, created["id"], "completed")


@pytest_twisted.ensureDeferred
async def test_a_line_recorded_before_a_storage_failure_is_never_sent_again(bench):
    batches = UnwritableResults(bench.store.batches)
    batches.writable = True
    runner = bench.runner(batches=batches, concurrency=1)
    created = await bench.batch(runner, 2)
    first = await bench.provider.wait_sent(1)
    first.answer.callback(StubResponse(200, ok_body(0)))  # r0 recorded
    await until_recorded(bench.store, created["id"], 1)
    batches.writable = False
    second = await bench.provider.wait_sent(2)
    second.answer.callback(StubResponse(200, ok_body(1)))  # r1 cannot be recorded: parked
    await runner.settled(created["id"])
    batches.writable = True
    for _ in range(3):
        bench.clock.advance(1)
        await deferLater(reactor_(), 0.005, lambda: None)
    third = await bench.provider.wait_sent(3)
    assert third.body["i"] == 1
    third.answer.callback(StubResponse(200, ok_body(1)))
    await until_status(bench.store, created["id"], "completed")
    assert [s.body["i"] for s in bench.provider.sent] == [0, 1, 1]


class RejectedResults(UnwritableResults):
    """The real batch store, except that one line's result is a value it cannot hold (no wait mends it)."""

    def __init__(self, batches, custom_id):
        super().__init__(batches)
        self.custom_id = custom_id

    def record_results(self, batch_id, results, token):
        if any(custom_id == self.custom_id for _, custom_id, _, _ in results):
            return fail(ValueError("a value the store cannot hold"))
        return self._batches.record_results(batch_id, results, token)


@pytest_twisted.ensureDeferred
async def test_a_batch_that_keeps_failing_unexpectedly_ends_failed_with_what_was_answered(bench, logged_errors):
    # Before, it was released with a backoff and tried again for as long as the gateway ran.
    runner = bench.runner(batches=RejectedResults(bench.store.batches, "r1"), concurrency=1, max_attempts=2)
    created = await bench.batch(runner, 2)
    first = await bench.provider.wait_sent(1)
    first.answer.callback(StubResponse(200, ok_body(0)))  # r0 recorded
    second = await bench.provider.wait_sent(2)
    second.answer.callback(StubResponse(200, ok_body(1)))  # r1 cannot be: stopped once, released for 1 s
    await runner.settled(created["id"])
    assert (await bench.store.batches.get(created["id"]))["status"] == "in_progress"
    bench.clock.advance(1)
    third = await bench.provider.wait_sent(3)  # tried again: only the line not recorded
    assert third.body["i"] == 1
    third.answer.callback(StubResponse(200, ok_body(1)))  # stopped twice in a row: BATCH_MAX_ATTEMPTS
    await until_status(bench.store, created["id"], "failed")
    batch = await bench.store.batches.get(created["id"])
    [error] = batch["errors"]
    assert error["code"] == "internal_error" and "2 times in a row" in error["message"]
    assert (batch["completed"], batch["failed"], batch["failed_at"]) == (1, 0, int(bench.clock.seconds()))
    [line] = await lines_of(bench.store, batch["output_file_id"])
    assert line["custom_id"] == "r0" and batch["error_file_id"] is None
    for _ in range(5):  # never claimed again
        bench.clock.advance(60)
        await deferLater(reactor_(), 0.002, lambda: None)
    assert len(bench.provider.sent) == 3 and runner.held == frozenset()
    assert logged_errors.flush(ValueError) == 2  # each stop's traceback


class RejectedRequests(UnwritableResults):
    """The real batch store, except that a batch's requests are values it cannot hold."""

    def add_requests(self, batch_id, requests, token):
        return fail(ValueError("a value the store cannot hold"))


@pytest_twisted.ensureDeferred
async def test_a_batch_whose_validation_keeps_failing_unexpectedly_ends_failed(bench, logged_errors):
    runner = bench.runner(batches=RejectedRequests(bench.store.batches), max_attempts=2)
    created = await bench.batch(runner, 2)
    await runner.settled(created["id"])
    assert (await bench.store.batches.get(created["id"]))["status"] == "validating"  # released for 1 s
    bench.clock.advance(1)
    await until_status(bench.store, created["id"], "failed")
    batch = await bench.store.batches.get(created["id"])
    assert [e["code"] for e in batch["errors"]] == ["internal_error"]
    assert (batch["output_file_id"], batch["error_file_id"]) == (None, None) and not bench.provider.sent
    assert await bench.store.batches.pending(created["id"], 0, 10) == []
    assert logged_errors.flush(ValueError) == 2


async def until_status(store, batch_id, status):
    for _ in range(400):
        if (await store.batches.get(batch_id))["status"] == status:
            return
        await deferLater(reactor_(), 0.005, lambda: None)
    raise AssertionError(f"never {status}")


def reactor_():
    from twisted.internet import reactor

    return reactor


@pytest_twisted.ensureDeferred
async def test_a_transient_status_on_the_last_attempt_goes_to_the_error_file(reactor, fake, tmp_path):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_DATA_DIR": str(tmp_path),
                                       "BATCH_MAX_ATTEMPTS": "1"})
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=20)
    try:
        batch = await finished(gw, client, (await start_batch(client, [
            chat_line("busy", fake_fail_times=1, fake_fail_status=503), chat_line("fine")])).id)
        [error] = await file_lines(client, batch.error_file_id)
        [output] = await file_lines(client, batch.output_file_id)
    finally:
        client.close()
        await gw.service.stopService()
    assert batch.request_counts.model_dump() == {"total": 2, "completed": 1, "failed": 1}
    assert (error["custom_id"], error["response"]["status_code"]) == ("busy", 503)
    assert error["response"]["body"]["error"]["message"] == "fake failure 1"
    assert output["custom_id"] == "fine"
    assert fake.marker_counts == {"busy": 1, "fine": 1}  # one attempt allowed: no retry


@pytest_twisted.ensureDeferred
async def test_a_success_status_whose_body_is_no_json_is_an_error_line_of_status_502(sdk, gw, fake):
    # A reader of the error file goes by each line's status_code: a 200 there would send it to a body that is
    # no answer (an HTML page, a text) the gateway could not relay as one.
    embed = {"custom_id": "odd", "method": "POST", "url": "/v1/embeddings",
             "body": {"model": MODEL, "input": "x", "fake_status": 200, "fake_body": "<html>oops</html>"}}
    batch = await finished(gw, sdk, (await start_batch(sdk, [embed], endpoint="/v1/embeddings")).id)
    [error] = await file_lines(sdk, batch.error_file_id)
    assert batch.request_counts.model_dump() == {"total": 1, "completed": 0, "failed": 1}
    assert (error["custom_id"], error["response"]["status_code"]) == ("odd", 502)
    assert error["response"]["body"]["error"]["code"] == "bad_upstream_response"


# -- batches spread over the processes (hosts) sharing a store --------------------------------------


async def looked(runner):
    """Wait until the runner's look for free batches (started by the clock) is over."""
    await runner._claims.quiet()


@pytest_twisted.ensureDeferred
async def test_a_batch_made_on_a_busy_process_is_run_by_an_idle_one(bench):
    """Two processes on one store (two hosts, or --workers): the second batch made on A runs on idle B."""
    a, b = bench.runner(), bench.runner()
    first = await bench.batch(a, 1)  # A holds none: it runs the batch at once
    await bench.provider.wait_sent(1)
    assert a.held == {first["id"]}
    bench.clock.advance(0.5)
    second = await bench.batch(a, 1)  # A is busy: the batch is left free, for whoever holds least
    assert a.held == {first["id"]} and b.held == frozenset()
    bench.clock.advance(0.5)  # both look; A would take it only once it has been free for 1 s
    sent = await bench.provider.wait_sent(2)
    assert sent.request_id == f"{second['id']}-1".encode()
    await looked(a)
    assert (a.held, b.held) == ({first["id"]}, {second["id"]})
    for s in bench.provider.sent:
        s.answer.callback(StubResponse(200, ok_body(0)))
    await a.settled(first["id"])
    await b.settled(second["id"])
    for created in (first, second):
        assert (await bench.store.batches.get(created["id"]))["status"] == "completed"


@pytest_twisted.ensureDeferred
async def test_a_process_alone_runs_a_batch_left_free_once_it_waited_its_turn(bench):
    a = bench.runner()
    first = await bench.batch(a, 1)
    await bench.provider.wait_sent(1)
    bench.clock.advance(0.5)
    second = await bench.batch(a, 1)
    bench.clock.advance(0.5)  # A looks: the batch has been free for 0.5 s, A holds 1 (it waits 1 s)
    await looked(a)
    assert a.held == {first["id"]}
    bench.clock.advance(1)  # free for 1.5 s: nobody idler took it, A does
    sent = await bench.provider.wait_sent(2)
    assert sent.request_id == f"{second['id']}-1".encode()
    assert a.held == {first["id"], second["id"]}
    for s in bench.provider.sent:
        s.answer.callback(StubResponse(200, ok_body(0)))
    await a.settled(first["id"])
    await a.settled(second["id"])
    assert (await bench.store.batches.get(second["id"]))["status"] == "completed"


@pytest_twisted.ensureDeferred
async def test_a_process_holds_at_most_max_claimed_batches_and_takes_the_next_as_one_ends(bench):
    a = bench.runner(max_claimed=1)
    first = await bench.batch(a, 1)
    line = await bench.provider.wait_sent(1)
    second = await bench.batch(a, 1)
    bench.clock.advance(5)  # five looks: the second batch is free long enough, but A has no room
    await looked(a)
    assert a.held == {first["id"]} and len(bench.provider.sent) == 1
    third = await bench.batch(a, 1)
    assert (await a.cancel(third["id"]))["status"] == "cancelling"  # a cancellation is taken whatever A holds
    await a.settled(third["id"])
    assert (await bench.store.batches.get(third["id"]))["status"] == "cancelled"
    line.answer.callback(StubResponse(200, ok_body(0)))
    await a.settled(first["id"])
    sent = await bench.provider.wait_sent(2)  # the first batch ended: A looked at once, no poll needed
    assert sent.request_id == f"{second['id']}-1".encode()
    assert a.held == {second["id"]}
    sent.answer.callback(StubResponse(200, ok_body(1)))
    await a.settled(second["id"])
    for created in (first, second):
        assert (await bench.store.batches.get(created["id"]))["status"] == "completed"
    assert len(bench.provider.sent) == 2


@pytest_twisted.ensureDeferred
async def test_settled_returns_once_the_look_its_batchs_end_started_took_the_batch_left_for_this_process(bench):
    """A batch made while its process was busy is left free; the look the busy one's end starts takes it, and
    L{BatchRunner.settled} of the batch that ended returns only once that look is over: settled() of each batch
    in turn waits for every one. Before, it returned as the batch ended, before the look: settled() of the next
    batch found it not held yet and returned at once, and a test read that batch C{validating}."""
    a = bench.runner()
    first = await bench.batch(a, 1)
    line = await bench.provider.wait_sent(1)
    second = await bench.batch(a, 1)  # A is busy: the batch is left free, for whoever holds least
    assert a.held == {first["id"]}
    line.answer.callback(StubResponse(200, ok_body(0)))
    await a.settled(first["id"])
    assert a.held == {second["id"]}
    (await bench.provider.wait_sent(2)).answer.callback(StubResponse(200, ok_body(1)))
    await a.settled(second["id"])
    assert (await bench.store.batches.get(second["id"]))["status"] == "completed"
