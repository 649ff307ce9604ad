#!/usr/bin/env python3
"""Scale-out benchmark: the PostgreSQL store's cost on the hot path, and batch throughput of 1 host vs 2.

    PYTHONPATH=$PWD python bench/scaleout.py [--requests 2000] [--concurrency 8] [--lines 400] [--batches 4]

Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth); each run uses a fresh database, dropped after.
Upstream: the test suite's fake vLLM (tests/fakes/vllm.py) in its own process. Gateways: real twistd
processes. Writes bench/results/<date>-scaleout.md and .jsonl.

1. Hot path: chat requests/s and latency through one gateway, SQLite store vs PostgreSQL store,
   with the master key and with a managed key (usage on, key ring and budgets refreshed from the store).
2. Batches: B batches of N lines (each line answered after fake_delay) run by 1 gateway, then by 2
   gateways on one PostgreSQL, created round-robin (a load balancer) and all on the first (sticky
   clients). Batches are claimed whole: any host takes any batch, the least busy first; the gateways'
   logs ("claimed batch ...") say how many each host ran.
"""

import argparse
import datetime
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests import postgres  # noqa: E402

MASTER = "bench-master"
MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"
FAKE = """
import sys
from twisted.internet import reactor
from tests.fakes.vllm import FakeVLLM
fake = FakeVLLM(reactor)
fake.start().addCallback(lambda f: (print(f.base_url, flush=True)))
reactor.run()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with(**extra):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    return {k: v for k, v in env.items() if not k.startswith("VLLM_") or k in extra}


def start_fake():
    proc = subprocess.Popen([sys.executable, "-c", FAKE], env=env_with(), stdout=subprocess.PIPE, cwd=REPO)
    return proc, proc.stdout.readline().decode().strip()


def log_path(workdir, port):
    return os.path.join(workdir, f"gw-{port}.log")


def claimed(workdir, port):
    """The batches a gateway claimed (its log's "claimed batch ..." lines)."""
    with open(log_path(workdir, port), errors="replace") as f:
        return set(re.findall(r"claimed batch (batch_\w+)", f.read()))


def start_gateway(env, workdir):
    port = free_port()
    log = open(log_path(workdir, port), "wb")
    proc = subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                             "--pidfile=", "gomodel", "--listen", f"tcp:{port}:interface=127.0.0.1"],
                            env=env_with(**env), cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            status, _ = call(port, "GET", "/health/ready")
            if status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"gateway on {port} never got ready")


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def call(port, method, path, body=None, key=MASTER, conn=None):
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"authorization": f"Bearer {key}"}
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers["content-type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    payload = response.read()
    if own:
        conn.close()
    return response.status, payload


def load(port, key, requests, concurrency):
    """Chat requests from C{concurrency} keep-alive clients; (requests/s, p50 ms, p99 ms, errors)."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).encode()
    latencies, errors, lock = [], [0], threading.Lock()
    per = requests // concurrency

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for _ in range(per):
            t0 = time.perf_counter()
            status, _ = call(port, "POST", "/v1/chat/completions", body, key=key, conn=conn)
            mine.append(time.perf_counter() - t0)
            if status != 200:
                with lock:
                    errors[0] += 1
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - start
    latencies.sort()
    return {"rps": round(len(latencies) / took, 1), "p50_ms": round(1000 * statistics.median(latencies), 2),
            "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2), "errors": errors[0]}


def hot_path(base_url, args, workdir):
    rows = []
    for storage in ("sqlite", "postgresql"):
        database = postgres.create_database() if storage == "postgresql" else None
        env = {"VLLM_BASE_URL": base_url, "GOMODEL_MASTER_KEY": MASTER, "STORAGE_TYPE": storage,
               "GOMODEL_DATA_DIR": tempfile.mkdtemp(dir=workdir), "GOMODEL_ACCESS_LOG": "false",
               "USAGE_ENABLED": "true"}
        if database:
            env["POSTGRES_URL"] = postgres.url(database)
        proc, port = start_gateway(env, workdir)
        try:
            status, payload = call(port, "POST", "/admin/api/v1/auth-keys", {"name": "bench", "user_path": "/bench"})
            assert status == 201, payload
            managed = json.loads(payload)["value"]
            time.sleep(1.5)  # the key ring has it
            load(port, MASTER, 200, args.concurrency)  # warm-up
            for who, key in (("master key", MASTER), ("managed key, usage on", managed)):
                before = _xacts(database)
                result = load(port, key, args.requests, args.concurrency)
                time.sleep(6)  # the usage ledger's flush (every 5 s) lands in the count
                if database:  # database transactions per request, the background refreshes included
                    result["db_xacts_per_request"] = round((_xacts(database) - before) / args.requests, 3)
                rows.append(dict(result, storage=storage, key=who))
                print(f"hot path  {storage:10} {who:22} {result}", flush=True)
        finally:
            stop(proc)
            if database:
                postgres.drop_database(database)
    return rows


def _xacts(database):
    if database is None:
        return 0
    return postgres.admin("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                          (database,))[0][0]


SCENARIOS = ((1, "the host"), (2, "round-robin"), (2, "the first host"))


def batches(base_url, args, workdir):
    rows = []
    for hosts, created_on in SCENARIOS:
        database = postgres.create_database()
        env = {"VLLM_BASE_URL": base_url, "GOMODEL_MASTER_KEY": MASTER, "STORAGE_TYPE": "postgresql",
               "POSTGRES_URL": postgres.url(database), "GOMODEL_ACCESS_LOG": "false",
               "BATCH_CONCURRENCY_PER_PROVIDER": str(args.batch_concurrency),
               "GOMODEL_DATA_DIR": tempfile.mkdtemp(dir=workdir)}
        if args.max_claimed:
            env["BATCH_MAX_CLAIMED"] = str(args.max_claimed)
        gateways = [start_gateway(env, workdir) for _ in range(hosts)]
        try:
            port = gateways[0][1]
            ids = []
            for b in range(args.batches):
                lines = b"".join(json.dumps({"custom_id": f"b{b}-{i}", "method": "POST",
                                             "url": "/v1/chat/completions", "body": {
                                                 "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 5, "fake_delay": args.delay}}).encode() + b"\n"
                                 for i in range(args.lines))
                boundary = uuid.uuid4().hex
                form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n"
                        f"Content-Type: application/jsonl\r\n\r\n").encode() + lines + f"\r\n--{boundary}--\r\n".encode()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                conn.request("POST", "/v1/files", body=form, headers={
                    "authorization": f"Bearer {MASTER}", "content-type": f"multipart/form-data; boundary={boundary}"})
                uploaded = json.loads(conn.getresponse().read())
                conn.close()
                ids.append(uploaded["id"])
            start = time.perf_counter()
            batch_ids = []
            # Created round-robin, as a load balancer spreads them, or all on the first host, as sticky
            # clients do; files uploaded on the first host are read by the others.
            for n, file_id in enumerate(ids):
                target = gateways[n % hosts if created_on == "round-robin" else 0][1]
                status, payload = call(target, "POST", "/v1/batches", {
                    "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
                assert status == 200, payload
                batch_ids.append(json.loads(payload)["id"])
            pending = set(batch_ids)
            while pending:
                for batch_id in list(pending):
                    status, payload = call(port, "GET", f"/v1/batches/{batch_id}")
                    if json.loads(payload)["status"] in ("completed", "failed", "expired", "cancelled"):
                        pending.discard(batch_id)
                time.sleep(0.1)
            took = time.perf_counter() - start
            owners = postgres.query(database, "SELECT count(*) FROM batch_results")
            total = args.batches * args.lines
            row = {"hosts": hosts, "created_on": created_on, "batches": args.batches, "lines": total,
                   "seconds": round(took, 2), "lines_per_s": round(total / took, 1), "results": owners[0][0],
                   "batches_per_host": [len(claimed(workdir, port) & set(batch_ids)) for _, port in gateways]}
            rows.append(row)
            print(f"batches   {row}", flush=True)
        finally:
            for proc, _ in gateways:
                stop(proc)
            postgres.drop_database(database)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--lines", type=int, default=400)
    p.add_argument("--delay", type=float, default=0.05, help="seconds the fake takes per batch line")
    p.add_argument("--skip-hot-path", action="store_true")
    p.add_argument("--batch-concurrency", type=int, default=8, help="BATCH_CONCURRENCY_PER_PROVIDER per host")
    p.add_argument("--max-claimed", type=int, default=None, help="BATCH_MAX_CLAIMED per host (default: its own)")
    args = p.parse_args()
    reason = postgres.unreachable()
    if reason:
        raise SystemExit(reason)
    workdir = tempfile.mkdtemp(prefix="gomodel-scaleout-bench-")
    fake, base_url = start_fake()
    try:
        hot = [] if args.skip_hot_path else hot_path(base_url, args, workdir)
        batch = batches(base_url, args, workdir)
    finally:
        stop(fake)
    date = datetime.date.today().isoformat()
    out = os.path.join(REPO, "bench", "results", f"{date}-scaleout")
    with open(out + ".jsonl", "w") as f:
        for row in hot:
            f.write(json.dumps(dict(row, part="hot_path")) + "\n")
        for row in batch:
            f.write(json.dumps(dict(row, part="batches")) + "\n")
    with open(out + ".md", "w") as f:
        f.write(f"# Scale-out: {date}\n\nMachine: {os.cpu_count()} CPUs (shared), PostgreSQL on 127.0.0.1, "
                "fake vLLM (tests/fakes/vllm.py) in its own process, gateways as twistd processes.\n"
                f"Command: `python bench/scaleout.py {' '.join(sys.argv[1:])}`\n\n")
        f.write(f"## Hot path: chat through one gateway ({args.requests} requests, {args.concurrency} clients)\n\n"
                "| store | key | req/s | p50 ms | p99 ms | errors | database transactions per request |\n"
                "|---|---|---|---|---|---|---|\n")
        for row in hot:
            f.write(f"| {row['storage']} | {row['key']} | {row['rps']} | {row['p50_ms']} | {row['p99_ms']} | "
                    f"{row['errors']} | {row.get('db_xacts_per_request', '-')} |\n")
        f.write(f"\n## Batches on one PostgreSQL ({args.batches} batches x {args.lines} lines, {args.delay}s "
                f"per line upstream, BATCH_CONCURRENCY_PER_PROVIDER={args.batch_concurrency} per host)\n\n"
                "| hosts | batches created on | lines | seconds | lines/s | batches run by each host |\n"
                "|---|---|---|---|---|---|\n")
        for row in batch:
            f.write(f"| {row['hosts']} | {row['created_on']} | {row['lines']} | {row['seconds']} | "
                    f"{row['lines_per_s']} | {' / '.join(map(str, row['batches_per_host']))} |\n")
    print("wrote", out + ".md")


if __name__ == "__main__":
    main()
