"""Counters under the limits: token buckets, concurrency slots and budget sums.

One interface (L{ICounters}), two backends:

  - L{LocalCounters}: in this process, exact; every method answers with an
    already-fired Deferred.
  - L{RedisCounters}: shared by every process using one Redis. Each operation is
    one Lua script run atomically on Redis's own clock (C{TIME}); every key
    has a TTL. Redis is reached with redis-py in a small owned thread pool. When
    Redis cannot be reached the counters B{fail open}: the operation answers as
    if nothing were limited, a warning is logged (at most every
    C{warn_every} seconds), C{failures} counts such answers, and Redis is
    left alone for C{retry_after} seconds so an unreachable server costs no
    request a timeout.

Bucket names are plain strings (C{"key:k_1|r60"}); the backend adds its own
prefix. The buckets of one batch must be distinct.

A backend implements four operations, each one Redis round trip:
L{ICounters.admit} (token buckets and concurrency slots together, all or
nothing), L{ICounters.finish} (settle token buckets and free slots together),
L{ICounters.spend_all} and L{ICounters.spent_all}. The other methods
(C{take_all}, C{adjust_all}, C{acquire_all}, C{release} and the one-bucket
forms C{take}, C{adjust}, C{acquire}, C{spend}, C{spent}) are built on them.

Token buckets: a bucket holds up to C{capacity} and refills C{refill_per_second};
an absent bucket is full. Taking C{amount} succeeds when the level is at
least C{amount}; L{ICounters.adjust_all} may push the level below zero (a
debt settled with real usage) and never above C{capacity}.

Concurrency slots with Redis are leases, a sorted set per bucket of lease ids
scored by their expiry (C{lease_ttl}, renewed every C{lease_ttl/3} seconds by
the holder while it runs): a process that dies holding slots loses them
within C{lease_ttl} seconds; a renewal puts back a lease Redis lost (restarted
empty, flushed), so the slots in flight count again within C{lease_ttl/3}. An
admission answered open (Redis unreachable) holds a lease all the same, put in
Redis by the renewals once it answers again: a request in flight counts again
as soon, and its end frees it (a Redis that stalled and ran the admission late
holds the same lease). The release of a slot Redis did not answer leaves it
held: it is freed once Redis answers again, and at each renewal until it would
have lapsed. Budget reservations are kept the same way: each process's part of a
budget sum (reserved by its requests in flight) lives as long as its liveness key
(set by each reservation, renewed every C{lease_ttl/3} while it holds some), and the
next reservation, read or seed of the sum after that takes it off; a part has an
id, new each time it starts afresh, which the settlement of a reservation names
(a process paused past its lease settles its old requests apart from its new ones). A budget sum is
seeded under one mark for every sum, given anew where a new connection finds a server other than the
last one (restarted, failed over) or Redis is found gone back: a sum under an older mark is seeded
again at its next use, by whichever process uses it. Multi-key
scripts need their keys on one Redis server (or primary): on a Redis Cluster
(L{gomodel.redis_client.Cluster}) the prefix carries one hash tag
(L{gomodel.redis_client.tagged}), so every key, the liveness keys the
scripts name from it included, is in one slot.
"""

import itertools
import math
import re
import uuid
from typing import NamedTuple

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from gomodel.redis_client import connect, errors, is_cluster, misconfigured, on_connect, reason
from gomodel.store.threads import OwnedThreads

INF = float("inf")


class Taken(NamedTuple):
    """One bucket after a take (before it, when the take was refused).

    @ivar allowed: this bucket held C{amount}.
    @ivar remaining: the level now (may be negative: a debt).
    @ivar reset_after: seconds until the bucket is full again.
    @ivar retry_after: seconds until C{amount} fits (0 when it does; C{inf}
        when C{amount} exceeds the capacity).
    """

    allowed: bool
    remaining: float
    reset_after: float
    retry_after: float


class Admitted(NamedTuple):
    """The answer of L{ICounters.admit}.

    @ivar ok: everything was taken.
    @ivar taken: one L{Taken} per token-bucket spec (levels before the take
        unless C{ok}).
    @ivar lease: what holds the slots (for L{ICounters.finish}); None unless
        C{ok} and there were slots.
    @ivar refused: the index of the full slot bucket that refused, else -1.
    """

    ok: bool
    taken: list
    lease: object
    refused: int


class Slots(NamedTuple):
    """The answer of C{acquire_all}: the C{lease} holding every slot, or None and the index C{refused}."""

    lease: object
    refused: int


# Makes a named tuple from a tuple without its Python-level __new__ (the counters' hot path).
_new_tuple = tuple.__new__


def taken(level, capacity, refill, amount, took) -> Taken:
    """The L{Taken} of a bucket at C{level} (after the take when C{took})."""
    if took:
        fits, retry = True, 0.0
    elif amount > capacity:
        fits, retry = False, INF
    elif level >= amount:
        fits, retry = True, 0.0
    else:
        fits, retry = False, (amount - level) / refill
    return Taken(fits, level, max(0.0, (capacity - level) / refill), retry)


class ICounters(Interface):
    """Shared or local counters; every method returns a Deferred."""

    shared = Attribute("True when other processes see the same counters (Redis).")
    immediate = Attribute("True when the four operations also exist answering at once, without a Deferred "
                          "(C{admit_now}, C{finish_now}, C{spend_all_now}, C{spent_all_now}; with C{settle_now}, "
                          "C{level} and the live cells of L{LocalCounters}): local counters.")
    failures = Attribute("How many operations were answered open because the backend failed.")

    def admit(specs, slots):
        """Take from token buckets and one slot in each slot bucket, all or nothing.

        @param specs: C{(bucket, capacity, refill_per_second, amount)} tuples.
        @param slots: C{(bucket, limit)} tuples.
        @return: Deferred firing with an L{Admitted}.
        """

    def finish(specs, lease):
        """Consume C{delta} more from each bucket (negative gives back; below zero if need be), and free C{lease}.

        @param specs: C{(bucket, capacity, refill_per_second, delta)} tuples.
        @param lease: from L{admit}, or None; freeing it again does nothing.
        @return: Deferred firing with the buckets' new levels, a list of floats.
        """

    def spend_all(items):
        """Add to budget sums.

        @param items: C{(bucket, tokens, cost, expires_at)} tuples; C{expires_at}
            (Unix seconds) or None for a sum kept for good.
        @return: Deferred firing None.
        """

    def spent_all(buckets):
        """The sums of C{buckets}: Deferred firing with a list of C{(tokens, cost)}; absent ones are C{(0, 0.0)}."""

    def peek(specs, slots):
        """Read token buckets and slot buckets as they stand now, changing nothing (a status page's read).

        @param specs: C{(bucket, capacity, refill_per_second)} tuples.
        @param slots: slot bucket names.
        @return: Deferred firing with C{(levels, held)}: each bucket's level now (a float; absent: full,
            C{capacity}) and each slot bucket's slots held (an int); or with None when the counters cannot
            be read (Redis unreachable: no figures rather than made-up ones).
        """


class _Forms:
    """The other forms, over the four operations."""

    def take_all(self, specs):
        """Take from token buckets, all or nothing: Deferred firing with one L{Taken} per spec."""
        return self.admit(specs, ()).addCallback(lambda got: got.taken)

    def acquire_all(self, slots):
        """One slot in each bucket, all or nothing: Deferred firing with L{Slots}."""
        return self.admit((), slots).addCallback(lambda got: Slots(got.lease, got.refused))

    def adjust_all(self, specs):
        """L{ICounters.finish} without a lease: Deferred firing with the new levels."""
        return self.finish(specs, None)

    def release(self, lease):
        """Free the slots of C{lease} (again, or None: nothing): Deferred firing None."""
        return self.finish((), lease).addCallback(lambda _: None)

    def take(self, bucket, capacity, refill_per_second, amount):
        """Take C{amount} from one token bucket: Deferred firing with its L{Taken}."""
        return self.take_all([(bucket, capacity, refill_per_second, amount)]).addCallback(_first)

    def adjust(self, bucket, capacity, refill_per_second, delta):
        """Consume C{delta} more (negative gives back): Deferred firing with the new level."""
        return self.adjust_all([(bucket, capacity, refill_per_second, delta)]).addCallback(_first)

    def acquire(self, bucket, limit):
        """One concurrency slot: Deferred firing with a lease (for L{release}), or None when full."""
        return self.acquire_all([(bucket, limit)]).addCallback(lambda slots: slots.lease)

    def spend(self, bucket, tokens, cost, expires_at):
        """Add C{tokens} and C{cost} to one budget sum: Deferred firing None."""
        return self.spend_all([(bucket, tokens, cost, expires_at)])

    def spent(self, bucket):
        """One budget sum: Deferred firing with C{(tokens, cost)}."""
        return self.spent_all([bucket]).addCallback(_first)


def _first(results):
    return results[0]


@implementer(ICounters)
class LocalCounters(_Forms):
    """Exact counters in this process, on C{clock} (anything with C{seconds()}).

    Full buckets and ended sums are swept every C{sweep_every} operations,
    so the maps hold only live state.
    """

    shared = False
    immediate = True
    failures = 0

    def __init__(self, clock, sweep_every=4096):
        self._clock = clock
        self._buckets = {}  # bucket -> [level, at, capacity, refill]
        self._inflight = {}  # bucket -> [slots held] (a cell: L{slot_cell})
        self._leases = {}  # lease -> its (bucket, limit) slots
        self._sums = {}  # bucket -> [tokens, cost, expires_at]
        self._ids = itertools.count(1)
        self._sweep_every = sweep_every
        self.ops_left = sweep_every  # operations until the next sweep (a L{Lane} counts its own in place: L{tick})
        self.epoch = 0  # bumped by every sweep: cells handed out before it may be gone

    def admit(self, specs, slots):
        return succeed(self.admit_now(specs, slots))

    def finish(self, specs, lease):
        return succeed(self.finish_now(specs, lease))

    def spend_all(self, items):
        self.spend_all_now(items)
        return succeed(None)

    def spent_all(self, buckets):
        return succeed(self.spent_all_now(buckets))

    def peek(self, specs, slots):
        return succeed(self.peek_now(specs, slots))

    def peek_now(self, specs, slots) -> tuple:
        """L{ICounters.peek}, answered at once."""
        now = self._clock.seconds()
        levels = []
        for bucket, capacity, refill in specs:
            state = self._buckets.get(bucket)
            level = capacity
            if state is not None:
                level = state[0] + (now - state[1] if now > state[1] else 0.0) * refill  # (L{stepped_back})
                if state[2] != capacity:  # the limit changed (L{moved})
                    level = moved(state, level, capacity)
                if level > capacity:
                    level = capacity
            levels.append(level)
        return levels, [self.held(bucket) for bucket in slots]

    def admit_now(self, specs, slots) -> Admitted:
        """L{ICounters.admit}, answered at once."""
        now = self._clock.seconds()
        buckets = self._buckets
        states = []
        ok = True
        for bucket, capacity, refill, amount in specs:
            state = buckets.get(bucket)
            if state is None:
                level = capacity
            else:
                at = state[1]
                level = state[0] + (now - at) * refill if now > at else state[0]  # (L{stepped_back})
                if state[2] != capacity:  # the limit changed (L{moved})
                    level = moved(state, level, capacity)
                if level > capacity:
                    level = capacity
            states.append((state, level))
            if level < amount:
                ok = False
        refused = -1
        if ok:
            for i, (bucket, limit) in enumerate(slots):
                if self.held(bucket) >= limit:
                    ok, refused = False, i
                    break
        out = []
        for (bucket, capacity, refill, amount), (state, level) in zip(specs, states):
            if ok:
                level -= amount
                if state is None:
                    buckets[bucket] = [level, now, capacity, refill]
                else:
                    state[0], state[1], state[2], state[3] = level, now, capacity, refill
                reset = (capacity - level) / refill
                out.append(_new_tuple(Taken, (True, level, reset if reset > 0.0 else 0.0, 0.0)))
            else:
                out.append(taken(level, capacity, refill, amount, False))
        lease = self.hold(slots) if ok and slots else None
        self.tick(now)
        return _new_tuple(Admitted, (ok, out, lease, refused))

    def cell(self, bucket, capacity, refill) -> list:
        """The live state of token bucket C{bucket}, C{[level, at, capacity, refill]} (made full when absent).

        A holder may read and write it in place (L{gomodel.limits.lanes.Lane}) until L{epoch} changes: a
        sweep drops full buckets, and a bucket asked for again after it gets a new state.
        """
        state = self._buckets.get(bucket)
        if state is None:
            state = self._buckets[bucket] = [capacity, 0.0, capacity, refill]
        elif state[2] != capacity or state[3] != refill:  # the limit changed (L{moved}): its level now, under it
            now = self._clock.seconds()
            level = moved(state, state[0] + (now - state[1] if now > state[1] else 0.0) * state[3], capacity)
            state[0], state[1], state[2], state[3] = min(level, capacity), now, capacity, refill
        return state

    def slot_cell(self, bucket) -> list:
        """The live count of concurrency slot C{bucket}'s slots held, C{[held]}, for holders as L{cell}'s.
        A held slot's cell is never swept: one held when the epoch changed is still the live one."""
        cell = self._inflight.get(bucket)
        if cell is None:
            cell = self._inflight[bucket] = [0]
        return cell

    def sum_cell(self, bucket, expires_at) -> list:
        """The live state of budget sum C{bucket}, C{[tokens, cost, expires_at]} (made empty when absent or
        ended), for holders as L{cell}'s."""
        state = self._sums.get(bucket)
        if state is None:
            state = self._sums[bucket] = [0, 0.0, expires_at]
        elif state[2] is not None and state[2] <= self._clock.seconds():
            state[0], state[1], state[2] = 0, 0.0, expires_at
        return state

    def set_sum(self, bucket, tokens, cost, expires_at):
        """Set budget sum C{bucket} to C{tokens} and C{cost} (seeded again from the usage ledger) in a new cell,
        in a new L{epoch}: the holders of its old cell (a L{gomodel.limits.lanes.Lane}, a budget reservation of a
        request in flight, which the ledger does not count yet) settle by name what they use, and give back what
        they reserved to the old cell (so nothing of it is lost, nor taken off the new figure)."""
        self._sums[bucket] = [tokens, cost, expires_at]
        self.epoch += 1

    def finish_now(self, specs, lease) -> list:
        """L{ICounters.finish}, answered at once."""
        now = self._clock.seconds()
        out = []
        buckets = self._buckets
        for bucket, capacity, refill, delta in specs:
            out.append(self._adjusted(buckets, bucket, capacity, refill, delta, now))
        self.free(lease)
        return out

    def settle_now(self, buckets, delta, lease) -> list:
        """L{finish_now} of C{delta} on each of C{buckets} (objects with C{name}, C{capacity} and C{refill})."""
        now = self._clock.seconds()
        store = self._buckets
        out = [self._adjusted(store, b.name, b.capacity, b.refill, delta, now) for b in buckets]
        self.free(lease)
        return out

    @staticmethod
    def _adjusted(store, bucket, capacity, refill, delta, now):
        """Consume C{delta} more from C{bucket} (below zero if need be, never above C{capacity}): its new level."""
        state = store.get(bucket)
        if state is None:
            level = min(capacity, capacity - delta)
            store[bucket] = [level, now, capacity, refill]
            return level
        return adjust_cell(state, capacity, refill, delta, now)

    def hold(self, slots):
        """A new lease holding one slot in each of C{slots}' buckets (C{(bucket, limit)} pairs, kept by
        the lease: not to be changed after)."""
        for bucket, _ in slots:
            self.slot_cell(bucket)[0] += 1
        lease = next(self._ids)
        self._leases[lease] = slots
        return lease

    def held(self, bucket) -> int:
        """How many slots of C{bucket} are held."""
        cell = self._inflight.get(bucket)
        return 0 if cell is None else cell[0]

    def try_hold(self, slots):
        """L{hold}, or None (nothing held) when a bucket of C{slots} is at its limit."""
        for bucket, limit in slots:
            if self.held(bucket) >= limit:
                return None
        return self.hold(slots)

    def free(self, lease):
        """Free the slots of C{lease} (again, or None: nothing)."""
        for bucket, _ in self._leases.pop(lease, None) or ():
            self._inflight[bucket][0] -= 1  # (held: not swept; a cell of none held goes at the next sweep)

    def spend_all_now(self, items):
        """L{ICounters.spend_all}, done at once."""
        now = self._clock.seconds()
        for bucket, tokens, cost, expires_at in items:
            state = self._sums.get(bucket)
            if state is None:
                self._sums[bucket] = [tokens, cost, expires_at]
            elif state[2] is not None and state[2] <= now:  # in place: a holder of its cell sees it
                state[0], state[1], state[2] = tokens, cost, expires_at
            else:
                state[0] += tokens
                state[1] += cost
                state[2] = expires_at
        self.tick(now)

    def spent_all_now(self, buckets) -> list:
        """L{ICounters.spent_all}, answered at once."""
        now = self._clock.seconds()
        out = []
        for bucket in buckets:
            state = self._sums.get(bucket)
            if state is None or (state[2] is not None and state[2] <= now):
                out.append((0, 0.0))
            else:
                out.append((state[0], state[1]))
        return out

    def tick(self, now):
        """Count an operation; every C{sweep_every} operations, sweep (a new L{epoch}).

        (A L{gomodel.limits.lanes.Lane} does this inline: C{ops_left -= 1}, and L{sweep} once it is 0.)"""
        self.ops_left -= 1
        if not self.ops_left:
            self.sweep(now)

    def sweep(self, now):
        """Drop the full buckets, ended sums and free slots (a new L{epoch}), and count C{sweep_every} again."""
        self.ops_left = self._sweep_every
        self.epoch += 1
        self._buckets = {b: s for b, s in self._buckets.items() if s[0] + (now - s[1]) * s[3] < s[2]}
        self._sums = {b: s for b, s in self._sums.items() if s[2] is None or s[2] > now}
        self._inflight = {b: cell for b, cell in self._inflight.items() if cell[0]}

    def level(self, bucket):
        """The stored level of C{bucket} and when it was stored, or None (full): the limiter's view of it."""
        state = self._buckets.get(bucket)
        return None if state is None else (state[0], state[1])


def _bytes(reply) -> bytes:
    """A Redis reply read raw off a connection (bytes, or str where the client decodes), as bytes."""
    return reply if isinstance(reply, bytes) else str(reply).encode()


def adjust_cell(cell, capacity, refill, delta, now) -> float:
    """Consume C{delta} more from a token bucket's live state C{cell} (L{LocalCounters.cell}) at C{now},
    below zero if need be, never above C{capacity}: its new level."""
    level = cell[0] + (now - cell[1]) * refill
    if now < cell[1]:  # (L{stepped_back}: a level stored now is read from now on)
        level = cell[0]
    if cell[2] != capacity:  # the limit changed
        level = moved(cell, level, capacity)
    if level > capacity:  # (comparisons: min() of two numbers costs about 900 instructions)
        level = capacity
    level -= delta
    if level > capacity:
        level = capacity
    cell[0], cell[1], cell[2], cell[3] = level, now, capacity, refill
    return level


def stepped_back(state, capacity) -> float:
    """A token bucket's level under C{capacity} at its C{state}'s own time: its level now where the wall clock
    stepped back (NTP) since it was stored (C{now < state[1]}). Neither refilled nor drained until the clock is
    past that time again: read as C{level + (now - at) * refill}, an hour back would take an hour's refill off it
    and refuse its key's requests until it refilled. What was used stays used; a level stored under the
    stepped-back clock refills from then on. (Read so however small the step, and whether or not the request
    fits: before, a step that left room for the request cost the bucket that step's refill.)"""
    level = state[0]
    if state[2] != capacity:
        level = moved(state, level, capacity)
    return capacity if level > capacity else level


def moved(state, level, capacity) -> float:
    """A token bucket's C{level} (refilled up to now, not yet capped) under C{capacity}, its limit changed
    since its C{state} was stored (then C{state[2]}): what was used stays used. A raised limit gives its
    headroom at once (10 a minute, all used, raised to 100: 90 may go now, not as the bucket refills); a
    lowered one keeps a client that used more than the new limit waiting."""
    old = state[2]
    return (old if level > old else level) + capacity - old


# Redis scripts. Levels travel as strings (%.17g): a Lua number in a reply is truncated to an integer. A level stored
# at a time after Redis's now (written under a clock ahead: a failover, a clock stepped back) refills from now on; a
# lease expiring more than its TTL after Redis's now (stored so) is read as renewed now.
_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1000000 "

# KEYS: nb token buckets, then the slot buckets. ARGV: nb, lease ttl (ms), lease id, capacity, refill and
# amount of each bucket, then the limit of each slot bucket.
# Returns {ok, refused slot (1-based) or 0, level of each bucket as a string}.
_ADMIT = _NOW + """
local nb = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local levels = {}
local ok = 1
for i = 1, nb do
  local cap = tonumber(ARGV[3 * i + 1])
  local rate = tonumber(ARGV[3 * i + 2])
  local s = redis.call('HMGET', KEYS[i], 'v', 't', 'k')
  local level = cap
  if s[1] then
    level = tonumber(s[1]) + math.max(0, now - tonumber(s[2])) * rate
    if s[3] then  -- the capacity it was stored under: a changed limit moves the level as much
      level = math.min(tonumber(s[3]), level) + cap - tonumber(s[3])
    end
    level = math.min(cap, level)
  end
  levels[i] = level
  if level < tonumber(ARGV[3 * i + 3]) then ok = 0 end
end
local refused = 0
local ms = math.floor(now * 1000)
if ok == 1 then
  for i = nb + 1, #KEYS do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ms)
    -- a lease expiring further than a TTL from now was stored under a clock ahead (a failover to a replica whose
    -- clock lags): read as renewed now, it lapses within a TTL unless its holder renews it
    local ahead = redis.call('ZRANGEBYSCORE', KEYS[i], '(' .. (ms + ttl), '+inf')
    for j = 1, #ahead do redis.call('ZADD', KEYS[i], ms + ttl, ahead[j]) end
    if redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[3 * nb + 3 + i - nb]) then
      ok = 0
      refused = i - nb
      break
    end
  end
end
local out = {ok, refused}
for i = 1, nb do
  local level = levels[i]
  if ok == 1 then
    local cap = tonumber(ARGV[3 * i + 1])
    level = level - tonumber(ARGV[3 * i + 3])
    if level >= cap then
      redis.call('DEL', KEYS[i])
    else
      redis.call('HSET', KEYS[i], 'v', string.format('%.17g', level), 't', string.format('%.17g', now),
                 'k', ARGV[3 * i + 1])
      redis.call('PEXPIRE', KEYS[i], math.ceil((cap - level) / tonumber(ARGV[3 * i + 2]) * 1000) + 1)
    end
  end
  out[i + 2] = string.format('%.17g', level)
end
if ok == 1 then
  for i = nb + 1, #KEYS do
    redis.call('ZADD', KEYS[i], ms + ttl, ARGV[3])
    redis.call('PEXPIRE', KEYS[i], ttl + 1000)
  end
end
return out
"""

# KEYS: nb token buckets, then the slot buckets of the lease. ARGV: nb, lease id (or ''), capacity, refill
# and delta of each bucket. Returns the new level of each bucket as a string.
_FINISH = _NOW + """
local nb = tonumber(ARGV[1])
local out = {}
for i = 1, nb do
  local cap = tonumber(ARGV[3 * i])
  local rate = tonumber(ARGV[3 * i + 1])
  local s = redis.call('HMGET', KEYS[i], 'v', 't', 'k')
  local level = cap
  if s[1] then
    level = tonumber(s[1]) + math.max(0, now - tonumber(s[2])) * rate
    if s[3] then
      level = math.min(tonumber(s[3]), level) + cap - tonumber(s[3])
    end
    level = math.min(cap, level)
  end
  level = math.min(cap, level - tonumber(ARGV[3 * i + 2]))
  if level >= cap then
    redis.call('DEL', KEYS[i])
  else
    redis.call('HSET', KEYS[i], 'v', string.format('%.17g', level), 't', string.format('%.17g', now),
               'k', ARGV[3 * i])
    redis.call('PEXPIRE', KEYS[i], math.ceil((cap - level) / rate * 1000) + 1)
  end
  out[i] = string.format('%.17g', level)
end
for i = nb + 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[2]) end
return out
"""

# A read of token buckets and slot buckets, changing nothing. KEYS: nb token buckets, then the slot buckets.
# ARGV: nb, then the capacity and refill of each bucket. Returns the level of each bucket as a string, then
# the live leases of each slot bucket.
_PEEK = _NOW + """
local nb = tonumber(ARGV[1])
local out = {}
for i = 1, nb do
  local cap = tonumber(ARGV[2 * i])
  local s = redis.call('HMGET', KEYS[i], 'v', 't', 'k')
  local level = cap
  if s[1] then
    level = tonumber(s[1]) + math.max(0, now - tonumber(s[2])) * tonumber(ARGV[2 * i + 1])
    if s[3] then
      level = math.min(tonumber(s[3]), level) + cap - tonumber(s[3])
    end
    level = math.min(cap, level)
  end
  out[i] = string.format('%.17g', level)
end
local ms = math.floor(now * 1000)
for i = nb + 1, #KEYS do out[i] = redis.call('ZCOUNT', KEYS[i], '(' .. ms, '+inf') end
return out
"""

# KEYS: the held slot buckets; ARGV: ttl (ms), then the lease id of each key. Adds a lease no longer there (a
# Redis restarted empty, flushed, the key evicted) again: a request in flight is counted however Redis lost it.
_RENEW = _NOW + """
local ms = math.floor(now * 1000)
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], ms + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], ttl + 1000)
end
return 0
"""

# KEYS: the sums, then the spending process's generation key; ARGV per key: tokens, cost, expires_at (Unix seconds)
# or ''. Returns the generation key counted up (kept a day), as L{_SETTLE} does.
_SPEND_ALL = """
local n = #KEYS - 1
for i = 1, n do
  redis.call('HINCRBY', KEYS[i], 't', ARGV[3 * i - 2])
  redis.call('HINCRBYFLOAT', KEYS[i], 'c', ARGV[3 * i - 1])
  if ARGV[3 * i] ~= '' then redis.call('EXPIREAT', KEYS[i], ARGV[3 * i]) end
end
local generation = redis.call('INCR', KEYS[n + 1])
redis.call('PEXPIRE', KEYS[n + 1], 86400000)
return generation
"""

# Lua shared by the scripts of budget sums. float(x): the shortest figure that reads back as x (as Python's repr).
# Redis adds floats as long doubles: a figure of 17 digits ('%.17g' of 0.1 - 0.2: -0.10000000000000001) added to a
# sum that C{repr} wrote (0.2) leaves it off the double it should be (0.09999999999999999, not 0.1).
# lapse(key, alive, owner): the sum's fields (a table), and what the live processes' requests in flight reserved
# in it (tokens, cost). Each process keeps its part of a sum apart in the hash ('rt:<process>', 'rc:<process>':
# reserved, not settled yet, L{_RESERVE}, L{_SETTLE}; 'rg:<process>': the part's id, new each time the part starts
# afresh); the part of a process whose liveness key (C{alive} .. process) lapsed (killed, or it crashed: it never
# settles them) is first taken off the sum, not C{owner}'s. What gateways older than the parts reserved (one shared
# 'rt' and 'rc', settled by them: mixed with these during a rolling upgrade) counts as in flight.
# seeded_as(key): the mark of a sum seeded now (its field 's'), kept at C{key} (the prefix's 'seeded': one for every
# sum, given anew when Redis went back, L{_NEW_SERVER}); '1' while there is none (as older gateways mark them).
_SUMS = """
local function float(x)
  local short = string.format('%.15g', x)
  if tonumber(short) == x then return short end
  short = string.format('%.16g', x)
  if tonumber(short) == x then return short end
  return string.format('%.17g', x)
end
local function lapse(key, alive, owner)
  local f = redis.call('HGETALL', key)
  local h = {}
  for j = 1, #f, 2 do h[f[j]] = f[j + 1] end
  local ft, fc, dt, dc = 0, 0, 0, 0
  for j = 1, #f, 2 do
    if string.sub(f[j], 1, 3) == 'rt:' then
      local other = string.sub(f[j], 4)
      local rt, rc = tonumber(f[j + 1]), tonumber(h['rc:' .. other] or '0')
      if other ~= owner and redis.call('EXISTS', alive .. other) == 0 then
        dt, dc = dt + rt, dc + rc
        redis.call('HDEL', key, f[j], 'rc:' .. other, 'rg:' .. other)
      else
        ft, fc = ft + rt, fc + rc
      end
    elseif f[j] == 'rt' then
      ft = ft + tonumber(f[j + 1])
    elseif f[j] == 'rc' then
      fc = fc + tonumber(f[j + 1])
    end
  end
  if dt ~= 0 then h['t'] = redis.call('HINCRBY', key, 't', string.format('%.0f', -dt)) end
  if dc ~= 0 then h['c'] = redis.call('HINCRBYFLOAT', key, 'c', float(-dc)) end
  return h, ft, fc
end
local function seeded_as(key)
  return redis.call('GET', key) or '1'
end
"""

# Budget sums read from the usage ledger, once: KEYS the sums, then the seed mark's key (L{_SUMS}); ARGV per sum:
# tokens, cost, expires_at or '', and '1' where it is seeded again (sums that missed charges while Redis could not be
# reached, or whose budgets changed) else ''; then the prefix of the processes' liveness keys. A sum not marked
# seeded with the mark of now (its field 's': none, or one from before Redis went back, L{_NEW_SERVER}), or seeded
# again, becomes the larger of what it holds and the ledger's figure plus the reservations of the live processes'
# requests in flight (L{_SUMS}: the ledger counts them once they end; the requests recorded since a Redis that lost
# its data came back are also in the ledger once written: never counted twice), and is marked; a sum already marked
# is left as it is. Returns how many it seeded.
_SEED = _SUMS + """
local n = 0
local nk = #KEYS - 1
local alive = ARGV[4 * nk + 1]
local mark = seeded_as(KEYS[nk + 1])
for i = 1, nk do
  if redis.call('HGET', KEYS[i], 's') ~= mark or ARGV[4 * i] == '1' then
    redis.call('HSET', KEYS[i], 's', mark)
    n = n + 1
    local h, ft, fc = lapse(KEYS[i], alive, '')
    local t = tonumber(ARGV[4 * i - 3]) + ft
    if t > tonumber(h['t'] or '0') then redis.call('HSET', KEYS[i], 't', string.format('%.0f', t)) end
    local c = tonumber(ARGV[4 * i - 2]) + fc
    if c > tonumber(h['c'] or '0') then redis.call('HSET', KEYS[i], 'c', float(c)) end
  end
  if ARGV[4 * i - 1] ~= '' then redis.call('EXPIREAT', KEYS[i], ARGV[4 * i - 1]) end
end
return n
"""

# Reservations settled (L{RedisCounters.settle_all}): KEYS the sums, then the settling process's generation key;
# ARGV per key: tokens and cost used, tokens and cost reserved, expires_at or '', the id of the part it was reserved
# in (L{_RESERVE}); then the settling process's id. Returns the generation key counted up (kept a day): no more than
# the process saw before where Redis went back to an earlier state (restored from a snapshot, flushed). What of the reservation the process's part of a sum still holds (all of it, but where Redis lost the sum
# since, or its part was taken off as a dead process's: paused past its lease) leaves its part and is taken off the
# sum, which is charged what was used: the sum is right however it was seeded meanwhile. A part of another id (the
# process's part started afresh since: taken off, then reserved in again) holds none of it: nothing is taken off.
_SETTLE = _SUMS + """
local n = #KEYS - 1
local owner = ARGV[6 * n + 1]
local ft, fc, fg = 'rt:' .. owner, 'rc:' .. owner, 'rg:' .. owner
for i = 1, n do
  local s = redis.call('HMGET', KEYS[i], ft, fc, fg)
  local gt, gc = 0, 0
  if s[3] == ARGV[6 * i] then
    local rt, rc = tonumber(s[1] or '0'), tonumber(s[2] or '0')
    gt, gc = math.min(rt, tonumber(ARGV[6 * i - 3])), math.min(rc, tonumber(ARGV[6 * i - 2]))
    if rt - gt > 0 or rc - gc > 1e-9 then
      redis.call('HSET', KEYS[i], ft, string.format('%.0f', rt - gt), fc, float(rc - gc))
    else
      redis.call('HDEL', KEYS[i], ft, fc, fg)
    end
  elseif s[3] and not (s[1] or s[2]) then  -- (its part taken off by an older gateway, which leaves the id)
    redis.call('HDEL', KEYS[i], fg)
  end
  redis.call('HINCRBY', KEYS[i], 't', string.format('%.0f', tonumber(ARGV[6 * i - 5]) - gt))
  redis.call('HINCRBYFLOAT', KEYS[i], 'c', float(tonumber(ARGV[6 * i - 4]) - gc))
  if ARGV[6 * i - 1] ~= '' then redis.call('EXPIREAT', KEYS[i], ARGV[6 * i - 1]) end
end
local generation = redis.call('INCR', KEYS[n + 1])
redis.call('PEXPIRE', KEYS[n + 1], 86400000)
return generation
"""

# A read of budget sums: KEYS the sums, then the seed mark's key (L{_SUMS}); ARGV the prefix of the processes'
# liveness keys. Returns the tokens, cost and seed mark of each ('' for none, or one from before Redis went back),
# the parts of dead processes taken off first (L{_SUMS}).
_SPENT = _SUMS + """
local out = {}
local mark = seeded_as(KEYS[#KEYS])
for i = 1, #KEYS - 1 do
  local h = lapse(KEYS[i], ARGV[1], '')
  out[3 * i - 2], out[3 * i - 1], out[3 * i] = h['t'] or '0', h['c'] or '0', h['s'] == mark and mark or ''
end
return out
"""


# A reservation against budget sums, all or nothing (L{RedisCounters.reserve_all}): KEYS the sums, then the seed
# mark's key (L{_SUMS}); ARGV per sum:
# its largest tokens and cost ('' for none), the tokens and cost to add, expires_at or ''; then '1' where the sums
# must be marked seeded, the reserving process's id, the prefix of the processes' liveness keys, their lease (ms)
# and an id this process never gave before. The parts of dead processes are taken off each sum first (L{_SUMS}).
# Where a sum is not marked seeded with the mark of now (lost by Redis, never seeded, or seeded before Redis went
# back) nothing is added: returns {-1}; where one holds
# its largest already (a budget spent, reservations of the requests in flight counted), nothing either: returns
# {0, tokens, cost of each key}; else every sum is added to, and the process's part of it, and the process's
# liveness key is set: returns {1, the id of the process's part of each sum}. A part that starts (none, or taken
# off as a dead process's: paused past its lease) gets the new id: a settlement names the part it was reserved in.
_RESERVE = _SUMS + """
local n = #KEYS - 1
local marked = ARGV[5 * n + 1] == '1' and seeded_as(KEYS[n + 1])
local owner, alive, new = ARGV[5 * n + 2], ARGV[5 * n + 3], ARGV[5 * n + 5]
local ft, fc, fg = 'rt:' .. owner, 'rc:' .. owner, 'rg:' .. owner
local sums, parts = {1}, {1}
for i = 1, n do
  local h = lapse(KEYS[i], alive, owner)
  parts[i + 1] = h[fg]
  if not (h[ft] or h[fc]) or not h[fg] then parts[i + 1] = false end
  if marked and h['s'] ~= marked then return {-1} end
  local t, c = tonumber(h['t'] or '0'), tonumber(h['c'] or '0')
  sums[2 * i], sums[2 * i + 1] = string.format('%.0f', t), string.format('%.17g', c)
  local mt, mc = ARGV[5 * i - 4], ARGV[5 * i - 3]
  if (mt ~= '' and t >= tonumber(mt)) or (mc ~= '' and c >= tonumber(mc)) then sums[1] = 0 end
end
if sums[1] == 0 then return sums end
for i = 1, n do
  redis.call('HINCRBY', KEYS[i], 't', ARGV[5 * i - 2])
  redis.call('HINCRBYFLOAT', KEYS[i], 'c', ARGV[5 * i - 1])
  redis.call('HINCRBY', KEYS[i], ft, ARGV[5 * i - 2])
  redis.call('HINCRBYFLOAT', KEYS[i], fc, ARGV[5 * i - 1])
  if not parts[i + 1] then
    parts[i + 1] = new
    redis.call('HSET', KEYS[i], fg, new)
  end
  if ARGV[5 * i] ~= '' then redis.call('EXPIREAT', KEYS[i], ARGV[5 * i]) end
end
redis.call('SET', alive .. owner, 1, 'PX', ARGV[5 * n + 4])
return parts
"""


# The server a new connection reached (L{RedisCounters._connected}): KEYS the key naming the server the budget sums
# were last marked seeded on, then the seed mark's key (L{_SUMS}); ARGV the server's run id (INFO's: new at each
# start of a server; '' where INFO is refused) and a mark never given before. On a server other than the one named
# (restarted, from a snapshot or empty; failed over to a replica that missed the last writes) the sums are marked
# anew: each is seeded again from the usage ledger at its next use, whichever process uses it (L{_SEED}). Returns
# the mark of now.
_NEW_SERVER = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('SET', KEYS[2], ARGV[2])
end
return redis.call('GET', KEYS[2]) or '1'
"""

# A server's run id in its INFO.
_RUN_ID = re.compile(rb"^run_id:(\w+)", re.MULTILINE)


class _Down(Exception):
    """Redis failed after an operation was queued: it is answered open without trying."""


@implementer(ICounters)
class RedisCounters(_Forms):
    """Counters shared through one Redis (a C{redis.Redis} client), under C{prefix}.

    L{start} before use (thread pool, lease renewal), L{stop} after. See the
    module docstring for the fail-open rule.

    @ivar failures: operations answered open because Redis failed.
    @ivar misconfigured: why the last failure was one of a client of the wrong kind for the server
        (L{gomodel.redis_client.misconfigured}: C{REDIS_CLUSTER} to set or unset), or None.
    """

    shared = True
    immediate = False
    log = Logger()

    def __init__(self, redis, prefix, reactor, *, threads=4, lease_ttl=30.0, retry_after=5.0, warn_every=60.0):
        self._redis = redis
        self._prefix = prefix
        self._reactor = reactor
        self._threads = OwnedThreads(reactor, "gomodel-limits-redis", maxthreads=threads)
        self._lease_ms = int(lease_ttl * 1000)
        self._lease_ttl = lease_ttl
        self._retry_after = retry_after
        self._warn_every = warn_every
        self._down_until = 0.0
        self._warned_at = None
        self._held = {}  # lease id -> slot keys
        self._unsent = set()  # held leases admitted open that Redis has not been sent (nothing to free there)
        self._orphans = {}  # lease id -> (slot keys, when it lapses): released, but Redis may hold them still
        self._orphans_freed = True  # since the last orphan, a release of them all succeeded
        self._next_free = None  # the release of the orphans planned for when Redis is tried again
        self._renewing = None  # the renewal in flight: (a Deferred firing once it is over, the leases it renews)
        self._owner = uuid.uuid4().hex  # this process, in the budget sums' parts (L{_SUMS}; anew: L{_unanswered})
        self._alive = prefix + "alive|"  # + a process's id: its liveness key, renewed while it holds reservations
        self._reservations = 0  # budget reservations taken here and not settled yet
        self._parts = itertools.count(1)  # ids of this process's parts of budget sums (L{_RESERVE})
        # counted up by each settlement of this process (L{_SETTLE}): the highest Redis answered
        self._generation_key, self._generation = prefix + "generation|" + uuid.uuid4().hex, 0
        # the budget sums' seed mark (L{_SUMS}) and the server it was last given on (L{_NEW_SERVER}); the mark
        # this process saw last (a new one: Redis went back)
        self._seeded_key, self._server_key, self._mark = prefix + "seeded", prefix + "server", None
        # called (with no argument) when Redis is found gone back to an earlier state (L{_went_back})
        self.went_back = []
        self._renewal = LoopingCall(self._renew)
        self._renewal.clock = reactor
        # key -> Deferreds of the writes of it in flight that nobody waits for (L{finish}, L{spend_all}): an
        # operation reading the key starts after them (L{_after_writes})
        self._writes = {}
        self.failures = 0
        self.misconfigured = None
        self._admit = redis.register_script(_ADMIT)
        self._finish = redis.register_script(_FINISH)
        self._renew_script = redis.register_script(_RENEW)
        self._spend = redis.register_script(_SPEND_ALL)
        self._seed = redis.register_script(_SEED)
        self._reserve = redis.register_script(_RESERVE)
        self._settle = redis.register_script(_SETTLE)
        self._spent = redis.register_script(_SPENT)
        self._peek = redis.register_script(_PEEK)
        from redis import ResponseError
        from redis.exceptions import AskError

        self._errors = errors()
        self._refused = ResponseError
        # (a cluster's node that does not serve the counters' slot answers MOVED: L{_connected})
        self._elsewhere = AskError if is_cluster(redis) else ()
        # each new connection first tells which server it reached (L{_connected})
        on_connect(redis, self._connected)

    @classmethod
    def from_url(cls, url, reactor, prefix="gomodel:limits:", timeout=1.0, **kwargs):
        """Counters on the Redis at C{url} (C{redis://[:password@]host:port/db}); connects on first use."""
        return cls(connect(url, timeout), prefix, reactor, **kwargs)

    @property
    def unreachable(self) -> bool:
        """Whether Redis failed within the last C{retry_after} seconds (limits answered open meanwhile)."""
        return self._reactor.seconds() < self._down_until

    def start(self):
        """Start the threads and the lease renewal."""
        self._threads.start()
        self._renewal.start(self._lease_ttl / 3, now=False)

    def stop(self):
        """Stop renewing (held leases then lapse within C{lease_ttl}) and join the threads."""
        if self._renewal.running:
            self._renewal.stop()
        if self._next_free is not None and self._next_free.active():
            self._next_free.cancel()
        self._threads.stop()

    def _run(self, open_answer, f, *args):
        if self._reactor.seconds() < self._down_until:
            self.failures += 1
            return succeed(open_answer)
        if not self._orphans_freed:
            self._free_orphans()
        return self._threads.run(self._unless_down, f, *args).addErrback(self._failed, open_answer)

    def _unless_down(self, f, *args):
        """C{f(*args)}, in a thread; unless Redis failed since it was queued: then L{_Down} at once, so that
        the operations waiting for a thread when Redis stops answering do not each wait for its timeout (a
        failure marks Redis down here already, before the next queued operation can start)."""
        if self._reactor.seconds() < self._down_until:
            raise _Down()
        try:
            return f(*args)
        except self._errors:
            self._down_until = self._reactor.seconds() + self._retry_after
            raise

    def _failed(self, failure, open_answer):
        if failure.check(_Down):
            self.failures += 1
            return open_answer
        failure.trap(*self._errors)
        now = self._reactor.seconds()
        self.failures += 1
        self.misconfigured = misconfigured(failure.value)
        self._down_until = now + self._retry_after
        if self._warned_at is None or now - self._warned_at >= self._warn_every:
            self._warned_at = now
            self.log.warn("Redis limits counters unreachable, rate and concurrency limits are not enforced for "
                          "{retry}s (budgets are judged by the usage ledger): {error}",
                          retry=self._retry_after, error=reason(failure.value))
        return open_answer

    def admit(self, specs, slots):
        prefix = self._prefix
        lease = uuid.uuid4().hex if slots else ""
        keys = [prefix + bucket for bucket, _, _, _ in specs]
        slot_keys = [prefix + bucket for bucket, _ in slots]
        args = [len(specs), self._lease_ms, lease]
        for _, capacity, refill, amount in specs:
            args += (repr(float(capacity)), repr(float(refill)), repr(float(amount)))
        args += [int(limit) for _, limit in slots]
        # (answered open, the request holds the lease all the same: renewed into Redis once it answers again)
        opened = Admitted(True, [taken(capacity, capacity, refill, amount, True)
                                 for _, capacity, refill, amount in specs], lease or None, -1)
        unsent = self._reactor.seconds() < self._down_until  # (L{_run} answers open without sending it)
        return self._after_writes(keys + slot_keys, opened, self._admit_sync, keys + slot_keys, args, specs,
                                  lease).addCallback(self._admitted, slot_keys, unsent)

    def abandoned(self, d, specs, slots):
        """The caller of admission C{d} (L{admit}'s, of C{specs} and C{slots}) left before it answered: what it
        takes is given back once it does (L{gomodel.limits.limiter.Limiter}, in C{d}'s callbacks); the next
        operations of its keys are sent after that, as after a write in flight (L{_writing})."""
        prefix = self._prefix
        self._writing([prefix + bucket for bucket, _, _, _ in specs] + [prefix + bucket for bucket, _ in slots], d)

    def _admit_sync(self, keys, args, specs, lease):
        reply = self._admit(keys=keys, args=args)
        ok = reply[0] == 1
        out = [taken(float(level), capacity, refill, amount, ok)
               for level, (_, capacity, refill, amount) in zip(reply[2:], specs)]
        return Admitted(ok, out, lease if ok and lease else None, reply[1] - 1)

    def _admitted(self, got, slot_keys, unsent):
        if got.lease is not None:
            self._held[got.lease] = slot_keys
            if unsent:
                self._unsent.add(got.lease)
        return got

    def finish(self, specs, lease):
        slot_keys = () if lease is None else self._held.pop(lease, ())
        if slot_keys and self._unsent and lease in self._unsent:  # (never in Redis: nothing there to free)
            self._unsent.discard(lease)
            slot_keys = ()
        if not specs and not slot_keys:
            return succeed([])
        prefix = self._prefix
        keys = [prefix + bucket for bucket, _, _, _ in specs]
        keys += slot_keys
        args = [len(specs), lease if slot_keys else ""]
        for _, capacity, refill, delta in specs:
            args += (repr(float(capacity)), repr(float(refill)), repr(float(delta)))
        opened = [capacity for _, capacity, _, _ in specs]
        renewing = self._renewing
        if slot_keys and renewing is not None and lease in renewing[1]:  # (sent after it: it would put it back)
            d = self._after({0: renewing[0]}).addCallback(self._run_after, opened, self._finish_sync, keys, args)
        else:
            d = self._run(opened, self._finish_sync, keys, args)
        d = self._writing(keys, d)
        if slot_keys:
            d.addCallback(self._released, lease, slot_keys, opened)
        return d

    def _released(self, levels, lease, slot_keys, opened):
        if levels is opened:  # answered open (Redis did not answer): an orphan, freed when Redis is tried again
            self._orphaned(lease, slot_keys)
        return levels

    def _writing(self, keys, d):
        """Note C{d}, a write of C{keys} whose caller goes on without waiting for it (a request's release at its
        end, its budget charge), as in flight until it fires: the next operation reading one of C{keys} is sent
        after it (L{_after_writes}). The threads run operations side by side, so without this a client's next
        request could reach Redis before its last one's release, and be refused a slot it no longer holds."""
        over = Deferred()
        writes = self._writes
        for key in keys:
            writes.setdefault(key, []).append(over)
        return d.addBoth(self._written, keys, over)

    def _written(self, result, keys, over):
        writes = self._writes
        for key in keys:
            pending = writes[key]
            pending.remove(over)
            if not pending:
                del writes[key]
        over.callback(None)
        return result

    def written(self):
        """A Deferred firing with None once the writes in flight now (L{_writing}) are over: what another process
        reads of these counters next counts them."""
        return self._after({id(over): over for pending in self._writes.values() for over in pending})

    def _after_writes(self, keys, open_answer, f, *args):
        """L{_run}, once the writes of C{keys} in flight now (L{_writing}) are over (at once when none is)."""
        writes = self._writes
        if writes:
            waits = {id(over): over for key in keys for over in writes.get(key, ())}
            if waits:
                return self._after(waits).addCallback(self._run_after, open_answer, f, *args)
        return self._run(open_answer, f, *args)

    def _after(self, waits):
        """A Deferred firing with None once the Deferreds C{waits} (by id) fired. Cancelled (its request's client
        left), it fails at once and they go on: the others waiting on those writes still wait (a DeferredList
        cancelled would cancel them, and fire with their failures: every waiter then went on at once)."""
        after = Deferred()
        DeferredList(list(waits.values())).addCallback(self._over, after)
        return after

    @staticmethod
    def _over(_, after):
        if not after.called:  # (cancelled meanwhile)
            after.callback(None)

    def _run_after(self, _, open_answer, f, *args):
        return self._run(open_answer, f, *args)

    def _finish_sync(self, keys, args):
        return [float(level) for level in self._finish(keys=keys, args=args)]

    def _orphaned(self, lease, slot_keys):
        self._orphans[lease] = (slot_keys, self._reactor.seconds() + self._lease_ttl)
        self._orphans_freed = False
        self._free_later()

    def _free_later(self):
        """Free the orphans when Redis is tried again (C{retry_after}), not at the next request's admission."""
        if self._threads.running and (self._next_free is None or not self._next_free.active()):
            self._next_free = self._reactor.callLater(self._retry_after, self._free_orphans)

    def _free_orphans(self):
        """Free the slots Redis may have given the admissions answered open (at once, and again at each renewal
        until they would have lapsed: a stalled admission may be run after the release)."""
        if not self._threads.running:
            return None
        now = self._reactor.seconds()
        for lease, (_, lapses) in list(self._orphans.items()):
            if lapses <= now:
                del self._orphans[lease]
        if not self._orphans:
            self._orphans_freed = True
            return None
        self._orphans_freed = True  # (one release at a time; a failed one asks again)
        releases = [(slot_keys, [0, lease]) for lease, (slot_keys, _) in self._orphans.items()]

        def free():
            for keys, args in releases:
                self._finish(keys=keys, args=args)

        def failed(failure):
            self._orphans_freed = False
            self._free_later()
            return self._failed(failure, None)

        return self._threads.run(self._unless_down, free).addErrback(failed)

    def _renew(self):
        if self._reservations and self._threads.running:  # (the parts of its budget sums kept: L{_SUMS})
            self._run(None, self._redis.psetex, self._alive + self._owner, self._lease_ms, 1)
        if self._generation and self._threads.running:  # (a restore noticed without a settlement: L{_went_back})
            seen = self._generation
            self._run(None, self._generation_sync).addCallback(self._generation_read, seen)
        if self._orphans:
            self._free_orphans()
        if not self._held or not self._threads.running:
            return None
        renewed = list(self._held.items())
        if not self.unreachable:  # (sent: Redis may hold them all from now on)
            self._unsent.clear()
        keys, args = [], [self._lease_ms]
        for lease, held in renewed:
            for key in held:
                keys.append(key)
                args.append(lease)
        over = Deferred()  # (a release of one of its leases is sent after it: L{finish})
        self._renewing = (over, {lease for lease, _ in renewed})
        return self._run(None, self._renew_script, keys, args).addBoth(self._renew_over, over).addCallback(
            self._renewed, renewed)

    def _renew_over(self, result, over):
        if self._renewing is not None and self._renewing[0] is over:
            self._renewing = None
        over.callback(None)
        return result

    def _renewed(self, answer, renewed):
        """Free again the leases released while a renewal that Redis did not answer was on its way (stalled, cut
        off: it may run it after their release, and a renewal puts back a lease it does not find): as orphans,
        again at each renewal if that fails. (A renewal answered ran before their releases, sent after it.)"""
        if answer is not None:
            return None
        lapses = self._reactor.seconds() + self._lease_ttl
        released = [(lease, keys) for lease, keys in renewed if lease not in self._held]
        for lease, keys in released:
            self._orphans[lease] = (keys, lapses)
        return self._free_orphans() if released else None

    def spend_all(self, items):
        keys = [self._prefix + bucket for bucket, _, _, _ in items]
        args = [x for _, tokens, cost, expires in items
                for x in (int(tokens), repr(float(cost)), "" if expires is None else int(math.ceil(expires)))]
        # (counts up this process's generation, as a settlement does: a process that only records its charges
        # notices a Redis gone back too, L{_counted})
        return self._writing(keys, self._run(None, self._spend_sync, keys + [self._generation_key], args)
                             ).addCallback(self._counted, self._generation)

    def _spend_sync(self, keys, args):
        return int(self._spend(keys=keys, args=args))

    def _counted(self, answer, seen):
        """C{answer}: the generation counted up by a charge (L{spend_all}) sent when this process had seen C{seen};
        None (answered open). Fires None."""
        if answer is not None:
            if answer > seen:
                if answer > self._generation:
                    self._generation = answer
            elif seen <= self._generation:  # (else found gone back already, by an operation answered meanwhile)
                self._went_back(answer)  # (counted up since: Redis went back to an earlier state)
        return None

    def settle_all(self, items, parts):
        """Settle a reservation (L{reserve_all}'s, on this process): each sum is charged what was used less what this
        process's part of it still holds of the reservation, which leaves that part (kept by a seed, L{seed_all};
        taken off if the process was taken for dead meanwhile, and then nothing of it is in a part started since:
        see L{_SETTLE}).

        @param items: C{(bucket, tokens used, cost used, tokens reserved, cost reserved, expires_at)}, as
            L{spend_all}'s.
        @param parts: the ids of the parts it was reserved in, one per item (what L{reserve_all} answered).
        @return: Deferred firing True where Redis went back to an earlier state (restored from a snapshot taken
            before this process's last settlement, flushed): its sums may lack charges, to be seeded again from
            the usage ledger (this process's parts start anew, as for a settlement not answered); else None.
        """
        keys = [self._prefix + bucket for bucket, _, _, _, _, _ in items]
        args = [x for (_, tokens, cost, reserved_tokens, reserved_cost, expires), part in zip(items, parts)
                for x in (int(tokens), repr(float(cost)), int(reserved_tokens), repr(float(reserved_cost)),
                          "" if expires is None else int(math.ceil(expires)), part)]
        args.append(self._owner)
        if self._reservations:
            self._reservations -= 1
        opened = [None]  # (answered open: L{_unanswered})
        return self._writing(keys, self._run(opened, self._settle_sync, keys + [self._generation_key], args)
                             ).addCallback(self._settled, opened, self._generation)

    def _settled(self, answer, opened, seen):
        """C{answer}: the generation counted up by a settlement sent when this process had seen C{seen}."""
        if answer is opened:
            self._unanswered()
            return None
        if answer > seen:
            if answer > self._generation:
                self._generation = answer
            return None
        if seen > self._generation:  # (found gone back already, by an operation answered meanwhile)
            return None
        self._went_back(answer)  # (counted up since: Redis went back to an earlier state)
        return True

    def _generation_sync(self):
        return int(self._redis.get(self._generation_key) or 0)

    def _generation_read(self, answer, seen):
        """C{answer}: this process's generation as Redis holds it, read (L{_renew}) when the process had seen
        C{seen}: less, Redis went back (unless a settlement found so meanwhile: then the process saw less since)."""
        if answer is not None and answer < seen <= self._generation:
            self._went_back(answer)

    def _went_back(self, generation):
        """Redis went back to an earlier state (restored from a snapshot taken before this process's last
        settlement or charge, flushed), which holds C{generation} for this process: its parts of the budget sums
        start anew (L{_unanswered}) and each of L{went_back} is told (L{gomodel.limits.budgets.BudgetBook} seeds its
        sums again). Found by a settlement or a charge (L{spend_all}), or within C{lease_ttl/3} seconds by the
        renewal (which then puts back the leases held here that the earlier state lacks); or as a connection
        reaches a new server (L{_connected}). Every sum, whichever process seeded it, is seeded again at its next
        use: the sums are marked anew (L{_NEW_SERVER}; found here, the server is the same: the mark is given)."""
        if generation is not None:  # (read with the sums: after this write, L{_writing})
            self._writing([self._seeded_key], self._run(None, self._redis.set, self._seeded_key, uuid.uuid4().hex))
        self._generation = generation or 0
        self._unanswered()
        self.log.warn("Redis went back to an earlier state (restored from a snapshot, flushed), or this process "
                      "charged nothing for a day (its count lapsed): budget sums are seeded again from the usage "
                      "ledger")
        for told in self.went_back:
            told()

    def _connected(self, connection):
        """redis-py's C{redis_connect_func}, in a Redis thread: set up a new connection as usual, then learn which
        server it reached before anything else is sent on it (L{_NEW_SERVER}): a new one (restarted from a
        snapshot, failed over) has the budget sums marked anew, so that none is read as seeded before it is seeded
        again from the usage ledger, the spending of processes gone since counted too. A new mark is Redis gone
        back for this process too (L{_went_back}). Fails as a command does (the connection is then closed)."""
        if not self._elsewhere:  # (a cluster client set it up already: redis-py's calls this after)
            connection.on_connect()
        connection.send_command("INFO", "server")
        try:
            found = _RUN_ID.search(_bytes(connection.read_response()))
        except self._refused:  # (INFO not allowed: a managed Redis, an ACL) not noticed so
            found = None
        server = found.group(1).decode() if found else ""
        connection.send_command("EVAL", _NEW_SERVER, 2, self._server_key, self._seeded_key, server, uuid.uuid4().hex)
        try:
            mark = _bytes(connection.read_response()).decode()
        except self._elsewhere:  # (a cluster's node that does not serve the counters' slot: none of the sums)
            return
        self._reactor.callFromThread(self._marked, mark)

    def _marked(self, mark):
        """C{mark}: the sums' seed mark a new connection found (L{_connected}); other than the last, Redis went
        back."""
        seen, self._mark = self._mark, mark
        if seen is not None and mark != seen:
            self._went_back(None)

    def _unanswered(self):
        """A reservation or settlement that Redis did not answer (it may run it later, or have run it): this
        process's parts of the budget sums may hold what no settlement will take off. It starts its parts anew, under
        a new id: the old ones lapse with their liveness key (no longer renewed), and its requests in flight then are
        charged what they used in full when they end (their parts are gone: L{_SETTLE})."""
        self._owner = uuid.uuid4().hex

    def _settle_sync(self, keys, args):
        return int(self._settle(keys=keys, args=args))

    def spent_all(self, buckets):
        keys = [self._prefix + b for b in buckets]
        keys.append(self._seeded_key)
        return self._after_writes(keys, [(0, 0.0)] * len(buckets), self._spent_sync, keys)

    def _spent_sync(self, keys):
        reply = self._spent(keys=keys, args=[self._alive])
        return [(int(reply[3 * i]), float(reply[3 * i + 1])) for i in range(len(keys) - 1)]

    def peek(self, specs, slots):
        keys = [self._prefix + bucket for bucket, _, _ in specs] + [self._prefix + bucket for bucket in slots]
        args = [len(specs)]
        for _, capacity, refill in specs:
            args += (repr(float(capacity)), repr(float(refill)))
        return self._after_writes(keys, None, self._peek_sync, keys, args, len(specs))

    def _peek_sync(self, keys, args, nb):
        reply = self._peek(keys=keys, args=args)
        return [float(level) for level in reply[:nb]], [int(held) for held in reply[nb:]]

    def seed_all(self, items):
        """Set budget sums read from the usage ledger, each once for as long as Redis keeps it (see L{_SEED}), in
        one call however many there are.

        @param items: C{(bucket, tokens, cost, expires_at, again)}, as L{spend_all}'s; C{again}: set this sum
            though it is seeded already (the larger of what it holds and the ledger's figure plus the
            reservations in flight).
        @return: a Deferred firing with how many it seeded (0 for sums seeded already, or Redis unreachable).
        """
        keys = [self._prefix + bucket for bucket, _, _, _, _ in items]
        args = [x for _, tokens, cost, expires, again in items
                for x in (int(tokens), repr(float(cost)), "" if expires is None else int(math.ceil(expires)),
                          "1" if again else "")]
        args.append(self._alive)
        keys.append(self._seeded_key)
        return self._after_writes(keys, 0, self._seed, keys, args)

    def reserve_all(self, items, seeded=True):
        """Add to budget sums unless one is spent, in one step (requests reserving at once on several processes
        cannot all pass a budget with room for one); settled by L{settle_all}.

        @param items: C{(bucket, max tokens, max cost, tokens, cost, expires_at)}: the largest each sum may hold
            when the reservation comes (None: no such budget), what to add, as L{spend_all}'s.
        @return: a Deferred firing with C{(state, sums)}: state 1, added to every sum (in place of sums, the ids
            of this process's parts they were added to, for L{settle_all}); 0, one is spent,
            nothing added (each bucket's C{(tokens, cost)}); -1, a sum is not marked seeded (L{seed_all}), nothing
            added (with C{seeded}: sums seeded from the usage ledger are marked); None, Redis cannot be reached.
        """
        keys = [self._prefix + bucket for bucket, _, _, _, _, _ in items]
        args = [x for _, most_tokens, most_cost, tokens, cost, expires in items
                for x in ("" if most_tokens is None else int(most_tokens),
                          "" if most_cost is None else repr(float(most_cost)), int(tokens), repr(float(cost)), "" if expires is None else int(math.ceil(expires)))]
        args += ("1" if seeded else "", self._owner, self._alive, self._lease_ms, next(self._parts))
        # (after the writes of its sums in flight, as a read; not itself waited for by the next ones: a request's
        # reservation is in before its answer goes out, and reservations at once are each atomic)
        keys.append(self._seeded_key)
        d = self._after_writes(keys, (None, None), self._reserve_sync, keys, args)
        if any(item[3] or item[4] for item in items):  # (one of nothing is never settled: see BudgetBook.settle)
            d.addCallback(self._reserved)
        return d

    def _reserved(self, answer):
        if answer[0] == 1:
            self._reservations += 1  # (its liveness renewed until they are settled: L{_renew})
        elif answer[0] is None:  # (Redis did not answer)
            self._unanswered()
        return answer

    def _reserve_sync(self, keys, args):
        reply = self._reserve(keys=keys, args=args)
        state = int(reply[0])
        if state == 1:
            return 1, [int(part) for part in reply[1:]]
        if state != 0:
            return state, None
        return 0, [(int(float(reply[2 * i + 1])), float(reply[2 * i + 2])) for i in range(len(keys) - 1)]

    def spent_seeded(self, buckets):
        """L{spent_all}, and which of C{buckets} are not marked seeded (L{seed_all}): sums that Redis lost
        (restarted empty, flushed, evicted) since they were, or never seeded.

        @return: a Deferred firing with C{(sums, unseeded buckets)}; while Redis is unreachable, zeros and none.
        """
        keys = [self._prefix + b for b in buckets]
        keys.append(self._seeded_key)
        return self._after_writes(keys, ([(0, 0.0)] * len(buckets), []), self._spent_seeded_sync, keys, buckets)

    def _spent_seeded_sync(self, keys, buckets):
        reply = self._spent(keys=keys, args=[self._alive])
        return ([(int(reply[3 * i]), float(reply[3 * i + 1])) for i in range(len(buckets))],
                [bucket for i, bucket in enumerate(buckets) if not reply[3 * i + 2]])
