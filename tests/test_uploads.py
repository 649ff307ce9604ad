"""UploadSink (gomodel/api/uploads.py): parsing while the body arrives, writes off the reactor, backpressure (D8)."""

import threading

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed

from gomodel.api.uploads import WRITE_BOUND, WRITE_CHUNK, UploadSink
from gomodel.errors import StorageUnavailable
from tests.stores import backend, store  # noqa: F401 (fixtures)

BOUNDARY = "b0undary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}".encode()


def body(content: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{BOUNDARY}--\r\n".encode()


class Transport:
    """The sink's reader (a GatewayChannel's pause_reading and resume_reading)."""

    def __init__(self):
        self.events = []
        self.paused = False

    def pause_reading(self):
        self.events.append("pause")
        self.paused = True

    def resume_reading(self):
        self.events.append("resume")
        self.paused = False


class SlowBlobs:
    """A blob store whose disk answers only when the test says (each write's Deferred is held)."""

    def __init__(self):
        self.writes = []
        self.committed = {}

    def create(self):
        return self

    def write(self, data):
        d = Deferred()
        self.writes.append((data, d))
        return d

    def commit(self, blob_id):
        self.committed[blob_id] = b"".join(data for data, _ in self.writes)
        return succeed(len(self.committed[blob_id]))

    def abort(self):
        return succeed(None)


def feed(sink, data, transport=None, size=16 * 1024):
    """Deliver C{data} as a transport would: nothing while paused. Returns what is left."""
    while data and not (transport is not None and transport.paused):
        sink.write(data[:size])
        data = data[size:]
    return data


@pytest_twisted.ensureDeferred
async def test_a_slow_disk_pauses_the_transport_until_the_writes_drain():
    blobs, transport = SlowBlobs(), Transport()
    sink = UploadSink(blobs, 10 * 1024 * 1024, CONTENT_TYPE, reader=transport)
    content = bytes(range(256)) * (16 * WRITE_CHUNK // 256)
    rest = feed(sink, body(content), transport)  # the disk answers nothing
    assert transport.events == ["pause"] and rest  # paused once past the bound, not per chunk
    assert sum(len(d) for d, _ in blobs.writes) <= WRITE_BOUND + WRITE_CHUNK  # memory stays bounded
    while rest or not all(d.called for _, d in blobs.writes):
        for _, d in list(blobs.writes):
            if not d.called:
                d.callback(None)
        assert not transport.paused  # drained: reading again
        rest = feed(sink, rest, transport)
    assert transport.events.count("pause") == transport.events.count("resume") >= 2
    await sink.finish()
    assert (await sink.commit("file-1"), sink.fields, sink.filename) == (len(content), {"purpose": "batch"},
                                                                         "in.jsonl")
    assert blobs.committed["file-1"] == content


@pytest_twisted.ensureDeferred
async def test_finish_waits_for_the_last_write():
    blobs = SlowBlobs()
    sink = UploadSink(blobs, 10 * 1024 * 1024, CONTENT_TYPE, reader=Transport())
    feed(sink, body(b"z" * 10))
    finished = Deferred.fromCoroutine(sink.finish())
    assert not finished.called
    blobs.writes[-1][1].callback(None)
    await finished


@pytest_twisted.ensureDeferred
async def test_a_failed_write_answers_503_and_lets_the_rest_of_the_body_through():
    blobs, transport = SlowBlobs(), Transport()
    sink = UploadSink(blobs, 10 * 1024 * 1024, CONTENT_TYPE, reader=transport)
    rest = feed(sink, body(b"x" * (6 * WRITE_CHUNK)), transport)
    assert transport.paused
    blobs.writes[0][1].errback(StorageUnavailable("The gateway's storage failed (No space left on device)."))
    assert transport.events == ["pause", "resume"]  # the rest is read (and dropped)
    for _, d in blobs.writes[1:]:
        d.callback(None)
    assert feed(sink, rest, transport) == b""
    assert len(blobs.writes) <= 5  # nothing written after the failure
    with pytest.raises(StorageUnavailable):
        await sink.finish()


@pytest_twisted.ensureDeferred
async def test_upload_writes_never_run_on_the_reactor_thread(store, monkeypatch):
    """D8: the file part reaches the disk (or the database) in the blob store's threads."""
    threads = []
    writer_class = type(store.blobs.create())  # the backend's writer (creating one does no I/O)
    original = writer_class._write

    def spy(self, *args):
        threads.append(threading.current_thread() is threading.main_thread())
        return original(self, *args)

    monkeypatch.setattr(writer_class, "_write", spy)
    sink = UploadSink(store.blobs, 10 * 1024 * 1024, CONTENT_TYPE, reader=Transport())
    feed(sink, body(b"y" * (3 * WRITE_CHUNK + 5)))
    await sink.finish()
    assert await sink.commit("file-up") == 3 * WRITE_CHUNK + 5
    assert threads and not any(threads)
    assert await store.blobs.read("file-up", 3 * WRITE_CHUNK, 10) == b"yyyyy"
