"""The tests' own helpers (tests/support.py), where a wrong helper would let a failing test pass."""

import pytest
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.task import Clock

from tests.support import with_timeout


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
