"""The gateway's routes (Klein)."""

from klein import Klein
from twisted.logger import Logger

from gomodel import errors, jsonutil
from gomodel.api.errorhandlers import install as install_error_handlers
from gomodel.api.front import FrontResource
from gomodel.api.passthrough import PASSTHROUGH_METHODS, Passthrough
from gomodel.api.proxy import Forwarder
from gomodel.api.responses import ResponsesRoute
from gomodel.errors import InvalidRequest
from gomodel.streaming.sse import ChatStreamObserver

_HEALTH = jsonutil.dumps({"status": "ok"})


class GatewayApp:
    """All routes of the gateway, over an injected registry, clock and config."""

    app = Klein()
    app.url_map.strict_slashes = False  # /v1/models/ is /v1/models, not a redirect
    app.url_map.merge_slashes = False  # /p/ endpoints are checked and normalised by us
    log = Logger()

    def __init__(self, config, registry, clock, *, files=None, batches=None):
        self._config = config
        self._registry = registry
        self._clock = clock
        self._files = files  # an object with a Klein .app serving /v1/files*
        self._batches = batches  # the same for /v1/batches*
        self._forwarder = Forwarder(clock, config.timeouts)
        self._responses = ResponsesRoute(self._forwarder, clock)
        self._passthrough = Passthrough(config, registry, self._forwarder)

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
        return await self._completions(request, "/chat/completions")

    @app.route("/v1/completions", methods=["POST"])
    async def completions(self, request):
        return await self._completions(request, "/completions")

    async def _completions(self, request, path):
        """Chat or legacy completions: streams get usage forced on upstream, stripped if unasked."""
        body = _json_body(request)
        route = self._route(request, body)
        observer = None
        if body.get("stream") is True:
            strip_usage = False
            options = body.get("stream_options")
            if options is None or isinstance(options, dict):
                options = dict(options or {})
                if options.get("include_usage") is not True:
                    # We always want usage; the client gets it only if it asked.
                    options["include_usage"] = True
                    strip_usage = True
                body["stream_options"] = options
            observer = ChatStreamObserver(strip_usage)
        return await self._forwarder.forward(request, route.provider, path, jsonutil.dumps(body), observer)

    @app.route("/v1/embeddings", methods=["POST"])
    async def embeddings(self, request):
        return await self._model_routed(request, "/embeddings")

    @app.route("/v1/rerank", methods=["POST"])
    async def rerank(self, request):
        return await self._model_routed(request, "/rerank")

    @app.route("/v1/score", methods=["POST"])
    async def score(self, request):
        return await self._model_routed(request, "/score")

    @app.route("/v1/classify", methods=["POST"])
    async def classify(self, request):
        # vLLM serves classify only at its root, not under /v1.
        return await self._model_routed(request, "classify", native=True)

    async def _model_routed(self, request, path, native=False):
        """A JSON POST routed by its C{model}, relayed as the upstream answers (streams included)."""
        body = _json_body(request)
        route = self._route(request, body)
        payload = jsonutil.dumps(body)
        if native:
            upstream = await route.provider.send_url("POST", route.provider.passthrough_url(path), payload,
                                                     request.request_id)
            return await self._forwarder.answer(request, route.provider, upstream)
        return await self._forwarder.forward(request, route.provider, path, payload)

    @app.route("/v1/responses", methods=["POST"])
    async def responses(self, request):
        return await self._responses.create(request, _json_body(request), self._route)

    @app.route("/p/<provider_name>", methods=PASSTHROUGH_METHODS)
    def passthrough_without_endpoint(self, request, provider_name):
        raise InvalidRequest("A provider passthrough needs an endpoint: /p/{provider}/{endpoint}.",
                             code="missing_endpoint")

    @app.route("/p/<provider_name>/<path:rest>", methods=PASSTHROUGH_METHODS)
    async def passthrough(self, request, provider_name, rest):
        return await self._passthrough.relay(request, provider_name)

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

    # -- mounted APIs ------------------------------------------------------------

    @app.route("/v1/files", branch=True, strict_slashes=False)
    def files(self, request):
        return self._mounted(self._files, request)

    @app.route("/v1/batches", branch=True, strict_slashes=False)
    def batches(self, request):
        return self._mounted(self._batches, request)

    def _mounted(self, api, request):
        if api is None:
            raise errors.NotFound(f"Unknown route: {request.method.decode()} {request.path.decode()}.")
        return api.app.resource()

    install_error_handlers(app)


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
