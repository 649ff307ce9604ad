"""How pytest-xdist deals the suite to its workers under pytest.ini's C{-n 4 --dist loadgroup}.

Tests go one by one to whichever worker is free, except two groups that one worker runs whole, in order: the browser's
module (one gateway and one Chromium for all its tests), and L{HELD}, the real-vLLM suite (its four servers are shared,
its last tests restart them), kept for a quiet stage. Once every other test has ended, the browser's too, one worker
runs L{HELD} and the other workers are shut down: the vLLM servers' CPU inference and its timing bounds (a disconnect
test's abort before half of the tokens: it came late in one of three CI runs beside the other workers) have nothing
beside them, and Chromium never has the inference beside it (in CI, beside it, a page's live update took over 20 s).
A scale-out test whose gateways must fence a paused host's batch in time (a lease's lapse, three twistd processes
starting) runs in it too, after the vLLM suite: beside the other workers' load it hit its 20 s wait. (Its neighbour,
whose gateway gets its database back after its connections are killed, ran here until its store's pool stopped
waiting a second and more per dead connection.) Named by path: xdist's own C{xdist_group} mark renames a test's
node id, which pytest 9 no longer lets a plugin do, so the controlling process (which collects nothing) could not see
it.

Built on xdist 3's C{LoadScopeScheduling} (setup.py pins C{<4}), relying on its private parts: C{workqueue} (an
ordered dict, unit name -> C{{nodeid: ended}}, whose first unit C{_assign_work_unit} pops and sends),
C{assigned_work} (worker -> the units it was sent), C{registered_collections} and C{_pending_of}; and overriding
C{_assign_work_unit} (called by C{schedule} and C{_reschedule}), C{_reschedule} (called after each test's end, a
worker's crash and a new worker's collection) and C{remove_node} (a worker's end or crash).
"""

from xdist.scheduler import LoadGroupScheduling

HELD = "vllm"

GROUPS = {
    "tests/integration/": HELD,
    "tests/test_scaleout.py::test_a_paused_host_loses_its_batch_to_another_and_its_late_writes_are_fenced": HELD,
    "tests/test_dashboard_browser.py::": "chromium",
}


class PathGroupScheduling(LoadGroupScheduling):
    """xdist's C{loadgroup}, its groups named by L{GROUPS}, L{HELD} run last on a worker of its own."""

    def _split_scope(self, nodeid):
        for prefix, group in GROUPS.items():
            if nodeid.startswith(prefix):
                return group
        return super()._split_scope(nodeid)

    def _assign_work_unit(self, node):
        """xdist's, but L{HELD} is kept last (a crashed worker's units come back behind it) and sent to C{node}
        only once every other worker's tests have ended."""
        if HELD in self.workqueue:
            self.workqueue.move_to_end(HELD)
            if len(self.workqueue) == 1 and not self._others_ended(node):
                return
        try:
            super()._assign_work_unit(node)
        except OSError:  # (execnet's "cannot send": it crashed after its last test's end, before xdist heard of it)
            node.unreachable = True  # what it was given comes back with its crash (C{remove_node}), as what it held

    def _reschedule(self, node):
        """xdist's, but a worker is sent units until it holds more than two tests (xdist sends one a test's end, and
        a worker runs its last test only once it is sent more or told to stop: a crashed worker's replacement, alone
        once the others were shut down for L{_stage}, waited forever on one); then, once L{HELD} is all that is
        left, L{_stage}, whichever worker's event called it."""
        if not self._held_alone():
            super()._reschedule(node)
            while (self.workqueue and not self._held_alone() and not node.shutting_down
                   and not getattr(node, "unreachable", False) and self._pending_of(self.assigned_work[node]) <= 2):
                self._assign_work_unit(node)
        if self._held_alone():
            self._stage()

    def _held_alone(self):
        return len(self.workqueue) == 1 and HELD in self.workqueue

    def _stage(self):
        """Only L{HELD} is left: keep one worker, shut the others down (each ends its tests, then exits: a worker
        runs its last test only once it is sent more or told to stop), and send the group to the one kept when
        they are done. Nothing while the session stops (C{-x}, a signal: every worker is shutting down)."""
        live = [n for n in self.nodes if not n.shutting_down and n in self.registered_collections]
        if not live:
            return
        stage, *others = live
        for other in others:
            other.shutdown()
        if self._others_ended(stage):
            self._assign_work_unit(stage)
            stage.shutdown()

    def _others_ended(self, node):
        return not any(self._pending_of(work) for other, work in self.assigned_work.items() if other is not node)

    def remove_node(self, node):
        """xdist's, but of a crashed worker's units only those not ended go back to the queue: xdist puts back
        every unit it was sent, and one whose tests have all ended gives the worker it is sent to nothing to run
        (xdist 3.8's C{loadgroup} then waits for that worker forever)."""
        work = self.assigned_work[node]
        for unit in [unit for unit, tests in work.items() if all(tests.values())]:
            del work[unit]
        return super().remove_node(node)


def pytest_xdist_make_scheduler(config, log):
    """L{PathGroupScheduling} for C{--dist loadgroup}; xdist's own scheduler for any other mode."""
    if config.getvalue("dist") == "loadgroup":
        return PathGroupScheduling(config, log)
    return None
