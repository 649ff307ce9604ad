"""The Klein routes, built at the first request that needs them.

A gateway that serves inference, health checks, the model list and a fleet's
two admin calls (the front serves those itself: L{gomodel.api.plain}) never imports Klein, werkzeug, the admin, files and
batches APIs or the dashboard's assets: about 4 MiB of every process and
0.1 s of its start. The first request for any other route builds them (a
one-time pause of 0.1-0.2 s); from then on this resource hands requests
straight to Klein's.
"""

import re

from twisted.python.failure import Failure
from twisted.web.resource import Resource

from gomodel import errors
from gomodel.api.uploads import UPLOAD_PATHS
from gomodel.http import render


class LazyRoutes(Resource):
    """Klein's routes (L{gomodel.api.app.GatewayApp}), made by C{make()} when first needed."""

    isLeaf = True

    def __init__(self, make):
        """
        @param make: returns the L{gomodel.api.app.GatewayApp} (the composition root's
            function: it imports and builds what the app mounts).
        """
        super().__init__()
        self._make = make
        self._app = None

    @property
    def app(self):
        """The L{gomodel.api.app.GatewayApp} (built now if it was not)."""
        if self._app is None:
            self._app = self._make()
        return self._app

    def render(self, request):
        if not _utf8(request):
            return render.fail(request, Failure(errors.InvalidRequest(
                "The request's path and Host header must be UTF-8 once percent-decoded.", code="invalid_url")))
        if _two_slashes_first(request.postpath) or any(map(_CONTROL.search, request.postpath)):
            return render.fail(request, Failure(errors.NotFound(
                f"Unknown route: {request.method.decode('ascii', 'replace')} "
                f"{request.path.decode('utf-8', 'replace')}.")))
        try:
            app = self.app
        except Exception:  # logged; a 500, and the next request tries again
            return render.fail(request, Failure())
        return app.resource.render(request)

    def upload_sink(self, request, method, path, length):
        """For L{gomodel.http.site.GatewaySite}: the files API's sink for an upload (C{POST /v1/files}),
        or None for any other request (which builds nothing)."""
        if method != b"POST" or path not in UPLOAD_PATHS:
            return None
        return self.app.files.upload_sink(request, method, path, length)


class LazyAPI:
    """An API mounted on Klein's routes (an object with a Klein C{app}: L{gomodel.http.bodies.mounted}), made by
    C{make()} at the first request for it: a request for one API (the admin API's usage) imports none of the
    others (files, batches, Message Batches, budgets: their modules and Klein rules, about 0.5 MiB)."""

    def __init__(self, make):
        """
        @param make: imports and returns the API (the composition root's function); one that raises is that
            request's error (its 500), and the next request calls it again.
        """
        self._make = make
        self._api = None

    @property
    def api(self):
        """The API (made now if it was not)."""
        return self._made()

    def _made(self):
        # (a method, not the property: an AttributeError out of the maker, raised while a property is read,
        # would be taken for a missing attribute and asked of __getattr__ again, for ever)
        if self._api is None:
            self._api = self._make()
        return self._api

    def __getattr__(self, name):  # (its app, an upload's sink...: the API's own)
        if name.startswith("__") or name in _OWN:
            raise AttributeError(name)
        return getattr(self._made(), name)


# LazyAPI's own attributes: asked of __getattr__ only when they are missing (before __init__, or the property's
# maker raised AttributeError), never the API's.
_OWN = frozenset({"_make", "_api", "api"})


def _utf8(request) -> bool:
    """Whether Klein can decode C{request}'s path segments (percent-decoded by Twisted) and Host as UTF-8:
    it answers any other request with a text 400 and logs a traceback of the client's bytes."""
    try:
        for segment in request.postpath:
            segment.decode("utf-8")
        request.getRequestHostname().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# A control character (percent-decoded: C{%00}, C{%0A}, ...) in a path segment: no id, name or path the
# routes take holds one, and PostgreSQL's text cannot (a NUL in a lookup would be its error, not a 404).
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def _two_slashes_first(segments) -> bool:
    """Whether the percent-decoded path of these segments (a request's C{postpath}) begins with C{//}
    (C{//admin/...}, C{/%2Fadmin/...}): Klein joins the segments anew, and its path would then be one
    slash short, C{/admin/...}, not the path the key was checked on (L{gomodel.auth.keys.GatewayAuth})."""
    first = segments[0] if segments else b""
    return first.startswith(b"/") or (not first and len(segments) > 1)
