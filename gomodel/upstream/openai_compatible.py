"""Any OpenAI-compatible upstream: vLLM, OpenAI, Ollama, Groq, OpenRouter, xAI, DeepSeek."""

from functools import lru_cache

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout, succeed
from twisted.logger import Logger
from twisted.web.client import RequestNotSent, RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from zope.interface import implementer

from gomodel import jsonutil
from gomodel.errors import BadUpstreamResponse, UpstreamTimeout, UpstreamUnreachable
from gomodel.http.headers import ProtocolHeaders
from gomodel.interfaces import IUpstream
from gomodel.upstream.client import BodyTooLarge, read_body, was_cancelled, within
from gomodel.addresses import Secret
from gomodel.upstream.errors import upstream_error

# A failure of these kinds means no response byte came back: on a pooled
# connection the upstream had most likely just closed it, so one retry is safe.
# On a new connection (the failure's C{fresh}, L{gomodel.upstream.client}) the
# upstream took the request and dropped it: sent again, it could run twice.
_STALE_CONNECTION = (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)
_TIMEOUTS = (DeferredTimeout, net_error.TimeoutError)
MODELS_LIST_TIMEOUT = 30.0
# A health check's (its model list): a server that answers nothing fails each within it (3 in a row take it down, its
# requests waiting for a head ending then), as a vLLM's /health (5 s), not after the discovery's 30 s each.
HEALTH_LIST_TIMEOUT = 10.0
MODELS_LIST_LIMIT = 16 * 1024 * 1024


# The headers a request's extras never set (lower-case): the gateway's own, which it sets itself.
_OURS = (b"x-request-id", b"authorization")


@lru_cache(maxsize=64)
def _protocol_line(name, value) -> bytes:
    """The head line of a L{ProtocolHeaders} header, C{name} and C{value} as L{Headers} sanitises them (the name in
    Header-Case, a CR or LF in the value a space), kept for the next request with the same name and value.

    @raise ValueError: C{name} is one the gateway sets itself, or C{Content-Type}.
    """
    ((name, (value,)),) = Headers({name: [value]}).getAllRawHeaders()
    if name.lower() in _OURS + (b"content-type",):
        raise ValueError(f"a protocol header must not be {name!r}: the gateway sets it")
    return name + b": " + value + b"\r\n"


@implementer(IUpstream)
class OpenAICompatibleProvider:
    """One OpenAI-compatible upstream instance, with its own key and base URL."""

    log = Logger()

    def __init__(self, config, replica, relay, clock, timeouts):
        """
        @param config: the provider's L{gomodel.config.ProviderConfig}.
        @param replica: the L{gomodel.config.ReplicaConfig} of this server.
        @param clock: what its timeouts run on: a reactor, or the gateway's L{gomodel.timers.Timers}.
        """
        self.config = config
        self.name = config.name
        self.type = config.type
        self.configured_models = tuple(config.models)
        self.base_url = replica.base_url
        self.root_url = replica.root_url
        self._relay = relay  # relayed requests and our own calls (model discovery, probes): a RelayClient
        self._clock = clock
        self._timeouts = timeouts
        api_key = replica.api_key or config.api_key
        # What no client may see: its addresses, and its key (an upstream may quote the key it refused), unless
        # that is so short (a test's "token") that it would be cut out of every other word of a message.
        self.hidden = tuple(h for h in (replica.base_url, replica.root_url, replica.netloc,
                                        replica.host) if h) + ((Secret(api_key),) if len(api_key or "") >= 8 else ())
        self._authorization = (b"Bearer " + api_key.encode("latin-1")) if api_key else None
        # The account its requests are made on (the provider's key or its own): replicas with the same one share
        # a quota (L{gomodel.proxy.exchange}'s spent quota).
        self.account = self._authorization
        # The lines every request carries: the provider's key where it has one, and a request for its answers
        # uncoded (without an Accept-Encoding any coding is acceptable, RFC 9110 12.5.3: a gzip'd stream is no
        # event the gateway can cut, a gzip'd answer no usage it can read; a passthrough client's never goes up).
        self._own_lines = (b"Authorization: " + self._authorization + b"\r\n" if self._authorization else b""
                           ) + b"Accept-Encoding: identity\r\n"
        self._awaiting = set()  # the sends waiting for their answer's head (L{abandon})
        self._abandoned = set()  # those L{abandon} cancelled, until their send has raised
        self._abandoned_why = "went down"  # what their server did (L{abandon})

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"

    def _header_lines(self, request_id: bytes, extra, content_type) -> bytes:
        """A request's head lines: C{extra} (name -> values, through L{Headers}, which sanitises; a
        L{ProtocolHeaders}' lines kept once made: L{_protocol_line}), C{content_type},
        our request id, the provider's key when configured, and C{Accept-Encoding: identity}."""
        if request_id.find(b"\r") >= 0 or request_id.find(b"\n") >= 0:  # (not `in`: see gomodel.proxy.sse.mentions)
            raise ValueError("a request id must not hold CR or LF")
        if content_type is None:
            ours = b"X-Request-Id: %s\r\n%s" % (request_id, self._own_lines)
        else:
            ours = b"Content-Type: %s\r\nX-Request-Id: %s\r\n%s" % (content_type, request_id, self._own_lines)
        if not extra:
            return ours
        lines = []
        if extra.__class__ is ProtocolHeaders:  # (each line made once: _protocol_line)
            for name, values in extra.items():
                for value in values:
                    lines.append(_protocol_line(name, value))
        else:
            for name, values in Headers(extra).getAllRawHeaders():
                lower = name.lower()
                if lower in _OURS or (lower == b"content-type" and content_type is not None):
                    continue
                for value in values:  # (a loop: a generator would make name a closure cell on every call)
                    lines.append(name + b": " + value + b"\r\n")
        lines.append(ours)
        return b"".join(lines)

    def url(self, path: str, native=False) -> str:
        """See L{IUpstream.url}."""
        if native:
            return self.base_url + "/" + _strip_v1(path)
        return self.base_url + path

    async def send(self, method, url, body, request_id, headers=None, content_type=b"application/json"):
        """See L{IUpstream.send}."""
        url = url.encode("ascii") if isinstance(url, str) else url
        method = method.encode("ascii") if isinstance(method, str) else method
        lines = self._header_lines(request_id, headers, content_type)
        for attempt in (1, 2):
            try:
                d = self._relay.request(method, url, lines, body)
                awaiting = self._awaiting
                awaiting.add(d)
                try:
                    return await within(d, self._timeouts.response_header, self._clock)
                finally:
                    awaiting.discard(d)
            except _TIMEOUTS as e:
                error = UpstreamTimeout(f"The upstream provider '{self.name}' did not answer in time.")
                error.sent = isinstance(e.__cause__, ResponseFailed)  # (not: a connection never made)
                raise error from None
            except _STALE_CONNECTION as e:
                if was_cancelled(e):
                    raise self._cancelled(d, True) from None
                if attempt == 1 and not getattr(e, "fresh", False):
                    self.log.debug("retrying {provider} once after {error!r}", provider=self.name, error=e)
                    continue
                raise self._unreachable(e) from None
            except (CancelledError, net_error.ConnectingCancelledError):  # (before its connection was made)
                raise self._cancelled(d, False) from None
            except Exception as e:
                raise self._unreachable(e) from None

    @property
    def awaiting(self):
        """The sends waiting for their answer's head now (a set not to be changed)."""
        return self._awaiting

    def abandon(self, why="went down"):
        """See L{IUpstream.abandon}."""
        awaiting, self._awaiting = self._awaiting, set()
        if not awaiting:
            return 0
        self._abandoned_why = why
        # (those of one abandonment at a time: one whose send did not raise as cancelled is kept until the next)
        self._abandoned = abandoned = set(awaiting)  # (a copy: each send takes its own out of awaiting)
        for d in abandoned.copy():
            d.cancel()
        return len(abandoned)

    def _cancelled(self, d, sent):
        """What a send whose request C{d} was cancelled raises: the caller's C{CancelledError}, or where
        L{abandon} cancelled it, an L{UpstreamUnreachable} that is C{abandoned} (and C{sent} where its
        request went out: C{sent})."""
        if d not in self._abandoned:
            return CancelledError()
        self._abandoned.discard(d)
        error = UpstreamUnreachable(f"The upstream provider '{self.name}' {self._abandoned_why} before it answered.")
        error.sent, error.abandoned = sent, True
        return error

    def _unreachable(self, failure=None):
        """The L{UpstreamUnreachable} for C{failure}: C{sent}, and saying the upstream closed the connection, where it
        came after the request went out (its connection lost before or while its answer came, C{ResponseFailed}: a
        server that fell over on it), else unreachable (refused, no route, no such host)."""
        if isinstance(failure, ResponseFailed):
            error = UpstreamUnreachable(
                f"The upstream provider '{self.name}' closed the connection before it answered.")
            error.sent = True
            return error
        return UpstreamUnreachable(f"The upstream provider '{self.name}' is unreachable.")

    def list_models(self) -> Deferred:
        """See L{IUpstream.list_models}."""
        return Deferred.fromCoroutine(self._list_models())

    async def _list_models(self, timeout=MODELS_LIST_TIMEOUT):
        response, body = await self._get(self.base_url + "/models", MODELS_LIST_LIMIT, "list its models", timeout)
        if response.code >= 400:
            raise upstream_error(response.code, body, self.name, self.hidden)
        try:
            data = jsonutil.loads(body)["data"]
            if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
                raise TypeError
        except (jsonutil.JSONError, KeyError, TypeError):
            raise BadUpstreamResponse(f"The model list of '{self.name}' is not an OpenAI model list.") from None
        return data

    def health(self) -> Deferred:
        """Ask the server whether it is up: its model list (an OpenAI-compatible API has no health route).

        @return: Deferred firing with None; failing with a L{gomodel.errors.GatewayError} (within
            L{HEALTH_LIST_TIMEOUT}).
        """
        return Deferred.fromCoroutine(self._list_models(HEALTH_LIST_TIMEOUT)).addCallback(lambda _: None)

    def scrape(self) -> Deferred:
        """The server's Prometheus metrics page: Deferred firing with its bytes, or None where it has none."""
        return succeed(None)

    async def _get(self, url, limit, what, timeout=MODELS_LIST_TIMEOUT):
        """C{GET url} for the gateway itself: C{(response, body)}, within C{limit} bytes and C{timeout}.

        @raise gomodel.errors.GatewayError: unreachable, too slow or too large.
        """
        lines = self._header_lines(b"gomodel-" + what.split()[-1].encode(), None, None)
        timeout = min(timeout, self._timeouts.response_header)
        try:
            response = await within(self._relay.request(b"GET", url.encode("ascii"), lines, None), timeout, self._clock)
            return response, await within(read_body(response, limit), timeout, self._clock)
        except CancelledError:
            raise
        except _STALE_CONNECTION as e:
            if was_cancelled(e):
                raise CancelledError() from None
            raise self._unreachable() from None
        except _TIMEOUTS:
            raise UpstreamTimeout(f"The upstream provider '{self.name}' did not {what} in time.") from None
        except BodyTooLarge:
            raise BadUpstreamResponse(f"The answer of '{self.name}' to {what} is too large.") from None
        except Exception:
            raise self._unreachable() from None


def _strip_v1(path: str) -> str:
    path = path.lstrip("/")
    if path == "v1":
        return ""
    if path.startswith("v1/"):
        return path[3:]
    return path
