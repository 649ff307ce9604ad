"""Ids the gateway makes for requests, responses and their items: unique, not secret.

The bits come from the C{random} module's generator, seeded from the system's
entropy at start and again in a forked child: C{os.urandom} and C{uuid4} make a
system call each, on every request.
"""

from random import getrandbits


def random_hex() -> str:
    """128 random bits as 32 lower-case hex digits."""
    return "%032x" % getrandbits(128)


def random_hex_bytes() -> bytes:
    """L{random_hex} as ASCII bytes."""
    return b"%032x" % getrandbits(128)


def held_nowhere(object_id: str) -> bool:
    """Whether C{object_id}, an id a client names (a string), is no object's anywhere: it holds a NUL character,
    which no id the gateway or an upstream makes holds and PostgreSQL's text cannot. A lookup answers it as any
    unknown id without asking the store (PostgreSQL refused the NUL, a 400 there, where SQLite found nothing)."""
    return "\x00" in object_id


def new_id(prefix: str) -> str:
    """C{prefix}, an underscore and L{random_hex} (C{msg_...}, C{resp_...})."""
    return f"{prefix}_{random_hex()}"
