"""Rate limits and budgets on the local counters, on a fake clock; GoModel's configuration forms."""

import itertools
import random
from datetime import datetime, timezone

import orjson
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gomodel import jsonutil
from gomodel.accounting.tokens import (_asked_count, asked_tokens, completion_sequences, completion_tokens,
                                      requested_tokens)
from gomodel.errors import BudgetExceeded, RateLimitExceeded, whole_seconds
from gomodel.limits.budgets import SEED_RETRY, BudgetBook
from gomodel.limits.counters import LocalCounters
from gomodel.limits.gate import estimate
from gomodel.limits.lanes import Lane
from gomodel.limits.limiter import NO_ADMISSION, Limiter, duration
from gomodel.limits.specs import (
    Budget, LimitsConfig, RateLimit, Window, env_path, limits_from_env, limits_from_yaml, normalize_user_path,
    parse_budgets, parse_rate_limit, period_window,
)

T0 = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC, a Thursday


def utc(*args) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


def fired(value):
    """The result of an already-fired Deferred or coroutine (raising what it failed with); None (done at once) as is."""
    if value is None:
        return None
    d = Deferred.fromCoroutine(value) if not isinstance(value, Deferred) else value
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


@pytest.fixture
def clock():
    c = Clock()
    c.advance(T0)
    return c


@pytest.fixture
def counters(clock):
    return LocalCounters(clock)


@pytest.fixture
def limiter(counters, clock):
    return Limiter(counters, clock)


def refused(limiter, scopes, tokens=0, headers_for=None) -> RateLimitExceeded:
    with pytest.raises(RateLimitExceeded) as info:
        fired(limiter.admit(scopes, tokens, headers_for=headers_for))
    return info.value


# --- rate limits -------------------------------------------------------------------------------------------


def test_rpm_refuses_past_the_limit_and_refills(limiter, clock):
    scopes = [("key:k_1", RateLimit(rpm=2))]
    fired(limiter.admit(scopes, 0))
    fired(limiter.admit(scopes, 0))
    error = refused(limiter, scopes)
    assert error.status == 429 and error.code == "rate_limit_exceeded" and error.type == "requests"
    assert error.scope == "key:k_1"
    assert error.headers["Retry-After"] == "30"  # 2 a minute: one more every 30 s
    assert "key:k_1" in error.message and "requests per min (RPM): Limit 2, Used 2" in error.message
    envelope = orjson.loads(error.body())["error"]
    assert envelope == {"message": error.message, "type": "requests", "param": None, "code": "rate_limit_exceeded"}
    clock.advance(29)
    refused(limiter, scopes)
    clock.advance(1)
    fired(limiter.admit(scopes, 0))
    refused(limiter, scopes)


def test_a_changed_limit_keeps_what_was_used_used(limiter, counters, clock):
    for _ in range(2):
        fired(limiter.admit([("key:k", RateLimit(rpm=2))], 0))
    refused(limiter, [("key:k", RateLimit(rpm=2))])
    admission = fired(limiter.admit([("key:k", RateLimit(rpm=10))], 0, headers_for="key:k"))  # raised: at once
    assert admission.headers["x-ratelimit-remaining-requests"] == "7"
    refused(limiter, [("key:k", RateLimit(rpm=3))])  # lowered below what was used
    clock.advance(20)  # a request back at 3 a minute
    fired(limiter.admit([("key:k", RateLimit(rpm=3))], 0))
    [bucket] = [name for name in counters._buckets]
    cell = counters.cell(bucket, 100.0, 100 / 60)  # a lane made for a limit of 100 sees it under 100
    assert cell[0] == 97 and cell[2] == 100


def test_tpm_refuses_a_request_that_does_not_fit_and_says_when_it_will(limiter, clock):
    scopes = [("key:k_1", RateLimit(tpm=600))]
    fired(limiter.admit(scopes, 500))
    error = refused(limiter, scopes, 200)
    assert error.type == "tokens"
    assert error.retry_after == pytest.approx(10.0)  # 100 missing at 10 tokens a second
    assert error.headers["Retry-After"] == "10"
    assert "tokens per min (TPM): Limit 600, Used 500, Requested 200" in error.message
    clock.advance(9.5)
    refused(limiter, scopes, 200)
    clock.advance(0.5)
    fired(limiter.admit(scopes, 200))


def test_a_request_larger_than_the_token_limit_is_refused_without_retry_after(limiter):
    error = refused(limiter, [("key:k_1", RateLimit(tpm=100))], 101)
    assert error.type == "tokens" and "Retry-After" not in error.headers
    assert error.message.startswith("Request too large for key:k_1")
    # Nothing was taken: a request that fits still passes whole.
    fired(limiter.admit([("key:k_1", RateLimit(tpm=100))], 100))


def test_hourly_daily_and_custom_windows(limiter, clock):
    limit = parse_rate_limit('[{"period": "hour", "max_requests": 2}, {"period_seconds": 10, "max_requests": 1}]')
    assert limit.rph == 2 and limit.custom == (Window(10, 1, None),)
    scopes = [("path:/a", limit)]
    fired(limiter.admit(scopes, 0))
    assert refused(limiter, scopes).headers["Retry-After"] == "10"
    clock.advance(10)
    fired(limiter.admit(scopes, 0))
    error = refused(limiter, scopes)  # the hour's 2 are spent: one comes back each 30 min
    assert "requests per hour (RPH): Limit 2" in error.message and error.headers["Retry-After"] == str(1800 - 10)


def test_concurrency_slots_are_taken_and_released(limiter):
    scopes = [("key:k_1", RateLimit(concurrent=1))]
    first = fired(limiter.admit(scopes, 0))
    error = refused(limiter, scopes)
    assert error.headers["Retry-After"] == "1" and "concurrent requests: Limit 1" in error.message
    assert error.type == "requests"
    fired(first.release())
    fired(first.release())  # idempotent: frees nothing more
    second = fired(limiter.admit(scopes, 0))
    refused(limiter, scopes)
    fired(second.release())


def test_all_or_nothing_across_scopes(limiter, counters):
    key, provider = ("key:k_1", RateLimit(rpm=10, tpm=1000)), ("provider:vllm", RateLimit(rpm=1))
    fired(limiter.admit([key, provider], 100))
    error = refused(limiter, [key, provider], 100)
    assert error.scope == "provider:vllm"
    # The key's buckets were not touched by the refused request.
    assert counters.level("key:k_1|r60")[0] == 9
    assert counters.level("key:k_1|t60")[0] == 900


def test_a_concurrency_refusal_gives_back_what_other_scopes_gave(limiter, counters):
    key, provider = ("key:k_1", RateLimit(rpm=10, tpm=1000)), ("provider:vllm", RateLimit(concurrent=1))
    held = fired(limiter.admit([key, provider], 100))
    error = refused(limiter, [key, provider], 100)
    assert error.scope == "provider:vllm"
    assert counters.level("key:k_1|r60")[0] == 9
    assert counters.level("key:k_1|t60")[0] == 900
    fired(held.release())
    fired(limiter.admit([key, provider], 100)).release()


def test_settle_gives_back_or_takes_the_difference(limiter, counters, clock):
    scopes = [("key:k_1", RateLimit(tpm=600))]
    admission = fired(limiter.admit(scopes, 500))
    assert counters.level("key:k_1|t60")[0] == 100
    fired(admission.settle(50))  # the answer used less than reserved
    assert counters.level("key:k_1|t60")[0] == 550
    fired(admission.settle(600))  # once only
    assert counters.level("key:k_1|t60")[0] == 550
    admission = fired(limiter.admit(scopes, 100))
    fired(admission.settle(1050))  # more than reserved: a debt
    assert counters.level("key:k_1|t60")[0] == pytest.approx(-500)
    error = refused(limiter, scopes, 0)
    assert error.retry_after == pytest.approx(50.0)  # back to 0 at 10 tokens a second
    clock.advance(50)
    fired(limiter.admit(scopes, 0))
    clock.advance(1)
    admission = fired(limiter.admit(scopes, 10))
    assert counters.level("key:k_1|t60")[0] == pytest.approx(0)
    fired(admission.settle(0))  # never reached the upstream: all given back
    assert counters.level("key:k_1|t60")[0] == pytest.approx(10)


def test_finish_settles_and_releases_at_once(limiter, counters):
    scopes = [("key:k_1", RateLimit(tpm=600, concurrent=1))]
    admission = fired(limiter.admit(scopes, 500))
    refused(limiter, scopes)
    fired(admission.finish(100))
    assert counters.level("key:k_1|t60")[0] == 500
    fired(admission.finish(600))
    fired(admission.settle(600))
    fired(admission.release())
    assert counters.level("key:k_1|t60")[0] == 500
    again = fired(limiter.admit(scopes, 0))
    fired(again.release())
    fired(again.settle(100))  # settled after the release: still charged
    assert counters.level("key:k_1|t60")[0] == 400


def test_headers_show_the_key_scope_in_openai_form(limiter, clock):
    key = ("key:k_1", RateLimit(rpm=60, tpm=6000))
    provider = ("provider:vllm", RateLimit(rpm=1000, tpm=10))
    admission = fired(limiter.admit([key, ("path:/team", RateLimit(rpm=5))], 1000, headers_for="key:k_1"))
    assert admission.headers == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-tokens": "5000",
        "x-ratelimit-reset-tokens": "10s",
    }
    clock.advance(0.25)
    admission = fired(limiter.admit([key], 1, headers_for="key:k_1"))
    assert admission.headers["x-ratelimit-reset-requests"] == "1.75s"
    assert admission.headers["x-ratelimit-remaining-tokens"] == "5024"
    # A refusal carries them too, with what was left.
    error = refused(limiter, [key, provider], 100, headers_for="key:k_1")
    assert error.headers["x-ratelimit-remaining-requests"] == "58"
    assert "Retry-After" not in error.headers  # too large for the provider's 10 tpm
    # No headers_for, or a scope without limits: none.
    assert fired(limiter.admit([key], 1)).headers == {}
    assert fired(limiter.admit([], 1)) is NO_ADMISSION and NO_ADMISSION.headers == {}


def test_a_reset_under_a_second_is_written_in_milliseconds(limiter):
    # 6,000 a minute refill one request in 10 ms; 60,000 tokens a minute refill 12 in 12 ms
    scope = ("key:k_ms", RateLimit(rpm=6000, tpm=60000))
    headers = fired(limiter.admit([scope], 12, headers_for="key:k_ms")).headers
    assert headers["x-ratelimit-reset-requests"] == "10ms"
    assert headers["x-ratelimit-reset-tokens"] == "12ms"
    assert fired(limiter.admit([scope], 988, headers_for="key:k_ms")).headers["x-ratelimit-reset-tokens"] == "1s"


def test_headers_pick_the_fewest_remaining_window():
    clock = Clock()
    limiter = Limiter(LocalCounters(clock), clock)
    admission = fired(limiter.admit([("key:k", RateLimit(rpm=100, rpd=3))], 0, headers_for="key:k"))
    assert admission.headers["x-ratelimit-limit-requests"] == "3"
    assert admission.headers["x-ratelimit-remaining-requests"] == "2"
    assert admission.headers["x-ratelimit-reset-requests"] == "8h0m0s"


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"), (-1, "0s"), (0.0004, "1ms"), (0.02, "20ms"), (0.999, "999ms"), (1, "1s"), (1.5, "1.5s"),
    (8.64, "8.64s"), (60, "1m0s"), (360, "6m0s"), (179.56, "2m59.56s"), (3600, "1h0m0s"), (3612.5, "1h0m12.5s"),
])
def test_duration_is_openais_format(seconds, text):
    assert duration(seconds) == text


@pytest.mark.parametrize("seconds,whole", [(0, 1), (0.2, 1), (1, 1), (1.01, 2), (29.999, 30), (30, 30)])
def test_retry_after_is_whole_seconds_at_least_one(seconds, whole):
    assert whole_seconds(seconds) == whole


def test_saturated_is_this_process_view(limiter, clock):
    provider = RateLimit(rpm=1)
    assert not limiter.saturated("provider:vllm", provider)
    fired(limiter.admit([("provider:vllm", provider)], 0))
    assert limiter.saturated("provider:vllm", provider)
    clock.advance(60)
    assert not limiter.saturated("provider:vllm", provider)
    model = RateLimit(concurrent=2, tpm=100)
    a = fired(limiter.admit([("model:vllm/x", model)], 10))
    b = fired(limiter.admit([("model:vllm/x", model)], 10))
    assert limiter.saturated("model:vllm/x", model)
    fired(a.release())
    assert not limiter.saturated("model:vllm/x", model)  # one slot of two is held
    c = fired(limiter.admit([("model:vllm/x", model)], 10))
    refused(limiter, [("model:vllm/x", model)])
    fired(c.release())
    assert limiter.saturated("model:vllm/x", model)  # one slot is free, but it saw them all taken
    clock.advance(1)
    assert not limiter.saturated("model:vllm/x", model)
    fired(b.settle(200))  # the answer took more tokens than reserved: a debt
    assert limiter.saturated("model:vllm/x", model)
    fired(b.release())
    clock.advance(70)  # about -118 tokens when settled: back above zero 71 s later
    assert limiter.saturated("model:vllm/x", model)
    clock.advance(1.1)
    assert not limiter.saturated("model:vllm/x", model)
    assert not limiter.saturated("provider:other", RateLimit())


def test_a_changed_limit_takes_effect_on_the_same_buckets(limiter, clock):
    fired(limiter.admit([("key:k", RateLimit(rpm=1))], 0))
    refused(limiter, [("key:k", RateLimit(rpm=1))])
    clock.advance(20)
    refused(limiter, [("key:k", RateLimit(rpm=1))])
    # Raised: the bucket keeps its level and refills at the new rate (3 a minute: one per 20 s).
    fired(limiter.admit([("key:k", RateLimit(rpm=3))], 0))


def test_local_counters_sweep_full_buckets_and_ended_sums(clock):
    counters = LocalCounters(clock, sweep_every=2)
    fired(counters.take("a", 10, 1, 5))
    fired(counters.spend("s", 1, 0.5, T0 + 10))
    assert counters.level("a") is not None
    clock.advance(11)
    fired(counters.take("b", 10, 1, 0))
    fired(counters.spend("s2", 1, 0.5, None))  # the fourth operation sweeps
    assert counters.level("a") is None and counters._sums.keys() == {"s2"}
    assert fired(counters.spent("s")) == (0, 0.0)


def test_errors_render_in_both_dialects(limiter):
    from twisted.web.test.requesthelper import DummyRequest
    from zope.interface.verify import verifyObject

    from gomodel.http import render
    from gomodel.limits.counters import ICounters

    assert verifyObject(ICounters, limiter.counters)
    error = refused(limiter, [("key:k", RateLimit(tpm=1))], 2, headers_for="key:k")
    request = DummyRequest([b""])
    body = orjson.loads(render.render(request, error))
    assert request.responseCode == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert request.responseHeaders.getRawHeaders(b"x-ratelimit-limit-tokens") == [b"1"]
    assert orjson.loads(render.ANTHROPIC.body(error))["error"]["type"] == "rate_limit_error"
    budget = BudgetExceeded("path:/t", "daily", "cost", 2.5, 10.2)
    request = DummyRequest([b""])
    assert orjson.loads(render.render(request, budget))["error"] == {
        "message": "budget exceeded for path:/t: daily cost limit of 2.5 reached", "type": "rate_limit_error",
        "param": None, "code": "budget_exceeded"}
    assert request.responseHeaders.getRawHeaders(b"retry-after") == [b"11"]


def test_single_bucket_forms(counters):
    got = fired(counters.take("x", 2, 1, 2))
    assert got.allowed and got.remaining == 0 and got.reset_after == 2 and got.retry_after == 0
    got = fired(counters.take("x", 2, 1, 1))
    assert not got.allowed and got.retry_after == 1
    assert fired(counters.adjust("x", 2, 1, -5)) == 2  # never above the capacity
    lease = fired(counters.acquire("c", 1))
    assert lease and fired(counters.acquire("c", 1)) is None
    fired(counters.release(lease))
    fired(counters.release(None))
    assert fired(counters.acquire("c", 1))


# --- budgets -----------------------------------------------------------------------------------------------


def test_period_windows_are_utc_calendar():
    now = utc(2026, 3, 18, 13, 45, 10)  # a Wednesday
    assert period_window("hourly", now) == (utc(2026, 3, 18, 13), utc(2026, 3, 18, 14))
    assert period_window("daily", now) == (utc(2026, 3, 18), utc(2026, 3, 19))
    assert period_window("weekly", now) == (utc(2026, 3, 16), utc(2026, 3, 23))  # Monday to Monday
    assert period_window("monthly", now) == (utc(2026, 3, 1), utc(2026, 4, 1))
    assert period_window("monthly", utc(2028, 2, 29, 23)) == (utc(2028, 2, 1), utc(2028, 3, 1))
    assert period_window("monthly", utc(2026, 12, 31, 23)) == (utc(2026, 12, 1), utc(2027, 1, 1))
    assert period_window("weekly", utc(2026, 3, 22, 23, 59)) == (utc(2026, 3, 16), utc(2026, 3, 23))
    assert period_window("total", now) == (0.0, None)
    assert period_window("7200s", utc(2026, 3, 18, 13)) == (utc(2026, 3, 18, 12), utc(2026, 3, 18, 14))


def test_a_token_budget_refuses_until_its_day_ends(counters, clock):
    clock.rightNow = utc(2026, 3, 18, 22, 0)
    book = BudgetBook(counters, clock)
    scopes = [("key:k_1", [Budget("daily", max_tokens=1000)])]
    fired(book.check(scopes))
    fired(book.record(scopes, 600, None))
    fired(book.check(scopes))
    fired(book.record(scopes, 400, 0.01))
    with pytest.raises(BudgetExceeded) as info:
        fired(book.check(scopes))
    error = info.value
    assert error.status == 429 and error.code == "budget_exceeded" and error.type == "rate_limit_error"
    assert error.headers["Retry-After"] == "7200"
    assert error.message == "budget exceeded for key:k_1: daily token limit of 1000 reached"
    clock.advance(7199)
    with pytest.raises(BudgetExceeded):
        fired(book.check(scopes))
    clock.advance(1)  # midnight UTC: a new day, a new sum
    fired(book.check(scopes))


@pytest.mark.parametrize("period,before,after", [
    ("hourly", (2026, 3, 18, 13, 59, 30), (2026, 3, 18, 14)),
    ("daily", (2026, 3, 18, 23, 59, 30), (2026, 3, 19)),
    ("weekly", (2026, 3, 22, 23, 59, 30), (2026, 3, 23)),  # Sunday night to Monday
    ("monthly", (2026, 2, 28, 23, 59, 30), (2026, 3, 1)),
])
def test_a_cost_budget_across_its_period_boundary(counters, clock, period, before, after):
    clock.rightNow = utc(*before)
    book = BudgetBook(counters, clock)
    scopes = [("path:/team", [Budget(period, max_cost=1.0)])]
    fired(book.record(scopes, 10, 0.6))
    fired(book.check(scopes))
    fired(book.record(scopes, 10, 0.4))
    with pytest.raises(BudgetExceeded) as info:
        fired(book.check(scopes))
    assert info.value.headers["Retry-After"] == "30"
    assert f"{period} cost limit of 1 reached" in info.value.message
    clock.rightNow = utc(*after)
    fired(book.check(scopes))
    fired(book.record(scopes, 10, 0.9))
    fired(book.check(scopes))


def test_unpriced_requests_count_no_cost(counters, clock):
    book = BudgetBook(counters, clock)
    scopes = [("key:k", [Budget("daily", max_cost=0.5)])]
    for _ in range(3):
        fired(book.record(scopes, 10_000, None))
    fired(book.check(scopes))


def test_a_total_budget_never_resets_and_has_no_retry_after(counters, clock):
    book = BudgetBook(counters, clock)
    scopes = [("key:k", [Budget("total", max_tokens=10), Budget("daily", max_tokens=5)])]
    fired(book.record(scopes, 10, 0))
    with pytest.raises(BudgetExceeded) as info:
        fired(book.check(scopes))
    assert info.value.period == "total" and "Retry-After" not in info.value.headers
    clock.advance(400 * 86400)
    with pytest.raises(BudgetExceeded):
        fired(book.check(scopes))


def test_the_budget_that_ends_last_is_named(counters, clock):
    clock.rightNow = utc(2026, 3, 18, 12)
    book = BudgetBook(counters, clock)
    scopes = [("key:k", [Budget("hourly", max_tokens=5)]), ("path:/team", [Budget("weekly", max_tokens=5)])]
    fired(book.record(scopes, 5, 0))
    with pytest.raises(BudgetExceeded) as info:
        fired(book.check(scopes))
    assert info.value.scope == "path:/team"
    assert info.value.headers["Retry-After"] == str(int(utc(2026, 3, 23) - utc(2026, 3, 18, 12)))


def test_every_scope_of_a_request_is_charged(counters, clock):
    book = BudgetBook(counters, clock)
    fired(book.record([("key:a", [Budget("daily", max_tokens=100)]), ("path:/t", [Budget("daily", max_cost=1)])],
                      60, 0.25))
    fired(book.record([("key:b", [Budget("daily", max_tokens=100)]), ("path:/t", [Budget("daily", max_cost=1)])],
                      60, 0.75))
    fired(book.check([("key:a", [Budget("daily", max_tokens=100)])]))
    with pytest.raises(BudgetExceeded) as info:
        fired(book.check([("key:a", [Budget("daily", max_tokens=100)]), ("path:/t", [Budget("daily", max_cost=1)])]))
    assert info.value.scope == "path:/t"


def test_a_reset_stamped_by_a_clock_a_little_ahead_takes_effect_at_once(counters, clock):
    """A budget reset's time comes from another clock (the store's, or the process that reset a key's budgets):
    one a little ahead of this process's still starts a new sum at once, and the sum from before stays behind
    (before: the scopes' periods were worked out with the old sum, kept until the period's end, and the reset
    was lost here for the rest of the day)."""
    clock.rightNow = utc(2026, 3, 18, 12)
    book = BudgetBook(counters, clock)
    fired(book.record([("key:k", [Budget("daily", max_tokens=10)])], 10, 0))
    with pytest.raises(BudgetExceeded):
        fired(book.check([("key:k", [Budget("daily", max_tokens=10)])]))
    reset = [("key:k", [Budget("daily", max_tokens=10, since=clock.seconds() + 0.05)])]
    fired(book.check(reset))
    clock.advance(1)
    fired(book.check(reset))
    fired(book.record(reset, 9, 0))
    fired(book.check(reset))
    fired(book.record(reset, 1, 0))
    with pytest.raises(BudgetExceeded):
        fired(book.check(reset))
    # A reset stamped in the next period is no reset of this one.
    ahead = [("key:k", [Budget("daily", max_tokens=10, since=utc(2026, 3, 19, 0, 0, 1))])]
    with pytest.raises(BudgetExceeded):
        fired(book.check(ahead))


def test_a_budget_given_again_counts_from_the_ledger_what_was_spent_while_it_was_gone(counters, clock):
    """A scope's budget removed and given again (L{BudgetBook.renew}) is seeded again: its sum, which counted
    nothing meanwhile, becomes what the ledger holds (the requests charged before included once)."""
    clock.rightNow = utc(2026, 3, 18, 12)
    ledger = {"tokens": 0}
    book = BudgetBook(counters, clock, seed=lambda scope, since: (ledger["tokens"], 0.0), seed_counts_kept=True)
    scopes = [("key:k", [Budget("daily", max_tokens=100)])]
    fired(book.check(scopes))
    fired(book.record(scopes, 40, None))
    ledger["tokens"] += 40
    book.renew("key:k")  # removed: the key's next requests charge no sum of its
    ledger["tokens"] += 50
    book.renew("key:k")  # given again, as it was
    again = [("key:k", [Budget("daily", max_tokens=100)])]
    fired(book.check(again))
    assert book.current_now(again).cells[0][:2] == [90, 0.0]  # (not 40, nor 130)
    fired(book.record(again, 10, None))
    with pytest.raises(BudgetExceeded):
        fired(book.check(again))


def test_a_ledger_that_cannot_be_read_is_asked_again_only_after_a_while_and_said_once(counters, clock):
    """While the store is down a seed's read fails fast or waits for a connection: it is not tried on every
    request (each would wait), and it is logged once, not per request."""
    from twisted.logger import Logger, LogLevel

    from gomodel.errors import StorageUnavailable

    clock.rightNow = utc(2026, 3, 18, 12)
    calls, events, ledger = [], [], {"down": True}

    def seed(scope, since):
        calls.append(scope)
        if ledger["down"]:
            raise StorageUnavailable("The gateway's storage is unavailable (database is down).")
        return 150, 0.0

    book = BudgetBook(counters, clock, seed=seed)
    book.log = Logger(observer=events.append)
    scopes = [("key:k", [Budget("daily", max_tokens=100)])]
    for _ in range(5):
        fired(book.check(scopes))  # counted from what the sum holds meanwhile
        fired(book.record(scopes, 10, None))
    assert calls == ["key:k"] and [e["log_level"] for e in events] == [LogLevel.warn]
    assert "database is down" in events[0]["error"] and "Error" not in events[0]["error"]
    clock.advance(SEED_RETRY)
    ledger["down"] = False
    with pytest.raises(BudgetExceeded):  # read now: 150 of 100
        fired(book.check(scopes))
    assert calls == ["key:k", "key:k"] and [e["log_level"] for e in events] == [LogLevel.warn, LogLevel.info]


def test_a_single_process_keeps_nothing_of_its_ended_periods(counters, clock):
    """One process on its own counters (no other process to follow: SQLite without C{--workers}) keeps what it
    seeded of each period only while that period lasts (before, one entry a scope and period for good: an hourly
    budget per key grew the process by each key's 24 a day, for as long as it ran)."""
    book = BudgetBook(counters, clock, seed=lambda scope, since: (0, 0.0))
    keys = [[(f"key:k_{i}", [Budget("hourly", max_tokens=100)])] for i in range(10)]
    for _ in range(24 * 30):  # a month of hours, each key's budget seeded in each
        for scopes in keys:
            fired(book.check(scopes))
        clock.advance(3600)
    assert len(book._own) <= 4097  # (7,200 before)


def test_seeding_resumes_from_the_ledger_once_per_scope_and_period(counters, clock):
    clock.rightNow = utc(2026, 3, 18, 12)
    calls = []

    async def seed(scope, since):
        calls.append((scope, since))
        return (90, 0.0) if scope == "key:k" else (0, 0.0)

    book = BudgetBook(counters, clock, seed=seed)
    scopes = [("key:k", [Budget("daily", max_tokens=100)]), ("path:/t", [Budget("monthly", max_tokens=1000)])]
    fired(book.check(scopes))
    assert calls == [("key:k", utc(2026, 3, 18)), ("path:/t", utc(2026, 3, 1))]
    fired(book.record(scopes, 10, None))
    with pytest.raises(BudgetExceeded):
        fired(book.check(scopes))
    assert len(calls) == 2
    clock.rightNow = utc(2026, 3, 19, 0, 0, 1)
    fired(book.check(scopes))  # a new day: the ledger is read again for it, not for the month
    assert calls[2:] == [("key:k", utc(2026, 3, 19))]  # (shared counters: tests/test_limits_redis.py)


def test_a_seed_that_counts_kept_requests_is_left_those_recorded_before_it(counters, clock):
    clock.rightNow = utc(2026, 3, 18, 12)
    kept = []  # the usage ledger: what it wrote and holds

    async def seed(scope, since):
        return sum(kept), 0.0

    book = BudgetBook(counters, clock, seed=seed, seed_counts_kept=True)
    daily, monthly = Budget("daily", max_tokens=100), Budget("monthly", max_tokens=100)
    fired(book.check([("key:k", [daily])]))  # the day is seeded: nothing kept yet
    kept.append(60)
    assert book.record([("key:k", [daily, monthly])], 60, None) is None  # the month is left to its seed
    assert fired(book.spent([("key:k", daily), ("key:k", monthly)])) == [(60, 0.0), (60, 0.0)]
    kept.append(50)
    fired(book.record([("key:k", [daily, monthly])], 50, None))  # both seeded now: both charged
    assert fired(book.spent([("key:k", daily), ("key:k", monthly)])) == [(110, 0.0), (110, 0.0)]


def test_a_failing_seed_is_retried_and_a_pending_one_is_waited_for(counters, clock, logged_errors):
    pending = []

    def seed(scope, since):
        d = Deferred()
        pending.append(d)
        return d

    book = BudgetBook(counters, clock, seed=seed)
    scopes = [("key:k", [Budget("daily", max_tokens=100)])]
    first = book.check(scopes)
    second = book.check(scopes)
    assert len(pending) == 1 and not first.called and not second.called
    pending[0].errback(RuntimeError("ledger down"))
    assert first.called and second.called
    fired(book.check(scopes))  # not read again at once...
    assert len(pending) == 1
    clock.advance(SEED_RETRY)
    third = book.check(scopes)  # ...but after a while
    assert len(pending) == 2
    pending[1].callback((100, 0.0))
    with pytest.raises(BudgetExceeded):
        fired(third)
    with pytest.raises(BudgetExceeded):
        fired(book.check(scopes))
    assert len(pending) == 2


# --- configuration -----------------------------------------------------------------------------------------


def test_compact_rate_limits():
    assert parse_rate_limit("rpm=100,tpm=50000,concurrent=10") == RateLimit(rpm=100, tpm=50000, concurrent=10)
    assert parse_rate_limit(" rpd=5; tph:7\nconcurrency=2 ") == RateLimit(rpd=5, tph=7, concurrent=2)
    assert parse_rate_limit("rph=1,tpd=2") == RateLimit(rph=1, tpd=2)


@pytest.mark.parametrize("text,message", [
    ("", "needs at least one"),
    ("rpm", "must use name=value"),
    ("rps=3", "must be one of rpm, tpm, rph, tph, rpd, tpd, concurrent"),
    ("rpm=ten", "not a valid integer"),
    ("rpm=0", r"from 1 to 9007199254740991, not 0"),
    ("tpm=9007199254740992", r"from 1 to 9007199254740991"),  # past what a bucket's float level holds exactly
    ("rpm=1,rpm=2", "given twice"),
    ('[{"period": "week", "max_requests": 1}]', "period must be one of minute, hour, day, concurrent"),
    ('[{"period": "concurrent", "max_tokens": 1}]', "max_tokens is not valid for the concurrent period"),
    ('[{"period": "minute"}]', "requires max_requests or max_tokens"),
    ('[{"period": "minute", "max_requests": 1}, {"period_seconds": 60, "max_tokens": 1}]', "two rules"),
    ('[{"period": "minute", "max_requests": 1, "per_child": true}]', "per_child"),
    ("[nope", "does not parse"),
])
def test_bad_rate_limits_say_why(text, message):
    with pytest.raises(ValueError, match=message):
        parse_rate_limit(text)


def test_budgets_in_gomodels_forms():
    assert parse_budgets("daily=10,monthly=200") == (Budget("daily", max_cost=10), Budget("monthly", max_cost=200))
    assert parse_budgets('{"weekly": 50, "daily": 12.5}') == (Budget("daily", max_cost=12.5),
                                                             Budget("weekly", max_cost=50))
    assert parse_budgets('[{"period": "hour", "amount": 1}, {"period_seconds": 7200, "max_tokens": 9},'
                         ' {"period": "total", "max_tokens": 5, "max_cost": 2}]') == (
        Budget("hourly", max_cost=1), Budget("7200s", max_tokens=9), Budget("total", max_tokens=5, max_cost=2))
    assert parse_budgets('[{"period_seconds": 86400, "amount": 3}]') == (Budget("daily", max_cost=3),)


@pytest.mark.parametrize("text,message", [
    ("daily", "must use period=amount"),
    ("daily=NaN", "finite number greater than 0"),
    ("daily=ten", "not a valid number"),
    ("daily=-1", "greater than 0"),
    ("yearly=1", "must be one of hourly, daily, weekly, monthly, total"),
    ("daily=1,day=2", "two budgets for the daily period"),
    ('[{"period": "daily"}]', "needs max_tokens or max_cost"),
    ('[{"period": "daily", "amount": 1, "max_cost": 1}]', "the same setting"),
])
def test_bad_budgets_say_why(text, message):
    with pytest.raises(ValueError, match=message):
        parse_budgets(text)


def test_environment_uses_gomodels_names():
    config = limits_from_env({
        "SET_RATE_LIMIT_TEAM__ALPHA": "rpm=100,tpm=50000,rpd=10000,concurrent=10",
        "SET_RATE_LIMIT_": "rpm=1000",
        "SET_RATE_LIMIT_USER_123": "rpm=1",
        "SET_PROVIDER_RATE_LIMIT_OPENAI_EAST": "rpm=500,concurrent=50",
        "SET_BUDGET_TEAM__ALPHA__SERVICE": "daily=10,weekly=50",
        "SET_BUDGET_": "monthly=500",
        "SET_BUDGET_EMPTY": "",
        "PATH": "/usr/bin",
    })
    assert config.user_paths == {
        "/team/alpha": RateLimit(rpm=100, tpm=50000, rpd=10000, concurrent=10),
        "/": RateLimit(rpm=1000), "/user_123": RateLimit(rpm=1)}
    assert config.providers == {"openai-east": RateLimit(rpm=500, concurrent=50)}
    assert config.budgets == {"/team/alpha/service": (Budget("daily", max_cost=10), Budget("weekly", max_cost=50)),
                              "/": (Budget("monthly", max_cost=500),)}
    assert config.rate_limits_enabled and config.budgets_enabled
    assert env_path("TEAM__ALPHA") == "/team/alpha" and env_path("") == "/"


def test_environment_errors_name_the_variable():
    with pytest.raises(ValueError, match="SET_RATE_LIMIT_TEAM: rate limit name 'rps'"):
        limits_from_env({"SET_RATE_LIMIT_TEAM": "rps=1"})
    with pytest.raises(ValueError, match="SET_BUDGET_TEAM: budget amount 'x'"):
        limits_from_env({"SET_BUDGET_TEAM": "daily=x"})
    with pytest.raises(ValueError, match="RATE_LIMITS_ENABLED: invalid value 'maybe': must be true or false"):
        limits_from_env({"RATE_LIMITS_ENABLED": "maybe"})
    # A disabled feature's variables are not read (GoModel's rule).
    off = limits_from_env({"RATE_LIMITS_ENABLED": "false", "SET_RATE_LIMIT_TEAM": "rps=1"})
    assert not off.rate_limits_enabled and off.user_paths == {}


YAML = """
rate_limits:
  enabled: true
  user_paths:
    - path: "/team/alpha"
      limits:
        - period: "minute"
          max_requests: 100
          max_tokens: 50000
        - period: "day"
          max_requests: 10000
        - period: "concurrent"
          max_requests: 10
  providers:
    - name: "OpenAI"
      limits:
        - period: "minute"
          max_requests: 500
        - period: "concurrent"
          max_requests: 50
  models:
    - model: "openai/gpt-4o"
      limits:
        - period: "minute"
          max_tokens: 90000
    - model: "gpt-4o-mini"
      limits:
        - period_seconds: 300
          max_requests: 50
budgets:
  enabled: true
  user_paths:
    - path: "/team/alpha"
      limits:
        - period: "daily"
          amount: 10.00
        - period: "weekly"
          amount: 50.00
    - path: "/"
      limits:
        - period: "monthly"
          amount: 500.00
        - period: "total"
          max_tokens: 100000000
"""


def test_yaml_uses_gomodels_shapes_and_the_environment_replaces_by_subject():
    import yaml

    config = limits_from_yaml(yaml.safe_load(YAML))
    assert config.user_paths == {"/team/alpha": RateLimit(rpm=100, tpm=50000, rpd=10000, concurrent=10)}
    assert config.providers == {"openai": RateLimit(rpm=500, concurrent=50)}
    assert config.models == {"openai/gpt-4o": RateLimit(tpm=90000),
                             "gpt-4o-mini": RateLimit(custom=(Window(300, 50, None),))}
    assert config.budgets == {
        "/team/alpha": (Budget("daily", max_cost=10), Budget("weekly", max_cost=50)),
        "/": (Budget("monthly", max_cost=500), Budget("total", max_tokens=100_000_000))}
    merged = limits_from_env({"SET_PROVIDER_RATE_LIMIT_OPENAI": "rpm=1", "SET_BUDGET_TEAM__ALPHA": "daily=1"},
                             base=config)
    assert merged.providers == {"openai": RateLimit(rpm=1)}
    assert merged.budgets["/team/alpha"] == (Budget("daily", max_cost=1),)
    assert merged.models == config.models and merged.user_paths == config.user_paths
    off = limits_from_env({"BUDGETS_ENABLED": "false"}, base=config)
    assert not off.budgets_enabled and off.budget_scopes("/team/alpha") == []
    assert off.path_scopes("/team/alpha") == config.path_scopes("/team/alpha")


def test_scopes_by_path_subtree_provider_and_model():
    import yaml

    config = limits_from_yaml(yaml.safe_load(YAML))
    config = limits_from_env({"SET_RATE_LIMIT_": "rpm=1000", "SET_RATE_LIMIT_TEAM": "rpm=300"}, base=config)
    names = [name for name, _ in config.path_scopes("/team/alpha/svc")]
    assert names == ["path:/team/alpha", "path:/team", "path:/"]
    assert [n for n, _ in config.path_scopes("/team-alpha")] == ["path:/"]  # a sibling is not a child
    assert [n for n, _ in config.target_scopes("OpenAI", "GPT-4o")] == ["provider:openai", "model:openai/gpt-4o"]
    assert [n for n, _ in config.target_scopes("azure", "gpt-4o-mini")] == ["model:gpt-4o-mini"]
    assert [n for n, _ in config.budget_scopes("/team/alpha/x")] == ["path:/team/alpha", "path:/"]
    assert LimitsConfig(rate_limits_enabled=False, user_paths={"/": RateLimit(rpm=1)}).path_scopes("/a") == []


@pytest.mark.parametrize("document,message", [
    ({"rate_limits": []}, "rate_limits must be a mapping"),
    ({"rate_limits": {"user_paths": [{"limits": [{"period": "minute", "max_requests": 1}]}]}},
     r"rate_limits.user_paths\[0\].path is required"),
    ({"rate_limits": {"user_paths": [{"path": "/a/../b", "limits": [{"period": "minute", "max_requests": 1}]}]}},
     "cannot contain '.' or '..'"),
    ({"rate_limits": {"providers": [{"name": "a/b", "limits": [{"period": "minute", "max_requests": 1}]}]}},
     "without|no slashes"),
    ({"rate_limits": {"models": [{"model": "m", "limits": [{"period": "minute", "max_requests": 0}]}]}},
     r"rate_limits.models\[0\].limits\[0\].max_requests must be a whole number from 1 to 9007199254740991"),
    ({"rate_limits": {"models": [{"model": "m", "limits": [{"period": "minute", "max_tokens": 10**400}]}]}},
     r"rate_limits.models\[0\].limits\[0\].max_tokens must be a whole number from 1 to"),
    # a window or budget period past ten years would overflow the expiries of Redis and the stores
    ({"rate_limits": {"models": [{"model": "m", "limits": [{"period_seconds": 10**26, "max_requests": 1}]}]}},
     r"rate_limits.models\[0\].limits\[0\].period_seconds must be 0 \(concurrent\) or a whole number of "
     r"seconds up to 315360000"),
    ({"budgets": {"user_paths": [{"path": "/", "limits": [{"period_seconds": 10**26, "amount": 1}]}]}},
     r"budgets.user_paths\[0\].limits\[0\]: budget period_seconds must be from 1 to 315360000"),
    ({"budgets": {"user_paths": [{"path": "/", "limits": [{"period": "daily", "max_tokens": 2**53}]}]}},
     r"budgets.user_paths\[0\].limits\[0\]: a daily budget's max_tokens must be a whole number from 1 to"),
    # a subject is text: a list or mapping is no path, provider or model (it was made text before)
    ({"rate_limits": {"user_paths": [{"path": ["/a"], "limits": [{"period": "minute", "max_requests": 1}]}]}},
     r"rate_limits.user_paths\[0\].path must be text, not list"),
    ({"rate_limits": {"models": [{"model": {"m": 1}, "limits": [{"period": "minute", "max_requests": 1}]}]}},
     r"rate_limits.models\[0\].model must be text, not dict"),
    ({"budgets": {"user_paths": [{"path": True, "limits": [{"period": "daily", "amount": 1}]}]}},
     r"budgets.user_paths\[0\].path must be text, not bool"),
    ({"rate_limits": {"user_paths": [{"path": "/a", "limits": [{"period": "minute", "max_requests": 1}]},
                                     {"path": "a/", "limits": [{"period": "minute", "max_requests": 2}]}]}},
     "configured twice"),
    ({"rate_limits": {"user_paths": [{"path": "/c", "per_child": True, "limits": []}]}}, "per_child"),
    ({"budgets": {"user_paths": [{"path": "/", "limits": [{"period": "daily", "amount": 0}]}]}},
     r"budgets.user_paths\[0\].limits\[0\].amount must be a finite number greater than 0"),
    ({"budgets": {"user_paths": [{"path": "/", "limits": [{"period": "daily", "amount": 1, "cap": 2}]}]}},
     "unknown keys: cap"),
    ({"budgets": {"enabled": "yes"}}, "budgets.enabled must be true or false"),
    # a misspelt or unsupported key: no limit or budget at all was set, silently
    ({"budgets": {"user_path": [{"path": "/", "limits": [{"period": "daily", "amount": 1}]}]}},
     r"budgets has unknown keys: user_path \(known: enabled, user_paths\)"),
    ({"budgets": {"labels": [{"label": "ios", "limits": [{"period": "daily", "amount": 1}]}]}},
     "budgets has unknown keys: labels"),
    ({"rate_limits": {"model": [{"model": "m", "limits": [{"period": "minute", "max_requests": 1}]}]}},
     "rate_limits has unknown keys: model"),
    ({"rate_limits": {"user_paths": [{"path": "/", "limit": [{"period": "minute", "max_requests": 1}]}]}},
     r"rate_limits.user_paths\[0\] has unknown keys: limit"),
])
def test_bad_yaml_says_where(document, message):
    with pytest.raises(ValueError, match=message):
        limits_from_yaml(document)


def test_a_number_in_yaml_is_a_name_and_the_largest_bounds_are_taken():
    config = limits_from_yaml({"rate_limits": {"models": [{"model": 7, "limits": [
        {"period_seconds": 315360000, "max_tokens": 2**53 - 1}]}]}})
    assert config.models == {"7": RateLimit(custom=(Window(315360000, None, 2**53 - 1),))}


def test_user_paths_are_normalised_like_gomodels():
    assert normalize_user_path(" team//alpha/ ") == "/team/alpha"
    assert normalize_user_path("") == "/"
    with pytest.raises(ValueError, match="':'"):
        normalize_user_path("/a:b")


# --- the gate on local counters: a key's lane and the general path ---------------------------------------


class _Call:
    model = "m"
    path = "/chat/completions"
    asked = None  # (read from its bytes)

    def __init__(self, max_tokens, limited=True):
        self.body = self.counted = b'{"model":"vllm/m","messages":[],"max_tokens":%d}' % max_tokens  # 11 + max_tokens (< 10)
        self.limited = limited


class _Upstream:
    name = "vllm"


def _gate(counters, clock, quotas=None):
    from gomodel.limits.gate import Gate

    return Gate(Limiter(counters, clock), BudgetBook(counters, clock), quotas or LimitsConfig(), clock=clock)


def _request(gate, principal, max_tokens=8, used=None, limited=True):
    """Admit one request of C{principal} (C{limited}: not a token count) and, with C{used}, complete it: its
    C{(ctx, headers)}."""
    from types import SimpleNamespace

    from gomodel.http.headers import AnswerHeaders

    ctx = SimpleNamespace(principal=principal, admission=None, budgets=None, usage=None, replica=0, provider="vllm",
                          upstream_model="m", started=gate._limiter.clock.seconds())
    request = SimpleNamespace(responseHeaders=AnswerHeaders())
    fired(gate.admit(request, ctx, _Upstream(), _Call(max_tokens, limited)))
    if used is not None:
        ctx.usage = {"prompt_tokens": used - 1, "completion_tokens": 1, "total_tokens": used}
        gate.completed(ctx)
    answer = request.responseHeaders
    assert not list(answer.getAllRawHeaders())  # the x-ratelimit-* headers are the answer's lines
    lines = [line.split(b": ", 1) for line in answer.lines.split(b"\r\n") if line]
    assert answer.lines in (b"", b"\r\n".join(b": ".join(pair) for pair in lines) + b"\r\n")
    return ctx, {name.decode().lower(): value.decode() for name, value in lines}


def _key(**fields):
    from gomodel.auth.keys import Principal

    fields.setdefault("budgets", [{"period": "daily", "max_tokens": 100}])
    return Principal("k_1", "team", user_path="/team", **fields)


def test_a_keys_later_requests_reserve_what_their_bodies_ask_for_as_its_first_did(clock, counters):
    """From its second request on a key's lane is kept by its principal (no plan looked up): each request still
    reserves its body's bytes / 4 and the max_tokens it asks for (none: its bytes / 4 alone)."""
    from types import SimpleNamespace

    from gomodel.http.headers import AnswerHeaders

    gate, key = _gate(counters, clock), _key(tpm=1000)
    reserved = []
    for max_tokens in (8, 8, 3, None):
        call = _Call(max_tokens or 0)
        if max_tokens is None:
            call.counted = b'{"model":"vllm/m","messages":[]}'  # 32 bytes: 8 tokens
        before = (counters.level("key:k_1|t60") or (1000,))[0]  # (full until its first request)
        ctx = SimpleNamespace(principal=key, admission=None, budgets=None, usage=None, replica=0, provider="vllm",
                              upstream_model="m", started=clock.seconds())
        fired(gate.admit(SimpleNamespace(responseHeaders=AnswerHeaders()), ctx, _Upstream(), call))
        reserved.append(before - counters.level("key:k_1|t60")[0])
    assert gate._key_lanes[key] is not None and reserved == [19, 19, 14, 8]


@pytest.mark.parametrize("usage", [{"input_tokens": 4, "output_tokens": 1},
                                   {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": "5"},
                                   {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": -1}])
def test_a_usage_without_a_total_it_can_take_settles_and_charges_its_input_and_output(clock, counters, usage):
    """A usage with no total (Messages' naming), or one that is no count, is settled and charged as its input and
    output tokens."""
    gate, key = _gate(counters, clock), _key(rpm=3, tpm=1000)
    ctx, _ = _request(gate, key, max_tokens=8)
    ctx.usage = usage
    gate.completed(ctx)
    assert counters.level("key:k_1|t60")[0] == 995
    assert fired(gate._book.spent([("key:k_1", Budget("daily", max_tokens=100))])) == [(5, 0.0)]


def test_a_keys_lane_takes_settles_and_charges_as_the_general_path_does(clock, counters):
    gate, key = _gate(counters, clock), _key(rpm=3, tpm=1000)
    ctx, headers = _request(gate, key, max_tokens=8)
    assert _by_a_lane(ctx)  # admitted by the lane
    assert counters.level("key:k_1|r60")[0] == 2 and counters.level("key:k_1|t60")[0] == 1000 - 19
    assert headers == {"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "2",
                       "x-ratelimit-reset-requests": "20s", "x-ratelimit-limit-tokens": "1000",
                       "x-ratelimit-remaining-tokens": "981", "x-ratelimit-reset-tokens": "1.14s"}
    ctx.usage = {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
    gate.completed(ctx)
    assert counters.level("key:k_1|t60")[0] == 995  # settled: the 19 reserved became the 5 used
    assert fired(gate._book.spent([("key:k_1", Budget("daily", max_tokens=100))])) == [(5, 0.0)]
    gate.completed(ctx)  # once only: neither settled nor charged again
    assert counters.level("key:k_1|t60")[0] == 995
    assert fired(gate._book.spent([("key:k_1", Budget("daily", max_tokens=100))])) == [(5, 0.0)]
    # The general path (a fresh limiter on other counters) gives the same headers for the same state.
    other = LocalCounters(clock)
    expected = Limiter(other, clock).admit_now([("key:k_1", RateLimit(rpm=3, tpm=1000))], 19, headers_for="key:k_1")
    assert expected.headers == headers


def test_a_lanes_header_lines_follow_its_levels(clock, counters):
    # The lines of a level as the last are written again; any other level's are made anew, as the
    # general path makes them for the same state.
    gate, key = _gate(counters, clock), _key(rpm=600, tpm=100000)
    buckets = {"key:k_1|r60": (600, 10), "key:k_1|t60": (100000, 100000 / 60)}  # capacity, refill per second
    seen = []
    for wait in (0, 60, 0, 0.05, 60):  # full, full again, lower, lower still, refilled
        clock.advance(wait)
        other = LocalCounters(clock)  # the general path's, in the same state
        for bucket, (capacity, refill) in buckets.items():
            if counters.level(bucket) is not None:
                other.cell(bucket, capacity, refill)[:2] = counters.level(bucket)
        expected = Limiter(other, clock).admit_now([("key:k_1", RateLimit(rpm=600, tpm=100000))], 19,
                                                   headers_for="key:k_1")
        ctx, headers = _request(gate, key, max_tokens=8)
        assert _by_a_lane(ctx) and headers == expected.headers
        seen.append(headers["x-ratelimit-remaining-requests"])
        ctx.usage = {"prompt_tokens": 11, "completion_tokens": 8, "total_tokens": 19}
        gate.completed(ctx)
    assert seen == ["599", "599", "598", "597", "599"]


def test_a_token_count_takes_only_a_slot_of_its_keys_caps_on_requests_in_flight(clock, counters):
    """A count (a call not limited: count_tokens, input_tokens) takes nothing of a request or token window or a
    budget, spent or not; it holds a slot of its key's and path's max_concurrency while it runs."""
    quotas = LimitsConfig(user_paths={"/team": RateLimit(concurrent=5)})
    gate = _gate(counters, clock, quotas)
    key = _key(rpm=1, tpm=100, max_concurrency=1, budgets=[{"period": "daily", "max_tokens": 10}])
    _request(gate, key, used=10)  # the minute's one request, the day's budget
    counting, headers = _request(gate, key, limited=False)
    assert headers == {} and counters.level("key:k_1|r60")[0] == 0  # (nothing taken, nothing shown)
    with pytest.raises(RateLimitExceeded) as info:  # its slot held
        _request(gate, key, limited=False)
    assert info.value.scope == "key:k_1"
    gate.completed(counting)
    _request(gate, key, limited=False, used=0)
    assert _request(_gate(counters, clock), _key(rpm=1), limited=False)[0].admission is None  # (no such cap)


def test_a_lane_refusal_is_the_general_paths_answer(clock, counters):
    gate, key = _gate(counters, clock), _key(rpm=1, budgets=[{"period": "daily", "max_tokens": 10}])
    _request(gate, key, used=4)
    with pytest.raises(RateLimitExceeded) as info:
        _request(gate, key)
    assert info.value.scope == "key:k_1" and info.value.headers["x-ratelimit-remaining-requests"] == "0"
    clock.advance(60)
    _request(gate, key, used=6)  # the budget's 10 are spent now
    clock.advance(60)
    with pytest.raises(BudgetExceeded):
        _request(gate, key)
    assert counters.level("key:k_1|r60") == (0, T0 + 60)  # nothing was taken by the refusals


def test_a_lane_made_before_a_sweep_or_a_periods_end_is_not_used_after(clock):
    counters = LocalCounters(clock, sweep_every=2)
    gate, key = _gate(counters, clock), _key(tpm=1000)
    first, _ = _request(gate, key, max_tokens=8)  # 19 reserved
    epoch = counters.epoch
    _request(gate, key, max_tokens=8, used=5)  # the counters sweep: cells handed out before may be gone
    assert counters.epoch > epoch
    first.usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    gate.completed(first)  # settled by bucket name, charged by the book
    assert counters.level("key:k_1|t60")[0] == pytest.approx(1000 - 2 - 5)
    spent = [("key:k_1", Budget("daily", max_tokens=100))]
    assert fired(gate._book.spent(spent)) == [(7, 0.0)]
    clock.advance(86400)  # a new day: the budget's sum starts again
    _request(gate, key, used=3)
    assert fired(gate._book.spent(spent)) == [(3, 0.0)]


@pytest.mark.parametrize("sweep_every", [None, 2], ids=["lane", "swept"])
def test_a_request_ending_in_the_next_period_is_charged_to_the_one_it_started_in(clock, sweep_every):
    """A request begun before midnight and ending after it is charged to the day it began, as the usage
    ledger dates it (by its start), by its lane or by the book (its lane's cells swept meanwhile); before, to
    the new day, whose sum then disagreed with the ledger (a restart or an edit seeded it without it)."""
    counters = LocalCounters(clock) if sweep_every is None else LocalCounters(clock, sweep_every=sweep_every)
    gate, key = _gate(counters, clock), _key(rpm=1000)
    day = [("key:k_1", Budget("daily", max_tokens=100))]
    clock.advance(86400 - 1)  # 23:59:59 of the first day
    late, _ = _request(gate, key)
    clock.advance(2)  # the next day
    _request(gate, key, used=3)
    late.usage = {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}
    gate.completed(late)
    assert fired(gate._book.spent(day)) == [(3, 0.0)]
    assert counters.spent_all_now([f"budget|key:k_1|daily|{int(T0)}"]) == [(10, 0.0)]
    # Begun before midnight (its head read), admitted after it by the new day's lane: the day it began, too.
    clock.advance(86400)  # 00:00:01 of the third day
    ctx, _ = _request(gate, key)
    ctx.started = clock.seconds() - 2
    ctx.usage = {"prompt_tokens": 6, "completion_tokens": 1, "total_tokens": 7}
    gate.completed(ctx)
    assert counters.spent_all_now([f"budget|key:k_1|daily|{int(T0) + 86400}"]) == [(3 + 7, 0.0)]
    assert fired(gate._book.spent(day)) == [(0, 0.0)]


@pytest.mark.parametrize("limit", [RateLimit(rpm=4, tpm=40), RateLimit(tpm=36), RateLimit(rpm=4, rph=5, tpm=60, tph=70)],
                         ids=["rpm-tpm", "tpm", "two-windows"])
def test_a_lanes_header_lines_are_the_general_paths_for_every_level(clock, limit):
    """The lane writes a key's headers as it stores each level (one window of each kind shown), or through
    the general plan (several windows of a kind: the fewest remaining shows): the same lines either way, down
    to a level under 1 and resets of over a second, as the general path writes them."""
    from gomodel.http.headers import AnswerHeaders
    from gomodel.limits.lanes import Lane

    scopes = [("key:k", limit), ("path:/team", RateLimit(rpm=100))]
    ours, theirs = LocalCounters(clock), LocalCounters(clock)
    limiter, general = Limiter(ours, clock), Limiter(theirs, clock)
    prepared = limiter.prepare(scopes)
    lane = Lane(scopes, limiter, prepared, None, prepared.header_plan("key:k"))
    for tokens in (9, 9, 17, 1):  # down to a level under 1 (shown as 0)
        clock.advance(0.25)
        headers = AnswerHeaders()
        ticket = lane.admit(tokens, clock.seconds(), headers)
        expected = general.admit_now(scopes, tokens, headers_for="key:k")
        assert ticket is not None
        assert headers.lines == expected.header_lines()
    clock.advance(60)  # the request buckets refilled: the token bucket refuses what they let through
    assert lane.admit(80, clock.seconds(), AnswerHeaders()) is None  # refused: nothing taken
    assert ours.level("key:k|t60") == theirs.level("key:k|t60")
    for bucket in prepared.buckets:  # not of the buckets before the one that refused either
        assert _level_now(ours, bucket, clock) == pytest.approx(_level_now(theirs, bucket, clock))


def test_a_lanes_header_lines_after_a_refusal_are_the_levels_it_stores(clock):
    """A refusal after a shown bucket's lines were written for a level it then gave back: the next request that
    stores that level shows it, as the general path does (the lines it joined are not the ones before)."""
    from gomodel.http.headers import AnswerHeaders
    from gomodel.limits.lanes import Lane

    scopes = [("key:k", RateLimit(rpm=10, tpm=40))]
    ours, theirs = LocalCounters(clock), LocalCounters(clock)
    limiter, general = Limiter(ours, clock), Limiter(theirs, clock)
    prepared = limiter.prepare(scopes)
    lane = Lane(scopes, limiter, prepared, None, prepared.header_plan("key:k"))
    assert lane.admit(9, clock.seconds(), AnswerHeaders()) is not None
    general.admit_now(scopes, 9, headers_for="key:k")
    assert lane.admit(35, clock.seconds(), AnswerHeaders()) is None  # the token bucket refuses: nothing taken
    headers = AnswerHeaders()
    assert lane.admit(0, clock.seconds(), headers) is not None  # the request bucket at the refused one's level
    assert headers.lines == general.admit_now(scopes, 0, headers_for="key:k").header_lines()


def test_a_lane_refused_a_concurrency_slot_gives_back_what_its_buckets_gave(clock, counters):
    from gomodel.http.headers import AnswerHeaders
    from gomodel.limits.lanes import Lane

    scopes = [("key:k", RateLimit(rpm=10, tpm=100, concurrent=1))]
    limiter = Limiter(counters, clock)
    prepared = limiter.prepare(scopes)
    lane = Lane(scopes, limiter, prepared, None, prepared.header_plan("key:k"))
    first = lane.admit(7, clock.seconds(), AnswerHeaders())
    levels = [_level_now(counters, bucket, clock) for bucket in prepared.buckets]
    assert levels == [9, 93]
    assert lane.admit(7, clock.seconds(), AnswerHeaders()) is None  # its one slot is held
    assert [_level_now(counters, bucket, clock) for bucket in prepared.buckets] == levels
    lane.finish(first, 7, False, None)
    assert lane.admit(7, clock.seconds(), AnswerHeaders()) is not None


def test_a_lane_of_several_slots_takes_none_unless_every_one_has_room(clock, counters):
    from gomodel.http.headers import AnswerHeaders
    from gomodel.limits.lanes import Lane

    scopes = [("key:k", RateLimit(concurrent=2)), ("path:/a", RateLimit(concurrent=1))]
    limiter = Limiter(counters, clock)
    prepared = limiter.prepare(scopes)
    (key_slot, _), (path_slot, _) = prepared.slots
    lane = Lane(scopes, limiter, prepared, None, ())
    first = lane.admit(1, clock.seconds(), AnswerHeaders())
    assert first is not None and counters.held(key_slot) == 1 and counters.held(path_slot) == 1
    assert lane.admit(1, clock.seconds(), AnswerHeaders()) is None  # the path's one slot is held
    assert counters.held(key_slot) == 1 and counters.held(path_slot) == 1  # nothing taken of the key's
    lane.finish(first, 1, False, None)
    assert counters.held(key_slot) == 0 and counters.held(path_slot) == 0
    assert lane.admit(1, clock.seconds(), AnswerHeaders()) is not None


def test_a_lanes_slot_held_across_a_sweep_is_freed_where_every_path_counts_it(clock):
    from gomodel.http.headers import AnswerHeaders
    from gomodel.limits.lanes import Lane

    counters = LocalCounters(clock, sweep_every=2)
    scopes = [("key:k", RateLimit(concurrent=1))]
    limiter = Limiter(counters, clock)
    prepared = limiter.prepare(scopes)
    (bucket, _), = prepared.slots
    lane = Lane(scopes, limiter, prepared, None, prepared.header_plan("key:k"))
    ticket = lane.admit(5, clock.seconds(), AnswerHeaders())
    epoch = counters.epoch
    while counters.epoch == epoch:  # the counters sweep while it is held
        counters.tick(clock.seconds())
    assert counters.held(bucket) == 1 and counters.try_hold(prepared.slots) is None
    lane.finish(ticket, 5, False, None)
    assert counters.held(bucket) == 0
    lease = counters.try_hold(prepared.slots)  # the general path takes the freed slot
    assert lease is not None and lane.admit(5, clock.seconds(), AnswerHeaders()) is None  # (a lane of old cells is not used)
    counters.free(lease)
    counters.tick(clock.seconds())
    counters.tick(clock.seconds())  # a sweep drops the cell of none held
    fresh = Lane(scopes, limiter, prepared, None, prepared.header_plan("key:k"))
    assert fresh.admit(5, clock.seconds(), AnswerHeaders()) is not None and counters.held(bucket) == 1


def _by_a_lane(ctx) -> bool:
    """Whether C{ctx}'s admission is a lane's ticket: C{(lane, tokens)}, or C{()} once the gate settled it."""
    admission = ctx.admission
    return admission == () or (admission.__class__ is tuple and admission[0].__class__ is Lane)


def _level_now(counters, bucket, clock):
    """A bucket's level at the clock's time, from what C{counters} stored of it."""
    stored = counters.level(bucket.name)
    if stored is None:
        return bucket.capacity
    level, when = stored
    return min(bucket.capacity, level + (clock.seconds() - when) * bucket.refill)


def test_budgets_are_charged_without_a_rate_limit_or_the_usage_ledger(clock, counters):
    gate, key = _gate(counters, clock), _key()
    ctx, headers = _request(gate, key, used=60)
    assert not headers and _by_a_lane(ctx)
    _request(gate, key, used=60)  # admitted at 60: a request in flight is never cut
    with pytest.raises(BudgetExceeded):
        _request(gate, key)
    master, _ = _request(gate, None, used=1000)
    assert master.admission is None


@pytest.mark.parametrize("capacity, seconds", [(10, 60), (600, 60), (1000, 10), (100_000, 3600), (7, 86400)])
def test_reset_headers_are_openais_duration_of_the_wait(capacity, seconds):
    from gomodel.limits.limiter import _Bucket, header_lines

    bucket = _Bucket("key:k", seconds, capacity, True)
    plan = ((b"reset: ", (0,), {0: b"limit: %s\r\nremaining: " % bucket.capacity_raw}),)
    for level in [capacity, capacity - 1e-9, capacity * 0.999, capacity / 2, 1, 0.5, 0, -capacity, -7 * capacity]:
        raw = dict(line.split(b": ") for line in header_lines(plan, [bucket], [level]).split(b"\r\n") if line)
        assert raw[b"limit"] == b"%d" % capacity
        assert raw[b"reset"] == duration((capacity - level) / bucket.refill).encode()
        assert raw[b"remaining"] == (b"%d" % level if level >= 1 else b"0")


def test_what_a_request_reserves_is_its_prompt_bytes_over_four_and_the_output_it_asks_for():
    assert requested_tokens(b'{"model":"m","messages":[]}') is None
    assert requested_tokens(b"") is None and requested_tokens(None) is None
    assert requested_tokens(b'{"max_tokens": 64}') == 64
    assert requested_tokens(b'{"max_completion_tokens":7,"max_tokens":9}') == 7  # the first one sent
    assert requested_tokens(b'{"max_output_tokens" :\n 12}') == 12
    # another "max_..." field first, or one without a number: the next that has one
    assert requested_tokens(b'{"max_retries":3,"max_tokens":null,"max_completion_tokens":5}') == 5
    assert requested_tokens(b'{"metadata":{"max_":1}}') is None
    # only the body's own: not one inside a message, a tool's input or a schema, before or after its own
    nested = b'{"messages":[{"role":"assistant","content":[{"type":"tool_use","input":{"max_tokens":900000}}]}]'
    assert requested_tokens(nested + b',"max_tokens":16}') == 16
    assert requested_tokens(nested + b',"max_tokens":16,"tools":[{"input_schema":{}}]}') == 16
    assert requested_tokens(nested + b'}') is None
    assert requested_tokens(b'{"max_tokens":16,"response_format":{"examples":[{"max_tokens":9}]}}') == 16
    assert requested_tokens(b'{"model":"m","max_tokens":16}') == 16  # (read without parsing)
    assert requested_tokens(b'{"x":{"a":1},"max_tokens":16,"stream":true}') == 16
    assert requested_tokens(b'{"m":[{}],"max_tokens":16,"stream_options":{"include_usage":true}}') == 16
    assert requested_tokens(b'{"m":[{"max_tokens":9,"b":{"c":"}"}}],"max_tokens":16}') == 16
    assert requested_tokens(b'{"m":[{"max_tokens":9,"b":"{"}],"max_tokens":16}') == 16
    body = b'{"model":"m","max_tokens":100,"messages":[{"role":"user","content":"hello"}]}'
    assert estimate(body) == len(body) // 4 + 100


def test_the_output_a_route_asks_for_is_the_field_vllm_reads_there():
    """vLLM 0.32 reads one output field per route: chat's C{max_completion_tokens}, else its C{max_tokens} (before,
    the first one sent: C{{"max_tokens":7,"max_completion_tokens":9}} reserved 7 where vLLM may generate 9);
    completions' C{max_tokens}; the Responses API's C{max_output_tokens}; Messages' C{max_tokens}: any other field
    is no field of that route, ignored. C{n} asks for sequences on chat and completions only, and C{best_of} on
    none (vLLM 0.32's completions has none: before, it multiplied). A path no route's reads the first one sent."""
    nested = b'{"messages":[{"content":[{"type":"tool_use","input":{"max_completion_tokens":900000}}]}]'
    for body, path, asked in (
            (b'{"max_tokens":7,"max_completion_tokens":9}', "/chat/completions", 9),
            (b'{"max_tokens":7,"max_completion_tokens":9}', "v1/chat/completions", 9),  # (a passthrough's)
            (b'{"max_completion_tokens":9,"max_tokens":7}', "/chat/completions", 9),
            (b'{"max_completion_tokens":null,"max_tokens":7}', "/chat/completions", 7),
            (b'{"max_completion_tokens":"7","max_tokens":9}', "/chat/completions", 7),
            (b'{"max_output_tokens":9,"max_tokens":7}', "/chat/completions", 7),
            (nested + b',"max_tokens":16}', "/chat/completions", 16),
            (nested + b',"max_completion_tokens":16,"max_tokens":9}', "/chat/completions", 16),
            (b'{"max_completion_tokens":9,"max_tokens":7}', "/completions", 7),
            (b'{"max_completion_tokens":9}', "/completions", 16),  # (vLLM's default: see below)
            (b'{"max_tokens":7,"max_output_tokens":9}', "/responses", 9),
            (b'{"max_tokens":7}', "/responses", None),
            (b'{"max_output_tokens":9,"max_tokens":7}', "/messages", 7),
            (b'{"max_completion_tokens":9,"max_tokens":7}', "v1/messages", 7),
            (b'{"max_completion_tokens":9,"max_tokens":7}', "generate", 9),
            (b'{"max_completion_tokens":9,"max_tokens":7}', None, 9),
            (b'{"max_tokens":16,"n":4}', "/chat/completions", 64),
            (b'{"max_tokens":16,"n":4}', "/completions", 64),
            (b'{"max_tokens":16,"best_of":4}', "/completions", 16),
            (b'{"max_tokens":16,"n":2,"best_of":4}', "/completions", 32),
            (b'{"max_tokens":16,"best_of":4}', None, 16),
            (b'{"max_output_tokens":16,"n":4}', "/responses", 16),
            (b'{"max_tokens":16,"n":4}', "/messages", 16)):
        assert requested_tokens(body, path) == asked, (body, path)
        parsed = completion_tokens if path == "/completions" else asked_tokens  # (as the routes read them)
        assert parsed(jsonutil.loads(body), path) == (asked or 0), (body, path)
    body = b'{"max_tokens":7,"max_completion_tokens":9,"messages":[]}'
    assert estimate(body, "/chat/completions") == len(body) // 4 + 9
    assert estimate(body, "/completions") == len(body) // 4 + 7


def test_a_completions_body_asks_for_each_sequence_of_each_of_its_prompts():
    """A text completion's C{prompt} that is a list of k prompts (strings, or lists of token ids; a list of ints is
    one prompt) generates k sequences of each C{n} on vLLM (before, n were counted: a 4-prompt request reserved a
    quarter of what it can generate)."""
    for fields, sequences in (({"prompt": "hi"}, 1), ({"prompt": ["a", "b", "c", "d"]}, 4),
                              ({"prompt": [[1, 2], [3], [4, 5, 6]]}, 3), ({"prompt": [1, 2, 3, 4]}, 1),
                              ({"prompt": ["a", "b"], "n": 3}, 6), ({"prompt": [[1], [2]], "n": "2"}, 4),
                              ({"prompt": [1, 2, 3], "n": 5}, 5), ({"prompt": [], "n": 2}, 2), ({}, 1),
                              ({"prompt": ["a", "b"], "n": None}, 2), ({"prompt": ["a", "b"], "n": 5000}, 2)):
        assert completion_sequences(fields) == sequences, fields


def test_a_completions_body_without_max_tokens_asks_for_vllms_default_of_16():
    """vLLM's (and OpenAI's) text completions generate 16 tokens a sequence where the body sends no C{max_tokens}
    (before, none was reserved); a null asks for the model's whole context, unknown here, as chat's default is: none
    reserved. Online (the parsed body, L{completion_tokens}) and as bytes (a batch line's, a passthrough's, at each
    spelling of the path) alike; chat is as it was."""
    four = {"model": "m", "prompt": ["a", "b", "c", "d"]}
    for fields, asked in ((four, 64), (dict(four, max_tokens=100), 400), (dict(four, max_tokens=100, n=2), 800),
                          (dict(four, n=3), 192), ({"prompt": [[1, 2], [3]], "max_tokens": 5}, 10),
                          ({"prompt": [1, 2, 3], "max_tokens": 5, "n": 2}, 10), ({"prompt": "hi"}, 16),
                          ({"prompt": "hi", "max_tokens": 0}, 0), (dict(four, max_tokens=0), 0),
                          ({"prompt": "hi", "max_tokens": None}, 0), ({"prompt": "hi", "max_tokens": "7"}, 7),
                          ({"prompt": "hi", "max_tokens": 5.5}, 0),
                          ({"prompt": "say max_tokens", "max_completion_tokens": 9}, 16),
                          ({"prompt": ["max_tokens", "b"], "stream": True}, 32)):
        assert completion_tokens(fields) == asked, fields
        body = jsonutil.dumps(fields)
        for path in ("/completions", "completions", "v1/completions", "/v1/completions"):
            assert requested_tokens(body, path) == (asked or None), (fields, path)
        assert estimate(body, "/completions") == len(body) // 4 + asked
    assert requested_tokens(b"", "/completions") is None and requested_tokens(None, "/completions") is None
    assert requested_tokens(b"not json", "/completions") is None  # (vLLM refuses it: nothing generated)
    assert requested_tokens(b'[{"prompt":"hi"}]', "/completions") is None
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 4, "prompt": ["a", "b"]}
    assert asked_tokens(chat, "/chat/completions") == 0
    assert requested_tokens(jsonutil.dumps(chat), "/chat/completions") is None
    assert asked_tokens(dict(chat, max_tokens=5), "/chat/completions") == 20


def test_a_batch_line_reserves_the_field_vllm_reads_at_the_path_it_is_sent_to(clock, counters):
    """A batch line reserves from its key's budgets what its body asks for at the path it is sent to, as online
    (L{test_the_output_a_route_asks_for_is_the_field_vllm_reads_there}): a chat line's C{max_completion_tokens}
    over its C{max_tokens}, a completion line's C{max_tokens} (before, the first one sent at either)."""
    gate, key = _gate(counters, clock), _key(budgets=[{"period": "daily", "max_tokens": 100000}])
    body = b'{"model":"m","prompt":"hi","max_tokens":7,"max_completion_tokens":900}'
    assert fired(gate.reserve_line(key, "vllm/m", body, "/chat/completions")).tokens == len(body) // 4 + 900
    assert fired(gate.reserve_line(key, "vllm/m", body, "/completions")).tokens == len(body) // 4 + 7
    # A completion line's prompt list: each prompt's sequences, and vLLM's 16 tokens each without a max_tokens.
    body = b'{"model":"m","prompt":["a","b","c","d"],"n":2}'
    assert fired(gate.reserve_line(key, "vllm/m", body, "/completions")).tokens == len(body) // 4 + 4 * 2 * 16


def test_the_output_a_parsed_body_asks_for_is_what_its_bytes_ask_for():
    """A route that parsed the body it sends reads the output it asks for from its fields (L{asked_tokens}, the
    call's C{asked}): the same count as L{requested_tokens} of the bytes it dumps them to, 0 for none."""
    nested = b'{"messages":[{"role":"assistant","content":[{"type":"tool_use","input":{"max_tokens":900000}}]}]'
    for body in (b'{"model":"m","messages":[]}', b'{"max_tokens": 64}', b'{"max_completion_tokens":7,"max_tokens":9}',
                 b'{"max_output_tokens" :\n 12}', b'{"max_retries":3,"max_tokens":null,"max_completion_tokens":5}',
                 b'{"metadata":{"max_":1}}', nested + b',"max_tokens":16}', nested + b'}',
                 b'{"max_tokens":16,"response_format":{"examples":[{"max_tokens":9}]}}',
                 b'{"m":[{"max_tokens":9,"b":"{"}],"max_tokens":16}', b'{"max_tokens":16,"n":4}',
                 b'{"max_tokens":16,"n":2,"best_of":3}', b'{"messages":[{"content":"x","n":9}],"max_tokens":16}',
                 b'{"max_tokens":16,"n":true}', b'{"n":4}', b'{"max_tokens":16,"n":null,"best_of":5000}',
                 b'{"max_tokens":true,"max_completion_tokens":-1,"max_output_tokens":8,"n":0}',
                 b'{"max_tokens":5.0}', b'{"max_tokens":5.5,"max_completion_tokens":7}', b'{"max_tokens":1e3,"n":2.0}',
                 b'{"max_tokens":16,"n":1.5}', b'{"max_tokens":1e30}', b'{"max_tokens":123456789012345678901}'):
        fields = jsonutil.loads(body)
        assert asked_tokens(fields) == (requested_tokens(jsonutil.dumps(fields)) or 0), body
        assert asked_tokens(fields) == (requested_tokens(body) or 0), body
    assert estimate(b"") == 0


def test_an_integral_float_asks_for_as_many_tokens_as_its_int():
    """vLLM's C{max_tokens} (and C{n}) is an int read by pydantic's lax mode: C{5.0} is taken as 5 and
    generates 5 tokens, C{5.5} is refused (a 400). The estimate counts what vLLM will generate: an integral float as
    its int (before, a parsed body's C{5.0} reserved no output, where the bytes' scan had reserved 5), a fraction as
    no count (the next such field is read, as for a null)."""
    for body, asked in ((b'{"max_tokens":5.0}', 5), (b'{"max_tokens": 5.0, "messages": []}', 5),
                        (b'{"max_tokens":5.5}', None), (b'{"max_tokens":5.5,"max_completion_tokens":7}', 7),
                        (b'{"max_tokens":1e3}', 1000), (b'{"max_tokens":16,"n":2.0}', 32),
                        (b'{"max_tokens":16,"best_of":3.0,"n":1}', 16), (b'{"max_tokens":16,"n":1.5}', 16),
                        (b'{"max_tokens":-5.0}', None), (b'{"max_tokens":1e30}', None)):
        assert requested_tokens(body) == asked, body
        assert asked_tokens(jsonutil.loads(body)) == (asked or 0), body


def test_a_string_or_bool_asks_for_the_tokens_vllm_reads_from_it():
    """vLLM's pydantic lax mode also reads an int field's numeric string (C{"5"}, C{" 5 "}, C{"5.0"}, C{"1_000"}) and
    a bool (C{true} is 1) as that int, and generates as many tokens: the estimate counts them so (before, none: a
    C{"max_tokens": "100000"} reserved no output); a string vLLM refuses (C{"5."}, C{"1e3"}, C{"five"}) is no count,
    the next such field read, as for a null."""
    for body, asked in ((b'{"max_tokens":"100000"}', 100000), (b'{"max_tokens":" +64 ","messages":[]}', 64),
                        (b'{"max_completion_tokens":"5.00"}', 5), (b'{"max_output_tokens":"1_000"}', 1000),
                        (b'{"max_tokens":"007"}', 7), (b'{"max_tokens":true}', 1), (b'{"max_tokens":false}', 0),
                        (b'{"max_tokens":"16","n":"3"}', 48), (b'{"max_tokens":16,"n":true}', 16),
                        (b'{"max_tokens":"5.","max_completion_tokens":7}', 7), (b'{"max_tokens":"1e3"}', None),
                        (b'{"max_tokens":"five"}', None), (b'{"max_tokens":"-5"}', None), (b'{"max_tokens":""}', None),
                        (b'{"max_tokens":"\\u0665"}', None), (b'{"max_tokens":"1' + b'0' * 18 + b'"}', None),
                        (b'{"messages":[{"max_tokens":9}],"max_tokens":"12"}', 12),
                        (b'{"max_tokens":"12","messages":[{"max_tokens":9}]}', 12)):
        assert requested_tokens(body) == asked, body
        assert asked_tokens(jsonutil.loads(body)) == (asked or 0), body


def test_the_count_of_a_value_is_the_int_pydantic_reads_from_it():
    """Every value vLLM's request models take for an int field counts as the int pydantic's lax mode reads from it (and
    no value they refuse counts): strings cut from those its parser cleans (signs, zeros, points, underscores,
    whitespace), against pydantic itself."""
    TypeAdapter = pytest.importorskip("pydantic").TypeAdapter
    read = TypeAdapter(int).validate_python

    def vllm(value):
        try:
            count = read(value)
        except ValueError:  # (pydantic's ValidationError)
            return None
        return count if 0 <= count < 10**18 else None

    pieces = ("0", "0", "1", "9", "_", ".", "+", "-", " ", "\t", "\n", "e", "x", "\xa0", "\u2003", "\x1c", "\u0665")
    values = ["".join(picked) for size in range(5) for picked in itertools.product(pieces[:9], repeat=size)]
    values += ["".join(random.Random(seed).choices(pieces, k=8)) for seed in range(20000)]
    values += ["0" * 5000 + "5", "1" * 4301, " " * 100 + "12", "999999999999999999", "1000000000000000000",
               5, 5.0, 5.5, -0.0, 1e18, 9.3e18, float("inf"), float("nan"), True, False, None, [], {}]
    for value in values:
        assert _asked_count(value) == vllm(value), value


def test_read_says_what_windows_and_slots_hold_and_takes_nothing(limiter, counters, clock):
    """What C{GET /v1/usage} shows: levels refilled to now (a changed limit moved), slots held; nothing changes."""
    key = ("key:k", RateLimit(rpm=60, tpm=600, concurrent=2))
    path = ("path:/t", RateLimit(rph=10))
    assert fired(limiter.read([key, path])) == [({(60, False): 60, (60, True): 600}, 0), ({(3600, False): 10}, None)]
    admission = fired(limiter.admit([key, path], 100))
    fired(limiter.admit([key], 50)).finish_now(50)
    clock.advance(2)  # two requests' worth refilled on the minute, 20 tokens
    read = fired(limiter.read([key, path]))
    assert read == [({(60, False): 60.0, (60, True): 470.0}, 1), ({(3600, False): 9 + 2 / 360}, None)]
    assert fired(limiter.read([key, path])) == read  # reading took nothing
    admission.finish_now(100)
    changed = ("key:k", RateLimit(rpm=30, tpm=600, concurrent=2))  # lowered: what was used stays used (as admit)
    assert fired(limiter.read([changed]))[0] == ({(60, False): 29.0, (60, True): 470.0}, 0)  # (58 + 2 s at 0.5/s - 30)
    assert fired(limiter.read([])) == []


def test_what_the_limiter_and_the_salts_keep_per_key_is_bounded(monkeypatch):
    """Keys come and go for the life of a process: a deleted key's scope plan, its shared buckets' levels and
    its tenant's salt were kept for ever (a leak hunt's finding); past a bound they are dropped, made again
    when asked."""
    from twisted.internet.task import Clock

    from gomodel.auth import tenancy
    from gomodel.limits import limiter as limiter_module
    from gomodel.limits.counters import LocalCounters
    from gomodel.limits.limiter import Limiter
    from gomodel.limits.specs import RateLimit

    monkeypatch.setattr(limiter_module, "KEPT", 10)
    monkeypatch.setattr(tenancy, "SALTS_KEPT", 10)
    clock = Clock()
    limiter = Limiter(LocalCounters(clock), clock)
    limiter._seen = {}  # (as on shared counters)
    for i in range(100):
        plan = limiter._plan_of(f"key:k{i}", RateLimit(rpm=10))
        limiter._saw(plan[1], [5.0] * len(plan[1]))
    assert len(limiter._plans) <= 11 and len(limiter._seen) <= 11 + len(plan[1])
    salts = tenancy.CacheSalts("tenant", secret="s")
    first = salts.salt("key:k0")
    for i in range(100):
        salts.salt(f"key:k{i}")
    assert len(salts._salts) <= 11 and salts.salt("key:k0") == first  # (the same salt, made again)


def test_a_keys_requests_pass_the_path_budgets_set_after_its_lane_was_made(clock, counters):
    gate, key = _gate(counters, clock), _key(rpm=100, budgets=())
    first, _ = _request(gate, key, used=5)
    second, _ = _request(gate, key, used=5)  # the key's lane, kept by its principal
    gate.set_path_budgets([{"user_path": "/team", "period": "daily", "max_tokens": 50, "max_cost": None}])
    _request(gate, key, used=60)  # under the path's new budget: charged to it
    with pytest.raises(BudgetExceeded):
        _request(gate, key)
    gate.set_path_budgets([])
    assert _by_a_lane(_request(gate, key, used=60)[0])


def _used(ctx, total):
    """Complete C{ctx}'s request (L{_request}'s) as one that used C{total} tokens."""
    from gomodel.accounting.tokens import tokens_by_type

    ctx.usage = {"prompt_tokens": total - 1, "completion_tokens": 1, "total_tokens": total}
    ctx.token_counts = tokens_by_type(ctx.usage)


@pytest.mark.parametrize("path", ["lane", "general"])
def test_requests_in_flight_at_once_cannot_overshoot_a_budget_together(clock, counters, path):
    """Each request reserves its estimate (its prompt's bytes / 4 and its max_tokens: 19 here) from its budgets
    when it is admitted, and settles to what it used when it completes: a budget is spent once what was spent and
    what the requests in flight reserved reach it. Before, the budget was checked before and charged after, so
    requests admitted at once each saw the room left and all went (a budget of 100 let any number through).
    The general path (off the lanes: here a key whose path has a concurrency cap, refused once) reserves alike."""
    quotas = LimitsConfig(user_paths={"/team": RateLimit(concurrent=100)}) if path == "general" else None
    gate, key = _gate(counters, clock, quotas), _key(budgets=[{"period": "daily", "max_tokens": 100}])
    if path == "general":
        gate._lane = lambda *args: None  # (every admission down the general path)
    spent = [("key:k_1", Budget("daily", max_tokens=100))]
    inflight = [_request(gate, key)[0] for _ in range(6)]  # 0, 19, ..., 95 reserved before each: room
    assert fired(gate._book.spent(spent)) == [(6 * 19, 0.0)]
    with pytest.raises(BudgetExceeded) as info:
        _request(gate, key)
    assert info.value.status == 429 and info.value.code == "budget_exceeded"
    for ctx in inflight[:5]:
        _used(ctx, 5)
        gate.completed(ctx)
    inflight[5].replica = None  # (it never reached an upstream: nothing is charged, its reservation given back)
    gate.completed(inflight[5])
    assert fired(gate._book.spent(spent)) == [(25, 0.0)]
    ctx, _ = _request(gate, key, used=7)
    assert fired(gate._book.spent(spent)) == [(32, 0.0)]


def test_a_cost_budget_reserves_the_estimate_at_the_models_price(clock, counters):
    from gomodel.accounting.tokens import Pricing
    from gomodel.limits.gate import Gate

    pricing = Pricing({"vllm/m": {"input_per_mtok": 1_000_000, "output_per_mtok": 2_000_000}})  # 1 and 2 a token
    gate = Gate(Limiter(counters, clock), BudgetBook(counters, clock), LimitsConfig(), clock=clock, pricing=pricing)
    key = _key(budgets=[{"period": "daily", "max_cost": 100.0}])
    spent = [("key:k_1", Budget("daily", max_cost=100.0))]
    first, _ = _request(gate, key)  # 11 prompt tokens at 1, 8 output at 2: 27 reserved
    assert fired(gate._book.spent(spent)) == [(19, 27.0)]
    inflight = [_request(gate, key)[0] for _ in range(3)]  # 27, 54, 81: room
    with pytest.raises(BudgetExceeded):
        _request(gate, key)
    for ctx in [first] + inflight:
        _used(ctx, 2)  # 1 prompt token at 1, 1 output at 2: 3 each
        gate.completed(ctx)
    assert fired(gate._book.spent(spent)) == [(8, 12.0)]


def test_a_reservation_is_settled_in_the_period_its_request_began_in(counters, clock):
    """A request's reservation (the general path's: L{BudgetBook.reserve_now}) is taken in the period it is
    admitted in and settled there where the request began in it, though it ends in the next (a stream across
    midnight); one whose head came before the period's end and was admitted after gives back what it reserved in
    the new period and is charged to the one it began in, as the usage ledger dates it."""
    book = BudgetBook(counters, clock)
    scopes = [("key:k", [Budget("daily", max_tokens=100)])]
    day1, day2 = f"budget|key:k|daily|{int(T0)}", f"budget|key:k|daily|{int(T0) + 86400}"
    clock.advance(86400 - 1)  # 23:59:59 of the first day
    late = book.reserve_now(scopes, 19, 0.0)
    started = clock.seconds()
    clock.advance(2)  # 00:00:01 of the next
    early = book.reserve_now(scopes, 19, 0.0)
    assert counters.spent_all_now([day1, day2]) == [(19, 0.0), (19, 0.0)]
    assert fired(book.settle(late, 10, None, at=started)) is None
    assert fired(book.settle(early, 3, None, at=clock.seconds())) is None
    assert counters.spent_all_now([day1, day2]) == [(10, 0.0), (3, 0.0)]
    crossing = book.reserve_now(scopes, 19, 0.0)  # begun at 23:59:59, admitted now
    fired(book.settle(crossing, 7, None, at=started))
    assert counters.spent_all_now([day1, day2]) == [(17, 0.0), (3, 0.0)]


@pytest.mark.parametrize("path", ["lane", "general"])
def test_requests_in_flight_when_a_budget_is_seeded_again_are_charged_in_full_when_they_end(clock, counters, path):
    """A key's budgets edited while its requests are in flight: its sums are seeded again from the usage ledger at
    their next use (L{BudgetBook.renew}), which has none of those requests yet; each is charged what it used when
    it ends (before, the sum was set to the ledger's figure in place, losing what they had reserved, and their
    settlement then took that off it: three requests of 19 reserved, using 5 each, left the sum 42 short)."""
    from gomodel.limits.gate import Gate

    ledger = {"tokens": 30}
    book = BudgetBook(counters, clock, seed=lambda scope, since: (ledger["tokens"], 0.0), seed_counts_kept=True)
    gate = Gate(Limiter(counters, clock), book, LimitsConfig(), clock=clock)
    if path == "general":
        gate._lane = lambda *args: None  # (every admission down the general path)
    spent = [("key:k_1", Budget("daily", max_tokens=1000))]
    key = _key(budgets=[{"period": "daily", "max_tokens": 1000}])
    inflight = [_request(gate, key)[0] for _ in range(3)]  # 19 reserved each
    assert fired(book.spent(spent)) == [(30 + 3 * 19, 0.0)]
    edited = _key(budgets=[{"period": "daily", "max_tokens": 2000}])  # (the key ring's new principal)
    gate.renew("key:k_1")
    after, _ = _request(gate, edited)  # seeded again: the ledger's 30, and its own 19
    assert fired(book.spent(spent)) == [(30 + 19, 0.0)]
    for ctx in inflight + [after]:
        _used(ctx, 5)
        gate.completed(ctx)
    assert fired(book.spent(spent)) == [(30 + 4 * 5, 0.0)]
    ledger["tokens"] += 4 * 5  # (they are in the ledger now)
    ctx, _ = _request(gate, edited, used=7)  # the next requests are admitted and charged as before
    assert fired(book.spent(spent)) == [(30 + 4 * 5 + 7, 0.0)]
    assert _by_a_lane(ctx) == (path == "lane")


@pytest.mark.parametrize("price, spend", [(0.5, 60), (2.0, 25)], ids=["tokens", "cost"])
def test_a_lane_refuses_once_either_budget_of_one_period_is_spent(clock, counters, price, spend):
    """A key's token and cost budgets of one period share their sum: its lane refuses once either is spent, the
    tokens' (60 tokens at 0.5: a cost of 30) or the cost's (25 at 2: 50), as the general path does."""
    from gomodel.accounting.tokens import Pricing
    from gomodel.limits.gate import Gate

    per_mtok = price * 1_000_000
    pricing = Pricing({"vllm/m": {"input_per_mtok": per_mtok, "output_per_mtok": per_mtok}})
    gate = Gate(Limiter(counters, clock), BudgetBook(counters, clock), LimitsConfig(), clock=clock, pricing=pricing)
    key = _key(budgets=[{"period": "daily", "max_tokens": 60}, {"period": "daily", "max_cost": 40.0}])
    ctx, _ = _request(gate, key)
    assert _by_a_lane(ctx)
    _used(ctx, spend)
    gate.completed(ctx)
    spent = [("key:k_1", Budget("daily", max_tokens=60)), ("key:k_1", Budget("daily", max_cost=40.0))]
    assert fired(gate._book.spent(spent)) == [(spend, spend * price)] * 2
    with pytest.raises(BudgetExceeded):
        _request(gate, key)
    ctx, _ = _request(_gate(counters, clock), _key(budgets=[{"period": "daily", "max_tokens": 61}]))  # (room)


# --- a wall clock stepped back (NTP) ---------------------------------------------------------------------------


def test_a_clock_stepped_back_refuses_no_request_the_limits_had_room_for(limiter, counters, clock):
    """The wall clock steps back an hour: a bucket stored at a later time neither refills nor drains until the
    clock is past it again (what was used stays used), on admitting and on settling alike."""
    scopes = [("key:k_1", RateLimit(rpm=60, tpm=1000))]
    first = fired(limiter.admit(scopes, 100))
    clock.rightNow -= 3600
    second = fired(limiter.admit(scopes, 100))  # 59 requests and 900 tokens left: it fits
    assert counters.level("key:k_1|r60")[0] == 58 and counters.level("key:k_1|t60")[0] == 800
    clock.rightNow -= 3600  # and again before they settle
    fired(first.settle(10))  # 90 given back, with no refill since: 890
    fired(second.settle(100))
    assert counters.level("key:k_1|t60")[0] == 890
    for _ in range(58):
        fired(limiter.admit(scopes, 0))
    refused(limiter, scopes)  # what was used stays used
    clock.advance(1)  # a request a second again, from the stepped-back time on
    fired(limiter.admit(scopes, 0))


def test_a_smaller_clock_step_back_that_leaves_room_costs_a_bucket_nothing(limiter, counters, clock):
    """The wall clock steps back 10 s, a bucket still has room for the request: it is read at its level when
    stored, not drained by the step's refill (before, it lost 10 s of refill: 10 requests and 166 tokens)."""
    scopes = [("key:k_1", RateLimit(rpm=60, tpm=1000))]
    fired(limiter.admit(scopes, 100))
    clock.rightNow -= 10
    fired(limiter.admit(scopes, 100))
    assert counters.level("key:k_1|r60")[0] == 58 and counters.level("key:k_1|t60")[0] == 800


def test_a_keys_lane_loses_no_refill_to_a_smaller_clock_step_back(clock, counters):
    """A key's lane reads a bucket stored after a clock stepped back 10 s at its stored level, when the request
    fits as when it does not (before, a request that fitted took the step's refill off the bucket)."""
    gate, key = _gate(counters, clock), _key(rpm=60, tpm=1000, budgets=[])
    _request(gate, key, max_tokens=8, used=5)
    clock.rightNow -= 10
    ctx, _ = _request(gate, key, max_tokens=8)
    assert _by_a_lane(ctx) and counters.level("key:k_1|r60")[0] == 58


def test_a_keys_lane_admits_and_settles_across_a_clock_stepped_back(clock, counters):
    """A key's lane (its buckets' cells written in place) takes and settles as the general path does when the
    wall clock steps back: an hour back does not refuse the key until its buckets refill."""
    gate, key = _gate(counters, clock), _key(rpm=3, tpm=1000, budgets=[])
    ctx, _ = _request(gate, key, max_tokens=8, used=5)
    assert _by_a_lane(ctx)
    clock.rightNow -= 3600
    ctx, _ = _request(gate, key, max_tokens=8)
    assert _by_a_lane(ctx) and counters.level("key:k_1|r60")[0] == 1
    clock.rightNow -= 3600  # and again while it is in flight: its settling loses nothing either
    ctx.usage = {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
    gate.completed(ctx)
    assert counters.level("key:k_1|t60")[0] == 990
    _request(gate, key, max_tokens=8, used=5)
    with pytest.raises(RateLimitExceeded):
        _request(gate, key, max_tokens=8)
