"""Services at the edges of the process: the listening ports, and the upstream pool closed last.

L{ListenerService} listens in C{privilegedStartService}, as Twisted's
C{StreamServerEndpointService} does, so C{twistd --uid} can bind a port below
1024 before it drops root. A port that cannot be had (in use, no permission)
fails the start: one log line names the address and the reason, and
L{ListenFailed} (a C{SystemExit} with status 1, as twistd's own C{sys.exit}
for a running pidfile) ends twistd before its reactor runs, rather than a
gateway that runs without a port.
"""

import os
import re
import stat

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from gomodel._twistedcompat import unix_socket_path

BACKLOG = 511  # connections waiting to be accepted, as nginx's default (Twisted's own is 50)
_BARE_IPV6 = re.compile(r":interface=(?:[0-9A-Fa-f]{0,4}:){2}")  # an IPv6 address whose colons are not escaped
_TCP = re.compile(r"tcp:(?:port=)?(?P<port>[0-9]+)(?P<options>(?::[a-z]+=(?:\\.|[^:\\])*)*)$")


def parse_tcp(description: str):
    """C{(port, interface, backlog)} of a C{tcp:PORT[:interface=X][:backlog=N]} description.

    @raise ValueError: anything else.
    """
    match = _TCP.match(description)
    if match is None:
        raise ValueError(f"not a tcp:PORT[:interface=ADDRESS][:backlog=N] listen description: {description!r}")
    options = {}
    for option in re.findall(r":([a-z]+)=((?:\\.|[^:\\])*)", match.group("options")):
        options[option[0]] = re.sub(r"\\(.)", r"\1", option[1])
    unknown = set(options) - {"interface", "backlog"}
    if unknown:
        raise ValueError(f"unsupported listen option(s) {', '.join(sorted(unknown))} in {description!r}")
    backlog = options.get("backlog", BACKLOG)
    if not (str(backlog).isascii() and str(backlog).isdigit()):
        raise ValueError(f"backlog={backlog} is not a whole number in {description!r}")
    return int(match.group("port")), options.get("interface", ""), int(backlog)


def check_listen(description: str):
    """Check a listen description without listening: a C{tcp:} one as L{parse_tcp} reads it (its port 0 to
    65535), any other as Twisted's strports read it (an C{ssl:} one loads its key and certificate).

    @raise ValueError: what is wrong with it (one line).
    """
    if _BARE_IPV6.search(description):  # (strports split it at its colons, and said so in their own words)
        raise ValueError(r"escape the colons of an IPv6 address (interface=\:\:1)")
    if description.split(":", 1)[0].lower() == "unix" and not description[5:].split(":", 1)[0]:
        raise ValueError("a unix: listener needs the socket's path (unix:/run/gomodel.sock)")
    if description.startswith("tcp:"):
        port = parse_tcp(description)[0]
        if port > 65535:
            raise ValueError(f"port {port} is not a TCP port (0 to 65535)")
        return
    if description.split(":", 1)[0].lower() == "ssl":
        _refuse_encrypted_key(description)
    try:
        endpoint = serverFromString(None, description)  # makes the endpoint (the reactor is only kept), binds nothing
    except ImportError as e:
        raise ValueError(f"cannot be used here: {e}") from None
    except IndexError:  # systemd:...:index=N with fewer descriptors passed down
        raise ValueError("no listening socket with that index was passed down (systemd's LISTEN_FDS)") from None
    except Exception as e:  # ValueError, TypeError, KeyError, OSError: strports say what they found in their words
        raise ValueError(str(e) or type(e).__name__) from None
    path = unix_socket_path(endpoint)
    if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ValueError(f"the directory of the socket {path!r} does not exist")


def _refuse_encrypted_key(description: str):
    """Refuse an C{ssl:} description whose private key is encrypted: OpenSSL would ask for its passphrase on
    the terminal, and a gateway started by systemd or Docker would wait there for good.

    @raise ValueError: it is.
    """
    from twisted.internet.endpoints import _parse  # (strports' own reading of a description)

    try:
        _, options = _parse(description)
        with open(options.get("privateKey", "server.pem"), "rb") as f:
            head = f.read(65536)
    except Exception:
        return  # (Twisted's endpoint says what is wrong with it)
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in head or b"Proc-Type: 4,ENCRYPTED" in head:
        raise ValueError(f"the private key {options.get('privateKey', 'server.pem')!r} is encrypted: give one "
                         "without a passphrase (openssl pkey -in KEY -out PLAIN), readable by the gateway only")


def listen_endpoint(reactor, description: str):
    """The server endpoint of a listen description: Twisted's strports, except that a C{tcp:}, C{tcp6:},
    C{ssl:} or C{unix:} one waits for L{BACKLOG} connections unless it says otherwise (an IPv6 interface
    listens as IPv6)."""
    try:
        port, interface, backlog = parse_tcp(description)
    except ValueError:
        if description.split(":", 1)[0].lower() in _BACKLOGGED and "backlog=" not in description:
            description += f":backlog={BACKLOG}"
        return serverFromString(reactor, description)
    return TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=interface)


# The other strports kinds that take a backlog (Twisted's default for each: 50).
_BACKLOGGED = ("tcp6", "ssl", "unix")


class ListenFailed(SystemExit):
    """A listening port could not be had; twistd exits with status 1.

    @ivar address: the listen description (e.g. C{tcp:8080:interface=127.0.0.1}).
    @ivar reason: why, e.g. C{[Errno 98] Address already in use}.
    """

    def __init__(self, address, reason):
        super().__init__(1)
        self.address = address
        self.reason = reason

    def __str__(self):
        return f"cannot listen on {self.address}: {self.reason}"


class PoolService(Service):
    """Owns the upstream connection pool; closes it last on the way down."""

    def __init__(self, pool):
        self.pool = pool

    def stopService(self):
        super().stopService()
        return self.pool.closeCachedConnections()


class RedisService(Service):
    """Runs what shares the gateway's Redis (the limit counters, the session pins) while the gateway
    runs; closes the client's connections once both have stopped."""

    def __init__(self, client, counters, pins):
        self.client = client
        self.counters = counters
        self.pins = pins

    def startService(self):
        super().startService()
        self.counters.start()
        self.pins.start()

    def stopService(self):
        """Stop both, then close the client: a Deferred firing None."""
        super().stopService()
        self.counters.stop()
        return self.pins.stop().addBoth(lambda _: self.client.close())


def _take_over_own_lock(path: str):
    """Remove the lock (C{PATH.lock}, Twisted's, naming its listener's pid) and the socket of a UNIX socket
    path when the lock names this very process, which has not listened on it yet: a gateway killed
    (SIGKILL, the OOM killer) left them, and its restart in a container got the same pid (tini's child,
    PID 1). Twisted takes such a lock for a live process's ("Cannot acquire lock"): a restart loop."""
    lock = path + ".lock"
    try:
        if os.readlink(lock) != str(os.getpid()):
            return
        os.remove(lock)
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.remove(path)
    except OSError:
        return  # (no such lock, or not ours: Twisted's listen says what is wrong)
    ListenerService.log.info("took over {path}, left by a gateway that had this process's pid", path=path)


class ListenerService(Service):
    """Listens on one endpoint; L{whenListening} fires with the port."""

    log = Logger()

    def __init__(self, endpoint, factory, description=None):
        """
        @param endpoint: an L{IStreamServerEndpoint}.
        @param factory: the protocol factory to listen with.
        @param description: the strports description, named in logs.
        """
        self.description = description
        self._endpoint = endpoint
        self._factory = factory
        self._listening = None  # the endpoint's Deferred, once listen was called
        self._port = None
        self._waiting = []

    def whenListening(self) -> Deferred:
        """Fires with the L{IListeningPort} once listening.

        Fails as the listen failed (with L{ListenFailed}), or with
        L{CancelledError} when the service stops before the endpoint answers.
        """
        if self._port is not None:
            return succeed(self._port)
        d = Deferred()
        self._waiting.append(d)
        return d

    def privilegedStartService(self):
        """Listen, before twistd drops privileges.

        @raise ListenFailed: the endpoint failed at once (as every stock
            endpoint does: TCP, UNIX, SSL, systemd); the failure is logged.
        """
        super().privilegedStartService()
        path = unix_socket_path(self._endpoint)
        if path is not None:
            _take_over_own_lock(path)
        failed_now = []
        self._listening = maybeDeferred(self._endpoint.listen, self._factory)
        self._listening.addCallbacks(self._listened, self._failed, errbackArgs=(failed_now,))
        if failed_now:
            raise failed_now[0]

    def startService(self):
        """Start, listening now unless L{privilegedStartService} already did.

        @raise ListenFailed: as L{privilegedStartService}.
        """
        super().startService()
        if self._listening is None:
            self.privilegedStartService()

    def _listened(self, port):
        self._port = port
        address = port.getHost()
        if hasattr(address, "port"):
            self.log.info("listening on {host}:{port}", host=address.host, port=address.port)
        else:  # a UNIX socket: its path
            name = getattr(address, "name", address)
            path = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
            self.log.info("listening on {path}", path=path)
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            w.callback(port)

    def _failed(self, failure, failed_now):
        if failure.check(CancelledError):
            error = failure
        else:
            value = failure.value
            reason = value.socketError if isinstance(value, CannotListenError) else failure.getErrorMessage()
            error = ListenFailed(self.description or repr(self._endpoint), reason)
            self.log.critical("{error}", error=str(error))
            failed_now.append(error)
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            w.errback(error)
        # consumed here: raised by privilegedStartService, or (an endpoint that
        # fails later) logged above and given to whenListening's callers

    def stopListening(self):
        """Close the port (new connections are refused); connections already open go on.

        @return: a Deferred firing once the port is closed, or None.
        """
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        return None

    def stopService(self):
        """Stop listening (or stop waiting for the endpoint); fires when the port is closed."""
        super().stopService()
        listening, self._listening = self._listening, None
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        if listening is not None:
            listening.cancel()
        return None
