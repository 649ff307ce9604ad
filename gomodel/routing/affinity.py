"""Which requests belong together: a session, or a long conversation by its opening.

Requests of one session, and the turns of one long conversation,
are best served by the replica that served them last: its prefix cache
still holds their prompt. The key is read the way GoModel's session keeping
reads it: the headers C{X-Session-Id}, C{X-Claude-Code-Session-Id} (Claude
Code's) and C{Session-Id}, then the body's C{prompt_cache_key}, C{session_id},
C{metadata.user_id} (Anthropic's Messages) and C{user}; failing those, the
conversation's opening: a hash of its system prompt and first user message
(their first L{PREFIX_CHARS} characters each; a Messages request's C{system}
first; a completion's prompt, its first L{PREFIX_CHARS} characters), when
the whole prompt is at least L{PREFIX_CHARS} long. Every turn of a
conversation opens alike, so its turns stay where its history is cached,
while conversations that share only a system prompt spread: each replica
soon caches a hot system prompt, and one replica never takes an app's
whole traffic. Keys are short hashes
(C{"s:<hex>"}, C{"p:<hex>"}): bounded in memory, and with shared pins
(L{gomodel.routing.pins}) no session id or user name is sent to Redis.
"""

import hashlib

from gomodel._twistedcompat import header_name, plain_headers

SESSION_HEADERS = tuple(header_name(name) for name in ("x-session-id", "x-claude-code-session-id", "session-id"))
_SESSION_HEADER_NAMES = frozenset(SESSION_HEADERS)  # most requests have none, checked at once
SESSION_FIELDS = ("prompt_cache_key", "session_id")
# Every body field a session key is read from: most requests have none, checked at once.
_SESSION_NAMES = frozenset(SESSION_FIELDS + ("metadata", "user"))
PREFIX_CHARS = 512


def affinity_key(request, body: dict):
    """The session or conversation key of a request, or None."""
    headers = plain_headers(request.requestHeaders)
    if not _SESSION_HEADER_NAMES.isdisjoint(headers):
        for name in SESSION_HEADERS:
            values = headers.get(name)
            if values:
                return _session(values[0].decode("latin-1"))  # the same key as the body's fields
    if not _SESSION_NAMES.isdisjoint(body):
        for name in SESSION_FIELDS:
            value = body.get(name)
            if isinstance(value, str) and value:
                return _session(value)
        metadata = body.get("metadata")
        if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str) and metadata["user_id"]:
            return _session(metadata["user_id"])
        user = body.get("user")
        if isinstance(user, str) and user:
            return _session(user)
    # A body shorter than PREFIX_CHARS bytes holds no prompt that long (JSON takes at least a byte
    # a character): most short requests end here, without walking their messages.
    if request.content.seek(0, 2) < PREFIX_CHARS:
        return None
    prefix = _prompt_prefix(body)
    if prefix is None:
        return None
    return "p:" + _digest(prefix)


def _session(value):
    return "s:" + _digest(value)


def _digest(text):
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def _prompt_prefix(body):
    """The opening of a long prompt (see the module's docstring), or None when the prompt is shorter
    than L{PREFIX_CHARS}."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt[:PREFIX_CHARS] if len(prompt) >= PREFIX_CHARS else None
    messages = body.get("messages")
    if messages is None:
        messages = body.get("input")  # the Responses API's
    if isinstance(messages, str):
        return messages[:PREFIX_CHARS] if len(messages) >= PREFIX_CHARS else None
    opening = []
    system = _text(body.get("system"))  # Anthropic's Messages: the system prompt comes first
    size = len(system) if system else 0
    if system:
        opening.append(system[:PREFIX_CHARS])
    user = False  # the first user message is in the opening
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        content = _text(message.get("content"))
        if not content:
            continue
        size += len(content)
        if not user:
            opening.append(content[:PREFIX_CHARS])
            user = message.get("role") == "user"
        if user and size >= PREFIX_CHARS:
            break
    return "\n".join(opening) if size >= PREFIX_CHARS else None


def _text(content):
    """The text of a message's content: a string, or the joined text of its parts; else None."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content if isinstance(content, str) else None
