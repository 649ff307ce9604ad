"""A client that goes away must stop the generation in vLLM.

vLLM 0.32 counts no metric for an aborted request: request_success_total{finished_reason="abort"}
stays 0 and there is no client-disconnect counter. So the proof here is vLLM's own bookkeeping:
after the client closes, vllm:num_requests_running drops back to 0 long before the generation
could have ended, generation_tokens_total grows by far fewer tokens than max_tokens, and
request_success_total (any finished_reason) does not move: the request never finished.
"""

import json
import socket
import time
import urllib.parse

from tests.integration.support import CHAT_MODEL, metric_with_label, metrics, wait_for

MAX_TOKENS = 1900          # with the prompt, just under max_model_len=2048; ~5-10 s of generation here
SETTLE_WITHIN = 3.0        # running must fall back to 0 within this after the close


def _open(gateway, body):
    parts = urllib.parse.urlsplit(gateway.url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    data = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{parts.port}\r\n"
            f"Authorization: Bearer {gateway.master_key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    sock.sendall(head + data)
    return sock


def _snapshot(vllm):
    sums, text = metrics(vllm.chat_root)
    return {
        "running": sums.get("vllm:num_requests_running", 0.0),
        "generated": sums.get("vllm:generation_tokens_total", 0.0),
        "finished": sums.get("vllm:request_success_total", 0.0),
        "aborted": metric_with_label(text, "vllm:request_success_total", 'finished_reason="abort"'),
    }


def _idle(vllm):
    return wait_for(lambda: _snapshot(vllm)["running"] == 0, timeout=30, what="vLLM idle before the test")


def _assert_aborted(vllm, before, closed_at):
    """vLLM stopped the request the client closed at C{closed_at}: no longer running by SETTLE_WITHIN after
    (timed from each probe's sending: a probe's own time on a loaded host is not vLLM's), fewer than half of its
    tokens generated, never finished."""
    while True:
        sent = time.monotonic() - closed_at
        if _snapshot(vllm)["running"] == 0:
            break
        assert sent < SETTLE_WITHIN, f"vLLM still generating {sent:.1f}s after the client left"
        time.sleep(0.05)
    time.sleep(0.5)      # a generation still going would keep adding tokens
    final = _snapshot(vllm)
    generated = final["generated"] - before["generated"]
    assert final["running"] == 0, final
    assert generated < MAX_TOKENS / 2, (
        f"vLLM generated {generated:.0f} of {MAX_TOKENS} tokens: the upstream request was not aborted")
    assert final["finished"] == before["finished"], (
        "the request finished normally in vLLM instead of being aborted", before, final)


def test_client_disconnect_mid_stream_aborts_vllm(gateway, vllm):
    _idle(vllm)
    before = _snapshot(vllm)
    body = {"model": f"vllm/{CHAT_MODEL}", "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    sock = _open(gateway, body)
    buf = b""
    deadline = time.monotonic() + 20
    try:
        while buf.count(b"data: ") < 4:
            assert time.monotonic() < deadline, f"no stream events in 20 s: {buf[:500]!r}"
            chunk = sock.recv(4096)
            assert chunk, f"gateway closed the stream early: {buf[:500]!r}"
            buf += chunk
        assert buf.startswith(b"HTTP/1.1 200"), buf[:300]
        assert _snapshot(vllm)["running"] >= 1, "the generation should be running in vLLM now"
    finally:
        sock.close()
    _assert_aborted(vllm, before, time.monotonic())


def test_client_disconnect_while_waiting_for_a_non_streaming_answer_aborts_vllm(gateway, vllm):
    _idle(vllm)
    before = _snapshot(vllm)
    body = {"model": f"vllm/{CHAT_MODEL}", "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": MAX_TOKENS, "ignore_eos": True}
    sock = _open(gateway, body)
    try:
        wait_for(lambda: _snapshot(vllm)["running"] >= 1, timeout=10, interval=0.05,
                 what="the generation to start in vLLM")
        time.sleep(0.2)
    finally:
        sock.close()
    _assert_aborted(vllm, before, time.monotonic())
