"""JSON in and out: orjson on the hot path, the standard library where orjson would change a value."""

import json
import re

import orjson

# orjson reads integers outside -2**63 .. 2**64-1 as floats; such bodies go
# through the standard library so that every value reaches the upstream
# untouched. Outside that range means 20 digits or more, or a minus sign and
# 19 digits (-9223372036854775809 is past -2**63). The scan runs on every body
# parsed: digits are mapped to "0" and 19 of them searched for in C (a regular
# expression for a digit run costs ten times as much per byte: it has no
# literal to look for); only the rare runs it finds are looked at in Python (each one's end found by a
# search for the next byte that is not a digit, in C).
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_RUN = 19
_LONG_RUN = b"0" * _RUN
_NOT_DIGIT = re.compile(b"[^0]")
_BEFORE_NUMBER = frozenset(b":[,")
_SPACE = frozenset(b" \t\r\n")


def _has_huge_integer(data: bytes) -> bool:
    """Whether a number token orjson would read as a float, though integral, is in C{data}.

    That is a run of 20 digits or more, or of 19 after a minus sign. Only
    number tokens count (at the start, or after ':' '[' ','): a run of digits
    inside a string, such as an id, or after a decimal point does not. A
    19-digit negative at or above -2**63 counts too: the standard library
    reads it as well, just more slowly.
    """
    if len(data) < _RUN + 1:  # 20 digits, or a minus sign and 19
        return False
    zeroed = data.translate(_DIGITS_AS_ZERO)
    start = zeroed.find(_LONG_RUN)
    while start != -1:
        past = _NOT_DIGIT.search(zeroed, start + _RUN)  # the end of this run
        end = len(zeroed) if past is None else past.start()
        i = start - 1
        negative = i >= 0 and data[i] == 0x2D  # a minus sign
        if negative or end - start > _RUN:
            if negative:
                i -= 1
            while i >= 0 and data[i] in _SPACE:
                i -= 1
            if i < 0 or data[i] in _BEFORE_NUMBER:
                return True
        start = zeroed.find(_LONG_RUN, end)
    return False


class JSONError(ValueError):
    """The bytes are not one valid JSON document."""


def loads(data: bytes):
    """Parse one JSON document; raise L{JSONError} on anything else."""
    try:
        # (_has_huge_integer's first look, inline: nearly every body has no run of 19 digits at all)
        if len(data) <= _RUN or data.translate(_DIGITS_AS_ZERO).find(_LONG_RUN) < 0 or not _has_huge_integer(data):
            return orjson.loads(data)
        value = json.loads(data, parse_constant=_not_json)  # NaN, Infinity: orjson refuses them too
        # orjson refuses a lone surrogate (an escape such as \ud800 with no pair); the standard library
        # reads it into a str that cannot be written as UTF-8 again (to an upstream, to a store): refused
        # the same here.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return value
    except UnicodeEncodeError:
        raise JSONError("a string holds a lone surrogate (a \\uD800-\\uDFFF escape without its pair)") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise JSONError(str(e)) from None


def _not_json(name):
    raise ValueError(f"{name} is not a JSON value")


def dumps(value) -> bytes:
    """Serialise compactly to UTF-8 bytes, keeping key order."""
    try:
        return orjson.dumps(value)
    except TypeError:
        # Integers past 64 bits, which orjson refuses to write.
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
