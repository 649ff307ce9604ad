"""What of an upstream's address (and key) a client must never see, in whatever shape an error writes it.

An upstream's C{hidden} strings (L{gomodel.interfaces.IUpstream}: its URLs, host and port, host; its key, a
L{Secret}) make one pattern, built once per set (L{scrubber}), that finds its host however it is written: in
any case, with the root's trailing dot, an IPv6 literal with or without its brackets (or written in full), a
loopback host under any of its names (C{localhost}, C{127.0.0.1}, C{[::1]}), with any scheme, user and password,
port (not only the configured one) and the configured base path, each separator also percent-encoded
(C{http%3A%2F%2Fh%3A8000}) or as JSON may escape it (C{http:\\/\\/h}); and aiohttp's C{('h', 8000)} (vLLM's
"Cannot connect to host ..."). Only error paths run it; a pool's cheap test that something may name it is
L{marks}.
"""

import re
from functools import lru_cache
from urllib.parse import unquote, unquote_to_bytes, urlsplit


class Secret(str):
    """One of a provider's C{hidden} strings that is a credential, its API key: replaced by L{REDACTED} (an
    address is replaced by the provider's name)."""

    __slots__ = ()


# What the client sees in place of a provider's key (L{Secret}).
REDACTED = "***"

# The names of the loopback host: an upstream on one is hidden under each (its server may echo any).
_LOOPBACK = ("localhost", "127.0.0.1", "::1", "0:0:0:0:0:0:0:1", "0.0.0.0", "::ffff:127.0.0.1")
# An IPv4 address's form as an IPv6 one (C{[::ffff:10.0.0.5]}, as a dual-stack server names its peer).
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")

_COLON = r"(?::|%3A)"
_SLASH = r"(?:/|\\/|%2F)"
_AT = r"(?:@|%40)"
# Where a host may begin: not inside a longer name, but right after a percent-encoded separator.
_START = r"(?:(?<![\w.-])|(?<=%[0-9a-f]{2}))"


def hosts_of(hide) -> list:
    """The host names and addresses in C{hide} (no L{Secret}), lower case, without brackets or a trailing dot;
    for a loopback one every name of the loopback host; for an IPv6 address its full form too, for an IPv4 one its
    IPv4-mapped IPv6 form."""
    hosts = []
    for h in hide:
        if not h or h.__class__ is Secret:
            continue
        if "://" in h:
            host = urlsplit(h).hostname
        elif h.startswith("[") or h.count(":") == 1:  # (a host and port)
            host = urlsplit("//" + h).hostname
        else:  # (a host: a name, an IPv4 or IPv6 address)
            host = h
        if not host:
            continue
        host = host.lower().rstrip(".")
        hosts.append(host)
        if ":" in host:
            import ipaddress  # (an IPv6 upstream's alone: gomodel.lean)

            try:
                hosts.append(ipaddress.IPv6Address(host).exploded)
            except ValueError:
                pass
        if _IPV4.fullmatch(host):
            hosts.append("::ffff:" + host)
        if host in _LOOPBACK or host.startswith("127.") or host.endswith(".localhost"):
            hosts.extend(_LOOPBACK)
    return sorted(dict.fromkeys(hosts), key=len, reverse=True)


def _path_source(path: str) -> str:
    return _SLASH.join(re.escape(part) for part in path.split("/"))


@lru_cache(maxsize=256)
def scrubber(hide: tuple):
    """(str pattern, bytes pattern) finding C{hide}'s addresses in any shape (the module's docstring) and its keys
    (group C{key}), or None when it holds nothing to hide."""
    keys = [re.escape(h) for h in hide if h and h.__class__ is Secret]
    names, brackets = [], []
    for host in hosts_of(hide):
        if ":" in host:  # an IPv6 address: bracketed, or bare where no other address character touches it
            brackets.append(rf"(?:\[|%5B){re.escape(host)}(?:\]|%5D)|(?<![\w:]){re.escape(host)}(?![\w:])")
        else:
            names.append(rf"{re.escape(host)}(?![\w-])(?:\.(?=:|/|\\|%))?")
    alternatives = [rf"(?P<key>(?-i:{'|'.join(keys)}))" if keys else "(?P<key>(?!))"]
    if names or brackets:
        host = "(?:" + "|".join(brackets + names) + ")"
        paths = sorted({urlsplit(h).path for h in hide if h and h.__class__ is not Secret and "://" in h} - {""},
                       key=len, reverse=True)
        path = rf"(?:(?:{'|'.join(_path_source(p) for p in paths)})(?![\w-]))?" if paths else ""
        alternatives.append(rf"""(?P<q>['"]){host}(?P=q),\s*\d{{1,5}}(?!\d)""")
        # (a user and password only after a scheme, each part bounded: no text makes it scan far from each place)
        alternatives.append(rf"""{_START}(?:[a-z][a-z0-9+.-]{{0,31}}{_COLON}{_SLASH}{_SLASH}"""
                            rf"""(?:[^\s/@"'<>()\[\]|,;=]{{1,128}}{_AT})?)?{host}(?:{_COLON}\d{{1,5}}(?!\d))?{path}""")
    if len(alternatives) == 1 and not keys:
        return None
    source = "|".join(alternatives)
    return re.compile(source, re.IGNORECASE), re.compile(source.encode(), re.IGNORECASE)


def marks(hide):
    """A pattern (bytes) that finds each host (by every name of it, L{hosts_of}) and key of C{hide}: what a text
    that names one of them holds (a cheap test before L{scrubbed}); None where C{hide} holds none."""
    # Each host in lower case, upper case and as configured (a server names itself as the Host it was sent), not in
    # any case: literals alone keep it as fast as one, a pattern every relayed answer's headers go through (an error's
    # text is then scrubbed in any case); a host another holds (::ffff:10.0.0.5) is found by that one.
    hosts = hosts_of(hide)
    hosts += [h.upper() for h in hosts] + [h for h in map(_spelled, hide) if h]
    hosts = sorted({h for h in hosts if not any(o != h and o in h for o in hosts)})
    words = [re.escape(h.encode()) for h in hide if h and h.__class__ is Secret]
    words += [re.escape(h.encode()) for h in hosts]
    return re.compile(b"|".join(words)) if words else None


def _spelled(h):
    """The host of C{h} (one of C{hide}) as it is written there, or None (a key, an IPv6 address)."""
    if not h or h.__class__ is Secret:
        return None
    netloc = urlsplit(h if "://" in h else "//" + h).netloc.rpartition("@")[2]
    return None if netloc.startswith("[") or netloc.count(":") > 1 else netloc.partition(":")[0].rstrip(".") or None


def scrubbed(text, hide, name):
    """C{text} (str or bytes) with every address of C{hide} replaced by C{name} (a key by L{REDACTED}), also one
    written with percent-escapes throughout (decoded then); a value that is neither as it is."""
    patterns = scrubber(tuple(hide)) if hide else None
    if patterns is None:
        return text
    if text.__class__ is str:
        pattern, shown, key, percent, decode = patterns[0], name, REDACTED, "%", unquote
    elif text.__class__ is bytes:
        pattern, shown, key, percent, decode = patterns[1], name.encode(), REDACTED.encode(), b"%", unquote_to_bytes
    else:
        return text

    def replaced(match):
        return key if match.group("key") is not None else shown

    text = pattern.sub(replaced, text)
    for _ in range(3):  # (an address percent-encoded once, twice, three times)
        if text.find(percent) < 0:
            break
        decoded = decode(text)
        if decoded == text or pattern.search(decoded) is None:
            break
        text = pattern.sub(replaced, decoded)
    return text
