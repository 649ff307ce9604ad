"""OpenTelemetry end to end: the real gateway exporting over OTLP/HTTP to a real receiver on loopback.

Each test starts an L{OTLPReceiver}, points the SDK's own C{OTEL_*}
variables at it (the process environment, where the SDK reads them), starts
a gateway with C{OTEL_ENABLED=true} in front of fake vLLM replicas, sends
traffic with the official openai SDK or treq, stops the gateway (the stop
flushes both providers) and reads what the receiver decoded: no polling, no
sleeps. A subprocess checks that with OTEL off nothing of OpenTelemetry is
even imported.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import pytest_twisted
import treq

from tests.fakes.fleet import FakeFleet
from tests.fakes.otlp import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, STATUS_ERROR, STATUS_UNSET, OTLPReceiver
from tests.fakes.vllm import CHAT_MODEL
from tests.gateway_process import exited, killed, ready_port, twistd_gateway
from tests import rawclient
from tests.test_audio import form
from tests.support import (charge_a_batch_and_a_background_response, in_thread, openai_client, start_fake,
                           start_gateway, with_timeout)

MODEL = "vllm/" + CHAT_MODEL
MASTER_KEY = "sk-gateway-master-5ecret"
UPSTREAM_KEY = "sk-upstream-vllm-5ecret"
COLLECTOR_TOKEN = "collector-token-5ecret"
PROMPT = "PROMPT-TEXT-never-exported"
COMPLETION = "COMPLETION-TEXT-never-exported"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def otel_env(monkeypatch):
    """The SDK's standard variables, as an operator would set them (the receiver's URL comes later)."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"x-collector-token={COLLECTOR_TOKEN}")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")  # only the flush at stop exports metrics
    return monkeypatch


class Setup:
    """A receiver, a fleet and a gateway exporting to the receiver; L{stop} flushes and stops all."""

    def __init__(self, reactor, monkeypatch):
        self.reactor = reactor
        self.monkeypatch = monkeypatch
        self._stops = []
        self.gateway = None

    async def start(self, replicas=2, env=None, single=False):
        self.receiver = await OTLPReceiver(self.reactor).start()
        self._stops.append(self.receiver.stop)
        self.monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", self.receiver.url)
        if single:
            self.fleet = [await start_fake(self.reactor, api_key=UPSTREAM_KEY)]
            self._stops.append(self.fleet[0].stop)
            urls = self.fleet[0].base_url
        else:
            self.fleet = await FakeFleet(self.reactor, replicas, api_key=UPSTREAM_KEY).start()
            self._stops.append(self.fleet.stop)
            urls = self.fleet.env_value
        self.gateway = await start_gateway(self.reactor, {
            "VLLM_BASE_URL": urls, "VLLM_API_KEY": UPSTREAM_KEY, "GOMODEL_MASTER_KEY": MASTER_KEY,
            "OTEL_ENABLED": "true", "REPLICA_FAILURE_THRESHOLD": "1000", "ROUTING_STRATEGY": "round_robin",
            **(env or {})})
        return self

    async def stop_gateway(self):
        """Stop the gateway: its drain, then the flush of every span and metric."""
        gateway, self.gateway = self.gateway, None
        if gateway is not None:
            await gateway.service.stopService()

    async def close(self):
        await self.stop_gateway()
        while self._stops:
            await self._stops.pop()()

    def sdk(self):
        return openai_client(self.gateway, MASTER_KEY)

    def server_span(self, request_id):
        [span] = [s for s in self.receiver.spans()
                  if s.kind == SPAN_KIND_SERVER and s.attributes.get("gomodel.request_id") == request_id]
        return span

    def attempts(self, server_span):
        """The client spans under C{server_span}, by attempt number."""
        children = [s for s in self.receiver.spans() if s.parent_id == server_span.span_id]
        assert all(s.kind == SPAN_KIND_CLIENT for s in children)
        return sorted(children, key=lambda s: s.attributes["gomodel.attempt"])


@pytest_twisted.async_yield_fixture()
async def otel(reactor, otel_env):
    setup = Setup(reactor, otel_env)
    try:
        yield setup
    finally:
        await setup.close()


def chat(**extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "fake_text": COMPLETION, **extra}


def upstream_traceparent(fleet, request_id):
    """The C{traceparent} the replicas got with the request C{request_id} (one value per request sent)."""
    return [r.header(b"traceparent") for replica in fleet for r in replica.requests
            if r.method == b"POST" and r.header(b"x-request-id") == request_id]


def parent_of(traceparent):
    """C{(trace id, parent span id, sampled)} of a W3C C{traceparent} value."""
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id, bool(int(flags, 16) & 1)


# -- spans ----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_chat_request_is_a_server_span_continuing_the_clients_trace_with_a_client_span(otel):
    await otel.start()
    client = otel.sdk()
    try:
        raw = await in_thread(client.chat.completions.with_raw_response.create, **_sdk_chat(), extra_headers={
            "x-request-id": "req-chat", "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    finally:
        client.close()
    answer = raw.parse()
    replica = int(raw.headers["x-gomodel-replica"])
    [sent] = upstream_traceparent(otel.fleet, "req-chat")
    await otel.stop_gateway()

    server = otel.server_span("req-chat")
    assert server.name == "POST /v1/chat/completions"
    assert server.trace_id == CLIENT_TRACE and server.parent_id == CLIENT_SPAN  # the client's trace goes on
    assert server.status == STATUS_UNSET
    assert server.resource["service.name"] == "gomodel"  # OTEL_SERVICE_NAME unset
    assert server.resource["deployment.environment.name"] == "test"  # OTEL_RESOURCE_ATTRIBUTES
    assert server.scope == "gomodel"
    a = server.attributes
    assert a["http.request.method"] == "POST" and a["url.path"] == "/v1/chat/completions"
    assert a["http.route"] == "/v1/chat/completions" and a["http.response.status_code"] == 200
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "vllm"
    assert a["gomodel.provider"] == "vllm" and a["gomodel.replica"] == replica
    assert a["gen_ai.request.model"] == MODEL and a["gen_ai.response.model"] == CHAT_MODEL
    assert a["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens == 3
    assert a["gomodel.stream"] is False and "error.type" not in a

    [attempt] = otel.attempts(server)
    assert attempt.trace_id == CLIENT_TRACE
    assert attempt.name == f"chat {CHAT_MODEL}" and attempt.status == STATUS_UNSET
    b = attempt.attributes
    assert b["gomodel.attempt"] == 1 and "gomodel.retry.reason" not in b
    assert b["gomodel.replica"] == replica and b["http.response.status_code"] == 200
    assert b["gen_ai.request.model"] == CHAT_MODEL and b["gen_ai.provider.name"] == "vllm"
    assert b["server.address"] == "127.0.0.1" and b["server.port"] == otel.fleet[replica].port_number
    # The upstream got the client span's context: vLLM's own spans join the same trace.
    assert parent_of(sent) == (CLIENT_TRACE, attempt.span_id, True)


@pytest_twisted.ensureDeferred
async def test_the_probes_and_the_scrape_get_no_span_with_or_without_a_trailing_slash(otel, http):
    await otel.start(single=True)
    auth = {"Authorization": f"Bearer {MASTER_KEY}"}
    for path in ("/health", "/health/", "/health/ready", "/health/ready/", "/metrics", "/metrics/", "/v1/models"):
        response = await http.get(otel.gateway.url + path, headers=auth)
        await treq.content(response)
        assert response.code == 200, path
    await otel.stop_gateway()
    served = [s.attributes["url.path"] for s in otel.receiver.spans() if s.kind == SPAN_KIND_SERVER]
    assert served == ["/v1/models"]


@pytest_twisted.ensureDeferred
async def test_a_failover_is_two_client_spans_the_first_with_the_error(otel, http):
    await otel.start()
    otel.fleet[0].fail_status = 503
    failed_over = None
    for i in range(4):  # round robin: one of the first two starts on the failing replica
        response = await http.post(otel.gateway.url + "/v1/chat/completions", json=chat(fake_marker=f"m{i}"),
                                   headers={"authorization": f"Bearer {MASTER_KEY}", "x-request-id": f"req-{i}"})
        assert response.code == 200, await treq.content(response)
        await treq.content(response)
        if len(upstream_traceparent(otel.fleet, f"req-{i}")) == 2:
            failed_over = f"req-{i}"
            break
    assert failed_over is not None
    sent = upstream_traceparent(otel.fleet, failed_over)
    await otel.stop_gateway()

    server = otel.server_span(failed_over)
    assert server.status == STATUS_UNSET and server.attributes["http.response.status_code"] == 200
    assert server.attributes["gomodel.replica"] == 1 and server.attributes["gomodel.attempts"] == 2
    first, second = otel.attempts(server)
    assert {first.trace_id, second.trace_id} == {server.trace_id}  # one trace
    assert first.attributes["gomodel.replica"] == 0 and first.attributes["gomodel.attempt"] == 1
    assert first.attributes["http.response.status_code"] == 503
    assert first.status == STATUS_ERROR and first.attributes["error.type"] == "503"
    assert second.attributes["gomodel.replica"] == 1 and second.attributes["gomodel.attempt"] == 2
    assert second.attributes["gomodel.retry.reason"] == "503"  # why the attempt before failed
    assert second.status == STATUS_UNSET and second.attributes["http.response.status_code"] == 200
    # Each attempt sent its own span's context upstream.
    assert [parent_of(value) for value in sent] == [(server.trace_id, first.span_id, True),
                                                    (server.trace_id, second.span_id, True)]


@pytest_twisted.ensureDeferred
async def test_an_unreachable_replica_is_a_client_span_with_its_error_code(otel, reactor):
    await otel.start()
    await otel.fleet[0].refuse()
    client = otel.sdk()
    try:
        for i in range(2):
            await in_thread(client.chat.completions.create, **_sdk_chat(), extra_headers={"x-request-id": f"r{i}"})
    finally:
        client.close()
    await otel.stop_gateway()
    retried = [otel.server_span(f"r{i}") for i in range(2) if len(otel.attempts(otel.server_span(f"r{i}"))) == 2]
    assert retried, "round robin never tried the refusing replica"
    first, second = otel.attempts(retried[0])
    assert first.status == STATUS_ERROR and first.attributes["error.type"] == "upstream_unreachable"
    assert "http.response.status_code" not in first.attributes
    assert second.attributes["gomodel.retry.reason"] == "upstream_unreachable"


@pytest_twisted.ensureDeferred
async def test_a_stream_has_its_tokens_and_time_to_first_chunk(otel):
    await otel.start(replicas=1)
    client = otel.sdk()
    try:
        def consume():
            stream = client.chat.completions.create(**_sdk_chat(), stream=True, stream_options={"include_usage": True},
                                                    extra_headers={"x-request-id": "req-stream"})
            return list(stream)
        chunks = await in_thread(consume)
    finally:
        client.close()
    usage = chunks[-1].usage
    await otel.stop_gateway()

    server = otel.server_span("req-stream")
    a = server.attributes
    assert a["gomodel.stream"] is True and server.status == STATUS_UNSET
    assert a["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert a["gomodel.time_to_first_byte"] > 0
    [attempt] = otel.attempts(server)
    assert attempt.status == STATUS_UNSET
    # The client span lasts as long as the upstream's answer: it ends after the stream, inside the server span.
    assert server.proto.start_time_unix_nano <= attempt.proto.start_time_unix_nano
    assert attempt.proto.end_time_unix_nano <= server.proto.end_time_unix_nano

    [first_chunk] = otel.receiver.points("gen_ai.client.operation.time_to_first_chunk")
    assert first_chunk.count == 1 and 0 < first_chunk.sum <= a["gomodel.time_to_first_byte"] + 1e-6
    assert first_chunk.unit == "s"


@pytest_twisted.ensureDeferred
async def test_a_broken_stream_is_an_error_on_both_spans(otel, http):
    await otel.start(single=True)
    response = await http.post(otel.gateway.url + "/v1/chat/completions",
                               json=chat(stream=True, fake_chunks=5, fake_die_after=3, fake_pace=0.02),
                               headers={"authorization": f"Bearer {MASTER_KEY}", "x-request-id": "req-broken"})
    try:
        await treq.content(response)
    except Exception:
        pass  # the body never ends cleanly: that is the point
    await otel.stop_gateway()
    server = otel.server_span("req-broken")
    assert server.status == STATUS_ERROR and server.attributes["error.type"] == "stream_incomplete"
    [attempt] = otel.attempts(server)
    assert attempt.status == STATUS_ERROR and attempt.attributes["error.type"] == "stream_incomplete"
    [duration] = otel.receiver.points("gen_ai.client.operation.duration")
    assert duration.attributes["error.type"] == "stream_incomplete"


@pytest_twisted.ensureDeferred
async def test_a_stream_with_the_upstreams_error_event_is_an_error_on_both_spans(otel, http):
    """vLLM's error event inside a stream it then ends ([DONE]): the spans and the duration say
    upstream_stream_error, as the access log and C{gomodel_upstream_errors_total} do (before: no error.type,
    spans unset, as for a stream that went well)."""
    await otel.start(single=True)
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": CHAT_MODEL,
             "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}
    error = {"error": {"message": "engine failed", "type": "InternalServerError", "code": 500}}
    response = await http.post(otel.gateway.url + "/v1/chat/completions",
                               json=chat(stream=True, fake_sse=[json.dumps(chunk), json.dumps(error), "[DONE]"]),
                               headers={"authorization": f"Bearer {MASTER_KEY}", "x-request-id": "req-in-band"})
    content = await treq.content(response)
    assert response.code == 200 and b"engine failed" in content and content.endswith(b"data: [DONE]\n\n")
    await otel.stop_gateway()
    server = otel.server_span("req-in-band")
    assert server.status == STATUS_ERROR and server.attributes["error.type"] == "upstream_stream_error"
    assert server.attributes["http.response.status_code"] == 200
    [attempt] = otel.attempts(server)
    assert attempt.status == STATUS_ERROR and attempt.attributes["error.type"] == "upstream_stream_error"
    [duration] = otel.receiver.points("gen_ai.client.operation.duration")
    assert duration.attributes["error.type"] == "upstream_stream_error"


@pytest_twisted.ensureDeferred
async def test_a_passthrough_stream_with_the_upstreams_error_event_is_an_error_on_both_spans(otel, http):
    """As on /v1: vLLM's error event in a stream relayed through /p/vllm (before: both spans unset)."""
    await otel.start(single=True)
    error = {"error": {"message": "engine failed", "type": "InternalServerError", "code": 500}}
    response = await http.post(otel.gateway.url + "/p/vllm/v1/chat/completions",
                               json={"model": CHAT_MODEL, "stream": True, "fake_sse": [json.dumps(error), "[DONE]"]},
                               headers={"authorization": f"Bearer {MASTER_KEY}", "x-request-id": "req-passed"})
    content = await treq.content(response)
    assert response.code == 200 and b"engine failed" in content and content.endswith(b"data: [DONE]\n\n")
    await otel.stop_gateway()
    server = otel.server_span("req-passed")
    assert server.status == STATUS_ERROR and server.attributes["error.type"] == "upstream_stream_error"
    [attempt] = otel.attempts(server)
    assert attempt.status == STATUS_ERROR and attempt.attributes["error.type"] == "upstream_stream_error"


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_mid_stream_is_an_error_on_both_spans(otel, reactor):
    await otel.start(single=True)
    client = await rawclient.connect(reactor, otel.gateway.port, rawclient.chat_request(
        chat(stream=True, fake_chunks=200, fake_pace=0.02),
        {"Authorization": f"Bearer {MASTER_KEY}", "X-Request-Id": "req-gone"}))
    await with_timeout(reactor, client.wait_for(b'"content":"'), 5)
    upstream = otel.fleet[0].last_request()
    client.transport.abortConnection()
    await with_timeout(reactor, upstream.closed, 5)  # the gateway closed the upstream's connection
    await otel.stop_gateway()
    server = otel.server_span("req-gone")
    assert server.status == STATUS_ERROR and server.attributes["error.type"] == "client_gone"
    assert server.attributes["http.response.status_code"] == 499
    [attempt] = otel.attempts(server)
    assert attempt.status == STATUS_ERROR and attempt.attributes["error.type"] == "cancelled"
    assert attempt.attributes["http.response.status_code"] == 200


@pytest_twisted.ensureDeferred
async def test_an_upstream_5xx_is_an_error_a_client_4xx_is_not(otel, http):
    await otel.start(replicas=1, env={"ROUTING_MAX_ATTEMPTS": "1"})
    headers = {"authorization": f"Bearer {MASTER_KEY}"}
    otel.fleet[0].fail_status = 500
    response = await http.post(otel.gateway.url + "/v1/chat/completions", json=chat(),
                               headers={**headers, "x-request-id": "req-500"})
    assert response.code == 500
    await treq.content(response)
    otel.fleet[0].fail_status = None
    response = await http.post(otel.gateway.url + "/v1/chat/completions", json=chat(model="vllm/no-such-model"),
                               headers={**headers, "x-request-id": "req-404"})
    assert response.code == 404
    await treq.content(response)
    await otel.stop_gateway()
    failed = otel.server_span("req-500")
    assert failed.status == STATUS_ERROR and failed.attributes["http.response.status_code"] == 500
    [attempt] = otel.attempts(failed)
    assert attempt.status == STATUS_ERROR and attempt.attributes["error.type"] == "500"
    unknown = otel.server_span("req-404")
    assert unknown.status == STATUS_UNSET and unknown.attributes["http.response.status_code"] == 404
    assert unknown.attributes["error.type"] == "model_not_found" and otel.attempts(unknown) == []


@pytest_twisted.ensureDeferred
async def test_a_stream_request_that_failed_before_its_stream_began_is_a_stream(otel, http):
    """C{gomodel.stream} is the request's, as the metrics' C{stream} label and the access log's are (GoModel's
    C{gen_ai.request.stream}): a stream request its upstream answered with a 500 is one (it said False)."""
    await otel.start(replicas=1, env={"ROUTING_MAX_ATTEMPTS": "1"})
    otel.fleet[0].fail_status = 500
    response = await http.post(otel.gateway.url + "/v1/chat/completions", json=chat(stream=True),
                               headers={"authorization": f"Bearer {MASTER_KEY}", "x-request-id": "req-stream-500"})
    assert response.code == 500
    await treq.content(response)
    await otel.stop_gateway()
    failed = otel.server_span("req-stream-500")
    assert failed.attributes["http.response.status_code"] == 500 and failed.attributes["gomodel.stream"] is True


@pytest_twisted.ensureDeferred
async def test_a_trace_the_sampler_drops_exports_no_span_but_still_goes_upstream_and_counts(otel, http):
    otel.monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    await otel.start(replicas=1)
    response = await http.post(otel.gateway.url + "/v1/chat/completions", json=chat(),
                               headers={"authorization": f"Bearer {MASTER_KEY}", "x-request-id": "req-dropped"})
    assert response.code == 200
    await treq.content(response)
    [sent] = upstream_traceparent(otel.fleet, "req-dropped")
    await otel.stop_gateway()
    assert otel.receiver.spans() == []
    assert parent_of(sent)[2] is False  # a trace id all the same, not sampled
    [duration] = otel.receiver.points("gen_ai.client.operation.duration")
    assert duration.count == 1


# -- metrics -----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_genai_metrics_after_known_traffic(otel, http):
    await otel.start(replicas=1)
    client = otel.sdk()
    usages = []
    try:
        for _ in range(2):
            usages.append((await in_thread(client.chat.completions.create, **_sdk_chat())).usage)
        embedded = await in_thread(client.completions.create, model=MODEL, prompt=PROMPT, max_tokens=3)
    finally:
        client.close()
    await otel.stop_gateway()

    common = {"gen_ai.provider.name": "vllm", "gomodel.provider": "vllm", "gen_ai.request.model": MODEL,
              "gen_ai.response.model": CHAT_MODEL}
    tokens = {(p.attributes["gen_ai.operation.name"], p.attributes["gen_ai.token.type"]): p
              for p in otel.receiver.points("gen_ai.client.token.usage")}
    assert set(tokens) == {("chat", "input"), ("chat", "output"), ("text_completion", "input"),
                           ("text_completion", "output")}
    for point in tokens.values():
        assert {k: point.attributes[k] for k in common} == common and "error.type" not in point.attributes
        assert point.unit == "{token}" and point.bounds[:3] == (1, 4, 16)
    assert tokens["chat", "input"].count == 2 and tokens["chat", "input"].sum == sum(u.prompt_tokens for u in usages)
    assert tokens["chat", "output"].sum == sum(u.completion_tokens for u in usages) == 6
    assert tokens["text_completion", "input"].sum == embedded.usage.prompt_tokens
    assert tokens["text_completion", "output"].sum == embedded.usage.completion_tokens

    durations = {p.attributes["gen_ai.operation.name"]: p
                 for p in otel.receiver.points("gen_ai.client.operation.duration")}
    assert durations["chat"].count == 2 and durations["text_completion"].count == 1
    assert durations["chat"].unit == "s" and durations["chat"].bounds[0] == 0.01 and durations["chat"].sum > 0
    assert otel.receiver.points("gen_ai.client.operation.time_to_first_chunk") == []  # no stream
    [resource] = {frozenset(p.resource.items()) for p in durations.values()}
    assert dict(resource)["service.name"] == "gomodel"


@pytest_twisted.ensureDeferred
async def test_a_model_a_provider_does_not_list_is_no_metric_attribute_while_its_models_are_unknown(otel, http):
    """A provider whose replicas have not listed their models (down since the start) takes any model name a client
    types: before, each name became metric streams of its own (gen_ai.request.model, gen_ai.response.model), without
    bound, where Prometheus' model label says C{-}. Spans still name it (one per request: no series)."""
    from tests.support import dead_base_url

    await otel.start(replicas=1, env={"OPENAI_BASE_URL": await dead_base_url(otel.reactor),
                                      "OPENAI_API_KEY": "sk-x"})
    for name in ("openai/typo-1", "openai/typo-2", MODEL):
        response = await http.post(otel.gateway.url + "/v1/chat/completions", headers={
            "authorization": f"Bearer {MASTER_KEY}", "x-request-id": name.replace("/", "-")}, json=chat(model=name))
        await treq.content(response)
    await otel.stop_gateway()
    points = otel.receiver.points("gen_ai.client.operation.duration")
    assert sum(p.count for p in points) == 3
    assert not [p.attributes for p in points if "typo" in json.dumps(p.attributes)], points
    [unlisted] = [p for p in points if p.attributes["gomodel.provider"] == "openai"]
    assert unlisted.count == 2 and "gen_ai.request.model" not in unlisted.attributes
    [listed] = [p for p in points if p.attributes["gomodel.provider"] == "vllm"]
    assert listed.attributes["gen_ai.request.model"] == MODEL
    assert otel.server_span("openai-typo-1").attributes["gen_ai.request.model"] == "openai/typo-1"


@pytest_twisted.ensureDeferred
async def test_the_tokens_of_batch_lines_and_background_responses_are_recorded_as_the_ledger_counts_them(
        otel, tmp_path):
    """C{gen_ai.client.token.usage} records what the usage ledger (and C{gomodel_tokens_total}) counts: a batch
    line's answer and a background response charged by its watch once over were left out of it (no request's end
    records them)."""
    await otel.start(single=True, env={"GOMODEL_DATA_DIR": str(tmp_path / "d")})
    gw, fake = otel.gateway, otel.fleet[0]
    sdk = openai_client(gw, MASTER_KEY, timeout=20)
    try:
        records = await charge_a_batch_and_a_background_response(otel.reactor, gw, fake, sdk, MODEL)
    finally:
        sdk.close()
    await otel.stop_gateway()

    counted = [r for r in records if r["input_tokens"] is not None]
    assert {r["endpoint"] for r in counted} == {"/v1/chat/completions", "/v1/responses"} and len(counted) == 3
    points = {p.attributes["gen_ai.token.type"]: p for p in otel.receiver.points("gen_ai.client.token.usage")
              if p.attributes["gen_ai.operation.name"] == "chat"}
    for kind in ("input", "output"):
        assert (points[kind].count, points[kind].sum) == (3, sum(r[f"{kind}_tokens"] for r in counted)), kind
        assert {k: points[kind].attributes[k] for k in ("gen_ai.provider.name", "gomodel.provider",
                                                       "gen_ai.response.model")} == {
            "gen_ai.provider.name": "vllm", "gomodel.provider": "vllm", "gen_ai.response.model": CHAT_MODEL}
async def test_vllms_root_pooling_paths_and_v1_classify_name_their_operation_on_both_spans_and_the_metrics(otel,
                                                                                                          http):
    # The root paths (/rerank, the Cohere SDK's /v2/rerank and /v2/embed, /score, /classify, /pooling) had no
    # gen_ai.operation.name at all, so none of their GenAI metrics were recorded; /v1/classify's client span lacked it.
    # (The audio routes' are ours: the conventions have none.)
    await otel.start(single=True)
    paths = {"/v1/classify": "classify", "/rerank": "rerank", "/v2/rerank": "rerank", "/score": "score",
             "/classify": "classify", "/pooling": "pooling", "/v2/embed": "embeddings"}
    ids = {}
    for path in paths:
        response = await http.post(otel.gateway.url + path, headers={"authorization": f"Bearer {MASTER_KEY}"},
                                   data=json.dumps({"model": MODEL, "input": "x", "query": "q", "documents": ["a"],
                                                    "texts": ["a"]}).encode())
        assert response.code == 200, (path, await treq.content(response))
        ids[path] = response.headers.getRawHeaders("x-request-id")[0]
        await treq.content(response)
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        body, kind = form({"model": MODEL})
        response = await http.post(otel.gateway.url + path, data=body,
                                   headers={"authorization": f"Bearer {MASTER_KEY}", "content-type": kind})
        assert response.code == 200, (path, await treq.content(response))
        ids[path] = response.headers.getRawHeaders("x-request-id")[0]
        await treq.content(response)
    paths.update({"/v1/audio/transcriptions": "transcription", "/v1/audio/translations": "translation"})
    await otel.stop_gateway()
    for path, operation in paths.items():
        server = otel.server_span(ids[path])
        [attempt] = otel.attempts(server)
        assert (server.attributes.get("gen_ai.operation.name"), attempt.attributes.get("gen_ai.operation.name")) == (
            operation, operation), path
    durations = {}
    for point in otel.receiver.points("gen_ai.client.operation.duration"):
        durations[point.attributes["gen_ai.operation.name"]] = durations.get(point.attributes["gen_ai.operation.name"],
                                                                             0) + point.count
    assert durations == {"classify": 2, "rerank": 2, "score": 1, "pooling": 1, "embeddings": 1, "transcription": 1,
                         "translation": 1}


# -- what is never exported ----------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_no_prompt_completion_key_or_client_address_is_exported(otel, http):
    await otel.start()
    otel.fleet[0].fail_status = 503  # failovers too
    client = otel.sdk()
    try:
        for i in range(2):
            await in_thread(client.chat.completions.create, **_sdk_chat(), user="user-PROMPT-TEXT")
            await in_thread(lambda: list(client.chat.completions.create(**_sdk_chat(), stream=True)))
    finally:
        client.close()
    await otel.stop_gateway()
    everything = b"".join(otel.receiver.raw)
    assert otel.receiver.spans() and otel.receiver.points("gen_ai.client.operation.duration")
    for secret in (PROMPT, COMPLETION, MASTER_KEY, UPSTREAM_KEY, COLLECTOR_TOKEN, "PROMPT-TEXT", "Bearer"):
        assert secret.encode() not in everything, secret
    keys = {k for s in otel.receiver.spans() for k in s.attributes}
    assert not [k for k in keys if k.startswith(("client.", "network.peer", "user_agent", "http.request.header",
                                                  "http.request.body", "gen_ai.input", "gen_ai.output",
                                                  "gen_ai.prompt", "gen_ai.completion"))], keys
    # The SDK honoured OTEL_EXPORTER_OTLP_HEADERS: the collector's token went as a header, not in a body.
    assert all(h.getRawHeaders(b"x-collector-token") == [COLLECTOR_TOKEN.encode()] for _, h in otel.receiver.headers)
    assert {path for path, _ in otel.receiver.headers} == {b"/v1/traces", b"/v1/metrics"}
    assert otel.receiver.refused == []


# -- off: nothing imported ------------------------------------------------------------------------

_OFF = textwrap.dedent("""
    import sys, tempfile
    from twisted.internet import reactor
    from gomodel.config import load_config
    from gomodel.build import build_gateway
    config = load_config({"VLLM_BASE_URL": "http://127.0.0.1:9/v1", "GOMODEL_DATA_DIR": tempfile.mkdtemp()},
                         None, ["tcp:0:interface=127.0.0.1"])
    gateway = build_gateway(config, reactor)
    print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
    print(gateway.telemetry)
""")

_MISSING = textwrap.dedent("""
    import sys, tempfile
    sys.modules["opentelemetry"] = None  # as if the packages were not installed
    from twisted.internet import reactor
    from gomodel.config import ConfigError, load_config
    from gomodel.build import build_gateway
    config = load_config({"OTEL_ENABLED": "true", "GOMODEL_DATA_DIR": tempfile.mkdtemp()}, None,
                         ["tcp:0:interface=127.0.0.1"])
    try:
        build_gateway(config, reactor)
    except ConfigError as e:
        print("refused:", e)
""")


def _run(script):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_with_otel_off_nothing_of_opentelemetry_is_imported():
    assert _run(_OFF).split("\n")[:2] == ["[]", "None"]


def test_with_otel_on_and_no_packages_the_gateway_says_what_to_install():
    out = _run(_MISSING)
    assert out.startswith("refused: OTEL_ENABLED=true needs the OpenTelemetry SDK")
    # gomodel is installed from its source tree (no package index has it): the extra is named so
    assert "pip install '.[otel]' from gomodel's source tree" in out


def test_otel_enabled_from_yaml(tmp_path):
    from gomodel.config import load_config

    path = tmp_path / "gomodel.yaml"
    path.write_text(json.dumps({"metrics": {"otel_enabled": True}}))
    assert load_config({}, str(path), []).metrics.otel_enabled is True
    assert load_config({}, None, []).metrics.otel_enabled is False


def _sdk_chat():
    body = chat()
    return {"model": body["model"], "messages": body["messages"], "extra_body": {"fake_text": COMPLETION}}


# -- a real twistd process: what is in flight at SIGTERM is exported before it exits --------------

@pytest_twisted.ensureDeferred
async def test_twistd_exports_a_stream_in_flight_at_sigterm_before_it_exits(reactor, fake, tmp_path):
    receiver = await OTLPReceiver(reactor).start()
    proc, log_path = twistd_gateway(
        tmp_path, VLLM_BASE_URL=fake.base_url, SHUTDOWN_TIMEOUT="20s", OTEL_ENABLED="true",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_SERVICE_NAME="gomodel-edge", OTEL_TRACES_SAMPLER="always_on",
        # Nothing is exported on a timer: only the stop's flush can deliver it.
        OTEL_BSP_SCHEDULE_DELAY="600000", OTEL_METRIC_EXPORT_INTERVAL="600000")
    try:
        port = await ready_port(reactor, log_path)
        stream = await rawclient.connect(reactor, port, rawclient.chat_request(
            chat(stream=True, fake_chunks=10, fake_pace=0.05), {"X-Request-Id": "req-at-exit"}))
        await with_timeout(reactor, stream.wait_for(b"data:"), 10)
        proc.send_signal(signal.SIGTERM)
        await with_timeout(reactor, stream.lost, 20)
        assert b"data: [DONE]" in bytes(stream.received)
        await exited(reactor, proc, log_path)
    finally:
        killed(proc)
        await receiver.stop()
    [server] = [s for s in receiver.spans() if s.kind == SPAN_KIND_SERVER]  # the probes get none
    assert server.attributes["gomodel.request_id"] == "req-at-exit" and server.status == STATUS_UNSET
    assert server.resource["service.name"] == "gomodel-edge"  # OTEL_SERVICE_NAME
    assert [s.parent_id for s in receiver.spans() if s.kind == SPAN_KIND_CLIENT] == [server.span_id]
    [duration] = receiver.points("gen_ai.client.operation.duration")
    assert duration.count == 1 and duration.attributes["gen_ai.operation.name"] == "chat"
    [first_chunk] = receiver.points("gen_ai.client.operation.time_to_first_chunk")
    assert first_chunk.count == 1


# -- a collector that is down holds the stop up for FLUSH_TIMEOUT at most ------------------------------

@pytest_twisted.ensureDeferred
async def test_the_flush_at_stop_gives_up_after_its_bound_when_no_collector_answers(reactor, otel_env, fake, http,
                                                                                   monkeypatch):
    """Before: the SDK's exporters retried for their whole timeout (10 s each, traces then metrics), ~21 s."""
    import time

    from gomodel.accounting import tracing
    from tests.support import dead_base_url

    monkeypatch.setattr(tracing, "FLUSH_TIMEOUT", 1.0)
    nowhere = (await dead_base_url(reactor)).removesuffix("/v1")  # connections are refused
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", nowhere)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "OTEL_ENABLED": "true"})
    events = []
    gw.service.telemetry.log = tracing.Logger(observer=events.append)
    response = await http.post(gw.url + "/v1/chat/completions", json=chat())
    assert response.code == 200
    await treq.content(response)  # a span and the GenAI metrics to export
    started = time.monotonic()
    await with_timeout(reactor, gw.service.stopService(), 30)
    # (its bound and what a loaded host may take to stop the rest; before, ~21 s)
    assert time.monotonic() - started < tracing.FLUSH_TIMEOUT + 5
    [gave_up] = [e for e in events if "dropped" in e["log_format"]]
    assert gave_up["log_level"].name == "warn" and gave_up["timeout"] == 1.0
