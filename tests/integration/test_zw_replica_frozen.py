"""A real vLLM replica that stops answering (its process group frozen with SIGSTOP: a host gone, connections that
hang) while requests wait on it: once its checks fail it is down, the requests it held go to the other replica at
once, not after HTTP_RESPONSE_HEADER_TIMEOUT, and its stream ends with stream_incomplete. Runs late (file name): it
freezes the keyed chat server for a few seconds, and thaws it (SIGCONT) whatever happens.
"""

import http.client
import json
import os
import secrets
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.support import CHAT_MODEL, gateway_env, request, start_twistd, stop, tail, wait_for

MODEL = f"vllm-pool/{CHAT_MODEL}"
HEADER_TIMEOUT = 120  # what a request held by the frozen replica would wait without its abandonment


@pytest.fixture(scope="module")
def pool(vllm, tmp_path_factory):
    """A gateway with the two chat servers as replicas of C{vllm-pool}, checked every second."""
    workdir = tmp_path_factory.mktemp("frozen")
    key = "gm-it-" + secrets.token_urlsafe(16)
    env = gateway_env({
        "VLLM_POOL_BASE_URL": f"{vllm.chat_url},{vllm.chat_key_url}", "VLLM_POOL_API_KEY": vllm.chat_key,
        "ROUTING_STRATEGY": "round_robin", "REPLICA_HEALTH_INTERVAL": "1s", "REPLICA_FAILURE_THRESHOLD": "1",
        "HTTP_RESPONSE_HEADER_TIMEOUT": f"{HEADER_TIMEOUT}s", "GOMODEL_MASTER_KEY": key})
    _, proc, log_path, port = start_twistd(workdir, env)
    gw = type("Pool", (), {"root": f"http://127.0.0.1:{port}", "auth": {"Authorization": f"Bearer {key}"},
                           "log_path": log_path, "proc": proc})
    try:
        wait_for(lambda: proc.poll() is not None or _states(gw) == ["ready", "ready"], 60,
                 what="both replicas ready")
        assert proc.poll() is None, tail(log_path)
        yield gw
    finally:
        stop(proc)


def _states(gw):
    try:
        status = request("GET", gw.root + "/admin/api/v1/providers/status", headers=gw.auth, timeout=5)
    except OSError:
        return None
    if status.status != 200:
        return None
    [provider] = [p for p in json.loads(status.body)["providers"] if p["name"] == "vllm-pool"]
    return [r["state"] for r in provider["replicas"]]


def _chat(gw):
    started = time.monotonic()
    answer = request("POST", gw.root + "/v1/chat/completions", headers=gw.auth, timeout=HEADER_TIMEOUT + 30,
                     body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    return answer.status, answer.headers.get("x-gomodel-replica"), time.monotonic() - started


def _stream_on_replica_1(gw):
    """A long chat stream that replica 1 serves, its first chunk read: (connection, response)."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1900,
                       "ignore_eos": True, "stream": True})
    for _ in range(4):
        conn = http.client.HTTPConnection("127.0.0.1", int(gw.root.rsplit(":", 1)[1]), timeout=60)
        conn.request("POST", "/v1/chat/completions", body, dict(gw.auth, **{"Content-Type": "application/json"}))
        response = conn.getresponse()
        assert response.status == 200
        if response.getheader("x-gomodel-replica") == "1":
            assert response.readline().startswith(b"data: ")
            return conn, response
        conn.close()
    raise AssertionError("no stream went to replica 1")


def test_requests_waiting_on_a_frozen_replica_go_to_the_other_once_it_is_down(vllm, pool):
    group = int(open(os.path.join(os.path.dirname(vllm.env_file), "chat-key.pid")).read())
    assert all(status == 200 for status, _, _ in [_chat(pool) for _ in range(4)])
    conn, stream = _stream_on_replica_1(pool)
    os.killpg(group, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(6) as workers:
            answers = list(workers.map(lambda _: _chat(pool), range(6)))
            started = time.monotonic()
            try:
                rest = stream.read()  # (the stream, silent since its host froze)
            except http.client.IncompleteRead as cut:  # (its chunked body is left unfinished: it broke off)
                rest = cut.partial
            silent_for = time.monotonic() - started
        states = _states(pool)
    finally:
        os.killpg(group, signal.SIGCONT)
        conn.close()
    # The stream whose host froze ends with stream_incomplete within a health interval of its replica going down,
    # not after HTTP_STREAM_IDLE_TIMEOUT (5 minutes).
    assert b'"code":"stream_incomplete"' in rest.replace(b" ", b"") and b"[DONE]" not in rest, rest[-300:]
    assert silent_for < 20, silent_for
    # Round robin sent half of them to the frozen replica; its checks (1 s apart, 5 s each) took it down, and
    # they went on to replica 0 then: every one answered, none waited out its 120 s.
    assert [status for status, _, _ in answers] == [200] * 6, answers
    assert {replica for _, replica, _ in answers} == {"0"}, answers
    assert max(seconds for _, _, seconds in answers) < 30, answers
    assert states[1] == "down", states
    assert tail(pool.log_path, 200).count("went down before it answered.); trying another replica") == 3
    # Thawed, it is back by itself (its models read again) and serves.
    wait_for(lambda: _states(pool) == ["ready", "ready"], 60, what="the thawed replica to be ready")
    assert "1" in {replica for _, replica, _ in [_chat(pool) for _ in range(4)]}
