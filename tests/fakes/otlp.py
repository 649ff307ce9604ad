"""An OTLP/HTTP receiver: a real Twisted HTTP server on 127.0.0.1:0, as a collector would be.

It accepts C{POST /v1/traces} and C{POST /v1/metrics} with protobuf bodies
(gzip or not), decodes them with C{opentelemetry-proto} into
C{ExportTraceServiceRequest} / C{ExportMetricsServiceRequest}, keeps every
raw body (decompressed) and request header, and answers the protobuf success
response. Helpers flatten what arrived into plain spans and metric points.
"""

import gzip

from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import server
from twisted.web.resource import Resource

PROTOBUF = b"application/x-protobuf"
SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3
STATUS_UNSET = 0
STATUS_ERROR = 2


def attributes(key_values) -> dict:
    """OTLP C{KeyValue}s as a dict of plain Python values."""
    out = {}
    for kv in key_values:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which is not None else None
    return out


class Span:
    """One exported span, flattened: ids in hex, attributes as a dict, its resource's attributes."""

    def __init__(self, proto, resource, scope):
        self.proto = proto
        self.trace_id = proto.trace_id.hex()
        self.span_id = proto.span_id.hex()
        self.parent_id = proto.parent_span_id.hex() or None
        self.name = proto.name
        self.kind = proto.kind
        self.status = proto.status.code
        self.status_message = proto.status.message
        self.attributes = attributes(proto.attributes)
        self.resource = resource
        self.scope = scope

    def __repr__(self):
        return f"<Span {self.name!r} kind={self.kind} {self.attributes}>"


class Point:
    """One histogram data point of an exported metric."""

    def __init__(self, metric, proto, resource):
        self.name = metric.name
        self.unit = metric.unit
        self.attributes = attributes(proto.attributes)
        self.count = proto.count
        self.sum = proto.sum
        self.bounds = tuple(proto.explicit_bounds)
        self.resource = resource

    def __repr__(self):
        return f"<Point {self.name} count={self.count} sum={self.sum} {self.attributes}>"


class OTLPReceiver(Resource):
    """Collects what OTLP/HTTP exporters send; see the module docstring."""

    isLeaf = True

    def __init__(self, reactor):
        super().__init__()
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self._reactor = reactor
        self._messages = {
            b"/v1/traces": (trace_service_pb2.ExportTraceServiceRequest,
                            trace_service_pb2.ExportTraceServiceResponse),
            b"/v1/metrics": (metrics_service_pb2.ExportMetricsServiceRequest,
                             metrics_service_pb2.ExportMetricsServiceResponse),
        }
        self.traces = []  # ExportTraceServiceRequest, in arrival order
        self.metrics = []  # ExportMetricsServiceRequest
        self.raw = []  # every body, decompressed
        self.headers = []  # (path, Headers) of every export
        self.refused = []  # (method, path) of anything else
        self.port = None

    def start(self):
        """Listen on 127.0.0.1:0; a Deferred firing with self."""
        site = server.Site(self)
        site.noisy = False

        def listening(port):
            self.port = port
            return self

        return TCP4ServerEndpoint(self._reactor, 0, interface="127.0.0.1").listen(site).addCallback(listening)

    def stop(self):
        """Stop listening; a Deferred."""
        port, self.port = self.port, None
        return port.stopListening()

    @property
    def url(self):
        """The base URL for C{OTEL_EXPORTER_OTLP_ENDPOINT} (the exporters add C{/v1/traces}, C{/v1/metrics})."""
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def render_POST(self, request):
        kinds = self._messages.get(request.path)
        if kinds is None or request.getHeader(b"content-type") != PROTOBUF:
            self.refused.append((request.method, request.path))
            request.setResponseCode(404)
            return b""
        body = request.content.read()
        if request.getHeader(b"content-encoding") == b"gzip":
            body = gzip.decompress(body)
        message = kinds[0]()
        message.ParseFromString(body)
        self.raw.append(body)
        self.headers.append((request.path, request.requestHeaders))
        (self.traces if request.path == b"/v1/traces" else self.metrics).append(message)
        request.setHeader(b"content-type", PROTOBUF)
        return kinds[1]().SerializeToString()

    def render(self, request):
        if request.method == b"POST":
            return self.render_POST(request)
        self.refused.append((request.method, request.path))
        request.setResponseCode(405)
        return b""

    # -- what arrived ------------------------------------------------------------------

    def spans(self) -> list:
        """Every span received, flattened (L{Span})."""
        out = []
        for export in self.traces:
            for rs in export.resource_spans:
                resource = attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        out.append(Span(span, resource, ss.scope.name))
        return out

    def points(self, name) -> list:
        """The histogram points of metric C{name} in the last export holding it (the SDK's are cumulative)."""
        last = []
        for export in self.metrics:
            found = []
            for rm in export.resource_metrics:
                resource = attributes(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        if metric.name == name:
                            found.extend(Point(metric, p, resource) for p in metric.histogram.data_points)
            if found:
                last = found
        return last
