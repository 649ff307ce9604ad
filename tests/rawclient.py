"""A raw HTTP/1.1 client over a real socket, for flow-control and disconnect tests."""

import json

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer


class RawClient(Protocol):
    """Sends one request; keeps every byte; can stop reading or vanish."""

    def __init__(self, request: bytes):
        self._request = request
        self.received = bytearray()
        self.lost = Deferred()
        self._waiters = []

    def connectionMade(self):
        self.transport.write(self._request)

    def dataReceived(self, data):
        self.received += data
        self._check()

    def connectionLost(self, reason):
        self.lost.callback(reason.value)
        self._check(final=True)

    def wait_for(self, marker: bytes) -> Deferred:
        """Fires once C{marker} was received (fails if the connection ends first)."""
        d = Deferred()
        self._waiters.append((marker, d))
        self._check()
        return d

    def _check(self, final=False):
        for marker, d in list(self._waiters):
            if self.received.find(marker, max(0, len(self.received) - 65536 - len(marker))) >= 0 or (
                    final and marker in self.received):
                self._waiters.remove((marker, d))
                d.callback(len(self.received))
            elif final:
                self._waiters.remove((marker, d))
                d.errback(ConnectionError(f"connection ended before {marker!r}"))


@implementer(IHalfCloseableProtocol)
class HalfOpenClient(RawClient):
    """A raw client that keeps its side open once the server shut its own: C{shut} fires then."""

    def __init__(self, request: bytes):
        super().__init__(request)
        self.shut = Deferred()

    def readConnectionLost(self):
        self.shut.callback(None)

    def writeConnectionLost(self):
        pass


def chat_request(body: dict, headers=None) -> bytes:
    data = json.dumps(body).encode()
    lines = [b"POST /v1/chat/completions HTTP/1.1", b"Host: gateway", b"Content-Type: application/json",
             b"Content-Length: %d" % len(data)]
    lines += [f"{k}: {v}".encode() for k, v in (headers or {}).items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + data


async def connect(reactor, port: int, request: bytes) -> RawClient:
    client = RawClient(request)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return client


def send_then_read(address, data: bytes, timeout: float = 10.0, tls: bool = False) -> bytes:
    """What a blocking client that sends all of C{data} before it reads (as http.client and curl without
    C{Expect} do) reads back until the connection ends, from C{address}: a port on 127.0.0.1, or a UNIX
    socket's path; over TLS (any certificate) when C{tls}. Run it in a thread (L{tests.support.in_thread}).

    @raise OSError: the connection was reset (or broke) while it sent or read.
    """
    import socket
    import ssl

    if isinstance(address, int):
        sock = socket.create_connection(("127.0.0.1", address), timeout=timeout)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(timeout)
        sock.connect(address)
    if tls:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        sock = context.wrap_socket(sock)
    with sock:
        sock.sendall(data)
        received = bytearray()
        while True:
            try:
                piece = sock.recv(65536)
            except ssl.SSLZeroReturnError:  # (the server's close alert)
                piece = b""
            if not piece:
                return bytes(received)
            received += piece
