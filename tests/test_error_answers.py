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
        ("GET", "/v1/files/" + long_id, None, False),
        ("GET", "/v1/batches/" + long_id, None, False),
        ("GET", "/v1/responses/" + long_id, None, False),
        ("GET", "/v1/messages/batches/" + long_id, None, True),
        ("GET", "/admin/api/v1/auth-keys/" + long_id, None, False),
        ("POST", "/v1/batches", {"input_file_id": "file-" + "x" * 1_000_000, "endpoint": "/v1/chat/completions"},
         False),
    ]
    for method, path, body, anthropic in cases:
        data = None if body is None else json.dumps(body).encode()
        response = await http.request(method, gateway.url + path, data=data,
                                      headers={"content-type": "application/json"})
        message = error_message(await treq.content(response), anthropic)
        assert response.code == 404, (path[:40], message[:100])
        assert "x" * 200 in message and "…" in message and len(message) < 400, (path[:40], len(message))
