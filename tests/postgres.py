"""Fresh PostgreSQL databases for tests: 127.0.0.1:5432, user postgres, trust auth (as CI runs it).

Each test that asks gets its own database, C{gomodel_t_<random>}, dropped
after it; when the server cannot be reached the test is skipped with the
reason (C{GOMODEL_REQUIRE_POSTGRES=1} turns that skip into a failure).
"""

import os
import uuid

import pytest

HOST = os.environ.get("GOMODEL_TEST_PG_HOST", "127.0.0.1")
PORT = int(os.environ.get("GOMODEL_TEST_PG_PORT", "5432"))
USER = os.environ.get("GOMODEL_TEST_PG_USER", "postgres")
_probe = []


def url(dbname="postgres") -> str:
    return f"postgresql://{USER}@{HOST}:{PORT}/{dbname}"


def unreachable():
    """Why PostgreSQL cannot be used for tests, or None (checked once)."""
    if not _probe:
        try:
            import psycopg

            with psycopg.connect(url(), connect_timeout=3):
                pass
            _probe.append(None)
        except Exception as e:  # not installed, refused, refused the user: all mean "skip"
            _probe.append(f"PostgreSQL at {HOST}:{PORT} (user {USER}) cannot be reached: {type(e).__name__}: {e}")
    return _probe[0]


def require():
    """Skip the test (or fail it under C{GOMODEL_REQUIRE_POSTGRES=1}) when PostgreSQL is unreachable."""
    reason = unreachable()
    if reason is not None:
        if os.environ.get("GOMODEL_REQUIRE_POSTGRES", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)


def admin(sql, args=None):
    """Run one statement on the maintenance database (autocommit); returns its rows, if any."""
    import psycopg

    with psycopg.connect(url(), autocommit=True, connect_timeout=5) as conn:
        cursor = conn.execute(sql, args)
        return cursor.fetchall() if cursor.description else None


def create_database() -> str:
    """A new empty database; returns its name."""
    name = "gomodel_t_" + uuid.uuid4().hex[:12]
    admin(f"CREATE DATABASE {name}")
    return name


def drop_database(name):
    """Drop C{name}, ending its sessions first."""
    admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def kill_connections(name) -> int:
    """Terminate every session on database C{name}; returns how many."""
    rows = admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                 "pg_backend_pid()", (name,))
    return len(rows)


def query(name, sql, args=None):
    """Run one statement on database C{name} (autocommit); returns its rows, if any."""
    import psycopg

    with psycopg.connect(url(name), autocommit=True, connect_timeout=5) as conn:
        cursor = conn.execute(sql, args)
        return cursor.fetchall() if cursor.description else None


@pytest.fixture()
def pg_database():
    """The name of a fresh database, dropped after the test."""
    require()
    name = create_database()
    yield name
    drop_database(name)
