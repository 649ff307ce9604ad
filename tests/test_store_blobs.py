"""IBlobStore contract (every backend), and the local disk store's threads and sweeps."""

import os
import threading

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from gomodel.errors import StorageUnavailable
from gomodel.store import IBlobStore, IBlobWriter
from gomodel.store.sqlite.blobs import _LocalWriter
from tests.stores import backend, put_blob, sqlite_store, store  # noqa: F401 (fixtures)


@pytest_twisted.ensureDeferred
async def test_blobs_are_written_in_chunks_read_back_and_deleted(store):
    blobs = store.blobs
    verifyObject(IBlobStore, blobs)
    writer = blobs.create()
    verifyObject(IBlobWriter, writer)
    assert await blobs.size("file-a") is None
    assert await put_blob(blobs, "file-a", b"0123456789" * 3) == 30
    assert await blobs.size("file-a") == 30
    assert await blobs.read("file-a", 5, 10) == b"5678901234"
    assert await blobs.read("file-a", 30, 10) == b""
    assert await blobs.read("file-missing", 0, 10) is None
    aborted = blobs.create()
    await aborted.write(b"never seen")
    await aborted.abort()
    assert await blobs.size("file-b") is None
    assert await blobs.delete("file-a") is True
    assert await blobs.delete("file-a") is False
    assert await blobs.read("file-a", 0, 1) is None
    await writer.abort()


@pytest_twisted.ensureDeferred
async def test_lines_are_read_in_slices_and_over_long_lines_are_skipped(store):
    await put_blob(store.blobs, "file-l", b"one\r\n" + b"L" * 100 + b"\ntwo\n\nlast-without-newline")
    lines, offset = await store.blobs.read_lines("file-l", 0, 2, 50)
    assert (lines, offset) == ([b"one", None], 106)
    lines, offset = await store.blobs.read_lines("file-l", offset, 10, 50)
    assert (lines, offset) == ([b"two", b"", b"last-without-newline"], None)
    assert await store.blobs.read_lines("file-missing", 0, 10, 50) is None


@pytest_twisted.ensureDeferred
async def test_a_slice_of_lines_holds_a_bounded_number_of_bytes(store):
    """C{max_bytes}: a slice takes lines while they hold at most that many bytes together (their endings not
    counted; the first line always), so that a file of large lines is never read a thousand of them at once."""
    lines = [b"a" * 40, b"b" * 40, b"c" * 30, b"d" * 120, b"", b"e" * 10, b"f" * 10]
    await put_blob(store.blobs, "file-l", b"\r\n".join(lines))
    slices, offset = [], 0
    while offset is not None:
        got, offset = await store.blobs.read_lines("file-l", offset, 10, 200, max_bytes=100)
        slices.append(got)
    assert slices == [lines[:2], lines[2:3], lines[3:4], lines[4:]]
    got, offset = await store.blobs.read_lines("file-l", 0, 10, 200)
    assert (got, offset) == (lines, None)  # (no max_bytes: no bound)


def test_postgresql_reads_a_slice_of_lines_in_blocks_about_its_size():
    """A slice of short lines from a large blob fetches about those lines, a block at a time (before: up to
    max_line_bytes, 64 MiB, per slice, copied again for each line: a 60 MB batch input on PostgreSQL took ~40 s of
    a store thread per 1,000 lines); a long line grows its reads, so it takes a few, never one per block."""
    from gomodel.store.postgresql.blobs import READ_BLOCK, scan_lines

    content = (b"x" * 99 + b"\n") * 100000 + b"L" * (5 * 1024 * 1024) + b"\nend"
    reads = []

    def read(at, n):
        reads.append(n)
        return content[at:at + n]

    lines, offset = scan_lines(read, 0, len(content), 1000, 64 * 1024 * 1024)
    assert (lines, offset) == ([b"x" * 99] * 1000, 100000)
    assert sum(reads) <= offset + READ_BLOCK
    reads.clear()
    lines, offset = scan_lines(read, 100 * 100000, len(content), 10, 64 * 1024 * 1024)
    assert (lines, offset) == ([b"L" * (5 * 1024 * 1024), b"end"], None)
    assert len(reads) <= 10 and sum(reads) <= 2 * len(lines[0]) + READ_BLOCK
    reads.clear()
    lines, offset = scan_lines(read, 100 * 100000, len(content), 10, 1024 * 1024)  # over-long: skipped
    assert (lines, offset) == ([None, b"end"], None)


@pytest_twisted.ensureDeferred
async def test_an_empty_blob_can_be_committed(store):
    assert await store.blobs.create().commit("file-empty") == 0
    assert await store.blobs.read("file-empty", 0, 10) == b""


# -- the local disk store ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_disk_io_never_runs_on_the_reactor_thread(sqlite_store, monkeypatch):
    """D8: opens, writes, renames and reads happen in the blob store's threads."""
    seen = []
    for name in ("_write", "_commit"):
        original = getattr(_LocalWriter, name)

        def spy(self, *args, _original=original):
            seen.append(threading.current_thread() is threading.main_thread())
            return _original(self, *args)

        monkeypatch.setattr(_LocalWriter, name, spy)
    store = sqlite_store
    await put_blob(store.blobs, "file-t", b"x" * 20)
    assert len(seen) == 4 and not any(seen)


@pytest_twisted.ensureDeferred
async def test_a_failed_write_fails_every_later_call(sqlite_store, tmp_path):
    store = sqlite_store
    os.makedirs(store.blobs.root, exist_ok=True)
    with open(store.blobs.spool_dir, "w"):  # the spool cannot be created: a broken disk
        pass
    writer = store.blobs.create()
    with pytest.raises(StorageUnavailable):
        await writer.write(b"x")
    with pytest.raises(StorageUnavailable):
        await writer.commit("file-x")
    await writer.abort()


@pytest_twisted.ensureDeferred
async def test_sweeps_go_by_age_so_a_write_in_progress_is_kept(sqlite_store):
    blobs = sqlite_store.blobs
    await put_blob(blobs, "file-old", b"x")
    await put_blob(blobs, "file-new", b"y")
    receiving = blobs.create()
    await receiving.write(b"still arriving")
    cut_short = blobs.create()
    await cut_short.write(b"crashed")
    old_run = os.path.join(blobs.spool_dir, "old-run")  # the layout before blobs: one directory per run
    os.makedirs(old_run)
    with open(os.path.join(old_run, "upload-1.part"), "wb") as f:
        f.write(b"half")
    for path in (os.path.join(blobs.root, "file-old"), cut_short._path, os.path.join(old_run, "upload-1.part")):
        os.utime(path, (1000, 1000))
    assert await blobs.stale(2000) == ["file-old"]
    assert await blobs.discard_writes(2000) == 2
    assert os.listdir(blobs.spool_dir) == [os.path.basename(receiving._path)]
    assert await receiving.commit("file-received") == 14
    await cut_short.abort()


@pytest_twisted.ensureDeferred
async def test_ranges_and_lines_across_chunk_boundaries_read_back_exactly(store):
    import random

    rng = random.Random(7)
    lines = [bytes(rng.choice(b"abcdefgh") for _ in range(rng.randrange(0, 300))) for _ in range(400)]
    lines[100] = b"L" * 5000  # over-long, in the middle of several writes
    content = b"\n".join(lines) + b"\n"
    writer = store.blobs.create()
    at = 0
    while at < len(content):  # uneven writes, as uploads and batch outputs arrive
        size = rng.choice((1, 7, 1000, 4096, 65536))
        await writer.write(content[at:at + size])
        at += size
    assert await writer.commit("file-big") == len(content)
    for _ in range(30):
        offset, length = rng.randrange(0, len(content) + 10), rng.randrange(0, 20000)
        assert await store.blobs.read("file-big", offset, length) == content[offset:offset + length]
    seen, offset = [], 0
    while offset is not None:
        got, offset = await store.blobs.read_lines("file-big", offset, 37, 400)
        seen.extend(got)
    assert seen == [line if len(line) <= 400 else None for line in lines]
