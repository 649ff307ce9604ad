"""tests/scheduling.py in real pytest-xdist sessions (pytester, one subprocess each, three workers).

A project shaped like this one: eight other tests, the browser's module (two tests, a group run whole on one worker)
and the held group (three tests in C{tests/integration/}). Its conftest writes each test's start and end, on the worker, to one file: the order of its lines
is the order of the events, whichever worker wrote them.
"""

import os

import pytest

from tests.scheduling import GROUPS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFTEST = """
import os

WORKER = None


def pytest_configure(config):
    global WORKER
    WORKER = getattr(config, "workerinput", {}).get("workerid")  # None in the controlling process


def _record(event, nodeid):
    if WORKER:
        with open(os.path.join(os.path.dirname(__file__), "events"), "a") as f:
            f.write(f"{event} {nodeid} {WORKER}\\n")


def pytest_runtest_logstart(nodeid, location):
    _record("start", nodeid)


def pytest_runtest_logfinish(nodeid, location):
    _record("end", nodeid)


def pytest_testnodedown(node, error):
    # (in the controlling process: a worker ended, every event of its tests already handed to the scheduler)
    open(os.path.join(os.path.dirname(__file__), "ended-" + node.gateway.id), "w").close()
"""

# A test named by FAIL fails; one named by CRASH ends its worker's process, once (xdist runs it again); one named
# by CRASH_ALONE does so once every other worker has ended (waiting at most a minute for them).
TESTS = """
import os
import time

import pytest


def others_ended():
    me, count = os.environ["PYTEST_XDIST_WORKER"], int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    return all(os.path.exists(f"ended-gw{{n}}") for n in range(count) if f"gw{{n}}" != me)


@pytest.mark.parametrize("i", range({count}))
def test_{name}(i):
    if os.environ.get("CRASH_ALONE") == f"{name}-{{i}}" and not os.path.exists("crashed"):
        deadline = time.monotonic() + 60
        while not others_ended():
            assert time.monotonic() < deadline, "the other workers never ended"
            time.sleep(0.05)
        os.environ["CRASH"] = f"{name}-{{i}}"
    if os.environ.get("CRASH") == f"{name}-{{i}}" and not os.path.exists("crashed"):
        open("crashed", "w").close()
        os._exit(1)
    assert os.environ.get("FAIL") != f"{name}-{{i}}"
"""

HELD = [f"tests/integration/test_vllm.py::test_vllm[{i}]" for i in range(3)]
BROWSER = [f"tests/test_dashboard_browser.py::test_browser[{i}]" for i in range(2)]


@pytest.fixture
def project(pytester, monkeypatch):
    """The project; a function that runs it under C{-n 3 --dist loadgroup} with the given arguments and environment
    and returns its result and its workers' events, C{(event, nodeid, worker)} in order."""
    assert {"tests/integration/", "tests/test_dashboard_browser.py::"} <= set(GROUPS)
    pytester.makeini("[pytest]\n")
    pytester.makeconftest(CONFTEST)
    for path, name, count in [("tests/test_one.py", "one", 4), ("tests/zz/test_two.py", "two", 4),
                              ("tests/integration/test_vllm.py", "vllm", 3),
                              ("tests/test_dashboard_browser.py", "browser", 2)]:
        (pytester.path / path).parent.mkdir(parents=True, exist_ok=True)
        (pytester.path / path).write_text(TESTS.format(name=name, count=count))
    # Only xdist and the scheduler (not every installed plugin: the run takes half the time); this repository's
    # tests package, the scheduler's, before the project's own tests/ folder (a namespace package).
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("PYTHONPATH", REPO)

    def run(*args, **env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        result = pytester.runpytest_subprocess("-p", "xdist.plugin", "-p", "tests.scheduling", "-n", "3",
                                               "--dist", "loadgroup", "-p", "no:cacheprovider", *args, timeout=120)
        events = pytester.path / "events"
        return result, [tuple(line.split()) for line in events.read_text().splitlines()] if events.exists() else []

    return run


def _held(nodeid):
    return nodeid.startswith("tests/integration/")


def _assert_quiet_stage(events):
    """Every held test started after every other test had ended, all on one worker (or on the one replacing it)."""
    held_starts = [i for i, (event, nodeid, _) in enumerate(events) if event == "start" and _held(nodeid)]
    other_ends = [i for i, (event, nodeid, _) in enumerate(events) if event == "end" and not _held(nodeid)]
    assert held_starts and other_ends
    assert min(held_starts) > max(other_ends), events


def test_the_held_group_runs_whole_on_one_worker_after_every_other_test_has_ended(project):
    result, events = project()

    result.assert_outcomes(passed=13)
    _assert_quiet_stage(events)
    for group in (HELD, BROWSER):
        runs = [(event, nodeid, worker) for event, nodeid, worker in events if nodeid in group]
        assert [nodeid for event, nodeid, _ in runs if event == "start"] == group
        assert len({worker for _, _, worker in runs}) == 1


def test_a_session_of_the_held_group_alone_runs_it(project):
    result, events = project("tests/integration")

    result.assert_outcomes(passed=3)
    assert [nodeid for event, nodeid, _ in events if event == "start"] == HELD


def test_a_session_without_the_held_group_runs_the_others(project):
    result, events = project("--ignore=tests/integration")

    result.assert_outcomes(passed=10)
    assert not [nodeid for _, nodeid, _ in events if _held(nodeid)]


def test_a_failure_under_x_stops_the_session_before_the_held_group(project):
    result, events = project("-x", FAIL="one-1")

    assert result.ret == pytest.ExitCode.INTERRUPTED  # as xdist ends any session that -x stops
    result.stdout.fnmatch_lines(["*stopping after 1 failures*"])
    assert not [nodeid for _, nodeid, _ in events if _held(nodeid)]


@pytest.mark.parametrize("crash", ["two-1", "vllm-1"])
def test_a_crashed_worker_is_replaced_and_the_session_ends(project, crash):
    """xdist reports the test that was running as failed, starts a new worker, and runs that test again; the held
    group still starts after every other test (those the crashed worker had not run went back to the queue)."""
    result, events = project(CRASH=crash)

    assert result.ret == 1
    result.stdout.fnmatch_lines(["*replacing crashed worker*", "*crashed while running*"])
    result.assert_outcomes(passed=13, failed=1)
    _assert_quiet_stage(events)


def test_a_worker_crashed_once_the_others_ended_for_the_held_group_is_replaced_and_the_session_ends(project):
    """The worker kept for the quiet stage crashes in a test of the others, the held group already sent to it and
    the other workers ended: its replacement, alone, is sent back what it had not run, the held group too, and runs
    it all. (It was sent the crashed test alone, as xdist sends one unit, and waited forever: a worker runs its last
    test only once it is sent more or told to stop.) The browser's group, the largest unit, goes to the first
    worker, which the stage keeps; its last test crashes once the controlling process has had the two others end."""
    result, events = project(CRASH_ALONE="browser-1")

    result.stdout.fnmatch_lines(["*replacing crashed worker*", "*crashed while running*browser*"])
    result.assert_outcomes(passed=13, failed=1)
    _assert_quiet_stage(events)
    crashed = [worker for event, nodeid, worker in events if event == "start" and nodeid == BROWSER[1]]
    assert len(crashed) == 2 and crashed[0] != crashed[1]  # run again on the replacement
    assert {worker for _, nodeid, worker in events if _held(nodeid)} == {crashed[1]}
