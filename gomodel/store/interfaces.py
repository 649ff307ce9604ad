"""The one seam between the gateway and its persistence (files, batches, responses).

Every method returns a Deferred and never blocks the reactor; no SQL and no
storage layout exist outside an implementation. L{gomodel.store.sqlite} is the
default; a PostgreSQL implementation only has to provide this interface.

Records are plain dicts:

  - a file: C{id, bytes, created_at, filename, purpose, status, expires_at}
  - a batch: C{id, endpoint, input_file_id, completion_window, status,
    output_file_id, error_file_id, created_at, in_progress_at, expires_at,
    finalizing_at, completed_at, failed_at, expired_at, cancelling_at,
    cancelled_at, total, completed, failed, errors (a list or None),
    metadata (a dict or None)}
  - a batch request: C{(line, custom_id, body bytes)}
  - a batch result: C{(line, custom_id, ok, data bytes)}: C{data} is one
    output (C{ok}) or error-file line, without its newline.
  - a stored response: C{id, provider, created_at, previous_response_id,
    status, input_items (a list), response (a dict)}
"""

from zope.interface import Attribute, Interface

# Batch statuses in which the gateway still owes work; resumed at start.
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
# Statuses that end a batch.
TERMINAL = ("completed", "failed", "expired", "cancelled")


class IStore(Interface):
    """Durable files and batches."""

    spool_dir = Attribute(
        "A directory for uploads being received, on the same file system as the "
        "store's contents, so that L{add_file} can take a spooled upload over cheaply.")

    def started():
        """Fires (with None) once the store is open and migrated; fails with the reason it cannot open."""

    # -- files --------------------------------------------------------------

    def add_file(source_path, filename, purpose):
        """Take over the file at C{source_path} (in L{spool_dir}) as a new file; fires with its record."""

    def get_file(file_id):
        """Fires with the file's record, or None."""

    def list_files(purpose=None, after=None, limit=10000, order="desc"):
        """Fires with C{(records, has_more)}, newest first for C{order="desc"}.

        C{after} is a file id: only files after it in that order are listed.
        """

    def delete_file(file_id):
        """Delete the record and the contents; fires with True, or False when there was no such file."""

    def open_file(file_id):
        """Fires with C{(binary file object, size)} for reading the contents (the caller closes it), or None."""

    def read_lines(file_id, offset, max_lines, max_line_bytes):
        """Read up to C{max_lines} lines of a file's contents from byte C{offset}.

        Fires with C{(lines, next_offset)}; C{next_offset} is None at the end of
        the file. A line longer than C{max_line_bytes} comes back as None (and
        is skipped). Lines keep no line ending. Fires with None if there is no
        such file.
        """

    # -- batches ------------------------------------------------------------

    def add_batch(batch):
        """Insert a new batch record; fires with it."""

    def get_batch(batch_id):
        """Fires with the batch record, or None."""

    def list_batches(after=None, limit=20):
        """Fires with C{(records, has_more)}, newest first; C{after} is a batch id."""

    def update_batch(batch_id, changes, only_if_status=None):
        """Apply C{changes} (column -> value) to a batch.

        With C{only_if_status} (a tuple), only while its status is one of
        those. Fires with the updated record, or None when nothing was changed.
        """

    def unfinished_batches():
        """Fires with the records of every batch whose status is in L{UNFINISHED}, oldest first."""

    def add_batch_requests(batch_id, requests):
        """Store validated requests C{(line, custom_id, body)} of a batch."""

    def clear_batch_requests(batch_id):
        """Forget the stored requests of a batch (a validation that starts over, or failed)."""

    def pending_requests(batch_id, after_line, limit):
        """Fires with up to C{limit} requests C{(line, custom_id, body)} past C{after_line}
        that have no result yet, in line order."""

    def record_results(batch_id, results):
        """Persist results C{(line, custom_id, ok, data)} and count them, in one transaction.

        A line that already has a result keeps it and is not counted again
        (exactly once, whatever happens around a restart). Fires with the
        number of results newly recorded.
        """

    def read_results(batch_id, after_line, limit):
        """Fires with up to C{limit} results C{(line, custom_id, ok, data)} past C{after_line}, in line order."""

    def finalize_batch(batch_id, changes, only_if_status=None):
        """Write the batch's output and error files from its results, then apply C{changes}.

        The files (purpose C{batch_output}) are registered and the batch gets
        their ids (None where there is nothing to write) in the same
        transaction as C{changes}; the stored requests are dropped. Fires with
        the updated record, or None (and nothing written) when the batch's
        status is not in C{only_if_status}.
        """

    # -- responses ----------------------------------------------------------

    def put_response(record):
        """Insert or replace a stored response (see the module docstring); fires with None."""

    def keep_response(record):
        """L{put_response} without waiting for it: returns None, a failure is logged.

        Reads and writes asked for after it see it. C{record["response_json"]},
        when given, is the response's JSON as bytes (stored as it is).
        """

    def get_response(response_id):
        """Fires with the stored response record, or None."""

    def delete_response(response_id):
        """Fires with True once deleted, or False when there was no such response."""

    def delete_responses_before(created_at):
        """Delete responses created before C{created_at} (seconds); fires with how many."""
