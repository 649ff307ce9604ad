"""The admin API's managed keys, under C{/admin/api/v1/auth-keys} (GoModel's routes and field names).

A key is created with its secret shown once (C{value}); afterwards only its
redacted form (C{sk_gom_...abcd}) is ever shown. Times are ISO 8601 UTC
strings, as GoModel answers; C{expires_at} is accepted as ISO 8601 or Unix
seconds.

The handlers here import no Klein: its routes are L{gomodel.api.key_routes}, and the front serves a key's creation
(C{POST /admin/api/v1/auth-keys}, what a fleet's provisioning sends) with them itself (L{gomodel.api.plain}).
"""

import math
import re
import uuid
from datetime import datetime, timezone

from gomodel.api.fields import CONTROL as _CONTROL, invalid_field as _bad, iso, user_path
from gomodel.auth.keys import hash_secret, new_secret, redact
from gomodel.batches.validation import check_metadata
from gomodel.errors import Conflict, InvalidRequest, NotFound, quoted, shown
from gomodel.http.bodies import json_answer, json_body, page, query_arg, query_limit
from gomodel.limits.gate import key_budgets
from gomodel.limits.specs import COUNT_MAX, PERIOD_FORMS, BadPeriod, budget_period, counted_window, is_cost, is_count

# The largest token and request counts a limit or budget may say (L{COUNT_MAX}); the largest number
# PostgreSQL's INTEGER columns hold (max_concurrency, priority); the last second an ISO 8601 date can say.
# A key's numbers past them are a 400, not a store's failure (BIGINT past 2**63).
_INT_MAX = 2**31 - 1
_LATEST = 253402300799  # 9999-12-31T23:59:59Z
LIST_LIMIT_MAX = 1000  # keys on one page of the list, when it asks for pages (C{limit})
MODELS_MAX, MODEL_CHARS_MAX = 1000, 256  # a key's model selectors, and the characters of one
_INTEGER_LIMITS = {"rpm": COUNT_MAX, "tpm": COUNT_MAX, "max_concurrency": _INT_MAX}
_UTC_SUFFIX = re.compile("[Zz]$")  # (RFC 3339's Z, in either case)
# What C{expires_at} takes (Unix seconds in a JSON string are refused, as GoModel's Go time.Time refuses them).
_EXPIRY_FORMS = ("must be ISO 8601 text (2027-01-31T00:00:00Z) or Unix seconds as a JSON number "
                 "(1801353600, not in quotes)")
# What a create, an update or a rotation body may set.
KEY_FIELDS = frozenset(("name", "description", "user_path", "expires_at", "models", "allowed_models", "rpm", "tpm",
                        "max_concurrency", "budgets", "priority", "metadata", "own_cache_salt"))


class Keys:
    """The handlers of C{POST|GET /auth-keys}, C{GET|PATCH /auth-keys/{id}}, C{POST /auth-keys/{id}/deactivate},
    C{POST /auth-keys/{id}/rotate}, C{POST /auth-keys/{id}/budgets/reset}: each a coroutine function of the request
    (and the key's id) returning the answer's body."""

    def __init__(self, store, ring, clock, book=None):
        """
        @param store: the L{gomodel.store.interfaces.IKeyStore}.
        @param ring: the L{gomodel.auth.keys.KeyRing} (this process sees its edits at once).
        @param book: the L{gomodel.limits.budgets.BudgetBook} (what each key budget spent this
            period, shown beside it), or None (C{BUDGETS_ENABLED=false}).
        """
        self._store = store
        self._ring = ring
        self._clock = clock
        self._book = book

    async def create(self, request):
        fields = key_fields(json_body(request), self._clock.seconds(), creating=True)
        secret = new_secret()
        record = await self._store.add(dict(
            fields, id="key_" + uuid.uuid4().hex[:24], hash=hash_secret(secret), redacted=redact(secret),
            created_at=int(self._clock.seconds())))
        self._ring.merge([record])
        request.setResponseCode(201)
        return json_answer(request, dict((await self._views([record]))[0], value=secret))  # (as a GET shows it)

    async def list(self, request):
        """Every key, oldest first; with C{limit} (1 to L{LIST_LIMIT_MAX}) a page of them, after the key
        C{after} names (the last page's C{last_id}), as OpenAI's lists page."""
        after = query_arg(request, b"after")
        limit = query_limit(request, None, LIST_LIMIT_MAX)  # (None: every key)
        found = await self._store.page(after, limit)  # (one query: not every key read for a page of them)
        if found is None:
            raise InvalidRequest(f"No key with id {quoted(after)} to list after.", param="after",
                                 code="invalid_value")
        records, has_more = found
        return json_answer(request, page(await self._views(records), has_more))

    async def get(self, request, key_id):
        return json_answer(request, (await self._views([await self._record(key_id)]))[0])

    async def update(self, request, key_id):
        changes = key_fields(json_body(request), self._clock.seconds(), creating=False)
        if changes.get("budgets"):  # (read and written in one transaction: a reset meanwhile is kept)
            record = await self._store.edit(key_id, lambda stored: dict(changes, budgets=_kept_resets(
                changes["budgets"], stored)))
        else:
            record = await self._store.update(key_id, changes) if changes else await self._record(key_id)
        if record is None:
            raise _unknown(key_id)
        self._ring.merge([record])
        return json_answer(request, (await self._views([record]))[0])

    async def deactivate(self, request, key_id):
        """Deactivate the key (again: as it is). It takes no field: a body with one is a 400 naming it."""
        body = json_body(request) if request.content.seek(0, 2) else {}
        if body:
            raise _bad(sorted(body)[0], "is not a field of a deactivation (it takes none: the key is refused at once; "
                                        "to refuse it later, set its expires_at)")
        # (one conditional write: of two at once, the second answers the key as the first left it)
        record = await self._store.deactivate(key_id, int(self._clock.seconds()))
        if record is None:
            raise _unknown(key_id)
        self._ring.merge([record])
        return json_answer(request, (await self._views([record]))[0])

    async def rotate(self, request, key_id):
        """Give the key a new secret (its C{value}, shown this once), the key kept as it is (its id, what it made,
        its limits, budgets and usage): the old secret is refused at once here, on every process within about a
        second (the key ring's refresh). An optional body sets what a C{PATCH} sets, written with the new secret
        (another field, a grace period for the old secret say, is a 400 naming it). 409 C{key_deactivated} for a
        deactivated key (its new secret would be refused too), the key untouched."""
        body = json_body(request) if request.content.seek(0, 2) else {}
        unknown = set(body) - KEY_FIELDS
        if unknown:
            raise _bad(sorted(unknown)[0], "is not a field of a rotation: it sets an auth key's fields with the new "
                                           "secret, and the old secret is refused at once")
        changes = key_fields(body, self._clock.seconds(), creating=False)
        secret = new_secret()
        # (read and written in one transaction: a deactivation meanwhile is seen)
        record = await self._store.edit(key_id, _rotating(key_id, secret, changes))
        if record is None:
            raise _unknown(key_id)
        self._ring.merge([record])
        return json_answer(request, dict((await self._views([record]))[0], value=secret))

    async def reset_budgets(self, request, key_id):
        """Reset the key's own budgets (C{{"period"}}: that one; no body or no period: every one): what each
        spent in its period counts from now, on every process once it reads the keys (within about a second).
        404 C{budget_not_found} when the key has no budget (C{param} C{period}: none of that period)."""
        body = json_body(request) if request.content.seek(0, 2) else {}
        unknown = set(body) - {"period", "period_seconds"}
        if unknown:
            raise _bad(sorted(unknown)[0], "is not a field of a budget reset")
        try:
            period = budget_period(body)  # (GoModel's forms too: day, 86400, period_seconds)
        except BadPeriod as e:
            raise _bad(e.field, str(e)) from None
        # (read and written in one transaction: a PATCH of the budgets meanwhile is kept)
        record = await self._store.edit(key_id, _resetting(key_id, period, self._clock.seconds()))
        if record is None:
            raise _unknown(key_id)
        self._ring.merge([record])
        return json_answer(request, (await self._views([record]))[0])

    async def _record(self, key_id):
        record = await self._store.get(key_id)
        if record is None:
            raise _unknown(key_id)
        return record

    async def _views(self, records) -> list:
        """L{_view}s of C{records}, each budget with what it spent in its current period
        (C{spent_tokens}, C{spent_cost}, C{period_start}: its period's start or its reset, C{period_end})."""
        views = [self._view(record) for record in records]
        if self._book is None:
            return views
        pairs, items = [], []
        for record, view in zip(records, views):
            for item, budget in zip(view["budgets"], key_budgets(record["budgets"] or ())):
                pairs.append((f"key:{view['id']}", budget))
                items.append(item)
        if pairs:
            now = self._clock.seconds()
            for item, (_, budget), (tokens, cost) in zip(items, pairs, await self._book.spent(pairs)):
                start, end = counted_window(budget, now)
                item.update(spent_tokens=tokens, spent_cost=cost, period_start=iso(start), period_end=iso(end))
        return views

    def _view(self, record) -> dict:
        """What the admin API shows of a key: everything but its hash."""
        now = self._clock.seconds()
        expired = record["expires_at"] is not None and now >= record["expires_at"]
        return {
            "id": record["id"], "object": "auth_key", "name": record["name"],
            "description": record["description"], "user_path": record["user_path"],
            "redacted_value": record["redacted"], "models": record["models"],
            "allowed_models": record["models"], "rpm": record["rpm"], "tpm": record["tpm"],
            "max_concurrency": record["max_concurrency"],
            "budgets": [_budget_view(item) for item in record["budgets"] or ()],
            "priority": record["priority"], "metadata": record["metadata"],
            "own_cache_salt": record["own_cache_salt"],
            "enabled": record["deactivated_at"] is None, "expired": expired,
            "active": record["deactivated_at"] is None and not expired,
            "created_at": iso(record["created_at"]), "updated_at": iso(record["updated_at"]),
            "expires_at": iso(record["expires_at"]), "deactivated_at": iso(record["deactivated_at"]),
        }


def _budget_view(item) -> dict:
    """What the admin API shows of a key's budget: its C{period}, C{max_tokens} or C{max_cost}, and
    C{last_reset_at} (ISO 8601, or None: never reset): its last reset in whichever period, as GoModel shows
    a budget's (whether it still counts is the view's C{period_start}, L{counted_window})."""
    view = {name: value for name, value in item.items() if name != "reset_at"}
    view["last_reset_at"] = iso(item.get("reset_at"))
    return view


def _kept_resets(items, record) -> list:
    """The budgets C{items} of a PATCH, each with the last reset of its period on the key (C{record}'s
    C{budget_resets}, or its budget's C{reset_at} where it was reset before they were kept), removed and set
    again meanwhile or not."""
    resets = dict(record.get("budget_resets") or {})
    for item in record["budgets"] or ():
        if item.get("reset_at") is not None:
            resets[item["period"]] = max(item["reset_at"], resets.get(item["period"], item["reset_at"]))
    return [dict(item, reset_at=resets[item["period"]]) if item["period"] in resets else item for item in items]


def _resetting(key_id, period, at):
    """The change (for C{IKeyStore.edit}) that resets the key's budget of C{period} (None: each) at C{at}.

    @raise NotFound: C{budget_not_found}, the key having no budget (of that period).
    """
    def change(record):
        items = record["budgets"] or []
        if not items:
            raise NotFound(f"The key {key_id} has no budgets.", code="budget_not_found")
        if period is not None and not any(item["period"] == period for item in items):
            raise NotFound(f"The key {key_id} has no {period} budget.", param="period", code="budget_not_found")
        budgets = [dict(item, reset_at=at) if period in (None, item["period"]) else item for item in items]
        return {"budgets": budgets, "budget_resets": dict(record.get("budget_resets") or {}, **{
            item["period"]: at for item in budgets if period in (None, item["period"])})}
    return change


def _rotating(key_id, secret, changes):
    """The change (for C{IKeyStore.edit}) that gives the key C{secret}, and sets C{changes} (L{key_fields}').

    @raise Conflict: C{key_deactivated}, the key being deactivated.
    """
    def change(record):
        if record["deactivated_at"] is not None:
            raise Conflict(f"The key {key_id} is deactivated: a new secret would be refused too. Make a new key "
                           "instead.", code="key_deactivated")
        fields = dict(changes, hash=hash_secret(secret), redacted=redact(secret))
        if changes.get("budgets"):  # (a reset of theirs kept, as a PATCH keeps it)
            fields["budgets"] = _kept_resets(changes["budgets"], record)
        return fields
    return change


def _unknown(key_id):
    return NotFound(f"No auth key '{shown(key_id)}'.", code="auth_key_not_found")


def key_fields(body: dict, now: float, *, creating: bool) -> dict:
    """The stored fields a create or update body sets, checked.

    @raise InvalidRequest: a field is missing (C{name} on create) or malformed.
    """
    unknown = set(body) - KEY_FIELDS
    if unknown:
        raise _bad(sorted(unknown)[0], "is not a field of an auth key")
    fields = {}
    if "name" in body or creating:
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 200 or _CONTROL.search(name.strip()):
            raise _bad("name", "must be a non-empty string of at most 200 characters, none a control character")
        fields["name"] = name.strip()
    if "description" in body:
        fields["description"] = _optional_text(body, "description", 2000)
    if "user_path" in body:  # (C{/}, or C{""}: no path, as the header's C{/} is none; not one tenant of them all)
        path = user_path(body["user_path"]) if body["user_path"] is not None else None
        fields["user_path"] = None if path == "/" else path
    if "expires_at" in body:
        fields["expires_at"] = expiry(body["expires_at"], now)
    for name in ("models", "allowed_models"):
        if name in body:
            selectors = _selectors(body[name], name)
            if "models" in fields and (fields["models"] or None) != (selectors or None):  # (null, []: every model)
                raise _bad("allowed_models", "differs from 'models' (they are one field: give one)")
            fields["models"] = selectors
    for name, most in _INTEGER_LIMITS.items():
        if name in body:
            value = body[name]
            if value is not None and (not _is_int(value) or not 1 <= value <= most):
                raise _bad(name, f"must be a whole number from 1 to {most}, or null")
            fields[name] = value
    if "budgets" in body:
        fields["budgets"] = budgets(body["budgets"])
    if "priority" in body:
        if body["priority"] is not None and (not _is_int(body["priority"])
                                             or not -_INT_MAX - 1 <= body["priority"] <= _INT_MAX):
            raise _bad("priority", f"must be an integer from {-_INT_MAX - 1} to {_INT_MAX}, or null")
        fields["priority"] = body["priority"]
    if "metadata" in body:
        try:
            fields["metadata"] = check_metadata(body["metadata"])  # (OpenAI's rule)
        except ValueError as e:
            raise _bad("metadata", f"{e}, or null") from None
    if "own_cache_salt" in body:  # (null: its default, false, as null is every other field's)
        if body["own_cache_salt"] is not None and not isinstance(body["own_cache_salt"], bool):
            raise _bad("own_cache_salt", "must be true or false, or null (false)")
        fields["own_cache_salt"] = bool(body["own_cache_salt"])
    return fields


def expiry(value, now: float):
    """Unix seconds from ISO 8601 text or a number; None for null.

    @raise InvalidRequest: neither, or in the past.
    """
    if value is None:
        return None
    if _is_int(value) or (isinstance(value, float) and math.isfinite(value)):  # (not infinity, NaN)
        seconds = int(value)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(_UTC_SUFFIX.sub("+00:00", value.strip()))
        except ValueError:
            raise _bad("expires_at", _EXPIRY_FORMS) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        seconds = int(moment.timestamp())
    else:
        raise _bad("expires_at", _EXPIRY_FORMS)
    if seconds <= now:
        raise _bad("expires_at", "is in the past")
    if seconds > _LATEST:
        raise _bad("expires_at", "must be before the year 10000")
    return seconds


def budgets(value) -> list:
    """A key's budgets: C{[{"period", "max_tokens"} | {"period", "max_cost"}]}, one per period, each period
    in any form the budget routes take (L{budget_period}: C{daily}, C{day}, C{86400}, or C{period_seconds}),
    kept as its name.

    @raise InvalidRequest: malformed.
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad("budgets", "must be a list of {period, max_tokens} or {period, max_cost}")
    out, periods = [], set()
    for item in value:
        if not isinstance(item, dict):
            raise _bad("budgets", "each must be an object: {period, max_tokens | max_cost}")
        try:
            period = budget_period(item)
        except BadPeriod as e:
            raise _bad("budgets", f"each needs a period: its {e.field} {e}") from None
        if period is None:
            raise _bad("budgets", f"each needs a period: {PERIOD_FORMS}")
        unknown = set(item) - {"period", "period_seconds", "max_tokens", "max_cost"}
        if unknown:  # (what a GET shows beside them, spent_tokens..., is read-only)
            raise _bad("budgets", f"each is {{period, max_tokens | max_cost}}: {quoted(sorted(unknown)[0])} is not a "
                                  "field of one (what it spent this period and its last reset are shown, never set)")
        if ("max_tokens" in item) == ("max_cost" in item):
            raise _bad("budgets", "each sets exactly one of max_tokens and max_cost")
        if period in periods:
            raise _bad("budgets", f"the period {period} is given twice")
        periods.add(period)
        if "max_tokens" in item:
            if not is_count(item["max_tokens"]):
                raise _bad("budgets", f"max_tokens must be a whole number from 1 to {COUNT_MAX}")
            out.append({"period": period, "max_tokens": item["max_tokens"]})
        elif not is_cost(item["max_cost"]):
            raise _bad("budgets", "max_cost must be a number above 0 and below 1.8e308")
        else:
            out.append({"period": period, "max_cost": item["max_cost"]})
    return out


def _selectors(value, name):
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MODELS_MAX or not all(
            isinstance(s, str) and 0 < len(s.strip()) <= MODEL_CHARS_MAX for s in value):
        raise _bad(name, f"must be a list of at most {MODELS_MAX} model selectors ('provider/', 'provider/model', "
                         f"a model or alias) of at most {MODEL_CHARS_MAX} characters")
    return [s.strip() for s in value]


def _optional_text(body, name, limit):
    value = body[name]
    if value is not None and (not isinstance(value, str) or len(value) > limit or "\x00" in value):
        raise _bad(name, f"must be a string of at most {limit} characters (no NUL), or null")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

