"""IKeyStore and IBudgetStore contract (every backend)."""

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from gomodel.store.interfaces import IBudgetStore, IKeyStore
from tests.stores import backend, store  # noqa: F401 (fixtures)


def key(key_id, **extra):
    return {"id": key_id, "hash": "h-" + key_id, "redacted": "sk-...x", "name": key_id, "description": None,
            "user_path": "/team/a", "created_at": 1000, "expires_at": None, "deactivated_at": None,
            "models": ["vllm/m"], "rpm": 60, "tpm": None, "max_concurrency": 2,
            "budgets": [{"period": "daily", "max_tokens": 100}], "priority": None, "metadata": {"k": "é"},
            "own_cache_salt": True, **extra}


async def later(reactor, store):
    """Time moves on, for both the injected clock and a database's own clock."""
    store.clock.advance(1)
    await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_keys_are_added_changed_listed_and_followed(reactor, store):
    keys = store.keys
    verifyObject(IKeyStore, keys)
    first = await keys.add(key("k_1"))
    assert {name: first[name] for name in ("models", "budgets", "metadata", "own_cache_salt", "rpm")} == {
        "models": ["vllm/m"], "budgets": [{"period": "daily", "max_tokens": 100}], "metadata": {"k": "é"},
        "own_cache_salt": True, "rpm": 60}
    await later(reactor, store)
    second = await keys.add(key("k_2", models=None, budgets=[], metadata=None, own_cache_salt=False))
    assert (second["models"], second["budgets"], second["own_cache_salt"]) == (None, [], False)
    assert second["updated_at"] > first["updated_at"]
    assert [k["id"] for k in await keys.list()] == ["k_1", "k_2"]
    assert await keys.get("k_none") is None
    await later(reactor, store)
    changed = await keys.update("k_1", {"deactivated_at": 1234, "rpm": None})
    assert (changed["deactivated_at"], changed["rpm"], changed["hash"]) == (1234, None, "h-k_1")
    assert changed["updated_at"] > second["updated_at"]
    assert [k["id"] for k in await keys.changed_since(second["updated_at"])] == ["k_1"]
    assert [k["id"] for k in await keys.changed_since(0)] == ["k_2", "k_1"]
    assert await keys.update("k_none", {"rpm": 1}) is None
    rotated = await keys.update("k_2", {"hash": "h-new", "redacted": "sk-...n"})  # (a rotated secret)
    assert (rotated["hash"], rotated["redacted"], rotated["created_at"]) == ("h-new", "sk-...n", 1000)
    assert (await keys.get("k_2"))["hash"] == "h-new"


@pytest_twisted.ensureDeferred
async def test_an_edit_after_the_clock_stepped_back_is_still_the_newest(reactor, store):
    """A key's updated_at only grows, whatever the clock does: the key rings of the other processes ask for what
    changed since the newest they saw (a few seconds back), so an edit stamped earlier (the clock stepped back by
    more: NTP, a resumed VM) was never read there, a deactivation included, until they restarted."""
    keys = store.keys
    first = await keys.add(key("k_1"))
    store.clock.advance(-60)
    added = await keys.add(key("k_2"))
    deactivated = await keys.update("k_1", {"deactivated_at": 1234})
    edited = await keys.edit("k_2", lambda record: {"rpm": 5})
    assert first["updated_at"] < added["updated_at"] < deactivated["updated_at"] < edited["updated_at"]
    assert [k["id"] for k in await keys.changed_since(first["updated_at"] - 5)] == ["k_1", "k_2"]


@pytest_twisted.ensureDeferred
async def test_a_key_is_deactivated_once_whatever_deactivates_it_at_once(store):
    """C{deactivate} is one conditional write: of two made at once the one the store runs first sets
    C{deactivated_at} and the other answers the key as it is, its time and C{updated_at} kept (before, the admin API
    read the key then updated it, and a second deactivation meanwhile overwrote the first's time); an unknown key is
    None. (PostgreSQL's pool may run either first.)"""
    keys = store.keys
    await keys.add(key("k_1"))
    first, second = await gatherResults([keys.deactivate("k_1", 100), keys.deactivate("k_1", 200)])
    assert first["deactivated_at"] == second["deactivated_at"] in (100, 200)
    assert first["updated_at"] == second["updated_at"]
    again = await keys.deactivate("k_1", 300)
    assert (again["deactivated_at"], again["updated_at"]) == (first["deactivated_at"], first["updated_at"])
    assert [k["id"] for k in await keys.changed_since(first["updated_at"])] == []
    assert await keys.deactivate("k_none", 100) is None


@pytest_twisted.ensureDeferred
async def test_budgets_are_put_replaced_and_deleted(store):
    budgets = store.budgets
    verifyObject(IBudgetStore, budgets)
    put = await budgets.put("/team/b", "daily", 100, None)
    assert (put["user_path"], put["period"], put["max_tokens"], put["max_cost"]) == ("/team/b", "daily", 100, None)
    await budgets.put("/team/a", "monthly", None, 2.5)
    await budgets.put("/team/b", "daily", 200, 1.0)
    assert [(b["user_path"], b["period"], b["max_tokens"], b["max_cost"]) for b in await budgets.list()] == [
        ("/team/a", "monthly", None, 2.5), ("/team/b", "daily", 200, 1.0)]
    assert await budgets.delete("/team/a", "monthly") is True
    assert await budgets.delete("/team/a", "monthly") is False
    assert len(await budgets.list()) == 1


@pytest_twisted.ensureDeferred
async def test_budget_resets_are_kept_per_path_and_period_the_last_one_each(store):
    budgets = store.budgets
    assert await budgets.resets() == {}
    first = await budgets.reset([("/team", "daily"), ("/", "monthly")])
    assert await budgets.resets() == {("/team", "daily"): first, ("/", "monthly"): first}
    second = await budgets.reset([("/team", "daily")])
    assert second >= first and await budgets.resets() == {("/team", "daily"): second, ("/", "monthly"): first}


@pytest_twisted.ensureDeferred
async def test_a_key_is_edited_on_its_record_as_stored_one_edit_after_the_other(store):
    """C{edit} reads, changes and writes the record in one transaction: edits made at once each see the one
    before (a budget reset and a PATCH of the budgets lose neither), and what the change raises is the failure."""
    keys = store.keys
    await keys.add(key("k_1", budgets=[]))

    def adding(period):
        return lambda record: {"budgets": record["budgets"] + [{"period": period, "max_tokens": 1}]}

    periods = ["hourly", "daily", "weekly", "monthly", "total"]
    edited = await gatherResults([keys.edit("k_1", adding(period)) for period in periods])
    assert all(record["id"] == "k_1" for record in edited)
    assert sorted(item["period"] for item in (await keys.get("k_1"))["budgets"]) == sorted(periods)
    assert await keys.edit("k_none", adding("daily")) is None

    def refusing(record):
        raise LookupError("no")

    with pytest.raises(LookupError):
        await keys.edit("k_1", refusing)
    assert len((await keys.get("k_1"))["budgets"]) == 5


@pytest_twisted.ensureDeferred
async def test_a_keys_budget_resets_are_kept_apart_from_its_budgets(store):
    """A key's C{budget_resets} (period -> its last reset) is kept whatever its budgets are ({} until one)."""
    keys = store.keys
    assert (await keys.add(key("k_1")))["budget_resets"] == {}
    changed = await keys.update("k_1", {"budgets": [], "budget_resets": {"daily": 1234.5}})
    assert (changed["budgets"], changed["budget_resets"]) == ([], {"daily": 1234.5})
    assert (await keys.get("k_1"))["budget_resets"] == {"daily": 1234.5}
