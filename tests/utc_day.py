"""The C{utc_day} mark: a test that spends a daily budget through a gateway (whose clock is its reactor's, the
wall clock: no other can be given it) is run again, its fixtures made anew, when it failed and UTC's day changed
while it ran (its budget was the day before's: a new day's is unspent). A second run, begun in the new day,
cannot meet another midnight. L{tests.support.within_one_day} is the same for a part of a test."""

from datetime import datetime, timezone

import pytest
from _pytest.runner import runtestprotocol


def today():
    """UTC's date now (the day a daily budget counts)."""
    return datetime.now(timezone.utc).date()


def pytest_configure(config):
    config.addinivalue_line("markers", "utc_day: run the test again, its fixtures anew, when it failed and UTC's "
                                       "day changed while it ran (it spends a daily budget)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Run a C{utc_day} test (setup, call, teardown), and again when it failed across a midnight; report only the
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
