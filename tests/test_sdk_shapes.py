"""Request shapes of the clients users point at the gateway (the openai SDK's helpers, agents' fields), each
against the fake vLLM: relayed as vLLM takes them, translated where a target has no such API, parsed by the SDK."""

import openai
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
            sent = fake.requests[-1]
            assert sent.path == b"/v1/chat/completions"
            assert not {"tool_choice", "tools", "parallel_tool_calls"} & set(sent.body)
    await in_thread(sdk.responses.create, model="vllm/" + CHAT_MODEL, input="hi", parallel_tool_calls=True,
                    tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}}], tool_choice="auto")
    assert fake.requests[-1].body["tool_choice"] == "auto" and fake.requests[-1].body["parallel_tool_calls"] is True
