"""Several gateways on one PostgreSQL database (and one Redis): every piece of state is shared.

Gateways run in this process (L{tests.support.start_gateway}) where nothing
is killed, and as real C{twistd} processes where one is killed with
SIGKILL (or paused with SIGSTOP); each test gets its own fresh database
(tests/postgres.py) and the fake vLLM, which counts the requests per
C{fake_marker}.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import openai
import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.server import NOT_DONE_YET

from gomodel.auth.keys import new_secret
from gomodel.errors import StorageUnavailable
from tests import postgres
from tests.integration.support import LISTENING, free_port
from tests.postgres import pg_database  # noqa: F401 (fixture)
from tests.redis_server import RedisServer, fresh_prefix, redis_client
from tests.support import in_thread, openai_client, start_fake, start_gateway, with_timeout

MASTER = "master-scale"
ADMIN = {"authorization": f"Bearer {MASTER}", "content-type": "application/json"}
MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"
KEYS = "/admin/api/v1/auth-keys"
REDIS_URL = os.environ.get("GOMODEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEASE = 3.0  # BATCH_LEASE_TIMEOUT in these tests
HELD = 600.0  # a lease that does not lapse while a test runs: a batch resumed meanwhile was taken from a gone owner


def env_for(database, base_url, tmp_path, **extra):
    return {"VLLM_BASE_URL": base_url, "GOMODEL_MASTER_KEY": MASTER, "STORAGE_TYPE": "postgresql",
            "POSTGRES_URL": postgres.url(database), "POSTGRES_MAX_CONNS": "4",
            "GOMODEL_DATA_DIR": str(tmp_path), "USAGE_FLUSH_INTERVAL": "0.2",
            "BATCH_LEASE_TIMEOUT": str(LEASE), "BATCH_CONCURRENCY_PER_PROVIDER": "2", **extra}


@pytest_twisted.async_yield_fixture()
async def pair(reactor, fake, pg_database, tmp_path):
    """Gateways A and B (in this process) on one fresh database."""
    env = env_for(pg_database, fake.base_url, tmp_path)
    a = await start_gateway(reactor, env)
    b = await start_gateway(reactor, env)
    yield a, b
    await a.service.stopService()
    await b.service.stopService()


@pytest.fixture
def shared_redis():
    """C{REDIS_URL} and a C{REDIS_KEY_PREFIX} of the test's own, whose keys are deleted after (skipped without
    Redis)."""
    client = redis_client()
    try:
        with fresh_prefix(client) as prefix:
            yield {"REDIS_URL": REDIS_URL, "REDIS_KEY_PREFIX": prefix + ":"}
    finally:
        client.close()


async def admin(http, gw_url, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    response = await http.request(method, gw_url + path, data=data, headers=ADMIN)
    return response.code, json.loads(await treq.content(response))


async def until(reactor, predicate, limit=20.0, interval=0.05, what="condition"):
    """A bounded poll, for what only a real socket or another process can tell; returns the seconds it took."""
    start = time.monotonic()
    while not await predicate():
        assert time.monotonic() - start < limit, f"{what} never happened"
        await deferLater(reactor, interval, lambda: None)
    return time.monotonic() - start


async def seen_within(reactor, sees, seconds, what):
    """Ask C{sees()} (a request to another host, a look at the database) until it is true, from now, when the
    change it looks for was made: fails if a probe sent C{seconds} or more after that did not see it. (Timed from
    each probe's sending, not from its answer: on a loaded host a request alone can take a second.)"""
    acknowledged = time.monotonic()
    while True:
        sent = time.monotonic() - acknowledged
        if await sees():
            return
        assert sent < seconds, f"{what}: a probe sent {sent:.2f}s after the change did not see it"
        await deferLater(reactor, 0.05, lambda: None)


def chat_line(custom_id, **body):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                     "fake_marker": custom_id, **body}}


def jsonl(lines) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


async def start_batch(sdk, lines):
    uploaded = await in_thread(sdk.files.create, file=("input.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return await in_thread(sdk.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                           completion_window="24h")


def committed(database, batch_id) -> set:
    """The custom_ids whose result is committed in the database."""
    return {row[0] for row in postgres.query(database, "SELECT custom_id FROM batch_results WHERE batch_id = %s",
                                             (batch_id,))}


# -- gateways in this process -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_file_uploaded_on_a_is_listed_and_read_byte_for_byte_on_b(pair):
    a, b = pair
    content = bytes(range(256)) * 12289 + "é\r\n".encode() * 1000  # ~3 MB, every byte value
    sdk_a, sdk_b = openai_client(a, MASTER), openai_client(b, MASTER)
    try:
        uploaded = await in_thread(sdk_a.files.create, file=("data.bin", io.BytesIO(content)), purpose="user_data")
        listed = await in_thread(sdk_b.files.list)
        assert [f.id for f in listed.data] == [uploaded.id]
        assert (await in_thread(sdk_b.files.retrieve, uploaded.id)).bytes == len(content)
        assert (await in_thread(sdk_b.files.content, uploaded.id)).content == content
        await in_thread(sdk_b.files.delete, uploaded.id)
        assert (await in_thread(sdk_a.files.list)).data == []
    finally:
        sdk_a.close()
        sdk_b.close()


@pytest_twisted.ensureDeferred
async def test_a_background_response_read_on_both_hosts_at_once_is_charged_once(reactor, http, fake, pair):
    """The host that created it charges it; reads never do (before: each host's read that found it finished
    charged it)."""
    a, b = pair
    code, key = await admin(http, a.url, "POST", KEYS, {"name": "team"})
    clients = [openai_client(a, key["value"]), openai_client(b, key["value"])]
    try:
        created = await in_thread(clients[0].responses.create, model=MODEL, input="long job", background=True)
        fake.stored_responses[created.id].update(status="completed", usage={"input_tokens": 19, "output_tokens": 3,
                                                                             "total_tokens": 22})
        async def known_on_b():
            response = await http.get(b.url + "/v1/models", headers={"Authorization": f"Bearer {key['value']}"})
            await treq.content(response)
            return response.code == 200

        await until(reactor, known_on_b, limit=5.0, what="the key known on B")
        read = [in_thread(client.responses.retrieve, created.id) for client in clients]
        assert [(await each).status for each in read] == ["completed", "completed"]

        # A charges it once its watch finds it over (its own ask, or a read here); a read that charged it (a
        # second charge) would have done so before its answer came: both hosts' ledgers written, every charge
        # made is in the log
        await with_timeout(reactor, a.service.background_watch.charged(created.id), 10)
        await a.service.usage.flush()
        await b.service.usage.flush()
        code, log = await admin(http, a.url, "GET", f"/admin/api/v1/usage/log?search={created._request_id}")
        assert sorted(r["total_tokens"] or 0 for r in log["data"]) == [0, 22]
    finally:
        for client in clients:
            client.close()


@pytest_twisted.ensureDeferred
async def test_a_background_stream_its_client_left_is_charged_its_usage_once_not_an_estimate_too(reactor, http,
                                                                                                 fake, pair):
    """Its watch charges what its instance made, once over; the stream's own record charges nothing (before:
    it charged an estimate of its prompt as well: a stream left early, as OpenAI's guide has clients do)."""
    a, _ = pair
    code, key = await admin(http, a.url, "POST", KEYS, {"name": "team"})
    sdk = openai_client(a, key["value"])

    def stream():
        seen = []
        with pytest.raises(openai.APIError):
            with sdk.responses.stream(model=MODEL, input="long job " * 50, background=True,
                                      extra_body={"fake_die_after": 2}) as events:
                seen.extend(events)
        return seen

    def whole():  # (one that ends, read at once: its final event charges it)
        with sdk.responses.stream(model=MODEL, input="short job", background=True) as events:
            return [event.type for event in events]

    try:
        response_id = (await in_thread(stream))[0].response.id
        assert (await in_thread(whole))[-1] == "response.completed"
    finally:
        sdk.close()
    fake.stored_responses[response_id].update(status="completed", usage={"input_tokens": 19, "output_tokens": 3,
                                                                          "total_tokens": 22})

    async def records():
        code, log = await admin(http, a.url, "GET", "/admin/api/v1/usage/log")
        return sorted((r["total_tokens"] or 0, bool(r["estimated"])) for r in log["data"]
                      if r["endpoint"] == "/v1/responses")

    async def charged():
        return len(await records()) == 3

    await until(reactor, charged, limit=10.0, what="the responses' usage recorded")
    assert await records() == [(0, False), (22, False), (22, False)]


@pytest_twisted.ensureDeferred
async def test_a_background_response_deleted_on_b_while_a_asks_its_instance_stays_deleted(reactor, pair, fake):
    """A asks the instance after a background response (a read); B deletes it meanwhile: A's answer is not
    stored back (before: A stored it again, and the deleted response was back on every host).

    A's read waits for the test's steps (B's delete), so it has no client timeout: the test's release of the
    instance's answer ends it (before, its SDK timeout of 10 s ran through B's delete too)."""
    a, b = pair
    sdk_a, sdk_b = openai_client(a, MASTER), openai_client(b, MASTER)
    held, arrived = [], Deferred()
    lifecycle = fake._response_lifecycle

    def hold(request, rest):  # the instance answers A's ask only once the test lets it
        held.append((request, rest))
        if not arrived.called:
            arrived.callback(None)
        return NOT_DONE_YET

    def answer_held():
        while held:
            request, rest = held.pop(0)
            if not request.finished and not request._disconnected:
                request.write(lifecycle(request, rest))
                request.finish()

    try:
        created = await in_thread(sdk_a.responses.create, model=MODEL, input="long job", background=True)
        fake.stored_responses[created.id].update(status="completed", usage={
            "input_tokens": 19, "output_tokens": 3, "total_tokens": 22})
        fake._response_lifecycle = hold
        read = in_thread(sdk_a.with_options(timeout=None).responses.retrieve, created.id)
        await arrived
        await in_thread(sdk_b.responses.delete, created.id)
        fake._response_lifecycle = lifecycle
        answer_held()
        assert (await read).status == "completed"  # (the reader has its answer)
        for sdk in (sdk_a, sdk_b):
            with pytest.raises(openai.NotFoundError):
                await in_thread(sdk.responses.retrieve, created.id)
    finally:
        fake._response_lifecycle = lifecycle
        answer_held()  # (after a failure: the read still waiting ends)
        sdk_a.close()
        sdk_b.close()


@pytest_twisted.ensureDeferred
async def test_a_read_after_a_cancel_is_cancelled_while_an_earlier_reads_answer_is_still_being_stored(
        pair, fake, monkeypatch):
    """The read that asked the instance before the cancel, and the cancel, have their answers stored late (a busy
    database): a read after the cancel's answer says cancelled (before: it was given the earlier read's answer,
    shared until stored)."""
    a, _ = pair
    sdk = openai_client(a, MASTER)
    store = a.service.store.responses
    update, held = store.update, []

    def slow(response_id, status, response, tenant=None):
        gate = Deferred()
        held.append(gate)
        gate.addCallback(lambda _: update(response_id, status, response, tenant))
        return gate

    try:
        created = await in_thread(sdk.responses.create, model=MODEL, input="long job", background=True)
        monkeypatch.setattr(store, "update", slow)
        assert (await in_thread(sdk.responses.retrieve, created.id)).status == "queued"
        assert (await in_thread(sdk.responses.cancel, created.id)).status == "cancelled"
        assert (await in_thread(sdk.responses.retrieve, created.id)).status == "cancelled"
        monkeypatch.setattr(store, "update", update)
        for gate in held:
            gate.callback(None)
            await gate
        assert (await in_thread(sdk.responses.retrieve, created.id)).status == "cancelled"
    finally:
        sdk.close()


@pytest_twisted.ensureDeferred
async def test_a_reads_store_write_cut_by_the_gateways_stop_is_a_warning_not_an_error(reactor, fake, pg_database,
                                                                                       tmp_path, monkeypatch):
    """A deploy stops a gateway while a read's answer is being stored: the database is closed to it, a
    warning without a traceback (before: 'updating response ... failed' logged as an error, with one)."""
    from twisted.logger import globalLogPublisher

    gw = await start_gateway(reactor, env_for(pg_database, fake.base_url, tmp_path))
    sdk = openai_client(gw, MASTER)
    store = gw.service.store.responses
    update, held, events = store.update, [], []

    def late(response_id, status, response, tenant=None):
        gate = Deferred()
        held.append(gate)
        return gate.addCallback(lambda _: update(response_id, status, response, tenant))

    globalLogPublisher.addObserver(events.append)
    try:
        created = await in_thread(sdk.responses.create, model=MODEL, input="long job", background=True)
        monkeypatch.setattr(store, "update", late)
        assert (await in_thread(sdk.responses.retrieve, created.id)).status == "queued"
    finally:
        sdk.close()
        await gw.service.stopService()
        for gate in held:
            gate.callback(None)
        globalLogPublisher.removeObserver(events.append)
    warned = [e for e in events if e.get("id") == created.id and e.get("log_level").name == "warn"]
    assert [e["log_format"] for e in warned] == ["response {id} not updated: {error}"]


@pytest_twisted.ensureDeferred
async def test_a_key_made_on_a_works_on_b_and_its_deactivation_stops_it_there_within_2s(reactor, http, pair):
    a, b = pair
    code, key = await admin(http, a.url, "POST", KEYS, {"name": "team", "user_path": "/team/x"})
    assert code == 201
    client = openai_client(b, key["value"])

    async def works():
        try:
            await in_thread(client.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "hi"}],
                            max_tokens=5)
            return True
        except openai.AuthenticationError:
            return False

    async def refused():
        return not await works()

    try:
        await seen_within(reactor, works, 2.0, "the new key working on B")
        code, _ = await admin(http, a.url, "POST", f"{KEYS}/{key['id']}/deactivate")
        assert code == 200
        await seen_within(reactor, refused, 2.0, "the deactivation reaching B")
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_key_made_on_a_works_on_b_at_its_first_request(reactor, http, pair):
    """B looks a secret its key ring lacks up in the store (before: a 401 until B's next refresh, up to a
    second after the key was made); a made-up secret is a 401."""
    a, b = pair
    b.service.keys.stopService()  # B's key ring is refreshed no more: only the look-up can find the keys
    code, key = await admin(http, a.url, "POST", KEYS, {"name": "team", "user_path": "/team/x"})
    assert code == 201
    code, uploader = await admin(http, a.url, "POST", KEYS, {"name": "uploader"})
    assert code == 201
    clients = [openai_client(b, key["value"]), openai_client(b, uploader["value"]), openai_client(b, new_secret()),
               openai_client(a, MASTER)]
    try:
        answer = await in_thread(clients[0].chat.completions.create, model=MODEL,
                                 messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert answer.choices[0].message.content
        uploaded = await in_thread(clients[1].files.create, file=("a.jsonl", io.BytesIO(b"{}\n" * 50000)),
                                   purpose="user_data")  # its first request an upload, streamed as it comes
        assert (await in_thread(clients[1].files.content, uploaded.id)).content == b"{}\n" * 50000
        with pytest.raises(openai.AuthenticationError) as refused:  # an upload refused while it comes
            await in_thread(clients[2].files.create, file=("a.jsonl", io.BytesIO(b"{}\n" * 50000)),
                            purpose="user_data")
        assert refused.value.body["code"] == "invalid_api_key", refused.value.body
        with pytest.raises(openai.AuthenticationError):  # known not to exist now: refused at once
            await in_thread(clients[2].models.list)
        assert [f.id for f in (await in_thread(clients[3].files.list)).data] == [uploaded.id]
    finally:
        for client in clients:
            client.close()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_running_batch_follows_its_key_as_edited_and_deactivated_on_the_other_host(
        reactor, http, pair, fake, pg_database):
    """A budget given to a key on B while its batch runs on A refuses A's next lines (budget_exceeded), and a
    deactivation on B stops them (invalid_api_key); before, the batch ran to its end as the key was when it
    started."""
    a, b = pair
    code, key = await admin(http, a.url, "POST", KEYS, {"name": "team"})
    assert code == 201
    sdk, master = openai_client(a, key["value"]), openai_client(a, MASTER)

    async def batch_stopped_by(change, code_wanted):
        lines = [chat_line(f"{code_wanted}-{i}", fake_delay=0.2) for i in range(12)]
        created = await start_batch(sdk, lines)

        async def started():
            return len(committed(pg_database, created.id)) >= 2

        await until(reactor, started, what="A recording lines")
        code, _ = await admin(http, b.url, *change)
        assert code == 200
        await a.service.keys.refresh()  # what A's loop does every second
        sent = sum(1 for line in lines if line["custom_id"] in fake.marker_counts)
        _, batch = await batch_done(reactor, master, created.id, limit=20)
        assert batch.status == "completed"
        counts = batch.request_counts
        assert counts.completed <= sent + 2 and counts.failed == 12 - counts.completed, counts  # (2 in flight)
        errors = (await in_thread(master.files.content, batch.error_file_id)).content
        assert {json.loads(row)["error"]["code"] for row in errors.splitlines()} == {code_wanted}

    try:
        await batch_stopped_by(("PATCH", f"{KEYS}/{key['id']}", {"budgets": [{"period": "daily", "max_tokens": 1}]}),
                               "budget_exceeded")
        code, _ = await admin(http, a.url, "PATCH", f"{KEYS}/{key['id']}", {"budgets": []})
        assert code == 200
        await batch_stopped_by(("POST", f"{KEYS}/{key['id']}/deactivate"), "invalid_api_key")
    finally:
        sdk.close()
        master.close()


@pytest_twisted.ensureDeferred
async def test_usage_from_both_gateways_is_in_one_summary(reactor, http, pair, fake):
    a, b = pair
    for gw, count in ((a, 2), (b, 3)):
        client = openai_client(gw, MASTER)
        try:
            for _ in range(count):
                await in_thread(client.chat.completions.create, model=MODEL,
                                messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        finally:
            client.close()

    async def summed():
        _, summary = await admin(http, b.url, "GET", "/admin/api/v1/usage/summary")
        return summary["requests"] == 5

    await until(reactor, summed, what="5 requests in B's summary")
    _, summary = await admin(http, a.url, "GET", "/admin/api/v1/usage/summary")
    assert summary["requests"] == 5 and summary["total_tokens"] > 0


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_without_redis_a_budget_spent_on_a_is_spent_on_b_once_the_ledger_has_it(reactor, http, pair):
    """Two hosts on PostgreSQL without Redis: each counts a budget in its own sum, raised every second to what
    the usage ledger says both spent, once it charged that sum (before: B, whose sum was seeded before A
    spent, counted only its own requests, and let the key spend the budget once more)."""
    a, b = pair
    code, key = await admin(http, a.url, "POST", KEYS, {"name": "team",
                                                         "budgets": [{"period": "daily", "max_tokens": 50}]})
    assert code == 201
    await b.service.keys.refresh()  # what its loop does every second
    sdks = [openai_client(a, key["value"]), openai_client(b, key["value"])]

    async def chat(sdk):
        await in_thread(sdk.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "hi"}],
                        max_tokens=5)

    async def written(count):
        _, summary = await admin(http, a.url, "GET", "/admin/api/v1/usage/summary")
        return summary["requests"] == count

    try:
        await chat(sdks[1])  # 21 tokens a request: B's sum holds 21
        await until(reactor, lambda: written(1), what="the usage written")
        for _ in range(2):
            await chat(sdks[0])  # A's sum, seeded from the ledger: 63
        await until(reactor, lambda: written(3), what="the usage written")
        try:  # B's sum holds 21, unless its loop read the ledger since A spent (B charged it since it did)
            await chat(sdks[1])
        except openai.RateLimitError:
            pass
        for gateway in (a, b):
            await gateway.service.gate.follow_ledger()  # what its loop does every second  # what its loop does every second
        for sdk in sdks:
            with pytest.raises(openai.RateLimitError) as refused:
                await chat(sdk)
            assert refused.value.body["code"] == "budget_exceeded"
        code, shown = await admin(http, b.url, "GET", f"{KEYS}/{key['id']}")
        assert shown["budgets"][0]["spent_tokens"] >= 63
    finally:
        for sdk in sdks:
            sdk.close()


@pytest_twisted.ensureDeferred
async def test_a_follow_up_on_b_reaches_the_replica_that_made_the_response_on_a(reactor, http, pg_database,
                                                                                tmp_path):
    replicas = [await start_fake(reactor), await start_fake(reactor)]
    env = env_for(pg_database, ",".join(r.base_url for r in replicas), tmp_path)
    a = await start_gateway(reactor, env)
    b = await start_gateway(reactor, env)
    try:
        for turn in range(6):
            body = {"model": MODEL, "input": f"turn {turn}"}
            response = await http.post(a.url + "/v1/responses", json.dumps(body).encode(), headers=ADMIN)
            assert response.code == 200
            first = json.loads(await treq.content(response))
            [holder] = [n for n, r in enumerate(replicas) if first["id"] in r.stored_responses]
            follow = await http.post(b.url + "/v1/responses", json.dumps(dict(
                body, input="and then?", previous_response_id=first["id"])).encode(), headers=ADMIN)
            answer = json.loads(await treq.content(follow))
            assert follow.code == 200, answer
            assert answer["id"] in replicas[holder].stored_responses  # the replica A used, reached from B
            assert answer["previous_response_id"] == first["id"]
    finally:
        await a.service.stopService()
        await b.service.stopService()
        for replica in replicas:
            await replica.stop()


@pytest_twisted.ensureDeferred
async def test_rpm_limits_with_redis_hold_across_both_gateways(reactor, http, fake, pg_database, tmp_path,
                                                                shared_redis):
    env = env_for(pg_database, fake.base_url, tmp_path, **shared_redis)
    a = await start_gateway(reactor, env)
    b = await start_gateway(reactor, env)
    try:
        code, key = await admin(http, a.url, "POST", KEYS, {"name": "team", "rpm": 4})
        assert code == 201
        await b.service.keys.refresh()  # what its loop does every second
        clients = [openai_client(a, key["value"]), openai_client(b, key["value"])]
        try:
            answers = limited = 0
            for i in range(8):
                try:
                    await in_thread(clients[i % 2].chat.completions.create, model=MODEL,
                                    messages=[{"role": "user", "content": "hi"}], max_tokens=5)
                    answers += 1
                except openai.RateLimitError:
                    limited += 1
            assert (answers, limited) == (4, 4)  # 4 a minute for the key, not 4 per gateway
        finally:
            for c in clients:
                c.close()
    finally:
        await a.service.stopService()
        await b.service.stopService()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_budget_with_redis_counts_what_the_ledger_holds_and_survives_redis_losing_it(
        reactor, http, fake, pg_database, tmp_path, shared_redis):
    """A budget given to a key mid-period counts the tokens its key spent already (read from the usage
    ledger, once, by whichever gateway checks first); Redis losing the sum (a restart without persistence)
    does not reset it."""
    client = redis_client()
    env = env_for(pg_database, fake.base_url, tmp_path, **shared_redis)
    a = await start_gateway(reactor, env)
    b = await start_gateway(reactor, env)
    sdks, key = [], {"id": "none"}
    try:
        code, key = await admin(http, a.url, "POST", KEYS, {"name": "team"})
        assert code == 201
        await b.service.keys.refresh()  # what its loop does every second
        sdks = [openai_client(a, key["value"]), openai_client(b, key["value"])]
        for i in range(3):
            await in_thread(sdks[i % 2].chat.completions.create, model=MODEL,
                            messages=[{"role": "user", "content": "hi"}], max_tokens=5)

        async def written():
            code, page = await admin(http, a.url, "GET", "/admin/api/v1/usage/keys?days=1")
            rows = [row for row in page["data"] if row["auth_key_id"] == key["id"]]
            return rows and rows[0]["requests"] == 3 and rows[0]

        await until(reactor, written, what="the usage written")
        spent = (await written())["total_tokens"]
        code, _ = await admin(http, a.url, "PATCH", f"{KEYS}/{key['id']}",
                              {"budgets": [{"period": "daily", "max_tokens": spent}]})
        assert code == 200
        for gateway in (a, b):
            await gateway.service.keys.refresh()
        code, shown = await admin(http, b.url, "GET", f"{KEYS}/{key['id']}")
        assert shown["budgets"][0]["spent_tokens"] == spent
        for sdk in sdks:
            with pytest.raises(openai.RateLimitError) as refused:
                await in_thread(sdk.chat.completions.create, model=MODEL,
                                messages=[{"role": "user", "content": "hi"}], max_tokens=5)
            assert refused.value.body["code"] == "budget_exceeded"
        sums = client.keys(f"{shared_redis['REDIS_KEY_PREFIX']}limits:budget|key:{key['id']}|*")
        assert len(sums) == 1
        client.delete(*sums)  # Redis restarted empty
        with pytest.raises(openai.RateLimitError):
            await in_thread(sdks[1].chat.completions.create, model=MODEL,
                            messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    finally:
        for sdk in sdks:
            sdk.close()
        client.close()
        await a.service.stopService()
        await b.service.stopService()


async def _chat(sdk):
    return await in_thread(sdk.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "hi"}],
                           max_tokens=5)  # 21 tokens


async def _refused_for_its_budget(sdk):
    with pytest.raises(openai.RateLimitError) as refused:
        await _chat(sdk)
    assert refused.value.body["code"] == "budget_exceeded"


async def _usage_written(reactor, http, gateway, requests):
    async def written():
        _, summary = await admin(http, gateway.url, "GET", "/admin/api/v1/usage/summary")
        return summary["requests"] == requests

    await until(reactor, written, what="the usage written")


async def _answering(http, gateway, key):
    """Whether C{gateway} counts C{key}'s rate window on Redis (it answers: not failing open)."""
    response = await http.get(gateway.url + "/v1/usage", headers={"Authorization": f"Bearer {key['value']}"})
    [window] = json.loads(await treq.content(response))["rate_limits"]
    return window["requests_used"] is not None  # (null while Redis counts as unreachable)


async def _two_hosts_on_a_redis(reactor, http, fake, pg_database, tmp_path, max_tokens, spent):
    """Two gateways on one database and a Redis of their own that a test may pause: C{(server, a, b, key, sdks)},
    C{key} a managed key with a daily budget of C{max_tokens} that made C{spent} requests, on A and B in turn
    (C{sdks}: an SDK for it on each). The caller stops them (L{_stop_hosts})."""
    server = RedisServer(tmp_path)
    env = env_for(pg_database, fake.base_url, tmp_path, REDIS_URL=server.url)
    a = await start_gateway(reactor, env)
    b = await start_gateway(reactor, env)
    code, key = await admin(http, a.url, "POST", KEYS, {
        "name": "team", "rpm": 1000, "budgets": [{"period": "daily", "max_tokens": max_tokens}]})
    assert code == 201
    sdks = [openai_client(a, key["value"]), openai_client(b, key["value"])]
    for i in range(spent):
        await _chat(sdks[i % 2])
    return server, a, b, key, sdks


async def _stop_hosts(server, a, b, sdks):
    for sdk in sdks:
        sdk.close()
    await a.service.stopService()
    await b.service.stopService()
    server.stop()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_budget_counts_what_was_spent_while_redis_could_not_be_reached(reactor, http, fake, pg_database,
                                                                               tmp_path):
    """Redis stops answering but keeps its data (a pause, a network cut): the limits fail open, and once it
    answers again the budget sums count what the keys spent meanwhile, from the usage ledger (before: the
    sums missed those charges for the rest of the period, and the key spent its budget again)."""
    server, a, b, key, sdks = await _two_hosts_on_a_redis(reactor, http, fake, pg_database, tmp_path, 100, 2)
    try:
        server.pause()
        for i in range(3):  # 105 tokens in all, counted by the ledger alone
            await _chat(sdks[i % 2])
        await _usage_written(reactor, http, a, 5)
        server.resume()
        for gateway, sdk in zip((a, b), sdks):
            await until(reactor, lambda: _answering(http, gateway, key), limit=15.0, what="Redis answering again")
            await _refused_for_its_budget(sdk)
    finally:
        await _stop_hosts(server, a, b, sdks)


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_budget_spent_on_a_stopped_host_after_redis_s_last_snapshot_counts_once_redis_restarts_from_it(
        reactor, http, fake, pg_database, tmp_path):
    """Redis restarts from a snapshot taken before host A spent part of a key's budget, and A is gone by then (its
    spend is in the usage ledger alone): the sum came back marked seeded and short by what A charged, and only A's
    own next settlement would have noticed (its count gone back), so B let the key spend it again until the period's
    end. A new Redis server (restarted, failed over) is noticed as each connection to it opens, before anything is
    read there: every sum, whichever host seeded it, is seeded again from the ledger at its next use."""
    server, a, b, key, sdks = await _two_hosts_on_a_redis(reactor, http, fake, pg_database, tmp_path, 80, 2)
    try:
        server.save()  # 42 tokens spent (21 on each host)
        await _chat(sdks[0])
        await _chat(sdks[0])  # 84: spent, all on A since the snapshot
        await _usage_written(reactor, http, a, 4)
        for sdk in sdks:
            await _refused_for_its_budget(sdk)
        await a.service.stopService()
        server.restart()
        await until(reactor, lambda: _answering(http, b, key), limit=15.0, what="Redis answering again")
        await _refused_for_its_budget(sdks[1])
        code, shown = await admin(http, b.url, "GET", f"{KEYS}/{key['id']}")
        assert shown["budgets"][0]["spent_tokens"] == 84
    finally:
        sdks[0].close()
        await b.service.stopService()
        sdks[1].close()
        server.stop()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_spent_budget_holds_on_every_host_while_redis_cannot_be_reached(reactor, http, fake, pg_database,
                                                                                tmp_path):
    """Redis stops answering once a key has spent its budget: the rate limits fail open, the budget does not:
    each host judges it by the usage ledger meanwhile (before: the key spent without a bound until Redis was
    back)."""
    server, a, b, key, sdks = await _two_hosts_on_a_redis(reactor, http, fake, pg_database, tmp_path, 50, 3)
    try:
        await _usage_written(reactor, http, a, 3)
        server.pause()
        for sdk in sdks + sdks:
            await _refused_for_its_budget(sdk)
        sdks.append(openai_client(a, MASTER))
        assert (await _chat(sdks[-1])).choices  # (the rest flows)
        response = await http.get(b.url + "/health/ready")
        [reason] = json.loads(await treq.content(response))["down"].values()
        assert "budgets are judged by the usage ledger" in reason and "not enforced" in reason
    finally:
        await _stop_hosts(server, a, b, sdks)


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_budget_removed_and_given_again_counts_what_was_spent_meanwhile(reactor, http, fake, pg_database,
                                                                                tmp_path, shared_redis):
    """A key's budget removed on A, the key busy on A alone meanwhile, and given again on A: both hosts count
    what the key spent while it had none, from the usage ledger (before: the sum kept in Redis, marked seeded,
    lacked it for the rest of the period)."""
    env = env_for(pg_database, fake.base_url, tmp_path, **shared_redis)
    a = await start_gateway(reactor, env)
    b = await start_gateway(reactor, env)
    sdks = []
    budget = {"budgets": [{"period": "daily", "max_tokens": 100}]}  # 21 tokens a request
    try:
        code, key = await admin(http, a.url, "POST", KEYS, {"name": "team", **budget})
        assert code == 201
        sdks = [openai_client(a, key["value"]), openai_client(b, key["value"])]

        async def chat(sdk):
            await in_thread(sdk.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "hi"}],
                            max_tokens=5)

        for sdk in sdks:
            await chat(sdk)
        for change, requests in (({"budgets": []}, 4), (budget, 0)):
            code, _ = await admin(http, a.url, "PATCH", f"{KEYS}/{key['id']}", change)
            assert code == 200
            await b.service.keys.refresh()  # what its loop does every second
            for _ in range(requests):
                await chat(sdks[0])

        async def written():
            _, summary = await admin(http, a.url, "GET", "/admin/api/v1/usage/summary")
            return summary["requests"] == 6

        await until(reactor, written, what="the usage written")
        for sdk in sdks:
            with pytest.raises(openai.RateLimitError) as refused:
                await chat(sdk)
            assert refused.value.body["code"] == "budget_exceeded"
        code, shown = await admin(http, b.url, "GET", f"{KEYS}/{key['id']}")
        assert shown["budgets"][0]["spent_tokens"] == 6 * 21
    finally:
        for sdk in sdks:
            sdk.close()
        await a.service.stopService()
        await b.service.stopService()


@pytest_twisted.ensureDeferred
async def test_without_the_database_chat_flows_and_the_rest_is_a_503_until_it_is_back(
        reactor, http, pair, pg_database, logged_errors):
    a, _ = pair
    database = pg_database
    client = openai_client(a, MASTER)
    try:
        postgres.admin(f"ALTER DATABASE {database} ALLOW_CONNECTIONS false")
        postgres.kill_connections(database)
        # Chat with the master key needs neither the database nor Redis.
        for _ in range(3):
            answer = await in_thread(client.chat.completions.create, model=MODEL,
                                     messages=[{"role": "user", "content": "hi"}], max_tokens=5)
            assert answer.choices[0].message.content
        response = await http.get(a.url + "/v1/files", headers=ADMIN)
        body = json.loads(await treq.content(response))
        assert response.code == 503 and body["error"]["code"] == "storage_unavailable", body
        assert body["error"]["type"] == "server_error"
        # A key this host does not hold cannot be checked: a 503, not "Invalid API key" (a client drops a key
        # refused with 401; it retries a 503).
        response = await http.post(a.url + "/v1/chat/completions", json={"model": MODEL, "messages": []},
                                   headers={"authorization": f"Bearer {new_secret()}"})
        body = json.loads(await treq.content(response))
        assert response.code == 503 and body["error"]["code"] == "storage_unavailable", body
        ready = await http.get(a.url + "/health/ready")
        state = json.loads(await treq.content(ready))
        assert ready.code == 200 and state["status"] == "degraded" and "database" in state["down"], state
        postgres.admin(f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")

        async def back():
            response = await http.get(a.url + "/v1/files", headers=ADMIN)
            await treq.content(response)
            return response.code == 200

        await until(reactor, back, limit=10.0, what="the files API answering again")

        async def ready_again():
            response = await http.get(a.url + "/health/ready")
            return json.loads(await treq.content(response)) == {"status": "ready"}

        await until(reactor, ready_again, limit=10.0, what="/health/ready saying ready")
    finally:
        client.close()
        logged_errors.flush(StorageUnavailable)  # the key and budget refreshes said so while it was down


@pytest_twisted.ensureDeferred
async def test_two_deployments_on_one_redis_with_their_own_key_prefix_count_apart(reactor, http, fake, pg_database,
                                                                                 tmp_path):
    """Staging and production (each its own database) on one Redis: each one's limits are its own."""
    client = redis_client()
    other_database = postgres.create_database()
    provider = f"vllm-s{uuid.uuid4().hex[:12]}"  # (a provider no other test names, whatever the prefix)
    model = f"{provider}/meta-llama/Llama-3.1-8B-Instruct"
    gateways = []
    try:
        with fresh_prefix(client) as staging, fresh_prefix(client) as production:
            for database, prefix in ((pg_database, staging), (other_database, production)):
                env = env_for(database, "", tmp_path / prefix.replace(":", "-"), REDIS_URL=REDIS_URL,
                              REDIS_KEY_PREFIX=prefix + ":",
                              **{f"VLLM_{provider[5:].upper()}_BASE_URL": fake.base_url,
                                 f"SET_PROVIDER_RATE_LIMIT_{provider.upper().replace('-', '_')}": "rpm=2"})
                del env["VLLM_BASE_URL"]
                os.makedirs(env["GOMODEL_DATA_DIR"])
                gateways.append(await start_gateway(reactor, env))
            answers = []
            for gw in (gateways[0], gateways[0], gateways[0], gateways[1], gateways[1], gateways[1]):
                response = await http.post(gw.url + "/v1/chat/completions", headers=ADMIN, data=json.dumps(
                    {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).encode())
                await treq.content(response)
                answers.append(response.code)
            assert answers == [200, 200, 429, 200, 200, 429]  # 2 a minute in each deployment, not 2 in both
            assert client.keys(f"{staging}:limits:*{provider}*") and client.keys(f"{production}:limits:*{provider}*")
            assert client.keys(f"gomodel:limits:*{provider}*") == []  # nothing under the default prefix
    finally:
        for gw in gateways:
            await gw.service.stopService()
        stray = client.keys(f"gomodel:limits:*{provider}*")  # (where the prefix was not taken)
        if stray:
            client.delete(*stray)
        client.close()
        postgres.drop_database(other_database)


@pytest_twisted.ensureDeferred
async def test_without_redis_limited_keys_still_flow_and_readiness_names_redis(reactor, http, fake, pg_database,
                                                                              tmp_path):
    env = env_for(pg_database, fake.base_url, tmp_path, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    gw = await start_gateway(reactor, env)
    try:
        code, key = await admin(http, gw.url, "POST", KEYS, {"name": "team", "rpm": 100})
        assert code == 201
        client = openai_client(gw, key["value"])
        try:
            answer = await in_thread(client.chat.completions.create, model=MODEL,
                                     messages=[{"role": "user", "content": "hi"}], max_tokens=5)
            assert answer.choices[0].message.content  # limits fail open (and say so), requests flow
        finally:
            client.close()
        response = await http.get(gw.url + "/health/ready")
        state = json.loads(await treq.content(response))
        assert response.code == 200 and state["status"] == "degraded" and list(state["down"]) == ["redis"]
    finally:
        await gw.service.stopService()


# -- gateway processes ------------------------------------------------------------------------


class Process:
    """A gateway started as a user would: C{twistd -n --pidfile= gomodel --listen tcp:PORT:interface=127.0.0.1}."""

    def __init__(self, env, tmp_path, name):
        self.url = None  # (known once it listens, L{ready}: on the port it chose and logs)
        self.log_path = tmp_path / f"{name}.log"
        run_env = dict(os.environ, **env)
        run_env["PYTHONPATH"] = REPO + os.pathsep + run_env.get("PYTHONPATH", "")
        workdir = tmp_path / name
        workdir.mkdir()
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "gomodel",
             "--listen", "tcp:0:interface=127.0.0.1"],
            env=run_env, cwd=str(workdir), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    async def ready(self, reactor, http):
        def listening():  # (a port chosen here and then bound by the process could be taken in between)
            assert self.proc.poll() is None, self.log()
            return LISTENING.search(self.log_path.read_text(errors="replace"))

        async def logged():
            return listening()

        await until(reactor, logged, limit=30.0, what="the gateway process listening")
        self.url = f"http://127.0.0.1:{listening().group(1)}"

        async def answering():
            assert self.proc.poll() is None, self.log()
            try:  # (its store open: "degraded" says the database is not, its schema not migrated yet)
                response = await http.get(self.url + "/health/ready")
                body = await treq.content(response)
                return response.code == 200 and json.loads(body)["status"] == "ready"
            except Exception:
                return False

        await until(reactor, answering, limit=30.0, what="the gateway process getting ready")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def processes():
    started = []
    yield started
    for process in started:
        process.stop()


async def batch_done(reactor, sdk, batch_id, limit):
    async def done():
        return (await in_thread(sdk.batches.retrieve, batch_id)).status in ("completed", "failed", "expired")

    took = await until(reactor, done, limit=limit, interval=0.1, what=f"batch {batch_id} finishing")
    return took, await in_thread(sdk.batches.retrieve, batch_id)


async def output_of(sdk, batch):
    content = (await in_thread(sdk.files.content, batch.output_file_id)).content
    return [json.loads(line) for line in content.splitlines() if line.strip()]


@pytest_twisted.ensureDeferred
async def test_a_batch_finishes_on_b_after_a_is_killed_mid_batch(reactor, http, fake, pg_database, tmp_path,
                                                                  processes):
    """B resumes the batch A held once A is killed, at once (A's pid is gone, this host knows it): with a lease that
    would not lapse during the test, B's finishing it at all says so (before, a wall-clock bound on B's run of the
    rest, beside a 3 s lease, which a loaded host could pass)."""
    env = env_for(pg_database, fake.base_url, tmp_path, BATCH_LEASE_TIMEOUT=str(HELD))
    a = Process(env, tmp_path, "a")
    b = Process(env, tmp_path, "b")
    processes.extend([a, b])
    await a.ready(reactor, http)
    await b.ready(reactor, http)
    lines = [chat_line(f"l{i}", fake_delay=0.1) for i in range(40)]
    sdk_a = openai.OpenAI(base_url=a.url + "/v1", api_key=MASTER, max_retries=0, timeout=20)
    sdk_b = openai.OpenAI(base_url=b.url + "/v1", api_key=MASTER, max_retries=0, timeout=20)
    try:
        created = await start_batch(sdk_a, lines)  # claimed by A as it is made

        async def halfway():
            return len(committed(pg_database, created.id)) >= 8

        await until(reactor, halfway, what="A recording lines")
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        before = committed(pg_database, created.id)
        assert len(before) < len(lines), "the batch ended before A was killed"
        _, batch = await batch_done(reactor, sdk_b, created.id, limit=HELD / 2)  # (long before A's lease lapses)
        assert batch.status == "completed", b.log()
        assert f"claimed batch {created.id} (" in b.log_path.read_text(errors="replace"), b.log()  # (taken over)
        assert batch.request_counts.model_dump() == {"total": 40, "completed": 40, "failed": 0}
        output = await output_of(sdk_b, batch)
    finally:
        sdk_a.close()
        sdk_b.close()
    assert [line["custom_id"] for line in output] == [line["custom_id"] for line in lines]  # each once, in order
    for custom_id in before:  # committed before the kill: never sent again
        assert fake.marker_counts[custom_id] == 1, custom_id
    assert all(fake.marker_counts[line["custom_id"]] <= 2 for line in lines)  # in flight at the kill: once more


@pytest_twisted.ensureDeferred
async def test_a_background_stream_on_a_is_read_and_cancelled_on_b_while_it_runs_and_once_a_is_killed(
        reactor, http, fake, pg_database, tmp_path, processes):
    """(before: a 404 on every host until the stream ended, and for ever once its host died meanwhile)"""
    env = env_for(pg_database, fake.base_url, tmp_path)
    a = Process(env, tmp_path, "a")
    processes.append(a)
    await a.ready(reactor, http)
    b = await start_gateway(reactor, env)
    sdk_a = openai.OpenAI(base_url=a.url + "/v1", api_key=MASTER, max_retries=0, timeout=20)
    sdk_b = openai_client(b, MASTER)

    def started():
        events = sdk_a.responses.create(model=MODEL, input="long job", background=True, stream=True,
                                        extra_body={"fake_hang_after": 2})
        return events, next(iter(events)).response.id

    try:
        events, response_id = await in_thread(started)
        assert (await in_thread(sdk_b.responses.retrieve, response_id)).status == "queued"  # (its instance's)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        await in_thread(events.close)
        assert (await in_thread(sdk_b.responses.retrieve, response_id)).status == "queued"
        assert (await in_thread(sdk_b.responses.cancel, response_id)).status == "cancelled"
        assert (await in_thread(sdk_b.responses.retrieve, response_id)).status == "cancelled"
    finally:
        sdk_a.close()
        sdk_b.close()
        await b.service.stopService()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_the_budget_reservations_of_a_gateway_killed_with_requests_in_flight_lapse_with_its_lease(
        reactor, http, fake, pg_database, tmp_path, processes, shared_redis):
    """Gateway A is killed (SIGKILL) with four requests of max_tokens 4000 in flight: their budget reservations,
    which it never settles, stayed in the key's shared sum until the period's end (for a total budget, for ever;
    16,168 tokens spent here, though the ledger had none of them). They count while A's liveness key in Redis
    lives (30 s, renewed every 10 s while it holds reservations); once it lapsed (deleted here: its 30 s ran out),
    B's next read of the sum takes them off.

    Ordered by events, not by the clock: the four requests have no client timeout (they end as A dies, or as the
    fake lets them go after a failure), so a loaded host cannot have one end early (before, an SDK timeout of 30 s
    ran from their sending while the test waited for them and for B: past it, A freed them before it was killed)."""
    client = redis_client()
    env = env_for(pg_database, fake.base_url, tmp_path, **shared_redis)
    a = Process(env, tmp_path, "a")
    b = Process(env, tmp_path, "b")
    processes.extend([a, b])
    await a.ready(reactor, http)
    await b.ready(reactor, http)
    sdk = openai.OpenAI(base_url=a.url + "/v1", api_key=MASTER, max_retries=0, timeout=None)
    try:
        code, key = await admin(http, a.url, "POST", KEYS, {
            "name": "team", "budgets": [{"period": "daily", "max_tokens": 100000}]})
        assert code == 201
        sdk.api_key = key["value"]

        def cut():  # (in flight at the fake until A dies: its connection then closes)
            with pytest.raises(openai.APIConnectionError):
                sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4000, extra_body={"fake_hold": True})

        flying = [in_thread(cut) for _ in range(4)]
        await fake.when_held(4).addTimeout(60, reactor)  # (a guard: a failure here ends them with A, at teardown)

        async def spent_on_b():
            code, shown = await admin(http, b.url, "GET", f"{KEYS}/{key['id']}")
            assert code == 200, shown
            return shown["budgets"][0]["spent_tokens"]

        reserved = await spent_on_b()
        assert reserved >= 16000  # the four reservations, seen from B
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        for request in flying:
            await request
        assert await spent_on_b() == reserved  # (A's liveness key still lives: it may only be paused)
        alive = client.keys(f"{shared_redis['REDIS_KEY_PREFIX']}limits:alive|*")
        assert len(alive) == 1  # A's: B has reserved nothing
        client.delete(*alive)  # its 30 s ran out
        assert await spent_on_b() == 0
    finally:
        sdk.close()
        client.close()
        fake.release_holds()


async def responses_charged(reactor, http, gw, count):
    """The (request id, total tokens) of the first C{count} usage records of /v1/responses, sorted."""
    async def records():
        code, log = await admin(http, gw.url, "GET", "/admin/api/v1/usage/log")
        return sorted((r["request_id"], r["total_tokens"] or 0) for r in log["data"]
                      if r["endpoint"] == "/v1/responses")

    async def recorded():
        return len(await records()) >= count

    await until(reactor, recorded, limit=10.0, what="the responses' usage recorded")
    return await records()


@pytest_twisted.ensureDeferred
async def test_a_background_stream_whose_host_died_is_charged_by_the_host_that_adopts_its_watch(
        reactor, http, fake, pg_database, tmp_path, processes):
    """Its watch is kept in the store from its first event, for another host to adopt once its lease ran
    out (before: nothing charged it, as its own record died with its host)."""
    env = env_for(pg_database, fake.base_url, tmp_path)
    a = Process(env, tmp_path, "a")
    processes.append(a)
    await a.ready(reactor, http)
    sdk_a = openai.OpenAI(base_url=a.url + "/v1", api_key=MASTER, max_retries=0, timeout=20)

    def started():
        events = sdk_a.responses.create(model=MODEL, input="long job", background=True, stream=True,
                                        extra_body={"fake_hang_after": 2})
        return events, next(iter(events))

    try:
        events, first = await in_thread(started)
        request_id = events.response.headers["x-request-id"]

        async def watched():
            return postgres.query(pg_database, "SELECT count(*) FROM background_watches")[0][0] == 1

        await until(reactor, watched, limit=5.0, what="its watch kept")
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        await in_thread(events.close)
    finally:
        sdk_a.close()
    postgres.query(pg_database, "UPDATE background_watches SET lease_until = 0")  # (its 60 s lease ran out)
    fake.stored_responses[first.response.id].update(status="completed", usage={
        "input_tokens": 19, "output_tokens": 3, "total_tokens": 22})
    b = await start_gateway(reactor, env)  # (adopts at its start)
    try:
        assert await responses_charged(reactor, http, b, 1) == [(request_id, 22)]
    finally:
        await b.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_background_stream_that_ends_is_charged_once_and_its_watch_given_up(reactor, http, fake, pair,
                                                                                     pg_database):
    """Its final event charges it; the watch kept from its first event is taken out uncharged."""
    a, b = pair
    sdk = openai_client(a, MASTER)

    def streamed():
        with sdk.responses.stream(model=MODEL, input="job", background=True) as events:
            return list(events), events

    try:
        seen, events = await in_thread(streamed)
    finally:
        sdk.close()
    assert seen[-1].type == "response.completed"
    await a.service.usage.flush()
    assert await responses_charged(reactor, http, a, 1) == [(events._raw_stream.response.headers["x-request-id"], 22)]

    async def given_up():
        return postgres.query(pg_database, "SELECT count(*) FROM background_watches")[0][0] == 0

    await until(reactor, given_up, limit=5.0, what="its watch given up")
    assert (await in_thread(openai_client(b, MASTER).responses.retrieve, seen[-1].response.id)).status == "completed"


@pytest_twisted.ensureDeferred
async def test_batches_all_made_on_a_are_run_by_a_and_b(reactor, http, fake, pg_database, tmp_path, processes):
    """Sticky clients: every batch is made on A; B, idle, takes those A is too busy to start at once."""
    other = await start_fake(reactor)  # B's upstream: which fake got a line says which host sent it
    try:
        a = Process(env_for(pg_database, fake.base_url, tmp_path), tmp_path, "a")
        b = Process(env_for(pg_database, other.base_url, tmp_path), tmp_path, "b")
        processes.extend([a, b])
        await a.ready(reactor, http)
        await b.ready(reactor, http)
        inputs = [[chat_line(f"s{n}-{i}", fake_delay=0.5) for i in range(8)] for n in range(4)]
        sdk = openai.OpenAI(base_url=a.url + "/v1", api_key=MASTER, max_retries=0, timeout=20)
        try:
            files = [await in_thread(sdk.files.create, file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
                     for lines in inputs]
            made = [await in_thread(sdk.batches.create, input_file_id=f.id, endpoint="/v1/chat/completions",
                                    completion_window="24h") for f in files]
            for created, lines in zip(made, inputs):
                _, batch = await batch_done(reactor, sdk, created.id, limit=30)
                assert batch.status == "completed", (a.log(), b.log())
                assert batch.request_counts.model_dump() == {"total": 8, "completed": 8, "failed": 0}
                output = await output_of(sdk, batch)
                assert [line["custom_id"] for line in output] == [line["custom_id"] for line in lines]
        finally:
            sdk.close()
    finally:
        await other.stop()
    by_a, by_b = fake.marker_counts, other.marker_counts
    assert not set(by_a) & set(by_b) and set(by_a) | set(by_b) == {line["custom_id"] for x in inputs for line in x}
    assert set(by_a.values()) | set(by_b.values()) == {1}  # every line sent once, by one host
    ran_on_b = {custom_id.split("-")[0] for custom_id in by_b}
    assert "s0" not in ran_on_b  # A, idle, started the first batch it made
    assert ran_on_b, "B ran none of the batches made on A"


@pytest_twisted.ensureDeferred
async def test_a_paused_host_loses_its_batch_to_another_and_its_late_writes_are_fenced(
        reactor, http, fake, pg_database, tmp_path, processes):
    """Three gateways: A is paused (alive, so only its lease can tell), B or C takes over, A resumes fenced."""
    env = env_for(pg_database, fake.base_url, tmp_path)
    a, b, c = (Process(env, tmp_path, name) for name in "abc")
    processes.extend([a, b, c])
    for process in (a, b, c):
        await process.ready(reactor, http)
    lines = [chat_line(f"p{i}", fake_delay=0.1) for i in range(30)]
    sdk_a = openai.OpenAI(base_url=a.url + "/v1", api_key=MASTER, max_retries=0, timeout=20)
    sdk_c = openai.OpenAI(base_url=c.url + "/v1", api_key=MASTER, max_retries=0, timeout=20)
    try:
        created = await start_batch(sdk_a, lines)

        async def started():
            return len(committed(pg_database, created.id)) >= 4

        await until(reactor, started, what="A recording lines")
        a.proc.send_signal(signal.SIGSTOP)
        paused_at = time.monotonic()

        async def taken_over():
            rows = postgres.query(pg_database, "SELECT owner FROM batches WHERE id = %s", (created.id,))
            return rows[0][0] is not None and f":{a.proc.pid}:" not in rows[0][0]

        # the lease ran out, then the next poll (every second) claimed it
        await seen_within(reactor, taken_over, LEASE + 2.5, "another host claiming the batch")
        _, batch = await batch_done(reactor, sdk_c, created.id, limit=30)
        a.proc.send_signal(signal.SIGCONT)  # its requests in flight answer now; their results are refused
        assert batch.status == "completed"
        assert batch.request_counts.model_dump() == {"total": 30, "completed": 30, "failed": 0}
        output = await output_of(sdk_c, batch)
        assert [line["custom_id"] for line in output] == [line["custom_id"] for line in lines]
        stopped = f"batch {created.id}: our claim was taken over; stopped here"

        async def stopped_on_a():  # (its heartbeat or a refused write found the claim lost; its writes are over)
            return stopped in a.log_path.read_text(errors="replace")

        await until(reactor, stopped_on_a, what="A stopping its batch")
        assert time.monotonic() - paused_at > LEASE
        rows = postgres.query(pg_database, "SELECT completed, failed FROM batches WHERE id = %s", (created.id,))
        assert rows == [(30, 0)]  # A's late answers counted nothing
        assert a.proc.poll() is None  # and it did not crash
    finally:
        sdk_a.close()
        sdk_c.close()


@pytest_twisted.ensureDeferred
async def test_database_connections_killed_mid_batch_lose_no_line_and_the_gateway_recovers(
        reactor, http, fake, pg_database, tmp_path, processes):
    env = env_for(pg_database, fake.base_url, tmp_path)
    a = Process(env, tmp_path, "a")
    processes.append(a)
    await a.ready(reactor, http)
    lines = [chat_line(f"k{i}", fake_delay=0.05) for i in range(60)]
    sdk = openai.OpenAI(base_url=a.url + "/v1", api_key=MASTER, max_retries=0, timeout=20)
    try:
        created = await start_batch(sdk, lines)
        for _ in range(30):  # the gateway's connections die, idle or in the middle of a statement
            await deferLater(reactor, 0.05, lambda: None)
            postgres.kill_connections(pg_database)
        took, batch = await batch_done(reactor, sdk, created.id, limit=60)
        assert batch.status == "completed", a.log()
        assert batch.request_counts.model_dump() == {"total": 60, "completed": 60, "failed": 0}
        output = await output_of(sdk, batch)
        assert [line["custom_id"] for line in output] == [line["custom_id"] for line in lines]
        assert a.proc.poll() is None
        assert (await in_thread(sdk.files.list)).data  # recovered: the store answers
    finally:
        sdk.close()
