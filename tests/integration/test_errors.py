"""Error statuses and bodies: the gateway's own, and vLLM's passed through."""

import openai
import pytest

from tests.integration.support import CHAT_MODEL, assert_openai_error, request

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("model", ["no-such-provider/some-model", "gpt-no-such-model"])
def test_unknown_model_is_404_model_not_found(gateway, model):
    body = {"model": model, "messages": MESSAGES, "max_tokens": 2}
    assert_openai_error(request("POST", gateway.url + "/chat/completions", body, headers=gateway.auth),
                        404, code="model_not_found")


def test_unknown_model_with_the_sdk(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-provider/some-model", messages=MESSAGES, max_tokens=2)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"


def test_unknown_model_of_a_known_provider_is_404(gateway):
    body = {"model": "vllm/no-such-model", "messages": MESSAGES, "max_tokens": 2}
    assert_openai_error(request("POST", gateway.url + "/chat/completions", body, headers=gateway.auth), 404)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_vllm_400_for_max_tokens_over_the_context_passes_through(gateway, vllm, stream):
    body = {"messages": MESSAGES, "max_tokens": 5000, "stream": stream}
    direct = request("POST", vllm.chat_url + "/chat/completions", dict(body, model=CHAT_MODEL))
    assert direct.status == 400, direct
    expected = direct.json()["error"]
    assert "max_tokens" in expected["message"]

    via = request("POST", gateway.url + "/chat/completions", dict(body, model=f"vllm/{CHAT_MODEL}"),
                  headers=gateway.auth)
    err = assert_openai_error(via, 400)
    assert err["message"] == expected["message"]
    assert err["param"] == expected["param"]


def test_vllm_400_with_the_sdk(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=f"vllm/{CHAT_MODEL}", messages=MESSAGES, max_tokens=5000)
    assert info.value.status_code == 400
    assert "max_model_len=2048" in info.value.response.json()["error"]["message"]


def test_malformed_json_is_400(gateway):
    resp = request("POST", gateway.url + "/chat/completions", b'{"model": "vllm/x", "messages": [',
                   headers=dict(gateway.auth, **{"Content-Type": "application/json"}))
    assert_openai_error(resp, 400)
