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


# A JSON answer relayed as it comes (L{NulledTransfers}): where its value starts after a key; JSON's whitespace
_VALUE_START = re.compile(rb'[^ \t\n\r:]')
_STARTED = re.compile(rb'[^ \t\n\r]')
_FIELD_NAMES = frozenset(name.encode() for name in TRANSFER_FIELDS)
# The longest a key's JSON can be and still name one of them (each character escaped, \u005f): a longer one is not
# kept to be read
_LONGEST_KEY = 6 * max(map(len, TRANSFER_FIELDS))


class NulledTransfers:
    """Writes a JSON answer that comes in pieces (each a call: a L{gomodel.proxy.relay.StreamRelay}'s C{rewrite})
    with the values of its object's transfer fields as null (vLLM's own for none), where vLLM 0.32 answers them: at
    the top of a chat completion, a completion, a message, a generate answer. For one too large to hold whole
    (L{without_transfers}' way), or of unknown length: nothing is held back but the copy of a key being read (at
    most L{_LONGEST_KEY} bytes), so the memory is bounded whatever its size; the key is written as it comes, and its
    value dropped once the key is known to be a transfer field's. An answer that is no JSON object goes as it comes
    (from where that shows), as do the fields of an object nested in it (vLLM answers none there)."""

    _depth = 0  # the containers open (1: at the top of the answer's object)
    _string = False  # in a string
    _escape = False  # a string's backslash ended the last piece: its next byte is escaped
    _key = None  # a top-level key being read: a copy of its JSON so far
    _expect_key = False  # at the top of the object, after its brace or a comma: the next string is a key
    _nulling = 0  # 1: a transfer field's key was read, its value to come; 2: its value being dropped
    _done = False  # the object ended, or the answer is none: the rest as it comes

    def __call__(self, data: bytes) -> bytes:
        if self._done:
            return data
        out = []
        emit = None if self._nulling == 2 else 0  # (where the bytes going out start; None: dropped)
        i, n = 0, len(data)
        find = _Finder(data)
        if self._escape and n:
            self._escape = False
            self._kept(data, 0, 1)
            i = 1
        while i < n:
            if self._string:
                j = min(find(b'"', i), find(b"\\", i))
                self._kept(data, i, j + 1)
                if j == n:
                    break
                if data[j] == 0x5C:  # (a backslash: the byte after it is no quote)
                    if j + 1 < n:
                        self._kept(data, j + 1, j + 2)
                        i = j + 2
                    else:
                        self._escape = True
                        i = n
                    continue
                self._string = False
                i = j + 1
                if self._key is not None:
                    self._read_key()
                elif self._nulling == 2 and self._depth == 1:  # (a string value dropped)
                    self._nulling, emit = 0, i
                continue
            if self._nulling == 1:  # (past the key, its colon: the value's first byte starts what is dropped)
                found = _VALUE_START.search(data, i)
                if found is None:
                    break
                j = found.start()
                out.append(data[emit:j])
                out.append(b"null")
                self._nulling, emit, i = 2, None, j + 1
                first = data[j]
                if first == 0x22:  # "
                    self._string = True
                elif first == 0x7B or first == 0x5B:  # { [
                    self._depth += 1
                continue  # (else a number, true, false or null: dropped up to the comma or brace after it)
            if not self._depth:
                found = _STARTED.search(data, i)
                if found is None:
                    break
                if data[found.start()] != 0x7B:  # (no object: nothing of it is a field)
                    self._done = True
                    break
                self._depth, self._expect_key, i = 1, True, found.end()
                continue
            j = min(find(b'"', i), find(b"{", i), find(b"}", i), find(b"[", i), find(b"]", i))
            if self._depth == 1:  # (at the top a comma matters: a key follows)
                j = min(j, find(b",", i))
            if j == n:
                break
            i = j + 1
            byte = data[j]
            if byte == 0x22:  # "
                self._string = True
                if self._expect_key and self._depth == 1:
                    self._key, self._expect_key = bytearray(), False
            elif byte == 0x7B or byte == 0x5B:  # { [
                self._depth += 1
            elif byte == 0x2C:  # ,
                self._expect_key = True
                if self._nulling == 2:  # (a scalar value dropped)
                    self._nulling, emit = 0, j
            else:  # } ]
                if self._nulling == 2 and self._depth == 1:  # (a scalar value dropped)
                    self._nulling, emit = 0, j
                self._depth -= 1
                if self._nulling == 2 and self._depth == 1:  # (an object or array value dropped)
                    self._nulling, emit = 0, i
                elif not self._depth:  # (the answer's object is over)
                    self._done = True
                    break
        if emit is None:
            return b"".join(out)
        if not emit and not out:
            return data
        out.append(data[emit:])
        return b"".join(out)

    def _kept(self, data, start, end):
        """Copy C{data[start:end]}, a key's bytes, where one is read: up to one byte past the longest that can name
        a field (with its closing quote), which says it is longer."""
        key = self._key
        if key is not None and len(key) <= _LONGEST_KEY + 1:
            key += data[start:min(end, start + _LONGEST_KEY + 2 - len(key))]

    def _read_key(self):
        """The top-level key read (its JSON, its closing quote last): whether it names a transfer field."""
        raw = bytes(self._key[:-1])
        self._key = None
        if len(raw) > _LONGEST_KEY:
            return
        if b"\\" in raw:  # (escaped: as a JSON parser reads it)
            try:
                raw = jsonutil.loads(b'"' + raw + b'"').encode()
            except (jsonutil.JSONError, UnicodeEncodeError):
                return
        if raw in _FIELD_NAMES:
            self._nulling = 1


class _Finder:
    """The next position of a byte in C{data} at or after one (its length where there is none), each byte's found
    once and kept until it is passed: a piece's bytes are searched (in C) once for each, however many tokens."""

    def __init__(self, data):
        self._data = data
        self._at = {}

    def __call__(self, byte, start) -> int:
        at = self._at.get(byte, -1)
        if at < start:
            at = self._data.find(byte, start)
            if at < 0:
                at = len(self._data)
            self._at[byte] = at
        return at
