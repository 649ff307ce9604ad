"""JSON in and out: integers past 64 bits survive, wherever they are."""

import pytest

from gomodel import jsonutil


@pytest.mark.parametrize("text, value", [
    (b"123456789012345678901234", 123456789012345678901234),
    (b'{"a": -123456789012345678901}', {"a": -123456789012345678901}),
    (b"[1,\n 98765432109876543210]", [1, 98765432109876543210]),
    (b'{"id":"chatcmpl-00000000000000000000000000","n":1}', {"id": "chatcmpl-00000000000000000000000000", "n": 1}),
    (b'{"id":"12345678901234567890123"}', {"id": "12345678901234567890123"}),
])
def test_values_come_back_exactly(text, value):
    assert jsonutil.loads(text) == value
    assert jsonutil.loads(jsonutil.dumps(value)) == value


def test_invalid_documents_raise_json_error():
    for text in (b"", b"{", b'{"a": 1} 2', b"\xff"):
        with pytest.raises(jsonutil.JSONError):
            jsonutil.loads(text)


def test_only_number_tokens_count_as_huge_integers():
    huge = jsonutil._has_huge_integer
    assert huge(b"12345678901234567890") and huge(b'{"a": [1, -00000000000000000000009]}')
    assert huge(b'{"a":"x1234567890123456789012345", "b": 12345678901234567890}')
    assert not huge(b'{"id": "chatcmpl-00000000000000000000000000", "n": 1234567890123456789}')
    assert not huge(b'{"x": 1.23456789012345678901234}')
