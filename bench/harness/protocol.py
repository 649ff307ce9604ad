"""`--protocol gomodel`: GoModel's published benchmark method, run on this machine.

Everything shares the machine's CPUs, as on GoModel's 2-vCPU box: the gateway
(gomodel with `--workers` = one per CPU, LiteLLM with as many workers, Portkey
and vllm-router as they come), the mock, the load generator and the harness are
all allowed on every CPU of `--protocol-cpus` (no split, normal priority).

Pass A (latency), `trials` times, the targets in a random order each trial: a
fresh gateway, `warmup` chat requests, then for each of the six variants (chat,
responses, Anthropic messages; each plain and streamed) one checked pre-flight
request, `variant_warmup` requests, and `n` requests at concurrency
`concurrency` (fixed count, every answer checked; a variant stops at
`max_wall_s`, then it is marked capped). Pass B (capacity and footprint), once,
direct first and the gateways in a random order: `cold_starts` cold starts
(exec to the first 200 on a chat), then `warmup` requests, the chat sweep
(time-boxed windows at each concurrency) and a `resource_s` window of chat at
`concurrency` for CPU, throughput and peak RSS.

Every record goes to the list given (type "protocol"); protocol_report.py
aggregates and renders them.
"""

import http.client
import random
import statistics
import time

from . import proc
from .targets import wait_workers
from .workloads import CHAT_TEXT, WORKLOADS, measure, preflight, run_stream, run_wrk_count

# (dialect, streamed, workload)
VARIANTS = (("chat", False, "chat"), ("chat", True, "stream"), ("responses", False, "responses"),
            ("responses", True, "responses_stream"), ("messages", False, "messages"),
            ("messages", True, "messages_stream"))

DEFAULTS = {"n": 8000, "concurrency": 10, "trials": 2, "warmup": 200, "variant_warmup": 50, "max_wall_s": 10,
            "sweep": [1, 16, 128], "sweep_s": 8, "resource_s": 8, "cold_starts": 5, "rest_s": 5}
QUICK = {"n": 500, "trials": 1, "warmup": 50, "variant_warmup": 10, "sweep_s": 2, "resource_s": 2, "cold_starts": 2,
         "rest_s": 0.5}
POLL_S = 0.01  # cold start: one chat request every 10 ms, each on a new connection


def settings(args):
    """The protocol's settings: GoModel's (DEFAULTS), shorter with --quick, any --protocol-* option winning."""
    s = dict(DEFAULTS, **(QUICK if args.quick else {}))
    for key in DEFAULTS:
        v = getattr(args, "protocol_" + key, None)
        if v is not None:
            s[key] = v
    s["seed"] = args.seed if args.seed is not None else int(time.time())
    return s


def _fixed_runner(count, max_wall):
    """A measure() runner for `count` requests (or what `max_wall` seconds allow)."""
    def run(ctx, target, wl, conc, _warmup, _duration, on_start, on_end):
        if wl.runner == "wrk":
            return run_wrk_count(ctx, target, wl, conc, count, max_wall, on_start, on_end)
        return run_stream(ctx, target, wl, conc, 0, 0, on_start, on_end,
                          extra={"count": count, "max_wall_s": max_wall})
    return run


def _warm(ctx, target, wl, conc, count, max_wall):
    """`count` unmeasured requests (errors ignored: the measured run counts its own)."""
    if count <= 0:
        return
    noop = lambda _: None  # noqa: E731
    try:
        _fixed_runner(count, max_wall)(ctx, target, wl, conc, 0, 0, noop, noop)
    except RuntimeError:
        pass


def _start(ctx, target):
    """Start a target and wait for all its processes; returns seconds to ready."""
    t0 = time.monotonic()
    target.start()
    n = target.expected_listeners()
    if n > 1:
        wait_workers(target, n)
    return round(time.monotonic() - t0, 2)


def _line(rec):
    if rec.get("status") != "ok":
        return "FAILED: %s" % str(rec.get("error", ""))[:300]
    out = "%d ok %d err%s  %.0f req/s  p50 %.2f p99 %.2f ms" % (
        rec["requests"], rec["errors"], " CAPPED" if rec.get("capped") else "", rec["rps"] or 0,
        rec["lat_p50_ms"] or 0, rec["lat_p99_ms"] or 0)
    if rec.get("ttfd_p50_ms") is not None:
        out += "  TTFT %.2f ms" % rec["ttfd_p50_ms"]
    if rec.get("gw_cpu_s_per_1k") is not None:
        out += "  gw %.3f s/1k" % rec["gw_cpu_s_per_1k"]
    return out + "  foreign %.0f %%" % (100 * rec["noise"]["gw_core_foreign"])


def latency_pass(ctx, target, trial, s, out, log):
    """One trial of one target: fresh start, warm-up, the six variants."""
    base = {"type": "protocol", "run_id": ctx.run_id, "trial": trial, "target": target.name}
    gateway = target.name != "direct"
    sampler = None
    try:
        ready_s = _start(ctx, target)  # direct: just the mock's port
        if gateway:
            sampler = proc.RssSampler(target.root_pid)
            sampler.start()
            _warm(ctx, target, WORKLOADS["chat"], s["concurrency"], s["warmup"], s["max_wall_s"])
        for dialect, stream, wln in VARIANTS:
            wl = WORKLOADS[wln]
            rec = dict(base, kind="latency", variant=dialect, stream=stream, workload=wln,
                       concurrency=s["concurrency"], n=s["n"])
            err = preflight(ctx, target, wl)
            if err:
                rec.update(status="failed", error="pre-flight: " + err)
            else:
                try:
                    _warm(ctx, target, wl, s["concurrency"], s["variant_warmup"], s["max_wall_s"])
                    rec.update(measure(ctx, target, wl, s["concurrency"], 0, 0,
                                       runner=_fixed_runner(s["n"], s["max_wall_s"])))
                    rec["status"] = "ok"
                except Exception as e:  # one broken variant must not lose the rest
                    rec.update(status="failed", error=str(e)[:500])
            out.append(rec)
            log("protocol trial %d %s %s%s: %s" % (trial, target.name, dialect, " stream" if stream else "",
                                                   _line(rec)))
            if gateway and (target.proc is None or target.proc.poll() is not None):
                raise RuntimeError("%s exited during %s" % (target.name, wln))
        if gateway:
            sampler.stop()
            out.append(dict(base, kind="trial", status="ok", ready_s=ready_s,
                            peak_rss_mib=round(sampler.peak / 2 ** 20, 1), peak_rss_by_process_mib=sampler.peaks_mib()))
    except Exception as e:
        log("protocol trial %d %s failed: %s" % (trial, target.name, e))
        out.append(dict(base, kind="trial", status="failed", error=str(e)[:500]))
    finally:
        if sampler is not None:
            sampler.stop()
        target.stop()


def _post(port, path, body, headers, timeout=5.0):
    """(status, text) of one POST on a new connection, or (None, why)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=dict(headers, **{"Content-Type": "application/json"}))
        r = conn.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as e:
        return None, str(e)
    finally:
        conn.close()


def cold_start(ctx, target, keep):
    """Exec to the first 200 on a chat: the time from just before the process is
    spawned until a chat request (sent every 10 ms, each on a new connection)
    is answered 200 with the mock's text. With workers, also the time until
    all of them listen. Stops the target unless `keep`."""
    wl = WORKLOADS["chat"]
    body, headers = wl.body(target), wl.request_headers(target)
    t0 = time.monotonic()
    target.launch()
    polls, last = 0, ""
    try:
        while True:
            if target.proc.poll() is not None:
                raise RuntimeError("%s exited with %s while starting" % (target.name, target.proc.returncode))
            polls += 1
            st, text = _post(target.port, wl.path, body, headers)
            if st == 200 and CHAT_TEXT in text:
                first = time.monotonic() - t0
                break
            last = "%s %s" % (st, text[:120])
            if time.monotonic() - t0 > target.start_timeout:
                raise RuntimeError("no 200 on a chat after %.0f s (last: %s)" % (target.start_timeout, last))
            time.sleep(POLL_S)
        rec = {"first_200_s": round(first, 3), "polls": polls}
        n = target.expected_listeners()
        if n > 1:
            deadline = time.monotonic() + 60
            while target.serving() < n and time.monotonic() < deadline:
                time.sleep(0.01)
            rec["all_listening_s"] = round(time.monotonic() - t0, 3)
        rec["rss_mib"] = round(proc.tree_rss(target.root_pid) / 2 ** 20, 1)
        return rec
    except Exception:
        target.stop()
        raise
    finally:
        if not keep:
            target.stop()


def capacity_pass(ctx, target, s, out, log):
    """Cold starts, then the chat sweep and the resource window on the last start."""
    base = {"type": "protocol", "run_id": ctx.run_id, "target": target.name}
    gateway = target.name != "direct"
    chat = WORKLOADS["chat"]
    try:
        if gateway:
            runs = []
            for i in range(s["cold_starts"]):
                keep = i == s["cold_starts"] - 1
                runs.append(cold_start(ctx, target, keep))
                log("protocol cold start %s #%d: first 200 after %.3f s%s" % (
                    target.name, i + 1, runs[-1]["first_200_s"], "" if "all_listening_s" not in runs[-1] else
                    ", all %d processes taking connections after %.3f s" % (target.expected_listeners(),
                                                                  runs[-1]["all_listening_s"])))
                if not keep:
                    time.sleep(min(1.0, s["rest_s"]))
            out.append(dict(base, kind="cold_start", status="ok", runs=runs,
                            median_s=round(statistics.median(r["first_200_s"] for r in runs), 3)))
            target.wait_ready()
            target.after_ready()
            n = target.expected_listeners()
            if n > 1:
                wait_workers(target, n)
            time.sleep(1.0)  # settle before the idle figure
            idle = {p: proc.rss_bytes(p) for p in proc.descendants(target.root_pid)}
            _warm(ctx, target, chat, s["concurrency"], s["warmup"], s["max_wall_s"])
        else:
            target.start()
        for c in s["sweep"]:
            rec = dict(base, kind="sweep", concurrency=c)
            try:
                rec.update(measure(ctx, target, chat, c, 0, s["sweep_s"]), status="ok")
            except Exception as e:
                rec.update(status="failed", error=str(e)[:500])
            out.append(rec)
            log("protocol sweep %s c=%d: %s" % (target.name, c, _line(rec)))
        if gateway:
            rec = dict(base, kind="resources", concurrency=s["concurrency"],
                       idle_rss_mib=round(sum(idle.values()) / 2 ** 20, 1),
                       idle_rss_by_process_mib=[round(idle[p] / 2 ** 20, 1) for p in
                                                sorted(idle, key=lambda p: (p != target.root_pid, p))])
            try:
                rec.update(measure(ctx, target, chat, s["concurrency"], 0, s["resource_s"]), status="ok")
            except Exception as e:
                rec.update(status="failed", error=str(e)[:500])
            out.append(rec)
            log("protocol resources %s: %s, peak RSS %s MiB (by process %s)" % (
                target.name, _line(rec), rec.get("gw_peak_rss_mib"), rec.get("gw_peak_rss_by_process_mib")))
    except Exception as e:
        log("protocol capacity %s failed: %s" % (target.name, e))
        out.append(dict(base, kind="capacity", status="failed", error=str(e)[:500]))
    finally:
        target.stop()


def run(ctx, targets, s, out, log):
    """Pass A then pass B over `targets` (available ones only); records go to `out` as they come."""
    rng = random.Random(s["seed"])
    for trial in range(1, s["trials"] + 1):
        order = list(targets)
        rng.shuffle(order)
        out.append({"type": "protocol", "run_id": ctx.run_id, "kind": "order", "trial": trial,
                    "order": [t.name for t in order]})
        log("protocol trial %d/%d, order: %s" % (trial, s["trials"], ", ".join(t.name for t in order)))
        for t in order:
            latency_pass(ctx, t, trial, s, out, log)
            time.sleep(s["rest_s"])
    direct = [t for t in targets if t.name == "direct"]
    gateways = [t for t in targets if t.name != "direct"]
    rng.shuffle(gateways)
    out.append({"type": "protocol", "run_id": ctx.run_id, "kind": "order", "trial": 0,
                "order": [t.name for t in direct + gateways]})
    log("protocol capacity pass, order: %s" % ", ".join(t.name for t in direct + gateways))
    for t in direct + gateways:
        capacity_pass(ctx, t, s, out, log)
        time.sleep(s["rest_s"])
