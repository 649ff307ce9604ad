"""Rate limits and budgets on the Redis counters, against the real Redis at 127.0.0.1:6379.

Each test works under a fresh random key prefix, deleted afterwards. Redis's
clock is real, so the few waits here are real and short.
"""

import socket
import threading
import time

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred, gatherResults, maybeDeferred
from twisted.internet.task import Clock, deferLater

from gomodel.errors import BudgetExceeded, RateLimitExceeded
from gomodel.limits.budgets import BudgetBook
from gomodel.limits.counters import _ADMIT, RedisCounters
from gomodel.limits.limiter import Limiter
from gomodel.limits.specs import Budget, RateLimit, Window, period_window
from gomodel.redis_client import connect, reason
from tests.integration.support import free_port
from tests.redis_server import fresh_prefix, redis_client, started_counters
from tests.support import with_timeout

redis = pytest.importorskip("redis")

HOST, PORT = "127.0.0.1", 6379


@pytest.fixture
def client():
    c = redis_client()
    yield c
    c.close()


@pytest.fixture
def prefix(client):
    with fresh_prefix(client) as name:
        yield name + ":"


@pytest.fixture
def make(reactor, prefix):
    """Start RedisCounters as separate processes would have them (each its own client); stopped after the test."""
    with started_counters(reactor, lambda: redis.Redis(host=HOST, port=PORT, socket_timeout=2), prefix) as make:
        yield make


async def refused(limiter, scopes, tokens=0, headers_for=None) -> RateLimitExceeded:
    with pytest.raises(RateLimitExceeded) as info:
        await limiter.admit(scopes, tokens, headers_for=headers_for)
    return info.value


def level(client, prefix, bucket) -> float:
    value = client.hget(prefix + bucket, "v")
    return None if value is None else float(value)


def since(started) -> float:
    """Seconds since C{started} (a C{time.monotonic()}): a bucket refilled at most its rate times them meanwhile.
    (A bound of a fixed refill, a few tenths of a second of it, failed on a loaded host: a Redis round trip of
    the counters' threads may wait its turn that long.)"""
    return time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_rpm_refuses_past_the_limit_with_headers_and_refills(reactor, make):
    limiter = Limiter(make(), reactor)
    scopes = [("key:k_1", RateLimit(rpm=2, tpm=1000))]
    started = time.monotonic()
    admission = await limiter.admit(scopes, 100, headers_for="key:k_1")
    assert admission.headers["x-ratelimit-remaining-requests"] == "1"
    assert admission.headers["x-ratelimit-limit-tokens"] == "1000"
    assert admission.headers["x-ratelimit-remaining-tokens"] in ("900", "901")
    await limiter.admit(scopes, 100)
    error = await refused(limiter, scopes, 100, headers_for="key:k_1")
    assert error.code == "rate_limit_exceeded" and error.type == "requests"
    assert 30 - since(started) <= int(error.headers["Retry-After"]) <= 30  # (a request back every 30 s)
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    # A one-second window of 2 refills in half a second a request.
    fast = [("key:k_2", RateLimit(custom=(Window(1, 2, None),)))]
    started = time.monotonic()
    await limiter.admit(fast, 0)
    await limiter.admit(fast, 0)
    try:
        await limiter.admit(fast, 0)
        refusal = None
    except RateLimitExceeded as e:
        refusal = e
    if refusal is not None or since(started) < 0.5:  # (past half a second, a request may be back already)
        assert refusal is not None and refusal.headers["Retry-After"] == "1"
    await deferLater(reactor, 0.55, lambda: None)
    await limiter.admit(fast, 0)


@pytest_twisted.ensureDeferred
async def test_a_changed_limit_keeps_what_was_used_used(reactor, make):
    """Raised, a limit's headroom is there at once (not as the bucket refills at the new rate); lowered, a
    client that used more than the new limit waits."""
    limiter = Limiter(make(), reactor)
    started = time.monotonic()
    for _ in range(2):
        await limiter.admit([("key:k", RateLimit(rpm=2, tpm=1000))], 100)
    await refused(limiter, [("key:k", RateLimit(rpm=2, tpm=1000))], 100)
    raised = [("key:k", RateLimit(rpm=10, tpm=5000))]
    admission = await limiter.admit(raised, 100, headers_for="key:k")
    assert admission.headers["x-ratelimit-remaining-requests"] == "7"  # 10, 3 used
    # (4700, plus what refilled since the last take: at most at the new rate, 5000 a minute)
    assert 4700 <= int(admission.headers["x-ratelimit-remaining-tokens"]) <= 4700 + 5000 / 60 * since(started)
    lowered = [("key:k", RateLimit(rpm=3, tpm=5000))]
    assert (await refused(limiter, lowered, 100)).type == "requests"  # 3 used of 3


@pytest_twisted.ensureDeferred
async def test_tpm_and_settle_up_and_down(reactor, make, client, prefix):
    limiter = Limiter(make(), reactor)
    scopes = [("key:k_1", RateLimit(tpm=600))]
    started = time.monotonic()
    admission = await limiter.admit(scopes, 500)
    error = await refused(limiter, scopes, 200)
    assert error.type == "tokens" and error.headers["Retry-After"] == "10"
    await admission.settle(50)  # used less than reserved: 450 back
    assert 550 <= level(client, prefix, "key:k_1|t60") <= 550 + 10 * since(started)  # plus what refilled (10 a s)
    admission = await limiter.admit(scopes, 100)
    await admission.settle(1050)  # used more: a debt
    assert -500 <= level(client, prefix, "key:k_1|t60") <= -500 + 10 * since(started)
    error = await refused(limiter, scopes, 0)
    assert 50 - since(started) <= error.retry_after <= 50
    too_large = await refused(limiter, scopes, 601)
    assert "Retry-After" not in too_large.headers and too_large.message.startswith("Request too large")


@pytest_twisted.ensureDeferred
async def test_concurrency_and_all_or_nothing(reactor, make, client, prefix):
    limiter = Limiter(make(), reactor)
    key, provider = ("key:k_1", RateLimit(rpm=10)), ("provider:vllm", RateLimit(concurrent=1))
    started = time.monotonic()
    held = await limiter.admit([key, provider], 0)
    error = await refused(limiter, [key, provider])
    assert error.scope == "provider:vllm" and error.headers["Retry-After"] == "1"
    # The key's request was given back when the provider refused.
    assert 9 <= level(client, prefix, "key:k_1|r60") <= 9 + since(started) / 6  # (a request back every 6 s)
    await held.release()
    await held.release()
    assert client.zcard(prefix + "provider:vllm|c") == 0
    # finish: settle and release in one round trip.
    tokens = ("key:k_2", RateLimit(tpm=1000, concurrent=1))
    started = time.monotonic()
    admission = await limiter.admit([tokens], 300)
    assert client.zcard(prefix + "key:k_2|c") == 1
    await admission.finish(100)
    assert client.zcard(prefix + "key:k_2|c") == 0
    assert 900 <= level(client, prefix, "key:k_2|t60") <= 900 + 1000 / 60 * since(started)
    await admission.finish(1000)  # once only
    assert level(client, prefix, "key:k_2|t60") >= 900
    again = await limiter.admit([key, provider], 0)
    await again.release()
    # A refusal by one scope's bucket takes nothing from the others'.
    tight = ("path:/t", RateLimit(rpm=1))
    await limiter.admit([tight], 0)
    before = level(client, prefix, "key:k_1|r60")
    error = await refused(limiter, [key, tight])
    assert error.scope == "path:/t"
    assert level(client, prefix, "key:k_1|r60") == before


@pytest_twisted.ensureDeferred
async def test_two_processes_share_one_limit_exactly(reactor, make):
    first, second = Limiter(make(), reactor), Limiter(make(), reactor)
    scopes = [("path:/team", RateLimit(rpd=10, concurrent=3))]
    admitted, refusals, held = 0, 0, []
    for i in range(16):
        limiter = first if i % 2 else second
        try:
            held.append(await limiter.admit(scopes, 0))
            admitted += 1
        except RateLimitExceeded as e:
            refusals += 1
            assert "concurrent" in e.message
            # The refusing process sees the cap reached, its own slots or not: asked at once, as routing asks
            # (its view lasts a second of the clock; after the loop, on a loaded machine, it may have passed).
            assert limiter.saturated("path:/team", scopes[0][1])
    assert (admitted, refusals) == (3, 13)
    for admission in held:
        await admission.release()
    # Refusals by the concurrency cap gave their request back: 7 of the day's 10 are left, in all.
    for i in range(7):
        admission = await (first if i % 2 else second).admit(scopes, 0)
        await admission.finish(0)
    error = await refused(first, scopes)
    assert "requests per day (RPD): Limit 10, Used 10" in error.message


@pytest_twisted.ensureDeferred
async def test_takes_are_atomic_under_concurrency(make):
    counters = [make(threads=8), make(threads=8)]
    takes = [counters[i % 2].take("race", 100, 100 / 86400, 1) for i in range(300)]
    results = await gatherResults(takes)
    assert sum(1 for r in results if r.allowed) == 100
    # And from plain threads, as other processes would.
    client = redis.Redis(host=HOST, port=PORT, socket_timeout=2)
    script = client.register_script(_ADMIT)
    allowed = []

    def worker():
        for _ in range(25):
            reply = script(keys=[counters[0]._prefix + "race2"], args=[1, 0, "", "50", repr(50 / 86400), "1"])
            allowed.append(reply[0])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    assert allowed.count(1) == 50 and len(allowed) == 200


@pytest_twisted.ensureDeferred
async def test_a_dead_holders_lease_expires_and_a_live_one_is_renewed(reactor, make):
    # live's lease lapses only if its renewals (every lease_ttl/3) stop for 2/3 of its TTL: 2 s, not a loaded
    # host's pause (with 0.9 s, a 0.6 s pause let the other take the slot)
    dead, live, other = make(lease_ttl=0.5), make(lease_ttl=3.0), make()
    assert await dead.acquire("slot", 1)
    dead.stop()  # died holding the slot: no release, no renewal
    assert await other.acquire("slot", 1) is None
    await deferLater(reactor, 0.6, lambda: None)
    lease = await other.acquire("slot", 1)
    assert lease
    await other.release(lease)
    held = await live.acquire("kept", 1)
    await deferLater(reactor, 3.3, lambda: None)  # past its TTL, renewed every second
    assert await other.acquire("kept", 1) is None
    await live.release(held)
    assert await other.acquire("kept", 1)


@pytest.mark.parametrize("seconds", [25, 3600])
@pytest_twisted.ensureDeferred
async def test_a_lease_stored_under_a_clock_ahead_lapses_within_its_ttl_and_a_live_one_survives(
        reactor, make, client, prefix, seconds):
    """A failover to a replica whose clock lags an hour: a lease is stored as the Redis time it was taken or renewed
    at plus its TTL, so one of a process that died holding a slot before it held the slot for an hour more (its
    key's limit refused every request meanwhile). A lease expiring further than a TTL from Redis's now is read as
    renewed now: a dead holder's lapses within its TTL, a live holder's is kept (and renewed from the new clock).
    So for a clock a little ahead too (25 s, under the 30 s TTL's own scale: a gateway host's clock plays no part,
    the scores are Redis's), and a status read (L{RedisCounters.peek}) then shows the slot free."""
    counters, live = make(lease_ttl=0.5), make(lease_ttl=3.0)
    ahead = (int(client.time()[0]) + seconds) * 1000
    client.zadd(prefix + "slot", {"dead": ahead + 500})  # (as the old clock stored it)
    client.pexpireat(prefix + "slot", ahead + 1500)
    assert await counters.acquire("slot", 1) is None  # held still: it lapses from now on
    for _ in range(50):
        await deferLater(reactor, 0.1, lambda: None)
        lease = await counters.acquire("slot", 1)
        if lease is not None:
            break
    else:
        pytest.fail(f"a lease stored under a clock {seconds} s ahead held its slot past its TTL")
    await counters.release(lease)
    assert await counters.peek([], ["slot"]) == ([], [0])
    held = await live.acquire("kept", 1)
    client.zadd(prefix + "kept", {held: ahead + 3000})  # its holder lives on across the step
    assert await counters.acquire("kept", 1) is None
    await live._renew()
    assert await counters.acquire("kept", 1) is None
    assert client.zscore(prefix + "kept", held) <= (int(client.time()[0]) + 4) * 1000


@pytest_twisted.ensureDeferred
async def test_from_url_and_the_interface(reactor, prefix):
    from zope.interface.verify import verifyObject

    from gomodel.limits.counters import ICounters

    counters = RedisCounters.from_url(f"redis://{HOST}:{PORT}/0", reactor, prefix=prefix)
    counters.start()
    try:
        assert verifyObject(ICounters, counters) and counters.shared
        started = time.monotonic()
        assert (await counters.take("b", 2, 1, 2)).allowed
        got = await counters.take("b", 2, 1, 2)
        assert not got.allowed and 2 - since(started) <= got.retry_after <= 2
    finally:
        counters.stop()
        counters._redis.close()


@pytest_twisted.ensureDeferred
async def test_keys_expire(reactor, make, client, prefix):
    counters = make(lease_ttl=5)
    started = time.monotonic()
    await counters.take("short", 5, 5, 1)  # full again in 0.2 s
    ttl = client.pttl(prefix + "short")
    assert 0 < ttl <= 201 or (ttl == -2 and since(started) >= 0.2)  # (or gone already: a loaded host)
    await counters.take("long", 60, 1, 30)
    assert 25_000 < client.pttl(prefix + "long") <= 30_001
    await counters.acquire("slots", 2)
    assert 4000 < client.pttl(prefix + "slots") <= 6000
    expires = reactor.seconds() + 100
    await counters.spend("sum", 10, 0.5, expires)
    assert 95 <= client.ttl(prefix + "sum") <= 101
    await counters.spend("forever", 1, 0.0, None)
    assert client.ttl(prefix + "forever") == -1
    assert await counters.adjust("long", 60, 1, -100) == 60  # given back to full: nothing kept
    assert not client.exists(prefix + "long")
    await deferLater(reactor, 0.3, lambda: None)
    assert not client.exists(prefix + "short")


@pytest_twisted.ensureDeferred
async def test_budgets_across_a_period_boundary_shared_by_two_processes(reactor, make):
    clock = Clock()
    # Tomorrow 12:59:30 UTC: ahead of Redis's clock (sums expire after their period), and an hour
    # boundary that is not a day's.
    tomorrow, _ = period_window("daily", reactor.seconds() + 86400)
    clock.rightNow = tomorrow + 12 * 3600 + 59 * 60 + 30
    books = [BudgetBook(make(), clock, seed=lambda scope, since: (0, 0.0)), BudgetBook(make(), clock)]
    scopes = [("path:/team", [Budget("hourly", max_cost=1.0), Budget("total", max_tokens=10_000)]),
              ("key:k", [Budget("daily", max_tokens=300)])]
    await books[0].check(scopes)
    await books[0].record(scopes, 100, 0.6)
    await books[1].record(scopes, 100, 0.4)
    with pytest.raises(BudgetExceeded) as info:
        await books[0].check(scopes)
    assert info.value.scope == "path:/team" and "hourly cost limit of 1 reached" in info.value.message
    assert info.value.headers["Retry-After"] == "30"
    clock.advance(30)  # a new hour
    await books[1].check(scopes)
    await books[1].record(scopes, 100, None)  # unpriced: tokens only
    with pytest.raises(BudgetExceeded) as info:
        await books[0].check(scopes)
    assert info.value.scope == "key:k" and info.value.headers["Retry-After"] == str(11 * 3600)


@pytest_twisted.ensureDeferred
async def test_a_request_begun_before_a_periods_end_is_charged_to_that_period(reactor, make):
    """A request that started before the hour's end and ended after it is charged to the hour it began in, as
    the usage ledger dates it (before: to the new hour, whose sum then disagreed with the ledger)."""
    clock = Clock()
    tomorrow, _ = period_window("daily", reactor.seconds() + 86400)  # (ahead of Redis's clock: see above)
    clock.rightNow = tomorrow + 12 * 3600 + 59 * 60 + 59
    book = BudgetBook(make(), clock, seed=lambda scope, since: (0, 0.0))
    scopes = [("key:k", [Budget("hourly", max_tokens=100)])]
    await book.check(scopes)
    started = clock.seconds()
    clock.advance(2)  # a new hour
    await book.check(scopes)
    await book.record(scopes, 100, None, at=started)
    await book.check(scopes)  # the new hour's 100 are whole
    clock.rightNow = started
    with pytest.raises(BudgetExceeded):  # the old hour's are spent
        await book.check(scopes)


@pytest_twisted.ensureDeferred
async def test_shared_budget_sums_start_from_the_ledger_once_and_again_when_redis_loses_them(
        reactor, make, client, prefix):
    """Two processes: the first to check a budget sets its sum from the usage ledger (a budget added
    mid-period counts what was spent), the other's seed changes nothing (not counted twice); a sum Redis
    lost is read from the ledger again at the next check; a sum Redis kept from before seeds were marked
    (an upgrade) keeps the larger figure."""
    ledger = {"key:k": (250, 0.5)}  # what the usage ledger holds for the scope this period
    reads = []

    def seed(scope, since):
        reads.append(scope)
        return ledger.get(scope, (0, 0.0))

    clock = Clock()
    clock.rightNow = reactor.seconds()
    books = [BudgetBook(make(), clock, seed=seed), BudgetBook(make(), clock, seed=seed)]
    scopes = [("key:k", [Budget("daily", max_tokens=400)])]
    pairs = [("key:k", Budget("daily", max_tokens=400))]
    await books[0].check(scopes)
    await books[1].check(scopes)
    assert await books[1].spent(pairs) == [(250, 0.5)] and reads == ["key:k", "key:k"]  # once each, added once
    await books[0].record(scopes, 100, 0.25)
    await books[1].check(scopes)  # 350 of 400
    await books[1].record(scopes, 100, 0.25)
    with pytest.raises(BudgetExceeded):
        await books[0].check(scopes)
    assert len(reads) == 2  # seeded: no more reads

    [bucket] = client.keys(prefix + "budget|*")
    client.delete(bucket)  # Redis restarted without its data; the ledger has written every request since
    ledger["key:k"] = (450, 1.0)
    with pytest.raises(BudgetExceeded):
        await books[1].check(scopes)
    assert len(reads) == 3 and await books[0].spent(pairs) == [(450, 1.0)]

    client.delete(bucket)  # again, and a request is recorded before the next check: in the ledger too
    await books[0].record(scopes, 10, 0.0)
    ledger["key:k"] = (460, 1.0)
    with pytest.raises(BudgetExceeded):
        await books[0].check(scopes)
    assert len(reads) == 4 and await books[1].spent(pairs) == [(460, 1.0)]  # the larger figure: not 470

    client.hdel(bucket, "s")  # a sum kept from before the mark existed (an upgrade), above the ledger's
    ledger["key:k"] = (300, 0.5)
    with pytest.raises(BudgetExceeded):
        await books[1].check(scopes)
    assert len(reads) == 5 and await books[0].spent(pairs) == [(460, 1.0)]  # not 760


@pytest_twisted.ensureDeferred
async def test_an_unreachable_redis_fails_open_and_says_so(reactor, refusing_port):
    port = refusing_port
    counters = RedisCounters(redis.Redis(host=HOST, port=port, socket_connect_timeout=1), "x:", reactor,
                             retry_after=60)
    seen = []
    from twisted.logger import globalLogPublisher

    observer = seen.append
    globalLogPublisher.addObserver(observer)
    counters.start()
    try:
        limiter = Limiter(counters, reactor)
        admission = await limiter.admit([("key:k", RateLimit(rpm=1, concurrent=1))], 10, headers_for="key:k")
        await limiter.admit([("key:k", RateLimit(rpm=1, concurrent=1))], 10)
        await admission.settle(5)
        await admission.release()
        assert await counters.spent("b") == (0, 0.0)
        await counters.spend("b", 1, 1.0, None)
        # Two admissions, the release of the first's slot (held all the same: for Redis once it is back), a read
        # and a write; nothing to settle.
        assert counters.failures == 5
        assert admission.headers["x-ratelimit-remaining-requests"] == "1"
        ledger = {"key:k": (500, 0.5), "key:j": (300, 0.0)}
        book = BudgetBook(counters, reactor, seed=lambda scope, since: ledger[scope])
        scopes = [("key:k", [Budget("daily", max_tokens=400)])]
        with pytest.raises(BudgetExceeded):  # judged by the usage ledger meanwhile, not let through
            await book.check(scopes)
        await book.check([("key:j", [Budget("daily", max_tokens=400)])])  # room by the ledger
        await book.record(scopes, 10, 0.0)
        assert await book.spent([("key:k", Budget("daily", max_tokens=400))]) == [(500, 0.5)]  # the ledger's, not 0
    finally:
        globalLogPublisher.removeObserver(observer)
        counters.stop()
        counters._redis.close()
    warnings = [e for e in seen if "rate and concurrency limits are not enforced" in e.get("log_format", "")]
    assert len(warnings) == 1  # once, not per request
    from twisted.logger import formatEvent

    said = formatEvent(warnings[0])  # why, without where: redis-py's "connecting to 127.0.0.1:PORT" is left out
    assert "Connection refused" in said and f"{HOST}:{port}" not in said and str(port) not in said, said


@pytest_twisted.ensureDeferred
async def test_operations_queued_when_redis_stops_answering_fail_open_without_waiting_their_turn(reactor):
    """A Redis that accepts connections but never answers (stopped, a partition that drops packets) costs the
    operations already queued for the counters' threads no timeout each: once one has timed out, the others
    answer open at once (before, the fortieth of 40 admissions waited ten timeouts, 4 threads at a time)."""
    with socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen(64)  # connections complete in the backlog; nothing is ever read or answered
        port = silent.getsockname()[1]
        counters = RedisCounters(connect(f"redis://{HOST}:{port}/0", timeout=0.5), "x:", reactor, threads=4)
        counters.start()
        limiter = Limiter(counters, reactor)
        try:
            started = time.monotonic()
            admissions = await gatherResults([ensureDeferred(limiter.admit([("key:k", RateLimit(rpm=1))], 10))
                                              for _ in range(40)])
            took = time.monotonic() - started
        finally:
            counters.stop()
            counters._redis.close()
    assert len(admissions) == 40 and counters.failures == 40  # all open: none refused
    assert took < 2.0, f"the last admission waited {took:.1f} s"


@pytest_twisted.ensureDeferred
async def test_read_says_what_windows_and_slots_hold_and_takes_nothing(reactor, make, client, prefix):
    limiter = Limiter(make(), reactor)
    key = ("key:k", RateLimit(rpm=60, tpm=6000, concurrent=2))
    assert await limiter.read([key]) == [({(60, False): 60.0, (60, True): 6000.0}, 0)]
    started = time.monotonic()
    held = await limiter.admit([key], 600)
    (levels, slots), = await limiter.read([key])
    refilled = since(started)  # (a request a second, 100 tokens)
    assert 59 <= levels[60, False] <= 59 + refilled and 5400 <= levels[60, True] <= 5400 + 100 * refilled
    assert slots == 1
    (again, _), = await limiter.read([key])
    # nothing taken or held
    assert levels[60, False] <= again[60, False] <= 59 + since(started) and client.zcard(prefix + "key:k|c") == 1
    await held.finish(100)
    (levels, slots), = await limiter.read([key])
    assert 5900 <= levels[60, True] <= 6000 and slots == 0


@pytest_twisted.ensureDeferred
async def test_read_of_an_unreachable_redis_is_none(reactor, refusing_port):
    port = refusing_port
    counters = RedisCounters(redis.Redis(host=HOST, port=port, socket_connect_timeout=1), "x:", reactor)
    counters.start()
    try:
        assert await Limiter(counters, reactor).read([("key:k", RateLimit(rpm=1, concurrent=1))]) is None
    finally:
        counters.stop()
        counters._redis.close()


@pytest_twisted.ensureDeferred
async def test_a_slot_admitted_open_while_redis_stalled_counts_once_redis_is_back_until_its_request_ends(
        reactor, tmp_path):
    """A request admitted open while Redis does not answer (paused, a network cut) runs on once Redis is back: its
    lease is put in Redis at its holder's next renewal, so the cap holds again for the requests in flight (before,
    it held nothing: a key of one slot had a second request run beside it until it ended), and freed when it ends.
    (A Redis that stalled and comes back may run the admission it had read: the same lease, counted once.)"""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path)
    counters = RedisCounters(connect(server.url, timeout=0.5), "x:", reactor, retry_after=0.2)
    other = RedisCounters(connect(server.url, timeout=0.5), "x:", reactor)
    counters.start()
    other.start()
    try:
        await counters.release(await counters.acquire("key:k|c", 1))  # (Redis has the script)
        server.pause()
        opened = await counters.acquire("key:k|c", 1)  # answered open
        assert opened is not None
        server.resume()
        await deferLater(reactor, 0.3, lambda: None)  # (Redis is tried again after retry_after)
        await maybeDeferred(counters._renew)
        assert await other.acquire("key:k|c", 1) is None, "the request admitted open was not counted"
        await counters.release(opened)
        lease = await _slot_taken_again(reactor, other)
        assert lease is not None, "the slot admitted open was never freed"
        await other.release(lease)
    finally:
        counters.stop()
        other.stop()
        counters._redis.close()
        other._redis.close()
        server.stop()


async def _slot_taken_again(reactor, counters):
    """The lease of key:k|c's one slot, asked for every 0.1 s for up to 5 s (a Redis back after failing is left
    alone for a moment: admissions are answered open meanwhile, their lease not taken by Redis); the last
    answer when none came."""
    for _ in range(50):
        lease = await counters.acquire("key:k|c", 1)
        if lease is not None and counters._redis.zscore("x:key:k|c", lease) is not None:
            break
        if lease is not None:
            await counters.release(lease)
        await deferLater(reactor, 0.1, lambda: None)
    return lease


@pytest_twisted.ensureDeferred
async def test_a_slot_whose_release_failed_while_redis_stalled_is_freed_when_redis_is_back(reactor, tmp_path):
    """A request that ends while Redis does not answer could not free its slot: it is freed once Redis answers
    again (before, it held the slot until its lease lapsed, 30 s)."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path)
    counters = RedisCounters(connect(server.url, timeout=0.5), "x:", reactor, retry_after=0.2)
    counters.start()
    try:
        held = await counters.acquire("key:k|c", 1)
        assert counters._redis.zscore("x:key:k|c", held) is not None
        server.pause()
        await counters.release(held)  # answered open: the slot is still Redis's
        server.resume()
        lease = await _slot_taken_again(reactor, counters)
        assert lease is not None, "the slot whose release failed was never freed"
        await counters.release(lease)
    finally:
        counters.stop()
        counters._redis.close()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_an_admission_cancelled_while_redis_answers_gives_back_what_redis_took(reactor, tmp_path):
    """A request whose client leaves while Redis runs its admission (a slow or stalled Redis) is cancelled there:
    what Redis then takes is given back once it answers, its slot freed and its tokens unused (before, the answer
    was dropped, so the slot stayed held until its lease lapsed, 30 s: a key with one slot got 429 meanwhile)."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path)
    counters = RedisCounters(connect(server.url, timeout=5), "x:", reactor)
    counters.start()
    try:
        limiter = Limiter(counters, reactor)
        scopes = [("key:k", RateLimit(tpm=1000, concurrent=1))]
        (await limiter.admit(scopes, 0)).finish(0)  # (Redis has the script)
        server.pause()
        admitting = ensureDeferred(limiter.admit(scopes, 600))
        await deferLater(reactor, 0.2, lambda: None)  # (sent: Redis runs it once it is back)
        admitting.cancel()
        with pytest.raises(CancelledError):
            await admitting
        server.resume()
        for _ in range(50):
            try:
                admission = await limiter.admit(scopes, 600)  # the slot, and tokens the cancelled one took
                break
            except RateLimitExceeded:
                await deferLater(reactor, 0.1, lambda: None)
        else:
            pytest.fail("what the cancelled admission took was never given back")
        await admission.finish(0)
        assert limiter._inflight == {}
    finally:
        counters.stop()
        counters._redis.close()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_an_admission_whose_answer_cannot_be_read_fails_rather_than_never_firing(reactor, make):
    """An error reading what Redis answered (here: headers asked for by a scope that is no name) fails the
    admission; before, any error but RateLimitExceeded was raised inside the counters' callback, so the
    admission never fired and its request waited until its client left."""

    limiter = Limiter(make(), reactor)
    with pytest.raises(TypeError):
        await with_timeout(reactor, limiter.admit([("key:k", RateLimit(rpm=5))], 0, headers_for=5), 5)


def test_a_reason_hides_the_server_but_keeps_the_rest_of_redis_words(client, refusing_port):
    """C{reason} leaves out where the server is, and nothing else: Redis Cluster's refusal of a script over
    keys of several slots reads as Redis says it (before: "hash to the server same slot"), and names the setting
    that makes the gateway a cluster's client."""
    port = refusing_port
    refused = redis.Redis(host=HOST, port=port, socket_connect_timeout=1)
    with pytest.raises(redis.RedisError) as raised:
        refused.ping()
    said = reason(raised.value)
    assert str(port) not in said and HOST not in said and "the server" in said, said
    refused.close()
    with pytest.raises(redis.RedisError) as raised:
        client.eval("return redis.error_reply(\"CROSSSLOT Keys in request don't hash to the same slot\")", 0)
    assert reason(raised.value) == "ClusterCrossSlotError: Keys in request don't hash to the same slot (REDIS_URL " \
                                   "is a node of a Redis Cluster in cluster mode: set REDIS_CLUSTER=true)"


@pytest_twisted.ensureDeferred
async def test_a_token_count_takes_only_a_slot_of_its_keys_caps_on_requests_in_flight(reactor, make):
    """As on local counters (tests/test_limits.py): a count takes no request window, only a concurrency slot."""
    from types import SimpleNamespace

    from gomodel.auth.keys import Principal
    from gomodel.http.headers import AnswerHeaders
    from gomodel.limits.gate import Gate
    from gomodel.limits.specs import LimitsConfig

    counters = make()
    gate = Gate(Limiter(counters, reactor), BudgetBook(counters, reactor), LimitsConfig(), clock=reactor)
    key = Principal("k_1", "team", rpm=1, max_concurrency=1)

    async def admit(limited):
        ctx = SimpleNamespace(principal=key, admission=None, budgets=None, usage=None, replica=0, provider="vllm",
                              upstream_model="m")
        call = SimpleNamespace(model="m", path="/chat/completions", counted=b'{"max_tokens":5}', limited=limited,
                               asked=None)
        await gate.admit(SimpleNamespace(responseHeaders=AnswerHeaders()), ctx, SimpleNamespace(name="vllm"), call)
        return ctx

    # (each finish awaited: gate.completed frees a Redis slot without waiting, and the next admission could
    # otherwise reach Redis before the release)
    await (await admit(True)).admission.finish(0)  # the minute's one request
    counting = await admit(False)
    with pytest.raises(RateLimitExceeded) as info:  # its slot held
        await admit(False)
    assert info.value.scope == "key:k_1" and "concurrent" in info.value.message
    await counting.admission.finish(0)
    await (await admit(False)).admission.finish(0)
    with pytest.raises(RateLimitExceeded) as info:  # the minute's request window untouched by the counts: still spent
        await admit(True)
    assert "(RPM)" in info.value.message, info.value.message


@pytest_twisted.ensureDeferred
async def test_a_slot_held_when_redis_loses_its_data_is_counted_again_at_its_renewal(reactor, make, client, prefix):
    """A Redis restarted empty (or flushed, or the key evicted) forgets the slots of the requests in flight: their
    renewal puts them back, so the cap holds again (before, the renewal updated only leases still there, ZADD XX,
    so every request in flight ran uncounted: a key of one slot had two running until they ended)."""
    holder, other = make(lease_ttl=30), make()
    scopes = [("key:k", RateLimit(concurrent=1))]
    held = await Limiter(holder, reactor).admit(scopes, 0)
    client.delete(*client.scan_iter(match=prefix + "*"))  # (only this test's keys)
    await holder._renew()
    assert client.zcard(prefix + "key:k|c") == 1
    assert 29_000 < client.pttl(prefix + "key:k|c") <= 31_000
    error = await refused(Limiter(other, reactor), scopes)
    assert error.scope == "key:k" and "concurrent requests" in error.message
    await held.release()
    assert client.zcard(prefix + "key:k|c") == 0


@pytest_twisted.ensureDeferred
async def test_a_slot_released_while_its_renewal_runs_is_not_put_back(reactor, make, client, prefix):
    """A renewal that Redis runs after the release of one of its leases (they run on different threads) would put
    the released slot back until its lease lapsed: the release is sent once the renewal is done."""
    counters = make(lease_ttl=30)
    lease = await counters.acquire("slot", 1)
    go = threading.Event()
    script = counters._renew_script

    def renew_late(*args, **kwargs):
        go.wait(5)
        return script(*args, **kwargs)

    counters._renew_script = renew_late
    renewing = counters._renew()
    releasing = counters.release(lease)
    assert not releasing.called  # (waits for the renewal in flight)
    go.set()
    await renewing
    await releasing
    assert client.zcard(prefix + "slot") == 0 and not counters._orphans
    assert await counters.acquire("slot", 1) is not None


@pytest_twisted.ensureDeferred
async def test_requests_admitted_while_redis_is_known_down_leave_nothing_to_free(reactor, refusing_port):
    """The leases of requests admitted open without Redis being asked (it failed a moment ago) are never in Redis:
    their end frees nothing there, and nothing is kept to free once it is back."""
    port = refusing_port
    counters = RedisCounters(redis.Redis(host=HOST, port=port, socket_connect_timeout=1), "x:", reactor,
                             retry_after=60)
    counters.start()
    try:
        first = await counters.acquire("key:k|c", 1)  # asked: refused, Redis is down from now on
        for _ in range(100):
            await counters.release(await counters.acquire("key:k|c", 1))
        await counters.release(first)
        assert not counters._held and not counters._unsent
        assert list(counters._orphans) == [first]  # (its admission was sent: a Redis that ran it is told)
        assert counters.failures == 2 + 100
    finally:
        counters.stop()
        counters._redis.close()


def _fail_over(old, tmp_path):
    """A failover at C{old}'s address: C{old} demoted to a read-only replica (of a primary that does not answer),
    and a new primary, the L{RedisServer} returned, started where the address now leads."""
    import os

    from tests.redis_server import RedisServer

    demoted = redis.Redis(unix_socket_path=old.url[len("unix://"):])
    demoted.replicaof(HOST, free_port())
    demoted.close()
    os.unlink(old.url[len("unix://"):])
    new = RedisServer(tmp_path)
    assert new.url == old.url
    return new


@pytest_twisted.ensureDeferred
async def test_after_a_failover_the_counters_reach_the_new_primary(reactor, tmp_path):
    """A failover demotes the Redis the gateway's connections reach to a read-only replica and points its address
    at the new primary (a managed Redis's endpoint): each connection refused so (READONLY) is made again, to the
    new primary (before, the connections stayed on the replica and the limits failed open for good)."""
    from tests.redis_server import RedisServer

    old = RedisServer(tmp_path)
    counters = RedisCounters(connect(old.url, timeout=0.5), "x:", reactor, retry_after=0.1)
    counters.start()
    new = None
    try:
        await counters.release(await counters.acquire("key:k|c", 1))  # (connected to the old primary)
        new = _fail_over(old, tmp_path)
        promoted = redis.Redis(unix_socket_path=new.url[len("unix://"):])
        try:
            for _ in range(50):
                lease = await counters.acquire("key:k|c", 1)
                if promoted.zscore("x:key:k|c", lease) is not None:
                    break
                await counters.release(lease)
                await deferLater(reactor, 0.1, lambda: None)
            else:
                pytest.fail("the counters never reached the new primary")
            await counters.release(lease)
            for _ in range(20):  # (each connection refused once at most: then made again)
                await gatherResults([counters.release(await counters.acquire(f"key:{n}|c", 1)) for n in range(4)])
            failures = counters.failures
            for _ in range(5):
                await gatherResults([counters.release(await counters.acquire(f"key:{n}|c", 1)) for n in range(4)])
            assert counters.failures == failures
            pool = counters._redis.connection_pool
            for conn in list(pool._available_connections):  # every connection left reaches the new primary
                conn.send_command("ROLE")
                assert conn.read_response()[0] == b"master"
        finally:
            promoted.close()
    finally:
        counters.stop()
        counters._redis.close()
        old.stop()
        if new is not None:
            new.stop()


@pytest_twisted.ensureDeferred
async def test_the_first_command_refused_readonly_after_a_failover_is_sent_again_not_answered_open(reactor, tmp_path):
    """A command its connection's server refused READONLY (demoted by a failover) is sent once more on a new
    connection, which reaches the new primary: the request is counted there, not admitted open (before, with
    redis-py 5, whose client resends only the errors named in C{retry_on_error}, it failed: limits open and Redis
    taken for down for C{retry_after})."""
    from tests.redis_server import RedisServer

    old = RedisServer(tmp_path)
    counters = RedisCounters(connect(old.url, timeout=0.5), "x:", reactor, retry_after=60)
    counters.start()
    new = None
    try:
        await counters.release(await counters.acquire("key:k|c", 1))  # (its one connection: to the old primary)
        new = _fail_over(old, tmp_path)
        promoted = redis.Redis(unix_socket_path=new.url[len("unix://"):])
        try:
            lease = await counters.acquire("key:k|c", 1)
            assert counters.failures == 0 and not counters.unreachable
            assert promoted.zscore("x:key:k|c", lease) is not None
            await counters.release(lease)
        finally:
            promoted.close()
    finally:
        counters.stop()
        counters._redis.close()
        old.stop()
        if new is not None:
            new.stop()


@pytest_twisted.ensureDeferred
async def test_an_admission_cancelled_while_it_waits_for_a_release_keeps_the_others_waiting(reactor, prefix):
    """An admission waits for the writes of its keys in flight (a release). A client that leaves cancels its
    admission: it must not cancel the release's wait for the other admissions waiting on it (they would reach
    Redis before the release and be refused the slot it frees), nor go on to take a slot itself."""
    from gomodel.limits.counters import _FINISH
    from tests.redis_server import HoldingProxy, script_sha

    proxy = HoldingProxy(reactor, script_sha(_FINISH), script_sha(_ADMIT), hold=0.5)
    counters = RedisCounters(connect(proxy.url, timeout=2), prefix, reactor)
    counters.start()
    try:
        slots = [("slot:k", 1)]
        first = await counters.admit([], slots)
        assert first.ok
        released = counters.finish([], first.lease)  # held by the proxy a while
        leaving = counters.admit([], slots)
        staying = counters.admit([], slots)
        leaving.cancel()
        with pytest.raises(CancelledError):
            await leaving
        assert (await staying).ok  # sent after the release
        await released
        assert proxy.passed == 0
        assert int(redis_client().zcard(prefix + "slot:k")) == 1  # the one that stayed; none for the one gone
    finally:
        counters.stop()
        await proxy.close()


@pytest_twisted.ensureDeferred
async def test_a_release_goes_after_the_renewal_of_its_lease_in_flight(reactor, prefix):
    """A lease's renewal puts back a lease it does not find. A request ending while its lease's renewal was on its
    way to Redis had its release sent at once: Redis could run it first, the renewal then held the slot again (a
    spurious refusal for another process until this one freed it as an orphan, with another release that no
    admission was ordered after: a sequential client's next admission on a loaded host overtook it). The release
    is now sent after the renewal, which then needs no second release."""
    from gomodel.limits.counters import _FINISH, _RENEW
    from tests.redis_server import HoldingProxy, script_sha

    proxy = HoldingProxy(reactor, script_sha(_RENEW), script_sha(_FINISH), hold=0.3)
    counters = RedisCounters(connect(proxy.url, timeout=2), prefix, reactor)
    counters.start()
    try:
        admitted = await counters.admit([], [("slot:k", 1)])
        renewed = counters._renew()  # (as its LoopingCall runs it), held by the proxy a while
        await counters.finish([], admitted.lease)
        await renewed
        assert proxy.holds == 1 and proxy.passed == 0  # the release did not overtake the renewal
        assert not counters._orphans and int(redis_client().zcard(prefix + "slot:k")) == 0
    finally:
        counters.stop()
        await proxy.close()


@pytest_twisted.ensureDeferred
async def test_the_next_admission_waits_for_what_a_cancelled_one_gives_back(reactor, prefix):
    """A client that leaves while its admission is at Redis has what Redis took given back once it answers; the
    key's next admission, sent meanwhile (the client's retry), reached Redis before that give-back and was refused
    the slot (429, max_concurrency 1) nobody held. It is now sent after the give-back."""
    from gomodel.limits.counters import _FINISH
    from tests.redis_server import HoldingProxy, script_sha

    class BothHeld(HoldingProxy):  # (the admissions and the give-back, each held as it comes)
        def _received(self, server, data):
            if server not in self._holding and script_sha(_FINISH) in data:
                self._holding[server] = [data]
                self._timers.append(self._reactor.callLater(self._hold, self._release, server))
                return
            super()._received(server, data)

    proxy = BothHeld(reactor, script_sha(_ADMIT), b"-", hold=0.3)
    counters = RedisCounters(connect(proxy.url, timeout=2), prefix, reactor)
    counters.start()
    try:
        limiter = Limiter(counters, reactor)
        await (await limiter.admit([("key:k", RateLimit(concurrent=1))], 0)).finish(0)  # (Redis has the scripts)
        scopes = [("key:k", RateLimit(concurrent=1))]
        leaving = ensureDeferred(limiter.admit(scopes, 0))
        while proxy.holds < 2:  # (at the proxy, held a while: Redis takes the slot once it comes)
            await deferLater(reactor, 0.01, lambda: None)
        leaving.cancel()
        with pytest.raises(CancelledError):
            await leaving
        admission = await limiter.admit(scopes, 0)  # (refused: RateLimitExceeded)
        await admission.finish(0)
    finally:
        counters.stop()
        await proxy.close()


@pytest_twisted.ensureDeferred
async def test_a_budget_read_cancelled_while_it_waits_for_a_charge_keeps_the_others_waiting(reactor, prefix):
    """A budget check (the gate's, awaited in its request's coroutine: cancelled when its client leaves) waits for
    the charges of its sums in flight; cancelled, the other checks waiting on the same charge still read after it
    (before, they read at once, without it: a spent budget passed)."""
    from gomodel.limits.counters import _SPEND_ALL, _SPENT
    from tests.redis_server import HoldingProxy, script_sha

    proxy = HoldingProxy(reactor, script_sha(_SPEND_ALL), script_sha(_SPENT), hold=0.3)
    counters = RedisCounters(connect(proxy.url, timeout=2), prefix, reactor)
    counters.start()
    try:
        charged = counters.spend_all([("budget:b", 21, 0.5, None)])  # held by the proxy a while
        leaving = counters.spent_all(["budget:b"])
        staying = counters.spent_all(["budget:b"])
        leaving.cancel()
        with pytest.raises(CancelledError):
            await leaving
        assert [tuple(sums) for sums in await staying] == [(21, 0.5)]
        await charged
        assert proxy.passed == 0
    finally:
        counters.stop()
        await proxy.close()


@pytest_twisted.ensureDeferred
async def test_requests_admitted_at_once_on_two_processes_cannot_overshoot_a_budget_together(reactor, make, client,
                                                                                              prefix):
    """As on local counters (tests/test_limits.py): each request reserves its estimate from the shared budget sums
    in the same Redis step that checks them, and settles to what it used. Before, twenty requests admitted at once
    on two processes each read the room left and all went (a budget of 100, 19 reserved each)."""
    from types import SimpleNamespace

    from gomodel.auth.keys import Principal
    from gomodel.http.headers import AnswerHeaders
    from gomodel.limits.gate import Gate
    from gomodel.limits.specs import LimitsConfig

    clock = Clock()
    clock.rightNow = reactor.seconds()
    gates = []
    for _ in range(2):  # two processes: their own counters and book, one Redis prefix
        counters = make()
        gates.append(Gate(Limiter(counters, reactor), BudgetBook(counters, clock, seed=lambda scope, since: (0, 0.0)),
                          LimitsConfig(), clock=clock))
    key = Principal("k_1", "team", budgets=[{"period": "daily", "max_tokens": 100}])

    async def admit(gate):
        ctx = SimpleNamespace(principal=key, admission=None, budgets=None, usage=None, replica=0, provider="vllm",
                              upstream_model="m", started=clock.seconds())
        call = SimpleNamespace(model="m", path="/chat/completions", limited=True, asked=None,
                               counted=b'{"model":"vllm/m","messages":[],"max_tokens":8}')
        await gate.admit(SimpleNamespace(responseHeaders=AnswerHeaders()), ctx, SimpleNamespace(name="vllm"), call)
        ctx.gate = gate  # (a request is settled by the process that admitted it)
        return ctx

    results = await DeferredList([ensureDeferred(admit(gates[i % 2])) for i in range(20)], consumeErrors=True)
    admitted = [ctx for ok, ctx in results if ok]
    assert all(ctx.check(BudgetExceeded) for ok, ctx in results if not ok)
    assert len(admitted) == 6  # 0, 19, ..., 95 reserved before each: room; 114 after the sixth
    spent = [("key:k_1", Budget("daily", max_tokens=100))]
    assert await gates[0].spent(spent) == [(6 * 19, 0.0)]
    for ctx in admitted:  # each used 5
        ctx.usage = {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
        ctx.token_counts = None
        ctx.gate.completed(ctx)
    for gate in gates:
        await gate._limiter.counters.written()
    assert await gates[1].spent(spent) == [(30, 0.0)]
    await admit(gates[1])  # room again


@pytest_twisted.ensureDeferred
async def test_a_reservation_is_settled_in_the_period_its_request_began_in(reactor, make, client, prefix):
    """As on local counters (tests/test_limits.py): a reservation taken before the hour's end is settled in that
    hour; one taken after it for a request begun before is given back in the new hour and charged to the old."""
    clock = Clock()
    tomorrow, _ = period_window("daily", reactor.seconds() + 86400)  # (ahead of Redis's clock: see above)
    clock.rightNow = tomorrow + 12 * 3600 + 59 * 60 + 59
    counters = make()
    book = BudgetBook(counters, clock, seed=lambda scope, since: (0, 0.0))
    scopes = [("key:k", [Budget("hourly", max_tokens=100)])]
    hours = [f"budget|key:k|hourly|{int(tomorrow) + 12 * 3600}", f"budget|key:k|hourly|{int(tomorrow) + 13 * 3600}"]
    late = await book.reserve(scopes, 19, 0.0)
    started = clock.seconds()
    clock.advance(2)  # a new hour
    early = await book.reserve(scopes, 19, 0.0)
    assert await counters.spent_all(hours) == [(19, 0.0), (19, 0.0)]
    await book.settle(late, 10, None, at=started)
    await book.settle(early, 3, None, at=clock.seconds())
    assert await counters.spent_all(hours) == [(10, 0.0), (3, 0.0)]
    crossing = await book.reserve(scopes, 19, 0.0)  # begun in the last hour, admitted in this one
    await book.settle(crossing, 7, None, at=started)
    assert await counters.spent_all(hours) == [(17, 0.0), (3, 0.0)]


@pytest_twisted.ensureDeferred
async def test_an_admission_refused_a_slot_waits_a_moment_for_another_process_to_free_it(reactor, make):
    """On shared counters a slot is freed by its process after its answer went out: another process's admission
    refused it tries again over about half a second (SLOT_WAITS) before it fails, so a client that waited for its
    last answer gets the slot that answer frees; one whose client leaves meanwhile stops trying."""
    from gomodel.limits.limiter import SLOT_WAITS

    one, two = Limiter(make(), reactor), Limiter(make(), reactor)
    scopes = [("key:k", RateLimit(concurrent=1))]
    held = await one.admit(scopes, 0)
    started = time.monotonic()
    waiting = two.admit(scopes, 0)
    await deferLater(reactor, 0.05, lambda: None)
    assert not waiting.called
    await held.release()  # (its answer went out a moment ago)
    second = await waiting  # admitted by one of its tries (refused once they are over, as below): on a loaded
    # host, whose timers fire late and whose Redis answers slowly, they can take longer than sum(SLOT_WAITS)
    started = time.monotonic()
    with pytest.raises(RateLimitExceeded) as info:  # held for good: refused once the waits are over
        await one.admit(scopes, 0)
    assert "concurrent" in info.value.message and time.monotonic() - started >= sum(SLOT_WAITS) - 0.01
    left = one.admit(scopes, 0)
    await deferLater(reactor, 0.05, lambda: None)
    left.cancel()  # its client left while it waited
    with pytest.raises(CancelledError):
        await left
    await second.release()
    await deferLater(reactor, sum(SLOT_WAITS), lambda: None)  # (a try it had left would have taken the slot)
    third = await two.admit(scopes, 0)
    await third.release()


@pytest_twisted.ensureDeferred
async def test_a_budget_reservation_cancelled_while_redis_answers_is_given_back(reactor, prefix, client):
    """A request whose client leaves while Redis runs its budget reservation: what the reservation takes is given
    back as soon as Redis answers, not held in the sum until the period's end."""
    from gomodel.limits.counters import _RESERVE
    from tests.redis_server import HoldingProxy, script_sha

    proxy = HoldingProxy(reactor, script_sha(_RESERVE), b"-", hold=0.2)
    counters = RedisCounters(redis.Redis.from_url(proxy.url, socket_timeout=2), prefix, reactor)
    counters.start()
    try:
        clock = Clock()
        clock.rightNow = reactor.seconds()
        book = BudgetBook(counters, clock, seed=lambda scope, since: (0, 0.0))
        scopes = [("key:k", [Budget("daily", max_tokens=100)])]
        await book.check(scopes)  # (seeded)
        reserving = book.reserve(scopes, 60, 0.0)
        await with_timeout(reactor, proxy.when_held(), 10)
        reserving.cancel()  # its client left while the reservation was held on its way
        with pytest.raises(CancelledError):
            await reserving
        await deferLater(reactor, 0.3, lambda: None)  # (Redis ran it, and the give-back)
        await counters.written()
        assert (await book.spent([("key:k", Budget("daily", max_tokens=100))]))[0][0] == 0
        await book.reserve(scopes, 60, 0.0)  # (the whole budget's room: nothing was kept of the cancelled one)
        assert (await book.spent([("key:k", Budget("daily", max_tokens=100))]))[0][0] == 60
    finally:
        counters.stop()
        counters._redis.close()
        await proxy.close()


@pytest_twisted.ensureDeferred
async def test_a_sum_seeded_again_keeps_the_reservations_of_the_requests_in_flight(reactor, make, client, prefix):
    """A sum seeded again (its budgets changed, or it missed charges while Redis was away) where the ledger holds
    more than it: the ledger does not count the requests in flight, so their reservations are kept on top of its
    figure. Before, the sum became the ledger's figure: their reservations were lost, a request got past a spent
    budget, and once they settled the sum undercounted for the rest of the period. A sum that Redis lost while a
    request was in flight holds none of its reservation once seeded again: it settles by adding what it used
    (before, less its reservation: an undercount)."""
    ledger = {"key:k": (0, 0.0)}
    clock = Clock()
    clock.rightNow = reactor.seconds()
    book = BudgetBook(make(), clock, seed=lambda scope, since: ledger[scope])
    scopes = [("key:k", [Budget("daily", max_tokens=100)])]
    pairs = [("key:k", Budget("daily", max_tokens=100))]
    flying = await book.reserve(scopes, 40, 0.0)  # in flight: in the sum, not in the ledger
    ledger["key:k"] = (70, 0.0)  # spent elsewhere where this sum did not count it (e.g. Redis was away)
    book.renew("key:k")  # seeded again at its next use
    with pytest.raises(BudgetExceeded):  # 70 written + 40 in flight: spent
        await book.reserve(scopes, 10, 0.0)
    assert await book.spent(pairs) == [(110, 0.0)]
    await book.settle(flying, 35, 0.0)  # it used 35 of its 40
    await book._counters.written()
    assert await book.spent(pairs) == [(105, 0.0)]
    ledger["key:k"] = (105, 0.0)  # (written by now)
    book.renew("key:k")  # seeded again with nothing in flight: the ledger's figure, nothing counted twice
    with pytest.raises(BudgetExceeded):
        await book.check(scopes)
    assert await book.spent(pairs) == [(105, 0.0)]

    lost = [("key:j", [Budget("daily", max_tokens=100)])]
    ledger["key:j"] = (0, 0.0)
    flying = await book.reserve(lost, 30, 0.0)
    [bucket] = client.keys(prefix + "budget|key:j|*")
    client.delete(bucket)  # Redis restarted without its data
    ledger["key:j"] = (10, 0.0)
    await book.check(lost)  # seeded again: 10, nothing in flight there
    await book.settle(flying, 25, 0.0)
    await book._counters.written()
    assert await book.spent([("key:j", Budget("daily", max_tokens=100))]) == [(35, 0.0)]


class _CountingRedis(redis.Redis):
    """A Redis client counting the scripts it runs (by SHA1: L{script_sha})."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scripts = []

    def evalsha(self, sha, numkeys, *args):
        self.scripts.append(sha.encode() if isinstance(sha, str) else sha)
        return super().evalsha(sha, numkeys, *args)


@pytest_twisted.ensureDeferred
async def test_a_listing_of_many_budgets_seeds_their_shared_sums_in_one_redis_call(reactor, prefix):
    """A first listing of many keys' budgets (the admin API's, with what each spent) reads their figures from the
    ledger in one query, and sets their sums in Redis in one script run, each sum seeded again or not as its own
    state says. Before, one Redis call per budget: a thousand keys, a thousand round trips."""
    from gomodel.limits.counters import _SEED
    from tests.redis_server import script_sha

    client = _CountingRedis(host=HOST, port=PORT, socket_timeout=2)
    counters = RedisCounters(client, prefix, reactor)
    counters.start()
    try:
        clock = Clock()
        clock.rightNow = reactor.seconds()
        ledger = {f"key:k{i}": (10 * i, 0.5 * i) for i in range(8)}
        many = []
        book = BudgetBook(counters, clock, seed=lambda scope, since: ledger[scope],
                          seed_many=lambda rows: (many.append(len(rows)), [ledger[scope] for scope, _ in rows])[1])
        pairs = [(f"key:k{i}", Budget("daily", max_tokens=1000)) for i in range(8)]
        assert await book.spent(pairs) == [(10 * i, 0.5 * i) for i in range(8)]
        assert many == [8] and client.scripts.count(script_sha(_SEED)) == 1

        await book.reserve([("key:k1", [Budget("daily", max_tokens=1000)])], 5, 0.0)  # in flight on k1
        ledger["key:k1"], ledger["key:k2"], ledger["key:k3"] = (100, 1.0), (200, 2.0), (300, 3.0)
        book.renew("key:k1")  # budgets edited: seeded again, keeping what is in flight
        book.renew("key:k2")
        client.scripts.clear()
        assert (await book.spent(pairs))[:4] == [(0, 0.0), (105, 1.0), (200, 2.0), (30, 1.5)]  # k3: not again
        assert many == [8, 2] and client.scripts.count(script_sha(_SEED)) == 1
    finally:
        counters.stop()
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_reservation_in_flight_when_redis_loses_the_sum_is_not_given_back_from_the_new_one(
        reactor, make, client, prefix):
    """A request reserves 300 of 400; Redis loses the sum (a restart without persistence) and another process
    seeds it again from the ledger, which holds what ended (not the request in flight). The request ends using
    100: the new sum counts those 100, not 100 - 300 (-200: the budget would let 600 more tokens by in its
    period, not 300). A sum seeded once, and not lost, still gets the difference back; a sum lost and settled
    before anyone seeds it again becomes the larger of the ledger's figure and what it holds."""
    ledger = {"key:k": (0, 0.0)}
    clock = Clock()
    clock.rightNow = reactor.seconds()
    books = [BudgetBook(make(), clock, seed=lambda scope, since: ledger[scope]) for _ in range(2)]
    scopes = [("key:k", [Budget("daily", max_tokens=400, max_cost=4.0)])]
    pairs = [("key:k", Budget("daily", max_tokens=400, max_cost=4.0))]
    kept = await books[0].reserve(scopes, 20, 0.2)  # (one whose sum Redis keeps)
    await books[0].settle(kept, 10, 0.1)
    await books[0]._counters.written()
    assert await books[1].spent(pairs) == [(10, 0.1)]
    ledger["key:k"] = (10, 0.1)
    reservation = await books[0].reserve(scopes, 300, 3.0)
    assert await books[1].spent(pairs) == [(310, 3.1)]
    [bucket] = client.keys(prefix + "budget|*")
    client.delete(bucket)  # Redis restarted without its data
    await books[1].check(scopes)  # seeded again: the ledger's 10
    assert await books[1].spent(pairs) == [(10, 0.1)]
    await books[0].settle(reservation, 100, 1.0)
    await books[0]._counters.written()
    assert await books[1].spent(pairs) == [(110, 1.1)]
    lost = await books[0].reserve(scopes, 50, 0.5)  # lost, and settled before anyone seeds it again
    client.delete(bucket)
    await books[0].settle(lost, 50, 0.5)
    await books[0]._counters.written()
    ledger["key:k"] = (160, 1.6)
    assert await books[1].spent(pairs) == [(160, 1.6)]  # the larger of the ledger's and the sum's


@pytest_twisted.ensureDeferred
async def test_the_reservations_of_a_process_killed_with_requests_in_flight_lapse_with_its_lease(
        reactor, make, client, prefix):
    """A process killed (SIGKILL, a crash) never settles the budget reservations of its requests in flight: they
    stayed in the shared sum until its period's end (for a total budget, for ever), though the ledger has nothing
    of them. Now each process's part of a sum lapses with its liveness key (renewed while it holds reservations,
    as a concurrency lease), and the next read, reservation or seed of the sum takes it off; a live process's part
    stays, is kept by a seed, and settles. (Two gateways killed for real: tests/test_scaleout.py.)"""
    ledger = {"key:k": (0, 0.0)}
    clock = Clock()
    clock.rightNow = reactor.seconds()
    killed, living = make(lease_ttl=0.3), make(lease_ttl=0.3)  # (renewed every 0.1 s)
    books = [BudgetBook(counters, clock, seed=lambda scope, since: ledger[scope]) for counters in (killed, living)]
    scopes = [("key:k", [Budget("daily", max_tokens=400, max_cost=4.0)])]
    pairs = [("key:k", Budget("daily", max_tokens=400, max_cost=4.0))]
    await books[0].reserve(scopes, 150, 1.5)
    kept = await books[1].reserve(scopes, 250, 2.5)
    with pytest.raises(BudgetExceeded):
        await books[1].reserve(scopes, 10, 0.1)
    killed._renewal.stop()  # (its process killed: nothing renews it)
    await deferLater(reactor, 0.6, lambda: None)
    assert await books[1].spent(pairs) == [(250, 2.5)]  # the killed process's 150 taken off (a read, a check)
    late = await books[1].reserve(scopes, 10, 0.1)  # room
    assert await books[1].spent(pairs) == [(260, 2.6)]  # the living process's part kept (renewed)
    ledger["key:k"] = (20, 0.2)
    books[1].renew("key:k")  # seeded again: the ledger's figure plus the living process's part in flight
    assert await books[1].spent(pairs) == [(280, pytest.approx(2.8))]
    await books[1].settle(kept, 100, 1.0)
    await books[1].settle(late, 5, 0.05)
    await living.written()
    assert await books[1].spent(pairs) == [(125, pytest.approx(1.25))]
    assert [field for field in client.hkeys(client.keys(prefix + "budget|*")[0]) if b":" in field] == []


@pytest_twisted.ensureDeferred
async def test_a_process_paused_past_its_lease_settles_its_old_requests_apart_from_its_new_ones(
        reactor, make, client, prefix):
    """A process paused past its lease (SIGSTOP, a long GC, a VM pause) has its part of a sum taken off by the
    others. Resumed, it reserves for a new request, then settles an old one: before, that settlement gave back
    the new request's reservation (its part then held only that), so while the new request ran the sum lacked
    it (a budget passed by that much). Now a process's part of a sum has an id, new each time it starts afresh,
    and a settlement names the part it was reserved in: the old request is charged what it used in full, the new
    one's reservation stays counted, and each settles exactly. (The lapse: its liveness key deleted, not waited
    for.)"""
    ledger = {"key:k": (0, 0.0)}
    clock = Clock()
    clock.rightNow = reactor.seconds()
    paused, other = make(), make()
    books = [BudgetBook(counters, clock, seed=lambda scope, since: ledger[scope]) for counters in (paused, other)]
    scopes = [("key:k", [Budget("daily", max_tokens=1000, max_cost=10.0)])]
    pairs = [("key:k", Budget("daily", max_tokens=1000, max_cost=10.0))]
    old = await books[0].reserve(scopes, 300, 3.0)
    assert await books[1].spent(pairs) == [(300, 3.0)]
    client.delete(paused._alive + paused._owner)  # paused past its lease
    assert await books[1].spent(pairs) == [(0, 0.0)]  # its part taken off by the other process
    new = await books[0].reserve(scopes, 400, 4.0)  # resumed: a new request
    assert await books[1].spent(pairs) == [(400, 4.0)]
    await books[0].settle(old, 100, 1.0)  # the old request ends: charged what it used in full
    await paused.written()
    assert await books[1].spent(pairs) == [(500, 5.0)]  # the new request's 400 still counted
    await books[0].settle(new, 200, 2.0)
    await paused.written()
    assert await books[1].spent(pairs) == [(300, 3.0)]
    assert [field for field in client.hkeys(client.keys(prefix + "budget|*")[0]) if b":" in field] == []


@pytest_twisted.ensureDeferred
async def test_a_process_paused_past_its_lease_that_nobody_noticed_settles_from_its_part_kept(
        reactor, make, client, prefix):
    """As above, but no other process read the sum while the paused one's lease had lapsed: its part is still there
    when it reserves again, and both requests settle from it exactly, the old one not charged in full."""
    ledger = {"key:k": (0, 0.0)}
    clock = Clock()
    clock.rightNow = reactor.seconds()
    paused, other = make(), make()
    books = [BudgetBook(counters, clock, seed=lambda scope, since: ledger[scope]) for counters in (paused, other)]
    scopes = [("key:k", [Budget("daily", max_tokens=1000, max_cost=10.0)])]
    pairs = [("key:k", Budget("daily", max_tokens=1000, max_cost=10.0))]
    old = await books[0].reserve(scopes, 300, 3.0)
    client.delete(paused._alive + paused._owner)  # paused past its lease; nobody read the sum meanwhile
    new = await books[0].reserve(scopes, 400, 4.0)
    assert await books[1].spent(pairs) == [(700, 7.0)]
    await books[0].settle(old, 100, 1.0)
    await paused.written()
    assert await books[1].spent(pairs) == [(500, 5.0)]
    await books[0].settle(new, 200, 2.0)
    await paused.written()
    assert await books[1].spent(pairs) == [(300, 3.0)]
    assert [field for field in client.hkeys(client.keys(prefix + "budget|*")[0]) if b":" in field] == []


@pytest_twisted.ensureDeferred
async def test_during_a_rolling_upgrade_a_seed_keeps_what_older_gateways_have_in_flight(reactor, make, client, prefix):
    """Gateways older than the per-process parts keep their requests' reservations in one shared 'rt'/'rc' of the
    sum, and settle from it. Mixed with them during a rolling upgrade, a newer process that seeds a sum again (its
    budgets edited, charges missed while Redis could not be reached) counts those in flight too: before, the sum
    became the ledger's figure plus the newer processes' parts only, and each older request's settlement then
    took its reservation off a sum that no longer held it (300 lost until the period's end)."""
    ledger = {"key:k": (0, 0.0)}
    clock = Clock()
    clock.rightNow = reactor.seconds()
    books = [BudgetBook(make(), clock, seed=lambda scope, since: ledger[scope]) for _ in range(2)]
    scopes = [("key:k", [Budget("daily", max_tokens=10000, max_cost=100.0)])]
    pairs = [("key:k", Budget("daily", max_tokens=10000, max_cost=100.0))]
    new = await books[0].reserve(scopes, 200, 2.0)
    [bucket] = client.keys(prefix + "budget|*")

    def older(reserved_tokens, reserved_cost, tokens=None, cost=None):
        """An older gateway's reservation (tokens None), or its settlement, as its scripts wrote them."""
        if tokens is None:
            for field, value in (("t", reserved_tokens), ("rt", reserved_tokens)):
                client.hincrby(bucket, field, value)
            for field, value in (("c", reserved_cost), ("rc", reserved_cost)):
                client.hincrbyfloat(bucket, field, value)
            return
        rt, rc = (float(x or 0) for x in client.hmget(bucket, "rt", "rc"))
        gt, gc = min(rt, reserved_tokens), min(rc, reserved_cost)
        client.hincrby(bucket, "t", int(tokens - gt))
        client.hincrbyfloat(bucket, "c", cost - gc)
        client.hincrby(bucket, "rt", int(-gt))
        client.hincrbyfloat(bucket, "rc", -gc)

    older(300, 3.0)
    assert await books[1].spent(pairs) == [(500, 5.0)]
    ledger["key:k"] = (400, 4.0)  # (charges this process missed while Redis could not be reached)
    books[1].renew("key:k")  # seeded again: the ledger's figure, and what every gateway has in flight
    assert await books[1].spent(pairs) == [(900, pytest.approx(9.0))]
    older(300, 3.0, 100, 1.0)
    await books[0].settle(new, 200, 2.0)
    await books[0]._counters.written()
    assert await books[1].spent(pairs) == [(700, pytest.approx(7.0))]  # the ledger's 400, and 100 and 200 used


@pytest_twisted.ensureDeferred
async def test_a_reservation_redis_ran_but_did_not_answer_in_time_is_not_kept_while_the_process_lives(
        reactor, tmp_path):
    """A budget reservation sent to a Redis that stalled (paused, a fork, a network cut) past the client's timeout
    is answered open (judged by the ledger), but Redis may run it once it comes back: what it took stayed in the
    process's part of the sum, which the process's liveness kept while it had other requests in flight (a busy
    gateway: for as long as it lived), and which no settlement ever took off (the budget short by that much until
    its period's end). Now a process whose reservation or settlement Redis did not answer starts its parts anew:
    the old ones lapse with their liveness key, and the requests in flight then are charged what they used in
    full when they end."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path)
    stalled = RedisCounters(connect(server.url, timeout=0.5), "x:", reactor, retry_after=0.2, lease_ttl=0.6)
    other = RedisCounters(connect(server.url, timeout=2), "x:", reactor)
    stalled.start()
    other.start()
    try:
        clock = Clock()
        clock.rightNow = reactor.seconds()
        books = [BudgetBook(counters, clock, seed=lambda scope, since: (0, 0.0)) for counters in (stalled, other)]
        scopes = [("key:k", [Budget("daily", max_tokens=1000)])]
        pairs = [("key:k", Budget("daily", max_tokens=1000))]
        held = await books[0].reserve(scopes, 100, 0.0)  # a request in flight: its process's liveness is renewed
        server.pause()
        lost = await books[0].reserve(scopes, 300, 0.0)  # answered open; Redis runs it once it is back
        assert lost.tokens == 0
        server.resume()
        await deferLater(reactor, 0.3, lambda: None)  # (Redis is tried again after retry_after)
        assert await books[1].spent(pairs) == [(400, 0.0)]
        await deferLater(reactor, 1.0, lambda: None)  # (past the lease of the parts kept before)
        assert await books[1].spent(pairs) == [(0, 0.0)]
        await books[0].settle(held, 50, 0.0)  # charged what it used in full
        await stalled.written()
        assert await books[1].spent(pairs) == [(50, 0.0)]
    finally:
        stalled.stop()
        other.stop()
        stalled._redis.close()
        other._redis.close()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_a_window_stored_under_a_clock_ahead_is_not_drained_by_the_time_between(reactor, make, client, prefix):
    """A token bucket's level is stored with the Redis time it was taken at. A Redis whose clock is behind the one
    that wrote it (a failover to a replica whose clock lags, a clock stepped back) took the time between for
    negative refill: a bucket stored an hour ahead, 59 of 60 left, refused every request (and showed -3541) for the
    hour. The time between now counts as none: the level stored stands, and refills from now on."""
    counters = make()
    seconds, micros = client.time()
    ahead = seconds + 3600
    client.hset(prefix + "key:k|r60", mapping={"v": "59", "t": str(ahead), "k": "60"})
    taken = await counters.take("key:k|r60", 60, 1, 1)
    assert taken.allowed and taken.remaining == pytest.approx(58, abs=0.1)
    assert (await counters.peek([("key:k|r60", 60, 1)], []))[0][0] >= 58
    level = await counters.adjust("key:k|r60", 60, 1, -1)
    # (refilled since the take at one a second: by at most the Redis time since before it, however slow the host)
    now, now_micros = client.time()
    between = (now - seconds) + (now_micros - micros) / 1e6
    assert 59 - 0.001 <= level <= 59 + between + 0.001


@pytest_twisted.ensureDeferred
async def test_a_request_in_flight_when_redis_lost_the_sum_settles_apart_from_those_admitted_after(
        reactor, make, client, prefix):
    """Redis loses a sum (restarted empty, flushed) while a request is in flight; the sum is seeded again and the
    same process admits another request, which starts its part afresh. The first one ends: it is charged what it
    used in full, and the second one's reservation stays counted (before, the first took it off the new part:
    200, not 500, while the second ran)."""
    ledger = {"key:k": (0, 0.0)}
    clock = Clock()
    clock.rightNow = reactor.seconds()
    books = [BudgetBook(make(), clock, seed=lambda scope, since: ledger[scope]) for _ in range(2)]
    scopes = [("key:k", [Budget("daily", max_tokens=1000), Budget("hourly", max_tokens=1000)])]
    pairs = [("key:k", Budget("daily", max_tokens=1000)), ("key:k", Budget("hourly", max_tokens=1000))]
    old = await books[0].reserve(scopes, 300, 0.0)
    for bucket in client.keys(prefix + "budget|*"):
        client.delete(bucket)  # Redis restarted without its data
    assert await books[1].spent(pairs) == [(0, 0.0)] * 2  # (seeded again: the ledger's 0)
    new = await books[0].reserve(scopes, 400, 0.0)
    await books[0].settle(old, 100, 0.0)
    await books[0]._counters.written()
    assert await books[1].spent(pairs) == [(500, 0.0)] * 2
    await books[0].settle(new, 200, 0.0)
    await books[0]._counters.written()
    assert await books[1].spent(pairs) == [(300, 0.0)] * 2


def _snapshot(client, prefix) -> dict:
    """The keys under C{prefix} as an RDB snapshot holds them: C{{key: (DUMP, ms left or 0)}}."""
    return {key: (client.dump(key), max(0, client.pttl(key))) for key in client.keys(prefix + "*")}


def _restore(client, prefix, snapshot):
    """Redis restarted from C{snapshot} (L{_snapshot}): what was written since is gone."""
    for key in client.keys(prefix + "*"):
        client.delete(key)
    for key, (dumped, ttl) in snapshot.items():
        client.restore(key, ttl, dumped, replace=True)


def _restored_sum(client, prefix):
    """The one budget sum under C{prefix} as Redis holds it: its tokens, and whether it is still marked seeded (a
    process that has not noticed the restore reads those tokens as they are)."""
    [bucket] = client.keys(prefix + "budget|*")
    return int(client.hget(bucket, "t")), client.hget(bucket, "s") == client.get(prefix + "seeded")


@pytest_twisted.ensureDeferred
async def test_a_redis_restored_from_an_earlier_snapshot_has_its_budget_sums_seeded_again(
        reactor, make, client, prefix):
    """Redis restarted from a snapshot taken before some spending (an RDB a few minutes old) keeps its sums marked
    seeded, lower than what was spent: the budgets undercounted until their period's end (a key spent 400 of 1000
    and its sum said 100). A process's next settlement sees Redis went back (a counter of its own that each of its
    settlements counts up answers no more than it saw before): it seeds its sums again from the ledger at their next
    use, the larger of what they hold and the ledger's figure, and starts its parts of them anew."""
    ledger = {"key:k": (0, 0.0)}
    clock = Clock()
    clock.rightNow = reactor.seconds()
    books = [BudgetBook(make(), clock, seed=lambda scope, since: ledger[scope]) for _ in range(2)]
    scopes = [("key:k", [Budget("daily", max_tokens=1000)])]
    pairs = [("key:k", Budget("daily", max_tokens=1000))]

    async def request(book, tokens):
        await book.settle(await book.reserve(scopes, tokens, 0.0), tokens, 0.0)
        await book._counters.written()
        ledger["key:k"] = (ledger["key:k"][0] + tokens, 0.0)

    await request(books[0], 100)
    snapshot = _snapshot(client, prefix)
    await request(books[0], 300)
    assert await books[1].spent(pairs) == [(400, 0.0)]
    _restore(client, prefix, snapshot)
    assert await books[1].spent(pairs) == [(100, 0.0)]  # (what the snapshot held)
    await request(books[0], 10)  # its settlement sees Redis went back
    assert await books[0].spent(pairs) == [(410, 0.0)]
    assert await books[1].spent(pairs) == [(410, 0.0)]



@pytest_twisted.ensureDeferred
async def test_a_redis_restored_from_an_earlier_snapshot_is_noticed_by_every_process_without_a_settlement(
        reactor, make, client, prefix):
    """Only the process whose next settlement found Redis gone back seeded its sums again: another that had settled
    after the snapshot too, then nothing since, read the restored sums (short by what it had charged) until its own
    next settlement. Each process now also reads its count at each renewal (every C{lease_ttl/3} seconds): it notices
    without settling, seeds its sums again at their next use, and puts back the slots it holds that the snapshot
    lacks."""
    ledger = {"key:k": (0, 0.0)}
    clock = Clock()
    clock.rightNow = reactor.seconds()
    counters = [make(lease_ttl=0.6), make(lease_ttl=0.6)]
    books = [BudgetBook(each, clock, seed=lambda scope, since: ledger[scope]) for each in counters]
    scopes = [("key:k", [Budget("daily", max_tokens=1000)])]
    pairs = [("key:k", Budget("daily", max_tokens=1000))]
    noticed = Deferred()
    counters[1].went_back.append(lambda: noticed.called or noticed.callback(None))

    async def request(book, tokens):
        await book.settle(await book.reserve(scopes, tokens, 0.0), tokens, 0.0)
        await book._counters.written()
        ledger["key:k"] = (ledger["key:k"][0] + tokens, 0.0)

    await request(books[1], 100)
    snapshot = _snapshot(client, prefix)
    await request(books[1], 300)
    lease = await counters[1].acquire("slot", 1)  # (held across the restore, which lacks it)
    _restore(client, prefix, snapshot)
    # What the snapshot held, read as stored: a read through books[0] raced the renewal, which may notice first.
    assert _restored_sum(client, prefix) == (100, True)
    await noticed.addTimeout(10, reactor)  # (its renewal, every 0.2 s, reads its count: no settlement)
    assert await books[1].spent(pairs) == [(400, 0.0)]  # seeded again from the ledger
    assert await books[0].spent(pairs) == [(400, 0.0)]
    assert await counters[0].acquire("slot", 1) is None  # its slot is back
    await counters[1].release(lease)


@pytest_twisted.ensureDeferred
async def test_a_process_that_only_records_charges_notices_a_redis_restored_from_an_earlier_snapshot(
        reactor, make, client, prefix):
    """A process whose charges are all recorded after the fact (L{BudgetBook.record}: a batch's lines, no
    reservation) counted up no generation of its own, so it never noticed a restore, and what it charged after the
    snapshot stayed missing from the sums it seeded. Its charges count it up as settlements do: its renewal (or
    its next charge) notices."""
    ledger = {"key:k": (0, 0.0)}
    clock = Clock()
    clock.rightNow = reactor.seconds()
    counters = [make(lease_ttl=0.6), make(lease_ttl=0.6)]
    books = [BudgetBook(each, clock, seed=lambda scope, since: ledger[scope]) for each in counters]
    scopes = [("key:k", [Budget("daily", max_tokens=1000)])]
    pairs = [("key:k", Budget("daily", max_tokens=1000))]
    noticed = Deferred()
    counters[1].went_back.append(lambda: noticed.called or noticed.callback(None))

    async def record(tokens):
        await books[1].record(scopes, tokens, 0.0)
        await counters[1].written()
        ledger["key:k"] = (ledger["key:k"][0] + tokens, 0.0)

    await record(100)
    snapshot = _snapshot(client, prefix)
    await record(300)
    _restore(client, prefix, snapshot)
    assert _restored_sum(client, prefix) == (100, True)  # (what the snapshot held, as stored: see above)
    await noticed.addTimeout(10, reactor)
    assert await books[1].spent(pairs) == [(400, 0.0)]
    assert await books[0].spent(pairs) == [(400, 0.0)]


@pytest_twisted.ensureDeferred
async def test_a_restore_during_a_rolling_upgrade_keeps_what_older_gateways_have_in_flight(
        reactor, make, client, prefix):
    """A Redis restored from a snapshot while gateways older than the per-process parts still run (their requests'
    reservations in the sum's shared 'rt'): a newer process that notices seeds the sum again with them counted, and
    never lowers it, so an older request's settlement still finds its reservation there (the older gateways
    themselves never seed again for a restore: README's upgrade order)."""
    ledger = {"key:k": (0, 0.0)}
    clock = Clock()
    clock.rightNow = reactor.seconds()
    counters = make(lease_ttl=0.6)
    book = BudgetBook(counters, clock, seed=lambda scope, since: ledger[scope])
    scopes = [("key:k", [Budget("daily", max_tokens=10000)])]
    pairs = [("key:k", Budget("daily", max_tokens=10000))]
    noticed = Deferred()
    counters.went_back.append(lambda: noticed.called or noticed.callback(None))

    async def request(tokens):
        await book.settle(await book.reserve(scopes, tokens, 0.0), tokens, 0.0)
        await counters.written()
        ledger["key:k"] = (ledger["key:k"][0] + tokens, 0.0)

    await request(100)
    [bucket] = client.keys(prefix + "budget|*")
    client.hincrby(bucket, "t", 300)  # an older gateway's request in flight, as its script reserved it
    client.hincrby(bucket, "rt", 300)
    snapshot = _snapshot(client, prefix)
    await request(200)
    _restore(client, prefix, snapshot)
    await noticed.addTimeout(10, reactor)
    assert await book.spent(pairs) == [(600, 0.0)]  # the ledger's 300 and the older request's 300 in flight
    client.hincrby(bucket, "t", 50 - 300)  # its settlement, as the older gateway's script does it: 50 used
    client.hincrby(bucket, "rt", -300)
    assert await book.spent(pairs) == [(350, 0.0)]


@pytest_twisted.ensureDeferred
async def test_a_restore_one_process_notices_has_every_sum_seeded_again_those_only_a_stopped_one_charged_too(
        reactor, make, client, prefix):
    """A Redis restored in place from an earlier snapshot is noticed by a process that settled since (its count gone
    back), which seeded again only the sums it had seeded itself: a sum that only a process stopped since had
    charged after the snapshot stayed short by those charges, the ledger's figure never read again. The process that
    notices marks every sum anew: each is seeded again at its next use, whichever process uses it."""
    ledger = {"key:a": (0, 0.0), "key:b": (0, 0.0)}
    clock = Clock()
    clock.rightNow = reactor.seconds()
    counters = [make(), make()]
    books = [BudgetBook(each, clock, seed=lambda scope, since: ledger[scope]) for each in counters]

    async def request(book, scope, tokens):
        scopes = [(scope, [Budget("daily", max_tokens=1000)])]
        await book.settle(await book.reserve(scopes, tokens, 0.0), tokens, 0.0)
        await book._counters.written()
        ledger[scope] = (ledger[scope][0] + tokens, 0.0)

    await request(books[1], "key:b", 100)
    await request(books[0], "key:a", 100)
    snapshot = _snapshot(client, prefix)
    await request(books[1], "key:b", 300)
    counters[1].stop()  # (gone: its count is never read again)
    await request(books[0], "key:a", 10)
    _restore(client, prefix, snapshot)
    await request(books[0], "key:a", 10)  # its settlement notices Redis went back
    assert await books[0].spent([("key:b", Budget("daily", max_tokens=1000))]) == [(400, 0.0)]
    assert await books[0].spent([("key:a", Budget("daily", max_tokens=1000))]) == [(120, 0.0)]


@pytest_twisted.ensureDeferred
async def test_a_sum_marked_by_an_older_gateway_counts_as_seeded_until_redis_is_marked(reactor, make, client, prefix):
    """Sums an older gateway seeded carry the mark '1'; they stay seeded for newer ones until the sums are first
    marked anew (a connection to a server not yet named), and are then seeded again, never lowered."""
    clock = Clock()
    clock.rightNow = reactor.seconds()
    counters = make()
    book = BudgetBook(counters, clock, seed=lambda scope, since: (50, 0.0))
    pairs = [("key:k", Budget("daily", max_tokens=1000))]
    await book.spent(pairs)  # (its first connection names the server and gives the sums a mark)
    [bucket] = client.keys(prefix + "budget|*")
    assert client.hget(bucket, "s") == client.get(prefix + "seeded") != b"1"
    client.hset(bucket, mapping={"s": 1, "t": 70})
    client.delete(prefix + "seeded")  # (as before any newer gateway)
    book._seeded.clear()
    assert await book.spent(pairs) == [(70, 0.0)]
    client.set(prefix + "seeded", "new")
    assert await book.spent(pairs) == [(70, 0.0)]  # seeded again: the larger of 70 and the ledger's 50
    assert client.hget(bucket, "s") == b"new"
