"""A fleet of fake vLLM 0.32 replicas: real Twisted HTTP servers on 127.0.0.1, port 0.

Each L{FakeReplica} speaks the wire format of L{tests.fakes.vllm.FakeVLLM} (model
list, chat JSON, SSE chunks with the usage chunk and C{data: [DONE]}, vLLM's
nested errors, completions, embeddings, rerank, ...) and adds what a replica
pool needs: load that behaves like load, a Prometheus C{/metrics} page shaped
like vLLM 0.32's, C{/health}, and knobs the test turns at any moment.

Knobs (attributes of L{FakeReplica}, effective immediately):

  - C{latency}: seconds before an inference answer's first byte (default 0)
  - C{per_request_cost}: extra seconds per request in flight: a request that
    starts being served waits C{latency + per_request_cost * in_flight}
  - C{max_running}: at most that many requests run; the others queue and are
    reported as waiting (default C{None}: no limit)
  - C{token_interval}: seconds between generated tokens (stream chunks; a plain
    answer is written after its last token)
  - C{chunks}: content chunks (tokens) per answer (default 3; a request's
    C{fake_chunks} field wins)
  - C{metrics}: a dict overriding scraped values: C{running}, C{waiting},
    C{kv_cache_usage}, C{generation_tokens}, C{start_time}; a number goes to
    engine 0 (other engines show 0), a list gives one value per engine.
    Without overrides the page follows the real state.
  - C{fail_status}: answer every inference request (every POST) at once with
    that status and a vLLM error body; C{None} (default) to serve; C{fail_headers}:
    C{{name: value}} headers that answer carries (default none)
  - C{hang}: accept inference requests and never answer them; requests being
    served freeze where they are. C{/health} stays 200, C{/metrics} shows them
    running with C{generation_tokens} frozen; requests whose client left stay
    "running" (a stuck engine processes no abort) until C{hang} is cleared
  - C{health_status}: status of C{GET /health} (default 200; 503 = loading / dead)
  - C{frozen}: accept every request (C{/health} and C{/metrics} too) and never
    answer it, as a process stopped with SIGSTOP or a host gone whose
    connections hang (set C{hang} too to freeze those already being served).
    Cleared, the requests it held stay unanswered.
  - C{prefix_cache}: when true, a request whose first C{prefix_chars} (64)
    characters of joined message contents (or prompt) match one this replica
    already served waits C{latency * prefix_hit_factor} (0.2) instead of
    C{latency}; hits and misses are counted in C{prefix_hits} / C{prefix_misses}
  - C{load_header}: (default true, as vLLM 0.32 does) answer a request carrying
    C{endpoint-load-metrics-format: json} (or C{text}) with vLLM's ORCA header
    C{endpoint-load-metrics} on non-streamed 200 chat/completions answers
  - C{engines}: data-parallel engines shown on C{/metrics} (constructor only)

Actions: L{FakeReplica.refuse} / L{FakeReplica.accept} (stop listening / listen
again on the same port), L{FakeReplica.restart} (new process start time,
counters reset, open connections aborted, optionally new models).

Recording: C{requests} (every request, L{FleetRequest}), C{in_flight},
C{served}, L{FakeReplica.received_by_body_field},
L{FakeReplica.requests_with_header}, C{inference_requests}.

L{FakeFleet} starts C{n} replicas and gives C{base_urls}, C{env_value} (for
C{VLLM_BASE_URL}) and L{FakeFleet.distribution}.
"""

import json
import math
import time
from http import HTTPStatus

from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import server

from gomodel import jsonutil
from tests.fakes.vllm import CHAT_MODEL, FakeVLLM, Recorded, _chunk

LOAD_FORMAT_HEADER = b"endpoint-load-metrics-format"
LOAD_HEADER = b"endpoint-load-metrics"
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


# -- vLLM's ORCA load report (vllm/entrypoints/serve/utils/orca_metrics.py) -------

def orca_header(metrics_format, named_metrics):
    """The C{endpoint-load-metrics} value vLLM 0.32 writes, or C{None}.

    Same rules as vLLM's C{create_orca_header}: the format is matched without
    case against C{text} / C{json}; anything else gives no header. JSON is
    C{"JSON " + json.dumps({"named_metrics": {...}})} (a repeated name keeps its
    first position and its last value); TEXT is C{"TEXT "} followed by
    C{named_metrics.NAME=VALUE} items joined by C{", "}.

    @param metrics_format: the request's C{endpoint-load-metrics-format} value.
    @param named_metrics: C{[(name, float), ...]} in registry order.
    @return: the header value (C{str}) or C{None}.
    """
    if not metrics_format or metrics_format.lower() not in ("text", "json"):
        return None
    items = [(n, v) for n, v in named_metrics if isinstance(n, str) and isinstance(v, float)]
    if metrics_format.lower() == "text":
        return "TEXT " + ", ".join(f"named_metrics.{n}={v}" for n, v in items)
    return "JSON " + json.dumps({"named_metrics": {n: v for n, v in items}})


# -- Prometheus text exposition as prometheus_client 0.26 renders it --------------

def _go_float(value):
    """prometheus_client's C{floatToGoString}."""
    d = float(value)
    if d == math.inf:
        return "+Inf"
    if d == -math.inf:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return s


def _labels(labels):
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


TOKENS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)
ITERATION_BUCKETS = (1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0)
N_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
PREEMPTION_BUCKETS = (1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0)
HIGHR_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0,
                 7.5, 10.0, 30.0, 60.0)

# (name, help, buckets) of vLLM 0.32's per-engine histograms, in registration order
HISTOGRAMS = (
    ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", TOKENS_BUCKETS),
    ("vllm:request_generation_tokens", "Number of generation tokens processed.", TOKENS_BUCKETS),
    ("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", ITERATION_BUCKETS),
    ("vllm:request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens.",
     TOKENS_BUCKETS),
    ("vllm:request_params_n", "Histogram of the n request parameter.", N_BUCKETS),
    ("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", TOKENS_BUCKETS),
    ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS),
    ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS),
    ("vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.",
     ITL_BUCKETS),
    ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", LATENCY_BUCKETS),
    ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", LATENCY_BUCKETS),
    ("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
     LATENCY_BUCKETS),
    ("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", LATENCY_BUCKETS),
    ("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", LATENCY_BUCKETS),
    ("vllm:request_num_preemptions", "Histogram of the number of times a request was preempted.",
     PREEMPTION_BUCKETS),
    ("vllm:request_prefill_kv_computed_tokens",
     "Histogram of new KV tokens computed during prefill (excluding cached tokens).", TOKENS_BUCKETS),
)

FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")
WAITING_REASONS = ("capacity", "deferred")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")
PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
CACHED_SOURCES = ("device", "host", "p2p", "disk", "external_unspecified")
WATERMARK_STATUSES = ("watermarked", "skipped", "not_watermarked")


class _Histogram:
    """One histogram series: cumulative bucket counts, count and sum."""

    def __init__(self, buckets):
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value):
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.counts[-1] += 1
        self.sum += value


class _Page:
    """Builds a Prometheus text page family by family."""

    def __init__(self, created):
        self.lines = []
        self.created = created

    def family(self, name, help_, kind, samples, created=True):
        """samples: [(labels, value)]; counters get C{_total} and a C{_created} gauge family."""
        base = name[:-len("_total")] if kind == "counter" and name.endswith("_total") else name
        shown = base + "_total" if kind == "counter" else name
        self.lines.append(f"# HELP {shown} {help_}")
        self.lines.append(f"# TYPE {shown} {kind}")
        for labels, value in samples:
            self.lines.append(f"{shown}{_labels(labels)} {_go_float(value)}")
        if kind == "counter" and created:
            self._created(base + "_created", help_, [labels for labels, _ in samples])

    def histogram(self, name, help_, series):
        """series: [(labels, _Histogram)]."""
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} histogram")
        for labels, hist in series:
            for bound, count in zip(list(hist.bounds) + [math.inf], hist.counts):
                self.lines.append(f"{name}_bucket{_labels(dict(labels, le=_go_float(bound)))} {_go_float(count)}")
            self.lines.append(f"{name}_count{_labels(labels)} {_go_float(hist.counts[-1])}")
            self.lines.append(f"{name}_sum{_labels(labels)} {_go_float(hist.sum)}")
        self._created(name + "_created", help_, [labels for labels, _ in series])

    def summary(self, name, help_, series):
        """series: [(labels, count, sum)]."""
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} summary")
        for labels, count, total in series:
            self.lines.append(f"{name}_count{_labels(labels)} {_go_float(count)}")
            self.lines.append(f"{name}_sum{_labels(labels)} {_go_float(total)}")
        self._created(name + "_created", help_, [labels for labels, _, _ in series])

    def _created(self, name, help_, label_sets):
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} gauge")
        for i, labels in enumerate(label_sets):
            self.lines.append(f"{name}{_labels(labels)} {_go_float(self.created + 0.0001 * i)}")

    def render(self):
        return ("\n".join(self.lines) + "\n").encode()


# -- recording ---------------------------------------------------------------------

class FleetRequest(Recorded):
    """One request a replica received.

    Attributes: C{method}, C{path}, C{uri} (bytes, as in L{Recorded}), C{headers},
    C{raw_body}, C{body} (parsed JSON or C{None}), C{time} (monotonic arrival),
    C{replica} (its name), C{closed} (fires with C{("finished"|"lost", time)}),
    C{outcome} (C{None} while open, then C{"finished"} or C{"lost"}),
    C{status} (the answer's status once written), C{first_byte_at},
    C{prefix_hit} (C{True}/C{False} when the prefix cache was consulted).
    """

    def __init__(self, request, body, replica):
        super().__init__(request, body)
        self.time = time.monotonic()
        self.replica = replica
        self.outcome = None
        self.status = None
        self.first_byte_at = None
        self.prefix_hit = None
        self.on_lost = []  # the replica's own hooks, run before C{closed} fires
        self.closed.addCallback(self._closed)

    def _closed(self, result):
        self.outcome = result[0]
        return result

    @property
    def finished(self):
        """@return: whether the answer was completely written."""
        return self.outcome == "finished"

    @property
    def lost(self):
        """@return: whether the connection went away before the answer was complete."""
        return self.outcome == "lost"

    @property
    def is_inference(self):
        """@return: whether this is an inference request (a POST)."""
        return self.method == b"POST"


class _Job:
    """An inference request inside the replica's engine."""

    def __init__(self, request, record, engine, kind):
        self.request = request
        self.record = record
        self.engine = engine
        self.kind = kind  # "chat", "completions" or "other"
        self.body = record.body if isinstance(record.body, dict) else {}
        self.stream = bool(self.body.get("stream")) and kind != "other"
        self.chunks = 0
        self.sent = 0
        self.state = "new"  # new -> waiting -> running -> done
        self.gone = False
        self.arrived = time.monotonic()
        self.started = None
        self.first_token = None


class _Site(server.Site):
    """A Site that tells its replica about every connection it builds."""

    noisy = False

    def __init__(self, resource, replica):
        super().__init__(resource)
        self._replica = replica

    def buildProtocol(self, addr):
        proto = super().buildProtocol(addr)
        self._replica._track(proto)
        return proto


class FakeReplica(FakeVLLM):
    """One fake vLLM 0.32 server in a replica pool; see the module docstring for its knobs."""

    def __init__(self, reactor, *, models=(CHAT_MODEL,), name=None, engines=1, api_key=None,
                 max_model_len=2048, latency=0.0, per_request_cost=0.0, max_running=None,
                 token_interval=0.0, chunks=3, prefix_cache=False, prefix_chars=64, prefix_hit_factor=0.2,
                 load_header=True):
        """
        @param reactor: the reactor to listen and schedule on.
        @param models: model ids it serves (the first one is C{model_name} on C{/metrics}).
        @param name: a label for reports (default C{replica-<port>}).
        @param engines: data-parallel engines shown on C{/metrics} (requests go round robin).
        @param api_key: when set, C{/v1} routes require C{Bearer <api_key>}.
        """
        super().__init__(reactor, api_key=api_key, models=models, max_model_len=max_model_len)
        self.name = name
        self.engines = max(1, int(engines))
        self.latency = latency
        self.per_request_cost = per_request_cost
        self.max_running = max_running
        self.token_interval = token_interval
        self.chunks = chunks
        self.metrics = {}
        self.fail_status = None
        self.fail_headers = {}
        self.health_status = 200
        self.frozen = False
        self.prefix_cache = prefix_cache
        self.prefix_chars = prefix_chars
        self.prefix_hit_factor = prefix_hit_factor
        self.prefix_hits = 0
        self.prefix_misses = 0
        self.load_header = load_header
        self.served = 0
        self.restarts = 0
        self._hang = False
        self._port_number = None
        self._timers = set()
        self._connections = {}  # protocol -> Deferred fired when it is lost
        self._running = []
        self._waiting_jobs = []
        self._parked = []  # (function, job) frozen by hang
        self._next_engine = 0
        self._reset_engine_state()

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> Deferred:
        """Listen on 127.0.0.1 (port 0 the first time, the same port afterwards).

        @return: a Deferred firing with self once listening.
        """
        d = TCP4ServerEndpoint(self._reactor, self._port_number or 0, interface="127.0.0.1").listen(
            _Site(self, self))

        def listening(port):
            self.port = port
            self._port_number = port.getHost().port
            if self.name is None:
                self.name = f"replica-{self._port_number}"
            return self

        return d.addCallback(listening)

    def stop(self) -> Deferred:
        """Stop listening, cancel every timer, abort open connections.

        @return: a Deferred firing once the port is closed and the connections are gone.
        """
        return self._go_down()

    def refuse(self) -> Deferred:
        """Stop listening (new connections are refused) and abort open connections, as a dead server.

        @return: a Deferred firing once the port is closed and the connections are gone.
        """
        return self._go_down()

    def accept(self) -> Deferred:
        """Listen again on the same port after L{refuse}.

        @return: a Deferred firing with self once listening.
        """
        if self.port is not None:
            return succeed(self)
        return self.start()

    def restart(self, models=None):
        """Play a process restart: new C{process_start_time_seconds}, counters and
        histograms reset, prefix cache emptied, every open connection aborted
        (requests in flight are lost), optionally a new model list. The port keeps
        listening; knobs are left as they are. Recorded C{requests} and C{served}
        are kept (they belong to the test, not to the process).

        @param models: the new model ids, or C{None} to keep them.
        """
        self._drop_everything()
        if models is not None:
            self.models = list(models)
        previous = self._start_time
        self._reset_engine_state()
        self._start_time = max(self._start_time, previous + 1.0)
        self.restarts += 1

    def _go_down(self):
        port, self.port = self.port, None
        waits = [self._drop_everything()]
        if port is not None:
            waits.insert(0, port.stopListening())
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def _drop_everything(self):
        """Cancel timers, forget jobs, abort connections; fires when they are all lost."""
        for call in list(self._timers):
            if call.active():
                call.cancel()
        self._timers.clear()
        jobs = self._running + self._waiting_jobs + [job for _, job in self._parked]
        for job in jobs:
            job.state = "done"
        self._running, self._waiting_jobs, self._parked = [], [], []
        lost = []
        for proto, d in list(self._connections.items()):
            lost.append(d)
            transport = getattr(proto, "transport", None) or getattr(getattr(proto, "_channel", None),
                                                                      "transport", None)
            if transport is not None:
                transport.abortConnection()
        return DeferredList(lost, consumeErrors=True) if lost else succeed(None)

    def _track(self, proto):
        lost = Deferred()
        self._connections[proto] = lost
        original = proto.connectionLost

        def connection_lost(reason):
            self._connections.pop(proto, None)
            try:
                return original(reason)
            finally:
                lost.callback(None)

        proto.connectionLost = connection_lost

    def _later(self, delay, function, *args):
        def run():
            self._timers.discard(call)
            function(*args)

        call = self._reactor.callLater(max(0.0, delay), run)
        self._timers.add(call)
        return call

    def _reset_engine_state(self):
        self._start_time = round(time.time(), 2)
        self._created = time.time()
        e = range(self.engines)
        self._generation_tokens = [0] * self.engines
        self._prompt_tokens = [0] * self.engines
        self._prefix_queries = [0] * self.engines
        self._prefix_cached = [0] * self.engines
        self._success = [{reason: 0 for reason in FINISHED_REASONS} for _ in e]
        self._hists = [{name: _Histogram(buckets) for name, _, buckets in HISTOGRAMS} for _ in e]
        self._http = {}  # (handler, method, status) -> [count, duration sum, request bytes, response bytes]
        self._highr = _Histogram(HIGHR_BUCKETS)
        self._prefixes = set()

    # -- knobs with side effects --------------------------------------------------

    @property
    def hang(self):
        """Whether the engine is hung (see the module docstring)."""
        return self._hang

    @hang.setter
    def hang(self, value):
        self._hang = bool(value)
        if not self._hang:
            parked, self._parked = self._parked, []
            for function, job in parked:
                if job.state == "done":
                    continue
                if job.gone:
                    self._remove(job)
                else:
                    function(job)
            for job in list(self._running):
                if job.gone:
                    self._remove(job)
            self._promote()

    # -- state the tests read -----------------------------------------------------

    @property
    def root_url(self):
        """@return: C{http://127.0.0.1:PORT} (valid while refused too)."""
        return f"http://127.0.0.1:{self._port_number}"

    @property
    def base_url(self):
        """@return: C{http://127.0.0.1:PORT/v1}."""
        return self.root_url + "/v1"

    @property
    def port_number(self):
        """@return: the TCP port this replica owns."""
        return self._port_number

    @property
    def in_flight(self):
        """@return: inference requests inside the engine (running, stuck or queued)."""
        return len(self._running) + len(self._waiting_jobs)

    @property
    def running(self):
        """@return: requests the engine counts as running."""
        return len(self._running)

    @property
    def queued(self):
        """@return: requests waiting for a free slot (C{max_running})."""
        return len(self._waiting_jobs)

    @property
    def generation_tokens(self):
        """@return: the real generation token counter, all engines."""
        return sum(self._generation_tokens)

    @property
    def start_time(self):
        """@return: the real C{process_start_time_seconds}."""
        return self._start_time

    @property
    def inference_requests(self):
        """@return: the recorded POST requests."""
        return [r for r in self.requests if r.is_inference]

    def received_by_body_field(self, name, value):
        """@return: recorded requests whose JSON body has C{name == value}."""
        return [r for r in self.requests if isinstance(r.body, dict) and r.body.get(name) == value]

    def requests_with_header(self, name):
        """@return: recorded requests carrying header C{name} (any value)."""
        return [r for r in self.requests if r.headers.hasHeader(name)]

    # -- serving ------------------------------------------------------------------

    def render(self, request):
        """Record the request, then answer C{/health}, C{/metrics}, GETs at once and POSTs through the engine."""
        request.content.seek(0)
        record = FleetRequest(request, request.content.read(), self.name)
        request.notifyFinish().addCallbacks(lambda _: self._closed(record, "finished"),
                                            lambda _: self._closed(record, "lost"))
        self._arrived(record)
        if self.frozen:
            return server.NOT_DONE_YET
        path, method = request.path, request.method
        if path == b"/health" and method == b"GET":
            record.status = self.health_status
            request.setResponseCode(self.health_status)
            return b""
        if path == b"/metrics" and method == b"GET":
            record.status = 200
            page = self.metrics_page()
            request.setHeader(b"content-type", METRICS_CONTENT_TYPE)
            request.setHeader(b"content-length", b"%d" % len(page))
            return page
        if method != b"POST":
            result = self._route(request, record)
            record.status = request.code
            if path.startswith(b"/v1"):
                self._count_http(path, method, request.code, 0.0, len(record.raw_body), len(result))
            return result
        return self._inference(request, record)

    def _closed(self, record, how):
        """The engine hears of a lost connection before anyone awaiting C{record.closed} runs."""
        if how == "lost":
            hooks, record.on_lost = record.on_lost, []
            for hook in hooks:
                hook()
        record.closed.callback((how, time.monotonic()))

    def _inference(self, request, record):
        path = request.path
        if self.api_key is not None and request.getHeader(b"authorization") != f"Bearer {self.api_key}".encode():
            return self._answer_now(request, record, 401, {"error": "Unauthorized"})
        if self.fail_status is not None:
            status = int(self.fail_status)
            try:
                phrase = HTTPStatus(status).phrase
            except ValueError:
                phrase = "Error"
            for name, value in self.fail_headers.items():
                request.setHeader(name, value)
            return self._answer_now(request, record, status, {"error": {
                "message": f"{phrase} (fake replica {self.name})", "type": phrase, "param": None, "code": status}})
        body = record.body
        if not isinstance(body, dict):
            return self._answer_now(request, record, 400, {"error": {
                "message": "JSON decode error", "type": "Bad Request", "param": "body", "code": 400}})
        if path not in (b"/tokenize", b"/detokenize") and body.get("model") not in self.models:
            return self._answer_now(request, record, 404, {"error": {
                "message": f"The model `{body.get('model')}` does not exist.", "type": "NotFoundError",
                "param": "model", "code": 404}})
        kind = {b"/v1/chat/completions": "chat", b"/v1/completions": "completions"}.get(path, "other")
        job = _Job(request, record, self._next_engine % self.engines, kind)
        self._next_engine += 1
        job.chunks = int(body.get("fake_chunks", self.chunks)) if kind != "other" else 0
        record.on_lost.append(lambda: self._lost(job))
        self._admit(job)
        return server.NOT_DONE_YET

    def _answer_now(self, request, record, status, value):
        record.status = status
        result = self._json(request, status, value)
        self.served += 1
        self._count_http(request.path, request.method, status, 0.0, len(record.raw_body), len(result))
        return result

    # -- the engine -----------------------------------------------------------------

    def _admit(self, job):
        if self._hang:
            job.state = "running"
            self._running.append(job)
            self._parked.append((self._start, job))
            return
        if self.max_running is not None and len(self._running) >= self.max_running:
            job.state = "waiting"
            self._waiting_jobs.append(job)
            return
        self._running.append(job)
        self._start(job)

    def _promote(self):
        while self._waiting_jobs and not self._hang and (
                self.max_running is None or len(self._running) < self.max_running):
            job = self._waiting_jobs.pop(0)
            if job.gone:
                continue
            self._running.append(job)
            self._start(job)

    def _start(self, job):
        job.state = "running"
        job.started = time.monotonic()
        latency = self.latency
        if self.prefix_cache:
            key = self._prefix_key(job.body)
            hit = key is not None and key in self._prefixes
            job.record.prefix_hit = hit
            if hit:
                self.prefix_hits += 1
                latency = latency * self.prefix_hit_factor
            else:
                self.prefix_misses += 1
            job.prefix_key = key
        delay = latency + self.per_request_cost * self.in_flight
        self._later(delay, self._first_byte, job)

    def _prefix_key(self, body):
        messages = body.get("messages")
        if isinstance(messages, list):
            parts = []
            for message in messages:
                content = message.get("content") if isinstance(message, dict) else None
                if isinstance(content, str):
                    parts.append(content)
                elif isinstance(content, list):
                    parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
            text = "".join(parts)
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        elif isinstance(body.get("input"), str):
            text = body["input"]
        else:
            return None
        return text[: self.prefix_chars]

    def _first_byte(self, job):
        if job.state == "done" or job.gone:
            return
        if self._hang:
            self._parked.append((self._first_byte, job))
            return
        now = time.monotonic()
        job.first_token = now
        job.record.first_byte_at = now
        key = getattr(job, "prefix_key", None)
        if self.prefix_cache and key is not None:
            self._prefixes.add(key)
        prompt = max(1, len(self._prefix_key(job.body) or "") // 4) if job.kind != "other" else 4
        self._prompt_tokens[job.engine] += prompt
        self._prefix_queries[job.engine] += prompt
        if job.record.prefix_hit:
            self._prefix_cached[job.engine] += min(prompt, self.prefix_chars // 4)
        job.prompt_tokens = prompt
        if job.stream:
            request = job.request
            request.setResponseCode(200)
            request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
            job.record.status = 200
            if job.kind == "chat":
                request.write(self._event(_chunk({"role": "assistant", "content": ""}, model=job.body["model"])))
        self._step(job)

    def _event(self, value):
        return b"data: " + jsonutil.dumps(value) + b"\n\n"

    def _step(self, job):
        if job.state == "done" or job.gone:
            return
        if self._hang:
            self._parked.append((self._step, job))
            return
        if job.sent < job.chunks:
            job.sent += 1
            self._generation_tokens[job.engine] += 1
            if job.stream:
                job.request.write(self._event(self._content_chunk(job)))
            if job.sent < job.chunks:
                self._later(self.token_interval, self._step, job)
                return
        self._finish(job)

    def _content_chunk(self, job):
        text = job.body.get("fake_text", "hé")
        last = job.sent == job.chunks
        if job.kind == "chat":
            return _chunk({"content": text}, "length" if last else None, model=job.body["model"])
        return {"id": "cmpl-fake", "object": "text_completion", "created": 1700000000, "model": job.body["model"],
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": "length" if last else None, "stop_reason": None}]}

    def _usage(self, job):
        return {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens + job.chunks,
                "completion_tokens": job.chunks}

    def _finish(self, job):
        request, body = job.request, job.body
        if job.stream:
            options = body.get("stream_options") or {}
            if options.get("include_usage"):
                request.write(self._event({"id": "chatcmpl-fake" if job.kind == "chat" else "cmpl-fake",
                                           "object": "chat.completion.chunk" if job.kind == "chat"
                                           else "text_completion", "created": 1700000000,
                                           "model": body["model"], "choices": [], "usage": self._usage(job)}))
            request.write(b"data: [DONE]\n\n")
            request.finish()
            size = 0
        else:
            if job.kind == "chat":
                text = body.get("fake_text", "hé") * job.chunks
                result = self._json(request, 200, {
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000,
                    "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None,
                                                         "reasoning": None, "tool_calls": []},
                                 "logprobs": None, "finish_reason": "length", "stop_reason": None,
                                 "token_ids": None}],
                    "service_tier": None, "system_fingerprint": "vllm-0.32.0-fake", "usage": self._usage(job),
                    "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None})
            elif job.kind == "completions":
                result = self._json(request, 200, {
                    "id": "cmpl-fake", "object": "text_completion", "created": 1700000000, "model": body["model"],
                    "choices": [{"index": 0, "text": body.get("fake_text", "hé") * job.chunks, "logprobs": None,
                                 "finish_reason": "length", "stop_reason": None, "prompt_logprobs": None}],
                    "usage": self._usage(job)})
            else:
                result = self._route(request, job.record)
            if job.kind != "other" and request.code == 200:
                header = self._load_header_for(request)
                if header is not None:
                    request.setHeader(LOAD_HEADER, header.encode("latin-1"))
            if result is not server.NOT_DONE_YET:
                request.write(result)
                request.finish()
            size = len(result) if isinstance(result, bytes) else 0
        job.record.status = request.code
        self._done(job, size)

    def _load_header_for(self, request):
        if not self.load_header:
            return None
        wanted = request.getHeader(LOAD_FORMAT_HEADER)
        if not wanted:
            return None
        return orca_header(wanted.decode("latin-1"), self.named_metrics())

    def named_metrics(self):
        """The gauges vLLM 0.32 puts in its ORCA report, in its order.

        @return: C{[("num_requests_waiting", float), ..., ("kv_cache_usage_perc", float), ...]},
            one pair per engine for each.
        """
        values = self.engine_values()
        return ([("num_requests_waiting", float(v["waiting"])) for v in values]
                + [("kv_cache_usage_perc", float(v["kv_cache_usage"])) for v in values])

    def _done(self, job, size):
        now = time.monotonic()
        hist = self._hists[job.engine]
        self._success[job.engine]["length"] += 1
        hist["vllm:e2e_request_latency_seconds"].observe(now - job.arrived)
        hist["vllm:request_queue_time_seconds"].observe(job.started - job.arrived)
        hist["vllm:request_inference_time_seconds"].observe(now - job.started)
        hist["vllm:request_prefill_time_seconds"].observe(job.first_token - job.started)
        hist["vllm:request_decode_time_seconds"].observe(now - job.first_token)
        hist["vllm:time_to_first_token_seconds"].observe(job.first_token - job.arrived)
        hist["vllm:request_prompt_tokens"].observe(job.prompt_tokens)
        hist["vllm:request_prefill_kv_computed_tokens"].observe(job.prompt_tokens)
        hist["vllm:request_generation_tokens"].observe(job.chunks)
        hist["vllm:request_params_n"].observe(1)
        hist["vllm:request_params_max_tokens"].observe(job.body.get("max_tokens") or 16)
        hist["vllm:request_max_num_generation_tokens"].observe(job.body.get("max_tokens") or 16)
        hist["vllm:iteration_tokens_total"].observe(job.prompt_tokens)
        if job.chunks > 1:
            per_token = (now - job.first_token) / (job.chunks - 1)
            hist["vllm:request_time_per_output_token_seconds"].observe(per_token)
            hist["vllm:inter_token_latency_seconds"].observe(per_token)
        self._count_http(job.request.path, b"POST", job.request.code, now - job.arrived, len(job.record.raw_body),
                         size)
        self.served += 1
        self._remove(job)
        self._promote()

    def _remove(self, job):
        job.state = "done"
        if job in self._running:
            self._running.remove(job)
        if job in self._waiting_jobs:
            self._waiting_jobs.remove(job)

    def _lost(self, job):
        if job.state == "done":
            return
        job.gone = True
        self._success[job.engine]["abort"] += 1
        if self._hang and job.state == "running":
            return  # a stuck engine does not process the abort
        self._remove(job)
        self._promote()

    def _count_http(self, path, method, status, seconds, request_size, response_size):
        handler = path.decode("latin-1")
        key = (handler, method.decode("latin-1"), f"{status // 100}xx")
        entry = self._http.setdefault(key, [0, 0.0, 0, 0])
        entry[0] += 1
        entry[1] += seconds
        entry[2] += request_size
        entry[3] += response_size
        self._highr.observe(seconds)

    # -- /metrics ---------------------------------------------------------------------

    def engine_values(self):
        """The scraped values per engine, overrides applied.

        @return: a list (one per engine) of dicts with C{running}, C{waiting},
            C{kv_cache_usage}, C{generation_tokens}.
        """
        values = []
        for engine in range(self.engines):
            running = sum(1 for job in self._running if job.engine == engine)
            waiting = sum(1 for job in self._waiting_jobs if job.engine == engine)
            if self.max_running:
                kv = min(1.0, running / max(1.0, self.max_running / self.engines))
            else:
                kv = min(1.0, 0.05 * running)
            values.append({"running": running, "waiting": waiting, "kv_cache_usage": kv,
                           "generation_tokens": self._generation_tokens[engine]})
        for key in ("running", "waiting", "kv_cache_usage", "generation_tokens"):
            if key in self.metrics:
                override = self.metrics[key]
                for engine, v in enumerate(values):
                    if isinstance(override, (list, tuple)):
                        v[key] = override[engine] if engine < len(override) else 0
                    else:
                        v[key] = override if engine == 0 else 0
        return values

    def metrics_page(self):
        """Render C{/metrics} as vLLM 0.32 (prometheus_client 0.26) does.

        @return: the page, bytes.
        """
        values = self.engine_values()
        model = self.models[0] if self.models else CHAT_MODEL
        per_engine = [{"engine": str(e), "model_name": model} for e in range(self.engines)]
        page = _Page(self._created)
        start = self.metrics.get("start_time", self._start_time)
        uptime = max(0.0, time.time() - start)
        page.family("python_gc_objects_collected_total", "Objects collected during gc", "counter",
                    [({"generation": str(g)}, v) for g, v in enumerate((10395.0, 1556.0, 360.0))], created=False)
        page.family("python_gc_objects_uncollectable_total", "Uncollectable objects found during GC", "counter",
                    [({"generation": str(g)}, 0.0) for g in range(3)], created=False)
        page.family("python_gc_collections_total", "Number of times this generation was collected", "counter",
                    [({"generation": str(g)}, v) for g, v in enumerate((1372.0, 124.0, 8.0))], created=False)
        page.family("python_info", "Python platform information", "gauge",
                    [({"implementation": "CPython", "major": "3", "minor": "12", "patchlevel": "3",
                       "version": "3.12.3"}, 1.0)])
        page.family("process_virtual_memory_bytes", "Virtual memory size in bytes.", "gauge", [({}, 1.47134464e+10)])
        page.family("process_resident_memory_bytes", "Resident memory size in bytes.", "gauge",
                    [({}, 6.508544e+09)])
        page.family("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
                    "gauge", [({}, start)])
        page.family("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", "counter",
                    [({}, round(uptime * 0.8, 2))], created=False)
        page.family("process_open_fds", "Number of open file descriptors.", "gauge", [({}, 61.0)])
        page.family("process_max_fds", "Maximum number of open file descriptors.", "gauge", [({}, 1048576.0)])
        self._http_families(page)
        for what, help_ in (("flops", "Estimated number of floating point operations per GPU"),
                            ("read_bytes", "Estimated number of bytes read from memory per GPU"),
                            ("write_bytes", "Estimated number of bytes written to memory per GPU")):
            page.family(f"vllm:estimated_{what}_per_gpu_total",
                        f"{help_} (for Model Flops Utilization calculations).", "counter",
                        [(labels, 1.6e10 * values[e]["generation_tokens"]) for e, labels in enumerate(per_engine)])
        page.family("vllm:num_requests_running", "Number of requests in model execution batches.", "gauge",
                    [(labels, values[e]["running"]) for e, labels in enumerate(per_engine)])
        page.family("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "gauge",
                    [(labels, values[e]["waiting"]) for e, labels in enumerate(per_engine)])
        page.family("vllm:num_requests_waiting_by_reason",
                    "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling "
                    "capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked "
                    "status). Sum of all reasons equals vllm:num_requests_waiting.", "gauge",
                    [(dict(labels, reason=r), values[e]["waiting"] if r == "capacity" else 0.0)
                     for r in WAITING_REASONS for e, labels in enumerate(per_engine)])
        page.family("vllm:engine_sleep_state",
                    "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
                    "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.", "gauge",
                    [(dict(labels, sleep_state=s), 1.0 if s == "awake" else 0.0)
                     for s in SLEEP_STATES for labels in per_engine])
        page.family("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "gauge",
                    [(labels, values[e]["kv_cache_usage"]) for e, labels in enumerate(per_engine)])
        page.family("vllm:watermark_requests_total",
                    "Finished requests by watermark status (only with watermark_config).", "counter",
                    [(dict(labels, status=s), 0.0) for s in WATERMARK_STATUSES for labels in per_engine])
        page.family("vllm:prefix_cache_queries_total",
                    "Prefix cache queries, in terms of number of queried tokens.", "counter",
                    [(labels, self._prefix_queries[e]) for e, labels in enumerate(per_engine)])
        page.family("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.",
                    "counter", [(labels, self._prefix_cached[e]) for e, labels in enumerate(per_engine)])
        page.family("vllm:external_prefix_cache_queries_total",
                    "External prefix cache queries from KV connector cross-instance cache sharing, in terms of "
                    "number of queried tokens.", "counter", [(labels, 0.0) for labels in per_engine])
        page.family("vllm:external_prefix_cache_hits_total",
                    "External prefix cache hits from KV connector cross-instance cache sharing, in terms of "
                    "number of cached tokens.", "counter", [(labels, 0.0) for labels in per_engine])
        page.family("vllm:mm_cache_queries_total", "Multi-modal cache queries, in terms of number of queried items.",
                    "counter", [(labels, 0.0) for labels in per_engine])
        page.family("vllm:mm_cache_hits_total", "Multi-modal cache hits, in terms of number of cached items.",
                    "counter", [(labels, 0.0) for labels in per_engine])
        page.family("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.", "counter",
                    [(labels, 0.0) for labels in per_engine])
        page.family("vllm:prompt_tokens_total", "Number of prefill tokens processed.", "counter",
                    [(labels, self._prompt_tokens[e]) for e, labels in enumerate(per_engine)])
        page.family("vllm:prompt_tokens_by_source_total", "Number of prompt tokens by source.", "counter",
                    [(dict(labels, source=s),
                      {"local_compute": self._prompt_tokens[e] - self._prefix_cached[e],
                       "local_cache_hit": self._prefix_cached[e]}.get(s, 0.0))
                     for s in PROMPT_SOURCES for e, labels in enumerate(per_engine)])
        page.family("vllm:prompt_tokens_cached_total", "Number of cached prompt tokens (local + external).",
                    "counter", [(labels, self._prefix_cached[e]) for e, labels in enumerate(per_engine)])
        page.family("vllm:prompt_tokens_cached_by_source_total",
                    "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), host "
                    "(offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or "
                    "external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + "
                    "vllm:external_prefix_cache_hits.", "counter",
                    [(dict(labels, source=s), self._prefix_cached[e] if s == "device" else 0.0)
                     for s in CACHED_SOURCES for e, labels in enumerate(per_engine)])
        page.family("vllm:generation_tokens_total", "Number of generation tokens processed.", "counter",
                    [(labels, values[e]["generation_tokens"]) for e, labels in enumerate(per_engine)])
        page.family("vllm:request_success_total", "Count of successfully processed requests.", "counter",
                    [(dict(labels, finished_reason=r), self._success[e][r] if r != "abort" else 0.0)
                     for r in FINISHED_REASONS for e, labels in enumerate(per_engine)])
        page.family("vllm:admission_rejections_total",
                    "Number of admission attempts rejected by a queue limit, by reason.", "counter",
                    [({"model_name": model, "reason": r}, 0.0)
                     for r in ("max_num_queued_reqs", "max_num_queued_tokens")])
        for name, help_, _ in HISTOGRAMS:
            page.histogram(name, help_, [(labels, self._hists[e][name]) for e, labels in enumerate(per_engine)])
        page.family("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", "gauge", [({
            "block_size": "16", "cache_dtype": "auto", "calculate_kv_scales": "False",
            "cpu_offload_gb": "0", "enable_prefix_caching": str(bool(self.prefix_cache)),
            "gpu_memory_utilization": "0.9", "is_attention_free": "False", "num_cpu_blocks": "None",
            "num_gpu_blocks": "27153", "num_gpu_blocks_override": "None", "prefix_caching_hash_algo": "sha256",
            "sliding_window": "None", "swap_space": "4", "swap_space_bytes": "4294967296"}, 1.0)])
        return page.render()

    def _http_families(self, page):
        """prometheus-fastapi-instrumentator's families, as vLLM's API server exposes them."""
        handlers = sorted(self._http) or [("/v1/models", "GET", "2xx")]
        page.family("http_requests_total", "Total number of requests by method, status and handler.", "counter",
                    [({"handler": h, "method": m, "status": s}, self._http.get((h, m, s), [0])[0])
                     for h, m, s in handlers])
        by_handler = {}
        for (h, m, s), entry in self._http.items():
            sizes = by_handler.setdefault(h, [0, 0, 0])
            sizes[0] += entry[0]
            sizes[1] += entry[2]
            sizes[2] += entry[3]
        rows = sorted(by_handler.items()) or [("/v1/models", [0, 0, 0])]
        page.summary("http_request_size_bytes",
                     "Content length of incoming requests by handler. Only value of header is respected. "
                     "Otherwise ignored. No percentile calculated. ",
                     [({"handler": h}, c, req) for h, (c, req, _) in rows])
        page.summary("http_response_size_bytes",
                     "Content length of outgoing responses by handler. Only value of header is respected. "
                     "Otherwise ignored. No percentile calculated. ",
                     [({"handler": h}, c, resp) for h, (c, _, resp) in rows])
        page.histogram("http_request_duration_highr_seconds",
                       "Latency with many buckets but no API specific labels. Made for more accurate percentile "
                       "calculations. ", [({}, self._highr)])
        series = []
        for (h, m, s), entry in sorted(self._http.items()):
            hist = _Histogram((0.1, 0.5, 1.0))
            hist.counts = [entry[0]] * 4  # approximate: all fast
            hist.sum = entry[1]
            series.append(({"handler": h, "method": m}, hist))
        page.histogram("http_request_duration_seconds",
                       "Latency with only few buckets by handler. Made to be only used if aggregation by handler "
                       "is important. ", series or [({"handler": "/v1/models", "method": "GET"},
                                                     _Histogram((0.1, 0.5, 1.0)))])


class FakeFleet:
    """C{n} L{FakeReplica}s; index it (C{fleet[0]}), iterate it, C{len()} it."""

    def __init__(self, reactor, n, **kwargs):
        """
        @param reactor: the reactor.
        @param n: the number of replicas.
        @param kwargs: passed to every L{FakeReplica} (C{name} becomes C{<name>-<i>}).
        """
        name = kwargs.pop("name", "replica")
        self.replicas = [FakeReplica(reactor, name=f"{name}-{i}", **kwargs) for i in range(n)]

    def start(self) -> Deferred:
        """Start every replica.

        @return: a Deferred firing with self once all listen.
        """
        return gatherResults([r.start() for r in self.replicas], consumeErrors=True).addCallback(lambda _: self)

    def stop(self) -> Deferred:
        """Stop every replica (ports closed, timers cancelled, connections aborted).

        @return: a Deferred firing when all are down.
        """
        return gatherResults([r.stop() for r in self.replicas], consumeErrors=True).addCallback(lambda _: None)

    def __getitem__(self, index):
        """@return: the replica at C{index}."""
        return self.replicas[index]

    def __len__(self):
        """@return: the number of replicas."""
        return len(self.replicas)

    def __iter__(self):
        """@return: an iterator over the replicas."""
        return iter(self.replicas)

    @property
    def base_urls(self):
        """@return: every replica's C{http://127.0.0.1:PORT/v1}, in index order."""
        return [r.base_url for r in self.replicas]

    @property
    def env_value(self):
        """@return: the comma-joined base URLs, for C{VLLM_BASE_URL}."""
        return ",".join(self.base_urls)

    def set(self, **knobs):
        """Set the same knobs on every replica (C{fleet.set(latency=0.1)})."""
        for replica in self.replicas:
            for key, value in knobs.items():
                setattr(replica, key, value)

    def distribution(self):
        """@return: inference requests (POSTs) received per replica index."""
        return [len(r.inference_requests) for r in self.replicas]

    @property
    def requests(self):
        """@return: every replica's recorded requests, in arrival order."""
        return sorted((r for replica in self.replicas for r in replica.requests), key=lambda r: r.time)
