"""L{IResponseStore} on SQLite: responses created through the gateway."""

import json

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from gomodel.store.codec import RESPONSE_COLUMNS, RESPONSE_CONFLICT, RESPONSE_INSERT, response_row, response_upsert
from gomodel.store.held import Held, looked_again
from gomodel.store.interfaces import KEEP_DELAY, IResponseStore
from gomodel.store.sqlite.rows import insert_rows

# Waits before a response not found is looked up again: another gateway process on the same file
# (--workers) may hold it for up to KEEP_DELAY before its store thread writes it.
MISS_GRACE = (0.025, 0.05)
_PUT = response_upsert("?")


@implementer(IResponseStore)
class SQLiteResponseStore:
    """Stored responses in the C{responses} table.

    L{keep} holds a record for up to L{KEEP_DELAY} seconds and writes the
    records held then in one transaction. Every other operation first queues
    the write of those held (L{flush}): the store thread runs its jobs in
    order, so it sees them. Another process on the same file sees them once
    written: a read that finds nothing looks again within L{MISS_GRACE}.
    """

    log = Logger()

    def __init__(self, db, clock, waits=None):
        """
        @param clock: an C{IReactorTime}: when the records kept are written.
        @param waits: an C{IReactorTime} for the waits of a read that found nothing (default: C{clock}).
        """
        self._db = db
        self._kept = Held(clock, KEEP_DELAY, self._hand_over)
        self._waits = waits if waits is not None else clock

    def put(self, record):
        self.flush()
        return self._db.run(self._put, dict(record))

    def keep(self, record):
        # No Deferred: nothing wakes the reactor for a write nobody waits for.
        if self._db.stopped:
            self.log.warn("response {id} not stored: the gateway is stopping", id=record["id"])
            return
        self._kept.add(dict(record))

    def flush(self):
        """Hand the records kept so far to the store thread (the gateway's stop calls this too)."""
        self._kept.flush()

    def _hand_over(self, records):
        if not self._db.call(self._write, records, what="storing responses"):
            for record in records:
                self.log.warn("response {id} not stored: the gateway is stopping", id=record["id"])

    def _write(self, records):
        """In the store thread: write C{records} in one transaction (one by one, each failure logged,
        when that fails: one bad record loses no other)."""
        if len(records) > 1:
            try:
                with self._db.transaction() as conn:
                    insert_rows(conn, RESPONSE_INSERT, [response_row(record) for record in records], RESPONSE_CONFLICT)
                return
            except Exception:
                pass
        for record in records:
            self._db.logged(self._put, (record,), f"storing response {record['id']}")

    def _put(self, record):
        with self._db.transaction() as conn:
            conn.execute(_PUT, response_row(record))

    def get(self, response_id):
        self.flush()
        return Deferred.fromCoroutine(self._get_or_wait(response_id))

    async def _get_or_wait(self, response_id):
        def read():
            return self._db.run(self._get, response_id)

        return await looked_again(await read(), read, self._waits, MISS_GRACE)

    def _get(self, response_id):
        row = self._db.conn().execute(f"SELECT {RESPONSE_COLUMNS} FROM responses WHERE id = ?",
                                      (response_id,)).fetchone()
        if row is None:
            return None
        record = dict(row)
        record["input_items"] = json.loads(record["input_items"])
        record["response"] = json.loads(record["response"])
        return record

    def delete(self, response_id):
        self.flush()
        return self._db.run(self._delete, response_id)

    def _delete(self, response_id):
        with self._db.transaction() as conn:
            return conn.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def delete_before(self, created_at):
        self.flush()
        return self._db.run(self._delete_before, created_at)

    def _delete_before(self, created_at):
        with self._db.transaction() as conn:
            return conn.execute("DELETE FROM responses WHERE created_at < ?", (created_at,)).rowcount
