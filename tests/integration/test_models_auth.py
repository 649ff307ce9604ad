"""Model discovery and authentication, through the gateway and straight to vLLM."""

import openai
import pytest

from tests.integration.support import (
    CHAT_MODEL,
    EXPECTED_MODEL_IDS,
    PROVIDERS,
    assert_openai_error,
    bearer,
    request,
)

MESSAGES = [{"role": "user", "content": "Tell me about the gateway."}]


def _upstream_models(vllm):
    """Each provider's own /v1/models entry, asked of vLLM directly."""
    urls = {
        "vllm": (vllm.chat_url, {}),
        "vllm-test": (vllm.chat_key_url, bearer(vllm.chat_key)),
        "vllm-embed": (vllm.embed_url, {}),
        "vllm-rerank": (vllm.rerank_url, {}),
    }
    out = {}
    for provider, (url, headers) in urls.items():
        resp = request("GET", url + "/models", headers=headers)
        assert resp.status == 200, (provider, resp)
        (entry,) = [m for m in resp.json()["data"] if m["id"] == PROVIDERS[provider]]
        out[provider] = entry
    return out


def test_models_list_has_prefixed_ids_and_upstream_fields(gateway, vllm):
    resp = request("GET", gateway.url + "/models", headers=gateway.auth)
    assert resp.status == 200, resp
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert EXPECTED_MODEL_IDS <= set(by_id), sorted(by_id)

    upstream = _upstream_models(vllm)
    for provider, model in PROVIDERS.items():
        entry = by_id[f"{provider}/{model}"]
        assert entry["object"] == "model", entry
        assert entry["owned_by"] == provider, entry
        up = upstream[provider]
        # The upstream's other fields are kept: vLLM's max_model_len above all.
        assert entry.get("max_model_len") == up["max_model_len"], (entry, up)
        missing = set(up) - set(entry)
        assert not missing, f"{provider}: gateway dropped upstream fields {sorted(missing)}"
    assert by_id[f"vllm/{CHAT_MODEL}"]["max_model_len"] == 2048


def test_models_list_with_the_sdk(client):
    ids = {m.id for m in client.models.list()}
    assert EXPECTED_MODEL_IDS <= ids, sorted(ids)


def test_retrieve_one_model_with_slashes_in_its_id(client):
    model = client.models.retrieve(f"vllm-test/{CHAT_MODEL}")
    assert model.id == f"vllm-test/{CHAT_MODEL}"
    assert model.owned_by == "vllm-test"


def test_health_needs_no_key(gateway):
    assert request("GET", gateway.root + "/health").status == 200


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-key"},
    {"Authorization": "Basic Zm9vOmJhcg=="},
], ids=["no-header", "wrong-key", "not-bearer"])
def test_gateway_requires_the_master_key(gateway, headers):
    err = assert_openai_error(request("GET", gateway.url + "/models", headers=headers), 401)
    assert "authentication" in err["type"] or err["type"] == "invalid_request_error", err
    body = {"model": f"vllm/{CHAT_MODEL}", "messages": MESSAGES, "max_tokens": 2}
    assert_openai_error(request("POST", gateway.url + "/chat/completions", body, headers=headers), 401)


def test_sdk_with_a_wrong_key_gets_authentication_error(gateway):
    bad = openai.OpenAI(base_url=gateway.url, api_key="not-the-master-key", timeout=30, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model=f"vllm/{CHAT_MODEL}", messages=MESSAGES, max_tokens=2)
    assert info.value.status_code == 401


def test_upstream_key_is_not_a_gateway_key(gateway, vllm):
    """The vLLM key opens vLLM, not the gateway."""
    resp = request("GET", gateway.url + "/models", headers=bearer(vllm.chat_key))
    assert_openai_error(resp, 401)


def test_key_guarded_vllm_is_really_guarded(vllm):
    body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 2}
    no_key = request("POST", vllm.chat_key_url + "/chat/completions", body)
    assert no_key.status == 401, no_key
    wrong = request("POST", vllm.chat_key_url + "/chat/completions", body, headers=bearer("nope"))
    assert wrong.status == 401, wrong
    ok = request("POST", vllm.chat_key_url + "/chat/completions", body, headers=bearer(vllm.chat_key))
    assert ok.status == 200, ok


def test_key_guarded_vllm_through_the_gateway(client, direct):
    """The client holds only the master key; the gateway applies vllm-test's own key upstream."""
    through = client.chat.completions.create(
        model=f"vllm-test/{CHAT_MODEL}", messages=MESSAGES, max_tokens=4)
    assert through.object == "chat.completion"
    assert len(through.choices) == 1
    assert through.choices[0].message.role == "assistant"
    same = direct.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=4)
    assert through.usage.prompt_tokens == same.usage.prompt_tokens


def test_key_guarded_vllm_streams_through_the_gateway(client):
    stream = client.chat.completions.create(
        model=f"vllm-test/{CHAT_MODEL}", messages=MESSAGES, max_tokens=4, stream=True)
    chunks = list(stream)
    assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")
