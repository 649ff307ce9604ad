"""Test layers: pure units, relay units on fakes, and real sockets on 127.0.0.1:0."""

import pytest
from twisted.logger import globalLogPublisher


@pytest.fixture(scope="session")
def reactor():
    """The reactor pytest-twisted installed."""
    from twisted.internet import reactor

    return reactor


class LoggedErrors(list):
    """Errors logged during a test; a test that expects some calls L{flush}."""

    def flush(self, *types):
        kept = [e for e in self if not (e.get("log_failure") is not None and e["log_failure"].check(*types))]
        flushed = len(self) - len(kept)
        self[:] = kept
        return flushed


@pytest.fixture(autouse=True)
def logged_errors():
    """Fail any test during which an error was logged and not flushed."""
    errors = LoggedErrors()

    def observer(event):
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    yield errors
    globalLogPublisher.removeObserver(observer)
    if errors:
        from twisted.logger import formatEvent

        details = "\n".join(formatEvent(e) + "\n" + (e["log_failure"].getTraceback() if e.get("log_failure") else "")
                            for e in errors)
        pytest.fail(f"{len(errors)} error(s) logged during the test:\n{details}")


@pytest.fixture(autouse=True)
def no_leftover_calls(request):
    """After each test, none of gomodel's timers may still be pending in the reactor."""
    yield
    from twisted.internet import reactor

    ours = [c for c in reactor.getDelayedCalls()
            if c.active() and getattr(c.func, "__module__", "").startswith("gomodel")]
    for call in ours:
        call.cancel()
    assert not ours, f"gomodel left delayed calls behind: {ours}"


import pytest_twisted  # noqa: E402
from treq.client import HTTPClient  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402

from tests.support import AccessRecords, openai_client, start_fake, start_gateway  # noqa: E402

# The utc_day mark's hooks; GOMODEL_REQUIRE_VLLM's and pytest-xdist's scheduling (here, where xdist's controlling
# process, which collects nothing, loads them); pytester for tests/test_scheduling.py.
pytest_plugins = ["pytester", "tests.utc_day", "tests.integration.required", "tests.scheduling"]


@pytest_twisted.async_yield_fixture()
async def fake(reactor):
    """A fake vLLM listening on 127.0.0.1:<free port>."""
    server = await start_fake(reactor)
    yield server
    await server.stop()


@pytest_twisted.async_yield_fixture()
async def gateway(reactor, fake):
    """The gateway with one provider, C{vllm}, in front of L{fake}."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    yield gw
    await gw.service.stopService()


@pytest_twisted.async_yield_fixture()
async def http(reactor):
    """A treq client for talking to the gateway; its connections are closed afterwards."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    yield HTTPClient(Agent(reactor, pool=pool))
    await pool.closeCachedConnections()


@pytest.fixture
def sdk(gw):
    """The openai SDK holding the master key of the module's C{gw} gateway fixture."""
    client = openai_client(gw, gw.service.config.auth.master_key or "unused", timeout=20)
    yield client
    client.close()


@pytest.fixture
def access():
    """The access log's events, as the gateway emits them (L{AccessRecords})."""
    records = AccessRecords()
    globalLogPublisher.addObserver(records)
    yield records
    globalLogPublisher.removeObserver(records)


@pytest.fixture
def refusing_port():
    """A port of 127.0.0.1 that refuses connections for the whole test: bound and never listening (a port let go
    can be another test's server by the time it is dialled: a Redis client then read an HTTP 400)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]
