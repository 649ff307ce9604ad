"""C{GOMODEL_REQUIRE_VLLM=1} (CI): any skipped integration test fails the session.

These hooks live in C{tests/conftest.py}'s namespace, not in the integration conftest: under pytest-xdist the
controlling process collects nothing, so only the conftest it loads at start sees every worker's reports (an
integration test's report carries the C{integration} keyword its marker gave it).
"""

from tests.integration.support import env_flag

_skipped = []


def pytest_runtest_logreport(report):
    if report.skipped and "integration" in report.keywords and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _skipped and env_flag("GOMODEL_REQUIRE_VLLM"):
        tr = terminalreporter
        tr.section("GOMODEL_REQUIRE_VLLM=1: integration tests were skipped", sep="=", red=True, bold=True)
        reasons = {}
        for nodeid, reason in _skipped:
            reasons.setdefault(reason, []).append(nodeid)
        for reason, nodeids in reasons.items():
            tr.write_line(f"{len(nodeids)} skipped: {reason}", red=True)
        tr.write_line("The session fails: CI requires the real vLLM suite to run.", red=True)


def pytest_sessionfinish(session, exitstatus):
    if _skipped and env_flag("GOMODEL_REQUIRE_VLLM") and session.exitstatus == 0:
        session.exitstatus = 1
