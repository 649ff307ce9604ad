"""Configuration: environment over YAML, read once into one frozen L{Config}.

This is the only module that reads the environment; it is handed the mapping
to read, so tests pass a plain dict. Every bad value raises L{ConfigError}
whose message names the variable (or YAML key) at fault.
"""

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence
from urllib.parse import urlsplit

import yaml


class ConfigError(Exception):
    """The configuration cannot be used; the message says which setting and why."""


@dataclass(frozen=True)
class ProviderType:
    """What the gateway knows about one kind of OpenAI-compatible upstream."""

    name: str
    default_base_url: str
    keyless: bool  # may be registered without an API key


PROVIDER_TYPES = {
    t.name: t
    for t in (
        ProviderType("vllm", "http://localhost:8000/v1", True),
        ProviderType("openai", "https://api.openai.com/v1", False),
        ProviderType("ollama", "http://localhost:11434/v1", True),
        ProviderType("groq", "https://api.groq.com/openai/v1", False),
        ProviderType("openrouter", "https://openrouter.ai/api/v1", False),
        ProviderType("xai", "https://api.x.ai/v1", False),
        ProviderType("deepseek", "https://api.deepseek.com/v1", False),
    )
}

# Server types whose API lives under /v1 of the server root whatever the user wrote.
_ROOT_SERVERS = {"vllm", "ollama"}

MODELS_MODES = ("fallback", "allowlist")


@dataclass(frozen=True)
class ProviderConfig:
    """One upstream instance, e.g. C{vllm-test}."""

    name: str
    type: str
    base_url: str  # the OpenAI API base, e.g. http://h:8000/v1 (no trailing slash)
    root_url: str  # the server root, e.g. http://h:8000 (vLLM's /tokenize lives here)
    api_key: Optional[str] = field(default=None, repr=False)
    models: tuple = ()

    @property
    def host(self) -> str:
        """The upstream's host name: never shown to clients."""
        return urlsplit(self.base_url).hostname or ""


@dataclass(frozen=True)
class Timeouts:
    """Upstream timeouts in seconds; 0 means "no limit" where allowed."""

    connect: float = 10.0
    response_header: float = 600.0
    stream_idle: float = 300.0
    client_stall: float = 600.0
    stream_max: float = 0.0


@dataclass(frozen=True)
class Config:
    providers: tuple = ()
    models_mode: str = "fallback"
    master_key: Optional[str] = field(default=None, repr=False)
    body_size_limit: int = 10 * 1024 * 1024
    timeouts: Timeouts = Timeouts()
    listen: tuple = ("tcp:8080",)
    models_refresh_interval: float = 300.0
    pool_max_per_host: int = 256
    pool_idle_timeout: float = 4.0
    passthrough_enabled: bool = True
    passthrough_types: tuple = ("vllm", "openai", "openrouter", "ollama")
    passthrough_admin_allowed: tuple = ()  # vLLM admin routes let through /p/ anyway
    access_log: bool = True
    workers: int = 1  # processes sharing the listening port(s)
    data_dir: str = "./data"  # files and batches: the SQLite database and file contents
    files_max_bytes: int = 512 * 1024 * 1024
    batch_concurrency_per_provider: int = 4
    batch_max_attempts: int = 4
    responses_retention: float = 30 * 86400.0  # stored responses older than this are swept
    warnings: tuple = ()  # things worth telling the operator at start


# name -> (env var, YAML key under server:, parser)
def _duration(value) -> float:
    """Seconds from C{30}, C{"30"}, C{"1.5s"}, C{"500ms"}, C{"5m"}, C{"1h30m"}, C{"30d"}."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError("not a duration (use e.g. 30, 30s, 500ms, 5m, 1h, 30d)")
            scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
            seconds = sum(float(n) * scale[u] for n, u in parts)
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def _positive_duration(value) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3}


def _size(value, maximum=1024**3) -> int:
    """Bytes from C{10485760}, C{"10M"}, C{"500KB"}, C{"1G"}."""
    if isinstance(value, bool):
        raise ValueError("not a size")
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("not a size (use e.g. 10M, 500KB or a byte count)")
    size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if not 1024 <= size <= maximum:
        raise ValueError(f"must be between 1KB and {maximum // 1024**3}GB")
    return size


def _file_size(value) -> int:
    """Like L{_size}, up to 8 GB (uploads are streamed to disk, never held in memory)."""
    return _size(value, 8 * 1024**3)


def _directory(value) -> str:
    path = str(value).strip()
    if not path:
        raise ValueError("must be a directory path")
    return path


def _port(value) -> int:
    port = int(str(value).strip())
    if not 0 <= port <= 65535:
        raise ValueError("not a TCP port")
    return port


def _count(value) -> int:
    count = int(str(value).strip())
    if count < 1:
        raise ValueError("must be at least 1")
    return count


def _mode(value) -> str:
    mode = str(value).strip().lower()
    if mode not in MODELS_MODES:
        raise ValueError("must be one of: " + ", ".join(MODELS_MODES))
    return mode


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _names(value) -> tuple:
    items = value if isinstance(value, list) else str(value).split(",")
    return tuple(str(i).strip().strip("/").lower() for i in items if str(i).strip().strip("/"))


def _provider_types(value) -> tuple:
    types = _names(value)
    unknown = [t for t in types if t not in PROVIDER_TYPES]
    if unknown:
        raise ValueError(f"unknown provider type(s) {', '.join(unknown)}; known: {', '.join(PROVIDER_TYPES)}")
    return types


def _secret(value) -> str:
    return str(value)


# setting -> (environment variable, parser); the YAML key is the setting under server:.
_SERVER_SETTINGS = {
    "port": ("PORT", _port),
    "master_key": ("GOMODEL_MASTER_KEY", _secret),
    "body_size_limit": ("BODY_SIZE_LIMIT", _size),
    "connect_timeout": ("HTTP_CONNECT_TIMEOUT", _positive_duration),
    "response_header_timeout": ("HTTP_RESPONSE_HEADER_TIMEOUT", _positive_duration),
    "stream_idle_timeout": ("HTTP_STREAM_IDLE_TIMEOUT", _duration),
    "client_stall_timeout": ("HTTP_CLIENT_STALL_TIMEOUT", _duration),
    "stream_max_duration": ("HTTP_STREAM_MAX_DURATION", _duration),
    "configured_provider_models_mode": ("CONFIGURED_PROVIDER_MODELS_MODE", _mode),
    "models_refresh_interval": ("MODELS_REFRESH_INTERVAL", _positive_duration),
    "pool_max_per_host": ("HTTP_POOL_MAX_PER_HOST", _count),
    "pool_idle_timeout": ("HTTP_POOL_IDLE_TIMEOUT", _positive_duration),
    "passthrough_enabled": ("ENABLE_PASSTHROUGH_ROUTES", _bool),
    "passthrough_types": ("ENABLED_PASSTHROUGH_PROVIDERS", _provider_types),
    "passthrough_admin_allowed": ("PASSTHROUGH_ALLOWED_ADMIN_ROUTES", _names),
    "access_log": ("GOMODEL_ACCESS_LOG", _bool),
    "workers": ("GOMODEL_WORKERS", _count),
    "data_dir": ("GOMODEL_DATA_DIR", _directory),
    "files_max_bytes": ("FILES_MAX_BYTES", _file_size),
    "batch_concurrency_per_provider": ("BATCH_CONCURRENCY_PER_PROVIDER", _count),
    "batch_max_attempts": ("BATCH_MAX_ATTEMPTS", _count),
    "responses_retention": ("RESPONSES_RETENTION", _positive_duration),
}
# GoModel's name for the refresh interval, accepted as well.
_ENV_ALIASES = {"CACHE_REFRESH_INTERVAL": "models_refresh_interval"}

_PROVIDER_FIELDS = ("BASE_URL", "API_KEY", "MODELS")
_SUFFIX = re.compile(r"[A-Za-z0-9]+(_[A-Za-z0-9]+)*")
_YAML_PROVIDER_KEYS = {"type", "base_url", "api_key", "models"}


def load_config(
    environ: Mapping[str, str],
    yaml_path: Optional[str] = None,
    listen: Sequence[str] = (),
) -> Config:
    """Build the L{Config} from C{environ}, the YAML file and C{--listen} values.

    The YAML path is C{yaml_path}, else C{GOMODEL_CONFIG} from C{environ}.
    Environment values win over YAML; empty environment values count as unset.
    """
    env = {k: v for k, v in environ.items() if v != ""}
    yaml_path = yaml_path or env.get("GOMODEL_CONFIG")
    document = _read_yaml(yaml_path, env) if yaml_path else {}
    server = _section(document, "server")
    unknown = set(server) - set(_SERVER_SETTINGS)
    if unknown:
        raise ConfigError(f"{yaml_path}: unknown key(s) under server: {', '.join(sorted(unknown))}")
    unknown = set(document) - {"server", "providers"}
    if unknown:
        raise ConfigError(f"{yaml_path}: unknown top-level key(s): {', '.join(sorted(unknown))}")

    settings = {}
    for key, (_, parse) in _SERVER_SETTINGS.items():
        if key in server and server[key] is not None:
            settings[key] = _parsed(parse, server[key], f"{yaml_path}: server.{key}")
    for alias, key in _ENV_ALIASES.items():
        if alias in env:
            settings[key] = _parsed(_SERVER_SETTINGS[key][1], env[alias], alias)
    for key, (var, parse) in _SERVER_SETTINGS.items():
        if var in env:
            settings[key] = _parsed(parse, env[var], var)

    warnings = []
    providers = _providers(document.get("providers"), yaml_path, env, warnings)

    if listen:
        listen = tuple(listen)
    else:
        listen = (f"tcp:{settings.get('port', 8080)}",)

    defaults = Timeouts()
    timeouts = Timeouts(
        connect=settings.get("connect_timeout", defaults.connect),
        response_header=settings.get("response_header_timeout", defaults.response_header),
        stream_idle=settings.get("stream_idle_timeout", defaults.stream_idle),
        client_stall=settings.get("client_stall_timeout", defaults.client_stall),
        stream_max=settings.get("stream_max_duration", defaults.stream_max),
    )
    base = Config()
    return Config(
        providers=providers,
        models_mode=settings.get("configured_provider_models_mode", base.models_mode),
        master_key=settings.get("master_key"),
        body_size_limit=settings.get("body_size_limit", base.body_size_limit),
        timeouts=timeouts,
        listen=listen,
        models_refresh_interval=settings.get("models_refresh_interval", base.models_refresh_interval),
        pool_max_per_host=settings.get("pool_max_per_host", base.pool_max_per_host),
        pool_idle_timeout=settings.get("pool_idle_timeout", base.pool_idle_timeout),
        passthrough_enabled=settings.get("passthrough_enabled", base.passthrough_enabled),
        passthrough_types=settings.get("passthrough_types", base.passthrough_types),
        passthrough_admin_allowed=settings.get("passthrough_admin_allowed", base.passthrough_admin_allowed),
        access_log=settings.get("access_log", base.access_log),
        workers=settings.get("workers", base.workers),
        data_dir=settings.get("data_dir", base.data_dir),
        files_max_bytes=settings.get("files_max_bytes", base.files_max_bytes),
        batch_concurrency_per_provider=settings.get("batch_concurrency_per_provider",
                                                    base.batch_concurrency_per_provider),
        batch_max_attempts=settings.get("batch_max_attempts", base.batch_max_attempts),
        responses_retention=settings.get("responses_retention", base.responses_retention),
        warnings=tuple(warnings),
    )


def _parsed(parse, value, where):
    try:
        return parse(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: invalid value {_shown(where, value)}: {e}") from None


def _shown(where, value):
    return "(hidden)" if ("KEY" in where.upper()) else repr(value)


_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _read_yaml(path, env) -> dict:
    """Read the YAML file, expanding C{${VAR}} and C{${VAR:-default}} from C{env}."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    text = _PLACEHOLDER.sub(lambda m: env.get(m.group(1), m.group(2) if m.group(2) is not None else m.group(0)), text)
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return document


def _section(document, name) -> dict:
    value = document.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"the config key {name!r} must be a mapping")
    return value


def _providers(yaml_providers, yaml_path, env, warnings) -> tuple:
    """Merge YAML provider blocks with C{<TYPE>[_<SUFFIX>]_*} variables (env wins)."""
    entries = {}  # name -> dict(type, base_url, api_key, models, where)
    if yaml_providers is not None:
        if not isinstance(yaml_providers, dict):
            raise ConfigError(f"{yaml_path}: providers must be a mapping of name -> settings")
        for name, block in yaml_providers.items():
            where = f"{yaml_path}: providers.{name}"
            if not isinstance(block, dict):
                raise ConfigError(f"{where} must be a mapping")
            unknown = set(block) - _YAML_PROVIDER_KEYS
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
            type_ = block.get("type")
            if type_ not in PROVIDER_TYPES:
                raise ConfigError(f"{where}.type must be one of: {', '.join(PROVIDER_TYPES)}")
            entries[str(name)] = {
                "type": type_,
                "base_url": (block.get("base_url"), f"{where}.base_url"),
                "api_key": (block.get("api_key"), f"{where}.api_key"),
                "models": (_yaml_models(block.get("models"), where), f"{where}.models"),
            }

    for (type_, suffix), fields in sorted(_env_providers(env).items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        if suffix is None:
            same_type = [n for n, e in entries.items() if e["type"] == type_]
            if len(same_type) > 1:
                warnings.append(
                    f"{type_.upper()}_* variables ignored: the YAML file has several {type_} "
                    f"providers ({', '.join(same_type)}); use suffixed variables instead"
                )
                continue
            name = same_type[0] if same_type else type_
        else:
            name = f"{type_}-{suffix.lower().replace('_', '-')}"
            existing = entries.get(name)
            if existing is not None and existing["type"] != type_:
                warnings.append(f"{type_.upper()}_{suffix}_* variables ignored: provider {name!r} "
                                f"is of type {existing['type']} in the YAML file")
                continue
        entry = entries.setdefault(name, {"type": type_})
        for field_name, (value, var) in fields.items():
            if field_name == "models":
                value = tuple(m.strip() for m in value.split(",") if m.strip())
            entry[field_name] = (value, var)

    providers = []
    for name in sorted(entries):
        built = _build_provider(name, entries[name], warnings)
        if built is not None:
            providers.append(built)
    return tuple(providers)


def _env_providers(env) -> dict:
    """Find C{<TYPE>_[<SUFFIX>_]{BASE_URL,API_KEY,MODELS}} variables: {(type, suffix): {field: (value, var)}}."""
    found = {}
    for var, value in env.items():
        for type_ in PROVIDER_TYPES:
            prefix = type_.upper() + "_"
            if not var.startswith(prefix):
                continue
            rest = var[len(prefix):]
            for fld in _PROVIDER_FIELDS:
                if rest == fld:
                    suffix = None
                elif rest.endswith("_" + fld):
                    suffix = rest[: -len(fld) - 1]
                    if not _SUFFIX.fullmatch(suffix):
                        raise ConfigError(
                            f"{var}: the instance suffix {suffix!r} must be letters and digits "
                            "separated by single underscores"
                        )
                else:
                    continue
                found.setdefault((type_, suffix), {})[fld.lower()] = (value, var)
    return found


def _yaml_models(models, where) -> tuple:
    if models is None:
        return ()
    if not isinstance(models, list):
        raise ConfigError(f"{where}.models must be a list")
    ids = []
    for item in models:
        if isinstance(item, dict):
            item = item.get("id")
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"{where}.models: each entry must be a model id (or a mapping with id)")
        ids.append(item.strip())
    return tuple(ids)


def _build_provider(name, entry, warnings) -> Optional[ProviderConfig]:
    type_ = PROVIDER_TYPES[entry["type"]]
    base_url, base_where = entry.get("base_url", (None, None))
    api_key, key_where = entry.get("api_key", (None, None))
    models, _ = entry.get("models", ((), None))
    if api_key is not None:
        api_key = str(api_key)
        if "${" in api_key:
            raise ConfigError(f"{key_where}: looks like an unresolved ${{...}} placeholder")
        if any(ord(c) < 0x20 or ord(c) == 0x7f for c in api_key):
            raise ConfigError(f"{key_where}: must not contain control characters (line breaks included)")
        if not api_key:
            api_key = None
    if api_key is None and not type_.keyless:
        warnings.append(f"provider {name!r} ({type_.name}) skipped: it needs an API key "
                        f"({type_.name.upper()}_API_KEY or api_key in YAML)")
        return None
    base_url, root_url = _normalise_base_url(base_url or type_.default_base_url, type_.name,
                                             base_where or "the default base URL")
    return ProviderConfig(name=name, type=type_.name, base_url=base_url, root_url=root_url,
                          api_key=api_key, models=tuple(models))


def _normalise_base_url(url, type_name, where):
    """Return (API base ending in /v1 where the server has one, server root)."""
    url = str(url).strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{where}: not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: must not have a query or fragment")
    url = url.rstrip("/")
    path = urlsplit(url).path
    if path.endswith("/v1"):
        return url, url[: -len("/v1")]
    if type_name in _ROOT_SERVERS or not path:
        return url + "/v1", url
    return url, url
