"""Self-tests of the fake replica fleet (tests/fakes/fleet.py), over real loopback sockets."""

import json
import re
from functools import partial

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived

from tests.fakes.fleet import FakeFleet, FakeReplica, orca_header
from tests.fakes.vllm import CHAT_MODEL
from tests.support import turns_until, until

@pytest_twisted.async_yield_fixture()
async def client(reactor):
    """A treq client without cached connections (replicas go up and down under it)."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield HTTPClient(Agent(reactor, pool=pool))
    await pool.closeCachedConnections()


@pytest_twisted.async_yield_fixture()
async def replica(reactor):
    """One started replica, stopped afterwards; asserts it left no timer behind."""
    fake = await FakeReplica(reactor).start()
    yield fake
    await fake.stop()
    assert not fleet_timers(reactor)


def fleet_timers(reactor):
    return [c for c in reactor.getDelayedCalls()
            if c.active() and getattr(c.func, "__module__", "") == "tests.fakes.fleet"]


def chat_body(content="hello", stream=False, **extra):
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": content}], **extra}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def post(client, replica, path="/chat/completions", body=None, headers=None):
    """POST JSON to the replica; a Deferred (the request is sent at once)."""
    return client.post(replica.base_url + path, data=json.dumps(body or chat_body()).encode(),
                             headers={"content-type": ["application/json"], **(headers or {})})


wait_until = partial(until, limit=3.0)


def parse_metrics(page):
    """{(name, frozenset(labels)): value} of a Prometheus text page."""
    values = {}
    for line in page.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$', line)
        assert m, line
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        values[(m.group(1), labels)] = float(m.group(4))
    return values


def sample(values, name, **labels):
    return sum(v for (n, ls), v in values.items() if n == name and set(labels.items()) <= set(ls))


async def scrape(client, replica):
    response = await client.get(replica.root_url + "/metrics")
    assert response.code == 200
    text = (await response.content()).decode()
    return text, parse_metrics(text)


@pytest_twisted.ensureDeferred
async def test_models_and_health(client, replica):
    response = await client.get(replica.base_url + "/models")
    assert response.code == 200
    assert [m["id"] for m in (await response.json())["data"]] == [CHAT_MODEL]
    health = await client.get(replica.root_url + "/health")
    assert health.code == 200 and await health.content() == b""
    assert replica.base_url == f"http://127.0.0.1:{replica.port_number}/v1"


@pytest_twisted.ensureDeferred
async def test_plain_chat_is_recorded(client, replica):
    response = await post(client, replica, body=chat_body(marker="a"), headers={"x-trace": ["t1"]})
    assert response.code == 200
    answer = await response.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == "héhéhé"
    assert answer["usage"]["completion_tokens"] == 3
    assert replica.served == 1 and replica.in_flight == 0
    [record] = replica.received_by_body_field("marker", "a")
    assert record.path == b"/v1/chat/completions" and record.body["messages"][0]["content"] == "hello"
    assert replica.requests_with_header("x-trace") == [record]
    assert await record.closed == ("finished", record.closed.result[1]) and record.finished
    assert replica.generation_tokens == 3


@pytest_twisted.ensureDeferred
async def test_streamed_chat_has_usage_and_done(client, replica):
    replica.token_interval = 0.01
    replica.chunks = 4
    response = await post(client, replica, body=chat_body(stream=True))
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream; charset=utf-8"]
    events = [e[len("data: "):] for e in (await response.text()).split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:5]] == ["hé"] * 4
    assert chunks[4]["choices"][0]["finish_reason"] == "length"
    assert chunks[5]["choices"] == [] and chunks[5]["usage"]["completion_tokens"] == 4
    assert replica.generation_tokens == 4


@pytest_twisted.ensureDeferred
async def test_completions_and_embeddings(client, replica):
    response = await post(client, replica, "/completions", {"model": CHAT_MODEL, "prompt": "hi"})
    assert (await response.json())["choices"][0]["text"] == "héhéhé"
    response = await post(client, replica, "/embeddings", {"model": CHAT_MODEL, "input": ["a", "b"]})
    assert len((await response.json())["data"]) == 2
    assert replica.served == 2


@pytest_twisted.ensureDeferred
async def test_latency_grows_with_load(reactor, client, replica):
    # Alone a request waits 0.05 + 0.25 s; of four sent at once the last waits 0.05 + 4 * 0.25 s, and at least
    # 0.05 + 3 * 0.25 s (had it come after the first's 0.3 s). Waits are timed by the clock from below (a timer
    # never fires early), the alone request's answer from above in the reactor's 20 ms ticks, fewer than 35 (0.7 s
    # on an idle host), where a loaded host's late timers and pauses count one tick each (a 0.7 s wall-clock bound
    # left it 0.4 s).
    replica.latency = 0.05
    replica.per_request_cost = 0.25
    _, ticks = await turns_until(reactor, post(client, replica))
    alone = replica.last_request()
    alone_wait = alone.first_byte_at - alone.time
    responses = [post(client, replica, body=chat_body(f"r{i}")) for i in range(4)]
    for d in responses:
        await d
    loaded = max(r.first_byte_at - r.time for r in replica.requests[-4:])
    assert alone_wait > 0.28 and ticks < 35 and loaded > 0.79, (alone_wait, ticks, loaded)


@pytest_twisted.ensureDeferred
async def test_metrics_page_reflects_in_flight_and_queue(reactor, client, replica):
    replica.latency = 0.3
    replica.max_running = 2
    pending = [post(client, replica, body=chat_body(f"r{i}")) for i in range(3)]
    await wait_until(reactor, lambda: replica.in_flight == 3)
    text, values = await scrape(client, replica)
    assert len(text) > 60_000
    assert "# TYPE vllm:num_requests_running gauge" in text
    assert "# TYPE vllm:generation_tokens_total counter" in text
    assert "# TYPE vllm:e2e_request_latency_seconds histogram" in text
    assert sample(values, "vllm:num_requests_running", engine="0", model_name=CHAT_MODEL) == 2
    assert sample(values, "vllm:num_requests_waiting", engine="0") == 1
    assert sample(values, "vllm:kv_cache_usage_perc", engine="0") == 1.0
    assert sample(values, "process_start_time_seconds") == pytest.approx(replica.start_time)
    for d in pending:
        await d
    _, values = await scrape(client, replica)
    assert sample(values, "vllm:num_requests_running") == 0
    assert sample(values, "vllm:generation_tokens_total") == 9
    assert sample(values, "vllm:e2e_request_latency_seconds_count") == 3
    assert sample(values, "vllm:request_success_total", finished_reason="length") == 3
    replica.metrics = {"running": 7, "generation_tokens": 123, "kv_cache_usage": 0.25, "start_time": 1.5e9}
    _, values = await scrape(client, replica)
    assert sample(values, "vllm:num_requests_running") == 7
    assert sample(values, "vllm:generation_tokens_total") == 123
    assert sample(values, "vllm:kv_cache_usage_perc") == 0.25
    assert sample(values, "process_start_time_seconds") == 1.5e9


@pytest_twisted.ensureDeferred
async def test_two_engines(reactor, client):
    fake = await FakeReplica(reactor, engines=2).start()
    try:
        fake.latency = 0.3
        pending = [post(client, fake, body=chat_body(f"r{i}")) for i in range(3)]
        await wait_until(reactor, lambda: fake.in_flight == 3)
        text, values = await scrape(client, fake)
        assert len(text) > 100_000
        assert sample(values, "vllm:num_requests_running", engine="0") == 2
        assert sample(values, "vllm:num_requests_running", engine="1") == 1
        for d in pending:
            await d
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_refuse_then_accept_on_the_same_port(client, replica):
    port = replica.port_number
    await replica.refuse()
    with pytest.raises(ConnectionRefusedError):
        await client.get(replica.root_url + "/health")
    await replica.accept()
    assert replica.port_number == port
    assert (await client.get(replica.root_url + "/health")).code == 200


@pytest_twisted.ensureDeferred
async def test_fail_status(client, replica):
    replica.fail_status = 503
    response = await post(client, replica)
    assert response.code == 503
    error = (await response.json())["error"]
    assert error["code"] == 503 and error["type"] == "Service Unavailable"
    assert (await client.get(replica.root_url + "/health")).code == 200
    replica.fail_status = None
    assert (await post(client, replica)).code == 200


@pytest_twisted.ensureDeferred
async def test_health_status(client, replica):
    replica.health_status = 503
    assert (await client.get(replica.root_url + "/health")).code == 503


@pytest_twisted.ensureDeferred
async def test_hang_keeps_health_and_freezes_tokens(reactor, client, replica):
    replica.hang = True
    pending = post(client, replica)
    answered = []
    pending.addBoth(lambda result: answered.append(result) or result)
    await wait_until(reactor, lambda: replica.in_flight == 1)
    assert (await client.get(replica.root_url + "/health")).code == 200
    _, first = await scrape(client, replica)
    await deferLater(reactor, 0.1, lambda: None)
    _, second = await scrape(client, replica)
    assert sample(first, "vllm:num_requests_running") == sample(second, "vllm:num_requests_running") == 1
    assert sample(first, "vllm:generation_tokens_total") == sample(second, "vllm:generation_tokens_total") == 0
    assert not answered
    pending.cancel()
    with pytest.raises((CancelledError, ResponseNeverReceived)):
        await pending
    record = replica.inference_requests[-1]
    assert (await record.closed)[0] == "lost"
    assert replica.running == 1  # the stuck engine never processed the abort
    replica.hang = False
    assert replica.running == 0
    assert (await post(client, replica)).code == 200


@pytest_twisted.ensureDeferred
async def test_hang_freezes_a_stream_then_releases_it(reactor, client, replica):
    replica.token_interval = 0.05
    replica.chunks = 5
    response = await post(client, replica, body=chat_body(stream=True))
    await wait_until(reactor, lambda: replica.generation_tokens >= 1)
    replica.hang = True
    frozen = replica.generation_tokens
    await deferLater(reactor, 0.15, lambda: None)
    assert replica.generation_tokens == frozen < 5
    replica.hang = False
    assert (await response.text()).endswith("data: [DONE]\n\n")
    assert replica.generation_tokens == 5


@pytest_twisted.ensureDeferred
async def test_restart(reactor, client, replica):
    await post(client, replica)
    before = replica.start_time
    replica.latency = 5
    pending = post(client, replica)
    await wait_until(reactor, lambda: replica.in_flight == 1)
    replica.restart(models=["other/model"])
    record = replica.inference_requests[-1]
    assert (await record.closed)[0] == "lost"
    with pytest.raises(Exception):
        await pending
    _, values = await scrape(client, replica)
    assert sample(values, "process_start_time_seconds") > before
    assert sample(values, "vllm:generation_tokens_total") == 0
    assert sample(values, "vllm:num_requests_running") == 0
    models = await (await client.get(replica.base_url + "/models")).json()
    assert [m["id"] for m in models["data"]] == ["other/model"]
    assert not fleet_timers(reactor)


@pytest_twisted.ensureDeferred
async def test_prefix_cache_hit_answers_earlier(reactor, client, replica):
    # A hit waits 0.2 s of the miss's 1 s. The miss's wait is timed by the clock (a timer never fires early); the
    # hit's answer in the reactor's 20 ms ticks, fewer than 30 (0.6 s on an idle host), where a loaded host's late
    # timers and pauses count one tick each (a 0.6 s wall-clock bound left it 0.4 s).
    replica.prefix_cache = True
    replica.latency = 1.0
    shared = "You are a helpful assistant. " * 4
    await post(client, replica, body=chat_body(shared + "first question"))
    _, ticks = await turns_until(reactor, post(client, replica, body=chat_body(shared + "second question")))
    miss, hit = replica.inference_requests
    assert (miss.prefix_hit, hit.prefix_hit) == (False, True)
    assert (replica.prefix_hits, replica.prefix_misses) == (1, 1)
    assert miss.first_byte_at - miss.time > 0.6  # its 1 s
    assert ticks < 30, f"the hit answered after {ticks} ticks of 20 ms"  # sooner than a miss's first byte


@pytest_twisted.ensureDeferred
async def test_load_header_is_vllms_orca_report(reactor, client, replica):
    response = await post(client, replica, headers={"endpoint-load-metrics-format": ["json"]})
    # The request itself is running while its answer is built: kv = 0.05 per running request.
    assert response.headers.getRawHeaders("endpoint-load-metrics") == [
        'JSON {"named_metrics": {"num_requests_waiting": 0.0, "kv_cache_usage_perc": 0.05}}']
    replica.metrics = {"waiting": 3, "kv_cache_usage": 0.5}
    response = await post(client, replica, headers={"endpoint-load-metrics-format": ["TEXT"]})
    assert response.headers.getRawHeaders("endpoint-load-metrics") == [
        "TEXT named_metrics.num_requests_waiting=3.0, named_metrics.kv_cache_usage_perc=0.5"]
    for headers, body in (({}, None), ({"endpoint-load-metrics-format": ["xml"]}, None),
                          ({"endpoint-load-metrics-format": ["json"]}, chat_body(stream=True))):
        response = await post(client, replica, body=body, headers=headers)
        await response.content()
        assert not response.headers.hasHeader("endpoint-load-metrics")
    replica.load_header = False
    response = await post(client, replica, headers={"endpoint-load-metrics-format": ["json"]})
    assert not response.headers.hasHeader("endpoint-load-metrics")


def test_orca_header_with_two_engines_keeps_the_last_value():
    metrics = [("num_requests_waiting", 1.0), ("num_requests_waiting", 2.0),
               ("kv_cache_usage_perc", 0.1), ("kv_cache_usage_perc", 0.2)]
    assert orca_header("Json", metrics) == \
        'JSON {"named_metrics": {"num_requests_waiting": 2.0, "kv_cache_usage_perc": 0.2}}'
    assert orca_header("text", metrics) == (
        "TEXT named_metrics.num_requests_waiting=1.0, named_metrics.num_requests_waiting=2.0, "
        "named_metrics.kv_cache_usage_perc=0.1, named_metrics.kv_cache_usage_perc=0.2")
    assert orca_header("", metrics) is None and orca_header("yaml", metrics) is None


@pytest_twisted.ensureDeferred
async def test_fleet_distribution_and_cleanup(reactor, client):
    fleet = await FakeFleet(reactor, 3, latency=0.01).start()
    try:
        assert fleet.env_value == ",".join(fleet.base_urls) and len(fleet) == 3
        assert len(set(fleet.base_urls)) == 3
        for index, count in ((0, 2), (2, 1)):
            for _ in range(count):
                assert (await post(client, fleet[index])).code == 200
        await client.get(fleet[1].root_url + "/metrics")
        assert fleet.distribution() == [2, 0, 1]
        fleet.set(hang=True)
        pending = post(client, fleet[1])
        await wait_until(reactor, lambda: fleet[1].in_flight == 1)
        fleet[0].latency = 10
        slow = post(client, fleet[0])
        await wait_until(reactor, lambda: fleet_timers(reactor) or fleet[0].in_flight == 1)
    finally:
        await fleet.stop()
    assert not fleet_timers(reactor)
    for d in (pending, slow):
        with pytest.raises(Exception):
            await d
