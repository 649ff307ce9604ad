"""Every use of Twisted's private names, in one place.

The gateway reaches below Twisted's public API where the public one costs
measurable time per request (the relay client, the request's C{process}, the
early write) or cannot say what we need (the request line before the body).
Each touch is here, named for what it does, and each is checked by
C{tests/test_twistedcompat.py}, which fails loudly on a Twisted that changed
it; C{setup.py} caps Twisted below the next major version for the same reason.
"""

from twisted.internet.defer import succeed
from twisted.web import resource
from twisted.web.client import _HTTP11ClientFactory
from twisted.web.http_headers import _nameEncoder


def request_line(request):
    """The method and target of a request whose body is still arriving.

    C{Request.method} and C{.uri} are set only once the whole body is in
    (C{requestReceived}); until then the channel holds the request line.

    @return: C{(method, target)} as bytes, or C{(None, None)} when the channel
        does not hold them.
    """
    channel = request.channel
    return getattr(channel, "_command", None), getattr(channel, "_path", None)


def header_name(name: str) -> bytes:
    """C{name} as L{Headers} keeps it (for L{plain_headers})."""
    return _nameEncoder.encode(name)


def plain_headers(headers) -> dict:
    """The dict C{headers} (a L{Headers}) keeps: name (made with L{header_name}) -> list of values.

    C{plain[name] = [value]} sets a header the gateway makes itself (bytes), replacing what it
    held: C{setRawHeaders} checks and re-encodes every name and value, a measurable cost for the
    six C{x-ratelimit-*} headers of every request.
    """
    return headers._rawHeaders


def use_pool_factory(pool, factory):
    """Make C{pool} build its connections with C{factory} (a subclass of L{ClientFactory})."""
    pool._factory = factory


class QuietClientFactory(_HTTP11ClientFactory):
    """The pool's connection factory, without a log line per connection opened and closed."""

    noisy = False


class PreparedRequest:
    """A request whose bytes are all known: what C{HTTP11ClientProtocol.request} needs of one.

    Twisted's own C{_newclient.Request} writes its head and then its body
    through a producer, a length-checking consumer and three Deferreds; a body
    already in memory leaves here in one write, with the head. The attributes
    are the ones C{HTTP11ClientProtocol} reads.
    """

    persistent = True
    headers = None
    bodyProducer = None
    absoluteURI = None
    _parsedURI = None

    def __init__(self, method: bytes, data: bytes):
        self.method = method
        self._data = data

    def writeTo(self, transport):
        transport.write(self._data)
        return succeed(None)

    def stopWriting(self):
        pass  # writeTo's Deferred has fired already: nothing is being written


def render_found(request, found):
    """The end of C{server.Request.process}: apply C{found}'s encoder, then render it."""
    if resource._IEncodingResource.providedBy(found):
        encoder = found.getEncoder(request)
        if encoder is not None:
            request._encoder = encoder
    request.render(found)


def handle_star(request):
    """Answer C{OPTIONS *} as Twisted does."""
    request._handleStar()


def exit_cleanly(reactor):
    """Make twistd exit with status 0 after a stop a signal asked for (it re-raises the signal otherwise).

    The reactor's signal handler notes the signal in C{reactor._exitSignal}
    before it stops; twistd reads it once the reactor has stopped and kills
    itself with it. A gateway that drained has stopped as it should.
    """
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


def send_now(transport):
    """Hand what C{transport} holds to the kernel now.

    A TCP transport buffers every write until the reactor next finds its
    socket writable: one more reactor turn (a poll, its dispatch) between a
    finished answer and the network. This does that write at once, exactly as
    the reactor would (C{doWrite}); what the socket does not take stays
    buffered for the reactor. Transports without C{doWrite} (TLS), closing
    ones and ones whose producer is paused (a full buffer) keep their own pace.
    """
    do_write = getattr(transport, "doWrite", None)
    if (do_write is not None and transport.connected and not transport.disconnecting
            and not transport.producerPaused):
        # A failed write leaves the transport registered for writing: the
        # reactor meets the error on its next turn and closes it as usual.
        do_write()
