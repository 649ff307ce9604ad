"""Claimed jobs: singleton duties any process may do, one at a time, under a lease (L{IClaims}).

L{claimed} runs one duty under a claim; L{StoreSweeper} is the files
sweep (files past their C{expires_at}, with the results an expired batch
output file held, uploads cut short by a crash, contents no file record names).
Several processes on one data directory (C{--workers}) may all run it: the
claim lets one sweep at a time, and the age rule (C{grace}) keeps a sweep
away from an upload another process is still receiving and from contents
whose record is about to be written.
"""

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gomodel.logs import log_failure
from gomodel.periodic import Repeating

log = Logger(namespace="gomodel.store.sweeps")

SWEEP_INTERVAL = 3600.0
SWEEP_GRACE = 3600.0  # untouched for this long: cut short, or orphaned
SWEEP_LEASE = 600.0


async def claimed(claims, name, owner, lease, work):
    """Run C{await work()} while holding claim C{name}; do nothing when another owner holds it.

    @return: what C{work} returned, or None when the claim was held elsewhere.
        Failures of C{work} and of the claim propagate; a failed release is logged.
    """
    token = await claims.claim(name, owner, lease)
    if token is None:
        return None
    try:
        return await work()
    finally:
        try:
            await claims.release(name, owner, token)
        except Exception:
            log.failure("releasing the claim {name} failed", name=name)


class StoreSweeper(Repeating):
    """Removes leftovers of the blob store at start and then every C{interval} seconds, under a claim."""

    log = log

    def __init__(self, files, blobs, claims, clock, owner, *, interval=SWEEP_INTERVAL, grace=SWEEP_GRACE,
                 lease=SWEEP_LEASE, batches=None):
        """
        @param files: the L{IFileStore} (which blobs are named by a file).
        @param blobs: the L{IBlobStore} to sweep.
        @param claims: the L{IClaims} the sweep is claimed in (C{"sweep:files"}).
        @param clock: an C{IReactorTime}; its seconds are compared with the blobs' modification times.
        @param owner: this process's owner id (L{gomodel.store.records.process_owner}).
        @param batches: the L{IBatchStore} whose results an expired batch output file takes with it
            (L{IBatchStore.drop_file_results}), or None.
        """
        super().__init__(interval, self.sweep)
        self.clock = clock
        self._files, self._blobs, self._claims = files, blobs, claims
        self._owner, self._grace, self._lease = owner, grace, lease
        self._batches = batches

    def sweep(self):
        """One sweep; a Deferred firing with C{(discarded writes, deleted blobs)}, or None (claimed elsewhere, or
        failed: logged, the store being unavailable as a one-line warning)."""
        d = Deferred.fromCoroutine(claimed(self._claims, "sweep:files", self._owner, self._lease, self._work))
        d.addErrback(lambda f: log_failure(self.log, f, "sweeping the files' leftovers failed"))
        return d

    async def _work(self):
        expired = 0
        for file_id in await self._files.expired():  # (the next sweep takes those past the first 1,000)
            if self._batches is not None:  # (first: a sweep cut short takes them up again with the file)
                await self._batches.drop_file_results(file_id)
            if await self._files.delete(file_id):
                await self._blobs.delete(file_id)
                expired += 1
        if expired:
            self.log.info("deleted {expired} expired files", expired=expired)
        cutoff = self.clock.seconds() - self._grace
        discarded = await self._blobs.discard_writes(cutoff)
        stale = await self._blobs.stale(cutoff)
        deleted = 0
        if stale:
            known = await self._files.known(stale)
            for blob_id in stale:
                if blob_id not in known and await self._blobs.delete(blob_id):
                    deleted += 1
        if discarded or deleted:
            self.log.info("swept {discarded} unfinished uploads and {deleted} orphaned contents",
                          discarded=discarded, deleted=deleted)
        return discarded, deleted
