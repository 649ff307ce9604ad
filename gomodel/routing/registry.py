"""Which models each provider serves, kept fresh, and which provider a selector names.

Each provider's inventory is discovered from its C{GET /models} at start. A
provider that does not answer is retried with backoff (1 s doubling to 30 s)
until it does, then refreshed every C{models_refresh_interval}; a failed
refresh keeps the last known models. Configured model lists are a fallback
(used while discovery fails or finds nothing) or an allowlist (no discovery).
"""

from typing import NamedTuple, Optional

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from gomodel import jsonutil
from gomodel.errors import InvalidRequest, ModelNotFound
from gomodel.routing.selectors import parse_selector, qualified

BACKOFF_START = 1.0
BACKOFF_MAX = 30.0


class Route(NamedTuple):
    """Where one request goes."""

    provider: object  # an IProvider
    upstream_model: str


# Resolved selectors are remembered until an inventory changes; this many at most.
ROUTE_CACHE_SIZE = 1024


class Inventory:
    """What one provider is known to serve."""

    def __init__(self, provider, configured: tuple, created: int):
        self.provider = provider
        self.configured = configured
        self.models: Optional[dict] = None  # upstream id -> model object; None = not known yet
        self.source: Optional[str] = None  # "discovered" or "configured"
        self.last_error: Optional[str] = None
        self._created = created
        if configured:
            self.use_configured()

    def use_configured(self):
        self.models = {m: {"id": m, "object": "model", "created": self._created,
                           "owned_by": self.provider.name} for m in self.configured}
        self.source = "configured"

    def use_discovered(self, data: list):
        self.models = {m["id"]: m for m in data}
        self.source = "discovered"


class ModelRegistry(Service):
    """Model discovery and selector resolution for every configured provider."""

    log = Logger()

    def __init__(self, providers, clock, *, mode="fallback", refresh_interval=300.0):
        self._clock = clock
        self._mode = mode
        self._refresh_interval = refresh_interval
        created = int(clock.seconds())
        self._inventories = [Inventory(p, tuple(p.config.models), created) for p in providers]
        self._by_name = {inv.provider.name: inv for inv in self._inventories}
        self._calls = {}  # provider name -> IDelayedCall
        self._inflight = {}  # provider name -> Deferred
        self._backoff = {}
        self._models_body = None
        self._routes = {}  # selector -> Route, for the current inventories
        self._ready_waiters = []

    @property
    def providers(self):
        return [inv.provider for inv in self._inventories]

    def provider(self, name: str):
        """The provider instance called C{name}, else the first of type C{name}, else None."""
        inv = self._by_name.get(name)
        if inv is not None:
            return inv.provider
        for inv in self._inventories:
            if inv.provider.type == name:
                return inv.provider
        return None

    def ready(self):
        """A Deferred that fires (with None) once every provider's models are known."""
        d = Deferred()
        self._ready_waiters.append(d)
        self._check_ready()
        return d

    def _check_ready(self):
        if self._ready_waiters and all(inv.models is not None for inv in self._inventories):
            waiting, self._ready_waiters = self._ready_waiters, []
            for d in waiting:
                d.callback(None)

    # -- discovery ------------------------------------------------------------

    def startService(self):
        super().startService()
        for inv in self._inventories:
            if self._mode == "allowlist" and inv.configured:
                self.log.info("provider {provider}: serving its {count} configured models (allowlist mode)",
                              provider=inv.provider.name, count=len(inv.configured))
                continue
            self._schedule(inv, 0)

    def stopService(self):
        super().stopService()
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        for d in list(self._inflight.values()):
            d.cancel()
        self._inflight.clear()

    def _schedule(self, inv, delay):
        self._calls[inv.provider.name] = self._clock.callLater(delay, self._discover, inv)

    def _discover(self, inv):
        name = inv.provider.name
        d = self._inflight[name] = inv.provider.list_models()
        d.addCallbacks(self._discovered, self._failed, callbackArgs=(inv,), errbackArgs=(inv,))
        d.addBoth(self._settled, name)

    def _settled(self, _, name):
        self._inflight.pop(name, None)

    def _discovered(self, data, inv):
        name = inv.provider.name
        self._backoff.pop(name, None)
        inv.last_error = None
        if data:
            before = inv.models
            inv.use_discovered(data)
            if before is None or inv.source != "discovered" or set(before) != set(inv.models):
                self.log.info("provider {provider}: {count} models discovered", provider=name, count=len(data))
        elif inv.configured:
            inv.use_configured()
            self.log.warn("provider {provider} lists no models; using its {count} configured models",
                          provider=name, count=len(inv.configured))
        else:
            inv.models = {}
            inv.source = "discovered"
            self.log.warn("provider {provider} lists no models", provider=name)
        self._models_body = None
        self._routes = {}
        self._check_ready()
        self._schedule(inv, self._refresh_interval)

    def _failed(self, failure, inv):
        if failure.check(CancelledError):
            return None
        name = inv.provider.name
        delay = self._backoff.get(name, BACKOFF_START / 2) * 2
        delay = min(delay, BACKOFF_MAX)
        self._backoff[name] = delay
        message = getattr(failure.value, "message", None) or failure.getErrorMessage()
        inv.last_error = message
        kept = "keeping its last known models" if inv.models else "no models yet"
        self.log.warn("provider {provider}: model discovery failed ({error}); {kept}; retrying in {delay:.0f}s",
                      provider=name, error=message, kept=kept, delay=delay)
        self._schedule(inv, delay)
        return None

    # -- queries --------------------------------------------------------------

    def models(self) -> list:
        """Every known model, ids qualified with their provider, upstream fields kept."""
        out = []
        for inv in self._inventories:
            for upstream_id, model in (inv.models or {}).items():
                entry = dict(model)
                entry["id"] = qualified(inv.provider.name, upstream_id)
                entry["object"] = "model"
                entry["owned_by"] = inv.provider.name
                out.append(entry)
        return out

    def models_body(self) -> bytes:
        """The C{/v1/models} answer, serialised once per inventory change."""
        if self._models_body is None:
            self._models_body = jsonutil.dumps({"object": "list", "data": self.models()})
        return self._models_body

    def model(self, qualified_id: str) -> Optional[dict]:
        """One model object by its qualified id, or None."""
        for entry in self.models():
            if entry["id"] == qualified_id:
                return entry
        return None

    def resolve(self, selector: str) -> Route:
        """Name the provider and upstream model for C{selector}.

        The provider instance name first, then the provider type (its first
        instance serving the model); a provider whose models are not known yet
        gets the request. A prefix that names no provider means the whole
        selector is an upstream model id, looked up across all providers.

        @raise ModelNotFound: nobody serves it.
        @raise InvalidRequest: several providers serve the bare id.
        """
        route = self._routes.get(selector)
        if route is None:
            route = self._resolve(selector)
            if len(self._routes) >= ROUTE_CACHE_SIZE:
                self._routes = {}
            self._routes[selector] = route
        return route

    def _resolve(self, selector: str) -> Route:
        parsed = parse_selector(selector)
        if parsed.prefix is not None:
            named = self._by_name.get(parsed.prefix)
            candidates = ([named] if named is not None else []) + [
                inv for inv in self._inventories if inv.provider.type == parsed.prefix and inv is not named]
            for inv in candidates:
                if inv.models is not None and parsed.rest in inv.models:
                    return Route(inv.provider, parsed.rest)
            for inv in candidates:
                if inv.models is None:  # not discovered yet: let the upstream decide
                    return Route(inv.provider, parsed.rest)
            if candidates:
                raise ModelNotFound(selector)
        matches = [inv for inv in self._inventories if inv.models and selector in inv.models]
        if len(matches) == 1:
            return Route(matches[0].provider, selector)
        if matches:
            choices = ", ".join(qualified(inv.provider.name, selector) for inv in matches)
            raise InvalidRequest(
                f"The model '{selector}' is served by several providers; name one: {choices}.",
                param="model", code="ambiguous_model")
        raise ModelNotFound(selector)
