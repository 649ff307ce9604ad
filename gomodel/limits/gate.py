"""The limits and budgets a request passes between its route and the upstream.

The exchange calls L{Gate.admit} once per relayed request, after the route
chose the provider and model and before the first byte goes upstream, so a
refusal is an answer in the route's dialect (429 with C{Retry-After}) and
nothing reaches the upstream. Scopes, each with its own counters:

  - C{key:<id>}: a managed key's C{rpm}, C{tpm}, C{max_concurrency} and budgets;
  - C{path:<p>}: every configured ancestor of the key's user path
    (C{SET_RATE_LIMIT_*}, C{SET_BUDGET_*}, YAML, and budgets set through the
    admin API);
  - C{provider:<name>} and C{model:<provider/model>} (C{SET_PROVIDER_RATE_LIMIT_*},
    YAML): capacity limits that hold for every caller, the master key included.

Tokens are reserved up front (the request body's size / 4 as the prompt
estimate, plus its C{max_tokens}) and settled with the real usage when the
request completes (L{Gate.completed}, a request-context sink). Budgets
take the same estimate (and its cost at the model's price) when a request is
admitted, refused once what was spent and reserved reaches them, and are
settled with its usage when it completes (the same sink): requests admitted
at once count each other's reservations. A batch line reserves the same
estimate once it holds its provider slot (L{Gate.reserve_line}) and is settled
by the batch runner with what it used (L{Gate.charge}), so batch lines and
passthrough count like any request, with or without the usage ledger.
"""

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from gomodel.accounting.tokens import MAX_COUNT, audio_seconds, requested_tokens, tokens_by_type, total_tokens
from gomodel.errors import RateLimitExceeded
from gomodel.limits.budgets import Reservation
from gomodel.limits.lanes import Lane
from gomodel.limits.limiter import NO_ADMISSION
from gomodel.limits.specs import COST_MAX, Budget, RateLimit, path_ancestors
from gomodel.logs import FailureStreak
from gomodel.periodic import Periodic

# Seconds the admissions wait at most, at start, for the first read of the budgets set through the admin API (a
# store slow to answer, or that cannot be reached and takes its time to say so: they then go on without them).
FIRST_READ_WAIT = 5.0


class Gate(Periodic):
    """Admits requests under rate limits and budgets (see the module docstring).

    As a service it re-reads the budgets set through the admin API every
    C{interval} seconds (an edit on another process takes effect here then).
    """

    log = Logger()

    def __init__(self, limiter, book, quotas, budgets=None, clock=None, interval=1.0, pricing=None):
        """
        @param limiter: the L{gomodel.limits.limiter.Limiter}.
        @param book: the L{gomodel.limits.budgets.BudgetBook}, or None (no budgets).
        @param quotas: the configured L{gomodel.limits.specs.LimitsConfig}.
        @param budgets: the L{gomodel.store.interfaces.IBudgetStore}, or None.
        @param pricing: the L{gomodel.accounting.tokens.Pricing} cost budgets count by, or None.
        """
        super().__init__(clock, interval)
        self._limiter = limiter
        self._book = book
        self._charges = book is not None  # (what L{completed} asks of every request)
        self._quotas = quotas
        self._store = budgets
        self._pricing = pricing or None  # None: no prices (tested once here, not per request)
        self._path_budgets = {}  # user path -> (Budget, ...) set through the admin API
        self._configured = dict(quotas.budgets or {})  # user path -> its configured (Budget, ...), resets applied
        # What a key's requests pass, worked out once per key version (the key ring makes a new
        # Principal on every change): key id -> (principal, budget scopes, key and path limit scopes,
        # the names of those its headers show).
        self._plans = {}
        self._targets = {}  # (provider, model) -> its limit scopes (the configuration is fixed)
        # (id(key's limits), id(target's)) -> (both, the one list of both): the same list on every
        # request, as the limiter keeps what it works out per list.
        self._combined = {}
        self._counting = {}  # id(a key's limit scopes) -> (them, their caps on requests in flight: a count's scopes)
        self._lanes = {}  # id(scopes) -> its Lane (local counters)
        # A managed key's principal -> the lane of its plan's limits (no target's): its requests admitted
        # without the plan looked up (while no provider or model has limits of its own).
        self._key_lanes = {}
        self._any_targets = bool(quotas.providers or quotas.models)
        self._streak = FailureStreak(self, "reading the budgets failed", "the budgets are read from the store again")
        # Until the budgets set through the admin API were read once (tried: a store down fails open), the
        # admissions waiting for them (a restarted process would admit its first requests without them), else None.
        self._unread = [] if budgets is not None and book is not None else None
        self._unread_bound = None  # the call that ends that wait after FIRST_READ_WAIT

    def refresh(self):
        """Re-read the budgets set through the admin API.

        @return: a Deferred firing with None; a failure is logged (the last ones stay).
        """
        if self._store is None or self._book is None:
            return succeed(None)
        d = Deferred.fromCoroutine(self._refresh())
        d.addCallbacks(self._streak.succeeded, self._streak.failed)
        if self._unread is not None:
            if self._unread_bound is None:
                self._unread_bound = self._clock.callLater(FIRST_READ_WAIT, self._read_once, None)
            d.addBoth(self._read_once)
        return d

    def stopService(self):
        self._read_once(None)
        return super().stopService()

    def _read_once(self, result):
        bound, self._unread_bound = self._unread_bound, None
        if bound is not None and bound.active():
            bound.cancel()
        waiting, self._unread = self._unread, None
        for admission in waiting or ():
            if not admission.called:  # (its request's client left meanwhile: cancelled)
                admission.callback(None)
        return result

    async def _refresh(self):
        self.set_path_budgets(await self._store.list(), await self._store.resets())

    # -- configuration ---------------------------------------------------------------------

    def set_path_budgets(self, records, resets=None):
        """Take the budgets set through the admin API (C{IBudgetStore} records) and when each path budget was
        last reset (C{{(user_path, period): reset_at}}, the configuration's too), replacing the last ones."""
        resets = resets or {}
        budgets = {}
        for record in records:
            budgets.setdefault(record["user_path"], []).append(Budget(
                record["period"], max_tokens=record["max_tokens"], max_cost=record["max_cost"],
                since=resets.get((record["user_path"], record["period"]))))
        budgets = {path: tuple(items) for path, items in budgets.items()}
        configured = {path: with_resets(path, items, resets) for path, items in (self._quotas.budgets or {}).items()}
        if budgets != self._path_budgets or configured != self._configured:
            for path in set(budgets) | set(self._path_budgets) | set(configured):
                if budgets.get(path) != self._path_budgets.get(path) or \
                        configured.get(path) != self._configured.get(path):
                    self.renew(f"path:{path}")
            self._path_budgets = budgets
            self._configured = configured
            self._plans = {}
            self._key_lanes = {}

    def follow_ledger(self):
        """Raise this process's own budget sums to what the usage ledger says every process spent
        (L{gomodel.limits.budgets.BudgetBook.follow}; run every second where processes share the ledger
        but not Redis).

        @return: a Deferred firing with None.
        """
        if self._book is None:
            return succeed(None)
        return self._book.follow()

    def renew(self, scope):
        """The budgets of C{scope} changed (set, edited or removed, on any process): its sums are seeded again
        from the usage ledger at their next use (L{gomodel.limits.budgets.BudgetBook.renew})."""
        if self._book is not None:
            self._book.renew(scope)

    def budget_scopes(self, principal):
        """C{[(scope, (Budget, ...))]} that a request of C{principal} spends from (the master key's only where
        a request is attributed to a user path: C{X-GoModel-User-Path})."""
        if principal is None or not principal.limited:
            return []
        return self._plan(principal)[1]

    def covering(self, principal, path):
        """The budgets and rate limits a status read covers (C{GET /v1/usage}): a managed key's, as its
        requests pass them (its own, and its user path's and its ancestors'); for the master key (or
        None: an open gateway) those of user path C{path} and its ancestors.

        @return: C{(budget scopes, limit scopes)}: C{[(scope, (Budget, ...))]} and C{[(scope, RateLimit)]}.
        """
        if principal is not None and not principal.master:
            _, budgets, limits, _ = self._plan(principal)
            return budgets, limits
        return self._budget_scopes(None, (), path), self._quotas.path_scopes(path)

    def read_limits(self, scopes):
        """L{gomodel.limits.limiter.Limiter.read} of C{scopes}: a Deferred."""
        return self._limiter.read(scopes)

    def spent(self, pairs):
        """What each C{(scope, Budget)} of C{pairs} spent this period (L{BudgetBook.spent}): a Deferred firing
        with C{[(tokens, cost)]}; with budgets off (no book) nothing is spent."""
        if self._book is None:
            return succeed([(0, 0.0)] * len(pairs))
        return Deferred.fromCoroutine(self._book.spent(pairs))

    def _plan(self, principal):
        plan = self._plans.get(principal.cache_key)
        if plan is None or plan[0] is not principal:
            limits = []
            limit = RateLimit(rpm=principal.rpm, tpm=principal.tpm, concurrent=principal.max_concurrency)
            if limit and self._quotas.rate_limits_enabled:  # (RATE_LIMITS_ENABLED=false: every rate limit off)
                limits.append((f"key:{principal.id}", limit))
            path = principal.user_path or "/"  # (a managed key without a path is at the root: C{/}'s hold for it)
            limits.extend(self._quotas.path_scopes(path))
            # whose windows its x-ratelimit-* headers show: the key's own and its path's (not a provider's)
            own = tuple(scope for scope, _ in limits) or None
            budgets = self._budget_scopes(principal.id, principal.budgets, path)
            if len(self._plans) > 100000:
                self._plans.clear()
            plan = self._plans[principal.cache_key] = (principal, budgets, limits, own)
        return plan

    def _budget_scopes(self, key_id, budgets, path):
        scopes = []
        if self._book is None:
            return scopes
        if budgets:
            scopes.append((f"key:{key_id}", key_budgets(budgets)))
        if path:
            configured = self._configured
            ancestors = path_ancestors(path)
            scopes.extend((f"path:{p}", configured[p]) for p in ancestors if p in configured)
            scopes.extend((f"path:{p}", self._path_budgets[p]) for p in ancestors
                          if p in self._path_budgets and p not in configured)
        return scopes

    # -- the request path ------------------------------------------------------------------

    def admit(self, request, ctx, upstream, call):
        """Reserve the request's estimate from its budgets, then take what it costs from every scope's limits.

        The admission is kept on C{ctx} (settled when the request completes);
        a managed key's C{x-ratelimit-*} headers are set on C{request}'s answer. On
        counters that answer at once (local ones) this runs to its end without
        a Deferred, in one call of the scopes' L{Lane} unless something refuses;
        at start, until the budgets set through the admin API were read once, a
        managed key's (or a user path's) request waits for that read (the master
        key's and an open gateway's have no budgets: they go on at once).

        @return: None once admitted, or a Deferred firing with None once admitted.
        @raise gomodel.errors.BudgetExceeded: a budget of the request's scopes is
            spent (or the Deferred fails with it).
        @raise gomodel.errors.RateLimitExceeded: a limit refused it, nothing was
            taken (or the Deferred fails with it).
        """
        principal = ctx.principal
        if not call.limited:  # (a token count)
            return self._admit_count(request, ctx, principal)
        if principal is None or not principal.limited:
            targets = self._target_scopes(upstream.name, call.model) if self._any_targets else ()
            if not targets:
                return None
            budgets, scopes, own = (), targets, None
        else:
            # Its plan's lane, the plan not looked up: there is one only while no provider or model has limits of
            # its own, once the budgets were read (lanes are made below, past both checks).
            lane = self._key_lanes.get(principal)
            if lane is not None:
                body = call.counted
                asked = call.asked
                if asked is None:  # (its route read none from a body it parsed: L{_asked})
                    asked = _asked(call)
                tokens = len(body) // 4 + asked if body else 0  # (L{estimate}, inline)
                if lane.costed:
                    admission = lane.admit(tokens, self._limiter.clock.seconds(), request.responseHeaders,
                                           self._cost_estimate(ctx, body, asked))
                else:
                    admission = lane.admit(tokens, self._limiter.clock.seconds(), request.responseHeaders)
                if admission is not None:
                    ctx.admission = admission
                    return None
                # refused (the general path below says why), or no longer live (it makes a new lane)
            elif self._unread is not None:  # (at start, until the budgets were read once: only a key's have any)
                waiting = Deferred()
                self._unread.append(waiting)
                return waiting.addCallback(self._admit_read, request, ctx, upstream, call)
            targets = self._target_scopes(upstream.name, call.model) if self._any_targets else ()
            plan = self._plans.get(principal.cache_key)  # (L{_plan}'s look-up, inline: every request of a key)
            if plan is None or plan[0] is not principal:
                plan = self._plan(principal)
            _, budgets, limits, own = plan
            scopes = self._with_targets(limits, targets) if targets else limits
            if not scopes and not budgets:
                return None
        if not self._limiter.immediate:
            ctx.budgets = budgets
            return Deferred.fromCoroutine(self._admit(request, ctx, budgets, scopes, own, call))
        body = call.counted
        asked = _asked(call)
        tokens = len(body) // 4 + asked if body else 0  # (L{estimate}, inline)
        now = self._limiter.clock.seconds()
        lane = self._lanes.get(id(scopes))
        if lane is None or lane.scopes is not scopes:
            lane = self._lane(scopes, budgets, own)
        cost = self._cost_estimate(ctx, body, asked) if budgets and self._pricing else 0.0
        if lane is not None:
            admission = lane.admit(tokens, now, request.responseHeaders, cost)
            if admission is None and not lane.live(now):  # a sweep, or a period's end: a new lane, once
                lane = self._lane(scopes, budgets, own)
                admission = None if lane is None else lane.admit(tokens, now, request.responseHeaders, cost)
            if scopes is not targets and not self._any_targets and lane is not None:  # a managed key's own limits
                if len(self._key_lanes) > 10000:
                    self._key_lanes.clear()
                self._key_lanes[principal] = lane
            if admission is not None:
                ctx.admission = admission
                return None
        # Something refuses (the general path's answer says what and until when), or periods to seed.
        ctx.budgets = budgets
        if budgets:
            reservation = self._book.reserve_now(budgets, tokens, cost)
            if reservation is None:
                return Deferred.fromCoroutine(self._admit(request, ctx, budgets, scopes, own, call))
            _reserved(reservation, ctx)
        if scopes:
            try:
                _admitted(self._limiter.admit_now(scopes, tokens, headers_for=own), request, ctx)
            except RateLimitExceeded:
                self._give_back(ctx)
                raise
        return None

    def _admit_read(self, _, request, ctx, upstream, call):
        """L{admit}, once the budgets were read at start."""
        return self.admit(request, ctx, upstream, call)

    def _admit_count(self, request, ctx, principal):
        """L{admit} a token count (a call not C{limited}): it generates nothing and costs nothing, so it takes
        nothing of a request or token window, a target's limits or a budget (Claude Code counts before many of its
        requests: each took one of its key's requests a minute); only a slot of the caps on requests in flight of
        its key and user path (C{max_concurrency}, C{concurrent}), which keep a client from flooding the
        upstream's tokenizer."""
        if principal is None or not principal.limited:
            return None
        limits = self._plan(principal)[2]
        counting = self._counting.get(id(limits))
        if counting is None or counting[0] is not limits:
            if len(self._counting) > 10000:
                self._counting.clear()
            counting = self._counting[id(limits)] = (limits, [
                (scope, RateLimit(concurrent=limit.concurrent)) for scope, limit in limits if limit.concurrent])
        scopes = counting[1]
        if not scopes:
            return None
        if not self._limiter.immediate:
            return Deferred.fromCoroutine(self._admit(request, ctx, (), scopes, None, None))
        _admitted(self._limiter.admit_now(scopes, 0), request, ctx)
        return None

    def _lane(self, scopes, budgets, own):
        """A new L{Lane} of C{scopes} and C{budgets} (kept by the id of C{scopes}), or None while a
        budget period is still to be seeded."""
        current = None
        if budgets:
            current = self._book.current_now(budgets)
            if current is None:
                return None
        prepared = self._limiter.prepare(scopes)
        header_plan = prepared.header_plan(own) if prepared is not None and own is not None else ()
        if len(self._lanes) > 10000:
            self._lanes.clear()
        lane = self._lanes[id(scopes)] = Lane(scopes, self._limiter, prepared, current, header_plan)
        return lane

    async def _admit(self, request, ctx, budgets, scopes, own, call):
        body = None if call is None else call.counted
        asked = _asked(call) if body else 0
        tokens = len(body) // 4 + asked if body else 0  # (L{estimate})
        if budgets:
            cost = self._cost_estimate(ctx, body, asked) if self._pricing else 0.0
            _reserved(await self._book.reserve(budgets, tokens, cost), ctx)  # (settled when it completes)
        if scopes:
            try:
                _admitted(await self._limiter.admit(scopes, tokens, headers_for=own), request, ctx)
            except RateLimitExceeded:
                self._give_back(ctx)
                raise

    def _give_back(self, ctx):
        """Give back what C{ctx}'s admission reserved of its budgets (a limit refused it after they had room)."""
        reservation = ctx.budgets
        if reservation.__class__ is Reservation:
            ctx.budgets = reservation.current.scopes
            if ctx.admission is NO_ADMISSION:
                ctx.admission = None
            giving = self._book.settle(reservation, 0, 0.0)
            if giving is not None:
                giving.addErrback(self._failed, "giving back a budget reservation")

    def _cost_estimate(self, ctx, body, asked) -> float:
        """The cost of a request's estimate (L{estimate}: its prompt, C{body}, and the output it asks for at most,
        C{asked}) at its model's price; 0 without one."""
        pricing = self._pricing
        if pricing is None or not body or not ctx.upstream_model:
            return 0.0
        cost = pricing.costs(f"{ctx.provider}/{ctx.upstream_model}", (len(body) // 4, asked, 0))[2]
        return cost or 0.0

    def _with_targets(self, limits, targets):
        """A key's C{limits} and a target's C{limits} in one list, the same list on every request."""
        if not targets:
            return limits
        combined = self._combined.get((id(limits), id(targets)))
        if combined is None or combined[0] is not limits or combined[1] is not targets:
            if len(self._combined) > 10000:
                self._combined.clear()
            combined = self._combined[id(limits), id(targets)] = (limits, targets, limits + targets)
        return combined[2]

    def _target_scopes(self, provider, model):
        scopes = self._targets.get((provider, model))
        if scopes is None:
            if len(self._targets) > 10000:
                self._targets.clear()
            scopes = self._targets[provider, model] = self._quotas.target_scopes(provider, model)
        return scopes

    def saturated(self, upstream, model) -> bool:
        """Whether C{upstream}'s provider or C{model} is at its limit (routing then prefers another target)."""
        return any(self._limiter.saturated(scope, limit) for scope, limit in self._target_scopes(upstream.name, model))

    @property
    def settles_bare(self) -> bool:
        """Whether a request no key's limit or budget applies to (no principal C{limited}) may hold something
        that L{completed} settles: a provider's or a model's limits."""
        return self._any_targets

    def completed(self, ctx):
        """A request-context sink: settle its reservation with the real usage and free its slots, and
        charge what a managed key's request that reached an upstream used to its budgets."""
        admission = ctx.admission
        principal = ctx.principal
        charged = self._charges and ctx.replica is not None and principal is not None and principal.limited
        if admission is None and not charged:  # (a reservation of its budgets comes with an admission: L{_reserved})
            return
        usage = ctx.usage
        used = usage.get("total_tokens") if usage else 0  # (L{total_tokens}' common case, inline)
        if used.__class__ is not int or not 0 <= used <= MAX_COUNT:
            used = total_tokens(usage)
        cost = None
        if charged:
            # (a transcription billed in audio seconds has no tokens: its cost is what it used)
            seconds = audio_seconds(usage) if usage and "seconds" in usage else None
            if used <= 0 and not seconds:
                charged = False
            elif self._pricing and ctx.upstream_model:
                cost = self._pricing.costs(f"{ctx.provider}/{ctx.upstream_model}", ctx.token_counts, seconds)[2]
        if admission.__class__ is tuple:  # a L{Lane}'s ticket: the lane and the tokens it reserved; () once settled
            if not admission:
                return
            ctx.admission = ()
            if admission[0].finish(admission, used, charged, cost, ctx.started):
                return  # settled and charged at once, by the lane that admitted it
            ctx.budgets = admission[0].budgets  # (charged below to the budgets it was admitted under)
        elif admission is not None:
            if self._limiter.immediate:
                admission.finish_now(used)
            else:
                admission.finish(used).addErrback(self._failed, "settling a rate-limit admission")
        reservation = ctx.budgets
        if reservation.__class__ is Reservation:  # (taken off the lanes: settled, given back where not charged)
            ctx.budgets = reservation.current.scopes
            settling = self._book.settle(reservation, used if charged else 0, cost if charged else 0.0, ctx.started)
            if settling is not None:
                settling.addErrback(self._failed, "settling a budget reservation")
        elif charged:
            # The budgets as its admission checked them (a lane's are its own): a reset, or a path's budgets
            # edited, while it ran leaves it in the sums it was admitted under, as the usage ledger counts it
            # (by when it started), a key's own budgets too (its principal is the one it came with); and in the
            # periods it started in, where it ended in the next (a stream across midnight is the day's it began).
            self._record(principal, used, cost, ctx.budgets, ctx.started)

    def reservation_stays(self, ctx):
        """C{ctx}'s request goes on at its upstream after its answer (a background response answered queued,
        without usage): what its admission reserved of its token windows stays taken when it completes, as its
        generation's, rather than given back as unused (its usage is charged to the budgets once it is over)."""
        admission = ctx.admission
        if admission.__class__ is tuple:  # a L{Lane}'s ticket
            if admission:  # (settled against no tokens reserved: nothing is given back; its budgets' reservation is)
                ctx.admission = (admission[0], 0, admission[2], admission[3])
        elif admission is not None:
            admission.keep_reserved()

    def _failed(self, failure, what):
        self.log.failure(what, failure)

    def charge(self, principal, model, usage, reservation=None):
        """Charge an answer's C{usage} (the upstream's usage object, or None) on C{model} (qualified, for
        its price) to the budgets of C{principal} (a managed key's; others have none): a batch line, or a
        background response once over.

        @param reservation: what the line reserved (L{reserve_line}), or None: settled with the usage (given
            back without any) in the periods of now, as the usage ledger dates a line (at its end).
        @return: a Deferred firing once the budgets are charged (never failing: a failure is logged), or None
            where it was done at once or there was nothing to charge.
        """
        if reservation is None and (self._book is None or principal is None or not principal.limited):
            return None
        used, seconds = (total_tokens(usage), audio_seconds(usage)) if usage else (0, None)
        cost = None
        if (used or seconds) and self._pricing and model:
            cost = self._pricing.costs(model, tokens_by_type(usage), seconds)[2]
        if reservation is not None:
            settling = self._book.settle(reservation, used, cost, self._limiter.clock.seconds())
            if settling is not None:
                settling.addErrback(self._failed, "settling a batch line's budget reservation")
            return settling
        if used or seconds:
            return self._record(principal, used, cost)
        return None

    def _record(self, principal, used, cost, scopes=None, at=None):
        """Charge C{used} tokens and C{cost} to C{scopes} (None: C{principal}'s budgets as they are now), in
        their periods at C{at} (None: now); a Deferred firing once done (never failing), or None."""
        if scopes is None:
            scopes = self.budget_scopes(principal)
        if scopes:
            recording = self._book.record(scopes, used, cost, at)
            if recording is not None:
                recording.addErrback(self._failed, "charging a budget")
            return recording
        return None

    async def check_budgets(self, principal):
        """Refuse when a budget of C{principal} is spent (a batch about to be made).

        @raise gomodel.errors.BudgetExceeded: one is.
        """
        budgets = self.budget_scopes(principal)
        if budgets:
            await self._book.check(budgets)

    def reserve_line(self, principal, model, body, path=None):
        """Reserve a batch line's estimate from the budgets of C{principal}, as an online request's admission does
        (L{estimate} of the C{body} it is sent with, to C{path}, and that on C{model}'s price, qualified, for a cost
        budget): lines sent at once count each other's reservations. Settled by L{charge}.

        @return: a Deferred firing with the L{Reservation}, or None (no budgets); it fails with
            L{gomodel.errors.BudgetExceeded} when one is spent (nothing taken).
        """
        budgets = self.budget_scopes(principal)
        if not budgets:
            return succeed(None)
        cost = 0.0
        if self._pricing and model and body:  # (as L{_cost_estimate})
            cost = self._pricing.costs(model, (len(body) // 4, requested_tokens(body, path) or 0, 0))[2] or 0.0
        return self._book.reserve(budgets, estimate(body, path), cost)


def _admitted(admission, request, ctx):
    """Keep C{admission} on C{ctx}; its C{x-ratelimit-*} headers go on C{request}'s answer (the C{lines}
    of its L{gomodel.http.headers.AnswerHeaders})."""
    ctx.admission = admission
    request.responseHeaders.lines = admission.header_lines()


def _reserved(reservation, ctx):
    """Keep C{reservation} (of C{ctx}'s budgets, or None) on C{ctx}, settled when it completes; its admission,
    where no limit takes one, is L{NO_ADMISSION} (a request without an admission has nothing to settle)."""
    if reservation is not None:
        ctx.budgets = reservation
        if ctx.admission is None:
            ctx.admission = NO_ADMISSION


def with_resets(path, budgets, resets) -> tuple:
    """C{budgets} of user C{path} with their last reset (C{resets}: C{{(user_path, period): reset_at}})."""
    return tuple(Budget(b.period, max_tokens=b.max_tokens, max_cost=b.max_cost, since=resets.get((path, b.period)))
                 for b in budgets)


def key_budgets(items) -> tuple:
    """A key's C{budgets} field as L{Budget}s.

    An item with neither C{max_tokens} nor C{max_cost} is a cost of infinity stored before the admin API
    refused one (the JSON encoder wrote it as null): a cap no spend reaches, L{COST_MAX}, as L{Budget}
    takes any cost past it. An item's C{reset_at} (the admin API's reset of the key's budget) is its C{since}."""
    return tuple(Budget(item["period"], max_tokens=item.get("max_tokens"),
                        max_cost=COST_MAX if item.get("max_tokens") is None and item.get("max_cost") is None
                        else item.get("max_cost"), since=item.get("reset_at"))
                 for item in items)


def _asked(call) -> int:
    """The output tokens a call (L{gomodel.proxy.exchange.UpstreamCall}) asks for at most, 0 for none: as its route
    read them from the body it parsed and sent (its C{asked}), else from its C{counted} bytes (not looked for first
    with C{b'"max_' in body}: bytes' C{in} tries its operand as an int before it searches, a TypeError made and
    dropped, dearer than L{requested_tokens}' find)."""
    asked = call.asked
    if asked is None:
        return requested_tokens(call.counted, call.path) or 0
    return asked


def estimate(body, path=None) -> int:
    """Tokens to reserve for a request body to C{path}: its bytes / 4 (the prompt) plus the output it asks for at
    most (L{requested_tokens}: its route's C{max_tokens}, C{max_completion_tokens} or C{max_output_tokens})."""
    if not body:
        return 0
    return len(body) // 4 + (requested_tokens(body, path) or 0)
