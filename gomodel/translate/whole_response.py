"""A Responses API stream made of a whole response: for an upstream's own C{/responses} that answered a
C{"stream": true} request whole (it ignores C{stream}), so that the client gets the events it asked for."""

from gomodel import jsonutil

# An output item's fields that its events fill in: empty in its C{response.output_item.added}.
_FILLED = {"message": ("content", []), "function_call": ("arguments", ""), "reasoning": ("content", [])}
# A response not finished yet (a background one's first answer) -> the event that says so after response.created.
_UNFINISHED = {"queued": "response.queued", "in_progress": "response.in_progress"}
# A content part's text field, and the delta and done events that carry it, by part type.
_PARTS = {"output_text": ("text", "response.output_text.delta", "response.output_text.done"),
          "refusal": ("refusal", "response.refusal.delta", "response.refusal.done"),
          "reasoning_text": ("text", "response.reasoning_text.delta", "response.reasoning_text.done")}


def response_events(answer: bytes) -> bytes:
    """The SSE events of a stream that makes the whole response C{answer} (JSON): C{response.created} and
    C{.in_progress} (with no output yet), each output item added, its content parts' texts or its arguments
    in one delta each, and done, then C{response.failed} for a failed response, else C{response.completed}
    (an incomplete one too, as vLLM's stream and the gateway's translation end it: the openai SDK's stream
    helper gives its final response from that event alone). A response not finished yet (a background one,
    C{queued}) is C{response.created} and C{response.queued} (or C{.in_progress}) alone, as it is.

    @raise ValueError: C{answer} is no JSON (L{jsonutil.JSONError}), or no response object.
    """
    response = jsonutil.loads(answer)
    if response.__class__ is not dict or response.get("object") != "response" or (
            response.get("output").__class__ is not list):
        raise ValueError("the answer is no response")
    events = []
    if response.get("status") in _UNFINISHED:  # (a background response, queued: what there is of it so far)
        _add(events, "response.created", response=response)
        _add(events, _UNFINISHED[response["status"]], response=response)
        return _joined(events)
    started = dict(response, status="in_progress", output=[], usage=None)
    started.pop("incomplete_details", None)
    _add(events, "response.created", response=started)
    _add(events, "response.in_progress", response=started)
    for index, item in enumerate(response["output"]):
        if item.__class__ is not dict:
            raise ValueError("an output item is no object")
        _item(events, index, item)
    _add(events, "response.failed" if response.get("status") == "failed" else "response.completed", response=response)
    return _joined(events)


def _joined(events: list) -> bytes:
    """The C{events} as SSE, each named by its type (as OpenAI's and vLLM's are)."""
    return b"".join(b"event: " + event["type"].encode() + b"\ndata: " + jsonutil.dumps(event) + b"\n\n"
                    for event in events)


def _add(events: list, kind: str, **fields):
    events.append({"type": kind, "sequence_number": len(events), **fields})


def _item(events: list, index: int, item: dict):
    """The events of output item C{item}, at C{index}, added and done."""
    kind = item.get("type")
    filled = _FILLED.get(kind)
    added = dict(item, status="in_progress")
    if filled is not None and filled[0] in item:
        added[filled[0]] = filled[1]
    _add(events, "response.output_item.added", output_index=index, item=added)
    item_id = item.get("id")
    if kind == "message" and item.get("content").__class__ is list:
        for at, part in enumerate(item["content"]):
            named = _PARTS.get(part.get("type")) if part.__class__ is dict else None
            if named is None:
                continue
            field, delta, done = named
            text = part.get(field) or ""
            place = {"item_id": item_id, "output_index": index, "content_index": at}
            _add(events, "response.content_part.added", **place, part=dict(part, **{field: ""}))
            _add(events, delta, **place, delta=text)
            _add(events, done, **place, **{field: text})
            _add(events, "response.content_part.done", **place, part=part)
    elif kind == "function_call" and item.get("arguments").__class__ is str:
        place = {"item_id": item_id, "output_index": index}
        _add(events, "response.function_call_arguments.delta", **place, delta=item["arguments"])
        _add(events, "response.function_call_arguments.done", **place, arguments=item["arguments"])
    _add(events, "response.output_item.done", output_index=index, item=item)
