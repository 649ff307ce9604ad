"""JSON in and out: integers past 64 bits survive, wherever they are."""

import pytest

from gomodel import jsonutil


@pytest.mark.parametrize("text, value", [
    (b"123456789012345678901234", 123456789012345678901234),
    (b'{"a": -123456789012345678901}', {"a": -123456789012345678901}),
    (b"[1,\n 98765432109876543210]", [1, 98765432109876543210]),
    (b'{"id":"chatcmpl-00000000000000000000000000","n":1}', {"id": "chatcmpl-00000000000000000000000000", "n": 1}),
    (b'{"id":"12345678901234567890123"}', {"id": "12345678901234567890123"}),
    (b"12345678901234567890", 12345678901234567890),  # 20 bytes: the shortest a huge integer takes
    (b"-9223372036854775809", -9223372036854775809),
    (b"1234567890123456789", 1234567890123456789),  # 19 bytes: none can be
])
def test_values_come_back_exactly(text, value):
    assert jsonutil.loads(text) == value
    assert jsonutil.loads(jsonutil.dumps(value)) == value


def test_invalid_documents_raise_json_error():
    for text in (b"", b"{", b'{"a": 1} 2', b"\xff", b"NaN",
                 b'{"n": 123456789012345678901234, "a": NaN}', b'[123456789012345678901234, -Infinity]'):
        with pytest.raises(jsonutil.JSONError):
            jsonutil.loads(text)


def test_a_lone_surrogate_is_invalid_with_or_without_a_huge_integer():
    # orjson refuses it; a document with a huge integer goes through the standard library, which would
    # read it into a str no UTF-8 writer takes (the upstream's body: a 500 where a 400 is due).
    for text in (b'{"a": "\\ud800"}', b'{"n": 123456789012345678901234, "a": ["x\\udc80y"]}',
                 b'{"n": 123456789012345678901234, "\\ud800": 1}'):
        with pytest.raises(jsonutil.JSONError):
            jsonutil.loads(text)
    paired = jsonutil.loads(b'{"n": 123456789012345678901234, "a": "\\ud83d\\ude00"}')
    assert paired == {"n": 123456789012345678901234, "a": "\U0001f600"}


def test_only_number_tokens_count_as_huge_integers():
    huge = jsonutil._has_huge_integer
    assert huge(b"12345678901234567890") and huge(b'{"a": [1, -00000000000000000000009]}')
    assert huge(b'{"a":"x1234567890123456789012345", "b": 12345678901234567890}')
    assert not huge(b'{"id": "chatcmpl-00000000000000000000000000", "n": 1234567890123456789}')
    assert not huge(b'{"x": 1.23456789012345678901234}')


# orjson reads integers as i64 or u64: from -2**63 to 2**64 - 1. Every value on
# either side of both ends, and the 19- and 20-digit edges, keeps its exact text.
BOUNDARIES = [
    "9223372036854775807",  # 2**63 - 1
    "9223372036854775808",  # 2**63 (u64 in orjson)
    "1000000000000000000",  # the smallest 19-digit value
    "9999999999999999999",  # the largest 19-digit value, below 2**64
    "10000000000000000000",  # the smallest 20-digit value
    "18446744073709551615",  # 2**64 - 1
    "18446744073709551616",  # 2**64: a float in orjson
    "99999999999999999999",
    "-1000000000000000000",  # 19 digits, above -2**63
    "-9223372036854775807",
    "-9223372036854775808",  # -2**63
    "-9223372036854775809",  # below -2**63: a float in orjson, with 19 digits (D6)
    "-9999999999999999999",
    "-10000000000000000000",
    "-18446744073709551616",
]


@pytest.mark.parametrize("text", BOUNDARIES)
@pytest.mark.parametrize("document, path", [("{text}", []), ('{{"n": {text}}}', ["n"]), ("[1, {text}]", [1]),
                                            ('{{"a":[ -1,{text} ]}}', ["a", 1])])
def test_integers_at_the_64_bit_edges_round_trip_exactly(document, path, text):
    value = jsonutil.loads(document.format(text=text).encode())
    found = value
    for step in path:
        found = found[step]
    assert type(found) is int and found == int(text)
    assert text.encode() in jsonutil.dumps(value)  # the exact integer text goes upstream


def test_a_19_digit_negative_is_huge_only_as_a_number_token():
    huge = jsonutil._has_huge_integer
    assert huge(b"-9223372036854775809") and huge(b'{"n":\n -9223372036854775809}')
    assert not huge(b'{"n": 9223372036854775809}')  # a 19-digit positive fits orjson's u64
    assert not huge(b'{"id": "x-9223372036854775809"}')  # inside a string
    assert not huge(b'{"x": -0.9223372036854775809}')  # a fraction's digits
