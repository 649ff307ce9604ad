"""Model discovery (on a fake clock) and selector resolution."""

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from gomodel.errors import InvalidRequest, ModelNotFound, UpstreamUnreachable
from gomodel.proxy.renamed import model_named
from gomodel.routing.health import ReplicaMonitor
from gomodel.routing.pool import Replica, ReplicaPool
from gomodel.routing.registry import ModelRegistry
from gomodel.routing.selectors import parse_selector, public_id


class StubProvider:
    """One server: its model list comes from C{answers}; its health check always answers."""

    hidden = ()

    def __init__(self, name, type_="vllm", models=(), configured=()):
        self.name = name
        self.type = type_
        self.configured_models = tuple(configured)
        self.answers = [succeed([{"id": m, "max_model_len": 4} for m in models])] if models is not None else []
        self.calls = 0

    def list_models(self):
        self.calls += 1
        if self.answers:
            return self.answers.pop(0)
        return fail(UpstreamUnreachable("down"))

    def health(self):
        return succeed(None)

    def scrape(self):
        return succeed(None)


def test_selector_splits_on_the_first_slash_only():
    assert parse_selector("vllm-test/meta-llama/X") == ("vllm-test/meta-llama/X", "vllm-test", "meta-llama/X")
    assert parse_selector("gpt-4o") == ("gpt-4o", None, "gpt-4o")
    assert parse_selector("/x").prefix is None
    assert parse_selector("x/").prefix is None


def started(*providers, mode="fallback"):
    """A registry over one-replica pools of C{providers}, and its monitor, started on a clock."""
    clock = Clock()
    pools = [ReplicaPool(p.name, p.type, [Replica(0, p, "http://h/v1", clock)], clock,
                         configured_models=p.configured_models) for p in providers]
    registry = ModelRegistry(pools, clock, mode=mode)
    monitor = ReplicaMonitor(registry, clock, mode=mode, refresh_interval=300, health_interval=3600,
                             metrics_interval=0)
    monitor.startService()
    clock.advance(0)
    return clock, registry, monitor


def route(registry, selector):
    """C{registry.resolve(selector)} as (server, upstream model)."""
    resolved = registry.resolve(selector)
    return resolved.provider.first, resolved.upstream_model


def discoveries(clock):
    """The pending discovery calls (not the health probes' loops)."""
    return [c for c in clock.getDelayedCalls() if getattr(c.func, "__name__", "") == "_discover"]


def test_discovery_and_resolution():
    a = StubProvider("vllm", models=["meta-llama/X", "shared"])
    b = StubProvider("vllm-b", models=["Qwen/Y", "shared"])
    o = StubProvider("openai", "openai", models=["gpt-4o"])
    clock, registry, monitor = started(a, b, o)
    ids = [m["id"] for m in registry.models()]
    assert ids == ["vllm/meta-llama/X", "vllm/shared", "vllm-b/Qwen/Y", "vllm-b/shared", "openai/gpt-4o"]
    assert registry.models()[0]["owned_by"] == "vllm" and registry.models()[0]["max_model_len"] == 4

    assert route(registry, "vllm-b/Qwen/Y") == (b, "Qwen/Y")  # instance name
    assert route(registry, "vllm/Qwen/Y") == (b, "Qwen/Y")  # type: the instance that serves it
    assert route(registry, "vllm/meta-llama/X") == (a, "meta-llama/X")
    assert route(registry, "meta-llama/X") == (a, "meta-llama/X")  # unknown prefix: whole string
    assert route(registry, "gpt-4o") == (o, "gpt-4o")
    with pytest.raises(InvalidRequest) as raised:
        registry.resolve("shared")
    assert "vllm/shared" in raised.value.message and "vllm-b/shared" in raised.value.message
    for missing in ("vllm-b/meta-llama/X", "vllm/nope", "nope", "meta-llama/nope"):
        with pytest.raises(ModelNotFound):
            registry.resolve(missing)
    monitor.stopService()


def test_one_model_by_its_listed_id_or_as_a_request_names_it():
    a = StubProvider("vllm", models=["meta-llama/X", "shared"])
    b = StubProvider("vllm-b", models=["Qwen/Y", "shared"])
    later = StubProvider("vllm-later", models=None)
    clock, registry, monitor = started(a, b, later)
    for selector, listed in (("vllm/meta-llama/X", "vllm/meta-llama/X"), ("meta-llama/X", "vllm/meta-llama/X"),
                             ("vllm/Qwen/Y", "vllm-b/Qwen/Y"), ("Qwen/Y", "vllm-b/Qwen/Y")):
        assert registry.model(selector)["id"] == listed, selector
    for missing in ("nope", "meta-llama/nope", "vllm-b/meta-llama/X", "vllm-later/anything"):
        assert registry.model(missing) is None, missing  # (a provider whose models are not known lists none)
    with pytest.raises(InvalidRequest):
        registry.model("shared")
    monitor.stopService()


def test_a_model_listed_by_a_path_is_known_by_its_last_part():
    """A vLLM started with C{--model PATH} and no C{--served-model-name} lists the path: the model is listed (and
    reached) by the path's last part (a Hugging Face cache's by its hub id), the path sent upstream; a hub id, or a
    name without slashes, is as it came; a path whose last part another model has is left unlisted, still reached
    by its path."""
    assert [public_id(i) for i in ("/srv/models/Llama-3.1-8B", "./models/q", "~/m", "C:\\models\\q",
                                   "/root/.cache/huggingface/hub/models--meta-llama--Llama-3.1-8B/snapshots/0a1b")] == [
        "Llama-3.1-8B", "q", "m", "q", "meta-llama/Llama-3.1-8B"]
    assert [public_id(i) for i in ("meta-llama/X", "gpt-4o", "x.y/z", "team/llama/v2")] == [
        "meta-llama/X", "gpt-4o", "x.y/z", "team/llama/v2"]
    a = StubProvider("vllm", models=["/srv/models/Llama-3.1-8B", "/srv/other/X", "X"])
    clock, registry, monitor = started(a)
    assert [m["id"] for m in registry.models()] == ["vllm/Llama-3.1-8B", "vllm/X"]
    for selector in ("vllm/Llama-3.1-8B", "Llama-3.1-8B", "/srv/models/Llama-3.1-8B"):
        assert route(registry, selector) == (a, "/srv/models/Llama-3.1-8B"), selector
    assert route(registry, "vllm/X") == (a, "X") and route(registry, "/srv/other/X") == (a, "/srv/other/X")
    assert registry.model("Llama-3.1-8B")["id"] == "vllm/Llama-3.1-8B"
    monitor.stopService()


def test_the_rewrite_of_a_model_listed_by_a_path_is_made_once_per_pool():
    """Each answer of a model listed by a path is written with its public id by the pool's own L{ModelNamed}, made
    as the pool learns the model's name (before: one made per answer); none for a model listed by its id."""
    a = StubProvider("vllm", models=["/srv/models/Llama-3.1-8B", "X"])
    clock, registry, monitor = started(a)
    pool = registry.resolve("vllm/Llama-3.1-8B").provider
    named = model_named(pool, "/srv/models/Llama-3.1-8B")
    assert named is model_named(pool, "/srv/models/Llama-3.1-8B")
    assert named(b'{"model": "/srv/models/Llama-3.1-8B"}') == b'{"model": "Llama-3.1-8B"}'
    assert model_named(pool, "X") is None
    monitor.stopService()


def test_provider_down_at_start_is_retried_with_backoff_then_refreshed():
    p = StubProvider("vllm", models=None)
    clock, registry, monitor = started(p)
    assert registry.models() == []
    ready = registry.ready()
    delays = []
    for _ in range(7):
        [call] = discoveries(clock)
        delays.append(call.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert not ready.called
    p.answers.append(succeed([{"id": "m"}]))
    [call] = discoveries(clock)
    clock.advance(call.getTime() - clock.seconds())
    assert ready.called
    assert [m["id"] for m in registry.models()] == ["vllm/m"]
    [call] = discoveries(clock)
    assert call.getTime() - clock.seconds() == 300  # refreshed periodically from now on

    clock.advance(300)  # this refresh fails: the last known models stay
    assert [m["id"] for m in registry.models()] == ["vllm/m"]
    [call] = discoveries(clock)
    assert call.getTime() - clock.seconds() == 1
    monitor.stopService()
    assert clock.getDelayedCalls() == []


def test_unknown_inventory_routes_by_name_and_type():
    p = StubProvider("vllm-x", models=None)
    clock, registry, monitor = started(p)
    assert route(registry, "vllm-x/anything") == (p, "anything")
    assert route(registry, "vllm/anything") == (p, "anything")
    with pytest.raises(ModelNotFound):
        registry.resolve("anything")
    monitor.stopService()


def test_configured_models_are_a_fallback():
    p = StubProvider("vllm", models=None, configured=["meta-llama/X"])
    clock, registry, monitor = started(p)
    assert [m["id"] for m in registry.models()] == ["vllm/meta-llama/X"]  # while discovery fails
    p.answers.append(succeed([{"id": "served", "max_model_len": 8}]))
    clock.advance(1)
    assert [m["id"] for m in registry.models()] == ["vllm/served"]  # upstream list wins once it answers
    monitor.stopService()

    empty = StubProvider("vllm", models=[], configured=["meta-llama/X"])
    clock, registry, monitor = started(empty)
    assert [m["id"] for m in registry.models()] == ["vllm/meta-llama/X"]
    monitor.stopService()


def test_allowlist_skips_discovery():
    p = StubProvider("vllm", models=["a", "b"], configured=["b"])
    clock, registry, monitor = started(p, mode="allowlist")
    assert p.calls == 0
    assert [m["id"] for m in registry.models()] == ["vllm/b"]
    with pytest.raises(ModelNotFound):
        registry.resolve("vllm/a")
    assert discoveries(clock) == []
    monitor.stopService()


def test_stopping_cancels_discovery_in_flight():
    p = StubProvider("vllm", models=None)
    pending = Deferred()
    p.answers.append(pending)
    clock, registry, monitor = started(p)
    monitor.stopService()
    assert pending.called  # cancelled
    assert clock.getDelayedCalls() == []


def test_models_body_is_cached_until_the_inventory_changes():
    p = StubProvider("vllm", models=["a"])
    clock, registry, monitor = started(p)
    first = registry.models_body()
    assert registry.models_body() is first
    p.answers.append(succeed([{"id": "b"}]))
    clock.advance(300)
    assert b'"vllm/b"' in registry.models_body()
    monitor.stopService()


def test_resolved_selectors_follow_a_refreshed_inventory():
    a = StubProvider("vllm", models=["old"])
    b = StubProvider("vllm-b", models=[])
    clock, registry, monitor = started(a, b)
    assert route(registry, "vllm/old") == (a, "old")
    assert route(registry, "vllm/old") == (a, "old")  # remembered
    a.answers.append(succeed([{"id": "new"}]))
    b.answers.append(succeed([{"id": "old"}]))
    clock.advance(300)  # both refreshed: the model moved to vllm-b
    assert route(registry, "vllm/old") == (b, "old")
    assert route(registry, "vllm/new") == (a, "new")
    with pytest.raises(ModelNotFound):
        registry.resolve("vllm-b/new")
    monitor.stopService()
