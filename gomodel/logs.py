"""The gateway's log output: Twisted's text lines, or one JSON object per line, at a chosen level.

C{LOG_FORMAT=json} writes each event as one JSON object (C{time}, C{level},
C{namespace}, C{message}, then the event's own structured fields such as
C{status}, C{provider}, C{request_id}), for log shippers. C{LOG_LEVEL}
(C{debug}, C{info}, C{warn}, C{error}, C{critical}) drops what is below it.
"""

import sys
import time

from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel, LogLevelFilterPredicate, formatEvent,
                            textFileLogObserver)
from zope.interface import implementer

from gomodel import jsonutil
from gomodel.errors import StorageUnavailable

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "warning": LogLevel.warn,
          "error": LogLevel.error, "critical": LogLevel.critical}
_SCALARS = (str, int, float, bool, type(None))


@implementer(ILogObserver)
class JSONLineObserver:
    """Writes each event as one JSON object on its own line."""

    def __init__(self, out):
        self._out = out

    def __call__(self, event):
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", time.time())))
                  + "Z", "level": getattr(event.get("log_level"), "name", "info"),
                  "namespace": event.get("log_namespace", "-"), "message": formatEvent(event)}
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and isinstance(value, _SCALARS):
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._out.write(jsonutil.dumps(record).decode("utf-8") + "\n")
        self._out.flush()


def log_observer(log_format, level, out=None):
    """The observer for C{LOG_FORMAT} and C{LOG_LEVEL}, or None to keep twistd's own."""
    if log_format is None and level is None:
        return None
    out = out if out is not None else sys.stdout
    observer = JSONLineObserver(out) if log_format == "json" else textFileLogObserver(out)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level or "info"])
    return FilteringLogObserver(observer, [predicate])


def log_failure(log, failure, what, **fields):
    """Log a failed background job: the store being unavailable is a one-line warning (it is
    expected while a database restarts and repeats every second), anything else a full failure."""
    if failure.check(StorageUnavailable):
        log.warn(what + ": {reason}", reason=failure.value.message, **fields)
    else:
        log.failure(what, failure, **fields)
