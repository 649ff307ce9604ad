"""Two real vLLM servers as two replicas of one provider: both serve; one stopped mid-test costs nothing.

Runs late (file name): it restarts the keyed chat server, which other tests use.
"""

import json
import os
import subprocess
import threading

from tests.integration.support import CHAT_MODEL, request, wait_for

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_server.sh")
MODEL = f"vllm-pool/{CHAT_MODEL}"


def chat(gateway):
    answer = request("POST", gateway.url + "/chat/completions", headers=gateway.auth,
                     body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    return answer.status, answer.headers.get("x-gomodel-replica")


def replicas(gateway):
    status = request("GET", gateway.root + "/admin/api/v1/providers/status", headers=gateway.auth)
    [pool] = [p for p in json.loads(status.body)["providers"] if p["name"] == "vllm-pool"]
    return pool["replicas"]


def idle(gateway):
    """Whether both replicas are ready and report no request running or waiting (the load strategy
    rightly prefers one that is idle: earlier tests' generations may still be finishing on one)."""
    return all(r["state"] == "ready" and not r["running"] and not r["waiting"] and not r["in_flight"]
               for r in replicas(gateway))


def test_two_replicas_serve_and_a_stopped_one_costs_no_request(gateway, vllm):
    wait_for(lambda: idle(gateway), 60, what="both replicas to be ready and idle")
    served = [chat(gateway) for _ in range(8)]
    assert all(status == 200 for status, _ in served)
    assert {replica for _, replica in served} == {"0", "1"}  # both replicas served

    env = dict(os.environ, VLLM_RUN=os.path.dirname(vllm.env_file))
    restart = subprocess.Popen(["bash", SCRIPT, "restart", "chat-key"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    outcomes = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            outcomes.append(chat(gateway))

    worker = threading.Thread(target=load)
    worker.start()
    try:
        # Taken out once it fails (requests that met it failed over), whether or not it is back yet.
        wait_for(lambda: replicas(gateway)[1]["state"] != "ready" or restart.poll() is not None, 60,
                 what="the stopped replica to be taken out")
        output, _ = restart.communicate(timeout=300)
        assert restart.returncode == 0, output[-3000:]
        wait_for(lambda: replicas(gateway)[1]["state"] == "ready", 30, what="the restarted replica to be ready")
    finally:
        stop.set()
        worker.join(timeout=60)
    # Nothing failed: requests that met the stopping replica went to the other one before their first byte.
    assert outcomes and all(status == 200 for status, _ in outcomes), [s for s, _ in outcomes if s != 200]
    assert replicas(gateway)[1]["consecutive_failures"] == 0 and replicas(gateway)[1]["last_error"]
    wait_for(lambda: idle(gateway), 60, what="both replicas to be idle again")  # (as before the first eight)
    after = [chat(gateway) for _ in range(8)]
    assert "1" in {replica for _, replica in after}  # it came back by itself
