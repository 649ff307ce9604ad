"""Authenticating a request from its headers, before any of its body is read."""

import hmac

from gomodel.errors import AuthenticationFailed

# Paths that need no key: liveness and readiness checks.
OPEN_PATHS = frozenset((b"/health", b"/health/ready"))

MASTER = "master"


class MasterKeyAuth:
    """The gateway key (C{GOMODEL_MASTER_KEY}), sent as C{Authorization: Bearer} or C{x-api-key}.

    Called by the site when a request's head is in (see
    L{gomodel.http.site.GatewayRequest}).
    """

    def __init__(self, master_key, open_paths=()):
        """
        @param open_paths: paths besides L{OPEN_PATHS} that need no key (e.g. C{/metrics}
            when C{METRICS_REQUIRE_KEY=false}).
        """
        self._master_key = master_key.encode("utf-8") if master_key else None
        self._open = OPEN_PATHS | frozenset(p.encode("ascii") for p in open_paths)

    def __call__(self, request, path: bytes):
        """The identity of C{request}'s sender: L{MASTER}, or None on an open gateway.

        @raise AuthenticationFailed: the key is missing or wrong.
        """
        if self._master_key is None:
            return None
        if path in self._open:
            return None
        token = presented_key(request)
        if not hmac.compare_digest(token, self._master_key):
            raise AuthenticationFailed("Invalid API key.")
        return MASTER


def presented_key(request) -> bytes:
    """The key a client sent, as bytes: C{Authorization: Bearer <key>}, or
    Anthropic's C{x-api-key: <key>} when no Authorization header is sent.

    @raise AuthenticationFailed: none was sent, or the header is malformed.
    """
    header = request.getHeader(b"authorization")
    if not header:
        key = (request.getHeader(b"x-api-key") or b"").strip()
        if key:
            return key
        raise AuthenticationFailed("Missing API key: send the gateway key as 'Authorization: Bearer <key>' "
                                   "or 'x-api-key: <key>'.")
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        raise AuthenticationFailed("Invalid authorization header: expected 'Authorization: Bearer <key>'.")
    return token.strip()
