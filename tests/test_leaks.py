"""Nothing of the gateway's upstreams reaches a client, and nothing of a client's key an upstream: the upstream's
address (in an error, streamed or not, relayed or passed through, in a header) and its key, the client's key sent
again under another header or in the query of a passthrough; and a key's model list holds through failover rules."""

import io
import json
import urllib.parse

import openai
import pytest
import pytest_twisted
import treq
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

from tests.support import in_thread, openai_client, start_fake, start_gateway, stop_all

MASTER = "master-k"
PROVIDER_KEY = "sk-provider-0123456789"
BARE = "meta-llama/Llama-3.1-8B-Instruct"
MODEL = f"vllm/{BARE}"
OTHER = f"openai-other/{BARE}"


@pytest_twisted.async_yield_fixture()
async def two(reactor, tmp_path):
    """A gateway with a master key before a vLLM (with a provider key) and an OpenAI-compatible upstream, the
    vLLM's model failing over to the other's."""
    vllm, other = await start_fake(reactor), await start_fake(reactor)
    gw = await start_gateway(reactor, {
        "VLLM_BASE_URL": vllm.base_url, "VLLM_API_KEY": PROVIDER_KEY, "OPENAI_OTHER_BASE_URL": other.base_url,
        "OPENAI_OTHER_API_KEY": "sk-up", "FAILOVER_RULES_JSON": json.dumps({MODEL: [OTHER]}),
        "REPLICA_FAILURE_THRESHOLD": "100", "GOMODEL_MASTER_KEY": MASTER, "GOMODEL_DATA_DIR": str(tmp_path)})
    yield gw, vllm, other
    await stop_all(gw, vllm, other)


async def call(http, gw, path, body=None, key=MASTER, method="POST", headers=None):
    response = await http.request(method, gw.url + path, data=None if body is None else json.dumps(body).encode(),
                                  headers={"authorization": f"Bearer {key}", **(headers or {})}, allow_redirects=False)
    return response, await treq.content(response)


async def new_key(http, gw, **fields):
    response, content = await call(http, gw, "/admin/api/v1/auth-keys", {"name": "k", **fields})
    assert response.code == 201, content
    return json.loads(content)["value"]


def addresses(fake):
    """What of C{fake}'s address a client must never see."""
    return fake.base_url, fake.root_url, fake.root_url[len("http://"):], str(fake.port.getHost().port)


def shows_none(content: bytes, *hidden) -> bool:
    return not any(h.encode() in content for h in hidden)


@pytest_twisted.ensureDeferred
async def test_a_failover_rule_is_no_way_out_to_a_model_the_key_may_not_use(http, two):
    """A key that may use the vLLM's model alone is never sent to its failover candidate, another provider's model
    it may not use (its prompt would reach a provider it was kept from); one that may use both, and the master key,
    are. Before, a failed first target sent every key's request on to the candidate."""
    gw, vllm, other = two
    only = await new_key(http, gw, models=[MODEL])
    both = await new_key(http, gw, models=[MODEL, OTHER])
    vllm.steer = {"fake_status": 503, "fake_body": json.dumps({"error": {"message": "overloaded", "type": "x"}})}
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"}),
                       ("/v1/responses", {"input": "hi"}),
                       ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})):
        response, content = await call(http, gw, path, dict(body, model=MODEL), key=only)
        assert response.code == 503, content
        assert other.forwarded() == [], path
        for key in (both, MASTER):
            response, content = await call(http, gw, path, dict(body, model=MODEL), key=key)
            assert response.code == 200, content
        assert len(other.forwarded()) == 2, path
        other.requests.clear()


@pytest_twisted.ensureDeferred
async def test_a_streamed_error_never_shows_the_upstreams_address(http, two):
    """An in-band error of a chat stream, and a native Responses stream's error event and failed response (kept by
    the gateway, and read back), are the client's without the upstream's address: the provider's name instead."""
    gw, vllm, other = two
    hidden = addresses(vllm)
    said = f"engine at {vllm.base_url}/chat/completions ({hidden[2]}) failed"
    response, content = await call(http, gw, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "fake_sse": ['{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
                     '"delta":{"content":"hi"},"finish_reason":null}]}',
                     json.dumps({"error": {"message": said, "type": "internal_error", "param": None, "code": 500}}),
                     "[DONE]"]})
    assert response.code == 200 and b'"content":"hi"' in content
    assert shows_none(content, *hidden), content
    assert b"engine at vllm/chat/completions (vllm) failed" in content

    failed = {"id": "resp_failed1", "object": "response", "created_at": 1, "status": "failed", "model": BARE,
              "output": [], "error": {"code": "server_error", "message": said}}
    response, content = await call(http, gw, "/v1/responses", {
        "model": MODEL, "input": "hi", "stream": True, "fake_events": [
            ["response.created", json.dumps({"type": "response.created", "sequence_number": 0,
                                             "response": dict(failed, status="in_progress", error=None)})],
            ["error", json.dumps({"type": "error", "code": "server_error", "message": said, "param": None,
                                  "sequence_number": 1})],
            ["response.failed", json.dumps({"type": "response.failed", "sequence_number": 2, "response": failed})]]})
    assert response.code == 200 and b"event: response.failed" in content
    assert shows_none(content, *hidden), content
    assert content.count(b"engine at vllm/chat/completions (vllm) failed") == 2
    response, content = await call(http, gw, "/v1/responses/resp_failed1", method="GET")
    assert response.code == 200 and json.loads(content)["status"] == "failed"
    assert shows_none(content, *hidden), content


@pytest_twisted.ensureDeferred
async def test_an_upstreams_header_naming_its_address_stays_upstream(http, two):
    """A header of the upstream's answer naming its address (a Location, a Link, a proxy's Via) reaches no client,
    on a model-routed route or through the passthrough (where a Link to a place a passthrough path reaches names
    that path instead); the others pass as before."""
    gw, vllm, other = two
    named = {"Location": vllm.base_url + "/x", "Link": f"<{vllm.root_url}/v1/models>; rel=models",
             "Via": f"1.1 {addresses(vllm)[2]}", "X-Kept": "as-is"}
    body = {"model": BARE, "messages": [{"role": "user", "content": "hi"}], "fake_headers": named}
    for path, model in (("/v1/chat/completions", MODEL), ("/p/vllm/v1/chat/completions", BARE)):
        response, content = await call(http, gw, path, dict(body, model=model))
        assert response.code == 200, content
        assert response.headers.getRawHeaders("x-kept") == ["as-is"]
        passed = path.startswith("/p/")
        assert response.headers.getRawHeaders("link") == (["</p/vllm/v1/models>; rel=models"] if passed else None)
        for name in ("location", "via"):
            assert not response.headers.hasHeader(name), (path, name)


@pytest_twisted.ensureDeferred
async def test_a_passthrough_error_shows_the_provider_not_its_address(http, two):
    """The passthrough relays an upstream's error (or redirect) as it came (status, content type, body), but for its
    address: the provider's name where the body named it, and no header naming it. Before, both went as they came."""
    gw, vllm, other = two
    said = {"error": {"message": f"no route {vllm.root_url}/v1/x at {addresses(vllm)[2]}", "type": "NotFoundError",
                      "param": None, "code": 404}}
    response, content = await call(http, gw, "/p/vllm/v1/chat/completions", {
        "model": BARE, "messages": [], "fake_status": 404, "fake_body": json.dumps(said),
        "fake_headers": {"Location": vllm.root_url + "/elsewhere"}})
    assert response.code == 404 and response.headers.getRawHeaders("content-type") == ["application/json"]
    assert json.loads(content)["error"] == dict(said["error"], message="no route vllm/x at vllm")  # (its base URL, /v1 too)
    assert response.length == len(content)
    # (a Location on it names the same place under /p/vllm/: tests/test_passthrough.py)
    assert response.headers.getRawHeaders("location") == ["/p/vllm/elsewhere"]
    # A redirect to it (a proxy's in front of the upstream) the same way.
    response, content = await call(http, gw, "/p/vllm/v1/chat/completions", {
        "model": BARE, "messages": [], "fake_status": 307, "fake_body": f"moved to {vllm.root_url}/v2",
        "fake_headers": {"Location": vllm.root_url + "/v2"}})
    assert response.code == 307 and content == b"moved to vllm/v2"
    assert response.headers.getRawHeaders("location") == ["/p/vllm/v2"]
    # An error that names nothing hidden comes byte for byte, as before.
    response, content = await call(http, gw, "/p/vllm/nothing-here", method="GET")
    assert response.code == 404 and content == b'{"detail":"Not Found"}'


@pytest_twisted.ensureDeferred
async def test_an_address_written_with_json_escapes_is_hidden_too(http, two):
    """An upstream error whose JSON writes the address with escapes (C{\\\\u0031...}) names it to every client that
    reads it: it is shown without it, on the OpenAI routes (before, relayed byte for byte) and on Anthropic's (before,
    shown decoded)."""
    gw, vllm, other = two
    message = f"cannot reach {vllm.base_url}"
    escaped = '{"error":{"message":"' + "".join("\\u%04x" % ord(c) for c in message) + '","type":"x","param":null}}'
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})):
        response, content = await call(http, gw, path, dict(body, model=MODEL, fake_status=400, fake_body=escaped))
        assert response.code == 400
        shown = json.loads(content)["error"]["message"]
        assert shown == "cannot reach vllm", (path, content)


@pytest_twisted.ensureDeferred
async def test_the_providers_key_an_upstream_quotes_is_never_shown(http, two):
    """An upstream that quotes the key it was sent (the gateway's, every tenant's) in its error is shown with the
    key redacted, in an answer and in a batch's error file alike."""
    gw, vllm, other = two
    said = json.dumps({"error": {"message": f"Incorrect API key provided: {PROVIDER_KEY}.", "type": "invalid_request_error",
                                 "param": None, "code": "invalid_api_key"}})
    for path, status in (("/v1/chat/completions", 403), ("/p/vllm/v1/chat/completions", 401)):
        response, content = await call(http, gw, path, {"model": MODEL if path.startswith("/v1") else BARE,
                                                        "messages": [], "fake_status": status, "fake_body": said})
        assert response.code == status
        assert json.loads(content)["error"]["message"] == "Incorrect API key provided: ***.", path
    # (a 401 on /v1 is the gateway's 502 upstream_auth_failed, without the upstream's words)
    response, content = await call(http, gw, "/v1/chat/completions", {"model": MODEL, "messages": [],
                                                                      "fake_status": 401, "fake_body": said})
    assert response.code == 502 and PROVIDER_KEY.encode() not in content


@pytest_twisted.ensureDeferred
async def test_the_passthrough_never_relays_the_clients_key(http, two):
    """The client's key goes upstream under no name: neither as Azure's C{api-key} or Google's C{x-goog-api-key},
    nor in another header or a cookie, nor in the query (C{?key=}); the rest of the headers and the query pass."""
    gw, vllm, other = two
    key = await new_key(http, gw)
    response, content = await call(
        http, gw, f"/p/vllm/tokenize?key={key}&x=1&api_key=%73{key[1:]}&y=%2F", {"model": BARE, "prompt": "hi"},
        key=key, headers={"api-key": key, "x-goog-api-key": key, "x-custom-auth": f"Token {key}",
                          "cookie": f"s={key}", "x-custom": "kept"})
    assert response.code == 200, content
    seen = vllm.last_request()
    assert seen.uri == b"/tokenize?x=1&y=%2F"
    assert seen.header(b"x-custom") == "kept" and seen.header(b"authorization") == f"Bearer {PROVIDER_KEY}"
    assert all(key.encode() not in b"".join(values) for _, values in seen.headers.getAllRawHeaders())


def test_a_responses_stream_read_at_once_is_rewritten_at_its_errors_alone():
    """A native Responses stream's tail read at once (many events), with LF or CRLF line breaks: its error event
    and failed response are rewritten in place, every other byte (the model's words naming the host too) as it came."""
    from gomodel.proxy.sse import ResponsesStreamObserver

    host = "10.0.0.7:8000"

    def event(kind, fields, sep="\n"):
        return (f"event: {kind}{sep}data: " + json.dumps({"type": kind, **fields}) + sep + sep).encode()

    for sep in ("\n", "\r\n"):
        deltas = [event("response.output_text.delta", {"sequence_number": i, "delta": f"ask {host} "}, sep)
                  for i in range(60)]
        error = event("error", {"code": "server_error", "message": f"lost {host}", "param": None,
                                "sequence_number": 60}, sep)
        failed = event("response.failed", {"sequence_number": 61, "response": {
            "id": "resp_1", "status": "failed", "output": [{"text": f"ask {host}"}],
            "error": {"code": "server_error", "message": f"lost {host}"}}}, sep)
        observer = ResponsesStreamObserver(lambda text: text.replace(host, "vllm"))
        out = observer.feed(b"".join(deltas) + error + failed)
        assert out.startswith(b"".join(deltas)), sep
        rest = out[len(b"".join(deltas)):].decode()
        assert rest.count(host) == 1 and rest.count("lost vllm") == 2 and f"ask {host}" in rest, rest
        assert observer.done and observer.response["error"]["message"] == "lost vllm"
        assert observer.response["output"] == [{"text": f"ask {host}"}]
        # One event a read, as a model streams: the same.
        observer = ResponsesStreamObserver(lambda text: text.replace(host, "vllm"))
        out = b"".join(observer.feed(e) for e in deltas[:2] + [error, failed])
        assert out.startswith(b"".join(deltas[:2])) and out[len(b"".join(deltas[:2])):].count(host.encode()) == 1


@pytest_twisted.ensureDeferred
async def test_the_passthrough_keeps_tenants_stored_responses_apart(http, two):
    """A managed key reaches another tenant's stored response through C{/p/} no more than through C{/v1/responses}:
    reading it, its input items or cancelling it is a 404 (before, the instance answered with its whole content),
    continuing it (or rendering, compacting, counting it) a 400 C{previous_response_not_found} (before, its history
    reached the other key); its own tenant and the master key reach it as before."""
    gw, vllm, other = two
    alice, bob = await new_key(http, gw, name="alice"), await new_key(http, gw, name="bob")
    response, content = await call(http, gw, "/v1/responses", {"model": MODEL, "input": "my secret plan"}, key=alice)
    assert response.code == 200, content
    response_id = json.loads(content)["id"]
    asked = len(vllm.forwarded())
    for method, path in (("GET", f"/p/vllm/v1/responses/{response_id}"), ("GET", f"/p/vllm/responses/{response_id}"),
                         ("GET", f"/p/vllm/v1/v1/responses/{response_id}"),  # (vLLM's /v1/responses/{id} too)
                         ("GET", f"/p/vllm/v1/responses/{response_id}/input_items"),
                         ("POST", f"/p/vllm/v1/responses/{response_id}/cancel"),
                         ("DELETE", f"/p/vllm/v1/responses/{response_id}")):
        response, content = await call(http, gw, path, key=bob, method=method)
        assert response.code == 404, (path, content)
        assert json.loads(content)["error"]["code"] == "response_not_found" and b"secret" not in content, content
    for path in ("/p/vllm/v1/responses", "/p/vllm/v1/responses/render", "/p/openai-other/v1/responses/compact",
                 "/p/openai-other/v1/responses/input_tokens"):
        response, content = await call(http, gw, path, {
            "model": BARE, "input": "what was it?", "previous_response_id": response_id}, key=bob)
        assert response.code == 400 and json.loads(content)["error"]["code"] == "previous_response_not_found", content
    assert len(vllm.forwarded()) == asked  # (none of these reached the instance)
    for key in (alice, MASTER):
        response, content = await call(http, gw, f"/p/vllm/v1/responses/{response_id}", key=key, method="GET")
        assert response.code == 200 and json.loads(content)["id"] == response_id, content
        response, content = await call(http, gw, "/p/vllm/v1/responses", {
            "model": BARE, "input": "and now?", "previous_response_id": response_id}, key=key)
        assert response.code == 200, content
    response, content = await call(http, gw, "/p/vllm/v1/responses/resp_unknown", key=bob, method="GET")
    assert response.code == 404 and json.loads(content)["error"]["code"] == "response_not_found", content


@pytest_twisted.ensureDeferred
async def test_the_passthrough_keeps_the_providers_account_objects_from_managed_keys(http, two):
    """What a provider's account stores (its stored chat completions, files, batches, vector stores,
    conversations, videos; OpenRouter's credits, key and generations, ...) is every tenant's who went through the
    gateway (its fine-tuned models too: a C{DELETE} of one deleted it for all), and its realtime sessions mint keys
    to the account: a managed key gets 403 there through C{/p/} (before, C{GET /p/openai/v1/chat/completions} listed
    every tenant's stored conversations, and C{realtime/client_secrets} handed out a key to the provider past the
    gateway's limits), and nothing reaches the provider; it still creates chat completions (and vLLM's
    C{render}/C{batch}); the master key reaches all."""
    gw, vllm, other = two
    key = await new_key(http, gw)
    asked = len(other.forwarded())
    for method, path in (("GET", "/p/openai-other/v1/chat/completions"),
                         ("GET", "/p/openai-other/v1/chat/completions/chatcmpl-1"),
                         ("GET", "/p/openai-other/v1/chat/completions/chatcmpl-1/messages"),
                         ("DELETE", "/p/openai-other/chat/completions/chatcmpl-1"),
                         ("GET", "/p/openai-other/v1/files"), ("GET", "/p/openai-other/v1/files/file-1/content"),
                         ("GET", "/p/openai-other/v1/batches"), ("GET", "/p/openai-other/v1/vector_stores"),
                         ("GET", "/p/openai-other/v1/conversations/conv_1/items"),
                         ("GET", "/p/openai-other/v1/Files"), ("GET", "/p/openai/v1/fine_tuning/jobs"),
                         ("GET", "/p/openai-other/v1/videos"), ("POST", "/p/openai-other/v1/realtime/client_secrets"),
                         ("POST", "/p/openai-other/v1/realtime/sessions"), ("GET", "/p/openai-other/v1/credits"),
                         ("GET", "/p/openai-other/v1/key"), ("GET", "/p/openai-other/v1/generation?id=gen-1"),
                         ("DELETE", "/p/openai-other/v1/models/ft:gpt-4o-mini:org:tuned:1")):
        response, content = await call(http, gw, path, key=key, method=method)
        assert response.code == 403, (path, content)
        assert json.loads(content)["error"]["code"] == "provider_account_route", content
    assert len(other.forwarded()) == asked
    body = {"model": BARE, "messages": [{"role": "user", "content": "hi"}]}
    response, content = await call(http, gw, "/p/openai-other/v1/chat/completions", body, key=key)
    assert response.code == 200, content
    response, content = await call(http, gw, "/p/vllm/v1/chat/completions", body, key=key)
    assert response.code == 200, content
    response, content = await call(http, gw, "/p/openai-other/v1/models", key=key, method="GET")
    assert response.code == 200, content
    response, content = await call(http, gw, "/p/openai-other/v1/files", key=MASTER, method="GET")
    assert response.code == 404 and other.last_request().path == b"/v1/files", content  # (the fake has none)


@pytest_twisted.ensureDeferred
async def test_no_route_sends_the_clients_key_upstream(reactor, http, two):
    """A managed key, sent as C{Authorization} or as C{x-api-key} (and again under another header and in the
    query), reaches no upstream on any route: chat, completions, embeddings, rerank, score, Responses (streamed,
    in the background, read, cancelled, deleted), Messages (native, translated, count_tokens), a batch's lines,
    the passthrough; each upstream sees the provider's key or none."""
    gw, vllm, other = two
    other.native_messages = False  # (its Messages go translated to its chat)
    key = await new_key(http, gw)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    message = {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    asks = [("/v1/chat/completions", dict(chat, model=MODEL)), ("/v1/chat/completions", dict(chat, model=OTHER)),
            ("/v1/chat/completions", dict(chat, model=MODEL, stream=True)),
            ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 5}),
            ("/v1/embeddings", {"model": MODEL, "input": "hi"}),
            ("/v1/rerank", {"model": MODEL, "query": "q", "documents": ["a", "b"]}),
            ("/v1/score", {"model": MODEL, "text_1": "a", "text_2": "b"}),
            ("/v1/responses", {"model": MODEL, "input": "hi", "stream": True}),
            ("/v1/messages", dict(message, model=MODEL)), ("/v1/messages", dict(message, model=OTHER, stream=True)),
            ("/v1/messages/count_tokens", {"model": MODEL, "messages": message["messages"]}),
            ("/p/vllm/tokenize?key=" + key, {"model": BARE, "prompt": "hi"}),
            ("/p/openai-other/v1/chat/completions", dict(chat, model=BARE))]
    for number, (path, body) in enumerate(asks):
        named = {"x-api-key": key} if number % 2 else {"authorization": f"Bearer {key}"}
        response = await http.post(gw.url + path, data=json.dumps(body).encode(), headers=dict(
            named, **{"x-custom": f"Token {key}", "anthropic-version": "2023-06-01"}))
        content = await treq.content(response)
        assert response.code == 200, (path, content)
    auth = {"authorization": f"Bearer {key}"}
    response = await http.post(gw.url + "/v1/responses", headers=auth, data=json.dumps(
        {"model": MODEL, "input": "hi", "background": True}).encode())
    response_id = json.loads(await treq.content(response))["id"]
    for method, path in (("GET", ""), ("GET", "/input_items"), ("POST", "/cancel"), ("DELETE", "")):
        response = await http.request(method, f"{gw.url}/v1/responses/{response_id}{path}", headers=auth)
        assert response.code == 200, (path, await treq.content(response))
    line = {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": dict(chat, model=MODEL)}
    response = await http.post(gw.url + "/v1/files", headers=auth, data={"purpose": "batch"}, files={
        "file": ("in.jsonl", "application/jsonl", io.BytesIO(json.dumps(line).encode() + b"\n"))})
    file_id = json.loads(await treq.content(response))["id"]
    response = await http.post(gw.url + "/v1/batches", headers=auth, data=json.dumps(
        {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}).encode())
    batch = json.loads(await treq.content(response))
    await gw.service.batch_runner.settled(batch["id"])
    response = await http.get(f"{gw.url}/v1/batches/{batch['id']}", headers=auth)
    assert json.loads(await treq.content(response))["request_counts"]["completed"] == 1
    for fake, provider_key, asked in ((vllm, PROVIDER_KEY, 14), (other, "sk-up", 3)):
        assert len(fake.forwarded()) >= asked
        for seen in fake.requests:
            assert key.encode() not in seen.uri, seen.uri
            assert all(key.encode() not in b"".join(values) for _, values in seen.headers.getAllRawHeaders()), seen.path
            assert seen.header(b"authorization") == f"Bearer {provider_key}" and seen.header(b"x-api-key") is None


@pytest_twisted.ensureDeferred
async def test_a_failed_responses_error_never_shows_the_upstreams_address(http, two):
    """A response object that failed names the upstream's address in its C{error} no more than a stream's failed
    response does: answered whole, read again (a background response refreshed from its instance) or cancelled, it
    shows the provider's name (before, the address as the instance wrote it), and so does a batch line's; its output
    is left as it is."""
    gw, vllm, other = two
    host = addresses(vllm)[2]
    error = {"code": "server_error", "message": f"engine at {host} died", "param": None}
    failed = {"id": "resp_failed1", "object": "response", "created_at": 1700000000, "status": "failed", "model": BARE,
              "output": [{"type": "message", "content": [{"type": "output_text", "text": f"ask {host}"}]}],
              "error": error, "usage": None}
    response, content = await call(http, gw, "/v1/responses", {"model": MODEL, "input": "hi", "fake_status": 200,
                                                               "fake_body": json.dumps(failed)})
    assert response.code == 200 and json.loads(content)["error"]["message"] == "engine at vllm died", content
    assert f"ask {host}".encode() in content
    response, content = await call(http, gw, "/v1/responses/resp_failed1", method="GET")  # (as stored)
    assert response.code == 200 and json.loads(content)["error"]["message"] == "engine at vllm died", content
    for path, method in (("", "GET"), ("/cancel", "POST")):
        response, content = await call(http, gw, "/v1/responses", {"model": MODEL, "input": "hi", "background": True})
        response_id = json.loads(content)["id"]
        vllm.stored_responses[response_id].update(status="failed", error=error)
        response, content = await call(http, gw, f"/v1/responses/{response_id}{path}", method=method)
        assert response.code == 200 and json.loads(content)["error"]["message"] == "engine at vllm died", content
        response, content = await call(http, gw, f"/v1/responses/{response_id}", method="GET")  # (as stored)
        assert response.code == 200 and shows_none(content, *addresses(vllm)[:3]), content
    # A batch's line answered so: its output line the same.
    line = {"custom_id": "1", "method": "POST", "url": "/v1/responses", "body": {
        "model": MODEL, "input": "hi", "fake_status": 200, "fake_body": json.dumps(dict(failed, id="resp_failed2"))}}
    response = await http.post(gw.url + "/v1/files", headers={"authorization": f"Bearer {MASTER}"},
                               data={"purpose": "batch"}, files={"file": ("in.jsonl", "application/jsonl", io.BytesIO(
                                   json.dumps(line).encode() + b"\n"))})
    response, content = await call(http, gw, "/v1/batches", {"input_file_id": json.loads(
        await treq.content(response))["id"], "endpoint": "/v1/responses", "completion_window": "24h"})
    batch_id = json.loads(content)["id"]
    await gw.service.batch_runner.settled(batch_id)
    response, content = await call(http, gw, f"/v1/batches/{batch_id}", method="GET")
    response, content = await call(http, gw, f"/v1/files/{json.loads(content)['output_file_id']}/content", method="GET")
    assert json.loads(content)["response"]["body"]["error"]["message"] == "engine at vllm died", content


@pytest_twisted.ensureDeferred
async def test_a_responses_answer_is_relayed_as_it_came_unless_its_error_names_the_upstream(http, two):
    """A response object answered whole, stored or not, reaches its client byte for byte where its C{error} is null
    (its output naming the upstream's address, its JSON spaced as the upstream wrote it); one whose error names the
    address, written with C{\\u} escapes or as it is, shows the provider's name there, and only there."""
    gw, vllm, other = two
    host = addresses(vllm)[2]
    fine = {"id": "resp_fine1", "object": "response", "created_at": 1700000000, "status": "completed", "model": BARE,
            "output": [{"type": "message", "content": [{"type": "output_text", "text": f"ask {host}"}]}],
            "error": None, "usage": None}
    escaped = "".join(f"\\u{ord(c):04x}" for c in host)
    for store in (True, False):
        written = json.dumps(dict(fine, id=f"resp_fine{store}"), indent=1)
        response, content = await call(http, gw, "/v1/responses", {"model": MODEL, "input": "hi", "store": store,
                                                                   "fake_status": 200, "fake_body": written})
        assert response.code == 200 and content == written.encode(), content
        for said in (host, escaped):
            failed = json.dumps(dict(fine, id=f"resp_failed{store}{len(said)}", status="failed", error={
                "code": "server_error", "message": "engine at HOST died", "param": None})).replace("HOST", said)
            response, content = await call(http, gw, "/v1/responses", {"model": MODEL, "input": "hi", "store": store,
                                                                       "fake_status": 200, "fake_body": failed})
            shown = json.loads(content)
            assert response.code == 200 and shown["error"]["message"] == "engine at vllm died", content
            assert shown["output"] == fine["output"], content


@pytest_twisted.ensureDeferred
async def test_a_doubled_v1_is_classed_as_the_route_it_reaches(http, two):
    """C{/p/vllm/v1/v1/chat/completions} reaches vLLM's C{/v1/chat/completions} (one C{v1/} goes, the other is
    the server's own): a managed key's body there carries its tenant's C{cache_salt}, as on C{/p/vllm/v1/...}
    (before, it went without: the key shared every tenant's prefix cache, and chose its own priority)."""
    gw, vllm, other = two
    key = await new_key(http, gw)
    body = {"model": BARE, "messages": [{"role": "user", "content": "hi"}], "cache_salt": "everyone"}
    salts = []
    for path in ("/p/vllm/v1/chat/completions", "/p/vllm/v1/v1/chat/completions", "/p/vllm/v1/v1/v1/chat/completions"):
        response, content = await call(http, gw, path, body, key=key)
        if response.code == 200:  # (a third v1/ is no route of vLLM's: 404)
            assert vllm.last_request().path == b"/v1/chat/completions", (path, content)
            salts.append(vllm.last_request().body.get("cache_salt"))
    assert salts[0] not in (None, "everyone") and salts == [salts[0]] * 2, salts


@pytest_twisted.ensureDeferred
async def test_the_passthrough_never_relays_a_key_written_raw_in_the_query(reactor, http, tmp_path):
    """A master key as C{openssl rand -base64} makes it (C{+}, C{/}, C{=}) written into the query as it is
    (C{curl "...?key=$KEY"}), its C{+} not encoded: the parameter is left out all the same (before, it was
    looked for only as a form decodes it, C{+} a space, and went upstream)."""
    fake = await start_fake(reactor)
    key = "Zm9v+YmFy/cXV4=="
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": key,
                                       "GOMODEL_DATA_DIR": str(tmp_path)})
    try:
        response, content = await call(http, gw, f"/p/vllm/tokenize?key={key}&x=1&k2=a{key}b",
                                       {"model": BARE, "prompt": "hi"}, key=key)
        assert response.code == 200, content
        assert fake.last_request().uri == b"/tokenize?x=1"
    finally:
        await stop_all(gw, fake)


# The shapes of an upstream's URL the gateway is configured with (a fake vLLM listening at each), and of the
# addresses its errors may echo: each must come to the client as the provider's name alone, on every route.
_CONFIGURED = {
    "an IPv4 address": ("127.0.0.1", lambda fake: fake.base_url),
    "a host name": ("127.0.0.1", lambda fake: f"http://localhost:{fake.port.getHost().port}/v1"),
    "an upper-case host name": ("127.0.0.1", lambda fake: f"http://LOCALHOST:{fake.port.getHost().port}"),
    "a mixed-case host name": ("127.0.0.1", lambda fake: f"http://LocalHost:{fake.port.getHost().port}/v1"),
    "an IPv6 literal": ("::1", lambda fake: fake.base_url),
    "a pool of two replicas": ("127.0.0.1", lambda fake: fake.base_url),  # (and a second fake, named)
}


def _echoed(fake):
    """(What an upstream's error may say of C{fake}'s address, what the client is to see instead) pairs."""
    port = fake.port.getHost().port
    host = fake.interface
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    named = f"[{host}]" if ":" in host else host
    return [
        (f"{fake.base_url}/chat/completions", "vllm/chat/completions"),
        (f"http://{named}:1/v1", "vllm"),  # (another port of its host)
        (f"localhost:{port}", "vllm"),  # (its loopback address by another name)
        (f"LOCALHOST:{port}", "vllm"),
        (f"lOcAlHoSt:{port}", "vllm"),  # (in a case neither configured nor all upper or lower)
        (f"[::1]:{port}", "vllm"),
        (f"127.0.0.1:{port}", "vllm"),
        (f"[::ffff:127.0.0.1]:{port}", "vllm"),  # (an IPv4-mapped IPv6 address)
        # (each other text Python's ipaddress reads as the same IPv6 address: in full without its zeros, in full,
        # compressed elsewhere, mixed-case hex, the mapped one in hex, with a zone)
        (f"[0:0:0:0:0:0:0:1]:{port}", "vllm"),
        (f"[0000:0000:0000:0000:0000:0000:0000:0001]:{port}", "vllm"),
        (f"[0:0::0:01]:{port}", "vllm"),
        (f"[::FFFF:7F00:1]:{port}", "vllm"),
        (f"[0:0:0:0:0:ffff:7f00:0001]:{port}", "vllm"),
        (f"http://[::1%25lo]:{port}/v1", "vllm"),
        ("::1%lo down", "vllm down"),
        (f"http://localhost.:{port}/v1", "vllm"),  # (the name with its root's trailing dot)
        (f"http://user:secret@{netloc}/v1", "vllm"),
        (urllib.parse.quote(fake.base_url, safe=""), "vllm"),  # (percent-encoded, as in a query)
        (f"url=http%3a%2f%2f{named}%3a{port}", "url=vllm"),
        (f"Cannot connect to host {netloc} ssl:default [Connect call failed ('{host}', {port})]",
         "Cannot connect to host vllm ssl:default [Connect call failed (vllm)]"),
    ]


@pytest.mark.parametrize("configured", list(_CONFIGURED))
@pytest_twisted.ensureDeferred
async def test_no_shape_of_the_upstreams_address_reaches_a_client(reactor, http, configured):
    """Whatever the shape of the upstream's configured URL, an error that names its address in any shape (another
    port of its host, its loopback address by another name, upper case, a trailing dot, with a user and password,
    percent-encoded, aiohttp's "Cannot connect to host") shows the client the provider's name alone: on chat, on
    Anthropic's Messages, through the passthrough, in a chat, Responses or Messages stream's error event and in a batch's error
    file. Before, only the configured URL,
    host and port, and host as written were replaced."""
    interface, url_of = _CONFIGURED[configured]
    fakes = [await start_fake(reactor, interface=interface)]
    if configured.startswith("a pool"):
        fakes.append(await start_fake(reactor, interface=interface))
    urls = [url_of(fakes[0])] + [f"http://localhost:{f.port.getHost().port}" for f in fakes[1:]]
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": ",".join(urls), "GOMODEL_MASTER_KEY": MASTER,
                                       "REPLICA_FAILURE_THRESHOLD": "100"})
    try:
        pairs = [pair for fake in fakes for pair in _echoed(fake)]
        said = " | ".join(s for s, _ in pairs)
        shown = " | ".join(e for _, e in pairs)
        error = json.dumps({"error": {"message": said, "type": "internal_error", "param": None, "code": 500}})
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        for path, body, model, status in (
                ("/v1/chat/completions", chat, MODEL, 500),
                ("/v1/messages", {"max_tokens": 5, **chat}, MODEL, 500),
                ("/p/vllm/v1/chat/completions", chat, BARE, 400)):
            response, content = await call(http, gw, path, dict(body, model=model, fake_status=status,
                                                                  fake_body=error))
            assert response.code == status, (path, content)
            assert json.loads(content)["error"]["message"] == shown, path
        response, content = await call(http, gw, "/v1/chat/completions", dict(chat, model=MODEL, stream=True, fake_sse=[
            error, "[DONE]"]))
        assert response.code == 200
        assert json.loads(content.split(b"data: ")[1])["error"]["message"] == shown, content
        # A passthrough stream's error event, in two reads (cut after its first bytes).
        split = json.dumps({"error": {"message": "é " + said, "type": "internal_error", "param": None, "code": 500}})
        response, content = await call(http, gw, "/p/vllm/v1/chat/completions", dict(
            chat, model=BARE, stream=True, fake_sse=[split, "[DONE]"], fake_split_utf8=True))
        assert response.code == 200
        assert json.loads(content.split(b"data: ")[1])["error"]["message"] == "é " + shown, content
        # A header naming it in any of those shapes stays upstream, on a model-routed route and the passthrough.
        named = {f"X-Said-{i}": s for i, (s, e) in enumerate(pairs) if s != e}
        for path, model in (("/v1/chat/completions", MODEL), ("/p/vllm/v1/chat/completions", BARE)):
            response, content = await call(http, gw, path, dict(chat, model=model, fake_headers=named))
            assert response.code == 200, content
            assert [n for n in named if response.headers.hasHeader(n)] == [], path
        response, content = await call(http, gw, "/v1/responses", {"model": MODEL, "input": "hi", "stream": True,
                                                                   "fake_events": [["error", json.dumps({
                                                                       "type": "error", "code": "server_error",
                                                                       "message": said, "param": None,
                                                                       "sequence_number": 0})]]})
        assert response.code == 200
        assert json.loads(content.split(b"data: ")[1].split(b"\n")[0])["message"] == shown, content
        response, content = await call(http, gw, "/v1/messages", dict(chat, model=MODEL, max_tokens=5, stream=True,
                                                                      fake_events=[["error", json.dumps({
                                                                          "type": "error", "error": {
                                                                              "type": "api_error", "message": said}})]]))
        assert response.code == 200
        assert json.loads(content.split(b"data: ")[-1].split(b"\n")[0])["error"]["message"] == shown, content
        line = {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions",
                "body": dict(chat, model=MODEL, fake_status=500, fake_body=error)}
        response = await http.post(gw.url + "/v1/files", headers={"authorization": f"Bearer {MASTER}"},
                                   data={"purpose": "batch"}, files={"file": ("in.jsonl", "application/jsonl",
                                                                               io.BytesIO(json.dumps(line).encode()))})
        response, content = await call(http, gw, "/v1/batches", {"input_file_id": json.loads(
            await treq.content(response))["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        batch_id = json.loads(content)["id"]
        await gw.service.batch_runner.settled(batch_id)
        response, content = await call(http, gw, f"/v1/batches/{batch_id}", method="GET")
        response, content = await call(http, gw, f"/v1/files/{json.loads(content)['error_file_id']}/content",
                                       method="GET")
        assert json.loads(content)["response"]["body"]["error"]["message"] == shown, content
    finally:
        await stop_all(gw, *fakes)


@pytest_twisted.ensureDeferred
async def test_no_log_holds_a_clients_key(http, two):
    """No log event (the access log's lines and fields, every other structured event, its text as written) holds a
    key a client sent: a managed key's, the master key, a wrong one, sent as C{Authorization}, C{x-api-key}, in the
    passthrough's headers and query, on a request that went out, one refused and one the upstream failed."""
    gw, vllm, other = two
    key = await new_key(http, gw)
    wrong = "sk-wrong-0123456789abcdef"
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        for sent, headers in ((key, None), (MASTER, None), (wrong, None), (key, {"x-api-key": key})):
            for body in (chat, dict(chat, stream=True), dict(chat, fake_status=500, fake_body="boom")):
                await call(http, gw, "/v1/chat/completions", body, key=sent, headers=headers)
            await call(http, gw, "/v1/messages", dict(chat, max_tokens=5), key=sent,
                       headers={"x-api-key": sent, "anthropic-version": "2023-06-01"})
            await call(http, gw, f"/p/vllm/tokenize?key={sent}&api_key={sent}", {"model": BARE, "prompt": "hi"},
                       key=sent, headers={"api-key": sent, "x-goog-api-key": sent, "cookie": f"s={sent}"})
            await call(http, gw, f"/p/vllm/nothing-here?key={sent}", method="GET", key=sent)
    finally:
        globalLogPublisher.removeObserver(events.append)
    access = [e for e in events if e.get("log_namespace") == "gomodel.access"]
    assert len(access) >= 24
    for event in events:
        text = formatEvent(event) + json.dumps({k: v for k, v in event.items() if not k.startswith("log_")},
                                               default=repr)
        for secret in (key, MASTER, wrong):
            assert secret not in text, (secret, event)


@pytest_twisted.ensureDeferred
async def test_a_passthrough_error_with_json_escapes_shows_the_provider_not_its_address(http, two):
    """A passthrough error (its body, a streamed error event) whose JSON writes the upstream's address with escapes
    (C{\\\\u0031...}) names it to the client that reads it: it is relayed naming the provider instead, as on the
    OpenAI routes. Before, it went byte for byte."""
    gw, vllm, other = two
    message = f"cannot reach {vllm.base_url}"
    escaped = '{"error":{"message":"' + "".join("\\u%04x" % ord(c) for c in message) + '","type":"x","param":null}}'
    response, content = await call(http, gw, "/p/vllm/v1/chat/completions", {
        "model": BARE, "messages": [], "fake_status": 400, "fake_body": escaped})
    assert response.code == 400
    assert json.loads(content)["error"]["message"] == "cannot reach vllm", content
    response, content = await call(http, gw, "/p/vllm/v1/chat/completions", {
        "model": BARE, "messages": [{"role": "user", "content": "hi"}], "stream": True, "fake_sse": [escaped, "[DONE]"]})
    assert response.code == 200
    assert json.loads(content.split(b"data: ")[1].split(b"\n")[0])["error"]["message"] == "cannot reach vllm", content


def test_a_pools_marks_find_each_host_as_written_and_nothing_less():
    """The pattern every relayed answer's headers go through finds a host as configured, in lower and upper case, an
    IPv6 one bracketed, in full or not, and its key; never a part of a host (C{fd00} of C{fd00::a})."""
    from gomodel.addresses import Secret, marks

    hide = ("http://[fd00::a]:8000/v1", "http://[fd00::a]:8000", "[fd00::a]:8000", "fd00::a", Secret("sk-0123456789"))
    found = marks(hide)
    for text in (b"1.1 [FD00::A]:8000", b"fd00:0000:0000:0000:0000:0000:0000:000a", b"key sk-0123456789"):
        assert found.search(text) is not None, text
    assert found.search(b"fd00:1::2") is None
    found = marks(("http://Gpu-A:8000/v1", "http://Gpu-A:8000", "Gpu-A:8000", "gpu-a"))
    assert all(found.search(b"http://%s:8000/x" % host) is not None for host in (b"Gpu-A", b"gpu-a", b"GPU-A"))


def test_every_text_of_an_ipv6_upstreams_address_is_hidden():
    """Every text Python's C{ipaddress} reads as an upstream's IPv6 address (compressed anywhere or not at all,
    groups with and without their leading zeros, hex in any case, the last 32 bits dotted, with a zone) is replaced
    by the provider's name and found by the pool's marks; another address is neither. Before, the address as
    configured and in full alone were: C{2001:db8:0:0:0:0:0:1} went out as it was."""
    import ipaddress

    from gomodel.addresses import marks, scrubbed

    for configured, texts in (
            ("2001:db8::1", ["2001:db8:0:0:0:0:0:1", "2001:0DB8:0000:0000:0000:0000:0000:0001", "2001:db8:0::0:1",
                             "2001:DB8::0:0:1", "2001:db8::0.0.0.1", "2001:db8:0:0:0:0:0.0.0.1", "2001:Db8::1%eth0"]),
            ("::ffff:10.0.0.5", ["::ffff:a00:5", "0:0:0:0:0:FFFF:0A00:0005", "::FFFF:10.0.0.5", "0::ffff:a00:5"]),
            ("fe80::1:2", ["fe80:0:0:0:0:0:1:2", "FE80::0001:0002", "fe80::0:1:2%25eth0"])):
        hide = (f"http://[{configured}]:8000/v1", f"[{configured}]:8000", configured)
        found = marks(hide)
        for text in texts:
            assert ipaddress.ip_address(text.partition("%")[0]) == ipaddress.ip_address(configured)
            for said in (f"at http://[{text}]:8000/v1/x", f"connect {text} refused", f"[{text}]:9"):
                assert scrubbed(said, hide, "vllm") in ("at vllm/x", "connect vllm refused", "vllm"), said
                assert found.search(said.encode()) is not None, said
        for other in ("2001:db8::1:2", "2001:db8::2", "fe80::1:3", "::ffff:10.0.0.50"):
            if ipaddress.ip_address(other) != ipaddress.ip_address(configured):
                assert scrubbed(f"connect {other} refused", hide, "vllm") == f"connect {other} refused"


def test_a_loopback_upstreams_scrub_pattern_names_each_host_once():
    """The error path's pattern for a loopback upstream (hidden under every name of the loopback host, each IPv6 one
    in every form) holds each host once, its IPv6 forms one trie: before, eight copies of them made it compile in
    tens of milliseconds on the reactor at a process's first upstream error. It still finds every shape."""
    from gomodel.addresses import scrubbed, scrubber

    hide = ("http://127.0.0.1:8000/v1", "127.0.0.1:8000", "127.0.0.1")
    source = scrubber(hide)[0].pattern
    assert source.count("localhost") == 1 and source.count("(?P<b>") == 1, source
    for said, shown in (("('::ffff:127.0.0.1', 8000)", "(vllm)"), ("(\"localhost\", 8000)", "(vllm)"),
                        ("at http://user:pw@LOCALHOST.:8000/v1/x", "at vllm/x"), ("[::1]:8000 refused", "vllm refused"),
                        ("0:0:0:0:0:0:0:1 refused", "vllm refused"), ("http%3A%2F%2F%5B%3A%3A1%5D%3A8000", "vllm"),
                        ("('::1', 8000, 0, 0)", "(vllm, 0, 0)"), ("::1x and 1::1 stay", "::1x and 1::1 stay")):
        assert scrubbed(said, hide, "vllm") == shown, said


def test_a_pools_marks_find_a_host_in_any_case():
    """The pattern every relayed answer's headers go through finds a host named in any case, not only as
    configured, in lower or in upper case (C{vLLM-a.Internal} of C{Vllm-A.internal}); a key as it is alone."""
    from gomodel.addresses import Secret, marks

    found = marks(("http://Vllm-A.internal:8000/v1", "Vllm-A.internal:8000", "Vllm-A.internal", Secret("sk-AbC1")))
    for text in (b"http://vLLM-a.Internal:8000/x", b"1.1 VLLM-A.INTERNAL", b"vllm-a.internal", b"key sk-AbC1"):
        assert found.search(text) is not None, text
    assert found.search(b"key sk-abc1 vllm-b.internal") is None


@implementer(IHostnameResolver)
class _Names:
    """A name resolver that resolves C{names} (host name -> IPv4 address) itself, as the DNS naming the upstreams
    would, and hands any other name to C{fallback}."""

    def __init__(self, names, fallback):
        self._names = names
        self._fallback = fallback

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        address = self._names.get(hostName)
        if address is None:
            return self._fallback.resolveHostName(receiver, hostName, portNumber, addressTypes, transportSemantics)
        receiver.resolutionBegan(_Resolution(hostName))
        for one in [address] if isinstance(address, str) else address:  # (a name may resolve to several)
            receiver.addressResolved(IPv4Address("TCP", one, portNumber))
        receiver.resolutionComplete()
        return receiver


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name):
        self.name = name

    def cancel(self):
        pass


@pytest_twisted.ensureDeferred
async def test_the_address_an_upstreams_name_resolved_to_is_hidden_too(reactor, http):
    """An upstream configured by a name that resolves to an address the gateway was never given: once a connection
    to it reached that address, an error or a header naming it (as the server knows itself: its address, not the
    name the gateway resolved) shows the provider's name, on a model-routed route and through the passthrough.
    Before, the name alone was hidden: C{127.0.0.1:PORT} behind C{http://gpu-a.test:PORT} went out as it came."""
    fake = await start_fake(reactor)
    port = fake.port.getHost().port
    previous = reactor.installNameResolver(_Names({"gpu-a.test": "127.0.0.1"}, reactor.nameResolver))
    gw = None
    try:
        gw = await start_gateway(reactor, {"VLLM_BASE_URL": f"http://gpu-a.test:{port}/v1",
                                           "GOMODEL_MASTER_KEY": MASTER, "REPLICA_FAILURE_THRESHOLD": "100"})
        said = f"engine at 127.0.0.1:{port} failed | http://[::ffff:7f00:1]:{port}/v1 | localhost:{port}"
        error = json.dumps({"error": {"message": said, "type": "internal_error", "param": None, "code": 500}})
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        for path, model in (("/v1/chat/completions", MODEL), ("/p/vllm/v1/chat/completions", BARE)):
            response, content = await call(http, gw, path, dict(chat, model=model, fake_status=500, fake_body=error))
            assert response.code == 500, content
            assert json.loads(content)["error"]["message"] == "engine at vllm failed | vllm | vllm", (path, content)
            response, content = await call(http, gw, path, dict(chat, model=model, fake_headers={
                "Via": f"1.1 127.0.0.1:{port}", "X-Kept": "as-is"}))
            assert response.code == 200, content
            assert not response.headers.hasHeader("via") and response.headers.getRawHeaders("x-kept") == ["as-is"]
    finally:
        reactor.installNameResolver(previous)
        if gw is not None:
            await gw.service.stopService()
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_a_passthrough_streams_ordinary_event_naming_the_upstream_shows_the_provider(http, two):
    """An ordinary event of a passthrough stream (no error: a chunk, a Responses event) that names the upstream's
    address or quotes its key is relayed with the provider's name (and C{***}) in their place, in whatever shape it
    is written (with C{\\\\u} escapes too, in an event that names it otherwise), the model's words in it as they are;
    every event that names neither byte for byte. Before, only an error event was rewritten: a chunk's
    C{system_fingerprint} naming the upstream went out as it came."""
    gw, vllm, other = two
    hidden = addresses(vllm)
    port = hidden[3]

    def chunk(content, fingerprint="fp"):
        return json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": BARE,
                           "system_fingerprint": fingerprint,
                           "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]})

    clean = chunk("h\u00e9llo")
    named = chunk(f"see {hidden[2]}", f"{vllm.base_url} | LOCALHOST:{port} | {PROVIDER_KEY}")
    # (one naming it as written and with escapes: both rewritten; escapes alone are no mark, as in a model's words)
    escaped = chunk("y", f"{hidden[2]} | " + "".join("\\u%04x" % ord(c) for c in "127.0.0.1:") + port).replace(
        "\\\\", "\\")
    response, content = await call(http, gw, "/p/vllm/v1/chat/completions", {
        "model": BARE, "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "fake_sse": [clean, named, escaped, "[DONE]"]})
    assert response.code == 200, content
    events = [e for e in content.split(b"\n\n") if e.strip()]
    assert events[0] == b"data: " + clean.encode(), events  # (byte for byte)
    shown = [json.loads(e[len(b"data: "):]) for e in events[1:3]]
    assert [e["system_fingerprint"] for e in shown] == ["vllm | vllm | ***", "vllm | vllm"], events
    assert shown[0]["choices"][0]["delta"]["content"] == f"see {hidden[2]}"  # (the model's words as they are)
    assert shows_none(b"".join(events[2:]), *hidden[:3], f"127.0.0.1:{port}") and PROVIDER_KEY.encode() not in content
    assert events[3] == b"data: [DONE]"
    # A Responses stream's ordinary event the same way.
    created = {"type": "response.created", "sequence_number": 0, "response": {
        "id": "resp_named1", "object": "response", "created_at": 1, "status": "in_progress", "model": BARE,
        "output": [], "error": None, "metadata": {"served_by": f"{vllm.root_url}/v1"}}}
    response, content = await call(http, gw, "/p/vllm/v1/responses", {
        "model": BARE, "input": "hi", "stream": True,
        "fake_events": [["response.created", json.dumps(created)], ["response.completed", json.dumps(dict(
            created, type="response.completed", sequence_number=1, response=dict(created["response"],
                                                                                   status="completed")))]]})
    assert response.code == 200, content
    assert shows_none(content, *hidden[:3]), content
    assert content.replace(b" ", b"").count(b'"served_by":"vllm"') == 2, content


@pytest_twisted.ensureDeferred
async def test_every_address_an_upstreams_name_resolves_to_is_hidden(reactor, http):
    """An upstream configured by a name that resolves to several addresses: each is hidden, the one no connection of
    the gateway's reached too (another replica behind the same name, a server naming its other interface), on a
    model-routed route and through the passthrough. Before, only an address a connection reached was:
    C{10.255.0.9:PORT} behind C{http://gpu-a.test:PORT} went out as it came."""
    fake = await start_fake(reactor)
    port = fake.port.getHost().port
    previous = reactor.installNameResolver(_Names({"gpu-a.test": ["127.0.0.1", "10.255.0.9"]}, reactor.nameResolver))
    gw = None
    try:
        gw = await start_gateway(reactor, {"VLLM_BASE_URL": f"http://gpu-a.test:{port}/v1",
                                           "GOMODEL_MASTER_KEY": MASTER, "REPLICA_FAILURE_THRESHOLD": "100"})
        said = f"peer 10.255.0.9:{port} failed | http://[::ffff:10.255.0.9]:{port}/v1 | 10.255.0.90 kept"
        error = json.dumps({"error": {"message": said, "type": "internal_error", "param": None, "code": 500}})
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        for path, model in (("/v1/chat/completions", MODEL), ("/p/vllm/v1/chat/completions", BARE)):
            response, content = await call(http, gw, path, dict(chat, model=model, fake_status=500, fake_body=error))
            assert response.code == 500, content
            assert json.loads(content)["error"]["message"] == "peer vllm failed | vllm | 10.255.0.90 kept", (
                path, content)
    finally:
        reactor.installNameResolver(previous)
        if gw is not None:
            await gw.service.stopService()
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_an_upstreams_retry_after_that_is_no_wait_is_not_relayed(http, two):
    """An upstream error's C{Retry-After} goes to the client only where it is one (seconds, an HTTP date): one
    holding anything else (the upstream's address, its key) stays upstream, as every other header naming them does.
    Before, its value went out as it came."""
    gw, vllm, other = two
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    overloaded = json.dumps({"error": {"message": "overloaded", "type": "x", "param": None, "code": 503}})
    for path, body in (("/v1/chat/completions", chat),):
        for sent, shown in ((f"{vllm.base_url} {PROVIDER_KEY}", None), ("7", ["7"]),
                            ("Wed, 21 Oct 2099 07:28:00 GMT", ["Wed, 21 Oct 2099 07:28:00 GMT"])):
            response, content = await call(http, gw, path, dict(body, fake_status=503, fake_body=overloaded,
                                                                 fake_headers={"Retry-After": sent}))
            assert response.code == 503, content
            assert response.headers.getRawHeaders("retry-after") == shown, (path, sent)


@pytest_twisted.ensureDeferred
async def test_a_compressed_passthrough_error_shows_the_provider_not_its_address(http, two):
    """A passthrough error an upstream compressed though the gateway asked for none (a proxy in front of it that
    gzips anyway) is relayed uncompressed, without the upstream's address or key, as an uncompressed one is; one in
    a coding the gateway cannot read is the gateway's envelope saying the status. Before, it went compressed as it
    came: the client's decoder showed the address."""
    import gzip
    import zlib
    gw, vllm, other = two
    said = json.dumps({"error": {"message": f"at {vllm.base_url} with {PROVIDER_KEY}", "type": "x", "param": None,
                                 "code": 500}}).encode()

    def raw(coding, body):
        return (f"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Encoding: {coding}"
                f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    for coding, body in (("gzip", gzip.compress(said)), ("deflate", zlib.compress(said))):
        response, content = await call(http, gw, "/p/vllm/v1/chat/completions", {
            "model": BARE, "messages": [], "fake_raw": raw(coding, body).decode("latin-1"), "fake_raw_latin1": True})
        assert response.code == 500, content
        assert response.headers.getRawHeaders("content-encoding") in (None, [""]), coding  # (treq's, once read)
        assert json.loads(content)["error"]["message"] == "at vllm with ***", (coding, content)
    response, content = await call(http, gw, "/p/vllm/v1/chat/completions", {
        "model": BARE, "messages": [], "fake_raw": raw("br", b"\x0b\x02\x80" + said).decode("latin-1"),
        "fake_raw_latin1": True})
    assert response.code == 500 and response.headers.getRawHeaders("content-encoding") in (None, [""])
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert json.loads(content)["error"]["message"] == "The upstream provider 'vllm' answered HTTP 500.", content


def test_an_upstreams_base_path_alone_is_hidden_too():
    """An upstream's error that names its base path without its host (OpenAI's "Invalid URL (POST /v1/...)" from a
    server behind a proxy's prefix, a proxy's own 404 page) shows the provider's name in its place, in the message
    the client gets and in a passthrough's relayed body; a path no different from any provider's (C{/v1}), another
    host's, or a longer name are left as they are. Before, only a path after the host was."""
    from gomodel.upstream.errors import hidden_in, upstream_error

    class Pool:
        name = "other"
        hidden = ("http://10.0.0.5:8000/tenant-a/v1", "http://10.0.0.5:8000/tenant-a", "10.0.0.5:8000", "10.0.0.5")

    kept = " | /v1/chat/completions | http://elsewhere/tenant-a/v1 | /tenant-ab/v1 | x/tenant-a"
    body = json.dumps({"error": {"message": "Invalid URL (POST /tenant-a/v1/chat/completions)" + kept,
                                 "type": "invalid_request_error", "param": None, "code": None}}).encode()
    error = upstream_error(404, body, Pool.name, Pool.hidden)
    assert error.message == "Invalid URL (POST other/chat/completions)" + kept
    page = b"<p>The requested URL /tenant-a/v1/x was not found; see \"/tenant-a/docs\" or \\/tenant-a\\/v1.</p>"
    assert hidden_in(page, Pool) == b"<p>The requested URL other/x was not found; see \"other/docs\" or other.</p>"


def test_an_error_answered_as_an_event_stream_keeps_every_rule_of_a_json_one():
    """An upstream's error answer whose body is an event stream (its error the first event's data) is read as that
    data: its key and address hidden, its 429 C{insufficient_quota} a spent quota, its 401 for a missing scope
    told as one; an event stream with no JSON in its first event is the gateway's own words."""
    from gomodel.addresses import Secret
    from gomodel.errors import UpstreamAuthFailed, UpstreamQuotaExhausted
    from gomodel.upstream.errors import lacks_scope, out_of_quota, upstream_error

    hide = ("http://10.0.0.5:8000/v1", "10.0.0.5:8000", "10.0.0.5", Secret("sk-0123456789"))

    def stream(message, code=None, kind="BadRequestError"):
        error = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return b"event: error\r\ndata: " + json.dumps(error).encode() + b"\r\n\r\ndata: [DONE]\r\n\r\n"

    error = upstream_error(400, stream("key sk-0123456789 at 10.0.0.5:8000 refused it", 400), "up", hide)
    assert error.message == "key *** at up refused it" and error.status == 400
    assert json.loads(error.body())["error"] == {"message": "key *** at up refused it", "type": "BadRequestError",
                                                 "param": None, "code": 400}
    plain = stream("max_tokens is too large")
    error = upstream_error(400, plain, "up", hide)
    assert error.body() == plain.split(b"data: ")[1].split(b"\r\n")[0]  # (the event's data, byte for byte)
    quota = stream("You exceeded your current quota", "insufficient_quota", "insufficient_quota")
    assert out_of_quota(429, quota)
    assert isinstance(upstream_error(429, quota, "up", hide), UpstreamQuotaExhausted)
    scope = stream("You have insufficient permissions for this operation. Missing scopes: model.request")
    assert lacks_scope(401, scope)
    error = upstream_error(401, scope, "up", hide)
    assert isinstance(error, UpstreamAuthFailed) and "Missing scopes: model.request" in error.message
    assert upstream_error(500, b"data: nothing\n\n", "up", hide).message == "The upstream provider 'up' answered HTTP 500."
    assert upstream_error(500, b": ping\n\n", "up", hide).message == "The upstream provider 'up' answered HTTP 500."


@pytest_twisted.ensureDeferred
async def test_a_passthrough_error_too_large_to_search_is_not_relayed(http, two):
    """A passthrough error whose body is larger than the gateway searches (1 MiB), its length said in its head, is
    the gateway's 502 C{response_too_large}, as one of unknown length already was: never relayed unsearched.
    Before, it went as it came, the upstream's address with it."""
    gw, vllm, other = two
    body = f"<h1>{vllm.base_url} failed</h1>" + "x" * (1024 * 1024)
    response, content = await call(http, gw, "/p/vllm/v1/chat/completions", {
        "model": BARE, "messages": [], "fake_raw": "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/html\r\n"
                                                   f"Content-Length: {len(body)}\r\n\r\n{body}"})
    assert response.code == 502, content[:200]
    assert json.loads(content)["error"]["code"] == "response_too_large"
    assert shows_none(content, *addresses(vllm))


@pytest_twisted.ensureDeferred
async def test_the_model_list_names_no_file_of_the_upstreams_host(reactor, http, tmp_path):
    """A vLLM's model objects name where its weights and a LoRA adapter lie on its host (C{root}) and a LoRA's base
    model by its upstream id (C{parent}): on C{/v1/models} and C{/v1/models/{id}} (any key, OpenAI's shape and
    Anthropic's) C{root} is the model's id, C{parent} its base model's qualified id, C{max_model_len} kept; the
    operator's C{/admin/api/v1/models} keeps the upstream's object. Before, every key was told the paths."""
    vllm = await start_fake(reactor)
    vllm.loras["sql-lora"] = ("/mnt/adapters/sql-lora", BARE)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": vllm.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                       "GOMODEL_DATA_DIR": str(tmp_path)})
    try:
        managed = await new_key(http, gw, models=[MODEL, "vllm/sql-lora"])
        paths = ("/models/", "/mnt/adapters")
        for key in (MASTER, managed):
            client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=10)
            try:
                page = await in_thread(client.models.list)
                lora = await in_thread(client.models.retrieve, "vllm/sql-lora")
                base = await in_thread(client.models.retrieve, BARE)
            finally:
                client.close()
            models = {m.id: m.model_extra for m in page.data}
            assert models == {MODEL: {"root": MODEL, "parent": None, "max_model_len": 2048, "permission": []},
                              "vllm/sql-lora": {"root": "vllm/sql-lora", "parent": MODEL, "max_model_len": None,
                                                "permission": []}}
            assert (lora.model_extra["root"], lora.model_extra["parent"]) == ("vllm/sql-lora", MODEL)
            assert (base.id, base.model_extra["root"], base.model_extra["max_model_len"]) == (MODEL, MODEL, 2048)
            response, content = await call(http, gw, "/v1/models", key=key, method="GET",
                                           headers={"anthropic-version": "2023-06-01"})
            assert response.code == 200 and shows_none(content, *paths), content
        response, content = await call(http, gw, "/admin/api/v1/models", method="GET")
        assert {m["id"]: m["model"]["root"] for m in json.loads(content)["data"]} == {
            MODEL: "/models/" + BARE, "vllm/sql-lora": "/mnt/adapters/sql-lora"}
    finally:
        await stop_all(gw, vllm)


@pytest_twisted.ensureDeferred
async def test_a_model_a_vllm_lists_by_its_path_is_known_by_the_paths_last_part(reactor, http, tmp_path):
    """A vLLM started with C{--model /srv/models/X} and no C{--served-model-name} lists the path as the model's id
    (and a LoRA's base): C{/v1/models} lists it by the path's last part (C{vllm/X}, its LoRA's C{parent} too),
    for any key; a chat, a Messages and a Responses request by that name (qualified or bare) or by the path reaches
    the vLLM with the path, for a key allowed the listed name; its answers, whole and streamed (chat's chunks,
    Messages' and Responses' events, native or made of a chat answer), name it by that name (vLLM echoes the path).
    Before, every key was told the path, and a client had to send it."""
    path = "/srv/models/" + BARE.split("/")[1]
    public = "vllm/" + BARE.split("/")[1]
    vllm = await start_fake(reactor, models=[path])
    vllm.loras["sql-lora"] = ("/mnt/adapters/sql-lora", path)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": vllm.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                       "GOMODEL_DATA_DIR": str(tmp_path)})
    try:
        managed = await new_key(http, gw, models=[public, "vllm/sql-lora"])
        for key in (MASTER, managed):
            response, content = await call(http, gw, "/v1/models", key=key, method="GET")
            assert response.code == 200 and shows_none(content, "/srv", "/mnt"), content
            assert [(m["id"], m["root"], m["parent"]) for m in json.loads(content)["data"]] == [
                (public, public, None), ("vllm/sql-lora", "vllm/sql-lora", public)]
            response, content = await call(http, gw, "/v1/models/" + public, key=key, method="GET")
            assert response.code == 200 and json.loads(content)["id"] == public, content
        for key, model in ((managed, public), (managed, BARE.split("/")[1]), (MASTER, path)):
            for route, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                                ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
                                ("/v1/responses", {"input": "hi"})):
                response, content = await call(http, gw, route, dict(body, model=model), key=key)
                assert response.code == 200 and shows_none(content, "/srv"), (route, model, content)
                assert vllm.last_request().body["model"] == path, (route, model)
                response, content = await call(http, gw, route, dict(body, model=model, stream=True), key=key)
                assert response.code == 200 and shows_none(content, "/srv"), (route, model, content)
                assert f'"model":"{public[5:]}"'.encode() in content.replace(b": ", b":"), (route, model, content)
    finally:
        await stop_all(gw, vllm)


def raw_answer(body: bytes, *head) -> bytes:
    """A whole HTTP answer, 200 JSON, of C{body} (its length said), with the C{head} lines."""
    lines = [b"HTTP/1.1 200 OK", b"Content-Type: application/json", b"Content-Length: %d" % len(body), *head]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@pytest_twisted.ensureDeferred
async def test_a_passthrough_success_names_no_upstream_but_in_the_models_words(http, two):
    """A passthrough's 2xx JSON answer (up to 1 MiB) is searched as an error is: a string naming the upstream's
    address outside the model's words (a prefill vLLM's C{kv_transfer_params} naming its engine's host, a
    C{system_fingerprint}, C{kv_event_sources}' publishers) has the provider's name in its place, compressed or not;
    the model's words are byte for byte; one naming none goes as it came. Before, every 2xx answer but a Responses
    object went unsearched."""
    import gzip
    gw, vllm, other = two
    hidden = addresses(vllm)
    said = f"the docs at {vllm.base_url} ({hidden[2]})"
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": BARE,
              "system_fingerprint": vllm.root_url, "choices": [
                  {"index": 0, "message": {"role": "assistant", "content": said}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
              "kv_transfer_params": {"do_remote_prefill": True, "remote_engine_id": "e0", "remote_host": "127.0.0.1",
                                     "remote_port": 5600, "remote_block_ids": [1, 2]}}
    plain = json.dumps(answer).encode()
    for raw in (raw_answer(plain), raw_answer(gzip.compress(plain), b"Content-Encoding: gzip")):
        vllm.raw[b"/v1/chat/completions"] = (raw, False)
        response, content = await call(http, gw, "/p/vllm/v1/chat/completions", {"model": BARE, "messages": []})
        assert response.code == 200 and response.headers.getRawHeaders("content-encoding") in (None, [""]), content
        shown = json.loads(content)
        assert shown["choices"] == answer["choices"] and json.dumps(said).encode() in content
        assert (shown["system_fingerprint"], shown["kv_transfer_params"]["remote_host"]) == ("vllm", "vllm")
        assert dict(shown, choices=None, system_fingerprint=None, kv_transfer_params=None) == dict(
            answer, choices=None, system_fingerprint=None, kv_transfer_params=None)
    clean = json.dumps(dict(answer, system_fingerprint=None, kv_transfer_params=None)).encode()
    vllm.raw[b"/v1/chat/completions"] = (raw_answer(clean), False)
    response, content = await call(http, gw, "/p/vllm/v1/chat/completions", {"model": BARE, "messages": []})
    assert response.code == 200 and content == clean  # (the words naming it: byte for byte)

    sources = json.dumps({"0": {"publisher": "zmq", "endpoint": f"tcp://{hidden[2]}",
                                "replay_endpoint": "tcp://127.0.0.1:5558"}}).encode()
    vllm.raw[b"/kv_event_sources"] = (raw_answer(sources), False)
    response, content = await call(http, gw, "/p/vllm/kv_event_sources", method="GET")
    assert response.code == 200 and json.loads(content) == {"0": {
        "publisher": "zmq", "endpoint": "vllm", "replay_endpoint": "vllm"}}  # (a URL: the name in its place)


@pytest_twisted.ensureDeferred
async def test_a_translated_answer_carries_no_kv_transfer_params(reactor, http, tmp_path):
    """A Messages answer the gateway makes of a chat completion, and a Responses object it makes of one, whole and
    streamed, carry none of the chat answer's C{kv_transfer_params} (a prefill engine's id, host and port, naming
    no address of the configured upstream: no search for it would find one): they are made of the answer's words
    and usage alone."""
    vllm = await start_fake(reactor, responses=False, messages=False)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": vllm.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                       "GOMODEL_DATA_DIR": str(tmp_path)})
    kv = {"do_remote_decode": False, "remote_engine_id": "prefill-7", "remote_host": "10.9.8.7", "remote_port": 5600,
          "remote_block_ids": [4, 5]}
    said = ("remote_engine_id", "prefill-7", "10.9.8.7", "5600", "kv_transfer_params")
    chat = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": BARE, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, "kv_transfer_params": kv}
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": BARE}
    sse = [json.dumps(dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant", "content": "hi"},
                                            "finish_reason": None}])),
           json.dumps(dict(chunk, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}], kv_transfer_params=kv)),
           json.dumps(dict(chunk, choices=[], usage=chat["usage"], kv_transfer_params=kv)), "[DONE]"]
    try:
        for stream in (False, True):
            if stream:
                vllm.raw.clear()
                vllm.steer = {"fake_sse": sse}
            else:
                vllm.raw[b"/v1/chat/completions"] = (raw_answer(json.dumps(chat).encode()), False)
            for path, body in (("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
                               ("/v1/responses", {"input": "hi"})):
                response, content = await call(http, gw, path, dict(body, model=MODEL, stream=stream))
                assert response.code == 200 and b"hi" in content, (path, stream, content)
                assert vllm.last_request().path == b"/v1/chat/completions", (path, stream)
                assert shows_none(content, *said), (path, stream, content)
    finally:
        await stop_all(gw, vllm)


@pytest_twisted.ensureDeferred
async def test_a_passthrough_model_list_names_no_file_of_the_upstreams_host(http, two):
    """C{/p/vllm/v1/models}, vLLM's own list, has each model's C{root} its id, as C{/v1/models} does (its
    C{parent}, a LoRA's base by its id at that vLLM, as it came), for any key. Before, the weights' paths."""
    gw, vllm, other = two
    vllm.loras["sql-lora"] = ("/mnt/adapters/sql-lora", BARE)
    managed = await new_key(http, gw, models=[MODEL])
    for key in (MASTER, managed):
        response, content = await call(http, gw, "/p/vllm/v1/models", key=key, method="GET")
        assert response.code == 200, content
        assert [(m["id"], m["root"], m["parent"], m["max_model_len"]) for m in json.loads(content)["data"]] == [
            (BARE, BARE, None, 2048), ("sql-lora", "sql-lora", BARE, None)]


@pytest_twisted.ensureDeferred
async def test_a_passthrough_tokenizer_info_names_no_file_of_the_upstreams_host(http, two):
    """C{/p/vllm/tokenizer_info} (vLLM's tokenizer's C{init_kwargs}, which any key reaches) is without
    C{name_or_path} (the weights' directory) and each C{..._file} on the vLLM's host, its other members as they
    came. Before, every key was told those paths."""
    gw, vllm, other = two
    kept = {"add_bos_token": True, "bos_token": "<|begin_of_text|>", "model_max_length": 131072,
            "clean_up_tokenization_spaces": True, "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"}
    info = dict(kept, name_or_path="/models/" + BARE, tokenizer_file=f"/models/{BARE}/tokenizer.json",
                special_tokens_map_file=f"/models/{BARE}/special_tokens_map.json")
    vllm.raw[b"/tokenizer_info"] = (raw_answer(json.dumps(info).encode()), False)
    managed = await new_key(http, gw, models=[MODEL])
    for key in (MASTER, managed):
        response, content = await call(http, gw, "/p/vllm/tokenizer_info", key=key, method="GET")
        assert response.code == 200 and json.loads(content) == kept, content


@pytest_twisted.async_yield_fixture()
async def pathed(reactor, tmp_path):
    """A gateway before a vLLM that lists its model by a path (C{--model /srv/models/X}, no
    C{--served-model-name}), and before one that has no Responses API (its responses made of chat completions):
    the gateway, the two fakes, and the model's public name at each."""
    path = "/srv/models/" + BARE.split("/")[1]
    vllm, chat = await start_fake(reactor, models=[path]), await start_fake(reactor, models=[path], responses=False)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": vllm.base_url, "VLLM_CHAT_BASE_URL": chat.base_url,
                                       "GOMODEL_MASTER_KEY": MASTER, "GOMODEL_DATA_DIR": str(tmp_path)})
    yield gw, vllm, chat, ("vllm/" + BARE.split("/")[1], "vllm-chat/" + BARE.split("/")[1])
    await stop_all(gw, vllm, chat)


@pytest_twisted.ensureDeferred
async def test_a_stored_response_of_a_model_listed_by_a_path_names_it_by_its_listed_name(http, pathed):
    """A response the gateway keeps of a model its vLLM lists by a path names it as its create's answer did, by its
    listed name, when read back (C{GET /v1/responses/{id}}, its input items, a background one refreshed from its
    instance, its events replayed with C{stream=true}, its cancel's answer), made natively or of a chat completion, whole, streamed or
    in the background. Before, the response was kept as vLLM named it, by its path."""
    gw, vllm, chat, publics = pathed
    created = []
    for public in publics:
        for extra in ({}, {"stream": True}, {"background": True}, {"background": True, "stream": True}):
            if public.startswith("vllm-chat/") and extra.get("background"):
                continue  # (a background response needs a Responses API)
            response, content = await call(http, gw, "/v1/responses", dict(extra, model=public, input="hi"))
            assert response.code == 200 and shows_none(content, "/srv"), (public, extra, content)
            ids = [json.loads(line[len(b"data: "):])["response"]["id"] for line in content.split(b"\n")
                   if line.startswith(b"data: ") and b'"response.created"' in line] if extra.get("stream") else [
                json.loads(content)["id"]]
            created.append((public, extra, ids[0]))
    for public, extra, response_id in created:
        for suffix in ("", "/input_items") + (("?stream=true",) if extra == {"background": True, "stream": True}
                                              else ()):
            response, content = await call(http, gw, f"/v1/responses/{response_id}{suffix}", method="GET")
            assert response.code == 200 and shows_none(content, "/srv"), (public, extra, suffix, content)
            if not suffix:
                assert json.loads(content)["model"] == public.split("/", 1)[1], (public, extra, content)
            if suffix == "?stream=true":
                assert f'"model":"{public.split("/", 1)[1]}"'.encode() in content.replace(b": ", b":"), content
        if extra == {"background": True}:
            response, content = await call(http, gw, f"/v1/responses/{response_id}/cancel")
            assert response.code == 200 and json.loads(content)["model"] == public.split("/", 1)[1], content


@pytest_twisted.ensureDeferred
async def test_an_upstream_error_naming_a_models_path_names_it_as_it_is_listed(http, pathed):
    """vLLM's own error naming the model it was sent (a model it lists by a path: C{The model `/srv/models/X` does
    not exist.}) reaches the client with the path written as the model's listed name, in each route's dialect
    (a stream asked for too; a passthrough's too), escaped as JSON may write it too, as an address is hidden. Before, the
    path went to the client as vLLM wrote it."""
    gw, vllm, _, publics = pathed
    path, shown = "/srv/models/" + BARE.split("/")[1], BARE.split("/")[1]
    for written in (path, path.replace("/", "\\/")):
        said = json.dumps({"error": {"message": "The model `" + path + "` does not exist.", "type": "NotFoundError",
                                     "param": "model", "code": 404}}).replace(path, written)
        for route, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                            ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
                            ("/v1/responses", {"input": "hi"}),
                            ("/p/vllm/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            for stream in (False, True):
                vllm.steer = {"fake_status": 404, "fake_body": said}
                response, content = await call(http, gw, route, dict(body, model=publics[0], stream=stream))
                assert response.code == 404 and shows_none(content, "/srv", "\\/srv"), (route, written, content)
                assert f"The model `{shown}` does not exist.".encode() in content, (route, written, content)
    vllm.steer = {}
    for stream in (False, True):  # (a passthrough's answer is searched as for an address: the path is hidden there)
        response, content = await call(http, gw, "/p/vllm/v1/chat/completions", {
            "model": path, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
        assert response.code == 200 and shows_none(content, "/srv"), content
        assert f'"model":"{shown}"'.encode() in content, content


@pytest_twisted.ensureDeferred
async def test_a_managed_keys_answers_carry_no_transfer_params_where_its_requests_go_without(reactor, http, tmp_path):
    """A managed key's request to a vLLM goes without C{kv_transfer_params} and C{ec_transfer_params} (salted, the
    key not allowed its own salt: L{gomodel.auth.tenancy.CacheSalts.apply}); its answer goes without them too (a
    prefill vLLM's names its engine's id, host and port): a chat completion, a native Messages answer and a native
    Responses object, whole and streamed (and kept: read back), the rest of the answer as it came. The master key's, and those of a key
    allowed its own salt, keep them (their requests do). Before, every answer carried them as vLLM sent them."""
    vllm = await start_fake(reactor)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": vllm.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                       "GOMODEL_DATA_DIR": str(tmp_path)})
    kv = {"do_remote_decode": False, "remote_engine_id": "prefill-7", "remote_host": "10.9.8.7", "remote_port": 5600}
    ec = {"remote_engine_id": "encoder-3"}
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    chat = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": BARE, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "kv_transfer_params: mine"}, "finish_reason": "stop"}],
        "usage": usage, "kv_transfer_params": kv, "ec_transfer_params": ec}
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": BARE}
    sse = [json.dumps(dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant", "content": "hi"},
                                            "finish_reason": None}])),
           json.dumps(dict(chunk, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}], kv_transfer_params=kv)),
           json.dumps(dict(chunk, choices=[], usage=usage, kv_transfer_params=kv)), "[DONE]"]
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": BARE, "stop_reason": "end_turn",
               "content": [{"type": "text", "text": "hi"}], "usage": {"input_tokens": 1, "output_tokens": 1},
               "kv_transfer_params": kv}
    message_events = [
        ("message_start", {"type": "message_start", "message": dict(message, content=[], stop_reason=None)}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "hi"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": 1}, "kv_transfer_params": kv}),
        ("message_stop", {"type": "message_stop"})]
    response = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": BARE,
                "output": [{"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text", "text": "hi", "annotations": []}]}],
                "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}, "kv_transfer_params": kv}
    response_events = [
        ("response.created", json.dumps({"type": "response.created", "sequence_number": 0,
                                         "response": dict(response, status="in_progress", output=[])})),
        ("response.completed", json.dumps({"type": "response.completed", "sequence_number": 1,
                                           "response": response}))]
    cases = (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
              {"fake_status": 200, "fake_body": json.dumps(chat)}, {"fake_sse": sse}),
             ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
              {"fake_status": 200, "fake_body": json.dumps(message)}, {"fake_events": message_events}),
             ("/v1/responses", {"input": "hi", "store": False},
              {"fake_status": 200, "fake_body": json.dumps(response)}, {"fake_events": response_events}))
    said = (b"prefill-7", b"10.9.8.7", b"encoder-3")
    try:
        managed, own = await new_key(http, gw), await new_key(http, gw, own_cache_salt=True)
        for route, body, whole, streamed in cases:
            for stream, steer in ((False, whole), (True, streamed)):
                for key in (managed, own, MASTER):
                    vllm.steer = steer
                    response, content = await call(http, gw, route, dict(body, model=MODEL, stream=stream), key=key)
                    assert response.code == 200, (route, stream, content)
                    if key == managed:
                        assert not any(s in content for s in said), (route, stream, content)
                        assert b"_transfer_params\"" not in content and b"meta-llama" in content, (route, stream, content)
                    else:
                        assert b"prefill-7" in content, (route, stream, key, content)
        vllm.steer = {"fake_status": 200, "fake_body": json.dumps(chat)}
        response, content = await call(http, gw, "/v1/chat/completions", dict(cases[0][1], model=MODEL), key=managed)
        assert json.loads(content) == {k: v for k, v in chat.items() if not k.endswith("_transfer_params")}, content
        nothing = json.dumps(dict(chat, kv_transfer_params=None, ec_transfer_params=None)).encode()  # (vLLM's null:
        vllm.steer = {"fake_status": 200, "fake_body": nothing.decode()}  # names nothing, the answer left unparsed)
        response, content = await call(http, gw, "/v1/chat/completions", dict(cases[0][1], model=MODEL), key=managed)
        assert content == nothing, content
        for stream, steer in ((False, cases[2][2]), (True, cases[2][3])):  # (a Responses object kept, read back)
            vllm.steer = steer
            response, content = await call(http, gw, "/v1/responses", {"model": MODEL, "input": "hi",
                                                                        "stream": stream}, key=managed)
            assert response.code == 200 and b"prefill-7" not in content, content
            response, content = await call(http, gw, "/v1/responses/resp_1", key=managed, method="GET")
            assert response.code == 200 and b"prefill-7" not in content, content
            await call(http, gw, "/v1/responses/resp_1", key=managed, method="DELETE")
    finally:
        await stop_all(gw, vllm)


@pytest_twisted.ensureDeferred
async def test_a_batch_lines_answer_names_a_model_listed_by_a_path_as_it_is_listed(pathed):
    """A batch line's answer of a model its vLLM lists by a path (a chat completion, a Responses object, and that
    response as kept: retrieved) names it by its listed name, as an online answer does. Before, the output file
    held the path vLLM echoed."""
    gw, vllm, _, publics = pathed
    shown = publics[0].split("/", 1)[1]
    sdk = openai_client(gw, MASTER)
    try:
        for endpoint, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                               ("/v1/responses", {"input": "hi"})):
            line = {"custom_id": "a", "method": "POST", "url": endpoint, "body": dict(body, model=publics[0])}
            uploaded = await in_thread(sdk.files.create, file=("in.jsonl", io.BytesIO(json.dumps(line).encode())),
                                       purpose="batch")
            created = await in_thread(sdk.batches.create, input_file_id=uploaded.id, endpoint=endpoint,
                                      completion_window="24h")
            await gw.service.batch_runner.settled(created.id)
            batch = await in_thread(sdk.batches.retrieve, created.id)
            content = (await in_thread(sdk.files.content, batch.output_file_id)).content
            answer = json.loads(content.splitlines()[0])["response"]["body"]
            assert b"/srv" not in content and answer["model"] == shown, content
            if endpoint == "/v1/responses":
                kept = await in_thread(sdk.responses.retrieve, answer["id"])
                assert kept.model == shown, kept
    finally:
        sdk.close()


@pytest_twisted.ensureDeferred
async def test_a_stream_nobody_asked_for_names_a_model_listed_by_a_path_as_it_is_listed(http, pathed):
    """An event stream an upstream answers where none was asked for, on a route with no whole answer to make of it
    (embeddings: relayed as it comes, with no observer of its events), names a model its vLLM lists by a path by
    its listed name, as an observed stream does. Before, its events went as vLLM wrote them, naming the path."""
    gw, vllm, _, publics = pathed
    path, shown = "/srv/models/" + BARE.split("/")[1], BARE.split("/")[1]
    events = b"".join(b"data: " + json.dumps({"object": "list", "model": path, "data": [
        {"object": "embedding", "index": i, "embedding": [0.5]}]}).encode() + b"\n\n" for i in range(2))
    vllm.steer = {"fake_raw": (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + events).decode()}
    response, content = await call(http, gw, "/v1/embeddings", {"model": publics[0], "input": "hi"})
    assert response.code == 200 and shows_none(content, "/srv"), content
    assert content.replace(b": ", b":").count(f'"model":"{shown}"'.encode()) == 2, content


def test_an_answers_transfer_fields_are_dropped_where_they_say_something_null_ones_passed_over():
    """L{without_transfers}: vLLM's C{"kv_transfer_params":null} (every chat completion's) leaves the answer as it
    came, the same object, however many there are or however spaced; where one says something after them, the
    object is written without any of them, in a whole answer and in an event."""
    from gomodel.proxy.transfers import without_transfers

    for quiet in (b'{"id":"c","kv_transfer_params":null}', b'{"kv_transfer_params":null,"ec_transfer_params":null}',
                  b'{"kv_transfer_params": null}', b'{"text":"no fields"}'):
        assert without_transfers(quiet) is quiet
    said = b'{"kv_transfer_params":null,"x":{"ec_transfer_params":{"remote_host":"10.0.0.9"}}}'
    assert json.loads(without_transfers(said)) == {"x": {}}
    event = b'data: {"kv_transfer_params":null}\n\ndata: {"kv_transfer_params":{"remote_port":1}}\n\n'
    assert without_transfers(event) == b'data: {"kv_transfer_params":null}\n\ndata: {}\n\n'


# A prefill vLLM's transfer fields, as its answers carry them (its engine's id and port)
PREFILL = {"do_remote_decode": False, "remote_engine_id": "prefill-7", "remote_port": 5600}


@pytest_twisted.async_yield_fixture()
async def salted(reactor, http, tmp_path):
    """A gateway before a vLLM, with cache salts on: the gateway, the fake, a managed key (its requests go to the vLLM
    without transfer fields) and one allowed its own salt (they go as sent)."""
    vllm = await start_fake(reactor)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": vllm.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                       "GOMODEL_DATA_DIR": str(tmp_path)})
    yield gw, vllm, await new_key(http, gw), await new_key(http, gw, own_cache_salt=True)
    await stop_all(gw, vllm)


def created_id(events: bytes) -> str:
    """The id of the response a Responses stream's C{events} created."""
    return [json.loads(line[len(b"data: "):])["response"]["id"] for line in events.split(b"\n")
            if line.startswith(b"data: ") and b'"response.created"' in line][0]


def with_transfers_kept(vllm, response_id, kv):
    """Have C{vllm}'s last kept event of C{response_id}'s background stream (its C{response.completed}) name C{kv}
    (L{PREFILL}) as its C{kv_transfer_params}, as a prefill vLLM's does."""
    kept = vllm.event_store[response_id]
    kept[-1] = kept[-1].replace(b'"background"', b'"kv_transfer_params": ' + json.dumps(kv).encode() + b', "background"',
                                1)
    assert b"prefill-7" in kept[-1], kept


async def batch_output(sdk, gw, endpoint, lines) -> bytes:
    """The output file of a batch of C{lines} (dicts: each line's body) to C{endpoint}, made with C{sdk}'s key."""
    jsonl = "\n".join(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": endpoint, "body": body})
                      for i, body in enumerate(lines)).encode()
    uploaded = await in_thread(sdk.files.create, file=("in.jsonl", io.BytesIO(jsonl)), purpose="batch")
    created = await in_thread(sdk.batches.create, input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")
    await gw.service.batch_runner.settled(created.id)
    batch = await in_thread(sdk.batches.retrieve, created.id)
    assert batch.output_file_id is not None, batch
    return (await in_thread(sdk.files.content, batch.output_file_id)).content


@pytest_twisted.ensureDeferred
async def test_a_managed_keys_batch_lines_carry_no_transfer_params_where_they_go_without(http, salted):
    """A managed key's batch lines go to a vLLM without C{kv_transfer_params} and C{ec_transfer_params} (salted, the
    key not allowed its own salt), and so do their answers in the batch's output file (a chat completion, a native
    Messages answer, a native Responses object, and that response as kept: retrieved), as its online answers do;
    the master key's, and those of a key allowed its own salt, keep them (their lines do). Before, every output
    line carried them as vLLM sent them."""
    gw, vllm, managed, own = salted
    kv = {"do_remote_decode": False, "remote_engine_id": "prefill-7", "remote_host": "10.9.8.7", "remote_port": 5600}
    ec = {"remote_engine_id": "encoder-3"}
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": BARE, "stop_reason": "end_turn",
               "content": [{"type": "text", "text": "hi"}], "usage": {"input_tokens": 1, "output_tokens": 1},
               "kv_transfer_params": kv}
    response = {"id": "resp_b", "object": "response", "created_at": 1, "status": "completed", "model": BARE,
                "output": [{"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text", "text": "hi", "annotations": []}]}],
                "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}, "ec_transfer_params": ec}
    cases = (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),  # (the fake's own extras)
             ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                               "fake_status": 200, "fake_body": json.dumps(message)}),
             ("/v1/responses", {"input": "hi", "fake_status": 200, "fake_body": json.dumps(response)}))
    said = (b"prefill-7", b"encoder-3", b'"fake": true', b'"fake":true')
    for key in (managed, own, MASTER):
        sdk = openai_client(gw, key)
        try:
            for endpoint, body in cases:
                content = await batch_output(sdk, gw, endpoint, [dict(body, model=MODEL)])
                answer = json.loads(content.splitlines()[0])["response"]
                assert answer["status_code"] == 200, content
                if key == managed:
                    assert not any(s in content for s in said), (endpoint, content)
                    assert b"_transfer_params\"" not in content and BARE.encode() in content, (endpoint, content)
                else:
                    assert b"_transfer_params\"" in content, (key, endpoint, content)
                if endpoint == "/v1/responses":
                    got, kept = await call(http, gw, "/v1/responses/resp_b", key=key, method="GET")
                    assert got.code == 200 and (b"encoder-3" in kept) is (key != managed), (key, kept)
                    await call(http, gw, "/v1/responses/resp_b", key=key, method="DELETE")
        finally:
            sdk.close()


@pytest_twisted.ensureDeferred
async def test_a_managed_keys_passthrough_answers_carry_no_transfer_params_where_its_requests_go_without(http, salted):
    """A managed key's passthrough request to a vLLM's model-routed route goes without C{kv_transfer_params} and
    C{ec_transfer_params} (salted as on C{/v1}), and so does its answer, whole and streamed, the rest of it as it
    came; the master key's, and a key's allowed its own salt, keep them (their requests do). Before, a passthrough's
    answer carried them as vLLM sent them."""
    gw, vllm, managed, own = salted
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    chat = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": BARE, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "kv_transfer_params: mine"}, "finish_reason": "stop"}],
        "usage": usage, "kv_transfer_params": PREFILL, "ec_transfer_params": {"remote_engine_id": "encoder-3"}}
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": BARE}
    sse = [json.dumps(dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant", "content": "hi"},
                                            "finish_reason": None}])),
           json.dumps(dict(chunk, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}], kv_transfer_params=PREFILL)),
           json.dumps(dict(chunk, choices=[], usage=usage, kv_transfer_params=PREFILL)), "[DONE]"]
    said = (b"prefill-7", b"encoder-3")
    body = {"model": BARE, "messages": [{"role": "user", "content": "hi"}]}
    for stream, steer in ((False, {"fake_status": 200, "fake_body": json.dumps(chat)}), (True, {"fake_sse": sse})):
        for key in (managed, own, MASTER):
            vllm.steer = steer
            response, content = await call(http, gw, "/p/vllm/v1/chat/completions", dict(body, stream=stream),
                                           key=key)
            assert response.code == 200, (stream, content)
            if key == managed:
                assert not any(s in content for s in said), (stream, content)
                assert b"_transfer_params\"" not in content and BARE.encode() in content, (stream, content)
                if not stream:
                    assert json.loads(content) == {k: v for k, v in chat.items()
                                                   if not k.endswith("_transfer_params")}, content
                else:
                    assert content.count(b"data: ") == 4 and content.endswith(b"data: [DONE]\n\n"), content
            else:
                assert b"prefill-7" in content, (stream, key, content)


@pytest_twisted.ensureDeferred
async def test_a_managed_keys_passthrough_answer_too_large_to_hold_goes_with_its_transfer_params_null(http, salted):
    """A managed key's passthrough JSON answer that the gateway does not read whole (past 1 MiB, or of unknown length:
    relayed as it comes) goes with the values of its transfer fields as null, read as they pass (nothing held back
    but a key's copy), the rest byte for byte; the master key's keeps them. Before, such an answer carried them as
    vLLM sent them."""
    gw, vllm, managed, _ = salted
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    chat = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": BARE, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": 'x"kv_transfer_params": {' * 60000},
         "finish_reason": "stop"}], "usage": usage, "kv_transfer_params": PREFILL,
        "ec_transfer_params": {"remote_engine_id": "encoder-3"}}
    answer = json.dumps(chat)
    nulled = json.dumps(dict(chat, kv_transfer_params=None, ec_transfer_params=None)).encode()
    small = json.dumps(dict(chat, choices=[]))
    small_nulled = json.dumps(dict(chat, choices=[], kv_transfer_params=None, ec_transfer_params=None)).encode()
    assert len(answer) > 1024 * 1024
    raw = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{small}"
    body = {"model": BARE, "messages": [{"role": "user", "content": "hi"}]}
    for steer, sent, shown in (({"fake_status": 200, "fake_body": answer}, answer.encode(), nulled),  # (past 1 MiB)
                               ({"fake_raw": raw}, small.encode(), small_nulled)):  # (of no length)
        for key in (managed, MASTER):
            vllm.steer = steer
            response, content = await call(http, gw, "/p/vllm/v1/chat/completions", body, key=key)
            assert response.code == 200, content[:200]
            assert content == (shown if key == managed else sent), (steer.keys(), key == managed, content[-300:])


def test_a_json_answer_read_as_it_passes_has_its_transfer_fields_null_however_it_is_cut():
    """L{NulledTransfers}: a JSON object's top-level transfer fields (escaped too) have their values written null,
    whatever they hold (strings with quotes and braces, nested lists), however the answer comes cut into pieces; a
    field nested deeper, one in a string, a longer key, and an answer that is no object go as they came."""
    from gomodel.proxy.transfers import NulledTransfers

    kv = {"remote_host": "10.9.8.7", "x": [1, {"y": "}]\"\\"}], "s": 'a"b'}
    escaped = "".join("\\u%04x" % ord(c) for c in "kv_transfer_params")
    cases = [
        ({"id": "c", "kv_transfer_params": kv, "choices": [{"m": {"kv_transfer_params": 1}}],
          "ec_transfer_params": 'e"c'}, None),
        ({"kv_transfer_params": 123, "a": "kv_transfer_params"}, None),
        ({"a": [1], "kv_transfer_params": -1.5e3}, None),
        ({"b": {"kv_transfer_params": 2}, "ec_transfer_params": True, "c": "\\"}, None),
        ({"x" * 200: 1, "kv_transfer_params": [1, [2]]}, None)]
    documents = [(json.dumps(value).encode(), dict(value, **{k: None for k in value if k.endswith("_transfer_params")}))
                 for value, _ in cases]
    documents += [(b' {\n "' + escaped.encode() + b'" : {"h": [1]} , "ec_transfer_params":null, "z":[]}\n ',
                   {"kv_transfer_params": None, "ec_transfer_params": None, "z": []}),
                  (b'{"' + escaped.encode() + b'X": 7}', {"kv_transfer_paramsX": 7})]
    for document, expected in documents:
        for size in range(1, len(document) + 1):
            nulled = NulledTransfers()
            written = b"".join(nulled(document[at:at + size]) for at in range(0, len(document), size))
            assert json.loads(written) == expected, (document, size, written)
            assert b"10.9.8.7" not in written
    for document in (b'["kv_transfer_params", {"kv_transfer_params": 1}]', b'"kv_transfer_params"',
                     b'no JSON {"kv_transfer_params": 1}'):
        for size in (1, 2, len(document)):
            nulled = NulledTransfers()
            assert b"".join(nulled(document[at:at + size]) for at in range(0, len(document), size)) == document


async def message_batch_results(http, gw, requests) -> bytes:
    """The results (JSONL) of a message batch of C{requests}, made with the master key, once it has ended."""
    response, content = await call(http, gw, "/v1/messages/batches", {"requests": requests})
    assert response.code == 200, content
    batch_id = json.loads(content)["id"]
    await gw.service.batch_runner.settled(batch_id)
    response, content = await call(http, gw, f"/v1/messages/batches/{batch_id}/results", method="GET")
    assert response.code == 200, content
    return content


@pytest_twisted.ensureDeferred
async def test_a_message_batchs_results_name_a_model_listed_by_a_path_as_it_is_listed(http, pathed):
    """A message batch's results (C{/v1/messages/batches/{id}/results}) of a model its vLLM lists by a path name it
    by its listed name, as an OpenAI batch's output lines and online answers do: a message answered natively and one
    made of a chat completion (a line with stop sequences goes translated), and vLLM's error naming the path
    (natively, in Anthropic's shape and in OpenAI's, and translated)."""
    gw, vllm, _, publics = pathed
    path, shown = "/srv/models/" + BARE.split("/")[1], BARE.split("/")[1]
    said = f"The model `{path}` does not exist."
    missing = json.dumps({"error": {"message": said, "type": "NotFoundError", "param": "model", "code": 404}})
    anthropics = json.dumps({"type": "error", "error": {"type": "not_found_error", "message": said}})
    params = {"model": publics[0], "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    translated = dict(params, stop_sequences=["zzz"])
    content = await message_batch_results(http, gw, [
        {"custom_id": "native", "params": params}, {"custom_id": "translated", "params": translated},
        {"custom_id": "missing", "params": dict(params, fake_status=404, fake_body=anthropics)},
        {"custom_id": "missing-openai", "params": dict(params, fake_status=400, fake_body=missing)},
        {"custom_id": "by-path", "params": dict(params, model="vllm/" + path)}])  # (the path still routes)
    assert {vllm.last_request(p).path for p in (b"/v1/messages", b"/v1/chat/completions")} == {
        b"/v1/messages", b"/v1/chat/completions"}
    vllm.steer = {"fake_status": 404, "fake_body": missing}  # (a translated line's chat completion: no field of
    content += await message_batch_results(http, gw, [  # the line's own reaches it)
        {"custom_id": "missing-translated", "params": translated}])
    assert shows_none(content, "/srv", "\\/srv"), content
    results = {r["custom_id"]: r["result"] for r in map(json.loads, content.splitlines())}
    for custom_id in ("native", "translated", "by-path"):
        assert results[custom_id]["type"] == "succeeded" and results[custom_id]["message"]["model"] == shown, results
    for custom_id in ("missing", "missing-openai", "missing-translated"):
        assert results[custom_id]["type"] == "errored", results
        assert results[custom_id]["error"]["error"]["message"] == f"The model `{shown}` does not exist.", results


@pytest_twisted.ensureDeferred
async def test_a_managed_keys_background_response_read_again_carries_no_transfer_params(http, salted):
    """A managed key's background response goes without C{kv_transfer_params} and C{ec_transfer_params} where its
    create did, however it is read again from its instance: retrieved while it runs (refreshed there), cancelled
    (the instance's answer), its events replayed (C{stream=true}); the master key's and an own-salt key's keep them
    (their creates do). Before, each of these carried them as vLLM has them."""
    gw, vllm, managed, own = salted
    for key in (managed, own, MASTER):
        response, content = await call(http, gw, "/v1/responses", {"model": MODEL, "input": "hi",
                                                                    "background": True}, key=key)
        assert response.code == 200, content
        response_id = json.loads(content)["id"]
        vllm.stored_responses[response_id]["kv_transfer_params"] = PREFILL  # (as its instance has it now)
        response, content = await call(http, gw, "/v1/responses", {"model": MODEL, "input": "hi",
                                                                    "background": True, "stream": True}, key=key)
        assert response.code == 200 and b"prefill-7" not in content, content
        streamed = created_id(content)
        with_transfers_kept(vllm, streamed, PREFILL)  # (its instance's events, as kept there)
        read = [(await call(http, gw, f"/v1/responses/{response_id}", key=key, method="GET"))[1],
                (await call(http, gw, f"/v1/responses/{streamed}?stream=true", key=key, method="GET"))[1],
                (await call(http, gw, f"/v1/responses/{response_id}/cancel", key=key))[1],
                (await call(http, gw, f"/v1/responses/{response_id}", key=key, method="GET"))[1]]
        for number, content in enumerate(read):
            assert b"resp" in content and (b"prefill-7" in content) is (key != managed), (key, number, content)


@pytest_twisted.ensureDeferred
async def test_a_managed_keys_stored_response_is_kept_without_transfer_fields_however_written(http, salted):
    """A managed key's Responses object (its request went without transfer fields) is kept without them: one that
    says null, one that names them, one that names them with C{\\u} escapes in the field's name; one without any
    is kept as it came."""
    gw, vllm, managed, own = salted
    usage = {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}
    made = {"object": "response", "created_at": 1, "status": "completed", "model": BARE, "usage": usage,
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "kv_transfer_params: mine"}]}]}
    named = json.dumps(PREFILL)
    for number, fields in enumerate(("", '"kv_transfer_params": null, ', f'"kv_transfer_params": {named}, ',
                                     f'"ec_transfer_params": null, "kv\\u005ftransfer_params": {named}, ')):
        response_id = f"resp_kept{number}"
        answer = "{" + fields + json.dumps(dict(made, id=response_id))[1:]
        response, content = await call(http, gw, "/v1/responses", {"model": MODEL, "input": "hi", "fake_status": 200,
                                                                    "fake_body": answer}, key=managed)
        assert response.code == 200 and json.loads(content)["id"] == response_id, content
        response, content = await call(http, gw, f"/v1/responses/{response_id}", key=managed, method="GET")
        kept = json.loads(content)
        assert response.code == 200 and not any(name.endswith("_transfer_params") for name in kept), content
        assert {name: kept[name] for name in made} == made, content


@pytest_twisted.ensureDeferred
async def test_a_managed_keys_stored_response_read_through_the_passthrough_carries_no_transfer_params(http, salted):
    """A managed key reading again through C{/p/} a response of its tenant's (C{responses/{id}}: retrieved, its
    events replayed, cancelled), whose create went without C{kv_transfer_params} and C{ec_transfer_params}, gets it
    without them too, as on C{/v1/responses/{id}}, the rest as its instance has it; the master key's and an
    own-salt key's reads keep them. Before, such a read (whose body is none: nothing salted) carried them."""
    gw, vllm, managed, own = salted
    for key in (managed, own, MASTER):
        response, content = await call(http, gw, "/v1/responses", {"model": MODEL, "input": "hi",
                                                                    "background": True, "stream": True}, key=key)
        assert response.code == 200 and b"prefill-7" not in content, content
        response_id = created_id(content)
        vllm.stored_responses[response_id].update(status="in_progress", kv_transfer_params=PREFILL)
        with_transfers_kept(vllm, response_id, PREFILL)
        read = [(await call(http, gw, f"/p/vllm/v1/responses/{response_id}", key=key, method="GET"))[1],
                (await call(http, gw, f"/p/vllm/v1/responses/{response_id}?stream=true", key=key,
                            method="GET"))[1],
                (await call(http, gw, f"/p/vllm/v1/responses/{response_id}/cancel", key=key))[1]]
        for number, content in enumerate(read):
            assert response_id.encode() in content, (key, number, content)
            assert (b"prefill-7" in content) is (key != managed), (key, number, content)
