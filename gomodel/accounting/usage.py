"""The usage ledger: one record per request that reached an upstream, written off the reactor in batches.

Tokens come from the answer's usage, the stream's usage chunk or
C{response.completed}; for a stream the client left before its usage came,
the output tokens are counted from the content events sent and the prompt estimated from the request
(C{estimated}).
Costs come from the optional pricing table (per million tokens, and per minute of
audio for a transcription billed in seconds, keyed by the model as routed,
C{provider/upstream-model}); a model without a price has no cost. Records are
buffered and written every C{USAGE_FLUSH_INTERVAL}, as soon as L{FLUSH_AT} are waiting, and at stop; records older than
C{USAGE_RETENTION_DAYS} are deleted by a claimed job, once a day, by one
process at a time.
"""

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, gatherResults, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gomodel.accounting.tokens import audio_seconds, tokens_by_type, total_tokens
from gomodel.errors import BudgetExceeded, RateLimitExceeded, ReplicasBusy, RowsRejected
from gomodel.http.context import ERROR, OK, REFUSED
from gomodel.logs import FailureStreak, log_failure
from gomodel.store.records import USAGE_FIELDS
from gomodel.store.sweeps import claimed

RETENTION_INTERVAL = 86400.0
# Seconds after the start of the first retention sweep (then every RETENTION_INTERVAL): a fleet restarted at
# least daily (deploys, scaling) never swept when the first came a day after the start.
FIRST_SWEEP = 600.0
MAX_BUFFER = 100000  # records kept while the store cannot take them; past it the oldest go first (said: L{_drop})
# Records waiting that start a write at once, before the next tick: under load the buffer would otherwise
# hold USAGE_FLUSH_INTERVAL's worth (about 330 bytes each: 3 MiB at 2,000 requests a second over 5 s).
FLUSH_AT = 1000


class UsageLedger(Service):
    """A request-context sink (call it with a completed context) that keeps the usage records."""

    log = Logger()

    def __init__(self, usage, claims, clock, owner, *, flush_interval=5.0, retention=90 * 86400.0, pricing=None):
        """
        @param usage: the L{gomodel.store.interfaces.IUsageStore}.
        @param claims: the L{gomodel.store.interfaces.IClaims} the retention job is claimed in.
        @param pricing: the L{Pricing}, or None (no prices).
        """
        self._usage = usage
        self._claims = claims
        self._clock = clock
        self._owner = owner
        self._flush_interval = flush_interval
        self._retention = retention
        self._pricing = pricing or None  # None: no prices (tested once here, not per request)
        self._buffer = []
        self._writing = DeferredLock()  # one write at a time, in order
        self._loops = []
        self._first_sweep = None  # the delayed start of the retention sweeps (FIRST_SWEEP)
        self._sweeping = None  # fires when the sweep in progress is over (L{stopService} waits for it)
        # A store down fails every flush: one warning a streak (the records are kept), an info line at its end.
        self._flushes = FailureStreak(self, "writing usage records failed; they are kept for the next flush",
                                      "usage records are written again")
        self._dropped = 0  # records dropped past MAX_BUFFER since the store last took some

    def __call__(self, ctx):
        """A request is over: keep its record if it reached an upstream, or if the gateway's own limits,
        budgets or busy replicas refused it (L{refused})."""
        if ctx.replica is None:
            if ctx.error in REFUSALS:  # (here, not on the way of a request that was served: it costs those nothing)
                self.refused(ctx)
            return
        # (every argument by position: a call with *args or keywords builds a tuple and a dict, and CPython 3.11 runs
        # it in a new C-level frame, some 3,700 instructions more)
        auth_key_id, user_path = recorded_as(ctx.principal)
        self.keep(ctx.request_id.decode("ascii"), ctx.started, ctx.provider_type, ctx.provider, ctx.replica,
                  f"{ctx.provider}/{ctx.upstream_model}" if ctx.upstream_model else None, ctx.endpoint, ctx.status,
                  ctx.stream or ctx.asked_stream, ctx.usage, _ms(ctx.duration),
                  None if ctx.first_byte is None or not ctx.stream else _ms(ctx.first_byte), ctx.client_gone,
                  ctx.estimated, auth_key_id, user_path, ctx.token_counts, ctx.outcome)

    def refused(self, ctx):
        """Keep the record of a request the gateway's limits, budgets or busy replicas refused with a 429
        (L{REFUSALS}) once it was routed: 0 tokens, no replica, outcome L{REFUSED}, under its key and user path
        and the provider and model it would have gone to, so that a key's usage counts what it was refused (a
        batch its budget refused at its creation, no route of the metrics' endpoints and no model yet, under its
        path)."""
        self.refusal(ctx.request_id.decode("ascii"), ctx.started, ctx.provider_type, ctx.provider, ctx.upstream_model,
                     ctx.endpoint or ctx.path.decode("ascii", "replace"), ctx.principal, ctx.status, ctx.asked_stream,
                     _ms(ctx.duration))

    def refusal(self, request_id, timestamp, provider, provider_name, upstream_model, endpoint, principal,
                status_code=429, stream=False, duration_ms=None):
        """Keep the record of a request (or a batch line) the gateway refused itself: 0 tokens, no replica,
        outcome L{REFUSED}, under C{principal}'s key and user path (L{recorded_as}) and the provider
        (C{provider}: its type) and model it would have gone to."""
        self.keep(request_id, timestamp, provider, provider_name, None,
                  f"{provider_name}/{upstream_model}" if upstream_model else None, endpoint, status_code, stream,
                  NO_TOKENS, duration_ms, None, False, False, *recorded_as(principal), outcome=REFUSED)

    def keep(self, request_id, timestamp, provider, provider_name, replica, model, endpoint, status_code, stream,
             usage, duration_ms=None, ttft_ms=None, client_gone=False, estimated=False, auth_key_id=None,
             user_path=None, tokens=None, outcome=None):
        """Buffer one record (a row in L{gomodel.store.records.USAGE_FIELDS} order, its flags as 0 and 1:
        Python's sqlite3 binds an int at once, a bool through its adapter protocol) for the next flush.

        @param usage: the upstream's usage object, or None.
        @param tokens: its L{tokens_by_type}, when worked out already.
        @param outcome: what it came to (L{gomodel.http.context.OK} and the others); None: C{ok} for a status
            below 400, else C{error}.
        """
        if usage:
            if tokens is None:
                tokens = tokens_by_type(usage)
            total = total_tokens(usage, tokens)
            seconds = audio_seconds(usage) if "seconds" in usage else None  # (most bill tokens: no call)
        else:
            tokens, total, seconds = (None, None, None, None), None, None
        if self._pricing:
            input_cost, output_cost, total_cost = self._pricing.costs(model, tokens, seconds)
        else:
            input_cost = output_cost = total_cost = None
        # (each value its own: a *costs in the row builds a list first, about 1,100 instructions more)
        self._buffer.append((request_id, timestamp, provider, provider_name, replica, model, endpoint, status_code,
                             1 if stream else 0, tokens[0], tokens[1], total, tokens[2], tokens[3], input_cost,
                             output_cost, total_cost, user_path, auth_key_id, duration_ms, ttft_ms,
                             1 if client_gone else 0, 1 if estimated else 0,
                             outcome or (OK if (status_code or 0) < 400 else ERROR), seconds))
        waiting = len(self._buffer)
        if waiting == FLUSH_AT:
            self._clock.callLater(0, self.flush)  # on the reactor's next turn, not in this request's end
        elif waiting > MAX_BUFFER:
            self._drop(waiting - MAX_BUFFER)

    def _drop(self, count):
        """Drop the C{count} oldest records waiting: the store has not taken them while L{MAX_BUFFER} more came.
        Said in one error line when the drops begin, and in one line with their number once it takes records
        again (the streak's warning said that records were kept)."""
        del self._buffer[:count]
        if not self._dropped:
            self.log.error("{most} usage records are waiting for the store: the oldest are dropped (lost) until it "
                           "takes them again", most=MAX_BUFFER)
        self._dropped += count

    def spent(self, scope, since):
        """What a budget scope spent since C{since} (see L{gomodel.store.interfaces.IUsageStore.spent}): the
        store's records and those kept here not yet written. No write runs meanwhile, so none is counted twice
        or missed (a budget's seed: L{gomodel.limits.budgets.BudgetBook}).

        @return: a Deferred firing with C{(total tokens, total cost)}; it fails as the store's read does.
        """
        return self._writing.run(self._spent, scope, since)

    def _spent(self, scope, since):
        return self._usage.spent(scope, since).addCallback(self._with_buffer, scope, since)

    def spent_many(self, pairs):
        """L{spent} of each C{(scope, since)} of C{pairs}, read in one call of the store's
        (L{gomodel.store.interfaces.IUsageStore.spent_many}).

        @return: a Deferred firing with a list of C{(total tokens, total cost)}, in order.
        """
        pairs = list(pairs)
        return self._writing.run(lambda: self._usage.spent_many(pairs).addCallback(
            lambda stored: [self._with_buffer(figure, scope, since) for figure, (scope, since) in zip(stored, pairs)]))

    def _with_buffer(self, stored, scope, since):
        """C{stored}, a scope's C{(tokens, cost)} by the store, plus the records kept here not yet written."""
        kind, _, name = scope.partition(":")
        column = _KEY if kind == "key" else _PATH if kind == "path" else None
        if column is None:
            return stored
        below = name.rstrip("/") + "/" if kind == "path" else None
        root = scope == "path:/"  # (every path, and the managed keys without one)
        tokens, cost = stored
        for row in self._buffer:
            value = row[_KEY] if root and row[column] is None else row[column]
            if row[1] >= since and value is not None and (root or value == name or below and value.startswith(below)):
                tokens += row[_TOKENS] or 0
                cost += row[_COST] or 0.0
        return tokens, cost

    def summary(self, start, end, filters=None):
        """The store's totals of a window (L{gomodel.store.interfaces.IUsageStore.summary}) with the records
        kept here not yet written added, so that a request is counted as soon as it is over.

        @param filters: any of C{key}, C{keyless}, C{user_path} (that path and those under it).
        @return: a Deferred firing with the totals; it fails as the store's read does.
        """
        return self._writing.run(self._summary, start, end, dict(filters or {}))

    def _summary(self, start, end, filters):
        return self._usage.summary(start, end, filters).addCallback(self._with_buffered, start, end, filters)

    def _with_buffered(self, totals, start, end, filters):
        """C{totals} plus the buffered records of the window that C{filters} match (as the stores sum them)."""
        key, path = filters.get("key"), filters.get("user_path")
        below = None if path is None else path.rstrip("/") + "/"
        totals = dict(totals)
        for row in self._buffer:
            if not start <= row[_TIME] < end or (key is not None and row[_KEY] != key) \
                    or (filters.get("keyless") and row[_KEY] is not None):
                continue
            if path is not None and (row[_PATH] is None or (row[_PATH] != path and not row[_PATH].startswith(below))):
                continue
            totals["requests"] += 1
            outcome = row[_OUTCOME]
            if outcome != OK:
                totals["errors"] += 1
                kind = outcome if outcome != ERROR else "client_errors" if 400 <= (row[_STATUS] or 0) < 500 \
                    else "server_errors"
                totals[kind] += 1
            for name, index in _SUMS:
                totals[name] += row[index] or 0
            for name, index in _COSTS:
                if row[index] is not None:
                    totals[name] = (totals[name] or 0.0) + row[index]
        return totals

    # -- writing ------------------------------------------------------------------------

    def flush(self):
        """Write what is buffered (after a write under way, if any).

        @return: a Deferred firing once written; a failure is logged and the
            records are kept for the next flush, but for a record the store
            can never write (L{RowsRejected}): that one is logged and dropped.
        """
        return self._writing.run(self._write)

    def _write(self):
        if not self._buffer:
            return succeed(None)
        records, self._buffer = self._buffer, []
        return self._add(records)

    def _add(self, records):
        """Write C{records}; where the store rejects one of them, write them in halves until that one is
        alone (a few more writes for each such record), and drop it: kept, it would fail every write of
        the records buffered with it."""

        def failed(failure):
            if not failure.check(RowsRejected):
                self._flushes.failed(failure)
                self._buffer[:0] = records
            elif len(records) == 1:
                self.log.error("usage record {request_id} cannot be written ({reason}); dropped",
                               request_id=records[0][0], reason=failure.getErrorMessage())
            else:
                half = len(records) // 2
                return self._add(records[:half]).addCallback(lambda _: self._add(records[half:]))

        return self._usage.add(records).addCallbacks(self._written, failed)

    def _written(self, _):
        """The store took records: the streak, and any drops (L{_drop}), are over."""
        self._flushes.succeeded()
        if self._dropped:
            self.log.warn("{count} usage records were dropped (lost) while the store could not take them",
                          count=self._dropped)
            self._dropped = 0

    def startService(self):
        super().startService()
        flush, sweep = LoopingCall(self.flush), LoopingCall(self._sweep)
        flush.clock = sweep.clock = self._clock
        flush.start(self._flush_interval, now=False)
        self._loops = [flush, sweep]
        self._first_sweep = self._clock.callLater(FIRST_SWEEP, sweep.start, RETENTION_INTERVAL)

    def stopService(self):
        """Write what is left (nothing is lost at a stop, but to a store that is down: said in an error line).

        @return: a Deferred firing with None once written, or once the write failed.
        """
        super().stopService()
        if self._first_sweep is not None and self._first_sweep.active():
            self._first_sweep.cancel()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        written = self.flush().addCallback(self._lost)
        if self._sweeping is None:
            return written
        # (a sweep in progress releases its claim before the store closes)
        return gatherResults([written, self._sweeping]).addCallback(lambda _: None)

    def _lost(self, _):
        if self._buffer:
            self.log.error("{count} usage records could not be written before the stop (the store is unavailable); "
                           "they are lost", count=len(self._buffer))

    def _sweep(self):
        before = self._clock.seconds() - self._retention
        d = Deferred.fromCoroutine(claimed(self._claims, "sweep:usage", self._owner, 600.0,
                                           lambda: self._usage.delete_before(before)))
        d.addErrback(lambda f: log_failure(self.log, f, "usage retention failed"))
        self._sweeping = ended = Deferred()

        def over(result):
            if self._sweeping is ended:
                self._sweeping = None
            ended.callback(None)
            return result
        return d.addBoth(over)


# The error codes of the gateway's own refusals a usage record is kept of (L{refused}): a limit's, a budget's 429, and
# the routing queue's (every replica of the provider at its concurrency cap past C{ROUTING_QUEUE_TIMEOUT}).
REFUSALS = frozenset((RateLimitExceeded.code, BudgetExceeded.code, ReplicasBusy.code))
NO_TOKENS = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}  # (a refused request's usage)
_TIME, _OUTCOME, _STATUS = (USAGE_FIELDS.index(field) for field in ("timestamp", "outcome", "status_code"))
# A summary's token sums and cost sums (None until a record has a price), by their columns.
_SUMS = tuple((name, USAGE_FIELDS.index(name))
              for name in ("input_tokens", "output_tokens", "total_tokens", "cached_tokens", "reasoning_tokens",
                           "audio_seconds"))
_COSTS = tuple((name, USAGE_FIELDS.index(name)) for name in ("input_cost", "output_cost", "total_cost"))
_TOKENS, _COST, _PATH, _KEY = (USAGE_FIELDS.index(field) for field in ("total_tokens", "total_cost", "user_path",
                                                                        "auth_key_id"))


def recorded_as(principal):
    """C{(auth_key_id, user_path)} of a record: a managed key's; the master key's no id, and the user path a
    request of it is attributed to (C{X-GoModel-User-Path}) or None."""
    if principal is None:
        return None, None
    return None if principal.master else principal.id, principal.user_path


def _ms(seconds) -> float:
    """C{seconds} in milliseconds, to the microsecond (round(x, 3) formats the number to round it: about
    2,000 instructions, against a hundred for this)."""
    return round(seconds * 1e6) / 1000
