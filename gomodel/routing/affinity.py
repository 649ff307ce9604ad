"""Which requests belong together: a session, or a long shared prompt prefix.

Requests of one session, and requests that start with the same long prompt,
are best served by the replica that served them last: its prefix cache
still holds their prompt. The key is read the way GoModel's session keeping
reads it: the headers C{X-Session-Id}, C{X-Claude-Code-Session-Id} (Claude
Code's) and C{Session-Id}, then the body's C{prompt_cache_key}, C{session_id},
C{metadata.user_id} (Anthropic's Messages) and C{user}; failing those, a hash
of the first L{PREFIX_CHARS} characters of the prompt (a Messages request's
C{system} first) when it is at least that long. Keys are short hashes
(C{"s:<hex>"}, C{"p:<hex>"}): bounded in memory, and with shared pins
(L{gomodel.routing.pins}) no session id or user name is sent to Redis.
"""

import hashlib

SESSION_HEADERS = (b"x-session-id", b"x-claude-code-session-id", b"session-id")
SESSION_FIELDS = ("prompt_cache_key", "session_id")
PREFIX_CHARS = 512


def affinity_key(request, body: dict):
    """The session or prompt-prefix key of a request, or None."""
    headers = request.requestHeaders
    for name in SESSION_HEADERS:
        values = headers.getRawHeaders(name)
        if values:
            return _session(values[0].decode("latin-1"))  # the same key as the body's fields
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
    prefix = _prompt_prefix(body)
    if prefix is None:
        return None
    return "p:" + _digest(prefix)


def _session(value):
    return "s:" + _digest(value)


def _digest(text):
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def _prompt_prefix(body):
    """The first L{PREFIX_CHARS} characters of the prompt, or None when it is shorter."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        text = prompt
    else:
        parts = []
        size = 0
        system = _text(body.get("system"))  # Anthropic's Messages: the system prompt comes first
        if system:
            parts.append(system)
            size += len(system)
        for message in () if size >= PREFIX_CHARS else body.get("messages") or body.get("input") or ():
            content = _text(message.get("content")) if isinstance(message, dict) else None
            if content:
                parts.append(content)
                size += len(content)
                if size >= PREFIX_CHARS:
                    break
        text = "\n".join(parts)
    return text[:PREFIX_CHARS] if len(text) >= PREFIX_CHARS else None


def _text(content):
    """The text of a message's content: a string, or the joined text of its parts; else None."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content if isinstance(content, str) else None
