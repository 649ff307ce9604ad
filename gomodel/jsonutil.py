"""JSON in and out: orjson on the hot path, the standard library where orjson would change a value."""

import json
import re

import orjson

# orjson reads integers past 64 bits as floats; such bodies go through the
# standard library so that every value reaches the upstream untouched.
_HUGE_INTEGER = re.compile(rb"\d{20,}")


class JSONError(ValueError):
    """The bytes are not one valid JSON document."""


def loads(data: bytes):
    """Parse one JSON document; raise L{JSONError} on anything else."""
    try:
        if _HUGE_INTEGER.search(data) is None:
            return orjson.loads(data)
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise JSONError(str(e)) from None


def dumps(value) -> bytes:
    """Serialise compactly to UTF-8 bytes, keeping key order."""
    try:
        return orjson.dumps(value)
    except TypeError:
        # Integers past 64 bits, which orjson refuses to write.
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
