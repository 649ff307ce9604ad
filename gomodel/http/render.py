"""Klein error handlers: every failure of a route becomes the OpenAI envelope (via L{gomodel.errors.render})."""

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from werkzeug.exceptions import HTTPException, MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.routing import RequestRedirect

from gomodel import errors

log = Logger(namespace="gomodel.api")


def install(app):
    """Register the gateway's error handlers on a Klein C{app} (class-based or not)."""
    app.handle_errors(errors.GatewayError)(_gateway_error)
    app.handle_errors(HTTPException)(_http_exception)
    app.handle_errors(Exception)(_unexpected)


def _args(args):
    # Class-based Klein apps pass the instance first.
    return args[-2], args[-1]


def _gateway_error(*args):
    request, failure = _args(args)
    return errors.render(request, failure.value)


def _http_exception(*args):
    request, failure = _args(args)
    exc = failure.value
    method = request.method.decode("ascii", "replace")
    path = request.path.decode("utf-8", "replace")
    if isinstance(exc, WerkzeugMethodNotAllowed):
        allowed = ", ".join(sorted(exc.valid_methods or ()))
        error = errors.MethodNotAllowed(f"Method {method} is not allowed on {path} (allowed: {allowed}).",
                                        headers={"Allow": allowed})
    elif isinstance(exc, RequestRedirect):
        error = errors.GatewayError(f"This route lives at {exc.new_url}.", status=exc.code,
                                    headers={"Location": exc.new_url})
    elif exc.code == 404:
        error = errors.NotFound(f"Unknown route: {method} {path}.")
    else:
        error = errors.InvalidRequest(exc.description or "Bad request.", status=exc.code)
    return errors.render(request, error)


def _unexpected(*args):
    request, failure = _args(args)
    if failure.check(CancelledError):
        return None
    log.failure("unexpected error handling {path}", failure, path=request.path.decode("utf-8", "replace"))
    return errors.render(request, errors.InternalError())
