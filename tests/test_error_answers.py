"""Bad input on every route: each gets a clear error in its route's dialect, over real sockets."""

import json

import pytest_twisted
import treq

from gomodel import jsonutil

MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"


def error_message(content, anthropic=False) -> str:
    """The message of an error answer in its dialect (OpenAI's envelope, or Anthropic's)."""
    payload = jsonutil.loads(content)
    if anthropic:
        assert payload["type"] == "error" and set(payload["error"]) == {"type", "message"}
    else:
        assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
    return payload["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_an_unknown_id_is_quoted_not_echoed_whole(http, gateway):
    """A client's id, however long, is quoted in its 404 as a model name is (its first 256 characters): an id
    of a megabyte in a body was a megabyte of error, one in a path the 16 kB of the request's target."""
    long_id = "x" * 10000
    cases = [
        ("GET", "/v1/files/" + long_id, None, True),  # (Anthropic's Files API for an Anthropic client)
        ("GET", "/v1/batches/" + long_id, None, False),
        ("GET", "/v1/responses/" + long_id, None, False),
        ("GET", "/v1/messages/batches/" + long_id, None, True),
        ("GET", "/admin/api/v1/auth-keys/" + long_id, None, False),
        ("GET", "/admin/api/v1/auth-keys?after=" + long_id, None, False),
        ("GET", "/v1/models?after_id=" + long_id, None, True),
        ("GET", "/p/" + long_id + "/v1/models", None, False),
        ("GET", "/admin/static/" + long_id, None, False),
        ("POST", "/v1/batches", {"input_file_id": "file-" + "x" * 1_000_000, "endpoint": "/v1/chat/completions"},
         False),
    ]
    for method, path, body, anthropic in cases:
        data = None if body is None else json.dumps(body).encode()
        response = await http.request(method, gateway.url + path, data=data,
                                      headers={"content-type": "application/json", "anthropic-version": "2023-06-01"})
        message = error_message(await treq.content(response), anthropic)
        assert response.code == (400 if "?" in path else 404), (path[:40], message[:100])
        assert "x" * 200 in message and "…" in message and len(message) < 400, (path[:40], len(message))
    response = await http.post(gateway.url + "/v1/responses", headers={"content-type": "application/json"},
                               data=json.dumps({"model": MODEL, "input": "hi"}).encode())
    stored = jsonutil.loads(await treq.content(response))["id"]
    response = await http.get(f"{gateway.url}/v1/responses/{stored}/input_items?after={long_id}")
    message = error_message(await treq.content(response))
    assert response.code == 400 and "x" * 200 in message and "…" in message and len(message) < 400


def raw_answer(status_line, content_type, body: bytes) -> str:
    """An upstream's whole HTTP answer as the fake writes it (its C{fake_raw})."""
    return (f"HTTP/1.1 {status_line}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
            + body.decode())


@pytest_twisted.ensureDeferred
async def test_a_page_answered_200_is_a_502_not_the_page(http, gateway, fake):
    """An upstream (a proxy's login page, a base URL at a web UI) that answers 200 with a page, not JSON: a 502
    bad_upstream_response in the route's dialect, which the SDKs raise; it was relayed as a 200, and the openai
    SDK returned the page's text as the completion."""
    bodies = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
        "/v1/completions": {"prompt": "hi"},
        "/v1/embeddings": {"input": "hi"},
        "/v1/responses": {"input": "hi"},
        "/v1/rerank": {"query": "q", "documents": ["a"]},
        "/v1/messages": {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
    }
    page = b"<html><body>Sign in to 127.0.0.1:3128</body></html>"
    for path, fields in bodies.items():
        for content_type in ("text/html; charset=utf-8", "text/plain"):
            raw = raw_answer("200 OK", content_type, page)
            response = await http.post(gateway.url + path, headers={"content-type": "application/json"},
                                       data=json.dumps(dict(fields, model=MODEL, fake_raw=raw)).encode())
            content = await treq.content(response)
            message = error_message(content, anthropic=path == "/v1/messages")
            assert response.code == 502, (path, content_type, content)
            assert "'vllm'" in message and b"127.0.0.1" not in content and b"Sign in" not in content
    # (a server that calls its JSON text/json is relayed)
    raw = raw_answer("200 OK", "text/json", b'{"object": "list", "data": []}')
    response = await http.post(gateway.url + "/v1/embeddings", headers={"content-type": "application/json"},
                               data=json.dumps({"model": MODEL, "input": "hi", "fake_raw": raw}).encode())
    assert (response.code, await treq.content(response)) == (200, b'{"object": "list", "data": []}')


@pytest_twisted.ensureDeferred
async def test_a_native_messages_answer_that_is_no_message_is_a_502(http, gateway, fake):
    """vLLM's own Messages API answering 200 with what is no message (not JSON, a JSON array): a 502 in Anthropic's
    dialect (the anthropic SDK raised a JSONDecodeError, no APIError, on the bytes relayed)."""
    for body in (b"not json!", b"[]", b'{"object": "list"}'):
        raw = raw_answer("200 OK", "application/json", body)
        response = await http.post(gateway.url + "/v1/messages", headers={"content-type": "application/json"},
                                   data=json.dumps({"model": MODEL, "max_tokens": 5, "fake_raw": raw,
                                                    "messages": [{"role": "user", "content": "hi"}]}).encode())
        content = await treq.content(response)
        assert response.code == 502, (body, content)
        error_message(content, anthropic=True)


@pytest_twisted.ensureDeferred
async def test_a_batch_missing_or_mistyping_its_fields_is_told_which(http, gateway):
    """C{POST /v1/batches}: a field that is absent is a missing_required_parameter, one of the wrong type an
    invalid_type naming it; an input_file_id of 5 was "the request needs an 'input_file_id'", and no endpoint
    at all an invalid_value."""
    good = {"input_file_id": "file-abc", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    cases = [
        ({"input_file_id": "file-abc"}, "endpoint", "missing_required_parameter", "needs an 'endpoint'"),
        (dict(good, endpoint=None), "endpoint", "missing_required_parameter", "needs an 'endpoint'"),
        (dict(good, endpoint="/v1/nope"), "endpoint", "invalid_value", "must be one of"),
        (dict(good, input_file_id=None), "input_file_id", "missing_required_parameter", "needs an 'input_file_id'"),
        (dict(good, input_file_id=""), "input_file_id", "missing_required_parameter", "needs an 'input_file_id'"),
        (dict(good, input_file_id=5), "input_file_id", "invalid_type", "must be a string"),
        (dict(good, input_file_id=["file-abc"]), "input_file_id", "invalid_type", "must be a string"),
    ]
    for body, param, code, said in cases:
        response = await http.post(gateway.url + "/v1/batches", data=json.dumps(body).encode(),
                                   headers={"content-type": "application/json"})
        error = jsonutil.loads(await treq.content(response))["error"]
        assert (response.code, error["param"], error["code"]) == (400, param, code), (body, error)
        assert said in error["message"], (body, error)


@pytest_twisted.ensureDeferred
async def test_a_value_refused_is_quoted_not_echoed_whole(reactor, http):
    """A client's field name or value that a 400 names (an unknown field, a block or tool type) is quoted as a
    model name is: a megabyte-long one made a megabyte of message, twice over where it was the C{param} too. The
    translated ways (an OpenAI provider's) refuse the Messages and Responses types they do not take."""
    from tests.support import start_fake, start_gateway, stop_all

    fake = await start_fake(reactor, models=("gpt-x",), responses=False, messages=False)
    gateway = await start_gateway(reactor, {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-up"})
    big = "q" * 100_000
    hi = [{"role": "user", "content": "hi"}]
    anthropic = {"model": "gpt-x", "max_tokens": 5, "messages": hi}
    cases = [
        ("POST", "/admin/api/v1/auth-keys", {"name": "n", big: 1}),
        ("POST", "/admin/api/v1/auth-keys", {"name": "n", "budgets": [{"period": "daily", "max_tokens": 5, big: 1}]}),
        ("PUT", "/admin/api/v1/budgets", {"user_path": "/a", "period": "daily", "amount": 5, big: 1}),
        ("POST", "/v1/messages", dict(anthropic, messages=[{"role": "user", "content": [{"type": big}]}])),
        ("POST", "/v1/messages", dict(anthropic, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": [big]}}]}])),
        ("POST", "/v1/messages", dict(anthropic, tools=[{"type": big, "name": "t"}])),
        ("POST", "/v1/messages", dict(anthropic, tool_choice={"type": big})),
        ("POST", "/v1/messages", dict(anthropic, thinking={"type": big})),
        ("POST", "/v1/responses", {"model": "gpt-x", "input": [{"type": big}]}),
        ("POST", "/v1/responses", {"model": "gpt-x", "input": [{"role": "user", "content": [{"type": big}]}]}),
        ("POST", "/v1/responses", {"model": "gpt-x", "input": "hi", "tools": [{"type": big}]}),
    ]
    try:
        for method, path, body in cases:
            response = await http.request(method, gateway.url + path, data=json.dumps(body).encode(),
                                          headers={"content-type": "application/json"})
            content = await treq.content(response)
            message = error_message(content, anthropic=path == "/v1/messages")
            assert response.code == 400, (path, content[:200])
            assert "q" * 200 in message and "…" in message and len(content) < 1000, (path, content[:200])
    finally:
        await stop_all(gateway, fake)


@pytest_twisted.ensureDeferred
async def test_responses_background_and_store_must_be_booleans(http, gateway, fake):
    """C{background} and C{store} that are no booleans are a 400 invalid_type, as C{stream} is: vLLM reads
    C{"yes"} or C{1} as true, so a C{"background": "yes"} was queued there while the gateway, which takes only
    true, neither kept nor watched it (and a C{"store": "no"} was kept here, not there)."""
    sent = len(fake.forwarded())
    for field in ("background", "store"):
        for value in ("yes", "no", 1, 0, [], {}):
            response = await http.post(gateway.url + "/v1/responses", headers={"content-type": "application/json"},
                                       data=json.dumps({"model": MODEL, "input": "hi", field: value}).encode())
            error = jsonutil.loads(await treq.content(response))["error"]
            assert (response.code, error["param"], error["code"]) == (400, field, "invalid_type"), (field, value)
            assert f"'{field}' must be a boolean" in error["message"]
    assert len(fake.forwarded()) == sent  # none went upstream
    for value in (True, False, None):
        response = await http.post(gateway.url + "/v1/responses", headers={"content-type": "application/json"},
                                   data=json.dumps({"model": MODEL, "input": "hi", "store": value}).encode())
        assert response.code == 200, (value, await treq.content(response))
        await treq.content(response)


@pytest_twisted.ensureDeferred
async def test_a_success_without_a_body_is_a_502(http, gateway, fake):
    """An upstream's 204, or a 200 with an empty body, to an inference request: a 502 bad_upstream_response (it was
    relayed as the same empty success, which no SDK can read as a completion)."""
    bodies = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
        "/v1/embeddings": {"input": "hi"},
        "/v1/responses": {"input": "hi"},
    }
    for path, fields in bodies.items():
        for raw in ("HTTP/1.1 204 No Content\r\n\r\n",
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\r\n"):
            response = await http.post(gateway.url + path, headers={"content-type": "application/json"},
                                       data=json.dumps(dict(fields, model=MODEL, fake_raw=raw)).encode())
            content = await treq.content(response)
            assert response.code == 502, (path, raw, content)
            assert jsonutil.loads(content)["error"]["code"] == "bad_upstream_response"


@pytest_twisted.ensureDeferred
async def test_a_body_that_is_not_utf8_is_told_so_and_where(http, gateway):
    """A body in Latin-1 (a Windows tool's) or UTF-16 is a 400 invalid_json that says it is not UTF-8 and at which
    byte, in the route's dialect; it was orjson's "str is not valid UTF-8: surrogates not allowed" at line 1
    column 1, wherever the byte was."""
    latin1 = '{"model": "x", "messages": [{"role": "user", "content": "café"}]}'.encode("latin-1")
    utf16 = '{"model": "x"}'.encode("utf-16")
    for path in ("/v1/chat/completions", "/v1/messages"):
        for data, where in ((latin1, "byte 60 is 0xe9"), (utf16, "byte 0 is 0xff")):
            response = await http.post(gateway.url + path, data=data, headers={"content-type": "application/json"})
            message = error_message(await treq.content(response), anthropic=path == "/v1/messages")
            assert response.code == 400 and "not UTF-8" in message and where in message, (path, message)
            assert "surrogates" not in message


@pytest_twisted.ensureDeferred
async def test_a_request_its_connection_refuses_is_answered_in_its_routes_dialect(reactor, gateway):
    """What the channel answers itself once a request's target is in (a body's broken chunk framing, a head with
    too many headers) was OpenAI's envelope on every route: an Anthropic client on /v1/messages got a body its
    SDK does not read as an error. It is Anthropic's there (with its request-id header), OpenAI's elsewhere."""
    from tests.rawclient import connect
    from tests.support import with_timeout

    async def answer(path, rest):
        client = await connect(reactor, gateway.port, b"POST " + path + b" HTTP/1.1\r\nHost: g\r\n" + rest)
        await with_timeout(reactor, client.lost, 10)
        head, _, body = bytes(client.received).partition(b"\r\n\r\n")
        return head, body

    broken = b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"
    crowded = b"".join(b"X-H%d: v\r\n" % i for i in range(600)) + b"\r\n"
    for path, anthropic in ((b"/v1/messages", True), (b"/v1/messages/count_tokens", True),
                            (b"/v1/messages/batches", True), (b"/p/vllm/v1/messages", True), (b"/v1/chat/completions", False),
                            (b"/v1/files", False), (b"/p/vllm/v1/chat/completions", False)):
        for rest, status in ((broken, b"400"), (crowded, b"431")):
            head, body = await answer(path, rest)
            assert head.startswith(b"HTTP/1.1 " + status + b" "), (path, head)
            assert "not valid HTTP/1.1" in error_message(body, anthropic), (path, body)
            assert (b"\r\nrequest-id: " in head.lower()) == anthropic, (path, head)
            if anthropic:
                assert json.loads(body)["error"]["type"] == "invalid_request_error", body
