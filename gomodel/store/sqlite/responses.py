"""L{IResponseStore} on SQLite: responses created through the gateway."""

import json

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from gomodel import jsonutil
from gomodel.store.codec import (RESPONSE_COLUMNS, RESPONSE_CONFLICT, RESPONSE_INSERT, chain_query,
                                 follows_deleted_query, response_row, response_upsert)
from gomodel.store.held import Held, looked_again
from gomodel.store.interfaces import KEEP_DELAY, IResponseStore

# Waits before a response not found is looked up again: another gateway process on the same file
# (--workers) may hold it for up to KEEP_DELAY before its writer (a process of its own) writes it, later on a
# loaded machine: up to 0.375 s in all, as on PostgreSQL (75 ms missed one kept 20 ms before on a busy 2-core
# machine, and a client continuing it at once got 400 previous_response_not_found).
MISS_GRACE = (0.025, 0.05, 0.1, 0.2)
_PUT = response_upsert("?")
_FOLLOWS_DELETED = follows_deleted_query("?")
_CHAIN = chain_query("?")


@implementer(IResponseStore)
class SQLiteResponseStore:
    """Stored responses in the C{responses} table.

    L{keep} holds a record for up to L{KEEP_DELAY} seconds, then hands the
    records held to the store's writer process (L{gomodel.store.sqlite.writer}),
    in one transaction. Every other operation first hands over those held
    (L{flush}) and waits for the writes under way: it sees them. Another
    process on the same file sees them once written: a read that finds
    nothing looks again within L{MISS_GRACE} (where other processes use the file).
    """

    log = Logger()

    def __init__(self, db, clock, writer, waits=None, miss_grace=MISS_GRACE):
        """
        @param clock: an C{IReactorTime}: when the records kept are written.
        @param writer: the L{gomodel.store.sqlite.writer.RowWriter} that writes the records kept.
        @param waits: an C{IReactorTime} for the waits of a read that found nothing (default: C{clock}).
        @param miss_grace: the waits (seconds) before a read that found nothing looks again: L{MISS_GRACE} where
            other processes use the file, none where this one alone does (what it keeps, it finds).
        """
        self._db = db
        self._clock = clock
        self._writer = writer
        self._kept = Held(clock, KEEP_DELAY, self._hand_over)
        self._waits = waits if waits is not None else clock
        self._miss_grace = miss_grace
        self._writing = set()  # the writes under way: Deferreds that never fail

    def put(self, record):
        return self._after_writes(self._put, dict(record))

    def keep(self, record):
        # No Deferred: nothing wakes the reactor for a write nobody waits for.
        if self._db.stopped:
            self.log.warn("response {id} not stored: the gateway is stopping", id=record["id"])
            return
        self._kept.add(dict(record))

    def flush(self):
        """Hand the records kept so far to the writer (the gateway's stop calls this too)."""
        self._kept.flush()

    def _hand_over(self, records):
        if self._writer.stopped:
            for record in records:
                self.log.warn("response {id} not stored: the gateway is stopping", id=record["id"])
            return
        rows = []
        for record in records:
            try:
                rows.append(response_row(record))
            except (KeyError, UnicodeDecodeError, TypeError, ValueError):
                self.log.failure("storing response {id} failed", id=record.get("id"))
        if rows:
            self._track(self._write(rows, record_ids=[row[0] for row in rows]))

    def _write(self, rows, record_ids):
        """Write C{rows} in one transaction; when that fails, each alone (each failure logged: one bad record
        loses no other). A Deferred firing with None once done."""
        d = self._writer.write(RESPONSE_INSERT, rows, RESPONSE_CONFLICT)

        def failed(failure):
            if len(rows) > 1:
                return gatherResults([self._write([row], [response_id]) for row, response_id in zip(rows, record_ids)])
            self.log.failure("storing response {id} failed", failure, id=record_ids[0])

        return d.addCallbacks(lambda _: None, failed)

    def _track(self, d):
        self._writing.add(d)
        d.addBoth(lambda _: self._writing.discard(d))

    def _after_writes(self, f, *args):
        """Run C{f(*args)} in the store thread once the records kept so far are written.

        @return: a Deferred firing with its result."""
        self.flush()
        if not self._writing:
            return self._db.run(f, *args)
        return gatherResults(list(self._writing)).addCallback(lambda _: self._db.run(f, *args))

    def _put(self, record):
        with self._db.transaction() as conn:
            conn.execute(_PUT, response_row(record))

    def get(self, response_id):
        return Deferred.fromCoroutine(self._get_or_wait(response_id))

    async def _get_or_wait(self, response_id):
        def read():
            return self._after_writes(self._get, response_id)

        return await looked_again(await read(), read, self._waits, self._miss_grace)

    def _get(self, response_id):
        row = self._db.conn().execute(f"SELECT {RESPONSE_COLUMNS} FROM responses WHERE id = ?",
                                      (response_id,)).fetchone()
        return None if row is None else _record(row)

    def chain(self, response_id):
        return self._after_writes(self._chain, response_id)

    def _chain(self, response_id):
        return [_record(row) for row in self._db.conn().execute(_CHAIN, (response_id,)).fetchall()]

    def update(self, response_id, status, response, tenant=None):
        return self._after_writes(self._update, response_id, status, jsonutil.dumps(response).decode("utf-8"),
                                  tenant)

    def _update(self, response_id, status, text, tenant):
        with self._db.transaction() as conn:
            return conn.execute("UPDATE responses SET status = ?, response = ? WHERE id = ? AND tenant IS ?",
                                (status, text, response_id, tenant)).rowcount > 0

    def note_streamed(self, response_id, streamed):
        return self._after_writes(self._note_streamed, response_id, streamed)

    def _note_streamed(self, response_id, streamed):
        with self._db.transaction() as conn:
            return conn.execute("UPDATE responses SET streamed = ? WHERE id = ? AND streamed IS NULL",
                                (streamed, response_id)).rowcount > 0

    def delete(self, response_id):
        return self._after_writes(self._delete, response_id, int(self._clock.seconds()))

    def _delete(self, response_id, now):
        with self._db.transaction() as conn:
            if conn.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount == 0:
                return False
            conn.execute("INSERT OR REPLACE INTO deleted_responses (id, deleted_at) VALUES (?, ?)", (response_id, now))
            return True

    def deleted(self, response_id):
        return self._after_writes(self._deleted, response_id)

    def _deleted(self, response_id):
        return self._db.conn().execute("SELECT 1 FROM deleted_responses WHERE id = ?",
                                       (response_id,)).fetchone() is not None

    def follows_deleted(self, response_id):
        return self._after_writes(self._follows_deleted, response_id)

    def _follows_deleted(self, response_id):
        return self._db.conn().execute(_FOLLOWS_DELETED, (response_id,)).fetchone() is not None

    def delete_before(self, created_at):
        return self._after_writes(self._delete_before, created_at)

    def _delete_before(self, created_at):
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM deleted_responses WHERE deleted_at < ?", (created_at,))
            conn.execute("DELETE FROM swept_responses WHERE swept_at < ?", (created_at,))
            conn.execute("INSERT OR REPLACE INTO swept_responses (id, tenant, swept_at) SELECT id, tenant, ? "
                         "FROM responses WHERE created_at < ?", (int(self._clock.seconds()), created_at))
            return conn.execute("DELETE FROM responses WHERE created_at < ?", (created_at,)).rowcount

    def swept(self, response_id):
        return self._after_writes(self._swept, response_id)

    def _swept(self, response_id):
        row = self._db.conn().execute("SELECT id, tenant FROM swept_responses WHERE id = ?", (response_id,)).fetchone()
        return None if row is None else {"id": row[0], "tenant": row[1]}


def _record(row) -> dict:
    """The stored response of a C{responses} row."""
    record = dict(row)
    record["input_items"] = json.loads(record["input_items"])
    record["response"] = json.loads(record["response"])
    if record["streamed"] is not None:  # (SQLite's 0 or 1)
        record["streamed"] = record["streamed"] == 1
    return record
