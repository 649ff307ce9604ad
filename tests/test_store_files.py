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
async def test_purposes_hidden_are_left_out_of_a_listing_and_its_pages(store):
    """C{hide}: the purposes a listing leaves out (the gateway's own files), its pages counted without them."""
    a = await add_file(store, purpose="batch")
    await add_file(store, purpose="message_batch")
    c = await add_file(store, purpose="batch_output")
    page = await store.files.list(limit=2, hide=("message_batch",))
    assert ([r["id"] for r in page[0]], page[1]) == ([c["id"], a["id"]], False)
    assert await store.files.list(purpose="message_batch", hide=("message_batch", "x")) == ([], False)
    assert len((await store.files.list())[0]) == 3

@pytest_twisted.ensureDeferred
async def test_a_tenants_listing_takes_only_its_own_files_as_cursor(store):
    async def add(file_id, tenant):
        size = await put_blob(store.blobs, file_id, b"x\n")
        return await store.files.add(file_id, size, "f.jsonl", "batch", tenant)

    mine, theirs = await add("file-a", "path:/a"), await add("file-b", "path:/b")
    assert await store.files.list(after=theirs["id"], tenant="path:/a") == ([], False)  # as an unknown id
    assert [r["id"] for r in (await store.files.list(after=theirs["id"]))[0]] == [mine["id"]]
    # Several tenants (a key's team's and its own): theirs, each a cursor.
    own = await add("file-c", "key:k")
    both = ("path:/a", "key:k")
    assert [r["id"] for r in (await store.files.list(tenant=both))[0]] == [own["id"], mine["id"]]
    assert [r["id"] for r in (await store.files.list(after=own["id"], tenant=both))[0]] == [mine["id"]]
    assert await store.files.list(after=theirs["id"], tenant=both) == ([], False)


@pytest_twisted.ensureDeferred
async def test_a_cursor_of_another_purpose_places_the_page_where_that_file_is(store):
    """OpenAI's cursor: C{after} is a place in the order, whatever the purpose of its file; an unknown id,
    another tenant's or an expired one lists nothing (none is a place to start from)."""
    async def add(file_id, purpose, tenant="path:/a", expires_after=None):
        size = await put_blob(store.blobs, file_id, b"x\n")
        return (await store.files.add(file_id, size, "f.jsonl", purpose, tenant, expires_after))["id"]

    b1 = await add("file-1", "batch")
    u2 = await add("file-2", "user_data")
    b3 = await add("file-3", "batch")
    u4 = await add("file-4", "user_data")
    b5 = await add("file-5", "batch")
    theirs = await add("file-6", "user_data", tenant="path:/b")
    brief = await add("file-7", "user_data", expires_after=3600)

    async def ids(**kwargs):
        records, has_more = await store.files.list(tenant="path:/a", **kwargs)
        return [r["id"] for r in records], has_more

    assert await ids(purpose="batch", after=u4) == ([b3, b1], False)
    assert await ids(purpose="batch", after=u2, order="asc") == ([b3, b5], False)
    assert await ids(purpose="batch", after=u4, limit=1) == ([b3], True)
    assert await ids(purpose="user_data", after=b3) == ([u2], False)
    assert await ids(purpose="user_data", after=b5, order="asc") == ([brief], False)
    assert await ids(purpose="batch", after=b5) == ([b3, b1], False)  # a cursor of its own purpose, as before
    assert await ids(purpose="batch", after=theirs) == ([], False)  # another tenant's: as unknown
    assert await ids(purpose="batch", after="file-nope") == ([], False)
    assert [r["id"] for r in (await store.files.list(purpose="batch", after=theirs))[0]] == [b5, b3, b1]
    store.clock.advance(3600)  # the brief one expires: not listed, still a place to start from
    assert await ids(purpose="user_data") == ([u4, u2], False)
    assert await ids(purpose="batch", after=brief) == ([b5, b3, b1], False)
    assert await ids(purpose="batch", after=u4) == ([b3, b1], False)


@pytest_twisted.ensureDeferred
async def test_a_deleted_files_place_stays_a_cursor_for_a_day(store):
    """A client deleting the files it pages through passes the deleted last one's id as the next page's
    cursor: its place is kept (a day), for its own tenant only."""
    made = [await add_file(store, b"x\n", f"{n}.jsonl", tenant="path:/a") for n in range(5)]
    files = store.files

    async def ids(**kwargs):
        records, has_more = await files.list(**kwargs)
        return [r["id"] for r in records], has_more

    assert await files.delete(made[3]["id"]) is True
    assert await ids(after=made[3]["id"], tenant="path:/a") == ([made[2]["id"], made[1]["id"], made[0]["id"]],
                                                               False)
    assert await ids(after=made[3]["id"], order="asc", limit=1) == ([made[4]["id"]], False)
    assert await ids(after=made[3]["id"], tenant="path:/b") == ([], False)  # another tenant's: as unknown
    store.clock.advance(86400 + 1)
    assert await files.delete(made[0]["id"]) is True  # a delete forgets places kept longer than a day
    assert await ids(after=made[3]["id"]) == ([], False)
    assert await ids(after=made[0]["id"], order="asc") == ([made[1]["id"], made[2]["id"], made[4]["id"]], False)
