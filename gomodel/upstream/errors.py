"""Turn an upstream's error answer into our envelope, keeping its status.

An OpenAI-shaped error (vLLM's own 400/404/...) passes through byte for byte;
vLLM's bare C{{"error": "Unauthorized"}}, FastAPI's C{{"detail": ...}}, vLLM's
old flat C{{"object": "error", ...}} and anything that is not JSON are wrapped.
The upstream's address never appears in what the client gets.
"""

from gomodel import jsonutil
from gomodel.errors import UpstreamError, envelope

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def default_type(status: int) -> str:
    """The OpenAI error type for an upstream status that came without one."""
    if status >= 500:
        return "provider_error"
    return _TYPE_BY_STATUS.get(status, "invalid_request_error")


def upstream_error(status: int, body: bytes, provider_name: str, hide=()) -> UpstreamError:
    """Build the L{UpstreamError} for an upstream answer with C{status} >= 400.

    @param hide: strings (the upstream's URLs, host and port, host) that must not
        reach the client, longest first; each is replaced by the provider's name.
    """
    parsed = _parse(body)
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message = error["message"]
        if not any(h and h.encode() in body for h in hide):
            return UpstreamError(status, body, message)
        return _wrapped(status, _hidden(message, hide, provider_name), *(
            _hidden(error.get(field), hide, provider_name) for field in ("type", "param", "code")))
    if isinstance(parsed, dict) and isinstance(error, str):
        message = error
        if status in (401, 403):
            message = (f"{error} (the upstream provider '{provider_name}' refused the gateway's "
                       "credentials: check that provider's api_key)")
        return _wrapped(status, _hidden(message, hide, provider_name))
    if isinstance(parsed, dict) and "detail" in parsed:
        detail = parsed["detail"]
        message = detail if isinstance(detail, str) else jsonutil.dumps(detail).decode()
        if status == 404 and detail == "Not Found":  # FastAPI's: vLLM has the route only for a model whose task it is
            message = (f"The upstream provider '{provider_name}' has no route for this request (Not Found): its "
                       "model does not serve this endpoint (embeddings need an embedding model, rerank and score a "
                       "pooling one).")
        return _wrapped(status, _hidden(message, hide, provider_name))
    if isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
        return _wrapped(status, _hidden(parsed["message"], hide, provider_name), *(
            _hidden(parsed.get(field), hide, provider_name) for field in ("type", "param", "code")))
    return _wrapped(status, f"The upstream provider '{provider_name}' answered HTTP {status}.")


def with_retry_after(error: UpstreamError, response) -> UpstreamError:
    """C{error}, made of C{response}'s error answer, with that answer's C{Retry-After} (an overloaded vLLM's 429
    or 503, a proxy's in front of it): the client waits as long as the upstream asked before it tries again."""
    retry_after = response.headers.getRawHeaders(b"retry-after")
    if retry_after:
        error.headers["Retry-After"] = retry_after[0].decode("latin-1")
    return error


def without_address(message: str, upstream) -> str:
    """C{message} (the upstream's own, in a stream) with every address of C{upstream}, a provider's pool
    (its C{hidden}), replaced by the provider's name."""
    return _hidden(message, upstream.hidden, upstream.name)


def _parse(body: bytes):
    try:
        return jsonutil.loads(body)
    except jsonutil.JSONError:
        return None


def _hidden(message, hide, provider_name: str):
    """C{message} with every string of C{hide} replaced by C{provider_name} (a value that is no string as it is)."""
    if not isinstance(message, str):
        return message
    for h in hide:
        if h:
            message = message.replace(h, provider_name)
    return message


def _wrapped(status, message, type_=None, param=None, code=None) -> UpstreamError:
    if not isinstance(type_, str) or not type_:
        type_ = default_type(status)
    if not isinstance(param, (str, type(None))):
        param = None
    if not isinstance(code, (str, int, type(None))):
        code = None
    return UpstreamError(status, envelope(message, type_, param, code), message)
