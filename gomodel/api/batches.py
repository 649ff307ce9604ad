"""C{/v1/batches}: OpenAI's Batch API, executed by the gateway itself (vLLM has none).

Besides OpenAI's routes, C{GET /v1/batches/{id}/results} returns every
result line of a finished batch (C{completed}, C{expired}, C{cancelled} or
C{failed}) as JSONL (C{application/jsonl}) in input-line order: the lines of
the output file and of the error file merged, one per answered request (none
for a batch failed at validation). Before the batch has finished it answers
409. The results of a batch go with the file that held them once it expired
(or was deleted): its C{output_expires_after}, or C{BATCH_OUTPUT_EXPIRES_AFTER}
for a batch made without one.

These routes show OpenAI batches only: a message batch (C{/v1/messages/batches},
L{gomodel.anthropic.batches}), whose input file is the gateway's own, is
neither listed nor shown, cancelled or served here (a 404, as another
tenant's batch).
"""

from klein import Klein

from gomodel.http.bodies import json_answer, json_body, page, query_arg, query_limit
from gomodel.http.render import install as install_error_handlers
from gomodel.api.files import client_file, expiry_seconds
from gomodel.api.producers import send_pages
from gomodel.auth.tenancy import tenant_of, tenants_of, visible
from gomodel.batches.lines import PAGE_BYTES
from gomodel.batches.validation import ENDPOINTS, check_metadata, completion_window
from gomodel.errors import Conflict, InvalidRequest, NotFound, shown
from gomodel.store.records import OPENAI_BATCH

LIST_LIMIT_DEFAULT = 20
LIST_LIMIT_MAX = 100
RESULTS_PAGE = 500
RESULTS_READY = ("completed", "expired", "cancelled", "failed")


def batch_object(record) -> dict:
    """The OpenAI batch object for a store record."""
    errors = record["errors"]
    return {
        "id": record["id"], "object": "batch", "endpoint": record["endpoint"],
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": record["input_file_id"], "completion_window": record["completion_window"],
        "status": record["status"], "output_file_id": record["output_file_id"],
        "error_file_id": record["error_file_id"], "created_at": record["created_at"],
        "in_progress_at": record["in_progress_at"], "expires_at": record["expires_at"],
        "finalizing_at": record["finalizing_at"], "completed_at": record["completed_at"],
        "failed_at": record["failed_at"], "expired_at": record["expired_at"],
        "cancelling_at": record["cancelling_at"], "cancelled_at": record["cancelled_at"],
        "request_counts": {"total": record["total"], "completed": record["completed"], "failed": record["failed"]},
        "metadata": record["metadata"], "model": record["model"], "usage": record["token_usage"],
    }


async def within_budgets(gate, principal):
    """Refuse a batch of a managed key whose budget is spent (L{gomodel.limits.gate.Gate.check_budgets}),
    as its online requests are, rather than each of its lines (the master key's batches, never attributed to
    a user path, spend no budget).

    @raise gomodel.errors.BudgetExceeded: a budget of the key is spent.
    """
    if gate is not None and principal is not None and not principal.master:
        await gate.check_budgets(principal)


class BatchesAPI:
    """The routes under C{/v1/batches}, mounted by L{gomodel.api.app.GatewayApp}."""

    app = Klein()
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False  # a doubled slash is a 404, never a redirect (before any route)

    def __init__(self, batches, files, runner, gate=None, output_expiry=None):
        """
        @param batches: the L{gomodel.store.interfaces.IBatchStore}.
        @param files: the L{gomodel.store.interfaces.IFileStore} (input files are checked).
        @param runner: the L{gomodel.batches.runner.BatchRunner}.
        @param gate: the L{gomodel.limits.gate.Gate} (a managed key's spent budget refuses a batch), or None.
        @param output_expiry: the C{output_expires_after} seconds of a batch made without one
            (C{BATCH_OUTPUT_EXPIRES_AFTER}), or None: its files and results are kept.
        """
        self._batches = batches
        self._files = files
        self._runner = runner
        self._gate = gate
        self._output_expiry = output_expiry

    @app.route("/", methods=["POST"])
    async def create(self, request):
        body = json_body(request)
        endpoint = body.get("endpoint")
        if endpoint is None:
            raise InvalidRequest(f"The request needs an 'endpoint' (one of: {', '.join(ENDPOINTS)}).",
                                 param="endpoint", code="missing_required_parameter")
        if endpoint not in ENDPOINTS:
            raise InvalidRequest(f"'endpoint' must be one of: {', '.join(ENDPOINTS)}.", param="endpoint",
                                 code="invalid_value")
        input_file_id = body.get("input_file_id")
        if input_file_id is None or input_file_id == "":
            raise InvalidRequest("The request needs an 'input_file_id'.", param="input_file_id",
                                 code="missing_required_parameter")
        if not isinstance(input_file_id, str):
            raise InvalidRequest("'input_file_id' must be a string: the id of a file uploaded with purpose 'batch'.",
                                 param="input_file_id", code="invalid_type")
        window = body.get("completion_window", "24h")
        try:
            seconds = completion_window(window)
        except ValueError as e:
            raise InvalidRequest(f"'completion_window' {e}.", param="completion_window", code="invalid_value") from None
        try:
            metadata = check_metadata(body.get("metadata"))
        except ValueError as e:
            raise InvalidRequest(f"'metadata' {e}.", param="metadata", code="invalid_value") from None
        policy = body.get("output_expires_after")
        if policy is None:
            output_expiry = self._output_expiry
        elif isinstance(policy, dict):
            output_expiry = expiry_seconds(policy.get("anchor"), policy.get("seconds"), "output_expires_after")
        else:
            raise InvalidRequest("'output_expires_after' must be an object: {\"anchor\": \"created_at\", "
                                 "\"seconds\": N}.", param="output_expires_after", code="invalid_type")
        principal = request.context.principal
        input_file = await client_file(self._files, principal, input_file_id, "input_file_id")
        if input_file["purpose"] != "batch":
            raise InvalidRequest(f"The file {input_file_id} has purpose '{input_file['purpose']}'; "
                                 "a batch needs a file uploaded with purpose 'batch'.", param="input_file_id",
                                 code="invalid_file")
        await within_budgets(self._gate, principal)
        record = await self._runner.create(endpoint, input_file_id, window, seconds, metadata,
                                           output_expiry=output_expiry, tenant=tenant_of(principal),
                                           auth_key_id=None if principal is None or principal.master
                                           else principal.id)
        return json_answer(request, batch_object(record))

    @app.route("/", methods=["GET"])
    async def list_batches(self, request):
        limit = query_limit(request, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX)
        records, has_more = await self._batches.list(after=query_arg(request, b"after"), limit=limit,
                                                     tenant=tenants_of(request.context.principal), kind=OPENAI_BATCH)
        return json_answer(request, page([batch_object(r) for r in records], has_more))

    @app.route("/<batch_id>", methods=["GET"])
    async def retrieve(self, request, batch_id):
        return json_answer(request, batch_object(await self._get(request, batch_id)))

    @app.route("/<batch_id>/cancel", methods=["POST"])
    async def cancel(self, request, batch_id):
        """OpenAI's cancel: 200 with the batch, C{cancelling} (or already C{cancelling} or C{cancelled}: a
        cancellation is idempotent); 409 C{batch_not_cancellable} for a batch C{finalizing}, C{completed},
        C{failed} or C{expired} (L{gomodel.batches.runner.BatchRunner.cancel}); 404 for one this key
        may not see."""
        await self._get(request, batch_id)
        return json_answer(request, batch_object(await self._runner.cancel(batch_id)))

    @app.route("/<batch_id>/results", methods=["GET"])
    async def results(self, request, batch_id):
        batch = await self._get(request, batch_id)
        if batch["status"] not in RESULTS_READY:
            raise Conflict(f"The batch {batch_id} is {batch['status']}: its results are ready once it is "
                           "completed, expired, cancelled or failed.", code="batch_not_finished")
        ok = await self._served(batch)
        request.setHeader(b"content-type", b"application/jsonl")
        if ok == ():
            return b""

        def fetch(last):
            return self._batches.read_results(batch_id, -1 if last is None else last[0], RESULTS_PAGE, ok=ok,
                                              max_bytes=PAGE_BYTES)

        return await send_pages(request, fetch, lambda row: row[3] + b"\n")

    async def _served(self, batch):
        """Which results of an ended C{batch} its C{/results} serves: None (all), True (outputs) or False (errors)
        when it was made with C{output_expires_after} and its other file has expired, C{()} when both have: the
        answers go with the files that held them."""
        if batch["output_expires_after"] is None:
            return None
        gone = [ok for ok, file_id in ((True, batch["output_file_id"]), (False, batch["error_file_id"]))
                if file_id is not None and await self._files.get(file_id) is None]
        return () if len(gone) == 2 else None if not gone else not gone[0]

    async def _get(self, request, batch_id):
        """The record of an OpenAI batch the request's key may see; L{NotFound} otherwise."""
        record = await self._batches.get(batch_id)
        if record is None or record["kind"] != OPENAI_BATCH or not visible(request.context.principal, record):
            raise NotFound(f"No such Batch object: {shown(batch_id)}", param="batch_id", code="batch_not_found")
        return record

    install_error_handlers(app)
