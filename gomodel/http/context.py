"""One request's facts, from its head to its end, passed explicitly down the request path.

The front makes a L{RequestContext} when a request's head is in; the route
names the model and provider, the exchange the replica, the usage and the
time to first byte. The record completes exactly once, when the response is
over I{and} nothing still holds the context (the exchange holds it while it
relays), and goes to every sink: the access log, metrics, the usage ledger,
the drain's count. Nothing is read back through callback order.
"""

from time import time
from types import FunctionType

from twisted.logger import Logger, LogLevel, LogPublisher

from gomodel.accounting.tokens import tokens_by_type
from gomodel.logs import LINE_FORMAT, TextObserver

# Outcomes a finished request can have.
OK = "ok"
ERROR = "error"  # an error answer (4xx/5xx) went out whole
CLIENT_GONE = "client_gone"  # the client left before the answer was complete
STREAM_BROKEN = "stream_broken"  # the answer started, then the upstream failed it
REFUSED = "refused"  # the gateway's own limits or budgets refused it, before any upstream (a usage record's only)
CLIENT_GONE_STATUS = 499  # nginx's "client closed request"
DASH = "-"  # the access log's unknown
# The text observer's format of an access line (L{TextObserver.hold_line}: its time, namespace and level, then
# the line); and of the line of a managed key's request that went out whole with its usage, of its values as
# L{AccessLog._line} writes them.
LINE = "%s%s\n"
KEYED_LINE = ("%s%s %s %s %.1fms request_id=%s provider=%s model=%s replica=%s key=%s prompt_tokens=%s"
              " completion_tokens=%s\n")
PASSTHROUGH = "/p/{provider}/{endpoint}"  # the endpoint of every passthrough request (the metrics' label stays bounded)
# The errors of a stream the gateway cut itself (its client told C{stream_incomplete}), none the upstream's failure:
# its client read nothing for HTTP_CLIENT_STALL_TIMEOUT, it ran past HTTP_STREAM_MAX_DURATION.
CLIENT_STALLED = "client_stalled"
STREAM_MAX_DURATION = "stream_max_duration"


class RequestContext:
    """What the gateway knows about one request.

    @ivar principal: who made the request (a L{gomodel.auth.keys.Principal}),
        or None on an open gateway or path.
    @ivar key: its id: C{"master"}, a managed key's id, or None. Never a secret.
    @ivar endpoint: the gateway route, e.g. C{"/v1/chat/completions"}.
    @ivar provider: the provider instance name, C{provider_type} its type.
    @ivar replica: the 0-based index of the replica that served it, or None.
    @ivar model: the model as the client named it; C{upstream_model} as sent.
    @ivar usage: the upstream's usage object (chat's C{prompt_tokens},
        Responses' or Anthropic's C{input_tokens} naming), as soon as it is known.
    @ivar first_byte: seconds from the request's head to the answer's first
        body byte written to the client, or None.
    @ivar status: the status sent (499 when the client left first).
    @ivar outcome: L{OK}, L{ERROR}, L{CLIENT_GONE} or L{STREAM_BROKEN}.
    @ivar error: the error code of a failed request (e.g. C{upstream_timeout}).
    @ivar stream: whether the answer is an event stream; C{asked_stream}, whether the request asked for one
        (the label of a stream request that failed before its stream began).
    @ivar token_counts: L{tokens_by_type} of L{usage}, worked out once as it completes, before its sinks (the usage
        ledger and the metrics both count them); None without usage.
    @ivar trace: its OpenTelemetry spans (a L{gomodel.accounting.tracing.RequestTrace}),
        or None when tracing is off.
    """

    log = Logger()

    __slots__ = ("request_id", "method", "path", "started", "key", "dialect", "endpoint", "provider",
                 "provider_type", "replica", "model", "upstream_model", "stream", "asked_stream", "usage",
                 "first_byte",
                 "status", "outcome", "error", "client_gone", "duration", "_clock", "_sinks", "_holds",
                 "_ended", "_completed", "_end_written", "recorded", "estimated", "principal", "admission", "trace",
                 "token_counts", "attempts", "retries", "budgets", "transfers_dropped")

    def __init__(self, request_id: bytes, method: bytes, path: bytes, clock, sinks=(), principal=None,
                 dialect=None, recorded=None):
        """Made for every request by position (a class called with keywords gets them as a dict in CPython 3.11:
        about 2,400 instructions more for three).

        @param recorded: whether a sink reads the usage (if none does, it need not be
            dug out of answers); by default, whether any sink lacks C{reads_usage = False}.
        """
        self.request_id = request_id
        self.method = method
        self.path = path
        self._clock = clock
        self.started = clock.seconds()
        self._sinks = sinks
        self.recorded = reads_usage(sinks) if recorded is None else recorded
        self.principal = principal
        self.key = principal.id if principal is not None else None
        self.admission = None  # the limits' admission, settled when the request completes
        self.budgets = None  # the budget scopes its admission checked off the lanes (charged when it completes)
        self.dialect = dialect
        self.endpoint = None
        self.provider = None
        self.provider_type = None
        self.replica = None
        self.model = None
        self.upstream_model = None
        self.stream = False
        self.asked_stream = False
        self.usage = None
        self.token_counts = None
        self.estimated = False  # usage counted by the gateway (a stream cut before its usage came)
        self.first_byte = None
        self.status = None
        self.outcome = None
        self.error = None
        self.client_gone = False
        self.duration = None
        self.trace = None
        self.attempts = 0  # its failed sends upstream so far, every target's (bounded by ROUTING_MAX_ATTEMPTS)
        self.retries = 0  # times it went on to another replica or target before its first byte (the access log's)
        # its vLLM request went without kv/ec_transfer_params (a managed key's: L{gomodel.auth.tenancy
        # .CacheSalts.apply}), its vLLM answer too (L{gomodel.proxy.transfers})
        self.transfers_dropped = False
        self._holds = 0
        self._ended = False
        self._completed = False
        self._end_written = False

    def route(self, upstream, model, upstream_model):
        """Record that C{model} (as the client named it) goes to C{upstream} as C{upstream_model}."""
        self.provider = upstream.name
        self.provider_type = upstream.type
        self.model = model
        self.upstream_model = upstream_model

    def first_byte_written(self):
        """Note the time of the answer's first body byte (only the first call counts)."""
        if self.first_byte is None:
            self.first_byte = self._clock.seconds() - self.started

    def end_written(self):
        """The stream's proper end (C{[DONE]}, its final event) was written: a client that
        leaves from now on (SDKs close at C{[DONE]}, before the body's last chunk) got it all."""
        self._end_written = True

    def broken(self, error_code):
        """The answer started and then failed: the status stays what was sent."""
        self.outcome = STREAM_BROKEN
        self.error = error_code

    def failed_in_band(self, error_code):
        """The upstream reported an error inside the stream it answered with (an error event), which the
        client got, then the stream's proper end: an error of the status sent, the answer finished as usual."""
        self.outcome = ERROR
        self.error = error_code

    def cut(self, error_code):
        """The gateway closes the connection before the answer started (a drain out of time): an error
        of the status set on the request, not a client that left when the connection is lost."""
        self.outcome = ERROR
        self.error = error_code

    # -- the end -----------------------------------------------------------------

    def hold(self):
        """Keep the record open until L{release} (the exchange, while it relays)."""
        self._holds += 1

    def release(self):
        self._holds -= 1
        self._maybe_complete()

    def ended(self, status: int, client_gone: bool):
        """The response is over: written whole, or its connection lost first."""
        if self._ended:
            return
        self._ended = True
        self.duration = self._clock.seconds() - self.started
        if self.outcome == STREAM_BROKEN or self.outcome == ERROR:
            self.status = status  # we closed it ourselves (L{broken}, L{cut})
        elif client_gone and not self._end_written:
            self.client_gone = True
            self.outcome = CLIENT_GONE
            self.status = CLIENT_GONE_STATUS
        else:
            self.status = status
            self.outcome = OK if status < 400 else ERROR
        self._maybe_complete()

    def _maybe_complete(self):
        if self._completed or not self._ended or self._holds > 0:
            return
        self._completed = True
        usage = self.usage
        # (a slot the sinks read, not a property: in CPython 3.11 a property read costs some 700 instructions)
        if usage:
            self.token_counts = tokens_by_type(usage)
        for sink in self._sinks:
            try:
                sink(self)
            except Exception:
                self.log.failure("a request completion sink failed")

    @property
    def completed(self) -> bool:
        return self._completed

    @property
    def tokens(self):
        """C{(input, output)} tokens from L{usage}, any naming; None where unknown.

        Anthropic's cache reads and writes count as input (its C{input_tokens} leaves them out).
        """
        usage = self.usage
        if not usage:
            return None, None
        prompt = usage.get("prompt_tokens")
        if prompt is None:
            prompt = usage.get("input_tokens")
            if isinstance(prompt, int):
                for name in ("cache_read_input_tokens", "cache_creation_input_tokens"):
                    extra = usage.get(name)
                    prompt += extra if isinstance(extra, int) else 0
        completion = usage.get("completion_tokens")
        return prompt, (completion if completion is not None else usage.get("output_tokens"))


def reads_usage(sinks) -> bool:
    """Whether one of C{sinks} reads a record's usage (a sink that does not says C{reads_usage = False})."""
    return any(getattr(sink, "reads_usage", True) for sink in sinks)


def called(sink):
    """What calls C{sink}: its class's C{__call__} bound to it where that is a Python function (the access log,
    the metrics, the usage ledger, the drain, the key check), else C{sink} itself. A call of an instance whose
    class defines C{__call__} is not specialised in CPython 3.11 (it goes through C, into a new frame of the
    interpreter): about 650 instructions more per call than a call of its bound method."""
    call = getattr(sink.__class__, "__call__", None)
    return sink.__call__ if call.__class__ is FunctionType else sink


class AccessLog:
    """The access log: one structured line per completed request (namespace C{gomodel.access}).

    The line's text is made here in one f-string and handed to observers as the event's
    C{log_line}, its format C{"{log_line}"} (L{gomodel.logs.LINE_FORMAT}), which gomodel's
    observers write as it is; the fields stay in the event for structured observers. The event
    goes to the logger's observer directly, as L{Logger.emit} would send it (the same keys),
    without its check of a level that is always C{info}.

    While the only observer of that publisher is gomodel's text observer (the default under
    C{twistd -n}: Twisted's classic lines on standard output), no event is made: the text that
    observer would make of the event (L{ClassicText.line}; its beginning, the time, namespace and
    level, made once a second) is handed to it as a format and its values (L{TextObserver.hold_line}),
    made into text when it is written: a managed key's request that went out whole with its usage
    (most requests, where keys are used) as its values themselves (L{KEYED_LINE}), no f-string. Any
    other observer added (C{LOG_FORMAT=json}, C{LOG_LEVEL}, twistd's C{--logfile}, a test's)
    gets events again from its next line on.
    """

    def __init__(self, logger=None):
        self._log = log = logger if logger is not None else Logger(namespace="gomodel.access")
        # A LogPublisher's observers: a list it changes in place as observers come and go.
        self._observers = log.observer._observers if log.observer.__class__ is LogPublisher else ()
        # the text observer last seen alone in it (L{_text_alone}), and that list's like: one comparison a line
        self._text = None
        self._alone = [None]
        # the text's beginning and its whole second (logs._per_second's cache, inline: a call less per line)
        self._second = None
        self._head = None

    def __call__(self, ctx: RequestContext):
        # (decoded once, whichever way the line goes)
        method, path, request_id = (ctx.method.decode("ascii", "replace"), ctx.path.decode("ascii", "replace"),
                                    ctx.request_id.decode("ascii"))
        observers = self._observers
        if observers == self._alone or self._text_alone(observers):
            try:
                now = time()
                if int(now) != self._second:
                    self._second, self._head = int(now), self._text.format.head(now, self._log.namespace, "info")
                usage = ctx.usage
                replica = ctx.replica
                key = ctx.key
                # A managed key's request that went out whole with its usage (most, where keys are used): its values
                # held as they are, the line made of them when it goes out (L{TextObserver.hold_line}).
                if usage and replica is not None and key is not None and ctx.outcome is OK and not ctx.retries:
                    prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
                    if prompt_tokens is not None and completion_tokens is not None:  # (as L{_line} shows them)
                        self._text.hold_line(KEYED_LINE, (
                            self._head, method, path, ctx.status, ctx.duration * 1000, request_id,
                            ctx.provider or DASH, ctx.model or DASH, replica, key, prompt_tokens, completion_tokens))
                        return
                self._text.hold_line(LINE, (self._head, self._line(ctx, method, path, request_id)[0]))
                return
            except Exception:
                pass  # the event says so: the publisher logs an observer that fails
        line, prompt_tokens, completion_tokens, error = self._line(ctx, method, path, request_id)
        log = self._log
        log.observer({
            "log_line": line,
            "method": method,
            "path": path,
            "status": ctx.status,
            "duration_ms": ctx.duration * 1000,
            "request_id": request_id,
            "provider": ctx.provider or DASH,
            "model": ctx.model or DASH,
            "replica": ctx.replica,
            "key": ctx.key,
            "stream": ctx.stream or ctx.asked_stream,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            # in ms to the microsecond: an integer over 1000 shows as that decimal (round(x, 3) is slow)
            "ttfb_ms": None if ctx.first_byte is None else round(ctx.first_byte * 1e6) / 1000,
            "retries": ctx.retries,
            "outcome": ctx.outcome,
            "error": error,
            "client_gone": ctx.client_gone,
            "log_logger": log,
            "log_level": LogLevel.info,
            "log_namespace": log.namespace,
            "log_source": log.source,
            "log_format": LINE_FORMAT,
            "log_time": time(),
        })

    @staticmethod
    def _line(ctx, method: str, path: str, request_id: str):
        """C{ctx}'s access line (its line breaks as they are), its prompt and completion tokens and its error (its
        C{method}, C{path} and C{request_id} decoded)."""
        usage = ctx.usage
        tokens = ""
        if usage:  # (L{RequestContext.tokens}, its common case inline)
            prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if prompt_tokens is None or completion_tokens is None:
                prompt_tokens, completion_tokens = ctx.tokens
            if prompt_tokens is not None or completion_tokens is not None:
                tokens = (f" prompt_tokens={DASH if prompt_tokens is None else prompt_tokens}"
                          f" completion_tokens={DASH if completion_tokens is None else completion_tokens}")
        else:
            prompt_tokens = completion_tokens = None
        outcome = ctx.outcome
        error = ctx.error
        ended = ""
        if outcome is not OK and outcome is not None:
            if error is None and ctx.status >= 500 and ctx.provider is not None:
                error = f"http_{ctx.status}"  # (the upstream's own, relayed: as gomodel_upstream_errors_total names it)
            ended = f" outcome={outcome} error={error}" if error else f" outcome={outcome}"
        replica = ctx.replica
        key = ctx.key
        retries = ctx.retries
        # one f-string: then what is known of it, its replica, key and tokens; how it ended, unless it went out whole
        line = (f"{method} {path} {ctx.status} {ctx.duration * 1000:.1f}ms request_id={request_id} "
                f"provider={ctx.provider or DASH} model={ctx.model or DASH}"
                f"{'' if replica is None else f' replica={replica}'}{'' if key is None else f' key={key}'}"
                f"{tokens}{f' retries={retries}' if retries else ''}{ended}")
        return line, prompt_tokens, completion_tokens, error

    def _text_alone(self, observers) -> bool:
        """Whether C{observers} is gomodel's text observer alone (then kept as the one last seen alone)."""
        if len(observers) == 1 and observers[0].__class__ is TextObserver:
            self._text = observers[0]
            self._alone = [self._text]
            return True
        return False
