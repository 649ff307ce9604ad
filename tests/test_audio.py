"""POST /v1/audio/transcriptions and /v1/audio/translations: multipart forms routed by their model field."""

import json

import openai
import pytest
import pytest_twisted
import treq

from gomodel import jsonutil
from tests.support import in_thread, openai_client, start_fake, start_gateway, stop_all, with_timeout

ASR = "openai/whisper-large-v3"
MODEL = "vllm/" + ASR
MASTER = "sk-master-audio"
AUDIO = b"RIFF\x00\x01\x02\xff\r\n--not-a-boundary\r\n" + bytes(range(256))  # (binary, CRLF and all)


def form(fields, file=AUDIO, boundary="b0und"):
    """A multipart body of C{fields} (name -> text, or a list of texts) and a C{file} part, and its type."""
    parts = []
    for name, values in fields.items():
        for value in values if isinstance(values, list) else [values]:
            parts.append(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode())
    if file is not None:
        parts.append(b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav'
                     b"\r\n\r\n" + file)
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return body + b"--" + boundary.encode() + b"--\r\n", f"multipart/form-data; boundary={boundary}"


async def post_form(http, gw, fields, path="/v1/audio/transcriptions", key=MASTER, **options):
    body, kind = form(fields, **options)
    response = await http.post(gw.url + path, data=body,
                               headers={"content-type": kind, "authorization": f"Bearer {key}"})
    return response, await treq.content(response)


@pytest_twisted.async_yield_fixture()
async def audio(reactor, tmp_path):
    """C{(gateway, fake)}: a gateway (master key L{MASTER}) in front of a fake vLLM serving an ASR model."""
    fake = await start_fake(reactor, models=(ASR,))
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                       "GOMODEL_DATA_DIR": str(tmp_path)})
    yield gw, fake
    await stop_all(gw, fake)


@pytest_twisted.ensureDeferred
async def test_the_openai_sdk_transcribes_and_translates_through_the_gateway(audio):
    # Before: 404 "Unknown route" (the passthrough the only way, with no model routing, keys' rules or usage).
    gw, fake = audio
    client = openai_client(gw, MASTER)
    try:
        answer = await in_thread(client.audio.transcriptions.create, model=MODEL, file=("a.wav", AUDIO),
                                 language="en", prompt="say hé", temperature=0.2,
                                 timestamp_granularities=["word", "segment"], response_format="verbose_json")
        assert answer.text == "hé there" and answer.segments[0].end == 1.0
        seen = fake.last_request()
        assert seen.path == b"/v1/audio/transcriptions"
        assert seen.form["model"] == ASR and seen.form["file"] == AUDIO  # the file byte for byte
        assert (seen.form["language"], seen.form["prompt"], seen.form["temperature"]) == ("en", "say hé", "0.2")
        assert seen.raw_body.count(b'name="timestamp_granularities[]"') == 2
        assert b"stream_include_usage" not in seen.raw_body
        for kind, shown in (("text", "hé there"), ("srt", "1\n00:00:00,000 --> 00:00:01,000\nhé there\n"),
                            ("vtt", "WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nhé there\n")):
            text = await in_thread(client.audio.transcriptions.create, model=MODEL, file=("a.wav", AUDIO),
                                   response_format=kind)
            assert text == shown, kind
        translated = await in_thread(client.audio.translations.create, model=MODEL, file=("a.wav", AUDIO))
        assert translated.text == "hé there" and fake.last_request().path == b"/v1/audio/translations"
    finally:
        client.close()
    await gw.service.usage.flush()
    records, _ = await gw.service.store.usage.log(0, 2e9, 10)
    assert [(r["endpoint"], r["model"], r["status_code"]) for r in records][:2] == [
        ("/v1/audio/translations", MODEL, 200), ("/v1/audio/transcriptions", MODEL, 200)]


@pytest_twisted.ensureDeferred
async def test_text_answers_keep_their_content_type(http, audio):
    gw, _ = audio
    response, content = await post_form(http, gw, {"model": MODEL, "response_format": "srt"})
    assert response.code == 200, content
    assert response.headers.getRawHeaders("content-type") == ["text/plain; charset=utf-8"]
    assert content.decode() == "1\n00:00:00,000 --> 00:00:01,000\nhé there\n"


@pytest_twisted.ensureDeferred
async def test_a_silent_recordings_empty_text_answer_is_relayed(http, audio):
    """A silent recording's transcription as text is an empty 200 (text/plain): it is relayed as that empty text.
    Before, the gateway's check for an upstream's success without a body (a 204, an empty 200) made it a 502
    bad_upstream_response."""
    gw, fake = audio
    fake.transcript = ""
    for kind in ("text", "json"):
        response, content = await post_form(http, gw, {"model": MODEL, "response_format": kind})
        assert response.code == 200, content
        assert (content == b"") if kind == "text" else (json.loads(content)["text"] == ""), content


@pytest_twisted.ensureDeferred
async def test_a_stream_is_relayed_its_usage_recorded_and_kept_from_a_client_that_asked_none(http, audio):
    gw, fake = audio
    response, content = await post_form(http, gw, {"model": MODEL, "stream": "true"})
    assert response.code == 200, content
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream; charset=utf-8"]
    events = [line[6:] for line in content.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "hé there"
    assert all("usage" not in c for c in chunks)  # (asked for upstream on the client's behalf, taken out)
    assert fake.last_request().form["stream_include_usage"] == "true"
    response, content = await post_form(http, gw, {"model": MODEL, "stream": "true", "stream_include_usage": "true"})
    assert json.loads(content.decode().split("\n\n")[-3][6:])["usage"]["completion_tokens"] == 3
    await gw.service.usage.flush()
    records, _ = await gw.service.store.usage.log(0, 2e9, 10)
    assert [(r["stream"], r["input_tokens"], r["output_tokens"], r["estimated"]) for r in records] == [
        (True, 9, 3, False)] * 2


@pytest_twisted.ensureDeferred
async def test_forms_without_a_model_or_of_another_type_or_an_unknown_model_get_openai_errors(http, audio):
    gw, fake = audio
    sent = len(fake.forwarded())
    response, content = await post_form(http, gw, {"language": "en"})
    assert response.code == 400 and jsonutil.loads(content)["error"]["code"] == "missing_required_parameter"
    response, content = await post_form(http, gw, {"model": "vllm/nope"})
    assert response.code == 404 and jsonutil.loads(content)["error"]["code"] == "model_not_found"
    # no file: the upstream was asked anyway (FastAPI's validation error from vLLM, after a slot, a limit's charge
    # and a record), OpenAI's SDK told nothing of which field
    response, content = await post_form(http, gw, {"model": MODEL}, file=None)
    error = jsonutil.loads(content)["error"]
    assert (response.code, error["code"], error["param"]) == (400, "missing_required_parameter", "file"), content
    response = await http.post(gw.url + "/v1/audio/transcriptions", data=json.dumps({"model": MODEL}).encode(),
                               headers={"content-type": "application/json", "authorization": f"Bearer {MASTER}"})
    assert response.code == 400
    assert jsonutil.loads(await treq.content(response))["error"]["code"] == "invalid_content_type"
    body, kind = form({"model": MODEL})
    response = await http.post(gw.url + "/v1/audio/transcriptions", data=body[:-10],  # (cut before its end)
                               headers={"content-type": kind, "authorization": f"Bearer {MASTER}"})
    assert response.code == 400
    assert jsonutil.loads(await treq.content(response))["error"]["code"] == "invalid_multipart"
    body, kind = form({"model": MODEL})  # (a part's text in a charset no codec reads: it was "not valid UTF-8")
    response = await http.post(gw.url + "/v1/audio/transcriptions", headers={
        "content-type": kind, "authorization": f"Bearer {MASTER}"}, data=body.replace(
            b'name="model"', b'name="model"\r\nContent-Type: text/plain; charset=x-unheard-of'))
    error = jsonutil.loads(await treq.content(response))["error"]
    assert (response.code, error["param"], error["code"]) == (400, "model", "invalid_value"), error
    assert "x-unheard-of" in error["message"] and "is not valid" not in error["message"], error
    body, kind = form({"model": "abc-9999999999"})  # (a codec that fails its text with a UnicodeError: was a 500)
    response = await http.post(gw.url + "/v1/audio/transcriptions", headers={
        "content-type": kind, "authorization": f"Bearer {MASTER}"}, data=body.replace(
            b'name="model"', b'name="model"\r\nContent-Type: text/plain; charset=punycode'))
    error = jsonutil.loads(await treq.content(response))["error"]
    assert (response.code, error["param"], error["code"]) == (400, "model", "invalid_value"), error
    assert "is not valid punycode" in error["message"], error
    assert len(fake.forwarded()) == sent


async def _managed_key(http, gw, **fields) -> dict:
    """A managed key named team, made with C{fields} through the admin API: its record, its secret as C{value}."""
    made = await http.post(gw.url + "/admin/api/v1/auth-keys", data=json.dumps(dict(name="team", **fields)).encode(),
                           headers={"authorization": f"Bearer {MASTER}"})
    return jsonutil.loads(await treq.content(made))


@pytest_twisted.ensureDeferred
async def test_a_managed_key_transcribes_only_with_models_it_may_use(http, audio):
    gw, fake = audio
    key = (await _managed_key(http, gw, models=["vllm/some-other-model"]))["value"]
    client = openai_client(gw, key)
    try:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await in_thread(client.audio.transcriptions.create, model=MODEL, file=("a.wav", AUDIO))
        assert denied.value.code == "model_access_denied"
    finally:
        client.close()
    assert all(r.path != b"/v1/audio/transcriptions" for r in fake.requests)


@pytest_twisted.ensureDeferred
async def test_a_token_limit_is_charged_for_the_forms_text_not_for_the_audio_file(http, audio):
    # The limits estimated a request's tokens as its body's bytes / 4: a key with a tokens-per-minute limit was
    # refused any recording above 4 bytes a token ("Request too large", 429), a 30 s WAV (1 MB) past 250,000.
    gw, fake = audio
    key = (await _managed_key(http, gw, tpm=1000))["value"]
    response, content = await post_form(http, gw, {"model": MODEL, "prompt": "names: Zoë"}, key=key,
                                        file=AUDIO * 400)  # (about 100 KB)
    assert response.code == 200, content
    assert fake.last_request().form["file"] == AUDIO * 400


@pytest_twisted.ensureDeferred
async def test_the_passthroughs_audio_form_is_not_charged_its_file_either(http, audio):
    # /p/{provider}/v1/audio/...: the same form, relayed raw; its limits' estimate was the whole body's bytes / 4.
    gw, fake = audio
    key = (await _managed_key(http, gw, tpm=1000))["value"]
    response, content = await post_form(http, gw, {"model": ASR}, key=key, file=AUDIO * 400,
                                        path="/p/vllm/v1/audio/transcriptions")
    assert response.code == 200, content
    assert fake.last_request().form["file"] == AUDIO * 400


@pytest_twisted.ensureDeferred
async def test_a_model_that_does_no_speech_recognition_is_a_404_that_says_so(http, audio):
    # vLLM serves /v1/audio/* only for an ASR model: FastAPI's bare 404 elsewhere; the error said rerank and
    # embeddings need a pooling model, nothing of audio.
    gw, fake = audio
    fake.audio = False
    response, content = await post_form(http, gw, {"model": MODEL})
    assert response.code == 404
    message = jsonutil.loads(content)["error"]["message"]
    assert "does not serve this endpoint" in message and "speech" in message, message


@pytest_twisted.ensureDeferred
async def test_an_openai_compatible_providers_stream_is_relayed_as_it_streams_it(reactor, http):
    # OpenAI's transcription stream ends with transcript.text.done (its usage in it), no [DONE]: read as vLLM's
    # (its usage asked for with vLLM's stream_include_usage) it was cut short, an error event after the text.
    other = await start_fake(reactor, models=(ASR,))
    other.audio = "openai"
    gw = await start_gateway(reactor, {"OPENAI_OTHER_BASE_URL": other.base_url, "OPENAI_OTHER_API_KEY": "sk-up",
                                       "GOMODEL_MASTER_KEY": MASTER})
    try:
        response, content = await post_form(http, gw, {"model": "openai-other/" + ASR, "stream": "true"})
        assert response.code == 200, content
        events = [json.loads(line[6:]) for line in content.decode().split("\n\n") if line]
        assert [e["type"] for e in events] == ["transcript.text.delta"] * 2 + ["transcript.text.done"]
        assert events[-1]["usage"]["input_tokens"] == 9
        assert "stream_include_usage" not in other.last_request().form
        await gw.service.usage.flush()
        records, _ = await gw.service.store.usage.log(0, 2e9, 10)
        assert [(r["status_code"], r["input_tokens"], r["output_tokens"]) for r in records] == [(200, 9, 3)]
    finally:
        await stop_all(gw, other)


@pytest_twisted.ensureDeferred
async def test_a_virtual_models_fallback_gets_the_form_with_its_own_model(reactor, http):
    a, b = await start_fake(reactor, models=("whisper-a",)), await start_fake(reactor, models=("whisper-b",))
    a.audio = 503
    virtual = [{"source": "asr", "targets": [{"model": "vllm-a/whisper-a"}, {"model": "vllm-b/whisper-b"}]}]
    gw = await start_gateway(reactor, {"VLLM_A_BASE_URL": a.base_url, "VLLM_B_BASE_URL": b.base_url,
                                       "VIRTUAL_MODELS": json.dumps(virtual), "GOMODEL_MASTER_KEY": MASTER})
    try:
        for _ in range(2):  # (one of them drawn to vllm-a first)
            response, content = await post_form(http, gw, {"model": "asr", "language": "en"})
            assert response.code == 200, content
        assert any(r.path == b"/v1/audio/transcriptions" and r.form["model"] == "whisper-a" for r in a.requests)
        sent = [r.form for r in b.requests if r.path == b"/v1/audio/transcriptions"]
        assert len(sent) == 2 and all(f["model"] == "whisper-b" and f["file"] == AUDIO and f["language"] == "en"
                                      for f in sent)
    finally:
        await stop_all(gw, a, b)


@pytest_twisted.ensureDeferred
async def test_a_fallback_to_another_providers_type_gets_its_own_stream_handling(reactor, http):
    # The stream's handling (vLLM's usage fields in the form, the observer of its events) was the first target's for
    # every attempt: a vLLM falling back to an OpenAI provider sent OpenAI vLLM's stream_include_usage, and its
    # typed events were read as vLLM's chunks (cut short: an error event after the text).
    a, b = await start_fake(reactor, models=("whisper-a",)), await start_fake(reactor, models=("whisper-b",))
    a.audio, b.audio = 503, "openai"
    virtual = [{"source": "asr", "targets": [{"model": "vllm-a/whisper-a"}, {"model": "openai-other/whisper-b"}]}]
    gw = await start_gateway(reactor, {"VLLM_A_BASE_URL": a.base_url, "OPENAI_OTHER_BASE_URL": b.base_url,
                                       "OPENAI_OTHER_API_KEY": "sk-up", "VIRTUAL_MODELS": json.dumps(virtual),
                                       "GOMODEL_MASTER_KEY": MASTER})
    try:
        for _ in range(2):  # (one of them drawn to vllm-a first)
            response, content = await post_form(http, gw, {"model": "asr", "stream": "true"})
            assert response.code == 200, content
            events = [json.loads(line[6:]) for line in content.decode().split("\n\n") if line]
            assert [e["type"] for e in events] == ["transcript.text.delta"] * 2 + ["transcript.text.done"], events
        assert any(r.path == b"/v1/audio/transcriptions" and r.form["stream_include_usage"] == "true"
                   for r in a.requests)
        sent = [r.form for r in b.requests if r.path == b"/v1/audio/transcriptions"]
        assert len(sent) == 2 and all(f["model"] == "whisper-b" and "stream_include_usage" not in f
                                      and "stream_continuous_usage_stats" not in f for f in sent), sent
        await gw.service.usage.flush()
        records, _ = await gw.service.store.usage.log(0, 2e9, 10)
        assert [(r["status_code"], r["input_tokens"], r["output_tokens"]) for r in records] == [(200, 9, 3)] * 2
    finally:
        await stop_all(gw, a, b)


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_transcription_billed_in_seconds_records_and_prices_them(reactor, http, tmp_path):
    # OpenAI's whisper (and vLLM's) usage is {"type": "duration", "seconds": N}: it was recorded as 0 tokens, with
    # no cost whatever the price, and a key's cost budget never counted it.
    from tests.test_metrics import scrape, value

    fake = await start_fake(reactor, models=(ASR,))
    fake.audio_seconds = 90
    config = tmp_path / "g.yaml"
    config.write_text(f"pricing:\n  {MODEL}: {{audio_per_minute: 0.6, input_per_mtok: 1}}\n")
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                       "GOMODEL_DATA_DIR": str(tmp_path / "d")}, str(config))
    try:
        key = await _managed_key(http, gw, budgets=[{"period": "daily", "max_cost": 1}])
        for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):  # 0.9 each: the second one still in
            response, content = await post_form(http, gw, {"model": MODEL}, path=path, key=key["value"])
            assert response.code == 200, content
        response, content = await post_form(http, gw, {"model": MODEL}, key=key["value"])
        assert response.code == 429 and jsonutil.loads(content)["error"]["code"] == "budget_exceeded", content
        response, content = await post_form(http, gw, {"model": MODEL, "stream": "true"})  # (its usage in tokens)
        assert response.code == 200, content
        await gw.service.usage.flush()
        records, _ = await gw.service.store.usage.log(0, 2e9, 10)
        assert [(r["audio_seconds"], r["input_tokens"], r["input_cost"], r["total_cost"]) for r in records] == [
            (None, 9, pytest.approx(9e-6), pytest.approx(9e-6)), (None, 0, 0.0, 0.0)  # (the refused one)
        ] + [(90, 0, pytest.approx(0.9), pytest.approx(0.9))] * 2
        summary = jsonutil.loads(await treq.content(await http.get(
            gw.url + "/admin/api/v1/usage/summary", headers={"authorization": f"Bearer {MASTER}"})))
        assert summary["audio_seconds"] == 180 and summary["total_cost"] == pytest.approx(1.8 + 9e-6)
        found = await scrape(http, gw, {"authorization": f"Bearer {MASTER}"})
        assert value(found, "gomodel_audio_seconds_total", provider_name="vllm", model=MODEL) == 180
        assert value(found, "gomodel_cost_total", model=MODEL) == pytest.approx(1.8 + 9e-6)
        assert value(found, "gomodel_auth_key_cost_total", auth_key_id=key["id"]) == pytest.approx(1.8)
    finally:
        await stop_all(gw, fake)


@pytest_twisted.ensureDeferred
async def test_the_openai_sdk_makes_speech_through_the_gateway_whole_or_streamed(reactor, http):
    # POST /v1/audio/speech (text to speech) was a 404 "Unknown route": only the passthrough, unrouted, unlimited.
    from tests.fakes.vllm import SPEECH

    other = await start_fake(reactor, models=("tts-1",))
    other.audio = "openai"
    gw = await start_gateway(reactor, {"OPENAI_OTHER_BASE_URL": other.base_url, "OPENAI_OTHER_API_KEY": "sk-up",
                                       "GOMODEL_MASTER_KEY": MASTER})
    client = openai_client(gw, MASTER)
    try:  # (the client closed before the gateway and the fake are stopped)
        spoken = await in_thread(client.audio.speech.create, model="openai-other/tts-1", voice="alloy", input="hé")
        assert spoken.content == SPEECH and spoken.response.headers["content-type"] == "audio/mpeg"
        seen = other.last_request()
        assert seen.path == b"/v1/audio/speech" and seen.body == {"model": "tts-1", "voice": "alloy", "input": "hé"}
        assert seen.header(b"authorization") == "Bearer sk-up"
        streamed = await in_thread(client.audio.speech.create, model="openai-other/tts-1", voice="alloy",
                                   input="hé", stream_format="sse")
        events = [json.loads(line[6:]) for line in streamed.content.decode().split("\n\n") if line]
        assert [e["type"] for e in events] == ["speech.audio.delta"] * 2 + ["speech.audio.done"]
        with pytest.raises(openai.NotFoundError) as missing:
            await in_thread(client.audio.speech.create, model="openai-other/nope", voice="alloy", input="hé")
        assert missing.value.code == "model_not_found"
        # A long speech's first bytes reach the client as they come (they play before its end): the gateway read
        # it whole first, the time to first audio the whole speech's.
        heard = []

        def first(data):
            heard.append(data)
            other.release_speech()

        response = await with_timeout(reactor, http.post(
            gw.url + "/v1/audio/speech", headers={"authorization": f"Bearer {MASTER}"}, data=json.dumps(
                {"model": "openai-other/tts-1", "voice": "alloy", "input": "hé", "fake_hold_speech": True}).encode()),
            10)
        await with_timeout(reactor, treq.collect(response, first), 10)
        assert response.code == 200 and b"".join(heard) == SPEECH and heard[0] == SPEECH[:4]
        # A proxy's text page is no speech (only a transcription answers in text): a 502, as on every other route
        response = await http.post(gw.url + "/v1/audio/speech", headers={"authorization": f"Bearer {MASTER}"},
                                   data=json.dumps({"model": "openai-other/tts-1", "voice": "alloy", "input": "hé",
                                                    "fake_text_page": True}).encode())
        error = jsonutil.loads(await treq.content(response))["error"]
        assert (response.code, error["code"]) == (502, "bad_upstream_response"), error
        await gw.service.usage.flush()
        records, _ = await gw.service.store.usage.log(0, 2e9, 10)
        assert [(r["endpoint"], r["stream"], r["input_tokens"], r["output_tokens"]) for r in records] == [
            ("/v1/audio/speech", False, None, None), ("/v1/audio/speech", False, None, None),
            ("/v1/audio/speech", True, 5, 40),
            ("/v1/audio/speech", False, None, None)]
    finally:
        client.close()
        await stop_all(gw, other)


@pytest_twisted.ensureDeferred
async def test_an_audio_file_as_large_as_openai_takes_is_transcribed_while_chat_keeps_its_limit(http, audio):
    """OpenAI takes audio files up to 25 MB: the gateway refused every form past BODY_SIZE_LIMIT (10 MiB) with a 413,
    so a 15 MB recording an SDK sends to OpenAI failed through it. The audio routes take AUDIO_BODY_SIZE_LIMIT
    (26 MiB: such a file and its form's fields); every other route keeps BODY_SIZE_LIMIT."""
    gw, fake = audio
    big = AUDIO * (20 * 1024 * 1024 // len(AUDIO))  # 20 MiB
    client = openai_client(gw, MASTER)
    try:
        answer = await in_thread(client.audio.transcriptions.create, model=MODEL, file=("a.wav", big))
        [seen] = [r for r in fake.requests if r.path == b"/v1/audio/transcriptions"]
        assert answer.text == "hé there" and seen.form["file"] == big
    finally:
        client.close()
    response, body = await post_form(http, gw, {"model": MODEL}, file=AUDIO * (27 * 1024 * 1024 // len(AUDIO)))
    error = json.loads(body)["error"]
    assert response.code == 413 and "AUDIO_BODY_SIZE_LIMIT" in error["message"], error
    response = await http.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {MASTER}"},
                               data=b'{"model": "x", "pad": "' + b"x" * (11 * 1024 * 1024) + b'"}')
    error = json.loads(await treq.content(response))["error"]
    assert response.code == 413 and "(BODY_SIZE_LIMIT)" in error["message"], error


@pytest_twisted.ensureDeferred
async def test_an_audio_route_takes_bodies_up_to_the_larger_of_both_limits(reactor, http):
    """An operator who raised BODY_SIZE_LIMIT past AUDIO_BODY_SIZE_LIMIT has audio bodies held to no less."""
    fake = await start_fake(reactor, models=(ASR,))
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                       "BODY_SIZE_LIMIT": "2M", "AUDIO_BODY_SIZE_LIMIT": "1M"})
    try:
        response, body = await post_form(http, gw, {"model": MODEL}, file=AUDIO * (1536 * 1024 // len(AUDIO)))
        assert response.code == 200, body
        response, body = await post_form(http, gw, {"model": MODEL}, file=AUDIO * (3 * 1024 * 1024 // len(AUDIO)))
        assert response.code == 413 and "AUDIO_BODY_SIZE_LIMIT" in json.loads(body)["error"]["message"], body
    finally:
        await stop_all(gw, fake)


def test_a_forms_rebuilt_body_copies_its_file_once():
    """The form sent upstream holds the file's bytes once more than the parsed form does: not two or three
    more (an audio body may be 26 MiB; every copy was held while the request ran). tracemalloc counts bytes,
    not time: the same figure on any machine."""
    import tracemalloc

    from gomodel.api.uploads import Form

    recording = bytes(range(256)) * (8 << 10)  # 2 MiB
    body, kind = form({"model": "whisper", "language": "en"}, file=recording)
    parsed = Form(kind, body)
    tracemalloc.start()
    try:
        made = parsed.body({"model": "upstream-whisper"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert made == form({"model": "upstream-whisper", "language": "en"}, file=recording, boundary="b0und")[0]
    assert len(recording) < peak < 1.25 * len(recording)
