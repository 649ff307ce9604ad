"""Readiness, and the graceful stop of a real twistd process: a stream in flight finishes after SIGTERM."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest_twisted
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger

from gomodel.lifecycle import Drain

from tests.rawclient import chat_request, connect
from tests.support import start_gateway, with_timeout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"


@pytest_twisted.ensureDeferred
async def test_ready_once_discovered_and_open_without_a_key(reactor, http, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        response = await http.get(gw.url + "/health/ready")
        assert response.code == 200 and json.loads(await response.content()) == {"status": "ready"}
        gw.service.drain.draining = True  # as during a stop
        response = await http.get(gw.url + "/health/ready")
        body = json.loads(await response.content())
        assert response.code == 503 and body["status"] == "not_ready" and "draining" in body["reasons"][0]
        gw.service.drain.draining = False
    finally:
        await gw.service.stopService()


def test_a_drain_says_it_is_draining_once_its_ports_refuse_connections():
    """Twisted closes a port's socket a reactor turn after stopListening: until then the kernel still
    completes new connections, so the line waits for the port's Deferred."""
    closed = Deferred()

    class Listener:
        def stopListening(self):
            return closed

    events = []
    drain = Drain(Clock(), [Listener()], 5)
    drain.log = Logger(observer=events.append)
    assert drain.drain().called  # nothing in flight
    assert drain.draining and events == []
    closed.callback(None)
    assert [e["log_format"].split(":")[0] for e in events] == ["draining"]
    assert events[0]["count"] == 0


async def _wait_for(reactor, predicate, what, steps=400):
    for _ in range(steps):
        if predicate():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_a_stream_refuses_new_connections_and_exits_0(reactor, fake, tmp_path):
    log_path = tmp_path / "gw.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "OPENAI_", "GOMODEL_"))}
    env.update(PYTHONPATH=REPO, GOMODEL_DATA_DIR=str(tmp_path / "data"), VLLM_BASE_URL=fake.base_url,
               SHUTDOWN_TIMEOUT="20s")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                                 "--pidfile=", "gomodel", "--listen", "tcp:0:interface=127.0.0.1"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        await _wait_for(reactor, lambda: re.search(r"listening on 127\.0\.0\.1:\d+", log_path.read_text()),
                        "the gateway to listen")
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text()).group(1))
        ready = b"GET /health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
        for _ in range(200):  # discovery is asynchronous
            probe = await connect(reactor, port, ready)
            await with_timeout(reactor, probe.wait_for(b"\r\n\r\n{"), 10)
            probe.transport.loseConnection()
            if b" 200 " in bytes(probe.received).split(b"\r\n", 1)[0]:
                break
            await deferLater(reactor, 0.05, lambda: None)
        idle = await connect(reactor, port, ready)  # a keep-alive connection open before the stop
        await with_timeout(reactor, idle.wait_for(b'"ready"}'), 10)
        stream = await connect(reactor, port, chat_request(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
             "fake_chunks": 20, "fake_pace": 0.1}))
        await with_timeout(reactor, stream.wait_for(b"data:"), 10)

        proc.send_signal(signal.SIGTERM)
        await _wait_for(reactor, lambda: "draining" in log_path.read_text(), "the drain to start")
        try:
            refused = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol())
        except net_error.ConnectionRefusedError:
            refused = None
        assert refused is None, "a new connection was accepted while draining"
        before = len(idle.received)
        idle.transport.write(ready)  # on a connection still open: not ready any more
        await with_timeout(reactor, idle.wait_for(b"draining"), 10)
        assert b" 503 " in bytes(idle.received[before:]).split(b"\r\n", 1)[0]
        idle.transport.loseConnection()

        await with_timeout(reactor, stream.lost, 20)
        received = bytes(stream.received)
        assert b"data: [DONE]" in received and received.endswith(b"0\r\n\r\n")  # finished, not cut
        await _wait_for(reactor, lambda: proc.poll() is not None, "the process to exit")
        assert proc.returncode == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest_twisted.ensureDeferred
async def test_a_drain_that_runs_out_of_time_cuts_what_is_left_and_closes_the_upstream(reactor, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "SHUTDOWN_TIMEOUT": "0.3s"})
    recorded = fake.next_request()
    client = await connect(reactor, gw.port, chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
         "fake_chunks": 200, "fake_pace": 0.05}))
    await with_timeout(reactor, client.wait_for(b"data:"), 10)
    record = await recorded
    await with_timeout(reactor, gw.service.stopService(), 10)
    await with_timeout(reactor, client.lost, 10)
    assert not bytes(client.received).endswith(b"0\r\n\r\n")  # cut, never made to look finished
    how, _ = await with_timeout(reactor, record.closed, 10)
    assert how == "lost"  # the upstream connection was closed: vLLM aborts the generation
