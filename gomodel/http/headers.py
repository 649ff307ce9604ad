"""Which headers cross the gateway, in either direction, and the header set of the gateway's answers."""

from itertools import chain

from twisted.web.http_headers import Headers

from gomodel._twistedcompat import header_name, plain_headers
from gomodel.limits.limiter import RATE_LIMIT_HEADERS

# (looked up once: CPython 3.11 specializes no read of a type's attribute, some 400 instructions each)
_chain = chain.from_iterable

# RFC 9110 7.6.1 connection-specific headers, plus the old proxy ones.
HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
))

# Never copied from an upstream answer: Date/Server, the request id (Anthropic's name for it too) and the replica
# that answered are ours, cookies stay upstream, and so does the gateway's account with a provider (an OpenAI-compatible
# one's organization and project, Anthropic's organization: every tenant's) and vLLM's load report
# (C{endpoint-load-metrics}, the gateway's routing signal: every tenant's load), and what describes the upstream's
# host, not the gateway's (C{Alt-Svc}: its other protocols and ports; C{Strict-Transport-Security}: its TLS policy),
# and its CORS policy (the gateway has none: another site's page reads none of its answers). Content-Length only where
# the bytes pass unchanged.
_NOT_FROM_UPSTREAM = HOP_BY_HOP | {b"server", b"date", b"set-cookie", b"set-cookie2", b"x-request-id",
                                   b"request-id", b"x-gomodel-replica", b"openai-organization", b"openai-project",
                                   b"anthropic-organization-id", b"endpoint-load-metrics", b"alt-svc",
                                   b"strict-transport-security", b"access-control-allow-origin",
                                   b"access-control-allow-credentials", b"access-control-allow-methods",
                                   b"access-control-allow-headers", b"access-control-expose-headers",
                                   b"access-control-max-age", b"access-control-allow-private-network"}


class AnswerHeaders(Headers):
    """The headers of an answer (C{request.responseHeaders}), plus header lines the gateway formatted
    whole: a limited key's six C{x-ratelimit-*} headers
    (L{gomodel.limits.limiter.header_lines}), which the channel writes after the others.

    @ivar lines: those lines, C{b"Name: value\\r\\n"} each; empty for most answers.
    """

    __slots__ = ("lines",)

    def __init__(self):
        self._rawHeaders = {}  # (what Headers' __init__ does without a mapping: its frame saved, once a request)
        self.lines = b""

    def put(self, name: bytes, value: bytes):
        """Set the header C{name} (made with L{header_name}) to C{value}, a value the gateway made (no CR or
        LF), replacing what it held: C{setHeader} checks and re-encodes the name and the value, a
        measurable cost for the headers every answer carries."""
        plain_headers(self)[name] = [value]

    def has_line(self, name: bytes) -> bool:
        """Whether L{lines} hold the header C{name} (lower-case)."""
        return bool(self.lines) and name + b": " in self.lines.lower()


def request_header(request, name: bytes):
    """The last value of the request header C{name} (made with L{header_name}), or None: C{getHeader}
    without re-encoding the name on every request."""
    values = plain_headers(request.requestHeaders).get(name)
    return values[-1] if values else None


# Names of the headers the gateway reads on every request or upstream answer.
AUTHORIZATION = header_name("authorization")
X_API_KEY = header_name("x-api-key")
CONNECTION = header_name("connection")
EXPECT = header_name("expect")
HOST = header_name("host")
TRANSFER_ENCODING = header_name("transfer-encoding")
ENDPOINT_LOAD_METRICS = header_name("endpoint-load-metrics")
METADATA = header_name("metadata")  # vLLM's binary pooling answers: all but the vectors (their usage too)
RETRY_AFTER = header_name("retry-after")  # an upstream's failover status: its replica is left alone that long
# Names of the headers the gateway sets on its answers with AnswerHeaders.put (X-Request-Id is read too).
SERVER = header_name("server")
DATE = header_name("date")
X_REQUEST_ID = header_name("x-request-id")
REQUEST_ID = header_name("request-id")  # Anthropic's name for it, which the anthropic SDKs read
# An upstream's own X-Request-Id (OpenAI's C{req_...}) as a passthrough's client gets it: X-Request-Id is the gateway's.
X_UPSTREAM_REQUEST_ID = header_name("x-upstream-request-id")
X_GOMODEL_REPLICA = header_name("x-gomodel-replica")
X_REQUEST_PRIORITY = header_name("x-request-priority")
X_GOMODEL_USER_PATH = header_name("x-gomodel-user-path")
CONTENT_TYPE = header_name("content-type")
# The content type of an event stream the gateway makes itself (a whole answer to a stream request, made events).
EVENT_STREAM = b"text/event-stream; charset=utf-8"
CONTENT_LENGTH = header_name("content-length")
# What a relayed event stream's answer says to caches and to a proxy in front of the gateway (nginx's buffering).
CACHE_CONTROL = header_name("cache-control")
X_ACCEL_BUFFERING = header_name("x-accel-buffering")


class ProtocolHeaders(dict):
    """Request headers for an upstream (name -> list of values, as L{gomodel.interfaces.IUpstream.send} takes
    them) that are a protocol's, whose values are few and repeat (C{anthropic-version}), never a credential nor
    one of the headers the gateway sets itself: an upstream may keep the lines it makes of each distinct name
    and value (L{gomodel.upstream.openai_compatible}), which a client's other headers are not kept in."""

    __slots__ = ()


def connection_tokens(headers) -> set:
    tokens = set()
    for value in plain_headers(headers).get(CONNECTION, ()):
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def copy_response_headers(upstream_response, request, keep_length=False, hidden=None):
    """Copy the upstream's status and end-to-end headers onto C{request}.

    @param keep_length: keep the upstream's Content-Length (the body will be
        relayed unchanged); otherwise our own framing applies.
    @param hidden: a pattern (bytes) of what a header naming one of the upstream's addresses (a C{Location},
        C{Content-Location} or C{Link} to it, a proxy's C{Via}) or its key holds (its pool's C{hidden_pattern}),
        or None: such a header stays upstream, as the upstream's address never reaches a client.
    """
    request.setResponseCode(upstream_response.code)
    # (without its connection's headers, those its Connection names too: the client's parser set them apart)
    headers = upstream_response.headers
    target = request.responseHeaders
    kept = plain_headers(target)
    source = plain_headers(headers)
    # (one search of all the values for the usual answer, which names none; each header's only where one does)
    if hidden is not None and hidden.search(b"\n".join(_chain(source.values()))) is not None:
        source = _not_naming(source, hidden)
    for name, values in source.items():
        lower = name.lower()
        # A limited key's own x-ratelimit-* headers, set before the upstream answered, are never replaced
        # by an OpenAI-compatible provider's: those describe the gateway's account with it, shared by every
        # tenant (they pass where the gateway set none: the master key, a key without limits).
        if (lower in _NOT_FROM_UPSTREAM or (lower == b"content-length" and not keep_length)
                or (lower in RATE_LIMIT_HEADERS and (name in kept or _has_line(target, lower)))):
            continue
        # Names as Headers keeps them, values a parser let through (no CR or LF): copied as they are.
        kept[name] = list(values)
    # (the HTTP client keeps Content-Length out of the headers, among its connection's: it is the length; but a
    # HEAD's, the length of a GET's body, is among them, its body none, as copied above)
    if (keep_length and upstream_response.length.__class__ is int and upstream_response.code not in (204, 304)
            and request.method != b"HEAD"):
        kept[CONTENT_LENGTH] = [b"%d" % upstream_response.length]


def _not_naming(headers, hidden) -> dict:
    """C{headers} (name -> values) but those with a value that holds what the pattern C{hidden} matches."""
    kept = {}
    for name, values in headers.items():
        if not any(hidden.search(value) is not None for value in values):
            kept[name] = values
    return kept


def _has_line(headers, name) -> bool:
    return isinstance(headers, AnswerHeaders) and headers.has_line(name)


def cross_site(request) -> bool:
    """Whether a browser sent C{request} from a page of another site (a form, a no-cors fetch): its
    C{Sec-Fetch-Site} says neither C{same-origin} nor C{none} (typed or bookmarked), or, from a browser that sends
    none, its C{Origin} is not the gateway's (C{Host}, or a proxy's C{X-Forwarded-Host}). A client that is no
    browser sends neither."""
    fetch_site = request.getHeader(b"sec-fetch-site")
    if fetch_site is not None:
        return fetch_site.strip().lower() not in (b"same-origin", b"none")
    origin = request.getHeader(b"origin")
    if origin is None:
        return False
    netloc = origin.strip().lower().partition(b"://")[2]
    return not netloc or all(netloc != (host or b"").strip().lower()
                             for host in (request.getHeader(b"host"), request.getHeader(b"x-forwarded-host")))


def is_event_stream(headers) -> bool:
    """Whether an answer's C{headers} (an upstream's, or the one going to the client) say server-sent events."""
    return media_type(headers) == b"text/event-stream"


def media_type(headers) -> bytes:
    """The media type an answer's C{headers} give its body, lower-cased, without parameters (C{b""}: none)."""
    value = plain_headers(headers).get(CONTENT_TYPE, (b"",))[0]
    return value.split(b";", 1)[0].strip().lower()
