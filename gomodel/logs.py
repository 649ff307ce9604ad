"""The gateway's log output: Twisted's text lines, or one JSON object per line, at a chosen level.

Text lines are Twisted's classic ones (C{time [namespace#level] message}),
made by L{ClassicText}. C{LOG_FORMAT=json} writes each event as one JSON object (C{time}, C{level},
C{namespace}, C{message}, then the event's own structured fields such as
C{status}, C{provider}, C{request_id}), for log shippers. C{LOG_LEVEL}
(C{debug}, C{info}, C{warn}, C{error}, C{critical}) drops what is below it.
"""

import sys
import time
from itertools import repeat, starmap
from operator import mod

from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel, LogLevelFilterPredicate,
                            formatEvent, formatEventAsClassicLogText, formatTime, jsonFileLogObserver)
from zope.interface import implementer

from gomodel import jsonutil
from gomodel.errors import StorageUnavailable

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "warning": LogLevel.warn,
          "error": LogLevel.error, "critical": LogLevel.critical}
_SCALARS = (str, int, float, bool, type(None))
RECORD_KEYS = frozenset(("time", "level", "namespace", "message"))  # a JSON line's own, before an event's fields
SHAPES_KEPT = 1000  # the sets of keys of events (one per call site, mostly) whose fields a JSON observer keeps
# The format of an event that carries its whole text as C{log_line} (the access log's).
LINE_FORMAT = "{log_line}"
# How long the text observer holds the access log's lines to write them together, how many lines at
# most, and how many bytes a write takes at most (what a pipe writes in one piece, PIPE_BUF on Linux);
# see TextObserver.
LINE_DELAY = 0.1
HELD_LINES = 32
LINE_BYTES = 4096
# The format of a held text written as it is (L{TextObserver.hold}: already indented).
TEXT = "%s"


def message(event) -> str:
    """An event's text: its C{log_line} as it is, else Twisted's general formatter's."""
    if event.get("log_format") == LINE_FORMAT and "log_line" in event:
        return str(event["log_line"])
    return formatEvent(event)


def _per_second(make):
    """A function of a time in seconds giving C{make(second)} of its whole second, made once per second."""
    last = [None, None]  # the second, and what was made of it

    def made(when):
        second = int(when)
        if second != last[0]:
            last[0], last[1] = second, make(second)
        return last[1]

    return made


class ClassicText:
    """Formats an event as Twisted's L{formatEventAsClassicLogText} does with its default (RFC 3339)
    time format, the same text at a third of the cost for an access line.

    Twisted makes the time text for each line (a time zone lookup, a datetime, a strftime): here
    it is made once per second. A line event (L{LINE_FORMAT}) is put together directly, where
    Twisted's general formatter would parse its format and wrap its fields.
    """

    def __init__(self):
        self._stamp = _per_second(formatTime)

    def time(self, when) -> str:
        """C{when} (seconds since the epoch, or None) as Twisted's classic line shows it."""
        return "-" if when is None else self._stamp(when)

    def __call__(self, event):
        if (event.get("log_format") != LINE_FORMAT or "log_line" not in event or "log_failure" in event
                or "log_system" in event):
            return formatEventAsClassicLogText(event, self.time)
        line = str(event["log_line"])
        if not line:
            return None  # as Twisted writes nothing for an empty message
        level = event.get("log_level")
        return self.line(event.get("log_time"), event.get("log_namespace", "-"),
                         "-" if level is None else level.name, line)

    def line(self, when, namespace: str, level: str, line: str) -> str:
        """The text of a line event (L{LINE_FORMAT}) of C{line} (not empty), with the level's name."""
        return f"{self.head(when, namespace, level)}{indented(line)}\n"

    def head(self, when, namespace: str, level: str) -> str:
        """What the text of an event at C{when} begins with, before its message: time, namespace, level."""
        return f"{self.time(when)} [{namespace}#{level}] "


def indented(line: str) -> str:
    """C{line} with each line break inside it indented, as Twisted does: one event is one line."""
    return line.replace("\n", "\n\t") if "\n" in line else line


@implementer(ILogObserver)
class TextObserver:
    """Writes each event as Twisted's classic text line (L{ClassicText}) to C{out}, flushed at once, as
    C{FileLogObserver(out, ClassicText())} does; L{write_line} takes a line event's text directly,
    L{hold} the text it is written as and L{hold_line} that text's format and values.

    With a C{clock}, the lines L{hold} and L{hold_line} take (the access log's) are held for up to
    L{LINE_DELAY} seconds (or until L{HELD_LINES} are held) and written together: a tick every L{LINE_DELAY}
    seconds writes them (each tick arms the next), started by a line held while it is stopped and stopped
    by a tick with none held (no timer armed from the request path while lines keep coming; none while
    nothing is logged), one C{write(2)}
    for up to L{LINE_BYTES} bytes of whole lines: a pipe takes that much in one piece, so the
    lines of processes sharing it (C{--workers}) never mix. The held lines are cut into such
    writes when they go out, not measured one by one as they come (ASCII text, as access lines
    are, is cut at its line ends in C), and made of their formats then, in C. Every other event first writes what is held, so lines
    keep their order. L{flush} writes what is held (the gateway calls it once the reactor has stopped).
    """

    def __init__(self, out, clock=None):
        self._out = out
        self._clock = clock
        self._held = []  # texts of lines not yet written
        self._tick_call = None  # the next tick's timer, while it ticks
        self.format = ClassicText()

    def __call__(self, event):
        text = self.format(event)
        if text:
            if self._held:
                self.flush()
            self._out.write(text)
            self._out.flush()

    def write_line(self, when, namespace: str, level: str, line: str):
        """Write what a line event (L{LINE_FORMAT}) of C{line} (not empty) at C{when} would be written as."""
        self.hold(self.format.line(when, namespace, level, line))

    def hold(self, text: str):
        """Write C{text}, the whole text of a line event (L{ClassicText.line}), with the lines held."""
        self.hold_line(TEXT, (text,))

    def hold_line(self, format: str, values: tuple):
        """Write C{format % values}, the whole text of a line event (L{ClassicText.line}) but for its line breaks
        (indented here, as L{indented} does, the last one ending it), with the lines held: formatted as they go
        out, in C, rather than as each line comes."""
        if self._clock is None:
            self._write(_text(format, values))
            return
        held = self._held
        held.append((format, values))
        if len(held) >= HELD_LINES:
            self.flush()
        elif self._tick_call is None:
            self._tick_call = self._clock.callLater(LINE_DELAY, self._tick)

    def _tick(self):
        """Write the lines held and tick again (armed first: a write that fails stops nothing); stop ticking when
        there are none."""
        self._tick_call = None
        if self._held:
            self._tick_call = self._clock.callLater(LINE_DELAY, self._tick)
            self._write_held()

    def flush(self):
        """Write the lines held (if any), in writes of up to L{LINE_BYTES} bytes of whole lines, and stop ticking
        (the next line held starts it again)."""
        if self._tick_call is not None:
            self._tick_call.cancel()
            self._tick_call = None
        self._write_held()

    def _write_held(self):
        if self._held:
            held, self._held = self._held, []
            text = "".join(starmap(mod, held))
            if text.count("\n") != len(held):  # a line break inside a line (a logged value's): each one's indented
                text = "".join([_text(format, values) for format, values in held])
            if text.isascii():  # a character a byte: cut at the last line end within each write's bytes
                start, end = 0, len(text)
                while end - start > LINE_BYTES:
                    cut = text.rfind("\n", start, start + LINE_BYTES) + 1
                    if cut <= start:  # one line longer than a write: alone, whole
                        cut = text.find("\n", start + LINE_BYTES) + 1 or end
                    self._write(text[start:cut])
                    start = cut
                self._write(text[start:] if start else text)
                return
            piece, size = [], 0
            for format, values in held:
                line = _text(format, values)
                length = len(line.encode("utf-8"))
                if piece and size + length > LINE_BYTES:
                    self._write("".join(piece))
                    piece, size = [], 0
                piece.append(line)
                size += length
            self._write("".join(piece))

    def _write(self, text: str):
        self._out.write(text)
        self._out.flush()


def _text(format: str, values: tuple) -> str:
    """The text of a held line (L{TextObserver.hold_line}): C{format % values}, its line breaks but the last
    indented (a L{TEXT}'s are already)."""
    text = format % values
    if format is TEXT or text.count("\n") == 1:
        return text
    return indented(text[:-1]) + "\n"


def text_observer(out, clock=None) -> TextObserver:
    """An observer writing Twisted's classic text lines (L{ClassicText}) to C{out} (see L{TextObserver})."""
    return TextObserver(out, clock)


@implementer(ILogObserver)
class JSONLineObserver:
    """Writes each event as one JSON object on its own line."""

    def __init__(self, out):
        self._out = out
        self._time = _per_second(lambda second: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second)))
        self._fields = {}  # an event's keys -> those of its fields a record may take (L{_fields_of})

    def __call__(self, event):
        when = event.get("log_time")
        record = {"time": self._time(when if when is not None else time.time()),
                  "level": getattr(event.get("log_level"), "name", "info"),
                  "namespace": event.get("log_namespace", "-"), "message": message(event)}
        # Its fields but the log_ ones and those named as the record's own, in its order, as its keys (an event of
        # a call site has the same every time) last gave them; those of scalar values taken, in C where all are.
        keys = tuple(event)
        fields = self._fields.get(keys)
        if fields is None:
            fields = self._fields_of(keys)
        values = list(map(event.__getitem__, fields))
        if all(map(isinstance, values, repeat(_SCALARS))):
            record.update(zip(fields, values))
        else:
            for key, value in zip(fields, values):
                if isinstance(value, _SCALARS):
                    record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._out.write(jsonutil.dumps(record).decode("utf-8") + "\n")
        self._out.flush()

    def _fields_of(self, keys) -> tuple:
        """Those of C{keys} (an event's) that are its fields in a record, kept for the next event of those keys."""
        if len(self._fields) >= SHAPES_KEPT:
            self._fields.clear()
        fields = tuple(key for key in keys if not key.startswith("log_") and key not in RECORD_KEYS)
        self._fields[keys] = fields
        return fields


def log_observer(log_format, level, out=None, classic=False, clock=None, twistd=None):
    """The observer for C{LOG_FORMAT} and C{LOG_LEVEL}; with neither, with C{classic} (twistd would write its
    own text lines to C{out}), an observer writing the same lines (L{TextObserver}, holding the access log's
    lines on C{clock} if given); else None to keep twistd's. C{LOG_LEVEL} alone, where twistd writes its lines
    elsewhere (C{--logfile}, C{--syslog}), filters the observer C{twistd()} makes (twistd's own)."""
    out = out if out is not None else sys.stdout
    if log_format is None and level is None:
        return text_observer(out, clock) if classic else None
    if log_format is None and not classic and twistd is not None:
        observer = twistd()
    else:
        observer = JSONLineObserver(out) if log_format == "json" else text_observer(out)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level or "info"])
    return FilteringLogObserver(observer, [predicate])


def to_primary():
    """A worker's log observer (twistd's C{--logger}, named by a primary that logs elsewhere than its standard
    output): each event as Twisted's JSON line on standard output, a pipe the primary reads, publishing each
    in its own log (L{gomodel.workers.WorkerLog})."""
    return jsonFileLogObserver(sys.__stdout__)


def log_failure(log, failure, what, **fields):
    """Log a failed background job: the store being unavailable is a one-line warning (it is
    expected while a database restarts and repeats every second), anything else a full failure."""
    if failure.check(StorageUnavailable):
        log.warn(what + ": {reason}", reason=failure.value.message, **fields)
    else:
        log.failure(what, failure, **fields)


class FailureStreak:
    """A job repeated every second or so (a refresh from the store), its failures logged as L{log_failure}
    logs them but once a streak while the store is unavailable: a warning at the first, an info line when
    it succeeds again; any other failure in full every time. (A database down for an hour is one line, not
    3,600 per job.)"""

    __slots__ = ("_owner", "_what", "_recovered", "failing", "lost")

    def __init__(self, owner, what: str, recovered: str):
        """
        @param owner: what runs the job: its C{log} (a L{Logger}) logs.
        @param what: the warning's text (C{"refreshing the managed keys failed"}), followed by the reason.
        @param recovered: the info line's text once the job succeeds again; C{{lost}} in it is the number of
            items the streak's failures lost (L{failed}'s C{lost}).
        """
        self._owner = owner
        self._what = what
        self._recovered = recovered
        self.failing = False
        self.lost = 0

    def failed(self, failure, lost=0):
        """The job failed with C{failure}, losing C{lost} items (counted for the line that ends the streak): log
        it (see the class); returns None."""
        if not failure.check(StorageUnavailable):
            self._owner.log.failure(self._what, failure)
        elif not self.failing:
            self.failing = True
            self._owner.log.warn(self._what + ": {reason} (not repeated until it succeeds again)",
                                 reason=failure.value.message)
        if self.failing:
            self.lost += lost

    def succeeded(self, result=None):
        """The job succeeded: say so if it had been failing; returns C{result}."""
        if self.failing:
            self.failing = False
            self._owner.log.info(self._recovered, lost=self.lost)
            self.lost = 0
        return result
