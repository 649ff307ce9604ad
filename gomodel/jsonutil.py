"""JSON in and out: orjson on the hot path, the standard library where orjson would change a value."""

import json

import orjson

# orjson reads integers past 64 bits as floats; such bodies go through the
# standard library so that every value reaches the upstream untouched. The
# scan runs on every body parsed: digits are mapped to "0" and 20 of them
# searched for in C (a regular expression for a digit run costs ten times as
# much per byte: it has no literal to look for).
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 20
_BEFORE_NUMBER = frozenset(b":[,")
_SPACE = frozenset(b" \t\r\n")


def _has_huge_integer(data: bytes) -> bool:
    """Whether a number token of 20 digits or more is in C{data}.

    Only number tokens count (at the start, or after ':' '[' ','): a run of
    digits inside a string, such as an id, does not.
    """
    if len(data) < 20:
        return False
    zeroed = data.translate(_DIGITS_AS_ZERO)
    start = zeroed.find(_LONG_RUN)
    while start != -1:
        i = start - 1
        if i >= 0 and data[i] == 0x2D:  # a minus sign
            i -= 1
        while i >= 0 and data[i] in _SPACE:
            i -= 1
        if i < 0 or data[i] in _BEFORE_NUMBER:
            return True
        end = start + 20
        while end < len(zeroed) and zeroed[end] == 0x30:  # to the end of this run
            end += 1
        start = zeroed.find(_LONG_RUN, end)
    return False


class JSONError(ValueError):
    """The bytes are not one valid JSON document."""


def loads(data: bytes):
    """Parse one JSON document; raise L{JSONError} on anything else."""
    try:
        if not _has_huge_integer(data):
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
