"""L{IUsageStore} on PostgreSQL: one row per request that reached an upstream (and per batch line), from every host."""

import math

import psycopg
from psycopg.rows import dict_row
from twisted.internet.defer import Deferred
from zope.interface import implementer

from gomodel.errors import RowsRejected
from gomodel.store.codec import (ERROR_KINDS, LOG_ORDER, OUTCOME, REFUSED_TOTAL, SEARCHED, SUMMARY_KINDS, log_after,
                                 path_range, path_range_clause, series_bucket, spent_many, split_errors, usage_columns,
                                 usage_where)
from gomodel.store.interfaces import IUsageStore
from gomodel.store.postgresql.database import in_batches
from gomodel.store.records import USAGE_FIELDS as COLUMNS, USAGE_TOTALS

# The rows go by binary COPY, each column written as its type in the table (a text column otherwise).
_TYPES = {"timestamp": "float8", "replica": "int4", "status_code": "int4", "stream": "bool", "input_tokens": "int8",
          "output_tokens": "int8", "total_tokens": "int8", "cached_tokens": "int8", "reasoning_tokens": "int8",
          "input_cost": "float8", "output_cost": "float8", "total_cost": "float8", "duration_ms": "float8",
          "ttft_ms": "float8", "client_gone": "bool", "estimated": "bool", "audio_seconds": "float8"}
_COPY_TYPES = [_TYPES.get(name, "text") for name in COLUMNS]
_COPY = f"COPY usage ({', '.join(COLUMNS)}) FROM STDIN (FORMAT BINARY)"
_WRITTEN = "SELECT rows FROM usage_writes WHERE request_id = %s AND timestamp = %s"
_MARK = ("WITH old AS (DELETE FROM usage_writes WHERE written_at < extract(epoch FROM now()) - 86400) "
         "INSERT INTO usage_writes (request_id, timestamp, rows, written_at) "
         "VALUES (%s, %s, %s, extract(epoch FROM now()))")
_BELOW = "(user_path = %s OR starts_with(user_path, %s))"  # a path and everything under it
# The same of usage_days, whose user_path is in the C collation: the range its path index reads (starts_with, whose
# prefix a prepared statement's generic plan does not know, read every day sum of every path: 35-100 ms a budget of a
# path among thousands, every second). A path's own form reads its own day sums instead (usage_path_days).
_DAYS_BELOW = path_range_clause("%s")
# What a budget scope spent since a time: the whole UTC days after it from their sums (a key's in usage_days, a
# path's in usage_path_days: kept by the database, migrations 22 and 23), the rows of the day it falls in (a
# reset's, a period of seconds') from the rows, each row in the day floor(timestamp / 86400) in both. Formatted with
# the scope's clause of the rows, its table of day sums and clause there and, for the keys, their grouping.
_SPENT = ("SELECT {key}COALESCE(SUM(total_tokens), 0)::bigint, COALESCE(SUM(total_cost), 0) FROM ("
          "SELECT {key}total_tokens, total_cost FROM usage WHERE timestamp >= %s AND timestamp < %s "
          "AND floor(timestamp / 86400) < %s AND {where} UNION ALL "
          "SELECT {key}total_tokens, total_cost FROM {table} WHERE day >= %s AND {days}) AS t{group}")
_DAY = 86400
# The log's search: the request id, the model or the provider (type or name) holding the text, in any case.
_SEARCH = "(" + " OR ".join(f"{column} ILIKE %s ESCAPE '\\'" for column in SEARCHED) + ")"
_FILTERS = {"model": "model = %s", "provider": "(provider = %s OR provider_name = %s)", "status": "status_code = %s",
            "outcome": f"{OUTCOME} = %s",
            "search": _SEARCH, "key": "auth_key_id = %s", "keyless": "auth_key_id IS NULL", "user_path": _BELOW}
_GROUPS = {"provider": "provider", "provider_name": "provider_name", "model": "model", "auth_key_id": "auth_key_id",
           "user_path": "user_path"}
# Sums of BIGINT columns are NUMERIC in PostgreSQL: cast back to integers.
_TOTALS = ("COUNT(*), COALESCE(SUM(input_tokens), 0)::bigint, COALESCE(SUM(output_tokens), 0)::bigint, "
           "COALESCE(SUM(total_tokens), 0)::bigint, COALESCE(SUM(cached_tokens), 0)::bigint, "
           "COALESCE(SUM(reasoning_tokens), 0)::bigint, SUM(total_cost), "
           f"COUNT(*) FILTER (WHERE {OUTCOME} <> 'ok'), {REFUSED_TOTAL}, SUM(input_cost), SUM(output_cost), "
           "COALESCE(SUM(audio_seconds), 0)")  # (the costs: None unpriced)


# The time series: a record's bucket is floor((timestamp - start) / bucket); the percentiles are picked in
# the database by rank (row_number over each bucket's sorted values): ceil(n / 2) = (n + 1) / 2 and
# ceil(0.95 n) = (95 n + 99) / 100 (the same statements as SQLite's, with PostgreSQL's casts).
_BUCKETED = "SELECT floor((timestamp - %s) / %s) AS k, {columns} FROM usage WHERE {where}"
_SERIES = ("SELECT k, COUNT(*), COALESCE(SUM(input_tokens), 0)::bigint, COALESCE(SUM(output_tokens), 0)::bigint, "
           f"COALESCE(SUM(total_tokens), 0)::bigint, COUNT(*) FILTER (WHERE outcome <> 'ok'), {ERROR_KINDS} FROM ("
           + _BUCKETED.format(columns=f"input_tokens, output_tokens, total_tokens, status_code, {OUTCOME} AS outcome",
                              where="{where}")
           + ") AS t GROUP BY k ORDER BY k")
# A column's percentiles are of the records that have it, a time to first token's of streams alone (a whole
# answer's first byte is its end; records kept before the ledger kept it for streams only have one).
_ONLY = {"ttft_ms": " AND stream"}
_PERCENTILES = ("SELECT k, rn, n, v FROM (SELECT k, v, row_number() OVER (PARTITION BY k ORDER BY v) AS rn, "
                "COUNT(*) OVER (PARTITION BY k) AS n FROM ("
                + _BUCKETED.format(columns="{column} AS v", where="{where}")
                + " AND {column} IS NOT NULL{only}) AS t) AS r "
                "WHERE rn = (n + 1) / 2 OR rn = (95 * n + 99) / 100")


@implementer(IUsageStore)
class PostgreSQLUsageStore:
    """Usage records in the C{usage} table."""

    def __init__(self, db):
        self._db = db

    def add(self, rows):
        return self._db.run(self._add, rows)

    @staticmethod
    def _add(conn, rows):
        if not rows:
            return 0
        # COPY, not executemany: the rows go as one stream, written by psycopg's C code. executemany's
        # statement per row cost the database threads about 35 us of CPU per request under load, COPY
        # 5-7 (bench/results/2026-12-04-session38.md). Binary, with each column's type given: a row
        # costs less than half the CPU of text COPY's (no number written as text), and that CPU is the
        # interpreter lock the reactor's thread waits for while a flush runs (its requests' p99).
        # The flags are rows' 0 and 1: psycopg's binary bool takes any value by its truth.
        #
        # Each write leaves a mark in its transaction: its first row's (request_id, timestamp) and how many
        # rows it wrote. A write whose commit went through but whose answer was lost (the connection broke)
        # is tried again by the ledger with the same rows first (and newer ones after them): those its mark
        # counts are not written twice. Marks older than a day are dropped as they are made.
        count = len(rows)
        try:
            with conn.transaction(), conn.cursor() as cursor:
                done = cursor.execute(_WRITTEN, rows[0][:2]).fetchone()
                if done is not None:
                    rows = rows[done[0]:]
                    if not rows:
                        return count
                with cursor.copy(_COPY) as copy:
                    copy.set_types(_COPY_TYPES)
                    for row in rows:
                        copy.write_row(row)
                cursor.execute(_MARK, (rows[0][0], rows[0][1], len(rows)))
        except (psycopg.DataError, psycopg.IntegrityError, OverflowError, UnicodeEncodeError) as e:  # a value
            raise RowsRejected(str(e)) from e
        return count

    def summary(self, start, end, filters=None):
        return self._db.run(self._summary, start, end, dict(filters or {}))

    @staticmethod
    def _summary(conn, start, end, filters):
        where, args = _where(start, end, filters)
        row = conn.execute(f"SELECT {_TOTALS}, {SUMMARY_KINDS} FROM usage WHERE {' AND '.join(where)}",
                           args).fetchone()
        return split_errors(_totals(row), *row[len(USAGE_TOTALS):])

    def grouped(self, start, end, by=(), bucket=None, filters=None):
        return self._db.run(self._grouped, start, end, tuple(by), bucket, dict(filters or {}))

    @staticmethod
    def _grouped(conn, start, end, by, bucket, filters):
        keys = [_GROUPS[name] for name in by]
        if bucket is not None:
            keys.insert(0, f"(floor(timestamp / {float(bucket)!r}) * {int(bucket)})::bigint")
        select = "".join(f"{key}, " for key in keys)
        # (NULLS FIRST: the master key's and pathless rows first, as SQLite orders them)
        group = f" GROUP BY {', '.join(keys)} ORDER BY {', '.join(k + ' NULLS FIRST' for k in keys)}" if keys else ""
        where, args = _where(start, end, filters)
        rows = conn.execute(f"SELECT {select}{_TOTALS} FROM usage WHERE {' AND '.join(where)}{group}", args).fetchall()
        names = (["period"] if bucket is not None else []) + list(by)
        return [dict(zip(names, row[:len(keys)]), **_totals(row[len(keys):])) for row in rows]

    def log(self, start, end, limit, before=None, filters=None, offset=0):
        return self._db.run(self._log, start, end, limit, before, dict(filters or {}), offset)

    @staticmethod
    def _log(conn, start, end, limit, before, filters, offset):
        where, args = _where(start, end, filters)
        if before is not None:
            clause, more = log_after(before, "%s")
            where.append(clause)
            args += more
        rows = conn.cursor(row_factory=dict_row).execute(
            f"SELECT id, {usage_columns(COLUMNS)} FROM usage WHERE {' AND '.join(where)} "
            f"{LOG_ORDER} LIMIT %s OFFSET %s",
            (*args, limit + 1, offset)).fetchall()
        records = rows[:limit]
        return records, (records[-1]["id"] if len(rows) > limit else None)

    def timeseries(self, start, end, bucket, filters=None):
        return self._db.run(self._timeseries, float(start), float(end), float(bucket), dict(filters or {}))

    @staticmethod
    def _timeseries(conn, start, end, bucket, filters):
        where, args = _where(start, end, filters)
        clauses = " AND ".join(where)
        window, series = (start, bucket, *args), _SERIES.format(where=clauses)
        buckets = {}
        for k, *totals in conn.execute(series, window).fetchall():
            buckets[int(k)] = series_bucket(start + int(k) * bucket, *totals)
        for column in ("duration_ms", "ttft_ms"):
            percentiles = _PERCENTILES.format(column=column, where=clauses, only=_ONLY.get(column, ""))
            for k, rank, n, value in conn.execute(percentiles, window).fetchall():
                row = buckets[int(k)]
                if rank == (n + 1) // 2:
                    row[f"{column}_p50"] = value
                if rank == (95 * n + 99) // 100:
                    row[f"{column}_p95"] = value
        return [buckets[k] for k in sorted(buckets)]

    def spent(self, scope, since):
        return self._db.run(self._spent, scope, since)

    @staticmethod
    def _spent(conn, scope, since):
        kind, _, name = scope.partition(":")
        table, days, days_args = "usage_path_days", "path = %s", [name]  # (a path's, however many are below it)
        if kind == "key":
            where, args = "auth_key_id = %s", [name]
            table, days = "usage_days", where
        elif kind == "path" and name == "/":  # (every path, and the managed keys without one: see IUsageStore)
            where, args = "(user_path IS NOT NULL OR auth_key_id IS NOT NULL)", []
        elif kind == "path":
            where, args = _BELOW, _below(name)
            if not name or name.endswith("/"):  # (not a path's own form: /a/ is /a's children, not /a's sums)
                table, days, days_args = "usage_days", _DAYS_BELOW, path_range(name)
        else:
            return 0, 0.0
        row = conn.execute(_SPENT.format(key="", where=where, table=table, days=days, group=""),
                           _spent_args(since, args, days_args)).fetchone()
        return row[0], row[1]

    def spent_many(self, pairs):
        return self._db.run(lambda conn: spent_many(list(pairs), lambda scope, since: self._spent(conn, scope, since),
                                                     lambda ids, since: self._keys_spent(conn, ids, since)))

    @staticmethod
    def _keys_spent(conn, ids, since) -> dict:
        return {row[0]: (row[1], row[2]) for row in conn.execute(
            _SPENT.format(key="auth_key_id, ", where="auth_key_id = ANY(%s)", table="usage_days",
                          days="auth_key_id = ANY(%s)", group=" GROUP BY auth_key_id"),
            _spent_args(since, [ids], [ids]))}

    def delete_before(self, timestamp):
        return Deferred.fromCoroutine(in_batches(self._db.run, self._delete_batch, timestamp))

    @staticmethod
    def _delete_batch(conn, timestamp, most):
        return conn.execute("DELETE FROM usage WHERE id IN (SELECT id FROM usage WHERE timestamp < %s LIMIT %s)",
                            (timestamp, most)).rowcount


def _where(start, end, filters):
    """The C{WHERE} clauses and their arguments of a window and C{filters} (L{IUsageStore.log}'s)."""
    return usage_where(start, end, filters, _FILTERS, "%s", _below)


def _spent_args(since, args, days_args) -> tuple:
    """C{_SPENT}'s arguments: the rows from C{since} to the end of its day, of C{args}' scope, the days' sums after,
    of C{days_args}'."""
    day = math.ceil(since / _DAY)
    return (since, day * _DAY, day, *args, day, *days_args)


def _below(path) -> list:
    """The arguments of the C{user_path} clause: the path and everything under it."""
    return [path, path.rstrip("/") + "/"]


def _totals(row) -> dict:
    return dict(zip(USAGE_TOTALS, row))
