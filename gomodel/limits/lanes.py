"""One scopes list's requests on local counters, each way in one call: the gate's fast path.

What a request of a managed key passes is the same on every request but for
the clock and the levels: the same buckets, slots, budget sums and
C{x-ratelimit-*} header plan. A L{Lane} holds the local counters' own cells
of its buckets (L{gomodel.limits.counters.LocalCounters.cell}) and the
budgets' L{gomodel.limits.budgets._Current}, and admits, settles and
charges by reading and writing those cells: no bucket looked up by name, no
spec, no Deferred.

A lane answers only what it answers exactly. A refusal (whose answer says
which scope and when to retry) goes down the general path
(L{gomodel.limits.limiter.Limiter.admit_now},
L{gomodel.limits.budgets.BudgetBook.check_now}), which gives it; so does a
request after the counters swept (their epoch changed: a cell may be gone)
or after a budget period ended, until the gate makes a new lane.
"""

from gomodel.limits.counters import INF, adjust_cell
from gomodel.limits.limiter import NOTHING, header_lines


class Lane:
    """The buckets and budgets of one C{scopes} list as live cells (see the module).

    @ivar scopes: the scopes list it was made for (the gate keeps lanes by its id).
    """

    __slots__ = ("scopes", "_clock", "_counters", "_epoch", "_first", "_until", "_prepared", "_buckets",
                 "_token_buckets", "_slots", "_current", "_header_plan")

    def __init__(self, scopes, limiter, prepared, current, header_plan):
        """
        @param limiter: the L{gomodel.limits.limiter.Limiter}, on local counters.
        @param prepared: the limiter's L{gomodel.limits.limiter._Prepared} of C{scopes}, or None.
        @param current: the budgets' L{gomodel.limits.budgets._Current}, its cells resolved, or None.
        @param header_plan: C{prepared}'s header plan of the scope the headers show, or C{()}.
        """
        self.scopes = scopes
        self._clock = limiter.clock
        self._counters = counters = limiter.counters
        self._epoch = counters.epoch
        self._prepared = prepared = prepared if prepared is not None else NOTHING
        buckets = prepared.buckets
        self._buckets = [(counters.cell(b.name, b.capacity, b.refill), b.capacity, b.refill, b.tokens)
                         for b in buckets]
        self._token_buckets = [(cell, capacity, refill) for cell, capacity, refill, tokens in self._buckets if tokens]
        self._slots = prepared.slots
        self._current = current
        self._first, self._until = (current.first, current.last) if current is not None else (-INF, INF)
        self._header_plan = header_plan

    def live(self, now) -> bool:
        """Whether its cells are still the counters' own and its budget periods still run at C{now}."""
        return self._epoch == self._counters.epoch and self._first <= now < self._until

    def admit(self, tokens: int, now, headers):
        """Admit a request costing C{tokens} at C{now} (the lane L{live}), setting its C{x-ratelimit-*}
        headers as the C{lines} of C{headers} (the answer's L{gomodel.http.headers.AnswerHeaders}).

        @return: a L{Ticket}, or None when a budget is spent or a limit refuses (nothing was taken: the
            general path says why).
        """
        current = self._current
        if current is not None and current.spent():
            return None
        levels = []
        for cell, capacity, refill, by_tokens in self._buckets:
            level = cell[0] + (now - cell[1]) * refill
            if level > capacity:
                level = capacity
            level -= tokens if by_tokens else 1
            if level < 0:
                return None
            levels.append(level)
        lease = None
        if self._slots:
            lease = self._counters.try_hold(self._slots)  # the counters count this process's slots
            if lease is None:
                return None
        for (cell, capacity, refill, _), level in zip(self._buckets, levels):
            cell[0], cell[1], cell[2], cell[3] = level, now, capacity, refill
        self._counters.tick(now)
        if self._header_plan:
            headers.lines = header_lines(self._header_plan, self._prepared.buckets, levels)
        return Ticket(self, tokens, lease)

    def finish(self, ticket, used: int, charge: bool, cost) -> bool:
        """Settle C{ticket}'s reservation with the C{used} tokens, free its slots and, with C{charge}, add
        C{used} and C{cost} (None: unknown, counts 0) to its budgets' sums. Once per ticket; again does
        nothing.

        While its cells are the counters' own this writes them in place; after a sweep it settles by
        bucket name (L{gomodel.limits.counters.LocalCounters.settle_now}).

        @return: whether the budgets were charged (or C{charge} was not asked); False when its budget
            periods have passed, or it has none: the caller charges through the budget book.
        """
        if ticket.done:
            return True
        ticket.done = True
        counters = self._counters
        now = self._clock.seconds()
        delta = used - ticket.tokens
        lease = ticket.lease
        if self._epoch == counters.epoch:
            if delta:
                for cell, capacity, refill in self._token_buckets:
                    adjust_cell(cell, capacity, refill, delta, now)
            if lease is not None:
                counters.free(lease)
        else:
            counters.settle_now(self._prepared.token_buckets if delta else (), delta, lease)
        if not charge:
            return True
        current = self._current
        if current is None or not self.live(now):
            return False
        current.charge(int(used), float(cost or 0.0))
        return True


class Ticket:
    """A request a L{Lane} admitted: what it reserved and the slots it holds, until L{Lane.finish}."""

    __slots__ = ("lane", "tokens", "lease", "done")

    def __init__(self, lane, tokens, lease):
        self.lane = lane
        self.tokens = tokens  # reserved
        self.lease = lease  # the concurrency slots' lease, or None
        self.done = False
