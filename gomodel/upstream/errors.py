"""Turn an upstream's error answer into our envelope, keeping its status.

An OpenAI-shaped error (vLLM's own 400/404/...) passes through byte for byte;
vLLM's bare C{{"error": "Unauthorized"}}, FastAPI's C{{"detail": ...}}, vLLM's
old flat C{{"object": "error", ...}} and anything that is not JSON are wrapped.
An error answered as an event stream (a streamed request's 4xx/5xx from some
OpenAI-compatible servers) is read as its first event's data.
The upstream's address never appears in what the client gets, nor the provider's
own key (an upstream that quotes the key it refused: L{gomodel.addresses.Secret}).
"""

import re
import time
from functools import partial

from gomodel import jsonutil
from gomodel.errors import SDK_RETRY_WAIT, UpstreamAuthFailed, UpstreamError, UpstreamQuotaExhausted, envelope
from gomodel.proxy.sse import event_data, hidden_strings
from gomodel.addresses import scrubbed, scrubber
from gomodel.routing.pool import retry_after_seconds

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
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
    """Build the L{UpstreamError} for an upstream answer with C{status} >= 400: a 401 (the upstream refused the
    gateway's key for it) is L{UpstreamAuthFailed}, a 502 without the upstream's words.

    @param hide: strings (the upstream's URLs, host and port, host; its key, a L{gomodel.addresses.Secret}) that
        must not reach the client, in any shape (L{scrubbed}): each is replaced by the provider's name (a key by
        C{***}).
    """
    if status == 401:  # (the gateway's key for the provider, not the client's: never relayed as a 401)
        said = _scope_missing(body)
        return UpstreamAuthFailed(provider_name, None if said is None else _hidden(said, hide, provider_name))
    body, parsed = json_of(body)
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if status == 429 and _spent(error):
        said = error.get("message")
        return UpstreamQuotaExhausted(provider_name, _hidden(said, hide, provider_name) if isinstance(said, str)
                                      else None)
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message = error["message"]
        if not _mentions(body, parsed, hide):
            return UpstreamError(status, body, message)
        return _wrapped(status, _hidden(message, hide, provider_name), *(
            _hidden(error.get(field), hide, provider_name) for field in ("type", "param", "code")))
    if isinstance(parsed, dict) and isinstance(error, str):
        message = error
        if status == 403:
            message = (f"{error} (the upstream provider '{provider_name}' refused the gateway's "
                       "credentials: check that provider's api_key)")
        return _wrapped(status, _hidden(message, hide, provider_name))
    if isinstance(parsed, dict) and "detail" in parsed:
        detail = parsed["detail"]
        message = detail if isinstance(detail, str) else jsonutil.dumps(detail).decode()
        if status == 404 and detail == "Not Found":  # FastAPI's: vLLM has the route only for a model whose task it is
            message = (f"The upstream provider '{provider_name}' has no route for this request (Not Found): its "
                       "model does not serve this endpoint (embeddings need an embedding model, rerank and score a "
                       "pooling one, audio transcriptions and translations a speech recognition one, speech a "
                       "text-to-speech one).")
        return _wrapped(status, _hidden(message, hide, provider_name))
    if isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
        return _wrapped(status, _hidden(parsed["message"], hide, provider_name), *(
            _hidden(parsed.get(field), hide, provider_name) for field in ("type", "param", "code")))
    return _wrapped(status, f"The upstream provider '{provider_name}' answered HTTP {status}.")


def out_of_quota(status: int, body: bytes) -> bool:
    """Whether an upstream's answer (C{status}, C{body}) is OpenAI's 429 C{insufficient_quota}: the gateway's account
    with it has no credit left, which no wait and no other replica of it (the same account) changes."""
    if status != 429 or body.find(b"insufficient_quota") < 0:
        return False
    parsed = json_of(body)[1]
    return _spent(parsed.get("error") if isinstance(parsed, dict) else None)


def lacks_scope(status: int, body: bytes) -> bool:
    """Whether an upstream's answer (C{status}, C{body}) is OpenAI's 401 for a restricted key used outside its
    scopes ("insufficient permissions ... Missing scopes"): the key is good for its other endpoints, so the
    replica that answered it is not failing (L{upstream_error} says so to the client)."""
    return status == 401 and _scope_missing(body) is not None


def _scope_missing(body: bytes):
    """The message of a 401's C{body} saying the key lacks a permission or scope (L{lacks_scope}), or None."""
    if body.find(b"scope") < 0 and body.find(b"permission") < 0:
        return None
    parsed = json_of(body)[1]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str):
        return None
    lowered = message.lower()
    return message if "missing scopes" in lowered or "insufficient permissions" in lowered else None


def _spent(error) -> bool:
    """Whether C{error}, an upstream's 429's C{error} member, says its quota is spent (L{out_of_quota})."""
    return isinstance(error, dict) and "insufficient_quota" in (error.get("code"), error.get("type"))


def with_retry_after(error: UpstreamError, response) -> UpstreamError:
    """C{error}, made of C{response}'s error answer, with that answer's C{Retry-After} (an overloaded vLLM's 429
    or 503, a proxy's in front of it): the client waits as long as the upstream asked before it tries again.
    A wait past L{SDK_RETRY_WAIT} (a provider's daily quota) comes with C{x-should-retry: false}, as the
    gateway's own refusals' do: the SDKs tell their caller rather than sleep through it. One that is no wait
    (neither seconds nor a date to come: an upstream's address, its key) is not relayed."""
    retry_after = response.headers.getRawHeaders(b"retry-after")
    if retry_after and error.__class__ is not UpstreamQuotaExhausted:  # (no wait lifts a spent quota)
        seconds = retry_after_seconds(retry_after[0], time.time())
        if seconds is not None or retry_after[0].strip() == b"0":
            error.headers["Retry-After"] = retry_after[0].strip().decode("latin-1")
            if seconds is not None and seconds > SDK_RETRY_WAIT:
                error.headers["x-should-retry"] = "false"
    return error


def without_address(message: str, upstream) -> str:
    """C{message} (the upstream's own, in a stream) with every address of C{upstream}, a provider's pool
    (its C{hidden}), replaced by the provider's name."""
    return _hidden(message, upstream.hidden, upstream.name)


def hidden_in(body: bytes, upstream) -> bytes:
    """C{body}, an upstream's raw answer relayed as it is (a passthrough's error), with every address and key of
    C{upstream}'s C{hidden} replaced as in an error message (L{gomodel.addresses.scrubbed}: a URL also as
    JSON may write it, C{http:\\/\\/...}; a JSON body's or event's strings also where it writes them with C{\\u}
    escapes, which name the address to any client that reads them: written again then)."""
    body = scrubbed(body, upstream.hidden, upstream.name)
    if body.find(b"\\u") < 0:
        return body
    shown = _json_hidden(body, upstream)
    if shown is not None:
        return shown
    lines = body.split(b"\n")  # (an event stream's: its data lines)
    for i, line in enumerate(lines):
        if line.startswith(b"data:") and line.find(b"\\u") >= 0:
            data = line[5:]
            shown = _json_hidden(data, upstream)
            if shown is not None and shown is not data:
                lines[i] = b"data: " + shown
    return b"\n".join(lines)


def _json_hidden(data: bytes, upstream):
    """C{data}, JSON, with its strings without C{upstream}'s addresses (L{without_address}): C{data} itself where
    none names one; None where it is no JSON."""
    value = _parse(data)
    if value is None:
        return None
    shown = hidden_strings(value, partial(without_address, upstream=upstream))
    return data if shown == value else jsonutil.dumps(shown)


def _mentions(body: bytes, parsed, hide) -> bool:
    """Whether an upstream's JSON error answer C{body} (C{parsed}) holds any of C{hide}: in its bytes, or once its
    strings are decoded (an address written with JSON's escapes, C{\\u0031\\u0032\\u0037...}, is one to a client)."""
    patterns = scrubber(tuple(hide)) if hide else None
    if patterns is None:
        return False
    if patterns[1].search(body) is not None:
        return True
    if body.find(b"\\") < 0 and body.find(b"%") < 0:  # (no escape: the decoded strings are the bytes)
        return False
    return scrubbed(jsonutil.dumps(parsed), hide, "") != jsonutil.dumps(parsed)


def json_of(body: bytes):
    """C{(data, value)}: an error answer's C{body} and its JSON value; where it is no JSON but an event stream (the
    error a streamed request was answered with, C{data: {"error": ...}}, maybe C{[DONE]} after it), its first
    event's data and that data's value. C{value} is None where neither is JSON."""
    parsed = _parse(body)
    if parsed is not None or body.find(b"data:") < 0:
        return body, parsed
    for event in _EVENT_END.split(body):
        data = event_data(event)
        if data and data != b"[DONE]":
            parsed = _parse(data)
            return (body, None) if parsed is None else (data, parsed)
    return body, None


def _parse(body: bytes):
    try:
        return jsonutil.loads(body)
    except jsonutil.JSONError:
        return None


def _hidden(message, hide, provider_name: str):
    """C{message} with every address of C{hide} replaced by C{provider_name} (a key by C{***}: L{scrubbed}; a value
    that is no string as it is)."""
    if not isinstance(message, str):
        return message
    return scrubbed(message, hide, provider_name)


def _wrapped(status, message, type_=None, param=None, code=None) -> UpstreamError:
    if not isinstance(type_, str) or not type_:
        type_ = default_type(status)
    if not isinstance(param, (str, type(None))):
        param = None
    if not isinstance(code, (str, int, type(None))):
        code = None
    return UpstreamError(status, envelope(message, type_, param, code), message)


def error_shown(response, upstream):
    """C{response} (a response object, or anything) with its C{error} without C{upstream}'s addresses, as a stream's
    failed response is (L{gomodel.proxy.sse.ResponsesStreamObserver}): a new dict where that changed it; its
    output (the model's words) as it is."""
    if response.__class__ is not dict or response.get("error") is None:
        return response
    error = hidden_strings(response["error"], partial(without_address, upstream=upstream))
    return response if error == response["error"] else dict(response, error=error)
