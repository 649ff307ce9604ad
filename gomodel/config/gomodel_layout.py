"""GoModel's C{config.yaml} layout, read as ours.

GoModel nests its settings by feature (C{storage.postgresql.url},
C{admin.ui_enabled}, C{metrics.enabled}, C{cache.model.refresh_interval},
...). A file written for GoModel starts this gateway: each of its settings
that gomodel has is moved to gomodel's key (the environment still wins);
those gomodel has not are named in one warning at start, unless they hold
GoModel's default or say "off" (they change nothing then); and two whose
absence would let clients do more than the file allows are refused:
guardrails turned on, and models not enabled by default.
"""

import re

from gomodel.config.catalog import PROVIDER_TYPES
from gomodel.config.errors import ConfigError, listed

_ANY = object()
_UNKNOWN = object()

# GoModel's setting (its path of keys) -> (our section, our key).
_MOVED = {
    ("server", "enable_passthrough_routes"): ("upstreams", "passthrough_enabled"),
    ("server", "enabled_passthrough_providers"): ("upstreams", "passthrough_types"),
    ("usage", "enabled"): ("usage", "usage_enabled"),
    ("usage", "flush_interval"): ("usage", "usage_flush_interval"),
    ("usage", "retention_days"): ("usage", "usage_retention_days"),
    ("metrics", "enabled"): ("metrics", "metrics_enabled"),
    ("metrics", "endpoint"): ("metrics", "metrics_endpoint"),
    ("storage", "type"): ("store", "storage_type"),
    ("storage", "postgresql", "url"): ("store", "postgres_url"),
    ("storage", "postgresql", "max_conns"): ("store", "postgres_max_conns"),
    ("http", "response_header_timeout"): ("upstreams", "response_header_timeout"),
    ("admin", "endpoints_enabled"): ("auth", "admin_endpoints_enabled"),
    ("admin", "ui_enabled"): ("auth", "admin_ui_enabled"),
    ("cache", "model", "refresh_interval"): ("upstreams", "models_refresh_interval"),
    ("models", "configured_provider_models_mode"): ("upstreams", "configured_provider_models_mode"),
    ("resilience", "circuit_breaker", "failure_threshold"): ("routing", "failure_threshold"),
}

# GoModel's settings that change nothing here while they hold this value (_ANY: whatever they hold).
_IDLE = {
    ("server", "swagger_enabled"): False,
    ("server", "pprof_enabled"): False,
    ("server", "base_path"): "/",
    ("server", "allow_passthrough_v1_alias"): True,  # (/p/{provider}/v1/... is always taken here)
    ("usage", "buffer_size"): _ANY,
    ("usage", "enforce_returning_usage_data"): True,  # (streams always ask for usage here)
    ("logging", "enabled"): False,
    **{("logging", key): _ANY for key in ("log_bodies", "log_headers", "buffer_size", "flush_interval",
                                          "retention_days", "only_model_interactions")},
    ("http", "timeout"): 600,
    ("guardrails", "enabled"): False,
    ("guardrails", "enable_for_batch_processing"): _ANY,
    ("guardrails", "rules"): _ANY,  # (read only when enabled, which is refused)
    ("models", "enabled_by_default"): True,
    ("models", "overrides_enabled"): _ANY,
    ("models", "keep_only_aliases_at_models_endpoint"): False,
    ("fallback", "default_mode"): _ANY,  # (read with manual_rules_path: off turns its rules off)
    ("fallback", "overrides"): _ANY,  # (read with manual_rules_path: a model's mode off turns its rule off)
    ("workflows", "refresh_interval"): _ANY,
    ("cache", "model", "local", "cache_dir"): _ANY,
    ("cache", "response", "simple", "enabled"): False,
    ("cache", "response", "semantic", "enabled"): False,
    ("storage", "mongodb", "url"): _ANY,  # (read only with type mongodb, which is refused)
    ("storage", "mongodb", "database"): _ANY,
    # (sessions are always read here, from GoModel's built-in headers and fields: gomodel.routing.affinity)
    ("session", "enabled"): True,
    ("session", "auto_detect"): True,
    ("session", "builtin_rules"): True,
}

# Sections of GoModel's layout that are not ours: a file naming one is in GoModel's layout.
_GOMODEL_SECTIONS = ("models", "cache", "storage", "logging", "http", "admin", "guardrails", "fallback",
                     "workflows", "resilience", "session")
# GoModel's keys in the sections it shares with ours (their keys are GoModel's when named so).
_SHARED_KEYS = {"server": {"swagger_enabled", "pprof_enabled", "enable_passthrough_routes",
                           "allow_passthrough_v1_alias", "enabled_passthrough_providers", "base_path"},
                "usage": {"enabled", "enforce_returning_usage_data", "buffer_size", "flush_interval",
                          "retention_days"},
                "metrics": {"enabled", "endpoint"}}


# GoModel's environment variables: those this gateway reads are its own settings' names or their aliases
# (CACHE_REFRESH_INTERVAL, CIRCUIT_BREAKER_FAILURE_THRESHOLD, ...); these it has not -> the texts that hold GoModel's
# default or say "off" (they change nothing then: _ANY, whatever they hold), as _IDLE is for its YAML keys.
_FALSE, _TRUE = ("false", "0", "f", "no", "off"), ("true", "1", "t", "yes", "on")
_ENV_IDLE = {
    "RETRY_MAX_RETRIES": ("3",), "RETRY_INITIAL_BACKOFF": ("1s",), "RETRY_MAX_BACKOFF": ("30s",),
    "RETRY_BACKOFF_FACTOR": ("2", "2.0"), "RETRY_JITTER_FACTOR": ("0.1",),
    "CIRCUIT_BREAKER_SUCCESS_THRESHOLD": ("2",), "CIRCUIT_BREAKER_TIMEOUT": ("30s",),
    "HTTP_TIMEOUT": ("600", "600s", "10m"), "BASE_PATH": ("/",),
    "SWAGGER_ENABLED": _FALSE, "PPROF_ENABLED": _FALSE, "ALLOW_PASSTHROUGH_V1_ALIAS": _TRUE,
    "LOGGING_ENABLED": _FALSE, "RESPONSE_CACHE_SIMPLE_ENABLED": _FALSE, "SEMANTIC_CACHE_ENABLED": _FALSE,
    "KEEP_ONLY_ALIASES_AT_MODELS_ENDPOINT": _FALSE, "ENFORCE_RETURNING_USAGE_DATA": _TRUE,
    "SESSION_KEEPING_ENABLED": _TRUE, "SESSION_AUTO_DETECT": _TRUE, "SESSION_BUILTIN_RULES": _TRUE,
    **{name: _ANY for name in ("USAGE_BUFFER_SIZE", "LOGGING_LOG_BODIES", "LOGGING_LOG_HEADERS",
                               "LOGGING_BUFFER_SIZE", "LOGGING_FLUSH_INTERVAL", "LOGGING_RETENTION_DAYS",
                               "LOGGING_ONLY_MODEL_INTERACTIONS", "MODEL_OVERRIDES_ENABLED",
                               "ENABLE_GUARDRAILS_FOR_BATCH_PROCESSING", "WORKFLOW_REFRESH_INTERVAL",
                               "GOMODEL_CACHE_DIR", "MONGODB_URL", "MONGODB_DATABASE", "REDIS_KEY_RESPONSES",
                               "REDIS_TTL_RESPONSES", "REDIS_KEY_MODELS", "REDIS_TTL_MODELS")},
}

_SESSION_HEADER = re.compile(r"SESSION_HEADER_[0-9]+(_TRANSFORM)?")


def read_gomodel_env(env, warnings: list):
    """Check GoModel's environment variables in C{env} as its YAML keys are checked (L{read_gomodel_layout}).

    @param env: the loader's own copy of the environment: GoModel's C{SQLITE_PATH} is moved to
        C{GOMODEL_DATA_DIR} there (its directory).
    @param warnings: gets one line naming GoModel's variables that are not read here, if any.
    @raise ConfigError: one the gateway cannot honour says to restrict (guardrails on, models off by default,
        users' model allowlists), or two name one place.
    """
    if env.get("GUARDRAILS_ENABLED", "").strip().lower() in _TRUE:
        raise ConfigError("GUARDRAILS_ENABLED: guardrails are not a feature of this gateway; without them requests "
                          "would pass unchecked, so it does not start (unset it)")
    if env.get("MODELS_ENABLED_BY_DEFAULT", "").strip().lower() in _FALSE:
        raise ConfigError("MODELS_ENABLED_BY_DEFAULT: this gateway has no model overrides; every configured model "
                          "would be served, so it does not start (limit a key's models with its models field instead)")
    if "".join(env.get("USERS", "").split()) not in ("", "[]", "null"):
        raise ConfigError("USERS: GoModel's model allowlists by user path are not a feature of this gateway; without "
                          "them every path could use every model, so it does not start (unset it, and limit each "
                          "key's models with its models field instead)")
    if "SQLITE_PATH" in env:  # (GoModel's storage.sqlite.path: the directory is ours, as the key's is)
        if "GOMODEL_DATA_DIR" in env:
            raise ConfigError("SQLITE_PATH and GOMODEL_DATA_DIR name the database's place both; keep one")
        env["GOMODEL_DATA_DIR"] = _database_directory(env["SQLITE_PATH"], "SQLITE_PATH", warnings)
    ignored = [name for name, idle in _ENV_IDLE.items()
               if name in env and idle is not _ANY and env[name].strip().lower() not in idle]
    ignored += sorted(name for name in env if _SESSION_HEADER.fullmatch(name))  # (its extra session headers)
    if "FALLBACK_MANUAL_RULES_PATH" not in env and env.get("FEATURE_FALLBACK_MODE", "off").strip().lower() not in (
            "off", "manual"):  # (with a rules file, its mode is read with it: gomodel.config.virtual)
        ignored.append("FEATURE_FALLBACK_MODE")
    if ignored:
        warnings.append(f"GoModel's {listed(ignored)} not read: this gateway has no such setting "
                        "(see README, Configuration)")


def read_gomodel_layout(document: dict, yaml_path, warnings: list, env=None) -> dict:
    """C{document} (a YAML file's mapping) with GoModel's settings moved to gomodel's sections and keys.

    @param warnings: gets one line naming GoModel's settings that are not read here, if any.
    @param env: the environment (its GoModel fallback variables win over the file's fallback keys).
    @raise ConfigError: a setting is given both ways, or one the gateway cannot honour says to restrict.
    """
    if not any(name in document for name in _GOMODEL_SECTIONS) and not any(
            isinstance(document.get(section), dict) and keys & set(document[section])
            for section, keys in _SHARED_KEYS.items()):
        return document
    document = {name: dict(value) if isinstance(value, dict) else value for name, value in document.items()}
    ignored = []
    storage = document.get("storage")
    postgresql = isinstance(storage, dict) and storage.get("type") == "postgresql"
    for path, value in _leaves(document, _GOMODEL_SECTIONS, _SHARED_KEYS):
        where = f"{yaml_path}: {'.'.join(path)}"
        _refuse(path, value, where)
        if path[:2] == ("storage", "postgresql") and not postgresql:
            continue  # (GoModel reads it only with type postgresql: its example file carries one anyway)
        moved = _MOVED.get(path)
        if path == ("server", "enabled_passthrough_providers") and isinstance(value, list):
            value = _known_types(value, where, warnings)
        if moved is not None:
            section, key = moved
            block = document.setdefault(section, {})
            if not isinstance(block, dict):
                raise ConfigError(f"{yaml_path}: the config key {section!r} must be a mapping")
            if block.get(key) is not None:
                raise ConfigError(f"{where} and {section}.{key} are the same setting; keep one")
            block[key] = value
        elif path == ("storage", "sqlite", "path"):
            _sqlite_path(document, value, where, warnings)
        elif path == ("fallback", "manual_rules_path"):
            _manual_rules(document, value, where, warnings, env or {})
        elif value is not None and _IDLE.get(path, _UNKNOWN) not in (_ANY, value):
            ignored.append(".".join(path))
    for name in _GOMODEL_SECTIONS:
        document.pop(name, None)
    if ignored:
        warnings.append(f"{yaml_path}: GoModel's {listed(ignored)} not read: this gateway has no such setting "
                        "(see README, Configuration)")
    return document


def _leaves(document, sections, shared):
    """C{(path, value)} of every GoModel setting of C{document}, taken out of the sections it shares with ours."""
    for name in sections:
        block = document.get(name)
        if block is not None:
            yield from _walk((name,), block)
    for name, keys in shared.items():
        block = document.get(name)
        if isinstance(block, dict):
            for key in sorted(keys & set(block)):
                yield (name, key), block.pop(key)


def _walk(path, value):
    if isinstance(value, dict) and not _is_value(path):
        for key, item in value.items():
            yield from _walk(path + (str(key),), item)
    else:
        yield path, value


def _is_value(path) -> bool:
    """Whether the mapping at C{path} is one setting's value (rules, overrides), not settings."""
    return path[0] in ("guardrails", "fallback") and len(path) > 1


def _refuse(path, value, where):
    if path == ("guardrails", "enabled") and value is True:
        raise ConfigError(f"{where}: guardrails are not a feature of this gateway; without them requests would "
                          "pass unchecked, so it does not start (set enabled: false, or remove guardrails:)")
    if path == ("models", "enabled_by_default") and value is False:
        raise ConfigError(f"{where}: this gateway has no model overrides; every configured model would be "
                          "served, so it does not start (limit a key's models with its models field instead)")


def _known_types(types, where, warnings) -> list:
    """C{types} of providers this gateway has; the others (which it cannot pass through to) in a warning."""
    unknown = [t for t in types if t not in PROVIDER_TYPES]
    if unknown:
        warnings.append(f"{where}: no provider of type {listed(unknown)} here: none is passed through")
    return [t for t in types if t in PROVIDER_TYPES]


def _sqlite_path(document, value, where, warnings):
    """GoModel's database file: gomodel keeps C{gomodel.db} (and its files' contents) in that directory."""
    block = document.setdefault("store", {})
    if block.get("data_dir") is not None:
        raise ConfigError(f"{where} and store.data_dir name the database's place both; keep one")
    block["data_dir"] = _database_directory(value, where, warnings)


def _database_directory(value, where, warnings) -> str:
    """The directory of GoModel's database file C{value} (C{storage.sqlite.path}, C{SQLITE_PATH}): gomodel's
    C{GOMODEL_DATA_DIR}; a file named other than C{gomodel.db} is warned of."""
    if not isinstance(value, str) or not value.strip() or value.endswith("/"):
        raise ConfigError(f"{where} must be a file path")
    directory, _, name = value.strip().rpartition("/")
    if name != "gomodel.db":
        warnings.append(f"{where}: the database is {directory or '.'}/gomodel.db here, beside the files' "
                        f"contents, not {name}")
    return directory or "."


def _manual_rules(document, value, where, warnings, env):
    """GoModel's failover rules file (read unless its C{fallback.default_mode}, or C{FEATURE_FALLBACK_MODE}, is
    C{off}, or the environment gives the rules): our C{failover_rules:}."""
    from gomodel.config.virtual import fallback_off, read_rules_file

    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a file path")
    if "FALLBACK_MANUAL_RULES_PATH" in env or "FAILOVER_RULES_JSON" in env:
        return  # (the environment's rules win: gomodel.config.virtual)
    fallback = document.get("fallback")
    mode = fallback.get("default_mode") if isinstance(fallback, dict) else None
    if "FEATURE_FALLBACK_MODE" in env:
        mode, mode_where = env["FEATURE_FALLBACK_MODE"], "FEATURE_FALLBACK_MODE"
    else:
        mode_where = where.replace("manual_rules_path", "default_mode")
    if fallback_off(mode, mode_where, warnings):
        return
    if document.get("failover_rules") is not None:
        raise ConfigError(f"{where} and failover_rules are the same setting; keep one")
    rules = read_rules_file(value, where)
    overrides = fallback.get("overrides") or {}
    at = where.replace("manual_rules_path", "overrides")
    if not isinstance(overrides, dict):
        raise ConfigError(f"{at} must map a model to {{mode: off | manual | auto}}")
    for model, override in overrides.items():
        mode = override.get("mode") if isinstance(override, dict) else None
        if fallback_off(mode, f"{at}.{model}.mode", warnings) and isinstance(rules, dict):
            rules.pop(str(model), None)
    document["failover_rules"] = rules
