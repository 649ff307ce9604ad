"""Several gateway processes on one port: C{twistd -n gomodel --workers N}.

The first process (the primary) listens with C{SO_REUSEPORT} and starts N-1
worker processes that listen on the same port the same way, so the kernel
spreads new connections across all of them; each is a whole gateway with its
own reactor, pool and model registry, pinned to no core in particular. The
primary restarts a worker that dies, stops them all when it stops, and a
worker stops by itself when the primary is gone (its stdin, a pipe from the
primary, closes).
"""

import re
import signal
import socket
import sys

from twisted.application.service import Service
from twisted.internet import protocol, stdio
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

RESTART_DELAY = 1.0
STOP_GRACE = 10.0
_TCP = re.compile(r"tcp:(?:port=)?(?P<port>\d+)(?P<options>(?::[a-z]+=(?:\\.|[^:\\])*)*)$")


def parse_tcp(description: str):
    """C{(port, interface, backlog)} of a C{tcp:PORT[:interface=X][:backlog=N]} description.

    @raise ValueError: anything else (workers share TCP ports only).
    """
    match = _TCP.match(description)
    if match is None:
        raise ValueError(f"--workers needs tcp:PORT[:interface=ADDRESS] listen descriptions, not {description!r}")
    options = {}
    for option in re.findall(r":([a-z]+)=((?:\\.|[^:\\])*)", match.group("options")):
        options[option[0]] = re.sub(r"\\(.)", r"\1", option[1])
    unknown = set(options) - {"interface", "backlog"}
    if unknown:
        raise ValueError(f"--workers: unsupported listen option(s) {', '.join(sorted(unknown))} in {description!r}")
    return int(match.group("port")), options.get("interface", ""), int(options.get("backlog", 511))


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """A TCP server endpoint whose socket has C{SO_REUSEPORT}, so several processes can share the port."""

    def __init__(self, reactor, port: int, interface: str = "", backlog: int = 511):
        self._reactor = reactor
        self._port = port
        self._interface = interface
        self._backlog = backlog

    def listen(self, factory):
        """Fires with the L{IListeningPort}."""
        family = socket.AF_INET6 if ":" in self._interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self._interface, self._port))
            sock.listen(self._backlog)
            sock.setblocking(False)
            port = self._reactor.adoptStreamPort(sock.fileno(), family, factory)
        finally:
            sock.close()  # the reactor holds its own duplicate
        return succeed(port)


class _Worker(protocol.ProcessProtocol):
    def __init__(self, supervisor, number):
        self.supervisor = supervisor
        self.number = number
        self.pid = None
        self.exited = Deferred()

    def processEnded(self, reason):
        self.exited.callback(None)
        self.supervisor.ended(self, reason)


class WorkerSupervisor(Service):
    """Starts and keeps N-1 worker processes listening where the primary listens."""

    log = Logger()

    def __init__(self, reactor, count: int, listeners, argv, env, grace=STOP_GRACE, dead=None):
        """
        @param listeners: the primary's L{gomodel.listeners.ListenerService}s, with
            their descriptions, to learn the ports (port 0 becomes the real one).
        @param argv: the worker command line, without its C{--listen} options.
        @param env: the workers' environment (twistd's own, handed down from
            L{gomodel.tap}: only the process edge reads C{os.environ}).
        @param grace: seconds a stopping worker gets (its drain) before it is killed.
        @param dead: called with the pid of each worker that exited (prometheus_client's
            C{mark_process_dead}: its live gauges stop counting it).
        """
        self._reactor = reactor
        self._grace = grace
        self._dead = dead
        self._count = count
        self._listeners = listeners
        self._argv = argv
        self._env = dict(env)
        self._workers = {}
        self._restarts = {}
        self._listen_args = None

    def startService(self):
        super().startService()
        waiting = [listener.whenListening() for listener in self._listeners]
        DeferredList(waiting, fireOnOneErrback=True, consumeErrors=True).addCallback(self._spawn_all)

    def _spawn_all(self, results):
        self._listen_args = []
        for (_, port), listener in zip(results, self._listeners):
            _, interface, backlog = parse_tcp(listener.description)
            interface = interface.replace(":", "\\:")
            description = f"tcp:{port.getHost().port}" + (f":interface={interface}" if interface else "")
            self._listen_args += ["--listen", description + f":backlog={backlog}"]
        for number in range(1, self._count):
            self._spawn(number)

    def _spawn(self, number):
        if not self.running:
            return
        worker = _Worker(self, number)
        argv = self._argv + self._listen_args
        # stdin is a pipe from us: the worker stops when it closes (we are gone).
        self._reactor.spawnProcess(worker, argv[0], argv, env=self._env, childFDs={0: "w", 1: 1, 2: 2})
        self._workers[number] = worker
        worker.pid = worker.transport.pid
        self.log.info("worker {number} started (pid {pid})", number=number, pid=worker.transport.pid)

    def ended(self, worker, reason):
        self._workers.pop(worker.number, None)
        if self._dead is not None and worker.pid is not None:
            try:
                self._dead(worker.pid)
            except Exception:
                self.log.failure("forgetting the metrics of worker {number}", number=worker.number)
        if not self.running:
            return
        self.log.warn("worker {number} exited ({reason}); restarting it in {delay:.0f}s",
                      number=worker.number, reason=reason.getErrorMessage(), delay=RESTART_DELAY)
        self._restarts[worker.number] = self._reactor.callLater(RESTART_DELAY, self._spawn, worker.number)

    def stopService(self):
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        exits = []
        for worker in list(self._workers.values()):
            exits.append(worker.exited)
            _signal(worker, signal.SIGTERM)
            kill = self._reactor.callLater(self._grace, _signal, worker, signal.SIGKILL)
            worker.exited.addBoth(lambda _, call=kill: call.cancel() if call.active() else None)
        return DeferredList(exits)


def _signal(worker, sig):
    try:
        worker.transport.signalProcess(sig)
    except Exception:  # already gone
        pass


class _ParentPipe(protocol.Protocol):
    def __init__(self, on_gone):
        self._on_gone = on_gone

    def connectionLost(self, reason):
        self._on_gone()


class ParentWatch(Service):
    """In a worker: stop the reactor when the primary's pipe on stdin closes."""

    def __init__(self, reactor):
        self._reactor = reactor

    def startService(self):
        super().startService()
        stdio.StandardIO(_ParentPipe(self._parent_gone), reactor=self._reactor)

    def _parent_gone(self):
        if self.running and self._reactor.running:
            self._reactor.stop()


def worker_argv(options_argv):
    """The command line of a worker: the C{gomodel} runner (L{gomodel.cli}), as a worker, without the
    primary's --listen/--workers."""
    kept = []
    skip = False
    for arg in options_argv:
        if skip:
            skip = False
            continue
        if arg in ("--listen", "--workers", "-w"):
            skip = True
            continue
        if arg.startswith(("--listen=", "--workers=")):
            continue
        kept.append(arg)
    return [sys.executable, "-c", "from gomodel.cli import twistd; twistd()",
            "-n", "--pidfile=", "gomodel", "--worker-child", *kept]
