"""The standard library's TLS, left out of a gateway that does not use it.

Twisted, treq and asyncio import the standard library's C{ssl} (through
C{http.cookiejar}, C{urllib.request}, C{http.client} and asyncio's event
loop) and C{hashlib} imports OpenSSL's hashes (C{_hashlib}): together they map
libcrypto and libssl into every process, about 4.5 MiB of it resident, for
TLS that the gateway does not do with them (its own TLS, listening or to an
https upstream, is pyOpenSSL's, loaded only where configured). Each of those
modules takes C{ssl}, or C{_hashlib}, as optional: without it, they leave
HTTPS out (C{http.client}, C{urllib.request}, asyncio) or use Python's own
hashes (C{hashlib}, C{hmac}: the same digests, in C too).

L{leave_tls_out} makes those imports, and only those, fail; any other importer
(redis-py for C{rediss://}, OpenTelemetry's exporter for an C{https}
collector, a test) gets the real module, which then loads as usual. The
C{gomodel} command (and its workers, and C{twistd -n gomodel} after a plugin
scan, which hands over to it) calls it before Twisted is imported; a process
that imported C{ssl} already is left as it is. prometheus_client alone
needs C{ssl} at import (its push gateway's and TLS exporter's defaults,
never used here): it is imported under L{tls_stub}.

Measured on the gateway at start (C{PYTHONOPTIMIZE=2}, CPython 3.11): 43.3 MiB resident with them, 38.8
without (libcrypto alone 3.5 MiB of the file-backed pages).

Nothing here imports Twisted.
"""

import os
import sys
import types
from contextlib import contextmanager

# The modules left out, and the importers that take them as optional.
_LEFT_OUT = frozenset({"ssl", "_ssl", "_hashlib"})
_OPTIONAL_FOR = frozenset({"http.client", "urllib.request", "asyncio.base_events", "asyncio.sslproto",
                           "asyncio.selector_events", "hashlib", "hmac", "werkzeug.serving"})
_IMPORT_MACHINERY = frozenset({"importlib", "importlib._bootstrap", "importlib._bootstrap_external",
                               "_frozen_importlib", "_frozen_importlib_external"})


class _LeaveOut:
    """A meta path finder: an import of C{ssl}, C{_ssl} or C{_hashlib} by a module that takes it as optional
    fails; any other import of it is left to the other finders."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in _LEFT_OUT:
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__") in _IMPORT_MACHINERY:
            frame = frame.f_back  # (to the frame of the module whose import statement asked)
        if frame is not None and frame.f_globals.get("__name__") in _OPTIONAL_FOR:
            raise ModuleNotFoundError(f"{name} is left out of this process (gomodel.lean)", name=name)
        return None


def leave_tls_out() -> bool:
    """From now on, the standard library's optional imports of TLS get none (see the module).

    @return: whether it was done: not where C{ssl} or C{_hashlib} was imported already (nothing to save), nor
        where C{GOMODEL_STDLIB_TLS=1} asks to keep them.
    """
    if _LeaveOut in sys.meta_path:
        return True
    if os.environ.get("GOMODEL_STDLIB_TLS") == "1" or not _LEFT_OUT.isdisjoint(sys.modules):
        return False
    sys.meta_path.insert(0, _LeaveOut)
    return True


class _Placeholder:
    """What the stub's every name is: a class (annotations subscript it), an int where one is compared."""


def _stub():
    module = types.ModuleType("ssl", "A stand-in for the ssl module while prometheus_client is imported.")
    module.__getattr__ = lambda name: _Placeholder
    module.PROTOCOL_TLS_SERVER, module.PROTOCOL_TLS_CLIENT = 17, 16  # (default arguments' values)
    return module


@contextmanager
def tls_stub():
    """Import under a stand-in C{ssl} where TLS is left out (L{leave_tls_out}) and not loaded, and with a
    stand-in C{urllib.request.HTTPSHandler} where C{urllib.request} has none (it was imported without
    C{ssl}): the module imported keeps them (for functions the gateway never calls); afterwards C{urllib.request}
    is as it was, and the next import of C{ssl} gets the real one."""
    if _LeaveOut not in sys.meta_path or "ssl" in sys.modules:
        yield
        return
    stub = sys.modules["ssl"] = _stub()
    request = sys.modules.get("urllib.request")
    handler = request is not None and not hasattr(request, "HTTPSHandler")
    if handler:
        request.HTTPSHandler = _Placeholder
    try:
        yield
    finally:
        if handler:
            del request.HTTPSHandler
        if sys.modules.get("ssl") is stub:
            del sys.modules["ssl"]
