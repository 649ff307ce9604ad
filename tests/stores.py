"""Store backends for the contract tests: every backend runs the same tests.

A backend is a factory C{(reactor, tmp_path, clock) -> started store service}
with the aggregates as attributes (files, blobs, batches, responses,
claims). A PostgreSQL backend adds an entry to L{BACKENDS}.
"""

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from gomodel.store import SQLiteStore


async def sqlite_backend(reactor, path, clock):
    store = SQLiteStore(str(path), reactor, clock=clock)
    store.startService()
    await store.started()
    return store


BACKENDS = {"sqlite": sqlite_backend}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request):
    return BACKENDS[request.param]


@pytest_twisted.async_yield_fixture()
async def store(reactor, tmp_path, backend):
    """A started store on a L{Clock} (at 1000 s), stopped after the test; C{store.clock} advances it."""
    clock = Clock()
    clock.advance(1000)
    s = await backend(reactor, tmp_path, clock)
    s.clock = clock
    yield s
    await s.stopService()


async def put_blob(blobs, blob_id, content):
    writer = blobs.create()
    for start in range(0, len(content), 7):
        await writer.write(content[start:start + 7])
    return await writer.commit(blob_id)


async def add_file(store, content=b"x\n", filename="f.jsonl", purpose="batch"):
    from gomodel.store import new_file_id

    file_id = new_file_id()
    size = await put_blob(store.blobs, file_id, content)
    return await store.files.add(file_id, size, filename, purpose)


def batch(batch_id, status="in_progress", **extra):
    return {"id": batch_id, "endpoint": "/v1/chat/completions", "input_file_id": "file-x", "completion_window": "24h",
            "status": status, "created_at": 100, "expires_at": 100 + 86400, **extra}
