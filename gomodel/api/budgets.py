"""The admin API's budgets by user path, under C{/admin/api/v1/budgets} (GoModel's routes).

C{GET /budgets} lists every budget, those of the configuration
(C{SET_BUDGET_*}, YAML C{budgets:}; read-only) and those set here, each with
what its path spent in the current period. C{PUT /budgets} with
C{{user_path, period, amount | max_cost | max_tokens}} (or C{PUT
/budgets/{user_path}/{period}} with the rest) sets one; C{DELETE} the same
way (or with C{user_path} and C{period} in the query) removes it. C{POST
/budgets/reset-one} with C{{user_path, period}} sets what one spent back to
zero (its period counts from then), C{POST /budgets/reset} with GoModel's
C{{"confirmation": "reset"}} every one's (the configuration's too: the reset
time is kept in the store). Every process sees
an edit or a reset within about a second. Key budgets live on the keys
(C{/auth-keys}).

GoModel's forms are taken and answered too: the route's user path URL-encoded
(C{/budgets/%2Fteam%2Falpha/daily}), a period in seconds (C{86400}), and every
answer's C{budgets} (GoModel's entries: C{period_seconds}, C{period_label},
C{amount}, C{spent}, C{remaining}, C{usage_ratio}, C{period_ratio},
C{has_usage}, ...) and C{server_time}, beside ours.
"""

from klein import Klein
from twisted.logger import Logger

from gomodel.api.fields import iso, user_path
from gomodel.api.self_usage import budget_status
from gomodel.errors import InvalidRequest, NotFound, shown
from gomodel.http.bodies import json_answer, json_body, query_arg
from gomodel.http.render import install as install_error_handlers
from gomodel.limits.gate import with_resets
from gomodel.limits.specs import (COUNT_MAX, PERIOD_FORMS, BadPeriod, Budget, budget_period, counted_window, is_cost,
                                  is_count, named_period)

_FIELDS = {"user_path", "period", "period_seconds", "amount", "max_cost", "max_tokens"}
# GoModel's budget settings: the anchors of its calendar periods. Ours are the UTC calendar's, fixed: daily at
# 00:00, weekly from Monday (1, Go's weekday) 00:00, monthly from the 1st at 00:00.
SETTINGS = {"daily_reset_hour": 0, "daily_reset_minute": 0, "weekly_reset_weekday": 1, "weekly_reset_hour": 0,
            "weekly_reset_minute": 0, "monthly_reset_day": 1, "monthly_reset_hour": 0, "monthly_reset_minute": 0}


class BudgetsAPI:
    """C{GET|PUT|DELETE /budgets} and C{PUT|DELETE /budgets/{user_path}/{period}}."""

    log = Logger()
    app = Klein()
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False  # a doubled slash is a 404, never a redirect (before any route)

    def __init__(self, store, gate, book, quotas, clock):
        """
        @param store: the L{gomodel.store.interfaces.IBudgetStore}.
        @param gate: the L{gomodel.limits.gate.Gate} (this process uses an edit at once).
        @param book: the L{gomodel.limits.budgets.BudgetBook} (what each budget spent).
        @param quotas: the configured L{gomodel.limits.specs.LimitsConfig}.
        """
        self._store = store
        self._gate = gate
        self._book = book
        self._quotas = quotas
        self._clock = clock

    @app.route("/", methods=["GET"])
    async def list(self, request):
        return json_answer(request, await self._answer(None))

    async def _answer(self, fields) -> dict:
        """C{fields} (None: our list of every budget, C{object} and C{data}) with GoModel's list of every
        budget (C{budgets}, C{server_time})."""
        data, statuses, now = await self._listing()
        answer = {"object": "list", "data": data} if fields is None else dict(fields)
        answer.update(budgets=statuses, server_time=iso(now))
        return answer

    async def _listing(self):
        """C{(ours, GoModel's, now)}: every budget with what its path spent this period, in our form and in
        GoModel's (one entry per unit: a budget with a token and a cost cap is two)."""
        rows, resets = await self._rows()
        now = self._clock.seconds()
        spent = await self._book.spent([(f"path:{path}", budget) for path, budget, _ in rows]) if rows else []
        data, statuses = [], []
        for (path, budget, source), (tokens, cost) in zip(rows, spent):
            start, end = counted_window(budget, now)  # (from its reset, if any this period)
            reset_at = resets.get((path, budget.period))  # (its last, in any period, as GoModel's last_reset_at:
            reset_at = None if reset_at is None else iso(reset_at)  # whether it counts now is period_start)
            data.append({"user_path": path, "period": budget.period, "amount": budget.max_cost,
                         "max_cost": budget.max_cost, "max_tokens": budget.max_tokens, "source": source,
                         "spent_tokens": tokens, "spent_cost": cost, "period_start": iso(start),
                         "period_end": iso(end), "last_reset_at": reset_at})
            for unit, amount, used in (("tokens", budget.max_tokens, tokens), ("cost", budget.max_cost, cost)):
                if amount is not None:
                    entry = budget_status(f"path:{path}", path, budget.period, unit, amount, used, start, end, now)
                    ratio = None if end is None else max(0.0, min(1.0, (now - start) / (end - start)))
                    entry.update(source=source, has_usage=bool(tokens or cost), last_reset_at=reset_at,
                                 period_ratio=ratio)
                    statuses.append(entry)
        return data, statuses, now

    async def _rows(self):
        """C{([(user path, Budget, source)], resets)}: every budget (the configuration's, then those set here),
        its last reset applied, and C{{(user_path, period): reset_at}}."""
        resets = await self._store.resets()
        configured = self._quotas.budgets or {}
        rows = [(path, budget, "config") for path, budgets in sorted(configured.items())
                for budget in with_resets(path, budgets, resets)]
        rows += [(r["user_path"], _budget(r, resets), "admin") for r in await self._store.list()
                 if r["user_path"] not in configured]
        return rows, resets

    @app.route("/reset-one", methods=["POST"])
    async def reset_one(self, request):
        """GoModel's reset of one budget (C{{user_path, period}}): what it spent this period counts from now."""
        body = json_body(request)
        _known(body, {"user_path", "period", "period_seconds"}, "a budget reset")
        path, period = _target(body.get("user_path"), _period(body))
        rows, _ = await self._rows()
        if not any(p == path and budget.period == period for p, budget, _ in rows):
            raise NotFound(f"No {period} budget is set for {path}.", code="budget_not_found")
        return await self._reset(request, [(path, period)], {"user_path": path, "period": period})

    @app.route("/reset", methods=["POST"])
    async def reset_all(self, request):
        """GoModel's reset of every budget by user path: what each spent this period counts from now (a
        key's budgets are the keys'). As GoModel's, only with C{{"confirmation": "reset"}} (or C{confirm}).

        @raise InvalidRequest: no such confirmation (nothing is reset), or another field.
        """
        body = json_body(request) if request.content.seek(0, 2) else {}
        _known(body, {"confirmation", "confirm"}, "a reset of every budget")
        confirmation = body.get("confirmation")
        if not (isinstance(confirmation, str) and confirmation.strip()):  # (GoModel's: then its confirm)
            confirmation = body.get("confirm")
        if not isinstance(confirmation, str) or confirmation.strip().lower() != "reset":
            raise InvalidRequest('Resetting every budget needs {"confirmation": "reset"}.', param="confirmation",
                                 code="invalid_value")
        rows, _ = await self._rows()
        return await self._reset(request, sorted({(path, budget.period) for path, budget, _ in rows}),
                                 {"status": "ok"})

    async def _reset(self, request, targets, fields):
        """Reset C{targets} (C{(user_path, period)} pairs) and answer C{fields} with every budget after."""
        at = await self._store.reset(targets) if targets else self._clock.seconds()
        await self._gate.refresh()
        self.log.info("budgets reset: {targets}", targets=", ".join(f"{path} ({period})" for path, period in targets))
        return json_answer(request, await self._answer(dict(fields, reset=len(targets), reset_at=iso(at))))

    @app.route("/settings", methods=["GET"])
    def settings(self, request):
        """GoModel's budget settings: the anchors of the calendar periods (L{SETTINGS}: fixed)."""
        return json_answer(request, dict(SETTINGS, updated_at=None))

    @app.route("/settings", methods=["PUT"])
    def put_settings(self, request):
        """GoModel's settings update: the anchors as they are are taken; another is refused, naming it."""
        body = json_body(request)
        _known(body, set(SETTINGS), "the budget settings")
        for name, value in body.items():
            if value is not None and value != SETTINGS[name]:
                raise InvalidRequest(f"Budget periods are the UTC calendar's here: {name} is {SETTINGS[name]} (daily "
                                     "at 00:00, weekly from Monday 00:00, monthly from the 1st at 00:00).",
                                     param=name, code="invalid_value")
        return json_answer(request, dict(SETTINGS, updated_at=None))

    @app.route("/", methods=["PUT", "POST"])
    async def put(self, request):
        body = json_body(request)
        return await self._put(request, body.get("user_path"), _period(body), body)

    @app.route("/<path:target>", methods=["PUT"])
    async def put_at(self, request, target):
        path, period = _split(target)
        body = json_body(request)
        _agree(body, path, period, "the route")
        return await self._put(request, path, period, body)

    @app.route("/", methods=["DELETE"])
    async def delete(self, request):
        body = json_body(request) if request.content.seek(0, 2) else {}
        _known(body, {"user_path", "period", "period_seconds"})
        path, period = query_arg(request, b"user_path"), query_arg(request, b"period")
        _agree(body, path, period, "the query")
        return await self._delete(request, path or body.get("user_path"), period or _period(body))

    @app.route("/<path:target>", methods=["DELETE"])
    async def delete_at(self, request, target):
        path, period = _split(target)
        body = json_body(request) if request.content.seek(0, 2) else {}
        _known(body, {"user_path", "period", "period_seconds"})
        _agree(body, path, period, "the route")
        return await self._delete(request, path, period)

    async def _put(self, request, path, period, body):
        _known(body, _FIELDS)
        path, period = _target(path, period)
        if path in (self._quotas.budgets or {}):
            raise InvalidRequest(f"The budgets of {path} come from the configuration (SET_BUDGET_* or YAML); "
                                 "change them there.", param="user_path", code="budget_from_config")
        amounts = {name: body[name] for name in ("amount", "max_cost", "max_tokens") if body.get(name) is not None}
        if len(amounts) != 1 or ("amount" in amounts and "max_cost" in amounts):
            raise InvalidRequest("Give one of amount (a cost), max_cost or max_tokens.", param="amount",
                                 code="invalid_value")
        (name, value), = amounts.items()
        if name == "max_tokens":
            if not is_count(value):
                raise InvalidRequest(f"max_tokens must be a whole number from 1 to {COUNT_MAX}.", param="max_tokens",
                                     code="invalid_value")
            record = await self._store.put(path, period, value, None)
        else:
            if not is_cost(value):
                raise InvalidRequest(f"{name} must be a number above 0 and below 1.8e308.", param=name,
                                     code="invalid_value")
            record = await self._store.put(path, period, None, float(value))
        await self._gate.refresh()
        return json_answer(request, await self._answer({
            "user_path": record["user_path"], "period": record["period"], "amount": record["max_cost"],
            "max_cost": record["max_cost"], "max_tokens": record["max_tokens"], "source": "admin"}))

    async def _delete(self, request, path, period):
        path, period = _target(path, period)
        if not await self._store.delete(path, period):
            raise NotFound(f"No budget for {path} ({period}) was set through the admin API.",
                           code="budget_not_found")
        await self._gate.refresh()
        return json_answer(request, await self._answer({"user_path": path, "period": period, "deleted": True}))


def _known(body, fields, of="a budget"):
    """Refuse a body with a field not in C{fields}, as the keys API does, saying what it is not a field C{of}."""
    unknown = set(body) - fields
    if unknown:
        field = shown(sorted(unknown)[0])
        raise InvalidRequest(f"'{field}' is not a field of {of}.", param=field, code="invalid_value")


def _period(body):
    """The period C{body} gives (L{budget_period}: C{period} or C{period_seconds}, GoModel's forms too), or None.

    @raise InvalidRequest: one that names no standard period."""
    try:
        return budget_period(body)
    except BadPeriod as e:
        raise InvalidRequest(f"{e.field} {e}.", param=e.field, code="invalid_value") from None


def _agree(body, path, period, where):
    """Refuse a body whose C{user_path} or C{period} is not the one C{where} names (C{path}, C{period}: None
    where it names none; a period in any of its forms: C{day} is C{daily})."""
    given = _period(body)
    if given is not None and period is not None and given != named_period(period):
        raise InvalidRequest(f"The body's period is not {period!r}, which {where} names.", param="period",
                             code="invalid_value")
    if body.get("user_path") is not None and path is not None and user_path(body["user_path"]) != user_path(path):
        raise InvalidRequest(f"The body's user_path is not {user_path(path)!r}, which {where} names.",
                             param="user_path", code="invalid_value")


def _split(target):
    """C{team/alpha/daily} -> C{("/team/alpha", "daily")}."""
    path, _, period = target.rstrip("/").rpartition("/")
    return "/" + path, period


def _target(path, period):
    if path is None:
        raise InvalidRequest("A budget needs a user_path.", param="user_path", code="missing_required_parameter")
    period = named_period(period)
    if period is None:
        raise InvalidRequest(f"period must be {PERIOD_FORMS}.", param="period", code="invalid_value")
    return user_path(path), period


def _budget(record, resets):
    return Budget(record["period"], max_tokens=record["max_tokens"], max_cost=record["max_cost"],
                  since=resets.get((record["user_path"], record["period"])))


install_error_handlers(BudgetsAPI.app)
