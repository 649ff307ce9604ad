"""Run the gateway (the C{gomodel} command with ARGS) counting the Python bytecodes it executes, by function.

    python bench/bytecodes.py OUT.json [gateway args...]

Counting starts on SIGUSR1 and stops on SIGUSR2, which also writes OUT.json:
C{{"total": N, "functions": {"file:line name": n, ...}, "calls": {"file:line name": n, ...}, "exceptions": {"file:line name Type": n, ...}}}:
the exceptions are those raised in Python code (or reaching it) and caught, but StopIteration and
GeneratorExit (coroutines and generators ending): on a request path each is a cost to look at (made,
its traceback built, dropped). Counting uses
C{sys.settrace} with C{f_trace_opcodes} on every frame started while it is on
(a frame already running when it starts is counted from its next call), so
the process runs 20-50 times slower: a figure for comparing two checkouts'
work per request, not a time. Used by C{COUNT=bytecodes bash bench/instructions.sh}.

C{"timers"} is the part of the total counted in calls the reactor's timers made (C{callLater}s and
the C{LoopingCall}s they run: metrics flushes, pool and idle sweeps, key refreshes, the access log's
held lines): work by the second, not by the request, whose share of a window grows with the window's
length (a machine busy with other work, a slower checkout), about +-300 bytecodes a request between
runs of the same code on a loaded machine; the total less it is the steadier figure for comparing
two checkouts' request paths (C{untimed_per_request} in C{bench/instructions.sh}'s line).

With C{BYTECODES_LINES=1} in the environment OUT.json also has C{"lines": {"file:line": n, ...}}, the
bytecodes counted on each source line (slower still): where a function's count goes.
"""

import json
import os
import signal
import sys
from collections import Counter

OUT = sys.argv.pop(1)
counts = Counter()
calls = Counter()
names = {}
raised = Counter()
lines = Counter() if os.environ.get("BYTECODES_LINES") == "1" else None
in_timers = Counter()
TIMERS = None  # the code of the reactor's runUntilCurrent: a frame below it runs in a timer's call


def _in_timer(frame) -> bool:
    while frame is not None:
        if frame.f_code is TIMERS:
            return True
        frame = frame.f_back
    return False


def _trace(frame, event, arg):
    code = frame.f_code
    if code not in names:
        names[code] = "%s:%d %s" % (code.co_filename, code.co_firstlineno, code.co_qualname)
    calls[code] += 1
    frame.f_trace_opcodes = True
    frame.f_trace_lines = False
    timed = _in_timer(frame.f_back)  # (a coroutine or generator is looked at again each time it is resumed)

    def opcode(frame, event, arg, code=code):
        if event == "opcode":
            counts[code] += 1
            if timed:
                in_timers[code] += 1
            if lines is not None:
                lines[code, frame.f_lineno] += 1
        elif event == "exception" and arg[0] is not StopIteration and arg[0] is not GeneratorExit:
            raised["%s:%d %s %s" % (code.co_filename, frame.f_lineno, code.co_qualname, arg[0].__name__)] += 1
        return opcode
    return opcode


def _start(*_):
    counts.clear()
    calls.clear()
    raised.clear()
    in_timers.clear()
    if lines is not None:
        lines.clear()
    sys.settrace(_trace)
    import threading
    threading.settrace(_trace)


def _stop(*_):
    sys.settrace(None)
    by_name, calls_by_name = Counter(), Counter()
    for code, n in counts.items():
        by_name[names[code]] += n
    for code, n in calls.items():
        calls_by_name[names[code]] += n
    with open(OUT + ".part", "w") as f:
        json.dump({"total": sum(by_name.values()), "timers": sum(in_timers.values()), "functions": dict(by_name.most_common()),
                   "calls": dict(calls_by_name.most_common()),
                   "exceptions": dict(raised.most_common()),
                   **({"lines": {"%s:%s" % (code.co_filename, line): n for (code, line), n in lines.most_common()}}
                      if lines is not None else {})}, f, indent=0)
    os.replace(OUT + ".part", OUT)


def _install():
    global TIMERS
    from twisted.internet.base import ReactorBase
    TIMERS = ReactorBase.runUntilCurrent.__code__
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)


from twisted.internet import reactor  # noqa: E402

from gomodel.cli import main  # noqa: E402

reactor.callWhenRunning(_install)
main()
