"""The usage ledger: records for what reached an upstream, costs, the flush at stop, the admin usage API."""

import csv
import io
import json

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from tests.rawclient import chat_request, connect
from tests.stores import sqlite_store  # noqa: F401 (a fixture)
from tests.support import send_streams_failing_after_200, start_fake, start_gateway, until, with_timeout

MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"
KEY = {"Authorization": "Bearer k1"}


async def _post(http, gw, path, body):
    response = await http.post(gw.url + path, headers=KEY, data=json.dumps(body).encode())
    return response, await response.content()


async def _recorded(gw, count):
    """The ledger's records, newest first, once it holds C{count} (flushed; an abandoned request's record
    completes once its upstream side closed), or as they are after 100 looks."""
    for _ in range(100):
        await gw.service.usage.flush()
        records, _ = await gw.service.store.usage.log(0, 2e9, 100)
        if len(records) == count:
            break
    return records


@pytest_twisted.ensureDeferred
async def test_records_for_every_request_that_reached_an_upstream(reactor, http, fake, tmp_path):
    config = tmp_path / "g.yaml"
    config.write_text(f"pricing:\n  {MODEL}: {{input_per_mtok: 2, output_per_mtok: 10}}\n")
    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1", "GOMODEL_DATA_DIR": str(tmp_path / "d")}
    gw = await start_gateway(reactor, env, str(config))
    try:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        _, answer = await _post(http, gw, "/v1/chat/completions", chat)
        usage = json.loads(answer)["usage"]
        await _post(http, gw, "/v1/chat/completions", dict(chat, stream=True))
        await _post(http, gw, "/v1/embeddings", {"model": MODEL, "input": "x"})
        await _post(http, gw, "/v1/chat/completions", dict(chat, model="vllm/nope"))  # reached nothing
        client = await connect(reactor, gw.port, chat_request(
            dict(chat, stream=True, fake_chunks=50, fake_pace=0.05), headers=KEY))
        await with_timeout(reactor, client.wait_for(b'"content"'), 10)
        client.transport.abortConnection()
        await client.lost
        records = await _recorded(gw, 4)  # (the abandoned stream's completes once its upstream side closed)
        assert len(records) == 4
        gone, embedded, streamed, plain = records  # newest first
        assert (plain["endpoint"], plain["status_code"], plain["stream"]) == ("/v1/chat/completions", 200, False)
        assert (plain["input_tokens"], plain["output_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
        assert plain["model"] == MODEL and (plain["provider"], plain["provider_name"], plain["replica"]) == (
            "vllm", "vllm", 0)
        assert plain["input_cost"] == usage["prompt_tokens"] * 2 / 1e6
        assert plain["total_cost"] == plain["input_cost"] + usage["completion_tokens"] * 10 / 1e6
        assert streamed["stream"] and streamed["output_tokens"] == usage["completion_tokens"]
        assert streamed["ttft_ms"] is not None and not streamed["estimated"]
        assert plain["ttft_ms"] is None  # (a whole answer's first byte is its end: no time to a first token)
        assert embedded["endpoint"] == "/v1/embeddings" and embedded["input_tokens"] > 0
        assert gone["client_gone"] and gone["estimated"] and gone["output_tokens"] > 0
        assert gone["status_code"] == 499

        summary = json.loads(await (await http.get(gw.url + "/admin/api/v1/usage/summary", headers=KEY)).content())
        assert summary["requests"] == 4 and summary["input_tokens"] >= 2 * usage["prompt_tokens"]
        page = json.loads(await (await http.get(gw.url + "/admin/api/v1/usage/log?limit=3", headers=KEY)).content())
        assert len(page["data"]) == 3 and page["has_more"]
        rest = json.loads(await (await http.get(gw.url + f"/admin/api/v1/usage/log?after={page['next']}",
                                                headers=KEY)).content())
        assert [r["request_id"] for r in rest["data"]] == [plain["request_id"]]
        only = json.loads(await (await http.get(gw.url + "/admin/api/v1/usage/log?status=499",
                                                headers=KEY)).content())
        assert [r["request_id"] for r in only["data"]] == [gone["request_id"]]
        master = json.loads(await (await http.get(gw.url + "/admin/api/v1/usage/log?key=master",
                                                  headers=KEY)).content())
        assert len(master["data"]) == 4  # (the master key's, recorded without a key id: before, none found)
        exported = await http.get(gw.url + "/admin/api/v1/usage/log?format=csv", headers=KEY)
        assert exported.headers.getRawHeaders("content-type")[0].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO((await exported.content()).decode())))
        assert len(rows) == 4 and rows[-1]["request_id"] == plain["request_id"]
        daily = json.loads(await (await http.get(gw.url + "/admin/api/v1/usage/daily", headers=KEY)).content())
        assert len(daily["data"]) == 1 and daily["data"][0]["requests"] == 4
        assert len(daily["data"][0]["period"]) == 10  # YYYY-MM-DD
        models = json.loads(await (await http.get(gw.url + "/admin/api/v1/usage/models", headers=KEY)).content())
        assert [(m["provider_name"], m["model"], m["requests"]) for m in models["data"]] == [("vllm", MODEL, 4)]
        assert models["data"][0]["total_cost"] > 0
        hourly = await http.get(gw.url + "/admin/api/v1/usage/daily?interval=hour&format=csv", headers=KEY)
        assert (await hourly.content()).decode().startswith("period,requests,")
        for query in ("start_date=yesterday", "days=800000", "days=99999999999",  # (those two: before year 1)
                      "start_date=2026-01-01&days=7"):  # (one window, said twice: days was ignored)
            bad = await http.get(gw.url + "/admin/api/v1/usage/summary?" + query, headers=KEY)
            assert bad.code == 400 and json.loads(await bad.content())["error"]["code"] == "invalid_window"
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_passthrough_stream_is_recorded_and_counted_as_a_stream(reactor, http, fake, tmp_path):
    """A passthrough's answer that is an event stream is a stream (issue 13: the record's C{stream}, the
    C{stream} label, time to first token "streams"); its plain JSON answer is not."""
    from tests.test_metrics import scrape, value

    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1", "GOMODEL_DATA_DIR": str(tmp_path / "d")}
    gw = await start_gateway(reactor, env)
    try:
        chat = {"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hi"}]}
        response, _ = await _post(http, gw, "/p/vllm/chat/completions", chat)
        assert response.code == 200
        response, body = await _post(http, gw, "/p/vllm/chat/completions", dict(chat, stream=True))
        assert response.code == 200 and body.rstrip().endswith(b"data: [DONE]")
        streamed, plain = await _recorded(gw, 2)
        assert (plain["endpoint"], plain["stream"]) == ("/p/{provider}/{endpoint}", False)
        assert (streamed["endpoint"], streamed["stream"]) == ("/p/{provider}/{endpoint}", True)
        found = await scrape(http, gw)
        assert value(found, "gomodel_requests_total", endpoint="/p/{provider}/{endpoint}", stream="true") == 1
        assert value(found, "gomodel_requests_total", endpoint="/p/{provider}/{endpoint}", stream="false") == 1
        assert value(found, "gomodel_time_to_first_token_seconds_count", model=MODEL) == 1
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_stream_whose_done_was_written_is_complete_however_its_body_ends(reactor, fake, tmp_path):
    # SDKs close the connection once they read [DONE], which can be before the upstream's
    # last chunk reaches the gateway; an upstream may also break off just after [DONE].
    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1", "GOMODEL_DATA_DIR": str(tmp_path / "d")}
    gw = await start_gateway(reactor, env)
    try:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "stream_options": {"include_usage": True}}
        left = await connect(reactor, gw.port, chat_request(dict(chat, fake_after_done="hold"), headers=KEY))
        await with_timeout(reactor, left.wait_for(b"data: [DONE]"), 10)
        upstream = fake.last_request()
        left.transport.loseConnection()
        await with_timeout(reactor, upstream.closed, 5)  # the held upstream is closed, not left open
        cut = await connect(reactor, gw.port, chat_request(dict(chat, fake_after_done="abort"), headers=KEY))
        await with_timeout(reactor, cut.wait_for(b"\r\n0\r\n\r\n"), 10)
        assert bytes(cut.received).endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # a clean end, no error event
        cut.transport.loseConnection()
        for _ in range(100):
            await gw.service.usage.flush()
            records, _ = await gw.service.store.usage.log(0, 2e9, 100)
            if len(records) == 2:
                break
        assert len(records) == 2
        for record in records:
            assert (record["status_code"], record["client_gone"], record["estimated"]) == (200, False, False)
            assert record["output_tokens"] == 3
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_responses_record_their_usage_stored_or_not(reactor, http, fake, tmp_path):
    # A stored response's usage is taken from the answer the gateway parses to keep it; one not
    # stored is not parsed whole, its usage read from its bytes: the same figures either way.
    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1", "GOMODEL_DATA_DIR": str(tmp_path / "d")}
    gw = await start_gateway(reactor, env)
    try:
        ask = {"model": MODEL, "input": "hi"}
        ids = []
        for body in (ask, dict(ask, store=False)):
            response, answer = await _post(http, gw, "/v1/responses", body)
            assert response.code == 200 and json.loads(answer)["usage"]["input_tokens"] == 19
            ids.append(json.loads(answer)["id"])
        kept = [(await http.get(f"{gw.url}/v1/responses/{i}", headers=KEY)).code for i in ids]
        assert kept == [200, 404]
        records = await _recorded(gw, 2)
        assert [(r["endpoint"], r["input_tokens"], r["output_tokens"]) for r in records] == [
            ("/v1/responses", 19, 3)] * 2
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_batch_lines_record_names_its_replica_and_its_duration(reactor, fake, tmp_path):
    """(before: no replica and no duration, so the log showed neither and the latency figures left batches out)"""
    from tests.support import in_thread, openai_client

    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1", "GOMODEL_DATA_DIR": str(tmp_path / "d")}
    gw = await start_gateway(reactor, env)
    client = openai_client(gw, "k1")
    try:
        line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}}
        uploaded = await in_thread(client.files.create, purpose="batch",
                                   file=("in.jsonl", io.BytesIO(json.dumps(line).encode() + b"\n")))
        batch = await in_thread(client.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                completion_window="24h")
        await gw.service.batch_runner.settled(batch.id)
        [record] = await _recorded(gw, 1)
        assert record["endpoint"] == "/v1/chat/completions" and record["replica"] == 0
        assert record["duration_ms"] is not None and record["duration_ms"] >= 0 and record["total_tokens"] == 21
    finally:
        client.close()
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_counts_no_request_could_have_are_unknown_and_the_ledger_goes_on(reactor, http, fake, tmp_path):
    # An upstream's count past 64 bits (or past a trillion) would fail every write of the rows buffered with
    # it, and those rows are kept for the next write: the ledger would stop for good.
    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1", "GOMODEL_DATA_DIR": str(tmp_path / "d")}
    gw = await start_gateway(reactor, env)
    try:
        huge = {"prompt_tokens": 2**70, "completion_tokens": 10**12 + 1, "total_tokens": 2**64 + 7,
                "prompt_tokens_details": {"cached_tokens": 2**63}}
        answer = {"id": "chatcmpl-1", "object": "chat.completion", "model": "meta-llama/Llama-3.1-8B-Instruct",
                  "choices": [], "usage": huge}
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        response, body = await _post(http, gw, "/v1/chat/completions",
                                     dict(chat, fake_status=200, fake_body=json.dumps(answer)))
        assert response.code == 200 and json.loads(body)["usage"] == huge  # relayed as it came
        response, _ = await _post(http, gw, "/v1/chat/completions", chat)
        assert response.code == 200
        await gw.service.usage.flush()
        records, _ = await gw.service.store.usage.log(0, 2e9, 10)
        normal, odd = records  # newest first
        assert (odd["input_tokens"], odd["output_tokens"], odd["total_tokens"], odd["cached_tokens"]) == (0, 0, 0, 0)
        assert normal["input_tokens"] > 0 and normal["total_tokens"] > 0
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_request_the_upstream_never_answered_is_recorded_with_its_error(reactor, http, fake, tmp_path):
    # vLLM answers a non-streamed request once it is done: one that times out (504), or whose client leaves
    # first (499), reached it and kept it busy. Its record says so, as the access log does, with its prompt
    # estimated (the upstream read it).
    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1", "GOMODEL_DATA_DIR": str(tmp_path / "d"),
           "HTTP_RESPONSE_HEADER_TIMEOUT": "1s"}
    gw = await start_gateway(reactor, env)
    try:
        response, _ = await _post(http, gw, "/v1/embeddings", {"model": MODEL, "input": "x", "fake_delay": 5})
        assert response.code == 504
        arrived = fake.next_request()
        client = await connect(reactor, gw.port, chat_request(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "fake_delay": 5}, headers=KEY))
        await with_timeout(reactor, arrived, 5)
        client.transport.abortConnection()
        await client.lost
        gone, timed_out = await _recorded(gw, 2)  # newest first
        assert (timed_out["endpoint"], timed_out["status_code"], timed_out["provider_name"], timed_out["replica"],
                timed_out["model"], timed_out["input_tokens"], timed_out["estimated"]) == (
            "/v1/embeddings", 504, "vllm", 0, MODEL, 1, True)
        assert (gone["endpoint"], gone["status_code"], gone["client_gone"], gone["replica"]) == (
            "/v1/chat/completions", 499, True, 0)
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_buffered_records_are_written_at_stop(reactor, http, fake, tmp_path):
    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_DATA_DIR": str(tmp_path / "d"), "USAGE_FLUSH_INTERVAL": "1h"}
    gw = await start_gateway(reactor, env)
    try:
        await _post(http, gw, "/v1/chat/completions", {"model": MODEL, "messages": []})
    finally:
        await gw.service.stopService()
    again = await start_gateway(reactor, env)
    try:
        records, _ = await again.service.store.usage.log(0, 2e9, 10)
        assert len(records) == 1 and records[0]["status_code"] == 200
    finally:
        await again.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_retention_runs_soon_after_a_start_not_only_after_a_day_up(reactor, sqlite_store):
    """The first sweep of old records came a day after the process started: a fleet restarted at least daily
    (deploys, scaling) never deleted any, and its ledger grew without end."""
    from twisted.internet.task import Clock

    from gomodel.accounting.usage import FIRST_SWEEP, UsageLedger

    clock = Clock()
    clock.advance(10 * 86400)
    ledger = UsageLedger(sqlite_store.usage, sqlite_store.claims, clock, "test", flush_interval=5.0, retention=86400)
    ledger.keep("old", 100.0, "vllm", "vllm", 0, "vllm/m", "/v1/chat/completions", 200, False, None)
    await ledger.flush()
    ledger.startService()
    try:
        assert FIRST_SWEEP <= 3600
        clock.advance(FIRST_SWEEP)

        for _ in range(500):  # (the store's thread deletes it)
            if (await sqlite_store.usage.summary(0, 1e9))["requests"] == 0:
                break
            await deferLater(reactor, 0.01, lambda: None)
        else:
            raise AssertionError("the old record was never deleted")
    finally:
        await ledger.stopService()


@pytest_twisted.ensureDeferred
async def test_a_stop_waits_for_the_retention_sweep_in_progress_to_release_its_claim(reactor, sqlite_store):
    """A stop while the sweep runs: its claim is released before the stop is over (before, after it: to a store
    already closed, an error logged)."""
    from twisted.internet.task import Clock

    from gomodel.accounting.usage import FIRST_SWEEP, UsageLedger

    class HeldRelease:
        def __init__(self, claims):
            self.claims, self.releasing = claims, Deferred()

        def claim(self, *args):
            return self.claims.claim(*args)

        async def release(self, *args):
            await self.releasing
            return await self.claims.release(*args)

    claims, clock = HeldRelease(sqlite_store.claims), Clock()
    ledger = UsageLedger(sqlite_store.usage, claims, clock, "test", flush_interval=5.0, retention=86400)
    ledger.startService()
    clock.advance(FIRST_SWEEP)
    await until(reactor, lambda: ledger._sweeping is not None, what="the sweep to start")
    stopped = ledger.stopService()
    for _ in range(20):  # (the store's threads: the stop waits on the release whatever they do meanwhile)
        await deferLater(reactor, 0, lambda: None)
    assert not stopped.called
    claims.releasing.callback(None)
    await stopped


@pytest_twisted.ensureDeferred
async def test_a_full_buffer_is_written_before_the_next_tick(reactor, sqlite_store):
    from twisted.internet.task import Clock

    from gomodel.accounting.usage import FLUSH_AT, UsageLedger

    clock = Clock()
    ledger = UsageLedger(sqlite_store.usage, sqlite_store.claims, clock, "test", flush_interval=5.0)
    for i in range(FLUSH_AT - 1):
        ledger.keep(f"r{i}", 100.0, "vllm", "vllm", 0, "vllm/m", "/v1/chat/completions", 200, False, None)
    assert not clock.getDelayedCalls()  # below the mark: the tick writes them
    ledger.keep("last", 100.0, "vllm", "vllm", 0, "vllm/m", "/v1/chat/completions", 200, False, None)
    [write] = clock.getDelayedCalls()
    assert write.getTime() == clock.seconds()  # at once, on the next turn
    clock.advance(0)
    await ledger.flush()  # behind the write that started
    assert (await sqlite_store.usage.summary(0, 1e9))["requests"] == FLUSH_AT


@pytest_twisted.ensureDeferred
async def test_a_record_the_store_cannot_write_is_dropped_alone(reactor, sqlite_store):
    from twisted.internet.task import Clock
    from twisted.logger import LogLevel, Logger

    from gomodel.accounting.usage import UsageLedger

    ledger = UsageLedger(sqlite_store.usage, sqlite_store.claims, Clock(), "test", flush_interval=5.0)
    events = []
    ledger.log = Logger(observer=events.append)
    for i in range(11):  # one record no column can hold (a text that is no Unicode), among ten
        ledger.keep(f"r{i}", 100.0 + i, "vllm", "vllm", 0, "vllm/\udc80" if i == 6 else "vllm/m",
                    "/v1/chat/completions", 200, False, None)
    await ledger.flush()
    records, _ = await sqlite_store.usage.log(0, 1e9, 20)
    assert sorted(r["request_id"] for r in records) == sorted(f"r{i}" for i in range(11) if i != 6)
    [dropped] = [e for e in events if e.get("log_level") == LogLevel.error]
    assert dropped["request_id"] == "r6" and "dropped" in dropped["log_format"]
    await ledger.flush()  # nothing is kept to try again
    assert len((await sqlite_store.usage.log(0, 1e9, 20))[0]) == 10


def test_token_counts_by_type_in_every_naming():
    from gomodel.accounting.tokens import tokens_by_type, total_tokens

    chat = {"prompt_tokens": 18, "completion_tokens": 20, "total_tokens": 38,
            "prompt_tokens_details": {"cached_tokens": 16}, "completion_tokens_details": {"reasoning_tokens": 5}}
    responses = {"input_tokens": 19, "output_tokens": 3, "total_tokens": 22,
                 "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 2}}
    anthropic = {"input_tokens": 4, "output_tokens": 7, "cache_read_input_tokens": 100,
                 "cache_creation_input_tokens": 20}
    assert tokens_by_type(chat) == (18, 20, 16, 5)
    assert tokens_by_type(responses) == (19, 3, 0, 2)
    assert tokens_by_type(anthropic) == (124, 7, 100, 0)  # the cache's tokens are input too
    assert tokens_by_type({"input_tokens": 4, "cache_creation_input_tokens": 20}) == (24, 0, 0, 0)
    # vLLM's nulls, and what is no count (bools, negatives, strings, floats): 0
    assert tokens_by_type({"prompt_tokens": 9, "completion_tokens": 1, "prompt_tokens_details": None,
                           "completion_tokens_details": None}) == (9, 1, 0, 0)
    assert tokens_by_type({"prompt_tokens": True, "completion_tokens": -3, "cache_read_input_tokens": "5",
                           "prompt_tokens_details": {"cached_tokens": 2.0}}) == (0, 0, 0, 0)
    assert tokens_by_type({"prompt_tokens": None, "input_tokens": 6}) == (6, 0, 0, 0)
    # a naming's details given null, the other naming's taken (each name looked up, in any mix)
    assert tokens_by_type({"prompt_tokens": 5, "output_tokens": 2, "prompt_tokens_details": None,
                           "input_tokens_details": {"cached_tokens": 3}, "completion_tokens_details": {},
                           "output_tokens_details": {"reasoning_tokens": 1}}) == (5, 2, 3, 1)
    assert tokens_by_type({}) == (0, 0, 0, 0)
    # a naming's own name wins over the other's, present or not a count; the cache's names count in any naming
    assert tokens_by_type({"prompt_tokens": 0, "input_tokens": 6, "completion_tokens": "x", "output_tokens": 2,
                           "cache_creation_input_tokens": None, "cache_read_input_tokens": 4}) == (4, 0, 4, 0)
    assert total_tokens(chat) == 38 and total_tokens(anthropic) == 131
    # no count past MAX_COUNT (an upstream's error): such a total is worked out from the counts
    assert tokens_by_type({"prompt_tokens": 10**12, "completion_tokens": 10**12 + 1,
                           "cache_read_input_tokens": 2**64}) == (10**12, 0, 0, 0)
    for odd in (-1, True, 10**12 + 1, 2**64, 3.0):
        assert total_tokens({"total_tokens": odd, "prompt_tokens": 2, "completion_tokens": 3}) == 5
    assert total_tokens({"total_tokens": 0, "prompt_tokens": 2}) == 0


def test_audio_seconds_are_read_from_a_duration_usage_only():
    from gomodel.accounting.tokens import Pricing, audio_seconds

    assert audio_seconds({"type": "duration", "seconds": 90}) == 90.0
    assert audio_seconds({"type": "duration", "seconds": 1.5}) == 1.5
    for odd in ({"type": "tokens", "input_tokens": 9, "seconds": 3}, {"type": "duration", "seconds": True},
                {"type": "duration", "seconds": -1}, {"type": "duration", "seconds": "9"},
                {"type": "duration", "seconds": 10**12}, {"prompt_tokens": 9}):
        assert audio_seconds(odd) is None, odd
    pricing = Pricing({"a/w": {"audio_per_minute": 0.6, "input_per_mtok": 1}})
    assert pricing.costs("a/w", (0, 0, 0, 0), 90.0) == pytest.approx((0.9, 0.0, 0.9))
    assert pricing.costs("a/w", (10**6, 0, 0, 0)) == (1.0, 0.0, 1.0)  # (tokens as ever)


@pytest_twisted.ensureDeferred
async def test_records_a_store_down_at_stop_could_not_take_are_said_to_be_lost(reactor):
    # before: the stop's flush failed within the streak already warned of ("kept for the next flush"), and the
    # records went with the process, unsaid
    from twisted.internet.task import Clock
    from twisted.logger import LogLevel, Logger, formatEvent

    from gomodel.accounting.usage import UsageLedger
    from tests.stores import down_postgresql

    down = await down_postgresql(reactor)
    try:
        ledger = UsageLedger(down.usage, down.claims, Clock(), "test", flush_interval=5.0)
        events = []
        ledger.log = Logger(observer=events.append)
        ledger.startService()
        for i in range(2):
            ledger.keep(f"r{i}", 100.0 + i, "vllm", "vllm", 0, "vllm/m", "/v1/chat/completions", 200, False, None)
        await ledger.flush()  # the streak's warning
        await ledger.stopService()
        assert [e["log_level"] for e in events] == [LogLevel.warn, LogLevel.error]
        assert formatEvent(events[-1]).startswith("2 usage records could not be written before the stop")
    finally:
        await down.stopService()


@pytest_twisted.ensureDeferred
async def test_a_store_down_is_logged_once_a_streak_of_failed_flushes(reactor, tmp_path):
    from twisted.internet.task import Clock
    from twisted.logger import LogLevel, Logger

    from gomodel.accounting.usage import UsageLedger
    from tests.stores import down_postgresql, postgresql_backend

    down = await down_postgresql(reactor)
    up = await postgresql_backend(reactor, tmp_path, Clock())
    try:
        ledger = UsageLedger(down.usage, down.claims, Clock(), "test", flush_interval=5.0)
        events = []
        ledger.log = Logger(observer=events.append)
        for i in range(3):
            ledger.keep(f"r{i}", 100.0 + i, "vllm", "vllm", 0, "vllm/m", "/v1/chat/completions", 200, False, None)
            await ledger.flush()
        assert [e["log_level"] for e in events] == [LogLevel.warn]  # not one a flush
        ledger._usage = up.usage  # the database is back
        await ledger.flush()
        await ledger.flush()
        assert [e["log_level"] for e in events] == [LogLevel.warn, LogLevel.info]
        assert len((await up.usage.log(0, 1e9, 10))[0]) == 3  # nothing was lost
    finally:
        await down.stopService()
        await up.stopService()
        await up.cleanup()


@pytest_twisted.ensureDeferred
async def test_records_dropped_past_the_buffer_while_the_store_is_down_are_said_to_be_lost(reactor, tmp_path,
                                                                                           monkeypatch):
    # before: past MAX_BUFFER the oldest records went unsaid, while the streak's warning said they were kept
    from twisted.internet.task import Clock
    from twisted.logger import LogLevel, Logger, formatEvent

    from gomodel.accounting import usage
    from tests.stores import down_postgresql, postgresql_backend

    monkeypatch.setattr(usage, "MAX_BUFFER", 3)
    down = await down_postgresql(reactor)
    up = await postgresql_backend(reactor, tmp_path, Clock())
    try:
        ledger = usage.UsageLedger(down.usage, down.claims, Clock(), "test", flush_interval=5.0)
        events = []
        ledger.log = Logger(observer=events.append)
        for i in range(6):
            ledger.keep(f"r{i}", 100.0 + i, "vllm", "vllm", 0, "vllm/m", "/v1/chat/completions", 200, False, None)
            if i == 2:
                await ledger.flush()  # the streak's warning; the three kept
        levels = [e["log_level"] for e in events]
        assert levels == [LogLevel.warn, LogLevel.error]  # one line for the drops, not one a record
        assert "dropped" in formatEvent(events[1]) and "3" in formatEvent(events[1])
        ledger._usage = up.usage  # the database is back
        await ledger.flush()
        assert [r["request_id"] for r in (await up.usage.log(0, 1e9, 10))[0]] == ["r5", "r4", "r3"]
        said = [formatEvent(e) for e in events[2:]]
        assert any("3 usage records were dropped" in line for line in said), said
        ledger.keep("r6", 106.0, "vllm", "vllm", 0, "vllm/m", "/v1/chat/completions", 200, False, None)
        await ledger.flush()
        assert len(events) == 2 + len(said)  # nothing more to say
    finally:
        await down.stopService()
        await up.stopService()
        await up.cleanup()


@pytest_twisted.ensureDeferred
async def test_the_ledgers_summary_adds_what_it_holds_still_as_the_store_sums_it(reactor, sqlite_store):
    """What C{GET /v1/usage} counts: written records and those not yet written, under the same filters."""
    from twisted.internet.task import Clock

    from gomodel.accounting.usage import UsageLedger

    ledger = UsageLedger(sqlite_store.usage, sqlite_store.claims, Clock(), "test", flush_interval=5.0)
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
             "prompt_tokens_details": {"cached_tokens": 4}}
    for i, (status, key, path) in enumerate(((200, "k_1", "/team/a"), (500, "k_2", "/team/a/x"),
                                             (200, None, None), (200, "k_3", "/team/ab"))):
        ledger.keep(f"r{i}", 100.0 + i, "vllm", "vllm", 0, "vllm/m", "/v1/chat/completions", status, False, usage,
                    auth_key_id=key, user_path=path)
        if i == 1:
            await ledger.flush()  # two written, two held
    ledger.keep("late", 5000.0, "vllm", "vllm", 0, "vllm/m", "/v1/chat/completions", 200, False, usage)
    for filters, expected in (({}, (4, 60, 16, 1)), ({"user_path": "/team/a"}, (2, 30, 8, 1)),
                              ({"user_path": "/team"}, (3, 45, 12, 1)), ({"key": "k_3"}, (1, 15, 4, 0)),
                              ({"keyless": True}, (1, 15, 4, 0)), ({"user_path": "/nobody"}, (0, 0, 0, 0))):
        totals = await ledger.summary(0, 1000, filters)
        assert (totals["requests"], totals["total_tokens"], totals["cached_tokens"], totals["errors"]) == expected
        assert totals["total_cost"] is None  # (no prices)
        assert (totals["server_errors"], totals["client_errors"]) == (expected[3], 0)
    for i, (status, outcome) in enumerate(((429, "error"), (499, "client_gone"), (200, "stream_broken"))):
        ledger.keep(f"e{i}", 200.0 + i, "vllm", "vllm", 0, "vllm/m", "/v1/chat/completions", status, False, usage,
                    outcome=outcome)
    totals = await ledger.summary(0, 1000)
    assert {name: totals[name] for name in ("errors", "server_errors", "client_errors", "client_gone",
                                            "stream_broken")} == {
        "errors": 4, "server_errors": 1, "client_errors": 1, "client_gone": 1, "stream_broken": 1}
    await ledger.flush()
    assert await ledger.summary(0, 1000, {"user_path": "/team"}) == await sqlite_store.usage.summary(
        0, 1000, {"user_path": "/team"})


@pytest_twisted.ensureDeferred
async def test_a_prompt_of_token_ids_left_early_is_charged_a_token_each(reactor, fake, tmp_path):
    """A completions stream whose prompt is token ids (vLLM takes them), left after its first event, is charged
    its prompt as the upstream read it: a token an id (before: 0, its ids being no text, so a key could send any
    prompt that way and be charged only the events it read); ids nested in a list of prompts too, and the text of a
    mixed one as text."""
    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1", "GOMODEL_DATA_DIR": str(tmp_path / "d")}
    gw = await start_gateway(reactor, env)
    try:
        for prompt in (list(range(3000)), [list(range(1000)), list(range(500))], ["abcdefgh", [1, 2, 3]]):
            body = {"model": MODEL, "prompt": prompt, "stream": True, "fake_chunks": 50, "fake_pace": 0.05}
            request = chat_request(body, headers=KEY).replace(b"/v1/chat/completions", b"/v1/completions", 1)
            client = await connect(reactor, gw.port, request)
            await with_timeout(reactor, client.wait_for(b'"text"'), 10)
            client.transport.abortConnection()
            await client.lost
        records = await _recorded(gw, 3)
        assert [(r["endpoint"], r["status_code"], r["client_gone"], r["estimated"]) for r in records] == [
            ("/v1/completions", 499, True, True)] * 3
        # ("abcdefgh": 2, and 3 ids; in any order: a record is written once its upstream side closed, which on a
        # loaded host may be after the next request's)
        assert sorted(r["input_tokens"] for r in records) == [5, 1500, 3000]
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_responses_or_messages_stream_the_client_left_is_recorded_with_what_it_sent(reactor, fake, tmp_path):
    """A stream left before its final usage is charged the output its deltas carried (estimated), on every
    streaming route: before, a Responses stream (native or translated) was recorded with no tokens at all,
    and a native Messages stream with message_start's 0 output tokens, whatever it had sent."""
    translating = await start_fake(reactor, responses=False)
    env = {"VLLM_BASE_URL": fake.base_url, "VLLM_T_BASE_URL": translating.base_url, "GOMODEL_MASTER_KEY": "k1",
           "GOMODEL_DATA_DIR": str(tmp_path / "d")}
    gw = await start_gateway(reactor, env)
    native, translated = MODEL, "vllm-t/meta-llama/Llama-3.1-8B-Instruct"
    try:
        for path, body, seen in (
                ("/v1/responses", {"model": native, "input": "hi", "stream": True, "fake_hang_after": 4},
                 b"response.output_text.delta"),
                ("/v1/responses", {"model": translated, "input": "hi", "stream": True, "fake_chunks": 50,
                                   "fake_pace": 0.05}, b"response.output_text.delta"),
                ("/v1/messages", {"model": native, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}],
                                  "stream": True, "fake_chunks": 50, "fake_pace": 0.05}, b"text_delta")):
            request = chat_request(body, headers=KEY).replace(b"/v1/chat/completions", path.encode(), 1)
            client = await connect(reactor, gw.port, request)
            await with_timeout(reactor, client.wait_for(seen), 10)
            client.transport.abortConnection()
            await client.lost
        records = await _recorded(gw, 3)
        assert [(r["endpoint"], r["status_code"], r["client_gone"], r["estimated"]) for r in records] == [
            ("/v1/messages", 499, True, True), ("/v1/responses", 499, True, True), ("/v1/responses", 499, True, True)]
        assert all(r["output_tokens"] > 0 for r in records), records
        assert records[0]["input_tokens"] == 18  # (message_start's, the upstream's own count)
        # (the Responses streams': their prompt estimated from the request, the upstream having read it all)
        assert [r["input_tokens"] for r in records[1:]] == [2, 1]  # ("user" "hi" translated to chat, "hi")
    finally:
        await gw.service.stopService()
        await translating.stop()


@pytest_twisted.ensureDeferred
async def test_a_stream_that_failed_after_its_200_is_an_error_of_the_ledger(reactor, http, fake, tmp_path):
    """A stream the upstream broke off, or one it sent an error event in, went out with the 200 it had sent: its
    record says its C{outcome} (C{stream_broken}, C{error}) and the usage views count it in C{errors} (they
    counted a status of 400 or above only, so a failed stream was a success there, and an error in the metrics)."""
    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1", "GOMODEL_DATA_DIR": str(tmp_path / "d")}
    gw = await start_gateway(reactor, env)
    try:
        await send_streams_failing_after_200(http, gw, KEY, MODEL)
        in_band, broken, whole = await _recorded(gw, 3)
        assert [r["status_code"] for r in (in_band, broken, whole)] == [200, 200, 200]
        assert [r["outcome"] for r in (in_band, broken, whole)] == ["error", "stream_broken", "ok"]
        summary = json.loads(await (await http.get(gw.url + "/admin/api/v1/usage/summary", headers=KEY)).content())
        assert (summary["requests"], summary["errors"]) == (3, 2)
        daily = json.loads(await (await http.get(gw.url + "/admin/api/v1/usage/daily", headers=KEY)).content())
        assert daily["data"][0]["errors"] == 2
        series = json.loads(await (await http.get(gw.url + "/admin/api/v1/usage/timeseries", headers=KEY)).content())
        assert sum(row["errors"] for row in series["data"]) == 2
        only = json.loads(await (await http.get(gw.url + "/admin/api/v1/usage/log?outcome=stream_broken",
                                                headers=KEY)).content())
        assert [r["request_id"] for r in only["data"]] == [broken["request_id"]]
        bad = await http.get(gw.url + "/admin/api/v1/usage/log?outcome=nope", headers=KEY)
        assert bad.code == 400 and json.loads(await bad.content())["error"]["param"] == "outcome"
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_request_every_replica_was_too_busy_for_is_a_refused_record(reactor, http, fake, tmp_path):
    """The gateway's own 429 C{replicas_busy} (every replica at C{REPLICA_MAX_CONCURRENCY} past
    C{ROUTING_QUEUE_TIMEOUT}) refused a routed request as its limits do: it is a record of outcome C{refused}, status
    429, 0 tokens and no replica, under the provider and model it waited for (before, none: the refusals of a
    fleet too small for its load were nowhere in its usage)."""
    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1", "GOMODEL_DATA_DIR": str(tmp_path / "d"),
           "REPLICA_MAX_CONCURRENCY": "1", "ROUTING_QUEUE_TIMEOUT": "0.1"}
    gw = await start_gateway(reactor, env)
    try:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        held = Deferred.fromCoroutine(_post(http, gw, "/v1/chat/completions", dict(chat, fake_hold=True)))
        await until(reactor, lambda: any((r.body or {}).get("fake_hold") for r in fake.requests),
                    what="the first request held at the replica")
        response, body = await _post(http, gw, "/v1/chat/completions", chat)
        assert response.code == 429 and json.loads(body)["error"]["code"] == "replicas_busy"
        fake.release_holds()
        assert (await held)[0].code == 200
        busy, served = await _recorded(gw, 2)  # newest first, by their start
        assert (busy["status_code"], busy["outcome"], busy["total_tokens"], busy["input_tokens"], busy["replica"],
                busy["provider_name"], busy["model"], busy["endpoint"]) == (
            429, "refused", 0, 0, None, "vllm", MODEL, "/v1/chat/completions")
        assert (served["outcome"], served["replica"]) == ("ok", 0)
        summary = await gw.service.usage.summary(0, 2e9)
        assert (summary["requests"], summary["errors"], summary["refused"]) == (2, 1, 1)
    finally:
        fake.release_holds()
        await gw.service.stopService()
