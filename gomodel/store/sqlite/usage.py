"""L{IUsageStore} on SQLite: one row per request that reached an upstream (and per batch line)."""

from zope.interface import implementer

from gomodel.store.interfaces import IUsageStore
from gomodel.store.records import USAGE_FIELDS as COLUMNS
_BOOLEANS = ("stream", "client_gone", "estimated")
_INSERT = f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
_FILTERS = {"model": "model = ?", "provider": "(provider = ? OR provider_name = ?)", "status": "status_code = ?",
            "search": "request_id LIKE ?", "key": "auth_key_id = ?",
            "user_path": "(user_path = ? OR substr(user_path, 1, ?) = ?)"}


@implementer(IUsageStore)
class SQLiteUsageStore:
    """Usage records in the C{usage} table."""

    def __init__(self, db):
        self._db = db

    def add(self, rows):
        return self._db.run(self._add, rows)

    def _add(self, rows):
        with self._db.transaction() as conn:
            conn.executemany(_INSERT, rows)  # sqlite stores booleans as 0 and 1
        return len(rows)

    def summary(self, start, end):
        return self._db.run(self._grouped, start, end, (), None).addCallback(
            lambda groups: groups[0] if groups else _totals((0, 0, 0, 0, 0, 0, None, 0)))

    def grouped(self, start, end, by=(), bucket=None):
        return self._db.run(self._grouped, start, end, tuple(by), bucket)

    def _grouped(self, start, end, by, bucket):
        keys = [_GROUPS[name] for name in by]
        if bucket is not None:
            keys.insert(0, f"CAST(timestamp / {float(bucket)!r} AS INTEGER) * {int(bucket)}")
        select = "".join(f"{key}, " for key in keys)
        group = f" GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}" if keys else ""
        rows = self._db.conn().execute(
            f"SELECT {select}{_TOTALS} FROM usage WHERE timestamp >= ? AND timestamp < ?{group}",
            (start, end)).fetchall()
        names = (["period"] if bucket is not None else []) + list(by)
        return [dict(zip(names, row[:len(keys)]), **_totals(row[len(keys):])) for row in rows]

    def log(self, start, end, limit, before=None, filters=None):
        return self._db.run(self._log, start, end, limit, before, dict(filters or {}))

    def _log(self, start, end, limit, before, filters):
        where, args = ["timestamp >= ?", "timestamp < ?"], [start, end]
        if before is not None:
            where.append("id < ?")
            args.append(before)
        for name, value in filters.items():
            where.append(_FILTERS[name])
            if name == "provider":
                args += [value, value]
            elif name == "user_path":  # the path and everything under it
                below = value.rstrip("/") + "/"
                args += [value, len(below), below]
            elif name == "search":
                args.append("%" + value.replace("%", "") + "%")
            else:
                args.append(value)
        rows = self._db.conn().execute(
            f"SELECT id, {', '.join(COLUMNS)} FROM usage WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
            (*args, limit + 1)).fetchall()
        records = [_record(row) for row in rows[:limit]]
        return records, (records[-1]["id"] if len(rows) > limit else None)

    def delete_before(self, timestamp):
        return self._db.run(self._delete_before, timestamp)

    def _delete_before(self, timestamp):
        with self._db.transaction() as conn:
            return conn.execute("DELETE FROM usage WHERE timestamp < ?", (timestamp,)).rowcount


_GROUPS = {"provider": "provider", "provider_name": "provider_name", "model": "model", "auth_key_id": "auth_key_id",
           "user_path": "user_path"}
_TOTALS = ("COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), "
           "COALESCE(SUM(total_tokens), 0), COALESCE(SUM(cached_tokens), 0), COALESCE(SUM(reasoning_tokens), 0), "
           "SUM(total_cost), COALESCE(SUM(CASE WHEN status_code >= 400 THEN 1 ELSE 0 END), 0)")


def _totals(row) -> dict:
    return {"requests": row[0], "input_tokens": row[1], "output_tokens": row[2], "total_tokens": row[3],
            "cached_tokens": row[4], "reasoning_tokens": row[5], "total_cost": row[6], "errors": row[7]}


def _record(row) -> dict:
    record = dict(row)
    for name in _BOOLEANS:
        record[name] = bool(record[name])
    return record
