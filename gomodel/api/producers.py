"""Writing large answers (file contents, batch results) with backpressure and bounded memory."""

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gomodel.errors import StorageUnavailable

CHUNK = 64 * 1024
log = Logger(namespace="gomodel.api")


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


def abort_started(request, failure, what):
    """A failure while writing C{request}'s answer: cut the connection if the answer has begun.

    Once the first byte of a 200 was written, an error envelope appended to
    the body would look like a clean, complete answer; aborting the
    connection makes the client see a broken one (Synapse's rule). Returns
    the exception for the caller to raise: a L{CancelledError} (nothing
    left to write) after an abort, else the original error (rendered as
    usual, since nothing was written).
    """
    if not request.startedWriting:
        return failure.value
    if failure.check(StorageUnavailable):
        log.warn("{what} broke off: {error}", what=what, error=failure.value.message)
    elif not failure.check(CancelledError):
        log.failure("{what} broke off", failure, what=what)
    channel = request.channel
    if channel is not None and channel.transport is not None:
        channel.transport.abortConnection()
    return CancelledError(f"{what} broke off after its first byte; the connection was aborted")


async def send_file(request, blobs, blob_id, size: int):
    """Write blob C{blob_id} (C{size} bytes) from the L{IBlobStore} C{blobs} to C{request}, as the client reads.

    Reads 64 KiB at a time, off the reactor. Returns None for the route to
    return (Klein then finishes the request); a client that leaves ends it
    early. A failure before the first byte propagates (and is rendered); a
    failure after it aborts the connection and raises L{CancelledError}.
    """
    request.setHeader(b"content-length", b"%d" % size)
    if request.channel is None:
        return None
    gate = WriteGate(request)
    offset = 0
    try:
        while offset < size:
            data = await blobs.read(blob_id, offset, min(CHUNK, size - offset))
            if not data:
                raise StorageUnavailable(f"The contents of {blob_id} ended at {offset} of {size} bytes.")
            gate.write(data)
            offset += len(data)
            await gate.ready()
    except ConnectionDone:
        return None
    except BaseException:
        raise abort_started(request, Failure(), "sending a file") from None
    finally:
        gate.close()
    return None


async def send_pages(request, fetch, render):
    """Write pages of rows as the client reads: C{fetch(after)} -> Deferred list of rows, C{render(row)} -> bytes.

    C{fetch} gets the last row of the previous page (None at first); an
    empty page ends the answer. A failure before the first byte propagates
    (and is rendered); a failure after it aborts the connection and raises
    L{CancelledError}, so that the body never ends like a complete one.
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
    except BaseException:
        raise abort_started(request, Failure(), "sending pages") from None
    finally:
        gate.close()
    return None
