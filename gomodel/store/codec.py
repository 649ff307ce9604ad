"""How records map to table rows, the same for every backend: JSON-valued columns as text."""

import json

from gomodel import jsonutil

# A stored response's columns, in the order of L{response_row}.
RESPONSE_COLUMNS = ("id, provider, replica, created_at, previous_response_id, status, input_items, response, tenant, "
                    "streamed")
# Those a response written again replaces (not its id, nor who owns it).
_RESPONSE_REPLACED = ("provider", "replica", "created_at", "previous_response_id", "status", "input_items", "response",
                      "streamed")


# The statement that stores responses, before its rows of values, and after them: a response stored
# again replaces the stored one where it is its tenant's (the same tenant, or both none); another tenant's is
# left as it is (an upstream answering one id to two tenants, the master key's chosen C{request_id}).
RESPONSE_INSERT = f"INSERT INTO responses ({RESPONSE_COLUMNS}) VALUES"
RESPONSE_CONFLICT = ("ON CONFLICT (id) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in _RESPONSE_REPLACED)
                     + " WHERE responses.tenant = excluded.tenant OR (responses.tenant IS NULL AND "
                     "excluded.tenant IS NULL)")


def response_upsert(mark: str) -> str:
    """The statement that stores a response (L{response_row}'s values) or replaces the stored one, each
    value written as C{mark}, the driver's placeholder (C{?} for SQLite, C{%s} for psycopg)."""
    return f"{RESPONSE_INSERT} ({', '.join([mark] * 10)}) {RESPONSE_CONFLICT}"


MAX_CHAIN = 1000  # turns followed back through previous_response_id


def _chain(mark: str, where: str = "") -> str:
    """The C{chain (id, depth)} of the ids a response (its id as C{mark}, the driver's placeholder) follows, through
    C{previous_response_id}, nearest first (depth 1), back to the first turn or one not stored (its id the last),
    at most L{MAX_CHAIN}; none unless C{where} (a condition, or "") holds."""
    return ("WITH RECURSIVE chain (id, depth) AS ("
            f"SELECT previous_response_id, 1 FROM responses WHERE id = {mark}{where} "
            "UNION ALL SELECT r.previous_response_id, c.depth + 1 FROM chain c JOIN responses r ON r.id = c.id "
            f"WHERE c.depth < {MAX_CHAIN}) ")


def chain_query(mark: str) -> str:
    """The query reading the stored responses a response follows, nearest first (L{_chain})."""
    columns = ", ".join(f"r.{column.strip()}" for column in RESPONSE_COLUMNS.split(","))
    return _chain(mark) + f"SELECT {columns} FROM chain c JOIN responses r ON r.id = c.id ORDER BY c.depth"


def follows_deleted_query(mark: str) -> str:
    """The query finding whether a response follows one deleted (C{deleted_responses}), L{_chain}: a row where
    it does, none where not. (Every native follow-up asks: no conversation is walked while nothing was deleted.)"""
    return (_chain(mark, " AND EXISTS (SELECT 1 FROM deleted_responses)")
            + "SELECT 1 FROM chain c JOIN deleted_responses d ON d.id = c.id LIMIT 1")


def encode_record(record: dict, columns, json_columns) -> dict:
    """The column values of C{record} (a dict of some of C{columns}), JSON columns as text.

    @raise KeyError: a key of C{record} is not one of C{columns}.
    """
    values = {}
    for key, value in record.items():
        if key not in columns:
            raise KeyError(f"unknown column {key!r}")
        if key in json_columns and value is not None:
            value = json.dumps(value, ensure_ascii=False)
        values[key] = value
    return values


def decode_json(record: dict, json_columns) -> dict:
    """C{record} with its JSON columns parsed (in place); returns it."""
    for key in json_columns:
        if record[key] is not None:
            record[key] = json.loads(record[key])
    return record


def response_row(record) -> tuple:
    """The values of a stored response's row (L{RESPONSE_COLUMNS}), its C{response_json} (the upstream's
    bytes), when given, stored as it is.

    @raise KeyError: C{record} lacks a required field.
    """
    raw = record.get("response_json")
    return (record["id"], record["provider"], record.get("replica"), record["created_at"],
            record.get("previous_response_id"),
            record.get("status"), jsonutil.dumps(record["input_items"]).decode("utf-8"),
            raw.decode("utf-8") if raw is not None else jsonutil.dumps(record["response"]).decode("utf-8"),
            record.get("tenant"), record.get("streamed"))


def like_pattern(text: str) -> str:
    """A C{LIKE ... ESCAPE '\\'} pattern matching the values that hold C{text} as it is (its C{%}, C{_} and
    backslashes too)."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


# The columns the usage log's search looks in (GoModel's: the request id, the model and the provider).
SEARCHED = ("request_id", "model", "provider", "provider_name")
# A usage record's outcome (portable SQL): its column's; for a record written without one (before the column
# existed, or by a gateway of an older version during a rolling upgrade), derived from its status.
OUTCOME = ("COALESCE(outcome, CASE WHEN client_gone THEN 'client_gone' WHEN status_code >= 400 THEN 'error' "
           "ELSE 'ok' END)")


def refused_count(outcome) -> str:
    """The select item counting the rows the gateway's own limits refused (the C{outcome} expression's
    C{refused}); 0 of no rows."""
    return f"COALESCE(SUM(CASE WHEN {outcome} = 'refused' THEN 1 ELSE 0 END), 0)"


def error_kinds(outcome) -> str:
    """The select list counting each kind of error but the server's and the refusals (those are the totals')
    of rows of C{status_code} and the C{outcome} expression: an error answer of 400 to 499, a client that left,
    a broken stream (L{ERROR_SPLIT}'s order, after C{server_errors}); 0 of no rows."""
    return (f"COALESCE(SUM(CASE WHEN {outcome} = 'error' AND status_code >= 400 AND status_code < 500 THEN 1 ELSE 0 "
            f"END), 0), COALESCE(SUM(CASE WHEN {outcome} = 'client_gone' THEN 1 ELSE 0 END), 0), "
            f"COALESCE(SUM(CASE WHEN {outcome} = 'stream_broken' THEN 1 ELSE 0 END), 0)")


# The time series' (of rows whose C{outcome} is L{OUTCOME}'s already: its refusals too) and the summary's (whose
# totals, L{gomodel.store.records.USAGE_TOTALS}, count the refusals: L{REFUSED_TOTAL}).
ERROR_KINDS = error_kinds("outcome") + ", " + refused_count("outcome")
SUMMARY_KINDS, REFUSED_TOTAL = error_kinds(OUTCOME), refused_count(OUTCOME)
# The kinds of a summary's or a bucket's C{errors}, as they are answered.
ERROR_SPLIT = ("server_errors", "client_errors", "client_gone", "stream_broken", "refused")


def split_errors(totals, client_errors, client_gone, stream_broken, refused=None) -> dict:
    """C{totals} (with their C{errors}, and their C{refused} unless given) and the errors by kind
    (L{ERROR_SPLIT}): C{server_errors} are those of no other kind (5xx, an error told inside a 200 stream)."""
    refused = totals["refused"] if refused is None else refused
    return dict(totals, server_errors=totals["errors"] - client_errors - client_gone - stream_broken - refused,
                client_errors=client_errors, client_gone=client_gone, stream_broken=stream_broken, refused=refused)


def series_bucket(period, requests, tokens_in, tokens_out, tokens, errors, client_errors, client_gone,
                  stream_broken, refused) -> dict:
    """A time series bucket of a row of C{_SERIES} (each store's: its totals, its errors and L{ERROR_KINDS}), its
    percentiles None until they are read: C{server_errors} are the errors of no other kind (5xx, an error told
    inside a 200 stream)."""
    return dict(split_errors({"period": period, "requests": requests, "input_tokens": tokens_in,
                              "output_tokens": tokens_out, "total_tokens": tokens, "errors": errors},
                             client_errors, client_gone, stream_broken, refused),
                duration_ms_p50=None, duration_ms_p95=None, ttft_ms_p50=None, ttft_ms_p95=None)


def usage_columns(columns) -> str:
    """The select list of a usage record's C{columns}, its C{outcome} as L{OUTCOME} derives it."""
    return ", ".join(f"{OUTCOME} AS outcome" if column == "outcome" else column for column in columns)


def path_range_clause(mark: str) -> str:
    """The clause of a path and every path under it, its arguments L{path_range}'s, each written as C{mark}: a range
    of a C{user_path} index whose order is the bytes' (SQLite's; PostgreSQL's in the C collation, usage_days'), a
    prepared statement's generic plan included (PostgreSQL's C{starts_with} uses one only with a constant)."""
    return f"(user_path = {mark} OR (user_path >= {mark} AND user_path < {mark}))"


def path_range(path) -> list:
    """L{path_range_clause}'s arguments: C{path}, and the range of those under it (those starting with C{/a/} are
    from C{/a/} to C{/a0}: C{0} follows C{/})."""
    below = path.rstrip("/") + "/"
    return [path, below, below[:-1] + "0"]


def usage_where(start, end, filters, clauses, mark, below):
    """The C{WHERE} clauses and their arguments of a usage window C{[start, end)} and C{filters}
    (L{gomodel.store.interfaces.IUsageStore.log}'s), in one SQL dialect.

    @param clauses: filter name -> its clause, with the dialect's C{mark} for each argument.
    @param mark: the dialect's placeholder (C{?}, C{%s}).
    @param below: C{below(path)}, the arguments of the C{user_path} clause (the path and those under it).
    """
    where, args = [f"timestamp >= {mark}", f"timestamp < {mark}"], [start, end]
    for name, value in filters.items():
        where.append(clauses[name])
        if name == "provider":
            args += [value, value]
        elif name == "user_path":
            args += below(value)
        elif name == "search":
            args += [like_pattern(value)] * len(SEARCHED)
        elif name != "keyless":  # (the master key's, or an open gateway's: no argument)
            args.append(value)
    return where, args


# The usage log's order (L{gomodel.store.interfaces.IUsageStore.log}): newest first by the request's time, whatever
# order the records were written in (a long stream's when it ended, another process's at its flush).
LOG_ORDER = "ORDER BY timestamp DESC, id DESC"


def log_after(before, mark):
    """The C{WHERE} clause and its arguments of the usage log's records after the record C{before} (the previous
    page's cursor, an id) in L{LOG_ORDER}; an id no record has (any number a client sends): those of older ids.

    @param mark: the dialect's placeholder (C{?}, C{%s}).
    """
    cursor = f"(SELECT timestamp FROM usage WHERE id = {mark})"
    return f"(({cursor} IS NULL AND id < {mark}) OR (timestamp, id) < ({cursor}, {mark}))", [before] * 4


# A background response's watch (L{gomodel.store.interfaces.IBackgroundWatches}): its columns as given and
# taken, then who watches it and until when.
WATCH_COLUMNS = ("id", "request_id", "key_id", "user_path", "provider", "replica", "response", "since")


# Key ids per IN list of L{spent_many}'s reads (SQLite's oldest limit of bound values is 999).
SPENT_IDS = 500


def spent_many(pairs, one, keys) -> list:
    """L{gomodel.store.interfaces.IUsageStore.spent_many} in a store's thread: the key scopes of C{pairs} that share
    a C{since} in one C{keys(ids, since)} read (a dict: id -> C{(tokens, cost)}, absent: none), each other scope
    by C{one(scope, since)}."""
    figures, by_since = [None] * len(pairs), {}
    for i, (scope, since) in enumerate(pairs):
        kind, _, name = scope.partition(":")
        if kind == "key":
            by_since.setdefault(since, {}).setdefault(name, []).append(i)
        else:
            figures[i] = one(scope, since)
    for since, places in by_since.items():
        ids = list(places)
        for at in range(0, len(ids), SPENT_IDS):
            found = keys(ids[at:at + SPENT_IDS], since)
            for name in ids[at:at + SPENT_IDS]:
                for i in places[name]:
                    figures[i] = found.get(name, (0, 0.0))
    return figures


def watch_statements(mark: str) -> dict:
    """The statements of L{gomodel.store.interfaces.IBackgroundWatches}, each value written as C{mark}.

    C{adopt}'s outer condition is checked again on the row a concurrent adopter just took (PostgreSQL
    re-reads it once that one commits): a watch is taken by one process.
    """
    columns = ", ".join(WATCH_COLUMNS)
    return {
        "add": f"INSERT INTO background_watches ({columns}, owner, lease_until) "
               f"VALUES ({', '.join([mark] * (len(WATCH_COLUMNS) + 2))}) ON CONFLICT (id) DO NOTHING",
        "renew": f"UPDATE background_watches SET lease_until = {mark} WHERE owner = {mark}",
        "adopt": f"UPDATE background_watches SET owner = {mark}, lease_until = {mark} WHERE lease_until < {mark} "
                 f"AND id IN (SELECT id FROM background_watches WHERE lease_until < {mark} ORDER BY since "
                 f"LIMIT {mark}) RETURNING {columns}",
        "release": f"UPDATE background_watches SET owner = NULL, lease_until = 0 WHERE owner = {mark}",
        "settle": f"DELETE FROM background_watches WHERE id = {mark}",
    }


def watch_row(watch: dict, owner: str, until: float) -> tuple:
    """The values of C{watch_statements()["add"]}."""
    return (*(json.dumps(watch[c], ensure_ascii=False) if c == "response" else watch.get(c) for c in WATCH_COLUMNS),
            owner, until)


def watch_of_row(row) -> dict:
    """A watch from a row of C{WATCH_COLUMNS}."""
    watch = dict(zip(WATCH_COLUMNS, row))
    watch["response"] = json.loads(watch["response"])
    return watch
