"""Background responses, watched by the process that created them until they are over, so their usage is
recorded and charged once, whether or not anyone reads them.

A background create is answered C{queued}, without usage; its instance (vLLM keeps it in its memory) runs
it. The creating process asks that instance every few seconds (L{WATCH_DELAYS}; reads of the response in
this process share those asks) and, the first time it finds the response over (C{completed}, C{failed},
C{cancelled}, C{incomplete}: found by its own ask, a read here, or another process's read that stored
it), records it in the ledger under the create's request id (a failed one as a 502, a cancelled one as
a 499, with what usage it has) and charges the creating key's budgets with its usage. Reads never charge: two processes reading at once cannot charge it twice, and the
master key reading a managed key's response does not keep it from being charged. A response deleted while
it runs (a DELETE forgets the gateway's copy, not the run) is still asked after, nothing stored back. A
response whose creating process stops before it is over is not charged.
"""

from twisted.application.service import Service
from twisted.logger import Logger

from gomodel.accounting.usage import recorded_as

UNFINISHED = ("queued", "in_progress")
# The status a response over but not answered is recorded with (as an unanswered request's would be):
# its instance failed it, or it was cancelled before it ended. Completed and incomplete ones are 200s.
RECORDED_STATUS = {"failed": 502, "cancelled": 499}
WATCH_DELAYS = (1.0, 2.0, 5.0)  # seconds before each ask: the first ones, then the last for ever
WATCH_LIMIT = 86400.0  # a response still not over after this long is no longer watched (nor charged)


class BackgroundWatch(Service):
    """The background responses this process created, each asked after until it is over."""

    log = Logger()

    def __init__(self, clock, store, registry, refresh, usage=None, gate=None):
        """
        @param store: the C{IResponseStore} the responses are kept in.
        @param refresh: C{refresh(record, request_id, keep=True)}, a Deferred firing with the response as its
            instance has it now, or None, stored unless C{keep} is false
            (L{gomodel.api.responses.ResponsesRoute.refresh}); it calls L{over} when it finds the response over.
        @param usage: the L{gomodel.accounting.usage.UsageLedger}, or None.
        @param gate: the L{gomodel.limits.gate.Gate} (budgets), or None.
        """
        self._clock = clock
        self._store = store
        self._registry = registry
        self._refresh = refresh
        self._usage = usage
        self._gate = gate
        self._watched = {}  # response id -> _Watched

    def watch(self, record, ctx):
        """Watch C{record}'s response, just created by the request C{ctx} (its key is charged)."""
        response_id = record["id"]
        if not self.running or response_id in self._watched:
            return
        held = {"id": response_id, "provider": record["provider"], "replica": record.get("replica"),
                "response": record["response"]}  # (what asking its instance needs, once the store's copy is gone)
        watched = self._watched[response_id] = _Watched(ctx.request_id, ctx.principal, self._clock.seconds(), held)
        watched.call = self._clock.callLater(WATCH_DELAYS[0], self._ask, response_id)

    def over(self, record, response):
        """C{record}'s response, found over (C{response}, as its instance has it): charge it if it is
        watched here, once."""
        watched = self._watched.pop(record["id"], None)
        if watched is None:
            return
        if watched.call is not None and watched.call.active():
            watched.call.cancel()
        usage = response.get("usage")
        if usage.__class__ is not dict:
            usage = None
        model = response.get("model")
        qualified = f"{record['provider']}/{model}" if model.__class__ is str else None
        if self._usage is not None:
            provider = self._registry.provider(record["provider"])
            key_id, user_path = recorded_as(watched.principal)
            self._usage.keep(watched.request_id.decode("ascii"), self._clock.seconds(),
                             provider.type if provider is not None else None, record["provider"], record.get("replica"),
                             qualified, "/v1/responses", RECORDED_STATUS.get(response.get("status"), 200), False,
                             usage, auth_key_id=key_id, user_path=user_path)
        if self._gate is not None:
            self._gate.charge(watched.principal, qualified, usage)

    def stopService(self):
        """Stop asking (what is over afterwards is not charged)."""
        super().stopService()
        watched, self._watched = self._watched, {}
        for each in watched.values():
            if each.call is not None and each.call.active():
                each.call.cancel()

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
            self.log.warn("background response {id} is still not over after {limit:g}s: no longer watched, "
                          "its usage not charged", id=response_id, limit=WATCH_LIMIT)
            return None
        return self._refresh(record, watched.request_id, keep=keep)

    def _failed(self, failure, response_id):
        self.log.failure("asking after background response {id} failed", failure, id=response_id)

    def _again(self, _, response_id, watched):
        if self._watched.get(response_id) is watched and watched.call is None and self.running:
            delay = WATCH_DELAYS[min(watched.asks, len(WATCH_DELAYS) - 1)]
            watched.call = self._clock.callLater(delay, self._ask, response_id)


class _Watched:
    __slots__ = ("request_id", "principal", "since", "call", "asks", "record")

    def __init__(self, request_id, principal, since, record):
        self.request_id = request_id  # the create's
        self.principal = principal
        self.since = since
        self.call = None  # the next ask's delayed call, while one is due
        self.asks = 0
        self.record = record  # its id, provider, replica and response as created
