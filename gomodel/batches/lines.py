"""One batch's lines: the output and error file lines, and the in-memory state of a batch being run."""

import uuid

from gomodel import jsonutil

# Bytes of input lines, requests or results read from the store at a time (and one line more, whatever its
# size): a batch of large lines (long documents to embed, their vectors) is never held a page of them at once.
PAGE_BYTES = 8 * 1024 * 1024


def result_id() -> str:
    return "batch_req_" + uuid.uuid4().hex


def output_line(custom_id, status, request_id, body: bytes) -> bytes:
    """One output-file line, with the upstream's JSON C{body} spliced in as it came."""
    return b"".join((
        b'{"id":', jsonutil.dumps(result_id()), b',"custom_id":', jsonutil.dumps(custom_id),
        b',"response":{"status_code":', str(status).encode(), b',"request_id":', jsonutil.dumps(request_id),
        b',"body":', body, b'},"error":null}'))


def error_line(custom_id, code, message) -> bytes:
    """One error-file line for a request that got no upstream answer."""
    return jsonutil.dumps({"id": result_id(), "custom_id": custom_id, "response": None,
                           "error": {"code": code, "message": message}})


class Job:
    """One batch being worked on, in memory."""

    def __init__(self, batch_id, token):
        self.batch_id = batch_id
        self.token = token  # the fencing token of our claim
        # None, "cancel", "expire", "drain" (the gateway stopping: no more is sent), "shutdown", "lost" (the claim)
        # or "park" (cannot record)
        self.stop = None
        self.failed = False  # a store write failed: released with a backoff, whatever stopped it
        self.broken = False  # it failed with an error that no wait mends (not the store being unavailable)
        self.upstream = set()  # Deferreds of requests in flight (cancelled to halt)
        self.lines = set()  # Deferreds of lines not yet recorded
        self.waiting = None  # a semaphore acquisition in progress
        self.sleeping = set()  # Deferreds of the backoffs under way before a line is sent again
        self.expiry = None  # the IDelayedCall that expires the batch
        self.task = None
        self.watchers = []  # Deferreds fired when the job ends
        self.principal = None  # the managed key that made the batch (a Principal), or None
        self.tenant = None  # the batch's tenant: its lines' stored responses are its, wherever its key moved since

    def halt(self, why):
        """Stop sending: C{cancel}, C{expire}, C{park}, C{drain}, C{shutdown} or C{lost} (the last two win; a
        cancel or an expiry wins over a drain). A drain sends nothing more (no line, no retry, no fallback) but
        leaves the requests in flight to finish; any other halt cancels them too."""
        if self.stop is None or why in ("shutdown", "lost") or (self.stop == "drain" and why in ("cancel", "expire")):
            self.stop = why
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.cancel()
        for d in list(self.sleeping):
            d.cancel()
        if why == "drain":
            return
        for d in list(self.upstream):
            d.cancel()
