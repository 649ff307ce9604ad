"""The markdown report: machine, versions, setup, then one table per workload."""

ORDER = ["direct", "gomodel", "litellm", "portkey"]


def _ms(v):
    if v is None:
        return "–"
    if abs(v) >= 100:
        return "%.0f" % v
    if abs(v) >= 10:
        return "%.1f" % v
    return "%.2f" % v


def _delta(v):
    if v is None:
        return "–"
    return ("+" if v >= 0 else "−") + _ms(abs(v))


def _num(v, fmt="{:,.0f}"):
    return "–" if v is None else fmt.format(v)


def _oneline(text, n=400):
    """A multi-line error (a log tail) as one line: its first and last lines."""
    lines = [l.strip() for l in str(text).splitlines() if l.strip()]
    if len(lines) > 2:
        lines = [lines[0], "…", lines[-1]]
    out = " ".join(lines)
    return out if len(out) <= n else out[:n] + "…"


def _key(c):
    return (c["workload"], c["concurrency"], c["target"])


def render(meta, cells, soaks):
    chosen = [c for c in cells if c.get("chosen")]
    failed = [c for c in cells if c.get("status") in ("failed", "skipped")]
    direct = {(c["workload"], c["concurrency"]): c for c in chosen if c["target"] == "direct"}
    targets = [t for t in ORDER if t in meta["targets"]] + [t for t in meta["targets"] if t not in ORDER]
    m = meta["machine"]
    out = []
    w = out.append
    title = "# gomodel overhead benchmark: %s" % meta["date"]
    if meta.get("quick"):
        title += " (quick smoke run)"
    w(title)
    w("")
    if meta.get("quick"):
        w("> **Smoke run** (`--quick`): windows of %s s after %s s of warm-up, no repeats. The numbers show that "
          "the harness works end to end; they are too short and too noisy to compare gateways." %
          (meta["duration_s"], meta["warmup_s"]))
        w("")
    if meta.get("soak_only"):
        w("Soak run only (`--soak`); the matrix was not run.")
        w("")
    w("## Machine and versions")
    w("")
    w("| | |")
    w("| --- | --- |")
    w("| CPU | %s (%s logical CPUs%s) |" % (m["cpu_model"], m["cpus"], ", virtualised" if m.get("hypervisor") else ""))
    w("| memory | %s GiB |" % m["mem_gib"])
    w("| OS / kernel | %s / %s |" % (m["os"], m["kernel"]))
    w("| Python / Node / wrk | %s / %s / %s |" % (m["python"], m["node"], m["wrk"]))
    for t in targets:
        w("| %s | %s |" % (t, meta["versions"].get(t, "?")))
    w("| started | %s (run id `%s`, %s) |" % (meta["started"], meta["run_id"], meta["command"]))
    w("")
    w("## Setup")
    w("")
    bg = meta.get("background", {})
    w("- Gateway under test pinned to CPU %s; mock upstream, load generator and harness pinned to CPU %s."
      % (meta["gateway_cpus"], meta["load_cpus"]))
    w("- Each cell: %s s warm-up, then a %s s measurement window; %s run(s), up to %s more when noisy "
      "(noise threshold %.0f %% of a core); the median run by req/s is shown (quiet runs preferred)."
      % (meta["warmup_s"], meta["duration_s"], meta["repeats"], meta["max_retries"], 100 * meta["noise_threshold"]))
    w("- Auth: %s." % ("every gateway that has one checks a master key (`Authorization: Bearer …`)"
                        if meta.get("auth") else "off"))
    if bg:
        w("- Background load before the run (other processes, %s s probe): CPU %s busy %.0f %%, CPU %s busy %.0f %%, "
          "steal %.1f %%." % (bg.get("seconds"), meta["gateway_cpus"], 100 * bg.get("gw_core_busy", 0),
                               meta["load_cpus"], 100 * bg.get("load_core_busy", 0), 100 * bg.get("steal", 0)))
    cap = meta.get("mock_capacity")
    if cap:
        w("- Mock capacity (direct, chat, c=%d): **%s req/s** with mock and wrk sharing one core (other processes "
          "took %.0f %% of that core meanwhile); the mock spends %.1f µs of CPU per request, i.e. about **%s req/s "
          "per core** on its own, and wrk %.1f µs." % (cap["concurrency"], _num(cap["rps"]),
                                                      100 * cap.get("load_core_foreign", 0), cap["mock_us_per_req"],
                                                      _num(cap["mock_rps_per_core"]), cap.get("loadgen_us_per_req", 0)))
    w("")

    if chosen:
        wls = [x for x in meta["workloads"] if any(c["workload"] == x for c in chosen)]
        cmax = max(meta["concurrency"])
        w("## Summary at concurrency %d" % cmax)
        w("")
        w("req/s, and in brackets the p50 latency added over direct (ms). For streams the bracket is the TTFT added.")
        w("")
        w("| workload | " + " | ".join(targets) + " |")
        w("| --- |" + " ---: |" * len(targets))
        by = {_key(c): c for c in chosen}
        for wl in wls:
            row = []
            for t in targets:
                c = by.get((wl, cmax, t))
                if c is None:
                    f = next((x for x in failed if x["target"] == t and x["workload"] == wl), None)
                    row.append("failed" if f else "–")
                    continue
                d = direct.get((wl, cmax))
                if t == "direct" or d is None:
                    row.append(_num(c["rps"]))
                    continue
                if c.get("ttft_p50_ms") is not None and d.get("ttft_p50_ms") is not None:
                    add = c["ttft_p50_ms"] - d["ttft_p50_ms"]
                else:
                    add = (c["lat_p50_ms"] - d["lat_p50_ms"]) if c.get("lat_p50_ms") is not None else None
                row.append("%s (%s)" % (_num(c["rps"]), _delta(add)))
            w("| %s | %s |" % (wl, " | ".join(row)))
        w("")

        for wl in wls:
            rows = sorted([c for c in chosen if c["workload"] == wl],
                          key=lambda c: (c["concurrency"], targets.index(c["target"]) if c["target"] in targets else 99))
            stream = any(c.get("ttft_p50_ms") is not None for c in rows)
            w("## %s" % wl)
            w("")
            hdr = ["target", "c", "req/s", "p50 ms", "p95 ms", "p99 ms", "+p50 ms"]
            if stream:
                hdr += ["TTFT p50", "TTFT p99", "+TTFT p50"]
            hdr += ["gw CPU s/1k req", "gw CPU util", "gw peak RSS MiB", "errors", "upstream/req", "noise"]
            w("| " + " | ".join(hdr) + " |")
            w("| --- | ---: |" + " ---: |" * (len(hdr) - 2))
            for c in rows:
                d = direct.get((wl, c["concurrency"]))
                add = None if (d is None or c["target"] == "direct" or c.get("lat_p50_ms") is None) \
                    else c["lat_p50_ms"] - d["lat_p50_ms"]
                cells_ = [c["target"], str(c["concurrency"]), _num(c["rps"]), _ms(c.get("lat_p50_ms")),
                          _ms(c.get("lat_p95_ms")), _ms(c.get("lat_p99_ms")), _delta(add)]
                if stream:
                    tadd = None if (d is None or c["target"] == "direct" or c.get("ttft_p50_ms") is None
                                    or d.get("ttft_p50_ms") is None) else c["ttft_p50_ms"] - d["ttft_p50_ms"]
                    cells_ += [_ms(c.get("ttft_p50_ms")), _ms(c.get("ttft_p99_ms")), _delta(tadd)]
                nz = c["noise"]
                flag = "%.0f/%.0f %%" % (100 * nz["gw_core_foreign"], 100 * nz["load_core_foreign"])
                if c.get("noisy"):
                    flag += " **noisy**"
                if c.get("load_bound") and c["target"] != "direct":
                    flag += " load-bound"
                cells_ += [_num(c.get("gw_cpu_s_per_1k"), "{:.3f}"), _num(c.get("gw_cpu_util"), "{:.2f}"),
                           _num(c.get("gw_peak_rss_mib"), "{:.0f}"), str(c["errors"]),
                           _num(c.get("upstream_per_request"), "{:.2f}"), flag]
                w("| " + " | ".join(cells_) + " |")
            w("")

    if soaks:
        w("## Soak")
        w("")
        w("| target | seconds | c | req/s | p50 ms | p99 ms | errors | RSS start MiB | RSS end MiB | RSS max MiB | "
          "growth MiB | slope MiB/h | verdict |")
        w("| --- |" + " ---: |" * 11 + " --- |")
        for s in soaks:
            if s.get("status") != "ok":
                w("| %s | – | – | – | – | – | – | – | – | – | – | – | %s: %s |" % (s["target"], s.get("status"), _oneline(s.get("error", ""), 200)))
                continue
            w("| %s | %d | %d | %s | %s | %s | %d | %.0f | %.0f | %.0f | %+.1f | %+.1f | %s |" % (
                s["target"], s["seconds"], s["concurrency"], _num(s["rps"]), _ms(s["lat_p50_ms"]), _ms(s["lat_p99_ms"]),
                s["errors"], s["rss_start_mib"], s["rss_end_mib"], s["rss_max_mib"], s["rss_growth_mib"],
                s["rss_slope_mib_per_h"], "**flat**" if s["flat"] else "**growing**"))
        w("")
        for s in soaks:
            if s.get("rss_points"):
                w("- %s RSS over time (s: MiB): %s" % (s["target"], ", ".join(
                    "%d: %.0f" % (t, v) for t, v in s["rss_points"])))
        w("")

    notes = []
    for f in failed:
        what = " ".join(x for x in (f["target"], f.get("workload", ""),
                                    ("c=%s" % f["concurrency"]) if f.get("concurrency") else "", f["status"]) if x)
        notes.append("**%s**: %s" % (what, _oneline(f.get("error", ""))))
    for c in chosen:
        tag = "%s %s c=%d" % (c["target"], c["workload"], c["concurrency"])
        if c["errors"]:
            notes.append("%s: %d errors in the window, e.g. %s" % (tag, c["errors"], "; ".join(c.get("error_samples", [])[:2])))
        upr = c.get("upstream_per_request")
        extra = c.get("upstream_extra", 0)
        # up to 2 x concurrency extra calls are edge effects: requests in flight when
        # the window closed, and (for wrk) warm-up requests the gateway kept running
        # upstream after their client had gone
        if (c["target"] != "direct" and upr is not None and not 0.9 <= upr <= 1.1
                and abs(extra) > 2 * c["concurrency"] + 5):
            notes.append("%s: %.2f upstream calls per answered request (mock saw %s)" % (tag, upr, c.get("upstream")))
        if c["requests"] == 0:
            notes.append("%s: no request completed inside the window (%s s); use a longer --duration" % (tag, c.get("window_s")))
        tw = "%s %s" % (c["target"], c["workload"])
        if c.get("responses_done_marker"):
            notes.append("%s: the Responses stream ends with `data: [DONE]` (vLLM and OpenAI send none; tolerated)" % tw)
        if c.get("responses_without_event_lines"):
            notes.append("%s: Responses events come without `event:` lines (data only; tolerated)" % tw)
    for n in meta.get("notes", []):
        notes.append(n)
    if notes:
        w("## Failures and notes")
        w("")
        seen = set()
        for n in notes:
            if n not in seen:
                seen.add(n)
                w("- " + n)
        w("")
    w("## Reading this report")
    w("")
    w("`+p50` is the target's p50 minus direct's p50 for the same workload and concurrency in this run: what the "
      "gateway adds. `gw CPU s/1k req` is the CPU time of the gateway's whole process tree per 1000 requests "
      "(utime+stime from /proc); `gw CPU util` is that tree's CPU use over the window (1.00 = one core). "
      "`gw peak RSS` is the largest summed RSS of the tree sampled every 0.2 s. `noise` is the share of the gateway "
      "core / load core used by other processes during the window. `upstream/req` is the number of calls the mock "
      "received per answered request (1.00 expected). `load-bound`: the load core was saturated, so the figure is a "
      "lower bound on the gateway. More in bench/README.md.")
    w("")
    return "\n".join(out)
