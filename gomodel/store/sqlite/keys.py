"""L{IKeyStore} and L{IBudgetStore} on SQLite: managed keys (their hashes) and budgets by user path."""

from zope.interface import implementer

from gomodel import jsonutil
from gomodel.store.codec import decode_json
from gomodel.store.interfaces import IBudgetStore, IKeyStore

KEY_COLUMNS = ("id", "hash", "redacted", "name", "description", "user_path", "created_at", "updated_at",
               "expires_at", "deactivated_at", "models", "rpm", "tpm", "max_concurrency", "budgets", "priority",
               "metadata", "own_cache_salt", "budget_resets")
_JSON = ("models", "budgets", "metadata", "budget_resets")
_SELECT = f"SELECT {', '.join(KEY_COLUMNS)} FROM auth_keys"


@implementer(IKeyStore)
class SQLiteKeyStore:
    """Managed keys in the C{auth_keys} table."""

    def __init__(self, db):
        self._db = db

    def add(self, record):
        return self._db.run(self._add, dict(record, updated_at=self._db.now()))

    def _add(self, record):
        with self._db.transaction() as conn:
            record["updated_at"] = _after_newest(conn, record["updated_at"])
            values = [_column(name, record.get(name)) for name in KEY_COLUMNS]
            conn.execute(f"INSERT INTO auth_keys ({', '.join(KEY_COLUMNS)}) VALUES ({', '.join('?' * len(values))})",
                         values)
        return self._get(record["id"])

    def get(self, key_id):
        return self._db.run(self._get, key_id)

    def _get(self, key_id):
        row = self._db.conn().execute(f"{_SELECT} WHERE id = ?", (key_id,)).fetchone()
        return _record(row) if row is not None else None

    def list(self):
        return self._db.run(lambda: [_record(r) for r in self._db.conn().execute(f"{_SELECT} ORDER BY seq")])

    def page(self, after=None, limit=None):
        return self._db.run(self._page, after, limit)

    def _page(self, after, limit):
        conn = self._db.conn()
        where, args = "", []
        if after is not None:
            row = conn.execute("SELECT seq FROM auth_keys WHERE id = ?", (after,)).fetchone()
            if row is None:
                return None
            where, args = " WHERE seq > ?", [row[0]]
        tail = "" if limit is None else f" LIMIT {int(limit) + 1}"  # (one more: whether there are more)
        records = [_record(r) for r in conn.execute(f"{_SELECT}{where} ORDER BY seq{tail}", args)]
        return (records, False) if limit is None or len(records) <= limit else (records[:limit], True)

    def update(self, key_id, changes):
        return self._db.run(self._update, key_id, dict(changes), self._db.now())

    def _update(self, key_id, changes, now):
        with self._db.transaction() as conn:
            updated = _write(conn, key_id, changes, now)
        return self._get(key_id) if updated else None

    def edit(self, key_id, change):
        return self._db.run(self._edit, key_id, change, self._db.now())

    def _edit(self, key_id, change, now):
        with self._db.transaction() as conn:  # (BEGIN IMMEDIATE: no other writer between the read and the write)
            row = conn.execute(f"{_SELECT} WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                return None
            _write(conn, key_id, dict(change(_record(row))), now)
        return self._get(key_id)

    def deactivate(self, key_id, at):
        return self._db.run(self._deactivate, key_id, at, self._db.now())

    def _deactivate(self, key_id, at, now):
        with self._db.transaction() as conn:  # (the stamp read and the write in one: an active key's, else none)
            conn.execute("UPDATE auth_keys SET deactivated_at = ?, updated_at = ? WHERE id = ? "
                         "AND deactivated_at IS NULL", (at, _after_newest(conn, now), key_id))
        return self._get(key_id)

    def changed_since(self, updated_at):
        return self._db.run(lambda: [_record(r) for r in self._db.conn().execute(
            f"{_SELECT} WHERE updated_at > ? ORDER BY updated_at", (updated_at,))])


def _after_newest(conn, now) -> float:
    """C{now}, or just after the newest C{updated_at} where the clock stepped back behind it: the key rings ask
    for what changed since the newest they saw, and an edit stamped before it was never read (a deactivation
    too, on every other process)."""
    newest = conn.execute("SELECT MAX(updated_at) FROM auth_keys").fetchone()[0]
    return now if newest is None or now > newest else newest + 0.001


def _write(conn, key_id, changes, now) -> bool:
    """Set C{changes} and C{updated_at} on the key; whether there is one."""
    changes["updated_at"] = _after_newest(conn, now)
    names = [name for name in changes if name in KEY_COLUMNS and name not in ("id", "created_at")]
    return conn.execute(f"UPDATE auth_keys SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",
                        [_column(n, changes[n]) for n in names] + [key_id]).rowcount > 0


def _column(name, value):
    if name in _JSON:
        return None if value is None else jsonutil.dumps(value).decode("utf-8")
    if name == "own_cache_salt":
        return 1 if value else 0
    return value


def _record(row) -> dict:
    record = decode_json(dict(zip(KEY_COLUMNS, row)), _JSON)
    record["budgets"] = record["budgets"] or []
    record["budget_resets"] = record["budget_resets"] or {}
    record["own_cache_salt"] = bool(record["own_cache_salt"])
    return record


_BUDGET_COLUMNS = ("user_path", "period", "max_tokens", "max_cost", "updated_at")


@implementer(IBudgetStore)
class SQLiteBudgetStore:
    """Budgets by user path in the C{budgets} table."""

    def __init__(self, db):
        self._db = db

    def list(self):
        return self._db.run(lambda: [dict(zip(_BUDGET_COLUMNS, r)) for r in self._db.conn().execute(
            f"SELECT {', '.join(_BUDGET_COLUMNS)} FROM budgets ORDER BY user_path, period")])

    def put(self, user_path, period, max_tokens, max_cost):
        return self._db.run(self._put, user_path, period, max_tokens, max_cost, self._db.now())

    def _put(self, user_path, period, max_tokens, max_cost, now):
        with self._db.transaction() as conn:
            conn.execute("INSERT INTO budgets (user_path, period, max_tokens, max_cost, updated_at) "
                         "VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_path, period) DO UPDATE SET "
                         "max_tokens = excluded.max_tokens, max_cost = excluded.max_cost, "
                         "updated_at = excluded.updated_at", (user_path, period, max_tokens, max_cost, now))
        return {"user_path": user_path, "period": period, "max_tokens": max_tokens, "max_cost": max_cost,
                "updated_at": now}

    def delete(self, user_path, period):
        def delete():
            with self._db.transaction() as conn:
                return conn.execute("DELETE FROM budgets WHERE user_path = ? AND period = ?",
                                    (user_path, period)).rowcount > 0
        return self._db.run(delete)

    def resets(self):
        return self._db.run(lambda: {(path, period): at for path, period, at in self._db.conn().execute(
            "SELECT user_path, period, reset_at FROM budget_resets")})

    def reset(self, targets):
        return self._db.run(self._reset, list(targets), self._db.now())

    def _reset(self, targets, now):
        with self._db.transaction() as conn:
            conn.executemany("INSERT INTO budget_resets (user_path, period, reset_at) VALUES (?, ?, ?) "
                             "ON CONFLICT (user_path, period) DO UPDATE SET reset_at = excluded.reset_at",
                             [(path, period, now) for path, period in targets])
        return now
