"""Anthropic's Messages API through the gateway, compared with real vLLM answering at its own /v1/messages.

Natively (the gateway relays vLLM's own Messages API), through a key-protected
vLLM (the provider's key goes upstream as a Bearer token, never the client's
x-api-key), and translated to chat completions (the same vLLM as an
OpenAI-compatible provider, in a second gateway).
"""

import json
import secrets
import time

import anthropic
import pytest

from tests.integration.support import (CHAT_MODEL, gateway_env, request, start_twistd, stop, tail,
                                       usage_record, wait_for)

MODEL = f"vllm/{CHAT_MODEL}"
SYSTEM = "You are terse."
MESSAGES = [{"role": "user", "content": "Name three prime numbers."}]
# Greedy, so that the gateway's answer and vLLM's own are the same tokens.
# (This SDK has no temperature argument any more: it goes as an extra body field.)
SAMPLING = {"max_tokens": 6, "extra_body": {"temperature": 0.0}}


@pytest.fixture(scope="module")
def via(gateway):
    """The anthropic SDK pointed at the gateway, holding the master key as x-api-key."""
    client = anthropic.Anthropic(base_url=gateway.root, api_key=gateway.master_key, timeout=60, max_retries=0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def direct(vllm):
    """The anthropic SDK pointed straight at the keyless chat vLLM."""
    client = anthropic.Anthropic(base_url=vllm.chat_root, api_key="unused", timeout=60, max_retries=0)
    yield client
    client.close()


def _shape(message):
    """What must be equal between two answers to one greedy request."""
    return (message.type, message.role, message.model, message.stop_reason,
            [(block.type, getattr(block, "text", None)) for block in message.content],
            message.usage.input_tokens, message.usage.output_tokens)


def _streamed(client, model):
    with client.messages.stream(model=model, system=SYSTEM, messages=MESSAGES, **SAMPLING) as stream:
        kinds = [event.type for event in stream]
        return kinds, stream.get_final_message()


def _message_events(kinds):
    return [k for k in kinds if k.startswith("message_")]


def test_create_equals_vllms_own(via, direct):
    mine = via.messages.create(model=MODEL, system=SYSTEM, messages=MESSAGES, **SAMPLING)
    theirs = direct.messages.create(model=CHAT_MODEL, system=SYSTEM, messages=MESSAGES, **SAMPLING)
    assert mine.model == CHAT_MODEL
    assert _shape(mine) == _shape(theirs)
    assert 0 < mine.usage.output_tokens <= SAMPLING["max_tokens"]


def test_stream_equals_vllms_own(via, direct):
    kinds, final = _streamed(via, MODEL)
    their_kinds, their_final = _streamed(direct, CHAT_MODEL)
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    # How many deltas carry the text is vLLM's choice per run (its output
    # handler merges tokens that queue up), so only the message-level events
    # and the final message must agree.
    assert _message_events(kinds) == _message_events(their_kinds)
    assert _shape(final) == _shape(their_final)


def test_count_tokens_equals_vllms_own(via, direct):
    mine = via.messages.count_tokens(model=MODEL, system=SYSTEM, messages=MESSAGES)
    theirs = direct.messages.count_tokens(model=CHAT_MODEL, system=SYSTEM, messages=MESSAGES)
    assert mine.input_tokens == theirs.input_tokens > 0


def test_bearer_auth_and_a_key_protected_vllm(gateway, vllm):
    """The client's key (here as Bearer) stays at the gateway; the provider's own key reaches vLLM.

    The answer is compared with that same vLLM's own: greedy decoding of random
    weights has near-ties that two vLLM processes can break differently, so
    another server's answer may differ by a token.
    """
    client = anthropic.Anthropic(base_url=gateway.root, auth_token=gateway.master_key, timeout=60, max_retries=0)
    guarded = anthropic.Anthropic(base_url=vllm.chat_key_root, auth_token=vllm.chat_key, timeout=60, max_retries=0)
    try:
        mine = client.messages.create(model=f"vllm-test/{CHAT_MODEL}", system=SYSTEM, messages=MESSAGES, **SAMPLING)
        theirs = guarded.messages.create(model=CHAT_MODEL, system=SYSTEM, messages=MESSAGES, **SAMPLING)
    finally:
        client.close()
        guarded.close()
    assert _shape(mine) == _shape(theirs)


def test_errors_are_anthropic_shaped(gateway, via):
    with pytest.raises(anthropic.NotFoundError) as raised:
        via.messages.create(model="vllm/no-such-model", messages=MESSAGES, max_tokens=4)
    assert raised.value.body["type"] == "error" and raised.value.body["error"]["type"] == "not_found_error"
    bad = anthropic.Anthropic(base_url=gateway.root, api_key="wrong", timeout=60, max_retries=0)
    try:
        with pytest.raises(anthropic.AuthenticationError) as raised:
            bad.messages.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    finally:
        bad.close()
    assert raised.value.body["error"]["type"] == "authentication_error"
    # vLLM's own validation error, as vLLM sent it.
    answer = request("POST", gateway.url + "/messages", {"model": MODEL, "messages": MESSAGES, "max_tokens": 0},
                     headers={"x-api-key": gateway.master_key})
    assert answer.status == 400 and answer.json()["type"] == "error"


def test_usage_record_equals_vllms_usage(gateway, via):
    request_id = "it-msg-" + secrets.token_hex(8)
    body = dict(model=MODEL, system=SYSTEM, messages=MESSAGES, stream=True, max_tokens=6, temperature=0.0)
    answer = request("POST", gateway.url + "/messages", body,
                     headers={"x-api-key": gateway.master_key, "anthropic-version": "2023-06-01",
                              "X-Request-Id": request_id})
    assert answer.status == 200, answer
    delta = [json.loads(line[6:]) for line in answer.body.decode().splitlines()
             if line.startswith("data: ") and '"message_delta"' in line][0]
    record = usage_record(gateway, request_id)
    assert record["stream"] and not record["estimated"] and record["endpoint"] == "/v1/messages"
    assert record["input_tokens"] == delta["usage"]["input_tokens"]
    assert record["output_tokens"] == delta["usage"]["output_tokens"]


# -- translated: the same vLLM as an OpenAI-compatible provider --------------------------------


@pytest.fixture(scope="module")
def translating(vllm, tmp_path_factory):
    """A second gateway, with the chat vLLM as an C{openai} provider (no Messages API: translated)."""
    workdir = tmp_path_factory.mktemp("translating")
    key = "gm-it-" + secrets.token_urlsafe(16)
    env = gateway_env({"OPENAI_BASE_URL": vllm.chat_url, "OPENAI_API_KEY": "unused", "GOMODEL_MASTER_KEY": key})
    _, proc, log_path, port = start_twistd(workdir, env)
    root = f"http://127.0.0.1:{port}"

    def ready():
        if proc.poll() is not None:
            pytest.fail(f"the translating gateway exited: {tail(log_path)}")
        try:
            models = request("GET", root + "/v1/models", headers={"x-api-key": key}, timeout=2)
        except OSError:
            return False
        return models.status == 200 and any(m["id"] == f"openai/{CHAT_MODEL}" for m in models.json()["data"])

    try:
        wait_for(ready, 60, what="the translating gateway")
        client = anthropic.Anthropic(base_url=root, api_key=key, timeout=60, max_retries=0)
        yield client
        client.close()
    finally:
        stop(proc)


def test_translated_create_and_stream_equal_vllms_own(translating, direct):
    model = f"openai/{CHAT_MODEL}"
    theirs = direct.messages.create(model=CHAT_MODEL, system=SYSTEM, messages=MESSAGES, **SAMPLING)
    mine = translating.messages.create(model=model, system=SYSTEM, messages=MESSAGES, **SAMPLING)
    assert mine.id.startswith("msg_")
    # vLLM's own endpoint is a translation to chat too: the same prompt, the same greedy tokens.
    assert _shape(mine) == _shape(theirs)
    kinds, final = _streamed(translating, model)
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert _shape(final) == _shape(theirs)
    count = translating.messages.count_tokens  # an OpenAI provider has no tokenizer to ask: refused, not guessed
    with pytest.raises(anthropic.APIStatusError) as raised:
        count(model=model, messages=MESSAGES)
    assert raised.value.status_code == 501



def _batch_results(client, model, timeout=240):
    """A message batch of two greedy requests for C{model}, run to its end: its results by custom_id."""
    batch = client.messages.batches.create(requests=[
        {"custom_id": f"q{i}", "params": {"model": model, "system": SYSTEM, "messages": MESSAGES, "max_tokens": 6,
                                          "temperature": 0.0}} for i in range(2)])
    deadline = time.monotonic() + timeout
    while batch.processing_status != "ended":
        assert time.monotonic() < deadline, f"message batch still {batch.processing_status}: {batch}"
        time.sleep(0.5)
        batch = client.messages.batches.retrieve(batch.id)
    assert batch.request_counts.succeeded == 2, batch
    return {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}


def test_a_message_batch_natively_and_translated_answers_as_vllm_does(via, translating, direct):
    """Anthropic's Message Batches: each request answered as vLLM's own Messages API answers it, natively
    (relayed to vLLM's /v1/messages) and translated (to its chat completions, by the second gateway)."""
    theirs = direct.messages.create(model=CHAT_MODEL, system=SYSTEM, messages=MESSAGES, **SAMPLING)
    for client, model in ((via, MODEL), (translating, f"openai/{CHAT_MODEL}")):
        results = _batch_results(client, model)
        assert set(results) == {"q0", "q1"}
        for result in results.values():
            assert result.type == "succeeded" and _shape(result.message) == _shape(theirs)
