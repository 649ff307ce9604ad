"""The store's writer process (gomodel.store.sqlite.writer, gomodel.store.sqlite.rows): a real child on a real
SQLite file, started at the first batch, answering each batch in order, rejecting what no column can hold,
started again after it died, and writing what it was given before a stop."""

import os
import signal
import sqlite3

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import globalLogPublisher

from gomodel.errors import RowsRejected, StorageUnavailable
from gomodel.store.sqlite.writer import RowWriter
from tests.support import with_timeout

INSERT = "INSERT INTO t (name, n) VALUES"


@pytest.fixture
def db(tmp_path):
    path = str(tmp_path / "w.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL, n INTEGER)")
    yield path, conn
    conn.close()


@pytest_twisted.async_yield_fixture()
async def writer(reactor, db):
    w = RowWriter(reactor, db[0])
    yield w
    await with_timeout(reactor, w.stop(), 10)


def rows_in(conn):
    return conn.execute("SELECT name, n FROM t ORDER BY id").fetchall()


def child_pid(w):
    return w._child.transport.pid if w._child is not None else None


@pytest_twisted.ensureDeferred
async def test_batches_are_written_in_order_by_a_child_started_at_the_first(reactor, writer, db):
    assert child_pid(writer) is None  # nothing runs before there is something to write
    answers = [writer.write(INSERT, [(f"b{i}-{j}", i * 1000 + j) for j in range(size)])
               for i, size in enumerate((1, 300, 2))]
    pid = child_pid(writer)
    assert pid is not None and pid != os.getpid()
    assert [r for _, r in await with_timeout(reactor, DeferredList(answers, fireOnOneErrback=True), 10)] == [1, 300, 2]
    got = rows_in(db[1])
    assert len(got) == 303 and got[0] == ("b0-0", 0) and got[-1] == ("b2-1", 2001)
    assert [n for _, n in got[1:301]] == list(range(1000, 1300))
    assert await writer.write(INSERT, [("more", None)]) == 1
    assert child_pid(writer) == pid  # one child for them all


@pytest_twisted.ensureDeferred
async def test_a_value_no_column_can_hold_rejects_its_batch_and_the_next_is_written(reactor, writer, db):
    # beyond 64 bits, beyond SQLite's, a lone surrogate, NULL in a NOT NULL column, a type marshal refuses
    for value in (2**70, 2**63, "\ud800", None, object()):
        row = ("x", value) if isinstance(value, int) else (value, 1)
        with pytest.raises(RowsRejected):
            await with_timeout(reactor, writer.write(INSERT, [("good", 1), row]), 10)
    assert await writer.write(INSERT, [("good", 2)]) == 1
    assert rows_in(db[1]) == [("good", 2)]  # nothing of a rejected batch


@pytest_twisted.ensureDeferred
async def test_each_write_waits_for_the_database_to_open_and_fails_when_it_cannot(reactor, db):
    opening = []
    w = RowWriter(reactor, db[0], opened=lambda: opening.append(Deferred()) or opening[-1])
    try:
        first, second = w.write(INSERT, [("a", 1)]), w.write(INSERT, [("b", 2)])
        assert w._child is None and not first.called  # nothing sent before the database is open
        for d in opening:
            d.callback(None)
        assert await with_timeout(reactor, DeferredList([first, second], fireOnOneErrback=True), 10) == [
            (True, 1), (True, 1)]
        assert rows_in(db[1]) == [("a", 1), ("b", 2)]
        failed = w.write(INSERT, [("c", 3)])
        opening[-1].errback(StorageUnavailable.because("cannot open it"))
        with pytest.raises(StorageUnavailable, match="cannot open it"):
            await failed
    finally:
        await with_timeout(reactor, w.stop(), 10)


@pytest_twisted.ensureDeferred
async def test_a_database_that_cannot_be_written_fails_the_batch_as_unavailable(reactor, tmp_path):
    path = str(tmp_path / "w.db")
    sqlite3.connect(path).close()  # no table t
    w = RowWriter(reactor, path)
    try:
        with pytest.raises(StorageUnavailable, match="no such table"):
            await with_timeout(reactor, w.write(INSERT, [("a", 1)]), 10)
    finally:
        await with_timeout(reactor, w.stop(), 10)


@pytest_twisted.ensureDeferred
async def test_a_child_that_died_is_started_again_at_the_next_batch(reactor, writer, db):
    assert await writer.write(INSERT, [("a", 1)]) == 1
    first = child_pid(writer)
    ended = writer._child.ended
    os.kill(first, signal.SIGKILL)
    await with_timeout(reactor, ended, 10)
    assert child_pid(writer) is None
    assert await with_timeout(reactor, writer.write(INSERT, [("b", 2)]), 10) == 1
    assert child_pid(writer) not in (None, first)
    assert rows_in(db[1]) == [("a", 1), ("b", 2)]


@pytest_twisted.ensureDeferred
async def test_sigterm_and_sigint_sent_to_the_group_leave_the_child_writing(reactor, writer, db):
    assert await writer.write(INSERT, [("a", 1)]) == 1
    pid = child_pid(writer)
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGINT)
    assert await with_timeout(reactor, writer.write(INSERT, [("b", 2)]), 10) == 1
    assert child_pid(writer) == pid


@pytest_twisted.ensureDeferred
async def test_a_stop_writes_every_batch_given_before_it_then_refuses(reactor, db):
    w = RowWriter(reactor, db[0])
    answers = [w.write(INSERT, [(f"r{i}", i)] * 200) for i in range(3)]
    stopped = w.stop()
    assert [r for _, r in await with_timeout(reactor, DeferredList(answers, fireOnOneErrback=True), 10)] == [200] * 3
    await with_timeout(reactor, stopped, 10)
    assert len(rows_in(db[1])) == 600
    with pytest.raises(StorageUnavailable, match="stopping"):
        await w.write(INSERT, [("late", 1)])
    await w.stop()  # again: at once


@pytest_twisted.ensureDeferred
async def test_a_stop_kills_a_child_still_writing_after_the_stop_timeout(reactor, db):
    path, conn = db
    w = RowWriter(reactor, path, stop_timeout=0.2)
    conn.execute("BEGIN IMMEDIATE")  # the child waits for the write lock (busy_timeout, 5 s)
    try:
        answer = w.write(INSERT, [("a", 1)])
        await with_timeout(reactor, w.stop(), 10)
        with pytest.raises(StorageUnavailable, match="signal 9"):
            await answer
    finally:
        conn.execute("ROLLBACK")
    assert rows_in(conn) == []


@pytest_twisted.ensureDeferred
async def test_a_child_that_cannot_start_fails_the_batch_and_its_errors_are_logged(reactor, tmp_path):
    events = []
    globalLogPublisher.addObserver(events.append)
    w = RowWriter(reactor, str(tmp_path / "missing" / "w.db"))
    try:
        with pytest.raises(StorageUnavailable, match="exited: 1"):
            await with_timeout(reactor, w.write(INSERT, [("a", 1)]), 10)
    finally:
        globalLogPublisher.removeObserver(events.append)
        await w.stop()
    lines = [e["line"] for e in events if e.get("log_namespace", "").endswith("RowWriter") and "line" in e]
    assert any("unable to open database file" in line for line in lines)
    assert any(e.get("status") == 1 for e in events if e.get("log_namespace", "").endswith("RowWriter"))
