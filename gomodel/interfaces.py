"""The gateway's seams: an upstream server, and an observer of a relayed stream.

The stores' interfaces live beside their implementations (L{gomodel.store.interfaces}).
"""

from zope.interface import Attribute, Interface


class IUpstream(Interface):
    """One upstream provider instance (a vLLM server, an OpenAI-compatible API): what callers use of it."""

    name = Attribute("The instance name used in selectors, e.g. 'vllm-test'.")
    type = Attribute("The provider type, e.g. 'vllm'.")
    hidden = Attribute("Strings (host, URLs; its API key, as a gomodel.upstream.errors.Secret) that must never "
                       "reach a client.")
    configured_models = Attribute("Model ids configured for it (a tuple; may be empty).")

    def url(path, native=False):
        """The absolute URL of C{path} on this upstream.

        @param path: an OpenAI API path (C{"/chat/completions"}), or with
            C{native} a provider-native one (C{"tokenize"}, C{"v1/models"}),
            placed where that provider serves it.
        @rtype: L{str}
        """

    def send(method, url, body, request_id, headers=None, content_type=b"application/json"):
        """Send one request; a coroutine (await it, or wrap it in C{Deferred.fromCoroutine}).

        A pooled connection that turns out closed before any answer byte is
        retried once, on a new one.

        @param headers: extra request headers, name -> list of values (the
            provider's key and our request id always win).
        @return: the unbuffered L{twisted.web.iweb.IResponse} (any status).
        @raise gomodel.errors.UpstreamUnreachable: no answer could be had.
        @raise gomodel.errors.UpstreamTimeout: no response head in time.
        @raise twisted.internet.defer.CancelledError: cancelled by the caller.
        """

    def abandon(why="went down"):
        """Its server went down (or stalled): end every L{send} still waiting for its answer's head now, its
        connection closed (a server still alive aborts it), each raising an L{gomodel.errors.UpstreamUnreachable}
        that is C{abandoned} (C{sent} where its connection was made; its message: the server C{why} before it
        answered), rather than after its timeout.

        @return: how many it ended.
        """

    def list_models():
        """GET the upstream's model list.

        @return: Deferred firing with a list of model objects (dicts with an
            C{id}), or failing with a L{gomodel.errors.GatewayError}.
        """


class IStreamObserver(Interface):
    """Watches a relayed event stream; decides what of it the client gets."""

    usage = Attribute("The stream's usage object once seen, else None.")
    done = Attribute("Whether what it returned so far holds the stream's proper end ([DONE], response.completed, "
                     "message_stop); False for a body without one. Read after every write (an attribute, not a "
                     "method: a stream's every upstream read reads it).")

    def feed(data):
        """Take upstream bytes; return the bytes to send the client now.

        @raise Exception: the stream cannot go on (the relay fails it).
        """

    def finish():
        """The upstream body ended cleanly.

        @raise gomodel.proxy.sse.StreamIncomplete: the stream did not end properly.
        """
