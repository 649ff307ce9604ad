"""Admission under rate limits: requests and tokens per window, and requests in flight.

L{Limiter.admit} takes, for one request, 1 from every request bucket and
C{tokens} (the prompt estimate plus C{max_tokens}) from every token bucket of
every scope, and a concurrency slot in every scope with C{concurrent}: all or
nothing. Every window is a token bucket (capacity the limit, refilled evenly
over the window), so C{rpm=60} allows a burst of 60 and then one a second.

A scope is C{(name, RateLimit)}; names say what they limit and are shown to
clients, so never a secret: C{"key:k_123"}, C{"path:/team"},
C{"provider:vllm"}, C{"model:vllm/x"}. Bucket names are the scope name plus
C{"|r<seconds>"}, C{"|t<seconds>"} or C{"|c"}.

The caller then, once each:
  - L{Admission.settle}C{(actual_tokens)} when the request completed (0 when it
    never reached the upstream): token buckets give back or take the
    difference from the reservation;
  - L{Admission.release}C{()} when the answer is over: frees the slots;
or both at once with L{Admission.finish}C{(actual_tokens)}. With Redis,
C{admit} is one round trip and C{finish} another.
"""

import math
from functools import partial

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gomodel._twistedcompat import header_name
from gomodel.errors import RateLimitExceeded
from gomodel.limits.counters import INF, Admitted

# The most scopes' plans, and shared buckets' levels seen, kept (a key deleted leaves its own behind): past it
# they are dropped and made again as they are used.
KEPT = 100000
# Seconds an admission refused a concurrency slot on shared counters waits before each of its tries again (about
# half a second in all): a slot freed by another process is given back after that process's answer went out, so
# a client that waits for each answer may send its next request, to another process, before the release is in.
SLOT_WAITS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.24)
_NAMES = {60: "min", 3600: "hour", 86400: "day"}
_SHORT = {60: "M", 3600: "H", 86400: "D"}


def _window_name(seconds, tokens) -> str:
    what = "tokens" if tokens else "requests"
    if seconds in _NAMES:
        return f"{what} per {_NAMES[seconds]} ({'T' if tokens else 'R'}P{_SHORT[seconds]})"
    return f"{what} per {seconds}s"


class _Bucket:
    """One bucket of a scope's plan: where, how big, how fast, and what it counts."""

    __slots__ = ("name", "capacity", "capacity_raw", "refill", "tokens", "seconds", "scope")

    def __init__(self, scope, seconds, capacity, tokens):
        self.scope = scope
        self.seconds = seconds
        self.capacity = capacity
        self.capacity_raw = str(capacity).encode("ascii")
        self.refill = capacity / seconds
        self.tokens = tokens
        self.name = f"{scope}|{'t' if tokens else 'r'}{seconds}"


class _Prepared:
    """What one C{scopes} list asks of the counters, worked out once (everything but the request's tokens).

    @ivar buckets: the L{_Bucket}s of every scope, in order; C{token_buckets}: those counting tokens.
    @ivar slots: C{(slot bucket, limit)} of every scope with C{concurrent}; C{slot_scopes}: those scopes.
    """

    __slots__ = ("scopes", "buckets", "token_buckets", "slots", "slot_scopes", "_header_plans")

    def __init__(self, scopes, buckets, slots, slot_scopes):
        self.scopes = scopes  # held: the limiter keys this by id(scopes)
        self.buckets = buckets
        self.token_buckets = [b for b in buckets if b.tokens]
        self.slots = slots
        self.slot_scopes = slot_scopes
        self._header_plans = {}

    def specs(self, tokens):
        """C{(bucket, capacity, refill, amount)} of every bucket for a request of C{tokens}."""
        return [(b.name, b.capacity, b.refill, tokens if b.tokens else 1) for b in self.buckets]

    def header_plan(self, scope):
        """What C{scope}'s C{x-ratelimit-*} headers show (a scope's name, or a tuple of them: a key's own
        and its user path's): its requests and its tokens windows in the order its buckets come (of
        several, the fewest remaining is shown), each as C{(reset line prefix, bucket indices, {index: its
        limit line and remaining line prefix})}; a line prefix is a header's name as Twisted writes it and
        C{": "}."""
        plan = self._header_plans.get(scope)
        if plan is None:
            shown = (scope,) if scope.__class__ is str else scope
            kinds = {}
            for i, b in enumerate(self.buckets):
                if b.scope in shown:
                    kinds.setdefault(b.tokens, []).append(i)
            plan = self._header_plans[scope] = tuple(
                (_LINE_PREFIXES[tokens][2], tuple(indices),
                 {i: b"%s%s\r\n%s" % (_LINE_PREFIXES[tokens][0], self.buckets[i].capacity_raw,
                                      _LINE_PREFIXES[tokens][1]) for i in indices})
                for tokens, indices in kinds.items())
        return plan


def _plan(scope, limit):
    buckets = []
    for window in limit.windows:
        if window.max_requests is not None:
            buckets.append(_Bucket(scope, window.seconds, window.max_requests, False))
        if window.max_tokens is not None:
            buckets.append(_Bucket(scope, window.seconds, window.max_tokens, True))
    return limit, buckets, (f"{scope}|c" if limit.concurrent is not None else None)


class Limiter:
    """Admits requests under their scopes' L{RateLimit}s, on C{counters} (an L{ICounters}).

    It keeps a local view of its own slots in flight and, on shared counters,
    of every bucket it touched (level and when), for L{saturated}; local
    counters (C{immediate}) hold every bucket's level themselves.
    """

    log = Logger()

    def __init__(self, counters, clock):
        self.counters = counters  # the L{ICounters}
        self.immediate = counters.immediate  # whether admit_now and Admission.finish_now may be used
        self.clock = clock
        self._plans = {}
        self._prepared = {}  # id(scopes) -> its _Prepared
        # bucket name -> (level, at), this process's view of shared counters' buckets (local ones have it)
        self._seen = None if counters.immediate else {}
        # scope -> this process's requests holding a slot (on shared counters: local ones count them themselves)
        self._inflight = {}
        self._full_until = {}  # scope -> until when its slots were last seen all taken (by any process)

    def _plan_of(self, scope, limit):
        plan = self._plans.get(scope)
        if plan is None or (plan[0] is not limit and plan[0] != limit):
            if len(self._plans) > KEPT:  # (scopes of keys since deleted: made again when asked)
                self._plans.clear()
            plan = self._plans[scope] = _plan(scope, limit)
        return plan

    def admit(self, scopes, tokens: int, headers_for=None) -> Deferred:
        """Admit one request costing C{tokens} under every scope of C{scopes}, all or nothing.

        @param scopes: C{(scope name, RateLimit)} pairs; a scope named twice is
            counted twice, so name each once.
        @param headers_for: the scope (or the tuple of scopes) whose state the answer's
            C{x-ratelimit-*} headers show (the key's own and its path's), or None.
        @return: a Deferred firing with an L{Admission} (settle it, then release it);
            cancelled (its request's client left while shared counters answer), what the
            counters then take is given back as soon as they answer, as a request's that
            ends without usage (its slots freed, its tokens unused), not held until a
            slot's lease lapses. On shared counters, one refused a concurrency slot tries
            again a few times over about half a second (L{SLOT_WAITS}) before it fails:
            another process frees its slots after its answers went out.
        @raise RateLimitExceeded: (the Deferred fails with it) a limit refused; nothing was
            taken. Its C{scope} names the scope that refused.
        """
        prepared = self.prepare(scopes)
        if prepared is None:
            return succeed(NO_ADMISSION)
        specs, slots = prepared.specs(tokens), prepared.slots
        got = self.counters.admit(specs, slots)
        if got.called:
            admission = Deferred()
            got.addBoth(self._answered, admission, prepared, tokens, headers_for, None)
            return admission
        # (cancelled before the counters answer: they are told, L{_left}; while it waits for a slot, it stops)
        waiting = [got, 0]  # what it waits for now (the counters' answer, or the call of its next try), its tries
        admission = Deferred(partial(self._left, waiting, specs, slots))
        got.addBoth(self._answered, admission, prepared, tokens, headers_for, waiting)
        return admission

    def _left(self, waiting, specs, slots, admission):
        """C{admission}'s client left before the counters answered (C{waiting[0]}): counters that order their
        operations (L{gomodel.limits.counters.RedisCounters.abandoned}) send the next ones of its buckets after
        what it takes is given back (L{_answered}), not before (a retry refused the slot nobody held). Waiting
        to try again for a slot, it stops."""
        got = waiting[0]
        if got.__class__ is not Deferred:  # (the call of its next try)
            if got.active():
                got.cancel()
            return
        abandoned = getattr(self.counters, "abandoned", None)
        if abandoned is not None:
            abandoned(got, specs, slots)

    def _again(self, admission, prepared, specs, slots, tokens, headers_for, waiting):
        """Try C{admission}, refused a slot, again (L{SLOT_WAITS})."""
        if admission.called:
            return
        got = waiting[0] = self.counters.admit(specs, slots)
        got.addBoth(self._answered, admission, prepared, tokens, headers_for, waiting)

    def _answered(self, got, admission, prepared, tokens, headers_for, waiting):
        """Hand C{admission} what the counters answered (C{got}: an L{Admitted} or a failure); one already
        cancelled has what they took given back; one refused a slot on shared counters (C{waiting} not None)
        tries again after a while (L{SLOT_WAITS}), until it has tried them all."""
        if admission.called:  # (cancelled: nobody waits for it; the counters' next operations wait for the give-back)
            if got.__class__ is Admitted and got.ok:
                return self._admitted(got, prepared, tokens, None).finish(0).addErrback(self._not_given_back)
            return None
        if isinstance(got, Failure):
            admission.errback(got)
            return None
        if waiting is not None and not got.ok and got.refused >= 0 and waiting[1] < len(SLOT_WAITS):
            waiting[0] = self.clock.callLater(SLOT_WAITS[waiting[1]], self._again, admission, prepared,
                                              prepared.specs(tokens), prepared.slots, tokens, headers_for, waiting)
            waiting[1] += 1
            return None
        try:
            answer = self._admitted(got, prepared, tokens, headers_for)
        except Exception:  # RateLimitExceeded; any other error fails it too, never leaves it unfired
            admission.errback()
        else:
            admission.callback(answer)
        return None

    def _not_given_back(self, failure):
        self.log.failure("giving back a cancelled admission", failure)

    def admit_now(self, scopes, tokens: int, headers_for=None):
        """L{admit} at once, on counters that answer at once (C{immediate}): no Deferred, no coroutine.

        @return: an L{Admission}.
        @raise RateLimitExceeded: as L{admit}.
        """
        prepared = self.prepare(scopes)
        if prepared is None:
            return NO_ADMISSION
        return self._admitted(self.counters.admit_now(prepared.specs(tokens), prepared.slots), prepared, tokens,
                              headers_for)

    def prepare(self, scopes):
        """The L{_Prepared} of C{scopes}, or None when nothing limits it.

        Kept per C{scopes} object (a key's are the same list on every request; a changed
        limit comes in a new list).
        """
        prepared = self._prepared.get(id(scopes))
        if prepared is None or prepared.scopes is not scopes:
            buckets, slots, slot_scopes = [], [], []
            for scope, limit in scopes:
                if not limit:
                    continue
                _, planned, slot = self._plan_of(scope, limit)
                buckets.extend(planned)
                if slot is not None:
                    slots.append((slot, limit.concurrent))
                    slot_scopes.append(scope)
            if len(self._prepared) > 10000:
                self._prepared.clear()
            prepared = self._prepared[id(scopes)] = _Prepared(scopes, buckets, slots, slot_scopes)
        if not prepared.buckets and not prepared.slots:
            return None
        return prepared

    def _taken(self, prepared, levels):
        """Note what an admission took: the buckets' levels (this process's view) and its slots."""
        if self._seen is not None:
            self._saw(prepared.buckets, levels)
        self.holding(prepared.slot_scopes)

    def holding(self, slot_scopes):
        """Note one more request of this process holding a slot of each of C{slot_scopes} (on shared
        counters; local ones count them)."""
        if self.immediate:
            return
        for scope in slot_scopes:
            self._inflight[scope] = self._inflight.get(scope, 0) + 1

    def _saw(self, buckets, levels):
        """Note the C{levels} shared counters answered for C{buckets} (this process's view, for L{saturated})."""
        now = self.clock.seconds()
        seen = self._seen
        if len(seen) > KEPT:  # (buckets of keys since deleted; a bucket not seen again reads as unknown)
            seen.clear()
        for b, level in zip(buckets, levels):
            seen[b.name] = (level, now)

    def _admitted(self, got, prepared, tokens, headers_for):
        """The L{Admission} of what the counters answered (an L{Admitted}), or raise L{RateLimitExceeded}."""
        buckets = prepared.buckets
        results = got.taken
        levels = [r.remaining for r in results]
        header_plan = prepared.header_plan(headers_for) if headers_for is not None else ()
        if not got.ok:
            if self._seen is not None:
                self._saw(buckets, levels)
            headers = _header_dict(header_plan, buckets, levels)
            if got.refused < 0:
                # The refusal that lasts longest says when a retry can pass.
                b, r = max(((b, r) for b, r in zip(buckets, results) if not r.allowed),
                           key=lambda pair: pair[1].retry_after)
                raise self._refused(b, r, tokens, headers)
            scope = prepared.slot_scopes[got.refused]
            self._full_until[scope] = self.clock.seconds() + 1
            raise RateLimitExceeded(
                f"Rate limit reached for {scope} on concurrent requests: Limit {prepared.slots[got.refused][1]}. "
                "Please try again when a request of this scope has finished.",
                scope=scope, retry_after=1, headers=headers)
        self._taken(prepared, levels)
        return Admission(self, prepared, levels, tokens, got.lease, header_plan)

    def _refused(self, bucket, result, tokens, headers):
        amount = tokens if bucket.tokens else 1
        what = _window_name(bucket.seconds, bucket.tokens)
        if result.retry_after == INF:
            return RateLimitExceeded(
                f"Request too large for {bucket.scope} on {what}: Limit {bucket.capacity}, "
                f"Requested {amount}. Send fewer tokens (a shorter prompt or a lower max_tokens).",
                scope=bucket.scope, tokens=True, headers=headers)
        used = max(0, math.ceil(bucket.capacity - result.remaining))
        return RateLimitExceeded(
            f"Rate limit reached for {bucket.scope} on {what}: Limit {bucket.capacity}, Used {used}, "
            f"Requested {amount}. Please try again in {duration(result.retry_after)}.",
            scope=bucket.scope, tokens=bucket.tokens, retry_after=result.retry_after, headers=headers)

    def released(self, slot_scopes):
        """Note one request fewer of this process holding a slot of each of C{slot_scopes} (as L{holding})."""
        if self.immediate:
            return
        for scope in slot_scopes:
            held = self._inflight[scope] - 1
            if held:
                self._inflight[scope] = held
            else:
                del self._inflight[scope]

    def read(self, scopes):
        """What the windows and slots of C{scopes} hold now, changing nothing (the caller's status page).

        @param scopes: C{(scope name, RateLimit)} pairs.
        @return: a Deferred firing with, per scope in order, C{(levels, held)}: C{levels} maps each
            window's C{(seconds, counts tokens)} to its bucket's level now (full: its capacity),
            C{held} is its slots held (None without C{concurrent}); or with None when the counters
            cannot be read (Redis unreachable).
        """
        plans = [self._plan_of(scope, limit) for scope, limit in scopes]
        specs = [(b.name, b.capacity, b.refill) for _, buckets, _ in plans for b in buckets]
        slots = [slot for _, _, slot in plans if slot is not None]
        return self.counters.peek(specs, slots).addCallback(_read, plans)

    def saturated(self, scope_name, limit) -> bool:
        """Whether C{scope_name} looks at its limit in this process's view (for routing around it).

        True when one of its buckets this process last saw is still empty
        (below one request, or at or below zero tokens), when this process
        alone holds all its C{concurrent} slots, or when its slots were all
        taken at an admission of the last second (other processes' too, with
        Redis). Cheap; never waits on the counters (local ones are read in place).
        """
        if not limit:
            return False
        _, buckets, slot = self._plan_of(scope_name, limit)
        if limit.concurrent is not None:
            held = self.counters.held(slot) if self.immediate else self._inflight.get(scope_name, 0)
            if held >= limit.concurrent:
                return True
            until = self._full_until.get(scope_name)
            if until is not None:
                if self.clock.seconds() < until:
                    return True
                del self._full_until[scope_name]
        now = self.clock.seconds()
        for b in buckets:
            seen = self.counters.level(b.name) if self._seen is None else self._seen.get(b.name)
            if seen is not None:
                level = min(b.capacity, seen[0] + (now - seen[1]) * b.refill)
                if level <= 0 if b.tokens else level < 1:
                    return True
        return False


def _read(answer, plans):
    """L{Limiter.read}'s answer from the counters' C{answer} (L{ICounters.peek}'s) for the scopes' C{plans}."""
    if answer is None:
        return None
    levels, held = iter(answer[0]), iter(answer[1])
    return [({(b.seconds, b.tokens): next(levels) for b in buckets}, None if slot is None else next(held))
            for _, buckets, slot in plans]


class Admission:
    """A request admitted by L{Limiter.admit}; settle it once, release it once (both idempotent).

    @ivar headers: OpenAI's C{x-ratelimit-*} headers for the scope named by
        C{headers_for} (empty without one): limit, remaining and reset (OpenAI's
        duration format) of its requests and tokens windows; where it has
        several, the one with the fewest remaining.
    """

    __slots__ = ("_limiter", "_prepared", "_levels", "_tokens", "_lease", "_header_plan", "_headers", "_settled")

    def __init__(self, limiter, prepared, levels, tokens, lease, header_plan):
        self._limiter = limiter
        self._prepared = prepared
        self._levels = levels  # each bucket's level after the take
        self._tokens = tokens
        self._lease = lease
        self._header_plan = header_plan
        self._headers = None
        self._settled = False

    @property
    def headers(self) -> dict:
        if self._headers is None:
            self._headers = _header_dict(self._header_plan, self._prepared.buckets, self._levels)
        return self._headers

    def header_lines(self) -> bytes:
        """L{headers} as an answer's header lines (L{header_lines})."""
        return header_lines(self._header_plan, self._prepared.buckets, self._levels)

    def keep_reserved(self):
        """Keep the reservation taken whatever it is settled with (its request goes on upstream unanswered)."""
        self._tokens = 0

    def settle(self, actual_tokens):
        """Charge the token buckets C{actual_tokens} instead of the reservation.

        @return: Deferred firing None once the counters have it.
        """
        return self._finish(actual_tokens, False)

    def release(self):
        """Free the concurrency slots: Deferred firing None."""
        return self._finish(None, True)

    def finish(self, actual_tokens):
        """L{settle} and L{release} in one counters operation (one Redis round trip): Deferred firing None."""
        return self._finish(actual_tokens, True)

    def finish_now(self, actual_tokens):
        """L{finish} at once, on counters that answer at once (C{immediate})."""
        buckets, delta, lease = self._closing(actual_tokens, True)
        if buckets or lease is not None:
            self._finished(self._limiter.counters.settle_now(buckets, delta, lease), buckets)

    def _finish(self, actual_tokens, release):
        buckets, delta, lease = self._closing(actual_tokens, release)
        if not buckets and lease is None:
            return succeed(None)
        specs = [(b.name, b.capacity, b.refill, delta) for b in buckets]
        return self._limiter.counters.finish(specs, lease).addCallback(self._finished, buckets)

    def _closing(self, actual_tokens, release):
        """C{(token buckets, delta, lease)}: what settling with C{actual_tokens} (None: not now) and releasing
        give back; no buckets when there is nothing to settle."""
        buckets, delta = (), 0
        if actual_tokens is not None and not self._settled:
            self._settled = True
            delta = actual_tokens - self._tokens
            if delta:
                buckets = self._prepared.token_buckets
        lease = None
        if release and self._lease is not None:
            lease, self._lease = self._lease, None
            self._limiter.released(self._prepared.slot_scopes)
        return buckets, delta, lease

    def _finished(self, levels, buckets):
        if self._limiter._seen is not None:
            self._limiter._saw(buckets, levels)


NOTHING = _Prepared((), [], [], [])  # what a scopes list without limits asks
NO_ADMISSION = Admission(None, NOTHING, [], 0, None, ())


_HEADER_NAMES = {tokens: tuple(f"x-ratelimit-{what}-{suffix}" for what in ("limit", "remaining", "reset"))
                 for tokens, suffix in ((False, "requests"), (True, "tokens"))}
_RAW_HEADER_NAMES = {tokens: tuple(header_name(name) for name in names) for tokens, names in _HEADER_NAMES.items()}
_LINE_PREFIXES = {tokens: tuple(raw + b": " for raw in names) for tokens, names in _RAW_HEADER_NAMES.items()}
_HEADER_TEXT = {raw: name for tokens in _HEADER_NAMES
                for raw, name in zip(_RAW_HEADER_NAMES[tokens], _HEADER_NAMES[tokens])}
# The six names a limited key's answers carry, lower-case bytes (as an upstream's are compared).
RATE_LIMIT_HEADERS = frozenset(name.encode("ascii") for names in _HEADER_NAMES.values() for name in names)


def header_lines(plan, buckets, levels) -> bytes:
    """The headers of a L{_Prepared.header_plan} over the buckets' C{levels}, as the lines of an answer's
    head (C{b"Name: value\\r\\n"} each, names as Twisted writes them): formatted in one piece, where six
    header entries would each be set, checked and written on their own."""
    lines = b""
    for reset, indices, heads in plan:
        i = indices[0] if len(indices) == 1 else min(indices, key=levels.__getitem__)  # the first of the fewest
        b, level = buckets[i], levels[i]
        reset_ms = math.ceil((b.capacity - level) / b.refill * 1000 - 1e-6)  # as duration() rounds
        lines += b"%s%d\r\n%s%s\r\n" % (
            heads[i], level if level >= 1 else 0,  # floored, never below 0
            reset, RESETS_MS[reset_ms] if 0 <= reset_ms < 1000 else reset_text(reset_ms))
    return lines


def reset_text(ms: int) -> bytes:
    """A C{x-ratelimit-reset-*} value of C{ms} milliseconds (rounded up as L{duration} does), as written."""
    return RESETS_MS[ms] if 0 <= ms < 1000 else b"0s" if ms < 0 else _duration_ms(ms).encode("ascii")


# A reset under a second as it is written, by its milliseconds (0: "0s"; a limit far above the load
# refills a request's worth in one or two): an index where formatting costs about 400 instructions.
RESETS_MS = (b"0s",) + tuple(b"%dms" % ms for ms in range(1, 1000))


def _header_dict(plan, buckets, levels) -> dict:
    """The headers of a L{_Prepared.header_plan} over the buckets' C{levels} by their lower-case names, as text."""
    lines = header_lines(plan, buckets, levels).split(b"\r\n")
    return {_HEADER_TEXT[name]: value.decode("ascii") for name, value in (line.split(b": ", 1) for line in lines if line)}


def duration(seconds) -> str:
    """OpenAI's (Go's) duration format, to the millisecond: C{"20ms"}, C{"1s"}, C{"6m0s"}, C{"1h0m12.5s"}."""
    return _duration_ms(math.ceil(seconds * 1000 - 1e-6) if seconds > 0 else 0)


def _duration_ms(ms: int) -> str:
    """L{duration} of C{ms} whole milliseconds (0 or more)."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0") if frac else str(whole)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
