"""Store backends for the contract tests: every backend runs the same tests.

A backend is a factory C{(reactor, tmp_path, clock) -> started store service}
with the aggregates as attributes (files, blobs, batches, responses,
claims, usage, keys, budgets) and a C{cleanup()} coroutine run after the
service stopped. The PostgreSQL backend gives each test its own fresh
database (tests/postgres.py), skipped when the server cannot be reached.
"""

import os

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from gomodel.errors import StorageUnavailable
from gomodel.store import SQLiteStore
from tests import postgres


async def sqlite_backend(reactor, path, clock):
    store = SQLiteStore(str(path), reactor, clock=clock)
    store.startService()
    await store.started()
    store.cleanup = _nothing
    return store


async def postgresql_backend(reactor, path, clock):
    from gomodel.store.postgresql import PostgreSQLStore

    postgres.require()
    name = postgres.create_database()
    store = PostgreSQLStore(postgres.url(name), reactor, clock=clock, max_conns=4)
    store.dbname = name

    async def cleanup():
        postgres.drop_database(name)

    store.cleanup = cleanup
    store.startService()
    try:
        await store.started()
    except BaseException:
        await store.stopService()
        await cleanup()
        raise
    return store


async def down_postgresql(reactor):
    """A started PostgreSQL store whose server refuses (a port of 127.0.0.1 nothing listens on, as a database
    down): every job fails with L{StorageUnavailable}. Stop it after."""
    import socket

    from gomodel.store.postgresql import PostgreSQLStore

    postgres.require()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = PostgreSQLStore(f"postgresql://gomodel@127.0.0.1:{port}/none?connect_timeout=2", reactor, clock=Clock())
    store.startService()
    try:
        await store.started()
    except StorageUnavailable:
        return store
    await store.stopService()
    raise AssertionError("a store with no server opened")


async def _nothing():
    return None


BACKENDS = {"sqlite": sqlite_backend, "postgresql": postgresql_backend}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request):
    return BACKENDS[request.param]


@pytest.fixture(params=sorted(BACKENDS))
def storage(request):
    """A gateway's settings for each store (C{STORAGE_TYPE}; a fresh PostgreSQL database, dropped after)."""
    if request.param == "sqlite":
        yield {}
        return
    postgres.require()
    name = postgres.create_database()
    yield {"STORAGE_TYPE": "postgresql", "POSTGRES_URL": postgres.url(name)}
    postgres.drop_database(name)


@pytest_twisted.async_yield_fixture()
async def store(reactor, tmp_path, backend):
    """A started store on a L{Clock} (at 1000 s), stopped after the test; C{store.clock} advances it."""
    clock = Clock()
    clock.advance(1000)
    s = await backend(reactor, tmp_path, clock)
    s.clock = clock
    yield s
    await s.stopService()
    await s.cleanup()


@pytest_twisted.async_yield_fixture()
async def sqlite_store(reactor, tmp_path):
    """The SQLite store alone (for what only it has: a disk layout, its thread)."""
    clock = Clock()
    clock.advance(1000)
    s = await sqlite_backend(reactor, tmp_path, clock)
    s.clock = clock
    yield s
    await s.stopService()


def age(store, target, when):
    """Make a committed blob (by id) or a writer's uncommitted write look last written at C{when} (epoch seconds)."""
    if isinstance(store, SQLiteStore):
        path = store.blobs.path(target) if isinstance(target, str) else target._path
        os.utime(path, (when, when))
    elif isinstance(target, str):
        postgres.query(store.dbname, "UPDATE blobs SET touched_at = %s WHERE id = %s", (when, target))
    else:
        postgres.query(store.dbname, "UPDATE blobs SET touched_at = %s WHERE key = %s", (when, target._key))


def write_exists(store, writer):
    """Whether an uncommitted write still exists in the store."""
    if isinstance(store, SQLiteStore):
        return os.path.exists(writer._path)
    return bool(postgres.query(store.dbname, "SELECT 1 FROM blobs WHERE key = %s", (writer._key,)))


async def put_blob(blobs, blob_id, content):
    writer = blobs.create()
    for start in range(0, len(content), 7):
        await writer.write(content[start:start + 7])
    return await writer.commit(blob_id)


async def add_file(store, content=b"x\n", filename="f.jsonl", purpose="batch", tenant=None):
    from gomodel.store import new_file_id

    file_id = new_file_id()
    size = await put_blob(store.blobs, file_id, content)
    return await store.files.add(file_id, size, filename, purpose, tenant)


def batch(batch_id, status="in_progress", **extra):
    return {"id": batch_id, "endpoint": "/v1/chat/completions", "input_file_id": "file-x", "completion_window": "24h",
            "status": status, "created_at": 100, "expires_at": 100 + 86400, **extra}
