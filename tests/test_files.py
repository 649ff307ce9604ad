"""/v1/files over real sockets: the openai SDK, streamed uploads with bounded memory, downloads with backpressure."""

import hashlib
import io
import json
import os
import tracemalloc

import openai
import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from gomodel import jsonutil
from tests.rawclient import connect
from tests.stores import storage  # noqa: F401 (a fixture)
from tests.support import (in_thread, openai_client, settled, start_gateway, track_connections, until,
                           with_timeout, write_buffer)

KEY = "files-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest_twisted.async_yield_fixture()
async def gw(reactor, fake, tmp_path):
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": KEY,
                                            "GOMODEL_DATA_DIR": str(tmp_path)})
    gateway.data_dir = tmp_path
    yield gateway
    await gateway.service.stopService()


@pytest_twisted.async_yield_fixture()
async def stored_gw(reactor, fake, tmp_path, storage):
    """The gateway of L{gw} on each store."""
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": KEY,
                                            "GOMODEL_DATA_DIR": str(tmp_path), **storage})
    yield gateway
    await gateway.service.stopService()


def spooled(gw):
    spool = gw.service.store.blobs.spool_dir
    return sorted(os.listdir(spool)) if os.path.exists(spool) else []


def multipart(fields, file_name="input.jsonl", content=b"{}\n", boundary="gomodel-test-boundary"):
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    if content is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
                     "Content-Type: application/jsonl\r\n\r\n".encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


async def post_upload(http, gw, body, content_type, headers=AUTH):
    response = await http.post(gw.url + "/v1/files", data=body, headers={"content-type": content_type, **headers})
    return response, jsonutil.loads(await treq.content(response))


# -- the SDK ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_deleting_the_files_while_the_sdk_pages_through_them_deletes_them_all(stored_gw):
    """The SDK asks each next page after the last id of the one before, which was deleted meanwhile."""
    with openai_client(stored_gw, KEY) as sdk:
        for n in range(5):
            await in_thread(sdk.files.create, file=(f"{n}.jsonl", b"{}\n"), purpose="batch")

        def delete_each():
            return [sdk.files.delete(f.id).deleted for f in sdk.files.list(limit=2)]

        assert await in_thread(delete_each) == [True] * 5
        assert (await in_thread(sdk.files.list)).data == []


@pytest_twisted.ensureDeferred
async def test_sdk_files_create_list_retrieve_content_delete(sdk, gw):
    data = b'{"custom_id":"a","method":"POST"}\n' * 3
    created = await in_thread(sdk.files.create, file=("input.jsonl", io.BytesIO(data)), purpose="batch")
    assert created.id.startswith("file-")
    assert (created.object, created.bytes, created.filename, created.purpose, created.status) == (
        "file", len(data), "input.jsonl", "batch", "processed")
    assert created.expires_at == created.created_at + 30 * 86400  # (OpenAI's for a batch upload)
    assert (gw.data_dir / "files" / created.id).read_bytes() == data  # contents on disk, beside the database

    other = await in_thread(sdk.files.create, file=("notes.txt", b"hello"), purpose="user_data")
    third = await in_thread(sdk.files.create, file=("more.jsonl", b"{}\n"), purpose="batch")

    retrieved = await in_thread(sdk.files.retrieve, created.id)
    assert retrieved.model_dump() == created.model_dump()

    listed = await in_thread(lambda: list(sdk.files.list()))
    assert [f.id for f in listed] == [third.id, other.id, created.id]  # newest first
    batch_only = await in_thread(lambda: list(sdk.files.list(purpose="batch", order="asc")))
    assert [f.id for f in batch_only] == [created.id, third.id]
    first_page = await in_thread(sdk.files.list, limit=2)
    assert [f.id for f in first_page.data] == [third.id, other.id]
    assert first_page.has_more is True
    # The SDK follows the cursor (after=<last id>) by itself.
    assert [f.id for f in await in_thread(lambda: list(sdk.files.list(limit=1)))] == [third.id, other.id, created.id]

    content = await in_thread(sdk.files.content, created.id)
    assert content.content == data

    deleted = await in_thread(sdk.files.delete, created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    assert not (gw.data_dir / "files" / created.id).exists()
    with pytest.raises(openai.NotFoundError):
        await in_thread(sdk.files.retrieve, created.id)
    with pytest.raises(openai.NotFoundError):
        await in_thread(sdk.files.content, created.id)
    with pytest.raises(openai.NotFoundError):
        await in_thread(sdk.files.delete, created.id)
    assert spooled(gw) == []


@pytest_twisted.ensureDeferred
async def test_contents_are_an_attachment_named_as_the_file(sdk, http, gw):
    """C{GET /v1/files/{id}/content} names the file it sends (C{Content-Disposition}, RFC 6266: an ASCII fallback
    and the name in UTF-8), so that C{curl -OJ}, C{wget --content-disposition} or a browser save it under its
    name, and says C{nosniff}; before, it named nothing (curl saved it as "content")."""
    for filename, fallback, encoded in (
            ("batch_in.jsonl", "batch_in.jsonl", "batch_in.jsonl"),
            ("r\u00e9sum\u00e9 v2;x.jsonl", "r_sum_ v2;x.jsonl", "r%C3%A9sum%C3%A9%20v2%3Bx.jsonl")):
        created = await in_thread(sdk.files.create, file=(filename, b"{}\n"), purpose="user_data")
        assert created.filename == filename
        response = await http.get(f"{gw.url}/v1/files/{created.id}/content", headers=AUTH)
        assert await treq.content(response) == b"{}\n"
        assert response.headers.getRawHeaders("content-disposition") == [
            f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"]
        assert response.headers.getRawHeaders("x-content-type-options") == ["nosniff"]


@pytest_twisted.ensureDeferred
async def test_an_upload_may_expire_as_openai_bounds_it(sdk, http, gw):
    created = await in_thread(sdk.files.create, file=("brief.jsonl", b"{}\n"), purpose="batch",
                              expires_after={"anchor": "created_at", "seconds": 3600})
    assert created.expires_at == created.created_at + 3600
    assert (await in_thread(sdk.files.retrieve, created.id)).expires_at == created.expires_at
    for fields in ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "3599"},
                   {"expires_after[anchor]": "created_at", "expires_after[seconds]": str(30 * 86400 + 1)},
                   {"expires_after[anchor]": "created_at", "expires_after[seconds]": "1_0000"},
                   {"expires_after[anchor]": "created_at"},
                   {"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"},
                   {"expires_after[seconds]": "3600"}):
        body, content_type = multipart({"purpose": "batch", **fields})
        response, answer = await post_upload(http, gw, body, content_type)
        assert response.code == 400, fields
        assert (answer["error"]["param"], answer["error"]["code"]) == ("expires_after", "invalid_value")
    assert spooled(gw) == []


@pytest_twisted.ensureDeferred
async def test_a_batch_upload_expires_after_30_days_by_default_as_openais(sdk, reactor, fake, tmp_path):
    """OpenAI: "files with purpose=batch expire after 30 days" unless the upload says otherwise; every other
    purpose is kept until deleted. C{BATCH_INPUT_EXPIRES_AFTER} sets that default (0: kept); before, a batch
    input file was kept for good."""
    created = await in_thread(sdk.files.create, file=("in.jsonl", b"{}\n"), purpose="batch")
    assert created.expires_at == created.created_at + 30 * 86400
    assert (await in_thread(sdk.files.retrieve, created.id)).expires_at == created.expires_at
    chosen = await in_thread(sdk.files.create, file=("in.jsonl", b"{}\n"), purpose="batch",
                             expires_after={"anchor": "created_at", "seconds": 7200})
    assert chosen.expires_at == chosen.created_at + 7200
    kept = await in_thread(sdk.files.create, file=("data.jsonl", b"{}\n"), purpose="user_data")
    assert kept.expires_at is None
    for setting, expected in (("1h", 3600), ("0", None)):
        gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": KEY,
                                                "GOMODEL_DATA_DIR": str(tmp_path / setting),
                                                "BATCH_INPUT_EXPIRES_AFTER": setting})
        client = openai_client(gateway, KEY, timeout=20)
        try:
            made = await in_thread(client.files.create, file=("in.jsonl", b"{}\n"), purpose="batch")
            assert made.expires_at == (None if expected is None else made.created_at + expected)
        finally:
            client.close()
            await gateway.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_listing_cursor_of_another_purpose_starts_the_page_at_its_place(http, stored_gw):
    """C{after} is a place in the order, as OpenAI's cursor: a file of another purpose is one too (it
    listed nothing). An unknown id, and another tenant's, list nothing: the same empty page."""
    gw = stored_gw

    async def upload(purpose, headers=AUTH):
        body, content_type = multipart({"purpose": purpose})
        response, created = await post_upload(http, gw, body, content_type, headers)
        assert response.code == 200, created
        return created["id"]

    async def listed(query, headers=AUTH):
        response = await http.get(f"{gw.url}/v1/files?{query}", headers=headers)
        answer = jsonutil.loads(await treq.content(response))
        assert response.code == 200, answer
        return [f["id"] for f in answer["data"]], answer["has_more"]

    b1, u2, b3, u4, b5 = [await upload(p) for p in ("batch", "user_data", "batch", "user_data", "batch")]
    assert await listed(f"purpose=batch&after={u4}") == ([b3, b1], False)
    assert await listed(f"purpose=batch&after={u2}&order=asc") == ([b3, b5], False)
    assert await listed(f"purpose=batch&after={u4}&limit=1") == ([b3], True)
    assert await listed(f"purpose=user_data&after={b5}") == ([u4, u2], False)
    assert await listed("purpose=batch&after=file-nope") == ([], False)
    # The SDK follows the cursor page by page.
    sdk = openai_client(gw, KEY)
    try:
        pages = await in_thread(lambda: [f.id for f in sdk.files.list(purpose="batch", limit=1)])
    finally:
        sdk.close()
    assert pages == [b5, b3, b1]

    # Another tenant's file is no cursor for a managed key (nothing tells it the id exists).
    response = await http.post(gw.url + "/admin/api/v1/auth-keys", data=json.dumps({"name": "other"}).encode(),
                               headers=AUTH)
    key = jsonutil.loads(await treq.content(response))
    assert response.code == 201, key
    other = {"authorization": f"Bearer {key['value']}"}
    mine = await upload("batch", other)
    assert await listed(f"purpose=batch&after={u4}", other) == ([], False)
    assert await listed("purpose=batch&after=file-nope", other) == ([], False)
    assert await listed(f"purpose=batch&after={b3}", other) == ([], False)
    assert await listed("purpose=batch", other) == ([mine], False)
    assert await listed(f"purpose=batch&after={mine}") == ([b5, b3, b1], False)  # the master key sees all


async def exchange(reactor, gw, method, path):
    """One request on its own connection, as sent on the wire: (status line, {lowercase name: [values]}, body)."""
    request = (f"{method} {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {KEY}\r\n"
               "Accept-Encoding: gzip, deflate\r\nConnection: close\r\n\r\n").encode()
    client = await connect(reactor, gw.port, request)
    await with_timeout(reactor, client.lost, 5)
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers, body


@pytest_twisted.ensureDeferred
async def test_head_answers_the_headers_of_get_without_a_body(reactor, http, stored_gw):
    """HEAD of a file's contents (and of the file, and of one unknown) has GET's status and headers, on the
    wire, and no body; neither has a Content-Encoding (the contents are sent as stored).

    (treq's client shows a C{Content-Encoding: ''} on every answer without one: Twisted's
    C{ContentDecoderAgent} puts back the empty name it split from the absent header. The wire has none.)
    """
    gw = stored_gw
    data = b'{"custom_id":"a"}\n' * 100
    body, content_type = multipart({"purpose": "batch"}, content=data)
    _, created = await post_upload(http, gw, body, content_type)
    empty_body, content_type = multipart({"purpose": "batch"}, content=b"")
    _, empty = await post_upload(http, gw, empty_body, content_type)
    for path, status, length in ((f"/v1/files/{created['id']}/content", b"HTTP/1.1 200 OK", len(data)),
                                 (f"/v1/files/{empty['id']}/content", b"HTTP/1.1 200 OK", 0),
                                 (f"/v1/files/{created['id']}", b"HTTP/1.1 200 OK", None),
                                 ("/v1/files/file-nope/content", b"HTTP/1.1 404 Not Found", None)):
        got_status, got, got_body = await exchange(reactor, gw, "GET", path)
        head_status, head, head_body = await exchange(reactor, gw, "HEAD", path)
        assert (head_status, got_status) == (status, status), path
        assert head_body == b"", path
        assert b"content-encoding" not in got and b"content-encoding" not in head, path
        for per_request in (b"date", b"x-request-id"):
            got.pop(per_request), head.pop(per_request)
        assert head == got, path
        assert got[b"content-length"] == [b"%d" % len(got_body)], path
        if length is not None:
            assert got_body == (data if length else b""), path
            assert got[b"content-type"] == [b"application/octet-stream"], path


# -- refused uploads -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_uploads_are_refused_with_openai_errors(reactor, http, gw):
    cases = [
        (multipart({}), 400, "purpose"),
        (multipart({"purpose": "batch_output"}), 400, "purpose"),
        (multipart({"purpose": "nonsense"}), 400, "purpose"),
        (multipart({"purpose": "batch"}, content=None), 400, "file"),
        (multipart({"purpose": "x" * 70000}), 400, "purpose"),
        (multipart({"purpose": "NOT-UTF-8"}), 400, "purpose"),  # (sent as the byte FF)
        (multipart({"purpose": "batch", "file": "x"}), 400, "file"),  # two 'file' parts
    ]
    for (body, content_type), status, param in cases:
        body = body.replace(b"NOT-UTF-8", b"\xff")
        response, error = await post_upload(http, gw, body, content_type)
        assert response.code == status, error
        assert set(error["error"]) == {"message", "type", "param", "code"}
        assert error["error"]["param"] == param
        assert error["error"]["code"], error  # every 4xx names its code
    response, error = await post_upload(http, gw, b'{"purpose":"batch"}', "application/json")
    assert response.code == 400
    assert error["error"]["code"] == "invalid_content_type"
    body, content_type = multipart({"purpose": "batch"})
    response, error = await post_upload(http, gw, body[: len(body) // 2], content_type)  # cut short
    assert response.code == 400
    assert error["error"]["code"] == "invalid_multipart"
    response, error = await post_upload(http, gw, body, content_type, headers={})
    assert response.code == 401
    listed = jsonutil.loads(await treq.content(await http.get(gw.url + "/v1/files", headers=AUTH)))
    assert listed == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    # The 401 is answered before any route runs; its upload's writes are
    # discarded when the request ends, in the blob threads (never on the reactor): every request was answered,
    # so none is spooled anew; waited for as long as a loaded machine's threads take (a quiet spell was too short).
    await until(reactor, lambda: spooled(gw) == [], what="the uploads' spooled parts removed")


@pytest_twisted.ensureDeferred
async def test_file_over_files_max_bytes_gets_413(reactor, http, fake, tmp_path):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "FILES_MAX_BYTES": "4KB",
                                       "GOMODEL_DATA_DIR": str(tmp_path)})
    try:
        ok_body, content_type = multipart({"purpose": "batch"}, content=b"x" * 4096)
        response = await http.post(gw.url + "/v1/files", data=ok_body, headers={"content-type": content_type})
        assert response.code == 200, await treq.content(response)
        big, content_type = multipart({"purpose": "batch"}, content=b"x" * 4097)
        response = await http.post(gw.url + "/v1/files", data=big, headers={"content-type": content_type})
        error = jsonutil.loads(await treq.content(response))["error"]
        assert response.code == 413
        assert error["code"] == "request_too_large"
        assert "FILES_MAX_BYTES" in error["message"]
        # A Content-Length past the limit is refused without parsing the body.
        huge, content_type = multipart({"purpose": "batch"}, content=b"x" * (2 * 1024 * 1024))
        response = await http.post(gw.url + "/v1/files", data=huge, headers={"content-type": content_type})
        assert response.code == 413
        await treq.content(response)
        assert spooled(gw) == []
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_filename_star_names_the_file_as_dotnet_and_rfc_5987_clients_send_it(http, gw):
    # .NET's HttpClient (the OpenAI .NET SDK's uploads) sends a MIME-encoded filename beside the real one in
    # filename*; older clients send filename* alone. Either way the file keeps the name the client gave it.
    cases = [
        ("name=file; filename=\"=?utf-8?B?csOpc3Vtw6kuanNvbmw=?=\"; filename*=utf-8''r%C3%A9sum%C3%A9.jsonl",
         "résumé.jsonl"),
        ("name=file; filename=input.jsonl; filename*=utf-8''input.jsonl", "input.jsonl"),
        ("name=\"file\"; filename*=UTF-8''%E2%82%AC%20rates.jsonl", "€ rates.jsonl"),
        ("name=\"file\"; filename*=iso-8859-1'en'caf%E9.jsonl", "café.jsonl"),
        ("name=\"file\"; filename=\"plain.jsonl\"; filename*=utf-8''bad%FF.jsonl", "plain.jsonl"),  # not UTF-8
        ("name=\"file\"; filename=\"plain.jsonl\"; filename*=koi8-r''x.jsonl", "plain.jsonl"),  # not RFC 5987's
        ("name=\"file\"; filename*=utf-8''..%2F..%2Fetc%2Fpasswd", "passwd"),
    ]
    for disposition, expected in cases:
        body = ('--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                f"--b\r\nContent-Disposition: form-data; {disposition}\r\n\r\n{{}}\n\r\n--b--\r\n").encode()
        response, created = await post_upload(http, gw, body, "multipart/form-data; boundary=b")
        assert response.code == 200, created
        assert created["filename"] == expected, disposition


@pytest_twisted.ensureDeferred
async def test_a_filename_sent_in_latin_1_is_read_as_such_and_one_in_utf_8_as_utf_8(http, gw):
    # RFC 7578 asks for UTF-8; older clients (Java's, a Windows code page) send ISO-8859-1 bytes. Neither is a
    # reason to refuse the upload.
    for raw, expected in ((b"caf\xe9 \xbd.jsonl", "café ½.jsonl"), ("café ½ 文件.jsonl".encode(), "café ½ 文件.jsonl")):
        body = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                b'--b\r\nContent-Disposition: form-data; name="file"; filename="' + raw + b'"\r\n\r\n{}\n\r\n--b--\r\n')
        response, created = await post_upload(http, gw, body, "multipart/form-data; boundary=b")
        assert response.code == 200, created
        assert created["filename"] == expected


@pytest_twisted.ensureDeferred
async def test_a_field_not_valid_in_its_declared_charset_is_a_400_that_names_it(http, gw):
    """A field's part that names its charset is read in it; text not valid in it is a 400 naming it (a codec that
    fails with a bare UnicodeError, punycode's, was a 500), one no codec reads a 400 saying so."""
    for charset, text, said in (("punycode", b"abc-9999999999", "is not valid punycode"),
                                ("utf-8", b"batch\xff", "is not valid utf-8"),
                                ("x-unheard-of", b"batch", "names a charset the gateway does not know")):
        body = (f'--b\r\nContent-Disposition: form-data; name="purpose"\r\nContent-Type: text/plain; '
                f'charset={charset}\r\n\r\n').encode() + text + b"\r\n" + \
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{}\n\r\n--b--\r\n'
        response, error = await post_upload(http, gw, body, "multipart/form-data; boundary=b")
        assert response.code == 400, error
        assert (error["error"]["param"], error["error"]["code"]) == ("purpose", "invalid_value"), error
        assert said in error["error"]["message"], error


@pytest_twisted.ensureDeferred
async def test_a_filename_holding_a_nul_is_refused_alike_on_every_store_before_anything_is_stored(http, stored_gw):
    # PostgreSQL cannot keep a NUL in a text: the name is refused as it arrives, on SQLite too, as the file's.
    for disposition in ('name="file"; filename="a\x00b.jsonl"', "name=\"file\"; filename*=utf-8''a%00b.jsonl"):
        body = ('--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                f"--b\r\nContent-Disposition: form-data; {disposition}\r\n\r\n{{}}\n\r\n--b--\r\n").encode()
        response, error = await post_upload(http, stored_gw, body, "multipart/form-data; boundary=b")
        assert response.code == 400, error
        assert (error["error"]["param"], error["error"]["code"]) == ("file", "invalid_value")
        assert "NUL" in error["error"]["message"]
    listed = jsonutil.loads(await treq.content(await http.get(stored_gw.url + "/v1/files", headers=AUTH)))
    assert listed["data"] == []


@pytest_twisted.ensureDeferred
async def test_bad_list_parameters(http, gw):
    for query in ("limit=0", "limit=10001", "limit=x", "order=sideways"):
        response = await http.get(gw.url + "/v1/files?" + query, headers=AUTH)
        assert response.code == 400
        assert jsonutil.loads(await treq.content(response))["error"]["param"] in ("limit", "order")


# -- big files, real sockets ---------------------------------------------------------------

BIG = 64 * 1024 * 1024
CHUNK = 64 * 1024


def big_chunks(total=BIG):
    """Deterministic JSONL-ish content, produced chunk by chunk (never held whole)."""
    line = b'{"custom_id":"%08d","pad":"' + b"x" * 100 + b'"}\n'
    block = b"".join(line % i for i in range(CHUNK // len(line) + 1))[:CHUNK]
    sent = 0
    while sent < total:
        piece = block[: min(CHUNK, total - sent)]
        sent += len(piece)
        yield piece


class StreamingUpload(Protocol):
    """Sends a multipart upload whose file part is generated as the socket drains (a pull producer)."""

    def __init__(self, content_length, head, chunks, tail):
        self._head = head
        self._chunks = chunks
        self._tail = tail
        self._content_length = content_length
        self.received = bytearray()
        self.done = Deferred()
        self.sha256 = hashlib.sha256()
        self.stop_after = None  # bytes of file content after which the client vanishes
        self.sent = 0

    def connectionMade(self):
        self.transport.write(b"POST /v1/files HTTP/1.1\r\nHost: gateway\r\n"
                             b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                             b"Content-Type: multipart/form-data; boundary=BIGBOUNDARY\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % self._content_length + self._head)
        self.transport.registerProducer(self, False)

    def resumeProducing(self):
        chunk = next(self._chunks, None)
        if chunk is None:
            self.transport.unregisterProducer()
            self.transport.write(self._tail)
            return
        self.sha256.update(chunk)
        self.sent += len(chunk)
        self.transport.write(chunk)
        if self.stop_after is not None and self.sent >= self.stop_after:
            self.transport.unregisterProducer()
            self.transport.abortConnection()

    def stopProducing(self):
        pass

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.done.callback(bytes(self.received))


def big_upload(total=BIG):
    head = (b'--BIGBOUNDARY\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--BIGBOUNDARY\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n")
    tail = b"\r\n--BIGBOUNDARY--\r\n"
    return StreamingUpload(len(head) + total + len(tail), head, big_chunks(total), tail)


@pytest_twisted.ensureDeferred
async def test_64mb_upload_streams_to_disk_with_bounded_memory(reactor, http, gw):
    client = big_upload()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gw.port), client)
        raw = await with_timeout(reactor, client.done, 60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:500]
    created = json.loads(body)
    assert created["bytes"] == BIG
    # Everything the upload allocated at its worst moment (both ends of the
    # socket run in this process) is a small fraction of the file.
    assert peak - before < 8 * 1024 * 1024, f"peak {peak - before} bytes for a {BIG}-byte upload"
    assert (gw.data_dir / "files" / created["id"]).stat().st_size == BIG
    assert spooled(gw) == []

    # Downloaded back, chunk by chunk, it is the same bytes.
    response = await http.get(f"{gw.url}/v1/files/{created['id']}/content", headers=AUTH)
    assert response.code == 200
    digest, size = hashlib.sha256(), []
    await treq.collect(response, lambda data: (digest.update(data), size.append(len(data))))
    assert sum(size) == BIG
    assert digest.hexdigest() == client.sha256.hexdigest()


@pytest_twisted.ensureDeferred
async def test_download_follows_the_client_pace(reactor, gw):
    file_id = await upload_big(reactor, gw, 32 * 1024 * 1024)
    connections = track_connections(gw)
    request = (f"GET /v1/files/{file_id}/content HTTP/1.1\r\nHost: gateway\r\n"
               f"Authorization: Bearer {KEY}\r\n\r\n").encode()
    client = await connect(reactor, gw.port, request)
    await client.wait_for(b"\r\n\r\n")
    client.transport.pauseProducing()  # the client stops reading
    [channel] = connections
    transport = channel.transport
    await settled(reactor, lambda: write_buffer(transport))
    assert write_buffer(transport) < 1024 * 1024, "the gateway read the file faster than the client took it"
    client.transport.resumeProducing()
    await with_timeout(reactor, client.wait_for(b'"pad":"xxxxxxxx'), 5)
    client.transport.abortConnection()
    await client.lost


async def upload_big(reactor, gw, total):
    client = big_upload(total)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gw.port), client)
    raw = await with_timeout(reactor, client.done, 60)
    return json.loads(raw.partition(b"\r\n\r\n")[2])["id"]


@pytest_twisted.ensureDeferred
async def test_client_vanishing_mid_upload_leaves_nothing_behind(reactor, http, gw):
    connections = track_connections(gw)
    client = big_upload(8 * 1024 * 1024)
    client.stop_after = 2 * 1024 * 1024
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gw.port), client)
    await with_timeout(reactor, client.done, 10)
    # The gateway's side of the connection lost (read late on a loaded machine: a quiet spell of the spool before
    # it was no sign), then what it spooled removed, and nothing spooled since.
    await until(reactor, lambda: connections and connections[0].transport.disconnected,
                what="the upload's connection lost")
    await until(reactor, lambda: spooled(gw) == [], what="the upload's spooled part removed")
    assert await settled(reactor, lambda: spooled(gw), interval=0.02, quiet=3, limit=5) == []
    listed = jsonutil.loads(await treq.content(await http.get(gw.url + "/v1/files", headers=AUTH)))
    assert listed["data"] == []
