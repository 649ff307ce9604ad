"""The streaming load generator's checks (bench/streamload.mjs): its self-test
(bench/streamload_selftest.mjs) serves good streams of each kind, framed every way
the client must read, and broken ones (truncated, wrong text, missing usage,
missing [DONE], an error event, a 500, ...) from a local server, and fails unless
every good one passes and every broken one is an error with the expected message.
"""

import os
import shutil
import subprocess

import pytest

SELFTEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "streamload_selftest.mjs")


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH (the bench's load generator runs on it)")
def test_streamload_catches_every_broken_stream():
    r = subprocess.run(["node", SELFTEST], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "runs as expected" in r.stdout
