"""What a limit or a budget is, and how GoModel's configuration spells them.

A L{RateLimit} caps a scope's request and token rates per window (minute,
hour, day, or a custom number of seconds) and its requests in flight. A
L{Budget} caps a scope's tokens or cost (in the pricing table's currency) per
UTC calendar period (C{hourly}, C{daily}, C{weekly} from Monday 00:00 UTC,
C{monthly}), per fixed custom window, or in C{total}.

Configuration, with GoModel's names so its users can bring their settings:

  - C{SET_RATE_LIMIT_<PATH>="rpm=100,tpm=50000,rpd=10000,concurrent=10"}: a
    user path (C{__} separates segments, lower-cased: C{SET_RATE_LIMIT_TEAM__ALPHA}
    is C{/team/alpha}, a bare C{SET_RATE_LIMIT_} is C{/}); compact names
    C{rpm tpm rph tph rpd tpd concurrent}, or a JSON array of rule objects
    (C{[{"period_seconds": 300, "max_requests": 50}]}).
  - C{SET_PROVIDER_RATE_LIMIT_<NAME>}: a provider instance, underscores
    becoming hyphens (C{OPENAI_EAST} is C{openai-east}). Models have no
    environment form (GoModel's rule: model ids are not env-name safe).
  - C{SET_BUDGET_<PATH>="daily=10,monthly=200"}: cost budgets of a user path;
    also C{{"weekly": 50}} or C{[{"period": "daily", "amount": 10}]}.
  - YAML C{rate_limits: {enabled, user_paths: [{path, limits}], providers:
    [{name, limits}], models: [{model, limits}]}} with limits
    C{[{period: minute|hour|day|concurrent, or period_seconds, max_requests,
    max_tokens}]}, and C{budgets: {enabled, user_paths: [{path, limits:
    [{period | period_seconds, amount}]}]}}; a budget limit may also say
    C{max_tokens} and C{max_cost} (C{amount} is C{max_cost}).
  - C{RATE_LIMITS_ENABLED}, C{BUDGETS_ENABLED} (both default true).

An environment entry replaces the YAML entry of the same subject (GoModel's
rule). A limit on a path applies to its whole subtree, each configured
ancestor being its own scope with its own counters (L{LimitsConfig.path_scopes}).
Every parser raises L{ValueError} with a message naming the setting.
"""

import calendar
import json
import math
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Mapping, Optional

MINUTE, HOUR, DAY = 60, 3600, 86400

# GoModel's compact rate-limit names: (window seconds, counts tokens).
_COMPACT = {"rpm": (MINUTE, False), "tpm": (MINUTE, True), "rph": (HOUR, False), "tph": (HOUR, True),
            "rpd": (DAY, False), "tpd": (DAY, True)}
_WINDOW_NAMES = {"minute": MINUTE, "minutes": MINUTE, "min": MINUTE, "minutely": MINUTE,
                 "hour": HOUR, "hours": HOUR, "hourly": HOUR, "day": DAY, "days": DAY, "daily": DAY,
                 "concurrent": 0, "concurrency": 0}

PERIODS = ("hourly", "daily", "weekly", "monthly", "total")
_PERIOD_ALIASES = {"hour": "hourly", "hours": "hourly", "hourly": "hourly", "day": "daily", "days": "daily",
                   "daily": "daily", "week": "weekly", "weeks": "weekly", "weekly": "weekly",
                   "month": "monthly", "months": "monthly", "monthly": "monthly", "total": "total"}
# GoModel stores its standard budget periods as these seconds (monthly still resets on the calendar).
_PERIOD_SECONDS = {3600: "hourly", 86400: "daily", 604800: "weekly", 2592000: "monthly"}
# The largest cost a budget says: a float's (a cost in the budget sums, a REAL or DOUBLE PRECISION column).
COST_MAX = sys.float_info.max
# The largest token and request count a limit or budget says: a bucket's level is a float, and the
# dashboard's numbers are JavaScript's, both exact to 2**53 (past it a level shows more than its limit).
COUNT_MAX = 2**53 - 1
# The longest window or budget period in seconds: ten years (a longer one is no period: C{total} is a
# budget without one); past it a window's expiry overflows what Redis and the stores hold.
PERIOD_SECONDS_MAX = 10 * 365 * DAY


@dataclass(frozen=True)
class Window:
    """One rate window: at most C{max_requests} requests and C{max_tokens} tokens per C{seconds}."""

    seconds: int
    max_requests: Optional[int] = None
    max_tokens: Optional[int] = None


@dataclass(frozen=True)
class RateLimit:
    """A scope's rate caps; C{None} is no cap. C{custom} holds windows of other lengths.

    C{windows} (computed) lists every window with a cap, shortest first.
    """

    rpm: Optional[int] = None
    tpm: Optional[int] = None
    concurrent: Optional[int] = None
    rph: Optional[int] = None
    tph: Optional[int] = None
    rpd: Optional[int] = None
    tpd: Optional[int] = None
    custom: tuple = ()
    windows: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("rpm", "tpm", "concurrent", "rph", "tph", "rpd", "tpd"):
            value = getattr(self, name)
            if value is not None and not is_count(value):
                raise ValueError(f"{name} must be a whole number from 1 to {COUNT_MAX}, not {value!r}")
        by_seconds = {}
        for seconds, requests, tokens in ((MINUTE, self.rpm, self.tpm), (HOUR, self.rph, self.tph),
                                          (DAY, self.rpd, self.tpd)):
            if requests is not None or tokens is not None:
                by_seconds[seconds] = Window(seconds, requests, tokens)
        for window in self.custom:
            if not 0 < window.seconds <= PERIOD_SECONDS_MAX:
                raise ValueError(f"a custom window needs period_seconds from 1 to {PERIOD_SECONDS_MAX}, "
                                 f"not {window.seconds}")
            if window.seconds in by_seconds:
                raise ValueError(f"two rate limits for the same period of {window.seconds} seconds")
            if window.max_requests is None and window.max_tokens is None:
                raise ValueError("a rate limit window needs max_requests or max_tokens")
            if not all(v is None or is_count(v) for v in (window.max_requests, window.max_tokens)):
                raise ValueError(f"a rate limit window's max_requests and max_tokens must be whole numbers "
                                 f"from 1 to {COUNT_MAX}")
            by_seconds[window.seconds] = window
        object.__setattr__(self, "windows", tuple(by_seconds[s] for s in sorted(by_seconds)))

    def __bool__(self):
        return bool(self.windows) or self.concurrent is not None


NO_LIMIT = RateLimit()


@dataclass(frozen=True)
class Budget:
    """A cap on a scope's tokens and/or cost (pricing-table currency) per C{period}.

    C{period} is one of L{PERIODS} or C{"<N>s"} (a fixed window of N seconds
    aligned to the Unix epoch, GoModel's C{period_seconds}). A C{max_cost}
    past L{COST_MAX} (infinity, a 400-digit integer: a store may hold one from
    before the admin API refused them) is L{COST_MAX}, a cap no spend reaches,
    not an error on every request and listing. A C{since} within the current
    period starts it there (L{gomodel.limits.budgets.BudgetBook}).
    """

    period: str
    max_tokens: Optional[int] = None
    max_cost: Optional[float] = None
    since: Optional[float] = None  # when its spending was last set back to zero (the admin API's reset)

    def __post_init__(self):
        object.__setattr__(self, "period", parse_period(self.period))
        if self.max_tokens is None and self.max_cost is None:
            raise ValueError(f"a {self.period} budget needs max_tokens or max_cost")
        if self.max_tokens is not None and not is_count(self.max_tokens):
            raise ValueError(f"a {self.period} budget's max_tokens must be a whole number from 1 to {COUNT_MAX}")
        if self.max_cost is not None:
            if isinstance(self.max_cost, bool) or not isinstance(self.max_cost, (int, float)) \
                    or not self.max_cost > 0:  # (NaN too)
                raise ValueError(f"a {self.period} budget's amount must be a number greater than 0")
            object.__setattr__(self, "max_cost", float(min(self.max_cost, COST_MAX)))


def is_count(value) -> bool:
    """Whether C{value} is a count a limit or budget may say: a whole number from 1 to L{COUNT_MAX}."""
    return not isinstance(value, bool) and isinstance(value, int) and 0 < value <= COUNT_MAX


def is_cost(value) -> bool:
    """Whether C{value} is a cost a budget may say: a number above 0, at most L{COST_MAX} (no OverflowError)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= COST_MAX


def parse_period(value) -> str:
    """The canonical budget period for C{value} (a name, an alias, or seconds), or ValueError."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _seconds_period(value)
    text = str(value).strip().lower()
    if text in _PERIOD_ALIASES:
        return _PERIOD_ALIASES[text]
    if text.endswith("s") and text[:-1].isdigit():
        return _seconds_period(int(text[:-1]))
    raise ValueError(f"budget period {value!r} must be one of hourly, daily, weekly, monthly, total "
                     "(or period_seconds)")


def counted_start(since, start, end):
    """Where a budget's spend in its period C{[start, end)} counts from: its reset C{since} where that falls in
    the period (a reset stamped by a clock a little ahead of this one's too), else C{start}."""
    if since is not None and start < since and (end is None or since < end):
        return since
    return start


def counted_window(budget: Budget, now: float) -> tuple:
    """What a budget's spend counts over at C{now}: its L{period_window}, from its reset in that period
    (L{counted_start}; as GoModel shows a budget: its C{period_start} the reset's time once later)."""
    start, end = period_window(budget.period, now)
    return counted_start(budget.since, start, end), end


def named_period(value):
    """The L{PERIODS} name the admin API's C{value} says (a name, GoModel's C{day}, C{days}, ... in any case, or
    its seconds as a number or text: C{86400}), or None (no standard period)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if text.isascii() and text.isdigit():
        return _PERIOD_SECONDS.get(int(text)) if len(text) < 12 else None
    return _PERIOD_ALIASES.get(text)


# What L{budget_period} says of a period that is none of L{PERIODS} in any of L{named_period}'s forms.
PERIOD_FORMS = f"one of: {', '.join(PERIODS)} (or GoModel's: day, 86400, ...)"


class BadPeriod(ValueError):
    """A budget's period (L{budget_period}): C{field} (C{period} or C{period_seconds}) is wrong, as its
    message says."""

    def __init__(self, name, message):
        super().__init__(message)
        self.field = name


def budget_period(body):
    """The L{PERIODS} name a budget, a key's budget or a budget reset (a dict C{body}) gives in C{period} or
    GoModel's C{period_seconds}, in any of L{named_period}'s forms (C{daily}, C{day}, C{86400}); None where it
    gives neither. The one parser of the admin API's periods (keys, their resets, budgets by path).

    @raise BadPeriod: one names no standard period, or both are given and name different ones.
    """
    found = None
    for name in ("period", "period_seconds"):
        value = body.get(name)
        if value is None:
            continue
        period = named_period(value)
        if period is None:
            raise BadPeriod(name, f"must be {PERIOD_FORMS}")
        if found is not None and period != found:
            raise BadPeriod(name, f"names another period than period ({found})")
        found = period
    return found


def _seconds_period(seconds: int) -> str:
    if not 0 < seconds <= PERIOD_SECONDS_MAX:
        raise ValueError(f"budget period_seconds must be from 1 to {PERIOD_SECONDS_MAX} (total: no period), "
                         f"not {seconds}")
    return _PERIOD_SECONDS.get(seconds) or f"{seconds}s"


def period_window(period: str, now: float) -> tuple:
    """The UTC period holding C{now}: C{(start, end)} in Unix seconds; C{end} is None for C{total}."""
    if period == "total":
        return 0.0, None
    if period.endswith("s") and period[:-1].isdigit():
        seconds = int(period[:-1])
        start = math.floor(now / seconds) * seconds
        return float(start), float(start + seconds)
    t = datetime.fromtimestamp(now, timezone.utc)
    if period == "hourly":
        start = t.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1)
    elif period == "daily":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
    elif period == "weekly":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=t.weekday())
        end = start + timedelta(days=7)
    elif period == "monthly":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=calendar.monthrange(t.year, t.month)[1])
    else:
        raise ValueError(f"unknown budget period {period!r}")
    return start.timestamp(), end.timestamp()


def normalize_user_path(raw: str) -> str:
    """A user path in GoModel's canonical form (C{"team//alpha/"} -> C{"/team/alpha"}), or ValueError.

    Empty segments go; C{.}, C{..} and C{:} are refused; the empty path is C{/}.
    """
    segments = []
    for segment in str(raw).strip().split("/"):
        segment = segment.strip()
        if not segment:
            continue
        if segment in (".", ".."):
            raise ValueError(f"user path {raw!r} cannot contain '.' or '..' segments")
        if ":" in segment:
            raise ValueError(f"user path {raw!r} cannot contain ':'")
        segments.append(segment)
    return "/" + "/".join(segments)


def path_ancestors(path: str) -> list:
    """C{path} and every ancestor up to C{/}, deepest first (C{/a/b} -> C{["/a/b", "/a", "/"]})."""
    out = [path]
    while path != "/":
        path = path.rsplit("/", 1)[0] or "/"
        out.append(path)
    return out


def parse_rate_limit(text: str) -> RateLimit:
    """GoModel's compact form C{"rpm=100,tpm=50000,rpd=10000,concurrent=10"} (or C{:}; C{,} C{;} or newlines).

    A value starting with C{[} is GoModel's JSON array of rule objects
    (see L{rate_limit_from_rules}).
    """
    text = (text or "").strip()
    if text.startswith("["):
        try:
            rules = json.loads(text)
        except ValueError as e:
            raise ValueError(f"rate limit JSON does not parse: {e}") from None
        return rate_limit_from_rules(rules)
    values = {}
    for item in _fields(text):
        name, value = _pair(item, "rate limit", "name=value")
        name = name.lower()
        if name == "concurrency":
            name = "concurrent"
        if name not in _COMPACT and name != "concurrent":
            raise ValueError(f"rate limit name {name!r} must be one of rpm, tpm, rph, tph, rpd, tpd, concurrent")
        if name in values:
            raise ValueError(f"rate limit {name!r} is given twice")
        values[name] = _positive_int(value, f"rate limit {name}")
    if not values:
        raise ValueError("a rate limit needs at least one of rpm, tpm, rph, tph, rpd, tpd, concurrent")
    return RateLimit(**values)


def rate_limit_from_rules(rules, where="rate limit") -> RateLimit:
    """GoModel's rule list C{[{period | period_seconds, max_requests, max_tokens}]} as one L{RateLimit}."""
    if not isinstance(rules, list) or not rules:
        raise ValueError(f"{where}: limits must be a non-empty list of {{period, max_requests, max_tokens}}")
    values, custom, seen = {}, [], set()
    for i, rule in enumerate(rules):
        at = f"{where}.limits[{i}]"
        if not isinstance(rule, Mapping):
            raise ValueError(f"{at} must be a mapping")
        unknown = set(rule) - {"period", "period_seconds", "max_requests", "max_tokens", "per_child"}
        if unknown:
            raise ValueError(f"{at} has unknown keys: {', '.join(sorted(map(str, unknown)))}")
        if rule.get("per_child"):
            raise ValueError(f"{at}: per_child templates are not supported")
        if rule.get("period_seconds") is not None:
            seconds = rule["period_seconds"]
            if isinstance(seconds, bool) or not isinstance(seconds, int) or not 0 <= seconds <= PERIOD_SECONDS_MAX:
                raise ValueError(f"{at}.period_seconds must be 0 (concurrent) or a whole number of seconds "
                                 f"up to {PERIOD_SECONDS_MAX}")
        else:
            name = str(rule.get("period", "")).strip().lower()
            if name not in _WINDOW_NAMES:
                raise ValueError(f"{at}.period must be one of minute, hour, day, concurrent "
                                 "or period_seconds must be set")
            seconds = _WINDOW_NAMES[name]
        if seconds in seen:
            raise ValueError(f"{where}: two rules for the period of {seconds} seconds")
        seen.add(seconds)
        requests = _optional_positive(rule.get("max_requests"), f"{at}.max_requests")
        tokens = _optional_positive(rule.get("max_tokens"), f"{at}.max_tokens")
        if seconds == 0:
            if tokens is not None:
                raise ValueError(f"{at}.max_tokens is not valid for the concurrent period")
            if requests is None:
                raise ValueError(f"{at}.max_requests is required for the concurrent period")
            values["concurrent"] = requests
            continue
        if requests is None and tokens is None:
            raise ValueError(f"{at} requires max_requests or max_tokens")
        named = {MINUTE: ("rpm", "tpm"), HOUR: ("rph", "tph"), DAY: ("rpd", "tpd")}.get(seconds)
        if named:
            values[named[0]], values[named[1]] = requests, tokens
        else:
            custom.append(Window(seconds, requests, tokens))
    return RateLimit(custom=tuple(custom), **values)


def parse_budgets(text: str) -> tuple:
    """GoModel's C{"daily=10,monthly=200"} (cost amounts), C{{"weekly": 50}} or C{[{"period", "amount"}]}.

    @return: a tuple of L{Budget}s, one per period.
    """
    text = (text or "").strip()
    if text.startswith("{") or text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise ValueError(f"budget JSON does not parse: {e}") from None
        if isinstance(value, dict):
            value = [{"period": k, "amount": v} for k, v in sorted(value.items())]
        return budgets_from_rules(value)
    rules = []
    for item in _fields(text):
        period, amount = _pair(item, "budget limit", "period=amount")
        try:
            number = float(amount)
        except ValueError:
            raise ValueError(f"budget amount {amount!r} is not a valid number") from None
        rules.append({"period": period, "amount": number})
    if not rules:
        raise ValueError("a budget needs at least one period=amount")
    return budgets_from_rules(rules)


def budgets_from_rules(rules, where="budget") -> tuple:
    """GoModel's C{[{period | period_seconds, amount}]} (also C{max_tokens}, C{max_cost}) as L{Budget}s."""
    if not isinstance(rules, list) or not rules:
        raise ValueError(f"{where}: limits must be a non-empty list of {{period, amount}}")
    out, seen = [], set()
    for i, rule in enumerate(rules):
        at = f"{where}.limits[{i}]"
        if not isinstance(rule, Mapping):
            raise ValueError(f"{at} must be a mapping")
        unknown = set(rule) - {"period", "period_seconds", "amount", "max_cost", "max_tokens"}
        if unknown:
            raise ValueError(f"{at} has unknown keys: {', '.join(sorted(map(str, unknown)))}")
        if rule.get("amount") is not None and rule.get("max_cost") is not None:
            raise ValueError(f"{at}: amount and max_cost are the same setting; give one")
        cost = rule.get("amount", rule.get("max_cost"))
        tokens = rule.get("max_tokens")
        if cost is not None and not is_cost(cost):
            raise ValueError(f"{at}.amount must be a finite number greater than 0")
        try:
            period = parse_period(rule["period_seconds"] if rule.get("period_seconds") is not None
                                  else rule.get("period", ""))
            budget = Budget(period, max_tokens=tokens, max_cost=cost)
        except ValueError as e:
            raise ValueError(f"{at}: {e}") from None
        if budget.period in seen:
            raise ValueError(f"{where}: two budgets for the {budget.period} period")
        seen.add(budget.period)
        out.append(budget)
    return tuple(out)


@dataclass(frozen=True)
class LimitsConfig:
    """Configured limits: C{user_paths}, C{providers}, C{models} map subjects to L{RateLimit}s,
    C{budgets} maps user paths to tuples of L{Budget}s. Subjects are canonical
    (paths normalised, provider and model names lower-cased).
    """

    rate_limits_enabled: bool = True
    budgets_enabled: bool = True
    user_paths: Mapping = field(default_factory=dict)
    providers: Mapping = field(default_factory=dict)
    models: Mapping = field(default_factory=dict)
    budgets: Mapping = field(default_factory=dict)

    def path_scopes(self, path) -> list:
        """C{[("path:/team", RateLimit), ...]} for every configured ancestor of C{path} (deepest first)."""
        if not self.rate_limits_enabled or not self.user_paths or not path:
            return []
        return [(f"path:{p}", self.user_paths[p]) for p in path_ancestors(path) if p in self.user_paths]

    def target_scopes(self, provider, model) -> list:
        """The provider's scope and the model's (C{model:provider/model} and bare C{model:model}) that have limits.

        GoModel's matching: a qualified model rule caps one provider's model,
        a bare one caps the model on every provider; case-insensitive.
        """
        if not self.rate_limits_enabled:
            return []
        out = []
        provider = (provider or "").lower()
        if provider in self.providers:
            out.append((f"provider:{provider}", self.providers[provider]))
        if self.models and model:
            model = model.lower()
            for name in (f"{provider}/{model}", model):
                if name in self.models:
                    out.append((f"model:{name}", self.models[name]))
        return out

    def budget_scopes(self, path) -> list:
        """C{[("path:/team", (Budget, ...)), ...]} for every ancestor of C{path} with budgets."""
        if not self.budgets_enabled or not self.budgets or not path:
            return []
        return [(f"path:{p}", self.budgets[p]) for p in path_ancestors(path) if p in self.budgets]


def limits_from_yaml(mapping, base: Optional[LimitsConfig] = None) -> LimitsConfig:
    """The C{rate_limits:} and C{budgets:} sections of a YAML document (the whole mapping) over C{base}."""
    base = base or LimitsConfig()
    mapping = mapping or {}
    rate = _section(mapping, "rate_limits", ("enabled", "user_paths", "providers", "models"))
    budgets = _section(mapping, "budgets", ("enabled", "user_paths"))
    user_paths, providers, models, paths_budgets = (dict(base.user_paths), dict(base.providers),
                                                    dict(base.models), dict(base.budgets))
    _read_entries(rate, "rate_limits", "user_paths", "path", normalize_user_path, user_paths, base.user_paths,
                  rate_limit_from_rules)
    _read_entries(rate, "rate_limits", "providers", "name", _provider_name, providers, base.providers,
                  rate_limit_from_rules)
    _read_entries(rate, "rate_limits", "models", "model", _model_name, models, base.models, rate_limit_from_rules)
    _read_entries(budgets, "budgets", "user_paths", "path", normalize_user_path, paths_budgets, base.budgets,
                  budgets_from_rules)
    return LimitsConfig(
        rate_limits_enabled=_enabled(rate, "rate_limits", base.rate_limits_enabled),
        budgets_enabled=_enabled(budgets, "budgets", base.budgets_enabled),
        user_paths=user_paths, providers=providers, models=models, budgets=paths_budgets)


def _read_entries(section, section_name, key, subject_key, normalize, into, base, parse):
    """Each entry of C{section[key]} into C{into}: its subject (normalised) -> its parsed C{limits}."""
    for i, entry in enumerate(_entries(section, key, section_name)):
        where = f"{section_name}.{key}[{i}]"
        _known(entry, (subject_key, "limits", "per_child"), where)
        subject = _subject(entry, subject_key, where, normalize)
        _no_duplicate(subject, into, base, where)
        into[subject] = parse(entry.get("limits"), where)


def limits_from_env(environ: Mapping, base: Optional[LimitsConfig] = None) -> LimitsConfig:
    """C{SET_RATE_LIMIT_*}, C{SET_PROVIDER_RATE_LIMIT_*}, C{SET_BUDGET_*} and the two C{*_ENABLED} over C{base}.

    An entry replaces C{base}'s entry of the same subject; empty values are unset.
    """
    base = base or LimitsConfig()
    rate_enabled = _env_bool(environ, "RATE_LIMITS_ENABLED", base.rate_limits_enabled)
    budgets_enabled = _env_bool(environ, "BUDGETS_ENABLED", base.budgets_enabled)
    user_paths, providers, budgets = dict(base.user_paths), dict(base.providers), dict(base.budgets)
    for key in sorted(environ):
        value = environ[key]
        if not value or not value.strip():
            continue
        try:
            # As GoModel: a disabled feature's variables are not read.
            if key.startswith("SET_RATE_LIMIT_") and rate_enabled:
                user_paths[env_path(key[len("SET_RATE_LIMIT_"):])] = parse_rate_limit(value)
            elif key.startswith("SET_PROVIDER_RATE_LIMIT_") and rate_enabled:
                providers[_provider_name(key[len("SET_PROVIDER_RATE_LIMIT_"):].replace("_", "-"))] = \
                    parse_rate_limit(value)
            elif key.startswith("SET_BUDGET_") and budgets_enabled:
                budgets[env_path(key[len("SET_BUDGET_"):])] = parse_budgets(value)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None  # (the value is in the reason)
    return LimitsConfig(rate_limits_enabled=rate_enabled, budgets_enabled=budgets_enabled,
                        user_paths=user_paths, providers=providers, models=dict(base.models), budgets=budgets)


def env_path(suffix: str) -> str:
    """The user path an environment suffix names: C{TEAM__ALPHA} -> C{/team/alpha}, C{""} -> C{/}."""
    return normalize_user_path("/".join(p.strip() for p in suffix.strip().lower().split("__")))


def _provider_name(raw) -> str:
    name = str(raw).strip().lower()
    if not name:
        raise ValueError("provider name is required")
    if any(c in name for c in "/ \t"):
        raise ValueError(f"provider name {name!r} must have no slashes or spaces")
    return name


def _model_name(raw) -> str:
    name = str(raw).strip().lower()
    if not name:
        raise ValueError("model is required")
    return name


def _fields(text):
    for sep in (";", "\n"):
        text = text.replace(sep, ",")
    return [f.strip() for f in text.split(",") if f.strip()]


def _pair(item, what, form):
    for sep in ("=", ":"):
        if sep in item:
            name, value = item.split(sep, 1)
            return name.strip(), value.strip()
    raise ValueError(f"{what} {item!r} must use {form}")


def _positive_int(text, what) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{what} value {text!r} is not a valid integer") from None
    if not 0 < value <= COUNT_MAX:
        raise ValueError(f"{what} must be from 1 to {COUNT_MAX}, not {value}")
    return value


def _optional_positive(value, where):
    if value is None:
        return None
    if not is_count(value):
        raise ValueError(f"{where} must be a whole number from 1 to {COUNT_MAX}")
    return value


def _section(mapping, name, keys):
    value = mapping.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping")
    _known(value, keys, name)
    return value


def _known(mapping, keys, where):
    """Refuse a key of C{mapping} not among C{keys} (a misspelt C{user_path:} would set no limit at all)."""
    unknown = set(mapping) - set(keys)
    if unknown:
        raise ValueError(f"{where} has unknown keys: {', '.join(sorted(map(str, unknown)))} "
                         f"(known: {', '.join(keys)})")


def _entries(section, key, name):
    value = section.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(e, Mapping) for e in value):
        raise ValueError(f"{name}.{key} must be a list of mappings")
    return value


def _subject(entry, key, where, normalize):
    if entry.get("per_child"):
        raise ValueError(f"{where}: per_child templates are not supported")
    if not str(entry.get(key) or "").strip():
        raise ValueError(f"{where}.{key} is required")
    if isinstance(entry[key], (bool, list, Mapping)):  # (a number is a name: C{model: 7} is the model "7")
        raise ValueError(f"{where}.{key} must be text, not {type(entry[key]).__name__}")
    try:
        return normalize(entry[key])
    except ValueError as e:
        raise ValueError(f"{where}.{key} is invalid: {e}") from None


def _no_duplicate(subject, current, base, where):
    if subject in current and current[subject] is not base.get(subject):
        raise ValueError(f"{where}: {subject} is configured twice")


def _enabled(section, name, default) -> bool:
    value = section.get("enabled", default)
    if not isinstance(value, bool):
        raise ValueError(f"{name}.enabled must be true or false")
    return value


def _env_bool(environ, name, default) -> bool:
    text = environ.get(name) or ""
    value = text.strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}: invalid value {text!r}: must be true or false")  # (as every other variable's)
