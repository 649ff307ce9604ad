"""Timeouts on one reactor timer (gomodel.timers), on a fake clock."""

import pytest
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout
from twisted.internet.task import Clock

from gomodel.timers import Timers
from gomodel.upstream.client import within


def test_each_timeout_fires_at_its_time_on_one_clock_timer():
    clock = Clock()
    timers = Timers(clock)
    fired = []
    timers.callLater(10, fired.append, "ten")
    timers.callLater(5, fired.append, "five")  # earlier: the one timer moves to it
    timers.callLater(10, fired.append, "ten again")
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(4.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == ["five"]
    clock.advance(5)
    assert fired == ["five", "ten", "ten again"]
    assert not clock.getDelayedCalls()  # nothing pending: nothing set


def test_a_cancelled_timeout_never_fires_and_the_timer_moves_on_to_the_next():
    clock = Clock()
    timers = Timers(clock)
    fired = []
    first = timers.callLater(1, fired.append, 1)
    second = timers.callLater(3, fired.append, 3)
    assert first.active() and second.active()
    first.cancel()
    first.cancel()  # again: nothing
    assert not first.active()
    clock.advance(1)  # the timer set for the first finds nothing due, and is set for the second
    assert fired == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(2)
    assert fired == [3] and not second.active()
    second.cancel()  # after it fired: nothing


def test_timeouts_due_together_fire_in_time_order_and_one_cancelled_by_an_earlier_ones_call_never_fires():
    """The timer may come late (a busy reactor; a fake clock advanced past several): the timeouts due by then are
    called in their times' order, and one that the call of another cancels is not called (as the reactor's
    DelayedCalls would do)."""
    clock = Clock()
    timers = Timers(clock)
    fired = []
    later = timers.callLater(8, fired.append, "eight")
    timers.callLater(7, lambda: (fired.append("seven"), later.cancel()))
    timers.callLater(7.5, fired.append, "seven and a half")
    timers.callLater(20, fired.append, "twenty")
    clock.advance(10)  # all but the last due at once
    assert fired == ["seven", "seven and a half"]
    assert not later.active() and len(clock.getDelayedCalls()) == 1
    clock.advance(10)
    assert fired == ["seven", "seven and a half", "twenty"] and not clock.getDelayedCalls()


def test_a_failing_call_is_logged_and_the_others_still_run(logged_errors):
    clock = Clock()
    timers = Timers(clock)
    fired = []
    timers.callLater(1, lambda: 1 / 0)
    timers.callLater(1, fired.append, "after")
    clock.advance(1)
    assert fired == ["after"]
    assert logged_errors.flush(ZeroDivisionError) == 1


def test_stopping_drops_what_is_pending():
    clock = Clock()
    timers = Timers(clock)
    timers.startService()
    fired = []
    pending = timers.callLater(1, fired.append, 1)
    timers.stopService()
    assert not clock.getDelayedCalls() and not pending.active()
    clock.advance(5)
    assert fired == []


def test_a_timeout_on_timers_times_out_or_settles():
    clock = Clock()
    timers = Timers(clock)
    slow = Deferred.fromCoroutine(within(Deferred(), 30, timers))
    clock.advance(29.999)
    assert not slow.called
    clock.advance(0.001)
    with pytest.raises(DeferredTimeout):
        slow.result.raiseException()
    slow.addErrback(lambda _: None)
    quick = Deferred()
    answered = Deferred.fromCoroutine(within(quick, 30, timers))
    quick.callback("answer")
    assert answered.result == "answer"
    clock.advance(60)
    assert not clock.getDelayedCalls()


@pytest.mark.parametrize("kind", ["clock", "timers"])
def test_within_tells_its_timeout_from_a_cancellation_by_the_caller_on_either_clock(kind):
    """It knows it timed out by its timer having fired (a DelayedCall called, a Timers' timeout
    inactive): a cancellation from outside before then stays a CancelledError, and nothing is left."""
    clock = Clock()
    on = clock if kind == "clock" else Timers(clock)
    upstream = Deferred()
    waiting = Deferred.fromCoroutine(within(upstream, 30, on))
    waiting.cancel()  # the client left: what it waits on is cancelled
    with pytest.raises(CancelledError):
        waiting.result.raiseException()
    waiting.addErrback(lambda _: None)
    clock.advance(30)  # its timeout was dropped: nothing fires, nothing is set again
    assert not clock.getDelayedCalls()
    cancelled_by_timer = Deferred.fromCoroutine(within(Deferred(), 30, on))
    clock.advance(30)
    with pytest.raises(DeferredTimeout):
        cancelled_by_timer.result.raiseException()
    cancelled_by_timer.addErrback(lambda _: None)
    assert not clock.getDelayedCalls()
