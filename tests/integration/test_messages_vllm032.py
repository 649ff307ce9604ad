"""What vLLM 0.32's own Messages API makes of the requests the gateway translates for it, checked against it.

Documents, thinking budgets, C{output_config.effort}, stop sequences and roles:
the same request sent to vLLM's C{/v1/messages} and to the gateway's, natively
(provider C{vllm}) or translated (a request the gateway sends through chat
completions), and the answers compared.
"""

import base64
import json
import secrets

import pytest

from tests.integration.support import CHAT_MODEL, request, usage_record

MODEL = f"vllm/{CHAT_MODEL}"
ASK = [{"role": "user", "content": "Name three prime numbers."}]
GREEDY = {"max_tokens": 8, "temperature": 0.0}


def _vllm(vllm, body):
    return request("POST", vllm.chat_root + "/v1/messages", dict(body, model=CHAT_MODEL), timeout=60)


def _gateway(gateway, body, model=MODEL):
    return request("POST", gateway.url + "/messages", dict(body, model=model), timeout=60,
                   headers={"x-api-key": gateway.master_key, "anthropic-version": "2023-06-01"})


def _stop_string(vllm):
    """A stop sequence the greedy answer to L{ASK} meets after its first token: three of its characters from a third
    of the way on, the first such that are not all whitespace (Anthropic refuses a blank stop sequence, and so does
    the gateway; the tiny model's answer may hold runs of spaces)."""
    answer = _vllm(vllm, dict(GREEDY, messages=ASK))
    assert answer.status == 200, answer
    text = answer.json()["content"][0]["text"]
    stops = [text[at:at + 3] for at in range(len(text) // 3, len(text) - 2)]
    return next(stop for stop in stops if not stop.isspace())


def test_a_stop_sequence_is_named_by_vllm_and_by_the_gateway(vllm, gateway):
    """vLLM 0.32's Messages API names the stop sequence that ended the answer (vllm#45807); the gateway's answer,
    translated for it, is the same message."""
    stop = _stop_string(vllm)
    body = dict(GREEDY, messages=ASK, stop_sequences=[stop, "never-met-zzz"])
    theirs, mine = _vllm(vllm, body), _gateway(gateway, body)
    assert theirs.status == mine.status == 200, (theirs, mine)
    theirs, mine = theirs.json(), mine.json()
    assert theirs["stop_reason"] == "stop_sequence" and theirs["stop_sequence"] == stop
    assert (mine["stop_reason"], mine["stop_sequence"], mine["content"], mine["usage"]) == \
           (theirs["stop_reason"], theirs["stop_sequence"], theirs["content"], theirs["usage"])


def test_claude_codes_system_role_is_taken_and_ctx_msg_are_no_roles(vllm, gateway):
    """Claude Code 2.1.154+ sends a C{system} message inside C{messages} (vllm#44000, whose pydantic error's
    C{msg} and C{ctx} keys were misread as roles): vLLM 0.32 takes it and refuses C{ctx} and C{msg}; the gateway
    does the same, natively and translated (a stop sequence sends it through chat)."""
    for role, status in (("system", 200), ("ctx", 400), ("msg", 400)):
        messages = ASK + [{"role": role, "content": "Be brief."}]
        theirs = _vllm(vllm, dict(GREEDY, messages=messages))
        native = _gateway(gateway, dict(GREEDY, messages=messages))
        translated = _gateway(gateway, dict(GREEDY, messages=messages, stop_sequences=["never-met-zzz"]))
        assert (theirs.status, native.status, translated.status) == (status, status, status), \
            (role, theirs, native, translated)
        if status == 400:
            assert translated.json()["error"]["type"] == "invalid_request_error"
        else:
            assert translated.json()["usage"]["input_tokens"] == theirs.json()["usage"]["input_tokens"]


def test_a_text_document_reaches_vllm_translated(vllm, gateway):
    """vLLM 0.32 refuses a document block (400 listing its block types); the gateway sends a text document as its
    text, base64 too, and refuses a PDF in Anthropic's shape."""
    text = "The three primes are 2, 3 and 5."
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": text}}
    question = {"type": "text", "text": "Which primes?"}
    asked = dict(GREEDY, messages=[{"role": "user", "content": [document, question]}])
    theirs = _vllm(vllm, asked)
    assert theirs.status == 400 and "'tool_result'" in theirs.body.decode(), theirs  # (its list of block types)
    plain = _vllm(vllm, dict(GREEDY, messages=[{"role": "user", "content": [{"type": "text", "text": text},
                                                                          question]}]))
    assert plain.status == 200, plain
    mine = _gateway(gateway, asked)
    assert mine.status == 200, mine
    assert mine.json()["usage"]["input_tokens"] >= plain.json()["usage"]["input_tokens"]
    encoded = dict(document, source={"type": "base64", "media_type": "text/plain",
                                     "data": base64.b64encode(text.encode()).decode()})
    again = _gateway(gateway, dict(GREEDY, messages=[{"role": "user", "content": [encoded, question]}]))
    assert again.status == 200 and again.json()["usage"] == mine.json()["usage"], again
    pdf = dict(document, source={"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"})
    refused = _gateway(gateway, dict(GREEDY, messages=[{"role": "user", "content": [pdf, question]}]))
    assert refused.status == 400 and refused.json()["error"]["type"] == "invalid_request_error", refused


@pytest.mark.parametrize("stop", [False, True], ids=["native", "translated"])
def test_a_thinking_budget_is_vllms_thinking_token_budget(vllm, gateway, stop):
    """vLLM 0.32 bounds C{thinking.budget_tokens} as C{thinking_token_budget}, which a vLLM without a reasoning
    parser refuses: the gateway's answer is that same 400, natively and translated (its budget sent)."""
    body = dict(GREEDY, max_tokens=2048, messages=ASK, thinking={"type": "enabled", "budget_tokens": 1024})
    if stop:
        body["stop_sequences"] = ["never-met-zzz"]
    theirs, mine = _vllm(vllm, body), _gateway(gateway, body)
    assert theirs.status == mine.status == 400, (theirs, mine)
    assert "thinking_token_budget" in theirs.json()["error"]["message"]
    assert "thinking_token_budget" in mine.json()["error"]["message"]
    assert mine.json()["type"] == "error" and mine.json()["error"]["type"] == "invalid_request_error", mine
    for kind in ("disabled", "adaptive"):
        fine = _gateway(gateway, dict(body, max_tokens=8, thinking={"type": kind}))
        assert fine.status == 200, (kind, fine)


@pytest.mark.parametrize("effort", ["low", "high", "xhigh", "max"])
def test_an_effort_reaches_vllm_as_it_takes_it(vllm, gateway, effort):
    """C{output_config.effort} (Claude Code sends one with every request) is vLLM's C{reasoning_effort}: every
    value Anthropic has is taken, natively and translated."""
    body = dict(GREEDY, messages=ASK, output_config={"effort": effort})
    theirs = _vllm(vllm, body)
    native = _gateway(gateway, body)
    translated = _gateway(gateway, dict(body, stop_sequences=["never-met-zzz"]))
    assert theirs.status == native.status == translated.status == 200, (theirs, native, translated)
    assert native.json()["content"] == translated.json()["content"] == theirs.json()["content"]


def _events(raw: bytes):
    return [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]


def test_a_translated_stream_is_recorded_with_vllms_usage(vllm, gateway):
    """A Messages stream translated for vLLM (a stop sequence: through its chat completions) ends with vLLM's own
    Messages usage, and the usage ledger records those very tokens; a request vLLM refuses is recorded as an
    error."""
    stop = _stop_string(vllm)
    body = dict(GREEDY, messages=ASK, stop_sequences=[stop], stream=True)
    theirs = [e for e in _events(_vllm(vllm, body).body) if e["type"] == "message_delta"][-1]
    request_id = "it-msg-" + secrets.token_hex(8)
    answer = request("POST", gateway.url + "/messages", dict(body, model=MODEL), timeout=60,
                     headers={"x-api-key": gateway.master_key, "X-Request-Id": request_id})
    assert answer.status == 200, answer
    mine = [e for e in _events(answer.body) if e["type"] == "message_delta"][-1]
    assert mine["delta"] == theirs["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": stop}
    assert mine["usage"]["output_tokens"] == theirs["usage"]["output_tokens"]
    assert mine["usage"]["input_tokens"] == theirs["usage"]["input_tokens"]
    record = usage_record(gateway, request_id)
    assert record["stream"] and not record["estimated"] and record["endpoint"] == "/v1/messages"
    assert (record["input_tokens"], record["output_tokens"]) == (theirs["usage"]["input_tokens"],
                                                                 theirs["usage"]["output_tokens"])
    request_id = "it-msg-" + secrets.token_hex(8)
    thinking = {"type": "enabled", "budget_tokens": 1024}
    refused = request("POST", gateway.url + "/messages", timeout=60,
                      body=dict(body, model=MODEL, max_tokens=2048, thinking=thinking),
                      headers={"x-api-key": gateway.master_key, "X-Request-Id": request_id})
    # vLLM 0.32 refuses it only once its stream has begun (an in-band error, natively too): an error event in
    # Anthropic's shape with vLLM's reason, recorded as no success.
    assert refused.status == 200 and [e["type"] for e in _events(refused.body)] == ["error"], refused
    assert _events(refused.body)[0]["error"]["type"] == "invalid_request_error", refused
    assert "thinking_token_budget" in _events(refused.body)[0]["error"]["message"]
    record = usage_record(gateway, request_id)
    assert record["output_tokens"] == 0 and record["outcome"] != "ok", record


def test_a_prefill_is_continued_as_vllms_chat_continues_it(vllm, gateway):
    """vLLM 0.32's Messages API closes a final assistant message and answers in a new turn (more input tokens: the
    end of that turn and a new header); the gateway's answer continues it, as vLLM's chat completion with
    C{continue_final_message} does and as Anthropic does, and counts it so."""
    messages = ASK + [{"role": "assistant", "content": "The first is"}]
    theirs = _vllm(vllm, dict(GREEDY, messages=messages)).json()
    chat = request("POST", vllm.chat_url + "/chat/completions", timeout=60, body={
        "model": CHAT_MODEL, "messages": messages, "continue_final_message": True, "add_generation_prompt": False,
        **GREEDY}).json()
    assert theirs["usage"]["input_tokens"] > chat["usage"]["prompt_tokens"]  # (vLLM's own: a new turn)
    mine = _gateway(gateway, dict(GREEDY, messages=messages))
    assert mine.status == 200, mine
    mine = mine.json()
    assert mine["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert mine["content"][0]["text"] == chat["choices"][0]["message"]["content"]
    counted = request("POST", gateway.url + "/messages/count_tokens", {"model": MODEL, "messages": messages},
                      headers={"x-api-key": gateway.master_key})
    assert counted.json() == {"input_tokens": chat["usage"]["prompt_tokens"]}, counted


def test_tool_changes_leave_the_tools_vllm_leaves(vllm, gateway):
    """vLLM 0.32 resolves a system message's tool_addition and tool_removal blocks (a removed tool is not offered,
    one added by value is); the gateway, which sends such a request translated (a vLLM without that support
    refuses them), resolves them the same way: its counts equal vLLM's own."""
    alpha = {"name": "alpha", "description": "Alpha does alpha things.",
             "input_schema": {"type": "object", "properties": {"x": {"type": "string"}}}}
    gamma = {"name": "gamma", "description": "Gamma, added later, with a long description of its own.",
             "input_schema": {"type": "object", "properties": {}}}
    tools = [alpha, dict(alpha, name="beta", description="Beta.")]
    changes = {"removed": {"type": "tool_removal", "tool": {"type": "tool_reference", "name": "alpha"}},
               "defined": {"type": "tool_addition", "tool": {"type": "tool_definition", "definition": gamma}}}
    counts = {}
    for name, change in changes.items():
        body = {"tools": tools, "messages": ASK + [
            {"role": "system", "content": [{"type": "text", "text": "Tools changed."}, change]}]}
        theirs = request("POST", vllm.chat_root + "/v1/messages/count_tokens", dict(body, model=CHAT_MODEL))
        mine = request("POST", gateway.url + "/messages/count_tokens", dict(body, model=MODEL),
                       headers={"x-api-key": gateway.master_key})
        assert theirs.status == mine.status == 200, (theirs, mine)
        counts[name] = (theirs.json()["input_tokens"], mine.json()["input_tokens"])
        answer = _gateway(gateway, dict(body, **GREEDY))
        assert answer.status == 200 and answer.json()["usage"]["input_tokens"] == counts[name][1], answer
    assert all(theirs == mine for theirs, mine in counts.values()), counts
    assert counts["removed"][0] < counts["defined"][0], counts
