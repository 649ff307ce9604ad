"""Tool call ids that a provider refuses as too long, made short for it.

OpenAI takes a chat conversation's tool call ids (an assistant message's
C{tool_calls[].id}, a tool message's C{tool_call_id}) of at most
L{OPENAI_MAX} characters; vLLM makes longer ones (C{chatcmpl-tool-} and 32 hex
digits), so a conversation begun on vLLM was refused (400) by an OpenAI
target it failed over to. Each longer id is replaced by one made of its hash:
the same id is always made the same short one (a call and its result still
match, turn after turn), and the ids of the answer are the provider's own, so
nothing is to be put back in it.

So are tool names that OpenAI refuses as too long (L{fit_tool_names}): the
answer's calls name the short ones, which the caller puts back
(L{long_names}).
"""

from hashlib import sha256

OPENAI_MAX = 40  # characters of a tool call id OpenAI takes
SHORT_ID_TYPES = frozenset(("openai",))  # the provider types that take no longer one


def short_id(call_id: str) -> str:
    """C{call_id} where it is at most L{OPENAI_MAX} characters, else C{call_} and its hash's first hex digits."""
    if len(call_id) <= OPENAI_MAX:
        return call_id
    return "call_" + sha256(call_id.encode("utf-8", "surrogatepass")).hexdigest()[:OPENAI_MAX - 5]


def fit_call_ids(body: dict) -> None:
    """Make every tool call id of C{body}'s C{messages} at most L{OPENAI_MAX} characters (L{short_id}), in place:
    a message that changes is a new one, in a new list (the objects it shares with other targets' bodies are
    not changed)."""
    messages = body.get("messages")
    if messages.__class__ is not list:
        return
    fitted = None
    for i, message in enumerate(messages):
        if message.__class__ is not dict or ("tool_calls" not in message and "tool_call_id" not in message):
            continue
        new = _fitted(message)
        if new is not message:
            if fitted is None:
                fitted = list(messages)
            fitted[i] = new
    if fitted is not None:
        body["messages"] = fitted


def _fitted(message: dict) -> dict:
    """C{message} with its tool call ids short (a new dict where one changed)."""
    new = message
    call_id = message.get("tool_call_id")
    if call_id.__class__ is str and len(call_id) > OPENAI_MAX:
        new = dict(message, tool_call_id=short_id(call_id))
    calls = message.get("tool_calls")
    if calls.__class__ is list and any(c.__class__ is dict and c.get("id").__class__ is str
                                       and len(c["id"]) > OPENAI_MAX for c in calls):
        new = dict(new, tool_calls=[dict(c, id=short_id(c["id"])) if c.__class__ is dict and c.get("id").__class__
                                    is str and len(c["id"]) > OPENAI_MAX else c for c in calls])
    return new


# The longest tool (function) name OpenAI's chat completions take ("string too long" past it); Anthropic's Messages
# take names of up to 128 characters, and Claude Code's MCP tools (mcp__<server>__<tool>) may be longer than 64.
OPENAI_NAME_MAX = 64


def short_name(name: str) -> str:
    """C{name} where it is at most L{OPENAI_NAME_MAX} characters, else its first characters, C{_} and its hash's
    first 8 hex digits, L{OPENAI_NAME_MAX} in all (the same name is always made the same short one)."""
    if len(name) <= OPENAI_NAME_MAX:
        return name
    return name[:OPENAI_NAME_MAX - 9] + "_" + sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def long_names(body: dict) -> dict | None:
    """C{{short name: name}} of the tools that C{body} (a chat request) declares whose names are longer than
    L{OPENAI_NAME_MAX} (L{short_name}), for an answer's calls to be named as the client declared them; None where
    there is none."""
    tools = body.get("tools")
    names = {}
    for tool in tools if tools.__class__ is list else ():
        name = tool.get("function", {}).get("name") if tool.__class__ is dict else None
        if name.__class__ is str and len(name) > OPENAI_NAME_MAX:
            names[short_name(name)] = name
    return names or None


def fit_tool_names(body: dict) -> None:
    """Make every tool name of the chat request C{body} at most L{OPENAI_NAME_MAX} characters (L{short_name}), in
    place: its tools', its C{tool_choice}'s and its messages' tool calls'; what changes is new (the objects it
    shares with other targets' bodies are not changed)."""
    tools = body.get("tools")
    if tools.__class__ is list and any(_long_function(tool) for tool in tools):
        body["tools"] = [_short_function(tool) if _long_function(tool) else tool for tool in tools]
    choice = body.get("tool_choice")
    if _long_function(choice):
        body["tool_choice"] = _short_function(choice)
    messages = body.get("messages")
    if messages.__class__ is not list:
        return
    fitted = None
    for i, message in enumerate(messages):
        calls = message.get("tool_calls") if message.__class__ is dict else None
        if calls.__class__ is list and any(_long_function(call) for call in calls):
            if fitted is None:
                fitted = list(messages)
            fitted[i] = dict(message, tool_calls=[_short_function(call) if _long_function(call) else call
                                                  for call in calls])
    if fitted is not None:
        body["messages"] = fitted


def _long_function(item) -> bool:
    """Whether C{item} (a tool, a tool choice or a tool call) names a function longer than L{OPENAI_NAME_MAX}."""
    function = item.get("function") if item.__class__ is dict else None
    name = function.get("name") if function.__class__ is dict else None
    return name.__class__ is str and len(name) > OPENAI_NAME_MAX


def _short_function(item: dict) -> dict:
    """C{item} with its function's name short (L{short_name}), a new dict."""
    function = item["function"]
    return dict(item, function=dict(function, name=short_name(function["name"])))
