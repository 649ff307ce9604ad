"""The PostgreSQL store service: migrations under a lock, a newer database refused, broken connections replaced,
an unreachable server answered with 503s (StorageUnavailable) rather than crashes.

The behaviour of each aggregate is in the contract tests (tests/test_store_*.py, both backends).
"""

import time
from functools import partial

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList, gatherResults
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from gomodel.errors import StorageUnavailable
from gomodel.store import IStoreService
from tests import postgres
from tests.postgres import pg_database  # noqa: F401 (fixture)
from tests.stores import add_file, batch


def opened(reactor, name, **kwargs):
    from gomodel.store.postgresql import PostgreSQLStore

    store = PostgreSQLStore(postgres.url(name), reactor, **kwargs)
    store.startService()
    return store


async def until_started(store):
    """C{store.started()}, asked again while its statement goes past the short job time limit (0.5 s, 1 s) a test
    gave the store: on a loaded host the pool's first connection took longer. Each try is a statement of its own;
    60 s only bounds a hang."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await store.started()
        except StorageUnavailable as e:
            if "did not answer within" not in e.message or time.monotonic() > deadline:
                raise


@pytest_twisted.ensureDeferred
async def test_hosts_starting_together_migrate_once_and_share_everything(reactor, pg_database):
    from gomodel.store.postgresql import MIGRATIONS

    from tests.support import until

    stores = [opened(reactor, pg_database, max_conns=2) for _ in range(3)]
    try:
        # The advisory lock: one migrates, two find it done. One that waited for it past its lock timeout (3 s: a
        # loaded host's migration) gave up that attempt, and its store tries again (0.5 s later) and finds it done.
        for ok, result in await DeferredList([s.started() for s in stores], consumeErrors=True):
            assert ok or (result.check(StorageUnavailable) and "lock timeout" in result.value.message), result
        await until(reactor, lambda: all(s.problem is None for s in stores), limit=60, what="every host open")
        verifyObject(IStoreService, stores[0])
        assert postgres.query(pg_database, "SELECT version FROM schema_version") == [(MIGRATIONS[-1][0],)]
        record = await add_file(stores[0], b"from host A\n")
        assert await stores[1].files.get(record["id"]) == record
        assert await stores[2].blobs.read(record["id"], 0, 100) == b"from host A\n"
        await stores[1].batches.add(batch("batch_1"))
        got = await DeferredList([s.batches.claim_next(f"host-{n}", 30) for n, s in enumerate(stores)])
        assert sorted(str(result[1]) == "None" for result in got) == [False, True, True]  # one host wins
    finally:
        for s in stores:
            await s.stopService()


@pytest_twisted.ensureDeferred
async def test_a_database_from_a_newer_gateway_is_refused(reactor, pg_database, logged_errors):
    first = opened(reactor, pg_database)
    await first.started()
    await first.stopService()
    postgres.query(pg_database, "UPDATE schema_version SET version = 999")
    again = opened(reactor, pg_database)
    try:
        with pytest.raises(StorageUnavailable) as raised:
            await again.started()
        assert "schema version 999, newer than this gateway's" in raised.value.message
        with pytest.raises(StorageUnavailable):
            await again.files.get("file-x")
        assert "newer than this gateway" in again.problem
    finally:
        await again.stopService()


@pytest_twisted.ensureDeferred
async def test_killed_connections_are_replaced_and_never_lent_again(reactor, pg_database):
    store = opened(reactor, pg_database, max_conns=3)
    try:
        await store.started()
        await store.batches.add(batch("batch_1"))
        for _ in range(3):
            assert postgres.kill_connections(pg_database) >= 1
            # Every pooled connection died while idle: each is checked before it is lent and replaced.
            results = await gatherResults([store.batches.get("batch_1") for _ in range(6)])
            assert all(r["id"] == "batch_1" for r in results)
        assert store.problem is None
    finally:
        await store.stopService()


def sessions(database, sql_prefix, active=False) -> list:
    """The pids of C{database}'s sessions whose statement (running, or the last one) starts with C{sql_prefix};
    with C{active}, of those running it. (Only C{database}'s: tests beside it, under -n 2, run their own.)"""
    return postgres.query(database, "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query "
                          "LIKE %s" + (" AND state = 'active'" if active else ""), (sql_prefix + "%",))


async def statement_running(reactor, database, sql_prefix):
    """Fires once a statement starting with C{sql_prefix} runs on C{database}."""
    deadline = time.monotonic() + 10
    while not sessions(database, sql_prefix):
        assert time.monotonic() < deadline, "the statement never started"
        await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_the_next_job_after_every_pooled_connection_is_killed_is_answered(reactor, pg_database):
    """One job after another, as a client polling a batch's status asks. Before, psycopg_pool's own check of each
    connection it lends slept between dead ones (1 s, 2 s, 4 s: its reconnection backoff) and gave up at the job's
    wait for a connection: with four dead, the next job was a 503 after 5 s ("no database connection could be had
    in time") on a healthy server, and with the store marked down by a statement cut meanwhile (a wait of 1 s) the
    first dead one made it a 503 already."""
    store = opened(reactor, pg_database, max_conns=4)
    try:
        await store.started()

        async def pooled():  # every connection made and idle in the pool
            await gatherResults([store._db.run(lambda conn: conn.execute("SELECT pg_sleep(0.05)")) for _ in range(4)])

        await pooled()
        assert postgres.kill_connections(pg_database) == 4
        for _ in range(4):
            await store.files.list()
        assert store.problem is None

        await pooled()
        cut = store._db.run(lambda conn: conn.execute("SELECT pg_sleep(30)"))
        await statement_running(reactor, pg_database, "SELECT pg_sleep(30")
        postgres.kill_connections(pg_database)
        with pytest.raises(StorageUnavailable):
            await cut
        assert store.problem is not None  # down until a statement succeeds: jobs wait 1 s for a connection
        for _ in range(4):
            await store.files.list()
        assert store.problem is None
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_statement_cut_by_the_server_is_a_503_and_the_store_recovers(reactor, pg_database):
    store = opened(reactor, pg_database, max_conns=2)
    try:
        await store.started()
        statement = store._db.run(lambda conn: conn.execute("SELECT pg_sleep(30)"))
        await statement_running(reactor, pg_database, "SELECT pg_sleep")
        postgres.kill_connections(pg_database)
        with pytest.raises(StorageUnavailable) as raised:
            await statement
        assert raised.value.status == 503 and "terminat" in raised.value.message.lower()
        assert store.problem is not None
        await store.files.list()  # a new connection: the store is back
        assert store.problem is None
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_job_the_server_does_not_answer_in_time_is_a_503_and_the_store_recovers(reactor, pg_database):
    """A server that hangs with its connections alive (stopped, its disk stalled, a lock never released) sends
    no error: each job has a time limit, a 503 past it."""
    store = opened(reactor, pg_database, max_conns=1, job_timeout=0.5)
    try:
        await until_started(store)
        assert await store._db.run(lambda conn: conn.execute("SHOW statement_timeout").fetchone()[0]) == "0"
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as raised:
            await store._db.run(lambda conn: conn.execute("SELECT pg_sleep(30)"))  # never answered
        assert raised.value.status == 503 and "did not answer within 0.5s" in raised.value.message
        assert time.monotonic() - started < 5 and store.problem is not None  # /health/ready says so
        # Its statement was cancelled: the one thread and connection it held are free again (before: held
        # until the server answered, here 30 s), and the next job finds the store back.
        await store.files.list()
        assert store.problem is None and time.monotonic() - started < 5
        assert not sessions(pg_database, "SELECT pg_sleep", active=True)
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_read_only_server_is_a_503_and_its_connections_are_made_again(reactor, pg_database):
    """A failover leaves connections on a server that is read-only now (the old primary, a standby): a write was
    psycopg's ReadOnlySqlTransaction, a 500 to the client and a traceback a second in the log, and the pooled
    connections stayed on that server once a writable one was there again."""
    store = opened(reactor, pg_database, max_conns=2)
    try:
        await store.started()
        postgres.admin(f"ALTER DATABASE {pg_database} SET default_transaction_read_only = on")
        postgres.kill_connections(pg_database)  # (the connections made from now on are read-only)
        with pytest.raises(StorageUnavailable) as raised:
            await store.batches.add(batch("batch_ro"))
        assert raised.value.status == 503 and "read-only" in raised.value.message, raised.value.message
        assert store.problem is not None and "read-only" in store.problem  # /health/ready: degraded
        # Writable again (no connection killed this time): a connection made while it was read-only fails once at
        # most, and is made again (before, each stayed read-only, and every write failed until the gateway stopped).
        postgres.admin(f"ALTER DATABASE {pg_database} RESET default_transaction_read_only")
        failures = 0
        for attempt in range(5):
            try:
                await store.batches.add(batch(f"batch_rw{attempt}"))
            except StorageUnavailable:
                failures += 1
        assert failures <= 2 and store.problem is None  # (2: the pool's connections)
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_job_asked_while_the_migration_waits_for_another_hosts_lock_is_a_503_within_its_time_limit(
        reactor, pg_database):
    """A host that holds the migration lock and does not let go (paused mid-migration, its migration queued
    behind a long query's lock) kept every job of a host starting beside it waiting without end: requests for
    files, keys or usage hung (an SDK's 10 minutes) instead of a 503 past the job's time limit."""
    import psycopg

    from gomodel.store.postgresql.migrations import MIGRATION_LOCK

    holder = psycopg.connect(postgres.url(pg_database), autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    store = opened(reactor, pg_database, job_timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as raised:
            await store.files.list()
        assert raised.value.status == 503 and "not open" in raised.value.message, raised.value.message
        assert time.monotonic() - started < 5
        holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
        await until_started(store)  # opened once the lock is free; the job that gave up is not run then
        assert await store.files.list() is not None and store.problem is None
    finally:
        holder.close()
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_job_given_up_while_it_runs_after_the_opening_is_answered_nowhere(reactor, pg_database):
    """A job asked for before the store opened, run once it did, whose caller gave up while it ran (its request
    cancelled, its client gone): its result went to that caller's Deferred anyway, already called, and
    AlreadyCalledError reached the reactor's log (the suite's logged_errors fails the test on it)."""
    import threading

    import psycopg
    from twisted.internet.defer import CancelledError

    from gomodel.store.postgresql.migrations import MIGRATION_LOCK
    from tests.support import until

    holder = psycopg.connect(postgres.url(pg_database), autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    store = opened(reactor, pg_database)
    running, go = threading.Event(), threading.Event()

    def job(conn):
        running.set()
        go.wait(10)
        return conn.execute("SELECT 1").fetchone()[0]

    try:
        asked = store._db.run(job)
        holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
        await until(reactor, running.is_set, what="the job to run once the store opened")
        asked.cancel()
        with pytest.raises(CancelledError):
            await asked
        go.set()
        assert await store._db.run(_one) == 1  # (the job before it has ended: one connection at a time is enough)
        import gc

        gc.collect()  # (an unhandled failure of a Deferred is logged as it is collected)
    finally:
        go.set()
        holder.close()
        await store.stopService()


def _one(conn):
    return conn.execute("SELECT 1").fetchone()[0]


def test_a_migration_that_cannot_have_its_tables_lock_gives_up_instead_of_stalling_every_host(pg_database):
    """A rolling upgrade: the new gateway's migration alters the usage table while an older gateway's long query
    reads it (a summary of months). Its ALTER waited for that query without a limit, and PostgreSQL queued every
    later statement on the table behind it: every host's usage writes and reads stalled (a 503 past the job's
    time limit, degraded). Now it gives up after its lock timeout (its opening is tried again) and they go on."""
    import psycopg

    from gomodel.store.postgresql.migrations import MIGRATIONS, migrate

    url = postgres.url(pg_database)
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn, [m for m in MIGRATIONS if m[0] < 18])  # the schema an older gateway made (18 alters usage)
    with psycopg.connect(url) as reader, psycopg.connect(url, autocommit=True) as migrating, \
            psycopg.connect(url, autocommit=True, options="-c statement_timeout=5s") as other:
        reader.execute("SELECT count(*) FROM usage")  # its transaction holds the table (a long query's lock)
        with pytest.raises(psycopg.errors.LockNotAvailable):
            migrate(migrating, lock_timeout=0.2)
        assert other.execute("SELECT count(*) FROM usage").fetchone() == (0,)  # not queued behind the migration
        reader.rollback()
        migrate(migrating, lock_timeout=0.2)  # the query over: the migration is done
        assert migrating.execute("SELECT version FROM schema_version").fetchone() == (MIGRATIONS[-1][0],)


def counting_deletes(database, table):
    """Count each DELETE statement's rows on C{table} of C{database} (as PostgreSQL saw them) in table C{deletes}."""
    postgres.query(database, "CREATE TABLE IF NOT EXISTS deletes (tab TEXT, n BIGINT)")
    postgres.query(database, f"CREATE FUNCTION count_{table}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                             f"INSERT INTO deletes SELECT '{table}', count(*) FROM gone; RETURN NULL; END $$")
    postgres.query(database, f"CREATE TRIGGER count_{table} AFTER DELETE ON {table} REFERENCING OLD TABLE AS gone "
                             f"FOR EACH STATEMENT EXECUTE FUNCTION count_{table}()")


def deletes(database, table) -> list:
    return sorted(n for n, in postgres.query(database, "SELECT n FROM deletes WHERE tab = %s", (table,)))


@pytest_twisted.ensureDeferred
async def test_the_retention_sweeps_delete_a_large_backlog_in_bounded_statements(reactor, pg_database, monkeypatch):
    """A day of a busy fleet's ledger (millions of rows), or the stored responses of a long stop, went in one
    DELETE, past the store job's 30 s limit: cancelled (and the store said down meanwhile) at every sweep, so they
    were never swept. Each statement now deletes a bounded batch of rows, each its own job with its own time
    limit."""
    from gomodel.store.postgresql import database

    monkeypatch.setattr(database, "DELETE_BATCH", 40)
    store = opened(reactor, pg_database)
    try:
        await store.started()
        postgres.query(pg_database, "INSERT INTO usage (request_id, timestamp) "
                                    "SELECT 'r' || i, i FROM generate_series(1, 150) AS i")
        for i in range(1, 51):
            await store.responses.put(dict(_response(f"resp_{i}"), created_at=i))
        postgres.query(pg_database, "INSERT INTO deleted_responses (id, deleted_at) "
                                    "SELECT 'resp_gone' || i, i FROM generate_series(1, 90) AS i")
        for table in ("usage", "responses", "deleted_responses"):
            counting_deletes(pg_database, table)
        assert await store.usage.delete_before(121) == 120
        assert deletes(pg_database, "usage") == [0, 40, 40, 40]
        assert postgres.query(pg_database, "SELECT min(timestamp), count(*) FROM usage") == [(121.0, 30)]
        assert await store.responses.delete_before(46) == 45
        assert deletes(pg_database, "responses") == [5, 40]
        assert deletes(pg_database, "deleted_responses") == [5, 40]
        assert postgres.query(pg_database, "SELECT count(*) FROM responses") == [(5,)]
    finally:
        await store.stopService()


def _response(response_id):
    return {"id": response_id, "provider": "vllm", "created_at": 100, "previous_response_id": None,
            "status": "completed", "input_items": [], "response": {"id": response_id}}


@pytest_twisted.ensureDeferred
async def test_kept_responses_are_written_together_soon_and_before_the_stop(reactor, pg_database):
    host_a = opened(reactor, pg_database, max_conns=2)
    host_b = None
    try:
        await host_a.started()
        # (one after the other: started together, the second's opening waited for the first's migration, and gave
        # up at its lock timeout where a loaded host made that migration last 3 s)
        host_b = opened(reactor, pg_database, max_conns=2)
        await host_b.started()
        for n in range(3):
            host_a.responses.keep(_response(f"resp_{n}"))
        host_a.responses.keep(dict(_response("resp_1"), status="incomplete"))  # again, in the same write
        assert postgres.query(pg_database, "SELECT count(*) FROM responses") == [(0,)]  # held
        await host_a.responses.written()  # (what its timer does within KEEP_DELAY)
        # in one transaction (one statement may not write a row twice: the later resp_1 only): one id
        assert postgres.query(pg_database, "SELECT count(DISTINCT xmin::text), count(*) FROM responses") == [(1, 3)]
        assert postgres.query(pg_database, "SELECT status FROM responses WHERE id = 'resp_1'") == [("incomplete",)]
        assert (await host_b.responses.get("resp_2"))["id"] == "resp_2"  # another host reads it
        host_a.responses.keep(_response("resp_held"))
    finally:
        await host_a.stopService()
        if host_b is not None:
            await host_b.stopService()
    assert postgres.query(pg_database, "SELECT id FROM responses WHERE id = 'resp_held'") == [("resp_held",)]


@pytest_twisted.ensureDeferred
async def test_an_unreachable_server_is_storage_unavailable_at_once(reactor):
    from gomodel.store.postgresql import PostgreSQLStore
    from tests.integration.support import free_port

    store = PostgreSQLStore(f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/nowhere", reactor)
    store.startService()
    try:
        with pytest.raises(StorageUnavailable) as raised:
            await store.started()
        assert "s3cret" not in raised.value.message and "unavailable" in raised.value.message
        with pytest.raises(StorageUnavailable):  # the opening is retried in the background; callers do not wait
            await store.usage.summary(0, 1)
        assert store.problem is not None and "s3cret" not in store.problem
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_an_unreachable_server_is_not_named_to_clients_or_in_readiness(reactor, http, fake):
    # The reason reaches every client's 503 and the unauthenticated /health/ready: libpq's 'connection to server
    # at "host", port N failed' named the database's address there.
    import json

    from tests.integration.support import free_port
    from tests.support import start_gateway

    port = free_port()
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                       "STORAGE_TYPE": "postgresql",
                                       "POSTGRES_URL": f"postgresql://postgres:s3cret@127.0.0.1:{port}/nowhere"})
    try:
        response = await http.get(gw.url + "/v1/files", headers={"Authorization": "Bearer k1"})
        error = json.loads(await response.content())["error"]
        assert (response.code, error["code"]) == (503, "storage_unavailable")
        response = await http.get(gw.url + "/health/ready")
        down = json.loads(await response.content())["down"]["database"]
        for text in (error["message"], down):
            assert "Connection refused" in text, text  # still says why
            assert "127.0.0.1" not in text and str(port) not in text and "s3cret" not in text, text
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_gateway_refused_by_a_newer_database_is_not_ready_while_its_peers_serve(reactor, http, fake,
                                                                                         pg_database, logged_errors):
    # A rollback (or a mixed rollout) starts an older gateway on a database a newer one migrated: it can never use
    # its store (every managed key, file, batch and stored response a 503), while the newer hosts serve them.
    # Readiness said 200 "degraded", as for an outage that every host shares, so the load balancer kept it in.
    import json

    from tests.support import start_gateway

    first = opened(reactor, pg_database)
    await first.started()
    await first.stopService()
    postgres.query(pg_database, "UPDATE schema_version SET version = 999")
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                       "STORAGE_TYPE": "postgresql", "POSTGRES_URL": postgres.url(pg_database)})
    try:
        await gw.service.store.started().addErrback(lambda _: None)
        response = await http.get(gw.url + "/health/ready")
        body = json.loads(await response.content())
        assert response.code == 503 and body["status"] == "not_ready", body
        assert any("schema version 999, newer than this gateway's" in reason for reason in body["reasons"]), body
        response = await http.get(gw.url + "/health")
        assert response.code == 200  # alive: nothing a restart would mend
    finally:
        await gw.service.stopService()
    logged_errors.flush()


def test_a_reason_leaves_out_every_way_libpq_names_the_server():
    import psycopg

    from gomodel.store.postgresql.database import _reason

    for message, reason in (
            ('connection failed: connection to server at "db.internal" (10.1.2.3), port 5433 failed: Connection '
             'refused\n\tIs the server running on that host and accepting TCP/IP connections?',
             "OperationalError: connection failed: Connection refused"),
            ('connection failed: connection to server at "::1", port 5999 failed: FATAL:  database "x" does not '
             'exist', 'OperationalError: connection failed: FATAL:  database "x" does not exist'),
            ('connection is bad: connection to server on socket "/run/pg/.s.PGSQL.5432" failed: No such file',
             "OperationalError: connection is bad: No such file"),
            ("failed to resolve host 'db.internal': [Errno -2] Name or service not known",
             "OperationalError: failed to resolve host: [Errno -2] Name or service not known"),
            ('could not translate host name "db.internal" to address: Name or service not known',
             "OperationalError: could not translate host name to address: Name or service not known")):
        assert _reason(psycopg.OperationalError(message)) == reason


@pytest_twisted.ensureDeferred
async def test_a_value_postgresql_cannot_hold_is_the_requests_400(reactor, http, fake, pg_database):
    # A text with a NUL character (SQLite keeps it; PostgreSQL refuses it in a parameter), in a filter, a
    # body: each was a 500 from the store. (In a path: no route takes it, a 404 on every store.)
    import json

    from tests.support import start_gateway

    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                       "STORAGE_TYPE": "postgresql", "POSTGRES_URL": postgres.url(pg_database)})
    try:
        for path in ("/v1/files/file-a%00", "/v1/batches/batch_a%00", "/v1/responses/resp_a%00"):  # as on SQLite
            response = await http.get(gw.url + path, headers={"Authorization": "Bearer k1"})
            error = json.loads(await response.content())["error"]
            assert (response.code, error["code"]) == (404, "not_found"), (path, error)
        for method, path, body in (
                ("GET", "/v1/files?after=a%00", None),
                ("POST", "/admin/api/v1/auth-keys", {"name": "a\u0000b"}),
                ("GET", "/admin/api/v1/usage/log?model=a%00", None)):
            response = await http.request(method, gw.url + path, headers={"Authorization": "Bearer k1"},
                                          data=json.dumps(body).encode() if body else None)
            error = json.loads(await response.content())["error"]
            assert (response.code, error["code"]) == (400, "invalid_value"), (method, path, error)
        response = await http.get(gw.url + "/v1/files", headers={"Authorization": "Bearer k1"})
        assert response.code == 200  # the store goes on
        await response.content()
    finally:
        await gw.service.stopService()


@pytest.mark.parametrize("storage", ["sqlite", "postgresql"])
@pytest_twisted.ensureDeferred
async def test_an_id_holding_a_nul_is_unknown_on_every_store_without_asking_it(reactor, http, fake, storage):
    """An id a client names in a body or a cursor that holds a NUL character (no id the gateway or an upstream makes
    does) is answered as any unknown id, the same on both stores, the store not asked: a previous_response_id
    (a create, streamed or not, an input_tokens count, a raw /p/ create; any key) is OpenAI's 400
    previous_response_not_found, a batch's input_file_id the 404 file_not_found, a Messages block's file its 400,
    a message batch cursor its 404; a request_id naming one is a 400 invalid_value (no store could keep the
    response). Before, PostgreSQL refused the NUL (the 400 invalid_value "cannot be kept or looked up") where
    SQLite found nothing (and a master key's unknown previous id went upstream, a request_id's response was kept)."""
    import anthropic
    import json
    import openai

    from tests.support import in_thread, openai_client, start_gateway, stop_all

    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"}
    if storage == "postgresql":
        postgres.require()
        database = postgres.create_database()
        env.update(STORAGE_TYPE="postgresql", POSTGRES_URL=postgres.url(database))
    gw = await start_gateway(reactor, env)
    model, nul = "vllm/meta-llama/Llama-3.1-8B-Instruct", "\u0000"
    try:
        made = await http.post(gw.url + "/admin/api/v1/auth-keys", data=json.dumps({"name": "t"}).encode(),
                               headers={"Authorization": "Bearer k1"})
        managed = json.loads(await made.content())["value"]
        before = len(fake.forwarded())
        for key in ("k1", managed):
            client = openai_client(gw, key)
            messages = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=10)
            try:
                for call in (partial(client.responses.create, model=model, input="x"),
                             partial(client.responses.create, model=model, input="x", stream=True),
                             partial(client.responses.input_tokens.count, model=model, input="x")):
                    with pytest.raises(openai.BadRequestError) as caught:
                        await in_thread(call, previous_response_id="resp_a" + nul)
                    assert (caught.value.body["code"], caught.value.body["param"]) == (
                        "previous_response_not_found", "previous_response_id"), (key, caught.value.body)
                raw = await http.post(gw.url + "/p/vllm/v1/responses", headers={"Authorization": "Bearer " + key},
                                      data=json.dumps({"model": "meta-llama/Llama-3.1-8B-Instruct", "input": "x",
                                                       "previous_response_id": "resp_a" + nul}).encode())
                error = json.loads(await raw.content())["error"]
                assert (raw.code, error["code"]) == (400, "previous_response_not_found"), (key, error)
                with pytest.raises(openai.NotFoundError) as caught:
                    await in_thread(client.batches.create, input_file_id="file-a" + nul,
                                    endpoint="/v1/chat/completions", completion_window="24h")
                assert caught.value.body["code"] == "file_not_found"
                with pytest.raises(anthropic.BadRequestError) as caught:
                    await in_thread(messages.messages.create, model=model, max_tokens=8, messages=[
                        {"role": "user", "content": [{"type": "document",
                                                      "source": {"type": "file", "file_id": "file_a" + nul}}]}])
                assert caught.value.body["error"]["message"] == (
                    f"messages.0.content.0.source.file_id: no file file_a{nul} (upload it with the Files API first)")
                for cursor in ("after_id", "before_id"):
                    with pytest.raises(anthropic.NotFoundError) as caught:
                        await in_thread(messages.messages.batches.list, **{cursor: "msgbatch_a" + nul})
                    assert caught.value.body["error"]["type"] == "not_found_error"
            finally:
                client.close()
                messages.close()
        chosen = await http.post(gw.url + "/v1/responses", headers={"Authorization": "Bearer k1"},
                                 data=json.dumps({"model": model, "input": "x", "request_id": "a" + nul}).encode())
        error = json.loads(await chosen.content())["error"]
        assert (chosen.code, error["code"], error["param"]) == (400, "invalid_value", "request_id"), error
        assert len(fake.forwarded()) == before  # (nothing went upstream)
        client = openai_client(gw, "k1")  # the store goes on
        await in_thread(client.responses.create, model=model, input="x")
        client.close()
    finally:
        await stop_all(gw)
        if storage == "postgresql":
            postgres.drop_database(database)


@pytest_twisted.ensureDeferred
async def test_an_upload_cut_by_the_database_going_down_is_discarded_without_an_error_logged(
        reactor, pg_database, logged_errors):
    # Its write was a 503 already; discarding it failed for the same reason and was logged as an error with a
    # traceback on every upload cut short so (the sweep of leftovers removes the rows once the database is back).
    store = opened(reactor, pg_database)
    try:
        await store.started()
        writer = store.blobs.create()
        await writer.write(b"first chunk")
        postgres.admin(f"ALTER DATABASE {pg_database} ALLOW_CONNECTIONS false")
        postgres.kill_connections(pg_database)
        with pytest.raises(StorageUnavailable):
            await writer.write(b"second chunk")
        await writer.abort()
        assert not logged_errors, logged_errors
    finally:
        postgres.admin(f"ALTER DATABASE {pg_database} ALLOW_CONNECTIONS true")
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_every_connection_notices_a_server_gone_silent(reactor, pg_database):
    # A server whose host lost its network sends no reset: without TCP keepalives and a user timeout, a
    # statement on a pooled connection waited for ever (for a read), holding a store thread and its client.
    stores = [opened(reactor, pg_database), opened(reactor, pg_database + "?keepalives_idle=7")]
    try:
        for store, idle in zip(stores, ("5", "7")):
            await store.started()
            parameters = await store._db.run(lambda conn: conn.info.get_parameters())
            assert (parameters["keepalives"], parameters["keepalives_idle"], parameters["keepalives_interval"],
                    parameters["keepalives_count"], parameters["tcp_user_timeout"]) == ("1", idle, "2", "3", "15000")
    finally:
        for store in stores:
            await store.stopService()


async def refused(store, database):
    """Open C{store}, then make its server refuse connections to C{database}; fires once the store found out
    (its first request waits up to the pool's timeout for a connection, then is a 503)."""
    await store.started()
    postgres.admin(f"ALTER DATABASE {database} ALLOW_CONNECTIONS false")
    postgres.kill_connections(database)
    with pytest.raises(StorageUnavailable):
        await store.files.get("file-x")


@pytest_twisted.ensureDeferred
async def test_while_the_server_refuses_connections_requests_are_503s_without_waiting_in_turn(reactor, pg_database):
    """Before: each queued job waited for a connection in its turn, a second each, so with 4 connections the
    40th of 40 concurrent requests had its 503 after 10 s (14 s for the first burst)."""
    from gomodel.store.postgresql.database import PROBE_INTERVAL

    store = opened(reactor, pg_database, max_conns=2)
    # The probe waits for a connection (the pool's requests_queued) every half second while the store is down:
    # held off until the burst is answered, so the count is the burst's own (a probe in it failed the test).
    probe = store._db._probe
    probe.stop()  # (before any: the reactor has not run since it started)
    try:
        await refused(store, pg_database)
        pool = store._db._pool
        queued = pool.get_stats().get("requests_queued", 0)
        results = await DeferredList([store.files.get("file-x") for _ in range(20)], consumeErrors=True)
        assert all(not ok and failure.check(StorageUnavailable) for ok, failure in results)
        # None of them waited for a connection the server would not give.
        assert pool.get_stats().get("requests_queued", 0) == queued
        probe.start(PROBE_INTERVAL, now=False)
        postgres.admin(f"ALTER DATABASE {pg_database} ALLOW_CONNECTIONS true")
        # The probe (every half second) asks the pool, which tries again; the deadline only bounds a hang.
        deadline = time.monotonic() + 60
        while True:
            try:
                await store.files.list()
                break
            except StorageUnavailable:
                assert time.monotonic() < deadline, "the store never answered again"
                await deferLater(reactor, 0.1, lambda: None)
        assert store.problem is None
    finally:
        postgres.admin(f"ALTER DATABASE {pg_database} ALLOW_CONNECTIONS true")
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_the_first_probe_after_the_server_accepts_connections_again_finds_the_store_back(reactor, pg_database):
    """Before, the pool tried each lost connection again after 1 s, 3 s and 7 s (its doubling backoff), and the
    probe waited 1 s for one: allowed again 5 s into the outage (its first request's 503), the store was still
    down after the next probe, and answered again only some 2 s later (up to 4 s, by where the backoff was)."""
    store = opened(reactor, pg_database, max_conns=2)
    try:
        await refused(store, pg_database)
        postgres.admin(f"ALTER DATABASE {pg_database} ALLOW_CONNECTIONS true")
        await store._db._check()  # the probe
        assert store.problem is None
        await store.files.list()
    finally:
        postgres.admin(f"ALTER DATABASE {pg_database} ALLOW_CONNECTIONS true")
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_the_pools_own_warnings_of_a_server_gone_are_not_logged(reactor, pg_database, caplog):
    # psycopg_pool warned "error connecting in 'gomodel': connection to server at "127.0.0.1", port 5432
    # failed" on every reconnection attempt (twistd logged each as an error), naming the database's address.
    import logging

    caplog.set_level(logging.WARNING)
    store = opened(reactor, pg_database, max_conns=2)
    try:
        await refused(store, pg_database)
        await deferLater(reactor, 2.5, lambda: None)  # the pool's reconnection attempts
        assert [r.getMessage() for r in caplog.records if r.name.startswith("psycopg")] == []
    finally:
        postgres.admin(f"ALTER DATABASE {pg_database} ALLOW_CONNECTIONS true")
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_store_that_cannot_open_says_so_once_while_it_tries_again(reactor):
    from twisted.logger import LogLevel, Logger

    from tests.stores import down_postgresql

    down = await down_postgresql(reactor)  # its first attempt failed
    events = []
    down._db.log = Logger(observer=events.append)
    try:
        for _ in range(3):  # the next attempts (as its timer would make them)
            down._db._retry.cancel()
            await down._db._open()
        assert [e["log_level"] for e in events] == [LogLevel.debug] * 3  # the first attempt's warning said it
        down._db.problem = "another reason"
        down._db._retry.cancel()
        await down._db._open()
        assert events[-1]["log_level"] == LogLevel.warn and "127.0.0.1" not in str(events[-1])
    finally:
        await down.stopService()


@pytest_twisted.ensureDeferred
async def test_responses_lost_while_the_database_is_down_are_one_warning_and_a_count(reactor, tmp_path):
    """While the database is down, the responses not stored are one warning (each id at debug), and their
    number is said when responses are stored again; before, one warning per response."""
    from twisted.internet.task import Clock
    from twisted.logger import LogLevel, Logger

    from tests.stores import down_postgresql, postgresql_backend

    down = await down_postgresql(reactor)
    up = await postgresql_backend(reactor, tmp_path, Clock())
    responses = down.responses
    events = []
    responses.log = Logger(observer=events.append)
    try:
        for n in range(3):
            responses.keep(_response(f"resp_{n}"))
            responses.keep(_response(f"resp_{n}b"))
            await responses.written()
        assert [e["log_level"] for e in events if e["log_level"] > LogLevel.debug] == [LogLevel.warn]
        assert len([e for e in events if e["log_level"] == LogLevel.debug]) == 6
        responses._db = up.responses._db  # the database is back
        responses.keep(_response("resp_back"))
        await responses.written()
        told = [e for e in events if e["log_level"] > LogLevel.debug]
        assert [e["log_level"] for e in told] == [LogLevel.warn, LogLevel.info] and told[1]["lost"] == 6
        assert (await up.responses.get("resp_back"))["id"] == "resp_back"
    finally:
        del responses.log
        await down.stopService()
        await up.stopService()
        await up.cleanup()


@pytest_twisted.ensureDeferred
async def test_usage_rows_whose_commit_answer_was_lost_are_not_written_twice(reactor, pg_database, monkeypatch):
    """The connection breaks after a write of usage rows committed: the ledger, told it failed, writes them
    again with the rows buffered since after them; each row is in the table once (before: twice)."""
    import psycopg

    from gomodel.store.postgresql.usage import PostgreSQLUsageStore
    from tests.test_store_usage import row

    original = PostgreSQLUsageStore._add
    lost = []

    def commit_then_break(conn, rows):
        written = original(conn, rows)
        if not lost:
            lost.append(written)
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return written

    monkeypatch.setattr(PostgreSQLUsageStore, "_add", staticmethod(commit_then_break))
    store = opened(reactor, pg_database, max_conns=2)
    try:
        await store.started()
        first = [row(f"a{i}", 100.0 + i) for i in range(3)]
        with pytest.raises(StorageUnavailable):
            await store.usage.add(first)
        assert lost == [3]
        assert await store.usage.add(first + [row("b0", 200.0)]) == 4  # as the ledger tries again
        assert await store.usage.add(first) == 3  # (all of them written already: nothing more)
        assert postgres.query(pg_database, "SELECT request_id, COUNT(*) FROM usage GROUP BY request_id "
                                           "ORDER BY request_id") == [("a0", 1), ("a1", 1), ("a2", 1), ("b0", 1)]
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_job_chosen_as_a_deadlocks_victim_is_run_again_not_an_outage(reactor, pg_database):
    """PostgreSQL breaks a deadlock (SQLSTATE 40P01) or a serialization conflict (40001) by rolling one
    transaction back, to be run again: the store runs its job again (before, it was a 503 storage_unavailable
    and /health/ready said the database was down until the next statement)."""
    import threading

    import psycopg

    postgres.query(pg_database, "CREATE TABLE pair (id int PRIMARY KEY, v int NOT NULL)")
    postgres.query(pg_database, "INSERT INTO pair VALUES (1, 0), (2, 0)")
    store = opened(reactor, pg_database, max_conns=2)
    holds_one, holds_two, attempts, others = threading.Event(), threading.Event(), [], []

    def two_then_one(conn):
        attempts.append(1)
        holds_one.wait(10)
        with conn.transaction():
            conn.execute("SET LOCAL deadlock_timeout = '20ms'")  # (this one finds the deadlock: the victim)
            conn.execute("UPDATE pair SET v = v + 1 WHERE id = 2")
            if len(attempts) == 1:  # the other waits for row 2 before this asks for row 1 (held by the other)
                holds_two.set()
                deadline = time.monotonic() + 10
                while not conn.execute("SELECT 1 FROM pg_locks WHERE NOT granted AND pid = %s",  # (live)
                                       (others[0],)).fetchone():
                    assert time.monotonic() < deadline, "the other transaction never waited for row 2"
            conn.execute("UPDATE pair SET v = v + 1 WHERE id = 1")
        return "done"

    def one_then_two():
        with psycopg.connect(postgres.url(pg_database)) as other:  # (a transaction until the block's end)
            others.append(other.info.backend_pid)
            other.execute("UPDATE pair SET v = v + 10 WHERE id = 1")
            holds_one.set()
            holds_two.wait(10)
            other.execute("UPDATE pair SET v = v + 10 WHERE id = 2")

    try:
        await store.started()
        other = threading.Thread(target=one_then_two)
        other.start()
        done = await store._db.run(two_then_one)
        other.join(10)
        assert done == "done" and len(attempts) == 2
        assert postgres.query(pg_database, "SELECT v FROM pair ORDER BY id") == [(11,), (11,)]
        assert store.problem is None
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_job_rolled_back_by_conflicts_each_time_is_a_503_of_its_own_and_the_store_stays_up(
        reactor, pg_database):
    """A job that PostgreSQL rolls back each time it is tried (three) answers 503 storage_conflict: the store is
    not down (neither storage_unavailable nor /health/ready's down.database)."""
    from gomodel.errors import StorageConflict

    store = opened(reactor, pg_database, max_conns=2)
    attempts = []

    def conflicting(conn):
        attempts.append(1)
        conn.execute("DO $$ BEGIN RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001'; END $$")

    try:
        await store.started()
        with pytest.raises(StorageConflict) as raised:
            await store._db.run(conflicting)
        assert len(attempts) == 3
        error = raised.value
        assert (error.status, error.code, error.type) == (503, "storage_conflict", "server_error")
        assert "could not serialize access" not in error.message and "SerializationFailure" in error.message
        assert store.problem is None
    finally:
        await store.stopService()


def conflict_once(database, table, event):
    """A trigger on C{table} that makes the first C{event} (INSERT, DELETE) after it a serialization failure, as a
    concurrent transaction would (a sequence: its count outlives the rollback)."""
    postgres.query(database, "CREATE SEQUENCE conflicts")
    postgres.query(database, """CREATE FUNCTION conflict_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
        IF nextval('conflicts') = 1 THEN
            RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001';
        END IF;
        RETURN NULL; END $$""")
    postgres.query(database, f"CREATE TRIGGER conflict_once AFTER {event} ON {table} "
                             "FOR EACH STATEMENT EXECUTE FUNCTION conflict_once()")


@pytest_twisted.ensureDeferred
async def test_jobs_run_again_after_a_conflict_do_each_thing_once(reactor, pg_database):
    """Each store job is whole, run again after a conflict: a blob's first write rolled back made it again (before,
    the writer kept the key of the row that was rolled back, and its chunks referred to no row), a batch's
    deletion rolled back after it deleted the batch deletes its lines and answers the batch (before, the batch
    was gone, unanswered, and its lines kept)."""
    store = opened(reactor, pg_database, max_conns=2)
    try:
        await store.started()
        conflict_once(pg_database, "blob_chunks", "INSERT")
        writer = store.blobs.create()
        await writer.write(b"first chunk\n")
        await writer.write(b"second\n")
        assert await writer.commit("file-a") == len(b"first chunk\nsecond\n")
        assert await store.blobs.read("file-a", 0, 100) == b"first chunk\nsecond\n"
        postgres.query(pg_database, "DROP TRIGGER conflict_once ON blob_chunks")
        postgres.query(pg_database, "DROP FUNCTION conflict_once")
        postgres.query(pg_database, "DROP SEQUENCE conflicts")

        await store.batches.add(batch("batch_1", status="completed"))
        await store.batches.add_requests("batch_1", [(1, "a", b"{}"), (2, "b", b"{}")], 0)
        conflict_once(pg_database, "batch_requests", "DELETE")
        deleted = await store.batches.delete("batch_1", ("completed",))
        assert deleted is not None and deleted["id"] == "batch_1"
        assert postgres.query(pg_database, "SELECT count(*) FROM batch_requests") == [(0,)]
        assert store.problem is None
    finally:
        await store.stopService()


@pytest.mark.parametrize("limit, waited, cancelled_within", [(2.0, 0.0, 5.0), (4.0, 2.0, 1.0)])
@pytest_twisted.ensureDeferred
async def test_a_job_asked_before_the_opening_is_cancelled_within_its_time_limit(reactor, pg_database, limit, waited,
                                                                                 cancelled_within):
    """A job asked for while the store was opening runs once it opened, under the same time limit as any other, and
    only for what that limit has left (C{waited} of it spent waiting for the opening): its statement is cancelled
    when its caller gets its 503, which says the database did not answer. Before, it ran on uncancelled (a statement
    that hung held its thread and connection for good); then it had the whole limit again from the opening (its
    caller's 503 said the store did not open, and a write could commit after the caller was told it failed)."""
    import psycopg

    from gomodel.store.postgresql.migrations import MIGRATION_LOCK, migrate
    from tests.support import until

    # Migrated already: once the lock is free the opening is over at once (a fresh schema's migration, on a loaded
    # host, outlasted what the job's limit had left, and the job was cancelled before it ran). The opening still
    # waits for the lock, up to its LOCK_TIMEOUT (3 s), which C{waited} stays well under.
    with psycopg.connect(postgres.url(pg_database), autocommit=True) as conn:
        migrate(conn)
    holder = psycopg.connect(postgres.url(pg_database), autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    store = opened(reactor, pg_database, job_timeout=limit)

    def sleeping():
        return bool(sessions(pg_database, "SELECT pg_sleep", active=True))

    try:
        asked = store._db.run(lambda conn: conn.execute("SELECT pg_sleep(30)"))
        if waited:
            await deferLater(reactor, waited, lambda: None)  # (half its limit spent waiting for the opening)
        holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
        await until(reactor, sleeping, what="the job to run once the store opened")
        with pytest.raises(StorageUnavailable) as refused:
            await asked
        assert "did not open" not in refused.value.message, refused.value.message
        await until(reactor, lambda: not sleeping(), limit=cancelled_within,
                    what="its statement cancelled with its caller's 503")
    finally:
        holder.close()
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_job_past_its_time_limit_before_it_had_a_connection_never_runs(reactor, pg_database):
    """A job whose time limit passed while it waited for a store thread or a connection (every one busy with a
    statement that hung) is not run once one frees: its caller had its 503. Before, only a job already holding a
    connection was cancelled; this one ran after, uncancelled, a write committed after its caller was told it failed
    and a hung statement holding the thread for good (the job behind it 503 too)."""
    store = opened(reactor, pg_database, max_conns=1, job_timeout=1.0)
    ran = []

    def late(conn):
        ran.append(True)
        conn.execute("SELECT pg_sleep(30)")

    try:
        await until_started(store)
        hung = store._db.run(lambda conn: conn.execute("SELECT pg_sleep(30)"))
        waiting = store._db.run(late)  # (the same time limit as the hung one, behind it for the only thread)
        for asked in (hung, waiting):
            with pytest.raises(StorageUnavailable):
                await asked
        assert await store._db.run(lambda conn: conn.execute("SELECT 1").fetchone()) == (1,)
        assert ran == []
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_gateway_whose_store_is_still_opening_is_not_ready(reactor, http, fake, pg_database):
    # Another host holds the migration lock (its migration is running): this gateway's store waits for it. Readiness
    # said 200 "degraded" (the store "down") meanwhile, so a load balancer sent it traffic it then refused
    # (every managed key a 503); README promised 503 until the store is open.
    import json

    import psycopg

    from gomodel.store.postgresql.migrations import MIGRATION_LOCK
    from tests.support import start_gateway, with_timeout

    with psycopg.connect(postgres.url(pg_database), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                           "STORAGE_TYPE": "postgresql", "POSTGRES_URL": postgres.url(pg_database)},
                                 wait_ready=False)
        try:  # (at once: the migration waits for the lock 3 s at most, then its opening is tried again later)
            response = await http.get(gw.url + "/health/ready")
            body = json.loads(await response.content())
            assert response.code == 503 and body["status"] == "not_ready", body
            assert "the store is opening" in body["reasons"], body
            holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
            await gw.service.store.started()
            await with_timeout(reactor, gw.registry.ready(), 5)
            response = await http.get(gw.url + "/health/ready")
            assert (response.code, json.loads(await response.content())) == (200, {"status": "ready"})
        finally:
            await gw.service.stopService()
