"""The PostgreSQL schema, as ordered migrations; C{schema_version} holds the last one applied.

The same tables as the SQLite store (L{gomodel.store.sqlite.migrations}) in
PostgreSQL's types, plus the file contents (C{blobs}, C{blob_chunks}): a
file's bytes live in the database, so every host reads what any host
wrote. Never edit a released migration; append one.

L{migrate} runs in one transaction under a transaction-level advisory lock:
hosts starting together take turns, and the second finds the work done;
it waits for no lock longer than L{LOCK_TIMEOUT}.
"""

from gomodel.store.postgresql.errors import NotMigrated

# pg_advisory_xact_lock's key for migrations ("gomodel" in ASCII).
MIGRATION_LOCK = 0x676F6D6F64656C
# Seconds a migration waits for a lock (the migration lock, a table's that a query holds) before it gives up (its
# opening is tried again): PostgreSQL queues every later statement on a table behind an ALTER waiting for it, so
# an ALTER waiting on an older gateway's long query stalled every host's statements on that table meanwhile.
LOCK_TIMEOUT = 3.0

MIGRATIONS = (
    (1, (
        """CREATE TABLE files (
            seq BIGSERIAL PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            bytes BIGINT NOT NULL,
            created_at BIGINT NOT NULL,
            filename TEXT NOT NULL,
            purpose TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'processed',
            expires_at BIGINT,
            tenant TEXT
        )""",
        "CREATE INDEX files_purpose ON files (purpose, seq)",
        # Contents: one row per blob (NULL id and not committed while it is written), its bytes
        # in chunks keyed by their first byte's offset, read by range, never whole.
        """CREATE TABLE blobs (
            key BIGSERIAL PRIMARY KEY,
            id TEXT UNIQUE,
            committed BOOLEAN NOT NULL DEFAULT FALSE,
            size BIGINT NOT NULL DEFAULT 0,
            touched_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX blobs_touched ON blobs (committed, touched_at)",
        """CREATE TABLE blob_chunks (
            blob_key BIGINT NOT NULL REFERENCES blobs (key) ON DELETE CASCADE,
            start BIGINT NOT NULL,
            data BYTEA NOT NULL,
            PRIMARY KEY (blob_key, start)
        )""",
        "ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL",
        """CREATE TABLE batches (
            seq BIGSERIAL PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            endpoint TEXT NOT NULL,
            input_file_id TEXT NOT NULL,
            completion_window TEXT NOT NULL,
            status TEXT NOT NULL,
            output_file_id TEXT,
            error_file_id TEXT,
            created_at BIGINT NOT NULL,
            in_progress_at BIGINT,
            expires_at BIGINT,
            finalizing_at BIGINT,
            completed_at BIGINT,
            failed_at BIGINT,
            expired_at BIGINT,
            cancelling_at BIGINT,
            cancelled_at BIGINT,
            total INTEGER NOT NULL DEFAULT 0,
            completed INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0,
            errors TEXT,
            metadata TEXT,
            tenant TEXT,
            auth_key_id TEXT,
            -- the claim of the process running it: a lease and a fencing token
            owner TEXT,
            lease_until DOUBLE PRECISION,
            claim_token BIGINT NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX batches_status ON batches (status, seq)",
        """CREATE TABLE batch_requests (
            batch_id TEXT NOT NULL,
            line INTEGER NOT NULL,
            custom_id TEXT NOT NULL,
            body BYTEA NOT NULL,
            PRIMARY KEY (batch_id, line)
        )""",
        # The primary key makes each line's result exactly-once.
        """CREATE TABLE batch_results (
            batch_id TEXT NOT NULL,
            line INTEGER NOT NULL,
            custom_id TEXT NOT NULL,
            ok BOOLEAN NOT NULL,
            data BYTEA NOT NULL,
            PRIMARY KEY (batch_id, line)
        )""",
        """CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            provider TEXT NOT NULL,
            replica INTEGER,
            created_at BIGINT NOT NULL,
            previous_response_id TEXT,
            status TEXT,
            input_items TEXT NOT NULL,
            response TEXT NOT NULL,
            tenant TEXT
        )""",
        "CREATE INDEX responses_created ON responses (created_at)",
        """CREATE TABLE claims (
            name TEXT PRIMARY KEY,
            owner TEXT,
            lease_until DOUBLE PRECISION,
            token BIGINT NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE usage (
            id BIGSERIAL PRIMARY KEY,
            request_id TEXT NOT NULL,
            timestamp DOUBLE PRECISION NOT NULL,
            provider TEXT,
            provider_name TEXT,
            replica INTEGER,
            model TEXT,
            endpoint TEXT,
            status_code INTEGER,
            stream BOOLEAN NOT NULL DEFAULT FALSE,
            input_tokens BIGINT,
            output_tokens BIGINT,
            total_tokens BIGINT,
            cached_tokens BIGINT,
            reasoning_tokens BIGINT,
            input_cost DOUBLE PRECISION,
            output_cost DOUBLE PRECISION,
            total_cost DOUBLE PRECISION,
            user_path TEXT,
            auth_key_id TEXT,
            duration_ms DOUBLE PRECISION,
            ttft_ms DOUBLE PRECISION,
            client_gone BOOLEAN NOT NULL DEFAULT FALSE,
            estimated BOOLEAN NOT NULL DEFAULT FALSE
        )""",
        "CREATE INDEX usage_timestamp ON usage (timestamp)",
        "CREATE INDEX usage_key ON usage (auth_key_id, timestamp)",
        "CREATE INDEX usage_path ON usage (user_path, timestamp)",
        # Managed keys: only the secret's SHA-256; lists as JSON text. updated_at is the
        # database's clock, one clock for every host's key cache.
        """CREATE TABLE auth_keys (
            seq BIGSERIAL PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            hash TEXT NOT NULL UNIQUE,
            redacted TEXT NOT NULL,
            name TEXT NOT NULL,
            description TEXT,
            user_path TEXT,
            created_at BIGINT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            expires_at BIGINT,
            deactivated_at BIGINT,
            models TEXT,
            rpm BIGINT,
            tpm BIGINT,
            max_concurrency INTEGER,
            budgets TEXT,
            priority INTEGER,
            metadata TEXT,
            own_cache_salt BOOLEAN NOT NULL DEFAULT FALSE
        )""",
        "CREATE INDEX auth_keys_updated ON auth_keys (updated_at)",
        """CREATE TABLE budgets (
            user_path TEXT NOT NULL,
            period TEXT NOT NULL,
            max_tokens BIGINT,
            max_cost DOUBLE PRECISION,
            updated_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (user_path, period)
        )""",
    )),
    (2, (
        # A batch's output_expires_after[seconds]: its output and error files expire that long after written.
        "ALTER TABLE batches ADD COLUMN output_expires_after BIGINT",
    )),
    (8, (
        # A deleted file's place in the list order, kept a day: a client paging while it deletes the files
        # it lists passes the last one's id as the next page's cursor.
        """CREATE TABLE deleted_files (
            id TEXT PRIMARY KEY,
            seq BIGINT NOT NULL,
            tenant TEXT,
            deleted_at BIGINT NOT NULL
        )""",
    )),
    (9, (
        # Background responses still to be charged, each watched by one process under a lease.
        """CREATE TABLE background_watches (
            id TEXT PRIMARY KEY,
            request_id TEXT NOT NULL,
            key_id TEXT,
            user_path TEXT,
            provider TEXT NOT NULL,
            replica INTEGER,
            response TEXT NOT NULL,
            since DOUBLE PRECISION NOT NULL,
            owner TEXT,
            lease_until DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX background_watches_lease ON background_watches (lease_until)",
    )),
    (10, (
        # When a budget's spending was last set back to zero (POST /budgets/reset-one, /budgets/reset): its
        # period counts from then. A budget of the configuration has one too, so it is not a budgets column.
        """CREATE TABLE budget_resets (
            user_path TEXT NOT NULL,
            period TEXT NOT NULL,
            reset_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (user_path, period)
        )""",
    )),
    (11, (
        # The mark of each write of usage rows: its first row and how many it wrote (a write retried after
        # its commit's answer was lost is not written twice; see usage.py).
        """CREATE TABLE usage_writes (
            request_id TEXT NOT NULL,
            timestamp DOUBLE PRECISION NOT NULL,
            rows INTEGER NOT NULL,
            written_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (request_id, timestamp)
        )""",
        "CREATE INDEX usage_writes_at ON usage_writes (written_at)",
    )),
    (12, (
        # A response deleted through the gateway: the upstream (vLLM keeps responses in memory) may still hold
        # it, and a follow-up must not continue it there. Swept with the responses' retention.
        """CREATE TABLE deleted_responses (
            id TEXT PRIMARY KEY,
            deleted_at BIGINT NOT NULL
        )""",
        "CREATE INDEX deleted_responses_at ON deleted_responses (deleted_at)",
    )),
    (13, (
        # A batch's usage (OpenAI's batch object's): the tokens of its answered lines, summed when it ends.
        "ALTER TABLE batches ADD COLUMN token_usage TEXT",
        # The model its lines name, once validated (None: they name several).
        "ALTER TABLE batches ADD COLUMN model TEXT",
    )),
    (14, (
        # A message batch's input file is the gateway's own (purpose message_batch: /v1/files does not show it);
        # those made before were written with purpose batch.
        "UPDATE files SET purpose = 'message_batch' WHERE purpose = 'batch' "
        "AND id IN (SELECT input_file_id FROM batches WHERE endpoint = '/v1/messages')",
    )),
    (15, (
        # A managed key's budget resets by period ({"daily": reset_at}, JSON): kept while a budget of that period
        # is removed and set again (its items' reset_at, what the limits read, is taken from here on each edit).
        "ALTER TABLE auth_keys ADD COLUMN budget_resets TEXT",
    )),
    (16, (
        # A batch's kind: an OpenAI batch (batch) or a message batch (message_batch, /v1/messages/batches), each
        # shown by its own API only; those made before are told apart by their input file's purpose.
        "ALTER TABLE batches ADD COLUMN kind TEXT NOT NULL DEFAULT 'batch'",
        "UPDATE batches SET kind = 'message_batch' "
        "WHERE input_file_id IN (SELECT id FROM files WHERE purpose = 'message_batch')",
    )),
    (17, (
        # A usage record's outcome (ok, error, client_gone, stream_broken): a stream that failed after its 200 is
        # an error. Null in the records made before (and in those an older gateway still writes during a rolling
        # upgrade): read as their status says (codec.OUTCOME), with no rewrite of the table under its lock.
        "ALTER TABLE usage ADD COLUMN outcome TEXT",
    )),
    (18, (
        # The seconds of audio a record's usage billed (a transcription's, OpenAI's whisper and vLLM's: {"type":
        # "duration", "seconds": N}), priced by a model's audio_per_minute; null for any other record.
        "ALTER TABLE usage ADD COLUMN audio_seconds DOUBLE PRECISION",
    )),
    (19, (
        # The batch whose output or error file a file is, found at once when the file expires or is deleted (its
        # answers go with it): before, a scan of every batch for each.
        "CREATE INDEX batches_output_file ON batches (output_file_id)",
        "CREATE INDEX batches_error_file ON batches (error_file_id)",
    )),
    (20, (
        # A response the retention swept, with its tenant, remembered for a retention more: a follow-up naming it,
        # or a read of it, is told it expired (its tenant alone), not that it never existed.
        """CREATE TABLE swept_responses (
            id TEXT PRIMARY KEY,
            tenant TEXT,
            swept_at BIGINT NOT NULL
        )""",
        "CREATE INDEX swept_responses_at ON swept_responses (swept_at)",
    )),
    (21, (
        # Whether a stored response was created with stream: a background one's events can be replayed (retrieve
        # with stream) only where it was streamed. Null in those made before: not known.
        "ALTER TABLE responses ADD COLUMN streamed BOOLEAN",
    )),
    (22, (
        # Each UTC day's usage sums by key and path: what a budget scope spent is read from its period's whole days
        # here (usage.py), not from each row of the period again (every process, every second: 0.2 s a read with
        # 500k rows in a month). Kept by the database in the transaction that writes or deletes the rows, whoever
        # does (an older gateway during a rolling upgrade too); the rows before are summed as the triggers are made,
        # the writes waiting meanwhile (the trigger's lock on usage, not the reads).
        """CREATE TABLE usage_days (
            day BIGINT NOT NULL,
            auth_key_id TEXT,
            user_path TEXT COLLATE "C",
            requests BIGINT NOT NULL,
            total_tokens BIGINT NOT NULL,
            total_cost DOUBLE PRECISION NOT NULL
        )""",
        # (one row per day, key and path; a missing key or path, NULL, is one too)
        "CREATE UNIQUE INDEX usage_days_scope ON usage_days (day, COALESCE(auth_key_id, ''), COALESCE(user_path, ''))",
        "CREATE INDEX usage_days_key ON usage_days (auth_key_id, day)",
        # (a path and those below it: starts_with reads a range of this index in the C collation, PostgreSQL 15 on)
        "CREATE INDEX usage_days_path ON usage_days (user_path, day)",
        # Each statement's rows at once (a COPY of a flush: one upsert per day, key and path, in one order: two
        # hosts' flushes wait for each other, never deadlock).
        """CREATE FUNCTION usage_days_add() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO usage_days AS d
            SELECT floor(timestamp / 86400)::bigint, auth_key_id, user_path, COUNT(*),
                   COALESCE(SUM(total_tokens), 0), COALESCE(SUM(total_cost), 0)
            FROM added GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
            ON CONFLICT (day, COALESCE(auth_key_id, ''), COALESCE(user_path, '')) DO UPDATE
            SET requests = d.requests + excluded.requests, total_tokens = d.total_tokens + excluded.total_tokens,
                total_cost = d.total_cost + excluded.total_cost;
            RETURN NULL;
        END $$""",
        """CREATE FUNCTION usage_days_remove() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE usage_days AS d
            SET requests = d.requests - r.requests, total_tokens = d.total_tokens - r.total_tokens,
                total_cost = d.total_cost - r.total_cost
            FROM (SELECT floor(timestamp / 86400)::bigint AS day, auth_key_id, user_path, COUNT(*) AS requests,
                         COALESCE(SUM(total_tokens), 0) AS total_tokens, COALESCE(SUM(total_cost), 0) AS total_cost
                  FROM removed GROUP BY 1, 2, 3) AS r
            WHERE d.day = r.day AND COALESCE(d.auth_key_id, '') = COALESCE(r.auth_key_id, '')
                AND COALESCE(d.user_path, '') = COALESCE(r.user_path, '') COLLATE "C";
            DELETE FROM usage_days
            WHERE requests <= 0 AND day IN (SELECT floor(timestamp / 86400)::bigint FROM removed);
            RETURN NULL;
        END $$""",
        "CREATE TRIGGER usage_days_add AFTER INSERT ON usage REFERENCING NEW TABLE AS added "
        "FOR EACH STATEMENT EXECUTE FUNCTION usage_days_add()",
        "CREATE TRIGGER usage_days_remove AFTER DELETE ON usage REFERENCING OLD TABLE AS removed "
        "FOR EACH STATEMENT EXECUTE FUNCTION usage_days_remove()",
        "INSERT INTO usage_days SELECT floor(timestamp / 86400)::bigint, auth_key_id, user_path, COUNT(*), "
        "COALESCE(SUM(total_tokens), 0), COALESCE(SUM(total_cost), 0) FROM usage GROUP BY 1, 2, 3",
    )),
    (23, (
        # Each UTC day's usage sums by path and by each of its ancestors: a budget of a path reads its own days here,
        # not those of every path below it from usage_days (30-50 ms a read with 2,000 children over a month, in
        # every process's seed, and each second in each without Redis: bench/path_budget.py). The root, C{/}, holds
        # every record of a path or a managed key (IUsageStore.spent's). Kept as usage_days is, by the database.
        """CREATE TABLE usage_path_days (
            path TEXT COLLATE "C" NOT NULL,
            day BIGINT NOT NULL,
            requests BIGINT NOT NULL,
            total_tokens BIGINT NOT NULL,
            total_cost DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (path, day)
        )""",
        # (the scopes a record counts in, of its path and whether it has a key: C{/a/b}'s are C{/a/b}, C{/a} and
        # C{/}, as C{path_range} finds it under each of them)
        """CREATE FUNCTION usage_path_scopes(user_path TEXT, keyed BOOLEAN) RETURNS SETOF TEXT
        LANGUAGE sql IMMUTABLE AS $$
            SELECT '/' WHERE user_path IS NOT NULL OR keyed
            UNION SELECT user_path WHERE user_path IS NOT NULL
            UNION SELECT left(user_path, i - 1) FROM generate_series(2, length(user_path)) AS i
                  WHERE substr(user_path, i, 1) = '/'
        $$""",
        # (in one order, after usage_days' trigger, which the name's order makes first: two hosts' flushes wait for
        # each other, never deadlock)
        """CREATE FUNCTION usage_path_days_add() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO usage_path_days AS d
            SELECT p.path, a.day, SUM(a.requests), SUM(a.total_tokens), SUM(a.total_cost)
            FROM (SELECT floor(timestamp / 86400)::bigint AS day, user_path, auth_key_id IS NOT NULL AS keyed,
                         COUNT(*) AS requests, COALESCE(SUM(total_tokens), 0) AS total_tokens,
                         COALESCE(SUM(total_cost), 0) AS total_cost
                  FROM added GROUP BY 1, 2, 3) AS a
            CROSS JOIN LATERAL usage_path_scopes(a.user_path, a.keyed) AS p(path)
            GROUP BY 1, 2 ORDER BY 1, 2
            ON CONFLICT (path, day) DO UPDATE
            SET requests = d.requests + excluded.requests, total_tokens = d.total_tokens + excluded.total_tokens,
                total_cost = d.total_cost + excluded.total_cost;
            RETURN NULL;
        END $$""",
        """CREATE FUNCTION usage_path_days_remove() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE usage_path_days AS d
            SET requests = d.requests - r.requests, total_tokens = d.total_tokens - r.total_tokens,
                total_cost = d.total_cost - r.total_cost
            FROM (SELECT p.path, o.day, SUM(o.requests) AS requests, SUM(o.total_tokens) AS total_tokens,
                         SUM(o.total_cost) AS total_cost
                  FROM (SELECT floor(timestamp / 86400)::bigint AS day, user_path, auth_key_id IS NOT NULL AS keyed,
                               COUNT(*) AS requests, COALESCE(SUM(total_tokens), 0) AS total_tokens,
                               COALESCE(SUM(total_cost), 0) AS total_cost
                        FROM removed GROUP BY 1, 2, 3) AS o
                  CROSS JOIN LATERAL usage_path_scopes(o.user_path, o.keyed) AS p(path)
                  GROUP BY 1, 2) AS r
            WHERE d.path = r.path AND d.day = r.day;
            DELETE FROM usage_path_days AS d
            USING (SELECT DISTINCT p.path, o.day
                   FROM (SELECT DISTINCT floor(timestamp / 86400)::bigint AS day, user_path,
                                auth_key_id IS NOT NULL AS keyed FROM removed) AS o
                   CROSS JOIN LATERAL usage_path_scopes(o.user_path, o.keyed) AS p(path)) AS r
            WHERE d.path = r.path AND d.day = r.day AND d.requests <= 0;
            RETURN NULL;
        END $$""",
        "CREATE TRIGGER usage_path_days_add AFTER INSERT ON usage REFERENCING NEW TABLE AS added "
        "FOR EACH STATEMENT EXECUTE FUNCTION usage_path_days_add()",
        "CREATE TRIGGER usage_path_days_remove AFTER DELETE ON usage REFERENCING OLD TABLE AS removed "
        "FOR EACH STATEMENT EXECUTE FUNCTION usage_path_days_remove()",
        # (from the day sums, whole: the writes of usage wait for the triggers' lock meanwhile)
        "INSERT INTO usage_path_days SELECT p.path, d.day, SUM(d.requests), SUM(d.total_tokens), SUM(d.total_cost) "
        "FROM usage_days AS d CROSS JOIN LATERAL usage_path_scopes(d.user_path, d.auth_key_id IS NOT NULL) AS p(path) "
        "GROUP BY 1, 2",
    )),
)


def migrate(conn, migrations=MIGRATIONS, lock_timeout=LOCK_TIMEOUT):
    """Bring the schema to the last migration, in one transaction, under the migration lock.

    @param conn: an autocommit connection.
    @param lock_timeout: the seconds it waits for any lock (L{LOCK_TIMEOUT}).
    @raise NotMigrated: the database is at a newer version than this gateway knows.
    @raise psycopg.errors.LockNotAvailable: a lock was not had in time (nothing was changed).
    """
    with conn.transaction():
        conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout * 1000)}")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            current = 0
        else:
            current = row[0]
        latest = migrations[-1][0]
        if current > latest:
            raise NotMigrated(f"the database is at schema version {current}, newer than this gateway's {latest}: "
                              "upgrade this gateway (or point it at another database)")
        for version, statements in migrations:
            if version > current:
                for statement in statements:
                    conn.execute(statement)
                conn.execute("UPDATE schema_version SET version = %s", (version,))
