"""The SQLite store: schema and migrations, files, batches, exactly-once results, the start-up sweep."""

import os
import sqlite3

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from gomodel.errors import StorageUnavailable
from gomodel.store import IStore, SQLiteStore
from gomodel.store.sqlite import MIGRATIONS


async def opened(reactor, path, **kwargs):
    store = SQLiteStore(str(path), reactor, **kwargs)
    store.startService()
    await store.started()
    return store


@pytest_twisted.async_yield_fixture()
async def store(reactor, tmp_path):
    s = await opened(reactor, tmp_path)
    yield s
    await s.stopService()


async def add_file(store, content=b"x\n", filename="f.jsonl", purpose="batch"):
    os.makedirs(store.spool_dir, exist_ok=True)
    path = os.path.join(store.spool_dir, "upload")
    with open(path, "wb") as f:
        f.write(content)
    return await store.add_file(path, filename, purpose)


def batch(batch_id, status="in_progress", **extra):
    return {"id": batch_id, "endpoint": "/v1/chat/completions", "input_file_id": "file-x", "completion_window": "24h",
            "status": status, "created_at": 100, "expires_at": 100 + 86400, **extra}


@pytest_twisted.ensureDeferred
async def test_schema_is_created_versioned_and_kept(reactor, tmp_path):
    first = await opened(reactor, tmp_path)
    verifyObject(IStore, first)
    record = await add_file(first)
    await first.add_batch(batch("batch_1", metadata={"k": "v"}))
    await first.stopService()
    with sqlite3.connect(tmp_path / "gomodel.db") as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(MIGRATIONS[-1][0],)]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"schema_version", "files", "batches", "batch_requests", "batch_results"} <= tables
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    again = await opened(reactor, tmp_path)  # migrations are not applied twice
    try:
        assert await again.get_file(record["id"]) == record
        assert (await again.get_batch("batch_1"))["metadata"] == {"k": "v"}
    finally:
        await again.stopService()


@pytest_twisted.ensureDeferred
async def test_a_database_from_a_newer_gateway_is_refused(reactor, tmp_path, logged_errors):
    first = await opened(reactor, tmp_path)
    await first.stopService()
    with sqlite3.connect(tmp_path / "gomodel.db") as conn:
        conn.execute("UPDATE schema_version SET version = 999")
    store = SQLiteStore(str(tmp_path), reactor)
    store.startService()
    try:
        with pytest.raises(StorageUnavailable) as raised:
            await store.started()
        assert "999" in raised.value.message
        with pytest.raises(StorageUnavailable):
            await store.get_file("file-x")
    finally:
        await store.stopService()
    assert logged_errors.flush(RuntimeError) == 1


@pytest_twisted.ensureDeferred
async def test_files_are_listed_paged_read_and_deleted(store):
    a = await add_file(store, b"first\n", "a.jsonl")
    b = await add_file(store, b"second\n", "b.txt", "user_data")
    c = await add_file(store, b"third\n", "c.jsonl")
    assert (a["bytes"], a["filename"], a["purpose"], a["status"], a["expires_at"]) == (6, "a.jsonl", "batch",
                                                                                    "processed", None)
    ids = lambda page: [r["id"] for r in page[0]]  # noqa: E731
    assert ids(await store.list_files()) == [c["id"], b["id"], a["id"]]
    assert ids(await store.list_files(order="asc")) == [a["id"], b["id"], c["id"]]
    assert ids(await store.list_files(purpose="batch")) == [c["id"], a["id"]]
    page = await store.list_files(limit=2)
    assert (ids(page), page[1]) == ([c["id"], b["id"]], True)
    page = await store.list_files(limit=2, after=b["id"])
    assert (ids(page), page[1]) == ([a["id"]], False)
    assert ids(await store.list_files(after=a["id"], order="asc")) == [b["id"], c["id"]]
    assert await store.list_files(after="file-unknown") == ([], False)

    handle, size = await store.open_file(b["id"])
    with handle:
        assert (handle.read(), size) == (b"second\n", 7)
    assert await store.delete_file(b["id"]) is True
    assert await store.delete_file(b["id"]) is False
    assert await store.get_file(b["id"]) is None
    assert await store.open_file(b["id"]) is None
    assert not os.path.exists(os.path.join(store.files_dir, b["id"]))


@pytest_twisted.ensureDeferred
async def test_lines_are_read_in_slices_and_over_long_lines_are_skipped(store):
    record = await add_file(store, b"one\r\n" + b"L" * 100 + b"\ntwo\n\nlast-without-newline")
    lines, offset = await store.read_lines(record["id"], 0, 2, 50)
    assert lines == [b"one", None]
    lines, offset = await store.read_lines(record["id"], offset, 10, 50)
    assert lines == [b"two", b"", b"last-without-newline"]
    assert offset is None
    assert await store.read_lines("file-missing", 0, 10, 50) is None


@pytest_twisted.ensureDeferred
async def test_batch_updates_are_conditional(store):
    await store.add_batch(batch("batch_1", status="validating"))
    assert await store.update_batch("batch_1", {"status": "cancelling"}, only_if_status=("in_progress",)) is None
    moved = await store.update_batch("batch_1", {"status": "in_progress", "in_progress_at": 5, "total": 3},
                                     only_if_status=("validating",))
    assert (moved["status"], moved["in_progress_at"], moved["total"]) == ("in_progress", 5, 3)
    await store.add_batch(batch("batch_2", status="completed"))
    await store.add_batch(batch("batch_3", status="cancelling"))
    assert [b["id"] for b in await store.unfinished_batches()] == ["batch_1", "batch_3"]
    page = await store.list_batches(limit=2)
    assert ([b["id"] for b in page[0]], page[1]) == (["batch_3", "batch_2"], True)
    page = await store.list_batches(after="batch_2")
    assert ([b["id"] for b in page[0]], page[1]) == (["batch_1"], False)


@pytest_twisted.ensureDeferred
async def test_each_line_is_recorded_and_counted_exactly_once(store):
    await store.add_batch(batch("batch_1", total=4))
    await store.add_batch_requests("batch_1", [(n, f"c{n}", b'{"model":"m"}') for n in (1, 2, 3, 5)])
    assert [r[0] for r in await store.pending_requests("batch_1", 0, 10)] == [1, 2, 3, 5]
    assert await store.record_results("batch_1", [(2, "c2", True, b'{"ok":2}'), (3, "c3", False, b'{"e":3}')]) == 2
    # The same lines again (an answer that arrived twice around a restart) change nothing.
    assert await store.record_results("batch_1", [(2, "c2", False, b'{"other":2}')]) == 0
    record = await store.get_batch("batch_1")
    assert (record["completed"], record["failed"]) == (1, 1)
    assert [r[0] for r in await store.pending_requests("batch_1", 0, 10)] == [1, 5]
    assert [r[0] for r in await store.pending_requests("batch_1", 1, 10)] == [5]
    await store.record_results("batch_1", [(5, "c5", True, b'{"ok":5}'), (1, "c1", True, b'{"ok":1}')])
    assert [(r[0], r[3]) for r in await store.read_results("batch_1", -1, 10)] == [
        (1, b'{"ok":1}'), (2, b'{"ok":2}'), (3, b'{"e":3}'), (5, b'{"ok":5}')]

    assert await store.finalize_batch("batch_1", {"status": "completed"}, only_if_status=("finalizing",)) is None
    assert sorted(os.listdir(store.files_dir)) == [".spool"]  # nothing written for a refused finalize
    done = await store.finalize_batch("batch_1", {"status": "completed", "completed_at": 9},
                                      only_if_status=("in_progress",))
    assert (done["status"], done["completed_at"]) == ("completed", 9)
    output = await store.get_file(done["output_file_id"])
    assert (output["purpose"], output["filename"]) == ("batch_output", "batch_1_output.jsonl")
    handle, _ = await store.open_file(done["output_file_id"])
    with handle:
        assert handle.read() == b'{"ok":1}\n{"ok":2}\n{"ok":5}\n'
    handle, _ = await store.open_file(done["error_file_id"])
    with handle:
        assert handle.read() == b'{"e":3}\n'
    assert await store.pending_requests("batch_1", 0, 10) == []  # requests dropped once final


@pytest_twisted.ensureDeferred
async def test_start_removes_leftovers_unless_told_not_to(reactor, tmp_path):
    first = await opened(reactor, tmp_path)
    kept = await add_file(first)
    await first.stopService()
    orphan = tmp_path / "files" / "file-orphan"  # written by a finalize that never committed
    orphan.write_bytes(b"x")
    old_upload = tmp_path / "files" / ".spool" / "old-run"
    old_upload.mkdir(parents=True)
    (old_upload / "upload.part").write_bytes(b"half")

    worker = await opened(reactor, tmp_path, sweep=False)
    await worker.stopService()
    assert orphan.exists() and old_upload.exists()

    primary = await opened(reactor, tmp_path)
    try:
        assert not orphan.exists() and not old_upload.exists()
        assert (tmp_path / "files" / kept["id"]).exists()
    finally:
        await primary.stopService()


@pytest_twisted.ensureDeferred
async def test_work_never_runs_on_the_reactor_thread(store):
    import threading

    seen = []
    original = store._get_file

    def spy(file_id):
        seen.append(threading.current_thread().name)
        return original(file_id)

    store._get_file = spy
    d = store.get_file("file-x")
    assert isinstance(d, Deferred)
    await d
    assert seen and all(name != threading.main_thread().name for name in seen)


@pytest_twisted.ensureDeferred
async def test_responses_are_kept_replaced_and_swept(store):
    record = {"id": "resp_1", "provider": "vllm", "created_at": 100, "previous_response_id": None,
              "status": "queued", "input_items": [{"type": "message", "role": "user", "content": "é"}],
              "response": {"id": "resp_1", "status": "queued"}}
    await store.put_response(record)
    await store.put_response(dict(record, id="resp_2", created_at=200, previous_response_id="resp_1"))
    await store.put_response(dict(record, status="completed", response={"id": "resp_1", "status": "completed"}))
    assert (await store.get_response("resp_1"))["response"]["status"] == "completed"
    assert (await store.get_response("resp_2"))["input_items"][0]["content"] == "é"
    assert await store.delete_responses_before(150) == 1
    assert await store.get_response("resp_1") is None
    assert await store.delete_response("resp_2") is True
    assert await store.delete_response("resp_2") is False


@pytest_twisted.ensureDeferred
async def test_kept_responses_are_seen_by_the_next_read_and_failures_are_logged(store, logged_errors):
    record = {"id": "resp_k", "provider": "vllm", "created_at": 100, "previous_response_id": None,
              "status": "completed", "input_items": [], "response": {"id": "resp_k", "status": "completed"},
              "response_json": b'{"id":"resp_k","status":"completed","output_text":"\xc3\xa9"}'}
    assert store.keep_response(record) is None  # nothing to wait for
    kept = await store.get_response("resp_k")  # queued behind the write
    assert kept["response"]["output_text"] == "é"  # the upstream's bytes, as they were

    broken = dict(record, id="resp_broken")
    del broken["provider"]
    store.keep_response(broken)
    await store.get_response("resp_k")  # answered after the failed write logged its failure
    assert logged_errors.flush(KeyError) == 1
