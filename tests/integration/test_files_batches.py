"""Files and batches run by the gateway against real vLLM (which has no batch API of its own)."""

import io
import json
import time

from tests.integration.support import CHAT_MODEL, EMBED_MODEL


def _run_batch(client, lines, endpoint, timeout=240):
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = client.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")
    deadline = time.monotonic() + timeout
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, f"batch still {batch.status} after {timeout}s: {batch}"
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == len(lines)
    output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    return batch, output


def test_a_fifty_line_chat_batch(client):
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": f"vllm/{CHAT_MODEL}", "messages": [{"role": "user", "content": f"Count to {i}."}],
                       "max_tokens": 4, "top_k": 5}} for i in range(50)]
    batch, output = _run_batch(client, lines, "/v1/chat/completions")
    assert batch.request_counts.completed == 50 and batch.request_counts.failed == 0
    assert sorted(o["custom_id"] for o in output) == sorted(line["custom_id"] for line in lines)
    for o in output:
        assert o["response"]["status_code"] == 200 and o["error"] is None
        body = o["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == CHAT_MODEL
        assert 0 < body["usage"]["completion_tokens"] <= 4


def test_an_embeddings_batch(client):
    lines = [{"custom_id": f"emb-{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": f"vllm-embed/{EMBED_MODEL}", "input": [f"text number {i}", "another"]}}
             for i in range(10)]
    batch, output = _run_batch(client, lines, "/v1/embeddings")
    assert batch.request_counts.completed == 10
    for o in output:
        data = o["response"]["body"]["data"]
        assert len(data) == 2 and len(data[0]["embedding"]) == 128
