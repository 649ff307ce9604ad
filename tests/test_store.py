"""The SQLite store service: schema and migrations, an older database migrated forward, the store thread.

The behaviour of each aggregate is in the contract tests (tests/test_store_*.py).
"""

import sqlite3
import threading

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from zope.interface.verify import verifyObject

from gomodel.errors import RowsRejected, StorageUnavailable
from gomodel.store import IStoreService, SQLiteStore
from gomodel.store.interfaces import KEEP_DELAY
from gomodel.store.sqlite import MIGRATIONS
from gomodel.store.sqlite.service import DataDirUnusable
from tests.stores import add_file, batch
from tests.support import with_timeout


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


@pytest_twisted.ensureDeferred
async def test_schema_is_created_versioned_and_kept(reactor, tmp_path):
    first = await opened(reactor, tmp_path)
    verifyObject(IStoreService, first)
    record = await add_file(first)
    await first.batches.add(batch("batch_1", metadata={"k": "v"}))
    await first.stopService()
    with sqlite3.connect(tmp_path / "gomodel.db") as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(MIGRATIONS[-1][0],)]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"schema_version", "files", "batches", "batch_requests", "batch_results", "responses",
                "claims"} <= tables
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    again = await opened(reactor, tmp_path)  # migrations are not applied twice
    try:
        assert await again.files.get(record["id"]) == record
        assert (await again.batches.get("batch_1"))["metadata"] == {"k": "v"}
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
            await store.files.get("file-x")
    finally:
        await store.stopService()
    assert logged_errors.flush(RuntimeError) == 1


@pytest_twisted.ensureDeferred
async def test_a_database_of_the_previous_schema_is_migrated_forward(reactor, tmp_path):
    """A gomodel.db written before claims existed (schema 2) opens, keeps its rows and gains the new columns."""
    conn = sqlite3.connect(tmp_path / "gomodel.db", isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version (version) VALUES (2)")
        for version, statements in MIGRATIONS:
            if version <= 2:
                for statement in statements:
                    conn.execute(statement)
        conn.execute("INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, created_at) "
                     "VALUES ('batch_old', '/v1/chat/completions', 'file-x', '24h', 'in_progress', 5)")
        conn.execute("COMMIT")
    finally:
        conn.close()
    store = await opened(reactor, tmp_path)
    try:
        assert (await store.batches.get("batch_old"))["status"] == "in_progress"
        record, token = await store.batches.claim_next("me", 30)  # the old batch is claimable
        assert (record["id"], token) == ("batch_old", 1)
        assert await store.claims.claim("sweep:files", "me", 30) == 1
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_message_batchs_input_file_written_before_is_made_the_gateways_own(reactor, tmp_path):
    """Migration 13: a message batch's input file written with purpose C{batch} (before it was internal) gets
    purpose C{message_batch} (C{/v1/files} does not show it); an OpenAI batch's input file keeps its own.
    Migration 15: the message batch is of kind C{message_batch} (C{/v1/batches} does not show it), the OpenAI
    batch of kind C{batch}."""
    conn = sqlite3.connect(tmp_path / "gomodel.db", isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version (version) VALUES (12)")
        for version, statements in MIGRATIONS:
            if version <= 12:
                for statement in statements:
                    conn.execute(statement)
        for file_id, endpoint in (("file-m", "/v1/messages"), ("file-o", "/v1/chat/completions")):
            conn.execute("INSERT INTO files (id, bytes, created_at, filename, purpose) VALUES (?, 1, 5, 'in', 'batch')",
                         (file_id,))
            conn.execute("INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, created_at) "
                         "VALUES (?, ?, ?, '24h', 'in_progress', 5)", (f"batch_{file_id}", endpoint, file_id))
        conn.execute("COMMIT")
    finally:
        conn.close()
    store = await opened(reactor, tmp_path)
    try:
        assert (await store.files.get("file-m"))["purpose"] == "message_batch"
        assert (await store.files.get("file-o"))["purpose"] == "batch"
        assert (await store.batches.get("batch_file-m"))["kind"] == "message_batch"
        assert (await store.batches.get("batch_file-o"))["kind"] == "batch"
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_database_work_never_runs_on_the_reactor_thread(store):
    seen = []
    original = store.files._get

    def spy(*args):
        seen.append(threading.current_thread() is threading.main_thread())
        return original(*args)

    store.files._get = spy
    d = store.files.get("file-x")
    assert isinstance(d, Deferred)
    await d
    assert seen == [False]


@pytest_twisted.ensureDeferred
async def test_the_stores_connection_keeps_256_kib_of_page_cache(store):
    # SQLite's default, 2 MiB, grew every process as the usage ledger grew (a budget's sums are read every second)
    db = store._db
    assert await db.run(lambda: db.conn().execute("PRAGMA cache_size").fetchone()[0]) == -256


@pytest_twisted.ensureDeferred
async def test_a_write_nobody_waits_for_runs_in_order_and_a_failure_is_logged(store, logged_errors):
    db, ran = store._db, []

    def fail():
        ran.append("failed")
        raise ValueError("boom")

    assert db.call(fail, what="a test write") and db.call(ran.append, "after")
    await db.run(ran.append, "waited")  # the store thread takes its work in order
    assert ran == ["failed", "after", "waited"]
    # logged on the reactor thread, called from the store thread before the answer above was
    assert "a test write failed" in formatEvent(logged_errors[0]) and logged_errors.flush(ValueError) == 1


@pytest_twisted.ensureDeferred
async def test_a_stopped_store_answers_storage_unavailable(reactor, tmp_path):
    store = await opened(reactor, tmp_path)
    await store.stopService()
    for call in (store.files.get("file-x"), store.batches.unfinished(), store.responses.get("r"),
                 store.claims.claim("x", "me", 1), store.blobs.size("file-x")):
        with pytest.raises(StorageUnavailable):
            await call
    assert store.responses.keep({"id": "r"}) is None  # logged as a warning, nothing queued


def _critical_lines(events):
    return [formatEvent(e) for e in events if e.get("log_level") is not None and e["log_level"].name == "critical"]


@pytest.mark.parametrize("what", ["a regular file", "/dev/null"])
def test_a_data_dir_that_is_not_a_directory_stops_the_start_before_the_ports_are_bound(reactor, tmp_path, what,
                                                                                       monkeypatch):
    """The store's privilegedStartService runs before the listeners' (they are started after it)."""
    path = tmp_path / "data" if what == "a regular file" else "/dev/null"
    if what == "a regular file":
        path.write_text("not a directory")
    events = []
    monkeypatch.setattr(SQLiteStore, "log", Logger(observer=events.append))
    store = SQLiteStore(str(path), reactor)
    with pytest.raises(DataDirUnusable) as raised:
        store.privilegedStartService()
    assert raised.value.code == 1  # twistd exits with status 1, as for a port it cannot have
    assert str(raised.value) == f"cannot use GOMODEL_DATA_DIR {path}: it is not a directory"
    assert _critical_lines(events) == [str(raised.value)]


@pytest.mark.parametrize("root", [True, False])
@pytest.mark.parametrize("where", ["under a regular file", "/proc"])
def test_a_data_dir_that_cannot_be_made_stops_the_start(reactor, tmp_path, where, root, monkeypatch):
    """Made before the ports are bound, or, by root, once twistd switched to the user it runs as (--uid)."""
    if where == "/proc":
        path = "/proc/gomodel-nope"
    else:
        (tmp_path / "file").write_text("")
        path = str(tmp_path / "file" / "data")
    events = []
    monkeypatch.setattr(SQLiteStore, "log", Logger(observer=events.append))
    monkeypatch.setattr("os.geteuid", lambda: 0 if root else 1000)
    store = SQLiteStore(path, reactor)
    with pytest.raises(DataDirUnusable) as raised:
        store.privilegedStartService()  # as root, nothing is made yet
        assert root and not events
        store.startService()
    assert str(raised.value).startswith(f"cannot use GOMODEL_DATA_DIR {path}: cannot create it: ")
    assert _critical_lines(events) == [str(raised.value)]
    assert not store._db._threads.running  # nothing was started


@pytest_twisted.ensureDeferred
async def test_a_data_dir_is_made_at_start(reactor, tmp_path):
    store = await opened(reactor, tmp_path / "new" / "data")
    try:
        assert (tmp_path / "new" / "data" / "gomodel.db").is_file()
    finally:
        await store.stopService()


def _response(response_id, **extra):
    return {"id": response_id, "provider": "vllm", "created_at": 100, "previous_response_id": None,
            "status": "completed", "input_items": [], "response": {"id": response_id}, **extra}


def _stored_ids(path):
    """The ids in the responses table, read by a connection of its own (what is committed)."""
    conn = sqlite3.connect(path / "gomodel.db")
    try:
        return [row[0] for row in conn.execute("SELECT id FROM responses ORDER BY id")]
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_kept_responses_are_written_together_after_a_short_wait_and_at_stop(reactor, tmp_path, logged_errors):
    clock = Clock()
    store = await opened(reactor, tmp_path, clock=clock)
    try:
        store.responses.keep(_response("resp_a"))
        broken = _response("resp_broken")
        del broken["provider"]
        store.responses.keep(broken)
        store.responses.keep(_response("resp_b"))
        assert _stored_ids(tmp_path) == []  # held, one timer for all three
        assert [call.getTime() for call in clock.getDelayedCalls()] == [KEEP_DELAY]
        clock.advance(KEEP_DELAY)
        assert (await store.responses.get("resp_b"))["id"] == "resp_b"  # a read waits for the writes under way
        # The broken record is logged and left out; the others are written (by the store's writer process).
        assert _stored_ids(tmp_path) == ["resp_a", "resp_b"]
        assert logged_errors.flush(KeyError) == 1
        store.responses.keep(_response("resp_c"))
        store.responses.keep(_response("resp_d"))
    finally:
        await store.stopService()
    assert _stored_ids(tmp_path) == ["resp_a", "resp_b", "resp_c", "resp_d"]  # written before the close
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_the_writer_process_starts_with_the_store_and_ends_with_its_stop(reactor, tmp_path):
    store = await opened(reactor, tmp_path)
    try:
        child = store._writer._child  # started before any write: its start lands before the load
        assert child is not None and child.transport.pid
    finally:
        await store.stopService()
    assert child.ended.called and store._writer._child is None


@pytest_twisted.ensureDeferred
async def test_a_kept_response_no_column_can_hold_is_logged_and_loses_no_other(reactor, tmp_path, logged_errors):
    store = await opened(reactor, tmp_path)
    try:
        for record in (_response("resp_a"), _response("resp_big", created_at=2**63), _response("resp_b")):
            store.responses.keep(record)
        store.responses.flush()  # one batch: rejected whole, then each record alone
        assert await store.responses.get("resp_big") is None
        assert _stored_ids(tmp_path) == ["resp_a", "resp_b"]
        assert logged_errors.flush(RowsRejected) == 1
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_response_missing_from_a_file_no_other_process_uses_is_missing_at_once(reactor, tmp_path):
    """One process alone on the file (no --workers) finds what it kept, held or written: a miss is answered
    at once, with no look again (before: 0.375 s later, also for a master key's id that vLLM holds)."""
    from gomodel.store.sqlite.responses import SQLiteResponseStore

    store = await opened(reactor, tmp_path, shared=False)
    try:
        store.responses.keep(_response("resp_x"))
        assert (await store.responses.get("resp_x"))["id"] == "resp_x"
        assert store.responses._miss_grace == ()
        waits = Clock()  # (never advanced: a look again would never come)
        alone = SQLiteResponseStore(store._db, reactor, store._writer, waits=waits, miss_grace=())
        assert await with_timeout(reactor, alone.get("resp_unknown"), 10) is None
        assert not waits.getDelayedCalls()
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_another_process_on_the_file_finds_a_response_kept_a_moment_ago(reactor, tmp_path):
    """As two gateway processes of --workers: B reads what A still holds (up to KEEP_DELAY) by looking again."""
    a, b = await opened(reactor, tmp_path), await opened(reactor, tmp_path)
    try:
        a.responses.keep(_response("resp_x"))
        assert _stored_ids(tmp_path) == []  # held by A
        assert (await b.responses.get("resp_x"))["id"] == "resp_x"
        assert await b.responses.get("resp_unknown") is None  # after looking again, within MISS_GRACE
    finally:
        await a.stopService()
        await b.stopService()


def test_an_owner_is_gone_only_when_its_process_on_this_host_is():
    import subprocess
    import sys

    from gomodel.store.records import owner_is_gone, process_owner

    assert not owner_is_gone(process_owner())  # this process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    host = process_owner().split(":")[0]
    assert owner_is_gone(f"{host}:{child.pid}:abcd")
    assert not owner_is_gone(f"another-host:{child.pid}:abcd")  # its lease runs out by itself
    assert not owner_is_gone("not-an-owner-id")


def test_this_hosts_name_and_pid_namespace_are_read_once(monkeypatch):
    """Before, every L{owner_is_gone} (each batch holder, at each claim) read /proc and the host's name again."""
    import os
    import socket

    from gomodel.store.records import owner_is_gone, process_owner

    owner = process_owner()
    reads = []
    real_stat, real_name = os.stat, socket.gethostname
    monkeypatch.setattr(os, "stat", lambda *a, **kw: reads.append(a) or real_stat(*a, **kw))
    monkeypatch.setattr(socket, "gethostname", lambda: reads.append("name") or real_name())
    for _ in range(3):
        assert not owner_is_gone(owner) and not owner_is_gone(owner.split(":")[0] + ":1:abcd")
    assert reads == []


def test_an_owner_in_another_pid_namespace_of_a_host_of_the_same_name_is_never_gone():
    """Containers that share their host's name (host networking: Docker's, a Kubernetes pod's) each have their own
    process ids: a process of another is not to be looked for among this one's (before, one whose id was not in
    use here was taken for dead, and its batches taken over while it ran them)."""
    import subprocess
    import sys

    from gomodel.store.records import owner_is_gone, process_owner

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    mine = process_owner()
    here = mine.split(":")[0]
    host = here.split("/")[0]
    assert here != host, "an owner names its process's pid namespace"
    assert owner_is_gone(f"{here}:{child.pid}:abcd")
    assert not owner_is_gone(f"{host}/12345:{child.pid}:abcd")  # another container's
    assert not owner_is_gone(f"{host}:{child.pid}:abcd")  # (an older gateway's: said nothing of its namespace)


def test_sqlite_binds_none_and_bytes_as_they_are_through_the_adapters_gomodel_registers():
    """The adapters (found at once, where sqlite3 would look up __adapt__ and __conform__ and fail) change
    nothing that is stored: None is NULL, bytes a BLOB, and a str or an int as before (gomodel.store,
    imported here, registers them)."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (a, b, c, d)")
        conn.execute("INSERT INTO t VALUES (?, ?, ?, ?)", (None, b"\x00\xff", "x", 7))
        assert conn.execute("SELECT a, b, c, d, typeof(a), typeof(b) FROM t").fetchone() == (
            None, b"\x00\xff", "x", 7, "null", "blob")
    finally:
        conn.close()


def test_insert_rows_writes_any_number_of_rows_in_few_statements_of_few_shapes():
    """Each row as executemany would write it (values, order, a conflict clause for a row met again in the
    same call), ROWS_PER_INSERT rows a statement, then the rest in halves; never more values a statement
    than the library allows."""
    from gomodel.store.sqlite.rows import ROWS_PER_INSERT, insert_rows

    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, a, b, c)")
        statements = []
        conn.set_trace_callback(lambda sql: statements.append(sql) if sql.startswith("INSERT") else None)
        insert = "INSERT INTO t (k, a, b, c) VALUES"
        upsert = "ON CONFLICT (k) DO UPDATE SET a = excluded.a, b = excluded.b, c = excluded.c"
        written = 0
        for count in (0, 1, 2, 3, ROWS_PER_INSERT - 1, ROWS_PER_INSERT, ROWS_PER_INSERT + 1, 1000):
            rows = [(written + i, None if i % 3 else b"\x00", f"é{i}", i * 0.5) for i in range(count)]
            statements.clear()
            insert_rows(conn, insert, rows)
            assert conn.execute("SELECT * FROM t WHERE k >= ? ORDER BY k", (written,)).fetchall() == rows
            # as few statements as halving allows: full ones, then one per bit of what was left
            full, rest = divmod(count, ROWS_PER_INSERT)
            assert len(statements) == full + bin(rest).count("1"), count
            written += count
        # a row met again in one call: the later values, as executemany left them
        insert_rows(conn, insert, [(1, "x", "y", 1.0), (2, "p", "q", 2.0), (1, "z", "w", 3.0)], upsert)
        assert conn.execute("SELECT * FROM t WHERE k < 3 ORDER BY k").fetchall() == [
            (0, b"\x00", "é0", 0.0), (1, "z", "w", 3.0), (2, "p", "q", 2.0)]
        # a library allowing 9 values a statement: two rows of four each
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 9)
        statements.clear()
        insert_rows(conn, insert, [(10000 + i, i, i, i) for i in range(5)])
        assert len(statements) == 3 and conn.execute("SELECT COUNT(*) FROM t WHERE k >= 10000").fetchone() == (5,)
    finally:
        conn.close()
