"""Anthropic's Messages API through the gateway: the official anthropic SDK over real sockets.

Natively against the fake vLLM's own /v1/messages, and translated to chat
completions for an OpenAI-compatible provider and for a vLLM without the
Messages API.
"""

import base64
import io
import json
from functools import partial

import anthropic
import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from gomodel.routing.affinity import affinity_key
from tests.fakes.vllm import CHAT_MODEL
from tests.rawclient import connect
from tests.support import (assert_upstream_closed_promptly, dead_base_url, in_daemon_thread, in_thread, start_fake,
                           start_gateway, stop_all, with_timeout)

KEY = "anthropic-test-key"
MODEL = f"vllm/{CHAT_MODEL}"
OPENAI_MODEL = f"openai/{CHAT_MODEL}"
HELLO = [{"role": "user", "content": "Say hello."}]
THOUGHT = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": [
    {"type": "thinking", "thinking": "hm", "signature": "s"}, {"type": "text", "text": "Hello."}]},
    {"role": "user", "content": "Again."}]
WEATHER_TOOL = {"name": "get_weather", "description": "The weather in a city.",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}
WEATHER_CALL = {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def sdk(gw, *, api_key=KEY, auth_token=None, max_retries=0, default_headers=None):
    """The anthropic SDK pointed at C{gw} (no retries unless asked); close it after use."""
    credentials = {"auth_token": auth_token} if auth_token is not None else {"api_key": api_key}
    return anthropic.Anthropic(base_url=gw.url, max_retries=max_retries, timeout=10,
                               default_headers=default_headers, **credentials)


async def start(reactor, env):
    return await start_gateway(reactor, dict({"GOMODEL_MASTER_KEY": KEY}, **env))


@pytest_twisted.async_yield_fixture()
async def gw(reactor, fake):
    """The gateway in front of the fake vLLM (which serves Messages itself)."""
    gateway = await start(reactor, {"VLLM_BASE_URL": fake.base_url})
    yield gateway
    await gateway.service.stopService()


@pytest.fixture
def client(gw):
    c = sdk(gw)
    yield c
    c.close()


def headers(**extra):
    values = {"x-api-key": [KEY], "anthropic-version": ["2023-06-01"], "content-type": ["application/json"]}
    values.update({k.replace("_", "-"): [v] for k, v in extra.items()})
    return Headers(values)


async def post(http, url, body, with_headers=None):
    response = await http.post(url, data=json.dumps(body).encode(), headers=with_headers or headers())
    return response, await treq.content(response)


def events_of(raw: bytes):
    """The (event, data) pairs of an Anthropic event stream."""
    out = []
    for block in raw.split(b"\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(b": ", 1) for line in block.split(b"\n"))
        out.append((lines[b"event"].decode(), json.loads(lines[b"data"])))
    return out


def collect(stream):
    """Every event of an SDK stream, and its final message."""
    with stream as events:
        seen = [event for event in events]
        return seen, events.get_final_message()


async def scrape(http, gw):
    response = await http.get(gw.url + "/metrics", headers={"x-api-key": KEY})
    found = {}
    for family in text_string_to_metric_families((await treq.content(response)).decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def tokens(found, kind, **labels):
    labels = dict(labels, type=kind)
    return sum(v for (n, ls), v in found.items() if n == "gomodel_tokens_total" and set(labels.items()) <= ls)


# -- native: create and stream ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_create_is_relayed_natively_byte_for_byte(http, gw, fake, client):
    message = await in_thread(client.messages.create, model=MODEL, max_tokens=16, messages=HELLO,
                              metadata={"user_id": "u-1"})
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text == "héhéhé"
    assert message.model == CHAT_MODEL
    assert message.stop_reason == "max_tokens"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (18, 3)
    sent = fake.last_request()
    assert sent.path == b"/v1/messages"
    assert sent.body == {"model": CHAT_MODEL, "max_tokens": 16, "messages": HELLO, "metadata": {"user_id": "u-1"}}
    # The client's key never goes upstream (vLLM refuses x-api-key); its protocol headers do.
    assert sent.header(b"x-api-key") is None and sent.header(b"authorization") is None
    assert sent.header(b"anthropic-version") is not None
    # Byte for byte what vLLM answers.
    body = {"model": MODEL, "max_tokens": 16, "messages": HELLO}
    response, via = await post(http, gw.url + "/v1/messages", body)
    _, direct = await post(http, fake.base_url + "/messages", dict(body, model=CHAT_MODEL))
    assert response.code == 200 and via == direct


@pytest_twisted.ensureDeferred
async def test_the_anthropic_protocol_headers_go_natively_as_each_request_sent_them(http, gw, fake):
    """C{anthropic-version} and each C{anthropic-beta} line reach a native upstream as the client sent them, each
    request its own (the lines a value makes are kept for the next request with it), never the client's key."""
    body = {"model": MODEL, "max_tokens": 16, "messages": HELLO}
    for version, betas in (("2023-06-01", ["files-api-2025-04-14", "a,b"]), ("2023-01-01", ["c"]),
                           ("2023-06-01", ["files-api-2025-04-14", "a,b"]), ("2023-06-01", [])):
        sent_headers = headers(anthropic_version=version)
        if betas:
            sent_headers.setRawHeaders("anthropic-beta", betas)
        response, _ = await post(http, gw.url + "/v1/messages", body, sent_headers)
        assert response.code == 200
        sent = fake.last_request().headers
        assert sent.getRawHeaders(b"anthropic-version") == [version.encode()]
        assert sent.getRawHeaders(b"anthropic-beta") == ([beta.encode() for beta in betas] or None)
        assert sent.getRawHeaders(b"x-api-key") is None and sent.getRawHeaders(b"authorization") is None


@pytest_twisted.ensureDeferred
async def test_stream_is_relayed_natively_byte_for_byte(http, gw, fake, client):
    seen, final = await in_thread(collect, client.messages.stream(model=MODEL, max_tokens=16, messages=HELLO))
    kinds = [event.type for event in seen]
    assert kinds[0] == "message_start" and "message_stop" in kinds
    assert final.content[0].text == "héhéhé"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (18, 3)
    body = {"model": MODEL, "max_tokens": 16, "messages": HELLO, "stream": True}
    response, via = await post(http, gw.url + "/v1/messages", body)
    _, direct = await post(http, fake.base_url + "/messages", dict(body, model=CHAT_MODEL))
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/event-stream")
    assert via == direct
    assert [kind for kind, _ in events_of(via)] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]


@pytest_twisted.ensureDeferred
async def test_a_whole_native_answer_to_a_stream_becomes_its_event_stream(http, gw, client):
    """An upstream that answers a stream with the whole message (vLLM's JSON, its None fields left out):
    the client that asked for a stream gets Anthropic's events."""
    extra = {"fake_whole": True, "fake_tool": WEATHER_CALL, "fake_reasoning": "The user wants weather."}
    seen, final = await in_thread(collect, client.messages.stream(model=MODEL, max_tokens=64, tools=[WEATHER_TOOL],
                                                                  messages=HELLO, extra_body=extra))
    assert seen[0].type == "message_start" and seen[-1].type == "message_stop"
    assert [block.type for block in final.content] == ["thinking", "tool_use"]
    assert final.content[0].thinking == "The user wants weather." and final.content[0].signature
    assert final.content[1].input == {"city": "Paris"} and final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (18, 3)
    response, raw = await post(http, gw.url + "/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": HELLO,
                                                               "stream": True, "fake_whole": True})
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream; charset=utf-8"]
    assert "".join(e["delta"]["text"] for kind, e in events_of(raw) if kind == "content_block_delta") == "héhéhé"


@pytest_twisted.ensureDeferred
async def test_tool_use_and_thinking_natively(gw, client):
    extra = {"fake_tool": WEATHER_CALL, "fake_reasoning": "The user wants weather."}
    message = await in_thread(client.messages.create, model=MODEL, max_tokens=2048, tools=[WEATHER_TOOL],
                              messages=[{"role": "user", "content": "Weather in Paris?"}], extra_body=extra,
                              thinking={"type": "enabled", "budget_tokens": 1024})
    thinking, tool = message.content
    assert thinking.type == "thinking" and thinking.thinking == "The user wants weather." and thinking.signature
    assert tool.type == "tool_use" and tool.name == "get_weather" and tool.input == {"city": "Paris"}
    assert message.stop_reason == "tool_use"
    seen, final = await in_thread(collect, client.messages.stream(
        model=MODEL, max_tokens=64, tools=[WEATHER_TOOL], messages=[{"role": "user", "content": "Weather?"}],
        extra_body=extra))
    assert [block.type for block in final.content] == ["thinking", "tool_use"]
    assert final.content[1].input == {"city": "Paris"}
    assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in seen)


# -- translated: an OpenAI-compatible provider, and a vLLM without Messages ---------------------


@pytest_twisted.async_yield_fixture()
async def openai_gw(reactor, fake):
    """The gateway with the fake as an OpenAI-compatible provider (no Messages API: translated)."""
    gateway = await start(reactor, {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-upstream"})
    yield gateway
    await gateway.service.stopService()


@pytest_twisted.ensureDeferred
async def test_translated_create_and_stream_for_an_openai_provider(openai_gw, fake):
    client = sdk(openai_gw)
    try:
        message = await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=16,
                                  system="Be brief.", messages=HELLO)
        sent = fake.last_request()
        assert sent.path == b"/v1/chat/completions"
        assert sent.body["messages"] == [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Say hello."}]
        # OpenAI's reasoning models (o-series, GPT-5) refuse max_tokens; all its models take max_completion_tokens.
        assert sent.body["max_completion_tokens"] == 16 and "max_tokens" not in sent.body
        assert sent.body["model"] == CHAT_MODEL
        # The provider's own key goes upstream, never the client's.
        assert sent.header(b"authorization") == "Bearer sk-upstream" and sent.header(b"x-api-key") is None
        assert sent.header(b"anthropic-version") is None
        assert message.content[0].text == "héhéhé" and message.stop_reason == "max_tokens"
        assert message.id.startswith("msg_") and message.model == CHAT_MODEL
        assert (message.usage.input_tokens, message.usage.output_tokens) == (18, 3)

        seen, final = await in_thread(collect, client.messages.stream(model=OPENAI_MODEL, max_tokens=16,
                                                                      messages=HELLO))
        assert fake.last_request().body["stream_options"] == {"include_usage": True}
        assert seen[0].type == "message_start" and seen[-1].type == "message_stop"
        assert final.content[0].text == "héhéhé"
        assert (final.usage.input_tokens, final.usage.output_tokens) == (18, 3)
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_translated_stream_sends_a_ping_after_message_start_as_anthropic_does(http, openai_gw, fake):
    """Anthropic's streams send C{event: ping} right after C{message_start} (clients and proxies with idle timeouts
    count on its events); a translated stream sent none. Its raw events, then the anthropic SDK reading it (which
    skips pings); a stream made from a whole answer (an upstream that ignores C{"stream"}) has it too."""
    body = {"model": OPENAI_MODEL, "max_tokens": 16, "messages": HELLO, "stream": True}
    response, raw = await post(http, openai_gw.url + "/v1/messages", body)
    assert response.code == 200
    assert raw.split(b"\n\n")[1] == b'event: ping\ndata: {"type":"ping"}'
    kinds = [kind for kind, _ in events_of(raw)]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"] and kinds.count("ping") == 1
    assert kinds[-1] == "message_stop"
    client = sdk(openai_gw)
    try:
        seen, final = await in_thread(collect, client.messages.stream(model=OPENAI_MODEL, max_tokens=16,
                                                                      messages=HELLO))
        assert seen[0].type == "message_start" and final.content[0].text == "héhéhé"
        fake.steer = {"fake_status": 200, "fake_body": json.dumps({
            "id": "chatcmpl-w2", "object": "chat.completion", "model": CHAT_MODEL, "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hi."}}]})}
        _, raw = await post(http, openai_gw.url + "/v1/messages", body)
        assert [kind for kind, _ in events_of(raw)][:2] == ["message_start", "ping"]
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_translated_tool_use_and_thinking(openai_gw, fake):
    fake.steer = {"fake_tool": WEATHER_CALL, "fake_reasoning": "Weather, then."}
    client = sdk(openai_gw)
    try:
        message = await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=64, tools=[WEATHER_TOOL],
                                  tool_choice={"type": "any"}, messages=[{"role": "user", "content": "Paris?"}])
        sent = fake.last_request().body
        assert sent["tools"][0]["function"]["name"] == "get_weather" and sent["tool_choice"] == "required"
        assert [block.type for block in message.content] == ["thinking", "tool_use"]
        assert message.content[1].input == {"city": "Paris"} and message.stop_reason == "tool_use"
        seen, final = await in_thread(collect, client.messages.stream(
            model=OPENAI_MODEL, max_tokens=64, tools=[WEATHER_TOOL], messages=[{"role": "user", "content": "?"}]))
        assert [block.type for block in final.content] == ["thinking", "tool_use"]
        assert final.content[0].thinking == "Weather, then."
        assert final.content[1].input == {"city": "Paris"} and final.stop_reason == "tool_use"
        # The tool's result goes back as a chat tool message.
        await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=16, tools=[WEATHER_TOOL], messages=[
            {"role": "user", "content": "Paris?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                               "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"}]}])
        chat = fake.last_request().body["messages"]
        assert chat[1]["tool_calls"][0]["id"] == "toolu_1"
        assert chat[2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"}
    finally:
        client.close()


EXTRAS = {"top_k": 5, "output_config": {"effort": "high"}}


@pytest_twisted.ensureDeferred
async def test_vllms_fields_reach_only_a_vllm_upstream_when_translating(reactor, openai_gw, fake):
    client = sdk(openai_gw)
    try:
        await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=2000, extra_body=EXTRAS,
                        messages=THOUGHT, thinking={"type": "enabled", "budget_tokens": 1024})
        sent = fake.last_request().body  # OpenAI refuses parameters it does not know
        assert "top_k" not in sent and "chat_template_kwargs" not in sent and "thinking_token_budget" not in sent
        # Claude Code's effort ("high", on every request) is no reasoning_effort for them: OpenAI refuses that
        # for a model that does not reason (400 unsupported_parameter), and every value but low/medium/high.
        assert "reasoning_effort" not in sent
        assert sent["messages"][1] == {"role": "assistant", "content": "Hello."}  # its thinking is vLLM's
    finally:
        client.close()
    vllm = await start_fake(reactor, messages=False)  # a vLLM translated to chat completions
    gw = await start(reactor, {"VLLM_BASE_URL": vllm.base_url})
    client = sdk(gw)
    try:
        await in_thread(client.messages.create, model=MODEL, max_tokens=2000, extra_body=EXTRAS,
                        messages=THOUGHT, thinking={"type": "enabled", "budget_tokens": 1024})
        sent = vllm.last_request().body
        assert vllm.last_request().path == b"/v1/chat/completions" and sent["top_k"] == 5
        assert sent["reasoning_effort"] == "high"  # (as vLLM's own Messages API takes effort)
        assert sent["chat_template_kwargs"] == {"enable_thinking": True}
        # The budget bounds the thinking, as vLLM's own Messages API sends it (before: dropped, unbounded).
        assert sent["thinking_token_budget"] == 1024
        assert sent["messages"][1] == {"role": "assistant", "content": "Hello.", "reasoning_content": "hm"}
        await in_thread(client.messages.create, model=MODEL, max_tokens=2000, messages=HELLO,
                        thinking={"type": "adaptive"})
        assert "thinking_token_budget" not in vllm.last_request().body  # (the model chooses)
    finally:
        client.close()
        await gw.service.stopService()
        await vllm.stop()


@pytest_twisted.ensureDeferred
async def test_each_provider_type_gets_what_it_takes_of_top_k_thinking_and_effort(reactor, fake):
    """As on the chat route (only an C{openai} provider goes without vLLM's fields): C{top_k} reaches every
    OpenAI-compatible provider but OpenAI; C{output_config.effort} (and C{thinking} disabled, C{none}) is the
    C{reasoning_effort} of a provider type that takes any (OpenRouter, where C{thinking}'s budget replaces it:
    L{test_thinkings_budget_reaches_openrouter_as_its_reasonings_max_tokens}); OpenAI, and those that refuse it for
    a model that does not reason (Groq, xAI, Ollama...), go without it."""
    gw = await start(reactor, {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-o",
                               "OPENROUTER_BASE_URL": fake.base_url, "OPENROUTER_API_KEY": "sk-r",
                               "GROQ_BASE_URL": fake.base_url, "GROQ_API_KEY": "sk-g",
                               "OLLAMA_BASE_URL": fake.base_url})
    client = sdk(gw)
    try:
        sent = {}
        for kind in ("openai", "openrouter", "groq", "ollama"):
            await in_thread(client.messages.create, model=f"{kind}/{CHAT_MODEL}", max_tokens=2000,
                            extra_body=EXTRAS, messages=THOUGHT, thinking={"type": "enabled", "budget_tokens": 1024})
            sent[kind] = fake.last_request().body
        for kind, body in sent.items():
            assert "chat_template_kwargs" not in body and "thinking_token_budget" not in body, kind
            assert body["messages"][1] == {"role": "assistant", "content": "Hello."}, kind
        assert "top_k" not in sent["openai"] and "reasoning_effort" not in sent["openai"]
        assert sent["openrouter"]["top_k"] == 5 and sent["openrouter"]["reasoning"] == {"max_tokens": 1024}
        assert "reasoning_effort" not in sent["openrouter"]  # (the budget or the effort: below)
        for kind in ("groq", "ollama"):
            assert sent[kind]["top_k"] == 5 and "reasoning_effort" not in sent[kind], kind
        # thinking disabled is no reasoning at all, whatever the effort says (as vLLM's Messages API has it)
        await in_thread(client.messages.create, model=f"openrouter/{CHAT_MODEL}", max_tokens=16, extra_body=EXTRAS,
                        messages=HELLO, thinking={"type": "disabled"})
        assert fake.last_request().body["reasoning_effort"] == "none"
        await in_thread(client.messages.create, model=f"openrouter/{CHAT_MODEL}", max_tokens=16, messages=HELLO)
        assert "reasoning_effort" not in fake.last_request().body and "top_k" not in fake.last_request().body
    finally:
        client.close()
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_thinkings_budget_reaches_openrouter_as_its_reasonings_max_tokens(reactor, fake):
    """C{thinking}'s C{budget_tokens} is an C{openrouter} provider's C{reasoning: {max_tokens}} (OpenRouter's own
    bound on the reasoning, which it passes to Anthropic's models as their budget; before, only the effort reached
    it); it takes the budget or an effort, not both, so the budget goes without the effort, which goes alone
    otherwise (C{adaptive}, no C{thinking}). Other providers get no C{reasoning}."""
    gw = await start(reactor, {"OPENROUTER_BASE_URL": fake.base_url, "OPENROUTER_API_KEY": "sk-r",
                               "GROQ_BASE_URL": fake.base_url, "GROQ_API_KEY": "sk-g"})
    client = sdk(gw)

    def sent(kind="openrouter", **params):
        return in_thread(client.messages.create, model=f"{kind}/{CHAT_MODEL}", max_tokens=4000, messages=HELLO,
                         **params)

    try:
        enabled = {"type": "enabled", "budget_tokens": 2048}
        for extra in ({}, {"extra_body": EXTRAS}):
            await sent(thinking=enabled, **extra)
            body = fake.last_request().body
            assert body["reasoning"] == {"max_tokens": 2048} and "reasoning_effort" not in body, extra
        await sent(thinking={"type": "adaptive"}, extra_body=EXTRAS)
        body = fake.last_request().body
        assert "reasoning" not in body and body["reasoning_effort"] == "high"
        await sent(thinking={"type": "disabled"}, extra_body=EXTRAS)
        body = fake.last_request().body
        assert "reasoning" not in body and body["reasoning_effort"] == "none"
        await sent(kind="groq", thinking=enabled)
        assert "reasoning" not in fake.last_request().body
    finally:
        client.close()
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_clients_chat_template_kwargs_go_where_the_chat_route_sends_them(reactor, fake):
    """A client's own C{chat_template_kwargs} (a vLLM extra, which SGLang, llama.cpp and other OpenAI-compatible
    servers take too) reaches every provider but OpenAI as it sent it, as on the chat route (before: only a vLLM
    got it through Messages, every other provider went without); C{thinking}'s switch (C{enable_thinking}) is
    vLLM's and joins it for a vLLM only; OpenAI, which refuses parameters it does not know, goes without."""
    vllm = await start_fake(reactor, messages=False)  # a vLLM translated to chat completions
    gw = await start(reactor, {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-o",
                               "OPENROUTER_BASE_URL": fake.base_url, "OPENROUTER_API_KEY": "sk-r",
                               "GROQ_BASE_URL": fake.base_url, "GROQ_API_KEY": "sk-g",
                               "DEEPSEEK_BASE_URL": fake.base_url, "DEEPSEEK_API_KEY": "sk-d",
                               "OLLAMA_BASE_URL": fake.base_url, "VLLM_BASE_URL": vllm.base_url})
    client = sdk(gw)
    own = {"reasoning_mode": "brief"}
    try:
        sent = {}
        for kind in ("openai", "openrouter", "groq", "deepseek", "ollama", "vllm"):
            await in_thread(client.messages.create, model=f"{kind}/{CHAT_MODEL}", max_tokens=2000, messages=HELLO,
                            extra_body={"chat_template_kwargs": own},
                            thinking={"type": "enabled", "budget_tokens": 1024})
            sent[kind] = (vllm if kind == "vllm" else fake).last_request().body
        assert "chat_template_kwargs" not in sent.pop("openai")
        assert sent.pop("vllm")["chat_template_kwargs"] == dict(own, enable_thinking=True)
        for kind, body in sent.items():
            assert body["chat_template_kwargs"] == own, kind
        await in_thread(client.messages.create, model=f"groq/{CHAT_MODEL}", max_tokens=16, messages=HELLO,
                        thinking={"type": "disabled"})
        assert "chat_template_kwargs" not in fake.last_request().body  # (thinking's switch alone: vLLM's)
    finally:
        client.close()
        await gw.service.stopService()
        await vllm.stop()


PREFILL = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Bonjour,"}]


@pytest_twisted.ensureDeferred
async def test_a_prefill_is_continued_by_a_translated_vllm_and_kept_as_a_turn_elsewhere(reactor, openai_gw, fake):
    vllm = await start_fake(reactor, messages=False)  # a vLLM translated to chat completions
    gw = await start(reactor, {"VLLM_BASE_URL": vllm.base_url})
    client = sdk(gw)
    try:
        message = await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=PREFILL)
        sent = vllm.last_request().body
        assert sent["messages"][-1] == {"role": "assistant", "content": "Bonjour,"}
        assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
        # The answer is the continuation alone, as Anthropic's is (vLLM does not echo the prefill).
        assert [block.text for block in message.content] == ["héhéhé"]
        seen, final = await in_thread(collect, client.messages.stream(model=MODEL, max_tokens=8, messages=PREFILL))
        assert vllm.last_request().body["continue_final_message"] is True
        assert final.content[0].text == "héhéhé"
        # Anthropic's rule for a prefill, in Anthropic's envelope, before anything goes upstream.
        before = len(vllm.forwarded())
        with pytest.raises(anthropic.BadRequestError) as caught:
            await in_thread(client.messages.create, model=MODEL, max_tokens=8,
                            messages=[PREFILL[0], {"role": "assistant", "content": "Bonjour, "}])
        assert caught.value.status_code == 400 and caught.value.body["error"] == {
            "type": "invalid_request_error",
            "message": "messages: final assistant content cannot end with trailing whitespace"}
        assert len(vllm.forwarded()) == before
    finally:
        client.close()
        await gw.service.stopService()
        await vllm.stop()
    client = sdk(openai_gw)
    try:
        message = await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=8, messages=PREFILL)
        sent = fake.last_request().body
        assert sent["messages"][-1] == {"role": "assistant", "content": "Bonjour,"}
        assert "continue_final_message" not in sent and "add_generation_prompt" not in sent
        assert message.content[0].text == "héhéhé"
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_blank_prefill_is_one_blank_text_block_string_or_not(gw, openai_gw, fake):
    """A final assistant message of nothing but whitespace, a string or one text block (one block to Anthropic),
    is Anthropic's blank text 400 either way, before anything goes upstream, for a vLLM (translated, as every
    prefill) and an OpenAI-compatible provider, create and count_tokens; the string was the trailing whitespace
    400, its block form the blank text's. A prefill ending in whitespace after its text keeps its own 400."""
    before = len(fake.forwarded())
    for gateway, model in ((gw, MODEL), (openai_gw, OPENAI_MODEL)):
        client = sdk(gateway)
        try:
            blank = "text content blocks must contain non-whitespace text"
            for content, said in ((" ", blank), ("\n", blank), ([{"type": "text", "text": " \n"}], blank),
                                  ([{"type": "text", "text": "Bonjour,"}, {"type": "text", "text": " "}],
                                   "final assistant content cannot end with trailing whitespace")):
                messages = [PREFILL[0], {"role": "assistant", "content": content}]
                for call in (partial(client.messages.create, max_tokens=8), client.messages.count_tokens):
                    with pytest.raises(anthropic.BadRequestError) as caught:
                        await in_thread(call, model=model, messages=messages)
                    assert caught.value.body == {"type": "error", "error": {
                        "type": "invalid_request_error", "message": f"messages: {said}"}}, (model, content)
        finally:
            client.close()
    assert len(fake.forwarded()) == before


@pytest_twisted.ensureDeferred
async def test_translated_errors_are_anthropic_shaped(http, openai_gw, fake):
    openai_404 = {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "param": "model",
                            "code": 404}}
    body = {"model": OPENAI_MODEL, "max_tokens": 8, "messages": HELLO}
    fake.steer = {"fake_status": 404, "fake_body": json.dumps(openai_404)}
    response, content = await post(http, openai_gw.url + "/v1/messages", body)
    assert response.code == 404
    assert json.loads(content) == {"type": "error", "error": {"type": "not_found_error",
                                                              "message": "The model `x` does not exist."}}
    # A request no chat upstream can take is refused by the gateway, in Anthropic's shape.
    fake.steer = {}
    response, content = await post(http, openai_gw.url + "/v1/messages", {"model": OPENAI_MODEL, "messages": HELLO})
    assert response.code == 400 and json.loads(content)["error"]["type"] == "invalid_request_error"


@pytest_twisted.ensureDeferred
async def test_blocks_of_the_wrong_types_are_400s_not_500s_when_translating(http, openai_gw, fake):
    before = len(fake.forwarded())
    for content, param in (
            ([{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": 5}]}],
             "messages.0.content.0.content.0.text"),
            ([{"type": "text", "text": {"a": 1}}], "messages.0.content.0.text"),
            # A text block without its text, Anthropic's "Field required" (before: sent on as an empty text).
            ([{"type": "text"}], "messages.0.content.0.text: Field required"),
            ([{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text"}]}],
             "messages.0.content.0.content.0.text: Field required")):
        response, body = await post(http, openai_gw.url + "/v1/messages",
                                    {"model": OPENAI_MODEL, "max_tokens": 8,
                                     "messages": [{"role": "user", "content": content}]})
        assert response.code == 400
        error = json.loads(body)
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert error["error"]["message"].startswith(param)
    response, body = await post(http, openai_gw.url + "/v1/messages",
                                {"model": OPENAI_MODEL, "max_tokens": 0, "messages": HELLO})
    assert response.code == 400 and "max_tokens" in json.loads(body)["error"]["message"]
    assert len(fake.forwarded()) == before


@pytest_twisted.ensureDeferred
async def test_a_custom_content_document_is_translated_and_a_pdf_refused_in_anthropics_shape(openai_gw, fake):
    png = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    document = {"type": "document", "title": "Scan", "source": {"type": "content", "content": [
        {"type": "text", "text": "Figure 1:"}, {"type": "image", "source": png}]}}
    client = sdk(openai_gw)
    try:
        message = await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=8, messages=[
            {"role": "user", "content": [document, {"type": "text", "text": "Describe it."}]}])
        assert message.content[0].text == "héhéhé"
        assert fake.last_request().body["messages"] == [{"role": "user", "content": [
            {"type": "text", "text": "<document>\n<source>Scan</source>\n<document_content>\nFigure 1:"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "text", "text": "\n</document_content>\n</document>"},
            {"type": "text", "text": "Describe it."}]}]
        before = len(fake.forwarded())
        pdf = {"type": "document", "source": {"type": "content", "content": [
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}}]}}
        with pytest.raises(anthropic.BadRequestError) as caught:
            await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=8,
                            messages=[{"role": "user", "content": [pdf]}])
        assert caught.value.body["type"] == "error"
        assert caught.value.body["error"]["type"] == "invalid_request_error"
        assert caught.value.body["error"]["message"].startswith("messages.0.content.0.source.content.0")
        assert len(fake.forwarded()) == before
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_request_with_documents_goes_to_a_vllm_translated(gw, fake, client):
    """vLLM's Messages API has no document block: it refuses one in a message (a 400 listing its block types) and
    drops one in a tool result unread. A request holding one goes to a vLLM translated, as one with stop sequences
    does: a text document (plain, or base64 text/plain) reaches the model as its text, counted by /tokenize; a
    PDF is the gateway's 400 in Anthropic's shape, saying so, before anything goes upstream (before: vLLM's 400,
    or the tool result's document silently lost)."""
    text = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Notes: ok."}}
    encoded = {"type": "document", "source": {"type": "base64", "media_type": "text/plain",
                                              "data": base64.b64encode("Läuft.".encode()).decode()}}
    call = {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "a.txt"}}
    messages = [{"role": "user", "content": [text, {"type": "text", "text": "Read a.txt."}]},
                {"role": "assistant", "content": [call]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [encoded]}]}]
    message = await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=messages)
    assert message.content[0].text == "héhéhé"
    sent = fake.last_request()
    assert sent.path == b"/v1/chat/completions"
    assert sent.body["messages"][0] == {"role": "user", "content": [{"type": "text", "text": "Notes: ok."},
                                                                    {"type": "text", "text": "Read a.txt."}]}
    assert sent.body["messages"][2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "Läuft."}
    counted = await in_thread(client.messages.count_tokens, model=MODEL, messages=messages)
    assert counted.input_tokens > 0 and fake.last_request().path == b"/tokenize"
    before = len(fake.forwarded())
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}}
    for content in ([pdf], [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [pdf]}]):
        with pytest.raises(anthropic.BadRequestError) as caught:
            await in_thread(client.messages.create, model=MODEL, max_tokens=8,
                            messages=messages[:2] + [{"role": "user", "content": content}])
        error = caught.value.body
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert "PDF" in error["error"]["message"] and error["error"]["message"].startswith("messages.2.content.0")
    assert len(fake.forwarded()) == before
    # Without a document the request stays native.
    await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO)
    assert fake.last_request().path == b"/v1/messages"


@pytest_twisted.ensureDeferred
async def test_a_prefill_goes_to_a_vllm_translated_and_is_continued(gw, fake, client):
    """vLLM 0.32's own Messages API closes a final assistant message as a finished turn and answers in a new one
    (its count too): a prefill was not continued when served natively. A request ending with the assistant's
    message now goes to a vLLM translated, continued (C{continue_final_message}) as Anthropic continues it, and
    C{count_tokens} counts it as that generation sees it (by /tokenize)."""
    message = await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=PREFILL)
    assert message.content[0].text == "héhéhé"
    sent = fake.last_request()
    assert sent.path == b"/v1/chat/completions"
    assert sent.body["continue_final_message"] is True and sent.body["add_generation_prompt"] is False
    seen, final = await in_thread(collect, client.messages.stream(model=MODEL, max_tokens=8, messages=PREFILL))
    assert fake.last_request().path == b"/v1/chat/completions" and final.content[0].text == "héhéhé"
    counted = await in_thread(client.messages.count_tokens, model=MODEL, messages=PREFILL)
    assert counted.input_tokens > 0 and fake.last_request().path == b"/tokenize"
    assert fake.last_request().body["continue_final_message"] is True
    # Ending with the user's, the request stays native.
    await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=PREFILL + HELLO)
    assert fake.last_request().path == b"/v1/messages"
    await in_thread(client.messages.count_tokens, model=MODEL, messages=PREFILL + HELLO)
    assert fake.last_request().path == b"/v1/messages/count_tokens"


@pytest_twisted.ensureDeferred
async def test_a_whole_chat_answer_to_a_translated_stream_becomes_its_event_stream(http, openai_gw, fake):
    chat = {"id": "chatcmpl-w1", "object": "chat.completion", "model": CHAT_MODEL, "choices": [
        {"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Checking.", "reasoning_content": "Paris.",
            "tool_calls": [{"id": "call_1", "type": "function", "function": WEATHER_CALL}]}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}}
    fake.steer = {"fake_status": 200, "fake_body": json.dumps(chat)}  # an upstream that ignores "stream"
    response, raw = await post(http, openai_gw.url + "/v1/messages",
                               {"model": OPENAI_MODEL, "max_tokens": 64, "messages": HELLO, "stream": True})
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/event-stream")
    assert [kind for kind, _ in events_of(raw)][0] == "message_start"
    client = sdk(openai_gw)
    try:
        seen, final = await in_thread(collect, client.messages.stream(model=OPENAI_MODEL, max_tokens=64,
                                                                      messages=HELLO))
    finally:
        client.close()
    assert seen[-1].type == "message_stop"
    assert [block.type for block in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].thinking == "Paris." and final.content[1].text == "Checking."
    assert (final.content[2].id, final.content[2].input) == ("call_1", {"city": "Paris"})
    assert final.stop_reason == "tool_use" and final.id == "msg_w1"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (12, 7)


@pytest_twisted.ensureDeferred
async def test_interleaved_tool_call_fragments_stream_in_anthropics_block_order(http, openai_gw, fake):
    def fragment(index, arguments, call_id=None, name=None):
        call = {"index": index, "function": {"arguments": arguments}}
        if call_id:
            call.update(id=call_id, type="function")
            call["function"]["name"] = name
        return {"tool_calls": [call]}

    fake.steer = {"fake_finish": "tool_calls", "fake_deltas": [
        fragment(0, "", "call_1", "get_weather"), fragment(1, "", "call_2", "get_weather"),
        fragment(0, '{"city": '), fragment(1, '{"city": '), fragment(0, '"Paris"}'), fragment(1, '"Oslo"}')]}
    body = {"model": OPENAI_MODEL, "max_tokens": 64, "tools": [WEATHER_TOOL], "messages": HELLO, "stream": True}
    response, raw = await post(http, openai_gw.url + "/v1/messages", body)
    open_block = None
    for kind, payload in events_of(raw):  # one block at a time, never a delta after its block's stop
        if kind == "content_block_start":
            assert open_block is None
            open_block = payload["index"]
        elif kind in ("content_block_delta", "content_block_stop"):
            assert payload["index"] == open_block, (kind, payload)
            open_block = None if kind == "content_block_stop" else open_block
    client = sdk(openai_gw)
    try:
        seen, final = await in_thread(collect, client.messages.stream(
            model=OPENAI_MODEL, max_tokens=64, tools=[WEATHER_TOOL], messages=HELLO))
    finally:
        client.close()
    assert [(block.id, block.input) for block in final.content] == [("call_1", {"city": "Paris"}),
                                                                     ("call_2", {"city": "Oslo"})]
    assert final.stop_reason == "tool_use"


@pytest_twisted.ensureDeferred
async def test_a_chat_stream_to_a_translated_plain_request_is_one_message(http, openai_gw, fake):
    """An upstream that streams unasked: the client, which asked for no stream, gets one message (before:
    Anthropic's events)."""
    fake.steer = {"stream": True, "fake_tool": WEATHER_CALL}  # an upstream that streams unasked
    response, raw = await post(http, openai_gw.url + "/v1/messages",
                               {"model": OPENAI_MODEL, "max_tokens": 8, "messages": HELLO, "tools": [WEATHER_TOOL]})
    assert response.code == 200 and response.headers.getRawHeaders("content-type") == ["application/json"]
    message = json.loads(raw)
    assert message["type"] == "message" and message["stop_reason"] == "tool_use"
    assert message["content"][-1]["input"] == {"city": "Paris"}


@pytest_twisted.ensureDeferred
async def test_a_native_messages_stream_to_a_plain_request_is_one_message(http, gw, fake, client):
    """vLLM's Messages API streaming what was asked whole: the client gets the message its events make,
    as vLLM would have answered it whole (before: the events went as they came)."""
    plain = await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO,
                            extra_body={"fake_reasoning": "Weather, then.", "fake_tool": WEATHER_CALL})
    gathered = await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO,
                               extra_body={"fake_reasoning": "Weather, then.", "fake_tool": WEATHER_CALL,
                                           "fake_stream_anyway": True})
    assert dict(gathered.to_dict(), stop_sequence=None) == dict(plain.to_dict(), stop_sequence=None)
    response, raw = await post(http, gw.url + "/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": HELLO,
                                                               "fake_stream_anyway": True, "fake_no_stop": True})
    assert response.code == 502 and json.loads(raw)["type"] == "error"  # never a message that may lack its end


@pytest_twisted.ensureDeferred
async def test_a_chat_stream_to_a_translated_plain_request_comes_as_anthropics_json_message(http, openai_gw, fake):
    fake.steer = {"stream": True, "stream_options": {"include_usage": True}}  # an upstream that streams unasked
    body = {"model": OPENAI_MODEL, "max_tokens": 8, "messages": HELLO}
    response, raw = await post(http, openai_gw.url + "/v1/messages", body)
    assert response.code == 200 and response.headers.getRawHeaders("content-type") == ["application/json"]
    message = json.loads(raw)
    assert message["type"] == "message" and message["content"] == [{"type": "text", "text": "héhéhé"}]
    assert message["stop_reason"] == "max_tokens" and message["usage"] == {"input_tokens": 18, "output_tokens": 3}
    assert message["id"].startswith("msg_") and message["model"] == CHAT_MODEL
    fake.steer = {"stream": True, "fake_tool": WEATHER_CALL, "fake_reasoning": "Weather."}
    client = sdk(openai_gw)
    try:
        message = await in_thread(client.messages.create, tools=[WEATHER_TOOL], **body)
    finally:
        client.close()
    assert [block.type for block in message.content] == ["thinking", "tool_use"]
    assert message.content[1].input == {"city": "Paris"} and message.stop_reason == "tool_use"
    # An in-band error, or a stream that breaks off: Anthropic's error, as JSON.
    fake.steer = {"stream": True, "fake_sse": [json.dumps({"error": {"message": "engine overloaded", "code": 503}})]}
    response, raw = await post(http, openai_gw.url + "/v1/messages", body)
    assert response.code == 503 and response.headers.getRawHeaders("content-type") == ["application/json"]
    assert json.loads(raw) == {"type": "error", "error": {"type": "overloaded_error", "message": "engine overloaded"}}
    fake.steer = {"stream": True, "fake_die_after": 2}
    response, raw = await post(http, openai_gw.url + "/v1/messages", body)
    assert response.code == 502 and json.loads(raw)["error"]["type"] == "api_error"
    fake.steer = {"stream": True, "fake_sse": ["not json"]}
    response, raw = await post(http, openai_gw.url + "/v1/messages", body)
    assert response.code == 502 and json.loads(raw)["error"]["type"] == "api_error"
    assert response.headers.getRawHeaders("content-type") == ["application/json"]


@pytest_twisted.ensureDeferred
async def test_a_native_stream_to_a_plain_request_comes_as_anthropics_json_message(http, gw, fake, client):
    """A Messages request that did not ask to stream gets one JSON message however its upstream answers."""
    body = {"model": MODEL, "max_tokens": 8, "messages": HELLO}
    _, direct = await post(http, fake.base_url + "/messages", dict(body, model=CHAT_MODEL))
    response, raw = await post(http, gw.url + "/v1/messages", dict(body, fake_stream_anyway=True))
    assert response.code == 200 and response.headers.getRawHeaders("content-type") == ["application/json"]
    assert response.length == len(raw)
    assert json.loads(raw) == dict(json.loads(direct), stop_sequence=None)
    extra = {"fake_tool": WEATHER_CALL, "fake_reasoning": "The user wants weather.", "fake_stream_anyway": True}
    message = await in_thread(client.messages.create, tools=[WEATHER_TOOL], extra_body=extra, **body)
    thinking, tool = message.content
    assert thinking.thinking == "The user wants weather." and thinking.signature
    assert tool.input == {"city": "Paris"} and message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (18, 3)
    assert response.headers.getRawHeaders("cache-control") is None
    found = await scrape(http, gw)
    streams = {dict(ls)["stream"]: v for (n, ls), v in found.items() if n == "gomodel_requests_total"}
    assert streams == {"false": 2}  # (the direct call went around the gateway)
    start = json.dumps({"type": "message_start", "message": {
        "id": "m", "type": "message", "role": "assistant", "content": [], "model": CHAT_MODEL, "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 0}}})
    for error, status in (({"type": "overloaded_error", "message": "busy"}, 529),  # (Anthropic's status for it)
                          ({"type": "internal_error", "message": "engine died"}, 502)):
        events = [["message_start", start], ["error", json.dumps({"type": "error", "error": error})]]
        response, raw = await post(http, gw.url + "/v1/messages", dict(body, fake_stream_anyway=True,
                                                                       fake_events=events))
        assert response.code == status and response.headers.getRawHeaders("content-type") == ["application/json"]
        assert json.loads(raw) == {"type": "error", "error": {
            "type": "overloaded_error" if status == 529 else "api_error", "message": error["message"]}}
    for fault in ({"fake_no_stop": True}, {"fake_die_after": 3}):
        response, raw = await post(http, gw.url + "/v1/messages", dict(body, fake_stream_anyway=True, **fault))
        assert response.code == 502 and json.loads(raw)["error"]["type"] == "api_error", fault


@pytest_twisted.ensureDeferred
async def test_a_stream_flag_that_is_no_boolean_is_refused_in_anthropics_shape(http, gw, fake):
    before = len(fake.forwarded())
    for flag in (1, "yes", "true", [], {}):
        response, content = await post(http, gw.url + "/v1/messages",
                                       {"model": MODEL, "max_tokens": 8, "messages": HELLO, "stream": flag})
        assert response.code == 400, flag
        error = json.loads(content)
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert "stream" in error["error"]["message"]
    assert len(fake.forwarded()) == before  # nothing was sent: vLLM would have streamed 1 and "yes"


@pytest_twisted.ensureDeferred
async def test_a_translated_answer_the_upstream_aborted_is_a_502_not_a_finished_message(http, openai_gw, fake):
    aborted = {"id": "c", "object": "chat.completion", "model": CHAT_MODEL, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "half"}, "finish_reason": "abort"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    fake.steer = {"fake_status": 200, "fake_body": json.dumps(aborted)}
    response, content = await post(http, openai_gw.url + "/v1/messages",
                                   {"model": OPENAI_MODEL, "max_tokens": 8, "messages": HELLO})
    assert response.code == 502
    error = json.loads(content)
    assert error["type"] == "error" and "abort" in error["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_vllm_without_messages_is_translated_and_remembered(reactor, http):
    fake = await start_fake(reactor, messages=False)  # FastAPI's 404: a server without the router
    gw = await start(reactor, {"VLLM_BASE_URL": fake.base_url})
    client = sdk(gw)
    try:
        message = await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO)
        assert message.content[0].text == "héhéhé"
        assert [r.path for r in fake.requests if r.method == b"POST"] == [b"/v1/messages", b"/v1/chat/completions"]
        assert fake.last_request().body["max_tokens"] == 8  # (vLLM's name, as for any model it serves)
        seen, final = await in_thread(collect, client.messages.stream(model=MODEL, max_tokens=8, messages=HELLO))
        assert final.content[0].text == "héhéhé"
        # Remembered: the second and later requests go straight to chat completions.
        assert [r.path for r in fake.requests if r.method == b"POST"][2:] == [b"/v1/chat/completions"]
    finally:
        client.close()
        await gw.service.stopService()
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_a_translated_vllm_streams_message_start_with_the_prompts_tokens(reactor, http, openai_gw, fake):
    """vLLM's continuous usage puts the prompt's count on its first chunk: message_start carries it (LangChain
    reads it there); the usage chunk at the end still makes message_delta's. Only a vLLM is asked for it."""
    vllm = await start_fake(reactor, messages=False)
    gw = await start(reactor, {"VLLM_BASE_URL": vllm.base_url})
    try:
        body = {"model": MODEL, "max_tokens": 8, "messages": HELLO, "stream": True}
        for _ in range(2):  # (the first is asked natively, then translated)
            response, raw = await post(http, gw.url + "/v1/messages", body)
        sent = vllm.last_request()
        assert sent.path == b"/v1/chat/completions"
        assert sent.body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
        events = events_of(raw)
        assert events[0][0] == "message_start"
        assert events[0][1]["message"]["usage"] == {"input_tokens": 18, "output_tokens": 0}
        assert events[-2] == ("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": "max_tokens", "stop_sequence": None}, "usage": {"input_tokens": 18, "output_tokens": 3}})
        vllm.steer = {"fake_cached": 10}
        _, raw = await post(http, gw.url + "/v1/messages", body)
        usage = events_of(raw)[-2][1]["usage"]
        assert usage == {"input_tokens": 8, "cache_read_input_tokens": 10, "output_tokens": 3}
    finally:
        await gw.service.stopService()
        await vllm.stop()
    # An OpenAI-compatible provider may refuse continuous_usage_stats: it is not sent one.
    response, raw = await post(http, openai_gw.url + "/v1/messages", dict(body, model=OPENAI_MODEL))
    assert fake.last_request().body["stream_options"] == {"include_usage": True}
    assert events_of(raw)[-2][1]["usage"] == {"input_tokens": 18, "output_tokens": 3}


@pytest_twisted.ensureDeferred
async def test_the_translated_retry_is_admitted_once(reactor, http):
    """A key allowed one request at a time: the native try and the translated one are one request."""
    fake = await start_fake(reactor, messages=False)
    gw = await start(reactor, {"VLLM_BASE_URL": fake.base_url})
    try:
        response = await http.post(gw.url + "/admin/api/v1/auth-keys", headers=headers(),
                                   data=json.dumps({"name": "one-at-a-time", "max_concurrency": 1}).encode())
        client = sdk(gw, api_key=json.loads(await treq.content(response))["value"])
        try:
            for _ in range(2):
                message = await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO)
                assert message.content[0].text == "héhéhé"
        finally:
            client.close()
        assert [r.path for r in fake.requests if r.method == b"POST"] == [
            b"/v1/messages", b"/v1/chat/completions", b"/v1/chat/completions"]
    finally:
        await gw.service.stopService()
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_vllm_saying_it_does_not_support_messages_counts_with_tokenize(reactor, http):
    fake = await start_fake(reactor, messages="unsupported")  # vLLM's 501 "does not support Messages API"
    gw = await start(reactor, {"VLLM_BASE_URL": fake.base_url})
    client = sdk(gw)
    try:
        counted = await in_thread(client.messages.count_tokens, model=MODEL, system="Be brief.", messages=HELLO)
        paths = [r.path for r in fake.requests if r.method == b"POST"]
        assert paths == [b"/v1/messages/count_tokens", b"/tokenize"]
        tokenize = fake.last_request().body
        assert tokenize["model"] == CHAT_MODEL and tokenize["add_generation_prompt"] is True
        assert tokenize["messages"] == [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Say hello."}]
        # The fake's tokenizer: a token per character, four per message.
        assert counted.input_tokens == 4 + len("Be brief.") + 4 + len("Say hello.")
        message = await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO)
        assert message.content[0].text == "héhéhé"
        assert [r.path for r in fake.requests if r.method == b"POST"][2:] == [b"/v1/chat/completions"]
    finally:
        client.close()
        await gw.service.stopService()
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_a_vllm_without_count_tokens_keeps_serving_messages_natively(reactor, http):
    fake = await start_fake(reactor, messages="no_count")  # /v1/messages, but count_tokens is FastAPI's 404
    gw = await start(reactor, {"VLLM_BASE_URL": fake.base_url})
    client = sdk(gw)
    try:
        for _ in range(2):
            counted = await in_thread(client.messages.count_tokens, model=MODEL, messages=HELLO)
            assert counted.input_tokens == 4 + len("Say hello.")
            message = await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO)
            assert message.content[0].text == "héhéhé"
        assert [r.path for r in fake.requests if r.method == b"POST"] == [
            b"/v1/messages/count_tokens", b"/tokenize", b"/v1/messages", b"/tokenize", b"/v1/messages"]
    finally:
        client.close()
        await gw.service.stopService()
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_a_virtual_model_reaches_each_target_its_own_way(reactor, fake):
    """One target serves Messages (asked natively), the other does not (translated)."""
    other = await start_fake(reactor)
    virtual = [{"source": "claude-sonnet", "targets": [{"model": MODEL, "weight": 1},
                                                        {"model": OPENAI_MODEL, "weight": 1}]}]
    gw = await start(reactor, {"VLLM_BASE_URL": fake.base_url, "OPENAI_BASE_URL": other.base_url,
                               "OPENAI_API_KEY": "sk-upstream", "VIRTUAL_MODELS": json.dumps(virtual)})
    client = sdk(gw)
    try:
        for _ in range(2):
            message = await in_thread(client.messages.create, model="claude-sonnet", max_tokens=8, messages=HELLO)
            assert message.content[0].text == "héhéhé" and message.model == CHAT_MODEL
        assert [r.path for r in fake.requests if r.method == b"POST"] == [b"/v1/messages"]
        assert [r.path for r in other.requests if r.method == b"POST"] == [b"/v1/chat/completions"]
        # One Claude Code session stays on one target.
        session = sdk(gw, default_headers={"X-Claude-Code-Session-Id": "session-1"})
        try:
            for _ in range(3):
                await in_thread(session.messages.create, model="claude-sonnet", max_tokens=8, messages=HELLO)
        finally:
            session.close()
        posts = len([r for r in fake.requests if r.method == b"POST"]), len([
            r for r in other.requests if r.method == b"POST"])
        assert sorted(posts) == [1, 4]
        # count_tokens asks the target that has a tokenizer, whichever target is chosen first.
        for _ in range(2):
            counted = await in_thread(client.messages.count_tokens, model="claude-sonnet", messages=HELLO)
            assert counted.input_tokens == 4 + len("Say hello.")
        assert fake.last_request().path == b"/v1/messages/count_tokens"
    finally:
        client.close()
        await gw.service.stopService()
        await other.stop()


@pytest_twisted.ensureDeferred
async def test_a_translated_answer_names_the_model_of_the_target_that_gave_it(reactor):
    """A fallback that answers a translated request is the model the answer names, streamed or not (a
    stream's message_start named the first target's model, which had failed)."""
    first, second = await start_fake(reactor, models=("model-a",)), await start_fake(reactor, models=("model-b",))
    rules = {"openai/model-a": ["openai-other/model-b"]}
    gw = await start(reactor, {"OPENAI_BASE_URL": first.base_url, "OPENAI_API_KEY": "sk-upstream",
                               "OPENAI_OTHER_BASE_URL": second.base_url, "OPENAI_OTHER_API_KEY": "sk-upstream",
                               "FAILOVER_RULES_JSON": json.dumps(rules), "REPLICA_FAILURE_THRESHOLD": "100"})
    first.steer = {"fake_status": 503}
    client = sdk(gw)
    try:
        message = await in_thread(client.messages.create, model="openai/model-a", max_tokens=8, messages=HELLO)
        assert message.model == "model-b"
        seen, final = await in_thread(collect, client.messages.stream(model="openai/model-a", max_tokens=8,
                                                                      messages=HELLO))
        assert seen[0].type == "message_start" and seen[0].message.model == "model-b"
        assert final.model == "model-b" and final.content[0].text == "héhéhé"
        assert [r.body["model"] for r in second.requests if r.path == b"/v1/chat/completions"] == ["model-b"] * 2
    finally:
        await stop_all(gw, first, second, clients=(client,))


@pytest_twisted.ensureDeferred
async def test_a_target_that_fails_falls_back_to_one_reached_the_other_way(reactor):
    """A native vLLM that is down falls back to an OpenAI provider's chat (translated), and an OpenAI provider
    that is down to a vLLM's own Messages: before, only the targets reached the same way were tried."""
    vllm, openai = await start_fake(reactor, models=("model-a",)), await start_fake(reactor, models=("model-b",))
    rules = {"vllm/model-a": ["openai/model-b"], "openai/model-b": ["vllm/model-a"]}
    gw = await start(reactor, {"VLLM_BASE_URL": vllm.base_url, "OPENAI_BASE_URL": openai.base_url,
                               "OPENAI_API_KEY": "sk-upstream", "FAILOVER_RULES_JSON": json.dumps(rules),
                               "REPLICA_FAILURE_THRESHOLD": "100"})
    client = sdk(gw)
    try:
        vllm.steer = {"fake_status": 503}
        message = await in_thread(client.messages.create, model="vllm/model-a", max_tokens=8, messages=HELLO)
        assert message.model == "model-b" and message.content[0].text == "héhéhé"
        seen, final = await in_thread(collect, client.messages.stream(model="vllm/model-a", max_tokens=8,
                                                                      messages=HELLO))
        assert seen[0].message.model == "model-b" and final.content[0].text == "héhéhé"
        assert [r.path for r in vllm.requests if r.method == b"POST"] == [b"/v1/messages"] * 2
        assert [(r.path, r.body["model"]) for r in openai.requests if r.method == b"POST"] == [
            (b"/v1/chat/completions", "model-b")] * 2

        vllm.steer, openai.steer = {}, {"fake_status": 503}
        message = await in_thread(client.messages.create, model="openai/model-b", max_tokens=8, messages=HELLO)
        assert message.model == "model-a"
        assert [(r.path, r.body["model"]) for r in vllm.requests if r.method == b"POST"][-1] == (
            b"/v1/messages", "model-a")

        # The upstream's answer to a bad request is the client's: no other target is asked.
        openai.steer = {"fake_status": 400, "fake_body": json.dumps({"error": {"message": "bad", "type": "x"}})}
        asked = len(vllm.forwarded())
        with pytest.raises(anthropic.BadRequestError):
            await in_thread(client.messages.create, model="openai/model-b", max_tokens=8, messages=HELLO)
        assert len(vllm.forwarded()) == asked
    finally:
        await stop_all(gw, vllm, openai, clients=(client,))


# -- count_tokens --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_count_tokens_is_vllms_own(http, gw, fake, client):
    counted = await in_thread(client.messages.count_tokens, model=MODEL, system="Be brief.", messages=HELLO,
                              tools=[WEATHER_TOOL])
    assert fake.last_request().path == b"/v1/messages/count_tokens"
    assert fake.last_request().body["model"] == CHAT_MODEL
    assert counted.input_tokens == 4 + len("Be brief.") + 4 + len("Say hello.") + 4
    body = {"model": MODEL, "messages": HELLO}
    _, via = await post(http, gw.url + "/v1/messages/count_tokens", body)
    _, direct = await post(http, fake.base_url + "/messages/count_tokens", dict(body, model=CHAT_MODEL))
    assert via == direct


@pytest_twisted.ensureDeferred
async def test_count_tokens_without_a_tokenizer_is_501_not_a_guess(http, openai_gw, fake):
    client = sdk(openai_gw, max_retries=2)  # x-should-retry: false keeps the SDK from retrying
    try:
        before = len(fake.forwarded())
        with pytest.raises(anthropic.APIStatusError) as raised:
            await in_thread(client.messages.count_tokens, model=OPENAI_MODEL, messages=HELLO)
        assert raised.value.status_code == 501
        assert raised.value.response.headers["x-should-retry"] == "false"
        assert raised.value.body["type"] == "error" and "does not guess" in raised.value.body["error"]["message"]
        # A request that is no count_tokens request is told so first, as Anthropic answers it (it was the 501:
        # fixing the provider would only have led to the 400)
        with pytest.raises(anthropic.BadRequestError) as raised:
            await in_thread(client.messages.count_tokens, model=OPENAI_MODEL, messages="hello")
        assert raised.value.body["error"]["message"].startswith("messages:")
        assert len(fake.forwarded()) == before  # nothing went upstream
    finally:
        client.close()


# The three ways a count goes: natively (MODEL), by /tokenize (a vLLM without count_tokens) and to no tokenizer.
COUNTED = (MODEL, f"vllm-tok/{CHAT_MODEL}", OPENAI_MODEL)


@pytest_twisted.async_yield_fixture()
async def counting(reactor, fake):
    """C{(SDK client, the fake of a vLLM without count_tokens)} of a gateway counting each of L{COUNTED}'s ways."""
    no_count = await start_fake(reactor, messages="no_count")
    gateway = await start(reactor, {"VLLM_BASE_URL": fake.base_url, "VLLM_TOK_BASE_URL": no_count.base_url,
                                    "OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-up"})
    client = sdk(gateway)
    yield client, no_count
    await stop_all(gateway, no_count, clients=[client])


@pytest_twisted.ensureDeferred
async def test_count_tokens_checks_the_tool_choice_as_a_create_does(counting, fake):
    """A C{count_tokens} request whose C{tool_choice} a create refuses (one asking for a tool without tools, one
    naming a tool not declared, one of no known type) is the same 400 naming it, before any upstream: natively (a
    vLLM), by /tokenize (a vLLM without count_tokens, or a request that goes translated) and for a provider without
    a tokenizer (the 400 before its 501). Before, vLLM's own count said it in vLLM's words, /tokenize counted it as
    if it were none, and the others answered the 501 (fixing the provider would only have led to the 400)."""
    client, no_count = counting
    before = len(fake.forwarded()), len(no_count.forwarded())
    for model in COUNTED:
        for fields, said in (
                ({"tool_choice": {"type": "any"}},
                 "tool_choice: tool_choice of type 'any' may only be specified while providing tools"),
                ({"tool_choice": {"type": "tool", "name": "get_time"}, "tools": [WEATHER_TOOL]},
                 "tool_choice.name: tool 'get_time' is not one of the tools"),
                ({"tool_choice": {"type": "sometimes"}, "tools": [WEATHER_TOOL]},
                 "tool_choice.type: 'sometimes' is not one of 'auto', 'any', 'tool', 'none'")):
            with pytest.raises(anthropic.BadRequestError) as caught:
                await in_thread(client.messages.count_tokens, model=model, messages=HELLO, **fields)
            assert caught.value.body == {"type": "error", "error": {
                "type": "invalid_request_error", "message": said}}, (model, caught.value.body)
    assert (len(fake.forwarded()), len(no_count.forwarded())) == before
    counted = await in_thread(client.messages.count_tokens, model=MODEL, messages=HELLO, tools=[WEATHER_TOOL],
                              tool_choice={"type": "any"})
    assert counted.input_tokens > 0
    counted = await in_thread(client.messages.count_tokens, model=f"vllm-tok/{CHAT_MODEL}", messages=HELLO,
                              tool_choice={"type": "auto"})
    assert counted.input_tokens > 0


@pytest_twisted.ensureDeferred
async def test_count_tokens_refuses_a_creates_own_fields_and_takes_claude_codes(counting, fake):
    """A C{count_tokens} request sending a field of a create alone (C{max_tokens}, C{stream}, the sampling,
    C{metadata}, ...) is Anthropic's 400 naming the first sent (C{"max_tokens: Extra inputs are not permitted"}:
    its count refuses what its schema lacks), before any upstream: natively (a vLLM), by /tokenize and for a
    provider without a tokenizer (before its 501); a fault of the messages is named first. Before, it was counted
    (vLLM's count and /tokenize read them not), where Anthropic's refuses it. What Claude Code's count sends (model,
    messages, tools, a thinking budget where the messages hold thinking, its betas) is counted as before."""
    client, no_count = counting
    before = len(fake.forwarded()), len(no_count.forwarded())
    for model in COUNTED:
        for extra, said in (({"max_tokens": 1024}, "max_tokens"), ({"stream": False}, "stream"),
                            ({"temperature": 0.5, "max_tokens": 8}, "temperature"), ({"top_p": 0.9}, "top_p"),
                            ({"top_k": 5}, "top_k"), ({"stop_sequences": ["x"]}, "stop_sequences"),
                            ({"metadata": {"user_id": "u"}}, "metadata"), ({"service_tier": "auto"}, "service_tier")):
            with pytest.raises(anthropic.BadRequestError) as caught:
                await in_thread(client.messages.count_tokens, model=model, messages=HELLO, extra_body=extra)
            assert caught.value.body == {"type": "error", "error": {
                "type": "invalid_request_error", "message": f"{said}: Extra inputs are not permitted"}}, model
        with pytest.raises(anthropic.BadRequestError) as caught:  # (the messages' fault first, as a create's)
            await in_thread(client.messages.count_tokens, model=model, messages=[], extra_body={"max_tokens": 8})
        assert caught.value.body["error"]["message"] == "messages: at least one message is required"
    assert (len(fake.forwarded()), len(no_count.forwarded())) == before
    # Claude Code's count (its tokenEstimation: model, messages, tools, thinking where the messages hold some).
    for model, path in ((MODEL, b"/v1/messages/count_tokens"), (f"vllm-tok/{CHAT_MODEL}", b"/tokenize")):
        counted = await in_thread(client.beta.messages.count_tokens, model=model, messages=THOUGHT,
                                  tools=[WEATHER_TOOL], thinking={"type": "enabled", "budget_tokens": 1024},
                                  betas=["claude-code-20250219", "interleaved-thinking-2025-05-14"])
        assert counted.input_tokens > 0
        assert (fake if model == MODEL else no_count).last_request().path == path


# -- errors ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_auth_by_x_api_key_or_bearer_and_401s_in_anthropics_shape(http, gw):
    for good in (sdk(gw), sdk(gw, auth_token=KEY)):
        try:
            message = await in_thread(good.messages.create, model=MODEL, max_tokens=8, messages=HELLO)
            assert message.content[0].text == "héhéhé"
        finally:
            good.close()
    bad = sdk(gw, api_key="wrong")
    try:
        with pytest.raises(anthropic.AuthenticationError) as raised:
            await in_thread(bad.messages.create, model=MODEL, max_tokens=8, messages=HELLO)
        assert raised.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                                "message": "Invalid API key."}}
    finally:
        bad.close()
    response, content = await post(http, gw.url + "/v1/messages/count_tokens", {"model": MODEL, "messages": HELLO},
                                   Headers({"content-type": ["application/json"]}))
    assert response.code == 401 and json.loads(content)["error"]["type"] == "authentication_error"
    # x-api-key works on the OpenAI routes too.
    response, content = await post(http, gw.url + "/v1/chat/completions", {"model": MODEL, "messages": HELLO})
    assert response.code == 200 and json.loads(content)["object"] == "chat.completion"


@pytest_twisted.ensureDeferred
async def test_a_managed_key_by_x_api_key_keeps_its_allowlist_and_cache_salt(reactor, http, fake):
    other = await start_fake(reactor)
    gw = await start(reactor, {"VLLM_BASE_URL": fake.base_url, "OPENAI_BASE_URL": other.base_url,
                               "OPENAI_API_KEY": "sk-upstream"})
    try:
        response = await http.post(gw.url + "/admin/api/v1/auth-keys", headers=headers(),
                                   data=json.dumps({"name": "coder", "models": ["vllm/"]}).encode())
        secret = json.loads(await treq.content(response))["value"]
        client = sdk(gw, api_key=secret)
        try:
            message = await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO)
            assert message.content[0].text == "héhéhé"
            salt = fake.last_request().body["cache_salt"]  # vLLM's Messages take the tenant's prefix-cache salt
            assert len(salt) == 32
            with pytest.raises(anthropic.PermissionDeniedError) as denied:
                await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=8, messages=HELLO)
            assert denied.value.body["error"]["type"] == "permission_error"
            assert [m.id for m in (await in_thread(client.models.list)).data] == [MODEL]
        finally:
            client.close()
    finally:
        await gw.service.stopService()
        await other.stop()


@pytest_twisted.ensureDeferred
async def test_unknown_model_is_404_not_found_error(gw, client):
    with pytest.raises(anthropic.NotFoundError) as raised:
        await in_thread(client.messages.create, model="vllm/nope", max_tokens=8, messages=HELLO)
    assert raised.value.body["type"] == "error" and raised.value.body["error"]["type"] == "not_found_error"
    assert "vllm/nope" in raised.value.body["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_vllms_native_errors_get_anthropics_error_types_by_status(http, gw, fake):
    """vLLM's Messages errors name its exceptions ("BadRequestError"): the client gets Anthropic's type for the
    status, the message kept, no upstream address; an error of Anthropic's own type stays byte for byte."""
    host = fake.root_url.split("//")[1]
    cases = [(400, "BadRequestError", "invalid_request_error"),  # (a 401: the gateway's 502, see below)
             (403, "Forbidden", "permission_error"), (404, "NotFoundError", "not_found_error"),
             (429, "TooManyRequests", "rate_limit_error"), (500, "InternalServerError", "api_error"),
             (503, "ServiceUnavailableError", "overloaded_error"), (504, "GatewayTimeout", "timeout_error")]
    for status, vllm_type, expected in cases:
        for path, where in (("/v1/messages", host), ("/v1/messages", "vllm"), ("/v1/messages/count_tokens", "vllm")):
            vllm_error = {"type": "error", "error": {"type": vllm_type, "message": f"failed at {where} ({status})"}}
            body = {"model": MODEL, "messages": HELLO, "fake_status": status, "fake_body": json.dumps(vllm_error)}
            if path == "/v1/messages":  # (count_tokens takes no max_tokens)
                body["max_tokens"] = 8
            response, content = await post(http, gw.url + path, body)
            assert response.code == status, (path, status)
            assert json.loads(content) == {"type": "error", "error": {
                "type": expected, "message": f"failed at vllm ({status})"}}, (path, status)
    ours = json.dumps({"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}})
    response, content = await post(http, gw.url + "/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": HELLO,
                                                                   "fake_status": 400, "fake_body": ours})
    assert response.code == 400 and content == ours.encode()


@pytest_twisted.ensureDeferred
async def test_a_native_streams_error_event_gets_anthropics_type_and_no_upstream_address(http, gw, fake):
    host = fake.root_url.split("//")[1]
    start = json.dumps({"type": "message_start", "message": {
        "id": "m", "type": "message", "role": "assistant", "content": [], "model": CHAT_MODEL, "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 0}}})
    failed = json.dumps({"type": "error", "error": {"type": "internal_error", "message": f"engine died at {host}"}})
    body = {"model": MODEL, "max_tokens": 8, "messages": HELLO, "stream": True,
            "fake_events": [["message_start", start], ["error", failed]]}
    _, raw = await post(http, gw.url + "/v1/messages", body)
    assert events_of(raw) == [("message_start", json.loads(start)), ("error", {
        "type": "error", "error": {"type": "api_error", "message": "engine died at vllm"}})]
    ours = json.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    _, raw = await post(http, gw.url + "/v1/messages", dict(body, fake_events=[["message_start", start],
                                                                               ["error", ours]]))
    assert raw.endswith(b"event: error\ndata: " + ours.encode() + b"\n\n")  # Anthropic's own: as it came


@pytest_twisted.ensureDeferred
async def test_a_400_that_only_mentions_support_and_messages_keeps_the_provider_native(http, gw, fake):
    # A chat template's own refusal, not vLLM's "does not support Messages API".
    vllm_400 = {"type": "error", "error": {"type": "BadRequestError",
                                           "message": "This model does not support system messages."}}
    body = {"model": MODEL, "max_tokens": 8, "messages": HELLO, "fake_status": 400, "fake_body": json.dumps(vllm_400)}
    before = len(fake.forwarded())
    response, content = await post(http, gw.url + "/v1/messages", body)
    assert response.code == 400 and json.loads(content)["error"] == {
        "type": "invalid_request_error", "message": vllm_400["error"]["message"]}
    assert [r.path for r in fake.forwarded()[before:]] == [b"/v1/messages"]  # not retried translated
    response, _ = await post(http, gw.url + "/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": HELLO})
    assert response.code == 200 and fake.last_request().path == b"/v1/messages"  # still asked natively


def _sse_answer(status, reason, body):
    """A C{fake_raw} answer to C{/v1/messages} alone: C{status} with C{body} as an event stream."""
    return {"fake_raw_path": "/v1/messages", "fake_raw": (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/event-stream\r\nContent-Length: {len(body.encode())}"
        f"\r\nConnection: close\r\n\r\n{body}")}


@pytest_twisted.ensureDeferred
async def test_an_error_a_streamed_messages_request_is_answered_with_as_an_event_stream_is_read_as_its_data(
        gw, fake, client):
    """An upstream that answers a streamed native Messages request's error as an event stream (some servers do:
    its first event's data the error) is read as one answering it as JSON (L{gomodel.upstream.errors}): its
    404 of Anthropic's own, C{not_found_error}, is its answer (before: read as no such route, so the request went
    translated, a 200 for a model it said it lacks); vLLM's "does not support Messages API", with a 400, sends the
    model translated (before: the client got the 400)."""
    missing = json.dumps({"type": "error", "error": {"type": "not_found_error", "message": "model: gone"}})
    steer = _sse_answer(404, "Not Found", f"event: error\ndata: {missing}\n\n")
    with pytest.raises(anthropic.NotFoundError) as caught:
        await in_thread(lambda: list(client.messages.create(model=MODEL, max_tokens=8, messages=HELLO, stream=True,
                                                            extra_body=steer)))
    assert caught.value.body == json.loads(missing)
    assert [r.path for r in fake.forwarded()] == [b"/v1/messages"]  # (not translated)
    unsupported = json.dumps({"error": {"message": "The model does not support Messages API",
                                        "type": "BadRequestError", "code": 400}})
    steer = _sse_answer(400, "Bad Request", f"data: {unsupported}\n\ndata: [DONE]\n\n")
    events = await in_thread(lambda: list(client.messages.create(model=MODEL, max_tokens=8, messages=HELLO,
                                                                 stream=True, extra_body=steer)))
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == "héhéhé"
    assert [r.path for r in fake.forwarded()][1:] == [b"/v1/messages", b"/v1/chat/completions"]


@pytest_twisted.ensureDeferred
async def test_too_large_and_wrong_method_in_anthropics_shape(reactor, http, fake):
    gw = await start(reactor, {"VLLM_BASE_URL": fake.base_url, "BODY_SIZE_LIMIT": "2KB"})
    try:
        big = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "x" * 4096}]}
        response, content = await post(http, gw.url + "/v1/messages", big)
        assert response.code == 413
        assert json.loads(content)["error"]["type"] == "request_too_large"
        response = await http.get(gw.url + "/v1/messages", headers=headers())
        error = json.loads(await treq.content(response))
        assert response.code == 405 and error["type"] == "error"
        assert error["error"]["type"] == "invalid_request_error"
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_busy_replicas_are_429_rate_limit_error_with_retry_after(reactor, fake):
    gw = await start(reactor, {"VLLM_BASE_URL": fake.base_url, "REPLICA_MAX_CONCURRENCY": "1",
                               "ROUTING_QUEUE_TIMEOUT": "0.2"})
    client = sdk(gw)
    holder = None
    try:
        arrived = fake.next_request()
        holder = await connect(reactor, gw.port, _raw({"model": MODEL, "max_tokens": 8, "messages": HELLO,
                                                       "fake_hang": True}))
        await with_timeout(reactor, arrived, 5)
        with pytest.raises(anthropic.RateLimitError) as raised:
            await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO)
        assert raised.value.response.headers["retry-after"] == "1"
        assert raised.value.body["error"]["type"] == "rate_limit_error"
    finally:
        if holder is not None:
            holder.transport.abortConnection()
        client.close()
        await gw.service.stopService()


def sends(fake):
    """The Messages requests C{fake} was sent."""
    return sum(1 for r in fake.requests if r.path == b"/v1/messages")


def _refused(retry_after):
    """A raw 429 answer of an upstream asking to wait C{retry_after} (a provider's daily quota: hours)."""
    body = json.dumps({"error": {"message": "Daily quota reached.", "type": "rate_limit_error", "code": 429}})
    return (f"HTTP/1.1 429 Too Many Requests\r\nRetry-After: {retry_after}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}")


@pytest_twisted.ensureDeferred
async def test_an_upstreams_long_retry_after_tells_the_sdk_not_to_sleep_through_it(reactor, gw, fake):
    """An upstream's 429 asking for hours (as seconds or as a date): its C{Retry-After} kept, with
    C{x-should-retry: false}. Before, the anthropic SDK slept the hours before each of its retries."""
    client = sdk(gw, max_retries=2)
    try:
        for retry_after in ("7200", "Fri, 31 Dec 2100 23:59:59 GMT"):
            sent = sends(fake)
            call = in_daemon_thread(reactor, client.messages.create, model=MODEL, max_tokens=8, messages=HELLO,
                                    extra_body={"fake_raw": _refused(retry_after)})
            with pytest.raises(anthropic.RateLimitError) as raised:
                await with_timeout(reactor, call, 10)
            headers = raised.value.response.headers
            assert (headers["retry-after"], headers["x-should-retry"]) == (retry_after, "false")
            assert sends(fake) == sent + 1  # sent once
            assert raised.value.body["error"]["message"] == "Daily quota reached."
        sent = sends(fake)
        call = in_daemon_thread(reactor, client.messages.create, model=MODEL, max_tokens=8, messages=HELLO,
                                extra_body={"fake_raw": _refused("1")})
        with pytest.raises(anthropic.RateLimitError) as raised:
            await with_timeout(reactor, call, 10)
        assert "x-should-retry" not in raised.value.response.headers and sends(fake) == sent + 3  # retried
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_no_ready_replica_is_503_overloaded_and_unreachable_is_502_api_error(reactor, fake):
    gw = await start_gateway(reactor, {"GOMODEL_MASTER_KEY": KEY, "VLLM_MODELS": CHAT_MODEL,
                                       "VLLM_BASE_URL": await dead_base_url(reactor)}, wait_ready=False)
    client = sdk(gw)
    try:
        with pytest.raises(anthropic.APIStatusError) as raised:
            await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO)
        assert raised.value.status_code == 503 and raised.value.response.headers["retry-after"] == "5"
        assert raised.value.body["error"]["type"] == "overloaded_error"
        assert "127.0.0.1" not in json.dumps(raised.value.body)
    finally:
        client.close()
        await gw.service.stopService()
    from tests.fakes.fleet import FakeReplica

    replica = await FakeReplica(reactor).start()
    gw = await start(reactor, {"VLLM_BASE_URL": replica.base_url})
    client = sdk(gw)
    try:
        await replica.refuse()  # ready, then unreachable
        with pytest.raises(anthropic.InternalServerError) as raised:
            await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO)
        assert raised.value.status_code == 502
        assert raised.value.body["error"]["type"] == "api_error"
        assert "127.0.0.1" not in json.dumps(raised.value.body)
    finally:
        client.close()
        await gw.service.stopService()
        await replica.stop()


@pytest_twisted.ensureDeferred
async def test_an_upstream_timeout_is_504_timeout_error(reactor, fake):
    # Anthropic's 504 is timeout_error (its SDK's GatewayTimeoutErrorObject), not api_error. The upstreams' timeouts
    # run on a Clock, advanced once the upstream holds the request (before, 0.2 s of wall clock timed out the
    # replica's own checks too on a loaded host: a 503, not a 504).
    clock = Clock()
    gw = await start_gateway(reactor, {"GOMODEL_MASTER_KEY": KEY, "VLLM_BASE_URL": fake.base_url,
                                       "HTTP_RESPONSE_HEADER_TIMEOUT": "30s"}, timeouts_clock=clock)
    client = sdk(gw)
    try:
        arrived = fake.next_request()
        answer = in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO,
                           extra_body={"fake_hang": True})
        await with_timeout(reactor, arrived, 10)
        clock.advance(30)
        with pytest.raises(anthropic.APIStatusError) as raised:
            await answer
        assert raised.value.status_code == 504
        assert raised.value.body["error"]["type"] == "timeout_error"
    finally:
        client.close()
        await gw.service.stopService()


# -- streams that end badly ------------------------------------------------------------------


def _raw(body, path=b"/v1/messages"):
    data = json.dumps(body).encode()
    return (b"POST " + path + b" HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b"x-api-key: " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(data) + data)


@pytest_twisted.ensureDeferred
async def test_client_leaving_mid_stream_closes_the_upstream(reactor, gw, fake):
    body = {"model": MODEL, "max_tokens": 8, "messages": HELLO, "stream": True, "fake_chunks": 200, "fake_pace": 0.02}
    arrived = fake.next_request(b"/v1/messages")
    client = await connect(reactor, gw.port, _raw(body))
    await with_timeout(reactor, client.wait_for(b'"text_delta"'), 5)
    record = await arrived  # (before, the fake's last request: its replica's scrape, every 2 s, when one came since)
    client.transport.abortConnection()
    await assert_upstream_closed_promptly(reactor, record)  # (the stream, 4 s, would have ended "finished")


@pytest_twisted.ensureDeferred
async def test_client_leaving_before_the_answer_closes_the_upstream(reactor, gw, fake):
    for stream in (True, False):
        arrived = fake.next_request(b"/v1/messages")  # (not the next request: a scrape of the replica may come first)
        client = await connect(reactor, gw.port, _raw({"model": MODEL, "max_tokens": 8, "messages": HELLO,
                                                       "stream": stream, "fake_hang": True}))
        record = await with_timeout(reactor, arrived, 5)
        client.transport.abortConnection()
        await assert_upstream_closed_promptly(reactor, record)  # (in the reactor's turns, not 2 s of wall clock)


@pytest_twisted.ensureDeferred
async def test_broken_upstream_stream_ends_with_an_error_event_never_cleanly(reactor, gw, client):
    body = {"model": MODEL, "max_tokens": 8, "messages": HELLO, "stream": True, "fake_die_after": 4}
    raw = await connect(reactor, gw.port, _raw(body))
    await with_timeout(reactor, raw.lost, 5)
    received = bytes(raw.received)
    assert b"event: message_start" in received
    assert b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"The stream ended abnormally' \
        in received
    assert not received.endswith(b"0\r\n\r\n") and b"message_stop" not in received
    # The SDK raises; it never sees a clean end.
    for fault in ({"fake_die_after": 4}, {"fake_no_stop": True}):
        with pytest.raises(anthropic.APIError) as raised:
            await in_thread(collect, client.messages.stream(model=MODEL, max_tokens=8, messages=HELLO,
                                                            extra_body=fault))
        assert "abnormally" in str(raised.value)


# -- usage, affinity, models -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_usage_with_cache_reads_reaches_metrics(http, gw, client):
    extra = {"fake_cached": 10}
    message = await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO, extra_body=extra)
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (8, 10)
    _, final = await in_thread(collect, client.messages.stream(model=MODEL, max_tokens=8, messages=HELLO,
                                                               extra_body=extra))
    assert final.usage.output_tokens == 3
    await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO)
    found = await scrape(http, gw)
    labels = {"model": MODEL}
    assert tokens(found, "input", **labels) == 3 * 18  # input + cache reads: every prompt token
    assert tokens(found, "cached", **labels) == 2 * 10
    assert tokens(found, "output", **labels) == 3 * 3


def test_claude_code_session_and_metadata_user_id_are_affinity_keys():
    class Request:
        def __init__(self, body, **values):
            self.requestHeaders = Headers({k.replace("_", "-"): [v] for k, v in values.items()})
            self.content = io.BytesIO(json.dumps(body).encode())

    def key(body, **headers):
        return affinity_key(Request(body, **headers), body)

    body = {"model": MODEL, "max_tokens": 8, "messages": HELLO, "metadata": {"user_id": "user_abc_session_1"}}
    session = key(body, x_claude_code_session_id="sess-1")
    assert session == key({"session_id": "sess-1"}) and session.startswith("s:")
    assert "sess-1" not in session  # a hash: no session id or user leaves the process (shared pins)
    user = key(body)
    assert user == key({"user": "user_abc_session_1"}) != session
    # Without a session, a long conversation's opening: its system prompt and first user message.
    system = [{"type": "text", "text": "You are Claude Code. " * 40}]
    one = key({"system": system, "messages": HELLO})
    later = HELLO + [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "More."}]
    assert key({"system": system, "messages": later}) == one and one.startswith("p:")
    other = key({"system": system, "messages": [{"role": "user", "content": "Other."}]})
    assert other.startswith("p:") and other != one


@pytest_twisted.ensureDeferred
async def test_models_in_anthropics_shape_for_anthropic_clients(http, gw, client):
    page = await in_thread(client.models.list)
    assert [m.id for m in page.data] == [MODEL]
    model = page.data[0]
    assert model.type == "model" and model.display_name == MODEL
    assert model.created_at.year == 2023 and model.max_input_tokens == 2048
    assert (await in_thread(client.models.retrieve, MODEL)).id == MODEL
    with pytest.raises(anthropic.NotFoundError) as raised:
        await in_thread(client.models.retrieve, "vllm/nope")
    assert raised.value.body["error"]["type"] == "not_found_error"
    response = await http.get(gw.url + "/v1/models?limit=1", headers=headers())
    assert json.loads(await treq.content(response)) == {
        "data": [{"type": "model", "id": MODEL, "display_name": MODEL, "created_at": "2023-11-14T22:13:20Z",
                  "lifecycle": "active", "max_input_tokens": 2048}],
        "has_more": False, "first_id": MODEL, "last_id": MODEL}
    # Without anthropic-version, OpenAI's list as before.
    response = await http.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert json.loads(await treq.content(response))["object"] == "list"


@pytest_twisted.ensureDeferred
async def test_the_anthropic_sdk_reads_the_request_id_of_every_answer(http, gw, client):
    """Anthropic's name for it, C{request-id}, which its SDK reads (C{_request_id}, an error's C{request_id})
    beside C{X-Request-Id}, on every Anthropic route: before, both were None, and a Claude Code user had no id
    to find a failed request by in the gateway's access log or request log."""
    message = await in_thread(client.messages.with_raw_response.create, model=MODEL, max_tokens=5, messages=HELLO)
    assert message.headers["request-id"] == message.headers["x-request-id"] == message.parse()._request_id
    stream = await in_thread(client.messages.with_raw_response.create, model=MODEL, max_tokens=5, messages=HELLO,
                             stream=True)
    assert stream.headers["request-id"] == stream.headers["x-request-id"]
    await in_thread(lambda: list(stream.parse()))
    assert (await in_thread(client.messages.count_tokens, model=MODEL, messages=HELLO))._request_id
    models = await in_thread(client.models.with_raw_response.list)
    assert models.headers["request-id"] == models.headers["x-request-id"]
    calls = [lambda: client.messages.create(model="vllm/nope", max_tokens=5, messages=HELLO),
             lambda: client.messages.batches.retrieve("msgbatch_nope"), lambda: client.models.retrieve("vllm/nope"),
             lambda: sdk(gw, api_key="wrong").messages.create(model=MODEL, max_tokens=5, messages=HELLO)]
    for call in calls:
        with pytest.raises(anthropic.APIStatusError) as raised:
            await in_thread(call)
        assert raised.value.request_id == raised.value.response.headers["x-request-id"]
    response = await http.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert response.headers.getRawHeaders("request-id") is None  # OpenAI's clients read X-Request-Id alone


@pytest_twisted.ensureDeferred
async def test_unknown_paths_under_messages_and_wrong_methods_answer_in_anthropics_shape(http, gw, client):
    # A message batch nobody made: the SDK gets Anthropic's not_found_error, not OpenAI's envelope.
    for call in (client.messages.batches.retrieve, client.messages.batches.cancel, client.messages.batches.results,
                 client.messages.batches.delete):
        with pytest.raises(anthropic.NotFoundError) as raised:
            await in_thread(call, "msgbatch_1")
        assert raised.value.body == {"type": "error", "error": {"type": "not_found_error",
                                                                "message": "No message batch 'msgbatch_1'."}}

    async def answer(method, path, with_headers=None):
        response = await http.request(method, gw.url + path, headers=with_headers or headers(), data=b"{}")
        return response.code, json.loads(await treq.content(response))

    for method, path in (("GET", "/v1/messages/"), ("POST", "/v1/messages/"), ("DELETE", "/v1/messages/x/y")):
        assert await answer(method, path) == (404, {"type": "error", "error": {
            "type": "not_found_error", "message": f"Unknown route: {method} {path}."}})
    for method, path in (("GET", "/v1/messages"), ("DELETE", "/v1/messages/count_tokens")):
        code, error = await answer(method, path)
        assert code == 405 and error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    # refused before routing (no key), still Anthropic's shape
    code, error = await answer("GET", "/v1/messages/batches", Headers({"anthropic-version": ["2023-06-01"]}))
    assert code == 401 and error["type"] == "error" and error["error"]["type"] == "authentication_error"


@pytest_twisted.ensureDeferred
async def test_what_fails_before_a_models_handler_is_in_anthropics_shape_for_anthropic_clients(reactor, gw):
    """The model routes answer an Anthropic client (anthropic-version) in its shape: so do a path that is no
    UTF-8 once percent-decoded (refused before any route reads it) and a refused key; others get OpenAI's."""
    async def answer(target, *lines):
        client = await connect(reactor, gw.port, b"GET " + target + b" HTTP/1.1\r\nHost: g\r\n"
                               + b"".join(line + b"\r\n" for line in lines) + b"Connection: close\r\n\r\n")
        await with_timeout(reactor, client.lost, 10)
        head, _, body = bytes(client.received).partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), json.loads(body)

    key, version = b"x-api-key: " + KEY.encode(), b"anthropic-version: 2023-06-01"
    for target in (b"/v1/models/%ff", b"/v1/models/vllm/%C0x", b"/v1/messages/%ff"):
        code, error = await answer(target, key, version)
        assert (code, error["type"], error["error"]["type"]) == (400, "error", "invalid_request_error"), target
        assert "UTF-8" in error["error"]["message"]
    for target in (b"/v1/models/%ff", b"/v1/models/vllm/%C0x"):
        code, error = await answer(target, key)  # an OpenAI client's
        assert code == 400 and error["error"]["code"] == "invalid_url"
    for target in (b"/v1/models", b"/v1/models/" + MODEL.encode(), b"/v1/models/%ff"):
        code, error = await answer(target, b"x-api-key: wrong", version)
        assert (code, error["type"], error["error"]["type"]) == (401, "error", "authentication_error"), target
        code, error = await answer(target, b"x-api-key: wrong")
        assert code == 401 and error["error"]["code"] == "invalid_api_key", target
    code, error = await answer(b"/v1/modelsx", key, version)  # not the model list's
    assert code == 404 and error["error"]["code"] == "not_found"


def _chunk_text(delta, finish=None):
    return json.dumps({"id": "chatcmpl-x", "object": "chat.completion.chunk", "model": CHAT_MODEL,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


@pytest_twisted.ensureDeferred
async def test_a_translated_stream_with_an_event_that_is_no_chat_chunk_ends_in_an_error(reactor, openai_gw, fake):
    whole = _chunk_text({"content": "B"})
    client = sdk(openai_gw)
    try:
        for odd in (whole[:30], "[1, 2]", "not json"):  # cut short, no object, no JSON
            fake.steer = {"fake_sse": [_chunk_text({"role": "assistant", "content": "A"}), odd,
                                       _chunk_text({"content": "C"}, "stop"), "[DONE]"], "fake_pace": 0.05}
            with pytest.raises(anthropic.APIError) as raised:  # never a message that silently lacks "B"
                await in_thread(collect, client.messages.stream(model=OPENAI_MODEL, max_tokens=8, messages=HELLO))
            assert "abnormally" in str(raised.value), odd
            body = {"model": OPENAI_MODEL, "max_tokens": 8, "messages": HELLO, "stream": True}
            raw = await connect(reactor, openai_gw.port, _raw(body))
            await with_timeout(reactor, raw.lost, 5)
            assert b"event: error" in raw.received and b"message_stop" not in raw.received
            # The first event already odd: nothing went out, so the error is the answer, never a 200 holding it.
            fake.steer = {"fake_sse": [odd, _chunk_text({"content": "C"}, "stop"), "[DONE]"]}
            with pytest.raises(anthropic.APIStatusError) as raised:
                await in_thread(collect, client.messages.stream(model=OPENAI_MODEL, max_tokens=8, messages=HELLO))
            assert raised.value.status_code == 502 and "abnormally" in str(raised.value), odd
            assert raised.value.body["type"] == "error"
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_an_in_band_error_of_a_translated_stream_never_shows_the_upstreams_address(reactor, openai_gw, fake):
    error = {"error": {"message": f"Engine at {fake.base_url}/chat/completions died.", "type": "InternalServerError"}}
    fake.steer = {"fake_sse": [_chunk_text({"role": "assistant", "content": "A"}), json.dumps(error)]}
    body = {"model": OPENAI_MODEL, "max_tokens": 8, "messages": HELLO, "stream": True}
    raw = await connect(reactor, openai_gw.port, _raw(body))
    await with_timeout(reactor, raw.wait_for(b"event: error\ndata: "), 5)
    await with_timeout(reactor, raw.wait_for(b"}}\n\n"), 5)
    raw.transport.loseConnection()
    received = bytes(raw.received)
    event = json.loads(received.split(b"event: error\ndata: ", 1)[1].split(b"\n", 1)[0])
    assert fake.root_url.split("//")[1].encode() not in received  # (host and port)
    assert event["error"]["message"] == "Engine at openai/chat/completions died."


@pytest_twisted.ensureDeferred
async def test_an_upstreams_refusal_is_the_messages_text_streamed_as_whole(openai_gw, fake):
    # OpenAI streams a refusal in delta.refusal (content null): the stream tells it as text, as a whole answer does.
    fake.steer = {"fake_sse": [_chunk_text({"role": "assistant", "content": None, "refusal": ""}),
                               _chunk_text({"refusal": "I can't "}), _chunk_text({"refusal": "help with that."}),
                               _chunk_text({}, "stop"), "[DONE]"]}
    client = sdk(openai_gw)
    try:
        seen, final = await in_thread(collect, client.messages.stream(model=OPENAI_MODEL, max_tokens=8,
                                                                      messages=HELLO))
        assert [(block.type, block.text) for block in final.content] == [("text", "I can't help with that.")]
        assert final.stop_reason == "end_turn" and seen[-1].type == "message_stop"
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_an_empty_translated_stream_is_the_empty_text_block_of_its_whole_answer(openai_gw, fake):
    """An upstream that ends at once (no token: an immediate stop) answers a whole request with one empty text
    block, Anthropic's and vLLM's shape; its stream gives the same message to the SDK's C{get_final_message}, that
    block started and stopped. Before, the stream had no block: C{content} was C{[]}, not the whole answer's."""
    usage = {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}
    fake.steer = {"fake_status": 200, "fake_body": json.dumps({
        "id": "chatcmpl-x", "object": "chat.completion", "model": CHAT_MODEL, "usage": usage, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]})}
    client = sdk(openai_gw)
    try:
        whole = await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=8, messages=HELLO)
        fake.steer = {"fake_sse": [_chunk_text({"role": "assistant", "content": ""}), _chunk_text({}, "stop"),
                                   json.dumps({"id": "chatcmpl-x", "choices": [], "usage": usage}), "[DONE]"]}
        seen, final = await in_thread(collect, client.messages.stream(model=OPENAI_MODEL, max_tokens=8,
                                                                      messages=HELLO))
    finally:
        client.close()
    assert [(block.type, block.text) for block in whole.content] == [("text", "")]
    assert final.model_dump(exclude={"id"}) == whole.model_dump(exclude={"id"})
    assert [event.type for event in seen] == ["message_start", "content_block_start", "content_block_stop",
                                              "message_delta", "message_stop"]


@pytest_twisted.ensureDeferred
async def test_text_and_thinking_held_behind_a_streamed_tool_call_end_with_their_block_stop(http, openai_gw, fake):
    # Text (or reasoning) that comes while the tool_use block is open is sent after it: its block too is stopped
    # before message_delta (a client such as Claude Code takes a block only at its content_block_stop).
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    arguments = {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
    body = {"model": OPENAI_MODEL, "max_tokens": 64, "tools": [WEATHER_TOOL], "messages": HELLO, "stream": True}
    for late, kind in (({"content": " Done."}, "text"), ({"reasoning_content": "Hm."}, "thinking")):
        fake.steer = {"fake_finish": "tool_calls", "fake_deltas": [
            {"content": "Let me look."}, {"tool_calls": [call]}, {"tool_calls": [arguments]}, late]}
        response, raw = await post(http, openai_gw.url + "/v1/messages", body)
        events = events_of(raw)
        starts = [payload for name, payload in events if name == "content_block_start"]
        assert [start["content_block"]["type"] for start in starts] == ["text", "tool_use", kind]
        stopped = [payload["index"] for name, payload in events if name == "content_block_stop"]
        assert [start["index"] for start in starts] == stopped == [0, 1, 2], (kind, [name for name, _ in events])
        assert [name for name, _ in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]


@pytest_twisted.ensureDeferred
async def test_parallel_tool_calls_sharing_one_index_stay_apart_when_translated(http, openai_gw, fake):
    """Ollama (ollama#15457) and Grok stream every call of a turn at index 0, each with its own id: a new id
    at an index in use is a new call, never fragments of the first (before: one call, arguments glued into
    invalid JSON, the second lost). Fragments without an id go on with the last call begun at that index;
    an id repeated on every fragment (vLLM's way with some parsers) is the same call."""
    def call(call_id, name, arguments):
        return {"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                "function": {"name": name, "arguments": arguments}}]}

    def fragment(arguments, call_id=None):
        part = {"index": 0, "function": {"arguments": arguments}}
        if call_id:
            part["id"] = call_id
        return {"tool_calls": [part]}

    shapes = ([call("call_a", "get_weather", '{"city": "Paris"}'), call("call_b", "get_weather", '{"city": "Oslo"}')],
              [call("call_a", "get_weather", ""), fragment('{"city": "Paris"}'),
               call("call_b", "get_weather", ""), fragment('{"city": '), fragment('"Oslo"}')],
              [call("call_a", "get_weather", ""), fragment('{"city": ', "call_a"), fragment('"Paris"}', "call_a"),
               call("call_b", "get_weather", ""), fragment('{"city": "Oslo"}', "call_b")],
              # (a server that puts a fresh id on every fragment: a fragment names no function, so goes on)
              [call("call_a", "get_weather", ""), fragment('{"city": ', "x1"), fragment('"Paris"}', "x2"),
               {"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city": '}}]},
               {"tool_calls": [{"index": 1, "id": "x3", "function": {"arguments": '"Oslo"}'}}]}])
    client = sdk(openai_gw)
    try:
        for deltas in shapes:
            fake.steer = {"fake_finish": "tool_calls", "fake_deltas": deltas}
            seen, final = await in_thread(collect, client.messages.stream(
                model=OPENAI_MODEL, max_tokens=64, tools=[WEATHER_TOOL], messages=HELLO))
            assert [(block.type, block.id, block.input) for block in final.content] == [
                ("tool_use", "call_a", {"city": "Paris"}), ("tool_use", "call_b", {"city": "Oslo"})], deltas
            assert final.stop_reason == "tool_use"
            # The same stream sent unasked to a plain request: gathered into one chat completion, then one message.
            fake.steer["stream"] = True
            response, raw = await post(http, openai_gw.url + "/v1/messages", {
                "model": OPENAI_MODEL, "max_tokens": 64, "tools": [WEATHER_TOOL], "messages": HELLO})
            assert response.code == 200
            assert [(b["id"], b["input"]) for b in json.loads(raw)["content"]] == [
                ("call_a", {"city": "Paris"}), ("call_b", {"city": "Oslo"})], deltas
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_stream_ends_for_its_client_at_its_last_event_though_the_upstreams_body_does_not(
        reactor, gw, openai_gw, fake):
    """The anthropic SDKs read a stream to its body's end, not to message_stop: an upstream that holds its body
    open after its last event ([DONE], message_stop) is closed soon after it, and the client's answer ends
    whole (before: the client waited HTTP_STREAM_IDLE_TIMEOUT, 5 minutes, then the SDK timed out)."""
    for gateway, model in ((openai_gw, OPENAI_MODEL), (gw, MODEL)):  # translated, native
        fake.steer = {"fake_after_done": "hold"}
        client = sdk(gateway)
        try:
            arrived = fake.next_request()
            seen, final = await in_thread(collect, client.messages.stream(model=model, max_tokens=8, messages=HELLO))
            assert seen[-1].type == "message_stop" and final.content[0].text == "héhéhé", model
            assert (final.usage.input_tokens, final.usage.output_tokens) == (18, 3)
            how, _ = await with_timeout(reactor, (await arrived).closed, 5)
            assert how == "lost"  # the held upstream is closed, not left open
        finally:
            client.close()
            fake.steer = {}


@pytest_twisted.ensureDeferred
async def test_ctx_and_msg_are_no_roles_when_translating(http, openai_gw, fake):
    """"ctx" and "msg" are no roles: vllm#44000 read them off a pydantic error's keys (Claude Code 2.1.154 and later
    send a "system" message, taken). Translated, a message with either is refused before anything goes upstream,
    as vLLM 0.32 refuses it natively and Anthropic does (before: sent on as a user turn)."""
    client = sdk(openai_gw)
    try:
        before = len(fake.forwarded())
        for role in ("ctx", "msg", "robot"):
            with pytest.raises(anthropic.BadRequestError) as raised:
                await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=8,
                                messages=[{"role": "user", "content": "Hi."}, {"role": role, "content": "Hi."}])
            assert raised.value.body["error"]["message"] == \
                "messages.1.role: Input should be 'user', 'assistant' or 'system'"
        assert len(fake.forwarded()) == before
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_tool_changes_in_a_system_message_are_taken_when_translating(http, openai_gw, fake):
    """Claude Code announces a tool that comes mid-conversation (an MCP server that connected) with tool_addition
    and tool_removal blocks in a system message (the mid-conversation-tool-changes beta): a chat upstream gets the
    tools in effect at the end, as vLLM 0.32 resolves them (before: every tool, a removed one too, and none added
    by value), and the message's text joins the system prompt (before: a 400 on that request and on every later
    one of the session, which keeps the block in its history). A change naming a tool that is not declared is a
    400, as vLLM's; in the request's own system prompt they are refused, as Anthropic refuses them there."""
    old_tool = dict(WEATHER_TOOL, name="old_tool")
    new_tool = dict(WEATHER_TOOL, name="new_tool")
    change = [{"type": "text", "text": "The weather server connected."},
              {"type": "tool_addition", "tool": {"type": "tool_reference", "name": "get_weather"}},
              {"type": "tool_addition", "tool": {"type": "tool_definition", "definition": new_tool}},
              {"type": "tool_removal", "tool": {"type": "tool_reference", "name": "old_tool"}}]
    client = sdk(openai_gw)
    try:
        message = await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=8, system="Be brief.",
                                  tools=[dict(WEATHER_TOOL, defer_loading=True), old_tool],
                                  messages=[{"role": "user", "content": "Hi."},
                                            {"role": "assistant", "content": "Hello."},
                                            {"role": "system", "content": change},
                                            {"role": "user", "content": "Weather in Paris?"}])
        assert message.content[0].text == "héhéhé"
        sent = fake.last_request().body
        assert sent["messages"][0] == {"role": "system", "content": "Be brief.\n\nThe weather server connected."}
        assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user"]
        assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather", "new_tool"]
        before = len(fake.forwarded())
        with pytest.raises(anthropic.BadRequestError) as raised:
            await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=8, tools=[WEATHER_TOOL],
                            messages=[{"role": "user", "content": "Hi."}, {"role": "system", "content": change[3:]}])
        assert raised.value.body["error"]["message"] == (
            "messages.1.content.0.tool: tool_removal references tool 'old_tool', which is not declared in tools")
        with pytest.raises(anthropic.BadRequestError) as raised:
            await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=8, system=change, messages=HELLO)
        assert raised.value.body["error"]["message"].startswith("system.1: ")
        assert len(fake.forwarded()) == before
    finally:
        client.close()


def _aborted_native_events():
    """vLLM's native Messages events of a generation it aborted (finish_reason "abort" or "error", which its
    stop_reason map has no entry for): a message_delta whose stop_reason is null, then message_stop."""
    start = {"type": "message_start", "message": {
        "id": "m", "type": "message", "role": "assistant", "content": [], "model": CHAT_MODEL, "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 0}}}
    return [["message_start", start],
            ["content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}],
            ["content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "Half an ans"}}],
            ["content_block_stop", {"type": "content_block_stop", "index": 0}],
            ["message_delta", {"type": "message_delta", "delta": {"stop_reason": None},
                               "usage": {"input_tokens": 3, "output_tokens": 4}}],
            ["message_stop", {"type": "message_stop"}]]


@pytest_twisted.ensureDeferred
async def test_a_generation_vllm_aborted_natively_is_an_error_never_a_finished_message(http, gw, fake, client):
    """vLLM's own Messages API tells an aborted generation (finish_reason abort or error) by a null stop_reason,
    then ends as usual: the client gets an error (a 502, or the stream's error event, no message_stop), as when
    translating (before: a message that looked finished, its answer cut)."""
    extra = {"fake_events": _aborted_native_events()}
    with pytest.raises(anthropic.APIStatusError) as raised:  # streamed
        await in_thread(collect, client.messages.stream(model=MODEL, max_tokens=8, messages=HELLO, extra_body=extra))
    assert raised.value.body["error"]["type"] == "api_error" and "not whole" in raised.value.body["error"]["message"]
    _, raw = await post(http, gw.url + "/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": HELLO,
                                                        "stream": True, **extra})
    assert [kind for kind, _ in events_of(raw)][-2:] == ["content_block_stop", "error"]
    for whole in ({}, {"stream": True, "fake_whole": True}):  # plain, and a whole answer to a stream
        response, content = await post(http, gw.url + "/v1/messages",
                                       {"model": MODEL, "max_tokens": 8, "messages": HELLO, **extra, **whole})
        assert response.code == 502, whole
        error = json.loads(content)
        assert error["type"] == "error" and "not whole" in error["error"]["message"]
    with pytest.raises(anthropic.InternalServerError):
        await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO, extra_body=extra)
    # A finished one is still relayed byte for byte.
    response, content = await post(http, gw.url + "/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": HELLO})
    assert response.code == 200 and json.loads(content)["stop_reason"] == "max_tokens"


@pytest_twisted.ensureDeferred
async def test_stop_sequences_to_a_vllm_are_reported_as_anthropic_reports_them(http, gw, fake, client):
    """vLLM's own Messages API says end_turn, and no stop_sequence, when a stop sequence ended the answer (its
    chat completion names the sequence, its Messages API drops it): a request with stop_sequences goes to a vLLM
    translated, and its answer says stop_sequence and which one, streamed or not (before: end_turn, null).
    A request without them stays native."""
    chat = {"id": "chatcmpl-s", "object": "chat.completion", "created": 1, "model": CHAT_MODEL, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop",
         "stop_reason": "END"}], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    fake.steer = {"fake_status": 200, "fake_body": json.dumps(chat)}
    message = await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO,
                              stop_sequences=["END"])
    sent = fake.last_request()
    assert sent.path == b"/v1/chat/completions" and sent.body["stop"] == ["END"]
    assert (message.stop_reason, message.stop_sequence, message.content[0].text) == ("stop_sequence", "END", "Hi")
    fake.steer = {"fake_sse": [_chunk_text({"role": "assistant", "content": "Hi"}),
                               json.dumps({"id": "chatcmpl-s", "object": "chat.completion.chunk", "model": CHAT_MODEL,
                                           "choices": [{"index": 0, "delta": {}, "finish_reason": "stop",
                                                        "stop_reason": "END"}]}), "[DONE]"]}
    seen, final = await in_thread(collect, client.messages.stream(model=MODEL, max_tokens=8, messages=HELLO,
                                                                  stop_sequences=["END"]))
    assert fake.last_request().path == b"/v1/chat/completions"
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "END")
    fake.steer = {}
    await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO, stop_sequences=[])
    assert fake.last_request().path == b"/v1/messages"


@pytest_twisted.ensureDeferred
async def test_an_empty_or_blank_stop_sequence_is_anthropics_400(http, gw, openai_gw, fake):
    """A stop sequence that is empty or nothing but whitespace is Anthropic's 400, in its words ("stop_sequences:
    each stop sequence must be non-empty", "... must contain non-whitespace"), for a vLLM or translated, streamed or
    not, before any upstream; the first such in the list is named. Before, they went on: a newline stopped the
    answer at its first line, an empty one went to the provider as it was."""
    before = len(fake.forwarded())
    empty = "stop_sequences: each stop sequence must be non-empty"
    blank = "stop_sequences: each stop sequence must contain non-whitespace"
    for stops, said in ((["\n"], blank), (["END", " \t"], blank), ([""], empty), (["", "\n"], empty),
                        (["END", "\n", ""], blank)):
        for gateway, model in ((gw, MODEL), (openai_gw, OPENAI_MODEL)):
            for stream in (False, True):
                response, answer = await post(http, gateway.url + "/v1/messages", {
                    "model": model, "max_tokens": 8, "messages": HELLO, "stop_sequences": stops, "stream": stream})
                assert response.code == 400 and json.loads(answer) == {
                    "type": "error", "error": {"type": "invalid_request_error", "message": said}}, (stops, answer)
    assert len(fake.forwarded()) == before
    response, answer = await post(http, gw.url + "/v1/messages", {
        "model": MODEL, "max_tokens": 8, "messages": HELLO, "stop_sequences": [" END\n"]})
    assert response.code == 200, answer  # (whitespace around a sequence is its own)


@pytest_twisted.ensureDeferred
async def test_past_thinking_reaches_deepseek_which_requires_it_back(reactor, fake):
    """DeepSeek's thinking mode refuses a conversation whose assistant turns lack their reasoning_content ("The
    reasoning_content in the thinking mode must be passed back to the API", a 400 in every tool loop): a deepseek
    provider gets an assistant message's thinking as its reasoning_content, as a vLLM does, and none of vLLM's
    other fields (before: the thinking was left out for every provider but vLLM) but C{top_k}, as on the chat
    route."""
    gw = await start(reactor, {"DEEPSEEK_BASE_URL": fake.base_url, "DEEPSEEK_API_KEY": "sk-deepseek"})
    client = sdk(gw)
    try:
        await in_thread(client.messages.create, model=f"deepseek/{CHAT_MODEL}", max_tokens=2000,
                        extra_body={"top_k": 5}, messages=THOUGHT, thinking={"type": "enabled", "budget_tokens": 1024})
        sent = fake.last_request().body
        assert fake.last_request().path == b"/v1/chat/completions"
        assert sent["messages"][1] == {"role": "assistant", "content": "Hello.", "reasoning_content": "hm"}
        assert sent["top_k"] == 5 and "chat_template_kwargs" not in sent and "reasoning_effort" not in sent
    finally:
        client.close()
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_tool_changes_in_a_system_message_go_to_a_vllm_translated_and_resolved(gw, fake, client):
    """vLLM 0.32's Messages API takes tool_addition and tool_removal blocks and resolves them (a removed tool is no
    longer offered, one added by value is); a vLLM without that support refuses them. They were left out natively, so a removed
    tool was still offered and one added by value never was. A request holding one now goes to a vLLM translated,
    its tools resolved as vLLM 0.32 resolves them, and is counted so (by /tokenize)."""
    old_tool = dict(WEATHER_TOOL, name="old_tool")
    added = {"type": "tool_addition", "tool": {"type": "tool_reference", "name": "get_weather"}}
    removed = {"type": "tool_removal", "tool": {"type": "tool_reference", "name": "old_tool"}}
    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                {"role": "system", "content": [{"type": "text", "text": "The weather server connected."}, added]},
                {"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "Sunny."},
                {"role": "system", "content": [removed]}, {"role": "user", "content": "Thanks."}]
    tools = [dict(WEATHER_TOOL, defer_loading=True), old_tool]
    await in_thread(client.messages.create, model=MODEL, max_tokens=8, tools=tools, messages=messages)
    sent = fake.last_request()
    assert sent.path == b"/v1/chat/completions"
    assert [t["function"]["name"] for t in sent.body["tools"]] == ["get_weather"]
    await in_thread(client.messages.count_tokens, model=MODEL, tools=tools, messages=messages)
    sent = fake.last_request()
    assert sent.path == b"/tokenize" and [t["function"]["name"] for t in sent.body["tools"]] == ["get_weather"]
    plain = [{"role": "user", "content": "Hi."}]  # (without changes: native, the body as it came)
    await in_thread(client.messages.create, model=MODEL, max_tokens=8, tools=tools, messages=plain)
    assert fake.last_request().path == b"/v1/messages" and fake.last_request().body["messages"] == plain


async def refused(fake, gw, model, body, status=400, error=anthropic.BadRequestError):
    """The C{error} (an anthropic SDK's exception) its create on C{gw}'s C{model} raises where C{fake} answers
    C{status} with C{body}."""
    fake.steer = {"fake_status": status, "fake_body": body}
    client = sdk(gw)
    try:
        with pytest.raises(error) as raised:
            await in_thread(client.messages.create, model=model, max_tokens=8, messages=HELLO)
    finally:
        client.close()
    return raised.value


@pytest_twisted.ensureDeferred
async def test_an_upstreams_401_is_the_gateways_502_not_the_clients_401(http, gw, openai_gw, fake):
    """The upstream refusing the gateway's own provider key is no fault of the client's key: a 401 would make Claude
    Code ask its user to log in again. It is a 502 C{api_error} (natively, translated, count_tokens), the upstream's
    words (which may quote its key or host) left out."""
    host = fake.root_url.split("//")[1]
    refusal = json.dumps({"type": "error", "error": {"type": "authentication_error",
                                                     "message": f"invalid x-api-key sk-upstream at {host}"}})
    for gateway, model in ((gw, MODEL), (openai_gw, OPENAI_MODEL)):
        # (steered, not in the body: the translation drops the body's fake_ fields)
        raised = await refused(fake, gateway, model, refusal, 401, anthropic.InternalServerError)
        assert raised.status_code == 502, model
        assert raised.response.headers["x-should-retry"] == "false"
        error = raised.body["error"]
        assert error["type"] == "api_error", model
        assert "refused the gateway's credentials" in error["message"] and "'" in error["message"], error
        assert "sk-upstream" not in error["message"] and host not in error["message"]
    response, content = await post(http, gw.url + "/v1/messages/count_tokens",
                                   {"model": MODEL, "messages": HELLO, "fake_status": 401, "fake_body": refusal})
    assert response.code == 502 and json.loads(content)["error"]["type"] == "api_error"
    # Counted as the upstream's failure, under its code (before: not at all; a converted error lost its code).
    for gateway, failed in ((gw, 2), (openai_gw, 1)):
        counted = [v for (n, ls), v in (await scrape(http, gateway)).items()
                   if n == "gomodel_upstream_errors_total" and ("code", "upstream_auth_failed") in ls]
        assert sum(counted) == failed, (gateway.url, counted)


@pytest_twisted.ensureDeferred
async def test_claude_codes_long_user_id_reaches_a_translated_provider_within_openais_64_characters(openai_gw, fake):
    """Claude Code's C{metadata.user_id} is some 150 characters (its device, account and session); OpenAI refuses a
    chat C{user} over 64 ("string too long"), so every translated request failed. A longer id is sent as its SHA-256
    (64 hex digits: the same id, the same user, as OpenAI advises to hash one); a short one as it is."""
    old = "user_" + "a" * 64 + "_account_" + "1" * 36 + "_session_" + "2" * 36
    new = json.dumps({"device_id": "d" * 64, "account_uuid": "1" * 36, "session_id": "2" * 36})
    client = sdk(openai_gw)
    try:
        sent = []
        for user_id in (old, new, old, "u-1", "x" * 64):
            await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=8, messages=HELLO,
                            metadata={"user_id": user_id})
            sent.append(fake.last_request().body["user"])
    finally:
        client.close()
    assert all(len(user) <= 64 for user in sent), sent
    assert sent[0] == sent[2] != sent[1] and sent[3:] == ["u-1", "x" * 64]


@pytest_twisted.ensureDeferred
async def test_a_context_overflow_is_told_in_anthropics_words_that_claude_code_acts_on(gw, openai_gw, fake):
    """vLLM (and OpenAI-compatible servers) say a prompt does not fit in their own words; Anthropic says "prompt is
    too long: N tokens > M maximum" (Claude Code compacts the conversation on it) and "input length and `max_tokens`
    exceed context limit: N + X > M" (Claude Code lowers max_tokens and retries). Natively and translated, the
    client gets Anthropic's (before: vLLM's, and Claude Code just failed)."""
    too_long = "This model's maximum context length is 2048 tokens. However, your prompt contains at least 2049 " \
        "input tokens, which exceeds this limit even without any output tokens. Please reduce the length of the " \
        "input prompt."  # (vLLM 0.32's; it lowers a max_tokens that does not fit itself)
    checked = "Input length (4000) exceeds model's maximum context length (2048)."
    characters = "This model's maximum context length is 2048 tokens. However, your prompt contains 90000 characters " \
        "(more than 81920 characters, which is the upper bound for 2048 input tokens). Please reduce the length of " \
        "the input prompt."
    earlier = "This model's maximum context length is 2048 tokens. However, your request has 4000 input tokens. " \
        "Please reduce the length of the input messages."
    too_much = "'max_tokens' or 'max_completion_tokens' is too large: 32000. This model's maximum context length is " \
        "2048 tokens and your request has 18 input tokens (32000 > 2048 - 18)."
    older = "This model's maximum context length is 2048 tokens. However, you requested 2100 tokens (100 in the " \
        "messages, 2000 in the completion). Please reduce the length of the messages or completion."
    expected = {too_long: "prompt is too long: 2049 tokens > 2048 maximum",
                checked: "prompt is too long: 4000 tokens > 2048 maximum",
                characters: "prompt is too long: " + characters,
                earlier: "prompt is too long: 4000 tokens > 2048 maximum",
                too_much: "input length and `max_tokens` exceed context limit: 18 + 32000 > 2048, decrease input "
                          "length or `max_tokens` and try again",
                older: "input length and `max_tokens` exceed context limit: 100 + 2000 > 2048, decrease input length "
                       "or `max_tokens` and try again"}
    for said, told in expected.items():
        native = json.dumps({"type": "error", "error": {"type": "BadRequestError", "message": said}})
        chat = json.dumps({"error": {"message": said, "type": "BadRequestError", "param": None, "code": 400}})
        for gateway, model, body in ((gw, MODEL, native), (openai_gw, OPENAI_MODEL, chat)):
            error = (await refused(fake, gateway, model, body)).body["error"]
            assert error == {"type": "invalid_request_error", "message": told}, model
    # OpenAI's own (GPT-5's configured limit; any other of its code context_length_exceeded: Anthropic's words first)
    for said, told in (("Input tokens exceed the configured limit of 272000 tokens. Your messages resulted in 300000 "
                        "tokens. Please reduce the length of the messages.",
                        "prompt is too long: 300000 tokens > 272000 maximum"),
                       ("Your input exceeds the context window of this model. Please adjust your input and try again.",
                        "prompt is too long: Your input exceeds the context window of this model. Please adjust "
                        "your input and try again.")):
        body = json.dumps({"error": {"message": said, "type": "invalid_request_error", "param": "messages",
                                     "code": "context_length_exceeded"}})
        error = (await refused(fake, openai_gw, OPENAI_MODEL, body)).body["error"]
        assert error == {"type": "invalid_request_error", "message": told}
    other = json.dumps({"type": "error", "error": {"type": "BadRequestError", "message": "bad temperature"}})
    assert (await refused(fake, gw, MODEL, other)).body["error"]["message"] == "bad temperature"


@pytest_twisted.ensureDeferred
async def test_max_tokens_missing_or_invalid_is_anthropics_400_before_any_upstream(http, gw, fake):
    """Natively as translated, a request without a valid max_tokens is the gateway's 400, in Anthropic's words (before:
    a native one went to vLLM, whose answer quoted its pydantic validation)."""
    before = len(fake.forwarded())
    for value, said in ((None, "max_tokens: Field required"), ("8", "max_tokens: Input should be a valid integer"),
                        (0, "max_tokens: Input should be greater than or equal to 1")):
        body = {"model": MODEL, "messages": HELLO}
        if value is not None:
            body["max_tokens"] = value
        for stream in (False, True):
            response, content = await post(http, gw.url + "/v1/messages", dict(body, stream=stream))
            assert response.code == 400, (value, content)
            assert json.loads(content) == {"type": "error", "error": {"type": "invalid_request_error",
                                                                     "message": said}}, content
    assert len(fake.forwarded()) == before
    response, _ = await post(http, gw.url + "/v1/messages/count_tokens", {"model": MODEL, "messages": HELLO})
    assert response.code == 200  # (count_tokens takes none)


@pytest_twisted.ensureDeferred
async def test_messages_missing_empty_or_no_list_are_anthropics_400_natively_too(http, gw, fake):
    """A create or a count_tokens without a message (none, an empty list, no list) is the gateway's 400 in Anthropic's
    words before any upstream, natively as translated already were; before, a native one went to vLLM, whose
    Messages API takes an empty list (a generation from the chat template's prompt alone, or its own error)."""
    before = len(fake.forwarded())
    for value, said in ((None, "messages: Field required (a list of messages)"),
                        ([], "messages: at least one message is required"),
                        ("Hi", "messages: Input should be a valid list")):
        body = {"model": MODEL, "max_tokens": 8}
        if value is not None:
            body["messages"] = value
        for path, sent in (("/v1/messages", dict(body, stream=False)), ("/v1/messages", dict(body, stream=True)),
                           ("/v1/messages/count_tokens", {"model": MODEL, "messages": value})):
            response, content = await post(http, gw.url + path, sent)
            assert response.code == 400, (path, value, content)
            assert json.loads(content) == {"type": "error", "error": {"type": "invalid_request_error",
                                                                     "message": said}}, content
    assert len(fake.forwarded()) == before


@pytest_twisted.ensureDeferred
async def test_temperature_and_top_p_outside_anthropics_bounds_are_its_400_before_any_upstream(http, gw, openai_gw,
                                                                                                fake):
    """Anthropic's C{temperature} and C{top_p} are numbers from 0 to 1: outside them (or no number) a request is
    Anthropic's 400 naming the field, natively as translated, streamed or not, before any upstream. Before, they went
    on as sent: translated, an OpenAI-compatible provider took a temperature of 1.5 as its own (0 to 2: a hotter
    sampling than any Anthropic allows, answered as if valid) and refused -1 in its words; natively, vLLM sampled
    with them. The bounds themselves are taken."""
    for gateway, model in ((gw, MODEL), (openai_gw, OPENAI_MODEL)):
        before = len(fake.forwarded())
        for name, value, said in (("temperature", 1.5, "less than or equal to 1"),
                                  ("temperature", -0.1, "greater than or equal to 0"),
                                  ("temperature", "0.5", "a valid number"), ("temperature", True, "a valid number"),
                                  ("top_p", 1.01, "less than or equal to 1"),
                                  ("top_p", -1, "greater than or equal to 0")):
            for stream in (False, True):
                response, content = await post(http, gateway.url + "/v1/messages", {
                    "model": model, "max_tokens": 8, "messages": HELLO, name: value, "stream": stream})
                assert response.code == 400, (name, value, content)
                assert response.headers.getRawHeaders("request-id")
                assert json.loads(content) == {"type": "error", "error": {
                    "type": "invalid_request_error", "message": f"{name}: Input should be {said}"}}, content
        assert len(fake.forwarded()) == before
        for value in (0, 1, 0.7):
            response, content = await post(http, gateway.url + "/v1/messages", {
                "model": model, "max_tokens": 8, "messages": HELLO, "temperature": value, "top_p": value})
            assert response.code == 200, content
            assert (fake.last_request().body["temperature"], fake.last_request().body["top_p"]) == (value, value)


@pytest_twisted.ensureDeferred
async def test_a_tool_choice_naming_no_tool_and_a_user_id_no_string_are_anthropics_400_before_any_upstream(
        http, gw, openai_gw, fake):
    """A C{tool_choice} of type C{tool} naming a tool that C{tools} does not declare, and a C{metadata.user_id} that
    is no string (or a C{metadata} no object), are Anthropic's 400 naming the field, natively as translated, streamed
    or not, before any upstream. Before, the tool choice went upstream (which refused it in its own words) and the
    user id was dropped unread. A declared tool and a null user id are taken."""
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    for gateway, model in ((gw, MODEL), (openai_gw, OPENAI_MODEL)):
        before = len(fake.forwarded())
        for fields, said in (
                ({"tools": tools, "tool_choice": {"type": "tool", "name": "get_time"}},
                 "tool_choice.name: tool 'get_time' is not one of the tools"),
                ({"tool_choice": {"type": "tool", "name": "get_time"}},
                 "tool_choice: tool_choice of type 'tool' may only be specified while providing tools"),
                ({"metadata": {"user_id": 42}}, "metadata.user_id: Input should be a valid string"),
                ({"metadata": "u-1"}, "metadata: Input should be a valid dictionary")):
            for stream in (False, True):
                response, content = await post(http, gateway.url + "/v1/messages", dict(
                    fields, model=model, max_tokens=8, messages=HELLO, stream=stream))
                assert response.code == 400, (fields, content)
                assert json.loads(content) == {"type": "error", "error": {
                    "type": "invalid_request_error", "message": said}}, content
        assert len(fake.forwarded()) == before
        response, content = await post(http, gateway.url + "/v1/messages", {
            "model": model, "max_tokens": 8, "messages": HELLO, "tools": tools, "metadata": {"user_id": None},
            "tool_choice": {"type": "tool", "name": "get_weather"}})
        assert response.code == 200, content


@pytest_twisted.ensureDeferred
async def test_a_tool_choice_that_needs_a_tool_without_tools_is_anthropics_400_before_any_upstream(gw, openai_gw,
                                                                                                   fake):
    """A C{tool_choice} of type C{any} (or C{tool}, or one missing its name or of no known type) in a request with no
    tools (none, an empty list, or every one removed by a tool change) is Anthropic's 400 naming C{tool_choice},
    natively as translated, streamed or not, before any upstream. Before, C{any} went to a chat upstream as
    C{required} (which refused it in its own words, or answered without a tool) and natively as it was. C{auto} and
    C{none} without tools are taken (and not sent to a chat upstream)."""
    removed = [{"role": "system", "content": [{"type": "tool_removal",
                                               "tool": {"type": "tool_reference", "name": "get_weather"}}]}]
    for gateway, model in ((gw, MODEL), (openai_gw, OPENAI_MODEL)):
        client = sdk(gateway)
        try:
            before = len(fake.forwarded())
            for fields, said in (
                    ({"tool_choice": {"type": "any"}},
                     "tool_choice: tool_choice of type 'any' may only be specified while providing tools"),
                    ({"tool_choice": {"type": "any"}, "tools": []},
                     "tool_choice: tool_choice of type 'any' may only be specified while providing tools"),
                    ({"tool_choice": {"type": "any"}, "tools": [WEATHER_TOOL], "messages": HELLO + removed + HELLO},
                     "tool_choice: tool_choice of type 'any' may only be specified while providing tools"),
                    ({"tool_choice": {"type": "tool", "name": "get_weather"}},
                     "tool_choice: tool_choice of type 'tool' may only be specified while providing tools"),
                    ({"tool_choice": {"type": "tool"}, "tools": [WEATHER_TOOL]},
                     "tool_choice.name: Field required when tool_choice.type is 'tool'"),
                    ({"tool_choice": {"type": "some"}, "tools": [WEATHER_TOOL]},
                     "tool_choice.type: 'some' is not one of 'auto', 'any', 'tool', 'none'")):
                for stream in (False, True):
                    sent = dict({"model": model, "max_tokens": 8, "messages": HELLO}, **fields)
                    with pytest.raises(anthropic.BadRequestError) as caught:
                        if stream:
                            await in_thread(collect, client.messages.stream(**sent))
                        else:
                            await in_thread(client.messages.create, **sent)
                    assert caught.value.status_code == 400
                    assert caught.value.body == {"type": "error", "error": {
                        "type": "invalid_request_error", "message": said}}, (fields, caught.value.body)
            assert len(fake.forwarded()) == before
            for kind in ("auto", "none"):
                message = await in_thread(client.messages.create, model=model, max_tokens=8, messages=HELLO,
                                          tool_choice={"type": kind})
                assert message.content[0].type == "text"
                assert "tool_choice" not in fake.last_request().body or gateway is gw
        finally:
            client.close()


# An upstream's stream head, then silence (the connection held open): a long prefill.
SILENT_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
NATIVE_START = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_up","type":"message",'
                b'"role":"assistant","model":"m","content":[],"stop_reason":null,"stop_sequence":null,'
                b'"usage":{"input_tokens":3,"output_tokens":0}}}\n\n')


def _until_pings(client, model, pings):
    """The bytes of a Messages stream of C{model} read through the SDK until C{pings} pings came; then it is
    closed."""
    with client.messages.with_streaming_response.create(model=model, max_tokens=8, messages=HELLO,
                                                        stream=True) as response:
        seen = b""
        for chunk in response.iter_bytes():
            seen += chunk
            if seen.count(b"event: ping\n") >= pings:
                return seen
    return seen


@pytest_twisted.ensureDeferred
async def test_the_messages_keepalive_is_the_configured_one_natively_and_translated(reactor, fake):
    """With C{GOMODEL_MESSAGES_KEEPALIVE_SECONDS} set, a stream whose upstream falls silent after its head (a long
    prefill) pings its client at that interval: translated, the gateway's message_start and its ping, then pings;
    natively, pings after vLLM's message_start. Before, the interval was 10 s whatever was set (no setting read it)."""
    gateway = await start(reactor, {"VLLM_BASE_URL": fake.base_url, "OPENAI_BASE_URL": fake.base_url,
                                    "OPENAI_API_KEY": "sk-up", "GOMODEL_MESSAGES_KEEPALIVE_SECONDS": "0.05"})
    client = sdk(gateway)
    try:
        fake.raw[b"/v1/chat/completions"] = (SILENT_HEAD, True)
        seen = await in_daemon_thread(reactor, _until_pings, client, OPENAI_MODEL, 3)
        assert [kind for kind, _ in events_of(seen)] == ["message_start", "ping", "ping", "ping"]
        chunk = b"%x\r\n" % len(NATIVE_START) + NATIVE_START + b"\r\n"
        fake.raw[b"/v1/messages"] = (SILENT_HEAD + chunk, True)
        seen = await in_daemon_thread(reactor, _until_pings, client, MODEL, 2)
        events = events_of(seen)
        assert [kind for kind, _ in events] == ["message_start", "ping", "ping"]
        assert events[0][1]["message"]["id"] == "msg_up"
    finally:
        client.close()
        await stop_all(gateway)


@pytest_twisted.ensureDeferred
async def test_a_native_stream_pings_during_vllms_prefill_before_its_message_start(reactor, fake):
    """vLLM sends its stream's head at once and its C{message_start} only with the first token: during a long
    prefill, the client got nothing (the native keepalive waited for vLLM's C{message_start}, whose id is vLLM's to
    name). It gets a C{ping} every keepalive now: the anthropic SDK (and the TypeScript one, Claude Code's) skips
    a C{ping} wherever it comes, before C{message_start} too, and reads the stream after it as ever."""
    gateway = await start(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MESSAGES_KEEPALIVE_SECONDS": "0.05"})
    client = sdk(gateway)
    try:
        fake.raw[b"/v1/messages"] = (SILENT_HEAD, True)
        seen = await in_daemon_thread(reactor, _until_pings, client, MODEL, 2)
        assert [kind for kind, _ in events_of(seen)] == ["ping", "ping"]
        # What the client then reads: the pings, then vLLM's stream, which the SDK takes whole.
        del fake.raw[b"/v1/messages"]
        _, direct = await post(treq, fake.base_url + "/messages",
                               {"model": CHAT_MODEL, "max_tokens": 8, "messages": HELLO, "stream": True})
        pinged = seen + direct
        fake.raw[b"/v1/messages"] = (SILENT_HEAD + b"%x\r\n" % len(pinged) + pinged + b"\r\n0\r\n\r\n", False)
        events, final = await in_thread(collect, client.messages.stream(model=MODEL, max_tokens=8, messages=HELLO))
        assert events[0].type == "message_start" and final.content[0].text == "héhéhé"
        assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 3
    finally:
        client.close()
        await stop_all(gateway)


LONG_TOOL = dict(WEATHER_TOOL, name="mcp__claude_ai_weather_service_for_every_city__get_the_current_weather_in_a_city")


@pytest_twisted.ensureDeferred
async def test_a_tool_name_past_openais_64_characters_goes_short_and_comes_back_as_declared(openai_gw, gw, fake):
    """Anthropic takes tool names of up to 128 characters (Claude Code's MCP tools, C{mcp__<server>__<tool>}, are
    often longer than 64); OpenAI refuses any past 64 ("string too long"). Translated to an OpenAI provider, such a
    name goes short (the same one each time: its tool, its C{tool_choice}, the past calls of it), and the answer's
    calls of it, whole or streamed, name it as the client declared it. Before, OpenAI refused the request. A vLLM
    is sent the name as it is."""
    assert len(LONG_TOOL["name"]) > 64
    history = [{"role": "user", "content": "Paris?"},
               {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": LONG_TOOL["name"],
                                                  "input": {"city": "Paris"}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"}]},
               {"role": "user", "content": "And Rome?"}]
    client = sdk(openai_gw)
    try:
        await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=64, tools=[LONG_TOOL, WEATHER_TOOL],
                        tool_choice={"type": "tool", "name": LONG_TOOL["name"]}, messages=history)
        sent = fake.last_request().body
        short = sent["tools"][0]["function"]["name"]
        assert len(short) <= 64 and short != LONG_TOOL["name"]
        assert sent["tools"][1]["function"]["name"] == "get_weather"
        assert sent["tool_choice"]["function"]["name"] == short
        assert sent["messages"][1]["tool_calls"][0]["function"]["name"] == short
        fake.steer = {"fake_tool": {"name": short, "arguments": '{"city": "Rome"}'}}
        message = await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=64, tools=[LONG_TOOL],
                                  messages=history)
        assert fake.last_request().body["tools"][0]["function"]["name"] == short  # (the same short name)
        assert [(block.type, block.name, block.input) for block in message.content] == [
            ("tool_use", LONG_TOOL["name"], {"city": "Rome"})]
        _, final = await in_thread(collect, client.messages.stream(model=OPENAI_MODEL, max_tokens=64,
                                                                   tools=[LONG_TOOL], messages=history))
        assert [(block.type, block.name, block.input) for block in final.content] == [
            ("tool_use", LONG_TOOL["name"], {"city": "Rome"})]
    finally:
        client.close()
    fake.steer = {}
    client = sdk(gw)
    try:
        await in_thread(client.messages.create, model=MODEL, max_tokens=64, tools=[LONG_TOOL], messages=history)
        assert fake.last_request().body["tools"][0]["name"] == LONG_TOOL["name"]
    finally:
        client.close()


OMITTED = {"type": "enabled", "budget_tokens": 1024, "display": "omitted"}


@pytest_twisted.ensureDeferred
async def test_thinking_display_omitted_keeps_the_thinking_block_without_its_text(http, openai_gw, fake):
    """C{thinking.display: "omitted"} asks for the thinking blocks without their text, as Anthropic answers it: the
    block is there (its signature, empty: no upstream signs its reasoning), its C{thinking} empty, and a stream
    sends no C{thinking_delta}; before, a translated answer always held the thinking text. Plain, streamed, a
    stream made from a whole answer, and reasoning held behind a streamed tool call; without it, the text."""
    fake.steer = {"fake_reasoning": "Secret plan."}
    client = sdk(openai_gw)
    try:
        message = await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=2000, messages=HELLO,
                                  thinking=OMITTED)
        assert [(block.type, getattr(block, "thinking", None)) for block in message.content] == [
            ("thinking", ""), ("text", None)]
        assert message.content[0].signature == "" and message.content[1].text == "héhéhé"
        seen, final = await in_thread(collect, client.messages.stream(model=OPENAI_MODEL, max_tokens=2000,
                                                                      messages=HELLO, thinking=OMITTED))
        assert [(block.type, getattr(block, "thinking", None)) for block in final.content] == [
            ("thinking", ""), ("text", None)]
        deltas = [event.delta.type for event in seen if event.type == "content_block_delta"]
        assert "thinking_delta" not in deltas and "signature_delta" in deltas
        # shown unless omitted ("summarized", Anthropic's default)
        message = await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=2000, messages=HELLO,
                                  thinking=dict(OMITTED, display="summarized"))
        assert message.content[0].thinking == "Secret plan."
    finally:
        client.close()
    body = {"model": OPENAI_MODEL, "max_tokens": 2000, "messages": HELLO, "stream": True, "thinking": OMITTED}
    fake.steer = {"fake_status": 200, "fake_body": json.dumps({
        "id": "chatcmpl-w3", "object": "chat.completion", "model": CHAT_MODEL, "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hi.",
                                                              "reasoning_content": "Secret plan."}}]})}
    _, raw = await post(http, openai_gw.url + "/v1/messages", body)
    assert b"Secret" not in raw and b'"thinking_delta"' not in raw
    assert [kind for kind, _ in events_of(raw)].count("content_block_start") == 2
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    fake.steer = {"fake_finish": "tool_calls", "fake_deltas": [{"tool_calls": [call]},
                                                               {"reasoning_content": "Secret plan."}]}
    _, raw = await post(http, openai_gw.url + "/v1/messages", dict(body, tools=[WEATHER_TOOL]))
    assert b"Secret" not in raw and b'"thinking_delta"' not in raw
    starts = [data["content_block"]["type"] for kind, data in events_of(raw) if kind == "content_block_start"]
    assert starts == ["tool_use", "thinking"]


@pytest_twisted.ensureDeferred
async def test_thinking_display_omitted_is_honoured_natively_too(http, gw, fake, client):
    """Natively, vLLM answers with the thinking text whatever C{display} says: the gateway empties each thinking
    block's C{thinking} (its signature kept) and leaves out a stream's C{thinking_delta} events, as Anthropic answers
    C{display: "omitted"} and as the translation does; before, vLLM's thinking text was relayed. Plain, streamed, a
    whole answer to a stream, a stream to a request that did not ask for one; unasked, vLLM's answer as it came."""
    fake.steer = {"fake_reasoning": "Secret plan."}
    signature = "5f1c0ffee5f1c0ffee5f1c0ffee5f1c0"  # (the fake vLLM's)
    message = await in_thread(client.messages.create, model=MODEL, max_tokens=2000, messages=HELLO,
                              thinking=OMITTED)
    assert [(block.type, getattr(block, "thinking", None)) for block in message.content] == [
        ("thinking", ""), ("text", None)]
    assert message.content[0].signature == signature and message.content[1].text == "héhéhé"
    assert fake.last_request().path == b"/v1/messages" and fake.last_request().body["thinking"] == OMITTED
    seen, final = await in_thread(collect, client.messages.stream(model=MODEL, max_tokens=2000, messages=HELLO,
                                                                  thinking=OMITTED))
    assert [(block.type, getattr(block, "thinking", None)) for block in final.content] == [
        ("thinking", ""), ("text", None)]
    assert final.content[0].signature == signature
    deltas = [event.delta.type for event in seen if event.type == "content_block_delta"]
    assert "thinking_delta" not in deltas and "signature_delta" in deltas
    assert (final.usage.input_tokens, final.usage.output_tokens) == (18, 3)
    body = {"model": MODEL, "max_tokens": 2000, "messages": HELLO, "thinking": OMITTED}
    for extra in ({"stream": True, "fake_whole": True}, {"fake_stream_anyway": True}):
        response, raw = await post(http, gw.url + "/v1/messages", dict(body, **extra))
        assert response.code == 200 and b"Secret" not in raw and b'"thinking_delta"' not in raw, extra
        assert signature.encode() in raw, extra
    # shown unless omitted ("summarized", Anthropic's default): byte for byte as vLLM answers it
    message = await in_thread(client.messages.create, model=MODEL, max_tokens=2000, messages=HELLO,
                              thinking=dict(OMITTED, display="summarized"))
    assert message.content[0].thinking == "Secret plan."
    shown = dict(body, thinking=dict(OMITTED, display="summarized"))
    _, via = await post(http, gw.url + "/v1/messages", shown)
    _, direct = await post(http, fake.base_url + "/messages", dict(shown, model=CHAT_MODEL))
    assert via == direct and b"Secret plan." in via


@pytest_twisted.ensureDeferred
async def test_a_thinking_display_other_than_summarized_or_omitted_is_anthropics_400(http, gw, openai_gw, fake):
    """A C{thinking.display} that is neither C{"summarized"} nor C{"omitted"} (Anthropic's two) is the gateway's 400
    C{invalid_request_error} naming the field, natively and translated, streamed or not, before any upstream is
    asked; before, it passed (natively, vLLM ignored it; translated, the thinking text came). A null one is none."""
    before = len(fake.forwarded())
    for gateway, model in ((gw, MODEL), (openai_gw, OPENAI_MODEL)):
        for display in ("hidden", "", 1, ["omitted"]):
            for stream in (False, True):
                body = {"model": model, "max_tokens": 2000, "messages": HELLO, "stream": stream,
                        "thinking": dict(OMITTED, display=display)}
                response, content = await post(http, gateway.url + "/v1/messages", body)
                assert response.code == 400, (model, display, content)
                assert json.loads(content) == {"type": "error", "error": {
                    "type": "invalid_request_error",
                    "message": f"thinking.display: {display!r} is not one of 'summarized', 'omitted'"}}, content
    assert len(fake.forwarded()) == before
    for gateway, model in ((gw, MODEL), (openai_gw, OPENAI_MODEL)):
        body = {"model": model, "max_tokens": 2000, "messages": HELLO, "thinking": dict(OMITTED, display=None)}
        response, content = await post(http, gateway.url + "/v1/messages", body)
        assert response.code == 200, content


@pytest_twisted.ensureDeferred
async def test_a_failed_tool_result_tells_a_native_vllm_it_failed(gw, fake, client):
    """vLLM's Messages API drops a C{tool_result}'s C{is_error}: the model never learned the tool failed. The
    gateway says it in the result's text, as the translated path does (C{Error: ...}); a result without the flag
    goes as the client sent it, and the client's body is not changed for a fallback reached the other way."""
    calls = [{"type": "tool_use", "id": f"toolu_{n}", "name": "get_weather", "input": {"city": "Paris"}}
             for n in range(1, 6)]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    results = [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "timed out", "is_error": True},
               {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True},
               {"type": "tool_result", "tool_use_id": "toolu_3", "is_error": True,
                "content": [{"type": "text", "text": "no such city"}, {"type": "text", "text": "try again"}]},
               {"type": "tool_result", "tool_use_id": "toolu_4", "is_error": True, "content": [image]},
               {"type": "tool_result", "tool_use_id": "toolu_5", "content": "sunny", "is_error": False}]
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": calls},
                {"role": "user", "content": results}]
    await in_thread(client.messages.create, model=MODEL, max_tokens=8, tools=[WEATHER_TOOL], messages=messages)
    sent = fake.last_request()
    assert sent.path == b"/v1/messages"
    contents = [block.get("content") for block in sent.body["messages"][2]["content"]]
    assert contents == ["Error: timed out", "Error",
                        [{"type": "text", "text": "Error: no such city"}, {"type": "text", "text": "try again"}],
                        [{"type": "text", "text": "Error"}, image], "sunny"]
    assert sent.body["messages"][:2] == messages[:2]
    assert messages[2]["content"] == results and results[0]["content"] == "timed out"
    # Counted as it is sent.
    await in_thread(client.messages.count_tokens, model=MODEL, tools=[WEATHER_TOOL], messages=messages)
    sent = fake.last_request()
    assert sent.path == b"/v1/messages/count_tokens"
    assert sent.body["messages"][2]["content"][0]["content"] == "Error: timed out"
    # Without a failed result, the body goes as the client sent it.
    ok = [messages[0], {"role": "assistant", "content": calls[4:]}, {"role": "user", "content": results[4:]}]
    await in_thread(client.messages.create, model=MODEL, max_tokens=8, tools=[WEATHER_TOOL], messages=ok)
    assert fake.last_request().body["messages"] == ok


SIX_STOPS = ["<1>", "<2>", "<3>", "<4>", "ba", "<6>"]


@pytest_twisted.ensureDeferred
async def test_stop_sequences_past_openais_four_end_the_answer_where_anthropics_would(openai_gw, gw, fake):
    """OpenAI refuses more than four stop sequences (a 400 the client got: Anthropic takes more). An OpenAI
    provider is sent the first four, and the answer, whole or streamed, ends at the first of the others it holds
    (split across chunks too): the text before it, C{stop_reason} C{stop_sequence} naming it. A vLLM is sent
    the first four too (vLLM 0.32's chat completions refuse more:
    L{test_each_provider_type_is_sent_the_stop_sequences_it_takes}), and its answer cut as OpenAI's."""
    fake.steer = {"fake_text": "ab", "fake_chunks": 4}
    client = sdk(openai_gw)
    try:
        message = await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=16, messages=HELLO,
                                  stop_sequences=SIX_STOPS)
        assert fake.last_request().body["stop"] == SIX_STOPS[:4]
        assert [block.text for block in message.content] == ["a"]
        assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "ba")
        seen, final = await in_thread(collect, client.messages.stream(model=OPENAI_MODEL, max_tokens=16,
                                                                      messages=HELLO, stop_sequences=SIX_STOPS))
        assert fake.last_request().body["stop"] == SIX_STOPS[:4]
        assert [block.text for block in final.content] == ["a"] and seen[-1].type == "message_stop"
        assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "ba")
        # None of the others in it: the answer as it came.
        message = await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=16, messages=HELLO,
                                  stop_sequences=SIX_STOPS[:4] + ["zz", "<6>"])
        assert message.content[0].text == "abababab" and message.stop_reason == "max_tokens"
    finally:
        client.close()
    client = sdk(gw)
    try:
        message = await in_thread(client.messages.create, model=MODEL, max_tokens=16, messages=HELLO,
                                  stop_sequences=SIX_STOPS)
        assert fake.last_request().body["stop"] == SIX_STOPS[:4]
        assert [block.text for block in message.content] == ["a"]
        assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "ba")
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_each_provider_type_is_sent_the_stop_sequences_it_takes(reactor, fake):
    """Each provider type is sent as many stop sequences as it takes (a 400 past them: vLLM 0.32's chat completions
    by default, OpenAI, Groq and xAI take four, DeepSeek sixteen; Ollama and OpenRouter state no bound), the
    answer watched for the others (before: every type but OpenAI was sent them all, a 400 from vLLM, Groq, xAI,
    DeepSeek past their bound)."""
    stops = [f"<{i}>" for i in range(20)]
    env = {"VLLM_BASE_URL": fake.base_url, "OLLAMA_BASE_URL": fake.base_url}
    for kind in ("openai", "groq", "xai", "deepseek", "openrouter"):
        env.update({f"{kind.upper()}_BASE_URL": fake.base_url, f"{kind.upper()}_API_KEY": "sk-" + kind})
    gw = await start(reactor, env)
    client = sdk(gw)
    try:
        sent = {}
        for kind in ("vllm", "openai", "groq", "xai", "deepseek", "ollama", "openrouter"):
            await in_thread(client.messages.create, model=f"{kind}/{CHAT_MODEL}", max_tokens=8, messages=HELLO,
                            stop_sequences=stops)
            assert fake.last_request().path == b"/v1/chat/completions", kind
            sent[kind] = fake.last_request().body["stop"]
        assert sent == {"vllm": stops[:4], "openai": stops[:4], "groq": stops[:4], "xai": stops[:4],
                        "deepseek": stops[:16], "ollama": stops, "openrouter": stops}
    finally:
        client.close()
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_providers_configured_most_stop_sequences_are_what_it_is_sent(reactor, fake):
    """A vLLM started with a raised VLLM_MAX_STOP_STRINGS, configured so (C{VLLM_MAX_STOP_SEQUENCES}), is sent as
    many stop sequences as it takes (before: never more than its type's four); the answer is watched for the rest."""
    stops = [f"<{i}>" for i in range(20)]
    gw = await start(reactor, {"VLLM_BASE_URL": fake.base_url, "VLLM_MAX_STOP_SEQUENCES": "12",
                               "VLLM_OTHER_BASE_URL": fake.base_url})
    client = sdk(gw)
    try:
        for model, most in ((MODEL, 12), (f"vllm-other/{CHAT_MODEL}", 4)):
            await in_thread(client.messages.create, model=model, max_tokens=8, messages=HELLO, stop_sequences=stops)
            assert fake.last_request().path == b"/v1/chat/completions"
            assert fake.last_request().body["stop"] == stops[:most], model
    finally:
        client.close()
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_an_empty_text_block_anywhere_is_anthropics_400_translated(openai_gw, fake):
    """An empty text block in a message's content is Anthropic's own 400 ("text content blocks must be
    non-empty"), alone or beside other blocks (Claude Code's after its tool results at times), in a user's message
    or the assistant's, before anything goes upstream (before, one beside others was dropped, the rest sent on);
    and an empty message its other."""
    call = {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "a.txt"}}
    messages = [{"role": "user", "content": "Read a.txt."}, {"role": "assistant", "content": [call]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"},
                                             {"type": "text", "text": "Go on."}]}]
    client = sdk(openai_gw)
    try:
        await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=8, messages=messages)
        assert fake.last_request().body["messages"][-1] == {"role": "user", "content": "Go on."}
        before = len(fake.forwarded())
        empty = {"type": "text", "text": ""}
        for sent in ([{"role": "user", "content": [empty]}], [{"role": "user", "content": [empty] * 2}],
                     messages[:2] + [{"role": "user", "content": messages[2]["content"][:1] + [empty]}],
                     messages[:2] + [{"role": "user", "content": [empty] + messages[2]["content"]}],
                     messages[:1] + [{"role": "assistant", "content": [empty, call]}] + messages[2:],
                     messages + [{"role": "assistant", "content": [empty]}]):
            with pytest.raises(anthropic.BadRequestError) as caught:
                await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=8, messages=sent)
            assert caught.value.body["error"] == {"type": "invalid_request_error",
                                                  "message": "messages: text content blocks must be non-empty"}
        # An empty user message, "" or [], is Anthropic's other 400 (before: sent on as an empty user message).
        for content in ("", []):
            with pytest.raises(anthropic.BadRequestError) as caught:
                await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=8,
                                messages=messages[:2] + [{"role": "user", "content": content}])
            assert caught.value.body["error"] == {"type": "invalid_request_error", "message": (
                "messages.2: all messages must have non-empty content except for the optional final assistant "
                "message")}
        assert len(fake.forwarded()) == before
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_an_empty_text_block_is_anthropics_400_natively_too(http, gw, fake, client):
    """A create (plain or streamed) or a count_tokens for a vLLM with an empty text block in a message's content,
    alone, beside others or in the assistant's message, is Anthropic's 400 ("text content blocks must be
    non-empty") before any upstream, as translated; before, one beside others, or the assistant's, went to vLLM
    natively, whose Messages API drops an empty text block and generates from what is left. A text that is
    there, and an assistant's empty string (a prefill's), are no empty block."""
    before = len(fake.forwarded())
    said = {"type": "error", "error": {"type": "invalid_request_error",
                                       "message": "messages: text content blocks must be non-empty"}}
    empty, hi = {"type": "text", "text": ""}, {"type": "text", "text": "Hi."}
    for content in ([empty], [empty] * 2, [empty, hi], [hi, empty]):
        for messages in ([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                          {"role": "user", "content": content}],
                         [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": content},
                          {"role": "user", "content": "Again."}]):
            with pytest.raises(anthropic.BadRequestError) as caught:
                await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=messages)
            assert caught.value.body == said
            for path, sent in (("/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": messages,
                                                 "stream": True}),
                               ("/v1/messages/count_tokens", {"model": MODEL, "messages": messages})):
                response, answer = await post(http, gw.url + path, sent)
                assert response.code == 400 and json.loads(answer) == said, (path, answer)
    assert len(fake.forwarded()) == before
    messages = [{"role": "user", "content": [hi, {"type": "text", "text": " "}]}]
    await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=messages)
    assert fake.last_request().path == b"/v1/messages" and fake.last_request().body["messages"] == messages


# Anthropic's 400s for blank text (invalid_request_error), each as its API words it: a message whose text blocks are
# all whitespace (one beside a text that is more is taken), an empty text block in a tool result's content, and
# in the system prompt's blocks an empty one, or nothing but whitespace.
_BLANK = "messages: text content blocks must contain non-whitespace text"
_EMPTY = "messages: text content blocks must be non-empty"
_SYSTEM_EMPTY = "system: text content blocks must be non-empty"
_SYSTEM_BLANK = "system: text content blocks must contain non-whitespace text"
_EMPTY_MESSAGE = "messages.1: all messages must have non-empty content except for the optional final assistant message"


def _blank_requests():
    """C{(system, messages, message)}: a Messages request's system prompt and messages, and Anthropic's 400 for it
    (its message), or None where Anthropic takes it."""
    call = {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "a.txt"}}
    blank, hi = {"type": "text", "text": " \n\t"}, {"type": "text", "text": "Hi."}

    def result(content):
        return {"type": "tool_result", "tool_use_id": "toolu_1", "content": content}

    asked = [{"role": "user", "content": "Read a.txt."}, {"role": "assistant", "content": [hi, call]}]
    return (
        (None, [{"role": "user", "content": [blank]}], _BLANK),
        (None, [{"role": "user", "content": [blank, {"type": "text", "text": "\u3000"}]}], _BLANK),
        (None, [{"role": "user", "content": "  \n"}], _BLANK),
        (None, [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": [blank, call]},
                {"role": "user", "content": [result("ok")]}], _BLANK),
        (None, asked + [{"role": "user", "content": [result([{"type": "text", "text": ""}])]}], _EMPTY),
        (None, asked + [{"role": "user", "content": [result([hi, {"type": "text", "text": ""}])]}], _EMPTY),
        ([{"type": "text", "text": ""}], [{"role": "user", "content": "Hi."}], _SYSTEM_EMPTY),
        ([hi, {"type": "text", "text": ""}], [{"role": "user", "content": "Hi."}], _SYSTEM_EMPTY),
        ([blank], [{"role": "user", "content": "Hi."}], _SYSTEM_BLANK),
        ([blank, blank], [{"role": "user", "content": "Hi."}], _SYSTEM_BLANK),
        (" \n\t", [{"role": "user", "content": "Hi."}], _SYSTEM_BLANK),  # (a string is one text block)
        # an assistant's message but the last (a prefill's): a string of whitespace, as a user's; empty
        (None, [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": " \n"},
                {"role": "user", "content": "Again."}], _BLANK),
        (None, [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": ""},
                {"role": "user", "content": "Again."}], _EMPTY_MESSAGE),
        (None, [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": []},
                {"role": "user", "content": "Again."}], _EMPTY_MESSAGE),
        # taken: a blank block beside a text that is more, a blank tool result (unverified: sent on), an empty
        # final assistant message (a prefill)
        ([hi, blank], [{"role": "user", "content": [hi, blank]}], None),
        (None, [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": ""}], None),
        (None, asked + [{"role": "user", "content": [result([blank]), hi]}], None),
    )


@pytest_twisted.ensureDeferred
async def test_blank_text_is_anthropics_400_natively_and_translated(http, gw, openai_gw, fake):
    """A message whose text blocks are all whitespace ("messages: text content blocks must contain non-whitespace
    text"), an empty text block in a tool result's content ("... must be non-empty"), and a system prompt's empty
    text block or one of nothing but whitespace ("system: text content blocks must ...") are Anthropic's own 400s:
    a create (plain or streamed) and a count_tokens, for a vLLM (natively) or translated, get them before any
    upstream is asked. Before, vLLM generated from them natively, and translated they went on (a system prompt's
    empty block left out). A blank block beside a text that is more is taken, as Anthropic takes it."""
    before = len(fake.forwarded())
    for system, messages, message in _blank_requests():
        fields = {"messages": messages} if system is None else {"messages": messages, "system": system}
        for model in (MODEL, OPENAI_MODEL):
            gateway = gw if model == MODEL else openai_gw
            for path, sent in (("/v1/messages", dict(fields, model=model, max_tokens=8)),
                               ("/v1/messages", dict(fields, model=model, max_tokens=8, stream=True)),
                               ("/v1/messages/count_tokens", dict(fields, model=model))):
                if message is None and (path != "/v1/messages" or model == OPENAI_MODEL):
                    continue  # (taken: counted and translated as any other)
                response, answer = await post(http, gateway.url + path, sent)
                if message is None:
                    assert response.code == 200, answer
                    before = len(fake.forwarded())
                    continue
                assert response.code == 400 and json.loads(answer) == {
                    "type": "error", "error": {"type": "invalid_request_error", "message": message}}, (sent, answer)
    assert len(fake.forwarded()) == before


_MISSING = ("messages.{}: `tool_use` ids were found without `tool_result` blocks immediately after: {}. Each "
            "`tool_use` block must have a corresponding `tool_result` block in the next message.")
_UNEXPECTED = ("messages.{}: unexpected `tool_use_id` found in `tool_result` blocks: {}. Each `tool_result` block "
               "must have a corresponding `tool_use` block in the previous message.")


def _unpaired_requests():
    """C{(messages, message)}: conversations whose tool calls and results do not pair, and Anthropic's 400 (its
    words) for each, or None where the gateway takes it."""
    hi = {"type": "text", "text": "Hi."}

    def call(n):
        return {"type": "tool_use", "id": f"toolu_{n}", "name": "read", "input": {"path": "a.txt"}}

    def result(n):
        return {"type": "tool_result", "tool_use_id": f"toolu_{n}", "content": "ok"}

    ask = {"role": "user", "content": "Read a.txt."}
    return (
        ([ask, {"role": "assistant", "content": [hi, call(1)]}, {"role": "user", "content": "Go on."}],
         _MISSING.format(1, "toolu_1")),
        ([ask, {"role": "assistant", "content": [call(1), call(2)]}, {"role": "user", "content": [result(2), hi]}],
         _MISSING.format(1, "toolu_1")),
        ([ask, {"role": "assistant", "content": [call(1), call(2)]}, {"role": "user", "content": [hi]}],
         _MISSING.format(1, "toolu_1, toolu_2")),
        ([ask, {"role": "assistant", "content": [call(1)]}, {"role": "user", "content": "Wait."},
          {"role": "assistant", "content": "Done."}, {"role": "user", "content": [result(1)]}],
         _MISSING.format(1, "toolu_1")),
        ([ask, {"role": "assistant", "content": [call(1)]}, {"role": "user", "content": [result(1), result(9)]}],
         _UNEXPECTED.format("2.content.1", "toolu_9")),
        ([{"role": "user", "content": [result(1), hi]}], _UNEXPECTED.format("0.content.0", "toolu_1")),
        ([ask, {"role": "assistant", "content": "Sure."}, {"role": "user", "content": [hi, result(1)]}],
         _UNEXPECTED.format("2.content.1", "toolu_1")),
        # taken: every call answered in the next message, in any order, beside text; consecutive messages of one
        # role are one turn (Anthropic combines them), a system message between is passed over
        ([ask, {"role": "assistant", "content": [call(1), call(2)]},
          {"role": "user", "content": [result(2), result(1), hi]}], None),
        ([ask, {"role": "assistant", "content": [hi, call(1)]}, {"role": "assistant", "content": [call(2)]},
          {"role": "system", "content": "Be brief."}, {"role": "user", "content": [result(1)]},
          {"role": "user", "content": [result(2)]}], None),
    )


@pytest_twisted.ensureDeferred
async def test_unpaired_tool_calls_and_results_are_anthropics_400_natively_and_translated(http, gw, openai_gw, fake):
    """A tool call (C{tool_use}) whose result is not in the next message, and a tool result whose call is not in the
    previous one, are Anthropic's 400s in its words, for a create (plain or streamed) and a count_tokens, for a vLLM
    (natively) or translated, before any upstream. Before, vLLM generated from them natively (its chat template took
    them as they came), and translated an OpenAI-compatible provider refused them in its own words."""
    for messages, message in _unpaired_requests():
        if message is not None:
            await _refused_everywhere(http, gw, openai_gw, fake, {"messages": messages}, message)
            continue
        for path, sent in (("/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": messages}),
                           ("/v1/messages", {"model": OPENAI_MODEL, "max_tokens": 8, "messages": messages}),
                           ("/v1/messages/count_tokens", {"model": MODEL, "messages": messages})):
            response, answer = await post(http, (gw if sent["model"] == MODEL else openai_gw).url + path, sent)
            assert response.code == 200, answer


async def _refused_everywhere(http, gw, openai_gw, fake, fields, said):
    """Assert that a Messages request of C{fields} is Anthropic's 400 C{said} for a create (plain and streamed) and a
    count_tokens, for a vLLM (C{gw}, natively) and translated (C{openai_gw}), before any upstream."""
    before = len(fake.forwarded())
    for gateway, model in ((gw, MODEL), (openai_gw, OPENAI_MODEL)):
        for path, sent in (("/v1/messages", dict(fields, model=model, max_tokens=8)),
                           ("/v1/messages", dict(fields, model=model, max_tokens=8, stream=True)),
                           ("/v1/messages/count_tokens", dict(fields, model=model))):
            response, answer = await post(http, gateway.url + path, sent)
            assert response.code == 400 and json.loads(answer) == {
                "type": "error", "error": {"type": "invalid_request_error", "message": said}}, (sent, answer)
    assert len(fake.forwarded()) == before


@pytest_twisted.ensureDeferred
async def test_a_tool_name_anthropic_refuses_is_its_400_natively_and_translated(http, gw, openai_gw, fake):
    """A client tool whose name is not 1 to 128 letters, digits, underscores or hyphens (an MCP client's
    C{server.tool}, a space, 129 characters, an empty one) is Anthropic's 400 in its words, for a create (plain or
    streamed) and a count_tokens, for a vLLM (natively) or translated, before any upstream. Before, vLLM was sent
    it, and OpenAI refused a dot in its own words. A name of 128 is taken; two of one name are refused too
    ("tools: Tool names must be unique.")."""
    pattern = "String should match pattern '^[a-zA-Z0-9_-]{1,128}$'"
    for name, at in (("caldav.create-event", 1), ("get weather", 1), ("x" * 129, 1), ("", 1)):
        tools = [WEATHER_TOOL, dict(WEATHER_TOOL, name=name)]
        await _refused_everywhere(http, gw, openai_gw, fake, {"messages": HELLO, "tools": tools},
                                  f"tools.{at}.custom.name: {pattern}")
    response, answer = await post(http, gw.url + "/v1/messages", {
        "model": MODEL, "max_tokens": 8, "messages": HELLO, "tools": [dict(WEATHER_TOOL, name="a-" + "x" * 126)]})
    assert response.code == 200, answer
    # Two tools of one name (a client's own and an MCP server's) are Anthropic's other 400, after a bad name's.
    await _refused_everywhere(http, gw, openai_gw, fake, {"messages": HELLO, "tools": [WEATHER_TOOL] * 2},
                              "tools: Tool names must be unique.")
    await _refused_everywhere(http, gw, openai_gw, fake, {"messages": HELLO, "tools": [
        WEATHER_TOOL, WEATHER_TOOL, dict(WEATHER_TOOL, name="a.b")]}, f"tools.2.custom.name: {pattern}")


_IMAGE_TYPES = "Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"


@pytest_twisted.ensureDeferred
async def test_an_image_of_a_type_anthropic_refuses_is_its_400_natively_and_translated(http, gw, openai_gw, fake):
    """A base64 image whose media_type is none of Anthropic's four, or missing, in a message or a tool result, is
    Anthropic's 400 in its words (the block's place named as it names it), for a create (plain or streamed) and a
    count_tokens, for a vLLM (natively) or translated, before any upstream. Before, natively vLLM was sent it (and
    read a BMP, or refused an SVG in its words), translated a missing type was taken for a JPEG."""
    def image(media=None):
        source = {"type": "base64", "data": "iVBORw0KGgo="}
        return {"type": "image", "source": dict(source, media_type=media) if media else source}

    call = {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "a.svg"}}
    hi = {"type": "text", "text": "What is it?"}
    for messages, said in (
            ([{"role": "user", "content": [image("image/bmp"), hi]}],
             f"messages.0.content.0.image.source.base64.media_type: {_IMAGE_TYPES}"),
            ([{"role": "user", "content": [hi, image()]}],
             "messages.0.content.1.image.source.base64.media_type: Field required"),
            ([{"role": "user", "content": "Read a.svg."}, {"role": "assistant", "content": [call]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                            "content": [{"type": "text", "text": "a.svg:"}, image("image/svg+xml")]}]}],
             f"messages.2.content.0.tool_result.content.1.image.source.base64.media_type: {_IMAGE_TYPES}")):
        await _refused_everywhere(http, gw, openai_gw, fake, {"messages": messages}, said)
    for media in ("image/jpeg", "image/png", "image/gif", "image/webp"):
        response, answer = await post(http, gw.url + "/v1/messages", {
            "model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [image(media), hi]}]})
        assert response.code == 200 and fake.last_request().path == b"/v1/messages", answer


@pytest_twisted.ensureDeferred
async def test_an_empty_user_message_is_anthropics_400_natively_too(http, gw, fake, client):
    """A create (plain or streamed) or a count_tokens for a vLLM with an empty user message (C{""}, C{[]}) is
    Anthropic's 400 ("messages.N: all messages must have non-empty content except for the optional final
    assistant message") before any upstream, as translated already was; before, it went to vLLM natively."""
    before = len(fake.forwarded())
    for content in ("", []):
        messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": content}]
        said = {"type": "error", "error": {"type": "invalid_request_error", "message": (
            "messages.2: all messages must have non-empty content except for the optional final assistant "
            "message")}}
        with pytest.raises(anthropic.BadRequestError) as caught:
            await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=messages)
        assert caught.value.body == said
        with pytest.raises(anthropic.BadRequestError) as caught:
            await in_thread(client.messages.count_tokens, model=MODEL, messages=messages)
        assert caught.value.body == said
        response, answer = await post(http, gw.url + "/v1/messages",
                                      {"model": MODEL, "max_tokens": 8, "messages": messages, "stream": True})
        assert response.code == 400 and json.loads(answer) == said, answer
    assert len(fake.forwarded()) == before


@pytest_twisted.ensureDeferred
async def test_a_documents_title_and_context_reach_the_model_as_anthropics_prompt_has_them(openai_gw, fake):
    """A document's C{title} and C{context} are part of what Anthropic's model reads (its prompt formatting puts
    a document in C{<document>}, its source named, its text in C{<document_content>}): translated, a text
    document (plain, base64 text/plain, custom content) with either is sent so, in a message or a tool result
    (before: both dropped, the model saw the bare text). One without either is its bare text, as before."""
    plain = {"type": "document", "title": "notes.txt", "context": "Written by Ada.",
             "source": {"type": "text", "media_type": "text/plain", "data": "Notes: ok."}}
    encoded = {"type": "document", "title": "a.txt",
               "source": {"type": "base64", "media_type": "text/plain",
                          "data": base64.b64encode("Läuft.".encode()).decode()}}
    png = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    scan = {"type": "document", "context": "A scan.", "source": {"type": "content", "content": [
        {"type": "text", "text": "Figure 1:"}, {"type": "image", "source": png}]}}
    call = {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "a.txt"}}
    messages = [{"role": "user", "content": [plain, scan, {"type": "text", "text": "Read a.txt."}]},
                {"role": "assistant", "content": [call]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [encoded]}]}]
    client = sdk(openai_gw)
    try:
        await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=8, messages=messages)
        sent = fake.last_request().body["messages"]
        assert sent[0] == {"role": "user", "content": [
            {"type": "text", "text": "<document>\n<source>notes.txt</source>\n<context>Written by Ada.</context>\n"
                                     "<document_content>\nNotes: ok.\n</document_content>\n</document>"},
            {"type": "text", "text": "<document>\n<context>A scan.</context>\n<document_content>\nFigure 1:"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "text", "text": "\n</document_content>\n</document>"},
            {"type": "text", "text": "Read a.txt."}]}
        assert sent[2] == {"role": "tool", "tool_call_id": "toolu_1", "content":
                           "<document>\n<source>a.txt</source>\n<document_content>\nLäuft.\n</document_content>\n"
                           "</document>"}
        before = len(fake.forwarded())
        with pytest.raises(anthropic.BadRequestError) as caught:
            await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=8,
                            messages=[{"role": "user", "content": [dict(plain, title=5)]}])
        assert caught.value.body["error"]["message"].startswith("messages.0.content.0.title: Input should be a valid")
        assert len(fake.forwarded()) == before
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_structured_outputs_reach_a_vllm_natively_as_its_messages_api_reads_them(gw, openai_gw, fake):
    """vLLM 0.32's Messages API honours C{output_config.format} (its C{response_format} of that JSON schema) and
    drops the older top-level C{output_format} unread (the structured outputs beta's, which clients still send): natively
    that one goes as C{output_config.format} (C{output_config}'s own format first, its effort kept; before, the
    answer came unstructured); translated, either is the chat C{response_format}, as before."""
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
              "additionalProperties": False}
    wanted = {"type": "json_schema", "schema": schema}
    client = sdk(gw)
    try:
        await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO,
                        output_config={"format": wanted})
        assert fake.last_request().path == b"/v1/messages"
        assert fake.last_request().body["output_config"] == {"format": wanted}
        await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO,
                        output_config={"effort": "low"}, extra_body={"output_format": wanted})
        sent = fake.last_request().body
        assert sent["output_config"] == {"effort": "low", "format": wanted} and "output_format" not in sent
        other = {"type": "json_schema", "schema": {"type": "object"}}
        await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HELLO,
                        output_config={"format": wanted}, extra_body={"output_format": other})
        assert fake.last_request().body["output_config"] == {"format": wanted}
    finally:
        client.close()
    client = sdk(openai_gw)
    try:
        await in_thread(client.messages.create, model=OPENAI_MODEL, max_tokens=8, messages=HELLO,
                        extra_body={"output_format": wanted})
        assert fake.last_request().body["response_format"] == {"type": "json_schema",
                                                              "json_schema": {"name": "output", "schema": schema}}
    finally:
        client.close()
