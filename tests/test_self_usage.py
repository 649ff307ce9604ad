"""GET /v1/usage: a caller's own usage, budgets and rate limits, through the gateway with the openai SDK."""

from datetime import datetime, timedelta, timezone

import httpx2 as httpx  # (what this openai SDK is built on: httpx, renamed)
import openai
import pytest
import pytest_twisted

from tests.support import in_thread, start_gateway, within_one_day
from tests.test_quotas import MASTER, admin, new_key, raw_chat, redis_pair, start  # noqa: F401 (a fixture)


def usage_client(gw, key, **headers):
    """The openai SDK at the gateway's root (as GoModel's docs use it: C{client.get("/v1/usage")})."""
    return openai.OpenAI(base_url=gw.url, api_key=key, max_retries=0, timeout=10, default_headers=headers or None)


def status(client, query=""):
    """C{GET /v1/usage} (plus C{query}): the raw httpx response, an error's too."""
    try:
        return client.get("/v1/usage" + query, cast_to=httpx.Response)
    except openai.APIStatusError as e:
        return e.response


async def chat(gw, key, **extra):
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=10)
    try:
        return await in_thread(raw_chat, client, **extra)
    finally:
        client.close()


async def read(client, query=""):
    response = await in_thread(status, client, query)
    assert response.status_code == 200, response.text
    return response.json()


@pytest_twisted.async_yield_fixture()
async def gw(reactor, fake, tmp_path):
    gateway = await start(reactor, fake, tmp_path, SET_RATE_LIMIT_TEAM="rph=100")  # (refilled one request in 36 s)
    yield gateway
    await gateway.service.stopService()


async def on_one_utc_day(reactor, fake, tmp_path, test):
    """C{test(gw)} on a gateway as L{gw}'s, of its own: again, on a new one, when UTC's day ended under it (its
    daily budgets and its windows were the day before's then)."""
    attempts = iter(("first", "again"))

    async def attempt():
        data = tmp_path / next(attempts)
        data.mkdir()
        gateway = await start(reactor, fake, data, SET_RATE_LIMIT_TEAM="rph=100")
        try:
            await test(gateway)
        finally:
            await gateway.service.stopService()

    await within_one_day(timezone.utc, attempt)


def by_scope(entries, scope, **match):
    found = [e for e in entries if e["scope"] == scope and all(e[k] == v for k, v in match.items())]
    assert len(found) == 1, entries
    return found[0]


@pytest_twisted.ensureDeferred
async def test_a_managed_key_sees_its_subtree_its_budgets_and_its_limits(reactor, http, fake, tmp_path):
    await on_one_utc_day(reactor, fake, tmp_path, lambda gw: _subtree_budgets_and_limits(http, gw))


async def _subtree_budgets_and_limits(http, gw):
    code, _ = await admin(http, gw, "PUT", "/admin/api/v1/budgets",
                          {"user_path": "/team", "period": "daily", "max_tokens": 1000})
    assert code == 200
    alpha = await new_key(http, gw, user_path="/team/alpha", rpm=5, max_concurrency=2,
                          budgets=[{"period": "daily", "max_tokens": 40}])
    below = await new_key(http, gw, user_path="/team/alpha/ci")
    beta = await new_key(http, gw, user_path="/team/beta")
    for key, extra in ((alpha, {}), (alpha, {}), (below, {"extra_body": {"fake_cached": 8}}), (beta, {})):
        assert (await chat(gw, key["value"], **extra)).http_response.status_code == 200
    await gw.service.usage.flush()

    client = usage_client(gw, alpha["value"])
    try:
        body = await read(client)
        again = await read(client)  # polling takes nothing from the key's rpm
    finally:
        client.close()
    assert body["user_path"] == "/team/alpha"
    assert body["server_time"].endswith("Z")
    today = datetime.now(timezone.utc).date()
    # Its subtree's requests (its own and /team/alpha/ci's), not /team/beta's.
    assert body["usage"] == {
        "start_date": (today - timedelta(days=29)).isoformat(), "end_date": today.isoformat(),
        "total_requests": 3, "refused_requests": 0, "total_input_tokens": 54, "total_output_tokens": 9,
        "total_tokens": 63, "uncached_input_tokens": 46, "cached_input_tokens": 8, "cache_write_input_tokens": 0,
        "total_input_cost": None, "total_output_cost": None, "total_cost": None,
        "rewrite_tokens_saved": 0, "rewrite_cost_saved": None}
    own = by_scope(body["budgets"], f"key:{alpha['id']}")
    assert (own["user_path"], own["period_label"], own["period_seconds"], own["unit"]) == (
        "/team/alpha", "daily", 86400, "tokens")
    assert (own["amount"], own["spent"], own["remaining"], own["exceeded"]) == (40, 42, -2, True)
    assert own["usage_ratio"] == pytest.approx(1.05)
    assert own["period_start"] == f"{today.isoformat()}T00:00:00Z"
    assert own["period_end"] == f"{(today + timedelta(days=1)).isoformat()}T00:00:00Z"
    assert 0 < own["resets_in_seconds"] <= 86400
    team = by_scope(body["budgets"], "path:/team")
    assert (team["user_path"], team["spent"], team["remaining"], team["exceeded"]) == ("/team", 84, 916, False)
    assert len(body["budgets"]) == 2

    rpm = by_scope(body["rate_limits"], f"key:{alpha['id']}", period_label="minute")
    assert (rpm["period_seconds"], rpm["max_requests"], rpm["requests_used"], rpm["requests_remaining"]) == (
        60, 5, 2, 3)
    assert rpm["requests_usage_ratio"] == pytest.approx(0.4) and rpm["exhausted"] is False
    assert 0 < rpm["resets_in_seconds"] <= 24 and "max_tokens" not in rpm
    assert rpm["window_end"].endswith("Z") and rpm["window_start"] < rpm["window_end"]
    slots = by_scope(body["rate_limits"], f"key:{alpha['id']}", period_label="concurrent")
    assert (slots["max_requests"], slots["in_flight"], slots["requests_remaining"], slots["exhausted"]) == (
        2, 0, 2, False)
    shared = by_scope(body["rate_limits"], "path:/team")  # the whole subtree's requests together
    assert (shared["user_path"], shared["period_label"], shared["requests_used"], shared["requests_remaining"]) == (
        "/team", "hour", 4, 96)
    assert len(body["rate_limits"]) == 3
    assert by_scope(again["rate_limits"], f"key:{alpha['id']}", period_label="minute")["requests_used"] == 2
    assert by_scope(again["rate_limits"], "path:/team")["requests_used"] == 4


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_the_master_key_sees_everything_or_the_path_it_names(http, gw):
    code, _ = await admin(http, gw, "PUT", "/admin/api/v1/budgets",
                          {"user_path": "/team", "period": "monthly", "max_tokens": 500})
    assert code == 200
    alpha = await new_key(http, gw, user_path="/team/alpha", budgets=[{"period": "daily", "max_tokens": 40}])
    other = await new_key(http, gw, user_path="/other")
    for key in (alpha["value"], other["value"], MASTER):
        assert (await chat(gw, key)).http_response.status_code == 200
    # (not flushed: the records the ledger holds still count, as soon as their requests are over)

    everything = usage_client(gw, MASTER)
    named = usage_client(gw, MASTER, **{"X-GoModel-User-Path": "team/alpha/"})
    try:
        body = await read(everything)
        assert (body["user_path"], body["usage"]["total_requests"]) == ("/", 3)
        assert body["budgets"] == [] and body["rate_limits"] == []  # nothing is set on / itself
        body = await read(named)
        assert (body["user_path"], body["usage"]["total_requests"], body["usage"]["total_tokens"]) == (
            "/team/alpha", 1, 21)
        # The path's budgets and limits (and its ancestors'); never a key's own.
        assert [(b["scope"], b["period_label"], b["spent"]) for b in body["budgets"]] == [
            ("path:/team", "monthly", 21)]
        assert body["budgets"][0]["period_seconds"] == 2592000
        assert [(r["scope"], r["requests_used"]) for r in body["rate_limits"]] == [("path:/team", 1)]
        bad = await in_thread(status, usage_client(gw, MASTER, **{"X-GoModel-User-Path": "/team/../x"}))
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "X-GoModel-User-Path"
    finally:
        everything.close()
        named.close()


@pytest_twisted.ensureDeferred
async def test_a_key_without_a_user_path_sees_its_own_requests_alone(http, gw):
    solo = await new_key(http, gw, tpm=120)  # (refilled two tokens a second)
    other = await new_key(http, gw)
    for key in (solo["value"], other["value"], MASTER):
        assert (await chat(gw, key)).http_response.status_code == 200
    await gw.service.usage.flush()
    assert (await chat(gw, solo["value"])).http_response.status_code == 200  # (held by the ledger still)
    client = usage_client(gw, solo["value"], **{"X-GoModel-User-Path": "/"})  # (no way out of its scope)
    try:
        body = await read(client)
    finally:
        client.close()
    assert body["user_path"] is None
    assert (body["usage"]["total_requests"], body["usage"]["total_tokens"]) == (2, 42)
    (tpm,) = body["rate_limits"]
    assert (tpm["scope"], tpm["user_path"], tpm["max_tokens"]) == (f"key:{solo['id']}", None, 120)
    assert 36 <= tpm["tokens_used"] <= 42  # settled with what it used (reserved: its estimate), refilling
    assert tpm["tokens_remaining"] == 120 - tpm["tokens_used"] and "max_requests" not in tpm


@pytest_twisted.ensureDeferred
async def test_the_requests_the_gateway_refused_are_refused_requests_not_total_requests(http, gw):
    """A key's C{total_requests} counts the requests it was served (GoModel's: it kept no record of a refusal) and
    C{refused_requests} those the gateway refused itself with a 429 (its C{rpm} here), written or held by the ledger
    still (before, C{total_requests} counted both: a key refused all day looked busy)."""
    limited = await new_key(http, gw, rpm=1)
    assert (await chat(gw, limited["value"])).http_response.status_code == 200
    await gw.service.usage.flush()
    with pytest.raises(openai.RateLimitError):
        await chat(gw, limited["value"])  # (its record held by the ledger still)
    client = usage_client(gw, limited["value"])
    try:
        usage = (await read(client))["usage"]
    finally:
        client.close()
    assert (usage["total_requests"], usage["refused_requests"], usage["total_tokens"]) == (1, 1, 21)
    await gw.service.usage.flush()
    code, summary = await admin(http, gw, "GET", f"/admin/api/v1/usage/summary?key={limited['id']}")
    # (the admin summary's GoModel names read alike; ours count every record, the refused one too)
    assert (summary["total_requests"], summary["refused_requests"], summary["requests"], summary["refused"]) == (
        1, 1, 2, 1)


@pytest_twisted.ensureDeferred
async def test_the_window_parameters_and_their_400s(reactor, http, fake, tmp_path):
    await on_one_utc_day(reactor, fake, tmp_path, lambda gw: _window_parameters(http, gw))


async def _window_parameters(http, gw):
    key = await new_key(http, gw, user_path="/team/alpha")
    assert (await chat(gw, key["value"])).http_response.status_code == 200
    await gw.service.usage.flush()
    today = datetime.now(timezone.utc).date()
    client = usage_client(gw, key["value"])
    try:
        body = await read(client, "?days=7")
        assert (body["usage"]["start_date"], body["usage"]["end_date"]) == (
            (today - timedelta(days=6)).isoformat(), today.isoformat())
        assert body["usage"]["total_requests"] == 1
        body = await read(client, "?start_date=2020-01-01&end_date=2020-01-31")
        assert (body["usage"]["start_date"], body["usage"]["end_date"], body["usage"]["total_requests"]) == (
            "2020-01-01", "2020-01-31", 0)
        body = await read(client, f"?start_date={today.isoformat()}")  # the end: today
        assert body["usage"]["total_requests"] == 1
        for query, param in (("?days=0", "days"), ("?days=366", "days"), ("?days=x", "days"),
                             ("?start_date=2026-1-1", "start_date"), ("?end_date=2026-02-30", "end_date"),
                             ("?start_date=2026-02-01&end_date=2026-01-31", "start_date"),
                             ("?start_date=2024-01-01&end_date=2024-12-31", "start_date"),  # 366 days
                             ("?start_date=2026-01-01&days=3", "days")):
            response = await in_thread(status, client, query)
            assert response.status_code == 400, query
            error = response.json()["error"]
            assert (error["param"], error["code"], error["type"]) == (param, "invalid_window",
                                                                      "invalid_request_error"), query
        assert (await read(client, "?start_date=2025-01-01&end_date=2025-12-31"))["usage"]["start_date"] == (
            "2025-01-01")  # 365 days: the most
        response = await in_thread(status, client, "?days=7&days=30")  # (the first was taken, silently)
        error = response.json()["error"]
        assert (response.status_code, error["param"], error["code"]) == (400, "days", "invalid_value"), error
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_usage_is_null_when_the_ledger_is_off_and_budgets_still_count(reactor, http, fake, tmp_path):
    gw = await start(reactor, fake, tmp_path, USAGE_ENABLED="false")
    try:
        key = await new_key(http, gw, user_path="/t", budgets=[{"period": "total", "max_tokens": 100}])
        assert (await chat(gw, key["value"])).http_response.status_code == 200
        client = usage_client(gw, key["value"])
        try:
            body = await read(client)
        finally:
            client.close()
        assert body["usage"] is None
        (budget,) = body["budgets"]
        assert (budget["period_label"], budget["period_seconds"], budget["period_end"], budget["resets_in_seconds"],
                budget["spent"], budget["remaining"]) == ("total", None, None, None, 21, 79)
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_cost_budgets_and_costs_in_the_pricing_tables_currency(reactor, http, fake, tmp_path):
    prices = tmp_path / "gomodel.yaml"
    prices.write_text("pricing:\n  vllm/meta-llama/Llama-3.1-8B-Instruct: {input_per_mtok: 1000000, "
                      "output_per_mtok: 1000000}\n")
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                       "GOMODEL_DATA_DIR": str(tmp_path)}, str(prices))
    try:
        key = await new_key(http, gw, user_path="/t", budgets=[{"period": "weekly", "max_cost": 100}])
        assert (await chat(gw, key["value"])).http_response.status_code == 200
        await gw.service.usage.flush()
        client = usage_client(gw, key["value"])
        try:
            body = await read(client)
        finally:
            client.close()
        assert (body["usage"]["total_input_cost"], body["usage"]["total_output_cost"],
                body["usage"]["total_cost"]) == (18, 3, 21)
        (budget,) = body["budgets"]
        assert (budget["unit"], budget["amount"], budget["spent"], budget["remaining"], budget["exceeded"]) == (
            "cost", 100, 21, 79, False)
        assert budget["period_seconds"] == 604800
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_an_unreadable_usage_store_is_a_503(http, gw, monkeypatch):
    import sqlite3

    from twisted.internet.defer import fail

    from gomodel.store.sqlite.usage import SQLiteUsageStore

    key = await new_key(http, gw, user_path="/team/alpha")
    monkeypatch.setattr(SQLiteUsageStore, "summary",
                        lambda store, start, end, filters=None: fail(sqlite3.OperationalError("disk I/O error")))
    client = usage_client(gw, key["value"])
    try:
        response = await in_thread(status, client)
    finally:
        client.close()
    assert response.status_code == 503
    error = response.json()["error"]
    assert (error["code"], error["type"]) == ("usage_status_failed", "server_error")
    # (what failed is told in the log: an unexpected error's text may name the database's host)
    assert error["message"] == "The usage ledger could not be read. The gateway's log says why."


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_with_redis_the_counters_are_read_from_redis(http, redis_pair):
    one, two = redis_pair
    key = await new_key(http, one, rpm=10, max_concurrency=3, budgets=[{"period": "daily", "max_tokens": 1000}])
    await two.service.keys.refresh()
    assert (await chat(one, key["value"])).http_response.status_code == 200
    assert (await chat(two, key["value"])).http_response.status_code == 200
    # (one's release and charge go to Redis in its threads after its answer: on a loaded host, perhaps after
    # two's read, which waits only for two's own)
    await one.service.gate._limiter.counters.written()
    client = usage_client(two, key["value"])  # either process sees both requests
    try:
        body = await read(client)
    finally:
        client.close()
    rpm = by_scope(body["rate_limits"], f"key:{key['id']}", period_label="minute")
    assert (rpm["requests_used"], rpm["requests_remaining"]) == (2, 8)
    slots = by_scope(body["rate_limits"], f"key:{key['id']}", period_label="concurrent")
    assert slots["in_flight"] == 0
    (budget,) = body["budgets"]
    assert budget["spent"] == 42
