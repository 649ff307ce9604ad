"""The SQLite schema, as ordered migrations; C{schema_version} holds the last one applied.

Never edit a released migration; append one. A PostgreSQL backend keeps its
own list (the same tables, its own types). New statements stay portable
where a portable form exists.
"""

MIGRATIONS = (
    (1, (
        """CREATE TABLE files (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            bytes INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            filename TEXT NOT NULL,
            purpose TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'processed',
            expires_at INTEGER
        )""",
        "CREATE INDEX files_purpose ON files (purpose, seq)",
        """CREATE TABLE batches (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            endpoint TEXT NOT NULL,
            input_file_id TEXT NOT NULL,
            completion_window TEXT NOT NULL,
            status TEXT NOT NULL,
            output_file_id TEXT,
            error_file_id TEXT,
            created_at INTEGER NOT NULL,
            in_progress_at INTEGER,
            expires_at INTEGER,
            finalizing_at INTEGER,
            completed_at INTEGER,
            failed_at INTEGER,
            expired_at INTEGER,
            cancelling_at INTEGER,
            cancelled_at INTEGER,
            total INTEGER NOT NULL DEFAULT 0,
            completed INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0,
            errors TEXT,
            metadata TEXT
        )""",
        "CREATE INDEX batches_status ON batches (status)",
        # One row per validated input line; dropped once the batch is finalized.
        """CREATE TABLE batch_requests (
            batch_id TEXT NOT NULL,
            line INTEGER NOT NULL,
            custom_id TEXT NOT NULL,
            body BLOB NOT NULL,
            PRIMARY KEY (batch_id, line)
        ) WITHOUT ROWID""",
        # One row per answered line: the primary key makes each line's result exactly-once.
        """CREATE TABLE batch_results (
            batch_id TEXT NOT NULL,
            line INTEGER NOT NULL,
            custom_id TEXT NOT NULL,
            ok INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (batch_id, line)
        ) WITHOUT ROWID""",
    )),
    (2, (
        # Responses created through the gateway: their input, who made them, their output.
        """CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            provider TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            previous_response_id TEXT,
            status TEXT,
            input_items TEXT NOT NULL,
            response TEXT NOT NULL
        )""",
        "CREATE INDEX responses_created ON responses (created_at)",
    )),
    (3, (
        # Claims instead of a primary: the process that runs a batch leases it
        # (owner, lease_until) and fences its writes with claim_token.
        "ALTER TABLE batches ADD COLUMN owner TEXT",
        "ALTER TABLE batches ADD COLUMN lease_until REAL",
        "ALTER TABLE batches ADD COLUMN claim_token INTEGER NOT NULL DEFAULT 0",
        # Named leases for singleton duties (sweeps, retention).
        """CREATE TABLE claims (
            name TEXT PRIMARY KEY,
            owner TEXT,
            lease_until REAL,
            token INTEGER NOT NULL DEFAULT 0
        )""",
    )),
    (4, (
        # The replica of its provider that made a stored response (vLLM keeps responses in process memory).
        "ALTER TABLE responses ADD COLUMN replica INTEGER",
    )),
    (5, (
        # The usage ledger: one row per request that reached an upstream, and per batch line.
        """CREATE TABLE usage (
            id INTEGER PRIMARY KEY,
            request_id TEXT NOT NULL,
            timestamp REAL NOT NULL,
            provider TEXT,
            provider_name TEXT,
            replica INTEGER,
            model TEXT,
            endpoint TEXT,
            status_code INTEGER,
            stream INTEGER NOT NULL DEFAULT 0,
            input_tokens INTEGER,
            output_tokens INTEGER,
            total_tokens INTEGER,
            cached_tokens INTEGER,
            reasoning_tokens INTEGER,
            input_cost REAL,
            output_cost REAL,
            total_cost REAL,
            user_path TEXT,
            auth_key_id TEXT,
            duration_ms REAL,
            ttft_ms REAL,
            client_gone INTEGER NOT NULL DEFAULT 0,
            estimated INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX usage_timestamp ON usage (timestamp)",
    )),
    (6, (
        # Managed keys: only the secret's SHA-256 is kept; lists as JSON text.
        """CREATE TABLE auth_keys (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            hash TEXT NOT NULL UNIQUE,
            redacted TEXT NOT NULL,
            name TEXT NOT NULL,
            description TEXT,
            user_path TEXT,
            created_at INTEGER NOT NULL,
            updated_at REAL NOT NULL,
            expires_at INTEGER,
            deactivated_at INTEGER,
            models TEXT,
            rpm INTEGER,
            tpm INTEGER,
            max_concurrency INTEGER,
            budgets TEXT,
            priority INTEGER,
            metadata TEXT,
            own_cache_salt INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX auth_keys_updated ON auth_keys (updated_at)",
        # Budgets by user path set through the admin API (YAML and env ones live in the config).
        """CREATE TABLE budgets (
            user_path TEXT NOT NULL,
            period TEXT NOT NULL,
            max_tokens INTEGER,
            max_cost REAL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (user_path, period)
        )""",
        # Who owns what a managed key made: "path:/team/alpha" or "key:<id>"; NULL: the master key's.
        "ALTER TABLE files ADD COLUMN tenant TEXT",
        "ALTER TABLE batches ADD COLUMN tenant TEXT",
        "ALTER TABLE batches ADD COLUMN auth_key_id TEXT",
        "ALTER TABLE responses ADD COLUMN tenant TEXT",
        "CREATE INDEX usage_key ON usage (auth_key_id, timestamp)",
        "CREATE INDEX usage_path ON usage (user_path, timestamp)",
    )),
    (7, (
        # A batch's output_expires_after[seconds]: its output and error files expire that long after written.
        "ALTER TABLE batches ADD COLUMN output_expires_after INTEGER",
    )),
    (8, (
        # A deleted file's place in the list order, kept a day: a client paging while it deletes the files
        # it lists passes the last one's id as the next page's cursor.
        """CREATE TABLE deleted_files (
            id TEXT PRIMARY KEY,
            seq INTEGER NOT NULL,
            tenant TEXT,
            deleted_at INTEGER NOT NULL
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
            since REAL NOT NULL,
            owner TEXT,
            lease_until REAL NOT NULL
        )""",
        "CREATE INDEX background_watches_lease ON background_watches (lease_until)",
    )),
    (10, (
        # When a budget's spending was last set back to zero (POST /budgets/reset-one, /budgets/reset): its
        # period counts from then. A budget of the configuration has one too, so it is not a budgets column.
        """CREATE TABLE budget_resets (
            user_path TEXT NOT NULL,
            period TEXT NOT NULL,
            reset_at REAL NOT NULL,
            PRIMARY KEY (user_path, period)
        )""",
    )),
    (11, (
        # A response deleted through the gateway: the upstream (vLLM keeps responses in memory) may still hold
        # it, and a follow-up must not continue it there. Swept with the responses' retention.
        """CREATE TABLE deleted_responses (
            id TEXT PRIMARY KEY,
            deleted_at INTEGER NOT NULL
        )""",
        "CREATE INDEX deleted_responses_at ON deleted_responses (deleted_at)",
    )),
    (12, (
        # A batch's usage (OpenAI's batch object's): the tokens of its answered lines, summed when it ends.
        "ALTER TABLE batches ADD COLUMN token_usage TEXT",
        # The model its lines name, once validated (None: they name several).
        "ALTER TABLE batches ADD COLUMN model TEXT",
    )),
    (13, (
        # A message batch's input file is the gateway's own (purpose message_batch: /v1/files does not show it);
        # those made before were written with purpose batch.
        "UPDATE files SET purpose = 'message_batch' WHERE purpose = 'batch' "
        "AND id IN (SELECT input_file_id FROM batches WHERE endpoint = '/v1/messages')",
    )),
    (14, (
        # A managed key's budget resets by period ({"daily": reset_at}, JSON): kept while a budget of that period
        # is removed and set again (its items' reset_at, what the limits read, is taken from here on each edit).
        "ALTER TABLE auth_keys ADD COLUMN budget_resets TEXT",
    )),
    (15, (
        # A batch's kind: an OpenAI batch (batch) or a message batch (message_batch, /v1/messages/batches), each
        # shown by its own API only; those made before are told apart by their input file's purpose.
        "ALTER TABLE batches ADD COLUMN kind TEXT NOT NULL DEFAULT 'batch'",
        "UPDATE batches SET kind = 'message_batch' "
        "WHERE input_file_id IN (SELECT id FROM files WHERE purpose = 'message_batch')",
    )),
    (16, (
        # A usage record's outcome (ok, error, client_gone, stream_broken): a stream that failed after its 200 is
        # an error. Null in the records made before (and in those an older gateway still writes during a rolling
        # upgrade): read as their status says (codec.OUTCOME), with no rewrite of the table under its lock.
        "ALTER TABLE usage ADD COLUMN outcome TEXT",
    )),
    (17, (
        # The seconds of audio a record's usage billed (a transcription's, OpenAI's whisper and vLLM's: {"type":
        # "duration", "seconds": N}), priced by a model's audio_per_minute; null for any other record.
        "ALTER TABLE usage ADD COLUMN audio_seconds REAL",
    )),
    (18, (
        # The batch whose output or error file a file is, found at once when the file expires or is deleted (its
        # answers go with it): before, a scan of every batch for each.
        "CREATE INDEX batches_output_file ON batches (output_file_id)",
        "CREATE INDEX batches_error_file ON batches (error_file_id)",
    )),
    (19, (
        # A response the retention swept, with its tenant, remembered for a retention more: a follow-up naming it,
        # or a read of it, is told it expired (its tenant alone), not that it never existed.
        """CREATE TABLE swept_responses (
            id TEXT PRIMARY KEY,
            tenant TEXT,
            swept_at INTEGER NOT NULL
        )""",
        "CREATE INDEX swept_responses_at ON swept_responses (swept_at)",
    )),
    (20, (
        # Whether a stored response was created with stream (1) or not (0): a background one's events can be
        # replayed (retrieve with stream) only where it was streamed. Null in those made before: not known.
        "ALTER TABLE responses ADD COLUMN streamed INTEGER",
    )),
)


def migrate(conn):
    """Bring the schema to the last migration, in one transaction (safe when processes start together)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            current = 0
        else:
            current = row[0]
        latest = MIGRATIONS[-1][0]
        if current > latest:
            raise RuntimeError(f"the database is at schema version {current}, newer than this gateway's {latest}")
        for version, statements in MIGRATIONS:
            if version > current:
                for statement in statements:
                    conn.execute(statement)
                conn.execute("UPDATE schema_version SET version = ?", (version,))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
