"""IBatchStore contract (every backend): conditional updates, exactly-once results, claims and fencing."""

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from gomodel.store import IBatchStore, LeaseLost
from tests.stores import backend, batch, put_blob, store  # noqa: F401 (fixtures)


@pytest_twisted.ensureDeferred
async def test_batch_updates_are_conditional(store):
    batches = store.batches
    verifyObject(IBatchStore, batches)
    await batches.add(batch("batch_1", status="validating", metadata={"k": "v"}))
    assert (await batches.get("batch_1"))["metadata"] == {"k": "v"}
    assert await batches.update("batch_1", {"status": "cancelling"}, only_if_status=("in_progress",)) is None
    moved = await batches.update("batch_1", {"status": "in_progress", "in_progress_at": 5, "total": 3},
                                 only_if_status=("validating",))
    assert (moved["status"], moved["in_progress_at"], moved["total"]) == ("in_progress", 5, 3)
    await batches.add(batch("batch_2", status="completed"))
    await batches.add(batch("batch_3", status="cancelling"))
    assert [b["id"] for b in await batches.unfinished()] == ["batch_1", "batch_3"]
    page = await batches.list(limit=2)
    assert ([b["id"] for b in page[0]], page[1]) == (["batch_3", "batch_2"], True)
    page = await batches.list(after="batch_2")
    assert ([b["id"] for b in page[0]], page[1]) == (["batch_1"], False)
    assert await batches.get("batch_none") is None


@pytest_twisted.ensureDeferred
async def test_duplicates_are_the_requests_whose_custom_id_an_earlier_line_has(store):
    """The store's check of a batch's custom_ids (one too large to hold them in memory): each request past the
    first of its custom_id, in line order, up to a limit; another batch's are not counted."""
    batches = store.batches
    for batch_id in ("batch_1", "batch_2"):
        await batches.add(batch(batch_id, status="validating"))
    _, token = await batches.claim("batch_1", "me", 30)
    long = "é" * 300
    rows = [(n, cid, b"{}") for n, cid in ((1, "a"), (2, "b"), (4, "a"), (5, "c"), (7, "b"), (8, "a"), (9, long),
                                           (10, long[:-1] + "x"), (11, long))]
    await batches.add_requests("batch_1", rows, token)
    _, other = await batches.claim("batch_2", "me", 30)
    await batches.add_requests("batch_2", [(1, "c", b"{}"), (2, "d", b"{}")], other)
    assert await batches.duplicates("batch_1", 10) == [(4, "a"), (7, "b"), (8, "a"), (11, long[:257])]
    assert await batches.duplicates("batch_1", 2) == [(4, "a"), (7, "b")]
    assert await batches.duplicates("batch_2", 10) == []


@pytest_twisted.ensureDeferred
async def test_each_line_is_recorded_and_counted_exactly_once(store):
    batches = store.batches
    await batches.add(batch("batch_1", total=4))
    _, token = await batches.claim("batch_1", "me", 30)
    await batches.add_requests("batch_1", [(n, f"c{n}", b'{"model":"m"}') for n in (1, 2, 3, 5)], token)
    assert [r[0] for r in await batches.pending("batch_1", 0, 10)] == [1, 2, 3, 5]
    assert await batches.record_results("batch_1", [(2, "c2", True, b'{"ok":2}'), (3, "c3", False, b'{"e":3}')],
                                        token) == 2
    # The same lines again (an answer that arrived twice around a restart) change nothing.
    assert await batches.record_results("batch_1", [(2, "c2", False, b'{"other":2}')], token) == 0
    record = await batches.get("batch_1")
    assert (record["completed"], record["failed"]) == (1, 1)
    assert [r[0] for r in await batches.pending("batch_1", 0, 10)] == [1, 5]
    assert [r[0] for r in await batches.pending("batch_1", 1, 10)] == [5]
    await batches.record_results("batch_1", [(5, "c5", True, b'{"ok":5}'), (1, "c1", True, b'{"ok":1}')], token)
    assert [(r[0], r[3]) for r in await batches.read_results("batch_1", -1, 10)] == [
        (1, b'{"ok":1}'), (2, b'{"ok":2}'), (3, b'{"e":3}'), (5, b'{"ok":5}')]
    assert [r[0] for r in await batches.read_results("batch_1", -1, 10, ok=False)] == [3]
    assert [r[0] for r in await batches.read_results("batch_1", 1, 10, ok=True)] == [2, 5]

    await put_blob(store.blobs, "file-out", b'{"ok":1}\n')
    files = {"output": ("file-out", 9), "error": None}
    assert await batches.finalize("batch_1", {"status": "completed"}, files, only_if_status=("finalizing",)) is None
    assert await store.files.get("file-out") is None  # nothing registered for a refused finalize
    done = await batches.finalize("batch_1", {"status": "completed", "completed_at": 9}, files,
                                  only_if_status=("in_progress",), token=token)
    assert (done["status"], done["completed_at"], done["output_file_id"], done["error_file_id"]) == (
        "completed", 9, "file-out", None)
    output = await store.files.get("file-out")
    assert (output["purpose"], output["filename"], output["bytes"]) == ("batch_output", "batch_1_output.jsonl", 9)
    assert await batches.pending("batch_1", 0, 10) == []  # requests dropped once final


@pytest_twisted.ensureDeferred
async def test_requests_and_results_are_read_a_bounded_number_of_bytes_at_a_time(store):
    """C{max_bytes}: a page of requests or results takes rows while their bodies hold at most that many bytes
    together (the first row always, however large), so that a batch of large lines (long documents to embed,
    their vectors) is never held a whole page of them at once."""
    batches = store.batches
    await batches.add(batch("batch_1", total=6))
    _, token = await batches.claim("batch_1", "me", 30)
    sizes = {1: 40, 2: 40, 3: 30, 4: 120, 5: 10, 6: 10}

    async def pages(read):
        found, after = [], 0
        while True:
            rows = await read(after)
            if not rows:
                return found
            found.append([r[0] for r in rows])
            after = rows[-1][0]

    await batches.add_requests("batch_1", [(n, f"c{n}", b"b" * size) for n, size in sizes.items()], token)
    assert await pages(lambda after: batches.pending("batch_1", after, 10, max_bytes=100)) == [
        [1, 2], [3], [4], [5, 6]]
    assert [r[0] for r in await batches.pending("batch_1", 0, 3, max_bytes=1000)] == [1, 2, 3]  # (the limit too)
    assert len(await batches.pending("batch_1", 0, 10)) == 6  # (no max_bytes: no bound)
    await batches.record_results("batch_1", [(n, f"c{n}", n != 3, b"r" * size) for n, size in sizes.items()],
                                 token)
    assert await pages(lambda after: batches.read_results("batch_1", after, 10, max_bytes=100)) == [
        [1, 2], [3], [4], [5, 6]]
    assert await pages(lambda after: batches.read_results("batch_1", after, 10, ok=True, max_bytes=100)) == [
        [1, 2], [4], [5, 6]]
    assert [r[0] for r in await batches.read_results("batch_1", 0, 2, max_bytes=1000)] == [1, 2]
    assert len(await batches.read_results("batch_1", 0, 10)) == 6


@pytest_twisted.ensureDeferred
async def test_a_batchs_output_files_expire_as_its_output_expires_after_says(store):
    for batch_id, expiry in (("batch_1", 7200), ("batch_2", None)):
        await store.batches.add(batch(batch_id, status="finalizing", output_expires_after=expiry))
        await put_blob(store.blobs, f"file-out-{batch_id}", b'{"ok":1}\n')
        await put_blob(store.blobs, f"file-err-{batch_id}", b'{"e":1}\n')
        await store.batches.finalize(batch_id, {"status": "completed"}, {
            "output": (f"file-out-{batch_id}", 9), "error": (f"file-err-{batch_id}", 8)})
        for file_id in (f"file-out-{batch_id}", f"file-err-{batch_id}"):
            written = await store.files.get(file_id)
            assert written["expires_at"] == (None if expiry is None else written["created_at"] + expiry)
    assert (await store.batches.get("batch_1"))["output_expires_after"] == 7200


@pytest_twisted.ensureDeferred
async def test_claims_lease_fence_and_take_over(store):
    batches = store.batches
    await batches.add(batch("batch_a", status="validating"))
    await batches.add(batch("batch_b"))
    await batches.add(batch("batch_done", status="completed"))
    record, a = await batches.claim_next("p1", 30)
    assert record["id"] == "batch_a"
    assert await batches.claim("batch_a", "p2", 30) is None  # leased
    assert (await batches.claim_next("p2", 30))[0]["id"] == "batch_b"
    assert await batches.claim_next("p3", 30) is None  # all held
    assert await batches.claim("batch_done", "p3", 30) is None  # finished
    await batches.add_requests("batch_a", [(1, "c1", b"{}"), (2, "c2", b"{}")], a)
    store.clock.advance(20)
    assert await batches.renew("batch_a", "p1", a, 30) is True
    store.clock.advance(31)  # p1 died: its lease ran out
    record, a2 = await batches.claim_next("p3", 30, exclude=("batch_b",))
    assert (record["id"], a2 > a) == ("batch_a", True)
    assert await batches.renew("batch_a", "p1", a, 30) is False
    with pytest.raises(LeaseLost):  # a writer with a stale token records nothing
        await batches.record_results("batch_a", [(1, "c1", True, b"late")], a)
    with pytest.raises(LeaseLost):
        await batches.add_requests("batch_a", [(3, "c3", b"{}")], a)
    assert await batches.update("batch_a", {"status": "in_progress"}, token=a) is None
    assert await batches.record_results("batch_a", [(1, "c1", True, b"new")], a2) == 1
    assert [r[3] for r in await batches.read_results("batch_a", -1, 10)] == [b"new"]
    # A release with a backoff: nobody (not even the releaser) claims it before the delay.
    await batches.release("batch_a", "p3", a2, delay=10)
    assert await batches.claim("batch_a", "p3", 30) is None
    assert (await batches.claim_next("p4", 30, exclude=("batch_b",))) is None
    store.clock.advance(11)
    assert (await batches.claim("batch_a", "p4", 30))[1] > a2


@pytest_twisted.ensureDeferred
async def test_leases_of_owners_known_to_be_gone_are_taken_at_once(store):
    batches = store.batches
    await batches.add(batch("batch_a"))
    _, token = await batches.claim("batch_a", "crashed", 30)
    assert await batches.holders() == {"crashed"}
    assert await batches.claim_next("me", 30) is None
    record, taken = await batches.claim_next("me", 30, gone=("crashed",))
    assert (record["id"], taken > token) == ("batch_a", True)


@pytest_twisted.ensureDeferred
async def test_a_busy_claimer_takes_only_batches_free_for_long_enough(store):
    """C{free_for}: how long a batch has been free counts from its creation, its release or its lease's end."""
    batches, clock = store.batches, store.clock
    await batches.add(batch("batch_a"))  # free since 1000
    assert await batches.claim_next("busy", 30, free_for=5) is None  # fresh: left to idler claimers
    clock.advance(4.5)
    assert await batches.claim_next("busy", 30, free_for=5) is None
    clock.advance(0.5)
    record, first = await batches.claim_next("busy", 30, free_for=5)
    assert record["id"] == "batch_a"
    await batches.release("batch_a", "busy", first)  # free since 1005
    assert await batches.claim_next("busy", 30, free_for=2) is None
    record, second = await batches.claim_next("idle", 30)  # an idle claimer takes it at once
    assert (record["id"], second > first) == ("batch_a", True)
    clock.advance(31)  # idle's lease ran out at 1035: free since then
    assert await batches.claim_next("busy", 30, free_for=2) is None
    assert (await batches.claim_next("busy", 30, free_for=2, gone=("idle",)))[0]["id"] == "batch_a"  # gone: at once
    await batches.add(batch("batch_b"))
    await batches.release("batch_a", "busy", second + 1, delay=3)  # a backoff: free from 1039
    clock.advance(3)
    assert await batches.claim_next("p", 30, free_for=1, exclude=("batch_b",)) is None
    clock.advance(1)
    assert (await batches.claim_next("p", 30, free_for=1))[0]["id"] == "batch_a"  # the oldest first
    assert (await batches.claim_next("p", 30, free_for=1))[0]["id"] == "batch_b"  # added at 1036
    assert await batches.holders() == {"p"}


@pytest_twisted.ensureDeferred
async def test_a_tenants_listing_takes_only_its_own_batches_as_cursor(store):
    for batch_id, tenant in (("batch_a", "path:/a"), ("batch_b", "path:/b")):
        await store.batches.add(batch(batch_id, tenant=tenant))
    assert await store.batches.list(after="batch_b", tenant="path:/a") == ([], False)  # as an unknown id
    # Several tenants (a key's team's and its own): theirs, each a cursor.
    await store.batches.add(batch("batch_c", tenant="key:k"))
    both = ("path:/a", "key:k")
    assert [b["id"] for b in (await store.batches.list(tenant=both))[0]] == ["batch_c", "batch_a"]
    assert [b["id"] for b in (await store.batches.list(after="batch_c", tenant=both))[0]] == ["batch_a"]
    assert await store.batches.list(after="batch_b", tenant=both) == ([], False)
    assert [r["id"] for r in (await store.batches.list(after="batch_b"))[0]] == ["batch_a"]


@pytest_twisted.ensureDeferred
async def test_a_store_down_is_logged_once_a_streak_of_failed_claim_renewals(reactor):
    from types import SimpleNamespace

    from twisted.internet.task import Clock
    from twisted.logger import LogLevel, Logger

    from gomodel.batches.claiming import ClaimLoop
    from tests.stores import down_postgresql

    down = await down_postgresql(reactor)
    try:
        jobs = {f"batch_{i}": SimpleNamespace(batch_id=f"batch_{i}", token="t", stop=None) for i in range(2)}
        loop = ClaimLoop(down.batches, Clock(), "host:1", 30.0, 0, jobs, None)
        events = []
        loop.log = Logger(observer=events.append)
        for _ in range(3):  # three heartbeats of two batches each: six renewals failed
            await loop._heartbeat()
        [warning] = events
        assert warning["log_level"] == LogLevel.warn and "not repeated" in warning["log_format"]
        assert "127.0.0.1" not in str(warning)  # no host in a log line
    finally:
        await down.stopService()


@pytest_twisted.ensureDeferred
async def test_a_listing_of_one_kind_and_an_ended_batch_forgotten(store):
    """Message batches are listed apart (their kind, not their endpoint: an OpenAI batch may have theirs), and
    deleted once ended with their requests and results (Anthropic's Message Batches API:
    gomodel.anthropic.batches)."""
    batches = store.batches
    for batch_id, kind in (("batch_1", "message_batch"), ("batch_2", None), ("batch_3", "message_batch"),
                           ("batch_4", "batch")):
        await batches.add(batch(batch_id, endpoint="/v1/messages", tenant="t", **({"kind": kind} if kind else {})))
    assert (await batches.get("batch_2"))["kind"] == "batch"  # (the default)
    page = await batches.list(kind="message_batch")
    assert [b["id"] for b in page[0]] == ["batch_3", "batch_1"]
    assert [b["id"] for b in (await batches.list(kind="message_batch", after="batch_3", tenant="t"))[0]] == [
        "batch_1"]
    assert (await batches.list(kind="message_batch", after="batch_2"))[0] == []  # (a cursor of another kind)
    assert [b["id"] for b in (await batches.list(kind="batch", after="batch_4"))[0]] == ["batch_2"]
    assert (await batches.list(kind="message_batch", tenant="u"))[0] == []
    _, token = await batches.claim("batch_1", "me", 30)
    await batches.add_requests("batch_1", [(1, "c1", b"{}"), (2, "c2", b"{}")], token)
    await batches.record_results("batch_1", [(1, "c1", True, b'{"ok":1}')], token)
    assert await batches.delete("batch_1", ("completed",)) is None  # still in progress: kept
    await batches.update("batch_1", {"status": "completed"})
    deleted = await batches.delete("batch_1", ("completed", "cancelled"))
    assert (deleted["id"], deleted["input_file_id"]) == ("batch_1", "file-x")
    assert await batches.get("batch_1") is None
    assert await batches.read_results("batch_1", -1, 10) == [] and await batches.pending("batch_1", 0, 10) == []
    assert await batches.delete("batch_1", ("completed",)) is None
    assert [b["id"] for b in (await batches.list())[0]] == ["batch_4", "batch_3", "batch_2"]
