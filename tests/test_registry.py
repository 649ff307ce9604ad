"""Model discovery (on a fake clock) and selector resolution."""

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from gomodel.config import ProviderConfig
from gomodel.errors import InvalidRequest, ModelNotFound, UpstreamUnreachable
from gomodel.routing.registry import ModelRegistry
from gomodel.routing.selectors import parse_selector


class StubProvider:
    def __init__(self, name, type_="vllm", models=(), configured=()):
        self.name = name
        self.type = type_
        self.config = ProviderConfig(name=name, type=type_, base_url="http://h/v1", root_url="http://h",
                                     models=tuple(configured))
        self.answers = [succeed([{"id": m, "max_model_len": 4} for m in models])] if models is not None else []
        self.calls = 0

    def list_models(self):
        self.calls += 1
        if self.answers:
            return self.answers.pop(0)
        return fail(UpstreamUnreachable("down"))


def test_selector_splits_on_the_first_slash_only():
    assert parse_selector("vllm-test/meta-llama/X") == ("vllm-test/meta-llama/X", "vllm-test", "meta-llama/X")
    assert parse_selector("gpt-4o") == ("gpt-4o", None, "gpt-4o")
    assert parse_selector("/x").prefix is None
    assert parse_selector("x/").prefix is None


def started(*providers, mode="fallback"):
    clock = Clock()
    registry = ModelRegistry(providers, clock, mode=mode, refresh_interval=300)
    registry.startService()
    clock.advance(0)
    return clock, registry


def test_discovery_and_resolution():
    a = StubProvider("vllm", models=["meta-llama/X", "shared"])
    b = StubProvider("vllm-b", models=["Qwen/Y", "shared"])
    o = StubProvider("openai", "openai", models=["gpt-4o"])
    clock, registry = started(a, b, o)
    ids = [m["id"] for m in registry.models()]
    assert ids == ["vllm/meta-llama/X", "vllm/shared", "vllm-b/Qwen/Y", "vllm-b/shared", "openai/gpt-4o"]
    assert registry.models()[0]["owned_by"] == "vllm" and registry.models()[0]["max_model_len"] == 4

    assert registry.resolve("vllm-b/Qwen/Y") == (b, "Qwen/Y")  # instance name
    assert registry.resolve("vllm/Qwen/Y") == (b, "Qwen/Y")  # type: the instance that serves it
    assert registry.resolve("vllm/meta-llama/X") == (a, "meta-llama/X")
    assert registry.resolve("meta-llama/X") == (a, "meta-llama/X")  # unknown prefix: whole string
    assert registry.resolve("gpt-4o") == (o, "gpt-4o")
    with pytest.raises(InvalidRequest) as raised:
        registry.resolve("shared")
    assert "vllm/shared" in raised.value.message and "vllm-b/shared" in raised.value.message
    for missing in ("vllm-b/meta-llama/X", "vllm/nope", "nope", "meta-llama/nope"):
        with pytest.raises(ModelNotFound):
            registry.resolve(missing)
    registry.stopService()


def test_provider_down_at_start_is_retried_with_backoff_then_refreshed():
    p = StubProvider("vllm", models=None)
    clock, registry = started(p)
    assert registry.models() == []
    ready = registry.ready()
    delays = []
    for _ in range(7):
        [call] = clock.getDelayedCalls()
        delays.append(call.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert not ready.called
    p.answers.append(succeed([{"id": "m"}]))
    [call] = clock.getDelayedCalls()
    clock.advance(call.getTime() - clock.seconds())
    assert ready.called
    assert [m["id"] for m in registry.models()] == ["vllm/m"]
    [call] = clock.getDelayedCalls()
    assert call.getTime() - clock.seconds() == 300  # refreshed periodically from now on

    clock.advance(300)  # this refresh fails: the last known models stay
    assert [m["id"] for m in registry.models()] == ["vllm/m"]
    [call] = clock.getDelayedCalls()
    assert call.getTime() - clock.seconds() == 1
    registry.stopService()
    assert clock.getDelayedCalls() == []


def test_unknown_inventory_routes_by_name_and_type():
    p = StubProvider("vllm-x", models=None)
    clock, registry = started(p)
    assert registry.resolve("vllm-x/anything") == (p, "anything")
    assert registry.resolve("vllm/anything") == (p, "anything")
    with pytest.raises(ModelNotFound):
        registry.resolve("anything")
    registry.stopService()


def test_configured_models_are_a_fallback():
    p = StubProvider("vllm", models=None, configured=["meta-llama/X"])
    clock, registry = started(p)
    assert [m["id"] for m in registry.models()] == ["vllm/meta-llama/X"]  # while discovery fails
    p.answers.append(succeed([{"id": "served", "max_model_len": 8}]))
    clock.advance(1)
    assert [m["id"] for m in registry.models()] == ["vllm/served"]  # upstream list wins once it answers
    registry.stopService()

    empty = StubProvider("vllm", models=[], configured=["meta-llama/X"])
    clock, registry = started(empty)
    assert [m["id"] for m in registry.models()] == ["vllm/meta-llama/X"]
    registry.stopService()


def test_allowlist_skips_discovery():
    p = StubProvider("vllm", models=["a", "b"], configured=["b"])
    clock, registry = started(p, mode="allowlist")
    assert p.calls == 0
    assert [m["id"] for m in registry.models()] == ["vllm/b"]
    with pytest.raises(ModelNotFound):
        registry.resolve("vllm/a")
    assert clock.getDelayedCalls() == []
    registry.stopService()


def test_stopping_cancels_discovery_in_flight():
    p = StubProvider("vllm", models=None)
    pending = Deferred()
    p.answers.append(pending)
    clock, registry = started(p)
    registry.stopService()
    assert pending.called  # cancelled
    assert clock.getDelayedCalls() == []


def test_models_body_is_cached_until_the_inventory_changes():
    p = StubProvider("vllm", models=["a"])
    clock, registry = started(p)
    first = registry.models_body()
    assert registry.models_body() is first
    p.answers.append(succeed([{"id": "b"}]))
    clock.advance(300)
    assert b'"vllm/b"' in registry.models_body()
    registry.stopService()


def test_resolved_selectors_follow_a_refreshed_inventory():
    a = StubProvider("vllm", models=["old"])
    b = StubProvider("vllm-b", models=[])
    clock, registry = started(a, b)
    assert registry.resolve("vllm/old") == (a, "old")
    assert registry.resolve("vllm/old") == (a, "old")  # remembered
    a.answers.append(succeed([{"id": "new"}]))
    b.answers.append(succeed([{"id": "old"}]))
    clock.advance(300)  # both refreshed: the model moved to vllm-b
    assert registry.resolve("vllm/old") == (b, "old")
    assert registry.resolve("vllm/new") == (a, "new")
    with pytest.raises(ModelNotFound):
        registry.resolve("vllm-b/new")
    registry.stopService()
