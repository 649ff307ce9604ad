"""Budgets: tokens and cost spent per scope and period, checked before a request.

A scope is C{(name, [Budget, ...])} (C{"key:k_1"}, C{"path:/team"}). Each
budget period of a scope has one sum, in a bucket named with the period's
start (C{"budget|path:/team|daily|1767225600"}), so a new period starts at
zero; it expires C{margin} seconds after the period ends (a C{total} sum is
kept for good). A budget reset in its period (its C{since}) has a new sum,
named with the reset's time, and counts from then.

L{BudgetBook.check} refuses a request when a current sum has reached its
budget; L{BudgetBook.record} adds a finished request's usage. An online
request reserves its estimate instead (L{BudgetBook.reserve}: checked and
added in one step, on Redis one script), settled with its usage when it
ends (L{BudgetBook.settle}): a sum counts the reservations of the requests
in flight, so requests admitted at once cannot all pass a budget with room
for one. A request
whose cost is unknown (no pricing for the model: cost None) adds 0 cost, so
cost budgets do not see it (GoModel's rule); token budgets still do. Streams
in flight are not cut: the next request is refused.

A sum starts from the usage ledger: C{seed}, an async function
C{(scope_name, since) -> (tokens, cost)} reading it, is called once per
scope and period before the sum's first use, so that a restarted process,
or a budget added in the middle of its period, counts what was spent
already. With counters that are not shared (L{LocalCounters}) each process
seeds its own sums. A seed that counts every request already kept, those
the ledger has not written yet too (C{seed_counts_kept}: the
L{gomodel.accounting.usage.UsageLedger}'s), counts a request recorded
before its period was seeded, so L{BudgetBook.record} leaves it to the seed
(a budget added while the ledger holds a key's last requests counts them).

Shared counters (Redis) keep one sum for every process: the first process
to seed it sets it (L{gomodel.limits.counters.RedisCounters.seed_all}: the
larger of what the sum holds and the ledger's figure plus the reservations of
the requests in flight, which a sum keeps apart too, then marked seeded),
and the others' seeds change nothing. Every check reads the mark with the
sums: a sum that Redis lost (a restart without persistence, a flush) is
seeded again from the ledger, which then holds the truth but for the
requests other hosts have not written yet (at most C{USAGE_FLUSH_INTERVAL}
of them); nothing is counted twice. A Redis that went back to an earlier state
(restored from a snapshot) is noticed by a settlement (L{BudgetBook.settle}), or
by the counters' renewal within C{lease_ttl/3} seconds (L{BudgetBook._went_back}), and a
new Redis server (restarted, failed over) as each connection to it opens: every sum, whichever
process seeded it, is marked unseeded and seeded again at its next use, as below. A sum that missed this process's charges
while Redis could not be reached (it kept its data: a pause, a network cut)
is seeded again, the larger of what it holds and the ledger's figure (plus the
reservations in flight), at its
first use once Redis answers again. So are the sums of a scope whose budgets
were set, changed or removed (L{BudgetBook.renew}, on every process): a
budget removed and given again in its period counts what was spent while it
was gone, when no sum counted it. While Redis cannot be reached, a check
judges the budgets by the ledger's figures instead (read once a second at
most), so a spent budget stays spent; the rate limits fail open meanwhile.

Local counters where other processes or hosts share the ledger (PostgreSQL,
C{--workers}) have L{BudgetBook.follow} called every second: each sum this
process charged since is raised to the ledger's figure, so what the others
spent counts here too.
"""

import inspect

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.logger import Logger

from gomodel.errors import BudgetExceeded, GatewayError
from gomodel.limits.counters import INF
from gomodel.limits.specs import counted_start, period_window


# Seconds between reads of the usage ledger for a budget's seed while they fail.
SEED_RETRY = 5.0
# Seconds a budget's figure read from the usage ledger stands while shared counters cannot be reached.
LEDGER_FRESH = 1.0
# Sums seeded here (of local counters) held before those of periods that ended are dropped: where no other
# process is followed (L{BudgetBook.follow}, which drops them too), nothing else would.
OWN_KEPT = 4096


class BudgetBook:
    """Budget sums on C{counters} (an L{ICounters}), periods on C{clock}'s UTC time."""

    log = Logger()

    def __init__(self, counters, clock, seed=None, margin=3600.0, seed_counts_kept=False, seed_many=None):
        """
        @param seed_many: C{seed} of a list of C{(scope_name, since)} in one read, firing with a list of
            C{(tokens, cost)} (a listing of a thousand keys seeds their sums in one query, not one each); None:
            C{seed} once each.
        """
        self._counters = counters
        self._clock = clock
        self._seed = seed
        self._seed_many = seed_many
        self._seed_counts_kept = seed_counts_kept
        self._margin = margin
        self._seeded = {}  # bucket -> its expiry (None for total)
        self._seeding = {}  # bucket -> Deferreds waiting for its seed
        self._windows = {}  # period -> (start, end) of the period last asked for
        self._currents = {}  # id(scopes) -> its _Current (which holds scopes: the id is not reused)
        self._seed_failed_at = None  # when the last read of the ledger failed, while reads fail
        self._missed = set()  # shared sums that missed a charge (Redis unreachable): seeded again once it answers
        self._renewed = set()  # scopes whose budgets changed: their sums are seeded again at their next use
        self._ledger_read = {}  # bucket -> (when, (tokens, cost)) read from the ledger while Redis is unreachable
        self._ledger_reading = {}  # bucket -> Deferreds waiting for that read
        self._own = {}  # bucket -> (scope, start, expires) of each sum of local counters seeded here
        self._followed = {}  # bucket -> its (tokens, cost) when last raised to the ledger's (L{follow})
        self._own_kept = OWN_KEPT  # how many of those it holds before it drops those of ended periods
        if counters.shared:
            counters.went_back.append(self._went_back)

    def renew(self, scope):
        """The budgets of C{scope} were set, changed or removed: seed its sums again from the usage ledger at
        their next use (a sum counts nothing while its scope has no budget of its period)."""
        if len(self._renewed) >= 10000:
            self._renewed.clear()
        self._renewed.add(scope)
        prefix = f"budget|{scope}|"
        for bucket in [bucket for bucket in self._seeded if bucket.startswith(prefix)]:
            del self._seeded[bucket]
        self._currents.clear()  # (each holds whether its periods are seeded)

    def _window(self, period, now):
        """L{period_window}, computed once per period (a calendar computation otherwise on every request)."""
        window = self._windows.get(period)
        if window is None or now < window[0] or (window[1] is not None and now >= window[1]):
            window = self._windows[period] = period_window(period, now)
        return window

    def _current(self, scopes, now, keep=True):
        """The L{_Current} periods of C{scopes} at C{now}.

        Kept per C{scopes} object (a key's are the same list on every request) while its periods last; not
        with C{keep} false (a list made for one read, L{spent}: kept, every listing of the keys held its
        own until 10,000 were, megabytes each for a thousand keys with budgets).
        """
        cached = self._currents.get(id(scopes)) if keep else None
        if cached is not None and cached.scopes is scopes and cached.first <= now < cached.last:
            return cached
        rows = []
        for scope, budgets in scopes:
            for budget in budgets:
                start, end = self._window(budget.period, now)
                since = counted_start(budget.since, start, end)
                # reset in this period: a new sum from then (a reset stamped by a clock a little ahead of this
                # one, the store's or another process's, too: not the old sum, kept until the period's end)
                if since != start:
                    rows.append((scope, budget, f"budget|{scope}|{budget.period}|{since!r}", since, end))
                else:
                    rows.append((scope, budget, f"budget|{scope}|{budget.period}|{int(start)}", start, end))
        current = _Current(scopes, rows, self._margin)
        if keep:
            if len(self._currents) > 10000:
                self._currents.clear()
            self._currents[id(scopes)] = current
        return current

    def _unseeded(self, current) -> bool:
        """Whether a period of C{current} still needs its sum read from the usage ledger."""
        if current.seeded:
            return False
        if self._seed is not None and any(bucket not in self._seeded for bucket in current.buckets):
            return True
        current.seeded = True  # a seeded bucket stays seeded for as long as its period lasts
        return False

    def check(self, scopes):
        """Refuse when a budget of C{scopes} is spent for its current period.

        @param scopes: C{(scope name, [Budget, ...])} pairs.
        @return: a Deferred firing with None once every budget has room (at once on local
            counters whose periods are seeded); it fails with L{BudgetExceeded} when one is
            spent: the one whose period ends last is named (a retry cannot pass before), a
            C{total} one first.
        """
        if not scopes:
            return succeed(None)
        now = self._clock.seconds()
        current = self._current(scopes, now)
        if not current.rows:
            return succeed(None)
        if self._unseeded(current):
            return ensureDeferred(self._check_seeded(current, now))
        if self._seed is not None and self._counters.shared:
            return self._counters.spent_seeded(current.buckets).addCallback(self._judge_shared, current, now)
        d = self._counters.spent_all(current.buckets)
        return d.addCallback(self._judge, current, now)

    def _judge_shared(self, answer, current, now):
        """L{_judge} the sums of shared counters, after seeding again those they lost (see the module)."""
        sums, lost = answer
        if self._counters.unreachable:
            return ensureDeferred(self._judge_ledger(current, now))
        if not lost:
            return self._judge(sums, current, now)
        self._forget(lost, current)
        return ensureDeferred(self._check_seeded(current, now))

    def _forget(self, lost, current):
        """Sums of C{current} that shared counters lost: seeded again before their next use."""
        for bucket in lost:
            self._seeded.pop(bucket, None)
        current.seeded = False

    def reserve(self, scopes, tokens: int, cost: float):
        """L{check}, and take C{tokens} and C{cost} (a request's estimate) from every budget of C{scopes} in the
        same step: requests admitted at once count each other's reservations (without them, each saw the room
        left and all went). Settle it with L{settle} when the request is over.

        @return: a Deferred firing with the L{Reservation} (nothing taken while shared counters cannot be
            reached: the budgets are judged by the ledger, as L{check} judges them).
        @raise BudgetExceeded: (the Deferred fails with it) as L{check}; nothing was taken.
        """
        return ensureDeferred(self._reserve(scopes, int(tokens), float(cost)))

    async def _reserve(self, scopes, tokens, cost):
        if not self._counters.shared:
            await self.check(scopes)  # (seeded now; local counters answer at once: nothing comes between)
            return self.reserve_now(scopes, tokens, cost)
        now = self._clock.seconds()
        current = self._current(scopes, now)
        if not current.rows:
            return None
        for _ in range(3):  # (a sum lost by Redis meanwhile: seeded again, then tried again)
            if self._seed is not None and self._unseeded(current):
                await self._seed_all(current)
            state, sums = await self._shielded(
                self._counters.reserve_all(current.reserving(tokens, cost), self._seed is not None), current, tokens, cost)
            if state == 1:
                return Reservation(current, tokens, cost, sums)
            if state == 0:
                by_bucket = dict(zip((bucket for bucket, _ in current.sums), sums))
                self._judge([by_bucket[bucket] for bucket in current.buckets], current, now)
            if state is None or self._seed is None:  # unreachable (judged by the ledger), or nothing to seed
                break
            self._forget(current.buckets, current)
        await self.check(scopes)
        return Reservation(current, 0, 0.0)

    def _shielded(self, reserving, current, tokens, cost):
        """A Deferred firing with what C{reserving} (a L{reserve_all}) answers; cancelled (its request's client
        left), it fails at once and what the reservation then takes is given back as soon as it answers."""
        waiting = Deferred()

        def answered(result):
            if not waiting.called:
                waiting.callback(result)
            elif result.__class__ is tuple and result[0] == 1:  # (cancelled meanwhile)
                self._release(current, result[1], tokens, cost)
            return None

        reserving.addBoth(answered)
        return waiting

    def reserve_now(self, scopes, tokens: int, cost: float):
        """L{reserve} at once, on counters that answer at once with every period seeded.

        @return: the L{Reservation}, or None where L{reserve} must be used.
        @raise BudgetExceeded: as L{check}.
        """
        current = self._judged_now(scopes)
        if current is None:
            return None
        current.charge(tokens, cost)
        return Reservation(current, tokens, cost)

    def settle(self, reservation, tokens: int, cost, at=None):
        """Settle C{reservation} (L{reserve}'s) with the C{tokens} and C{cost} its request used (None: unknown,
        counts 0): the difference goes to the sums it was taken from, where the request began in their periods
        (C{at}: when it began; None: now); else it is given back there and the use charged to the periods it
        began in, as L{record} charges it.

        @return: None when done at once, else a Deferred firing with None once the counters have it.
        """
        current = reservation.current
        tokens, cost = int(tokens or 0), float(cost or 0.0)
        if self._seed is not None and not self._counters.shared:
            if any(bucket not in self._seeded for bucket in current.buckets):
                # (its budgets changed since: the sums are seeded again from the ledger, without what it took)
                return self.record(current.scopes, tokens, cost, at) if tokens or cost else None
            if current.epoch != self._counters.epoch:
                # (its cells swept, or a sum seeded again since, in a new cell: L{LocalCounters.set_sum}) what it
                # took goes back to the cells it was taken from; its use is charged by name
                for cell in current.cells:
                    cell[0] -= reservation.tokens
                    cell[1] -= reservation.cost
                return self.record(current.scopes, tokens, cost, at) if tokens or cost else None
        shared = self._counters.shared and (reservation.tokens or reservation.cost)
        if at is None or current.first <= at < current.last:
            if shared:
                return self._release(current, reservation.parts, reservation.tokens, reservation.cost, tokens, cost)
            if tokens == reservation.tokens and cost == reservation.cost:
                return None
            return self._spend(current, tokens - reservation.tokens, cost - reservation.cost)
        given = None
        if shared:
            given = self._release(current, reservation.parts, reservation.tokens, reservation.cost)
        elif reservation.tokens or reservation.cost:
            given = self._spend(current, -reservation.tokens, -reservation.cost)
        charged = self.record(current.scopes, tokens, cost, at) if tokens or cost else None
        return charged if given is None else given if charged is None else DeferredList([given, charged])

    def check_now(self, scopes) -> bool:
        """L{check} at once where it can be: on counters that answer at once, every period seeded.

        @return: True when judged (the budgets have room); False when L{check} must be used.
        @raise BudgetExceeded: as L{check}.
        """
        return self._judged_now(scopes) is not None

    def _judged_now(self, scopes):
        """L{current_now}'s periods of C{scopes}, judged (None where they cannot be at once).

        @raise BudgetExceeded: as L{check}.
        """
        current = self.current_now(scopes)
        if current is not None and current.spent():
            self._judge(self._counters.spent_all_now(current.buckets), current, self._clock.seconds())
        return current

    def current_now(self, scopes, at=None):
        """The L{_Current} periods of C{scopes} now (or at C{at}), their sums' cells live (L{_Current.spent} and
        L{_Current.charge} answer at once), on counters that answer at once with every period seeded;
        else None (L{check} and L{record} seed first)."""
        if not self._counters.immediate:
            return None
        current = self._current(scopes, self._clock.seconds() if at is None else at)
        if not current.seeded and self._unseeded(current):
            return None
        if current.epoch != self._counters.epoch:
            current.resolve(self._counters)
        return current

    async def _check_seeded(self, current, now):
        await self._seed_all(current)
        sums = await self._counters.spent_all(current.buckets)
        if self._seed is not None and self._counters.shared and self._counters.unreachable:
            await self._judge_ledger(current, now)
        else:
            self._judge(sums, current, now)

    async def _judge_ledger(self, current, now):
        """L{_judge} by the usage ledger's figures, for shared counters that cannot be reached (their sums answer
        zeros): a spent budget stays spent while Redis is away. Each figure is read at most once a
        C{LEDGER_FRESH} seconds (requests meanwhile share it); where the ledger cannot be read either, the
        budget is not judged (it fails open, as the rate limits do)."""
        sums = []
        for scope, _, bucket, start, _ in current.rows:
            figure = await self._ledger_figure(scope, bucket, start, now)
            if figure is None:
                return
            sums.append(figure)
        self._judge(sums, current, now)

    async def _ledger_figure(self, scope, bucket, start, now):
        """What C{scope} spent since C{start} by the ledger, read once a C{LEDGER_FRESH} seconds at most;
        None where it cannot be read."""
        kept = self._ledger_read.get(bucket)
        if kept is not None and now - kept[0] < LEDGER_FRESH:
            return kept[1]
        waiting = self._ledger_reading.get(bucket)
        if waiting is not None:
            d = Deferred()
            waiting.append(d)
            return await d
        self._ledger_reading[bucket] = []
        figure = None
        try:
            tokens, cost = await self._ledger(scope, start)
            figure = (int(tokens or 0), float(cost or 0.0))
            if len(self._ledger_read) > 4096:
                self._ledger_read.clear()
            self._ledger_read[bucket] = (self._clock.seconds(), figure)
        except Exception as e:
            self.log.debug("Could not read what {scope} spent since {since} from the usage ledger: {error}",
                           scope=scope, since=start, error=e.message if isinstance(e, GatewayError) else repr(e))
        finally:
            for d in self._ledger_reading.pop(bucket):
                d.callback(figure)
        return figure

    @staticmethod
    def _judge(sums, current, now):
        """None, or raise L{BudgetExceeded} for the spent budget whose period ends last."""
        worst = None
        for (scope, budget, _, _, end), (tokens, cost) in zip(current.rows, sums):
            if budget.max_tokens is not None and tokens >= budget.max_tokens:
                what, limit = "token", budget.max_tokens
            elif budget.max_cost is not None and cost >= budget.max_cost:
                what, limit = "cost", budget.max_cost
            else:
                continue
            if worst is None or (worst[4] is not None and (end is None or end > worst[4])):
                worst = (scope, budget.period, what, limit, end)
        if worst is not None:
            scope, period, what, limit, end = worst
            raise BudgetExceeded(scope, period, what, limit, None if end is None else end - now)

    async def spent(self, pairs):
        """What each C{(scope name, Budget)} of C{pairs} spent in its current period.

        While shared counters cannot be reached (the limits fail open), the figures are the usage ledger's:
        what it wrote and what this process holds still, not zeros.

        @return: a list of C{(tokens, cost)}, in order.
        """
        current = self._current([(scope, (budget,)) for scope, budget in pairs], self._clock.seconds(), keep=False)
        if self._seed is not None:
            await self._seed_all(current)
        if self._seed is None or not self._counters.shared:
            return list(await self._counters.spent_all(current.buckets))
        sums, lost = await self._counters.spent_seeded(current.buckets)
        if lost:  # lost by Redis: seeded again, as a check would
            self._forget(lost, current)
            await self._seed_all(current)
            sums, _ = await self._counters.spent_seeded(current.buckets)
        if self._counters.unreachable:
            return [await self._ledger(scope, start) for scope, _, _, start, _ in current.rows]
        return sums

    def record(self, scopes, tokens: int, cost, at=None):
        """Add a finished request's C{tokens} and C{cost} (None: unknown, counts 0) to every scope's periods
        at C{at} (when it started, as the usage ledger dates it: a request begun before a period's end is
        charged to that period; None: now).

        @return: None when done at once (local counters, periods seeded: nothing to wait for on every
            request), else a Deferred firing with None once the counters have it.
        """
        if not scopes:
            return None
        now = self._clock.seconds()
        when = now if at is None or at > now else at
        current = self.current_now(scopes, when)
        if current is not None:
            current.charge(int(tokens or 0), float(cost or 0.0))
            return None
        current = self._current(scopes, when)
        if not current.seeded and self._unseeded(current):
            if self._seed_counts_kept and not self._counters.shared:  # the seed of the others will count it
                return self._spend(current, tokens, cost, [item for item in current.sums if item[0] in self._seeded])
            return ensureDeferred(self._record_seeded(current, tokens, cost))
        return self._spend(current, tokens, cost)

    async def _record_seeded(self, current, tokens, cost):
        await self._seed_all(current)
        spending = self._spend(current, tokens, cost)
        if spending is not None:
            await spending

    def _spend(self, current, tokens, cost, sums=None):
        """Add C{tokens} and C{cost} to C{sums} (C{(bucket, expires_at)} pairs; all of C{current}'s by default)."""
        sums = current.sums if sums is None else sums
        if not sums:
            return None
        tokens, cost = int(tokens or 0), float(cost or 0.0)
        items = [(bucket, tokens, cost, expires) for bucket, expires in sums]
        if self._counters.immediate:
            self._counters.spend_all_now(items)
            return None
        return self._counters.spend_all(items).addCallback(self._spent, sums)

    def _release(self, current, parts, tokens, cost, used_tokens=0, used_cost=0.0):
        """Settle a reservation of C{tokens} and C{cost} on shared counters, made in this process's C{parts} of the
        sums, with the C{used_tokens} and C{used_cost} of its request (none: given back): its sums are charged the
        difference, and it leaves their reservations in flight, which a seed keeps on top of the ledger's figure
        (it does not count them yet: see L{gomodel.limits.counters.RedisCounters.settle_all})."""
        items = [(bucket, used_tokens, used_cost, tokens, cost, expires) for bucket, expires in current.sums]
        return self._counters.settle_all(items, parts).addCallback(self._spent, current.sums)

    def _went_back(self):
        """Shared counters found Redis gone back to an earlier state (restored from a snapshot:
        L{gomodel.limits.counters.RedisCounters.went_back}): every sum this process seeded is seeded again at its
        next use, the larger of what it holds and the ledger's figure plus the reservations in flight (the others,
        which Redis no longer marks seeded, are too)."""
        self._missed.update(self._seeded)
        self._seeded.clear()
        self._currents.clear()

    def _spent(self, _, sums):
        """After a charge of shared C{sums}: where Redis could not be reached (the charge is lost), they are
        seeded again from the ledger once it answers (where it went back to an earlier state, L{_went_back})."""
        if not self._counters.shared or not self._counters.unreachable:
            return
        missed = [bucket for bucket, _ in sums if bucket not in self._missed]
        if missed:
            self._missed.update(missed)
            for bucket in missed:
                self._seeded.pop(bucket, None)
            self._currents.clear()  # (each holds whether its periods are seeded)

    async def _seed_all(self, current):
        failed = self._seed_failed_at
        if failed is not None and self._clock.seconds() - failed < SEED_RETRY:
            return  # the ledger could not be read a moment ago: the sums count as they stand meanwhile
        if (self._missed or self._renewed) and self._counters.shared and self._counters.unreachable:
            return  # (a sum that missed charges is seeded again once Redis answers, not on every request now)
        mine, theirs = [], []
        for scope, _, bucket, start, end in current.rows:
            if bucket in self._seeded:
                continue
            waiting = self._seeding.get(bucket)
            if waiting is not None:  # (seeded by another call, or by this one: a bucket twice in the rows)
                theirs.append(Deferred())
                waiting.append(theirs[-1])
                continue
            self._seeding[bucket] = []
            mine.append((scope, bucket, start, None if end is None else end + self._margin))
        try:
            if len(mine) > 1 and self._seed_many is not None:  # one read for all of them
                await self._seed_each(mine)
            else:
                for scope, bucket, start, expires in mine:
                    await self._seed_one(scope, bucket, start, expires)
        finally:
            for _, bucket, _, _ in mine:
                for d in self._seeding.pop(bucket):
                    d.callback(None)
        for d in theirs:
            await d
        if self._renewed and all(bucket in self._seeded for bucket in current.buckets):
            self._renewed.difference_update(scope for scope, _, _, _, _ in current.rows)

    def follow(self):
        """Raise this process's own sums (local counters) to the usage ledger's figures, where the ledger is
        shared with other processes or hosts (PostgreSQL, C{--workers}): what they spent counts here within
        a call of this, C{LEDGER_FRESH}, and their C{USAGE_FLUSH_INTERVAL} (without Redis, a budget spent on
        one host held nowhere else). The sums this process charged since the last call are read, each once
        (one that it did not charge meanwhile is read once it does: a sum idle here costs no read); none is
        lowered (each holds what this process counted itself).

        @return: a Deferred firing with None; a read that fails is left for the next call.
        """
        if self._seed is None or self._counters.shared or not self._own:
            return succeed(None)
        return ensureDeferred(self._follow())

    async def _follow(self):
        now = self._clock.seconds()
        for bucket, (scope, start, expires) in list(self._own.items()):
            if expires is not None and expires <= now or bucket not in self._seeded:
                del self._own[bucket]  # (its period is over, or it is seeded again, from the ledger)
                self._followed.pop(bucket, None)
                continue
            cell = self._counters.sum_cell(bucket, expires)
            if self._followed.get(bucket) == (cell[0], cell[1]):
                continue  # not charged here since it was last read
            try:
                tokens, cost = await self._ledger(scope, start)
            except Exception as e:
                self.log.debug("Could not read what {scope} spent since {since} from the usage ledger: {error}",
                               scope=scope, since=start,
                               error=e.message if isinstance(e, GatewayError) else repr(e))
                return
            cell = self._counters.sum_cell(bucket, expires)
            cell[0] = max(cell[0], int(tokens or 0))
            cell[1] = max(cell[1], float(cost or 0.0))
            self._followed[bucket] = (cell[0], cell[1])

    async def _ledger(self, scope, start):
        """What C{scope} spent since C{start} by the usage ledger (C{seed}): C{(tokens, cost)}; fails as it does."""
        result = self._seed(scope, start)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _seed_one(self, scope, bucket, start, expires):
        try:
            tokens, cost = await self._ledger(scope, start)
        except Exception as e:
            self._seed_failed(scope, start, e)
            return
        await self._seeded_with([(scope, bucket, start, expires, tokens, cost)])

    async def _seed_each(self, rows):
        """L{_seed_one} of each C{(scope, bucket, start, expires)} of C{rows}, their figures read at once (and, with
        shared counters, set at once: one Redis call for a listing of a thousand keys' budgets, not one each)."""
        try:
            result = self._seed_many([(scope, start) for scope, _, start, _ in rows])
            figures = await result if inspect.isawaitable(result) else result
        except Exception as e:
            self._seed_failed(rows[0][0], rows[0][2], e)
            return
        await self._seeded_with([(scope, bucket, start, expires, tokens, cost)
                                 for (scope, bucket, start, expires), (tokens, cost) in zip(rows, figures)])

    def _seed_failed(self, scope, start, e):
        # Not marked seeded: tried again after SEED_RETRY seconds (the store may be down: a read per
        # request would be a wait per request), said once until a read succeeds.
        if self._seed_failed_at is None:
            self.log.warn("Could not read what {scope} spent since {since}; budgets count from what their sums "
                          "hold until the usage ledger can be read: {error}", scope=scope, since=start,
                          error=e.message if isinstance(e, GatewayError) else f"{type(e).__name__}: {e}")
        self._seed_failed_at = self._clock.seconds()

    async def _seeded_with(self, rows):
        """Set the sum of each C{(scope, bucket, start, expires, tokens, cost)} of C{rows} from the ledger's C{tokens}
        and C{cost} (see the module), marked seeded; shared sums in one call."""
        if self._seed_failed_at is not None:
            self._seed_failed_at = None
            self.log.info("the usage ledger can be read again: budgets start from it")
        if not self._counters.shared:
            for scope, bucket, start, expires, tokens, cost in rows:
                await self._own_seeded(scope, bucket, start, expires, tokens, cost)
                self._marked(bucket, expires)
            return
        # set by the first process to seed each (see the module); those seeded again, set again
        agains = [bucket in self._missed or scope in self._renewed for scope, bucket, _, _, _, _ in rows]
        await self._counters.seed_all([(bucket, int(tokens or 0), float(cost or 0.0), expires, again)
                                       for (_, bucket, _, expires, tokens, cost), again in zip(rows, agains)])
        unreachable = self._counters.unreachable
        for (_, bucket, _, expires, _, _), again in zip(rows, agains):
            if again:
                if unreachable:
                    continue  # (seeded again once Redis answers)
                self._missed.discard(bucket)
            self._marked(bucket, expires)

    async def _own_seeded(self, scope, bucket, start, expires, tokens, cost):
        """Set this process's own sum of C{bucket} (local counters) from the ledger's C{tokens} and C{cost}."""
        if bucket in self._missed or scope in self._renewed:  # (seeded again: the ledger's figure holds what it
            # counted; not the requests in flight, charged in full when they end: what they reserved stays in
            # the old cell, L{set_sum})
            self._counters.set_sum(bucket, int(tokens or 0), float(cost or 0.0), expires)
        elif tokens or cost:
            await self._counters.spend(bucket, int(tokens or 0), float(cost or 0.0), expires)
        self._own[bucket] = (scope, start, expires)
        self._followed.pop(bucket, None)
        if len(self._own) > self._own_kept:  # (L{follow} drops ended periods, where it runs; alone, this does)
            now = self._clock.seconds()
            self._own = {b: own for b, own in self._own.items() if own[2] is None or own[2] > now}
            self._followed = {b: sums for b, sums in self._followed.items() if b in self._own}
            self._own_kept = max(OWN_KEPT, 2 * len(self._own))

    def _marked(self, bucket, expires):
        """C{bucket}'s sum is seeded (until C{expires})."""
        self._seeded[bucket] = expires
        if len(self._seeded) > 4096:
            now = self._clock.seconds()
            self._seeded = {b: e for b, e in self._seeded.items() if e is None or e > now}


class Reservation:
    """What a request took from its budgets at admission (L{BudgetBook.reserve}), settled by L{BudgetBook.settle}.

    @ivar current: the L{_Current} periods it was taken in; C{tokens} and C{cost}: what was taken; C{parts}: on
        shared counters, the ids of this process's parts of the sums it was taken in (else None)."""

    __slots__ = ("current", "tokens", "cost", "parts")

    def __init__(self, current, tokens, cost, parts=None):
        self.current = current
        self.tokens = tokens
        self.cost = cost
        self.parts = parts


class _Current:
    """The budget periods of one C{scopes} list at one time: what L{BudgetBook} works out once per period.

    @ivar rows: C{(scope, budget, bucket, start, end)} for every budget, in order.
    @ivar buckets: each row's bucket.
    @ivar sums: C{(bucket, expires_at)} once per bucket (a scope's budgets of one period share a sum).
    @ivar first: when the latest-starting period began; C{last}: when the first of them ends.
    @ivar seeded: every bucket's sum was read from the usage ledger (or needs none).
    @ivar epoch: the local counters' epoch its sums' cells were taken in (L{resolve}), else None.
    """

    __slots__ = ("scopes", "rows", "buckets", "sums", "first", "last", "seeded", "epoch", "limits", "cells")

    def __init__(self, scopes, rows, margin):
        self.scopes = scopes
        self.rows = rows
        self.buckets = [bucket for _, _, bucket, _, _ in rows]
        self.sums = list({bucket: None if end is None else end + margin for _, _, bucket, _, end in rows}.items())
        self.first = max((start for _, _, _, start, _ in rows), default=-INF)
        self.last = min((end for _, _, _, _, end in rows if end is not None), default=INF)
        self.seeded = False
        self.epoch = None
        # Once resolved: C{(sum cell, max tokens, max cost)} of each budget (INF where it sets none), and
        # every sum's cell (C{[tokens, cost, expires_at]}), for L{spent}, L{charge} and a lane's own checks.
        self.limits = self.cells = ()

    def resolve(self, counters):
        """Take the live cells of its sums from C{counters} (L{gomodel.limits.counters.LocalCounters})."""
        cells = {bucket: counters.sum_cell(bucket, expires) for bucket, expires in self.sums}
        self.limits = [(cells[bucket], INF if budget.max_tokens is None else budget.max_tokens,
                        INF if budget.max_cost is None else budget.max_cost) for _, budget, bucket, _, _ in self.rows]
        self.cells = list(cells.values())
        self.epoch = counters.epoch

    def reserving(self, tokens: int, cost: float) -> list:
        """C{(bucket, max tokens, max cost, tokens, cost, expires_at)} of each sum: a reservation of C{tokens} and
        C{cost} (L{gomodel.limits.counters.RedisCounters.reserve_all}), each sum's largest the smallest of its
        budgets' (a scope's budgets of one period share its sum)."""
        most = {}
        for _, budget, bucket, _, _ in self.rows:
            tokens_most, cost_most = most.get(bucket, (None, None))
            if budget.max_tokens is not None and (tokens_most is None or budget.max_tokens < tokens_most):
                tokens_most = budget.max_tokens
            if budget.max_cost is not None and (cost_most is None or budget.max_cost < cost_most):
                cost_most = budget.max_cost
            most[bucket] = (tokens_most, cost_most)
        return [(bucket, *most[bucket], tokens, cost, expires) for bucket, expires in self.sums]

    def spent(self) -> bool:
        """Whether a budget is spent (its cells resolved and live)."""
        for cell, max_tokens, max_cost in self.limits:
            if cell[0] >= max_tokens or cell[1] >= max_cost:
                return True
        return False

    def charge(self, tokens: int, cost: float):
        """Add C{tokens} and C{cost} to every sum (its cells resolved and live)."""
        for cell in self.cells:
            cell[0] += tokens
            cell[1] += cost
