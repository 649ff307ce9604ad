"""The seams between the gateway and its persistence: one small interface per aggregate.

Every method that does I/O returns a Deferred and never blocks the reactor;
no SQL and no storage layout exist outside an implementation
(L{gomodel.store.sqlite} is the default). Records are plain dicts, described
in L{gomodel.store.records}. Unless a method says otherwise, its Deferred
fails with L{gomodel.errors.StorageUnavailable} when the store is stopping
or cannot be opened, and with the backend's own error (e.g.
C{sqlite3.Error}, C{OSError}) when a statement or a disk operation fails.

Several processes (and later hosts) may share one store: singleton duties
(running a batch, sweeps, retention) are taken by I{claims}, leases with an
owner, an expiry and a fencing token, never by a "primary" process.

What a managed key makes (files, batches, stored responses) carries its
C{tenant}: C{"path:/team/alpha"} for a key with a user path (the team
shares it), C{"key:<id>"} otherwise, None for the master key's.
"""

from zope.interface import Attribute, Interface

from gomodel.store.records import TERMINAL, UNFINISHED  # noqa: F401 (re-exported)


# How long a deleted file's place in the list order stays a cursor (seconds).
KEEP_DELETED = 86400


class IFileStore(Interface):
    """File metadata (the contents live in an L{IBlobStore}, under the file's id)."""

    def add(file_id, size, filename, purpose, tenant=None, expires_after=None):
        """Register a file whose contents were committed as blob C{file_id}.

        @param expires_after: seconds from its creation until it expires (C{expires_at}), or None: never.
        @return: a Deferred firing with the new file record; it fails with the
            backend's integrity error when C{file_id} exists already.
        """

    def get(file_id):
        """@return: a Deferred firing with the file's record, or None (none, or expired)."""

    def list(purpose=None, after=None, limit=10000, order="desc", tenant=None, hide=()):
        """List files (not those expired), newest first for C{order="desc"}, oldest first for C{"asc"}.

        @param tenant: only that tenant's files, or those tenants' (a sequence); None: everyone's.
        @param hide: purposes not listed (the gateway's own files: L{gomodel.store.records.MESSAGE_BATCH_PURPOSE}).
        @param after: a file id: only files after it in that order are listed, whatever its
            purpose, also once it expired or was deleted (up to L{KEEP_DELETED} ago); an unknown id or
            another tenant's lists nothing.
        @return: a Deferred firing with C{(records, has_more)}.
        """

    def delete(file_id):
        """Delete the record (the caller deletes the blob).

        @return: a Deferred firing with True, or False when there was no such file.
        """

    def known(file_ids):
        """@return: a Deferred firing with the set of those C{file_ids} that have a record."""

    def expired(limit=1000):
        """@return: a Deferred firing with the ids of up to C{limit} files past their C{expires_at}."""


class IBlobWriter(Interface):
    """One blob being written, chunk by chunk, in order; invisible until committed."""

    def write(data):
        """Append C{data} (bytes) after the chunks written before.

        @return: a Deferred firing with None once the chunk is on disk (in
            the OS's hands); it fails with L{gomodel.errors.StorageUnavailable}
            when it cannot be written (then every later call fails too).
        """

    def commit(blob_id):
        """After the outstanding writes, make the contents durable and visible as C{blob_id}.

        @return: a Deferred firing with the blob's size in bytes; it fails
            with L{gomodel.errors.StorageUnavailable} (and nothing is visible).
        """

    def abort():
        """Discard what was written (no-op after L{commit}).

        @return: a Deferred firing with None; it never fails (a failure is logged).
        """


class IBlobStore(Interface):
    """File contents by id, read and written in chunks; never local paths for callers."""

    def create():
        """Start a new blob; does no I/O itself (the first write opens it).

        @return: an L{IBlobWriter}.
        """

    def size(blob_id):
        """@return: a Deferred firing with the blob's size in bytes, or None when there is no such blob."""

    def read(blob_id, offset, length):
        """Read up to C{length} bytes from byte C{offset}.

        @return: a Deferred firing with the bytes (C{b""} at or past the
            end), or None when there is no such blob.
        """

    def read_lines(blob_id, offset, max_lines, max_line_bytes, max_bytes=None):
        """Read up to C{max_lines} lines from byte C{offset}; with C{max_bytes}, only while they hold at most
        that many bytes together (the first line always, whatever its size).

        @return: a Deferred firing with C{(lines, next_offset)}, C{next_offset}
            being None at the end of the blob, or with None when there is no
            such blob. A line longer than C{max_line_bytes} comes back as None
            (and is skipped); lines keep no line ending.
        """

    def delete(blob_id):
        """@return: a Deferred firing with True once deleted, or False when there was no such blob."""

    def stale(older_than):
        """@return: a Deferred firing with the ids of committed blobs last changed before C{older_than}
        (seconds since the epoch): candidates for an orphan sweep."""

    def discard_writes(older_than):
        """Remove uncommitted writes not written to since C{older_than} (uploads cut short by a crash).

        A write still receiving data is never removed.

        @return: a Deferred firing with how many were removed.
        """


class IBatchStore(Interface):
    """Batches, their validated requests and their results; claimed by the process that runs them."""

    def add(batch):
        """Insert a new batch record (unclaimed, free since now: see L{claim_next}'s C{free_for}).

        @return: a Deferred firing with the stored record.
        """

    def get(batch_id):
        """@return: a Deferred firing with the batch record, or None."""

    def list(after=None, limit=20, tenant=None, kind=None):
        """@return: a Deferred firing with C{(records, has_more)}, newest first; C{after} is a batch id (one of
        this listing's, or the page is empty); only C{tenant}'s (one tenant, or a sequence of them) and only
        those of C{kind} when given (L{gomodel.store.records.OPENAI_BATCH} or C{MESSAGE_BATCH})."""

    def delete(batch_id, only_if_status):
        """Forget a batch whose status is one of C{only_if_status}, with its requests and results (not its files).

        @return: a Deferred firing with the record as it was, or None (no such batch, or in another status).
        """

    def update(batch_id, changes, only_if_status=None, token=None):
        """Apply C{changes} (column -> value).

        @param only_if_status: a tuple: only while the status is one of those.
        @param token: when given, only while this is the batch's claim token
            (a fenced write by the claim holder).
        @return: a Deferred firing with the updated record, or None when
            nothing was changed.
        """

    def unfinished():
        """@return: a Deferred firing with every batch whose status is in C{UNFINISHED}, oldest first."""

    def claim(batch_id, owner, lease):
        """Lease one unfinished batch to C{owner} for C{lease} seconds, unless another owner holds a live lease.

        Each claim increments the batch's fencing token.

        @return: a Deferred firing with C{(record, token)}, or None (leased
            elsewhere, finished, or no such batch).
        """

    def claim_next(owner, lease, exclude=(), gone=(), free_for=0):
        """Like L{claim}, for the oldest unfinished batch whose lease is free or expired, not in C{exclude}.

        @param gone: owners known to be dead (see L{gomodel.store.records.owner_is_gone}):
            their leases count as expired.
        @param free_for: only a batch nobody has held for at least this many
            seconds (since it was added, released or its lease ran out; a
            gone owner's batch at once): a busy process leaves fresh batches
            to idler ones.
        @return: a Deferred firing with C{(record, token)}, or None when there is none.
        """

    def holders():
        """@return: a Deferred firing with the set of owners holding a live lease on an unfinished batch."""

    def renew(batch_id, owner, token, lease):
        """Extend a held lease by C{lease} seconds from now (the heartbeat).

        @return: a Deferred firing with True, or False when the claim was lost.
        """

    def release(batch_id, owner, token, delay=0):
        """Give a claim up; nobody may claim the batch for C{delay} seconds (a backoff), then it is free.

        @return: a Deferred firing with None (also when the claim was already lost).
        """

    def add_requests(batch_id, requests, token):
        """Store validated requests C{(line, custom_id, body)}; fenced by C{token}.

        @return: a Deferred firing with None; it fails with
            L{gomodel.store.records.LeaseLost} (nothing stored) when C{token}
            is stale.
        """

    def clear_requests(batch_id, token=None):
        """Forget the stored requests (a validation that starts over, or failed); fenced by C{token} if given.

        @return: a Deferred firing with None; it fails with
            L{gomodel.store.records.LeaseLost} (nothing removed) when C{token} is stale.
        """

    def duplicates(batch_id, limit):
        """@return: a Deferred firing with up to C{limit} stored requests C{(line, custom_id)} whose C{custom_id}
        a request of an earlier line has, in line order, each C{custom_id} cut to its first 257 characters (the
        check of a batch too large to hold its ids in memory: L{gomodel.batches.validating.CustomIds})."""

    def pending(batch_id, after_line, limit, max_bytes=None):
        """@return: a Deferred firing with up to C{limit} requests C{(line, custom_id, body)} past
        C{after_line} that have no result yet, in line order; with C{max_bytes}, only while their bodies hold
        at most that many bytes together (the first always, whatever its size)."""

    def record_results(batch_id, results, token):
        """Persist results C{(line, custom_id, ok, data)} and count them, in one transaction.

        A line that already has a result keeps it and is not counted again
        (exactly once, whatever happens around a restart or a takeover).

        @return: a Deferred firing with the number of results newly recorded;
            it fails with L{gomodel.store.records.LeaseLost} (nothing
            recorded) when C{token} is not the batch's claim token.
        """

    def read_results(batch_id, after_line, limit, ok=None, max_bytes=None):
        """@return: a Deferred firing with up to C{limit} results C{(line, custom_id, ok, data)} past
        C{after_line}, in line order; only outputs (C{ok=True}) or errors (C{ok=False}) if given; with
        C{max_bytes}, only while their C{data} hold at most that many bytes together (the first always)."""

    def drop_file_results(file_id, kind=None):
        """Delete the results that file C{file_id} holds when it is the output file (its outputs) or the error
        file (its errors) of a batch made with C{output_expires_after} (of C{kind} only, if given): they go with
        it once it expired or was deleted. Any other file holds none here. A message batch's errors of requests canceled or expired (no answer in them:
        L{gomodel.store.records.UNANSWERED_RESULTS}) stay: its C{request_counts} count them.

        @return: a Deferred firing with how many results were deleted.
        """

    def finalize(batch_id, changes, files, only_if_status=None, token=None):
        """Register the batch's output and error files and apply C{changes}, in one transaction.

        @param files: C{{"output": (file_id, size) or None, "error": ...}};
            their contents were committed as blobs with those ids. The file
            records (purpose C{batch_output}) are inserted, the batch gets
            their ids, and its stored requests are dropped.
        @return: a Deferred firing with the updated record, or None (and
            nothing registered: the caller deletes the blobs) when the
            status is not in C{only_if_status} or C{token} is stale.
        """


# How long a kept response may wait to be written with those kept meanwhile (L{IResponseStore.keep}):
# one transaction, and one job of a store thread, for all of them, where each took its own.
KEEP_DELAY = 0.02


class IResponseStore(Interface):
    """Responses created through the gateway (see L{gomodel.responses_history})."""

    def put(record):
        """Insert or replace a stored response.

        A record: C{id, provider, replica} (the index of the provider's
        replica that made it, or None), C{created_at, previous_response_id,
        status, input_items} (a list), C{response} (a dict) and C{streamed}
        (whether it was created with stream; None: not known).

        @return: a Deferred firing with None.
        """

    def keep(record):
        """L{put} without waiting for it: returns None, a failure is logged.

        The record may wait up to L{KEEP_DELAY} seconds to be written with
        others. Reads and writes asked for after it (in this process) see it.
        C{record["response_json"]}, when given, is the response's JSON as
        bytes (stored as it is).
        """

    def update(response_id, status, response, tenant=None):
        """Replace the C{status} and C{response} (a dict) of a stored response of C{tenant} (None: of none); nothing
        for one not stored (deleted meanwhile, by any process: it is not stored again), nor for another tenant's
        of that id (an upstream answering one id to two tenants: the other's write was refused too).

        @return: a Deferred firing with True once replaced, or False when there was no such response.
        """

    def note_streamed(response_id, streamed):
        """Keep whether a stored response was created with stream (C{streamed}, a bool) where that was not known
        (its C{streamed} None: stored before it was kept); never changed where it was known.

        @return: a Deferred firing with True once kept, or False (known already, or no such response).
        """

    def get(response_id):
        """@return: a Deferred firing with the stored response record, or None."""

    def delete(response_id):
        """Delete a stored response, remembering that it was (L{deleted}).

        @return: a Deferred firing with True once deleted, or False when there was no such response.
        """

    def deleted(response_id):
        """@return: a Deferred firing with whether C{response_id} was deleted through L{delete} (and not
            swept since: L{delete_before})."""

    def chain(response_id):
        """@return: a Deferred firing with the stored responses C{response_id} follows, through
            C{previous_response_id}, nearest first, back to the first turn or up to one not stored (deleted,
            swept, made upstream), at most C{MAX_CHAIN}: one read for a whole conversation."""

    def follows_deleted(response_id):
        """@return: a Deferred firing with whether C{response_id} follows, through C{previous_response_id} back
            to the first turn, a response deleted through L{delete} (its upstream may still hold it, and the
            turns after it with it)."""

    def delete_before(created_at):
        """Delete responses created before C{created_at} (seconds), remembered as swept (L{swept}), and the memory
        of those deleted or swept before it.

        @return: a Deferred firing with how many responses were deleted.
        """

    def swept(response_id):
        """@return: a Deferred firing with C{{"id", "tenant"}} of C{response_id} where L{delete_before} swept it
            (within a retention), else None."""


class IBackgroundWatches(Interface):
    """Background responses still to be charged, each watched by one process under a lease (see
    L{gomodel.api.background}): a process that stops or dies leaves its own to another, or to itself
    restarted.

    A watch: C{id} (the response's), C{request_id} (its create's), C{key_id} and C{user_path} (whom it is
    charged to: a managed key's id, C{"master"}, or None; the user path it is attributed to), C{provider},
    C{replica} and C{response} (a dict: the response as created, what asking its instance needs), and
    C{since} (seconds: when it was created).
    """

    def add(watch, owner, lease):
        """Keep C{watch}, watched by C{owner} for C{lease} seconds (renewed by L{renew}).

        @return: a Deferred firing once it is written.
        """

    def renew(owner, lease):
        """Extend every watch of C{owner} by C{lease} seconds from now.

        @return: a Deferred firing once it is written.
        """

    def adopt(owner, lease, limit=100):
        """Take up to C{limit} watches whose lease ran out (or was given up), for C{owner}, for C{lease} seconds.

        @return: a Deferred firing with the watches taken.
        """

    def release(owner):
        """Give up C{owner}'s watches (a process stopping): any process may L{adopt} them at once.

        @return: a Deferred firing once it is written.
        """

    def settle(response_id):
        """Forget the watch of C{response_id}: its response was found over (or watched too long).

        @return: a Deferred firing with True when this call forgot it (so it is charged once, whichever
            process finds it over first), False when it was no longer kept.
        """


class IClaims(Interface):
    """Named leases for singleton duties (sweeps, retention), shared by every process on the store."""

    def claim(name, owner, lease):
        """Take duty C{name} for C{lease} seconds unless another owner holds a live lease on it.

        @return: a Deferred firing with the new fencing token (an int that
            grows with every claim of C{name}), or None when it is held elsewhere.
        """

    def renew(name, owner, token, lease):
        """@return: a Deferred firing with True once extended by C{lease} seconds, or False when lost."""

    def release(name, owner, token):
        """@return: a Deferred firing with None once given up (also when it was already lost)."""


class IUsageStore(Interface):
    """The usage ledger: one record per request that reached an upstream, and per batch line.

    A record has GoModel's usage-row names (C{request_id, timestamp,
    provider, provider_name, model, endpoint, status_code, stream,
    input_tokens, output_tokens, total_tokens, cached_tokens,
    reasoning_tokens, input_cost, output_cost, total_cost, user_path}) and
    ours (C{replica, duration_ms, ttft_ms, client_gone, estimated,
    auth_key_id, outcome, audio_seconds}): L{gomodel.store.records.USAGE_FIELDS}. Records go in as
    tuples in that order (thousands a second: no dict each) and come out as
    dicts with their C{id}, which orders the log.
    """

    def add(rows):
        """Store C{rows} (tuples in C{USAGE_FIELDS} order) in one transaction.

        @return: a Deferred firing with how many were stored; it fails with
            L{gomodel.errors.RowsRejected} (none stored) when a row holds a value
            the table cannot (a text that is not Unicode, a number past its column).
        """

    def summary(start, end, filters=None):
        """Totals of the records with C{start <= timestamp < end}.

        @param filters: as L{log}'s (C{key}, C{keyless}, C{user_path}: that path and those under it, ...).
        @return: a Deferred firing with C{{requests, input_tokens, output_tokens, total_tokens,
            cached_tokens, reasoning_tokens, total_cost (None without prices), errors (the records whose
            C{outcome} is not C{ok}), input_cost, output_cost (None without prices), audio_seconds}}, and its
            C{errors} by kind as L{timeseries} splits them (C{server_errors, client_errors, client_gone,
            stream_broken}).
        """

    def grouped(start, end, by=(), bucket=None, filters=None):
        """Totals of the window (as L{summary}'s) per group, in group order.

        @param filters: as L{log}'s: only the records they match.
        @param by: any of C{provider}, C{provider_name}, C{model}, C{auth_key_id}, C{user_path}.
        @param bucket: seconds (86400: per UTC day): also grouped by C{period}, the bucket's start.
        @return: a Deferred firing with a list of dicts: the group's keys, then the totals.
        """

    def log(start, end, limit, before=None, filters=None, offset=0):
        """Records of the window, newest first by their C{timestamp} (the request's start; ties: the one written
        last first), whatever order they were written in.

        @param before: a record C{id} (the cursor of the previous page): only the records after it in that order
            (an id no record has: those of older ids).
        @param offset: how many of the (older) records to pass over first (GoModel's paging).
        @param filters: any of C{model}, C{provider} (type or name), C{status}, C{outcome}, C{search} (in the request id,
            the model or the provider), C{key} (a managed key's id), C{keyless} (True: the records of no
            managed key, the master key's), C{user_path} (that path and those under it).
        @return: a Deferred firing with C{(records, next cursor or None)}.
        """

    def timeseries(start, end, bucket, filters=None):
        """Totals and latency percentiles of the records with C{start <= timestamp < end}, per time bucket.

        Buckets are C{bucket} seconds long, counted from C{start}: bucket C{k} holds the records with
        C{start + k * bucket <= timestamp < start + (k + 1) * bucket} (C{bucket = end - start}: the
        whole window in one). Percentiles are nearest-rank: of a bucket's C{n} values in order, the
        one at rank C{ceil(p * n)}; records without a C{duration_ms} (or C{ttft_ms}: only streams
        have one; a whole answer's kept before is left out too) are left out of that column's.
        C{filters} (as L{log}'s): only the records they match.

        @return: a Deferred firing with one dict per bucket that has records, oldest first:
            C{period} (the bucket's start, seconds), C{requests, input_tokens, output_tokens,
            total_tokens, errors} (the records whose C{outcome} is not C{ok}), C{errors} by kind (C{client_errors}:
            an error answer of status 400 to 499; C{client_gone}; C{stream_broken}; C{server_errors}: the rest,
            5xx and errors told inside a 200 stream), C{duration_ms_p50, duration_ms_p95,
            ttft_ms_p50, ttft_ms_p95} (None without values).
        """

    def delete_before(timestamp):
        """@return: a Deferred firing with how many records older than C{timestamp} were deleted."""

    def spent(scope, since):
        """What a budget scope spent since C{since}: C{"key:<id>"}, or C{"path:/p"} (that path and below;
        C{"path:/"}: every path and the managed keys without one, not the master key's own requests).

        @return: a Deferred firing with C{(total tokens, total cost)}.
        """

    def spent_many(pairs):
        """L{spent} of each C{(scope, since)} of C{pairs} in one read (a page of keys' budgets: one query for the
        keys that share a C{since}, not one each).

        @return: a Deferred firing with a list of C{(total tokens, total cost)}, in order.
        """


class IKeyStore(Interface):
    """Managed API keys. A record: C{id, hash (the secret's SHA-256, hex), redacted, name,
    description, user_path, created_at, updated_at, expires_at, deactivated_at, models (a list
    or None), rpm, tpm, max_concurrency, budgets (a list), priority, metadata (a dict or None),
    own_cache_salt (bool), budget_resets (a dict: period -> when the key's budget of it was last reset, kept
    while that budget is removed)}. The secret itself is never stored."""

    def add(record):
        """@return: a Deferred firing with the stored record (C{updated_at} set)."""

    def get(key_id):
        """@return: a Deferred firing with the record, or None."""

    def list():
        """@return: a Deferred firing with every record, oldest first."""

    def page(after=None, limit=None):
        """One query's page of the records, oldest first: those after the key C{after} names (None: from the
        first), at most C{limit} (None: every one).

        @return: a Deferred firing with C{(records, has_more)}, or None when no key has the id C{after}.
        """

    def update(key_id, changes):
        """Set the fields in C{changes} (a dict; C{hash} and C{redacted} too: a rotated secret) and C{updated_at}.

        @return: a Deferred firing with the updated record, or None when there is no such key.
        """

    def edit(key_id, change):
        """Set the fields C{change(record)} returns (a dict) and C{updated_at}, reading the record and writing it
        in one transaction: edits made at once apply one after the other, each on what the one before wrote.
        C{change} runs in the store's thread on the stored record; what it raises fails the edit, nothing written.

        @return: a Deferred firing with the updated record, or None when there is no such key.
        """

    def deactivate(key_id, at):
        """Set C{deactivated_at} to C{at} (and C{updated_at}) in one conditional write, where the key is active:
        of deactivations made at once the first one counts, the others leave the key as it is.

        @return: a Deferred firing with the record (deactivated now or before), or None when there is no such key.
        """

    def changed_since(updated_at):
        """@return: a Deferred firing with the records updated after C{updated_at} (float seconds),
        for the processes' key caches."""


class IBudgetStore(Interface):
    """Budgets by user path set through the admin API: C{{user_path, period, max_tokens, max_cost,
    updated_at}}."""

    def list():
        """@return: a Deferred firing with every budget, by user path then period."""

    def put(user_path, period, max_tokens, max_cost):
        """Create or replace the budget of C{user_path} for C{period}.

        @return: a Deferred firing with the stored record.
        """

    def delete(user_path, period):
        """@return: a Deferred firing with True once deleted, or False when there was none."""

    def resets():
        """@return: a Deferred firing with C{{(user_path, period): reset_at}}: when each budget's spending was
        last set back to zero (its configuration's or the admin API's budget)."""

    def reset(targets):
        """Set the spending of each C{(user_path, period)} of C{targets} back to zero, now.

        @return: a Deferred firing with the time of the reset (Unix seconds, the store's clock).
        """


class IStoreService(Interface):
    """A store as one service: the aggregates over one backend, opened and closed together."""

    files = Attribute("The L{IFileStore}.")
    blobs = Attribute("The L{IBlobStore}.")
    batches = Attribute("The L{IBatchStore}.")
    responses = Attribute("The L{IResponseStore}.")
    claims = Attribute("The L{IClaims}.")
    background = Attribute("The L{IBackgroundWatches}.")
    usage = Attribute("The L{IUsageStore}.")
    keys = Attribute("The L{IKeyStore}.")
    budgets = Attribute("The L{IBudgetStore}.")

    def started():
        """@return: a Deferred firing with None once the store is open and migrated; it fails with
        the reason it cannot open."""
