"""Which models each provider serves, and which provider a selector names.

A provider is a L{gomodel.routing.pool.ReplicaPool}. What it serves is the
union of what its replicas listed (L{gomodel.routing.health.ReplicaMonitor}
discovers that, and says when it changed); while none has listed anything,
its configured models stand in (C{fallback} mode), and in C{allowlist} mode
only the configured models count.
"""

from typing import NamedTuple, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gomodel import jsonutil
from gomodel.errors import AmbiguousModel, InvalidRequest, ModelNotFound
from gomodel.routing.selectors import parse_selector, public_id, qualified
from gomodel.routing.virtual import VirtualModel


class Route(NamedTuple):
    """Where one request goes."""

    provider: object  # a ReplicaPool
    upstream_model: str


# Resolved selectors are remembered until an inventory changes; this many at most.
ROUTE_CACHE_SIZE = 1024


class ModelRegistry:
    """Selector resolution and model listings over every provider's pool."""

    log = Logger()

    def __init__(self, pools, clock, *, mode="fallback", virtual_models=(), failover_rules=None):
        """
        @param virtual_models: L{gomodel.config.virtual.VirtualModel}s.
        @param failover_rules: model -> candidate selectors tried, in order, when it failed.
        """
        self._pools = list(pools)
        self._virtual = {vm.source: VirtualModel(vm) for vm in virtual_models}
        self._failover = dict(failover_rules or {})
        self._mode = mode
        self._by_name = {pool.name: pool for pool in self._pools}
        created = int(clock.seconds())
        self._configured = {pool.name: {m: {"id": m, "object": "model", "created": created, "owned_by": pool.name}
                                        for m in pool.configured_models} for pool in self._pools}
        self._models_body = None
        self._routes = {}  # selector -> Route, for the current inventories
        self._renamed = {}  # provider name -> its public ids of models listed by a path (L{_names})
        self._ready_waiters = []

    @property
    def providers(self):
        return list(self._pools)

    def provider(self, name: str):
        """The provider instance called C{name}, else the first of type C{name}, else None."""
        pool = self._by_name.get(name)
        if pool is not None:
            return pool
        for pool in self._pools:
            if pool.type == name:
                return pool
        return None

    def inventory(self, pool) -> Optional[dict]:
        """Upstream id -> model object of what C{pool} serves; None while that is not known."""
        configured = self._configured[pool.name]
        if self._mode == "allowlist" and configured:
            return configured
        listed = pool.models()
        if listed:
            return listed
        if configured:
            return configured
        return listed  # {} (lists nothing) or None (not known yet)

    def lists(self, provider_name: str, upstream_model: str) -> bool:
        """Whether the provider instance C{provider_name} lists (or is configured with) C{upstream_model}: not so
        for any name a client types while its models are not known (L{resolve} gives it the request)."""
        pool = self._by_name.get(provider_name)
        models = None if pool is None else self.inventory(pool)
        return models is not None and upstream_model in models

    def models_changed(self):
        """A replica's models changed: listings and resolutions are computed again."""
        self._models_body = None
        self._routes = {}
        self._renamed = {}
        for pool in self._pools:  # (each pool's own C{renamed}, which its answers are written by, from now on)
            self._names(pool)
        self._check_ready()

    def replicas_changed(self):
        """A replica changed state: waiters of L{ready} may go on."""
        self._check_ready()

    def ready(self):
        """A Deferred that fires (with None) once discovery has run for every provider, and some provider's
        models are known: a provider's models are known and its replicas were checked (one is ready, or each
        answered or failed its first checks), or every replica failed its first checks (a provider down at
        start keeps no other from being served); at once without providers."""
        d = Deferred()
        self._ready_waiters.append(d)
        self._check_ready()
        return d

    def _check_ready(self):
        if self._ready_waiters and all(self._discovered(pool) for pool in self._pools) \
                and (not self._pools or any(self.inventory(pool) is not None for pool in self._pools)):
            waiting, self._ready_waiters = self._ready_waiters, []
            for d in waiting:
                d.callback(None)

    def _discovered(self, pool) -> bool:
        """Whether discovery has run for C{pool}: its models are known and its replicas checked
        (L{gomodel.routing.pool.ReplicaPool.settled}), or every replica failed its first checks."""
        return self.inventory(pool) is not None and pool.settled or all(r.checked for r in pool.replicas)

    # -- queries --------------------------------------------------------------

    def models(self) -> list:
        """Every known model, ids qualified with their provider, upstream fields kept but where they name the
        upstream's files (L{_public}); then the virtual ones (a virtual model named as a provider's model is what
        that name reaches: listed once, as virtual)."""
        out = []
        for pool in self._pools:
            served = self.inventory(pool) or {}
            for name, model in self.provider_models(pool):
                entry = dict(model)
                entry["id"] = name
                entry["object"] = "model"
                entry["owned_by"] = pool.name
                _public(entry, pool.name, served)
                out.append(entry)
        out.extend(self.virtual_models())
        return out

    def provider_models(self, pool):
        """C{(qualified id, model object)} of each model C{pool} serves under its own name, its public id
        (L{public_id}: one listed by a path, by the path's last part; one whose public id another of its models
        has is left out, L{_names}): one a virtual model is named as is what that name reaches, the virtual model
        (listed by L{virtual_models})."""
        renamed = self._names(pool)
        for upstream_id, model in (self.inventory(pool) or {}).items():
            public = public_id(upstream_id)
            if public != upstream_id and renamed.get(public) != upstream_id:
                continue
            name = qualified(pool.name, public)
            if name not in self._virtual:
                yield name, model

    def _names(self, pool) -> dict:
        """Public id -> upstream id of each model C{pool} serves that a client knows by another name (one it
        lists by a path: L{public_id}), worked out once per inventory; one whose public id is another of its models'
        id, or that of one before it, is not (it is left unlisted: a warning says so). The pool is given its inverse
        (L{gomodel.routing.pool.ReplicaPool.rename})."""
        names = self._renamed.get(pool.name)
        if names is None:
            names = self._renamed[pool.name] = {}
            served = self.inventory(pool) or {}
            for upstream_id in served:
                public = public_id(upstream_id)
                if public == upstream_id:
                    continue
                if public in served or public in names:
                    self.log.warn("Provider {provider}: a model listed by a path is not listed, its name {name!r} "
                                  "being another model's", provider=pool.name, name=public)
                    continue
                names[public] = upstream_id
            pool.rename({upstream_id: public for public, upstream_id in names.items()})
        return names

    def _upstream_id(self, pool, served, name):
        """The upstream id of the model of C{pool}'s (C{served}, its inventory) that a client names C{name} (its
        upstream id, or its public id: L{_names}), or None where it serves none so named."""
        if name in served:
            return name
        return self._names(pool).get(name)

    def upstream_model(self, pool, name: str) -> str:
        """The id C{pool} serves the model a client names C{name} by (the path of one it lists by a path: L{_names}),
        or C{name} where it serves none so named."""
        return self._upstream_id(pool, self.inventory(pool) or {}, name) or name

    def virtual_models(self) -> list:
        """The virtual models' entries of L{models}: C{owned_by} C{gomodel} (as a provider of that name's
        are too), with their C{targets}."""
        return [{"id": vm.source, "object": "model", "created": 0, "owned_by": "gomodel",
                 "targets": [{"model": selector, "weight": weight} for selector, weight in vm.targets]}
                for vm in self._virtual.values()]

    def models_body(self) -> bytes:
        """The C{/v1/models} answer, serialised once per inventory change."""
        if self._models_body is None:
            self._models_body = jsonutil.dumps({"object": "list", "data": self.models()})
        return self._models_body

    def model(self, selector: str) -> Optional[dict]:
        """One model object of L{models}: by its id (qualified, or a virtual model's name), else the one
        C{selector} resolves to as a request's model does (a bare id, a provider type's prefix); or None.

        @raise AmbiguousModel: several providers serve the bare id.
        """
        models = self.models()
        for entry in reversed(models):  # a virtual model (listed last) first, as in L{plan}
            if entry["id"] == selector:
                return entry
        try:
            route = self._real(selector)
        except ModelNotFound:
            return None
        wanted = qualified(route.provider.name, public_id(route.upstream_model))
        for entry in models:  # absent while its provider's models are not known yet
            if entry["id"] == wanted:
                return entry
        return None

    def plan(self, selector: str, affinity_of=None) -> list:
        """The routes to try for C{selector}, in order: its target (a virtual model's, chosen
        now), the virtual model's other targets, then its failover candidates.

        @param affinity_of: a function giving the request's session key, or None.

        @raise ModelNotFound: nobody serves it.
        @raise AmbiguousModel: several providers serve the bare id.
        """
        virtual = self._virtual.get(selector)
        if virtual is not None:
            routes = virtual.order(self._real, _live, affinity_of)
        else:
            routes = [self._real(selector)]
        if selector in self._failover:
            for route in self.failover(selector):
                if route not in routes:
                    routes.append(route)
        return routes

    def failover(self, selector: str) -> list:
        """The routes of C{selector}'s failover candidates that are served, in order; a candidate that is a
        virtual model stands for its targets, heaviest first (never for its own failover candidates)."""
        routes = []
        for candidate in self._failover.get(selector, ()):
            virtual = self._virtual.get(candidate)
            for one in (candidate,) if virtual is None else _by_weight(virtual.targets):
                try:
                    routes.append(self._real(one))
                except (ModelNotFound, InvalidRequest):
                    continue
        return routes

    def targets(self, selector: str) -> list:
        """The routes C{selector} itself names, in no order: a virtual model's targets (those served), a
        provider type's model at each instance of that type that serves it (L{resolve} takes the first),
        another selector's one route; never its failover candidates.

        @raise ModelNotFound: nobody serves it.
        @raise AmbiguousModel: several providers serve the bare id.
        """
        virtual = self._virtual.get(selector)
        if virtual is None:
            route = self._real(selector)
            parsed = parse_selector(selector)
            if parsed.prefix is None:
                return [route]
            others = [(pool, self._upstream_id(pool, self.inventory(pool) or {}, parsed.rest)) for pool in self._pools
                      if pool is not route.provider and pool.type == parsed.prefix]
            return [route] + [Route(pool, upstream) for pool, upstream in others if upstream is not None]
        routes = []
        for target, _ in virtual.targets:
            try:
                routes.append(self._real(target))
            except (ModelNotFound, InvalidRequest):
                continue
        return routes

    def resolve(self, selector: str) -> Route:
        """Name the provider and upstream model for C{selector}.

        The provider instance name first, then the provider type (its first
        instance serving the model); a provider whose models are not known yet
        gets the request. A prefix that names no provider means the whole
        selector is an upstream model id, looked up across all providers.

        @raise ModelNotFound: nobody serves it.
        @raise AmbiguousModel: several providers serve the bare id.
        """
        virtual = self._virtual.get(selector)
        if virtual is not None:
            return virtual.order(self._real, _live, None)[0]
        return self._real(selector)

    def _real(self, selector: str) -> Route:
        """L{resolve} for a selector of a provider's model (never a virtual one); remembered."""
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
                pool for pool in self._pools if pool.type == parsed.prefix and pool is not named]
            inventories = [(pool, self.inventory(pool)) for pool in candidates]
            for pool, models in inventories:
                upstream = None if models is None else self._upstream_id(pool, models, parsed.rest)
                if upstream is not None:
                    return Route(pool, upstream)
            for pool, models in inventories:
                if models is None:  # not discovered yet: its replicas will say when they are ready
                    return Route(pool, parsed.rest)
            if candidates:
                raise ModelNotFound(selector)
        matches = self.serving(selector)
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise AmbiguousModel(selector, [qualified(route.provider.name, selector) for route in matches])
        raise ModelNotFound(selector)

    def serving(self, model_id: str) -> list:
        """A route to each provider whose models (those known) include the bare id C{model_id}, in the order
        configured."""
        routes = []
        for pool in self._pools:
            upstream = self._upstream_id(pool, self.inventory(pool) or {}, model_id)
            if upstream is not None:
                routes.append(Route(pool, upstream))
        return routes


def ready_first(routes) -> list:
    """C{routes} (L{ModelRegistry.plan}'s, at least two) with a first that is passed over
    (L{gomodel.routing.pool.ReplicaPool.passed_over}: waiting out a C{Retry-After}, out of quota, its requests
    failing, none ready) put after those that are not, as a virtual model's targets are: still tried where nothing
    else can serve; else C{routes} itself."""
    first = routes[0]
    if not first.provider.passed_over(first.upstream_model):
        return routes
    ready = [route for route in routes[1:] if not route.provider.passed_over(route.upstream_model)]
    if not ready:
        return routes
    return ready + [route for route in routes if route not in ready]


def _by_weight(targets) -> list:
    """The selectors of a virtual model's C{targets} (C{(selector, weight)} pairs), heaviest first."""
    return [selector for selector, _ in sorted(targets, key=lambda target: -target[1])]


def _public(entry: dict, provider: str, served: dict):
    """C{entry} (a model of C{provider}'s, its id qualified) without what names its upstream's files: vLLM's C{root},
    the path (or hub id) its weights or a LoRA adapter were loaded from on its host, is its id; C{parent}, a LoRA's
    base model by its upstream id, that model's qualified (public) id (None where C{provider} does not list it)."""
    if "root" in entry:
        entry["root"] = entry["id"]
    parent = entry.get("parent")
    if parent is not None:
        entry["parent"] = qualified(provider, public_id(parent)) if parent.__class__ is str and parent in served \
            else None


def _live(route) -> int:
    """Whether a ready replica of the route's provider serves its model now: 2 with room for another
    request, 1 all full, 0 none (L{gomodel.routing.pool.ReplicaPool.standing_for})."""
    return route.provider.standing_for(route.upstream_model)
