"""Large answers written in pieces (gomodel/api/producers.py): a failure after the first byte cuts the connection.

D4: before, a storage failure on page 2 of C{GET /v1/batches/{id}/results}
ended a 200 C{application/jsonl} body cleanly with an C{{"error":...}} line.
"""

import pytest_twisted
from twisted.internet.defer import fail
from twisted.internet.task import deferLater

from gomodel.errors import StorageUnavailable
from tests.rawclient import connect
from tests.support import start_gateway, with_timeout


def broken():
    raise StorageUnavailable("The gateway's storage failed (I/O error).")


def get(path):
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: gateway\r\n\r\n"


@pytest_twisted.async_yield_fixture()
async def gw(reactor, fake, tmp_path):
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_DATA_DIR": str(tmp_path)})
    yield gateway
    await gateway.service.stopService()


async def finished_batch(store, lines):
    batches = store.batches
    await batches.add({"id": "batch_done", "endpoint": "/v1/chat/completions", "input_file_id": "file-x",
                       "completion_window": "24h", "status": "in_progress", "created_at": 1, "expires_at": 2})
    _, token = await batches.claim("batch_done", "test", 30)
    await batches.record_results("batch_done", [(n, f"c{n}", True, b'{"line":%d}' % n) for n in range(lines)], token)
    await batches.update("batch_done", {"status": "completed"}, token=token)
    await batches.release("batch_done", "test", token)


@pytest_twisted.ensureDeferred
async def test_results_failing_on_page_two_abort_the_connection(reactor, gw, logged_errors):
    store = gw.service.store
    await finished_batch(store, 700)  # two pages of 500
    real = store.batches.read_results
    calls = []

    def failing_on_page_two(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # a moment later, as a real store would: page 1 is on the wire by then
            return deferLater(reactor, 0.05, broken)
        return real(*args, **kwargs)

    store.batches.read_results = failing_on_page_two
    client = await connect(reactor, gw.port, get("/v1/batches/batch_done/results"))
    await with_timeout(reactor, client.lost, 5)
    raw = bytes(client.received)
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert b'{"line":499}' in raw  # page 1 went out
    assert b'"error"' not in raw  # no envelope appended to a 200 body
    assert not raw.endswith(b"0\r\n\r\n")  # and no clean end of the chunked body: the client sees a cut
    assert len(calls) == 2


@pytest_twisted.ensureDeferred
async def test_results_failing_before_the_first_byte_get_an_error_answer(reactor, gw):
    store = gw.service.store
    await finished_batch(store, 3)
    store.batches.read_results = lambda *a, **k: fail(StorageUnavailable("The gateway's storage failed."))
    client = await connect(reactor, gw.port, get("/v1/batches/batch_done/results"))
    await with_timeout(reactor, client.wait_for(b"storage_unavailable"), 5)
    assert bytes(client.received).startswith(b"HTTP/1.1 503 ")
    client.transport.loseConnection()
    await client.lost


@pytest_twisted.ensureDeferred
async def test_file_contents_failing_midway_abort_the_connection(reactor, gw, logged_errors):
    from gomodel.store import new_file_id
    from tests.stores import put_blob

    store = gw.service.store
    file_id = new_file_id()
    size = await put_blob(store.blobs, file_id, b"x" * (300 * 1024))
    await store.files.add(file_id, size, "big.bin", "user_data")
    real = store.blobs.read

    def failing_after_the_first_chunk(blob_id, offset, length):
        if offset > 0:
            return deferLater(reactor, 0.05, broken)
        return real(blob_id, offset, length)

    store.blobs.read = failing_after_the_first_chunk
    client = await connect(reactor, gw.port, get(f"/v1/files/{file_id}/content"))
    await with_timeout(reactor, client.lost, 5)
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-length: %d" % size in head.lower()
    assert 0 < len(body) < size and b"error" not in body  # cut short, never an envelope
