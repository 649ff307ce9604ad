"""C{/v1/files}: OpenAI's Files API, stored by the gateway itself (vLLM has none).

Uploads are parsed while they arrive (L{gomodel.api.uploads}): the file part
goes straight to the blob store, off the reactor, so a 512 MB upload never
sits in memory. Contents are sent back in chunks at the pace the client reads.
"""

from urllib.parse import quote

from klein import Klein

from gomodel.anthropic import files as anthropic_files
from gomodel.http.bodies import json_answer, page, query_arg, query_limit, whole_number
from gomodel.http.channel import GatewayChannel
from gomodel.http.render import install as install_error_handlers
from gomodel.api.producers import send_file
from gomodel.api.uploads import UPLOAD_PATHS, UploadSink
from gomodel.auth.tenancy import tenant_of, tenants_of, visible
from gomodel.errors import InvalidRequest, NotFound, shown
from gomodel.ids import held_nowhere
from gomodel.store.records import MESSAGE_BATCH_PURPOSE, OPENAI_BATCH, new_file_id

# What a client may upload (OpenAI's list); "batch_output" is ours to write.
UPLOAD_PURPOSES = ("batch", "fine-tune", "assistants", "user_data", "vision", "evals")
# The gateway's own files, which no route here lists, shows, serves or deletes (a message batch's requests).
INTERNAL_PURPOSES = (MESSAGE_BATCH_PURPOSE,)
LIST_LIMIT_MAX = 10000
EXPIRES_AFTER = (3600, 30 * 86400)  # an expiry policy's seconds (an upload's, a batch's output), as OpenAI bounds them
BUFFERED_CHUNK = 64 * 1024


def file_object(record) -> dict:
    """The OpenAI file object for a store record."""
    return {"id": record["id"], "object": "file", "bytes": record["bytes"], "created_at": record["created_at"],
            "filename": record["filename"], "purpose": record["purpose"], "status": record["status"],
            "expires_at": record["expires_at"], "status_details": None}


class FilesAPI:
    """The routes under C{/v1/files}, mounted by L{gomodel.api.app.GatewayApp}."""

    app = Klein()
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False  # a doubled slash is a 404, never a redirect (before any route)

    def __init__(self, files, blobs, max_bytes: int, batch_expiry=None, batches=None):
        """
        @param files: the L{gomodel.store.interfaces.IFileStore}.
        @param blobs: the L{gomodel.store.interfaces.IBlobStore} holding the contents.
        @param max_bytes: the largest file accepted (C{FILES_MAX_BYTES}).
        @param batch_expiry: the C{expires_after} seconds of a purpose C{batch} upload made without one
            (C{BATCH_INPUT_EXPIRES_AFTER}, OpenAI's 30 days), or None: it is kept until deleted.
        @param batches: the L{gomodel.store.interfaces.IBatchStore} whose answers an OpenAI batch's output or
            error file takes with it when deleted (its C{drop_file_results}), or None.
        """
        self._batches = batches
        self._files = files
        self._blobs = blobs
        self._max_bytes = max_bytes
        self._batch_expiry = batch_expiry

    # -- the listening side's hook ------------------------------------------------

    def upload_sink(self, request, method, path, length):
        """For L{gomodel.http.site.GatewaySite}: an L{UploadSink} for C{POST /v1/files}, else None.

        Called when the request's headers are in and accepted; the body has not been read.
        """
        if method != b"POST" or path not in UPLOAD_PATHS:
            return None
        sink = self._new_sink(request, length)
        # However the request ends (answered, refused, client gone mid-upload),
        # contents that were not stored are removed.
        request.notifyFinish().addBoth(lambda _: sink.discard())
        return sink

    def _new_sink(self, request, length):
        # The gateway's connection pauses its reading while the disk lags (a body already buffered, read by
        # another channel, needs no pause).
        channel = request.channel
        reader = channel if isinstance(channel, GatewayChannel) else None
        return UploadSink(self._blobs, self._max_bytes, request.getHeader(b"content-type"), length, reader)

    def _sink_for(self, request):
        content = request.content
        if isinstance(content, UploadSink):
            return content
        # Served without GatewaySite's streaming (in-memory tests, another
        # site): the body is already buffered, within BODY_SIZE_LIMIT.
        sink = self._new_sink(request, None)
        content.seek(0)
        while True:
            chunk = content.read(BUFFERED_CHUNK)
            if not chunk:
                break
            sink.write(chunk)
        return sink

    # -- routes ----------------------------------------------------------------

    @app.route("/", methods=["POST"])
    async def upload(self, request):
        sink = self._sink_for(request)
        try:
            await sink.finish()
            anthropic = anthropic_files.wants_anthropic_files(request)
            purpose = anthropic_files.UPLOAD_PURPOSE if anthropic else sink.fields.get("purpose")
            if not purpose:
                raise InvalidRequest("The upload needs a 'purpose' field (e.g. 'batch').", param="purpose",
                                     code="missing_required_parameter")
            if purpose not in UPLOAD_PURPOSES:
                raise InvalidRequest(f"'{purpose}' is not a valid purpose; use one of: {', '.join(UPLOAD_PURPOSES)}.",
                                     param="purpose", code="invalid_value")
            expires_after = anthropic_files.expires_in(sink.fields) if anthropic else _expires_after(sink.fields)
            if expires_after is None and purpose == "batch":
                expires_after = self._batch_expiry
            file_id = new_file_id()
            size = await sink.commit(file_id)
            try:
                record = await self._files.add(file_id, size, sink.filename, purpose,
                                               tenant_of(request.context.principal), expires_after)
            except BaseException:
                await self._blobs.delete(file_id)
                raise
        finally:
            await sink.discard()  # an upload refused leaves nothing behind once answered
        return json_answer(request, _shaped(request, record))

    @app.route("/", methods=["GET"])
    async def list_files(self, request):
        if anthropic_files.wants_anthropic_files(request):
            return json_answer(request, await self._anthropic_page(request))
        purpose = query_arg(request, b"purpose")
        order = query_arg(request, b"order") or "desc"
        if order not in ("asc", "desc"):
            raise InvalidRequest("'order' must be 'asc' or 'desc'.", param="order", code="invalid_value")
        limit = query_limit(request, LIST_LIMIT_MAX, LIST_LIMIT_MAX)
        records, has_more = await self._files.list(purpose=purpose, after=query_arg(request, b"after"),
                                                  limit=limit, order=order,
                                                  tenant=tenants_of(request.context.principal),
                                                  hide=INTERNAL_PURPOSES)
        return json_answer(request, page([file_object(r) for r in records], has_more))

    async def _anthropic_page(self, request):
        """Anthropic's list page: newest first, after C{after_id} (or the C{page} cursor) or before C{before_id}."""
        ids = request.args.get(b"ids[]") or request.args.get(b"ids")
        if ids:
            return anthropic_files.files_page(await self._asked(request, ids), False)
        limit = query_limit(request, anthropic_files.LIST_LIMIT, anthropic_files.LIST_LIMIT_MAX)
        before = query_arg(request, b"before_id")
        after = anthropic_files.page_cursor(query_arg(request, b"after_id"), query_arg(request, b"page"))
        tenant = tenants_of(request.context.principal)
        if before is not None:  # the files just newer than it, oldest first: reversed, the page before it
            records, has_more = await self._files.list(after=before, limit=limit, order="asc", tenant=tenant,
                                                      hide=INTERNAL_PURPOSES)
            return anthropic_files.files_page(records[::-1], has_more, before=True)
        records, has_more = await self._files.list(after=after, limit=limit, order="desc", tenant=tenant,
                                                  hide=INTERNAL_PURPOSES)
        return anthropic_files.files_page(records, has_more)

    async def _asked(self, request, ids):
        """The records of the files C{ids} (query values) names that the key may see, in the order asked."""
        names = list(dict.fromkeys(value.decode("utf-8", "replace") for value in ids))
        if len(names) > anthropic_files.IDS_MAX:
            raise InvalidRequest(f"'ids' names at most {anthropic_files.IDS_MAX} files.", param="ids",
                                 code="invalid_value")
        if query_arg(request, b"limit") is not None or query_arg(request, b"page") is not None:
            raise InvalidRequest("'ids' cannot be combined with 'limit' or 'page'.", param="ids", code="invalid_value")
        records = []
        for file_id in names:
            record = await self._files.get(file_id) if not held_nowhere(file_id) else None
            if record is not None and record["purpose"] not in INTERNAL_PURPOSES and visible(
                    request.context.principal, record):
                records.append(record)
        return records

    @app.route("/<file_id>", methods=["GET"])
    async def retrieve(self, request, file_id):
        return json_answer(request, _shaped(request, await self._record(request, file_id)))

    @app.route("/<file_id>", methods=["DELETE"])
    async def delete(self, request, file_id):
        record = await self._record(request, file_id)
        if record["purpose"] == "batch_output" and self._batches is not None:  # (first: the file names them)
            await self._batches.drop_file_results(file_id, OPENAI_BATCH)
        if not await self._files.delete(file_id):
            raise _no_file(file_id)
        await self._blobs.delete(file_id)  # if this fails, the sweep removes the orphan later
        if anthropic_files.wants_anthropic_files(request):
            return json_answer(request, {"id": file_id, "type": anthropic_files.DELETED})
        return json_answer(request, {"id": file_id, "object": "file", "deleted": True})

    @app.route("/<file_id>/content", methods=["GET"])
    async def content(self, request, file_id):
        record = await self._record(request, file_id)
        size = await self._blobs.size(file_id)
        if size is None:
            raise _no_file(file_id)
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-disposition", _attachment(record["filename"]))
        request.setHeader(b"x-content-type-options", b"nosniff")
        return await send_file(request, self._blobs, file_id, size)

    async def _record(self, request, file_id):
        """The record of a file the request's key may see; L{NotFound} otherwise."""
        return await client_file(self._files, request.context.principal, file_id)

    install_error_handlers(app)


async def client_file(files, principal, file_id, param="file_id"):
    """The record of file C{file_id} in C{files} (an L{gomodel.store.interfaces.IFileStore}) that C{principal}
    may see and that is no file of the gateway's own (L{INTERNAL_PURPOSES}).

    @raise NotFound: there is no such file (C{param} named), the store not asked where none can be (L{held_nowhere}).
    """
    record = await files.get(file_id) if not held_nowhere(file_id) else None
    if record is None or record["purpose"] in INTERNAL_PURPOSES or not visible(principal, record):
        raise _no_file(file_id, param)
    return record


def _shaped(request, record) -> dict:
    """The file object for C{record} in the shape of C{request}'s client: Anthropic's, or OpenAI's."""
    if anthropic_files.wants_anthropic_files(request):
        return anthropic_files.file_metadata(record)
    return file_object(record)


def _expires_after(fields):
    """The seconds of an upload's C{expires_after} (OpenAI's form fields C{expires_after[anchor]} and
    C{expires_after[seconds]}: L{expiry_seconds}), or None when it has none.

    @raise InvalidRequest: one of them is missing or out of bounds.
    """
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    return expiry_seconds(anchor, whole_number(seconds or "", 0, 2**53), "expires_after")


def expiry_seconds(anchor, seconds, param: str) -> int:
    """The seconds of an expiry policy: a file's C{expires_after}, a batch's C{output_expires_after}. Its
    C{anchor} must be C{created_at}; its C{seconds} an integer from an hour to 30 days.

    @raise InvalidRequest: either is missing or not so (C{param} named).
    """
    if anchor != "created_at":
        raise InvalidRequest(f"{param}[anchor] must be 'created_at'.", param=param, code="invalid_value")
    if type(seconds) is not int or not EXPIRES_AFTER[0] <= seconds <= EXPIRES_AFTER[1]:
        raise InvalidRequest(f"{param}[seconds] must be a whole number from {EXPIRES_AFTER[0]} to "
                             f"{EXPIRES_AFTER[1]} (an hour to 30 days).", param=param, code="invalid_value")
    return seconds


def _attachment(filename: str) -> bytes:
    """The C{Content-Disposition} of a file's contents: an attachment named C{filename} (RFC 6266: an ASCII
    fallback, each other character, quote or backslash an underscore, and the name itself as C{filename*})."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}".encode("ascii")


def _no_file(file_id, param="file_id"):
    return NotFound(f"No such File object: {shown(file_id)}", param=param, code="file_not_found")
