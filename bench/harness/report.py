"""The markdown report: machine, versions, setup, then one table per workload
(or the soak, or the workers scaling run)."""

import statistics

ORDER = ["direct", "gomodel", "gomodel-key", "gomodel-pool", "gomodel-features", "vllm-router", "litellm", "portkey"]


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


def _minstr(v):
    """Millions of instructions per request: 3 significant digits or so."""
    if v is None:
        return "–"
    return "%.0f" % v if v >= 100 else "%.1f" % v if v >= 10 else "%.2f" % v if v >= 1 else "%.3f" % v


def _key(c):
    return (c["workload"], c["concurrency"], c["target"])


def render(meta, cells, soaks, scaling=()):
    chosen = [c for c in cells if c.get("chosen")]
    failed = [c for c in cells if c.get("status") in ("failed", "skipped")]
    direct = {(c["workload"], c["concurrency"]): c for c in chosen if c["target"] == "direct"}
    targets = [t for t in ORDER if t in meta["targets"]] + [t for t in meta["targets"] if t not in ORDER]
    m = meta["machine"]
    out = []
    w = out.append
    title = "# gomodel overhead benchmark: %s" % meta["date"]
    if meta.get("scaling_only"):
        title += " (workers scaling)"
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
    if meta.get("scaling_only"):
        w("Workers scaling run only (`--scaling %d`); the matrix was not run." % meta["scaling"]["max_workers"])
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
    sc = meta.get("scaling")
    if sc:
        _scaling_setup(w, meta, sc)
    else:
        w("- Gateway under test pinned to CPU %s; mock upstream, load generator and harness pinned to CPU %s."
          % (meta["gateway_cpus"], meta["load_cpus"]))
        w("- Each cell: %s s warm-up, then a %s s measurement window; %s run(s), up to %s more when noisy "
          "(noise threshold %.0f %% of a core); the median run by req/s is shown (quiet runs preferred)."
          % (meta["warmup_s"], meta["duration_s"], meta["repeats"], meta["max_retries"], 100 * meta["noise_threshold"]))
        if meta.get("rounds", 1) > 1:
            w("- %d rounds: the whole list of targets ran %d times in turn (every other round in the reverse order), "
              "each time a fresh start; each cell shows the median run by req/s over all rounds (quiet runs "
              "preferred)." % (meta["rounds"], meta["rounds"]))
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
                    f = next((x for x in failed if x["target"] == t and x.get("workload", wl) == wl), None)
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

        frows = features_rows(chosen)
        if frows:
            w("## Everything on (`gomodel-features`) against bare (`gomodel`)")
            w("")
            w("Bare: master key, one upstream, access log off (metrics and usage ledger at their defaults, on). "
              "Everything on: one provider of %s replicas (`load` routing), requests made with a managed key that "
              "has a rate limit, a concurrency limit, a model allowlist and a daily token budget, all far above the "
              "load (created through `POST /admin/api/v1/auth-keys` before measuring), usage ledger, Prometheus "
              "metrics and the access log on. Bounds are issue 18's." % meta.get("pool_replicas", "?"))
            w("")
            _bound_table(w, ("bare", "everything on", "on / bare"), frows)
            for name, check in sorted((meta.get("features_check") or {}).items()):
                w("- %s, read before it stopped: %s usage records for the managed key (written every 5 s, so the "
                  "last seconds may be missing), `gomodel_requests_total` %s, %s access log lines." % (
                      name, _num(check.get("usage_records")), _num(check.get("metrics_requests_total")),
                      _num(check.get("access_log_lines"))))
            if meta.get("features_check"):
                w("")
        key_section(w, meta, chosen, cells)
        vrows = router_rows(chosen)
        if vrows:
            w("## Against vllm-router")
            w("")
            w("vllm-router (Rust) `--policy %s` over the same mock(s): no keys, no usage, no metrics of ours; the floor "
              "of what a proxy in front of vLLM costs. Same core, same load. Ratios are gomodel's over "
              "vllm-router's; issue 18 asks for at least half its chat throughput per core with everything on."
              % meta.get("vllm_router_policy", "round_robin"))
            w("")
            w("| gomodel target | workload | c | req/s | vllm-router req/s | req/s ratio | CPU s/1k | vllm-router CPU s/1k "
              "| CPU/1k ratio | req/s per core ratio |")
            w("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            for r in vrows:
                w("| %s | %s | %d | %s | %s | %s | %s | %s | %s | %s |" % (
                    r["target"], r["workload"], r["concurrency"], _num(r["rps"]), _num(r["router_rps"]),
                    _ratio(r["rps_ratio"]), _num(r["cpu"], "{:.3f}"), _num(r["router_cpu"], "{:.3f}"),
                    _ratio(r["cpu_ratio"]), _ratio(r["per_core_ratio"])))
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
            hdr += ["gw CPU s/1k req", "gw Minstr/req", "gw CPU util", "gw peak RSS MiB", "errors", "upstream/req",
                    "noise"]
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
                cells_ += [_num(c.get("gw_cpu_s_per_1k"), "{:.3f}"), _minstr(c.get("gw_minstr_per_req")),
                           _num(c.get("gw_cpu_util"), "{:.2f}"),
                           _num(c.get("gw_peak_rss_mib"), "{:.0f}"), str(c["errors"]),
                           _num(c.get("upstream_per_request"), "{:.2f}"), flag]
                w("| " + " | ".join(cells_) + " |")
            w("")

    if soaks:
        w("## Soak")
        w("")
        w("| target | seconds | c | req/s | p50 ms | p99 ms | errors | gw Minstr/req | RSS start MiB | RSS end MiB | "
          "RSS max MiB | growth MiB | slope MiB/h | verdict |")
        w("| --- |" + " ---: |" * 12 + " --- |")
        for s in soaks:
            if s.get("status") != "ok":
                w("| %s | – | – | – | – | – | – | – | – | – | – | – | – | %s: %s |" % (
                    s["target"], s.get("status"), _oneline(s.get("error", ""), 200)))
                continue
            w("| %s | %d | %d | %s | %s | %s | %d | %s | %.0f | %.0f | %.0f | %+.1f | %+.1f | %s |" % (
                s["target"], s["seconds"], s["concurrency"], _num(s["rps"]), _ms(s["lat_p50_ms"]), _ms(s["lat_p99_ms"]),
                s["errors"], _minstr(s.get("gw_minstr_per_req")), s["rss_start_mib"], s["rss_end_mib"],
                s["rss_max_mib"], s["rss_growth_mib"],
                s["rss_slope_mib_per_h"], "**flat**" if s["flat"] else "**growing**"))
        w("")
        for s in soaks:
            if s.get("rss_points"):
                w("- %s RSS over time (s: MiB): %s" % (s["target"], ", ".join(
                    "%d: %.0f" % (t, v) for t, v in s["rss_points"])))
        w("")

    summ = next((r for r in scaling if r.get("kind") == "summary"), None)
    if sc:
        _scaling_section(w, meta, sc, [r for r in scaling if r.get("kind") == "measurement"], summ)

    notes = []
    for r in scaling:
        if r.get("kind") != "measurement":
            continue
        if r.get("status") != "ok":
            where = ("round %s, %s worker(s)" % (r["round"], r["workers"])) if r.get("round") else r["target"]
            notes.append("**scaling %s %s**: %s" % (where, r.get("status"), _oneline(r.get("error", ""))))
        elif r["errors"]:
            notes.append("**scaling round %s, %s worker(s), attempt %s: %d errors in the window**%s, e.g. %s" % (
                r["round"], r["workers"], r["attempt"], r["errors"], "" if r["chosen"] else " (a noisy attempt, "
                "not the one shown)", "; ".join(r.get("error_samples", [])[:2]) or r.get("error_detail")))
        elif r["requests"] == 0:
            notes.append("scaling round %s, %s worker(s): no request completed inside the window" % (r["round"], r["workers"]))
    for r in [c for c in chosen if c["target"] != "direct"] + [s for s in soaks if s.get("status") == "ok"] + \
            [r for r in scaling if r.get("kind") == "measurement" and r.get("status") == "ok"]:
        if r.get("gw_minstr_per_req") is None and r.get("perf_error") and not (meta.get("perf") or {}).get("error"):
            where = "scaling round %s, %s worker(s)" % (r["round"], r["workers"]) if r.get("type") == "scaling" else \
                "%s soak" % r["target"] if r.get("type") == "soak" else \
                "%s %s c=%s" % (r["target"], r["workload"], r["concurrency"])
            notes.append("%s: no instruction count (%s)" % (where, _oneline(r["perf_error"], 200)))
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
    if sc:
        w("`ratio` is the N-worker req/s over the 1-worker req/s of the same round; the medians are taken over "
          "rounds. `gw CPU` is the CPU time of the gateway's whole process tree (primary and workers, utime+stime "
          "from /proc) over the window, in cores, with the split over its processes in brackets (primary first); `req/s per gw core` is req/s over that, so it shows whether each "
          "worker does as much per core as the single process. `gw Minstr/req` is the tree's user-space "
          "instructions per answered request, in millions (`perf stat -e instructions:u`; steady where CPU speed "
          "is not, kernel work not included). `mock+wrk CPU` is what mock, wrk and harness used, in "
          "cores: where they share the gateway's cores this is CPU the workers could not have. `foreign` is the share "
          "of the cores involved that other processes used (over all shared cores together when the load shares the "
          "gateway's cores); a measurement above the noise threshold is **noisy** and repeated up to "
          "`--max-retries` times. Every answer is checked (status 200 and the full text); `errors` counts the "
          "rest. More in bench/README.md.")
        w("")
        return "\n".join(out)
    w("`+p50` is the target's p50 minus direct's p50 for the same workload and concurrency in this run: what the "
      "gateway adds. `gw CPU s/1k req` is the CPU time of the gateway's whole process tree per 1000 requests "
      "(utime+stime from /proc); `gw Minstr/req` is the user-space instructions the tree executed in the window "
      "(`perf stat -e instructions:u`) per answered request, in millions: unlike CPU seconds it does not move with "
      "the host's CPU speed, but it leaves out the kernel's share (sockets, network). "
      "`gw CPU util` is that tree's CPU use over the window (1.00 = one core). "
      "`gw peak RSS` is the largest summed RSS of the tree sampled every 0.2 s. `noise` is the share of the gateway "
      "core / load core used by other processes during the window. `upstream/req` is the number of calls the mock "
      "received per answered request (1.00 expected). `load-bound`: the load core was saturated, so the figure is a "
      "lower bound on the gateway. More in bench/README.md.")
    w("")
    return "\n".join(out)


def _cell(by, target, wl, conc):
    return by.get((target, wl, conc))


def _div(a, b):
    return a / b if a is not None and b else None


def features_rows(chosen):
    """Everything on against bare, from the chosen cells: (figure, bare, on,
    on/bare, bound, met) rows, or [] when the run lacks one of the two."""
    by = {(c["target"], c["workload"], c["concurrency"]): c for c in chosen}
    concs = sorted({c["concurrency"] for c in chosen})
    if not any(t == "gomodel-features" for t, _, _ in by) or not any(t == "gomodel" for t, _, _ in by):
        return []
    rows = []

    def met(ok):
        return "–" if ok is None else "yes" if ok else "**no**"
    for wl, label in (("chat", "CPU s per 1000 chat requests"), ("stream", "CPU s per 1000 streams"),
                      ("responses", "CPU s per 1000 responses"), ("responses_stream", "CPU s per 1000 Responses streams")):
        for conc in concs:
            b, f = _cell(by, "gomodel", wl, conc), _cell(by, "gomodel-features", wl, conc)
            if not b or not f:
                continue
            bc, fc = b.get("gw_cpu_s_per_1k"), f.get("gw_cpu_s_per_1k")
            ratio = _div(fc, bc)
            rows.append(("%s, c=%d" % (label, conc), _num(bc, "{:.3f}"), _num(fc, "{:.3f}"), ratio,
                         "≤ 1.10×" if wl in ("chat", "stream") else "–",
                         met(None if ratio is None or wl not in ("chat", "stream") else ratio <= 1.10)))
            bs, fs = b.get("gw_sys_s_per_1k"), f.get("gw_sys_s_per_1k")
            if bs is not None and fs is not None:
                rows.append(("  of which in the kernel, c=%d" % conc, _num(bs, "{:.3f}"), _num(fs, "{:.3f}"),
                             _div(fs, bs), "–", "–"))
            bi, fi = b.get("gw_minstr_per_req"), f.get("gw_minstr_per_req")
            if bi and fi:
                rows.append(("  user-space Minstr per request, c=%d" % conc, _minstr(bi), _minstr(fi), fi / bi, "–", "–"))
    d = _cell(by, "direct", "chat", 1)
    b, f = _cell(by, "gomodel", "chat", 1), _cell(by, "gomodel-features", "chat", 1)
    if d and b and f and None not in (d.get("lat_p50_ms"), b.get("lat_p50_ms"), f.get("lat_p50_ms")):
        ba, fa = b["lat_p50_ms"] - d["lat_p50_ms"], f["lat_p50_ms"] - d["lat_p50_ms"]
        rows.append(("chat p50 added over direct at c=1 (ms)", _ms(ba), _ms(fa), _div(fa, ba), "< 0.50 ms",
                     met(fa < 0.5)))
    cmax = max(concs)
    b, f, pk = (_cell(by, t, "chat", cmax) for t in ("gomodel", "gomodel-features", "portkey"))
    if b and f:
        rows.append(("chat req/s at c=%d" % cmax, _num(b["rps"]), _num(f["rps"]), _div(f["rps"], b["rps"]), "–", "–"))
    if f and pk:
        ratio = _div(f["rps"], pk["rps"])
        rows.append(("chat req/s at c=%d over Portkey's (%s)" % (cmax, _num(pk["rps"])),
                     _ratio(_div(b["rps"], pk["rps"])) if b else "–", _ratio(ratio), None, "≥ 2.50×",
                     met(None if ratio is None else ratio >= 2.5)))
    return rows


def _bound_table(w, columns, rows):
    """Write C{rows} (figure, a, b, b/a, bound, met) as a table whose middle columns are C{columns}."""
    w("| figure | %s | %s | %s | bound | met |" % columns)
    w("| --- | ---: | ---: | ---: | ---: | --- |")
    for fig, a, b, ratio, bound, met in rows:
        w("| %s | %s | %s | %s | %s | %s |" % (fig, a, b, _ratio(ratio), bound, met))
    w("")


def key_section(w, meta, chosen, cells):
    """Write the managed key's section (L{key_rows}) with C{w}, when the run has both keys' cells."""
    krows = key_rows(chosen, cells)
    if not krows:
        return
    w("## A managed key (`gomodel-key`) against the master key (`gomodel`)")
    w("")
    w("Both bare (one upstream, access log off); `gomodel-key`'s requests are made with a managed key "
      "that has a rate limit (requests and tokens a minute) and a daily token budget, far above the load. "
      "Bound: issue 14's (the chat figures within 10 %).")
    if meta.get("side_by_side"):
        w("")
        w("Measured side by side (`--side-by-side`): both gateways at once on the same CPU, each under its "
          "own copy of the cell's load, so each had about half the CPU (req/s are not solo figures) and "
          "both met the same host drift; the rows paired by round are the measure.")
    w("")
    _bound_table(w, ("master key", "managed key", "managed / master"), krows)


def key_rows(chosen, cells=()):
    """The managed key against the master key, from the chosen cells: (figure, master, managed,
    managed/master, bound, met) rows for chat and stream, or [] when the run lacks one of the two.

    With C{cells} of several rounds, each figure gets a second row: the median over the rounds of
    each round's managed / master (the two ran one after the other), steadier than the ratio of
    two medians when the machine's speed drifts between rounds."""
    by = {(c["target"], c["workload"], c["concurrency"]): c for c in chosen}
    rows = []
    for (t, wl, conc), k in sorted(by.items()):
        m = by.get(("gomodel", wl, conc))
        if t != "gomodel-key" or m is None or wl not in ("chat", "stream"):
            continue
        for field, figure, fmt, bound, fits in (
                ("rps", "%s req/s, c=%d" % (wl, conc), "{:,.0f}", "≥ 0.90×", lambda r: r >= 0.9),
                ("gw_cpu_s_per_1k", "  CPU s per 1000, c=%d" % conc, "{:.3f}", "≤ 1.10×", lambda r: r <= 1.1)):
            ratio = _div(k.get(field), m.get(field))
            rows.append((figure, _num(m.get(field), fmt), _num(k.get(field), fmt), ratio, bound,
                         "–" if ratio is None else "yes" if fits(ratio) else "**no**"))
            paired = paired_ratios(cells, "gomodel-key", "gomodel", wl, conc, field)
            if len(paired) > 1:
                ratio = statistics.median(paired)
                rows.append(("    the same, paired by round (median of %d)" % len(paired), "–", "–", ratio, bound,
                             "yes" if fits(ratio) else "**no**"))
    return rows


def paired_ratios(cells, target, base, workload, concurrency, field) -> list:
    """C{target}'s C{field} over C{base}'s in each round both were measured in (of a round's runs,
    the quiet ones, and of those the median by req/s)."""
    runs = {}
    for c in cells:
        if c.get("workload") == workload and c.get("concurrency") == concurrency and c.get("round") \
                and c.get("status", "ok") == "ok" and c.get(field) is not None and c.get("target") in (target, base):
            runs.setdefault((c["target"], c["round"]), []).append(c)
    ratios = []
    for (t, rnd), mine in sorted(runs.items()):
        other = runs.get((base, rnd))
        if t != target or not other:
            continue
        ratio = _div(pick(mine)[field], pick(other)[field])
        if ratio is not None:
            ratios.append(ratio)
    return ratios


def pick(runs):
    """The median run by req/s, among quiet runs when there are any."""
    quiet = [r for r in runs if not r["noisy"]]
    pool = quiet or runs
    order = sorted(pool, key=lambda r: r["rps"])
    return order[(len(order) - 1) // 2]


def router_rows(chosen):
    """gomodel (bare and everything on) against vllm-router, same workload and
    concurrency, for the chat workloads: dicts with the ratios."""
    by = {(c["target"], c["workload"], c["concurrency"]): c for c in chosen}
    out = []
    for (t, wl, conc), c in sorted(by.items()):
        r = by.get(("vllm-router", wl, conc))
        if t not in ("gomodel", "gomodel-features") or r is None or wl not in ("chat", "stream"):
            continue
        per = _div(c["rps"], c.get("gw_cpu_util"))
        rper = _div(r["rps"], r.get("gw_cpu_util"))
        out.append({"target": t, "workload": wl, "concurrency": conc, "rps": c["rps"], "router_rps": r["rps"],
                    "rps_ratio": _div(c["rps"], r["rps"]), "cpu": c.get("gw_cpu_s_per_1k"),
                    "router_cpu": r.get("gw_cpu_s_per_1k"), "cpu_ratio": _div(c.get("gw_cpu_s_per_1k"),
                                                                            r.get("gw_cpu_s_per_1k")),
                    "per_core_ratio": _div(per, rper)})
    return out


def _cpus_text(spec):
    return ("CPU %s" if "," not in spec and "-" not in spec else "CPUs %s") % spec


def _scaling_setup(w, meta, sc):
    n = sc["max_workers"]
    one, many = sc["placements"]
    shared = set(_parse(many["gateway_cpus"])) & set(_parse(many["load_cpus"]))
    w("- **1 worker**: gomodel (one process) pinned to %s; mock upstream, wrk (one thread per load CPU) and harness "
      "pinned to %s." % (_cpus_text(one["gateway_cpus"]), _cpus_text(one["load_cpus"])))
    w("- **%d workers** (`--workers %d`: the primary and %d worker process%s sharing the port with SO_REUSEPORT): "
      "gomodel pinned to %s; mock, wrk and harness pinned to %s%s." % (
          n, n, n - 1, "" if n == 2 else "es", _cpus_text(many["gateway_cpus"]), _cpus_text(many["load_cpus"]),
          " as well" if shared else ""))
    if shared:
        w("- In the %d-worker case the load shares the gateway's cores: this machine has %d CPU(s) available (%s), "
          "so there is no spare core for mock and wrk once the gateway has %d. What they use (`mock+wrk CPU` below) "
          "is taken from the workers, so the %d-worker figure is a lower bound on %d workers with %d cores of their "
          "own, and the ratio understates the scaling a little." % (
              n, len(sc.get("cpus_available", [])), ",".join(str(c) for c in sc.get("cpus_available", [])), n, n, n, n))
        if sc.get("load_priority", "normal") == "idle":
            w("- Mock and wrk run at idle priority (`chrt --idle 0`, `--scaling-load-priority idle`, the default) in both "
              "cases: they get the CPU time the gateway leaves, as they would on other machines, and a wake-up of "
              "theirs does not preempt a worker. With `normal` they compete with the workers as equals and take "
              "a larger share of the two cores (`mock+wrk CPU` below).")
        else:
            w("- Mock and wrk run at normal priority (`--scaling-load-priority normal`): they compete with the "
              "workers as equals for the shared cores.")
    w("- chat (non-streaming) through gomodel at c=%d; each measurement starts a fresh mock and a fresh gateway "
      "(all %d processes taking connections and ready), sends one checked pre-flight request, then %s s of warm-up and a %s s window; the "
      "gateway and mock are stopped by PID afterwards. %d round(s), each 1 worker then %d workers; a noisy "
      "measurement is repeated up to %s more time(s) (noise threshold %.0f %% of the cores)." % (
          sc["concurrency"], n, meta["warmup_s"], meta["duration_s"], meta["repeats"], n, meta["max_retries"],
          100 * meta["noise_threshold"]))


def _parse(spec):
    out = set()
    for part in str(spec).split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out.update(range(int(a), int(b) + 1))
        elif part:
            out.add(int(part))
    return out


def _ratio(v):
    return "–" if v is None else "%.2f×" % v


def _scaling_section(w, meta, sc, meas, summ):
    n = sc["max_workers"]
    one, many = sc["placements"]
    w("## Workers scaling")
    w("")
    w("gomodel chat req/s at c=%d: 1 worker (gateway on %s, load on %s) against %d workers (gateway on %s, load "
      "on %s)." % (sc["concurrency"], _cpus_text(one["gateway_cpus"]), _cpus_text(one["load_cpus"]), n,
                   _cpus_text(many["gateway_cpus"]), _cpus_text(many["load_cpus"])))
    w("")
    if summ is None:
        w("No measurement completed.")
        w("")
        return
    w("| round | 1 worker req/s | %d workers req/s | ratio | errors (1 / %d) | noisy |" % (n, n))
    w("| ---: | ---: | ---: | ---: | ---: | --- |")
    for r in summ["rounds"]:
        def side(key):
            if r["status_" + key] != "ok":
                return r["status_" + key]
            return _num(r["rps_" + key])
        errs = "%s / %s" % ("–" if r["errors_1"] is None else r["errors_1"], "–" if r["errors_n"] is None else r["errors_n"])
        if (r["errors_1"] or 0) + (r["errors_n"] or 0):
            errs = "**%s**" % errs
        noisy = ", ".join(x for x, k in (("1 worker", "noisy_1"), ("%d workers" % n, "noisy_n")) if r[k]) or "no"
        w("| %d | %s | %s | %s | %s | %s |" % (r["round"], side("1"), side("n"), _ratio(r["ratio"]), errs, noisy))
    w("")
    w("- **Median ratio: %s** over %d round(s) (ideal %d.00×; %s of ideal)." % (
        _ratio(summ["median_ratio"]), summ["rounds_measured"], n,
        "–" if summ["efficiency"] is None else "%.0f %%" % (100 * summ["efficiency"])))
    w("- Median 1 worker: **%s req/s**; median %d workers: **%s req/s** (ratio of the medians %s)." % (
        _num(summ["median_rps_1"]), n, _num(summ["median_rps_n"]), _ratio(summ["ratio_of_medians"])))
    if summ["rounds_with_errors"] or summ["errors_all_attempts"] or summ["failed_measurements"]:
        w("- **Not clean**: %d round(s) with errors, %d errors over all measurements, %d failed measurement(s); "
          "see the notes." % (summ["rounds_with_errors"], summ["errors_all_attempts"], summ["failed_measurements"]))
    else:
        w("- Every answer in every window was checked and correct (0 errors).")
    if summ["rounds_noisy"]:
        w("- %d round(s) include a **noisy** measurement (other processes above the threshold even after retries): "
          "read those ratios with care." % summ["rounds_noisy"])
    w("")
    w("### Measurements")
    w("")
    w("Every measurement, retries included; `shown` marks the one each round uses.")
    w("")
    w("| round | workers | gw CPUs | load CPUs | req/s | p50 ms | p99 ms | errors | gw CPU (cores) | req/s per gw core | "
      "gw CPU s/1k req | gw Minstr/req | gw peak RSS MiB | mock+wrk CPU (cores) | upstream/req | foreign | shown |")
    w("| ---: | ---: | --- | --- |" + " ---: |" * 12 + " --- |")
    for r in meas:
        if r.get("status") != "ok":
            w("| %s | %s | %s | %s | %s |" % (r.get("round", "–"), r.get("workers", "–"), r.get("gateway_cpus", "–"),
                                               r.get("load_cpus", "–"), "%s: %s" % (r.get("status"), _oneline(r.get("error", ""), 150)))
                                               + " |" * 12)
            continue
        nz = r["noise"]
        util = r.get("gw_cpu_util")
        per_core = r["rps"] / util if util else None
        foreign = "%.0f %%" % (100 * nz["gw_core_foreign"]) if nz.get("shared_cpus") else \
            "%.0f/%.0f %%" % (100 * nz["gw_core_foreign"], 100 * nz["load_core_foreign"])
        if r.get("noisy"):
            foreign += " **noisy**"
        w("| %d | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["round"], r["workers"], r["gateway_cpus"], r["load_cpus"], _num(r["rps"]), _ms(r.get("lat_p50_ms")),
            _ms(r.get("lat_p99_ms")), ("**%d**" % r["errors"]) if r["errors"] else "0", _num(util, "{:.2f}") + (
                " (%s)" % " + ".join("%.2f" % x for x in r["gw_cpu_util_by_process"])
                if r.get("gw_cpu_util_by_process") else ""),
            _num(per_core), _num(r.get("gw_cpu_s_per_1k"), "{:.3f}"), _minstr(r.get("gw_minstr_per_req")),
            _num(r.get("gw_peak_rss_mib"), "{:.0f}"),
            _num(r.get("load_cpu_util"), "{:.2f}"), _num(r.get("upstream_per_request"), "{:.2f}"), foreign,
            "yes" if r.get("chosen") else ""))
    w("")
