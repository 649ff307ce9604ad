"""The Prometheus text exposition of a registry: what prometheus_client's C{generate_latest} writes, byte for byte.

prometheus_client's own lives in its C{exposition} module, which imports its
HTTP servers and push clients at module level (C{http.server},
C{socketserver}, C{wsgiref}, C{urllib.request}, C{http.client} and the
C{email} parser), none of which the gateway uses: it serves C{/metrics}
itself. The gateway loads prometheus_client's series, registry and
multiprocess collector without that module (L{gomodel.lean.package_without_init})
and writes the text here, with prometheus_client's own escaping of names and
label values (its OpenMetrics module, which imports nothing more).
"""

from prometheus_client.openmetrics.exposition import UNDERSCORES, _escape, escape_label_name, escape_metric_name
from prometheus_client.utils import floatToGoString

# prometheus_client's CONTENT_TYPE_LATEST (its text format 1.0.0) for what C{generate_latest} writes.
CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"
_ALLOW_UTF8 = "allow-utf-8"  # (label values are escaped as UTF-8 allows: backslash, newline, quote)
_TYPES = {"counter": "counter", "info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram",
          "unknown": "untyped"}  # (OpenMetrics' types as the Prometheus text names them; others as they are)
_SUFFIX = {"counter": "_total", "info": "_info"}
_APART = ("_created", "_gsum", "_gcount")  # OpenMetrics samples, each shown as a gauge after its metric


def text(registry) -> bytes:
    """Every series C{registry} collects, in the Prometheus text format (UTF-8), as C{generate_latest(registry)}."""
    output = []
    for metric in registry.collect():
        try:
            name = metric.name + _SUFFIX.get(metric.type, "")
            help_text = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
            output.append(f"# HELP {escape_metric_name(name)} {help_text}\n")
            output.append(f"# TYPE {escape_metric_name(name)} {_TYPES.get(metric.type, metric.type)}\n")
            apart = {}
            for sample in metric.samples:
                for suffix in _APART:
                    if sample.name == metric.name + suffix:
                        apart.setdefault(suffix, []).append(_line(sample))
                        break
                else:
                    output.append(_line(sample))
        except Exception as exception:
            exception.args = (exception.args or ("",)) + (metric,)
            raise
        for suffix, lines in sorted(apart.items()):
            output.append(f"# HELP {escape_metric_name(metric.name + suffix)} {help_text}\n")
            output.append(f"# TYPE {escape_metric_name(metric.name + suffix)} gauge\n")
            output.extend(lines)
    return "".join(output).encode("utf-8")


def _line(sample) -> str:
    labels = ""
    if sample.labels:
        labels = "{%s}" % ",".join(f'{escape_label_name(k)}="{_escape(v, _ALLOW_UTF8, False)}"'
                                   for k, v in sorted(sample.labels.items()))
    timestamp = ""
    if sample.timestamp is not None:
        timestamp = f" {int(float(sample.timestamp) * 1000):d}"  # (milliseconds)
    return f"{escape_metric_name(sample.name, UNDERSCORES)}{labels} {floatToGoString(sample.value)}{timestamp}\n"
