"""OpenTelemetry: a server span per request, a client span per upstream attempt, the GenAI metrics.

Off unless C{OTEL_ENABLED=true} (YAML C{metrics: {otel_enabled: true}}); then
spans and metrics go out over OTLP/HTTP (protobuf) through the official SDK,
which reads its standard C{OTEL_*} variables from the process environment
itself: C{OTEL_EXPORTER_OTLP_ENDPOINT} (or C{..._TRACES_ENDPOINT},
C{..._METRICS_ENDPOINT}), C{OTEL_EXPORTER_OTLP_HEADERS},
C{OTEL_EXPORTER_OTLP_TIMEOUT}, C{OTEL_SERVICE_NAME} (C{gomodel} when unset),
C{OTEL_RESOURCE_ATTRIBUTES}, C{OTEL_TRACES_SAMPLER} and its C{_ARG},
C{OTEL_BSP_*}, C{OTEL_METRIC_EXPORT_INTERVAL}. Nothing of OpenTelemetry is
imported while it is off: a request then costs a None check at the front and
a few in the exchange, no more.

Spans (never a body, prompt, completion, key or client address; none for the
probes C{/health}, C{/health/ready} and the metrics scrape):

  - one C{SERVER} span per request, C{POST /v1/chat/completions}, continuing
    the client's W3C C{traceparent}: the route, status, the GenAI operation,
    the model as named and as served, the provider type and instance, the
    replica, the tokens and the request id; its status is an error for a 5xx,
    a broken stream, a stream the upstream sent an error event in and a
    client that left;
  - one C{CLIENT} span per upstream attempt, its child (C{chat <model>}): the
    provider, replica, C{server.address}/C{server.port} of that replica, the
    attempt's number and why the attempt before it failed, the status the
    upstream answered; it ends when the answer was relayed (or failed over),
    and its context goes upstream as C{traceparent}.

Metrics (the GenAI semantic conventions; the gateway is the GenAI client of its
upstreams): C{gen_ai.client.token.usage}, C{gen_ai.client.operation.duration}
and, for streams, C{gen_ai.client.operation.time_to_first_chunk}, by
C{gen_ai.operation.name}, C{gen_ai.provider.name}, C{gen_ai.request.model},
C{gen_ai.response.model} (only a model its provider lists, as Prometheus' model label), C{gomodel.provider}
and C{error.type}; the tokens of batch lines and background
responses too (L{Telemetry.tokens_apart}: no request's end records them), without a request model.

The SDK exports from its own threads; the stop flushes and shuts both
providers down off the reactor thread, after the drain, so nothing is lost,
for L{FLUSH_TIMEOUT} seconds at most: a collector that is down or slow does
not hold the stop up longer (its exporters would retry for their whole
timeout, traces then metrics), and what it did not take is dropped.
"""

import importlib.util
import os
import threading
import uuid
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from gomodel.accounting.tokens import tokens_by_type
from gomodel.config.errors import ConfigError
from gomodel.http.context import CLIENT_GONE, ERROR, STREAM_BROKEN

INSTRUMENTATION = "gomodel"
# The most seconds the stop's flush waits for the collector (after the drain): then the stop goes on and what
# was not exported is dropped.
FLUSH_TIMEOUT = 5.0

# The gateway route -> gen_ai.operation.name (the conventions' names; ours where they have none).
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/messages": "chat",
    "/v1/responses": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/rerank": "rerank",
    "/v1/score": "score",
    "/v1/classify": "classify",
    # vLLM's own pooling paths at its root, routed as their /v1 forms (Cohere's /v2/embed is embeddings)
    "/rerank": "rerank",
    "/v2/rerank": "rerank",
    "/score": "score",
    "/classify": "classify",
    "/pooling": "pooling",
    "/v2/embed": "embeddings",
    "/v1/audio/transcriptions": "transcription",
    "/v1/audio/translations": "translation",
    "/v1/audio/speech": "speech",
}
# Provider type -> gen_ai.provider.name where the conventions have a well-known value.
PROVIDER_NAMES = {"xai": "x_ai"}

# Bucket boundaries the conventions give (seconds; tokens).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
FIRST_CHUNK_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)

_NEEDED = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")


def check_installed():
    """Fail early when C{OTEL_ENABLED} is on without the SDK and the OTLP/HTTP exporter.

    @raise ConfigError: one of them is not installed.
    """
    for name in _NEEDED:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise ConfigError(f"OTEL_ENABLED=true needs the OpenTelemetry SDK and its OTLP/HTTP exporter "
                              f"({name} is not installed): pip install '.[otel]' from gomodel's source tree.")


class Telemetry(Service):
    """The tracer and meter providers, built at start and flushed at stop.

    A front C{tracer} hook (L{trace}: a request's head is in) and a
    request-context sink (call it with a completed context).
    """

    log = Logger()
    name = "telemetry"

    def __init__(self, reactor, quiet=(), listed=None):
        """
        @param reactor: the reactor: its clock, and its thread pool for the flush at stop.
        @param quiet: paths (bytes) that get no span: the probes and the metrics scrape (each also with a
            trailing slash, which the gateway serves as the same path).
        @param listed: C{listed(provider name, upstream model)}, whether the provider lists that model
            (L{gomodel.routing.registry.ModelRegistry.lists}): the metrics name only such a model, as
            Prometheus' model label does (a name a client typed would make streams without bound); spans
            name any. None: every one is named.
        """
        check_installed()
        self._reactor = reactor
        self.listed = listed
        self._quiet = frozenset(quiet) | {path + b"/" for path in quiet}
        self._tracer = self._tracers = self._meters = None
        self._exporters = ()
        self._otel = None
        self._hosts = {}  # replica base URL -> (server.address, server.port)

    # -- the service ------------------------------------------------------------------

    def startService(self):
        """Build the providers (their export threads start here, after twistd forked)."""
        super().startService()
        from opentelemetry import trace as api
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from gomodel import __version__

        resource = _resource()
        # Not the global providers: whoever else runs in this process keeps its own.
        self._exporters = spans, metrics = OTLPSpanExporter(), OTLPMetricExporter()
        self._tracers = TracerProvider(resource=resource, shutdown_on_exit=False)
        self._tracers.add_span_processor(BatchSpanProcessor(spans))
        self._meters = MeterProvider(resource=resource, shutdown_on_exit=False,
                                     metric_readers=[PeriodicExportingMetricReader(metrics)])
        self._tracer = self._tracers.get_tracer(INSTRUMENTATION, __version__)
        meter = self._meters.get_meter(INSTRUMENTATION, __version__)
        self._otel = _Kit(api, TraceContextTextMapPropagator())
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self._first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk", unit="s",
            description="Time from a streamed request's head to its first chunk.",
            explicit_bucket_boundaries_advisory=FIRST_CHUNK_BUCKETS)
        self.log.info("OpenTelemetry on: traces and GenAI metrics over OTLP/HTTP")

    def stopService(self):
        """Flush and shut both providers down, off the reactor thread, for L{FLUSH_TIMEOUT} seconds at most.

        One reactor turn first, so that requests cut at the end of the drain
        complete (and end their spans) before the flush.

        @return: a Deferred firing with None once both are shut down, or once L{FLUSH_TIMEOUT} has passed
            (it does not fail).
        """
        super().stopService()
        tracers, meters, exporters = self._tracers, self._meters, self._exporters
        self._tracer = self._tracers = self._meters = None
        self._exporters = ()
        if tracers is None:
            return None
        d = deferLater(self._reactor, 0, lambda: None)
        d.addCallback(lambda _: self._flush(tracers, meters, exporters))
        d.addErrback(lambda f: self.log.failure("flushing OpenTelemetry failed", f))
        return d

    def _flush(self, tracers, meters, exporters) -> Deferred:
        """L{_shut_down} in a thread of its own (a daemon: the process may exit while it still waits for the
        collector; the reactor's pool would be joined at exit).

        @return: a Deferred firing with None once it is done, or after L{FLUSH_TIMEOUT} seconds: then the
            exporters are shut down (they stop retrying) and what they held is dropped.
        """
        done = Deferred()
        reactor = self._reactor

        def flush():
            try:
                _shut_down(tracers, meters, FLUSH_TIMEOUT)
            except BaseException:
                reactor.callFromThread(done.errback, Failure())
            else:
                reactor.callFromThread(done.callback, None)

        def gave_up(result, timeout):
            self.log.warn("OpenTelemetry: the collector took more than {timeout:g}s at stop; the spans and "
                          "metrics it has not taken are dropped", timeout=timeout)
            for exporter in exporters:
                exporter.shutdown()
            return None

        threading.Thread(target=flush, name="gomodel-otel-flush", daemon=True).start()
        # (once timed out, the thread's own answer is ignored: a cancelled Deferred takes one more result)
        return done.addTimeout(FLUSH_TIMEOUT, reactor, onTimeoutCancel=gave_up)

    # -- the request path -----------------------------------------------------------------

    def trace(self, request, ctx):
        """A request's head is in: its server span, continuing the client's C{traceparent}.

        @return: the request's L{RequestTrace}, or None while not started or for a quiet path.
        """
        tracer = self._tracer
        if tracer is None or ctx.path in self._quiet:
            return None
        otel = self._otel
        carrier = {}
        headers = request.requestHeaders
        for name in (b"traceparent", b"tracestate"):
            values = headers.getRawHeaders(name)
            if values:
                carrier[name.decode("ascii")] = b",".join(values).decode("latin-1")
        parent = otel.propagator.extract(carrier) if carrier else None
        method = ctx.method.decode("ascii", "replace")
        span = tracer.start_span(method, context=parent, kind=otel.api.SpanKind.SERVER, attributes={
            "http.request.method": method,
            "url.path": ctx.path.decode("utf-8", "replace"),
            "url.scheme": "https" if request.isSecure() else "http",
            "gomodel.request_id": ctx.request_id.decode("ascii", "replace"),
        })
        return RequestTrace(self, span)

    def __call__(self, ctx):
        """A request is over: its server span ends, its GenAI metrics are recorded."""
        trace = ctx.trace
        if trace is not None:
            trace.end(ctx)
        operation = OPERATIONS.get(ctx.endpoint)
        if operation is None or ctx.provider is None or self._meters is None:
            return
        attributes = {"gen_ai.operation.name": operation, "gen_ai.provider.name": provider_name(ctx.provider_type),
                      "gomodel.provider": ctx.provider}
        if ctx.upstream_model and self._named(ctx.provider, ctx.upstream_model):
            attributes["gen_ai.response.model"] = ctx.upstream_model
            if ctx.model:  # (a name that resolved to a listed model: its spellings and virtual models are bounded)
                attributes["gen_ai.request.model"] = ctx.model
        error = error_type(ctx)
        if error is not None:
            attributes["error.type"] = error
        self._duration.record(ctx.duration, attributes)
        if ctx.stream and ctx.first_byte is not None:
            self._first_chunk.record(ctx.first_byte, attributes)
        for kind, count in zip(("input", "output"), ctx.tokens):
            if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
                self._tokens.record(count, {**attributes, "gen_ai.token.type": kind})

    def tokens_apart(self, provider_type, provider, model, usage, principal=None, endpoint=None):
        """Record the C{usage} of what no request's end records, a batch line's answer or a background
        response's (as L{gomodel.accounting.metrics.GatewayMetrics.tokens_apart} counts it), in
        C{gen_ai.client.token.usage}.

        @param model: C{provider/upstream-model} as the ledger names it, or None.
        @param endpoint: the route it was made on (C{/v1/chat/completions}), its C{gen_ai.operation.name}.
        """
        operation = OPERATIONS.get(endpoint)
        if not usage or operation is None or provider is None or self._meters is None:
            return
        attributes = {"gen_ai.operation.name": operation, "gen_ai.provider.name": provider_name(provider_type),
                      "gomodel.provider": provider}
        if model and model.startswith(provider + "/") and self._named(provider, model[len(provider) + 1:]):
            attributes["gen_ai.response.model"] = model[len(provider) + 1:]
        for kind, count in zip(("input", "output"), tokens_by_type(usage)):
            self._tokens.record(count, {**attributes, "gen_ai.token.type": kind})

    def _named(self, provider, upstream_model) -> bool:
        """Whether the metrics name C{upstream_model} (L{listed})."""
        return self.listed is None or self.listed(provider, upstream_model)

    def _host(self, replica):
        """C{(server.address, server.port)} of a replica (operators' traces may name their own servers)."""
        host = self._hosts.get(replica.base_url)
        if host is None:
            parts = urlsplit(replica.base_url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            host = self._hosts[replica.base_url] = (parts.hostname or "", port)
        return host


class _Kit:
    """The OpenTelemetry names the request path uses, imported once at start."""

    __slots__ = ("api", "propagator", "ERROR")

    def __init__(self, api, propagator):
        self.api = api
        self.propagator = propagator
        self.ERROR = api.StatusCode.ERROR


class RequestTrace:
    """One request's spans: the server span, and the client span of each upstream attempt.

    L{gomodel.proxy.exchange.Exchange} calls L{attempt} before each send,
    then L{answered} with the status, L{failed} when the attempt is given up
    (another replica is tried), and L{finished} once the answer was relayed.
    """

    __slots__ = ("span", "_telemetry", "_attempt", "_number", "_why", "_status", "_error")

    def __init__(self, telemetry, span):
        self.span = span
        self._telemetry = telemetry
        self._attempt = None  # the open client span
        self._number = 0
        self._why = None  # error.type of the attempt before
        self._status = None
        self._error = None

    def attempt(self, pool, replica, model, call):
        """An attempt starts: its client span, and the headers to send (the call's, plus C{traceparent}).

        @param pool: the provider's L{gomodel.routing.pool.ReplicaPool}.
        @param replica: the L{gomodel.routing.pool.Replica} it goes to.
        @param model: the upstream model sent (None for any).
        @param call: the L{gomodel.proxy.exchange.UpstreamCall}.
        @return: the request headers, name -> list of values.
        """
        self.finished()
        telemetry = self._telemetry
        otel = telemetry._otel
        self._number += 1
        method = call.method.decode("ascii", "replace")
        # (a native call's path is at the server root: C{classify}; a passthrough's has no operation)
        operation = OPERATIONS.get(("/" if call.native else "/v1") + call.path) if not call.raw else None
        address, port = telemetry._host(replica)
        attributes = {
            "http.request.method": method,
            "server.address": address,
            "server.port": port,
            "gen_ai.provider.name": provider_name(pool.type),
            "gomodel.provider": pool.name,
            "gomodel.replica": replica.index,
            "gomodel.attempt": self._number,
        }
        if operation is not None:
            attributes["gen_ai.operation.name"] = operation
        if model:
            attributes["gen_ai.request.model"] = model
        if self._why is not None:
            attributes["gomodel.retry.reason"] = self._why  # why the attempt before failed
        name = f"{operation} {model}" if operation and model else method
        parent = otel.api.set_span_in_context(self.span)
        span = self._attempt = telemetry._tracer.start_span(name, context=parent, kind=otel.api.SpanKind.CLIENT,
                                                            attributes=attributes)
        self._status = self._error = None
        carrier = {}
        otel.propagator.inject(carrier, context=otel.api.set_span_in_context(span))
        headers = {}
        for key, values in (call.headers or {}).items():
            lower = (key if isinstance(key, bytes) else key.encode("latin-1")).lower()
            if lower not in (b"traceparent", b"tracestate"):
                headers[key] = values
        for key, value in carrier.items():
            headers[key.encode("ascii")] = [value.encode("latin-1")]
        return headers

    def answered(self, status):
        """The upstream answered the attempt with C{status}."""
        self._status = status
        if self._attempt is not None:
            self._attempt.set_attribute("http.response.status_code", status)

    def failed(self, error):
        """The attempt is given up (C{error}: its error.type; the status code when it answered >= 400)."""
        if self._status is not None and self._status >= 400:
            error = str(self._status)
        self._error = error
        self._why = error
        self.finished()

    def finished(self, ctx=None):
        """The attempt is over (the answer relayed or given up); its span ends. Idempotent.

        @param ctx: the request's context, which says whether a stream broke or the client left.
        """
        span = self._attempt
        if span is None:
            return
        self._attempt = None
        error = self._error
        if error is None:
            if ctx is not None and ctx.outcome == STREAM_BROKEN:
                error = ctx.error or "stream_broken"
            elif ctx is not None and ctx.client_gone:
                error = "cancelled"
            elif self._status is not None and self._status >= 400:
                error = str(self._status)
            elif ctx is not None and ctx.outcome == ERROR:  # the upstream's error event in a stream it ended
                error = ctx.error
        if error is not None:
            span.set_attribute("error.type", error)
            span.set_status(self._telemetry._otel.ERROR, error)
        span.end()

    def end(self, ctx):
        """The request completed: the server span gets what the request came to, and ends."""
        self.finished(ctx)
        span = self.span
        if not span.is_recording():
            span.end()
            return
        method = ctx.method.decode("ascii", "replace")
        if ctx.endpoint:
            span.update_name(f"{method} {ctx.endpoint}")
            span.set_attribute("http.route", ctx.endpoint)
        attributes = {"http.response.status_code": ctx.status, "gomodel.stream": bool(ctx.stream or ctx.asked_stream)}
        operation = OPERATIONS.get(ctx.endpoint)
        if operation is not None:
            attributes["gen_ai.operation.name"] = operation
        if ctx.provider is not None:
            attributes["gen_ai.provider.name"] = provider_name(ctx.provider_type)
            attributes["gomodel.provider"] = ctx.provider
        if ctx.replica is not None:
            attributes["gomodel.replica"] = ctx.replica
        if ctx.model:
            attributes["gen_ai.request.model"] = ctx.model
        if ctx.upstream_model:
            attributes["gen_ai.response.model"] = ctx.upstream_model
        if self._number:
            attributes["gomodel.attempts"] = self._number
        tokens_in, tokens_out = ctx.tokens
        if isinstance(tokens_in, int) and not isinstance(tokens_in, bool):
            attributes["gen_ai.usage.input_tokens"] = tokens_in
        if isinstance(tokens_out, int) and not isinstance(tokens_out, bool):
            attributes["gen_ai.usage.output_tokens"] = tokens_out
        if ctx.estimated:
            attributes["gomodel.usage.estimated"] = True
        if ctx.first_byte is not None:
            attributes["gomodel.time_to_first_byte"] = ctx.first_byte
        error = error_type(ctx)
        if error is not None:
            attributes["error.type"] = error
        span.set_attributes(attributes)
        # The conventions: a server span is an error for a 5xx, not for the client's own 4xx; an answer sent
        # with a 2xx is one where it failed after all (the upstream's error event in its stream).
        if ctx.outcome in (STREAM_BROKEN, CLIENT_GONE) or ctx.status >= 500 or (ctx.outcome == ERROR
                                                                                 and ctx.status < 400):
            span.set_status(self._telemetry._otel.ERROR, error)
        span.end()


def error_type(ctx):
    """The C{error.type} of a completed request: its error code, C{client_gone} or the status; None when it went well."""
    if ctx.outcome == CLIENT_GONE:
        return "client_gone"
    if ctx.outcome == STREAM_BROKEN:
        return ctx.error or "stream_broken"
    if ctx.status is not None and ctx.status >= 400:
        return ctx.error or str(ctx.status)
    if ctx.outcome == ERROR:  # an answer sent with a 2xx that failed after all (L{RequestContext.failed_in_band})
        return ctx.error
    return None


def provider_name(provider_type):
    """The C{gen_ai.provider.name} of a provider type (the conventions' value where they have one)."""
    if provider_type is None:
        return "unknown"
    return PROVIDER_NAMES.get(provider_type, provider_type)


def _resource():
    """The SDK's resource from C{OTEL_SERVICE_NAME} / C{OTEL_RESOURCE_ATTRIBUTES}; C{gomodel} by default,
    and an instance id per process (the workers of C{--workers} are told apart)."""
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create()
    ours = {"service.instance.id": str(uuid.uuid4()), "process.pid": os.getpid()}
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        ours["service.name"] = "gomodel"
    ours = {k: v for k, v in ours.items() if k == "service.name" or k not in resource.attributes}
    return resource.merge(Resource(ours))


def _shut_down(tracers, meters, timeout):
    """Flush then shut down (in a thread: exporting blocks), giving the SDK C{timeout} seconds where it takes one."""
    millis = timeout * 1000
    try:
        tracers.force_flush(millis)
        meters.force_flush(millis)
    finally:
        tracers.shutdown()
        meters.shutdown(millis)
