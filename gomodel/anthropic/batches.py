"""Anthropic's Message Batches API, C{/v1/messages/batches}, on the gateway's own batches.

A message batch is one of the gateway's batches (L{gomodel.batches.runner})
whose endpoint is C{/v1/messages}: its requests, given inline, are written as
its input file (OpenAI's batch lines, owned by the key's tenant, purpose
L{gomodel.store.records.MESSAGE_BATCH_PURPOSE}: the gateway's own, which
C{/v1/files} does not show; deleting the batch removes it), and it runs,
resumes, expires and is cancelled as every batch does, on whichever host has
room. Each request goes to its model's provider as an
online Messages request would (L{gomodel.anthropic.batch_lines}): natively to
a vLLM, otherwise translated to chat completions, its answer made a message.

What the routes show is Anthropic's: the C{message_batch} object
(C{processing_status} C{in_progress}, C{canceling} or C{ended}, its
C{request_counts}), Anthropic's list pages (C{after_id}, C{before_id},
C{limit}), and the results as JSONL, one C{{"custom_id", "result"}} per
request, C{succeeded}, C{errored}, C{canceled} or C{expired}. A request not run
when its batch was cancelled is recorded as canceled
(L{gomodel.batches.concluding}). Its kind (L{MESSAGE_BATCH}) keeps it apart:
these routes show message batches only, and the OpenAI routes
(C{/v1/batches}) none of them (nor these routes an OpenAI batch of endpoint
C{/v1/messages}).
"""

import re
from collections import OrderedDict
from datetime import datetime, timezone

from klein import Klein

from gomodel import jsonutil
from gomodel.anthropic.file_sources import MAX_BATCH, FileSources, file_blocks
from gomodel.anthropic.translate import ANTHROPIC_ERROR_TYPES, is_anthropic_error, openai_error_to_anthropic
from gomodel.api.batches import within_budgets
from gomodel.api.inference import resolve_model
from gomodel.api.producers import send_pages
from gomodel.auth.tenancy import tenant_of, tenants_of, visible
from gomodel.batches.concluding import CANCELLED_CODE, EXPIRED_CODE
from gomodel.batches.lines import PAGE_BYTES
from gomodel.errors import Conflict, GatewayError, InvalidRequest, NotFound, shown
from gomodel.http.bodies import json_answer, json_body, query_arg, query_limit
from gomodel.http.render import install as install_error_handlers
from gomodel.ids import held_nowhere
from gomodel.store.records import MESSAGE_BATCH, MESSAGE_BATCH_PURPOSE, new_file_id

ENDPOINT = "/v1/messages"
MAX_REQUESTS = 100_000  # Anthropic's limit
WINDOW = "24h"  # Anthropic's batches expire 24 hours after they are made
WINDOW_SECONDS = 24 * 3600.0
_CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
ENDED = {"completed": "completed_at", "failed": "failed_at", "expired": "expired_at", "cancelled": "cancelled_at"}
RESULTS_PAGE = 500
SPLIT_CACHE = 1000  # ended batches whose counts of canceled and expired requests are kept


def message_batch(record, counts, now=None) -> dict:
    """Anthropic's C{message_batch} object for a batch record, with its C{request_counts}; C{archived_at} once
    its results expired by C{now} (L{archived_at})."""
    status = record["status"]
    ended = ENDED.get(status)
    archived = archived_at(record)
    return {
        "id": record["id"], "type": "message_batch",
        "processing_status": "ended" if ended else "canceling" if status == "cancelling" else "in_progress",
        "request_counts": counts, "ended_at": _rfc3339(record[ended] if ended else None),
        "created_at": _rfc3339(record["created_at"]), "expires_at": _rfc3339(record["expires_at"]),
        "archived_at": _rfc3339(archived if archived is not None and now is not None and now >= archived else None),
        "cancel_initiated_at": _rfc3339(record["cancelling_at"]),
        # (a path: a client resolves it against the gateway it asked, whatever name or proxy it is behind)
        "results_url": f"/v1/messages/batches/{record['id']}/results" if ended else None,
    }


def archived_at(record):
    """When an ended message batch's results expire (Anthropic's archival: the batch is still shown, its results
    are not), its C{output_expires_after} after it ended (C{MESSAGE_BATCH_RESULTS_EXPIRE_AFTER}: its output and
    error files expire then, the files sweep taking their answers); None: never, or not ended."""
    ended = ENDED.get(record["status"])
    if ended is None or record[ended] is None or record["output_expires_after"] is None:
        return None
    return record[ended] + record["output_expires_after"]


def _rfc3339(seconds):
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def result_line(row) -> bytes:
    """One line of Anthropic's results for a recorded result C{(line, custom_id, ok, data)} (OpenAI's
    output or error line)."""
    _, custom_id, ok, data = row
    data = jsonutil.loads(data)
    response = data.get("response")
    if response is not None:  # (an answer that is no JSON is recorded not ok, as the gateway's 502)
        status, body = response["status_code"], response["body"]
        if ok:
            result = {"type": "succeeded", "message": body}
        else:
            result = {"type": "errored", "error": _anthropic_error(status if status >= 400 else 502, body)}
    else:
        error = data["error"]
        if error["code"] == EXPIRED_CODE:
            result = {"type": "expired"}
        elif error["code"] == CANCELLED_CODE:
            result = {"type": "canceled"}
        else:  # no answer: the gateway's own error (the line's model, its key's budget, the upstream unreachable)
            result = {"type": "errored", "error": {"type": "error", "error": {
                "type": _error_type(error["code"]), "message": error["message"]}}}
    return jsonutil.dumps({"custom_id": custom_id, "result": result}) + b"\n"


def _error_type(code) -> str:
    """Anthropic's error type for the code of a request the gateway answered itself."""
    for part, kind in _ERROR_TYPES:
        if part in code:
            return kind
    return "api_error"


_ERROR_TYPES = (("api_key", "authentication_error"), ("not_found", "not_found_error"), ("budget", "rate_limit_error"),
                ("rate_limit", "rate_limit_error"),
                ("access_denied", "permission_error"), ("forbidden", "permission_error"),
                ("invalid", "invalid_request_error"), ("ambiguous", "invalid_request_error"),
                ("timeout", "timeout_error"))


def _anthropic_error(status, body) -> dict:
    """An upstream's error answer (as recorded) in Anthropic's shape: as it is when it is one already, type
    included (else, vLLM's exception names, the type follows the status)."""
    if is_anthropic_error(body) and body["error"].get("type") in ANTHROPIC_ERROR_TYPES:
        return body
    return jsonutil.loads(openai_error_to_anthropic(status, jsonutil.dumps(body)))


def check_requests(value, registry, principal) -> bytes:
    """The input file (OpenAI's batch lines for C{/v1/messages}) of Anthropic's C{requests}.

    @raise InvalidRequest: a request is malformed, or two share a C{custom_id}.
    @raise GatewayError: a request's model (at the provider its C{provider} hint names, as online) is unknown, or
        not the key's to use, or its hint names no configured provider (L{resolve_model}'s).
    """
    if not isinstance(value, list) or not value:
        raise InvalidRequest("requests: a list of at least one request is required.", param="requests")
    if len(value) > MAX_REQUESTS:
        raise InvalidRequest(f"requests: at most {MAX_REQUESTS} requests per batch.", param="requests")
    seen, models, lines = set(), set(), []
    for number, item in enumerate(value):
        where = f"requests.{number}"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where}: must be an object with 'custom_id' and 'params'.", param="requests")
        custom_id, params = item.get("custom_id"), item.get("params")
        if not isinstance(custom_id, str) or not _CUSTOM_ID.fullmatch(custom_id):
            raise InvalidRequest(f"{where}.custom_id: 1 to 64 letters, digits, '_' or '-' are required.",
                                 param="requests")
        if custom_id in seen:
            raise InvalidRequest(f"{where}.custom_id: '{custom_id}' is used by an earlier request; each "
                                 "must be unique within the batch.", param="requests")
        seen.add(custom_id)
        if not isinstance(params, dict):
            raise InvalidRequest(f"{where}.params: an object of Messages API parameters is required.",
                                 param="requests")
        model = params.get("model")
        if not isinstance(model, str) or not model.strip():
            raise InvalidRequest(f"{where}.params.model: a model is required.", param="requests")
        max_tokens = params.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InvalidRequest(f"{where}.params.max_tokens: a positive integer is required.", param="requests")
        if not isinstance(params.get("messages"), list):
            raise InvalidRequest(f"{where}.params.messages: a list of messages is required.", param="requests")
        if params.get("stream") not in (None, False):
            raise InvalidRequest(f"{where}.params.stream: batch requests cannot stream.", param="requests")
        hint = params.get("provider")  # (GoModel's routing hint, as online: the model at that provider)
        checked = (model, hint) if hint is None or isinstance(hint, str) else None  # (None: refused just below)
        if checked is None or checked not in models:
            models.add(checked)
            try:
                resolve_model(registry, {"model": model, "provider": hint}, principal)
            except GatewayError as e:
                e.message = f"{where}.params.{'provider' if e.param == 'provider' else 'model'}: {e.message}"
                raise
        lines.append(jsonutil.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": params}))
    return b"\n".join(lines) + b"\n"


class MessageBatchesAPI:
    """The routes under C{/v1/messages/batches}, mounted by L{gomodel.api.app.GatewayApp}."""

    app = Klein()
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False

    def __init__(self, batches, files, blobs, runner, registry, gate=None, results_expiry=None, clock=None):
        """
        @param batches: the L{gomodel.store.interfaces.IBatchStore}.
        @param files: the L{gomodel.store.interfaces.IFileStore} (a batch's input, output and error files).
        @param blobs: the L{gomodel.store.interfaces.IBlobStore} (their contents).
        @param runner: the L{gomodel.batches.runner.BatchRunner}.
        @param registry: the L{gomodel.routing.registry.ModelRegistry} (each request's model is checked).
        @param gate: the L{gomodel.limits.gate.Gate} (a managed key's spent budget refuses a batch), or None.
        @param results_expiry: the seconds a batch's results are kept once it ended
            (C{MESSAGE_BATCH_RESULTS_EXPIRE_AFTER}, Anthropic's 29 days), or None: kept until it is deleted.
        @param clock: an C{IReactorTime} (when results expired); needed with C{results_expiry}.
        """
        self._results_expiry = results_expiry
        self._clock = clock
        self._batches = batches
        self._files = files
        self._blobs = blobs
        self._runner = runner
        self._registry = registry
        self._gate = gate
        self._file_sources = FileSources(files, blobs)
        self._splits = OrderedDict()  # ended batch id -> (canceled, expired): it never changes

    @app.route("/", methods=["POST"])
    async def create(self, request):
        body = json_body(request)
        principal = request.context.principal
        await self._with_files(body.get("requests"), principal)
        contents = check_requests(body.get("requests"), self._registry, principal)
        await within_budgets(self._gate, principal)
        tenant = tenant_of(principal)
        writer = self._blobs.create()
        try:
            await writer.write(contents)
            file_id = new_file_id()
            size = await writer.commit(file_id)
        except BaseException:
            await writer.abort()
            raise
        try:
            # (its requests: no use once the batch ended; they go when its results do, at the latest)
            await self._files.add(file_id, size, "message_batch_requests.jsonl", MESSAGE_BATCH_PURPOSE, tenant,
                                  None if self._results_expiry is None else int(WINDOW_SECONDS) + self._results_expiry)
        except BaseException:
            await self._blobs.delete(file_id)
            raise
        try:
            record = await self._runner.create(ENDPOINT, file_id, WINDOW, WINDOW_SECONDS, None,
                                               output_expiry=self._results_expiry, tenant=tenant,
                                               auth_key_id=None if principal is None or principal.master
                                               else principal.id, total=contents.count(b"\n"),
                                               kind=MESSAGE_BATCH)
        except BaseException:
            await self._files.delete(file_id)
            await self._blobs.delete(file_id)
            raise
        return json_answer(request, await self._object(record))

    async def _with_files(self, requests, principal):
        """Put in C{requests}' blocks that name an uploaded file its contents, as online (L{FileSources})."""
        blocks = []
        for number, item in enumerate(requests if isinstance(requests, list) else ()):
            params = item.get("params") if isinstance(item, dict) else None
            if isinstance(params, dict):
                blocks.extend((f"requests.{number}.params.{where}", block) for where, block in file_blocks(params))
        if blocks:
            await self._file_sources.resolve(blocks, principal, MAX_BATCH)

    @app.route("/", methods=["GET"])
    async def list_batches(self, request):
        """Anthropic's page, newest first: C{limit} (1-1000, 20), after C{after_id} or before C{before_id}."""
        limit = query_limit(request, 20, 1000)
        after, before = query_arg(request, b"after_id"), query_arg(request, b"before_id")
        if after is not None and before is not None:
            raise InvalidRequest("Give after_id or before_id, not both.", param="before_id")
        tenant = tenants_of(request.context.principal)
        for cursor, name in ((after, "after_id"), (before, "before_id")):
            if cursor is not None:
                await self._get(request, cursor, name)  # (one this key may see, or a 404)
        if before is None:
            records, more = await self._batches.list(after=after, limit=limit, tenant=tenant, kind=MESSAGE_BATCH)
        else:
            records, more = await self._newer(before, limit, tenant)
        data = [await self._object(r) for r in records]
        return json_answer(request, {"data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
                                     "last_id": data[-1]["id"] if data else None})

    async def _newer(self, before, limit, tenant):
        """C{(records, has_more)}: the C{limit} batches made just after C{before}, newest first (and whether
        newer ones are left), from the newest pages down to it."""
        newer, after = [], None
        while True:
            records, more = await self._batches.list(after=after, limit=100, tenant=tenant, kind=MESSAGE_BATCH)
            ids = [r["id"] for r in records]
            if before in ids:
                newer += records[:ids.index(before)]
                break
            newer += records
            if not more:
                break
            after = ids[-1]
        return newer[-limit:], len(newer) > limit

    @app.route("/<batch_id>", methods=["GET"])
    async def retrieve(self, request, batch_id):
        record = await self._get(request, batch_id)
        return json_answer(request, await self._object(record))

    @app.route("/<batch_id>/cancel", methods=["POST"])
    async def cancel(self, request, batch_id):
        """Anthropic's cancel: the batch, C{canceling} (its requests not sent are canceled once it ends); one
        that has nothing left to stop (it ended, or is writing its results) is answered as it is."""
        record = await self._get(request, batch_id)
        try:
            record = await self._runner.cancel(batch_id)
        except Conflict:
            record = await self._get(request, batch_id)
        return json_answer(request, await self._object(record))

    @app.route("/<batch_id>", methods=["DELETE"])
    async def delete(self, request, batch_id):
        """Forget an ended batch, its results and its files; one still processing is a 400."""
        record = await self._get(request, batch_id)
        deleted = await self._batches.delete(batch_id, tuple(ENDED))
        if deleted is None:
            raise InvalidRequest(f"The message batch {batch_id} is still processing ({record['status']}): cancel it, "
                                 "or let it end, before deleting it.")
        self._splits.pop(batch_id, None)
        for file_id in (deleted["input_file_id"], deleted["output_file_id"], deleted["error_file_id"]):
            if file_id is not None and await self._files.delete(file_id):
                await self._blobs.delete(file_id)  # (if this fails, the sweep removes the orphan later)
        return json_answer(request, {"id": batch_id, "type": "message_batch_deleted"})

    @app.route("/<batch_id>/results", methods=["GET"])
    async def results(self, request, batch_id):
        """The results as JSONL, one line per request in the order given, once the batch has ended."""
        record = await self._get(request, batch_id)
        if record["status"] not in ENDED:
            raise InvalidRequest(f"The message batch {batch_id} is still processing: its results are ready once "
                                 "it has ended (its results_url is set then).")
        archived = archived_at(record)
        if archived is not None and self._clock is not None and self._clock.seconds() >= archived:
            raise NotFound(f"The results of message batch {batch_id} are no longer available: they expired at "
                           f"{_rfc3339(archived)}, {record['output_expires_after']} seconds after it ended.",
                           param="message_batch_id")
        request.setHeader(b"content-type", b"application/x-jsonl")

        def fetch(last):
            return self._batches.read_results(batch_id, -1 if last is None else last[0], RESULTS_PAGE,
                                              max_bytes=PAGE_BYTES)

        return await send_pages(request, fetch, result_line)

    async def _object(self, record) -> dict:
        """The C{message_batch} object of C{record}, as of now."""
        now = None if self._clock is None else self._clock.seconds()
        return message_batch(record, await self._counts(record), now)

    async def _get(self, request, batch_id, param="message_batch_id"):
        """The record of a message batch the request's key may see; L{NotFound} otherwise (the store not asked where
        none can be: L{held_nowhere}, a cursor's id)."""
        record = await self._batches.get(batch_id) if not held_nowhere(batch_id) else None
        if record is None or record["kind"] != MESSAGE_BATCH or not visible(request.context.principal, record):
            raise NotFound(f"No message batch '{shown(batch_id)}'.", param=param)
        return record

    async def _counts(self, record) -> dict:
        """Anthropic's C{request_counts} of a batch: its requests processing and those that ended each way."""
        total, succeeded, failed = record["total"] or 0, record["completed"] or 0, record["failed"] or 0
        if record["status"] not in ENDED:
            return {"processing": max(0, total - succeeded - failed), "succeeded": succeeded, "errored": failed,
                    "canceled": 0, "expired": 0}
        canceled, expired = await self._split(record["id"])
        # (a batch that failed to validate has no requests; one the gateway gave up on, lines never answered)
        return {"processing": 0, "succeeded": succeeded, "errored": max(0, failed - canceled - expired),
                "canceled": canceled + max(0, total - succeeded - failed), "expired": expired}

    async def _split(self, batch_id):
        """C{(canceled, expired)}: the requests of an ended batch recorded as each (its error lines, read once)."""
        split = self._splits.get(batch_id)
        if split is None:
            canceled = expired = 0
            after = -1
            while True:
                rows = await self._batches.read_results(batch_id, after, RESULTS_PAGE, ok=False, max_bytes=PAGE_BYTES)
                if not rows:
                    break
                for row in rows:
                    if b'"response":null' in row[3]:
                        code = jsonutil.loads(row[3])["error"]["code"]
                        canceled += code == CANCELLED_CODE
                        expired += code == EXPIRED_CODE
                after = rows[-1][0]
            split = self._splits[batch_id] = (canceled, expired)
            if len(self._splits) > SPLIT_CACHE:
                self._splits.popitem(last=False)
        return split

    install_error_handlers(app)
