"""Load signals from vLLM 0.32: the /metrics page and the endpoint-load-metrics header.

The fixtures are real: C{vllm_metrics_0.32.txt} was fetched from a running
vLLM 0.32 server (Llama-3.1-8B-Instruct, one engine) while 12 requests were
running, and the header samples below were captured from the same server.
C{vllm_metrics_0.32_2engines.txt} is that page with every C{engine="0"}
sample duplicated as C{engine="1"} right after it (the layout vLLM uses for
data-parallel engines), the five load series given their own values.
"""

import json
import math
import os

import pytest

from gomodel.routing.vllm_metrics import UNKNOWN, LoadSample, parse_load_header, parse_metrics

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _fixture(name):
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


REAL = _fixture("vllm_metrics_0.32.txt")
TWO_ENGINES = _fixture("vllm_metrics_0.32_2engines.txt")

# What the server reported in that page (grep of the fixture).
REAL_SAMPLE = LoadSample(
    waiting=0.0,
    running=12.0,
    kv_cache_usage=0.0014650225857648635,
    generation_tokens=507.0,
    start_time=1.79613745614e09,
)

# Real endpoint-load-metrics values from vLLM 0.32 (chat/completions,
# non-streaming, request header endpoint-load-metrics-format: json / text).
REAL_HEADER_JSON_IDLE = b'JSON {"named_metrics": {"num_requests_waiting": 0.0, "kv_cache_usage_perc": 0.0}}'
REAL_HEADER_TEXT_IDLE = b"TEXT named_metrics.num_requests_waiting=0.0, named_metrics.kv_cache_usage_perc=0.0"
REAL_HEADER_JSON_LOAD = (b'JSON {"named_metrics": {"num_requests_waiting": 0.0, '
                         b'"kv_cache_usage_perc": 0.0014650225857648635}}')
REAL_HEADER_TEXT_LOAD = (b"TEXT named_metrics.num_requests_waiting=0.0, "
                         b"named_metrics.kv_cache_usage_perc=0.0014650225857648635")

M = b'model_name="meta-llama/Llama-3.1-8B-Instruct"'


def _drop(page, name):
    """C{page} without the sample lines of series C{name} (HELP/TYPE kept)."""
    return b"\n".join(l for l in page.split(b"\n")
                      if not (l.startswith(name + b"{") or l.startswith(name + b" ")))


# -- the real page ------------------------------------------------------------


def test_real_page_matches_what_the_server_reported():
    assert parse_metrics(REAL) == REAL_SAMPLE


def test_real_page_is_a_real_vllm_0_32_page():
    # Guards the fixture itself: the traps the parser must avoid are on it.
    assert b"vllm:num_requests_waiting_by_reason{" in REAL
    assert b"vllm:generation_tokens_created{" in REAL
    assert b"Sum of all reasons equals vllm:num_requests_waiting." in REAL
    assert b"vllm:gpu_cache_usage_perc" not in REAL


def test_two_engines_are_summed_and_kv_usage_is_the_max():
    s = parse_metrics(TWO_ENGINES)
    assert s.waiting == 0.0 + 5.0
    assert s.running == 12.0 + 3.0
    assert s.generation_tokens == 507.0 + 1.5e3  # engine 1 written as 1.5e+03
    assert s.kv_cache_usage == 0.25  # max(0.0014650225857648635, 0.25)
    assert s.start_time == REAL_SAMPLE.start_time


def test_accepts_bytearray_and_memoryview():
    assert parse_metrics(bytearray(REAL)) == REAL_SAMPLE
    assert parse_metrics(memoryview(REAL)) == REAL_SAMPLE


# -- unknown is None, never 0 -----------------------------------------------------


@pytest.mark.parametrize("name,field", [
    (b"vllm:num_requests_waiting", "waiting"),
    (b"vllm:num_requests_running", "running"),
    (b"vllm:kv_cache_usage_perc", "kv_cache_usage"),
    (b"vllm:generation_tokens_total", "generation_tokens"),
    (b"process_start_time_seconds", "start_time"),
])
def test_a_missing_series_is_none_and_the_others_are_unaffected(name, field):
    s = parse_metrics(_drop(REAL, name))
    assert getattr(s, field) is None
    assert s._replace(**{field: getattr(REAL_SAMPLE, field)}) == REAL_SAMPLE


@pytest.mark.parametrize("page", [
    b"",
    b"\n",
    b"# HELP vllm:num_requests_waiting Number of requests waiting.\n# TYPE vllm:num_requests_waiting gauge\n",
    b"not prometheus at all",
    b"<html><body>404</body></html>",
])
def test_pages_without_the_series_are_all_unknown(page):
    assert parse_metrics(page) == UNKNOWN
    assert parse_metrics(page) == LoadSample(None, None, None, None, None)


def test_a_zero_is_a_zero_not_unknown():
    s = parse_metrics(b"vllm:num_requests_waiting 0\nvllm:num_requests_running 0.0\n")
    assert s.waiting == 0.0 and s.running == 0.0


# -- KV usage fallback ----------------------------------------------------------


def test_gpu_cache_usage_perc_stands_in_for_kv_cache_usage_perc():
    old = REAL.replace(b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc")
    assert parse_metrics(old) == REAL_SAMPLE


def test_kv_cache_usage_perc_wins_when_both_are_present():
    page = (b"vllm:gpu_cache_usage_perc{engine=\"0\"} 0.9\n"
            b"vllm:kv_cache_usage_perc{engine=\"0\"} 0.3\n")
    assert parse_metrics(page).kv_cache_usage == 0.3


def test_the_fallback_also_applies_when_kv_cache_usage_perc_has_no_usable_sample():
    page = (b"vllm:kv_cache_usage_perc{engine=\"0\"} NaN\n"
            b"vllm:gpu_cache_usage_perc{engine=\"0\"} 0.7\n")
    assert parse_metrics(page).kv_cache_usage == 0.7


def test_two_engines_fallback_takes_the_max():
    old = TWO_ENGINES.replace(b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc")
    assert parse_metrics(old).kv_cache_usage == 0.25


# -- look-alikes: _created, _by_reason, HELP / TYPE --------------------------------


def test_created_series_and_help_type_lines_are_not_the_counter():
    page = (
        b"# HELP vllm:generation_tokens_created vllm:generation_tokens_total 99\n"
        b"# TYPE vllm:generation_tokens_created gauge\n"
        b"vllm:generation_tokens_created{engine=\"0\"," + M + b"} 1.7961374848981133e+09\n"
        b"# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
        b"# TYPE vllm:generation_tokens_total counter\n"
        b"vllm:generation_tokens_total{engine=\"0\"," + M + b"} 42.0\n"
        b"vllm:generation_tokens_total_created{engine=\"0\"," + M + b"} 1.7e+09\n"
        b"vllm:generation_tokens_created{engine=\"1\"," + M + b"} 1.8e+09\n"
    )
    assert parse_metrics(page).generation_tokens == 42.0


def test_only_created_means_unknown():
    page = b"vllm:generation_tokens_created{engine=\"0\"} 1.7961374848981133e+09\n"
    assert parse_metrics(page).generation_tokens is None


def test_a_longer_family_right_after_the_group_is_not_summed_in():
    # No HELP/TYPE between them: the look-alike lines follow directly.
    page = (
        b"vllm:num_requests_waiting{engine=\"0\"} 2\n"
        b"vllm:num_requests_waiting_by_reason{engine=\"0\",reason=\"capacity\"} 100\n"
        b"vllm:num_requests_waitingX 1000\n"
        b"vllm:num_requests_waiting{engine=\"1\"} 3\n"
    )
    assert parse_metrics(page).waiting == 5.0


def test_help_text_that_names_a_series_is_not_a_sample():
    page = (
        b"# HELP vllm:x Sum equals\nvllm:num_requests_running_not 7\n"
        b"#vllm:num_requests_running 8\n"
        b" vllm:num_requests_running 9\n"
    )
    assert parse_metrics(page).running is None


# -- value and line formats ------------------------------------------------------


@pytest.mark.parametrize("text,value", [
    (b"3", 3.0),
    (b"3.0", 3.0),
    (b"1.5e+03", 1500.0),
    (b"1.5E3", 1500.0),
    (b"2.5e-01", 0.25),
    (b"-0.0", 0.0),
    (b"1.79613745614e+09", 1796137456.14),
])
def test_number_formats(text, value):
    assert parse_metrics(b"vllm:num_requests_running{engine=\"0\"} " + text + b"\n").running == value


@pytest.mark.parametrize("bad", [b"NaN", b"nan", b"+Inf", b"-Inf", b"Inf"])
def test_non_finite_values_carry_no_load_and_are_ignored(bad):
    lone = b"vllm:kv_cache_usage_perc{engine=\"0\"} " + bad + b"\n"
    assert parse_metrics(lone).kv_cache_usage is None
    with_good = lone + b"vllm:kv_cache_usage_perc{engine=\"1\"} 0.5\n"
    assert parse_metrics(with_good).kv_cache_usage == 0.5


def test_timestamps_labels_with_spaces_and_braces_crlf_and_no_final_newline():
    page = (
        b"vllm:num_requests_waiting{engine=\"0\",model_name=\"a } b {c\"} 4 1712345678000\r\n"
        b"vllm:num_requests_waiting{engine=\"1\",model_name=\"x\\\"y\"} 1\r\n"
        b"vllm:num_requests_waiting\t2\r\n"
        b"process_start_time_seconds 1.7e+09"
    )
    s = parse_metrics(page)
    assert s.waiting == 7.0
    assert s.start_time == 1.7e9


def test_series_on_the_first_line_of_the_page():
    assert parse_metrics(b"vllm:num_requests_running 5\n").running == 5.0
    assert parse_metrics(b"vllm:num_requests_running 5").running == 5.0


def test_malformed_lines_are_ignored():
    page = (
        b"vllm:num_requests_running{engine=\"0\"\n"            # labels never closed
        b"vllm:num_requests_running{engine=\"1\"}\n"           # no value
        b"vllm:num_requests_running{engine=\"2\"} \n"          # blank value
        b"vllm:num_requests_running{engine=\"3\"} twelve\n"    # not a number
        b"vllm:num_requests_running{engine=\"4\"} 1,5\n"       # not a number
        b"vllm:num_requests_running{engine=\"5\"} 6\n"         # the good one
        b"vllm:num_requests_running\n"                         # bare name
        b"vllm:num_requests_running"                           # truncated page
    )
    assert parse_metrics(page).running == 6.0


def test_only_malformed_lines_means_unknown():
    page = b"vllm:num_requests_running{engine=\"0\"} oops\nvllm:num_requests_running{\n"
    assert parse_metrics(page).running is None


def test_a_truncated_real_page_keeps_what_it_has():
    cut = REAL[:REAL.index(b"vllm:generation_tokens_total{") + 40]
    s = parse_metrics(cut)
    assert s.generation_tokens is None
    assert s._replace(generation_tokens=507.0) == REAL_SAMPLE


# -- the endpoint-load-metrics header --------------------------------------------


def test_real_json_header():
    assert parse_load_header(REAL_HEADER_JSON_IDLE) == LoadSample(waiting=0.0, kv_cache_usage=0.0)
    assert parse_load_header(REAL_HEADER_JSON_LOAD, "json") == LoadSample(
        waiting=0.0, kv_cache_usage=0.0014650225857648635)


def test_real_text_header():
    assert parse_load_header(REAL_HEADER_TEXT_IDLE, "text") == LoadSample(waiting=0.0, kv_cache_usage=0.0)
    assert parse_load_header(REAL_HEADER_TEXT_LOAD, "text") == LoadSample(
        waiting=0.0, kv_cache_usage=0.0014650225857648635)


def test_header_carries_only_waiting_and_kv_usage():
    s = parse_load_header(REAL_HEADER_JSON_LOAD)
    assert s.running is None and s.generation_tokens is None and s.start_time is None


def test_the_prefix_names_the_format_whatever_was_requested():
    assert parse_load_header(REAL_HEADER_TEXT_LOAD, "json").kv_cache_usage == 0.0014650225857648635
    assert parse_load_header(REAL_HEADER_JSON_LOAD, "text").kv_cache_usage == 0.0014650225857648635
    assert parse_load_header(b"json " + REAL_HEADER_JSON_LOAD[5:]).kv_cache_usage == 0.0014650225857648635


def test_without_a_prefix_the_requested_format_is_used():
    assert parse_load_header(REAL_HEADER_JSON_LOAD[5:], "json").kv_cache_usage == 0.0014650225857648635
    assert parse_load_header(REAL_HEADER_TEXT_LOAD[5:], "TEXT").kv_cache_usage == 0.0014650225857648635
    assert parse_load_header(REAL_HEADER_TEXT_LOAD[5:], "json") == UNKNOWN
    assert parse_load_header(REAL_HEADER_TEXT_LOAD[5:], "bin") == UNKNOWN


def test_header_as_str():
    assert parse_load_header(REAL_HEADER_TEXT_LOAD.decode()).waiting == 0.0


def _vllm_0_32_header(metrics_format, named_metrics):
    """The value vLLM 0.32's create_orca_header builds (copied from
    vllm/entrypoints/serve/utils/orca_metrics.py, logging left out)."""
    if metrics_format.lower() == "text":
        native_http_header = ", ".join(
            [f"named_metrics.{metric_name}={value}"
             for metric_name, value in named_metrics
             if isinstance(metric_name, str) and isinstance(value, float)])
        return f"TEXT {native_http_header}"
    orca_report = {"named_metrics": {
        metric_name: value for metric_name, value in named_metrics
        if isinstance(metric_name, str) and isinstance(value, float)}}
    return f"JSON {json.dumps(orca_report)}"


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize("waiting,kv", [
    (0.0, 0.0), (3.0, 0.4), (12.0, 1e-05), (1e6, 1.0), (7.0, 0.1 + 0.2),
])
def test_round_trip_through_vllm_header_builder(fmt, waiting, kv):
    value = _vllm_0_32_header(fmt, [("num_requests_waiting", waiting), ("kv_cache_usage_perc", kv)])
    assert parse_load_header(value.encode("ascii"), fmt) == LoadSample(waiting=waiting, kv_cache_usage=kv)


def test_data_parallel_engines_text_sums_json_keeps_the_last():
    # vLLM lists one (name, value) per engine gauge; TEXT keeps them all,
    # JSON's dict keeps only the last engine's.
    named = [("num_requests_waiting", 2.0), ("num_requests_waiting", 3.0),
             ("kv_cache_usage_perc", 0.9), ("kv_cache_usage_perc", 0.2)]
    text = _vllm_0_32_header("text", named)
    assert parse_load_header(text, "text") == LoadSample(waiting=5.0, kv_cache_usage=0.9)
    js = _vllm_0_32_header("json", named)
    assert parse_load_header(js, "json") == LoadSample(waiting=3.0, kv_cache_usage=0.2)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_header_non_finite_values_are_unknown(fmt):
    value = _vllm_0_32_header(fmt, [("num_requests_waiting", float("nan")),
                                    ("kv_cache_usage_perc", float("inf"))])
    assert ("NaN" in value) if fmt == "json" else ("nan" in value)
    assert parse_load_header(value, fmt) == UNKNOWN


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_empty_report_is_unknown(fmt):
    assert parse_load_header(_vllm_0_32_header(fmt, []), fmt) == UNKNOWN


def test_unknown_orca_fields_are_ignored():
    value = (b"TEXT cpu_utilization=0.3, named_metrics.foo=1.0, "
             b"named_metrics.kv_cache_usage_perc=0.5, rps_fractional=10.0")
    assert parse_load_header(value, "text") == LoadSample(kv_cache_usage=0.5)
    value = b'JSON {"cpu_utilization": 0.3, "named_metrics": {"foo": 1.0, "num_requests_waiting": 4.0}}'
    assert parse_load_header(value) == LoadSample(waiting=4.0)


@pytest.mark.parametrize("value,fmt", [
    (b"", "json"),
    (b"JSON", "json"),
    (b"JSON {", "json"),
    (b"JSON []", "json"),
    (b'JSON {"named_metrics": [1, 2]}', "json"),
    (b'JSON {"named_metrics": {"num_requests_waiting": "many", "kv_cache_usage_perc": true}}', "json"),
    (b'JSON {"named_metrics": {"num_requests_waiting": null}}', "json"),
    (b"TEXT", "text"),
    (b"TEXT named_metrics.num_requests_waiting", "text"),
    (b"TEXT named_metrics.num_requests_waiting=, named_metrics.kv_cache_usage_perc=x", "text"),
    (b"BIN CgQIARAC", "json"),
    (b"\xff\xfe", "json"),
])
def test_malformed_headers_are_unknown_and_never_raise(value, fmt):
    assert parse_load_header(value, fmt) == UNKNOWN


def test_header_none_is_unknown():
    assert parse_load_header(None) == UNKNOWN


def test_header_values_are_plain_floats():
    s = parse_load_header(REAL_HEADER_JSON_LOAD)
    assert type(s.waiting) is float and type(s.kv_cache_usage) is float
    assert not math.isnan(s.kv_cache_usage)
