"""A real Redis Cluster of the tests' own: three masters (C{redis-server --cluster-enabled yes}) on free ports of
127.0.0.1, joined by C{redis-cli --cluster create}; the test is skipped where C{redis-server} or C{redis-cli} is
not installed."""

import os
import shutil
import socket
import subprocess
import time

import pytest


def free_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on now (the kernel's choice, bound and let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisCluster:
    """Three masters, no replicas, every slot covered; C{url} names one node (as a configuration endpoint does),
    C{ports} all three. L{stop} kills them by their PIDs and removes their directory."""

    def __init__(self, directory, masters=3):
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            pytest.skip("redis-server and redis-cli are needed for a Redis Cluster")
        self.directory = str(directory)
        self.processes = []
        self.ports = []
        try:
            for _ in range(masters):
                self._node(server)
            self._wait(lambda port: self._ping(cli, port), "the nodes did not start")
            create = subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                                     "--cluster-replicas", "0", "--cluster-yes"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
            if create.returncode:
                raise RuntimeError("redis-cli --cluster create failed: " + create.stdout.decode(errors="replace"))
            self._wait(lambda port: b"cluster_state:ok" in subprocess.run(
                [cli, "-p", str(port), "cluster", "info"], stdout=subprocess.PIPE, timeout=5).stdout,
                "the cluster did not come to cluster_state:ok")
        except BaseException:
            self.stop()
            raise
        self.url = f"redis://127.0.0.1:{self.ports[0]}"

    def _node(self, binary):
        port, bus = free_port(), free_port()
        while bus == port:
            bus = free_port()
        self.ports.append(port)
        self.processes.append(subprocess.Popen(
            [binary, "--port", str(port), "--cluster-enabled", "yes", "--cluster-config-file",
             os.path.join(self.directory, f"nodes-{port}.conf"), "--cluster-port", str(bus), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.directory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    @staticmethod
    def _ping(cli, port) -> bool:
        return subprocess.run([cli, "-p", str(port), "ping"], stdout=subprocess.PIPE, timeout=5).stdout.strip() \
            == b"PONG"

    def _wait(self, ready, what, limit=20.0):
        deadline = time.monotonic() + limit
        while not all(ready(port) for port in self.ports):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                raise RuntimeError(what)
            time.sleep(0.05)

    def client(self):
        """A redis-py cluster client of it (the test's own, to read and clean up what the gateway wrote)."""
        from redis.cluster import RedisCluster as Client

        return Client.from_url(self.url, socket_timeout=5)

    def stop(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
