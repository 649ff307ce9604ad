"""Memory and cold start of one gateway start: exec to first 200, RSS after start, peak RSS after N requests.

    python bench/lean.py [--runs 7] [--requests 300] [--workers N] [--plugin-cache cold|warm] [-- command ...]

Each run starts a fresh gateway (default command: C{twistd -n --pidfile= gomodel}
from the running interpreter's bin directory) in front of a small vLLM-shaped
mock served by this process, on free ports, with the default configuration (a
master key, one upstream; metrics, usage, access log, admin API and dashboard
on, SQLite store in a fresh data directory). It reports, per run:

- C{health_s}: exec to the first 200 of C{GET /health}; C{cpu_s}: the CPU time the gateway process
  had used by then (user and system; less sensitive than wall time to other work on the machine);
- C{chat_s}: exec to the first 200 of a chat completion (the model is known);
- C{first_ms} / C{next_ms}: the latency of the first chat request answered 200 (on a new
  connection) and the median of the next ten (on one keep-alive connection);
- C{rss_start}: VmRSS of every gateway process once it answers, MiB;
- C{hwm}: VmHWM (peak RSS) of every gateway process after C{--requests} chat requests (from
  4 client threads, a new connection each) and a GET of C{/v1/models}, C{/health/ready},
  C{/metrics} (unless C{METRICS_ENABLED=false}; with Prometheus' own C{Accept} header, which asks for
  OpenMetrics first, unless C{--scrape-accept} says otherwise: C{--scrape-accept ''} scrapes as curl does,
  the Prometheus text format) and each C{--get} path, MiB.

C{--features} starts it as bench/run.sh's C{gomodel-features} target runs (bench/harness/targets.py):
one provider of four replicas (four mocks), rate limits and budgets on, the access log, metrics and usage
on, and every request after the first C{/health} made with a managed key (made through the admin API with
the master key) that has a rate limit, a concurrency limit, a model allowlist and a daily budget, all far
above the load.

C{--plugin-cache cold} removes Twisted's plugin cache (C{dropin.cache} in
every C{twisted/plugins} directory of the gateway's interpreter, C{--python})
before each start: a fresh C{pip install .}, or a site-packages the gateway
cannot write; C{warm} writes it before each start, as the Docker image does.
Cold start figures need compiled bytecode: with C{PYTHONDONTWRITEBYTECODE}
set, run C{python -m compileall gomodel} in a checkout first.
Standard library only; prints one JSON line per run and the medians.
"""

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness.proc import descendants, free_port, serving_processes  # noqa: E402

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
KEY = "lean-bench-key"
# The Accept header of a Prometheus server's scrape (Prometheus 2.30's: OpenMetrics first, then its text format).
PROMETHEUS_ACCEPT = "application/openmetrics-text; version=0.0.1,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
CHAT = json.dumps({"model": "vllm/" + MODEL, "messages": [{"role": "user", "content": "Hi"}]}).encode()
ANSWER = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
}).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "vllm"}]}).encode()


class _Mock(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def _send(self, body, content_type="application/json"):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.endswith("/models"):
            self._send(MODELS)
        elif self.path == "/metrics":
            self._send(b"", "text/plain")
        else:
            self._send(b"{}")

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send(ANSWER)


def status(pid):
    """VmRSS and VmHWM of a process, MiB."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line[:5]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def cpu_seconds(pid):
    """User and system CPU time of a process so far (its exec'd predecessors in the same pid included)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# The key requests are made with: the master key, or (--features) the managed key made at start.
_key = [KEY]
# --features: the managed key's limits (bench/harness/targets.py's GoModelFeatures), far above the load.
FEATURES_KEY = {"name": "lean-features", "user_path": "/bench/features", "models": ["vllm/"], "rpm": 1_000_000_000,
                "tpm": 1_000_000_000_000, "max_concurrency": 100_000,
                "budgets": [{"period": "daily", "max_tokens": 10_000_000_000_000}]}
FEATURES_ENV = {"RATE_LIMITS_ENABLED": "true", "BUDGETS_ENABLED": "true", "GOMODEL_ACCESS_LOG": "true",
                "METRICS_ENABLED": "true", "USAGE_ENABLED": "true"}


def request(conn, method, path, body=None, accept=None):
    headers = {"Authorization": "Bearer " + _key[0]}
    if accept is not None:
        headers["Accept"] = accept
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    r.read()
    return r.status


def wait_for(port, method, path, body, deadline, proc):
    """Poll until C{method path} answers 200: C{(when it did (perf_counter), how long that request took)}."""
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            sent = time.perf_counter()
            if request(conn, method, path, body) == 200:
                done = time.perf_counter()
                conn.close()
                return done, done - sent
            conn.close()
        except OSError:
            pass
        time.sleep(0.002)
    raise RuntimeError(f"no 200 from {path} in time")


def remove_plugin_caches(python):
    code = ("import os, twisted.plugins as p; print('\\n'.join(os.path.join(d, 'dropin.cache') "
            "for d in p.__path__))")
    paths = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def managed_key(port):
    """Make the --features managed key (admin API, master key): its value."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/admin/api/v1/auth-keys", body=json.dumps(FEATURES_KEY).encode(),
                 headers={"Authorization": "Bearer " + KEY, "Content-Type": "application/json"})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    if r.status not in (200, 201):
        raise RuntimeError(f"POST /admin/api/v1/auth-keys -> {r.status} {body[:200]!r}")
    return json.loads(body)["value"]


def one_run(command, args, upstream):
    port = free_port()
    data = tempfile.mkdtemp(prefix="gomodel-lean-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "GOMODEL_"))}
    env.update({"VLLM_BASE_URL": upstream, "GOMODEL_MASTER_KEY": KEY, "GOMODEL_DATA_DIR": data})
    if args.features:
        env.update(FEATURES_ENV)
    env.update(dict(kv.split("=", 1) for kv in args.env))
    argv = command + ["--listen", f"tcp:{port}:interface=127.0.0.1"]
    if args.workers > 1:
        argv += ["--workers", str(args.workers)]
    log = open(os.path.join(data, "gateway.log"), "wb")
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=data)
    try:
        deadline = started + 30
        _key[0] = KEY
        health, _ = wait_for(port, "GET", "/health", None, deadline, proc)
        cpu = cpu_seconds(proc.pid)
        if args.features:
            _key[0] = managed_key(port)
        chat, first = wait_for(port, "POST", "/v1/chat/completions", CHAT, deadline, proc)
        if args.workers > 1:  # every worker taking connections, then 10 x N chats in a row on new connections
            while serving_processes(log.name) < args.workers:
                if time.perf_counter() > deadline:
                    raise RuntimeError("the workers did not all take connections in time")
                time.sleep(0.01)
            in_a_row = 0
            while in_a_row < 10 * args.workers:
                if time.perf_counter() > deadline:
                    raise RuntimeError("the workers did not all answer in time")
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                in_a_row = in_a_row + 1 if request(conn, "POST", "/v1/chat/completions", CHAT) == 200 else 0
                conn.close()
        pids = descendants(proc.pid)
        rss_start = [round(status(p).get("VmRSS", 0), 1) for p in pids]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        times = []
        for _ in range(10):
            t = time.perf_counter()
            assert request(conn, "POST", "/v1/chat/completions", CHAT) == 200
            times.append(time.perf_counter() - t)
        conn.close()
        errors = []

        def load(n):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for _ in range(n):
                if request(c, "POST", "/v1/chat/completions", CHAT) != 200:
                    errors.append(1)
                c.close()  # a new connection each time: every worker gets some
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

        per = max(1, args.requests // 4)
        threads = [threading.Thread(target=load, args=(per,)) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        metrics = os.environ.get("METRICS_ENABLED", "true") if "METRICS_ENABLED" not in env else env["METRICS_ENABLED"]
        paths = ("/v1/models", "/health/ready") + (("/metrics",) if metrics.lower() != "false" else ())
        for path in paths + tuple(args.get):
            request(http.client.HTTPConnection("127.0.0.1", port, timeout=10), "GET", path,
                    accept=(args.scrape_accept or None) if path == "/metrics" else None)
        hwm = [round(status(p).get("VmHWM", 0), 1) for p in pids]
        rss_end = [round(status(p).get("VmRSS", 0), 1) for p in pids]
        return {"health_s": round(health - started, 3), "cpu_s": round(cpu, 2), "chat_s": round(chat - started, 3),
                "first_ms": round(first * 1000, 2), "next_ms": round(statistics.median(times) * 1000, 2),
                "rss_start": rss_start, "rss_end": rss_end, "hwm": hwm, "errors": len(errors)}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(data, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--plugin-cache", choices=("asis", "cold", "warm"), default="asis",
                   help="before each start: leave Twisted's plugin cache as it is, remove it, or write it")
    p.add_argument("--python", default=sys.executable, help="the gateway's interpreter (for --plugin-cache)")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the gateway (repeatable)")
    p.add_argument("--get", action="append", default=[], metavar="PATH",
                   help="also GET this path after the load, before peak RSS is read (repeatable)")
    p.add_argument("--features", action="store_true",
                   help="everything on, as bench/run.sh's gomodel-features target: four replicas, a managed key "
                        "with limits and a budget, rate limits, budgets, access log, metrics, usage")
    p.add_argument("--scrape-accept", default=PROMETHEUS_ACCEPT,
                   help="the Accept header of the /metrics scrape (default: Prometheus' own; '' for none)")
    p.add_argument("command", nargs="*", help="the gateway command (default: twistd -n --pidfile= gomodel)")
    args = p.parse_args()
    command = args.command or [os.path.join(os.path.dirname(args.python), "twistd"), "-n", "--pidfile=", "gomodel"]

    servers = []
    for _ in range(4 if args.features else 1):  # (--features: the four replicas of its one provider)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Mock)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    upstream = ",".join(f"http://127.0.0.1:{s.server_address[1]}/v1" for s in servers)
    runs = []
    for _ in range(args.runs):
        if args.plugin_cache == "cold":
            remove_plugin_caches(args.python)
        elif args.plugin_cache == "warm":
            subprocess.run([args.python, "-c", "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"],
                           check=True, capture_output=True)
        run = one_run(command, args, upstream)
        print(json.dumps(run), flush=True)
        runs.append(run)
    med = {k: round(statistics.median(r[k] for r in runs), 3) for k in ("health_s", "cpu_s", "chat_s", "first_ms", "next_ms")}
    for k in ("rss_start", "rss_end", "hwm"):
        med[k + "_max"] = round(statistics.median(max(r[k]) for r in runs), 1)
    print(json.dumps({"median": med, "runs": len(runs), "command": command, "plugin_cache": args.plugin_cache,
                      "features": args.features}))
    for server in servers:
        server.shutdown()


if __name__ == "__main__":
    main()
