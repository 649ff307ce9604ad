"""The overhead benchmark's pure parts (bench/harness): GoModel's aggregation of the
`--protocol gomodel` run, its report beside GoModel's published figures, the
everything-on-against-bare and vllm-router comparisons of the matrix report,
the answer checks and the protocol's settings, and which interpreter a Python target's venv was made from.

Nothing here starts a process or opens a socket: records in, figures and text out.
"""

import argparse
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from harness import protocol, protocol_report, published, report  # noqa: E402
from harness.targets import made_from_this_python  # noqa: E402
from harness.workloads import TOKENS_TAIL, WORKLOADS, has_marker  # noqa: E402


def _lat(target, variant, stream, trial, p50, p99, **extra):
    rec = {"type": "protocol", "kind": "latency", "target": target, "variant": variant, "stream": stream,
           "trial": trial, "status": "ok", "requests": 8000, "errors": 0, "rps": 5000.0, "lat_p50_ms": p50,
           "lat_p95_ms": p99 / 2, "lat_p99_ms": p99, "gw_cpu_s_per_1k": 0.2, "noise": {"gw_core_foreign": 0.01},
           "upstream": {"chat": 8000}}
    rec.update(extra)
    return rec


def test_sweep_stats_peak_and_knee_as_gomodel_reads_them():
    stats = protocol_report.sweep_stats({1: 2745, 16: 4928, 128: 4567})
    assert stats["peak_rps"] == 4928 and stats["peak_c"] == 16
    assert stats["knee_c"] == 16  # c=1 is below 95 % of the peak
    assert protocol_report.sweep_stats({1: 960, 16: 1000, 128: 990})["knee_c"] == 1  # 960 >= 950
    assert protocol_report.sweep_stats({1: None}) == {}


def test_cold_summary_is_the_median_of_the_starts():
    runs = [{"first_200_s": 0.9}, {"first_200_s": 0.5, "all_listening_s": 1.2}, {"first_200_s": 0.7,
                                                                                 "all_listening_s": 1.4}]
    c = protocol_report.cold_summary(runs)
    assert (c["median_s"], c["min_s"], c["max_s"], c["n"]) == (0.7, 0.5, 0.9, 3)
    assert abs(c["all_listening_median_s"] - 1.3) < 1e-9
    assert protocol_report.cold_summary([]) == {}


def test_latency_is_the_median_over_trials_with_the_p99_spread():
    recs = [_lat("gomodel", "chat", False, 1, 1.0, 4.0), _lat("gomodel", "chat", False, 2, 2.0, 6.0),
            _lat("gomodel", "chat", False, 3, 3.0, 5.0, errors=2, capped=True),
            {"type": "protocol", "kind": "latency", "target": "gomodel", "variant": "chat", "stream": False,
             "trial": 4, "status": "failed", "error": "pre-flight: status 404"}]
    a = protocol_report.aggregate_latency(recs)[("gomodel", "chat", False)]
    assert a["trials"] == 4 and a["trials_ok"] == 3
    assert a["p50"] == 2.0 and a["p99"] == 5.0 and a["p99_range"] == (4.0, 6.0)
    assert a["ok"] == 24000 and a["errors"] == 2 and a["capped"]
    assert a["failed"] == ["pre-flight: status 404"]
    assert a["upstream"] == {"chat": 24000}


def test_the_issue_bounds_and_the_same_lead_on_the_other_variants():
    bounds = protocol_report.lead_targets()
    assert bounds[("chat", False, "p50")] == 1.0 and bounds[("chat", False, "p99")] == 3.5
    assert bounds[("chat", True, "ttft")] == 2.0
    # responses: GoModel's 2.01 / 7.28 scaled by the chat bounds' ratios
    assert bounds[("responses", False, "p50")] == round(2.01 * 1.0 / 1.81, 2)
    assert bounds[("responses", False, "p99")] == round(7.28 * 3.5 / 6.88, 2)


def test_headline_rows_say_which_bound_is_met():
    lat = protocol_report.aggregate_latency([_lat("gomodel", "chat", False, 1, 0.8, 4.0),
                                             _lat("direct", "chat", False, 1, 0.3, 1.0)])
    rows = {r[0]: r for r in protocol_report.headline_rows(
        lat, {"gomodel": {"peak_rps": 10000}}, {"gomodel": {"median_s": 0.45}},
        {"gomodel": {"gw_peak_rss_mib": 70.0, "gw_peak_rss_by_process_mib": [36.0, 34.0]}})}
    assert rows["chat p50 at c=10 (ms)"][1:] == (1.81, 0.8, "≤ 1.00", "yes")
    assert rows["chat p99 at c=10 (ms)"][4] == "**no**"
    assert rows["peak chat req/s (sweep)"][2:] == (10000, "≥ 9,856", "yes")
    assert rows["cold start, median (s)"][4] == "**no**"
    assert rows["peak RSS under load, largest process (MiB)"][2] == 36.0
    assert rows["peak RSS under load, largest process (MiB)"][4] == "yes"
    assert rows["responses p50 at c=10 (ms)"][2] is None and rows["responses p50 at c=10 (ms)"][4] == "–"
    assert rows["chat p50 added over direct (ms)"][1:3] == (1.58, 0.5)


def test_peer_rows_compare_leads_and_imply_gomodel_here():
    lat = protocol_report.aggregate_latency([_lat("gomodel", "chat", False, 1, 1.0, 4.0),
                                             _lat("litellm", "chat", False, 1, 40.0, 60.0)])
    sw = {"gomodel": {"peak_rps": 6000}, "litellm": {"peak_rps": 300}}
    rows = {r[0]: r for r in protocol_report.peer_rows(lat, sw, {}, {}, "litellm")}
    fig, lead_pub, lead_here, implied, unit = rows["chat p50"]
    assert lead_pub == 30.56 / 1.81 and lead_here == 40.0
    assert implied == 40.0 / (30.56 / 1.81) and unit == "ms"
    _, lead_pub, lead_here, implied, unit = rows["peak chat req/s"]
    assert lead_pub == 4928 / 324 and lead_here == 20.0 and implied == 300 * 4928 / 324 and unit == "req/s"
    # Portkey published no messages figure: no row
    assert all(r[0] != "messages p50" for r in protocol_report.peer_rows(lat, sw, {}, {}, "portkey"))


def _meta(targets):
    return {"date": "2026-12-01", "quick": False, "protocol": dict(protocol.DEFAULTS, seed=7), "targets": targets,
            "machine": {"cpu_model": "AMD EPYC", "cpus": 2, "hypervisor": True, "mem_gib": 23.5, "os": "Debian",
                        "kernel": "6", "python": "3.11", "node": "v20", "wrk": "4.1"},
            "versions": {t: "?" for t in targets}, "protocol_cpus": "0,1", "protocol_workers": 2,
            "litellm_workers": 2, "wrk_threads": 2, "started": "x", "run_id": "r", "command": "bash bench/run.sh",
            "noise_threshold": 0.1, "notes": []}


def test_protocol_report_renders_every_section():
    recs = [_lat(t, v, s, 1, p, 4 * p, ttfd_p50_ms=2.0 if s else None)
            for t, p in (("direct", 0.2), ("gomodel", 1.0), ("portkey", 9.0)) for v, s, _ in protocol.VARIANTS
            if not (t == "portkey" and v == "messages")]
    recs.append({"type": "protocol", "kind": "latency", "target": "portkey", "variant": "messages", "stream": False,
                 "trial": 1, "status": "failed", "error": "pre-flight: status 404: no route"})
    recs += [{"type": "protocol", "kind": "sweep", "target": t, "concurrency": c, "status": "ok", "rps": r * c ** 0.1}
             for t, r in (("direct", 20000), ("gomodel", 5000), ("portkey", 900)) for c in (1, 16, 128)]
    recs.append({"type": "protocol", "kind": "cold_start", "target": "gomodel", "status": "ok",
                 "runs": [{"first_200_s": 0.4}, {"first_200_s": 0.5}]})
    recs.append({"type": "protocol", "kind": "resources", "target": "gomodel", "status": "ok", "rps": 5000,
                 "gw_cpu_util": 1.5, "gw_peak_rss_mib": 80.0, "gw_peak_rss_by_process_mib": [41.0, 39.0],
                 "idle_rss_mib": 75.0})
    text = protocol_report.render(_meta(["direct", "gomodel", "portkey"]), recs)
    for heading in ("## Machines", "## Method", "## gomodel against GoModel's published figures",
                    "## The peers as a yardstick", "## Latency at concurrency 10", "## Capacity",
                    "## Start and footprint", "## Failures and notes"):
        assert heading in text
    assert published.MACHINE in text
    assert "**portkey messages failed**: pre-flight: status 404" in text
    assert "| gomodel | chat | 8000 / 0 | 5,000 | 1.00 |" in text
    assert "80.0 (41.0 + 39.0)" in text


def _cell(target, wl, conc, rps, cpu, p50=1.0, util=1.0, minstr=None, sys=None):
    return {"target": target, "workload": wl, "concurrency": conc, "rps": rps, "gw_cpu_s_per_1k": cpu,
            "lat_p50_ms": p50, "gw_cpu_util": util, "gw_minstr_per_req": minstr, "gw_sys_s_per_1k": sys,
            "chosen": True}


def test_features_rows_against_bare():
    chosen = [_cell("direct", "chat", 1, 9000, None, p50=0.10), _cell("gomodel", "chat", 1, 2000, 0.30, p50=0.35),
              _cell("gomodel-features", "chat", 1, 1900, 0.32, p50=0.50),
              _cell("gomodel", "chat", 64, 4000, 0.25, minstr=1.0, sys=0.05),
              _cell("gomodel-features", "chat", 64, 3600, 0.28, minstr=1.2, sys=0.06),
              _cell("portkey", "chat", 64, 1400, 0.7), _cell("gomodel", "stream", 64, 3000, 0.33),
              _cell("gomodel-features", "stream", 64, 2900, 0.35)]
    rows = {r[0].strip(): r for r in report.features_rows(chosen)}
    fig = rows["CPU s per 1000 chat requests, c=64"]
    assert fig[1:3] == ("0.250", "0.280") and abs(fig[3] - 1.12) < 1e-9 and fig[5] == "**no**"
    assert rows["CPU s per 1000 streams, c=64"][5] == "yes"
    assert abs(rows["user-space Minstr per request, c=64"][3] - 1.2) < 1e-9
    kernel = rows["of which in the kernel, c=64"]
    assert kernel[1:3] == ("0.050", "0.060") and abs(kernel[3] - 1.2) < 1e-9
    assert "of which in the kernel, c=1" not in rows  # (not measured there)
    added = rows["chat p50 added over direct at c=1 (ms)"]
    assert added[1:3] == ("0.25", "0.40") and added[5] == "yes"
    portkey = rows["chat req/s at c=64 over Portkey's (1,400)"]
    assert portkey[2] == "2.57×" and portkey[5] == "yes"
    assert report.features_rows([c for c in chosen if c["target"] != "gomodel-features"]) == []


def test_key_rows_against_the_master_key():
    chosen = [_cell("gomodel", "chat", 64, 5000, 0.200), _cell("gomodel-key", "chat", 64, 4600, 0.215),
              _cell("gomodel", "stream", 64, 3000, 0.300), _cell("gomodel-key", "stream", 64, 2600, 0.350),
              _cell("gomodel-key", "embeddings", 64, 1, 1)]
    rows = report.key_rows(chosen)
    assert [r[0] for r in rows] == ["chat req/s, c=64", "  CPU s per 1000, c=64",
                                    "stream req/s, c=64", "  CPU s per 1000, c=64"]
    chat, stream = rows[:2], rows[2:]
    assert chat[0][1:3] == ("5,000", "4,600") and abs(chat[0][3] - 0.92) < 1e-9 and chat[0][5] == "yes"
    assert abs(chat[1][3] - 1.075) < 1e-9 and chat[1][5] == "yes"
    assert stream[0][5] == "**no**" and stream[1][5] == "**no**"
    assert report.key_rows([c for c in chosen if c["target"] != "gomodel-key"]) == []


def test_key_rows_paired_by_round():
    def run(target, rnd, rps, cpu, noisy=False):
        return dict(_cell(target, "chat", 64, rps, cpu), round=rnd, noisy=noisy, status="ok", chosen=False)

    cells = [run("gomodel", 1, 5000, 0.20), run("gomodel-key", 1, 4600, 0.22),
             run("gomodel", 2, 3000, 0.30), run("gomodel-key", 2, 2900, 0.31),
             run("gomodel-key", 2, 9000, 0.10, noisy=True),  # a noisy retry: the quiet run counts
             run("gomodel", 3, 4000, 0.25), run("gomodel-key", 3, 3800, 0.26)]
    assert report.paired_ratios(cells, "gomodel-key", "gomodel", "chat", 64, "gw_cpu_s_per_1k") == \
        pytest.approx([1.1, 0.31 / 0.30, 1.04])
    chosen = [_cell("gomodel", "chat", 64, 4000, 0.25), _cell("gomodel-key", "chat", 64, 3800, 0.26)]
    rows = report.key_rows(chosen, cells)
    assert [r[0] for r in rows] == ["chat req/s, c=64", "    the same, paired by round (median of 3)",
                                    "  CPU s per 1000, c=64", "    the same, paired by round (median of 3)"]
    assert rows[3][3] == pytest.approx(1.04) and rows[3][5] == "yes"
    assert rows[1][3] == pytest.approx(0.95) and rows[1][5] == "yes"
    assert report.key_rows(chosen) == [rows[0], rows[2]]  # one round: no paired rows


def test_side_by_side_takes_two_gateways_and_says_so_in_the_key_section():
    import bench

    a = bench.parse_args(["--targets", "gomodel-key,gomodel", "--side-by-side", "--rounds", "4"])
    assert a.side_by_side and a.targets == ["gomodel", "gomodel-key"] and a.rounds == 4
    for wrong in (["--targets", "gomodel"], ["--targets", "direct,gomodel"], ["--targets", "gomodel,gomodel-key",
                                                                              "--soak", "60"]):
        with pytest.raises(SystemExit):
            bench.parse_args(wrong + ["--side-by-side"])
    chosen = [_cell("gomodel", "chat", 64, 1400, 0.35), _cell("gomodel-key", "chat", 64, 1300, 0.37)]
    out = []
    report.key_section(out.append, {"side_by_side": True}, chosen, chosen)
    assert out[0].startswith("## A managed key") and any(line.startswith("Measured side by side") for line in out)
    out = []
    report.key_section(out.append, {}, chosen, chosen)
    assert out and not any(line.startswith("Measured side by side") for line in out)


def test_router_rows_ratio_per_core():
    chosen = [_cell("gomodel-features", "chat", 64, 3600, 0.28, util=1.0),
              _cell("vllm-router", "chat", 64, 16000, 0.06, util=0.8), _cell("gomodel", "embeddings", 64, 1, 1)]
    (row,) = report.router_rows(chosen)
    assert row["target"] == "gomodel-features" and abs(row["rps_ratio"] - 0.225) < 1e-9
    assert abs(row["cpu_ratio"] - 0.28 / 0.06) < 1e-9
    assert abs(row["per_core_ratio"] - 3600 / 20000) < 1e-9


def test_answer_checks_match_wrk_lua():
    body = '{"id":"x","type": "message","content":[{"type":"text","text":"mockchat%s"}],"stop_reason":"end_turn"}' \
        % TOKENS_TAIL
    assert all(has_marker(body, m) for m in WORKLOADS["messages"].markers)
    chat = '{"object":"chat.completion","choices":[{"message":{"content":"mockchat%s"}}],"stop_reason":null}' \
        % TOKENS_TAIL
    assert not all(has_marker(chat, m) for m in WORKLOADS["messages"].markers)
    assert has_marker("abc", "b") and not has_marker("abc", "~^b")


def test_protocol_settings_quick_and_overrides():
    names = ["protocol_" + k for k in protocol.DEFAULTS]
    args = argparse.Namespace(quick=True, seed=3, **{n: None for n in names})
    s = protocol.settings(args)
    assert s["n"] == protocol.QUICK["n"] and s["concurrency"] == 10 and s["seed"] == 3
    args.protocol_n, args.quick = 123, False
    s = protocol.settings(args)
    assert s["n"] == 123 and s["trials"] == published.METHOD["trials"] and s["max_wall_s"] == 10
    assert protocol.DEFAULTS["sweep"] == published.METHOD["sweep"]


def test_a_venv_made_from_another_interpreter_is_made_again(tmp_path):
    """LiteLLM's venv is reused only when made from the interpreter the harness runs on (the run's one CPython)."""
    this = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    for name, executable in (("same", this), ("other", "/opt/some-other/bin/python3.11")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pyvenv.cfg").write_text(
            "home = %s\ninclude-system-site-packages = false\nversion = 3.11.2\nexecutable = %s\n"
            % (os.path.dirname(executable), executable))
    assert made_from_this_python(str(tmp_path / "same"))
    assert not made_from_this_python(str(tmp_path / "other"))
    assert not made_from_this_python(str(tmp_path / "missing"))
