"""The README against the code: its metrics table, its routes, the routes the code serves, its error codes.

The settings tables have their own check (L{tests.test_config}).
"""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest_twisted
import treq

from tests.support import start_fake, start_gateway, stop_all

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _table(header):
    """The rows (lists of cells) of the README's table whose header row starts with C{header}."""
    rows, inside = [], False
    for line in README.splitlines():
        if line.startswith(f"| {header} |"):
            inside = True
        elif inside and line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
            if not set(cells[0]) <= set("- "):
                rows.append(cells)
        elif inside:
            break
    return rows


def _outside_parentheses(text):
    """C{text} without what parentheses hold, but for a parenthesis that adds (C{(+ `state`)})."""
    kept, depth, adding = [], 0, False
    for i, c in enumerate(text):
        if c == "(":
            depth += 1
            adding = depth == 1 and text[i + 1:i + 2] == "+"
        elif c == ")":
            depth -= 1
        elif depth == 0 or adding:
            kept.append(c)
    return "".join(kept)


def _documented_metrics():
    """C{{series name: the labels its row names}} from the README's metrics table."""
    found = {}
    for name_cell, labels_cell, *_ in _table("series"):
        labels = set(re.findall(r"`(\w+)`", _outside_parentheses(labels_cell)))
        for name in re.findall(r"`(gomodel_\w+)`", name_cell):
            found[name] = labels
    return found


def _code_metrics():
    """C{{series name: its labels}}, of every series the gateway's metrics expose."""
    from gomodel.accounting.metrics import GatewayMetrics

    load = SimpleNamespace(waiting=1, running=1, kv_cache_usage=0.5)
    replica = SimpleNamespace(index=0, ready=True, state="ready", in_flight=0, load=load, trial=False,
                              busy_for=lambda: 0.0, held_for=lambda: 0.0)
    pool = SimpleNamespace(type="vllm", name="vllm", replicas=[replica])
    metrics = GatewayMetrics(pools=[pool])
    found = {}
    for collector in set(metrics.registry._names_to_collectors.values()):
        suffix = "_total" if collector._type == "counter" else ""
        found[collector._name + suffix] = set(collector._labelnames)
    for collector in metrics._exposed._collector_to_names:
        if not hasattr(collector, "_labelnames"):  # the replica collector: read at scrape time
            for family in collector.collect():
                found[family.name] = {label for s in family.samples for label in s.labels}
    return found


def test_the_readmes_metrics_table_names_every_series_with_its_labels():
    """Each series the gateway exposes is a row of the README's metrics table, with the labels it has, and the
    table names no series the gateway lacks."""
    documented, code = _documented_metrics(), _code_metrics()
    assert set(documented) == set(code), (set(documented) ^ set(code))
    rows = {}
    for name, labels in documented.items():
        rows.setdefault(frozenset(labels), []).append(name)
    for labels, names in rows.items():
        assert set().union(*(code[n] for n in names)) == labels, (names, sorted(labels))
        for name in names:
            assert code[name] <= labels, (name, code[name], sorted(labels))


# -- routes --------------------------------------------------------------------

_EXAMPLES = {"{id}": "x1", "{provider}": "vllm", "{endpoint}": "v1/models", "{user_path}": "team",
             "{period}": "daily", "*": "app.js"}


def _routes_of(text):
    """C{[(method, path)]} named by C{text}: C{`GET|DELETE /v1/x/{id}`}, and a bare C{`/y`} after a
    method takes it (C{`POST /rerank`, `/v2/rerank`})."""
    found, method = [], None
    for methods, path in re.findall(r"`(?:((?:[A-Z]+\\?\|?)+) )?(/[^` ?]*)(?:\?[^`]*)?`", text):
        if methods:
            method = [m for m in methods.replace("\\", "").split("|") if m]
        if method and all(m in METHODS for m in method):
            found += [(m, path) for m in method]
    return found


def documented_routes():
    """Every C{(method, path)} the README's endpoints table and its admin API text name."""
    routes = []
    for route, *_ in _table("route"):
        if route.startswith("any method"):
            routes += [(m, p) for _, p in _routes_of(route.replace("any method `", "`GET ")) for m in ("GET", "POST")]
        else:
            routes += _routes_of(route)
    admin = set(re.findall(r"`((?:GET|POST|PUT|PATCH|DELETE)(?:\|(?:GET|POST|PUT|PATCH|DELETE))* "
                           r"/admin/api/v1/[^`]*)`", README))
    for text in sorted(admin):
        routes += _routes_of(f"`{text}`")
    return list(dict.fromkeys(routes))


def _example(path):
    for placeholder, value in _EXAMPLES.items():
        path = path.replace(placeholder, value)
    return path


@pytest_twisted.ensureDeferred
async def test_every_route_the_readme_names_is_served(reactor, tmp_path):
    """Each route of the README's endpoints table and each admin API route it names answers that method: never
    the gateway's 404 "Unknown route" nor a 405."""
    fake = await start_fake(reactor)
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k",
                                            "SET_BUDGET_TEAM": "daily=10"})
    routes = documented_routes()
    assert len(routes) > 50
    unserved = []
    try:
        for method, path in routes:
            response = await treq.request(method, gateway.url + _example(path), data=b"{}",
                                          headers={"Authorization": "Bearer k", "Content-Type": "application/json"})
            body = await response.content()
            if response.code == 405 or (response.code == 404 and b"Unknown route" in body):
                unserved.append(f"{method} {path}: {response.code}")
    finally:
        await stop_all(gateway, fake)
    assert not unserved


def _normal(path):
    """A path with its parameters as C{{}}: C{/v1/files/<file_id>} and C{/v1/files/{id}} alike (and a
    C{<path:...>}'s segments, C{{user_path}/{period}}, as one)."""
    return re.sub(r"\{\}(/\{\})+", "{}", re.sub(r"<[^>]*>|\{[^}]*\}|\*", "{}", path.rstrip("/"))) or "/"


def served_routes():
    """Every C{(method, path)} the code serves: the front's exact POST routes, its pages, and Klein's routes
    (each API at the path it is mounted on)."""
    from gomodel.anthropic.batches import MessageBatchesAPI
    from gomodel.api.admin import AdminAPI
    from gomodel.api.app import GatewayApp
    from gomodel.api.batches import BatchesAPI
    from gomodel.api.budgets import BudgetsAPI
    from gomodel.api.files import FilesAPI
    from gomodel.api.inference import InferenceRoutes
    from gomodel.api.key_routes import KeysAPI
    from gomodel.api.messages import MessagesRoutes
    from gomodel.config import Config

    class Anything:
        def __getattr__(self, name):
            return print

    routes = {("POST", path.decode()) for cls in (InferenceRoutes, MessagesRoutes)
              for path in cls.routes(Anything())}
    routes.add(("GET", Config().metrics.endpoint))  # (the front's page)
    mounts = ((GatewayApp, ""), (FilesAPI, "/v1/files"), (BatchesAPI, "/v1/batches"),
              (MessageBatchesAPI, "/v1/messages/batches"), (AdminAPI, "/admin/api/v1"),
              (KeysAPI, "/admin/api/v1/auth-keys"), (BudgetsAPI, "/admin/api/v1/budgets"))
    for cls, prefix in mounts:
        for rule in cls.app.url_map.iter_rules():
            if "//" in rule.rule or (rule.methods is None):  # a mount (branch), or another spelling of one
                continue
            routes |= {(m, prefix + rule.rule) for m in rule.methods - {"HEAD", "OPTIONS"}}
    return routes


def test_every_route_the_code_serves_is_in_the_readme():
    """The README names each route (method and path) the gateway serves."""
    named = {(m, _normal(p)) for m, p in documented_routes()}
    missing = sorted(f"{m} {p}" for m, p in served_routes()
                     if (m, _normal(p)) not in named and not p.startswith("/p/"))
    assert not missing, missing


def test_every_error_code_the_readme_names_is_one_the_code_answers():
    """An error code the README gives beside a status (C{404 `file_not_found`}, C{code: "rate_limit_exceeded"})
    is a code the gateway's source spells."""
    codes = set(re.findall(r"\b[1-5]\d\d `([a-z][a-z0-9_]+)`", README)) | set(re.findall(r'code: "(\w+)"', README))
    package = Path(__file__).resolve().parent.parent / "gomodel"
    source = "".join(p.read_text(encoding="utf-8") for p in package.rglob("*.py"))
    assert len(codes) > 30
    assert not [c for c in sorted(codes) if f'"{c}"' not in source and f"'{c}'" not in source]


@pytest_twisted.ensureDeferred
async def test_the_providers_status_fields_are_those_the_readme_lists(reactor):
    """C{GET /admin/api/v1/providers/status} answers each provider and replica with exactly the fields the
    README's "State." item names."""
    item = README[README.index("- **State.**"):README.index("`POST /admin/api/v1/runtime/refresh`")]
    named = set(re.findall(r"`([a-z_]+)`", item))
    fake = await start_fake(reactor)
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k"})
    try:
        response = await treq.get(gateway.url + "/admin/api/v1/providers/status", headers={"Authorization": "Bearer k"})
        (provider,) = (await response.json())["providers"]
    finally:
        await stop_all(gateway, fake)
    fields = set(provider) | set(provider["replicas"][0])
    assert not fields - named, sorted(fields - named)


def _fields(value, found=None):
    """Every key of every object in C{value}, a parsed JSON answer."""
    found = set() if found is None else found
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        _fields(item, found)
    if isinstance(value, dict):
        found.update(value)
    return found


@pytest_twisted.ensureDeferred
async def test_every_field_of_the_own_usage_answer_is_in_the_readme(reactor):
    """C{GET /v1/usage} (with a budget, a rate window and a concurrency cap over the caller) answers only fields
    its README section names."""
    section = README[README.index("### Your own usage"):README.index("## Dashboard")]
    named = set(re.findall(r"`([a-z_]+)`", section))
    fake = await start_fake(reactor)
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k",
                                            "SET_BUDGET_TEAM": "daily=10",
                                            "SET_RATE_LIMIT_TEAM": "rpm=10,tpm=100,concurrent=3"})
    try:
        response = await treq.get(gateway.url + "/v1/usage",
                                  headers={"Authorization": "Bearer k", "X-GoModel-User-Path": "/team"})
        answer = await response.json()
    finally:
        await stop_all(gateway, fake)
    assert answer["budgets"] and len(answer["rate_limits"]) == 2
    assert not _fields(answer) - named, sorted(_fields(answer) - named)


@pytest_twisted.ensureDeferred
async def test_every_field_of_the_admin_usage_views_is_in_the_readme(reactor):
    """The admin usage views (summary, days, groupings, time series, log), once a managed key's request is
    recorded, answer only fields the README's "Usage ledger" section names (but a list's C{object} and C{data})."""
    from tests.fakes.vllm import CHAT_MODEL

    section = README[README.index("## Usage ledger"):README.index("## Managed keys")]
    named = set(re.findall(r"`([a-z_0-9]+)`", section)) | {"object", "data"}
    fake = await start_fake(reactor)
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k"})
    master = {"Authorization": "Bearer k"}
    fields = set()
    try:
        made = await treq.post(gateway.url + "/admin/api/v1/auth-keys", json={"name": "a", "user_path": "/team"},
                               headers=master)
        key = (await made.json())["value"]
        answer = await treq.post(gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                 json={"model": f"vllm/{CHAT_MODEL}", "messages": [{"role": "user", "content": "hi"}]})
        assert answer.code == 200, await answer.content()
        await gateway.service.usage.flush()
        for view in ("summary", "daily", "models", "providers", "keys", "user-paths", "timeseries", "log"):
            response = await treq.get(f"{gateway.url}/admin/api/v1/usage/{view}", headers=master)
            fields |= _fields(await response.json())
    finally:
        await stop_all(gateway, fake)
    assert {"request_id", "replica", "ttft_ms_p95"} <= fields
    assert not fields - named, sorted(fields - named)


@pytest_twisted.ensureDeferred
async def test_every_field_of_a_managed_key_is_in_the_readme(reactor):
    """A managed key as the admin API shows it (made, listed, one) has only fields the README's "Managed keys"
    section names (but a list's C{object} and C{data})."""
    section = README[README.index("## Managed keys"):README.index("### Your own usage")]
    named = set(re.findall(r"`([a-z_0-9]+)`", section)) | {"object", "data"}
    fake = await start_fake(reactor)
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k"})
    master, base = {"Authorization": "Bearer k"}, gateway.url + "/admin/api/v1/auth-keys"
    try:
        made = await treq.post(base, headers=master, json={"name": "a", "description": "ci", "user_path": "/team",
                                                           "budgets": [{"period": "daily", "max_tokens": 1000}]})
        key = await made.json()
        fields = _fields(key) | _fields(await (await treq.get(base, headers=master)).json())
        fields |= _fields(await (await treq.get(f"{base}/{key['id']}", headers=master)).json())
    finally:
        await stop_all(gateway, fake)
    assert key["object"] == "auth_key" and "`auth_key`" in section
    assert not fields - named, sorted(fields - named)


@pytest_twisted.ensureDeferred
async def test_every_field_of_a_json_access_line_is_in_the_readme(reactor):
    """An access line as C{LOG_FORMAT=json} writes it has only the fields the README's C{LOG_FORMAT} row names."""
    import io
    import json

    from twisted.logger import globalLogPublisher

    from gomodel.logs import JSONLineObserver
    from tests.fakes.vllm import CHAT_MODEL
    from tests.support import AccessRecords

    row = next(line for line in README.splitlines() if line.startswith("| `LOG_FORMAT` |"))
    named = set(re.findall(r"`([a-z_]+)`", row))
    fake = await start_fake(reactor)
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    records = AccessRecords()
    globalLogPublisher.addObserver(records)
    try:
        logged = records.next(reactor)
        answer = await treq.post(gateway.url + "/v1/chat/completions",
                                 json={"model": f"vllm/{CHAT_MODEL}", "messages": [{"role": "user", "content": "hi"}]})
        await answer.content()
        event = await logged
    finally:
        globalLogPublisher.removeObserver(records)
        await stop_all(gateway, fake)
    out = io.StringIO()
    JSONLineObserver(out)(event)
    fields = set(json.loads(out.getvalue()))
    assert {"request_id", "ttfb_ms", "prompt_tokens"} <= fields
    assert not fields - named, sorted(fields - named)


def test_every_span_attribute_the_tracing_sets_is_in_the_readme():
    """Each attribute name the OpenTelemetry spans are given is named in the README's OpenTelemetry section, and
    each dotted name that section gives is one the tracing code spells."""
    section = README[README.index("## OpenTelemetry"):README.index("## Usage ledger")]
    source = (Path(__file__).resolve().parent.parent / "gomodel/accounting/tracing.py").read_text(encoding="utf-8")
    spelled = set(re.findall(r'"((?:gen_ai|gomodel|http|server|url|error|network)\.[a-z_.]+)"', source))
    named = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)+)`", section))
    assert not spelled - named, sorted(spelled - named)
    assert not [name for name in named if name not in source]


def test_every_error_code_the_gateway_gives_is_in_the_readme():
    """Each C{code} the gateway's errors give (C{code="..."}, a class's C{code = "..."}) is named in the README,
    but the generic ones a more precise code or the route's text stands for."""
    package = Path(__file__).resolve().parent.parent / "gomodel"
    given = set()
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        given |= set(re.findall(r'\bcode\s*=\s*"([a-z_0-9]+)"', text))
        given |= set(re.findall(r'LineError\(\s*"([a-z_0-9]+)"', text))  # (a batch line's, in its errors.data)
    generic = {"conflict", "forbidden", "not_found"}
    assert len(given) > 50
    assert not sorted(c for c in given - generic if f"`{c}`" not in README and f'"{c}"' not in README)


@pytest_twisted.ensureDeferred
async def test_every_field_of_the_budgets_list_is_in_the_readme(reactor):
    """C{GET /admin/api/v1/budgets}, with a configured cost budget and a token budget set through the API, answers
    only fields the README's "Managed keys, limits and budgets" section names."""
    section = README[README.index("## Managed keys"):README.index("### Your own usage")]
    named = set(re.findall(r"`([a-z_0-9]+)`", section)) | {"object"}
    fake = await start_fake(reactor)
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k",
                                            "SET_BUDGET_TEAM": "daily=1"})
    master, base = {"Authorization": "Bearer k"}, gateway.url + "/admin/api/v1/budgets"
    try:
        put = await treq.put(base, headers=master, json={"user_path": "/a", "period": "weekly", "max_tokens": 5})
        assert put.code == 200, await put.content()
        fields = _fields(await put.json()) | _fields(await (await treq.get(base, headers=master)).json())
    finally:
        await stop_all(gateway, fake)
    assert {"spent_tokens", "period_ratio", "scope"} <= fields
    assert not fields - named, sorted(fields - named)
