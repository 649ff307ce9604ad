"""IUsageStore contract (every backend): rows in, totals, groupings, the log's filters and cursor, spent, and the
time series with its percentiles."""

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from gomodel.errors import RowsRejected
from gomodel.store.codec import OUTCOME
from gomodel.store.interfaces import IUsageStore
from gomodel.store.records import USAGE_FIELDS
from tests.postgres import pg_database  # noqa: F401 (a fixture)
from tests.stores import backend, sqlite_store, store  # noqa: F401 (fixtures)


ERROR_SPLIT = ("errors", "client_errors", "server_errors", "client_gone", "stream_broken")


def row(request_id, timestamp, **values):
    base = {"request_id": request_id, "timestamp": timestamp, "provider": "vllm", "provider_name": "vllm-a",
            "replica": 0, "model": "vllm-a/m", "endpoint": "/v1/chat/completions", "status_code": 200,
            "stream": False, "input_tokens": 10, "output_tokens": 5, "total_tokens": 15, "cached_tokens": 2,
            "reasoning_tokens": 0, "input_cost": None, "output_cost": None, "total_cost": None, "user_path": None,
            "auth_key_id": None, "duration_ms": 12.5, "ttft_ms": None, "client_gone": False, "estimated": False, "outcome": "ok",
            "audio_seconds": None}
    base.update(values)
    return tuple(base[name] for name in USAGE_FIELDS)


@pytest_twisted.ensureDeferred
async def test_usage_is_totalled_grouped_logged_and_spent(store):
    usage = store.usage
    verifyObject(IUsageStore, usage)
    assert await usage.add([
        row("r1", 100.0),
        row("r2", 86500.0, provider_name="vllm-b", model="vllm-b/m", stream=True, total_cost=0.5,
            input_cost=0.125, output_cost=0.375, auth_key_id="k_1", user_path="/team/a", audio_seconds=90.5),
        row("r3", 86600.0, status_code=503, input_tokens=None, output_tokens=None, total_tokens=None,
            auth_key_id="k_1", user_path="/team/a/x", client_gone=1, total_cost=0.25, input_cost=0.25, outcome="error"),  # flags as the ledger's 0/1
        row("other-4", 90000.0, user_path="/team/ab", stream=0, estimated=1),
    ]) == 4
    totals = await usage.summary(0, 1e9)
    assert totals == {"requests": 4, "input_tokens": 30, "output_tokens": 15, "total_tokens": 45,
                      "cached_tokens": 8, "reasoning_tokens": 0, "total_cost": 0.75, "errors": 1, "refused": 0,
                      "input_cost": 0.375, "output_cost": 0.375, "audio_seconds": 90.5, "client_errors": 0,
                      "server_errors": 1, "client_gone": 0, "stream_broken": 0, "refused": 0}
    assert (await usage.summary(0, 50))["requests"] == 0
    assert (await usage.summary(0, 50))["total_cost"] is None
    assert (await usage.summary(0, 50))["input_cost"] is None
    # The log's filters: a key's records, the master key's, a path and those under it (not /team/ab).
    assert await usage.summary(0, 1e9, {"key": "k_1"}) == {
        "requests": 2, "input_tokens": 10, "output_tokens": 5, "total_tokens": 15, "cached_tokens": 4,
        "reasoning_tokens": 0, "total_cost": 0.75, "errors": 1, "refused": 0, "input_cost": 0.375, "output_cost": 0.375,
        "audio_seconds": 90.5, "client_errors": 0, "server_errors": 1, "client_gone": 0, "stream_broken": 0, "refused": 0}
    assert (await usage.summary(0, 1e9, {"keyless": True}))["requests"] == 2
    assert (await usage.summary(0, 1e9, {"user_path": "/team/a"}))["requests"] == 2
    assert (await usage.summary(0, 1e9, {"user_path": "/team"}))["requests"] == 3
    assert (await usage.summary(86550, 1e9, {"user_path": "/team/a", "key": "k_1"}))["total_tokens"] == 0
    assert (await usage.summary(0, 1e9, {"user_path": "/nobody"}))["total_cost"] is None
    days = await usage.grouped(0, 1e9, by=("provider_name",), bucket=86400)
    assert [(g["period"], g["provider_name"], g["requests"]) for g in days] == [
        (0, "vllm-a", 1), (86400, "vllm-a", 2), (86400, "vllm-b", 1)]
    by_key = await usage.grouped(0, 1e9, by=("auth_key_id",))
    assert [(g["auth_key_id"], g["total_tokens"]) for g in by_key] == [(None, 30), ("k_1", 15)]  # (every store)
    # the log's filters narrow a grouping and a time series too (a clause each, as the summary's)
    days = await usage.grouped(0, 1e9, by=("user_path",), bucket=86400, filters={"user_path": "/team", "status": 200})
    assert [(g["period"], g["user_path"], g["requests"]) for g in days] == [
        (86400, "/team/a", 1), (86400, "/team/ab", 1)]
    assert await usage.grouped(0, 1e9, filters={"search": "other", "keyless": True, "model": "vllm-a/m",
                                                 "provider": "vllm"}) == [dict(
        requests=1, input_tokens=10, output_tokens=5, total_tokens=15, cached_tokens=2, reasoning_tokens=0,
        total_cost=None, errors=0, refused=0, input_cost=None, output_cost=None, audio_seconds=0)]
    series = await usage.timeseries(0, 172800, 86400, {"key": "k_1"})
    assert [(s["period"], s["requests"], s["errors"], s["duration_ms_p50"]) for s in series] == [(86400, 2, 1, 12.5)]

    records, cursor = await usage.log(0, 1e9, 2)
    assert [r["request_id"] for r in records] == ["other-4", "r3"]
    assert records[1]["client_gone"] is True and records[0]["estimated"] is True
    assert records[1]["stream"] is False and isinstance(records[1]["id"], int)
    records, cursor = await usage.log(0, 1e9, 2, before=cursor)
    assert ([r["request_id"] for r in records], cursor) == (["r2", "r1"], None)
    assert records[0]["stream"] is True
    paged, cursor = await usage.log(0, 1e9, 2, offset=1)  # (GoModel's paging: after the first record)
    assert [r["request_id"] for r in paged] == ["r3", "r2"] and cursor == paged[1]["id"]
    assert (await usage.log(0, 1e9, 2, before=cursor, offset=1))[0] == []  # (the offset counts from the cursor)
    filtered = {name: [r["request_id"] for r in (await usage.log(0, 1e9, 10, filters={name: value}))[0]]
                for name, value in (("model", "vllm-b/m"), ("provider", "vllm-b"), ("provider", "vllm"),
                                    ("status", 503), ("search", "other"), ("key", "k_1"), ("user_path", "/team/a"),
                                    ("keyless", True))}
    assert filtered == {"model": ["r2"], "provider": ["other-4", "r3", "r2", "r1"], "status": ["r3"],
                        "search": ["other-4"], "key": ["r3", "r2"], "user_path": ["r3", "r2"],
                        "keyless": ["other-4", "r1"]}

    await usage.add([row("pathless-5", 90100.0, auth_key_id="k_2", total_tokens=7)])
    # the root: every path and the keys without one (r1, the master key's own, is not)
    assert await usage.spent("path:/", 0) == (15 + 15 + 7, 0.75)

    assert await usage.spent("key:k_1", 0) == (15, 0.75)
    assert await usage.spent("path:/team/a", 86550) == (0, 0.25)  # the path and below, not /team/ab
    assert await usage.spent("path:/team", 0) == (30, 0.75)
    assert await usage.spent("key:k_none", 0) == (0, 0)
    pairs = [("key:k_1", 0), ("path:/team", 0), ("key:k_2", 0), ("key:k_none", 0), ("key:k_1", 90000),
             ("path:/team/a", 86550), ("key:k_1", 0)]
    assert [tuple(f) for f in await usage.spent_many(pairs)] == [
        tuple(await usage.spent(scope, since)) for scope, since in pairs]  # (one read: the keys by their since)
    assert await usage.delete_before(86550) == 2
    assert (await usage.summary(0, 1e9))["requests"] == 3
    # (what the deleted rows spent is gone from every scope they counted in: PostgreSQL's day sums too)
    assert [tuple(await usage.spent(scope, 0)) for scope in ("path:/team/a", "path:/team", "path:/", "key:k_1")] == [
        (0, 0.25), (15, 0.25), (15 + 7, 0.25), (0, 0.25)]


@pytest_twisted.ensureDeferred
async def test_what_a_scope_spent_counts_the_rows_written_after_an_earlier_read_of_it(store):
    """A budget's sum is read again every second (BudgetBook.follow): the rows written since count, a late one
    (a timestamp before rows read already) too, and the rows before its since or of another scope do not."""
    usage = store.usage
    await usage.add([row("a1", 1000.0, auth_key_id="k_1", user_path="/t", total_tokens=10, total_cost=0.5),
                     row("a0", 10.0, auth_key_id="k_1", user_path="/t", total_tokens=100)])
    assert await usage.spent("key:k_1", 500) == (10, 0.5)
    assert await usage.spent("path:/t", 500) == (10, 0.5)
    await usage.add([row("a2", 2000.0, auth_key_id="k_1", user_path="/t/x", total_tokens=20),
                     row("late", 900.0, auth_key_id="k_1", total_tokens=5, total_cost=0.25),
                     row("early", 400.0, auth_key_id="k_1", total_tokens=1000),
                     row("other", 2000.0, auth_key_id="k_2", user_path="/u", total_tokens=7)])
    assert await usage.spent("key:k_1", 500) == (35, 0.75)
    assert await usage.spent("path:/t", 500) == (30, 0.5)
    assert await usage.spent("key:k_1", 500) == (35, 0.75)  # (nothing new: the same)
    assert await usage.spent("key:k_1", 950) == (30, 0.5)  # another since: its own sum
    await usage.add([row("a3", 3000.0, auth_key_id="k_1", total_tokens=1)])
    assert await usage.spent("key:k_1", 500) == (36, 0.75)


@pytest_twisted.ensureDeferred
async def test_a_scope_read_again_after_its_rows_were_deleted_counts_the_rows_written_since(sqlite_store):
    """SQLite gives a deleted largest id again: after retention deleted every row (in this process or another), the
    rows written since carry ids a scope's earlier read saw already, and are counted all the same."""
    usage, db = sqlite_store.usage, sqlite_store.usage._db
    await usage.add([row("r%d" % i, 1000.0 + i, auth_key_id="k_1") for i in range(5)])
    assert await usage.spent("key:k_1", 0) == (75, 0)

    def deleted_elsewhere():
        with db.transaction() as conn:
            conn.execute("DELETE FROM usage")
    await db.run(deleted_elsewhere)
    await usage.add([row("n1", 2000.0, auth_key_id="k_1", total_tokens=7)])
    assert await usage.spent("key:k_1", 0) == (7, 0)
    await usage.add([row("n%d" % i, 2000.0 + i, auth_key_id="k_1", total_tokens=1) for i in range(2, 9)])
    await usage.delete_before(2001.0)
    await usage.add([row("n9", 3000.0, auth_key_id="k_1", total_tokens=2)])
    assert await usage.spent("key:k_1", 0) == (9, 0)


def _counting(db):
    """C{(steps, counted)}: C{counted(f, *args)}, run in the store's thread, runs C{f} and appends to C{steps} the
    SQLite virtual machine's steps it took (in hundreds)."""
    steps = []

    def counted(f, *args):
        conn = db.conn()
        steps.append(0)

        def step():
            steps[-1] += 1
        conn.set_progress_handler(step, 100)
        try:
            return f(*args)
        finally:
            conn.set_progress_handler(None, 100)
    return steps, counted


@pytest_twisted.ensureDeferred
async def test_reading_again_what_a_scope_spent_reads_only_the_rows_written_since(sqlite_store):
    """A budget's sum read again reads the rows written since the last read, not every row of its period again:
    with the ledger growing by thousands of rows a second, each worker's read every second would cost more and
    more (a second's rows times the seconds since the period began)."""
    usage, db = sqlite_store.usage, sqlite_store.usage._db
    await usage.add([row("r%d" % i, 1000.0 + i, auth_key_id="k_1") for i in range(3000)])
    steps, counted = _counting(db)
    assert await db.run(counted, usage._spent, "key:k_1", 0) == (45000, 0)
    await usage.add([row("new", 9000.0, auth_key_id="k_1")])
    assert await db.run(counted, usage._spent, "key:k_1", 0) == (45015, 0)
    assert steps[1] * 20 < steps[0], steps


@pytest_twisted.ensureDeferred
async def test_the_first_read_of_what_a_path_spent_reads_the_paths_rows_by_its_index(sqlite_store):
    """A path scope's first read (a process's start, each new period, after a reset or the retention) read every
    row of the table (its prefix had no index: 0.37 s at 500k rows); now the path's rows and those below it."""
    usage, db = sqlite_store.usage, sqlite_store.usage._db
    await usage.add([row("r%d" % i, 1000.0 + i, user_path="/t/b%d" % i, total_tokens=1) for i in range(3000)]
                    + [row("a", 1000.0, user_path="/t/a"), row("ax", 1000.0, user_path="/t/a/x"),
                       row("ab", 1000.0, user_path="/t/ab")])
    steps, counted = _counting(db)
    assert await db.run(counted, usage._spent, "path:/t", 0) == (3045, 0)  # (every row)
    assert await db.run(counted, usage._spent, "path:/t/a", 0) == (30, 0)
    assert steps[1] * 20 < steps[0], steps


@pytest_twisted.ensureDeferred
async def test_the_log_is_newest_first_by_the_requests_time_whatever_order_its_records_were_written_in(store):
    """A record is written when its request ends (a long stream's after the requests begun and ended meanwhile), by
    whichever process served it: the log, and each of its pages, is newest first by the request's time (ties: the
    one written last first). Before, it was in the order written: the dashboard's request log showed a stream begun
    at 10:00 above the requests of 10:05."""
    usage = store.usage
    await usage.add([row("a", 300.0), row("b", 200.0), row("c", 300.0)])
    await usage.add([row("stream", 100.0), row("late", 250.0)])
    records, cursor = await usage.log(0, 1e9, 2)
    assert [r["request_id"] for r in records] == ["c", "a"]
    records, cursor = await usage.log(0, 1e9, 2, before=cursor)
    assert [r["request_id"] for r in records] == ["late", "b"]
    records, cursor = await usage.log(0, 1e9, 2, before=cursor)
    assert ([r["request_id"] for r in records], cursor) == (["stream"], None)
    paged, cursor = await usage.log(0, 1e9, 2, offset=1)
    assert [r["request_id"] for r in paged] == ["a", "late"]
    assert [r["request_id"] for r in (await usage.log(0, 1e9, 5, before=cursor))[0]] == ["b", "stream"]


@pytest_twisted.ensureDeferred
async def test_the_log_search_matches_its_text_literally(store):
    """C{%}, C{_} and the escape character are no LIKE wildcards: a search finds the ids holding its text
    (in any case)."""
    assert await store.usage.add([row(request_id, 100.0 + i) for i, request_id in
                                  enumerate(("a_b", "axb", "a%b", "a\\b", "a\\%b", "ab"))]) == 6

    async def found(text):
        return sorted(r["request_id"] for r in (await store.usage.log(0, 1e9, 10, filters={"search": text}))[0])

    assert await found("_") == ["a_b"]
    assert await found("%") == ["a%b", "a\\%b"]
    assert await found("\\") == ["a\\%b", "a\\b"]
    assert await found("\\%") == ["a\\%b"]
    assert await found("a_b") == ["a_b"]
    assert await found("a%") == ["a%b"]
    assert await found("b") == ["a%b", "a\\%b", "a\\b", "a_b", "ab", "axb"]
    assert await found("A_B") == ["a_b"]  # regardless of case, on every store (SQLite's LIKE, PostgreSQL's ILIKE)


def series_row(timestamp, *, status=200, tokens=(10, 5), duration=None, ttft=None, request_id="r"):
    values = dict.fromkeys(USAGE_FIELDS)
    values.update(request_id=request_id, timestamp=timestamp, provider="vllm", provider_name="vllm",
                  model="vllm/m", endpoint="/v1/chat/completions", status_code=status, stream=ttft is not None,
                  input_tokens=tokens[0], output_tokens=tokens[1], total_tokens=sum(tokens),
                  duration_ms=duration, ttft_ms=ttft, client_gone=False, estimated=False,
                  outcome="ok" if status < 400 else "error")
    return tuple(values[name] for name in USAGE_FIELDS)


@pytest_twisted.ensureDeferred
async def test_a_flush_of_many_rows_writes_each_as_it_is(store):
    rows = [row(f"r{i}", 1000.0 + i, input_tokens=i, total_cost=None if i % 2 else i / 4, user_path="/t" if i % 3 else None,
                ttft_ms=i / 8, stream=i % 2) for i in range(1003)]
    assert await store.usage.add(rows) == 1003
    records, more = await store.usage.log(0, 1e9, 2000)
    assert more is None and len(records) == 1003
    for record, expected in zip(reversed(records), rows):  # (newest first)
        assert tuple(record[name] for name in USAGE_FIELDS) == tuple(
            bool(value) if name in ("stream", "client_gone", "estimated") else value
            for name, value in zip(USAGE_FIELDS, expected))


@pytest_twisted.ensureDeferred
async def test_texts_and_numbers_at_their_edges_are_written_as_they_are(store):
    rows = [row("r-\t\\N\n", 1000.1 + 1e-9, model="vllm-a/é\u2028\\.\r", user_path="", auth_key_id="k\x7f",
                input_tokens=2**63 - 1, total_tokens=0, replica=2**31 - 1, duration_ms=1e-300, ttft_ms=0.1 + 0.2,
                total_cost=1 / 3, stream=1, client_gone=1, estimated=0),
            row("r-none", 1000.2, model=None, endpoint="", input_tokens=None, output_tokens=None, total_tokens=None,
                cached_tokens=None, reasoning_tokens=None, duration_ms=None, status_code=None)]
    assert await store.usage.add(rows) == 2
    records, _ = await store.usage.log(0, 1e9, 10)
    for record, expected in zip(reversed(records), rows):
        assert tuple(record[name] for name in USAGE_FIELDS) == tuple(
            bool(value) if name in ("stream", "client_gone", "estimated") else value
            for name, value in zip(USAGE_FIELDS, expected))


@pytest_twisted.ensureDeferred
async def test_rows_with_a_value_no_column_can_hold_are_rejected_and_none_is_written(store):
    for request_id, odd in (("odd", {"model": "vllm-a/\ud800"}), ("odd", {"input_tokens": 2**63}), (None, {})):
        with pytest.raises(RowsRejected):
            await store.usage.add([row("good", 1000.0), row(request_id, 1000.5, **odd)])
    assert (await store.usage.summary(0, 1e9))["requests"] == 0
    assert await store.usage.add([row("good", 1000.0)]) == 1  # the store goes on


@pytest_twisted.ensureDeferred
async def test_timeseries_buckets_totals_and_nearest_rank_percentiles(store):
    verifyObject(IUsageStore, store.usage)
    # Bucket 0 (1000..1060): 20 requests, durations 1..20 ms, ttft on the even ones; one error.
    rows = [series_row(1000 + i, duration=float(i + 1), ttft=float(i + 1) if i % 2 else None,
                status=500 if i == 3 else 200) for i in range(20)]
    # Bucket 2 (1120..1180): one request without a duration; bucket 1 has none.
    rows.append(series_row(1150.5, tokens=(7, 0)))
    rows.append(series_row(999.9))  # before the window
    rows.append(series_row(1180.0))  # at its end: outside
    assert await store.usage.add(rows) == 23

    series = await store.usage.timeseries(1000, 1180, 60)
    assert [s["period"] for s in series] == [1000, 1120]
    first, last = series
    assert (first["requests"], first["input_tokens"], first["output_tokens"], first["total_tokens"],
            first["errors"]) == (20, 200, 100, 300, 1)
    # nearest rank: p50 of 20 values is the 10th, p95 the 19th
    assert (first["duration_ms_p50"], first["duration_ms_p95"]) == (10.0, 19.0)
    # ttft values 2, 4, ..., 20 (10 of them): p50 the 5th (10), p95 the 10th (20)
    assert (first["ttft_ms_p50"], first["ttft_ms_p95"]) == (10.0, 20.0)
    assert (last["requests"], last["input_tokens"], last["errors"]) == (1, 7, 0)
    assert last["duration_ms_p50"] is None and last["ttft_ms_p95"] is None

    # The whole window in one bucket.
    (whole,) = await store.usage.timeseries(1000, 1180, 180)
    assert (whole["period"], whole["requests"], whole["duration_ms_p50"], whole["duration_ms_p95"]) == (
        1000, 21, 10.0, 19.0)
    # One value: it is every percentile.
    (single,) = await store.usage.timeseries(1005, 1006, 1)
    assert (single["duration_ms_p50"], single["duration_ms_p95"]) == (6.0, 6.0)
    assert await store.usage.timeseries(2000, 3000, 60) == []


@pytest_twisted.ensureDeferred
async def test_time_to_first_token_is_a_streams_only(store):
    """A whole answer's first byte is its end: the time series' TTFT percentiles are of streams alone (records
    kept before the ledger kept a TTFT for streams only have one on whole answers too)."""
    whole = list(series_row(1010, duration=900.0, ttft=900.0))
    whole[USAGE_FIELDS.index("stream")] = False
    assert await store.usage.add([series_row(1000, duration=50.0, ttft=5.0), tuple(whole)]) == 2
    (bucket,) = await store.usage.timeseries(1000, 1060, 60)
    assert (bucket["requests"], bucket["duration_ms_p95"], bucket["ttft_ms_p50"], bucket["ttft_ms_p95"]) == (
        2, 900.0, 5.0, 5.0)


@pytest_twisted.ensureDeferred
async def test_errors_are_the_records_whose_outcome_is_not_ok_whatever_their_status(store):
    """A stream that broke or failed in band after its 200 is an error of every view (its C{outcome}); a client
    that left (499) is one as before; the log filters by outcome."""
    usage = store.usage
    await usage.add([row("ok", 100.0), row("broken", 101.0, outcome="stream_broken", stream=True),
                     row("in-band", 102.0, outcome="error", stream=True),
                     row("gone", 103.0, status_code=499, client_gone=True, outcome="client_gone"),
                     row("older", 104.0, status_code=502, outcome=None)])  # (an older gateway's: by its status)
    assert (await usage.summary(0, 1e9))["errors"] == 4
    assert [g["errors"] for g in await usage.grouped(0, 1e9, by=("model",), bucket=86400)] == [4]
    assert [s["errors"] for s in await usage.timeseries(0, 86400, 86400)] == [4]
    records, _ = await usage.log(0, 1e9, 10, filters={"outcome": "error"})
    assert [(r["request_id"], r["outcome"]) for r in records] == [("older", "error"), ("in-band", "error")]
    records, _ = await usage.log(0, 1e9, 10, filters={"outcome": "stream_broken"})
    assert [(r["request_id"], r["status_code"], r["outcome"]) for r in records] == [("broken", 200, "stream_broken")]
    assert (await usage.summary(0, 1e9, {"outcome": "ok"}))["requests"] == 1


@pytest_twisted.ensureDeferred
async def test_the_time_series_tells_each_kind_of_error_apart(store):
    """Each bucket of the time series (the overview's) splits its C{errors} by what they were: C{client_errors}
    (an error answer of status 400 to 499: a bad request, the upstream's 429), C{server_errors} (5xx, a timeout's
    504, an error told inside a 200 stream, an older gateway's record by its status), C{client_gone} (the client
    left: 499) and C{stream_broken}; the four add up to C{errors} (before, one count of them all)."""
    await store.usage.add([row("ok", 100.0), row("bad", 101.0, status_code=400, outcome="error"),
                           row("limited", 102.0, status_code=429, outcome="error"),
                           row("timeout", 103.0, status_code=504, outcome="error"),
                           row("in-band", 104.0, status_code=200, outcome="error", stream=True),
                           row("older", 105.0, status_code=502, outcome=None),
                           row("gone", 106.0, status_code=499, client_gone=True, outcome="client_gone"),
                           row("gone-older", 107.0, status_code=499, client_gone=True, outcome=None),
                           row("broken", 108.0, outcome="stream_broken", stream=True),
                           row("later", 200.0, status_code=404, outcome="error")])
    first, second = await store.usage.timeseries(0, 300, 150)
    assert {name: first[name] for name in ("requests", "errors", "client_errors", "server_errors", "client_gone",
                                           "stream_broken")} == {
        "requests": 9, "errors": 8, "client_errors": 2, "server_errors": 3, "client_gone": 2, "stream_broken": 1}
    assert (second["errors"], second["client_errors"], second["server_errors"], second["client_gone"],
            second["stream_broken"]) == (1, 1, 0, 0, 0)
    # a grouping's rows count the refusals of the gateway's own limits (of their errors)
    await store.usage.add([row("over", 201.0, status_code=429, outcome="refused", input_tokens=0, output_tokens=0,
                               total_tokens=0)])
    assert [(g["requests"], g["errors"], g["refused"]) for g in await store.usage.grouped(150, 300)] == [(2, 2, 1)]
    assert (await store.usage.timeseries(150, 300, 150))[0]["refused"] == 1
    # the summary (usage/summary's) splits them as the series does, a window with none of them zeros
    totals = await store.usage.summary(0, 300)
    assert {name: totals[name] for name in ERROR_SPLIT} == {
        "errors": 10, "client_errors": 3, "server_errors": 3, "client_gone": 2, "stream_broken": 1}
    assert {name: (await store.usage.summary(0, 50))[name] for name in ERROR_SPLIT} == dict.fromkeys(ERROR_SPLIT, 0)


# Records written before the outcome column, and one an older gateway writes after it (a rolling upgrade): their
# outcome is read from their status, the table not rewritten by the migration.
OLD_ROWS = (("r-ok", 200, False), ("r-bad", 503, False), ("r-gone", 499, True))
DERIVED = [("r-ok", "ok"), ("r-bad", "error"), ("r-gone", "client_gone"), ("r-older-gateway", "error")]


def test_the_records_of_an_older_sqlite_gateway_get_their_outcome_from_their_status(tmp_path):
    import sqlite3

    from gomodel.store.sqlite.migrations import MIGRATIONS, migrate

    conn = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    try:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (15)")
        for version, statements in MIGRATIONS:
            if version <= 15:
                for statement in statements:
                    conn.execute(statement)
        conn.executemany("INSERT INTO usage (request_id, timestamp, status_code, client_gone) VALUES (?, 1, ?, ?)",
                         OLD_ROWS)
        migrate(conn)
        conn.execute("INSERT INTO usage (request_id, timestamp, status_code) VALUES ('r-older-gateway', 1, 500)")
        assert conn.execute(f"SELECT request_id, {OUTCOME} FROM usage ORDER BY id").fetchall() == DERIVED
    finally:
        conn.close()


def test_the_records_of_an_older_postgresql_gateway_get_their_outcome_from_their_status(pg_database):
    import psycopg

    from gomodel.store.postgresql.migrations import MIGRATIONS, migrate
    from tests import postgres

    with psycopg.connect(postgres.url(pg_database), autocommit=True) as conn:
        migrate(conn, [m for m in MIGRATIONS if m[0] <= 16])
        with conn.cursor() as cursor:
            cursor.executemany("INSERT INTO usage (request_id, timestamp, status_code, client_gone) "
                               "VALUES (%s, 1, %s, %s)", OLD_ROWS)
        migrate(conn)
        conn.execute("INSERT INTO usage (request_id, timestamp, status_code) VALUES ('r-older-gateway', 1, 500)")
        assert conn.execute(f"SELECT request_id, {OUTCOME} FROM usage ORDER BY id").fetchall() == DERIVED


# PostgreSQL's sums of budget scopes (read by every process each second): a month of one key's rows, by day.
DAY, FIRST_DAY = 86400, 20000 * 86400.0
MONTH = [row(f"m{d}-{i}", FIRST_DAY + d * DAY + i * 432, auth_key_id=key, user_path=path, total_tokens=1,
             total_cost=0.25)
         for d in range(30) for i in range(200) for key, path in (("k_1", "/team/a"), ("k_2", "/team/b"))]


def _rows_read(conn, statement, args) -> int:
    """The rows the scans of C{statement}'s plan read (returned and filtered out), by EXPLAIN ANALYZE."""
    def read(node):
        own = (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * node.get("Actual Loops", 1)
        return (own if "Relation Name" in node else 0) + sum(read(child) for child in node.get("Plans", ()))
    return read(conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", args).fetchone()[0][0]["Plan"])


class _Recorded:
    """A connection that keeps the statements run through it (to explain them after)."""

    def __init__(self, conn):
        self.conn, self.statements = conn, []

    def execute(self, statement, args=None):
        self.statements.append((statement, args))
        return self.conn.execute(statement, args)


@pytest.mark.parametrize("since", [FIRST_DAY, FIRST_DAY + 29 * DAY, FIRST_DAY + 10.5 * DAY])
def test_what_a_scope_spent_on_postgresql_is_read_from_day_sums_not_each_row_of_its_period(pg_database, since):
    """Each process reads each budget it charged every second: a sum over every row of the period read more rows
    as the ledger grew (0.2 s a read at 500k rows of a month, every second, in each process). The days whole
    in the period are read from their sums, the rows of a day begun before the period (a reset's) alone."""
    import psycopg

    from gomodel.store.postgresql.migrations import migrate
    from gomodel.store.postgresql.usage import PostgreSQLUsageStore as Store
    from tests import postgres

    with psycopg.connect(postgres.url(pg_database), autocommit=True) as conn:
        migrate(conn)
        Store._add(conn, MONTH)
        conn.execute("ANALYZE")
        later = sum(1 for r in MONTH if r[1] >= since) // 2
        for scope, share in (("key:k_1", 1), ("path:/team/a", 1), ("path:/team", 2), ("path:/", 2)):
            recorded = _Recorded(conn)
            assert Store._spent(recorded, scope, since) == (later * share, later * share * 0.25), scope
            read = sum(_rows_read(conn, statement, args) for statement, args in recorded.statements)
            assert read <= 2 * 200 + 2 * 30, (scope, read)  # (a day of each key's rows, the days' sums)
        recorded = _Recorded(conn)
        assert Store._keys_spent(recorded, ["k_1", "k_2", "k_3"], since) == {
            "k_1": (later, later * 0.25), "k_2": (later, later * 0.25)}
        read = sum(_rows_read(conn, statement, args) for statement, args in recorded.statements)
        assert read <= 2 * 200 + 2 * 30, read


def _generic_rows_read(conn, statement, args) -> int:
    """L{_rows_read} of C{statement}'s generic plan: the one PostgreSQL may keep for a statement psycopg prepared
    (after its 5th run), planned without its arguments' values."""
    from psycopg import sql

    numbered = statement.split("%s")
    prepared = numbered[0] + "".join(f"${i}{part}" for i, part in enumerate(numbered[1:], 1))
    conn.execute("SET plan_cache_mode = force_generic_plan")
    types = [{float: "float8", int: "int8", str: "text", list: "text[]"}[arg.__class__] for arg in args]
    conn.execute(f"PREPARE spent ({', '.join(types)}) AS {prepared}")
    try:
        values = ", ".join(sql.Literal(arg).as_string(conn) for arg in args)
        return _rows_read(conn, f"EXECUTE spent ({values})", None)
    finally:
        conn.execute("DEALLOCATE spent")
        conn.execute("RESET plan_cache_mode")


# Other paths' rows: one a day each, by paths that begin as /team's children do but are not under /team.
OTHERS = [row(f"o{d}-{i}", FIRST_DAY + d * DAY + 7, user_path=path, total_tokens=1000, total_cost=1.0)
          for d in range(30) for i, path in enumerate([f"/org/u{i}" for i in range(300)]
                                                      + ["/team-x", "/team0", "/team.b", "/tea", "/teamb"])]


@pytest.mark.parametrize("since", [FIRST_DAY, FIRST_DAY + 10.5 * DAY])
def test_what_a_path_spent_on_postgresql_is_read_from_its_own_range_of_the_day_sums(pg_database, since):
    """A path scope's days are read from its range of usage_days' path index, as its statement runs prepared (a
    generic plan): C{starts_with(user_path, $n)} can use the index only with a constant, so every day sum of every
    path was read (35-100 ms a budget of a path, every second, with thousands of paths). Those of paths beside it
    (C{/team-x}, C{/team0}: no child of C{/team}) are never counted."""
    import psycopg

    from gomodel.store.postgresql.migrations import migrate
    from gomodel.store.postgresql.usage import PostgreSQLUsageStore as Store
    from tests import postgres

    with psycopg.connect(postgres.url(pg_database), autocommit=True) as conn:
        migrate(conn)
        Store._add(conn, MONTH + OTHERS)
        conn.execute("ANALYZE")
        later = sum(1 for r in MONTH if r[1] >= since) // 2
        for scope, share in (("path:/team/a", 1), ("path:/team", 2), ("path:/team/", 2)):
            recorded = _Recorded(conn)
            assert Store._spent(recorded, scope, since) == (later * share, later * share * 0.25), scope
            read = sum(_generic_rows_read(conn, statement, args) for statement, args in recorded.statements)
            # (a day of each key's rows and of the others', the scope's days' sums)
            assert read <= 2 * 200 + len(OTHERS) // 30 + 2 * 30, (scope, read)


# A parent path's children, in four groups: one record a day each, each its own key (a day sum per child and day).
CHILDREN = [row(f"c{d}-{c}", FIRST_DAY + d * DAY + c, auth_key_id=f"k_c{c}", user_path=f"/team/g{c % 4}/c{c}",
                total_tokens=2, total_cost=0.5)
            for d in range(30) for c in range(200)]


@pytest.mark.parametrize("since", [FIRST_DAY, FIRST_DAY + 10.5 * DAY])
def test_what_a_parent_path_spent_on_postgresql_is_read_from_its_own_day_sums_not_each_childs(pg_database, since):
    """A parent path's figure (every process's seed, and its read each second without Redis) summed the day sums
    of each of its children: 30-50 ms a read with 2,000 children over a month (bench/path_budget.py). The database
    keeps each day's sums of every path and each of its ancestors (the root's too), so a scope reads its own days'
    sums, however many paths are below it, and the rows of a day begun before its period (a reset's)."""
    import psycopg

    from gomodel.store.postgresql.migrations import migrate
    from gomodel.store.postgresql.usage import PostgreSQLUsageStore as Store
    from tests import postgres

    rows = CHILDREN + OTHERS
    path, tokens, cost = (USAGE_FIELDS.index(name) for name in ("user_path", "total_tokens", "total_cost"))
    with psycopg.connect(postgres.url(pg_database), autocommit=True) as conn:
        migrate(conn)
        Store._add(conn, rows)
        conn.execute("ANALYZE")
        for name in ("/team", "/team/g1", "/"):
            counted = [r for r in rows if r[1] >= since and (name == "/" or r[path].startswith(name + "/"))]
            recorded = _Recorded(conn)
            assert Store._spent(recorded, f"path:{name}", since) == (
                sum(r[tokens] for r in counted), pytest.approx(sum(r[cost] for r in counted))), name
            read = sum(_generic_rows_read(conn, statement, args) for statement, args in recorded.statements)
            # (a day of the children's rows and of the others', the scope's days' sums)
            assert read <= 200 + len(OTHERS) // 30 + 30, (name, read)


def test_the_day_sums_on_postgresql_hold_every_row_written_before_them_by_an_older_gateway_and_deleted(pg_database):
    """The day sums are kept by the database, in the transaction that writes or deletes the rows: those written
    before the migrations (of the sums by key and path, then by path's scope), by an older gateway during a rolling
    upgrade (its INSERTs), by this one's COPY, and those the retention deletes (a day cut in two too) are all in what
    a scope spent, as the rows' own sums say: a path's, its children's (C{/team/}) and a path beside it too."""
    import psycopg

    from gomodel.store.postgresql.migrations import MIGRATIONS, migrate
    from gomodel.store.postgresql.usage import PostgreSQLUsageStore as Store
    from tests import postgres

    insert = f"INSERT INTO usage ({', '.join(USAGE_FIELDS)}) VALUES ({', '.join(['%s'] * len(USAGE_FIELDS))})"
    scopes = ("key:k_1", "key:k_2", "path:/team", "path:/team/a", "path:/team/a/x", "path:/team/", "path:/tea",
              "path:/", "path:/nobody")
    with psycopg.connect(postgres.url(pg_database), autocommit=True) as conn:
        def check():
            for since in (0, FIRST_DAY + 3 * DAY, FIRST_DAY + 3.5 * DAY, FIRST_DAY + 40 * DAY):
                for scope in scopes:
                    kind, _, name = scope.partition(":")
                    where = {"key": "auth_key_id = %s", "path": "(user_path = %s OR starts_with(user_path, %s))"}
                    args = [name] if kind == "key" else [name, name.rstrip("/") + "/"]
                    if name == "/":
                        where["path"], args = "(user_path IS NOT NULL OR auth_key_id IS NOT NULL)", []
                    tokens, cost = conn.execute(
                        "SELECT COALESCE(SUM(total_tokens), 0)::bigint, COALESCE(SUM(total_cost), 0) FROM usage "
                        f"WHERE timestamp >= %s AND {where[kind]}", (since, *args)).fetchone()
                    assert Store._spent(conn, scope, since) == (tokens, pytest.approx(cost)), (scope, since)
                    assert [tuple(f) for f in spent_many(conn, [(scope, since)])] == [(tokens, pytest.approx(cost))]

        def spent_many(conn, pairs):
            from gomodel.store.codec import spent_many
            return spent_many(pairs, lambda s, t: Store._spent(conn, s, t), lambda i, t: Store._keys_spent(conn, i, t))

        migrate(conn, [m for m in MIGRATIONS if m[0] <= 21])
        with conn.cursor() as cursor:
            cursor.executemany(insert, MONTH[:1000])
        migrate(conn, [m for m in MIGRATIONS if m[0] <= 22])  # (the day sums by key and path, then by path's scope)
        with conn.cursor() as cursor:
            cursor.executemany(insert, MONTH[1000:2000])
        migrate(conn)
        check()
        with conn.cursor() as cursor:  # an older gateway's, after the migration
            cursor.executemany(insert, MONTH[2000:2500] + [row("none", FIRST_DAY + 5, total_tokens=3),
                                                           row("nokey", FIRST_DAY + 5, user_path="/team/c")])
        Store._add(conn, MONTH[2500:] + [row("master", FIRST_DAY + 7, user_path="/team/a/x", total_cost=None),
                                         row("unpriced", FIRST_DAY + 8, auth_key_id="k_1", total_tokens=None)])
        check()
        while Store._delete_batch(conn, FIRST_DAY + 3.5 * DAY, 1000):
            pass
        check()
        assert conn.execute("SELECT COUNT(*) FROM usage_days WHERE day < %s", (20003,)).fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM usage_path_days WHERE day < %s", (20003,)).fetchone()[0] == 0
        conn.execute("DELETE FROM usage")
        check()
        assert conn.execute("SELECT COUNT(*) FROM usage_days").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM usage_path_days").fetchone()[0] == 0
