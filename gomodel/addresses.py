"""What of an upstream's address (and key) a client must never see, in whatever shape an error writes it.

An upstream's C{hidden} strings (L{gomodel.interfaces.IUpstream}: its URLs, host and port, host; its key, a
L{Secret}) make one pattern, built once per set (L{scrubber}), that finds its host however it is written: in
any case, with the root's trailing dot, an IPv6 literal with or without its brackets in any form C{ipaddress} reads
(compressed or not, groups with or without their leading zeros, its last 32 bits dotted, with a zone), a
loopback host under any of its names (C{localhost}, C{127.0.0.1}, C{[::1]}), with any scheme, user and password,
port (not only the configured one) and the configured base path, each separator also percent-encoded
(C{http%3A%2F%2Fh%3A8000}) or as JSON may escape it (C{http:\\/\\/h}); and aiohttp's C{('h', 8000)} (vLLM's
"Cannot connect to host ..."); its base path alone too where it is its own (not C{/v1}). Only error paths run
it; a pool's cheap test that something may name it is L{marks}.
"""

import re
from functools import lru_cache
from socket import AF_INET6, inet_pton
from urllib.parse import unquote, unquote_to_bytes, urlsplit


class Secret(str):
    """One of a provider's C{hidden} strings that is a credential, its API key: replaced by L{REDACTED} (an
    address is replaced by the provider's name)."""

    __slots__ = ()


class ModelPath(str):
    """One of a provider's C{hidden} strings that is the path on its host of a model it lists by a path
    (L{gomodel.routing.selectors.public_id}): replaced by C{shown}, the id clients know the model by."""

    def __new__(cls, path: str, shown: str):
        hidden = super().__new__(cls, path)
        hidden.shown = shown
        return hidden


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


# A base path any provider may have (an upstream's own is hidden alone too: L{scrubber}).
_COMMON_PATHS = ("", "/v1")


def hosts_of(hide) -> list:
    """The host names and addresses in C{hide} (no L{Secret}), lower case, without brackets, zone or trailing dot;
    for a loopback one every name of the loopback host; for an IPv4 one its IPv4-mapped IPv6 form too (each IPv6
    address then found in every form it may be written in: L{_ipv6_forms})."""
    hosts = []
    for h in hide:
        if not h or h.__class__ is Secret or h.__class__ is ModelPath:
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
        if ":" in host:
            host = host.partition("%")[0]  # (its zone: found with it, L{scrubber})
        hosts.append(host)
        if _IPV4.fullmatch(host):
            hosts.append("::ffff:" + host)
        if host in _LOOPBACK or host.startswith("127.") or host.endswith(".localhost"):
            hosts.extend(_LOOPBACK)
    return sorted(dict.fromkeys(hosts), key=len, reverse=True)


def _ipv6_forms(host: str):
    """Every text Python's C{ipaddress} reads as the IPv6 address C{host}, each a list of patterns (tokens): each
    group with or without its leading zeros, any run of zero groups written as C{::} or not, the last 32 bits also as
    a dotted IPv4 address, each colon also percent-encoded (a URL in a query); None where C{host} is no IPv6 address."""
    try:
        packed = inet_pton(AF_INET6, host)  # (not ipaddress, loaded for no upstream: gomodel.lean)
    except (OSError, ValueError):
        return None
    values = [packed[i] << 8 | packed[i + 1] for i in range(0, 16, 2)]
    groups = ["00{0,3}+" if v == 0 else ("0{0,%d}+" % (4 - len("%x" % v)) if v < 0x1000 else "") + "%x" % v
              for v in values]
    quad = [re.escape(c) for c in "%d.%d.%d.%d" % tuple(packed[12:])]
    forms = [_joined(groups), _joined(groups[:6]) + [_COLON] + quad]
    for i in range(8):
        for j in range(i + 1, 9):
            if values[j - 1] != 0:
                break
            forms.append(_joined(groups[:i]) + [_COLON, _COLON] + _joined(groups[j:]))
            if j <= 6:
                forms.append(_joined(groups[:i]) + [_COLON, _COLON] + _joined(groups[j:6]) + [_COLON] * (j < 6) + quad)
    return forms


def _trie(forms) -> dict:
    """C{forms} (lists of tokens) as a trie: token -> the trie of what follows it, C{""} where a form ends."""
    trie = {}
    for form in forms:
        node = trie
        for token in form:
            node = node.setdefault(token, {})
        node[""] = {}
    return trie


def _joined(groups) -> list:
    """C{groups} (patterns) with a C{:} token between each two."""
    tokens = []
    for g in groups:
        tokens += [_COLON, g] if tokens else [g]
    return tokens


def _alternatives(node) -> str:
    """The pattern of a trie of tokens (each text the same in every branch from the root to C{node} matched once: a
    search tries no branch twice)."""
    if not node:
        return ""
    parts = [token + _alternatives(child) for token, child in sorted(node.items(), key=lambda i: i[0] == "")]
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


def _path_source(path: str) -> str:
    return _SLASH.join(re.escape(part) for part in path.split("/"))


@lru_cache(maxsize=256)
def scrubber(hide: tuple):
    """(str pattern, bytes pattern) finding C{hide}'s addresses in any shape (the module's docstring) and its keys
    (group C{key}), or None when it holds nothing to hide."""
    # Each host is in the pattern once, every IPv6 form of every address in one trie (L{_trie}): a loopback
    # upstream's pattern then compiles in a few milliseconds, not tens (it compiles on the reactor, at a
    # process's first error from the pool).
    keys = [re.escape(h) for h in hide if h and h.__class__ is Secret]
    models = [_path_source(h) for h in hide if h.__class__ is ModelPath]
    names, v6 = [], []
    for host in hosts_of(hide):
        forms = _ipv6_forms(host) if ":" in host else None
        if forms is None:
            names.append(rf"{re.escape(host)}(?![\w-])(?:\.(?=:|/|\\|%))?")
        else:
            v6 += forms
    if v6:  # an IPv6 address with its zone: bracketed, or bare where no other address character touches it
        names.insert(0, rf"(?:(?P<b>\[|%5B)|(?<![\w:.])){_alternatives(_trie(v6))}(?:%(?:25)?[\w.~-]{{1,64}})?"
                        rf"(?(b)(?:\]|%5D)|(?![\w:]))")
    alternatives = [rf"(?P<key>(?-i:{'|'.join(keys)}))" if keys else "(?P<key>(?!))"]
    if models:  # (a model's path, as it is: before an own base path, which may begin it)
        alternatives.append(rf"(?P<model>(?-i:{'|'.join(models)}))(?![\w~.-])")
    if names:
        host = "(?:" + "|".join(names) + ")"
        paths = sorted({urlsplit(h).path for h in hide if h and h.__class__ is str and "://" in h} - {""},
                       key=len, reverse=True)
        path = rf"(?:(?:{'|'.join(_path_source(p) for p in paths)})(?![\w-]))?" if paths else ""
        # aiohttp's ('h', 8000), or a URL (a user and password only after a scheme, each part bounded: no text
        # makes it scan far from each place)
        alternatives.append(rf"""(?:(?P<q>['"])|{_START}(?:[a-z][a-z0-9+.-]{{0,31}}{_COLON}{_SLASH}{_SLASH}"""
                            rf"""(?:[^\s/@"'<>()\[\]|,;=]{{1,128}}{_AT})?)?){host}"""
                            rf"""(?(q)(?P=q),\s*\d{{1,5}}(?!\d)|(?:{_COLON}\d{{1,5}}(?!\d))?{path})""")
        # its base path alone, where it is its own (not a provider's C{/v1}): a path that no host, no other path
        # segment and no word comes right before
        own = [p for p in paths if p.rstrip("/").lower() not in _COMMON_PATHS]
        if own:
            alternatives.append(rf"(?<![\w.~%:/\\-])(?:{'|'.join(_path_source(p.rstrip('/')) for p in own)})"
                                r"(?![\w~-]|\.\w)")
    if len(alternatives) == 1 and not keys:
        return None
    source = "|".join(alternatives)
    shown = {h: h.shown for h in hide if h.__class__ is ModelPath} or None
    return re.compile(source, re.IGNORECASE), re.compile(source.encode(), re.IGNORECASE), shown


def _model_shown(shown: dict, path):
    """What a client sees in place of C{path} (str or bytes, as a pattern of L{scrubber} found it: each slash also
    as JSON or a URL may escape it), by C{shown} (a model's path -> the id it is known by)."""
    if path.__class__ is bytes:
        return _model_shown(shown, path.decode("utf-8")).encode()
    return shown[re.sub(r"\\/|%2F", "/", path)]


def marks(hide):
    """What finds each host (by every name of it, L{hosts_of}; in any case, an IPv6 address in any of its forms) and
    key of C{hide} in a text (bytes): a L{Marks}, the cheap test before L{scrubbed}; None where C{hide} holds none."""
    # One trie of the hosts' texts (names a character a token) in lower case, searched for in the text lowered: at
    # each place of a text a search tries each first character once, not each host (every relayed answer's headers go
    # through it), and a search without IGNORECASE skips to where a first character is (half the cost); a key as it is.
    forms = []
    for host in hosts_of(hide):
        host = host.lower()
        v6 = _ipv6_forms(host) if ":" in host else None
        forms += [[re.escape(c) for c in host]] if v6 is None else v6
    # (a form's first colon as two, each a literal)
    forms = [f for form in forms for f in (([":"] + form[1:], ["%3a"] + form[1:]) if form[0] == _COLON else (form,))]
    keys = [re.escape(h) for h in hide if h and h.__class__ is Secret]
    keys += [re.escape(w) for h in hide if h.__class__ is ModelPath for w in (h, h.replace("/", "\\/"))]
    if not forms and not keys:
        return None
    hosts = re.compile(_alternatives(_trie(forms)).replace(_COLON, _COLON.lower()).encode()) if forms else None
    return Marks(hosts, re.compile("|".join(keys).encode()) if keys else None)


class Marks:
    """A pool's cheap test that a text (bytes) may name one of its hosts or keys (L{marks})."""

    __slots__ = ("_hosts", "_keys")

    def __init__(self, hosts, keys):
        self._hosts = hosts
        self._keys = keys

    def search(self, text):
        """The first match in C{text} of a host (in any case) or else of a key as it is, or None."""
        found = self._hosts.search(text.lower()) if self._hosts is not None else None
        return found if found is not None or self._keys is None else self._keys.search(text)


def scrubbed(text, hide, name):
    """C{text} (str or bytes) with every address of C{hide} replaced by C{name} (a key by L{REDACTED}, a model's path
    by the id clients know it by: L{ModelPath}), also one written with percent-escapes throughout (decoded then); a
    value that is neither as it is."""
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
        if match.group("key") is not None:
            return key
        return shown if patterns[2] is None or match.group("model") is None else _model_shown(
            patterns[2], match.group("model"))

    text = pattern.sub(replaced, text)
    for _ in range(3):  # (an address percent-encoded once, twice, three times)
        if text.find(percent) < 0:
            break
        decoded = decode(text)
        if decoded == text or pattern.search(decoded) is None:
            break
        text = pattern.sub(replaced, decoded)
    return text
