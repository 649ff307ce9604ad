"""The real Redis the tests that need one use (C{GOMODEL_TEST_REDIS_URL}, default 127.0.0.1:6379, db 0)."""

import os
import uuid
from contextlib import contextmanager

import pytest

REDIS_URL = os.environ.get("GOMODEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_client():
    """A redis-py client of the test Redis; the test is skipped (with why) when Redis does not answer."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as e:
        client.close()
        pytest.skip(f"Redis is not reachable at {REDIS_URL} ({e}); these tests need a real Redis")
    return client


@contextmanager
def fresh_prefix(client):
    """A key prefix no other test uses (C{gomodel-test:<hex>}); every key under it is deleted at the end."""
    name = f"gomodel-test:{uuid.uuid4().hex}"
    try:
        yield name
    finally:
        keys = list(client.scan_iter(match=name + "*"))
        if keys:
            client.delete(*keys)


class RedisServer:
    """A Redis of one test's own (C{redis-server} on a Unix socket in C{directory}, nothing saved), which the test
    may pause (as a server that stops answering but keeps its data: a network cut) and resume; the test is skipped
    where C{redis-server} is not installed."""

    def __init__(self, directory):
        import shutil
        import signal
        import subprocess
        import time

        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self._signal = signal
        socket = os.path.join(str(directory), "redis.sock")
        self.url = f"unix://{socket}"
        self.process = subprocess.Popen([binary, "--port", "0", "--unixsocket", socket, "--save", "",
                                         "--appendonly", "no", "--dir", str(directory)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(unix_socket_path=socket, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    pytest.fail("redis-server did not start")
                time.sleep(0.02)
            finally:
                client.close()

    def pause(self):
        self.process.send_signal(self._signal.SIGSTOP)

    def resume(self):
        self.process.send_signal(self._signal.SIGCONT)

    def stop(self):
        if self.process.poll() is None:
            self.resume()
            self.process.kill()
        self.process.wait()
