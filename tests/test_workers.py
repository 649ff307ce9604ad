"""--workers: several processes on one port (SO_REUSEPORT), supervised by the first."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from gomodel.workers import parse_tcp, worker_argv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_tcp_descriptions():
    assert parse_tcp("tcp:8080") == (8080, "", 511)
    assert parse_tcp("tcp:port=0:interface=127.0.0.1:backlog=64") == (0, "127.0.0.1", 64)
    assert parse_tcp(r"tcp:9000:interface=\:\:1") == (9000, "::1", 511)
    for bad in ("unix:/tmp/s", "ssl:443", "tcp:80:reuse=1"):
        with pytest.raises(ValueError):
            parse_tcp(bad)


def test_worker_command_line_drops_the_primarys_listen_and_workers():
    argv = worker_argv(["--workers", "3", "--listen", "tcp:80", "--config=g.yaml", "--listen=tcp:81", "-w", "2"])
    assert argv[-3:] == ["gomodel", "--worker-child", "--config=g.yaml"]


def listening_pids(port):
    """PIDs holding a LISTEN socket on C{port} (from /proc, no tools needed)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    pids.add(int(pid))
        except OSError:
            continue
    return pids


def wait_until(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_primary(tmp_path):
    """C{twistd -n gomodel --workers 2} on a free loopback port: (process, log path, port)."""
    log_path = tmp_path / "gateway.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "GOMODEL_", "PROMETHEUS_"))}
    env.update({"PYTHONPATH": REPO, "GOMODEL_DATA_DIR": str(tmp_path / "data")})
    with open(log_path, "wb") as log:
        primary = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "gomodel", "--workers", "2", "--listen", "tcp:0:interface=127.0.0.1"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(tmp_path))
    try:
        port = int(wait_until(lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text()),
                              what="the primary to listen").group(1))
    except BaseException:
        primary.kill()
        primary.wait()
        raise
    return primary, log_path, port


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_two_workers_share_the_port_and_follow_the_primary(tmp_path):
    primary, log_path, port = start_primary(tmp_path)
    try:
        pids = wait_until(lambda: (lambda p: p if len(p) == 2 else None)(listening_pids(port)),
                          what="two processes listening")
        assert primary.pid in pids
        [worker] = pids - {primary.pid}

        os.kill(worker, signal.SIGKILL)  # a worker that dies is replaced
        replaced = wait_until(lambda: (lambda p: p if len(p) == 2 and worker not in p else None)(listening_pids(port)),
                              what="the worker to be restarted")
        [worker] = replaced - {primary.pid}

        primary.send_signal(signal.SIGTERM)  # the primary's stop takes the workers down
        assert primary.wait(timeout=20) == 0  # drained: a clean exit, not the signal's status
        wait_until(lambda: not os.path.exists(f"/proc/{worker}") or _zombie(worker), what="the worker to exit")
    finally:
        if primary.poll() is None:
            primary.kill()
            primary.wait()
    text = log_path.read_text()
    assert "worker 1 started" in text and "restarting it" in text
    assert "Server Shut Down" in text


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_scrape_sums_the_metrics_of_every_worker(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from tests.integration.support import request

    primary, _, port = start_primary(tmp_path)
    try:
        wait_until(lambda: len(listening_pids(port)) == 2, what="two processes listening")
        for _ in range(20):  # new connections: the kernel spreads them over both processes
            assert request("GET", f"http://127.0.0.1:{port}/v1/models").status == 200

        def models_requests():
            text = request("GET", f"http://127.0.0.1:{port}/metrics").body.decode()
            return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                       if s.name == "gomodel_requests_total" and s.labels.get("status_code") == "200"
                       and s.labels.get("endpoint") == "other")

        # Each process flushes what its requests added every second (and before answering a scrape).
        wait_until(lambda: models_requests() == 20.0, what="every process's requests counted")
        assert {models_requests() for _ in range(6)} == {20.0}  # whichever process answers, all are counted
    finally:
        primary.send_signal(signal.SIGTERM)
        assert primary.wait(timeout=30) == 0
