"""A disaggregated vLLM's transfer fields (C{kv_transfer_params}, C{ec_transfer_params}: a prefill or encoder
engine's id, host and port, the cache blocks it holds) kept from the answers of a request that went without them
(a managed key's: L{gomodel.auth.tenancy.CacheSalts.apply})."""

import re

from gomodel import jsonutil
from gomodel.auth.tenancy import TRANSFER_FIELDS

# What an answer naming one of them holds (a member's name: in the model's words its quote is escaped); one that
# says null (vLLM writes C{"kv_transfer_params":null} in every chat completion) names nothing, and is left as it is
_MARK = b'_transfer_params"'
_VALUED = re.compile(rb'_transfer_params"\s*:\s*+(?!null\b)')


def without_transfers(data: bytes) -> bytes:
    """C{data}, a JSON answer or whole events (their C{data:} lines JSON), without any object's transfer fields
    that say something (not null); C{data} itself, unparsed, where it holds none (a byte search, then a look at
    what follows where it found one), or where what holds one is no JSON."""
    found = data.find(_MARK)
    if found < 0 or _VALUED.search(data, found) is None:
        return data
    if data.lstrip()[:1] == b"{":
        return _written(data)
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b"data:") and _VALUED.search(line) is not None:
            payload = line[5:]
            written = _written(payload)
            if written is not payload:
                lines[i] = b"data: " + written
    return b"\n".join(lines)


def may_name_transfers(data) -> bool:
    """Whether C{data}, JSON bytes (None: none at hand), may name a transfer field, null too (what it parses into may
    have one for L{dropped} to take out): it holds a member's name ending as theirs does, or a C{\\u} escape (a
    name written with them); False where it surely names none (one search in C: L{dropped} walks every object)."""
    return data is None or data.find(_MARK) >= 0 or data.find(b"\\u") >= 0


def dropped(value) -> bool:
    """Take the transfer fields out of C{value} (parsed JSON: each object's, at any depth); whether it had any."""
    if value.__class__ is dict:
        found = False
        for name in TRANSFER_FIELDS:
            if name in value:
                del value[name]
                found = True
        for member in value.values():
            if member.__class__ is dict or member.__class__ is list:
                found = dropped(member) or found
        return found
    if value.__class__ is list:
        found = False
        for item in value:
            found = dropped(item) or found
        return found
    return False


def _written(data: bytes) -> bytes:
    """C{data}, one JSON document, without its transfer fields (L{dropped}): written again where it had any."""
    try:
        value = jsonutil.loads(data)
    except jsonutil.JSONError:
        return data
    return jsonutil.dumps(value) if dropped(value) else data
