#!/usr/bin/env python3
"""What a budget's figure costs PostgreSQL for a parent path with thousands of children, and what a flush costs.

    PYTHONPATH=$PWD python bench/path_budget.py [--children 2000] [--days 30] [--reads 40] [--flushes 100]

Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth); a fresh database, dropped after. The ledger holds
C{--days} days of one record a day for each of C{--children} paths under C{/team} (each its own key: a day sum per
child and day), then each scope's figure (C{IUsageStore.spent}: a budget's seed, and each process's read every
second without Redis, L{gomodel.limits.budgets.BudgetBook.follow}) is read C{--reads} times through one connection
(prepared by psycopg after the fifth, as the gateway's are), and a flush of 200 records (20 children) is written
C{--flushes} times, twice (from schema 23, with and without the triggers that keep the paths' day sums, in turn).
Prints the median and p90 of each in milliseconds, the buffers each read touched (EXPLAIN's shared hits and reads:
what the time is made of, steadier than the time on a shared machine) and the rows it read, and the CPU time of the
database's process a flush took (/proc: PostgreSQL on this machine). A "reset" read is of a period begun at noon.
"""

import argparse
import os
import statistics
import sys
import time

import psycopg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gomodel.store.postgresql.migrations import migrate  # noqa: E402
from gomodel.store.postgresql.usage import PostgreSQLUsageStore as Store  # noqa: E402
from gomodel.store.records import USAGE_FIELDS  # noqa: E402
from tests import postgres  # noqa: E402

DAY = 86400
FIRST_DAY = 20000 * DAY


def record(request_id, timestamp, key, path):
    values = {"request_id": request_id, "timestamp": timestamp, "provider": "vllm", "provider_name": "vllm-a",
              "replica": 0, "model": "m", "endpoint": "/v1/chat/completions", "status_code": 200, "stream": False,
              "input_tokens": 10, "output_tokens": 5, "total_tokens": 15, "cached_tokens": 0, "reasoning_tokens": 0,
              "input_cost": 0.001, "output_cost": 0.002, "total_cost": 0.003, "user_path": path,
              "auth_key_id": key, "duration_ms": 10.0, "ttft_ms": None, "client_gone": False, "estimated": False,
              "outcome": "ok", "audio_seconds": None}
    return tuple(values[name] for name in USAGE_FIELDS)


class Recorded:
    """A connection that keeps the statements run through it."""

    def __init__(self, conn):
        self.conn, self.statements = conn, []

    def execute(self, statement, args=None):
        self.statements.append((statement, args))
        return self.conn.execute(statement, args)


def buffers(conn, scope, since):
    """The shared buffers (hit + read) and the rows the scans of a read of C{scope}'s figure touched."""
    recorded = Recorded(conn)
    Store._spent(recorded, scope, since)
    touched = rows = 0
    for statement, args in recorded.statements:
        plan = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}", args).fetchone()[0][0]["Plan"]
        touched += plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0)
        rows += _rows(plan)
    return touched, rows


def _rows(node):
    own = (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * node.get("Actual Loops", 1)
    return (own if "Relation Name" in node else 0) + sum(_rows(child) for child in node.get("Plans", ()))


def backend_cpu(pid) -> float:
    """The CPU seconds (user and system) the database's process C{pid} has used (it runs on this machine)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(reads, call):
    times = []
    for _ in range(reads):
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def ledger(conn, children, days, first) -> int:
    """Migrate the database of C{conn} and write C{days} days from C{first} of one record a day for each of
    C{children} paths under C{/team}, each its own key; returns its schema version."""
    migrate(conn)
    rows = [record(f"r{d}-{c}", first + d * DAY + c, f"k_{c}", f"/team/c{c}")
            for d in range(days) for c in range(children)]
    for at in range(0, len(rows), 10000):
        Store._add(conn, rows[at:at + 10000])
    conn.execute("ANALYZE")  # (no VACUUM: the day sums, updated by every flush, are seldom all visible)
    return conn.execute("SELECT version FROM schema_version").fetchone()[0]


def arguments(doc):
    """A parser of a bench of C{doc}, with the ledger's C{--children} and C{--days}."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--children", type=int, default=2000)
    parser.add_argument("--days", type=int, default=30)
    return parser


def main():
    parser = arguments(__doc__)
    parser.add_argument("--reads", type=int, default=40)
    parser.add_argument("--flushes", type=int, default=100)
    options = parser.parse_args()
    name = postgres.create_database()
    try:
        with psycopg.connect(postgres.url(name), autocommit=True) as conn:
            version = ledger(conn, options.children, options.days, FIRST_DAY)
            end = FIRST_DAY + options.days * DAY
            print(f"schema {version}: {options.children} children of /team, {options.days} days, "
                  f"{options.children * options.days} records")
            print(f"{'scope':<16} {'since':<10} {'median ms':>9} {'p90 ms':>7} {'buffers':>8} {'rows':>7}")
            for scope in ("path:/team", "path:/team/c7", "key:k_7", "path:/"):
                for label, since in (("month", FIRST_DAY), ("reset", end - DAY * 1.5)):
                    median, p90 = timed(options.reads, lambda: Store._spent(conn, scope, since))
                    touched, read = buffers(conn, scope, since)
                    print(f"{scope:<16} {label:<10} {median:9.2f} {p90:7.2f} {touched:8d} {read:7d}")
            flushes = iter(range(10 ** 6))

            def flush():
                n = next(flushes)
                Store._add(conn, [record(f"f{n}-{i}", end - 60 + i * 0.1, f"k_{i % 20}", f"/team/c{i % 20}")
                                  for i in range(200)])
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            triggers = [name for name, in conn.execute(
                "SELECT tgname FROM pg_trigger WHERE tgname LIKE 'usage_path_days%%'")]
            turns = (("flush of 200", "ENABLE"), ("without path sums", "DISABLE"))[:1 + bool(triggers)]
            for _ in range(2):  # (where the paths' day sums are kept: with their triggers and without, in turn)
                for label, enable in turns:
                    for name in triggers:
                        conn.execute(f"ALTER TABLE usage {enable} TRIGGER {name}")
                    cpu = backend_cpu(backend)
                    median, p90 = timed(options.flushes, flush)
                    cpu = (backend_cpu(backend) - cpu) / options.flushes * 1000
                    print(f"{label:<27} {median:9.2f} {p90:7.2f} {cpu:8.2f} ms of the database's CPU a flush")
    finally:
        postgres.drop_database(name)


if __name__ == "__main__":
    main()
