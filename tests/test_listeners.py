"""gomodel.listeners: a port that cannot be had fails the start, in the service and in twistd."""

import os
import socket
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol

from gomodel.listeners import ListenerService, ListenFailed, listen_endpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def busy_port():
    """A port on 127.0.0.1 that another socket listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


def failures_of(d):
    seen = []
    d.addErrback(seen.append)
    return seen


def test_start_service_raises_when_the_port_is_busy(reactor, busy_port, logged_errors):
    description = f"tcp:{busy_port}:interface=127.0.0.1"
    listener = ListenerService(serverFromString(reactor, description), Factory.forProtocol(Protocol), description)
    waiting = failures_of(listener.whenListening())
    with pytest.raises(ListenFailed) as raised:
        listener.startService()
    assert raised.value.code == 1
    assert str(raised.value).startswith(f"cannot listen on {description}: ")
    assert "in use" in str(raised.value)
    assert waiting[0].value is raised.value
    listener.stopService()


class _BindingEndpoint:
    """An endpoint whose listen() raises itself rather than failing its Deferred."""

    def __init__(self, port):
        self.port = port

    def listen(self, factory):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", self.port))


def test_a_synchronous_endpoint_error_fails_too(reactor, busy_port):
    listener = ListenerService(_BindingEndpoint(busy_port), Factory.forProtocol(Protocol))
    with pytest.raises(ListenFailed, match="in use"):
        listener.privilegedStartService()


@pytest_twisted.ensureDeferred
async def test_listens_in_privileged_start_service(reactor):
    listener = ListenerService(serverFromString(reactor, "tcp:0:interface=127.0.0.1"), Factory.forProtocol(Protocol))
    listener.privilegedStartService()
    port = await listener.whenListening()  # before startService: twistd drops privileges in between
    listener.startService()  # does not listen twice
    assert (await listener.whenListening()) is port
    await listener.stopService()
    assert not listener.running


class _LaterEndpoint:
    def __init__(self):
        self.d = Deferred()

    def listen(self, factory):
        return self.d


def test_an_endpoint_that_fails_later_fails_when_listening():
    endpoint = _LaterEndpoint()
    listener = ListenerService(endpoint, Factory.forProtocol(Protocol), "unix:/nowhere")
    listener.startService()  # nothing known yet
    waiting = failures_of(listener.whenListening())
    endpoint.d.errback(OSError(13, "Permission denied"))
    assert waiting[0].check(ListenFailed)
    assert str(waiting[0].value) == "cannot listen on unix:/nowhere: [Errno 13] Permission denied"
    listener.stopService()


def test_stopping_before_the_endpoint_answers_cancels():
    endpoint = _LaterEndpoint()
    listener = ListenerService(endpoint, Factory.forProtocol(Protocol))
    listener.startService()
    waiting = failures_of(listener.whenListening())
    listener.stopService()
    assert waiting[0].check(CancelledError)


def test_twistd_exits_with_one_line_when_the_port_is_busy(tmp_path, busy_port):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "OPENAI_", "GOMODEL_"))}
    env.update(PYTHONPATH=REPO, GOMODEL_DATA_DIR=str(tmp_path / "data"))
    result = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "gomodel",
         "--listen", f"tcp:{busy_port}:interface=127.0.0.1"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    naming = [line for line in output.splitlines() if str(busy_port) in line]
    assert len(naming) == 1, output
    assert f"cannot listen on tcp:{busy_port}:interface=127.0.0.1: " in naming[0] and "in use" in naming[0]
    assert "Traceback" not in output


def test_a_primary_that_cannot_listen_leaves_no_shared_metrics_directory_behind(tmp_path, busy_port):
    # before: the directory was removed only once the reactor had run; a start refused every second (systemd's
    # Restart=) left one a second in the temporary directory
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "OPENAI_", "GOMODEL_", "PROMETHEUS_"))}
    env.update(PYTHONPATH=REPO, GOMODEL_DATA_DIR=str(tmp_path / "data"), TMPDIR=str(scratch))
    result = subprocess.run(
        [sys.executable, "-c", "from gomodel.cli import main; main()", "--workers", "2",
         "--listen", f"tcp:{busy_port}:interface=127.0.0.1"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL, timeout=30)
    assert result.returncode == 1 and "in use" in result.stdout + result.stderr
    assert os.listdir(scratch) == []


@pytest_twisted.ensureDeferred
async def test_a_listen_description_waits_for_511_connections_unless_it_says_otherwise(reactor, tmp_path):
    for description, backlog in (("tcp:0:interface=127.0.0.1", 511), ("tcp:port=0:interface=127.0.0.1:backlog=64", 64),
                                 (r"tcp:0:interface=\:\:1", 511)):
        port = await listen_endpoint(reactor, description).listen(Factory.forProtocol(Protocol))
        try:
            assert port.backlog == backlog  # what the socket's listen() was given (Twisted's default is 50)
            assert port.getHost().host == description.split("interface=")[1].split(":backlog")[0].replace("\\", "")
        finally:
            await port.stopListening()
    # the other kinds that take a backlog get ours too unless they say otherwise (before: Twisted's 50)
    for description, backlog in ((r"tcp6:0:interface=\:\:1", 511), (f"unix:{tmp_path}/s", 511),
                                 (f"unix:{tmp_path}/t:backlog=7", 7)):
        port = await listen_endpoint(reactor, description).listen(Factory.forProtocol(Protocol))
        try:
            assert port.backlog == backlog, description
        finally:
            await port.stopListening()
    assert isinstance(listen_endpoint(reactor, f"unix:{tmp_path}/s"), UNIXServerEndpoint)


@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_the_listening_line_names_the_address_as_its_description_would(reactor, tmp_path, kind):
    from twisted.logger import Logger, formatEvent

    path = str(tmp_path / "gateway.sock")
    description = "tcp:0:interface=127.0.0.1" if kind == "tcp" else f"unix:{path}"
    listener = ListenerService(serverFromString(reactor, description), Factory.forProtocol(Protocol), description)
    events = []
    listener.log = Logger(observer=events.append)
    listener.startService()
    address = (await listener.whenListening()).getHost()
    await listener.stopService()
    said = [formatEvent(event) for event in events]
    assert said == [f"listening on 127.0.0.1:{address.port}" if kind == "tcp" else f"listening on {path}"]


@pytest_twisted.ensureDeferred
async def test_a_unix_socket_left_by_a_killed_gateway_with_this_process_s_pid_is_taken_over(reactor, tmp_path):
    """A gateway killed (SIGKILL, the OOM killer) leaves its socket and its lock (C{PATH.lock}, naming its pid)
    behind; restarted in a container, it gets the same pid again (tini's child, or PID 1), and Twisted took the
    lock naming it for a live process's: 'Cannot acquire lock', a restart loop. A lock naming this very
    process, which has not listened yet, is stale: the socket is taken over."""
    path = str(tmp_path / "gateway.sock")
    left = socket.socket(socket.AF_UNIX)
    left.bind(path)
    left.close()  # (the killed gateway's socket file)
    os.symlink(str(os.getpid()), path + ".lock")
    listener = ListenerService(listen_endpoint(reactor, f"unix:{path}"), Factory.forProtocol(Protocol),
                               f"unix:{path}")
    listener.privilegedStartService()
    await listener.whenListening()
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)  # the new socket's
    finally:
        await listener.stopService()
    assert not os.path.lexists(path + ".lock")


def test_a_unix_socket_locked_by_another_live_process_still_fails_the_start(reactor, tmp_path):
    path = str(tmp_path / "gateway.sock")
    os.symlink(str(os.getppid()), path + ".lock")  # (a live process that is not this one)
    listener = ListenerService(listen_endpoint(reactor, f"unix:{path}"), Factory.forProtocol(Protocol),
                               f"unix:{path}")
    with pytest.raises(ListenFailed, match="Cannot acquire lock"):
        listener.privilegedStartService()
