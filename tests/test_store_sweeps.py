"""Claimed jobs (gomodel/store/sweeps.py): the files sweep, safe with several processes on one data dir."""

import time

import pytest_twisted
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent

from gomodel.errors import StorageUnavailable
from gomodel.store.sweeps import StoreSweeper
from tests.stores import add_file, age, backend, put_blob, store, write_exists  # noqa: F401 (fixtures)


@pytest_twisted.ensureDeferred
async def test_sweep_removes_old_leftovers_only_and_one_process_at_a_time(store):
    clock = Clock()
    clock.advance(time.time())  # compared with the files' modification times
    blobs = store.blobs
    kept = await add_file(store, b"named by a record")
    await put_blob(blobs, "file-orphan", b"a finalize that never committed")
    await put_blob(blobs, "file-young-orphan", b"its record is being written right now")
    receiving = blobs.create()  # an upload another process is receiving (slowly)
    await receiving.write(b"first chunk")
    crashed = blobs.create()
    await crashed.write(b"cut short")
    hours_ago = time.time() - 7200
    for target in (kept["id"], "file-orphan", receiving, crashed):
        age(store, target, hours_ago)
    await receiving.write(b"second chunk")  # still arriving: young again

    first = StoreSweeper(store.files, blobs, store.claims, clock, "process-1", grace=3600)
    second = StoreSweeper(store.files, blobs, store.claims, clock, "process-2", grace=3600)
    token = await store.claims.claim("sweep:files", "process-2", 600)  # process 2 is sweeping
    assert await first.sweep() is None  # so process 1 skips its turn
    await store.claims.release("sweep:files", "process-2", token)
    assert await second.sweep() == (1, 1)
    assert await blobs.size("file-orphan") is None
    assert await blobs.size("file-young-orphan") is not None
    assert await blobs.size(kept["id"]) is not None
    assert write_exists(store, receiving) and not write_exists(store, crashed)
    assert await receiving.commit("file-received") == len(b"first chunksecond chunk")
    assert await first.sweep() == (0, 0)  # the claim was released: any process may sweep next


@pytest_twisted.ensureDeferred
async def test_a_sweep_while_the_store_is_unavailable_is_a_one_line_warning(logged_errors):
    class Unavailable:
        def claim(self, name, owner, lease):
            return fail(StorageUnavailable("The gateway's storage is unavailable (database is down)."))

    events = []
    sweeper = StoreSweeper(None, None, Unavailable(), Clock(), "process-1")
    sweeper.log = Logger(observer=events.append)
    assert await sweeper.sweep() is None
    [event] = events
    assert event["log_level"] == LogLevel.warn and "log_failure" not in event
    assert formatEvent(event) == ("sweeping the files' leftovers failed: "
                                  "The gateway's storage is unavailable (database is down).")


@pytest_twisted.ensureDeferred
async def test_an_expired_file_is_gone_at_once_and_swept_with_its_contents(store):
    await put_blob(store.blobs, "file-brief", b"an hour")
    brief = await store.files.add("file-brief", 7, "brief.jsonl", "batch", None, 3600)
    kept = await add_file(store, b"for good")
    assert brief["expires_at"] == brief["created_at"] + 3600 and kept["expires_at"] is None
    store.clock.advance(3599)
    assert (await store.files.get("file-brief"))["id"] == "file-brief"
    store.clock.advance(1)
    assert await store.files.get("file-brief") is None  # expired: no reader sees it before the sweep
    records, _ = await store.files.list()
    assert [r["id"] for r in records] == [kept["id"]]
    assert await store.files.expired() == ["file-brief"]
    sweeper = StoreSweeper(store.files, store.blobs, store.claims, store.clock, "process-1", grace=3600)
    await sweeper.sweep()
    assert await store.files.expired() == [] and await store.files.known(["file-brief"]) == set()
    assert await store.blobs.size("file-brief") is None and await store.blobs.size(kept["id"]) is not None


@pytest_twisted.ensureDeferred
async def test_the_sweep_drops_the_results_an_expired_batch_output_held(store):
    """A batch's output or error file that expired (its C{output_expires_after}) takes the results it held
    with it when it is swept: they are no longer kept in the store; before, every answer stayed there for good.
    A batch without an expiry keeps its results."""
    from tests.stores import batch

    for batch_id, expiry in (("batch_1", 3600), ("batch_2", None)):
        await store.batches.add(batch(batch_id, status="in_progress", total=2, output_expires_after=expiry))
        _, token = await store.batches.claim(batch_id, "me", 30)
        await store.batches.record_results(batch_id, [(1, "a", True, b'{"ok":1}'), (2, "b", False, b'{"e":2}')],
                                           token)
        for kind in ("out", "err"):
            await put_blob(store.blobs, f"file-{kind}-{batch_id}", b"{}\n")
        await store.batches.finalize(batch_id, {"status": "completed"}, {
            "output": (f"file-out-{batch_id}", 3), "error": (f"file-err-{batch_id}", 3)}, token=token)
    sweeper = StoreSweeper(store.files, store.blobs, store.claims, store.clock, "process-1", grace=3600,
                           batches=store.batches)
    store.clock.advance(3600)
    await sweeper.sweep()
    assert await store.batches.read_results("batch_1", -1, 10) == []
    assert [r[1] for r in await store.batches.read_results("batch_2", -1, 10)] == ["a", "b"]
    done = await store.batches.get("batch_1")
    assert (done["completed"], done["failed"]) == (1, 1)  # (its counts stay)


@pytest_twisted.ensureDeferred
async def test_an_expired_message_batch_error_file_leaves_its_requests_canceled_and_expired(store):
    """A message batch's error file that expired takes its errored answers, but not the results of its requests
    canceled or expired (no answer in them): its C{request_counts} are read from them, and would turn
    C{errored}. An OpenAI batch's go with the file, whatever they are."""
    from gomodel.batches.concluding import CANCELLED_CODE, EXPIRED_CODE
    from gomodel.batches.lines import error_line
    from gomodel.store.records import MESSAGE_BATCH, OPENAI_BATCH
    from tests.stores import batch

    rows = [(1, "errored", False, error_line("errored", "upstream_error", "refused")),
            (2, "canceled", False, error_line("canceled", CANCELLED_CODE, "cancelled")),
            (3, "expired", False, error_line("expired", EXPIRED_CODE, "expired")),
            (4, "tricky", False, error_line('"response":null,"error":{"code":"batch_cancelled"', "x", "y"))]
    for batch_id, kind in (("batch_m", MESSAGE_BATCH), ("batch_o", OPENAI_BATCH)):
        await store.batches.add(batch(batch_id, status="in_progress", total=4, output_expires_after=3600, kind=kind))
        _, token = await store.batches.claim(batch_id, "me", 30)
        await store.batches.record_results(batch_id, rows, token)
        await put_blob(store.blobs, f"file-err-{batch_id}", b"{}\n")
        await store.batches.finalize(batch_id, {"status": "cancelled"}, {"error": (f"file-err-{batch_id}", 3)},
                                     token=token)
    store.clock.advance(3600)
    await StoreSweeper(store.files, store.blobs, store.claims, store.clock, "process-1", grace=3600,
                       batches=store.batches).sweep()
    assert [r[1] for r in await store.batches.read_results("batch_m", -1, 10)] == ["canceled", "expired"]
    assert await store.batches.read_results("batch_o", -1, 10) == []


@pytest_twisted.ensureDeferred
async def test_dropping_a_files_results_reads_its_batch_and_its_results_only(store, tmp_path):
    """The files sweep (each expired output file) and a file's deletion drop the results it held: the batch that
    names it is found through an index and its results through their key, not by a scan of every batch and
    every result (before: both, half a second a file with 100,000 batches, on the SQLite store's one writer,
    1,000 files a sweep)."""
    import sqlite3

    from gomodel.store import SQLiteStore
    from gomodel.store.sqlite import batches as sqlite_batches
    from tests import postgres

    if isinstance(store, SQLiteStore):
        with sqlite3.connect(tmp_path / "gomodel.db") as conn:
            for sql in (sqlite_batches.FILE_BATCHES, sqlite_batches.DROP_RESULTS, sqlite_batches.DROP_ANSWERED):
                plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", (None,) * sql.count("?"))]
                assert plan and not [step for step in plan if step.startswith("SCAN")], (sql, plan)
    else:
        indexed = {row[0] for row in postgres.query(
            store.dbname, "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = i.indkey[0] WHERE i.indrelid = 'batches'::regclass")}
        assert {"output_file_id", "error_file_id"} <= indexed
