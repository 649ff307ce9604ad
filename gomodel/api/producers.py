"""Writing large answers (file contents, batch results) with backpressure and bounded memory."""

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

CHUNK = 64 * 1024


@implementer(IPushProducer)
class WriteGate:
    """Registered as the request's push producer: tells the writer when it may go on.

    The writer calls L{write}, then awaits L{ready} before producing more;
    L{ready} fails with L{ConnectionDone} once the client is gone.
    """

    def __init__(self, request):
        self._request = request
        self._paused = False
        self._stopped = False
        self._waiting = None
        self._closed = False
        request.registerProducer(self, True)

    def write(self, data: bytes):
        self._request.write(data)

    def ready(self) -> Deferred:
        if self._stopped:
            return _gone()
        if not self._paused:
            return succeed(None)
        self._waiting = Deferred(lambda d: setattr(self, "_waiting", None))
        return self._waiting

    def close(self):
        """Unregister from the request (when it is still connected)."""
        if not self._closed and self._request.channel is not None:
            self._request.unregisterProducer()
        self._closed = self._stopped = True

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self):
        self._stopped = True
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(ConnectionDone("the client went away"))


def _gone():
    d = Deferred()
    d.errback(ConnectionDone("the client went away"))
    return d


async def send_file(request, handle, size: int):
    """Write the open binary C{handle} (C{size} bytes) to C{request}, 64 KiB at a time, as the client reads.

    Closes C{handle}. Returns None for the route to return (Klein then
    finishes the request); a client that leaves ends it early.
    """
    try:
        request.setHeader(b"content-length", b"%d" % size)
        if request.channel is None:
            return None
        gate = WriteGate(request)
        try:
            while True:
                data = handle.read(CHUNK)
                if not data:
                    break
                gate.write(data)
                await gate.ready()
        except ConnectionDone:
            return None
        finally:
            gate.close()
        return None
    finally:
        handle.close()


async def send_pages(request, fetch, render):
    """Write pages of rows as the client reads: C{fetch(after)} -> Deferred list of rows, C{render(row)} -> bytes.

    C{fetch} gets the last row of the previous page (None at first); an
    empty page ends the answer.
    """
    if request.channel is None:
        return None
    gate = WriteGate(request)
    try:
        last = None
        while True:
            rows = await fetch(last)
            if not rows:
                break
            gate.write(b"".join(render(row) for row in rows))
            last = rows[-1]
            await gate.ready()
    except ConnectionDone:
        return None
    except CancelledError:
        raise
    finally:
        gate.close()
    return None
