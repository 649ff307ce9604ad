"""The C{validating} step of a batch: read the input file in slices, check each line, store the requests."""

from hashlib import blake2b

from gomodel.api.inference import resolve_model
from gomodel.batches.lines import PAGE_BYTES
from gomodel.batches.validation import EVERY_LINE_ENDPOINTS, LineError, Request, check_line
from gomodel.errors import GatewayError, shown

LINES_PER_READ = 1000  # input lines validated at a time
MAX_LINE_BYTES = 64 * 1024 * 1024
MAX_ERRORS = 1000  # validation errors reported (the batch fails either way)
BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark
HELD_IDS = 100_000  # custom_ids a batch's validation holds in memory (OpenAI's batches have 50,000 lines at most)


class CustomIds:
    """The custom_ids of a batch's lines seen so far, to find one used twice: the first C{limit} held in memory,
    each as a 16-byte digest (a custom_id may be as long as its line: before, each was held whole, a file's worth
    at most), about 10 MB for L{HELD_IDS}; past them, C{overflowed} says that the store must find those used
    twice once every line is stored (L{gomodel.store.interfaces.IBatchStore.duplicates})."""

    __slots__ = ("_held", "_limit", "overflowed")

    def __init__(self, limit=None):
        self._held = set()
        self._limit = HELD_IDS if limit is None else limit
        self.overflowed = False

    def used(self, custom_id: str) -> bool:
        """Whether a line before used C{custom_id} (as far as those held tell), noting it as used."""
        digest = blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if digest in self._held:
            return True
        if len(self._held) < self._limit:
            self._held.add(digest)
        else:
            self.overflowed = True
        return False


async def validate(batches, blobs, registry, job, batch, now):
    """Check every input line of C{batch} (its models resolved for C{job.principal}, the key that made it,
    except for L{EVERY_LINE_ENDPOINTS}) and store its requests (fenced by C{job.token}), and its C{model} when
    its lines name one.

    @param now: a function returning the current time in seconds.
    @return: False when the batch failed (or moved on), else True; store
        failures (L{gomodel.store.records.LeaseLost} included) propagate.
    """
    batch_id, endpoint = job.batch_id, batch["endpoint"]
    await batches.clear_requests(batch_id, job.token)  # a validation cut short starts over
    seen, resolved, errors, models = CustomIds(), {}, [], set()
    count = number = offset = 0
    while True:
        if job.stop is not None:
            return True
        got = await blobs.read_lines(batch["input_file_id"], offset, LINES_PER_READ, MAX_LINE_BYTES,
                                     max_bytes=PAGE_BYTES)
        if got is None:
            errors.append(LineError("file_not_found", f"The input file {batch['input_file_id']} does not exist.",
                                    "input_file_id", None))
            break
        lines, offset = got
        rows = []
        for raw in lines:
            number += 1
            if number == 1 and raw is not None and raw.startswith(BOM):  # (Windows editors write one): no content
                raw = raw[len(BOM):]
            if raw is not None and not raw.strip():
                continue
            checked = check_line(raw, number, endpoint)
            if isinstance(checked, Request):
                if seen.used(checked.custom_id):
                    checked = _duplicate(checked.custom_id, number)
                else:
                    # (a message batch's request whose model cannot be used is its errored result: see the runner)
                    problem = None if endpoint in EVERY_LINE_ENDPOINTS else _model_problem(
                        registry, checked.model, resolved, job.principal)
                    if problem is not None:
                        checked = LineError(problem.code or "invalid_model", problem.message, "body.model", number)
            if isinstance(checked, LineError):
                errors.append(checked)
                if len(errors) >= MAX_ERRORS:
                    break
                continue
            count += 1
            if len(models) < 2:  # (one model, or several: which ones is not kept)
                models.add(checked.model)
            if not errors:
                rows.append((number, checked.custom_id, checked.body))
        if rows and not errors:
            await batches.add_requests(batch_id, rows, job.token)
        if offset is None or len(errors) >= MAX_ERRORS:
            break
    if not errors and count == 0:
        errors.append(LineError("empty_file", "The input file has no requests.", None, None))
    if not errors and seen.overflowed:
        errors = [_duplicate(custom_id, line) for line, custom_id in await batches.duplicates(batch_id, MAX_ERRORS)]
    if errors:
        await batches.clear_requests(batch_id, job.token)
        failed = await batches.update(
            batch_id, {"status": "failed", "failed_at": now(), "errors": [e.as_dict() for e in errors]},
            only_if_status=("validating",), token=job.token)
        return failed is None  # None: cancelled meanwhile, which _conclude finishes
    await batches.update(batch_id, {"status": "in_progress", "in_progress_at": now(), "total": count,
                                    "model": models.pop() if len(models) == 1 else None},
                         only_if_status=("validating",), token=job.token)
    return True

def _duplicate(custom_id, number) -> LineError:
    return LineError("duplicate_custom_id", f"The custom_id '{shown(custom_id)}' is used by an earlier line.",
                     "custom_id", number)


def _model_problem(registry, model, resolved, principal):
    """None when C{model} resolves and the batch's key (C{principal}) may use it, else the error saying why."""
    if model not in resolved:
        try:
            resolve_model(registry, {"model": model}, principal)
            resolved[model] = None
        except GatewayError as e:
            resolved[model] = e
    return resolved[model]


async def store_as_given(batches, blobs, job, batch):
    """Store every request of C{batch}'s input file as it is, unchecked (it is never sent), fenced by
    C{job.token}: for a batch that ends before its validation did and records each request
    (L{EVERY_LINE_ENDPOINTS}, whose requests were checked when it was made).

    @return: None; store failures propagate.
    """
    await batches.clear_requests(job.batch_id, job.token)
    number = offset = 0
    while offset is not None:
        got = await blobs.read_lines(batch["input_file_id"], offset, LINES_PER_READ, MAX_LINE_BYTES,
                                     max_bytes=PAGE_BYTES)
        if got is None:
            return
        lines, offset = got
        rows = []
        for raw in lines:
            number += 1
            checked = check_line(raw, number, batch["endpoint"])
            if isinstance(checked, Request):
                rows.append((number, checked.custom_id, checked.body))
        if rows:
            await batches.add_requests(job.batch_id, rows, job.token)
