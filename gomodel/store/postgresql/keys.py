"""L{IKeyStore} and L{IBudgetStore} on PostgreSQL: managed keys (their hashes) and budgets by user path.

C{updated_at} comes from the database's clock, not the host's: every host's
key cache asks for what changed since the newest C{updated_at} it saw, and
one clock for all of them means an edit made on a host whose clock lags is
never missed (see L{gomodel.auth.keys.KeyRing}).
"""

from zope.interface import implementer

from gomodel import jsonutil
from gomodel.store.codec import decode_json
from gomodel.store.interfaces import IBudgetStore, IKeyStore

KEY_COLUMNS = ("id", "hash", "redacted", "name", "description", "user_path", "created_at", "updated_at",
               "expires_at", "deactivated_at", "models", "rpm", "tpm", "max_concurrency", "budgets", "priority",
               "metadata", "own_cache_salt", "budget_resets")
_JSON = ("models", "budgets", "metadata", "budget_resets")
_SELECT = f"SELECT {', '.join(KEY_COLUMNS)} FROM auth_keys"
NOW = "extract(epoch FROM clock_timestamp())::double precision"
# An edit's updated_at: the database's clock, or just after the newest where that clock stepped back behind it (the
# key rings ask for what changed since the newest they saw: an edit stamped before it was never read there).
_STAMP = f"GREATEST({NOW}, COALESCE((SELECT MAX(updated_at) FROM auth_keys), 0) + 0.001)"


@implementer(IKeyStore)
class PostgreSQLKeyStore:
    """Managed keys in the C{auth_keys} table."""

    def __init__(self, db):
        self._db = db

    def add(self, record):
        return self._db.run(self._add, dict(record))

    @staticmethod
    def _add(conn, record):
        names = [name for name in KEY_COLUMNS if name != "updated_at"]
        row = conn.execute(
            f"INSERT INTO auth_keys ({', '.join(names)}, updated_at) VALUES ({', '.join('%s' for _ in names)}, {_STAMP}) "
            f"RETURNING {', '.join(KEY_COLUMNS)}", [_column(name, record.get(name)) for name in names]).fetchone()
        return _record(row)

    def get(self, key_id):
        return self._db.run(self._get, key_id)

    @staticmethod
    def _get(conn, key_id):
        row = conn.execute(f"{_SELECT} WHERE id = %s", (key_id,)).fetchone()
        return _record(row) if row is not None else None

    def list(self):
        return self._db.run(lambda conn: [_record(r) for r in conn.execute(f"{_SELECT} ORDER BY seq")])

    def page(self, after=None, limit=None):
        return self._db.run(self._page, after, limit)

    @staticmethod
    def _page(conn, after, limit):
        where, args = "", []
        if after is not None:
            row = conn.execute("SELECT seq FROM auth_keys WHERE id = %s", (after,)).fetchone()
            if row is None:
                return None
            where, args = " WHERE seq > %s", [row[0]]
        tail = "" if limit is None else f" LIMIT {int(limit) + 1}"  # (one more: whether there are more)
        records = [_record(r) for r in conn.execute(f"{_SELECT}{where} ORDER BY seq{tail}", args)]
        return (records, False) if limit is None or len(records) <= limit else (records[:limit], True)

    def update(self, key_id, changes):
        return self._db.run(self._update, key_id, dict(changes))

    @staticmethod
    def _update(conn, key_id, changes):
        names = [name for name in changes if name in KEY_COLUMNS and name not in ("id", "created_at", "updated_at")]
        sets = [f"{n} = %s" for n in names] + [f"updated_at = {_STAMP}"]
        row = conn.execute(f"UPDATE auth_keys SET {', '.join(sets)} WHERE id = %s RETURNING {', '.join(KEY_COLUMNS)}",
                           [_column(n, changes[n]) for n in names] + [key_id]).fetchone()
        return _record(row) if row is not None else None

    def edit(self, key_id, change):
        return self._db.run(self._edit, key_id, change)

    @staticmethod
    def _edit(conn, key_id, change):
        with conn.transaction():  # (the row locked from the read to the write)
            row = conn.execute(f"{_SELECT} WHERE id = %s FOR UPDATE", (key_id,)).fetchone()
            if row is None:
                return None
            return PostgreSQLKeyStore._update(conn, key_id, dict(change(_record(row))))

    def deactivate(self, key_id, at):
        return self._db.run(self._deactivate, key_id, at)

    @staticmethod
    def _deactivate(conn, key_id, at):
        row = conn.execute(f"UPDATE auth_keys SET deactivated_at = %s, updated_at = {_STAMP} WHERE id = %s "
                           f"AND deactivated_at IS NULL RETURNING {', '.join(KEY_COLUMNS)}", (at, key_id)).fetchone()
        return _record(row) if row is not None else PostgreSQLKeyStore._get(conn, key_id)

    def changed_since(self, updated_at):
        return self._db.run(lambda conn: [_record(r) for r in conn.execute(
            f"{_SELECT} WHERE updated_at > %s ORDER BY updated_at", (updated_at,))])


def _column(name, value):
    if name in _JSON:
        return None if value is None else jsonutil.dumps(value).decode("utf-8")
    if name == "own_cache_salt":
        return bool(value)
    return value


def _record(row) -> dict:
    record = decode_json(dict(zip(KEY_COLUMNS, row)), _JSON)
    record["budgets"] = record["budgets"] or []
    record["budget_resets"] = record["budget_resets"] or {}
    return record


_BUDGET_COLUMNS = ("user_path", "period", "max_tokens", "max_cost", "updated_at")


@implementer(IBudgetStore)
class PostgreSQLBudgetStore:
    """Budgets by user path in the C{budgets} table."""

    def __init__(self, db):
        self._db = db

    def list(self):
        return self._db.run(lambda conn: [dict(zip(_BUDGET_COLUMNS, r)) for r in conn.execute(
            f"SELECT {', '.join(_BUDGET_COLUMNS)} FROM budgets ORDER BY user_path, period")])

    def put(self, user_path, period, max_tokens, max_cost):
        return self._db.run(self._put, user_path, period, max_tokens, max_cost)

    @staticmethod
    def _put(conn, user_path, period, max_tokens, max_cost):
        row = conn.execute(
            "INSERT INTO budgets (user_path, period, max_tokens, max_cost, updated_at) "
            f"VALUES (%s, %s, %s, %s, {NOW}) ON CONFLICT (user_path, period) DO UPDATE SET "
            "max_tokens = excluded.max_tokens, max_cost = excluded.max_cost, updated_at = excluded.updated_at "
            f"RETURNING {', '.join(_BUDGET_COLUMNS)}", (user_path, period, max_tokens, max_cost)).fetchone()
        return dict(zip(_BUDGET_COLUMNS, row))

    def delete(self, user_path, period):
        return self._db.run(lambda conn: conn.execute("DELETE FROM budgets WHERE user_path = %s AND period = %s",
                                                      (user_path, period)).rowcount > 0)

    def resets(self):
        return self._db.run(lambda conn: {(path, period): at for path, period, at in conn.execute(
            "SELECT user_path, period, reset_at FROM budget_resets")})

    def reset(self, targets):
        return self._db.run(self._reset, list(targets))

    @staticmethod
    def _reset(conn, targets):
        now = conn.execute(f"SELECT {NOW}").fetchone()[0]
        with conn.transaction(), conn.cursor() as cursor:
            cursor.executemany("INSERT INTO budget_resets (user_path, period, reset_at) VALUES (%s, %s, %s) "
                               "ON CONFLICT (user_path, period) DO UPDATE SET reset_at = excluded.reset_at",
                               [(path, period, now) for path, period in targets])
        return now
