"""Workloads, and the measurement of one cell (target x workload x concurrency).

Non-streaming workloads run under wrk (closed loop, keep-alive, every answer
checked by the Lua response() hook); streaming ones under streamload.mjs
(every stream read to the end and checked). Around the measurement window the
harness reads CPU counters from /proc, samples the gateway tree's RSS and
counts the tree's user-space instructions (perf stat, when available).
Both tools also run a fixed number of requests (`run_wrk_count`,
`run_stream(..., extra={"count": N})`), as GoModel's benchmark does.
"""

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

from . import proc
from .targets import BENCH_DIR, CHAT_MODEL, EMBED_MODEL, PACED_MODEL, http_get

N_TOKENS = 20
CHAT_TEXT = "mockchat" + "".join(" t%02d" % i for i in range(1, N_TOKENS))
RESP_TEXT = "mockresp" + "".join(" t%02d" % i for i in range(1, N_TOKENS))
MSG_TEXT = "mockmsgs" + "".join(" t%02d" % i for i in range(1, N_TOKENS))
# the tokens after the first, the same on every route: a gateway that answers
# Messages through the upstream's chat or Responses route has another first token
TOKENS_TAIL = "".join(" t%02d" % i for i in range(1, N_TOKENS))
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}
PROMPT = [{"role": "user", "content": "Say hello in twenty tokens."}]


def embed_value(i):
    """The mock's i-th embedding value (bench/mock/mock.mjs embedValue)."""
    v = (((i * 7919) % 1999) - 999) / 10000
    if abs(v) < 0.001:
        v = 0.0123
    return v


class Workload:
    def __init__(self, name, runner, path, body, route, markers=(), sse=None, expect=None, usage=False,
                 expect_alt=(), headers=None):
        self.name = name
        self.runner = runner      # "wrk" | "stream"
        self.path = path
        self._body = body         # function(model_name_fn) -> dict
        self.route = route        # the mock's counter for the upstream call
        self.markers = list(markers)
        self.sse = sse            # "chat" | "responses" | "messages"
        self.expect = expect
        self.expect_alt = list(expect_alt)  # other texts a stream may carry (a bridged answer)
        self.usage = usage
        self.headers = dict(headers or {})  # sent with every request, beside the target's own

    def request_headers(self, target):
        return dict(target.headers(), **self.headers)

    def body(self, target):
        return json.dumps(self._body(target.model), separators=(",", ":"))


WORKLOADS = {
    "chat": Workload(
        "chat", "wrk", "/v1/chat/completions",
        lambda m: {"model": m(CHAT_MODEL), "messages": PROMPT, "max_tokens": N_TOKENS},
        route="chat", markers=[CHAT_TEXT]),
    "stream": Workload(
        "stream", "stream", "/v1/chat/completions",
        lambda m: {"model": m(CHAT_MODEL), "messages": PROMPT, "max_tokens": N_TOKENS, "stream": True,
                   "stream_options": {"include_usage": True}},
        route="chat_stream", sse="chat", expect=CHAT_TEXT, usage=True),
    "stream_paced": Workload(
        "stream_paced", "stream", "/v1/chat/completions",
        lambda m: {"model": m(PACED_MODEL), "messages": PROMPT, "max_tokens": N_TOKENS, "stream": True,
                   "stream_options": {"include_usage": True}},
        route="chat_stream_paced", sse="chat", expect=CHAT_TEXT, usage=True),
    "embeddings": Workload(
        "embeddings", "wrk", "/v1/embeddings",
        lambda m: {"model": m(EMBED_MODEL), "input": "The quick brown fox jumps over the lazy dog."},
        route="embeddings", markers=["embedding", repr(embed_value(0)), repr(embed_value(1023))]),
    "responses": Workload(
        "responses", "wrk", "/v1/responses",
        lambda m: {"model": m(CHAT_MODEL), "input": "Say hello in twenty tokens.", "max_output_tokens": N_TOKENS},
        route="responses", markers=[RESP_TEXT]),
    "responses_stream": Workload(
        "responses_stream", "stream", "/v1/responses",
        lambda m: {"model": m(CHAT_MODEL), "input": "Say hello in twenty tokens.", "max_output_tokens": N_TOKENS,
                   "stream": True},
        route="responses_stream", sse="responses", expect=RESP_TEXT),
    # Anthropic Messages: vLLM serves them itself; a gateway may also answer them
    # through the upstream's chat or Responses route (LiteLLM does: the text then
    # starts with "mockchat" or "mockresp"; the report notes the route from the
    # mock's counters)
    "messages": Workload(
        "messages", "wrk", "/v1/messages",
        lambda m: {"model": m(CHAT_MODEL), "max_tokens": N_TOKENS, "messages": PROMPT},
        route="messages", headers=ANTHROPIC_HEADERS,
        markers=[TOKENS_TAIL, '~"type"%s*:%s*"message"', '~"stop_reason"%s*:%s*"']),
    "messages_stream": Workload(
        "messages_stream", "stream", "/v1/messages",
        lambda m: {"model": m(CHAT_MODEL), "max_tokens": N_TOKENS, "messages": PROMPT, "stream": True},
        route="messages_stream", sse="messages", expect=MSG_TEXT, expect_alt=[CHAT_TEXT, RESP_TEXT], usage=True,
        headers=ANTHROPIC_HEADERS),
}

WRK_LUA = os.path.join(BENCH_DIR, "wrk", "post.lua")
STREAMLOAD = os.path.join(BENCH_DIR, "streamload.mjs")


def mock_stats(ctx):
    """Calls per route, summed over every mock (several with the gomodel-pool target)."""
    total = {}
    for url in getattr(ctx, "mock_urls", None) or [ctx.mock_url]:
        st, body = http_get(url + "/mock/stats", timeout=5)
        for k, v in (json.loads(body) if st == 200 else {}).items():
            total[k] = total.get(k, 0) + v
    return total


def stream_config(target, wl, conc, warmup, duration, once=False, extra=None):
    cfg = {
        "url": target.base_url + wl.path, "headers": wl.request_headers(target), "body": wl.body(target),
        "kind": wl.sse, "expect_text": wl.expect, "expect_text_alt": wl.expect_alt, "expect_usage": wl.usage,
        "concurrency": conc, "warmup_s": warmup, "duration_s": duration, "timeout_s": 30, "once": once,
    }
    cfg.update(extra or {})
    return cfg


def preflight(ctx, target, wl):
    """One request, fully checked. Returns None when good, else the error text."""
    if wl.runner == "stream":
        cfg = stream_config(target, wl, 1, 0, 0, once=True)
        r = subprocess.run(["node", STREAMLOAD, json.dumps(cfg)], capture_output=True, text=True, timeout=60)
        line = next((l for l in r.stdout.splitlines() if l.startswith("STREAMJSON ")), None)
        if line is None:
            return "streamload failed: rc=%s %s" % (r.returncode, (r.stderr or r.stdout)[-300:])
        out = json.loads(line[len("STREAMJSON "):])
        if out["requests"] == 1 and out["errors"] == 0:
            return None
        return "; ".join(out["error_samples"]) or "no answer"
    req = urllib.request.Request(target.base_url + wl.path, data=wl.body(target).encode(), method="POST",
                                 headers=dict(wl.request_headers(target), **{"Content-Type": "application/json"}))
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, body = r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read().decode("utf-8", "replace")
    except Exception as e:
        return "request failed: %s" % e
    if status != 200:
        return "status %s: %s" % (status, body[:300])
    missing = [m for m in wl.markers if not has_marker(body, m)]
    if missing:
        return "answer lacks %s: %s" % (missing, body[:300])
    return None


def has_marker(body, marker):
    """What wrk/post.lua checks: a plain substring, or (a marker starting with
    "~") a Lua pattern; the patterns used here need only %s translated."""
    if marker.startswith("~"):
        return re.search(marker[1:].replace("%s", r"\s"), body) is not None
    return marker in body


def wrk_threads(ctx, conc):
    return max(1, min(conc, len(ctx.load_cpu_list)))


def _wrk_cmd(ctx, target, wl, conc, duration, bodyfile, count=None):
    threads = wrk_threads(ctx, conc)
    cmd = proc.load_cmd(ctx, ["wrk", "-t%d" % threads, "-c%d" % conc, "-d%ds" % duration, "--timeout", "30s",
                              "-s", WRK_LUA, target.base_url + wl.path, "--", bodyfile, "|||".join(wl.markers)])
    cmd += ["%s: %s" % kv for kv in wl.request_headers(target).items()]
    if count is not None:
        cmd.append("--count=%d" % count)
    return cmd


def _parse_prefixed(text, prefix):
    for line in text.splitlines():
        if line.startswith(prefix):
            return json.loads(line[len(prefix):])
    return None


def run_wrk(ctx, target, wl, conc, warmup, duration, on_start, on_end):
    bodyfile = os.path.join(ctx.run_dir, "body-%s-%s.json" % (target.name, wl.name))
    with open(bodyfile, "w") as f:
        f.write(wl.body(target))
    if warmup > 0:
        subprocess.run(_wrk_cmd(ctx, target, wl, conc, warmup, bodyfile), capture_output=True, timeout=warmup + 60)
    on_start(None)
    p = subprocess.Popen(_wrk_cmd(ctx, target, wl, conc, duration, bodyfile), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    out = p.stdout.read().decode("utf-8", "replace")
    rc, ticks = proc.wait4(p)
    on_end(ticks)
    return _wrk_result(out, rc)


def run_wrk_count(ctx, target, wl, conc, count, max_wall, on_start, on_end):
    """`count` requests at concurrency `conc` (each wrk thread answers its share,
    then says so; wrk gets SIGINT once all have), or what was answered within
    `max_wall` seconds (then `capped` is true). Latency percentiles are wrk's
    (nearest rank over 1 µs buckets)."""
    bodyfile = os.path.join(ctx.run_dir, "body-%s-%s.json" % (target.name, wl.name))
    with open(bodyfile, "w") as f:
        f.write(wl.body(target))
    threads = wrk_threads(ctx, conc)
    quota = -(-count // threads)
    on_start(None)
    t0 = time.monotonic()
    p = subprocess.Popen(_wrk_cmd(ctx, target, wl, conc, max(1, int(round(max_wall))), bodyfile, quota),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines, done = [], 0
    for line in p.stdout:
        lines.append(line)
        if line.startswith("WRKTHREAD_DONE"):
            done += 1
            if done == threads:
                p.send_signal(signal.SIGINT)  # wrk would otherwise sleep out its -d
    rc, ticks = proc.wait4(p)
    wall = time.monotonic() - t0
    on_end(ticks)
    res = _wrk_result("".join(lines), rc)
    res["capped"] = done < threads
    res["wall_s"] = round(wall, 3)
    return res


def _wrk_result(out, rc):
    r = _parse_prefixed(out, "WRKJSON ")
    if r is None:
        raise RuntimeError("wrk failed (rc %s): %s" % (rc, out[-500:]))
    errors = r["failures"] + r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"]
    dur = r["duration_us"] / 1e6
    return {
        "requests": r["good"], "errors": errors, "window_s": round(dur, 3), "rps": round(r["good"] / dur, 1),
        "lat_p50_ms": r["lat_p50_us"] / 1000, "lat_p95_ms": r["lat_p95_us"] / 1000, "lat_p99_ms": r["lat_p99_us"] / 1000,
        "lat_max_ms": r["lat_max_us"] / 1000,
        "error_samples": [r["sample"]] if r["sample"] else [],
        "error_detail": {k: r[k] for k in ("failures", "bad_status", "err_connect", "err_read", "err_write", "err_timeout")},
    }


def run_stream(ctx, target, wl, conc, warmup, duration, on_start, on_end, extra=None):
    """Streams under streamload.mjs; `extra` adds to its config (e.g. `count`
    and `max_wall_s` for a fixed-count run)."""
    cfg = stream_config(target, wl, conc, warmup, duration, extra=extra)
    p = subprocess.Popen(proc.load_cmd(ctx, ["node", STREAMLOAD, json.dumps(cfg)]),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    result, rest = None, []
    for line in p.stdout:
        if line.startswith("WINDOW_START"):
            on_start(p.pid)
        elif line.startswith("WINDOW_END"):
            on_end(None)
        elif line.startswith("STREAMJSON "):
            result = json.loads(line[len("STREAMJSON "):])
        else:
            rest.append(line)
    p.wait()
    if result is None:
        raise RuntimeError("streamload failed (rc %s): %s" % (p.returncode, "".join(rest)[-500:]))
    return {
        "requests": result["requests"], "errors": result["errors"], "window_s": result["duration_s"],
        "rps": result["rps"], "lat_p50_ms": result["lat_p50_ms"], "lat_p95_ms": result["lat_p95_ms"],
        "lat_p99_ms": result["lat_p99_ms"], "lat_max_ms": result["lat_max_ms"],
        "ttft_p50_ms": result["ttft_p50_ms"], "ttft_p95_ms": result["ttft_p95_ms"], "ttft_p99_ms": result["ttft_p99_ms"],
        "content_events_mean": result["content_events_mean"], "error_samples": result["error_samples"],
        "errors_outside_window": result["errors_outside_window"],
        "responses_done_marker": result.get("responses_done_marker", 0),
        "responses_without_event_lines": result.get("responses_without_event_lines", 0),
        "ttfd_p50_ms": result.get("ttfd_p50_ms"), "ttfd_p95_ms": result.get("ttfd_p95_ms"),
        "ttfd_p99_ms": result.get("ttfd_p99_ms"), "capped": bool(result.get("capped")),
        "capped_streams": result.get("capped", 0), "alt_texts": result.get("alt_texts", 0),
    }


def measure(ctx, target, wl, conc, warmup, duration, runner=None):
    """Run one cell once. Returns the cell's figures (see README for each field).
    `runner` replaces the workload's own (run_wrk or run_stream, called with the
    same arguments), e.g. for a fixed-count run."""
    root = target.root_pid
    sampler = proc.RssSampler(root) if root else None
    if sampler:
        sampler.start()
    snaps = {}
    mock_pids = getattr(ctx, "mock_pids", None) or [ctx.mock_pid]
    lg = {"pid": None, "ticks": None, "start_ticks": 0}
    # user-space instructions of the gateway tree over the window (perf stat,
    # attached now with its counter off, switched on and off with the snapshots)
    instr = proc.InstrCounter(proc.descendants(root), ctx.load_cpus, ctx.run_dir) if root else None

    def on_start(loadgen_pid):
        lg["pid"] = loadgen_pid
        lg["start_ticks"] = proc.proc_ticks(loadgen_pid) if loadgen_pid else 0
        snaps["stats0"] = mock_stats(ctx)
        if instr:
            instr.enable()
        snaps["a"] = proc.Snapshot(root, mock_pids)

    def on_end(loadgen_ticks):
        snaps["b"] = proc.Snapshot(root, mock_pids)
        if instr:
            instr.disable()
        if loadgen_ticks is not None:
            lg["ticks"] = loadgen_ticks
        elif lg["pid"]:
            lg["ticks"] = proc.proc_ticks(lg["pid"]) - lg["start_ticks"]
        snaps["stats1"] = mock_stats(ctx)

    runner = runner or (run_wrk if wl.runner == "wrk" else run_stream)
    try:
        if instr:
            instr.start()
        res = runner(ctx, target, wl, conc, warmup, duration, on_start, on_end)
    finally:
        # perf is stopped whatever happened to the window
        instructions = instr.stop() if instr else None
        peak = sampler.stop() if sampler else 0
    a, b = snaps["a"], snaps["b"]
    elapsed = b.t - a.t
    win_ticks = elapsed * proc.CLK_TCK
    req = max(res["requests"], 1)

    gw_ticks = b.tree - a.tree
    mock_ticks = sum(b.extra.get(pid, 0) - a.extra.get(pid, 0) for pid in mock_pids)
    self_ticks = b.self_ - a.self_
    lg_ticks = lg["ticks"] or 0

    def core_delta(cpus):
        d = [0] * 8
        for c in cpus:
            for i in range(8):
                d[i] += b.cpus.get(c, [0] * 8)[i] - a.cpus.get(c, [0] * 8)[i]
        return d

    gw_d = core_delta(ctx.gateway_cpu_list)
    ld_d = core_delta(ctx.load_cpu_list)
    n_gw, n_ld = len(ctx.gateway_cpu_list), len(ctx.load_cpu_list)
    def share(x):
        return round(min(1.0, max(0.0, x)), 3)

    # tick accounting on a VM can land a few ticks late, so shares are clamped to [0, 1]
    noise = {
        # CPU time on the gateway's cores spent by anything but the gateway
        "gw_core_foreign": share((proc.busy(gw_d) - gw_ticks) / (win_ticks * n_gw)),
        # CPU time on the load cores spent by anything but mock + load generator + harness
        "load_core_foreign": share((proc.busy(ld_d) - mock_ticks - lg_ticks - self_ticks) / (win_ticks * n_ld)),
        "load_core_busy": share(proc.busy(ld_d) / (win_ticks * n_ld)),
        "gw_core_busy": share(proc.busy(gw_d) / (win_ticks * n_gw)),
        "steal": share((gw_d[7] + ld_d[7]) / (win_ticks * (n_gw + n_ld))),
    }
    shared = sorted(set(ctx.gateway_cpu_list) & set(ctx.load_cpu_list))
    if shared:
        # Gateway and load share cores (--scaling's N-worker case): the split
        # above would count our own load as foreign on the gateway's cores and
        # the gateway as foreign on the load cores, so every run would look
        # noisy. Measure instead what anything but gateway + mock + load
        # generator + harness used of all the cores involved.
        cpus = sorted(set(ctx.gateway_cpu_list) | set(ctx.load_cpu_list))
        all_d = core_delta(cpus)
        ours = gw_ticks + mock_ticks + lg_ticks + self_ticks
        foreign = share((proc.busy(all_d) - ours) / (win_ticks * len(cpus)))
        busy_all = share(proc.busy(all_d) / (win_ticks * len(cpus)))
        noise.update({"gw_core_foreign": foreign, "load_core_foreign": foreign, "gw_core_busy": busy_all,
                      "load_core_busy": busy_all, "steal": share(all_d[7] / (win_ticks * len(cpus))),
                      "shared_cpus": shared})
    thr = ctx.args.noise_threshold
    noisy = (noise["load_core_foreign"] > thr or noise["steal"] > thr
             or (root is not None and noise["gw_core_foreign"] > thr))
    s0, s1 = snaps["stats0"], snaps["stats1"]
    upstream = {k: s1.get(k, 0) - s0.get(k, 0) for k in set(s0) | set(s1) if s1.get(k, 0) - s0.get(k, 0)}
    done = res["requests"] > 0
    res.update({
        "gw_cpu_s": round(gw_ticks / proc.CLK_TCK, 3) if root else None,
        "gw_cpu_s_per_1k": round(gw_ticks / proc.CLK_TCK / req * 1000, 4) if root and done else None,
        # of which in the kernel (system time: sockets, epoll, writes)
        "gw_sys_s_per_1k": round((b.tree_sys - a.tree_sys) / proc.CLK_TCK / req * 1000, 4) if root and done else None,
        "gw_cpu_util": round(gw_ticks / win_ticks, 3) if root else None,
        # the same per process of the tree, primary first (shows how --workers spread the load)
        "gw_cpu_util_by_process": [round((b.tree_pids[p] - a.tree_pids.get(p, 0)) / win_ticks, 3)
                                   for p in sorted(b.tree_pids, key=lambda p: (p != root, p))]
                                  if root and len(b.tree_pids) > 1 else None,
        "gw_peak_rss_mib": round(peak / 2 ** 20, 1) if root else None,
        # the peak of each process, root first (only when the tree has several)
        "gw_peak_rss_by_process_mib": sampler.peaks_mib() if root and len(sampler.peak_by_pid) > 1 else None,
        # user-space instructions of the gateway tree per answered request, in
        # millions (perf stat -e instructions:u over the window): unlike CPU
        # seconds it does not move with the host's CPU speed
        "gw_instructions": instructions if root else None,
        "gw_minstr_per_req": round(instructions / req / 1e6, 4) if root and done and instructions is not None else None,
        "perf_error": instr.error if instr else None,
        "mock_cpu_s_per_1k": round(mock_ticks / proc.CLK_TCK / req * 1000, 4) if done else None,
        "loadgen_cpu_s_per_1k": round(lg_ticks / proc.CLK_TCK / req * 1000, 4) if done else None,
        "noise": noise, "noisy": noisy,
        # our own load (mock + load generator + harness) saturating its core: the
        # gateway figure is then a lower bound (not defined when the cores are shared)
        "load_bound": not shared and (mock_ticks + lg_ticks + self_ticks) / (win_ticks * n_ld) > 0.9,
        # cores used by mock + load generator + harness over the window
        "load_cpu_util": round((mock_ticks + lg_ticks + self_ticks) / win_ticks, 3),
        "upstream": upstream,
        "upstream_per_request": round(upstream.get(wl.route, 0) / req, 3) if done else None,
        # calls the mock got beyond the answered requests; up to `concurrency` of
        # them are requests still in flight when the window closed
        "upstream_extra": upstream.get(wl.route, 0) - res["requests"],
    })
    return res
