#!/usr/bin/env python3
"""What a parent path's budget costs PostgreSQL in a running gateway without Redis, where it is read each second.

    PYTHONPATH=$PWD python bench/path_budget_gateway.py [--children 2000] [--days 30] [--seconds 30] [--rate 5]

Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth); a fresh database, dropped after. The ledger holds
C{--days} past days of one record a day for each of C{--children} paths under C{/team} (bench/path_budget.py's),
then one gateway (twistd, STORAGE_TYPE=postgresql, no REDIS_URL: each process raises the sums it charged to the
ledger's figure each second, L{gomodel.limits.budgets.BudgetBook.follow}) is given a C{total} budget on C{/team}
and a managed key under it, C{/team/c7}, whose chat requests (the suite's fake vLLM) go at C{--rate} a second for
C{--seconds}. Prints the CPU time that the database's processes serving the gateway took per second (/proc:
PostgreSQL on this machine), and the requests' p50 and p99 latency.
"""

import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

import psycopg  # noqa: E402

from path_budget import DAY, arguments, backend_cpu, ledger  # noqa: E402
from scaleout import MASTER, MODEL, call, start_fake, start_gateway, stop  # noqa: E402
from tests import postgres  # noqa: E402


def database_cpu(name) -> tuple:
    """The CPU seconds of the database's processes serving database C{name} now (its sessions), and their ids."""
    pids = [pid for pid, in postgres.admin("SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,))]
    total = 0.0
    for pid in pids:
        try:
            total += backend_cpu(pid)
        except FileNotFoundError:  # (a session that ended meanwhile)
            pass
    return total, set(pids)


def main():
    parser = arguments(__doc__)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rate", type=float, default=5)
    options = parser.parse_args()
    name = postgres.create_database()
    workdir = tempfile.mkdtemp(prefix="path-budget-")
    fake, base_url = start_fake()
    gateway = None
    try:
        with psycopg.connect(postgres.url(name), autocommit=True) as conn:
            version = ledger(conn, options.children, options.days, (int(time.time()) // DAY - options.days) * DAY)
        gateway, port = start_gateway({"VLLM_BASE_URL": base_url, "GOMODEL_MASTER_KEY": MASTER,
                                       "STORAGE_TYPE": "postgresql", "POSTGRES_URL": postgres.url(name),
                                       "GOMODEL_DATA_DIR": workdir, "GOMODEL_ACCESS_LOG": "false",
                                       "USAGE_ENABLED": "true"}, workdir)
        status, payload = call(port, "PUT", "/admin/api/v1/budgets",
                               {"user_path": "/team", "period": "total", "max_tokens": 10 ** 12})
        assert status in (200, 201), payload
        status, payload = call(port, "POST", "/admin/api/v1/auth-keys", {"name": "bench", "user_path": "/team/c7"})
        assert status == 201, payload
        key = json.loads(payload)["value"]
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        deadline = time.monotonic() + 30
        while call(port, "POST", "/v1/chat/completions", body, key=key)[0] != 200:  # (the key ring has it)
            assert time.monotonic() < deadline, "the managed key was never taken"
            time.sleep(0.2)
        for _ in range(20):
            call(port, "POST", "/v1/chat/completions", body, key=key)
        time.sleep(2)  # (a second's follow of the sums charged, the first read after the seed)
        cpu, pids = database_cpu(name)
        began, latencies = time.monotonic(), []
        while time.monotonic() - began < options.seconds:
            sent = time.perf_counter()
            status, payload = call(port, "POST", "/v1/chat/completions", body, key=key)
            assert status == 200, payload
            latencies.append((time.perf_counter() - sent) * 1000)
            time.sleep(max(0.0, 1 / options.rate - (time.perf_counter() - sent)))
        took = time.monotonic() - began
        after, now = database_cpu(name)
        latencies.sort()
        print(f"schema {version}: {options.children} children of /team, {options.days} days; "
              f"{len(latencies)} requests of /team/c7 in {took:.1f} s")
        print(f"database CPU {(after - cpu) / took * 1000:.1f} ms a second ({len(now)} sessions"
              f"{'' if now == pids else ', not all the same throughout'}); "
              f"p50 {statistics.median(latencies):.2f} ms, p99 {latencies[int(0.99 * (len(latencies) - 1))]:.2f} ms")
    finally:
        if gateway is not None:
            stop(gateway)
        stop(fake)
        postgres.drop_database(name)


if __name__ == "__main__":
    main()
