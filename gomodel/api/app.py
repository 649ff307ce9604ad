"""The gateway's routes (Klein) and the one place errors are rendered."""

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from werkzeug.exceptions import HTTPException, MethodNotAllowed as WerkzeugMethodNotAllowed

from gomodel import errors, jsonutil
from gomodel.api.front import FrontResource
from gomodel.api.proxy import Forwarder
from gomodel.errors import GatewayError, InvalidRequest
from gomodel.streaming.sse import ChatStreamObserver

_HEALTH = jsonutil.dumps({"status": "ok"})


class GatewayApp:
    """All routes of the gateway, over an injected registry, clock and config."""

    app = Klein()
    log = Logger()

    def __init__(self, config, registry, clock):
        self._config = config
        self._registry = registry
        self._clock = clock
        self._forwarder = Forwarder(clock, config.timeouts)

    def resource(self):
        """The root resource to serve: the front checks, then the routes."""
        return FrontResource(self.app.resource(), self._clock, self._config.master_key,
                             self._config.body_size_limit)

    # -- routes ----------------------------------------------------------------

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request):
        return _json(request, _HEALTH)

    @app.route("/v1/models", methods=["GET"])
    def list_models(self, request):
        return _json(request, self._registry.models_body())

    @app.route("/v1/models/<path:model_id>", methods=["GET"])
    def retrieve_model(self, request, model_id):
        model = self._registry.model(model_id)
        if model is None:
            raise errors.ModelNotFound(model_id)
        return _json(request, jsonutil.dumps(model))

    @app.route("/v1/chat/completions", methods=["POST"])
    async def chat_completions(self, request):
        body = _json_body(request)
        route = self._route(request, body)
        strip_usage = False
        observer = None
        if body.get("stream") is True:
            options = body.get("stream_options")
            if options is None or isinstance(options, dict):
                options = dict(options or {})
                if options.get("include_usage") is not True:
                    # We always want usage; the client gets it only if it asked.
                    options["include_usage"] = True
                    strip_usage = True
                body["stream_options"] = options
            observer = ChatStreamObserver(strip_usage)
        return await self._forwarder.forward(request, route.provider, "/chat/completions",
                                             jsonutil.dumps(body), observer)

    def _route(self, request, body):
        """Resolve C{body["model"]} and rewrite it to the upstream's id."""
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise InvalidRequest("The request needs a 'model' (e.g. 'vllm/meta-llama/Llama-3.1-8B-Instruct').",
                                 param="model", code="missing_required_parameter")
        route = self._registry.resolve(model)
        request.provider_name = route.provider.name
        request.model = model
        body["model"] = route.upstream_model
        return route

    # -- errors ----------------------------------------------------------------

    @app.handle_errors(GatewayError)
    def gateway_error(self, request, failure):
        return errors.render(request, failure.value)

    @app.handle_errors(HTTPException)
    def http_exception(self, request, failure):
        exc = failure.value
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        if isinstance(exc, WerkzeugMethodNotAllowed):
            allowed = ", ".join(sorted(exc.valid_methods or ()))
            error = errors.MethodNotAllowed(f"Method {method} is not allowed on {path} (allowed: {allowed}).",
                                            headers={"Allow": allowed})
        elif exc.code == 404:
            error = errors.NotFound(f"Unknown route: {method} {path}.")
        else:
            error = InvalidRequest(exc.description or "Bad request.", status=exc.code)
        return errors.render(request, error)

    @app.handle_errors(Exception)
    def unexpected(self, request, failure):
        if failure.check(CancelledError):
            return None
        self.log.failure("unexpected error handling {path}", failure, path=request.path.decode("utf-8", "replace"))
        return errors.render(request, errors.InternalError())


def _json(request, body: bytes) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def _json_body(request) -> dict:
    """The request's JSON object body; L{InvalidRequest} for anything else."""
    request.content.seek(0)
    data = request.content.read()
    if not data.strip():
        raise InvalidRequest("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        body = jsonutil.loads(data)
    except jsonutil.JSONError as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body
