"""The C{utc_day} mark (L{tests.utc_day}), in a pytest run of its own."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN = textwrap.dedent('''
    from datetime import date
    import os

    import pytest

    from tests import utc_day

    def ran(name):
        with open(os.environ["RUNS"], "a") as f:
            f.write(name + "\\n")

    @pytest.fixture
    def budget():
        ran("fixture")  # (made anew for each run)
        return {"spent": 0}

    @pytest.mark.utc_day
    def test_met_midnight(budget):
        budget["spent"] += 1
        ran("met_midnight")
        if budget["spent"] == 1 and utc_day.today() != date(2100, 1, 2):
            utc_day.today = lambda: date(2100, 1, 2)  # the day ended while it ran
            assert False, "spent yesterday's budget"

    @pytest.mark.utc_day
    def test_failed_within_its_day():
        ran("within_its_day")
        assert False, "a failure of its own"

    def test_unmarked_met_midnight():
        ran("unmarked")
        utc_day.today = lambda: date(2100, 1, 3)
        assert False, "not run again"
''')


def test_a_marked_test_that_failed_across_midnight_runs_again_with_new_fixtures(tmp_path):
    """A C{utc_day} test that failed while UTC's day changed is run once more, its fixtures anew, and that run
    is the one reported; one that failed within its day, or an unmarked one, is reported failed, run once."""
    (tmp_path / "test_days.py").write_text(RUN)
    runs = tmp_path / "runs"
    env = dict(os.environ, RUNS=str(runs), PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.utc_day",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_days.py")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert "2 failed, 1 passed" in done.stdout, done.stdout + done.stderr
    assert "spent yesterday's budget" not in done.stdout
    assert runs.read_text().split() == ["fixture", "met_midnight", "fixture", "met_midnight", "within_its_day",
                                        "unmarked"]
