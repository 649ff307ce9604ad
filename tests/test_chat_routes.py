"""POST /v1/chat/completions and /v1/models over real sockets, against the fake vLLM."""

import gzip
import json
import time
from email.utils import parsedate_to_datetime

import pytest_twisted
import treq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from gomodel import jsonutil
from tests.support import dead_base_url, start_fake, start_gateway, stop_all

MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"
BARE = "meta-llama/Llama-3.1-8B-Instruct"


async def post(http, gateway, body, headers=None, path="/v1/chat/completions"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await http.post(gateway.url + path, data=data,
                               headers={"content-type": "application/json", **(headers or {})})
    return response, await treq.content(response)


def error_of(content):
    payload = jsonutil.loads(content)
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    return payload["error"]


@pytest_twisted.ensureDeferred
async def test_models_list_is_prefixed_and_keeps_upstream_fields(http, gateway):
    response = await http.get(gateway.url + "/v1/models")
    assert response.code == 200
    body = jsonutil.loads(await treq.content(response))
    assert body["object"] == "list"
    [model] = body["data"]
    assert model["id"] == MODEL
    assert model["owned_by"] == "vllm"
    assert model["max_model_len"] == 2048
    assert model["root"] == MODEL  # (not where its weights lie on the upstream's host)

    one = await http.get(gateway.url + "/v1/models/" + MODEL)
    assert jsonutil.loads(await treq.content(one))["id"] == MODEL
    missing = await http.get(gateway.url + "/v1/models/vllm/nope")
    assert missing.code == 404
    assert error_of(await treq.content(missing))["code"] == "model_not_found"


@pytest_twisted.ensureDeferred
async def test_every_other_field_reaches_vllm_untouched(http, gateway, fake):
    body = {
        "model": MODEL, "messages": [{"role": "user", "content": "hi", "name": "u1"}],
        "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
        "chat_template_kwargs": {"enable_thinking": False},
        "structured_outputs": {"json": {"type": "object"}}, "priority": -3,
        "logprobs": True, "top_logprobs": 2, "n": 2, "seed": 12345678901234567,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "temperature": 0.0, "max_tokens": 7, "stop": ["\n"], "cache_salt": "s",
        "vllm_xargs": {"a": 1}, "huge": 123456789012345678901234567890, "unicode": "é€😀",
    }
    response, content = await post(http, gateway, body)
    assert response.code == 200, content
    [seen] = fake.requests[-1:]
    assert seen.path == b"/v1/chat/completions"
    expected = dict(body, model="meta-llama/Llama-3.1-8B-Instruct")
    assert seen.body == expected
    assert "stream_options" not in seen.body


@pytest_twisted.ensureDeferred
async def test_non_streaming_answer_is_relayed_byte_for_byte(http, gateway, fake):
    response, content = await post(http, gateway, {"model": MODEL, "messages": []})
    assert response.code == 200
    direct = await treq.post(fake.base_url + "/chat/completions",
                             data=json.dumps({"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": []}).encode())
    assert content == await treq.content(direct)
    payload = jsonutil.loads(content)
    for extra in ("prompt_logprobs", "kv_transfer_params", "prompt_token_ids"):
        assert extra in payload
    assert "stop_reason" in payload["choices"][0]
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert response.length == len(content)  # sent with Content-Length, not chunked
    assert response.headers.getRawHeaders("server") == ["gomodel"]  # ours, not the upstream's
    [date] = response.headers.getRawHeaders("date")
    assert abs(parsedate_to_datetime(date).timestamp() - time.time()) < 5


@pytest_twisted.ensureDeferred
async def test_request_id_taken_echoed_and_sent_upstream(http, gateway, fake):
    response, _ = await post(http, gateway, {"model": MODEL, "messages": []}, {"x-request-id": "abc-123"})
    assert response.headers.getRawHeaders("x-request-id") == ["abc-123"]
    assert fake.last_request().header(b"x-request-id") == "abc-123"
    response, _ = await post(http, gateway, {"model": MODEL, "messages": []})
    [generated] = response.headers.getRawHeaders("x-request-id")
    assert len(generated) == 32
    assert fake.last_request().header(b"x-request-id") == generated


@pytest_twisted.ensureDeferred
async def test_client_credentials_never_go_upstream(reactor, http):
    fake = await start_fake(reactor, api_key="upstream-secret")
    gw = await start_gateway(reactor, {"VLLM_TEST_BASE_URL": fake.base_url, "VLLM_TEST_API_KEY": "upstream-secret",
                                       "GOMODEL_MASTER_KEY": "gateway-key"})
    try:
        response, content = await post(
            http, gw, {"model": "vllm-test/meta-llama/Llama-3.1-8B-Instruct", "messages": []},
            {"authorization": "Bearer gateway-key", "x-api-key": "client-x", "cookie": "session=1"})
        assert response.code == 200, content
        seen = fake.last_request()
        assert seen.header(b"authorization") == "Bearer upstream-secret"
        assert seen.header(b"x-api-key") is None
        assert seen.header(b"cookie") is None
        assert b"gateway-key" not in b"".join(b"".join(v) for _, v in seen.headers.getAllRawHeaders())
    finally:
        await gw.service.stopService()
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_master_key_guards_everything_but_health(reactor, http, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        health = await http.get(gw.url + "/health")
        assert health.code == 200
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic azE="},
                        {"x-api-key": "wrong"}, {"authorization": "Bearer wrong", "x-api-key": "k1"}):
            response = await http.get(gw.url + "/v1/models", headers=headers)
            assert response.code == 401
            assert error_of(await treq.content(response))["type"] == "authentication_error"
        # A HEAD (Claude Code's first request) gets the refusal's headers, no body.
        head = await http.head(gw.url + "/")
        assert head.code == 401 and await treq.content(head) == b""
        assert head.headers.getRawHeaders(b"content-type") == [b"application/json"]
        # Bearer, or x-api-key as Anthropic-style clients send it.
        for headers in ({"authorization": "Bearer k1"}, {"x-api-key": "k1"}):
            ok = await http.get(gw.url + "/v1/models", headers=headers)
            assert ok.code == 200
            await treq.content(ok)
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_bad_requests_get_openai_errors(http, gateway, fake):
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        # a lone surrogate, beside an integer past 64 bits (the standard library's parser reads those)
        (b'{"model": "vllm/m", "seed": 123456789012345678901234, "messages": [{"role": "user", "content": "\\ud800"}]}',
         400, "invalid_json"),
        (json.dumps({"messages": []}).encode(), 400, "missing_required_parameter"),
        (json.dumps({"model": "  "}).encode(), 400, "missing_required_parameter"),
        (json.dumps({"model": 5}).encode(), 400, "invalid_type"),
        (json.dumps({"model": ["vllm/m"]}).encode(), 400, "invalid_type"),
        (json.dumps({"model": None}).encode(), 400, "missing_required_parameter"),
        (json.dumps({"model": "vllm/unknown-model"}).encode(), 404, "model_not_found"),
        (json.dumps({"model": "nobody/serves-this"}).encode(), 404, "model_not_found"),
    ]
    for data, status, code in cases:
        response, content = await post(http, gateway, data)
        assert response.code == status, (data, content)
        assert error_of(content)["code"] == code
        assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert not fake.forwarded()  # none of them went upstream
    response, content = await post(http, gateway, {"model": "vllm/" + "x" * 10000, "messages": []})
    message = error_of(content)["message"]
    assert response.code == 404 and "x" * 251 + "…'" in message and len(message) < 400  # quoted, not echoed whole

    response = await http.get(gateway.url + "/v1/nothing/here")
    assert response.code == 404
    assert "GET /v1/nothing/here" in error_of(await treq.content(response))["message"]
    response = await http.get(gateway.url + "/v1/chat/completions")
    assert response.code == 405
    assert response.headers.getRawHeaders("allow") == ["POST"]
    error_of(await treq.content(response))
    for path in ("/v1/files", "/v1/files/", "/v1/batches", "/admin/api/v1/auth-keys"):  # a route group's collection
        response = await http.put(gateway.url + path, data=b"{}")
        assert response.code == 405, path
        assert error_of(await treq.content(response))["code"] == "method_not_allowed"


@pytest_twisted.ensureDeferred
async def test_a_compressed_body_is_a_415_that_says_so(http, gateway, fake):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    for path in ("/v1/chat/completions", "/v1/embeddings", "/v1/responses"):
        for encoding in ("gzip", "br", "identity, deflate"):
            response, content = await post(http, gateway, gzip.compress(body), {"content-encoding": encoding},
                                           path=path)
            error = error_of(content)
            assert response.code == 415 and error["code"] == "unsupported_content_encoding", (path, encoding)
            assert f"'{encoding}'" in error["message"]
    response, content = await post(http, gateway, b"\x1f\x8b", {"content-encoding": "gzip, " + "x" * 100})
    assert response.code == 415 and "'gzip, " + "x" * 58 + "…'" in error_of(content)["message"]  # quoted, not whole
    response, content = await post(http, gateway, b"{not json", {"content-encoding": "identity"})
    assert response.code == 400 and error_of(content)["code"] == "invalid_json"  # not compressed: JSON's error
    response, content = await post(http, gateway, body, {"content-encoding": "identity"})
    assert response.code == 200
    response, content = await post(http, gateway, gzip.compress(body), {"content-encoding": "gzip",
                                                                        "anthropic-version": "2023-06-01"},
                                   path="/v1/messages")
    assert response.code == 415
    assert jsonutil.loads(content)["type"] == "error"  # in Anthropic's envelope
    assert len(fake.forwarded()) == 1


@pytest_twisted.ensureDeferred
async def test_a_model_that_is_no_text_is_invalid_type_on_every_route(http, gateway, fake):
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/score",
                 "/v1/classify", "/v1/responses", "/v1/messages"):
        for model, shown in ((7, "a number"), (True, "a boolean"), (["x"], "an array"), ({"id": MODEL}, "an object")):
            response, content = await post(http, gateway, {"model": model, "input": "hi"}, path=path)
            assert response.code == 400, (path, model)
            payload = jsonutil.loads(content)
            error = payload["error"]
            if path == "/v1/messages":
                assert payload["type"] == "error" and error["type"] == "invalid_request_error"
            else:
                assert error_of(content)["code"] == "invalid_type" and error["param"] == "model"
            assert error["message"].startswith(f"'model' must be a string (e.g. '{MODEL}'), not {shown}"), error
    assert not fake.forwarded()


@pytest_twisted.ensureDeferred
async def test_body_over_the_limit_is_413(reactor, http, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "BODY_SIZE_LIMIT": "2KB"})
    try:
        big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
        response, content = await post(http, gw, big)
        assert response.code == 413
        assert error_of(content)["code"] == "request_too_large"
        assert not fake.forwarded()
        small, _ = await post(http, gw, {"model": MODEL, "messages": []})
        assert small.code == 200
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_upstream_errors_keep_status_and_get_the_envelope(http, gateway, fake):
    vllm_400 = {"error": {"message": "max_tokens=5000 cannot be greater than max_model_len=2048.",
                          "type": "BadRequestError", "param": "max_tokens", "code": 400}}
    cases = [
        (400, json.dumps(vllm_400), vllm_400["error"]),
        (403, '{"error":"Forbidden"}', {"type": "permission_error"}),
        (422, '{"detail":[{"loc":["body","x"],"msg":"bad"}]}', {"type": "invalid_request_error"}),
        (400, '{"object":"error","message":"old flat","type":"BadRequestError","param":null,"code":400}',
         {"message": "old flat", "type": "BadRequestError"}),
        (500, "<html>Internal Server Error at http://127.0.0.1</html>", {"type": "provider_error"}),
        (503, "", {"type": "provider_error"}),
        # FastAPI's own 404 (vLLM has the route only for a model whose task it is): said so (before: "Not Found")
        (404, '{"detail":"Not Found"}', {"type": "not_found_error"}),
    ]
    for status, raw, expected in cases:
        response, content = await post(http, gateway, {"model": MODEL, "fake_status": status, "fake_body": raw})
        assert response.code == status
        error = error_of(content)
        for key, value in expected.items():
            assert error[key] == value, (status, error)
        assert "127.0.0.1" not in content.decode()
        assert fake.root_url not in content.decode()
        if status == 404:
            assert "does not serve this endpoint" in error["message"], error
    response, content = await post(http, gateway, {"model": MODEL, "fake_status": 400, "fake_body": json.dumps(vllm_400)})
    assert content == json.dumps(vllm_400).encode()  # OpenAI-shaped: passed through as is


@pytest_twisted.ensureDeferred
async def test_a_stream_flag_that_is_no_boolean_is_refused_before_the_upstream(http, gateway, fake):
    before = len(fake.forwarded())
    for path, body in (("/v1/chat/completions", {"model": MODEL, "messages": []}),
                       ("/v1/completions", {"model": MODEL, "prompt": "a"}),
                       ("/v1/responses", {"model": MODEL, "input": "a"})):
        for flag in (1, "yes", 0, "false", []):
            response, content = await post(http, gateway, dict(body, stream=flag), path=path)
            assert response.code == 400, (path, flag)
            assert error_of(content) == {"message": "'stream' must be a boolean (true or false).",
                                         "type": "invalid_request_error", "param": "stream", "code": "invalid_type"}
        for flag in (None, False):
            response, _ = await post(http, gateway, dict(body, stream=flag), path=path)
            assert response.code == 200, (path, flag)
    assert len(fake.forwarded()) == before + 6


@pytest_twisted.ensureDeferred
async def test_stream_options_that_are_no_object_or_an_include_usage_no_boolean_are_refused(http, gateway, fake):
    """vLLM reads include_usage 1 or "yes" as true and sends the usage chunk, which the gateway, forcing it on,
    then dropped as unasked (before): such a value is a 400, as OpenAI answers it (and as 'stream' is)."""
    before = len(fake.forwarded())
    for path, body in (("/v1/chat/completions", {"model": MODEL, "messages": [], "stream": True}),
                       ("/v1/completions", {"model": MODEL, "prompt": "a", "stream": True})):
        for options, param in (("x", "stream_options"), ([], "stream_options"), (7, "stream_options"),
                               ({"include_usage": "yes"}, "stream_options.include_usage"),
                               ({"include_usage": 1}, "stream_options.include_usage")):
            response, content = await post(http, gateway, dict(body, stream_options=options), path=path)
            assert response.code == 400, (path, options)
            error = error_of(content)
            assert (error["param"], error["code"], error["type"]) == (param, "invalid_type", "invalid_request_error")
        for options in (None, {}, {"include_usage": None}, {"include_usage": False}):
            response, content = await post(http, gateway, dict(body, stream_options=options), path=path)
            assert response.code == 200 and b'"usage"' not in content, (path, options)
        response, content = await post(http, gateway, dict(body, stream_options={"include_usage": True}), path=path)
        assert response.code == 200 and content.count(b'"usage"') == 1
    assert len(fake.forwarded()) == before + 10


@pytest_twisted.ensureDeferred
async def test_upstream_errors_never_show_its_host_and_port_in_any_field(http, gateway, fake):
    netloc = fake.base_url.split("/")[2]  # 127.0.0.1:port
    port = netloc.rpartition(":")[2]
    bodies = [
        {"error": {"message": f"cannot reach {netloc} now", "type": "BadRequestError", "param": None, "code": 400}},
        {"error": {"message": "bad", "type": f"Error at {netloc}", "param": f"{netloc}/x", "code": f"c {netloc}"}},
        {"object": "error", "message": f"flat {netloc}", "type": netloc, "param": netloc, "code": netloc},
    ]
    for body in bodies:
        response, content = await post(http, gateway, {"model": MODEL, "fake_status": 400,
                                                       "fake_body": json.dumps(body)})
        assert response.code == 400
        assert "127.0.0.1" not in content.decode() and port not in content.decode(), content
        assert error_of(content)["message"].startswith(("cannot reach vllm now", "bad", "flat vllm"))


@pytest_twisted.ensureDeferred
async def test_upstream_never_up_is_503_no_ready_replica_without_its_address(reactor, http):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": await dead_base_url(reactor),
                                       "VLLM_MODELS": "meta-llama/Llama-3.1-8B-Instruct"})
    try:
        response, content = await post(http, gw, {"model": MODEL, "messages": []})
        assert response.code == 503 and response.headers.getRawHeaders("retry-after") == ["5"]
        error = error_of(content)
        assert error["code"] == "no_ready_replica"
        assert "127.0.0.1" not in content.decode()
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_upstream_gone_after_start_is_502_without_its_address(reactor, http):
    from tests.fakes.fleet import FakeReplica

    replica = await FakeReplica(reactor).start()
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": replica.base_url})
    try:
        await replica.refuse()
        response, content = await post(http, gw, {"model": MODEL, "messages": []})
        assert response.code == 502
        error = error_of(content)
        assert error["code"] == "upstream_unreachable"
        assert "127.0.0.1" not in content.decode()
    finally:
        await gw.service.stopService()
        await replica.stop()


@pytest_twisted.ensureDeferred
async def test_upstream_timeout_is_504(reactor, http, fake):
    # The timeout runs on a Clock moved past it once the upstream has the request: no wall-clock race (a short
    # real timeout also bounds the replica's model listing, which a loaded machine could take longer than).
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "HTTP_RESPONSE_HEADER_TIMEOUT": "30s",
                                       "REPLICA_HEALTH_INTERVAL": "1h"})
    try:
        clock = Clock()
        for pool in gw.registry.providers:
            for replica in pool.replicas:
                replica.server._clock = clock
        arrived = fake.next_request()
        answer = Deferred.fromCoroutine(post(http, gw, {"model": MODEL, "messages": [], "fake_hang": True}))
        await arrived
        clock.advance(30)
        response, content = await answer
        assert response.code == 504
        assert error_of(content)["code"] == "upstream_timeout"
        how, _ = await fake.last_request().closed
        assert how == "lost"
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_ambiguous_bare_model_names_the_choices(reactor, http):
    a = await start_fake(reactor)
    b = await start_fake(reactor, models=("meta-llama/Llama-3.1-8B-Instruct", "only-b"))
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": a.base_url, "VLLM_B_BASE_URL": b.base_url})
    try:
        response, content = await post(http, gw, {"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": []})
        assert response.code == 400
        error = error_of(content)
        assert error["code"] == "ambiguous_model"
        assert "vllm/meta-llama/Llama-3.1-8B-Instruct" in error["message"]
        assert "vllm-b/meta-llama/Llama-3.1-8B-Instruct" in error["message"]
        response, content = await post(http, gw, {"model": "only-b", "messages": []})
        assert response.code == 200
        assert b.last_request().body["model"] == "only-b"
        response, content = await post(http, gw, {"model": "vllm-b/meta-llama/Llama-3.1-8B-Instruct", "messages": []})
        assert response.code == 200
        assert b.last_request().path == b"/v1/chat/completions"
    finally:
        await gw.service.stopService()
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_a_model_is_retrieved_by_each_name_a_chat_request_may_give_it(reactor, http, fake):
    """GET /v1/models/{id} finds what a chat request's 'model' finds (the bare id, the provider type's prefix),
    for a key that may use it; a key that may not gets the 404 of a model it is not shown."""
    gw = await start_gateway(reactor, {"VLLM_TEST_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "master-k"})
    master = {"authorization": "Bearer master-k"}
    listed = "vllm-test/meta-llama/Llama-3.1-8B-Instruct"
    try:
        keys = {}
        for name, models in (("provider", ["vllm-test/"]), ("bare", ["meta-llama/Llama-3.1-8B-Instruct"]),
                             ("other", ["openai/"])):
            response = await http.post(gw.url + "/admin/api/v1/auth-keys", headers=master,
                                       data=json.dumps({"name": name, "models": models}).encode())
            keys[name] = {"authorization": "Bearer " + jsonutil.loads(await treq.content(response))["value"]}
        for model in (listed, "vllm/meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"):
            for headers in (master, keys["provider"], keys["bare"]):
                response, content = await post(http, gw, {"model": model, "messages": []}, headers)
                assert response.code == 200, (model, content)
                one = await http.get(gw.url + "/v1/models/" + model, headers=headers)
                assert one.code == 200, model
                assert jsonutil.loads(await treq.content(one))["id"] == listed
            response, content = await post(http, gw, {"model": model, "messages": []}, keys["other"])
            assert response.code == 403 and error_of(content)["code"] == "model_access_denied"
            hidden = await http.get(gw.url + "/v1/models/" + model, headers=keys["other"])
            assert hidden.code == 404 and error_of(await treq.content(hidden))["code"] == "model_not_found"
        one = await http.get(gw.url + "/v1/models/meta-llama/Llama-3.1-8B-Instruct",
                             headers={**keys["bare"], "anthropic-version": "2023-06-01"})
        assert jsonutil.loads(await treq.content(one))["id"] == listed
        for missing in ("meta-llama/nope", "vllm/nope", "nope"):
            response = await http.get(gw.url + "/v1/models/" + missing, headers=master)
            assert response.code == 404 and error_of(await treq.content(response))["code"] == "model_not_found"
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_bare_id_several_providers_serve_names_to_a_key_only_the_providers_it_may_use(reactor, http):
    """Chat and GET /v1/models/{id} answer an ambiguous bare id alike: the master key gets the choices; a key
    that may use one of the providers gets that one; a key that may use several is told of those only; a key
    that may use none is refused (chat) or not shown it (retrieve), never told who serves it."""
    fakes = [await start_fake(reactor) for _ in range(3)]
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fakes[0].base_url, "VLLM_B_BASE_URL": fakes[1].base_url,
                                       "VLLM_C_BASE_URL": fakes[2].base_url, "GOMODEL_MASTER_KEY": "master-k"})
    master = {"authorization": "Bearer master-k"}
    try:
        response = await http.get(gw.url + "/v1/models/" + BARE, headers=master)
        assert response.code == 400 and error_of(await treq.content(response))["code"] == "ambiguous_model"
        response, content = await post(http, gw, {"model": BARE, "messages": []}, master)
        assert response.code == 400 and error_of(content)["code"] == "ambiguous_model"
        assert all(f"{p}/{BARE}" in error_of(content)["message"] for p in ("vllm", "vllm-b", "vllm-c"))
        keys = {}
        for name, models in (("one", ["vllm-b/"]), ("two", ["vllm/", "vllm-c/"]), ("none", ["openai/"]),
                             ("bare", [BARE])):
            response = await http.post(gw.url + "/admin/api/v1/auth-keys", headers=master,
                                       data=json.dumps({"name": name, "models": models}).encode())
            keys[name] = {"authorization": "Bearer " + jsonutil.loads(await treq.content(response))["value"]}

        response, content = await post(http, gw, {"model": BARE, "messages": []}, keys["one"])
        chats = [r for fake in fakes for r in fake.requests if r.path == b"/v1/chat/completions"]
        assert response.code == 200 and chats == [fakes[1].last_request()] and chats[0].body["model"] == BARE
        response = await http.get(gw.url + "/v1/models/" + BARE, headers=keys["one"])
        assert response.code == 200 and jsonutil.loads(await treq.content(response))["id"] == "vllm-b/" + BARE

        for ask in (lambda: post(http, gw, {"model": BARE, "messages": []}, keys["two"]),
                    lambda: post(http, gw, {"model": BARE, "input": "hi"}, keys["two"], path="/v1/responses")):
            response, content = await ask()
            error = error_of(content)
            assert response.code == 400 and error["code"] == "ambiguous_model", content
            assert f"vllm/{BARE}" in error["message"] and f"vllm-c/{BARE}" in error["message"]
            assert b"vllm-b" not in content

        response, content = await post(http, gw, {"model": BARE, "messages": []}, keys["none"])
        assert response.code == 403 and error_of(content)["code"] == "model_access_denied"
        assert b"vllm" not in content
        response = await http.get(gw.url + "/v1/models/" + BARE, headers=keys["none"])
        content = await treq.content(response)
        assert response.code == 404 and error_of(content)["code"] == "model_not_found" and b"vllm" not in content

        response, content = await post(http, gw, {"model": BARE, "messages": []}, keys["bare"])  # may use all three
        assert response.code == 400 and all(f"{p}/{BARE}" in error_of(content)["message"]
                                            for p in ("vllm", "vllm-b", "vllm-c"))
        assert [r for fake in fakes for r in fake.requests if r.path.startswith(b"/v1/c")] == chats  # no other went up
    finally:
        await gw.service.stopService()
        for fake in fakes:
            await fake.stop()


@pytest_twisted.ensureDeferred
async def test_a_key_reaches_a_model_by_its_provider_type_at_the_instance_it_may_use(reactor, http):
    """C{vllm/X}, served by instances C{vllm} and C{vllm-b}, reaches vllm-b's X for a key that may use only
    C{vllm-b/} (before: 403, as the type's first instance took it); and a bare id narrowed to the one provider
    a key may use keeps its failover rules (before: none were tried)."""
    fakes = [await start_fake(reactor), await start_fake(reactor), await start_fake(reactor, models=("other-model",))]
    gw = await start_gateway(reactor, {
        "VLLM_BASE_URL": fakes[0].base_url, "VLLM_B_BASE_URL": fakes[1].base_url,
        "VLLM_C_BASE_URL": fakes[2].base_url, "GOMODEL_MASTER_KEY": "master-k", "REPLICA_FAILURE_THRESHOLD": "100",
        "FAILOVER_RULES_JSON": json.dumps({BARE: ["vllm-c/other-model"]})})
    master = {"authorization": "Bearer master-k"}
    try:
        response = await http.post(gw.url + "/admin/api/v1/auth-keys", headers=master,
                                   data=json.dumps({"name": "b", "models": ["vllm-b/", "vllm-c/"]}).encode())
        key = {"authorization": "Bearer " + jsonutil.loads(await treq.content(response))["value"]}
        for path, body in (("/v1/chat/completions", {"messages": []}), ("/v1/responses", {"input": "hi"})):
            response, content = await post(http, gw, dict(body, model="vllm/" + BARE), key, path=path)
            assert response.code == 200, content
            assert fakes[1].last_request().path == path.encode() and fakes[1].last_request().body["model"] == BARE
        response = await http.get(gw.url + "/v1/models/vllm/" + BARE, headers=key)
        assert response.code == 200 and jsonutil.loads(await treq.content(response))["id"] == "vllm-b/" + BARE
        response, content = await post(http, gw, {"model": "vllm/" + BARE, "messages": []}, master)
        assert response.code == 200 and fakes[0].last_request().path == b"/v1/chat/completions"  # (the first)

        fakes[1].steer = {"fake_status": 503}
        response, content = await post(http, gw, {"model": BARE, "messages": []}, key)
        assert response.code == 200, content
        assert fakes[2].last_request().body["model"] == "other-model"
        assert not [r for r in fakes[0].requests if r.path == b"/v1/chat/completions"][1:]
    finally:
        await stop_all(gw, *fakes)


@pytest_twisted.ensureDeferred
async def test_an_upstreams_401_is_a_502_upstream_auth_failed_without_its_words(http, gateway, fake):
    """The upstream refused the gateway's provider key: the gateway's fault, not the client's (whose SDK would drop
    its key on a 401). A 502 C{upstream_auth_failed}; the upstream's text (its key, its host) is not shown."""
    host = fake.root_url.split("//")[1]
    refusal = json.dumps({"error": {"message": f"Incorrect API key provided: sk-abc at {host}",
                                    "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})
    for raw in (refusal, '{"error":"Unauthorized"}', "", "<html>401</html>"):
        for path, body in (("/v1/chat/completions", {"model": MODEL, "messages": []}),
                           ("/v1/responses", {"model": MODEL, "input": "a"}),
                           ("/v1/embeddings", {"model": MODEL, "input": "a"})):
            response, content = await post(http, gateway, dict(body, fake_status=401, fake_body=raw), path=path)
            assert response.code == 502, (path, raw, content)
            error = error_of(content)
            assert error["code"] == "upstream_auth_failed" and error["type"] == "provider_error", error
            assert "sk-abc" not in content.decode() and host not in content.decode()
            assert "'vllm'" in error["message"]
            assert response.headers.getRawHeaders("x-should-retry") == ["false"]  # (the same key again: no use)
