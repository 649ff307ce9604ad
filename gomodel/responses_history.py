"""Stored Responses conversations: input items as OpenAI lists them, and a chain replayed as explicit input.

A response is stored with the input items of its own turn (normalised as
OpenAI's C{input_items} endpoint shows them) and its output; following
C{previous_response_id} links back to the first turn, so the whole
conversation can be sent again as explicit input when the instance that
made it no longer knows it (vLLM restarted, or its store is off).
"""

import re

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gomodel import jsonutil
from gomodel.auth.tenancy import visible
from gomodel.errors import InvalidRequest, NotFound, shown
from gomodel.ids import held_nowhere, new_id
from gomodel.logs import log_failure
from gomodel.periodic import Repeating
from gomodel.proxy.sse import SSEFramer, event_kind, event_object
from gomodel.store.codec import MAX_CHAIN
from gomodel.store.sweeps import claimed
from gomodel.upstream.errors import error_shown


def normalise_input(value) -> list:
    """The input items of a create request, each with a C{type} and an C{id} of its own (a client's id
    that is no string, empty, or an earlier item's too is replaced: the items are listed, and paged, by id)."""
    if value is None:
        return []
    if value.__class__ is str:  # (most requests: what the loop makes of it, at a tenth of the cost)
        return [{"role": "user", "content": [{"type": "input_text", "text": value}], "type": "message",
                 "id": new_id("msg")}]
    items = []
    ids = set()
    for item in value if isinstance(value, list) else []:
        if not isinstance(item, dict):
            continue
        item = dict(item)
        item.setdefault("type", "message")
        if item["type"] == "message":
            item.setdefault("role", "user")
            content = item.get("content")
            if isinstance(content, str):
                kind = "output_text" if item["role"] == "assistant" else "input_text"
                item["content"] = [{"type": kind, "text": content}]
        given = item.get("id")
        if not isinstance(given, str) or not given or given in ids:
            kind = item["type"]  # (a type that is no string, which the upstream took, is an item's too)
            item["id"] = new_id(_PREFIX.get(kind, "item") if isinstance(kind, str) else "item")
        ids.add(item["id"])
        items.append(item)
    return items


_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


# What an input items' list shows only where its C{include} names it (OpenAI's): (that value, the item's type, the
# item's field holding it, or None: the item itself; the type of the content parts of that field holding it, or
# None: the field's object itself; the field dropped otherwise, where it holds something). An image's data URL is
# not sent with every page.
_INCLUDED = (
    ("message.input_image.image_url", "message", "content", "input_image", "image_url"),
    ("message.output_text.logprobs", "message", "content", "output_text", "logprobs"),
    ("computer_call_output.output.image_url", "computer_call_output", "output", None, "image_url"),
    ("web_search_call.action.sources", "web_search_call", "action", None, "sources"),
    ("reasoning.encrypted_content", "reasoning", None, None, "encrypted_content"),
    ("file_search_call.results", "file_search_call", None, None, "results"),
    ("code_interpreter_call.outputs", "code_interpreter_call", None, None, "outputs"),
)


def as_listed(items: list, include) -> list:
    """Stored input C{items} as an input items' list shows them: without the fields C{include} (checked values)
    does not name (L{_INCLUDED}); the stored items are not changed."""
    hidden = [each for each in _INCLUDED if each[0] not in include]
    return [_without(item, hidden) for item in items] if hidden else items


def as_retrieved(response: dict, include) -> dict:
    """A stored C{response} as a retrieve shows it: its output items L{as_listed} (C{include}, checked values, names
    what they carry: a reasoning item's encrypted content, an output text's logprobs...); C{response} is not changed."""
    output = response.get("output")
    return dict(response, output=as_listed(output, include)) if output.__class__ is list else response


# The events of a Responses stream whose C{logprobs} are an output text's, and the C{include} value that names them.
_TEXT_EVENTS = ("response.output_text.delta", "response.output_text.done")
_LOGPROBS = "message.output_text.logprobs"


def events_as_retrieved(events: bytes, include) -> bytes:
    """Whole SSE C{events} of a Responses stream as a retrieve shows its response (OpenAI's C{include} on a replay,
    C{retrieve(stream=True)}): each event's response object L{as_retrieved}, its output item L{as_listed}, its
    content part without the fields C{include} (checked values) does not name, an output text's delta or done
    event's C{logprobs} empty where it does not name them (their shape kept). An event holding none of those fields
    by name (most: a delta without logprobs) goes as it came, unparsed; C{events} as they are where it names all."""
    hidden = [each for each in _INCLUDED if each[0] not in include]
    names = [f'"{field}"'.encode() for _, _, _, _, field in hidden]
    if not names or all(events.find(name) < 0 for name in names):
        return events
    out = []
    for event in SSEFramer().feed(events):
        payload = event_object(event) if any(event.find(name) >= 0 for name in names) else None
        if payload is not None:
            event = b"event: " + event_kind(event) + b"\ndata: " + jsonutil.dumps(_shown(payload, hidden, include)) \
                + b"\n\n"
        out.append(event)
    return b"".join(out)


def _shown(payload: dict, hidden, include) -> dict:
    """A Responses stream event's C{payload} without the fields C{hidden} (of C{include}) names
    (L{events_as_retrieved})."""
    shown = dict(payload)
    if payload.get("response").__class__ is dict:
        shown["response"] = as_retrieved(payload["response"], include)
    if payload.get("item").__class__ is dict:
        shown["item"] = _without(payload["item"], hidden)
    part = payload.get("part")
    if part.__class__ is dict:
        for _, kind, holder, part_type, field in hidden:
            if kind == "message" and holder == "content" and part.get("type") == part_type:
                part = _dropped(part, field)
        shown["part"] = part
    if payload.get("type") in _TEXT_EVENTS and payload.get("logprobs") and _LOGPROBS not in include:
        shown["logprobs"] = []
    return shown


def _without(item: dict, hidden) -> dict:
    """C{item} without the fields C{hidden} names (a copy where it has any)."""
    for _, kind, holder, part_type, field in hidden:
        if item.get("type") != kind:
            continue
        if holder is None:
            item = _dropped(item, field)
            continue
        held = item.get(holder)
        if part_type is None:
            if held.__class__ is dict and field in held:
                item = dict(item, **{holder: _dropped(held, field)})
        elif held.__class__ is list:
            item = dict(item, **{holder: [_dropped(part, field) if part.__class__ is dict
                                          and part.get("type") == part_type else part for part in held]})
    return item


def _dropped(thing: dict, field) -> dict:
    """C{thing} without C{field} where it holds something (itself where it has none, or an empty one: an output
    text's C{logprobs} of C{[]} or None as its create answered it, the shape kept)."""
    return {key: value for key, value in thing.items() if key != field} if thing.get(field) else thing


# A stored message's text content parts, and the field holding each one's text.
_TEXT_PARTS = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}


def as_input(item) -> dict | None:
    """One stored input or output item in the form any Responses upstream accepts as input."""
    kind = item.get("type", "message")
    if kind == "message":
        content = item.get("content")
        if isinstance(content, list):
            content = _text_of(content)
        return {"role": item.get("role", "user"), "content": content}
    if kind == "function_call":
        return {"type": "function_call", "call_id": item.get("call_id"), "name": item.get("name"),
                "arguments": item.get("arguments", "")}
    if kind == "function_call_output":
        return {"type": "function_call_output", "call_id": item.get("call_id"), "output": item.get("output")}
    return None  # reasoning and the like are not replayed


def _text_of(parts: list):
    """Content C{parts} as one text where each is a text part (an answer's refusal too: no Responses API takes
    one in an input message), else C{parts} as they are."""
    texts = []
    for part in parts:
        field = _TEXT_PARTS.get(part.get("type")) if isinstance(part, dict) and isinstance(part.get("type"), str) \
            else None
        text = part.get(field, "") if field is not None else None
        if not isinstance(text, str):
            return parts
        texts.append(text)
    return "".join(texts)


# Why a stored stream's response is C{failed} where its stream broke without saying why.
_BROKE = {"code": "stream_incomplete", "message": "The stream ended before the response was complete."}


def cut_short(response, left: bool, error=None) -> dict:
    """C{response}, as far as a stream that ended before it went (the object the stream began with, or made so
    far), as it is kept: C{cancelled} where its client C{left} (the gateway closes its upstream, which stops
    making it), else C{failed} with the stream's in-band C{error} event (or one saying it broke)."""
    if left:
        return dict(response, status="cancelled")
    if error.__class__ is dict:
        error = {"code": error.get("code") or _BROKE["code"], "message": error.get("message") or _BROKE["message"]}
    return dict(response, status="failed", error=error or _BROKE)


def unknown_response(response_id) -> NotFound:
    """The 404 of a response the gateway does not hold for whoever asks (none, or another tenant's)."""
    return NotFound(f"No response '{shown(response_id)}' is stored by the gateway.", param="response_id",
                    code="response_not_found")


def checked_previous_id(previous_id):
    """A Responses create's C{previous_response_id} (not None; online, or a batch's line), checked.

    @raise InvalidRequest: it is no string (C{invalid_type}), or empty (C{invalid_value}); or it names no
        response anywhere (L{held_nowhere}), L{unknown_previous}, the store not asked, for any key (an upstream
        holds no such id either).
    """
    if previous_id.__class__ is not str or not previous_id:
        raise InvalidRequest("previous_response_id must be a response id (a non-empty string) or null.",
                             param="previous_response_id",
                             code="invalid_value" if previous_id == "" else "invalid_type")
    if held_nowhere(previous_id):
        raise unknown_previous(previous_id)
    return previous_id


def unknown_previous(previous_id) -> InvalidRequest:
    """OpenAI's 400 for a C{previous_response_id} nobody holds for whoever asks (none, another tenant's, deleted,
    not stored): clients that start the conversation again on its code (C{previous_response_not_found}) rely
    on it."""
    return InvalidRequest(f"Previous response with id '{shown(str(previous_id))}' not found.",
                          param="previous_response_id", code="previous_response_not_found")


def unfinished_previous(previous_id, status) -> InvalidRequest:
    """The 400 of a C{previous_response_id} naming a background response still C{status} (queued, in progress):
    OpenAI continues a response once it is over, never from what it made so far."""
    return InvalidRequest(f"Previous response with id '{shown(str(previous_id))}' is still {status}: it can be "
                          "continued once it is over (or cancelled).", param="previous_response_id",
                          code="previous_response_not_over")


async def swept_for(store, response_id, principal) -> bool:
    """Whether the retention swept C{response_id} (L{gomodel.store.interfaces.IResponseStore.swept}), a response
    C{principal} may see: only its tenant is told it existed."""
    swept = await store.swept(response_id)
    return swept is not None and visible(principal, swept)


async def gone_previous(store, previous_id, principal) -> InvalidRequest:
    """L{unknown_previous} of C{previous_id}, saying it expired where the retention swept it (C{principal}'s)."""
    if not await swept_for(store, previous_id, principal):
        return unknown_previous(previous_id)
    return InvalidRequest(f"Previous response with id '{shown(str(previous_id))}' not found: it expired (swept past "
                          "the gateway's retention, RESPONSES_RETENTION).", param="previous_response_id",
                          code="previous_response_not_found")


async def no_chosen_id(store, body: dict, principal):
    """Refuse a Responses create (C{body}, which has a C{request_id}) naming the id of the response it makes
    where that could replace another tenant's: vLLM makes it of the body's C{request_id}, so naming another
    tenant's response would replace it at its instance (the gateway's record kept, its content the other
    key's), and that tenant's next turn would continue what the other key wrote. A managed key's is refused
    (it could name any tenant's); the master key's (an open gateway's) where C{store} (the stored responses, or
    None) holds a managed key's tenant's response of that id: its own, or one nobody holds, goes as it came.

    @return: a Deferred (a coroutine) firing with None once the id is free to choose.
    @raise InvalidRequest: a managed key's C{request_id} (C{unsupported_value}); the master key's naming a
        tenant's response, or holding a NUL character (C{invalid_value}: no store could keep the response, nor a
        path name it; the store not asked, L{held_nowhere}).
    """
    if principal is not None and not principal.master:
        raise InvalidRequest("request_id names the response an upstream makes: a managed key cannot choose it "
                             "(another tenant's response could have it).", param="request_id",
                             code="unsupported_value")
    chosen = body["request_id"]
    if store is None or chosen.__class__ is not str or not chosen:
        return
    if held_nowhere(chosen):
        raise InvalidRequest("request_id names the response an upstream makes, and a response id cannot hold a NUL "
                             "character.", param="request_id", code="invalid_value")
    record = await store.get(chosen)
    if record is not None and record.get("tenant") is not None:
        raise InvalidRequest(f"request_id names the response an upstream makes, and '{shown(chosen)}' is a managed "
                             "key's: its instance would replace it with this one. Choose another.",
                             param="request_id", code="invalid_value")


async def continued(store, previous_id: str, principal):
    """The stored record of C{previous_id} that C{principal} may continue, or None: a master key's unknown id
    goes upstream as it is (the upstream may still hold it: made there directly, or not stored).

    @raise InvalidRequest: it belongs to another tenant, or a managed key names a response the gateway does
        not hold (the upstream may still hold another tenant's), or it was deleted through the gateway (the
        upstream may still hold it too): L{unknown_previous}.
    """
    record = await store.get(previous_id)
    if record is None:
        if principal is not None and not principal.master or await store.deleted(previous_id):
            raise await gone_previous(store, previous_id, principal)
        return None
    if not visible(principal, record):
        raise unknown_previous(previous_id)
    return record


# A response object's link to the response it follows, as the upstream writes it when it was sent none.
_UNLINKED = re.compile(rb'"previous_response_id":\s*null')


def error_hidden(upstream, then, answer: bytes) -> bytes:
    """C{answer}, a response object's JSON bytes from C{upstream} (a provider's pool), with its C{error} (a failed
    response's) without the upstream's addresses where it names one (L{error_shown}), passed on to C{then} (or None).
    An answer whose error names none (the usual one: null) is relayed as it came. It is parsed to know that: a search
    of the whole answer for every form of an address (L{gomodel.addresses.marks}) cost more (with the mock's 1 kB
    answer, 57 k instructions more a request: bench/instructions.sh); one with a C{\\u} escape was parsed besides."""
    if upstream.hidden_pattern is not None:
        try:
            response = jsonutil.loads(answer)
        except jsonutil.JSONError:
            response = None
        answer = error_shown_with_bytes(response, answer, upstream)[1]
    return answer if then is None else then(answer)


def error_shown_with_bytes(response, answer: bytes, upstream) -> tuple:
    """C{(response, answer)}: C{response}, a response object (or anything) parsed from C{answer}, its JSON bytes, and
    those, with its error without C{upstream}'s addresses (L{error_shown}): both new where that changed it."""
    without = error_shown(response, upstream) if upstream.hidden_pattern is not None else response
    return (response, answer) if without is response else (without, jsonutil.dumps(without))


def relink(previous_id, then, answer: bytes) -> bytes:
    """C{answer} (a response object's JSON, or whole events carrying one) naming C{previous_id} where it says
    null (its instance was sent the conversation explicitly), passed on to C{then} (or None). In a model's text
    the name's quotes are escaped: never matched."""
    link = b'"previous_response_id":' + jsonutil.dumps(previous_id)
    answer = _UNLINKED.sub(lambda _: link, answer)
    return answer if then is None else then(answer)


def names_previous(answer: bytes, previous_id: str) -> bool:
    """Whether an upstream's error C{answer} (vLLM's 404 for a response it does not hold) names C{previous_id}."""
    try:
        error = jsonutil.loads(answer).get("error")
    except (jsonutil.JSONError, AttributeError):
        return False
    return isinstance(error, dict) and previous_id in str(error.get("message", ""))


def as_list(value) -> list:
    """Responses C{input} as a list of items (a string is one user message)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return list(value)


async def conversation(store, record) -> list:
    """The whole conversation up to and including C{record}'s output, as explicit input items (L{_turns})."""
    return _replayed(await _turns(store, record))


async def _turns(store, record, whole=True) -> list:
    """The stored turns of C{record}'s conversation, the first first, C{record} last.

    Follows C{previous_response_id} back through C{store} (an L{IResponseStore}), in one read
    (L{gomodel.store.interfaces.IResponseStore.chain}: a turn whose record is gone ends it). A turn deleted
    through the gateway ends it as its start (the conversation goes on from the turns after it); one gone
    otherwise (swept by the retention, never stored) leaves no whole conversation to replay.

    @raise InvalidRequest: C{whole}, and a turn it follows is gone, not deleted (L{unknown_previous}'s code,
        naming it).
    """
    turns = [record]
    if record.get("previous_response_id"):
        seen = {record["id"]}
        for turn in await store.chain(record["id"]):
            if turn["id"] in seen or len(turns) >= MAX_CHAIN:
                break
            seen.add(turn["id"])
            turns.append(turn)
        missing = turns[-1].get("previous_response_id")
        if whole and missing and missing not in seen and len(turns) < MAX_CHAIN and not await store.deleted(missing):
            raise InvalidRequest(f"Previous response with id '{shown(str(record['id']))}' cannot be continued: "
                                 f"the earlier response '{shown(str(missing))}' it follows is no longer stored "
                                 "(past the gateway's retention, or never stored).", param="previous_response_id",
                                 code="previous_response_not_found")
    turns.reverse()
    return turns


def _replayed(turns, known=None) -> list:
    """The input items replaying C{turns} (L{as_input}), a turn's C{item_reference} as the earlier item it names;
    C{known} (a dict, or None) gets every item of theirs by id (L{_index})."""
    items, known = [], {} if known is None else known
    for turn in turns:
        for item in turn["input_items"] + (turn["response"].get("output") or []):
            if item.__class__ is dict and item.get("type") == "item_reference":
                item = known.get(item.get("id"), item)
            replayed = as_input(item) if item.__class__ is dict else None
            if replayed is not None:
                items.append(replayed)
        _index(turn, known)
    return items


def _index(turn, known: dict):
    """Add C{turn}'s input and output items to C{known} (id -> item)."""
    for item in turn["input_items"] + (turn["response"].get("output") or []):
        if item.__class__ is dict and item.get("type") != "item_reference" and item.get("id").__class__ is str:
            known[item["id"]] = item


def references(items) -> bool:
    """Whether Responses input C{items} hold an C{item_reference}."""
    return items.__class__ is list and any(item.__class__ is dict and item.get("type") == "item_reference"
                                           for item in items)


def resolved(items: list, known: dict, strict=True) -> list:
    """Responses input C{items} with each C{item_reference} as the stored item it names (L{as_input}), from
    C{known} (id -> item: a conversation's, L{_index}); one naming none is left as it is unless C{strict}.

    @raise InvalidRequest: C{strict}, and one names no item of C{known} (L{unknown_item}).
    """
    if not references(items):
        return items
    out = []
    for index, item in enumerate(items):
        if item.__class__ is dict and item.get("type") == "item_reference":
            found = known.get(item.get("id")) if item.get("id").__class__ is str else None
            if found is not None:
                item = as_input(found) or found
            elif strict:
                raise unknown_item(item.get("id"), index)
        out.append(item)
    return out


async def with_references(store, body, previous) -> dict:
    """C{body}, a native follow-up of C{previous} (its stored record), with each C{item_reference} naming an item of
    its conversation as that item (the upstream, which holds the conversation, may not resolve it: vLLM), others
    as they are (the upstream may hold them); C{body} itself where it has none (no read)."""
    if not references(body.get("input")):
        return body
    known = {}
    _replayed(await _turns(store, previous, whole=False), known)
    return dict(body, input=resolved(body["input"], known, strict=False))


def unknown_item(item_id, index) -> InvalidRequest:
    """The 400 of an C{item_reference} (at C{index} of the input) naming no item of the conversation it continues."""
    return InvalidRequest(f"Item with id '{shown(str(item_id))}' not found: an item_reference (input[{index}]) names "
                          "an item of the conversation it continues (previous_response_id).", param="input",
                          code="invalid_value")


async def with_history(store, body, previous) -> dict:
    """C{body} (a create's, a batch line's) with the conversation up to C{previous} (its stored record) as explicit
    input (L{conversation}), its C{item_reference}s as the items they name (L{resolved}), and no
    C{previous_response_id}."""
    known = {}
    replayed = _replayed(await _turns(store, previous), known)
    explicit = dict(body, input=replayed + resolved(as_list(body.get("input")), known))
    explicit.pop("previous_response_id", None)
    return explicit


class ResponseRetention(Repeating):
    """Deletes stored responses older than the retention, at start and then every C{interval} seconds.

    A claimed job (C{"sweep:responses"}): of several processes on one store,
    one sweeps at a time.
    """

    log = Logger()

    def __init__(self, responses, claims, clock, retention: float, owner: str, interval: float = 3600.0,
                 lease: float = 600.0):
        """
        @param responses: the L{gomodel.store.interfaces.IResponseStore}.
        @param claims: the L{gomodel.store.interfaces.IClaims} the sweep is claimed in.
        @param owner: this process's owner id (L{gomodel.store.records.process_owner}).
        """
        super().__init__(interval, self._sweep)
        self.clock = clock
        self._responses = responses
        self._claims = claims
        self._retention = retention
        self._owner = owner
        self._lease = lease

    def _sweep(self):
        d = Deferred.fromCoroutine(claimed(self._claims, "sweep:responses", self._owner, self._lease, self._delete))
        d.addCallback(lambda count: count and self.log.info("{count} stored responses past their retention deleted",
                                                            count=count))
        d.addErrback(lambda f: log_failure(self.log, f, "sweeping stored responses failed"))
        return d

    def _delete(self):
        return self._responses.delete_before(int(self.clock.seconds() - self._retention))
