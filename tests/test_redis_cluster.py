"""Redis Cluster (C{REDIS_CLUSTER=true}): the limits, budgets and session pins of one deployment on a real cluster
of three masters (L{tests.redis_cluster}, one per module), each test under a key prefix of its own; and what a
client of the wrong kind for its server says (C{REDIS_CLUSTER} set on a plain server, or not on a cluster node).
"""

import json
import os
import time
import uuid

import openai
import pytest
import pytest_twisted
import treq
from twisted.logger import formatEvent, globalLogPublisher

from gomodel.limits.budgets import BudgetBook
from gomodel.limits.limiter import Limiter, RateLimitExceeded
from gomodel.limits.specs import Budget, RateLimit
from gomodel.redis_client import connect, tagged
from gomodel.routing.pins import SharedPins
from tests import postgres
from tests.redis_cluster import RedisCluster
from tests.redis_server import redis_client, started_counters
from tests.support import in_thread, openai_client, start_gateway, until, with_timeout
from tests.test_pins import key_of
from tests.test_scaleout import KEYS, MODEL, admin, env_for

redis = pytest.importorskip("redis")
pg_database = postgres.pg_database  # (the fixture)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    made = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    yield made
    made.stop()


@pytest.fixture
def client(cluster):
    c = cluster.client()
    yield c
    c.close()


@pytest.fixture
def prefix(client):
    """A C{REDIS_KEY_PREFIX} of the test's own; every key under it (tagged: L{tagged}) is deleted at the end."""
    name = f"gomodel-test:{uuid.uuid4().hex}:"
    yield name
    keys = list(client.scan_iter(match=tagged(name) + "*", target_nodes=client.ALL_NODES))
    if keys:
        client.delete(*keys)


@pytest.fixture
def make(reactor, cluster, prefix):
    """RedisCounters on the cluster as separate processes would have them (each its own client)."""
    with started_counters(reactor, lambda: connect(cluster.url, timeout=2, cluster=True),
                          tagged(prefix) + "limits:") as make:
        yield make


def slots_and_nodes(client, prefix) -> tuple:
    """The slots, and the nodes (by port), that the keys under C{prefix} (tagged) are on."""
    keys = list(client.scan_iter(match=tagged(prefix) + "*", target_nodes=client.ALL_NODES))
    return {client.keyslot(k) for k in keys}, {client.get_node_from_key(k).port for k in keys}, keys


@pytest_twisted.ensureDeferred
async def test_every_counters_script_runs_on_a_cluster_with_the_deployments_keys_in_one_slot(
        reactor, make, client, prefix):
    counters = make()
    # admit (a rate window and a slot), peek, finish: the scripts over several keys at once
    got = await counters.admit([("key:k|r60", 2.0, 2 / 60, 1.0), ("key:k|t60", 1000.0, 1000 / 60, 300.0)],
                               [("key:k|c", 1)])
    assert got.ok and got.lease is not None and counters.failures == 0
    assert not (await counters.admit([], [("key:k|c", 1)])).ok  # the one slot is held
    levels, held = await counters.peek([("key:k|r60", 2.0, 2 / 60)], ["key:k|c"])
    assert 1.0 <= levels[0] < 1.1 and held == [1]
    await counters._renew()  # the renewal of the held lease
    assert 800 <= (await counters.finish([("key:k|t60", 1000.0, 1000 / 60, -100.0)], got.lease))[0] < 900
    assert (await counters.peek([], ["key:k|c"]))[1] == [0]
    # the budget sums: seed, reserve (which sets this process's liveness key, named inside the script), settle,
    # spend, read
    day = reactor.seconds() + 86400
    assert await counters.seed_all([("budget|a", 100, 0.5, day, False), ("budget|b", 0, 0.0, day, False)]) == 2
    state, parts = await counters.reserve_all([("budget|a", 1000, None, 50, 0.0, day),
                                               ("budget|b", None, 2.0, 0, 0.25, day)])
    assert state == 1 and len(parts) == 2
    assert client.exists(tagged(prefix) + "limits:alive|" + counters._owner)
    assert await counters.settle_all([("budget|a", 20, 0.0, 50, 0.0, day), ("budget|b", 0, 0.1, 0, 0.25, day)],
                                     parts) is None
    await counters.spend_all([("budget|a", 5, 0.0, day)])
    sums, unseeded = await counters.spent_seeded(["budget|a", "budget|b", "budget|c"])
    assert sums == [(125, 0.5), (0, 0.1), (0, 0.0)] and unseeded == ["budget|c"]
    assert counters.failures == 0 and counters._mark is not None  # (each new connection marked the sums' server)
    slots, nodes, keys = slots_and_nodes(client, prefix)
    assert len(slots) == 1 and len(nodes) == 1, keys
    assert all(k.startswith(tagged(prefix).encode()) for k in keys)


@pytest_twisted.ensureDeferred
async def test_two_processes_share_one_limit_and_one_budget_on_a_cluster(reactor, make):
    limiters = [Limiter(make(), reactor), Limiter(make(), reactor)]
    rpm = [("key:team", RateLimit(rpm=3))]

    async def admitted(limiter):
        try:
            await (await limiter.admit(rpm, 0)).finish(0)
        except RateLimitExceeded:
            return False
        return True

    assert [await admitted(limiters[i % 2]) for i in range(6)] == [True] * 3 + [False] * 3
    books = [BudgetBook(make(), reactor, seed=lambda scope, since: (0, 0.0)) for _ in range(2)]
    budget = [("key:k", [Budget("daily", max_tokens=100)])]
    await books[0].record(budget, 60, 0.0)
    await books[1].record(budget, 60, 0.0)
    assert await books[0].spent([("key:k", Budget("daily", max_tokens=100))]) == [(120, 0.0)]


@pytest_twisted.ensureDeferred
async def test_a_pin_written_on_one_process_is_published_to_and_stored_for_the_other_on_a_cluster(
        reactor, cluster, client, prefix):
    class Pool:
        def __init__(self, name):
            self.name, self.pinned, self.forgotten = name, {}, 0.0

        def pin(self, key, url):
            self.pinned[key] = url

        def knows(self, key):
            return key in self.pinned

    class Replica:
        base_url = "http://replica-2:8000/v1"

    pins, pools = [], [Pool("vllm"), Pool("vllm")]
    try:
        for pool in pools:
            shared = SharedPins(connect(cluster.url, timeout=2, cluster=True), reactor,
                                channel=tagged(prefix) + "pins", key_prefix=tagged(prefix) + "pins:")
            shared.attach([pool])
            shared.start()
            pins.append(shared)
        await until(reactor, lambda: all(p._subscribed_at is not None for p in pins), what="both subscribed")
        pins[0].pinned(pools[0], "s:abc", Replica())
        await until(reactor, lambda: pools[1].knows("s:abc"), what="the pin published to the other")
        assert pools[1].pinned["s:abc"] == Replica.base_url
        assert client.get(tagged(prefix) + "pins:vllm:s:abc") == Replica.base_url.encode()
        del pools[1].pinned["s:abc"]  # forgotten there: looked up in the cluster
        await with_timeout(reactor, pins[1].recall(pools[1], "s:abc"), 5)
        assert pools[1].pinned["s:abc"] == Replica.base_url and pins[1].failures == 0
    finally:
        for shared in pins:
            await shared.stop()
            shared._redis.close()


@pytest_twisted.ensureDeferred
async def test_two_gateways_on_a_cluster_share_rpm_budgets_and_session_pins(
        reactor, http, fake, pg_database, tmp_path, cluster, client, prefix):
    from tests.fakes.fleet import FakeFleet

    fleet = await FakeFleet(reactor, 3).start()
    env = env_for(pg_database, ",".join(fleet.base_urls), tmp_path, REDIS_URL=cluster.url, REDIS_CLUSTER="true",
                  REDIS_KEY_PREFIX=prefix, REPLICA_METRICS_INTERVAL="0")
    a = await start_gateway(reactor, env)
    b = await start_gateway(reactor, env)
    sdks = []
    try:
        code, key = await admin(http, a.url, "POST", KEYS, {"name": "team", "rpm": 4})
        assert code == 201
        await b.service.keys.refresh()  # what its loop does every second
        sdks = [openai_client(a, key["value"]), openai_client(b, key["value"])]
        session = f"conversation-{uuid.uuid4().hex}"
        answers = limited = 0
        for i in range(8):
            try:
                await in_thread(sdks[i % 2].chat.completions.create, model=MODEL, max_tokens=5,
                                messages=[{"role": "user", "content": "hi"}],
                                extra_headers={"X-Session-Id": session})
                answers += 1
            except openai.RateLimitError:
                limited += 1
        assert (answers, limited) == (4, 4)  # 4 a minute for the key, not 4 per gateway
        # the session pin A made (its first request) is B's, published through the cluster
        b_pool = b.registry.providers[0]
        await until(reactor, lambda: b_pool.knows(key_of(session)), what="B knowing the session's pin")
        # a budget sum, shared: spent on A, refused on B
        code, key = await admin(http, a.url, "POST", KEYS, {
            "name": "budgeted", "budgets": [{"period": "daily", "max_tokens": 1}]})
        assert code == 201
        await b.service.keys.refresh()
        sdks += [openai_client(a, key["value"]), openai_client(b, key["value"])]
        sdks = sdks[2:] + sdks[:2]
        await in_thread(sdks[0].chat.completions.create, model=MODEL, max_tokens=5,
                        messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.RateLimitError) as refused:
            await in_thread(sdks[1].chat.completions.create, model=MODEL, max_tokens=5,
                            messages=[{"role": "user", "content": "hi"}])
        assert refused.value.body["code"] == "budget_exceeded"
        slots, nodes, keys = slots_and_nodes(client, prefix)
        assert len(slots) == 1 and len(nodes) == 1, keys
        assert any(b"limits:budget|" in k for k in keys) and any(b"pins:" in k for k in keys)
        for gateway in (a, b):
            assert gateway.service.gate._limiter.counters.failures == 0
            response = await http.get(gateway.url + "/health/ready")
            assert json.loads(await treq.content(response)) == {"status": "ready"}
    finally:
        for sdk in sdks:
            sdk.close()
        await a.service.stopService()
        await b.service.stopService()
        await fleet.stop()


async def _misconfigured(reactor, http, gateway, words) -> dict:
    """Send a request past a limit until C{gateway}'s readiness says Redis is misconfigured: its body."""
    async def said():
        response = await http.get(gateway.url + "/health/ready")
        body = json.loads(await treq.content(response))
        return body if response.code == 200 and words in body.get("down", {}).get("redis", "") else None

    deadline = time.monotonic() + 10
    while True:
        body = await said()
        if body is not None:
            return body
        assert time.monotonic() < deadline, "the readiness never named the setting"
        await http.post(gateway.url + "/v1/chat/completions", json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).encode(),
            headers={"authorization": "Bearer master-scale", "content-type": "application/json"})


@pytest.fixture
def warnings():
    said = []

    def observer(event):
        if event.get("log_namespace", "").startswith("gomodel") and event.get("log_level") is not None and \
                event["log_level"].name == "warn":
            said.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield said
    globalLogPublisher.removeObserver(observer)


@pytest_twisted.ensureDeferred
async def test_a_cluster_node_without_redis_cluster_set_is_a_readiness_reason_naming_the_setting(
        reactor, http, fake, tmp_path, cluster, prefix, warnings):
    """Before, every script failed (MOVED, CROSSSLOT) and the limits opened for good, said as "unreachable", and
    the warning named the node that MOVED pointed to."""
    yaml = tmp_path / "limits.yaml"
    yaml.write_text("rate_limits: {providers: [{name: vllm, limits: [{period: minute, max_requests: 1000}]}]}\n")
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "master-scale",
                                            "REDIS_URL": cluster.url, "REDIS_KEY_PREFIX": prefix}, str(yaml))
    try:
        body = await _misconfigured(reactor, http, gateway, "REDIS_CLUSTER=true")
        assert body["status"] == "degraded" and body["down"]["redis"].startswith("misconfigured (")
        said = " ".join(warnings)
        assert "set REDIS_CLUSTER=true" in said
        assert not any(str(port) in said for port in cluster.ports) and "127.0.0.1" not in said, said
    finally:
        await gateway.service.stopService()


@pytest_twisted.ensureDeferred
async def test_redis_cluster_set_on_a_plain_server_is_a_readiness_reason_naming_the_setting(
        reactor, http, fake, tmp_path, warnings):
    """Before the setting there was no cluster client; set on a server without cluster mode, the client cannot
    learn the slots: a readiness reason and a warning say to unset it (the limits and pins open meanwhile)."""
    redis_client().close()  # (skipped without the test Redis)
    url = os.environ.get("GOMODEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    yaml = tmp_path / "limits.yaml"
    yaml.write_text("rate_limits: {providers: [{name: vllm, limits: [{period: minute, max_requests: 1000}]}]}\n")
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "master-scale",
                                            "REDIS_URL": url, "REDIS_CLUSTER": "true",
                                            "REDIS_KEY_PREFIX": f"gomodel-test:{uuid.uuid4().hex}:"}, str(yaml))
    try:
        body = await _misconfigured(reactor, http, gateway, "unset REDIS_CLUSTER")
        assert body["status"] == "degraded"
        assert any("unset REDIS_CLUSTER" in w for w in warnings), warnings
        response = await http.post(gateway.url + "/v1/chat/completions", json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).encode(),
            headers={"authorization": "Bearer master-scale", "content-type": "application/json"})
        assert response.code == 200  # (failing open, as for a Redis that cannot be reached)
        await treq.content(response)
    finally:
        await gateway.service.stopService()
