"""The official openai SDK, pointed at the gateway, against the fake vLLM."""

import json

import openai
import pytest
import pytest_twisted

from tests.support import in_thread, start_gateway

MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"


@pytest_twisted.async_yield_fixture()
async def sdk(reactor, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "sdk-key"})
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sdk-key", max_retries=0, timeout=10)
    yield client
    client.close()
    await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_sdk_lists_models(sdk):
    page = await in_thread(sdk.models.list)
    assert [m.id for m in page.data] == [MODEL]
    assert page.data[0].owned_by == "vllm"
    assert page.data[0].model_extra["max_model_len"] == 2048
    model = await in_thread(sdk.models.retrieve, MODEL)
    assert model.id == MODEL


@pytest_twisted.ensureDeferred
async def test_sdk_completes_a_chat_with_vllm_extras(sdk, fake):
    completion = await in_thread(
        sdk.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "hi"}],
        max_tokens=5, extra_body={"top_k": 5, "chat_template_kwargs": {"enable_thinking": False}})
    assert completion.choices[0].message.content == "héhéhé"
    assert completion.usage.completion_tokens == 3
    assert completion.model_extra["kv_transfer_params"] == {"fake": True}
    assert fake.last_request().body["top_k"] == 5
    assert fake.last_request().header(b"authorization") is None


def _collect(stream):
    chunks = list(stream)
    return chunks


@pytest_twisted.ensureDeferred
async def test_sdk_streams_a_chat(sdk):
    stream = await in_thread(sdk.chat.completions.create, model=MODEL,
                             messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = await in_thread(_collect, stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "héhéhé"
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest_twisted.ensureDeferred
async def test_sdk_streams_with_usage_when_asked(sdk):
    stream = await in_thread(sdk.chat.completions.create, model=MODEL,
                             messages=[{"role": "user", "content": "hi"}], stream=True,
                             stream_options={"include_usage": True})
    chunks = await in_thread(_collect, stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 18
    assert sum(1 for c in chunks if c.usage is not None) == 1


@pytest_twisted.ensureDeferred
async def test_sdk_streams_several_choices_and_is_told_of_one_that_never_ended(sdk):
    """A stream of n choices (a text completion's of each prompt) ends well once each one said why it ended; one
    vLLM's engine aborted, or that never said why, is an error the SDK raises, though another choice ended last."""
    hi = [{"role": "user", "content": "hi"}]
    stream = await in_thread(sdk.chat.completions.create, model=MODEL, messages=hi, stream=True, n=2)
    chunks = await in_thread(_collect, stream)
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.delta.content or "" for c in mine) == "héhéhé" and mine[-1].finish_reason == "length"
    stream = await in_thread(sdk.completions.create, model=MODEL, prompt=["a", "b"], stream=True)
    reasons = {c.choices[0].index: c.choices[0].finish_reason for c in await in_thread(_collect, stream)
               if c.choices and c.choices[0].finish_reason}
    assert reasons == {0: "length", 1: "length"}
    for create, asked in ((sdk.chat.completions.create, {"messages": hi, "n": 2}),
                          (sdk.completions.create, {"prompt": ["a", "b"]})):
        stream = await in_thread(create, model=MODEL, stream=True, extra_body={"fake_finishes": ["abort", "stop"]},
                                 **asked)
        with pytest.raises(openai.APIError) as raised:
            await in_thread(_collect, stream)
        assert "choice 0 ended without a finish_reason" in raised.value.message


@pytest_twisted.ensureDeferred
async def test_sdk_sees_openai_errors(sdk):
    with pytest.raises(openai.NotFoundError) as raised:
        await in_thread(sdk.chat.completions.create, model="vllm/nope", messages=[])
    assert raised.value.code == "model_not_found"
    bad = openai.OpenAI(base_url=sdk.base_url, api_key="wrong", max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError):
            await in_thread(bad.models.list)
    finally:
        bad.close()


@pytest_twisted.ensureDeferred
async def test_sdk_stream_reports_a_broken_upstream(sdk):
    stream = await in_thread(sdk.chat.completions.create, model=MODEL, messages=[], stream=True,
                             extra_body={"fake_chunks": 5, "fake_die_after": 2})
    with pytest.raises(openai.APIError) as raised:
        await in_thread(_collect, stream)
    assert "abnormally" in str(raised.value)


@pytest_twisted.ensureDeferred
async def test_sdk_compact_is_a_501_saying_where_it_is_answered(sdk, fake):
    """C{client.responses.compact} (C{POST /v1/responses/compact}), which the gateway neither keeps nor translates, is
    a 501 C{not_supported} the SDK does not retry, naming the passthrough (before: a 405 that named the methods of
    a stored response called "compact", DELETE, GET and HEAD)."""
    with pytest.raises(openai.APIStatusError) as raised:
        await in_thread(sdk.responses.compact, model=MODEL, input="hi")
    assert raised.value.status_code == 501 and raised.value.code == "not_supported"
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert "/p/{provider}/v1/responses/compact" in raised.value.message
    assert not any(r.path.startswith(b"/v1/responses") for r in fake.requests)


@pytest_twisted.ensureDeferred
async def test_sdk_hears_an_upstream_that_dropped_the_request_closed_it_not_that_it_is_unreachable(sdk):
    """An upstream that took the request and closed its connection without an answer (a server that crashed on it) is
    a 502 C{upstream_unreachable} that says so; a refused connection is the unreachable one (before: both "is
    unreachable", which sent its operator to the network for a server that fell over on a prompt)."""
    with pytest.raises(openai.InternalServerError) as raised:
        await in_thread(sdk.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "hi"}],
                        extra_body={"fake_drop": True})
    assert raised.value.status_code == 502 and raised.value.code == "upstream_unreachable"
    assert raised.value.body["message"] == "The upstream provider 'vllm' closed the connection before it answered."


BARE = "meta-llama/Llama-3.1-8B-Instruct"


@pytest_twisted.ensureDeferred
async def test_sdk_provider_field_chooses_the_provider_and_never_goes_upstream(reactor):
    """GoModel's routing hint: a body's C{provider} (an instance's name, or a type) routes a bare id several
    providers serve, on chat, completions, responses and embeddings; it is taken off the body sent. It is
    authoritative: a model qualified with another provider is an id at the named one (not served there: 404).
    A provider nobody configured is 400 C{invalid_value}, one that is not a string 400 C{invalid_type}."""
    from tests.support import start_fake, stop_all
    a, b = await start_fake(reactor), await start_fake(reactor)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": a.base_url, "VLLM_B_BASE_URL": b.base_url,
                                       "GOMODEL_MASTER_KEY": "sdk-key"})
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sdk-key", max_retries=0, timeout=10)
    try:
        calls = {
            "/v1/chat/completions": lambda model, hint: client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, extra_body=hint),
            "/v1/completions": lambda model, hint: client.completions.create(
                model=model, prompt="hi", max_tokens=3, extra_body=hint),
            "/v1/responses": lambda model, hint: client.responses.create(
                model=model, input="hi", store=False, extra_body=hint),
            "/v1/embeddings": lambda model, hint: client.embeddings.create(model=model, input="hi", extra_body=hint),
        }
        for path, call in calls.items():
            with pytest.raises(openai.BadRequestError) as raised:  # (no hint: the bare id is ambiguous)
                await in_thread(call, BARE, None)
            assert raised.value.code == "ambiguous_model"
            for fake, model, hint in ((b, BARE, "vllm-b"), (a, BARE, "vllm"), (b, "vllm-b/" + BARE, "vllm-b"),
                                      (a, BARE, " vllm ")):
                before = len(fake.forwarded())
                await in_thread(call, model, {"provider": hint})
                [seen] = [r for r in fake.forwarded()[before:] if r.path == path.encode()]
                assert seen.body["model"] == BARE and "provider" not in seen.body, (path, hint)
            with pytest.raises(openai.NotFoundError) as raised:  # (the hint wins: "vllm/..." is an id at vllm-b)
                await in_thread(call, "vllm/" + BARE, {"provider": "vllm-b"})
            assert raised.value.code == "model_not_found"
            with pytest.raises(openai.BadRequestError) as raised:
                await in_thread(call, BARE, {"provider": "nope"})
            assert (raised.value.code, raised.value.param) == ("invalid_value", "provider")
            assert "'nope'" in raised.value.message
            with pytest.raises(openai.BadRequestError) as raised:
                await in_thread(call, BARE, {"provider": ["vllm"]})
            assert (raised.value.code, raised.value.param) == ("invalid_type", "provider")
    finally:
        await stop_all(gw, a, b, clients=(client,))


def _sse_refusal(fake, framing):
    """An upstream's 400 for a streamed chat whose body is an event stream (C{framing}: its events' shape), its
    message naming the upstream's address."""
    where = fake.base_url.split("//")[1].split("/")[0]
    error = {"error": {"message": f"max_tokens is too large: 9999 (at {where})", "type": "BadRequestError",
                       "param": "max_tokens", "code": 400}}
    data = json.dumps(error)
    events = {
        "data": f"data: {data}\n\ndata: [DONE]\n\n",
        "event": f"event: error\ndata: {data}\n\n",
        "crlf": f"data: {data}\r\n\r\ndata: [DONE]\r\n\r\n",
        "bare": f"data:{data}\n\n",
    }[framing]
    raw = (f"HTTP/1.1 400 Bad Request\r\nContent-Type: text/event-stream\r\nContent-Length: {len(events.encode())}"
           f"\r\n\r\n{events}")
    return where, raw


@pytest.mark.parametrize("framing", ["data", "event", "crlf", "bare"])
@pytest_twisted.ensureDeferred
async def test_sdk_hears_the_upstreams_words_in_an_error_answered_as_an_event_stream(sdk, fake, framing):
    """An upstream that refuses a streamed chat with a 400 whose body is an event stream (its error the first
    event's data, as some OpenAI-compatible servers answer one): the SDK's BadRequestError carries the upstream's
    message, type and param, its address replaced by the provider's name (before: "answered HTTP 400." only)."""
    where, raw = _sse_refusal(fake, framing)
    with pytest.raises(openai.BadRequestError) as raised:
        stream = await in_thread(sdk.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                 stream=True, max_tokens=9999, extra_body={"fake_raw": raw})
        await in_thread(_collect, stream)
    error = raised.value
    assert error.status_code == 400
    assert error.body["message"] == "max_tokens is too large: 9999 (at vllm)"
    assert (error.type, error.param) == ("BadRequestError", "max_tokens")
    assert where not in str(error.body) and where.split(":")[1] not in str(error.body)
