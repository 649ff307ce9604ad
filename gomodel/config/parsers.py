"""Value parsers: one text (or YAML scalar) in, one typed value out.

Each takes the raw value from the environment or the YAML file and returns
the parsed value, or raises C{ValueError} (or C{TypeError}) with a short
reason; the loader adds the name of the variable or YAML key at fault.
"""

import math
import re

from gomodel.config.catalog import FEWEST_STOPS, MODELS_MODES, PROVIDER_TYPES
from gomodel.config.errors import ConfigError

__all__ = ["checked", "has_control", "duration", "positive_duration", "size", "file_size", "directory", "port",
           "listen_port", "count", "workers", "days", "limit", "ratio", "weight", "price", "models_mode",
           "boolean", "names", "provider_types", "secret", "MAX_DURATION", "MAX_COUNT", "MAX_WORKERS", "MAX_DAYS",
           "MAX_RATIO", "MAX_WEIGHT", "MAX_PRICE"]

MAX_DURATION = 100 * 365 * 86400.0  # 100 years: a duration past it is a mistake (and overflows stores' integers)
MAX_DAYS = 100 * 365
MAX_COUNT = 1_000_000  # the largest count or limit: far past any real one, within every integer type used
MAX_WORKERS = 256  # the most processes GOMODEL_WORKERS (and --workers) may start
MAX_RATIO = 1000.0
MAX_WEIGHT = 1_000_000.0  # weights are relative: a larger one means nothing more
MAX_PRICE = 1_000_000.0  # per million tokens: a unit each


def checked(parse, value, where: str, secret=False):
    """C{parse(value)}, or L{ConfigError} naming C{where} (a variable, or a place in the YAML file) and the
    value (C{(hidden)} when C{secret}) with the parser's reason."""
    try:
        return parse(value)
    except (TypeError, ValueError) as e:
        shown = "(hidden)" if secret else repr(value)
        raise ConfigError(f"{where}: invalid value {shown}: {e}") from None


def has_control(text: str) -> bool:
    """Whether C{text} holds a control character (a line break, a tab, DEL...): no header or URL may."""
    return any(ord(c) < 0x20 or ord(c) == 0x7f for c in text)


def _number(value) -> float:
    """A finite float from an int, a float or a text (C{"1.5"}, C{"2e3"}); YAML booleans are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("not a number")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def duration(value) -> float:
    """Seconds from C{30}, C{"30"}, C{"1.5s"}, C{"500ms"}, C{"5m"}, C{"1h30m"}, C{"30d"}; 0 allowed.

    @raise ValueError: not a duration, negative, or over L{MAX_DURATION} (NaN and infinity too).
    """
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, (int, float)):
        seconds = value  # (an int too large for a float is compared exactly, then refused)
    else:
        text = str(value).strip().lower()
        if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):  # (ASCII digits: \d takes "٣٠" too)
            seconds = float(text)
        else:
            parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)", text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError("not a duration (use e.g. 30, 30s, 500ms, 5m, 1h, 30d)")
            scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
            seconds = sum(float(n) * scale[u] for n, u in parts)
    if not seconds >= 0:
        raise ValueError("must not be negative" if seconds < 0 else "not a duration")
    if seconds > MAX_DURATION:
        raise ValueError("must be at most 100 years (36500d)")
    return float(seconds)


def positive_duration(value) -> float:
    """Like L{duration}, but 0 is refused.

    @raise ValueError: not a duration, or not above zero.
    """
    seconds = duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3}


def output_expiry(value) -> int:
    """Whole seconds, like L{duration}, from an hour to 30 days (OpenAI's bounds of C{output_expires_after});
    0: never.

    @raise ValueError: not a duration, or out of range.
    """
    seconds = duration(value)
    if seconds and not 3600 <= seconds <= 30 * 86400:
        raise ValueError("must be 0 (never) or between 1h and 30d")
    return round(seconds)


def size(value, maximum=1024**3) -> int:
    """Bytes from C{10485760}, C{"10M"}, C{"500KB"}, C{"1G"}: between 1 KB and C{maximum} (1 GB).

    @raise ValueError: not a size, or out of range.
    """
    if isinstance(value, bool):
        raise ValueError("not a size")
    match = re.fullmatch(r"\s*([0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("not a size (use e.g. 10M, 500KB or a byte count)")
    result = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if not 1024 <= result <= maximum:
        raise ValueError(f"must be between 1KB and {maximum // 1024**3}GB")
    return result


def file_size(value) -> int:
    """Like L{size}, up to 8 GB (uploads are streamed to disk, never held in memory)."""
    return size(value, 8 * 1024**3)


def directory(value) -> str:
    """A directory path, not blank (it need not exist yet)."""
    if isinstance(value, (bool, list, dict)):  # (str() made YAML's [a] the directory "['a']")
        raise ValueError("must be a directory path (text)")
    path = str(value).strip()
    if not path:
        raise ValueError("must be a directory path")
    return path


def port(value) -> int:
    """A TCP port number, 0 to 65535."""
    number = whole(value)
    if not 0 <= number <= 65535:
        raise ValueError("not a TCP port")
    return number


def listen_port(value) -> tuple:
    """The listen descriptions for one TCP port: C{"9000"} gives C{("tcp:9000",)}."""
    return (f"tcp:{port(value)}",)


def whole(value) -> int:
    """A whole number from an int or a text of ASCII digits (not int()'s "٣٠" or "1_000"); YAML booleans and
    floats are refused."""
    if isinstance(value, (bool, float)):
        raise ValueError("not a whole number")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not re.fullmatch(r"-?[0-9]{1,30}", text):
        raise ValueError("not a whole number")
    return int(text)


def count(value, maximum=MAX_COUNT) -> int:
    """A whole number, from 1 to C{maximum} (L{MAX_COUNT})."""
    number = whole(value)
    if not 1 <= number <= maximum:
        raise ValueError(f"must be at least 1 and at most {maximum}")
    return number


def stop_sequences(value) -> int:
    """A provider's most stop sequences: a whole number from L{FEWEST_STOPS} (the fewest any type takes: a
    translated answer is watched for those past them) to L{MAX_COUNT}."""
    number = whole(value)
    if not FEWEST_STOPS <= number <= MAX_COUNT:
        raise ValueError(f"must be at least {FEWEST_STOPS} and at most {MAX_COUNT}")
    return number


def workers(value) -> int:
    """Like L{count}, up to L{MAX_WORKERS} processes."""
    return count(value, MAX_WORKERS)


def days(value) -> int:
    """Like L{count}, up to L{MAX_DAYS} (100 years)."""
    return count(value, MAX_DAYS)


def _one_of(value, choices, shown=None) -> str:
    """C{value} lower-cased, when it is one of C{choices}."""
    text = str(value).strip().lower()
    if text not in choices:
        raise ValueError("must be one of: " + ", ".join(shown or choices))
    return text


def models_mode(value) -> str:
    """One of L{MODELS_MODES}, case-insensitive."""
    return _one_of(value, MODELS_MODES)


ROUTING_STRATEGIES = ("load", "least_requests", "round_robin", "random")


def cache_salt_mode(value) -> str:
    """C{tenant} (a salt per managed key's tenant) or C{off} (also YAML's false: a bare C{off} reads so)."""
    return "off" if value is False else _one_of(value, ("tenant", "off"))


def routing_strategy(value) -> str:
    """One of L{ROUTING_STRATEGIES}, case-insensitive."""
    return _one_of(value, ROUTING_STRATEGIES)


def limit(value) -> int:
    """A whole number from 0 (no limit) to L{MAX_COUNT}."""
    number = whole(value)
    if not 0 <= number <= MAX_COUNT:
        raise ValueError(f"must be 0 (no limit) or more, at most {MAX_COUNT}")
    return number


def ratio(value) -> float:
    """A number above 1 and at most L{MAX_RATIO}, e.g. C{1.5} (one thing may be that many times another)."""
    number = _number(value)
    if not 1 < number <= MAX_RATIO:
        raise ValueError(f"must be greater than 1 and at most {MAX_RATIO:g}")
    return number


def weight(value) -> float:
    """A number above 0 and at most L{MAX_WEIGHT}, e.g. C{2.5} (a share relative to its siblings')."""
    number = _number(value)
    if not 0 < number <= MAX_WEIGHT:
        raise ValueError(f"must be greater than 0 and at most {MAX_WEIGHT:.0f}")
    return number


def price(value) -> float:
    """An amount from 0 to L{MAX_PRICE}, e.g. C{0.15} (per million tokens)."""
    number = _number(value)
    if not 0 <= number <= MAX_PRICE:
        raise ValueError(f"must be 0 or more, at most {MAX_PRICE:.0f}")
    return number


# The gateway's paths that a path of the operator's (C{METRICS_ENDPOINT}) would shadow: every path under these
# prefixes, and the routes outside them (vLLM's pooling routes at its root, Cohere's /v2/embed, the health check).
RESERVED_PREFIXES = ("/v1/", "/p/", "/admin/", "/health/")
ROOT_ROUTES = ("/health", "/rerank", "/v2/rerank", "/score", "/classify", "/pooling", "/v2/embed")


def route_path(value) -> str:
    """A path the gateway serves, e.g. C{/metrics}, that no route of the gateway's has."""
    path = str(value).strip()
    if not re.fullmatch(r"/[!-~]*", path) or any(c in path for c in "?#"):
        raise ValueError("must be a path such as /metrics, in ASCII, without ? or #")
    bare = path.rstrip("/") or "/"
    if bare in ROOT_ROUTES:
        raise ValueError(f"{path} is the gateway's route {bare} (which it would shadow): choose a path of its own, "
                         "such as /metrics")
    prefix = next((p for p in RESERVED_PREFIXES if path.startswith(p)), None)
    if prefix is not None:
        raise ValueError(f"{path} is under {prefix}, the gateway's routes' (which it would shadow): choose a path "
                         "of its own, such as /metrics")
    return bare


def log_format(value) -> str:
    """C{text} or C{json}."""
    return _one_of(value, ("text", "json"))


def log_level(value) -> str:
    """C{debug}, C{info}, C{warn} (or C{warning}), C{error} or C{critical}."""
    return _one_of(value, ("debug", "info", "warn", "warning", "error", "critical"),
                   ("debug", "info", "warn", "error", "critical"))


def boolean(value) -> bool:
    """C{True} from 1/true/yes/on, C{False} from 0/false/no/off (any case), or a YAML boolean."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def names(value) -> tuple:
    """Lower-case names from a comma-separated text or a YAML list; slashes around each are dropped."""
    items = value if isinstance(value, list) else str(value).split(",")
    if isinstance(value, (dict, bool)) or any(isinstance(i, (dict, list, bool)) for i in items):
        raise ValueError("must be names separated by commas, or a list of names")
    return tuple(str(i).strip().strip("/").lower() for i in items if str(i).strip().strip("/"))


def provider_types(value) -> tuple:
    """Like L{names}, each a known provider type."""
    types = names(value)
    unknown = [t for t in types if t not in PROVIDER_TYPES]
    if unknown:
        raise ValueError(f"unknown provider type(s) {', '.join(unknown)}; known: {', '.join(PROVIDER_TYPES)}")
    return types


def secret(value) -> str:
    """A text a client can send as a header: no control characters, no whitespace around it.

    The loader never shows it in a message; YAML must give it as text (C{0123} or C{1e3} unquoted are numbers).
    """
    if not isinstance(value, str):
        raise ValueError("must be text (quote it in YAML)")
    if has_control(value):
        raise ValueError("must not contain control characters (line breaks included)")
    if value != value.strip():
        raise ValueError("must not be blank nor start or end with whitespace")
    if "${" in value:  # a YAML ${VAR} whose variable is unset: a key anyone can read in the file
        raise ValueError("looks like an unresolved ${...} placeholder (is its variable set?)")
    return value


def redis_key_prefix(value) -> str:
    """The text every key and channel a deployment uses in Redis starts with (C{gomodel:}): 1 to 100
    printable ASCII characters, no whitespace, no Redis pattern character (C{* ? [ ] \\})."""
    if not isinstance(value, str):
        raise ValueError("must be text (quote it in YAML)")
    if not 1 <= len(value) <= 100:
        raise ValueError("must be 1 to 100 characters long")
    if not all("!" <= c <= "~" for c in value) or any(c in "*?[]\\" for c in value):
        raise ValueError("must be printable ASCII without whitespace or any of * ? [ ] \\")
    return value


def storage_type(value) -> str:
    """C{sqlite} (one host) or C{postgresql} (several hosts on one database), GoModel's names."""
    return _one_of(value, ("sqlite", "postgresql"))


_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# libpq's other parameters that take one of a few words, and those that take a whole number: a value it
# refuses fails every connection, so the start.
_CHOICES = {"sslmode": _SSLMODES, "gssencmode": ("disable", "prefer", "require"),
            "channel_binding": ("disable", "prefer", "require"), "load_balance_hosts": ("disable", "random"),
            "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"),
            "sslnegotiation": ("postgres", "direct")}
_INTEGERS = ("connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
             "tcp_user_timeout")


def postgres_url(value) -> str:
    """A PostgreSQL URL: C{postgresql://} or C{postgres://} (libpq's form, with any of its parameters), read
    as libpq reads it: a URL no server could ever be reached by (a parameter libpq does not know, a port
    that is not one, an C{sslmode} libpq has not) fails the start, where it would be retried for ever. (The
    errors name no part of the URL: it may hold a password.)"""
    from psycopg.conninfo import conninfo_to_dict

    text = str(value).strip()
    if not text.startswith(("postgresql://", "postgres://")):
        raise ValueError("must be a postgresql:// URL")
    try:
        parts = conninfo_to_dict(text)
    except Exception:
        raise ValueError("is not a URL libpq reads (a misspelt parameter, a stray character?)") from None
    for port in str(parts.get("port") or "").split(","):
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError("has a port that is not a number from 1 to 65535")
    for name, choices in _CHOICES.items():
        if parts.get(name) and parts[name] not in choices:  # (an empty value is libpq's default)
            raise ValueError(f"has an {name} that is not one of {', '.join(choices)}" if name == "sslmode" else
                             f"has a {name} that is not one of {', '.join(choices)}")
    for name in _INTEGERS:
        if parts.get(name) and not re.fullmatch(r"\s*[-+]?[0-9]+\s*", str(parts[name])):
            raise ValueError(f"has a {name} that is not a whole number")
    return text


def redis_url(value) -> str:
    """A Redis URL: C{redis://}, C{rediss://} or C{unix://}."""
    text = str(value).strip()
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    from gomodel.redis_client import check

    check(text)
    return text
