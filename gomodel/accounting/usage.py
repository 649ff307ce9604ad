"""The usage ledger: one record per request that reached an upstream, written off the reactor in batches.

Tokens come from the answer's usage, the stream's usage chunk or
C{response.completed}; for a stream the client left before its usage came,
the output tokens are counted from the content events sent (C{estimated}).
Costs come from the optional pricing table (per million tokens, keyed by the
model as routed, C{provider/upstream-model}); a model without a price has no
cost. Records are buffered and written every C{USAGE_FLUSH_INTERVAL}, and at
stop; records older than C{USAGE_RETENTION_DAYS} are deleted by a claimed
job, once a day, by one process at a time.
"""

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gomodel.accounting.metrics import tokens_by_type
from gomodel.store.sweeps import claimed

RETENTION_INTERVAL = 86400.0
MAX_BUFFER = 100000  # records kept while the store cannot take them; the oldest go first


class UsageLedger(Service):
    """A request-context sink (call it with a completed context) that keeps the usage records."""

    log = Logger()

    def __init__(self, usage, claims, clock, owner, *, flush_interval=5.0, retention=90 * 86400.0, pricing=None):
        """
        @param usage: the L{gomodel.store.interfaces.IUsageStore}.
        @param claims: the L{gomodel.store.interfaces.IClaims} the retention job is claimed in.
        @param pricing: qualified model -> C{{input_per_mtok, output_per_mtok, cached_input_per_mtok}}.
        """
        self._usage = usage
        self._claims = claims
        self._clock = clock
        self._owner = owner
        self._flush_interval = flush_interval
        self._retention = retention
        self._pricing = dict(pricing or {})
        self._buffer = []
        self._flushing = None
        self._loops = []

    def __call__(self, ctx):
        """A request is over: keep its record if it reached an upstream."""
        if ctx.replica is None:
            return
        self.keep({
            "request_id": ctx.request_id.decode("ascii"), "timestamp": ctx.started,
            "provider": ctx.provider_type, "provider_name": ctx.provider, "replica": ctx.replica,
            "model": f"{ctx.provider}/{ctx.upstream_model}" if ctx.upstream_model else None,
            "endpoint": ctx.endpoint, "status_code": ctx.status, "stream": ctx.stream,
            "duration_ms": round(ctx.duration * 1000, 3),
            "ttft_ms": None if ctx.first_byte is None else round(ctx.first_byte * 1000, 3),
            "client_gone": ctx.client_gone, "estimated": ctx.estimated, "auth_key_id": None, "user_path": None,
        }, ctx.usage)

    def keep(self, record, usage):
        """Add token counts and costs from C{usage} to C{record} and buffer it for the next flush."""
        if usage:
            record["input_tokens"], record["output_tokens"], record["cached_tokens"], record["reasoning_tokens"] = \
                tokens_by_type(usage)
            total = usage.get("total_tokens")
            record["total_tokens"] = total if isinstance(total, int) else record["input_tokens"] + record["output_tokens"]
        else:
            record["input_tokens"] = record["output_tokens"] = record["cached_tokens"] = None
            record["reasoning_tokens"] = record["total_tokens"] = None
        if self._pricing:
            record.update(self._costs(record))
        self._buffer.append(record)
        if len(self._buffer) > MAX_BUFFER:
            del self._buffer[:len(self._buffer) - MAX_BUFFER]

    def _costs(self, record):
        price = self._pricing.get(record.get("model"))
        if price is None or record["input_tokens"] is None:
            return {"input_cost": None, "output_cost": None, "total_cost": None}
        cached = record["cached_tokens"] or 0
        input_cost = ((record["input_tokens"] - cached) * price.get("input_per_mtok", 0)
                      + cached * price.get("cached_input_per_mtok", price.get("input_per_mtok", 0))) / 1e6
        output_cost = (record["output_tokens"] or 0) * price.get("output_per_mtok", 0) / 1e6
        return {"input_cost": input_cost, "output_cost": output_cost, "total_cost": input_cost + output_cost}

    # -- writing ------------------------------------------------------------------------

    def flush(self):
        """Write what is buffered.

        @return: a Deferred firing once written (a failure is logged and the
            records are kept for the next flush).
        """
        if self._flushing is not None or not self._buffer:
            return succeed(None) if self._flushing is None else self._flushing
        records, self._buffer = self._buffer, []
        d = self._flushing = self._usage.add(records)

        def failed(failure):
            self.log.failure("writing {count} usage records failed; kept for the next flush", failure,
                             count=len(records))
            self._buffer[:0] = records

        def done(_):
            self._flushing = None

        return d.addErrback(failed).addBoth(done)

    def startService(self):
        super().startService()
        for f, interval in ((self.flush, self._flush_interval), (self._sweep, RETENTION_INTERVAL)):
            loop = LoopingCall(f)
            loop.clock = self._clock
            loop.start(interval, now=False)
            self._loops.append(loop)

    def stopService(self):
        """Write what is left (nothing is lost at a stop)."""
        super().stopService()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        return self.flush()

    def _sweep(self):
        before = self._clock.seconds() - self._retention
        d = Deferred.fromCoroutine(claimed(self._claims, "sweep:usage", self._owner, 600.0,
                                           lambda: self._usage.delete_before(before)))
        return d.addErrback(lambda f: self.log.failure("usage retention failed", f))
