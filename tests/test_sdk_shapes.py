"""Request shapes of the clients users point at the gateway (the openai SDK's helpers, agents' fields), each
against the fake vLLM: relayed as vLLM takes them, translated where a target has no such API, parsed by the SDK."""

import openai
import pytest
import pytest_twisted

from tests.support import in_thread, start_fake, start_gateway, stop_all

CHAT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest_twisted.async_yield_fixture()
async def translated(reactor):
    """C{(sdk, fake)}: the openai SDK at a gateway whose provider C{vllm} has no Responses API (an older vLLM: its
    Responses requests are translated to chat completions)."""
    fake = await start_fake(reactor, responses=False)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=10)
    yield sdk, fake
    await stop_all(gw, fake, clients=[sdk])


@pytest_twisted.ensureDeferred
async def test_a_translated_response_without_tools_sends_no_tool_choice(translated):
    """A Responses request that says C{tool_choice} "auto" (or "none") and C{parallel_tool_calls} with no tools (an
    agent between its tool turns; OpenAI's Responses API and vLLM's take it) is translated without them: chat
    upstreams refuse a C{tool_choice} without C{tools} (vLLM's "When using `tool_choice`, `tools` must be set.",
    OpenAI's too, and its C{parallel_tool_calls}). Before, the client got that 400 for a request that is valid."""
    sdk, fake = translated
    for choice in ("auto", "none"):
        for tools in ([], openai.omit):
            answer = await in_thread(sdk.responses.create, model="vllm/" + CHAT_MODEL, input="hi", tools=tools,
                                     tool_choice=choice, parallel_tool_calls=False)
            assert answer.output_text == "héhéhé" and answer.tool_choice == choice
            sent = fake.last_request()
            assert sent.path == b"/v1/chat/completions"
            assert not {"tool_choice", "tools", "parallel_tool_calls"} & set(sent.body)
    await in_thread(sdk.responses.create, model="vllm/" + CHAT_MODEL, input="hi", parallel_tool_calls=True,
                    tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}}], tool_choice="auto")
    assert fake.last_request().body["tool_choice"] == "auto" and fake.last_request().body["parallel_tool_calls"] is True


def _function(name):
    return {"type": "function", "name": name, "parameters": {"type": "object", "properties": {}}}


@pytest_twisted.ensureDeferred
async def test_a_translated_allowed_tools_choice_offers_those_tools_alone(translated):
    """The Responses API's C{tool_choice} C{allowed_tools} (C{mode} and the tools the model may call, the others kept
    in the prompt for its cache) has no chat form vLLM takes: translated, the chat request offers those tools alone,
    its C{tool_choice} their C{mode} (one naming none of them a 400); a hosted tool's choice (C{web_search_preview},
    C{mcp}), which no chat upstream has, is a 400 naming C{tool_choice}, sent nowhere. Before, both went upstream as
    they came, for vLLM's validation error."""
    sdk, fake = translated
    allowed = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "g"}]}
    answer = await in_thread(sdk.responses.create, model="vllm/" + CHAT_MODEL, input="hi", tool_choice=allowed,
                             tools=[_function("f"), _function("g")],
                             extra_body={"fake_tool": {"name": "g", "arguments": "{}"}})
    assert [item.name for item in answer.output] == ["g"] and answer.tool_choice.type == "allowed_tools"
    sent = fake.last_request().body
    assert [tool["function"]["name"] for tool in sent["tools"]] == ["g"] and sent["tool_choice"] == "required"
    chat_shaped = {"type": "function", "function": {"name": "f"}}  # (taken as it was)
    await in_thread(sdk.responses.create, model="vllm/" + CHAT_MODEL, input="hi", tool_choice=chat_shaped,
                    tools=[_function("f")])
    assert fake.last_request().body["tool_choice"] == chat_shaped
    sent_before = len(fake.forwarded())
    for choice, code in (({"type": "web_search_preview"}, "unsupported_value"),
                         ({"type": "mcp", "server_label": "s"}, "unsupported_value"),
                         (dict(allowed, tools=[{"type": "function", "name": "nope"}]), "invalid_value")):
        with pytest.raises(openai.BadRequestError) as refused:
            await in_thread(sdk.responses.create, model="vllm/" + CHAT_MODEL, input="hi", tool_choice=choice,
                            tools=[_function("f")])
        assert refused.value.param == "tool_choice" and refused.value.code == code
    assert len(fake.forwarded()) == sent_before


@pytest_twisted.ensureDeferred
async def test_a_response_translated_for_an_openai_provider_bounds_it_by_max_completion_tokens(reactor):
    """An C{openai} provider without a Responses API (a proxy, a server of the OpenAI family) gets a translated
    request's C{max_output_tokens} as C{max_completion_tokens}, as a translated Messages request's C{max_tokens}:
    OpenAI's reasoning models refuse C{max_tokens}. Another type (vLLM) still gets C{max_tokens}. Before, every
    provider got C{max_tokens}."""
    fake = await start_fake(reactor, responses=False)
    gw = await start_gateway(reactor, {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-up",
                                       "VLLM_BASE_URL": fake.base_url})
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=10)
    try:
        for provider, field in (("openai", "max_completion_tokens"), ("vllm", "max_tokens")):
            answer = await in_thread(sdk.responses.create, model=f"{provider}/{CHAT_MODEL}", input="hi",
                                     max_output_tokens=7)
            assert answer.max_output_tokens == 7 and answer.output_text == "héhéhé"
            sent = fake.last_request().body
            assert sent[field] == 7 and not {"max_tokens", "max_completion_tokens"} - {field} & set(sent)
    finally:
        await stop_all(gw, fake, clients=[sdk])


@pytest_twisted.ensureDeferred
async def test_a_conversation_translated_for_an_openai_provider_sends_call_ids_it_takes(reactor):
    """A conversation whose tool calls a vLLM named (C{chatcmpl-tool-} and 32 hex digits: 46 characters), continued
    through C{/v1/messages} or C{/v1/responses} at an C{openai} provider (a failover, a model moved), reaches it with
    call ids of at most 40 characters, its call and its result still matching, as chat completions' own do (OpenAI
    refuses a longer one: "string too long"). Before, the translated routes sent them as they came."""
    import anthropic

    fake = await start_fake(reactor, responses=False, messages=False)
    gw = await start_gateway(reactor, {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-up"})
    long_id = "chatcmpl-tool-" + "0123456789abcdef" * 2
    claude = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0, timeout=10)
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=10)
    try:
        await in_thread(claude.messages.create, model="openai/" + CHAT_MODEL, max_tokens=8, messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": long_id, "name": "f", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": long_id, "content": "sunny"}]}],
            tools=[{"name": "f", "input_schema": {"type": "object"}}])
        messages = [fake.last_request().body["messages"]]
        await in_thread(sdk.responses.create, model="openai/" + CHAT_MODEL, tools=[_function("f")], input=[
            {"type": "message", "role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": long_id, "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": long_id, "output": "sunny"}])
        messages.append(fake.last_request().body["messages"])
        for sent in messages:
            [call_id] = [call["id"] for call in sent[1]["tool_calls"]]
            assert len(call_id) <= 40 and sent[2]["tool_call_id"] == call_id
    finally:
        await stop_all(gw, fake, clients=[claude, sdk])


@pytest_twisted.ensureDeferred
async def test_a_chat_asking_for_several_choices_reserves_each_ones_output(reactor, fake):
    """A chat or a completion asking for C{n} choices may generate C{max_tokens} for each: a token
    limit reserves that many (OpenAI counts C{n * max_tokens} too), so one that cannot fit is refused at once, not
    let through to generate past the limit. Before, one choice's C{max_tokens} was reserved, whatever C{n}."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "SET_PROVIDER_RATE_LIMIT_VLLM": "tpm=300"})
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=10)
    hi = [{"role": "user", "content": "hi"}]
    try:
        sent = len(fake.forwarded())
        with pytest.raises(openai.RateLimitError) as refused:
            await in_thread(sdk.chat.completions.create, model="vllm/" + CHAT_MODEL, messages=hi, n=4,
                            max_completion_tokens=100)
        assert refused.value.code == "rate_limit_exceeded" and "Request too large" in refused.value.message
        with pytest.raises(openai.RateLimitError):
            await in_thread(sdk.completions.create, model="vllm/" + CHAT_MODEL, prompt="hi", max_tokens=100, n=4)
        assert len(fake.forwarded()) == sent
        answer = await in_thread(sdk.chat.completions.create, model="vllm/" + CHAT_MODEL, messages=hi, n=2,
                                 max_completion_tokens=100)
        assert answer.choices and fake.last_request().body["n"] == 2
    finally:
        await stop_all(gw, clients=[sdk])


def test_the_output_reserved_counts_the_bodys_own_sequences():
    from gomodel.accounting.tokens import requested_tokens

    assert requested_tokens(b'{"max_tokens":16,"n":4}') == 64
    assert requested_tokens(b'{"max_tokens":16,"n":2,"best_of":3}') == 32  # (vLLM 0.32's completions: no best_of)
    assert requested_tokens(b'{"messages":[{"content":"x","n":9}],"max_tokens":16}') == 16  # (not the body's own)
    assert requested_tokens(b'{"max_tokens":16,"n":true}') == 16 and requested_tokens(b'{"n":4}') is None
    assert requested_tokens(b'{"max_tokens":16,"n":null,"content":"say \\"n\\""}') == 16


@pytest_twisted.ensureDeferred
async def test_a_translated_response_echoes_the_settings_a_native_one_does(translated):
    """A translated response names the request's C{user}, C{safety_identifier}, C{prompt_cache_key},
    C{max_tool_calls} and C{top_logprobs} as OpenAI's and vLLM's own response objects echo them, streamed or not
    (before, each came back null: a client switching to a provider without a Responses API lost them); C{user}
    still reaches the chat completion, the others have no chat meaning."""
    sdk, fake = translated
    settings = {"user": "u-1", "safety_identifier": "s-1", "prompt_cache_key": "conv-1", "max_tool_calls": 3,
                "top_logprobs": 2}
    answer = await in_thread(sdk.responses.create, model="vllm/" + CHAT_MODEL, input="hi", **settings)
    assert {name: getattr(answer, name) for name in settings} == settings
    assert fake.last_request().body["user"] == "u-1" and "prompt_cache_key" not in fake.last_request().body
    kept = await in_thread(sdk.responses.retrieve, answer.id)
    assert {name: getattr(kept, name) for name in settings} == settings

    def streamed():
        with sdk.responses.stream(model="vllm/" + CHAT_MODEL, input="hi", **settings) as stream:
            return stream.get_final_response()

    final = await in_thread(streamed)
    assert {name: getattr(final, name) for name in settings} == settings


@pytest_twisted.ensureDeferred
async def test_a_translated_responses_include_is_checked_as_openai_and_vllm_check_it(translated):
    """C{include} lists what OpenAI's Responses API can add to an answer (the openai SDK's C{ResponseIncludable}); a
    native vLLM refuses a value it does not know, or an C{include} that is no list. Translated, such a request is a
    400 naming C{include}, sent nowhere (before, it was dropped unsaid: a typo's logprobs never came, nothing said
    why); the values OpenAI knows are taken (logprobs asked of the chat upstream)."""
    sdk, fake = translated
    answer = await in_thread(sdk.responses.create, model="vllm/" + CHAT_MODEL, input="hi",
                             include=["message.output_text.logprobs", "reasoning.encrypted_content"])
    assert answer.output_text == "héhéhé" and fake.last_request().body["logprobs"] is True
    sent_before = len(fake.forwarded())
    for include, code in ((["message.output_text.logprob"], "invalid_value"), ([1], "invalid_type"),
                          ("message.output_text.logprobs", "invalid_type")):
        with pytest.raises(openai.BadRequestError) as refused:
            await in_thread(sdk.responses.create, model="vllm/" + CHAT_MODEL, input="hi",
                            extra_body={"include": include})
        assert (refused.value.param, refused.value.code) == ("include", code), include
    assert len(fake.forwarded()) == sent_before
