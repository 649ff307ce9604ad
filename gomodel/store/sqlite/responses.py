"""L{IResponseStore} on SQLite: responses created through the gateway."""

import json

from twisted.logger import Logger
from zope.interface import implementer

from gomodel import jsonutil
from gomodel.store.interfaces import IResponseStore

_COLUMNS = "id, provider, replica, created_at, previous_response_id, status, input_items, response, tenant"


@implementer(IResponseStore)
class SQLiteResponseStore:
    """Stored responses in the C{responses} table."""

    log = Logger()

    def __init__(self, db):
        self._db = db

    def put(self, record):
        return self._db.run(self._put, dict(record))

    def keep(self, record):
        # No Deferred: nothing wakes the reactor for a write nobody waits for.
        if not self._db.call(self._put, dict(record), what=f"storing response {record['id']}"):
            self.log.warn("response {id} not stored: the gateway is stopping", id=record["id"])

    def _put(self, record):
        raw = record.get("response_json")
        values = (record["id"], record["provider"], record.get("replica"), record["created_at"],
                  record.get("previous_response_id"),
                  record.get("status"), jsonutil.dumps(record["input_items"]).decode("utf-8"),
                  raw.decode("utf-8") if raw is not None else jsonutil.dumps(record["response"]).decode("utf-8"),
                  record.get("tenant"))
        with self._db.transaction() as conn:
            conn.execute(
                f"INSERT INTO responses ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET provider = excluded.provider, replica = excluded.replica, "
                "created_at = excluded.created_at, "
                "previous_response_id = excluded.previous_response_id, status = excluded.status, "
                "input_items = excluded.input_items, response = excluded.response", values)

    def get(self, response_id):
        return self._db.run(self._get, response_id)

    def _get(self, response_id):
        row = self._db.conn().execute(f"SELECT {_COLUMNS} FROM responses WHERE id = ?", (response_id,)).fetchone()
        if row is None:
            return None
        record = dict(row)
        record["input_items"] = json.loads(record["input_items"])
        record["response"] = json.loads(record["response"])
        return record

    def delete(self, response_id):
        return self._db.run(self._delete, response_id)

    def _delete(self, response_id):
        with self._db.transaction() as conn:
            return conn.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def delete_before(self, created_at):
        return self._db.run(self._delete_before, created_at)

    def _delete_before(self, created_at):
        with self._db.transaction() as conn:
            return conn.execute("DELETE FROM responses WHERE created_at < ?", (created_at,)).rowcount
