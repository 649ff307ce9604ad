"""What a native Responses stream made before it ended early: its events folded into a response's output.

A stored stream's reads are held as they came (nothing parsed while it runs, L{PartialStream.add}); only a
stream that ends before its final event, or one long enough to fold as it goes, is read into the output items
it made so far, text and function call arguments as far as they went.
"""

from gomodel.proxy.sse import SSEFramer, event_object

# The reads held before they are folded (a long stream's: its memory stays bounded).
FOLD_BYTES = 1 << 20

# A delta event's type -> the field of its item (C{None}) or content part (C{"part"}) it adds to.
_DELTAS = {"response.output_text.delta": ("part", "text"), "response.refusal.delta": ("part", "refusal"),
           "response.reasoning_text.delta": ("part", "text"),
           "response.function_call_arguments.delta": (None, "arguments")}


class PartialStream:
    """The events of one native Responses stream, folded into output items once asked (L{output})."""

    def __init__(self):
        self._framer = SSEFramer()
        self._reads = []
        self._held = 0
        self._began = None  # the response object of its first event carrying one
        self._items = {}  # output_index -> the item as far as it went
        self._texts = {}  # (output_index, content_index or None, field) -> the pieces of its text so far

    def add(self, data: bytes):
        """Hold C{data}, read as relayed (whole events or not); folded once L{FOLD_BYTES} are held."""
        self._reads.append(data)
        self._held += len(data)
        if self._held >= FOLD_BYTES:
            self._fold()

    def response(self):
        """The response object the stream began with (C{response.created}'s), its output as far as the stream went
        (L{output}); None where no event carried one."""
        self._fold()
        return None if self._began is None else dict(self._began, output=self.output())

    def output(self) -> list:
        """The output items made so far, in their order (those the stream said were done as it said them)."""
        self._fold()
        items = []
        for index in sorted(self._items):
            item = dict(self._items[index])
            content = item.get("content")
            if content.__class__ is list:
                item["content"] = [self._text_of(dict(part), index, at) if part.__class__ is dict else part
                                   for at, part in enumerate(content)]
            items.append(self._text_of(item, index, None))
        return items

    def _text_of(self, holder: dict, index, at) -> dict:
        """C{holder} (an item, or its content part C{at}) with the text its deltas made."""
        for field in ("text", "refusal", "arguments"):
            pieces = self._texts.get((index, at, field))
            if pieces:
                holder[field] = (holder.get(field) if holder.get(field).__class__ is str else "") + "".join(pieces)
        return holder

    def _fold(self):
        reads, self._reads, self._held = self._reads, [], 0
        for data in reads:
            for event in self._framer.feed(data):
                payload = event_object(event)
                if payload is not None:
                    self._observe(payload)

    def _observe(self, payload: dict):
        kind = payload.get("type")
        if self._began is None and payload.get("response").__class__ is dict:
            response = payload["response"]
            if response.get("id").__class__ is str:
                self._began = response
            return
        index = payload.get("output_index")
        if index.__class__ is not int:
            return
        delta = _DELTAS.get(kind)
        if delta is not None:
            if payload.get("delta").__class__ is str:
                at = payload.get("content_index") if delta[0] == "part" else None
                self._texts.setdefault((index, at, delta[1]), []).append(payload["delta"])
            return
        if kind in ("response.output_item.added", "response.output_item.done"):
            item = payload.get("item")
            if item.__class__ is dict:
                self._items[index] = item
                self._forget(index, None)
        elif kind in ("response.content_part.added", "response.content_part.done"):
            item, at, part = self._items.get(index), payload.get("content_index"), payload.get("part")
            if item is None or at.__class__ is not int or part.__class__ is not dict:
                return
            content = list(item.get("content") or []) if item.get("content").__class__ is list else []
            content += [None] * (at + 1 - len(content))
            content[at] = part
            self._items[index] = dict(item, content=content)
            self._forget(index, at)

    def _forget(self, index, at):
        """Drop the deltas an event's whole item (C{at} None), or its content part C{at}, now holds."""
        for key in [key for key in self._texts if key[0] == index and (at is None or key[1] == at)]:
            del self._texts[key]
