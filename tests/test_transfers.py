"""gomodel.proxy.transfers: what a managed key's answers keep of a disaggregated vLLM's transfer fields."""

import json

import pytest

from gomodel.proxy.transfers import without_transfers

CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
KV = {"do_remote_prefill": True, "remote_engine_id": "e0", "remote_host": "10.9.8.7", "remote_port": 5600}


@pytest.mark.parametrize("data", [
    json.dumps(dict(CHAT, kv_transfer_params=None), separators=(",", ":")).encode(),  # vLLM's own, last member
    json.dumps(dict(CHAT, kv_transfer_params=None, ec_transfer_params=None), separators=(",", ":")).encode(),
    json.dumps(dict(CHAT, kv_transfer_params=None)).encode(),  # spaced
    b'{"kv_transfer_params" : null\n}',
    b'{"kv_transfer_params":null,"ec_transfer_params":null}',
    b'{"x":"kv_transfer_params\\":{\\"remote_host\\":1}"}',  # in the model's words (its quote escaped)
    json.dumps(CHAT).encode(),
])
def test_an_answer_naming_nothing_is_the_same_bytes(data):
    """Where no transfer field says anything (none, or each null: vLLM writes C{"kv_transfer_params":null} in every
    chat completion), the answer is handed back itself, unparsed."""
    assert without_transfers(data) is data


@pytest.mark.parametrize("fields", [
    {"kv_transfer_params": KV},
    {"kv_transfer_params": None, "ec_transfer_params": KV},  # a null one before one that says something
    {"ec_transfer_params": KV, "kv_transfer_params": None},
    {"kv_transfer_params": "nullish"},
])
@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")])
def test_an_answer_naming_one_goes_without_both(fields, separators):
    data = json.dumps(dict(CHAT, **fields), separators=separators).encode()
    assert json.loads(without_transfers(data)) == CHAT


def test_events_naming_one_go_without_it_and_the_others_stay():
    """In whole events (their C{data:} lines JSON), each event naming one goes without it; the others, a null one's
    too, are the same bytes."""
    plain = b'data: {"id":"1","choices":[],"kv_transfer_params":null}'
    named = b'data: {"id":"2","choices":[],"kv_transfer_params":%s}' % json.dumps(KV).encode()
    out = without_transfers(b"\n\n".join((plain, named, b"data: [DONE]")) + b"\n\n")
    assert out == b"\n\n".join((plain, b'data: {"id":"2","choices":[]}', b"data: [DONE]")) + b"\n\n"
