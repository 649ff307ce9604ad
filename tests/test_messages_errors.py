"""Every error on /v1/messages in Anthropic's shape, over real sockets: the channel's own (body too large, not
JSON, a wrong content type or method, no key), the gateway's (an unknown model, a bad field) and the upstream's
(refused, timed out, its own 4xx/5xx, a stream broken mid-way), natively (a vLLM) and translated (an
OpenAI-compatible provider)."""

import gzip
import json

import pytest
import pytest_twisted
import treq

from gomodel import jsonutil
from tests.fakes.vllm import CHAT_MODEL
from tests.rawclient import connect
from tests.support import dead_base_url, start_gateway, with_timeout

KEY = "messages-errors-key"
NATIVE, TRANSLATED = f"vllm/{CHAT_MODEL}", f"openai/{CHAT_MODEL}"
HI = [{"role": "user", "content": "hi"}]
LIMIT = 64 * 1024


@pytest_twisted.async_yield_fixture()
async def gw(reactor, fake):
    """The fake behind a vLLM provider (Messages natively) and an OpenAI one (translated); a small body limit and
    upstream timeouts of a second."""
    gateway = await start_gateway(reactor, {
        "GOMODEL_MASTER_KEY": KEY, "VLLM_BASE_URL": fake.base_url, "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "sk-up", "BODY_SIZE_LIMIT": str(LIMIT), "HTTP_RESPONSE_HEADER_TIMEOUT": "1s",
        "HTTP_STREAM_IDLE_TIMEOUT": "1s", "ROUTING_MAX_ATTEMPTS": "1"})
    yield gateway
    await gateway.service.stopService()


def anthropic_error(content: bytes) -> dict:
    """The C{error} of an Anthropic error body, its shape checked."""
    payload = jsonutil.loads(content)
    assert payload["type"] == "error" and set(payload["error"]) == {"type", "message"}, payload
    assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]
    return payload["error"]


def headers(**extra):
    values = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    values.update({name.replace("_", "-"): value for name, value in extra.items()})
    return {name: [value] for name, value in values.items() if value is not None}


def body(model=NATIVE, **fields):
    return json.dumps(dict({"model": model, "max_tokens": 8, "messages": HI}, **fields)).encode()


# (case, method, path, data, headers, status, Anthropic's error type)
CHANNEL = [
    ("too large", "POST", "/v1/messages", body(system="x" * LIMIT), headers(), 413, "request_too_large"),
    ("count too large", "POST", "/v1/messages/count_tokens", body(system="x" * LIMIT), headers(), 413,
     "request_too_large"),
    ("not JSON", "POST", "/v1/messages", b'{"model": ', headers(), 400, "invalid_request_error"),
    ("empty", "POST", "/v1/messages", b"", headers(), 400, "invalid_request_error"),
    ("no object", "POST", "/v1/messages", b"[]", headers(), 400, "invalid_request_error"),
    ("not UTF-8", "POST", "/v1/messages", '{"model": "é"}'.encode("latin-1"), headers(), 400,
     "invalid_request_error"),
    # (a JSON body is read as JSON whatever its Content-Type says, as on every route: this one is no JSON)
    ("form", "POST", "/v1/messages", b"model=x", headers(content_type="application/x-www-form-urlencoded"), 400,
     "invalid_request_error"),
    ("gzip", "POST", "/v1/messages", gzip.compress(body()), headers(content_encoding="gzip"), 415,
     "invalid_request_error"),
    ("GET", "GET", "/v1/messages", None, headers(), 405, "invalid_request_error"),
    ("no key", "POST", "/v1/messages", body(), headers(x_api_key=None), 401, "authentication_error"),
    ("wrong key", "POST", "/v1/messages", body(), headers(x_api_key="nope"), 401, "authentication_error"),
    ("unknown model", "POST", "/v1/messages", body(model="nope/nothing"), headers(), 404, "not_found_error"),
    ("no max_tokens", "POST", "/v1/messages", json.dumps({"model": NATIVE, "messages": HI}).encode(), headers(),
     400, "invalid_request_error"),
    ("unknown path", "POST", "/v1/messages/nothing", body(), headers(), 404, "not_found_error"),
]


@pytest.mark.parametrize("case, method, path, data, sent, status, kind", CHANNEL, ids=[c[0] for c in CHANNEL])
@pytest_twisted.ensureDeferred
async def test_the_channels_and_the_gateways_errors_are_anthropics(http, gw, case, method, path, data, sent,
                                                                 status, kind):
    response = await http.request(method, gw.url + path, data=data, headers=sent)
    content = await treq.content(response)
    error = anthropic_error(content)
    assert (response.code, error["type"]) == (status, kind), (case, content)


# (case, the fake's steering, status, Anthropic's error type); each natively and translated, streamed or not
UPSTREAM = [
    ("500", {"fake_status": 500}, 500, "api_error"),
    ("503", {"fake_status": 503}, 503, "overloaded_error"),
    ("529", {"fake_status": 529}, 529, "overloaded_error"),
    ("429", {"fake_status": 429}, 429, "rate_limit_error"),
    ("400", {"fake_status": 400}, 400, "invalid_request_error"),
    ("401", {"fake_status": 401}, 502, "api_error"),
    ("413", {"fake_status": 413}, 413, "request_too_large"),
    ("hangs", {"fake_hang": True}, 504, "timeout_error"),
    ("drops", {"fake_drop": True}, 502, "api_error"),
    ("no JSON", {"fake_status": 200, "fake_body": "<html>a proxy's page</html>"}, 502, "api_error"),
    ("an error's JSON", {"fake_status": 200, "fake_body": '{"error": {"message": "x"}}'}, 502, "api_error"),
    ("HTML", {"fake_raw": "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: 13\r\n\r\n"
                          "<html>x</html"}, 502, "api_error"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", [NATIVE, TRANSLATED], ids=["native", "translated"])
@pytest.mark.parametrize("case, steer, status, kind", UPSTREAM, ids=[c[0] for c in UPSTREAM])
@pytest_twisted.ensureDeferred
async def test_an_upstreams_failure_before_the_answer_is_anthropics(http, gw, fake, case, steer, status, kind,
                                                                   model, stream):
    fake.steer = steer
    response = await http.post(gw.url + "/v1/messages", data=body(model, stream=stream), headers=headers())
    content = await treq.content(response)
    error = anthropic_error(content)
    assert (response.code, error["type"]) == (status, kind), content
    assert fake.base_url.split("//")[1] not in error["message"]


def events_of(raw: bytes) -> list:
    """The (event, data) pairs of an Anthropic event stream, its framing checked."""
    out = []
    for block in raw.split(b"\n\n")[:-1]:
        head, data = block.split(b"\n")
        assert head.startswith(b"event: ") and data.startswith(b"data: "), block
        payload = jsonutil.loads(data[len(b"data: "):])
        assert payload["type"] == head[len(b"event: "):].decode()
        out.append((payload["type"], payload))
    assert raw.endswith(b"\n\n")
    return out


# (case, the fake's steering, Anthropic's error type of the stream's last event)
BROKEN = [
    ("breaks", {"fake_die_after": 2}, "api_error"),
    ("falls silent", {"fake_pace": 1.5}, "api_error"),
]


def dechunked(raw: bytes) -> tuple:
    """C{(status, body)} of a raw HTTP/1.1 answer with a chunked body, which may stop short (no last chunk)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"transfer-encoding: chunked" in head.lower(), head
    body = b""
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        if not size or int(size, 16) == 0:
            break
        body, rest = body + rest[:int(size, 16)], rest[int(size, 16) + 2:]
    return status, body


@pytest.mark.parametrize("model", [NATIVE, TRANSLATED], ids=["native", "translated"])
@pytest.mark.parametrize("case, steer, kind", BROKEN, ids=[c[0] for c in BROKEN])
@pytest_twisted.ensureDeferred
async def test_a_stream_broken_midway_ends_with_an_anthropic_error_event(reactor, gw, fake, case, steer, kind,
                                                                       model):
    """Its last event is Anthropic's C{error}, and its body is left incomplete (no last chunk): never a clean end."""
    fake.steer = steer
    data = body(model, stream=True)
    client = await connect(reactor, gw.port, b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: " + KEY.encode()
                           + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    await with_timeout(reactor, client.lost, 10)
    received = bytes(client.received)
    assert not received.endswith(b"\r\n0\r\n\r\n")
    status, raw = dechunked(received)
    events = events_of(raw)
    names = [name for name, _ in events]
    assert status == 200 and names[0] == "message_start" and "message_stop" not in names
    name, last = events[-1]
    assert name == "error" and set(last) == {"type", "error"} and set(last["error"]) == {"type", "message"}
    assert last["error"]["type"] == kind, last
    assert fake.base_url.split("//")[1] not in last["error"]["message"]


@pytest.mark.parametrize("model", [NATIVE, TRANSLATED], ids=["native", "translated"])
@pytest_twisted.ensureDeferred
async def test_an_upstream_that_refuses_connections_is_an_anthropic_error(reactor, http, model):
    dead = await dead_base_url(reactor)
    gateway = await start_gateway(reactor, {"GOMODEL_MASTER_KEY": KEY, "VLLM_BASE_URL": dead,
                                            "OPENAI_BASE_URL": dead, "OPENAI_API_KEY": "sk-up"}, wait_ready=False)
    try:
        for stream in (False, True):
            response = await http.post(gateway.url + "/v1/messages", data=body(model, stream=stream),
                                       headers=headers())
            content = await treq.content(response)
            error = anthropic_error(content)
            assert (response.code, error["type"]) in ((502, "api_error"), (503, "overloaded_error")), content
            assert dead.split("//")[1] not in error["message"]
    finally:
        await gateway.service.stopService()


# (case, fields, the first fault's message) of bodies a create and a count_tokens both refuse, several faults in one
SHARED_FAULTS = [
    ("no message before a server side", {"messages": [], "mcp_servers": [{"type": "url", "url": "https://x"}]},
     "messages: at least one message is required"),
    ("no list before a server tool", {"messages": "hi", "tools": [{"type": "web_search_20250305", "name": "s"}]},
     "messages: Input should be a valid list"),
    ("a thinking display none of Anthropic's", {"thinking": {"type": "enabled", "budget_tokens": 1024,
                                                              "display": "full"}},
     "thinking.display: 'full' is not one of 'summarized', 'omitted'"),
    ("a server side before a tool choice", {"container": "c", "tool_choice": {"type": "any"}},
     "container: code execution containers (and their skills) are for Anthropic's code execution tool, one of the "
     "server tools (web search, code execution, computer use...) are not supported by this provider"),
]


@pytest.mark.parametrize("model", [NATIVE, TRANSLATED], ids=["native", "translated"])
@pytest.mark.parametrize("case, fields, said", SHARED_FAULTS, ids=[c[0] for c in SHARED_FAULTS])
@pytest_twisted.ensureDeferred
async def test_count_tokens_refuses_what_a_create_refuses_first_in_its_words(http, gw, fake, case, fields, said,
                                                                             model):
    """Of several faults in the fields a create and a count_tokens share, both name the same first, in one order
    (L{gomodel.anthropic.translate.check_create}'s less max_tokens and sampling, which count_tokens has not), before
    any upstream: natively, and for a provider without a tokenizer before its 501. Before, count_tokens looked at the
    server side before the messages, and let a thinking display through (counted natively, or the 501)."""
    before = len(fake.forwarded())
    for path, sent in (("/v1/messages", dict({"model": model, "max_tokens": 1100, "messages": HI}, **fields)),
                       ("/v1/messages/count_tokens", dict({"model": model, "messages": HI}, **fields))):
        response = await http.post(gw.url + path, data=json.dumps(sent).encode(), headers=headers())
        content = await treq.content(response)
        assert response.code == 400, (path, content)
        assert anthropic_error(content) == {"type": "invalid_request_error", "message": said}, path
    assert len(fake.forwarded()) == before


_MAX_BELOW_BUDGET = ("`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our documentation "
                     "at https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
                     "#max-tokens-and-context-window-size")
# (thinking, max_tokens, Anthropic's 400, whether count_tokens (no max_tokens) is refused too)
THINKING_FAULTS = [
    ({"type": "enabled", "budget_tokens": 512}, 2048,
     "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024", True),
    ({"type": "enabled"}, 2048, "thinking.enabled.budget_tokens: Field required", True),
    ({"type": "enabled", "budget_tokens": "2000"}, 4096,
     "thinking.enabled.budget_tokens: Input should be a valid integer", True),
    ({"type": "enabled", "budget_tokens": 2048}, 2048, _MAX_BELOW_BUDGET, False),
    ({"type": "deep"}, 2048, "thinking.type: 'deep' is not one of 'enabled', 'disabled', 'adaptive'", True),
]


@pytest.mark.parametrize("model", [NATIVE, TRANSLATED], ids=["native", "translated"])
@pytest.mark.parametrize("thinking, max_tokens, said, counted", THINKING_FAULTS, ids=[
    "small budget", "no budget", "budget no integer", "budget past max_tokens", "unknown type"])
@pytest_twisted.ensureDeferred
async def test_a_thinking_config_anthropic_refuses_is_its_400_natively_too(http, gw, fake, thinking, max_tokens,
                                                                            said, counted, model):
    """A thinking budget below 1024, missing or no integer, one not below max_tokens, and a thinking type none of
    Anthropic's are its 400s (in its words where they are known), for a vLLM as translated, streamed or not, and a
    count_tokens (all but the budget against max_tokens, which it has not), before any upstream. Before, natively
    they went to vLLM, and translated the words were not Anthropic's ("an integer greater than or equal to", the
    budget against max_tokens without its pointer to the documentation)."""
    before = len(fake.forwarded())
    sent = [("/v1/messages", {"model": model, "max_tokens": max_tokens, "messages": HI, "thinking": thinking,
                              "stream": stream}) for stream in (False, True)]
    if counted:
        sent.append(("/v1/messages/count_tokens", {"model": model, "messages": HI, "thinking": thinking}))
    for path, data in sent:
        response = await http.post(gw.url + path, data=json.dumps(data).encode(), headers=headers())
        content = await treq.content(response)
        assert response.code == 400, (path, content)
        assert anthropic_error(content) == {"type": "invalid_request_error", "message": said}, path
    assert len(fake.forwarded()) == before


@pytest.mark.parametrize("model", [NATIVE, TRANSLATED], ids=["native", "translated"])
@pytest_twisted.ensureDeferred
async def test_an_upstreams_error_answered_as_an_event_stream_is_told_in_its_words(gw, fake, model):
    """An upstream that refuses a streamed request with a 400 whose body is an event stream (its error the first
    event's data): the Anthropic SDK's BadRequestError carries the upstream's message in Anthropic's envelope, its
    address replaced by the provider's name (before: "answered HTTP 400." only)."""
    import anthropic

    from tests.support import in_thread
    where = fake.base_url.split("//")[1].split("/")[0]
    said = json.dumps({"error": {"message": f"max_tokens is too large: 9999 (at {where})",
                                 "type": "BadRequestError", "param": "max_tokens", "code": 400}})
    events = f"event: error\ndata: {said}\n\ndata: [DONE]\n\n"
    raw = (f"HTTP/1.1 400 Bad Request\r\nContent-Type: text/event-stream\r\nContent-Length: {len(events)}\r\n\r\n"
           + events)
    fake.steer = {"fake_raw": raw}
    client = anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0, timeout=10)
    try:
        with pytest.raises(anthropic.BadRequestError) as raised:
            await in_thread(client.messages.create, model=model, max_tokens=9999, messages=HI, stream=True)
    finally:
        client.close()
    provider = model.split("/")[0]
    assert raised.value.status_code == 400
    assert raised.value.body == {"type": "error", "error": {
        "type": "invalid_request_error", "message": f"max_tokens is too large: 9999 (at {provider})"}}, raised.value.body
    assert where.split(":")[1] not in str(raised.value.body)
