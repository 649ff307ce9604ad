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
request completes (L{Gate.completed}, a request-context sink). Budgets are
checked before a request and charged from the usage ledger's records
(L{Gate.spend}), so batch lines and passthrough count like any request.
"""

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from gomodel._twistedcompat import set_plain_headers
from gomodel.limits.specs import Budget, RateLimit, path_ancestors
from gomodel.logs import log_failure
from gomodel.periodic import Periodic

_MAX_TOKEN_NEEDLES = tuple(b'"%s"' % name for name in (b"max_tokens", b"max_completion_tokens", b"max_output_tokens"))


class Gate(Periodic):
    """Admits requests under rate limits and budgets (see the module docstring).

    As a service it re-reads the budgets set through the admin API every
    C{interval} seconds (an edit on another process takes effect here then).
    """

    log = Logger()

    def __init__(self, limiter, book, quotas, keys=None, budgets=None, clock=None, interval=1.0):
        """
        @param limiter: the L{gomodel.limits.limiter.Limiter}.
        @param book: the L{gomodel.limits.budgets.BudgetBook}, or None (no budgets).
        @param quotas: the configured L{gomodel.limits.specs.LimitsConfig}.
        @param keys: the L{gomodel.auth.keys.KeyRing} (a usage record names its key by id).
        @param budgets: the L{gomodel.store.interfaces.IBudgetStore}, or None.
        """
        super().__init__(clock, interval)
        self._limiter = limiter
        self._book = book
        self._quotas = quotas
        self._keys = keys
        self._store = budgets
        self._path_budgets = {}  # user path -> (Budget, ...) set through the admin API
        # What a key's requests pass, worked out once per key version (the key ring makes a new
        # Principal on every change): key id -> (principal, budget scopes, key and path limit scopes, own).
        self._plans = {}
        self._targets = {}  # (provider, model) -> its limit scopes (the configuration is fixed)
        # (id(key's limits), id(target's)) -> (both, the one list of both): the same list on every
        # request, as the limiter keeps what it works out per list.
        self._combined = {}

    def refresh(self):
        """Re-read the budgets set through the admin API.

        @return: a Deferred firing with None; a failure is logged (the last ones stay).
        """
        if self._store is None or self._book is None:
            return succeed(None)
        d = self._store.list()
        d.addCallback(self.set_path_budgets)
        d.addErrback(lambda f: log_failure(self.log, f, "reading the budgets failed"))
        return d

    # -- configuration ---------------------------------------------------------------------

    def set_path_budgets(self, records):
        """Take the budgets set through the admin API (C{IBudgetStore} records), replacing the last ones."""
        budgets = {}
        for record in records:
            budgets.setdefault(record["user_path"], []).append(
                Budget(record["period"], max_tokens=record["max_tokens"], max_cost=record["max_cost"]))
        budgets = {path: tuple(items) for path, items in budgets.items()}
        if budgets != self._path_budgets:
            self._path_budgets = budgets
            self._plans = {}

    def budget_scopes(self, principal):
        """C{[(scope, (Budget, ...))]} that a request of C{principal} spends from."""
        if principal is None or principal.master:
            return []
        return self._plan(principal)[1]

    def _plan(self, principal):
        plan = self._plans.get(principal.id)
        if plan is None or plan[0] is not principal:
            limits, own = [], None
            limit = RateLimit(rpm=principal.rpm, tpm=principal.tpm, concurrent=principal.max_concurrency)
            if limit:
                own = f"key:{principal.id}"
                limits.append((own, limit))
            limits.extend(self._quotas.path_scopes(principal.user_path))
            budgets = self._budget_scopes(principal.id, principal.budgets, principal.user_path)
            if len(self._plans) > 100000:
                self._plans.clear()
            plan = self._plans[principal.id] = (principal, budgets, limits, own)
        return plan

    def _budget_scopes(self, key_id, budgets, path):
        scopes = []
        if self._book is None:
            return scopes
        if budgets:
            scopes.append((f"key:{key_id}", key_budgets(budgets)))
        if path:
            scopes.extend(self._quotas.budget_scopes(path))
            configured = self._quotas.budgets or {}
            scopes.extend((f"path:{p}", self._path_budgets[p]) for p in path_ancestors(path)
                          if p in self._path_budgets and p not in configured)
        return scopes

    # -- the request path ------------------------------------------------------------------

    def admit(self, request, ctx, upstream, call):
        """Check budgets, then take what the request costs from every scope's limits.

        The admission is kept on C{ctx} (settled when the request completes);
        a managed key's C{x-ratelimit-*} headers are set on C{request}. On
        counters that answer at once (local ones) this runs to its end without
        a Deferred.

        @return: None once admitted, or a Deferred firing with None once admitted.
        @raise gomodel.errors.BudgetExceeded: a budget of the request's scopes is
            spent (or the Deferred fails with it).
        @raise gomodel.errors.RateLimitExceeded: a limit refused it, nothing was
            taken (or the Deferred fails with it).
        """
        principal = ctx.principal
        targets = self._target_scopes(upstream.name, call.model)
        if principal is None or principal.master:
            budgets, scopes, own = (), targets, None
        else:
            _, budgets, limits, own = self._plan(principal)
            scopes = self._with_targets(limits, targets)
        if not self._limiter.immediate or (budgets and not self._book.check_now(budgets)):
            return Deferred.fromCoroutine(self._admit(request, ctx, budgets, scopes, own, call))
        if scopes:
            _admitted(self._limiter.admit_now(scopes, estimate(call.body), headers_for=own), request, ctx)
        return None

    async def _admit(self, request, ctx, budgets, scopes, own, call):
        if budgets:
            await self._book.check(budgets)
        if scopes:
            _admitted(await self._limiter.admit(scopes, estimate(call.body), headers_for=own), request, ctx)

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

    def completed(self, ctx):
        """A request-context sink: settle its reservation with the real usage and free its slots."""
        admission = ctx.admission
        if admission is None:
            return
        used = 0
        if ctx.usage:
            prompt, completion = ctx.tokens
            used = (prompt or 0) + (completion or 0)
        if self._limiter.immediate:
            admission.finish_now(used)
        else:
            admission.finish(used).addErrback(lambda f: self.log.failure("settling a rate-limit admission", f))

    def spend(self, auth_key_id, user_path, tokens, cost):
        """Charge a usage record (a request or a batch line) to its key's and user path's budgets."""
        if self._book is None:
            return
        principal = self._keys.by_id(auth_key_id) if auth_key_id and self._keys is not None else None
        if principal is not None:
            scopes = self.budget_scopes(principal)
        else:  # a key no longer known: its path's budgets still count
            scopes = self._budget_scopes(None, (), user_path)
        if scopes:
            recording = self._book.record(scopes, tokens, cost)
            if recording is not None:
                recording.addErrback(lambda f: self.log.failure("charging a budget", f))

    async def check_budgets(self, principal):
        """Refuse when a budget of C{principal} is spent (a batch line about to be sent).

        @raise gomodel.errors.BudgetExceeded: one is.
        """
        budgets = self.budget_scopes(principal)
        if budgets:
            await self._book.check(budgets)


def _admitted(admission, request, ctx):
    """Keep C{admission} on C{ctx}; its C{x-ratelimit-*} headers go on C{request}'s answer."""
    ctx.admission = admission
    set_plain_headers(request.responseHeaders, admission.raw_headers())


def key_budgets(items) -> tuple:
    """A key's C{budgets} field as L{Budget}s."""
    return tuple(Budget(item["period"], max_tokens=item.get("max_tokens"), max_cost=item.get("max_cost"))
                 for item in items)


def estimate(body) -> int:
    """Tokens to reserve for a request body: its bytes / 4 (the prompt) plus its C{max_tokens}."""
    if not body:
        return 0
    tokens = len(body) // 4
    if b'"max_' not in body:  # the start of every needle: one scan where none is sent
        return tokens
    for needle in _MAX_TOKEN_NEEDLES:
        at = body.find(needle)
        if at >= 0:
            tail = body[at + len(needle):at + len(needle) + 22].lstrip(b" :")
            digits = tail[:len(tail) - len(tail.lstrip(b"0123456789"))]
            if digits:
                return tokens + int(digits)
    return tokens
