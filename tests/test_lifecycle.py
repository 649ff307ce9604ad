"""Readiness, and the graceful stop of a real twistd process: a stream in flight finishes after SIGTERM."""

import json
import re
import signal

import anthropic
import openai
import pytest_twisted
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from prometheus_client import generate_latest
from twisted.logger import Logger, globalLogPublisher

from gomodel import _twistedcompat
from gomodel.lifecycle import Drain

from tests.gateway_process import READY, exited, killed, ready_port, twistd_gateway, wait_for
from tests.rawclient import chat_request, connect
from tests.test_metrics import samples
from tests.support import in_thread, start_gateway, until, with_timeout

MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"


@pytest_twisted.ensureDeferred
async def test_ready_once_discovered_and_open_without_a_key(reactor, http, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        response = await http.get(gw.url + "/health/ready")
        assert response.code == 200 and json.loads(await response.content()) == {"status": "ready"}
        gw.service.drain.draining = True  # as during a stop
        response = await http.get(gw.url + "/health/ready")
        body = json.loads(await response.content())
        assert response.code == 503 and body["status"] == "not_ready" and "draining" in body["reasons"][0]
        gw.service.drain.draining = False
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_provider_down_at_start_does_not_keep_the_gateway_unready(reactor, http, fake):
    """Discovery has run once every replica was checked, failing or not (before: a provider whose replicas were
    all down at start kept /health/ready at 503 for ever, so no load balancer sent the gateway anything,
    though its other providers answered)."""
    from tests.support import dead_base_url

    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "VLLM_B_BASE_URL": await dead_base_url(reactor)},
                             wait_ready=False)
    try:
        await with_timeout(reactor, gw.registry.ready(), 10)
        await gw.service.store.started()
        response = await http.get(gw.url + "/health/ready")
        assert response.code == 200 and json.loads(await response.content()) == {"status": "ready"}
        response = await http.post(gw.url + "/v1/chat/completions", json={
            "model": "vllm-b/x", "messages": [{"role": "user", "content": "hi"}]})
        assert response.code == 503 and json.loads(await response.content())["error"]["code"] == "no_ready_replica"
    finally:
        await gw.service.stopService()


def test_a_drain_says_it_is_draining_once_its_ports_refuse_connections():
    """Twisted closes a port's socket a reactor turn after stopListening: until then the kernel still
    completes new connections, so the line waits for the port's Deferred."""
    closed = Deferred()

    class Listener:
        def stopListening(self):
            return closed

    events = []
    drain = Drain(Clock(), [Listener()], 5)
    drain.log = Logger(observer=events.append)
    assert drain.drain().called  # nothing in flight
    assert drain.draining and events == []
    closed.callback(None)
    assert [e["log_format"].split(":")[0] for e in events] == ["draining"]
    assert events[0]["count"] == 0


class _SignalledReactor:
    """What Twisted's signal handlers touch of a reactor: C{ReactorBase.sigTerm} notes the signal and stops
    the reactor on its next turn (here: counts the stops)."""

    _stopped = False  # running, not stopping
    _exitSignal = None

    def __init__(self):
        self.stops = 0
        self.when_running = []

    def callWhenRunning(self, f, *args):
        self.when_running.append((f, args))

    def sigTerm(self, number, frame=None):
        self._exitSignal = number
        self.stops += 1

    sigInt = sigTerm


def test_a_signal_while_the_reactor_stops_is_logged_once_and_changes_nothing(monkeypatch):
    events = []
    monkeypatch.setattr(_twistedcompat._StopOnce, "log", Logger(observer=events.append))
    reactor = _SignalledReactor()
    _twistedcompat.stop_once_on_signals(reactor)
    reactor.sigTerm(signal.SIGTERM)
    assert reactor.stops == 1 and reactor._exitSignal == signal.SIGTERM
    reactor.sigTerm(signal.SIGTERM)  # before the reactor's next turn: the stop is asked for already
    assert reactor.stops == 1 and events[0]["signal"] == "SIGTERM"
    reactor._stopped = True
    _twistedcompat.exit_cleanly(reactor)  # the drain
    reactor.sigInt(signal.SIGINT)
    reactor.sigTerm(signal.SIGTERM)
    assert reactor.stops == 1 and reactor._exitSignal is None  # twistd exits with status 0
    assert len(events) == 1 and "already draining" in events[0]["log_format"]


def test_a_signal_after_the_reactor_was_stopped_otherwise_changes_nothing():
    reactor = _SignalledReactor()
    reactor._stopped = True  # e.g. a worker whose primary is gone (gomodel.workers.ParentWatch)
    _twistedcompat.stop_once_on_signals(reactor)
    reactor.sigTerm(signal.SIGTERM)
    assert reactor.stops == 0 and reactor._exitSignal is None


def test_twisted_installs_the_signal_handlers_the_reactor_holds_when_it_starts_running(reactor, monkeypatch):
    """stop_once_on_signals replaces the handlers before twistd runs the reactor."""
    from twisted.internet.base import ReactorBase

    handlers = {name: object() for name in ("sigInt", "sigTerm")}
    for name, handler in handlers.items():
        monkeypatch.setattr(reactor, name, handler, raising=False)
    installed = ReactorBase._signalsFactory(reactor)
    assert installed._sigInt is handlers["sigInt"] and installed._sigTerm is handlers["sigTerm"]
    assert reactor._stopped is False  # running; True once stopped (ReactorBase.stop)


def test_a_request_that_comes_while_the_drain_waits_for_unsent_answers_is_waited_for_too(monkeypatch):
    """A kept-alive connection's next request, sent while the last answers were still leaving: the drain ended
    once they had left, its services stopped while that request was in flight."""
    clock, unsent = Clock(), {"bytes": 1000}

    class Channel:
        requests = []  # (none whose body is arriving)
        transport = None

    class Site:
        channels = [Channel()]

        def close_after_answers(self):
            pass

        def close_idle(self):
            pass

    monkeypatch.setattr(_twistedcompat, "unsent", lambda transport: unsent["bytes"])
    drain = Drain(clock, [], 10)
    drain.site = Site()
    done = drain.drain()
    assert not done.called  # an answer still leaving
    drain.started("late")  # a request on another connection, in the meantime
    unsent["bytes"] = 0
    clock.advance(1)
    assert not done.called  # (it fired here)
    drain("late")
    assert done.called
    assert not clock.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_a_stream_refuses_new_connections_and_exits_0(reactor, fake, tmp_path):
    proc, log_path = twistd_gateway(tmp_path, VLLM_BASE_URL=fake.base_url, SHUTDOWN_TIMEOUT="20s")
    try:
        port = await ready_port(reactor, log_path)
        idle = await connect(reactor, port, READY)  # a keep-alive connection open before the stop
        await with_timeout(reactor, idle.wait_for(b'"ready"}'), 10)
        stream = await connect(reactor, port, chat_request(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
             "fake_chunks": 20, "fake_pace": 0.1}))
        await with_timeout(reactor, stream.wait_for(b"data:"), 10)

        proc.send_signal(signal.SIGTERM)
        await wait_for(reactor, lambda: "draining" in log_path.read_text(), "the drain to start")
        try:
            refused = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol())
        except net_error.ConnectionRefusedError:
            refused = None
        assert refused is None, "a new connection was accepted while draining"
        before = len(idle.received)
        idle.transport.write(READY)  # on a connection still open: not ready any more
        await with_timeout(reactor, idle.wait_for(b"draining"), 10)
        assert b" 503 " in bytes(idle.received[before:]).split(b"\r\n", 1)[0]
        idle.transport.loseConnection()

        await with_timeout(reactor, stream.lost, 20)
        received = bytes(stream.received)
        assert b"data: [DONE]" in received and received.endswith(b"0\r\n\r\n")  # finished, not cut
        await exited(reactor, proc, log_path)
    finally:
        killed(proc)


@pytest_twisted.ensureDeferred
async def test_sighup_drains_as_sigterm_does(reactor, fake, tmp_path):
    """A terminal closed or C{kill -HUP}: before, SIGHUP's default action ended the process at once, the
    stream in flight cut and the usage held not written."""
    proc, log_path = twistd_gateway(tmp_path, VLLM_BASE_URL=fake.base_url, SHUTDOWN_TIMEOUT="20s")
    try:
        port = await ready_port(reactor, log_path)
        stream = await connect(reactor, port, chat_request(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
             "fake_chunks": 10, "fake_pace": 0.05}))
        await with_timeout(reactor, stream.wait_for(b"data:"), 10)
        proc.send_signal(signal.SIGHUP)
        await with_timeout(reactor, stream.lost, 20)
        received = bytes(stream.received)
        assert b"data: [DONE]" in received and received.endswith(b"0\r\n\r\n")  # finished, not cut
        await exited(reactor, proc, log_path)
        assert "received SIGHUP: stopping as for SIGTERM" in log_path.read_text()
    finally:
        killed(proc)


@pytest_twisted.ensureDeferred
async def test_another_sigterm_or_sigint_while_draining_is_logged_once_and_the_exit_is_still_0(reactor, fake,
                                                                                               tmp_path):
    """As a second Ctrl-C, or SIGTERM sent to the whole process group (systemd, timeout) and then by the primary
    of --workers to its workers: the drain goes on, the stream finishes and twistd exits with status 0."""
    proc, log_path = twistd_gateway(tmp_path, VLLM_BASE_URL=fake.base_url, SHUTDOWN_TIMEOUT="20s")
    try:
        port = await ready_port(reactor, log_path)
        stream = await connect(reactor, port, chat_request(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
             "fake_chunks": 10, "fake_pace": 0.1}))
        await with_timeout(reactor, stream.wait_for(b"data:"), 10)
        proc.send_signal(signal.SIGTERM)
        await wait_for(reactor, lambda: "draining" in log_path.read_text(), "the drain to start")
        for again in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
            proc.send_signal(again)
        await with_timeout(reactor, stream.lost, 20)
        received = bytes(stream.received)
        assert b"data: [DONE]" in received and received.endswith(b"0\r\n\r\n")  # finished, not cut
        text = await exited(reactor, proc, log_path)
    finally:
        killed(proc)
    assert "ReactorNotRunning" not in text and "Traceback" not in text and "#critical]" not in text, text
    assert text.count("Received SIGTERM, shutting down.") == 1  # Twisted's line, for the first one only
    [again] = [line for line in text.splitlines() if "already draining" in line]
    assert "#warn]" in again and ("SIGTERM" in again or "SIGINT" in again)  # (the kernel may merge the two SIGTERMs)


@pytest_twisted.ensureDeferred
async def test_a_drain_that_runs_out_of_time_cuts_what_is_left_and_closes_the_upstream(reactor, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "SHUTDOWN_TIMEOUT": "0.3s"})
    recorded = fake.next_request()
    client = await connect(reactor, gw.port, chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
         "fake_chunks": 200, "fake_pace": 0.05}))
    await with_timeout(reactor, client.wait_for(b"data:"), 10)
    record = await recorded
    await with_timeout(reactor, gw.service.stopService(), 10)
    await with_timeout(reactor, client.lost, 10)
    assert not bytes(client.received).endswith(b"0\r\n\r\n")  # cut, never made to look finished
    how, _ = await with_timeout(reactor, record.closed, 10)
    assert how == "lost"  # the upstream connection was closed: vLLM aborts the generation


@pytest_twisted.ensureDeferred
async def test_what_a_drain_cuts_is_logged_and_counted_as_the_gateways_cut_not_as_a_client_gone(reactor, fake, access):
    """A stream cut at the end of the drain keeps the status it sent; a request whose answer had not started
    is answered a 503 (its connection closed after it, its upstream's too, so vLLM aborts); both say the
    gateway cut them (shutdown_timeout), neither is a 499 client_gone. Before, the request whose answer had
    not started got no answer: its connection was reset, which a client cannot tell from a crash; the stream
    was reset too, without the error event that ends a stream an upstream broke off."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "SHUTDOWN_TIMEOUT": "0.3s"})
    stream = await connect(reactor, gw.port, chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
         "fake_chunks": 200, "fake_pace": 0.05}, {"X-Request-Id": "req-stream"}))
    await with_timeout(reactor, stream.wait_for(b"data:"), 10)
    recorded = fake.next_request()
    waiting = await connect(reactor, gw.port, chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "fake_delay": 30},
        {"X-Request-Id": "req-waiting"}))
    record = await with_timeout(reactor, recorded, 10)  # upstream, its answer not started
    await with_timeout(reactor, gw.service.stopService(), 10)
    await with_timeout(reactor, stream.lost, 10)
    await with_timeout(reactor, waiting.lost, 10)
    how, _ = await with_timeout(reactor, record.closed, 10)
    received = bytes(stream.received)  # an event stream ends as one the upstream broke off, never finished
    assert b'"code":"stream_incomplete"' in received.rpartition(b"data: ")[2] and not received.endswith(b"0\r\n\r\n")
    head, _, body = bytes(waiting.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"\r\nConnection: close" in head, head
    assert json.loads(body)["error"]["code"] == "shutdown_timeout"
    assert how == "lost"  # its upstream connection was closed: vLLM aborts the generation
    assert _cut(access) == {"req-stream": (200, "stream_broken", "shutdown_timeout", False),
                   "req-waiting": (503, "error", "shutdown_timeout", False)}
    gw.service.metrics.flush()  # neither is an upstream's error (before: the stream counted as one)
    assert not [s for s in samples(generate_latest(gw.service.metrics.registry).decode())
                if s[0] == "gomodel_upstream_errors_total"]


@pytest_twisted.ensureDeferred
async def test_a_responses_stream_the_drain_cuts_ends_with_openais_error_event(reactor, fake):
    """A Responses stream cut at the end of the drain ends with the Responses API's own error event, numbered
    after the last event it sent (before: a chat stream's C{data: {"error": ...}}, which is no such event)."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "SHUTDOWN_TIMEOUT": "0.3s"})
    request = chat_request({"model": MODEL, "input": "hi", "stream": True, "fake_hang_after": 3})
    stream = await connect(reactor, gw.port, request.replace(b"/v1/chat/completions", b"/v1/responses"))
    await with_timeout(reactor, stream.wait_for(b"response.content_part.added"), 10)
    await with_timeout(reactor, gw.service.stopService(), 10)
    await with_timeout(reactor, stream.lost, 10)
    received = bytes(stream.received)
    event, _, data = received.rpartition(b"\nevent: ")[2].partition(b"\ndata: ")
    assert event == b"error" and not received.endswith(b"0\r\n\r\n"), received
    assert json.loads(data.split(b"\n")[0]) == {
        "type": "error", "code": "stream_incomplete", "param": None, "sequence_number": 3,
        "message": "The stream ended abnormally: the gateway is stopping."}


@pytest_twisted.ensureDeferred
async def test_the_503_a_drain_out_of_time_answers_says_retry_after_in_both_dialects(reactor, fake):
    """The 503 shutdown_timeout of a request whose answer had not started when SHUTDOWN_TIMEOUT ran out carries
    C{Retry-After: 1} (L{gomodel.errors.SHUTDOWN_RETRY_AFTER}), in OpenAI's envelope and in Anthropic's on
    /v1/messages, as the official SDKs see it, so that a client or a load balancer sends it again, elsewhere, soon.
    Before, it had none."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "SHUTDOWN_TIMEOUT": "0.3s"})
    oai = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=20)
    claude = anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0, timeout=20)
    try:
        chat = in_thread(oai.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "hi"}],
                         extra_body={"fake_delay": 30})
        message = in_thread(claude.messages.create, model=MODEL, max_tokens=5,
                            messages=[{"role": "user", "content": "hi"}], extra_body={"fake_delay": 30})
        await until(reactor, lambda: {r.path for r in fake.requests} >= {b"/v1/chat/completions", b"/v1/messages"},
                    what="both upstream, unanswered")
        await with_timeout(reactor, gw.service.stopService(), 10)
        refused = {}
        for name, asked in (("openai", chat), ("anthropic", message)):
            try:
                await with_timeout(reactor, asked, 10)
            except (openai.APIStatusError, anthropic.APIStatusError) as e:
                refused[name] = (e.status_code, e.response.headers.get("retry-after"), e.body)
    finally:
        oai.close()
        claude.close()
    assert refused["openai"][:2] == (503, "1") and refused["openai"][2]["code"] == "shutdown_timeout"
    assert refused["anthropic"][:2] == (503, "1")
    assert refused["anthropic"][2]["type"] == "error" and refused["anthropic"][2]["error"]["type"] == "overloaded_error"


@pytest_twisted.ensureDeferred
async def test_a_stream_the_drain_cuts_is_recorded_before_the_usage_ledger_stops(reactor, fake, access):
    """A cut connection closes on the reactor's next turn, which is when its request is recorded (a stream's
    usage, what it had sent). Before, the services stopped in the turn of the cut: the stream's usage record
    reached a ledger already stopped (lost without a word) or one writing its last records (an error line)."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "SHUTDOWN_TIMEOUT": "0.3s"})
    at_stop = []
    ledger = gw.service.usage
    stop_ledger = ledger.stopService

    def stopping():
        at_stop.append(set(access.by_id()))
        return stop_ledger()

    ledger.stopService = stopping
    stream = await connect(reactor, gw.port, chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
         "fake_chunks": 200, "fake_pace": 0.05}, {"X-Request-Id": "req-stream"}))
    await with_timeout(reactor, stream.wait_for(b"data:"), 10)
    await with_timeout(reactor, gw.service.stopService(), 10)
    await with_timeout(reactor, stream.lost, 10)
    assert at_stop == [{"req-stream"}]  # recorded (its usage handed to the ledger) before the ledger stopped
    assert gw.service.drain.in_flight == 0 and ledger._buffer == []


@pytest_twisted.ensureDeferred
async def test_a_drain_makes_every_kept_alive_connection_close_after_its_answer(reactor, fake):
    """A load balancer's or SDK's kept-alive connections go on sending requests while the gateway drains: each
    answer from then on says C{Connection: close} and its connection closes after it, so that they move to
    another host and the drain ends once what is in flight is done, not cut at SHUTDOWN_TIMEOUT. Before, they
    were served and kept as ever: a busy pool never let the drain see nothing in flight."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "SHUTDOWN_TIMEOUT": "30s"})
    stream = await connect(reactor, gw.port, chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
         "fake_chunks": 10, "fake_pace": 0.05}))
    await with_timeout(reactor, stream.wait_for(b"data:"), 10)
    idle = await connect(reactor, gw.port, chat_request({"model": MODEL, "messages": [{"role": "user", "content": "a"}]}))
    await with_timeout(reactor, idle.wait_for(b"chat.completion"), 10)
    before = len(idle.received)
    stopping = gw.service.stopService()
    idle.transport.write(chat_request({"model": MODEL, "messages": [{"role": "user", "content": "b"}]}))
    await with_timeout(reactor, idle.lost, 10)  # closed after its answer
    head, _, body = bytes(idle.received[before:]).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close" in head
    assert json.loads(body)["object"] == "chat.completion"
    await with_timeout(reactor, stream.lost, 10)  # the stream finished, then its connection closed
    received = bytes(stream.received)
    assert b"data: [DONE]" in received and received.endswith(b"0\r\n\r\n")
    await with_timeout(reactor, stopping, 10)


@pytest_twisted.ensureDeferred
async def test_a_drain_waits_for_an_upload_whose_body_is_still_arriving(reactor, fake):
    """Before, a request counted as in flight only once its whole body was in: a drain that began during an
    upload saw nothing in flight and stopped the store at once, and the upload was lost (a 503
    storage_unavailable, or a connection closed by the process's exit)."""
    from tests.test_files import multipart

    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "SHUTDOWN_TIMEOUT": "30s"})
    body, content_type = multipart({"purpose": "batch"}, content=b'{"a": 1}\n' * 100000)
    head = b"POST /v1/files HTTP/1.1\r\nHost: g\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (
        content_type.encode(), len(body))
    client = await connect(reactor, gw.port, head + body[:len(body) // 2])
    half = await connect(reactor, gw.port, b"GET /health HTTP/1.1\r\nHo")  # a head still arriving: no request yet
    await until(reactor, lambda: sum(bool(channel.requests) for channel in gw.service.site.channels) == 2,
                what="the upload and the head")
    stopping = gw.service.stopService()
    assert gw.service.drain.in_flight == 1  # the upload
    half.transport.abortConnection()
    client.transport.write(body[len(body) // 2:])
    await with_timeout(reactor, client.lost, 10)  # (the drain closes it after its answer)
    head, _, answer = bytes(client.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head + answer
    assert json.loads(answer)["object"] == "file"
    await with_timeout(reactor, stopping, 10)


@pytest_twisted.ensureDeferred
async def test_a_gateway_without_providers_is_ready(reactor, http):
    """Nothing to discover: discovery has run (before: 503 'model discovery has not finished' for ever, as
    some provider's models had to be known)."""
    gw = await start_gateway(reactor, {}, wait_ready=False)
    try:
        await with_timeout(reactor, gw.registry.ready(), 10)
        await gw.service.store.started()
        response = await http.get(gw.url + "/health/ready")
        assert response.code == 200 and json.loads(await response.content()) == {"status": "ready"}
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_sigterm_waits_for_an_answer_still_in_the_gateways_buffer_to_reach_a_slow_client(reactor, fake,
                                                                                               tmp_path):
    """A whole answer written (its request over) but not yet read by its client: the drain ends, the services
    stop and the reactor stops, which closed every connection at once, the answer's tail never sent."""
    proc, log_path = twistd_gateway(tmp_path, VLLM_BASE_URL=fake.base_url, SHUTDOWN_TIMEOUT="20s")
    try:
        port = await ready_port(reactor, log_path)
        recorded = fake.next_request()
        slow = await connect(reactor, port, chat_request(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
             "fake_text": "x" * 65536, "fake_chunks": 512}))  # 32 MiB: more than the kernel's buffers hold
        slow.transport.pauseProducing()  # it reads nothing for now
        record = await with_timeout(reactor, recorded, 10)
        assert (await with_timeout(reactor, record.closed, 20))[0] == "finished"
        # the gateway read the answer whole and its request is over (its access line), the answer still buffered
        await wait_for(reactor, lambda: "POST /v1/chat/completions 200" in log_path.read_text(), "the request over")
        proc.send_signal(signal.SIGTERM)
        await wait_for(reactor, lambda: "draining" in log_path.read_text(), "the drain to start")
        await deferLater(reactor, 0.5, lambda: None)
        slow.transport.resumeProducing()
        await with_timeout(reactor, slow.lost, 30)
        head, _, body = bytes(slow.received).partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
        assert len(body) == length  # all of it
        await exited(reactor, proc, log_path)
    finally:
        killed(proc)


@pytest_twisted.ensureDeferred
async def test_an_answer_its_client_does_not_read_holds_the_drain_no_longer_than_its_timeout(reactor, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "SHUTDOWN_TIMEOUT": "0.3s"})
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        recorded = fake.next_request()
        stalled = await connect(reactor, gw.port, chat_request(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
             "fake_text": "x" * 65536, "fake_chunks": 512}))
        stalled.transport.pauseProducing()  # it never reads
        record = await with_timeout(reactor, recorded, 10)
        assert (await with_timeout(reactor, record.closed, 10))[0] == "finished"
        await until(reactor, lambda: not gw.service.drain.live, what="the answer written")
        await with_timeout(reactor, gw.service.stopService(), 10)
        stalled.transport.resumeProducing()
        await with_timeout(reactor, stalled.lost, 10)  # closed at the timeout
        assert len(stalled.received) < 512 * 65536
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any("answers not yet read by their clients after 0.3s" in (e.get("log_format") or "").replace(
        "{timeout:g}", "0.3") for e in events)


@pytest_twisted.ensureDeferred
async def test_a_kept_alive_connection_idle_when_the_drain_ends_is_closed_not_served_by_stopped_services(reactor,
                                                                                                        fake):
    """Before, a request sent on it after the drain was over (nothing in flight: at once) was relayed while the
    services stopped: the usage ledger had written its last records (its record lost), and the reactor's stop
    would cut it. Closed instead, its request is never read: a client's pool opens a connection to another
    host (SDKs retry a request a connection closed before its answer)."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    request = chat_request({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    client = await connect(reactor, gw.port, request)
    await with_timeout(reactor, client.wait_for(b'"usage"'), 10)
    answered = len(client.received)
    chats = len([r for r in fake.requests if r.path.endswith(b"/chat/completions")])
    stopping = gw.service.stopService()
    client.transport.write(request)
    await with_timeout(reactor, client.lost, 10)
    await with_timeout(reactor, stopping, 10)
    assert bytes(client.received[answered:]) == b""  # no second answer
    assert len([r for r in fake.requests if r.path.endswith(b"/chat/completions")]) == chats  # nothing relayed


@pytest_twisted.ensureDeferred
async def test_a_connection_with_half_a_request_head_when_the_drain_ends_is_closed_not_served(reactor, fake):
    """A client that had sent part of a request's head (its request line, some headers) when the drain ended: its
    connection was left open (its request begun, not in flight), so the rest of its head, sent as the services
    stopped, was relayed then (its usage record lost), or cut by the reactor's stop. It is closed with the idle
    ones now: its request is never read."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    request = chat_request({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    cut = request.index(b"\r\n") + 2
    client = await connect(reactor, gw.port, request[:cut])
    await until(reactor, lambda: any(c._head_open for c in gw.service.drain.site.channels), what="the head begun")
    stopping = gw.service.stopService()
    client.transport.write(request[cut:])
    await with_timeout(reactor, client.lost, 10)
    await with_timeout(reactor, stopping, 10)
    assert bytes(client.received) == b""  # no answer
    assert not [r for r in fake.requests if r.path.endswith(b"/chat/completions")]  # nothing relayed


@pytest_twisted.ensureDeferred
async def test_an_upload_still_arriving_when_the_drain_runs_out_of_time_is_logged_as_the_gateways_cut(reactor, fake,
                                                                                                       access):
    """Its request never reached a route: its connection was aborted with no record at all (nor, once recorded,
    as a client that left). It is the gateway's cut, shutdown_timeout, as a request whose answer had not started."""
    from tests.test_files import multipart

    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "SHUTDOWN_TIMEOUT": "0.3s"})
    body, content_type = multipart({"purpose": "batch"}, content=b'{"a": 1}\n' * 1000)
    head = b"POST /v1/files HTTP/1.1\r\nHost: g\r\nContent-Type: %s\r\nContent-Length: %d\r\nX-Request-Id: req-up\r\n\r\n" % (
        content_type.encode(), len(body))
    client = await connect(reactor, gw.port, head + body[:len(body) // 2])
    await until(reactor, lambda: gw.service.drain.site.channels and all(
        c._receiving is not None and not c._head_open for c in gw.service.drain.site.channels),
        what="the upload arriving")
    await with_timeout(reactor, gw.service.stopService(), 10)
    await with_timeout(reactor, client.lost, 10)
    assert [(e["request_id"], e["status"], e["outcome"], e["error"], e["client_gone"]) for e in access.events] == [
        ("req-up", 503, "error", "shutdown_timeout", False)]


@pytest_twisted.ensureDeferred
async def test_a_body_begun_during_the_drain_is_waited_for_and_served_before_the_services_stop(reactor, fake):
    """A head half sent when the drain began, whole during it (a stream still in flight), its body still arriving
    when that stream ended. Before any fix, it was counted nowhere and its body, once in, was relayed as the
    services stopped; then its connection was closed at the drain's end, mid-body, unanswered (its client could not
    have known: nothing had told it the connection would close). It is in flight now: the drain waits for its body,
    then it is answered (saying Connection: close) before the services stop."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    stream = await connect(reactor, gw.port, chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
         "fake_chunks": 10, "fake_pace": 0.05}))
    await with_timeout(reactor, stream.wait_for(b"data:"), 10)
    request = chat_request({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    head_end = request.index(b"\r\n\r\n") + 4
    late = await connect(reactor, gw.port, request[:20])
    site = gw.service.drain.site
    await until(reactor, lambda: any(c._head_open for c in site.channels), what="the head begun")
    stopping = gw.service.stopService()
    late.transport.write(request[20:head_end + 5])
    await until(reactor, lambda: any(c._receiving is not None and not c._head_open for c in site.channels),
                what="its body arriving")
    await with_timeout(reactor, stream.lost, 10)  # (the stream's end)
    await deferLater(reactor, 0.1, lambda: None)
    assert not late.lost.called and not stopping.called
    late.transport.write(request[head_end + 5:])
    await with_timeout(reactor, late.lost, 10)
    await with_timeout(reactor, stopping, 10)
    head, _, body = bytes(late.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close" in head, head
    assert json.loads(body)["object"] == "chat.completion"


class _HeldKeyReads:
    """The key ring's store, whose reads (C{changed_since}: a refresh, a look-up) wait until L{release}."""

    def __init__(self, keys):
        self._keys = keys
        self.reads = []

    def changed_since(self, since):
        d = Deferred()
        self.reads.append((since, d))
        return d

    def release(self):
        reads, self.reads = self.reads, []
        for since, d in reads:
            self._keys.changed_since(since).chainDeferred(d)


async def _a_key_this_process_lacks(gw):
    """A managed key's secret, stored as by another process: this one's key ring looks it up, its reads held."""
    from gomodel.auth.keys import hash_secret, new_secret

    secret = new_secret()
    held = gw.service.keys._store = _HeldKeyReads(gw.service.store.keys)
    await gw.service.store.keys.add({"id": "k_late", "hash": hash_secret(secret), "redacted": "sk-...x",
                                     "name": "late", "user_path": None, "created_at": 1000, "models": None,
                                     "own_cache_salt": False})
    return secret, held


def _cut(access):
    """Each access line's C{(status, outcome, error, client_gone)} by its request id."""
    return {name: (e["status"], e["outcome"], e["error"], e["client_gone"]) for name, e in access.by_id().items()}


def _held_requests(site):
    """The requests read whole that wait for who sent them (no route has seen them)."""
    return [r for c in site.channels for r in c.requests if c._handlingRequest and r.context is None]


@pytest_twisted.ensureDeferred
async def test_a_request_read_whole_during_the_drain_while_its_key_is_looked_up_is_served_not_cut(reactor, fake,
                                                                                                   access):
    """A kept-alive connection's request whose managed key this process lacks (made on another process): read
    whole during the drain, it waits for the key ring's read of the store. Before, the drain, seeing nothing else
    in flight, ended then: its connection was closed as an idle one, the request unanswered and unrecorded."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "master",
                                       "SHUTDOWN_TIMEOUT": "30s"})
    secret, held = await _a_key_this_process_lacks(gw)
    stream = await connect(reactor, gw.port, chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
         "fake_chunks": 10, "fake_pace": 0.05}, {"Authorization": "Bearer master"}))
    await with_timeout(reactor, stream.wait_for(b"data:"), 10)
    client = await connect(reactor, gw.port, b"")  # open before the drain, its request sent during it
    site = gw.service.drain.site
    await until(reactor, lambda: len(site.channels) == 2, what="the second connection")
    stopping = gw.service.stopService()
    client.transport.write(chat_request({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                                        {"Authorization": f"Bearer {secret}", "X-Request-Id": "req-late"}))
    await until(reactor, lambda: _held_requests(site), what="the request waiting for its key")
    await with_timeout(reactor, stream.lost, 10)  # nothing else in flight now
    await deferLater(reactor, 0.1, lambda: None)
    assert not client.lost.called and not stopping.called  # it is in flight
    held.release()
    await with_timeout(reactor, client.lost, 10)  # answered, then closed
    await with_timeout(reactor, stopping, 10)
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close" in head, head
    assert json.loads(body)["object"] == "chat.completion"
    assert [(e["status"], e["outcome"]) for e in access.events if e["request_id"] == "req-late"] == [(200, "ok")]


@pytest_twisted.ensureDeferred
async def test_a_request_whose_key_is_still_looked_up_when_the_drain_runs_out_gets_a_503_in_its_dialect(reactor,
                                                                                                      fake, access):
    """Its body whole, its managed key still being read from the store when SHUTDOWN_TIMEOUT ran out: before, its
    connection was reset (no answer, no record); now it gets the 503 shutdown_timeout a request whose answer had
    not started gets, in its route's dialect (Anthropic's on /v1/messages), with Connection: close, and is logged
    as the gateway's cut."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "master",
                                       "SHUTDOWN_TIMEOUT": "0.3s"})
    secret, held = await _a_key_this_process_lacks(gw)
    request = chat_request({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
                           {"x-api-key": secret, "anthropic-version": "2023-06-01", "X-Request-Id": "req-held"})
    client = await connect(reactor, gw.port, request.replace(b"/v1/chat/completions", b"/v1/messages"))
    site = gw.service.drain.site
    await until(reactor, lambda: _held_requests(site), what="the request waiting for its key")
    await with_timeout(reactor, gw.service.stopService(), 10)
    await with_timeout(reactor, client.lost, 10)
    held.release()  # (its read comes back after all: nothing more happens)
    await deferLater(reactor, 0.05, lambda: None)
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"\r\nConnection: close" in head, head
    error = json.loads(body)
    assert error["type"] == "error" and error["error"]["type"] == "overloaded_error", error  # (Anthropic's 503)
    assert [(e["request_id"], e["status"], e["outcome"], e["error"], e["client_gone"]) for e in access.events] == [
        ("req-held", 503, "error", "shutdown_timeout", False)]
    assert not [r for r in fake.requests if r.path.endswith((b"/chat/completions", b"/messages"))]


@pytest_twisted.ensureDeferred
async def test_sigterm_to_workers_drains_each_process_its_streams_finish_and_the_exit_is_0(reactor, fake, tmp_path):
    """C{gomodel --workers 2}: SIGTERM to the primary drains it and its worker at once; new connections are refused,
    the streams in flight in either process finish whole (each logged), and the primary exits with status 0."""
    proc, log_path = twistd_gateway(tmp_path, ("--workers", "2"), VLLM_BASE_URL=fake.base_url,
                                    SHUTDOWN_TIMEOUT="20s")
    try:
        await wait_for(reactor, lambda: "worker 1 ready for connections" in log_path.read_text(), "the worker")
        port = await ready_port(reactor, log_path)
        streams = []
        for i in range(3):  # (dealt in turn: both processes get one)
            stream = await connect(reactor, port, chat_request(
                {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                 "fake_chunks": 20, "fake_pace": 0.1}, {"X-Request-Id": f"req-stream-{i}"}))
            await with_timeout(reactor, stream.wait_for(b"data:"), 10)
            streams.append(stream)
        proc.send_signal(signal.SIGTERM)
        await wait_for(reactor, lambda: log_path.read_text().count("draining: new connections are refused") == 2,
                       "both processes to drain")
        try:
            refused = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol())
        except net_error.ConnectionRefusedError:
            refused = None
        assert refused is None, "a new connection was accepted while draining"
        for stream in streams:
            await with_timeout(reactor, stream.lost, 20)
            received = bytes(stream.received)
            assert b"data: [DONE]" in received and received.endswith(b"0\r\n\r\n")  # finished, not cut
        text = await exited(reactor, proc, log_path)
    finally:
        killed(proc)
    in_flight = [int(n) for n in re.findall(r"draining: new connections are refused; (\d+) requests in flight", text)]
    assert len(in_flight) == 2 and all(in_flight) and sum(in_flight) == 3, text  # both processes had some
    lines = [line for line in text.splitlines() if "req-stream-" in line and "/v1/chat/completions 200 " in line]
    assert len(lines) == 3 and not [line for line in lines if "outcome=" in line], text
    assert "Traceback" not in text, text


@pytest_twisted.ensureDeferred
async def test_a_pipelined_request_queued_when_the_drain_runs_out_gets_the_503_too(reactor, fake, access):
    """Two requests pipelined in one write: the first upstream, its answer not started, the second read whole
    behind it. At the drain's end each is answered its 503 shutdown_timeout, in order, the second's closing the
    connection, and both are logged as the gateway's cut; the second never goes upstream. Before, the first's
    503 closed the connection: the second got no answer and no access line."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "SHUTDOWN_TIMEOUT": "0.3s"})
    recorded = fake.next_request()
    client = await connect(reactor, gw.port, chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "fake_delay": 30},
        {"X-Request-Id": "req-first"}) + chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "fake_marker": "queued"},
        {"X-Request-Id": "req-queued"}))
    await with_timeout(reactor, recorded, 10)
    await until(reactor, lambda: any(c._received for c in gw.service.drain.site.channels),
                what="the second request read whole")
    await with_timeout(reactor, gw.service.stopService(), 10)
    await with_timeout(reactor, client.lost, 10)
    received = bytes(client.received)
    answers = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        length = int(re.search(rb"\r\nContent-Length: (\d+)", head).group(1))
        answers.append((head, json.loads(rest[:length])))
        received = rest[length:]
    assert [(head.split(b" ")[1], re.search(rb"\r\nX-Request-Id: ([^\r]+)", head).group(1),
             b"\r\nConnection: close" in head, body["error"]["code"]) for head, body in answers] == [
        (b"503", b"req-first", False, "shutdown_timeout"), (b"503", b"req-queued", True, "shutdown_timeout")]
    assert "queued" not in fake.marker_counts  # never sent upstream
    assert _cut(access) == {"req-first": (503, "error", "shutdown_timeout", False),
                   "req-queued": (503, "error", "shutdown_timeout", False)}


@pytest_twisted.ensureDeferred
async def test_a_background_create_not_answered_within_its_grace_is_cut_after_the_others(reactor, fake, monkeypatch, access):
    """At the drain's end a chat request waiting for its answer is cut at once (503), while a background
    response's create is waited for up to BACKGROUND_GRACE more; not answered by then, it is cut as well (503
    shutdown_timeout, its upstream connection closed), recorded as the gateway's cut."""
    from gomodel import lifecycle

    monkeypatch.setattr(lifecycle, "BACKGROUND_GRACE", 0.5)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "SHUTDOWN_TIMEOUT": "0.3s"})
    upstream = [fake.next_request(), fake.next_request()]
    created = chat_request({"model": MODEL, "input": "hi", "background": True, "fake_delay": 30},
                           {"X-Request-Id": "req-background"}).replace(b"/v1/chat/completions", b"/v1/responses")
    background = await connect(reactor, gw.port, created)
    chat = await connect(reactor, gw.port, chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "fake_delay": 30},
        {"X-Request-Id": "req-chat"}))
    records = [await with_timeout(reactor, d, 10) for d in upstream]
    began = reactor.seconds()
    await with_timeout(reactor, gw.service.stopService(), 10)
    await with_timeout(reactor, background.lost, 10)
    await with_timeout(reactor, chat.lost, 10)
    closed = [(await with_timeout(reactor, record.closed, 10))[0] for record in records]
    for client in (background, chat):
        head, _, body = bytes(client.received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and b"\r\nConnection: close" in head, head
        assert json.loads(body)["error"]["code"] == "shutdown_timeout"
    assert closed == ["lost", "lost"]  # both upstream connections closed: vLLM aborts them
    assert _cut(access) == {"req-background": (503, "error", "shutdown_timeout", False),
                            "req-chat": (503, "error", "shutdown_timeout", False)}
    logged = {name: event["log_time"] for name, event in access.by_id().items()}
    assert logged["req-chat"] - began < 0.5 <= logged["req-background"] - began


@pytest_twisted.ensureDeferred
async def test_a_request_pipelined_behind_a_stream_the_drain_cuts_is_logged_as_the_gateways_cut(reactor, fake, access):
    """The stream ends with its error event and its connection closes: the request read whole behind it cannot be
    answered after that; it is logged as the gateway's cut (503 shutdown_timeout), never sent upstream. Before, it
    had no access line."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "SHUTDOWN_TIMEOUT": "0.3s"})
    client = await connect(reactor, gw.port, chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
         "fake_chunks": 200, "fake_pace": 0.05}, {"X-Request-Id": "req-stream"}) + chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "fake_marker": "queued"},
        {"X-Request-Id": "req-queued"}))
    await with_timeout(reactor, client.wait_for(b"data:"), 10)
    assert any(c._received for c in gw.service.drain.site.channels)
    await with_timeout(reactor, gw.service.stopService(), 10)
    await with_timeout(reactor, client.lost, 10)
    assert b'"code":"stream_incomplete"' in bytes(client.received).rpartition(b"data: ")[2]
    assert bytes(client.received).count(b"HTTP/1.1 ") == 1
    assert "queued" not in fake.marker_counts
    assert _cut(access) == {"req-stream": (200, "stream_broken", "shutdown_timeout", False),
                   "req-queued": (503, "error", "shutdown_timeout", False)}


@pytest_twisted.ensureDeferred
async def test_a_body_arriving_behind_a_request_the_drain_cuts_is_logged_as_the_gateways_cut(reactor, fake, access):
    """A request upstream, its answer not started, and behind it (pipelined) one whose body is still arriving:
    the first's 503 closes the connection, so the second is never read whole; it is logged as the gateway's cut
    (503 shutdown_timeout), not as a client that left (499 client_gone, as before)."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "SHUTDOWN_TIMEOUT": "0.3s"})
    recorded = fake.next_request()
    second = chat_request({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                          {"X-Request-Id": "req-arriving"})
    client = await connect(reactor, gw.port, chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "fake_delay": 30},
        {"X-Request-Id": "req-first"}) + second[:-10])
    await with_timeout(reactor, recorded, 10)
    await until(reactor, lambda: any(c._receiving is not None and not c._head_open
                                     for c in gw.service.drain.site.channels), what="the second's body arriving")
    await with_timeout(reactor, gw.service.stopService(), 10)
    await with_timeout(reactor, client.lost, 10)
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"\r\nConnection: close" in head, head
    assert json.loads(body)["error"]["code"] == "shutdown_timeout"
    assert _cut(access) == {"req-first": (503, "error", "shutdown_timeout", False),
                   "req-arriving": (503, "error", "shutdown_timeout", False)}
