"""The gateway's routes: Klein for everything but the inference routes (see L{gomodel.api.inference})."""

from klein import Klein
from twisted.logger import Logger

from gomodel import errors, jsonutil
from gomodel.api.errorhandlers import install as install_error_handlers
from gomodel.api.front import FrontResource
from gomodel.api.passthrough import PASSTHROUGH_METHODS, Passthrough
from gomodel.api.inference import InferenceRoutes
from gomodel.api.messages import json_answer
from gomodel.api.proxy import Forwarder
from gomodel.api.responses import ResponsesRoute
from gomodel.errors import InvalidRequest

_HEALTH = jsonutil.dumps({"status": "ok"})


class GatewayApp:
    """All routes of the gateway, over an injected registry, clock and config."""

    app = Klein()
    app.url_map.strict_slashes = False  # /v1/models/ is /v1/models, not a redirect
    app.url_map.merge_slashes = False  # /p/ endpoints are checked and normalised by us
    log = Logger()

    def __init__(self, config, registry, clock, *, files=None, batches=None, store=None):
        self._config = config
        self._registry = registry
        self._clock = clock
        self._files = files  # an object with a Klein .app serving /v1/files*
        self._batches = batches  # the same for /v1/batches*
        forwarder = Forwarder(clock, config.upstreams.timeouts)
        self._responses = ResponsesRoute(forwarder, clock, registry, store)
        self._inference = InferenceRoutes(registry, forwarder, self._responses)
        self._passthrough = Passthrough(config, registry, forwarder)

    def resource(self):
        """The root resource to serve: the front checks, the inference routes, then Klein's routes."""
        return FrontResource(self.app.resource(), self._clock, master_key=self._config.auth.master_key,
                             body_limit=self._config.limits.body_size_limit, access_log=self._config.metrics.access_log,
                             inference=self._inference.routes())

    # -- routes ----------------------------------------------------------------

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request):
        return json_answer(request, _HEALTH)

    @app.route("/v1/models", methods=["GET"])
    def list_models(self, request):
        return json_answer(request, self._registry.models_body())

    @app.route("/v1/models/<path:model_id>", methods=["GET"])
    def retrieve_model(self, request, model_id):
        model = self._registry.model(model_id)
        if model is None:
            raise errors.ModelNotFound(model_id)
        return json_answer(request, model)

    @app.route("/v1/responses/<response_id>", methods=["GET"])
    async def retrieve_response(self, request, response_id):
        return await self._responses.retrieve(request, response_id)

    @app.route("/v1/responses/<response_id>", methods=["DELETE"])
    async def delete_response(self, request, response_id):
        return await self._responses.delete(request, response_id)

    @app.route("/v1/responses/<response_id>/input_items", methods=["GET"])
    async def response_input_items(self, request, response_id):
        return await self._responses.input_items(request, response_id)

    @app.route("/v1/responses/<response_id>/cancel", methods=["POST"])
    async def cancel_response(self, request, response_id):
        return await self._responses.cancel(request, response_id)

    @app.route("/p/<provider_name>", methods=PASSTHROUGH_METHODS)
    def passthrough_without_endpoint(self, request, provider_name):
        raise InvalidRequest("A provider passthrough needs an endpoint: /p/{provider}/{endpoint}.",
                             code="missing_endpoint")

    @app.route("/p/<provider_name>/<path:rest>", methods=PASSTHROUGH_METHODS)
    async def passthrough(self, request, provider_name, rest):
        return await self._passthrough.relay(request, provider_name)

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
