"""A Responses conversation that outlives a vLLM restart (vLLM keeps responses in memory only).

Runs last (file name) because it restarts the keyless chat server the other tests use.
"""

import os
import subprocess

import json

from tests.integration.support import CHAT_MODEL, request, wait_for

MODEL = f"vllm/{CHAT_MODEL}"
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_server.sh")


def replica_ready(gateway, provider):
    """Whether the gateway's providers/status says every replica of C{provider} is ready."""
    status = request("GET", gateway.root + "/admin/api/v1/providers/status", headers=gateway.auth)
    for p in json.loads(status.body)["providers"]:
        if p["name"] == provider:
            return all(r["state"] == "ready" for r in p["replicas"])
    return False


def test_follow_up_after_the_vllm_instance_restarted(client, vllm, gateway):
    first = client.responses.create(model=MODEL, input="My name is Ada and I live in Paris.", max_output_tokens=4)
    assert request("GET", vllm.chat_url + f"/responses/{first.id}").status == 200  # vLLM knows it now

    env = dict(os.environ, VLLM_RUN=os.path.dirname(vllm.env_file))
    restarted = subprocess.run(["bash", SCRIPT, "restart", "chat"], env=env, capture_output=True, text=True,
                               timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert request("GET", vllm.chat_url + f"/responses/{first.id}").status == 404  # ... and has forgotten it
    # The gateway sees the restarted replica come back by itself (a health probe every 5 s).
    wait_for(lambda: replica_ready(gateway, "vllm"), 30, what="the restarted replica to be ready again")

    follow = client.responses.create(model=MODEL, input="What is my name?", max_output_tokens=4,
                                     previous_response_id=first.id)
    assert follow.status in ("completed", "incomplete")
    alone = client.responses.create(model=MODEL, input="What is my name?", max_output_tokens=4)
    # The stored first turn went along as explicit input.
    assert follow.usage.input_tokens > alone.usage.input_tokens
    assert client.responses.retrieve(follow.id).id == follow.id
