"""The providers' status (the admin API's C{GET /admin/api/v1/providers/status}), without Klein: the admin API's
route and the front's plain route (L{gomodel.api.plain}), a fleet's readiness check, answer with it."""

from gomodel.http.bodies import json_answer


def providers_status(registry, clock, request) -> bytes:
    """Every provider of C{registry} (a L{gomodel.routing.registry.ModelRegistry}) with its replicas' states, as
    the admin API answers it."""
    now = clock.seconds()
    return json_answer(request, {"providers": [_provider(registry, pool, now) for pool in registry.providers]})


def _provider(registry, pool, now) -> dict:
    inventory = registry.inventory(pool)
    return {"name": pool.name, "type": pool.type, "models": sorted(inventory or ()),
            "ready_replicas": sum(1 for r in pool.replicas if r.ready),
            "replicas": [_replica(r, now, pool.load_max_age) for r in pool.replicas]}


def _replica(replica, now, max_age) -> dict:
    """A replica's status; its load report is C{load_stale} past C{max_age} seconds (the router's, which no
    longer uses it: a replica down, or its C{/metrics} not answering, keeps its last one)."""
    load = replica.load
    return {
        "index": replica.index, "base_url": replica.base_url, "state": replica.state,
        "in_flight": replica.in_flight, "served": replica.served,
        "max_concurrency": replica.max_concurrency or None, "weight": replica.weight,
        "waiting": None if load is None else load.waiting,
        "running": None if load is None else load.running,
        "kv_cache_usage": None if load is None else load.kv_cache_usage,
        "load_age_s": None if replica.load_at is None else round(now - replica.load_at, 3),
        "load_stale": replica.load_at is not None and now - replica.load_at > max_age,
        "batch_size": replica.slots, "pace_s": None if replica.pace is None else round(replica.pace, 3),
        "models": sorted(replica.models) if replica.models is not None else None,
        "consecutive_failures": replica.failures, "last_error": replica.last_error,
        "last_state_change": replica.changed_at, "held_until": replica.held_until, "trial": replica.trial,
        "busy_until": replica.busy_until if replica.busy_until is not None and replica.busy_until > now else None,
        "check_failed": replica.doubted, "unanswered": replica.unanswered,
    }
