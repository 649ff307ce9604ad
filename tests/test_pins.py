"""Session affinity pins shared through Redis (REDIS_URL): a session sticks to its replica on every host.

Gateways run in this process (L{tests.support.start_gateway}), in front of one
fleet of fake vLLM replicas (L{tests.fakes.fleet.FakeFleet}) and the real Redis
at 127.0.0.1:6379. The gateways publish on the real channel, C{gomodel:pins}:
their pins name this test's own replica URLs and hash fresh session ids, so
that anything else on the channel is ignored; the keys they store are
deleted afterwards. The units work under a fresh channel and key prefix.
Nothing waits a fixed time: what another host or thread does is polled for in
bounded L{deferLater} steps.
"""

import io
import threading
import time
import uuid
from functools import partial

import pytest
import pytest_twisted
import treq
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.http_headers import Headers

from gomodel import jsonutil
from gomodel.redis_client import connect
from gomodel.routing.affinity import affinity_key
from gomodel.routing.pins import KEY_PREFIX, PIN_TTL, SharedPins
from gomodel.routing.pool import READY, Replica, ReplicaPool
from gomodel.routing.vllm_metrics import LoadSample
from tests.fakes.fleet import FakeFleet
from tests.redis_server import fresh_prefix, redis_client
from tests import support
from tests.support import every_replica_checked, start_gateway, with_timeout
from tests.test_routing import MODEL, chat, post, served_by, who_got

redis = pytest.importorskip("redis")

HOST, PORT = "127.0.0.1", 6379
REDIS_URL = f"redis://{HOST}:{PORT}/0"
PROVIDER = "vllm"


@pytest.fixture
def client():
    c = redis_client()
    yield c
    c.close()


@pytest.fixture
def sessions(client):
    """Fresh session ids; the pins the gateways stored for them are deleted afterwards."""
    made = []

    def new():
        made.append(f"conversation-{uuid.uuid4().hex}")
        return made[-1]

    yield new
    for session in made:
        client.delete(KEY_PREFIX + PROVIDER + ":" + key_of(session))


def key_of(session) -> str:
    """The affinity key of requests with C{X-Session-Id: session}."""

    class Request:
        requestHeaders = Headers({"x-session-id": [session]})

    return affinity_key(Request(), {})


def subscriber_threads():
    return [t for t in threading.enumerate() if t.name.startswith("gomodel-pins")]


until = partial(support.until, limit=5.0, interval=0.02)


class Hosts:
    """One fleet and the gateways of one test, all stopped at its end."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.fleet = None
        self.gateways = []

    async def start_fleet(self, n=3):
        self.fleet = await FakeFleet(self.reactor, n).start()
        return self.fleet

    async def gateway(self, urls=None, redis_url=REDIS_URL, redis_key_prefix="gomodel:"):
        """A gateway in front of the fleet (C{urls}: its replicas in another order), learning load from answers."""
        gw = await start_gateway(self.reactor, {"VLLM_BASE_URL": ",".join(urls or self.fleet.base_urls),
                                                "REDIS_URL": redis_url, "REDIS_KEY_PREFIX": redis_key_prefix,
                                                "REPLICA_METRICS_INTERVAL": "0"},
                                 wait_ready=False)
        self.gateways.append(gw)
        await with_timeout(self.reactor, gw.registry.ready(), 5)
        pool = gw.registry.providers[0]
        await every_replica_checked(self.reactor, gw.registry)
        return gw, pool

    async def stop(self):
        for gw in self.gateways:
            await gw.service.stopService()
        if self.fleet is not None:
            await self.fleet.stop()


@pytest_twisted.async_yield_fixture()
async def hosts(reactor, client):
    made = Hosts(reactor)
    try:
        yield made
    finally:
        await made.stop()
        assert subscriber_threads() == []  # every subscriber and write thread ended with its gateway


def busy(pool, index, running=2):
    """Make C{pool}'s own view of replica C{index} busier than the others (within the affinity guard)."""
    pool.replicas[index].reported(LoadSample(waiting=0, running=running))


def fleet_index(fleet, marker):
    [index] = who_got(fleet, marker)
    return index


# -- several gateways -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_session_started_on_a_continues_on_b_on_its_replica_whatever_b_would_choose(
        reactor, http, hosts, sessions):
    fleet = await hosts.start_fleet(3)
    a, a_pool = await hosts.gateway()
    # B lists the replicas in the other order: pins name replicas by URL, not by place.
    b, b_pool = await hosts.gateway(urls=list(reversed(fleet.base_urls)))
    session = sessions()
    headers = {"X-Session-Id": [session]}
    response, _ = await post(http, a, chat(fake_marker="a0"), headers=headers)
    assert response.code == 200
    home = fleet_index(fleet, "a0")
    await until(reactor, lambda: b_pool.knows(key_of(session)), what="B learning the pin A made")
    # B's own view: the session's replica is busier than the others (its load guard still allows it).
    b_home = len(fleet) - 1 - home
    assert b_pool.replicas[b_home].base_url == fleet[home].base_url
    busy(b_pool, b_home)
    await post(http, b, chat(fake_marker="fresh"), headers={"X-Session-Id": [sessions()]})
    assert fleet_index(fleet, "fresh") != home  # a session B has no pin for goes elsewhere
    for turn in range(4):  # the conversation alternates between the hosts, and stays home
        gw = b if turn % 2 == 0 else a
        response, _ = await post(http, gw, chat(fake_marker=f"t{turn}"), headers=headers)
        assert response.code == 200
        assert fleet_index(fleet, f"t{turn}") == home, turn
        assert served_by(response) == (b_home if gw is b else home)


@pytest_twisted.ensureDeferred
async def test_a_deployment_with_its_own_redis_key_prefix_neither_learns_nor_looks_up_anothers_pins(
        reactor, http, hosts, sessions, client):
    fleet = await hosts.start_fleet(3)
    with fresh_prefix(client) as staging, fresh_prefix(client) as production:
        a, a_pool = await hosts.gateway(redis_key_prefix=staging + ":")
        a2, a2_pool = await hosts.gateway(redis_key_prefix=staging + ":")
        b, b_pool = await hosts.gateway(redis_key_prefix=production + ":")
        session = sessions()
        headers = {"X-Session-Id": [session]}
        response, _ = await post(http, a, chat(fake_marker="a0"), headers=headers)
        assert response.code == 200
        home = fleet_index(fleet, "a0")
        await until(reactor, lambda: a2_pool.knows(key_of(session)), what="staging's other host learning the pin")
        assert client.exists(f"{staging}:pins:{PROVIDER}:{key_of(session)}")
        assert not client.exists(KEY_PREFIX + PROVIDER + ":" + key_of(session))
        # Production's own view: the replica staging pinned the session to is its busiest; it has no pin.
        busy(b_pool, home)
        response, _ = await post(http, b, chat(fake_marker="b0"), headers=headers)
        assert response.code == 200 and fleet_index(fleet, "b0") != home


@pytest_twisted.ensureDeferred
async def test_a_session_moved_by_one_host_moves_on_the_others(reactor, http, hosts, sessions):
    fleet = await hosts.start_fleet(3)
    a, a_pool = await hosts.gateway()
    b, b_pool = await hosts.gateway()
    session = sessions()
    headers = {"X-Session-Id": [session]}
    await post(http, a, chat(fake_marker="first"), headers=headers)
    home = fleet_index(fleet, "first")
    await until(reactor, lambda: b_pool.knows(key_of(session)), what="B learning the pin")
    busy(a_pool, home, running=50)  # far past the guard on A: A moves the session
    await post(http, a, chat(fake_marker="moved"), headers=headers)
    moved = fleet_index(fleet, "moved")
    assert moved != home
    await until(reactor, lambda: b_pool._affinity[key_of(session)][0] == moved, what="B learning the move")
    await post(http, b, chat(fake_marker="after"), headers=headers)
    assert fleet_index(fleet, "after") == moved


@pytest_twisted.ensureDeferred
async def test_a_host_started_later_finds_the_sessions_pin_in_redis(reactor, http, hosts, sessions, client):
    fleet = await hosts.start_fleet(3)
    a, _ = await hosts.gateway()
    session = sessions()
    headers = {"X-Session-Id": [session]}
    await post(http, a, chat(fake_marker="on-a"), headers=headers)
    home = fleet_index(fleet, "on-a")
    stored = KEY_PREFIX + PROVIDER + ":" + key_of(session)
    await until(reactor, lambda: client.get(stored) == fleet[home].base_url.encode(), what="the pin stored")
    assert 3500 < client.ttl(stored) <= 3600
    c, c_pool = await hosts.gateway()  # subscribed after the pin was published: only the store can tell
    c.service.pins.recall_timeout = 5.0  # this machine may be slow; the lookup itself is what is tested
    assert not c_pool.knows(key_of(session))
    busy(c_pool, home)
    response, _ = await post(http, c, chat(fake_marker="on-c"), headers=headers)
    assert response.code == 200 and fleet_index(fleet, "on-c") == home
    # A prompt-prefix key is never looked up: it is chosen by load at once.
    system = "You are a careful assistant. " * 25
    body = {"model": MODEL, "messages": [{"role": "system", "content": system}, {"role": "user", "content": "q"}]}
    request = type("R", (), {"requestHeaders": Headers(), "content": io.BytesIO(jsonutil.dumps(body))})()
    assert c_pool.recall(affinity_key(request, body)) is None


@pytest_twisted.ensureDeferred
async def test_with_redis_unreachable_requests_flow_sessions_stick_per_host_and_readiness_says_so(
        reactor, http, hosts, sessions, refusing_port):
    nowhere = f"redis://{HOST}:{refusing_port}/0"
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        await hosts.start_fleet(3)
        gw, pool = await hosts.gateway(redis_url=nowhere)
        headers = {"X-Session-Id": [sessions()]}
        replicas = set()
        for _ in range(4):
            response, _ = await post(http, gw, chat(), headers=headers)
            assert response.code == 200
            replicas.add(served_by(response))
        assert len(replicas) == 1  # its own pins still hold
        # (its store's migrations may still run on a loaded machine: not ready until they end, whatever Redis does)
        store = gw.service.store
        await support.until(reactor, lambda: store.running and not getattr(store, "opening", False),
                            what="the store open")
        response = await http.get(gw.url + "/health/ready")
        state = jsonutil.loads(await treq.content(response))
        assert response.code == 200 and state["status"] == "degraded" and "session pins" in state["down"]["redis"]
    finally:
        globalLogPublisher.removeObserver(seen.append)
    warnings = [e for e in seen if "session pins unreachable" in e.get("log_format", "")]
    assert len(warnings) == 1  # once, not per request or per reconnection


# -- the parts ------------------------------------------------------------------------------


class _Server:
    hidden = ()

    def __init__(self, name):
        self.name = name


def make_pool(clock, pins=None, name=PROVIDER, urls=("http://r0/v1", "http://r1/v1", "http://r2/v1")):
    replicas = []
    for index, url in enumerate(urls):
        replica = Replica(index, _Server(name), url, clock)
        replica.models, replica.state = None, READY
        replicas.append(replica)
    return ReplicaPool(name, "vllm", replicas, clock, pins=pins)


class RecordingPins:
    refresh_after = 100.0

    def __init__(self):
        self.shared = []

    def pinned(self, pool, key, replica):
        self.shared.append((key, replica.index))

    def recall(self, pool, key):
        return "looked up"


def test_a_pool_shares_new_and_changed_pins_refreshes_old_ones_and_takes_others_by_url():
    clock = Clock()
    pins = RecordingPins()
    pool = make_pool(clock, pins)
    first = pool.take(None, affinity="s:1")
    pool.release(first)
    assert pins.shared == [("s:1", first.index)]
    pool.release(pool.take(None, affinity="s:1"))
    assert pins.shared == [("s:1", first.index)]  # unchanged: nothing to share
    clock.advance(100)
    pool.release(pool.take(None, affinity="s:1"))
    assert pins.shared == [("s:1", first.index)] * 2  # written again before it expires
    moved = pool.take(None, exclude=[first], affinity="s:1")
    assert pins.shared[-1] == ("s:1", moved.index) != ("s:1", first.index)
    pool.release(moved)
    # Pins from elsewhere: by URL; a replica this pool does not have is ignored; none is shared back.
    pool.pin("s:2", "http://r2/v1")
    pool.pin("s:3", "http://elsewhere/v1")
    assert pool.knows("s:2") and not pool.knows("s:3") and len(pins.shared) == 3
    chosen = pool.take(None, affinity="s:2")
    assert chosen.index == 2 and len(pins.shared) == 3
    pool.release(chosen)
    assert pool.recall("s:2") is None and pool.recall("s:9") == "looked up"
    assert make_pool(clock).recall("s:9") is None  # without shared pins: nothing to look up


def test_a_pool_remembers_when_it_last_had_to_forget_a_pin(monkeypatch):
    from gomodel.routing import pool as pool_module

    monkeypatch.setattr(pool_module, "AFFINITY_ENTRIES", 2)
    clock = Clock()
    pool = make_pool(clock, RecordingPins())
    for key in ("s:1", "s:2", "s:3"):
        clock.advance(1)
        pool.pin(key, "http://r0/v1")
    assert not pool.knows("s:1") and pool.forgotten == 1.0  # shared at 1 s, forgotten at 3 s


@pytest.fixture
def channel(client):
    """A fresh channel and key prefix; the keys are deleted afterwards."""
    with fresh_prefix(client) as name:
        yield name


@pytest.fixture
def make_pins(reactor, channel):
    """SharedPins as separate processes would have them (each its own client, made as the gateway makes it);
    stopped after the test."""
    made = []

    def make(pools, port=PORT, **kwargs):
        pins = SharedPins(connect(f"redis://{HOST}:{port}/0"), reactor, channel=channel, key_prefix=channel + ":",
                          **kwargs)
        for pool in pools:
            pool.pins = pins
        pins.attach(pools)
        pins.start()
        made.append(pins)
        return pins

    yield make
    for pins in made:
        pytest_twisted.blockon(pins.stop())
        pins._redis.close()
    assert subscriber_threads() == []


@pytest_twisted.ensureDeferred
async def test_two_hosts_pinning_one_session_at_once_end_up_alike(reactor, make_pins, client, channel):
    one, two = make_pool(reactor), make_pool(reactor, urls=("http://r2/v1", "http://r1/v1", "http://r0/v1"))
    pins = [make_pins([one]), make_pins([two])]
    await until(reactor, lambda: client.pubsub_numsub(channel)[0][1] == 2, what="both subscribed")
    for i in range(20):  # both pin the same keys at once, each to its own first replica (a different one)
        key = f"s:{i}"
        one.release(one.take(None, exclude=one.replicas[1:], affinity=key))
        two.release(two.take(None, exclude=two.replicas[1:], affinity=key))

    # Tables alike is not the end: one host's last write may still be on its way, and it moves both (the
    # pin published last wins). The end: both hosts' writes done, and every message they published applied
    # on both, which one more, published after them all, tells (each subscriber gets the channel in order).
    await until(reactor, lambda: not any(p._writing or p._pending for p in pins), what="both hosts' writes done")
    client.publish(channel, jsonutil.dumps([[PROVIDER, "s:last", "http://r1/v1"]]))
    await until(reactor, lambda: one.knows("s:last") and two.knows("s:last"), what="every pin applied on both")
    assert all(one.replicas[one._affinity[f"s:{i}"][0]].base_url
               == two.replicas[two._affinity[f"s:{i}"][0]].base_url for i in range(20))
    for i in range(20):  # and Redis stores the pin they agree on
        url = one.replicas[one._affinity[f"s:{i}"][0]].base_url
        assert client.get(f"{channel}:{PROVIDER}:s:{i}") == url.encode()
    assert pins[0].failures == pins[1].failures == 0


@pytest_twisted.ensureDeferred
async def test_a_session_is_looked_up_only_while_its_pin_may_have_been_missed(reactor, make_pins, client, channel):
    pool = make_pool(reactor)
    pins = make_pins([pool], recall_timeout=5.0)
    await until(reactor, lambda: pins._subscribed_at is not None, what="subscribed")
    client.set(f"{channel}:{PROVIDER}:s:old", "http://r1/v1", ex=60)
    await pool.recall("s:old")  # subscribed after that pin was stored: looked up
    assert pool._affinity["s:old"][0] == 1
    assert pool.recall("p:abc") is None  # prompt prefixes never are
    pins._subscribed_at -= PIN_TTL  # an hour later: every stored pin was published to it
    assert pool.recall("s:new") is None
    pool.forgotten = reactor.seconds() - 10  # but it had to forget a recent one: look up again
    client.set(f"{channel}:{PROVIDER}:s:new", "http://r2/v1", ex=60)
    await pool.recall("s:new")
    assert pool._affinity["s:new"][0] == 2
    pool.forgotten -= PIN_TTL
    assert pool.recall("s:unknown") is None


@pytest_twisted.ensureDeferred
async def test_stopping_ends_the_subscriber_at_once(reactor, make_pins, client, channel, monkeypatch):
    # (its poll made 30 s: a loaded host may take more than its 1 s to stop, woken at once or not)
    monkeypatch.setattr("gomodel.routing.pins.POLL", 30.0)
    pins = make_pins([make_pool(reactor)])
    await until(reactor, lambda: client.pubsub_numsub(channel)[0][1] == 1, what="subscribed")
    started = time.monotonic()
    await pins.stop()
    assert time.monotonic() - started < 10  # woken by its own channel, not by its poll
    assert subscriber_threads() == [] and client.pubsub_numsub(channel)[0][1] == 0


@pytest_twisted.ensureDeferred
async def test_an_unreachable_redis_costs_requests_nothing_and_is_said_once(reactor, make_pins, refusing_port):
    port = refusing_port
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        pool = make_pool(reactor)
        pins = make_pins([pool], port=port, retry_after=60)
        await until(reactor, lambda: pins.unreachable, what="the subscriber finding Redis down")
        assert pool.recall("s:new") is None  # no lookup while it is down
        for i in range(5):
            pool.release(pool.take(None, affinity=f"s:{i}"))
        assert pins.failures == 5 and all(pool.knows(f"s:{i}") for i in range(5))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    warnings = [e for e in seen if "session pins unreachable" in e.get("log_format", "")]
    assert len(warnings) == 1
    said = formatEvent(warnings[0])  # why, without where: redis-py's "connecting to 127.0.0.1:PORT" is left out
    assert "refused" in said and str(port) not in said, said
