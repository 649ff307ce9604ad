"""IBackgroundWatches contract: every backend (see tests/stores.py)."""

import pytest_twisted
from zope.interface.verify import verifyObject

from gomodel.store.interfaces import IBackgroundWatches
from tests.stores import backend, store  # noqa: F401 (fixtures)


def watch(response_id, since=1000.0, key_id="key-1"):
    return {"id": response_id, "request_id": "req-" + response_id, "key_id": key_id, "user_path": "/team/a",
            "provider": "vllm", "replica": 1, "response": {"id": response_id, "status": "queued", "model": "m"},
            "since": since}


@pytest_twisted.ensureDeferred
async def test_watches_are_adopted_once_their_lease_ran_out_and_settled_once(store):
    watches = store.background
    verifyObject(IBackgroundWatches, watches)
    await watches.add(watch("resp_a"), "one", 60)
    await watches.add(watch("resp_b", since=1001.0, key_id="master"), "one", 60)
    await watches.add(watch("resp_a"), "two", 60)  # kept once: the first watcher keeps it
    assert await watches.adopt("two", 60) == []  # leases running
    store.clock.advance(50)
    await watches.renew("one", 60)  # until 1110
    store.clock.advance(50)
    assert await watches.adopt("two", 60) == []
    store.clock.advance(11)
    adopted = await watches.adopt("two", 60, limit=1)
    assert adopted == [watch("resp_a")]  # the oldest first, as it was added
    assert [w["id"] for w in await watches.adopt("two", 60)] == ["resp_b"]
    assert await watches.adopt("three", 60) == []  # two's now
    await watches.release("two")  # (a process stopping): any process may take them at once
    assert sorted(w["id"] for w in await watches.adopt("three", 60)) == ["resp_a", "resp_b"]
    assert await watches.settle("resp_a") is True
    assert await watches.settle("resp_a") is False  # charged once, whoever finds it over
    store.clock.advance(61)
    assert [w["id"] for w in await watches.adopt("four", 60)] == ["resp_b"]
