"""How a runner finds work and keeps it: claims on batches, a poll for free ones, a heartbeat.

Any process may run any batch. L{ClaimLoop} claims unfinished batches whose
lease is free or expired (their process died, or one of this host's
processes is known to be gone), passes on cancellations other processes
stored for the batches it holds, and renews their leases every third of
the lease; a batch whose claim was taken over is stopped at once.

Batches spread over the processes sharing a store, wherever they were
created: a process holds at most C{max_claimed} batches, and one that
holds C{k} takes a free batch only once it has been free for C{k} poll
intervals, so that a process holding fewer (an idle one: at once) takes it
first. A process creating a batch runs it at once only when it holds none;
otherwise the batch waits, unclaimed, for the first process to take it. A
process looks again as soon as one of its batches ends.
"""

from twisted.internet.defer import CancelledError, Deferred, DeferredList, DeferredLock, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gomodel.errors import StorageUnavailable
from gomodel.logs import FailureStreak
from gomodel.store.records import owner_is_gone

MAX_CLAIMED = 8  # batches one process holds at most (BATCH_MAX_CLAIMED)


class ClaimLoop:
    """The claims of one runner (see the module docstring)."""

    log = Logger()

    def __init__(self, batches, clock, owner, lease, poll_interval, jobs, start, max_claimed=MAX_CLAIMED):
        """
        @param batches: the L{gomodel.store.interfaces.IBatchStore}.
        @param jobs: the runner's batches in progress (batch id -> L{gomodel.batches.lines.Job}), read only.
        @param start: called with C{(record, token)} for each batch claimed.
        @param max_claimed: how many batches this runner holds at most (a cancellation may add one).
        """
        self._batches = batches
        self._clock = clock
        self._owner = owner
        self._lease = lease
        self._poll_interval = poll_interval
        self._jobs = jobs
        self._start = start
        self._max_claimed = max_claimed
        self._running = False
        self._poll = None
        self._beat = None
        self._scanning = None
        self._again = False  # a look was asked for while one was under way
        self._quiet = []  # Deferreds fired once no look is under way nor asked for (L{quiet})
        self._claiming = DeferredLock()  # one claim pass at a time: the cap holds
        # A store down fails every renewal of every batch held: one warning a streak, an info line at its end.
        self._renewals = FailureStreak(self, "renewing the batch claims failed", "the batch claims are renewed again")

    def start(self):
        """Start the heartbeat."""
        self._running = True
        self._beat = self._loop(self._heartbeat, self._lease / 3)

    def poll(self):
        """Start looking for free batches every C{poll_interval} seconds (0: never)."""
        if self._running and self._poll_interval > 0:
            self._poll = self._loop(self._scan, self._poll_interval)

    def stop_claiming(self):
        """Claim no more batches (the drain); the claims held are still renewed until L{stop}."""
        self._running = False
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        if self._scanning is not None:
            self._scanning.cancel()

    def stop(self):
        self.stop_claiming()
        if self._beat is not None and self._beat.running:
            self._beat.stop()

    def _loop(self, f, interval):
        loop = LoopingCall(f)
        loop.clock = self._clock
        loop.start(interval, now=False)
        return loop

    def _patience(self, held):
        """Seconds a batch must have been free before a runner holding C{held} batches takes it."""
        return held * self._poll_interval

    async def claim_free(self):
        """Claim and start unfinished batches nobody holds (or whose holder is gone), while there is room."""
        await self._claiming.acquire()
        try:
            gone = tuple(o for o in await self._batches.holders() if owner_is_gone(o))
            while self._running and len(self._jobs) < self._max_claimed:
                got = await self._batches.claim_next(self._owner, self._lease, exclude=tuple(self._jobs), gone=gone,
                                                     free_for=self._patience(len(self._jobs)))
                if got is None:
                    return
                record, token = got
                self.log.info("claimed batch {batch_id} ({status})", batch_id=record["id"], status=record["status"])
                self._start(record, token)
        finally:
            self._claiming.release()

    async def claim_new(self, batch_id):
        """Claim and start a batch created here, when this runner holds none (else another may take it first)."""
        await self._claiming.acquire()
        try:
            held = len(self._jobs)
            if not self._running or batch_id in self._jobs or held >= self._max_claimed or self._patience(held):
                return
            got = await self._batches.claim(batch_id, self._owner, self._lease)
            if got is not None:
                self.log.info("claimed batch {batch_id} (made here)", batch_id=batch_id)
                self._start(*got)
        finally:
            self._claiming.release()

    def look(self):
        """Look for cancellations and free batches now (once more after the look under way, if any)."""
        if self._running:
            self._scan(again=True)

    def quiet(self):
        """A Deferred firing with None once no look is under way nor asked for (at once when none is): the
        batches a look was to take are held by then."""
        if self._scanning is None:
            return succeed(None)
        d = Deferred()
        self._quiet.append(d)
        return d

    def _scan(self, again=False):
        if self._scanning is not None:
            self._again = self._again or again
            return
        self._again = False
        self._scanning = Deferred.fromCoroutine(self._look())

        def failed(failure):
            if not failure.check(CancelledError, StorageUnavailable):
                self.log.failure("looking for batches to run failed", failure)

        def done(_):
            self._scanning = None
            if self._again and self._running:
                self._scan()
            if self._scanning is None:
                waiting, self._quiet = self._quiet, []
                for d in waiting:
                    d.callback(None)

        self._scanning.addErrback(failed)
        self._scanning.addBoth(done)

    async def _look(self):
        for job in list(self._jobs.values()):  # (the batches held: not every one waiting in the store)
            if job.stop is None:
                batch = await self._batches.get(job.batch_id)
                if batch is not None and batch["status"] == "cancelling" and job.stop is None:
                    job.halt("cancel")
        await self.claim_free()

    def _heartbeat(self):
        """Renew the claim of each batch held.

        @return: a Deferred firing with None once every renewal answered (a failure is logged, see
            C{_renewals}).
        """
        renewals = []
        for job in list(self._jobs.values()):
            if job.stop in ("lost", "shutdown"):
                continue
            d = self._batches.renew(job.batch_id, self._owner, job.token, self._lease)

            def renewed(held, job=job):
                self._renewals.succeeded()
                if not held:
                    job.halt("lost")  # (logged once its work here is over: L{gomodel.batches.runner.BatchRunner._work})

            renewals.append(d.addCallbacks(renewed, self._renewals.failed))
        return DeferredList(renewals).addCallback(lambda _: None)
