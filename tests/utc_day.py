"""The C{utc_day} mark: a test that spends a daily budget (or an hourly rate limit) through a gateway (whose clock
is its reactor's, the wall clock: no other can be given it) is run again, its fixtures made anew, when it failed
and UTC's hour changed while it ran (its budget was the day's or the hour's before: a new one is unspent). A second
run, begun in the new hour, cannot meet another. L{tests.support.within_one_day} is the same for a part of a test."""

from datetime import datetime, timezone

import pytest
from _pytest.runner import runtestprotocol


def today():
    """UTC's date and hour now (the day a daily budget counts, the hour an hourly limit does)."""
    return datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)


def pytest_configure(config):
    config.addinivalue_line("markers", "utc_day: run the test again, its fixtures anew, when it failed and UTC's "
                                       "hour changed while it ran (it spends a daily budget or an hourly limit)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Run a C{utc_day} test (setup, call, teardown), and again when it failed across an hour's end; report only the
    run that counts. Any other test: pytest's own protocol."""
    if item.get_closest_marker("utc_day") is None:
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    day = today()
    reports = runtestprotocol(item, nextitem=nextitem, log=False)
    if any(report.failed for report in reports) and today() != day:
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
