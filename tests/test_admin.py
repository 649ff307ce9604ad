"""The admin API's model list, ADMIN_ENDPOINTS_ENABLED, the usage log's query and budgets' numbers."""

import csv
import io
import json
import os
import sys
import time

import pytest
import pytest_twisted

from gomodel.store.records import USAGE_FIELDS
from tests.stores import storage  # noqa: F401 (a fixture)
from tests.support import start_gateway

KEY = {"Authorization": "Bearer k1"}
MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"
CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).encode()


async def admin(http, gw, method, path, body=None):
    """C{(status, parsed answer)} of an admin call; C{body} is JSON text as it is, or a value to write as JSON."""
    data = body.encode() if isinstance(body, str) else None if body is None else json.dumps(body).encode()
    response = await http.request(method, gw.url + path, headers=KEY, data=data)
    return response.code, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_admin_models_name_each_provider_and_virtual_models(reactor, http, fake):
    virtual = [{"source": "llama", "target": "vllm/meta-llama/Llama-3.1-8B-Instruct"}]
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                       "VIRTUAL_MODELS": json.dumps(virtual)})
    try:
        assert (await http.get(gw.url + "/admin/api/v1/models")).code == 401
        response = await http.get(gw.url + "/admin/api/v1/models", headers=KEY)
        data = {m["id"]: m for m in json.loads(await response.content())["data"]}
        entry = data["vllm/meta-llama/Llama-3.1-8B-Instruct"]
        model = entry.pop("model")
        assert entry == {
            "id": "vllm/meta-llama/Llama-3.1-8B-Instruct", "provider": "vllm", "provider_name": "vllm",
            "ready_replicas": 1, "provider_type": "vllm", "selector": "vllm/meta-llama/Llama-3.1-8B-Instruct",
            "access": {"selector": "vllm/meta-llama/Llama-3.1-8B-Instruct", "default_enabled": True,
                       "effective_enabled": True}}  # (GoModel's inventory fields beside ours)
        assert (model["id"], model["object"]) == ("meta-llama/Llama-3.1-8B-Instruct", "model")
        assert data["llama"]["provider"] == "virtual"
        assert data["llama"]["targets"] == [{"model": "vllm/meta-llama/Llama-3.1-8B-Instruct", "weight": 1.0}]
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_admin_models_tell_virtual_models_from_a_provider_named_gomodel(reactor, http, fake, tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(f"providers: {{gomodel: {{type: vllm, base_url: '{fake.base_url}'}}}}\n"
                    "virtual_models: [{source: llama, target: gomodel/meta-llama/Llama-3.1-8B-Instruct}]\n")
    gw = await start_gateway(reactor, {"GOMODEL_MASTER_KEY": "k1"}, yaml_path=str(path))
    try:
        code, answer = await admin(http, gw, "GET", "/admin/api/v1/models")
        assert code == 200 and [{k: v for k, v in m.items() if k in ("id", "provider", "provider_name",
                                                                      "ready_replicas", "targets")}
                                for m in answer["data"]] == [  # (llama was listed as a vllm model of provider gomodel)
            {"id": "gomodel/meta-llama/Llama-3.1-8B-Instruct", "provider": "vllm", "provider_name": "gomodel",
             "ready_replicas": 1},
            {"id": "llama", "provider": "virtual", "provider_name": None,
             "targets": [{"model": "gomodel/meta-llama/Llama-3.1-8B-Instruct", "weight": 1.0}]}]
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_admin_endpoints_can_be_turned_off(reactor, http, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                       "ADMIN_ENDPOINTS_ENABLED": "false"})
    try:
        response = await http.get(gw.url + "/admin/api/v1/providers/status", headers=KEY)
        assert response.code == 404
        assert json.loads(await response.content())["error"]["code"] == "not_found"
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_budgets_routes_say_budgets_are_off(reactor, http, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                       "BUDGETS_ENABLED": "false"})
    try:
        for method, path in (("GET", "/admin/api/v1/budgets"), ("PUT", "/admin/api/v1/budgets/team/daily")):
            code, error = await admin(http, gw, method, path, {"amount": 1} if method == "PUT" else None)
            assert (code, error["error"]["code"]) == (404, "budgets_disabled"), path  # ("Unknown route" before)
            assert "BUDGETS_ENABLED=false" in error["error"]["message"]
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_usage_log_numbers_out_of_range_are_400s_and_search_is_literal(reactor, http, fake, storage):
    gw = await start_gateway(reactor, dict({"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"}, **storage))
    try:
        for request_id in ("run_1", "run-2"):
            response = await http.post(gw.url + "/v1/chat/completions", data=CHAT,
                                       headers=dict(KEY, **{"X-Request-Id": request_id}))
            assert response.code == 200
            await response.content()
        await gw.service.usage.flush()
        for query, param in (("after=99999999999999999999", "after"), ("after=9223372036854775808", "after"),
                             ("after=-1", "after"), ("after=x", "after"), ("status=99999999999999999999", "status"),
                             ("status=99", "status"), ("status=600", "status"), ("status=ok", "status"),
                             ("status=%2B200", "status"), ("status=2_00", "status"), ("after=%201", "after"),
                             ("limit=99999999999999999999", "limit"), ("days=99999999999999999999", "days")):
            response = await http.get(gw.url + "/admin/api/v1/usage/log?" + query, headers=KEY)
            error = json.loads(await response.content())["error"]
            assert (response.code, error["param"]) == (400, param), (query, error)
            assert error["code"] in ("invalid_value", "invalid_window"), (query, error)
        for query, found in (("after=9223372036854775807", ["run-2", "run_1"]), ("status=599", []),
                             ("status=200", ["run-2", "run_1"]), ("search=_", ["run_1"]), ("search=%25", []),
                             ("search=n_", ["run_1"]), ("search=n%25", []), ("search=run", ["run-2", "run_1"])):
            response = await http.get(gw.url + "/admin/api/v1/usage/log?" + query, headers=KEY)
            assert response.code == 200, query
            assert [r["request_id"] for r in json.loads(await response.content())["data"]] == found, query
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_budgets_refuse_costs_past_a_float_and_unknown_fields(reactor, http, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        for body, param in (
                ({"user_path": "/team", "period": "daily", "amount": 10**400}, "amount"),
                ({"user_path": "/team", "period": "daily", "max_cost": 10**400}, "max_cost"),
                ({"user_path": "/team", "period": "daily", "max_tokens": 10**400}, "max_tokens"),
                ({"user_path": "/team", "period": "daily", "amount": 1, "x": 1}, "x"),
                ('{"user_path": "/team", "period": "daily", "amount": 1e400}', None),  # (not JSON's: no infinity)
                ('{"user_path": "/team", "period": "daily", "amount": 1e400, "x": 100000000000000000000}', "x")):
            code, error = await admin(http, gw, "PUT", "/admin/api/v1/budgets", body)
            assert (code, error["error"]["param"]) == (400, param), (body, error)
        code, error = await admin(http, gw, "PUT", "/admin/api/v1/budgets/team/daily", {"amount": 10**400})
        assert (code, error["error"]["param"], error["error"]["code"]) == (400, "amount", "invalid_value")
        code, error = await admin(http, gw, "PUT", "/admin/api/v1/budgets/team/daily", {"amount": 1, "y": None})
        assert (code, error["error"]["message"], error["error"]["code"]) == (
            400, "'y' is not a field of a budget.", "invalid_value")
        code, error = await admin(http, gw, "DELETE", "/admin/api/v1/budgets", {"user_path": "/team", "x": 1})
        assert (code, error["error"]["param"]) == (400, "x")  # a DELETE's body as a PUT's
        # a reset's or the settings' unknown field named as theirs (before, "not a field of a budget" for each)
        for path, body, said in (
                ("budgets/reset", {"user_path": "/team", "confirmation": "reset"}, "a reset of every budget"),
                ("budgets/reset-one", {"user_path": "/team", "period": "daily", "x": 1}, "a budget reset"),
                ("budgets/settings", {"x": 1}, "the budget settings")):
            code, error = await admin(http, gw, "POST" if "reset" in path else "PUT",
                                      f"/admin/api/v1/{path}", body)
            field = "user_path" if path == "budgets/reset" else "x"
            assert (code, error["error"]["message"], error["error"]["param"]) == (
                400, f"'{field}' is not a field of {said}.", field), (path, error)
        code, listed = await admin(http, gw, "GET", "/admin/api/v1/budgets")
        assert (code, listed["data"]) == (200, [])
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_budget_body_that_contradicts_its_route_or_query_is_a_400_naming_the_field(reactor, http, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        for method, path, body, param in (
                ("PUT", "/admin/api/v1/budgets/team/daily", {"user_path": "/other", "amount": 1}, "user_path"),
                ("PUT", "/admin/api/v1/budgets/team/daily", {"period": "monthly", "amount": 1}, "period"),
                ("DELETE", "/admin/api/v1/budgets/team/daily", {"user_path": "/other"}, "user_path"),
                ("DELETE", "/admin/api/v1/budgets?user_path=/team&period=daily", {"period": "hourly"}, "period")):
            code, error = await admin(http, gw, method, path, body)
            assert (code, error["error"]["param"], error["error"]["code"]) == (400, param, "invalid_value"), path
        code, listed = await admin(http, gw, "GET", "/admin/api/v1/budgets")
        assert (code, listed["data"]) == (200, [])
        code, budget = await admin(http, gw, "PUT", "/admin/api/v1/budgets/team/daily",
                                   {"user_path": "team/", "period": "daily", "amount": 1})  # (the same path)
        assert (code, budget["user_path"], budget["period"]) == (200, "/team", "daily")
        code, gone = await admin(http, gw, "DELETE", "/admin/api/v1/budgets/team/daily", {"user_path": "/team"})
        assert (code, gone["deleted"]) == (200, True)
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_budgets_routes_take_and_answer_gomodels_shapes(reactor, http, fake):
    """Issue 14: budgets are set through "GET|PUT|DELETE /admin/api/v1/budgets..., GoModel's shapes". GoModel's
    PUT|DELETE /budgets/{user_path}/{period} takes the user path URL-encoded (%2Fteam%2Falpha) and the period by
    name or in seconds, and its GET, PUT and DELETE answer {"budgets": [...], "server_time"}, each budget with
    period_seconds, period_label, amount, spent, remaining, usage_ratio, period_ratio, has_usage. Before, that
    route was a 404 "Unknown route" and a period in seconds a 400, and the answers had no "budgets" (a GoModel
    client saw no budget). Now both forms are taken and every answer carries GoModel's list beside ours."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        code, put = await admin(http, gw, "PUT", "/admin/api/v1/budgets/%2Fteam%2Fbeta/86400", {"amount": 5})
        assert (code, put["user_path"], put["period"], put["amount"]) == (200, "/team/beta", "daily", 5)
        code, hourly = await admin(http, gw, "PUT", "/admin/api/v1/budgets/%2Fteam%2Fbeta/hourly", {"amount": 1})
        assert code == 200 and [(b["period_label"], b["amount"]) for b in hourly["budgets"]] == [
            ("daily", 5), ("hourly", 1)]
        code, listed = await admin(http, gw, "GET", "/admin/api/v1/budgets")
        assert code == 200 and listed["server_time"].endswith("Z") and len(listed["data"]) == 2
        daily = listed["budgets"][0]
        assert {name: daily[name] for name in ("user_path", "period_seconds", "period_label", "amount", "spent",
                                               "remaining", "usage_ratio", "has_usage", "source")} == {
            "user_path": "/team/beta", "period_seconds": 86400, "period_label": "daily", "amount": 5, "spent": 0,
            "remaining": 5, "usage_ratio": 0, "has_usage": False, "source": "admin"}
        assert 0 <= daily["period_ratio"] <= 1 and daily["period_end"].endswith("T00:00:00Z")
        code, gone = await admin(http, gw, "DELETE", "/admin/api/v1/budgets/%2Fteam%2Fbeta/3600")
        assert (code, gone["deleted"], [b["period_label"] for b in gone["budgets"]]) == (200, True, ["daily"])
        code, error = await admin(http, gw, "PUT", "/admin/api/v1/budgets/%2Fteam/1234", {"amount": 1})
        assert (code, error["error"]["param"]) == (400, "period")  # (no such calendar period)
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_budget_settings_are_gomodels_reset_anchors_fixed_at_the_utc_calendar(reactor, http, fake):
    """GoModel's GET|PUT /admin/api/v1/budgets/settings (issue 14: "GET|PUT|DELETE /admin/api/v1/budgets...,
    GoModel's shapes") give the anchors of its calendar periods. Ours are the UTC calendar, fixed: GET was a
    405 and PUT a 400 about a period named "settings". Now GET answers GoModel's anchors (daily at 00:00,
    weekly from Monday 00:00, monthly from the 1st) and PUT takes them as they are, and refuses another
    anchor naming it. A period named as GoModel names it (day, weeks, ...) is taken too."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        anchors = {"daily_reset_hour": 0, "daily_reset_minute": 0, "weekly_reset_weekday": 1, "weekly_reset_hour": 0,
                   "weekly_reset_minute": 0, "monthly_reset_day": 1, "monthly_reset_hour": 0, "monthly_reset_minute": 0}
        code, settings = await admin(http, gw, "GET", "/admin/api/v1/budgets/settings")
        assert code == 200 and {name: settings[name] for name in anchors} == anchors
        code, settings = await admin(http, gw, "PUT", "/admin/api/v1/budgets/settings", {"daily_reset_hour": 0})
        assert code == 200 and {name: settings[name] for name in anchors} == anchors
        code, error = await admin(http, gw, "PUT", "/admin/api/v1/budgets/settings", {"weekly_reset_weekday": 0})
        assert (code, error["error"]["param"]) == (400, "weekly_reset_weekday")
        code, budget = await admin(http, gw, "PUT", "/admin/api/v1/budgets/team/Day", {"amount": 1})
        assert (code, budget["period"]) == (200, "daily")
        code, budget = await admin(http, gw, "PUT", "/admin/api/v1/budgets", {"user_path": "/t", "period": "weeks",
                                                                             "amount": 1})
        assert (code, budget["period"]) == (200, "weekly")
    finally:
        await gw.service.stopService()


# A key budget's cost as stored before the admin API refused costs past a float: a 400-digit integer, or
# infinity, which the JSON encoder wrote as null (the budget then says neither tokens nor cost).
@pytest.mark.parametrize("stored", [10**400, None], ids=["400-digits", "infinity-written-as-null"])
@pytest_twisted.ensureDeferred
async def test_costs_past_a_float_stored_before_they_were_refused_cap_nothing(reactor, http, fake, stored):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        code, key = await admin(http, gw, "POST", "/admin/api/v1/auth-keys", {"name": "k", "user_path": "/team"})
        assert code == 201
        await gw.service.store.keys.update(key["id"], {"budgets": [{"period": "daily", "max_cost": stored}]})
        await gw.service.keys.refresh()
        await gw.service.store.budgets.put("/team", "daily", None, float("inf"))
        await gw.service.gate.refresh()  # (a logged error fails the test)
        code, got = await admin(http, gw, "GET", f"/admin/api/v1/auth-keys/{key['id']}")
        assert code == 200 and got["budgets"][0]["spent_cost"] == 0
        code, listed = await admin(http, gw, "GET", "/admin/api/v1/budgets")
        assert code == 200 and listed["data"][0]["amount"] == sys.float_info.max
        response = await http.post(gw.url + "/v1/chat/completions", data=CHAT,
                                   headers={"Authorization": f"Bearer {key['value']}"})
        assert response.code == 200
        await response.content()
    finally:
        await gw.service.stopService()


# -- the usage API's CSV and query parameters --------------------------------------------------

@pytest_twisted.async_yield_fixture()
async def ledger(reactor, fake):
    """A gateway on SQLite with its usage API; the test adds its records with L{record}."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    yield gw
    await gw.service.stopService()


async def record(gw, *rows):
    """Store usage records of now: each C{(request_id, {field: value})} over a plain chat's."""
    now = time.time()
    base = dict.fromkeys(USAGE_FIELDS)
    base.update(timestamp=now, provider="vllm", provider_name="vllm", replica=0, model=MODEL,
                endpoint="/v1/chat/completions", status_code=200, stream=False, input_tokens=3, output_tokens=2,
                total_tokens=5, client_gone=False, estimated=False)
    await gw.service.store.usage.add([tuple(dict(base, request_id=request_id, **values)[name]
                                            for name in USAGE_FIELDS) for request_id, values in rows])


async def get(http, gw, path):
    """C{(response, body)} of a GET with the master key."""
    response = await http.get(gw.url + path, headers=KEY)
    return response, await response.content()


def csv_rows(body):
    return list(csv.reader(io.StringIO(body.decode(), newline="")))


@pytest_twisted.ensureDeferred
async def test_the_usage_log_as_csv_pages_as_its_json_does(http, ledger):
    await record(ledger, *((f"r{i}", {}) for i in range(5)))
    _, body = await get(http, ledger, "/admin/api/v1/usage/log?limit=2")
    first = json.loads(body)
    seen, after = [], ""
    while True:
        response, body = await get(http, ledger, "/admin/api/v1/usage/log?format=csv&limit=2" + after)
        assert response.code == 200
        rows = list(csv.DictReader(io.StringIO(body.decode(), newline="")))
        assert 1 <= len(rows) <= 2
        seen += [row["request_id"] for row in rows]
        more = response.headers.getRawHeaders("x-has-more")
        following = response.headers.getRawHeaders("x-next")
        if not seen[2:]:  # the first page: the JSON page's cursor
            assert (more, following) == (["true"], [str(first["next"])])
        if more == ["false"]:
            assert following is None
            break
        assert more == ["true"]
        after = f"&after={following[0]}"
    assert seen == ["r4", "r3", "r2", "r1", "r0"]
    response, body = await get(http, ledger, "/admin/api/v1/usage/log?format=csv")  # (the default page: 100)
    assert len(csv_rows(body)) == 6 and response.headers.getRawHeaders("x-has-more") == ["false"]


@pytest_twisted.ensureDeferred
async def test_the_usage_log_pages_on_by_cursor_as_by_after(http, ledger):
    # The operate issue names the log's paging "limit and cursor": a client that sends cursor=<next> gets the next
    # page, never the first one again (an unknown parameter is passed over: before, the same page forever).
    await record(ledger, *((f"r{i}", {}) for i in range(5)))
    seen, cursor = [], ""
    for _ in range(5):
        _, body = await get(http, ledger, "/admin/api/v1/usage/log?limit=2" + cursor)
        page = json.loads(body)
        seen += [row["request_id"] for row in page["data"]]
        if not page["has_more"]:
            break
        cursor = f"&cursor={page['next']}"
    assert seen == ["r4", "r3", "r2", "r1", "r0"]
    _, body = await get(http, ledger, "/admin/api/v1/usage/log?limit=3")
    response, body = await get(http, ledger, f"/admin/api/v1/usage/log?format=csv&cursor={json.loads(body)['next']}")
    assert [row[1] for row in csv_rows(body)[1:]] == ["r1", "r0"]  # (the CSV too)
    for query in ("cursor=x", "cursor=-1", "cursor=2&after=2"):  # (one cursor, said twice: which?)
        response, body = await get(http, ledger, "/admin/api/v1/usage/log?" + query)
        assert response.code == 400 and json.loads(body)["error"]["param"] == "cursor", query


@pytest_twisted.ensureDeferred
async def test_csv_text_a_spreadsheet_would_run_is_quoted_and_numbers_stay_numbers(http, ledger):
    texts = ["=1+1", "+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "'quoted", "plain-1"]
    await record(ledger, *((text, {"model": text, "total_cost": -1.5}) for text in texts))
    _, body = await get(http, ledger, "/admin/api/v1/usage/log?format=csv")
    rows = list(csv.DictReader(io.StringIO(body.decode(), newline="")))
    quoted = ["'=1+1", "'+1", "'-2+3", "'@SUM(A1)", "'\tx", "'\rx", "'quoted", "plain-1"]
    assert [row["request_id"] for row in reversed(rows)] == quoted
    assert [row["model"] for row in reversed(rows)] == quoted
    assert {row["total_cost"] for row in rows} == {"-1.5"}
    _, body = await get(http, ledger, "/admin/api/v1/usage/models?format=csv")
    rows = list(csv.DictReader(io.StringIO(body.decode(), newline="")))
    assert sorted(row["model"] for row in rows) == sorted(quoted)
    assert {row["total_cost"] for row in rows} == {"-1.5"}


@pytest_twisted.ensureDeferred
async def test_csv_booleans_read_as_the_jsons(http, ledger):
    """The log's C{stream}, C{client_gone} and C{estimated} are C{true}/C{false} in CSV as in JSON (not Python's
    C{True}/C{False})."""
    await record(ledger, ("s", {"stream": True, "client_gone": True, "estimated": True}), ("p", {}))
    _, body = await get(http, ledger, "/admin/api/v1/usage/log?format=csv")
    rows = {row["request_id"]: row for row in csv.DictReader(io.StringIO(body.decode(), newline=""))}
    _, body = await get(http, ledger, "/admin/api/v1/usage/log")
    for record_ in json.loads(body)["data"]:
        for name in ("stream", "client_gone", "estimated"):
            assert rows[record_["request_id"]][name] == json.dumps(record_[name]), name
    assert rows["s"]["stream"] == "true" and rows["p"]["stream"] == "false"


@pytest_twisted.ensureDeferred
async def test_usage_daily_takes_gomodels_interval_daily(http, ledger):
    """GoModel's C{GET usage/daily} takes C{interval=daily} (its default, which its clients send): the same
    answer as C{interval=day} or none, not a 400 (issue 13: "Follow GoModel's routes and query names")."""
    await record(ledger, ("a", {}), ("b", {}))
    _, plain = await get(http, ledger, "/admin/api/v1/usage/daily")
    response, daily = await get(http, ledger, "/admin/api/v1/usage/daily?interval=daily")
    assert response.code == 200 and json.loads(daily) == json.loads(plain)
    assert json.loads(daily)["data"][0]["requests"] == 2


@pytest_twisted.ensureDeferred
async def test_the_usage_logs_user_path_is_read_as_a_keys_is(http, ledger):
    await record(ledger, *((path, {"user_path": path}) for path in ("/team", "/team/a", "/team-b")))
    for query, found in (("/team", ["/team/a", "/team"]), ("team/", ["/team/a", "/team"]),  # (team/: none before)
                         ("/team//a/", ["/team/a"]), ("/", ["/team-b", "/team/a", "/team"])):
        _, body = await get(http, ledger, f"/admin/api/v1/usage/log?user_path={query}")
        assert [r["request_id"] for r in json.loads(body)["data"]] == found, query
    response, body = await get(http, ledger, "/admin/api/v1/usage/log?user_path=/a/../b")  # (an empty page before)
    error = json.loads(body)["error"]
    assert (response.code, error["param"], error["code"]) == (400, "user_path", "invalid_value")


@pytest_twisted.ensureDeferred
async def test_an_empty_csv_grouping_has_the_columns_of_a_full_one(http, ledger):
    routes = ("daily", "daily?interval=hour", "models", "keys", "user-paths")
    empty = {}
    for route in routes:
        response, body = await get(http, ledger, f"/admin/api/v1/usage/{route}{'&' if '?' in route else '?'}format=csv")
        assert response.code == 200
        empty[route] = csv_rows(body)
    await record(ledger, ("r1", {"auth_key_id": "key_1", "user_path": "/team"}))
    for route in routes:
        _, body = await get(http, ledger, f"/admin/api/v1/usage/{route}{'&' if '?' in route else '?'}format=csv")
        header, row = csv_rows(body)
        assert empty[route] == [header], route
        assert "requests" in header and "total_cost" in header


@pytest_twisted.ensureDeferred
async def test_the_usage_summary_splits_its_errors_by_kind_in_json_and_csv(http, ledger):
    """C{usage/summary} (the Usage page's cards) says what its C{errors} were, as the time series does: the
    server's, the clients', the clients that left and the broken streams (before, one count of them all)."""
    await record(ledger, ("ok", {"outcome": "ok"}), ("bad", {"status_code": 400, "outcome": "error"}),
                 ("down", {"status_code": 502, "outcome": "error"}),
                 ("gone", {"status_code": 499, "client_gone": True, "outcome": "client_gone"}),
                 ("broken", {"outcome": "stream_broken", "stream": True}))
    split = {"errors": 4, "server_errors": 1, "client_errors": 1, "client_gone": 1, "stream_broken": 1}
    _, body = await get(http, ledger, "/admin/api/v1/usage/summary")
    summary = json.loads(body)
    assert summary["requests"] == 5 and {name: summary[name] for name in split} == split
    _, body = await get(http, ledger, "/admin/api/v1/usage/summary?format=csv")
    (row,) = csv.DictReader(io.StringIO(body.decode(), newline=""))
    assert {name: int(row[name]) for name in split} == split


@pytest_twisted.ensureDeferred
async def test_dates_before_the_year_1000_have_four_digit_years(http, ledger):
    _, body = await get(http, ledger, "/admin/api/v1/usage/summary?start_date=0999-01-01&end_date=0999-01-02")
    summary = json.loads(body)
    assert (summary["start"], summary["end"], summary["requests"]) == ("0999-01-01", "0999-01-02", 0)
    _, body = await get(http, ledger, "/admin/api/v1/usage/summary?start_date=0001-01-01&end_date=0001-01-01")
    assert json.loads(body)["start"] == "0001-01-01"


@pytest_twisted.ensureDeferred
async def test_usage_numbers_and_dates_are_ascii_digits(http, ledger):
    for query, param in (("summary?days=%EF%BC%93", "days"), ("summary?days=%D9%A3", "days"),
                         ("summary?days=%2B3", "days"), ("summary?days=3_0", "days"), ("summary?days=0", "days"),
                         ("summary?days=" + "9" * 5000, "days"), ("summary?days=36501", "days"),
                         ("summary?start_date=2025-01-1%EF%BC%90", "start_date"),
                         ("summary?end_date=2025-13-01", "end_date"), ("summary?start_date=2025-1-1", "start_date"),
                         ("summary?end_date=2025-01-01T00", "end_date"),
                         ("summary?end_date=0001-01-01&days=2", "days"),
                         ("summary?start_date=2025-02-01&end_date=2025-01-01", "start_date"),
                         ("log?limit=%EF%BC%93", "limit"), ("log?limit=" + "1" * 5000, "limit"),
                         ("log?status=%EF%BC%92%EF%BC%90%EF%BC%90", "status"), ("log?after=%EF%BC%91", "after"),
                         ("log?after=" + "1" * 5000, "after"), ("auth-keys?limit=%EF%BC%93", "limit")):
        response, body = await get(http, ledger, "/admin/api/v1/" + ("" if query.startswith("auth") else "usage/")
                                   + query)
        error = json.loads(body)["error"]
        assert (response.code, error["type"], error["param"]) == (400, "invalid_request_error", param), query
        assert error["code"] in ("invalid_value", "invalid_window"), query
    for query in ("summary?days=36500", "summary?days=003", "log?limit=0010", "log?after=00"):
        response, _ = await get(http, ledger, "/admin/api/v1/usage/" + query)
        assert response.code == 200, query


@pytest_twisted.ensureDeferred
async def test_a_query_parameter_given_twice_is_a_400_naming_it(http, ledger):
    """No admin route takes a list in its query: a repeated parameter was read as its first value, silently (a
    client's C{limit=7} lost); an unknown one is passed over, as GoModel's admin API does."""
    for path, param in (("usage/log?limit=5&limit=7", "limit"), ("usage/log?key=a&key=b", "key"),
                        ("usage/summary?days=3&days=3", "days"), ("usage/daily?interval=day&interval=", "interval"),
                        ("usage/models?format=csv&format=json", "format"), ("auth-keys?limit=5&limit=7", "limit"),
                        ("auth-keys?after=a&after=b", "after"), ("budgets?user_path=/a&user_path=/b", "user_path"),
                        ("usage/timeseries?window=hour&window=day", "window"), ("models?x=1&x=2", "x")):
        response, body = await get(http, ledger, "/admin/api/v1/" + path)
        error = json.loads(body)["error"]
        assert (response.code, error["type"], error["param"], error["code"]) == (
            400, "invalid_request_error", param, "invalid_value"), (path, error)
        assert f"'{param}'" in error["message"] and "once" in error["message"], error
    for path in ("usage/log?limit=5&unknown=1", "auth-keys?limit=5&whatever=x", "usage/summary?foo"):
        response, _ = await get(http, ledger, "/admin/api/v1/" + path)
        assert response.code == 200, path
    for path in ("usage/log?limit=-1", "usage/log?limit=x", "usage/log?offset=-1", "auth-keys?limit=-3",
                 "auth-keys?limit=0", "usage/log?limit=1.5"):
        response, body = await get(http, ledger, "/admin/api/v1/" + path)
        assert (response.code, json.loads(body)["error"]["param"]) == (400, path.rpartition("?")[2].split("=")[0])


@pytest_twisted.ensureDeferred
async def test_usage_query_errors_name_their_parameter_and_code(http, ledger):
    for query, param in (("daily?interval=fortnight", "interval"), ("log?model=%FF", "model"),
                         ("summary?days=%FF", "days"), ("log?format=xml", "format"), ("models?format=CSV", "format")):
        response, body = await get(http, ledger, "/admin/api/v1/usage/" + query)
        error = json.loads(body)["error"]
        assert (response.code, error["param"], error["code"]) == (400, param, "invalid_value"), (query, error)


@pytest_twisted.ensureDeferred
async def test_the_summary_and_the_timeseries_take_format_as_the_other_usage_views(http, ledger):
    """C{usage/summary} and C{usage/timeseries} answer C{format=csv} (the summary one row, the time series a row per
    bucket, the JSON's numbers) and a 400 naming C{format} for another (before, both answered JSON whatever it was)."""
    await record(ledger, ("r1", {"duration_ms": 40}), ("r2", {"status_code": 500, "duration_ms": 60}))
    _, body = await get(http, ledger, "/admin/api/v1/usage/summary?days=1")
    summary = json.loads(body)
    response, body = await get(http, ledger, "/admin/api/v1/usage/summary?days=1&format=csv")
    assert response.code == 200 and response.headers.getRawHeaders("content-type") == ["text/csv; charset=utf-8"]
    (row,) = csv.DictReader(io.StringIO(body.decode(), newline=""))
    assert list(row)[:2] == ["start", "end"] and list(row)[-1] == "audio_seconds"
    assert (row["start"], row["end"]) == (summary["start"], summary["end"])
    assert (row["requests"], row["errors"], row["input_tokens"]) == ("2", "1", "6")
    _, body = await get(http, ledger, "/admin/api/v1/usage/timeseries?window=day")
    series = json.loads(body)
    response, body = await get(http, ledger, "/admin/api/v1/usage/timeseries?window=day&format=csv")
    assert response.code == 200 and response.headers.getRawHeaders("content-type") == ["text/csv; charset=utf-8"]
    rows = list(csv.DictReader(io.StringIO(body.decode(), newline="")))
    assert [r["period"] for r in rows] == [p["period"] for p in series["data"]] and len(rows) == 24
    assert (rows[-1]["requests"], rows[-1]["errors"], rows[-1]["duration_ms_p95"]) == (
        "2", "1", str(series["data"][-1]["duration_ms_p95"]))
    assert list(rows[0]) == list(series["data"][0])
    for path in ("summary?format=xml", "summary?format=CSV", "timeseries?format=garbage",
                 "timeseries?window=month&format=json,csv", "summary?format=", "log?format=", "models?format=&days=7"):
        response, body = await get(http, ledger, "/admin/api/v1/usage/" + path)
        error = json.loads(body)["error"]
        assert (response.code, error["param"], error["code"]) == (400, "format", "invalid_value"), (path, error)


@pytest_twisted.ensureDeferred
async def test_usage_daily_folds_gomodels_weekly_monthly_and_yearly(http, ledger):
    """GoModel's C{interval=weekly|monthly|yearly} sum the days of each ISO week, month and year, labelled as
    GoModel labels them (C{2026-W01}, C{2026-01}, C{2026}) in C{period} and GoModel's C{date}."""
    day_ = 86400
    # Sunday 2026-01-04, Monday 2026-01-05 and Saturday 2026-01-31, Sunday 2026-02-01, and 2027-03-02
    stamps = {"sun": 1767484800, "mon": 1767484800 + day_, "jan31": 1769817600, "feb1": 1769817600 + day_,
              "next": 1803945600}
    await record(ledger, *((name, {"timestamp": at + 60}) for name, at in stamps.items()))
    query = "start_date=2026-01-01&end_date=2027-12-31"
    _, body = await get(http, ledger, f"/admin/api/v1/usage/daily?{query}&interval=weekly")
    rows = json.loads(body)["data"]
    assert [(r["period"], r["date"], r["requests"], r["total_tokens"]) for r in rows] == [
        ("2026-W01", "2026-W01", 1, 5), ("2026-W02", "2026-W02", 1, 5), ("2026-W05", "2026-W05", 2, 10),
        ("2027-W09", "2027-W09", 1, 5)]
    _, body = await get(http, ledger, f"/admin/api/v1/usage/daily?{query}&interval=monthly")
    assert [(r["period"], r["requests"]) for r in json.loads(body)["data"]] == [
        ("2026-01", 3), ("2026-02", 1), ("2027-03", 1)]
    _, body = await get(http, ledger, f"/admin/api/v1/usage/daily?{query}&interval=yearly&format=csv")
    assert [row[:2] for row in csv_rows(body)] == [["period", "requests"], ["2026", "4"], ["2027", "1"]]
    response, body = await get(http, ledger, "/admin/api/v1/usage/daily?interval=fortnightly")
    assert (response.code, json.loads(body)["error"]["param"]) == (400, "interval")


@pytest_twisted.ensureDeferred
async def test_usage_by_provider_sums_its_models(http, ledger):
    await record(ledger, ("a", {}), ("b", {"model": "vllm/other"}), ("c", {"provider_name": "gpu-b"}))
    _, body = await get(http, ledger, "/admin/api/v1/usage/providers")
    assert [(r["provider"], r["provider_name"], r["requests"]) for r in json.loads(body)["data"]] == [
        ("vllm", "gpu-b", 1), ("vllm", "vllm", 2)]
    _, body = await get(http, ledger, "/admin/api/v1/usage/providers?format=csv")
    assert csv_rows(body)[0][:3] == ["provider", "provider_name", "requests"]


@pytest_twisted.ensureDeferred
async def test_every_usage_view_takes_the_logs_filters(http, ledger):
    """The totals, days, groupings and time series of a window take the request log's filters (C{model},
    C{provider}, C{status}, C{search}, C{key}, C{user_path}), as GoModel's usage views take its C{model},
    C{provider} and C{user_path}: a filtered view is never the whole ledger's, and its rows add up to its
    summary."""
    await record(ledger, ("a-1", {"user_path": "/team/a", "auth_key_id": "key_1"}),
                 ("a-2", {"user_path": "/team/a/x", "auth_key_id": "key_1", "status_code": 500,
                          "input_tokens": None, "output_tokens": None, "total_tokens": None}),
                 ("b-1", {"user_path": "/team/b", "model": "vllm/other"}),
                 ("c-1", {"provider_name": "gpu-b"}))
    base = "/admin/api/v1/usage/"
    for query, requests, tokens, errors in (
            ("user_path=/team/a", 2, 5, 1), ("user_path=team", 3, 10, 1), ("model=vllm/other", 1, 5, 0),
            ("provider=gpu-b", 1, 5, 0), ("key=key_1", 2, 5, 1), ("key=master", 2, 10, 0),
            ("status=500", 1, 0, 1), ("search=-1", 3, 15, 0), ("user_path=/nobody", 0, 0, 0)):
        _, body = await get(http, ledger, f"{base}summary?{query}")
        summary = json.loads(body)
        assert (summary["requests"], summary["total_tokens"], summary["errors"]) == (requests, tokens, errors), query
        for route in ("daily", "daily?interval=hour", "models", "providers", "keys", "user-paths"):
            _, body = await get(http, ledger, f"{base}{route}{'&' if '?' in route else '?'}{query}")
            rows = json.loads(body)["data"]
            assert sum(r["requests"] for r in rows) == requests, (route, query)
            assert sum(r["total_tokens"] for r in rows) == tokens, (route, query)
        _, body = await get(http, ledger, f"{base}timeseries?window=day&{query}")
        assert json.loads(body)["summary"]["requests"] == requests, query
    _, body = await get(http, ledger, f"{base}user-paths?user_path=/team/a&format=csv")
    assert [row[0] for row in csv_rows(body)] == ["user_path", "/team/a", "/team/a/x"]
    response, body = await get(http, ledger, f"{base}models?status=42")
    assert (response.code, json.loads(body)["error"]["param"]) == (400, "status")


@pytest_twisted.ensureDeferred
async def test_resetting_every_budget_takes_gomodels_confirmation(reactor, http, fake):
    """GoModel's C{POST /budgets/reset} resets every budget only with C{{"confirmation": "reset"}} (or its
    C{confirm}; any case, spaces around): without it, or with another field, it is a 400 naming the field and
    nothing is reset (it read no body: C{{}}, a typo or no body at all reset everything)."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        code, _ = await admin(http, gw, "PUT", "/admin/api/v1/budgets", {"user_path": "/t", "period": "daily",
                                                                         "amount": 5})
        assert code == 200
        for body, param in ((None, "confirmation"), ({}, "confirmation"), ({"confirmation": "yes"}, "confirmation"),
                            ({"confirm": ""}, "confirmation"), ({"confirmation": 1}, "confirmation"),
                            ({"confirmation": "reset", "x": 1}, "x"), ("[]", None)):
            code, error = await admin(http, gw, "POST", "/admin/api/v1/budgets/reset", body)
            assert (code, error["error"]["type"], error["error"]["param"]) == (
                400, "invalid_request_error", param), body
        _, listed = await admin(http, gw, "GET", "/admin/api/v1/budgets")
        assert listed["data"][0]["last_reset_at"] is None
        for body in ({"confirmation": " Reset "}, {"confirm": "RESET"}):
            code, answer = await admin(http, gw, "POST", "/admin/api/v1/budgets/reset", body)
            assert (code, answer["status"], answer["reset"]) == (200, "ok", 1)
            assert answer["budgets"][0]["last_reset_at"] == answer["reset_at"]
    finally:
        await gw.service.stopService()


async def zoned(http, gw, path, zone):
    """The parsed answer (and status) of a GET with the master key and GoModel's C{X-GoModel-Timezone}."""
    response = await http.get(gw.url + path, headers=dict(KEY, **{"X-GoModel-Timezone": zone}))
    return response.code, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_usage_counts_the_days_of_gomodels_time_zone_header(http, ledger):
    """GoModel's C{X-GoModel-Timezone} (its dashboard sends the browser's) makes a window's dates, its days,
    weeks and hours those of that zone (a half-hour offset, a 25-hour day of daylight saving time); without it
    (or C{UTC}) they are UTC's, as before; a name that is no zone is a 400 naming the header."""
    at = 1767571200  # 2026-01-05T00:00:00Z: 05:30 in Kolkata
    await record(ledger, ("utc-4-local-4", {"timestamp": at - 6 * 3600}),  # 2026-01-04 23:30 in Kolkata
                 ("utc-4-local-5", {"timestamp": at - 5 * 3600 - 20 * 60}),  # 00:10 on the 5th in Kolkata
                 ("utc-5-local-5", {"timestamp": at + 10 * 3600}),
                 ("utc-5-local-5-last", {"timestamp": at + 18.5 * 3600 - 1}),  # 23:59:59 on the 5th in Kolkata
                 ("utc-5-local-6", {"timestamp": at + 18.5 * 3600}))  # 00:00 on the 6th in Kolkata
    days = "/admin/api/v1/usage/daily?start_date=2026-01-04&end_date=2026-01-06"
    _, utc = await zoned(http, ledger, days, " utc ")
    assert [(r["date"], r["requests"]) for r in utc["data"]] == [("2026-01-04", 2), ("2026-01-05", 3)]
    code, kolkata = await zoned(http, ledger, days, "Asia/Kolkata")
    assert (code, [(r["date"], r["requests"]) for r in kolkata["data"]]) == (
        200, [("2026-01-04", 1), ("2026-01-05", 3), ("2026-01-06", 1)])
    code, summary = await zoned(http, ledger, "/admin/api/v1/usage/summary?start_date=2026-01-05&end_date=2026-01-05",
                                "Asia/Kolkata")
    assert (code, summary["start"], summary["end"], summary["requests"]) == (200, "2026-01-05", "2026-01-05", 3)
    _, log = await zoned(http, ledger, "/admin/api/v1/usage/log?start_date=2026-01-06&end_date=2026-01-06",
                         "Asia/Kolkata")
    assert [r["request_id"] for r in log["data"]] == ["utc-5-local-6"]
    _, hours = await zoned(http, ledger, days + "&interval=hour", "Asia/Kolkata")
    assert [(r["period"], r["requests"]) for r in hours["data"]][:2] == [
        ("2026-01-04T23:00:00.000+05:30", 1), ("2026-01-05T00:00:00.000+05:30", 1)]
    _, weeks = await zoned(http, ledger, days + "&interval=weekly", "Asia/Kolkata")  # (Sunday the 4th: week 1)
    assert [(r["period"], r["requests"]) for r in weeks["data"]] == [("2026-W01", 1), ("2026-W02", 4)]

    # New York's 1 November 2026 is 25 hours long: 23:30 that night is 04:30 on the 2nd in UTC
    await record(ledger, ("ny-last-hour", {"timestamp": 1793593800}))
    _, summary = await zoned(http, ledger, "/admin/api/v1/usage/summary?start_date=2026-11-01&end_date=2026-11-01",
                             "America/New_York")
    assert (summary["end"], summary["requests"]) == ("2026-11-01", 1)
    _, summary = await zoned(http, ledger, "/admin/api/v1/usage/summary?start_date=0001-01-01&end_date=9999-12-31",
                             "Asia/Tokyo")
    assert (summary["start"], summary["end"], summary["requests"]) == ("0001-01-01", "9999-12-31", 6)

    for zone in ("Mars/Olympus", "America", "../etc/passwd", "/etc/localtime", "x" * 300):
        code, error = await zoned(http, ledger, "/admin/api/v1/usage/summary", zone)
        assert (code, error["error"]["param"], error["error"]["code"]) == (400, "X-GoModel-Timezone", "invalid_value")


def test_the_zone_names_browsers_send_resolve_without_the_systems_database(tmp_path):
    """Chromium names Kolkata Asia/Calcutta, Kyiv Europe/Kiev, Ho Chi Minh City Asia/Saigon: links that Debian 13's
    tzdata (the Docker image's python:3.11-slim) leaves to tzdata-legacy, so the dashboard's X-GoModel-Timezone was a
    400 there. The gateway installs the tzdata package: they resolve on a system without a database at all
    (PYTHONTZPATH empty), and a name that is none is still refused."""
    import subprocess

    code = (
        "from types import SimpleNamespace\n"
        "from gomodel.api.windows import time_zone\n"
        "from gomodel.errors import InvalidRequest\n"
        "ask = lambda name: time_zone(SimpleNamespace(getHeader=lambda _: name.encode()))\n"
        "for name in ('Asia/Calcutta', 'Europe/Kiev', 'Asia/Saigon', 'America/Buenos_Aires', 'Asia/Kolkata'):\n"
        "    print(name, ask(name).key)\n"
        "for name in ('Mars/Olympus', 'America'):\n"
        "    try:\n"
        "        ask(name)\n"
        "    except InvalidRequest:\n"
        "        print(name, 'refused')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONTZPATH="", PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["Asia/Calcutta Asia/Calcutta", "Europe/Kiev Europe/Kiev",
                                        "Asia/Saigon Asia/Saigon", "America/Buenos_Aires America/Buenos_Aires",
                                        "Asia/Kolkata Asia/Kolkata", "Mars/Olympus refused", "America refused"]


@pytest_twisted.ensureDeferred
async def test_the_usage_log_pages_by_gomodels_offset_too(http, ledger):
    """GoModel's clients page the log with C{offset} (and read C{entries} and C{total}): each page is the next
    records, not the first page again (C{offset} was ignored); with C{offset} the answer carries GoModel's
    C{entries}, C{total}, C{limit} and C{offset} beside ours. C{offset} counts from C{after} where both are given."""
    await record(ledger, *((f"r{i}", {"user_path": "/team"}) for i in range(5)), ("other", {}))
    seen, offset = [], 0
    while True:
        _, body = await get(http, ledger, f"/admin/api/v1/usage/log?user_path=/team&limit=2&offset={offset}")
        page = json.loads(body)
        assert (page["total"], page["limit"], page["offset"]) == (5, 2, offset)
        assert page["entries"] == page["data"]
        if not page["entries"]:
            break
        seen += [r["request_id"] for r in page["entries"]]
        offset += len(page["entries"])
    assert seen == ["r4", "r3", "r2", "r1", "r0"]
    _, body = await get(http, ledger, "/admin/api/v1/usage/log?limit=2&offset=3")
    page = json.loads(body)
    assert ([r["request_id"] for r in page["data"]], page["has_more"]) == (["r2", "r1"], True)
    _, body = await get(http, ledger, "/admin/api/v1/usage/log?limit=2")
    first = json.loads(body)
    assert [r["request_id"] for r in first["data"]] == ["other", "r4"]
    _, body = await get(http, ledger, f"/admin/api/v1/usage/log?limit=2&offset=1&after={first['next']}")
    assert [r["request_id"] for r in json.loads(body)["data"]] == ["r2", "r1"]
    _, body = await get(http, ledger, "/admin/api/v1/usage/log?limit=2")
    assert "entries" not in json.loads(body) and "total" not in json.loads(body)  # (our cursor: no count to make)
    _, body = await get(http, ledger, "/admin/api/v1/usage/log?offset=2&format=csv")
    assert [row[1] for row in csv_rows(body)[1:]] == ["r3", "r2", "r1", "r0"]
    for bad in ("-1", "x", "%EF%BC%91"):
        response, body = await get(http, ledger, f"/admin/api/v1/usage/log?offset={bad}")
        assert (response.code, json.loads(body)["error"]["param"]) == (400, "offset")


@pytest_twisted.ensureDeferred
async def test_usage_views_answer_gomodels_field_names_too(http, ledger):
    """GoModel's clients read a summary's C{total_requests}, C{total_input_tokens}, ... C{total_cost} and each
    model's, user path's and period's C{input_cost} and C{output_cost}: they are answered beside ours (the
    summary had only ours, the groupings no input or output cost)."""
    await record(ledger, ("a", {"input_cost": 0.25, "output_cost": 0.5, "total_cost": 0.75, "cached_tokens": 1,
                                "user_path": "/t"}),
                 ("b", {"input_cost": 0.125, "output_cost": 0.0, "total_cost": 0.125}), ("c", {}))
    _, body = await get(http, ledger, "/admin/api/v1/usage/summary")
    summary = json.loads(body)
    assert {name: summary[name] for name in (
        "total_requests", "total_input_tokens", "total_output_tokens", "total_tokens", "uncached_input_tokens",
        "cached_input_tokens", "total_input_cost", "total_output_cost", "total_cost")} == {
        "total_requests": 3, "total_input_tokens": 9, "total_output_tokens": 6, "total_tokens": 15,
        "uncached_input_tokens": 8, "cached_input_tokens": 1, "total_input_cost": 0.375, "total_output_cost": 0.5,
        "total_cost": 0.875}
    assert summary["requests"] == 3 and summary["input_cost"] == 0.375  # (ours, as before)
    for route in ("models", "user-paths", "daily", "daily?interval=monthly", "keys", "providers"):
        _, body = await get(http, ledger, f"/admin/api/v1/usage/{route}")
        rows = json.loads(body)["data"]
        assert (sum(r["input_cost"] or 0 for r in rows), sum(r["output_cost"] or 0 for r in rows)) == (0.375, 0.5)
    _, body = await get(http, ledger, "/admin/api/v1/usage/user-paths")
    assert [(r["user_path"], r["input_cost"], r["output_cost"]) for r in json.loads(body)["data"]] == [
        (None, 0.125, 0.0), ("/t", 0.25, 0.5)]
    _, body = await get(http, ledger, "/admin/api/v1/usage/models?format=csv")
    assert csv_rows(body)[0][-3:] == ["input_cost", "output_cost", "audio_seconds"]


@pytest_twisted.ensureDeferred
async def test_the_log_search_finds_models_and_providers_as_gomodels_does(http, ledger):
    """GoModel's C{search} looks in the model and the provider too, not the request id alone (in any case, its
    text as it is)."""
    await record(ledger, ("req-1", {"model": "gpu-b/Qwen3-8B", "provider_name": "gpu-b"}),
                 ("req-2", {"provider": "openai", "provider_name": "cloud"}), ("qwen-id", {}))
    for text, found in (("qwen", ["qwen-id", "req-1"]), ("GPU-B", ["req-1"]), ("openai", ["req-2"]),
                        ("CLOUD", ["req-2"]), ("req-", ["req-2", "req-1"]), ("%", []), ("Qwen3_8B", [])):
        _, body = await get(http, ledger, f"/admin/api/v1/usage/log?search={text.replace('%', '%25')}")
        assert [r["request_id"] for r in json.loads(body)["data"]] == found, text
    _, body = await get(http, ledger, "/admin/api/v1/usage/summary?search=qwen")
    assert json.loads(body)["requests"] == 2


@pytest_twisted.ensureDeferred
async def test_a_cross_site_page_cannot_write_through_an_open_gateway(reactor, http, fake):
    """An open gateway (no master key) takes any write from whoever reaches it; a web page another site served (a
    form, a no-cors fetch: no preflight for text/plain) reaches it through its visitor's browser, who may reach a
    gateway on localhost or the intranet. A write the browser marks as another site's (C{Sec-Fetch-Site}, or
    without it an C{Origin} that is not the gateway's) is a 403 C{cross_site_request} (before, it made a key, a
    budget on C{/} that stops everyone, reset every budget, or ran prompts and batches on the gateway's GPUs); the
    dashboard's own (same-origin), a tool's (no such headers) and reads pass."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    form = b'{"name":"evil="}'  # (a text/plain form: its field's name, "=", its value)
    try:
        for headers in ({"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
                        {"Sec-Fetch-Site": "same-site", "Origin": "https://evil.gw.example"},
                        {"Origin": "https://evil.example"}, {"Origin": "null"}):
            for path in ("/admin/api/v1/auth-keys", "/admin/api/v1/budgets/reset", "/admin/api/v1/runtime/refresh",
                         "/v1/chat/completions", "/v1/batches", "/v1/files", "/p/vllm/tokenize"):
                response = await http.post(gw.url + path, data=form, headers=dict(headers, **{
                    "Content-Type": "text/plain"}))
                answer = json.loads(await response.content())
                assert response.code == 403 and answer["error"]["code"] == "cross_site_request", (headers, answer)
        response = await http.get(gw.url + "/admin/api/v1/auth-keys", headers={"Sec-Fetch-Site": "cross-site"})
        assert response.code == 200 and json.loads(await response.content())["data"] == []
        origin = gw.url  # (http://127.0.0.1:port, its Host)
        for headers in ({"Sec-Fetch-Site": "same-origin", "Origin": origin}, {"Origin": origin}, {},
                        {"Sec-Fetch-Site": "none"}):
            response = await http.post(gw.url + "/admin/api/v1/auth-keys", json={"name": "ok"}, headers=headers)
            assert response.code == 201, (headers, await response.content())
            response = await http.post(gw.url + "/v1/chat/completions", data=CHAT, headers=headers)
            assert response.code == 200, (headers, await response.content())
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_timeseries_counts_each_kind_of_error_in_its_summary_and_buckets(http, ledger):
    """C{usage/timeseries} (the overview's) splits its C{errors} into C{client_errors} (400 to 499: a bad request, an
    upstream's 429), C{server_errors} (5xx, a 504), C{client_gone} (499: the client left) and C{stream_broken}, in
    its summary, its buckets (an empty one: zeros) and its CSV; the four add up to C{errors}."""
    await record(ledger, ("ok", {}), ("bad", {"status_code": 400, "outcome": "error"}),
                 ("limited", {"status_code": 429, "outcome": "error"}),
                 ("timeout", {"status_code": 504, "outcome": "error"}),
                 ("gone", {"status_code": 499, "client_gone": True, "outcome": "client_gone"}),
                 ("broken", {"stream": True, "outcome": "stream_broken"}))
    _, body = await get(http, ledger, "/admin/api/v1/usage/timeseries?window=hour")
    series = json.loads(body)
    kinds = ("requests", "errors", "client_errors", "server_errors", "client_gone", "stream_broken")
    assert {name: series["summary"][name] for name in kinds} == {
        "requests": 6, "errors": 5, "client_errors": 2, "server_errors": 1, "client_gone": 1, "stream_broken": 1}
    assert {name: series["data"][-1][name] for name in kinds} == {name: series["summary"][name] for name in kinds}
    assert {name: series["data"][0][name] for name in kinds} == dict.fromkeys(kinds, 0)
    _, body = await get(http, ledger, "/admin/api/v1/usage/timeseries?window=hour&format=csv")
    last = list(csv.DictReader(io.StringIO(body.decode(), newline="")))[-1]
    assert (last["errors"], last["client_errors"], last["server_errors"], last["client_gone"]) == ("5", "2", "1", "1")


@pytest_twisted.ensureDeferred
async def test_a_refresh_with_a_field_in_its_body_is_a_400_naming_it(reactor, http, fake):
    """C{POST runtime/refresh} re-reads every replica's models and takes no field: one (a provider to refresh alone,
    say) is a 400 naming it, nothing refreshed (before, it was ignored and every provider refreshed, as if it had
    been honoured); no body, or C{{}}, refreshes."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        for body, field in (({"provider": "vllm"}, "provider"), ({"models": ["x"], "all": True}, "all")):
            code, error = await admin(http, gw, "POST", "/admin/api/v1/runtime/refresh", body)
            assert code == 400 and error["error"]["param"] == field and field in error["error"]["message"], error
        code, error = await admin(http, gw, "POST", "/admin/api/v1/runtime/refresh", "[1]")
        assert code == 400 and error["error"]["code"] == "invalid_json"
        for body in (None, {}):
            code, answer = await admin(http, gw, "POST", "/admin/api/v1/runtime/refresh", body)
            assert (code, answer) == (200, {"status": "refreshing"})
    finally:
        await gw.service.stopService()
