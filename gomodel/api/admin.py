"""The operator's API under C{/admin/api/v1/}: what the gateway's providers and replicas are doing.

Every route needs the gateway's master key (the front checks it for every
path but C{/health}). Names follow GoModel's admin API where it has them.
"""

import io
from datetime import timedelta, timezone

from klein import Klein

from gomodel.api.fields import user_path
from gomodel.api.self_usage import usage_fields
from gomodel.api.status import providers_status
from gomodel.api.windows import DAY, day, local, seconds_of, time_zone, window
from gomodel.errors import InvalidRequest, NotFound, shown
from gomodel.http.bodies import json_answer, json_body, mounted, query_arg, query_int, query_limit
from gomodel.http.context import CLIENT_GONE, ERROR, OK, REFUSED, STREAM_BROKEN
from gomodel.http.render import install as install_error_handlers
from gomodel.store.codec import ERROR_SPLIT
from gomodel.store.records import USAGE_FIELDS, USAGE_TOTALS

# usage/timeseries windows: (bucket seconds, buckets)
TIMESERIES = {"hour": (60.0, 60), "day": (3600.0, 24), "month": (DAY, 30)}
# The largest usage/log cursor (a record's id): a BIGINT's, past which SQLite fails and PostgreSQL finds none.
CURSOR_MAX = 2**63 - 1
# usage/log's filters given as text (C{status}: a number).
TEXT_FILTERS = ("model", "provider", "search", "key", "user_path")
OUTCOMES = (OK, ERROR, CLIENT_GONE, STREAM_BROKEN, REFUSED)  # a usage record's outcome (the C{outcome} filter's values)
# The store's buckets that days of a zone other than UTC are folded from: every zone's offset is whole quarters
# of an hour (Asia/Kathmandu's +05:45).
QUARTER = 900
# usage/summary's CSV columns: the totals, their errors by kind after them (the totals' C{refused} among them).
_AT = USAGE_TOTALS.index("errors") + 1
SUMMARY_COLUMNS = USAGE_TOTALS[:_AT] + ERROR_SPLIT + tuple(name for name in USAGE_TOTALS[_AT:] if name != "refused")
# What a spreadsheet reads as the start of a formula at the start of a cell (OWASP's CSV injection list).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class AdminAPI:
    """C{GET providers/status}, C{POST runtime/refresh}, C{GET models} and C{GET usage/*}, mounted by
    L{gomodel.api.app.GatewayApp}."""

    app = Klein()
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False  # a doubled slash is a 404, never a redirect (before any route)

    def __init__(self, registry, monitor, clock, usage=None, *, keys=None, budgets=None):
        """
        @param registry: the L{gomodel.routing.registry.ModelRegistry} (its providers' pools).
        @param monitor: the L{gomodel.routing.health.ReplicaMonitor}.
        @param usage: the L{gomodel.store.interfaces.IUsageStore}, or None (C{USAGE_ENABLED=false}).
        @param keys: the L{gomodel.api.key_routes.KeysAPI} mounted at C{auth-keys} (made at the first request for it:
            L{gomodel.api.lazy.LazyAPI}).
        @param budgets: an API mounted at C{budgets} (see L{gomodel.api.budgets}), or None
            (C{BUDGETS_ENABLED=false}).
        """
        self._registry = registry
        self._monitor = monitor
        self._clock = clock
        self._usage = usage
        self._keys = keys
        self._budgets = budgets

    @app.route("/auth-keys", branch=True)
    def auth_keys(self, request):
        return mounted(self._keys, request)

    @app.route("/budgets", branch=True)
    def budgets(self, request):
        if self._budgets is None:  # (as the usage routes say USAGE_ENABLED=false, not "Unknown route")
            raise NotFound("Budgets are off (BUDGETS_ENABLED=false).", code="budgets_disabled")
        return mounted(self._budgets, request)

    @app.route("/budgets//<path:rest>", endpoint="budgets_encoded")
    def budgets_encoded(self, request, rest):
        """GoModel's C{/budgets/{user_path}/{period}} with the user path URL-encoded, its leading C{/} too
        (C{%2Fteam%2Falpha}): werkzeug reads C{/budgets//team/alpha/...}, which the branch above does not
        match. The budgets API gets the rest as C{/budgets/team/alpha/...}. A doubled slash sent as such stays a
        404."""
        if request.path.partition(b"/budgets/")[2][:3].lower() != b"%2f":
            raise NotFound(f"Unknown route: {request.method.decode()} {request.path.decode()}.")
        request.postpath = [segment.encode("utf-8") for segment in rest.split("/")]
        return self.budgets(request)

    @app.route("/providers/status", methods=["GET"])
    def providers_status(self, request):
        return providers_status(self._registry, self._clock, request)

    @app.route("/models", methods=["GET"])
    def models(self, request):
        """What is routable: every model with its provider's type and name (virtual models included); a
        provider's models carry GoModel's inventory fields too (C{provider_type}, C{selector}, C{model}: the
        upstream's model object under its own id, C{access}: every model is enabled here)."""
        data = []
        for pool in self._registry.providers:
            ready = sum(1 for r in pool.replicas if r.ready)
            prefix = len(pool.name) + 1
            data.extend({"id": name, "provider": pool.type, "provider_name": pool.name, "ready_replicas": ready,
                         "provider_type": pool.type, "selector": name, "model": dict(model, id=name[prefix:]),
                         "access": {"selector": name, "default_enabled": True, "effective_enabled": True}}
                        for name, model in self._registry.provider_models(pool))
        # (a virtual model's targets say where it goes; told apart by the registry, not by its owned_by, which
        # a provider named "gomodel" shares)
        data.extend({"id": model["id"], "provider": "virtual", "provider_name": None, "targets": model["targets"]}
                    for model in self._registry.virtual_models())
        return json_answer(request, {"object": "list", "data": data})

    @app.route("/runtime/refresh", methods=["POST"])
    def refresh(self, request):
        """Re-read every replica's models now; the answer does not wait for them. It takes no field: a body with
        one is a 400 naming it, nothing refreshed."""
        body = json_body(request) if request.content.seek(0, 2) else {}
        if body:
            field = shown(sorted(body)[0])
            raise InvalidRequest(f"'{field}' is not a field of a refresh: it re-reads every replica's models and "
                                 "takes none.", param=field, code="invalid_value")
        self._monitor.refresh()
        return json_answer(request, {"status": "refreshing"})

    # -- usage -----------------------------------------------------------------------------

    @app.route("/usage/summary", methods=["GET"])
    async def usage_summary(self, request):
        """Totals for a window (C{start_date}/C{end_date}, or C{days}, default 30); every usage view takes
        the log's filters (L{_filters}), and counts the days of the zone GoModel's C{X-GoModel-Timezone}
        names (UTC without it); C{format=csv}: one row, the window's C{start} and C{end} days and the totals.
        Its C{errors} are split by kind as the time series' are (L{ERROR_SPLIT}: C{server_errors}, ...)."""
        zone = time_zone(request)
        start, end = window(request, self._clock, zone=zone)
        wants_csv = _wants_csv(request)
        summary = await self._usage_store().summary(start, end, _filters(request))
        if wants_csv:
            return _csv(request, [dict(summary, start=day(start, zone), end=day(end - 1, zone))],
                        ("start", "end") + SUMMARY_COLUMNS)
        return json_answer(request, dict(summary, **usage_fields(summary), start=day(start, zone),
                                         end=day(end - 1, zone)))

    @app.route("/usage/daily", methods=["GET"])
    async def usage_daily(self, request):
        """Totals per UTC day of a window; C{interval=hour} per hour, GoModel's C{weekly} (ISO weeks,
        C{2026-W49}), C{monthly} (C{2026-12}) and C{yearly} (C{2026}) per calendar period (C{daily} is C{day});
        each row's C{period} is also GoModel's C{date}; C{format=csv}. In a zone other than UTC
        (C{X-GoModel-Timezone}) the periods are that zone's, folded from quarter hours."""
        zone = time_zone(request)
        start, end = window(request, self._clock, zone=zone)
        wants_csv = _wants_csv(request)
        interval = query_arg(request, b"interval", "day")
        label = _INTERVALS.get(interval)
        if label is None:
            raise InvalidRequest("interval must be one of: hour, day (daily), weekly, monthly, yearly.",
                                 param="interval", code="invalid_value")
        bucket = QUARTER if zone is not timezone.utc else 3600 if interval == "hour" else DAY
        rows = await self._usage_store().grouped(start, end, bucket=bucket, filters=_filters(request))
        rows = _folded(rows, label, zone)
        if not wants_csv:
            for row in rows:
                row["date"] = row["period"]
        return _rows(request, wants_csv, rows, ("period",))

    @app.route("/usage/models", methods=["GET"])
    async def usage_models(self, request):
        """Totals per provider and model of a window; C{format=csv}."""
        return await self._grouped(request, ("provider", "provider_name", "model"))

    @app.route("/usage/providers", methods=["GET"])
    async def usage_providers(self, request):
        """Totals per provider (its type and name) of a window; C{format=csv}."""
        return await self._grouped(request, ("provider", "provider_name"))

    @app.route("/usage/keys", methods=["GET"])
    async def usage_keys(self, request):
        """Totals per managed key (C{auth_key_id}; null: the master key's) of a window; C{format=csv}."""
        return await self._grouped(request, ("auth_key_id",))

    @app.route("/usage/user-paths", methods=["GET"])
    async def usage_user_paths(self, request):
        """Totals per user path of a window; C{format=csv}."""
        return await self._grouped(request, ("user_path",))

    async def _grouped(self, request, by):
        """The totals of a window grouped C{by} those columns, as L{_rows} answers them."""
        start, end = window(request, self._clock, zone=time_zone(request))
        wants_csv = _wants_csv(request)  # (a bad format is refused before the query runs)
        rows = await self._usage_store().grouped(start, end, by=by, filters=_filters(request))
        return _rows(request, wants_csv, rows, by)

    @app.route("/usage/timeseries", methods=["GET"])
    async def usage_timeseries(self, request):
        """Per-bucket totals and p50/p95 latency and time to first token of the last hour (per minute),
        day (per hour) or 30 days (per day): C{window=hour|day|month}; C{summary} is the whole window's. The
        hours and days are those of the zone C{X-GoModel-Timezone} names (UTC without it), its times written
        with its offset (a day daylight saving time made 23 or 25 hours long is one bucket); C{format=csv}: the
        buckets (C{data}), a row each."""
        window = query_arg(request, b"window", "hour")
        if window not in TIMESERIES:
            raise InvalidRequest("window must be hour, day or month.", param="window", code="invalid_window")
        wants_csv = _wants_csv(request)
        zone = time_zone(request)
        bucket, count = TIMESERIES[window]
        edges = _edges(self._clock.seconds(), bucket, count, zone)  # the current bucket is the last one
        start, end = edges[0], edges[-1]
        store, filters, found = self._usage_store(), _filters(request), {}
        for run_start, run_end, length in _runs(edges):
            found.update((row["period"], row) for row in await store.timeseries(run_start, run_end, length, filters))
        data = [dict(found.get(period) or _empty_bucket(period), period=_iso(period, zone)) for period in edges[:-1]]
        if wants_csv:
            return _csv(request, data, tuple(_empty_bucket(None)))
        whole = await store.timeseries(start, end, end - start, filters)
        summary = whole[0] if whole else _empty_bucket(start)
        del summary["period"]
        return json_answer(request, {"object": "usage.timeseries", "window": window, "bucket_seconds": int(bucket),
                                     "start": _iso(start, zone), "end": _iso(end, zone), "summary": summary,
                                     "data": data})

    @app.route("/usage/log", methods=["GET"])
    async def usage_log(self, request):
        """Records, newest first: C{limit}, C{after} (the previous page's C{next}; L{_log_cursor}) or GoModel's
        C{offset} (its answer: GoModel's C{entries}, C{total}, C{limit} and C{offset} too), filters (L{_filters});
        C{format=csv}: the same page, its C{has_more} and C{next} in the headers C{X-Has-More} and C{X-Next}."""
        start, end = window(request, self._clock, zone=time_zone(request))
        wants_csv = _wants_csv(request)
        filters = _filters(request)
        after = _log_cursor(request)
        offset = query_int(request, b"offset", 0, CURSOR_MAX, message="offset must be a whole number, 0 or more.")
        limit, store = query_limit(request, 100, 1000), self._usage_store()
        records, cursor = await store.log(start, end, limit, after, filters, offset or 0)
        for record in records:
            record["timestamp"] = _iso(record["timestamp"])
        if wants_csv:
            request.setHeader(b"x-has-more", b"false" if cursor is None else b"true")
            if cursor is not None:
                request.setHeader(b"x-next", b"%d" % cursor)
            return _csv(request, records, ("id",) + USAGE_FIELDS)
        answer = {"object": "list", "data": records, "next": cursor, "has_more": cursor is not None}
        if offset is not None:  # GoModel's page: its records again as entries, and how many match (a count)
            total = (await store.summary(start, end, filters))["requests"]
            answer.update(entries=records, total=total, limit=limit, offset=offset)
        return json_answer(request, answer)

    def _usage_store(self):
        if self._usage is None:
            raise NotFound("The usage ledger is off (USAGE_ENABLED=false).", code="usage_disabled")
        return self._usage


def _log_cursor(request):
    """The usage log's C{after}, or C{cursor} by that name (the operate issue's word for it), or None.

    @raise InvalidRequest: a 400 naming the one that no page's C{next} can be, or C{cursor} when both are given.
    """
    message = "{} must be the 'next' of a previous page."
    after = query_int(request, b"after", 0, CURSOR_MAX, message=message.format("after"))
    cursor = query_int(request, b"cursor", 0, CURSOR_MAX, message=message.format("cursor"))
    if cursor is None:
        return after
    if after is not None:
        raise InvalidRequest("Give the previous page's 'next' once, as after or as cursor.", param="cursor",
                             code="invalid_value")
    return cursor


def _filters(request) -> dict:
    """The usage filters of C{request}'s query (L{gomodel.store.interfaces.IUsageStore.log}'s): C{model},
    C{provider}, C{status}, C{outcome} (one of L{OUTCOMES}), C{search} (in the request id, model or provider), C{key} (C{master}: the master
    key's records), C{user_path} (that path and those under it).

    @raise InvalidRequest: a C{status} or C{outcome} that is not one, a malformed C{user_path}.
    """
    filters = {name: query_arg(request, name.encode()) for name in TEXT_FILTERS}
    filters = {name: value for name, value in filters.items() if value is not None}
    if filters.get("key") == "master":  # (recorded without a key id, as a managed key's requests are not)
        del filters["key"]
        filters["keyless"] = True
    if "user_path" in filters:  # (as keys have it: "team/" is /team, whose own records it holds too)
        filters["user_path"] = user_path(filters["user_path"])
    status = query_int(request, b"status", 100, 599, message="status must be an HTTP status code (100 to 599).")
    if status is not None:
        filters["status"] = status
    outcome = query_arg(request, b"outcome")
    if outcome is not None:
        if outcome not in OUTCOMES:
            raise InvalidRequest(f"outcome must be one of: {', '.join(OUTCOMES)}.", param="outcome",
                                 code="invalid_value")
        filters["outcome"] = outcome
    return filters


def _empty_bucket(period) -> dict:
    return {"period": period, "requests": 0, "input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "errors": 0,
            "client_errors": 0, "server_errors": 0, "client_gone": 0, "stream_broken": 0, "refused": 0,
            "duration_ms_p50": None, "duration_ms_p95": None, "ttft_ms_p50": None, "ttft_ms_p95": None}


def _iso(seconds, zone=timezone.utc) -> str:
    """C{seconds} as ISO 8601 in C{zone}, to the millisecond (C{Z} for UTC's offset, else the zone's)."""
    return local(seconds, zone).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _edges(now, bucket, count, zone) -> list:
    """The C{count + 1} edges of C{count} buckets of a timeseries window ending with the one holding C{now}:
    minutes and hours of C{zone}'s offset now, or (C{bucket} a day) C{zone}'s days."""
    if bucket == DAY:
        today = local(now, zone).date()
        return [seconds_of(today - timedelta(days=back), zone) for back in range(count - 1, -1, -1)] + [
            seconds_of(today, zone, following=True)]
    offset = local(now, zone).utcoffset().total_seconds()
    end = ((now + offset) // bucket + 1) * bucket - offset
    return [end - back * bucket for back in range(count, -1, -1)]


def _runs(edges) -> list:
    """C{[start, end, length]} of each run of buckets of one length between C{edges} (one run, unless daylight
    saving time made a day 23 or 25 hours long: then it is a run of its own): a store query each."""
    runs = []
    for start, end in zip(edges, edges[1:]):
        if runs and runs[-1][2] == end - start:
            runs[-1][1] = end
        else:
            runs.append([start, end, end - start])
    return runs


def _wants_csv(request) -> bool:
    """Whether C{format} is C{csv} (absent or C{json}: JSON; empty, C{format=}, is no format: refused)."""
    answer = query_arg(request, b"format", "json") if request.args.get(b"format") != [b""] else ""
    if answer not in ("json", "csv"):
        raise InvalidRequest("format must be json or csv.", param="format", code="invalid_value")
    return answer == "csv"


def _hour(seconds, zone) -> str:
    """The start of the hour of C{zone} holding C{seconds}, ISO 8601 (C{Z} in UTC, else the zone's offset)."""
    start = local(seconds, zone).replace(minute=0, second=0, microsecond=0)
    return start.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _week(seconds, zone) -> str:
    year, week, _ = local(seconds, zone).isocalendar()
    return f"{year}-W{week:02d}"


def _month(seconds, zone) -> str:
    return day(seconds, zone)[:7]


def _year(seconds, zone) -> str:
    return day(seconds, zone)[:4]


# C{interval} -> the label of a row's bucket in a zone (in UTC, hours and days are the store's buckets; longer
# periods, and every period of another zone, are folded from them).
_INTERVALS = {"hour": _hour, "day": day, "daily": day, "week": _week, "weekly": _week,
              "month": _month, "monthly": _month, "year": _year, "yearly": _year}


def _folded(rows, label, zone) -> list:
    """The store's per-bucket C{rows} (oldest first) summed per C{label} of their start in C{zone} (a cost of
    None, no prices, stays None unless a row in the period has one)."""
    folded = {}
    for row in rows:
        name = label(row.pop("period"), zone)
        into = folded.get(name)
        if into is None:
            folded[name] = dict(period=name, **row)
            continue
        for field in USAGE_TOTALS:
            if row[field] is not None:
                into[field] = row[field] if into[field] is None else into[field] + row[field]
    return list(folded.values())


def _rows(request, wants_csv, rows, keys):
    """A grouping's rows (its C{keys}, then the totals) as JSON, or CSV when C{wants_csv} (L{_wants_csv})."""
    if wants_csv:
        return _csv(request, rows, keys + USAGE_TOTALS)
    return json_answer(request, {"object": "list", "data": rows})


def _cell(value):
    """A CSV cell: text a spreadsheet would run as a formula starts with C{'} (OWASP's advice); numbers stay;
    a boolean is C{true} or C{false}, as in JSON."""
    if isinstance(value, str):
        return "'" + value if value.startswith(FORMULA_STARTS) else value
    if value is True or value is False:
        return "true" if value else "false"
    return value


def _csv(request, records, fields) -> bytes:
    """C{records} as RFC 4180 CSV (CRLF lines: a cell holding a line break is quoted), C{fields} in order."""
    import csv  # (here: a process that answers no CSV has neither it nor its C module)

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(fields)
    writer.writerows([_cell(record[name]) for name in fields] for record in records)
    body = out.getvalue().encode("utf-8")
    request.setHeader(b"content-type", b"text/csv; charset=utf-8")
    request.setHeader(b"content-disposition", b'attachment; filename="usage.csv"')
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


install_error_handlers(AdminAPI.app)
