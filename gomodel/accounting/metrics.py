"""Prometheus metrics, fed by every completed request's context and read from the replica pools.

GoModel's three series with its names and labels (C{gomodel_requests_total},
C{gomodel_request_duration_seconds}, C{gomodel_requests_in_flight}), and
what it lacks: time to first token, tokens by type, upstream errors, retries
(failovers before the first byte), client disconnects, batch lines by state, cost (as the usage ledger prices
tokens, worked out at each flush from the tokens a series added), and each replica's
state, in-flight count and last reported vLLM load. Labels stay bounded: provider type and name, the model as routed
(C{provider/upstream-model} where the provider lists it, never what a client typed: C{-} for a name a provider whose
models are not known yet was given), the gateway route. A managed key's requests and tokens
have series of their own, named by the key's id and name (never its secret; keys are made by the admin API).

A completed request adds to plain counters of its series (L{_Pending}); they
reach the Prometheus series on every scrape and every L{FLUSH_INTERVAL}
seconds (L{MetricsFlush}): a counter's C{inc} or a histogram's C{observe}
takes a lock and, for the histogram, walks its buckets in Python, several
hundred bytecodes a request. With C{--workers}, every process writes its
series to one directory (prometheus_client's multiprocess mode,
C{PROMETHEUS_MULTIPROC_DIR}, set by L{gomodel.tap}) and a scrape, whichever
process answers it, sums them all, each other process's requests within a
flush interval (the requests in flight too: each process sets its own at each
flush); the replica series are those of the process that answers.
"""

from bisect import bisect_left
from operator import add

from gomodel.accounting.tokens import TOKEN_TYPES, audio_seconds, tokens_by_type
from gomodel.errors import ShuttingDown
from gomodel.http.context import CLIENT_GONE, CLIENT_STALLED, OK, STREAM_BROKEN, STREAM_MAX_DURATION
from gomodel.lean import package_without_init, tls_stub
from gomodel.periodic import Repeating

with tls_stub():  # (its TLS exporters' defaults need ssl at import, where its __init__ is run: never used here)
    package_without_init("prometheus_client")  # (its __init__ imports its HTTP servers: see L{GatewayMetrics.page})
    from prometheus_client.metrics import Counter, Gauge, Histogram
    from prometheus_client.metrics_core import GaugeMetricFamily
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
    from prometheus_client.registry import CollectorRegistry

# The media type of OpenMetrics' text format, in a scraper's Accept header (L{GatewayMetrics.page}).
_OPENMETRICS = b"application/openmetrics-text"
# Seconds: from a millisecond relay to a ten-minute generation.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_REQUEST = ("provider", "provider_name", "model", "endpoint")
FLUSH_INTERVAL = 1.0  # seconds between two flushes of what requests added (L{GatewayMetrics.flush})
KEY_SERIES_KEPT = 10000  # managed keys' series kept by their label values (past it, looked up again once each)
# The errors of a stream the gateway cut itself (a drain out of time, a client that stopped reading, its maximum
# duration): no upstream's failure.
CUT_HERE = frozenset((ShuttingDown.code, CLIENT_STALLED, STREAM_MAX_DURATION))
_UPSTREAM_ERRORS = frozenset(("upstream_unreachable", "upstream_timeout", "bad_upstream_response",
                              "stream_incomplete", "no_ready_replica", "replicas_busy", "upstream_stream_error",
                              "upstream_auth_failed"))


class GatewayMetrics:
    """The gateway's series in one registry; a request-context sink (call it with a completed context)."""

    def __init__(self, pools=(), registry=None, *, shared=False, in_flight=None, probes=(), pricing=None, listed=None):
        """
        @param shared: several processes write to prometheus_client's multiprocess
            directory: a scrape sums them all.
        @param in_flight: a function giving the request contexts in flight now (the drain's), read at
            each flush (nothing to do per request); without it, none are shown.
        @param probes: paths (bytes) of the health probes, which are no traffic: counted in no series (each also
            with a trailing slash, which the gateway serves as the same path).
        @param pricing: the usage ledger's L{gomodel.accounting.tokens.Pricing}, or None: what tokens cost is
            worked out at each flush from the tokens each series added (a price is per token: the same sum).
        @param listed: C{listed(provider name, upstream model)}, whether the provider lists that model
            (L{gomodel.routing.registry.ModelRegistry.lists}); a model it does not is labelled C{-}. None: every one
            is labelled.
        """
        self._pricing = pricing or None
        self._listed = listed
        self._labelled = {}  # (provider name, upstream model) -> its model label, of the models a provider listed
        self._probes = frozenset(probes) | {path + b"/" for path in probes}
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._requests = Counter("gomodel_requests_total", "Requests answered, by provider, model, route, status.",
                                 _REQUEST + ("status_code", "status_type", "stream"), registry=r)
        self._duration = Histogram("gomodel_request_duration_seconds", "Time from a request's head to its end.",
                                   _REQUEST + ("stream",), buckets=DURATION_BUCKETS, registry=r)
        self._in_flight = Gauge("gomodel_requests_in_flight", "Requests being served now.",
                                ("provider", "endpoint", "stream"), registry=r, multiprocess_mode="livesum")
        self._live = in_flight
        self._in_flight_shown = {}  # label values -> the series, each shown so far (set to 0 once none is left)
        self._children = {}  # label values -> the series they name (labels() costs a lock and a check each)
        self._pending = {}  # label values -> what requests added to those series since the last flush
        self._apart = {}  # (provider type, name, model, principal) -> tokens by type of batch lines and background
        self._ttft = Histogram("gomodel_time_to_first_token_seconds",
                               "Time from a streamed request's head to its first byte to the client.",
                               ("provider", "provider_name", "model"), buckets=TTFT_BUCKETS, registry=r)
        self._tokens = Counter("gomodel_tokens_total", "Tokens, by type: input, output, cached, reasoning.",
                               ("provider", "provider_name", "model", "type"), registry=r)
        self._audio = Counter("gomodel_audio_seconds_total", "Seconds of audio transcribed or translated, as the "
                              "upstream billed them (a usage in seconds, whisper's).",
                              ("provider", "provider_name", "model"), registry=r)
        self._errors = Counter("gomodel_upstream_errors_total", "Requests an upstream failed, by error code.",
                               ("provider", "provider_name", "model", "code"), registry=r)
        self._gone = Counter("gomodel_client_disconnects_total", "Requests whose client left before the end.",
                             _REQUEST, registry=r)
        self._retries = Counter("gomodel_upstream_retries_total",
                                "Requests that went on, before their first byte, to another replica of the provider "
                                "or to another target: their send failed, or the provider could not take them.",
                                ("provider", "provider_name", "to"), registry=r)
        batch_lines = Counter("gomodel_batch_lines_total", "Batch lines answered, by state: completed or failed.",
                              ("state",), registry=r)
        self._batch_lines = {True: batch_lines.labels("completed"), False: batch_lines.labels("failed")}
        self._key_requests = Counter("gomodel_auth_key_requests_total", "A managed key's requests, by status.",
                                     ("auth_key_id", "auth_key_name", "status_code"), registry=r)
        self._key_tokens = Counter("gomodel_auth_key_tokens_total", "A managed key's tokens, by type.",
                                   ("auth_key_id", "auth_key_name", "type"), registry=r)
        self._cost = Counter("gomodel_cost_total", "What the tokens cost, in the pricing table's currency, as the usage "
                             "ledger prices them (a model without a price has no series).",
                             ("provider", "provider_name", "model"), registry=r)
        self._key_cost = Counter("gomodel_auth_key_cost_total", "What a managed key's tokens cost, in the pricing "
                                 "table's currency.", ("auth_key_id", "auth_key_name"), registry=r)
        self._costs = {}  # (provider type, name, model) -> its cost series, once it has cost something
        # (managed key id, name, status) -> its requests series and its tokens series by type (L{_key_series})
        self._key_children = {}
        self._exposed = self.registry
        if shared:  # --workers: a scrape reads every process's files
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed)
        if pools:
            self._exposed.register(ReplicaCollector(pools))

    def page(self, request) -> bytes:
        """The exposition of every series (the C{METRICS_ENDPOINT} route), in the format the scraper asks for, as
        prometheus_client's own server chooses it: OpenMetrics where its C{Accept} names it (Prometheus' scrapes
        ask for it first), from prometheus_client's OpenMetrics C{generate_latest}; else the Prometheus text
        format, from its C{generate_latest}, whose module imports its HTTP servers and push clients (never used
        here): loaded at the first such scrape, not by every process at start."""
        if _OPENMETRICS in (request.getHeader(b"accept") or b""):
            from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST, generate_latest
        else:
            with tls_stub():  # (its push clients' TLS defaults, as at start)
                from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
        self.flush()
        body = generate_latest(self._exposed)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

    def __call__(self, ctx):
        """A request is over (see L{gomodel.http.context.RequestContext.complete}); a probe is not counted."""
        if ctx.endpoint is None and ctx.path in self._probes:  # (no route of the gateway's has its endpoint)
            return
        # (the series' labels, then who sent it: a managed key's requests and tokens are its series' too, summed at
        # the flush: nothing more per request; a stream is one asked for too, one that failed before it began)
        outcome = ctx.outcome
        key = (ctx.provider_type, ctx.provider, ctx.upstream_model, ctx.endpoint, ctx.status,
               ctx.stream or ctx.asked_stream, outcome == OK, ctx.principal)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending()
        pending.requests += 1
        duration = ctx.duration
        pending.durations[bisect_left(DURATION_BUCKETS, duration)] += 1  # as observe() finds its bucket
        pending.duration_sum += duration
        if ctx.stream and ctx.first_byte is not None:
            pending.ttfts[bisect_left(TTFT_BUCKETS, ctx.first_byte)] += 1
            pending.ttft_sum += ctx.first_byte
        usage = ctx.usage
        if usage:
            # (added in place, one by one: list(map(add, ...)) is fewer bytecodes, some 2,000 instructions more)
            counts = ctx.token_counts
            tokens = pending.tokens
            tokens[0] += counts[0]
            tokens[1] += counts[1]
            tokens[2] += counts[2]
            tokens[3] += counts[3]
            if "seconds" in usage:  # (a transcription billed in seconds: no tokens)
                pending.seconds += audio_seconds(usage) or 0.0
        error = ctx.error
        if outcome == OK and error is None:  # (gone well, its status below 400: neither a client gone nor an error)
            return
        if outcome == CLIENT_GONE:
            self._gone.labels(*self._names(ctx), ctx.endpoint or "other").inc()
        if ctx.provider is not None and (error in _UPSTREAM_ERRORS or (outcome == STREAM_BROKEN and error not in CUT_HERE)
                                         or (ctx.status >= 500 and error is None)):
            self._errors.labels(*self._names(ctx), error or f"http_{ctx.status}").inc()

    def retried(self, pool, to):
        """A request goes on from C{pool} to another C{to} (C{"replica"} of it, or C{"target"}) before its first
        byte (L{gomodel.proxy.exchange.Exchange.failed_over})."""
        self._retries.labels(pool.type, pool.name, to).inc()

    def tokens_apart(self, provider_type, provider, model, usage, principal=None, endpoint=None):
        """Add the C{usage} of what no request's end counts, a batch line's answer or a background response's
        (each kept in the usage ledger apart), to C{gomodel_tokens_total} (and a managed key's) at the next flush.

        @param model: C{provider/upstream-model} as the ledger names it, or None.
        @param endpoint: the route it was made on (not a label of these series).
        """
        if not usage:
            return
        key = (provider_type, provider, model, principal)
        counts = tokens_by_type(usage)
        added = self._apart.get(key)
        self._apart[key] = counts if added is None else tuple(map(add, added, counts))

    def batch_lines(self, ok, count):
        """C{count} batch lines got their result (L{gomodel.batches.runner.BatchRunner.lines_recorded}): an
        output (C{ok}) or an error."""
        self._batch_lines[ok].inc(count)

    def flush(self):
        """Add what requests added since the last flush to their series, and count the requests in flight
        by GoModel's labels: provider (type), endpoint, stream."""
        if self._live is not None:
            counts = dict.fromkeys(self._in_flight_shown, 0)
            for ctx in self._live():
                if ctx.endpoint is None and ctx.path in self._probes:
                    continue
                key = (ctx.provider_type or "-", ctx.endpoint or "other",
                       "true" if ctx.stream or ctx.asked_stream else "false")
                counts[key] = counts.get(key, 0) + 1
            for key, count in counts.items():
                series = self._in_flight_shown.get(key)
                if series is None:
                    series = self._in_flight_shown[key] = self._in_flight.labels(*key)
                series.set(count)
        pending, self._pending = self._pending, {}
        keys = {}  # (managed key id, name, status) -> [requests, tokens by type]
        for key, added in pending.items():
            labels, principal = key[:7], key[7]
            series = self._children.get(labels)
            if series is None:
                series = self._series(*labels)
                if labels[2] is None or (labels[1], labels[2]) in self._labelled:  # (not one a client made up)
                    self._children[labels] = series
            requests, duration, ttft, tokens = series
            requests.inc(added.requests)
            if added.seconds:
                self._audio.labels(*self._series_names(*labels[:3])).inc(added.seconds)
            _observed(duration, added.durations, added.duration_sum)
            if added.ttft_sum or any(added.ttfts):
                _observed(ttft, added.ttfts, added.ttft_sum)
            for child, count in zip(tokens, added.tokens):
                if count:
                    child.inc(count)
            cost = self._cost_of(labels[0], labels[1], labels[2], added.tokens, added.seconds) if self._pricing else 0.0
            if principal is not None and not principal.master:
                named = keys.get((principal.id, principal.name, labels[4]))
                if named is None:
                    named = keys[(principal.id, principal.name, labels[4])] = [0, [0] * len(TOKEN_TYPES), 0.0]
                named[0] += added.requests
                named[1] = list(map(add, named[1], added.tokens))
                named[2] += cost
        for (key_id, name, status), (requests, tokens, cost) in keys.items():
            children = self._key_children.get((key_id, name, status)) or self._key_series(key_id, name, status)
            children[0].inc(requests)
            for child, count in zip(children[1], tokens):
                if count:
                    child.inc(count)
            if cost:
                self._key_cost.labels(key_id, name).inc(cost)
        if self._apart:
            self._flush_apart()

    def _key_series(self, key_id, name, status) -> tuple:
        """The requests series of managed key C{key_id} (named C{name}) by C{status} and its tokens series by type
        (each made, at 0, as its first request is counted), kept: labels() costs a lock and a check each."""
        if len(self._key_children) > KEY_SERIES_KEPT:
            self._key_children.clear()
        children = self._key_children[(key_id, name, status)] = (
            self._key_requests.labels(key_id, name, str(status)),
            tuple(self._key_tokens.labels(key_id, name, kind) for kind in TOKEN_TYPES))
        return children

    def _flush_apart(self):
        """Add the tokens of L{tokens_apart} to their series."""
        apart, self._apart = self._apart, {}
        for (provider_type, provider, model, principal), tokens in apart.items():
            label = self._apart_model(provider, model)
            for kind, count in zip(TOKEN_TYPES, tokens):
                if count:
                    self._tokens.labels(provider_type or "-", provider or "-", label, kind).inc(count)
                    if principal is not None and not principal.master:
                        self._key_tokens.labels(principal.id, principal.name, kind).inc(count)
            if self._pricing and model:
                cost = self._priced(provider_type or "-", provider or "-", model, tokens)
                if cost and principal is not None and not principal.master:
                    self._key_cost.labels(principal.id, principal.name).inc(cost)

    def _apart_model(self, provider, model) -> str:
        """The model label of C{model} (C{provider/upstream-model} as the ledger names it) of L{tokens_apart}: as a
        request's (L{_model}), C{-} for one its provider does not list."""
        if not model or not provider or not model.startswith(provider + "/"):
            return "-"
        return self._model(provider, model[len(provider) + 1:])

    def _cost_of(self, provider_type, provider, upstream_model, tokens, seconds=0.0) -> float:
        """What C{tokens} (by type) and C{seconds} of audio cost on a series' model (L{_priced}); 0.0 without one."""
        if not upstream_model or not (seconds or any(tokens)):
            return 0.0
        return self._priced(provider_type or "-", provider or "-", f"{provider}/{upstream_model}", tokens, seconds)

    def _priced(self, provider_type, provider, model, tokens, seconds=None) -> float:
        """Add what C{tokens} (by type) and C{seconds} of audio cost on C{model} (C{provider/upstream-model}) to
        its cost series.

        @return: that cost; 0.0 for a model without a price.
        """
        cost = self._pricing.costs(model, tokens, seconds)[2]
        if not cost:
            return 0.0
        series = self._costs.get((provider_type, provider, model))
        if series is None:
            series = self._costs[(provider_type, provider, model)] = self._cost.labels(provider_type, provider, model)
        series.inc(cost)
        return cost

    def _series(self, provider_type, provider, upstream_model, endpoint, status, stream, ok):
        """The series one kind of request feeds: requests, duration, time to first token, tokens by type.

        @param ok: whether it went out whole and well (its C{status_type} is C{error} otherwise: a status of
            400 or above, a stream the upstream broke or reported an error in, though its status was 200).
        """
        names = self._series_names(provider_type, provider, upstream_model)
        endpoint = endpoint or "other"
        stream = "true" if stream else "false"
        return (self._requests.labels(*names, endpoint, str(status), "success" if ok else "error", stream),
                self._duration.labels(*names, endpoint, stream), self._ttft.labels(*names),
                tuple(self._tokens.labels(*names, kind) for kind in TOKEN_TYPES))

    def _names(self, ctx):
        """The provider (type), provider name and model labels of C{ctx}'s request."""
        return self._series_names(ctx.provider_type, ctx.provider, ctx.upstream_model)

    def _series_names(self, provider_type, provider, upstream_model) -> tuple:
        """The C{provider}, C{provider_name} and C{model} labels of a request's series."""
        return provider_type or "-", provider or "-", self._model(provider, upstream_model)

    def _model(self, provider, upstream_model) -> str:
        """The model label of a request C{provider} got as C{upstream_model}: C{provider/upstream-model} where the
        provider lists it (L{listed}), else C{-} (a provider whose models are not known yet is given any name a
        client types: never a label, which would make series without bound)."""
        if not upstream_model:
            return "-"
        name = self._labelled.get((provider, upstream_model))
        if name is None:
            if self._listed is not None and not self._listed(provider, upstream_model):
                return "-"
            name = self._labelled[(provider, upstream_model)] = f"{provider}/{upstream_model}"
        return name


class _Pending:
    """What one kind of request added to its series since the last flush: requests, their durations and
    times to first token by bucket (the last one +Inf) and summed, tokens by type and seconds of audio."""

    __slots__ = ("requests", "durations", "duration_sum", "ttfts", "ttft_sum", "tokens", "seconds")

    def __init__(self):
        self.requests = 0
        self.durations = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.ttfts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.tokens = [0] * len(TOKEN_TYPES)
        self.seconds = 0.0


def _observed(histogram, counts, total):
    """Add to a histogram's series (a labelled child) observations counted by bucket and summed: what
    C{observe} does for each, at once. prometheus_client keeps a child's per-bucket counts (the last one
    +Inf) in C{_buckets} and their sum in C{_sum} (checked by C{tests/test_metrics.py})."""
    histogram._sum.inc(total)
    for bucket, count in zip(histogram._buckets, counts):
        if count:
            bucket.inc(count)


class MetricsFlush(Repeating):
    """Flushes the gateway's metrics (L{GatewayMetrics.flush}) every L{FLUSH_INTERVAL} seconds while it
    runs, and once more when it stops (after the drain: nothing a request added is left behind)."""

    def __init__(self, metrics, clock):
        super().__init__(FLUSH_INTERVAL, metrics.flush, clock)

    def stopService(self):
        self.call()
        return super().stopService()


class ReplicaCollector:
    """Each replica's state, requests in flight and last reported vLLM load, read at scrape time."""

    def __init__(self, pools):
        self._pools = pools

    def describe(self):
        return []

    def collect(self):
        labels = ("provider", "provider_name", "replica")
        up = GaugeMetricFamily("gomodel_replica_up", "1 while the replica is ready, else 0.", labels=labels)
        state = GaugeMetricFamily("gomodel_replica_state", "1 for the replica's state.", labels=labels + ("state",))
        in_flight = GaugeMetricFamily("gomodel_replica_in_flight", "The gateway's requests in flight there.",
                                      labels=labels)
        waiting = GaugeMetricFamily("gomodel_replica_waiting", "vLLM's last reported queue.", labels=labels)
        running = GaugeMetricFamily("gomodel_replica_running", "vLLM's last reported running requests.",
                                    labels=labels)
        kv = GaugeMetricFamily("gomodel_replica_kv_cache_usage", "vLLM's last reported KV-cache use (0-1).",
                               labels=labels)
        held = GaugeMetricFamily("gomodel_replica_held_seconds", "Seconds a replica taken down by failed requests "
                                 "is still held out (0: none).", labels=labels)
        trial = GaugeMetricFamily("gomodel_replica_trial", "1 while a replica readmitted after a hold is on "
                                  "trial (one request at a time), else 0.", labels=labels)
        busy = GaugeMetricFamily("gomodel_replica_busy_seconds", "Seconds a replica that answered with Retry-After "
                                 "is still passed over while another can serve (0: none).", labels=labels)
        for pool in self._pools:
            for replica in pool.replicas:
                values = (pool.type, pool.name, str(replica.index))
                busy.add_metric(values, replica.busy_for())
                up.add_metric(values, 1.0 if replica.ready else 0.0)
                state.add_metric(values + (replica.state,), 1.0)
                held.add_metric(values, replica.held_for())
                trial.add_metric(values, 1.0 if replica.trial else 0.0)
                in_flight.add_metric(values, replica.in_flight)
                load = replica.load
                if load is not None:
                    for family, value in ((waiting, load.waiting), (running, load.running),
                                          (kv, load.kv_cache_usage)):
                        if value is not None:
                            family.add_metric(values, value)
        return [up, state, in_flight, waiting, running, kv, held, trial, busy]


def forget_process(pid):
    """A worker process is gone: its live gauges (in flight) stop counting in the shared directory."""
    mark_process_dead(pid)
