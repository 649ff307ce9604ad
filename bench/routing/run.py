#!/usr/bin/env python3
"""Routing benchmark: routers over one simulated 4-replica vLLM fleet, same workload for each.

For every repeat and every router (the order rotates between repeats): a fresh
fleet (bench/routing/fleet.py: 4 replicas, one of them slower), the router
started in front of it, a pre-flight request, the workload
(bench/routing/loadgen.py: multi-turn sessions with long shared prefixes plus
one-shots, open loop), then the fleet's per-request log (which replica, how
many prompt tokens came from its prefix cache), router and fleet stopped by
PID. Writes bench/results/<date>-routing[-tag].md and .jsonl.
See bench/README.md ("Routing benchmark"). Usually started as
`bash bench/routing/run.sh [options]`.
"""

import argparse
import asyncio
import datetime
import json
import os
import secrets
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH_DIR = os.path.dirname(HERE)
REPO_DIR = os.path.dirname(BENCH_DIR)
sys.path.insert(0, HERE)
sys.path.insert(0, BENCH_DIR)

from harness import proc  # noqa: E402
from harness.targets import clean_env, http_get  # noqa: E402
import fleet as fleetmod  # noqa: E402
import loadgen  # noqa: E402

MODEL = fleetmod.MODEL
ROUTERS = ["gomodel-load", "gomodel-rr", "vllm-router-cache_aware", "vllm-router-power_of_two", "litellm-least-busy"]


def log(msg):
    print("[routing %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def csv(s):
    return [x.strip() for x in s.split(",") if x.strip()]


# -- routers ----------------------------------------------------------------------------

class Router:
    name = "?"
    model = MODEL
    start_timeout = 120.0

    def __init__(self, ctx):
        self.ctx = ctx
        self.proc = None
        self.port = None
        self.log = os.path.join(ctx.run_dir, "%s.log" % self.name)
        self.unavailable = None

    def headers(self):
        return {}

    def version(self):
        return "?"

    def start(self, urls):
        self.port = proc.free_port()
        cmd = self.command(urls)
        with open(self.log, "ab") as f:
            f.write(("\n# %s  %s\n" % (time.strftime("%H:%M:%S"), " ".join(shlex.quote(c) for c in cmd))).encode())
        self.proc = proc.spawn(cmd, self.log, env=self.env(urls), cpus=self.ctx.args.router_cpus,
                               cwd=self.ctx.run_dir)
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with %s while starting (see %s)" % (self.name, self.proc.returncode,
                                                                                  self.log))
            ok, last = self.ready()
            if ok:
                return
            time.sleep(0.25)
        raise RuntimeError("%s not ready after %.0f s: %s (see %s)" % (self.name, self.start_timeout, last, self.log))

    def stop(self):
        proc.stop_tree(self.proc)
        self.proc = None

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def models_ready(self):
        st, body = http_get(self.url("/v1/models"), self.headers())
        if st != 200:
            return False, "GET /v1/models -> %s" % st
        ids = {m.get("id") for m in json.loads(body).get("data", [])}
        return (self.model in ids), "models: %s" % sorted(ids)


class GoModel(Router):
    """gomodel as an operator starts it: twistd plugin, one provider with 4 replicas."""

    def __init__(self, ctx, strategy):
        self.strategy = strategy
        self.name = "gomodel-" + ("rr" if strategy == "round_robin" else strategy)
        super().__init__(ctx)
        self.model = "vllm/" + MODEL

    def python(self):
        return self.ctx.args.gomodel_python

    def version(self):
        g = subprocess.run(["git", "-C", REPO_DIR, "describe", "--always", "--dirty"], capture_output=True, text=True)
        return "gomodel (git %s), ROUTING_STRATEGY=%s" % (g.stdout.strip() or "?", self.strategy)

    def command(self, urls):
        twistd = os.path.join(os.path.dirname(self.python()), "twistd")
        return [twistd, "-n", "--pidfile=", "gomodel", "--listen", "tcp:%d:interface=127.0.0.1" % self.port]

    def env(self, urls):
        extra = {"VLLM_BASE_URL": ",".join(u + "/v1" for u in urls), "ROUTING_STRATEGY": self.strategy,
                 "REPLICA_METRICS_INTERVAL": str(self.ctx.args.metrics_interval), "GOMODEL_ACCESS_LOG": "false",
                 "GOMODEL_MASTER_KEY": self.ctx.api_key, "PYTHONPATH": REPO_DIR}
        extra.update(self.ctx.args.gomodel_env)
        return clean_env(extra)

    def headers(self):
        return {"Authorization": "Bearer " + self.ctx.api_key}

    def ready(self):
        st, _ = http_get(self.url("/health"))
        if st != 200:
            return False, "GET /health -> %s" % st
        ok, why = self.models_ready()
        if not ok:
            return ok, why
        st, body = http_get(self.url("/admin/api/v1/providers/status"), self.headers())
        if st != 200:
            return False, "providers/status -> %s" % st
        states = [r.get("state") for p in json.loads(body).get("providers", []) for r in p.get("replicas", [])]
        return states.count("ready") == len(self.ctx.fleet_urls), "replicas: %s" % states


class VllmRouter(Router):
    """The vLLM project's Rust router (pip install vllm-router) with one of its policies."""

    def __init__(self, ctx, policy):
        self.policy = policy
        self.name = "vllm-router-" + policy
        super().__init__(ctx)

    @property
    def exe(self):
        return os.path.join(self.ctx.args.vllm_router_venv, "bin", "vllm-router")

    def install(self):
        if os.path.exists(self.exe):
            return
        if self.ctx.args.no_install:
            self.unavailable = "%s missing and --no-install was given" % self.exe
            return
        venv = self.ctx.args.vllm_router_venv
        r = subprocess.run("%s -m venv %s && %s/bin/pip install -q vllm-router" % (
            shlex.quote(sys.executable), shlex.quote(venv), shlex.quote(venv)), shell=True, capture_output=True,
            text=True)
        if r.returncode != 0 or not os.path.exists(self.exe):
            self.unavailable = "pip install vllm-router failed: %s" % (r.stderr.strip().splitlines() or ["?"])[-1]

    def version(self):
        r = subprocess.run([os.path.join(self.ctx.args.vllm_router_venv, "bin", "python"), "-c",
                            "import importlib.metadata as m; print(m.version('vllm-router'))"],
                           capture_output=True, text=True)
        return "vllm-router %s, --policy %s" % (r.stdout.strip() or "?", self.policy)

    def command(self, urls):
        return [self.exe, "--host", "127.0.0.1", "--port", str(self.port), "--worker-urls", *urls,
                "--policy", self.policy, "--log-level", "warning",
                # its Prometheus exporter listens on 0.0.0.0:29000 by default: loopback, a free port
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(proc.free_port())] + shlex.split(self.ctx.args.vllm_router_args)

    def env(self, urls):
        return clean_env({})

    def ready(self):
        return self.models_ready()


class LiteLLM(Router):
    """LiteLLM proxy, one model with 4 deployments, router_settings.routing_strategy least-busy."""
    name = "litellm-least-busy"
    start_timeout = 180.0

    @property
    def venv(self):
        return self.ctx.args.litellm_venv

    def install(self):
        exe = os.path.join(self.venv, "bin", "litellm")
        if os.path.exists(exe):
            return
        if self.ctx.args.no_install:
            self.unavailable = "%s missing and --no-install was given" % exe
            return
        r = subprocess.run("%s -m venv %s && %s/bin/pip install -q 'litellm[proxy]'" % (
            shlex.quote(sys.executable), shlex.quote(self.venv), shlex.quote(self.venv)), shell=True,
            capture_output=True, text=True)
        if r.returncode != 0 or not os.path.exists(exe):
            self.unavailable = "pip install litellm[proxy] failed: %s" % (r.stderr.strip().splitlines() or ["?"])[-1]

    def version(self):
        r = subprocess.run([os.path.join(self.venv, "bin", "python"), "-c",
                            "import importlib.metadata as m; print(m.version('litellm'))"], capture_output=True,
                           text=True)
        return "litellm %s, routing_strategy least-busy" % (r.stdout.strip() or "?")

    def config(self, urls):
        path = os.path.join(self.ctx.run_dir, "litellm-routing.yaml")
        lines = ["model_list:"]
        for u in urls:
            lines += ["  - model_name: %s" % json.dumps(MODEL),
                      "    litellm_params:",
                      "      model: %s" % json.dumps("openai/" + MODEL),
                      "      api_base: %s" % json.dumps(u + "/v1"),
                      "      api_key: sk-upstream-unused"]
        lines += [
            "litellm_settings:",
            "  num_retries: 0",
            "  request_timeout: 600",
            "  set_verbose: false",
            "  turn_off_message_logging: true",
            "  telemetry: false",
            "router_settings:",
            "  routing_strategy: least-busy",
            "  num_retries: 0",
            "  disable_cooldowns: true",
            "general_settings:",
            "  disable_spend_logs: true",
            "  disable_error_logs: true",
            "  background_health_checks: false",
        ]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def command(self, urls):
        return [os.path.join(self.venv, "bin", "litellm"), "--config", self.config(urls), "--host", "127.0.0.1",
                "--port", str(self.port), "--num_workers", "1"]

    def env(self, urls):
        return clean_env({"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1",
                          "TRANSFORMERS_OFFLINE": "1", "DISABLE_ADMIN_UI": "True", "NO_DOCS": "True",
                          "LITELLM_MASTER_KEY": self.ctx.api_key})

    def headers(self):
        return {"Authorization": "Bearer " + self.ctx.api_key}

    def ready(self):
        st, _ = http_get(self.url("/health/liveliness"))
        if st != 200:
            return False, "GET /health/liveliness -> %s" % st
        return self.models_ready()


def make_router(ctx, name):
    if name == "gomodel-load":
        return GoModel(ctx, "load")
    if name == "gomodel-rr":
        return GoModel(ctx, "round_robin")
    if name.startswith("gomodel-"):
        return GoModel(ctx, name[len("gomodel-"):])
    if name.startswith("vllm-router-"):
        return VllmRouter(ctx, name[len("vllm-router-"):])
    if name == "litellm-least-busy":
        return LiteLLM(ctx)
    raise SystemExit("unknown router %r (known: %s, gomodel-<strategy>, vllm-router-<policy>)"
                     % (name, ", ".join(ROUTERS)))


# -- the fleet --------------------------------------------------------------------------

def start_fleet(ctx):
    a = ctx.args
    cmd = [sys.executable, os.path.join(HERE, "fleet.py"), "--replicas", str(a.replicas), "--slots", str(a.slots),
           "--tpot", str(a.tpot), "--cache-tokens", str(a.cache_tokens), "--kv-tokens", str(a.kv_tokens),
           "--prefill-per-token", str(a.prefill_per_token)]
    for s in a.slow:
        cmd += ["--slow", s]
    cmd = ["taskset", "-c", a.load_cpus] + cmd
    logf = open(os.path.join(ctx.run_dir, "fleet.log"), "ab")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, text=True, start_new_session=True)
    line = p.stdout.readline()
    if not line.startswith("LISTENING "):
        proc.stop_tree(p)
        raise RuntimeError("fleet did not start: %r" % line)
    ports = [int(x) for x in line.split()[1].split(",")]
    return p, ["http://127.0.0.1:%d" % port for port in ports]


def fleet_logs(urls):
    out = []
    for u in urls:
        st, body = http_get(u + "/bench/log", timeout=10)
        if st != 200:
            raise RuntimeError("GET %s/bench/log -> %s" % (u, st))
        out.append(json.loads(body))
    return out


# -- one run ----------------------------------------------------------------------------

def preflight(router):
    """One small streamed request through the router; error text or None."""
    pool = loadgen.Pool("127.0.0.1", router.port)

    async def go():
        r = await loadgen.stream_chat(pool, "/v1/chat/completions", router.headers(), {
            "model": router.model, "messages": [{"role": "user", "content": "pre-flight [rq:preflight]"}],
            "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}, 30)
        pool.close()
        return r
    status, ttft, total, text, usage, err = asyncio.run(go())
    return err


def measure(ctx, router, rep):
    a = ctx.args
    rec = {"type": "run", "run_id": ctx.run_id, "router": router.name, "repeat": rep, "status": "ok"}
    fleet_proc = None
    try:
        fleet_proc, urls = start_fleet(ctx)
        ctx.fleet_urls = urls
        t0 = time.monotonic()
        router.start(urls)
        rec["ready_s"] = round(time.monotonic() - t0, 2)
        err = preflight(router)
        if err:
            raise RuntimeError("pre-flight: " + err)
        time.sleep(a.settle)  # a scrape or two of /metrics before the load
        root = router.proc.pid
        cpu_a, ticks_a = proc.cpu_stat(), proc.tree_ticks(proc.descendants(root))
        fleet_a, self_a = proc.tree_ticks([fleet_proc.pid]), proc.self_ticks()
        w0 = time.monotonic()
        runner = loadgen.Runner(ctx.workload, "127.0.0.1", router.port, "/v1/chat/completions", router.model,
                                router.headers(), timeout=a.request_timeout)
        records = asyncio.run(runner.run())
        wall = time.monotonic() - w0
        cpu_b, ticks_b = proc.cpu_stat(), proc.tree_ticks(proc.descendants(root))
        fleet_b, self_b = proc.tree_ticks([fleet_proc.pid]), proc.self_ticks()
        if router.proc.poll() is not None:
            raise RuntimeError("%s exited during the run" % router.name)
        logs = fleet_logs(urls)
        n_cpu = len(cpu_a)
        busy = sum(proc.busy([y - x for x, y in zip(cpu_a[c], cpu_b[c])]) for c in cpu_a)
        ours = (ticks_b - ticks_a) + (fleet_b - fleet_a) + (self_b - self_a)
        tick = proc.CLK_TCK
        rec.update({
            "wall_s": round(wall, 1),
            "router_cpu_s": round((ticks_b - ticks_a) / tick, 2),
            "fleet_cpu_s": round((fleet_b - fleet_a) / tick, 2),
            "loadgen_cpu_s": round((self_b - self_a) / tick, 2),
            "foreign_cpu_share": round(max(0.0, busy - ours) / (wall * tick * n_cpu), 3),
            "records": records, "fleet": logs,
        })
        rec.update(summarize(ctx, records, logs))
    except Exception as e:  # one broken run must not lose the others
        rec.update({"status": "failed", "error": str(e)[:800]})
    finally:
        router.stop()
        if fleet_proc is not None:
            proc.stop_tree(fleet_proc)
    return rec


def summarize(ctx, records, logs):
    """The figures of one run, from the client's records joined with the fleet's log."""
    wl = ctx.workload
    by_rid = {}
    for lg in logs:
        for r in lg["records"]:
            if r["rid"] and r["rid"] != "preflight":
                by_rid[r["rid"]] = r
    window = [r for r in records if r["sent"] >= wl.warmup]
    ok = [r for r in window if r["error"] is None]
    lat = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok]
    served = [by_rid[r["rid"]] for r in ok if r["rid"] in by_rid]
    prompt = sum(s["prompt_tokens"] for s in served)
    cached = sum(s["cached_tokens"] for s in served)
    follow = [(r, by_rid.get(r["rid"])) for r in ok if r["kind"] == "turn" and r["turn"] > 0]
    hits = sum(1 for r, s in follow if s is not None and s["cached_tokens"] >= r["reusable_tokens"])
    n_rep = len(logs)
    share = [0] * n_rep
    for s in served:
        share[s["replica"]] += 1
    queue = [[s["queue_s"] for s in served if s["replica"] == i and s["queue_s"] is not None] for i in range(n_rep)]
    tt_turn = [r["ttft_s"] for r in ok if r["kind"] == "turn" and r["turn"] > 0]
    span = wl.duration - wl.warmup
    ms = lambda v: None if v is None else round(1000 * v, 1)  # noqa: E731
    return {
        "requests": len(window), "ok": len(ok), "errors": len(window) - len(ok),
        "error_samples": sorted({r["error"] for r in window if r["error"]})[:5],
        "all_requests": len(records), "all_errors": sum(1 for r in records if r["error"]),
        "rps": round(len(ok) / span, 2),
        "lat_p50_ms": ms(loadgen.pct(lat, 50)), "lat_p90_ms": ms(loadgen.pct(lat, 90)),
        "lat_p99_ms": ms(loadgen.pct(lat, 99)),
        "ttft_p50_ms": ms(loadgen.pct(ttft, 50)), "ttft_p90_ms": ms(loadgen.pct(ttft, 90)),
        "ttft_p99_ms": ms(loadgen.pct(ttft, 99)),
        "followup_ttft_p50_ms": ms(loadgen.pct(tt_turn, 50)), "followup_ttft_p99_ms": ms(loadgen.pct(tt_turn, 99)),
        "token_hit_rate": round(cached / prompt, 4) if prompt else None,
        "followup_hit_rate": round(hits / len(follow), 4) if follow else None, "followups": len(follow),
        "replica_share": [round(x / len(served), 3) if served else None for x in share],
        "replica_queue_p99_ms": [ms(loadgen.pct(q, 99)) for q in queue],
        "unmatched": len(ok) - len(served),
    }


# -- report -----------------------------------------------------------------------------

def med(xs):
    xs = [x for x in xs if x is not None]
    return None if not xs else round(statistics.median(xs), 4)


def aggregate(runs, names):
    """Per router: the median of each figure over its repeats."""
    out = []
    keys = ("rps", "lat_p50_ms", "lat_p99_ms", "ttft_p50_ms", "ttft_p99_ms", "followup_ttft_p50_ms",
            "followup_ttft_p99_ms", "token_hit_rate", "followup_hit_rate", "errors", "router_cpu_s",
            "foreign_cpu_share")
    for n in names:
        rs = [r for r in runs if r["router"] == n and r["status"] == "ok"]
        row = {"router": n, "runs": len(rs), "failed": sum(1 for r in runs if r["router"] == n and r["status"] != "ok")}
        for k in keys:
            row[k] = med([r.get(k) for r in rs])
        if rs:
            row["replica_share"] = [med([r["replica_share"][i] for r in rs]) for i in range(len(rs[0]["replica_share"]))]
        out.append(row)
    return out


def render(meta, runs, agg):
    L = []
    w = L.append
    a = meta["args"]
    w("# Routing benchmark, %s%s\n" % (meta["date"], " (quick: not a result)" if a["quick"] else ""))
    w("Command: `%s`  \nRun id %s, %s to %s. Logs: `%s`.\n" % (meta["command"], meta["run_id"], meta["started"],
                                                               meta["finished"], meta["run_dir"]))
    w("## Setup\n")
    speeds = meta["speeds"]
    w("- Fleet: %d simulated vLLM replicas (`bench/routing/fleet.py`, one process pinned to CPU %s), speeds %s "
      "(a factor > 1 is that many times slower in prefill and decode). Each: %d decode slots, FIFO queue without "
      "bound, %.0f ms per output token with one request running (+%.0f %% per extra running request), prefill %.2f "
      "ms per uncached prompt token, prefix cache of %d tokens (LRU of 16-token blocks, chained hashes), "
      "`vllm:kv_cache_usage_perc` = running requests' tokens / %d."
      % (len(speeds), a["load_cpus"], speeds, a["slots"], 1000 * a["tpot"], 100 * 0.05, 1000 * a["prefill_per_token"],
         a["cache_tokens"], a.get("kv_tokens", 0)))
    wl = meta["workload"]
    w("- Workload (`bench/routing/loadgen.py`, seed %s, the same for every router): sessions arrive as a Poisson "
      "process at %.2f/s, each %d-%d turns with think time exp(mean %.1f s); %d apps, each with a ~%d-token system "
      "prompt; user messages %d-%d tokens; answers %d-%d tokens, streamed; one-shot requests (system prompt + "
      "%d-%d tokens) at %.2f/s. %d sessions and %d one-shots are scheduled over %.0f s; figures count the requests "
      "sent after %.0f s. Session ids sent: %s."
      % (wl["seed"], wl["session_rate"], wl["turns_min"], wl["turns_max"], wl["think_s"], wl["apps"],
         wl["system_tokens"], wl["user_min"], wl["user_max"], wl["out_min"], wl["out_max"], wl["oneshot_min"],
         wl["oneshot_max"], wl["oneshot_rate"], wl["sessions"], wl["oneshots"], wl["duration"], wl["warmup"],
         {"none": "none (routers see only the text)", "user": "the body's `user` field",
          "header": "`X-Session-Id` header"}[wl["session_id"]]))
    w("- Routers pinned to CPU %s; fleet and load generator to CPU %s. %d repeat(s); the router order rotates "
      "between repeats; each run starts a fresh fleet (cold caches) and a fresh router."
      % (a["router_cpus"], a["load_cpus"], a["repeats"]))
    w("- Machine: %s, %s CPUs; background busy share before the runs: %s.\n" % (
        meta["machine"]["cpu_model"], meta["machine"]["cpus"], meta["background"]))
    w("## Results (median of the repeats)\n")
    w("| router | ok req/s | p50 latency ms | p99 latency ms | p50 TTFT ms | p99 TTFT ms | follow-up p99 TTFT ms | "
      "prefix tokens cached | follow-ups fully cached | request share per replica (slow: %s) | errors | router CPU s |"
      % ", ".join(str(i) for i, s in enumerate(speeds) if s != 1.0))
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    f = lambda v, fmt="%.0f": "-" if v is None else fmt % v  # noqa: E731
    for r in agg:
        if not r["runs"]:
            w("| %s | failed | | | | | | | | | | |" % r["router"])
            continue
        w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["router"], f(r["rps"], "%.2f"), f(r["lat_p50_ms"]), f(r["lat_p99_ms"]), f(r["ttft_p50_ms"]),
            f(r["ttft_p99_ms"]), f(r["followup_ttft_p99_ms"]), f(r["token_hit_rate"] and 100 * r["token_hit_rate"],
                                                               "%.1f %%"),
            f(r["followup_hit_rate"] and 100 * r["followup_hit_rate"], "%.1f %%"),
            " / ".join(f(x and 100 * x, "%.0f") for x in r["replica_share"]) + " %", f(r["errors"]),
            f(r["router_cpu_s"], "%.1f")))
    w("\n## Every run\n")
    w("| router | repeat | ok | errors | p50 / p99 latency ms | p50 / p99 TTFT ms | prefix tokens cached | "
      "follow-ups fully cached | share per replica | queue p99 per replica ms | router / fleet / loadgen CPU s | "
      "foreign CPU |")
    w("| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | --- | --- | --- | ---: |")
    for r in runs:
        if r["status"] != "ok":
            w("| %s | %d | FAILED: %s | | | | | | | | | |" % (r["router"], r["repeat"], r["error"].replace("|", "/")[:200]))
            continue
        w("| %s | %d | %d | %d | %s / %s | %s / %s | %.1f %% | %.1f %% | %s | %s | %.1f / %.1f / %.1f | %.0f %% |" % (
            r["router"], r["repeat"], r["ok"], r["errors"], f(r["lat_p50_ms"]), f(r["lat_p99_ms"]),
            f(r["ttft_p50_ms"]), f(r["ttft_p99_ms"]), 100 * (r["token_hit_rate"] or 0),
            100 * (r["followup_hit_rate"] or 0), " / ".join("%.0f" % (100 * (x or 0)) for x in r["replica_share"]),
            " / ".join(f(x) for x in r["replica_queue_p99_ms"]), r["router_cpu_s"], r["fleet_cpu_s"],
            r["loadgen_cpu_s"], 100 * r["foreign_cpu_share"]))
    errs = [(r["router"], r["repeat"], r["error_samples"]) for r in runs if r["status"] == "ok" and r["error_samples"]]
    if errs:
        w("\nErrors seen: " + "; ".join("%s #%d: %s" % e for e in errs))
    w("\nColumns: latency is the whole stream (send to `[DONE]`), TTFT the time to the first content token, both "
      "at the client, over the requests sent after the warm-up that succeeded. *prefix tokens cached*: prompt tokens "
      "the serving replica's prefix cache held, over all prompt tokens (vLLM's `prefix_cache_hits / "
      "prefix_cache_queries`). *follow-ups fully cached*: turns 2+ of a session whose replica still held the whole "
      "previous prompt and answer. *foreign CPU*: share of all CPUs used by processes other than router, fleet and "
      "load generator during the run (other engineers' work on this shared machine).\n")
    return "\n".join(L) + "\n"


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu_model": model, "cpus": os.cpu_count()}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/routing/run.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routers", type=csv, default=ROUTERS, help="comma list (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--duration", type=float, default=45.0, help="seconds of arrivals per run (default 45)")
    p.add_argument("--warmup", type=float, default=8.0, help="requests sent before this are not counted (default 8)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 15 s, 3 s warm-up")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--session-rate", type=float, default=2.0, help="new sessions per second")
    p.add_argument("--oneshot-rate", type=float, default=2.0, help="one-shot requests per second")
    p.add_argument("--think", type=float, default=1.0, help="mean think time between turns, s")
    p.add_argument("--system-tokens", type=int, default=1500)
    p.add_argument("--apps", type=int, default=4, help="distinct system prompts")
    p.add_argument("--session-id", choices=("none", "user", "header"), default="none",
                   help="how sessions name themselves: not at all (default), body `user`, X-Session-Id header")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--slow", action="append", default=None, metavar="I:F", help="replica I is F times slower "
                   "(default 3:3)")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--tpot", type=float, default=0.020)
    p.add_argument("--prefill-per-token", type=float, default=0.00015)
    p.add_argument("--cache-tokens", type=int, default=12000)
    p.add_argument("--kv-tokens", type=int, default=48000, help="KV pool per replica (kv_cache_usage_perc)")
    p.add_argument("--metrics-interval", type=float, default=0.5, help="gomodel REPLICA_METRICS_INTERVAL")
    p.add_argument("--gomodel-env", action="append", default=[], metavar="K=V",
                   help="extra environment for gomodel (repeatable), e.g. ROUTING_AFFINITY_MAX_RATIO=1.2")
    p.add_argument("--gomodel-python", default=os.environ.get("GOMODEL_PYTHON") or "/tmp/bench-venv/bin/python")
    p.add_argument("--vllm-router-venv", default="/tmp/vllm-router-venv")
    p.add_argument("--vllm-router-args", default="", help="extra vllm-router arguments")
    p.add_argument("--litellm-venv", default="/tmp/litellm-venv")
    p.add_argument("--router-cpus", default="0")
    p.add_argument("--load-cpus", default="1")
    p.add_argument("--settle", type=float, default=2.0, help="seconds between pre-flight and load")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--no-install", action="store_true")
    p.add_argument("--results-dir", default=os.path.join(BENCH_DIR, "results"))
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    a.slow = a.slow or ["3:3"]
    if a.quick:
        a.repeats, a.duration, a.warmup = 1, 15.0, 3.0
    a.gomodel_env = dict(kv.split("=", 1) for kv in a.gomodel_env)
    return a


def main(argv):
    a = parse_args(argv)
    ctx = argparse.Namespace(args=a)
    os.sched_setaffinity(0, set(proc.parse_cpus(a.load_cpus)))
    now = datetime.datetime.now()
    ctx.run_id = now.strftime("%Y%m%dT%H%M%S")
    ctx.run_dir = tempfile.mkdtemp(prefix="bench-routing-%s-" % ctx.run_id, dir="/tmp")
    ctx.api_key = "sk-bench-" + secrets.token_hex(16)
    ctx.workload = loadgen.Workload(seed=a.seed, duration=a.duration, warmup=a.warmup, session_rate=a.session_rate,
                                    oneshot_rate=a.oneshot_rate, apps=a.apps, system_tokens=a.system_tokens,
                                    think_s=a.think, session_id=a.session_id)
    tag = "-".join(["routing"] + ([a.tag] if a.tag else []) + (["quick"] if a.quick else []))
    base = os.path.join(a.results_dir, now.strftime("%Y-%m-%d") + "-" + tag)
    log("run %s; logs in %s; workload %s" % (ctx.run_id, ctx.run_dir, ctx.workload.describe()))
    routers = []
    versions = {}
    for n in a.routers:
        r = make_router(ctx, n)
        if hasattr(r, "install"):
            r.install()
        versions[n] = r.unavailable and ("unavailable: " + r.unavailable) or r.version()
        log("%s: %s" % (n, versions[n]))
        routers.append(r)
    cs0 = proc.cpu_stat()
    time.sleep(2)
    cs1 = proc.cpu_stat()
    bg = {c: round(proc.busy([y - x for x, y in zip(cs0[c], cs1[c])]) / (2 * proc.CLK_TCK), 2) for c in cs0}
    speeds = [1.0] * a.replicas
    for s in a.slow:
        i, _, f = s.partition(":")
        if int(i) < a.replicas:
            speeds[int(i)] = float(f)
    meta = {"type": "meta", "run_id": ctx.run_id, "date": now.strftime("%Y-%m-%d"),
            "started": now.strftime("%Y-%m-%d %H:%M:%S"),
            "command": "bash bench/routing/run.sh " + " ".join(shlex.quote(x) for x in argv),
            "args": {k: v for k, v in vars(a).items()}, "workload": ctx.workload.describe(), "speeds": speeds,
            "versions": versions, "machine": machine(), "background": bg, "run_dir": ctx.run_dir}
    runs = []
    try:
        for rep in range(1, a.repeats + 1):
            k = (rep - 1) % len(routers)
            for r in routers[k:] + routers[:k]:
                if r.unavailable:
                    if rep == 1:
                        runs.append({"type": "run", "router": r.name, "repeat": rep, "status": "skipped",
                                     "error": r.unavailable})
                    continue
                log("%s, repeat %d" % (r.name, rep))
                rec = measure(ctx, r, rep)
                runs.append(rec)
                if rec["status"] != "ok":
                    log("%s FAILED: %s" % (r.name, rec["error"]))
                    continue
                log("%s: %d ok, %d errors, %.2f req/s, latency p50/p99 %s/%s ms, TTFT p50/p99 %s/%s ms, prefix "
                    "tokens cached %.1f %%, follow-ups cached %.1f %%, share %s, router CPU %.1f s, foreign %.0f %%"
                    % (r.name, rec["ok"], rec["errors"], rec["rps"], rec["lat_p50_ms"], rec["lat_p99_ms"],
                       rec["ttft_p50_ms"], rec["ttft_p99_ms"], 100 * (rec["token_hit_rate"] or 0),
                       100 * (rec["followup_hit_rate"] or 0), rec["replica_share"], rec["router_cpu_s"],
                       100 * rec["foreign_cpu_share"]))
    except KeyboardInterrupt:
        log("interrupted; writing what was measured")
    meta["finished"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    agg = aggregate(runs, [r.name for r in routers])
    os.makedirs(a.results_dir, exist_ok=True)
    with open(base + ".jsonl", "w") as f:
        f.write(json.dumps(meta, sort_keys=True) + "\n")
        for r in runs:
            slim = {k: v for k, v in r.items() if k not in ("records", "fleet")}
            f.write(json.dumps(slim, sort_keys=True) + "\n")
        for row in agg:
            f.write(json.dumps(dict(row, type="summary"), sort_keys=True) + "\n")
    with open(os.path.join(ctx.run_dir, "raw.jsonl"), "w") as f:  # every request, client and fleet side
        for r in runs:
            f.write(json.dumps(r) + "\n")
    with open(base + ".md", "w") as f:
        f.write(render(meta, [r for r in runs if r["status"] != "skipped"] , agg))
    log("wrote %s.md and %s.jsonl (raw requests in %s/raw.jsonl)" % (base, base, ctx.run_dir))
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
