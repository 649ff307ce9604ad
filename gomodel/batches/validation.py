"""What a batch input line must be: pure checks, no I/O."""

import re
from typing import NamedTuple, Optional

from gomodel import jsonutil
from gomodel.api.inference import hinted
from gomodel.config.parsers import positive_duration
from gomodel.errors import InvalidRequest, shown

# Endpoints a batch may target (OpenAI's, vLLM's rerank and score, and Anthropic's Messages: the endpoint of
# the Message Batches API's batches, gomodel.anthropic.batches).
ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses", "/v1/rerank",
             "/v1/score", "/v1/messages")
# Batches each of whose requests ends with a result, those cancelled, expired or whose model the key may no
# longer use too (Anthropic's results name each request; OpenAI's leave the lines not run out, and a line's
# model is checked before the batch runs: one it may not use fails the batch).
EVERY_LINE_ENDPOINTS = ("/v1/messages",)
MAX_WINDOW = 30 * 24 * 3600.0
MAX_METADATA = 16
_BINARY = ("bytes", "bytes_only")  # vLLM's binary embeddings (bytes_only: without their metadata header)


class LineError(NamedTuple):
    """One problem of the input file, as it appears in the batch's C{errors.data}."""

    code: str
    message: str
    param: Optional[str]
    line: Optional[int]

    def as_dict(self):
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


class Request(NamedTuple):
    custom_id: str
    model: str
    body: bytes  # the line's body, serialised again (every field kept)


def check_line(raw, number: int, endpoint: str):
    """A L{Request} for one input line (1-based C{number}), or a L{LineError}."""
    if raw is None:
        return LineError("line_too_long", "The line is too long.", None, number)
    try:
        item = jsonutil.loads(raw)
    except jsonutil.JSONError:
        return LineError("invalid_json_line", "The line is not valid JSON.", None, number)
    if not isinstance(item, dict):
        return LineError("invalid_json_line", "The line must be a JSON object.", None, number)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError("missing_custom_id", "Each line needs a non-empty string 'custom_id'.", "custom_id", number)
    if "\x00" in custom_id:  # (PostgreSQL cannot keep it: the batch would fail to start again and again)
        return LineError("invalid_custom_id", "A 'custom_id' cannot hold a NUL character.", "custom_id", number)
    if item.get("method") != "POST":
        return LineError("invalid_method", "The 'method' of each line must be 'POST'.", "method", number)
    url = item.get("url")
    if url != endpoint:
        return LineError("mismatched_endpoint",
                         f"The 'url' of each line must be the batch's endpoint '{endpoint}' (got {shown(repr(url))}).",
                         "url", number)
    body = item.get("body")
    if not isinstance(body, dict):
        return LineError("invalid_body", "The 'body' of each line must be a JSON object.", "body", number)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        return LineError("missing_model", "The 'body' of each line needs a 'model'.", "body.model", number)
    hint = body.get("provider")  # (GoModel's routing hint: the line's model is the one at that provider)
    if hint is not None and not isinstance(hint, str):
        return LineError("invalid_type", "'provider' must be a string: a configured provider's name or type.",
                         "body.provider", number)
    if hint is not None and hint.strip():
        model = hinted(model, hint.strip())
    if body.get("stream") not in (None, False):
        return LineError("streaming_unsupported", "Batch requests cannot stream: remove 'stream'.",
                         "body.stream", number)
    if endpoint == "/v1/embeddings" and body.get("encoding_format") in _BINARY:  # (raw float32 vectors: no JSON)
        return LineError("invalid_value", f"A batch's embeddings cannot be vLLM's binary '{body['encoding_format']}': "
                         "use 'float' or 'base64'.", "body.encoding_format", number)
    if endpoint == "/v1/responses" and body.get("store") not in (None, True, False):  # (vLLM reads "no" as false)
        return LineError("invalid_type", "'store' must be a boolean (true or false).", "body.store", number)
    if endpoint == "/v1/responses" and body.get("background") not in (None, False):  # (its answer: a stub, queued)
        return LineError("background_unsupported", "Batch requests cannot run in the background: remove "
                         "'background'.", "body.background", number)
    return Request(custom_id, model, jsonutil.dumps(body))


def completion_window(value) -> float:
    """Seconds for C{"24h"} (OpenAI's only value) or, as our extension, any duration such as C{"1h"}."""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-z.]+", value):  # (ASCII: the window is echoed)
        raise ValueError("must be a duration string such as '24h'")
    seconds = positive_duration(value)
    if seconds < 1 or seconds > MAX_WINDOW:
        raise ValueError("must be between 1s and 30 days")
    return seconds


def check_metadata(value):
    """OpenAI's metadata: up to 16 string pairs (keys up to 64 characters, values up to 512)."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in value.items()):
        raise ValueError("must be an object of at most 16 string pairs (keys up to 64 characters, values up to 512)")
    return value


def checked_metadata(metadata):
    """A Responses create's C{metadata} (None: none; online, or a batch's line), kept and echoed whichever upstream
    makes it: checked against OpenAI's limits (L{check_metadata}) before any upstream.

    @raise InvalidRequest: past them (C{invalid_value} on C{metadata}).
    """
    try:
        return check_metadata(metadata)
    except ValueError as e:
        raise InvalidRequest(f"'metadata' {e}.", param="metadata", code="invalid_value") from None
