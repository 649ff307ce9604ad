"""The operator's API under C{/admin/api/v1/}: what the gateway's providers and replicas are doing.

Every route needs the gateway's master key (the front checks it for every
path but C{/health}). Names follow GoModel's admin API where it has them.
"""

from klein import Klein

from gomodel.http.bodies import json_answer
from gomodel.http.render import install as install_error_handlers


class AdminAPI:
    """C{GET providers/status}, C{POST runtime/refresh} and C{GET models}, mounted by L{gomodel.api.app.GatewayApp}."""

    app = Klein()
    app.url_map.strict_slashes = False

    def __init__(self, registry, monitor, clock):
        """
        @param registry: the L{gomodel.routing.registry.ModelRegistry} (its providers' pools).
        @param monitor: the L{gomodel.routing.health.ReplicaMonitor}.
        """
        self._registry = registry
        self._monitor = monitor
        self._clock = clock

    @app.route("/providers/status", methods=["GET"])
    def providers_status(self, request):
        now = self._clock.seconds()
        return json_answer(request, {"providers": [self._provider(pool, now) for pool in self._registry.providers]})

    @app.route("/models", methods=["GET"])
    def models(self, request):
        """What is routable: every model with its provider's type and name (virtual models included)."""
        by_name = {pool.name: pool for pool in self._registry.providers}
        data = []
        for model in self._registry.models():
            pool = by_name.get(model.get("owned_by"))
            if pool is None:  # a virtual model: its targets say where it goes
                data.append({"id": model["id"], "provider": "virtual", "provider_name": None,
                             "targets": model.get("targets")})
            else:
                data.append({"id": model["id"], "provider": pool.type, "provider_name": pool.name,
                             "ready_replicas": sum(1 for r in pool.replicas if r.ready)})
        return json_answer(request, {"object": "list", "data": data})

    @app.route("/runtime/refresh", methods=["POST"])
    def refresh(self, request):
        """Re-read every replica's models now; the answer does not wait for them."""
        self._monitor.refresh()
        return json_answer(request, {"status": "refreshing"})

    def _provider(self, pool, now):
        inventory = self._registry.inventory(pool)
        return {"name": pool.name, "type": pool.type, "models": sorted(inventory or ()),
                "ready_replicas": sum(1 for r in pool.replicas if r.ready),
                "replicas": [_replica(r, now) for r in pool.replicas]}


def _replica(replica, now) -> dict:
    load = replica.load
    return {
        "index": replica.index, "base_url": replica.base_url, "state": replica.state,
        "in_flight": replica.in_flight, "served": replica.served,
        "max_concurrency": replica.max_concurrency or None, "weight": replica.weight,
        "waiting": None if load is None else load.waiting,
        "running": None if load is None else load.running,
        "kv_cache_usage": None if load is None else load.kv_cache_usage,
        "load_age_s": None if replica.load_at is None else round(now - replica.load_at, 3),
        "models": sorted(replica.models) if replica.models is not None else None,
        "consecutive_failures": replica.failures, "last_error": replica.last_error,
        "last_state_change": replica.changed_at,
    }


install_error_handlers(AdminAPI.app)
