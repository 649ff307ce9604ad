"""Request shapes of Anthropic's Messages API that RAG clients and Claude Code send, through the gateway with the
official anthropic SDK: natively to the fake vLLM and translated for an OpenAI-compatible provider."""

from functools import partial

import anthropic
import pytest
import pytest_twisted

from tests.fakes.vllm import CHAT_MODEL
from tests.support import in_thread, start_gateway

KEY = "anthropic-shapes-key"
RESULT = {"type": "search_result", "source": "https://docs.example/herons", "title": "Herons",
          "content": [{"type": "text", "text": "Herons wade."}, {"type": "text", "text": "They eat fish."}],
          "citations": {"enabled": True}}
RESULT_TEXT = "Search result: Herons\nSource: https://docs.example/herons\n\nHerons wade.\nThey eat fish."
TOOL = {"name": "search", "input_schema": {"type": "object"}}


@pytest_twisted.async_yield_fixture(params=["vllm", "openai"])
async def gw(request, reactor, fake):
    env = {"VLLM_BASE_URL": fake.base_url} if request.param == "vllm" else {
        "OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-upstream"}
    gateway = await start_gateway(reactor, {"GOMODEL_MASTER_KEY": KEY, **env})
    gateway.model = f"{request.param}/{CHAT_MODEL}"
    yield gateway
    await gateway.service.stopService()


@pytest.fixture
def client(gw):
    c = anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0, timeout=10)
    yield c
    c.close()


@pytest_twisted.ensureDeferred
async def test_search_result_blocks_reach_the_model_as_their_text(gw, fake, client):
    """A C{search_result} block (Anthropic's for RAG: a source, a title and text blocks), in a user message or in a
    tool result, reaches a chat model as its text; before, it was a 400 (translated: "unknown content block type";
    natively, vLLM's, which has no such block), or vLLM dropped it from a tool result unread."""
    message = await in_thread(client.messages.create, model=gw.model, max_tokens=16, messages=[
        {"role": "user", "content": [RESULT, {"type": "text", "text": "What do herons eat?"}]}])
    assert message.stop_reason
    sent = fake.last_request()
    assert sent.path == b"/v1/chat/completions"
    assert sent.body["messages"][-1]["content"] == [{"type": "text", "text": RESULT_TEXT},
                                                    {"type": "text", "text": "What do herons eat?"}]

    await in_thread(client.messages.create, model=gw.model, max_tokens=16, tools=[TOOL], messages=[
        {"role": "user", "content": "Search herons."},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "search", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [RESULT]}]}])
    sent = fake.last_request()
    assert sent.path == b"/v1/chat/completions"
    assert sent.body["messages"][-1] == {"role": "tool", "tool_call_id": "toolu_1", "content": RESULT_TEXT}


@pytest_twisted.ensureDeferred
async def test_a_search_result_without_its_fields_is_a_400_naming_them(gw, fake, client):
    sent = len(fake.forwarded())
    for broken, where in (({**RESULT, "content": "text"}, "messages.0.content.0.content"),
                          ({k: v for k, v in RESULT.items() if k != "source"}, "messages.0.content.0.source")):
        with pytest.raises(anthropic.BadRequestError) as refused:
            await in_thread(client.messages.create, model=gw.model, max_tokens=16,
                            messages=[{"role": "user", "content": [broken]}])
        assert refused.value.body["error"]["type"] == "invalid_request_error"
        assert where in refused.value.body["error"]["message"]
    assert len(fake.forwarded()) == sent


@pytest.mark.parametrize("status, kind", [(402, "billing_error"), (409, "conflict_error")])
def test_a_402_and_a_409_get_anthropics_types_for_them(status, kind):
    """Anthropic's error types include C{billing_error} (402) and C{conflict_error} (409, the SDK's ErrorType):
    an upstream's error of that status is told with it, and an upstream's own C{conflict_error} is kept; before,
    both were C{invalid_request_error}."""
    from gomodel import jsonutil
    from gomodel.anthropic.translate import openai_error_to_anthropic
    from gomodel.http.render import ANTHROPIC

    body = jsonutil.dumps({"error": {"message": "No.", "type": "Conflict", "param": None, "code": status}})
    assert jsonutil.loads(openai_error_to_anthropic(status, body))["error"] == {"type": kind, "message": "No."}
    own = jsonutil.dumps({"type": "error", "error": {"type": kind, "message": "No."}})
    assert jsonutil.loads(openai_error_to_anthropic(400, own))["error"]["type"] == kind
    assert ANTHROPIC.error_type(status) == kind


@pytest.mark.parametrize("field, value", [
    ("mcp_servers", [{"type": "url", "url": "https://mcp.example/sse", "name": "example"}]),
    ("container", "container_011CZ"),
    ("container", {"skills": [{"type": "anthropic", "skill_id": "pptx", "version": "latest"}]}),
])
@pytest_twisted.ensureDeferred
async def test_server_side_features_are_refused_natively_and_translated(gw, fake, client, field, value):
    """Anthropic's MCP connector (C{mcp_servers}: Anthropic's servers call the MCP server's tools) and a code
    execution C{container} (with its skills) are Anthropic's server side, which no upstream has: a request with one
    is a 400 naming it, as a server tool's is, before anything goes upstream. Before, translated, a container was
    dropped; natively, vLLM 0.32's Messages API drops both unread (its request model ignores fields it does not
    know): the model answered without the tools or skills asked for. An empty C{mcp_servers} list is none."""
    sent = len(fake.forwarded())
    with pytest.raises(anthropic.BadRequestError) as refused:
        await in_thread(client.messages.create, model=gw.model, max_tokens=16, messages=[
            {"role": "user", "content": "hi"}], extra_body={field: value})
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert refused.value.body["error"]["message"].startswith(f"{field}: ")
    assert len(fake.forwarded()) == sent

    def streamed():
        with client.messages.stream(model=gw.model, max_tokens=16, messages=[{"role": "user", "content": "hi"}],
                                    extra_body={field: value}) as stream:
            return stream.get_final_message()
    with pytest.raises(anthropic.BadRequestError):
        await in_thread(streamed)
    assert len(fake.forwarded()) == sent
    await in_thread(client.messages.create, model=gw.model, max_tokens=16, messages=[
        {"role": "user", "content": "hi"}], extra_body={"mcp_servers": [], "container": None})
    # count_tokens the same (before: counted natively, vLLM dropping it unread; translated, the 501)
    sent = len(fake.forwarded())
    with pytest.raises(anthropic.BadRequestError) as refused:
        await in_thread(client.messages.count_tokens, model=gw.model, messages=[{"role": "user", "content": "hi"}],
                        extra_body={field: value})
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert refused.value.body["error"]["message"].startswith(f"{field}: ")
    assert len(fake.forwarded()) == sent


@pytest_twisted.ensureDeferred
async def test_server_tools_are_refused_natively_as_translated(gw, fake, client):
    """A server tool (Anthropic's web search, code execution...: a tool with a type, no C{input_schema}) is
    Anthropic's to run: translated it was the gateway's 400 naming it, while natively it went to vLLM, whose
    Messages API reads it as a function tool (a 400 about its missing C{input_schema}, or a tool the model may call
    and nobody runs). Either way now: the gateway's 400, before anything goes upstream, its count_tokens too; a
    client tool with the type C{custom} is a tool as any."""
    sent = len(fake.forwarded())
    tools = [{"name": "f", "input_schema": {"type": "object"}},
             {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]
    for call in (partial(client.messages.create, max_tokens=16), client.messages.count_tokens):
        with pytest.raises(anthropic.BadRequestError) as refused:
            await in_thread(call, model=gw.model, messages=[{"role": "user", "content": "hi"}], tools=tools)
        error = refused.value.body["error"]
        assert error["type"] == "invalid_request_error" and error["message"].startswith("tools.1: ")
        assert "web_search_20250305" in error["message"] and "server tools" in error["message"]
    assert len(fake.forwarded()) == sent
    await in_thread(client.messages.create, model=gw.model, max_tokens=16, messages=[
        {"role": "user", "content": "hi"}], tools=[dict(tools[0], type="custom")])


@pytest_twisted.ensureDeferred
async def test_fields_that_change_no_answer_are_accepted(gw, fake, client):
    """C{service_tier} (a scheduling preference) and C{context_management} (Claude Code sends it with every request:
    a gateway that refused it broke Claude Code, claude-code#21612) are accepted; neither upstream honours them
    (translated, they are not sent; natively vLLM drops them unread), which changes no answer's content."""
    message = await in_thread(client.messages.create, model=gw.model, max_tokens=16, messages=[
        {"role": "user", "content": "hi"}], extra_body={
        "service_tier": "standard_only",
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}})
    assert message.content[0].text == "héhéhé"
    sent = fake.last_request().body
    if gw.model.startswith("openai/"):
        assert "service_tier" not in sent and "context_management" not in sent
