"""The front resource: what every request goes through before its route.

It names the request (X-Request-Id), refuses bodies over the limit (413) and
missing or wrong gateway keys (401), logs one structured line per request,
then serves the inference routes itself (by exact path, no per-request
routing machinery) and hands every other request to Klein.
"""

import hmac

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gomodel import errors
from gomodel.http.site import access_log, request_id_for
from gomodel.transports import send_now

OPEN_PATHS = frozenset((b"/health",))


class FrontResource(Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, routes, clock, *, master_key=None, body_limit=None, access_log=True, inference=None):
        """
        @param routes: the resource serving every route but the inference ones (Klein's).
        @param inference: exact path -> coroutine function of the request, for POSTs.
        """
        super().__init__()
        self._routes = routes
        self._clock = clock
        self._access_log = access_log
        self._inference = inference or {}
        self._master_key = master_key.encode("utf-8") if master_key else None
        self._body_limit = body_limit

    def render(self, request):
        request.request_id = request_id_for(request)
        request.setHeader(b"x-request-id", request.request_id)
        if self._access_log:
            request.notifyFinish().addBoth(self._log, request, self._clock.seconds())
        if getattr(request, "too_large", False):
            return errors.render(request, errors.RequestTooLarge(
                f"The request body is larger than the gateway's limit of {self._body_limit} bytes "
                "(BODY_SIZE_LIMIT)."))
        if self._master_key is not None and request.path not in OPEN_PATHS:
            failure = self._authentication_failure(request)
            if failure is not None:
                return errors.render(request, failure)
        handler = self._inference.get(request.path)
        if handler is None:
            return self._routes.render(request)
        if request.method != b"POST":
            return errors.render(request, errors.MethodNotAllowed(
                f"Method {request.method.decode('ascii', 'replace')} is not allowed on "
                f"{request.path.decode()} (allowed: POST).", headers={"Allow": "POST"}))
        return self._serve(request, handler)

    def _serve(self, request, handler):
        """Run C{handler} for C{request}: its result is written, its failure rendered; a client
        that leaves cancels it (which closes the upstream connection)."""
        d = Deferred.fromCoroutine(handler(request))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addCallbacks(_write, self._failed, callbackArgs=(request,), errbackArgs=(request,))
        return NOT_DONE_YET

    def _failed(self, failure, request):
        if failure.check(CancelledError):
            return None  # the client left; nothing to write
        if failure.check(errors.GatewayError):
            return _write(errors.render(request, failure.value), request)
        self.log.failure("unexpected error handling {path}", failure, path=request.path.decode("utf-8", "replace"))
        return _write(errors.render(request, errors.InternalError()), request)

    def _authentication_failure(self, request):
        header = request.getHeader(b"authorization")
        if not header:
            return errors.AuthenticationFailed(
                "Missing API key: send the gateway key as 'Authorization: Bearer <key>'.")
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return errors.AuthenticationFailed(
                "Invalid authorization header: expected 'Authorization: Bearer <key>'.")
        if not hmac.compare_digest(token.strip(), self._master_key):
            return errors.AuthenticationFailed("Invalid API key.")
        return None

    def _log(self, result, request, started):
        # notifyFinish fails when the connection was lost first: logged as 499,
        # nginx's "client closed request", whatever status had been set.
        client_gone = result is not None
        usage = getattr(request, "usage", None) or {}
        access_log.info(
            "{method} {path} {status} {duration_ms:.1f}ms request_id={request_id} "
            "provider={provider} model={model}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
            status=499 if client_gone else request.code,
            duration_ms=(self._clock.seconds() - started) * 1000,
            request_id=request.request_id.decode("ascii"),
            provider=request.provider_name or "-",
            model=request.model or "-",
            prompt_tokens=usage.get("prompt_tokens", usage.get("input_tokens")),
            completion_tokens=usage.get("completion_tokens", usage.get("output_tokens")),
            client_gone=client_gone,
        )
        return None


def _write(body, request):
    """Finish C{request} with C{body} (None once a stream has written it), unless it ended already.

    The answer is sent at once, not on the reactor's next turn.
    """
    if request.channel is None or request.finished:
        return None
    if body is not None:
        request.write(body)
    transport = request.transport
    request.finish()
    send_now(transport)
    return None
