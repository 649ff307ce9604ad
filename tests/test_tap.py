"""The twistd plugin and service: discovery, makeService from a YAML file, clean stop."""

import contextlib
import gc
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time

import pytest
import pytest_twisted
import treq
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool

from gomodel import tap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def twistd(*args, env=None):
    run_env = dict(os.environ, **(env or {}))
    run_env["PYTHONPATH"] = REPO + os.pathsep + run_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args],
                          capture_output=True, text=True, env=run_env, timeout=60, cwd=REPO)


def test_twistd_lists_gomodel():
    result = twistd("--help")
    assert result.returncode == 0, result.stderr
    assert "gomodel" in result.stdout


def test_bad_config_exits_non_zero_naming_the_variable():
    result = twistd("-n", "--pidfile=", "gomodel", env={"HTTP_CONNECT_TIMEOUT": "never"})
    assert result.returncode != 0
    assert "HTTP_CONNECT_TIMEOUT" in result.stdout + result.stderr


def test_options_refuse_bad_config():
    options = tap.Options()
    with pytest.raises(usage.UsageError):
        options.parseOptions(["--config", "/nonexistent/gomodel.yaml"])


@pytest_twisted.ensureDeferred
async def test_make_service_serves_from_yaml_and_stops_cleanly(reactor, fake, tmp_path, monkeypatch):
    config = tmp_path / "gomodel.yaml"
    config.write_text(f"""
server:
  master_key: yaml-key
providers:
  local:
    type: vllm
    base_url: {fake.base_url}
""")
    for var in [v for v in os.environ if v.startswith(("VLLM_", "OPENAI_", "GOMODEL_"))]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("GOMODEL_DATA_DIR", str(tmp_path / "data"))
    options = tap.Options()
    options.parseOptions(["--config", str(config), "--listen", "tcp:0:interface=127.0.0.1"])
    frozen_before, threshold = gc.get_freeze_count(), gc.get_threshold()
    # makeService makes the reactor dispatch plainly (gomodel._twistedcompat.dispatch_plainly): the tests
    # after this one get it back as it was (with gomodel's poll under every call, test_lean's check of the
    # exceptions raised on a request's way took the test's own client for the gateway)
    monkeypatch.setattr(reactor, "doIteration", reactor.doIteration)
    for handler in ("sigInt", "sigTerm"):  # and its signal handlers (gomodel._twistedcompat.stop_once_on_signals)
        monkeypatch.setattr(reactor, handler, getattr(reactor, handler))
    service = tap.makeService(options)
    # the reactor runs already: the startup objects were frozen out of later GC passes at once,
    # and the youngest objects are collected less often
    assert gc.get_freeze_count() > frozen_before and gc.get_threshold()[0] == tap.GC_YOUNG
    assert gc.isenabled()  # off while the gateway was built, on again once the reactor ran
    gc.unfreeze()
    gc.set_threshold(*threshold)
    service.startService()
    pool = HTTPConnectionPool(reactor)
    try:
        port = (await service.listeners[0].whenListening()).getHost().port
        await service.registry.ready()
        response = await treq.get(f"http://127.0.0.1:{port}/v1/models", headers={"authorization": "Bearer yaml-key"},
                                  agent=Agent(reactor, pool=pool))
        assert response.code == 200
        body = await response.json()
        assert [m["id"] for m in body["data"]] == ["local/meta-llama/Llama-3.1-8B-Instruct"]
    finally:
        await pool.closeCachedConnections()
        await service.stopService()
    assert not service.running


@contextlib.contextmanager
def running_gateway(tmp_path, env, listen="tcp:0:interface=127.0.0.1"):
    """A twistd gomodel process listening on C{listen} (with C{env}), for the with block: its port; then it
    is stopped with SIGTERM and must exit with status 0. It listens before its reactor runs and handles
    signals: the block waits for an answer before it ends."""
    log_path = tmp_path / "gw.log"
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "OPENAI_", "GOMODEL_"))}
    run_env.update(env, PYTHONPATH=REPO, GOMODEL_DATA_DIR=str(tmp_path / "data"))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                                 "--pidfile=", "gomodel", "--listen", listen],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=run_env)
    try:
        deadline = time.monotonic() + 30
        while not (listening := re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        yield proc, int(listening.group(1))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log_path.read_text()


def _maps_of_a_running_gateway(tmp_path, env):
    """The memory map of a twistd gomodel process once it answers (then it is stopped)."""
    import http.client

    with running_gateway(tmp_path, env) as (proc, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/health")  # answered: the reactor runs (and handles the SIGTERM that stops it)
            assert conn.getresponse().status == 200
        finally:
            conn.close()
        with open(f"/proc/{proc.pid}/maps") as f:
            return f.read()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_openssl_is_loaded_only_for_https_upstreams(tmp_path):
    plain = _maps_of_a_running_gateway(tmp_path, {"VLLM_BASE_URL": "http://127.0.0.1:9/v1"})
    assert "cryptography" not in plain and "OpenSSL" not in plain
    tls = _maps_of_a_running_gateway(tmp_path, {"VLLM_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "sk"})
    assert "cryptography" in tls


_FREED_HEAP = """
from gomodel.tap import release_freed_heap
def resident_pages():
    return int(open("/proc/self/statm").read().split()[1])
blocks = [bytes(4000) for _ in range(20000)]  # about 80 MB of the C heap (over pymalloc's 512 bytes)
kept = blocks[::100]  # one in a hundred stays: the heap's top is in use, so glibc cannot shrink it itself
del blocks
before = resident_pages()
print(release_freed_heap(), before - resident_pages())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_the_heap_startup_freed_goes_back_to_the_system():
    out = subprocess.run([sys.executable, "-c", _FREED_HEAP], capture_output=True, text=True, timeout=60,
                         cwd=REPO, check=True).stdout.split()
    assert out[0] == "True"
    assert int(out[1]) * os.sysconf("SC_PAGE_SIZE") > 40 * 2 ** 20  # of the 79 MB freed in holes


class _Twistd(dict):
    """twistd's own options, as the gomodel options' parent."""


class _GatewayOptions:
    def __init__(self, **twistd):
        self.parent = _Twistd({"uid": None, "gid": None, **twistd})


def test_the_user_twistd_switches_to_is_known_before_it_switches():
    assert tap._runs_as(_GatewayOptions()) is None
    assert tap._runs_as(_GatewayOptions(uid=65534, gid=65533)) == (65534, 65533)
    assert tap._runs_as(_GatewayOptions(uid=65534)) == (65534, -1)  # twistd then takes the user's group
    assert tap._runs_as(object()) is None  # outside twistd


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a directory away needs root")
def test_the_shared_metrics_directory_belongs_to_the_user_the_workers_run_as(monkeypatch, reactor):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    triggers = []
    monkeypatch.setattr(reactor, "addSystemEventTrigger", lambda *args: triggers.append(args))
    tap._share_metrics(reactor, (65534, -1))
    path = os.environ.pop("PROMETHEUS_MULTIPROC_DIR")
    try:
        assert os.stat(path).st_uid == 65534
    finally:
        os.rmdir(path)
    assert triggers and triggers[0][:2] == ("after", "shutdown")


BAD_LISTEN = ["garbage", "tcp:abc", "", "tcp:0:interface=127.0.0.1:backlog=abc", "tcp:0:interface=127.0.0.1:bogus=1",
              "tcp:65536", "unix:/tmp/gomodel.sock:mode=abc", "ssl:0:privateKey=/nonexistent/key.pem",
              "unix:/nonexistent/dir/gomodel.sock", "tcp:８０８０", "tcp:0:interface=127.0.0.1:backlog=６４"]


@pytest.mark.parametrize("description", BAD_LISTEN)
def test_options_refuse_a_bad_listen_description_naming_it(description, tmp_path, monkeypatch):
    monkeypatch.setenv("GOMODEL_DATA_DIR", str(tmp_path))
    with pytest.raises(usage.UsageError) as raised:
        tap.Options().parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--listen", description])
    assert str(raised.value).startswith(f"--listen {description!r}: ")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("description, says", [
    # (Twisted's own words were "_TCP6ServerParser._parseServer() got multiple values for argument 'interface'")
    ("tcp6:0:interface=::1", r"escape the colons of an IPv6 address (interface=\:\:1)"),
    ("tcp:0:interface=fd00::5:backlog=64", r"escape the colons of an IPv6 address (interface=\:\:1)"),
    ("ssl:0:interface=2001:db8::1:privateKey=key.pem", r"escape the colons of an IPv6 address (interface=\:\:1)"),
    # (listened nowhere: "cannot listen on unix:: [Errno 2] No such file or directory: b''", after the start)
    ("unix:", "a unix: listener needs the socket's path (unix:/run/gomodel.sock)"),
])
def test_options_say_how_to_write_what_strports_misread(description, says, tmp_path, monkeypatch):
    monkeypatch.setenv("GOMODEL_DATA_DIR", str(tmp_path))
    with pytest.raises(usage.UsageError) as raised:
        tap.Options().parseOptions(["--listen", description])
    assert str(raised.value) == f"--listen {description!r}: {says}"


def test_options_take_good_listen_descriptions(tmp_path, monkeypatch):
    monkeypatch.setenv("GOMODEL_DATA_DIR", str(tmp_path))
    good = ["tcp:0", "tcp:port=8080:interface=127.0.0.1:backlog=64", r"tcp:9000:interface=\:\:1",
            "tcp6:0:interface=\\:\\:1", f"unix:{tmp_path}/gomodel.sock:mode=600"]
    options = tap.Options()
    options.parseOptions([arg for description in good for arg in ("--listen", description)])
    assert options.gateway_config.server.listen == tuple(good)


def test_twistd_refuses_a_bad_listen_description_in_one_line(tmp_path):
    """Before: a traceback from makeService (ssl: with no https upstream: 'import of OpenSSL halted')."""
    for description in ("garbage", "tcp:abc", "ssl:0"):
        result = twistd("-n", "--pidfile=", "gomodel", "--listen", description,
                        env={"GOMODEL_DATA_DIR": str(tmp_path / "data")})
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "Traceback" not in output
        [line] = [line for line in output.splitlines() if f"--listen {description!r}: " in line]
    assert "server.pem" in line  # ssl:'s default key file, which is not there


def _self_signed(tmp_path):
    """A key and a self-signed certificate for localhost, in one PEM file."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    path = tmp_path / "server.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize("form", ["PKCS8", "TraditionalOpenSSL"])
def test_options_refuse_an_encrypted_tls_key_instead_of_asking_for_its_passphrase(tmp_path, monkeypatch, form):
    """OpenSSL asked for the passphrase on the terminal: a gateway under systemd or Docker waited there."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "key.pem"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, getattr(serialization.PrivateFormat, form),
        serialization.BestAvailableEncryption(b"secret")))
    monkeypatch.setenv("GOMODEL_DATA_DIR", str(tmp_path))
    description = f"ssl:0:interface=127.0.0.1:privateKey={path}:certKey={_self_signed(tmp_path)}"
    with pytest.raises(usage.UsageError) as raised:
        tap.Options().parseOptions(["--listen", description])
    assert "is encrypted" in str(raised.value) and "secret" not in str(raised.value)


def test_twistd_listens_with_tls_without_an_https_upstream(tmp_path):
    """An ssl: description keeps OpenSSL (which the gateway otherwise leaves out with plain-HTTP upstreams)."""
    import http.client
    import ssl

    pem = _self_signed(tmp_path)
    with running_gateway(tmp_path, {"VLLM_BASE_URL": "http://127.0.0.1:9/v1"},
                         f"ssl:0:interface=127.0.0.1:privateKey={pem}") as (_, port):
        context = ssl.create_default_context(cafile=str(pem))
        conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            assert response.status == 200 and response.read() == b'{"status":"ok"}'
        finally:
            conn.close()


@pytest.mark.parametrize("workers", ["0", "-1", "257", "1000000000000000000000"])
def test_options_refuse_workers_out_of_range(workers, tmp_path, monkeypatch):
    monkeypatch.setenv("GOMODEL_DATA_DIR", str(tmp_path))
    with pytest.raises(usage.UsageError) as raised:
        tap.Options().parseOptions(["--workers", workers, "--listen", "tcp:0:interface=127.0.0.1"])
    assert str(raised.value) == f"--workers must be from 1 to {tap.MAX_WORKERS}"
    assert tap.MAX_WORKERS == 256


@pytest.mark.parametrize("workers", ["abc", "2.5", "1_0", "\u0662", ""])
def test_twistd_refuses_workers_that_are_no_number_naming_the_option(workers, tmp_path):
    result = twistd("-n", "--pidfile=", "gomodel", "--workers", workers, "--listen", "tcp:0:interface=127.0.0.1",
                    env={"GOMODEL_DATA_DIR": str(tmp_path)})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"--workers: invalid value {workers!r}: not a whole number" in output
    assert "Traceback" not in output and "int()" not in output


@pytest.mark.parametrize("args, problem", [
    (["--workers", "0"], "--workers must be from 1 to 256"),
    (["--listen", "nonsense:1"], "--listen 'nonsense:1': Unknown endpoint type: 'nonsense'"),
    (["--config", "/nonexistent/gomodel.yaml"], "configuration error: cannot read config file /nonexistent/gomodel.yaml"),
])
def test_the_gomodel_command_refuses_bad_options_in_one_line(args, problem, tmp_path):
    run_env = dict(os.environ, GOMODEL_DATA_DIR=str(tmp_path), PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", "from gomodel.cli import main; main()", *args],
                            capture_output=True, text=True, env=run_env, timeout=60, cwd=REPO)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""  # not twistd's whole usage text
    assert result.stderr.startswith(f"gomodel: {problem}") and result.stderr.count("\n") == 1, result.stderr


def test_options_take_the_most_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("GOMODEL_DATA_DIR", str(tmp_path))
    options = tap.Options()
    options.parseOptions(["--workers", "256", "--listen", "tcp:0:interface=127.0.0.1"])
    assert options.gateway_config.server.workers == 256  # nothing is started before makeService


@pytest.mark.parametrize("data_dir", ["a regular file", "/dev/null", "/proc/gomodel-nope"])
def test_twistd_refuses_an_unusable_data_dir_in_one_line(tmp_path, data_dir):
    if data_dir == "a regular file":
        data_dir = str(tmp_path / "data")
        (tmp_path / "data").write_text("")
    result = twistd("-n", "--pidfile=", "gomodel", "--listen", "tcp:0:interface=127.0.0.1",
                    env={"GOMODEL_DATA_DIR": data_dir, "VLLM_BASE_URL": "http://127.0.0.1:9/v1"})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    [line] = [line for line in output.splitlines() if "GOMODEL_DATA_DIR" in line]
    assert f"cannot use GOMODEL_DATA_DIR {data_dir}: " in line
    assert "Traceback" not in output and "StoreSweeper" not in output and "ResponseRetention" not in output
    if not data_dir.startswith("/proc/"):  # no directory there: found before the ports are bound
        assert "listening on" not in output


async def test_the_gateway_serves_as_the_image_runs_it_without_docstrings_or_asserts(reactor, fake, http, tmp_path):
    """The image runs the gateway under C{PYTHONOPTIMIZE=2} (-OO: 2.6 MiB less per process): inference, a
    managed key made through the admin API (Klein, werkzeug), the dashboard and a scrape all work so."""
    from types import SimpleNamespace

    from tests.support import in_thread, openai_client, until

    log_path = tmp_path / "gw.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "OPENAI_", "GOMODEL_"))}
    env.update(PYTHONOPTIMIZE="2", PYTHONPATH=REPO, GOMODEL_DATA_DIR=str(tmp_path / "data"),
               VLLM_BASE_URL=fake.base_url, GOMODEL_MASTER_KEY="master-key")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", "from gomodel.cli import main; main()",
                                 "--listen", "tcp:0:interface=127.0.0.1"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        def listening():
            return re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())

        await until(reactor, lambda: proc.poll() is not None or listening(), limit=30, what="the gateway to listen")
        assert proc.poll() is None, log_path.read_text()
        url = f"http://127.0.0.1:{listening().group(1)}"
        master = {"authorization": "Bearer master-key"}
        made = await http.post(url + "/admin/api/v1/auth-keys", json={"name": "team"}, headers=master)
        assert made.code == 201, await made.text()
        client = openai_client(SimpleNamespace(url=url), api_key=(await made.json())["value"])
        try:
            answer = await in_thread(client.chat.completions.create, model="vllm/meta-llama/Llama-3.1-8B-Instruct",
                                     messages=[{"role": "user", "content": "Hi"}])
        finally:
            client.close()
        assert answer.choices[0].message.content
        dashboard = await http.get(url + "/admin/dashboard")
        assert dashboard.code == 200 and b"<html" in (await dashboard.content()).lower()
        scrape = await http.get(url + "/metrics", headers=master)
        assert scrape.code == 200 and b"gomodel_requests_total{" in await scrape.content()
    finally:
        proc.send_signal(signal.SIGTERM)
        await until(reactor, lambda: proc.poll() is not None, limit=20, what="the gateway to stop")
    assert proc.returncode == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()


def test_help_names_the_command_it_was_asked_of_and_every_option(tmp_path):
    """C{gomodel --help} reads as that command's usage (not C{twistd [options] gomodel}, which the
    C{gomodel} command does not take), and both synopses name C{--workers}."""
    env = dict(os.environ, PYTHONPATH=REPO)
    command = subprocess.run([sys.executable, "-c", "from gomodel.cli import main; main()", "--help"],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    plugin = twistd("gomodel", "--help")
    assert command.returncode == plugin.returncode == 0, command.stderr + plugin.stderr
    synopsis = "gomodel [--listen STRPORT ...] [--config gomodel.yaml] [--workers N]"
    assert command.stdout.splitlines()[0] == "Usage: " + synopsis
    assert plugin.stdout.splitlines()[0] == "Usage: twistd [options] " + synopsis
    assert "--workers" in command.stdout and "--worker-child" not in command.stdout + plugin.stdout  # (internal)


def test_version_is_gomodels(tmp_path):
    """C{gomodel --version} (and C{twistd gomodel --version}) names gomodel's version, then Twisted's and
    Python's (before: Twisted's alone)."""
    import platform

    from twisted import version

    from gomodel import __version__

    env = dict(os.environ, PYTHONPATH=REPO)
    command = subprocess.run([sys.executable, "-m", "gomodel", "--version"], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=60)
    plugin = twistd("gomodel", "--version")
    expected = (f"gomodel {__version__} (Twisted {version.short()}, {platform.python_implementation()} "
                f"{platform.python_version()})")
    assert command.returncode == plugin.returncode == 0, command.stderr + plugin.stderr
    assert command.stdout.splitlines() == plugin.stdout.splitlines()[-1:] == [expected]


def test_help_keeps_its_texts_under_pythonoptimize(tmp_path):
    """-OO drops docstrings, which are twistd's options' help texts: C{gomodel --help} shows them all."""
    env = dict(os.environ, PYTHONPATH=REPO)
    plain, optimised = (subprocess.run([sys.executable, "-m", "gomodel", "--help"], capture_output=True, text=True,
                                       env=dict(env, PYTHONOPTIMIZE=level), cwd=tmp_path, timeout=60)
                        for level in ("", "2"))
    assert plain.returncode == optimised.returncode == 0
    assert "Listen on a strports description" in optimised.stdout
    assert optimised.stdout == plain.stdout


def test_a_worker_runs_under_the_primarys_interpreter_options(tmp_path):
    argv = subprocess.run([sys.executable, "-OO", "-X", "dev", "-c",
                           "from gomodel.workers import worker_argv; print(worker_argv(['--workers', '2']))"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), cwd=tmp_path,
                          timeout=60, check=True).stdout
    assert "'-OO'" in argv and "'-X', 'dev'" in argv and "'--workers'" not in argv


def _image_healthcheck():
    """The command of the Dockerfile's C{HEALTHCHECK} (its exec form), with this interpreter for C{python}."""
    with open(os.path.join(REPO, "Dockerfile")) as f:
        text = f.read().replace("\\\n", " ")
    [line] = [line for line in text.splitlines() if line.startswith("HEALTHCHECK ")]
    command = json.loads(line[line.index("CMD ") + 4:])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


async def test_the_images_healthcheck_passes_on_a_serving_gateway_and_fails_without_one(reactor, gateway):
    """The image's C{HEALTHCHECK} asks C{GET /health} on C{$PORT}: exit status 0 while the gateway serves,
    1 where nothing listens (a stopped gateway)."""
    import socket

    from tests.support import in_thread

    command = _image_healthcheck()

    def check(port):
        env = dict(os.environ, PORT=str(port))
        return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode

    assert await in_thread(check, gateway.port) == 0
    with socket.socket() as closed:  # (a free port: bound, never listening)
        closed.bind(("127.0.0.1", 0))
        assert await in_thread(check, closed.getsockname()[1]) == 1
