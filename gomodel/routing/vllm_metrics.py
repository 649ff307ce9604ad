"""Cheap readers for the two load signals a vLLM (0.32) replica exposes.

Routing replica pools by real load needs, per replica, how much work is
queued and running, how full the KV cache is, whether the engine is still
producing tokens, and whether the process restarted.  vLLM gives two
sources, and both are read here without any general-purpose parser, since
they run in the gateway's single Twisted thread:

 1. B{The Prometheus page} (C{GET /metrics} at the server root, scraped in
    the background every couple of seconds).  A real 0.32 page is ~67-70 KB
    (~700 lines, mostly histogram buckets) of which we need five series:

     - C{vllm:num_requests_waiting} (gauge) -> L{LoadSample.waiting}
     - C{vllm:num_requests_running} (gauge) -> L{LoadSample.running}
     - C{vllm:kv_cache_usage_perc} (gauge, 0..1; older servers call it
       C{vllm:gpu_cache_usage_perc}, which is read only when the new name is
       absent: 0.32 no longer emits it at all) -> L{LoadSample.kv_cache_usage}
     - C{vllm:generation_tokens_total} (counter; stall detection: running > 0
       while this does not move) -> L{LoadSample.generation_tokens}
     - C{process_start_time_seconds} (gauge; restart detection, and the
       reason a counter reset is not a stall) -> L{LoadSample.start_time}

    L{parse_metrics} finds each name with C{bytes.find} on C{b"\\n" + name}
    (C speed, no per-line Python work for the other ~700 lines), reads the
    consecutive lines of that family (the text format keeps a family's
    samples in one group) and stops there, so a present series costs a scan
    up to its group only; an absent one costs one scan of the page.  A
    sample line must have C{"{"} or a space right after the name.  That rejects
    the look-alike families on the same page -- C{..._waiting_by_reason},
    C{..._created} (the prometheus_client creation-time gauge that sits next
    to every counter) -- and C{# HELP}/C{# TYPE} lines never match because
    they do not start with the name (the HELP text of C{_waiting_by_reason}
    quotes C{vllm:num_requests_waiting} mid-line; it is not after a newline).
    The label set is skipped to the I{last} C{"}"} on the line, so label
    values holding spaces or braces do not shift the value; the first token
    after it is the value and an optional timestamp is ignored.  Values go
    through C{float()}, which takes C{1.5e+03}, C{NaN}, C{+Inf}.

    vLLM emits one sample per C{engine="N"} label (data-parallel engines in
    one server) and per C{model_name}; samples are combined: B{sum} for
    waiting, running and generation tokens (the replica's totals), B{max} for
    KV-cache usage.  Max, not mean: each DP engine owns a separate KV pool
    and the gateway cannot choose the engine inside a replica, so what
    matters for "will this replica queue or preempt" is the fullest pool; a
    mean of (0.99, 0.10) would read 0.55 and hide a saturated engine.  (With
    one engine, the normal case, both are the same number.)

    B{Unknown is None, never 0}: a series absent from the page (older or
    newer vLLM, a non-vLLM upstream, multiprocess mode without the process
    collector) or whose every sample is malformed or not finite (C{NaN},
    C{+Inf}, C{-Inf} carry no load information) yields C{None}, so a
    selector can tell "idle" from "cannot tell".

 2. B{The ORCA load report} vLLM attaches to a chat or completions answer
    when the request carries C{endpoint-load-metrics-format: json} (or
    C{text}, case-insensitive): response header C{endpoint-load-metrics}.
    Built by C{vllm/entrypoints/serve/utils/orca_metrics.py}
    (C{create_orca_header}); the two formats are, exactly::

        JSON {"named_metrics": {"num_requests_waiting": 0.0, "kv_cache_usage_perc": 0.0014650225857648635}}
        TEXT named_metrics.num_requests_waiting=0.0, named_metrics.kv_cache_usage_perc=0.0014650225857648635

    i.e. C{"JSON " + json.dumps({"named_metrics": {...}})} and
    C{"TEXT " + ", ".join(f"named_metrics.{name}={value}")} (Python float
    reprs: C{1e-05}, C{nan}, C{inf}; JSON may hold C{NaN}/C{Infinity}).
    Only the two gauges above are reported.  It is sent only on
    B{non-streaming} answers (the streaming path returns a
    C{StreamingResponse} without it), only for 200s, and not for any other
    format value.  With several DP engines vLLM lists one entry per engine:
    TEXT repeats the key (combined here like the page: waiting summed, KV
    max), JSON puts them in a dict so only the last engine survives -- a
    vLLM limitation nothing downstream can undo.  L{parse_load_header}
    reproduces both and fills only C{waiting} and C{kv_cache_usage}.

Neither function raises on bad input: the worst case is an all-None sample.
"""

from json import loads as _json_loads
from typing import NamedTuple, Optional, Union

__all__ = ["LoadSample", "parse_metrics", "parse_load_header", "UNKNOWN"]


class LoadSample(NamedTuple):
    """One replica's load at one instant; C{None} in any field means unknown.

    @ivar waiting: requests queued in the engine(s) (sum over engines).
    @ivar running: requests in the running batch(es) (sum over engines).
    @ivar kv_cache_usage: KV-cache usage in 0..1 (max over engines).
    @ivar generation_tokens: cumulative generated tokens (counter, sum over
        engines); resets when the server restarts.
    @ivar start_time: the server process's start, in Unix seconds.
    """

    waiting: Optional[float] = None
    running: Optional[float] = None
    kv_cache_usage: Optional[float] = None
    generation_tokens: Optional[float] = None
    start_time: Optional[float] = None


#: The sample with every field unknown.
UNKNOWN = LoadSample()

_INF = float("inf")
_NINF = float("-inf")

_WAITING = b"vllm:num_requests_waiting"
_RUNNING = b"vllm:num_requests_running"
_KV = b"vllm:kv_cache_usage_perc"
_KV_OLD = b"vllm:gpu_cache_usage_perc"
_GEN = b"vllm:generation_tokens_total"
_START = b"process_start_time_seconds"

_LBRACE = 0x7B  # "{"
_SPACE = 0x20
_TAB = 0x09


def _values(page: bytes, name: bytes) -> list:
    """The finite values of every sample of series C{name} on C{page}.

    Finds the first sample line of C{name} (at the start of the page or
    after a newline), then walks the lines that follow it for as long as
    they start with C{name}: the text format puts all the samples of a
    family in one group, so the search stops at the end of that group
    instead of scanning the rest of the page.

    @param page: a Prometheus text exposition.
    @param name: an exact series name (not a family prefix).
    @return: the parsed values, in page order; empty when the series is
        absent or every sample is malformed or not finite.
    """
    out = []
    if page.startswith(name):
        pos = 0
    else:
        pos = page.find(b"\n" + name)
        if pos < 0:
            return out
        pos += 1
    find = page.find
    startswith = page.startswith
    n = len(name)
    size = len(page)
    while True:
        after = pos + n
        eol = find(b"\n", after)
        if eol < 0:
            eol = size
        if after < size:
            c = page[after]
            start = -1
            if c == _LBRACE:
                # The last "}" ends the label set even when a label value
                # holds braces or spaces; value and timestamp hold neither.
                close = page.rfind(b"}", after, eol)
                if close >= 0:
                    start = close + 1
            elif c == _SPACE or c == _TAB:
                start = after
            # Anything else is a longer name (..._by_reason, ..._created).
            if start >= 0:
                # "value [timestamp]"; split() also drops a stray "\r".
                parts = page[start:eol].split(None, 1)
                if parts:
                    try:
                        v = float(parts[0])
                    except ValueError:
                        pass
                    else:
                        if v == v and v != _INF and v != _NINF:
                            out.append(v)
        pos = eol + 1
        if pos >= size or not startswith(name, pos):
            return out


def parse_metrics(page: bytes) -> LoadSample:
    """Read the load signals from a vLLM C{/metrics} page, cheaply.

    Scans only for the five series named in the module docstring; every
    other line is skipped at C{bytes.find} speed.  Samples across C{engine}
    and C{model_name} labels are summed (waiting, running, generation
    tokens) or maxed (KV-cache usage); C{vllm:gpu_cache_usage_perc} stands
    in for C{vllm:kv_cache_usage_perc} only when the latter has no usable
    sample.  Missing series, malformed lines and C{NaN}/C{Inf} values give
    C{None}, never 0.

    @param page: the response body of C{GET /metrics} (Prometheus text
        format 0.0.4; OpenMetrics text is read the same way).
    @type page: L{bytes}
    @return: the replica's load; fields it could not read are C{None}.
    @rtype: L{LoadSample}
    """
    if not isinstance(page, bytes):
        page = bytes(page)
    w = _values(page, _WAITING)
    r = _values(page, _RUNNING)
    kv = _values(page, _KV) or _values(page, _KV_OLD)
    g = _values(page, _GEN)
    s = _values(page, _START)
    return LoadSample(
        sum(w) if w else None,
        sum(r) if r else None,
        max(kv) if kv else None,
        sum(g) if g else None,
        # One process, one sample; if a page ever had several, the latest
        # start is the one a restart would move.
        max(s) if s else None,
    )


# ORCA named-metric keys vLLM 0.32 emits -> the field they fill.
_HEADER_WAITING = "num_requests_waiting"
_HEADER_KV = "kv_cache_usage_perc"


def _finite(v) -> Optional[float]:
    """C{v} as a finite float, or C{None} (NaN, infinities, non-numbers)."""
    if isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    if v != v or v == _INF or v == _NINF:
        return None
    return v


def parse_load_header(value: Union[bytes, str], fmt: str = "json") -> LoadSample:
    """Read vLLM 0.32's C{endpoint-load-metrics} response header.

    The header names its own format with a C{JSON } or C{TEXT } prefix
    (matched case-insensitively), and that prefix wins; C{fmt} (C{"json"}
    or C{"text"}, the value sent in C{endpoint-load-metrics-format}) is only
    used when a value arrives without a prefix.  Formats, from
    C{vllm.entrypoints.serve.utils.orca_metrics.create_orca_header}::

        JSON {"named_metrics": {"num_requests_waiting": 2.0, "kv_cache_usage_perc": 0.4}}
        TEXT named_metrics.num_requests_waiting=2.0, named_metrics.kv_cache_usage_perc=0.4

    Only C{waiting} and C{kv_cache_usage} can be filled; the other fields
    are always C{None}.  A key repeated in TEXT (one per DP engine) is
    summed for waiting and maxed for KV usage, as in L{parse_metrics}.
    Unknown keys (other ORCA fields such as C{cpu_utilization}) are
    ignored; anything malformed yields C{None} for what it would have set.

    @param value: the header value (bytes as Twisted gives it, or str).
    @param fmt: the format that was requested, C{"json"} or C{"text"}.
    @return: the reported load.
    @rtype: L{LoadSample}
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return UNKNOWN
    elif not isinstance(value, str):
        return UNKNOWN
    text = value.strip()
    head = text[:5].upper()
    if head == "JSON " or head == "JSON{":
        kind, body = "json", text[4:]
    elif head == "TEXT ":
        kind, body = "text", text[5:]
    else:
        kind, body = (fmt or "").lower(), text

    waiting = kv = None
    if kind == "json":
        try:
            report = _json_loads(body)
        except ValueError:
            return UNKNOWN
        named = report.get("named_metrics") if isinstance(report, dict) else None
        if not isinstance(named, dict):
            return UNKNOWN
        waiting = _finite(named.get(_HEADER_WAITING))
        kv = _finite(named.get(_HEADER_KV))
    elif kind == "text":
        for item in body.split(","):
            key, eq, raw = item.partition("=")
            if not eq:
                continue
            key = key.strip()
            if not key.startswith("named_metrics."):
                continue
            key = key[14:]
            if key == _HEADER_WAITING:
                v = _finite(raw.strip())
                if v is not None:
                    waiting = v if waiting is None else waiting + v
            elif key == _HEADER_KV:
                v = _finite(raw.strip())
                if v is not None and (kv is None or v > kv):
                    kv = v
    else:
        return UNKNOWN
    return LoadSample(waiting, None, kv, None, None)
