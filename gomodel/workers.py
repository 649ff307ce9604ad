"""Several gateway processes on one port: C{twistd -n gomodel --workers N}.

The first process (the primary) listens and starts N-1 worker processes; it
deals the connections it accepts round robin to itself and to each worker
ready for them, passing a worker the connection's descriptor down a UNIX
socket (L{Handoff}), as Node's cluster module does. Each process is a whole
gateway with its own reactor, pool and model registry, pinned to no core in
particular, and serves its connections from then on: the primary only
accepts, once per connection. It restarts a worker that dies, stops them
all when it stops, and a worker stops by itself when the primary is gone
(its stdin, a pipe from the primary, closes).
"""

import os
import signal
import socket
import subprocess
import sys

from twisted.application.service import Service
from twisted.internet import protocol, stdio
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.main import CONNECTION_DONE
from twisted.logger import Logger, LogLevel, eventFromJSON

RESTART_DELAY = 1.0
STOP_GRACE = 10.0
HANDOFF_FD = 3  # a worker's end of its channel to the primary
_READY = b"r"  # a worker to the primary: hand me connections
_FAMILIES = {b"4": socket.AF_INET, b"6": socket.AF_INET6}
# A worker's logger (twistd's --logger) when its primary logs elsewhere than standard output: see WorkerLog.
WORKER_LOGGER = "gomodel.logs.to_primary"
_LINE_LIMIT = 1 << 20  # bytes of a worker's output held waiting for the end of its line


class Handoff(protocol.ServerFactory):
    """The primary's listening factory: each accepted connection goes, in turn, to the primary itself
    (the site) or to one of the workers ready for connections (L{WorkerChannel}).

    Round robin gives each process the same share of new connections however few they are (a
    load balancer's keep-alive pool, a benchmark's ten); C{SO_REUSEPORT}'s hash of each
    connection's addresses can give one process most of them. A connection that cannot be
    passed on (the worker's channel is full or gone) is served here.
    """

    noisy = False

    def __init__(self, site):
        self.site = site
        self.ready = []  # the WorkerChannels taking connections, in turn
        self._turn = 0

    def doStart(self):
        self.site.doStart()

    def doStop(self):
        self.site.doStop()

    def buildProtocol(self, addr):
        """The site's protocol on the primary's turn, else a L{_PassOn} to the next worker."""
        turn = self._turn
        self._turn = turn + 1 if turn < len(self.ready) else 0
        if turn == 0 or turn > len(self.ready):
            return self.site.buildProtocol(addr)
        return _PassOn(self, self.ready[turn - 1])

    def serve_here(self, transport):
        """Serve a connection the primary had meant to pass on."""
        served = self.site.buildProtocol(transport.getPeer())
        transport.protocol = served
        served.makeConnection(transport)


class _PassOn(protocol.Protocol):
    """An accepted connection on its way to a worker: its descriptor goes down the worker's channel
    before anything is read from it, and the primary lets go of it without shutting it down."""

    def __init__(self, handoff, worker):
        self._handoff = handoff
        self._worker = worker

    def makeConnection(self, transport):
        transport.stopReading()
        sock = transport.getHandle()
        if self._worker.send(sock.fileno(), b"6" if sock.family == socket.AF_INET6 else b"4"):
            os.close(sock.detach())  # the worker has it now; Twisted never sees this socket again
        else:
            transport.startReading()
            self._handoff.serve_here(transport)


class WorkerChannel:
    """The primary's end of a worker's channel (a C{SOCK_SEQPACKET} socket pair): one message a
    connection, its descriptor and its address family. The worker joins the rotation when it says it
    is ready and leaves it when the channel closes (it exited) or cannot take a connection."""

    log = Logger()

    def __init__(self, reactor, handoff, sock, number):
        self._reactor = reactor
        self._handoff = handoff
        self._sock = sock
        self.number = number
        sock.setblocking(False)
        reactor.addReader(self)

    def fileno(self):
        return self._sock.fileno()

    def logPrefix(self):
        return f"worker {self.number}"

    def doRead(self):
        try:
            said = self._sock.recv(16)
        except BlockingIOError:
            return None
        except OSError:
            said = b""
        if not said:
            return CONNECTION_DONE  # the worker is gone: the reactor calls connectionLost
        if _READY in said and self not in self._handoff.ready:
            self._handoff.ready.append(self)
            self.log.info("worker {number} ready for connections", number=self.number)
        return None

    def send(self, fd, family) -> bool:
        """Pass a connection's descriptor on: True once it is in the channel; False when the channel is full
        (the worker is busy: the primary serves it) or broken (the worker left the rotation)."""
        try:
            socket.send_fds(self._sock, [family], [fd])
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            self.log.warn("worker {number} takes no more connections: {error}", number=self.number, error=e)
            self.close()
            return False

    def connectionLost(self, reason):
        self.close()

    def close(self):
        """Out of the rotation, the channel closed (connections still in it are closed with it)."""
        if self in self._handoff.ready:
            self._handoff.ready.remove(self)
        if self._sock.fileno() != -1:
            self._reactor.removeReader(self)
            self._sock.close()


class HandedConnections(Service):
    """In a worker: take the connections the primary passes down the channel on L{HANDOFF_FD}.

    Started, it tells the primary it is ready once its reactor runs and C{ready} fired. L{stopListening} (a
    drain) takes what is already in the channel, then closes it: the primary serves new connections itself
    from then on.
    """

    log = Logger()

    def __init__(self, reactor, factory, fd=HANDOFF_FD, ready=None):
        """
        @param ready: called once the reactor runs, a Deferred that fires once the worker can serve (its
            registry's C{ready}: its models discovered), or None (at once).
        """
        self._reactor = reactor
        self._factory = factory
        self._fd = fd
        self._sock = None
        self._serves = ready

    def startService(self):
        super().startService()
        self._sock = socket.socket(fileno=self._fd)
        self._sock.setblocking(False)
        # Once the reactor runs, and so handles SIGTERM with a drain (twistd starts the services before), and
        # once its models are known: the primary, ready, deals a worker still discovering none of its turns (each
        # would be a 503 no_ready_replica).
        self._reactor.callWhenRunning(self._when_serving)

    def _when_serving(self):
        if self._serves is None:
            self._ready()
        else:
            self._serves().addCallback(lambda _: self._ready())

    def _ready(self):
        """Tell the primary to hand connections over, and take them."""
        if not self.running or self._sock.fileno() == -1:
            return
        try:
            self._sock.send(_READY)
        except OSError as e:  # the primary is gone (ParentWatch stops the worker)
            self.log.warn("cannot reach the primary: {error}", error=e)
            self._sock.close()
            return
        self._reactor.addReader(self)
        self.log.info("taking connections from the primary")

    def fileno(self):
        return self._sock.fileno()

    def logPrefix(self):
        return "handed connections"

    def doRead(self):
        for _ in range(64):  # then the reactor's other sockets get a turn
            try:
                data, fds, _, _ = socket.recv_fds(self._sock, 1, 1)
            except BlockingIOError:
                return None
            except OSError:
                return CONNECTION_DONE
            if not data:
                return CONNECTION_DONE  # the primary is gone (ParentWatch stops the worker)
            for fd in fds:
                try:
                    self._reactor.adoptStreamConnection(fd, _FAMILIES.get(data, socket.AF_INET), self._factory)
                except OSError as e:  # the client left meanwhile
                    self.log.debug("a handed connection was gone: {error}", error=e)
                finally:
                    os.close(fd)
        return None

    def connectionLost(self, reason):
        self._close()

    def stopListening(self):
        """Take the connections already handed over, then close the channel; returns None."""
        if self._sock is not None and self._sock.fileno() != -1:
            self.doRead()
            self._close()

    def stopService(self):
        super().stopService()
        self.stopListening()

    def _close(self):
        if self._sock is not None and self._sock.fileno() != -1:
            self._reactor.removeReader(self)
            self._sock.close()


class WorkerLog:
    """What a worker writes, published in the primary's log (which goes where twistd's C{--logfile},
    C{--syslog} or C{--logger} sends it; a worker's own standard output is the primary's, which such a
    primary no longer writes to). Its standard output carries its events as Twisted's JSON lines
    (L{gomodel.logs.to_primary}); anything else on it, or on its standard error (a traceback before its
    logging began), is published line by line as that worker's text, at C{error} level from standard error.
    """

    def __init__(self, publish, number, clock):
        """
        @param publish: the primary's log publisher (C{globalLogPublisher}), called with each event.
        @param number: the worker's number (each event gets it as its C{worker} field).
        @param clock: the time of a line that is not an event.
        """
        self._publish = publish
        self._number = number
        self._clock = clock
        self._held = {1: b"", 2: b""}

    def received(self, fd, data):
        """C{data} came on the worker's descriptor C{fd} (1 or 2): publish each whole line of it."""
        lines = (self._held[fd] + data).split(b"\n")
        held = lines.pop()
        if len(held) > _LINE_LIMIT:  # no line end in sight: published as it is
            lines.append(held)
            held = b""
        self._held[fd] = held
        for line in lines:
            self._line(fd, line)

    def ended(self):
        """The worker is gone: publish what it left without a line end."""
        for fd, held in self._held.items():
            if held:
                self._line(fd, held)
        self._held = {1: b"", 2: b""}

    def _line(self, fd, line):
        event = None
        if fd == 1 and line.startswith(b"\x1e"):
            try:
                event = eventFromJSON(line[1:].decode("utf-8"))
            except ValueError:
                pass
        if event is None:
            text = line.decode("utf-8", "replace").rstrip()
            if not text:
                return
            event = {"log_format": "{line}", "line": text, "log_namespace": "gomodel.workers",
                     "log_level": LogLevel.error if fd == 2 else LogLevel.info, "log_time": self._clock.seconds()}
        event["worker"] = self._number
        self._publish(event)


class _Worker(protocol.ProcessProtocol):
    def __init__(self, supervisor, number, log=None):
        self.supervisor = supervisor
        self.number = number
        self.pid = None
        self.channel = None  # its WorkerChannel
        self.exited = Deferred()
        self.log = log  # its WorkerLog, when its output is read here

    def childDataReceived(self, fd, data):
        if self.log is not None:
            self.log.received(fd, data)

    def processEnded(self, reason):
        if self.log is not None:
            self.log.ended()
        self.exited.callback(None)
        self.supervisor.ended(self, reason)


class WorkerSupervisor(Service):
    """Starts and keeps N-1 worker processes, each with its channel for the connections the primary passes on."""

    log = Logger()

    def __init__(self, reactor, count: int, handoff, argv, env, grace=STOP_GRACE, dead=None, publish=None):
        """
        @param handoff: the primary's L{Handoff} (its listening factory): each worker joins its rotation.
        @param argv: the worker command line (L{worker_argv}).
        @param env: the workers' environment (twistd's own, handed down from
            L{gomodel.tap}: only the process edge reads C{os.environ}).
        @param grace: seconds a stopping worker gets (its drain) before it is killed.
        @param dead: called with the pid of each worker that exited (prometheus_client's
            C{mark_process_dead}: its live gauges stop counting it).
        @param publish: where the workers' log events go (this process's log publisher), read from their
            standard output and error (L{WorkerLog}; C{argv} then has them write there as
            L{WORKER_LOGGER} does); or None: they write to this process's standard output themselves.
        """
        self._reactor = reactor
        self._grace = grace
        self._dead = dead
        self._publish = publish
        self._count = count
        self._handoff = handoff
        self._argv = argv
        self._env = dict(env)
        # Workers start where the primary was built, so that they read the relative paths it read (--config,
        # GOMODEL_DATA_DIR): twistd changes to its --rundir only after it built the gateway.
        self._cwd = os.getcwd()
        self._workers = {}
        self._restarts = {}

    def startService(self):
        super().startService()
        for number in range(1, self._count):
            self._spawn(number)

    def _spawn(self, number):
        if not self.running:
            return
        worker = _Worker(self, number, None if self._publish is None else WorkerLog(self._publish, number, self._reactor))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        output = {1: 1, 2: 2} if worker.log is None else {1: "r", 2: "r"}
        try:
            # stdin is a pipe from us: the worker stops when it closes (we are gone).
            self._reactor.spawnProcess(worker, self._argv[0], self._argv, env=self._env, path=self._cwd,
                                       childFDs={0: "w", **output, HANDOFF_FD: theirs.fileno()})
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker.channel = WorkerChannel(self._reactor, self._handoff, ours, number)
        self._workers[number] = worker
        worker.pid = worker.transport.pid
        self.log.info("worker {number} started (pid {pid})", number=number, pid=worker.transport.pid)

    def ended(self, worker, reason):
        self._workers.pop(worker.number, None)
        worker.channel.close()
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


# A worker's program (C{python -c}): the C{gomodel} runner, with the primary's C{sys.path[0]}, the argument after
# the program (C{-c} alone would put the working directory there, and the worker would import what lies in it).
_WORKER = ("import sys; first = sys.argv.pop(1)\n"
           "if not sys.flags.safe_path: sys.path[0] = first\n"
           "from gomodel.cli import twistd; twistd()")


def worker_argv(options_argv, forward_logs=False):
    """The command line of a worker: the C{gomodel} runner (L{gomodel.cli}), as a worker, without the
    primary's --listen/--workers (it listens nowhere: its connections come from the primary), under the
    primary's interpreter options (C{-OO}, C{-X ...}: a worker runs as the primary does), importing from
    where the primary imports; with C{forward_logs}, writing its log events for the primary to publish
    (L{WORKER_LOGGER}, see L{WorkerLog})."""
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
    first = "" if sys.flags.safe_path else sys.path[0]
    logger = [f"--logger={WORKER_LOGGER}"] if forward_logs else []
    return [sys.executable, *subprocess._args_from_interpreter_flags(), "-c", _WORKER, first,
            "-n", "--pidfile=", *logger, "gomodel", "--worker-child", *kept]
