"""The routes every deployment polls, served by the front without Klein: the health checks and the model list,
and the two admin calls a fleet makes of every gateway.

C{GET}/C{HEAD} of C{/health}, C{/health/ready}, C{/v1/models} and
C{/v1/models/<id>}. Load balancers, orchestrators and clients ask for them
from the first second; served here, they never load Klein, which a gateway
then imports only for its other routes (L{gomodel.api.app.GatewayApp}, whose
routes for these paths call the same handlers, and answer the paths' other
spellings: a trailing slash, another method).

With the admin API on, C{GET}/C{HEAD /admin/api/v1/providers/status} (a fleet's readiness check) and
C{POST /admin/api/v1/auth-keys} (its provisioning of a key), spelled so and without a query, are served
here too, by the admin API's own handlers (L{gomodel.api.status}, L{gomodel.api.keys}): Klein and werkzeug's
routing, about 1.5 MiB of the process, are loaded only by the admin API's other routes.
"""

from functools import partial

from gomodel import errors, jsonutil
from gomodel.api.inference import admitted, qualified, resolve_model, shown_targets, unambiguous
from gomodel.api.messages import anthropic_model, anthropic_models_page, wants_anthropic
from gomodel.api.status import providers_status
from gomodel.http import render
from gomodel.http.bodies import json_answer

_HEALTH = jsonutil.dumps({"status": "ok"})
_MODEL_PREFIX = b"/v1/models/"
_ADMIN = b"/admin/api/v1/"


class PlainRoutes:
    """The handlers of the health checks and the model list, over the model registry."""

    readiness = None  # a gomodel.lifecycle.Readiness, set by the composition root

    def __init__(self, registry):
        self._registry = registry
        self._exact = {b"/health": self.health, b"/health/ready": self.ready, b"/v1/models": self.list_models}
        self._admin = {}  # (method, path) -> handler: none while the admin API is off (Klein's 404)
        self._make_keys = self._keys = None

    def serve_admin(self, clock, make_keys):
        """Serve the admin API's providers' status and a key's creation (see the module).

        @param make_keys: returns the L{gomodel.api.keys.Keys} (imported and made at the first creation).
        """
        status = partial(providers_status, self._registry, clock)
        self._admin = {(b"GET", _ADMIN + b"providers/status"): status, (b"HEAD", _ADMIN + b"providers/status"): status,
                       (b"POST", _ADMIN + b"auth-keys"): self.create_key}
        self._make_keys = make_keys

    def find(self, request):
        """The handler of C{request} (a function of it returning the body, or a coroutine of the body: a key's
        creation), or None when it is not one of these routes, spelled as here."""
        path = request.path
        if path.startswith(_ADMIN):  # (Klein's routing decides any query: the admin routes refuse a repeated one)
            return self._admin.get((request.method, path)) if b"?" not in request.uri else None
        if request.method not in (b"GET", b"HEAD"):
            return None
        handler = self._exact.get(path)
        if handler is not None:
            return handler
        if path.startswith(_MODEL_PREFIX):
            model_id = path[len(_MODEL_PREFIX):]
            # Klein's routing decides anything unusual (escapes, empty segments, bytes that are not UTF-8).
            if model_id and not model_id.endswith(b"/") and b"%" not in model_id and b"//" not in model_id:
                try:
                    model_id = model_id.decode("utf-8")
                except UnicodeDecodeError:
                    return None
                return lambda request: self.retrieve_model(request, model_id)
        return None

    def create_key(self, request):
        """The admin API's C{POST /admin/api/v1/auth-keys}: a coroutine firing with the answer's body."""
        if self._keys is None:
            self._keys = self._make_keys()
        return self._keys.create(request)

    def health(self, request) -> bytes:
        return json_answer(request, _HEALTH)

    def ready(self, request) -> bytes:
        """200 when the gateway should get traffic (C{degraded}, naming what is down, when the database or
        Redis is); 503 with the reasons while it should not."""
        reasons = self.readiness.reasons() if self.readiness is not None else []
        down = self.readiness.down() if self.readiness is not None else {}
        if reasons:
            request.setResponseCode(503)
            body = {"status": "not_ready", "reasons": reasons}
            return json_answer(request, dict(body, down=down) if down else body)
        return json_answer(request, {"status": "degraded", "down": down} if down else {"status": "ready"})

    def list_models(self, request) -> bytes:
        """OpenAI's model list (Anthropic's, paged, for a client that sends C{anthropic-version});
        a key limited to some models sees only those."""
        principal = request.context.principal
        models = None
        if principal is not None and principal.models is not None:
            models = [_shown(self._registry, principal, model) for model in self._registry.models()
                      if _may_use(self._registry, principal, model)]
        if wants_anthropic(request):
            request.context.dialect = render.ANTHROPIC
            return json_answer(request, anthropic_models_page(request, models if models is not None
                                                              else self._registry.models()))
        if models is None:
            return json_answer(request, self._registry.models_body())
        return json_answer(request, {"object": "list", "data": models})

    def retrieve_model(self, request, model_id: str) -> bytes:
        """One model, by its listed id or by what a request's C{model} may name (a bare id: the model it
        resolves to); L{errors.ModelNotFound} for one that is not listed, or that the key may not use."""
        anthropic = wants_anthropic(request)
        if anthropic:
            request.context.dialect = render.ANTHROPIC
        principal = request.context.principal
        try:
            model = self._registry.model(model_id)
        except errors.AmbiguousModel as ambiguous:  # served by several providers: the one the key may use, if one
            try:
                model = self._registry.model(qualified(unambiguous(self._registry, ambiguous, principal)))
            except errors.ModelAccessDenied:
                raise errors.ModelNotFound(model_id) from None
        else:
            if model is not None and not admitted(self._registry, model_id, principal):
                model = None  # a model the key may not use is not named to it
            elif model is not None and principal is not None and not _may_use(self._registry, principal, model):
                # admitted elsewhere: a provider type's model at the instance the key may use
                model = self._registry.model(qualified(resolve_model(self._registry, {"model": model_id}, principal)))
            elif model is not None:
                model = _shown(self._registry, principal, model)
        if model is None:
            raise errors.ModelNotFound(model_id)
        return json_answer(request, anthropic_model(model) if anthropic else model)


def _shown(registry, principal, model) -> dict:
    """C{model} (one it may use) as C{principal} is shown it: a virtual model with only the targets it may use
    (L{shown_targets}): a key is never told of providers it may not use."""
    targets = model.get("targets")
    if model.get("owned_by") != "gomodel" or not isinstance(targets, list):  # (a provider's: its upstream's fields)
        return model
    shown = shown_targets(registry, model["id"], [target["model"] for target in targets], principal)
    if shown is None:
        return model
    return dict(model, targets=[target for target in targets if target["model"] in shown])


def _may_use(registry, principal, model) -> bool:
    """Whether C{principal} may use a listed model as a request naming its id may (L{admitted}): a provider's
    by its qualified id or its id at its provider; a virtual model by its name, or through a target it may use."""
    model_id = model["id"]
    provider = model.get("owned_by")
    if provider and model_id.startswith(provider + "/"):
        return principal.allows(model_id) or principal.names(model_id[len(provider) + 1:])
    return admitted(registry, model_id, principal)
