"""Which headers cross the gateway, in either direction."""

from gomodel.limits.limiter import RATE_LIMIT_HEADERS

# RFC 9110 7.6.1 connection-specific headers, plus the old proxy ones.
HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
))

# Never copied from an upstream answer: Date/Server and the request id are
# ours, cookies stay upstream. Content-Length only where the bytes pass unchanged.
_NOT_FROM_UPSTREAM = HOP_BY_HOP | {b"server", b"date", b"set-cookie", b"x-request-id"}


def connection_tokens(headers) -> set:
    tokens = set()
    for value in headers.getRawHeaders(b"connection", []):
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def copy_response_headers(upstream_response, request, keep_length=False):
    """Copy the upstream's status and end-to-end headers onto C{request}.

    @param keep_length: keep the upstream's Content-Length (the body will be
        relayed unchanged); otherwise our own framing applies.
    """
    request.setResponseCode(upstream_response.code)
    headers = upstream_response.headers
    named = connection_tokens(headers)
    target = request.responseHeaders
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        # A limited key's own x-ratelimit-* headers, set before the upstream answered, are never replaced
        # by an OpenAI-compatible provider's: those describe the gateway's account with it, shared by every
        # tenant (they pass where the gateway set none: the master key, a key without limits).
        if (lower in _NOT_FROM_UPSTREAM or lower in named or (lower == b"content-length" and not keep_length)
                or (lower in RATE_LIMIT_HEADERS and target.hasHeader(lower))):
            continue
        target.setRawHeaders(name, values)


def is_event_stream(upstream_response) -> bool:
    """Whether the upstream answered with server-sent events."""
    value = upstream_response.headers.getRawHeaders(b"content-type", [b""])[0]
    return value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
