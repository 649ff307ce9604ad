"""Run the gateway (the C{gomodel} command with ARGS) under callgrind counting only what its requests run:

    valgrind --tool=callgrind --instr-atstart=no python bench/untimed.py CGCONTROL.so [gateway args...]

SIGUSR1 starts callgrind's instrumentation, SIGUSR2 stops it (each once the reactor is outside its timers), and
every call of the reactor's C{runUntilCurrent} (its timers: metrics flushes, sweeps, key refreshes; what
C{bench/bytecodes.py} calls timers) is left out of the collection, so that a window's count does not grow with its
wall time. CGCONTROL.so holds C{cg_start}, C{cg_stop} and C{cg_toggle}, callgrind.h's client requests
(C{bench/instructions.sh} makes it for C{UNTIMED=1}).
"""

import ctypes
import signal
import sys

_cg = ctypes.CDLL(sys.argv.pop(1))
_in_timers = False
_asked = None  # cg_start or cg_stop, asked for by a signal that came while the timers ran


def _untimed(run):
    def runUntilCurrent(self):
        global _in_timers, _asked
        _cg.cg_toggle()
        _in_timers = True
        try:
            run(self)
        finally:
            _in_timers = False
            _cg.cg_toggle()
            if _asked is not None:
                _asked, asked = None, _asked
                asked()
    return runUntilCurrent


def _on(control):
    def handler(*_):
        global _asked
        if _in_timers:
            _asked = control
        else:
            control()
    return handler


def _install():
    signal.signal(signal.SIGUSR1, _on(_cg.cg_start))
    signal.signal(signal.SIGUSR2, _on(_cg.cg_stop))


from twisted.internet.base import ReactorBase  # noqa: E402

ReactorBase.runUntilCurrent = _untimed(ReactorBase.runUntilCurrent)

from twisted.internet import reactor  # noqa: E402

from gomodel.cli import main  # noqa: E402

reactor.callWhenRunning(_install)
main()
