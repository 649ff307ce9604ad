"""The gateway's Klein routes: everything but the inference routes (see L{gomodel.api.inference}) and the
front's plain routes (L{gomodel.api.plain}).

Every collaborator is built by the composition root (L{gomodel.build}) and
handed in; nothing is wired here. The composition root builds this app, and
imports Klein, at the first request that needs it.
"""

from klein import Klein
from twisted.logger import Logger

from gomodel import errors
from gomodel.api.passthrough import PASSTHROUGH_METHODS
from gomodel.dashboard import PAGES
from gomodel.errors import InvalidRequest
from gomodel.http.bodies import mounted, single_values
from gomodel.http.render import install as install_error_handlers


class GatewayApp:
    """All routes of the gateway, over an injected registry, clock and config."""

    app = Klein()
    app.url_map.strict_slashes = False  # /v1/models/ is /v1/models, not a redirect
    app.url_map.merge_slashes = False  # /p/ endpoints are checked and normalised by us
    log = Logger()

    def __init__(self, plain, responses, passthrough, *, files=None, batches=None, admin=None, dashboard=None,
                 message_batches=None, self_usage=None):
        """
        @param plain: the L{gomodel.api.plain.PlainRoutes} (health checks and the model list).
        @param responses: the L{gomodel.api.responses.ResponsesRoute} (its lifecycle routes).
        @param passthrough: the L{gomodel.api.passthrough.Passthrough}.
        @param files: an object with a Klein C{.app} serving C{/v1/files*}, or None.
        @param batches: the same for C{/v1/batches*}.
        @param message_batches: the same for C{/v1/messages/batches*} (Anthropic's Message Batches).
        @param admin: the same for C{/admin/api/v1/*}.
        @param dashboard: the L{gomodel.dashboard.Dashboard} (C{/admin/dashboard}, C{/admin/static/*}), or None.
        @param self_usage: the L{gomodel.api.self_usage.SelfUsage} (C{GET /v1/usage}), or None.
        """
        self._self_usage = self_usage
        self._dashboard = dashboard
        self._plain = plain
        self._responses = responses
        self._passthrough = passthrough
        self.files = files
        self._batches = batches
        self._message_batches = message_batches
        self._admin = admin
        self.resource = self.app.resource()

    # -- routes ----------------------------------------------------------------

    # The front serves these itself (L{gomodel.api.plain}); here are their other spellings.

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request):
        return self._plain.health(request)

    @app.route("/health/ready", methods=["GET", "HEAD"])
    def ready(self, request):
        return self._plain.ready(request)

    @app.route("/v1/models", methods=["GET"])
    def list_models(self, request):
        return self._plain.list_models(request)

    @app.route("/v1/models/<path:model_id>", methods=["GET"])
    def retrieve_model(self, request, model_id):
        return self._plain.retrieve_model(request, model_id)

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

    @app.route("/v1/usage", methods=["GET"])
    async def self_usage(self, request):
        """The caller's own usage, budgets and rate limits (L{gomodel.api.self_usage})."""
        if self._self_usage is None:
            raise errors.NotFound(f"Unknown route: GET {request.path.decode()}.")
        single_values(request)
        return await self._self_usage.answer(request)

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
        return mounted(self.files, request)

    @app.route("/v1/batches", branch=True, strict_slashes=False)
    def batches(self, request):
        return mounted(self._batches, request)

    @app.route("/v1/messages/batches", branch=True, strict_slashes=False)
    def message_batches(self, request):
        return mounted(self._message_batches, request)

    @app.route("/admin/api/v1", branch=True, strict_slashes=False)
    def admin(self, request):
        if self._admin is not None:  # (no route takes a list; off, any query is the 404's)
            single_values(request)
        return mounted(self._admin, request)

    # -- the admin dashboard (a page over the admin API; no data without the master key) --

    @app.route("/admin/dashboard", methods=["GET"])
    def dashboard(self, request):
        return self._dashboard_or_404(request).shell(request)

    @app.route("/admin/dashboard/<page>", methods=["GET"])
    def dashboard_page(self, request, page):
        """The same page at one of its pages' paths (GoModel's C{/admin/dashboard/usage}): the app opens that one;
        with a trailing slash, a redirect to it."""
        dashboard = self._dashboard_or_404(request)
        if page not in PAGES:
            raise errors.NotFound(f"No dashboard page '{errors.shown(page)}' (its pages: {', '.join(PAGES)}).")
        if request.path.endswith(b"/"):
            return dashboard.to_page(request, page)
        return dashboard.shell(request)

    @app.route("/admin/static/<path:name>", methods=["GET"])
    def dashboard_asset(self, request, name):
        return self._dashboard_or_404(request).asset(request, name)

    def _dashboard_or_404(self, request):
        if self._dashboard is None:
            raise errors.NotFound(f"Unknown route: {request.method.decode()} {request.path.decode()} "
                                  "(the dashboard is off: ADMIN_UI_ENABLED=false or ADMIN_ENDPOINTS_ENABLED=false).")
        return self._dashboard

    install_error_handlers(app)

