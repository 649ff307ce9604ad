"""Log lines: LOG_FORMAT=json and LOG_LEVEL on a real twistd process, and the classic text lines of
the gomodel runner, the same as Twisted's."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import pytest_twisted
from twisted.internet import error as net_error
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, Logger, LogPublisher, formatEventAsClassicLogText
from twisted.python.failure import Failure

from gomodel.http.context import AccessLog, RequestContext
from gomodel.logs import HELD_LINES, LINE_BYTES, LINE_DELAY, LINE_FORMAT, ClassicText, JSONLineObserver, TextObserver
from tests.rawclient import RawClient, chat_request
from tests.support import until, with_timeout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = "from twisted.scripts.twistd import run; run()"
GOMODEL_RUNNER = "from gomodel.cli import twistd; twistd()"  # what the gomodel command and its workers run


async def _run(reactor, fake, tmp_path, runner=TWISTD, twistd_options=(), **env):
    """Start twistd gomodel (or C{runner} with twistd's options) with C{env}, send one chat, stop it;
    its output's lines. It listens on a UNIX socket in a directory of its own: nothing else can take that
    address, and no "listening on" line is needed to find it (C{LOG_LEVEL=warn} drops that line)."""
    log_path = tmp_path / "out.log"
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "OPENAI_", "GOMODEL_", "LOG_"))}
    run_env.update(env, PYTHONPATH=REPO, GOMODEL_DATA_DIR=str(tmp_path / "data"), VLLM_BASE_URL=fake.base_url)
    socket_dir = tempfile.mkdtemp(prefix="gomodel-logs-")  # short: a UNIX socket's path has at most 107 bytes
    socket_path = os.path.join(socket_dir, "gw.sock")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", runner, "-n", "--pidfile=", *twistd_options,
                                 "gomodel", "--listen", f"unix:{socket_path}"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=run_env)
    try:
        await _one_chat(reactor, proc, socket_path, log_path)
        proc.send_signal(signal.SIGTERM)
        await until(reactor, lambda: proc.poll() is not None, limit=20.0, interval=0.05, what="the gateway to exit")
        assert proc.returncode == 0, log_path.read_text()
        return log_path.read_text().splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(socket_dir, ignore_errors=True)


async def _one_chat(reactor, proc, socket_path, log_path, limit=60.0):
    """Send one chat to the gateway C{proc} once it listens on C{socket_path}, until it answers 200.
    Fails, with its log, if it exits first or gives no 200 within C{limit} seconds."""
    request = chat_request({"model": "vllm/meta-llama/Llama-3.1-8B-Instruct", "messages": []})
    deadline, head = time.monotonic() + limit, b"(no connection)"
    while True:
        assert proc.poll() is None, f"the gateway exited ({proc.returncode}) before it answered\n{log_path.read_text()}"
        assert time.monotonic() < deadline, f"no 200 in {limit:.0f} s (last: {head!r})\n{log_path.read_text()}"
        try:
            client = RawClient(request)
            await connectProtocol(UNIXClientEndpoint(reactor, socket_path), client)
        except (net_error.ConnectError, FileNotFoundError):  # not listening yet
            await deferLater(reactor, 0.05, lambda: None)
            continue
        await with_timeout(reactor, client.wait_for(b"\r\n\r\n"), 10)
        client.transport.loseConnection()
        head = bytes(client.received).split(b"\r\n", 1)[0]
        if b" 200 " in head:
            return
        await deferLater(reactor, 0.05, lambda: None)  # its models not discovered yet: a 503


@pytest_twisted.ensureDeferred
async def test_json_lines_with_the_access_log_fields(reactor, fake, tmp_path):
    lines = await _run(reactor, fake, tmp_path, LOG_FORMAT="json")
    records = [json.loads(line) for line in lines if line.strip()]  # every line is one JSON object
    access = [r for r in records if r["namespace"] == "gomodel.access" and r.get("status") == 200]
    assert access, lines
    assert access[0]["provider"] == "vllm" and access[0]["path"] == "/v1/chat/completions"
    assert access[0]["level"] == "info" and access[0]["message"].startswith("POST /v1/chat/completions 200")


@pytest_twisted.ensureDeferred
async def test_log_level_drops_what_is_below_it(reactor, fake, tmp_path):
    lines = await _run(reactor, fake, tmp_path, LOG_LEVEL="warn")
    assert not any("gomodel.access" in line for line in lines)  # info lines are gone
    assert any("GOMODEL_MASTER_KEY is not set" in line for line in lines)  # a warning stays


CLASSIC_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[gomodel\.access#info\] "
                          r"POST /v1/chat/completions 200 \d+\.\dms request_id=\w+ provider=vllm "
                          r"model=vllm/meta-llama/Llama-3\.1-8B-Instruct replica=0 prompt_tokens=\d+ "
                          r"completion_tokens=\d+$")


@pytest_twisted.ensureDeferred
async def test_the_default_log_is_twisteds_classic_lines_on_stdout(reactor, fake, tmp_path):
    lines = await _run(reactor, fake, tmp_path)
    assert any(CLASSIC_LINE.match(line) for line in lines), lines
    assert any("[gomodel.service.GatewayService#warn] GOMODEL_MASTER_KEY is not set" in line for line in lines)


@pytest_twisted.ensureDeferred
async def test_twistds_logfile_option_still_decides_where_lines_go(reactor, fake, tmp_path):
    logfile = tmp_path / "gateway.log"
    stdout = await _run(reactor, fake, tmp_path, runner=GOMODEL_RUNNER, twistd_options=[f"--logfile={logfile}"])
    lines = logfile.read_text().splitlines()
    assert any(CLASSIC_LINE.match(line) for line in lines), lines
    assert not any("gomodel.access" in line for line in stdout)


@pytest_twisted.ensureDeferred
async def test_log_level_filters_the_lines_twistds_logfile_option_sends_to_its_file(reactor, fake, tmp_path):
    logfile = tmp_path / "gateway.log"
    stdout = await _run(reactor, fake, tmp_path, runner=GOMODEL_RUNNER, twistd_options=[f"--logfile={logfile}"],
                        LOG_LEVEL="warn")
    lines = logfile.read_text().splitlines()
    assert any("[gomodel.service.GatewayService#warn] GOMODEL_MASTER_KEY is not set" in line for line in lines), lines
    assert not any("gomodel.access" in line for line in lines)  # info lines are gone
    assert not any("GOMODEL_MASTER_KEY is not set" in line for line in stdout)


def _events():
    """Events of every shape an observer meets: the access log's line, a formatted message, a
    failure, a legacy event's system, a line break in a line, no time, an empty line."""
    logger = Logger(namespace="gomodel.access")
    base = {"log_logger": logger, "log_level": LogLevel.info, "log_namespace": "gomodel.access",
            "log_source": None, "log_time": 1764662925.75}
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    return [
        {**base, "log_format": LINE_FORMAT, "log_line": "POST /v1/chat/completions 200 3.1ms", "status": 200},
        {**base, "log_format": "provider {name} ({type})", "name": "vllm", "type": "vllm"},
        {**base, "log_format": "claim {what}", "what": "x", "log_failure": failure, "log_level": LogLevel.critical},
        {**base, "log_format": LINE_FORMAT, "log_line": "a legacy line", "log_system": "-"},
        {**base, "log_format": LINE_FORMAT, "log_line": "POST /v1/chat 400 model=a\nFAKE [gomodel.access#info] b"},
        {**base, "log_format": LINE_FORMAT, "log_line": "no time", "log_time": None},
        {**base, "log_format": LINE_FORMAT, "log_line": ""},
        {**base, "log_format": LINE_FORMAT, "log_line": "level unknown", "log_level": None},
    ]


@pytest.mark.parametrize("event", _events(), ids=lambda event: str(event.get("log_line", event["log_format"]))[:20])
def test_classic_text_is_twisteds_text(event):
    text = ClassicText()
    assert text(event) == formatEventAsClassicLogText(event)
    assert text(dict(event, log_time=event["log_time"] and event["log_time"] + 0.2)) == \
        formatEventAsClassicLogText(dict(event, log_time=event["log_time"] and event["log_time"] + 0.2))


def test_a_line_break_in_a_logged_value_never_makes_a_second_line():
    event = _events()[4]
    assert ClassicText()(event).count("\n") == 2 and "\n\tFAKE" in ClassicText()(event)


def test_json_lines_carry_the_access_line_as_their_message(tmp_path):
    with open(tmp_path / "out", "w") as out:
        observer = JSONLineObserver(out)
        for event in _events()[:2]:
            observer(event)
    first, second = [json.loads(line) for line in (tmp_path / "out").read_text().splitlines()]
    assert first["message"] == "POST /v1/chat/completions 200 3.1ms" and first["status"] == 200
    assert first["time"] == "2025-12-02T08:08:45Z" and first["level"] == "info"
    assert second["message"] == "provider vllm (vllm)"


FOREGROUND = {"logger": None, "syslog": False, "nodaemon": True, "logfile": None}


@pytest.mark.parametrize("twistd, ours", [
    (FOREGROUND, True), (dict(FOREGROUND, logfile="-"), True), (dict(FOREGROUND, logfile="gateway.log"), False),
    (dict(FOREGROUND, syslog=True), False), (dict(FOREGROUND, logger="a.factory"), False),
    (dict(FOREGROUND, nodaemon=False), False), (None, False)])
def test_gomodel_writes_the_text_lines_only_where_twistd_would_write_them_to_stdout(twistd, ours, tmp_path):
    from gomodel.logs import log_observer
    from gomodel.tap import _twistd_logs_to_stdout

    assert _twistd_logs_to_stdout(twistd) is ours
    with open(tmp_path / "out", "w") as out:
        observer = log_observer(None, None, out, classic=_twistd_logs_to_stdout(twistd))
        assert isinstance(observer, TextObserver) is ours


class Out:
    """A file whose every flush is one write: what reaches the file descriptor, in order."""

    def __init__(self):
        self.pending, self.writes = "", []

    def write(self, text):
        self.pending += text

    def flush(self):
        if self.pending:
            self.writes.append(self.pending)
            self.pending = ""


@pytest.mark.parametrize("event", [e for e in _events() if "log_system" not in e and e["log_format"] == LINE_FORMAT
                                   and e["log_line"] and e["log_level"]], ids=lambda event: event["log_line"][:20])
def test_a_line_written_directly_is_the_line_of_its_event(event):
    by_event, direct = Out(), Out()
    TextObserver(by_event)(event)
    TextObserver(direct).write_line(event["log_time"], event["log_namespace"], event["log_level"].name,
                                    event["log_line"])
    assert direct.writes == by_event.writes and len(direct.writes) == 1


def test_with_a_clock_lines_wait_and_go_out_together_in_order():
    clock, out = Clock(), Out()
    observer = TextObserver(out, clock)
    observer.write_line(1764662925.75, "gomodel.access", "info", "first")
    observer.write_line(1764662925.8, "gomodel.access", "info", "second")
    assert out.writes == []
    clock.advance(LINE_DELAY)
    assert len(out.writes) == 1 and out.writes[0].splitlines()[0].endswith("] first")
    assert out.writes[0].count("\n") == 2
    observer.write_line(1764662926.0, "gomodel.access", "info", "third")
    observer({"log_level": LogLevel.warn, "log_namespace": "x", "log_format": "a warning", "log_time": 1764662926.1})
    assert out.writes[1].endswith("] third\n") and out.writes[2].endswith("] a warning\n")  # held lines first
    clock.advance(LINE_DELAY)
    assert len(out.writes) == 3 and not clock.getDelayedCalls()


class _CountingClock(Clock):
    """A clock that counts the timers armed on it."""

    armed = 0

    def callLater(self, delay, f, *args, **kwargs):
        self.armed += 1
        return super().callLater(delay, f, *args, **kwargs)


def test_lines_held_while_it_ticks_arm_no_timer_and_an_idle_tick_stops_it():
    clock, out = _CountingClock(), Out()
    observer = TextObserver(out, clock)
    observer.write_line(1764662925.75, "gomodel.access", "info", "first")  # starts the tick
    assert clock.armed == 1
    clock.advance(LINE_DELAY)
    assert out.writes[-1].endswith("] first\n") and clock.armed == 2  # (the tick's next)
    observer.write_line(1764662925.85, "gomodel.access", "info", "second")
    observer.write_line(1764662925.86, "gomodel.access", "info", "third")
    assert clock.armed == 2 and len(out.writes) == 1  # held, no timer armed for them
    clock.advance(LINE_DELAY)
    assert [line.split("] ", 1)[1] for line in out.writes[-1].splitlines()] == ["second", "third"]
    clock.advance(LINE_DELAY)  # nothing held: it stops
    assert not clock.getDelayedCalls() and len(out.writes) == 2
    observer.write_line(1764662926.0, "gomodel.access", "info", "fourth")  # starts it again
    clock.advance(LINE_DELAY)
    assert out.writes[-1].endswith("] fourth\n")


def test_held_lines_go_out_in_writes_a_pipe_keeps_whole():
    clock, out = Clock(), Out()
    observer = TextObserver(out, clock)
    for i in range(200):
        observer.write_line(1764662925.75, "gomodel.access", "info", f"POST /v1/chat {i} model=\u00e9t\u00e9")
    observer.write_line(1764662925.75, "gomodel.access", "info", "x" * (LINE_BYTES + 10))  # one line, too long
    observer.flush()
    sizes = [len(write.encode("utf-8")) for write in out.writes]
    assert len(out.writes) > 2 and all(size <= LINE_BYTES for size in sizes[:-1]) and sizes[-1] > LINE_BYTES
    lines = "".join(out.writes).splitlines()
    assert [line.split(" ")[4] for line in lines[:200]] == [str(i) for i in range(200)]
    assert all(write.endswith("\n") for write in out.writes)
    assert not clock.getDelayedCalls()


@pytest.mark.parametrize("text", ["model=m", "model=\u00e9t\u00e9"], ids=["ascii", "utf-8"])
def test_held_lines_are_cut_into_writes_of_whole_lines_when_they_go_out(text):
    clock, out = Clock(), Out()
    observer = TextObserver(out, clock)
    for i in range(HELD_LINES - 1):  # held, however many bytes: cut when written
        observer.write_line(1764662925.75, "gomodel.access", "info", f"POST /v1/chat {i} {'y' * 300} {text}")
    assert out.writes == [] and clock.getDelayedCalls()
    observer.write_line(1764662925.75, "gomodel.access", "info", "x" * (LINE_BYTES + 10))  # the last held: all go out
    assert not clock.getDelayedCalls()
    sizes = [len(write.encode("utf-8")) for write in out.writes]
    assert len(out.writes) > 2 and all(LINE_BYTES - 400 < size <= LINE_BYTES for size in sizes[:-2])
    assert sizes[-1] > LINE_BYTES and out.writes[-1].endswith("x" * (LINE_BYTES + 10) + "\n")
    lines = "".join(out.writes).splitlines()
    assert [line.split(" ")[4] for line in lines[:-1]] == [str(i) for i in range(HELD_LINES - 1)]
    assert all(write.endswith("\n") for write in out.writes)
    observer.write_line(1764662926.0, "gomodel.access", "info", "a")
    observer.write_line(1764662926.0, "gomodel.access", "info", "b")
    clock.advance(LINE_DELAY)
    assert out.writes[-1].endswith("] a\n" + out.writes[-1].splitlines()[1] + "\n") and len(sizes) + 1 == len(out.writes)


def _completed(clock):
    ctx = RequestContext(b"req1", b"POST", b"/v1/chat/completions", clock)
    ctx.provider, ctx.model, ctx.status = "vllm", "vllm/m\nFAKE", 200
    ctx.duration = 0.0031
    return ctx


def test_the_access_log_writes_its_line_directly_to_a_text_observer_alone():
    clock, direct, by_event = Clock(), Out(), Out()
    publisher = LogPublisher(TextObserver(direct, clock))
    AccessLog(Logger(namespace="gomodel.access", observer=publisher))(_completed(clock))
    assert direct.writes == []  # held by the text observer
    collected = []
    publisher.addObserver(TextObserver(by_event))
    publisher.addObserver(collected.append)  # another observer: events again, to every observer
    AccessLog(Logger(namespace="gomodel.access", observer=publisher))(_completed(clock))
    assert len(collected) == 1 and collected[0]["status"] == 200 and collected[0]["model"] == "vllm/m\nFAKE"
    assert len(direct.writes) == 2  # the held line, then the event's line
    first, second = direct.writes[0], direct.writes[1]
    assert first.split(" ", 1)[1] == second.split(" ", 1)[1] == by_event.writes[0].split(" ", 1)[1]
    assert first.endswith("ms request_id=req1 provider=vllm model=vllm/m\n\tFAKE\n")


def test_the_access_log_follows_the_text_observer_alone_as_observers_change():
    clock, first, second, collected = Clock(), Out(), Out(), []
    one, other = TextObserver(first, clock), TextObserver(second, clock)
    publisher = LogPublisher(one)
    log = AccessLog(Logger(namespace="gomodel.access", observer=publisher))
    log(_completed(clock))
    publisher.removeObserver(one)
    publisher.addObserver(other)  # another text observer, alone: the line goes to it, held
    log(_completed(clock))
    publisher.addObserver(collected.append)
    log(_completed(clock))  # two observers: an event to each
    publisher.removeObserver(collected.append)
    log(_completed(clock))  # alone again
    one.flush()
    other.flush()
    head = "[gomodel.access#info] POST"
    assert len(collected) == 1 and len(first.writes) == 1 and first.writes[0].count(head) == 1
    assert "".join(second.writes).count(head) == 3 and "".join(second.writes).count("m\n\tFAKE\n") == 3


class _Principal:
    def __init__(self, id):
        self.id = id


def _shaped(clock, replica=None, key=None, usage=None, status=200, outcome=None, error=None, retries=0,
            model="vllm/m", provider="vllm"):
    ctx = RequestContext(b"req1", b"POST", b"/v1/chat/completions", clock,
                         principal=None if key is None else _Principal(key))
    ctx.provider, ctx.model, ctx.status, ctx.replica, ctx.usage = provider, model, status, replica, usage
    ctx.duration, ctx.retries, ctx.error = 0.01234, retries, error
    ctx.outcome = outcome if outcome is not None else ("ok" if status < 400 else "error")
    return ctx


SHAPES = [
    {}, {"replica": 2}, {"replica": 0, "key": "k1", "usage": {"prompt_tokens": 3, "completion_tokens": 12}},
    {"replica": 0, "key": "k1", "usage": {"prompt_tokens": 3, "completion_tokens": 12}, "model": "a\nFAKE b"},
    {"replica": 0, "key": "k\n1", "usage": {"prompt_tokens": 3, "completion_tokens": 12}, "provider": None},
    {"replica": 1, "key": "k1", "usage": {"prompt_tokens": "3\nx", "completion_tokens": 1.5}},
    {"replica": 1, "key": "k1", "usage": {"prompt_tokens": True, "completion_tokens": 4}},
    {"replica": 1, "key": "k1", "usage": {"input_tokens": 5, "output_tokens": 6, "cache_read_input_tokens": 2}},
    {"replica": 1, "key": "k1", "usage": {"prompt_tokens": 3, "completion_tokens": 12}, "retries": 2},
    {"replica": 1, "key": "k1", "usage": {"prompt_tokens": 3}, "status": 502, "outcome": "stream_broken"},
    {"key": "k1", "status": 429, "error": "rate_limited", "model": None},
]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
def test_a_held_access_line_is_the_line_of_its_event_whatever_it_holds(shape):
    """The line the access log hands the text observer alone (formatted when it goes out) is, byte for byte, the
    line Twisted's classic text makes of the access log's event; in a write of many lines, in order."""
    clock, direct, by_event = Clock(), Out(), Out()
    publisher = LogPublisher(TextObserver(direct, clock))
    log = AccessLog(Logger(namespace="gomodel.access", observer=publisher))
    for _ in range(3):
        log(_shaped(clock, **shape))
    collected = []
    publisher.addObserver(collected.append)
    log(_shaped(clock, **shape))
    assert len(direct.writes) == 2 and direct.writes[0].count("[gomodel.access#info] POST") == 3
    by_event_line = formatEventAsClassicLogText(collected[0])
    TextObserver(by_event)(collected[0])
    assert by_event.writes == [by_event_line]
    assert direct.writes[1] == by_event_line
    untimed = re.compile(r"^\S+ ", re.M)  # (each line's time: the event's is its own)
    assert untimed.sub("", direct.writes[0]) == untimed.sub("", by_event_line) * 3


def test_held_access_lines_go_out_when_the_observer_is_flushed():
    """Lines held when the gateway stops (its last flush, once the reactor stopped) are written then, whole."""
    clock, out = Clock(), Out()
    observer = TextObserver(out, clock)
    log = AccessLog(Logger(namespace="gomodel.access", observer=LogPublisher(observer)))
    log(_shaped(clock, replica=0, key="k1", usage={"prompt_tokens": 3, "completion_tokens": 12}))
    log(_shaped(clock))
    assert out.writes == []
    observer.flush()
    assert len(out.writes) == 1 and out.writes[0].count("\n") == 2 and not clock.getDelayedCalls()
    assert "replica=0 key=k1 prompt_tokens=3 completion_tokens=12\n" in out.writes[0]


@pytest.mark.parametrize("shape", [SHAPES[3], SHAPES[1]], ids=["keyed", "plain"])
def test_without_a_clock_an_access_line_is_written_at_once_as_its_events(shape):
    clock, direct = Clock(), Out()
    publisher = LogPublisher(TextObserver(direct))
    log = AccessLog(Logger(namespace="gomodel.access", observer=publisher))
    log(_shaped(clock, **shape))
    collected = []
    publisher.addObserver(collected.append)
    log(_shaped(clock, **shape))
    untimed = re.compile(r"^\S+ ", re.M)
    assert len(direct.writes) == 2 and direct.writes[1] == formatEventAsClassicLogText(collected[0])
    assert untimed.sub("", direct.writes[0]) == untimed.sub("", direct.writes[1])


def test_json_lines_keep_each_events_scalar_fields_in_its_order_whatever_its_shape(tmp_path):
    """Every event's scalar fields, in its order, after time, level, namespace and message (which a field of the same
    name does not replace), its log_ fields and other values left out; events of one shape alike, whether a value of
    theirs is a scalar or not (a list, a dict), and a failure's traceback last."""
    from twisted.logger import LogLevel
    from twisted.python.failure import Failure

    def event(**fields):
        return {"log_format": "{a} {b}", "log_level": LogLevel.warn, "log_namespace": "ns", "log_time": 1764662925.5,
                **fields}

    try:
        raise ValueError("boom")
    except ValueError:
        failure = Failure()
    with open(tmp_path / "out", "w") as out:
        observer = JSONLineObserver(out)
        for e in (event(a=1, b="x", message="mine", c=None, d=2.5, e=True), event(a=[1], b="y", message="m", c={},
                  d=1.0, e=False), event(a=3, b="z", message="m", c=None, d=0.5, e=False),
                  event(b="only", a=7), event(a=1, b=2, traceback="own", log_failure=failure)):
            observer(e)
    lines = (tmp_path / "out").read_text().splitlines()
    head = '{"time":"2025-12-02T08:08:45Z","level":"warn","namespace":"ns",'
    assert lines[:4] == [
        head + '"message":"1 x","a":1,"b":"x","c":null,"d":2.5,"e":true}',
        head + '"message":"[1] y","b":"y","d":1.0,"e":false}',
        head + '"message":"3 z","a":3,"b":"z","c":null,"d":0.5,"e":false}',
        head + '"message":"7 only","b":"only","a":7}']
    last = json.loads(lines[4])
    assert list(last) == ["time", "level", "namespace", "message", "a", "b", "traceback"]
    assert last["message"] == "1 2" and "ValueError: boom" in last["traceback"]
