"""--workers: several processes on one port, the first dealing its connections to the others."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol

from gomodel.listeners import parse_tcp
from gomodel.workers import Handoff, HandedConnections, WorkerChannel, worker_argv
from tests.support import until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_tcp_descriptions():
    assert parse_tcp("tcp:8080") == (8080, "", 511)
    assert parse_tcp("tcp:port=0:interface=127.0.0.1:backlog=64") == (0, "127.0.0.1", 64)
    assert parse_tcp(r"tcp:9000:interface=\:\:1") == (9000, "::1", 511)
    for bad in ("unix:/tmp/s", "ssl:443", "tcp:80:reuse=1"):
        with pytest.raises(ValueError):
            parse_tcp(bad)


def test_worker_command_line_drops_the_primarys_listen_and_workers():
    argv = worker_argv(["--workers", "3", "--listen", "tcp:80", "--config=g.yaml", "--listen=tcp:81", "-w", "2"])
    assert argv[-3:] == ["gomodel", "--worker-child", "--config=g.yaml"]


def test_a_worker_imports_from_where_the_primary_imports_not_from_the_working_directory(tmp_path):
    """The primary's C{sys.path[0]} is its script's directory (C{gomodel}'s, C{twistd}'s): a worker, run with
    C{python -c}, would have the working directory there instead, and import whatever lies in it."""
    cwd, bin_dir = tmp_path / "cwd", tmp_path / "bin"
    (cwd / "twisted").mkdir(parents=True)
    (cwd / "twisted" / "__init__.py").write_text("raise ImportError('twisted from the working directory')\n")
    bin_dir.mkdir()
    (bin_dir / "primary.py").write_text(
        "import subprocess, sys\n"
        "from gomodel.workers import worker_argv\n"
        "sys.exit(subprocess.run(worker_argv([]) + ['--help'], stdout=subprocess.DEVNULL).returncode)\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, str(bin_dir / "primary.py")], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "working directory" not in done.stderr, done.stderr


class _Tag(Protocol):
    """Answers each connection with who served it and the client's port it sees, then closes."""

    def connectionMade(self):
        self.transport.write(b"%s %d" % (self.factory.tag, self.transport.getPeer().port))
        self.transport.loseConnection()


def _tagging(tag):
    factory = Factory.forProtocol(_Tag)
    factory.tag = tag
    return factory


class _Read(Protocol):
    def __init__(self):
        self.done = Deferred()
        self.data = b""

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.done.callback(self.data)


async def _served_by(reactor, port, host="127.0.0.1"):
    """Who served a new connection to C{port}; checks that it saw the client's own address."""
    endpoint = (TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint)(reactor, host, port)
    client = await connectProtocol(endpoint, _Read())
    local = client.transport.getHost().port
    tag, seen = (await client.done).rsplit(b" ", 1)
    assert int(seen) == local
    return tag.decode()


class _Dealing:
    """A primary's Handoff listening on 127.0.0.1:0 and N workers' ends in this one process; as an
    async context manager, entered once every worker is ready, closed on the way out."""

    def __init__(self, reactor, workers, interface="127.0.0.1"):
        self._reactor = reactor
        self.handoff = Handoff(_tagging(b"primary"))
        self.channels, self.workers = [], []
        for number in range(1, workers + 1):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.channels.append(WorkerChannel(reactor, self.handoff, ours, number))
            worker = HandedConnections(reactor, _tagging(b"worker %d" % number), fd=theirs.detach())
            worker.startService()
            self.workers.append(worker)
        self.port = reactor.listenTCP(0, self.handoff, interface=interface)
        self.number = self.port.getHost().port

    async def __aenter__(self):
        await until(self._reactor, lambda: len(self.handoff.ready) == len(self.workers), limit=5.0)
        return self

    async def __aexit__(self, *exc_info):
        for worker in self.workers:
            if worker.running:
                worker.stopService()
        for channel in self.channels:
            channel.close()
        await self.port.stopListening()


@pytest.mark.parametrize("interface", ["127.0.0.1", "::1"])
@pytest_twisted.ensureDeferred
async def test_connections_are_dealt_in_turn_to_the_primary_and_each_ready_worker(reactor, interface):
    async with _Dealing(reactor, 2, interface) as dealing:
        served = [await _served_by(reactor, dealing.number, interface) for _ in range(6)]
        assert sorted(served[:3]) == ["primary", "worker 1", "worker 2"]
        assert served[3:] == served[:3]  # the same turn again


@pytest_twisted.ensureDeferred
async def test_a_worker_that_is_gone_leaves_the_turn_and_the_primary_serves_its_share(reactor):
    async with _Dealing(reactor, 1) as dealing:
        # The primary has not yet read the channel's end when it passes the next connection on.
        reactor.removeReader(dealing.channels[0])
        dealing.workers[0].stopService()
        served = {await _served_by(reactor, dealing.number) for _ in range(3)}
        assert served == {"primary"}
        assert dealing.handoff.ready == []


@pytest_twisted.ensureDeferred
async def test_a_draining_worker_serves_what_was_already_passed_to_it_then_takes_no_more(reactor):
    async with _Dealing(reactor, 1) as dealing:
        assert await _served_by(reactor, dealing.number) == "primary"
        worker = dealing.workers[0]
        reactor.removeReader(worker)  # busy: the next connection waits in its channel
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", dealing.number), _Read())
        await until(reactor, lambda: dealing.handoff._turn == 0, limit=5.0)  # accepted and passed on
        worker.stopListening()  # the drain
        assert (await client.done).startswith(b"worker 1 ")
        await until(reactor, lambda: not dealing.handoff.ready, limit=5.0)
        assert {await _served_by(reactor, dealing.number) for _ in range(2)} == {"primary"}


def listening_pids(port):
    """PIDs holding a LISTEN socket on C{port} (from /proc, no tools needed)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    pids.add(int(pid))
        except OSError:
            continue
    return pids


def wait_until(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_primary(tmp_path, own_group=False, twistd_options=(), log_path=None):
    """C{twistd -n gomodel --workers 2} on a free loopback port: (process, log path, port).

    @param own_group: start it in a process group of its own (as systemd does), which a test may signal whole.
    @param log_path: where its log lines go (C{twistd_options} send them there), if not to its output.
    """
    output = tmp_path / "gateway.log"
    log_path = log_path or output
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "GOMODEL_", "PROMETHEUS_", "REDIS_"))}
    env.update({"PYTHONPATH": REPO, "GOMODEL_DATA_DIR": str(tmp_path / "data")})
    with open(output, "wb") as log:
        primary = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             *twistd_options, "gomodel", "--workers", "2", "--listen", "tcp:0:interface=127.0.0.1"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(tmp_path),
            start_new_session=own_group)
    try:
        port = int(wait_until(lambda: log_path.exists() and re.search(r"listening on 127\.0\.0\.1:(\d+)",
                                                                      log_path.read_text()),
                              what="the primary to listen").group(1))
    except BaseException:
        primary.kill()
        primary.wait()
        raise
    return primary, log_path, port


def serving_pid(port, client_port):
    """The PID holding the server end of the connection from C{client_port} to C{port} (from /proc)."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if (int(fields[1].rsplit(":", 1)[1], 16) == port and int(fields[2].rsplit(":", 1)[1], 16) == client_port
                    and fields[3] == "01"):
                inodes.add(fields[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


def serve_on_new_connections(port, count):
    """The PIDs that answered C{count} connections open at once, each with one 200 to GET /v1/models."""
    import http.client

    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(count)]
    try:
        pids = []
        for conn in connections:
            conn.request("GET", "/v1/models")
            response = conn.getresponse()
            assert response.status == 200
            response.read()
            pids.append(serving_pid(port, conn.sock.getsockname()[1]))
        return pids
    finally:
        for conn in connections:
            conn.close()


def ready_workers(log_path):
    return len(re.findall(r"worker \d+ ready for connections", log_path.read_text()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_primary_deals_its_connections_to_a_worker_in_turn_and_restarts_it(tmp_path):
    primary, log_path, port = start_primary(tmp_path)
    try:
        wait_until(lambda: ready_workers(log_path) == 1, what="the worker to take connections")
        assert listening_pids(port) == {primary.pid}  # only the primary listens
        pids = serve_on_new_connections(port, 4)
        assert pids.count(primary.pid) == 2 and len(set(pids)) == 2  # in turn: 2 each
        [worker] = set(pids) - {primary.pid}

        os.kill(worker, signal.SIGKILL)  # a worker that dies is replaced, and takes its turn again
        wait_until(lambda: ready_workers(log_path) == 2, what="the worker to be restarted")
        pids = serve_on_new_connections(port, 2)
        assert primary.pid in pids and worker not in pids and len(set(pids)) == 2
        [worker] = set(pids) - {primary.pid}

        primary.send_signal(signal.SIGTERM)  # the primary's stop takes the workers down
        assert primary.wait(timeout=20) == 0  # drained: a clean exit, not the signal's status
        wait_until(lambda: not os.path.exists(f"/proc/{worker}") or _zombie(worker), what="the worker to exit")
    finally:
        if primary.poll() is None:
            primary.kill()
            primary.wait()
    text = log_path.read_text()
    assert "worker 1 started" in text and "restarting it" in text and "taking connections from the primary" in text
    assert "Server Shut Down" in text
    # Without REDIS_URL each process counts limits alone: the primary says so once (its workers do not).
    assert text.count("2 processes without REDIS_URL: each counts rate and concurrency limits alone") == 1, text


def test_a_workers_output_is_published_as_its_events_and_lines():
    """Its events (Twisted's JSON lines, split anywhere by the pipe) as they were; any other line on its output,
    or its standard error (a traceback before its logging began), as its text; what it left unended at its end."""
    import io

    from twisted.internet.task import Clock
    from twisted.logger import LogLevel, Logger, formatEvent, jsonFileLogObserver

    from gomodel.workers import WorkerLog

    out = io.StringIO()
    Logger(namespace="gomodel.access", observer=jsonFileLogObserver(out)).info("GET {path} 200", path="/v1/models")
    events = []
    log = WorkerLog(events.append, 3, Clock())
    data = out.getvalue().encode() + b"plain text\n"
    log.received(1, data[:7])
    assert events == []
    log.received(1, data[7:])
    log.received(2, b"Traceback (most recent call last):\n  File")
    log.ended()
    assert [(e["log_namespace"], e["log_level"], formatEvent(e), e["worker"]) for e in events] == [
        ("gomodel.access", LogLevel.info, "GET /v1/models 200", 3),
        ("gomodel.workers", LogLevel.info, "plain text", 3),
        ("gomodel.workers", LogLevel.error, "Traceback (most recent call last):", 3),
        ("gomodel.workers", LogLevel.error, "  File", 3)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_workers_lines_go_where_the_primarys_logfile_option_sends_the_primarys(tmp_path):
    """Before: a worker wrote its lines to the primary's standard output whatever twistd's --logfile said
    (lost where the primary runs as a daemon)."""
    logfile = tmp_path / "twistd.log"
    primary, _, port = start_primary(tmp_path, twistd_options=[f"--logfile={logfile}"], log_path=logfile)
    try:
        wait_until(lambda: "taking connections from the primary" in logfile.read_text(),
                   what="the worker's line in the primary's log file")
        wait_until(lambda: ready_workers(logfile) == 1, what="the worker to take connections")
        pids = serve_on_new_connections(port, 4)
        assert len(set(pids)) == 2
        primary.send_signal(signal.SIGTERM)
        assert primary.wait(timeout=20) == 0
    finally:
        if primary.poll() is None:
            primary.kill()
            primary.wait()
    lines = logfile.read_text().splitlines()
    access = [line for line in lines if "[gomodel.access#info] GET /v1/models 200" in line]
    assert len(access) == 4, lines  # the worker's two as well as the primary's
    assert sum("Server Shut Down" in line for line in lines) == 2
    assert (tmp_path / "gateway.log").read_text() == ""  # nothing on the primary's output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_to_the_whole_process_group_stops_every_process_cleanly(tmp_path):
    """As systemd's control-group mode and timeout(1) do: each worker gets SIGTERM from the signal and again
    from the primary; the second changes nothing."""
    primary, log_path, port = start_primary(tmp_path, own_group=True)
    try:
        wait_until(lambda: ready_workers(log_path) == 1, what="the worker to take connections")
        os.killpg(primary.pid, signal.SIGTERM)
        assert primary.wait(timeout=30) == 0
    finally:
        if primary.poll() is None:
            os.killpg(primary.pid, signal.SIGKILL)
            primary.wait()
    wait_until(lambda: log_path.read_text().count("Server Shut Down") == 2, what="the worker to exit too")
    text = log_path.read_text()
    assert "Traceback" not in text and "ReactorNotRunning" not in text and "#critical]" not in text, text


@pytest.mark.parametrize("how", ["option", "environment"])
def test_workers_read_relative_paths_where_the_primary_read_them_whatever_twistds_rundir(tmp_path, how):
    """twistd builds the gateway in the directory it started in, then changes to C{--rundir}: a worker started
    there read C{--config g.yaml} (or C{GOMODEL_CONFIG=g.yaml}) from it, could not, and was restarted every
    second; and it kept its SQLite store in another C{GOMODEL_DATA_DIR} than the primary's (C{./data})."""
    (tmp_path / "g.yaml").write_text("server: {body_size_limit: 20M}\n")
    (tmp_path / "rundir").mkdir()
    log_path = tmp_path / "gateway.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "GOMODEL_", "PROMETHEUS_"))}
    env.update({"PYTHONPATH": REPO, "GOMODEL_DATA_DIR": "data"})
    config = ["--config", "g.yaml"] if how == "option" else []
    if how == "environment":
        env["GOMODEL_CONFIG"] = "g.yaml"
    with open(log_path, "wb") as log:
        primary = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             f"--rundir={tmp_path / 'rundir'}", "gomodel", *config, "--workers", "2",
             "--listen", "tcp:0:interface=127.0.0.1"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(tmp_path))
    try:
        wait_until(lambda: ready_workers(log_path) == 1 or "restarting it" in log_path.read_text(),
                   what="the worker to start")
        assert ready_workers(log_path) == 1, log_path.read_text()
        primary.send_signal(signal.SIGTERM)
        assert primary.wait(timeout=30) == 0
    finally:
        if primary.poll() is None:
            primary.kill()
            primary.wait()
    assert "restarting it" not in log_path.read_text()
    assert (tmp_path / "data" / "gomodel.db").exists() and os.listdir(tmp_path / "rundir") == []


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_scrape_sums_the_metrics_of_every_worker(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from tests.integration.support import request

    primary, log_path, port = start_primary(tmp_path)
    try:
        wait_until(lambda: ready_workers(log_path) == 1, what="the worker to take connections")
        for _ in range(20):  # new connections: the primary deals them to both processes
            assert request("GET", f"http://127.0.0.1:{port}/v1/models").status == 200

        def models_requests():
            text = request("GET", f"http://127.0.0.1:{port}/metrics").body.decode()
            return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                       if s.name == "gomodel_requests_total" and s.labels.get("status_code") == "200"
                       and s.labels.get("endpoint") == "other")

        # Each process flushes what its requests added every second (and before answering a scrape).
        wait_until(lambda: models_requests() == 20.0, what="every process's requests counted")
        assert {models_requests() for _ in range(6)} == {20.0}  # whichever process answers, all are counted
    finally:
        primary.send_signal(signal.SIGTERM)
        assert primary.wait(timeout=30) == 0


@pytest.mark.parametrize("role", ["worker", "primary"])
def test_each_process_of_several_builds_as_one_of_several_whatever_its_own_workers_setting(tmp_path, role):
    """A worker's command line has no --workers (L{worker_argv}): with C{--workers 4} (not C{GOMODEL_WORKERS})
    its own configuration said 1 process, and it built as a lone gateway: its SQLite store never looked
    again for a response another process kept a moment ago (a continuation sent to it got 400
    previous_response_not_found), and its budgets never followed what the other processes spent."""
    from twisted.internet.task import Clock

    from gomodel.build import build_gateway
    from gomodel.config import load_config
    from gomodel.periodic import Repeating
    from gomodel.store.sqlite.responses import MISS_GRACE

    workers = "1" if role == "worker" else "2"
    config = load_config({"GOMODEL_DATA_DIR": str(tmp_path), "GOMODEL_WORKERS": workers})
    gateway = build_gateway(config, Clock(), role=role, worker_argv=["true"], worker_env={})
    assert gateway.store.responses._miss_grace == MISS_GRACE
    assert any(isinstance(s, Repeating) and s.call == gateway.gate.follow_ledger for s in gateway)


def test_a_worker_asks_for_connections_only_once_its_reactor_runs():
    """twistd starts the services before the reactor runs, and the reactor installs its signal handlers
    only then: a worker that said it was ready at once was dealt connections while a SIGTERM (to the whole
    process group, as systemd sends it) still ended it at once, without its drain, and them with it (the
    test above saw one exit without 'Server Shut Down' now and then)."""
    from twisted.internet.testing import MemoryReactor

    reactor = MemoryReactor()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    handed = HandedConnections(reactor, Factory(), fd=theirs.detach())
    try:
        handed.startService()
        with pytest.raises(BlockingIOError):
            ours.recv(16)
        reactor.run()  # (a MemoryReactor runs its when-running calls)
        assert ours.recv(16) == b"r"
    finally:
        handed.stopService()
        ours.close()


def test_a_worker_asks_for_connections_only_once_its_models_are_discovered():
    """A worker is dealt connections once its own discovery has run (its registry's C{ready}), not as soon as its
    reactor runs: before, the primary (ready, answering C{/health/ready} 200) dealt a worker still discovering its
    share of new connections, each answered 503 C{no_ready_replica} (the SIGTERM drain test's stream that never
    got its first event on a loaded host)."""
    from twisted.internet.testing import MemoryReactor

    reactor = MemoryReactor()
    discovered = Deferred()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    handed = HandedConnections(reactor, Factory(), fd=theirs.detach(), ready=lambda: discovered)
    try:
        handed.startService()
        reactor.run()
        with pytest.raises(BlockingIOError):  # (its reactor runs, its models not known yet)
            ours.recv(16)
        discovered.callback(None)
        assert ours.recv(16) == b"r"
    finally:
        handed.stopService()
        ours.close()
