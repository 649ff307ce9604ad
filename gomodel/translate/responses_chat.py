"""The Responses API over a chat-completions upstream: requests, answers and streams.

Used for OpenAI-compatible providers that answer 404/405/501 on C{/responses},
so that a Responses client (C{client.responses.create} / C{.stream}) works
against any upstream.
"""

import re

from twisted.logger import Logger

from gomodel import jsonutil
from gomodel.accounting.tokens import tokens_by_type, total_tokens
from gomodel.anthropic.translate import ABORTED, context_overflow
from gomodel.errors import BadUpstreamResponse, InvalidRequest, quoted, shown
from gomodel.ids import new_id
from gomodel.proxy.sse import SSEFramer, StreamIncomplete, data_object, event_data, require_end
from gomodel.responses_history import unknown_item, unknown_previous

# Responses request fields with no chat-completions meaning; everything else
# unknown to us is copied (vLLM extras like top_k survive the translation).
_RESPONSES_ONLY = {"input", "instructions", "max_output_tokens", "tools", "tool_choice", "text", "reasoning",
                   "store", "previous_response_id", "background", "include", "truncation", "prompt",
                   "prompt_cache_key", "safety_identifier", "service_tier", "stream_options", "conversation",
                   "metadata", "max_tool_calls", "top_logprobs"}

# Tool choices that call no tool unless there are tools to call: said without tools (an agent between its tool
# turns), they are left out of the chat request with its C{parallel_tool_calls}, which chat upstreams refuse without
# tools (vLLM: "When using `tool_choice`, `tools` must be set."; OpenAI's both), as the Responses API takes them.
_NO_CALL = ("auto", "none", None)

# Request fields naming what a provider with a Responses API keeps for the request to bring in (their
# field, and what it holds): a chat completion would be answered without it.
_KEPT_UPSTREAM = (("conversation", "the conversation's items (chain turns with previous_response_id)"),
                  ("prompt", "the stored prompt's instructions"))


# -- request --------------------------------------------------------------------


def no_native_route(status: int, answer: bytes) -> bool:
    """Whether a native Responses create answered with C{status} and C{answer} (bytes) says the provider has no
    C{/responses}: a 405 or 501, or a 404 that is no OpenAI error envelope (FastAPI's C{{"detail": "Not Found"}});
    a 404 in the envelope is the upstream's own (vLLM's for a previous response it does not hold)."""
    if status in (405, 501):
        return True
    if status != 404:
        return False
    try:
        error = jsonutil.loads(answer).get("error")
    except (jsonutil.JSONError, AttributeError):
        error = None
    return not isinstance(error, dict)


# How long we remember that a provider has no /responses route before asking again.
NO_NATIVE_TTL = 600.0


class NativeResponses:
    """Which providers are asked for Responses natively now: one that answered it has no C{/responses}
    (L{no_native_route}) is translated to chat completions for L{NO_NATIVE_TTL} seconds, online requests and
    batch lines alike (one memory for both: a batch's lines are not each refused natively first)."""

    log = Logger()

    def __init__(self, clock):
        self._clock = clock
        self._until = {}  # provider name -> time until which we translate without asking

    def native(self, provider: str) -> bool:
        """Whether C{provider} (its name) is asked natively now."""
        return self._until.get(provider, 0) <= self._clock.seconds()

    def remember(self, provider: str):
        """C{provider} (its name) answered it has no C{/responses}: translate for a while."""
        self._until[provider] = self._clock.seconds() + NO_NATIVE_TTL
        self.log.info("provider {provider} has no native Responses API; translating to chat completions for "
                      "{ttl:.0f}s", provider=provider, ttl=NO_NATIVE_TTL)



def kept_nowhere(body: dict, why: str):
    """Refuse a Responses request C{body} naming what only a provider keeping it could bring in (L{_KEPT_UPSTREAM}),
    for a provider that does not: C{why} (what it lacks, "... to hold"); never dropped unsaid.

    @raise InvalidRequest: a 400 C{unsupported_value} naming the field.
    """
    for field, kept in _KEPT_UPSTREAM:
        if body.get(field) is not None:
            raise InvalidRequest(f"{field} is not supported by this provider: {why} {kept}.", param=field,
                                 code="unsupported_value")


def native_kept_nowhere(provider_type: str, body: dict):
    """Refuse (L{kept_nowhere}) a Responses request C{body} for a provider of C{provider_type} whose own Responses
    API holds none of what it names: vLLM's request has no conversation (it ignores one) and refuses a prompt.

    @raise InvalidRequest: a 400 C{unsupported_value} naming the field.
    """
    if provider_type == "vllm" and ("conversation" in body or "prompt" in body):
        kept_nowhere(body, "vLLM's Responses API does not hold")


def request_to_chat(body: dict, bound: str = "max_tokens") -> dict:
    """The chat-completions body for a Responses request C{body} (model already rewritten; its C{include} checked
    by its route, before any upstream: L{checked_include}), its C{max_output_tokens} as C{bound}
    (C{max_completion_tokens} for a provider whose reasoning models refuse C{max_tokens}, OpenAI's)."""
    if body.get("previous_response_id"):  # (not stored by the gateway; this provider has no Responses API to know it)
        raise unknown_previous(body["previous_response_id"])
    kept_nowhere(body, "it has no Responses API to hold")
    chat = {k: v for k, v in body.items() if k not in _RESPONSES_ONLY}
    messages = []
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        if instructions:
            messages.append({"role": "system", "content": instructions})
    elif isinstance(instructions, list):  # (input items: a developer or system message, several)
        messages.extend(_messages(instructions, "instructions"))
    elif instructions is not None:
        raise InvalidRequest("instructions must be a string or a list of input items.", param="instructions",
                             code="invalid_type")
    messages.extend(_messages(body.get("input")))
    chat["messages"] = messages
    if body.get("max_output_tokens") is not None:
        chat[bound] = body["max_output_tokens"]
    if body.get("tools"):
        if not isinstance(body["tools"], list):
            raise InvalidRequest("tools must be a list of tools.", param="tools", code="invalid_type")
        chat["tools"] = [_tool(t, i) for i, t in enumerate(body["tools"])]
    elif body.get("tool_choice") in _NO_CALL:  # (no tools to call: said of none, as chat upstreams take it)
        chat.pop("parallel_tool_calls", None)
    if "tool_choice" in body and ("tools" in chat or body["tool_choice"] not in _NO_CALL):
        _tool_choice(chat, body["tool_choice"])
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    effort = (body.get("reasoning") or {}).get("effort") if isinstance(body.get("reasoning"), dict) else None
    if effort:
        chat["reasoning_effort"] = effort
    if body.get("top_logprobs") or "message.output_text.logprobs" in (body.get("include") or ()):
        chat["logprobs"] = True
        if body.get("top_logprobs"):
            chat["top_logprobs"] = body["top_logprobs"]
    if body.get("stream") is True:
        chat["stream_options"] = {"include_usage": True}
    return chat


# What a Responses request's C{include} may name (OpenAI's, the openai SDK's C{ResponseIncludable}, in their order;
# vLLM's too): those of hosted tools and images a translated answer has none of, reasoning's encrypted content it
# cannot make, its logprobs asked of the chat upstream.
INCLUDABLE = ("file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
              "message.input_image.image_url", "computer_call_output.output.image_url",
              "code_interpreter_call.outputs", "reasoning.encrypted_content", "message.output_text.logprobs")
# OpenAI's words for a value not among them.
_NOT_INCLUDABLE = ("Invalid value: '{}'. Supported values are: "
                   + ", ".join(f"'{value}'" for value in INCLUDABLE[:-1]) + f", and '{INCLUDABLE[-1]}'.")


def checked_include(include) -> list:
    """A Responses request's C{include} (None: none), checked before any upstream, natively or translated (never
    dropped unsaid, never vLLM's own 400); a retrieve's and an input items' list's too.

    @raise InvalidRequest: it is no list of strings (C{invalid_type}), or names what OpenAI's Responses API has not
        (a typo: OpenAI's 400 C{invalid_value}, its words).
    """
    if include is None:
        return []
    if include.__class__ is not list or any(value.__class__ is not str for value in include):
        raise InvalidRequest("include must be a list of strings.", param="include", code="invalid_type")
    for value in include:
        if value not in INCLUDABLE:
            raise InvalidRequest(_NOT_INCLUDABLE.format(shown(value)), param="include", code="invalid_value")
    return include


# What L{context_overflow} makes of an upstream's words for a prompt that does not fit the model's context.
_TOO_LONG = re.compile(r"^prompt is too long: (\d+) tokens > (\d+) maximum$")
_WITH_MAX_TOKENS = re.compile(r"^input length and `max_tokens` exceed context limit: (\d+) \+ (\d+) > (\d+)")
_TRUNCATIONS = 3  # sends of a translated request with truncation "auto", the first one's included


def _fitting(message: str):
    """The share of its prompt that fits the model's context, as an upstream's error C{message} tells it (a
    prompt's tokens past the context, or past it less C{max_tokens}; a half where it counts characters), or None:
    no such error."""
    said = context_overflow(message)
    if said is None:
        return None
    found = _TOO_LONG.match(said)
    if found is not None:
        return int(found[2]) / max(int(found[1]), 1)
    found = _WITH_MAX_TOKENS.match(said)
    if found is not None:
        room = int(found[3]) - int(found[2])
        return room / max(int(found[1]), 1) if room > 0 else None
    return 0.5


def truncated(chat: dict, error, tries: int):
    """OpenAI's C{truncation: "auto"} over chat completions: C{chat} (a translated request's body, sent C{tries}
    times) without its oldest messages, so that its prompt fits the context the upstream's C{error} (an
    L{gomodel.errors.UpstreamError}: a 400 saying it does not) tells, with a tenth to spare; or None (another
    error, sent enough, or nothing left to drop). Its leading system messages (C{instructions}) and its last user
    message stay; what is kept starts at a user message (never at an answer, or at a tool's output without its
    call)."""
    if error.status != 400 or tries >= _TRUNCATIONS:
        return None
    share = _fitting(error.message)
    messages = chat.get("messages") or []
    head = 0
    while head < len(messages) and messages[head].get("role") == "system":
        head += 1
    rest = messages[head:]
    users = [at for at, message in enumerate(rest) if message.get("role") == "user"]
    if share is None or not users:
        return None
    sizes = [len(jsonutil.dumps(message)) for message in messages]
    room = sum(sizes) * share * 0.9 - sum(sizes[:head])
    kept, drop = sum(sizes[head:]), 0
    while drop < users[-1] and (drop == 0 or kept > room or rest[drop].get("role") != "user"):
        kept -= sizes[head + drop]
        drop += 1
    if drop == 0 or rest[drop].get("role") != "user":
        return None
    return dict(chat, messages=messages[:head] + rest[drop:])


def _messages(items, param="input"):
    """The chat messages of Responses input C{items} (C{param}: the request field they came in)."""
    if items is None:
        return []
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise InvalidRequest("input must be a string or a list of items.", param="input", code="invalid_type")
    messages = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidRequest(f"invalid input item at index {index}: expected an object.", param=param,
                                 code="invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role", "user")
            role = "system" if role == "developer" else role
            messages.append({"role": role, "content": _content(item.get("content"), index, param)})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id") or new_id("call"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant":  # (the same turn: its text, or its other calls)
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not item.get("call_id"):
                raise InvalidRequest(f"invalid input item at index {index}: function_call_output needs call_id.",
                                     param=param, code="missing_required_parameter")
            output = item.get("output")
            if isinstance(output, list):  # content parts (input_text, input_image)
                output = _content(output, index, param)
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": output if isinstance(output, (str, list)) else jsonutil.dumps(output).decode()})
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":  # (one of the conversation continued was resolved: L{with_history})
            raise unknown_item(item.get("id"), index)
        else:
            raise InvalidRequest(f"invalid input item at index {index}: type {quoted(kind)} is not supported "
                                 "by this provider.", param=param, code="unsupported_value")
    return messages


def _content(content, index, param="input"):
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidRequest(f"invalid input item at index {index}: content must be a string or a list.",
                             param=param, code="invalid_type")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal"):
            field = "refusal" if kind == "refusal" else "text"
            text = part.get(field, "")
            if not isinstance(text, str):
                raise InvalidRequest(f"invalid input item at index {index}: the {field} of a {kind} part must be "
                                     "a string.", param=param, code="invalid_type")
            parts.append({"type": "text", "text": text})
        elif kind == "input_image":
            url = part.get("image_url") or part.get("url")
            if url is None:  # (a file_id: only the provider holding the file could read it)
                raise InvalidRequest(f"invalid input item at index {index}: an input_image needs an image_url "
                                     "here (file_id is not supported by this provider).", param=param,
                                     code="unsupported_value")
            if not isinstance(url, str):
                raise InvalidRequest(f"invalid input item at index {index}: the image_url of an input_image must "
                                     "be a string.", param=param, code="invalid_type")
            image = {"url": url}
            if part.get("detail"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise InvalidRequest(f"invalid input item at index {index}: content part {quoted(kind)} is not supported "
                                 "by this provider.", param=param, code="unsupported_value")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _tool(tool, index):
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise InvalidRequest(f"tools[{index}]: tool type {quoted(kind)} is not supported by this provider.",
                             param=f"tools[{index}]", code="unsupported_value")
    if "function" in tool:  # already chat-shaped
        return tool
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": function}


def _tool_choice(chat, choice):
    """Set C{chat}'s C{tool_choice} (its C{tools} already translated) for a Responses C{choice}: a mode as it is, a
    function by its name (a chat-shaped one as it is); C{allowed_tools} (its C{mode}, among the tools it names: no
    chat form vLLM takes) as those tools alone offered in that mode.

    @raise InvalidRequest: a hosted tool's choice (C{web_search_preview}, C{mcp}, ...), which no chat upstream has,
        or an C{allowed_tools} naming no function the request gives.
    """
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function":  # (one already chat-shaped, naming its C{function}, as it is)
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}} if "name" in choice \
            else choice
    elif kind == "allowed_tools":
        named = {tool.get("name") for tool in choice.get("tools") or () if isinstance(tool, dict)}
        offered = [tool for tool in chat.get("tools") or () if (tool.get("function") or {}).get("name") in named]
        if not offered:
            raise InvalidRequest("tool_choice: allowed_tools names none of the request's function tools.",
                                 param="tool_choice", code="invalid_value")
        chat["tools"], chat["tool_choice"] = offered, choice.get("mode", "auto")
    elif kind is not None:
        raise InvalidRequest(f"tool_choice: type {quoted(kind)} is not supported by this provider.",
                             param="tool_choice", code="unsupported_value")
    else:
        chat["tool_choice"] = choice


# -- answer ---------------------------------------------------------------------


def _usage(usage):
    """The Responses API's usage object for a chat usage object (None for none); a count that is no count
    (a string, a negative, an object where a number goes) is 0, as the usage ledger reads it."""
    if not isinstance(usage, dict):
        return None
    prompt, completion, cached, reasoning = tokens = tokens_by_type(usage)
    return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": total_tokens(usage, tokens),
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens_details": {"reasoning_tokens": reasoning}}


# Request settings a response object names as they came (null where not sent).
_ECHOED = ("user", "safety_identifier", "prompt_cache_key", "max_tool_calls", "top_logprobs")

# A chat finish_reason of an answer cut short -> the Responses API's incomplete_details.reason.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def response_object(request: dict, response_id, created_at, model, status, output, usage=None,
                    finish_reason=None, background=False) -> dict:
    """A Responses API response object, echoing the request's settings as OpenAI does.

    C{request["store"]} says whether the gateway keeps it, and
    C{request["previous_response_id"]} which response it follows; C{background}, whether it is made in the
    background (so is one whose C{request} asked for it: translated, it is answered once done, a background
    response over).
    """
    incomplete = {"reason": _INCOMPLETE[finish_reason]} if finish_reason in _INCOMPLETE else None
    text = request.get("text") if isinstance(request.get("text"), dict) else {"format": {"type": "text"}}
    reasoning = request.get("reasoning") if isinstance(request.get("reasoning"), dict) else {}
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status,
        "background": background or request.get("background") is True, "error": None, "incomplete_details": incomplete,
        "instructions": request.get("instructions"), "max_output_tokens": request.get("max_output_tokens"),
        "model": model, "output": output, "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": request.get("previous_response_id"), "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "store": request.get("store") is True, "temperature": request.get("temperature"), "text": text,
        "tool_choice": request.get("tool_choice", "auto"), "tools": request.get("tools") or [],
        "top_p": request.get("top_p"), "truncation": "auto" if request.get("truncation") == "auto" else "disabled",
        "usage": usage,
        "metadata": request.get("metadata") or {},
        # (settings without a chat meaning, echoed as OpenAI's and vLLM's own response objects echo them)
        **{name: request.get(name) for name in _ECHOED},
    }


def _status(finish_reason):
    return "incomplete" if finish_reason in _INCOMPLETE else "completed"


def _aborted(finish_reason) -> str:
    return f"upstream ended the generation with finish_reason '{finish_reason}': the answer is not whole"


def _chat_choice(chat_body: bytes):
    """C{(chat, choice)}: a whole chat-completions answer and its first choice.

    @raise ValueError: C{chat_body} is no JSON (L{jsonutil.JSONError}), or no chat completion with a choice
        (an error sent with a 200).
    @raise BadUpstreamResponse: the generation was aborted (L{ABORTED}): no status would say it is not whole.
    """
    chat = jsonutil.loads(chat_body)
    choices = chat.get("choices") if isinstance(chat, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("the chat completion has no choice")
    choice = choices[0]
    if choice.get("finish_reason") in ABORTED:
        raise BadUpstreamResponse(f"The {_aborted(choice['finish_reason'])}.")
    return chat, choice


def chat_to_response(chat_body: bytes, request: dict, now: int) -> bytes:
    """The Responses answer (JSON bytes) for a chat-completions answer, made at C{now} (Unix seconds).

    @raise ValueError: see L{_chat_choice}; or L{BadUpstreamResponse}.
    """
    chat, choice = _chat_choice(chat_body)
    message = choice.get("message") or {}
    output = []
    reasoning = _reasoning_of(message)
    if reasoning:
        output.append({"type": "reasoning", "id": new_id("rs"), "summary": [],
                       "content": [{"type": "reasoning_text", "text": reasoning}]})
    parts = []
    if message.get("content"):
        parts.append({"type": "output_text", "text": message["content"], "annotations": [],
                      "logprobs": _logprobs(choice.get("logprobs"))})
    if message.get("refusal").__class__ is str and message["refusal"]:  # (the model declined: OpenAI's refusal part)
        parts.append({"type": "refusal", "refusal": message["refusal"]})
    if parts:
        output.append({"type": "message", "id": new_id("msg"), "status": "completed", "role": "assistant",
                       "content": parts})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        output.append({"type": "function_call", "id": new_id("fc"), "call_id": call.get("id") or new_id("call"),
                       "name": function.get("name"), "arguments": function.get("arguments") or "",
                       "status": "completed"})
    finish = choice.get("finish_reason")
    return jsonutil.dumps(response_object(
        request, new_id("resp"), now, chat.get("model"),
        _status(finish), output, _usage(chat.get("usage")), finish))


# -- stream ---------------------------------------------------------------------


class ChatToResponsesStream:
    """Turns a chat-completions SSE stream into the Responses API's typed events.

    An observer for L{gomodel.proxy.relay.StreamRelay}: C{feed} takes
    upstream bytes and returns the events to send.
    """

    def __init__(self, request: dict, clock, hide=None):
        """
        @param hide: a function of an in-band error's message giving it as the client may see it (the
            upstream's address hidden: L{gomodel.upstream.errors.without_address}), or None.
        """
        self._request = request
        self._hide = hide
        self._framer = SSEFramer()
        self._sequence = 0
        self._sent = 0  # the sequence number after the last event feed returned (L{next_sequence})
        self._id = new_id("resp")
        self._created = int(clock.seconds())
        self._model = None
        self._started = False
        self._items = []  # output items in order, each a dict we keep completing
        # the one item open at a time (each ended before the next begins, L{_close}):
        self._reasoning = None  # (index, item) of the open reasoning item
        self._message = None  # (index, item) of the open message
        self._call = None  # (index, item) of the open function call
        self._text_at = None  # the content index of its output_text part, once it has one
        self._refusal_at = None  # the content index of its refusal part, once it has one
        self._calls = {}  # chat tool-call index (or ("id", id), L{_at_index}) -> (output index, item)
        self._at_index = {}  # chat tool-call index -> the key of the last call begun there, where not the index
        self._given = {}  # the key of a call -> the upstream's id for it, or None
        self._finish = None
        self.usage = None
        self.done = False
        self.error = None  # the upstream's in-band error, as the client's error event tells it: the stream's end
        self.response = None  # the final response object, once completed
        self.events = 0  # upstream chunks with content (about one token each), for an estimate

    def _event(self, kind, **fields) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + jsonutil.dumps(payload) + b"\n\n"

    def next_sequence(self) -> int:
        """The C{sequence_number} after the last event relayed."""
        return self._sent

    def _snapshot(self, status, usage=None):
        return response_object(self._request, self._id, self._created, self._model, status,
                               list(self._items), usage, self._finish if status != "in_progress" else None)

    def feed(self, data: bytes) -> bytes:
        out = []
        for event in self._framer.feed(data):
            if self.done:  # (the stream ended at its response.completed or error event: nothing after it is told)
                break
            payload = event_data(event)
            if not payload or payload == b"[DONE]":
                if payload == b"[DONE]":
                    out.append(self._complete())
                continue
            chunk = data_object(payload)
            if isinstance(chunk.get("error"), (dict, str)):
                out.append(self._failed(chunk["error"]))
                continue
            self._model = self._model or chunk.get("model")
            if not self._started:
                self._started = True
                out.append(self._event("response.created", response=self._snapshot("in_progress")))
                out.append(self._event("response.in_progress", response=self._snapshot("in_progress")))
            if isinstance(chunk.get("usage"), dict):
                self.usage = _usage(chunk["usage"])
            for choice in chunk.get("choices") or []:
                if choice.get("index", 0) != 0:
                    continue
                told = self._delta(choice.get("delta") or {}, choice.get("logprobs"))
                if told:
                    self.events += 1
                    out.extend(told)
                if choice.get("finish_reason"):
                    self._finish = choice["finish_reason"]
        self._sent = self._sequence
        return b"".join(out)

    def made(self):
        """The response as far as the stream went (C{in_progress}), or None where it had not begun."""
        return self._snapshot("in_progress", self.usage) if self._started else None

    def whole(self, chat_body: bytes) -> bytes:
        """All the events of the stream, for a whole chat answer (an upstream that answered the stream whole).

        @raise ValueError: see L{_chat_choice}; or L{BadUpstreamResponse}.
        """
        chat, choice = _chat_choice(chat_body)
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        calls = message.get("tool_calls") or []
        delta = {"content": message.get("content"), "reasoning": _reasoning_of(message),
                 "refusal": message.get("refusal"),
                 "tool_calls": [dict(call, index=i) for i, call in enumerate(calls) if isinstance(call, dict)]}
        chunk = {"model": chat.get("model"), "usage": chat.get("usage"),
                 "choices": [{"index": 0, "delta": delta, "finish_reason": choice.get("finish_reason"),
                              "logprobs": choice.get("logprobs")}]}
        return self.feed(b"data: " + jsonutil.dumps(chunk) + b"\n\ndata: [DONE]\n\n")

    def _think(self, text) -> list:
        """The events of a reasoning delta C{text}: the reasoning item's, opened at its first."""
        if text.__class__ is not str:
            return []
        out = []
        if self._reasoning is None:
            self._close(out)
            item = {"type": "reasoning", "id": new_id("rs"), "summary": [], "content": [], "status": "in_progress"}
            self._items.append(item)
            self._reasoning = (len(self._items) - 1, item)
            out.append(self._event("response.output_item.added", output_index=self._reasoning[0], item=item))
            part = {"type": "reasoning_text", "text": ""}
            out.append(self._event("response.content_part.added", item_id=item["id"],
                                   output_index=self._reasoning[0], content_index=0, part=part))
            item["content"].append(dict(part))
        index, item = self._reasoning
        item["content"][0]["text"] += text
        out.append(self._event("response.reasoning_text.delta", item_id=item["id"], output_index=index,
                               content_index=0, delta=text))
        return out

    def _failed(self, error) -> bytes:
        """The C{error} event (OpenAI's C{ResponseErrorEvent}) for an upstream's in-band C{error}, which ends the
        stream (as an error event ends every route's: logged as the upstream's error, its replica not held)."""
        message = str(_message_of(error)) or "The upstream failed while streaming."
        code = error.get("code") if isinstance(error, dict) else None
        self.error = {"code": code if isinstance(code, str) and code else "server_error",
                      "message": message if self._hide is None else self._hide(message),
                      "param": error.get("param") if isinstance(error, dict) else None}
        self.done = True
        return self._event("error", **self.error)

    def _delta(self, delta, logprobs=None):
        thought = delta.get("reasoning") or delta.get("reasoning_content")
        out = self._think(thought) if thought else []
        text = delta.get("content")
        if text:
            if self._text_at is None:
                self._text_at = self._part({"type": "output_text", "text": "", "annotations": [], "logprobs": []}, out)
            index, item = self._message
            part = item["content"][self._text_at]
            part["text"] += text
            logprobs = _logprobs(logprobs) if logprobs else []
            part["logprobs"] += logprobs
            out.append(self._event("response.output_text.delta", item_id=item["id"], output_index=index,
                                   content_index=self._text_at, delta=text, logprobs=logprobs))
        refusal = delta.get("refusal")
        if refusal and refusal.__class__ is str:  # (the model declined: OpenAI's refusal part and events)
            if self._refusal_at is None:
                self._refusal_at = self._part({"type": "refusal", "refusal": ""}, out)
            index, item = self._message
            item["content"][self._refusal_at]["refusal"] += refusal
            out.append(self._event("response.refusal.delta", item_id=item["id"], output_index=index,
                                   content_index=self._refusal_at, delta=refusal))
        for call in delta.get("tool_calls") or []:
            index = call.get("index", 0)
            key = self._at_index.get(index, index)
            function = call.get("function") or {}
            given = call.get("id") or None
            if key in self._calls and given is not None and function.get("name") and \
                    self._given.get(key) not in (None, given):
                # another call named at an index in use (Ollama, Grok: every call of a turn at index 0), not a
                # fragment of the last (which names no function, whatever id a server puts on it)
                key = self._at_index[index] = ("id", given)
            if key not in self._calls:
                self._close(out)
                item = {"type": "function_call", "id": new_id("fc"), "call_id": given or new_id("call"),
                        "name": function.get("name") or "", "arguments": "", "status": "in_progress"}
                self._items.append(item)
                self._calls[key] = self._call = (len(self._items) - 1, item)
                self._given[key] = given
                out.append(self._event("response.output_item.added", output_index=len(self._items) - 1, item=item))
            index, item = self._calls[key]
            if function.get("name") and not item["name"]:
                item["name"] = function["name"]
            if function.get("arguments"):
                item["arguments"] += function["arguments"]
                out.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                       output_index=index, delta=function["arguments"]))
        return out

    def _part(self, part, out) -> int:
        """Add C{part} (empty) to the message item, opening the item at its first part; return its content index."""
        if self._message is None:
            self._close(out)
            item = {"type": "message", "id": new_id("msg"), "status": "in_progress", "role": "assistant",
                    "content": []}
            self._items.append(item)
            self._message = (len(self._items) - 1, item)
            out.append(self._event("response.output_item.added", output_index=self._message[0], item=item))
        index, item = self._message
        at = len(item["content"])
        out.append(self._event("response.content_part.added", item_id=item["id"], output_index=index,
                               content_index=at, part=part))
        item["content"].append(dict(part))
        return at

    def _close(self, out):
        """End the open item, if any, into C{out}: its parts' done events, then its own (OpenAI's and vLLM's streams
        end each item before the next begins). A reasoning or text coming after is an item of its own; a fragment of
        an ended call still goes on with it (no chat upstream sends one)."""
        if self._reasoning is not None:
            (index, item), self._reasoning = self._reasoning, None
            part = item["content"][0]
            out.append(self._event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                   content_index=0, text=part["text"]))
            out.append(self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                   content_index=0, part=part))
        elif self._message is not None:
            (index, item), self._message = self._message, None
            self._text_at = self._refusal_at = None
            for at, part in enumerate(item["content"]):
                if part["type"] == "refusal":
                    out.append(self._event("response.refusal.done", item_id=item["id"], output_index=index,
                                           content_index=at, refusal=part["refusal"]))
                else:
                    out.append(self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                           content_index=at, text=part["text"], logprobs=part["logprobs"]))
                out.append(self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                       content_index=at, part=part))
        elif self._call is not None:
            (index, item), self._call = self._call, None
            out.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                   output_index=index, arguments=item["arguments"], name=item["name"]))
        else:
            return
        item["status"] = "completed"
        out.append(self._event("response.output_item.done", output_index=index, item=item))

    def _complete(self) -> bytes:
        """The events that end the response at C{[DONE]}.

        @raise StreamIncomplete: the generation was aborted (L{ABORTED}): the client gets an error, never
            C{response.completed}.
        """
        if self.done:
            return b""
        if self._finish in ABORTED:
            raise StreamIncomplete(f"the {_aborted(self._finish)}")
        self.done = True
        out = []
        if not self._started:
            self._started = True
            out.append(self._event("response.created", response=self._snapshot("in_progress")))
        self._close(out)
        # Always response.completed (with status "incomplete" where it stopped
        # at max tokens or was filtered), as vLLM's own stream does: the openai SDK's stream
        # helper needs it to hand out the final response.
        self.response = self._snapshot(_status(self._finish), self.usage)
        out.append(self._event("response.completed", response=self.response))
        return b"".join(out)

    def finish(self):
        require_end(self._framer, self.done, "without [DONE]")


def _logprobs(logprobs) -> list:
    """The Responses API's logprobs of an output text for a chat choice's C{logprobs} (the same entries: token,
    logprob, bytes, top_logprobs), or none."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    return content if isinstance(content, list) else []


def _reasoning_of(message):
    """A chat message's (or delta's) reasoning text: vLLM's C{reasoning}, or the older C{reasoning_content}."""
    return message.get("reasoning") or message.get("reasoning_content")


def _message_of(error):
    return error.get("message", "") if isinstance(error, dict) else str(error)
