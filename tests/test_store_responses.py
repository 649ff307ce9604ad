"""IResponseStore contract (every backend)."""

import pytest_twisted
from zope.interface.verify import verifyObject

from gomodel.store import IResponseStore
from tests.stores import backend, store  # noqa: F401 (fixtures)


def record(**extra):
    return {"id": "resp_1", "provider": "vllm", "created_at": 100, "previous_response_id": None,
            "status": "queued", "input_items": [{"type": "message", "role": "user", "content": "é"}],
            "response": {"id": "resp_1", "status": "queued"}, **extra}


@pytest_twisted.ensureDeferred
async def test_whether_a_response_was_streamed_is_kept_and_read_back_in_its_chain(store):
    responses = store.responses
    await responses.put(record(streamed=True))
    responses.keep(record(id="resp_2", previous_response_id="resp_1", streamed=False))
    await responses.put(record(id="resp_3", previous_response_id="resp_2"))  # (not known: None)
    assert [(await responses.get(i))["streamed"] for i in ("resp_1", "resp_2", "resp_3")] == [True, False, None]
    assert [r["streamed"] for r in await responses.chain("resp_3")] == [False, True]


@pytest_twisted.ensureDeferred
async def test_whether_a_response_was_streamed_is_noted_where_it_was_not_known_alone(store):
    responses = store.responses
    await responses.put(record(streamed=None))  # (a row from before the column)
    await responses.put(record(id="resp_2", streamed=True))
    assert await responses.note_streamed("resp_1", False) is True
    assert await responses.note_streamed("resp_1", True) is False  # (known now: never changed)
    assert await responses.note_streamed("resp_2", False) is False
    assert await responses.note_streamed("resp_none", False) is False  # (not stored: nothing)
    assert [(await responses.get(i))["streamed"] for i in ("resp_1", "resp_2")] == [False, True]


@pytest_twisted.ensureDeferred
async def test_responses_are_kept_replaced_and_swept(store):
    responses = store.responses
    verifyObject(IResponseStore, responses)
    await responses.put(record())
    await responses.put(record(id="resp_2", created_at=200, previous_response_id="resp_1", replica=2))
    assert (await responses.get("resp_2"))["replica"] == 2 and (await responses.get("resp_1"))["replica"] is None
    await responses.put(record(status="completed", response={"id": "resp_1", "status": "completed"}))
    assert (await responses.get("resp_1"))["response"]["status"] == "completed"
    assert (await responses.get("resp_2"))["input_items"][0]["content"] == "é"
    assert await responses.delete_before(150) == 1
    assert await responses.get("resp_1") is None
    assert await responses.deleted("resp_1") is False  # (swept, not deleted)
    assert await responses.delete("resp_2") is True
    assert await responses.delete("resp_2") is False
    assert await responses.deleted("resp_2") is True and await responses.deleted("resp_nobody") is False


@pytest_twisted.ensureDeferred
async def test_a_deleted_response_is_remembered_until_the_retention_sweeps_past_it(store):
    responses = store.responses
    await responses.put(record())
    assert await responses.delete("resp_1") is True
    assert await responses.deleted("resp_1") is True
    assert await responses.delete_before(0) == 0 and await responses.deleted("resp_1") is True
    assert await responses.delete_before(4_000_000_000) == 0  # (its memory goes; no response counted)
    assert await responses.deleted("resp_1") is False


@pytest_twisted.ensureDeferred
async def test_a_swept_response_is_remembered_with_its_tenant_until_the_retention_sweeps_past_it(store):
    responses = store.responses
    await responses.put(record(tenant="path:/team"))
    await responses.put(record(id="resp_2", created_at=500))
    assert await responses.swept("resp_1") is None
    assert await responses.delete_before(150) == 1  # (swept now: at 1000 s)
    assert await responses.swept("resp_1") == {"id": "resp_1", "tenant": "path:/team"}
    assert await responses.swept("resp_2") is None and await responses.swept("resp_nobody") is None
    assert await responses.delete_before(999) == 1  # (resp_2: resp_1's memory, from 1000 s, stays)
    assert await responses.swept("resp_1") is not None and await responses.swept("resp_2") is not None
    assert await responses.delete_before(4_000_000_000) == 0  # (their memory goes; no response counted)
    assert await responses.swept("resp_1") is None and await responses.swept("resp_2") is None


@pytest_twisted.ensureDeferred
async def test_whether_a_response_follows_one_deleted_is_found_back_through_its_whole_chain(store):
    responses = store.responses
    for n in range(1, 5):  # resp_1 <- resp_2 <- resp_3 <- resp_4
        await responses.put(record(id=f"resp_{n}", previous_response_id=f"resp_{n - 1}" if n > 1 else None))
    await responses.put(record(id="resp_x", previous_response_id="resp_made_upstream"))  # (never stored here)
    assert [await responses.follows_deleted(f"resp_{n}") for n in range(1, 5)] == [False] * 4
    assert await responses.follows_deleted("resp_x") is False
    assert await responses.follows_deleted("resp_nobody") is False
    assert await responses.delete("resp_2") is True
    assert [await responses.follows_deleted(f"resp_{n}") for n in (1, 3, 4)] == [False, True, True]
    await responses.put(record(id="resp_loop", previous_response_id="resp_loop"))  # (ends: no walk for ever)
    assert await responses.follows_deleted("resp_loop") is False


@pytest_twisted.ensureDeferred
async def test_the_turns_a_response_follows_are_read_at_once_nearest_first_up_to_a_turn_not_stored(store):
    """One read for a whole conversation (before: one per turn, and a turn not stored looked for again for up to
    MISS_GRACE as if it were being written)."""
    responses = store.responses
    for n in range(1, 6):  # resp_1 <- ... <- resp_5; resp_1 follows one made upstream
        await responses.put(record(id=f"resp_{n}", previous_response_id=f"resp_{n - 1}" if n > 1 else "resp_up",
                                   input_items=[{"type": "message", "role": "user", "content": f"t{n}"}]))
    chain = await responses.chain("resp_5")
    assert [r["id"] for r in chain] == ["resp_4", "resp_3", "resp_2", "resp_1"]
    assert chain[0]["input_items"][0]["content"] == "t4" and chain[0]["response"] == {"id": "resp_1",
                                                                                         "status": "queued"}
    assert await responses.chain("resp_1") == [] and await responses.chain("resp_nobody") == []
    await responses.delete("resp_2")
    assert [r["id"] for r in await responses.chain("resp_5")] == ["resp_4", "resp_3"]


@pytest_twisted.ensureDeferred
async def test_an_update_replaces_a_stored_response_and_never_stores_a_deleted_one_again(store):
    responses = store.responses
    await responses.put(record(tenant="key:a", replica=1))
    assert await responses.update("resp_1", "completed", {"id": "resp_1", "status": "completed", "t": "é"},
                                  "key:a") is True
    # (another tenant's response of that id, or one of none, never replaces it)
    assert await responses.update("resp_1", "failed", {"id": "resp_1", "status": "failed"}, "key:b") is False
    assert await responses.update("resp_1", "failed", {"id": "resp_1", "status": "failed"}) is False
    updated = await responses.get("resp_1")
    assert (updated["status"], updated["response"], updated["tenant"], updated["replica"]) == (
        "completed", {"id": "resp_1", "status": "completed", "t": "é"}, "key:a", 1)
    assert await responses.delete("resp_1") is True
    assert await responses.update("resp_1", "completed", {"id": "resp_1", "status": "completed"}, "key:a") is False
    assert await responses.get("resp_1") is None


@pytest_twisted.ensureDeferred
async def test_kept_responses_are_seen_by_the_next_read_and_failures_are_logged(store, logged_errors):
    kept = record(id="resp_k", status="completed", response={"id": "resp_k"},
                  response_json=b'{"id":"resp_k","status":"completed","output_text":"\xc3\xa9"}')
    assert store.responses.keep(kept) is None  # nothing to wait for
    assert (await store.responses.get("resp_k"))["response"]["output_text"] == "é"  # the upstream's bytes
    broken = dict(kept, id="resp_broken")
    del broken["provider"]
    store.responses.keep(broken)
    store.responses.keep(dict(kept, id="resp_after"))  # written with it: the broken one loses it nothing
    assert (await store.responses.get("resp_after"))["id"] == "resp_after"  # after the failure was logged
    assert await store.responses.get("resp_broken") is None
    assert logged_errors.flush(KeyError) == 1


@pytest_twisted.ensureDeferred
async def test_responses_kept_together_are_all_written_and_the_last_of_an_id_stays(store):
    for i in range(300):
        store.responses.keep(record(id=f"resp_{i}", response={"id": f"resp_{i}", "n": i}, tenant="key:a"))
    store.responses.keep(record(id="resp_7", status="completed", response={"id": "resp_7", "n": "again"},
                                tenant="key:b"))
    for i in (0, 7, 128, 299):
        kept = await store.responses.get(f"resp_{i}")
        assert kept["response"]["n"] == i
    again = await store.responses.get("resp_7")
    # as if written in turn: another tenant's write of an id leaves the stored one as it was (before: it kept
    # its owner and took the other tenant's content)
    assert again["status"] == "queued" and again["response"]["n"] == 7 and again["tenant"] == "key:a"


@pytest_twisted.ensureDeferred
async def test_a_response_written_again_replaces_its_tenants_own_and_never_another_tenants(store):
    """An upstream that answers one id to two tenants (or the master key's chosen C{request_id}) no longer gives
    the second's content to the first's stored response (before: its owner kept, its content the other's)."""
    responses = store.responses
    await responses.put(record(tenant="key:a", response={"id": "resp_1", "who": "a"}))
    for tenant in ("key:b", None):
        await responses.put(record(tenant=tenant, status="completed", response={"id": "resp_1", "who": tenant}))
        kept = await responses.get("resp_1")
        assert (kept["tenant"], kept["status"], kept["response"]) == ("key:a", "queued", {"id": "resp_1", "who": "a"})
    await responses.put(record(tenant="key:a", status="completed", response={"id": "resp_1", "who": "a2"}))
    assert (await responses.get("resp_1"))["response"]["who"] == "a2"  # its own tenant's replaces it
    await responses.put(record(id="resp_m", tenant=None))
    await responses.put(record(id="resp_m", tenant=None, status="completed"))  # (the master key's: none and none)
    assert (await responses.get("resp_m"))["status"] == "completed"
