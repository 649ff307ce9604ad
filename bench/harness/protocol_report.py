"""The `--protocol gomodel` report: our figures beside GoModel's published ones.

Aggregation is GoModel's (scripts/summarize.py of their benchmark): latency
figures are the median over trials, p99 with its min-max; the capacity peak
is the best sweep point and the knee the lowest concurrency within 5 % of it.
Everything here is pure (records in, text out) and unit-tested.
"""

import statistics

from . import published
from .protocol import VARIANTS
from .report import _ms, _num, _oneline

GOMODELS = ("gomodel", "gomodel-features")
PEERS = ("litellm", "portkey", "vllm-router")


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs):
    xs = [x for x in xs if x is not None]
    return (min(xs), max(xs)) if xs else (None, None)


def aggregate_latency(records):
    """{(target, variant, stream): figures over trials} from the "latency" records."""
    groups = {}
    for r in records:
        if r.get("type") == "protocol" and r.get("kind") == "latency":
            groups.setdefault((r["target"], r["variant"], r["stream"]), []).append(r)
    out = {}
    for key, recs in groups.items():
        ok = [r for r in recs if r.get("status") == "ok"]

        def field(name):
            return [r.get(name) for r in ok]
        upstream = {}
        for r in ok:
            for route, n in (r.get("upstream") or {}).items():
                upstream[route] = upstream.get(route, 0) + n
        out[key] = {
            "trials": len(recs), "trials_ok": len(ok),
            "failed": [r.get("error", "") for r in recs if r.get("status") != "ok"],
            "ok": sum(r["requests"] for r in ok), "errors": sum(r["errors"] for r in ok),
            "capped": any(r.get("capped") for r in ok),
            "rps": median(field("rps")), "p50": median(field("lat_p50_ms")), "p95": median(field("lat_p95_ms")),
            "p99": median(field("lat_p99_ms")), "p99_range": spread(field("lat_p99_ms")),
            "ttfd_p50": median(field("ttfd_p50_ms")), "ttft_p50": median(field("ttft_p50_ms")),
            "gw_cpu_s_per_1k": median(field("gw_cpu_s_per_1k")), "gw_minstr_per_req": median(field("gw_minstr_per_req")),
            "loadgen_cpu_s_per_1k": median(field("loadgen_cpu_s_per_1k")),
            "foreign": max((r["noise"]["gw_core_foreign"] for r in ok), default=None),
            "upstream": upstream, "alt_texts": sum(r.get("alt_texts") or 0 for r in ok),
            "error_samples": [e for r in ok for e in r.get("error_samples") or []][:2],
        }
    return out


def sweep_stats(curve):
    """GoModel's capacity figures of {concurrency: req/s}: the peak, where it is,
    and the knee (the lowest concurrency reaching 95 % of the peak)."""
    curve = {c: v for c, v in curve.items() if v is not None}
    if not curve:
        return {}
    peak_c = max(curve, key=curve.get)
    peak = curve[peak_c]
    knee = next(c for c in sorted(curve) if curve[c] >= 0.95 * peak)
    return {"peak_rps": peak, "peak_c": peak_c, "knee_c": knee, "curve": dict(sorted(curve.items()))}


def sweeps(records):
    """{target: sweep_stats} from the "sweep" records."""
    curves = {}
    for r in records:
        if r.get("type") == "protocol" and r.get("kind") == "sweep":
            curves.setdefault(r["target"], {})[r["concurrency"]] = r.get("rps") if r.get("status") == "ok" else None
    return {t: dict(sweep_stats(c), curve=dict(sorted(c.items()))) for t, c in curves.items()}


def cold_summary(runs):
    """Median, min, max and count of cold starts (first 200, seconds)."""
    xs = [r["first_200_s"] for r in runs if r.get("first_200_s") is not None]
    if not xs:
        return {}
    out = {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs), "n": len(xs)}
    listening = [r["all_listening_s"] for r in runs if r.get("all_listening_s") is not None]
    if listening:
        out["all_listening_median_s"] = statistics.median(listening)
    return out


def by_kind(records, kind):
    return {r["target"]: r for r in records if r.get("type") == "protocol" and r.get("kind") == kind}


def lead_targets():
    """Issue 18's bounds for gomodel: its chat and streamed-chat bounds as given,
    and for responses and messages "the same lead": GoModel's figure scaled by
    the ratio the chat bound asks for. {(variant, stream, figure): bound} (upper
    bounds, ms)."""
    chat, stream = published.LATENCY[("chat", False)]["gomodel"], published.LATENCY[("chat", True)]["gomodel"]
    p50_lead = published.TARGETS["chat_p50"][0] / chat["p50"]
    p99_lead = published.TARGETS["chat_p99"][0] / chat["p99"]
    ttft_lead = published.TARGETS["chat_stream_ttft"][0] / stream["ttft"]
    out = {}
    for variant in ("chat", "responses", "messages"):
        plain = published.LATENCY[(variant, False)]["gomodel"]
        out[(variant, False, "p50")] = round(plain["p50"] * p50_lead, 2)
        out[(variant, False, "p99")] = round(plain["p99"] * p99_lead, 2)
        out[(variant, True, "ttft")] = round(published.LATENCY[(variant, True)]["gomodel"]["ttft"] * ttft_lead, 2)
    return out


def _verdict(value, bound, kind="max"):
    if value is None or bound is None:
        return "–"
    return "yes" if (value <= bound if kind == "max" else value >= bound) else "**no**"


def headline_rows(lat, sw, cold, res, target="gomodel"):
    """(figure, GoModel published, ours, bound, met) rows for one of our gomodel targets."""
    bounds = lead_targets()
    rows = []
    for variant in ("chat", "responses", "messages"):
        pub = published.LATENCY[(variant, False)]["gomodel"]
        a = lat.get((target, variant, False), {})
        for fig in ("p50", "p99"):
            b = bounds[(variant, False, fig)]
            rows.append(("%s %s at c=10 (ms)" % (variant, fig), pub[fig], a.get(fig), ("≤ %.2f" % b), _verdict(a.get(fig), b)))
    for variant in ("chat", "responses", "messages"):
        # what the gateway adds: machine-independent-ish, GoModel quotes it ("overhead p50")
        pub = published.LATENCY[(variant, False)]
        a, d = lat.get((target, variant, False), {}), lat.get(("direct", variant, False), {})
        ours = a["p50"] - d["p50"] if a.get("p50") is not None and d.get("p50") is not None else None
        rows.append(("%s p50 added over direct (ms)" % variant, round(pub["gomodel"]["p50"] - pub["direct"]["p50"], 2),
                     ours, "–", "–"))
    for variant in ("chat", "responses", "messages"):
        pub = published.LATENCY[(variant, True)]["gomodel"]
        a = lat.get((target, variant, True), {})
        b = bounds[(variant, True, "ttft")]
        rows.append(("streamed %s, time to first token p50 (ms)" % variant, pub["ttft"], a.get("ttfd_p50"),
                     "≤ %.2f" % b, _verdict(a.get("ttfd_p50"), b)))
    s = sw.get(target, {})
    bound = published.TARGETS["peak_chat_rps"][0]
    rows.append(("peak chat req/s (sweep)", max(published.CAPACITY["gomodel"].values()), s.get("peak_rps"),
                 "≥ %s" % _num(bound), _verdict(s.get("peak_rps"), bound, "min")))
    c = cold.get(target, {})
    bound = published.TARGETS["cold_start_s"][0]
    rows.append(("cold start, median (s)", published.RESOURCES["gomodel"]["cold_start_s"], c.get("median_s"),
                 "≤ %.2f" % bound, _verdict(c.get("median_s"), bound)))
    r = res.get(target, {})
    each = [x for x in (r.get("gw_peak_rss_by_process_mib") or [r.get("gw_peak_rss_mib")]) if x is not None]
    per = max(each) if each else None
    bound = published.TARGETS["peak_rss_mib"][0]
    rows.append(("peak RSS under load, largest process (MiB)", published.RESOURCES["gomodel"]["peak_rss_mib"], per,
                 "≤ %.0f" % bound, _verdict(per, bound)))
    rows.append(("peak RSS under load, all processes (MiB)", published.RESOURCES["gomodel"]["peak_rss_mib"],
                 r.get("gw_peak_rss_mib"), "–", "–"))
    return rows


def peer_rows(lat, sw, cold, res, peer, ours="gomodel"):
    """How far ahead of `peer` GoModel published itself and how far ahead gomodel
    is here, per figure, and what GoModel would measure here if it kept its
    published lead over that peer. Rows: (figure, lead published, lead here,
    GoModel implied here, unit)."""
    pub_peer = peer
    rows = []

    def add(figure, pub_g, pub_p, our_g, our_p, higher_better=False, unit="ms"):
        if None in (pub_g, pub_p) or not pub_g or not pub_p:
            return
        lead_pub = (pub_g / pub_p) if higher_better else (pub_p / pub_g)
        lead_here = implied = None
        if our_g and our_p:
            lead_here = (our_g / our_p) if higher_better else (our_p / our_g)
            implied = (our_p * lead_pub) if higher_better else (our_p / lead_pub)
        rows.append((figure, lead_pub, lead_here, implied, unit))

    for variant in ("chat", "responses", "messages"):
        p = (published.LATENCY[(variant, False)].get(pub_peer) or {})
        add("%s p50" % variant, published.LATENCY[(variant, False)]["gomodel"]["p50"], p.get("p50"),
            lat.get((ours, variant, False), {}).get("p50"), lat.get((peer, variant, False), {}).get("p50"))
    for variant in ("chat", "responses", "messages"):
        p = (published.LATENCY[(variant, True)].get(pub_peer) or {})
        add("streamed %s TTFT p50" % variant, published.LATENCY[(variant, True)]["gomodel"]["ttft"], p.get("ttft"),
            lat.get((ours, variant, True), {}).get("ttfd_p50"), lat.get((peer, variant, True), {}).get("ttfd_p50"))
    pc = published.CAPACITY.get(pub_peer)
    add("peak chat req/s", max(published.CAPACITY["gomodel"].values()), max(pc.values()) if pc else None,
        sw.get(ours, {}).get("peak_rps"), sw.get(peer, {}).get("peak_rps"), higher_better=True, unit="req/s")
    pr = published.RESOURCES.get(pub_peer) or {}
    add("cold start", published.RESOURCES["gomodel"]["cold_start_s"], pr.get("cold_start_s"),
        cold.get(ours, {}).get("median_s"), cold.get(peer, {}).get("median_s"), unit="s")
    add("peak RSS under load", published.RESOURCES["gomodel"]["peak_rss_mib"], pr.get("peak_rss_mib"),
        res.get(ours, {}).get("gw_peak_rss_mib"), res.get(peer, {}).get("gw_peak_rss_mib"), unit="MiB")
    return rows


def _v(x, unit="ms"):
    if x is None:
        return "–"
    if unit == "req/s":
        return _num(x)
    if unit == "MiB":
        return "%.0f" % x if x >= 100 else "%.1f" % x
    if unit == "s":
        return "%.2f" % x if x < 10 else "%.1f" % x
    return _ms(x)


def _x(x):
    return "–" if x is None else ("%.1f×" % x if x >= 10 else "%.2f×" % x)


def render(meta, records):
    s = meta["protocol"]
    lat = aggregate_latency(records)
    sw = sweeps(records)
    cold = {t: dict(cold_summary(r["runs"]), runs=r["runs"]) for t, r in by_kind(records, "cold_start").items()}
    res = {t: r for t, r in by_kind(records, "resources").items() if r.get("status") == "ok"}
    trials = [r for r in records if r.get("type") == "protocol" and r.get("kind") == "trial"]
    targets = meta["targets"]
    m = meta["machine"]
    out = []
    w = out.append
    w("# gomodel under GoModel's benchmark method: %s%s" % (meta["date"], " (quick smoke run)" if meta.get("quick") else ""))
    w("")
    if meta.get("quick"):
        w("> **Smoke run** (`--quick`): %d request(s) per variant, %s trial(s), %s s sweep windows. It shows that the "
          "harness works end to end; the figures are not results." % (s["n"], s["trials"], s["sweep_s"]))
        w("")
    w("GoModel's published benchmark ([%s](https://github.com/ENTERPILOT/GoModel/tree/main/docs/"
      "2026-06-25_aws_gateway_benchmark)) is the bar; GoModel itself cannot be built here (no Go toolchain), so "
      "its figures are quoted, and LiteLLM and Portkey, measured in both, show how the two machines and "
      "harnesses compare." % published.SOURCE)
    w("")
    w("## Machines")
    w("")
    w("| | this run | GoModel's run |")
    w("| --- | --- | --- |")
    w("| machine | %s, %s logical CPUs%s, %s GiB; %s / %s | %s |" % (
        m["cpu_model"], m["cpus"], " (virtualised)" if m.get("hypervisor") else "", m["mem_gib"], m["os"], m["kernel"],
        published.MACHINE))
    w("| CPUs used | %s (everything on them: gateway, mock, load generator, harness) | both vCPUs, shared the "
      "same way |" % meta["protocol_cpus"])
    w("| load generator | wrk %s (non-streamed, %s thread(s)); Node %s `bench/streamload.mjs` (streamed; it checks "
      "every stream after the window, so its CPU column leaves the checks out) | their Go `loadgen` |"
      % (m["wrk"], meta.get("wrk_threads", "?"), m["node"]))
    w("| mock | `bench/mock/mock.mjs`: one Node process, vLLM 0.32's wire format, 20 tokens | their Go mock (OpenAI "
      "and Anthropic shapes, 31 tokens) |")
    for t in targets:
        w("| %s | %s | |" % (t, meta["versions"].get(t, "?")))
    w("| started | %s (run id `%s`): `%s` | |" % (meta["started"], meta["run_id"], meta["command"]))
    w("")
    w("## Method")
    w("")
    w("- **Placement**: no pinning split. Gateway, mock, load generator and harness may all run on CPUs %s, at "
      "normal priority, as on GoModel's box. gomodel runs with `--workers %d` (one process per CPU), LiteLLM with "
      "`--num_workers %d` (GoModel ran it at one worker per core), Portkey and vllm-router as one process each."
      % (meta["protocol_cpus"], meta["protocol_workers"], meta["litellm_workers"]))
    w("- **Latency** (pass A): %d trial(s); each trial starts every target afresh, in a random order (seed %s), "
      "sends %d chat requests of warm-up, then per variant one checked pre-flight request, %d requests of warm-up "
      "and **%d requests at concurrency %d**, every answer checked (status, full text, usage, end of stream); a "
      "variant stops at %s s (GoModel's cap; then marked *capped*). Figures are the median over trials; p99 with "
      "its min–max." % (s["trials"], s["seed"], s["warmup"], s["variant_warmup"], s["n"], s["concurrency"],
                          s["max_wall_s"]))
    w("- **Capacity** (pass B): direct first, then the gateways in a random order: %d cold starts each (**exec to "
      "the first 200 on a chat**: from just before the process is spawned until a chat request, sent every 10 ms "
      "on a new connection, is answered 200 with the mock's text; median shown), then %d chat requests of warm-up, "
      "chat for %s s at each concurrency of %s (time-boxed, wrk), then %s s of chat at c=%d for CPU, throughput "
      "and **peak RSS** (every process of the gateway sampled every 0.2 s: the sum, and each process)." % (
          s["cold_starts"], s["warmup"], s["sweep_s"], ", ".join(str(c) for c in s["sweep"]), s["resource_s"],
          s["concurrency"]))
    w("- Variants: chat (`/v1/chat/completions`), responses (`/v1/responses`), messages (`/v1/messages`, "
      "`anthropic-version: 2023-06-01`), each plain and streamed (chat streams ask for the usage chunk). "
      "**TTFT** is GoModel's: the time to the first `data:` line; the time to the first content token is beside "
      "it.")
    w("")

    g_here = [t for t in GOMODELS if t in targets]
    for g in g_here:
        w("## %s against GoModel's published figures" % g)
        w("")
        w("| figure | GoModel (published) | %s here | issue 18's bound | met |" % g)
        w("| --- | ---: | ---: | ---: | --- |")
        for fig, pub, ours, bound, ok in headline_rows(lat, sw, cold, res, g):
            unit = "req/s" if "req/s" in fig else "MiB" if "MiB" in fig else "s" if "(s)" in fig else "ms"
            w("| %s | %s | %s | %s | %s |" % (fig, _v(pub, unit), _v(ours, unit), bound, ok))
        w("")
        w("Bounds for responses and messages are \"the same lead\": GoModel's figure times the ratio the chat bound "
          "asks for (p50 ×%.2f, p99 ×%.2f, TTFT ×%.2f)." % (
              published.TARGETS["chat_p50"][0] / published.LATENCY[("chat", False)]["gomodel"]["p50"],
              published.TARGETS["chat_p99"][0] / published.LATENCY[("chat", False)]["gomodel"]["p99"],
              published.TARGETS["chat_stream_ttft"][0] / published.LATENCY[("chat", True)]["gomodel"]["ttft"]))
        w("")

    peers = [p for p in ("litellm", "portkey") if p in targets]
    if peers and "gomodel" in targets:
        w("## The peers as a yardstick between the two machines")
        w("")
        w("GoModel's lead over each peer as published, gomodel's lead over the same peer here, and the figure "
          "GoModel would show here if it kept its published lead (our peer figure scaled by it). Leads are "
          "peer/ours for times and sizes, ours/peer for req/s.")
        w("")
        w("| peer | figure | GoModel's lead (published) | gomodel's lead (here) | GoModel implied here | gomodel here |")
        w("| --- | --- | ---: | ---: | ---: | ---: |")
        for p in peers:
            for fig, lead_pub, lead_here, implied, unit in peer_rows(lat, sw, cold, res, p):
                ours = _ours_figure(fig, lat, sw, cold, res)
                w("| %s | %s | %s | %s | %s | %s |" % (p, fig, _x(lead_pub), _x(lead_here), _v(implied, unit),
                                                        _v(ours, unit)))
        w("")

    w("## Latency at concurrency %d (median of %d trial(s))" % (s["concurrency"], s["trials"]))
    w("")
    w("| target | variant | ok / errors | req/s | p50 ms | p95 ms | p99 ms (min–max) | TTFT p50 ms | first token "
      "p50 ms | +p50 over direct | gw CPU s/1k | gw Minstr/req | load gen CPU s/1k | published p50 / p99 (TTFT) |")
    w("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in targets:
        for variant, stream, _ in VARIANTS:
            a = lat.get((t, variant, stream))
            if a is None:
                continue
            name = "%s%s" % (variant, " stream" if stream else "")
            pub = published.LATENCY[(variant, stream)].get(_pub_name(t)) if _pub_name(t) else None
            pubtxt = "–" if not pub else ("%s / %s" % (_ms(pub["p50"]), _ms(pub["p99"])) if not stream else
                                          "%s (%s)" % (_ms(pub["p50"]), _ms(pub["ttft"])))
            if _pub_name(t) and pub is None and (variant, stream) in published.LATENCY \
                    and _pub_name(t) in published.LATENCY[(variant, stream)]:
                pubtxt = "failed"
            if not a["trials_ok"]:
                w("| %s | %s | failed: %s |%s %s |" % (t, name, _oneline(a["failed"][0] if a["failed"] else "", 160),
                                                        " |" * 10, pubtxt))
                continue
            d = lat.get(("direct", variant, stream))
            add = None if t == "direct" or not d or d["p50"] is None or a["p50"] is None else a["p50"] - d["p50"]
            lo, hi = a["p99_range"]
            p99 = _ms(a["p99"]) + ("" if lo is None or lo == hi else " (%s–%s)" % (_ms(lo), _ms(hi)))
            errs = "%d / %s" % (a["ok"], ("**%d**" % a["errors"]) if a["errors"] else "0")
            if a["capped"]:
                errs += " capped"
            w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                t, name, errs, _num(a["rps"]), _ms(a["p50"]), _ms(a["p95"]), p99, _ms(a["ttfd_p50"]),
                _ms(a["ttft_p50"]), "–" if add is None else ("+" if add >= 0 else "−") + _ms(abs(add)),
                _num(a["gw_cpu_s_per_1k"], "{:.3f}"), _num(a["gw_minstr_per_req"], "{:.2f}"),
                _num(a["loadgen_cpu_s_per_1k"], "{:.3f}"), pubtxt))
    w("")

    if sw:
        concs = sorted({c for st in sw.values() for c in st.get("curve", {})})
        w("## Capacity: chat req/s by concurrency (%s s windows)" % s["sweep_s"])
        w("")
        w("| target | " + " | ".join("c=%d" % c for c in concs) + " | peak | knee c | published c=1 / 16 / 128 (peak) |")
        w("| --- |" + " ---: |" * (len(concs) + 3))
        for t in targets:
            st = sw.get(t)
            if st is None:
                continue
            pc = published.CAPACITY.get(_pub_name(t) or "")
            ptxt = "–" if not pc else "%s (%s)" % (" / ".join(_num(pc.get(c)) for c in (1, 16, 128)),
                                                     _num(max(pc.values())))
            w("| %s | %s | %s | %s | %s |" % (t, " | ".join(_num(st["curve"].get(c)) for c in concs),
                                              _num(st.get("peak_rps")), st.get("knee_c", "–"), ptxt))
        w("")

    if cold or res:
        w("## Start and footprint")
        w("")
        w("| target | cold start median s (min–max, n) | all processes taking connections s | idle RSS MiB | peak RSS under "
          "load MiB: all (each process) | peak RSS, latency pass MiB | avg CPU under load % | req/s in that window "
          "| req/s per CPU % | published: cold s / peak MiB / CPU % / req/s |")
        w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for t in targets:
            if t == "direct":
                continue
            c, r = cold.get(t, {}), res.get(t, {})
            lat_peak = max((x.get("peak_rss_mib") or 0 for x in trials if x["target"] == t and x.get("status") == "ok"),
                           default=None)
            cpu = 100 * r["gw_cpu_util"] if r.get("gw_cpu_util") is not None else None
            pr = published.RESOURCES.get(_pub_name(t) or "")
            w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                t, "–" if not c.get("n") else "%.3f (%.3f–%.3f, %d)" % (c["median_s"], c["min_s"], c["max_s"], c["n"]),
                _num(c.get("all_listening_median_s"), "{:.3f}"), _num(r.get("idle_rss_mib"), "{:.1f}"),
                "–" if not r else "%s%s" % (_num(r.get("gw_peak_rss_mib"), "{:.1f}"), "" if not r.get(
                    "gw_peak_rss_by_process_mib") else " (%s)" % " + ".join("%.1f" % x for x in r["gw_peak_rss_by_process_mib"])),
                _num(lat_peak or None, "{:.1f}"), _num(cpu, "{:.0f}"), _num(r.get("rps")),
                _num(r["rps"] / cpu if r.get("rps") and cpu else None, "{:.1f}"),
                "–" if not pr else "%.2f / %.0f / %.0f / %s" % (pr["cold_start_s"], pr["peak_rss_mib"], pr["cpu_pct"],
                                                               _num(pr["load_rps"]))))
        w("")

    notes = _notes(records, lat, meta)
    if notes:
        w("## Failures and notes")
        w("")
        for n in notes:
            w("- " + n)
        w("")
    w("## Reading this report")
    w("")
    w("Differences from GoModel's method, all on this side: one Node process as the mock and as the streaming "
      "client (theirs: Go), wrk for the non-streamed variants (its percentiles are nearest-rank over 1 µs buckets; "
      "GoModel's loadgen interpolates; with %d samples the two differ by less than the gap between neighbouring "
      "samples); each wrk thread sends its share of the requests (so the last few run at lower concurrency); no "
      "Docker (processes on the host, so cold start has no container start in it, and RSS is each process's "
      "resident set, where `docker stats` reports the container's memory); GoModel's streamed total latency ends "
      "at the last `data:` line, ours when the body ends. `gw CPU s/1k` is the CPU time of the gateway's whole "
      "process tree per 1000 answered requests; `gw Minstr/req` its user-space instructions per request (perf). "
      "`foreign` (notes) is the share of the CPUs that processes other than ours used meanwhile." % s["n"])
    w("")
    return "\n".join(out)


def _pub_name(target):
    return {"direct": "direct", "gomodel": "gomodel", "litellm": "litellm", "portkey": "portkey"}.get(target)


def _ours_figure(fig, lat, sw, cold, res, ours="gomodel"):
    if fig == "peak chat req/s":
        return sw.get(ours, {}).get("peak_rps")
    if fig == "cold start":
        return cold.get(ours, {}).get("median_s")
    if fig == "peak RSS under load":
        return res.get(ours, {}).get("gw_peak_rss_mib")
    if fig.startswith("streamed "):
        return lat.get((ours, fig.split()[1], True), {}).get("ttfd_p50")
    return lat.get((ours, fig.split()[0], False), {}).get("p50")


def _notes(records, lat, meta):
    notes = []
    for (t, variant, stream), a in sorted(lat.items()):
        name = "%s %s%s" % (t, variant, " stream" if stream else "")
        for e in a["failed"]:
            notes.append("**%s failed**: %s" % (name, _oneline(e, 300)))
        if a["errors"]:
            notes.append("%s: %d errors, e.g. %s" % (name, a["errors"], "; ".join(a["error_samples"]) or "?"))
        if a["capped"]:
            notes.append("%s: stopped at the %s s cap before %d requests (GoModel's cap; the figures are those of "
                         "the requests answered)" % (name, meta["protocol"]["max_wall_s"], meta["protocol"]["n"]))
        if variant == "messages" and t != "direct" and a["upstream"]:
            wanted = "messages_stream" if stream else "messages"
            other = {k: v for k, v in a["upstream"].items() if k != wanted and not k.startswith("models")}
            if other and a["upstream"].get(wanted, 0) < sum(other.values()):
                notes.append("%s: answered through the upstream's %s (the mock saw %s), not its `/v1/messages`" % (
                    name, ", ".join(sorted(other)), a["upstream"]))
        if a["foreign"] is not None and a["foreign"] > meta["noise_threshold"]:
            notes.append("%s: other processes used up to %.0f %% of the CPUs during a trial (**noisy**)" % (
                name, 100 * a["foreign"]))
    for r in records:
        if r.get("type") == "protocol" and r.get("status") == "failed" and r.get("kind") in (
                "trial", "capacity", "sweep", "resources"):
            notes.append("**%s %s failed**: %s" % (r["target"], r["kind"], _oneline(r.get("error", ""), 300)))
    for n in meta.get("notes", []):
        notes.append(n)
    return notes
