"""Background responses, watched by the process that created them until they are over, so their usage is
recorded and charged once, whether or not anyone reads them.

A background create is answered C{queued}, without usage; its instance (vLLM keeps it in its memory) runs
it. The creating process asks that instance every few seconds (L{WATCH_DELAYS}; reads of the response in
this process share those asks) and, the first time it finds the response over (C{completed}, C{failed},
C{cancelled}, C{incomplete}: found by its own ask, a read here, or another process's read that stored
it), records it in the ledger under the create's request id (a failed one as a 502, a cancelled one as
a 499, with what usage it has) and charges the creating key's budgets with its usage. Reads never charge:
two processes reading at once cannot charge it twice, and the master key reading a managed key's response
does not keep it from being charged. A response deleted while
it runs (a DELETE forgets the gateway's copy, not the run) is still asked after, nothing stored back.

Each watch is also kept in the store (L{gomodel.store.interfaces.IBackgroundWatches}) under the watching
process's lease, renewed every L{RENEW} seconds: a process that stops gives its watches up, one that dies
lets their lease (L{LEASE}) run out, and another process (or itself restarted) adopts them, asking after
them as their creator did and charging whom the creator would have. A watch found over is charged by the
process that takes it out of the store: once, whichever process finds it over first.
"""

from collections import deque

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gomodel.accounting.usage import recorded_as
from gomodel.auth.keys import MASTER
from gomodel.logs import FailureStreak

UNFINISHED = ("queued", "in_progress")
# The status a response over but not answered is recorded with (as an unanswered request's would be):
# its instance failed it, or it was cancelled before it ended. Completed and incomplete ones are 200s.
RECORDED_STATUS = {"failed": 502, "cancelled": 499}
WATCH_DELAYS = (1.0, 2.0, 5.0)  # seconds before each ask: the first ones, then the last for ever
WATCH_LIMIT = 86400.0  # a response still not over after this long is no longer watched (nor charged): stored failed
LEASE = 60.0  # seconds a process's watches stay its own without being renewed
RENEW = 20.0  # seconds between renewals of this process's watches (and adoptions of lapsed ones)
CHARGED_KEPT = 64  # the last responses charged here that L{BackgroundWatch.charged} still knows of


class BackgroundWatch(Service):
    """The background responses this process created (and those it adopted), each asked after until it is
    over."""

    log = Logger()

    def __init__(self, clock, store, registry, refresh, usage=None, gate=None, watches=None, owner=None,
                 keys=None):
        """
        @param store: the C{IResponseStore} the responses are kept in.
        @param refresh: C{refresh(record, request_id, keep=True)}, a Deferred firing with the response as its
            instance has it now, or None, stored unless C{keep} is false
            (L{gomodel.api.responses.ResponsesRoute.refresh}); it calls L{over} when it finds the response over.
        @param usage: the L{gomodel.accounting.usage.UsageLedger}, or None.
        @param gate: the L{gomodel.limits.gate.Gate} (budgets), or None.
        @param watches: the store's L{gomodel.store.interfaces.IBackgroundWatches}, where the watches are kept
            under this process's lease as C{owner}; or None: they are this process's alone.
        @param keys: the L{gomodel.auth.keys.KeyRing} (an adopted watch's managed key), or None.
        """
        self._clock = clock
        self._store = store
        self._registry = registry
        self._refresh = refresh
        self._usage = usage
        self._gate = gate
        self.tokens_counted = None  # a response's usage: as the batch runner's (GatewayMetrics.tokens_apart, ...)
        self._watches = watches
        self._owner = owner
        self._keys = keys
        self._watched = {}  # response id -> _Watched
        self._charged = deque(maxlen=CHARGED_KEPT)  # the ids of the last responses charged here
        self._waiting = {}  # response id -> the Deferreds of L{charged} waiting for its charge
        self._loop = None
        self._streak = FailureStreak(self, "keeping the background responses' watches failed",
                                     "the background responses' watches are kept in the store again")

    def watch(self, record, ctx, held=False):
        """Watch C{record}'s response, just created by the request C{ctx} (its key is charged).

        @param held: its stream runs still (and charges it when it ends): it is kept in the store, for another
            process to adopt should this one die, but neither asked after nor charged here until L{unhold}.
        """
        response_id = record["id"]
        if not self.running or response_id in self._watched:
            return
        kept_record = {"id": response_id, "provider": record["provider"], "replica": record.get("replica"),
                       "response": record["response"]}  # (what asking its instance needs, once the store's copy
        principal = ctx.principal  # is gone)
        now = self._clock.seconds()
        watched = self._watched[response_id] = _Watched(ctx.request_id, principal, recorded_as(principal), now,
                                                        kept_record)
        watched.held = held
        if not held:
            watched.call = self._clock.callLater(WATCH_DELAYS[0], self._ask, response_id)
        if self._watches is None:
            watched.kept.callback(False)
            return
        kept = {**kept_record, "request_id": ctx.request_id.decode("ascii"), "since": now,
                "key_id": principal.id if principal is not None else None,
                "user_path": principal.user_path if principal is not None else None}
        d = self._watches.add(kept, self._owner, LEASE)
        d.addCallback(lambda _: watched.kept.callback(True))
        d.addErrback(self._not_kept, watched)

    def unhold(self, response_id, charged):
        """End the hold of C{response_id}'s watch (L{watch}): its stream ended. Where that C{charged} it (its final
        event came) the watch is given up, uncharged; else it is asked after and charged as any other."""
        watched = self._watched.get(response_id)
        if watched is None or not watched.held:
            return
        watched.held = False
        if charged:
            del self._watched[response_id]
            watched.kept.addCallback(self._given_up, response_id)
        else:
            watched.call = self._clock.callLater(WATCH_DELAYS[0], self._ask, response_id)

    def _given_up(self, kept, response_id):
        """Take C{response_id}'s watch, charged by its stream, out of the store (if C{kept} there); returns C{kept}."""
        if kept:
            self._watches.settle(response_id).addErrback(self._streak.failed)
        return kept

    def _not_kept(self, failure, watched):
        self._streak.failed(failure)
        watched.kept.callback(False)  # (charged by this process alone)

    def over(self, record, response):
        """C{record}'s response, found over (C{response}, as its instance has it): charge it if it is
        watched here, once (its watch kept in the store: if this process is the one that takes it out)."""
        watched = self._watched.get(record["id"])
        if watched is None or watched.held:  # (a held one is charged by its stream)
            return
        del self._watched[record["id"]]
        if watched.call is not None and watched.call.active():
            watched.call.cancel()
        watched.kept.addCallback(self._settle, watched, record, response)

    def _settle(self, kept, watched, record, response):
        """Charge C{watched}, over: at once if its watch is not C{kept} in the store, else if this process
        takes it out; returns C{kept} (what C{watched.kept} fires with for a later L{over})."""
        if not kept:
            self._charge(watched, record, response)
            return kept
        d = self._watches.settle(record["id"])
        d.addCallback(lambda settled: self._charge(watched, record, response) if settled else None)
        d.addErrback(self._unsettled, watched, record["id"])
        return kept

    def _unsettled(self, failure, watched, response_id):
        """The store could not say whether this process takes it out: watched again, to be found over again."""
        self._streak.failed(failure)
        if self.running and response_id not in self._watched:
            self._watched[response_id] = watched
            self._again(None, response_id, watched)

    def charged(self, response_id):
        """A Deferred firing (with None) once this process charged C{response_id}'s usage and recorded it in the
        ledger (its budgets' charge done), at once if it did lately: what a test waits for, not a clock."""
        if response_id in self._charged:
            return succeed(None)
        waiting = self._waiting.setdefault(response_id, [])

        def cancelled(d):
            waiting.remove(d)
            if not waiting and self._waiting.get(response_id) is waiting:
                del self._waiting[response_id]

        d = Deferred(cancelled)
        waiting.append(d)
        return d

    def _charge(self, watched, record, response):
        """Record C{record}'s response, over, in the ledger and charge its key's budgets; then fire L{charged}."""
        usage = response.get("usage")
        if usage.__class__ is not dict:
            usage = None
        model = response.get("model")
        qualified = f"{record['provider']}/{model}" if model.__class__ is str else None
        provider = self._registry.provider(record["provider"])
        provider_type = provider.type if provider is not None else None
        if self._usage is not None:
            key_id, user_path = watched.recorded
            self._usage.keep(watched.request_id.decode("ascii"), self._clock.seconds(), provider_type,
                             record["provider"], record.get("replica"), qualified, "/v1/responses",
                             RECORDED_STATUS.get(response.get("status"), 200), False, usage, auth_key_id=key_id,
                             user_path=user_path)
        if self.tokens_counted is not None:
            self.tokens_counted(provider_type, record["provider"], qualified, usage, watched.principal,
                                "/v1/responses")
        charging = None
        if self._gate is not None and watched.principal is not None:
            charging = self._gate.charge(watched.principal, qualified, usage)
        if charging is None:
            self._was_charged(None, record["id"])
        else:
            charging.addCallback(self._was_charged, record["id"])

    def _was_charged(self, _, response_id):
        self._charged.append(response_id)
        for d in self._waiting.pop(response_id, ()):
            d.callback(None)

    def startService(self):
        super().startService()
        if self._watches is not None:
            self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self._tend()))
            self._loop.clock = self._clock
            self._loop.start(RENEW, now=True)

    def stopService(self):
        """Stop asking (what is over afterwards is not charged here) and give this process's watches up, for
        another process (or this one restarted) to adopt at once.

        @return: a Deferred firing once they are given up (or that failed: their lease runs out), or None.
        """
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        watched, self._watched = self._watched, {}
        for each in watched.values():
            if each.call is not None and each.call.active():
                each.call.cancel()
        if self._watches is None:
            return None
        d = self._watches.release(self._owner)
        d.addErrback(lambda f: self.log.warn("giving the background responses' watches up failed: {reason}; "
                                             "they are adopted once their lease ran out",
                                             reason=f.getErrorMessage()))
        return d

    async def _tend(self):
        """Renew this process's watches, then adopt those whose lease ran out; never fails."""
        try:
            if self._watched:
                await self._watches.renew(self._owner, LEASE)
            for kept in await self._watches.adopt(self._owner, LEASE):
                if self.running and kept["id"] not in self._watched:
                    await self._adopt(kept)
        except Exception:
            self._streak.failed(Failure())
        else:
            self._streak.succeeded()

    async def _adopt(self, kept):
        """Watch C{kept}, a watch whose process stopped or died, charging whom its creator would have."""
        response_id, key_id, user_path = kept["id"], kept["key_id"], kept["user_path"]
        if key_id is None:
            principal = None
        elif key_id == MASTER.id:
            principal = MASTER if user_path is None else MASTER.attributed(user_path)
        else:
            principal = self._keys.by_id(key_id) if self._keys is not None else None
            if principal is None and self._keys is not None:  # (made on another process since the last refresh)
                await self._keys.refresh()
                principal = self._keys.by_id(key_id)
        if not self.running or response_id in self._watched:
            return
        held = {"id": response_id, "provider": kept["provider"], "replica": kept["replica"],
                "response": kept["response"]}
        recorded = (None if key_id == MASTER.id else key_id, user_path)
        watched = self._watched[response_id] = _Watched(kept["request_id"].encode("ascii"), principal, recorded,
                                                        kept["since"], held)
        watched.kept.callback(True)
        self.log.info("watching background response {id}, whose process stopped before it was over",
                      id=response_id)
        watched.call = self._clock.callLater(0, self._ask, response_id)

    def _ask(self, response_id):
        watched = self._watched.get(response_id)
        if watched is None:
            return None
        watched.call = None
        watched.asks += 1
        d = self._store.get(response_id)
        d.addCallback(self._asked, response_id, watched)
        d.addErrback(self._failed, response_id)
        d.addBoth(self._again, response_id, watched)
        return d

    def _asked(self, record, response_id, watched):
        keep = record is not None
        if not keep:  # deleted: its instance runs it still, asked with the record held here, nothing stored
            record = watched.record
        elif record["response"].get("status") not in UNFINISHED:  # stored over by a read (here or elsewhere)
            return self.over(record, record["response"])
        if self._clock.seconds() - watched.since > WATCH_LIMIT:
            self._watched.pop(response_id, None)
            if self._watches is not None:
                self._watches.settle(response_id).addErrback(self._streak.failed)
            return self._given_up_on(record if keep else None, response_id)
        return self._refresh(record, watched.request_id, keep=keep)

    def _given_up_on(self, record, response_id) -> Deferred:
        """No longer watch C{response_id}, not over after L{WATCH_LIMIT}: its stored C{record} (None: deleted) is
        stored C{failed}, saying so, for a client polling for its end (its instance never answered since, its
        provider gone, or it runs on still: the gateway no longer asks); a Deferred firing once done, never failing."""
        if record is None:
            stored = succeed(None)
        else:
            failed = dict(record["response"], status="failed", error={
                "code": "server_error", "message": f"Response '{response_id}' was still not over after "
                f"{WATCH_LIMIT:g}s of asking its instance (unreachable, or its provider no longer configured): the "
                "gateway no longer asks after it."})
            stored = self._store.update(response_id, "failed", failed, record.get("tenant"))
            stored.addErrback(self._streak.failed)
        return stored.addCallback(lambda _: self.log.warn(
            "background response {id} is still not over after {limit:g}s: no longer watched, stored failed, its "
            "usage not charged", id=response_id, limit=WATCH_LIMIT))

    def _failed(self, failure, response_id):
        self.log.failure("asking after background response {id} failed", failure, id=response_id)

    def _again(self, _, response_id, watched):
        if self._watched.get(response_id) is watched and watched.call is None and self.running:
            delay = WATCH_DELAYS[min(watched.asks, len(WATCH_DELAYS) - 1)]
            watched.call = self._clock.callLater(delay, self._ask, response_id)


class _Watched:
    __slots__ = ("request_id", "principal", "recorded", "since", "call", "asks", "record", "kept", "held")

    def __init__(self, request_id, principal, recorded, since, record):
        self.request_id = request_id  # the create's
        self.principal = principal  # charged (None: nobody: an open gateway's, or a key no longer known)
        self.recorded = recorded  # the ledger's (auth_key_id, user_path)
        self.since = since
        self.call = None  # the next ask's delayed call, while one is due
        self.asks = 0
        self.record = record  # its id, provider, replica and response as created
        self.kept = Deferred()  # fires with whether its watch is kept in the store
        self.held = False  # its stream runs still: neither asked after nor charged here (L{BackgroundWatch.unhold})
