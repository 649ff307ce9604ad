"""Prometheus metrics after known traffic, read through the exposition's own parser."""

import json

import pytest
import pytest_twisted
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gomodel.accounting.metrics import forget_process
from tests.rawclient import chat_request, connect
from tests.support import (charge_a_batch_and_a_background_response, dead_base_url, in_thread, openai_client,
                           send_streams_failing_after_200, start_fake, start_gateway, stop_all, until, with_timeout)

MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"
KEY = {"Authorization": "Bearer k1"}


def samples(text):
    """{(name, frozenset(labels)): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(found, name, **labels):
    """The sum of C{name}'s samples whose labels include C{labels}."""
    return sum(v for (n, ls), v in found.items() if n == name and set(labels.items()) <= ls)


async def scrape(http, gw, headers=KEY):
    response = await http.get(gw.url + "/metrics", headers=headers)
    assert response.code == 200, response.code
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain; version=")
    return samples((await response.content()).decode())


@pytest_twisted.ensureDeferred
async def test_metrics_count_requests_tokens_ttft_errors_and_replicas(reactor, http, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(2):
            response = await http.post(gw.url + "/v1/chat/completions", headers=KEY, data=json.dumps(chat).encode())
            answer = json.loads(await response.content())
        streamed = await http.post(gw.url + "/v1/chat/completions", headers=KEY,
                                   data=json.dumps(dict(chat, stream=True)).encode())
        await streamed.content()
        missing = await http.post(gw.url + "/v1/chat/completions", headers=KEY,
                                  data=json.dumps(dict(chat, model="vllm/nope")).encode())
        await missing.content()
        found = await scrape(http, gw)
        labels = {"provider": "vllm", "provider_name": "vllm", "model": MODEL, "endpoint": "/v1/chat/completions"}
        assert value(found, "gomodel_requests_total", status_code="200", stream="false", **labels) == 2
        assert value(found, "gomodel_requests_total", status_code="200", stream="true", **labels) == 1
        assert value(found, "gomodel_requests_total", status_code="404", model="-") == 1
        assert value(found, "gomodel_request_duration_seconds_count", **labels) == 3
        # GoModel's labels, stream too (issue 13: "GoModel's three series with its names and labels")
        assert value(found, "gomodel_request_duration_seconds_count", stream="false", **labels) == 2
        assert value(found, "gomodel_request_duration_seconds_count", stream="true", **labels) == 1
        usage = answer["usage"]
        assert value(found, "gomodel_tokens_total", type="input", model=MODEL) == 3 * usage["prompt_tokens"]
        assert value(found, "gomodel_tokens_total", type="output", model=MODEL) == 3 * usage["completion_tokens"]
        assert value(found, "gomodel_time_to_first_token_seconds_count", model=MODEL) == 1
        assert value(found, "gomodel_requests_in_flight") == 1  # the scrape itself
        assert value(found, "gomodel_replica_up", provider_name="vllm", replica="0") == 1
        assert value(found, "gomodel_replica_state", state="ready") == 1
        assert value(found, "gomodel_replica_in_flight", replica="0") == 0

        fake_broken = dict(chat, stream=True, fake_no_done=True)
        broken = await http.post(gw.url + "/v1/chat/completions", headers=KEY, data=json.dumps(fake_broken).encode())
        try:
            await broken.content()
        except Exception:
            pass  # the body is cut, as it must be
        client = await connect(reactor, gw.port, chat_request(
            dict(chat, stream=True, fake_chunks=50, fake_pace=0.05), headers=KEY))
        await with_timeout(reactor, client.wait_for(b"data:"), 10)
        client.transport.abortConnection()
        await client.lost
        for _ in range(50):  # the record completes once the upstream side is closed too
            found = await scrape(http, gw)
            if value(found, "gomodel_client_disconnects_total", model=MODEL) == 1:
                break
        assert value(found, "gomodel_client_disconnects_total", model=MODEL) == 1
        assert value(found, "gomodel_upstream_errors_total", code="stream_incomplete", model=MODEL) == 1
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_requests_carry_gomodels_status_type(reactor, http, fake):
    """GoModel's C{gomodel_requests_total} has C{status_type} (C{success}, C{error}: a status of 400 or above), the
    label of its error-rate query (C{rate(gomodel_requests_total{status_type="error"}[5m])}); issue 13: "GoModel's
    three series with its names and labels"."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        for body in (chat, dict(chat, fake_status=500, fake_body='{"error": {"message": "boom"}}'),
                     dict(chat, model="vllm/nope")):
            response = await http.post(gw.url + "/v1/chat/completions", headers=KEY, data=json.dumps(body).encode())
            await response.content()
        found = await scrape(http, gw)
        assert value(found, "gomodel_requests_total", status_code="200", status_type="success", model=MODEL) == 1
        assert value(found, "gomodel_requests_total", status_code="500", status_type="error", model=MODEL) == 1
        assert value(found, "gomodel_requests_total", status_code="404", status_type="error", model="-") == 1
        assert value(found, "gomodel_requests_total", status_type="error") == 2
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_requests_in_flight_carry_gomodels_labels(reactor, http, fake):
    """GoModel's C{gomodel_requests_in_flight} is by C{provider} (type), C{endpoint} and C{stream} (its dashboard's
    C{sum(gomodel_requests_in_flight) by (provider)}); issue 13: "GoModel's three series with its names and
    labels". A stream in flight counts under its labels, and goes back to 0 once over."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "fake_chunks": 40, "fake_pace": 0.05}
        client = await connect(reactor, gw.port, chat_request(chat, headers=KEY))
        await with_timeout(reactor, client.wait_for(b"data:"), 10)
        labels = {"provider": "vllm", "endpoint": "/v1/chat/completions", "stream": "true"}
        found = await scrape(http, gw)
        assert value(found, "gomodel_requests_in_flight", **labels) == 1
        assert value(found, "gomodel_requests_in_flight", provider="-", endpoint="/metrics", stream="false") == 1
        assert value(found, "gomodel_requests_in_flight") == 2
        client.transport.abortConnection()
        await client.lost
        for _ in range(50):  # (the request completes once the upstream side is closed too)
            found = await scrape(http, gw)
            if value(found, "gomodel_requests_in_flight", **labels) == 0:
                break
        assert value(found, "gomodel_requests_in_flight", **labels) == 0
        assert value(found, "gomodel_requests_in_flight") == 1  # the scrape itself
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_batch_lines_are_counted_by_state(reactor, http, fake):
    """Issue 13 asks for "batch lines by state": C{gomodel_batch_lines_total{state}} counts each line once it has
    its result, C{completed} (an output) or C{failed} (an error), as the batch's C{request_counts} do."""
    from tests.test_batches import chat_line, start_batch

    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    sdk = openai_client(gw, "k1", timeout=20)
    try:
        found = await scrape(http, gw)
        assert value(found, "gomodel_batch_lines_total", state="completed") == 0  # there from the start
        assert value(found, "gomodel_batch_lines_total", state="failed") == 0
        created = await start_batch(sdk, [chat_line("a"), chat_line("b"), chat_line(
            "bad", fake_status=400, fake_body=json.dumps({"error": {"message": "no", "code": 400}}))])
        await gw.service.batch_runner.settled(created.id)
        batch = await in_thread(sdk.batches.retrieve, created.id)
        assert batch.request_counts.model_dump() == {"total": 3, "completed": 2, "failed": 1}
        found = await scrape(http, gw)
        assert value(found, "gomodel_batch_lines_total", state="completed") == 2
        assert value(found, "gomodel_batch_lines_total", state="failed") == 1
    finally:
        sdk.close()
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_retries_to_another_replica_and_to_another_target_are_counted(reactor, http):
    """A replica that answers 503 sends the request to the provider's other replica (C{to="replica"}); a provider
    that fails sends it to its failover candidate (C{to="target"}), on chat and on Responses alike; one with no
    ready replica is passed over for its candidate before any attempt (no retry: L{gomodel.routing.registry.ready_first})."""
    down, up, other = await start_fake(reactor), await start_fake(reactor), await start_fake(reactor)
    down.steer = {"fake_status": 503}
    rules = {f"vllm-{name}/meta-llama/Llama-3.1-8B-Instruct": ["vllm-c/meta-llama/Llama-3.1-8B-Instruct"]
             for name in "bd"}
    gw = await start_gateway(reactor, {
        "VLLM_BASE_URL": f"{down.base_url},{up.base_url}", "VLLM_B_BASE_URL": down.base_url,
        "VLLM_C_BASE_URL": other.base_url, "VLLM_D_BASE_URL": await dead_base_url(reactor),
        "VLLM_D_MODELS": "meta-llama/Llama-3.1-8B-Instruct", "GOMODEL_MASTER_KEY": "k1",
        "REPLICA_FAILURE_THRESHOLD": "100", "ROUTING_STRATEGY": "round_robin",
        "FAILOVER_RULES_JSON": json.dumps(rules)})
    try:
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/responses", {"input": "hi"})):
            for model in (MODEL, MODEL, "vllm-b/meta-llama/Llama-3.1-8B-Instruct",
                          "vllm-d/meta-llama/Llama-3.1-8B-Instruct"):
                response = await http.post(gw.url + path, data=json.dumps(dict(body, model=model)).encode(),
                                           headers=dict(KEY, **{"Content-Type": "application/json"}))
                assert response.code == 200, (path, model)
                await response.content()
        found = await scrape(http, gw)
        # round robin: one of each two requests to vllm went first to the replica that fails
        assert value(found, "gomodel_upstream_retries_total", provider_name="vllm", to="replica") == 2
        assert value(found, "gomodel_upstream_retries_total", provider_name="vllm-b", to="target") == 2
        assert value(found, "gomodel_upstream_retries_total", provider_name="vllm-d", to="target") == 0
    finally:
        await stop_all(gw, down, up, other)


@pytest_twisted.ensureDeferred
async def test_metrics_need_the_key_unless_told_otherwise_and_can_be_off(reactor, http, fake):
    base = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"}
    gw = await start_gateway(reactor, base)
    try:
        assert (await http.get(gw.url + "/metrics")).code == 401
    finally:
        await gw.service.stopService()
    gw = await start_gateway(reactor, dict(base, METRICS_REQUIRE_KEY="false", METRICS_ENDPOINT="/stats"))
    try:
        page = await http.get(gw.url + "/stats")  # no key
        assert page.code == 200
        assert value(samples((await page.content()).decode()), "gomodel_requests_in_flight") == 1
        slashed = await http.get(gw.url + "/stats/")  # the same page, open too, as /health/ is
        assert slashed.code == 200 and value(samples((await slashed.content()).decode()),
                                             "gomodel_requests_in_flight") == 1
        assert (await http.get(gw.url + "/v1/models")).code == 401  # only the metrics path is open
    finally:
        await gw.service.stopService()
    gw = await start_gateway(reactor, base)
    try:  # another method than GET or HEAD: a 405 that names them (it was the 404 of a route that is not there)
        for method in ("POST", "PUT", "DELETE"):
            refused = await http.request(method, gw.url + "/metrics", headers=KEY)
            assert refused.code == 405 and refused.headers.getRawHeaders("allow") == ["GET, HEAD"]
            assert json.loads(await refused.content())["error"]["code"] == "method_not_allowed"
        assert (await http.head(gw.url + "/metrics", headers=KEY)).code == 200
    finally:
        await gw.service.stopService()
    gw = await start_gateway(reactor, dict(base, METRICS_ENABLED="false"))
    try:
        assert (await http.get(gw.url + "/metrics", headers=KEY)).code == 404
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_scrape_with_a_trailing_slash_counts_under_the_metrics_endpoint(reactor, http, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                       "METRICS_ENDPOINT": "/stats"})
    try:
        for path in ("/stats/", "/stats/"):
            response = await http.get(gw.url + path, headers=KEY)
            assert response.code == 200
            found = samples((await response.content()).decode())
        # one series for the scrape, however it is spelled (it was a second endpoint, "/stats/")
        assert value(found, "gomodel_requests_in_flight", endpoint="/stats") == 1
        assert value(found, "gomodel_requests_total", endpoint="/stats") == 1
        assert {dict(labels)["endpoint"] for name, labels in found if name == "gomodel_requests_total"} == {"/stats"}
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_model_a_provider_does_not_list_is_no_label_while_its_models_are_unknown(reactor, http, fake):
    """A provider whose replicas have not listed their models (down since the start) takes any model name a client
    types: before, each name became series of its own (requests, duration, first token, tokens, errors)."""
    dead = await dead_base_url(reactor)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                       "OPENAI_BASE_URL": dead, "OPENAI_API_KEY": "sk-x"})
    try:
        for name in ("openai/typo-1", "openai/typo-2"):
            response = await http.post(gw.url + "/v1/chat/completions", headers=KEY, data=json.dumps(
                {"model": name, "messages": [{"role": "user", "content": "hi"}]}).encode())
            await response.content()
            assert response.code == 503
        listed = await http.post(gw.url + "/v1/chat/completions", headers=KEY, data=json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode())
        await listed.content()
        found = await scrape(http, gw)
        assert not [labels for _, labels in found if "typo" in dict(labels).get("model", "")]
        assert value(found, "gomodel_requests_total", provider_name="openai", model="-", status_code="503") == 2
        assert value(found, "gomodel_upstream_errors_total", provider_name="openai", model="-",
                     code="no_ready_replica") == 2
        assert value(found, "gomodel_requests_total", model=MODEL, status_code="200") == 1  # a listed one is
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_stream_the_gateway_cut_itself_is_no_upstream_error(reactor, http, fake):
    """HTTP_STREAM_MAX_DURATION is the gateway's own cut, as a drain's and a client that stopped reading are: before,
    each counted in gomodel_upstream_errors_total (stream_incomplete) against the provider."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                       "HTTP_STREAM_MAX_DURATION": "300ms"})
    try:
        client = await connect(reactor, gw.port, chat_request(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "fake_chunks": 100,
             "fake_pace": 0.05}, headers=KEY))
        await with_timeout(reactor, client.lost, 10)
        assert b"ran past its maximum duration" in client.received
        found = await scrape(http, gw)
        assert value(found, "gomodel_requests_total", model=MODEL, status_type="error", stream="true") == 1
        assert value(found, "gomodel_upstream_errors_total") == 0
    finally:
        await gw.service.stopService()
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                       "HTTP_CLIENT_STALL_TIMEOUT": "300ms"})
    try:
        client = await connect(reactor, gw.port, chat_request(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
             "fake_flood": 64 * 1024 * 1024}, headers=KEY))
        client.transport.pauseProducing()  # it reads nothing

        def found():
            gw.service.metrics.flush()
            return samples(generate_latest(gw.service.metrics.registry).decode())

        await until(reactor, lambda: value(found(), "gomodel_requests_total", stream="true") == 1,
                    what="the stalled client's stream cut")
        assert value(found(), "gomodel_upstream_errors_total") == 0
        client.transport.abortConnection()
    finally:
        await gw.service.stopService()


def test_a_dead_workers_live_gauges_are_forgotten(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    for name in ("gauge_livesum_4242.db", "gauge_livesum_4343.db", "counter_4242.db"):
        (tmp_path / name).write_bytes(b"")
    forget_process(4242)
    # The live gauge of 4242 is gone; counters stay (what it counted still counts).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_4242.db", "gauge_livesum_4343.db"]


def test_requests_counted_between_flushes_give_the_series_observe_gives():
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from gomodel.accounting.metrics import DURATION_BUCKETS, GatewayMetrics

    durations = [0.0001, 0.005, 0.0051, 0.3, 0.3, 7.5, 600, 601, 10_000]
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    metrics = GatewayMetrics()
    for i, duration in enumerate(durations):
        metrics(SimpleNamespace(provider_type="vllm", provider="vllm", upstream_model="m", endpoint="/v1/chat/completions",
                                status=200, stream=bool(i % 2), asked_stream=bool(i % 2), duration=duration,
                                first_byte=duration / 2,
                                usage=usage, token_counts=(7, 3, 0, 0), outcome="ok", error=None, key=None,
                                principal=None))
    assert not [s for s in samples(generate_latest(metrics.registry).decode()) if s[0] == "gomodel_requests_total"]
    metrics.flush()  # (and every scrape flushes first)
    found = samples(generate_latest(metrics.registry).decode())
    reference = CollectorRegistry()
    expected = Histogram("gomodel_request_duration_seconds", "x",
                         ("provider", "provider_name", "model", "endpoint", "stream"), buckets=DURATION_BUCKETS,
                         registry=reference)
    for i, duration in enumerate(durations):
        expected.labels("vllm", "vllm", "vllm/m", "/v1/chat/completions", "true" if i % 2 else "false").observe(duration)
    wanted = {k: v for k, v in samples(generate_latest(reference).decode()).items() if not k[0].endswith("_created")}
    assert wanted and {k: found.get(k) for k in wanted} == pytest.approx(wanted)  # sums: rounding aside
    assert value(found, "gomodel_requests_total") == len(durations)
    assert value(found, "gomodel_requests_total", stream="true") == 4
    assert value(found, "gomodel_time_to_first_token_seconds_count") == 4
    assert value(found, "gomodel_time_to_first_token_seconds_sum") == sum(d / 2 for d in durations[1::2])
    assert value(found, "gomodel_tokens_total", type="input") == 7 * len(durations)
    assert value(found, "gomodel_tokens_total", type="output") == 3 * len(durations)
    metrics.flush()  # nothing new: nothing added twice
    assert samples(generate_latest(metrics.registry).decode()) == found


@pytest_twisted.ensureDeferred
async def test_a_stream_the_upstream_broke_or_failed_in_band_is_an_error(reactor, http, fake):
    """GoModel's C{status_type} is C{error} for a request that failed, whatever its status (its error-rate query,
    C{gomodel_requests_total{status_type="error"}}): a stream the upstream broke off, or one in which it sent an
    error event, went out with the status 200 it had sent and is an error all the same (as the access log's
    C{outcome} and C{gomodel_upstream_errors_total} say)."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        await send_streams_failing_after_200(http, gw, KEY, MODEL)
        found = await scrape(http, gw)
        labels = {"model": MODEL, "status_code": "200", "stream": "true"}
        assert value(found, "gomodel_requests_total", status_type="success", **labels) == 1
        assert value(found, "gomodel_requests_total", status_type="error", **labels) == 2
        assert value(found, "gomodel_upstream_errors_total", model=MODEL) == 2
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_stream_request_that_failed_before_its_stream_began_is_labelled_a_stream(reactor, http, fake, tmp_path):
    """GoModel's C{stream} label is the request's: a stream request refused (a rate limit's 429), answered with
    its upstream's error (503) or timed out before its stream began (504) is counted under C{stream="true"}, as
    the access log and its usage record say; it was C{"false"} (no event stream went out), so the streams' error
    rate left out every stream that failed before its first byte."""
    from twisted.logger import globalLogPublisher

    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1", "GOMODEL_DATA_DIR": str(tmp_path / "d"),
           "HTTP_RESPONSE_HEADER_TIMEOUT": "1s", "SET_RATE_LIMIT_TEAM": "rpm=1", "LOG_FORMAT": "json"}
    lines = []
    globalLogPublisher.addObserver(lines.append)
    gw = await start_gateway(reactor, env)
    try:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        team = dict(KEY, **{"X-GoModel-User-Path": "/team"})
        for path, body, headers, status in (
                ("/v1/chat/completions", chat, team, 200), ("/v1/chat/completions", chat, team, 429),
                ("/v1/chat/completions", dict(chat, fake_status=503, fake_body='{"error": {"message": "x"}}'),
                 KEY, 503),
                ("/v1/chat/completions", dict(chat, fake_delay=3), KEY, 504),
                ("/v1/responses", {"model": MODEL, "input": "hi", "stream": True, "fake_delay": 3}, KEY, 504),
                ("/v1/messages", {"model": MODEL, "max_tokens": 5, "stream": True, "fake_delay": 3,
                                  "messages": [{"role": "user", "content": "hi"}]}, KEY, 504)):
            response = await http.post(gw.url + path, headers=headers, data=json.dumps(body).encode())
            await response.content()
            assert response.code == status, (path, status)
        found = await scrape(http, gw)
        assert value(found, "gomodel_requests_total", stream="false", model=MODEL) == 0
        for path, status, count in (("/v1/chat/completions", "200", 1), ("/v1/chat/completions", "429", 1),
                                    ("/v1/chat/completions", "503", 1), ("/v1/chat/completions", "504", 1),
                                    ("/v1/responses", "504", 1), ("/v1/messages", "504", 1)):
            assert value(found, "gomodel_requests_total", stream="true", endpoint=path, status_code=status) == count
        access = [e for e in lines if e.get("log_namespace") == "gomodel.access" and e["path"] != "/metrics"]
        assert [(e["status"], e["stream"]) for e in access] == [
            (200, True), (429, True), (503, True), (504, True), (504, True), (504, True)]
        await gw.service.usage.flush()
        records, _ = await gw.service.store.usage.log(0, 2e9, 100)
        assert sorted((r["endpoint"], r["status_code"], r["stream"]) for r in records) == [
            ("/v1/chat/completions", 200, True), ("/v1/chat/completions", 429, True),  # (the gateway's refusal)
            ("/v1/chat/completions", 503, True),
            ("/v1/chat/completions", 504, True), ("/v1/messages", 504, True), ("/v1/responses", 504, True)]
    finally:
        globalLogPublisher.removeObserver(lines.append)
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_request_refused_at_its_head_is_counted_under_its_route(reactor, http, fake):
    """A request to an inference route refused before its handler ran (a wrong key's 401, a body past
    C{BODY_SIZE_LIMIT}'s 413, a GET's 405) is counted under that route's C{endpoint}, as one its handler refused
    (an invalid body's 400) is: it was C{other}, so a route's error rate left out its refused requests."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                       "BODY_SIZE_LIMIT": "1KB"})
    try:
        chat = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
        for headers, body, status in (({"Authorization": "Bearer nope"}, chat, 401), (KEY, b"{bad", 400),
                                      (KEY, b" " * 2048 + chat, 413)):
            response = await http.post(gw.url + "/v1/chat/completions", headers=headers, data=body)
            await response.content()
            assert response.code == status
        response = await http.get(gw.url + "/v1/chat/completions", headers=KEY)
        await response.content()
        assert response.code == 405
        unkeyed = await http.get(gw.url + "/metrics")
        await unkeyed.content()
        assert unkeyed.code == 401
        found = await scrape(http, gw)
        for status in ("401", "400", "413", "405"):
            assert value(found, "gomodel_requests_total", endpoint="/v1/chat/completions", status_code=status) == 1
        assert value(found, "gomodel_requests_total", endpoint="/metrics", status_code="401") == 1
        assert value(found, "gomodel_requests_total", endpoint="other") == 0
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_tokens_of_batch_lines_and_background_responses_are_counted_as_the_ledger_counts_them(
        reactor, http, fake, tmp_path):
    """C{gomodel_tokens_total} counts what the usage ledger does: a batch line's answer and a background response
    (charged by its watch once over) are recorded apart from any request's end, and were left out of it."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                       "GOMODEL_DATA_DIR": str(tmp_path / "d")})
    sdk = openai_client(gw, "k1", timeout=20)
    try:
        records = await charge_a_batch_and_a_background_response(reactor, gw, fake, sdk, MODEL)
        found = await scrape(http, gw)
        for kind in ("input", "output"):
            assert value(found, "gomodel_tokens_total", type=kind, model=MODEL) == sum(
                r[f"{kind}_tokens"] or 0 for r in records) > 0, kind
        assert {r["endpoint"] for r in records} == {"/v1/chat/completions", "/v1/responses"}
    finally:
        sdk.close()
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_passthrough_request_refused_is_counted_under_the_passthrough_endpoint(reactor, http, fake):
    """A passthrough request refused (a wrong key's 401, an unknown provider's 404, a managed key's 403 on vLLM's
    own metrics) is counted under C{/p/{provider}/{endpoint}}, as one relayed is: it was C{other}."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                       "ENABLE_PASSTHROUGH_ROUTES": "true"})
    try:
        made = await http.post(gw.url + "/admin/api/v1/auth-keys", headers=KEY, data=json.dumps({"name": "t"}).encode())
        managed = {"Authorization": "Bearer " + json.loads(await made.content())["value"]}
        for path, headers, status in (("/p/vllm/v1/models", {"Authorization": "Bearer nope"}, 401),
                                      ("/p/nope/v1/models", KEY, 404), ("/p/vllm/metrics", managed, 403),
                                      ("/p/vllm/v1/models", KEY, 200)):
            response = await http.get(gw.url + path, headers=headers)
            await response.content()
            assert response.code == status, path
        found = await scrape(http, gw)
        for status in ("401", "404", "403", "200"):
            assert value(found, "gomodel_requests_total", endpoint="/p/{provider}/{endpoint}", status_code=status) == 1
        assert value(found, "gomodel_requests_total", endpoint="other", status_code="201") == 1  # (the key made)
        assert value(found, "gomodel_requests_total", endpoint="other") == 1
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_passthrough_stream_request_its_upstream_refused_is_labelled_a_stream(reactor, http, fake):
    """A passthrough request that asks to stream (C{"stream": true}) is a stream for the metrics, as on C{/v1},
    though its upstream answered with an error and no event stream (it was C{stream="false"})."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                       "ENABLE_PASSTHROUGH_ROUTES": "true"})
    try:
        chat = {"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hi"}],
                "stream": True}
        for body, status in ((chat, 200), (dict(chat, fake_status=503, fake_body='{"error": {"message": "x"}}'), 503)):
            response = await http.post(gw.url + "/p/vllm/v1/chat/completions", headers=KEY,
                                       data=json.dumps(body).encode())
            await response.content()
            assert response.code == status
        found = await scrape(http, gw)
        labels = {"endpoint": "/p/{provider}/{endpoint}", "model": MODEL}
        assert value(found, "gomodel_requests_total", stream="true", status_code="200", **labels) == 1
        assert value(found, "gomodel_requests_total", stream="true", status_code="503", **labels) == 1
        assert value(found, "gomodel_requests_total", stream="false", **labels) == 0
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_health_probes_are_not_counted_as_requests(reactor, http, fake):
    """A Kubernetes probe every few seconds (C{/health}, C{/health/ready}, any spelling or method) is no traffic: it
    is in none of the request series (it was counted in C{gomodel_requests_total{endpoint="other"}}, which it
    inflated), as it gets no span; the gateway's own other routes still count under C{other}."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        for path in ("/health", "/health/", "/health/ready", "/health/ready/"):
            assert (await http.get(gw.url + path)).code == 200, path
            assert (await http.head(gw.url + path)).code == 200, path
        assert (await http.post(gw.url + "/health")).code == 405
        assert (await http.get(gw.url + "/admin/api/v1/models", headers=KEY)).code == 200
        found = await scrape(http, gw)
        assert value(found, "gomodel_requests_total", endpoint="other") == 1  # (the admin call)
        assert value(found, "gomodel_request_duration_seconds_count", endpoint="other") == 1
        assert value(found, "gomodel_requests_total") == 1
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_cost_the_ledger_computes_is_counted_by_model_and_managed_key(reactor, http, fake, tmp_path):
    """C{gomodel_cost_total} adds up what the usage ledger's records cost (the pricing table's currency), by
    provider and model as routed, and C{gomodel_auth_key_cost_total} a managed key's; a model without a price
    has no series (there was no cost metric at all)."""
    from tests.test_batches import chat_line, start_batch

    config = tmp_path / "g.yaml"
    config.write_text(f"pricing:\n  {MODEL}: {{input_per_mtok: 2, output_per_mtok: 10, cached_input_per_mtok: 1}}\n")
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                       "GOMODEL_DATA_DIR": str(tmp_path / "d")}, str(config))
    try:
        made = await http.post(gw.url + "/admin/api/v1/auth-keys", headers=KEY, data=json.dumps({"name": "team"}).encode())
        made = json.loads(await made.content())
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        for headers, body in ((KEY, chat), (KEY, dict(chat, stream=True, stream_options={"include_usage": True})),
                              ({"Authorization": "Bearer " + made["value"]}, chat)):
            response = await http.post(gw.url + "/v1/chat/completions", headers=headers, data=json.dumps(body).encode())
            assert response.code == 200
            await response.content()
        sdk = openai_client(gw, "k1", timeout=20)
        try:  # (a batch line's cost too, counted apart from any request's end)
            created = await start_batch(sdk, [chat_line("a")])
            await gw.service.batch_runner.settled(created.id)
        finally:
            sdk.close()
        await gw.service.usage.flush()
        summary = json.loads(await (await http.get(gw.url + "/admin/api/v1/usage/summary", headers=KEY)).content())
        keyed = json.loads(await (await http.get(gw.url + "/admin/api/v1/usage/summary?key=" + made["id"],
                                                 headers=KEY)).content())
        found = await scrape(http, gw)
        assert summary["total_cost"] > 0 and keyed["total_cost"] > 0 and summary["requests"] == 4  # (the batch line's too)
        assert value(found, "gomodel_cost_total", provider="vllm", provider_name="vllm", model=MODEL) == pytest.approx(
            summary["total_cost"])
        assert value(found, "gomodel_auth_key_cost_total", auth_key_id=made["id"], auth_key_name="team") == \
            pytest.approx(keyed["total_cost"])
        assert value(found, "gomodel_cost_total") == pytest.approx(summary["total_cost"])  # (no other series)
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_requests_the_channel_refuses_carry_a_request_id_and_are_counted(reactor, http, fake, access):
    """A request the connection refuses before any route sees it (400 bad HTTP, 414, 431, 408) carries an
    C{X-Request-Id}, is in the access log under it and is counted in C{gomodel_requests_total} (endpoint C{other},
    its status; before: no request id, no log line, no count: a flood of them was invisible)."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        ids = []
        for request_bytes, status in ((b"GET / HTTP/1.1\r\nHost: g\r\nX-Big: " + b"b" * 17000 + b"\r\n\r\n", b"431"),
                                      (b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\nHost: g\r\n\r\n", b"414"),
                                      (b"GET / HTTP/1.1\r\n\r\n", b"400")):
            client = await connect(reactor, gw.port, request_bytes)
            await with_timeout(reactor, client.lost, 5)
            head = bytes(client.received).partition(b"\r\n\r\n")[0]
            assert head.startswith(b"HTTP/1.1 " + status + b" "), head
            found = [line for line in head.split(b"\r\n") if line.lower().startswith(b"x-request-id: ")]
            assert len(found) == 1 and len(found[0]) > len(b"x-request-id: "), head
            ids.append(found[0].partition(b": ")[2].decode())
        assert len(set(ids)) == 3
        logged = {event["request_id"]: event for event in access.events}
        assert all(rid in logged for rid in ids), (ids, logged)
        found = await scrape(http, gw)
        for status in ("431", "414", "400"):
            assert value(found, "gomodel_requests_total", endpoint="other", status_code=status,
                         status_type="error") == 1, status
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_answers_for_the_star_target_carry_a_request_id_and_are_counted(reactor, http, fake, access):
    """C{OPTIONS *} (200) and any other method on C{*} (405), which no route answers, carry an C{X-Request-Id}, are in
    the access log under it and count in C{gomodel_requests_total} (endpoint C{other}), as every answer does (before:
    none of the three)."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        for method, status in ((b"OPTIONS", b"200"), (b"GET", b"405")):
            client = await connect(reactor, gw.port, method + b" * HTTP/1.1\r\nHost: g\r\nX-Request-Id: star-"
                                   + method + b"\r\nConnection: close\r\n\r\n")
            await with_timeout(reactor, client.lost, 5)
            head = bytes(client.received).partition(b"\r\n\r\n")[0]
            assert head.startswith(b"HTTP/1.1 " + status + b" "), head
            assert b"\r\nX-Request-Id: star-" + method + b"\r\n" in head, head
        logged = {event["request_id"]: (event["method"], event["path"], event["status"]) for event in access.events}
        assert logged["star-OPTIONS"] == ("OPTIONS", "*", 200) and logged["star-GET"] == ("GET", "*", 405), logged
        found = await scrape(http, gw)
        assert value(found, "gomodel_requests_total", endpoint="other", status_code="200", status_type="success") == 1
        assert value(found, "gomodel_requests_total", endpoint="other", status_code="405", status_type="error") == 1
    finally:
        await gw.service.stopService()


def test_a_managed_keys_series_add_up_over_flushes_each_type_shown():
    """A managed key's requests (by status) and tokens (every type, at 0 too) add up over flushes; its series
    (kept between flushes) follow a key renamed."""
    from types import SimpleNamespace

    from gomodel.accounting.metrics import GatewayMetrics
    from gomodel.auth.keys import Principal

    metrics = GatewayMetrics()
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}

    def request(principal, status=200):
        metrics(SimpleNamespace(provider_type="vllm", provider="vllm", upstream_model="m", endpoint="/v1/chat/completions",
                                status=status, stream=False, asked_stream=False, duration=0.01, first_byte=0.005,
                                usage=usage, token_counts=(7, 3, 0, 0), outcome="ok" if status < 400 else "error",
                                error=None, key=principal.id, principal=principal))

    key = Principal("k_1", "team")
    for statuses in ((200, 200, 429), (200,)):
        for status in statuses:
            request(key, status)
        metrics.flush()
    request(Principal("k_1", "renamed"))
    metrics.flush()
    found = samples(generate_latest(metrics.registry).decode())
    assert value(found, "gomodel_auth_key_requests_total", auth_key_name="team", status_code="200") == 3
    assert value(found, "gomodel_auth_key_requests_total", auth_key_name="team", status_code="429") == 1
    assert {kind: value(found, "gomodel_auth_key_tokens_total", auth_key_name="team", type=kind)
            for kind in ("input", "output", "cached", "reasoning")} == {"input": 28, "output": 12, "cached": 0,
                                                                         "reasoning": 0}
    assert len([labels for name, labels in found if name == "gomodel_auth_key_tokens_total"
                and ("auth_key_name", "team") in labels]) == 4  # (each type's series, those at 0 too)
    assert value(found, "gomodel_auth_key_requests_total", auth_key_name="renamed", status_code="200") == 1
    assert value(found, "gomodel_auth_key_tokens_total", auth_key_name="renamed", type="input") == 7


def test_the_tokens_of_batch_lines_of_a_model_no_provider_lists_are_no_label():
    """A batch line's or background response's tokens (L{GatewayMetrics.tokens_apart}) were labelled with the model
    as the ledger names it, any name a client typed for a provider whose models are not known: series without bound,
    where the requests' series say C{-}."""
    from gomodel.accounting.metrics import GatewayMetrics

    metrics = GatewayMetrics(listed=lambda provider, model: model == "listed-m")
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    for model in ("openai/typo-1", "openai/typo-2", "openai/listed-m"):
        metrics.tokens_apart("openai", "openai", model, usage, endpoint="/v1/chat/completions")
    metrics.flush()
    found = samples(generate_latest(metrics.registry).decode())
    assert not [labels for _, labels in found if "typo" in dict(labels).get("model", "")]
    assert value(found, "gomodel_tokens_total", model="-", type="input") == 14
    assert value(found, "gomodel_tokens_total", model="openai/listed-m", type="input") == 7


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_while_its_body_arrives_is_counted_and_logged_as_gone(reactor, http, fake, access):
    """A client that sent a request's head and part of its body, then left (an upload given up, a flaky network),
    was in no series and had no access line: its request never reached a route. It counts as a client that left
    (499, gomodel_client_disconnects_total) under its route."""
    from tests.test_files import multipart

    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        made = await http.post(gw.url + "/admin/api/v1/auth-keys", data=b'{"name": "team"}', headers=KEY)
        key = json.loads(await made.content())
        body, content_type = multipart({"purpose": "batch"}, content=b'{"a": 1}\n' * 1000)
        heads = [b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer %s\r\n"
                 b"Content-Length: 500\r\nX-Request-Id: req-chat\r\n\r\n{\"model\": " % key["value"].encode(),
                 b"POST /v1/files HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer k1\r\nContent-Type: %s\r\n"
                 b"Content-Length: %d\r\nX-Request-Id: req-upload\r\n\r\n%s" % (
                     content_type.encode(), len(body), body[:len(body) // 2])]
        for head in heads:
            client = await connect(reactor, gw.port, head)
            await until(reactor, lambda: any(c._receiving is not None and not c._head_open
                                             for c in gw.service.site.channels), what="the body arriving")
            logged = access.next(reactor)
            client.transport.abortConnection()
            event = await logged
            assert (event["status"], event["outcome"]) == (499, "client_gone"), event
        assert {e["request_id"]: e["key"] for e in access.events if e["request_id"].startswith("req-")} == {
            "req-chat": key["id"], "req-upload": "master"}  # (whose key it was, as any request's: its series too)
        found = await scrape(http, gw)
        assert value(found, "gomodel_auth_key_requests_total", auth_key_id=key["id"], status_code="499") == 1
        for endpoint in ("/v1/chat/completions", "other"):  # (the files routes count as "other")
            assert value(found, "gomodel_requests_total", endpoint=endpoint, status_code="499") == 1, endpoint
            assert value(found, "gomodel_client_disconnects_total", endpoint=endpoint) == 1, endpoint
    finally:
        await gw.service.stopService()


# A Prometheus server's Accept header (Prometheus 2.30's: OpenMetrics first, then its text format).
PROMETHEUS_ACCEPT = "application/openmetrics-text; version=0.0.1,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"


@pytest_twisted.ensureDeferred
async def test_a_scrape_gets_openmetrics_where_it_asks_for_it_and_prometheus_text_otherwise(reactor, http, fake):
    """As prometheus_client's own server answers: Prometheus' scrape (its Accept names OpenMetrics) gets
    prometheus_client's OpenMetrics exposition, any other (curl, a text parser) its Prometheus text format."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        response = await http.post(gw.url + "/v1/chat/completions", headers=KEY, data=json.dumps(chat).encode())
        await response.content()
        response = await http.get(gw.url + "/metrics", headers=dict(KEY, Accept=PROMETHEUS_ACCEPT))
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type")[0].startswith("application/openmetrics-text; version=")
        page = (await response.content()).decode()
        assert page.endswith("# EOF\n")
        requests = {family.name: family for family in text_string_to_metric_families(page)}["gomodel_requests"]
        assert [s.value for s in requests.samples if s.name == "gomodel_requests_total"
                and s.labels.get("endpoint") == "/v1/chat/completions"] == [1.0]
        plain = await scrape(http, gw)  # (text/plain; version=..., as before)
        assert value(plain, "gomodel_requests_total", endpoint="/v1/chat/completions") == 1
    finally:
        await gw.service.stopService()
