"""The gateway's Klein routes: everything but the inference routes (see L{gomodel.api.inference}).

Every collaborator is built by the composition root (L{gomodel.build}) and
handed in; nothing is wired here.
"""

from klein import Klein
from twisted.logger import Logger

from gomodel import errors, jsonutil
from gomodel.api.messages import anthropic_model, anthropic_models_page, wants_anthropic
from gomodel.api.passthrough import PASSTHROUGH_METHODS
from gomodel.http import render
from gomodel.errors import InvalidRequest
from gomodel.http.bodies import json_answer
from gomodel.http.render import install as install_error_handlers

_HEALTH = jsonutil.dumps({"status": "ok"})


class GatewayApp:
    """All routes of the gateway, over an injected registry, clock and config."""

    app = Klein()
    app.url_map.strict_slashes = False  # /v1/models/ is /v1/models, not a redirect
    app.url_map.merge_slashes = False  # /p/ endpoints are checked and normalised by us
    log = Logger()

    def __init__(self, registry, responses, passthrough, *, files=None, batches=None, admin=None, dashboard=None):
        """
        @param responses: the L{gomodel.api.responses.ResponsesRoute} (its lifecycle routes).
        @param passthrough: the L{gomodel.api.passthrough.Passthrough}.
        @param files: an object with a Klein C{.app} serving C{/v1/files*}, or None.
        @param batches: the same for C{/v1/batches*}.
        @param admin: the same for C{/admin/api/v1/*}.
        @param dashboard: the L{gomodel.dashboard.Dashboard} (C{/admin/dashboard}, C{/admin/static/*}), or None.
        """
        self._dashboard = dashboard
        self._registry = registry
        self._responses = responses
        self._passthrough = passthrough
        self._files = files
        self._batches = batches
        self._admin = admin

    # -- routes ----------------------------------------------------------------

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request):
        return json_answer(request, _HEALTH)

    readiness = None  # a gomodel.lifecycle.Readiness, set by the composition root

    @app.route("/health/ready", methods=["GET", "HEAD"])
    def ready(self, request):
        """200 when the gateway should get traffic (C{degraded}, naming what is down, when the database or
        Redis is); 503 with the reasons while it should not."""
        reasons = self.readiness.reasons() if self.readiness is not None else []
        down = self.readiness.down() if self.readiness is not None else {}
        if reasons:
            request.setResponseCode(503)
            body = {"status": "not_ready", "reasons": reasons}
            return json_answer(request, dict(body, down=down) if down else body)
        return json_answer(request, {"status": "degraded", "down": down} if down else {"status": "ready"})

    @app.route("/v1/models", methods=["GET"])
    def list_models(self, request):
        """OpenAI's model list (Anthropic's, paged, for a client that sends C{anthropic-version});
        a key limited to some models sees only those."""
        principal = request.context.principal
        models = None
        if principal is not None and principal.models is not None:
            models = [model for model in self._registry.models() if _may_use(principal, model)]
        if wants_anthropic(request):
            request.context.dialect = render.ANTHROPIC
            return json_answer(request, anthropic_models_page(request, models if models is not None
                                                              else self._registry.models()))
        if models is None:
            return json_answer(request, self._registry.models_body())
        return json_answer(request, {"object": "list", "data": models})

    @app.route("/v1/models/<path:model_id>", methods=["GET"])
    def retrieve_model(self, request, model_id):
        anthropic = wants_anthropic(request)
        if anthropic:
            request.context.dialect = render.ANTHROPIC
        model = self._registry.model(model_id)
        principal = request.context.principal
        if model is None or (principal is not None and not _may_use(principal, model)):
            raise errors.ModelNotFound(model_id)  # a model the key may not use is not named to it
        return json_answer(request, anthropic_model(model) if anthropic else model)

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
        return await self._passthrough.relay(request, request.context, provider_name)

    # -- mounted APIs ------------------------------------------------------------

    @app.route("/v1/files", branch=True, strict_slashes=False)
    def files(self, request):
        return self._mounted(self._files, request)

    @app.route("/v1/batches", branch=True, strict_slashes=False)
    def batches(self, request):
        return self._mounted(self._batches, request)

    @app.route("/admin/api/v1", branch=True, strict_slashes=False)
    def admin(self, request):
        return self._mounted(self._admin, request)

    # -- the admin dashboard (a page over the admin API; no data without the master key) --

    @app.route("/admin/dashboard", methods=["GET"])
    def dashboard(self, request):
        return self._dashboard_or_404(request).shell(request)

    @app.route("/admin/static/<path:name>", methods=["GET"])
    def dashboard_asset(self, request, name):
        return self._dashboard_or_404(request).asset(request, name)

    def _dashboard_or_404(self, request):
        if self._dashboard is None:
            raise errors.NotFound(f"Unknown route: {request.method.decode()} {request.path.decode()} "
                                  "(the dashboard is off: ADMIN_UI_ENABLED).")
        return self._dashboard

    def _mounted(self, api, request):
        if api is None:
            raise errors.NotFound(f"Unknown route: {request.method.decode()} {request.path.decode()}.")
        return api.app.resource()

    install_error_handlers(app)


def _may_use(principal, model) -> bool:
    """Whether C{principal} may use a listed model (by its qualified id, or its id at its provider)."""
    model_id = model["id"]
    provider = model.get("owned_by")
    if provider and model_id.startswith(provider + "/"):
        return principal.allows(model_id, model_id[len(provider) + 1:])
    return principal.allows(model_id)
