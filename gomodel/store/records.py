"""What the stores keep, as plain values: statuses, ids and the record shapes.

Records are plain dicts:

  - a file: C{id, bytes, created_at, filename, purpose, status, expires_at, tenant}
  - a batch: C{id, endpoint, input_file_id, completion_window, status,
    output_file_id, error_file_id, created_at, in_progress_at, expires_at,
    finalizing_at, completed_at, failed_at, expired_at, cancelling_at,
    cancelled_at, total, completed, failed, errors (a list or None),
    metadata (a dict or None), tenant, auth_key_id (the managed key that made it, or None),
    output_expires_after, token_usage (OpenAI's batch C{usage}, a dict, once ended; else None), model
    (the one its lines name, once validated; else None)}
  - a batch request: C{(line, custom_id, body bytes)}
  - a batch result: C{(line, custom_id, ok, data bytes)}: C{data} is one
    output (C{ok}) or error-file line, without its newline.
  - a stored response: C{id, provider, created_at, previous_response_id,
    status, input_items (a list), response (a dict), tenant}

A C{tenant} is who owns the object (see L{gomodel.auth.tenancy}).
"""

import os
import socket
import uuid
from functools import cache
from typing import NamedTuple

# Batch statuses in which the gateway still owes work; resumed by whoever claims them.
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
# Statuses that end a batch.
TERMINAL = ("completed", "failed", "expired", "cancelled")
# The purpose of a message batch's input file (its requests as batch lines, L{gomodel.anthropic.batches}): the
# gateway's own, which C{/v1/files} neither lists, shows, serves nor deletes (its batch removes it).
MESSAGE_BATCH_PURPOSE = "message_batch"
# A batch's kind (its C{kind} column): an OpenAI batch (C{/v1/batches}) or a message batch (C{/v1/messages/batches}).
# Each API shows, pages, cancels and serves the results of its own kind only.
OPENAI_BATCH = "batch"
MESSAGE_BATCH = "message_batch"
# What an error result holds where its request had no answer, canceled or expired (L{gomodel.batches.concluding}'s
# codes): a message batch's such results stay when its error file expired, for its request_counts count them.
UNANSWERED_RESULTS = (b'"response":null,"error":{"code":"batch_cancelled"',
                      b'"response":null,"error":{"code":"batch_expired"')


def tenant_list(tenant) -> list:
    """A listing's C{tenant} argument (one tenant, a sequence of them, or None: everyone's) as a list of
    tenants (empty: everyone's)."""
    if tenant is None:
        return []
    return [tenant] if isinstance(tenant, str) else list(tenant)


def last_within(sizes, max_bytes: int):
    """The last key a page of at most C{max_bytes} bytes takes from C{sizes}, C{(key, size)} rows in order: rows
    are taken while their sizes add up to at most C{max_bytes}, the first whatever its size; None for no rows."""
    last, total = None, 0
    for key, size in sizes:
        total += size
        if last is not None and total > max_bytes:
            break
        last = key
    return last


def duplicates_query(mark: str) -> str:
    """The query of L{gomodel.store.interfaces.IBatchStore.duplicates} (batch id, limit), with C{mark} the
    database's placeholder: each request past the first of its C{custom_id}, sorted by the database (on
    disk where it must), not in memory here; a C{custom_id} cut to its first 257 characters (what an error
    shows of it: L{gomodel.errors.shown})."""
    return ("SELECT line, substr(custom_id, 1, 257) FROM (SELECT line, custom_id, ROW_NUMBER() OVER (PARTITION BY "
            f"custom_id ORDER BY line) AS n FROM batch_requests WHERE batch_id = {mark}) d WHERE n > 1 ORDER BY line "
            f"LIMIT {mark}")


class FileResultsSQL(NamedTuple):
    """A database's statements for L{drop_file_results}, each with its placeholders: C{purpose} (a file's, by its
    id), C{batches} (the batches, C{(id, kind, ok)}, whose output or error file it is: file id twice),
    C{results} (a batch's results of that C{ok}) and C{answered} (a message batch's error results but the
    unanswered ones, L{UNANSWERED_RESULTS})."""

    purpose: str
    batches: str
    results: str
    answered: str


def drop_file_results(conn, file_id, kind, sql: FileResultsSQL) -> int:
    """Drop the results that the batch output file C{file_id} holds (of C{kind}'s batches only, where not None),
    on C{conn} in its transaction (the SQL the C{sql} of its database): how many. An upload's is 0, its batches
    not looked at; a message batch's error file holds none of its unanswered results (they stay)."""
    purpose = conn.execute(sql.purpose, (file_id,)).fetchone()
    if purpose is None or purpose[0] != "batch_output":
        return 0
    dropped = 0
    for batch_id, batch_kind, ok in conn.execute(sql.batches, (file_id, file_id)).fetchall():
        if kind is not None and batch_kind != kind:
            continue
        if not ok and batch_kind == MESSAGE_BATCH:
            dropped += conn.execute(sql.answered, (batch_id, *UNANSWERED_RESULTS)).rowcount
        else:
            dropped += conn.execute(sql.results, (batch_id, ok)).rowcount
    return dropped


def within_bytes(conn, source, line, size, where, args, limit, max_bytes, mark):
    """C{(where, args)} narrowed to the rows of C{source} a page of at most C{max_bytes} takes (L{last_within}), in
    C{line} order, C{limit} at most: their C{size}s (C{length}, C{octet_length}: a blob's length without the blob)
    read first; as they are without C{max_bytes}; None where no row is there. C{mark}: the driver's placeholder."""
    if max_bytes is None:
        return where, args
    last = last_within(conn.execute(f"SELECT {line}, {size} FROM {source} WHERE {where} ORDER BY {line} LIMIT {mark}",
                                    (*args, limit)), max_bytes)
    if last is None:
        return None
    return f"{where} AND {line} <= {mark}", [*args, last]


def new_file_id() -> str:
    """A fresh file id (also the id of its contents in the blob store)."""
    return "file-" + uuid.uuid4().hex


def process_owner() -> str:
    """An owner id for claims, unique per process (host and its pid namespace, pid and a random part)."""
    return f"{_here()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@cache
def _here() -> str:
    """This host's name, with its pid namespace where there is one to name (C{name/inode}): containers sharing
    their host's name (host networking) each number their processes apart. Read once (a process's namespace
    does not change): L{owner_is_gone} asks for each batch holder at each claim."""
    try:
        return f"{socket.gethostname()}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # (no /proc: not Linux)
        return socket.gethostname()


def owner_is_gone(owner: str) -> bool:
    """Whether C{owner} (a L{process_owner} id) names a process of this host and pid namespace that no longer
    exists.

    Such a process's leases can be taken over at once instead of after they
    expire (a gateway restarted after a crash resumes at once). Unknown or
    other hosts' (or containers') owners are never "gone": their leases run out by themselves.
    """
    host, _, rest = owner.partition(":")
    pid, _, _ = rest.partition(":")
    if host != _here() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class LeaseLost(Exception):
    """A fenced write by a claim holder whose token is no longer current: nothing was written."""


# The fields of a usage record (GoModel's usage-row names, then ours), in their stored order. C{outcome} is what
# the request came to (L{gomodel.http.context}'s: C{ok}, C{error}, C{client_gone}, C{stream_broken}): a stream
# that failed after its 200 went out is no success; every one but C{ok} counts in a summary's C{errors}.
USAGE_FIELDS = ("request_id", "timestamp", "provider", "provider_name", "replica", "model", "endpoint",
                "status_code", "stream", "input_tokens", "output_tokens", "total_tokens", "cached_tokens",
                "reasoning_tokens", "input_cost", "output_cost", "total_cost", "user_path", "auth_key_id",
                "duration_ms", "ttft_ms", "client_gone", "estimated", "outcome", "audio_seconds")
# The totals of a window or group of usage records (IUsageStore.summary's and grouped's), in their order
# (C{refused}: those the gateway's own limits refused, of its C{errors}).
USAGE_TOTALS = ("requests", "input_tokens", "output_tokens", "total_tokens", "cached_tokens", "reasoning_tokens",
                "total_cost", "errors", "refused", "input_cost", "output_cost", "audio_seconds")
