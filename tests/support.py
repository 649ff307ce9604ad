"""Running the real gateway and the fake vLLM on loopback sockets for tests."""

import atexit
import shutil
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime

import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from gomodel.config import load_config
from gomodel.build import build_gateway
from tests.fakes.vllm import FakeVLLM

LISTEN = "tcp:0:interface=127.0.0.1"


class _AnyModel(dict):
    """A model list that holds every id."""

    def __contains__(self, model):
        return True


def ready_pool(server, clock, name=None):
    """A provider pool of one ready replica, C{server}, that serves any model (for runner and unit tests)."""
    from gomodel.routing.pool import READY, Replica, ReplicaPool

    replica = Replica(0, server, "http://stub/v1", clock)
    replica.models, replica.state = _AnyModel(), READY
    return ReplicaPool(name or server.name, server.type, [replica], clock)


class Gateway:
    """A started L{GatewayService} on 127.0.0.1:<free port>."""

    def __init__(self, service, port):
        self.service = service
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    @property
    def registry(self):
        return self.service.registry


async def start_gateway(reactor, env, yaml_path=None, wait_ready=True, timeouts_clock=None) -> Gateway:
    """Build the gateway from C{env} exactly as twistd would, listening on a free port.

    Without C{GOMODEL_DATA_DIR} in C{env} its files and batches live in a new
    temporary directory (never in ./data). C{timeouts_clock}: the upstreams' timeouts' clock (a
    L{twisted.internet.task.Clock} the test advances), or None: the reactor.
    """
    if "GOMODEL_DATA_DIR" not in env:
        env = dict(env, GOMODEL_DATA_DIR=_scratch_data_dir())
    config = load_config(env, yaml_path, [LISTEN])
    service = build_gateway(config, reactor, timeouts_clock=timeouts_clock)
    service.startService()
    port = await service.listeners[0].whenListening()
    gateway = Gateway(service, port.getHost().port)
    if wait_ready:
        await with_timeout(reactor, gateway.registry.ready(), 5)
        await every_replica_checked(reactor, gateway.registry)
        # (its first attempt to open: /health/ready is 503 until it ends; one that fails is the test's to see)
        await with_timeout(reactor, service.store.started().addErrback(lambda _: None), 5)
    return gateway


async def every_replica_checked(reactor, registry, timeout=5.0):
    """Wait until every replica of every provider answered or failed its first checks, and each one whose
    upstream answers is ready.

    C{registry.ready()} fires once one replica of each provider is ready, or each was checked: a test that
    expects the others to serve (or to fail over to them) must wait for them too. On a loaded host a replica's
    first checks can run out of time before their answers are read: it is checked, and loading until its next
    probe (a test that sent meanwhile got 503 no_ready_replica); where its upstream answers this fixture's own
    look (its C{/health} and model list), it is waited for until ready. A replica that never answers (a hanging
    fake) is left after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    replicas = [r for pool in registry.providers for r in pool.replicas]
    with registry_checks(registry) as next_check:
        while not all(r.checked for r in replicas):
            if not await _checked_again(reactor, next_check(), deadline):
                return
        for replica in replicas:
            if replica.ready or not await _answers(reactor, replica.server):
                continue
            while not replica.ready:
                assert await _checked_again(reactor, next_check(), deadline), \
                    f"{replica} answers but was not ready within {timeout} s: {replica.last_error}"


async def _checked_again(reactor, check: Deferred, deadline) -> bool:
    """Whether C{check} (L{registry_checks}' next) fired before C{deadline} (L{time.monotonic})."""
    try:
        await with_timeout(reactor, check, max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        return False
    return True


async def _answers(reactor, server) -> bool:
    """Whether the upstream C{server} (a replica's) answers its health check and lists its models now."""
    try:
        await with_timeout(reactor, server.health(), 10)
        await with_timeout(reactor, server.list_models(), 10)
    except Exception:
        return False
    return True


@contextmanager
def registry_checks(registry):
    """C{next_check()}: a Deferred that fires (with None) once the replica monitor has taken in the result of
    another check of a replica (it tells C{registry} after each one: C{replicas_changed} or C{models_changed})."""
    waiting = []

    def told(original):
        def changed():
            original()
            fired, waiting[:] = list(waiting), []
            for d in fired:
                d.callback(None)
        return changed

    registry.replicas_changed = told(registry.replicas_changed)
    registry.models_changed = told(registry.models_changed)

    def next_check():
        d = Deferred()
        waiting.append(d)
        return d

    try:
        yield next_check
    finally:
        del registry.replicas_changed, registry.models_changed


_SCRATCH = []


def _scratch_data_dir() -> str:
    """A fresh data directory under one temporary root, removed when the test run ends."""
    if not _SCRATCH:
        root = tempfile.mkdtemp(prefix="gomodel-test-")
        atexit.register(shutil.rmtree, root, True)
        _SCRATCH.append(root)
    return tempfile.mkdtemp(dir=_SCRATCH[0])


async def start_fake(reactor, **kwargs) -> FakeVLLM:
    return await FakeVLLM(reactor, **kwargs).start()


async def dead_base_url(reactor) -> str:
    """A loopback base URL where nothing listens any more (connections are refused)."""
    fake = await start_fake(reactor)
    url = fake.base_url
    await fake.stop()
    return url


async def stop_all(gateway, *fakes, clients=()):
    """A test's teardown: close the SDK C{clients}, stop C{gateway}'s service, then the C{fakes}."""
    for client in clients:
        client.close()
    await gateway.service.stopService()
    for fake in fakes:
        await fake.stop()


def with_timeout(reactor, d: Deferred, seconds: float) -> Deferred:
    """C{d}, failing with L{TimeoutError} when it has not fired within C{seconds}: also where cancelling it
    (which the timeout does) fires it with a result, as a service's C{stopService} may; an error it fails with
    on the way is kept."""

    def timed_out(result, timeout):
        if isinstance(result, Failure) and not result.check(CancelledError):
            return result
        raise TimeoutError(f"not fired within {timeout} s")

    d.addTimeout(seconds, reactor, onTimeoutCancel=timed_out)
    return d


def openai_client(gateway, api_key="unused", timeout=10):
    """The official openai SDK pointed at C{gateway} (no retries); close it after use."""
    import openai

    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)


def in_thread(fn, *args, **kwargs) -> Deferred:
    """Run a blocking client (the openai SDK) off the reactor thread."""
    return threads.deferToThread(fn, *args, **kwargs)


def in_daemon_thread(reactor, fn, *args, **kwargs) -> Deferred:
    """Run a blocking client on a daemon thread of its own, which never holds the test run's exit (an SDK
    that might sleep for hours before a retry); fires with what C{fn} returns, or its failure."""
    import threading

    d = Deferred()

    def run():
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            reactor.callFromThread(d.errback, Failure())
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=run, daemon=True).start()
    return d


def blockon(d):
    return pytest_twisted.blockon(d)


def track_connections(gateway):
    """Record the gateway's server-side protocols as they are built."""
    site = gateway.service.site
    built = []
    original = site.buildProtocol

    def build(addr):
        protocol = original(addr)
        built.append(protocol)
        return protocol

    site.buildProtocol = build
    return built


def write_buffer(transport) -> int:
    """Bytes a Twisted TCP transport holds, not yet handed to the kernel."""
    from gomodel._twistedcompat import unsent

    return unsent(transport)


async def within_one_day(zone, attempt):
    """Await C{attempt()}, a test of "today" in C{zone} that reads the wall clock, again when it failed and the
    zone's day changed while it ran (it tested a day that ended under it; a second attempt, begun in the new day,
    cannot meet another midnight): what the attempt that counts returns, or how it fails."""
    day = datetime.now(zone).date()
    try:
        return await attempt()
    except Exception:
        if datetime.now(zone).date() == day:
            raise
    return await attempt()


async def until(reactor, predicate, limit=10.0, interval=0.01, what="condition"):
    """A bounded poll, for what only a real socket or thread can tell: C{predicate()} every C{interval}
    seconds until it is true; fails naming C{what} after C{limit} seconds."""
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"{what} never happened"
        await deferLater(reactor, interval, lambda: None)


async def turns_until(reactor, d: Deferred, limit=10.0, tick=0.02):
    """C{d}'s result and how many C{tick}s of C{reactor} ran before it fired: a delay counted in the reactor's
    own turns (a loaded host's pause is one late tick, where a wall-clock bound failed). Fails with
    L{twisted.internet.defer.TimeoutError} after C{limit} seconds."""
    ticks, call = 0, None

    def ticked():
        nonlocal ticks, call
        ticks += 1
        call = reactor.callLater(tick, ticked)

    call = reactor.callLater(tick, ticked)
    try:
        result = await with_timeout(reactor, d, limit)
    finally:
        call.cancel()
    return result, ticks


async def assert_upstream_closed_promptly(reactor, record):
    """The client just left: the upstream is closed, not finished, within 25 of the reactor's 20 ms ticks (0.5 s
    on an idle host; a loaded host's pause is one late tick), long before any of the gateway's timeouts."""
    (how, _), ticks = await turns_until(reactor, record.closed)
    assert how == "lost"
    assert ticks < 25, f"upstream closed {ticks} ticks of 20 ms after the client left"


async def settled(reactor, read, interval=0.05, quiet=4, limit=15.0):
    """Wait until C{read()} stops changing for C{quiet} checks in a row."""
    last, same, deadline = read(), 0, time.monotonic() + limit
    while same < quiet:
        assert time.monotonic() < deadline, "never settled"
        await deferLater(reactor, interval, lambda: None)
        now = read()
        same = same + 1 if now == last else 0
        last = now
    return last


class AccessRecords:
    """Access log events, and a Deferred for the next one."""

    def __init__(self):
        self.events = []
        self._waiting = []

    def __call__(self, event):
        if event.get("log_namespace") != "gomodel.access":
            return
        self.events.append(event)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(event)

    def by_id(self):
        """The events so far by their C{request_id}."""
        return {event["request_id"]: event for event in self.events}

    def next(self, reactor):
        d = Deferred()
        self._waiting.append(d)
        return with_timeout(reactor, d, 10)


def copy_counting_bytes():
    """C{(Read, copied)}: a C{bytes} subclass whose concatenations and slices add the bytes they copy to
    C{copied[0]} (a list), to feed a parser reads whose copying a test counts."""
    copied = [0]

    class Read(bytes):
        def __radd__(self, other):
            copied[0] += len(other) + len(self)
            return bytes(other) + bytes(self)

        def __add__(self, other):
            copied[0] += len(other) + len(self)
            return bytes(self) + bytes(other)

        def __getitem__(self, at):
            part = bytes.__getitem__(self, at)
            if isinstance(at, slice):
                copied[0] += len(part)
            return part

    return Read, copied


async def send_streams_failing_after_200(http, gateway, headers, model):
    """Three streamed chats answered 200, read to their ends: a whole one, one its upstream breaks off after two
    events (its cut body's error swallowed), one whose upstream sends an error event, then C{[DONE]}."""
    import json

    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    error_event = json.dumps({"error": {"message": "oops", "type": "InternalServerError", "code": 500}})
    chunk = json.dumps({"id": "a", "object": "chat.completion.chunk", "created": 1, "model": "m",
                        "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]})
    for body in (chat, dict(chat, fake_die_after=2), dict(chat, fake_sse=[chunk, error_event, "[DONE]"])):
        response = await http.post(gateway.url + "/v1/chat/completions", headers=headers,
                                   data=json.dumps(body).encode())
        assert response.code == 200
        try:
            await response.content()
        except Exception:
            pass  # the broken one's body is cut, as it must be


async def charge_a_batch_and_a_background_response(reactor, gateway, fake, sdk, model):
    """Run a batch of two chat lines to its end and a background response its watch charges (19 and 3 tokens):
    tokens no request's end counts. Fires with the usage ledger's records once the response's are among them."""
    from tests.test_batches import chat_line, start_batch

    created = await start_batch(sdk, [chat_line("a"), chat_line("b")])
    await gateway.service.batch_runner.settled(created.id)
    background = await in_thread(sdk.responses.create, model=model, input="long job", background=True)
    fake.stored_responses[background.id].update(status="completed", usage={
        "input_tokens": 19, "output_tokens": 3, "total_tokens": 22})
    for _ in range(200):  # (its watch asks its instance, then charges it)
        await gateway.service.usage.flush()
        records, _ = await gateway.service.store.usage.log(0, 2e9, 100)
        if any(r["total_tokens"] == 22 for r in records):
            return records
        await deferLater(reactor, 0.05, lambda: None)
    return records
