"""A finished batch's output and error files, streamed from its results into the blob store."""

from twisted.logger import Logger

from gomodel.store.records import new_file_id

log = Logger(namespace="gomodel.batches")
RESULTS_PAGE = 500


async def write_results(batches, blobs, batch_id, ok):
    """Write one kind of result lines (outputs for C{ok}, else errors) as a new blob.

    @return: C{(file_id, size)} of the committed blob, or None when there is no
        such line. Store failures propagate (nothing is left behind).
    """
    writer = None
    after = -1
    try:
        while True:
            rows = await batches.read_results(batch_id, after, RESULTS_PAGE, ok=ok)
            if not rows:
                break
            if writer is None:
                writer = blobs.create()
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


async def discard_files(blobs, files):
    """Delete the blobs of files that were written but not registered; a failure is logged."""
    for written in files.values():
        if written is not None:
            try:
                await blobs.delete(written[0])
            except Exception:
                log.failure("removing an unregistered batch file {file_id} failed", file_id=written[0])
