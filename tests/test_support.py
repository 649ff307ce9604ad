"""The tests' own helpers (tests/support.py), where a wrong helper would let a failing test pass."""

import json

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.task import Clock

from tests.fakes.vllm import CHAT_MODEL
from tests.support import start_gateway, stop_all, with_timeout


def _outcome(d):
    outcome = []
    d.addBoth(outcome.append)
    return outcome


def test_with_timeout_fails_where_the_cancelled_deferred_fires_with_a_result():
    """A service's C{stopService} may answer its cancellation with a result: past its time it is still a
    failure (Deferred.addTimeout alone passed that result on, so a stop that hung looked finished)."""
    clock = Clock()
    outcome = _outcome(with_timeout(clock, Deferred(lambda d: d.callback("stopped anyway")), 10))
    clock.advance(10)
    assert outcome[0].check(TimeoutError)


@pytest.mark.parametrize("fire", ["callback", "errback"])
def test_with_timeout_passes_on_what_fires_in_time_and_what_fails_on_cancel(fire):
    clock = Clock()
    d = Deferred()
    outcome = _outcome(with_timeout(clock, d, 10))
    clock.advance(9)
    getattr(d, fire)(ValueError("its own") if fire == "errback" else "done")
    assert outcome[0] == "done" if fire == "callback" else outcome[0].check(ValueError)
    broken = _outcome(with_timeout(clock, Deferred(lambda d: d.errback(KeyError("on cancel"))), 10))
    clock.advance(10)
    assert broken[0].check(KeyError)  # an error of its own is kept, not hidden by the timeout
    for result in outcome + broken:
        if not isinstance(result, str):
            result.trap(Exception)


@pytest_twisted.ensureDeferred
async def test_the_fakes_last_and_next_request_are_the_tests_not_the_gateways_own_checks(reactor, gateway, fake):
    """A replica's checks (its model list, C{/health}, C{/metrics}) come on the gateway's clock, between a test's
    requests: the request a test reads back is its own (before, C{fake.requests[-1]} or C{fake.next_request()}
    could be a scrape)."""
    [pool] = gateway.registry.providers
    server = pool.replicas[0].server
    arrived = fake.next_request()
    checked = server.scrape()  # (as the monitor's next tick would, between the chat and the test's look)
    response = await treq.post(gateway.url + "/v1/chat/completions", json.dumps(
        {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"Content-Type": "application/json"})
    await treq.content(response)
    await with_timeout(reactor, checked, 5)
    await server.health()
    assert response.code == 200 and fake.requests[-1].is_check
    sent = fake.last_request()
    assert (sent.method, sent.path) == (b"POST", b"/v1/chat/completions") and (await arrived) is sent
    assert fake.forwarded() == [sent] and fake.last_request(b"/v1/chat/completions") is sent
    with pytest.raises(IndexError):
        fake.last_request(b"/v1/completions")


@pytest_twisted.ensureDeferred
async def test_start_gateway_returns_once_an_answering_replica_is_ready_though_its_first_checks_timed_out(
        reactor, fake):
    """On a loaded host a replica's first checks can run out of time before their answers are read: the registry's
    C{ready()} fires (its replicas were checked) with the replica still loading until its next probe, and a test
    that sent then got 503 no_ready_replica (test_stream_routes' keep-alive test did at load 14). The replica
    answers, so start_gateway waits for it to be ready."""
    clock = Clock()  # (the upstreams' timeouts: run out at the reactor's next turn, before any answer is read)
    reactor.callLater(0, clock.advance, 60)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "REPLICA_HEALTH_INTERVAL": "0.05s"},
                             timeouts_clock=clock)
    try:
        [replica] = gw.registry.providers[0].replicas
        assert replica.ready, replica.last_error
        response = await treq.post(gw.url + "/v1/chat/completions", json.dumps(
            {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"Content-Type": "application/json"})
        assert response.code == 200, await treq.content(response)
        await treq.content(response)
    finally:
        await stop_all(gw)
