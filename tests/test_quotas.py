"""Rate limits and budgets through the gateway: managed keys, user paths, providers, batches, passthrough, Redis."""

import io
import json
import os
import time
from contextlib import contextmanager

import anthropic
import openai
import pytest
import pytest_twisted
import treq
from twisted.internet import defer
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.web.client import ResponseNeverReceived

from gomodel.api.keys import iso
from tests.rawclient import chat_request, connect
from tests.support import (in_daemon_thread, in_thread, openai_client, start_fake, start_gateway, stop_all, until,
                           with_timeout)
from tests.redis_server import fresh_prefix

MASTER = "master-k"
ADMIN = {"authorization": f"Bearer {MASTER}", "content-type": "application/json"}
MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"
KEYS = "/admin/api/v1/auth-keys"
REDIS_URL = os.environ.get("GOMODEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def start(reactor, fake, tmp_path, **env):
    return await start_gateway(reactor, dict({"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                              "GOMODEL_DATA_DIR": str(tmp_path)}, **env))


async def admin(http, gw, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    response = await http.request(method, gw.url + path, data=data, headers=ADMIN)
    return response.code, json.loads(await treq.content(response))


async def new_key(http, gw, **fields):
    code, key = await admin(http, gw, "POST", KEYS, dict({"name": "team"}, **fields))
    assert code == 201, key
    return key


def raw_chat(client, max_tokens=5, **extra):
    """One chat request; the raw response (headers and parsed body)."""
    return client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens, **extra)


@pytest_twisted.async_yield_fixture()
async def gw(reactor, fake, tmp_path):
    gateway = await start(reactor, fake, tmp_path)
    yield gateway
    await gateway.service.stopService()


# -- rate limits -------------------------------------------------------------------------------


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_x_gomodel_user_path_attributes_the_master_keys_requests_to_a_path(reactor, http, fake, tmp_path):
    """GoModel's header: a backend holding the master key attributes each request to its user's path: that
    path's limits apply and the ledger records it under the path (before: ignored, every such request the
    master key's, unlimited and unattributed)."""
    gateway = await start(reactor, fake, tmp_path, SET_RATE_LIMIT_TEAM__A="rpm=1", USAGE_FLUSH_INTERVAL="1h")
    master = openai_client(gateway, MASTER)
    key = await new_key(http, gateway)  # (no user path of its own)
    pathless = openai_client(gateway, key["value"])
    try:
        team_a = {"X-GoModel-User-Path": "team/a/"}
        assert (await in_thread(raw_chat, master, extra_headers=team_a)).http_response.status_code == 200
        with pytest.raises(openai.RateLimitError):  # /team/a's rpm=1
            await in_thread(raw_chat, master, extra_headers=team_a)
        # A managed key is never attributed: it would spend another team's limits and budgets.
        assert (await in_thread(raw_chat, pathless, extra_headers=team_a)).http_response.status_code == 200
        for _ in range(3):  # unattributed, or another path: no limit
            await in_thread(raw_chat, master)
            await in_thread(raw_chat, master, extra_headers={"X-GoModel-User-Path": "/team/b"})
        with pytest.raises(openai.BadRequestError) as refused:
            await in_thread(raw_chat, master, extra_headers={"X-GoModel-User-Path": "/team/../x"})
        assert refused.value.code == "invalid_user_path"
        await gateway.service.usage.flush()
        code, log = await admin(http, gateway, "GET", "/admin/api/v1/usage/log?user_path=/team/a")
        # (the refused one too: the gateway's own refusals are records of 0 tokens, outcome refused)
        assert [(r["user_path"], r["auth_key_id"], r["outcome"]) for r in log["data"]] == [
            ("/team/a", None, "refused"), ("/team/a", None, "ok")]
        code, log = await admin(http, gateway, "GET", "/admin/api/v1/usage/log?user_path=/team/b")
        assert len(log["data"]) == 3
        # Its budgets too: one request spends /team/d's 20 tokens (21), the next is refused.
        code, _ = await admin(http, gateway, "PUT", "/admin/api/v1/budgets",
                              {"user_path": "/team/d", "period": "daily", "max_tokens": 20})
        assert code == 200
        team_d = {"X-GoModel-User-Path": "/team/d"}
        await in_thread(raw_chat, master, extra_headers=team_d)
        with pytest.raises(openai.RateLimitError) as spent:
            await in_thread(raw_chat, master, extra_headers=team_d)
        assert spent.value.code == "budget_exceeded"
        await in_thread(raw_chat, master)  # (the master key's own requests: no budget)
        # A key with a user path of its own keeps it: the header is ignored.
        bound = await new_key(http, gateway, user_path="/team/c")
        client = openai_client(gateway, bound["value"])
        try:
            for _ in range(2):
                await in_thread(raw_chat, client, extra_headers=team_a)
        finally:
            client.close()
    finally:
        master.close()
        pathless.close()
        await gateway.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_managed_key_naming_a_path_sees_what_it_saw(reactor, http, fake, tmp_path):
    """The header never changes what a key may see: a key's files stay its own whatever path it names."""
    gateway = await start(reactor, fake, tmp_path)
    key = await new_key(http, gateway)
    client = openai_client(gateway, key["value"])
    try:
        made = await in_thread(client.files.create, file=("a.jsonl", b"{}\n"), purpose="batch",
                               extra_headers={"X-GoModel-User-Path": "/team/x"})
        listed = await in_thread(client.files.list)
        assert [f.id for f in listed.data] == [made.id]
        other = await new_key(http, gateway, user_path="/team/x")
        stranger = openai_client(gateway, other["value"])
        try:
            assert (await in_thread(stranger.files.list)).data == []
        finally:
            stranger.close()
    finally:
        client.close()
        await gateway.service.stopService()


@pytest_twisted.ensureDeferred
async def test_rate_limits_enabled_false_turns_a_keys_own_limits_off_too(reactor, http, fake, tmp_path):
    """As BUDGETS_ENABLED=false does its budgets (before: a key's rpm, tpm and max_concurrency still held)."""
    gateway = await start(reactor, fake, tmp_path, RATE_LIMITS_ENABLED="false")
    key = await new_key(http, gateway, rpm=1, max_concurrency=1)
    client = openai_client(gateway, key["value"])
    try:
        for _ in range(3):
            answer = await in_thread(raw_chat, client)
            assert answer.http_response.status_code == 200
            assert "x-ratelimit-limit-requests" not in answer.headers
    finally:
        client.close()
        await gateway.service.stopService()


@pytest_twisted.ensureDeferred
async def test_rpm_refuses_with_openai_headers_and_retry_after(http, gw):
    key = await new_key(http, gw, rpm=2)
    client = openai_client(gw, key["value"])
    try:
        first = await in_thread(raw_chat, client)
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert first.headers["x-ratelimit-reset-requests"].endswith("s")
        second = await in_thread(raw_chat, client)
        assert second.headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(openai.RateLimitError) as refused:
            await in_thread(raw_chat, client)
        error = refused.value
        assert error.code == "rate_limit_exceeded" and error.type == "requests"
        assert "key:" + key["id"] in error.message and key["value"] not in error.message
        assert int(error.response.headers["retry-after"]) >= 1
        assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    finally:
        client.close()
    # The master key and other keys are not limited by this key's rpm.
    master = openai_client(gw, MASTER)
    try:
        answer = await in_thread(raw_chat, master)
        assert "x-ratelimit-limit-requests" not in answer.headers
    finally:
        master.close()


@pytest_twisted.ensureDeferred
async def test_a_user_paths_limits_show_in_the_headers_of_the_requests_under_it(reactor, http, fake, tmp_path):
    """Issue 14: "The same limits by user path, provider and model" as a key's rpm/tpm, whose answers carry
    OpenAI's x-ratelimit-* headers, a 429 too (GoModel: a user-path breach gets its Retry-After and
    x-ratelimit-* headers). Before, a request limited only by its path's SET_RATE_LIMIT_* had no such
    header, not even on its 429: its client could not pace itself. Now its answers show its path's windows
    (with a key's own: of several, the one with the fewest remaining)."""
    gw = await start(reactor, fake, tmp_path, SET_RATE_LIMIT_TEAM="rpm=2,tpm=50000")
    try:
        pathed = await new_key(http, gw, user_path="/team/alpha")
        own = await new_key(http, gw, user_path="/team/beta", rpm=10)  # (shares /team's 2 requests)
        clients = [openai_client(gw, key["value"]) for key in (pathed, own)] + [openai_client(gw, MASTER)]
        try:
            first = (await in_thread(raw_chat, clients[0])).headers
            assert (first["x-ratelimit-limit-requests"], first["x-ratelimit-remaining-requests"]) == ("2", "1")
            assert first["x-ratelimit-reset-requests"].endswith("s")
            assert first["x-ratelimit-limit-tokens"] == "50000"
            second = (await in_thread(raw_chat, clients[1])).headers  # its own 9 left, its path's 0: the path's
            assert (second["x-ratelimit-limit-requests"], second["x-ratelimit-remaining-requests"]) == ("2", "0")
            for client, headers in ((clients[0], None), (clients[2], {"X-GoModel-User-Path": "/team/x"})):
                with pytest.raises(openai.RateLimitError) as refused:
                    await in_thread(raw_chat, client, extra_headers=headers)
                answer = refused.value.response.headers
                assert "path:/team " in refused.value.message and int(answer["retry-after"]) >= 1
                assert (answer["x-ratelimit-limit-requests"], answer["x-ratelimit-remaining-requests"]) == ("2", "0")
            unlimited = (await in_thread(raw_chat, clients[2])).headers  # the master key's own: no limit
            assert "x-ratelimit-limit-requests" not in unlimited
        finally:
            for client in clients:
                client.close()
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_limited_keys_headers_are_its_own_not_the_upstreams(http, gw):
    """An OpenAI-compatible provider's own x-ratelimit-* headers describe the gateway's account
    with it, shared by every tenant: a limited key sees its limits; the master key sees the
    provider's, as they came."""
    upstream = {"x-ratelimit-limit-requests": "5000", "x-ratelimit-remaining-requests": "4999",
                "x-ratelimit-reset-requests": "12ms"}
    key = await new_key(http, gw, rpm=2)
    client, master = openai_client(gw, key["value"]), openai_client(gw, MASTER)
    try:
        answer = await in_thread(raw_chat, client, extra_body={"fake_headers": upstream})
        assert answer.headers.get_list("x-ratelimit-limit-requests") == ["2"]
        assert answer.headers.get_list("x-ratelimit-remaining-requests") == ["1"]
        assert answer.headers["x-ratelimit-reset-requests"] != "12ms"
        answer = await in_thread(raw_chat, master, extra_body={"fake_headers": upstream})
        assert answer.headers["x-ratelimit-remaining-requests"] == "4999"
    finally:
        client.close()
        master.close()


@pytest_twisted.ensureDeferred
async def test_tpm_reserves_max_tokens_and_settles_with_the_real_usage(http, gw):
    key = await new_key(http, gw, tpm=200)
    client = openai_client(gw, key["value"])
    try:
        with pytest.raises(openai.RateLimitError) as refused:  # more than the limit at once: no wait helps
            await in_thread(client.chat.completions.create, model=MODEL,
                            messages=[{"role": "user", "content": "hi"}], max_tokens=500)
        assert refused.value.type == "tokens" and "retry-after" not in refused.value.response.headers
        answer = await in_thread(raw_chat, client, max_tokens=150)
        # Reserved up front: about 150 + the prompt's size / 4 ...
        assert int(answer.headers["x-ratelimit-remaining-tokens"]) <= 50
        await gw.service.usage.flush()
        # ... then settled with what the answer used (21 tokens): the next one sees the refund.
        again = await in_thread(raw_chat, client, max_tokens=100)
        assert int(again.headers["x-ratelimit-remaining-tokens"]) >= 200 - 21 - 100 - 60
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_tpm_reserves_the_max_tokens_field_vllm_reads_on_each_route(http, gw):
    """Each route reserves the output field vLLM 0.32 generates by there: chat's C{max_completion_tokens} over its
    C{max_tokens} (before, the first one sent: C{max_tokens: 100} before C{max_completion_tokens: 5000} reserved 100
    where vLLM may generate 5000), completions' C{max_tokens} (vLLM's completions has no C{max_completion_tokens},
    nor C{best_of}: both ignored, reserved as none), the Responses API's C{max_output_tokens} (and no C{n}: it has
    none), online and through C{/p/}."""
    key = await new_key(http, gw, tpm=1000)
    headers = {"authorization": f"Bearer {key['value']}", "content-type": "application/json"}
    hi = [{"role": "user", "content": "hi"}]

    async def code(path, **body):
        body["model"] = MODEL.split("/", 1)[1] if path.startswith("/p/") else MODEL  # (a passthrough: its own name)
        response = await http.post(gw.url + path, data=json.dumps(body).encode(), headers=headers)
        await treq.content(response)
        return response.code

    for path in ("/v1/chat/completions", "/p/vllm/v1/chat/completions"):
        assert await code(path, messages=hi, max_tokens=100, max_completion_tokens=5000) == 429  # too large
        assert await code(path, messages=hi, max_completion_tokens=100, max_tokens=5000) == 200
        assert await code(path, messages=hi, max_completion_tokens=None, max_tokens=5000) == 429
    assert await code("/v1/completions", prompt="hi", max_completion_tokens=5000, max_tokens=100, best_of=20) == 200
    assert await code("/v1/completions", prompt="hi", max_tokens=100, n=20) == 429
    assert await code("/v1/responses", input="hi", max_tokens=5000, max_output_tokens=100, n=20) == 200
    assert await code("/v1/responses", input="hi", max_output_tokens=5000) == 429


@pytest_twisted.ensureDeferred
async def test_tpm_reserves_each_prompt_of_a_completions_prompt_list_and_vllms_default_max_tokens(http, gw):
    """A text completion generates C{n} sequences for each prompt of a C{prompt} list (strings, or lists of token
    ids; one list of token ids is one prompt), and 16 tokens each where it sends no C{max_tokens} (vLLM's default,
    as OpenAI's): its reservation counts them, online (streamed or not) and through C{/p/} (before, n sequences
    whatever its prompts, and nothing without a C{max_tokens}: a 4-prompt request reserved a quarter of what it
    can generate). Chat is as it was: without a C{max_tokens} it reserves no output (its default is the model's
    whole context)."""
    hi = [{"role": "user", "content": "hi"}]

    async def answer(key, path, **body):
        body["model"] = MODEL.split("/", 1)[1] if path.startswith("/p/") else MODEL  # (a passthrough: its own name)
        response = await http.post(gw.url + path, data=json.dumps(body).encode(), headers={
            "authorization": f"Bearer {key['value']}", "content-type": "application/json"})
        await treq.content(response)
        return response

    for path in ("/v1/completions", "/p/vllm/v1/completions"):
        fresh = await new_key(http, gw, tpm=1000)
        reserved = (await answer(fresh, path, prompt=["a", "b", "c", "d"])).headers.getRawHeaders(
            "x-ratelimit-remaining-tokens")
        assert 1000 - 64 - 30 <= int(reserved[0]) <= 1000 - 64  # (4 x 16, and the body's size / 4)
        key = await new_key(http, gw, tpm=1000)

        async def code(**body):
            return (await answer(key, path, **body)).code

        assert await code(prompt=["a", "b", "c", "d"], max_tokens=300) == 429  # 1200: too large
        assert await code(prompt=["a", "b", "c", "d"], max_tokens=300, stream=True) == 429
        assert await code(prompt=[[1, 2], [3, 4], [5], [6]], max_tokens=300) == 429
        assert await code(prompt=["a", "b", "c", "d"], n=20) == 429  # 4 x 20 x 16
        assert await code(prompt="hi", n=60, max_tokens=None) == 200  # (null: the model's whole context, unknown)
        assert await code(prompt=[1, 2, 3, 4], max_tokens=200, n=3) == 200  # one prompt of token ids: 600
        assert await code(prompt="hi", n=20) == 200  # 320
    for path in ("/v1/chat/completions", "/p/vllm/v1/chat/completions"):
        assert (await answer(key, path, messages=hi, n=60)).code == 200


@pytest_twisted.ensureDeferred
async def test_a_completions_batch_lines_reservation_counts_each_prompt_and_vllms_default_max_tokens(
        reactor, http, gw, fake):
    """A C{/v1/completions} batch line reserves from its key's budgets each sequence of each prompt of its C{prompt}
    list, 16 tokens each without a C{max_tokens} (vLLM's default), as online: while it is in flight the key's
    other requests see the reservation (before, a quarter of it here, the output none: they went on)."""
    key = await new_key(http, gw, budgets=[{"period": "total", "max_tokens": 60}])
    sdk = openai_client(gw, key["value"])
    try:
        line = {"custom_id": "four", "method": "POST", "url": "/v1/completions",
                "body": {"model": MODEL, "prompt": ["a", "b", "c", "d"], "fake_hold": True}}
        uploaded = await in_thread(sdk.files.create, purpose="batch", file=(
            "in.jsonl", io.BytesIO(json.dumps(line).encode() + b"\n")))
        batch = await in_thread(sdk.batches.create, input_file_id=uploaded.id, endpoint="/v1/completions",
                                completion_window="24h")
        await with_timeout(reactor, fake.when_held(1), 10)
        with pytest.raises(openai.RateLimitError) as refused:  # (64 of the line's output and its prompt: over 60)
            await in_thread(raw_chat, sdk)
        assert refused.value.code == "budget_exceeded"
        fake.release_holds()
        await gw.service.batch_runner.settled(batch.id)
        done = await in_thread(sdk.batches.retrieve, batch.id)
        assert (done.request_counts.completed, done.request_counts.failed) == (1, 0)
    finally:
        fake.release_holds()
        sdk.close()


@pytest_twisted.ensureDeferred
async def test_max_concurrency_refuses_while_a_request_is_in_flight(reactor, http, gw, fake):
    key = await new_key(http, gw, max_concurrency=1)
    client = openai_client(gw, key["value"])
    fake.holding = True
    try:
        arrived = fake.next_request()
        held = in_thread(raw_chat, client, extra_body={"fake_hold": True})
        await with_timeout(reactor, arrived, 10)
        with pytest.raises(openai.RateLimitError) as refused:
            await in_thread(raw_chat, client)
        assert "concurrent" in refused.value.message and refused.value.response.headers["retry-after"] == "1"
        fake.release_holds()
        await held
        await in_thread(raw_chat, client)  # the slot is free again
    finally:
        fake.release_holds()
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_request_no_limit_applies_to_does_without_the_limits_settling(gw):
    """The master key's requests (no key's limit or budget, no provider's or model's) hold nothing to settle:
    they skip the gate's sink, which a managed key's requests go through."""
    front, completed = gw.service.site.resource, gw.service.gate.completed
    assert completed in front._sinks and completed not in front._bare_sinks
    assert [sink for sink in front._sinks if sink != completed] == list(front._bare_sinks)


@pytest_twisted.ensureDeferred
async def test_the_master_keys_requests_free_a_providers_concurrency_slot(reactor, http, fake, tmp_path):
    """A provider's limit holds the master key's requests too: each one's slot is given back as it completes."""
    gw = await start(reactor, fake, tmp_path, SET_PROVIDER_RATE_LIMIT_VLLM="concurrent=1")
    master = openai_client(gw, MASTER)
    try:
        for _ in range(3):
            assert (await in_thread(raw_chat, master)).http_response.status_code == 200
    finally:
        master.close()
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_user_path_and_provider_limits_from_the_environment(reactor, http, fake, tmp_path):
    gw = await start(reactor, fake, tmp_path, SET_RATE_LIMIT_TEAM="rpm=1", SET_PROVIDER_RATE_LIMIT_VLLM="rpm=3")
    try:
        alpha = await new_key(http, gw, user_path="/team/alpha")
        beta = await new_key(http, gw, user_path="/team/beta")
        clients = [openai_client(gw, alpha["value"]), openai_client(gw, beta["value"]), openai_client(gw, MASTER)]
        try:
            await in_thread(raw_chat, clients[0])
            with pytest.raises(openai.RateLimitError) as refused:  # /team's rpm is shared by its subtree
                await in_thread(raw_chat, clients[1])
            assert "path:/team" in refused.value.message
            await in_thread(raw_chat, clients[2])
            await in_thread(raw_chat, clients[2])
            with pytest.raises(openai.RateLimitError) as refused:  # the provider's limit holds for everyone
                await in_thread(raw_chat, clients[2])
            assert "provider:vllm" in refused.value.message
        finally:
            for client in clients:
                client.close()
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_provider_at_its_limit_is_routed_around(reactor, http, tmp_path):
    """On chat and Responses (before, Responses went to the target drawn and was refused at its limit)."""
    first, second = await start_fake(reactor), await start_fake(reactor)
    virtual = [{"source": "llama", "targets": [{"model": MODEL}, {"model": "vllm-b/meta-llama/Llama-3.1-8B-Instruct"}],
                "strategy": "round_robin"}]
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": first.base_url, "VLLM_B_BASE_URL": second.base_url,
                                       "GOMODEL_MASTER_KEY": MASTER, "GOMODEL_DATA_DIR": str(tmp_path),
                                       "VIRTUAL_MODELS": json.dumps(virtual), "SET_PROVIDER_RATE_LIMIT_VLLM": "rpm=1"})
    client = openai_client(gw, MASTER)
    try:
        for _ in range(4):
            await in_thread(client.chat.completions.create, model="llama",
                            messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        chats = [[r for r in fake.requests if r.path == b"/v1/chat/completions"] for fake in (first, second)]
        assert (len(chats[0]), len(chats[1])) == (1, 3)
        for _ in range(3):
            await in_thread(client.responses.create, model="llama", input="hi")
        assert [len([r for r in fake.requests if r.path == b"/v1/responses"]) for fake in (first, second)] == [0, 3]
    finally:
        await stop_all(gw, first, second, clients=(client,))


# -- budgets -----------------------------------------------------------------------------------


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_token_budget_refuses_the_next_request_once_spent(http, gw):
    key = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": 40}])
    client = openai_client(gw, key["value"])
    try:
        await in_thread(raw_chat, client)  # 21 tokens
        await in_thread(raw_chat, client)  # 42: spent, but a request already admitted is never cut
        with pytest.raises(openai.RateLimitError) as refused:
            await in_thread(raw_chat, client)
        assert refused.value.code == "budget_exceeded"
        assert 1 <= int(refused.value.response.headers["retry-after"]) <= 86400  # until the day ends
        assert refused.value.response.reason_phrase == "Too Many Requests"  # (Twisted's "Unknown Status" before)
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_refusal_no_wait_can_lift_tells_the_sdk_not_to_retry(http, gw, fake):
    """A request larger than a token limit, a total budget spent: no Retry-After, and C{x-should-retry: false},
    which the openai SDK obeys (before: it sent each twice more, a second and a half of backoff, for the same
    429)."""
    too_large, total = await new_key(http, gw, tpm=10), await new_key(http, gw, budgets=[
        {"period": "total", "max_tokens": 1}])
    clients = [openai_client(gw, key["value"]) for key in (too_large, total)]
    for client in clients:
        client.max_retries = 2  # (the SDK's default)
    try:
        await in_thread(raw_chat, clients[1])  # spends the total budget
        for client, code in zip(clients, ("rate_limit_exceeded", "budget_exceeded")):
            sent = len(fake.forwarded())
            with pytest.raises(openai.RateLimitError) as refused:
                await in_thread(raw_chat, client, max_tokens=100)
            headers = refused.value.response.headers
            assert refused.value.code == code and "retry-after" not in headers
            assert headers["x-should-retry"] == "false" and len(fake.forwarded()) == sent
            assert refused.value.response.request.headers.get("x-stainless-retry-count") == "0"  # sent once
    finally:
        for client in clients:
            client.close()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_refusal_with_a_long_wait_tells_the_sdks_not_to_sleep_through_it(reactor, http, fake, tmp_path):
    """A daily budget spent, an hourly rate limit reached: C{Retry-After} until the day or the hour ends, with
    C{x-should-retry: false}, as for any wait past a minute. Before, the anthropic SDK (max_retries 2, its
    default) slept the whole C{Retry-After}, hours, before each retry: a call, a Claude Code turn, that hung
    until the next day."""
    gateway = await start(reactor, fake, tmp_path, SET_RATE_LIMIT_TEAM="rph=1")
    budget = await new_key(http, gateway, budgets=[{"period": "daily", "max_tokens": 1}])
    hourly = await new_key(http, gateway, user_path="/team")
    clients = [anthropic.Anthropic(base_url=gateway.url, api_key=key["value"], max_retries=2, timeout=10)
               for key in (budget, hourly)]
    hi = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    try:
        for client in clients:
            await in_thread(client.messages.create, **hi)  # spends the budget, uses the hour's one request
            sent = len(fake.forwarded())
            with pytest.raises(anthropic.RateLimitError) as refused:
                await with_timeout(reactor, in_daemon_thread(reactor, client.messages.create, **hi), 10)
            headers = refused.value.response.headers
            assert int(headers["retry-after"]) > 60 and headers["x-should-retry"] == "false"
            assert refused.value.response.request.headers["x-stainless-retry-count"] == "0"  # sent once
            assert len(fake.forwarded()) == sent
    finally:
        await stop_all(gateway, clients=clients)


@pytest.mark.parametrize("usage_enabled", ["true", "false"])  # budgets count without the usage ledger too
@pytest_twisted.ensureDeferred
async def test_a_cost_budget_by_user_path_set_through_the_admin_api(reactor, http, fake, tmp_path, usage_enabled):
    pricing = tmp_path / "gomodel.yaml"
    pricing.write_text(f"pricing:\n  {MODEL}: {{input_per_mtok: 1000000, output_per_mtok: 1000000}}\n")
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                       "GOMODEL_DATA_DIR": str(tmp_path), "USAGE_ENABLED": usage_enabled},
                             yaml_path=str(pricing))
    try:
        code, error = await admin(http, gw, "PUT", "/admin/api/v1/budgets",
                                  {"user_path": "/team", "period": "monthly", "max_tokens": 2**63})
        assert (code, error["error"]["param"]) == (400, "max_tokens")  # past a BIGINT: a store's 500 before
        code, budget = await admin(http, gw, "PUT", "/admin/api/v1/budgets",
                                   {"user_path": "/team", "period": "monthly", "amount": 30})
        assert code == 200 and budget["amount"] == 30
        key = await new_key(http, gw, user_path="/team/alpha")
        client = openai_client(gw, key["value"])
        try:
            await in_thread(raw_chat, client)  # 21 tokens at 1 per token: 21 spent
            await in_thread(raw_chat, client)  # 42
            with pytest.raises(openai.RateLimitError) as refused:
                await in_thread(raw_chat, client)
            assert refused.value.code == "budget_exceeded" and "path:/team" in refused.value.message
        finally:
            client.close()
        code, listed = await admin(http, gw, "GET", "/admin/api/v1/budgets")
        (row,) = listed["data"]
        assert (row["user_path"], row["period"], row["spent_cost"], row["source"]) == ("/team", "monthly", 42, "admin")
        code, _ = await admin(http, gw, "DELETE", "/admin/api/v1/budgets/team/monthly")
        assert code == 200
        client = openai_client(gw, key["value"])
        try:
            await in_thread(raw_chat, client)  # no budget any more
        finally:
            client.close()
    finally:
        await gw.service.stopService()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_price_keyed_by_the_provider_type_the_client_sends_prices_its_instances(reactor, http, fake, tmp_path):
    """Issue 14: "pricing is keyed by the qualified model as clients send it, vllm/meta-llama/X". A client
    sends a provider type's name (vllm/X reaches X at the first instance of that type), but prices were
    looked up by the instance's name only: with the vLLM provider named vllm-gpu-a, a price keyed
    vllm/meta-llama/X priced nothing, so a cost budget never ran out and the ledger's cost was null. Now a
    price keyed by a provider type (that is no instance's name) prices that model at every instance of
    the type; one keyed by an instance's own name wins there."""
    pricing = tmp_path / "gomodel.yaml"
    pricing.write_text(f"pricing:\n  {MODEL}: {{input_per_mtok: 1000000, output_per_mtok: 1000000}}\n"
                       "  vllm-gpu-b/meta-llama/Llama-3.1-8B-Instruct: {input_per_mtok: 1000000}\n")
    other = await start_fake(reactor)
    gw = await start_gateway(reactor, {"VLLM_GPU_A_BASE_URL": fake.base_url, "VLLM_GPU_B_BASE_URL": other.base_url,
                                       "GOMODEL_MASTER_KEY": MASTER, "GOMODEL_DATA_DIR": str(tmp_path)},
                             yaml_path=str(pricing))
    try:
        key = await new_key(http, gw, budgets=[{"period": "daily", "max_cost": 30}])
        client = openai_client(gw, key["value"])
        try:
            await in_thread(raw_chat, client)  # (MODEL is vllm/...: the first vLLM) 21 tokens at 1 each: 21 spent
            await in_thread(raw_chat, client)  # 42
            with pytest.raises(openai.RateLimitError) as refused:
                await in_thread(raw_chat, client)
            assert refused.value.code == "budget_exceeded"
        finally:
            client.close()
        master = openai_client(gw, MASTER)
        try:
            await in_thread(master.chat.completions.create, model="vllm-gpu-b/meta-llama/Llama-3.1-8B-Instruct",
                            messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        finally:
            master.close()
        await gw.service.usage.flush()
        code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
        assert [(r["model"], r["total_cost"]) for r in log["data"]] == [
            ("vllm-gpu-b/meta-llama/Llama-3.1-8B-Instruct", 18.0),  # its own price: the input tokens alone
            ("vllm-gpu-a/meta-llama/Llama-3.1-8B-Instruct", 0.0),  # (the refused one: no tokens)
            ("vllm-gpu-a/meta-llama/Llama-3.1-8B-Instruct", 21.0),
            ("vllm-gpu-a/meta-llama/Llama-3.1-8B-Instruct", 21.0)]
    finally:
        await gw.service.stopService()
        await other.stop()


@pytest_twisted.ensureDeferred
async def test_a_budget_added_counts_the_requests_the_usage_ledger_has_not_written_yet(reactor, http, fake, tmp_path):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                       "GOMODEL_DATA_DIR": str(tmp_path), "USAGE_FLUSH_INTERVAL": "1h"})
    try:
        key = await new_key(http, gw, user_path="/team/alpha")
        client = openai_client(gw, key["value"])
        try:
            await in_thread(raw_chat, client)  # 21 tokens, kept by the ledger and not written
            code, _ = await admin(http, gw, "PUT", "/admin/api/v1/budgets",
                                  {"user_path": "/team", "period": "monthly", "max_tokens": 40})
            assert code == 200
            await in_thread(raw_chat, client)  # 42: the seed counted the first, unwritten
            code, listed = await admin(http, gw, "GET", "/admin/api/v1/budgets")
            assert [row["spent_tokens"] for row in listed["data"]] == [42]
            with pytest.raises(openai.RateLimitError) as refused:
                await in_thread(raw_chat, client)
            assert refused.value.code == "budget_exceeded"
            await gw.service.usage.flush()
            code, listed = await admin(http, gw, "GET", "/admin/api/v1/budgets")
            assert [row["spent_tokens"] for row in listed["data"]] == [42]  # written, not counted twice
        finally:
            client.close()
    finally:
        await gw.service.stopService()


def batch_file(client, *custom_ids):
    """An uploaded batch input file of one chat line per custom id (blocking: run it in a thread)."""
    lines = [{"custom_id": c, "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}}
             for c in custom_ids]
    return client.files.create(purpose="batch", file=(
        "in.jsonl", io.BytesIO(b"".join(json.dumps(line).encode() + b"\n" for line in lines))))


@pytest_twisted.ensureDeferred
async def test_passthrough_and_batch_lines_count_against_budgets(http, gw, fake):
    key = await new_key(http, gw, budgets=[{"period": "total", "max_tokens": 20}])
    client = openai_client(gw, key["value"])
    try:
        uploaded = await in_thread(batch_file, client, "a")
        batch = await in_thread(client.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                completion_window="24h")
        await gw.service.batch_runner.settled(batch.id)
        done = await in_thread(client.batches.retrieve, batch.id)
        assert (done.request_counts.completed, done.request_counts.failed) == (1, 0)
        # The line's 21 tokens spent the budget: the next request is refused, a passthrough's too.
        with pytest.raises(openai.RateLimitError):
            await in_thread(raw_chat, client)
        response = await http.post(gw.url + "/p/vllm/v1/chat/completions", data=json.dumps(
            {"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"authorization": f"Bearer {key['value']}", "content-type": "application/json"})
        assert response.code == 429 and b"budget_exceeded" in await treq.content(response)
    finally:
        client.close()
    other = await new_key(http, gw, budgets=[{"period": "total", "max_tokens": 20}])
    response = await http.post(gw.url + "/p/vllm/v1/chat/completions", data=json.dumps(
        {"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"authorization": f"Bearer {other['value']}", "content-type": "application/json"})
    assert response.code == 200
    await treq.content(response)
    await gw.service.usage.flush()
    code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
    assert [(r["endpoint"], r["total_tokens"], r["auth_key_id"]) for r in log["data"]][0] == (
        "/p/{provider}/{endpoint}", 21, other["id"])
    with pytest.raises(openai.RateLimitError):  # (the passthrough's 21 tokens spent its budget)
        await in_thread(raw_chat, openai_client(gw, other["value"]))


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_key_whose_budget_is_spent_cannot_create_a_batch(http, gw, fake):
    """Refused at creation with the interactive routes' answer, in each route's dialect (before: the batch was
    accepted and each of its lines failed, budget_exceeded, one by one). Its input file is kept."""
    key = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": 20}])
    client = openai_client(gw, key["value"])
    messages = anthropic.Anthropic(base_url=gw.url, api_key=key["value"], max_retries=0, timeout=10)
    try:
        uploaded = await in_thread(batch_file, client, "a")  # (before the budget is spent: files cost nothing)
        await in_thread(raw_chat, client)  # 21 tokens: spent
        with pytest.raises(openai.RateLimitError) as online:
            await in_thread(raw_chat, client)
        with pytest.raises(openai.RateLimitError) as batch:
            await in_thread(client.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                            completion_window="24h")
        assert batch.value.body == online.value.body and batch.value.code == "budget_exceeded"
        assert abs(int(batch.value.response.headers["retry-after"]) -
                   int(online.value.response.headers["retry-after"])) <= 1  # (until the day ends)
        with pytest.raises(anthropic.RateLimitError) as online:
            await in_thread(messages.messages.create, model=MODEL, max_tokens=5,
                            messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(anthropic.RateLimitError) as batch:
            await in_thread(messages.messages.batches.create, requests=[{"custom_id": "a", "params": {
                "model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}}])
        assert batch.value.body == online.value.body and batch.value.body["error"]["type"] == "rate_limit_error"
        assert abs(int(batch.value.response.headers["retry-after"]) -
                   int(online.value.response.headers["retry-after"])) <= 1  # (until the day ends)
        assert (await in_thread(client.batches.list)).data == []
        assert (await in_thread(messages.messages.batches.list)).data == []
        assert [r.path for r in fake.requests if r.path.startswith((b"/v1/chat", b"/v1/messages"))] == [
            b"/v1/chat/completions"]
        assert (await in_thread(client.files.retrieve, uploaded.id)).id == uploaded.id
        # Each refusal is a usage record of the key's, outcome refused: a batch's under its route (it names no
        # model yet; before, under none: the request log showed a refusal of no endpoint).
        await gw.service.usage.flush()
        code, log = await admin(http, gw, "GET", f"/admin/api/v1/usage/log?key={key['id']}&outcome=refused")
        assert sorted((r["endpoint"], r["model"], r["status_code"]) for r in log["data"]) == [
            ("/v1/batches", None, 429), ("/v1/chat/completions", MODEL, 429), ("/v1/messages", MODEL, 429),
            ("/v1/messages/batches", None, 429)]
    finally:
        client.close()
        messages.close()


@pytest_twisted.ensureDeferred
async def test_a_passthrough_stream_without_usage_counts_against_budgets(http, gw, fake):
    """A chat stream relayed raw that asks for no usage chunk is charged its events, as on /v1 (before, it
    cost nothing: a key could stream past its budget through /p/)."""
    key = await new_key(http, gw, budgets=[{"period": "total", "max_tokens": 3}])
    body = {"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hi"}],
            "stream": True}
    headers = {"authorization": f"Bearer {key['value']}", "content-type": "application/json"}
    response = await http.post(gw.url + "/p/vllm/v1/chat/completions", data=json.dumps(body).encode(),
                               headers=headers)
    assert response.code == 200 and b'"usage"' not in await treq.content(response)
    await gw.service.usage.flush()
    code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
    assert [(r["output_tokens"], r["estimated"]) for r in log["data"]] == [(5, True)]  # role, 3 tokens, [DONE]
    response = await http.post(gw.url + "/p/vllm/v1/chat/completions", data=json.dumps(body).encode(),
                               headers=headers)
    assert response.code == 429 and b"budget_exceeded" in await treq.content(response)


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_gomodels_per_model_metadata_pricing_prices_the_model_and_spends_cost_budgets(reactor, http, fake,
                                                                                            tmp_path):
    """GoModel prices a self-hosted model with its provider's YAML C{models: [{id, metadata: {pricing: {...}}}]}.
    That price was dropped without a word: the ledger's cost was null and a cost budget never ran out. Now it prices
    C{<provider>/<id>} as C{pricing:} does."""
    config = tmp_path / "gomodel.yaml"
    config.write_text(f"providers:\n  vllm:\n    type: vllm\n    base_url: {fake.base_url}\n    models:\n"
                      "      - id: meta-llama/Llama-3.1-8B-Instruct\n        metadata:\n"
                      "          display_name: Llama\n"
                      "          pricing: {currency: USD, input_per_mtok: 1000000, output_per_mtok: 1000000}\n")
    gw = await start_gateway(reactor, {"GOMODEL_MASTER_KEY": MASTER, "GOMODEL_DATA_DIR": str(tmp_path)},
                             yaml_path=str(config))
    try:
        key = await new_key(http, gw, budgets=[{"period": "daily", "max_cost": 30}])
        client = openai_client(gw, key["value"])
        try:
            await in_thread(raw_chat, client)  # 21 tokens at 1 each: 21 spent
            await in_thread(raw_chat, client)  # 42
            with pytest.raises(openai.RateLimitError) as refused:
                await in_thread(raw_chat, client)
            assert refused.value.code == "budget_exceeded"
        finally:
            client.close()
        await gw.service.usage.flush()
        code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
        assert [r["total_cost"] for r in log["data"]] == [0.0, 21.0, 21.0]  # (the refused one: no tokens)
    finally:
        await gw.service.stopService()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_passthrough_is_priced_by_the_model_its_provider_serves(reactor, http, fake, tmp_path):
    """A cost budget counts passthrough as it counts /v1 (before, a passthrough had no model, so no price: it
    spent tokens but never cost); a model the provider does not list names nothing (labels stay bounded)."""
    pricing = tmp_path / "gomodel.yaml"
    pricing.write_text(f"pricing:\n  {MODEL}: {{input_per_mtok: 1000000, output_per_mtok: 1000000}}\n")
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                       "GOMODEL_DATA_DIR": str(tmp_path)}, yaml_path=str(pricing))
    try:
        key = await new_key(http, gw, budgets=[{"period": "daily", "max_cost": 30}])
        headers = {"authorization": f"Bearer {key['value']}", "content-type": "application/json"}

        async def passthrough(endpoint, **body):
            response = await http.post(f"{gw.url}/p/vllm/{endpoint}", data=json.dumps(body).encode(), headers=headers)
            return response.code, await treq.content(response)

        assert (await passthrough("tokenize", model="not-listed", prompt="hi"))[0] == 200
        chat = {"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hi"}]}
        assert (await passthrough("v1/chat/completions", **chat))[0] == 200  # 21 tokens at 1 each
        assert (await passthrough("v1/chat/completions", **chat))[0] == 200  # 42: spent
        code, answer = await passthrough("v1/chat/completions", **chat)
        assert code == 429 and b"budget_exceeded" in answer
        await gw.service.usage.flush()
        code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
        assert sorted((r["model"] or "", r["total_cost"] or 0) for r in log["data"]) == [
            ("", 0), (MODEL, 0), (MODEL, 21), (MODEL, 21)]  # (the refused one: no tokens)
    finally:
        await gw.service.stopService()


async def _done_in_background(http, gw, fake, max_tokens=20):
    """A key with a daily budget of C{max_tokens}, its openai client, and a background response of it, created
    queued without usage, that its instance now holds completed having used 22 tokens."""
    key = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": max_tokens}])
    client = openai_client(gw, key["value"])
    created = await in_thread(client.responses.create, model=MODEL, input="long job", background=True)
    assert created.status == "queued" and created.usage is None
    fake.stored_responses[created.id].update(status="completed", usage={"input_tokens": 19, "output_tokens": 3,
                                                                         "total_tokens": 22})
    return key, client, created


@pytest_twisted.ensureDeferred
async def test_a_background_responses_reservation_stays_taken_from_its_keys_tpm(http, gw, fake):
    """A background response's create is answered queued, without usage, while it generates on at its instance:
    what it reserved of its key's tokens a minute stays taken (before, the create was settled as having used
    nothing: a key of tpm 300 launched any number of background responses of 250 output tokens each)."""
    key = await new_key(http, gw, tpm=300)
    headers = {"authorization": f"Bearer {key['value']}", "content-type": "application/json"}
    body = json.dumps({"model": MODEL, "input": "long job", "background": True, "max_output_tokens": 250}).encode()
    response = await http.post(gw.url + "/v1/responses", data=body, headers=headers)
    assert response.code == 200 and json.loads(await treq.content(response))["status"] == "queued"
    response = await http.post(gw.url + "/v1/responses", data=body, headers=headers)
    error = json.loads(await treq.content(response))["error"]
    assert (response.code, error["code"], error["type"]) == (429, "rate_limit_exceeded", "tokens")


@pytest.mark.parametrize("redis", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_streamed_background_responses_reservation_stays_taken_when_its_client_leaves(reactor, http, fake,
                                                                                              tmp_path, redis,
                                                                                              redis_env):
    """A background response streamed (C{background: true, stream: true}) goes on at its instance when its client
    leaves the stream: what it reserved of its key's tokens a minute stays taken, as a background create answered
    queued keeps it (before, the stream's end gave it back: a key of tpm 300 left any number of such streams, each
    generating up to 250 tokens)."""
    gw = await start(reactor, fake, tmp_path, **redis_env)
    key = await new_key(http, gw, tpm=300)
    client = openai_client(gw, key["value"])

    def left():
        events = client.responses.create(model=MODEL, input="long job", background=True, stream=True,
                                         max_output_tokens=250, extra_body={"fake_hang_after": 2})
        try:
            return next(iter(events)).type
        finally:
            events.close()

    try:
        assert await in_thread(left) == "response.created"
        await until(reactor, lambda: gw.service.drain.in_flight == 0)  # (the gateway saw the client leave)
        body = json.dumps({"model": MODEL, "input": "long job", "background": True, "max_output_tokens": 250})
        headers = {"authorization": f"Bearer {key['value']}", "content-type": "application/json"}
        response = await http.post(gw.url + "/v1/responses", data=body.encode(), headers=headers)
        error = json.loads(await treq.content(response)).get("error")
        assert (response.code, error and error["code"], error and error["type"]) == (
            429, "rate_limit_exceeded", "tokens")
    finally:
        fake.finish_hung()
        client.close()
        await gw.service.stopService()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_background_response_is_charged_when_it_is_read_finished(http, gw, fake):
    """Its create's answer (queued) has no usage: the read that finds it finished at its instance records and
    charges what it used, once (before, a background response cost nothing)."""
    key, client, created = await _done_in_background(http, gw, fake)
    try:
        for _ in range(2):  # the first read finds it finished; the second reads the gateway's copy
            assert (await in_thread(client.responses.retrieve, created.id)).status == "completed"
        await gw.service.usage.flush()
        code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
        assert sorted((r["model"], r["total_tokens"] or 0) for r in log["data"]) == [(MODEL, 0), (MODEL, 22)]
        with pytest.raises(openai.RateLimitError) as refused:
            await in_thread(raw_chat, client)
        assert refused.value.code == "budget_exceeded"
    finally:
        client.close()


async def _logged(reactor, http, gw, response_id):
    """The usage log's total tokens, sorted, once C{gw} charged the background response C{response_id} (its
    watch's hook, L{gomodel.api.background.BackgroundWatch.charged}: no clock; fails after a minute without)."""
    await with_timeout(reactor, gw.service.background_watch.charged(response_id), 60)
    await gw.service.usage.flush()
    code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
    return sorted(r["total_tokens"] or 0 for r in log["data"])


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_background_response_nobody_reads_is_charged_once_it_is_over(reactor, http, gw, fake):
    """The creating process asks its instance until it is over (before: only a read charged it, so a key
    that never read its background responses spent nothing)."""
    key, client, created = await _done_in_background(http, gw, fake)
    try:
        assert await _logged(reactor, http, gw, created.id) == [0, 22]
        asked = [r for r in fake.requests if r.path == f"/v1/responses/{created.id}".encode()]
        await gw.service.usage.flush()
        code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
        charged = [r for r in log["data"] if r["total_tokens"]]
        assert [(r["request_id"], r["auth_key_id"], r["endpoint"]) for r in charged] == [
            (created._request_id, key["id"], "/v1/responses")]  # (the create's request id)
        with pytest.raises(openai.RateLimitError) as refused:
            await in_thread(raw_chat, client)
        assert refused.value.code == "budget_exceeded"
        # No longer asked after, and a read now takes the stored answer.
        assert (await in_thread(client.responses.retrieve, created.id)).status == "completed"
        assert [r for r in fake.requests if r.path == f"/v1/responses/{created.id}".encode()] == asked
    finally:
        client.close()


@pytest.mark.utc_day
@pytest.mark.parametrize("status, usage, recorded", [
    ("failed", {"input_tokens": 19, "output_tokens": 1, "total_tokens": 20}, (502, 20)),
    ("cancelled", None, (499, 0)),
])
@pytest_twisted.ensureDeferred
async def test_a_background_response_that_failed_or_was_cancelled_is_recorded_so(reactor, http, gw, fake, status,
                                                                                  usage, recorded):
    """Before: recorded as a 200 when it had usage, not at all when it had none."""
    key, client, created = await _done_in_background(http, gw, fake)
    fake.stored_responses[created.id].update(status=status, usage=usage)
    try:
        assert await _logged(reactor, http, gw, created.id) == [0, recorded[1]]
        code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
        assert sorted((r["status_code"], r["total_tokens"] or 0) for r in log["data"]) == [(200, 0), recorded]
    finally:
        client.close()


async def _charged_by_the_next_process(reactor, http, fake, tmp_path, created, key):
    """Complete the background response C{created} (made with C{key}, 22 tokens) at the fake and start the next
    process on the store: it adopts the response's watch and charges C{key} for it, once. That process, running
    (its caller stops it)."""
    fake.stored_responses[created.id].update(status="completed", usage={"input_tokens": 19, "output_tokens": 3,
                                                                         "total_tokens": 22})
    two = await start(reactor, fake, tmp_path)
    try:
        assert await _logged(reactor, http, two, created.id) == [0, 22]
        code, log = await admin(http, two, "GET", "/admin/api/v1/usage/log")
        charged = [r for r in log["data"] if r["total_tokens"]]
        assert [(r["request_id"], r["auth_key_id"]) for r in charged] == [(created._request_id, key["id"])]
    except BaseException:
        await two.service.stopService()
        raise
    return two


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_background_response_whose_process_stopped_is_charged_by_the_one_that_adopts_it(reactor, http,
                                                                                                  fake, tmp_path):
    """A process that stops gives its watches up; the next process on the store adopts them at its start, asks
    after them and charges the key that made them, once (before: a restart while one ran, a deploy, meant
    it was never charged)."""
    one = await start(reactor, fake, tmp_path)
    try:
        key = await new_key(http, one, budgets=[{"period": "daily", "max_tokens": 20}])
        with openai_client(one, key["value"]) as client:
            created = await in_thread(client.responses.create, model=MODEL, input="long job", background=True)
        assert created.status == "queued"
    finally:
        await one.service.stopService()
    two = await _charged_by_the_next_process(reactor, http, fake, tmp_path, created, key)
    try:
        with openai_client(two, key["value"]) as client, pytest.raises(openai.RateLimitError) as refused:
            await in_thread(raw_chat, client)
        assert refused.value.code == "budget_exceeded"
    finally:
        await two.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_background_create_awaiting_its_answer_when_the_drain_runs_out_is_answered_kept_and_charged(
        reactor, http, fake, tmp_path):
    """The drain ran out of time while a background create waited for its instance's answer (which vLLM gives
    once it runs the response): it is waited for a moment more, answered queued, kept and watched (adopted by the
    next process on the store, which charges it). Before, it was answered 503 and its upstream connection closed
    while the instance ran the response: nothing kept or watched it, it was never charged, and the client,
    told 503, made it again."""
    one = await start(reactor, fake, tmp_path, SHUTDOWN_TIMEOUT="0.3s")
    stopping = None
    try:
        key = await new_key(http, one, budgets=[{"period": "daily", "max_tokens": 20}])
        with openai_client(one, key["value"]) as client:
            upstream = fake.next_request()
            creating = in_thread(client.responses.create, model=MODEL, input="long job", background=True,
                                 extra_body={"fake_delay": 1.0})
            await with_timeout(reactor, upstream, 10)
            stopping = one.service.stopService()
            created = await with_timeout(reactor, creating, 10)
        assert created.status == "queued"
    finally:
        await (stopping if stopping is not None else one.service.stopService())
    two = await _charged_by_the_next_process(reactor, http, fake, tmp_path, created, key)
    await two.service.stopService()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_background_response_read_by_the_master_key_is_charged_to_the_key_that_made_it(
        reactor, http, gw, fake):
    """Before: the read that found it finished charged the reader, and the master key has no budget."""
    key, client, created = await _done_in_background(http, gw, fake)
    master = openai_client(gw, MASTER)
    try:
        assert (await in_thread(master.responses.retrieve, created.id)).status == "completed"
        assert await _logged(reactor, http, gw, created.id) == [0, 22]
        with pytest.raises(openai.RateLimitError) as refused:
            await in_thread(raw_chat, client)
        assert refused.value.code == "budget_exceeded"
    finally:
        client.close()
        master.close()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_reads_of_a_background_response_at_once_charge_it_once(reactor, http, gw, fake, monkeypatch):
    """Reads that come while one asks its instance share that one's answer: one of them finds it finished and
    charges it (before: each asked, each found it finished, each charged it)."""
    from twisted.internet.defer import Deferred

    from gomodel.api.responses import ResponsesRoute
    from tests.support import until

    key, client, created = await _done_in_background(http, gw, fake, max_tokens=100)
    try:
        reads, gate = [], Deferred()
        record, refreshed = ResponsesRoute._record, ResponsesRoute._refreshed

        async def counted(route, request, response_id):
            found = await record(route, request, response_id)
            reads.append(response_id)  # (the read looks for a refresh under way right after this)
            return found

        async def held(route, *args):
            await gate
            return await refreshed(route, *args)

        monkeypatch.setattr(ResponsesRoute, "_record", counted)
        monkeypatch.setattr(ResponsesRoute, "_refreshed", held)
        auth = {"Authorization": f"Bearer {key['value']}"}
        answers = [http.get(f"{gw.url}/v1/responses/{created.id}", headers=auth) for _ in range(3)]
        await until(reactor, lambda: len(reads) == 3, what="three reads")
        gate.callback(None)
        for answer in answers:
            response = await answer
            assert response.code == 200 and (await response.json())["status"] == "completed"
        assert len([r for r in fake.requests if r.path == f"/v1/responses/{created.id}".encode()]) == 1
        # (the create, the read that found it: its record comes once the charge is done, after the answers)
        assert await _logged(reactor, http, gw, created.id) == [0, 22]
    finally:
        client.close()


# -- several processes: Redis ----------------------------------------------------------------


def _redis_or_skip():
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=1)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    return client


@contextmanager
def _redis_counters():
    """C{REDIS_URL} for gateways sharing Redis's counters (skipped without Redis), under a key prefix of the
    test's own (C{REDIS_KEY_PREFIX}), whose keys are deleted after (never another test's)."""
    redis_client = _redis_or_skip()
    try:
        with fresh_prefix(redis_client) as prefix:
            yield {"REDIS_URL": REDIS_URL, "REDIS_KEY_PREFIX": prefix + ":"}
    finally:
        redis_client.close()


@pytest.fixture
def redis_env(redis):
    """The environment of a test's gateways: Redis's counters (L{_redis_counters}) where its C{redis} parameter
    asks for them, else none."""
    if not redis:
        yield {}
        return
    with _redis_counters() as env:
        yield env


@pytest_twisted.async_yield_fixture()
async def redis_pair(reactor, fake, tmp_path):
    """Two gateways sharing Redis's counters (skipped without Redis); the counters they made are deleted after."""
    with _redis_counters() as env:
        one = await start(reactor, fake, tmp_path, **env)
        two = await start(reactor, fake, tmp_path, **env)
        try:
            yield one, two
        finally:
            await one.service.stopService()
            await two.service.stopService()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_two_gateways_on_redis_share_one_limit_exactly(http, redis_pair):
    one, two = redis_pair
    key = await new_key(http, one, rpm=3, budgets=[{"period": "daily", "max_tokens": 1000}])
    await two.service.keys.refresh()
    clients = [openai_client(one, key["value"]), openai_client(two, key["value"])]
    try:
        answers = 0
        for i in range(6):
            try:
                await in_thread(raw_chat, clients[i % 2])
                answers += 1
            except openai.RateLimitError:
                pass
        assert answers == 3  # not 3 per process
    finally:
        for client in clients:
            client.close()


async def _sequential_client_on_a_slow_redis(reactor, http, fake, tmp_path, env, held, marked, **fields):
    """A gateway on Redis (C{env}: L{_redis_counters}) through a L{HoldingProxy} holding C{held}'s commands
    (C{marked}'s count those that overtook one), a managed key of C{fields} (its id: the gateway's C{key_id}),
    and a client of it: C{(gateway, proxy, client)}."""
    from tests.redis_server import HoldingProxy

    proxy = HoldingProxy(reactor, held, marked)
    gateway = await start(reactor, fake, tmp_path, **dict(env, REDIS_URL=proxy.url))
    key = await new_key(http, gateway, **fields)
    gateway.key_id = key["id"]
    return gateway, proxy, openai_client(gateway, key["value"])


@pytest_twisted.ensureDeferred
async def test_a_sequential_client_is_never_refused_a_slot_its_last_request_still_frees_on_redis(
        reactor, http, fake, tmp_path):
    """With Redis's counters a request's slot is freed in a thread after its answer went out: a client's next
    request, admitted in another thread, could reach Redis first and be refused (429, max_concurrency=1) a slot
    it no longer held (as on a loaded host, where a thread may wait its turn a while). An admission now goes
    after the releases of its keys already under way."""
    from gomodel.limits.counters import _ADMIT, _FINISH
    from tests.redis_server import script_sha

    with _redis_counters() as env:
        gateway, proxy, client = await _sequential_client_on_a_slow_redis(
            reactor, http, fake, tmp_path, env, script_sha(_FINISH), script_sha(_ADMIT), max_concurrency=1)
        try:
            for _ in range(3):
                assert (await in_thread(raw_chat, client)).http_response.status_code == 200
            assert proxy.holds >= 2 and proxy.passed == 0  # (each release held; no admission overtook one)
        finally:
            client.close()
            await gateway.service.stopService()
            await proxy.close()


@pytest_twisted.ensureDeferred
async def test_a_sequential_client_behind_a_round_robin_balancer_is_never_refused_the_slot_it_frees(
        reactor, http, fake, tmp_path):
    """Two gateways on one Redis behind a round-robin balancer, a key of C{max_concurrency: 1} used by one client
    one request at a time: its request to one gateway frees its slot after the answer went out (here held on its
    way to Redis, as by a loaded host, until the other gateway's admission of the next request reached Redis),
    while its next request, to the other gateway, is admitted. That admission now waits a moment (about half a
    second at most) for a slot before it refuses; before, it was refused at once (a spurious 429: ordering a
    process's own writes cannot order another's). (Each release is let go when the other gateway's admission
    passed, not after a fixed hold: on a loaded host a release's own thread could take longer than the hold,
    and the two together longer than the admission's half second.)"""
    from gomodel.limits.counters import _ADMIT, _FINISH
    from tests.redis_server import HoldingProxy, script_sha

    with _redis_counters() as env:
        proxies = [HoldingProxy(reactor, script_sha(_FINISH), script_sha(_ADMIT), hold=None) for _ in range(2)]
        proxies[0].on_marked, proxies[1].on_marked = proxies[1].release, proxies[0].release
        gateways = [await start(reactor, fake, tmp_path, **dict(env, REDIS_URL=proxy.url)) for proxy in proxies]
        key = await new_key(http, gateways[0], max_concurrency=1)
        clients = [openai_client(gateway, key["value"]) for gateway in gateways]
        try:
            await gateways[1].service.keys.refresh()
            for turn in range(4):  # one, two, one, two: each after the last answer came
                answer = await in_thread(raw_chat, clients[turn % 2])
                assert answer.http_response.status_code == 200
                await proxies[turn % 2].when_held()  # (its release on its way, held until the next admission)
            assert proxies[0].holds >= 2 and proxies[1].holds >= 2
        finally:
            for client in clients:
                client.close()
            for gateway, proxy in zip(gateways, proxies):
                await proxy.close()
                await gateway.service.stopService()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_sequential_client_spends_its_budget_on_redis_before_its_next_check(reactor, http, fake, tmp_path):
    """A request's budget charge goes to Redis in a thread after its answer went out: the next request's check,
    in another thread, could read the sum without it and pass a spent budget. A check now reads after the
    charges of its sums already under way."""
    from gomodel.limits.counters import _RESERVE, _SETTLE
    from tests.redis_server import script_sha

    with _redis_counters() as env:
        gateway, proxy, client = await _sequential_client_on_a_slow_redis(
            reactor, http, fake, tmp_path, env, script_sha(_SETTLE), script_sha(_RESERVE),
            budgets=[{"period": "daily", "max_tokens": 40}])
        try:
            await in_thread(raw_chat, client)  # 21 tokens
            await in_thread(raw_chat, client)  # 42: spent
            with pytest.raises(openai.RateLimitError) as refused:
                await in_thread(raw_chat, client)
            assert refused.value.code == "budget_exceeded"
            assert proxy.holds >= 2 and proxy.passed == 0
        finally:
            client.close()
            await gateway.service.stopService()
            await proxy.close()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_budget_seeded_again_while_a_charge_is_on_its_way_to_redis_counts_it_once(
        reactor, http, fake, tmp_path):
    """A sum seeded again from the usage ledger (its budgets edited on any process: L{Gate.renew}) becomes the
    larger of the ledger's figure and what it holds; a charge still on its way to Redis, which the ledger
    counts already, was added after that: counted twice (42 of 21). The seed now goes after the charges of its
    sums under way."""
    from gomodel.limits.counters import _SEED, _SETTLE
    from tests.redis_server import script_sha

    with _redis_counters() as env:
        gateway, proxy, client = await _sequential_client_on_a_slow_redis(
            reactor, http, fake, tmp_path, env, script_sha(_SETTLE), script_sha(_SEED),
            budgets=[{"period": "daily", "max_tokens": 1000}])
        try:
            await in_thread(raw_chat, client)  # 21 tokens, its charge held on its way
            gateway.service.gate.renew(f"key:{gateway.key_id}")  # (its budgets edited on another process)
            response = await http.get(gateway.url + "/v1/usage", headers={"authorization": f"Bearer {client.api_key}"})
            assert [entry["spent"] for entry in (await response.json())["budgets"]] == [21]
            assert proxy.holds == 1 and proxy.passed == 0
        finally:
            client.close()
            await gateway.service.stopService()
            await proxy.close()


@pytest_twisted.ensureDeferred
async def test_a_refresh_that_fails_unexpectedly_answers_the_stored_response(http, gw, fake, monkeypatch,
                                                                             logged_errors):
    """An unexpected failure asking a background response's instance is logged, and its readers get the
    stored response, as when the instance cannot be reached (before: a 500, and an unhandled error)."""
    from gomodel.api.responses import ResponsesRoute

    client = openai_client(gw, MASTER)
    try:
        created = await in_thread(client.responses.create, model=MODEL, input="long job", background=True)

        async def broken(route, *args):
            raise RuntimeError("boom")

        monkeypatch.setattr(ResponsesRoute, "_refreshed", broken)
        response = await http.get(f"{gw.url}/v1/responses/{created.id}", headers={"Authorization": f"Bearer {MASTER}"})
        assert response.code == 200 and (await response.json())["status"] == "queued"
        assert [e["log_failure"].value.args for e in logged_errors] == [("boom",)]
        logged_errors.clear()
    finally:
        client.close()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_background_response_deleted_while_it_runs_is_charged_once_it_is_over(reactor, http, gw, fake):
    """A DELETE forgets the gateway's copy, not the run at its instance: the creating process still asks the
    instance until it is over and charges it (before: deleting it at once, before the first ask, left the
    run free of the key's budgets whatever it used)."""
    key, client, created = await _done_in_background(http, gw, fake)
    try:
        assert (await in_thread(client.responses.delete, created.id)) is None
        assert await _logged(reactor, http, gw, created.id) == [0, 22]
        with pytest.raises(openai.RateLimitError) as refused:
            await in_thread(raw_chat, client)
        assert refused.value.code == "budget_exceeded"
        with pytest.raises(openai.NotFoundError):  # (still forgotten: the asks stored nothing back)
            await in_thread(client.responses.retrieve, created.id)
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_x_gomodel_user_path_sent_twice_differently_is_a_400_naming_it(http, gw):
    """Which of two paths to charge would be a guess: a 400 naming the header (before, its message said to
    send the key once, and named no param)."""
    headers = {"Authorization": [f"Bearer {MASTER}"], "X-GoModel-User-Path": ["/team/a", "/team/b"]}
    response = await http.get(gw.url + "/v1/models", headers=headers)
    error = json.loads(await treq.content(response))["error"]
    assert response.code == 400
    assert (error["code"], error["param"]) == ("duplicate_header", "X-GoModel-User-Path")
    assert "key" not in error["message"]
    headers["X-GoModel-User-Path"] = ["/team/a", "/team/a"]  # (the same path twice: that path)
    assert (await http.get(gw.url + "/v1/models", headers=headers)).code == 200


@pytest.mark.utc_day
@pytest.mark.parametrize("redis", [False, True])
@pytest_twisted.ensureDeferred
async def test_gomodels_budget_resets_count_a_period_from_then_on_every_process(reactor, http, fake, tmp_path, redis,
                                                                                 redis_env):
    """GoModel's C{POST /budgets/reset-one} ({user_path, period}) and C{POST /budgets/reset} (every budget by user
    path, the configuration's too) set what a budget spent back to zero: the next request passes, a second
    process (sharing the store, and Redis's sums where configured) sees it at its next read of the budgets, and
    the listing shows C{last_reset_at} (before: both 405)."""
    config = tmp_path / "gomodel.yaml"
    config.write_text("budgets:\n  user_paths:\n    - path: /lab\n      limits:\n"
                      "        - {period: daily, max_tokens: 40}\n")
    env = redis_env
    gateways = []
    for _ in range(2):
        gateways.append(await start_gateway(reactor, dict({
            "VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": MASTER, "GOMODEL_DATA_DIR": str(tmp_path)},
            **env), yaml_path=str(config)))
    one, two = gateways
    clients = []
    try:
        code, _ = await admin(http, one, "PUT", "/admin/api/v1/budgets",
                              {"user_path": "/team", "period": "daily", "max_tokens": 40})
        assert code == 200
        code, missing = await admin(http, one, "POST", "/admin/api/v1/budgets/reset-one",
                                    {"user_path": "/team", "period": "weekly"})
        assert (code, missing["error"]["code"]) == (404, "budget_not_found")
        for path in ("/team/alpha", "/lab"):
            key = await new_key(http, one, user_path=path)
            await two.service.keys.refresh()
            clients.append((openai_client(one, key["value"]), openai_client(two, key["value"])))
        await two.service.gate.refresh()

        async def spend(client):
            await in_thread(raw_chat, client)  # 21 tokens
            await in_thread(raw_chat, client)  # 42: spent
            with pytest.raises(openai.RateLimitError) as refused:
                await in_thread(raw_chat, client)
            assert refused.value.code == "budget_exceeded"

        for first, _ in clients:
            await spend(first)
        code, answer = await admin(http, one, "POST", "/admin/api/v1/budgets/reset-one",
                                   {"user_path": "team", "period": "daily"})
        assert (code, answer["user_path"], answer["period"], answer["reset"]) == (200, "/team", "daily", 1)
        await two.service.gate.refresh()  # (every second on its own)
        await spend(clients[0][1])  # the other process: 42 more before it refuses again
        with pytest.raises(openai.RateLimitError):  # /lab's was not reset
            await in_thread(raw_chat, clients[1][0])
        code, answer = await admin(http, two, "POST", "/admin/api/v1/budgets/reset", {"confirmation": "reset"})
        assert (code, answer["reset"]) == (200, 2)
        await one.service.gate.refresh()
        for first, _ in clients:
            await in_thread(raw_chat, first)
        code, listed = await admin(http, one, "GET", "/admin/api/v1/budgets")
        rows = {row["user_path"]: row for row in listed["data"]}
        assert {path: (row["spent_tokens"], row["source"]) for path, row in rows.items()} == {
            "/lab": (21, "config"), "/team": (21, "admin")}
        assert all(row["last_reset_at"] == answer["reset_at"] for row in rows.values())
        assert all(entry["last_reset_at"] == answer["reset_at"] for entry in listed["budgets"])
    finally:
        for pair in clients:
            for client in pair:
                client.close()
        for gateway in gateways:
            await gateway.service.stopService()


@pytest.mark.utc_day
@pytest.mark.parametrize("redis", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_keys_own_budgets_are_reset_through_the_admin_api_on_every_process(reactor, http, fake, tmp_path,
                                                                                   redis, redis_env):
    """C{POST /auth-keys/{id}/budgets/reset} sets what a managed key's own budgets spent back to zero (C{{period}}:
    that one only): the next request passes, on a second process too once it reads the keys, the key shows
    C{last_reset_at}, and an edit of its budgets (the dashboard's save) keeps the reset (before: no route
    reset a key's own budget; C{/budgets/reset} resets those by user path only)."""
    env = redis_env
    gateways = [await start(reactor, fake, tmp_path, **env) for _ in range(2)]
    one, two = gateways
    key = await new_key(http, one, budgets=[{"period": "daily", "max_tokens": 40},
                                            {"period": "monthly", "max_tokens": 1000}])
    await two.service.keys.refresh()
    clients = [openai_client(one, key["value"]), openai_client(two, key["value"])]
    reset = f"{KEYS}/{key['id']}/budgets/reset"
    try:
        async def spend(client):
            await in_thread(raw_chat, client)  # 21 tokens
            await in_thread(raw_chat, client)  # 42: spent
            with pytest.raises(openai.RateLimitError) as refused:
                await in_thread(raw_chat, client)
            assert refused.value.code == "budget_exceeded"

        await spend(clients[0])
        code, missing = await admin(http, one, "POST", reset, {"period": "weekly"})
        assert (code, missing["error"]["code"], missing["error"]["param"]) == (404, "budget_not_found", "period")
        code, missing = await admin(http, one, "POST", f"{KEYS}/key_nope/budgets/reset", {})
        assert (code, missing["error"]["code"]) == (404, "auth_key_not_found")
        code, bad = await admin(http, one, "POST", reset, {"period": "daily", "user_path": "/x"})
        assert (code, bad["error"]["param"]) == (400, "user_path")
        code, answer = await admin(http, one, "POST", reset, {"period": "monthly"})
        assert code == 200
        with pytest.raises(openai.RateLimitError):  # (the daily budget is still spent)
            await in_thread(raw_chat, clients[0])
        code, answer = await admin(http, one, "POST", reset, {"period": "daily"})
        assert code == 200 and answer["id"] == key["id"]
        daily, monthly = answer["budgets"]
        assert (daily["period"], daily["spent_tokens"], monthly["spent_tokens"]) == ("daily", 0, 0)
        assert daily["last_reset_at"] is not None and monthly["last_reset_at"] is not None
        assert "reset_at" not in daily
        await two.service.keys.refresh()  # (every second on its own)
        await spend(clients[1])  # the other process: 42 more before it refuses again
        code, answer = await admin(http, two, "POST", reset)  # (no body: every budget of the key)
        assert code == 200
        await one.service.keys.refresh()
        await in_thread(raw_chat, clients[0])
        # Saved as the dashboard saves it (the budgets as they are, without what is shown beside them): the reset
        # stays; a budget of another period starts from the period's start.
        code, edited = await admin(http, one, "PATCH", f"{KEYS}/{key['id']}", {"budgets": [
            {"period": "daily", "max_tokens": 50}, {"period": "total", "max_tokens": 10000}]})
        assert code == 200
        daily, total = edited["budgets"]
        assert (daily["spent_tokens"], daily["last_reset_at"]) == (21, answer["budgets"][0]["last_reset_at"])
        assert total["spent_tokens"] > 21 and total["last_reset_at"] is None
        code, view = await admin(http, one, "GET", f"{KEYS}/{key['id']}")
        assert view["budgets"] == edited["budgets"]
    finally:
        for client in clients:
            client.close()
        for gateway in gateways:
            await gateway.service.stopService()


@pytest.mark.utc_day
@pytest.mark.parametrize("redis", [False, True])
@pytest.mark.parametrize("kind", ["key", "path"])
@pytest_twisted.ensureDeferred
async def test_a_request_in_flight_during_a_budget_reset_counts_in_the_period_it_was_admitted_in(
        reactor, http, fake, tmp_path, redis, kind, redis_env):
    """A request admitted before a budget reset and ending after it is charged to the sum it was admitted
    under, as the usage ledger counts it (by when it started), whichever budget was reset and whatever counts
    (before: with Redis, a user path's reset counted it in the new period, where a key's did not, nor either
    without Redis, and the ledger's seed then disagreed with the sum)."""
    env = redis_env
    gateway = await start(reactor, fake, tmp_path, **env)
    if kind == "key":
        key = await new_key(http, gateway, budgets=[{"period": "daily", "max_tokens": 1000}])
        reset, body = f"{KEYS}/{key['id']}/budgets/reset", None
    else:
        code, _ = await admin(http, gateway, "PUT", "/admin/api/v1/budgets",
                              {"user_path": "/team", "period": "daily", "max_tokens": 1000})
        key = await new_key(http, gateway, user_path="/team")
        reset, body = "/admin/api/v1/budgets/reset-one", {"user_path": "/team", "period": "daily"}
    client = openai_client(gateway, key["value"])
    fake.holding = True
    try:
        await in_thread(raw_chat, client)  # (its period's sum seeded: what follows is the lanes' way, if any)
        arrived = fake.next_request()
        held = in_thread(raw_chat, client, extra_body={"fake_hold": True})
        await with_timeout(reactor, arrived, 10)
        code, _ = await admin(http, gateway, "POST", reset, body)
        assert code == 200
        fake.release_holds()
        await held  # (21 tokens, charged as it ends: after the reset)
        await gateway.service.usage.flush()
        response = await http.get(gateway.url + "/v1/usage", headers={"authorization": f"Bearer {key['value']}"})
        budgets = json.loads(await treq.content(response))["budgets"]
        assert [entry["spent"] for entry in budgets] == [0]
        await in_thread(raw_chat, client)
        gateway.service.gate.renew(budgets[0]["scope"])  # seeded again from the ledger: it agrees
        response = await http.get(gateway.url + "/v1/usage", headers={"authorization": f"Bearer {key['value']}"})
        assert [entry["spent"] for entry in json.loads(await treq.content(response))["budgets"]] == [21]
    finally:
        fake.release_holds()
        client.close()
        await gateway.service.stopService()


@pytest_twisted.ensureDeferred
async def test_x_gomodel_user_path_attributes_an_open_gateways_requests_to_a_path(reactor, http, fake, tmp_path):
    """Without a master key, a request without a key naming C{X-GoModel-User-Path} is that path's: its limits
    apply, the ledger records it under the path (before: ignored, as the found-and-left note said)."""
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_DATA_DIR": str(tmp_path),
                                            "SET_RATE_LIMIT_TEAM__A": "rpm=1", "USAGE_FLUSH_INTERVAL": "1h"})
    client = openai_client(gateway, "unused")
    client.api_key = ""
    try:
        team_a = {"X-GoModel-User-Path": "/team/a", "Authorization": ""}
        assert (await in_thread(raw_chat, client, extra_headers=team_a)).http_response.status_code == 200
        with pytest.raises(openai.RateLimitError):
            await in_thread(raw_chat, client, extra_headers=team_a)
        await in_thread(raw_chat, client, extra_headers={"Authorization": ""})  # no path: no limit
        await in_thread(raw_chat, client, extra_headers={"Authorization": ""})
        await gateway.service.usage.flush()
        response = await http.get(gateway.url + "/admin/api/v1/usage/log?user_path=/team/a")
        assert [(r["user_path"], r["outcome"]) for r in json.loads(await response.content())["data"]] == [
            ("/team/a", "refused"), ("/team/a", "ok")]
    finally:
        client.close()
        await gateway.service.stopService()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_root_budget_and_limit_hold_for_managed_keys_without_a_path(reactor, http, fake, tmp_path):
    """A key without a user path is at the root: C{/}'s budget and rate limit hold for it, and a restarted
    process counts what it spent from the ledger (before: neither held; the master key's own requests still
    spend nothing)."""
    env = {"SET_RATE_LIMIT_": "rpm=100"}
    gateway = await start(reactor, fake, tmp_path, **env)
    try:
        code, _ = await admin(http, gateway, "PUT", "/admin/api/v1/budgets",
                              {"user_path": "/", "period": "daily", "max_tokens": 40})
        assert code == 200
        key = await new_key(http, gateway)  # (no user path)
        client = openai_client(gateway, key["value"])
        master = openai_client(gateway, MASTER)
        try:
            response = await in_thread(raw_chat, client)  # 21 tokens
            assert response.headers["x-ratelimit-limit-requests"] == "100"
            for _ in range(3):
                await in_thread(raw_chat, master)  # the master key's: not the root's
        finally:
            master.close()
    finally:
        client.close()
        await gateway.service.stopService()
    gateway = await start(reactor, fake, tmp_path, **env)  # seeded from the ledger: 21 spent
    client = openai_client(gateway, key["value"])
    try:
        await in_thread(raw_chat, client)  # 42
        with pytest.raises(openai.RateLimitError) as refused:
            await in_thread(raw_chat, client)
        assert refused.value.code == "budget_exceeded" and "path:/" in refused.value.message
    finally:
        client.close()
        await gateway.service.stopService()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_restarted_gateway_admits_nothing_before_it_read_the_budgets_set_through_the_admin_api(
        reactor, http, fake, tmp_path, monkeypatch):
    """A gateway's first read of the budgets set through the admin API runs as it starts: requests that came
    before it ended were admitted without them (a spent budget passed; the root's budget test failed so on a
    loaded host). They now wait for that read."""
    from gomodel.store.sqlite.keys import SQLiteBudgetStore

    gateway = await start(reactor, fake, tmp_path)
    try:
        code, _ = await admin(http, gateway, "PUT", "/admin/api/v1/budgets",
                              {"user_path": "/team", "period": "daily", "max_tokens": 10})
        assert code == 200
        key = await new_key(http, gateway, user_path="/team")
        client = openai_client(gateway, key["value"])
        await in_thread(raw_chat, client)  # 21 tokens: spent
        client.close()
    finally:
        await gateway.service.stopService()
    listed = SQLiteBudgetStore.list
    # (the store's read a second late, as on a loaded host: before, the request was admitted meanwhile)
    monkeypatch.setattr(SQLiteBudgetStore, "list", lambda store: deferLater(reactor, 1.0, listed, store))
    gateway = await start(reactor, fake, tmp_path)
    client = openai_client(gateway, key["value"])
    try:
        with pytest.raises(openai.RateLimitError) as refused:
            await in_thread(raw_chat, client)
        assert refused.value.code == "budget_exceeded" and "path:/team" in refused.value.message
    finally:
        client.close()
        await gateway.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_gateway_whose_budgets_cannot_be_read_at_start_admits_after_a_bound(reactor, http, fake, tmp_path,
                                                                                   monkeypatch):
    """The wait for that first read is bounded (FIRST_READ_WAIT): a store that never answers holds requests
    that long, then they go on without the budgets, as while it cannot be read later."""
    from twisted.internet.defer import Deferred

    from gomodel.limits import gate
    from gomodel.store.sqlite.keys import SQLiteBudgetStore

    monkeypatch.setattr(gate, "FIRST_READ_WAIT", 0.5)
    monkeypatch.setattr(SQLiteBudgetStore, "list", lambda store: Deferred())  # never answers
    gateway = await start(reactor, fake, tmp_path, SET_RATE_LIMIT_TEAM="rpm=100")
    key = await new_key(http, gateway, user_path="/team")
    client = openai_client(gateway, key["value"])
    try:
        assert (await in_thread(raw_chat, client)).http_response.status_code == 200
    finally:
        client.close()
        await gateway.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_master_keys_requests_do_not_wait_for_the_first_read_of_the_budgets(reactor, http, fake, tmp_path,
                                                                                       monkeypatch):
    """Only a managed key's (or a user path's) requests have budgets: while that first read is still out, the
    master key's chat and a managed key's token count go on at once (before, every request waited for it, up to
    FIRST_READ_WAIT), and a managed key's chat waits for it."""
    from twisted.internet.defer import Deferred

    from gomodel.limits import gate
    from gomodel.store.sqlite.keys import SQLiteBudgetStore

    monkeypatch.setattr(gate, "FIRST_READ_WAIT", 60.0)
    read = Deferred()
    listed = SQLiteBudgetStore.list
    monkeypatch.setattr(SQLiteBudgetStore, "list", lambda store: read.addCallback(lambda _: listed(store)))
    gateway = await start(reactor, fake, tmp_path)
    master = openai_client(gateway, MASTER)
    try:
        answered = await with_timeout(reactor, in_thread(raw_chat, master), 10)
        assert answered.http_response.status_code == 200
        key = await new_key(http, gateway, budgets=[{"period": "daily", "max_tokens": 1000}])
        counted = await with_timeout(reactor, http.post(
            gateway.url + "/v1/messages/count_tokens", json={"model": MODEL, "messages": [
                {"role": "user", "content": "hi"}]}, headers={"x-api-key": key["value"],
                                                             "anthropic-version": "2023-06-01"}), 10)
        assert counted.code == 200, await counted.text()
        await counted.content()
        client = openai_client(gateway, key["value"])
        waiting = in_thread(raw_chat, client)
        await until(reactor, lambda: gateway.service.gate._unread, what="the key's chat held until the first read")
        assert not waiting.called
        read.callback(None)
        assert (await with_timeout(reactor, waiting, 10)).http_response.status_code == 200
        client.close()
    finally:
        master.close()
        if not read.called:
            read.callback(None)
        await gateway.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_keys_budget_reset_takes_gomodels_period_forms(http, gw):
    """C{POST /auth-keys/{id}/budgets/reset} takes a period as C{/budgets/reset-one} does: GoModel's C{day},
    its seconds (a number or text, or C{period_seconds}), any case (before: only C{hourly|daily|...})."""
    key = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": 40}])
    reset = f"{KEYS}/{key['id']}/budgets/reset"
    for body in ({"period": "day"}, {"period": "86400"}, {"period": 86400}, {"period_seconds": 86400},
                 {"period": " Daily "}):
        code, answer = await admin(http, gw, "POST", reset, body)
        assert code == 200 and answer["budgets"][0]["last_reset_at"] is not None, (body, answer)
    code, bad = await admin(http, gw, "POST", reset, {"period": "fortnight"})
    assert (code, bad["error"]["param"]) == (400, "period")
    code, missing = await admin(http, gw, "POST", reset, {"period_seconds": 3600})
    assert (code, missing["error"]["code"], missing["error"]["param"]) == (404, "budget_not_found", "period")


@pytest_twisted.ensureDeferred
async def test_a_keys_budgets_take_gomodels_period_forms_when_made_and_patched(http, gw):
    """A key's budgets, when it is made (C{POST /auth-keys}) and patched, take a period in the forms its reset
    and the path routes take (one parser): GoModel's C{day}, its seconds (a number or text) or
    C{period_seconds}, any case; each kept as its name (before: only C{hourly|daily|...}, a 400 otherwise)."""
    key = await new_key(http, gw, budgets=[{"period": "day", "max_tokens": 40}, {"period_seconds": 3600,
                                                                               "max_cost": 2.5}])
    assert [(b["period"], b.get("max_tokens"), b.get("max_cost")) for b in key["budgets"]] == [
        ("daily", 40, None), ("hourly", None, 2.5)]
    patch = f"{KEYS}/{key['id']}"
    for given, name in (({"period": "86400"}, "daily"), ({"period": 604800}, "weekly"),
                        ({"period_seconds": "2592000"}, "monthly"), ({"period": " Weeks "}, "weekly"),
                        ({"period": "daily", "period_seconds": 86400}, "daily"), ({"period": "total"}, "total")):
        code, view = await admin(http, gw, "PATCH", patch, {"budgets": [dict(given, max_tokens=7)]})
        assert code == 200 and [b["period"] for b in view["budgets"]] == [name], (given, view)
    code, view = await admin(http, gw, "GET", patch)
    assert [(b["period"], b["max_tokens"]) for b in view["budgets"]] == [("total", 7)]
    for budgets, problem in (([{"period": "fortnight", "max_tokens": 1}], "its period must be one of"),
                             ([{"period_seconds": 7200, "max_tokens": 1}], "its period_seconds must be one of"),
                             ([{"period": "day", "period_seconds": 3600, "max_tokens": 1}],
                              "its period_seconds names another period"),
                             ([{"max_tokens": 1}], "each needs a period"),
                             ([{"period": "day", "max_tokens": 1}, {"period": 86400, "max_tokens": 2}],
                              "the period daily is given twice")):
        for method, path in (("PATCH", patch), ("POST", KEYS)):
            code, bad = await admin(http, gw, method, path, {"name": "x", "budgets": budgets})
            assert (code, bad["error"]["param"]) == (400, "budgets"), (budgets, bad)
            assert problem in bad["error"]["message"], (budgets, bad)
    # The budgets by path take period_seconds as well (the same parser), and its forms agree with the route's.
    code, put = await admin(http, gw, "PUT", "/admin/api/v1/budgets", {"user_path": "/team", "period_seconds": 86400,
                                                                        "max_tokens": 9})
    assert code == 200, put
    code, put = await admin(http, gw, "PUT", "/admin/api/v1/budgets/team/day", {"period": 86400, "max_tokens": 8})
    assert code == 200, put
    code, bad = await admin(http, gw, "PUT", "/admin/api/v1/budgets", {"user_path": "/team", "period_seconds": 7,
                                                                        "max_tokens": 9})
    assert (code, bad["error"]["param"]) == (400, "period_seconds")
    code, deleted = await admin(http, gw, "DELETE", "/admin/api/v1/budgets", {"user_path": "/team",
                                                                               "period_seconds": 86400})
    assert code == 200 and deleted["deleted"], deleted


@pytest_twisted.ensureDeferred
async def test_resetting_the_budgets_of_a_key_without_any_is_budget_not_found(http, gw):
    """A key with no budgets has none to reset: 404 C{budget_not_found} (C{param} null), as C{reset-one} answers
    for a path without one (before: 200, and C{[]} written back)."""
    key = await new_key(http, gw)
    code, missing = await admin(http, gw, "POST", f"{KEYS}/{key['id']}/budgets/reset")
    assert (code, missing["error"]["code"], missing["error"]["param"]) == (404, "budget_not_found", None)
    code, view = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
    assert view["updated_at"] == key["updated_at"]


@pytest_twisted.ensureDeferred
async def test_a_keys_budget_reset_and_a_patch_of_its_budgets_at_once_lose_neither(http, gw):
    """A reset of a key's budgets and a PATCH of them sent at once: the key keeps the PATCH's budgets and the
    reset (before: each read the budgets, then wrote them back, and the later write undid the other's)."""
    for n in range(8):
        key = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": 40}])
        patched, reset = await gatherResults([
            defer.ensureDeferred(admin(http, gw, "PATCH", f"{KEYS}/{key['id']}", {"budgets": [
                {"period": "daily", "max_tokens": 50 + n}]})),
            defer.ensureDeferred(admin(http, gw, "POST", f"{KEYS}/{key['id']}/budgets/reset"))])
        assert (patched[0], reset[0]) == (200, 200)
        code, view = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
        (daily,) = view["budgets"]
        assert (daily["max_tokens"], daily["last_reset_at"] is not None) == (50 + n, True), (n, view)


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_keys_budget_removed_and_set_again_keeps_its_reset(http, gw):
    """A key's budget reset is kept while its period runs, whatever edits of the budgets come between: one
    removed and set again counts from its reset, as a path's budget deleted and put again does (before: from
    its period's start, what was spent before the reset counted again)."""
    key = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": 40}])
    client = openai_client(gw, key["value"])
    try:
        await in_thread(raw_chat, client)  # 21 tokens
        await gw.service.usage.flush()
        code, reset = await admin(http, gw, "POST", f"{KEYS}/{key['id']}/budgets/reset")
        assert code == 200 and reset["budgets"][0]["spent_tokens"] == 0
        for budgets in ([], [{"period": "monthly", "max_tokens": 100}],
                        [{"period": "daily", "max_tokens": 50}]):
            code, edited = await admin(http, gw, "PATCH", f"{KEYS}/{key['id']}", {"budgets": budgets})
            assert code == 200
        (daily,) = edited["budgets"]
        assert (daily["spent_tokens"], daily["last_reset_at"]) == (0, reset["budgets"][0]["last_reset_at"])
        await in_thread(raw_chat, client)
        await in_thread(raw_chat, client)  # 42 of 50 since the reset: the 21 before it do not count
    finally:
        client.close()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_reset_budgets_period_start_is_its_reset(http, gw):
    """After a reset, a budget's C{period_start} is the reset's time (C{last_reset_at}), from which what it shows
    spent counts, as GoModel shows it: a key's and a path's, in the admin views and the key's C{/v1/usage}
    (before: the calendar period's start, though the spend counted from the reset)."""
    code, _ = await admin(http, gw, "PUT", "/admin/api/v1/budgets",
                          {"user_path": "/team", "period": "daily", "max_tokens": 1000})
    key = await new_key(http, gw, user_path="/team", budgets=[{"period": "monthly", "max_tokens": 40}])
    code, listing = await admin(http, gw, "GET", "/admin/api/v1/budgets")
    calendar = listing["data"][0]["period_start"]
    code, answer = await admin(http, gw, "POST", f"{KEYS}/{key['id']}/budgets/reset")
    (monthly,) = answer["budgets"]
    assert monthly["period_start"] == monthly["last_reset_at"] is not None
    code, answer = await admin(http, gw, "POST", "/admin/api/v1/budgets/reset-one",
                               {"user_path": "/team", "period": "daily"})
    assert code == 200
    code, answer = await admin(http, gw, "GET", "/admin/api/v1/budgets")
    (ours,) = answer["data"]
    assert ours["period_start"] == ours["last_reset_at"] is not None and ours["period_start"] >= calendar
    (gomodels,) = answer["budgets"]
    assert (gomodels["period_start"], 0 <= gomodels["period_ratio"] <= 1) == (ours["last_reset_at"], True)
    response = await http.get(gw.url + "/v1/usage", headers={"authorization": f"Bearer {key['value']}"})
    shown = {entry["period_label"]: entry["period_start"]
             for entry in json.loads(await treq.content(response))["budgets"]}
    assert shown == {"monthly": monthly["last_reset_at"], "daily": ours["last_reset_at"]}


@pytest_twisted.ensureDeferred
async def test_a_reset_from_a_past_period_is_still_its_last_reset_but_no_longer_its_period_start(http, gw):
    """C{last_reset_at} is when a budget was last reset, in whichever period, as GoModel's budget keeps and shows
    its C{last_reset_at}; whether that reset still counts is C{period_start}: the reset's time while it is in the
    current period, the period's own start once a new period began (the whole period's spend counts again)."""
    key = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": 40}])
    now = time.time()
    today = now - now % 86400
    yesterday = today - 3600  # (a reset made in the last period)

    def reset_yesterday(record):
        return {"budgets": [dict(item, reset_at=yesterday) for item in record["budgets"]],
                "budget_resets": {"daily": yesterday}}

    await gw.service.store.keys.edit(key["id"], reset_yesterday)
    code, view = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
    (daily,) = view["budgets"]
    assert daily["last_reset_at"] == iso(yesterday)
    # (today's start; a later day's had midnight passed meanwhile: the reset is in a past period either way)
    assert daily["period_start"] >= iso(today) > daily["last_reset_at"]
    assert daily["period_start"].endswith("T00:00:00Z")


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_stream_left_early_is_charged_an_estimate_of_its_prompt(reactor, http, gw, fake):
    """A chat or completions stream cut before its usage chunk is charged its prompt, estimated from the
    request (its text / 4), and the output its events carried (before: those events alone, about one token,
    though the upstream read the whole prompt: a key could send huge prompts past its budget and tpm limit,
    leaving after the first event). A stream that ends properly is charged the upstream's usage, exactly."""
    key = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": 10**6}])
    headers = {"authorization": f"Bearer {key['value']}"}
    prompt = "lorem ipsum " * 2000  # 24,000 characters: about 6,000 tokens
    chat = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True, "fake_chunks": 50,
            "fake_pace": 0.1}
    completion = {"model": MODEL, "prompt": prompt, "stream": True, "fake_chunks": 50, "fake_pace": 0.1}
    for request in (chat_request(chat, headers=headers),
                    chat_request(completion, headers=headers).replace(b"/v1/chat/completions", b"/v1/completions", 1)):
        client = await connect(reactor, gw.port, request)
        await with_timeout(reactor, client.wait_for(b"data:"), 10)
        client.transport.abortConnection()
        await client.lost
    for _ in range(100):  # (an abandoned stream's request completes once its upstream side closed)
        await gw.service.usage.flush()
        code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
        if len(log["data"]) == 2:
            break
    assert [(r["endpoint"], r["estimated"], r["input_tokens"]) for r in log["data"]] == [
        ("/v1/completions", True, 6000), ("/v1/chat/completions", True, 6000 + 1)]  # (+ "user")
    assert all(r["output_tokens"] >= 1 for r in log["data"])
    code, view = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
    left = sum(r["total_tokens"] for r in log["data"])
    assert view["budgets"][0]["spent_tokens"] == left > 12000

    whole = dict(chat, fake_pace=0, stream_options={"include_usage": True})
    response = await http.post(gw.url + "/v1/chat/completions", data=json.dumps(whole).encode(),
                               headers=dict(headers, **{"content-type": "application/json"}))
    events = (await treq.content(response)).split(b"\n\n")
    usage = json.loads([e for e in events if b'"usage":{' in e][-1][len(b"data: "):])["usage"]
    await gw.service.usage.flush()
    code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
    assert (log["data"][0]["estimated"], log["data"][0]["input_tokens"], log["data"][0]["output_tokens"]) == (
        False, usage["prompt_tokens"], usage["completion_tokens"])
    code, view = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
    assert view["budgets"][0]["spent_tokens"] == left + usage["total_tokens"]


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_request_left_before_its_answer_is_charged_an_estimate_of_its_prompt(reactor, http, gw, fake):
    """A request whose client left while the upstream worked on it (a whole answer not come yet, a stream
    before its head) is charged its prompt, estimated (before: nothing at all, the upstream having read it)."""
    key = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": 10**6}])
    headers = {"authorization": f"Bearer {key['value']}"}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "lorem ipsum " * 2000}], "fake_hang": True}
    for body in (chat, dict(chat, stream=True)):
        arrived = fake.next_request()
        client = await connect(reactor, gw.port, chat_request(body, headers=headers))
        await with_timeout(reactor, arrived, 10)
        client.transport.abortConnection()
        await client.lost
    for _ in range(100):
        await gw.service.usage.flush()
        code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
        if len(log["data"]) == 2:
            break
    assert [(r["status_code"], r["estimated"], r["input_tokens"], r["total_tokens"]) for r in log["data"]] == [
        (499, True, 6001, 6001)] * 2
    code, view = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
    assert view["budgets"][0]["spent_tokens"] == 2 * 6001


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_request_its_upstream_never_answered_is_charged_an_estimate_of_its_prompt(reactor, http, fake,
                                                                                           tmp_path):
    """A request sent upstream whose answer never came (the upstream timed out, or closed the connection before
    its answer or in the middle of it) is charged its prompt, estimated, as one whose client left early: the
    upstream read it (before: nothing, so a key could send huge prompts to a slow upstream past its budget and
    tpm). One that never reached the upstream (its connection refused) costs nothing."""
    from tests.fakes.fleet import FakeReplica

    replica = await FakeReplica(reactor).start()
    gw = await start(reactor, fake, tmp_path, VLLM_B_BASE_URL=replica.base_url, HTTP_RESPONSE_HEADER_TIMEOUT="0.5s")
    try:
        key = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": 10**6}])
        headers = {"authorization": f"Bearer {key['value']}"}
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "lorem ipsum " * 2000}]}
        cases = ((dict(chat, fake_hang=True), 504), (dict(chat, fake_hang=True, stream=True), 504),
                 (dict(chat, fake_drop=True), 502), (dict(chat, fake_cut=True), 502))
        for body, status in cases:
            answer = await http.post(gw.url + "/v1/chat/completions", json=body, headers=headers)
            assert answer.code == status, (body, answer.code, await answer.text())
        await replica.refuse()
        answer = await http.post(gw.url + "/v1/chat/completions", json=dict(chat, model="vllm-b/" + MODEL[5:]),
                                 headers=headers)
        assert (answer.code, (await answer.json())["error"]["code"]) == (502, "upstream_unreachable")
        for _ in range(100):
            await gw.service.usage.flush()
            code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
            if len(log["data"]) == 4:
                break
            await deferLater(reactor, 0.05, lambda: None)
        # (the refused request reached no upstream: no record, as for any such request)
        assert [(r["status_code"], r["estimated"], r["input_tokens"]) for r in reversed(log["data"])] == [
            (504, True, 6001), (504, True, 6001), (502, True, 6001), (502, True, 6001)]
        code, view = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
        assert view["budgets"][0]["spent_tokens"] == 4 * 6001
    finally:
        await gw.service.stopService()
        await replica.stop()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_batch_line_its_upstream_never_answered_is_charged_an_estimate_of_its_prompt(reactor, http, fake,
                                                                                               tmp_path):
    """A batch line sent upstream whose answer never came (the upstream timed out, or lost the connection once
    the line was sent, however many times it was retried) is charged its prompt, estimated, once, as an online
    request is: recorded with its error's status (before: nothing, so a key's batch of large prompts to a slow
    upstream cost nothing, batch lines being no part of its rate limits either)."""
    gw = await start(reactor, fake, tmp_path, HTTP_RESPONSE_HEADER_TIMEOUT="0.5s", BATCH_MAX_ATTEMPTS="2")
    try:
        key = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": 10**6}])
        sdk = openai_client(gw, key["value"])
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "lorem ipsum " * 2000}]}
        lines = b"".join(json.dumps({"custom_id": name, "method": "POST", "url": "/v1/chat/completions",
                                     "body": dict(chat, **steer)}).encode() + b"\n"
                         for name, steer in (("hung", {"fake_hang": True}), ("dropped", {"fake_drop": True})))
        uploaded = await in_thread(sdk.files.create, file=("in.jsonl", io.BytesIO(lines)), purpose="batch")
        batch = await in_thread(sdk.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                completion_window="24h")
        await gw.service.batch_runner.settled(batch.id)
        batch = await in_thread(sdk.batches.retrieve, batch.id)
        sdk.close()
        assert batch.request_counts.failed == 2
        for _ in range(100):
            await gw.service.usage.flush()
            code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
            if len(log["data"]) == 2:
                break
            await deferLater(reactor, 0.05, lambda: None)
        assert sorted((r["status_code"], r["estimated"], r["input_tokens"], r["auth_key_id"]) for r in log["data"]) == [
            (502, True, 6001, key["id"]), (504, True, 6001, key["id"])]
        code, view = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
        assert view["budgets"][0]["spent_tokens"] == 2 * 6001
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_batch_creation_and_a_keys_other_refusals(http, gw, fake):
    """A batch and its key's rate limits, state and models at creation: a key at its rpm still creates (and
    runs) a batch (batches are not counted against rate limits, as OpenAI's); a deactivated or expired key is a
    401 (an expired key's too: the key ring finds neither); a model the key may not use fails an OpenAI batch's validation (model_access_denied, as OpenAI
    validates a file after creation) and refuses a message batch at creation (403 permission_error)."""
    limited = await new_key(http, gw, rpm=1, models=["vllm/"])
    client = openai_client(gw, limited["value"])
    messages = anthropic.Anthropic(base_url=gw.url, api_key=limited["value"], max_retries=0, timeout=10)
    try:
        uploaded = await in_thread(batch_file, client, "a")
        await in_thread(raw_chat, client)
        with pytest.raises(openai.RateLimitError):
            await in_thread(raw_chat, client)
        batch = await in_thread(client.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                completion_window="24h")
        await gw.service.batch_runner.settled(batch.id)
        assert (await in_thread(client.batches.retrieve, batch.id)).request_counts.completed == 1
        lines = [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}}]
        elsewhere = await in_thread(client.files.create, purpose="batch", file=(
            "in.jsonl", io.BytesIO(json.dumps(lines[0]).encode() + b"\n")))
        batch = await in_thread(client.batches.create, input_file_id=elsewhere.id, endpoint="/v1/chat/completions",
                                completion_window="24h")
        await gw.service.batch_runner.settled(batch.id)
        failed = await in_thread(client.batches.retrieve, batch.id)
        assert failed.status == "failed" and failed.errors.data[0].code in ("model_access_denied", "model_not_found")
        with pytest.raises((anthropic.PermissionDeniedError, anthropic.NotFoundError)):
            await in_thread(messages.messages.batches.create, requests=[{"custom_id": "a", "params": {
                "model": "openai/gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}}])
        code, _ = await admin(http, gw, "POST", f"{KEYS}/{limited['id']}/deactivate")  # (as an expired key's)
        assert code == 200
        with pytest.raises(openai.AuthenticationError):
            await in_thread(client.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                            completion_window="24h")
        with pytest.raises(anthropic.AuthenticationError):
            await in_thread(messages.messages.batches.create, requests=[{"custom_id": "a", "params": {
                "model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}}])
    finally:
        client.close()
        messages.close()



@pytest.mark.utc_day
@pytest.mark.parametrize("redis", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_streamed_background_response_whose_client_leaves_is_charged_once(reactor, http, fake, tmp_path,
                                                                                    redis, redis_env):
    """A background response streamed (C{background: true, stream: true}) whose client leaves after its first
    event goes on at its instance: its watch charges what it used once it is over, and nothing else is charged
    for it (no estimate of its prompt besides, in the usage ledger, its key's budgets or its token window, which
    keeps what the create reserved)."""
    gw = await start(reactor, fake, tmp_path, **redis_env)
    key = await new_key(http, gw, tpm=60000, budgets=[{"period": "daily", "max_tokens": 10**6}])
    client = openai_client(gw, key["value"])
    prompt = "lorem ipsum " * 500  # about 1,500 tokens by the estimate

    def left():
        events = client.responses.create(model=MODEL, input=prompt, background=True, stream=True,
                                         max_output_tokens=50, extra_body={"fake_hang_after": 2})
        try:
            return next(iter(events)).response.id
        finally:
            events.close()

    def window():
        answer = client.get("/usage", cast_to=object)  # (the client is at /v1)
        (tpm,) = answer["rate_limits"]
        return tpm["tokens_used"]

    try:
        created = await in_thread(left)
        await until(reactor, lambda: gw.service.drain.in_flight == 0)  # (the gateway saw the client leave)
        reserved = len(json.dumps({"model": MODEL[5:], "input": prompt, "background": True, "stream": True,
                                   "max_output_tokens": 50, "fake_hang_after": 2})) // 4 + 50
        used = await in_thread(window)  # (refilled 1,000 tokens a second since)
        assert reserved - 1500 < used <= reserved + 10
        fake.stored_responses[created].update(status="completed", usage={"input_tokens": 19, "output_tokens": 3,
                                                                         "total_tokens": 22})
        assert await _logged(reactor, http, gw, created) == [0, 22]
        await deferLater(reactor, 0.5, lambda: None)  # (nothing more comes)
        assert await _logged(reactor, http, gw, created) == [0, 22]
        code, view = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
        assert view["budgets"][0]["spent_tokens"] == 22
    finally:
        fake.finish_hung()
        client.close()
        await gw.service.stopService()


@pytest.mark.utc_day
@pytest.mark.parametrize("redis", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_streamed_background_response_whose_client_leaves_before_its_first_event_is_watched(
        reactor, http, fake, tmp_path, redis, redis_env):
    """A background response streamed (C{background: true, stream: true}) whose client leaves before its first
    event reached the gateway goes on at its instance as well: the gateway names it (vLLM makes a response's id of
    the body's C{request_id}), keeps it queued and watches it, so it is read, and charged what it used once over,
    and nothing else (before, it had no watch: its prompt's estimate was charged, never what it used, and it was a
    404 to its client)."""
    gw = await start(reactor, fake, tmp_path, **redis_env)
    key = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": 10**6}])
    client = openai_client(gw, key["value"])
    prompt = "lorem ipsum " * 500  # about 1,500 tokens by the estimate
    body = {"model": MODEL, "input": prompt, "background": True, "stream": True, "fake_hang_after": 0}
    try:
        sending = http.post(gw.url + "/v1/responses", data=json.dumps(body).encode(),
                            headers={"authorization": f"Bearer {key['value']}", "content-type": "application/json"})
        await until(reactor, lambda: fake.hung)  # (at its instance, which sent nothing yet)
        sending.cancel()  # the client leaves
        with pytest.raises(ResponseNeverReceived):  # (of its CancelledError)
            await sending
        await until(reactor, lambda: gw.service.drain.in_flight == 0)  # (the gateway saw the client leave)
        [response_id] = list(fake.stored_responses)  # (named by the gateway)
        assert [r.body["request_id"] for r in fake.requests if r.path == b"/v1/responses"] == [response_id]
        assert (await in_thread(client.responses.retrieve, response_id)).status == "queued"
        fake.stored_responses[response_id].update(status="completed", usage={"input_tokens": 19, "output_tokens": 3,
                                                                             "total_tokens": 22})
        assert await _logged(reactor, http, gw, response_id) == [0, 22]
        assert (await in_thread(client.responses.retrieve, response_id)).status == "completed"
        code, view = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
        assert view["budgets"][0]["spent_tokens"] == 22
    finally:
        fake.finish_hung()
        client.close()
        await gw.service.stopService()


@pytest.mark.utc_day
@pytest_twisted.ensureDeferred
async def test_a_streamed_background_response_its_instance_dropped_when_its_client_left_ends_failed(
        reactor, http, fake, tmp_path):
    """A vLLM that drops a background stream's creation when its client leaves before its first event never makes
    it: its watch, finding its instance does not know it, ends it C{failed} with an error saying so (not that the
    instance restarted), records it a 502 with nothing used and charges nothing; it is never queued for ever."""
    gw = await start(reactor, fake, tmp_path)
    key = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": 10**6}])
    client = openai_client(gw, key["value"])
    body = {"model": MODEL, "input": "long job", "background": True, "stream": True, "fake_hang_after": 0}
    try:
        sending = http.post(gw.url + "/v1/responses", data=json.dumps(body).encode(),
                            headers={"authorization": f"Bearer {key['value']}", "content-type": "application/json"})
        await until(reactor, lambda: fake.hung)
        sending.cancel()  # the client leaves
        with pytest.raises(ResponseNeverReceived):
            await sending
        await until(reactor, lambda: gw.service.drain.in_flight == 0)
        [response_id] = list(fake.stored_responses)
        del fake.stored_responses[response_id]  # (its instance dropped it with its stream)
        fake.hung.clear()
        assert await _logged(reactor, http, gw, response_id) == [0, 0]  # (the create's, then its watch's)
        got = await in_thread(client.responses.retrieve, response_id)
        assert (got.status, got.error.code) == ("failed", "server_error")
        assert response_id in got.error.message and "before its first event" in got.error.message
        code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
        assert sorted(r["status_code"] for r in log["data"]) == [499, 502]  # (its client left; it failed)
        code, view = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
        assert view["budgets"][0]["spent_tokens"] == 0
    finally:
        client.close()
        await gw.service.stopService()


@pytest.mark.parametrize("redis", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_batchs_lines_in_flight_at_once_cannot_overshoot_its_keys_budget(reactor, http, fake, tmp_path,
                                                                                 redis, redis_env):
    """Each batch line reserves its estimate from its key's budgets once it holds its provider slot, as an online
    request does at admission, and settles to what it used: lines sent at once (BATCH_CONCURRENCY_PER_PROVIDER)
    count each other's reservations, so a batch spends its key's budget past it by one line at most (before, each
    line was checked, then charged: four lines in flight each saw the room left and all went, and the next four
    too, twice the budget). A line refused while lines of its batch are in flight tries again once one ends (what
    they reserved and did not use comes back): the batch's lines are refused once the budget is spent, not while
    its own lines hold what is left of it."""
    gw = await start(reactor, fake, tmp_path, **redis_env)
    try:
        key = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": 100}])
        sdk = openai_client(gw, key["value"])
        line = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "fake_delay": 0.3}
        lines = b"".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                     "body": line}).encode() + b"\n" for i in range(12))
        uploaded = await in_thread(sdk.files.create, file=("in.jsonl", io.BytesIO(lines)), purpose="batch")
        batch = await in_thread(sdk.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                completion_window="24h")
        await gw.service.batch_runner.settled(batch.id)
        batch = await in_thread(sdk.batches.retrieve, batch.id)
        sdk.close()
        await gw.service.usage.flush()
        code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
        used = [r["total_tokens"] for r in log["data"] if r["outcome"] == "ok"]
        assert used and set(used) == {21} and batch.request_counts.completed == len(used)  # (21 tokens a line)
        assert batch.request_counts.failed == 12 - len(used)  # (budget_exceeded)
        # (each line refused is a record of the key's: 0 tokens, outcome refused)
        assert len(log["data"]) == 12 and {r["total_tokens"] for r in log["data"] if r["outcome"] == "refused"} == {0}
        code, view = await admin(http, gw, "GET", f"{KEYS}/{key['id']}")
        assert 100 <= view["budgets"][0]["spent_tokens"] == sum(used) <= 100 + 21
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_batch_line_waiting_for_its_batchs_lines_in_flight_leaves_its_provider_slot_to_others(
        reactor, http, fake, tmp_path):
    """A line refused by its key's budget while lines of its batch are in flight waits for one of them to end (what
    it did not use comes back) without holding a provider slot (BATCH_CONCURRENCY_PER_PROVIDER): another batch's
    lines go on meanwhile, and it takes a slot again once it tries again. Before, it kept the slot while it
    waited: with two slots, a batch whose one line ran long and whose next was refused held both, and every other
    batch at that provider waited for it."""
    gw = await start(reactor, fake, tmp_path, BATCH_CONCURRENCY_PER_PROVIDER="2")

    async def batch(sdk, *contents, **fields):
        lines = b"".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                     "body": dict({"model": MODEL, "messages": [{"role": "user", "content": content}],
                                                   "max_tokens": 5}, **fields)}).encode() + b"\n"
                         for i, content in enumerate(contents))
        uploaded = await in_thread(sdk.files.create, file=("in.jsonl", io.BytesIO(lines)), purpose="batch")
        return await in_thread(sdk.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                               completion_window="24h")

    def sent(content):
        return [r for r in fake.requests if r.path == b"/v1/chat/completions"
                and r.body["messages"][0]["content"] == content]

    key = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": 10}])  # (one line's estimate spends it)
    sdk, master = openai_client(gw, key["value"]), openai_client(gw, MASTER)
    try:
        spending = await batch(sdk, "long", "next", fake_hold=True)
        await until(reactor, lambda: sent("long"), what="the first line held at its instance")
        # (its next line, refused by what the first reserved, waits for it to end)
        other = await batch(master, "other")
        await until(reactor, lambda: sent("other"), what="another batch's line sent while the first is held")
        await gw.service.batch_runner.settled(other.id)
        assert (await in_thread(master.batches.retrieve, other.id)).request_counts.completed == 1
        assert not sent("next")
        fake.release_holds()  # the first line ends, having spent the budget: the next is refused for good
        await gw.service.batch_runner.settled(spending.id)
        counts = (await in_thread(sdk.batches.retrieve, spending.id)).request_counts
        assert (counts.completed, counts.failed) == (1, 1) and not sent("next")
        assert gw.service.batch_runner.semaphore("vllm").tokens == 2  # (every slot given back)
    finally:
        fake.release_holds()
        sdk.close()
        master.close()
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_batch_line_refused_by_its_keys_budget_is_a_refused_record_of_the_key(reactor, http, fake, tmp_path):
    """A batch line its key's spent budget refused (its error line C{budget_exceeded}) is a usage record as an
    online request the budget refused is: the line's request id, outcome C{refused}, status 429, 0 tokens, no
    replica, under the key, its user path and the provider and model it would have gone to, so that the key's usage
    counts what its batch was refused (before, none: only the line that was served was there)."""
    gw = await start(reactor, fake, tmp_path)
    key = await new_key(http, gw, user_path="/team/a", budgets=[{"period": "daily", "max_tokens": 10}])
    sdk = openai_client(gw, key["value"])
    try:
        lines = b"".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                     "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 5}}).encode() + b"\n" for i in range(2))
        uploaded = await in_thread(sdk.files.create, file=("in.jsonl", io.BytesIO(lines)), purpose="batch")
        batch = await in_thread(sdk.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                completion_window="24h")
        await gw.service.batch_runner.settled(batch.id)
        counts = (await in_thread(sdk.batches.retrieve, batch.id)).request_counts
        assert (counts.completed, counts.failed) == (1, 1)  # (the first line's 21 tokens spent the budget)
        await gw.service.usage.flush()
        code, log = await admin(http, gw, "GET", "/admin/api/v1/usage/log")
        by_outcome = {r["outcome"]: r for r in log["data"]}
        assert sorted(by_outcome) == ["ok", "refused"] and len(log["data"]) == 2
        refused, served = by_outcome["refused"], by_outcome["ok"]
        assert {refused["request_id"], served["request_id"]} == {f"{batch.id}-1", f"{batch.id}-2"}  # (lines from 1)
        assert (refused["status_code"], refused["total_tokens"], refused["input_tokens"], refused["replica"],
                refused["auth_key_id"], refused["user_path"], refused["provider_name"], refused["model"],
                refused["endpoint"], refused["stream"]) == (
            429, 0, 0, None, key["id"], "/team/a", "vllm", MODEL, "/v1/chat/completions", False)
        code, by_key = await admin(http, gw, "GET", "/admin/api/v1/usage/keys")
        assert [(r["auth_key_id"], r["requests"], r["errors"], r["refused"], r["total_tokens"])
                for r in by_key["data"]] == [(key["id"], 2, 1, 1, 21)]
        usage = (await in_thread(sdk.get, "/usage", cast_to=object))["usage"]  # (the key's own: /v1/usage)
        assert (usage["total_requests"], usage["refused_requests"], usage["total_tokens"]) == (1, 1, 21)
        # A message batch's line too, at /v1/messages.
        other = await new_key(http, gw, budgets=[{"period": "daily", "max_tokens": 10}])
        messages = anthropic.Anthropic(base_url=gw.url, api_key=other["value"], max_retries=0, timeout=10)
        try:
            made = await in_thread(messages.messages.batches.create, requests=[{"custom_id": f"m{i}", "params": {
                "model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}} for i in range(2)])
            await gw.service.batch_runner.settled(made.id)
            counts = (await in_thread(messages.messages.batches.retrieve, made.id)).request_counts
        finally:
            messages.close()
        assert (counts.succeeded, counts.errored) == (1, 1)
        await gw.service.usage.flush()
        code, log = await admin(http, gw, "GET", f"/admin/api/v1/usage/log?key={other['id']}&outcome=refused")
        assert [(r["endpoint"], r["status_code"], r["total_tokens"], r["replica"], r["model"])
                for r in log["data"]] == [("/v1/messages", 429, 0, None, MODEL)]
    finally:
        sdk.close()
        await gw.service.stopService()
