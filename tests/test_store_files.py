"""IFileStore contract: every backend (see tests/stores.py)."""

import pytest_twisted
from zope.interface.verify import verifyObject

from gomodel.store import IFileStore
from tests.stores import add_file, backend, put_blob, store  # noqa: F401 (fixtures)


@pytest_twisted.ensureDeferred
async def test_files_are_listed_paged_and_deleted(store):
    verifyObject(IFileStore, store.files)
    a = await add_file(store, b"first\n", "a.jsonl")
    b = await add_file(store, b"second\n", "b.txt", "user_data")
    c = await add_file(store, b"third\n", "c.jsonl")
    assert (b["bytes"], b["filename"], b["purpose"], b["status"], b["created_at"]) == (7, "b.txt", "user_data",
                                                                                       "processed", 1000)

    def ids(page):
        return [r["id"] for r in page[0]]

    files = store.files
    assert ids(await files.list()) == [c["id"], b["id"], a["id"]]
    assert ids(await files.list(order="asc")) == [a["id"], b["id"], c["id"]]
    assert ids(await files.list(purpose="batch")) == [c["id"], a["id"]]
    page = await files.list(limit=2)
    assert (ids(page), page[1]) == ([c["id"], b["id"]], True)
    page = await files.list(limit=2, after=b["id"])
    assert (ids(page), page[1]) == ([a["id"]], False)
    assert ids(await files.list(after=a["id"], order="asc")) == [b["id"], c["id"]]
    assert await files.list(after="file-unknown") == ([], False)
    assert await files.get(b["id"]) == b
    assert await files.known([a["id"], "file-nope", c["id"]]) == {a["id"], c["id"]}
    assert await files.delete(b["id"]) is True
    assert await files.delete(b["id"]) is False
    assert await files.get(b["id"]) is None



@pytest_twisted.ensureDeferred
async def test_a_tenants_listing_takes_only_its_own_files_as_cursor(store):
    async def add(file_id, tenant):
        size = await put_blob(store.blobs, file_id, b"x\n")
        return await store.files.add(file_id, size, "f.jsonl", "batch", tenant)

    mine, theirs = await add("file-a", "path:/a"), await add("file-b", "path:/b")
    assert await store.files.list(after=theirs["id"], tenant="path:/a") == ([], False)  # as an unknown id
    assert [r["id"] for r in (await store.files.list(after=theirs["id"]))[0]] == [mine["id"]]
