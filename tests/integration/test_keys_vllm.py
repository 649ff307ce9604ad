"""A managed key on real vLLM: chat, stream, Responses and embeddings, its rate-limit headers, and cache_salt accepted
by vLLM."""

import json

from tests.integration.support import CHAT_MODEL, EMBED_MODEL, RERANK_MODEL, bearer, request, sse_events

CHAT = f"vllm/{CHAT_MODEL}"
MESSAGES = [{"role": "user", "content": "Count to three."}]


def _key(gateway, **fields):
    answer = request("POST", gateway.root + "/admin/api/v1/auth-keys", body=dict({"name": "it"}, **fields),
                     headers=gateway.auth)
    assert answer.status == 201, answer.body
    return json.loads(answer.body)


def test_a_managed_key_on_real_vllm(gateway):
    key = _key(gateway, user_path="/it/team", rpm=1000, tpm=1000000, models=["vllm/", "vllm-embed/", "vllm-rerank/"],
               budgets=[{"period": "daily", "max_tokens": 1000000}])
    auth = bearer(key["value"])

    # Chat: vLLM takes the cache_salt the gateway adds (it would answer 400 to a malformed one).
    answer = request("POST", gateway.url + "/chat/completions", headers=auth,
                     body={"model": CHAT, "messages": MESSAGES, "max_tokens": 4, "cache_salt": "client-own"})
    assert answer.status == 200, answer.body
    assert json.loads(answer.body)["usage"]["completion_tokens"] >= 1
    assert answer.headers["x-ratelimit-limit-requests"] == "1000"

    answer = request("POST", gateway.url + "/chat/completions", headers=auth,
                     body={"model": CHAT, "messages": MESSAGES, "max_tokens": 4, "stream": True})
    assert answer.status == 200
    events = sse_events(answer.body)
    assert events[-1] == "[DONE]" and any(json.loads(e)["choices"] for e in events[:-1])

    # Responses: vLLM's Responses API takes the tenant's cache_salt as its chat does.
    answer = request("POST", gateway.url + "/responses", headers=auth,
                     body={"model": CHAT, "input": "Count to three.", "max_output_tokens": 4, "store": False})
    assert answer.status == 200, answer.body
    assert json.loads(answer.body)["status"] in ("completed", "incomplete")

    answer = request("POST", gateway.url + "/embeddings", headers=auth,
                     body={"model": f"vllm-embed/{EMBED_MODEL}", "input": "hello there"})
    assert answer.status == 200 and json.loads(answer.body)["data"][0]["embedding"]
    # Pooling requests take the tenant's cache_salt too (rerank and score are vLLM's pooling as well).
    answer = request("POST", gateway.url + "/rerank", headers=auth,
                     body={"model": f"vllm-rerank/{RERANK_MODEL}", "query": "cats", "documents": ["a cat", "a car"]})
    assert answer.status == 200 and len(json.loads(answer.body)["results"]) == 2, answer.body

    # Outside its allowlist, and deactivated.
    answer = request("POST", gateway.url + "/chat/completions", headers=auth,
                     body={"model": f"vllm-test/{CHAT_MODEL}", "messages": MESSAGES, "max_tokens": 4})
    assert answer.status == 403 and json.loads(answer.body)["error"]["code"] == "model_access_denied"
    request("POST", gateway.root + f"/admin/api/v1/auth-keys/{key['id']}/deactivate", headers=gateway.auth)
    answer = request("POST", gateway.url + "/chat/completions", headers=auth,
                     body={"model": CHAT, "messages": MESSAGES, "max_tokens": 4})
    assert answer.status == 401


def test_priorities_reach_a_vllm_that_schedules_by_priority(gateway):
    """vllm-test runs with --scheduling-policy priority (any other vLLM refuses a priority but 0): a key's
    priority and X-Request-Priority reach it on chat and Responses, and on Messages translated (vLLM's
    Messages API has no priority field)."""
    key = _key(gateway, priority=-3, models=["vllm-test/"])
    model = f"vllm-test/{CHAT_MODEL}"
    for auth in (bearer(key["value"]), dict(gateway.auth, **{"X-Request-Priority": "7"})):
        answer = request("POST", gateway.url + "/chat/completions", headers=auth,
                         body={"model": model, "messages": MESSAGES, "max_tokens": 4})
        assert answer.status == 200, answer.body
        answer = request("POST", gateway.url + "/responses", headers=auth,
                         body={"model": model, "input": "Count to three.", "max_output_tokens": 4, "store": False})
        assert answer.status == 200, answer.body
        answer = request("POST", gateway.url + "/messages", headers=dict(auth, **{"anthropic-version": "2023-06-01"}),
                         body={"model": model, "messages": MESSAGES, "max_tokens": 4})
        assert answer.status == 200 and json.loads(answer.body)["type"] == "message", answer.body


def test_vllms_other_generating_routes_take_a_managed_keys_salt_and_priority(gateway):
    """vLLM 0.32's C{/v1/chat/completions/batch} and C{/generative_scoring}, through C{/p/}, get a managed key's
    tenant salt and priority in place of its body's own, and the priority-scheduling vLLM takes them."""
    key = _key(gateway, models=["vllm-test/"], priority=4)
    auth = bearer(key["value"])
    conversations = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "Count to three."}]]
    answer = request("POST", gateway.root + "/p/vllm-test/v1/chat/completions/batch", headers=auth,
                     body={"model": CHAT_MODEL, "messages": conversations, "max_tokens": 2, "priority": -9,
                           "cache_salt": "client-own"})
    assert answer.status == 200, answer.body
    assert [c["index"] for c in json.loads(answer.body)["choices"]] == [0, 1]
    answer = request("POST", gateway.root + "/p/vllm-test/generative_scoring", headers=auth,
                     body={"model": CHAT_MODEL, "query": "Is it?", "items": ["yes", "no"], "label_token_ids": [5, 6],
                           "priority": -9})
    assert answer.status == 200, answer.body
    assert len(json.loads(answer.body)["data"]) == 2
