"""Usage records and metrics equal to what real vLLM reported, for chat, streams, responses and embeddings."""

import json
import secrets

from tests.integration.support import (CHAT_MODEL, EMBED_MODEL, metric_with_label, request, sse_events, usage_record,
                                       wait_for)

CHAT = f"vllm/{CHAT_MODEL}"
MESSAGES = [{"role": "user", "content": "Count to three."}]


def _call(gateway, path, body):
    """POST through the gateway under our own request id; (status, body, request id)."""
    request_id = "it-" + secrets.token_hex(8)
    answer = request("POST", gateway.url + path, body=body, headers=dict(gateway.auth, **{"X-Request-Id": request_id}))
    return answer, request_id


def test_usage_records_equal_vllms_usage(gateway):
    answer, rid = _call(gateway, "/chat/completions", {"model": CHAT, "messages": MESSAGES, "max_tokens": 4})
    usage = json.loads(answer.body)["usage"]
    record = usage_record(gateway, rid)
    assert (record["input_tokens"], record["output_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert record["replica"] == 0 and record["model"] == CHAT and record["provider"] == "vllm"

    answer, rid = _call(gateway, "/chat/completions", {"model": CHAT, "messages": MESSAGES, "max_tokens": 4,
                                                       "ignore_eos": True, "stream": True})
    events = [json.loads(e) for e in sse_events(answer.body) if e != "[DONE]"]
    assert not any(e.get("usage") for e in events)  # the client did not ask for it...
    record = usage_record(gateway, rid)
    assert record["stream"] and record["output_tokens"] == 4 and not record["estimated"]  # ...the ledger has it
    assert record["input_tokens"] == usage["prompt_tokens"]

    answer, rid = _call(gateway, "/responses", {"model": CHAT, "input": "Count to three.", "max_output_tokens": 4})
    usage = json.loads(answer.body)["usage"]
    record = usage_record(gateway, rid)
    assert (record["input_tokens"], record["output_tokens"]) == (usage["input_tokens"], usage["output_tokens"])

    answer, rid = _call(gateway, "/embeddings", {"model": f"vllm-embed/{EMBED_MODEL}", "input": "hello there"})
    usage = json.loads(answer.body)["usage"]
    record = usage_record(gateway, rid)
    assert record["input_tokens"] == usage["prompt_tokens"] and record["endpoint"] == "/v1/embeddings"


def test_a_background_response_nobody_reads_is_recorded_with_vllms_usage(gateway):
    answer, rid = _call(gateway, "/responses", {"model": CHAT, "input": "Count to three.", "max_output_tokens": 4,
                                                "background": True})
    assert answer.status == 200 and json.loads(answer.body)["status"] in ("queued", "in_progress"), answer.body

    def over():  # the gateway asks vLLM after it (never read here): its second record, with the usage
        page = request("GET", gateway.root + f"/admin/api/v1/usage/log?search={rid}", headers=gateway.auth)
        charged = [r for r in json.loads(page.body)["data"] if r["output_tokens"]]
        return charged[0] if charged else None

    record = wait_for(over, 30, what="the background response's usage")
    assert record["endpoint"] == "/v1/responses" and record["model"] == CHAT and 1 <= record["output_tokens"] <= 4
    assert record["input_tokens"] > 0


def test_metrics_count_the_tokens_vllm_reported(gateway):
    def tokens():
        page = request("GET", gateway.root + "/metrics", headers=gateway.auth).body.decode()
        return metric_with_label(page, "gomodel_tokens_total", 'type="output"')

    before = tokens()
    answer, _ = _call(gateway, "/chat/completions", {"model": CHAT, "messages": MESSAGES, "max_tokens": 3,
                                                     "ignore_eos": True})
    assert json.loads(answer.body)["usage"]["completion_tokens"] == 3
    assert tokens() - before == 3


def test_a_streamed_background_response_is_made_under_the_id_the_gateway_names_it(gateway):
    """vLLM makes a response's id of the body's C{request_id}: the gateway names a streamed background response
    that way (so one whose client leaves before its first event is watched all the same); here the master key's
    own C{request_id}, which the gateway leaves as it is, shows vLLM keeps it as the response's id."""
    chosen = "resp_it" + secrets.token_hex(12)
    answer, _ = _call(gateway, "/responses", {"model": CHAT, "input": "Count to three.", "max_output_tokens": 4,
                                              "background": True, "stream": True, "request_id": chosen})
    created = next(json.loads(e) for e in sse_events(answer.body) if '"response.created"' in e)
    assert answer.status == 200 and created["response"]["id"] == chosen, answer.body[:500]

    def done():  # (incomplete: its 4 tokens ran out, as max_output_tokens says)
        read = request("GET", gateway.url + f"/responses/{chosen}", headers=gateway.auth)
        ended = read.status == 200 and json.loads(read.body)["status"] in ("completed", "incomplete")
        return json.loads(read.body) if ended else None

    assert wait_for(done, 30, what="the response read back ended")["id"] == chosen
