#!/usr/bin/env python3
"""gomodel overhead benchmark: what a gateway adds between client and model.

Runs a vLLM-shaped mock upstream, then for every target (direct, gomodel,
vllm-router, litellm, portkey; gomodel-pool and gomodel-features when asked
for), workload and concurrency a fixed measurement window after a warm-up,
and writes bench/results/<date>[-tag].md and .jsonl.
`--variant features` is the matrix of everything on against bare and peers;
`--soak S` replaces the matrix with a memory soak; `--scaling N` with the
workers scaling measurement (gomodel chat req/s with 1 worker on 1 core
against N workers on N cores); `--protocol gomodel` with GoModel's own
benchmark method (everything on all CPUs together, fixed-count latency of six
variants, capacity sweep, cold start, peak RSS).
See bench/README.md. Usually started as `bash bench/run.sh [options]`.
"""

import argparse
import datetime
import json
import os
import platform
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import proc, protocol, protocol_report, report  # noqa: E402
from harness.targets import BENCH_DIR, POOL_TARGETS, TARGETS, wait_workers  # noqa: E402
from harness.workloads import WORKLOADS, measure, preflight, wrk_threads  # noqa: E402

ALL_TARGETS = ["direct", "gomodel", "vllm-router", "litellm", "portkey"]
# run order; gomodel-pool and gomodel-features (gomodel in front of --pool-replicas
# mocks) run only when asked for
TARGET_ORDER = ["direct", "gomodel", "gomodel-pool", "gomodel-features", "vllm-router", "litellm", "portkey"]
# the matrix's default workloads (messages and messages_stream when asked for)
ALL_WORKLOADS = ["chat", "stream", "stream_paced", "embeddings", "responses", "responses_stream"]
# --variant features: everything on against bare, vllm-router and Portkey
FEATURES_VARIANT = {"targets": ["direct", "gomodel", "gomodel-key", "gomodel-features", "vllm-router", "portkey"],
                    "workloads": ["chat", "stream"], "concurrency": [1, 64]}


def csv(s):
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/run.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", type=csv, default=None,
                   help="comma list (default: %s; known: %s)" % (",".join(ALL_TARGETS), ", ".join(TARGETS)))
    p.add_argument("--workloads", type=csv, default=None,
                   help="comma list (default: %s; also messages, messages_stream)" % ",".join(ALL_WORKLOADS))
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in csv(s)], default=None,
                   help="comma list (default: 1,8,64)")
    p.add_argument("--variant", choices=("features",), default=None,
                   help="features: everything on (gomodel-features) against bare gomodel, vllm-router and Portkey: "
                        "targets %s, workloads %s, concurrency %s unless given; report tag 'features'" % (
                            ",".join(FEATURES_VARIANT["targets"]), ",".join(FEATURES_VARIANT["workloads"]),
                            ",".join(str(c) for c in FEATURES_VARIANT["concurrency"])))
    p.add_argument("--duration", type=int, default=None, help="measurement window, s (default 10; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up before each window, s (default 3; quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="runs per cell (default 1); rounds of the scaling run (default 3)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole list of targets this many times in turn (every other round in the reverse "
                        "order), each a fresh start, and show for each cell the median of all its runs (A/B in turn "
                        "on a host whose speed drifts; default 1)")
    p.add_argument("--side-by-side", action="store_true",
                   help="run the two --targets at once, both on --gateway-cpus, each cell's load on both at the same "
                        "time (the first started swaps every round): they share the host's drift, so each round's "
                        "ratio of their CPU per request is steady on a noisy host; each gets about half the CPU, "
                        "so their req/s are not the solo figures. Use with --rounds")
    p.add_argument("--max-retries", type=int, default=None,
                   help="extra runs of a cell (or scaling measurement) while every run so far was noisy "
                        "(default 2; quick 0)")
    p.add_argument("--noise-threshold", type=float, default=0.10,
                   help="share of a core used by other processes that makes a run noisy (default 0.10)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 s warm-up, 2 s windows, no retries (with --protocol: the quick values of "
                        "--protocol-*); report tag 'quick'")
    p.add_argument("--soak", type=int, default=0, metavar="SECONDS",
                   help="instead of the matrix: chat at --soak-concurrency for SECONDS per gateway, RSS sampled")
    p.add_argument("--soak-concurrency", type=int, default=64)
    p.add_argument("--soak-sample", type=float, default=5.0, help="RSS sample period in the soak, s")
    p.add_argument("--scaling", type=int, default=0, metavar="N",
                   help="instead of the matrix: gomodel chat at --scaling-concurrency, alternating 1 worker "
                        "(--gateway-cpus / --load-cpus) and N workers (--scaling-gateway-cpus / --scaling-load-cpus), "
                        "--repeats rounds (default 10, with 1 s warm-up and 3 s windows unless given); "
                        "a fresh gateway per measurement")
    p.add_argument("--scaling-concurrency", type=int, default=64, help="connections in the scaling run (default 64)")
    p.add_argument("--scaling-gateway-cpus", default=None,
                   help="CPUs of the N-worker gateway (default 0-(N-1))")
    p.add_argument("--scaling-load-cpus", default=None,
                   help="CPUs of mock, load generator and harness in the N-worker case (default: the same as "
                        "--scaling-gateway-cpus; on a machine with only N CPUs there is no other core)")
    p.add_argument("--scaling-load-priority", choices=("idle", "normal"), default="idle",
                   help="scheduling of mock and load generator in the scaling run (default idle: SCHED_IDLE, "
                        "they run on what CPU time the gateway leaves, as if they were on other machines; "
                        "normal: they compete with the workers for the shared cores)")
    p.add_argument("--protocol", choices=("gomodel",), default=None,
                   help="instead of the matrix: GoModel's published benchmark method (see bench/README.md): "
                        "everything on --protocol-cpus together, gomodel with one worker per CPU; six variants "
                        "(chat, responses, messages; plain and streamed) at --protocol-concurrency for --protocol-n "
                        "requests in --protocol-trials randomised trials, the chat sweep, cold start and peak RSS; "
                        "report <date>-protocol[-tag].md")
    p.add_argument("--protocol-cpus", default=None, help="CPUs everything shares in the protocol run (default: all)")
    p.add_argument("--protocol-workers", type=int, default=None,
                   help="gomodel --workers in the protocol run (default: one per protocol CPU)")
    for key, kind, text in (
            ("n", int, "requests per variant and trial (default %d; quick %d)"),
            ("concurrency", int, "concurrency of the latency pass and the resource window (default %d)"),
            ("trials", int, "latency trials, targets in a random order each (default %d; quick %d)"),
            ("warmup", int, "chat requests after each start (default %d; quick %d)"),
            ("variant-warmup", int, "requests before each variant (default %d; quick %d)"),
            ("max-wall", float, "seconds after which a variant stops short of its requests (default %d)"),
            ("sweep", None, "chat concurrencies of the capacity sweep (default %s)"),
            ("sweep-s", float, "seconds per sweep point (default %d; quick %d)"),
            ("resource-s", float, "seconds of chat at --protocol-concurrency for CPU and peak RSS (default %d; quick %d)"),
            ("cold-starts", int, "cold starts per gateway, median reported (default %d; quick %d)"),
            ("rest-s", float, "pause between targets, s (default %d; quick %s)")):
        name = key.replace("-", "_").replace("max_wall", "max_wall_s")
        dflt = protocol.DEFAULTS[name]
        vals = (",".join(str(c) for c in dflt) if isinstance(dflt, list) else dflt,)
        if "quick" in text:
            vals += (protocol.QUICK[name],)
        p.add_argument("--protocol-" + key, dest="protocol_" + name,
                       type=kind or (lambda s: [int(x) for x in csv(s)]), default=None, help=text % vals)
    p.add_argument("--seed", type=int, default=None, help="seed of the protocol run's random orders (default: the time)")
    p.add_argument("--gateway-cpus", default="0", help="CPUs for the gateway under test (taskset list)")
    p.add_argument("--load-cpus", default="1", help="CPUs for mock, load generator and harness")
    p.add_argument("--pool-replicas", type=int, default=4,
                   help="mocks behind the gomodel-pool target: one provider with that many replicas (default 4)")
    p.add_argument("--gomodel-workers", type=int, default=1,
                   help="gomodel processes (passes --workers N; give --gateway-cpus N CPUs)")
    p.add_argument("--gomodel-cmd", default=None,
                   help="gomodel command template; {gomodel} {twistd} {python} {port} {workers} {mock} are filled in "
                        "(env GOMODEL_CMD; default: %s)" % TARGETS["gomodel"].DEFAULT_CMD.replace("%", "%%"))
    p.add_argument("--gomodel-python", default=None, help="Python env with gomodel (env GOMODEL_PYTHON; "
                                                          "default: the one running the bench)")
    p.add_argument("--reinstall-gomodel", action="store_true", help="pip install -e the repo again")
    p.add_argument("--litellm-venv", default="/tmp/bench-litellm-venv")
    p.add_argument("--litellm-spec", default=os.environ.get("LITELLM_SPEC", "litellm[proxy]"),
                   help="pip requirement for LiteLLM (env LITELLM_SPEC)")
    p.add_argument("--litellm-provider", default="openai", choices=["openai", "hosted_vllm"],
                   help="LiteLLM provider prefix for the mock (default openai: native /v1/responses)")
    p.add_argument("--litellm-args", default="", help="extra arguments for the litellm CLI, e.g. '--run_granian'")
    p.add_argument("--litellm-workers", type=int, default=None,
                   help="LiteLLM --num_workers (default 1; in the protocol run one per protocol CPU, as GoModel ran it)")
    p.add_argument("--vllm-router-venv", default="/tmp/vllm-router-venv")
    p.add_argument("--vllm-router-policy", default="round_robin", help="vllm-router --policy (default round_robin)")
    p.add_argument("--vllm-router-args", default="", help="extra vllm-router arguments")
    p.add_argument("--portkey-dir", default="/tmp/bench-portkey")
    p.add_argument("--portkey-version", default=os.environ.get("PORTKEY_VERSION", "1.15.2"))
    p.add_argument("--hono-node-server", default="1.13.8",
                   help="@hono/node-server pinned under Portkey (>=1.14 breaks its streams)")
    p.add_argument("--no-auth", action="store_true", help="run gateways without a master key")
    p.add_argument("--no-install", action="store_true", help="install nothing; skip what is missing")
    p.add_argument("--results-dir", default=os.path.join(BENCH_DIR, "results"))
    p.add_argument("--tag", default="", help="suffix of the report name: <date>-<tag>.md")
    a = p.parse_args(argv)
    preset = FEATURES_VARIANT if a.variant == "features" else {}
    a.targets = a.targets or preset.get("targets") or ALL_TARGETS
    a.workloads = a.workloads or preset.get("workloads") or ALL_WORKLOADS
    a.concurrency = a.concurrency or preset.get("concurrency") or [1, 8, 64]
    if a.protocol and (a.soak or a.scaling or a.variant):
        p.error("--protocol is a run of its own; drop --soak, --scaling and --variant")
    for t in a.targets:
        if t not in TARGETS:
            p.error("unknown target %r (known: %s)" % (t, ", ".join(TARGETS)))
    for wl in a.workloads:
        if wl not in WORKLOADS:
            p.error("unknown workload %r (known: %s)" % (wl, ", ".join(WORKLOADS)))
    if a.side_by_side:
        if a.protocol or a.soak or a.scaling:
            p.error("--side-by-side measures cells; drop --protocol, --soak and --scaling")
        if len(set(a.targets)) != 2 or "direct" in a.targets:
            p.error("--side-by-side takes two gateway targets (e.g. --targets gomodel,gomodel-key)")
    if a.scaling:
        if a.variant:
            p.error("--scaling measures gomodel alone; drop --variant")
        if a.soak:
            p.error("--scaling and --soak are separate runs; give one of them")
        if a.scaling < 2:
            p.error("--scaling N needs N >= 2 (the N-worker side)")
        if a.scaling_concurrency < 1:
            p.error("--scaling-concurrency must be at least 1")
        # the scaling run measures gomodel chat only
        a.targets, a.workloads, a.concurrency = ["gomodel"], ["chat"], [a.scaling_concurrency]
        a.scaling_gateway_cpus = a.scaling_gateway_cpus or ("0-%d" % (a.scaling - 1))
        a.scaling_load_cpus = a.scaling_load_cpus or a.scaling_gateway_cpus
    # scaling: many short rounds, so that the two measurements of a round are seconds
    # apart and a machine whose speed drifts moves both alike
    a.duration = a.duration if a.duration is not None else (2 if a.quick else 3 if a.scaling else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick or a.scaling else 3)
    a.repeats = a.repeats if a.repeats is not None else (10 if a.scaling else 1)
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    a.max_retries = a.max_retries if a.max_retries is not None else (0 if a.quick else 2)
    if a.duration < 1:
        p.error("--duration must be at least 1 s")
    # direct first: every gateway cell is compared with it
    a.targets = sorted(dict.fromkeys(a.targets), key=lambda t: TARGET_ORDER.index(t) if t in TARGET_ORDER else 99)
    return a


class Ctx:
    load_idle = False  # mock and load generator at SCHED_IDLE (the scaling run's default)


def log(msg):
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def sh(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return "?"


def ensure_tools(args):
    missing = [t for t in ("wrk", "taskset", "node") if shutil.which(t) is None]
    if "wrk" in missing and not args.no_install:
        log("installing wrk (apt)")
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False)
    needed = ("wrk", "taskset", "node") + (("chrt",) if args.scaling and args.scaling_load_priority == "idle" else ())
    missing = [t for t in needed if shutil.which(t) is None]
    if missing:
        sys.exit("missing tools: %s (wrk: apt-get install wrk; taskset, chrt: util-linux; node: Node.js 18+)"
                 % ", ".join(missing))


def machine():
    model = "?"
    hyper = False
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and " hypervisor" in line:
                hyper = True
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) / 2 ** 20
    osname = "?"
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    osname = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    wrk = sh(["wrk", "-v"]).splitlines()
    return {"cpu_model": model, "cpus": os.cpu_count(), "hypervisor": hyper, "mem_gib": round(mem, 1),
            "kernel": platform.release(), "os": osname, "python": "%s (%s)" % (
                platform.python_version(), os.path.realpath(getattr(sys, "_base_executable", sys.executable))),
            "node": sh(["node", "--version"]), "wrk": (wrk[0].split()[1] if wrk and len(wrk[0].split()) > 1 else "?")}


def background(ctx, seconds=2.0):
    """Per-core busy share while nothing of ours is working: the machine's background load."""
    a = proc.cpu_stat()
    time.sleep(seconds)
    b = proc.cpu_stat()
    tick = seconds * proc.CLK_TCK

    def share(cpus, idx=None):
        tot = 0
        for c in cpus:
            d = [y - x for x, y in zip(a.get(c, [0] * 8), b.get(c, [0] * 8))]
            tot += d[idx] if idx is not None else proc.busy(d)
        return round(min(1.0, tot / (tick * len(cpus))), 3)
    return {"seconds": seconds, "gw_core_busy": share(ctx.gateway_cpu_list), "load_core_busy": share(ctx.load_cpu_list),
            "steal": share(ctx.gateway_cpu_list + ctx.load_cpu_list, 7)}


def start_mock(ctx):
    path = os.path.join(BENCH_DIR, "mock", "mock.mjs")
    logf = open(os.path.join(ctx.run_dir, "mock.log"), "w")
    p = subprocess.Popen(proc.load_cmd(ctx, ["node", path, "--port", "0"]), stdout=subprocess.PIPE,
                         stderr=logf, text=True, start_new_session=True)
    line = p.stdout.readline()
    if not line.startswith("LISTENING "):
        proc.stop_tree(p)
        sys.exit("mock did not start: %r (see %s)" % (line, logf.name))
    ctx.mock_proc = p
    ctx.mock_pid = p.pid
    ctx.mock_port = int(line.split()[1])
    ctx.mock_url = "http://127.0.0.1:%d" % ctx.mock_port
    ctx.mock_procs, ctx.mock_pids, ctx.mock_urls = [p], [p.pid], [ctx.mock_url]
    # gomodel-pool, gomodel-features: more mocks, the replicas of their one provider (the first is the one above)
    if any(t in POOL_TARGETS for t in ctx.args.targets) and not ctx.args.scaling:
        for _ in range(ctx.args.pool_replicas - 1):
            q = subprocess.Popen(proc.load_cmd(ctx, ["node", path, "--port", "0"]), stdout=subprocess.PIPE,
                                 stderr=logf, text=True, start_new_session=True)
            ctx.mock_procs.append(q)
            ready = q.stdout.readline()
            if not ready.startswith("LISTENING "):
                for m in ctx.mock_procs:
                    proc.stop_tree(m)
                sys.exit("mock did not start: %r (see %s)" % (ready, logf.name))
            ctx.mock_pids.append(q.pid)
            ctx.mock_urls.append("http://127.0.0.1:%d" % int(ready.split()[1]))


def run_cell(ctx, target, wl, conc):
    a = ctx.args
    runs = []
    for i in range(a.repeats + a.max_retries):
        if i >= a.repeats and any(not r["noisy"] for r in runs):
            break
        r = measure(ctx, target, wl, conc, a.warmup, a.duration)
        r.update({"type": "cell", "run_id": ctx.run_id, "target": target.name, "workload": wl.name,
                  "concurrency": conc, "run": i + 1, "status": "ok", "chosen": False})
        nz = r["noise"]
        f = lambda v, fmt: "-" if v is None else fmt % v  # noqa: E731
        log("%-8s %-16s c=%-3d %8.1f req/s  p50 %s ms  p99 %s ms%s  err %d  gwCPU %s s/1k  %s Minstr/req  "
            "RSS %s MiB  noise %.0f/%.0f%%%s%s" % (
                target.name, wl.name, conc, r["rps"] or 0, f(r["lat_p50_ms"], "%7.2f"), f(r["lat_p99_ms"], "%7.2f"),
                ("  ttft %s ms" % f(r["ttft_p50_ms"], "%.2f")) if wl.runner == "stream" else "",
                r["errors"], f(r["gw_cpu_s_per_1k"], "%.3f"), f(r["gw_minstr_per_req"], "%.3f"),
                f(r["gw_peak_rss_mib"], "%.0f"),
                100 * nz["gw_core_foreign"], 100 * nz["load_core_foreign"], " NOISY" if r["noisy"] else "",
                " LOAD-BOUND" if r["load_bound"] and target.root_pid else ""))
        runs.append(r)
    report.pick(runs)["chosen"] = True
    return runs


def run_side_by_side(ctx, pair, rnd, cells):
    """One round of --side-by-side: start both targets of C{pair} (in that order), then load each cell
    on both at once (a thread per target, each running L{measure}); their cells go to C{cells} with
    C{round} set and C{side_by_side} true. Both gateways share the gateway CPUs, so each counts the
    other as foreign load: such a cell is noisy only when the host's steal passes the threshold."""
    a = ctx.args
    started = []
    try:
        for t in pair:
            if t.unavailable:
                raise RuntimeError("%s: %s" % (t.name, t.unavailable))
            log("starting %s" % t.name)
            t.start()
            started.append(t)
        for wln in a.workloads:
            wl = WORKLOADS[wln]
            errs = [(t.name, preflight(ctx, t, wl)) for t in pair]
            if any(err for _, err in errs):
                for name, err in errs:
                    if err:
                        log("%s %s pre-flight failed: %s" % (name, wln, err))
                        cells.append({"type": "cell", "run_id": ctx.run_id, "target": name, "workload": wln,
                                      "status": "failed", "error": "pre-flight: " + err, "round": rnd})
                continue
            for c in a.concurrency:
                got = [None, None]

                def one(i, wl=wl, c=c):
                    try:
                        got[i] = measure(ctx, pair[i], wl, c, a.warmup, a.duration)
                    except Exception as e:  # reported below, with the other side's cell
                        got[i] = e
                threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                for t, r in zip(pair, got):
                    if isinstance(r, Exception):
                        log("%s %s c=%d failed: %s" % (t.name, wln, c, r))
                        cells.append({"type": "cell", "run_id": ctx.run_id, "target": t.name, "workload": wln,
                                      "concurrency": c, "status": "failed", "error": str(r)[:500], "round": rnd})
                        continue
                    r["noisy"] = r["noise"]["steal"] > a.noise_threshold
                    # the mock served both: its counts are not this target's
                    r["upstream"], r["upstream_per_request"], r["upstream_extra"] = None, None, 0
                    r.update({"type": "cell", "run_id": ctx.run_id, "target": t.name, "workload": wln,
                              "concurrency": c, "run": 1, "status": "ok", "chosen": False, "round": rnd,
                              "side_by_side": True})
                    log("%-16s %-8s c=%-3d %8.1f req/s  p50 %.2f ms  gwCPU %s s/1k  (side by side)" % (
                        t.name, wln, c, r["rps"] or 0, r["lat_p50_ms"] or 0, r["gw_cpu_s_per_1k"]))
                    cells.append(r)
    except RuntimeError as e:
        log("side by side, round %d: %s" % (rnd, e))
        cells.append({"type": "cell", "run_id": ctx.run_id, "target": "+".join(t.name for t in pair),
                      "status": "failed", "error": str(e), "round": rnd})
    finally:
        for t in started:
            t.stop()


def run_soak(ctx, target):
    """Chat at high concurrency for --soak seconds; RSS sampled every --soak-sample s."""
    from harness.workloads import run_wrk, WORKLOADS as W
    a = ctx.args
    wl = W["chat"]
    err = preflight(ctx, target, wl)
    if err:
        return {"type": "soak", "target": target.name, "status": "failed", "error": err}
    sampler = proc.RssSampler(target.root_pid, interval=a.soak_sample, keep_series=True) if target.root_pid else None
    if sampler:
        sampler.start()
    # user-space instructions over the whole soak (after the warm-up)
    instr = (proc.InstrCounter(proc.descendants(target.root_pid), ctx.load_cpus, ctx.run_dir)
             if target.root_pid else None)
    t0 = time.monotonic()
    try:
        if instr:
            instr.start()
        res = run_wrk(ctx, target, wl, a.soak_concurrency, a.warmup, a.soak,
                      lambda _: instr and instr.enable(), lambda _: instr and instr.disable())
    finally:
        instructions = instr.stop() if instr else None
        if sampler:
            sampler.stop()
    series = sampler.series if sampler else []
    mib = [(t, v / 2 ** 20) for t, v in series]
    # Skip the warm-up. Heaps and pools grow for a while after that (JIT, free
    # lists, connection pools), so the baseline is the median of the second
    # tenth of the soak, the end the median of the last tenth, and the slope
    # is fitted over the second half.
    body = [(t, v) for t, v in mib if t >= a.warmup] or mib
    k = max(1, len(body) // 10)
    base = body[k:2 * k] or body[:k]
    start = statistics.median(v for _, v in base) if body else 0
    end = statistics.median(v for _, v in body[-k:]) if body else 0
    slope = 0.0
    half = body[len(body) // 2:]
    if len(half) >= 3:
        xs = [t for t, _ in half]
        ys = [v for _, v in half]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        den = sum((x - mx) ** 2 for x in xs) or 1
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den * 3600
    growth = end - start
    step = max(1, len(mib) // 30)
    return {
        "type": "soak", "run_id": ctx.run_id, "target": target.name, "status": "ok", "seconds": a.soak,
        "concurrency": a.soak_concurrency, "rps": res["rps"], "lat_p50_ms": res["lat_p50_ms"],
        "lat_p99_ms": res["lat_p99_ms"], "errors": res["errors"], "requests": res["requests"],
        "rss_start_mib": round(start, 1), "rss_end_mib": round(end, 1),
        "rss_max_mib": round(max((v for _, v in mib), default=0), 1), "rss_growth_mib": round(growth, 1),
        "rss_slope_mib_per_h": round(slope, 1),
        "gw_instructions": instructions,
        "gw_minstr_per_req": round(instructions / res["requests"] / 1e6, 4)
                             if instructions is not None and res["requests"] else None,
        "perf_error": instr.error if instr else None,
        "flat": growth <= max(8.0, 0.05 * start),
        "rss_points": [(round(t), round(v, 1)) for t, v in mib[::step]],
        "wall_s": round(time.monotonic() - t0, 1),
    }


def scaling_placements(a):
    """The two setups the scaling run alternates: 1 worker, then N workers."""
    return [{"workers": 1, "gateway_cpus": a.gateway_cpus, "load_cpus": a.load_cpus},
            {"workers": a.scaling, "gateway_cpus": a.scaling_gateway_cpus, "load_cpus": a.scaling_load_cpus}]


def set_placement(ctx, pl):
    """Point the harness at one placement: the gateway and mock started next are
    pinned there, wrk gets one thread per load CPU, the harness moves too."""
    ctx.gateway_cpus, ctx.load_cpus = pl["gateway_cpus"], pl["load_cpus"]
    ctx.gateway_cpu_list, ctx.load_cpu_list = proc.parse_cpus(pl["gateway_cpus"]), proc.parse_cpus(pl["load_cpus"])
    ctx.gomodel_workers = pl["workers"]
    os.sched_setaffinity(0, set(ctx.load_cpu_list))


def scaling_measure(ctx, target, wl, pl, rnd, attempt):
    """One scaling measurement: fresh mock and gateway on the placement, the
    workers' readiness, a pre-flight request, warm-up and window (measure()),
    then both stopped by PID."""
    a = ctx.args
    set_placement(ctx, pl)
    rec = {"type": "scaling", "kind": "measurement", "run_id": ctx.run_id, "target": target.name,
           "workload": wl.name, "concurrency": a.scaling_concurrency, "round": rnd, "attempt": attempt,
           "workers": pl["workers"], "gateway_cpus": pl["gateway_cpus"], "load_cpus": pl["load_cpus"],
           "shared_cpus": bool(set(ctx.gateway_cpu_list) & set(ctx.load_cpu_list)), "chosen": False}
    try:
        start_mock(ctx)
        t0 = time.monotonic()
        target.start()
        rec["listening"] = wait_workers(target, pl["workers"])
        rec["processes"] = len(proc.descendants(target.root_pid))
        rec["ready_s"] = round(time.monotonic() - t0, 2)
        rec["idle_rss_mib"] = round(proc.tree_rss(target.root_pid) / 2 ** 20, 1)
        err = preflight(ctx, target, wl)
        if err:
            raise RuntimeError("pre-flight: " + err)
        r = measure(ctx, target, wl, a.scaling_concurrency, a.warmup, a.duration)
        if target.proc is None or target.proc.poll() is not None:
            raise RuntimeError("%s exited during the window" % target.name)
        rec.update(r)
        rec["status"] = "ok"
    except Exception as e:  # one broken measurement must not lose the rest
        rec.update({"status": "failed", "error": str(e)[:500], "noisy": False})
    finally:
        target.stop()
        if ctx.mock_proc is not None:
            proc.stop_tree(ctx.mock_proc)
            ctx.mock_proc = None
    tag = "round %d %d worker%s gw CPU %s load CPU %s" % (rnd, pl["workers"], "s" if pl["workers"] > 1 else "",
                                                          pl["gateway_cpus"], pl["load_cpus"])
    if rec["status"] != "ok":
        log("scaling %s: FAILED: %s" % (tag, rec["error"]))
        return rec
    nz = rec["noise"]
    log("scaling %s: %8.1f req/s  p50 %.2f ms  p99 %.2f ms  err %d%s  gwCPU %.2f cores  %s Minstr/req  "
        "mock+wrk %.2f cores  RSS %.0f MiB  foreign %.0f/%.0f%%%s" % (
            tag, rec["rps"] or 0, rec["lat_p50_ms"], rec["lat_p99_ms"], rec["errors"],
            " ERRORS" if rec["errors"] else "", rec["gw_cpu_util"] or 0,
            "-" if rec.get("gw_minstr_per_req") is None else "%.3f" % rec["gw_minstr_per_req"], rec["load_cpu_util"],
            rec["gw_peak_rss_mib"] or 0, 100 * nz["gw_core_foreign"], 100 * nz["load_core_foreign"],
            " NOISY" if rec["noisy"] else ""))
    return rec


def run_scaling(ctx, target, out):
    """--scaling N: --repeats rounds of (1 worker, N workers), records appended
    to `out` as they come (a Ctrl-C keeps what was measured). A noisy
    measurement is repeated up to --max-retries times; with the cores shared
    (N-worker case) "noisy" means other processes, not our own load."""
    from harness.workloads import WORKLOADS as W
    a = ctx.args
    wl = W["chat"]
    for rnd in range(1, a.repeats + 1):
        for pl in scaling_placements(a):
            tries = []
            for attempt in range(1, a.max_retries + 2):
                rec = scaling_measure(ctx, target, wl, pl, rnd, attempt)
                tries.append(rec)
                out.append(rec)
                if rec["status"] != "ok" or not rec["noisy"]:
                    break
            ok = [r for r in tries if r["status"] == "ok"]
            (report.pick(ok) if ok else tries[-1])["chosen"] = True


def scaling_summary(ctx, records):
    """Per round the chosen 1-worker and N-worker runs and their ratio; the medians."""
    a = ctx.args
    n = a.scaling
    meas = [r for r in records if r.get("kind") == "measurement"]
    rounds = []
    for rnd in sorted({r["round"] for r in meas}):
        row = {"round": rnd}
        for w, key in ((1, "1"), (n, "n")):
            c = next((r for r in meas if r["round"] == rnd and r["workers"] == w and r["chosen"]), None)
            ok = c is not None and c["status"] == "ok"
            row["rps_" + key] = c["rps"] if ok else None
            row["errors_" + key] = c["errors"] if ok else None
            row["noisy_" + key] = c["noisy"] if ok else None
            row["status_" + key] = c["status"] if c else "missing"
        row["ratio"] = (round(row["rps_n"] / row["rps_1"], 3)
                        if row["rps_1"] and row["rps_n"] is not None else None)
        rounds.append(row)

    def med(xs):
        xs = [x for x in xs if x is not None]
        return round(statistics.median(xs), 3) if xs else None
    m1, mn, mr = med(r["rps_1"] for r in rounds), med(r["rps_n"] for r in rounds), med(r["ratio"] for r in rounds)
    return {
        "type": "scaling", "kind": "summary", "run_id": ctx.run_id, "target": "gomodel", "workload": "chat",
        "concurrency": a.scaling_concurrency, "max_workers": n, "placements": scaling_placements(a),
        "rounds": rounds, "median_rps_1": m1, "median_rps_n": mn, "median_ratio": mr,
        "ratio_of_medians": round(mn / m1, 3) if m1 and mn is not None else None,
        "efficiency": round(mr / n, 3) if mr is not None else None,
        "rounds_measured": sum(1 for r in rounds if r["ratio"] is not None),
        "rounds_with_errors": sum(1 for r in rounds if (r["errors_1"] or 0) + (r["errors_n"] or 0) > 0),
        "rounds_noisy": sum(1 for r in rounds if r["noisy_1"] or r["noisy_n"]),
        "errors_all_attempts": sum(r.get("errors", 0) for r in meas if r["status"] == "ok"),
        "failed_measurements": sum(1 for r in meas if r["status"] != "ok"),
    }




def installed_target(name, ctx, meta):
    """Target C{name}, installed (or marked C{unavailable}, with why, in the log); its version in C{meta}."""
    t = TARGETS[name](ctx)
    try:
        t.install()
    except RuntimeError as e:
        t.unavailable = str(e)
    meta["versions"][name] = t.version() if not t.unavailable else "unavailable"
    if t.unavailable:
        log("%s unavailable: %s" % (name, t.unavailable))
    return t

def stop_everything(ctx, targets):
    """Stop every target and the mocks (after a run, an interruption or a failure)."""
    for t in targets:
        try:
            t.stop()
        except Exception:
            pass
    for m in getattr(ctx, "mock_procs", None) or ([ctx.mock_proc] if ctx.mock_proc is not None else []):
        proc.stop_tree(m)

def main(argv):
    a = parse_args(argv)
    ctx = Ctx()
    ctx.args = a
    avail = os.sched_getaffinity(0)
    if a.protocol:
        # everything on the same CPUs: the gateway and the load both get all of them
        a.gateway_cpus = a.load_cpus = a.protocol_cpus or ",".join(str(c) for c in sorted(avail))
        ctx.gomodel_workers = a.protocol_workers or len(proc.parse_cpus(a.gateway_cpus))
        ctx.litellm_workers = a.litellm_workers or len(proc.parse_cpus(a.gateway_cpus))
    ctx.gateway_cpus, ctx.load_cpus = a.gateway_cpus, a.load_cpus
    ctx.gateway_cpu_list, ctx.load_cpu_list = proc.parse_cpus(a.gateway_cpus), proc.parse_cpus(a.load_cpus)
    wanted = ctx.gateway_cpu_list + ctx.load_cpu_list
    if a.scaling:
        wanted += proc.parse_cpus(a.scaling_gateway_cpus) + proc.parse_cpus(a.scaling_load_cpus)
    for c in wanted:
        if c not in avail:
            sys.exit("CPU %d is not available here (have %s); set --gateway-cpus/--load-cpus%s"
                     % (c, sorted(avail), "/--scaling-gateway-cpus/--scaling-load-cpus" if a.scaling else ""))
    if set(ctx.gateway_cpu_list) & set(ctx.load_cpu_list) and not a.protocol:
        log("warning: gateway and load CPUs overlap; the figures will mix both")
    if a.scaling:
        ng = len(proc.parse_cpus(a.scaling_gateway_cpus))
        if ng != a.scaling:
            log("warning: %d workers on %d gateway CPU(s) in the scaling run" % (a.scaling, ng))
    elif not a.protocol and a.gomodel_workers > len(ctx.gateway_cpu_list):
        log("warning: %d gomodel workers on %d gateway CPU(s)" % (a.gomodel_workers, len(ctx.gateway_cpu_list)))
    os.sched_setaffinity(0, set(ctx.load_cpu_list))
    ensure_tools(a)

    now = datetime.datetime.now()
    ctx.run_id = now.strftime("%Y%m%dT%H%M%S")
    ctx.run_dir = tempfile.mkdtemp(prefix="bench-run-%s-" % ctx.run_id, dir="/tmp")
    ctx.api_key = "" if a.no_auth else "sk-bench-" + secrets.token_hex(16)
    tag = "-".join(x for x in (["protocol"] if a.protocol else []) + (["features"] if a.variant == "features" else [])
                   + ([a.tag] if a.tag else []) + (["quick"] if a.quick else []) +
                   (["soak"] if a.soak else []) + (["scaling"] if a.scaling else []))
    os.makedirs(a.results_dir, exist_ok=True)
    base = os.path.join(a.results_dir, now.strftime("%Y-%m-%d") + ("-" + tag if tag else ""))
    log("run %s; logs in %s" % (ctx.run_id, ctx.run_dir))

    targets = []
    meta = {"type": "run", "run_id": ctx.run_id, "date": now.strftime("%Y-%m-%d"),
            "started": now.strftime("%Y-%m-%d %H:%M:%S"), "quick": a.quick, "soak_only": bool(a.soak),
            "command": "bash bench/run.sh " + " ".join(shlex.quote(x) for x in argv),
            "targets": a.targets, "workloads": a.workloads, "concurrency": a.concurrency,
            "duration_s": a.duration, "warmup_s": a.warmup, "repeats": a.repeats, "max_retries": a.max_retries,
            "rounds": a.rounds, "side_by_side": a.side_by_side,
            "noise_threshold": a.noise_threshold, "gateway_cpus": a.gateway_cpus, "load_cpus": a.load_cpus,
            "gomodel_workers": a.gomodel_workers, "auth": not a.no_auth, "machine": machine(),
            "pool_replicas": a.pool_replicas, "vllm_router_policy": a.vllm_router_policy, "variant": a.variant,
            "versions": {}, "notes": []}
    if a.side_by_side:
        meta["notes"].append(
            "Side by side (`--side-by-side`): %s ran at the same time, both on gateway CPU(s) %s, each cell's load "
            "on both at once, the first started swapping every round. Each had about half the CPU, so req/s and "
            "latency are not the solo figures; the ratios of CPU per request, round by round, are the measure "
            "(both gateways see the same host drift)." % (" and ".join("`%s`" % t for t in a.targets), a.gateway_cpus))
    why = proc.perf_probe()
    meta["perf"] = {"event": proc.PERF_EVENT, "available": why is None, "error": why, "version": proc.perf_version()}
    if why:
        log("perf unavailable (%s): no instructions per request" % why)
        meta["notes"].append("`gw Minstr/req` is empty: %s (it needs `perf stat -e %s`, e.g. Debian's "
                             "linux-perf, and kernel.perf_event_paranoid <= 2 or root)" % (why, proc.PERF_EVENT))
    if a.scaling:
        meta["scaling_only"] = True
        meta["scaling"] = {"max_workers": a.scaling, "concurrency": a.scaling_concurrency,
                           "placements": scaling_placements(a), "cpus_available": sorted(avail),
                           "load_priority": a.scaling_load_priority}
        ctx.load_idle = a.scaling_load_priority == "idle"
    if a.protocol:
        return run_protocol(ctx, a, meta, base, argv)
    cells, soaks, scaling = [], [], []
    ctx.mock_proc = None
    try:
        if not a.scaling:  # the scaling run starts a fresh mock per measurement, on that measurement's CPUs
            start_mock(ctx)
            log("mock on %s (pid %d, CPU %s)%s" % (ctx.mock_url, ctx.mock_pid, ctx.load_cpus, (
                "; %d more for gomodel-pool: %s" % (len(ctx.mock_urls) - 1, " ".join(ctx.mock_urls[1:])))
                if len(ctx.mock_urls) > 1 else ""))
        for name in a.targets:
            targets.append(installed_target(name, ctx, meta))
        meta["background"] = background(ctx)
        log("background load: %s" % meta["background"])

        if a.scaling:
            t = targets[0]
            if t.unavailable:
                scaling.append({"type": "scaling", "kind": "measurement", "run_id": ctx.run_id, "target": t.name,
                                "status": "skipped", "error": t.unavailable})
            else:
                log("scaling: gomodel chat c=%d, %d round(s) of 1 worker (gw CPU %s, load CPU %s) then %d workers "
                    "(gw CPU %s, load CPU %s)" % (a.scaling_concurrency, a.repeats, a.gateway_cpus, a.load_cpus,
                                                  a.scaling, a.scaling_gateway_cpus, a.scaling_load_cpus))
                run_scaling(ctx, t, scaling)
        for rnd in range(1, (1 if a.scaling or a.soak else a.rounds) + 1):
            if a.rounds > 1 and not a.soak:
                log("round %d of %d" % (rnd, a.rounds))
            # Every other round in the reverse order: a host that slows down (or speeds up) under a
            # sustained load favours neither the first target of a round nor the last.
            if a.side_by_side:
                run_side_by_side(ctx, targets if rnd % 2 else targets[::-1], rnd, cells)
                continue
            for t in ([] if a.scaling else targets if rnd % 2 else targets[::-1]):
                if a.soak and t.name == "direct":
                    continue
                if t.unavailable:
                    rec = {"type": "cell", "run_id": ctx.run_id, "target": t.name, "status": "skipped", "error": t.unavailable}
                    (soaks if a.soak else cells).append(dict(rec, type="soak" if a.soak else "cell"))
                    continue
                log("starting %s" % t.name)
                try:
                    t0 = time.monotonic()
                    t.start()
                    start_s = time.monotonic() - t0
                except RuntimeError as e:
                    log("%s failed to start: %s" % (t.name, e))
                    rec = {"run_id": ctx.run_id, "target": t.name, "status": "failed", "error": "start: %s" % e}
                    (soaks if a.soak else cells).append(dict(rec, type="soak" if a.soak else "cell"))
                    continue
                try:
                    idle = proc.tree_rss(t.root_pid) / 2 ** 20 if t.root_pid else None
                    if t.root_pid:
                        log("%s ready in %.1f s on port %d, idle RSS %.0f MiB" % (t.name, start_s, t.port, idle))
                        meta.setdefault("startup", {})[t.name] = {"ready_s": round(start_s, 1), "idle_rss_mib": round(idle, 1)}
                    if a.soak:
                        log("soak %s: %d s of chat at c=%d" % (t.name, a.soak, a.soak_concurrency))
                        s = run_soak(ctx, t)
                        log("soak %s: %s" % (t.name, {k: s.get(k) for k in (
                            "rps", "errors", "rss_start_mib", "rss_end_mib", "rss_growth_mib", "flat", "gw_minstr_per_req",
                            "error")}))
                        soaks.append(s)
                        continue
                    for wln in a.workloads:
                        wl = WORKLOADS[wln]
                        err = preflight(ctx, t, wl)
                        if err:
                            log("%s %s pre-flight failed: %s" % (t.name, wln, err))
                            cells.append({"type": "cell", "run_id": ctx.run_id, "target": t.name, "workload": wln,
                                          "status": "failed", "error": "pre-flight: " + err})
                            continue
                        for c in a.concurrency:
                            try:
                                cells.extend(dict(r, round=rnd) for r in run_cell(ctx, t, wl, c))
                            except Exception as e:  # one broken cell must not lose the rest
                                log("%s %s c=%d failed: %s" % (t.name, wln, c, e))
                                cells.append({"type": "cell", "run_id": ctx.run_id, "target": t.name, "workload": wln,
                                              "concurrency": c, "status": "failed", "error": str(e)[:500]})
                        if t.proc is not None and t.proc.poll() is not None:
                            raise RuntimeError("%s exited (%s) during %s" % (t.name, t.proc.returncode, wln))
                    if hasattr(t, "check_features") and not a.soak:
                        check = t.check_features()
                        meta.setdefault("features_check", {})[t.name] = check
                        log("%s: what shows every feature was on: %s" % (t.name, check))
                except RuntimeError as e:
                    log(str(e))
                    cells.append({"type": "cell", "run_id": ctx.run_id, "target": t.name, "status": "failed", "error": str(e)})
                finally:
                    t.stop()
    except KeyboardInterrupt:
        meta["notes"].append("interrupted (Ctrl-C): the report is partial")
        log("interrupted; writing what was measured")
    finally:
        stop_everything(ctx, targets)

    if a.rounds > 1 or a.side_by_side:
        # every round's runs of a cell together: the median by req/s, quiet runs preferred
        pooled = {}
        for c in cells:
            if c.get("status") == "ok":
                c["chosen"] = False
                pooled.setdefault((c["target"], c["workload"], c["concurrency"]), []).append(c)
        for runs in pooled.values():
            report.pick(runs)["chosen"] = True
    cap = next((c for c in cells if c.get("chosen") and c["target"] == "direct" and c["workload"] == "chat"
                and c["concurrency"] == max(a.concurrency)), None)
    if cap and cap["mock_cpu_s_per_1k"]:
        us = cap["mock_cpu_s_per_1k"] * 1000
        meta["mock_capacity"] = {"rps": cap["rps"], "concurrency": cap["concurrency"], "mock_us_per_req": round(us, 2),
                                 "loadgen_us_per_req": round(cap["loadgen_cpu_s_per_1k"] * 1000, 2),
                                 "load_core_foreign": cap["noise"]["load_core_foreign"],
                                 "mock_rps_per_core": round(1e6 / us) if us else None}
    if a.scaling and any(r.get("kind") == "measurement" and r.get("round") for r in scaling):
        summ = scaling_summary(ctx, scaling)
        scaling.append(summ)
        log("scaling: median 1 worker %s req/s, %d workers %s req/s, median ratio %s (rounds %s)" % (
            summ["median_rps_1"], a.scaling, summ["median_rps_n"], summ["median_ratio"],
            ", ".join("%s" % r["ratio"] for r in summ["rounds"])))
    meta["finished"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    meta["run_dir"] = ctx.run_dir
    with open(base + ".jsonl", "w") as f:
        for rec in [meta] + cells + soaks + scaling:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    with open(base + ".md", "w") as f:
        f.write(report.render(meta, cells, soaks, scaling))
    log("wrote %s.md and %s.jsonl" % (base, base))
    bad = [c for c in cells + soaks + scaling if c.get("status") == "failed"]
    return 1 if bad else 0


def run_protocol(ctx, a, meta, base, argv):
    """--protocol gomodel: GoModel's method (harness/protocol.py), its own report."""
    s = protocol.settings(a)
    meta.update({"protocol": s, "protocol_cpus": a.gateway_cpus, "protocol_workers": ctx.gomodel_workers,
                 "litellm_workers": ctx.litellm_workers, "wrk_threads": wrk_threads(ctx, s["concurrency"]),
                 "gomodel_workers": ctx.gomodel_workers})
    records, targets = [], []
    ctx.mock_proc = None
    try:
        start_mock(ctx)
        log("mock on %s (pid %d, CPUs %s)" % (ctx.mock_url, ctx.mock_pid, ctx.load_cpus))
        for name in a.targets:
            t = installed_target(name, ctx, meta)
            if t.unavailable:
                records.append({"type": "protocol", "run_id": ctx.run_id, "kind": "trial", "target": name,
                                "status": "skipped", "error": t.unavailable})
                meta["notes"].append("%s skipped: %s" % (name, t.unavailable))
            else:
                targets.append(t)
        meta["background"] = background(ctx)
        log("background load: %s" % meta["background"])
        log("protocol: %s on CPUs %s, gomodel --workers %d, LiteLLM --num_workers %d" % (
            {k: v for k, v in s.items()}, a.gateway_cpus, ctx.gomodel_workers, ctx.litellm_workers))
        protocol.run(ctx, targets, s, records, log)
    except KeyboardInterrupt:
        meta["notes"].append("interrupted (Ctrl-C): the report is partial")
        log("interrupted; writing what was measured")
    finally:
        stop_everything(ctx, targets)
    meta["finished"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    meta["run_dir"] = ctx.run_dir
    with open(base + ".jsonl", "w") as f:
        for rec in [meta] + records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    with open(base + ".md", "w") as f:
        f.write(protocol_report.render(meta, records))
    log("wrote %s.md and %s.jsonl" % (base, base))
    return 1 if any(r.get("status") == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
