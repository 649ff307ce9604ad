"""/p/{provider}/{endpoint}: provider-native requests to the named instance, relayed raw."""

import json
from functools import partial
from urllib.parse import unquote

import pytest_twisted
import treq

from gomodel import jsonutil
from tests.rawclient import connect
from tests.support import (dead_base_url, in_thread, settled, start_fake, start_gateway, stop_all, track_connections,
                           with_timeout, write_buffer)


@pytest_twisted.async_yield_fixture()
async def two(reactor):
    """vllm (keyless) and vllm-test (key-guarded) behind one gateway with a master key."""
    plain = await start_fake(reactor)
    guarded = await start_fake(reactor, api_key="vllm-secret")
    gw = await start_gateway(reactor, {
        "VLLM_BASE_URL": plain.base_url, "VLLM_TEST_BASE_URL": guarded.base_url,
        "VLLM_TEST_API_KEY": "vllm-secret", "GOMODEL_MASTER_KEY": "gw-key",
        "PASSTHROUGH_ALLOWED_ADMIN_ROUTES": "reset_prefix_cache"})
    yield gw, plain, guarded
    await gw.service.stopService()
    await plain.stop()
    await guarded.stop()


AUTH = {"authorization": "Bearer gw-key"}
CLOSE = {"connection": "close"}


async def call(http, gw, method, path, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    response = await http.request(method, gw.url + path, data=data, headers={**AUTH, **(headers or {})})
    return response, await treq.content(response)


@pytest_twisted.ensureDeferred
async def test_root_routes_reach_the_named_instance(http, two):
    gw, plain, guarded = two
    response, content = await call(http, gw, "POST", "/p/vllm/tokenize",
                                   {"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": "Hello"})
    assert response.code == 200 and jsonutil.loads(content)["count"] == 3
    assert plain.last_request().path == b"/tokenize"  # the server root, though the base URL ends in /v1

    response, content = await call(http, gw, "POST", "/p/vllm-test/detokenize?x=1&y=%2F", {"tokens": [1, 2]},
                                   {"x-api-key": "client-key", "cookie": "c=1", "x-custom": "kept"})
    assert response.code == 200
    seen = guarded.last_request()
    assert seen.uri == b"/detokenize?x=1&y=%2F"
    assert seen.header(b"authorization") == "Bearer vllm-secret"
    assert seen.header(b"x-api-key") is None and seen.header(b"cookie") is None
    assert seen.header(b"x-custom") == "kept"
    assert seen.header(b"x-request-id") == response.headers.getRawHeaders("x-request-id")[0]
    assert plain.last_request().path == b"/tokenize"  # vllm-test's call did not go to vllm


@pytest_twisted.ensureDeferred
async def test_v1_routes_and_the_v1_alias(http, two):
    gw, plain, guarded = two
    body = {"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": "hi", "stream": True}
    for path in ("/p/vllm-test/completions", "/p/vllm-test/v1/completions"):
        response, content = await call(http, gw, "POST", path, body)
        assert response.code == 200
        assert guarded.last_request().path == b"/v1/completions"
        assert content.endswith(b"data: [DONE]\n\n")
        assert "stream_options" not in guarded.last_request().body  # passthrough is raw: nothing forced
    response, content = await call(http, gw, "GET", "/p/vllm/version")
    assert jsonutil.loads(content) == {"version": "0.32.0"}
    response, content = await call(http, gw, "GET", "/p/vllm/metrics")
    assert response.headers.getRawHeaders("content-type") == ["text/plain; version=0.0.4"]
    assert b"vllm:num_requests_running" in content


@pytest_twisted.ensureDeferred
async def test_upstream_errors_are_relayed_as_the_provider_sent_them(http, two):
    gw, plain, guarded = two
    response, content = await call(http, gw, "GET", "/p/vllm/nothing-here")
    assert response.code == 404 and content == b'{"detail":"Not Found"}'
    response, content = await call(http, gw, "POST", "/p/vllm/v1/completions",
                                   {"model": "x", "fake_status": 400, "fake_body": '{"error":{"message":"m"}}'})
    assert response.code == 400 and content == b'{"error":{"message":"m"}}'


@pytest_twisted.ensureDeferred
async def test_admin_routes_are_refused_unless_allowed(http, two):
    gw, plain, guarded = two
    before = len(plain.forwarded())
    for path in ("/p/vllm/sleep", "/p/vllm/%73leep", "/p/vllm/v1/load_lora_adapter", "/p/vllm/collective_rpc/",
                 "/p/vllm/SLEEP", "/p/vllm/scale_elastic_ep", "/p/vllm/inference/v1/abort_requests"):
        response, content = await call(http, gw, "POST", path, {})
        assert response.code == 403, path
        assert jsonutil.loads(content)["error"]["type"] == "permission_error"
    for path in ("/p/vllm/v1/../sleep", "/p/vllm/v1%2F..%2Fsleep", "/p/vllm/x%2F..%2F..%2Fadmin", "/p/vllm/%2E%2E/sleep"):
        response, content = await call(http, gw, "POST", path, {})  # decoded or not, no way out of the endpoint
        assert response.code == 400 and jsonutil.loads(content)["error"]["code"] == "invalid_endpoint", path
    response, content = await call(http, gw, "POST", "/p/vllm//collective_rpc", {})
    assert response.code == 404  # an empty first segment matches no route
    assert len(plain.forwarded()) == before
    response, content = await call(http, gw, "POST", "/p/vllm/reset_prefix_cache", {})
    assert response.code == 200 and plain.last_request().path == b"/reset_prefix_cache"


@pytest_twisted.ensureDeferred
async def test_vllms_structured_decisions_are_reached_under_v1(http, two):
    """vLLM 0.32 serves its structured decisions at C{/v1/systemone} alone (none at its root): the passthrough
    sent C{/p/vllm/v1/systemone} to the root, a 404 from vLLM, so the route could not be reached at all."""
    gw, plain, _ = two
    body = {"model": "meta-llama/Llama-3.1-8B-Instruct", "state": "The sky is blue.",
            "questions": {"q1": {"type": "choice", "instructions": "Which colour?", "criteria": ["blue", "red"]}}}
    for path in ("/p/vllm/v1/systemone", "/p/vllm/systemone"):
        response, content = await call(http, gw, "POST", path, body)
        assert response.code == 200 and jsonutil.loads(content)["object"] == "structured_decision", content
        assert plain.last_request().path == b"/v1/systemone"


@pytest_twisted.ensureDeferred
async def test_vllm_032s_operational_routes_are_refused_unless_allowed(http, two):
    """vLLM 0.32's routes that stop, drain or change the server for everyone (served with --enable-scale-out,
    --enable-fault-tolerance or VLLM_SERVER_DEV_MODE) are refused as its older ones are: before, any key reached
    them, so a tenant could abort others' requests by id, free the KV cache under them, or start a weight update."""
    gw, plain, guarded = two
    before = len(plain.forwarded())
    for path in ("/p/vllm/abort_requests", "/p/vllm/release_kv_cache_memory", "/p/vllm/fault_tolerance/apply",
                 "/p/vllm/init_weight_transfer_engine",
                 "/p/vllm/shutdown_weight_transfer_engine", "/p/vllm/start_weight_update",
                 "/p/vllm/start_draft_weight_update", "/p/vllm/finish_weight_update", "/p/vllm/update_weight_version",
                 "/p/vllm/weight_checker", "/p/vllm/v1/Abort_Requests"):
        response, content = await call(http, gw, "POST", path, {})
        assert response.code == 403, path
        assert jsonutil.loads(content)["error"]["type"] == "permission_error"
    assert len(plain.forwarded()) == before


@pytest_twisted.ensureDeferred
async def test_vllms_kv_event_sources_are_the_master_keys_alone(http, two):
    """vLLM 0.32's C{/kv_event_sources} (served by default) names where its KV-cache events are published: the
    block hashes of every tenant's prompts. A managed key read it through /p/; only the master key does now."""
    gw, plain, _ = two
    response, content = await call(http, gw, "POST", "/admin/api/v1/auth-keys", {"name": "tenant"})
    key = {"authorization": "Bearer " + jsonutil.loads(content)["value"]}
    before = len(plain.forwarded())
    for path in ("/p/vllm/kv_event_sources", "/p/vllm/v1/kv_event_sources", "/p/vllm/weight_info"):
        response, content = await call(http, gw, "GET", path, headers=key)
        assert response.code == 403 and jsonutil.loads(content)["error"]["type"] == "permission_error", content
    assert len(plain.forwarded()) == before
    response, content = await call(http, gw, "GET", "/p/vllm/kv_event_sources")
    assert response.code == 200 and jsonutil.loads(content)["0"]["publisher"] == "zmq"


@pytest_twisted.ensureDeferred
async def test_passthrough_refusals(reactor, http, two):
    gw, plain, guarded = two
    response, content = await call(http, gw, "GET", "/p/nobody/version")
    assert response.code == 404
    response, content = await call(http, gw, "GET", "/p/vllm")
    assert response.code == 400
    response = await http.get(gw.url + "/p/vllm/version")
    assert response.code == 401  # the gateway key is still needed
    await treq.content(response)

    off = await start_gateway(reactor, {"VLLM_BASE_URL": plain.base_url, "ENABLE_PASSTHROUGH_ROUTES": "false"})
    only_openai = await start_gateway(reactor, {"VLLM_BASE_URL": plain.base_url,
                                                "ENABLED_PASSTHROUGH_PROVIDERS": "openai"})
    try:
        response = await http.get(off.url + "/p/vllm/version")
        assert response.code == 404
        await treq.content(response)
        response = await http.get(only_openai.url + "/p/vllm/version")
        assert response.code == 403
        await treq.content(response)
    finally:
        await off.service.stopService()
        await only_openai.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_path_or_host_that_is_no_utf8_is_a_400_envelope_on_every_klein_route(reactor, two):
    # Klein answered such a request with a text/html 400 and logged a traceback of the client's bytes.
    gw, plain, guarded = two
    for target, host in ((b"/p/vllm/%ff%fe", b"x"), (b"/v1/files/%C0", b"x"), (b"/v1/files", b"\xff")):
        client = await connect(reactor, gw.port, b"GET " + target + b" HTTP/1.1\r\nHost: " + host
                               + b"\r\nAuthorization: Bearer gw-key\r\nConnection: close\r\n\r\n")
        await with_timeout(reactor, client.lost, 10)
        head, _, body = bytes(client.received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ") and b"Content-Type: application/json" in head
        assert jsonutil.loads(body)["error"]["code"] == "invalid_url"
    assert plain.forwarded() == []


@pytest_twisted.ensureDeferred
async def test_passthrough_to_a_provider_never_up_is_a_503_envelope(reactor, http):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": await dead_base_url(reactor), "VLLM_MODELS": "m"})
    try:
        response = await http.get(gw.url + "/p/vllm/version")
        content = await treq.content(response)
        assert response.code == 503
        assert jsonutil.loads(content)["error"]["code"] == "no_ready_replica"
        assert b"127.0.0.1" not in content
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_slow_client_on_a_passthrough_stream(reactor, gateway, fake):
    connections = track_connections(gateway)
    body = json.dumps({"model": "meta-llama/Llama-3.1-8B-Instruct", "stream": True,
                       "fake_flood": 64 * 1024 * 1024}).encode()
    request = (b"POST /p/vllm/v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body)) + body
    client = await connect(reactor, gateway.port, request)
    await client.wait_for(b"data: ")
    client.transport.pauseProducing()
    record = fake.last_request()
    written = await settled(reactor, lambda: record.bytes_written)
    assert record.pauses > 0 and written < 32 * 1024 * 1024
    assert write_buffer(connections[0].transport) < 1024 * 1024
    client.transport.abortConnection()
    how, _ = await with_timeout(reactor, record.closed, 2)
    assert how == "lost"


@pytest_twisted.ensureDeferred
async def test_upstream_cookies_and_account_never_reach_the_client(http, two):
    """Nor an OpenAI provider's organization and project, the gateway's account's, shown to every tenant
    (before: relayed), nor Anthropic's organization (its OpenAI-compatible API's, its Messages API's through
    C{/p/}: C{anthropic-organization-id}; before: relayed)."""
    gw, plain, guarded = two
    body = {"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hi"}],
            "fake_headers": {"Set-Cookie": "s=1", "Set-Cookie2": "s=2", "X-Kept": "yes",
                             "OpenAI-Organization": "org-gateway", "OpenAI-Project": "proj_gateway",
                             "Anthropic-Organization-Id": "c1a0b2d3-gateway"}}
    for path in ("/p/vllm/v1/chat/completions", "/v1/chat/completions"):
        response, content = await call(http, gw, "POST", path, dict(body, model="vllm/" + body["model"])
                                       if path.startswith("/v1") else body)
        assert response.code == 200, content
        headers = response.headers
        assert headers.getRawHeaders("x-kept") == ["yes"]
        assert headers.getRawHeaders("set-cookie") is None and headers.getRawHeaders("set-cookie2") is None
        assert headers.getRawHeaders("openai-organization") is None and headers.getRawHeaders("openai-project") is None
        assert headers.getRawHeaders("anthropic-organization-id") is None


@pytest_twisted.ensureDeferred
async def test_headers_the_upstreams_connection_header_names_never_reach_the_client(http, two):
    """A header the upstream's answer names in its C{Connection} is that connection's (RFC 9110 7.6.1), not the
    answer's: it stays upstream, through the passthrough and on the model-routed routes, streamed or not (before,
    relayed: the client's parser took the upstream's connection's own headers as the gateway's)."""
    gw, plain, guarded = two
    upstream = {"Connection": "X-Hop-Secret, Keep-Alive", "X-Hop-Secret": "upstream-internal",
                "Keep-Alive": "timeout=5", "X-Kept": "yes"}
    body = {"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hi"}],
            "fake_headers": upstream}
    for stream in (False, True):
        for path in ("/p/vllm/v1/chat/completions", "/v1/chat/completions"):
            sent = dict(body, stream=stream)
            response, content = await call(http, gw, "POST", path, dict(sent, model="vllm/" + body["model"])
                                           if path.startswith("/v1") else sent)
            assert response.code == 200, content
            headers = response.headers
            assert headers.getRawHeaders("x-kept") == ["yes"], (path, stream)
            assert not headers.hasHeader("x-hop-secret") and not headers.hasHeader("keep-alive"), (path, stream)


@pytest_twisted.ensureDeferred
async def test_a_passthrough_answer_keeps_the_upstreams_content_length(reactor, two):
    """Relayed bytes unchanged keep their length (before: every passthrough answer came back chunked, its
    size unknown to the client until its end)."""
    gw, plain, _ = two
    tokenize = json.dumps({"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": "Hello"}).encode()
    for request in (b"GET /p/vllm/v1/models HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer gw-key\r\n"
                    b"Connection: close\r\n\r\n",
                    b"POST /p/vllm/tokenize HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer gw-key\r\n"
                    b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(tokenize), tokenize)):
        client = await connect(reactor, gw.port, request)
        await with_timeout(reactor, client.lost, 5)
        head, _, body = bytes(client.received).partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        assert lines[0] == b"http/1.1 200 ok" and b"transfer-encoding: chunked" not in lines, head
        assert b"content-length: %d" % len(body) in lines and body.startswith(b"{"), head


@pytest_twisted.ensureDeferred
async def test_vllms_own_metrics_are_the_master_keys_alone(http, two):
    """They show every tenant's load (before: any managed key read them through /p/)."""
    gw, plain, _ = two
    response, content = await call(http, gw, "POST", "/admin/api/v1/auth-keys", {"name": "tenant"})
    key = {"authorization": "Bearer " + jsonutil.loads(content)["value"]}
    # (and its load count, vLLM 0.32's engine layout and fault-tolerance status: before, relayed to any key)
    for path in ("/p/vllm/metrics", "/p/vllm/v1/metrics", "/p/vllm/Metrics", "/p/vllm/server_info", "/p/vllm/load",
                 "/p/vllm/get_world_size", "/p/vllm/fault_tolerance/status"):
        response, content = await call(http, gw, "GET", path, headers=key)
        assert response.code == 403 and jsonutil.loads(content)["error"]["type"] == "permission_error", content
    response, content = await call(http, gw, "POST", "/p/vllm/tokenize", {"model": "meta-llama/Llama-3.1-8B-Instruct",
                                                                          "prompt": "Hello"}, headers=key)
    assert response.code == 200  # the rest of the passthrough stays open to it
    response, content = await call(http, gw, "GET", "/p/vllm/metrics")
    assert response.code == 200 and b"vllm:num_requests_running" in content


@pytest_twisted.ensureDeferred
async def test_a_clients_openai_organization_and_project_never_reach_the_provider(http, two):
    """The provider's key is the gateway's account: a client does not choose which of its organizations or
    projects a request is billed to (before: relayed, so any key with the passthrough picked them)."""
    gw, plain, guarded = two
    body = {"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hi"}]}
    response, content = await call(http, gw, "POST", "/p/vllm/v1/chat/completions", body, headers={
        "OpenAI-Organization": "org-other", "OpenAI-Project": "proj_other", "X-Kept": "yes",
        "Origin": "https://elsewhere.example"})
    assert response.code == 200, content
    sent = plain.last_request()
    assert sent.header(b"x-kept") == "yes"
    assert sent.header(b"openai-organization") is None and sent.header(b"openai-project") is None
    # nor a browser's Origin: vLLM would answer it with its own CORS policy (allow-origin * by default)
    assert sent.header(b"origin") is None


@pytest_twisted.ensureDeferred
async def test_x_gomodel_user_path_is_the_gateways_and_never_reaches_the_provider(http, two):
    """As X-Gomodel-Replica: the gateway's own header (before: relayed, so a gateway behind this one, holding
    its master key as this provider's key, took a client's path as the path to charge)."""
    gw, plain, guarded = two
    body = {"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hi"}]}
    response, content = await call(http, gw, "POST", "/p/vllm/v1/chat/completions", body,
                                   headers={"X-GoModel-User-Path": "/team/other"})
    assert response.code == 200, content
    assert plain.last_request().header(b"x-gomodel-user-path") is None


@pytest_twisted.ensureDeferred
async def test_the_clients_hop_by_hop_headers_and_its_expectation_never_reach_the_provider(reactor, two):
    """Headers of the client's connection (hop-by-hop ones, those its Connection names, even its key header named
    there) stay at the gateway; so does C{Expect: 100-continue}, which the gateway answered itself: it holds the body
    and sends it at once (before, relayed: an upstream or a proxy before it that does not take expectations answers
    417), and so does the client's claim of its own address, in any proxy's header (before, C{X-Real-IP} and
    C{True-Client-IP} were relayed, which a provider's proxy trusts from the gateway). An end-to-end header passes."""
    gw, plain, _ = two
    data = b'{"model":"meta-llama/Llama-3.1-8B-Instruct","prompt":"Hello"}'
    client = await connect(reactor, gw.port, (
        b"POST /p/vllm/tokenize HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer gw-key\r\n"
        b"Connection: keep-alive, X-Hop, x-api-key\r\nX-Hop: named\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
        b"Proxy-Authorization: Basic cHJveHk6c2VjcmV0\r\nProxy-Connection: keep-alive\r\nUpgrade: websocket\r\n"
        b"x-api-key: gw-key\r\nExpect: 100-continue\r\nX-Kept: yes\r\nContent-Type: application/json\r\n"
        b"X-Forwarded-For: 10.0.0.1\r\nForwarded: for=10.0.0.1\r\nX-Real-IP: 10.0.0.1\r\nTrue-Client-IP: 10.0.0.1\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(data), data)))
    await with_timeout(reactor, client.wait_for(b'"tokens"'), 5)
    client.transport.loseConnection()
    sent = plain.last_request()
    assert sent.path == b"/tokenize" and sent.header(b"x-kept") == "yes"
    for name in (b"connection", b"x-hop", b"keep-alive", b"te", b"proxy-authorization", b"proxy-connection",
                 b"upgrade", b"x-api-key", b"expect", b"x-forwarded-for", b"forwarded", b"x-real-ip", b"true-client-ip"):
        assert sent.header(name) is None, name


def _passed(path, body, headers=None):
    data = json.dumps(body).encode()
    extra = b"".join(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in (headers or {}).items())
    return (b"POST %s HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (path, len(data), extra)) + data


def _raw(body: str, chunked=False, kind="text/event-stream") -> str:
    """A C{fake_raw} answer: 200 with C{body}, in one chunk and the last (C{chunked}) or ending with the connection."""
    if chunked:
        return (f"HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nTransfer-Encoding: chunked\r\n\r\n"
                f"{len(body):x}\r\n{body}\r\n0\r\n\r\n")
    return f"HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nConnection: close\r\n\r\n{body}"


WHOLE = "data: " + json.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": "h"}}]}) + "\n\n"
CUT = 'data: {"id":"c","choices":[{"index":0,"delta":{"content":"h'


@pytest_twisted.ensureDeferred
async def test_a_passthrough_stream_that_ends_inside_an_event_is_broken_never_finished(reactor, gateway):
    """An SSE client drops an event cut off at the end without a word: before, a passthrough stream whose body
    ended inside one (its upstream's body ended cleanly there, or with its connection, as a body without a length
    or chunks does) was relayed to a clean end, its outcome ok."""
    for chunked in (True, False):
        client = await connect(reactor, gateway.port, _passed(b"/p/vllm/v1/chat/completions", {
            "model": "meta-llama/Llama-3.1-8B-Instruct", "stream": True, "fake_raw": _raw(WHOLE + CUT, chunked)}))
        await with_timeout(reactor, client.lost, 5)
        received = bytes(client.received)
        assert received.rstrip(b"\r\n").endswith(b'"code":"stream_incomplete"}}'), received[-300:]
        assert b"ended inside an event" in received and not received.endswith(b"0\r\n\r\n")
    # no whole event: nothing went out, so the client gets the gateway's 502 (another replica may have answered)
    client = await connect(reactor, gateway.port, _passed(b"/p/vllm/v1/chat/completions", {
        "model": "meta-llama/Llama-3.1-8B-Instruct", "stream": True, "fake_raw": _raw(CUT)}, CLOSE))
    await with_timeout(reactor, client.lost, 5)
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ") and b"text/event-stream" not in head, head
    assert jsonutil.loads(body)["error"]["message"] == "The upstream provider 'vllm' broke off its answer."


@pytest_twisted.ensureDeferred
async def test_a_broken_passthrough_messages_stream_ends_with_anthropics_error_event(reactor, gateway):
    """As on /v1/messages (before: OpenAI's data-only error, which Anthropic's SDKs skip as an unknown event)."""
    client = await connect(reactor, gateway.port, _passed(b"/p/vllm/v1/messages", {
        "model": "meta-llama/Llama-3.1-8B-Instruct", "max_tokens": 8, "stream": True, "fake_die_after": 4,
        "messages": [{"role": "user", "content": "hi"}]}))
    await with_timeout(reactor, client.lost, 5)
    received = bytes(client.received)
    assert b"event: message_start" in received and not received.endswith(b"0\r\n\r\n")
    last = received.rpartition(b"\nevent: ")[2]
    assert last.startswith(b'error\ndata: {"type":"error","error":{"type":"api_error","message":"The stream ended '
                           b'abnormally'), received[-300:]


def _dechunked(received: bytes) -> bytes:
    """The body of a chunked answer, as far as it came (no last chunk needed)."""
    body, rest = b"", received.partition(b"\r\n\r\n")[2]
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        size = int(size, 16)
        if not size:
            break
        body, rest = body + rest[:size], rest[size + 2:]
    return body


@pytest_twisted.ensureDeferred
async def test_a_passthrough_stream_cut_inside_an_event_ends_with_an_event_of_its_own(reactor, gateway):
    """The error event that ends a stream cut inside an event is an event of its own, as an SSE client parses
    it, after the whole events only: before, the cut event's bytes went out as they came (then a blank line
    and the error), so an SSE client got one event of broken JSON (the openai SDK raised a JSONDecodeError,
    never the error)."""
    client = await connect(reactor, gateway.port, _passed(b"/p/vllm/v1/chat/completions", {
        "model": "meta-llama/Llama-3.1-8B-Instruct", "stream": True, "fake_raw": _raw(WHOLE + CUT)}))
    await with_timeout(reactor, client.lost, 5)
    events = [event for event in _dechunked(bytes(client.received)).split(b"\n\n") if event.strip()]
    assert [event + b"\n\n" for event in events[:-1]] == [WHOLE.encode()], events
    last = events[-1].strip()
    assert last.startswith(b"data: "), events
    assert json.loads(last[len(b"data: "):])["error"]["code"] == "stream_incomplete"


@pytest_twisted.ensureDeferred
async def test_passthrough_messages_refusals_are_in_anthropics_envelope(reactor, http, two):
    """Every error on /p/{provider}/v1/messages is Anthropic's, as on /v1/messages (before: the 401 and the 403s
    were OpenAI's, though the 429, 502 and 504 were Anthropic's); /p/{provider}/v1/responses' stay OpenAI's."""
    gw, plain, _ = two
    body = {"model": "meta-llama/Llama-3.1-8B-Instruct", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    response, content = await call(http, gw, "POST", "/admin/api/v1/auth-keys", {"name": "other",
                                                                                 "models": ["vllm-test/meta-llama/Llama-3.1-8B-Instruct"]})
    other = {"authorization": "Bearer " + jsonutil.loads(content)["value"]}
    before = len(plain.forwarded())
    for path in ("/p/vllm/v1/messages", "/p/vllm/messages", "/p/vllm/v1/messages/count_tokens",
                 "/p/vllm/V1/Messages"):
        for headers, status, kind in (({"authorization": ""}, 401, "authentication_error"),
                                      ({"authorization": "Bearer wrong-key-1234"}, 401, "authentication_error"),
                                      (other, 403, "permission_error")):
            response, content = await call(http, gw, "POST", path, body, headers)
            assert response.code == status, (path, content)
            answer = jsonutil.loads(content)
            assert answer["type"] == "error" and answer["error"]["type"] == kind, (path, content)
            assert set(answer["error"]) == {"type", "message"}, content
        response, content = await call(http, gw, "POST", path.replace("/vllm/", "/nobody/"), body)
        assert response.code == 404
        assert jsonutil.loads(content)["error"]["type"] == "not_found_error", content
    assert len(plain.forwarded()) == before
    for path in ("/p/vllm/v1/responses", "/p/vllm/chat/completions"):
        for headers, status, kind in (({"authorization": ""}, 401, "authentication_error"),
                                      (other, 403, "permission_error")):
            response, content = await call(http, gw, "POST", path, body, headers)
            assert response.code == status and jsonutil.loads(content)["error"]["type"] == kind, (path, content)

    only_openai = await start_gateway(reactor, {"VLLM_BASE_URL": plain.base_url,
                                                "ENABLED_PASSTHROUGH_PROVIDERS": "openai"})
    try:
        response = await http.post(only_openai.url + "/p/vllm/v1/messages", json.dumps(body).encode())
        assert response.code == 403
        assert jsonutil.loads(await treq.content(response))["error"]["type"] == "permission_error"
    finally:
        await only_openai.service.stopService()


def _events(*pairs) -> str:
    return "".join(f"event: {kind}\ndata: {json.dumps(data)}\n\n" for kind, data in pairs)


MESSAGE_START = ("message_start", {"type": "message_start", "message": {
    "id": "m", "type": "message", "role": "assistant", "content": [], "model": "x", "stop_reason": None,
    "usage": {"input_tokens": 3, "output_tokens": 0}}})
BLOCK = ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text",
                                                                                               "text": ""}})
DELTA = ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "hi"}})
STOP = ("message_stop", {"type": "message_stop"})
RESPONSE_DELTA = ("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 3,
                                                 "item_id": "m", "output_index": 0, "content_index": 0, "delta": "hi"})


@pytest_twisted.ensureDeferred
async def test_a_passthrough_stream_cut_between_events_is_broken_where_its_route_has_an_end(
        reactor, gateway, access):
    """A body that ends with its connection (no length, no chunks) ends the same whether the upstream finished
    or was cut between two events: a chat or text completions stream without C{[DONE]}, a Messages stream without
    C{message_stop}, a Responses stream without its final event is broken off, its client told in its route's
    dialect, its outcome stream_broken (before: relayed to a clean end, ok; through SageMaker's C{invocations}, which
    streams a chat or text completion as its routes do, until now); a stream of a route without such an
    end (vLLM's others) ends with its body, and one that sent its end is whole."""
    chat = {"model": "meta-llama/Llama-3.1-8B-Instruct", "stream": True}
    for path, answer, last in (
            (b"/p/vllm/v1/chat/completions", WHOLE, b'data: {"error":{"message":"The stream ended abnormally: the '
                                                    b'upstream stream ended without [DONE].'),
            (b"/p/vllm/completions", WHOLE + WHOLE, b'data: {"error":'),
            (b"/p/vllm/invocations", WHOLE, b'data: {"error":'),  # (SageMaker's: a chat or completions stream)
            (b"/p/vllm/v1/messages", _events(MESSAGE_START, BLOCK, DELTA),
             b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"The stream ended abnormally: '
             b'the upstream stream ended before message_stop."}}'),
            (b"/p/vllm/v1/responses", _events(RESPONSE_DELTA),
             b'event: error\ndata: {"type":"error","code":"stream_incomplete","message":"The stream ended abnormally: '
             b'the upstream stream ended before response.completed.","param":null,"sequence_number":4}')):
        logged = access.next(reactor)
        client = await connect(reactor, gateway.port, _passed(path, dict(chat, fake_raw=_raw(answer)), CLOSE))
        await with_timeout(reactor, client.lost, 5)
        body = _dechunked(bytes(client.received))
        assert body.startswith(answer.encode()) and body[len(answer):].startswith(last), (path, body)
        event = await logged
        assert (event["status"], event["outcome"], event["error"]) == (200, "stream_broken", "stream_incomplete")

    done = "data: [DONE]\n\n"
    for path, answer in ((b"/p/vllm/v1/chat/completions", WHOLE + done),
                         (b"/p/vllm/invocations", WHOLE + done),
                         (b"/p/vllm/v1/chat/completions", WHOLE + "data:[DONE]\r\n\r\n: trailing comment\r\n\r\n"),
                         (b"/p/vllm/v1/messages", _events(MESSAGE_START, DELTA, STOP)),
                         (b"/p/vllm/v1/responses", _events(RESPONSE_DELTA, ("response.completed", {
                             "type": "response.completed", "response": {"id": "r", "status": "completed"}}))),
                         (b"/p/vllm/v1/audio/transcriptions", WHOLE),
                         (b"/p/vllm/generate", "data: {\"text\": \"hi\"}\n\n")):
        logged = access.next(reactor)
        client = await connect(reactor, gateway.port, _passed(path, dict(chat, fake_raw=_raw(answer)), CLOSE))
        await with_timeout(reactor, client.lost, 5)
        assert _dechunked(bytes(client.received)) == answer.encode(), path
        assert bytes(client.received).endswith(b"0\r\n\r\n")
        event = await logged
        assert (event["status"], event["outcome"]) == (200, "ok"), path


@pytest_twisted.ensureDeferred
async def test_a_passthrough_responses_stream_cut_midway_numbers_its_error_event_after_the_last(two):
    """A C{/p/} Responses stream whose upstream broke off after its third event (sequence numbers 0 to 2) ends with
    the gateway's C{error} event (C{stream_incomplete}) numbered 3, as the openai SDK's ResponseErrorEvent has it:
    every event of a Responses stream carries the next number (before: none on this one, as on a /v1 stream it had);
    one whose body ended inside its fifth event (a delta numbered 3 before it), 4."""
    import openai

    gw, plain, guarded = two
    inside = _events(RESPONSE_DELTA) + 'event: response.output_text.delta\ndata: {"type": "response.output'
    seen = []
    for steer in ({"fake_die_after": 3}, {"fake_raw": _raw(inside)}):
        seen.append(await in_thread(
            _sdk_stream, lambda: openai.OpenAI(base_url=gw.url + "/p/vllm/v1", api_key="gw-key", max_retries=0,
                                               timeout=10),
            lambda client, steer=steer: client.responses.create(model="meta-llama/Llama-3.1-8B-Instruct", input="hi",
                                                                stream=True, extra_body=steer)))
    (events, ended), (after_delta, ended_inside) = seen
    assert ended is not None and ended_inside is not None  # (each body was left without its end)
    assert [(e.type, e.sequence_number) for e in events] == [
        ("response.created", 0), ("response.output_item.added", 1), ("response.content_part.added", 2), ("error", 3)]
    assert events[-1].code == "stream_incomplete" and "abnormally" in events[-1].message
    assert [(e.type, e.sequence_number) for e in after_delta] == [("response.output_text.delta", 3), ("error", 4)]


@pytest_twisted.ensureDeferred
async def test_a_passthrough_messages_stream_cut_after_its_deltas_is_charged_them(reactor, gateway, access):
    """A passthrough Messages stream whose body ended after 20 deltas, before its message_delta, was charged its
    message_start's usage as final: 0 output tokens for what its client got, not estimated. It is charged the
    events relayed now (estimated), its input the upstream's own count (as /v1/messages charges such a stream)."""
    answer = _events(MESSAGE_START, BLOCK, *[DELTA] * 20)
    logged = access.next(reactor)
    client = await connect(reactor, gateway.port, _passed(b"/p/vllm/v1/messages", {
        "model": "meta-llama/Llama-3.1-8B-Instruct", "stream": True, "fake_raw": _raw(answer)}, CLOSE))
    await with_timeout(reactor, client.lost, 5)
    assert _dechunked(bytes(client.received)).startswith(answer.encode())
    assert (await logged)["outcome"] == "stream_broken"
    await gateway.service.usage.flush()
    [record], _ = await gateway.service.store.usage.log(0, 2e9, 10)
    assert (record["input_tokens"], record["output_tokens"], record["estimated"]) == (3, 20, True), record

    # (a chat stream's usage chunk is its final usage, cut before [DONE] or not)
    usage = {"id": "c", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}
    logged = access.next(reactor)
    client = await connect(reactor, gateway.port, _passed(b"/p/vllm/v1/chat/completions", {
        "model": "meta-llama/Llama-3.1-8B-Instruct", "stream": True,
        "fake_raw": _raw(WHOLE * 5 + "data: " + json.dumps(usage) + "\n\n")}, CLOSE))
    await with_timeout(reactor, client.lost, 5)
    assert (await logged)["outcome"] == "stream_broken"
    await gateway.service.usage.flush()
    record = (await gateway.service.store.usage.log(0, 2e9, 10))[0][0]
    assert (record["input_tokens"], record["output_tokens"], record["estimated"]) == (7, 2, False), record


@pytest_twisted.ensureDeferred
async def test_a_passthrough_messages_stream_left_or_broken_off_is_charged_its_message_starts_input(reactor, gateway):
    """A C{/p/} Messages stream its client left after some deltas, or whose upstream broke off (the connection
    reset), before its message_delta: charged message_start's input (its C{input_tokens} and cache reads, 13 + 5),
    and the events relayed as its output, estimated (before: its input estimated from the request, 1 or 2 tokens,
    its output alone the upstream's). So too one past the 128 KiB the tap keeps of its end, whose message_start
    went by long before."""
    start = ("message_start", json.dumps({"type": "message_start", "message": dict(MESSAGE_START[1]["message"], usage={
        "input_tokens": 13, "cache_read_input_tokens": 5, "output_tokens": 1})}))

    def steer(deltas, text, **more):
        events = [start, (BLOCK[0], json.dumps(BLOCK[1]))] + [
            ("content_block_delta", json.dumps(dict(DELTA[1], delta={"type": "text_delta", "text": text(i)})))
            for i in range(deltas)] + [(STOP[0], json.dumps(STOP[1]))]
        return dict({"model": "meta-llama/Llama-3.1-8B-Instruct", "max_tokens": 500, "stream": True,
                     "messages": [{"role": "user", "content": "hi"}], "fake_events": events}, **more)

    cases = [  # (the request, what the client waits for before it leaves, or None: it stays to the end)
        (steer(40, lambda i: "MARK" if i == 5 else "hi", fake_pace=0.05), b"MARK"),
        (steer(120, lambda i: ("MARK" if i == 90 else "x") * 2000, fake_pace=0.01), b"MARK" * 2000),
        (steer(40, lambda i: "hi", fake_die_after=12), None),
    ]
    for body, mark in cases:
        client = await connect(reactor, gateway.port, _passed(b"/p/vllm/v1/messages", body))
        if mark is not None:
            await with_timeout(reactor, client.wait_for(mark), 10)
            client.transport.abortConnection()
        await with_timeout(reactor, client.lost, 10)
    records = []
    for _ in range(100):  # (a left stream's record is written once its upstream side closed)
        await gateway.service.usage.flush()
        records, _ = await gateway.service.store.usage.log(0, 2e9, 10)
        if len(records) == len(cases):
            break
    broken, long_left, left = records  # (newest first)
    for record, gone, relayed in ((left, True, 6), (long_left, True, 91), (broken, False, 10)):
        assert (record["input_tokens"], record["cached_tokens"], record["estimated"]) == (18, 5, True), record
        assert record["output_tokens"] >= relayed and record["client_gone"] is gone, record
    assert broken["output_tokens"] == 10  # (the deltas relayed: not its message_start, nor its block's start)
    assert broken["outcome"] == "stream_broken"


@pytest_twisted.ensureDeferred
async def test_a_passthrough_messages_stream_its_upstream_ended_with_an_error_is_charged_what_it_relayed(
        reactor, gateway, access):
    """A C{/p/} Messages stream that ends with its upstream's own C{event: error} (C{overloaded_error}) after 30
    content deltas, its body then ended or held open until the client (the anthropic SDK, which raises on the error
    event) leaves: charged message_start's input (13 + 5 cache reads) and the deltas relayed as its output,
    estimated, as a stream cut short is (before: message_start's 1 output token, as final); its outcome the
    upstream's error (C{upstream_stream_error}), the SDK's error the upstream's."""
    import anthropic

    start = ("message_start", json.dumps({"type": "message_start", "message": dict(MESSAGE_START[1]["message"], usage={
        "input_tokens": 13, "cache_read_input_tokens": 5, "output_tokens": 1})}))
    overloaded = ("error", json.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}))
    events = [start, (BLOCK[0], json.dumps(BLOCK[1]))] + [(DELTA[0], json.dumps(DELTA[1]))] * 30 + [overloaded]

    def sdk():
        return anthropic.Anthropic(base_url=gateway.url + "/p/vllm", api_key="unused", max_retries=0, timeout=10)

    def read(client, **steer):
        return client.messages.create(model="meta-llama/Llama-3.1-8B-Instruct", max_tokens=500, stream=True,
                                      messages=[{"role": "user", "content": "hi"}],
                                      extra_body=dict(fake_events=events, **steer))

    for steer in ({}, {"fake_after_done": "hold"}):
        logged = access.next(reactor)
        seen, error = await in_thread(_sdk_stream, sdk, partial(read, **steer))
        assert [event.type for event in seen].count("content_block_delta") == 30
        assert isinstance(error, anthropic.APIStatusError) and "busy" in str(error), repr(error)
        assert error.body["error"]["type"] == "overloaded_error", error.body
        event = await logged
        assert (event["status"], event["outcome"], event["error"]) == (200, "error", "upstream_stream_error")
    records = []
    for _ in range(100):  # (a held stream's record is written once its upstream side closed)
        await gateway.service.usage.flush()
        records, _ = await gateway.service.store.usage.log(0, 2e9, 10)
        if len(records) == 2:
            break
    assert len(records) == 2, records
    for record in records:
        assert (record["input_tokens"], record["cached_tokens"], record["estimated"], record["outcome"]) == (
            18, 5, True, "error"), record
        assert record["output_tokens"] == 30, record  # (its deltas: not its message_start, block start, error)


@pytest_twisted.ensureDeferred
async def test_a_passthrough_stream_whose_end_went_out_is_whole_whatever_follows(reactor, gateway, access):
    """As on /v1: once a stream's C{[DONE]} went out, a client that leaves (SDKs leave at C{[DONE]}, before the body's
    last chunk) is no 499 and an upstream that breaks off is no broken stream, no error event after the end
    (before: client_gone 499; stream_broken, and an error event after C{[DONE]})."""
    chat = {"model": "meta-llama/Llama-3.1-8B-Instruct", "stream": True}
    logged = access.next(reactor)
    client = await connect(reactor, gateway.port, _passed(b"/p/vllm/v1/chat/completions",
                                                          dict(chat, fake_after_done="hold")))
    await with_timeout(reactor, client.wait_for(b"data: [DONE]\n\n"), 5)
    client.transport.abortConnection()
    event = await logged
    assert (event["status"], event["outcome"]) == (200, "ok")
    logged = access.next(reactor)
    client = await connect(reactor, gateway.port, _passed(b"/p/vllm/v1/chat/completions",
                                                          dict(chat, fake_after_done="abort"), CLOSE))
    await with_timeout(reactor, client.lost, 5)
    assert _dechunked(bytes(client.received)).endswith(b"data: [DONE]\n\n")
    assert bytes(client.received).endswith(b"0\r\n\r\n")  # (its clean end)
    event = await logged
    assert (event["status"], event["outcome"]) == (200, "ok")


def _sdk_stream(make, read):
    """What the SDK client C{make()} gives reading its stream with C{read}: C{(items read, error raised)}."""
    client = make()
    items = []
    try:
        for item in read(client):
            items.append(item)
    except Exception as e:  # (what the SDK raised is the point)
        return items, e
    finally:
        client.close()
    return items, None


@pytest_twisted.ensureDeferred
async def test_the_sdks_see_a_cut_passthrough_stream_as_an_api_error_after_its_whole_events(gateway):
    """The official SDKs on /p/vllm: a stream cut inside an event, or between events without its end, raises the
    SDK's own APIError with the gateway's message, after every whole event (before: the openai SDK and
    Anthropic's raised a JSONDecodeError on the cut event's fragment or, cut between events, ended as though
    finished)."""
    import anthropic
    import openai

    def openai_sdk():
        return openai.OpenAI(base_url=gateway.url + "/p/vllm/v1", api_key="unused", max_retries=0, timeout=10)

    def chat(answer):
        return lambda client: client.chat.completions.create(
            model="meta-llama/Llama-3.1-8B-Instruct", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_body={"fake_raw": _raw(answer)})

    for answer, why in ((WHOLE + CUT, "ended inside an event"), (WHOLE, "ended without [DONE]")):
        chunks, error = await in_thread(_sdk_stream, openai_sdk, chat(answer))
        assert [chunk.choices[0].delta.content for chunk in chunks] == ["h"]
        assert isinstance(error, openai.APIError) and why in error.message, repr(error)
    chunks, error = await in_thread(_sdk_stream, openai_sdk, lambda client: client.chat.completions.create(
        model="meta-llama/Llama-3.1-8B-Instruct", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}, extra_body={"fake_split_utf8": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert error is None and text == "hé" * 3
    assert chunks[-1].usage.completion_tokens == 3  # (a whole stream, its events cut inside a character: whole)

    def anthropic_sdk():
        return anthropic.Anthropic(base_url=gateway.url + "/p/vllm", api_key="unused", max_retries=0, timeout=10)

    def messages(answer):
        return lambda client: client.messages.create(
            model="meta-llama/Llama-3.1-8B-Instruct", max_tokens=8, messages=[{"role": "user", "content": "hi"}],
            stream=True, extra_body={"fake_raw": _raw(answer)})

    whole = _events(MESSAGE_START, BLOCK, DELTA)
    for answer, why in ((whole + "event: content_block_delta\ndata: {\"type\":\"cont", "ended inside an event"),
                        (whole, "ended before message_stop")):
        events, error = await in_thread(_sdk_stream, anthropic_sdk, messages(answer))
        assert [event.type for event in events] == ["message_start", "content_block_start", "content_block_delta"]
        assert isinstance(error, anthropic.APIError) and why in error.message, repr(error)


CHAT_CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "meta-llama/Llama-3.1-8B-Instruct",
              "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}


@pytest_twisted.ensureDeferred
async def test_an_error_event_in_a_passthrough_stream_is_logged_and_counted_as_the_upstreams_error(
        reactor, http, two, access):
    """vLLM's error event inside a stream it then ends ([DONE]), Anthropic's C{event: error} in a Messages
    stream: the client gets the stream as it came, and the access log says outcome=error
    error=upstream_stream_error, as C{gomodel_upstream_errors_total} counts it, as on /v1 (before: ok)."""
    from tests.test_metrics import scrape, value

    gw, plain, _ = two
    error = {"error": {"message": "engine failed", "type": "InternalServerError", "code": 500}}
    anthropic_error = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    start = {"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "content": [],
                                                  "model": "x", "usage": {"input_tokens": 3, "output_tokens": 0}}}
    for path, body, said in (
            (b"/p/vllm/v1/chat/completions", {"model": "meta-llama/Llama-3.1-8B-Instruct", "stream": True,
                                              "fake_sse": [json.dumps(CHAT_CHUNK), json.dumps(error), "[DONE]"]},
             b"engine failed"),
            (b"/p/vllm/v1/messages", {"model": "meta-llama/Llama-3.1-8B-Instruct", "max_tokens": 8, "stream": True,
                                      "messages": [{"role": "user", "content": "hi"}],
                                      "fake_events": [["message_start", json.dumps(start)],
                                                      ["error", json.dumps(anthropic_error)]]},
             b'"overloaded_error"')):
        logged = access.next(reactor)
        client = await connect(reactor, gw.port, _passed(path, body, AUTH))
        await with_timeout(reactor, client.wait_for(b"0\r\n\r\n"), 10)  # (the stream's proper end)
        client.transport.loseConnection()
        await client.lost
        event = await logged
        assert said in bytes(client.received)
        assert (event["status"], event["outcome"], event["error"]) == (200, "error", "upstream_stream_error"), path
    found = await scrape(http, gw, AUTH)
    assert value(found, "gomodel_upstream_errors_total", code="upstream_stream_error") == 2


@pytest_twisted.ensureDeferred
async def test_a_passthrough_answer_without_a_content_type_gets_none(reactor, gateway):
    """The upstream's body goes with the upstream's headers: before, one it sent without a Content-Type got Twisted's
    default, text/html (a browser shown an upstream's text, an error's too, read it as a page)."""
    for answer in ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                   "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello <b>there</b>",
                   "HTTP/1.1 400 Bad Request\r\nContent-Length: 5\r\n\r\nwrong"):
        client = await connect(reactor, gateway.port, _passed(b"/p/vllm/custom", {"fake_raw": answer}, CLOSE))
        await with_timeout(reactor, client.lost, 5)
        head, _, body = bytes(client.received).partition(b"\r\n\r\n")
        assert b"content-type" not in head.lower(), head
        assert answer.encode().endswith(_dechunked(bytes(client.received)) if b"chunked" in head else body), head


@pytest_twisted.ensureDeferred
async def test_a_passthrough_error_answered_as_an_event_stream_names_the_provider_not_its_address(
        reactor, gateway, fake):
    """An error status is an error's body whatever its type: an upstream's address in it is the provider's name
    (before: one answered as text/event-stream went as a stream, unread, the address with it)."""
    where = fake.root_url
    stream = "Content-Type: text/event-stream\r\n"
    for answer in (f"HTTP/1.1 500 Oops\r\n{stream}\r\ndata: {{\"error\": \"at {where}\"}}\n\n",
                   f"HTTP/1.1 503 Busy\r\n{stream}Content-Length: {len(where) + 8}\r\n\r\n"
                   f"data: {where}\n\n"):
        client = await connect(reactor, gateway.port, _passed(b"/p/vllm/v1/chat/completions", {
            "model": "meta-llama/Llama-3.1-8B-Instruct", "stream": True, "fake_raw": answer}, CLOSE))
        await with_timeout(reactor, client.lost, 5)
        received = bytes(client.received)
        assert received.startswith(answer[:12].encode()) and b"data: " in received, received
        assert where.encode() not in received and b"127.0.0.1" not in received and b"vllm" in received, received


@pytest_twisted.ensureDeferred
async def test_an_error_event_in_a_passthrough_stream_names_the_provider_not_its_address(reactor, gateway, fake):
    """As on /v1, and as a passthrough's error body: an upstream's error event that names its address names the
    provider instead (before: relayed as it came); the model's own words are left as they are."""
    where = fake.root_url
    said = {"id": "c", "choices": [{"index": 0, "delta": {"content": f"see {where}"}}]}
    error = {"error": {"message": f"KV transfer to {where} failed", "type": "InternalServerError", "code": 500}}
    typed = {"type": "error", "error": {"type": "api_error", "message": f"lost {where.replace('/', chr(92) + '/')}"}}
    client = await connect(reactor, gateway.port, _passed(b"/p/vllm/v1/chat/completions", {
        "model": "meta-llama/Llama-3.1-8B-Instruct", "stream": True,
        "fake_sse": [json.dumps(said), json.dumps(error), json.dumps(typed, separators=(",", ":")), "[DONE]"]}, CLOSE))
    await with_timeout(reactor, client.lost, 5)
    events = [json.loads(event[len(b"data: "):]) for event in _dechunked(bytes(client.received)).split(b"\n\n")
              if event.startswith(b"data: {")]
    assert events[:2] == [said, {"error": dict(error["error"], message="KV transfer to vllm failed")}], events
    assert events[2]["error"]["message"].startswith("lost ") and events[2]["error"]["message"].endswith("vllm")
    assert "127.0.0.1" not in json.dumps(events[1:]) and len(events) == 3


@pytest_twisted.ensureDeferred
async def test_the_sdks_see_a_passthrough_event_too_long_to_hold_as_an_api_error(gateway, monkeypatch):
    """An event longer than the tap holds (HELD_EVENT, made small here) breaks the stream off after the whole events
    before it, and the openai SDK raises its APIError saying so: before, such an event went out as it came, so one cut
    inside it reached the client as half an event, and the SDK raised a JSONDecodeError on its fragment."""
    import openai

    from gomodel.proxy import exchange

    monkeypatch.setattr(exchange, "HELD_EVENT", 64 * 1024)
    long = "data: " + json.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": "x" * 100_000}}]})

    def chat(answer):
        return lambda client: client.chat.completions.create(
            model="meta-llama/Llama-3.1-8B-Instruct", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_body={"fake_raw": _raw(answer)})

    def openai_sdk():
        return openai.OpenAI(base_url=gateway.url + "/p/vllm/v1", api_key="unused", max_retries=0, timeout=10)

    chunks, error = await in_thread(_sdk_stream, openai_sdk, chat(WHOLE + long[:90_000]))  # (cut inside it)
    assert [chunk.choices[0].delta.content for chunk in chunks] == ["h"]
    assert isinstance(error, openai.APIError), repr(error)
    assert "an upstream event exceeded 65536 bytes" in error.message, error.message
    chunks, error = await in_thread(_sdk_stream, openai_sdk, chat(WHOLE + long + "\n\ndata: [DONE]\n\n"))
    # (an event that came whole in one read is relayed whole; one held past the bound breaks off the same way)
    assert error is None or "an upstream event exceeded 65536 bytes" in error.message, repr(error)


@pytest_twisted.ensureDeferred
async def test_a_head_answer_keeps_the_headers_its_connection_names_upstream_as_get_does(reactor, gateway):
    """HEAD under /p/ is answered as GET is, without its body: a header the upstream's C{Connection} names stays
    upstream (before: a HEAD's answer, read by Twisted's parser, kept it, and its client got it; a GET's did not)."""
    answer = ("HTTP/1.1 200 OK\r\nConnection: X-Hop-Secret, close\r\nX-Hop-Secret: upstream-internal\r\n"
              "X-Kept: yes\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n")
    heads = {}
    for method in (b"GET", b"HEAD"):
        request = _passed(b"/p/vllm/custom", {"fake_raw": answer + ("hello" if method == b"GET" else "")}, CLOSE)
        client = await connect(reactor, gateway.port, method + request[len(b"POST"):])
        await with_timeout(reactor, client.lost, 5)
        head, _, body = bytes(client.received).partition(b"\r\n\r\n")
        heads[method] = head.lower().split(b"\r\n")
        assert heads[method][0] == b"http/1.1 200 ok" and b"x-kept: yes" in heads[method], head
        assert body == (b"hello" if method == b"GET" else b""), body
    for method, lines in heads.items():
        assert not any(line.startswith(b"x-hop-secret") for line in lines), (method, lines)


@pytest_twisted.ensureDeferred
async def test_a_passthrough_endpoint_is_read_from_its_path_once(http, two, monkeypatch):
    """Its error dialect (at the front) and its route (the relay: admin, operator, keyed, priority or a client's)
    come from one reading of the path (before: decoded and classed twice, then decoded again)."""
    from gomodel.api import passthrough

    decoded = []
    monkeypatch.setattr(passthrough, "unquote", lambda text: decoded.append(text) or unquote(text))
    gw, plain, _ = two
    for path, dialect in (("/p/vllm/v1/messages/count_tokens", "anthropic"), ("/p/vllm/tokenize", "openai")):
        decoded.clear()
        response, content = await call(http, gw, "POST", path, {"model": "meta-llama/Llama-3.1-8B-Instruct",
                                                               "prompt": "Hello", "messages": []})
        assert response.code in (200, 400), content
        assert decoded == [path.split("/", 3)[3]], decoded
    decoded.clear()
    response, content = await call(http, gw, "POST", "/p/vllm/v1/messages/x%2F..%2Fy", {})  # (refused: Anthropic's)
    assert response.code == 400 and jsonutil.loads(content)["type"] == "error", content
    assert len(decoded) == 1, decoded


@pytest_twisted.ensureDeferred
async def test_an_upstreams_location_lands_its_client_on_the_passthrough(reactor, two):
    """A C{Location} the upstream answers with, relative (C{/v1/files/abc}, C{../x}, C{?page=2}) or absolute to the
    upstream itself, names the same place under C{/p/{provider}/} (the name the client used), never the upstream's
    host (before: a relative one went as it came, and its client landed on the gateway's own C{/v1/files/abc}; an
    absolute one naming the upstream was left out); one elsewhere passes as it came; one on the upstream that no
    passthrough path reaches is left out."""
    gw, plain, guarded = two
    cases = (
        (b"/p/vllm/v1/files", "201 Created", "/v1/files/abc", b"/p/vllm/v1/files/abc"),
        (b"/p/vllm-test/v1/files", "303 See Other", "/v1/files/abc?x=1#top", b"/p/vllm-test/v1/files/abc?x=1#top"),
        (b"/p/vllm/custom/a/b", "307 Temporary Redirect", "../x", b"/p/vllm/custom/x"),
        (b"/p/vllm/custom/a/b?q=1", "302 Found", "?page=2", b"/p/vllm/custom/a/b?page=2"),
        (b"/p/vllm/v1/models/", "307 Temporary Redirect", plain.root_url + "/v1/models", b"/p/vllm/v1/models"),
        (b"/p/vllm/tokenize", "302 Found", "https://elsewhere.example/x?y", b"https://elsewhere.example/x?y"),
        (b"/p/vllm/v1/files", "302 Found", "/v1/nowhere", None),  # (/p/vllm/v1/nowhere is vLLM's /nowhere)
    )
    for path, status, location, shown in cases:
        answer = f"HTTP/1.1 {status}\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
        client = await connect(reactor, gw.port, _passed(path, {"fake_raw": answer}, {**AUTH, **CLOSE}))
        await with_timeout(reactor, client.lost, 5)
        head = bytes(client.received).partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 " + status.encode()), head
        lines = [line for line in head.split(b"\r\n") if line.lower().startswith(b"location:")]
        assert lines == ([b"Location: " + shown] if shown else []), (path, location, head)
        assert b"127.0.0.1" not in head, head


@pytest_twisted.ensureDeferred
async def test_a_head_answer_keeps_the_upstreams_content_length(reactor, gateway):
    """A HEAD's answer says the length a GET's body would have, as its upstream said it (RFC 9110 9.3.2, 8.6): before,
    the gateway wrote the length of the body it relayed, none, as C{Content-Length: 0} (a client sizing a download
    with HEAD read an empty file)."""
    answer = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
    for method in (b"GET", b"HEAD"):
        request = _passed(b"/p/vllm/custom", {"fake_raw": answer + ("hello" if method == b"GET" else "")}, CLOSE)
        client = await connect(reactor, gateway.port, method + request[len(b"POST"):])
        await with_timeout(reactor, client.lost, 5)
        head, _, body = bytes(client.received).partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        assert lines[0] == b"http/1.1 200 ok" and b"content-length: 5" in lines, (method, head)
        assert body == (b"hello" if method == b"GET" else b""), body
async def test_a_failed_response_in_a_passthrough_stream_names_the_provider_not_its_address(reactor, gateway, fake):
    """A Responses stream's C{response.failed} carries its error in its response: that error names the provider,
    as on C{/v1/responses} (before: relayed as it came, the upstream's address with it); the output, the model's
    words, is left as it is."""
    where = fake.root_url
    output = [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": f"see {where}"}]}]
    response = {"id": "resp_1", "object": "response", "status": "failed", "output": output,
                "error": {"code": "server_error", "message": f"engine at {where} failed"}}
    events = [["response.created", json.dumps({"type": "response.created", "sequence_number": 0,
                                               "response": dict(response, status="in_progress", error=None)})],
              ["response.failed", json.dumps({"type": "response.failed", "sequence_number": 1, "response": response})]]
    client = await connect(reactor, gateway.port, _passed(b"/p/vllm/v1/responses", {
        "model": "meta-llama/Llama-3.1-8B-Instruct", "input": "hi", "stream": True, "fake_events": events}, CLOSE))
    await with_timeout(reactor, client.lost, 5)
    received = _dechunked(bytes(client.received))
    failed = [json.loads(event.partition(b"data: ")[2]) for event in received.split(b"\n\n")
              if event.startswith(b"event: response.failed\n")]
    assert failed == [{"type": "response.failed", "sequence_number": 1,
                       "response": dict(response, error={"code": "server_error", "message": "engine at vllm failed"})}]
    assert received.count(where.encode()) == 2  # (the output's, in each response: the model's own words)


@pytest_twisted.ensureDeferred
async def test_an_upstreams_alt_svc_and_hsts_stay_upstream(reactor, gateway):
    """C{Alt-Svc} and C{Strict-Transport-Security} describe the upstream's host (another protocol or port of it, its
    TLS policy), not the gateway's: left out of every answer (before: a client was told to reach the gateway over
    HTTP/3 on the upstream's port, or to pin HTTPS for a year on a gateway it reaches over HTTP)."""
    answer = ("HTTP/1.1 200 OK\r\nAlt-Svc: h3=\":443\"; ma=86400\r\n"
              "Strict-Transport-Security: max-age=31536000; includeSubDomains\r\nX-Kept: yes\r\n"
              "Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello")
    client = await connect(reactor, gateway.port, _passed(b"/p/vllm/custom", {"fake_raw": answer}, CLOSE))
    await with_timeout(reactor, client.lost, 5)
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"http/1.1 200 ok" and b"x-kept: yes" in lines and body == b"hello", head
    assert not any(line.startswith((b"alt-svc", b"strict-transport-security")) for line in lines), head


@pytest_twisted.ensureDeferred
async def test_an_upstreams_link_and_content_location_land_on_the_passthrough(reactor, two):
    """C{Content-Location} and each C{Link} target the upstream answers with name their place under
    C{/p/{provider}/} as C{Location} does (relative, or absolute to the upstream), its parameters kept; a link on the
    upstream no passthrough path reaches is left out, one elsewhere passes (before: a relative one went as it came,
    naming the gateway's own routes, and a header with an absolute one to the upstream was left out whole)."""
    gw, plain, _ = two
    root = plain.root_url
    links = (f'</v1/models?after=m1>; rel="next", <{root}/v1/models?before=m1>; rel="prev"; title="a, <b>", '
             '<https://docs.example/models>; rel="help", </v1/nowhere>; rel="other"')
    answer = (f"HTTP/1.1 200 OK\r\nLink: {links}\r\nContent-Location: {root}/v1/models/m1\r\n"
              "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    client = await connect(reactor, gw.port, _passed(b"/p/vllm/v1/models", {"fake_raw": answer}, {**AUTH, **CLOSE}))
    await with_timeout(reactor, client.lost, 5)
    head = bytes(client.received).partition(b"\r\n\r\n")[0]
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK", head
    assert [line for line in lines if line.lower().startswith(b"link:")] == [
        b'Link: </p/vllm/v1/models?after=m1>; rel="next", </p/vllm/v1/models?before=m1>; rel="prev"; '
        b'title="a, <b>", <https://docs.example/models>; rel="help"'], head
    assert [line for line in lines if line.lower().startswith(b"content-location:")] == [
        b"Content-Location: /p/vllm/v1/models/m1"], head
    assert b"127.0.0.1" not in head, head


@pytest_twisted.ensureDeferred
async def test_a_failed_response_answered_whole_names_the_provider_not_its_address(reactor, gateway, fake):
    """A Responses object answered whole (C{responses}, C{responses/{id}}) whose C{error} names the upstream's address
    gets it without it, as a stream's C{response.failed} does (before: relayed as it came, with the address); its
    output, the model's words, and an answer naming no address are left as they are."""
    where = fake.root_url
    output = [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": f"see {where}"}]}]
    failed = {"id": "resp_1", "object": "response", "status": "failed", "output": output,
              "error": {"code": "server_error", "message": f"engine at {where} failed"}}
    for path in (b"/p/vllm/v1/responses", b"/p/vllm/responses/resp_1"):
        body = json.dumps(failed)
        answer = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                  + body)
        client = await connect(reactor, gateway.port, _passed(path, {"fake_raw": answer}, CLOSE))
        await with_timeout(reactor, client.lost, 5)
        head, _, received = bytes(client.received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: %d" % len(received) in head.lower(), head
        assert json.loads(received) == dict(failed, error={"code": "server_error", "message": "engine at vllm failed"})
    plain = json.dumps({"id": "resp_2", "object": "response", "status": "completed", "output": output, "error": None})
    answer = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(plain)}\r\n\r\n" + plain
    client = await connect(reactor, gateway.port, _passed(b"/p/vllm/v1/responses", {"fake_raw": answer}, CLOSE))
    await with_timeout(reactor, client.lost, 5)
    assert bytes(client.received).partition(b"\r\n\r\n")[2] == plain.encode()


@pytest_twisted.ensureDeferred
async def test_an_upstreams_own_request_id_reaches_its_client(reactor, gateway):
    """The upstream's C{request-id} (Anthropic's, which the anthropic SDKs read as C{_request_id}: what its support
    asks for) reaches the client of a passthrough, on C{v1/messages} (where the gateway's own answers carry its id
    under that name) and elsewhere; C{X-Request-Id} stays the gateway's (before: the upstream's was dropped, and
    an Anthropic client saw only the gateway's)."""
    answer = ("HTTP/1.1 200 OK\r\nrequest-id: req_011CUpstream\r\nX-Request-Id: upstream-x\r\n"
              "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    for path in (b"/p/vllm/v1/messages", b"/p/vllm/custom"):
        request = _passed(path, {"fake_raw": answer}, {**CLOSE, "X-Request-Id": "mine"})
        client = await connect(reactor, gateway.port, request)
        await with_timeout(reactor, client.lost, 5)
        lines = bytes(client.received).partition(b"\r\n\r\n")[0].lower().split(b"\r\n")
        assert [line for line in lines if line.startswith((b"request-id:", b"x-request-id:"))] == [
            b"x-request-id: mine", b"request-id: req_011cupstream"], (path, lines)


@pytest_twisted.ensureDeferred
async def test_an_upstreams_cors_headers_stay_upstream(reactor, gateway):
    """An upstream's CORS headers (OpenRouter's and others' C{Access-Control-Allow-Origin: *}, a preflight's) never
    reach the client: the gateway has no CORS policy, so another site's page reads none of its answers (before: a
    page any visitor of an open gateway opened read what C{GET /p/...} answered, the provider account's lists too,
    and an C{OPTIONS} preflight passed on was allowed)."""
    cors = ("Access-Control-Allow-Origin: *\r\nAccess-Control-Allow-Credentials: true\r\n"
            "Access-Control-Allow-Methods: GET, POST\r\nAccess-Control-Allow-Headers: authorization\r\n"
            "Access-Control-Expose-Headers: X-Request-ID\r\nAccess-Control-Max-Age: 86400\r\n"
            "Access-Control-Allow-Private-Network: true\r\n")
    for method in (b"GET", b"OPTIONS"):
        answer = (f"HTTP/1.1 200 OK\r\n{cors}X-Kept: yes\r\nContent-Type: application/json\r\n"
                  "Content-Length: 2\r\n\r\n{}")
        request = _passed(b"/p/vllm/v1/models", {"fake_raw": answer}, {**CLOSE, "Origin": "https://elsewhere.example"})
        client = await connect(reactor, gateway.port, method + request[len(b"POST"):])
        await with_timeout(reactor, client.lost, 5)
        lines = bytes(client.received).partition(b"\r\n\r\n")[0].lower().split(b"\r\n")
        assert lines[0] == b"http/1.1 200 ok" and b"x-kept: yes" in lines, lines
        assert not any(line.startswith(b"access-control-") for line in lines), (method, lines)


@pytest_twisted.ensureDeferred
async def test_an_openai_upstreams_own_x_request_id_reaches_its_client_as_x_upstream_request_id(reactor, fake):
    """Under C{/p/openai/...} the upstream's own C{x-request-id} (OpenAI's C{req_...}, what its support asks for)
    reaches the client as C{X-Upstream-Request-Id}, the openai SDK's C{X-Request-Id} (its C{_request_id}) staying the
    gateway's; an upstream that echoes the gateway's id back (vLLM's C{--enable-request-id-headers}) adds none
    (before: the upstream's was dropped, and its client could not name the request to the provider)."""
    import openai

    gw = await start_gateway(reactor, {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-up"})
    completion = json.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": "hi"}}]})

    def answered(upstream_id):
        return (f"HTTP/1.1 200 OK\r\nx-request-id: {upstream_id}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(completion)}\r\n\r\n{completion}")

    def create(upstream_id):
        client = openai.OpenAI(base_url=gw.url + "/p/openai/v1", api_key="unused", max_retries=0, timeout=10,
                               default_headers={"X-Request-Id": "mine"})
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                extra_body={"fake_raw": answered(upstream_id)})
            return raw.request_id, raw.headers.get("x-upstream-request-id"), raw.parse().choices[0].message.content
        finally:
            client.close()

    try:
        assert await in_thread(create, "req_0123abc") == ("mine", "req_0123abc", "hi")
        assert await in_thread(create, "mine") == ("mine", None, "hi")  # (its echo of ours: nothing more)
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_passthrough_path_is_relayed_as_sent_and_its_fragment_never(reactor, gateway, fake):
    """A C{#} the client encoded (C{%23}, C{%2523} in the path or the query) reaches the provider as it was sent, not
    encoded again; a raw fragment (a C{#} not encoded, which no HTTP client sends: its URL parser keeps it) never
    does, nor decides the route, as the provider's own server would read it (before: C{?x=1#frag} went upstream as it
    came, and C{tokenize#frag} as C{/tokenize%23frag}, a route the client never named, an admin route's too)."""
    async def relayed(path):
        before = len(fake.forwarded())
        client = await connect(reactor, gateway.port, _passed(path, {"prompt": "hi"}, CLOSE))
        await with_timeout(reactor, client.lost, 5)
        status = bytes(client.received).split(b" ", 2)[1]
        return status, fake.last_request().uri if len(fake.forwarded()) > before else None

    for path, upstream in ((b"/p/vllm/tokenize%23x", b"/tokenize%23x"), (b"/p/vllm/tok%2523x", b"/tok%2523x"),
                           (b"/p/vllm/tokenize?x=%23y&z=%2523", b"/tokenize?x=%23y&z=%2523"),
                           (b"/p/vllm/tokenize?x=1#frag", b"/tokenize?x=1"), (b"/p/vllm/tokenize#frag?x=1", b"/tokenize"),
                           (b"/p/vllm/tokenize?x=1%23#", b"/tokenize?x=1%23")):
        assert (await relayed(path))[1] == upstream, path
    assert await relayed(b"/p/vllm/sleep#x") == (b"403", None)  # (the route the provider would read: an admin's)


@pytest_twisted.ensureDeferred
async def test_a_replica_that_broke_off_leaves_its_request_ids_to_none_that_answered(reactor, http):
    """A replica whose answer broke off before any of it went out, its head naming its request ids, is not the one
    that answered: the replica asked next answers with ids of its own or none, the gateway's C{request-id} on
    Anthropic's C{v1/messages} (before: the broken replica's C{request-id} and C{X-Upstream-Request-Id} stayed on
    the answer, naming a request that did not answer it)."""
    broken, whole = await start_fake(reactor), await start_fake(reactor)
    broken.steer = {"fake_raw": "HTTP/1.1 200 OK\r\nx-request-id: req_broken\r\nrequest-id: req_broken\r\n"
                                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"}
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": f"{broken.base_url},{whole.base_url}",
                                       "ROUTING_STRATEGY": "round_robin", "REPLICA_FAILURE_THRESHOLD": "1000"})
    try:
        for path, ours in (("/p/vllm/tokenize", False), ("/p/vllm/tokenize", False), ("/p/vllm/v1/messages", True),
                           ("/p/vllm/v1/messages", True)):
            response = await http.post(gw.url + path, headers={"X-Request-Id": "mine"}, data=json.dumps(
                {"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": "hi", "max_tokens": 4,
                 "messages": [{"role": "user", "content": "hi"}]}).encode())
            await treq.content(response)
            assert response.code == 200 and response.headers.getRawHeaders("x-gomodel-replica") == ["1"], path
            assert response.headers.getRawHeaders("x-upstream-request-id") is None, path
            assert response.headers.getRawHeaders("request-id") == (["mine"] if ours else None), path
        assert len(broken.forwarded()) >= 2  # (each route was asked of it first once)
    finally:
        await stop_all(gw, broken, whole)
