"""A batch across two gateways on one PostgreSQL, against real vLLM: A makes it and is killed, B finishes it."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import openai
import pytest

from tests import postgres
from tests.integration.support import CHAT_MODEL, listening_port, request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MASTER = "gm-it-scaleout"


@pytest.fixture
def database():
    postgres.require()
    name = postgres.create_database()
    yield name
    postgres.drop_database(name)


def _gateway(vllm, database, workdir, name):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_") and k != "GOMODEL_CONFIG"}
    env.update({"VLLM_BASE_URL": vllm.chat_url, "GOMODEL_MASTER_KEY": MASTER, "STORAGE_TYPE": "postgresql",
                "POSTGRES_URL": postgres.url(database), "BATCH_LEASE_TIMEOUT": "3s",
                "BATCH_CONCURRENCY_PER_PROVIDER": "2", "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", "")})
    log = open(workdir / f"{name}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                             "--pidfile=", "gomodel", "--listen", "tcp:0:interface=127.0.0.1"],
                            env=env, cwd=str(workdir), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    port = listening_port(proc, workdir / f"{name}.log")  # (the port it chose: one chosen here could be taken)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, (workdir / f"{name}.log").read_text()
        try:
            if request("GET", f"http://127.0.0.1:{port}/health/ready", timeout=2).status == 200:
                break
        except OSError:
            pass
        time.sleep(0.2)
    return proc, log, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=MASTER, timeout=60,
                                    max_retries=0)


def test_a_batch_made_on_a_killed_gateway_is_finished_by_another(vllm, database, tmp_path):
    started = [_gateway(vllm, database, tmp_path, name) for name in ("a", "b")]
    (a, _, sdk_a), (_, _, sdk_b) = started
    try:
        lines = [{"custom_id": f"it-{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": f"vllm/{CHAT_MODEL}", "messages": [{"role": "user", "content": f"Count to {i}."}],
                           "max_tokens": 8}} for i in range(30)]
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        uploaded = sdk_a.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch")
        batch = sdk_a.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
        deadline = time.monotonic() + 120
        while len(postgres.query(database, "SELECT line FROM batch_results WHERE batch_id = %s", (batch.id,))) < 3:
            assert time.monotonic() < deadline, "gateway A recorded nothing"
            time.sleep(0.05)
        a.send_signal(signal.SIGKILL)
        a.wait()
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            assert time.monotonic() < deadline, f"batch still {batch.status}"
            time.sleep(0.5)
            batch = sdk_b.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == 30
        output = [json.loads(line) for line in sdk_b.files.content(batch.output_file_id).text.splitlines()]
        assert [o["custom_id"] for o in output] == [line["custom_id"] for line in lines]  # each once, in order
        assert all(o["response"]["body"]["model"] == CHAT_MODEL for o in output)
    finally:
        for proc, log, sdk in started:
            sdk.close()
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=20)
            log.close()
