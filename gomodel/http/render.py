"""The one place a failure becomes an HTTP answer, in the route's error dialect.

Every route (the front's exact paths and Klein's) ends its failures in
L{fail}. The rule there: once a response has started (its head or a byte of
its body written), an error never becomes an envelope appended to the body;
the connection is aborted instead, so the client sees an incomplete answer,
never one that looks finished (Synapse's rule).

A dialect is the shape of the errors a family of clients expects: OpenAI's
C{{"error": {"message", "type", "param", "code"}}} on the OpenAI routes,
Anthropic's C{{"type": "error", "error": {"type", "message"}}} on
C{/v1/messages}.
"""

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from gomodel import errors, jsonutil

log = Logger(namespace="gomodel.http")


class OpenAIDialect:
    """OpenAI's error envelope (and an upstream's own OpenAI-shaped body as it came)."""

    name = "openai"

    def body(self, error: errors.GatewayError) -> bytes:
        return error.body()

    def stream_event(self, error: errors.GatewayError, observer=None) -> bytes:
        """An in-band error event for a stream that already started (C{observer}: the stream's, or None)."""
        return b"data: " + error.body() + b"\n\n"


class ResponsesDialect(OpenAIDialect):
    """OpenAI's errors; a Responses stream's in-band error is its typed C{error} event (OpenAI's
    C{ResponseErrorEvent}), numbered after the last event the stream sent where its observer knows it
    (C{next_sequence()}; left out where it does not)."""

    def stream_event(self, error: errors.GatewayError, observer=None) -> bytes:
        event = {"type": "error", "code": error.code, "message": error.message, "param": error.param}
        number = getattr(observer, "next_sequence", None)
        number = number() if number is not None else None
        if number is not None:
            event["sequence_number"] = number
        return b"event: error\ndata: " + jsonutil.dumps(event) + b"\n\n"


# Anthropic's error type for each status the gateway answers with itself.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                    409: "conflict_error", 413: "request_too_large",
                    429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


class AnthropicDialect:
    """Anthropic's error shape; an upstream's own error body is relayed as the provider sent it."""

    name = "anthropic"

    def body(self, error: errors.GatewayError) -> bytes:
        if isinstance(error, errors.UpstreamError):
            return error.body()
        return jsonutil.dumps({"type": "error", "error": {"type": self.error_type(error.status),
                                                          "message": error.message}})

    @staticmethod
    def error_type(status: int) -> str:
        return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")

    def stream_event(self, error: errors.GatewayError, observer=None) -> bytes:
        payload = jsonutil.dumps({"type": "error", "error": {"type": self.error_type(error.status),
                                                             "message": error.message}})
        return b"event: error\ndata: " + payload + b"\n\n"


OPENAI = OpenAIDialect()
RESPONSES = ResponsesDialect()
ANTHROPIC = AnthropicDialect()


def render(request, error: errors.GatewayError, dialect=OPENAI) -> bytes:
    """Set status and headers of C{request} for C{error}; return the body to write."""
    body = dialect.body(error)
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    for name, value in error.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("latin-1"))
    ctx = getattr(request, "context", None)
    if ctx is not None:
        ctx.error = error.code
    return b"" if request.method == b"HEAD" else body  # a HEAD answer has the headers only


def fail(request, failure):
    """The funnel: the body to write for C{failure}, or None when nothing may be written.

    A cancellation (the client left) writes nothing. A failure after the
    response started aborts the connection. A L{errors.GatewayError} is
    rendered in the request's dialect; anything else is logged and becomes
    a 500 C{internal_error}.
    """
    if failure.check(CancelledError):
        return None
    if getattr(request, "startedWriting", False):
        _abort(request, failure)
        return None
    if failure.check(errors.GatewayError):
        error = failure.value
    else:
        log.failure("unexpected error handling {path}", failure, path=request.path.decode("utf-8", "replace"))
        error = errors.InternalError()
    return render(request, error, dialect_of(request))


def dialect_of(request):
    """The error dialect of C{request}'s route (its context's; OpenAI's without one)."""
    ctx = getattr(request, "context", None)
    return ctx.dialect if ctx is not None and ctx.dialect is not None else OPENAI


def _abort(request, failure):
    ctx = getattr(request, "context", None)
    code = getattr(failure.value, "code", None) or "internal_error"
    if ctx is not None:
        ctx.broken(code)
    if not failure.check(errors.GatewayError):
        log.failure("error after the response to {path} started; connection aborted", failure,
                    path=request.path.decode("utf-8", "replace"))
    else:
        log.warn("error after the response to {path} started ({code}); connection aborted",
                 path=request.path.decode("utf-8", "replace"), code=code)
    if request.channel is not None:
        request.channel.transport.abortConnection()


# -- Klein ------------------------------------------------------------------------


def install(app):
    """Route every failure of a Klein C{app}'s handlers (class-based or not) through L{fail}."""
    from werkzeug.exceptions import HTTPException  # with Klein, which needs it anyway

    app.handle_errors(HTTPException)(_http_exception)
    app.handle_errors(Exception)(_failed)


def _args(args):
    # Class-based Klein apps pass the instance first.
    return args[-2], args[-1]


def _failed(*args):
    request, failure = _args(args)
    return fail(request, failure)


def _http_exception(*args):
    """Werkzeug's routing answers (404, 405; a redirect is a 404) as gateway errors."""
    from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
    from werkzeug.routing import RequestRedirect

    request, failure = _args(args)
    exc = failure.value
    method = request.method.decode("ascii", "replace")
    path = request.path.decode("utf-8", "replace")
    if isinstance(exc, WerkzeugMethodNotAllowed):
        allowed = ", ".join(sorted(exc.valid_methods or ()))
        error = errors.MethodNotAllowed(f"Method {method} is not allowed on {path} (allowed: {allowed}).",
                                        headers={"Allow": allowed})
    elif exc.code == 404 or isinstance(exc, RequestRedirect):
        # A redirect (a doubled slash, were a map to merge them) names an absolute URL werkzeug built from
        # the client's Host: never sent; the path as asked for is not a route.
        error = errors.NotFound(f"Unknown route: {method} {path}.")
    else:
        error = errors.InvalidRequest(exc.description or "Bad request.", status=exc.code)
    return render(request, error, dialect_of(request))
