"""Managed keys: the admin API, keys used by the openai SDK, model allowlists, tenants kept apart, cache_salt."""

import io
import json

import openai
import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent

from gomodel.auth.keys import LOOKUP_TIMEOUT, KeyRing, Principal, hash_secret, new_secret
from gomodel.api.inference import plan_model
from gomodel.errors import ModelAccessDenied, StorageUnavailable
from gomodel.routing.registry import Route
from tests.stores import storage  # noqa: F401 (a fixture)
from tests.support import in_thread, openai_client, start_fake, start_gateway, stop_all, until

MASTER = "master-k"
ADMIN = {"authorization": f"Bearer {MASTER}", "content-type": "application/json"}
MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"
OTHER = "openai-other/meta-llama/Llama-3.1-8B-Instruct"
KEYS = "/admin/api/v1/auth-keys"


@pytest_twisted.async_yield_fixture()
async def two(reactor):
    """Two fake upstreams: a vLLM and an OpenAI-compatible one."""
    first, second = await start_fake(reactor), await start_fake(reactor)
    yield first, second
    await first.stop()
    await second.stop()


@pytest_twisted.async_yield_fixture()
async def gw(reactor, two, tmp_path):
    first, second = two
    gateway = await start_gateway(reactor, {
        "VLLM_BASE_URL": first.base_url, "OPENAI_OTHER_BASE_URL": second.base_url, "OPENAI_OTHER_API_KEY": "sk-up",
        "GOMODEL_MASTER_KEY": MASTER, "GOMODEL_DATA_DIR": str(tmp_path)})
    yield gateway
    await gateway.service.stopService()


@pytest_twisted.async_yield_fixture()
async def mixed(reactor, tmp_path):
    """C{start(env=None, **vllm_options)} -> C{(gateway, vllm, other)}: a gateway (master key L{MASTER}) in front of
    a fake vLLM (provider C{vllm}, made with C{vllm_options}) and an OpenAI-compatible fake (C{openai-other}),
    C{env} added; all stopped after the test."""
    started = []

    async def start(env=None, **vllm_options):
        vllm, other = await start_fake(reactor, **vllm_options), await start_fake(reactor)
        started.extend((vllm.stop, other.stop))
        gateway = await start_gateway(reactor, {
            "VLLM_BASE_URL": vllm.base_url, "OPENAI_OTHER_BASE_URL": other.base_url, "OPENAI_OTHER_API_KEY": "sk-up",
            "GOMODEL_MASTER_KEY": MASTER, "GOMODEL_DATA_DIR": str(tmp_path), **(env or {})})
        started.insert(0, gateway.service.stopService)
        return gateway, vllm, other

    yield start
    for stop in started:
        await stop()


async def admin(http, gw, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    response = await http.request(method, gw.url + path, data=data, headers=ADMIN)
    return response.code, json.loads(await treq.content(response))


async def new_key(http, gw, **fields):
    code, key = await admin(http, gw, "POST", KEYS, dict({"name": "team"}, **fields))
    assert code == 201, key
    return key


async def one_line_batch(gw, client, url, body):
    """Run a batch of one line (C{body} to C{url}) with C{client}'s key, to its end."""
    line = {"custom_id": "a", "method": "POST", "url": url, "body": body}
    uploaded = await in_thread(client.files.create, file=("in.jsonl", io.BytesIO(json.dumps(line).encode())),
                               purpose="batch")
    batch = await in_thread(client.batches.create, input_file_id=uploaded.id, endpoint=url, completion_window="24h")
    await gw.service.batch_runner.settled(batch.id)


async def batch_of(gw, client, url, bodies):
    """Run a batch of C{bodies} to C{url} (custom ids C{"0"}, C{"1"}, ...) with C{client}'s key; its record once
    it ended."""
    lines = b"".join(json.dumps({"custom_id": str(i), "method": "POST", "url": url, "body": body}).encode() + b"\n"
                     for i, body in enumerate(bodies))
    uploaded = await in_thread(client.files.create, file=("in.jsonl", io.BytesIO(lines)), purpose="batch")
    batch = await in_thread(client.batches.create, input_file_id=uploaded.id, endpoint=url, completion_window="24h")
    await gw.service.batch_runner.settled(batch.id)
    return await in_thread(client.batches.retrieve, batch.id)


async def chat(client, model=MODEL, **extra):
    return await in_thread(client.chat.completions.create, model=model,
                           messages=[{"role": "user", "content": "hi"}], max_tokens=5, **extra)


# -- the admin API -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_create_list_get_patch_deactivate(http, gw):
    key = await new_key(http, gw, description="CI", user_path="team//alpha/", expires_at="2999-01-01T00:00:00Z",
                        models=["vllm/"], rpm=60, budgets=[{"period": "daily", "max_tokens": 1000}],
                        metadata={"owner": "ops"})
    secret = key["value"]
    assert secret.startswith("sk_gom_") and len(secret) == 7 + 64
    assert key["id"].startswith("key_")
    assert key["redacted_value"] == f"sk_gom_...{secret[-4:]}"
    assert (key["name"], key["description"], key["user_path"], key["models"], key["rpm"]) == (
        "team", "CI", "/team/alpha", ["vllm/"], 60)
    assert key["expires_at"] == "2999-01-01T00:00:00Z" and key["active"] is True and key["enabled"] is True
    assert "hash" not in key

    code, listed = await admin(http, gw, "GET", KEYS)
    assert code == 200 and [k["id"] for k in listed["data"]] == [key["id"]]
    text = json.dumps(listed)
    assert secret not in text and secret[7:] not in text and hash_secret(secret) not in text
    assert "value" not in listed["data"][0]

    code, changed = await admin(http, gw, "PATCH", f"{KEYS}/{key['id']}", {"rpm": None, "name": "renamed"})
    assert code == 200 and (changed["rpm"], changed["name"], changed["user_path"]) == (None, "renamed", "/team/alpha")
    code, got = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
    assert code == 200 and got["name"] == "renamed" and "value" not in got

    code, off = await admin(http, gw, "POST", f"{KEYS}/{key['id']}/deactivate")
    assert code == 200 and off["active"] is False and off["deactivated_at"] is not None
    code, error = await admin(http, gw, "GET", f"{KEYS}/key_nope")
    assert code == 404 and error["error"]["code"] == "auth_key_not_found"


@pytest_twisted.ensureDeferred
async def test_user_paths_are_gomodels_a_dot_or_an_at_sign_in_a_segment_included(http, gw):
    """Issue 14's user_path is GoModel's (GoModel's: normalised, no '.' or '..' segment and no
    ':'). A key's user_path and X-GoModel-User-Path took letters, digits and _-@+~ alone: a GoModel user's
    /users/alice@example.com or /org/acme.com was a 400, on a key and in the header (so such a path's
    configured limits and budgets could never apply). Now what GoModel accepts is accepted, normalised as it
    normalises it; a control character is still refused (no store keeps a NUL)."""
    key = await new_key(http, gw, user_path=" users / alice@example.com/ ")
    assert key["user_path"] == "/users/alice@example.com"
    for bad in ("/a/./b", "/a/b:c", "/a\x00b", "/a\nb"):
        code, error = await admin(http, gw, "POST", KEYS, {"name": "x", "user_path": bad})
        assert (code, error["error"]["param"]) == (400, "user_path"), bad
    master = openai_client(gw, MASTER)
    try:
        await chat(master, extra_headers={"X-GoModel-User-Path": "org/acme.com/bob smith"})
        with pytest.raises(openai.BadRequestError) as refused:
            await chat(master, extra_headers={"X-GoModel-User-Path": "/org/../x"})
        assert refused.value.code == "invalid_user_path"
    finally:
        master.close()
    client = openai_client(gw, key["value"])
    try:
        await chat(client)
    finally:
        client.close()
    await gw.service.usage.flush()
    code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log?user_path=/org/acme.com")
    assert [record["user_path"] for record in log["data"]] == ["/org/acme.com/bob smith"]
    code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log?user_path=/users")
    assert [(record["user_path"], record["auth_key_id"]) for record in log["data"]] == [
        ("/users/alice@example.com", key["id"])]


@pytest.mark.parametrize("body, param", [
    ({}, "name"),
    ({"name": ""}, "name"),
    ({"name": "x", "user_path": "/a/../b"}, "user_path"),
    ({"name": "x", "user_path": "/a:b"}, "user_path"),
    ({"name": "x", "expires_at": "yesterday"}, "expires_at"),
    ({"name": "x", "expires_at": 1000}, "expires_at"),
    ({"name": "x", "rpm": 0}, "rpm"),
    ({"name": "x", "tpm": "many"}, "tpm"),
    ({"name": "x", "models": "vllm/"}, "models"),
    ({"name": "x", "budgets": [{"period": "yearly", "max_tokens": 5}]}, "budgets"),
    ({"name": "x", "budgets": [{"period": "daily", "max_tokens": 5, "max_cost": 1}]}, "budgets"),
    ({"name": "x", "budgets": [{"period": "daily", "max_cost": -1}]}, "budgets"),
    ({"name": "x", "secret": "mine"}, "secret"),
    # a NUL no store keeps (PostgreSQL refused it without naming the field, SQLite kept it), a name on one line
    ({"name": "a\x00b"}, "name"),
    ({"name": "alpha\nbeta"}, "name"),
    ({"name": "x", "description": "a\x00b"}, "description"),
    # numbers past what the stores' columns hold (a 500 from the store before), or a float holds exactly
    ({"name": "x", "rpm": 2**63}, "rpm"),
    ({"name": "x", "tpm": 2**53}, "tpm"),
    ({"name": "x", "tpm": 2**70}, "tpm"),
    ({"name": "x", "max_concurrency": 2**31}, "max_concurrency"),
    ({"name": "x", "priority": 2**31}, "priority"),
    ({"name": "x", "priority": -2**31 - 1}, "priority"),
    ({"name": "x", "expires_at": 1e300}, "expires_at"),
    ({"name": "x", "expires_at": "10000-01-01T00:00:00Z"}, "expires_at"),
    ({"name": "x", "budgets": [{"period": "daily", "max_tokens": 2**53}]}, "budgets"),
    ({"name": "x", "budgets": [{"period": "daily", "max_tokens": 10**400}]}, "budgets"),
    ({"name": "x", "budgets": [{"period": "daily", "max_cost": 10**400}]}, "budgets"),  # past a float: a 500 later
    # models and metadata past their caps (metadata: OpenAI's 16 string pairs, keys to 64, values to 512)
    ({"name": "x", "models": ["vllm/"] * 1001}, "models"),
    ({"name": "x", "allowed_models": ["m" * 257]}, "allowed_models"),
    ({"name": "x", "models": ["vllm/"], "allowed_models": ["vllm/a"]}, "allowed_models"),  # (one field, two lists)
    ({"name": "x", "models": None, "allowed_models": ["vllm/a"]}, "allowed_models"),
    ({"name": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"name": "x", "metadata": {"k" * 65: "v"}}, "metadata"),
    ({"name": "x", "metadata": {"k": "v" * 513}}, "metadata"),
    ({"name": "x", "metadata": {"k": 1}}, "metadata"),
    ({"name": "x", "metadata": ["k"]}, "metadata"),
])
@pytest_twisted.ensureDeferred
async def test_bad_key_bodies_are_400s_naming_the_field(http, gw, body, param):
    code, error = await admin(http, gw, "POST", KEYS, body)
    assert code == 400, error
    assert error["error"]["param"] == param


@pytest_twisted.ensureDeferred
async def test_models_and_metadata_up_to_their_caps_are_kept(http, gw):
    models = [f"vllm/{i:03d}" + "m" * 248 for i in range(1000)]
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    key = await new_key(http, gw, models=models, metadata=metadata)
    assert (key["models"], key["metadata"]) == (models, metadata)
    code, error = await admin(http, gw, "PATCH", f"{KEYS}/{key['id']}", {"models": models + ["vllm/"]})
    assert (code, error["error"]["param"], error["error"]["code"]) == (400, "models", "invalid_value")
    code, got = await admin(http, gw, "PATCH", f"{KEYS}/{key['id']}", {"metadata": None, "models": None})
    assert code == 200 and (got["metadata"], got["models"]) == (None, None)


@pytest_twisted.ensureDeferred
async def test_a_patch_null_sets_a_field_back_to_its_default_own_cache_salt_too(http, gw):
    """C{null} in a PATCH sets a field back to its default, as for every other optional field: C{own_cache_salt}'s
    is false (before, a 400, so a client sending the whole key with nulls for what it left unset was refused)."""
    key = await new_key(http, gw, own_cache_salt=True, rpm=5, description="d", priority=1)
    code, got = await admin(http, gw, "PATCH", f"{KEYS}/{key['id']}", {
        "own_cache_salt": None, "rpm": None, "description": None, "priority": None})
    assert code == 200, got
    assert (got["own_cache_salt"], got["rpm"], got["description"], got["priority"]) == (False, None, None, None)
    code, made = await admin(http, gw, "POST", KEYS, {"name": "n", "own_cache_salt": None})
    assert code == 201 and made["own_cache_salt"] is False
    code, error = await admin(http, gw, "PATCH", f"{KEYS}/{key['id']}", {"own_cache_salt": "yes"})
    assert (code, error["error"]["param"]) == (400, "own_cache_salt")


@pytest_twisted.ensureDeferred
async def test_models_and_allowed_models_are_one_field(http, gw):
    key = await new_key(http, gw, models=["vllm/"], allowed_models=[" vllm/"])
    assert (key["models"], key["allowed_models"]) == (["vllm/"], ["vllm/"])
    code, error = await admin(http, gw, "PATCH", f"{KEYS}/{key['id']}", {"models": ["a/"], "allowed_models": ["b/"]})
    assert (code, error["error"]["param"], error["error"]["code"]) == (400, "allowed_models", "invalid_value")
    code, got = await admin(http, gw, "PATCH", f"{KEYS}/{key['id']}", {"models": None, "allowed_models": []})
    assert code == 200 and not got["models"]


@pytest_twisted.ensureDeferred
async def test_a_budget_sent_back_as_a_get_shows_it_names_the_read_only_field(http, gw):
    key = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": 100}])
    code, got = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
    assert code == 200 and "spent_tokens" in got["budgets"][0]
    assert key["budgets"] == got["budgets"]  # (the create's answer shows them as a GET does: it lacked spent_*)
    code, error = await admin(http, gw, "PATCH", f"{KEYS}/{key['id']}", {"budgets": got["budgets"]})
    assert (code, error["error"]["param"]) == (400, "budgets")
    assert "'last_reset_at' is not a field" in error["error"]["message"]  # (said "exactly one of max_tokens...")


# 1e400 parses as infinity where the body holds an integer of 20 digits or more (the standard library's parser).
HUGE = ', "metadata": {"z": 100000000000000000000}}'


@pytest.mark.parametrize("text, param", [
    ('{"budgets": [{"period": "daily", "max_cost": 1e400}]' + HUGE, "budgets"),
    ('{"budgets": [{"period": "daily", "max_cost": %d}]}' % 10**400, "budgets"),
    ('{"expires_at": 1e400' + HUGE, "expires_at"),
    ('{"expires_at": -1e400' + HUGE, "expires_at"),
], ids=["max_cost-infinity", "max_cost-400-digits", "expires_at-infinity", "expires_at-minus-infinity"])
@pytest_twisted.ensureDeferred
async def test_numbers_past_a_float_are_400s_on_create_and_update(http, gw, text, param):
    key = await new_key(http, gw)
    for method, path, body in (("POST", KEYS, '{"name": "x", ' + text[1:]), ("PATCH", f"{KEYS}/{key['id']}", text)):
        response = await http.request(method, gw.url + path, data=body.encode(), headers=ADMIN)
        error = json.loads(await treq.content(response))
        assert response.code == 400, error
        assert (error["error"]["param"], error["error"]["code"]) == (param, "invalid_value")
    code, listed = await admin(http, gw, "GET", KEYS)
    assert code == 200 and [k["id"] for k in listed["data"]] == [key["id"]]


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_reading_what_budgets_spent_keeps_nothing_per_read(http, gw):
    """A listing of the keys, of the budgets by path and a key's own C{/v1/usage} each read what every budget
    spent and keep nothing of it (before, the budget book kept each read's periods, until 10,000 reads were
    kept: megabytes for each listing of a thousand keys with budgets, which the dashboard's pages make)."""
    budgets = [{"period": "daily", "max_tokens": 1000}, {"period": "monthly", "max_cost": 5}]
    keys = [await new_key(http, gw, name=f"k{i}", user_path="/team", budgets=budgets) for i in range(3)]
    code, _ = await admin(http, gw, "PUT", "/admin/api/v1/budgets", {"user_path": "/team", "period": "daily",
                                                                     "max_tokens": 10000})
    assert code == 200
    client = openai_client(gw, keys[0]["value"])
    try:
        await chat(client)
    finally:
        client.close()
    book = gw.service.gate._book
    kept = len(book._currents)
    for _ in range(5):
        code, listed = await admin(http, gw, "GET", KEYS)
        assert code == 200 and listed["data"][0]["budgets"][0]["spent_tokens"] == 21
        code, _ = await admin(http, gw, "GET", "/admin/api/v1/budgets")
        assert code == 200
        response = await http.get(gw.url + "/v1/usage", headers={"authorization": f"Bearer {keys[0]['value']}"})
        assert response.code == 200
        await treq.content(response)
    assert len(book._currents) == kept


@pytest_twisted.ensureDeferred
async def test_the_key_list_pages_with_limit_and_after(http, gw):
    made = [(await new_key(http, gw, name=f"k{i}"))["id"] for i in range(5)]
    code, listed = await admin(http, gw, "GET", KEYS)  # without limit: every key, oldest first
    assert code == 200 and [k["id"] for k in listed["data"]] == made and listed["has_more"] is False
    assert (listed["first_id"], listed["last_id"]) == (made[0], made[-1])
    seen, after = [], ""
    while True:
        code, listed = await admin(http, gw, "GET", f"{KEYS}?limit=2{after}")
        assert code == 200 and len(listed["data"]) <= 2
        seen += [k["id"] for k in listed["data"]]
        if not listed["has_more"]:
            break
        after = f"&after={listed['last_id']}"
    assert seen == made
    code, listed = await admin(http, gw, "GET", f"{KEYS}?after={made[-1]}")
    assert code == 200 and listed["data"] == [] and listed["has_more"] is False and listed["first_id"] is None
    for query, param in (("limit=0", "limit"), ("limit=1001", "limit"), ("limit=x", "limit"),
                         ("after=key_nope", "after")):
        code, error = await admin(http, gw, "GET", f"{KEYS}?{query}")
        assert (code, error["error"]["param"], error["error"]["code"]) == (400, param, "invalid_value"), query


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_page_of_keys_reads_its_keys_and_what_their_budgets_spent_in_one_query_each(
        reactor, http, two, storage):
    """A page of keys is one query of the keys store and one of the usage ledger for its budgets (before, every key
    was read for any page, and each key's budget seeded by a query of its own: 7 s for the first listing of 5,000
    keys on PostgreSQL)."""
    gw = await start_gateway(reactor, dict(storage, VLLM_BASE_URL=two[0].base_url, GOMODEL_MASTER_KEY=MASTER))
    try:
        made = [(await new_key(http, gw, name=f"k{i}", budgets=[{"period": "daily", "max_tokens": 1000}]))["id"]
                for i in range(25)]
        store, calls = gw.service.store, []
        for target, name in ((store.usage, "spent"), (store.usage, "spent_many"), (store.keys, "list"),
                             (store.keys, "page")):
            def counted(*args, _real=getattr(target, name), _name=name):
                calls.append(_name)
                return _real(*args)
            setattr(target, name, counted)
        gw.service.gate._book._seeded.clear()  # (as after a start: the keys made here seeded their sums)
        code, listed = await admin(http, gw, "GET", f"{KEYS}?limit=10&after={made[4]}")
        assert code == 200 and [k["id"] for k in listed["data"]] == made[5:15] and listed["has_more"] is True
        assert listed["data"][0]["budgets"][0]["spent_tokens"] == 0
        assert sorted(calls) == ["page", "spent_many"], calls
        calls.clear()
        code, listed = await admin(http, gw, "GET", KEYS)  # every key: still one read of each
        assert code == 200 and len(listed["data"]) == 25 and listed["has_more"] is False
        assert sorted(calls) == ["page", "spent_many"], calls
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_expires_at_takes_unix_seconds(http, gw):
    key = await new_key(http, gw, expires_at=32503680000)
    assert key["expires_at"] == "3000-01-01T00:00:00Z"


@pytest.mark.parametrize("text, shown", [
    ("2999-01-01T00:00:00Z", "2999-01-01T00:00:00Z"),
    ("2999-01-01t00:00:00z", "2999-01-01T00:00:00Z"),  # (RFC 3339's lower case: a 400 before)
    ("2999-01-01T05:30:00+05:30", "2999-01-01T00:00:00Z"),
    ("2999-01-01T00:00:00.123456789-01:00", "2999-01-01T01:00:00Z"),  # (Go's RFC 3339 with nanoseconds)
    ("2999-01-01T00:00:00", "2999-01-01T00:00:00Z"),  # (no offset: UTC)
])
@pytest_twisted.ensureDeferred
async def test_expires_at_takes_rfc_3339s_forms(http, gw, text, shown):
    key = await new_key(http, gw, expires_at=text)
    assert key["expires_at"] == shown


@pytest.mark.parametrize("text", ["1767225600", "32503680000", " 32503680000 ", "32503680000.5"])
@pytest_twisted.ensureDeferred
async def test_unix_seconds_in_a_string_are_a_400_that_says_to_send_a_number(http, gw, text):
    """As GoModel's (its C{expires_at} is Go's C{time.Time}: RFC 3339 text only, a number refused too), Unix seconds
    in a JSON string are refused; the 400 says to send them as a number (before, it said "ISO 8601 or Unix seconds",
    which they were)."""
    code, body = await admin(http, gw, "POST", KEYS, {"name": "x", "expires_at": text})
    error = body["error"]
    assert (code, error["param"], error["code"]) == (400, "expires_at", "invalid_value"), body
    assert "JSON number" in error["message"] and "not in quotes" in error["message"], error


# -- using a key ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_managed_key_works_by_bearer_and_x_api_key_until_deactivated(http, gw, two):
    key = await new_key(http, gw)
    client = openai_client(gw, key["value"])
    try:
        answer = await chat(client)
        assert answer.choices[0].message.content
        upstream = two[0].last_request()
        assert key["value"] not in upstream.raw_body.decode() and MASTER not in str(upstream.headers)
        assert upstream.header("authorization") is None or key["value"] not in upstream.header("authorization")
        response = await http.get(gw.url + "/v1/models", headers={"x-api-key": key["value"]})
        assert response.code == 200
        await treq.content(response)

        await admin(http, gw, "POST", f"{KEYS}/{key['id']}/deactivate")
        with pytest.raises(openai.AuthenticationError):
            await chat(client)
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_managed_key_never_reaches_admin_or_metrics(http, gw):
    key = await new_key(http, gw)
    for path in (KEYS, "/admin/api/v1/providers/status", "/metrics", "/metrics/"):
        response = await http.get(gw.url + path, headers={"authorization": f"Bearer {key['value']}"})
        assert response.code == 403, path
        assert json.loads(await treq.content(response))["error"]["code"] == "master_key_required"


@pytest_twisted.ensureDeferred
async def test_a_rotated_key_keeps_its_id_and_what_it_made_under_a_new_secret(reactor, http, gw, two, tmp_path):
    """A leaked secret is replaced, the key kept: C{POST /auth-keys/{id}/rotate} answers the key with a new
    secret (shown once); the old one is refused at once here and on another process at its next refresh, the
    new one works on both, and the key's files, limits and budgets stay its own (a key without a user path
    owns what it made: before, the only way out was a new key, which lost them)."""
    other = await start_gateway(reactor, {"VLLM_BASE_URL": two[0].base_url, "GOMODEL_MASTER_KEY": MASTER,
                                          "GOMODEL_DATA_DIR": str(tmp_path)})
    key = await new_key(http, gw, rpm=100)
    old = openai_client(gw, key["value"])
    try:
        await other.service.keys.refresh()
        made = await in_thread(old.files.create, file=("in.jsonl", io.BytesIO(b'{"a": 1}\n')), purpose="batch")
        code, rotated = await admin(http, gw, "POST", f"{KEYS}/{key['id']}/rotate")
        assert code == 200 and rotated["id"] == key["id"] and rotated["rpm"] == 100
        assert rotated["value"].startswith("sk_gom_") and rotated["value"] != key["value"]
        assert rotated["redacted_value"] == f"sk_gom_...{rotated['value'][-4:]}"
        code, got = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
        assert "value" not in got and got["redacted_value"] == rotated["redacted_value"]
        with pytest.raises(openai.AuthenticationError):
            await chat(old)
        await other.service.keys.refresh()  # what its loop does every second
        for gateway in (gw, other):
            new = openai_client(gateway, rotated["value"])
            try:
                await chat(new)
                assert (await in_thread(new.files.retrieve, made.id)).id == made.id
            finally:
                new.close()
            stale = openai_client(gateway, key["value"])
            try:
                with pytest.raises(openai.AuthenticationError):
                    await chat(stale)
            finally:
                stale.close()
        code, error = await admin(http, gw, "POST", f"{KEYS}/key_nope/rotate")
        assert code == 404 and error["error"]["code"] == "auth_key_not_found"
    finally:
        old.close()
        await other.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_deactivated_keys_secret_is_not_rotated(http, gw):
    """Rotating a deactivated key is a 409 C{key_deactivated} in the OpenAI envelope, the key untouched (before,
    a new secret was made and shown, which the gateway refused all the same)."""
    key = await new_key(http, gw)
    code, _ = await admin(http, gw, "POST", f"{KEYS}/{key['id']}/deactivate")
    assert code == 200
    code, error = await admin(http, gw, "POST", f"{KEYS}/{key['id']}/rotate")
    assert code == 409, error
    assert error["error"]["code"] == "key_deactivated" and error["error"]["type"] == "invalid_request_error"
    assert "deactivated" in error["error"]["message"] and "value" not in error
    code, got = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
    assert got["redacted_value"] == key["redacted_value"]


@pytest_twisted.ensureDeferred
async def test_a_rotations_body_sets_the_keys_fields_with_its_new_secret_and_any_other_field_is_a_400(http, gw):
    """C{POST /auth-keys/{id}/rotate} takes an optional body of the fields a C{PATCH} sets, written with the new
    secret in one change (a leaked key renamed, its expiry moved, in the same call); a field it cannot honour (a
    grace period for the old secret: it is refused at once) is a 400 naming it, the key untouched. Before, any body
    was ignored: the secret was rotated and the fields silently dropped."""
    key = await new_key(http, gw, rpm=100, budgets=[{"period": "daily", "max_tokens": 1000}])
    for body, field in (({"grace_period": 3600}, "grace_period"), ({"name": "x", "expires_in": 60}, "expires_in"),
                        ({"name": 5}, "name"), ({"expires_at": "yesterday"}, "expires_at"), ({"value": "sk"}, "value")):
        code, error = await admin(http, gw, "POST", f"{KEYS}/{key['id']}/rotate", body)
        assert code == 400 and error["error"]["param"] == field, (body, error)
        assert error["error"]["type"] == "invalid_request_error" and field in error["error"]["message"]
    response = await http.post(gw.url + f"{KEYS}/{key['id']}/rotate", data=b"[1]", headers=ADMIN)
    assert response.code == 400 and json.loads(await treq.content(response))["error"]["code"] == "invalid_json"
    code, got = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
    assert got["redacted_value"] == key["redacted_value"] and got["name"] == "team"  # untouched
    code, rotated = await admin(http, gw, "POST", f"{KEYS}/{key['id']}/rotate", {
        "name": "team (rotated)", "expires_at": "2999-01-01T00:00:00Z", "rpm": 50})
    assert code == 200 and rotated["value"] != key["value"] and rotated["id"] == key["id"], rotated
    assert (rotated["name"], rotated["expires_at"], rotated["rpm"]) == ("team (rotated)", "2999-01-01T00:00:00Z", 50)
    assert rotated["budgets"][0]["max_tokens"] == 1000  # (what it did not name is kept)
    code, got = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
    assert (got["name"], got["rpm"], got["redacted_value"]) == ("team (rotated)", 50, rotated["redacted_value"])
    client = openai_client(gw, rotated["value"])
    try:
        await chat(client)
    finally:
        client.close()
    code, _ = await admin(http, gw, "POST", f"{KEYS}/{key['id']}/deactivate")
    code, error = await admin(http, gw, "POST", f"{KEYS}/{key['id']}/rotate", {"name": "revived"})
    assert code == 409 and error["error"]["code"] == "key_deactivated"
    code, got = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
    assert got["name"] == "team (rotated)" and got["redacted_value"] == rotated["redacted_value"]


@pytest_twisted.ensureDeferred
async def test_a_deactivation_with_a_field_in_its_body_is_a_400_naming_it_the_key_left_active(http, gw):
    """C{POST /auth-keys/{id}/deactivate} takes no field: a body with one (a reason, a date to deactivate at) is a
    400 naming it, the key still active, as a rotation's body is read (before, it was ignored and the key
    deactivated at once); no body, or an empty object, deactivates."""
    key = await new_key(http, gw)
    for body, field in (({"reason": "leaked"}, "reason"), ({"deactivate_at": "2999-01-01T00:00:00Z"}, "deactivate_at")):
        code, error = await admin(http, gw, "POST", f"{KEYS}/{key['id']}/deactivate", body)
        assert code == 400 and error["error"]["param"] == field and error["error"]["code"] == "invalid_value", error
    code, got = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
    assert got["active"] is True
    code, got = await admin(http, gw, "POST", f"{KEYS}/{key['id']}/deactivate", {})
    assert code == 200 and got["active"] is False and got["deactivated_at"] is not None


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_keys_requests_in_flight_end_as_they_began_whatever_befalls_the_key(reactor, http, gw, two):
    """A request admitted before its key was deactivated, rotated or stripped of its model runs to its end (and is
    charged); the next one is refused, at once on this process."""
    upstream, _ = two
    keys = {what: await new_key(http, gw, name=what, budgets=[{"period": "daily", "max_tokens": 10000}])
            for what in ("deactivate", "rotate", "models")}
    upstream.holding = True
    try:
        clients = {what: openai_client(gw, key["value"]) for what, key in keys.items()}
        held = {}
        for what, client in clients.items():
            arrived = upstream.next_request()
            held[what] = Deferred.fromCoroutine(chat(client, extra_body={"fake_hold": True}))
            await arrived
        await admin(http, gw, "POST", f"{KEYS}/{keys['deactivate']['id']}/deactivate")
        await admin(http, gw, "POST", f"{KEYS}/{keys['rotate']['id']}/rotate")
        await admin(http, gw, "PATCH", f"{KEYS}/{keys['models']['id']}", {"models": ["openai-other/"]})
        upstream.release_holds()
        for what in held:
            assert (await held[what]).choices[0].message.content
        for what, refusal in (("deactivate", openai.AuthenticationError), ("rotate", openai.AuthenticationError),
                              ("models", openai.PermissionDeniedError)):
            with pytest.raises(refusal):
                await chat(clients[what])
        for key in keys.values():
            code, view = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
            assert view["budgets"][0]["spent_tokens"] == 21  # (charged as it ended)
    finally:
        upstream.release_holds()
        for client in clients.values():
            client.close()


@pytest_twisted.ensureDeferred
async def test_a_deactivation_reaches_another_process_on_its_next_refresh(reactor, http, gw, two, tmp_path):
    other = await start_gateway(reactor, {"VLLM_BASE_URL": two[0].base_url, "GOMODEL_MASTER_KEY": MASTER,
                                          "GOMODEL_DATA_DIR": str(tmp_path)})
    try:
        key = await new_key(http, gw)
        await other.service.keys.refresh()
        client = openai_client(other, key["value"])
        try:
            await chat(client)
            await admin(http, gw, "POST", f"{KEYS}/{key['id']}/deactivate")
            await other.service.keys.refresh()  # what its loop does every second
            with pytest.raises(openai.AuthenticationError):
                await chat(client)
        finally:
            client.close()
    finally:
        await other.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_raised_rpm_lets_the_next_request_through_at_once(http, gw):
    """A key at its limit whose rpm is raised gets the added headroom at once (what was used stays used),
    not one request more as the bucket refills at the new rate."""
    key = await new_key(http, gw, rpm=2, tpm=100_000)
    client = openai_client(gw, key["value"])
    try:
        await chat(client)
        await chat(client)
        with pytest.raises(openai.RateLimitError):
            await chat(client)
        code, _ = await admin(http, gw, "PATCH", f"{KEYS}/{key['id']}", {"rpm": 10})
        assert code == 200
        await gw.service.keys.refresh()  # what its loop does every second
        answer = await in_thread(client.chat.completions.with_raw_response.create, model=MODEL,
                                 messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert answer.headers["x-ratelimit-limit-requests"] == "10"
        assert answer.headers["x-ratelimit-remaining-requests"] == "7"  # 10, 3 used
        code, _ = await admin(http, gw, "PATCH", f"{KEYS}/{key['id']}", {"rpm": 3})
        await gw.service.keys.refresh()
        with pytest.raises(openai.RateLimitError):  # lowered below what was used: it waits
            await chat(client)
    finally:
        client.close()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_counting_tokens_takes_nothing_of_a_keys_limits_and_budgets(http, gw):
    """Claude Code counts tokens (C{/v1/messages/count_tokens}) before many of its requests, and a Responses
    client may ask C{/v1/responses/input_tokens}: a count generates nothing and costs nothing, so it takes
    nothing of a key's rpm, tpm, concurrency or budgets; before, each count took one of the key's requests a
    minute (a key of rpm 2 counting twice was refused its message) and a spent budget refused counts."""
    import anthropic

    key = await new_key(http, gw, rpm=2, tpm=1_000_000)
    messages = anthropic.Anthropic(base_url=gw.url, api_key=key["value"], max_retries=0, timeout=10)
    client = openai_client(gw, key["value"])
    hi = [{"role": "user", "content": "hi"}]
    try:
        for _ in range(3):
            assert (await in_thread(messages.messages.count_tokens, model=MODEL, messages=hi)).input_tokens > 0
            counted = await in_thread(client.post, "/responses/input_tokens", cast_to=object,
                                      body={"model": MODEL, "input": "hi"})
            assert counted["input_tokens"] > 0
        await chat(client)
        await chat(client)
        with pytest.raises(openai.RateLimitError):
            await chat(client)
        assert (await in_thread(messages.messages.count_tokens, model=MODEL, messages=hi)).input_tokens > 0
        for route in ("tokenize", "v1/messages/count_tokens"):  # (the passthrough's counts, as /v1's)
            await in_thread(client.post, f"{gw.url}/p/vllm/{route}", cast_to=object, body={
                "model": "meta-llama/Llama-3.1-8B-Instruct", "messages": hi, "max_tokens": 5})
        spent = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": 1}])
        other = openai_client(gw, spent["value"])
        try:
            await chat(other)  # (spends it)
            with pytest.raises(openai.RateLimitError):
                await chat(other)
            counted = await in_thread(other.post, "/responses/input_tokens", cast_to=object,
                                      body={"model": MODEL, "input": "hi"})
            assert counted["input_tokens"] > 0
        finally:
            other.close()
    finally:
        messages.close()
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_tools_max_tokens_in_the_history_is_not_the_requests(http, gw):
    """A key's tpm reserves the body's size / 4 and its own C{max_tokens}: before, the first C{"max_tokens": N}
    anywhere in the body, so an agent whose history held a tool call with such an input (an "ask another model"
    tool), sent before the request's own (the openai SDK puts messages first), was refused as larger than its
    key's tpm (no wait lets it through), or reserved the tool's 16 in place of its own 100000."""
    key = await new_key(http, gw, tpm=20_000)
    history = [{"role": "user", "content": "ask the other model"},
               {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "ask",
                                                  "input": {"prompt": "hi", "max_tokens": 1_000_000}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "done"}]}]
    headers = {"x-api-key": key["value"], "content-type": "application/json", "anthropic-version": "2023-06-01"}
    body = json.dumps({"model": MODEL, "messages": history, "max_tokens": 16}).encode()
    response = await http.post(gw.url + "/v1/messages", data=body, headers=headers)
    assert response.code == 200, await treq.content(response)


def test_the_key_ring_refuses_a_key_once_it_expires():
    clock = Clock()
    clock.advance(1000)
    ring = KeyRing(store=None, clock=clock)
    ring.merge([{"id": "key_1", "hash": hash_secret("sk_gom_x"), "name": "n", "expires_at": 1010,
                 "deactivated_at": None, "updated_at": 1.0}])
    assert ring.find(b"sk_gom_x").id == "key_1"
    assert ring.find(b"sk_gom_y") is None
    clock.advance(10)
    assert ring.find(b"sk_gom_x") is None
    assert ring.by_id("key_1").id == "key_1"


def test_the_key_ring_logs_a_store_outage_once_and_its_end():
    """Refreshed every second, the key ring says once that the store is unavailable (not every second) and
    once that it answers again; another failure is logged in full every time."""
    class Keys:
        answer = None  # an exception to fail with, or None

        def changed_since(self, since):
            return fail(self.answer) if self.answer is not None else succeed([])

    events, keys = [], Keys()
    ring = KeyRing(store=keys, clock=Clock())
    ring.log = Logger(observer=events.append)
    keys.answer = StorageUnavailable("The gateway's storage is unavailable (database is down).")
    for _ in range(5):
        ring.refresh()
    [warning] = events
    assert warning["log_level"] == LogLevel.warn and "log_failure" not in warning
    assert formatEvent(warning) == ("refreshing the managed keys failed: The gateway's storage is unavailable "
                                    "(database is down). (not repeated until it succeeds again)")
    keys.answer = None
    ring.refresh()
    ring.refresh()
    assert [(e["log_level"], formatEvent(e)) for e in events[1:]] == [
        (LogLevel.info, "the managed keys are refreshed from the store again")]
    keys.answer = StorageUnavailable("The gateway's storage is unavailable (database is down).")
    ring.refresh()
    assert len(events) == 3 and events[2]["log_level"] == LogLevel.warn  # a new streak
    keys.answer = ValueError("a bug")
    ring.refresh()
    ring.refresh()
    assert [e["log_failure"].type for e in events[3:]] == [ValueError, ValueError]


def test_the_key_ring_remembers_only_known_secrets_and_follows_their_record():
    ring = KeyRing(store=None, clock=Clock())
    record = {"id": "key_1", "hash": hash_secret("sk_gom_x"), "name": "n", "deactivated_at": None, "updated_at": 1.0}
    ring.merge([record])
    assert ring.find(b"sk_gom_x").id == "key_1"
    for i in range(100):
        assert ring.find(b"sk_gom_guess_%d" % i) is None
    assert list(ring._digests) == [b"sk_gom_x"]  # a wrong secret is hashed again, never kept
    ring.merge([{**record, "deactivated_at": 2.0, "updated_at": 2.0}])
    assert ring.find(b"sk_gom_x") is None  # the remembered hash still reads the current record
    ring.merge([{**record, "hash": hash_secret("sk_gom_z"), "updated_at": 3.0}])  # the secret was rotated
    assert ring.find(b"sk_gom_x") is None
    assert ring.find(b"sk_gom_z").id == "key_1"


def test_a_refresh_that_reads_a_keys_record_unchanged_keeps_its_principal():
    """A refresh reads the records changed in its last seconds again (its overlap): a record read unchanged keeps
    the principal held, so what is kept by it (the gate's limits plan and lane) stays; any change makes a new one,
    which the next request finds at once."""
    ring = KeyRing(store=None, clock=Clock())
    record = {"id": "key_1", "hash": hash_secret("sk_gom_x"), "name": "n", "deactivated_at": None, "updated_at": 1.0,
              "rpm": 10, "budgets": [{"period": "daily", "max_tokens": 100}]}
    ring.merge([record])
    held = ring.find(b"sk_gom_x")
    ring.merge([dict(record)], read=True)
    assert ring.by_id("key_1") is held and ring.find(b"sk_gom_x") is held
    ring.merge([{**record, "rpm": 20, "updated_at": 2.0}], read=True)
    assert ring.find(b"sk_gom_x") is not held and ring.find(b"sk_gom_x").rpm == 20
    changed = ring.find(b"sk_gom_x")
    ring.merge([{**record, "rpm": 20, "updated_at": 3.0, "name": "m"}])
    assert ring.find(b"sk_gom_x") is not changed and ring.find(b"sk_gom_x").name == "m"


def test_a_secret_the_key_ring_lacks_is_looked_up_once_and_made_up_ones_cost_one_read_at_a_time():
    """A well-formed secret the snapshot lacks waits for a read of the store begun after it was asked;
    reads never overlap (those asked during one share the next), a secret the store did not know is
    refused at once afterwards, and a failed or slow read cannot check it (503), remembering nothing."""
    class Keys:
        def __init__(self):
            self.reads = []  # (since, Deferred)

        def changed_since(self, since):
            d = Deferred()
            self.reads.append((since, d))
            return d

    clock, keys = Clock(), Keys()
    ring = KeyRing(store=keys, clock=clock)
    new, guessed = new_secret(), new_secret()
    record = {"id": "key_1", "hash": hash_secret(new), "name": "n", "deactivated_at": None, "updated_at": 7.0}
    answers = []
    assert ring.look_up(b"sk_gom_short") is None  # not what new_secret makes: never read for
    ring.look_up(new.encode()).addCallback(answers.append)
    ring.look_up(guessed.encode()).addCallback(answers.append)
    ring.look_up(new.encode()).addCallback(answers.append)
    assert len(keys.reads) == 1  # one read at a time: the two asked during it wait for the next
    keys.reads[0][1].callback([record])
    assert [a.id for a in answers] == ["key_1"] and len(keys.reads) == 2 and keys.reads[1][0] == 7.0 - 5.0
    keys.reads[1][1].callback([])
    assert [a.id if a else a for a in answers] == ["key_1", None, "key_1"]
    assert ring.find(new.encode()).id == "key_1"
    assert ring.look_up(guessed.encode()) is None  # the store did not know it: refused with no read
    assert len(keys.reads) == 2
    # made-up secrets asked while a read is under way share the next read
    made_up = [new_secret().encode() for _ in range(50)]
    for secret in made_up:
        ring.look_up(secret)
    assert len(keys.reads) == 3
    keys.reads[2][1].callback([])
    assert len(keys.reads) == 4  # the 49 asked during the read: one read more, begun after them
    keys.reads[3][1].callback([])
    assert len(keys.reads) == 4 and all(ring.look_up(secret) is None for secret in made_up)
    # a failed read cannot check the secret (StorageUnavailable: a 503), and remembers nothing: the next ask
    # reads again
    failing = new_secret().encode()
    ring.look_up(failing).addBoth(answers.append)
    keys.reads[4][1].errback(StorageUnavailable("The gateway's storage is unavailable (database is down)."))
    assert answers[-1].check(StorageUnavailable)
    ring.look_up(failing).addErrback(lambda _: None)
    assert len(keys.reads) == 6
    # a store that does not answer: the same after LOOKUP_TIMEOUT seconds, and the late answer is harmless
    keys.reads[5][1].callback([])
    slow = new_secret().encode()
    ring.look_up(slow).addBoth(answers.append)
    clock.advance(LOOKUP_TIMEOUT)
    assert answers[-1].check(StorageUnavailable) and not clock.getDelayedCalls()
    keys.reads[6][1].callback([])


# -- model allowlists ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_key_uses_and_lists_only_its_models(http, gw):
    key = await new_key(http, gw, models=["vllm/"])
    client = openai_client(gw, key["value"])
    try:
        await chat(client)
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await chat(client, OTHER)
        assert denied.value.code == "model_access_denied"
        listed = await in_thread(client.models.list)
        assert [m.id for m in listed.data] == [MODEL]
        with pytest.raises(openai.NotFoundError):
            await in_thread(client.models.retrieve, OTHER)
    finally:
        client.close()
    bare = await new_key(http, gw, models=[OTHER])
    client = openai_client(gw, bare["value"])
    try:
        await chat(client, OTHER)
        with pytest.raises(openai.PermissionDeniedError):
            await chat(client)
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_key_passes_through_only_to_providers_it_may_use(http, gw, two):
    """/p/{provider}/ checks no model: a key with models reaches a provider there only where it may use one
    of its models (before, a key of 'vllm/' reached every provider, and their keys, through /p/)."""
    body = json.dumps({"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 5}).encode()

    async def passthrough(key, provider):
        response = await http.post(f"{gw.url}/p/{provider}/v1/chat/completions", data=body, headers={
            "authorization": f"Bearer {key['value']}", "content-type": "application/json"})
        return response.code, json.loads(await treq.content(response))

    provider_key, model_key, bare_key, open_key = [
        await new_key(http, gw, models=models)
        for models in (["vllm/"], [OTHER], ["meta-llama/Llama-3.1-8B-Instruct"], None)]
    sent = [len(fake.forwarded()) for fake in two]
    for key, provider in ((provider_key, "openai-other"), (provider_key, "openai"), (model_key, "vllm")):
        code, error = await passthrough(key, provider)
        assert (code, error["error"]["code"]) == (403, "model_access_denied")
    assert [len(fake.forwarded()) for fake in two] == sent  # nothing went upstream
    for key, provider in ((provider_key, "vllm"), (model_key, "openai-other"), (bare_key, "vllm"),
                          (bare_key, "openai-other"), (open_key, "openai-other")):
        assert (await passthrough(key, provider))[0] == 200


@pytest_twisted.ensureDeferred
async def test_a_key_of_a_bare_model_uses_what_it_lists(http, gw):
    """A bare selector admits the model at whichever provider serves it: each id it lists works."""
    key = await new_key(http, gw, models=["meta-llama/Llama-3.1-8B-Instruct"])
    client = openai_client(gw, key["value"])
    try:
        listed = await in_thread(client.models.list)
        assert sorted(m.id for m in listed.data) == sorted([MODEL, OTHER])
        for model in (MODEL, OTHER):
            await in_thread(client.models.retrieve, model)
            await chat(client, model)
        answer = await in_thread(client.responses.create, model=MODEL, input="hi", max_output_tokens=5)
        assert answer.status == "completed"
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_provider_selector_never_matches_inside_a_models_own_id(http, gw):
    """'meta-llama/' names a provider (none here): it is no prefix of the id a model has at its provider,
    else a key of provider A would reach provider B's 'A/...' models."""
    key = await new_key(http, gw, models=["meta-llama/"])
    client = openai_client(gw, key["value"])
    try:
        assert (await in_thread(client.models.list)).data == []
        for model in (MODEL, OTHER):
            with pytest.raises(openai.PermissionDeniedError):
                await chat(client, model)
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_provider_selector_never_admits_the_bare_id_it_begins(reactor, http, tmp_path):
    """With one provider serving 'meta-llama/X', the bare id is routable; a key of 'meta-llama/' (a provider
    no one configured) still may not use it, by chat or by retrieving it, as it is not listed to it."""
    fake = await start_fake(reactor)
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                            "GOMODEL_DATA_DIR": str(tmp_path)})
    bare = MODEL.split("/", 1)[1]
    prefixed, provider = (await new_key(http, gateway, models=["meta-llama/"]),
                          await new_key(http, gateway, models=["vllm/"]))
    clients = [openai_client(gateway, key["value"]) for key in (prefixed, provider)]
    try:
        assert (await in_thread(clients[0].models.list)).data == []
        for model in (bare, MODEL):
            with pytest.raises(openai.PermissionDeniedError):
                await chat(clients[0], model)
        with pytest.raises(openai.NotFoundError):
            await in_thread(clients[0].models.retrieve, bare)
        # the provider's own selector admits the bare id it routes to
        assert (await chat(clients[1], bare)).choices
        assert (await in_thread(clients[1].models.retrieve, bare)).id == MODEL
    finally:
        for client in clients:
            client.close()
        await gateway.service.stopService()
        await fake.stop()


# -- tenants -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_files_batches_and_responses_belong_to_their_tenant(http, gw):
    alpha1 = await new_key(http, gw, user_path="/team/alpha")
    alpha2 = await new_key(http, gw, user_path="/team/alpha")
    beta = await new_key(http, gw)
    clients = {name: openai_client(gw, key["value"]) for name, key in
               (("alpha1", alpha1), ("alpha2", alpha2), ("beta", beta))}
    clients["master"] = openai_client(gw, MASTER)
    try:
        line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}}
        uploaded = await in_thread(clients["alpha1"].files.create,
                                   file=("in.jsonl", io.BytesIO(json.dumps(line).encode() + b"\n")), purpose="batch")
        # The team shares; another key neither sees nor reaches it; the master key sees all.
        assert (await in_thread(clients["alpha2"].files.retrieve, uploaded.id)).id == uploaded.id
        with pytest.raises(openai.NotFoundError):
            await in_thread(clients["beta"].files.retrieve, uploaded.id)
        with pytest.raises(openai.NotFoundError):
            await in_thread(clients["beta"].files.content, uploaded.id)
        with pytest.raises(openai.NotFoundError):
            await in_thread(clients["beta"].files.delete, uploaded.id)
        assert [f.id for f in (await in_thread(clients["beta"].files.list)).data] == []
        assert [f.id for f in (await in_thread(clients["master"].files.list)).data] == [uploaded.id]
        with pytest.raises(openai.NotFoundError):
            await in_thread(clients["beta"].batches.create, input_file_id=uploaded.id,
                            endpoint="/v1/chat/completions", completion_window="24h")

        batch = await in_thread(clients["alpha2"].batches.create, input_file_id=uploaded.id,
                                endpoint="/v1/chat/completions", completion_window="24h")
        await gw.service.batch_runner.settled(batch.id)
        done = await in_thread(clients["alpha1"].batches.retrieve, batch.id)
        assert done.status == "completed"
        assert (await in_thread(clients["alpha1"].files.retrieve, done.output_file_id)).id == done.output_file_id
        for call in (lambda: clients["beta"].batches.retrieve(batch.id),
                     lambda: clients["beta"].batches.cancel(batch.id),
                     lambda: clients["beta"].files.retrieve(done.output_file_id)):
            with pytest.raises(openai.NotFoundError):
                await in_thread(call)
        assert [b.id for b in (await in_thread(clients["beta"].batches.list)).data] == []
        assert [b.id for b in (await in_thread(clients["master"].batches.list)).data] == [batch.id]

        response = await in_thread(clients["alpha1"].responses.create, model=MODEL, input="hi")
        await gw.service.store.responses.get(response.id)  # queued behind the write: stored now
        assert (await in_thread(clients["alpha2"].responses.retrieve, response.id)).id == response.id
        with pytest.raises(openai.NotFoundError):
            await in_thread(clients["beta"].responses.retrieve, response.id)
        with pytest.raises(openai.NotFoundError):
            await in_thread(clients["beta"].responses.delete, response.id)
        with pytest.raises(openai.BadRequestError) as refused:  # nor continue another tenant's conversation
            await in_thread(clients["beta"].responses.create, model=MODEL, input="more",
                            previous_response_id=response.id)
        assert (refused.value.body["param"], refused.value.body["code"]) == ("previous_response_id",
                                                                             "previous_response_not_found")
        assert (await in_thread(clients["master"].responses.retrieve, response.id)).id == response.id
        # Nor one the gateway does not hold, which the upstream may still hold: not stored, or deleted.
        unstored = await in_thread(clients["alpha1"].responses.create, model=MODEL, input="hi", store=False)
        await in_thread(clients["alpha1"].responses.delete, response.id)
        for gone in (unstored.id, response.id):
            with pytest.raises(openai.BadRequestError) as refused:
                await in_thread(clients["beta"].responses.create, model=MODEL, input="more", previous_response_id=gone)
            assert refused.value.body["code"] == "previous_response_not_found"
    finally:
        for client in clients.values():
            client.close()


@pytest_twisted.ensureDeferred
async def test_another_tenants_response_is_not_reached_through_the_passthrough(http, gw, two):
    """C{/p/{provider}/v1/responses/{id}} (read, stream, cancel, delete, input items) and a passthrough's
    C{previous_response_id} refuse a managed key a response the gateway holds for another tenant, or deleted
    through it, as C{/v1/responses} does (before: relayed raw, another team read, cancelled and deleted it at its
    instance, and continued its conversation). Its own tenant's and the master key's still go."""
    alpha = await new_key(http, gw, user_path="/team/alpha")
    teammate = await new_key(http, gw, user_path="/team/alpha")
    beta = await new_key(http, gw)
    client = openai_client(gw, alpha["value"])
    try:
        response = await in_thread(client.responses.create, model=MODEL, input="secret plans")
        gone = await in_thread(client.responses.create, model=MODEL, input="more")
        await in_thread(client.responses.delete, gone.id)
    finally:
        client.close()
    await gw.service.store.responses.get(response.id)  # queued behind the write: stored now

    def send(key, method, path, body=None):
        return http.request(method, gw.url + path, data=None if body is None else json.dumps(body).encode(),
                            headers={"authorization": f"Bearer {key}", "content-type": "application/json"})

    sent = len(two[0].forwarded())
    for held in (response.id, gone.id):
        for prefix in ("/p/vllm/v1", "/p/vllm", "/p/vllm/V1"):
            for method, path in (("GET", f"/responses/{held}"), ("GET", f"/responses/{held}?stream=true"),
                                 ("POST", f"/responses/{held}/cancel"), ("DELETE", f"/responses/{held}"),
                                 ("GET", f"/responses/{held}/input_items"), ("GET", f"/responses%2F{held}")):
                answer = await send(beta["value"], method, prefix.rstrip("/") + path)
                body = json.loads(await treq.content(answer))
                assert answer.code == 404 and body["error"]["code"] == "response_not_found", (path, body)
        answer = await send(beta["value"], "POST", "/p/vllm/v1/responses", {
            "model": "meta-llama/Llama-3.1-8B-Instruct", "input": "and then?", "previous_response_id": held})
        body = json.loads(await treq.content(answer))
        assert answer.code == 400 and body["error"]["code"] == "previous_response_not_found", body
    assert len(two[0].forwarded()) == sent  # nothing reached the instance
    for key in (teammate["value"], MASTER):
        answer = await send(key, "GET", f"/p/vllm/v1/responses/{response.id}")
        assert answer.code == 200 and json.loads(await treq.content(answer))["id"] == response.id
        answer = await send(key, "POST", "/p/vllm/v1/responses", {
            "model": "meta-llama/Llama-3.1-8B-Instruct", "input": "and then?", "previous_response_id": response.id})
        assert answer.code == 200, await treq.content(answer)
        await treq.content(answer)


@pytest_twisted.ensureDeferred
async def test_a_root_user_path_is_no_path(http, gw):
    """A key given C{"user_path": ""}, C{"/"} or C{" // "} (what a form's empty field sends) has no user path, as
    the header's C{/} is none: a tenant of its own (before: every such key shared one tenant, C{path:/}, its
    files, batches and responses, and its C{GET /v1/usage} summed every key's usage, every team's)."""
    team = await new_key(http, gw, user_path="/team/secret")
    client = openai_client(gw, team["value"])
    try:
        await in_thread(client.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "hi"}])
    finally:
        client.close()
    made = []
    for given in ("", "/", " // "):
        key = await new_key(http, gw, user_path=given)
        assert key["user_path"] is None
        client = openai_client(gw, key["value"])
        try:
            uploaded = await in_thread(client.files.create, purpose="batch",
                                       file=("in.jsonl", io.BytesIO(b'{"custom_id": "a"}\n')))
            assert [f.id for f in (await in_thread(client.files.list)).data] == [uploaded.id]
            made.append(uploaded.id)
            answer = await http.get(gw.url + "/v1/usage", headers={"authorization": f"Bearer {key['value']}"})
            usage = json.loads(await treq.content(answer))
            assert usage["user_path"] is None and usage["usage"]["total_requests"] == 0, usage
        finally:
            client.close()
    code, patched = await admin(http, gw, "PATCH", f"{KEYS}/{team['id']}", {"user_path": "/"})
    assert code == 200 and patched["user_path"] is None


@pytest_twisted.ensureDeferred
async def test_a_key_given_a_user_path_keeps_what_it_made_alone_and_a_moved_key_leaves_its_teams(http, gw):
    """What a key without a user path made is the key's: given a path later, it still sees, lists and
    continues it (its new team does not); what it made in a team is the team's: moved to another path, or
    out of any, it sees none of it, its old team still does. (Before: a key given a path lost what it made
    alone to everyone but the master key.)"""
    solo = await new_key(http, gw)
    member = await new_key(http, gw, user_path="/team/alpha")
    teammate = await new_key(http, gw, user_path="/team/alpha")
    clients = {name: openai_client(gw, key["value"]) for name, key in
               (("solo", solo), ("member", member), ("teammate", teammate))}
    try:
        line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}}

        async def make(client):
            contents = io.BytesIO(json.dumps(line).encode() + b"\n")
            uploaded = await in_thread(client.files.create, file=("in.jsonl", contents), purpose="batch")
            batch = await in_thread(client.batches.create, input_file_id=uploaded.id,
                                    endpoint="/v1/chat/completions", completion_window="24h")
            await gw.service.batch_runner.settled(batch.id)
            response = await in_thread(client.responses.create, model=MODEL, input="hi")
            await gw.service.store.responses.get(response.id)  # queued behind the write: stored now
            return uploaded.id, batch.id, response.id

        async def sees(client, made):
            file_id, batch_id, response_id = made
            listed_files = [f.id for f in (await in_thread(client.files.list)).data]
            listed_batches = [b.id for b in (await in_thread(client.batches.list)).data]
            reached = []
            for call in (lambda: client.files.retrieve(file_id), lambda: client.batches.retrieve(batch_id),
                         lambda: client.responses.retrieve(response_id),
                         lambda: client.responses.create(model=MODEL, input="more", previous_response_id=response_id)):
                try:
                    await in_thread(call)
                    reached.append(True)
                except (openai.NotFoundError, openai.BadRequestError):
                    reached.append(False)
            return file_id in listed_files, batch_id in listed_batches, reached

        alone, in_team = await make(clients["solo"]), await make(clients["member"])
        for key, path in ((solo, "/team/alpha"), (member, "/team/beta")):
            code, _ = await admin(http, gw, "PATCH", f"{KEYS}/{key['id']}", {"user_path": path})
            assert code == 200
        assert await sees(clients["solo"], alone) == (True, True, [True] * 4)
        assert await sees(clients["teammate"], alone) == (False, False, [False] * 4)
        assert await sees(clients["member"], in_team) == (False, False, [False] * 4)
        assert await sees(clients["teammate"], in_team) == (True, True, [True] * 4)
        code, _ = await admin(http, gw, "PATCH", f"{KEYS}/{member['id']}", {"user_path": None})
        assert await sees(clients["member"], in_team) == (False, False, [False] * 4)
    finally:
        for client in clients.values():
            client.close()


# -- cache_salt and priority -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cache_salt_per_tenant_as_vllm_receives_it(http, gw, two):
    fake = two[0]
    alpha1 = await new_key(http, gw, user_path="/team/alpha")
    alpha2 = await new_key(http, gw, user_path="/team/alpha")
    beta = await new_key(http, gw)
    own = await new_key(http, gw, own_cache_salt=True)

    async def salt_of(secret, **extra):
        client = openai_client(gw, secret)
        try:
            await chat(client, extra_body=extra)
        finally:
            client.close()
        return fake.last_request().body.get("cache_salt", "-")

    first = await salt_of(beta["value"])
    assert len(first) == 32 and first == await salt_of(beta["value"])  # stable
    assert await salt_of(beta["value"], cache_salt="mine") == first  # a client's own is replaced
    team = await salt_of(alpha1["value"])
    assert team == await salt_of(alpha2["value"]) and team != first  # a team shares its cache
    assert await salt_of(own["value"], cache_salt="mine") == "mine"  # unless the key may choose
    assert await salt_of(MASTER) == "-"  # the master key's requests are left alone
    assert await salt_of(MASTER, cache_salt="x") == "x"
    other = openai_client(gw, beta["value"])
    try:  # an OpenAI-compatible provider that is not vLLM gets no cache_salt
        await chat(other, OTHER)
        assert "cache_salt" not in two[1].last_request().body
    finally:
        other.close()


@pytest_twisted.ensureDeferred
async def test_a_managed_keys_kv_transfer_params_never_reach_a_vllm(http, gw, two):
    """C{kv_transfer_params} (and C{ec_transfer_params}) tell a disaggregated vLLM which KV (encoder) cache blocks
    to read from which engine, every tenant's, past the tenant's C{cache_salt}; and a prefill answers with its
    engine's address. A managed key's are left out of what a vLLM gets, as its C{cache_salt} is replaced: on
    C{/v1}, through C{/p/} and on a batch's line (before, they went as they came). A key allowed its own
    C{cache_salt} and the master key get them as sent; an OpenAI provider never (it refuses parameters it does not
    know, L{gomodel.translate.openai_body})."""
    fake = two[0]
    beta = await new_key(http, gw)
    own = await new_key(http, gw, own_cache_salt=True)
    params = {"kv_transfer_params": {"do_remote_prefill": True, "remote_block_ids": [1, 2, 3],
                                     "remote_engine_id": "prefill-0", "remote_host": "10.0.0.9", "remote_port": 5600},
              "ec_transfer_params": {"do_remote_encode": True}}

    def sent(request):
        return {name: request.body.get(name) for name in params if name in request.body}

    client = openai_client(gw, beta["value"])
    try:
        await chat(client, extra_body=params)
        assert sent(fake.last_request()) == {}
        await in_thread(client.completions.create, model=MODEL, prompt="hi", max_tokens=5, extra_body=params)
        assert sent(fake.last_request()) == {}
        await in_thread(client.responses.create, model=MODEL, input="hi", extra_body=params)
        assert sent(fake.last_request()) == {}
        done = await batch_of(gw, client, "/v1/chat/completions",
                              [dict(params, model=MODEL, messages=[{"role": "user", "content": "hi"}])])
        assert done.request_counts.completed == 1 and sent(fake.last_request()) == {}
        await chat(client, OTHER, extra_body=params)  # (an OpenAI provider: vLLM's fields left out for any key)
        assert sent(two[1].last_request()) == {}
    finally:
        client.close()
    answer = await http.post(gw.url + "/p/vllm/v1/chat/completions", data=json.dumps(dict(
        params, model=MODEL.split("/", 1)[1], messages=[{"role": "user", "content": "hi"}])).encode(),
        headers={"authorization": f"Bearer {beta['value']}"})
    assert answer.code == 200 and sent(fake.last_request()) == {}
    await treq.content(answer)
    for secret in (own["value"], MASTER):
        client = openai_client(gw, secret)
        try:
            await chat(client, extra_body=params)
            assert sent(fake.last_request()) == params
        finally:
            client.close()


@pytest_twisted.ensureDeferred
async def test_responses_carry_the_tenants_cache_salt_and_the_priority_to_a_vllm(reactor, http, tmp_path):
    """vLLM's Responses API takes cache_salt and priority as its chat does: a managed key's Responses request
    (online, translated to a vLLM's chat, or a batch line) carries its tenant's salt and its priority; before,
    neither, so tenants shared vLLM's prefix cache through Responses. Another provider gets neither."""
    vllm, chat_only, other = [await start_fake(reactor, **options) for options in ({}, {"responses": False}, {})]
    gw = await start_gateway(reactor, {
        "VLLM_BASE_URL": vllm.base_url, "VLLM_PRIORITY_SCHEDULING": "true", "VLLM_OLD_BASE_URL": chat_only.base_url,
        "OPENAI_OTHER_BASE_URL": other.base_url, "OPENAI_OTHER_API_KEY": "sk-up", "GOMODEL_MASTER_KEY": MASTER,
        "GOMODEL_DATA_DIR": str(tmp_path)})
    key = await new_key(http, gw, priority=3)
    client = openai_client(gw, key["value"])

    def sent(fake, path=b"/v1/responses"):
        return [r for r in fake.requests if r.path == path][-1].body

    try:
        await in_thread(client.responses.create, model=MODEL, input="hi", extra_body={"cache_salt": "mine"})
        salt = sent(vllm)["cache_salt"]
        assert len(salt) == 32 and sent(vllm)["priority"] == 3
        await in_thread(client.responses.create, model="vllm-old/meta-llama/Llama-3.1-8B-Instruct", input="hi")
        assert sent(chat_only, b"/v1/chat/completions")["cache_salt"] == salt  # translated: the same tenant's
        assert "priority" not in sent(chat_only, b"/v1/chat/completions")  # (no priority scheduling there)
        await in_thread(client.responses.create, model=OTHER, input="hi")
        assert not {"cache_salt", "priority"} & set(sent(other))

        await one_line_batch(gw, client, "/v1/responses", {"model": MODEL, "input": "x"})
        assert sent(vllm)["input"] == "x" and sent(vllm)["cache_salt"] == salt
    finally:
        await stop_all(gw, vllm, chat_only, other, clients=(client,))


@pytest_twisted.ensureDeferred
async def test_a_follow_up_goes_to_the_conversations_instance_only_where_the_key_may_use_it(reactor, http, tmp_path):
    """A team's conversation made at vllm-b is continued by a teammate's key that may use only vllm: at vllm,
    with the stored conversation; before, at vllm-b, a provider outside that key's allowlist."""
    a, b = await start_fake(reactor), await start_fake(reactor)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": a.base_url, "VLLM_B_BASE_URL": b.base_url,
                                       "GOMODEL_MASTER_KEY": MASTER, "GOMODEL_DATA_DIR": str(tmp_path)})
    team = "/team/alpha"
    clients = [openai_client(gw, (await new_key(http, gw, user_path=team, models=[models]))["value"])
               for models in ("vllm-b/", "vllm/")]
    try:
        made = await in_thread(clients[0].responses.create, model="vllm-b/meta-llama/Llama-3.1-8B-Instruct",
                               input="my name is Ada")
        await gw.service.store.responses.get(made.id)  # (written)
        asked = len(b.forwarded())
        await in_thread(clients[1].responses.create, model=MODEL, input="who am I?", previous_response_id=made.id)
        assert len(b.forwarded()) == asked
        [sent] = [r.body for r in a.requests if r.path == b"/v1/responses"]  # (not asked for an id it cannot know)
        assert [item["content"] for item in sent["input"]] == ["my name is Ada", "héhéhé", "who am I?"]
    finally:
        await stop_all(gw, a, b, clients=clients)


@pytest_twisted.ensureDeferred
async def test_pooling_requests_carry_the_tenants_cache_salt_and_the_priority_to_a_vllm(http, mixed):
    """vLLM's pooling requests (embeddings, rerank, score, classify) take cache_salt and priority as its
    generation does: a managed key's carry its tenant's salt and its priority, batch lines too; before,
    neither. A provider that is not vLLM gets neither."""
    gw, vllm, other = await mixed({"VLLM_PRIORITY_SCHEDULING": "true"})
    key = await new_key(http, gw, priority=2)
    auth = {"authorization": ["Bearer " + key["value"]], "content-type": ["application/json"]}
    bodies = {"/v1/embeddings": {"input": "a"}, "/v1/rerank": {"query": "q", "documents": ["a", "b"]},
              "/v1/score": {"text_1": "a", "text_2": "b"}, "/v1/classify": {"input": "a"},
              # vLLM's own paths at its root, routed as their /v1 forms
              "/rerank": {"query": "q", "documents": ["a"]}, "/v2/rerank": {"query": "q", "documents": ["a"]},
              "/score": {"text_1": "a", "text_2": "b"}, "/classify": {"input": "a"}, "/pooling": {"input": "a"},
              "/v2/embed": {"texts": ["a"], "embedding_types": ["float"]}}
    for path, body in bodies.items():
        response = await http.post(gw.url + path, data=json.dumps(dict(body, model=MODEL)).encode(), headers=auth)
        assert response.code == 200, (path, await treq.content(response))
        await treq.content(response)
        sent = vllm.last_request().body
        assert len(sent["cache_salt"]) == 32 and sent["priority"] == 2, path
    response = await http.post(gw.url + "/v1/embeddings", headers=auth,
                               data=json.dumps({"input": "a", "model": OTHER}).encode())
    assert response.code == 200 and not {"cache_salt", "priority"} & set(other.last_request().body)
    await treq.content(response)

    client = openai_client(gw, key["value"])
    try:
        await one_line_batch(gw, client, "/v1/embeddings", {"model": MODEL, "input": "x"})
    finally:
        client.close()
    sent = vllm.last_request().body
    assert sent["input"] == "x" and len(sent["cache_salt"]) == 32 and sent["priority"] == 2


@pytest_twisted.ensureDeferred
async def test_a_messages_cache_salt_translated_for_a_vllm_is_kept_as_on_chat(http, mixed):
    """A Messages request translated to a vLLM's chat (one without the Messages API) carries the client's own
    cache_salt where its key may choose one, and the master key's, as natively; before, it was dropped and
    the key got its tenant's salt. Another key's is replaced; a provider that is not vLLM gets none."""
    import anthropic

    gw, vllm, other = await mixed(messages=False)
    own, theirs = (await new_key(http, gw, own_cache_salt=True))["value"], (await new_key(http, gw))["value"]

    async def salt_of(secret, model=MODEL, fake=vllm):
        client = anthropic.Anthropic(base_url=gw.url, api_key=secret, max_retries=0, timeout=10)
        try:
            await in_thread(client.messages.create, model=model, max_tokens=8, extra_body={"cache_salt": "mine"},
                            messages=[{"role": "user", "content": "hi"}])
        finally:
            client.close()
        [sent] = [r for r in fake.requests if r.path == b"/v1/chat/completions"][-1:]
        return sent.body.get("cache_salt", "-")

    assert await salt_of(own) == "mine"
    assert await salt_of(MASTER) == "mine"
    assert len(await salt_of(theirs)) == 32 and await salt_of(theirs) != "mine"
    assert await salt_of(own, OTHER, other) == "-"


@pytest_twisted.ensureDeferred
async def test_a_fallback_gets_what_its_own_provider_takes(reactor, http, tmp_path):
    """A fallback of another provider type is sent its own provider's fields, not the first target's: a vLLM
    (scheduling by priority) gets the key's cache_salt and priority, an OpenAI-compatible one neither; a
    translated Messages request's vLLM fields (top_k, thinking's chat_template_kwargs, past thinking) too."""
    import anthropic

    vllm, other = await start_fake(reactor, messages=False), await start_fake(reactor)
    bare = "meta-llama/Llama-3.1-8B-Instruct"
    rules = {f"vllm/{bare}": [f"openai-other/{bare}"], f"openai-other/{bare}": [f"vllm/{bare}"]}
    gw = await start_gateway(reactor, {
        "VLLM_BASE_URL": vllm.base_url, "VLLM_PRIORITY_SCHEDULING": "true", "OPENAI_OTHER_BASE_URL": other.base_url,
        "OPENAI_OTHER_API_KEY": "sk-up", "FAILOVER_RULES_JSON": json.dumps(rules), "REPLICA_FAILURE_THRESHOLD": "100",
        "GOMODEL_MASTER_KEY": MASTER, "GOMODEL_DATA_DIR": str(tmp_path)})
    key = (await new_key(http, gw, priority=4))["value"]
    client = openai_client(gw, key)
    messages = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=10)
    thinking = [{"role": "user", "content": "Hi."},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                                  {"type": "text", "text": "Hello."}]},
                {"role": "user", "content": "Again."}]
    vllm_only = ("cache_salt", "priority", "top_k", "chat_template_kwargs")

    def chats(fake):
        return [r for r in fake.requests if r.path == b"/v1/chat/completions"]

    try:
        vllm.steer = {"fake_status": 503}  # the vLLM fails: its fallback answers
        await chat(client, MODEL)
        await in_thread(messages.messages.create, model=MODEL, max_tokens=2000, messages=thinking, extra_body={"top_k": 5},
                        thinking={"type": "enabled", "budget_tokens": 1024})
        for sent in chats(other)[-2:]:
            assert not set(vllm_only) & set(sent.body), sent.body
            assert all("reasoning_content" not in message for message in sent.body["messages"])
        assert [r.body.get("priority") for r in chats(vllm)] == [4, 4]  # (the first target's own)

        vllm.steer, other.steer = {}, {"fake_status": 503}  # the other way round
        await chat(client, OTHER)
        await in_thread(messages.messages.create, model=OTHER, max_tokens=2000, messages=thinking, extra_body={"top_k": 5},
                        thinking={"type": "enabled", "budget_tokens": 1024})
        first, second = chats(vllm)[-2:]
        for sent in (first, second):
            assert sent.body["priority"] == 4 and len(sent.body["cache_salt"]) == 32, sent.body
        assert second.body["top_k"] == 5 and second.body["chat_template_kwargs"] == {"enable_thinking": True}
        assert second.body["messages"][1]["reasoning_content"] == "hm"
        assert len(chats(other)) == 4 and not set(vllm_only) & set(chats(other)[-1].body)
    finally:
        client.close()
        messages.close()
        await gw.service.stopService()
        await vllm.stop()
        await other.stop()


@pytest_twisted.ensureDeferred
async def test_batch_lines_fall_back_with_what_their_own_provider_takes(reactor, http, tmp_path):
    """A batch line falls back as an online request does: while its model's first target (a vLLM scheduling by
    priority) answers 503, every line is answered by the failover candidate (an OpenAI-compatible provider),
    which gets neither the key's cache_salt nor its priority, and the usage records name the provider that
    answered. Before, each line was retried at the vLLM only, and ended in the error file."""
    vllm, other = await start_fake(reactor), await start_fake(reactor)
    gw = await start_gateway(reactor, {
        "VLLM_BASE_URL": vllm.base_url, "VLLM_PRIORITY_SCHEDULING": "true", "OPENAI_OTHER_BASE_URL": other.base_url,
        "OPENAI_OTHER_API_KEY": "sk-up", "FAILOVER_RULES_JSON": json.dumps({MODEL: [OTHER]}),
        "REPLICA_FAILURE_THRESHOLD": "100", "BATCH_MAX_ATTEMPTS": "1", "GOMODEL_MASTER_KEY": MASTER,
        "GOMODEL_DATA_DIR": str(tmp_path)})
    key = await new_key(http, gw, priority=4)
    client = openai_client(gw, key["value"])
    bare = MODEL[len("vllm/"):]

    def chats(fake):
        return [r for r in fake.requests if r.path == b"/v1/chat/completions"]

    try:
        vllm.steer = {"fake_status": 503}
        bodies = [{"model": MODEL, "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 5}
                  for i in range(3)]
        batch = await batch_of(gw, client, "/v1/chat/completions", bodies)
        assert batch.status == "completed"
        assert batch.request_counts.model_dump() == {"total": 3, "completed": 3, "failed": 0}
        output = [json.loads(line) for line in
                  (await in_thread(client.files.content, batch.output_file_id)).content.splitlines()]
        assert sorted(line["custom_id"] for line in output) == ["0", "1", "2"]
        assert all(line["response"]["status_code"] == 200 for line in output)

        assert sorted(r.body["messages"][0]["content"] for r in chats(other)) == ["hi 0", "hi 1", "hi 2"]
        for sent in chats(other):
            assert sent.body["model"] == bare and not {"cache_salt", "priority"} & set(sent.body), sent.body
        assert len(chats(vllm)) == 3  # tried first, with its own fields
        for sent in chats(vllm):
            assert sent.body["priority"] == 4 and len(sent.body["cache_salt"]) == 32, sent.body

        await gw.service.usage.flush()
        code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
        assert code == 200
        records = [r for r in log["data"] if r["request_id"].startswith(batch.id)]
        assert len(records) == 3
        for record in records:
            assert (record["provider_name"], record["provider"], record["model"], record["status_code"],
                    record["auth_key_id"]) == ("openai-other", "openai", OTHER, 200, key["id"]), record
    finally:
        await stop_all(gw, vllm, other, clients=(client,))


@pytest_twisted.ensureDeferred
async def test_a_batch_responses_follow_up_stays_at_its_target(mixed):
    """A Responses line that continues a response is not sent to a fallback, which does not hold the
    conversation (it would refuse it for good): it is retried at its own target; a new one falls back."""
    gw, vllm, other = await mixed({"FAILOVER_RULES_JSON": json.dumps({MODEL: [OTHER]}),
                                   "REPLICA_FAILURE_THRESHOLD": "100", "BATCH_MAX_ATTEMPTS": "1"})
    client = openai_client(gw, MASTER)
    try:
        vllm.steer = {"fake_status": 503}
        bodies = [{"model": MODEL, "input": "Hi"},
                  {"model": MODEL, "input": "Again", "previous_response_id": "resp_abc"}]
        batch = await batch_of(gw, client, "/v1/responses", bodies)
        assert batch.request_counts.model_dump() == {"total": 2, "completed": 1, "failed": 1}
        [error] = [json.loads(line) for line in
                   (await in_thread(client.files.content, batch.error_file_id)).content.splitlines()]
        assert (error["custom_id"], error["response"]["status_code"]) == ("1", 503)
        assert [r.body["input"] for r in other.requests if r.path == b"/v1/responses"] == ["Hi"]
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_messages_request_with_a_priority_reaches_a_priority_scheduling_vllm_translated(http, mixed):
    """vLLM's Messages API has no priority (its own translation to chat drops it): a key's priority, or
    X-Request-Priority, reaches a vLLM that schedules by priority through gomodel's translation to its chat;
    before, natively, without it. A request without one stays native."""
    import anthropic

    gw, vllm, other = await mixed({"VLLM_PRIORITY_SCHEDULING": "true"})
    key = (await new_key(http, gw, priority=3))["value"]

    async def ask(secret, **headers):
        client = anthropic.Anthropic(base_url=gw.url, api_key=secret, max_retries=0, timeout=10)
        try:
            message = await in_thread(client.messages.create, model=MODEL, max_tokens=8, extra_headers=headers,
                                      messages=[{"role": "user", "content": "hi"}])
        finally:
            client.close()
        assert message.content[0].text == "héhéhé"
        return vllm.last_request()

    sent = await ask(key)
    assert sent.path == b"/v1/chat/completions" and sent.body["priority"] == 3
    sent = await ask(MASTER, **{"X-Request-Priority": "-7"})
    assert sent.path == b"/v1/chat/completions" and sent.body["priority"] == -7
    assert (await ask(MASTER)).path == b"/v1/messages"  # (nothing to carry: natively, byte for byte)


@pytest_twisted.ensureDeferred
async def test_a_key_without_a_priority_cannot_outrank_the_default(http, mixed):
    """A managed key the operator gave no priority runs at vLLM's default, 0 (lower is sooner): its client may
    lower its requests' priority (X-Request-Priority, the body's own C{priority}) but not raise it past 0; before,
    X-Request-Priority: -100 or a body's C{"priority": -100} put its requests ahead of every key the operator
    gave a priority, on chat, Responses, batch lines and the passthrough. The master key's pass as given."""
    gw, vllm, other = await mixed({"VLLM_PRIORITY_SCHEDULING": "true"})
    client, master = openai_client(gw, (await new_key(http, gw))["value"]), openai_client(gw, MASTER)

    def sent(path=b"/v1/chat/completions"):
        return [r for r in vllm.requests if r.path == path][-1].body

    try:
        await chat(client, extra_headers={"X-Request-Priority": "-100"})
        assert sent()["priority"] == 0
        await chat(client, extra_body={"priority": -100})
        assert sent()["priority"] == 0
        await chat(client, extra_body={"priority": -100}, extra_headers={"X-Request-Priority": "7"})
        assert sent()["priority"] == 7  # (lowered: taken as asked)
        await chat(client, extra_body={"priority": 9})
        assert sent()["priority"] == 9
        await chat(client)
        assert "priority" not in sent()
        with pytest.raises(openai.BadRequestError) as refused:  # (vLLM reads "-100" as -100)
            await chat(client, extra_body={"priority": "-100"})
        assert refused.value.code == "invalid_priority" and refused.value.param == "priority"
        await in_thread(client.responses.create, model=MODEL, input="hi", extra_body={"priority": -3})
        assert sent(b"/v1/responses")["priority"] == 0
        await one_line_batch(gw, client, "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "x"}], "priority": -50})
        assert sent()["priority"] == 0
        await in_thread(client.post, f"{gw.url}/p/vllm/v1/chat/completions", cast_to=object, body={
            "model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hi"}],
            "priority": -100})
        assert sent()["priority"] == 0
        await chat(master, extra_headers={"X-Request-Priority": "-100"})
        assert sent()["priority"] == -100
        await chat(master, extra_body={"priority": -100})
        assert sent()["priority"] == -100
    finally:
        client.close()
        master.close()


@pytest_twisted.ensureDeferred
async def test_a_bad_priority_header_is_refused_whichever_target_answers(mixed):
    """A malformed X-Request-Priority is refused when a fallback would take it, also while the first target
    (which does not) is up: before, the answer was 200 or 400 depending on the first target's health."""
    import anthropic

    rules = json.dumps({OTHER: [MODEL]})
    gw, vllm, other = await mixed({"VLLM_PRIORITY_SCHEDULING": "true", "FAILOVER_RULES_JSON": rules}, messages=False)
    client = openai_client(gw, MASTER)
    messages = anthropic.Anthropic(base_url=gw.url, api_key=MASTER, max_retries=0, timeout=10)
    try:
        for healthy in (True, False):
            other.steer = {} if healthy else {"fake_status": 503}
            with pytest.raises(openai.BadRequestError) as refused:
                await chat(client, OTHER, extra_headers={"X-Request-Priority": "high"})
            assert refused.value.code == "invalid_priority"
            with pytest.raises(anthropic.BadRequestError):
                await in_thread(messages.messages.create, model=OTHER, max_tokens=8, extra_headers={
                    "X-Request-Priority": "high"}, messages=[{"role": "user", "content": "hi"}])
        assert not [r for r in vllm.requests if r.method == b"POST"]
        await chat(client, OTHER, extra_headers={"X-Request-Priority": "3"})  # (the first target down)
        assert vllm.last_request().body["priority"] == 3
    finally:
        client.close()
        messages.close()


@pytest_twisted.ensureDeferred
async def test_a_keys_bad_body_priority_is_refused_whichever_target_answers(http, mixed):
    """A managed key's body C{priority} that is no integer is refused where a fallback schedules by priority, also
    while the first target (which does not) is up: before, the answer was 200 (the first target up) or the 400
    once the first had failed (its fallback's body made), on chat and Responses alike."""
    rules = json.dumps({OTHER: [MODEL]})
    gw, vllm, other = await mixed({"VLLM_PRIORITY_SCHEDULING": "true", "FAILOVER_RULES_JSON": rules})
    client = openai_client(gw, (await new_key(http, gw))["value"])
    try:
        for healthy in (True, False):
            other.steer = {} if healthy else {"fake_status": 503}
            with pytest.raises(openai.BadRequestError) as refused:
                await chat(client, OTHER, extra_body={"priority": "high"})
            assert refused.value.code == "invalid_priority", healthy
            with pytest.raises(openai.BadRequestError) as refused:
                await in_thread(client.responses.create, model=OTHER, input="hi", extra_body={"priority": "high"})
            assert refused.value.code == "invalid_priority", healthy
        assert not [r for r in vllm.requests if r.method == b"POST"]
        await chat(client, OTHER, extra_body={"priority": 3})  # (the first target down)
        assert vllm.last_request().body["priority"] == 3
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_cache_salt_mode_off(reactor, http, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                       "CACHE_SALT_MODE": "off"})
    try:
        key = await new_key(http, gw)
        client = openai_client(gw, key["value"])
        try:
            await chat(client)
        finally:
            client.close()
        assert "cache_salt" not in fake.last_request().body
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_key_priority_goes_upstream_only_where_priority_scheduling_is_on(reactor, http, two):
    first, second = two
    gw = await start_gateway(reactor, {
        "VLLM_BASE_URL": first.base_url, "VLLM_PRIORITY_SCHEDULING": "true", "VLLM_OTHER_BASE_URL": second.base_url,
        "GOMODEL_MASTER_KEY": MASTER})
    try:
        key = await new_key(http, gw, priority=-5)
        client = openai_client(gw, key["value"])
        try:
            await chat(client, extra_headers={"X-Request-Priority": "-100"})  # the key's wins
            assert first.last_request().body["priority"] == -5
            await chat(client, "vllm-other/meta-llama/Llama-3.1-8B-Instruct")
            assert "priority" not in second.last_request().body
        finally:
            client.close()
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_passthrough_to_a_vllm_carries_the_keys_cache_salt_and_priority(reactor, http, two):
    """Issue 14: "for vLLM providers, requests made with a managed key carry a cache_salt" and a key's priority
    "cannot be given another by its client". A passthrough (C{/p/vllm/...}) is such a request: before, its body
    went raw, so two tenants passing through shared vLLM's prefix cache (one could time the other's prompts)
    and a key could claim any priority. Now its JSON body gets the tenant's salt and the key's priority as on
    C{/v1}; the master key's passes as it is, and a provider that is not vLLM gets neither."""
    first, second = two
    gw = await start_gateway(reactor, {
        "VLLM_BASE_URL": first.base_url, "VLLM_PRIORITY_SCHEDULING": "true", "OPENAI_OTHER_BASE_URL": second.base_url,
        "OPENAI_OTHER_API_KEY": "sk-up", "GOMODEL_MASTER_KEY": MASTER})
    try:
        alpha = await new_key(http, gw, user_path="/team/alpha", priority=4)
        beta = await new_key(http, gw)
        own = await new_key(http, gw, own_cache_salt=True)
        clients = [openai_client(gw, key["value"]) for key in (alpha, beta, own)]

        async def sent(client, endpoint="chat/completions", provider="vllm", fake=first, **extra):
            url = f"{gw.url}/p/{provider}/v1/{endpoint}"  # (absolute: the SDK sends it as it is)
            body = dict({"model": "meta-llama/Llama-3.1-8B-Instruct", "max_tokens": 5}, **extra)
            body.update({"messages": [{"role": "user", "content": "hi"}]} if endpoint == "chat/completions"
                        else {"prompt": "hi"} if endpoint == "completions" else {"input": "hi"})
            await in_thread(client.post, url, body=body, cast_to=object)
            return fake.last_request().body

        try:
            salted = await sent(clients[0], cache_salt="mine", priority=-100)
            assert len(salted["cache_salt"]) == 32 and salted["priority"] == 4
            assert salted["messages"] == [{"role": "user", "content": "hi"}]  # the rest as sent
            # the same tenant's salt as on /v1, on every model-routed endpoint
            await chat(clients[0])
            assert first.last_request().body["cache_salt"] == salted["cache_salt"]
            for endpoint in ("completions", "embeddings"):
                assert (await sent(clients[0], endpoint))["cache_salt"] == salted["cache_salt"]
            other = await sent(clients[1], cache_salt="mine")
            assert len(other["cache_salt"]) == 32 and other["cache_salt"] != salted["cache_salt"]
            assert (await sent(clients[2], cache_salt="mine"))["cache_salt"] == "mine"  # the key may choose
            master = openai_client(gw, MASTER)
            try:  # the master key's passes raw
                assert "cache_salt" not in await sent(master)
                assert (await sent(master, cache_salt="x", priority=7))["cache_salt"] == "x"
            finally:
                master.close()
            untouched = await sent(clients[0], provider="openai-other", fake=second)  # not a vLLM
            assert "cache_salt" not in untouched and "priority" not in untouched
        finally:
            for client in clients:
                client.close()
    finally:
        await gw.service.stopService()


async def _keyed_passthrough(reactor, http, upstream):
    """A gateway in front of C{upstream} with priority scheduling, and a managed key of priority 4 (its secret)."""
    gw = await start_gateway(reactor, {
        "VLLM_BASE_URL": upstream.base_url, "VLLM_PRIORITY_SCHEDULING": "true", "GOMODEL_MASTER_KEY": MASTER})
    return gw, (await new_key(http, gw, priority=4))["value"]


@pytest.mark.parametrize("route", ["v1/systemone", "inference/v1/generate"])
@pytest_twisted.ensureDeferred
async def test_vllm_032s_decisions_and_token_generation_carry_the_keys_cache_salt_and_priority(reactor, http, two,
                                                                                                 route):
    """vLLM 0.32's structured decisions and (with --enable-scale-out) token-in generation take a C{cache_salt} and a
    C{priority}, as its batched chat and generative scoring do (below): a managed key's went raw through the
    passthrough, so it chose its own priority and shared other tenants' prefix cache; it gets the key's now."""
    first, _ = two
    gw, key = await _keyed_passthrough(reactor, http, first)
    try:
        body = {"model": "meta-llama/Llama-3.1-8B-Instruct", "priority": -9, "cache_salt": "mine", "texts": ["hi"]}
        response = await http.post(f"{gw.url}/p/vllm/{route}", data=json.dumps(body).encode(), headers={
            "authorization": f"Bearer {key}", "content-type": "application/json"})
        await treq.content(response)
        sent = first.last_request()
        assert sent.path.endswith(b"/" + route.removeprefix("v1/").encode()), sent.path
        assert sent.body["priority"] == 4 and len(sent.body["cache_salt"]) == 32, sent.body
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_passthrough_to_vllms_sagemaker_route_carries_the_keys_cache_salt_and_priority(reactor, http, two):
    """vLLM's C{/invocations} (SageMaker's) serves a chat body as chat completions: a managed key's went raw, so it
    chose its own priority and shared other tenants' prefix cache; it gets the key's now, as C{chat/completions}."""
    first, second = two
    gw, key = await _keyed_passthrough(reactor, http, first)
    try:
        body = {"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hi"}],
                "priority": -9, "cache_salt": "mine"}
        response = await http.post(gw.url + "/p/vllm/invocations", data=json.dumps(body).encode(), headers={
            "authorization": f"Bearer {key}", "content-type": "application/json"})
        await treq.content(response)
        sent = first.last_request()
        assert sent.path == b"/invocations"
        assert sent.body["priority"] == 4 and len(sent.body["cache_salt"]) == 32, sent.body
    finally:
        await gw.service.stopService()

@pytest.mark.parametrize("endpoint, body", [
    ("v1/chat/completions/batch", {"messages": [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]],
                                   "max_tokens": 2}),
    ("generative_scoring", {"query": "Is it?", "items": ["yes", "no"], "label_token_ids": [5, 6]}),
    ("v2/embed", {"texts": ["hi"], "input_type": "search_document"}),
])
@pytest_twisted.ensureDeferred
async def test_a_passthrough_to_vllms_other_generating_routes_carries_the_keys_cache_salt_and_priority(
        reactor, http, two, endpoint, body):
    """vLLM 0.32 serves more model-routed routes than the OpenAI ones, by default, and each takes a C{cache_salt} and
    a C{priority}: C{/v1/chat/completions/batch} (several conversations at once), C{/generative_scoring} and
    Cohere's C{/v2/embed}. A managed key's body to them went raw, so it chose its own priority (ahead of every
    other tenant's) and shared other tenants' prefix cache; it gets its tenant's salt and its key's priority now."""
    first, second = two
    gw, key = await _keyed_passthrough(reactor, http, first)
    try:
        sent = dict(body, model="meta-llama/Llama-3.1-8B-Instruct", priority=-9, cache_salt="mine")
        response = await http.post(f"{gw.url}/p/vllm/{endpoint}", data=json.dumps(sent).encode(), headers={
            "authorization": f"Bearer {key}", "content-type": "application/json"})
        answer = json.loads(await treq.content(response))
        assert response.code == 200, answer
        upstream = first.last_request()
        assert upstream.path == b"/" + endpoint.encode()
        assert upstream.body["priority"] == 4 and len(upstream.body["cache_salt"]) == 32, upstream.body
        assert {k: upstream.body[k] for k in body} == body  # the rest as sent
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_cohere_embeds_max_tokens_is_no_output_a_keys_tpm_reserves(http, gw, two):
    """Cohere's C{/v2/embed} C{max_tokens} caps each input's tokens (its truncation), it asks for no output: a key's
    C{tpm} reserved it as output all the same, so a key of C{tpm} 1000 was refused a one-word embedding capped at 8192
    tokens as larger than its limit (429, C{x-should-retry: false}). It reserves the request's text now."""
    first, _ = two
    key = await new_key(http, gw, tpm=1000)
    body = {"model": MODEL, "texts": ["hi"], "input_type": "search_document", "max_tokens": 8192, "truncate": "END"}
    for path in ("/v2/embed", "/p/vllm/v2/embed"):
        sent = dict(body, model=MODEL.partition("/")[2]) if path.startswith("/p/") else body
        response = await http.post(gw.url + path, data=json.dumps(sent).encode(), headers={
            "authorization": f"Bearer {key['value']}", "content-type": "application/json"})
        answer = json.loads(await treq.content(response))
        assert response.code == 200, (path, answer)
        assert first.last_request().body["max_tokens"] == 8192  # (sent on as it came)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8192}
    response = await http.post(gw.url + "/v1/chat/completions", data=json.dumps(chat).encode(), headers={
        "authorization": f"Bearer {key['value']}", "content-type": "application/json"})
    assert response.code == 429 and "Request too large" in (await treq.content(response)).decode()  # (output)


@pytest_twisted.ensureDeferred
async def test_a_passthrough_to_vllms_cohere_chat_carries_the_keys_priority(reactor, http, two):
    """vLLM 0.32's Cohere chat (C{/cohere/v2/chat}, served with VLLM_ENABLE_COHERE_API) takes a C{priority} but no
    C{cache_salt}: a managed key's body went raw, so it chose its own priority, ahead of every other tenant's. It
    gets its key's priority now, and no salt (vLLM would ignore it); the master key's passes as it is."""
    first, second = two
    gw, key = await _keyed_passthrough(reactor, http, first)
    try:
        body = {"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hi"}],
                "priority": -9}
        for secret, priority in ((key, 4), (MASTER, -9)):
            response = await http.post(gw.url + "/p/vllm/cohere/v2/chat", data=json.dumps(body).encode(), headers={
                "authorization": f"Bearer {secret}", "content-type": "application/json"})
            await treq.content(response)
            sent = first.last_request()
            assert sent.path == b"/cohere/v2/chat"
            assert sent.body == dict(body, priority=priority), sent.body
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_passthrough_body_the_gateway_cannot_read_never_reaches_a_vllm_without_the_keys_salt(reactor, http,
                                                                                                    two):
    """A managed key's body to a vLLM's model-routed route gets its salt and priority only where the gateway reads
    it: one that vLLM's parser (Python's json) reads but the gateway's does not (a UTF-8 BOM before it, a NaN, UTF-16)
    went raw, so the key chose its own priority and shared other tenants' prefix cache. It is refused now (400
    invalid_json, as on /v1); the master key's passes raw, and so does a key's to a route that takes no salt."""
    first, second = two
    gw, key = await _keyed_passthrough(reactor, http, first)
    try:
        body = b'{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"user","content":"hi"}],"priority":-9'
        before = len(first.forwarded())
        for unread in (b"\xef\xbb\xbf" + body + b"}", body + b',"x":NaN}', (body + b"}").decode().encode("utf-16")):
            response = await http.post(gw.url + "/p/vllm/v1/chat/completions", data=unread, headers={
                "authorization": f"Bearer {key}", "content-type": "application/json"})
            answer = json.loads(await treq.content(response))
            assert response.code == 400 and answer["error"]["code"] == "invalid_json", answer
            assert ("not UTF-8 (byte 0 is 0xff)" in answer["error"]["message"]) == unread.startswith(b"\xff"), answer
        # (a responses body is read first for whose conversation it continues: refused with the same words)
        response = await http.post(gw.url + "/p/vllm/v1/responses", data=b'{"input":"hi"}'.decode().encode("utf-16"),
                                   headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
        answer = json.loads(await treq.content(response))
        assert response.code == 400 and answer["error"]["code"] == "invalid_json", answer
        assert "not UTF-8 (byte 0 is 0xff)" in answer["error"]["message"], answer
        assert len(first.forwarded()) == before  # none reached the vLLM
        response = await http.post(gw.url + "/p/vllm/v1/chat/completions", data=body + b',"x":NaN}', headers={
            "authorization": f"Bearer {MASTER}", "content-type": "application/json"})
        await treq.content(response)
        assert first.last_request().raw_body == body + b',"x":NaN}'  # the master key's, raw
        response = await http.post(gw.url + "/p/vllm/tokenize", data=b"\xef\xbb\xbf{}", headers={
            "authorization": f"Bearer {key}", "content-type": "application/json"})
        await treq.content(response)
        assert first.last_request().raw_body == b"\xef\xbb\xbf{}"  # (no salt there: raw)
    finally:
        await gw.service.stopService()

@pytest_twisted.ensureDeferred
async def test_usage_records_name_the_key_and_its_user_path(http, gw):
    key = await new_key(http, gw, user_path="/team/alpha")
    client = openai_client(gw, key["value"])
    try:
        await chat(client)
    finally:
        client.close()
    await gw.service.usage.flush()
    code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
    assert code == 200
    record = log["data"][0]
    assert (record["auth_key_id"], record["user_path"]) == (key["id"], "/team/alpha")
    assert key["value"] not in json.dumps(log)
    master = openai_client(gw, MASTER)
    try:
        await chat(master)
    finally:
        master.close()
    await gw.service.usage.flush()
    code, by_key = await admin(http, gw, "GET", "/admin/api/v1/usage/keys")
    assert {row["auth_key_id"]: row["requests"] for row in by_key["data"]} == {None: 1, key["id"]: 1}
    code, by_path = await admin(http, gw, "GET", "/admin/api/v1/usage/user-paths")
    assert {row["user_path"]: row["requests"] for row in by_path["data"]} == {None: 1, "/team/alpha": 1}
    for query, count in ((f"key={key['id']}", 1), ("user_path=/team", 1), ("user_path=/team/alpha", 1),
                         ("user_path=/tea", 0), ("user_path=/team/alpha/x", 0)):
        code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log?" + query)
        assert len(log["data"]) == count, query


@pytest_twisted.ensureDeferred
async def test_the_gateways_own_refusals_of_a_key_are_counted_in_its_usage(http, gw):
    """A request the gateway refused itself with a 429 (a key's rpm, its budget) never reached an upstream, yet
    it is the key's: it is a usage record of 0 tokens, status 429 and outcome C{refused}, under the key, the
    provider and model it was routed to, counted in the summary's, the key's and the overview's requests and
    errors (C{refused}, their kind) and found by C{outcome=refused} (before, no record: an operator saw a key
    quiet in its usage while its clients were refused)."""
    limited = await new_key(http, gw, name="limited", rpm=1, user_path="/team/a")
    spent = await new_key(http, gw, name="spent", budgets=[{"period": "daily", "max_tokens": 1}])
    for key, code in ((limited, "rate_limit_exceeded"), (spent, "budget_exceeded")):
        client = openai_client(gw, key["value"])
        try:
            await chat(client)
            with pytest.raises(openai.RateLimitError) as refused:
                await chat(client)
            assert refused.value.code == code
        finally:
            client.close()
    await gw.service.usage.flush()
    records, _ = await gw.service.store.usage.log(0, 2e9, 100, filters={"outcome": "refused"})
    assert sorted((r["auth_key_id"], r["status_code"], r["total_tokens"], r["input_tokens"], r["provider_name"],
                   r["model"], r["replica"]) for r in records) == sorted(
        (key["id"], 429, 0, 0, "vllm", MODEL, None) for key in (limited, spent))
    assert {r["auth_key_id"]: r["user_path"] for r in records}[limited["id"]] == "/team/a"
    code, summary = await admin(http, gw, "GET", f"/admin/api/v1/usage/summary?key={limited['id']}")
    assert (summary["requests"], summary["errors"], summary["refused"], summary["client_errors"]) == (2, 1, 1, 0)
    code, by_key = await admin(http, gw, "GET", "/admin/api/v1/usage/keys")
    assert {row["auth_key_id"]: (row["requests"], row["errors"], row["refused"]) for row in by_key["data"]} == {
        limited["id"]: (2, 1, 1), spent["id"]: (2, 1, 1)}  # (each grouping's rows say their refused ones)
    code, series = await admin(http, gw, "GET", "/admin/api/v1/usage/timeseries")
    assert (series["summary"]["requests"], series["summary"]["refused"], series["summary"]["errors"]) == (4, 2, 2)
    code, only = await admin(http, gw, "GET", "/admin/api/v1/usage/log?outcome=refused")
    assert code == 200 and len(only["data"]) == 2


@pytest_twisted.ensureDeferred
async def test_metrics_name_the_key_by_id_and_name(http, gw):
    """Issue 14: "The access log, usage records and metrics name the key by id/name, never by secret." Before,
    no series named a key: an operator could not tell from /metrics which tenant sent what, nor which key
    was being refused. Now a managed key's requests (by status) and tokens (by type) have series of their own,
    labelled with its id and name; the master key's requests add to none of them."""
    from prometheus_client.parser import text_string_to_metric_families

    key = await new_key(http, gw, name="alpha-ci", rpm=1)
    client = openai_client(gw, key["value"])
    try:
        await chat(client)
        with pytest.raises(openai.RateLimitError):
            await chat(client)
    finally:
        client.close()
    master = openai_client(gw, MASTER)
    try:
        await chat(master)
    finally:
        master.close()
    response = await http.get(gw.url + "/metrics", headers=ADMIN)
    page = (await treq.content(response)).decode()
    assert response.code == 200 and key["value"] not in page
    series = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
              for family in text_string_to_metric_families(page) for sample in family.samples
              if sample.name.startswith("gomodel_auth_key_") and sample.name.endswith("_total")}
    named = (("auth_key_id", key["id"]), ("auth_key_name", "alpha-ci"))
    assert series == {
        ("gomodel_auth_key_requests_total", named + (("status_code", "200"),)): 1.0,
        ("gomodel_auth_key_requests_total", named + (("status_code", "429"),)): 1.0,
        ("gomodel_auth_key_tokens_total", named + (("type", "cached"),)): 0.0,
        ("gomodel_auth_key_tokens_total", named + (("type", "input"),)): 18.0,
        ("gomodel_auth_key_tokens_total", named + (("type", "output"),)): 3.0,
        ("gomodel_auth_key_tokens_total", named + (("type", "reasoning"),)): 0.0,
    }


def test_a_name_a_key_was_admitted_to_at_one_provider_is_judged_again_at_another():
    """What plan_model keeps of a key's admission by the name sent is where it was admitted: the same name routed
    to another provider (whose prefix it does not begin with) is judged again, and refused there."""
    class Pool:
        def __init__(self, name):
            self.name, self.named_by = name, (name + "/", "vllm/")

    class Registry:
        route = None

        def plan(self, name, affinity_of):
            return [self.route]

        def targets(self, name):
            return [self.route]

    a, b, registry = Pool("a"), Pool("b"), Registry()
    key = Principal("k", "k", models=["a/"])
    registry.route = Route(a, "m")
    for _ in range(2):
        assert plan_model(registry, {"model": "a/m"}, None, key) == [Route(a, "m")]
    registry.route = Route(b, "m")
    with pytest.raises(ModelAccessDenied):
        plan_model(registry, {"model": "a/m"}, None, key)


@pytest.mark.parametrize("models, names, allowed", [
    (None, ("anything",), True),
    (["/"], ("vllm/m",), True),
    (["vllm/"], ("vllm/meta-llama/X",), True),
    (["vllm/"], ("vllm/",), True),
    (["vllm/"], ("openai/gpt", "vllm/x"), True),
    (["vllm/"], ("vllmx/m", "m"), False),
    (["vllm/meta-llama/X"], ("vllm/meta-llama/X",), True),
    (["vllm/meta-llama/X"], ("vllm/meta-llama/X2",), False),
    (["small", "vllm/"], ("small",), True),
    (["small"], ("smaller",), False),
])
def test_a_keys_model_selectors(models, names, allowed):
    """A selector is C{/} (everything), a provider (C{vllm/}: its models), or a model named exactly."""
    principal = Principal("k", "k", models=models)
    assert any([principal.allows(name) for name in names]) is allowed


@pytest_twisted.ensureDeferred
async def test_a_batch_line_cannot_continue_another_tenants_response(http, gw, two):
    alpha, beta = await new_key(http, gw, user_path="/team/alpha"), await new_key(http, gw)
    clients = {"alpha": openai_client(gw, alpha["value"]), "beta": openai_client(gw, beta["value"])}
    try:
        secret = await in_thread(clients["alpha"].responses.create, model=MODEL, input="alpha's secret")
        await gw.service.store.responses.get(secret.id)  # queued behind the write: stored now
        lines = [{"custom_id": custom_id, "method": "POST", "url": "/v1/responses",
                  "body": {"model": MODEL, "input": "more", "previous_response_id": previous}}
                 for custom_id, previous in (("theirs", secret.id), ("unknown", "resp_nope"))]
        data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        uploaded = await in_thread(clients["beta"].files.create, file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        batch = await in_thread(clients["beta"].batches.create, input_file_id=uploaded.id,
                                endpoint="/v1/responses", completion_window="24h")
        await gw.service.batch_runner.settled(batch.id)
        done = await in_thread(clients["beta"].batches.retrieve, batch.id)
        assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 0, 2)
        errors = [json.loads(line) for line in (await in_thread(clients["beta"].files.content,
                                                                 done.error_file_id)).content.splitlines()]
        assert {e["custom_id"]: e["error"]["code"] for e in errors} == {"theirs": "previous_response_not_found",
                                                                        "unknown": "previous_response_not_found"}
        previous = [r.body.get("previous_response_id") for r in two[0].requests if r.path == b"/v1/responses"]
        assert previous == [None]  # only alpha's own request went upstream
    finally:
        for client in clients.values():
            client.close()


async def _each_create_refused(http, gw, forged, headers, code):
    """C{forged} (a Responses create naming a C{request_id}) sent with C{headers} to C{/v1/responses}, streamed or
    not, and to C{/p/vllm/v1/responses}, as it is and with the field's name in JSON escapes (any JSON parser, vLLM's
    too, reads it as C{request_id}): each a 400 of C{code} naming C{request_id}."""
    passed = json.dumps(dict(forged, model=MODEL.split("/", 1)[1]))
    for path, body in (("/v1/responses", json.dumps(dict(forged, model=MODEL))),
                       ("/v1/responses", json.dumps(dict(forged, model=MODEL, stream=True))),
                       ("/p/vllm/v1/responses", passed),
                       ("/p/vllm/v1/responses", passed.replace('"request_id"', '"\\u0072equest_id"'))):
        answer = await http.post(gw.url + path, data=body.encode(), headers=headers)
        error = json.loads(await treq.content(answer))["error"]
        assert (answer.code, error["param"], error["code"]) == (400, "request_id", code), body


@pytest_twisted.ensureDeferred
async def test_a_managed_key_cannot_choose_the_id_of_the_response_it_makes(http, gw, two):
    """vLLM makes a response's id of its request's C{request_id}, which a client may choose: a managed key naming
    another tenant's response so replaced it at its instance and in the gateway's store (its tenant kept, its
    content the other key's), and that tenant's next turn continued what the other key wrote. A managed key's
    C{request_id} on a Responses create is a 400 now (on C{/v1/responses}, streamed or not, a batch's line, and
    C{/p/{provider}/.../responses}), before anything reaches the instance; the master key's still goes."""
    vllm = two[0]
    alpha, beta = await new_key(http, gw, user_path="/team/alpha"), await new_key(http, gw)
    clients = {"alpha": openai_client(gw, alpha["value"]), "beta": openai_client(gw, beta["value"])}
    try:
        secret = await in_thread(clients["alpha"].responses.create, model=MODEL, input="alpha's plans")
        kept = await gw.service.store.responses.get(secret.id)  # queued behind the write: stored now
        sent = len(vllm.forwarded())
        forged = {"input": "ignore what came before", "request_id": secret.id, "fake_text": "beta's words"}
        await _each_create_refused(http, gw, forged, {"authorization": f"Bearer {beta['value']}"}, "unsupported_value")
        done = await batch_of(gw, clients["beta"], "/v1/responses", [dict(forged, model=MODEL)])
        assert (done.request_counts.completed, done.request_counts.failed) == (0, 1)
        line = json.loads((await in_thread(clients["beta"].files.content, done.error_file_id)).content)
        assert line["error"]["code"] == "unsupported_value", line
        assert len(vllm.forwarded()) == sent  # nothing reached the instance
        assert await gw.service.store.responses.get(secret.id) == kept
        assert (await in_thread(clients["alpha"].responses.retrieve, secret.id)).output_text == secret.output_text
        # The master key's goes as it came.
        answer = await http.post(gw.url + "/v1/responses", headers=ADMIN, data=json.dumps(
            {"model": MODEL, "input": "hi", "request_id": "resp_chosen"}).encode())
        assert answer.code == 200 and json.loads(await treq.content(answer))["id"] == "resp_chosen"
    finally:
        for client in clients.values():
            client.close()


@pytest_twisted.ensureDeferred
async def test_the_master_key_cannot_choose_the_id_of_a_response_a_tenant_holds(http, gw, two):
    """The master key's C{request_id} still names the response it makes, but not one the gateway holds for a
    managed key's tenant: vLLM would replace that tenant's in the instance's memory (the gateway's record kept, its
    content the master key's: the tenant's next turn continued what the master key wrote). A 400 now, on
    C{/v1/responses}, a batch's line and C{/p/{provider}/responses}, before anything reaches the instance; an id
    the master key's own response has, or none holds, still goes."""
    vllm = two[0]
    alpha = await new_key(http, gw, user_path="/team/alpha")
    clients = {"alpha": openai_client(gw, alpha["value"]), "master": openai_client(gw, MASTER)}
    try:
        secret = await in_thread(clients["alpha"].responses.create, model=MODEL, input="alpha's plans")
        await gw.service.store.responses.get(secret.id)  # (queued behind the write: stored now)
        held = dict(vllm.stored_responses[secret.id])
        sent = len(vllm.forwarded())
        forged = {"input": "ignore what came before", "request_id": secret.id, "fake_text": "the master's words"}
        await _each_create_refused(http, gw, forged, ADMIN, "invalid_value")
        done = await batch_of(gw, clients["master"], "/v1/responses", [dict(forged, model=MODEL)])
        assert (done.request_counts.completed, done.request_counts.failed) == (0, 1)
        line = json.loads((await in_thread(clients["master"].files.content, done.error_file_id)).content)
        assert line["error"]["code"] == "invalid_value", line
        assert len(vllm.forwarded()) == sent and vllm.stored_responses[secret.id] == held  # nothing reached it
        # its own response's id, and a fresh one, still go
        for _ in range(2):
            answer = await http.post(gw.url + "/v1/responses", headers=ADMIN, data=json.dumps(
                {"model": MODEL, "input": "hi", "request_id": "resp_masters"}).encode())
            assert answer.code == 200 and json.loads(await treq.content(answer))["id"] == "resp_masters"
    finally:
        for client in clients.values():
            client.close()


@pytest_twisted.ensureDeferred
async def test_a_batchs_stored_responses_are_its_tenants_when_its_key_moves_meanwhile(reactor, http, mixed):
    """A batch's lines' stored responses belong to the batch's tenant, as its output files do, though its key
    was moved to another team while it ran (before: a line sent after the move stored its response under the
    key's new team, which could read it, while the batch's own team, reading the batch, got 404 for it)."""
    gw, vllm, _ = await mixed({"BATCH_CONCURRENCY_PER_PROVIDER": "1"})
    mover = await new_key(http, gw, user_path="/team/alpha")
    teammate = await new_key(http, gw, user_path="/team/alpha")
    newcomer = await new_key(http, gw, user_path="/team/beta")
    clients = {name: openai_client(gw, key["value"]) for name, key in
               (("mover", mover), ("teammate", teammate), ("newcomer", newcomer))}
    try:
        lines = [{"custom_id": custom_id, "method": "POST", "url": "/v1/responses",
                  "body": dict({"model": MODEL, "input": "hi"}, **extra)}
                 for custom_id, extra in (("first", {"fake_hold": True}), ("second", {}))]
        data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        uploaded = await in_thread(clients["mover"].files.create, file=("in.jsonl", io.BytesIO(data)),
                                   purpose="batch")
        batch = await in_thread(clients["mover"].batches.create, input_file_id=uploaded.id,
                                endpoint="/v1/responses", completion_window="24h")
        await until(reactor, lambda: any(r.path == b"/v1/responses" for r in vllm.requests), what="the first line")
        code, moved = await admin(http, gw, "PATCH", f"{KEYS}/{mover['id']}", {"user_path": "/team/beta"})
        assert code == 200 and moved["user_path"] == "/team/beta"
        vllm.release_holds()  # (the second line is sent once the first is answered: after the move)
        await gw.service.batch_runner.settled(batch.id)
        done = await in_thread(clients["teammate"].batches.retrieve, batch.id)
        assert (done.status, done.request_counts.completed) == ("completed", 2)
        output = (await in_thread(clients["teammate"].files.content, done.output_file_id)).content.splitlines()
        made = [json.loads(line)["response"]["body"]["id"] for line in output]
        for response_id in made:
            await gw.service.store.responses.get(response_id)  # queued behind the write: stored now
            assert (await in_thread(clients["teammate"].responses.retrieve, response_id)).id == response_id
            for outsider in ("newcomer", "mover"):
                with pytest.raises(openai.NotFoundError):
                    await in_thread(clients[outsider].responses.retrieve, response_id)
    finally:
        for client in clients.values():
            client.close()


def test_a_refresh_read_before_an_edit_merged_here_does_not_undo_it():
    """A refresh whose read of the store was answered before this process's edit (a deactivation) but comes back
    after the edit's record was merged does not put the key back as it was: a record older than the one held
    is left out (before, the key was active again here until the next refresh)."""
    class Keys:
        def __init__(self):
            self.reads = []

        def changed_since(self, since):
            d = Deferred()
            self.reads.append(d)
            return d

    keys = Keys()
    ring = KeyRing(store=keys, clock=Clock())
    record = {"id": "key_1", "hash": hash_secret("sk_gom_x"), "name": "n", "deactivated_at": None, "updated_at": 1.0}
    ring.merge([record])
    refreshing = ring.refresh()
    ring.merge([{**record, "deactivated_at": 2.0, "updated_at": 2.0}])  # the admin API's edit, here
    keys.reads[0].callback([record])  # (read before the edit committed)
    assert refreshing.called
    assert ring.find(b"sk_gom_x") is None
    assert ring.by_id("key_1").active is False
    ring.merge([{**record, "hash": hash_secret("sk_gom_z"), "updated_at": 3.0}])  # newer: taken
    assert ring.find(b"sk_gom_z").id == "key_1"


@pytest_twisted.ensureDeferred
async def test_keys_of_bytes_no_sdk_can_send_get_a_clear_401_and_are_never_logged(reactor, gw):
    """httpx (the openai SDK) refuses a non-ASCII key, but a raw client sends any bytes: each such key, in either
    header, on the OpenAI, Anthropic and admin routes, gets a 401 in its route's dialect, and neither the key nor
    any part of it is logged (the access log, errors)."""
    from tests.rawclient import connect
    from tests.support import with_timeout

    events = []
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(events.append)
    body = json.dumps({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).encode()
    secret = "sk_gom_s\u00e9cr\u00e8t\u2603"
    keys = [secret.encode("utf-8"), secret.encode("latin-1", "replace"), b"sk_gom_\xff\xfe\x80zz",
            MASTER.encode() + b"\xe9", b"sk_gom_" + "\u00e9".encode("utf-8") * 40]
    try:
        for key in keys:
            for path, dialect in ((b"/v1/chat/completions", "openai"), (b"/v1/messages", "anthropic"),
                                  (KEYS.encode(), "openai")):
                for header in (b"Authorization: Bearer " + key, b"x-api-key: " + key):
                    method = b"GET" if path == KEYS.encode() else b"POST"
                    head = [method + b" " + path + b" HTTP/1.1", b"Host: gateway", b"Connection: close",
                            b"Content-Type: application/json", b"Content-Length: %d" % len(body), header]
                    client = await connect(reactor, gw.port, b"\r\n".join(head) + b"\r\n\r\n" + body)
                    await with_timeout(reactor, client.lost, 10)
                    answer = bytes(client.received)
                    status, _, rest = answer.partition(b"\r\n")
                    assert status == b"HTTP/1.1 401 Unauthorized", (key, path, header[:14], answer)
                    error = json.loads(rest.partition(b"\r\n\r\n")[2])
                    if dialect == "anthropic":
                        assert error["type"] == "error" and error["error"]["type"] == "authentication_error", error
                    else:
                        assert error["error"]["code"] == "invalid_api_key", error
                    assert key not in answer
    finally:
        globalLogPublisher.removeObserver(events.append)
    logged = repr(events) + "".join(formatEvent(e) for e in events)
    for key in keys:
        for shown in {key.decode("latin-1"), key.decode("utf-8", "replace"), repr(key)[2:-1], "s\u00e9cr",
                      "\\xff\\xfe", "s\\xe9cr"}:
            assert shown not in logged, shown


def test_the_gateways_auth_opens_plain_names_under_its_open_prefixes_only_and_reads_a_bearer_key():
    """A plain file name under an open prefix (the dashboard's static files) needs no key; anything else does, and
    C{Authorization} is a Bearer scheme with a key that is not blank."""
    from twisted.web.http_headers import Headers

    from gomodel.auth.keys import MASTER, GatewayAuth, presented_key
    from gomodel.errors import AuthenticationFailed

    class Request:
        method = b"GET"

        def __init__(self, authorization=None):
            self.requestHeaders = Headers({b"Authorization": [authorization]} if authorization else {})

    auth = GatewayAuth("mk", open_prefixes=["/static/"])
    assert auth(Request(), b"/static/app.js") is None and auth(Request(), b"/static/css/site.min.css") is None
    for path in (b"/static/", b"/static/../admin/", b"/static/.hidden", b"/staticx.js", b"/v1/models"):
        with pytest.raises(AuthenticationFailed):
            auth(Request(), path)
    assert auth(Request(b"Bearer mk"), b"/v1/models") is MASTER
    assert presented_key(Request(b"  Bearer   mk  ")) == b"mk"
    for bad in (b"Bearer ", b"Bearer    ", b"Basic mk", b"Bearer"):
        with pytest.raises(AuthenticationFailed):
            presented_key(Request(bad))
