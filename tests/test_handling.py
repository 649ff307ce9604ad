"""A route's handler run without a Deferred of its own (gomodel.http.handling), against what
Deferred.fromCoroutine does with the same coroutines."""

import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.python.failure import Failure

from gomodel.http.handling import Handling


def _run(coro):
    """Start C{coro} in a L{Handling}; returns it and the list its outcomes go to."""
    outcomes = []
    handling = Handling(lambda outcome, arg: outcomes.append((outcome, arg)), "arg")
    handling.start(coro)
    return handling, outcomes


def test_what_it_returns_at_once_goes_to_done_with_the_arg():
    async def handler():
        return await succeed(b"body")  # fired already: no wait

    _, outcomes = _run(handler())
    assert outcomes == [(b"body", "arg")]


def test_it_resumes_with_what_the_awaited_deferred_fires_with():
    upstream = Deferred()
    seen = []

    async def handler():
        seen.append(await upstream)
        return b"done"

    _, outcomes = _run(handler())
    assert outcomes == []
    upstream.callback("answer")
    assert seen == ["answer"] and outcomes == [(b"done", "arg")]
    assert upstream.result is None  # its outcome was taken: nothing left to log


def test_a_failure_is_raised_where_it_waits_and_what_escapes_goes_to_done_as_a_failure():
    first, second = Deferred(), Deferred()
    caught = []

    async def handler():
        try:
            await first
        except ValueError as e:
            caught.append(str(e))
        await second

    _, outcomes = _run(handler())
    first.errback(ValueError("first"))
    assert caught == ["first"] and outcomes == []
    second.errback(KeyError("second"))
    [(outcome, arg)] = outcomes
    assert isinstance(outcome, Failure) and outcome.check(KeyError) and arg == "arg"
    assert second.result is None  # handled by the handler's outcome, not left unhandled


def test_what_it_raises_before_waiting_goes_to_done_as_a_failure():
    async def handler():
        raise ValueError("bad body")

    _, outcomes = _run(handler())
    [(outcome, _)] = outcomes
    assert outcome.check(ValueError) and str(outcome.value) == "bad body"


def test_cancel_cancels_what_it_waits_on_and_the_coroutine_hears_it_there():
    cancelled = []
    upstream = Deferred(cancelled.append)  # its canceller: the upstream connection closes

    async def handler():
        try:
            await upstream
        except CancelledError:
            return "cleaned up"

    handling, outcomes = _run(handler())
    handling.cancel()
    assert cancelled == [upstream]
    assert outcomes == [("cleaned up", "arg")]
    handling.cancel()  # once ended: nothing
    assert outcomes == [("cleaned up", "arg")]


def test_cancel_as_deferred_from_coroutine_does():
    """The same coroutine, cancelled, ends the same under both."""
    def make():
        upstream = Deferred()

        async def handler():
            await upstream

        return handler()

    d = Deferred.fromCoroutine(make())
    twisted_outcome = []
    d.addBoth(twisted_outcome.append)
    d.cancel()
    handling, outcomes = _run(make())
    handling.cancel()
    assert twisted_outcome[0].check(CancelledError)
    assert outcomes[0][0].check(CancelledError)


def test_awaiting_what_is_not_a_deferred_is_a_type_error_where_it_waits():
    class NotADeferred:
        def __await__(self):
            yield "something else"

    async def handler():
        with pytest.raises(TypeError, match="not a Deferred"):
            await NotADeferred()
        return "went on"

    _, outcomes = _run(handler())
    assert outcomes == [("went on", "arg")]


def test_it_waits_on_each_deferred_in_turn():
    ds = [Deferred() for _ in range(3)]

    async def handler():
        total = 0
        for d in ds:
            total += await d
        return total

    handling, outcomes = _run(handler())
    for i, d in enumerate(ds):
        assert outcomes == []
        d.callback(i + 1)
    assert outcomes == [(6, "arg")]
