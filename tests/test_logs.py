"""LOG_FORMAT=json and LOG_LEVEL on a real twistd process."""

import json
import os
import signal
import subprocess
import sys

import socket

import pytest_twisted
from twisted.internet import error as net_error
from twisted.internet.task import deferLater

from tests.rawclient import chat_request, connect
from tests.support import with_timeout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _run(reactor, fake, tmp_path, **env):
    """Start twistd gomodel with C{env}, send one chat, stop it; its output's lines."""
    log_path = tmp_path / "out.log"
    port = _free_port()  # the "listening on" line may be filtered out
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "OPENAI_", "GOMODEL_", "LOG_"))}
    run_env.update(env, PYTHONPATH=REPO, GOMODEL_DATA_DIR=str(tmp_path / "data"), VLLM_BASE_URL=fake.base_url)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                                 "--pidfile=", "gomodel", "--listen", f"tcp:{port}:interface=127.0.0.1"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=run_env)
    try:
        for _ in range(400):
            try:
                client = await connect(reactor, port, chat_request(
                    {"model": "vllm/meta-llama/Llama-3.1-8B-Instruct", "messages": []}))
            except net_error.ConnectionRefusedError:
                await deferLater(reactor, 0.05, lambda: None)
                continue
            await with_timeout(reactor, client.wait_for(b"\r\n\r\n"), 10)
            client.transport.loseConnection()
            if b" 200 " in bytes(client.received).split(b"\r\n", 1)[0]:
                break
            await deferLater(reactor, 0.05, lambda: None)
        proc.send_signal(signal.SIGTERM)
        for _ in range(400):
            if proc.poll() is not None:
                break
            await deferLater(reactor, 0.05, lambda: None)
        assert proc.returncode == 0
        return log_path.read_text().splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest_twisted.ensureDeferred
async def test_json_lines_with_the_access_log_fields(reactor, fake, tmp_path):
    lines = await _run(reactor, fake, tmp_path, LOG_FORMAT="json")
    records = [json.loads(line) for line in lines if line.strip()]  # every line is one JSON object
    access = [r for r in records if r["namespace"] == "gomodel.access" and r.get("status") == 200]
    assert access, lines
    assert access[0]["provider"] == "vllm" and access[0]["path"] == "/v1/chat/completions"
    assert access[0]["level"] == "info" and access[0]["message"].startswith("POST /v1/chat/completions 200")


@pytest_twisted.ensureDeferred
async def test_log_level_drops_what_is_below_it(reactor, fake, tmp_path):
    lines = await _run(reactor, fake, tmp_path, LOG_LEVEL="warn")
    assert not any("gomodel.access" in line for line in lines)  # info lines are gone
    assert any("GOMODEL_MASTER_KEY is not set" in line for line in lines)  # a warning stays
