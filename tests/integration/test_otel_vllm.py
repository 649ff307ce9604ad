"""OpenTelemetry against real vLLM: spans and GenAI metrics carry the tokens vLLM reported, and vLLM takes
the gateway's C{traceparent}.

An in-process gateway (OTEL on) in front of the real chat and embedding servers exports to a real
OTLP/HTTP receiver on loopback; the gateway's stop flushes what it holds.
"""

import os

import pytest
import pytest_twisted

from tests.fakes.otlp import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, STATUS_UNSET, OTLPReceiver
from tests.integration.support import CHAT_MODEL, EMBED_MODEL
from tests.support import in_thread, openai_client, start_gateway

CHAT = f"vllm/{CHAT_MODEL}"
EMBED = f"vllm-embed/{EMBED_MODEL}"
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
def otel_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
    return monkeypatch


@pytest_twisted.ensureDeferred
async def test_spans_and_metrics_carry_vllms_usage(reactor, vllm, otel_env):
    receiver = await OTLPReceiver(reactor).start()
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": vllm.chat_url, "VLLM_EMBED_BASE_URL": vllm.embed_url,
                                       "OTEL_ENABLED": "true"}, wait_ready=False)
    client = openai_client(gw, timeout=60)
    try:
        await gw.registry.ready()
        messages = [{"role": "user", "content": "Count to three."}]
        chat = await in_thread(client.chat.completions.create, model=CHAT, messages=messages, max_tokens=4,
                               extra_headers={"x-request-id": "it-chat",
                                              "traceparent": f"00-{CLIENT_TRACE}-b7ad6b7169203331-01"})

        def stream():
            return list(client.chat.completions.create(model=CHAT, messages=messages, max_tokens=4, stream=True,
                                                       stream_options={"include_usage": True},
                                                       extra_headers={"x-request-id": "it-stream"}))
        chunks = await in_thread(stream)
        embedded = await in_thread(client.embeddings.create, model=EMBED, input="hello there",
                                   extra_headers={"x-request-id": "it-embed"})
    finally:
        client.close()
        await gw.service.stopService()
        await receiver.stop()

    servers = {s.attributes["gomodel.request_id"]: s for s in receiver.spans() if s.kind == SPAN_KIND_SERVER}
    for request_id, usage in (("it-chat", chat.usage), ("it-stream", chunks[-1].usage)):
        span = servers[request_id]
        assert span.status == STATUS_UNSET and span.attributes["http.response.status_code"] == 200
        assert span.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
        assert span.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
        [attempt] = [s for s in receiver.spans() if s.parent_id == span.span_id]
        assert attempt.kind == SPAN_KIND_CLIENT and attempt.attributes["http.response.status_code"] == 200
    assert servers["it-chat"].trace_id == CLIENT_TRACE
    assert servers["it-embed"].attributes["gen_ai.operation.name"] == "embeddings"

    tokens = {(p.attributes["gen_ai.operation.name"], p.attributes["gen_ai.token.type"]): p.sum
              for p in receiver.points("gen_ai.client.token.usage")}
    assert tokens["chat", "output"] == chat.usage.completion_tokens + chunks[-1].usage.completion_tokens
    assert tokens["embeddings", "input"] == embedded.usage.prompt_tokens
    [first_chunk] = receiver.points("gen_ai.client.operation.time_to_first_chunk")
    assert first_chunk.count == 1
