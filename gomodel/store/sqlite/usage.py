"""L{IUsageStore} on SQLite: one row per request that reached an upstream (and per batch line), written by the
store's writer process (L{gomodel.store.sqlite.writer}), read in the store's thread."""

from collections import OrderedDict

from zope.interface import implementer

from gomodel.store.codec import (ERROR_KINDS, LOG_ORDER, OUTCOME, REFUSED_TOTAL, SEARCHED, SUMMARY_KINDS, log_after,
                                 path_range, path_range_clause, series_bucket, spent_many, split_errors, usage_columns,
                                 usage_where)
from gomodel.store.interfaces import IUsageStore
from gomodel.store.records import USAGE_FIELDS as COLUMNS, USAGE_TOTALS

_BOOLEANS = ("stream", "client_gone", "estimated")
_INSERT = f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES"
# The log's search: the request id, the model or the provider (type or name) holding the text, in any case.
_SEARCH = "(" + " OR ".join(f"{column} LIKE ? ESCAPE '\\'" for column in SEARCHED) + ")"
_FILTERS = {"model": "model = ?", "provider": "(provider = ? OR provider_name = ?)", "status": "status_code = ?",
            "outcome": f"{OUTCOME} = ?",
            "search": _SEARCH, "key": "auth_key_id = ?", "keyless": "auth_key_id IS NULL",
            "user_path": path_range_clause("?")}
# The sums of budget scopes read last (L{SQLiteUsageStore.spent}) kept, at most, to read only the rows written since.
SUMS_KEPT = 4096


@implementer(IUsageStore)
class SQLiteUsageStore:
    """Usage records in the C{usage} table."""

    def __init__(self, db, writer):
        """
        @param writer: the L{gomodel.store.sqlite.writer.RowWriter} that adds the rows.
        """
        self._db = db
        self._writer = writer
        # (scope, since) -> (the table's largest id, rows counted, tokens, cost) as last read; store thread only
        self._sums = OrderedDict()

    def add(self, rows):
        # The flags as 0 and 1 (UsageLedger.keep), as sqlite stores them.
        return self._writer.write(_INSERT, rows)

    def summary(self, start, end, filters=None):
        return self._db.run(self._summary, start, end, dict(filters or {}))

    def _summary(self, start, end, filters):
        where, args = _where(start, end, filters)
        row = self._db.conn().execute(f"SELECT {_TOTALS}, {SUMMARY_KINDS} FROM usage WHERE {' AND '.join(where)}",
                                      args).fetchone()
        return split_errors(_totals(row), *row[len(USAGE_TOTALS):])

    def grouped(self, start, end, by=(), bucket=None, filters=None):
        return self._db.run(self._grouped, start, end, tuple(by), bucket, dict(filters or {}))

    def _grouped(self, start, end, by, bucket, filters):
        keys = [_GROUPS[name] for name in by]
        if bucket is not None:
            keys.insert(0, f"CAST(timestamp / {float(bucket)!r} AS INTEGER) * {int(bucket)}")
        select = "".join(f"{key}, " for key in keys)
        group = f" GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}" if keys else ""
        where, args = _where(start, end, filters)
        rows = self._db.conn().execute(f"SELECT {select}{_TOTALS} FROM usage WHERE {' AND '.join(where)}{group}",
                                       args).fetchall()
        names = (["period"] if bucket is not None else []) + list(by)
        return [dict(zip(names, row[:len(keys)]), **_totals(row[len(keys):])) for row in rows]

    def log(self, start, end, limit, before=None, filters=None, offset=0):
        return self._db.run(self._log, start, end, limit, before, dict(filters or {}), offset)

    def _log(self, start, end, limit, before, filters, offset):
        where, args = _where(start, end, filters)
        if before is not None:
            clause, more = log_after(before, "?")
            where.append(clause)
            args += more
        rows = self._db.conn().execute(
            f"SELECT id, {usage_columns(COLUMNS)} FROM usage WHERE {' AND '.join(where)} "
            f"{LOG_ORDER} LIMIT ? OFFSET ?",
            (*args, limit + 1, offset)).fetchall()
        records = [_record(row) for row in rows[:limit]]
        return records, (records[-1]["id"] if len(rows) > limit else None)

    def timeseries(self, start, end, bucket, filters=None):
        return self._db.run(self._timeseries, float(start), float(end), float(bucket), dict(filters or {}))

    def _timeseries(self, start, end, bucket, filters):
        conn = self._db.conn()
        where, args = _where(start, end, filters)
        clauses = " AND ".join(where)
        window, series = (start, bucket, *args), _SERIES.format(where=clauses)
        buckets = {}
        for k, *totals in conn.execute(series, window):
            buckets[int(k)] = series_bucket(start + int(k) * bucket, *totals)
        for column in ("duration_ms", "ttft_ms"):
            percentiles = _PERCENTILES.format(column=column, where=clauses, only=_ONLY.get(column, ""))
            for k, rank, n, value in conn.execute(percentiles, window):
                row = buckets[int(k)]
                if rank == (n + 1) // 2:
                    row[f"{column}_p50"] = value
                if rank == (95 * n + 99) // 100:
                    row[f"{column}_p95"] = value
        return [buckets[k] for k in sorted(buckets)]

    def spent(self, scope, since):
        return self._db.run(self._spent, scope, since)

    def _spent(self, scope, since):
        """A scope's sum, read again (a budget's, every second: BudgetBook.follow) from the rows written since its
        last read. A row's id is the largest so far plus one (rows go only by their timestamp, days old), so those
        are the ids above the largest that read saw: read through the ids where there are fewer of them than
        rows of the scope, else by the scope's index, as a first read is."""
        kind, _, name = scope.partition(":")
        if kind == "key":
            where, args = "auth_key_id = ?", [name]
        elif kind == "path" and name == "/":  # (every path, and the managed keys without one: see IUsageStore)
            where, args = "(user_path IS NOT NULL OR auth_key_id IS NOT NULL)", []
        elif kind == "path":
            where, args = _FILTERS["user_path"], path_range(name)
        else:
            return 0, 0.0
        conn = self._db.conn()
        last, counted, tokens, cost = self._sums.pop((scope, since), (0, 0, 0, 0))
        table = "usage"
        if last:
            top = conn.execute("SELECT MAX(id) FROM usage").fetchone()[0] or 0
            if top < last:  # the rows deleted down to none, ids given again from 1: read them all
                last, counted, tokens, cost = 0, 0, 0, 0
            elif top - last < counted:
                table = "usage NOT INDEXED"  # (its ids still: a range of them)
        row = conn.execute(
            f"SELECT (SELECT MAX(id) FROM usage), COUNT(*), COALESCE(SUM(total_tokens), 0), "
            f"COALESCE(SUM(total_cost), 0) FROM {table} WHERE id > ? AND timestamp >= ? AND {where}",
            (last, since, *args)).fetchone()
        sums = self._sums[scope, since] = (row[0] or 0, counted + row[1], tokens + row[2], cost + row[3])
        if len(self._sums) > SUMS_KEPT:
            self._sums.popitem(last=False)
        return sums[2], sums[3]

    def spent_many(self, pairs):
        return self._db.run(spent_many, list(pairs), self._spent, self._keys_spent)

    def _keys_spent(self, ids, since) -> dict:
        marks = ", ".join("?" * len(ids))
        return {row[0]: (row[1], row[2]) for row in self._db.conn().execute(
            f"SELECT auth_key_id, COALESCE(SUM(total_tokens), 0), COALESCE(SUM(total_cost), 0) FROM usage "
            f"WHERE timestamp >= ? AND auth_key_id IN ({marks}) GROUP BY auth_key_id", (since, *ids))}

    def delete_before(self, timestamp):
        return self._db.run(self._delete_before, timestamp)

    def _delete_before(self, timestamp):
        self._sums.clear()  # (an id deleted may be given again: the sums are read afresh)
        with self._db.transaction() as conn:
            return conn.execute("DELETE FROM usage WHERE timestamp < ?", (timestamp,)).rowcount


_GROUPS = {"provider": "provider", "provider_name": "provider_name", "model": "model", "auth_key_id": "auth_key_id",
           "user_path": "user_path"}
_TOTALS = ("COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), "
           "COALESCE(SUM(total_tokens), 0), COALESCE(SUM(cached_tokens), 0), COALESCE(SUM(reasoning_tokens), 0), "
           f"SUM(total_cost), COALESCE(SUM(CASE WHEN {OUTCOME} <> 'ok' THEN 1 ELSE 0 END), 0), {REFUSED_TOTAL}, "
           "SUM(input_cost), SUM(output_cost), COALESCE(SUM(audio_seconds), 0)")  # (the costs: None without prices)


# Portable SQL (SQLite and PostgreSQL): a record's bucket is FLOOR((timestamp - start) / bucket); the
# percentiles are picked in the database by rank (ROW_NUMBER over each bucket's sorted values), so only
# two rows a bucket come back: rank ceil(n / 2) = (n + 1) / 2 and ceil(0.95 n) = (95 n + 99) / 100.
_BUCKETED = "SELECT FLOOR((timestamp - ?) / ?) AS k, {columns} FROM usage WHERE {where}"
_SERIES = ("SELECT k, COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), "
           f"COALESCE(SUM(total_tokens), 0), SUM(CASE WHEN outcome <> 'ok' THEN 1 ELSE 0 END), {ERROR_KINDS} FROM ("
           + _BUCKETED.format(columns=f"input_tokens, output_tokens, total_tokens, status_code, {OUTCOME} AS outcome",
                              where="{where}")
           + ") AS t GROUP BY k ORDER BY k")
# A column's percentiles are of the records that have it, a time to first token's of streams alone (a whole
# answer's first byte is its end; records kept before the ledger kept it for streams only have one).
_ONLY = {"ttft_ms": " AND stream"}
_PERCENTILES = ("SELECT k, rn, n, v FROM (SELECT k, v, ROW_NUMBER() OVER (PARTITION BY k ORDER BY v) AS rn, "
                "COUNT(*) OVER (PARTITION BY k) AS n FROM ("
                + _BUCKETED.format(columns="{column} AS v", where="{where}")
                + " AND {column} IS NOT NULL{only}) AS t) AS r "
                "WHERE rn = (n + 1) / 2 OR rn = (95 * n + 99) / 100")


def _where(start, end, filters):
    """The C{WHERE} clauses and their arguments of a window and C{filters} (L{IUsageStore.log}'s)."""
    return usage_where(start, end, filters, _FILTERS, "?", path_range)


def _totals(row) -> dict:
    return dict(zip(USAGE_TOTALS, row))


def _record(row) -> dict:
    record = dict(row)
    for name in _BOOLEANS:
        record[name] = bool(record[name])
    return record
