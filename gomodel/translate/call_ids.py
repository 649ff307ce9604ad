"""Tool call ids that a provider refuses as too long, made short for it.

OpenAI takes a chat conversation's tool call ids (an assistant message's
C{tool_calls[].id}, a tool message's C{tool_call_id}) of at most
L{OPENAI_MAX} characters; vLLM makes longer ones (C{chatcmpl-tool-} and 32 hex
digits), so a conversation begun on vLLM was refused (400) by an OpenAI
target it failed over to. Each longer id is replaced by one made of its hash:
the same id is always made the same short one (a call and its result still
match, turn after turn), and the ids of the answer are the provider's own, so
nothing is to be put back in it.
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
