"""Server-sent events, framed on bytes and observed without being rewritten.

Events are cut at their blank-line terminator on the raw bytes, so a UTF-8
character split across TCP reads is never decoded half-way: what reaches the
client is the upstream's bytes, event for event.
"""

import re

from zope.interface import implementer

from gomodel import jsonutil
from gomodel.interfaces import IStreamObserver

MAX_EVENT_BYTES = 8 * 1024 * 1024
_TERMINATOR = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# A read longer than this (many events: a stream's tail read at once; a model's read of one event is
# shorter) is observed without cutting it into events where it can be.
LONG_READ = 2048


def mentions(data: bytes, words) -> bool:
    """Whether C{data} holds any of C{words}.

    C{bytes.find} rather than C{in}: CPython's C{in} on bytes first tries its operand as an integer, and
    makes and drops a TypeError for every bytes one, several times the cost of the search on an event.
    """
    for word in words:
        if data.find(word) >= 0:
            return True
    return False


def earliest(places, none: int) -> int:
    """The smallest of C{places} (C{bytes.find} results) that is not negative, or C{none} when all are."""
    first = none
    for at in places:
        if 0 <= at < first:
            first = at
    return first


def first_place(data: bytes, words, start: int, stop: int = -1) -> int:
    """The first place in C{data} from C{start} where one of C{words} begins, before C{stop} (default: the
    end), or C{stop} (C{len(data)}) when none does. Each word is looked for only as far as the earliest
    found so far."""
    first = len(data) if stop < 0 else stop
    for word in words:
        at = data.find(word, start, first + len(word))
        if at >= 0:
            first = at
    return first


def event_at(events: list, joined: bytes, offset: int) -> int:
    """The index of the one of C{events} (whose join is C{joined}) that holds the byte at C{offset},
    or C{len(events)} for C{len(joined)}.

    Counted from the last: the words looked for (a stream's end, its usage or an error) are most
    often in the last events of a read that holds many.
    """
    if offset == len(joined):
        return len(events)
    i = len(events) - 1
    start = len(joined) - len(events[i])
    while start > offset:
        i -= 1
        start -= len(events[i])
    return i


def event_bounds(joined: bytes, at: int):
    """C{(start, end)} of the event of C{joined} (whole events, each ending at a blank line:
    L{SSEFramer.feed_joined}) that holds the byte at C{at}, not a line break."""
    start = joined.rfind(b"\n\n", 0, at)
    return 0 if start < 0 else start + 2, joined.find(b"\n\n", at) + 2


def events_end(data: bytes, start: int = 0, stop: int = -1) -> int:
    """The end (after its blank line) of the last whole event of C{data[start:stop]} (C{stop} -1: to the
    end), or 0 where no event ends there."""
    stop = len(data) if stop < 0 else stop
    end = 0
    for terminator in (b"\n\n", b"\r\r", b"\r\n\r\n"):
        at = data.rfind(terminator, start, stop)
        if at >= 0 and at + len(terminator) > end:
            end = at + len(terminator)
    return end


def event_around(events: bytes, at: int) -> bytes:
    """The event of C{events} (whole events, any line breaks) that holds the byte at C{at}."""
    stop = earliest((events.find(b"\n\n", at), events.find(b"\r\r", at), events.find(b"\r\n\r\n", at)), len(events))
    return events[events_end(events, 0, at):stop]


def event_kind(event: bytes) -> bytes:
    """The type of one event: its C{event:} field's, else its data's C{type} (C{[DONE]}: that data itself),
    or b"" where it says none."""
    at = event.find(b"event:")
    if at == 0 or at > 0 and event[at - 1] in b"\r\n":
        end = earliest((event.find(b"\n", at), event.find(b"\r", at)), len(event))
        return event[at + 6:end].strip()
    data = event_data(event)
    if data == b"[DONE]":
        return data
    payload = event_object(event)
    kind = payload.get("type") if payload is not None else None
    return kind.encode() if kind.__class__ is str else b""


def error_in(events: bytes):
    """The error that one of C{events} (whole events of any dialect) reports in band, or None: an OpenAI-style
    chunk's C{error} (vLLM's C{data: {"error": ...}}), or an event of type C{error} (Anthropic's, the Responses
    API's): its C{error} object, or the event's own."""
    if events.find(b'"error"') < 0:
        return None
    for event in _TERMINATOR.split(events):
        if event.find(b'"error"') < 0:
            continue
        payload = event_object(event)
        if payload is None:
            continue
        error = payload.get("error")
        if payload.get("type") == "error":
            return error if error.__class__ is dict else payload
        if error.__class__ is dict or error.__class__ is str and error:
            return error
    return None


def failure_in(events: bytes):
    """The error of the C{response.failed} event among C{events} (whole events of a Responses stream), or None
    (L{failed_error})."""
    for event in _TERMINATOR.split(events):
        if event.find(b"response.failed") >= 0:
            payload = event_object(event)
            if payload is not None and payload.get("type") == "response.failed":
                return failed_error(payload)
    return None


def failed_error(payload: dict) -> dict:
    """The error of a Responses stream's C{response.failed} event C{payload}: its response's C{error}, or one
    saying it failed (a failed response is its upstream's in-band error, as an error event is)."""
    response = payload.get("response")
    error = response.get("error") if response.__class__ is dict else None
    return error if error.__class__ is dict else {"code": "server_error", "message": "The response failed."}


# The event that ends a chat or text completion stream, as vLLM and OpenAI write it.
DONE_EVENT = b"data: [DONE]\n\n"
# A choice's reason for ending, as a chunk says it (a string: not null), as vLLM and OpenAI write it, and spaced.
_REASONS = (b'"finish_reason":"', b'"finish_reason": "')


def _reasoned(data: bytes, start: int) -> bool:
    """Whether C{data}, from C{start} (its last event's start), says why a choice ended: a C{finish_reason} that is
    a string, but vLLM's C{"abort"} (one search in C for each spelling, no regex: this runs at every stream's end)."""
    for reason in _REASONS:
        at = data.find(reason, start)
        if at >= 0:
            return not data.startswith(b'abort"', at + len(reason))
    return False


class StreamIncomplete(Exception):
    """The upstream's stream ended without its proper end."""


# What a translating observer raises (as L{StreamIncomplete}) for a C{data:} that is no JSON object (cut
# short, say): what it held is lost, so the stream may not end as though it were whole.
NO_OBJECT = "the upstream sent an event that is no JSON object"


class SSEFramer:
    """Splits a byte stream into whole events (each with its terminator)."""

    _buffer = b""
    _held = None  # an event going on over reads: L{_buffer} and the reads after it, as they came
    _held_size = 0

    def __init__(self, max_event_bytes=MAX_EVENT_BYTES):
        self._max = max_event_bytes

    def feed(self, data: bytes) -> list:
        """Add C{data}; return the events it completed."""
        buffer = self._buffer
        if buffer:
            buffer = self._after(buffer, data)
            if buffer is None:
                return []
        else:
            buffer = data
        if buffer.find(b"\r") >= 0:  # (not `in`: see mentions)
            events = self._cut(buffer)
        elif buffer.find(b"\n\n") == len(buffer) - 2 >= 0:  # one whole event: a model's read of one token
            self._buffer = b""
            return [buffer]
        else:  # LF only, cut in C
            parts = buffer.split(b"\n\n")
            self._buffer = parts.pop()
            events = [part + b"\n\n" for part in parts]
        self._bound()
        return events

    def feed_joined(self, data: bytes):
        """Add C{data}; return C{(joined, events)}: the events it completed as one bytes, and as a list
        only where the stream has CR line breaks (else None: every event ends at a blank line, so an
        event in C{joined} is found by its C{\\n\\n}, L{event_bounds}, and the read is never cut
        into events)."""
        buffer = self._buffer
        if buffer:
            buffer = self._after(buffer, data)
            if buffer is None:
                return b"", None
        else:
            buffer = data
        if buffer.find(b"\r") >= 0:
            events = self._cut(buffer)
            self._bound()
            return b"".join(events), events
        end = buffer.rfind(b"\n\n") + 2  # (the last event's end: found at once, a read ends with it)
        if end < 2:
            self._buffer = buffer
            joined = b""
        elif end == len(buffer):
            self._buffer = b""
            joined = buffer
        else:
            self._buffer, joined = buffer[end:], buffer[:end]
        self._bound()
        return joined, None

    def _after(self, buffer: bytes, data: bytes):
        """C{data} after the event not ended yet (C{buffer}, and the reads held after it), joined, where an event
        may end in it; else None: C{data} held with them, until one may (an event going on over many reads is
        joined once, not copied onto each read).

        @raise StreamIncomplete: the event held ran past the bound.
        """
        held = self._held
        # (no end in it, nor between it and what came before: an LF-only one, and no CR to look at)
        if data.find(b"\n\n") < 0 and data.find(b"\r") < 0 and data[:1] != b"\n":
            if held is None:
                held = self._held = [buffer]
                self._held_size = len(buffer)
            held.append(data)
            self._held_size += len(data)
            if self._held_size > self._max:
                raise StreamIncomplete("an upstream event exceeded %d bytes" % self._max)
            return None
        if held is None:
            return buffer + data
        self._held = None
        held.append(data)
        return b"".join(held)

    def _cut(self, buffer: bytes) -> list:
        """The whole events of C{buffer} (which has CR line breaks), keeping the rest."""
        events = []
        start = 0
        while True:
            match = _TERMINATOR.search(buffer, start)
            if match is None:
                break
            events.append(buffer[start:match.end()])
            start = match.end()
        self._buffer = buffer[start:]
        return events

    def _bound(self):
        if len(self._buffer) > self._max:
            raise StreamIncomplete("an upstream event exceeded %d bytes" % self._max)

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated."""
        return self._buffer if self._held is None else b"".join(self._held)


def event_data(event: bytes) -> bytes:
    """The joined C{data:} field of one event."""
    # Most events have one data line and no CR: it is found with C{find}, the event never cut into
    # lines (C{splitlines} steps byte by byte through a Responses stream's 2 KB last event); the most
    # common, C{data: X} and its blank line, is taken first, at once.
    if event.startswith(b"data: ") and event.find(b"\n") == len(event) - 2 and event.find(b"\r") < 0:
        return event[6:-2]
    start = event.find(b"data:")
    if (start == 0 or start > 0 and event[start - 1] == 10) and event.find(b"\r") < 0:  # (10: a line feed)
        end = event.find(b"\n", start)
        if end < 0:
            end = len(event)
        if event.find(b"\ndata:", end) < 0:
            return event[start + 6 if event.startswith(b" ", start + 5) else start + 5:end]
    lines = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(lines)


def event_object(event: bytes):
    """The JSON object of one event's data, or None (not JSON, or not an object)."""
    try:
        payload = jsonutil.loads(event_data(event))
    except jsonutil.JSONError:
        return None
    return payload if isinstance(payload, dict) else None


def data_object(data: bytes) -> dict:
    """The JSON object of an event's C{data} payload.

    @raise StreamIncomplete: it is no JSON object (L{NO_OBJECT}).
    """
    try:
        payload = jsonutil.loads(data)
    except jsonutil.JSONError:
        payload = None
    if not isinstance(payload, dict):
        raise StreamIncomplete(NO_OBJECT)
    return payload


def require_end(framer: SSEFramer, done: bool, end: str):
    """At the end of an upstream body: raise L{StreamIncomplete} unless the stream ended with C{end}.

    @param done: whether the stream's proper end (C{end}, named in the error) was seen.
    """
    if framer.pending.strip():
        raise StreamIncomplete("the upstream stream ended inside an event")
    if not done:
        raise StreamIncomplete(f"the upstream stream ended {end}")


@implementer(IStreamObserver)
class ChatStreamObserver:
    """Watches a chat/completions stream: usage, C{[DONE]}, in-band errors (an error is the stream's end too).

    It drops the usage-only chunk that the gateway asked for on the client's
    behalf (C{strip_usage}), or the usage from the chunk that carries it beside
    its choices; every other byte passes unchanged, but an in-band error that
    names the upstream's address (C{hide}).
    """

    # (the state every stream starts in, set here once rather than per stream in __init__)
    usage = None
    done = False
    error = None
    events = 0  # events relayed while no usage is known: about one generated token each, for an estimate
    reasoned = False  # a choice said why it ended (L{_reasoned}), in the event before a watched one or in it
    unreasoned = False  # its [DONE] came, no choice having said why it ended: dropped, the stream was cut
    _last = b""  # the last events relayed before a read (where the event before its first watched one ends)

    def __init__(self, strip_usage: bool, hide=None, reasons=False):
        """
        @param hide: a function of one of the upstream's texts (an error's message) giving it as the client may
            see it, its upstream's address and key hidden (L{gomodel.upstream.errors.without_address}), or None.
        @param reasons: whether a stream that ends well says why its choices ended (a chat or text completion's
            C{finish_reason}, in its last content chunk): one whose [DONE] comes without (vLLM's engine stopped
            or failed under it, an error before its first token: nothing else says so), or with vLLM's
            C{"abort"}, was cut (L{finish}).
        """
        self._framer = SSEFramer()
        self._strip_usage = strip_usage
        self._hide = hide
        self._reasons = reasons

    def feed(self, data: bytes) -> bytes:
        """Take upstream bytes; return the bytes to send the client now (whole events)."""
        # A short read of whole events (LF line breaks) after whole events, holding none of the watched words: a
        # model's read of one token, most reads. It goes as it came, its events counted, without the framer (as its
        # split would count them: a blank line ends each). A long read goes by L{_feed_joined} alone, which looks
        # for each word once: looked for here first, a stream come whole was searched twice for its usage.
        long = len(data) > LONG_READ
        if (not long and not self._framer._buffer and data.endswith(b"\n\n") and data.find(b"\r") < 0
                and data.find(b'"usage"') < 0 and data.find(b'"error"') < 0 and data.find(b"[DONE]") < 0):
            self.events += data.count(b"\n\n")
            self._last = data
            return data
        if long:
            joined, events = self._framer.feed_joined(data)
            if events is None:
                return self._feed_joined(joined)
        else:
            events = self._framer.feed(data)
        self.events += len(events)
        joined = b"".join(events)
        # Only events that can carry usage, an error or the end are looked into: most reads hold none,
        # and a word found in the joined events is within one of them (none holds a line break). The
        # words (C{"usage"}, C{"error"}, C{[DONE]}) are looked for inline here (see mentions): this runs
        # for every event.
        usage_at, error_at, done_at = joined.find(b'"usage"'), joined.find(b'"error"'), joined.find(b"[DONE]")
        if usage_at < 0 and error_at < 0 and done_at < 0:
            if joined:  # (an event come over reads, a last content chunk's: the one before the next watched one)
                self._last = joined
            return joined
        if len(events) > 1:
            # The events before the first one holding a word go as they are (a read that holds a
            # stream's end often holds its last tokens too): L{event_at} the earliest word's place.
            i = event_at(events, joined, earliest((usage_at, error_at, done_at), len(joined)))
            out, events = events[:i], events[i:]
        else:
            out = []
        return self._passed(out, events)

    def _feed_joined(self, joined: bytes) -> bytes:
        """L{feed} for a long read (many events: a stream's tail read at once), its whole events joined:
        only the events from the first one holding a word on are cut apart."""
        size = len(joined)
        if joined.endswith(b"\n\ndata: [DONE]\n\n"):
            # A read ending the stream ends with its [DONE] event: the other words are looked for before it, each
            # only as far as the earliest found (an earlier [DONE] event would end it just the same, and one only
            # mentioned in a token is no event).
            first = size - len(DONE_EVENT)
            at = joined.find(b'"usage"', 0, first)
            if at >= 0:
                first = at
            at = joined.find(b'"error"', 0, first)
            if at >= 0:
                first = at
        else:
            first = earliest((joined.find(b'"usage"'), joined.find(b'"error"'), joined.find(b"[DONE]")), size)
        start = event_bounds(joined, first)[0] if first < size else first
        events = [event + b"\n\n" for event in joined[start:].split(b"\n\n")[:-1]]  # (none after the last end)
        out = self._passed([joined[:start]], events)
        self.events += len(events)
        if self.usage is None:  # (once it is known, the count is not needed)
            self.events += joined.count(b"\n\n", 0, start)
        return out

    def _passed(self, out: list, events) -> bytes:
        """C{out} and those of C{events} the client gets, joined; each holding a watched word is observed."""
        for event in events:
            if self._reasons and not self.reasoned:  # (why its choices ended: in the event before, a last content
                before = out[-1] if out else self._last    # chunk, most often; or in this one, beside its usage)
                self.reasoned = (event.find(b'"finish_reason"') >= 0 and _reasoned(event, 0)) or _reasoned(
                    before, before.rfind(b"\ndata:") + 1)  # (its last event's start: one event searched)
            if event == DONE_EVENT:  # (how a stream ends, as vLLM writes it: told at once)
                if not self._ends():
                    continue
                self.done = True
            elif event.find(b'"usage"') >= 0 or event.find(b'"error"') >= 0 or event.find(b"[DONE]") >= 0:
                event = self._observe(event)
                if event is None:
                    continue
            out.append(event)
        if out:
            self._last = out[-1]
        return b"".join(out)

    def _observe(self, event: bytes):
        """Record what C{event} says; return what the client gets of it (itself, or its error without the
        upstream's address), or None."""
        data = event_data(event)
        if data == b"[DONE]":
            if not self._ends():
                return None
            self.done = True
            return event
        if data.find(b'"usage"') >= 0 or data.find(b'"error"') >= 0:
            try:
                chunk = jsonutil.loads(data)
            except jsonutil.JSONError:
                return event
            if isinstance(chunk, dict):
                error = chunk.get("error")
                if isinstance(error, (dict, str)):
                    self.error = error
                    self.done = True  # (the client has the error: the stream's end, as on every route, [DONE] or not)
                    if self._hide is not None:
                        shown = hidden_strings(error, self._hide)
                        if shown != error:
                            self.error = chunk["error"] = shown
                            event = b"data: " + jsonutil.dumps(chunk) + b"\n\n"
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    self.usage = usage
                    if self._strip_usage:
                        if chunk.get("choices") == []:
                            return None
                        # (an upstream that puts the usage on its last chunk, beside its choices: llama.cpp's)
                        del chunk["usage"]
                        return b"data: " + jsonutil.dumps(chunk) + b"\n\n"
        return event

    def _ends(self) -> bool:
        """Whether the stream's [DONE] ends it well: where its choices must say why they ended (C{reasons}), one
        did (L{reasoned}), or an error ended it first (L{done}: the client has it); else it is dropped
        (L{unreasoned}: L{finish} says the stream was cut)."""
        if not self._reasons or self.reasoned or self.done:
            return True
        self.unreasoned = True
        return False

    def finish(self):
        """The upstream body ended cleanly; raise L{StreamIncomplete} if the stream did not."""
        if self.unreasoned and not self.done:
            raise StreamIncomplete("the upstream stream ended without a finish_reason")
        require_end(self._framer, self.done, "without [DONE]")

    def whole(self, answer: bytes) -> bytes:
        """The stream's events for a whole chat or text completion (an upstream that ignored C{stream}):
        one chunk holding each choice whole, the usage chunk where the client asked for it, C{[DONE]}; for
        an exchange's C{transform}, which only a whole answer meets.

        @raise ValueError: C{answer} is no JSON (L{jsonutil.JSONError}), or no completion with choices.
        """
        completion = jsonutil.loads(answer)
        choices = completion.get("choices") if isinstance(completion, dict) else None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
            raise ValueError("the answer is no completion with choices")
        chunk = dict(completion, choices=[_streamed_choice(choice) for choice in choices])
        if chunk.get("object") == "chat.completion":
            chunk["object"] = "chat.completion.chunk"
        usage = chunk.pop("usage", None)
        events = [chunk]
        if isinstance(usage, dict):
            self.usage = usage
            if not self._strip_usage:
                events.append(dict(chunk, choices=[], usage=usage))
        self.done = True
        return b"".join(b"data: " + jsonutil.dumps(event) + b"\n\n" for event in events) + b"data: [DONE]\n\n"


class ChoicesStreamObserver(ChatStreamObserver):
    """L{ChatStreamObserver} (C{reasons}) of a stream of more than one choice (a request's C{n}, a text completion's
    prompts), which vLLM streams interleaved, each ending on its own chunk's C{finish_reason}: its [DONE] ends it
    well only where every choice asked for, and every one that came, said why it ended (a string, not vLLM's
    C{"abort"}); the last event's reason says one choice's alone. Each event is parsed: a rare request's cost, kept
    off the stream of one choice."""

    def __init__(self, strip_usage: bool, hide, choices: int):
        """
        @param hide: as L{ChatStreamObserver}'s.
        @param choices: the choices the request asked for (indexed from 0): each must end, and each other that came.
        """
        super().__init__(strip_usage, hide)
        self._choices = choices
        self._seen = SSEFramer()  # (the events as they come, each looked into before the relay's framer has it)
        self._ended = {}  # a choice's index -> whether it said why it ended (its last reason said)
        self._unended = None  # the first choice that ended without a reason (L{_ends})

    def feed(self, data: bytes) -> bytes:
        """L{ChatStreamObserver.feed}, each event it completes looked into first (L{_note})."""
        for event in self._seen.feed(data):
            self._note(event)
        return super().feed(data)

    def _note(self, event: bytes):
        """Record the reasons C{event}'s choices said they ended for."""
        if event.find(b'"choices"') < 0:
            return
        payload = event_object(event)
        choices = payload.get("choices") if payload is not None else None
        if choices.__class__ is not list:
            return
        ended = self._ended
        for choice in choices:
            if choice.__class__ is not dict:
                continue
            index = choice.get("index", 0)
            if index.__class__ is not int:
                continue
            reason = choice.get("finish_reason")
            if reason.__class__ is str:
                ended[index] = reason != "abort"
            elif index not in ended:
                ended[index] = False

    def _ends(self) -> bool:
        """Whether the stream's [DONE] ends it well: an error ended it first (L{done}), or every choice asked for
        and every one that came said why it ended; else it is dropped (L{unreasoned}, the first that did not in
        L{_unended}: L{finish} names it)."""
        if self.done:
            return True
        ended = self._ended
        for index in sorted(set(range(self._choices)).union(ended)):
            if not ended.get(index):
                self._unended = index
                self.unreasoned = True
                return False
        return True

    def finish(self):
        """L{ChatStreamObserver.finish}, naming the choice that ended without a reason (L{_unended})."""
        if self.unreasoned and not self.done:
            raise StreamIncomplete(f"the upstream stream's choice {self._unended} ended without a finish_reason")
        super().finish()


def hidden_strings(value, hide):
    """C{value} (an upstream's error: a JSON value) with C{hide} applied to every string in it, at any depth."""
    if value.__class__ is str:
        return hide(value)
    if value.__class__ is dict:
        return {key: hidden_strings(item, hide) for key, item in value.items()}
    if value.__class__ is list:
        return [hidden_strings(item, hide) for item in value]
    return value


def _streamed_choice(choice: dict) -> dict:
    """A whole completion's choice as one stream chunk's: a chat message as its delta (each tool call
    with its index), a text completion's as it is."""
    message = choice.get("message")
    if not isinstance(message, dict):
        return choice
    delta = dict(message)
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        delta["tool_calls"] = [dict(call, index=i) if isinstance(call, dict) else call for i, call in enumerate(calls)]
    streamed = {key: value for key, value in choice.items() if key != "message"}
    streamed["delta"] = delta
    return streamed


_NUMBER = re.compile(rb"\s*(\d+)")


def sequence_after(events):
    """The C{sequence_number} after the last one C{events} (whole events of a Responses stream, bytes or a
    bytearray) say (a key: one in a string is escaped), or None where they say none."""
    at = events.rfind(b'"sequence_number":')
    if at < 0:
        return None
    digits = _NUMBER.match(events, at + 18)
    return int(digits.group(1)) + 1 if digits is not None else None


# The event types that end a Responses stream, each carrying its final response object.
RESPONSE_END_TYPES = ("response.completed", "response.incomplete", "response.failed")
_RESPONSE_END_EVENTS = tuple(kind.encode() for kind in RESPONSE_END_TYPES)
_ERROR_WORD = (b'"error"',)
_RESPONSES_WATCHED = _RESPONSE_END_EVENTS + _ERROR_WORD
_DELTA_TYPE = b'.delta"'  # (the end of a delta event's C{"type"}: C{"response.output_text.delta"})


@implementer(IStreamObserver)
class ResponsesStreamObserver:
    """Watches a native Responses API stream (typed events, no C{[DONE]}); relays it untouched.

    The stream is complete once a C{response.completed}, C{.incomplete} or
    C{.failed} event (or an C{error} event) arrived; its final response
    object and usage are kept. An C{error} event, or a response's C{error},
    that names the upstream's address is the one thing rewritten (C{hide}).

    @ivar events: the delta events relayed (C{response.output_text.delta}, C{.reasoning_text.delta},
        C{.function_call_arguments.delta}...: about one generated token each), the estimate of what a
        stream cut before its final response made (counted while no usage is known).
    """

    def __init__(self, hide=None):
        """
        @param hide: as L{ChatStreamObserver}'s.
        """
        self._hide = hide
        self._shown = None  # what the client gets instead of the event last observed, when it was rewritten
        self._framer = SSEFramer()
        self._last = b""  # the last read that held whole events (L{next_sequence})
        self.done = False
        self.response = None
        self.usage = None
        self.error = None
        self.events = 0

    def next_sequence(self):
        """The C{sequence_number} after the last event relayed, or None where none said one."""
        return sequence_after(self._last)

    def feed(self, data: bytes) -> bytes:
        # A short read of whole events (LF line breaks) after whole events, holding none of the watched words: a
        # model's read of one delta, most reads. It goes as it came, without the framer (L{ChatStreamObserver.feed}'s;
        # the words, L{_RESPONSES_WATCHED}, looked for inline). A long read goes on below, where the end's words
        # are looked for in its last event alone.
        if (len(data) <= LONG_READ and not self._framer._buffer and data.endswith(b"\n\n") and data.find(b"\r") < 0
                and data.find(b"response.completed") < 0 and data.find(b"response.incomplete") < 0
                and data.find(b"response.failed") < 0 and data.find(b'"error"') < 0):
            self._last = data
            self.events += data.count(_DELTA_TYPE)
            return data
        joined, events = self._framer.feed_joined(data)
        if not joined:
            return joined
        self._last = joined
        out = self._observed(joined, events)
        if self.usage is None:  # (once it is known, the count is not needed: a stream come whole is not counted)
            # Each delta event's type ends its name's quoted string (a quote inside a text is escaped).
            self.events += joined.count(_DELTA_TYPE)
        return out

    def _observed(self, joined: bytes, events) -> bytes:
        """What the client gets of C{joined}, whole events (C{events}, the same cut apart where they have CR line
        breaks, else None: L{SSEFramer.feed_joined}), each one holding a watched word observed."""
        if events is not None:  # CR line breaks: event by event
            rewritten = False
            for i, event in enumerate(events):
                if mentions(event, _RESPONSES_WATCHED):
                    self._observe(event)
                    if self._shown is not None:
                        events[i], self._shown, rewritten = self._shown, None, True
            return b"".join(events) if rewritten else joined
        # Most reads hold none of the words; one that does holds them late (the end), after the tokens.
        # The events holding one are looked into, found in the read as it is (never cut into events).
        shown = None  # [(start, end, what the client gets instead)] of the events rewritten (an error naming the upstream)
        words, stop = _RESPONSES_WATCHED, len(joined)
        if stop > LONG_READ:
            # Many events (a stream's tail read at once): when the last one ends the stream, only an
            # error is looked for before it (an end is a stream's last event), each word once, not four.
            last = joined.rfind(b"\n\n", 0, stop - 2) + 2  # (1: one event)
            if last > 1 and first_place(joined, _RESPONSE_END_EVENTS, last) < stop and self._observe(joined[last:]):
                words, stop = _ERROR_WORD, last
                if self._shown is not None:
                    shown, self._shown = [(last, len(joined), self._shown)], None
        at = first_place(joined, words, 0, stop)
        while at < stop:
            start, at = event_bounds(joined, at)
            self._observe(joined[start:at])
            if self._shown is not None:
                shown = (shown or []) + [(start, at, self._shown)]
                self._shown = None
            at = first_place(joined, words, at, stop)
        if shown is None:
            return joined
        out, at = [], 0
        for start, end, event in sorted(shown):
            out += (joined[at:start], event)
            at = end
        out.append(joined[at:])
        return b"".join(out)

    def _observe(self, event) -> bool:
        """Record what C{event} says; return whether it ends the stream as a response's end. An error that
        names the upstream's address is recorded without it, and the event the client gets instead left in
        L{_shown}."""
        payload = event_object(event)
        if payload is None:
            return False
        kind = payload.get("type")
        if self._hide is not None and (kind == "error" or kind == "response.failed"):
            self._hidden(event, payload)
        if kind == "error":
            self.error = payload
            self.done = True
        elif kind in RESPONSE_END_TYPES:
            self.done = True
            if kind == "response.failed":
                self.error = failed_error(payload)
            self.response = payload.get("response")
            if isinstance(self.response, dict):
                usage = self.response.get("usage")
                if usage.__class__ is dict:  # (anything else is no usage: the request's sinks read a dict)
                    self.usage = usage
            return True
        return False

    def _hidden(self, event, payload):
        """Rewrite C{payload}, C{event}'s object (an C{error} event, a failed response's), in place without the
        upstream's address where its error names it (never in the response's output: the model's words); the event
        it makes is left in L{_shown}."""
        holder = payload.get("response") if payload["type"] == "response.failed" else payload
        if holder.__class__ is not dict:
            return
        before = holder.get("error") if holder is not payload else payload
        shown = hidden_strings(before, self._hide)
        if shown == before:
            return
        if holder is payload:
            payload.clear()
            payload.update(shown)
        else:
            payload["response"] = dict(holder, error=shown)
        data = event.find(b"data:")
        self._shown = event[:max(data, 0)] + b"data: " + jsonutil.dumps(payload) + b"\n\n"

    def finish(self):
        require_end(self._framer, self.done, "before response.completed")
