"""Reading requests and writing JSON answers: the small helpers every route group shares."""

from gomodel import jsonutil
from gomodel.errors import InvalidRequest, NotFound, shown


def json_answer(request, value) -> bytes:
    """Set the JSON headers on C{request}; return the body (C{value} serialised, or bytes as they are)."""
    body = value if isinstance(value, bytes) else jsonutil.dumps(value)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def json_body(request) -> dict:
    """The request's JSON object body; L{InvalidRequest} for anything else."""
    request.content.seek(0)
    data = request.content.read()
    try:
        body = jsonutil.loads(data)
    except jsonutil.JSONError as e:
        _encoded(request)
        if not data.strip():
            raise InvalidRequest("The request body is empty; expected a JSON object.", code="invalid_json") from None
        raise not_json(data, e) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body


def not_json(data, error) -> InvalidRequest:
    """The 400 C{invalid_json} for a request body C{data} that failed to parse with C{error} (a
    L{jsonutil.JSONError}): its words; for bytes that are not UTF-8 (Latin-1 text, UTF-16), which byte (orjson
    says "surrogates not allowed" at line 1 column 1, wherever it is)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        reason = f"it is not UTF-8 (byte {e.start} is 0x{data[e.start]:02x}); send JSON as UTF-8."
    else:
        reason = str(error)
    return InvalidRequest(f"The request body is not valid JSON: {reason}", code="invalid_json")


def _encoded(request):
    """Refuse a body that is not JSON because it was sent compressed (C{Content-Encoding: gzip}, ...): a 415
    that says so, not a JSON error about bytes the client never wrote. (Looked at only once the body failed to
    parse: a request the gateway reads pays nothing for it.)"""
    encoding = request.requestHeaders.getRawHeaders(b"content-encoding")
    if encoding and any(value.strip().lower() not in (b"", b"identity") for value in encoding):
        named = shown(b", ".join(encoding).decode("latin-1"), 64)
        raise InvalidRequest(f"Content-Encoding '{named}' is not supported: send the JSON body uncompressed.",
                             code="unsupported_content_encoding", status=415)


def streams(body) -> bool:
    """Whether the JSON request C{body} asks for a stream: C{stream} is true (absent, null or false: not).

    @raise InvalidRequest: C{stream} is anything else (vLLM would read C{1} or C{"yes"} as true, and stream).
    """
    stream = body.get("stream")
    if stream is True:
        return True
    if stream is None or stream is False:
        return False
    raise InvalidRequest("'stream' must be a boolean (true or false).", param="stream",
                         code="invalid_type")


def boolean(body, name: str):
    """The JSON request C{body}'s C{name}: True, False, or None when absent or null.

    @raise InvalidRequest: it is anything else (vLLM would read C{1} or C{"yes"} as true).
    """
    value = body.get(name)
    if value is None or value is True or value is False:
        return value
    raise InvalidRequest(f"'{name}' must be a boolean (true or false).", param=name, code="invalid_type")


def stream_options(body) -> dict:
    """A copy of the streaming JSON request C{body}'s C{stream_options} (empty when absent or null).

    @raise InvalidRequest: it is no object, or its C{include_usage} is neither a boolean nor null (vLLM would
        read C{1} or C{"yes"} as true, and send the usage chunk the client then did not seem to ask for).
    """
    options = body.get("stream_options")
    if options is None:
        return {}
    if options.__class__ is not dict:
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options", code="invalid_type")
    usage = options.get("include_usage")
    if usage is not None and usage is not True and usage is not False:
        raise InvalidRequest("'stream_options.include_usage' must be a boolean (true or false).",
                             param="stream_options.include_usage", code="invalid_type")
    return dict(options)


def query_arg(request, name: bytes, default=None):
    """The first value of query parameter C{name} as text (empty counts as absent)."""
    values = request.args.get(name)
    if not values or not values[0]:
        return default
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"'{name.decode()}' is not valid UTF-8.", param=name.decode(),
                             code="invalid_value") from None


def single_values(request):
    """Refuse a query parameter given more than once (C{?limit=5&limit=7}): no route that calls this takes a
    list, and reading one of them would drop the other silently.

    @raise InvalidRequest: a 400 C{invalid_value} naming the parameter.
    """
    for name, values in request.args.items():
        if len(values) > 1:
            param = name.decode("utf-8", "replace")
            raise InvalidRequest(f"'{param}' is given {len(values)} times in the query; give it once.",
                                 param=param, code="invalid_value")


def query_int(request, name: bytes, low: int, high: int, default=None, *, message=None, code="invalid_value"):
    """Query parameter C{name} as a whole number from C{low} to C{high} in ASCII digits (not int()'s
    "３", " +5" or "5_0"); C{default} when it is not given.

    @raise InvalidRequest: anything else, naming the parameter, with C{message} and C{code}.
    """
    text = query_arg(request, name)
    if text is None:
        return default
    value = whole_number(text, low, high)
    if value is None:
        param = name.decode()
        raise InvalidRequest(message or f"'{param}' must be a whole number from {low} to {high}.", param=param,
                             code=code)
    return value


def whole_number(text, low: int, high: int):
    """C{text} (str, or bytes: a header's value) as a whole number from C{low} to C{high} in ASCII digits, a
    minus first where C{low} is negative (not int()'s "３", " +5" or "5_0"); None when it is anything else."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    digits = text[1:] if low < 0 and text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 30:
        return None
    value = int(text)
    return value if low <= value <= high else None


def query_limit(request, default: int, maximum: int) -> int:
    """The C{limit} query parameter, an integer from 1 to C{maximum}; C{default} when it is not given."""
    return query_int(request, b"limit", 1, maximum, default,
                     message=f"'limit' must be an integer between 1 and {maximum}.")


def page(data, has_more) -> dict:
    """An OpenAI list page of C{data} (objects with an C{id})."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def mounted(api, request):
    """The Klein resource of C{api} (a route group with an C{app}, or None: not configured, a 404) for
    C{request}, which a branch route took. Its collection (C{/v1/files}) is its C{/} with or without the
    slash: werkzeug matched an empty path for some methods only, and answered the others 404, not 405.
    """
    if api is None:
        raise NotFound(f"Unknown route: {request.method.decode()} {request.path.decode()}.")
    if not request.postpath:
        request.postpath = [b""]
    return api.app.resource()
