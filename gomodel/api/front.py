"""The front resource: what every request goes through before its route.

It names the request (X-Request-Id), refuses bodies over the limit (413) and
missing or wrong gateway keys (401), logs one structured line per request,
then hands the request to the routes.
"""

import hmac

from twisted.web.resource import Resource

from gomodel import errors
from gomodel.api.site import access_log, request_id_for

OPEN_PATHS = frozenset((b"/health",))


class FrontResource(Resource):
    isLeaf = True

    def __init__(self, routes, clock, master_key=None, body_limit=None):
        super().__init__()
        self._routes = routes
        self._clock = clock
        self._master_key = master_key.encode("utf-8") if master_key else None
        self._body_limit = body_limit

    def render(self, request):
        request.request_id = request_id_for(request)
        request.setHeader(b"server", b"gomodel")
        request.setHeader(b"x-request-id", request.request_id)
        request.notifyFinish().addBoth(self._log, request, self._clock.seconds())
        if getattr(request, "too_large", False):
            return errors.render(request, errors.RequestTooLarge(
                f"The request body is larger than the gateway's limit of {self._body_limit} bytes "
                "(BODY_SIZE_LIMIT)."))
        if self._master_key is not None and request.path not in OPEN_PATHS:
            failure = self._authentication_failure(request)
            if failure is not None:
                return errors.render(request, failure)
        return self._routes.render(request)

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
