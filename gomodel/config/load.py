"""L{load_config}: environment over YAML, read once into one frozen L{Config}.

This is the only code that reads the environment; it is handed the mapping to
read, so tests pass a plain dict. Every bad value raises L{ConfigError} whose
message names the variable (or YAML key) at fault.

YAML: C{providers:} is a top-level key. Every other setting's key may sit
under its own section (C{server:}, C{upstreams:}, C{store:}, C{auth:},
C{limits:}, C{metrics:}) or, as in older files, under C{server:} whatever
its section; the same key in both places is an error.
"""

import dataclasses
import re
from typing import Mapping, Optional, Sequence

from gomodel.config import parsers
from gomodel.config.errors import ConfigError, listed, read_text
from gomodel.config.gomodel_layout import read_gomodel_env, read_gomodel_layout
from gomodel.config.providers import load_providers
from gomodel.config.virtual import load_failover_rules, load_virtual_models
from gomodel.limits.specs import limits_from_env, limits_from_yaml
from gomodel.config.sections import SECTIONS, Config, settings_of

_LEGACY = "server"  # the section whose keys may be any section's (files written before sections)
_UNSET = object()


def load_config(
    environ: Mapping[str, str],
    yaml_path: Optional[str] = None,
    listen: Sequence[str] = (),
) -> Config:
    """Build the L{Config} from C{environ}, the YAML file and C{--listen} values.

    The YAML path is C{yaml_path}, else C{GOMODEL_CONFIG} from C{environ}.
    Environment values win over YAML; empty environment values count as unset.
    C{listen}, when given, replaces the C{PORT} setting's C{tcp:PORT}.

    @raise ConfigError: a value, key or file that cannot be used.
    """
    env = {k: v for k, v in environ.items() if v != ""}
    yaml_path = yaml_path or env.get("GOMODEL_CONFIG")
    warnings = []
    read_gomodel_env(env, warnings)
    document = read_gomodel_layout(_read_yaml(yaml_path, env), yaml_path, warnings, env) if yaml_path else {}
    blocks = {name: _mapping(document, name, yaml_path) for name in SECTIONS}
    for name, cls in SECTIONS.items():
        known = {key for _, key, _, _ in settings_of(Config if name == _LEGACY else cls)}
        unknown = set(blocks[name]) - known
        if unknown:
            raise ConfigError(f"{yaml_path}: unknown key(s) under {name}: {listed(unknown)}")
    unknown = set(document) - set(SECTIONS) - {"providers", "virtual_models", "failover_rules", "pricing",
                                               "rate_limits", "budgets"}
    if unknown:
        raise ConfigError(f"{yaml_path}: unknown top-level key(s): {listed(unknown)}")

    sections = {name: _build(cls, name, blocks, env, yaml_path) for name, cls in SECTIONS.items()}
    store = sections["store"]
    if store.storage_type == "postgresql" and not store.postgres_url:
        raise ConfigError("STORAGE_TYPE=postgresql needs POSTGRES_URL (postgresql://user@host:5432/database)")
    if store.storage_type == "sqlite" and store.postgres_url:
        warnings.append("POSTGRES_URL is set but STORAGE_TYPE is sqlite (the default): files, batches, keys and "
                        "usage stay in this host's SQLite file, shared with no other host; set "
                        "STORAGE_TYPE=postgresql to use the database")
    if store.redis_cluster and store.redis_url:
        from gomodel.redis_client import check

        try:
            check(store.redis_url, cluster=True)
        except ValueError as e:
            raise ConfigError(f"REDIS_URL {e}") from None
    elif store.redis_cluster:
        warnings.append("REDIS_CLUSTER is set but REDIS_URL is not: limits, budgets and session pins are this "
                        "process's own")
    providers = load_providers(document.get("providers"), yaml_path, env, warnings)
    sections["upstreams"] = dataclasses.replace(sections["upstreams"], providers=providers)
    known = {p.name for p in providers} | {p.type for p in providers}  # (what a target's provider part may name)
    virtual = load_virtual_models(document.get("virtual_models"), yaml_path, env, known, warnings)
    sections["routing"] = dataclasses.replace(
        sections["routing"], virtual_models=virtual, failover_rules=load_failover_rules(
            document.get("failover_rules"), yaml_path, env, known, {vm.source for vm in virtual}, warnings))
    pricing = _pricing(document.get("pricing"), yaml_path)
    for model, prices in _model_prices(document.get("providers"), yaml_path, warnings).items():
        if model in pricing:
            raise ConfigError(f"{yaml_path}: {model} is priced both under pricing: and by its provider's "
                              "models[].metadata.pricing; keep one")
        pricing[model] = prices
    sections["usage"] = dataclasses.replace(sections["usage"], pricing=pricing)
    if listen:
        sections["server"] = dataclasses.replace(sections["server"], listen=tuple(listen))
    try:
        quotas = limits_from_yaml(_typed_limits(document))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{yaml_path}: {e}") from None
    try:  # (its messages start with the variable's name: no file is at fault)
        quotas = limits_from_env(env, quotas)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    named = {p.name.lower() for p in providers}
    for name in sorted(set(quotas.providers) - named):
        warnings.append(f"the rate limit of provider {name!r} holds for nothing: no provider has that name "
                        f"(known: {', '.join(sorted(named)) or 'none'})")
    return Config(**sections, quotas=quotas, warnings=tuple(warnings))


def _build(cls, name, blocks, env, yaml_path):
    """One section (or group) of class C{cls}, from the settings among its fields."""
    values = {}
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            values[f.name] = _build(f.metadata["group"], name, blocks, env, yaml_path)
        elif "setting" in f.metadata:
            value = _value(f.metadata["setting"], f.metadata["setting"].yaml or f.name, name, blocks, env, yaml_path)
            if value is not _UNSET:
                values[f.name] = value
    return cls(**values)


def _value(setting, key, name, blocks, env, yaml_path):
    """The setting's value from the environment, else YAML, else C{_UNSET} (the default)."""
    for var in (setting.env, *setting.aliases):
        if var in env:
            return parsers.checked(setting.parse, env[var], var, setting.secret)
    places = [place for place in dict.fromkeys((name, _LEGACY)) if blocks[place].get(key) is not None]
    if len(places) > 1:
        raise ConfigError(f"{yaml_path}: {key} is set under both {name}: and {_LEGACY}:; keep one")
    if places:
        return parsers.checked(setting.parse, blocks[places[0]][key], f"{yaml_path}: {places[0]}.{key}",
                               setting.secret)
    return _UNSET


_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _read_yaml(path, env) -> dict:
    """Read the YAML file, then expand C{${VAR}} and C{${VAR:-default}} from C{env} in its texts.

    A placeholder is replaced in the parsed document (L{_expand}), so a value
    is always exactly the variable's text and never changes the structure; an
    unset variable without a default stays as written. Errors name the place
    in the file, never its text (it may hold secrets).
    """
    import yaml  # only with a file: a gateway configured by its environment never loads PyYAML

    from gomodel.config import yamlfile

    text = read_text(path, f"cannot read config file {path}")
    try:
        document = yamlfile.load(text, path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        if mark is not None:
            at = f" at line {mark.line + 1}, column {mark.column + 1}"
        else:
            at = f" at character {e.position + 1}" if isinstance(getattr(e, "position", None), int) else ""
        raise ConfigError(f"{path}: not valid YAML{at}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return _expand(document, env, path, {})


def _expand(node, env, path, done):
    """C{node} with the placeholders in its texts (mapping keys too) replaced from C{env}.

    C{done} maps each mapping or list already seen (by id) to its copy: YAML
    aliases share one. One being copied is mapped to None meanwhile: an alias
    inside what it names (a loop, which every reader of the document would
    follow for ever) is refused.
    """
    if isinstance(node, str):
        return _PLACEHOLDER.sub(lambda m: env.get(m.group(1), m.group(2) if m.group(2) is not None else m.group(0)),
                                node)
    if not isinstance(node, (dict, list)):
        return node
    if id(node) in done:
        if done[id(node)] is None:
            raise ConfigError(f"{path}: an alias (*name) is used inside the mapping or list it names")
        return done[id(node)]
    done[id(node)] = None
    if isinstance(node, list):
        copy = [_expand(item, env, path, done) for item in node]
    else:
        copy = {}
        for key, value in node.items():
            expanded = _expand(key, env, path, done)
            if expanded in copy:
                raise ConfigError(f"{path}: two keys are the same once their placeholders are expanded")
            copy[expanded] = _expand(value, env, path, done)
    done[id(node)] = copy
    return copy


def _mapping(document, name, yaml_path) -> dict:
    value = document.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{yaml_path}: the config key {name!r} must be a mapping")
    return value


_PRICES = ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "audio_per_minute")


def _pricing(value, yaml_path) -> dict:
    """C{pricing:} model -> {input_per_mtok, output_per_mtok, cached_input_per_mtok} (amounts per million tokens),
    and C{audio_per_minute} (a minute of audio a transcription's usage bills in seconds)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{yaml_path}: pricing must map a model (provider/model) to its prices")
    pricing = {}
    for model, prices in value.items():
        where = f"{yaml_path}: pricing.{model}"
        if not isinstance(prices, dict) or not prices or set(prices) - set(_PRICES):
            raise ConfigError(f"{where} must be a mapping of {', '.join(_PRICES)}")
        pricing[str(model)] = {name: parsers.checked(parsers.price, amount, f"{where}.{name}")
                               for name, amount in prices.items()}
    return pricing


def _model_prices(providers, yaml_path, warnings) -> dict:
    """GoModel's per-model prices, a provider's C{models: [{id, metadata: {pricing: {...}}}]}: C{name/id} -> its
    prices, as C{pricing:} has them (GoModel's C{currency} is the table's, which names none; the price names this
    gateway has not are named in C{warnings})."""
    table = {}
    for name, block in (providers.items() if isinstance(providers, dict) else ()):
        models = block.get("models") if isinstance(block, dict) else None
        for i, item in enumerate(models if isinstance(models, list) else ()):
            metadata = item.get("metadata") if isinstance(item, dict) else None
            prices = metadata.get("pricing") if isinstance(metadata, dict) else None
            if prices is None:
                continue
            where = f"{yaml_path}: providers.{name}.models[{i}].metadata.pricing"
            if not isinstance(prices, dict):
                raise ConfigError(f"{where} must be a mapping of {', '.join(_PRICES)}")
            unread = set(map(str, prices)) - set(_PRICES) - {"currency"}
            if unread:
                warnings.append(f"{where}: GoModel's {listed(unread)} not read: this gateway prices "
                                f"{', '.join(_PRICES)}")
            read = {key: parsers.checked(parsers.price, amount, f"{where}.{key}")
                    for key, amount in prices.items() if key in _PRICES}
            if read:
                table[f"{name}/{str(item.get('id')).strip()}"] = read
    return table


# The rate_limits: and budgets: keys whose values are numbers or switches: the type each is read as.
_LIMIT_VALUES = {"period_seconds": int, "max_requests": int, "max_tokens": int, "amount": float, "max_cost": float,
                 "enabled": bool}


def _typed_limits(document) -> dict:
    """C{rate_limits:} and C{budgets:} with their numbers and switches given as text (a placeholder's) read.

    L{limits_from_yaml} wants YAML's own numbers and booleans; a text that is
    not one is left as it is, for it to refuse.
    """
    def typed(node):
        if isinstance(node, list):
            return [typed(item) for item in node]
        if not isinstance(node, dict):
            return node
        result = {}
        for key, value in node.items():
            kind = _LIMIT_VALUES.get(key) if isinstance(key, str) and isinstance(value, str) else None
            if kind is not None:
                text = value.strip()
                try:
                    if kind is bool:
                        value = parsers.boolean(text)
                    elif re.fullmatch(r"[+-]?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?", text):
                        value = int(text) if kind is int and text.lstrip("+-").isdigit() else float(text)
                except ValueError:
                    pass
            result[key] = typed(value)
        return result

    return {name: typed(document[name]) for name in ("rate_limits", "budgets") if name in document}
