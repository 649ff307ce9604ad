"""Failover across replicas and targets for what an upstream answers besides overload: a spent quota, a refused
key, ids a provider refuses, an engine that never answers; over loopback sockets, with the official SDK where the
client matters."""

import json

import openai
import pytest_twisted
import treq
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import server
from twisted.web.resource import Resource

from gomodel import jsonutil
from tests.fakes.fleet import FakeReplica
from tests.fakes.vllm import CHAT_MODEL
from tests.support import in_thread, start_gateway, stop_all, until, with_timeout

GPT = "gpt-4o-mini"
QUOTA = {"error": {"message": "You exceeded your current quota, please check your plan and billing details.",
                   "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}
SCOPES = {"error": {"message": "You have insufficient permissions for this operation. Missing scopes: model.request. "
                               "Check that you have the correct role in your organization (Reader, Writer, Owner) and "
                               "project (Member, Owner), and if you're using a restricted API key, that it has the "
                               "necessary scopes.", "type": "invalid_request_error", "param": None, "code": None}}


OPENAI_CHAT_PARAMETERS = frozenset((
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
    "top_logprobs", "top_p", "user", "verbosity", "web_search_options"))


class FakeOpenAI(Resource):
    """An OpenAI-like upstream: its model list, and chat completions answered as C{mode} says: C{"ok"} (OpenAI's
    own check of tool call ids, at most 40 characters, first), C{"quota"} (429 C{insufficient_quota}) or
    C{"hang"} (the request taken, its head never sent); C{"frozen"}: every request so (its model list too).
    A chat request with a parameter OpenAI does not know is refused (400), as OpenAI's are. Embeddings are
    refused as a restricted project key's are: 401, missing scopes."""

    isLeaf = True

    def __init__(self, reactor, mode="ok"):
        super().__init__()
        self.reactor = reactor
        self.mode = mode
        self.chats = []  # the bodies of the chat requests it got
        self.embeddings = 0  # the embeddings requests it refused
        self.responses = []  # the bodies of the Responses requests it refused (405)
        self.hung = []
        self.port = None

    async def start(self):
        site = server.Site(self)
        site.noisy = False
        self.port = await TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(site)
        return self

    def stop(self):
        for request in self.hung:
            if not request._disconnected:
                request.transport.abortConnection()
        return self.port.stopListening()

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.port.getHost().port}/v1"

    def _json(self, request, status, value):
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(value).encode()

    def render(self, request):
        if self.mode == "frozen":
            self.hung.append(request)
            return server.NOT_DONE_YET
        if request.method == b"GET" and request.path == b"/v1/models":
            return self._json(request, 200, {"object": "list", "data": [{"id": GPT, "object": "model"}]})
        if request.method == b"POST" and request.path == b"/v1/responses":  # (none here: translated to chat)
            self.responses.append(json.loads(request.content.read()))
            return self._json(request, 405, {"detail": "Method Not Allowed"})
        if request.method == b"POST" and request.path == b"/v1/embeddings":
            self.embeddings += 1
            return self._json(request, 401, SCOPES)
        if request.method != b"POST" or request.path != b"/v1/chat/completions":
            return self._json(request, 404, {"error": {"message": "no", "type": "invalid_request_error"}})
        body = json.loads(request.content.read())
        self.chats.append(body)
        unknown = sorted(set(body) - OPENAI_CHAT_PARAMETERS)
        options = body.get("stream_options") or {}
        unknown += [f"stream_options.{name}" for name in options if name != "include_usage"]
        if unknown:  # (OpenAI refuses what it does not know)
            return self._json(request, 400, {"error": {
                "message": f"Unrecognized request argument supplied: {unknown[0]}",
                "type": "invalid_request_error", "param": None, "code": None}})
        if self.mode == "hang":
            self.hung.append(request)
            return server.NOT_DONE_YET
        if self.mode == "quota":
            return self._json(request, 429, QUOTA)
        for i, message in enumerate(body.get("messages", ())):
            ids = [("tool_calls[%d].id" % j, c.get("id")) for j, c in enumerate(message.get("tool_calls") or ())]
            ids += [("tool_call_id", message["tool_call_id"])] if "tool_call_id" in message else []
            for where, value in ids:
                if len(value) > 40:
                    return self._json(request, 400, {"error": {
                        "message": f"Invalid 'messages[{i}].{where}': string too long. Expected a string with "
                                   f"maximum length 40, but got a string with length {len(value)} instead.",
                        "type": "invalid_request_error", "param": f"messages[{i}].{where}",
                        "code": "string_above_max_length"}})
        return self._json(request, 200, {
            "id": "chatcmpl-openai", "object": "chat.completion", "created": 1700000000, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "from openai"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})


async def _chat(http, gw, model, messages=None):
    response = await http.post(gw.url + "/v1/chat/completions", data=json.dumps({
        "model": model, "messages": messages or [{"role": "user", "content": "hi"}]}).encode(),
        headers={"content-type": ["application/json"]})
    return response, jsonutil.loads(await treq.content(response))


async def _openai_behind_vllm(reactor, mode, **env):
    """A vLLM replica and an OpenAI-like upstream, and a gateway whose virtual model C{llama} has the vLLM's
    model as its first target and OpenAI's as its second."""
    vllm = await FakeReplica(reactor, name="a").start()
    upstream = await FakeOpenAI(reactor, mode).start()
    virtual = [{"source": "llama", "targets": [{"model": f"vllm/{CHAT_MODEL}", "weight": 100},
                                               {"model": f"openai/{GPT}", "weight": 1}]}]
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": vllm.base_url, "OPENAI_API_KEY": "sk-gateway-key-0123",
                                       "OPENAI_BASE_URL": upstream.base_url, "VIRTUAL_MODELS": json.dumps(virtual),
                                       **env})
    return vllm, upstream, gw


# -- a spent quota ----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_spent_quota_is_no_rate_limit_the_same_upstream_is_not_asked_again_nor_the_sdk_told_to_retry(
        reactor):
    """OpenAI's 429 C{insufficient_quota} (the gateway's account has no credit left) passes in no time. Before, it
    was taken for a rate limit: sent again to the provider's other replica (the same account), and relayed as a
    429 the openai SDK retried (twice, by default)."""
    first, second = await FakeOpenAI(reactor, "quota").start(), await FakeOpenAI(reactor, "quota").start()
    gw = await start_gateway(reactor, {"OPENAI_API_KEY": "sk-gateway-key-0123", "OPENAI_MODELS": GPT,
                                       "OPENAI_BASE_URL": f"{first.base_url},{second.base_url}"})
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=2, timeout=10)
    try:
        try:
            await in_thread(client.chat.completions.create, model=f"openai/{GPT}",
                            messages=[{"role": "user", "content": "hi"}])
        except openai.RateLimitError as e:
            error = e.body
            headers = e.response.headers
        else:
            raise AssertionError("no error")
        assert len(first.chats) + len(second.chats) == 1  # neither the other replica nor the SDK asked again
        assert error["code"] == "insufficient_quota" and error["type"] == "insufficient_quota"
        assert "openai" in error["message"] and "quota" in error["message"]
        assert headers.get("x-should-retry") == "false" and "retry-after" not in headers
    finally:
        await stop_all(gw, first, second, clients=[client])


@pytest_twisted.ensureDeferred
async def test_a_spent_quota_fails_over_to_another_target_and_is_passed_over_then(reactor, http):
    """A virtual model whose first target is out of quota: its other target answers; the next requests go there
    first (the spent one is not asked again at once)."""
    vllm = await FakeReplica(reactor, name="a").start()
    upstream = await FakeOpenAI(reactor, "quota").start()
    virtual = [{"source": "llama", "targets": [{"model": f"openai/{GPT}", "weight": 100},
                                               {"model": f"vllm/{CHAT_MODEL}", "weight": 1}]}]
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": vllm.base_url, "OPENAI_API_KEY": "sk-gateway-key-0123",
                                       "OPENAI_BASE_URL": upstream.base_url, "OPENAI_MODELS": GPT,
                                       "VIRTUAL_MODELS": json.dumps(virtual)})
    try:
        for _ in range(3):
            response, body = await _chat(http, gw, "llama")
            assert response.code == 200, body
            assert body["model"] == CHAT_MODEL
        assert len(upstream.chats) == 1 and len(vllm.inference_requests) == 3
    finally:
        await stop_all(gw, vllm, upstream)


@pytest_twisted.ensureDeferred
async def test_a_spent_quota_is_logged_as_one_not_as_a_retry_after(reactor, http):
    """The replica passed over for its spent quota is logged so. Before, the log said it had "asked to wait 60s
    (Retry-After)", which no upstream had."""
    from twisted.logger import formatEvent, globalLogPublisher

    upstream = await FakeOpenAI(reactor, "quota").start()
    gw = await start_gateway(reactor, {"OPENAI_API_KEY": "sk-gateway-key-0123", "OPENAI_MODELS": GPT,
                                       "OPENAI_BASE_URL": upstream.base_url})
    lines = []

    def observe(event):
        if event.get("log_format") and "replica 0" in formatEvent(event):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        response, body = await _chat(http, gw, f"openai/{GPT}")
        assert response.code == 429, body
        [line] = lines
        assert "insufficient_quota" in line and "Retry-After" not in line and "60s" in line, line
    finally:
        globalLogPublisher.removeObserver(observe)
        await stop_all(gw, upstream)


@pytest_twisted.ensureDeferred
async def test_a_spent_quota_goes_on_to_a_replica_of_another_account_and_passes_over_only_its_own(
        reactor, http, tmp_path):
    """Replicas each with a key of their own are accounts of their own: one whose quota is spent leaves the
    request to a replica on another key, and only the replicas on its own key are passed over then (before, the
    request was refused with the 429 while another account could answer it, and every replica was passed over)."""
    spent, funded = await FakeOpenAI(reactor, "quota").start(), await FakeOpenAI(reactor).start()
    path = tmp_path / "gomodel.yaml"
    path.write_text(f"""
providers:
  openai:
    type: openai
    models: [{GPT}]
    replicas:
      - {{base_url: "{spent.base_url}", api_key: sk-account-a-0123}}
      - {{base_url: "{funded.base_url}", api_key: sk-account-b-0123}}
""")
    gw = await start_gateway(reactor, {"ROUTING_STRATEGY": "round_robin"}, yaml_path=path)
    try:
        for _ in range(4):
            response, body = await _chat(http, gw, f"openai/{GPT}")
            assert response.code == 200, body
        assert len(spent.chats) == 1 and len(funded.chats) == 4
        replicas = gw.registry.provider("openai").replicas
        assert replicas[0].busy_until is not None and replicas[1].busy_until is None
    finally:
        await stop_all(gw, spent, funded)


# -- a refused key ----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_replica_refusing_the_gateways_key_is_left_for_another_and_taken_down(reactor, http):
    """One replica of a pool whose key is wrong (started with another C{--api-key}) answers every request 401:
    each goes on to a ready replica, and that one counts it as a failure, as a refused connection, and goes down.
    Before, the client got the 502 upstream_auth_failed for every other request while a good replica was ready."""
    good, bad = await FakeReplica(reactor).start(), await FakeReplica(reactor).start()
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": f"{good.base_url},{bad.base_url}"})
    bad.api_key = "not-the-gateways"
    try:
        for _ in range(8):
            response, body = await _chat(http, gw, f"vllm/{CHAT_MODEL}")
            assert response.code == 200, body
            assert response.headers.getRawHeaders(b"x-gomodel-replica") == [b"0"]
        refused = [r for r in bad.inference_requests if r.status == 401]
        assert 1 <= len(refused) == len(bad.inference_requests) <= 3
        [replica] = [r for r in gw.registry.providers[0].replicas if r.index == 1]
        assert replica.state == "down" and "401" in replica.last_error
    finally:
        await stop_all(gw, good, bad)


@pytest_twisted.ensureDeferred
async def test_a_target_refusing_the_gateways_key_is_left_for_the_next(reactor, http):
    """A virtual model whose first target refuses the gateway's key: its other target answers."""
    good, bad = await FakeReplica(reactor, name="a").start(), await FakeReplica(reactor, name="b").start()
    virtual = [{"source": "llama", "targets": [{"model": f"vllm-b/{CHAT_MODEL}", "weight": 100},
                                               {"model": f"vllm-a/{CHAT_MODEL}", "weight": 1}]}]
    gw = await start_gateway(reactor, {"VLLM_A_BASE_URL": good.base_url, "VLLM_B_BASE_URL": bad.base_url,
                                       "VIRTUAL_MODELS": json.dumps(virtual)})
    bad.api_key = "not-the-gateways"
    try:
        response, body = await _chat(http, gw, "llama")
        assert response.code == 200, body
        assert [r.status for r in bad.inference_requests] == [401] and len(good.inference_requests) == 1
    finally:
        await stop_all(gw, good, bad)


@pytest_twisted.ensureDeferred
async def test_a_key_without_the_scope_of_one_endpoint_is_no_replica_failure(reactor, http):
    """OpenAI's restricted project key answers 401 "insufficient permissions ... Missing scopes" for an endpoint
    outside its scopes: the client gets the 502 upstream_auth_failed saying so, and the replica, which serves the
    key's other endpoints, is neither struck nor asked again. Before, each such request counted as the replica's
    failure: a few of them had the provider's only replica passed over (doubted) for everyone's chats."""
    upstream = await FakeOpenAI(reactor).start()
    gw = await start_gateway(reactor, {"OPENAI_API_KEY": "sk-gateway-key-0123", "OPENAI_MODELS": GPT,
                                       "OPENAI_BASE_URL": upstream.base_url})
    try:
        for _ in range(4):
            response = await http.post(gw.url + "/v1/embeddings", data=json.dumps({
                "model": f"openai/{GPT}", "input": "hi"}).encode(), headers={"content-type": ["application/json"]})
            error = jsonutil.loads(await treq.content(response))["error"]
            assert response.code == 502 and error["code"] == "upstream_auth_failed", error
            assert "scope" in error["message"] and "127.0.0.1" not in error["message"], error
        response = await http.post(gw.url + "/p/openai/v1/embeddings", data=json.dumps({
            "model": GPT, "input": "hi"}).encode(), headers={"content-type": ["application/json"]})
        assert response.code == 401 and jsonutil.loads(await treq.content(response)) == SCOPES  # (as it came)
        assert upstream.embeddings == 5
        [replica] = gw.registry.provider("openai").replicas
        assert replica.failures == 0 and not replica.doubted and replica.state == "ready"
        response, body = await _chat(http, gw, f"openai/{GPT}")
        assert response.code == 200, body
    finally:
        await stop_all(gw, upstream)


# -- vLLM's own fields, which OpenAI refuses --------------------------------------------------------------

VLLM_EXTRAS = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
               "chat_template_kwargs": {"enable_thinking": False}, "guided_json": {"type": "object"},
               "structured_outputs": {"json": {"type": "object"}}, "priority": 1,
               "cache_salt": "s", "stop_token_ids": [2]}


@pytest_twisted.ensureDeferred
async def test_vllm_only_fields_are_left_out_of_a_failover_to_openai(reactor, http):
    """A chat request with vLLM's extras (the openai SDK's C{extra_body}) to a virtual model whose vLLM target
    fails goes on to its OpenAI target without them, streamed or not; the vLLM target had them. Before, OpenAI
    refused the request (400, an unrecognized argument) and so the client got it."""
    vllm, upstream, gw = await _openai_behind_vllm(reactor, "ok", OPENAI_MODELS=GPT)
    vllm.fail_status = 500
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=10)
    messages = [{"role": "user", "content": "hi"}]
    try:
        answer = await in_thread(client.chat.completions.create, model="llama", messages=messages,
                                 extra_body=VLLM_EXTRAS, temperature=0.5)
        assert answer.choices[0].message.content == "from openai"
        stream = await in_thread(client.chat.completions.create, model="llama", messages=messages, stream=True,
                                 stream_options={"include_usage": True, "continuous_usage_stats": True},
                                 extra_body=VLLM_EXTRAS)
        chunks = await in_thread(list, stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "from openai"
        assert [set(sent) - {"stream", "stream_options"} for sent in upstream.chats] == [
            {"model", "messages", "temperature"}, {"model", "messages"}]
        assert upstream.chats[1]["stream_options"] == {"include_usage": True}
        sent_to_vllm = [r.body for r in vllm.inference_requests]
        assert sent_to_vllm and all(b["top_k"] == 20 and b["guided_json"] for b in sent_to_vllm)
    finally:
        await stop_all(gw, vllm, upstream, clients=[client])


@pytest_twisted.ensureDeferred
async def test_vllm_only_fields_are_left_out_for_an_openai_first_target_and_its_responses(reactor, http):
    """The same for an OpenAI provider named first, on chat and on the Responses API (natively, then translated to
    its chat: the fake has no /v1/responses)."""
    upstream = await FakeOpenAI(reactor).start()
    gw = await start_gateway(reactor, {"OPENAI_API_KEY": "sk-gateway-key-0123", "OPENAI_MODELS": GPT,
                                       "OPENAI_BASE_URL": upstream.base_url})
    try:
        response, body = await _chat(http, gw, f"openai/{GPT}")
        assert response.code == 200, body
        response = await http.post(gw.url + "/v1/chat/completions", data=json.dumps({
            "model": f"openai/{GPT}", "messages": [{"role": "user", "content": "hi"}], **VLLM_EXTRAS}).encode(),
            headers={"content-type": ["application/json"]})
        assert response.code == 200, await treq.content(response)
        response = await http.post(gw.url + "/v1/responses", data=json.dumps({
            "model": f"openai/{GPT}", "input": "hi", "store": False, **VLLM_EXTRAS}).encode(),
            headers={"content-type": ["application/json"]})
        assert response.code == 200, await treq.content(response)
        assert len(upstream.chats) == 3 and len(upstream.responses) == 1
        assert all(not set(sent) & set(VLLM_EXTRAS) for sent in upstream.chats + upstream.responses)
    finally:
        await stop_all(gw, upstream)


# -- tool call ids OpenAI refuses -----------------------------------------------------------------------

LONG_ID = "chatcmpl-tool-" + "0123456789abcdef" * 2  # (vLLM's: 46 characters, OpenAI takes 40 at most)
OTHER_LONG_ID = "chatcmpl-tool-" + "fedcba9876543210" * 2


def _tool_conversation():
    calls = [{"id": call_id, "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}
             for call_id in (LONG_ID, OTHER_LONG_ID, "call_short")]
    return [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": LONG_ID, "content": "sunny"},
            {"role": "tool", "tool_call_id": OTHER_LONG_ID, "content": "rain"},
            {"role": "tool", "tool_call_id": "call_short", "content": "snow"}]


@pytest_twisted.ensureDeferred
async def test_long_tool_call_ids_of_a_conversation_failing_over_from_vllm_to_openai_are_made_short(reactor, http):
    """A conversation begun on vLLM (its tool call ids 46 characters) fails over to an OpenAI target: each id
    longer than OpenAI takes is sent as one made of its hash, the same each time, a call and its result still
    matching. Before, OpenAI refused the conversation (400 string_above_max_length)."""
    vllm, upstream, gw = await _openai_behind_vllm(reactor, "ok", OPENAI_MODELS=GPT)
    vllm.fail_status = 503
    try:
        for _ in range(2):
            response, body = await _chat(http, gw, "llama", _tool_conversation())
            assert response.code == 200, body
            assert body["choices"][0]["message"]["content"] == "from openai"
        first, again = upstream.chats
        assert first["messages"] == again["messages"]  # the same short ids each turn
        calls = first["messages"][1]["tool_calls"]
        ids = [c["id"] for c in calls]
        assert all(len(i) <= 40 for i in ids) and ids[2] == "call_short" and len(set(ids)) == 3
        assert [m["tool_call_id"] for m in first["messages"][2:]] == ids
        assert [c["function"] for c in calls] == [c["function"] for c in _tool_conversation()[1]["tool_calls"]]
        sent_to_vllm = [r.body for r in vllm.inference_requests]
        assert sent_to_vllm and all(b["messages"] == _tool_conversation() for b in sent_to_vllm)  # as it came
    finally:
        await stop_all(gw, vllm, upstream)


@pytest_twisted.ensureDeferred
async def test_long_tool_call_ids_sent_to_openai_first_are_made_short(reactor, http):
    upstream = await FakeOpenAI(reactor).start()
    gw = await start_gateway(reactor, {"OPENAI_API_KEY": "sk-gateway-key-0123", "OPENAI_MODELS": GPT,
                                       "OPENAI_BASE_URL": upstream.base_url})
    try:
        response, body = await _chat(http, gw, f"openai/{GPT}", _tool_conversation())
        assert response.code == 200, body
        [sent] = upstream.chats
        assert sent["messages"][2]["tool_call_id"] == sent["messages"][1]["tool_calls"][0]["id"] != LONG_ID
    finally:
        await stop_all(gw, upstream)


# -- no ready replica: when to come back ------------------------------------------------------------------

def test_no_ready_replica_says_to_come_back_at_the_next_health_check_or_the_end_of_a_hold():
    """Before, C{Retry-After: 1} whatever the replicas' state: a client came back four times before the next
    health check could have readmitted one."""
    from twisted.internet.task import Clock
    from gomodel.errors import NoReadyReplica
    from gomodel.routing.pool import DOWN, Replica, ReplicaPool

    clock = Clock()
    replicas = [Replica(i, FakeServer(), f"http://r{i}/v1", clock) for i in range(2)]
    for replica in replicas:
        replica.models, replica.hold_base = {"m": {"id": "m"}}, 7.0
    pool = ReplicaPool("vllm", "vllm", replicas, clock)
    for replica in replicas:
        replica.set_state(DOWN)

    def retry_after():
        failure = pool.acquire("m")
        errors = []
        failure.addErrback(errors.append)
        [error] = errors
        assert isinstance(error.value, NoReadyReplica)
        return error.value.headers["Retry-After"]

    assert retry_after() == "7"  # the next health check
    for replica in replicas:
        replica.held_until = clock.seconds() + 30.5  # both held out (taken down by failed requests)
    assert retry_after() == "31"
    replicas[1].held_until = clock.seconds() + 2.2
    assert retry_after() == "3"


class FakeServer:
    name = "vllm"
    hidden = ()


# -- a hung engine on any provider ------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_hung_openai_compatible_replica_times_out_its_head_and_the_request_goes_on(reactor, http):
    """An OpenAI-compatible provider's replica that takes the request and never sends a head (a hung engine whose
    model list still answers): its C{HTTP_RESPONSE_HEADER_TIMEOUT} applies as a vLLM's does, and the request goes
    on to the other replica; the hung one counts it as its failure."""
    hung, good = await FakeOpenAI(reactor, "hang").start(), await FakeOpenAI(reactor).start()
    gw = await start_gateway(reactor, {"OPENAI_API_KEY": "sk-gateway-key-0123", "OPENAI_MODELS": GPT,
                                       "OPENAI_BASE_URL": f"{hung.base_url},{good.base_url}",
                                       "HTTP_RESPONSE_HEADER_TIMEOUT": "1s"})
    try:
        pool = gw.registry.providers[0]
        for _ in range(2):  # (one of them goes to the hung replica first)
            response, body = await _chat(http, gw, f"openai/{GPT}")
            assert response.code == 200 and body["choices"][0]["message"]["content"] == "from openai", body
        assert len(hung.chats) == 1 and len(good.chats) == 2
        assert pool.replicas[0].failures == 1 and "in time" in pool.replicas[0].last_error
    finally:
        await stop_all(gw, hung, good)


@pytest_twisted.ensureDeferred
async def test_a_frozen_openai_compatible_replica_fails_its_check_soon_and_its_waiting_request_goes_on(
        reactor, http, monkeypatch):
    """A replica of an OpenAI-compatible provider that answers nothing at all (a host frozen, its connections
    hanging): its check (its model list) fails within L{HEALTH_LIST_TIMEOUT}, it goes down, and the request
    waiting on it for a head goes on to the other replica then. Before, that check waited 30 s (the discovery's
    timeout), a vLLM's 5 s: three of them took such a replica down after a minute and a half."""
    from gomodel.upstream import openai_compatible
    monkeypatch.setattr(openai_compatible, "HEALTH_LIST_TIMEOUT", 0.3, raising=False)
    frozen, good = await FakeOpenAI(reactor, "hang").start(), await FakeOpenAI(reactor).start()
    gw = await start_gateway(reactor, {"OPENAI_API_KEY": "sk-gateway-key-0123", "OPENAI_MODELS": GPT,
                                       "OPENAI_BASE_URL": f"{frozen.base_url},{good.base_url}",
                                       "REPLICA_HEALTH_INTERVAL": "0.2", "REPLICA_FAILURE_THRESHOLD": "1",
                                       "ROUTING_STRATEGY": "round_robin", "HTTP_RESPONSE_HEADER_TIMEOUT": "8s"})
    try:
        pool = gw.registry.providers[0]
        frozen.mode = "frozen"  # (its model list hangs too from now on)
        started = reactor.seconds()
        for _ in range(2):  # (one of them goes to the frozen replica first, unless a check failed already)
            response, body = await _chat(http, gw, f"openai/{GPT}")
            assert response.code == 200, body
        assert reactor.seconds() - started < 5
        assert pool.replicas[0].state == "down"
    finally:
        await stop_all(gw, frozen, good)


# -- replica weights ----------------------------------------------------------------------------------------

def test_round_robin_gives_each_replica_its_weights_share_in_turns():
    """Replicas of weights 2 and 1 under C{round_robin}: two requests in three go to the first, interleaved
    (smooth weighted round robin, as a virtual model's targets take turns). Before, the weights were ignored:
    one in two each."""
    from twisted.internet.task import Clock
    from gomodel.routing.pool import READY, Replica, ReplicaPool

    clock = Clock()
    replicas = [Replica(i, FakeServer(), f"http://r{i}/v1", clock, weight=w) for i, w in enumerate((2.0, 1.0))]
    for replica in replicas:
        replica.models = {"m": {"id": "m"}}
        replica.set_state(READY)
    pool = ReplicaPool("vllm", "vllm", replicas, clock, strategy="round_robin")
    picks = []
    for _ in range(6):
        replica = pool.take("m")
        picks.append(replica.index)
        pool.release(replica)
    assert picks == [0, 1, 0, 0, 1, 0]
    # one replica out (excluded, down): the other takes every request
    assert [pool.take("m", exclude=[replicas[0]]).index for _ in range(3)] == [1, 1, 1]


# -- the last replica of a target failing its requests --------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_target_whose_only_replica_fails_every_request_is_passed_over_for_the_other_targets(reactor, http):
    """A virtual model's heavier target, one vLLM whose inference fails (500) while its /health answers: requests
    alone never take down a provider's last ready replica (its checks decide), but once its failures reach the
    threshold it is passed over, as one whose check failed is, while another target can take the request.
    Before, every request was sent to it first and failed over from it, for as long as its /health answered."""
    broken, good = await FakeReplica(reactor, name="a").start(), await FakeReplica(reactor, name="b").start()
    virtual = [{"source": "llama", "targets": [{"model": f"vllm-a/{CHAT_MODEL}", "weight": 100},
                                               {"model": f"vllm-b/{CHAT_MODEL}", "weight": 1}]}]
    gw = await start_gateway(reactor, {"VLLM_A_BASE_URL": broken.base_url, "VLLM_B_BASE_URL": good.base_url,
                                       "VIRTUAL_MODELS": json.dumps(virtual), "REPLICA_HEALTH_INTERVAL": "60s"})
    broken.fail_status = 500
    try:
        for _ in range(8):
            response, body = await _chat(http, gw, "llama")
            assert response.code == 200, body
        assert len(broken.inference_requests) == 3 and len(good.inference_requests) == 8  # (the threshold)
        [replica] = gw.registry.provider("vllm-a").replicas
        assert replica.state == "ready"  # (not down: its checks decide; a request for vllm-a alone still goes there)
        response, body = await _chat(http, gw, f"vllm-a/{CHAT_MODEL}")
        assert response.code == 500 and len(broken.inference_requests) == 4
    finally:
        await stop_all(gw, broken, good)


# -- a session's target, whichever process chooses it -----------------------------------------------------------

def test_a_new_sessions_target_is_the_same_in_every_process_and_follows_the_weights():
    """With several gateway processes (C{--workers}, hosts) each keeps its own rotation of a virtual model's
    targets: a session's first request chose by the rotation of the process it reached, so the session's
    requests went to different targets (their prefix caches cold) as they reached different processes. Now a
    new session's target is chosen from its key (weighted rendezvous hashing): every process chooses alike."""
    from gomodel.config.virtual import VirtualModel as VirtualModelConfig
    from gomodel.routing.virtual import VirtualModel

    config = VirtualModelConfig("llama", (("a", 3.0), ("b", 1.0)), session_affinity=True)
    one, other = VirtualModel(config), VirtualModel(config)
    for _ in range(5):  # the other process served requests without a session meanwhile: its rotation moved on
        other.order(lambda s: s, lambda r: 2, None)
    sessions = [f"s:{i:04x}" for i in range(400)]
    firsts = [one.order(lambda s: s, lambda r: 2, lambda key=key: key)[0] for key in sessions]
    assert firsts == [other.order(lambda s: s, lambda r: 2, lambda key=key: key)[0] for key in sessions]
    assert 0.65 < firsts.count("a") / len(firsts) < 0.85  # (3 to 1)
    # a session keeps its target; one whose target cannot serve goes to another
    assert one.order(lambda s: s, lambda r: 2, lambda: sessions[0])[0] == firsts[0]
    assert one.order(lambda s: s, lambda r: 2 if r != firsts[0] else 0, lambda: sessions[0])[0] != firsts[0]


def test_a_sessions_target_after_a_failover_is_the_same_in_every_process():
    """A session whose target could not serve one request in one process (full, passed over, down) went on to
    another target there, and that process kept it there (a pin of its own) while the others, which never saw
    that, kept it on its first: its requests went to both targets as they reached different processes. Now a
    session's target follows its key's rendezvous order over the targets that can serve: no process keeps pins,
    each chooses alike, and the session comes back to its first target once that can serve again."""
    from gomodel.config.virtual import VirtualModel as VirtualModelConfig
    from gomodel.routing.virtual import VirtualModel

    config = VirtualModelConfig("llama", (("a", 1.0), ("b", 1.0), ("c", 1.0)), session_affinity=True)
    one, other = VirtualModel(config), VirtualModel(config)
    for i in range(50):
        key = f"s:{i}"
        home = one.order(lambda s: s, lambda r: 2, lambda: key)[0]
        away = one.order(lambda s: s, lambda r: 2 if r != home else 1, lambda: key)[0]  # (its target full a while)
        assert away != home
        assert other.order(lambda s: s, lambda r: 2 if r != home else 1, lambda: key)[0] == away  # alike there
        for process in (one, other):  # its target can serve again: back there, in every process
            assert process.order(lambda s: s, lambda r: 2, lambda: key)[0] == home


@pytest_twisted.ensureDeferred
async def test_a_failover_rules_primary_out_of_quota_is_passed_over_for_its_candidate(reactor, http):
    """A rule's model whose provider's quota is spent: its candidate answers, and the next requests go there first.
    Before, every request was sent to the spent provider first (a 429 each time), then to the candidate."""
    vllm = await FakeReplica(reactor, name="a").start()
    upstream = await FakeOpenAI(reactor, "quota").start()
    rules = {f"openai/{GPT}": [f"vllm/{CHAT_MODEL}"]}
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": vllm.base_url, "OPENAI_API_KEY": "sk-gateway-key-0123",
                                       "OPENAI_BASE_URL": upstream.base_url, "OPENAI_MODELS": GPT,
                                       "FAILOVER_RULES_JSON": json.dumps(rules)})
    try:
        for _ in range(3):
            response, body = await _chat(http, gw, f"openai/{GPT}")
            assert response.code == 200, body
            assert body["model"] == CHAT_MODEL
        assert len(upstream.chats) == 1 and len(vllm.inference_requests) == 3
    finally:
        await stop_all(gw, vllm, upstream)


@pytest_twisted.ensureDeferred
async def test_a_hung_openai_compatible_replica_is_passed_over_once_its_requests_wait_past_the_stall_timeout(
        reactor, http):
    """A replica of an OpenAI-compatible provider (no vLLM /metrics to show its progress) whose requests have all
    waited past C{REPLICA_STALL_TIMEOUT} for a head, none answered meanwhile, while its model list still answers:
    new requests go to the other replica; once it answers again (nothing left waiting there), it takes its share
    again. Before, it took every other request, each waiting out C{HTTP_RESPONSE_HEADER_TIMEOUT} (10 minutes)."""
    hung, good = await FakeOpenAI(reactor, "hang").start(), await FakeOpenAI(reactor).start()
    gw = await start_gateway(reactor, {"OPENAI_API_KEY": "sk-gateway-key-0123", "OPENAI_MODELS": GPT,
                                       "OPENAI_BASE_URL": f"{hung.base_url},{good.base_url}",
                                       "REPLICA_HEALTH_INTERVAL": "0.2", "REPLICA_STALL_TIMEOUT": "1",
                                       "ROUTING_STRATEGY": "round_robin", "HTTP_RESPONSE_HEADER_TIMEOUT": "60s"})
    waiting = []
    try:
        pool = gw.registry.providers[0]
        while not hung.chats:  # (one request held by the hung replica)
            waiting.append(Deferred.fromCoroutine(_chat(http, gw, f"openai/{GPT}")))
            await until(reactor, lambda: len(hung.chats) + len(good.chats) == len(waiting))
        await until(reactor, lambda: pool.replicas[0].unanswered, what="the hung replica passed over")
        response = await http.get(gw.url + "/admin/api/v1/providers/status")
        replicas = jsonutil.loads(await treq.content(response))["providers"][0]["replicas"]
        assert [(r["state"], r["unanswered"]) for r in replicas] == [("ready", True), ("ready", False)]
        assert "none answered" in replicas[0]["last_error"]  # (it still takes what no other replica can)
        before = len(good.chats)
        for _ in range(4):
            response, body = await with_timeout(reactor, Deferred.fromCoroutine(_chat(http, gw, f"openai/{GPT}")), 5)
            assert response.code == 200, body
        assert len(hung.chats) == 1 and len(good.chats) == before + 4
        hung.mode = "ok"
        hung.hung.pop().transport.abortConnection()  # (its waiting request goes on to the other replica)
        await until(reactor, lambda: not pool.replicas[0].unanswered, what="the replica taken back")
        for _ in range(4):
            response, body = await _chat(http, gw, f"openai/{GPT}")
            assert response.code == 200, body
        assert len(hung.chats) >= 2
    finally:
        await stop_all(gw, hung, good)
        for d in waiting:
            d.addErrback(lambda _: None)
