"""One scopes list's requests on local counters, each way in one call: the gate's fast path.

What a request of a managed key passes is the same on every request but for
the clock and the levels: the same buckets, slots, budget sums and
C{x-ratelimit-*} header plan. A L{Lane} holds the local counters' own cells
of its buckets (L{gomodel.limits.counters.LocalCounters.cell}) and of the
budgets' sums (L{gomodel.limits.budgets._Current.limits}), and admits,
settles and charges by reading and writing those cells: no bucket looked up
by name, no spec, no Deferred, and no call per bucket or budget.

A lane answers only what it answers exactly. A refusal (whose answer says
which scope and when to retry) goes down the general path
(L{gomodel.limits.limiter.Limiter.admit_now},
L{gomodel.limits.budgets.BudgetBook.check_now}), which gives it; so does a
request after the counters swept (their epoch changed: a cell may be gone)
or after a budget period ended, until the gate makes a new lane.
"""

from math import ceil

from gomodel.limits.counters import INF, stepped_back
from gomodel.limits.limiter import NOTHING, RESETS_MS, header_lines, reset_text


class Lane:
    """The buckets and budgets of one C{scopes} list as live cells (see the module).

    @ivar scopes: the scopes list it was made for (the gate keeps lanes by its id).
    @ivar budgets: the budget scopes list its budgets' sums are of, or None: what a request it admitted is charged
        to where L{finish} leaves that to the caller.
    """

    __slots__ = ("scopes", "_clock", "_counters", "_epoch", "_first", "_until", "_prepared", "_buckets",
                 "_token_buckets", "_slots", "_slot", "_slot_limit", "_budgets", "_sums", "_header_plan",
                 "_shown_lines", "_lines", "costed", "budgets")

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
        # Where the headers show one bucket of each kind (a key's own rpm and tpm), each shown bucket
        # carries the format of its two header lines (as L{header_lines} writes them: its remaining
        # level, then its reset) and they are written as its level is stored; otherwise (several
        # windows of a kind: the fewest remaining shows) the plan's general form.
        shown = {}
        if all(len(indices) == 1 for _, indices, _ in header_plan):
            shown = {indices[0]: heads[indices[0]].replace(b"%", b"%%") + b"%d\r\n" + reset.replace(b"%", b"%%")
                     + b"%s\r\n" for reset, indices, heads in header_plan}
            header_plan = ()
        self._header_plan = header_plan
        self._buckets = []
        self._shown_lines = []  # each shown bucket's two lines, in order
        self._lines = b""  # those joined
        for i, b in enumerate(prepared.buckets):
            # Its capacity as a float, as the levels are, and so the cell's it makes (which L{finish} reads):
            # comparing a float with an integer of 2**30 or more (a tpm above about a billion) converts the
            # integer every time. A shown bucket's last level and where its lines are in L{_shown_lines}: a
            # level as the last (a bucket full before each request, as limits far above the load keep it)
            # leaves them as they were, and their join too.
            capacity = float(b.capacity)
            cell = counters.cell(b.name, capacity, b.refill)  # (under this capacity: see its L{moved})
            last = None
            if i in shown:
                last = [None, len(self._shown_lines)]
                self._shown_lines.append(b"")
            self._buckets.append((cell, capacity, b.refill, b.tokens, shown.get(i), last))
        self._token_buckets = [(cell, refill) for cell, _, refill, tokens, _, _ in self._buckets if tokens]
        # its concurrency slots' cells and limits (L{gomodel.limits.counters.LocalCounters.slot_cell}):
        # a request's lease is this list, freed by L{finish} in place
        self._slots = slots = [(counters.slot_cell(bucket), limit) for bucket, limit in prepared.slots] or None
        # where it has one slot (a key's max_concurrency alone), that slot's cell and limit: no loop over them
        self._slot, self._slot_limit = slots[0] if slots is not None and len(slots) == 1 else (None, 0)
        # each sum's cell and the fewest tokens and least cost its budgets allow (a scope's budgets of one period,
        # tokens and cost, share a sum): one look at the sum tells whether one of them is spent
        budgets = {}
        for cell, max_tokens, max_cost in current.limits if current is not None else ():
            most = budgets.get(id(cell))
            budgets[id(cell)] = (cell, max_tokens, max_cost) if most is None else \
                (cell, min(most[1], max_tokens), min(most[2], max_cost))
        self._budgets = list(budgets.values())
        self._sums = current.cells if current is not None else None
        # whether a budget of its caps cost: a request then reserves its estimate's cost as well (L{admit})
        self.costed = any(max_cost != INF for _, _, max_cost in self._budgets)
        self._first, self._until = (current.first, current.last) if current is not None else (-INF, INF)
        self.budgets = current.scopes if current is not None else None

    def live(self, now) -> bool:
        """Whether its cells are still the counters' own and its budget periods still run at C{now}."""
        return self._epoch == self._counters.epoch and self._first <= now < self._until

    def admit(self, tokens: int, now, headers, cost=0.0):
        """Admit a request costing C{tokens} at C{now}, setting its C{x-ratelimit-*}
        headers as the C{lines} of C{headers} (the answer's L{gomodel.http.headers.AnswerHeaders}).

        A budget is spent once its sum, with what the requests in flight reserved, reaches it: the request
        reserves C{tokens} and C{cost} (its estimate's, where the lane is L{costed}) from every budget's sum.

        @return: its ticket, C{(self, tokens, budget tokens, budget cost)} (what L{finish} settles), or None
            when a budget is spent, a limit refuses (nothing was taken: the general path says why) or the
            lane is no longer L{live} at C{now}.
        """
        counters = self._counters
        if self._epoch != counters.epoch or not self._first <= now < self._until:  # (not L{live})
            return None
        for cell, max_tokens, max_cost in self._budgets:  # (L{gomodel.limits.budgets._Current.spent})
            if cell[0] >= max_tokens or cell[1] >= max_cost:
                return None
        written = False  # (whether a shown bucket's lines were written anew)
        for cell, capacity, refill, by_tokens, shown, last in self._buckets:  # each taken from as it is looked at
            at = cell[1]
            if now < at:  # the wall clock stepped back since it was stored (L{stepped_back})
                level = stepped_back(cell, capacity)
            else:
                level = cell[0] + (now - at) * refill
                if level > capacity:
                    level = capacity
            level -= tokens if by_tokens else 1
            if level < 0:
                self._give_back(cell, tokens)
                return None
            cell[0] = level
            cell[1] = now
            # a shown bucket's lines, as L{header_lines} writes them (%d floors a level, here never below 0)
            if shown is not None and level != last[0]:
                reset_ms = ceil((capacity - level) / refill * 1000 - 1e-6)
                last[0] = level
                self._shown_lines[last[1]] = shown % (level, RESETS_MS[reset_ms] if reset_ms < 1000
                                                      else reset_text(reset_ms))
                written = True
        cell = self._slot  # the counters count this process's slots
        if cell is not None:  # its one slot
            if cell[0] >= self._slot_limit:
                self._give_back(None, tokens)
                return None
            cell[0] += 1
        elif self._slots is not None:
            lease = self._slots
            for cell, limit in lease:
                if cell[0] >= limit:
                    self._give_back(None, tokens)
                    return None
            for cell, _ in lease:
                cell[0] += 1
        sums = self._sums
        if sums is not None:  # reserved from every budget (L{gomodel.limits.budgets._Current.charge})
            if cost:
                for cell in sums:
                    cell[0] += tokens
                    cell[1] += cost
            else:
                for cell in sums:
                    cell[0] += tokens
        counters.ops_left -= 1  # (L{gomodel.limits.counters.LocalCounters.tick}, inline)
        if not counters.ops_left:
            counters.sweep(now)
        if written:
            self._lines = b"".join(self._shown_lines)
        lines = self._lines
        if self._header_plan:
            lines = header_lines(self._header_plan, self._prepared.buckets, [b[0][0] for b in self._buckets])
        if lines:
            headers.lines = lines
        return (self, tokens, tokens, cost)  # (a tuple, not an object with an __init__ to run: every request's)

    def _give_back(self, refused, tokens):
        """A refused admission: give back what it took of the buckets before C{refused} (the
        cell that refused; None: all), as they were when it came (their refill to then stays). The lines of
        the shown buckets it wrote, for levels it gives back, are joined as they are (L{admit} joins them
        only where it wrote some: the level of its next request may be the one it wrote them for)."""
        self._lines = b"".join(self._shown_lines)
        for cell, _, _, by_tokens, _, _ in self._buckets:
            if cell is refused:
                return
            cell[0] += tokens if by_tokens else 1

    def finish(self, ticket, used: int, charge: bool, cost, started=None) -> bool:
        """Settle C{ticket}'s reservation (a ticket of L{admit}) with the C{used} tokens, free its slots and,
        with C{charge}, add C{used} and C{cost} (None: unknown, counts 0) to its budgets' sums. Once per
        ticket (the gate marks a request's settled on its context).

        While its cells are the counters' own this writes them in place; after a sweep it settles its
        token buckets by name (L{gomodel.limits.counters.LocalCounters.settle_now}); its slots' cells,
        held, are still the live ones.

        What the ticket reserved of the budgets is settled with C{used} and C{cost} (given back without
        C{charge}); the budgets are charged in the periods the request began in (C{started}, as the usage
        ledger dates it; None: those it was admitted in), ended since or not: where it began before the lane's,
        what it reserved is given back here and the caller charges those.

        @return: whether the budgets were charged (or C{charge} was not asked); False when its cells are no
            longer the counters' own, it has no budgets or it began before its periods: the caller charges
            through the budget book.
        """
        delta = used - ticket[1]
        cell = self._slot  # its slots' cells (a held one is never swept: the ones it took)
        if cell is not None:  # its one slot
            cell[0] -= 1
        elif self._slots is not None:
            for cell, _ in self._slots:
                cell[0] -= 1
        live = self._epoch == self._counters.epoch
        if live:
            if delta:
                now = self._clock.seconds()
                for cell, refill in self._token_buckets:  # (L{gomodel.limits.counters.adjust_cell})
                    capacity = cell[2]  # (the cell's: a lane made since may have changed it, L{moved})
                    level = cell[0] + (now - cell[1]) * refill
                    if now < cell[1]:  # (L{gomodel.limits.counters.stepped_back})
                        level = cell[0]
                    if level > capacity:
                        level = capacity
                    level -= delta
                    cell[0] = capacity if level > capacity else level
                    cell[1] = now
        else:
            self._counters.settle_now(self._prepared.token_buckets if delta else (), delta, None)
        sums = self._sums
        if sums is None:
            return not charge
        # (a sum's cell stays the counters' own until its period is over: a sweep drops only ended sums)
        if charge and live and (started is None or self._first <= started < self._until):
            tokens = used - ticket[2]
            if cost or ticket[3]:
                cost = (cost or 0.0) - ticket[3]
                for cell in sums:  # (L{gomodel.limits.budgets._Current.charge})
                    cell[0] += tokens
                    cell[1] += cost
            else:
                for cell in sums:
                    cell[0] += tokens
            return True
        tokens, cost = ticket[2], ticket[3]  # given back (begun before its periods: charged there, by the book)
        if tokens or cost:
            for cell in sums:
                cell[0] -= tokens
                cell[1] -= cost
        return not charge

