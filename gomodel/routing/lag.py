"""How late this process's event loop runs: the noise in every duration it measures.

A replica's pace is the mean of the durations the gateway sees (L{gomodel.routing.pool}), and each holds the
gateway's own delays: a request answered while the loop is busy with others waits its turn to be read. With the
loop saturated (every core of the host busy, a burst of requests, a profiler) those delays reach tens or hundreds
of milliseconds and come in bursts, so a replica that happened to answer during one looks clearly slower than its
identical siblings and takes only overflow until its pace is learned again (L{gomodel.routing.pool.PACE_REFRESH}).
L{LoopLag} measures those delays with a timer of its own, and tells the pools how much of a difference in pace is
noise now: L{gomodel.routing.pool.PACE_NOISE}, or L{LAG_TIMES} the worst recent delay where that is more.
"""

from twisted.application.service import Service

from gomodel.routing.pool import PACE_NOISE

PROBE_EVERY = 0.25  # seconds between two probes of the loop's delay
LAG_TIMES = 4  # the noise in a pace, in the worst recent delays: an answer read late, its pace's mean moved by bursts
LAG_DECAY = 0.9  # what is left of the worst delay at each probe (half of it after about 1.6 s)
CHANGED = 0.1  # a relative change of the noise past which the pools are told (they work out their paces' envelope)


class LoopLag(Service):
    """The delay of C{clock}'s timers, probed every L{PROBE_EVERY} seconds while it runs, and the noise it makes
    in each pool's paces (L{gomodel.routing.pool.ReplicaPool.lagged})."""

    def __init__(self, clock, pools):
        self._clock = clock
        self._pools = [pool for pool in pools if len(pool.replicas) > 1]  # (one replica has no other to compare)
        self.worst = 0.0  # the worst recent delay, decaying (L{LAG_DECAY})
        self.noise = PACE_NOISE
        self._due = None
        self._call = None

    def startService(self):
        super().startService()
        if self._pools:
            self._next()

    def stopService(self):
        super().stopService()
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _next(self):
        self._due = self._clock.seconds() + PROBE_EVERY
        self._call = self._clock.callLater(PROBE_EVERY, self._probe)

    def _probe(self):
        late = self._clock.seconds() - self._due
        worst = self.worst * LAG_DECAY
        self.worst = late if late > worst else worst
        noise = max(PACE_NOISE, LAG_TIMES * self.worst)
        if noise != self.noise and (noise == PACE_NOISE or abs(noise - self.noise) > CHANGED * self.noise):
            self.noise = noise
            for pool in self._pools:
                pool.lagged(noise)
        self._next()
