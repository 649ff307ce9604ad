"""The rest of the vLLM surface through the gateway: Responses, embeddings, completions, rerank, passthrough."""

import base64
import struct

from tests.integration.support import (
    CHAT_MODEL, EMBED_MODEL, RERANK_MODEL, assert_openai_error, bearer, request, sse_events, stream_chunks)

MODEL = f"vllm/{CHAT_MODEL}"


def test_responses_plain(client):
    r = client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=8)
    assert r.object == "response" and r.id.startswith("resp")
    assert r.status in ("completed", "incomplete")
    assert r.output[0].type == "message"
    assert isinstance(r.output_text, str) and r.output_text
    assert 0 < r.usage.output_tokens <= 8


def test_responses_streamed(client):
    with client.responses.stream(model=MODEL, input="Say hi.", max_output_tokens=8) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created"
    assert "response.output_text.delta" in kinds
    assert kinds[-1] == "response.completed"
    assert final.output_text


def test_responses_raw_stream_has_no_done_and_ends_completed(gateway):
    r = request("POST", gateway.url + "/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 4,
                                                     "stream": True}, headers=gateway.auth)
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.body)
    assert "[DONE]" not in events
    assert '"type":"response.completed"' in events[-1].replace(" ", "")


def test_responses_follow_up_with_previous_response_id(client):
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=4)
    second = client.responses.create(model=MODEL, input="What is my name?", max_output_tokens=4,
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # vLLM folded the previous turn into the prompt: more input tokens than the question alone.
    alone = client.responses.create(model=MODEL, input="What is my name?", max_output_tokens=4)
    assert second.usage.input_tokens > alone.usage.input_tokens


def test_embeddings_float_and_base64(client, vllm):
    floats = client.embeddings.create(model=f"vllm-embed/{EMBED_MODEL}", input=["hello", "world"],
                                      encoding_format="float")
    assert len(floats.data) == 2 and len(floats.data[0].embedding) == 128
    norm = sum(x * x for x in floats.data[0].embedding) ** 0.5
    assert abs(norm - 1.0) < 1e-3
    raw = request("POST", vllm.embed_url + "/embeddings",
                  {"model": EMBED_MODEL, "input": ["hello"], "encoding_format": "base64"})
    via = client.embeddings.with_raw_response.create(model=f"vllm-embed/{EMBED_MODEL}", input=["hello"],
                                                     encoding_format="base64")
    encoded = via.http_response.json()["data"][0]["embedding"]
    assert isinstance(encoded, str) and encoded == raw.json()["data"][0]["embedding"]
    decoded = struct.unpack(f"<{len(base64.b64decode(encoded)) // 4}f", base64.b64decode(encoded))
    assert max(abs(a - b) for a, b in zip(decoded, floats.data[0].embedding)) < 1e-5


def test_completions_streamed(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, stream=True))
    assert chunks and all(c.object == "text_completion" for c in chunks)
    assert all(c.usage is None for c in chunks)  # not asked for: the forced usage chunk is removed
    with_usage = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, stream=True,
                                                stream_options={"include_usage": True}))
    assert with_usage[-1].usage.completion_tokens == 6


def test_rerank_by_qualified_model(gateway):
    body = {"model": f"vllm-rerank/{RERANK_MODEL}", "query": "python", "documents": ["snakes", "a language", "tea"],
            "top_n": 2}
    r = request("POST", gateway.url + "/rerank", body, headers=gateway.auth)
    assert r.status == 200, r
    results = r.json()["results"]
    assert len(results) == 2
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]
    score = request("POST", gateway.url + "/score", {"model": f"vllm-rerank/{RERANK_MODEL}", "text_1": "a",
                                                      "text_2": ["b", "c"]}, headers=gateway.auth)
    assert score.status == 200 and len(score.json()["data"]) == 2
    # vLLM's own paths at its root, routed by model as their /v1 forms (the Cohere SDK's /v2/rerank)
    for path in ("/rerank", "/v2/rerank"):
        r = request("POST", gateway.root + path, body, headers=gateway.auth)
        assert r.status == 200 and [x["index"] for x in r.json()["results"]] == [x["index"] for x in results], r
    r = request("POST", gateway.root + "/classify", {"model": f"vllm-rerank/{RERANK_MODEL}", "input": ["a", "b"]},
                headers=gateway.auth)
    assert r.status == 200 and len(r.json()["data"]) == 2, r


def test_passthrough_tokenize_and_guarded_detokenize(gateway, vllm):
    r = request("POST", gateway.root + "/p/vllm/tokenize", {"model": CHAT_MODEL, "prompt": "Hello"},
                headers=gateway.auth)
    direct = request("POST", vllm.chat_root + "/tokenize", {"model": CHAT_MODEL, "prompt": "Hello"})
    assert r.status == 200 and r.json() == direct.json()
    tokens = r.json()["tokens"]
    d = request("POST", gateway.root + "/p/vllm-test/detokenize", {"model": CHAT_MODEL, "tokens": tokens},
                headers=gateway.auth)
    assert d.status == 200 and "Hello" in d.json()["prompt"]
    # The key-guarded instance's /v1 is reached through /p/ too, with the gateway applying its key.
    models = request("GET", gateway.root + "/p/vllm-test/v1/models", headers=gateway.auth)
    assert models.status == 200 and models.json()["data"][0]["id"] == CHAT_MODEL
    assert request("GET", vllm.chat_key_url + "/models").status == 401


def test_passthrough_refuses_admin_routes(gateway):
    r = request("POST", gateway.root + "/p/vllm/sleep", {}, headers=gateway.auth)
    assert_openai_error(r, 403)
    r = request("POST", gateway.root + "/p/vllm/v1/load_lora_adapter", {"lora_name": "x"}, headers=gateway.auth)
    assert_openai_error(r, 403)


def test_passthrough_keeps_vllm_032s_operator_routes_from_a_managed_key(gateway, vllm):
    """vLLM 0.32 serves C{/kv_event_sources} by default: the master key reads it through /p/, a managed key gets
    403, and its operational C{abort_requests} is refused to both."""
    made = request("POST", gateway.root + "/admin/api/v1/auth-keys", {"name": "it-operator"}, headers=gateway.auth)
    assert made.status == 201, made
    key = bearer(made.json()["value"])
    r = request("GET", gateway.root + "/p/vllm/kv_event_sources", headers=gateway.auth)
    direct = request("GET", vllm.chat_root + "/kv_event_sources")
    assert r.status == 200 and r.json() == direct.json()
    assert_openai_error(request("GET", gateway.root + "/p/vllm/kv_event_sources", headers=key), 403)
    assert_openai_error(request("POST", gateway.root + "/p/vllm/abort_requests", {"request_ids": ["x"]},
                                headers=gateway.auth), 403)


def test_passthrough_reaches_vllms_structured_decisions_under_v1(gateway, vllm):
    """vLLM 0.32 serves C{/v1/systemone} under /v1 alone: the gateway's answer is vLLM's own (the tiny model
    has no structured decisions: its 501), not the root's 404."""
    body = {"model": CHAT_MODEL, "state": "The sky is blue.",
            "questions": {"q1": {"type": "choice", "instructions": "Which colour?", "criteria": ["blue", "red"]}}}
    direct = request("POST", vllm.chat_root + "/v1/systemone", body)
    assert direct.status != 404, direct
    r = request("POST", gateway.root + "/p/vllm/v1/systemone", body, headers=gateway.auth)
    assert (r.status, r.json()) == (direct.status, direct.json())


def test_passthrough_streams_sse(gateway):
    r = request("POST", gateway.root + "/p/vllm/v1/chat/completions",
                {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                 "stream": True}, headers=gateway.auth)
    chunks, done = stream_chunks(r.body)
    assert r.status == 200 and done and chunks
