"""The gateway run as a user runs it, C{twistd -n gomodel}, in a process of its own: for what only a real process
shows (its signals, its drain, its exit, what it exports before it)."""

import os
import re
import signal
import subprocess
import sys

from twisted.internet.task import deferLater

from tests.rawclient import connect
from tests.support import until, with_timeout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY = b"GET /health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def _hangup_by_default():
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def twistd_gateway(tmp_path, options=(), **env):
    """C{twistd -n gomodel} on a free loopback port, with gomodel's C{options} (C{--workers 2}), configured by
    C{env} (its data in C{tmp_path/data}) over this process's environment without its C{VLLM_*}, C{OPENAI_*},
    C{GOMODEL_*} and C{OTEL_*} variables: C{(process, its log's path)}."""
    log_path = tmp_path / "gw.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "OPENAI_", "GOMODEL_", "OTEL_"))}
    environ.update(PYTHONPATH=REPO, GOMODEL_DATA_DIR=str(tmp_path / "data"), **env)
    with open(log_path, "wb") as log:
        # (SIGHUP at its default: a suite run under nohup would hand its ignoring down, which the gateway keeps)
        proc = subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                                 "--pidfile=", "gomodel", *options, "--listen", "tcp:0:interface=127.0.0.1"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environ,
                                preexec_fn=_hangup_by_default)
    return proc, log_path


async def wait_for(reactor, predicate, what):
    """Until C{predicate()} (polled every 50 ms), for 20 s at most."""
    await until(reactor, predicate, limit=20.0, interval=0.05, what=what)


async def ready_port(reactor, log_path):
    """The port of the gateway logging to C{log_path}, once it listens and is ready."""
    await wait_for(reactor, lambda: _LISTENING.search(log_path.read_text()), "the gateway to listen")
    port = int(_LISTENING.search(log_path.read_text()).group(1))
    for _ in range(200):  # discovery is asynchronous
        probe = await connect(reactor, port, READY)
        await with_timeout(reactor, probe.wait_for(b"\r\n\r\n{"), 10)
        probe.transport.loseConnection()
        if b" 200 " in bytes(probe.received).split(b"\r\n", 1)[0]:
            break
        await deferLater(reactor, 0.05, lambda: None)
    return port


async def exited(reactor, proc, log_path) -> str:
    """Wait for the gateway C{proc} to exit; it exited 0 (else its log is shown). Fires with its log."""
    await wait_for(reactor, lambda: proc.poll() is not None, "the process to exit")
    text = log_path.read_text()
    assert proc.returncode == 0, text
    return text


def killed(proc):
    """End C{proc} where a test left it running."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
