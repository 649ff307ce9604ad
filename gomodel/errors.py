"""The gateway's one error hierarchy.

Each error has a status, an OpenAI type and code, and its OpenAI envelope
C{{"error": {"message", "type", "param", "code"}}}; L{gomodel.http.render}
turns it into an answer in the route's dialect. Never HTML, never a stack
trace, never an upstream's address.
"""

from gomodel import jsonutil


class GatewayError(Exception):
    """An error with an HTTP status and an OpenAI-shaped body."""

    status = 500
    type = "server_error"
    code = None

    def __init__(self, message, *, param=None, code=None, status=None, headers=None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        """The JSON error envelope."""
        return envelope(self.message, self.type, self.param, self.code)


def envelope(message, type_, param=None, code=None) -> bytes:
    """Serialise one OpenAI error envelope."""
    return jsonutil.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def shown(text, limit=256) -> str:
    """A client's C{text} as an error message quotes it: its first C{limit} characters, then an ellipsis."""
    return text if len(text) <= limit else text[:limit] + "…"


def quoted(value, limit=256) -> str:
    """A client's C{value} (any JSON value) as an error message quotes it: its C{repr}, L{shown}."""
    return shown(repr(value), limit)


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class AmbiguousModel(InvalidRequest):
    """A bare model id several providers serve; C{choices}: their qualified ids, in the order configured."""

    code = "ambiguous_model"

    def __init__(self, model, choices):
        super().__init__(f"The model '{model}' is served by several providers; name one: {', '.join(choices)}.",
                         param="model")
        self.model = model


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class ModelAccessDenied(Forbidden):
    code = "model_access_denied"

    def __init__(self, model):
        super().__init__(f"This API key may not use the model '{shown(model)}'.", param="model")


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model):
        super().__init__(
            f"The model '{shown(model)}' does not exist or is not served by any configured provider. "
            "GET /v1/models lists the available ids.",
            param="model",
        )


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class Conflict(GatewayError):
    """The object is not in a state that allows the request (a batch not finished, not cancellable); an
    SDK's retry of it at once would meet the same state: C{x-should-retry: false} (the openai SDK retries
    a 409 twice otherwise)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"

    def __init__(self, message, **kwargs):
        kwargs.setdefault("headers", {"x-should-retry": "false"})
        super().__init__(message, **kwargs)


# Seconds the 503 of a request a drain refused (L{ShuttingDown}) tells its client to wait before sending it again:
# little, as another host (or this one's successor) takes it at once; an SDK waits that, not its own backoff.
SHUTDOWN_RETRY_AFTER = 1


class StorageUnavailable(GatewayError):
    """The gateway's own store (files, batches) cannot be used."""

    status = 503
    type = "server_error"
    code = "storage_unavailable"

    @classmethod
    def because(cls, reason: str) -> "StorageUnavailable":
        """The store cannot be used, and why (C{the gateway is stopping}, the database's own error)."""
        return cls(f"The gateway's storage is unavailable ({reason}).")


class StorageConflict(StorageUnavailable):
    """The store's database rolled a job back for conflicting with concurrent ones (a deadlock, a serialization
    failure) each time it was tried: transient, the store is not down; retrying the request may pass."""

    code = "storage_conflict"

    @classmethod
    def after(cls, attempts: int, reason: str) -> "StorageConflict":
        """The job was rolled back C{attempts} times, the last for C{reason} (the error's class name)."""
        return cls(f"The gateway's storage could not complete this request: the database rolled it back for "
                   f"conflicting with concurrent ones {attempts} times ({reason}); retry it.")


class ShuttingDown(GatewayError):
    """The gateway stopped before it answered: its drain ran out of time (C{SHUTDOWN_TIMEOUT}). It says
    C{Retry-After} (L{SHUTDOWN_RETRY_AFTER}): sent again, on a new connection, the request reaches another host."""

    status = 503
    type = "server_error"
    code = "shutdown_timeout"

    def __init__(self):
        super().__init__("The gateway is stopping and could not finish this request in time; retry it.",
                         headers=wait_headers(SHUTDOWN_RETRY_AFTER))


class RowsRejected(Exception):
    """A store cannot write a row it was given, however often it tries (a value its columns cannot hold):
    none of the rows given with it was written. Never an answer to a client: the store's caller drops
    that row (L{gomodel.accounting.usage.UsageLedger})."""


class NotSupported(GatewayError):
    """The provider cannot do what the route asks (no tokenizer to count with); retrying will not help."""

    status = 501
    type = "invalid_request_error"
    code = "not_supported"

    def __init__(self, message):
        super().__init__(message, headers={"x-should-retry": "false"})


class InternalError(GatewayError):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message="The gateway failed to handle the request."):
        super().__init__(message)


class UpstreamUnreachable(GatewayError):
    """No answer came: the upstream could not be reached (C{sent} False: it never had the request, which costs
    nothing) or its connection was lost after the request went out (C{sent} True: it read the prompt)."""

    status = 502
    type = "provider_error"
    code = "upstream_unreachable"
    sent = False
    abandoned = False  # its replica went down as it waited for its answer (L{gomodel.interfaces.IUpstream.abandon})


class BadUpstreamResponse(GatewayError):
    status = 502
    type = "provider_error"
    code = "bad_upstream_response"


class UpstreamTimeout(GatewayError):
    """No answer came in time: C{sent} (most timeouts, waiting for the answer) when the request had gone out,
    False when the connection to the upstream was never made."""

    status = 504
    type = "provider_error"
    code = "upstream_timeout"
    sent = True


class ReplicasBusy(GatewayError):
    """Every replica that could serve the request is at its concurrency limit, and stayed so."""

    status = 429
    type = "rate_limit_error"
    code = "replicas_busy"

    def __init__(self, provider, retry_after: int):
        super().__init__(f"Every replica of '{provider}' is busy; retry shortly.",
                         headers={"Retry-After": str(retry_after)})


class NoReadyReplica(GatewayError):
    """No replica that serves the model is ready (starting, down or stalled)."""

    status = 503
    type = "server_error"
    code = "no_ready_replica"

    def __init__(self, provider, model, retry_after: int):
        super().__init__(f"No replica of '{provider}' that serves '{model}' is ready; retry shortly.",
                         headers={"Retry-After": str(retry_after)})


class UpstreamError(GatewayError):
    """An upstream's own error answer, already in envelope form (see L{gomodel.upstream.errors})."""

    type = "provider_error"

    def __init__(self, status, body: bytes, message):
        super().__init__(message, status=status)
        self._body = body

    def body(self) -> bytes:
        return self._body


class UpstreamAuthFailed(UpstreamError):
    """The upstream refused the gateway's own credentials for it (its HTTP 401: the provider's C{api_key} is wrong,
    or revoked): the gateway's fault, never the client's, whose key was accepted (a 401 would have its SDK, Claude
    Code, ask for a new one). A 502; the upstream's own words (which may quote the key, or its host) are not shown.
    C{x-should-retry: false}: the SDKs' retries would meet the same key (Claude Code's, ten of them)."""

    status = 502
    code = "upstream_auth_failed"

    def __init__(self, provider_name, scope=None):
        """C{scope}: the upstream's own words where its 401 said the key lacks a permission or scope for this
        operation (a restricted key, good for others: L{gomodel.upstream.errors.lacks_scope}), its addresses and
        key left out; or None."""
        if scope is None:
            message = (f"The upstream provider '{provider_name}' refused the gateway's credentials (HTTP 401): its "
                       "api_key in the gateway's configuration is wrong or revoked, for the gateway's operator to "
                       "fix (the client's own key was accepted).")
        else:
            message = (f"The upstream provider '{provider_name}' refused this operation with the gateway's "
                       "credentials (HTTP 401): its api_key lacks the permission (scope) it needs, for the "
                       f"gateway's operator to grant (the client's own key was accepted). The provider said: {scope}")
        super().__init__(self.status, envelope(message, self.type, None, self.code), message)
        self.headers["x-should-retry"] = "false"


class UpstreamQuotaExhausted(UpstreamError):
    """An upstream's 429 C{insufficient_quota} (OpenAI's: the gateway's account with that provider has no credit
    left): no rate limit, which a wait lifts, but the operator's to fix. Its status, type and code kept, the message
    saying whose quota it is (the upstream's words after it, its addresses and key left out), with
    C{x-should-retry: false} and no C{Retry-After}: the SDKs would retry a 429 in vain."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, provider_name, said=None):
        message = (f"The upstream provider '{provider_name}' has no quota left for the gateway's account with it "
                   "(insufficient_quota), for the gateway's operator to fix" + (f": {said}" if said else "."))
        super().__init__(self.status, envelope(message, self.type, None, self.code), message)
        self.headers["x-should-retry"] = "false"


class StreamFailed(GatewayError):
    """A stream that broke after its headers went out; told to the client in-band."""

    status = 502
    type = "provider_error"
    code = "stream_incomplete"


class RateLimitExceeded(GatewayError):
    """A scope's requests-, tokens- or concurrency limit refused the request (L{gomodel.limits.limiter}).

    The type is what OpenAI itself sends with C{rate_limit_exceeded}: C{"requests"}
    or C{"tokens"}, naming the limit that refused. C{Retry-After} (whole seconds,
    at least 1) is left out when no wait would help (a request larger than a
    token limit): C{x-should-retry: false} then keeps the SDKs from sending it
    again, as it does beside a wait past a minute (L{wait_headers}). C{scope} names the limited scope (C{"key:k_1"}, C{"provider:vllm"}),
    never a secret.
    """

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message, *, scope, tokens=False, retry_after=None, headers=None):
        headers = dict(headers or {}, **wait_headers(retry_after))
        super().__init__(message, headers=headers)
        self.scope = scope
        self.retry_after = retry_after
        if tokens:
            self.type = "tokens"


class BudgetExceeded(GatewayError):
    """A scope spent its budget for the current period (L{gomodel.limits.budgets}); GoModel's answer.

    C{Retry-After} is the seconds until the period ends (at least 1); a
    C{total} budget has none, and C{x-should-retry: false} instead (the SDKs
    would send it again), as beside a wait past a minute (L{wait_headers}).
    """

    status = 429
    type = "rate_limit_error"
    code = "budget_exceeded"

    def __init__(self, scope, period, what, limit, retry_after=None):
        shown = f"{limit:g}" if isinstance(limit, float) else str(limit)
        super().__init__(f"budget exceeded for {scope}: {period} {what} limit of {shown} reached",
                         headers=wait_headers(retry_after))
        self.scope = scope
        self.period = period
        self.retry_after = retry_after


# The longest wait an SDK is left to sleep through before it sends a request again. The anthropic SDK sleeps
# whatever C{Retry-After} says (a spent daily budget's: hours), the openai SDK past two minutes gives up.
SDK_RETRY_WAIT = 60


def wait_headers(retry_after) -> dict:
    """The headers of a refusal that C{retry_after} seconds may lift (None: none will): C{Retry-After}, and
    C{x-should-retry: false} where no wait will do or the wait is longer than L{SDK_RETRY_WAIT}, so the SDKs
    tell their caller at once rather than retry (or sleep through hours first)."""
    if retry_after is None:
        return {"x-should-retry": "false"}
    if retry_after > SDK_RETRY_WAIT:
        return {"Retry-After": str(whole_seconds(retry_after)), "x-should-retry": "false"}
    return {"Retry-After": str(whole_seconds(retry_after))}


def whole_seconds(seconds) -> int:
    """A wait in whole seconds for C{Retry-After}: rounded up, at least 1."""
    whole = int(seconds)
    return max(1, whole + 1 if whole < seconds else whole)
