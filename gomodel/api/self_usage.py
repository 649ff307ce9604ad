"""C{GET /v1/usage}: the caller's own consumption, budgets and rate limits, in one call (GoModel's Usage API).

Any caller may ask, with the key it uses for inference; no admin access.
What it sees is its scope:

  - a managed key: its user path's subtree (every key's records under it), or,
    for a key without a user path, that key alone; its own budgets and limits,
    and those of its user path and the path's ancestors;
  - the master key (or an open gateway): the user path in C{X-GoModel-User-Path},
    or C{/} (everything) without it, with the budgets and limits of that path
    and its ancestors.

C{usage} totals the usage ledger over a window of whole UTC days (C{days},
default 30, or C{start_date}/C{end_date}; at most L{DAYS_MAX} days); it is
null when the ledger is off (C{USAGE_ENABLED=false}). Budgets and rate limits
report their own live periods. Reading this page takes nothing from the
caller's limits: it is no relayed request, which alone passes the gate.
"""

import math

from twisted.logger import Logger

from gomodel._twistedcompat import plain_headers
from gomodel.api.fields import iso
from gomodel.auth.keys import header_user_path
from gomodel.api.windows import DAY, day, window
from gomodel.errors import GatewayError, StorageUnavailable
from gomodel.http.bodies import json_answer
from gomodel.http.headers import X_GOMODEL_USER_PATH
from gomodel.limits.specs import counted_window

# The longest window of C{usage} (GoModel's).
DAYS_MAX = 365
# A budget period's C{period_seconds}, as GoModel gives them (2592000: the calendar month); C{total}: null.
PERIOD_SECONDS = {"hourly": 3600, "daily": 86400, "weekly": 604800, "monthly": 2592000, "total": None}
WINDOW_LABELS = {60: "minute", 3600: "hour", 86400: "day"}


class SelfUsage:
    """The handler of C{GET /v1/usage}, over the usage store, the gate (budgets and limits) and a clock."""

    log = Logger()

    def __init__(self, usage, gate, clock):
        """
        @param usage: the L{gomodel.accounting.usage.UsageLedger} (its C{summary}: the store's and what it
            has not written yet), or None (C{USAGE_ENABLED=false}).
        @param gate: the L{gomodel.limits.gate.Gate}.
        """
        self._usage = usage
        self._gate = gate
        self._clock = clock

    async def answer(self, request) -> bytes:
        """The caller's status (see the module docstring) as the answer's JSON body.

        @raise InvalidRequest: a malformed window or C{X-GoModel-User-Path} (a 400 naming it).
        @raise StorageUnavailable: the usage ledger could not be read (a 503).
        """
        start, end = window(request, self._clock, DAYS_MAX, span_limited=True)
        principal = request.context.principal
        if principal is not None and not principal.master:  # a managed key sees its own
            path = principal.user_path
            filters = {"user_path": path} if path else {"key": principal.id}
        else:
            if principal is not None:  # the master key: the header's path, its request attributed to (GatewayAuth)
                path = principal.user_path or "/"
            else:  # an open gateway: the header names the path asked for
                values = plain_headers(request.requestHeaders).get(X_GOMODEL_USER_PATH)
                path = header_user_path(values) if values else "/"
            filters = {} if path == "/" else {"user_path": path}
        now = self._clock.seconds()
        usage = None
        if self._usage is not None:
            usage = _usage_block(await self._summary(start, end, filters), start, end)
        budget_scopes, limit_scopes = self._gate.covering(principal, path)
        budgets = await self._budgets(budget_scopes, path, now)
        limits = _limits(limit_scopes, await self._gate.read_limits(limit_scopes) if limit_scopes else [], path,
                         now)
        return json_answer(request, {"user_path": path, "server_time": iso(now), "usage": usage,
                                     "budgets": budgets, "rate_limits": limits})

    async def _summary(self, start, end, filters):
        """The ledger's totals of the window for C{filters}; a store's failure is L{StorageUnavailable}."""
        try:
            return await self._usage.summary(start, end, filters)
        except Exception as e:
            error = e.message if isinstance(e, GatewayError) else f"{type(e).__name__}: {e}"
            self.log.warn("Reading the usage ledger for /v1/usage failed: {error}", error=error)
            # (what failed is the log's: an unexpected error's text may name the database's host)
            why = e.message if isinstance(e, StorageUnavailable) else "The gateway's log says why."
            raise StorageUnavailable(f"The usage ledger could not be read. {why}", code="usage_status_failed") \
                from None

    async def _budgets(self, scopes, path, now) -> list:
        """One entry per budget and unit of C{scopes}, with what it spent this period."""
        pairs = [(scope, budget) for scope, budgets in scopes for budget in budgets]
        if not pairs:
            return []
        entries = []
        for (scope, budget), (tokens, cost) in zip(pairs, await self._gate.spent(pairs)):
            start, end = counted_window(budget, now)  # (from its reset, if any this period)
            for unit, amount, spent in (("tokens", budget.max_tokens, tokens), ("cost", budget.max_cost, cost)):
                if amount is not None:
                    entries.append(budget_status(scope, path, budget.period, unit, amount, spent, start, end, now))
        return entries


def _usage_block(totals, start, end) -> dict:
    """GoModel's C{usage} fields of a store's summary C{totals} of the window C{[start, end)}."""
    return dict({"start_date": day(start), "end_date": day(end - DAY)}, **usage_fields(totals))


def usage_fields(totals) -> dict:
    """GoModel's names of a store's summary C{totals} (its C{UsageSummary}'s: C{total_requests}, ...):
    C{total_requests} the requests served (GoModel kept no record of a refusal), C{refused_requests} (ours) those
    the gateway refused itself (outcome C{refused}), which C{totals}' C{requests} counts too."""
    cached = totals["cached_tokens"] or 0
    refused = totals["refused"]
    return {"total_requests": totals["requests"] - refused, "refused_requests": refused,
            "total_input_tokens": totals["input_tokens"], "total_output_tokens": totals["output_tokens"],
            "total_tokens": totals["total_tokens"],
            "uncached_input_tokens": max(0, (totals["input_tokens"] or 0) - cached),
            "cached_input_tokens": cached, "cache_write_input_tokens": 0,
            "total_input_cost": totals["input_cost"], "total_output_cost": totals["output_cost"],
            "total_cost": totals["total_cost"], "rewrite_tokens_saved": 0, "rewrite_cost_saved": None}


def _scope_path(scope, path):
    """The user path an entry of C{scope} is shown with: a path scope's own, the caller's for its key's."""
    kind, _, name = scope.partition(":")
    return name if kind == "path" else path


def budget_status(scope, path, period, unit, amount, spent, start, end, now) -> dict:
    """One budget's entry (here, and in the admin API's GoModel form): C{amount}, C{spent} and C{remaining} in
    its C{unit} (C{tokens} or C{cost})."""
    period_seconds = PERIOD_SECONDS.get(period)
    if period_seconds is None and period != "total":  # "<N>s"
        period_seconds = int(period[:-1])
    return {"user_path": _scope_path(scope, path), "scope": scope, "period_seconds": period_seconds,
            "period_label": period, "unit": unit, "amount": amount, "spent": spent, "remaining": amount - spent,
            "usage_ratio": spent / amount, "period_start": iso(start), "period_end": iso(end),
            "resets_in_seconds": None if end is None else max(0, math.ceil(end - now)),
            "exceeded": spent >= amount}  # (as the book refuses: at its amount)


def _limits(scopes, read, path, now) -> list:
    """One entry per window and one per concurrency cap of C{scopes}, with what C{read} (L{Limiter.read}'s
    answer; None: the counters could not be read) says each holds."""
    entries = []
    for i, (scope, limit) in enumerate(scopes):
        levels, held = read[i] if read is not None else (None, None)
        shown = _scope_path(scope, path)
        for w in limit.windows:
            entries.append(_window(scope, shown, w, levels, now))
        if limit.concurrent is not None:
            entry = {"user_path": shown, "scope": scope, "period_seconds": 0, "period_label": "concurrent",
                     "max_requests": limit.concurrent, "in_flight": held, "requests_remaining": None,
                     "requests_usage_ratio": None, "exhausted": None}
            if held is not None:
                entry.update(requests_remaining=max(0, limit.concurrent - held),
                             requests_usage_ratio=held / limit.concurrent, exhausted=held >= limit.concurrent)
            entries.append(entry)
    return entries


def _window(scope, shown, w, levels, now) -> dict:
    """One rate window's entry: its requests and tokens buckets' use now (their C{levels}; None: unknown)."""
    entry = {"user_path": shown, "scope": scope, "period_seconds": w.seconds,
             "period_label": WINDOW_LABELS.get(w.seconds, f"{w.seconds}s")}
    resets, exhausted = 0, False
    for what, capacity, tokens in (("requests", w.max_requests, False), ("tokens", w.max_tokens, True)):
        if capacity is None:
            continue
        entry[f"max_{what}"] = capacity
        if levels is None:
            entry.update({f"{what}_used": None, f"{what}_remaining": None, f"{what}_usage_ratio": None})
            continue
        level = levels[w.seconds, tokens]
        remaining = math.floor(level + 1e-9)  # (as x-ratelimit-remaining-* floors it)
        used = capacity - remaining  # (a token bucket in debt: more than its capacity)
        entry.update({f"{what}_used": used, f"{what}_remaining": max(0, remaining),
                      f"{what}_usage_ratio": used / capacity})
        resets = max(resets, math.ceil((capacity - level) * w.seconds / capacity - 1e-6))
        exhausted = exhausted or remaining <= 0
    if levels is None:
        entry.update(window_start=None, window_end=None, resets_in_seconds=None, exhausted=None)
    else:
        # A token bucket refills evenly over its window: it is full again (nothing used) at window_end.
        entry.update(window_start=iso(now + resets - w.seconds), window_end=iso(now + resets),
                     resets_in_seconds=resets, exhausted=exhausted)
    return entry
