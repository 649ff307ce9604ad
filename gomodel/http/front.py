"""The front resource: what every request goes through before its route.

It makes the request's L{RequestContext} (named by X-Request-Id), answers
the refusals the site decided when the head came in (401, 413), serves the
inference routes (by exact path, no per-request routing machinery) and the
plain routes (health checks, model list) itself, and hands every other
request to Klein. Whatever the route, failures end in
L{gomodel.http.render.fail} and the context completes once, when the
response is over.
"""

from functools import partial
from types import CoroutineType

from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gomodel import errors
from gomodel._twistedcompat import send_now
from gomodel.http import render
from gomodel.http.context import PASSTHROUGH, STREAM_BROKEN, RequestContext, called, reads_usage
from gomodel.http.handling import Handling
from gomodel.http.headers import REQUEST_ID, X_REQUEST_ID
from gomodel.http.site import request_id_for


class FrontResource(Resource):
    isLeaf = True

    def __init__(self, routes, clock, *, body_limit=None, sinks=(), bare_sinks=None, starts=(), exact=None, pages=None,
                 dialects=None, dialect_below=None, tracer=None, plain=None):
        """
        @param routes: the resource serving every other route (Klein's).
        @param plain: a function of a request returning the handler of one of the routes served
            without Klein (L{gomodel.api.plain.PlainRoutes.find}: a function of the request
            returning the body, or a coroutine of it), or None for any other request.
        @param sinks: callables of a completed L{RequestContext} (the access log, metrics, ...).
        @param bare_sinks: those of a request no limit or budget applies to (the master key's unattributed, an open
            gateway's: no principal C{limited}), where they are fewer (the limits' settling has nothing to do);
            None: C{sinks}.
        @param starts: callables of a new L{RequestContext} (metrics' requests in flight).
        @param pages: exact path -> function of a GET request returning its body (C{/metrics}; C{/metrics/}
            too, counted as C{/metrics}).
        @param exact: exact path -> coroutine function C{(request, ctx)}, for POSTs;
            it returns the body to write, or None once it wrote the answer.
        @param dialects: exact path -> error dialect (OpenAI's unless named).
        @param dialect_below: a function of a request to a path no exact path names, giving its error
            dialect or None (OpenAI's): the paths below a family's routes (C{/v1/messages/batches}:
            Anthropic's 404), a family's routes that answer a marked client in its dialect
            (L{gomodel.api.messages.MessagesRoutes.dialect_below}). Called only for a refusal and for
            Klein's and the plain routes, never on the exact routes' way.
        @param tracer: a callable of C{(request, ctx)} returning the context's
            C{trace} (L{gomodel.accounting.tracing.Telemetry.trace}: it reads the
            request's C{traceparent}), or None when tracing is off.
        """
        super().__init__()
        self._routes = routes
        self._clock = clock
        sinks = tuple(sinks)
        self._recorded = reads_usage(sinks)  # (of the sinks themselves: a bound __call__ has not their attributes)
        self._sinks = tuple(map(called, sinks))
        self._bare_sinks = self._sinks if bare_sinks is None else tuple(map(called, bare_sinks))
        self._starts = tuple(starts)
        self._exact = exact or {}
        self._pages = pages or {}
        # The route an exact path or a page is counted under (the metrics' C{endpoint}): a page's path with its
        # trailing slash is its other spelling (C{/metrics/}), the same route.
        self._endpoints = {path: path.decode("ascii") for path in self._exact}
        self._endpoints.update((path, (path[:-1] if path[:-1] in self._pages else path).decode("ascii"))
                               for path in self._pages)
        self._dialects = dialects or {}
        self._dialect_of = dialect_below
        self._body_limit = body_limit
        self._tracer = tracer
        self._plain = plain

    def render(self, request):
        request_id = request_id_for(request)
        request.responseHeaders.put(X_REQUEST_ID, request_id)
        principal = request.identity
        ctx = request.context = RequestContext(
            request_id, request.method, request.path, self._clock,
            self._sinks if principal is not None and principal.limited else self._bare_sinks, principal,
            self._dialects.get(request.path, render.OPENAI), self._recorded)  # (principal, dialect, recorded)
        if ctx.dialect is render.ANTHROPIC:
            request.responseHeaders.put(REQUEST_ID, request_id)
        for start in self._starts:
            start(ctx)
        if self._tracer is not None:
            ctx.trace = self._tracer(request, ctx)
        refusal = self._refusal(request)
        handler = self._exact.get(request.path) if refusal is None else None
        if handler is None or request.method != b"POST":
            request.ending = partial(_ended, request, ctx, None)
            if refusal is not None:
                if request.path in self._endpoints:  # (its route's, in the metrics)
                    ctx.endpoint = self._endpoints[request.path]
                elif request.path.startswith(b"/p/"):
                    ctx.endpoint = PASSTHROUGH
                self._dialect_below(request, ctx)
                return render.render(request, refusal, ctx.dialect)
            page = self._pages.get(request.path)
            if page is not None:
                ctx.endpoint = self._endpoints[request.path]
                if request.method in (b"GET", b"HEAD"):
                    return page(request)
                return render.render(request, errors.MethodNotAllowed(
                    f"Method {request.method.decode('ascii', 'replace')} is not allowed on {ctx.endpoint} "
                    "(allowed: GET, HEAD).", headers={"Allow": "GET, HEAD"}), ctx.dialect)
            if handler is None:
                plain = self._plain(request) if self._plain is not None else None
                self._dialect_below(request, ctx)
                if plain is None:
                    return self._routes.render(request)
                try:
                    body = plain(request)
                except Exception:
                    body = render.fail(request, Failure())
                if body.__class__ is CoroutineType:  # (an admin call's: run as an exact route's, cancelled if it ends)
                    return _handled(request, ctx, body)
                write_answer(body, request)
                return NOT_DONE_YET
            ctx.endpoint = request.path.decode("ascii")
            return render.render(request, errors.MethodNotAllowed(
                f"Method {request.method.decode('ascii', 'replace')} is not allowed on "
                f"{request.path.decode('ascii')} (allowed: POST).", headers={"Allow": "POST"}), ctx.dialect)
        ctx.endpoint = request.path.decode("ascii")
        return _handled(request, ctx, handler(request, ctx))

    def answered_early(self, request_id, method, path, status, code=None, routed=False, principal=None):
        """Record a request answered before it came here (L{gomodel.http.site.GatewaySite.answered_early}: refused by
        its connection, or for C{*}): its context, of C{status} (an error of C{code} where one is given), completes at
        once through the sinks (the access log, the metrics' C{other} endpoint); it was never in flight.

        @param routed: its head was whole, its body arriving, when its connection was lost (without C{code}: its
            client left, a 499) or cut (L{gomodel.http.site.GatewaySite.lost_early}): counted under its route, as a
            refusal at its head is.
        @param principal: who sent it, where its head said (a routed one's).
        """
        ctx = RequestContext(request_id, method, path, self._clock, self._sinks, principal=principal, recorded=False)
        if routed:
            ctx.endpoint = self._endpoints.get(path) or (PASSTHROUGH if path.startswith(b"/p/") else None)
        if code is not None:
            ctx.cut(code)
        ctx.ended(status, routed and code is None)

    def dialect(self, request):
        """The error dialect of C{request}'s route (its C{path}): its exact path's, or what C{dialect_below} names;
        None: OpenAI's (L{gomodel.http.site.GatewaySite.early_body})."""
        dialect = self._dialects.get(request.path)
        if dialect is None and self._dialect_of is not None:
            dialect = self._dialect_of(request)
        return dialect

    def _dialect_below(self, request, ctx):
        """Give C{ctx} the dialect that C{dialect_below} names for C{request}, if any (else its exact path's stays);
        an answer in Anthropic's carries the request id as C{request-id} too, as an exact Anthropic route's does."""
        dialect = self._dialect_of(request) if self._dialect_of is not None else None
        if dialect is not None:
            ctx.dialect = dialect
            if dialect is render.ANTHROPIC:
                request.responseHeaders.put(REQUEST_ID, ctx.request_id)

    def _refusal(self, request):
        """The error the site decided when the head came in (401, 413), or None."""
        if request.refusal is not None:
            return request.refusal
        if request.too_large:
            return errors.RequestTooLarge(f"The request body is larger than the gateway's limit of "
                                          f"{request.body_limit} bytes ({request.limit_name}).")
        return None


def _handled(request, ctx, coroutine):
    """Run C{coroutine}, a route's handler, to answer C{request}; a client that leaves cancels it (which closes its
    upstream connection)."""
    handling = Handling(_answer, request)
    request.ending = partial(_ended, request, ctx, handling)
    handling.start(coroutine)
    return NOT_DONE_YET


def _answer(result, request):
    """Write what a route's handler gave: its body, or what its failure renders."""
    write_answer(render.fail(request, result) if isinstance(result, Failure) else result, request)


def _ended(request, ctx, handler, result):
    # The request ends with a failure when the connection was lost before the response was finished
    # (GatewayRequest.ending): the handler still running is cancelled (which closes its upstream connection).
    # (Bound by position, the result last: a partial with keywords is called through a dict of them, and the call
    # below by keyword, each dearer in CPython 3.11.)
    ctx.ended(request.code, result is not None)
    if result is not None and handler is not None:
        handler.cancel()
    return None


def write_answer(body, request):
    """Finish C{request} with C{body} (None once the answer was written), unless it ended already.

    The answer is handed to the kernel at once, not on the reactor's next turn.
    """
    if request.channel is None or request.finished or request.context.outcome == STREAM_BROKEN:
        return None  # gone, done, or aborted after it started
    if body is not None:
        request.write(body)
    transport = request.transport
    request.finish()
    send_now(transport)
    return None
