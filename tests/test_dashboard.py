"""The admin dashboard (no browser): its page and assets, their headers, who may read what, and the
admin routes it draws from (usage/timeseries, key budgets with what they spent)."""

import json
import os
import re
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
import pytest_twisted
import treq

from gomodel.api.admin import _edges, _runs
from gomodel.dashboard import Dashboard
from gomodel.dashboard.assets import CSP, PAGES, STATIC
from gomodel.store.records import USAGE_FIELDS
from tests.support import start_gateway, within_one_day

MASTER = "master-k"
ADMIN = {"authorization": f"Bearer {MASTER}", "content-type": "application/json"}
MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"
EXPECTED_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
                "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


@pytest_twisted.async_yield_fixture()
async def gw(reactor, fake, tmp_path):
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                            "GOMODEL_DATA_DIR": str(tmp_path)})
    yield gateway
    await gateway.service.stopService()


async def get(http, url, headers=None):
    response = await http.get(url, headers=headers or {})
    return response, await treq.content(response)


async def call(http, gw, method, path, body=None, headers=ADMIN):
    data = json.dumps(body).encode() if body is not None else None
    response = await http.request(method, gw.url + path, data=data, headers=headers)
    return response.code, json.loads(await treq.content(response))


def header(response, name):
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


def secure(response):
    assert header(response, "content-security-policy") == EXPECTED_CSP
    assert header(response, "x-content-type-options") == "nosniff"
    assert header(response, "referrer-policy") == "no-referrer"


# -- the page and its assets -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_files_are_read_at_the_first_request_for_the_page_not_with_the_admin_api(http, gw):
    """The admin API's first request builds the routes and the dashboard, which reads its files (about 0.3 MiB)
    only when the page or an asset is first asked for."""
    code, _ = await call(http, gw, "GET", "/admin/api/v1/usage/summary")
    dashboard = gw.service.site.resource._routes.app._dashboard
    assert code == 200 and set(vars(dashboard)) == {"_directory", "_open_gateway"}  # (no file read yet)
    response, shell = await get(http, gw.url + "/admin/dashboard")
    assert response.code == 200 and f"?v={dashboard.version}" in shell.decode()
    response, asset = await get(http, gw.url + f"/admin/static/{dashboard.names[0]}?v={dashboard.version}")
    assert response.code == 200 and header(response, "cache-control") == "public, max-age=31536000, immutable"


@pytest_twisted.ensureDeferred
async def test_shell_and_assets_need_no_key_carry_the_csp_and_are_cache_busted(http, gw):
    assert CSP.decode() == EXPECTED_CSP
    version = Dashboard().version
    response, shell = await get(http, gw.url + "/admin/dashboard")  # no key
    assert response.code == 200
    secure(response)
    assert header(response, "content-type") == "text/html; charset=utf-8"
    assert header(response, "cache-control") == "no-cache"
    text = shell.decode()
    # the page holds no data: no inline script or style, nothing from elsewhere
    assert not re.search(r"<script(?![^>]*\bsrc=)", text) and " style=" not in text and "<style" not in text
    assert not re.search(r"\son[a-z]+=", text) and "http://" not in text and "https://" not in text
    assert MODEL not in text and fake_name(gw) not in text
    assert '<html lang="en" data-open-gateway="false">' in text  # (a master key is set)
    referenced = re.findall(r'"/admin/static/([^"?]+)\?v=([0-9a-f]+)"', text)
    assert {name for name, _ in referenced} >= {"app.js", "app.css", "vendor/chart.umd.min.js", "favicon.svg"}
    assert {v for _, v in referenced} == {version}
    assert (await get(http, gw.url + "/admin/dashboard/"))[0].code == 200

    # Every module the page loads, following the rewritten imports: each names the same version.
    seen, todo = {}, ["app.js"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        response, body = await get(http, f"{gw.url}/admin/static/{name}?v={version}")
        assert response.code == 200, name
        secure(response)
        assert header(response, "cache-control") == "public, max-age=31536000, immutable"
        assert header(response, "content-type") == "text/javascript; charset=utf-8"
        seen[name] = body.decode()
        for target, v in re.findall(r'from "(\.{1,2}/[^"?]+)\?v=([0-9a-f]+)"', seen[name]):
            assert v == version
            todo.append(os.path.normpath(os.path.join(os.path.dirname(name), target)))
        assert not re.search(r'from "\.{1,2}/[^"?]+\.js"', seen[name]), f"{name}: an import without ?v="
    assert {"app.js", "api.js", "dom.js", "charts.js", "pages/overview.js", "pages/keys.js"} <= set(seen)

    response, css = await get(http, f"{gw.url}/admin/static/app.css?v={version}")
    assert header(response, "content-type") == "text/css; charset=utf-8" and b".cards" in css
    response, chart = await get(http, f"{gw.url}/admin/static/vendor/chart.umd.min.js?v={version}")
    assert response.code == 200 and b"Chart.js v4." in chart[:200]
    # another version (an old page) is not cached for long
    response, _ = await get(http, f"{gw.url}/admin/static/app.js?v=0000")
    assert response.code == 200 and header(response, "cache-control") == "no-cache"
    response, body = await get(http, gw.url + "/admin/static/nope.js")
    assert response.code == 404 and json.loads(body)["error"]["code"] == "not_found"


@pytest_twisted.ensureDeferred
async def test_each_page_is_served_at_gomodels_dashboard_path_and_an_unknown_one_is_a_404(http, gw):
    """GoModel's dashboard serves its pages at C{/admin/dashboard/<page>} (users bookmark them): the shell is
    served there too, with no key, for each page the app has (before, a 404); another name is a 404 (with the
    key; without one, a 401 as every closed path)."""
    _, shell = await get(http, gw.url + "/admin/dashboard")
    for page in PAGES:
        response, body = await get(http, f"{gw.url}/admin/dashboard/{page}")  # no key
        assert (response.code, body) == (200, shell), page
        secure(response)
        assert header(response, "cache-control") == "no-cache"
    for path in ("/admin/dashboard/nope", "/admin/dashboard/usage/x", "/admin/dashboard/Usage"):
        response, body = await get(http, gw.url + path, ADMIN)
        assert response.code == 404 and json.loads(body)["error"]["code"] == "not_found", path
        assert (await get(http, gw.url + path))[0].code == 401, path


def test_the_pages_served_are_the_apps():
    with open(os.path.join(STATIC, "app.js"), encoding="utf-8") as f:
        names = re.search(r"const PAGES = \{([^}]*)\}", f.read()).group(1)
    assert tuple(name.strip() for name in names.split(",")) == PAGES


def fake_name(gw):
    return gw.service.config.upstreams.providers[0].base_url


@pytest_twisted.ensureDeferred
async def test_a_pages_path_with_a_trailing_slash_redirects_to_the_page(http, gw):
    """C{/admin/dashboard/<page>/} (a bookmark, a typed URL) is a 308 to C{/admin/dashboard/<page>}, its query kept,
    with no key: the page's path is the app's (it opens the page its path names); another name with a slash is a
    404 (with the key; without one, a 401 as every closed path)."""
    _, shell = await get(http, gw.url + "/admin/dashboard")
    for page in PAGES:
        for query in ("", "?from=bookmark"):
            response = await http.get(f"{gw.url}/admin/dashboard/{page}/{query}", allow_redirects=False)  # no key
            await treq.content(response)
            assert response.code == 308, page
            assert header(response, "location") == f"/admin/dashboard/{page}{query}"
            secure(response)
        response, body = await get(http, f"{gw.url}/admin/dashboard/{page}/")  # (followed: the page)
        assert (response.code, body) == (200, shell)
    response, body = await get(http, gw.url + "/admin/dashboard/nope/", ADMIN)
    assert response.code == 404 and json.loads(body)["error"]["code"] == "not_found"
    assert (await get(http, gw.url + "/admin/dashboard/nope/"))[0].code == 401


@pytest.mark.parametrize("path", ["/admin/static/../api/v1/auth-keys", "/admin/static/%2e%2e/api/v1/auth-keys",
                                  "/admin/static//api/v1/auth-keys", "/admin/static/.hidden",
                                  "/admin/dashboardx", "/admin/api/v1/providers/status"])
@pytest_twisted.ensureDeferred
async def test_only_the_page_and_plain_asset_names_are_open(http, gw, path):
    response, body = await get(http, gw.url + path)
    assert response.code == 401, (path, body)


@pytest_twisted.ensureDeferred
async def test_data_routes_need_the_master_key_a_managed_key_gets_403(http, gw):
    code, key = await call(http, gw, "POST", "/admin/api/v1/auth-keys", {"name": "team"})
    assert code == 201
    for path in ("/admin/api/v1/usage/timeseries", "/admin/api/v1/providers/status", "/admin/api/v1/auth-keys"):
        assert (await call(http, gw, "GET", path, headers={}))[0] == 401
        code, error = await call(http, gw, "GET", path, headers={"authorization": f"Bearer {key['value']}"})
        assert (code, error["error"]["code"]) == (403, "master_key_required")
        assert (await call(http, gw, "GET", path))[0] == 200
    # the page itself is the same whoever asks
    response, _ = await get(http, gw.url + "/admin/dashboard", {"authorization": f"Bearer {key['value']}"})
    assert response.code == 200


@pytest.mark.parametrize("env", [{"ADMIN_UI_ENABLED": "false"}, {"ADMIN_ENDPOINTS_ENABLED": "false"}])
@pytest_twisted.ensureDeferred
async def test_the_dashboard_can_be_turned_off(reactor, http, fake, tmp_path, env):
    gw = await start_gateway(reactor, dict(env, VLLM_BASE_URL=fake.base_url, GOMODEL_MASTER_KEY=MASTER,
                                           GOMODEL_DATA_DIR=str(tmp_path)))
    try:
        for path in ("/admin/dashboard", "/admin/static/app.js"):
            response, _ = await get(http, gw.url + path)
            assert response.code == 401  # no longer open
            response, body = await get(http, gw.url + path, ADMIN)
            assert response.code == 404, body
            [variable] = env  # the setting that turned it off is named (before: ADMIN_UI_ENABLED, whichever it was)
            assert f"{variable}=false" in json.loads(body)["error"]["message"]
            assert header(response, "content-security-policy") is None
        status = (await get(http, gw.url + "/admin/api/v1/providers/status", ADMIN))[0].code
        assert status == (200 if "ADMIN_UI_ENABLED" in env else 404)
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_with_usage_off_the_usage_routes_say_so(reactor, http, fake, tmp_path):
    """With C{USAGE_ENABLED=false} the usage routes are a 404 C{usage_disabled}, which the overview shows (before,
    they read an empty ledger: the overview said the charts fill in once requests come, and they never did)."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                       "GOMODEL_DATA_DIR": str(tmp_path), "USAGE_ENABLED": "false"})
    try:
        for path in ("usage/timeseries", "usage/summary", "usage/models", "usage/log"):
            code, body = await call(http, gw, "GET", "/admin/api/v1/" + path)
            assert code == 404 and body["error"]["code"] == "usage_disabled", (path, body)
            assert "USAGE_ENABLED=false" in body["error"]["message"]
        assert (await call(http, gw, "GET", "/admin/api/v1/providers/status"))[0] == 200
    finally:
        await gw.service.stopService()


def test_the_scripts_never_write_html_or_use_local_storage():
    """Every name reaches the page through textContent; the key lives in sessionStorage only."""
    for root, _, names in os.walk(STATIC):
        for name in names:
            if not name.endswith(".js") or "vendor" in root:
                continue
            with open(os.path.join(root, name), encoding="utf-8") as f:
                source = f.read()
            for banned in (".innerHTML", ".outerHTML", ".insertAdjacentHTML", "document.write", "eval(",
                           "new Function", "localStorage", "setAttribute(\"style\"", "console.log"):
                assert banned not in source, f"{name} uses {banned}"
    with open(os.path.join(STATIC, "vendor", "chart.js.LICENSE.txt"), encoding="utf-8") as f:
        assert "MIT License" in f.read()


# -- the admin routes it reads ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_usage_timeseries_buckets_the_windows_with_percentiles(http, gw):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    for body in (chat, chat, dict(chat, stream=True), dict(chat, fake_status=500, fake_body="{}")):
        response = await http.post(gw.url + "/v1/chat/completions", data=json.dumps(body).encode(), headers=ADMIN)
        await treq.content(response)
    await gw.service.usage.flush()

    code, hour = await call(http, gw, "GET", "/admin/api/v1/usage/timeseries?window=hour")
    assert code == 200
    assert (hour["object"], hour["window"], hour["bucket_seconds"], len(hour["data"])) == (
        "usage.timeseries", "hour", 60, 60)
    summary = hour["summary"]
    assert summary["requests"] == 4 and summary["errors"] == 1
    assert summary["input_tokens"] > 0 and summary["output_tokens"] > 0
    assert 0 < summary["duration_ms_p50"] <= summary["duration_ms_p95"]
    assert 0 < summary["ttft_ms_p50"] <= summary["ttft_ms_p95"]
    assert sum(b["requests"] for b in hour["data"]) == 4  # the requests may straddle a minute
    assert hour["data"][-1]["period"] < hour["end"] and hour["data"][0]["period"] == hour["start"]
    empty = hour["data"][0]
    assert (empty["requests"], empty["duration_ms_p50"]) == (0, None)
    periods = [b["period"] for b in hour["data"]]
    assert periods == sorted(periods) and len(set(periods)) == 60

    for window, bucket, count in (("day", 3600, 24), ("month", 86400, 30)):
        code, answer = await call(http, gw, "GET", f"/admin/api/v1/usage/timeseries?window={window}")
        assert (code, answer["bucket_seconds"], len(answer["data"])) == (200, bucket, count)
        # (in the current bucket, or, had an hour or a UTC day begun since they were made, in the one before)
        assert answer["summary"]["requests"] == 4 and sum(b["requests"] for b in answer["data"][-2:]) == 4
    code, error = await call(http, gw, "GET", "/admin/api/v1/usage/timeseries?window=year")
    assert (code, error["error"]["code"]) == (400, "invalid_window")


async def planted(gw, *rows):
    """Store usage records C{(request_id, timestamp, input_tokens)} of a plain chat."""
    base = dict.fromkeys(USAGE_FIELDS)
    base.update(provider="vllm", provider_name="vllm", replica=0, model=MODEL, endpoint="/v1/chat/completions",
                status_code=200, stream=False, output_tokens=1, client_gone=False, estimated=False, outcome="ok")
    await gw.service.store.usage.add([tuple(dict(base, request_id=request_id, timestamp=at, input_tokens=tokens,
                                                 total_tokens=tokens + 1)[name] for name in USAGE_FIELDS)
                                      for request_id, at, tokens in rows])


@pytest_twisted.ensureDeferred
async def test_usage_timeseries_counts_the_hours_and_days_of_gomodels_time_zone(reactor, http, fake):
    """With C{X-GoModel-Timezone} (the dashboard sends the browser's) the day window's hours and the month
    window's days are that zone's, written with its offset: in Kolkata (+05:30) a day starts at 18:30 UTC and an
    hour at half past (before, the buckets were UTC's whatever the zone, and the dashboard labelled them with
    dates and hours they did not hold)."""
    kolkata = ZoneInfo("Asia/Kolkata")

    async def attempt():  # (a gateway of its own: one that met Kolkata's midnight holds the day before's records)
        gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": MASTER})
        try:
            await _kolkata_days(http, gw, kolkata)
        finally:
            await gw.service.stopService()

    await within_one_day(kolkata, attempt)


async def _kolkata_days(http, gw, kolkata):
    # A record at the very start of Kolkata's today (never in the future: the test need not wait for the day's
    # first minute to pass) and one a minute before it.
    midnight = datetime.combine(datetime.now(kolkata).date(), datetime.min.time(), kolkata)
    start = midnight.timestamp()
    await planted(gw, ("yesterday-in-kolkata", start - 60, 1000), ("today-in-kolkata", start, 20000))
    kolkata_headers = dict(ADMIN, **{"x-gomodel-timezone": "Asia/Kolkata"})

    code, month = await call(http, gw, "GET", "/admin/api/v1/usage/timeseries?window=month", headers=kolkata_headers)
    assert code == 200 and len(month["data"]) == 30
    today = month["data"][-1]
    assert today["period"] == midnight.strftime("%Y-%m-%dT00:00:00.000+05:30") and today["input_tokens"] == 20000
    assert month["data"][-2]["input_tokens"] == 1000
    assert all(b["period"].endswith("T00:00:00.000+05:30") for b in month["data"])
    assert month["end"] == (midnight + timedelta(days=1)).strftime("%Y-%m-%dT00:00:00.000+05:30")
    code, utc = await call(http, gw, "GET", "/admin/api/v1/usage/timeseries?window=month")
    assert all(b["period"].endswith("T00:00:00.000Z") for b in utc["data"])
    # (18:30 UTC, the Kolkata day's start, is inside a UTC day: both records are counted in that one)
    assert 21000 in [b["input_tokens"] for b in utc["data"][-2:]]

    asked = datetime.now(kolkata).strftime("%Y-%m-%dT%H")
    code, day = await call(http, gw, "GET", "/admin/api/v1/usage/timeseries?window=day", headers=kolkata_headers)
    assert code == 200 and len(day["data"]) == 24
    assert all(b["period"].endswith(":00:00.000+05:30") for b in day["data"])
    # (the hour it was asked in: the one it began in, or the next, had an hour ended meanwhile)
    assert day["data"][-1]["period"][:13] in (asked, datetime.now(kolkata).strftime("%Y-%m-%dT%H"))
    code, hour = await call(http, gw, "GET", "/admin/api/v1/usage/timeseries?window=hour", headers=kolkata_headers)
    assert code == 200 and len(hour["data"]) == 60 and hour["end"].endswith(":00.000+05:30")
    code, error = await call(http, gw, "GET", "/admin/api/v1/usage/timeseries", headers=dict(
        ADMIN, **{"x-gomodel-timezone": "Mars/Olympus"}))
    assert (code, error["error"]["param"]) == (400, "X-GoModel-Timezone")


def test_a_timeseries_day_that_daylight_saving_time_made_25_hours_long_is_one_bucket():
    """New York's 1 November 2026 is 25 hours long: the month window's buckets are its days, that one of 25 hours
    (queried apart: the store's buckets of a query are of one length)."""
    new_york = ZoneInfo("America/New_York")
    now = datetime(2026, 11, 3, 12, tzinfo=new_york).timestamp()
    edges = _edges(now, 86400.0, 30, new_york)
    assert [datetime.fromtimestamp(t, new_york).strftime("%m-%d %H:%M") for t in edges[-4:]] == [
        "11-01 00:00", "11-02 00:00", "11-03 00:00", "11-04 00:00"]
    assert [length for _, _, length in _runs(edges)] == [86400.0, 90000.0, 86400.0]
    assert _runs(edges)[0][0] == edges[0] and _runs(edges)[-1][1] == edges[-1]
    assert [length for _, _, length in _runs(_edges(now, 86400.0, 30, timezone.utc))] == [86400.0]
    # the day window's hours keep the zone's whole hours, in Kathmandu (+05:45) too
    kathmandu = ZoneInfo("Asia/Kathmandu")
    assert {datetime.fromtimestamp(t, kathmandu).minute for t in _edges(now, 3600.0, 24, kathmandu)} == {0}


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_key_budgets_show_what_they_spent_this_period(http, gw):
    code, key = await call(http, gw, "POST", "/admin/api/v1/auth-keys", {"name": "<img src=x onerror=alert(1)>",
                           "budgets": [{"period": "daily", "max_tokens": 100000}, {"period": "total", "max_cost": 5}]})
    assert code == 201 and key["name"] == "<img src=x onerror=alert(1)>"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    response = await http.post(gw.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                               headers={"authorization": f"Bearer {key['value']}"})
    used = json.loads(await treq.content(response))["usage"]["total_tokens"]

    code, view = await call(http, gw, "GET", f"/admin/api/v1/auth-keys/{key['id']}")
    daily, total = view["budgets"]
    assert (daily["period"], daily["max_tokens"], daily["spent_tokens"]) == ("daily", 100000, used)
    assert daily["period_start"].endswith("T00:00:00Z") and daily["period_end"].endswith("T00:00:00Z")
    assert (total["max_cost"], total["spent_cost"], total["period_end"]) == (5, 0.0, None)  # no prices: no cost
    code, listed = await call(http, gw, "GET", "/admin/api/v1/auth-keys")
    (same,) = [k for k in listed["data"] if k["id"] == key["id"]]
    assert same["budgets"] == view["budgets"]
    code, edited = await call(http, gw, "PATCH", f"/admin/api/v1/auth-keys/{key['id']}",
                              {"budgets": [{"period": "daily", "max_tokens": 50}]})
    assert edited["budgets"] == [dict(daily, max_tokens=50)]


def test_setup_ships_every_asset_folder_as_package_data():
    """setup.py's package_data names every folder under static/ (pip install . ships the page whole)."""
    with open(os.path.join(os.path.dirname(STATIC), "..", "..", "setup.py"), encoding="utf-8") as f:
        setup = f.read()
    for root, _, names in os.walk(STATIC):
        if names:
            folder = os.path.relpath(root, os.path.dirname(STATIC)).replace(os.sep, "/")
            assert f'"{folder}/*"' in setup, f"setup.py package_data lacks {folder}/*"
