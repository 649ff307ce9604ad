"""How pytest-xdist deals the suite to its workers under C{-n 4 --dist loadgroup} (pytest.ini says why not by default).

Tests go one by one to whichever worker is free, except one group that one worker runs whole, in order: the real-vLLM
suite (its four servers are shared, its last tests restart them), then the browser's module (one gateway and one
Chromium for all its tests). They share a worker so that the vLLM servers' CPU inference never runs beside Chromium
(in CI, beside it, a page's live update took over 20 s: the browser's waits timed out). Named by path: xdist's own
C{xdist_group} mark renames a test's node id, which pytest 9 no longer lets a plugin do, so the controlling process
(which collects nothing) could not see it.
"""

from xdist.scheduler import LoadGroupScheduling

GROUPS = {
    "tests/integration/": "vllm-then-chromium",
    "tests/test_dashboard_browser.py::": "vllm-then-chromium",
}


class PathGroupScheduling(LoadGroupScheduling):
    """xdist's C{loadgroup}, its groups named by L{GROUPS}."""

    def _split_scope(self, nodeid):
        for prefix, group in GROUPS.items():
            if nodeid.startswith(prefix):
                return group
        return super()._split_scope(nodeid)


def pytest_xdist_make_scheduler(config, log):
    """L{PathGroupScheduling} for C{--dist loadgroup}; xdist's own scheduler for any other mode."""
    if config.getvalue("dist") == "loadgroup":
        return PathGroupScheduling(config, log)
    return None
