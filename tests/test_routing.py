"""Replica pools end to end: the real gateway in front of a fleet of fake vLLM replicas, over loopback sockets.

Each test starts its own fleet (L{tests.fakes.fleet.FakeFleet}) and gateway
(C{VLLM_BASE_URL} = every replica's URL) through the C{cluster} fixture, which
stops both afterwards. Assertions are on where requests went (the fleet's
records, the C{X-Gomodel-Replica} header, C{providers/status}), never on
timings; where a behaviour is time-driven (probes, scrapes, stall detection)
the test polls in bounded steps of L{deferLater}.
"""

import io
import json
import random
import time

import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredSemaphore, fail, gatherResults, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent
from twisted.web.client import Agent, HTTPConnectionPool

from twisted.web.http_headers import Headers

from gomodel import jsonutil
from gomodel.errors import ReplicasBusy, UpstreamUnreachable
from gomodel.routing import health
from gomodel.routing.affinity import PREFIX_CHARS, affinity_key
from gomodel.routing.pool import (DOWN, PACE_NOISE, PACE_REFRESH, PACE_SAMPLES, RARE_WEIGHT, READY, SLOWER, STALLED, Replica,
                                  ReplicaPool, _in_flight, _waits, clearly_slower)
from gomodel.routing.vllm_metrics import LoadSample
from gomodel.upstream.errors import upstream_error
from tests import rawclient
from tests.fakes.fleet import FakeFleet
from tests.fakes.vllm import CHAT_MODEL
from tests.support import every_replica_checked, in_thread, openai_client, start_gateway, turns_until, with_timeout

MODEL = "vllm/" + CHAT_MODEL
STATUS = "/admin/api/v1/providers/status"


# -- the fleet and the gateway --------------------------------------------------------

class Cluster:
    """Starts fleets and gateways for one test; stops them all at its end."""

    def __init__(self, reactor):
        self.reactor = reactor
        self._made = []

    async def __call__(self, n=3, env=None, prepare=None, wait_ready=True, **knobs):
        """A started fleet of C{n} replicas (C{knobs} on each) and a gateway in front of it.

        @param prepare: an async function of the fleet, run before the gateway starts.
        """
        fleet = await FakeFleet(self.reactor, n, **knobs).start()
        self._made.append(fleet.stop)
        if prepare is not None:
            await prepare(fleet)
        gw = await start_gateway(self.reactor, {"VLLM_BASE_URL": fleet.env_value, **(env or {})}, wait_ready=False)
        self._made.append(gw.service.stopService)
        if wait_ready:
            await with_timeout(self.reactor, gw.registry.ready(), 5)
            # ready() fires once one replica is ready; every replica's first checks must be in
            # (a replica still loading when a test refuses it would stay loading, never down).
            await every_replica_checked(self.reactor, gw.registry)
        return fleet, gw

    async def close(self):
        while self._made:
            await self._made.pop()()


@pytest_twisted.async_yield_fixture()
async def cluster(reactor):
    made = Cluster(reactor)
    try:
        yield made
    finally:
        await made.close()


@pytest_twisted.async_yield_fixture()
async def fresh(reactor):
    """A treq client without persistent connections (for requests that must each open their own)."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield HTTPClient(Agent(reactor, pool=pool))
    await pool.closeCachedConnections()


def chat(content="hello", **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


async def post(http, gw, body, headers=None, path="/v1/chat/completions"):
    """POST JSON; C{(response, parsed body or raw bytes)}."""
    response = await http.post(gw.url + path, data=json.dumps(body).encode(),
                               headers={"content-type": ["application/json"], **(headers or {})})
    content = await treq.content(response)
    try:
        return response, jsonutil.loads(content)
    except ValueError:
        return response, content


def send(http, gw, body, headers=None, path="/v1/chat/completions"):
    """L{post}, started now: a Deferred."""
    return Deferred.fromCoroutine(post(http, gw, body, headers, path))


def served_by(response) -> int:
    [value] = response.headers.getRawHeaders(b"x-gomodel-replica")
    return int(value)


def error_of(payload):
    assert set(payload) == {"error"}
    assert set(payload["error"]) >= {"message", "type", "param", "code"}
    return payload["error"]


async def status(http, gw) -> dict:
    response = await http.get(gw.url + STATUS)
    assert response.code == 200
    return jsonutil.loads(await treq.content(response))


async def replica_states(http, gw) -> list:
    [provider] = (await status(http, gw))["providers"]
    return [r["state"] for r in provider["replicas"]]


async def wait_for(reactor, predicate, timeout=5.0, step=0.05):
    """Poll C{predicate} (a function returning a value or a Deferred of one) until it is true."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if hasattr(value, "addCallback") or hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        await deferLater(reactor, step, lambda: None)


async def wait_state(reactor, http, gw, index, state, timeout=5.0):
    async def check():
        return (await replica_states(http, gw))[index] == state
    await wait_for(reactor, check, timeout)


def finished_answers(fleet, status_code=200):
    """Inference requests the fleet answered completely with C{status_code}."""
    return [r for replica in fleet for r in replica.inference_requests if r.finished and r.status == status_code]


def who_got(fleet, marker):
    """The replica indexes that received the inference request whose body holds C{marker} as fake_marker."""
    return [i for i, replica in enumerate(fleet) for r in replica.inference_requests
            if isinstance(r.body, dict) and r.body.get("fake_marker") == marker]


# -- 1. spread --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_idle_replicas_share_sequential_requests_and_the_header_names_the_replica(cluster, http):
    fleet, gw = await cluster(3)
    for i in range(9):
        response, body = await post(http, gw, chat(fake_marker=f"m{i}"))
        assert response.code == 200, body
        assert who_got(fleet, f"m{i}") == [served_by(response)]
    assert fleet.distribution() == [3, 3, 3]

    response = await http.get(gw.url + "/v1/models")
    ids = [m["id"] for m in jsonutil.loads(await treq.content(response))["data"]]
    assert ids == [MODEL]


@pytest_twisted.ensureDeferred
async def test_the_openai_sdk_sees_the_replica_header(cluster):
    fleet, gw = await cluster(2)
    client = openai_client(gw)
    try:
        raw = await in_thread(client.chat.completions.with_raw_response.create, model=MODEL,
                              messages=[{"role": "user", "content": "hi"}])
    finally:
        client.close()
    index = int(raw.headers["x-gomodel-replica"])
    assert raw.parse().choices[0].message.content
    assert fleet.distribution()[index] == 1 and sum(fleet.distribution()) == 1


# -- 2. load awareness ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_replica_reporting_a_long_queue_gets_few_requests(cluster, http):
    fleet, gw = await cluster(3, env={"REPLICA_METRICS_INTERVAL": "0"})  # learnt from answers only
    fleet[0].metrics = {"waiting": 50}
    for i in range(12):
        response, _ = await post(http, gw, chat())
        assert response.code == 200
    # It may get one request before its first answer tells its queue; then none.
    assert fleet.distribution()[0] <= 1
    assert sum(fleet.distribution()[1:]) >= 11
    [provider] = (await status(http, gw))["providers"]
    if fleet.distribution()[0]:
        assert provider["replicas"][0]["waiting"] == 50


@pytest_twisted.ensureDeferred
async def test_a_replicas_load_report_is_read_and_never_reaches_the_client(cluster, http):
    """vLLM's endpoint-load-metrics (asked for on every request) is the gateway's load signal: read, not relayed,
    on /v1 routes and passthrough alike; a client's own endpoint-load-metrics-format is not sent upstream (the
    gateway's is the one). An upstream's X-Gomodel-Replica (a gateway behind this one) never replaces ours."""
    fleet, gw = await cluster(2, env={"REPLICA_METRICS_INTERVAL": "0"})  # learnt from answers only
    fleet.set(metrics={"waiting": 3})
    pool = gw.registry.providers[0]
    for path, body in (("/v1/chat/completions", chat()),
                       ("/p/vllm/v1/chat/completions", chat(model=CHAT_MODEL)),
                       ("/v1/completions", {"model": MODEL, "prompt": "hi"})):
        body["fake_headers"] = {"X-Gomodel-Replica": "7"}
        response, answer = await post(http, gw, body, path=path,
                                      headers={"endpoint-load-metrics-format": ["text"]})
        assert response.code == 200, (path, answer)
        assert not response.headers.hasHeader(b"endpoint-load-metrics"), path
        index = served_by(response)
        assert index in (0, 1), path
        assert pool.replicas[index].load.waiting == 3, path
    for replica in fleet:
        assert {tuple(r.headers.getRawHeaders(b"endpoint-load-metrics-format")) for r in replica.inference_requests
                } <= {(b"json",)}


@pytest_twisted.ensureDeferred
async def test_a_queue_seen_by_the_metrics_scrape_alone_is_avoided(cluster, http, reactor):
    fleet, gw = await cluster(2, env={"REPLICA_METRICS_INTERVAL": "0.05"}, load_header=False)
    fleet[1].metrics = {"waiting": 50, "running": 8}
    pool = gw.registry.providers[0]
    await wait_for(reactor, lambda: pool.replicas[1].load is not None and pool.replicas[1].load.waiting == 50)
    for _ in range(6):
        response, _ = await post(http, gw, chat())
        assert served_by(response) == 0
    assert fleet.distribution() == [6, 0]


@pytest_twisted.ensureDeferred
async def test_a_slower_replica_gets_fewer_concurrent_requests(cluster, http):
    fleet, gw = await cluster(2, env={"REPLICA_METRICS_INTERVAL": "0"}, latency=0.04)
    fleet[0].latency = 0.12  # three times slower
    limit = DeferredSemaphore(6)
    results = await gatherResults([limit.run(send, http, gw, chat()) for _ in range(30)],
                                  consumeErrors=True)
    assert all(r.code == 200 for r, _ in results)
    slow, fast = fleet.distribution()
    assert slow + fast == 30
    assert fast >= 1.5 * slow, fleet.distribution()


# -- 3. strategies -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_round_robin_takes_turns_whatever_the_load(cluster, http):
    fleet, gw = await cluster(3, env={"ROUTING_STRATEGY": "round_robin"})
    fleet[0].metrics = {"waiting": 50}
    order = []
    for _ in range(9):
        response, _ = await post(http, gw, chat())
        order.append(served_by(response))
    assert order == [0, 1, 2] * 3


@pytest_twisted.ensureDeferred
async def test_round_robin_and_random_keep_no_session(cluster, http):
    """round_robin and random choose whatever the session: its key is not worked out and no pin is kept (nor shared
    through Redis, nor looked up there), on chat, Responses and Messages alike; least_requests (as load) keeps one."""
    bodies = {"/v1/chat/completions": chat(), "/v1/responses": {"model": MODEL, "input": "hi"},
              "/v1/messages": {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}}
    for strategy, kept in (("round_robin", False), ("random", False), ("least_requests", True)):
        fleet, gw = await cluster(2, env={"ROUTING_STRATEGY": strategy})
        pool = gw.registry.providers[0]
        served = []
        for path, body in bodies.items():
            session = f"{strategy} {path}"
            for _ in range(2):
                response, answer = await post(http, gw, body, headers={"X-Session-Id": [session]}, path=path)
                assert response.code == 200, answer
                served.append(served_by(response))
            assert pool.knows(affinity_key(_SessionRequest(session), {})) is kept, (strategy, path)
        if strategy == "round_robin":
            assert served == [0, 1] * 3  # (a session of two requests takes turns too)


class _SessionRequest:
    """A request's head with C{X-Session-Id: session} (what L{affinity_key} reads)."""

    def __init__(self, session):
        self.requestHeaders = Headers({"x-session-id": [session]})


@pytest_twisted.ensureDeferred
async def test_least_requests_counts_the_gateways_requests_in_flight_only(cluster, http, reactor):
    fleet, gw = await cluster(2, env={"ROUTING_STRATEGY": "least_requests", "REPLICA_METRICS_INTERVAL": "0"})
    fleet[0].metrics = {"waiting": 50}  # ignored by this strategy
    for _ in range(4):
        await post(http, gw, chat())
    assert fleet.distribution() == [2, 2]

    fleet.set(hang=True)
    first = send(http, gw, chat(fake_marker="first"))
    await wait_for(reactor, lambda: who_got(fleet, "first"))
    second = send(http, gw, chat(fake_marker="second"))
    await wait_for(reactor, lambda: who_got(fleet, "second"))
    assert who_got(fleet, "first") != who_got(fleet, "second")
    fleet.set(hang=False)
    for response, _ in await gatherResults([first, second]):
        assert response.code == 200


# -- 4. affinity ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_session_sticks_to_its_replica_until_that_replica_queues(cluster, http):
    fleet, gw = await cluster(3, env={"REPLICA_METRICS_INTERVAL": "0"})
    seen = set()
    for _ in range(5):
        response, _ = await post(http, gw, chat(), headers={"X-Session-Id": ["conversation-1"]})
        seen.add(served_by(response))
    [home] = seen
    # Other sessions and anonymous requests still spread over the fleet.
    others = set()
    for i in range(6):
        response, _ = await post(http, gw, chat(), headers={"X-Session-Id": [f"other-{i}"]})
        others.add(served_by(response))
    assert len(others) >= 2

    fleet[home].metrics = {"waiting": 50}
    after = []
    for _ in range(6):
        response, _ = await post(http, gw, chat(), headers={"X-Session-Id": ["conversation-1"]})
        after.append(served_by(response))
    # At most the first one goes home (its answer tells the queue); the rest move, and stick together.
    moved = after[1:] if after[0] == home else after
    assert home not in moved and len(set(moved)) == 1, after


@pytest_twisted.ensureDeferred
async def test_a_session_leaves_a_replica_that_queues_while_another_does_not(cluster, http, reactor):
    fleet, gw = await cluster(3, env={"REPLICA_METRICS_INTERVAL": "0"})
    home = served_by((await post(http, gw, chat(), headers={"X-Session-Id": ["conversation-1"]}))[0])
    # Its score stays within the guard (1 request waiting), but a wait in its queue is not worth it.
    fleet[home].metrics = {"waiting": 1}
    await post(http, gw, chat(), headers={"X-Session-Id": ["conversation-1"]})  # its answer tells the queue
    moved = {served_by((await post(http, gw, chat(), headers={"X-Session-Id": ["conversation-1"]}))[0])
             for _ in range(3)}
    assert home not in moved and len(moved) == 1


def test_requests_alone_never_take_down_the_last_ready_replica():
    clock = Clock()
    only = Replica(0, None, "http://r0/v1", clock, failure_threshold=3)
    only.set_state(READY)
    only.others_ready = lambda replica: False
    for _ in range(5):  # a burst of connection errors: with nowhere else to go, no 503s for it
        only.failed("unreachable")
    assert only.ready and only.last_error == "unreachable"
    only.failed("health probe failed", probe=True)  # its own /health decides
    assert only.state == DOWN
    first, second = (Replica(i, None, f"http://r{i}/v1", clock, failure_threshold=3) for i in range(2))
    for replica, other in ((first, second), (second, first)):
        replica.set_state(READY)
        replica.others_ready = lambda replica, other=other: other.ready
    for _ in range(3):
        first.failed("unreachable")
    assert first.state == DOWN and second.ready  # another can serve: requests move at once
    for _ in range(3):
        second.failed("unreachable")
    assert second.ready


class _Probed:
    """A replica's server whose /health answers while C{healthy}."""

    name = "vllm"
    hidden = ()

    def __init__(self):
        self.healthy = True

    def health(self):
        return succeed(None) if self.healthy else fail(UpstreamUnreachable("refused"))

    def list_models(self):
        return succeed([{"id": "m"}])

    def scrape(self):
        return succeed(None)

    def abandon(self, why="went down"):
        """(Its requests in flight as it goes down are the test's own.)"""
        return 0


def test_a_stalled_replica_keeps_its_requests_where_no_other_ready_one_lists_its_models():
    """A stalled replica's requests waiting for their answer's head end (to go on elsewhere) only where another
    ready replica lists every model it does: one that alone lists a model (a LoRA adapter loaded on it, or
    struck off the other's list by its 404) keeps them, as the only ready replica does (a stall may pass). Before,
    any other ready replica ended them, and those for its own model failed, with nowhere to go."""
    clock = Clock()
    servers = [_Probed(), _Probed()]
    abandoned = []
    servers[1].abandon = lambda why="went down": abandoned.append(why) or 1
    replicas = [Replica(i, servers[i], f"http://r{i}/v1", clock) for i in range(2)]
    pool = ReplicaPool("vllm", "vllm", replicas, clock)
    zero, one = replicas
    zero.models, one.models = {"m": {"id": "m"}}, {"m": {"id": "m"}, "lora": {"id": "lora"}}
    for replica in replicas:
        replica.set_state(READY)
    one.in_flight = 1
    one.set_state(STALLED)
    clock.advance(0)
    assert abandoned == [] and pool.replicas[1].state == STALLED
    one.set_state(READY)
    zero.models = dict(one.models)
    one.set_state(STALLED)
    clock.advance(0)
    assert abandoned == ["stopped generating"]


def _probed_pool(clock, failure_threshold=3):
    """Two replicas of L{_Probed} servers in a pool whose monitor has made its first checks (health every 5 s,
    no scrapes): C{(servers, replicas, pool, monitor)}."""
    from gomodel.routing.health import ReplicaMonitor
    from gomodel.routing.registry import ModelRegistry

    servers = [_Probed(), _Probed()]
    replicas = [Replica(i, servers[i], f"http://r{i}/v1", clock, failure_threshold=failure_threshold)
                for i in range(2)]
    pool = ReplicaPool("vllm", "vllm", replicas, clock)
    monitor = ReplicaMonitor(ModelRegistry([pool], clock), clock, health_interval=5.0, metrics_interval=0)
    monitor.startService()
    clock.advance(0)
    return servers, replicas, pool, monitor


def test_a_preferred_replica_that_is_doubted_is_passed_over_as_any_other():
    """The replica a Responses follow-up prefers (the one holding its conversation) is passed over while its probe
    failed or its requests go unanswered, as any doubted replica is, where another can start the request (the
    conversation is then sent explicitly); with no other, it still takes it. Before, C{prefer} chose it
    whatever it was."""
    clock = Clock()
    _, replicas, pool, monitor = _probed_pool(clock)
    one = replicas[1]
    try:
        one.failed("GET /health: HTTP 503", probe=True)  # (a failed probe: doubted, still ready)
        assert one.doubted and one.state == READY
        taken = pool.take("m", prefer=1)
        assert taken is replicas[0]
        pool.release(taken)
        assert pool.take("m", prefer=1, exclude=[replicas[0]]) is one  # (no other: it takes it)
        pool.release(one)
        one.probe_passed()
        taken = pool.take("m", prefer=1)
        assert taken is one
        pool.release(taken)
        one.answering(False, "no answer's head for 60 s")
        taken = pool.take("m", prefer=1)
        assert taken is replicas[0]
        pool.release(taken)
    finally:
        monitor.stopService()


def test_a_replica_whose_requests_fail_while_its_health_passes_is_held_out_then_readmitted_on_one_trial():
    """/health 200, inference 500: 3 failed requests take replica 1 down. Before, its next passing probe put it
    back to full traffic (down and up every probe, 3 failed requests each time). Now it is held out for the
    health interval, doubling each time it fails again (capped), then readmitted on one trial request at a
    time; the trial's success gives it full traffic, its failure takes it down again for twice as long.
    A failed probe (it was really down) lifts the hold."""
    from gomodel.accounting.metrics import ReplicaCollector
    from gomodel.api.status import _replica
    from gomodel.routing.pool import HOLD_MAX

    clock = Clock()
    servers, replicas, pool, monitor = _probed_pool(clock)
    one = replicas[1]
    assert [r.state for r in replicas] == [READY, READY]

    def fails(times=1):
        for _ in range(times):
            one.failed("HTTP 500")

    def gauges():
        families = {f.name: f for f in ReplicaCollector([pool]).collect()}
        return [[s.value for s in families[name].samples if s.labels["replica"] == "1"][0]
                for name in ("gomodel_replica_held_seconds", "gomodel_replica_trial")]

    clock.advance(1)
    fails(3)
    assert one.state == DOWN and one.held_until == 6.0
    assert _replica(one, clock.seconds(), 6.0)["held_until"] == 6.0 and gauges() == [5.0, 0.0]
    clock.advance(4)  # t=5: its probe passes, but it is held out
    assert one.state == DOWN
    clock.advance(5)  # t=10: readmitted, on trial: one request at a time
    assert one.state == READY and one.trial and _replica(one, 10, 6.0)["trial"] and gauges() == [0.0, 1.0]
    trial = pool.take("m", prefer=1)
    assert trial is one and pool.take("m", prefer=1) is replicas[0]  # (the trial is still out)
    pool.release(replicas[0])
    clock.advance(5)  # t=15: a passing probe does not end the trial, its request does
    assert one.trial
    fails()  # the trial failed: down again, held twice as long
    pool.release(one)
    assert one.state == DOWN and not one.trial and one.held_until == 25.0
    clock.advance(5)  # t=20: held
    assert one.state == DOWN
    clock.advance(5)  # t=25: on trial again
    assert one.state == READY and one.trial
    trial = pool.take("m", prefer=1)
    assert trial is one
    one.succeeded()  # its trial request answered: full traffic
    assert not one.trial and one.failures == 0
    assert pool.take("m", prefer=1) is one
    pool.release(one)
    pool.release(one)
    assert one.ready and one.held_until is None and gauges() == [0.0, 0.0]

    fails(3)  # soon after its trial: held for twice as long again
    assert one.state == DOWN and one.held_until == 25.0 + 20.0
    for seconds in (1, 2, 3, 4, 5, 6, 7, 8):  # each hold in a row doubles, up to HOLD_MAX
        one.hold()
    assert one.held_until == clock.seconds() + HOLD_MAX
    servers[1].healthy = False
    clock.advance(5)  # t=30: its probe fails: really down, the hold is lifted
    assert one.held_until is None
    servers[1].healthy = True
    clock.advance(5)  # t=35: back at once, without a trial, as before
    assert one.state == READY and not one.trial
    monitor.stopService()


def test_requests_failing_on_a_replica_already_down_leave_its_checks_to_decide():
    """Replica 1's checks fail: down. Its requests in flight then end in failure (their connections lost, a stream
    cut): before, each counted as a request's failure of the replica, so that once its checks passed again it
    came back with its failures past the threshold, and the first request to fail there took it down again and
    held it out; and its last_error became theirs. A request's failure on a replica already down says nothing
    new: back, it starts again from no failure."""

    clock = Clock()
    servers, replicas, pool, monitor = _probed_pool(clock)
    one = replicas[1]
    servers[1].healthy = False
    for _ in range(3):  # three failed checks
        clock.advance(5)
    assert one.state == DOWN and one.last_error == "refused"
    one.failed("The upstream provider 'vllm' broke off its answer.")  # a request in flight as it went down
    assert one.last_error == "refused"
    servers[1].healthy = True
    clock.advance(5)
    assert one.ready and not one.trial and one.failures == 0
    one.failed("The upstream provider 'vllm' is unreachable.")  # one failure alone
    assert one.ready and one.held_until is None
    monitor.stopService()


def test_a_replica_back_from_down_is_ready_only_once_its_models_are_read_again():
    """Replica 1 went down (its checks failed: a restart) and comes back serving other models (its LoRA adapters,
    loaded at run time, are gone). Before, its first passing check made it ready at once with the models it had
    listed before, so that requests for those that came before its model list was read again went there and got
    vLLM's 404; now it is ready once that list is read (its checks pass meanwhile)."""

    clock = Clock()
    servers, replicas, pool, monitor = _probed_pool(clock, failure_threshold=1)
    one = replicas[1]
    assert one.ready and one.serves("m")
    servers[1].healthy = False
    clock.advance(5)
    assert one.state == DOWN
    servers[1].healthy = True
    listing = Deferred()
    servers[1].list_models = lambda: listing
    clock.advance(5)  # its check passes; its model list is asked for
    assert one.state == DOWN and pool.take("m", exclude=[replicas[0]]) is None
    listing.callback([{"id": "base"}])
    assert one.ready and not one.serves("m") and one.serves("base")
    monitor.stopService()


def test_a_replica_whose_batch_the_gateway_fills_counts_as_queued():
    clock = Clock()
    replica = Replica(0, None, "http://r0/v1", clock)
    assert not replica.standing(clock.seconds(), 6.0)[1]
    replica.reported(LoadSample(waiting=2, running=3))  # it runs 3 at once
    assert replica.slots == 3 and replica.standing(clock.seconds(), 6.0)[1]
    replica.reported(LoadSample(waiting=0, running=1))
    assert not replica.standing(clock.seconds(), 6.0)[1]
    replica.in_flight = 3  # the gateway alone fills its batch: the next one would wait
    assert replica.standing(clock.seconds(), 6.0)[1]


# -- 4b. speed: each replica's pace, learned from its answers (a pool on a task.Clock) --------

class _Server:
    name = "vllm"
    hidden = ()


def paced_pool(clock, n=4):
    """A ready pool of C{n} replicas, choosing by load."""
    replicas = [Replica(i, _Server(), f"http://r{i}/v1", clock) for i in range(n)]
    for replica in replicas:
        replica.models, replica.state = None, READY
    return ReplicaPool("vllm", "vllm", replicas, clock)


def test_the_candidates_follow_each_replicas_state_and_model_list():
    """The pool remembers which ready replicas serve a model until a state or a model list changes."""
    clock = Clock()
    pool = paced_pool(clock, n=2)
    pool.replicas[0].models, pool.replicas[1].models = {"a": {}}, {"b": {}}

    def chosen(model, **kw):
        """The replicas four requests for C{model} went to, one after another."""
        indices = set()
        for _ in range(4):
            replica = pool.take(model, **kw)
            if replica is not None:
                indices.add(replica.index)
                pool.release(replica)
        return indices

    assert chosen("a") == {0}
    pool.replicas[1].models = {"a": {}, "b": {}}  # discovery found "a" on replica 1 too
    assert chosen("a") == {0, 1}
    pool.replicas[0].set_state(DOWN, "refused")
    assert chosen("a") == {1} and chosen("a", exclude=[pool.replicas[1]]) == set()
    pool.replicas[0].set_state(READY)
    assert chosen("a") == {0, 1}


def test_a_waiting_request_that_cannot_start_yet_does_not_hold_back_those_behind_it():
    """Replicas listing different models (LoRA adapters), each at its concurrency limit: a slot freed on a
    replica that does not serve the first waiting request's model goes to the next one it serves. Before,
    the queue stopped at its first request, and the others waited for their ROUTING_QUEUE_TIMEOUT (429)."""
    clock = Clock()
    replicas = [Replica(i, _Server(), f"http://r{i}/v1", clock, max_concurrency=1) for i in range(2)]
    for replica in replicas:
        replica.state = READY
    pool = ReplicaPool("vllm", "vllm", replicas, clock, queue_timeout=5.0)
    replicas[0].models, replicas[1].models = {"base": {}, "lora": {}}, {"base": {}}
    held = [pool.take("base"), pool.take("base")]
    assert {r.index for r in held} == {0, 1}
    lora, base = pool.acquire("lora"), pool.acquire("base")  # both wait, the LoRA request first
    assert not lora.called and not base.called
    pool.release(replicas[1])  # replica 1 frees: it does not serve "lora", but serves "base"
    assert base.called and base.result is replicas[1]
    assert not lora.called
    pool.release(replicas[0])
    assert lora.called and lora.result is replicas[0]
    assert not clock.getDelayedCalls()


def test_a_model_list_change_wakes_the_requests_waiting_for_that_model():
    """A request waits for room on the one replica that lists its model (a LoRA adapter); another replica,
    with room, lists it at its next discovery: the request goes there at once. Another waits for a model
    that its only replica stops listing: it gets 404 model_not_found at once (as a request arriving then
    does). Before, neither was looked at again until a slot freed or ROUTING_QUEUE_TIMEOUT (429)."""
    from gomodel.errors import ModelNotFound

    clock = Clock()
    replicas = [Replica(i, _Server(), f"http://r{i}/v1", clock, max_concurrency=1) for i in range(2)]
    for replica in replicas:
        replica.state = READY
    pool = ReplicaPool("vllm", "vllm", replicas, clock, queue_timeout=60.0)
    replicas[0].models, replicas[1].models = {"base": {}, "lora": {}, "old": {}}, {"base": {}}
    held = pool.take("lora")
    assert held is replicas[0]
    lora, old = pool.acquire("lora"), pool.acquire("old")
    assert not lora.called and not old.called
    replicas[1].models = {"base": {}, "lora": {}}  # replica 1 loaded the adapter
    assert lora.called and lora.result is replicas[1]
    assert not old.called
    replicas[0].models = {"base": {}, "lora": {}}  # replica 0 unloaded "old": no replica lists it
    assert old.called
    failure = []
    old.addErrback(failure.append)
    assert failure[0].check(ModelNotFound) and failure[0].value.status == 404
    assert "vllm/old" in failure[0].value.message
    assert not pool._queue and not clock.getDelayedCalls()
    # The Responses and Messages routes' own target loop goes on to the next target, as the exchange's does.
    from gomodel.proxy.exchange import fails_over
    assert fails_over(failure[0].value)


def test_a_release_into_a_long_queue_looks_once_when_every_replica_is_full_again(monkeypatch):
    """The queue is walked past a request that cannot start yet, but not once every replica is full: a slot
    freed with a hundred requests waiting starts the first and looks at no other (the queue walked whole on
    every release would cost a choice per waiting request, at saturation, where the CPU matters most)."""
    clock = Clock()
    replicas = [Replica(i, _Server(), f"http://r{i}/v1", clock, max_concurrency=1) for i in range(2)]
    for replica in replicas:
        replica.state, replica.models = READY, {"m": {}}
    pool = ReplicaPool("vllm", "vllm", replicas, clock, queue_timeout=5.0)
    held = [pool.take("m"), pool.take("m")]
    waiting = [pool.acquire("m") for _ in range(100)]
    choices = []
    monkeypatch.setattr(pool, "_choose", lambda free, *args: choices.append(free) or (free[0] if free else None))
    pool.release(held[0])
    assert [d.called for d in waiting[:2]] == [True, False] and len(choices) == 1
    for d in waiting:
        d.addErrback(lambda f: f.trap(ReplicasBusy))
    clock.advance(5.0)


def run_load(pool, clock, service, count, every=0.07):
    """Send C{count} requests, one every C{every} seconds; each holds its replica for
    C{service[index]} seconds, then ends (timing it). The requests each replica got."""
    got = [0] * len(pool.replicas)
    for _ in range(count):
        replica = pool.take(None)
        got[replica.index] += 1
        took = service[replica.index]
        clock.callLater(took, pool.release, replica, took)
        clock.advance(every)
    clock.advance(max(service))  # every request ends
    return got


def test_a_replica_three_times_slower_takes_only_what_the_others_cannot_start():
    clock = Clock()
    pool = paced_pool(clock)
    got = run_load(pool, clock, [1.0, 1.0, 1.0, 3.0], 600)
    assert [round(r.pace, 3) for r in pool.replicas] == [1.0, 1.0, 1.0, 3.0]
    *fast, slow = got
    # Its first requests (those sent before ten of them ended) learn its pace; then, with room on the
    # fast ones, it gets nothing but a request each PACE_REFRESH seconds (the run lasts 42 s).
    assert PACE_SAMPLES <= slow <= 2 * PACE_SAMPLES, got
    assert max(fast) - min(fast) <= 0.1 * min(fast), got


def test_a_replica_that_slows_down_once_its_pace_is_learned_then_takes_only_what_the_others_cannot_start():
    """Alike, the pool scores its replicas by their own counts alone; a pace that moves clearly apart
    is seen at the request that moved it."""
    clock = Clock()
    pool = paced_pool(clock, 3)
    assert min(run_load(pool, clock, [1.0, 1.0, 1.0], 300)) >= 90
    *fast, slow = run_load(pool, clock, [1.0, 1.0, 4.0], 600)
    assert pool.replicas[2].pace > SLOWER * pool.replicas[0].pace
    assert slow <= PACE_SAMPLES, (fast, slow)
    assert max(fast) - min(fast) <= 0.1 * min(fast), (fast, slow)


def test_replicas_that_answer_in_milliseconds_count_alike_whatever_the_ratio_of_their_paces():
    """Within PACE_NOISE seconds, a pace three times another's is the gateway's and the network's
    jitter, not a slower GPU: every replica keeps its share."""
    clock = Clock()
    pool = paced_pool(clock)
    got = run_load(pool, clock, [0.002, 0.002, 0.002, 0.006], 600, every=0.002)
    assert [round(r.pace, 4) for r in pool.replicas] == [0.002, 0.002, 0.002, 0.006]
    # the one with more in flight gets less, by load; counted clearly slower it would get its first
    # PACE_SAMPLES requests and nothing more
    assert min(got) >= 100, got


def test_paces_apart_by_no_more_than_the_event_loops_delays_count_alike():
    """A gateway whose event loop runs late (here each of its turns takes 0.15 s: the clock moves in such steps)
    sees every duration it measures late by up to that: paces apart by a few such delays are its own, and a replica
    keeps its share (before, one that happened to answer during a burst took only overflow for PACE_REFRESH s). A
    replica clearly slower beyond them still takes only overflow; once the loop is prompt again, the pools are told
    that its paces differ by PACE_NOISE's chance alone; a stopped probe sets no timer."""
    from gomodel.routing.lag import PROBE_EVERY, LoopLag

    clock = Clock()
    service = [0.25, 0.25, 0.25, 0.4]  # 1.6 times, 0.15 s more: clearly slower by PACE_NOISE alone
    *fast, slow = run_load(paced_pool(clock), clock, service, 600, every=0.15)
    assert slow <= 2 * PACE_SAMPLES, (fast, slow)
    pool = paced_pool(clock)
    lag = LoopLag(clock, [pool, paced_pool(clock, 1)])
    lag.startService()
    try:
        *fast, slow = run_load(pool, clock, service, 600, every=0.15)
        assert [round(r.pace, 3) for r in pool.replicas] == service
        assert pool.noise > 0.15, pool.noise
        assert slow >= min(fast), (fast, slow)
        *fast, slow = run_load(pool, clock, [0.25, 0.25, 0.25, 1.0], 600, every=0.15)  # four times: its own
        assert slow <= 2 * PACE_SAMPLES, (fast, slow)
        for _ in range(60):  # the loop prompt again: each probe on time
            clock.advance(PROBE_EVERY)
        assert lag.noise == pool.noise == PACE_NOISE
    finally:
        lag.stopService()
    assert not clock.getDelayedCalls()


def test_a_slow_replica_that_becomes_fast_regains_its_share():
    clock = Clock()
    pool = paced_pool(clock)
    service = [1.0, 1.0, 1.0, 3.0]
    run_load(pool, clock, service, 300)
    service[3] = 1.0  # its GPU is no longer shared, say: idle, it gets a request every PACE_REFRESH s ...
    run_load(pool, clock, service, int(4 * PACE_REFRESH / 0.07))
    assert pool.replicas[3].pace < SLOWER  # ... each weighing RARE_WEIGHT, so it learns its new pace soon
    *fast, slow = run_load(pool, clock, service, 300)
    assert slow >= 0.8 * min(fast), (fast, slow)


def test_a_slow_replica_takes_overflow_only():
    clock = Clock()
    pool = paced_pool(clock, 3)
    _full(pool, [7, 6, 0], [1.0, 1.0, 3.0])
    pool.replicas[2].timed_at = clock.seconds()
    assert pool.take(None).index == 1  # idle, the slow one would score 0; but the fast ones can start it
    _full(pool, [8, 8, 0], [1.0, 1.0, 3.0])
    assert pool.take(None).index == 2  # both would queue: the slow one starts it at once
    _full(pool, [8, 8, 8], [1.0, 1.0, 3.0])
    assert pool.take(None).index in (0, 1)  # every one would queue: a fast one's first place waits least
    # Idle and its pace not learned for PACE_REFRESH seconds, it gets the next request.
    _full(pool, [7, 6, 0], [1.0, 1.0, 3.0])
    clock.advance(PACE_REFRESH)
    slow = pool.take(None)
    assert slow.index == 2 and slow.rare
    pool.release(slow, 1.0)  # its duration weighs RARE_WEIGHT
    assert pool.replicas[2].pace == 3.0 + RARE_WEIGHT * (1.0 - 3.0)
    assert pool.take(None).index == 1


def test_a_slow_replica_takes_only_short_answers_when_it_would_get_overflow():
    clock = Clock()
    pool = paced_pool(clock, 3)
    asked = []

    def take(tokens):
        return pool.take(None, size=lambda: asked.append(tokens) or tokens)

    _full(pool, [7, 6, 0], [1.0, 1.0, 3.0])
    pool.replicas[2].timed_at = clock.seconds()
    assert take(96).index == 1 and not asked  # a fast one can start it: its size is not even read
    for tokens in (32, 96) * 10:  # requests the slow one could take ask for 64 tokens on average
        _full(pool, [8, 8, 0], [1.0, 1.0, 3.0])
        take(tokens)
    assert asked == [32, 96] * 10
    _full(pool, [8, 8, 0], [1.0, 1.0, 3.0])
    assert take(40).index == 2  # short: the slow one starts it at once
    _full(pool, [8, 8, 0], [1.0, 1.0, 3.0])
    assert take(90).index in (0, 1)  # long: it waits for a fast one (three times longer there is the latency tail)
    _full(pool, [8, 8, 0], [1.0, 1.0, 3.0])
    assert pool.take(None, size=lambda: None).index == 2  # no max_tokens: overflow as before
    _full(pool, [8, 8, 0], [1.0, 3.0, 3.0])
    assert take(90).index == 0  # a fast one, even if it queues longer
    _full(pool, [8, 8, 0], [1.0, 1.0, 1.0])
    assert take(90).index == 2  # replicas alike: anything starts where it can


def _full(pool, in_flight, paces, slots=8):
    for replica, n, pace in zip(pool.replicas, in_flight, paces):
        replica.slots, replica.in_flight, replica.pace = slots, n, pace
        replica.timed = 0 if pace is None else PACE_SAMPLES


def test_when_every_replica_queues_the_request_goes_where_the_wait_is_shortest():
    clock = Clock()
    pool = paced_pool(clock, 3)
    # A slot frees every pace / 8 s: the slow replica's first place waits 3/8 s, a fast one's second 2/8 s.
    _full(pool, [9, 9, 8], [1.0, 1.0, 3.0])
    assert pool.take(None).index in (0, 1)
    _full(pool, [11, 11, 8], [1.0, 1.0, 3.0])  # fourth place on a fast one: 4/8 s
    assert pool.take(None).index == 2
    # No warm cache is worth a longer wait.
    pool.release(pool.take(None, exclude=[pool.replicas[2]], affinity="p:app"))
    _full(pool, [11, 11, 8], [1.0, 1.0, 3.0])
    assert pool.take(None, affinity="p:app").index == 2
    # Paces unknown: places over batch sizes alone.
    _full(pool, [10, 9, 12], [None, None, None])
    assert pool.take(None).index == 1
    _full(pool, [10, 10, 12], [None, None, None])
    assert {pool.take(None).index, pool.take(None).index} == {0, 1}


def test_a_replica_that_has_not_shown_its_batch_size_is_taken_to_have_its_pools():
    clock = Clock()
    pool = paced_pool(clock, 3)
    _full(pool, [8, 8, 5], [1.0, 1.0, 1.0])
    first, second, small = pool.replicas
    small.weight = 0.5  # a smaller GPU, say
    second.slots = None  # it never queued yet: it is taken to run 8 at once, as the first was seen to
    # The small one scores 10, the second 8; but the second would queue, and the small one would not.
    assert pool.take(None) is small
    small.slots, small.in_flight, second.in_flight = None, 8, 9
    assert pool.take(None) is first  # every one would queue: the shortest wait (1/8 s, 2/8 s, 2/8 s)


def test_a_pin_stays_when_its_request_overflows_to_a_slower_replica():
    clock = Clock()
    for slow_pace, pinned_after in ((3.0, 0), (1.2, 1)):
        pool = paced_pool(clock, 2)
        warm, other = pool.replicas
        _full(pool, [0, 0], [1.0, slow_pace], slots=2)
        pool.release(pool.take(None, affinity="s:1"))
        assert pool.take(None, affinity="s:1") is warm
        warm.in_flight = 2  # full: the next one overflows to the other
        overflow = pool.take(None, affinity="s:1")
        assert overflow is other
        warm.in_flight = 0
        # A clearly slower replica (over SLOWER times the pace) does not take the pin; a similar one does.
        assert pool.take(None, affinity="s:1").index == pinned_after


@pytest_twisted.ensureDeferred
async def test_the_turns_of_a_long_conversation_stick_and_conversations_spread(cluster, http):
    fleet, gw = await cluster(3)
    system = "You are a careful assistant. " * 25  # > 512 characters
    assert len(system) >= 512
    seen = set()
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "first question"}]
    for i in range(6):
        response, _ = await post(http, gw, {"model": MODEL, "messages": messages})
        seen.add(served_by(response))
        messages += [{"role": "assistant", "content": f"answer {i}"}, {"role": "user", "content": f"then {i}?"}]
    assert len(seen) == 1
    # Conversations that share only the system prompt spread (each replica soon caches it) ...
    opened = set()
    for i in range(6):
        body = {"model": MODEL, "messages": [{"role": "system", "content": system},
                                             {"role": "user", "content": f"question {i}"}]}
        opened.add(served_by((await post(http, gw, body))[0]))
    assert len(opened) >= 2
    # ... and so do short prompts, which have no key.
    short = {served_by((await post(http, gw, chat(f"q{i}")))[0]) for i in range(6)}
    assert len(short) >= 2


def test_a_conversation_is_keyed_by_its_opening_once_its_prompt_is_long():
    class Request:
        requestHeaders = Headers()

        def __init__(self, body):
            self.content = io.BytesIO(json.dumps(body).encode())

    def key(**body):
        return affinity_key(Request(body), body)

    system = {"role": "developer", "content": "Be brief."}
    opening = [system, {"role": "user", "content": "Tell me about caches."}]
    assert key(messages=opening) is None  # short: nothing worth a replica's cache
    turn = opening + [{"role": "assistant", "content": "x" * PREFIX_CHARS}, {"role": "user", "content": "And?"}]
    first = key(messages=turn)
    assert first.startswith("p:")
    assert key(messages=turn + [{"role": "assistant", "content": "y"}, {"role": "user", "content": "Go on."}]) == first
    assert key(messages=[system, {"role": "user", "content": "Other."}] + turn[2:]) != first
    assert key(input=turn) == first  # the Responses API's input list reads alike
    long = "z" * PREFIX_CHARS
    assert key(prompt=long) == key(input=long) == key(prompt=long + "more")  # a completion's first characters
    assert key(prompt="short") is None


@pytest_twisted.ensureDeferred
async def test_prompt_cache_key_and_body_session_fields_stick(cluster, http):
    fleet, gw = await cluster(3)
    for field, value in (("prompt_cache_key", "pck-1"), ("session_id", "sid-1"), ("user", "user-1"),
                         ("metadata", {"user_id": "uid-1"})):
        seen = {served_by((await post(http, gw, chat(**{field: value})))[0]) for _ in range(4)}
        assert len(seen) == 1, field


@pytest_twisted.ensureDeferred
async def test_a_responses_session_sticks_to_its_replica(cluster, http):
    """Codex's stateless Responses turns (prompt_cache_key, or a session header; no previous_response_id) stay on
    the replica that has their prefix cached, as chat's do; before, Responses had no affinity at all."""
    fleet, gw = await cluster(3)
    for how in ({"body": {"prompt_cache_key": "conv-1"}}, {"headers": {"X-Session-Id": ["conv-2"]}}):
        seen = set()
        for turn in range(4):
            body = dict({"model": MODEL, "input": f"turn {turn}", "store": False}, **how.get("body", {}))
            response, _ = await post(http, gw, body, headers=how.get("headers"), path="/v1/responses")
            assert response.code == 200
            seen.add(served_by(response))
        assert len(seen) == 1, how
    spread = set()
    for i in range(6):
        response, _ = await post(http, gw, {"model": MODEL, "input": "hi", "prompt_cache_key": f"other-{i}"},
                                 path="/v1/responses")
        spread.add(served_by(response))
    assert len(spread) >= 2


class _ReferencePool(ReplicaPool):
    """L{ReplicaPool} choosing as it did before its load choice scanned the replicas' paces once a request:
    L{_paces_alike} looked at them all again, then the load path looked at the free ones."""

    def _paces_alike(self):
        self._learned(None)
        return self._alike

    def _choose(self, free, affinity, size=None):
        """The replica to use among C{free} (all ready, all with room), or None.

        @param size: L{take}'s. With the C{load} strategy, a request that asks for more output than
            the pool's requests do on average goes to a clearly slower replica only when no faster one
            is free (it queues on a faster one instead).
        """
        if not free:
            return None
        if len(free) == 1:
            return free[0]
        if self._drawn:
            if self._strategy == "round_robin":
                if not self._unweighted:
                    return self._weighted_turn(free)
                replica = free[self._next % len(free)]
                self._next += 1
                return replica
            return self._rng.choices(free, weights=[r.weight for r in free])[0]
        # With the load strategy, where none would queue it (no batch size learned), none reports its load
        # and none is clearly slower (their paces' envelope alike, else looked at again), each is scored
        # by its own count per unit of weight, as least_requests scores them (L{_by_count}: so as things stand).
        if self._by_count or self._strategy == "least_requests" or (not self._batch and not self._reported
                                                                    and (self._alike or self._paces_alike())):
            scores = list(map(_in_flight, free)) if self._unweighted else [r.in_flight / r.weight for r in free]
            if affinity is None:  # (L{_lowest} without a session, inline: most requests)
                best = min(scores)
                ties = scores.count(best)
                if ties == 1:
                    return free[scores.index(best)]
                if ties == len(free):  # (L{_turn} of an idle pool, all tied, inline)
                    replica = free[self._next % ties]
                    self._next += 1
                    return replica
                return self._turn(free, scores, best, ties)
            return self._lowest(free, scores, affinity)
        now = self._clock.seconds()
        max_age = self._load_max_age
        batch = self._batch
        # A request that would wait in a replica's queue goes where it would start at once, if
        # any replica has room in its batch: the wait in vLLM's queue is the tail of first tokens.
        # Those are scored by their load per unit of weight. One pass over the candidates (each step
        # a call less: this runs for every request) scores them, finds the lowest score and how many
        # share it, and the fastest and slowest learned paces.
        scores, queued = {}, {}  # queued: what each replica that would queue it holds
        best = lowest = fastest = slowest = None
        ties = 0
        for r in free:
            if r.load is None:  # no load report: L{Replica.standing} is its own count
                busy = r.in_flight
                slots = r._slots or batch
                queues = slots and busy >= slots
            else:
                busy, queues = r.standing(now, max_age, batch)
            if queues:
                queued[r] = busy
            else:
                score = scores[r] = busy / r.weight
                if best is None or score < best:
                    best, lowest, ties = score, r, 1
                elif score == best:
                    ties += 1
            if r.timed == PACE_SAMPLES:  # (L{Replica.paced})
                pace = r.pace
                if fastest is None or pace < fastest:
                    fastest = pace
                if slowest is None or pace > slowest:
                    slowest = pace
        if fastest is not None and clearly_slower(slowest, fastest):
            return self._paced_before(free, scores, queued, batch, self._slower_before(free, fastest), now,
                                      affinity, size)
        if not scores:  # every one would queue: where the wait is shortest (no warm cache is worth a longer one)
            return self._lowest(free, _waits(free, queued, batch, {}), None)
        if ties == 1 and affinity is None:
            return lowest
        return self._pick(list(scores), list(scores.values()), affinity, best, ties, lowest)


    def _paced_before(self, free, scores, queued, batch, slower, now, affinity, size):
        """L{ReplicaPool._choose_paced} as it was, its steps dicts made by comprehensions."""
        prompt = {r: score for r, score in scores.items() if r not in slower or r.due(now)}
        if prompt:
            scores = prompt
        elif size is not None and self._long(size()):
            faster = [r for r in free if r not in slower]
            if faster:
                free, scores = faster, {}
        scores = {r: score * slower.get(r, 1.0) for r, score in scores.items()}
        if scores:
            replica = self._lowest(list(scores), list(scores.values()), affinity)
        else:
            replica = self._lowest(free, _waits(free, queued, batch, slower), None)
        if replica in slower:
            replica.rare = True
        return replica

    @staticmethod
    def _slower_before(free, fastest):
        """L{ReplicaPool._slower} as it was: each replica's L{Replica.slowness}."""
        slower = {}
        for r in free:
            times = r.slowness(fastest)
            if times > 1.0:
                slower[r] = times
        return slower


def _randomized_pools(seed):
    """Two pools alike (L{ReplicaPool}, L{_ReferencePool}) in a random state of paces, loads, weights and pins."""
    rng = random.Random(seed)
    n = rng.randint(2, 5)
    weights = [1.0] * n if rng.random() < 0.5 else [rng.choice((0.5, 1.0, 2.0)) for _ in range(n)]
    strategy = rng.choice(("load", "load", "load", "least_requests"))
    paces = [rng.choice((None, 0.02, 0.1, 0.12, 0.2, 0.4, 1.0)) for _ in range(n)]
    slots = [rng.choice((None, None, None, 2, 4)) for _ in range(n)]
    loads = [rng.choice((None, None, None, LoadSample(waiting=rng.choice((0, 2)), running=rng.randint(0, 4),
                                                      kv_cache_usage=rng.choice((None, 0.5, 0.99)))))
             for _ in range(n)]
    stale = rng.choice((None, None, 0.01, 0.5, 2.0))  # a pace since gone, still in the envelope
    pools = []
    for cls in (ReplicaPool, _ReferencePool):
        clock = Clock()
        clock.advance(1000)
        replicas = [Replica(i, _Server(), f"http://r{i}/v1", clock, weight=weights[i]) for i in range(n)]
        for i, r in enumerate(replicas):
            r.models, r.state = None, READY
            if paces[i] is not None:
                r.pace, r.timed, r.timed_at = paces[i], PACE_SAMPLES, 1000 - 40 * (i % 2)
            r._slots = slots[i]
            if loads[i] is not None:
                r.load, r.load_at = loads[i], 1000 - 10 * (i % 2)
        pool = cls("vllm", "vllm", replicas, clock, strategy=strategy)
        if stale is not None:
            pool._widen(stale)
        pools.append(pool)
    return rng, pools


def test_the_load_choice_picks_the_replica_it_picked_when_it_looked_at_the_paces_twice():
    """Over many random states of a pool (paces alike or not, a stale envelope of them, loads, batch sizes,
    weights, sessions, sizes), the pool chooses what the reference (its earlier two looks at the paces) did,
    request after request, with the same turns and the same clearly slower replicas marked."""
    for seed in range(400):
        rng, (pool, reference) = _randomized_pools(seed)
        for step in range(12):
            indices = sorted(rng.sample(range(len(pool.replicas)), rng.randint(1, len(pool.replicas))))
            affinity = rng.choice((None, None, "s1", "s2"))
            size = rng.choice((None, 16, 4096))
            chosen = []
            for p in (pool, reference):
                replica = p._choose([p.replicas[i] for i in indices], affinity,
                                    None if size is None else (lambda: size))
                chosen.append((replica.index, p._next, [r.rare for r in p.replicas]))
                p._lease(replica, affinity)
            assert chosen[0] == chosen[1], (seed, step)
            if step % 3 == 2:  # one request ends on each, the same one
                busy = [r.index for r in pool.replicas if r.in_flight]
                if busy:
                    i = busy[step % len(busy)]
                    for p in (pool, reference):
                        p.replicas[i].in_flight -= 1


# -- 5. admission --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_request_finding_every_replica_full_gets_429_replicas_busy(cluster, fresh, reactor):
    fleet, gw = await cluster(2, env={"REPLICA_MAX_CONCURRENCY": "1", "ROUTING_QUEUE_TIMEOUT": "0.3"})
    fleet.set(hang=True)
    held = [send(fresh, gw, chat(fake_marker=f"held{i}")) for i in range(2)]
    await wait_for(reactor, lambda: sum(r.in_flight for r in fleet) == 2)
    started = time.monotonic()
    response, body = await post(fresh, gw, chat(fake_marker="extra"))
    assert response.code == 429
    assert time.monotonic() - started >= 0.25  # it waited in the queue first
    assert response.headers.getRawHeaders(b"retry-after") == [b"1"]
    error = error_of(body)
    assert error["code"] == "replicas_busy"
    assert who_got(fleet, "extra") == []
    fleet.set(hang=False)
    for response, _ in await gatherResults(held):
        assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_a_waiting_request_is_served_when_a_slot_frees(cluster, fresh, reactor):
    fleet, gw = await cluster(2, env={"REPLICA_MAX_CONCURRENCY": "1", "ROUTING_QUEUE_TIMEOUT": "5"})
    fleet.set(hang=True)
    held = [send(fresh, gw, chat(fake_marker=f"held{i}")) for i in range(2)]
    await wait_for(reactor, lambda: sum(r.in_flight for r in fleet) == 2)
    queued = send(fresh, gw, chat(fake_marker="queued"))
    pool = gw.registry.providers[0]
    await wait_for(reactor, lambda: len(pool._queue) == 1)
    assert who_got(fleet, "queued") == []
    fleet[1].hang = False  # replica 1's request ends; its slot goes to the waiting one
    response, body = await queued
    assert response.code == 200, body
    assert served_by(response) == 1 and who_got(fleet, "queued") == [1]
    fleet[0].hang = False
    for response, _ in await gatherResults(held):
        assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_the_queue_is_forgotten(cluster, reactor):
    fleet, gw = await cluster(1, env={"REPLICA_MAX_CONCURRENCY": "1", "ROUTING_QUEUE_TIMEOUT": "5"})
    fleet.set(hang=True)
    port = gw.port
    held = await rawclient.connect(reactor, port, rawclient.chat_request(chat(fake_marker="held")))
    await wait_for(reactor, lambda: who_got(fleet, "held"))
    waiting = await rawclient.connect(reactor, port, rawclient.chat_request(chat(fake_marker="waiting")))
    pool = gw.registry.providers[0]
    await wait_for(reactor, lambda: len(pool._queue) == 1)
    waiting.transport.abortConnection()
    await wait_for(reactor, lambda: len(pool._queue) == 0)
    fleet.set(hang=False)
    await with_timeout(reactor, held.wait_for(b"chat.completion"), 5)
    held.transport.loseConnection()
    assert who_got(fleet, "waiting") == []
    await wait_for(reactor, lambda: pool.replicas[0].in_flight == 0)


# -- 6. failover before the first byte, never after ---------------------------------------

async def _all_succeed_despite(cluster, http, broken, n=12):
    fleet, gw = await cluster(3, env={"REPLICA_FAILURE_THRESHOLD": "1000"})
    await broken(fleet[0])
    for i in range(n):
        response, body = await post(http, gw, chat(fake_marker=f"m{i}"))
        assert response.code == 200, body
        got = who_got(fleet, f"m{i}")
        assert got.count(0) <= 1 and got[-1] == served_by(response) != 0
    assert len(finished_answers(fleet)) == n  # one generation per client request
    return fleet


@pytest_twisted.ensureDeferred
async def test_a_replica_answering_503_is_left_for_another(cluster, http):
    async def broken(replica):
        replica.fail_status = 503
    fleet = await _all_succeed_despite(cluster, http, broken)
    assert fleet.distribution()[0] >= 1  # it was tried, and its failures went elsewhere


@pytest_twisted.ensureDeferred
async def test_an_upstreams_retry_after_reaches_the_client_with_its_429_or_503(cluster, http):
    """Every replica overloaded: the last one's 429 (or 503) is relayed with its C{Retry-After}, which the
    SDKs wait for before they try again. Before, the header was dropped: clients came back at once."""
    fleet, gw = await cluster(2, env={"REPLICA_FAILURE_THRESHOLD": "1000"})
    for status_code, after in ((429, "7"), (503, "9")):
        for replica in fleet:
            replica.fail_status, replica.fail_headers = status_code, {"Retry-After": after}
        response, payload = await post(http, gw, chat())
        assert response.code == status_code and error_of(payload)["code"] == status_code
        assert response.headers.getRawHeaders(b"retry-after") == [after.encode()]
    with openai_client(gw) as client:
        import openai
        try:
            await in_thread(client.chat.completions.create, **chat())
        except openai.APIStatusError as e:
            assert e.status_code == 503 and e.response.headers["retry-after"] == "9"
        else:
            raise AssertionError("no error")


@pytest_twisted.ensureDeferred
async def test_a_replica_that_asks_to_be_left_alone_with_retry_after_is_passed_over_until_then(cluster, http):
    """Replica 0 answers every chat 429 (then 503) with C{Retry-After: 30}: after its first answer it gets no
    request while the others can serve (before, every other request went to it first and came back), and
    C{providers/status} shows until when (C{busy_until}). A 503 with it does not take the replica down either."""
    for status_code in (429, 503):
        fleet, gw = await cluster(3)
        fleet[0].fail_status, fleet[0].fail_headers = status_code, {"Retry-After": "30"}
        first_sent = time.time()  # (the gateway's clock: its 429 came after this, and before the status was read)
        for i in range(12):
            response, body = await post(http, gw, chat(fake_marker=f"m{i}"))
            assert response.code == 200 and served_by(response) != 0, body
        assert len(fleet[0].inference_requests) == 1
        assert len(finished_answers(fleet)) == 12  # one generation per client request
        [provider] = (await status(http, gw))["providers"]
        busy = provider["replicas"][0]
        assert busy["state"] == "ready" and first_sent + 30 <= busy["busy_until"] <= time.time() + 30
        assert [r["busy_until"] for r in provider["replicas"][1:]] == [None, None]
        asked = time.time()
        metrics = await treq.text_content(await http.get(gw.url + "/metrics"))
        busy_seconds = {line.split('replica="')[1][0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                        if line.startswith("gomodel_replica_busy_seconds{")}
        assert busy["busy_until"] - time.time() <= busy_seconds["0"] <= busy["busy_until"] - asked
        assert busy_seconds["1"] == busy_seconds["2"] == 0.0


@pytest_twisted.ensureDeferred
async def test_a_replica_asking_again_and_again_to_wait_with_retry_after_stays_ready(cluster, http, reactor):
    """Replica 0 answers every chat 503 with C{Retry-After: 1} (a rate-limiting proxy in front of a vLLM that is
    up): each time its wait is over it gets a request again, and asks again. Before, each such answer counted
    as a failure: after REPLICA_FAILURE_THRESHOLD of them it went down, held out past its wait (and its requests
    waiting for their heads were ended); now it is busy, not failing: it stays ready, passed over for as long as
    it asks."""
    fleet, gw = await cluster(2, env={"REPLICA_FAILURE_THRESHOLD": "1"})
    fleet[0].fail_status, fleet[0].fail_headers = 503, {"Retry-After": "1"}
    one = gw.registry.providers[0].replicas[0]
    for i in range(2):
        while not fleet[0].inference_requests[i:]:
            response, _ = await post(http, gw, chat())
            assert response.code == 200 and served_by(response) == 1
        assert one.ready and one.busy_until is not None and one.failures == 0
        if i == 0:
            await wait_for(reactor, lambda: one.busy_for() == 0, timeout=3)
    [provider] = (await status(http, gw))["providers"]
    assert provider["replicas"][0]["state"] == "ready"


@pytest_twisted.ensureDeferred
async def test_a_retry_after_of_thousands_of_digits_is_a_long_wait_not_a_lost_slot(cluster, http):
    """Replica 0 answers 503 with a Retry-After of 5,000 digits. Before, reading it raised (Python's limit on the
    digits of an int): the client got a 500 and the replica's request was never released (its in-flight count
    grew for good, its connection held). Now it is a wait past any other: the replica is passed over (60 s at
    most), the request goes on to replica 1, and nothing stays counted in flight."""
    fleet, gw = await cluster(2, env={"REPLICA_METRICS_INTERVAL": "0"})
    fleet[0].fail_status, fleet[0].fail_headers = 503, {"Retry-After": "9" * 5000}
    replicas = gw.registry.providers[0].replicas
    while not fleet[0].inference_requests:
        response, _ = await post(http, gw, chat())
        assert response.code == 200 and served_by(response) == 1
    assert replicas[0].busy_for() > 0
    assert [r.in_flight for r in replicas] == [0, 0]


def test_a_replica_busy_until_its_retry_after_takes_requests_only_where_no_other_can():
    clock = Clock()
    pool = paced_pool(clock, n=2)
    busy, other = pool.replicas
    busy.asked_to_wait(b"2")
    assert [pool.take(None) for _ in range(3)] == [other] * 3  # (each one still in flight)
    other.max_concurrency = other.limit = 3
    pool._changed(other)
    assert pool.take(None) is busy  # the other is full: it is the one that can start it now
    for replica in (busy, other, other, other):
        pool.release(replica)
    clock.advance(2)
    assert {pool.take(None) for _ in range(2)} == {busy, other}  # its time is over
    assert busy.busy_until is None
    for bad in (b"soon", b"-1", b"0"):
        busy.asked_to_wait(bad)
        assert busy.busy_until is None
    busy.asked_to_wait(b"86400")  # at most a minute
    assert busy.busy_until == clock.seconds() + 60
    busy.asked_to_wait(b"Wed, 21 Oct 2015 07:28:00 GMT")  # an HTTP date past: nothing more
    assert busy.busy_until == clock.seconds() + 60


@pytest_twisted.ensureDeferred
async def test_the_access_log_says_how_many_times_a_request_went_on_to_another_replica(cluster, http, access):
    """Before, the line named only the replica that answered: a request that had failed on others (and a
    failure that had been tried on every replica) read as one sent once."""
    fleet, gw = await cluster(2, env={"REPLICA_FAILURE_THRESHOLD": "1000", "ROUTING_STRATEGY": "round_robin"})
    fleet[0].fail_status = 503
    for _ in range(2):  # one of the two goes to replica 0 first
        response, _ = await post(http, gw, chat())
        assert response.code == 200
    fleet[1].fail_status = 503
    response, _ = await post(http, gw, chat())
    assert response.code == 503
    lines = [e for e in access.events if e["path"] == "/v1/chat/completions"]
    assert sorted((e["status"], e["replica"], e["retries"]) for e in lines[:2]) == [(200, 1, 0), (200, 1, 1)]
    assert lines[2]["status"] == 503 and lines[2]["retries"] == 1
    texts = [formatEvent(e) for e in lines]
    assert sorted(text.endswith(" replica=1 prompt_tokens=1 completion_tokens=3 retries=1") for text in texts[:2]) \
        == [False, True]
    # (the last replica's own 503, relayed: named as gomodel_upstream_errors_total names it; before, no error=)
    assert texts[2].endswith(" retries=1 outcome=error error=http_503") and lines[2]["error"] == "http_503"


@pytest_twisted.ensureDeferred
async def test_a_replica_refusing_connections_is_left_for_another(cluster, fresh):
    async def broken(replica):
        await replica.refuse()
    await _all_succeed_despite(cluster, fresh, broken)


@pytest_twisted.ensureDeferred
async def test_one_attempt_only_relays_the_failure(cluster, http):
    fleet, gw = await cluster(2, env={"ROUTING_MAX_ATTEMPTS": "1", "REPLICA_FAILURE_THRESHOLD": "1000"})
    fleet[0].fail_status = 503
    codes = []
    for i in range(6):
        response, _ = await post(http, gw, chat(fake_marker=f"m{i}"))
        codes.append(response.code)
        assert len(who_got(fleet, f"m{i}")) == 1
    assert codes.count(200) == 3 and len([c for c in codes if c >= 500]) == 3, codes
    failing, answering = gw.registry.providers[0].replicas
    assert failing.pace is None and answering.pace is not None  # only successful answers time a replica


async def _stream_until(reactor, gw, marker, chunks=40):
    """A raw client streaming a chat answer, once its first content event arrived."""
    body = chat(fake_marker=marker, stream=True, fake_chunks=chunks)
    client = await rawclient.connect(reactor, gw.port, rawclient.chat_request(body))
    await with_timeout(reactor, client.wait_for(b'"content":"h'), 5)
    return client


@pytest_twisted.ensureDeferred
async def test_a_replica_dying_mid_stream_is_not_retried(cluster, reactor):
    fleet, gw = await cluster(2, token_interval=0.05)
    client = await _stream_until(reactor, gw, "s")
    [index] = who_got(fleet, "s")
    fleet[index].restart()  # its connections are aborted mid-answer
    await with_timeout(reactor, client.lost, 5)
    text = bytes(client.received)
    assert b"stream_incomplete" in text
    assert b"data: [DONE]" not in text
    assert who_got(fleet, "s") == [index]  # never sent to the other replica


@pytest_twisted.ensureDeferred
async def test_a_stream_falling_silent_on_a_replica_that_goes_down_ends_soon(cluster, reactor):
    """A stream under way on a replica whose host then stops answering (its engine frozen, its connection open,
    its health checks failing): once the replica is down, the stream may be silent at most
    REPLICA_HEALTH_INTERVAL more, not HTTP_STREAM_IDLE_TIMEOUT (5 minutes): the client gets the
    stream_incomplete event and the end of the connection, never a clean end."""
    fleet, gw = await cluster(2, token_interval=0.05, env={"REPLICA_HEALTH_INTERVAL": "0.1",
                                                           "REPLICA_METRICS_INTERVAL": "0"})
    client = await _stream_until(reactor, gw, "s", chunks=200)
    [index] = who_got(fleet, "s")
    fleet[index].hang = True
    fleet[index].health_status = 503
    await with_timeout(reactor, client.lost, 5)
    text = bytes(client.received)
    assert b"stream_incomplete" in text and b"data: [DONE]" not in text
    assert gw.registry.providers[0].replicas[index].state == DOWN
    assert who_got(fleet, "s") == [index]


# -- 7. down and back -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_refused_replica_goes_down_gets_nothing_and_comes_back(cluster, http, reactor):
    fleet, gw = await cluster(3, env={"REPLICA_FAILURE_THRESHOLD": "1", "REPLICA_HEALTH_INTERVAL": "0.1"})
    await fleet[1].refuse()
    await wait_state(reactor, http, gw, 1, "down")
    before = len(fleet[1].forwarded())
    for _ in range(6):
        response, _ = await post(http, gw, chat())
        assert response.code == 200 and served_by(response) != 1
    assert len(fleet[1].forwarded()) == before
    [provider] = (await status(http, gw))["providers"]
    assert provider["ready_replicas"] == 2
    assert provider["replicas"][1]["last_error"]

    await fleet[1].accept()
    await wait_state(reactor, http, gw, 1, "ready")
    seen = {served_by((await post(http, gw, chat()))[0]) for _ in range(6)}
    assert 1 in seen


@pytest_twisted.ensureDeferred
async def test_a_replica_failing_inference_with_health_200_is_held_out_then_tried_once(cluster, http, reactor):
    """Replica 1 answers /health 200 and every chat 500: down after 3 failed requests (each went on to replica
    0), then held out past its next passing probes, then one trial request at a time; once it answers again,
    a trial's success gives it its share back. providers/status shows the hold and the trial."""
    fleet, gw = await cluster(2, env={"REPLICA_HEALTH_INTERVAL": "0.1", "REPLICA_METRICS_INTERVAL": "0"})
    pool = gw.registry.providers[0]
    one = pool.replicas[1]
    fleet[1].fail_status = 500
    while one.state == READY:
        response, _ = await post(http, gw, chat())
        assert response.code == 200 and served_by(response) == 0
    assert len(fleet[1].inference_requests) == 3
    [provider] = (await status(http, gw))["providers"]
    held = provider["replicas"][1]
    assert held["state"] == "down" and held["last_error"] == "HTTP 500" and held["held_until"] is not None
    assert not held["trial"]
    await wait_for(reactor, lambda: one.trial, timeout=5)
    [provider] = (await status(http, gw))["providers"]
    assert provider["replicas"][1]["state"] == "ready" and provider["replicas"][1]["trial"]
    while one.trial:  # its trial request fails (and goes on to replica 0): down, held longer
        response, _ = await post(http, gw, chat())
        assert response.code == 200 and served_by(response) == 0
    assert one.state == DOWN and len(fleet[1].inference_requests) == 4
    fleet[1].fail_status = None
    await wait_for(reactor, lambda: one.trial, timeout=5)
    seen = set()
    while one.trial:
        response, _ = await post(http, gw, chat())
        assert response.code == 200
        seen.add(served_by(response))
    assert 1 in seen and one.ready and one.held_until is None
    seen = {served_by((await post(http, gw, chat()))[0]) for _ in range(6)}
    assert seen == {0, 1}


async def _held_on(reactor, http, gw, fleet, index):
    """A chat request (started, not awaited) that replica C{index} holds without answering (its engine hung);
    the requests that went elsewhere on the way are answered first."""
    for i in range(20):
        marker = f"held{i}"
        answer = send(http, gw, chat(fake_marker=marker))
        await wait_for(reactor, lambda: who_got(fleet, marker))
        if who_got(fleet, marker) == [index]:
            return answer, fleet[index].inference_requests[-1]
        response, _ = await answer
        assert response.code == 200
    raise AssertionError(f"no request went to replica {index}")


@pytest_twisted.ensureDeferred
async def test_a_request_waiting_for_its_answer_on_a_replica_that_goes_down_goes_on_to_another(cluster, http,
                                                                                            reactor):
    """Replica 1's engine hangs with a request (no response head); then its health checks fail. Before, the
    request waited out its whole HTTP_RESPONSE_HEADER_TIMEOUT (10 minutes); now, as the replica goes down,
    its send is abandoned (its connection closed, so a vLLM still alive aborts it) and it goes on to replica 0,
    as a send that timed out would. The abandoned send does not count as a failure of its own."""
    fleet, gw = await cluster(2, env={"REPLICA_HEALTH_INTERVAL": "0.1", "REPLICA_METRICS_INTERVAL": "0"})
    one = gw.registry.providers[0].replicas[1]
    fleet[1].hang = True
    answer, held = await _held_on(reactor, http, gw, fleet, 1)
    fleet[1].health_status = 503
    response, body = await with_timeout(reactor, answer, 5)
    assert response.code == 200 and served_by(response) == 0 and body["choices"]
    await wait_for(reactor, lambda: held.outcome == "lost")  # its connection to replica 1 was closed
    assert one.state == DOWN and one.last_error == "The upstream provider 'vllm' answered HTTP 503."
    assert one.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_a_request_waiting_for_its_answer_on_the_last_replica_as_it_goes_down_gets_a_prompt_502(
        cluster, http, reactor):
    """The provider's only replica hangs with a streamed request (no head yet), then fails its health checks: the
    client gets a 502 upstream_unreachable in the OpenAI envelope at once (no other replica to go to), without the
    replica's address, not a 10-minute wait."""
    fleet, gw = await cluster(1, env={"REPLICA_HEALTH_INTERVAL": "0.1", "REPLICA_METRICS_INTERVAL": "0"})
    fleet[0].hang = True
    answer = send(http, gw, chat(fake_marker="s", stream=True))
    await wait_for(reactor, lambda: who_got(fleet, "s"))
    fleet[0].health_status = 503
    response, body = await with_timeout(reactor, answer, 5)
    assert response.code == 502
    error = error_of(body)
    assert error["code"] == "upstream_unreachable" and error["type"] == "provider_error"
    assert "went down" in error["message"] and "127.0.0.1" not in json.dumps(body)
    await wait_for(reactor, lambda: fleet[0].inference_requests[-1].outcome == "lost")


@pytest_twisted.ensureDeferred
async def test_a_frozen_replica_gets_no_new_request_once_a_check_failed(cluster, http, reactor, monkeypatch):
    """Replica 1 freezes (it takes connections and answers nothing, its checks included: a process stopped, a
    host whose connections hang). Until its checks have failed REPLICA_FAILURE_THRESHOLD times it is still
    ready, and each request sent there would wait for it to go down. Before, it got its turn of every new
    request meanwhile; now, once a check failed, it is passed over while another replica can start the
    request, and a passing check gives it its share again."""
    from gomodel.upstream import vllm
    monkeypatch.setattr(vllm, "HEALTH_TIMEOUT", 0.5)
    fleet, gw = await cluster(2, env={"REPLICA_HEALTH_INTERVAL": "0.1", "REPLICA_METRICS_INTERVAL": "0",
                                      "REPLICA_FAILURE_THRESHOLD": "10"})
    one = gw.registry.providers[0].replicas[1]
    fleet[1].frozen = True
    await wait_for(reactor, lambda: one.failures >= 1)
    [provider] = (await status(http, gw))["providers"]
    assert [(r["state"], r["check_failed"]) for r in provider["replicas"]] == [("ready", False), ("ready", True)]
    for i in range(6):
        response, _ = await with_timeout(reactor, send(http, gw, chat(fake_marker=f"f{i}")), 5)
        assert response.code == 200 and served_by(response) == 0
    assert not fleet[1].inference_requests
    fleet[1].frozen = False
    await wait_for(reactor, lambda: one.failures == 0)
    seen = {served_by((await post(http, gw, chat()))[0]) for _ in range(4)}
    assert seen == {0, 1}


@pytest_twisted.ensureDeferred
async def test_a_send_still_connecting_to_a_replica_that_goes_down_ends_as_never_sent(reactor):
    """A replica's address that takes no connection (its accept queue full: connections hang, as to a host gone
    from the network): a send still connecting when the replica goes down ends at once, abandoned and not sent
    (its prompt never reached the replica), rather than after HTTP_CONNECT_TIMEOUT."""
    import socket

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    address = hole.getsockname()
    filling = []
    for _ in range(3):  # (past the queue of one: the next SYNs go unanswered)
        one = socket.socket()
        one.setblocking(False)
        one.connect_ex(address)
        filling.append(one)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": f"http://127.0.0.1:{address[1]}/v1",
                                       "VLLM_MODELS": CHAT_MODEL, "HTTP_CONNECT_TIMEOUT": "60s"}, wait_ready=False)
    try:
        server = gw.registry.providers[0].replicas[0].server
        sending = Deferred.fromCoroutine(server.send(b"POST", server.url("/chat/completions"), b"{}", b"rid"))
        await deferLater(reactor, 0.2, lambda: None)
        assert not sending.called
        server.abandon()
        failures = []
        # at once, in the reactor's turns (10 s: a loaded host's pause is no failure; its connect timeout is 60 s)
        _, ticks = await turns_until(reactor, sending.addErrback(failures.append), limit=10.0)
        assert ticks < 25, f"ended {ticks} ticks of 20 ms after the replica went down"
        [failure] = failures
        assert failure.check(UpstreamUnreachable)
        assert failure.value.abandoned and not failure.value.sent
        assert "went down" in failure.value.message and "127.0.0.1" not in failure.value.message
    finally:
        await gw.service.stopService()
        for one in filling + [hole]:
            one.close()


@pytest_twisted.ensureDeferred
async def test_a_replica_down_from_the_start_is_used_soon_after_it_comes_up(cluster, http, reactor, monkeypatch):
    async def refuse_one(fleet):
        await fleet[1].refuse()
    # Its first model discovery failed and is retried after a backoff (1 s, made 30 s here: only the probe can
    # make it ready within the wait, however late a loaded host's timers fire; a 0.7 s wait could be outrun)
    monkeypatch.setattr(health, "BACKOFF_START", 60.0)
    fleet, gw = await cluster(2, prepare=refuse_one, env={"REPLICA_HEALTH_INTERVAL": "0.1"})
    assert await replica_states(http, gw) == ["ready", "loading"]
    await fleet[1].accept()
    # its first good health probe (within 0.1 s) re-reads its models at once instead
    await wait_state(reactor, http, gw, 1, "ready", timeout=10.0)
    seen = {served_by((await post(http, gw, chat()))[0]) for _ in range(4)}
    assert seen == {0, 1}


# -- 8. stalled -------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_replica_that_stops_generating_is_stalled_then_ready_again(cluster, http, fresh, reactor):
    fleet, gw = await cluster(2, env={"REPLICA_METRICS_INTERVAL": "0.1", "REPLICA_STALL_TIMEOUT": "0.3"})
    fleet[0].hang = True
    stuck = fresh.post(gw.url + "/p/vllm/v1/chat/completions",
                       data=json.dumps({"model": CHAT_MODEL, "messages": []}).encode(),
                       headers={"content-type": ["application/json"], "X-Gomodel-Replica": ["0"]})
    await wait_for(reactor, lambda: fleet[0].in_flight == 1)
    await wait_state(reactor, http, gw, 0, "stalled")
    # The request it held (pinned there: nowhere else to go) ends as it stalls, replica 1 being ready.
    response = await with_timeout(reactor, stuck, 5)
    assert response.code == 502
    error = error_of(jsonutil.loads(await treq.content(response)))
    assert error["code"] == "upstream_unreachable" and "stopped generating" in error["message"]
    for _ in range(4):
        response, _ = await post(http, gw, chat())
        assert served_by(response) == 1
    fleet[0].hang = False
    await wait_state(reactor, http, gw, 0, "ready")


@pytest_twisted.ensureDeferred
async def test_a_request_waiting_for_its_answer_on_a_replica_that_stalls_goes_on_to_another(cluster, http, reactor):
    """Replica 1's engine hangs with a request (no response head, /health 200, no token generated): once it is
    stalled, the request goes on to replica 0 at once (its connection to replica 1 closed, so a vLLM that is
    alive aborts it), rather than waiting out HTTP_RESPONSE_HEADER_TIMEOUT (10 minutes) for a stall that
    rarely passes. With no other replica ready it keeps its requests (a stall may pass)."""
    fleet, gw = await cluster(2, env={"REPLICA_METRICS_INTERVAL": "0.05", "REPLICA_STALL_TIMEOUT": "0.3"})
    one = gw.registry.providers[0].replicas[1]
    fleet[1].hang = True
    answer, held = await _held_on(reactor, http, gw, fleet, 1)
    response, body = await with_timeout(reactor, answer, 5)
    assert response.code == 200 and served_by(response) == 0 and body["choices"]
    await wait_for(reactor, lambda: held.outcome == "lost")
    assert one.state == STALLED and one.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_a_stream_on_a_replica_that_stalls_ends_soon(cluster, reactor):
    """A stream under way on a replica whose engine then hangs (its /health still 200): once the replica is
    stalled, another being ready, the stream may be silent at most REPLICA_HEALTH_INTERVAL more, not
    HTTP_STREAM_IDLE_TIMEOUT (5 minutes): the client gets the stream_incomplete event, never a clean end."""
    fleet, gw = await cluster(2, token_interval=0.05, env={"REPLICA_METRICS_INTERVAL": "0.05",
                                                           "REPLICA_STALL_TIMEOUT": "0.3",
                                                           "REPLICA_HEALTH_INTERVAL": "0.1"})
    client = await _stream_until(reactor, gw, "s", chunks=200)
    [index] = who_got(fleet, "s")
    fleet[index].hang = True
    await with_timeout(reactor, client.lost, 5)
    text = bytes(client.received)
    assert b"stream_incomplete" in text and b"data: [DONE]" not in text
    assert gw.registry.providers[0].replicas[index].state == STALLED


@pytest_twisted.ensureDeferred
async def test_the_only_replica_stalling_keeps_the_request_it_holds(cluster, http, reactor):
    """A stall may pass, and with no other replica ready there is nowhere else to go: the request stays."""
    fleet, gw = await cluster(1, env={"REPLICA_METRICS_INTERVAL": "0.05", "REPLICA_STALL_TIMEOUT": "0.3"})
    fleet[0].hang = True
    answer = send(http, gw, chat(fake_marker="s"))
    await wait_state(reactor, http, gw, 0, "stalled")
    await deferLater(reactor, 0.2, lambda: None)
    assert not answer.called and fleet[0].inference_requests[-1].outcome is None
    fleet[0].hang = False
    response, body = await with_timeout(reactor, answer, 5)
    assert response.code == 200 and body["choices"]


@pytest_twisted.ensureDeferred
async def test_a_stalled_replica_taken_down_and_back_is_watched_afresh(cluster, http, reactor):
    """A stalled replica whose requests were ended goes down (here at its first failure), is held out, then tried
    on one request. Its progress is watched afresh from then on: before, its token count from before it went
    down was still the last one seen, so the trial request, its prompt being read (no token yet), made it
    stalled at the first scrape, and it went down again, and again."""
    fleet, gw = await cluster(2, env={"REPLICA_METRICS_INTERVAL": "0.05", "REPLICA_STALL_TIMEOUT": "0.6",
                                      "REPLICA_HEALTH_INTERVAL": "0.1", "REPLICA_FAILURE_THRESHOLD": "1"})
    one = gw.registry.providers[0].replicas[1]
    fleet[1].hang = True
    answer, held = await _held_on(reactor, http, gw, fleet, 1)
    response, _ = await with_timeout(reactor, answer, 5)
    assert response.code == 200 and served_by(response) == 0
    assert one.state == DOWN
    fleet[1].hang = False
    await wait_for(reactor, lambda: fleet[1].in_flight == 0)
    fleet[1].latency = 0.2  # (its prompt read for a few scrape intervals, no token yet)
    await wait_for(reactor, lambda: one.trial)
    seen = set()
    while one.trial:
        response, _ = await post(http, gw, chat())
        assert response.code == 200
        seen.add(served_by(response))
    assert 1 in seen and one.ready


def test_a_stalled_replica_down_and_back_between_two_scrapes_is_watched_afresh():
    """Scraped every 10 s (health every 1 s), replica 1 stalls, goes down (its probes fail) and comes back between
    two scrapes: no scrape saw it down. Its progress is still watched afresh from its return: before, only a
    scrape that found it down forgot the token count from before it went, so the first scrape after its return
    found the count unchanged since long before and stalled it at once (its first request reading its prompt)."""
    from gomodel.routing.health import ReplicaMonitor
    from gomodel.routing.registry import ModelRegistry

    clock = Clock()
    servers = [_Probed(), _Probed()]
    page = b"vllm:num_requests_running 1\nvllm:generation_tokens_total 100\n"  # (running, no token more)
    for server in servers:
        server.scrape = lambda: succeed(page)
    replicas = [Replica(i, servers[i], f"http://r{i}/v1", clock) for i in range(2)]
    pool = ReplicaPool("vllm", "vllm", replicas, clock)
    monitor = ReplicaMonitor(ModelRegistry([pool], clock), clock, health_interval=1.0, metrics_interval=10.0,
                             stall_timeout=5.0)
    monitor.startService()
    try:
        one = replicas[1]
        clock.pump([0] + [1] * 20)  # t=20: its second scrape, no token in 10 s
        assert one.state == STALLED
        servers[1].healthy = False
        clock.pump([1] * 3)  # t=23: three failed probes
        assert one.state == DOWN
        servers[1].healthy = True
        clock.advance(1)  # t=24: back
        assert one.state == READY
        clock.pump([1] * 6)  # t=30: the first scrape since it came back (the request it holds: no token yet)
        assert one.state == READY
        clock.pump([1] * 10)  # t=40: no token in the 10 s it was watched
        assert one.state == STALLED
    finally:
        monitor.stopService()


# -- 9. restart ----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_restarted_replica_has_its_models_read_again(cluster, http, reactor):
    fleet, gw = await cluster(2, env={"REPLICA_METRICS_INTERVAL": "0.05"})
    pool = gw.registry.providers[0]
    await wait_for(reactor, lambda: pool.replicas[1].start_time is not None)
    fleet[1].restart(models=[CHAT_MODEL, "new/model-b"])

    async def listed():
        [provider] = (await status(http, gw))["providers"]
        return "new/model-b" in (provider["replicas"][1]["models"] or ())
    await wait_for(reactor, listed)
    response = await http.get(gw.url + "/v1/models")
    ids = sorted(m["id"] for m in jsonutil.loads(await treq.content(response))["data"])
    assert ids == sorted([MODEL, "vllm/new/model-b"])
    # Only the replica that lists it gets the new model.
    for _ in range(3):
        response, body = await post(http, gw, {"model": "vllm/new/model-b", "messages": []})
        assert response.code == 200, body
        assert served_by(response) == 1


@pytest_twisted.ensureDeferred
async def test_a_model_a_replica_lost_in_a_quick_restart_goes_to_a_replica_that_has_it(cluster, http, reactor):
    """Replica 1 restarts quickly (no check failed) without the LoRA adapter it had loaded; the gateway learns of
    it only with its next metrics scrape (here never) or model refresh. Before, each request for the adapter that
    replica 1 got meanwhile was its 404 'model does not exist'; now that answer sends the request on to a replica
    that lists it, and the model is struck off replica 1's list (its other models stay)."""
    fleet, gw = await cluster(2, models=[CHAT_MODEL, "lora-a"], env={"REPLICA_METRICS_INTERVAL": "0"})
    one = gw.registry.providers[0].replicas[1]
    fleet[1].restart(models=[CHAT_MODEL])
    for _ in range(4):
        response, body = await post(http, gw, chat(model="vllm/lora-a"))
        assert response.code == 200 and served_by(response) == 0, body
    assert [r.status for r in fleet[1].inference_requests] == [404]
    assert set(one.models) == {CHAT_MODEL} and one.ready
    seen = {served_by((await post(http, gw, chat()))[0]) for _ in range(4)}
    assert seen == {0, 1}


# -- 10. no ready replica --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_no_ready_replica_is_a_quick_503_with_retry_after(cluster, http, reactor):
    async def refuse_all(fleet):
        for replica in fleet:
            await replica.refuse()
    # No configured models: the provider's inventory stays unknown, so registry.ready() never fires.
    fleet, gw = await cluster(2, prepare=refuse_all, wait_ready=False)
    pool = gw.registry.providers[0]
    await wait_for(reactor, lambda: all(r.checked for r in pool.replicas))
    # at once: within 100 of the reactor's 20 ms ticks (2 s on an idle host; a loaded host's pause is one tick)
    (response, body), ticks = await turns_until(reactor, Deferred.fromCoroutine(post(http, gw, chat())))
    assert ticks < 100, f"answered after {ticks} ticks of 20 ms"
    assert response.code == 503
    assert response.headers.getRawHeaders(b"retry-after") == [b"5"]  # (the next check: REPLICA_HEALTH_INTERVAL)
    error = error_of(body)
    assert error["code"] == "no_ready_replica" and CHAT_MODEL in error["message"]
    assert "127.0.0.1" not in json.dumps(body)
    assert await replica_states(http, gw) == ["loading", "loading"]


@pytest_twisted.ensureDeferred
async def test_a_request_waiting_for_room_gets_the_503_once_every_replica_it_waited_for_is_down(cluster, http,
                                                                                               reactor):
    """Every replica full (their requests hung), a request waits for room; then every replica goes down
    (their checks fail, their hung requests still in flight): it gets 503 no_ready_replica at once, as a
    request arriving then does. Before, the queue was not looked at while every replica was full: it waited
    out ROUTING_QUEUE_TIMEOUT and got 429 replicas_busy, as if a replica were about to free."""
    fleet, gw = await cluster(2, env={"REPLICA_MAX_CONCURRENCY": "1", "ROUTING_QUEUE_TIMEOUT": "60s",
                                      "REPLICA_FAILURE_THRESHOLD": "1", "REPLICA_HEALTH_INTERVAL": "0.1"})
    pool = gw.registry.providers[0]
    for replica in fleet:
        replica.hang = True
    held = [send(http, gw, chat()) for _ in range(2)]
    await wait_for(reactor, lambda: [r.in_flight for r in pool.replicas] == [1, 1])
    waiting = send(http, gw, chat())
    await wait_for(reactor, lambda: len(pool._queue) == 1)
    for replica in fleet:
        replica.health_status = 503
    response, body = await with_timeout(reactor, waiting, 10)
    assert response.code == 503 and error_of(body)["code"] == "no_ready_replica", body
    assert response.headers.getRawHeaders(b"retry-after") == [b"1"]
    # The hung requests, which waited for their answers on replicas that went down, end too: at once, not
    # after HTTP_RESPONSE_HEADER_TIMEOUT (one may have gone on to the other replica, then found none ready).
    held = await with_timeout(reactor, gatherResults(held), 10)
    assert {error_of(body)["code"] for _, body in held} <= {"upstream_unreachable", "no_ready_replica"}
    assert [r.in_flight for r in pool.replicas] == [0, 0]


@pytest_twisted.ensureDeferred
async def test_requests_waiting_for_room_follow_a_replicas_new_model_list(cluster, http, reactor):
    """Replica 0 alone lists "lora" and "old", and is full (a hung request); a request for each waits. Replica 1
    loads "lora" and replica 0 drops "old" (seen at a refresh): the "lora" request goes to replica 1 at once,
    the "old" one gets 404 model_not_found at once, not 429 replicas_busy at ROUTING_QUEUE_TIMEOUT."""
    async def lists(fleet):
        fleet[0].models = [CHAT_MODEL, "lora", "old"]
    fleet, gw = await cluster(2, prepare=lists, env={"REPLICA_MAX_CONCURRENCY": "1", "ROUTING_QUEUE_TIMEOUT": "60s"})
    pool = gw.registry.providers[0]
    fleet[0].hang = True
    held = send(http, gw, chat(model="vllm/lora"))
    await wait_for(reactor, lambda: pool.replicas[0].in_flight == 1)
    lora, old = send(http, gw, chat(model="vllm/lora")), send(http, gw, chat(model="vllm/old"))
    await wait_for(reactor, lambda: len(pool._queue) == 2)
    fleet[1].models = [CHAT_MODEL, "lora"]
    fleet[0].models = [CHAT_MODEL, "lora"]
    started = time.monotonic()
    assert (await http.post(gw.url + "/admin/api/v1/runtime/refresh")).code == 200
    response, body = await with_timeout(reactor, lora, 10)
    assert response.code == 200 and served_by(response) == 1
    response, body = await with_timeout(reactor, old, 10)
    assert response.code == 404 and error_of(body)["code"] == "model_not_found", body
    assert time.monotonic() - started < 5
    fleet[0].hang = False
    await with_timeout(reactor, held, 10)


@pytest_twisted.ensureDeferred
async def test_no_ready_replica_with_configured_models(cluster, http):
    async def refuse_all(fleet):
        for replica in fleet:
            await replica.refuse()
    fleet, gw = await cluster(2, prepare=refuse_all, env={"VLLM_MODELS": CHAT_MODEL})
    response, body = await post(http, gw, chat(stream=True))
    assert response.code == 503 and error_of(body)["code"] == "no_ready_replica"
    assert response.headers.getRawHeaders(b"retry-after") == [b"5"]  # (the next check)
    # The models list still shows the configured model.
    response = await http.get(gw.url + "/v1/models")
    assert [m["id"] for m in jsonutil.loads(await treq.content(response))["data"]] == [MODEL]


# -- 11. streams and disconnects -----------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_stream_is_relayed_through_the_pool(cluster, http):
    fleet, gw = await cluster(3)
    response, body = await post(http, gw, chat(stream=True, fake_chunks=4, fake_marker="s"))
    assert response.code == 200
    text = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert text.count(b'"content":"h') == 4
    assert text.rstrip().endswith(b"data: [DONE]")
    assert b'"usage"' not in text  # not asked for
    assert who_got(fleet, "s") == [served_by(response)]


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_mid_stream_closes_the_replicas_connection(cluster, reactor):
    fleet, gw = await cluster(3, token_interval=0.05)
    client = await _stream_until(reactor, gw, "gone")
    [index] = who_got(fleet, "gone")
    [record] = [r for r in fleet[index].inference_requests if r.body.get("fake_marker") == "gone"]
    client.transport.abortConnection()
    how, _ = await with_timeout(reactor, record.closed, 5)
    assert how == "lost"
    pool = gw.registry.providers[0]
    await wait_for(reactor, lambda: pool.replicas[index].in_flight == 0)


# -- 12. passthrough pin --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_passthrough_pins_the_named_replica(cluster, http):
    fleet, gw = await cluster(3)
    for _ in range(4):
        response = await http.get(gw.url + "/p/vllm/version", headers={"X-Gomodel-Replica": ["1"]})
        assert response.code == 200
        await treq.content(response)
        assert served_by(response) == 1
    assert [len([r for r in replica.requests if r.path == b"/version"]) for replica in fleet] == [0, 4, 0]
    # Nothing of the header reaches the replica.
    assert not fleet[1].requests_with_header(b"x-gomodel-replica")
    response, body = await post(http, gw, {"model": CHAT_MODEL, "prompt": "hi"}, path="/p/vllm/tokenize",
                                headers={"X-Gomodel-Replica": ["2"]})
    assert response.code == 200 and served_by(response) == 2

    for bad, code in (("3", "unknown_replica"), ("-1", "invalid_replica"), ("x", "invalid_replica"),
                      ("+1", "invalid_replica"), ("1_0", "invalid_replica"), ("１", "invalid_replica")):
        response = await http.get(gw.url + "/p/vllm/version", headers={"X-Gomodel-Replica": [bad]})
        assert response.code == 400, bad
        error = error_of(jsonutil.loads(await treq.content(response)))
        assert error["code"] == code
        if code == "invalid_replica":  # (the header, as X-GoModel-User-Path's)
            assert error["param"] == "X-Gomodel-Replica"


# -- 13. providers/status -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_providers_status_shape(cluster, http):
    fleet, gw = await cluster(2, env={"REPLICA_MAX_CONCURRENCY": "4"})
    await post(http, gw, chat())
    payload = await status(http, gw)
    [provider] = payload["providers"]
    assert provider["name"] == "vllm" and provider["type"] == "vllm"
    assert provider["models"] == [CHAT_MODEL]
    assert provider["ready_replicas"] == 2
    assert [r["index"] for r in provider["replicas"]] == [0, 1]
    assert [r["base_url"] for r in provider["replicas"]] == fleet.base_urls
    for replica in provider["replicas"]:
        assert set(replica) >= {"index", "base_url", "state", "in_flight", "waiting", "running", "kv_cache_usage",
                                "models", "served", "weight", "max_concurrency", "consecutive_failures",
                                "last_error", "load_age_s", "load_stale", "last_state_change", "batch_size", "pace_s",
                                "busy_until", "check_failed"}
        assert replica["state"] == "ready"
        assert replica["in_flight"] == 0
        assert replica["models"] == [CHAT_MODEL]
        assert replica["max_concurrency"] == 4 and replica["weight"] == 1.0
    served = [r["served"] for r in provider["replicas"]]
    assert sorted(served) == [0, 1]
    answered = provider["replicas"][served.index(1)]
    assert answered["waiting"] == 0 and answered["kv_cache_usage"] is not None and answered["load_stale"] is False
    assert answered["pace_s"] is not None and provider["replicas"][served.index(0)]["pace_s"] is None

    response = await http.post(gw.url + "/admin/api/v1/runtime/refresh")
    assert response.code == 200
    assert jsonutil.loads(await treq.content(response)) == {"status": "refreshing"}


@pytest_twisted.ensureDeferred
async def test_admin_routes_need_the_master_key(cluster, http):
    fleet, gw = await cluster(1, env={"GOMODEL_MASTER_KEY": "sk-master"})
    response = await http.get(gw.url + STATUS)
    assert response.code == 401
    await treq.content(response)
    response = await http.get(gw.url + STATUS, headers={"Authorization": ["Bearer sk-master"]})
    assert response.code == 200
    [provider] = jsonutil.loads(await treq.content(response))["providers"]
    assert provider["replicas"][0]["state"] == "ready"


# -- 14. priority -----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_request_priority_header_on_a_priority_scheduling_provider(cluster, http):
    fleet, gw = await cluster(1, env={"VLLM_PRIORITY_SCHEDULING": "true"})
    await post(http, gw, chat(fake_marker="a"), headers={"X-Request-Priority": ["5"]})
    await post(http, gw, chat(fake_marker="b", priority=-2))
    await post(http, gw, chat(fake_marker="c", priority=-2), headers={"X-Request-Priority": ["7"]})
    bodies = {r.body["fake_marker"]: r.body for r in fleet[0].inference_requests}
    assert bodies["a"]["priority"] == 5
    assert bodies["b"]["priority"] == -2
    assert bodies["c"]["priority"] == 7
    assert not fleet[0].requests_with_header(b"x-request-priority")
    await post(http, gw, chat(fake_marker="d"), headers={"X-Request-Priority": ["-2147483648"]})
    assert fleet[0].inference_requests[-1].body["priority"] == -2**31
    for bad in ("high", "+5", "5_0", "2147483648", "--1", "５"):
        response, body = await post(http, gw, chat(), headers={"X-Request-Priority": [bad]})
        assert response.code == 400 and error_of(body)["code"] == "invalid_priority", bad
        assert error_of(body)["param"] == "X-Request-Priority"


@pytest_twisted.ensureDeferred
async def test_request_priority_header_is_ignored_elsewhere(cluster, http):
    fleet, gw = await cluster(1)
    await post(http, gw, chat(fake_marker="a"), headers={"X-Request-Priority": ["5"]})
    await post(http, gw, chat(fake_marker="b", priority=3), headers={"X-Request-Priority": ["5"]})
    bodies = {r.body["fake_marker"]: r.body for r in fleet[0].inference_requests}
    assert "priority" not in bodies["a"]
    assert bodies["b"]["priority"] == 3


def test_a_pool_hides_each_replica_address_longest_first():
    """Replicas on one host and two ports: the host alone must not be replaced before a host and port."""
    class Server:
        name = "vllm"

        def __init__(self, port):
            self.hidden = (f"http://10.0.0.1:{port}/v1", f"http://10.0.0.1:{port}", f"10.0.0.1:{port}", "10.0.0.1")

    clock = Clock()
    replicas = [Replica(i, Server(8000 + i), f"http://10.0.0.1:{8000 + i}/v1", clock) for i in range(2)]
    pool = ReplicaPool("vllm", "vllm", replicas, clock)
    error = upstream_error(400, b'{"error": {"message": "10.0.0.1:8001 is busy"}}', pool.name, pool.hidden)
    assert b"vllm is busy" in error.body() and b"8001" not in error.body()


def test_a_replica_whose_metrics_scrape_fails_is_logged_once_a_streak():
    from twisted.internet.defer import fail, succeed
    from twisted.internet.task import Clock
    from twisted.logger import Logger

    from gomodel.errors import UpstreamUnreachable
    from gomodel.routing.health import ReplicaMonitor
    from gomodel.routing.registry import ModelRegistry
    from tests.test_registry import StubProvider

    server = StubProvider("vllm", models=["m"])
    pages = [False] * 5 + [True] * 2 + [False] * 3  # whether each scrape answers
    server.scrape = lambda: succeed(b"") if pages.pop(0) else fail(UpstreamUnreachable("no /metrics"))
    clock = Clock()
    registry = ModelRegistry([ReplicaPool("vllm", "vllm", [Replica(0, server, "http://h/v1", clock)], clock)], clock)
    monitor = ReplicaMonitor(registry, clock, refresh_interval=300, health_interval=3600, metrics_interval=2)
    events = []
    monitor.log = Logger(observer=events.append)
    monitor.startService()
    try:
        clock.advance(0)
        for _ in range(10):
            clock.advance(2)
    finally:
        monitor.stopService()
    scrapes = [(e["log_level"].name, e["log_format"].split(":")[1].strip()) for e in events
               if "metrics scrape" in e["log_format"]]
    assert scrapes == [("warn", "metrics scrape failed"), ("info", "metrics scrape answers again"),
                       ("warn", "metrics scrape failed")]
    assert not pages


def test_the_fewest_in_flight_per_weight_take_turns_among_those_tied():
    """Scored by their requests in flight per unit of weight (every weight 1: the count itself), the
    lowest wins; replicas tied on it take turns, the others never chosen; a weight of 2 halves a score."""
    clock = Clock()
    for weights in ((1, 1, 1, 1), (2.0, 2.0, 2.0, 2.0), (1, 2.0, 1, 1)):
        replicas = [Replica(i, _Server(), f"http://r{i}/v1", clock, weight=w) for i, w in enumerate(weights)]
        for replica in replicas:
            replica.models, replica.state = None, READY
        pool = ReplicaPool("vllm", "vllm", replicas, clock, strategy="least_requests")
        for replica, in_flight in zip(replicas, (3, 1, 2, 1)):
            replica.in_flight = in_flight
        chosen = []
        for _ in range(4):
            replica = pool.take(None)
            chosen.append(replica.index)
            pool.release(replica)
        # r1 has 1 in flight and weight 2 in the third pool: 0.5, alone the lowest
        assert chosen == ([1, 1, 1, 1] if weights[1] == 2.0 and weights[0] == 1 else [1, 3, 1, 3]), (weights, chosen)


def test_replicas_tied_on_their_counts_take_turns_in_their_order():
    """Every weight 1 (the counts themselves are the scores): the tied take turns in the pool's order, whether a few
    of them tie (the third in turn too) or all of them (an idle pool)."""
    clock = Clock()
    for counts, turns in (((2, 0, 1, 0, 0), [1, 3, 4, 1, 3, 4, 1]), ((0, 0, 0, 0), [0, 1, 2, 3, 0, 1, 2])):
        replicas = [Replica(i, _Server(), f"http://r{i}/v1", clock) for i in range(len(counts))]
        for replica, in_flight in zip(replicas, counts):
            replica.models, replica.state, replica.in_flight = None, READY, in_flight
        pool = ReplicaPool("vllm", "vllm", replicas, clock)
        chosen = []
        for _ in turns:
            replica = pool.take(None)
            chosen.append(replica.index)
            pool.release(replica)
        assert chosen == turns, (counts, chosen)


def test_a_replica_whose_metrics_scrapes_fail_is_unanswered_once_its_requests_wait_past_the_stall_timeout():
    """A vLLM whose /metrics answered, then fails (a hung engine's scrape timing out): no scrape shows its progress
    any more, so it is judged by its answers as one without /metrics is (README: "a vLLM whose scrapes fail or are
    off"). Before, the token count of its last good scrape stayed: neither that nor the stall check judged it."""
    from gomodel.routing.health import ReplicaMonitor
    from gomodel.routing.registry import ModelRegistry

    clock = Clock()
    server = _Probed()
    pages = [b"vllm:num_requests_running 0\nvllm:generation_tokens_total 100\n"]
    server.scrape = lambda: succeed(pages.pop()) if pages else fail(UpstreamUnreachable("timed out"))
    server.awaiting = set()
    replica = Replica(0, server, "http://r0/v1", clock)
    pool = ReplicaPool("vllm", "vllm", [replica, Replica(1, _Probed(), "http://r1/v1", clock)], clock)
    monitor = ReplicaMonitor(ModelRegistry([pool], clock), clock, health_interval=1.0, metrics_interval=2.0,
                             stall_timeout=5.0)
    monitor.startService()
    try:
        clock.pump([0] + [1] * 3)  # t=3: one scrape answered, one failed
        assert replica.state == READY and not pages
        server.awaiting.add(Deferred())  # a request waiting for its answer's head from now on
        replica.in_flight = 1
        clock.pump([1] * 8)  # t=11: it waited past the stall timeout, none answered
        assert replica.unanswered
    finally:
        monitor.stopService()


def test_each_strategy_chooses_among_ready_replicas_with_room_as_it_says():
    """least_requests and load (nothing learned) take the fewest in flight, ties in turn; round_robin takes
    turns whatever the load; random draws by weight (a replica of weight 0 never)."""
    import random

    clock = Clock()

    def pool(strategy, weights=(1.0, 1.0, 1.0)):
        replicas = [Replica(i, _Probed(), f"http://r{i}/v1", clock, weight=w) for i, w in enumerate(weights)]
        for replica in replicas:
            replica.models = {"m": {"id": "m"}}
            replica.set_state(READY)
        return ReplicaPool("vllm", "vllm", replicas, clock, strategy=strategy, rng=random.Random(7))

    for strategy in ("least_requests", "load"):
        chosen = pool(strategy)
        chosen.replicas[0].in_flight, chosen.replicas[1].in_flight, chosen.replicas[2].in_flight = 2, 1, 1
        assert [chosen.take("m").index for _ in range(3)] == [1, 2, 1]  # (1 and 2 tie, in turn; then 1 alone)
    turns = pool("round_robin")
    turns.replicas[0].in_flight = 5
    assert [turns.take("m").index for _ in range(4)] == [0, 1, 2, 0]
    drawn = pool("random", (1.0, 0.0, 1.0))
    assert {drawn.take("m").index for _ in range(50)} == {0, 2}
