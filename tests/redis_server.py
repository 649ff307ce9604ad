"""The real Redis the tests that need one use (C{GOMODEL_TEST_REDIS_URL}, default 127.0.0.1:6379, db 0)."""

import os
import signal
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


@contextmanager
def started_counters(reactor, new_client, prefix):
    """Yields C{make(**kwargs)}: L{gomodel.limits.counters.RedisCounters} under C{prefix}, started, as separate
    processes would have them (each on its own client, C{new_client()}); stopped, their clients closed, at the
    end."""
    from gomodel.limits.counters import RedisCounters

    made = []

    def make(**kwargs):
        counters = RedisCounters(new_client(), prefix, reactor, **kwargs)
        counters.start()
        made.append(counters)
        return counters

    try:
        yield make
    finally:
        for counters in made:
            counters.stop()
            counters._redis.close()


class RedisServer:
    """A Redis of one test's own (C{redis-server} on a Unix socket in C{directory}, saved only when told: L{save}), which
    the test may pause (as a server that stops answering but keeps its data: a network cut) and resume, or restart
    from its snapshot (L{restart}); the test is skipped where C{redis-server} is not installed."""

    def __init__(self, directory):
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self._binary = binary
        self._directory = str(directory)
        self._socket = os.path.join(self._directory, "redis.sock")
        self.url = f"unix://{self._socket}"
        self._start()

    def _start(self):
        import subprocess
        import time

        import redis

        self.process = subprocess.Popen([self._binary, "--port", "0", "--unixsocket", self._socket, "--save", "",
                                         "--appendonly", "no", "--dir", self._directory],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(unix_socket_path=self._socket, socket_timeout=1)
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

    def save(self):
        """Take a snapshot (C{SAVE}: an RDB file in its directory), which L{restart} loads."""
        import redis

        client = redis.Redis(unix_socket_path=self._socket, socket_timeout=5)
        try:
            client.save()
        finally:
            client.close()

    def restart(self):
        """Kill the server and start it again from its last snapshot (L{save}): what was written since is gone, as
        after a Redis restored from an earlier backup (or a crash between two saves)."""
        self.stop()
        self._start()

    def pause(self):
        self.process.send_signal(signal.SIGSTOP)

    def resume(self):
        self.process.send_signal(signal.SIGCONT)

    def stop(self):
        if self.process.poll() is None:
            self.resume()
            self.process.kill()
        self.process.wait()


def script_sha(script) -> bytes:
    """The SHA1 that redis-py's EVALSHA names C{script} by (a Lua script's text)."""
    import hashlib

    return hashlib.sha1(script.encode()).hexdigest().encode()


class HoldingProxy:
    """A TCP proxy on 127.0.0.1:<free port> in front of the test Redis that holds each command naming C{held}
    (a script's SHA1: L{script_sha}) for C{hold} seconds while the commands of other connections pass: as a Redis
    thread the OS did not run for that long. C{url} is its Redis URL; C{passed} counts the commands naming
    C{marked} that passed while one was held (an operation that overtook the held one).

    With C{hold} None a command is held until L{release} (no timer: an order of events, not of time), and
    C{on_marked}, where set, is called after each command naming C{marked} passed."""

    on_marked = None

    def __init__(self, reactor, held, marked, hold=0.3):
        from urllib.parse import urlparse

        from twisted.protocols import portforward

        target = urlparse(REDIS_URL)
        proxy = self

        class Server(portforward.ProxyServer):
            def dataReceived(self, data):
                proxy._received(self, data)

        factory = portforward.ProxyFactory(target.hostname or "127.0.0.1", target.port or 6379)
        factory.protocol = Server
        factory.noisy = False
        self._reactor = reactor
        self._held, self._marked, self._hold = held, marked, hold
        self._holding = {}  # server connection -> the bytes it holds
        self._timers = []
        self._waiting = []  # L{when_held}'s Deferreds
        self.passed = 0
        self.holds = 0
        self._port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        path = target.path or "/0"
        self.url = f"redis://127.0.0.1:{self._port.getHost().port}{path}"

    def _received(self, server, data):
        if server in self._holding:
            self._holding[server].append(data)
        elif self._held in data:
            self.holds += 1
            self._holding[server] = [data]
            if self._hold is not None:
                self._timers.append(self._reactor.callLater(self._hold, self._release, server))
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)
        else:
            marked = self._marked in data
            if marked and self._holding:
                self.passed += 1
            server.peer.transport.write(data)
            if marked and self.on_marked is not None:
                self.on_marked()

    def when_held(self):
        """A Deferred firing with None once a command is held (at once if one is now)."""
        from twisted.internet.defer import Deferred, succeed

        if self._holding:
            return succeed(None)
        self._waiting.append(Deferred())
        return self._waiting[-1]

    def release(self):
        """Send on every command held now."""
        for server in list(self._holding):
            self._release(server)

    def _release(self, server):
        for data in self._holding.pop(server):
            if server.peer is not None:
                server.peer.transport.write(data)

    def close(self):
        """Stop listening (its connections end with the gateway's client); a Deferred."""
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self.release()
        return self._port.stopListening()
