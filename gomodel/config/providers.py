"""Providers: the YAML C{providers:} blocks merged with C{<TYPE>[_<SUFFIX>]_*} variables (env wins).

A provider is one server or a pool of replicas: C{<TYPE>_BASE_URL} takes one
URL or several separated by commas, YAML's C{base_url} one URL or a list, or
C{replicas:} a list of C{{base_url, api_key?, weight?, max_concurrency?}}.
The provider's key is sent to every replica that has none of its own.
"""

import re
from typing import Optional
from urllib.parse import urlsplit

from gomodel.config.catalog import PROVIDER_TYPES, ROOT_SERVERS
from gomodel.config.errors import ConfigError, listed
from gomodel.config import parsers
from gomodel.config.sections import ProviderConfig, ReplicaConfig

_PROVIDER_FIELDS = ("BASE_URL", "API_KEY", "MODELS", "PRIORITY_SCHEDULING", "MAX_STOP_SEQUENCES")
_SUFFIX = re.compile(r"[A-Za-z0-9]+(_[A-Za-z0-9]+)*")
_NAME = re.compile(r"[A-Za-z0-9]+([-_][A-Za-z0-9]+)*")  # a YAML provider's: the suffixes' rule, hyphens too
_HOST = re.compile(r"[A-Za-z0-9_.-]+")  # a DNS name (ASCII: punycode) or an IPv4 address
_YAML_PROVIDER_KEYS = {"type", "base_url", "api_key", "models", "replicas", "priority_scheduling",
                       "max_stop_sequences"}
_GOMODEL_PROVIDER_KEYS = {"api_version", "resilience"}  # GoModel's (Azure's API version, retries per provider)
_YAML_REPLICA_KEYS = {"base_url", "api_key", "weight", "max_concurrency"}


def load_providers(yaml_providers, yaml_path, env, warnings) -> tuple:
    """Merge YAML provider blocks with C{<TYPE>[_<SUFFIX>]_*} variables (env wins)."""
    entries = {}  # name -> dict(type, base_url, api_key, models, where)
    if yaml_providers is not None:
        if not isinstance(yaml_providers, dict):
            raise ConfigError(f"{yaml_path}: providers must be a mapping of name -> settings")
        for name, block in yaml_providers.items():
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ConfigError(f"{yaml_path}: providers: the provider name {name!r} must be letters and digits "
                                  "separated by single hyphens or underscores (it starts the models' ids)")
            where = f"{yaml_path}: providers.{name}"
            if not isinstance(block, dict):
                raise ConfigError(f"{where} must be a mapping")
            unknown = set(block) - _YAML_PROVIDER_KEYS - _GOMODEL_PROVIDER_KEYS
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {listed(unknown)}")
            unread = sorted(key for key in _GOMODEL_PROVIDER_KEYS if block.get(key) is not None)
            if unread:
                warnings.append(f"{where}: GoModel's {listed(unread)} not read: this gateway has no such setting")
            type_ = block.get("type")
            if not isinstance(type_, str) or type_ not in PROVIDER_TYPES:
                raise ConfigError(f"{where}.type must be one of: {', '.join(PROVIDER_TYPES)}")
            if block.get("replicas") is not None and block.get("base_url") is not None:
                raise ConfigError(f"{where}: give base_url or replicas, not both")
            entries[name] = {
                "type": type_,
                "base_url": (block.get("base_url"), f"{where}.base_url"),
                "api_key": (block.get("api_key"), f"{where}.api_key"),
                "models": (_yaml_models(block.get("models"), where), f"{where}.models"),
                "replicas": (block.get("replicas"), f"{where}.replicas"),
                "priority_scheduling": (parsers.checked(parsers.boolean, block.get("priority_scheduling", False),
                                                f"{where}.priority_scheduling"), f"{where}.priority_scheduling"),
            }
            if block.get("max_stop_sequences") is not None:
                entries[name]["max_stop_sequences"] = (parsers.checked(
                    parsers.stop_sequences, block["max_stop_sequences"], f"{where}.max_stop_sequences"),
                    f"{where}.max_stop_sequences")

    suffixes = {}  # provider name -> the suffix of the variables that named it
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
            other = suffixes.setdefault(name, suffix)
            if other != suffix:  # (VLLM_GPU_A_* and VLLM_gpu_a_* are both vllm-gpu-a: one would overlay the other)
                raise ConfigError(f"{type_.upper()}_{other}_* and {type_.upper()}_{suffix}_* name the same provider "
                                  f"{name!r}; keep one spelling")
        existing = entries.get(name)
        if existing is not None and existing["type"] != type_:
            warnings.append(f"{type_.upper()}_{suffix + '_' if suffix else ''}* variables ignored: provider "
                            f"{name!r} is of type {existing['type']} in the YAML file")
            continue
        entry = entries.setdefault(name, {"type": type_})
        for field_name, (value, var) in fields.items():
            if field_name == "models":
                value = tuple(m.strip() for m in value.split(",") if m.strip())
            if field_name == "base_url":
                entry.pop("replicas", None)  # the variable's URLs replace the YAML's replicas
            if field_name == "priority_scheduling":
                value = parsers.checked(parsers.boolean, value, var)
            if field_name == "max_stop_sequences":
                value = parsers.checked(parsers.stop_sequences, value, var)
            entry[field_name] = (value, var)

    folded = {}
    for name in sorted(entries):
        other = folded.setdefault(name.lower(), name)
        if other != name:  # (limits, metrics and the rate-limit variables name a provider in any case)
            raise ConfigError(f"the providers {other!r} and {name!r} differ only in case; rename one")
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
    api_key = _api_key(*entry.get("api_key", (None, None)))
    models, _ = entry.get("models", ((), None))
    replicas, replicas_where = entry.get("replicas", (None, None))
    priority_scheduling, priority_where = entry.get("priority_scheduling", (False, None))
    max_stops, _ = entry.get("max_stop_sequences", (type_.max_stops, None))
    if replicas is not None:
        replicas = _yaml_replicas(replicas, replicas_where, type_.name)
    else:
        where = base_where or "the default base URL"
        if base_url is None and type_.name in ROOT_SERVERS:  # (a misspelt VLLM_X_BASE_ULR: its key went there)
            warnings.append(f"provider {name!r} ({type_.name}) has no base URL: it is reached at its default, "
                            f"{type_.default_base_url}")
        replicas = tuple(ReplicaConfig(*_normalise_base_url(url, type_.name, where))
                         for url in _urls(type_.default_base_url if base_url is None else base_url, where))
        if len({r.base_url for r in replicas}) != len(replicas):
            raise ConfigError(f"{where}: the same server is listed twice")
    if api_key is None and not type_.keyless and not all(r.api_key for r in replicas):
        warnings.append(f"provider {name!r} ({type_.name}) skipped: it needs an API key "
                        f"({type_.name.upper()}_API_KEY or api_key in YAML)")
        return None
    if priority_scheduling and type_.name != "vllm":  # (kept: an openai-type provider may be a vLLM)
        warnings.append(f"provider {name!r} ({type_.name}) has priority scheduling on ({priority_where}): requests "
                        "to it carry vLLM's 'priority' field, which only a vLLM started with --scheduling-policy "
                        "priority takes (other servers refuse or ignore it); turn it off unless it is one")
    first = replicas[0]
    return ProviderConfig(name=name, type=type_.name, base_url=first.base_url, root_url=first.root_url,
                          api_key=api_key, models=tuple(models), replicas=replicas if len(replicas) > 1 or
                          replicas[0] != ReplicaConfig(first.base_url, first.root_url) else (),
                          priority_scheduling=priority_scheduling, max_stop_sequences=max_stops)


def _api_key(api_key, where):
    if api_key is None:
        return None
    if not isinstance(api_key, str):
        raise ConfigError(f"{where}: must be text (quote it in YAML)")
    if "${" in api_key:
        raise ConfigError(f"{where}: looks like an unresolved ${{...}} placeholder")
    if parsers.has_control(api_key):
        raise ConfigError(f"{where}: must not contain control characters (line breaks included)")
    if api_key != api_key.strip():  # (sent as "Bearer <key>": every request a 401, as with the master key)
        raise ConfigError(f"{where}: must not be blank nor start or end with whitespace")
    return api_key or None


def _urls(value, where) -> list:
    """One URL, several separated by commas, or (YAML) a list of them."""
    if not isinstance(value, (str, list)) or not all(isinstance(u, str) for u in value):
        raise ConfigError(f"{where}: must be a URL, several separated by commas, or a list of them")
    items = value if isinstance(value, list) else value.split(",")
    urls = [u.strip() for u in items if u.strip()]
    if not urls:
        raise ConfigError(f"{where}: no URL given")
    return urls


def _yaml_replicas(replicas, where, type_name) -> tuple:
    if not isinstance(replicas, list) or not replicas:
        raise ConfigError(f"{where} must be a non-empty list of {{base_url, api_key?, weight?, max_concurrency?}}")
    built = []
    for i, item in enumerate(replicas):
        at = f"{where}[{i}]"
        if not isinstance(item, dict) or "base_url" not in item:
            raise ConfigError(f"{at} must be a mapping with a base_url")
        unknown = set(item) - _YAML_REPLICA_KEYS
        if unknown:
            raise ConfigError(f"{at}: unknown key(s) {listed(unknown)}")
        base_url, root_url = _normalise_base_url(item["base_url"], type_name, f"{at}.base_url")
        weight = parsers.checked(parsers.weight, item.get("weight", 1), f"{at}.weight")
        limit = item.get("max_concurrency")
        limit = None if limit is None else parsers.checked(parsers.limit, limit, f"{at}.max_concurrency")
        built.append(ReplicaConfig(base_url, root_url, _api_key(item.get("api_key"), f"{at}.api_key"),
                                   weight, limit))
    if len({r.base_url for r in built}) != len(built):
        raise ConfigError(f"{where}: the same base_url is listed twice")
    return tuple(built)


def _normalise_base_url(url, type_name, where):
    """Return (API base ending in /v1 where the server has one, server root).

    Refused, without showing the URL: no http(s) scheme or host, a user name or
    password, a host that is neither a name nor an address, port 0, a query or
    fragment, and whitespace or control characters anywhere.
    """
    if not isinstance(url, str):
        raise ConfigError(f"{where}: must be a URL (text)")
    url = url.strip()
    if parsers.has_control(url):
        raise ConfigError(f"{where}: must not contain control characters (tabs and line breaks included)")
    if any(c.isspace() for c in url):
        raise ConfigError(f"{where}: must not contain a space")
    try:
        parts = urlsplit(url)
    except ValueError:  # (an unbalanced bracket)
        raise ConfigError(f"{where}: not a valid URL") from None
    try:
        port = parts.port  # raises ValueError on a bad port
    except ValueError:
        host = parts.netloc.rpartition("@")[2]
        if host.count(":") > 1 and not host.startswith("["):
            raise ConfigError(f"{where}: not a valid URL: an IPv6 address goes in brackets, "
                              "http://[fd00::5]:8000") from None
        raise ConfigError(f"{where}: not a valid URL: the port must be a number from 1 to 65535") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: must be an http:// or https:// URL with a host")
    if "@" in parts.netloc:
        raise ConfigError(f"{where}: must not contain a user name or password (give the key as the API key)")
    if not _valid_host(parts.netloc, parts.hostname):
        raise ConfigError(f"{where}: the host must be a name, an IPv4 address or an IPv6 address in brackets")
    if port == 0:
        raise ConfigError(f"{where}: port 0 is no server's port")
    if "?" in url or "#" in url:  # (an empty one too: "http://h/v1?" sent every request to /v1)
        raise ConfigError(f"{where}: must not have a query or fragment")
    url = url.rstrip("/")
    path = urlsplit(url).path
    if path.lower().endswith(_ENDPOINTS):  # (http://h:8000/v1/chat/completions: every route went under it)
        raise ConfigError(f"{where}: names an endpoint, not a server: give the base URL, e.g. http://host:8000/v1")
    if path.endswith("/v1"):
        return url, url[: -len("/v1")]
    if type_name in ROOT_SERVERS or not path:
        return url + "/v1", url
    return url, url


# The ends of an endpoint's URL (what a base URL copied from a curl line ends in).
_ENDPOINTS = ("/chat/completions", "/completions", "/embeddings", "/responses", "/messages", "/models", "/rerank",
              "/score")


def _valid_host(netloc, hostname) -> bool:
    if netloc.startswith("["):
        import ipaddress  # (here: urllib.parse, its one other importer, has it loaded on first use, gomodel.lean)

        try:
            ipaddress.IPv6Address(hostname)
        except ValueError:
            return False
        return True
    return bool(_HOST.fullmatch(hostname))
