"""The end of a batch: its final status, and its output and error files streamed from the results into blobs."""

from twisted.logger import Logger

from gomodel.accounting.tokens import tokens_by_type, total_tokens
from gomodel.batches.lines import PAGE_BYTES, error_line
from gomodel.batches.validating import store_as_given
from gomodel.batches.validation import EVERY_LINE_ENDPOINTS
from gomodel.proxy.exchange import usage_of
from gomodel.store.records import new_file_id

log = Logger(namespace="gomodel.batches")
PAGE = 256  # pending requests read at a time
RESULTS_PAGE = 500  # results written to a file at a time
EXPIRED_CODE = "batch_expired"  # the error of a line not run before its batch expired
EXPIRED_MESSAGE = "This request could not be executed before the batch's completion window expired."
CANCELLED_CODE = "batch_cancelled"  # of a message batch's line not run before it was cancelled


async def conclude(batches, blobs, job, now):
    """Take the batch to its final status, from what the store says now. A batch the drain stopped (C{drain}) is
    concluded too once no line is left to send (its last lines answered during the drain): it ends before the
    process exits, not at the next start; with lines left, it stays C{in_progress}, to resume.

    @param now: a function returning the current time in seconds.
    @return: None; store failures propagate.
    """
    if job.stop in ("shutdown", "lost", "park"):
        return
    batch_id = job.batch_id
    batch = await batches.get(batch_id)
    status = batch["status"]
    if status == "cancelling":
        await _cancel(batches, blobs, job, batch, now)
        return
    if status == "validating":
        if job.stop == "expire" and batch["endpoint"] in EVERY_LINE_ENDPOINTS:  # each request expired
            await store_as_given(batches, blobs, job, batch)
            await _expire(batches, blobs, job, now, "validating")
        elif job.stop == "expire":
            await batches.clear_requests(batch_id, job.token)
            await batches.update(batch_id, {"status": "expired", "expired_at": now()},
                                       only_if_status=("validating",), token=job.token)
        return
    if status == "in_progress":
        if await batches.pending(batch_id, 0, 1):
            if job.stop == "expire":
                await _expire(batches, blobs, job, now, "in_progress")
            elif job.stop is None:
                job.halt("park")  # lines left unanswered: released with a backoff, never re-driven at once
            return
        moved = await batches.update(batch_id, {"status": "finalizing", "finalizing_at": now()},
                                           only_if_status=("in_progress",), token=job.token)
        if moved is None:  # cancelled meanwhile
            await conclude(batches, blobs, job, now)
            return
        status = "finalizing"
    if status == "finalizing":
        await _finalize(batches, blobs, job, {"status": "completed", "completed_at": now()}, ("finalizing",))

async def _expire(batches, blobs, job, now, status):
    """End the batch C{expired} from C{status}, each line with no result recorded as expired."""
    await _end_rest(batches, job, EXPIRED_CODE, EXPIRED_MESSAGE)
    done = await _finalize(batches, blobs, job, {"status": "expired", "expired_at": now()}, (status,))
    if done is None:  # cancelled meanwhile
        await conclude(batches, blobs, job, now)


async def _finalize(batches, blobs, job, changes, only_if_status):
    """Write the output and error files from the results, then apply C{changes} with the batch's C{usage} (its
    output lines' tokens summed); the record, or None."""
    if (await batches.get(job.batch_id))["status"] not in only_if_status:
        return None
    files, tokens = {}, [0, 0, 0, 0, 0]
    try:
        for ok, kind in ((True, "output"), (False, "error")):
            files[kind] = await write_results(batches, blobs, job.batch_id, ok, tokens if ok else None)
        done = await batches.finalize(job.batch_id, dict(changes, token_usage=batch_usage(tokens)), files,
                                      only_if_status, job.token)
    except BaseException:
        await discard_files(blobs, files)
        raise
    if done is None:
        await discard_files(blobs, files)
    return done

async def _cancel(batches, blobs, job, batch, now):
    """End a C{cancelling} C{batch} C{cancelled}, with what was answered (and, for L{EVERY_LINE_ENDPOINTS},
    each line not run recorded as cancelled)."""
    if batch["endpoint"] in EVERY_LINE_ENDPOINTS:
        if batch["in_progress_at"] is None:  # cancelled before its requests were all stored
            await store_as_given(batches, blobs, job, batch)
        await _end_rest(batches, job, CANCELLED_CODE, "The batch was cancelled before this request was executed.")
    await _finalize(batches, blobs, job, {"status": "cancelled", "cancelled_at": now()}, ("cancelling",))


async def _end_rest(batches, job, code, message):
    """Record each line of the batch with no result yet as the error C{code}."""
    after = 0
    while True:
        rows = await batches.pending(job.batch_id, after, PAGE, max_bytes=PAGE_BYTES)
        if not rows:
            return
        await batches.record_results(job.batch_id, [
            (line, custom_id, False, error_line(custom_id, code, message))
            for line, custom_id, _ in rows], job.token)
        after = rows[-1][0]


async def write_results(batches, blobs, batch_id, ok, tokens=None):
    """Write one kind of result lines (outputs for C{ok}, else errors) as a new blob.

    @param tokens: a list the lines' tokens are added to (L{add_tokens}), or None.
    @return: C{(file_id, size)} of the committed blob, or None when there is no
        such line. Store failures propagate (nothing is left behind).
    """
    writer = None
    after = -1
    try:
        while True:
            rows = await batches.read_results(batch_id, after, RESULTS_PAGE, ok=ok, max_bytes=PAGE_BYTES)
            if not rows:
                break
            if writer is None:
                writer = blobs.create()
            if tokens is not None:
                for row in rows:
                    add_tokens(tokens, row[3])
            await writer.write(b"".join(row[3] + b"\n" for row in rows))
            after = rows[-1][0]
        if writer is None:
            return None
        file_id = new_file_id()
        size = await writer.commit(file_id)
    except BaseException:
        if writer is not None:
            await writer.abort()
        raise
    return file_id, size


def add_tokens(tokens, line: bytes):
    """Add the usage of an output C{line} (its answer's, the line's last C{usage}) to C{tokens}: input, output,
    cached, reasoning and total (L{gomodel.accounting.tokens.tokens_by_type}, in any endpoint's naming)."""
    usage = usage_of(line)
    if usage is not None:
        counts = tokens_by_type(usage)
        for i, count in enumerate(counts):
            tokens[i] += count
        tokens[4] += total_tokens(usage, counts)


def batch_usage(tokens) -> dict:
    """OpenAI's C{usage} of a batch for the L{add_tokens} C{tokens} of its output lines."""
    return {"input_tokens": tokens[0], "input_tokens_details": {"cached_tokens": tokens[2]},
            "output_tokens": tokens[1], "output_tokens_details": {"reasoning_tokens": tokens[3]},
            "total_tokens": tokens[4]}


async def discard_files(blobs, files):
    """Delete the blobs of files that were written but not registered; a failure is logged."""
    for written in files.values():
        if written is not None:
            try:
                await blobs.delete(written[0])
            except Exception:
                log.failure("removing an unregistered batch file {file_id} failed", file_id=written[0])


async def give_up(batches, blobs, job, count, now):
    """End a batch that stopped with an unexpected error C{count} times in a row: C{failed} with an
    C{internal_error} (C{cancelled}, if it was being cancelled), with the files of the lines answered;
    the lines not answered are in neither file, and its requests are dropped, as after a failed validation.

    @param now: a function returning the current time in seconds.
    @return: None; store failures propagate (the batch stays as it was).
    """
    batch = await batches.get(job.batch_id)
    status = None if batch is None else batch["status"]
    if status == "cancelling":
        await _cancel(batches, blobs, job, batch, now)
        return
    if status not in ("validating", "in_progress", "finalizing"):
        return  # it ended meanwhile
    error = {"code": "internal_error", "param": None, "line": None,
             "message": f"The gateway stopped running this batch after it failed with an unexpected error "
                        f"{count} times in a row; the lines answered before are in its output and error files."}
    done = await _finalize(batches, blobs, job, {"status": "failed", "failed_at": now(), "errors": [error]},
                           (status,))
    if done is None:  # cancelled meanwhile
        await give_up(batches, blobs, job, count, now)
