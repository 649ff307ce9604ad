"""Virtual models and failover rules, in GoModel's shapes.

YAML C{virtual_models:} (or env C{VIRTUAL_MODELS}, the same list as JSON)::

    virtual_models:
      - source: llama                      # what clients ask for
        targets: [{model: vllm/meta-llama/X, weight: 3}, {model: vllm-b/meta-llama/X, weight: 1}]
        strategy: round_robin               # weighted; the only strategy for now
        session_affinity: true              # a session keeps its target while it can serve
        enabled: true

C{target: <model>} stands for one target of weight 1. Failover rules (YAML
C{failover_rules:} or env C{FAILOVER_RULES_JSON}) map a model to the
candidates tried, in order, when every target of it failed before the
first byte: C{{"llama": ["vllm-c/meta-llama/X", "openai/gpt-4o-mini"]}} (a
candidate that is a virtual model stands for its targets). GoModel's rules
file, the same JSON in a file named by C{FALLBACK_MANUAL_RULES_PATH} (YAML
C{fallback.manual_rules_path}, moved to C{failover_rules:} by
L{gomodel.config.gomodel_layout}), is read too, unless GoModel's
C{FEATURE_FALLBACK_MODE} (C{fallback.default_mode}) is C{off}.
The environment wins over YAML.

A target or candidate of three or more parts (C{vllm-a/meta-llama/X}) names its
provider first: one whose first part names no configured provider (by name or
type, L{unknown_provider}) but is close to one's name (C{vlm-a}, C{vllm-b} where
C{vllm-a} is) fails the start as a typo, as does a failover rule for such a
model; one not close to any (C{hf.co/org/repo:Q4}, an Ollama model's id) is read
as the routing reads it, a bare model id at whichever provider serves it, and
the start warns of it. A provider's models may be discovered only once it is
up, so the model part is not checked, nor is a selector of two parts whose first
names no provider: that is a bare model id (C{meta-llama/X}). An entry with
C{enabled: false} is checked for its shape but not for its providers (it is left
out: a way to keep one whose provider is gone for now).
"""

import json
from dataclasses import dataclass

from gomodel.config import parsers
from gomodel.config.errors import ConfigError, listed, read_text

STRATEGIES = ("round_robin",)
FALLBACK_MODES = ("off", "manual", "auto")  # GoModel's FEATURE_FALLBACK_MODE
_KEYS = {"source", "target", "targets", "strategy", "session_affinity", "enabled", "user_paths"}


@dataclass(frozen=True)
class VirtualModel:
    """A model name clients use, served by one of several targets (each a model selector)."""

    source: str
    targets: tuple  # ((selector, weight), ...)
    strategy: str = "round_robin"
    session_affinity: bool = True


def unknown_provider(selector, providers, virtual=()):
    """The provider C{selector} names that is none of C{providers} (the configured names and types), or None.

    A selector of three or more parts names its provider first (C{vllm-a/meta-llama/X}); one of two whose
    first part names no provider is a bare model id (C{meta-llama/X}), as the routing reads it
    (L{gomodel.routing.registry.ModelRegistry.resolve}); one of C{virtual} (a virtual model's name) is none.
    """
    prefix, _, rest = selector.partition("/")
    if not prefix or "/" not in rest or prefix in providers or selector in virtual:
        return None
    return prefix


def _check_provider(selector, providers, at, virtual=(), warnings=None):
    """Check that C{selector} (at C{at}) names one of C{providers} where it names one (see the module); add a
    warning to C{warnings} where it is read as a bare model id.

    @raise ConfigError: its provider part names none of C{providers} and is close to one's name (a typo).
    """
    if providers is None:
        return
    prefix = unknown_provider(selector, providers, virtual)
    if prefix is None:
        return
    known = ', '.join(sorted(providers)) or 'none'
    import difflib  # (only for a typo's suggestion)

    close = difflib.get_close_matches(prefix, sorted(providers), n=1, cutoff=0.6)
    if close:
        raise ConfigError(f"{at} {selector!r} names no configured provider {prefix!r} "
                          f"(known: {known}; did you mean {close[0]!r}?)")
    if warnings is not None:
        warnings.append(f"{at} {selector!r}: {prefix!r} is no configured provider, so it is read as a bare model id, "
                        f"served by whichever provider lists it (providers: {known})")


def load_virtual_models(yaml_value, yaml_path, env, providers=None, warnings=None) -> tuple:
    """The enabled L{VirtualModel}s from C{VIRTUAL_MODELS} (JSON), else YAML C{virtual_models:}.

    @param providers: the configured providers' names and types (each target's provider is one of them), or
        None: not checked.
    @param warnings: a list the start's warnings are added to (a target read as a bare model id), or None.
    """
    where, value = _source(env, "VIRTUAL_MODELS", yaml_value, f"{yaml_path}: virtual_models")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of {{source, targets, ...}}")
    models, seen = [], set()
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{at} must be a mapping")
        unknown = set(item) - _KEYS
        if unknown:
            raise ConfigError(f"{at}: unknown key(s) {listed(unknown)}")
        source = item.get("source")
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(f"{at}.source must be a model name")
        source = source.strip()
        if source in seen:
            raise ConfigError(f"{at}.source {source!r} is defined twice")
        seen.add(source)
        if item.get("user_paths"):  # (GoModel's access policy: taken and ignored, it let every key in)
            raise ConfigError(f"{at}.user_paths is not supported: list the model in the models of the keys that "
                              "may use it")
        strategy = item.get("strategy", "round_robin")
        if strategy not in STRATEGIES:
            raise ConfigError(f"{at}.strategy must be one of: {', '.join(STRATEGIES)}")
        targets = _targets(item, at)
        affinity = _switch(item, "session_affinity", at)
        if not _switch(item, "enabled", at):
            continue
        for j, (model, _) in enumerate(targets):
            _check_provider(model, providers, f"{at}.targets[{j}].model", warnings=warnings)
        models.append(VirtualModel(source, targets, strategy, affinity))
    return tuple(models)


def _switch(item, key, at) -> bool:
    """C{item[key]} (default true) read as L{parsers.boolean} reads it."""
    return parsers.checked(parsers.boolean, item.get(key, True), f"{at}.{key}")


def _targets(item, at) -> tuple:
    if "target" in item and "targets" in item:
        raise ConfigError(f"{at}: give target or targets, not both")
    raw = [{"model": item["target"]}] if "target" in item else item.get("targets")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{at}.targets must be a non-empty list of {{model, weight}}")
    targets = []
    for j, target in enumerate(raw):
        if isinstance(target, str):
            target = {"model": target}
        model = target.get("model") if isinstance(target, dict) else None
        weight = target.get("weight", 1) if isinstance(target, dict) else None
        if not isinstance(model, str) or not model.strip():
            raise ConfigError(f"{at}.targets[{j}].model must be a model selector")
        targets.append((model.strip(), parsers.checked(parsers.weight, weight, f"{at}.targets[{j}].weight")))
    return tuple(targets)


def load_failover_rules(yaml_value, yaml_path, env, providers=None, virtual=(), warnings=None) -> dict:
    """Model -> ordered candidate selectors, from C{FAILOVER_RULES_JSON}, else YAML C{failover_rules:}.

    @param providers: as L{load_virtual_models}'s (the model of a rule and each candidate is checked).
    @param warnings: as L{load_virtual_models}'s.
    @param virtual: the virtual models' names (a rule for one, or a candidate that is one, names no provider).
    """
    if "FAILOVER_RULES_JSON" in env and "FALLBACK_MANUAL_RULES_PATH" in env:
        raise ConfigError("FAILOVER_RULES_JSON and FALLBACK_MANUAL_RULES_PATH are the same setting; keep one")
    if "FALLBACK_MANUAL_RULES_PATH" in env:
        where = "FALLBACK_MANUAL_RULES_PATH"
        off = fallback_off(env.get("FEATURE_FALLBACK_MODE"), "FEATURE_FALLBACK_MODE", warnings)
        value = None if off else read_rules_file(env[where], where)
    else:
        where, value = _source(env, "FAILOVER_RULES_JSON", yaml_value, f"{yaml_path}: failover_rules")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f'{where} must map a model to a list of candidates: {{"model": ["candidate", ...]}}')
    rules = {}
    for source, candidates in value.items():
        if not isinstance(candidates, list) or not all(isinstance(c, str) and c.strip() for c in candidates):
            raise ConfigError(f"{where}.{source} must be a list of model selectors")
        _check_provider(str(source), providers, f"{where}: the rule for", virtual, warnings)
        for j, candidate in enumerate(candidates):
            _check_provider(candidate.strip(), providers, f"{where}.{source}[{j}]", virtual, warnings)
        rules[str(source)] = tuple(c.strip() for c in candidates)
    return rules


def _source(env, var, yaml_value, yaml_where):
    """C{(where, value)}: the variable's JSON when it is set (it wins), else the YAML value."""
    if var not in env:
        return yaml_where, yaml_value
    try:
        return var, json.loads(env[var])
    except ValueError as e:
        raise ConfigError(f"{var}: not valid JSON: {e}") from None


def fallback_off(mode, where, warnings=None) -> bool:
    """Whether GoModel's fallback mode C{mode} (C{None}: its default, C{manual}) turns its rules file off.

    @raise ConfigError: C{mode} is none of GoModel's.
    """
    if mode is None:
        return False
    mode = "off" if mode is False else str(mode).strip().lower()  # (YAML reads a bare off as false)
    if mode not in FALLBACK_MODES:
        raise ConfigError(f"{where}: invalid value {mode!r}: must be one of: {', '.join(FALLBACK_MODES)}")
    if mode == "auto" and warnings is not None:
        warnings.append(f"{where}: auto adds no candidates of its own here: only the manual rules are tried")
    return mode == "off"


def read_rules_file(path, where):
    """GoModel's manual failover rules file at C{path}: its JSON (a key given twice is refused, as GoModel does).

    @raise ConfigError: it cannot be read, or is not JSON.
    """
    text = read_text(path, f"{where}: cannot read {path}")

    def unique(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ConfigError(f"{where}: duplicate key {key!r} in {path}")
            seen[key] = value
        return seen

    try:
        return json.loads(text, object_pairs_hook=unique)
    except ValueError as e:
        raise ConfigError(f"{where}: {path} is not valid JSON: {e}") from None
