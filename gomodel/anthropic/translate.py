"""Anthropic's Messages API over a chat-completions upstream: requests, answers, streams, errors.

For providers with no C{/v1/messages} of their own (the OpenAI-compatible
family, or a vLLM server that does not serve it), a Messages request becomes
a chat-completions request, and the chat answer or stream becomes Anthropic's
answer or event stream. vLLM's own translation (its
C{vllm/entrypoints/anthropic/serving.py}) is the reference; where it is
followed, the comments say so.

Usage is reported in Anthropic's naming and meaning: C{input_tokens} are the
prompt tokens I{not} read from a cache, so that C{input_tokens +
cache_read_input_tokens + cache_creation_input_tokens} is the chat answer's
C{prompt_tokens} (Anthropic's definition, which vLLM's endpoint follows too).

Stream events are framed as Anthropic frames them, byte for byte:
C{event: <type>\\ndata: <compact JSON>\\n\\n}, the JSON's C{type} first.
"""

import base64
import binascii
import hashlib
import re

from zope.interface import implementer

from gomodel import jsonutil
from gomodel.config.catalog import FEWEST_STOPS
from gomodel.errors import BadUpstreamResponse, InvalidRequest, quoted
from gomodel.http.render import AnthropicDialect
from gomodel.ids import new_id, random_hex
from gomodel.interfaces import IStreamObserver
from gomodel.proxy.sse import SSEFramer, data_object, event_data, event_object, mentions, require_end

# Claude Code's first system block carries a per-request hash; dropping it keeps
# the prompt prefix stable for the upstream's prefix cache (vLLM does the same).
_BILLING_HEADER = "x-anthropic-billing-header"

# System text blocks are joined with a blank line between them.
_SYSTEM_JOINER = "\n\n"

# vLLM's finish reasons of a generation it did not finish (aborted, or failed in the engine).
ABORTED = ("abort", "error")
# finish_reason -> stop_reason, where no stop string or tool call decides it.
_STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                 "content_filter": "refusal"}


def message_id(chat_id) -> str:
    """The Messages id (C{msg_...}) for a chat completion's id (C{chatcmpl-...}); a new one without it."""
    if not isinstance(chat_id, str) or not chat_id:
        return new_id("msg")
    if chat_id.startswith("msg_"):
        return chat_id
    core = chat_id[len("chatcmpl-"):] if chat_id.startswith("chatcmpl-") else chat_id
    return "msg_" + (core or random_hex())


# -- request --------------------------------------------------------------------


def messages_to_chat(body: dict) -> dict:
    """The chat-completions request for a Messages request C{body} (its C{model} kept as given), for any
    upstream: a vLLM's also takes L{vllm_fields} (an OpenAI-compatible server refuses or misreads them).

    @raise InvalidRequest: C{body} is not a valid Messages request (no
        C{messages} list, no C{max_tokens}, an unknown block type...), or
        asks for what no chat-completions upstream can do (server tools, the MCP
        connector, PDF documents).
    """
    _require_object(body)
    max_tokens = checked_max_tokens(body)
    check_sampling(body)
    chat = {"model": body.get("model"), "messages": _chat_messages(body), "max_tokens": max_tokens}
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("stop_sequences: Input should be a list of strings", param="stop_sequences")
        for sequence in stop:  # (Anthropic's 400s, word for word: the first such in the list named)
            if not sequence or sequence.isspace():
                raise InvalidRequest("stop_sequences: each stop sequence must " + (
                    "contain non-whitespace" if sequence else "be non-empty"), param="stop_sequences")
        if stop:
            chat["stop"] = stop
    for name in _SAMPLING:
        if body.get(name) is not None:
            chat[name] = body[name]
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = _chat_user(metadata["user_id"])
    check_tool_names(body)
    tools = _tools(_resolved_tools(body))
    if tools:
        chat["tools"] = tools
    refuse_server_side(body)
    check_tool_choice_and_metadata(body)
    if tools and body.get("tool_choice") is not None:  # (chat upstreams refuse one without tools: auto or none here)
        chat.update(_tool_choice(body["tool_choice"]))
    kwargs = _template_kwargs(body, max_tokens)
    if kwargs:
        chat["chat_template_kwargs"] = kwargs
    chat.update(_output_config(body))
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def unsent_stops(body: dict) -> list | None:
    """The stop sequences of the Messages request C{body} past the L{FEWEST_STOPS} that every provider type takes
    (each is sent as many as it takes, its configured C{max_stop_sequences} or its type's
    L{gomodel.config.catalog.ProviderType.max_stops}: L{gomodel.api.messages.chat_for}; Anthropic takes more), which the translated answer is watched for
    (L{first_stop}), whichever target gives it (one that was sent a sequence stops before it: the answer
    does not hold it): None where there are none (an empty one, which would end every answer at once, is none)."""
    stop = body.get("stop_sequences")
    if not isinstance(stop, list) or len(stop) <= FEWEST_STOPS:
        return None
    return [s for s in stop[FEWEST_STOPS:] if isinstance(s, str) and s] or None


def first_stop(text: str, stops: list) -> tuple:
    """C{(at, sequence)}: where in C{text} the first of C{stops} begins (the first listed of those that begin
    there), and which; C{(None, None)} where none is in it."""
    at, which = None, None
    for sequence in stops:
        found = text.find(sequence)
        if found >= 0 and (at is None or found < at):
            at, which = found, sequence
    return at, which


def checked_max_tokens(body: dict) -> int:
    """The C{max_tokens} of the Messages request C{body}, which every create needs (natively too: the gateway's 400
    in Anthropic's words, not vLLM's validation error).

    @raise InvalidRequest: it is missing, no integer, or below 1.
    """
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise InvalidRequest("max_tokens: Field required", param="max_tokens")
    if not _is_int(max_tokens):
        raise InvalidRequest("max_tokens: Input should be a valid integer", param="max_tokens")
    if max_tokens < 1:
        raise InvalidRequest("max_tokens: Input should be greater than or equal to 1", param="max_tokens")
    return max_tokens


# Anthropic's sampling fields, each a number from 0 to 1.
_SAMPLING = ("temperature", "top_p")


def check_sampling(body: dict):
    """Refuse a Messages request C{body} whose C{temperature} or C{top_p} is outside Anthropic's bounds, 0 to 1
    (natively too: vLLM would sample with it; an OpenAI-compatible provider takes a temperature up to 2 as its own).

    @raise InvalidRequest: either is no number, or is outside them.
    """
    for name in _SAMPLING:
        value = body.get(name)
        if value is None:
            continue
        if value.__class__ not in (int, float):
            raise InvalidRequest(f"{name}: Input should be a valid number", param=name)
        if value < 0:
            raise InvalidRequest(f"{name}: Input should be greater than or equal to 0", param=name)
        if value > 1:
            raise InvalidRequest(f"{name}: Input should be less than or equal to 1", param=name)


# The fields L{check_options}' checks read: a body that sends none of them passes them all.
_CHECKED_FIELDS = frozenset((*_SAMPLING, "tools", "mcp_servers", "container", "metadata", "tool_choice", "thinking"))


def check_create(body: dict, walked=None) -> bool:
    """Check a Messages create C{body} as Anthropic does before anything is sent (natively too), in one order for an
    online create and a message batch's line, so that of several faults both name the same: its C{max_tokens}
    (L{checked_max_tokens}), its C{messages} (L{checked_messages}), then its optional fields (L{check_options}).

    @param walked: as L{check_tool_choice_and_metadata}'s.
    @return: whether it asks for its thinking blocks without their text (L{omits_thinking}).
    @raise InvalidRequest: as the first of those that fails.
    """
    max_tokens = checked_max_tokens(body)
    checked_messages(body)
    return check_options(body, walked, max_tokens=max_tokens)


# The fields of a create that Anthropic's count_tokens does not take: its 400 names the first sent (its schema
# forbids any field it lacks, "<field>: Extra inputs are not permitted"). Claude Code's counts send none of them.
_CREATE_ONLY = frozenset(("max_tokens", "stream", "stop_sequences", "temperature", "top_p", "top_k", "metadata",
                          "service_tier"))


def check_count(body: dict, walked=None):
    """Check a Messages C{count_tokens} request C{body} as L{check_create} checks a create, in its order, less what
    C{count_tokens} has not: its C{messages}, then that it sends no field of a create alone (L{_CREATE_ONLY}:
    C{max_tokens}, C{stream}, the sampling...), then its optional fields; so that of several faults both name the
    same first.

    @param walked: as L{check_tool_choice_and_metadata}'s.
    @raise InvalidRequest: as the first of those that fails (a create's field: Anthropic's C{"max_tokens: Extra
        inputs are not permitted"}, naming it).
    """
    checked_messages(body)
    if not _CREATE_ONLY.isdisjoint(body.keys()):
        name = next(name for name in body if name in _CREATE_ONLY)
        raise InvalidRequest(f"{name}: Extra inputs are not permitted", param=name)
    check_options(body, walked)


def check_options(body: dict, walked=None, max_tokens=None) -> bool:
    """Check the optional fields of a Messages create C{body} (natively too): L{check_sampling},
    L{check_tool_names}, L{refuse_server_side}, L{check_tool_choice_and_metadata}, L{thinking_kind}, in that order; a
    body that sends none of their fields (most) passes them in one look.

    @param walked: as L{check_tool_choice_and_metadata}'s.
    @param max_tokens: the create's (its thinking budget must be below it), or None (C{count_tokens}).
    @return: whether it asks for its thinking blocks without their text (L{omits_thinking}).
    @raise InvalidRequest: as the first of those that fails, or L{omits_thinking}.
    """
    if body.keys().isdisjoint(_CHECKED_FIELDS):
        return False
    check_sampling(body)
    check_tool_names(body)
    refuse_server_side(body)
    check_tool_choice_and_metadata(body, walked)
    thinking_kind(body, max_tokens)
    return omits_thinking(body)


def check_tool_choice_and_metadata(body: dict, walked=None):
    """Refuse a Messages request C{body} whose C{tool_choice} is none of Anthropic's (L{_tool_choice}), asks for a
    tool (C{any}, C{tool}) where it has none, or names a tool that its tools (as its tool changes leave them,
    L{_resolved_tools}) do not declare, or whose C{metadata} is no object or its C{user_id} no string (null is
    none), as Anthropic does (natively too: vLLM refuses the tool choices in its own words, or takes C{any} without
    tools, and drops the metadata unread, as a translation did; translated, C{any} went as C{required}).

    @param walked: what L{gomodel.anthropic.file_sources.walk_blocks} found (its second value) where the route
        walked C{body}'s blocks: False says no system message holds a tool change, so its tools are C{tools} as
        sent, the messages not walked again; None: looked for here.
    @raise InvalidRequest: either, naming the field.
    """
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise InvalidRequest("metadata: Input should be a valid dictionary", param="metadata")
        if metadata.get("user_id") is not None and not isinstance(metadata["user_id"], str):
            raise InvalidRequest("metadata.user_id: Input should be a valid string", param="metadata.user_id")
    choice = body.get("tool_choice")
    if choice is None:
        return
    kind = _tool_choice(choice)["tool_choice"]
    if kind in ("auto", "none"):
        return
    tools = body.get("tools") if walked is False else _resolved_tools(body)
    if not tools:
        raise InvalidRequest(f"tool_choice: tool_choice of type {quoted(choice['type'])} may only be specified while "
                             "providing tools", param="tool_choice")
    if choice["type"] == "tool":
        names = {tool.get("name") for tool in tools if isinstance(tool, dict)} if isinstance(tools, list) else ()
        if choice["name"] not in names:
            raise InvalidRequest(f"tool_choice.name: tool {quoted(choice['name'])} is not one of the tools",
                                 param="tool_choice.name")


# What Anthropic takes as a client tool's name (its 400 quotes the pattern).
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,128}")


def check_tool_names(body: dict):
    """Refuse a Messages request C{body} with a client tool whose name is not 1 to 128 letters, digits, underscores or
    hyphens, or with two tools (client or server ones) of one name, as Anthropic does, natively too (vLLM takes any,
    and both; OpenAI refuses a dot in its words). A name that is no string is left to the tool's own checks.

    @raise InvalidRequest: Anthropic's 400, word for word, for the first such name, else for a name twice.
    """
    tools = body.get("tools")
    if tools.__class__ is not list:
        return
    names = []
    for i, tool in enumerate(tools):
        if tool.__class__ is not dict:
            continue
        name = tool.get("name")
        if name.__class__ is not str:
            continue
        if tool.get("type") in _CLIENT_TOOL_TYPES and _TOOL_NAME.fullmatch(name) is None:
            raise InvalidRequest(f"tools.{i}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'",
                                 param=f"tools.{i}.name")
        names.append(name)
    if len(set(names)) < len(names):
        raise InvalidRequest("tools: Tool names must be unique.", param="tools")


def refuse_server_side(body: dict):
    """Refuse what only Anthropic's servers do, which no upstream has, natively or translated (vLLM 0.32's Messages
    API drops both unread): the MCP connector (a non-empty C{mcp_servers}: Anthropic's servers call its tools), a
    code execution C{container} (its skills), and a server tool (a tool whose C{type} is other than C{custom}: vLLM
    reads one as a function tool, without its C{input_schema}). Fields that change no answer's content pass:
    C{service_tier}, C{context_management} (Claude Code sends it with every request), C{metadata}.

    @raise InvalidRequest: C{body} has any.
    """
    tools = body.get("tools")
    if tools.__class__ is list:
        for i, tool in enumerate(tools):
            if tool.__class__ is dict and tool.get("type") not in _CLIENT_TOOL_TYPES:
                raise InvalidRequest(f"tools.{i}: tool type {quoted(tool['type'])}: {_SERVER_TOOL_HINT}",
                                     param=f"tools.{i}")
    if body.get("mcp_servers"):
        raise InvalidRequest(f"mcp_servers: the MCP connector is one of the {_SERVER_TOOL_HINT}; connect the MCP "
                             "server in the client and send its tools as tools", param="mcp_servers")
    if body.get("container") is not None:
        raise InvalidRequest(f"container: code execution containers (and their skills) are for Anthropic's code "
                             f"execution tool, one of the {_SERVER_TOOL_HINT}", param="container")


# The longest chat C{user} OpenAI takes ("string too long" past it); Claude Code's C{user_id} is some 150 characters.
_USER_LIMIT = 64


def _chat_user(user_id: str) -> str:
    """The chat C{user} for Anthropic's C{metadata.user_id}: as it is up to L{_USER_LIMIT} characters, else its
    SHA-256 in hex (64 characters; the same id, the same user)."""
    if len(user_id) <= _USER_LIMIT:
        return user_id
    return hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()


def vllm_fields(body: dict, messages: list) -> dict:
    """The chat fields of a Messages request C{body} that only a vLLM upstream is sent.

    C{top_k} is a vLLM sampling extra: OpenAI refuses unknown parameters, so
    an OpenAI upstream goes without it (the request is not refused; the
    others get it: L{passed_fields}). A final
    assistant message (a prefill) is continued, not closed as a finished
    turn: C{continue_final_message} (and no generation prompt, which vLLM
    refuses with it); the answer is then the continuation alone, as
    Anthropic's is. Chat completions have no such field elsewhere: another
    upstream gets the prefill as a finished assistant turn. The client's own
    C{cache_salt} (vLLM's Messages take it natively) stays the request's, for
    the gateway's tenancy to keep or replace as on the chat route. C{thinking}'s
    C{budget_tokens} bounds the reasoning as vLLM's own Messages API has it
    bound: C{thinking_token_budget} (a vLLM without a reasoning parser refuses
    it, natively too). A stream asks for C{continuous_usage_stats} (another
    upstream may refuse it).

    @param messages: the chat messages C{body} became (L{messages_to_chat}).
    """
    fields = {}
    if body.get("top_k") is not None:
        fields["top_k"] = body["top_k"]
    if body.get("cache_salt") is not None:
        fields["cache_salt"] = body["cache_salt"]
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":  # (its budget checked: messages_to_chat)
        fields["thinking_token_budget"] = thinking["budget_tokens"]
    if _prefilled(messages):
        fields.update(_CONTINUE)
    if body.get("stream") is True:
        # vLLM's usage on every chunk, the first too: message_start gets the prompt's count without waiting.
        fields["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return fields


def passed_fields(body: dict) -> dict:
    """The fields of a Messages request C{body} that the chat route would pass on, as the client sent them, to an
    upstream other than vLLM (every one but OpenAI's: L{gomodel.api.messages.chat_for}): C{top_k}, a sampling extra
    that OpenAI-compatible servers take or ignore, and the client's own C{chat_template_kwargs} (SGLang and
    llama.cpp take them too), without C{thinking}'s C{enable_thinking}, which is vLLM's (L{without_vllm_fields})."""
    fields = {}
    if body.get("top_k") is not None:
        fields["top_k"] = body["top_k"]
    if isinstance(body.get("chat_template_kwargs"), dict):  # (as L{_template_kwargs} reads them)
        fields["chat_template_kwargs"] = body["chat_template_kwargs"]
    return fields


def without_vllm_fields(chat: dict, reasoning: bool = False, effort: bool = False) -> dict:
    """A copy of C{chat} (L{messages_to_chat}'s) as an upstream other than vLLM takes it.

    C{chat_template_kwargs} (C{thinking}'s C{enable_thinking}; the client's own are
    L{passed_fields}) and past turns'
    thinking (an assistant message's C{reasoning_content}) are vLLM's: an
    OpenAI-compatible server may refuse what it does not know, so they are
    left out (the thinking was the model's, not the conversation's); but the
    thinking with C{reasoning}, for an upstream that takes it back (DeepSeek's
    thinking mode requires it). So is C{output_config.effort}'s
    C{reasoning_effort}: Claude Code sends one with every request, and OpenAI
    (Groq, xAI, Ollama too) refuses it for a model that does not reason (and
    every value but its own); but kept with C{effort}, for an upstream that
    takes any and ignores it for such a model (OpenRouter), where C{thinking}
    disabled is C{reasoning_effort: none} whatever the effort says (as vLLM's
    own Messages API has it).
    """
    other = dict(chat)
    kwargs = other.pop("chat_template_kwargs", None)
    if not effort:
        other.pop("reasoning_effort", None)
    elif isinstance(kwargs, dict) and kwargs.get("enable_thinking") is False:
        other["reasoning_effort"] = "none"
    messages = other["messages"]
    if not reasoning and any("reasoning_content" in message for message in messages):
        other["messages"] = [{name: value for name, value in message.items() if name != "reasoning_content"}
                             for message in messages]
    return other


# vLLM's chat-template extras that continue the final (assistant) message instead of opening a new turn.
_CONTINUE = {"continue_final_message": True, "add_generation_prompt": False}


def _prefilled(messages) -> bool:
    """Whether the chat C{messages} end with the assistant's (Anthropic's "prefill": the answer continues it)."""
    return bool(messages) and messages[-1]["role"] == "assistant"


def count_tokens_request(body: dict) -> dict:
    """The body of vLLM's C{POST /tokenize} (chat form) that counts a Messages C{count_tokens} request.

    @raise InvalidRequest: as L{messages_to_chat} (C{max_tokens} is not needed here).
    """
    _require_object(body)
    tokenize = {"model": body.get("model"), "messages": _chat_messages(body)}
    tools = _tools(_resolved_tools(body))
    if tools:
        tokenize["tools"] = tools
    kwargs = _template_kwargs(body)
    if kwargs:
        tokenize["chat_template_kwargs"] = kwargs
    if _prefilled(tokenize["messages"]):  # counted as the generation will see it (see vllm_fields)
        tokenize.update(_CONTINUE)
    else:
        tokenize["add_generation_prompt"] = True
    return tokenize


def count_tokens_answer(tokenize_answer: dict) -> dict:
    """Anthropic's C{count_tokens} answer C{{"input_tokens": n}} for vLLM's C{/tokenize} answer.

    @raise ValueError: the answer has no token count.
    """
    count = tokenize_answer.get("count") if isinstance(tokenize_answer, dict) else None
    if not _is_int(count):
        tokens = tokenize_answer.get("tokens") if isinstance(tokenize_answer, dict) else None
        if not isinstance(tokens, list):
            raise ValueError("the tokenize answer has no count")
        count = len(tokens)
    return {"input_tokens": count}


def _require_object(body):
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def checked_messages(body: dict) -> list:
    """The C{messages} of the Messages request C{body}, which every create and count needs (natively too: the
    gateway's 400 in Anthropic's words; vLLM's Messages API takes an empty list).

    @raise InvalidRequest: it is missing, no list, or empty.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages: Field required (a list of messages)" if messages is None
                             else "messages: Input should be a valid list", param="messages")
    if not messages:
        raise InvalidRequest("messages: at least one message is required", param="messages")
    return messages


def _chat_messages(body) -> list:
    """The chat messages for a request's C{system} and C{messages}: one system message first, if any."""
    messages = checked_messages(body)
    system = _system_texts(body.get("system"), "system")
    chat = []
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where}: Input should be an object", param=where)
        role = message.get("role")
        content = message.get("content")
        if role == "system":  # not Anthropic's, but vLLM takes it: merged into the one system message
            system.extend(_system_texts(content, f"{where}.content", inline=True))
        elif role == "user":
            _check_filled(content, where)
            chat.extend(_user_messages(content, where))
        elif role == "assistant":
            # (the last one, a prefill, may be empty; not blank: its own rule besides, _check_prefill)
            _check_filled(content, where, prefill=i == len(messages) - 1)
            chat.append(_assistant_message(content, where))
        else:
            raise InvalidRequest(f"{where}.role: Input should be 'user', 'assistant' or 'system'",
                                 param=f"{where}.role")
    fault = tool_pair_fault(messages)
    if fault is not None:
        raise fault
    _check_prefill(messages[-1])
    if system:
        chat.insert(0, {"role": "system", "content": _SYSTEM_JOINER.join(system)})
    return chat


def tool_pair_fault(messages):
    """Anthropic's 400 (its words) for the first of C{messages} (a Messages request's) that breaks its pairing of tool
    calls and results, else None: an assistant turn's C{tool_use} ids whose C{tool_result} blocks are not all in the
    next turn, or a user turn's C{tool_result} whose C{tool_use} is not in the turn before (the assistant's). A turn
    is a message, or consecutive messages of one role, which Anthropic combines into one; a C{system} message, or
    one that is no object, is passed over (Claude Code sends them mid-conversation); an id that is no string is left
    to its block's own checks; the last turn's calls have no next one (a prefill's). vLLM's Messages API takes
    either fault, and so does a chat template, which generates from them; an OpenAI-compatible provider refuses
    them in its words."""
    turns = []  # (role, the index of its first message, its calls' ids, its results' (where, id))
    for i, message in enumerate(messages):
        role = message.get("role") if message.__class__ is dict else None
        if role != "user" and role != "assistant":
            continue
        if not turns or turns[-1][0] != role:
            turns.append((role, i, [], []))
        _, _, calls, results = turns[-1]
        content = message.get("content")
        for j, block in enumerate(content if content.__class__ is list else ()):
            kind = block.get("type") if block.__class__ is dict else None
            if kind == "tool_use" and role == "assistant" and block.get("id").__class__ is str:
                calls.append(block["id"])
            elif kind == "tool_result" and role == "user" and block.get("tool_use_id").__class__ is str:
                results.append((f"messages.{i}.content.{j}", block["tool_use_id"]))
    asked, at = (), None
    for _, first, calls, results in turns:
        answered = {call_id for _, call_id in results}
        missing = [call_id for call_id in asked if call_id not in answered]
        if missing:
            return InvalidRequest(f"messages.{at}: `tool_use` ids were found without `tool_result` blocks immediately "
                                  f"after: {', '.join(missing)}. Each `tool_use` block must have a corresponding "
                                  "`tool_result` block in the next message.", param=f"messages.{at}")
        for where, call_id in results:
            if call_id not in asked:
                return InvalidRequest(f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: {call_id}. "
                                      "Each `tool_result` block must have a corresponding `tool_use` block in the "
                                      "previous message.", param=where)
        asked, at = calls, first
    return None


def _check_prefill(message):
    """Anthropic's rule for a final assistant message (a prefill): its text does not end with whitespace.

    @raise InvalidRequest: it does (Anthropic's own 400, word for word).
    """
    if message.get("role") != "assistant":
        return
    content = message.get("content")
    if isinstance(content, list) and content and isinstance(content[-1], dict) and content[-1].get("type") == "text":
        content = content[-1].get("text")
    if isinstance(content, str) and content and content[-1].isspace():
        raise InvalidRequest("messages: final assistant content cannot end with trailing whitespace",
                             param="messages")


# Blocks of a system message in `messages` that add or remove a tool (Anthropic's mid-conversation tool changes,
# which Claude Code sends when an MCP server connects): a chat upstream gets the tools in effect at the end.
TOOL_CHANGES = ("tool_addition", "tool_removal")


def has_tool_changes(body) -> bool:
    """Whether a system message of the Messages request C{body} holds a tool change (L{TOOL_CHANGES})."""
    messages = body.get("messages")
    return isinstance(messages, list) and any(
        isinstance(message, dict) and message.get("role") == "system" and isinstance(message.get("content"), list)
        and any(isinstance(block, dict) and block.get("type") in TOOL_CHANGES for block in message["content"])
        for message in messages)


def _resolved_tools(body):
    """C{body}'s C{tools} as its system messages' tool changes leave them at the end of the conversation, as vLLM
    0.32's own Messages API resolves them (a chat template sees one tool list): a tool removed is left out, one
    added by reference is back, one added by value (a C{tool_definition}) is declared. C{tools} itself where
    there are none.

    @raise InvalidRequest: a change names no tool, or a tool that C{tools} does not declare.
    """
    tools = body.get("tools")
    if not has_tool_changes(body):
        return tools
    _tools(tools)  # (what it declares is checked as without changes)
    declared = {tool.get("name"): tool for tool in tools or () if isinstance(tool, dict)}
    removed = set()
    for i, message in enumerate(body["messages"]):
        if not (isinstance(message, dict) and message.get("role") == "system" and isinstance(message.get("content"),
                                                                                             list)):
            continue
        for j, block in enumerate(message["content"]):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind not in TOOL_CHANGES:
                continue
            where = f"messages.{i}.content.{j}.tool"
            change = block.get("tool") if isinstance(block.get("tool"), dict) else {}
            definition = change.get("definition")
            if kind == "tool_addition" and change.get("type") == "tool_definition" and isinstance(definition, dict):
                name = definition.get("name")
                declared[name] = definition
            elif change.get("type") == "tool_reference" and isinstance(change.get("name"), str):
                name = change["name"]
                if name not in declared:
                    raise InvalidRequest(f"{where}: {kind} references tool {name!r}, which is not declared in tools",
                                         param=where)
            else:
                raise InvalidRequest(f"{where}: a tool_reference (or, to add one, a tool_definition) is required",
                                     param=where)
            if kind == "tool_removal":
                removed.add(name)
            else:
                removed.discard(name)
    return [tool for name, tool in declared.items() if name not in removed]


def _system_texts(system, where, inline=False) -> list:
    """The texts of a system prompt (C{inline}: of a system message in C{messages}, whose tool changes are
    left out), the billing header left out.

    @raise InvalidRequest: it is neither a string nor a list of text blocks (and, inline, tool changes), or (not
        inline) a text block is empty or they are all whitespace, or it is a string of nothing but whitespace (one
        text block to Anthropic: L{blank_system}) (Anthropic's 400s, word for word).
    """
    if system is None:
        return []
    if isinstance(system, str):
        if not inline and system.isspace():
            raise InvalidRequest(_SYSTEM_BLANK, param=where)
        return [system] if system else []
    if not isinstance(system, list):
        raise InvalidRequest(f"{where}: Input should be a string or a list of text blocks", param=where)
    texts = []
    for i, block in enumerate(system):
        if inline and isinstance(block, dict) and block.get("type") in TOOL_CHANGES:
            continue
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise InvalidRequest(f"{where}.{i}: system blocks must be text blocks", param=f"{where}.{i}")
        if block["text"] and not block["text"].startswith(_BILLING_HEADER):
            texts.append(block["text"])
        elif not inline and not block["text"]:  # (a system message's, vLLM's role: left out, as before)
            raise InvalidRequest("system: text content blocks must be non-empty", param=f"{where}.{i}")
    if not inline:
        blank = blank_block(system)
        if blank is not None:
            raise InvalidRequest(_SYSTEM_BLANK, param=f"{where}.{blank}")
    return texts


_SYSTEM_BLANK = "system: text content blocks must contain non-whitespace text"


def _text(block, where) -> str:
    """A block's C{text}.

    @raise InvalidRequest: it is absent, or not a string.
    """
    text = block.get("text")
    if text is None:
        raise InvalidRequest(f"{where}.text: Field required", param=f"{where}.text")
    if not isinstance(text, str):
        raise InvalidRequest(f"{where}.text: Input should be a valid string", param=f"{where}.text")
    return text


def _blocks(content, where) -> list:
    """C{content} as a list of block objects (a string is one text block).

    @raise InvalidRequest: it is no string nor list of blocks, or a block is an empty text block, or its text
        blocks are nothing but whitespace (L{blank_block}) (Anthropic's 400s, word for word: Claude Code sends an
        empty one after its tool results at times; vLLM's Messages API drops an empty one, and generates from a
        blank one).
    """
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content: Input should be a string or a list of content blocks",
                             param=f"{where}.content")
    blank = False
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise InvalidRequest(f"{where}.content.{i}: Input should be a content block with a type",
                                 param=f"{where}.content.{i}")
        if block["type"] == "text":
            text = block.get("text")
            if text == "":
                raise InvalidRequest(_EMPTY_TEXT, param=f"{where}.content.{i}")
            blank = blank or text.__class__ is str and text.isspace()
    if blank:  # (one at least: are they all?)
        at = blank_block(content)
        if at is not None:
            raise InvalidRequest(_BLANK_TEXT, param=f"{where}.content.{at}")
    return content


# Anthropic's words for a message's empty text block (a tool result's too) and for its blank ones.
_EMPTY_TEXT = "messages: text content blocks must be non-empty"
_BLANK_TEXT = "messages: text content blocks must contain non-whitespace text"


def blank_block(blocks):
    """The index of the first text block of C{blocks} (a message's content, or a system prompt's, a list) that is
    nothing but whitespace where none of its text blocks has more, else None: Anthropic refuses such a message
    ("text content blocks must contain non-whitespace text"), and takes a blank block beside a text that is more.
    (An empty text block is neither: refused on its own; so is a text block whose text is no string, first.)"""
    first = None
    for i, block in enumerate(blocks):
        if block.__class__ is dict and block.get("type") == "text":
            text = block.get("text")
            if text.__class__ is not str:
                return None
            if not text:
                continue
            if not text.isspace():
                return None
            if first is None:
                first = i
    return first


def blank_system(system) -> bool:
    """Whether a Messages request's C{system} (as sent) is what L{_system_texts} refuses as blank: a list holding an
    empty text block, or whose text blocks are nothing but whitespace (L{blank_block}); a string of nothing but
    whitespace (Anthropic reads a string as one text block: the same 400; an empty string is none)."""
    if system.__class__ is str:
        return system.isspace()
    return system.__class__ is list and (any(block.__class__ is dict and block.get("text") == "" for block in system)
                                         or blank_block(system) is not None)


# The image types Anthropic takes: a base64 image of none of them (or of none said) is its 400.
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


def refused_image(block) -> bool:
    """Whether the C{image} block C{block} has a base64 source whose C{media_type} Anthropic refuses (L{_image_url}'s
    400): none, or none of L{IMAGE_TYPES}."""
    source = block.get("source")
    return source.__class__ is dict and source.get("type") == "base64" and source.get("media_type") not in IMAGE_TYPES


def _image_url(block, where, typed=None) -> dict:
    """The chat C{image_url} part for the C{image} block C{block} at C{where}.

    @param typed: its place as Anthropic names it in its 400s (its types in the path: C{messages.2.content.0.
        tool_result.content.1}); None: C{where}.
    @raise InvalidRequest: its source is none of a base64 image's or a URL's, or lacks its data, or a base64 one has
        no media type or one Anthropic refuses (L{refused_image}: its 400, word for word).
    """
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        media = source.get("media_type")
        if media not in IMAGE_TYPES:
            raise InvalidRequest(f"{typed or where}.image.source.base64.media_type: " + (
                "Field required" if media is None else
                "Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"),
                param=f"{where}.source.media_type")
        data = _source_string(source, "data", where)
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if kind == "url":
        return {"type": "image_url", "image_url": {"url": _source_string(source, "url", where)}}
    raise InvalidRequest(f"{where}: image source type {quoted(kind)} is not supported by this provider "
                         "(use 'base64' or 'url')", param=where)


def _source_string(source, field, where) -> str:
    """The string C{source[field]} of the block at C{where}.

    @raise InvalidRequest: it is missing (or null), or no string: a 400 naming C{where.source.field}.
    """
    value = source.get(field)
    if isinstance(value, str):
        return value
    at = f"{where}.source.{field}"
    raise InvalidRequest(f"{at}: {'Field required' if value is None else 'Input should be a valid string'}", param=at)


def _document_parts(block, where) -> list:
    """The chat parts of a document (L{_source_parts}), within Anthropic's own prompt formatting of a document
    where it has a C{title} or C{context} (both of which Anthropic's model reads): C{<document>}, the title as
    its C{<source>}, the C{<context>}, then its parts in C{<document_content>}.

    @raise InvalidRequest: as L{_source_parts}; or its C{title} or C{context} is no string.
    """
    parts = _source_parts(block, where)
    head = []
    for field, tag in (("title", "source"), ("context", "context")):
        value = block.get(field)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidRequest(f"{where}.{field}: Input should be a valid string", param=f"{where}.{field}")
        head.append(f"<{tag}>{value}</{tag}>\n")
    if not head:
        return parts
    opening = "<document>\n" + "".join(head) + "<document_content>\n"
    closing = "\n</document_content>\n</document>"
    if parts and parts[0]["type"] == "text":
        parts[0] = {"type": "text", "text": opening + parts[0]["text"]}
    else:
        parts.insert(0, {"type": "text", "text": opening})
    if parts[-1]["type"] == "text":
        parts[-1] = {"type": "text", "text": parts[-1]["text"] + closing}
    else:
        parts.append({"type": "text", "text": closing})
    return parts


def _source_parts(block, where) -> list:
    """The chat parts of a document's source: its text (a C{text} source, or a C{base64} one of a C{text/*} media
    type), or the text and image parts of its blocks (a C{content} source, Anthropic's custom content: a string,
    or text and image blocks).

    @raise InvalidRequest: another source (a PDF, a file), or a block of another type in its content.
    """
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "text" and isinstance(source.get("data"), str):
        return [{"type": "text", "text": source["data"]}]
    media = source.get("media_type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(media, str) and media.startswith("text/") and isinstance(source.get("data"), str):
        return [{"type": "text", "text": _base64_text(source["data"], f"{where}.source.data")}]
    if kind == "content":
        content = source.get("content")
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        at = f"{where}.source.content"
        if not isinstance(content, list):
            raise InvalidRequest(f"{at}: Input should be a string or a list of text and image blocks", param=at)
        parts = []
        for i, item in enumerate(content):
            item_kind = item.get("type") if isinstance(item, dict) else None
            if item_kind == "text":
                parts.append({"type": "text", "text": _text(item, f"{at}.{i}")})
            elif item_kind == "image":
                parts.append(_image_url(item, f"{at}.{i}"))
            else:
                raise InvalidRequest(f"{at}.{i}: a document's content holds text and image blocks, "
                                     f"not {quoted(item_kind)}", param=f"{at}.{i}")
        return parts
    if media == "application/pdf" or kind == "url":
        raise InvalidRequest(f"{where}: PDF documents are not supported by this provider (its model reads no PDF): "
                             "send the document's text (a 'text' source) instead", param=where)
    raise InvalidRequest(f"{where}: document source type {quoted(kind)} is not supported by this provider "
                         "(only plain-text and content documents are)", param=where)


def _search_result_text(block, where) -> str:
    """A C{search_result} block (Anthropic's for RAG) as the text a chat model reads: its title, its source, then
    the texts of its content (citations are Anthropic's to make: a chat model makes none).

    @raise InvalidRequest: its C{source} or C{title} is no string, or its C{content} no list of text blocks.
    """
    for name in ("source", "title"):
        if not isinstance(block.get(name), str):
            raise InvalidRequest(f"{where}.{name}: Field required (a string)", param=f"{where}.{name}")
    content = block.get("content")
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content: Input should be a list of text blocks", param=f"{where}.content")
    texts = []
    for i, item in enumerate(content):
        if not isinstance(item, dict) or item.get("type") != "text":
            raise InvalidRequest(f"{where}.content.{i}: a search result's content holds text blocks",
                                 param=f"{where}.content.{i}")
        texts.append(_text(item, f"{where}.content.{i}"))
    return f"Search result: {block['title']}\nSource: {block['source']}\n\n" + "\n".join(texts)


def _base64_text(data, where) -> str:
    """The UTF-8 text that C{data} encodes in base64.

    @raise InvalidRequest: it is no base64, or no UTF-8 text.
    """
    try:
        return base64.b64decode(data, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}: a text/plain document's data should be UTF-8 text in base64",
                             param=where) from None


def _parts_content(parts):
    """Chat message content for C{parts}: one text part as a string, else the parts."""
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _user_messages(content, where) -> list:
    """A user turn: its tool results first (as C{tool} messages, which must follow the assistant's
    calls), then the rest of its content, and any images the tool results held, as one user message.

    @raise InvalidRequest: the turn holds an empty text block or blank ones (L{_blocks}): Anthropic's own 400s, word
        for word.
    """
    tools, parts, tool_images = [], [], []
    blocks = _blocks(content, where)
    for i, block in enumerate(blocks):
        at = f"{where}.content.{i}"
        kind = block["type"]
        if kind == "text":
            parts.append({"type": "text", "text": _text(block, at)})
        elif kind == "image":
            parts.append(_image_url(block, at))
        elif kind == "document":
            parts.extend(_document_parts(block, at))
        elif kind == "search_result":
            parts.append({"type": "text", "text": _search_result_text(block, at)})
        elif kind == "tool_result":
            message, images = _tool_result(block, at)
            tools.append(message)
            tool_images.extend(images)
        elif kind in ("tool_use", "thinking", "redacted_thinking"):
            raise InvalidRequest(f"{at}: a {kind} block belongs in an assistant message", param=at)
        else:
            raise InvalidRequest(f"{at}: unknown content block type {quoted(kind)}", param=at)
    parts = tool_images + parts
    return tools + [{"role": "user", "content": _parts_content(parts)}] if parts else tools


def _check_filled(content, where, prefill=False):
    """Anthropic's 400s, word for word, for a message that is empty (L{empty_content}: a user's, or an assistant's
    but the last, the C{prefill}, which may be) or a string of nothing but whitespace (any: one blank text block to
    Anthropic, refused as that block is, L{blank_block}, before a prefill's trailing whitespace, L{_check_prefill}).

    @raise InvalidRequest: it is.
    """
    if not prefill and empty_content(content):
        raise InvalidRequest(f"{where}: all messages must have non-empty content except for the optional "
                             "final assistant message", param=f"{where}.content")
    if content.__class__ is str and content.isspace():
        raise InvalidRequest(_BLANK_TEXT, param=f"{where}.content")


def empty_content(content) -> bool:
    """Whether C{content}, a message's, is what Anthropic refuses as empty (L{_check_filled}' 400, "all messages must
    have non-empty content ..."; a final assistant message's it takes): C{""} or C{[]}. vLLM's Messages API takes it
    (such a request goes to it translated: L{gomodel.anthropic.file_sources.walk_blocks})."""
    return (content.__class__ is str or content.__class__ is list) and not content


def _tool_result(block, where):
    """The C{tool} message for a C{tool_result} block, and the images it held (a tool message has none)."""
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest(f"{where}.tool_use_id: Field required", param=f"{where}.tool_use_id")
    content = block.get("content")
    texts, images = [], []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for i, item in enumerate(content):
            at = f"{where}.content.{i}"
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                text = _text(item, at)
                if not text:  # (Anthropic's 400 there too; a blank one it takes)
                    raise InvalidRequest(_EMPTY_TEXT, param=at)
                texts.append(text)
            elif kind == "image":
                images.append(_image_url(item, at, typed=f"{where}.tool_result.content.{i}"))
            elif kind == "document":
                for part in _document_parts(item, at):  # a tool message holds text: images go with the others
                    if part["type"] == "text":
                        texts.append(part["text"])
                    else:
                        images.append(part)
            elif kind == "tool_reference":
                texts.append(_tool_reference(item, at))
            elif kind == "search_result":
                texts.append(_search_result_text(item, at))
            else:
                raise InvalidRequest(f"{at}: content block type {quoted(kind)} is not supported in a tool result",
                                     param=at)
    elif content is not None:
        raise InvalidRequest(f"{where}.content: Input should be a string or a list of blocks",
                             param=f"{where}.content")
    text = "\n".join(texts)
    if block.get("is_error") is True:
        # Chat has no error flag on a tool message: the model reads it in the text.
        text = _errored(text)
    return {"role": "tool", "tool_call_id": call_id, "content": text}, images


def _errored(text: str) -> str:
    """The text of a failed tool's result (C{is_error}) as the model reads it."""
    return f"Error: {text}" if text else "Error"


def with_tool_errors(body: dict, errored: list) -> dict:
    """The Messages request C{body} with each C{tool_result} block at C{errored} (C{(message, block)} indexes, those
    whose C{is_error} is true: L{gomodel.anthropic.file_sources.walk_blocks}) saying it failed in its text, as the
    translation says it (L{_tool_result}): vLLM's Messages API drops C{is_error}. C{body} itself is left as it was
    (a fallback reached the other way translates it)."""
    messages = list(body["messages"])
    for i, j in errored:
        message = messages[i] = dict(messages[i])
        content = message["content"] = list(message["content"])
        block = content[j]
        value = block.get("content")
        if isinstance(value, list) and value and isinstance(value[0], dict) and value[0].get("type") == "text" \
                and isinstance(value[0].get("text"), str):
            value = [dict(value[0], text=_errored(value[0]["text"])), *value[1:]]
        elif isinstance(value, list):
            value = [{"type": "text", "text": "Error"}, *value]
        else:
            value = _errored(value if isinstance(value, str) else "")
        content[j] = dict(block, content=value)
    return dict(body, messages=messages)


def native_body(body: dict, errored: list) -> dict:
    """The Messages request C{body} as a native vLLM Messages API is sent it (a create, online or a batch line):
    its tool results at C{errored} saying they failed (L{with_tool_errors}), its older C{output_format} as
    C{output_config.format} (L{with_output_format}); C{body} itself is left as it was."""
    sent = with_tool_errors(body, errored) if errored else body
    return with_output_format(sent) if "output_format" in sent else sent


def with_output_format(body: dict) -> dict:
    """The Messages request C{body} as vLLM's Messages API reads its structured output: the older top-level
    C{output_format} (the structured outputs beta's, which vLLM 0.32 drops unread) as C{output_config.format},
    where C{output_config} has no format of its own (which comes first, as translated: L{_output_config}), its
    other fields kept; vLLM makes C{output_config.format} its chat C{response_format}. C{body} itself is left as
    it was (a fallback reached the other way translates it)."""
    sent = dict(body)
    fmt = sent.pop("output_format")
    config = sent.get("output_config")
    if not isinstance(config, dict):
        sent["output_config"] = {"format": fmt}
    elif config.get("format") is None:
        sent["output_config"] = dict(config, format=fmt)
    return sent


def _tool_reference(block, where) -> str:
    """A C{tool_reference}'s text (what a tool search, Claude Code's, answers): the tool's name.

    Anthropic loads the named tool's definition there; a chat upstream is sent every tool in effect
    (C{defer_loading} or not: L{_resolved_tools}), so the name says all.
    """
    name = block.get("tool_name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"{where}.tool_name: Field required", param=f"{where}.tool_name")
    return name


def _assistant_message(content, where) -> dict:
    parts, calls, reasoning = [], [], []
    for i, block in enumerate(_blocks(content, where)):
        at = f"{where}.content.{i}"
        kind = block["type"]
        if kind == "text":
            text = _text(block, at)
            if text:
                parts.append({"type": "text", "text": text})
        elif kind == "tool_use":
            name = block.get("name")
            if not isinstance(name, str) or not name:
                raise InvalidRequest(f"{at}.name: Field required", param=f"{at}.name")
            call_id = block.get("id") or new_id("toolu")
            if not isinstance(call_id, str):
                raise InvalidRequest(f"{at}.id: Input should be a valid string", param=f"{at}.id")
            call_input = block.get("input")
            if call_input is None:
                call_input = {}
            if not isinstance(call_input, dict):
                raise InvalidRequest(f"{at}.input: Input should be an object", param=f"{at}.input")
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": name, "arguments": jsonutil.dumps(call_input).decode()}})
        elif kind == "thinking":
            if isinstance(block.get("thinking"), str):
                reasoning.append(block["thinking"])
        elif kind == "redacted_thinking":
            continue  # opaque (encrypted by Anthropic): nothing an upstream could read
        elif kind in ("image", "document", "tool_result"):
            raise InvalidRequest(f"{at}: a {kind} block belongs in a user message", param=at)
        else:
            raise InvalidRequest(f"{at}: unknown content block type {quoted(kind)}", param=at)
    message = {"role": "assistant", "content": _parts_content(parts) if parts else (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    if reasoning:
        # vLLM's name on input (it reads "reasoning" too); earlier turns' thinking, for templates that keep it.
        message["reasoning_content"] = "".join(reasoning)
    return message


_SERVER_TOOL_HINT = "server tools (web search, code execution, computer use...) are not supported by this provider"


# The types of a tool the client runs (a server tool has another: L{refuse_server_side}).
_CLIENT_TOOL_TYPES = (None, "custom")


def _tools(tools) -> list:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise InvalidRequest("tools: Input should be a valid list", param="tools")
    chat = []
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"{where}: Input should be an object", param=where)
        if tool.get("type") not in _CLIENT_TOOL_TYPES:
            raise InvalidRequest(f"{where}: tool type {quoted(tool.get('type'))}: {_SERVER_TOOL_HINT}", param=where)
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise InvalidRequest(f"{where}.name: Field required", param=f"{where}.name")
        if not isinstance(tool.get("input_schema"), dict):
            raise InvalidRequest(f"{where}.input_schema: Field required", param=f"{where}.input_schema")
        function = {"name": tool["name"]}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        function["parameters"] = tool["input_schema"]
        if isinstance(tool.get("strict"), bool):
            function["strict"] = tool["strict"]
        chat.append({"type": "function", "function": function})
    return chat


def _tool_choice(choice) -> dict:
    """The chat fields (C{tool_choice}, C{parallel_tool_calls}) for Anthropic's C{tool_choice}."""
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool":
        if not isinstance(choice.get("name"), str) or not choice["name"]:
            raise InvalidRequest("tool_choice.name: Field required when tool_choice.type is 'tool'",
                                 param="tool_choice.name")
        fields = {"tool_choice": {"type": "function", "function": {"name": choice["name"]}}}
    elif kind in ("auto", "any", "none"):
        fields = {"tool_choice": {"auto": "auto", "any": "required", "none": "none"}[kind]}
    else:
        raise InvalidRequest(f"tool_choice.type: {quoted(kind)} is not one of 'auto', 'any', 'tool', 'none'",
                             param="tool_choice")
    if choice.get("disable_parallel_tool_use") is True:
        fields["parallel_tool_calls"] = False
    return fields


def _template_kwargs(body, max_tokens=None) -> dict:
    """vLLM's C{chat_template_kwargs}: the request's own (a vLLM extra), with C{enable_thinking} from C{thinking}
    (checked: L{thinking_kind})."""
    kwargs = dict(body["chat_template_kwargs"]) if isinstance(body.get("chat_template_kwargs"), dict) else {}
    kind = thinking_kind(body, max_tokens)
    if kind is not None:
        # budget_tokens is vLLM's thinking_token_budget (vllm_fields); max_tokens still bounds the whole answer.
        kwargs["enable_thinking"] = kind != "disabled"
    return kwargs


# Anthropic's 400 for a thinking budget that leaves no room for the answer, word for word.
_BUDGET_PAST_MAX = ("`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our documentation at "
                    "https://docs.claude.com/en/docs/build-with-claude/extended-thinking#max-tokens-and-context-window-size")


def thinking_kind(body: dict, max_tokens=None):
    """The C{thinking.type} of the Messages request C{body} (None: no thinking), checked as Anthropic checks it,
    natively too (vLLM would answer in its words, or think with the budget): an C{enabled} one's C{budget_tokens} an
    integer of at least 1024, and below C{max_tokens} where there is one (a create's; C{count_tokens} has none).

    @raise InvalidRequest: it is none of Anthropic's types, or its budget is not so (Anthropic's words where known).
    """
    thinking = body.get("thinking")
    if thinking is None:
        return None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if not _is_int(budget) or budget < 1024:
            raise InvalidRequest("thinking.enabled.budget_tokens: " + (
                "Field required" if budget is None else "Input should be a valid integer" if not _is_int(budget)
                else "Input should be greater than or equal to 1024"), param="thinking.budget_tokens")
        if max_tokens is not None and budget >= max_tokens:
            raise InvalidRequest(_BUDGET_PAST_MAX, param="thinking.budget_tokens")
    elif kind != "disabled" and kind != "adaptive":
        raise InvalidRequest(f"thinking.type: {quoted(kind)} is not one of 'enabled', 'disabled', 'adaptive'",
                             param="thinking")
    return kind


def _output_config(body) -> dict:
    """C{response_format} / C{reasoning_effort} for C{output_config} (and the older C{output_format}); the effort is
    for a vLLM only (L{without_vllm_fields})."""
    fields = {}
    config = body.get("output_config") if isinstance(body.get("output_config"), dict) else {}
    fmt = config.get("format") if isinstance(config.get("format"), dict) else body.get("output_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        fields["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "output", "schema": fmt["schema"]}}
    if isinstance(config.get("effort"), str):
        fields["reasoning_effort"] = config["effort"]
    return fields


# -- answer ---------------------------------------------------------------------


def usage_from_chat(usage) -> dict | None:
    """Anthropic's usage object for a chat usage object (None for none).

    C{input_tokens} excludes the cached prompt tokens, reported apart as
    C{cache_read_input_tokens} (only where the upstream said how many).
    """
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    prompt = prompt if _is_int(prompt) else 0
    completion = usage.get("completion_tokens")
    anthropic = {"input_tokens": prompt, "output_tokens": completion if _is_int(completion) else 0}
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        # created_cache_tokens: vLLM's count of prompt tokens written to its cache.
        for source, name in (("cached_tokens", "cache_read_input_tokens"),
                             ("created_cache_tokens", "cache_creation_input_tokens")):
            if _is_int(details.get(source)):
                anthropic[name] = details[source]
                prompt -= details[source]
        anthropic["input_tokens"] = max(0, prompt)
    return anthropic


def _tool_input(arguments) -> dict:
    """A tool call's C{input} from its JSON arguments.

    Anthropic's C{input} is always an object, so arguments that are not a
    JSON object (a model that wrote broken JSON, or was cut off by
    C{max_tokens}) become C{{}}: the client sees the call and can answer it
    with an error, rather than the whole answer failing.
    """
    if isinstance(arguments, dict):  # (an object already, from a lenient upstream)
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        value = jsonutil.loads(arguments.encode())
    except jsonutil.JSONError:
        return {}
    return value if isinstance(value, dict) else {}


def _is_json_object(text) -> bool:
    try:
        return isinstance(jsonutil.loads(text.encode()), dict)
    except (jsonutil.JSONError, AttributeError):
        return False


def _string(value) -> str:
    """C{value} if it is a string, else C{""}."""
    return value if isinstance(value, str) else ""


def _aborted(finish_reason) -> str:
    return f"The upstream ended the generation with finish_reason '{finish_reason}': the answer is not whole."


def stop_reason(finish_reason, matched, tool_used, tools_complete):
    """Anthropic's C{(stop_reason, stop_sequence)} for a chat choice's end (vLLM's rule).

    @param matched: vLLM's C{stop_reason} on the choice: the stop string that
        ended it (a str), else a stop token id or None.
    @param tool_used: whether the answer holds a tool call (a named tool
        choice ends with C{finish_reason} "stop" all the same).
    @param tools_complete: whether every call's arguments are whole JSON: a
        stop string that cut a call short must not make it look runnable.
    """
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason == "content_filter":
        return "refusal", None
    if tool_used and tools_complete:
        return "tool_use", None
    if finish_reason == "stop" and isinstance(matched, str):
        return "stop_sequence", matched
    if tool_used:
        return "tool_use", None
    return _STOP_REASONS.get(finish_reason, "end_turn"), None


# Anthropic's values of thinking.display: the thinking's text shown (its default), or left out.
_THINKING_DISPLAYS = ("summarized", "omitted")


def omits_thinking(body: dict) -> bool:
    """Whether the Messages request C{body} asks for its answer's thinking blocks without their text
    (C{thinking.display} C{"omitted"}: Anthropic then sends each block, its signature, and no thinking text).

    @raise InvalidRequest: its C{thinking.display} is none of Anthropic's (L{_THINKING_DISPLAYS}; null is none).
    """
    thinking = body.get("thinking")
    display = thinking.get("display") if isinstance(thinking, dict) else None
    if display is not None and display not in _THINKING_DISPLAYS:
        raise InvalidRequest(f"thinking.display: {quoted(display)} is not one of 'summarized', 'omitted'",
                             param="thinking.display")
    return display == "omitted"


def chat_to_message(chat: dict, model: str, omit_thinking: bool = False, names: dict | None = None,
                    stops: list | None = None) -> dict:
    """The Messages answer for a chat-completions answer C{chat}, naming C{model} (the model that gave it); its
    thinking block's text empty with C{omit_thinking} (L{omits_thinking}); a call of a tool whose name the upstream
    was sent short named as the client declared it (C{names}, L{gomodel.translate.call_ids.long_names}); its text
    cut at the first of C{stops} (L{unsent_stops}: those the upstream was not sent) it holds, and nothing after it
    (stop reason C{stop_sequence}, naming it), as Anthropic's answer ends there.

    @raise ValueError: C{chat} has no choice.
    @raise TypeError: C{chat} is not shaped as a chat completion.
    @raise BadUpstreamResponse: the generation was aborted (L{ABORTED}): no stop reason would say it is not whole.
    """
    if not isinstance(chat, dict):
        raise TypeError("a chat completion must be a JSON object")
    choices = chat.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("the chat completion has no choice")
    choice = choices[0]
    message = choice.get("message") or {}
    if not isinstance(message, dict):
        raise TypeError("the chat completion's message is not an object")
    content = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        # No upstream signs its reasoning: the signature is empty (Anthropic's
        # field is required); a client sends the block back as it came.
        content.append({"type": "thinking", "thinking": "" if omit_thinking else reasoning, "signature": ""})
    text = message.get("content")
    if isinstance(text, list):  # content parts (some OpenAI-compatible servers)
        text = "".join(p["text"] for p in text if isinstance(p, dict) and isinstance(p.get("text"), str))
    stopped = None
    if stops and isinstance(text, str):
        at, stopped = first_stop(text, stops)
        if stopped is not None:
            text = text[:at]
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    elif isinstance(message.get("refusal"), str) and message["refusal"]:
        content.append({"type": "text", "text": message["refusal"]})
    calls = [c for c in message.get("tool_calls") or [] if isinstance(c, dict)] if stopped is None else []
    complete = True
    for call in calls:
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        arguments = function.get("arguments")
        complete = complete and (isinstance(arguments, dict) or _is_json_object(arguments or "{}"))
        name = _string(function.get("name"))
        content.append({"type": "tool_use", "id": _string(call.get("id")) or new_id("toolu"),
                        "name": names.get(name, name) if names else name, "input": _tool_input(arguments)})
    if not content:
        # Anthropic's shape for an empty answer is one empty text block (vLLM's too).
        content.append({"type": "text", "text": ""})
    if choice.get("finish_reason") in ABORTED:
        raise BadUpstreamResponse(_aborted(choice["finish_reason"]))
    if stopped is not None:
        reason, sequence = "stop_sequence", stopped
    else:
        reason, sequence = stop_reason(choice.get("finish_reason"), choice.get("stop_reason"), bool(calls), complete)
    return {"id": message_id(chat.get("id")), "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": reason, "stop_sequence": sequence,
            "usage": usage_from_chat(chat.get("usage")) or {"input_tokens": 0, "output_tokens": 0}}


def chat_to_message_bytes(body: bytes, model: str, omit_thinking: bool = False, names: dict | None = None,
                          stops: list | None = None) -> bytes:
    """L{chat_to_message} on JSON bytes, for an exchange's C{transform} hook.

    @raise ValueError: C{body} is not JSON (L{jsonutil.JSONError}) or has no choice.
    @raise TypeError: C{body} is not shaped as a chat completion.
    """
    return jsonutil.dumps(chat_to_message(jsonutil.loads(body), model, omit_thinking, names, stops))


def message_events(message: dict) -> bytes:
    """Anthropic's event stream for a whole Messages answer (an upstream that answered a stream whole), with its
    C{ping} after C{message_start} as Anthropic's (no C{thinking_delta} for a thinking block without text, as
    Anthropic's for C{thinking.display} C{"omitted"}); a block of another type (C{redacted_thinking}) whole in its
    C{content_block_start}, as Anthropic streams it.

    @raise TypeError: a content block is no object.
    """
    usage = message["usage"]
    out = [_event("message_start", {"message": dict(message, content=[], stop_reason=None, stop_sequence=None,
                                                   usage=dict(usage, output_tokens=0))}), PING]
    for index, block in enumerate(message["content"]):
        if not isinstance(block, dict):
            raise TypeError("a content block is no object")
        kind = block.get("type")
        if kind == "text":
            start, delta = dict(block, text=""), {"type": "text_delta", "text": _string(block.get("text"))}
        elif kind == "thinking":
            start = dict(block, thinking="", signature="")
            delta = {"type": "thinking_delta", "thinking": block["thinking"]} if block.get("thinking") else None
        elif kind in ("tool_use", "server_tool_use"):
            start = dict(block, input={})
            delta = {"type": "input_json_delta", "partial_json": jsonutil.dumps(block.get("input") or {}).decode()}
        else:  # (redacted_thinking, a type to come: nothing of it streams in deltas)
            start, delta = block, None
        out.append(_event("content_block_start", {"index": index, "content_block": start}))
        if delta is not None:
            out.append(_event("content_block_delta", {"index": index, "delta": delta}))
        if kind == "thinking":
            out.append(_event("content_block_delta", {"index": index, "delta": {
                "type": "signature_delta", "signature": _string(block.get("signature"))}}))
        out.append(_event("content_block_stop", {"index": index}))
    out.append(_event("message_delta", {"delta": {"stop_reason": message["stop_reason"],
                                                  "stop_sequence": message["stop_sequence"]}, "usage": usage}))
    out.append(_event("message_stop", {}))
    return b"".join(out)


def message_events_bytes(body: bytes, omit_thinking: bool = False) -> bytes:
    """L{message_events} of a whole native Messages answer (JSON bytes), for a native upstream that answered
    a stream whole; vLLM leaves out the fields it has as None (C{stop_sequence}). With C{omit_thinking}
    (L{omits_thinking}), its thinking blocks without their text (L{without_thinking_text}: no C{thinking_delta}).

    @raise ValueError: C{body} is no JSON message.
    @raise BadUpstreamResponse: it has no stop reason (L{native_message_bytes}).
    """
    message = jsonutil.loads(body)
    if not isinstance(message, dict) or message.get("type") != "message" or not isinstance(
            message.get("content"), list):
        raise ValueError("the answer is no message")
    if message.get("stop_reason") is None:
        raise BadUpstreamResponse(NO_STOP_REASON)
    if omit_thinking:
        message = without_thinking_text(message)
    usage = message.get("usage")
    return message_events(dict(message, stop_reason=message.get("stop_reason"),
                               stop_sequence=message.get("stop_sequence"),
                               usage=usage if isinstance(usage, dict) else {"input_tokens": 0, "output_tokens": 0}))


# What a native answer without a stop reason is: vLLM's for a generation it aborted (finish_reason "abort" or
# "error", which its Messages API maps to no stop reason), however it then ends.
NO_STOP_REASON = "The upstream ended the generation without a stop reason (aborted): the answer is not whole."
# What a native answer that is no JSON message is (a proxy's page, another API's object).
NO_MESSAGE = "The upstream's answer is no Messages API message."
# A stop reason that is a string, as a finished answer's JSON has it (checked without parsing the answer).
_STOP_REASON_SAID = re.compile(rb'"stop_reason"\s*:\s*"')
# A thinking block's type, as an answer's JSON has one (checked without parsing the answer).
_THINKING_BLOCK = re.compile(rb'"type"\s*:\s*"thinking"')


def native_message_bytes(body: bytes, omit_thinking: bool = False) -> bytes:
    """C{body}, a native Messages answer (JSON bytes), as it came: unless it is no message, or a message without a
    stop reason; with C{omit_thinking} (L{omits_thinking}), its thinking blocks without their text
    (L{without_thinking_text}: vLLM sends the text whatever the request's C{thinking.display}).

    @raise BadUpstreamResponse: it is no JSON message (L{NO_MESSAGE}), or one whose C{stop_reason} is null or
        absent (L{NO_STOP_REASON}).
    """
    thinking = omit_thinking and _THINKING_BLOCK.search(body) is not None
    if not thinking and _STOP_REASON_SAID.search(body) is not None:
        return body
    try:
        message = jsonutil.loads(body)
    except jsonutil.JSONError:
        raise BadUpstreamResponse(NO_MESSAGE) from None
    if not isinstance(message, dict) or message.get("type") != "message":
        raise BadUpstreamResponse(NO_MESSAGE)
    if message.get("stop_reason") is None:
        raise BadUpstreamResponse(NO_STOP_REASON)
    if thinking:
        omitted = without_thinking_text(message)
        if omitted is not message:
            return jsonutil.dumps(omitted)
    return body


def without_thinking_text(message: dict) -> dict:
    """C{message} (a Messages answer) with each thinking block's C{thinking} empty, its signature kept, as Anthropic
    answers C{thinking.display} C{"omitted"}; C{message} itself where no block has text to leave out."""
    content = message.get("content")
    if not isinstance(content, list) or not any(_thinking_with_text(block) for block in content):
        return message
    return dict(message, content=[dict(block, thinking="") if _thinking_with_text(block) else block
                                  for block in content])


def _thinking_with_text(block) -> bool:
    return isinstance(block, dict) and block.get("type") == "thinking" and block.get("thinking") != ""


def chat_to_events_bytes(body: bytes, model: str, omit_thinking: bool = False, names: dict | None = None,
                         stops: list | None = None) -> bytes:
    """L{message_events} of L{chat_to_message} on JSON bytes (raises as L{chat_to_message_bytes})."""
    return message_events(chat_to_message(jsonutil.loads(body), model, omit_thinking, names, stops))


# -- errors ---------------------------------------------------------------------


ANTHROPIC_ERROR_TYPES = frozenset({
    "invalid_request_error", "authentication_error", "billing_error", "permission_error", "not_found_error",
    "request_too_large", "rate_limit_error", "timeout_error", "api_error", "overloaded_error",
    "conflict_error"})


# vLLM's error type names (its exceptions', its stream's) -> Anthropic's, where no status says which.
_VLLM_ERROR_TYPES = {"BadRequestError": "invalid_request_error", "NotFoundError": "not_found_error",
                     "UnauthorizedError": "authentication_error", "Unauthorized": "authentication_error",
                     "ForbiddenError": "permission_error", "RateLimitError": "rate_limit_error",
                     "ServiceUnavailableError": "overloaded_error", "TimeoutError": "timeout_error"}


def stream_error_type(kind) -> str:
    """Anthropic's type for an error event's C{kind} (an upstream's; in a stream, without a status)."""
    if kind in ANTHROPIC_ERROR_TYPES:
        return kind
    return _VLLM_ERROR_TYPES.get(kind, "api_error") if isinstance(kind, str) else "api_error"


def _error_message(payload):
    """The human message in an error body of any usual shape, or None."""
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str) and error:
            return error
        for key in ("message", "detail"):  # bare messages, FastAPI's {"detail": ...}
            if isinstance(payload.get(key), str) and payload[key]:
                return payload[key]
    return None


def is_anthropic_error(value) -> bool:
    """Whether C{value} (parsed JSON) is an error body in Anthropic's shape, C{{"type": "error", "error": {...}}}."""
    return isinstance(value, dict) and value.get("type") == "error" and isinstance(value.get("error"), dict)


def openai_error_to_anthropic(status: int, body: bytes) -> bytes:
    """Anthropic's error body C{{"type": "error", "error": {"type", "message"}}} for an upstream's error answer.

    C{body} may be OpenAI's envelope, Anthropic's own (its type kept where
    it is one of Anthropic's), or anything else (a generic message then).
    The type follows the status as the gateway's own Anthropic errors do
    (L{AnthropicDialect.error_type}: also 4xx others are
    C{invalid_request_error}, 5xx others C{api_error}). A 400 that says the
    prompt does not fit the context is told in Anthropic's words (L{context_overflow}; OpenAI's
    C{context_length_exceeded} without numbers, Anthropic's first words before its own).
    """
    try:
        payload = jsonutil.loads(body)
    except jsonutil.JSONError:
        payload = None
    error_type = AnthropicDialect.error_type(status)
    if is_anthropic_error(payload):
        # vLLM's own endpoint puts its exception's name there ("BadRequestError"): only Anthropic's types stay.
        if payload["error"].get("type") in ANTHROPIC_ERROR_TYPES:
            error_type = payload["error"]["type"]
    message = _error_message(payload) or f"The upstream answered with HTTP status {status}."
    if status == 400:
        error = payload.get("error") if isinstance(payload, dict) else None
        coded = isinstance(error, dict) and error.get("code") == "context_length_exceeded"  # (OpenAI's)
        message = context_overflow(message) or (f"prompt is too long: {message}" if coded else message)
    return jsonutil.dumps({"type": "error", "error": {"type": error_type, "message": message}})


# vLLM's words (and DeepSeek's, and other OpenAI-compatible servers') for a prompt that does not fit the model's
# context: the prompt alone (vLLM 0.32's, its "at least" where it stopped counting, older ones and OpenAI's configured
# limit: the context, the prompt's tokens; vLLM's length check, the other way round; its check on characters, before
# counting tokens), or the prompt with max_tokens (older servers': the prompt's tokens, max_tokens, the context).
_PROMPT_TOO_LONG = re.compile(r"maximum context length is (\d+) tokens\. However, your (?:request has|messages "
                              r"resulted in|prompt contains(?: at least)?) (\d+) (?:input )?tokens")
_CONFIGURED_LIMIT = re.compile(r"exceed the configured limit of (\d+) tokens\. Your messages resulted in (\d+) tokens")
_INPUT_LENGTH = re.compile(r"Input length \((\d+)\) exceeds model's maximum context length \((\d+)\)")
_PROMPT_CHARACTERS = re.compile(r"maximum context length is \d+ tokens\. However, your prompt contains \d+ characters")
_MAX_TOKENS_TOO_LARGE = re.compile(r"is too large: (\d+)\. This model's maximum context length is (\d+) tokens and "
                                   r"your request has (\d+) input tokens")
_REQUESTED_TOO_MUCH = re.compile(r"maximum context length is (\d+) tokens\. However, you requested \d+ tokens "
                                 r"\((\d+) in the messages, (\d+) in the completion\)")


def context_overflow(message: str):
    """Anthropic's words for an upstream's 400 C{message} that says the prompt does not fit the model's context, or
    None (another error). Anthropic's are what Claude Code acts on: C{prompt is too long: N tokens > M maximum} (it
    compacts the conversation), C{input length and `max_tokens` exceed context limit: N + X > M} (it asks for
    fewer tokens)."""
    if "context" not in message and "limit" not in message:
        return None
    found = _PROMPT_TOO_LONG.search(message) or _CONFIGURED_LIMIT.search(message)
    if found is not None:
        return f"prompt is too long: {found[2]} tokens > {found[1]} maximum"
    found = _INPUT_LENGTH.search(message)
    if found is not None:
        return f"prompt is too long: {found[1]} tokens > {found[2]} maximum"
    if _PROMPT_CHARACTERS.search(message) is not None:  # (no token count: the words Claude Code looks for, then vLLM's)
        return f"prompt is too long: {message}"
    found = _MAX_TOKENS_TOO_LARGE.search(message)
    if found is not None:
        prompt, max_tokens, context = found[3], found[1], found[2]
    else:
        found = _REQUESTED_TOO_MUCH.search(message)
        if found is None:
            return None
        prompt, max_tokens, context = found[2], found[3], found[1]
    return (f"input length and `max_tokens` exceed context limit: {prompt} + {max_tokens} > {context}, decrease "
            "input length or `max_tokens` and try again")


# -- streams --------------------------------------------------------------------


def _event(kind: str, payload: dict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + jsonutil.dumps({"type": kind, **payload}) + b"\n\n"


# What Anthropic's streams send right after message_start (the anthropic SDKs skip it); so do the gateway's own.
PING = b'event: ping\ndata: {"type":"ping"}\n\n'


class _ToolCall:
    """One streamed chat tool call, as it becomes a C{tool_use} block."""

    __slots__ = ("id", "given", "name", "block", "arguments")

    def __init__(self, call_id, name):
        """
        @param call_id: the upstream's id for the call, or None (one is made).
        """
        self.id = call_id or new_id("toolu")
        self.given = call_id  # the upstream's id, or None
        self.name = name
        self.block = None  # its block index once started
        self.arguments = []  # every fragment (those before the block starts are sent when it does)


@implementer(IStreamObserver)
class ChatToMessagesStream:
    """Turns a chat-completions SSE stream into Anthropic's Messages events.

    An observer for L{gomodel.proxy.relay.StreamRelay}: C{feed} takes the
    upstream's bytes (split anywhere) and returns whole Anthropic events.

    The sequence: C{message_start} at the first chunk (its usage has the
    prompt's tokens where that chunk carries usage, as vLLM's do with
    C{continuous_usage_stats}, the cache reads not told apart yet; else 0:
    other chat streams report usage at the end) and a C{ping} (L{PING}, as
    Anthropic sends one there), then blocks in order, each
    C{content_block_start} / C{content_block_delta}... / C{content_block_stop}
    (a thinking block ends with an empty C{signature_delta}: no upstream
    signs its reasoning; with C{omit_thinking}, L{omits_thinking}, its only
    delta), one block open at a time, never a delta after its
    block's stop; and at C{[DONE]} C{message_delta} (stop reason, and the
    usage of the usage chunk that C{include_usage} brings before C{[DONE]})
    and C{message_stop} (an answer without a block has one empty text block, as
    a whole one). A block ends when the kind of delta changes. An
    in-band C{{"error": ...}} chunk becomes an C{error} event and ends the
    stream (no C{message_stop}); a C{data:} that is no JSON object raises
    L{StreamIncomplete} (the relay's error event then).

    The first tool call streams live: its block opens when its name comes
    and its argument fragments are relayed as they come (C{input_json_delta}).
    As a chat stream may yet send a fragment of any call (one after another
    is the rule, but upstreams that interleave calls exist), that block stays
    open to the end of the stream; the other calls' fragments are held, and
    each of them is sent whole after it, in the order the calls began. Text
    and reasoning that arrive while the tool_use block is open are held too,
    and sent after it (vLLM's rule), before the held calls: reasoning as a
    thinking block, then text as a text block. Text before any tool call is
    never held. A delta without an C{index} (servers that send each call
    whole) starts a call when it brings an id, else continues the last one;
    so does a delta that names a function with an id other than that of the
    call at its C{index} (Ollama and Grok stream every call of a turn at
    index 0): later fragments at that index go on with it.

    While the upstream is silent (a long prefill), L{idle} gives the relay what keeps the stream alive every
    C{keepalive} seconds (L{gomodel.proxy.relay.StreamRelay}): a C{ping}, and before the first chunk
    C{message_start} first (its id the gateway's, its input tokens 0 until C{message_delta} says them).

    With C{stops} (L{unsent_stops}), the text is watched for them: at the first one found, one split across chunks
    too, the text before it goes out and the stream ends (stop reason C{stop_sequence}, naming it), what the
    upstream sends after unread; the end of the text that could begin one is held until it cannot (or its block
    ends).

    @ivar done: C{[DONE]} or an error chunk arrived.
    @ivar error: the upstream's in-band error, if any.
    @ivar events: upstream chunks with content (about one token each), for an estimate.
    """

    _stopped = False  # a stop sequence the upstream was not sent ended the text (L{_watched})

    def __init__(self, model, message_id: str | None = None, hide=None, omit_thinking: bool = False,
                 keepalive: float = 0.0, names: dict | None = None, stops: list | None = None):
        """
        @param model: the model C{message_start} names: a string, or a function giving it when the stream
            starts (the target that answered, a fallback's maybe, is known only then).
        @param hide: a function of an in-band error's message giving it as the client may see it (the
            upstream's address hidden: L{gomodel.upstream.errors.without_address}), or None.
        @param omit_thinking: thinking blocks go without their text (no C{thinking_delta}: L{omits_thinking}).
        @param keepalive: seconds of upstream silence after which the relay sends L{idle}'s bytes; 0: never.
        @param names: C{{short name: name}} of the tools the upstream was sent short (L{chat_to_message}'s).
        @param stops: the stop sequences the upstream was not sent (L{unsent_stops}), or None.
        """
        self.keepalive = keepalive
        self._names = names
        self._stops = stops
        self._tail = ""  # with stops: the end of the text that could begin one, not sent yet
        self._framer = SSEFramer()
        self._model = model
        self._hide = hide
        self._omit_thinking = omit_thinking
        self._id = message_id
        self._started = False
        self._next = 0  # index of the next block
        self._open = None  # kind of the open block: "thinking", "text" or "tool_use"
        self._calls = {}  # chat tool-call index (or ("id", id) for a call without one) -> _ToolCall
        self._at_index = {}  # chat tool-call index -> the key of the last call begun there (see _tool_call)
        self._last_call = 0  # the key of the call the last tool-call delta went to
        self._held = []  # text that came while the tool_use block was open
        self._held_reasoning = []  # reasoning that came while the tool_use block was open
        self._finish = None
        self._matched = None
        self._usage = None  # the last chat usage object (with continuous usage, every chunk has one)
        self.done = False
        self.error = None
        self.events = 0

    @property
    def usage(self):
        """Anthropic's usage dict once the upstream reported usage, else None."""
        return usage_from_chat(self._usage)

    def feed(self, data: bytes) -> bytes:
        """Take upstream bytes; return the Anthropic events to send now (may be C{b""})."""
        out = []
        for event in self._framer.feed(data):
            if self.done:
                continue
            payload = event_data(event)
            if not payload:
                continue
            if payload == b"[DONE]":
                self._end(out)
                continue
            chunk = data_object(payload)
            if isinstance(chunk.get("error"), (dict, str)):
                self._fail(chunk["error"], out)
                continue
            usage = chunk.get("usage")
            if usage is not None and isinstance(usage, dict):
                self._usage = usage
            if not self._started:
                self._start(chunk, out)
            for choice in chunk.get("choices") or []:
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    self._choice(choice, out)
        return b"".join(out)

    def idle(self) -> bytes | None:
        """What to send while the upstream is silent: a C{ping}, after C{message_start} where none went yet
        (Anthropic's streams begin with it; the SDKs skip a ping wherever it comes); None once the stream is over."""
        if self.done:
            return None
        if self._started:
            return PING
        out = []
        self._start({}, out)
        return b"".join(out)

    def finish(self):
        """The upstream body ended cleanly; raise L{StreamIncomplete} if the stream did not."""
        require_end(self._framer, self.done, "without [DONE]")

    # -- building -----------------------------------------------------------------

    def _start(self, chunk, out):
        self._started = True
        if self._id is None:
            self._id = message_id(chunk.get("id"))
        model = self._model() if callable(self._model) else self._model
        usage = {"input_tokens": 0, "output_tokens": 0}
        known = self.usage
        if known:
            usage.update({k: v for k, v in known.items() if k != "output_tokens"})
        out.append(_event("message_start", {"message": {
            "id": self._id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": usage}}))
        out.append(PING)

    def _choice(self, choice, out):
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        reasoning = delta.get("reasoning")
        if not isinstance(reasoning, str) or not reasoning:
            reasoning = delta.get("reasoning_content")
        text = delta.get("content")
        if not isinstance(text, str) or not text:
            text = delta.get("refusal")  # (OpenAI's, told as text as in a whole answer: chat_to_message)
        calls = delta.get("tool_calls")
        if (isinstance(reasoning, str) and reasoning) or (isinstance(text, str) and text) or calls:
            self.events += 1
        if isinstance(reasoning, str) and reasoning:
            if self._open == "tool_use":
                self._held_reasoning.append(reasoning)
            else:
                self._switch("thinking", out)
                if not self._omit_thinking:
                    self._delta({"type": "thinking_delta", "thinking": reasoning}, out)
        if isinstance(text, str) and text:
            if self._open == "tool_use":
                self._held.append(text)
            else:
                self._switch("text", out)
                if self._stops is not None:
                    text = self._watched(text, out)
                    if self.done:
                        return
                if text:
                    self._delta({"type": "text_delta", "text": text}, out)
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                self._tool_call(call, out)
        if choice.get("finish_reason"):
            self._finish = choice["finish_reason"]
            self._matched = choice.get("stop_reason")

    def _watched(self, text, out) -> str:
        """Of the open text block's C{text}, what goes out now: without the end that could begin a stop sequence
        (held, L{_tail}); where one is found, the text before it, and the stream ends (L{_end})."""
        seen = self._tail + text
        at, which = first_stop(seen, self._stops)
        if which is not None:
            self._tail = ""
            if at:
                self._delta({"type": "text_delta", "text": seen[:at]}, out)
            self._finish, self._matched, self._stopped = "stop", which, True
            self._end(out)
            return ""
        keep = max(len(sequence) for sequence in self._stops) - 1
        if not keep:
            return seen
        self._tail = seen[-keep:]
        return seen[:-keep]

    def _tool_call(self, delta, out):
        index = delta.get("index")
        call_id = delta.get("id") if isinstance(delta.get("id"), str) and delta["id"] else None
        function = delta.get("function") if isinstance(delta.get("function"), dict) else {}
        name = function.get("name") if isinstance(function.get("name"), str) and function["name"] else None
        arguments = function.get("arguments") if isinstance(function.get("arguments"), str) else ""
        if not _is_int(index):
            # No index (servers that send each call whole): a new id is a new call, else the last one goes on.
            key = ("id", call_id) if call_id is not None else self._last_call
        else:
            key = self._at_index.get(index, index)
            known = self._calls.get(key)
            if name is not None and call_id is not None and known is not None and known.given not in (None, call_id):
                # Another call named at an index in use (Ollama, Grok: every call at index 0), not a fragment
                # (which names no function, whatever id a server puts on it).
                key = self._at_index[index] = ("id", call_id)
        self._last_call = key
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = _ToolCall(call_id, name)
        elif call.name is None and name:
            call.name = name
        if arguments:
            call.arguments.append(arguments)
        if call.block is not None:  # the open tool_use block: only the first call's is started before the end
            if arguments:
                self._delta({"type": "input_json_delta", "partial_json": arguments}, out, call.block)
        elif call.name is not None and self._open != "tool_use":
            self._start_tool(call, out)
        # else held: a call while another's block is open, or one with no name yet

    def _start_tool(self, call, out):
        self._switch("tool_use", out)
        name = call.name or ""
        if self._names:
            name = self._names.get(name, name)
        call.block = self._begin({"type": "tool_use", "id": call.id, "name": name, "input": {}}, out)
        self._open = "tool_use"
        if call.arguments:  # fragments held before the block started
            self._delta({"type": "input_json_delta", "partial_json": "".join(call.arguments)}, out, call.block)

    def _switch(self, kind, out):
        """End the open block unless it is of C{kind}, then open one of C{kind} (the caller opens
        a tool_use block itself)."""
        if self._open == kind:
            return
        self._stop(out)
        if kind == "text":
            self._begin({"type": "text", "text": ""}, out)
        elif kind == "thinking":
            self._begin({"type": "thinking", "thinking": "", "signature": ""}, out)
        self._open = kind if kind != "tool_use" else None

    def _begin(self, block, out) -> int:
        index = self._next
        self._next += 1
        out.append(_event("content_block_start", {"index": index, "content_block": block}))
        return index

    def _delta(self, delta, out, index=None):
        out.append(_event("content_block_delta", {"index": self._next - 1 if index is None else index,
                                                  "delta": delta}))

    def _stop(self, out):
        if self._open is None:
            return
        if self._tail:  # (the open block's text: the end held for the stop sequences, L{_watched})
            self._delta({"type": "text_delta", "text": self._tail}, out)
            self._tail = ""
        if self._open == "thinking":
            self._delta({"type": "signature_delta", "signature": ""}, out)
        out.append(_event("content_block_stop", {"index": self._next - 1}))
        self._open = None

    def _end(self, out):
        if self._finish in ABORTED:  # no stop_reason says so: the client gets an error, not a finished message
            self._fail({"message": _aborted(self._finish)}, out)
            return
        self.done = True
        if not self._started:
            self._start({}, out)
        self._switch(None, out)  # the open block (the streamed tool call's, if any) ends
        if self._held_reasoning:
            self._switch("thinking", out)
            if not self._omit_thinking:
                self._delta({"type": "thinking_delta", "thinking": "".join(self._held_reasoning)}, out)
        held = "".join(self._held)
        if held and self._stops is not None:
            at, which = first_stop(held, self._stops)
            if which is not None:
                held, self._finish, self._matched = held[:at], "stop", which
        if held:
            self._switch("text", out)
            self._delta({"type": "text_delta", "text": held}, out)
        self._switch(None, out)  # (the held reasoning's or text's block)
        for call in self._calls.values():
            if call.block is None:  # held calls (a name that never came too: the call is still told), whole
                self._start_tool(call, out)
                self._switch(None, out)
        if not self._next:  # no block at all: the whole answer's one empty text block (chat_to_message)
            self._switch("text", out)
            self._switch(None, out)
        complete = all(_is_json_object("".join(c.arguments) or "{}") for c in self._calls.values())
        if self._stopped:  # (a stop sequence in the text, L{_watched}: no call comes after it)
            reason, sequence = "stop_sequence", self._matched
        else:
            reason, sequence = stop_reason(self._finish or "stop", self._matched, bool(self._calls), complete)
        usage = self.usage or {"output_tokens": 0}
        out.append(_event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                            "usage": usage}))
        out.append(_event("message_stop", {}))

    def _fail(self, error, out):
        self.done = True
        self.error = error
        message = error.get("message") if isinstance(error, dict) else error
        if not isinstance(message, str) or not message:
            message = "The upstream failed while streaming."
        elif self._hide is not None:
            message = self._hide(message)
        out.append(_event("error", {"error": {"type": _in_band_type(error), "message": message}}))


def _in_band_type(error) -> str:
    """Anthropic's error type for a chat stream's in-band error: by its C{code} where that is an HTTP
    status (vLLM's are: an overload is C{overloaded_error}, which clients retry), else C{api_error}."""
    code = error.get("code") if isinstance(error, dict) else None
    return AnthropicDialect.error_type(code) if _is_int(code) and 400 <= code < 600 else "api_error"


_NATIVE_WATCHED = (b"message_start", b"message_delta", b"message_stop", b"error")
# Those events' C{event:} lines, and a delta's, each after the blank line that ends the event before it, in whole
# events that each begin with theirs (L{_named}). (A pattern that begins with its literal is searched for as one:
# one that begins with an alternative or a lookbehind is tried at every byte, some 30 times the cost.)
_WATCHED_LINE = re.compile(rb"\n\nevent: (?:message_start|message_delta|message_stop|error)\n")
_DELTA_LINE = b"\n\nevent: content_block_delta\n"


def _named(events: bytes) -> bool:
    """Whether each of C{events} (whole events, LF line breaks; one at least) begins with its C{event:} line, as
    vLLM and Anthropic write every event (a blank line ends each: one that follows it begins the next)."""
    return events.startswith(b"event: ") and events.count(b"\n\nevent: ") == events.count(b"\n\n") - 1


@implementer(IStreamObserver)
class MessagesStreamObserver:
    """Watches a native Messages stream (vLLM's C{/v1/messages}); relays it untouched.

    The stream is complete at C{message_stop} or an C{error} event. An C{error}
    event is one event it may rewrite: to Anthropic's type (vLLM names its
    own, C{internal_error}: L{stream_error_type}) and without the upstream's address.
    The other is a C{message_delta} without a stop reason, vLLM's for a
    generation it aborted: an C{error} event instead (L{NO_STOP_REASON}), and
    the stream ends there (its C{message_stop} is not relayed). With C{omit_thinking}, a C{thinking_delta} is
    left out (L{omits_thinking}: vLLM streams the thinking text whatever the request's C{thinking.display}).

    While the upstream is silent, L{idle} gives the relay a C{ping} every C{keepalive} seconds (between two whole
    events: C{feed} returns whole events only), before C{message_start} too: vLLM sends its head at once and its
    C{message_start} only with the first token, after the prefill. Anthropic's SDKs (Python's, and TypeScript's,
    Claude Code's) skip a C{ping} wherever it comes, before C{message_start} too.

    @ivar error: the C{error} event's C{error} object, if one came.
    @ivar events: C{content_block_delta} events seen (about one token each, those left out too), for an estimate.
    """

    def __init__(self, hide=None, omit_thinking: bool = False, keepalive: float = 0.0):
        """
        @param hide: as L{ChatToMessagesStream}'s: an error event's message as the client may see it, or None.
        @param omit_thinking: thinking blocks go without their text (no C{thinking_delta}: L{omits_thinking}).
        @param keepalive: as L{ChatToMessagesStream}'s: seconds of upstream silence before a C{ping}; 0: none.
        """
        self.keepalive = keepalive
        self._framer = SSEFramer()
        self._hide = hide
        self._omit_thinking = omit_thinking
        self._usage = None  # message_start's usage, then each message_delta's (cumulative counts) over it
        self._counted = False  # a message_delta's usage came (its output_tokens counts what was generated)
        self._cut = False  # a message_delta without a stop reason became an error event: nothing more goes out
        self.done = False
        self.error = None
        self.events = 0

    @property
    def usage(self):
        """Anthropic's usage dict: C{message_start}'s, then each C{message_delta}'s over it; None before
        C{message_start}. Of a stream cut before its C{message_delta} (whose C{message_start} says 0 or 1
        output tokens), the output is the deltas relayed (L{estimated})."""
        usage = self._usage
        if self.estimated:
            return dict(usage, output_tokens=self.events)
        return usage

    @property
    def estimated(self) -> bool:
        """Whether L{usage}'s output tokens are counted from the deltas relayed, no C{message_delta} having said them."""
        return (self._usage is not None and not self._counted
                and self.events > (self._usage.get("output_tokens") or 0))

    def feed(self, data: bytes) -> bytes:
        """Take upstream bytes; return them as whole events, unchanged but an C{error} event and a C{message_delta}
        without a stop reason (see above)."""
        joined, events = self._framer.feed_joined(data)
        if events is None:  # (LF line breaks only)
            if not self._cut and not self._omit_thinking and _named(joined):
                return self._feed_named(joined)
            events = [event + b"\n\n" for event in joined.split(b"\n\n")[:-1]]  # (none after the last end)
        for i, event in enumerate(events):
            if self._cut:
                events[i] = b""
                continue
            head = event[:64]
            if head.find(b"content_block_delta") >= 0:  # (not `in`: see gomodel.proxy.sse.mentions)
                self.events += 1
                if self._omit_thinking and _is_thinking_delta(event):
                    events[i] = b""
            elif mentions(head, _NATIVE_WATCHED):
                fixed = self._observe(event)
                if fixed is not None:
                    events[i] = fixed
        return b"".join(events)

    def _feed_named(self, joined: bytes) -> bytes:
        """L{feed} for whole events that each begin with their C{event:} line (L{_named}): only the watched ones,
        found by that line, are cut out and looked into; the deltas are counted by theirs."""
        out, start, end = [], 0, len(joined)
        # (the events with the blank line before each, the first's too: an event begins in joined where its line's
        # match begins in these, two bytes having been put before it)
        ended = b"\n\n" + joined
        for match in _WATCHED_LINE.finditer(ended):
            at = match.start()
            stop = joined.find(b"\n\n", at) + 2
            fixed = self._observe(joined[at:stop])
            if fixed is not None:
                out.append(joined[start:at])
                out.append(fixed)
                start = stop
            if self._cut:  # (nothing after it goes, nor counts)
                end = stop
                break
        out.append(joined[start:end])
        self.events += ended.count(_DELTA_LINE, 0, end + 2)
        return b"".join(out)

    def _observe(self, event):
        """Note C{event}'s usage or end; return what the client gets instead of it, or None (itself)."""
        payload = event_object(event)
        if payload is None:
            return None
        kind = payload.get("type")
        if kind == "message_start":
            message = payload.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            self._merge(usage)
        elif kind == "message_delta":
            self._counted = self._merge(payload.get("usage")) or self._counted
            delta = payload.get("delta")
            if isinstance(delta, dict) and "stop_reason" in delta and delta["stop_reason"] is None:
                self.done = self._cut = True
                self.error = {"type": "api_error", "message": NO_STOP_REASON}
                return _event("error", {"error": self.error})
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.done = True
            self.error = payload.get("error") if isinstance(payload.get("error"), dict) else payload
            message = _error_message(payload) or "The upstream failed while streaming."
            shown = self._hide(message) if self._hide is not None else message
            kind = self.error.get("type")
            if kind not in ANTHROPIC_ERROR_TYPES or shown != message:
                return _event("error", {"error": {"type": stream_error_type(kind), "message": shown}})
        return None

    def _merge(self, usage) -> bool:
        """Merge C{usage} (an event's) into the stream's; return whether it was a usage dict."""
        if not isinstance(usage, dict):
            return False
        merged = dict(self._usage or {})
        merged.update({k: v for k, v in usage.items() if v is not None})
        self._usage = merged
        return True

    def idle(self) -> bytes | None:
        """What to send while the upstream is silent: a C{ping}, until the stream is over; then None."""
        return None if self.done else PING

    def finish(self):
        """The upstream body ended cleanly; raise L{StreamIncomplete} if the stream did not."""
        require_end(self._framer, self.done, "before message_stop")


def _is_thinking_delta(event: bytes) -> bool:
    """Whether C{event} (a whole C{content_block_delta} event) carries thinking text (a C{thinking_delta})."""
    payload = event_object(event)
    delta = payload.get("delta") if isinstance(payload, dict) else None
    return isinstance(delta, dict) and delta.get("type") == "thinking_delta"
