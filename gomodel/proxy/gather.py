"""A whole answer made of an event stream nobody asked for.

A client that did not ask to stream gets one JSON object, even when the
upstream streams anyway (an OpenAI-compatible server that ignores
C{"stream": false}, a proxy in front of it that forces streaming): the
stream is read whole and its events are folded into the object a whole
answer would have been. The exchange does this only for an answer whose
C{Content-Type} is C{text/event-stream} to a call without an observer (see
L{gomodel.proxy.exchange.Exchange}): a JSON answer never comes here.

Each function takes the stream's whole body and returns the JSON bytes.

@raise StreamIncomplete: the stream did not end properly, or one of its
    events is no JSON object.
@raise InBandError: the stream carried an error event.
"""

from gomodel import jsonutil
from gomodel.proxy.sse import RESPONSE_END_TYPES, SSEFramer, StreamIncomplete, data_object, event_data, require_end


class InBandError(Exception):
    """A stream's error event; C{body}: an error envelope (OpenAI's or Anthropic's) for the client."""

    def __init__(self, body: bytes, status: int):
        super().__init__(body)
        self.body = body
        self.status = status


def _payloads(body: bytes):
    """The C{data:} payloads of a whole event stream (comments and empty events left out), and its framer."""
    framer = SSEFramer()
    return [data for data in (event_data(event) for event in framer.feed(body)) if data.strip()], framer


def _status(code) -> int:
    """The HTTP status of an in-band error's C{code} (vLLM's is one), else 502."""
    return code if code.__class__ is int and 400 <= code < 600 else 502


def whole_completion(body: bytes) -> bytes:
    """A chat or text completion stream as one C{chat.completion} or C{text_completion}: each choice's text,
    reasoning, refusal and tool calls joined, its logprobs and token ids together, its last finish reason;
    the stream's last usage."""
    payloads, framer = _payloads(body)
    done, whole, usage, choices = False, None, None, {}
    for data in payloads:
        if data == b"[DONE]":
            done = True
            continue
        chunk = data_object(data)
        error = chunk.get("error")
        if isinstance(error, (dict, str)):
            raise InBandError(jsonutil.dumps({"error": error}),
                              _status(error.get("code") if isinstance(error, dict) else None))
        if whole is None:
            whole = {key: value for key, value in chunk.items() if key not in ("choices", "usage")}
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        for part in chunk.get("choices") or ():
            if isinstance(part, dict):
                _add_choice(choices, part)
    require_end(framer, done, "without [DONE]")
    if whole is None:
        raise StreamIncomplete("the upstream stream held no completion")
    if whole.get("object") == "chat.completion.chunk":
        whole["object"] = "chat.completion"
    whole["choices"] = [_finished(choices[index]) for index in sorted(choices)]
    if usage is not None:
        whole["usage"] = usage
    return jsonutil.dumps(whole)


def _add_choice(choices: dict, part: dict):
    index = part.get("index", 0)
    choice = choices.get(index)
    delta = part.get("delta")
    if choice is None:
        choice = choices[index] = {"index": index}
        if isinstance(delta, dict):
            choice["message"] = {"role": "assistant", "content": None}
        choice["logprobs"] = None
        choice["finish_reason"] = None
    if isinstance(delta, dict):
        _add_delta(choice.setdefault("message", {"role": "assistant", "content": None}), delta)
    for key, value in part.items():
        if key in ("index", "delta") or value is None:
            continue
        if key == "text" and isinstance(value, str):
            choice["text"] = choice.get("text", "") + value
        elif key == "logprobs" and isinstance(value, dict):
            choice["logprobs"] = _joined(choice["logprobs"], value)
        elif isinstance(value, list) and isinstance(choice.get(key), list):
            choice[key] = choice[key] + value  # (vLLM's token_ids)
        else:
            choice[key] = value  # (finish_reason, stop_reason: the last one said)


def _joined(have, more: dict) -> dict:
    """Logprobs C{have} (or None) and C{more}: each list (chat's C{content} and C{refusal}; a text
    completion's C{tokens}, C{token_logprobs}, C{top_logprobs}, C{text_offset}) extended."""
    if not isinstance(have, dict):
        return dict(more)
    joined = dict(have)
    for key, value in more.items():
        joined[key] = joined[key] + value if isinstance(value, list) and isinstance(joined.get(key), list) else value
    return joined


def _add_delta(message: dict, delta: dict):
    for key, value in delta.items():
        if value is None:
            continue
        if key == "tool_calls" and isinstance(value, list):
            calls = message.setdefault("tool_calls", {})
            for fragment in value:
                if isinstance(fragment, dict):
                    _add_call(calls, fragment)
        elif isinstance(value, str) and key != "role":
            have = message.get(key)
            message[key] = have + value if isinstance(have, str) else value
        else:
            message[key] = value


def _add_call(calls: dict, fragment: dict):
    """Add a tool-call C{fragment} to C{calls} (index -> the calls begun at that index, in order): a fragment
    that names a function with an id other than that of the last call at its index begins another one there
    (Ollama and Grok stream every call of a turn at index 0); the others go on with the last."""
    begun = calls.setdefault(fragment.get("index", len(calls)), [])
    known, call_id = begun[-1].get("id") if begun else None, fragment.get("id")
    function = fragment.get("function")
    named = isinstance(function, dict) and _an_id(function.get("name"))
    if not begun or named and _an_id(known) and _an_id(call_id) and call_id != known:
        begun.append({})
    call = begun[-1]
    for key, value in fragment.items():
        if key == "index" or value is None:
            continue
        if key == "function" and isinstance(value, dict):
            function = call.setdefault("function", {})
            for name, part in value.items():
                if name == "arguments" and isinstance(part, str):
                    function["arguments"] = function.get("arguments", "") + part
                elif part is not None:
                    function[name] = part
        elif key != "id" or not _an_id(call.get("id")):  # (the id its call began with stays)
            call[key] = value


def _an_id(value) -> bool:
    """Whether C{value} is a non-empty string (an id, a name)."""
    return isinstance(value, str) and value != ""


def _finished(choice: dict) -> dict:
    message = choice.get("message")
    if message is not None and isinstance(message.get("tool_calls"), dict):
        calls = message["tool_calls"]
        message["tool_calls"] = [call for index in sorted(calls) for call in calls[index]]
    return choice


def whole_message(body: bytes) -> bytes:
    """An Anthropic Messages stream as one C{message}: its blocks' text, thinking, signatures and tool
    inputs joined, the stop reason and usage of its C{message_delta}."""
    payloads, framer = _payloads(body)
    done, whole, blocks, inputs = False, None, {}, {}
    for data in payloads:
        event = data_object(data)
        kind = event.get("type")
        if kind == "error":
            error = event.get("error")
            raise InBandError(jsonutil.dumps(event), 529 if isinstance(error, dict)
                              and error.get("type") == "overloaded_error" else 502)
        if kind == "message_start" and isinstance(event.get("message"), dict):
            whole = dict(event["message"])
        elif kind == "content_block_start" and isinstance(event.get("content_block"), dict):
            blocks[event.get("index", len(blocks))] = dict(event["content_block"])
        elif kind == "content_block_delta" and isinstance(event.get("delta"), dict):
            index = event.get("index")
            block = blocks.get(index)
            if block is None:
                raise StreamIncomplete("the upstream stream added to a block it never started")
            delta = event["delta"]
            if delta.get("type") == "input_json_delta":
                inputs[index] = inputs.get(index, "") + (delta.get("partial_json") or "")
            elif delta.get("type") == "citations_delta":
                block.setdefault("citations", []).append(delta.get("citation"))
            else:
                for key in ("text", "thinking", "signature"):
                    if isinstance(delta.get(key), str):
                        block[key] = block.get(key, "") + delta[key]
        elif kind == "message_delta" and whole is not None:
            if isinstance(event.get("delta"), dict):
                whole.update(event["delta"])
            if isinstance(event.get("usage"), dict):
                whole["usage"] = dict(whole.get("usage") or {}, **event["usage"])
        elif kind == "message_stop":
            done = True
    require_end(framer, done and whole is not None, "before message_stop")
    for index, text in inputs.items():
        try:
            blocks[index]["input"] = jsonutil.loads(text) if text else {}
        except jsonutil.JSONError:
            raise StreamIncomplete("the upstream stream's tool input is no JSON") from None
    whole["content"] = [blocks[index] for index in sorted(blocks)]
    return jsonutil.dumps(whole)


def whole_response(body: bytes) -> bytes:
    """A Responses API stream as its final response object (its last C{response.completed},
    C{.incomplete} or C{.failed} event's)."""
    payloads, framer = _payloads(body)
    final = None
    for data in payloads:
        event = data_object(data)
        kind = event.get("type")
        if kind == "error":
            error = {key: event.get(key) for key in ("message", "code", "param")}
            error["type"] = "provider_error"
            raise InBandError(jsonutil.dumps({"error": error}), 502)
        if kind in RESPONSE_END_TYPES and isinstance(event.get("response"), dict):
            final = event["response"]
    require_end(framer, final is not None, "before response.completed")
    return jsonutil.dumps(final)


# The answers a whole one is made of, by the path of the call (a provider's OpenAI or Anthropic path).
BY_PATH = {"/chat/completions": whole_completion, "/completions": whole_completion, "/messages": whole_message,
           "/responses": whole_response}
