"""A lean process: what a gateway loads at start, and what twistd's plugin scan leaves behind.

Each check runs a real process and reads its C{sys.modules}, command line or
memory map: no timing, nothing that depends on the machine's speed.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.web.test.requesthelper import DummyRequest

from gomodel.api.lazy import LazyRoutes
from gomodel.periodic import Repeating
from tests.fakes.vllm import CHAT_MODEL
from tests.rawclient import connect
from tests.support import start_gateway, with_timeout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN_UPSTREAM = {"VLLM_BASE_URL": "http://127.0.0.1:9/v1"}
_OURS = ("VLLM_", "OPENAI_", "GROQ_", "OPENROUTER_", "XAI_", "DEEPSEEK_", "OLLAMA_", "GOMODEL_", "OTEL_", "REDIS_",
         "STORAGE_", "POSTGRES_", "METRICS_", "USAGE_", "ADMIN_")


def _env(tmp_path, env, pythonpath=REPO):
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}
    run_env.update(env, PYTHONPATH=pythonpath, GOMODEL_DATA_DIR=str(tmp_path / "data"))
    return run_env


def _built_in_child(tmp_path, env, before, after, *args) -> str:
    """The last line a child process printed that ran C{before} (code), built the gateway as twistd does (not
    started) from C{args} and C{env}, then ran C{after}; it must exit with status 0."""
    code = ("import json, sys\n" + before +
            "from gomodel.tap import Options, makeService\n"
            "options = Options()\n"
            "options.parseOptions(sys.argv[1:])\n"
            "makeService(options)\n" + after)
    result = subprocess.run([sys.executable, "-c", code, "--listen", "tcp:0:interface=127.0.0.1", *args],
                            capture_output=True, text=True, env=_env(tmp_path, env), timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1]


def _loaded_once_built(tmp_path, env, *args):
    """The modules a process has loaded once it built the gateway as twistd does (not started)."""
    return set(json.loads(_built_in_child(
        tmp_path, env, "", "print(json.dumps(sorted(name for name, module in sys.modules.items() "
                           "if module is not None)))", *args)))


def test_a_default_gateway_loads_nothing_it_does_not_use(tmp_path):
    loaded = _loaded_once_built(tmp_path, PLAIN_UPSTREAM)
    unused = {"klein", "werkzeug", "yaml", "psycopg", "psycopg_pool", "redis", "opentelemetry", "OpenSSL",
              "cryptography", "twisted.application.internet", "automat", "twisted.trial",
              "gomodel.api.app", "gomodel.api.admin", "gomodel.api.files", "gomodel.api.batches",
              "gomodel.accounting.tracing", "gomodel.store.postgresql", "gomodel.workers", "difflib",
              "prometheus_client.exposition", "http.server", "socketserver", "wsgiref.simple_server"}
    assert not {name for name in loaded if name in unused or name.split(".")[0] in unused}
    # what it does use (the default is everything on: metrics, usage in SQLite)
    assert {"prometheus_client", "sqlite3", "gomodel.api.plain", "gomodel.api.inference"} <= loaded


def test_what_is_configured_is_what_is_loaded(tmp_path):
    config = tmp_path / "gomodel.yaml"
    config.write_text("server:\n  master_key: k\n")
    loaded = _loaded_once_built(tmp_path, dict(PLAIN_UPSTREAM, METRICS_ENABLED="false"), "--config", str(config))
    assert "yaml" in loaded
    assert "prometheus_client" not in loaded


_PROMETHEUS_AFTER = """
import prometheus_client
left_out = [name for name in ("prometheus_client.exposition", "http.server", "wsgiref.simple_server")
            if name in sys.modules]
from prometheus_client import REGISTRY, Counter, generate_latest  # (a name of its own: its __init__ runs now)
Counter("lean_total", "A counter.").inc()
print(json.dumps({"left_out": left_out, "same": prometheus_client is sys.modules["prometheus_client"],
                  "text": generate_latest(REGISTRY).decode().count("lean_total 1.0"),
                  "servers": callable(prometheus_client.start_http_server)}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_prometheus_clients_package_is_made_without_its_http_servers_until_a_name_of_its_own_is_read(tmp_path, eager):
    """A built gateway has prometheus_client's series, registry and multiprocess collector, not its C{__init__},
    which imports its HTTP servers and push clients (loaded at the first scrape of /metrics); reading a name
    of the package runs it then, in the same module. C{GOMODEL_EAGER_IMPORTS=1}: at import, as usual."""
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), "", _PROMETHEUS_AFTER))
    servers = ["prometheus_client.exposition", "http.server", "wsgiref.simple_server"]
    assert found == {"left_out": servers if eager else [], "same": True, "text": 1, "servers": True}


_SCRAPED_AFTER = """
from types import SimpleNamespace
from gomodel.accounting.metrics import GatewayMetrics
metrics, loaded = GatewayMetrics(), []
for accept in (b"application/openmetrics-text; version=0.0.1,text/plain;version=0.0.4;q=0.5,*/*;q=0.1", None):
    headers = {}
    page = metrics.page(SimpleNamespace(getHeader={b"accept": accept}.get, setHeader=headers.__setitem__))
    loaded.append([headers[b"content-type"].decode().split(";")[0], page.endswith(b"# EOF\\n"),
                   "prometheus_client.exposition" in sys.modules, "http.server" in sys.modules])
print(json.dumps(loaded))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_a_prometheus_scrape_loads_no_http_server_and_a_plain_one_prometheus_clients_exposition(tmp_path, eager):
    """Prometheus' scrape (OpenMetrics asked for first) is answered from prometheus_client's OpenMetrics module,
    which imports nothing more; a plain one (curl) loads its exposition module then, without the standard library's
    HTTP servers (L{gomodel.lean.leave_http_servers_out}); C{GOMODEL_EAGER_IMPORTS=1}: all of them at start."""
    before = ("from gomodel.lean import leave_http_servers_out\n"
              "assert leave_http_servers_out() is " + str(not eager) + "\n")
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), before, _SCRAPED_AFTER))
    assert found == [["application/openmetrics-text", True, eager, eager], ["text/plain", False, True, eager]]


_SERVERS_LEFT_OUT_AFTER = """
from types import SimpleNamespace
from gomodel.accounting.metrics import GatewayMetrics
headers = {}
page = GatewayMetrics().page(SimpleNamespace(getHeader={}.get, setHeader=headers.__setitem__))
servers = ("http.server", "socketserver", "wsgiref.simple_server", "urllib.request", "http.client", "email.parser")
left_out = [name for name in servers if name in sys.modules]
import prometheus_client.exposition as exposition
refused = []
for use in (lambda: exposition.start_http_server(0, addr="127.0.0.1"), lambda: exposition.MetricsHandler(),
            lambda: exposition.push_to_gateway("127.0.0.1:9", "job", exposition.REGISTRY)):
    try:
        use()
    except RuntimeError as e:
        refused.append("left out of this process" in str(e))
import http.server, socketserver, wsgiref.simple_server, urllib.request
real = [module.__file__.endswith(".py") for module in (http.server, socketserver, wsgiref.simple_server, urllib.request)]
print(json.dumps({"left_out": left_out, "refused": refused, "real": real,
                  "text": headers[b"content-type"].startswith(b"text/plain") and b"# TYPE gomodel_requests_total" in page,
                  "handler": issubclass(http.server.SimpleHTTPRequestHandler, http.server.BaseHTTPRequestHandler)}))
"""


def test_prometheus_clients_text_format_is_imported_without_the_http_servers_and_clients_it_never_runs_here(tmp_path):
    """The C{gomodel} command imports prometheus_client's C{exposition} (a plain scrape's text format) with
    stand-ins for C{http.server}, C{socketserver}, C{wsgiref.simple_server} and C{urllib.request} (with
    C{http.client} and the C{email} parser, about 2 MiB): its own metrics server and push client, built on them,
    refuse to run (they are never run here); the next import of each is the real module."""
    before = ("from gomodel.lean import leave_cookiejar_out, leave_http_servers_out, leave_tls_out, "
              "load_rare_modules_on_use\n"
              "leave_tls_out()\n"
              "load_rare_modules_on_use()\n"
              "leave_cookiejar_out()\n"
              "assert leave_http_servers_out()\n")
    found = json.loads(_built_in_child(tmp_path, PLAIN_UPSTREAM, before, _SERVERS_LEFT_OUT_AFTER))
    assert found == {"left_out": [], "refused": [True, True, True], "real": [True, True, True, True], "text": True,
                     "handler": True}


_TLS_AFTER = """
import hashlib, hmac, json, sys, urllib.request
import gomodel.api.app, klein, werkzeug  # (what the first admin request loads)
left = sorted(name for name in ("ssl", "_ssl", "_hashlib") if name in sys.modules)
digest = hashlib.sha256(b"gomodel").hexdigest() + hmac.new(b"k", b"m", hashlib.sha256).hexdigest()
https_handler = hasattr(urllib.request, "HTTPSHandler")
import redis.connection  # (rediss://): an importer that needs ssl gets the real one, then
import ssl
print(json.dumps({"left": left, "digest": digest, "https_handler": https_handler,
                  "redis_ssl": redis.connection.SSL_AVAILABLE, "context": type(ssl.create_default_context()).__name__}))
"""


@pytest.mark.parametrize("keep", [False, True])
def test_the_gomodel_command_leaves_the_standard_librarys_tls_out(tmp_path, keep):
    """The C{gomodel} command leaves out C{ssl}, C{_ssl} and C{_hashlib} (libcrypto and libssl, about 4.5
    MiB of every process) where the standard library takes them as optional, the metrics on; hashes are the
    same, and an importer that needs TLS (redis-py for C{rediss://}) gets the real C{ssl} afterwards;
    C{GOMODEL_STDLIB_TLS=1} keeps them."""
    before = "from gomodel.lean import leave_tls_out\nassert leave_tls_out() is " + str(not keep) + "\n"
    found = json.loads(_built_in_child(tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_STDLIB_TLS="1" if keep else "0"), before,
                                       "assert 'prometheus_client' in sys.modules\n" + _TLS_AFTER))
    import hashlib
    import hmac
    assert found == {"left": ["_hashlib", "_ssl", "ssl"] if keep else [], "https_handler": keep,
                     "digest": hashlib.sha256(b"gomodel").hexdigest() + hmac.new(b"k", b"m", hashlib.sha256).hexdigest(),
                     "redis_ssl": True, "context": "SSLContext"}


_RARE = ("pdb", "getpass", "decimal", "pty", "gzip", "mimetypes", "twisted.web.util", "multipart", "ipaddress")
_RARE_AFTER = f"_RARE = {_RARE!r}\n" + """
first = {name: type(sys.modules[name]).__name__ if name in sys.modules else None for name in _RARE}
import decimal, gzip, mimetypes, pdb, pty, getpass  # (an import statement reads the module: a first use)
from twisted.web import util
import multipart
import ipaddress
used = [str(decimal.Decimal("1.25") * 2), len(gzip.decompress(gzip.compress(b"gomodel"))),
        mimetypes.guess_type("a.json")[0], callable(pdb.Pdb), callable(pty.openpty), callable(getpass.getuser),
        util._PRE("<a>"), multipart.parse_options_header("multipart/form-data; boundary=b"),
        ipaddress.ip_address("::1").version]
print(json.dumps({"first": first, "used": used,
                  "then": sorted({type(sys.modules[name]).__name__ for name in first})}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_gomodel_command_loads_modules_the_gateway_never_uses_on_their_first_use(tmp_path, eager):
    """Modules that twistd, Twisted's web server and prometheus_client import for paths the gateway never
    takes (a debugger, decimals of Perspective Broker, pseudo-terminals, gzip'd scrapes, mime types, the web
    server's HTML error pages and their templates, urllib.parse's check of a bracketed host), and the form parser of
    uploads, are loaded on first use;
    used, they are the real modules. C{GOMODEL_EAGER_IMPORTS=1}: loaded at import."""
    before = ("from gomodel.lean import leave_tls_out, load_rare_modules_on_use\n"
              "leave_tls_out()\n"
              "assert load_rare_modules_on_use() is " + str(not eager) + "\n"
              "import twisted.scripts.twistd, twisted.web.server\n")  # (the runner: pdb and getpass; twisted.web.util)
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), before, _RARE_AFTER))
    kind = "module" if eager else "_LazyModule"
    # (gzip and mimetypes: prometheus_client's HTTP servers import them, which a lean gateway has not)
    first = dict(dict.fromkeys(_RARE, kind), **({} if eager else {"gzip": None, "mimetypes": None}))
    assert found == {"first": first,
                     "used": ["2.50", 7, "application/json", True, True, True, "<pre>&lt;a&gt;</pre>",
                              ["multipart/form-data", {"boundary": "b"}], 6],
                     "then": ["module"]}


_COMPRESSORS_AFTER = """
first = {name: type(sys.modules[name]).__name__ if name in sys.modules else None for name in ("bz2", "lzma")}
maps = open("/proc/self/maps").read()
native = [name for name in ("libbz2", "liblzma", "_bz2.", "_lzma.") if name in maps]
import io, shutil, tarfile
archive = io.BytesIO()
with tarfile.open(fileobj=archive, mode="w:xz") as tar:  # (tarfile imports lzma: its first use)
    info = tarfile.TarInfo("a.txt")
    info.size = 2
    tar.addfile(info, io.BytesIO(b"hi"))
import bz2
print(json.dumps({"first": first, "native": native, "formats": sorted(name for name, _ in shutil.get_archive_formats()),
                  "xz": tarfile.open(fileobj=io.BytesIO(archive.getvalue())).extractfile("a.txt").read().decode(),
                  "bz2": bz2.decompress(bz2.compress(b"gomodel")).decode(),
                  "then": sorted({type(sys.modules[name]).__name__ for name in first})}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("eager", [False, True])
def test_the_gomodel_command_loads_bz2_and_lzma_on_their_first_use(tmp_path, eager):
    """Twisted's web server imports C{tempfile}, which imports C{shutil}, which checks that C{bz2} and C{lzma} import
    (for its archives, never made here): the C{gomodel} command loads them on their first use, so a built gateway maps
    neither their C modules nor libbz2 and liblzma; used, they are the real modules, and shutil still offers its
    archive formats. C{GOMODEL_EAGER_IMPORTS=1}: loaded at import."""
    before = ("from gomodel.lean import leave_tls_out, leave_zipfile_out, load_rare_modules_on_use\n"
              "leave_tls_out()\n"
              "assert load_rare_modules_on_use() is " + str(not eager) + "\n"
              "leave_zipfile_out()\n"  # (as the gomodel command: zipfile imports them too)
              "import twisted.scripts.twistd, twisted.web.server\n")
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), before, _COMPRESSORS_AFTER))
    kind = "module" if eager else "_LazyModule"
    assert found == {"first": {"bz2": kind, "lzma": kind},
                     "native": ["libbz2", "liblzma", "_bz2.", "_lzma."] if eager else [],
                     "formats": ["bztar", "gztar", "tar", "xztar", "zip"], "xz": "hi", "bz2": "gomodel",
                     "then": ["module"]}


_ASYNCIO_AFTER = """
from twisted.internet import defer
left_out = "asyncio" not in sys.modules
async def twice(x):
    return 2 * await defer.succeed(x)
@defer.inlineCallbacks
def thrice(x):
    return 3 * (yield defer.succeed(x))
got = []
defer.ensureDeferred(twice(2)).addCallback(got.append)
defer.Deferred.fromCoroutine(twice(3)).addCallback(got.append)
thrice(2).addCallback(got.append)
def gen():
    yield 1
async def coro():
    pass
c = coro()
samples = [gen(), c, 1, None, defer.succeed(1), [], twice]
ours = [defer.iscoroutine(o) for o in samples]
import asyncio, asyncio.coroutines  # (the first import after: the real module)
theirs = [asyncio.coroutines.iscoroutine(o) for o in samples]
c.close()
print(json.dumps({"left_out": left_out, "got": got, "same": ours == theirs, "ours": ours,
                  "real": asyncio.Future is asyncio.futures.Future and callable(asyncio.get_event_loop_policy)}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_gomodel_command_imports_twisteds_defer_without_asyncio(tmp_path, eager):
    """Twisted's C{defer} imports three names of asyncio (about 1.5 MiB and 35 modules, which the gateway
    never uses otherwise): the C{gomodel} command gives it a stand-in, whose C{iscoroutine} answers as
    asyncio's; coroutines and inlineCallbacks run as before, and the next C{import asyncio} gets the real
    module. C{GOMODEL_EAGER_IMPORTS=1}: the real one at once."""
    before = ("from gomodel.lean import import_defer_without_asyncio, leave_tls_out, load_rare_modules_on_use\n"
              "leave_tls_out()\n"
              "load_rare_modules_on_use()\n"
              "assert import_defer_without_asyncio() is " + str(not eager) + "\n"
              "import twisted.scripts.twistd\n")
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), before, _ASYNCIO_AFTER))
    assert found == {"left_out": not eager, "got": [4, 6, 6], "same": True,
                     "ours": [True, True, False, False, False, False, False], "real": True}


_ENTITIES_AFTER = """
import html
left_out = "html.entities" not in sys.modules
samples = ["&amp;&eacute;&notin;x &ampy &NotNestedLessLess; &#x41;&bogus;", "plain", "&lt;&gt;&quot;"]
unescaped = [html.unescape(s) for s in samples]
import html.entities
real = type(html.entities.html5) is dict and len(html.entities.html5) > 2000
print(json.dumps({"left_out": left_out, "unescaped": unescaped, "real": real, "escape": html.escape("<a&'>")}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_gomodel_command_imports_html_without_its_named_character_references(tmp_path, eager):
    """C{html} (Twisted imports its C{escape}) takes HTML5's table of named character references from
    C{html.entities} (about 0.33 MiB): the C{gomodel} command gives it a stand-in whose table loads the real one on
    its first read, so a built gateway has none; C{html.unescape} answers as before, and the next
    C{import html.entities} gets the real module. C{GOMODEL_EAGER_IMPORTS=1}: the real one at once."""
    before = ("from gomodel.lean import import_html_without_entities\n"
              "assert import_html_without_entities() is " + str(not eager) + "\n"
              "import twisted.web.server\n")
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), before, _ENTITIES_AFTER))
    import html
    samples = ["&amp;&eacute;&notin;x &ampy &NotNestedLessLess; &#x41;&bogus;", "plain", "&lt;&gt;&quot;"]
    assert found == {"left_out": not eager, "unescaped": [html.unescape(s) for s in samples], "real": True,
                     "escape": "&lt;a&amp;&#x27;&gt;"}


_PB_AFTER = """
import io
from twisted.web import server
from twisted.web.test.requesthelper import DummyChannel
left_out = "twisted.spread.pb" not in sys.modules
request = server.Request(DummyChannel())
request.site = None
request.content = io.BytesIO(b"x")
state = request.getStateToCopyFor("issuer")  # (a request copied for a Perspective Broker client)
from twisted.spread import pb
print(json.dumps({"left_out": left_out, "copied": state["content_data"].decode(),
                  "same": [pb.Copyable is server.Copyable, type(state["remote"]) is pb.ViewPoint],
                  "real": pb.__file__.endswith(".py")}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_gomodel_command_imports_twisteds_web_server_without_perspective_broker(tmp_path, eager):
    """Twisted's web server takes two names of Perspective Broker (C{twisted.spread.pb}) for its requests, both
    defined in C{twisted.spread.flavors}: the C{gomodel} command gives it a stand-in with them, so a built gateway has
    no C{pb} (nor banana, portals...); a request copied for a PB client is as before, and the next import of C{pb}
    gets the real module, the same classes. C{GOMODEL_EAGER_IMPORTS=1}: the real one at once."""
    before = ("from gomodel.lean import leave_perspective_broker_out, leave_tls_out, load_rare_modules_on_use\n"
              "leave_tls_out()\n"
              "load_rare_modules_on_use()\n"
              "assert leave_perspective_broker_out() is " + str(not eager) + "\n"
              "import twisted.scripts.twistd\n")
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), before, _PB_AFTER))
    assert found == {"left_out": not eager, "copied": "x", "same": [True, True], "real": True}


_CREDENTIALS_AFTER = """
left_out = "twisted.cred.credentials" not in sys.modules
from twisted.web import iweb
from twisted.web._auth.digest import DigestCredentialFactory  # (HTTP digest authentication: Twisted's credentials)
from twisted.internet.address import IPv4Address
from twisted.web.test.requesthelper import DummyRequest
request = DummyRequest([b""])
request.client = IPv4Address("TCP", "127.0.0.1", 80)
challenge = DigestCredentialFactory(b"md5", b"gomodel").getChallenge(request)
from twisted.cred import credentials
hashed = credentials.DigestedCredentials(b"u", b"GET", b"gomodel", {"response": b"x"})
print(json.dumps({"left_out": left_out, "realm": challenge["realm"].decode(),
                  "provided": [iweb.IUsernameDigestHash.providedBy(hashed), credentials.IUsernameDigestHash.providedBy(hashed)],
                  "real": credentials.__file__.endswith(".py")}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_gomodel_command_imports_twisteds_web_interfaces_without_its_credentials(tmp_path, eager):
    """Twisted's web interfaces import C{IUsernameDigestHash} of its credentials and name it in no code: the
    C{gomodel} command gives them a stand-in whose name reads and calls answer from the real interface, so a built
    gateway has no C{twisted.cred}; Twisted's HTTP digest authentication, used, gets the real module.
    C{GOMODEL_EAGER_IMPORTS=1}: the real one at once."""
    before = ("from gomodel.lean import leave_credentials_out, leave_perspective_broker_out, leave_tls_out, "
              "load_rare_modules_on_use\n"
              "leave_tls_out()\n"
              "load_rare_modules_on_use()\n"
              "leave_perspective_broker_out()\n"  # (Perspective Broker imports them too)
              "assert leave_credentials_out() is " + str(not eager) + "\n"
              "import twisted.scripts.twistd\n")
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), before, _CREDENTIALS_AFTER))
    assert found == {"left_out": not eager, "realm": "gomodel", "provided": [True, True], "real": True}


_COOKIEJAR_AFTER = """
left_out = sorted({"urllib.request", "http.client", "email.parser"} - set(sys.modules))
openssl = sys.modules.get("OpenSSL") is not None  # (the client came where the options had kept it out)
first = type(sys.modules["http.cookiejar"]).__name__
import twisted.web.client
annotation = twisted.web.client.CookieJar.__name__
from http.cookiejar import CookieJar  # (a first use: the real module)
import urllib.request
jar = CookieJar()
agent = twisted.web.client.CookieAgent(object(), jar)
print(json.dumps({"left_out": left_out, "first": first, "annotation": annotation, "jar": agent.cookieJar is jar,
                  "openssl": openssl,
                  "real": type(sys.modules["http.cookiejar"]).__name__ + " " + CookieJar.__module__,
                  "request": urllib.request.Request("http://a.example/x").host}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_gomodel_command_imports_twisteds_web_client_without_the_cookiejar_where_it_is_imported(tmp_path, eager):
    """Twisted's web client (the gateway's) names C{http.cookiejar}'s C{CookieJar} in annotations only, and its
    compat a deprecated alias of the module: the C{gomodel} command gives the client a stand-in and the compat the
    module loaded on first use, so a built gateway has neither it nor C{urllib.request}, C{http.client} and the
    C{email} parser it imports (about 0.7 MiB); used, it is the real module. C{GOMODEL_EAGER_IMPORTS=1}: the real one
    at once."""
    before = ("from gomodel.lean import import_defer_without_asyncio, leave_cookiejar_out, leave_tls_out, "
              "load_rare_modules_on_use\n"
              "leave_tls_out()\n"
              "load_rare_modules_on_use()\n"
              "assert leave_cookiejar_out() is " + str(not eager) + "\n"
              "import_defer_without_asyncio()\n"
              "import twisted.scripts.twistd\n")
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), before, _COOKIEJAR_AFTER))
    assert found == {"left_out": [] if eager else ["email.parser", "http.client", "urllib.request"],
                     "first": "module" if eager else "_LazyModule", "annotation": "CookieJar" if eager else "_Placeholder",
                     "jar": True, "openssl": False, "real": "module http.cookiejar", "request": "a.example"}


_ZIPFILE_AFTER = """
left_out = sorted({"zipfile", "twisted.python.zippath"} - set(sys.modules))
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import getPlugins
parsers = len(list(getPlugins(IStreamServerEndpointStringParser)))  # (a walk of the plugin packages)
still = sorted({"zipfile", "twisted.python.zippath"} - set(sys.modules))
import zipfile
with zipfile.ZipFile("a.zip", "w") as archive:
    archive.writestr("pkg/__init__.py", "")
from twisted.python import modules
archive = modules.ZipArchive("a.zip")
print(json.dumps({"left_out": left_out, "still": still, "parsers": parsers > 0, "archive": type(archive).__name__,
                  "listed": archive.listdir()}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_gomodel_command_imports_twisteds_module_walk_without_zipfile(tmp_path, eager):
    """Twisted's module walk (its plugin system: twistd's, the C{--listen} parser's) calls C{zippath.ZipArchive} for a
    zip archive on the path only: the C{gomodel} command gives it a stand-in that loads the real one on its first call,
    so neither C{zippath} nor C{zipfile} is loaded, nor after a walk of the plugins; called, it is the real one.
    C{GOMODEL_EAGER_IMPORTS=1}: the real one at once."""
    before = ("from gomodel.lean import leave_tls_out, leave_zipfile_out, load_rare_modules_on_use\n"
              "leave_tls_out()\n"
              "load_rare_modules_on_use()\n"
              "assert leave_zipfile_out() is " + str(not eager) + "\n"
              "import twisted.scripts.twistd\n")
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), before, _ZIPFILE_AFTER))
    out = [] if eager else ["twisted.python.zippath", "zipfile"]
    assert found == {"left_out": out, "still": out, "parsers": True, "archive": "ZipArchive", "listed": ["pkg"]}


@pytest.mark.parametrize("env", [{"REDIS_URL": "redis://127.0.0.1:6379/0"},
                                 {"STORAGE_TYPE": "postgresql", "POSTGRES_URL": "postgresql://postgres@127.0.0.1:5432/gomodel"}])
def test_the_gomodel_command_builds_a_gateway_whose_drivers_load_tls(tmp_path, env):
    """redis-py and psycopg import the real C{ssl} while the configuration is read, after twistd imported
    C{urllib.request} without it: prometheus_client, imported next, still finds the C{HTTPSHandler} it
    imports (before: an ImportError traceback at start, so C{REDIS_URL} or PostgreSQL never started)."""
    before = ("from gomodel.lean import leave_tls_out\n"
              "assert leave_tls_out()\n"
              "import urllib.request\n")  # (as twistd imports it, before the options are read)
    shown = _built_in_child(tmp_path, dict(PLAIN_UPSTREAM, **env), before, "print('prometheus_client' in sys.modules, "
                            "'ssl' in sys.modules, hasattr(urllib.request, 'HTTPSHandler'))")
    assert shown == "True True False"  # (urllib.request as it was imported: no HTTPS)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_gateway_run_by_the_gomodel_command_maps_no_libcrypto_and_serves_its_metrics(tmp_path):
    import http.client

    log_path = tmp_path / "gw.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", "from gomodel.cli import main; main()",
                                 "--listen", "tcp:0:interface=127.0.0.1"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_env(tmp_path, dict(PLAIN_UPSTREAM, METRICS_REQUIRE_KEY="false")), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not (listening := re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", int(listening.group(1)), timeout=10)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            assert response.status == 200 and b"gomodel_requests_in_flight" in response.read()
        finally:
            conn.close()
        with open(f"/proc/{proc.pid}/maps") as f:
            maps = f.read()
        assert "libcrypto" not in maps and "libssl" not in maps and "_ssl" not in maps
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log_path.read_text()


def test_the_gomodel_command_asks_twisted_for_no_plugin(tmp_path):
    code = ("import atexit, json, sys\n"
            "import twisted.plugin\n"
            "asked = []\n"
            "scan = twisted.plugin.getCache\n"
            "twisted.plugin.getCache = lambda package: asked.append(package.__name__) or scan(package)\n"
            "atexit.register(lambda: print(json.dumps({'asked': asked, 'plugins': sorted(\n"
            "    name for name in sys.modules if name.startswith('twisted.plugins.'))})))\n"
            "from gomodel.cli import main\n"
            "main(['--help'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=_env(tmp_path, PLAIN_UPSTREAM), timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--listen" in result.stdout  # gomodel's own options
    assert json.loads(result.stdout.splitlines()[-1]) == {"asked": [], "plugins": ["twisted.plugins.gomodel_plugin"]}


def _running_twistd(tmp_path, pythonpath):
    """C{(command line, memory map)} of a C{twistd -n gomodel} process once it listens (then it is stopped)."""
    log_path = tmp_path / "gw.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                                 "--pidfile=", "gomodel", "--listen", "tcp:0:interface=127.0.0.1"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_env(tmp_path, PLAIN_UPSTREAM, pythonpath), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not re.search(r"listening on 127\.0\.0\.1:\d+", log_path.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode()
        with open(f"/proc/{proc.pid}/maps") as f:
            return cmdline, f.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_twistd_hands_over_to_the_gomodel_runner_after_a_plugin_scan_or_not(tmp_path):
    # A plugin directory with no cache yet: twistd imports every module in it to find the
    # plugins, as on a fresh install, where Twisted's own load OpenSSL.
    plugins = tmp_path / "site" / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "lean_probe.py").write_text("import OpenSSL  # what Twisted's own plugins load on a scan\n")
    pythonpath = os.pathsep.join([str(tmp_path / "site"), REPO])

    cmdline, maps = _running_twistd(tmp_path, pythonpath)
    assert "gomodel.cli" in cmdline  # the same process, now the gomodel runner
    assert "cryptography" not in maps  # what the scan loaded is gone
    assert (plugins / "dropin.cache").exists()  # and twistd wrote the cache for next time

    warm = subprocess.run([sys.executable, "-c", "from twisted.plugin import IPlugin, getPlugins; "
                           "import twisted.plugins as p; list(getPlugins(IPlugin)); "
                           "import os; print(all(os.path.exists(os.path.join(d, 'dropin.cache')) for d in p.__path__ "
                           "if os.path.isdir(d) and any(n.endswith('.py') and n != '__init__.py' for n in os.listdir(d))))"],
                          capture_output=True, text=True, env=_env(tmp_path, {}, pythonpath), timeout=60)
    if warm.stdout.strip() != "True":
        pytest.skip("a plugin directory here cannot hold a cache: every twistd start scans")
    cmdline, maps = _running_twistd(tmp_path, pythonpath)
    assert "gomodel.cli" in cmdline  # with a cache too: what twistd's script imported is gone
    assert "_ssl." not in maps and "_hashlib." not in maps  # (the script's TLS: the runner leaves it out)


_WERKZEUG_AFTER = """
import gc
from gomodel.api.lazy import LazyRoutes
next(o for o in gc.get_objects() if isinstance(o, LazyRoutes)).app  # (what the first admin request builds)
left_out = [name for name in ("werkzeug.serving", "werkzeug.test", "werkzeug.wrappers", "http.server")
            if name in sys.modules]
import werkzeug
from werkzeug import Client  # (a name of its own: its __init__ runs now)
print(json.dumps({"left_out": left_out, "same": werkzeug is sys.modules["werkzeug"], "client": Client.__module__,
                  "server": werkzeug.run_simple.__module__}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_admin_routes_import_werkzeug_without_its_development_server_and_test_client(tmp_path, eager):
    """Klein's routes (the admin API's, the dashboard's), built at the first request for one, import werkzeug's
    package without its C{__init__}, which imports its development server and test client (with C{http.server}
    and its request and response wrappers), never used here; reading a name of the package runs it then, in the
    same module. C{GOMODEL_EAGER_IMPORTS=1}: at import, as usual."""
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), "", _WERKZEUG_AFTER))
    left = ["werkzeug.serving", "werkzeug.test", "werkzeug.wrappers", "http.server"]
    assert found == {"left_out": left if eager else [], "same": True, "client": "werkzeug.test",
                     "server": "werkzeug.serving"}


_KLEIN_AFTER = """
import gc, io
from gomodel.api.lazy import LazyRoutes
next(o for o in gc.get_objects() if type(o) is LazyRoutes).app  # (what the first admin request builds)
loaded = [name for name in ("twisted.web.template", "xml.sax", "pyexpat", "twisted.python.urlpath", "klein._form",
                            "klein._plating") if name in sys.modules]
import klein
from klein import Klein, Plating  # (a name of its own: its __init__ runs now)
from twisted.web import server
from twisted.web.template import Element, XMLString
from twisted.web.test.requesthelper import DummyChannel

class Page(Element):
    loader = XMLString("<p>a &amp; b</p>")

app = Klein()
app.route("/page")(lambda request: Page())  # (an IRenderable: Klein renders it with renderElement)
channel = DummyChannel()
channel.site = server.Site(app.resource())
request = server.Request(channel)
request.content = io.BytesIO()
request.requestReceived(b"GET", b"/page", b"HTTP/1.1")
print(json.dumps({"loaded": loaded, "same": klein is sys.modules["klein"], "plating": Plating.__module__,
                  "page": channel.transport.written.getvalue().decode().endswith("<p>a &amp; b</p>\\r\\n0\\r\\n\\r\\n")}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_admin_routes_import_klein_without_twisteds_templates(tmp_path, eager):
    """Klein's routes (the admin API's, the dashboard's), built at the first request for one, import klein's package
    without its C{__init__} (its forms, sessions and plating) and its app and resource with a stand-in for Twisted's
    templates (C{xml.sax}, C{pyexpat}, C{urlpath}), never used here: reading a name of the package runs it then, and a
    route that answers an element is rendered by the real templates, loaded then. C{GOMODEL_EAGER_IMPORTS=1}: at
    import, as usual."""
    before = ("from gomodel.lean import leave_cookiejar_out, leave_tls_out, load_rare_modules_on_use\n"
              "leave_tls_out()\n"
              "load_rare_modules_on_use()\n"  # (as the gomodel command: Twisted's web server loads its HTML pages on use)
              "leave_cookiejar_out()\n")
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), before, _KLEIN_AFTER))
    loaded = ["twisted.web.template", "xml.sax", "pyexpat", "twisted.python.urlpath", "klein._form", "klein._plating"]
    assert found == {"loaded": loaded if eager else [], "same": True, "plating": "klein._plating", "page": True}


_HYPERLINK_AFTER = """
import gc, io
from gomodel.api.lazy import LazyRoutes
next(o for o in gc.get_objects() if type(o) is LazyRoutes).app  # (what the first admin request builds)
loaded = [name for name in ("hyperlink", "idna") if name in sys.modules]
from klein import Klein, Requirer, RequestURL
from twisted.web import server
from twisted.web.test.requesthelper import DummyChannel

app, requirer = Klein(), Requirer()
requirer.require(app.route("/url"), url=RequestURL)(lambda url: url.child("x").to_text())  # (Klein's DecodedURL)
channel = DummyChannel()
channel.site = server.Site(app.resource())
request = server.Request(channel)
request.content = io.BytesIO()
request.requestHeaders.setRawHeaders(b"host", [b"a.example:8080"])
request.requestReceived(b"GET", b"/url", b"HTTP/1.1")
import hyperlink
print(json.dumps({"loaded": loaded, "url": channel.transport.written.getvalue().decode().split("\\r\\n")[-4],
                  "real": type(sys.modules["hyperlink"]).__name__ + " " + hyperlink.DecodedURL.__module__}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_admin_routes_import_klein_without_hyperlink(tmp_path, eager):
    """Klein's request metadata (imported by its resource) names hyperlink's C{DecodedURL} in annotations and calls it
    for a C{Requirer}'s C{RequestURL} only (never here): Klein's routes, built at the first request for one, import it
    with a stand-in whose class loads the real one on its first use, so neither hyperlink nor idna is loaded; a route
    that requires the URL gets it from the real one. C{GOMODEL_EAGER_IMPORTS=1}: at import, as usual."""
    before = ("from gomodel.lean import leave_cookiejar_out, leave_tls_out, load_rare_modules_on_use\n"
              "leave_tls_out()\n"
              "load_rare_modules_on_use()\n"
              "leave_cookiejar_out()\n")
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), before, _HYPERLINK_AFTER))
    assert found == {"loaded": ["hyperlink", "idna"] if eager else [], "url": "http://a.example:8080/url/x",
                     "real": "module hyperlink._url"}


_WERKZEUGS_RARE_AFTER = """
import gc, io
from gomodel.api.lazy import LazyRoutes
next(o for o in gc.get_objects() if type(o) is LazyRoutes).app  # (what the first admin request builds)
first = {name: type(sys.modules[name]).__name__ if name in sys.modules else None
         for name in ("difflib", "mimetypes", "pkgutil", "secrets")}
import werkzeug.routing.exceptions, werkzeug.security, werkzeug.utils
from werkzeug.datastructures import FileMultiDict
files = FileMultiDict()
files.add_file("file", io.BytesIO(b"{}"), filename="a.json")  # (its type guessed by FileStorage's module)
print(json.dumps({"first": first, "salt": len(werkzeug.security.gen_salt(8)), "type": files["file"].content_type,
                  "sent": werkzeug.utils.mimetypes.guess_type("a.json")[0],
                  "close": werkzeug.routing.exceptions.difflib.get_close_matches("usage", ["usages", "keys"]),
                  "found": "json.decoder" in werkzeug.utils.find_modules("json"),
                  "real": sorted(name for name in ("difflib", "mimetypes", "pkgutil", "secrets")
                                 if type(sys.modules[name]).__name__ == "module")}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_admin_routes_load_werkzeugs_rare_modules_on_their_first_use(tmp_path, eager):
    """werkzeug (Klein's routing), imported at the first request for Klein's routes, imports C{difflib} (a routing
    error's suggestion), C{mimetypes} (a file's type: C{send_file}, an uploaded C{FileStorage}), C{pkgutil}
    (C{find_modules}) and C{secrets} (C{gen_salt}), none of them used here: the C{gomodel} command's hooks load them on
    their first use (C{FileStorage}'s module's C{mimetypes} a stand-in), and each does what werkzeug asks of it then.
    C{GOMODEL_EAGER_IMPORTS=1}: at import, as usual."""
    before = ("from gomodel.lean import leave_cookiejar_out, leave_mimetypes_out, leave_tls_out, "
              "load_rare_modules_on_use\n"
              "leave_tls_out()\n"
              "load_rare_modules_on_use()\n"
              "leave_cookiejar_out()\n"
              "assert leave_mimetypes_out() is " + str(not eager) + "\n")
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), before, _WERKZEUGS_RARE_AFTER))
    rare = ["difflib", "mimetypes", "pkgutil", "secrets"]
    assert found == {"first": dict.fromkeys(rare, "module" if eager else "_LazyModule"), "salt": 8,
                     "type": "application/json", "sent": "application/json", "close": ["usages"], "found": True,
                     "real": rare}


_ZONES_AFTER = """
import gc
from gomodel.api.lazy import LazyRoutes
from twisted.web.test.requesthelper import DummyRequest
from gomodel.api.windows import time_zone
next(o for o in gc.get_objects() if type(o) is LazyRoutes).app  # (what the first admin request builds)
utc = str(time_zone(DummyRequest([b""])))  # (an admin request naming no zone)
loaded = [name for name in ("zoneinfo", "sysconfig") if name in sys.modules]
request = DummyRequest([b""])
request.requestHeaders.setRawHeaders(b"x-gomodel-timezone", [b"Asia/Kolkata"])
print(json.dumps({"loaded": loaded, "utc": utc, "zone": str(time_zone(request))}))
"""


def test_the_admin_routes_load_the_time_zone_database_for_a_request_that_names_a_zone(tmp_path):
    """The admin API's usage routes count days of the zone C{X-GoModel-Timezone} names, UTC without it: C{zoneinfo}
    (with its database's paths and C{sysconfig}) is imported by the first request that names one, not with the
    routes."""
    found = json.loads(_built_in_child(tmp_path, PLAIN_UPSTREAM, "", _ZONES_AFTER))
    assert found == {"loaded": [], "utc": "UTC", "zone": "Asia/Kolkata"}


_MARKUPSAFE_AFTER = """
import gc
from gomodel.api.lazy import LazyRoutes
next(o for o in gc.get_objects() if type(o) is LazyRoutes).app  # (what the first admin request builds)
loaded = "markupsafe" in sys.modules
import werkzeug.exceptions, werkzeug.utils
page = werkzeug.exceptions.NotFound("a <b>\\nc").get_description()  # (werkzeug's own HTML error page)
moved = werkzeug.utils.redirect("/x?a=<b>").get_data(as_text=True)
import markupsafe
print(json.dumps({"loaded": loaded, "page": page, "moved": "/x?a=&lt;b&gt;" in moved,
                  "real": type(werkzeug.exceptions.escape("<")).__module__ + " " + markupsafe.Markup.__module__}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_admin_routes_import_werkzeug_without_markupsafe(tmp_path, eager):
    """werkzeug's exceptions and utils (Klein's routing) escape with markupsafe for their own HTML pages only (an
    error's body, a redirect's), which the gateway never answers with: Klein's routes, built at the first request for
    one, import them with a stand-in whose C{escape} and C{Markup} load the real ones on their first call, so
    markupsafe is not loaded; werkzeug's pages are as before when asked for. C{GOMODEL_EAGER_IMPORTS=1}: at import."""
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), "", _MARKUPSAFE_AFTER))
    assert found == {"loaded": eager, "page": "<p>a &lt;b&gt;<br>c</p>", "moved": True, "real": "markupsafe markupsafe"}


_DATASTRUCTURES_AFTER = """
import gc
from gomodel.api.lazy import LazyRoutes
next(o for o in gc.get_objects() if type(o) is LazyRoutes).app  # (what the first admin request builds)
parts = ("accept", "auth", "cache_control", "csp", "etag", "file_storage", "range")
loaded = [part for part in parts if "werkzeug.datastructures." + part in sys.modules]
import werkzeug.datastructures, werkzeug.http
package = sys.modules["werkzeug.datastructures"]
from werkzeug.datastructures import Accept, MultiDict  # (a name of its own: its __init__ runs now)
print(json.dumps({"loaded": loaded, "same": werkzeug.datastructures is package, "accept": Accept.__module__,
                  "best": werkzeug.http.parse_accept_header("text/html;q=0.5, application/json").best,
                  "multi": MultiDict([("a", "1"), ("a", "2")]).getlist("a")}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_admin_routes_import_werkzeugs_data_structures_without_its_header_parsers(tmp_path, eager):
    """werkzeug's C{datastructures} package imports every data structure of it in its C{__init__}; Klein's routing
    takes four names of it (its multi-dicts and headers): Klein's routes, built at the first request for one, make it
    without its C{__init__} and serve those names from their modules, so the HTTP headers' structures (accept, auth,
    cache control, CSP, ETags, ranges, uploaded files) are not loaded; reading another name of the package runs it
    then, in the same module. C{GOMODEL_EAGER_IMPORTS=1}: at import, as usual."""
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), "", _DATASTRUCTURES_AFTER))
    parts = ["accept", "auth", "cache_control", "csp", "etag", "file_storage", "range"]
    assert found == {"loaded": parts if eager else [], "same": True, "accept": "werkzeug.datastructures.accept",
                     "best": "application/json", "multi": ["1", "2"]}


_PPRINT_AFTER = """
import gc
from gomodel.api.lazy import LazyRoutes
app = next(o for o in gc.get_objects() if type(o) is LazyRoutes).app  # (what the first admin request builds)
loaded = "pprint" in sys.modules
shown = repr(app.app.url_map)  # (werkzeug's map's repr: pprint's pformat of its rules)
import pprint
print(json.dumps({"loaded": loaded, "shown": shown.startswith("Map([<Rule ") and "/v1/usage" in shown,
                  "real": pprint.__file__.endswith(".py")}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_admin_routes_import_werkzeugs_routing_without_pprint(tmp_path, eager):
    """werkzeug's routing map calls C{pprint.pformat} for its C{repr} only: Klein's routes, built at the first request
    for one, import it with a stand-in whose C{pformat} loads the real one on its first call, so C{pprint} is not
    loaded; a map's C{repr} is as before. C{GOMODEL_EAGER_IMPORTS=1}: at import, as usual."""
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), "", _PPRINT_AFTER))
    assert found == {"loaded": eager, "shown": True, "real": True}


_TEMPLATES_AFTER = """
import gc
from gomodel.api.lazy import LazyRoutes
next(o for o in gc.get_objects() if isinstance(o, LazyRoutes)).app  # (what the first admin request builds)
loaded = [name for name in ("xml.sax.saxutils", "urllib.request", "http.client", "email.parser")
          if type(sys.modules.get(name)).__name__ == "module"]
from twisted.web.template import XMLString, flattenString
from xml.sax.saxutils import escape
import urllib.request
page = []
flattenString(None, XMLString("<p>a &amp; b</p>").load()[0]).addCallback(page.append)
print(json.dumps({"loaded": loaded, "page": page[0].decode(), "escape": escape("<"),
                  "request": urllib.request.Request("http://a.example/x").host}))
"""


def test_the_admin_routes_load_urllib_request_for_twisteds_templates_on_first_use(tmp_path):
    """Twisted's templates (which Klein's routes no longer import: L{test_the_admin_routes_import_klein_without_twisteds_templates})
    parse one at import (C{xml.sax}, whose C{saxutils} imports C{urllib.request} to open a template's system id: never
    here, and with it C{http.client} and the C{email} parser, about 0.6 MiB): with the C{gomodel} command's modules on
    first use, it is loaded on its first use."""
    before = ("from gomodel.lean import leave_cookiejar_out, leave_tls_out, load_rare_modules_on_use\n"
              "leave_tls_out()\n"
              "assert load_rare_modules_on_use()\n"
              "leave_cookiejar_out()\n")
    found = json.loads(_built_in_child(tmp_path, PLAIN_UPSTREAM, before, _TEMPLATES_AFTER))
    assert found == {"loaded": [], "page": "<p>a &amp; b</p>", "escape": "&lt;",
                     "request": "a.example"}


@pytest_twisted.ensureDeferred
async def test_plain_routes_answer_as_kleins_routes_do_and_load_no_klein(reactor, gateway):
    routes = gateway.service.site.resource._routes

    async def answer(head):
        client = await connect(reactor, gateway.port, head + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await with_timeout(reactor, client.lost, 10)
        lines = bytes(client.received).split(b"\r\n")
        return [line for line in lines if not line.lower().startswith((b"date:", b"x-request-id:"))]

    model = f"vllm/{CHAT_MODEL}"
    plain = [await answer(b"GET /health"), await answer(b"HEAD /health"), await answer(b"GET /health/ready"),
             await answer(b"GET /v1/models"), await answer(f"GET /v1/models/{model}".encode()),
             await answer(b"GET /v1/models/vllm/nope")]
    assert routes._app is None  # none of them needed Klein
    assert plain[0][0] == b"HTTP/1.1 200 OK" and plain[5][0] == b"HTTP/1.1 404 Not Found"
    # Other spellings of the same routes go to Klein: the answers are the same.
    klein = [await answer(b"GET /health/"), await answer(b"HEAD /health/"), await answer(b"GET /health/ready/"),
             await answer(b"GET /v1/models/"), await answer(f"GET /v1/models/{model.replace('/', '%2F')}".encode()),
             await answer(b"GET /v1/models/vllm%2Fnope")]
    assert routes._app is not None
    assert plain == klein


_MASTER = b"master-k"


async def _raw(reactor, port, head, body=b""):
    """The answer's status line, headers (but its date, request id and length) and body, to C{head} (with the
    master key and C{body}) on a new connection."""
    client = await connect(reactor, port, head + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: "
                           b"Bearer " + _MASTER + b"\r\nContent-Type: application/json\r\nContent-Length: "
                           + str(len(body)).encode() + b"\r\n\r\n" + body)
    await with_timeout(reactor, client.lost, 10)
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n")
             if not line.lower().startswith((b"date:", b"x-request-id:", b"content-length:"))]
    return lines, body


def _status_shown(body):
    """A providers' status without what the clock moves (a load report's age)."""
    found = json.loads(body)
    for provider in found["providers"]:
        for replica in provider["replicas"]:
            replica.pop("load_age_s")
    return found


def _key_shown(body):
    """A made key without what is its own (its id, secret and times)."""
    return {name: value for name, value in json.loads(body).items()
            if name not in ("id", "value", "redacted_value", "created_at", "updated_at")}


@pytest.mark.parametrize("budgets", ["true", "false"])
@pytest_twisted.ensureDeferred
async def test_a_fleets_readiness_check_and_key_provisioning_load_no_klein_and_answer_as_kleins_routes_do(
        reactor, fake, tmp_path, budgets):
    """C{GET /admin/api/v1/providers/status} and C{POST /admin/api/v1/auth-keys}, as a fleet sends them, are served
    by the front (L{gomodel.api.plain}): no Klein routes are built; their other spellings (a trailing slash, a
    query) go to Klein's, which answer the same."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": _MASTER.decode(),
                                       "GOMODEL_DATA_DIR": str(tmp_path), "BUDGETS_ENABLED": budgets})
    try:
        routes = gw.service.site.resource._routes
        key = json.dumps({"name": "fleet", "user_path": "/fleet", "rpm": 100, "models": ["vllm/"],
                          "budgets": [{"period": "daily", "max_tokens": 1000}] if budgets == "true" else []}).encode()
        bad = json.dumps({"name": "fleet", "rpm": 0}).encode()
        status = b"GET /admin/api/v1/providers/status"
        plain = [await _raw(reactor, gw.port, status), await _raw(reactor, gw.port, b"HEAD /admin/api/v1/providers/status"),
                 await _raw(reactor, gw.port, b"POST /admin/api/v1/auth-keys", key),
                 await _raw(reactor, gw.port, b"POST /admin/api/v1/auth-keys", bad),
                 await _raw(reactor, gw.port, b"POST /admin/api/v1/auth-keys", b"{not json")]
        assert routes._app is None  # none of them needed Klein
        klein = [await _raw(reactor, gw.port, status + b"/"),
                 await _raw(reactor, gw.port, b"HEAD /admin/api/v1/providers/status/"),
                 await _raw(reactor, gw.port, b"POST /admin/api/v1/auth-keys/", key),
                 await _raw(reactor, gw.port, b"POST /admin/api/v1/auth-keys/", bad),
                 await _raw(reactor, gw.port, b"POST /admin/api/v1/auth-keys?a=1", b"{not json")]
        assert routes._app is not None
        assert [lines for lines, _ in plain] == [lines for lines, _ in klein]
        assert [lines[0] for lines, _ in plain] == [b"HTTP/1.1 200 OK"] * 2 + [b"HTTP/1.1 201 Created"] + [
            b"HTTP/1.1 400 Bad Request"] * 2
        assert _status_shown(plain[0][1]) == _status_shown(klein[0][1])
        assert plain[1][1] == klein[1][1] == b""
        assert _key_shown(plain[2][1]) == _key_shown(klein[2][1])
        assert plain[3:] == klein[3:]
        # the key made without Klein is in the store and usable at once
        made = json.loads(plain[2][1])
        lines, body = await _raw(reactor, gw.port, f"GET /admin/api/v1/auth-keys/{made['id']}".encode())
        assert lines[0] == b"HTTP/1.1 200 OK" and json.loads(body)["name"] == "fleet"
        assert gw.service.keys.find(made["value"].encode()) is not None
        # a repeated argument is Klein's 400 (the admin routes take single values)
        lines, _ = await _raw(reactor, gw.port, status + b"?a=1&a=2")
        assert lines[0] == b"HTTP/1.1 400 Bad Request"
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_admin_calls_served_without_klein_are_klein_s_404_with_the_admin_api_off(reactor, fake, tmp_path):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": _MASTER.decode(),
                                       "GOMODEL_DATA_DIR": str(tmp_path), "ADMIN_ENDPOINTS_ENABLED": "false"})
    try:
        for head in (b"GET /admin/api/v1/providers/status", b"POST /admin/api/v1/auth-keys"):
            lines, _ = await _raw(reactor, gw.port, head, b"{}")
            assert lines[0] == b"HTTP/1.1 404 Not Found"
    finally:
        await gw.service.stopService()


def test_the_admin_calls_served_without_klein_import_none_of_it(tmp_path):
    """The handlers the front serves a fleet's admin calls with (L{gomodel.api.status}, L{gomodel.api.keys})
    import neither Klein nor werkzeug."""
    shown = _built_in_child(tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_MASTER_KEY="k"), "", (
        "import gomodel.api.keys, gomodel.api.status\n"
        "print(json.dumps(sorted(name for name in sys.modules if name.split('.')[0] in ('klein', 'werkzeug'))))"))
    assert json.loads(shown) == []


def test_klein_routes_are_built_without_the_apis_they_mount(tmp_path):
    """The first request for Klein's routes imports none of the APIs they mount (each at the first request for it:
    L{test_each_mounted_api_is_made_at_the_first_request_for_it})."""
    mounted = ["gomodel.anthropic.batches", "gomodel.api.admin", "gomodel.api.batches", "gomodel.api.budgets",
               "gomodel.api.files", "gomodel.api.keys", "gomodel.api.key_routes"]
    shown = _built_in_child(tmp_path, PLAIN_UPSTREAM, "", (
        "import gc\n"
        "from gomodel.api.lazy import LazyRoutes\n"
        "app = next(o for o in gc.get_objects() if type(o) is LazyRoutes).app\n"
        f"routes = [name for name in {mounted!r} if name in sys.modules]\n"
        "app._admin.api  # (the admin API, made: its keys API is not)\n"
        f"admin = [name for name in {mounted!r} if name in sys.modules]\n"
        "print(json.dumps([routes, admin]))"))
    assert json.loads(shown) == [[], ["gomodel.api.admin"]]


@pytest_twisted.ensureDeferred
async def test_each_mounted_api_is_made_at_the_first_request_for_it(reactor, gateway, http):
    import treq

    async def get(path):
        response = await http.get(gateway.url + path)
        await treq.content(response)
        return response.code

    app = gateway.service.site.resource._routes.app
    apis = {"files": app.files, "batches": app._batches, "message_batches": app._message_batches, "admin": app._admin}
    assert await get("/admin/api/v1/usage/summary") == 200
    assert {name: api._api is not None for name, api in apis.items()} == {
        "files": False, "batches": False, "message_batches": False, "admin": True}
    assert app._admin._budgets is None or app._admin._budgets._api is None  # (mounted in the admin API)
    assert app._admin._keys._api is None
    assert await get("/admin/api/v1/auth-keys") == 200 and app._admin._keys._api is not None
    assert await get("/v1/files") == 200 and await get("/v1/batches") == 200
    assert await get("/v1/messages/batches") == 200
    assert all(api._api is not None for api in apis.values())


def test_the_admin_api_loads_csv_for_its_first_csv_answer(tmp_path):
    shown = _built_in_child(tmp_path, PLAIN_UPSTREAM, "", (
        "import gc\n"
        "from gomodel.api.lazy import LazyRoutes\n"
        "from twisted.web.test.requesthelper import DummyRequest\n"
        "next(o for o in gc.get_objects() if type(o) is LazyRoutes).app._admin.api  # (the admin API, made)\n"
        "loaded = 'csv' in sys.modules\n"
        "from gomodel.api.admin import _csv\n"
        "body = _csv(DummyRequest([b'']), [{'day': '2026-01-01', 'note': 'a,b'}], ('day', 'note'))\n"
        "print(json.dumps([loaded, body.decode()]))"))
    assert json.loads(shown) == [False, 'day,note\r\n2026-01-01,"a,b"\r\n']


def test_klein_routes_that_cannot_be_built_answer_500_and_are_tried_again(logged_errors):
    attempts = []

    def make():
        attempts.append(1)
        raise OSError("the dashboard's assets are missing")

    routes = LazyRoutes(make)
    for _ in range(2):
        request = DummyRequest([b"admin"])
        request.path = b"/admin"
        body = routes.render(request)
        assert request.responseCode == 500 and b"internal_error" in body
    assert len(attempts) == 2
    assert logged_errors.flush(OSError) == 2
    assert routes.upload_sink(DummyRequest([b""]), b"GET", b"/v1/files", 0) is None  # builds nothing


def test_repeating_stops_after_the_call_in_progress(reactor):
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock

    clock, calls = Clock(), []

    def call():
        calls.append(Deferred())
        return calls[-1]

    service = Repeating(10, call, clock)
    service.startService()
    assert len(calls) == 1  # at start
    stopped = service.stopService()
    assert not stopped.called and service.running  # the call in progress is waited for
    calls[0].callback(None)
    assert stopped.called and not service.running
    clock.advance(60)
    assert len(calls) == 1


def test_a_failing_repeating_call_is_logged_and_not_repeated(logged_errors):
    from twisted.internet.task import Clock

    clock, calls = Clock(), []

    def call():
        calls.append(1)
        raise RuntimeError("broken")

    service = Repeating(10, call, clock)
    service.startService()
    clock.advance(30)
    assert len(calls) == 1
    assert logged_errors.flush(RuntimeError) == 1
    assert service.stopService().called


def test_the_request_paths_functions_make_no_closure_cell_per_call():
    """A comprehension, generator or lambda over a function's local makes that local a cell, made on
    every call (and read through it): the functions every relayed request runs keep to plain locals."""
    from gomodel.api.inference import InferenceRoutes, plan_model
    from gomodel.http.front import FrontResource
    from gomodel.http.handling import Handling
    from gomodel.limits.gate import Gate
    from gomodel.limits.limiter import Limiter
    from gomodel.proxy.exchange import UsageTap, _stream_rewrite
    from gomodel.proxy.relay import StreamRelay
    from gomodel.proxy.renamed import rewriting
    from gomodel.proxy.transfers import without_transfers
    from gomodel.routing.pool import ReplicaPool
    from gomodel.upstream.client import within
    from gomodel.upstream.openai_compatible import OpenAICompatibleProvider
    from gomodel.upstream.vllm import VLLMProvider

    hot = [ReplicaPool._choose, ReplicaPool._pick, ReplicaPool._lowest, ReplicaPool._slower,
           ReplicaPool._choose_paced, ReplicaPool._candidates,
           InferenceRoutes._completions, plan_model, StreamRelay.__init__, Gate.admit, Gate.completed,
           VLLMProvider.url, OpenAICompatibleProvider._header_lines, FrontResource.render, Handling._resume,
           OpenAICompatibleProvider.send, within, Limiter.admit, Limiter._answered,
           UsageTap.feed, UsageTap.finish, StreamRelay.dataReceived, StreamRelay.relay_whole, _stream_rewrite,
           rewriting, without_transfers]
    assert {f.__qualname__: f.__code__.co_cellvars for f in hot if f.__code__.co_cellvars} == {}


@pytest_twisted.ensureDeferred
async def test_a_relayed_chat_and_stream_raise_no_exception_on_the_way(reactor, gateway):
    """An exception made and caught costs its object, its traceback and often a formatted message (a
    missing attribute looked up): none reaches Python code between a request and its answer (those made
    and dropped inside C, as by C{bytes in bytes}, are not seen here; bench/instructions.sh counts them),
    plain or streamed, but the coroutines' own ends (StopIteration) and Twisted's accept loop reaching
    an empty queue (BlockingIOError). Only the gateway's side counts (a gomodel frame on the stack):
    the fake vLLM and the client run in this process too."""
    from tests.rawclient import chat_request

    async def chat(**extra):
        body = dict({"model": f"vllm/{CHAT_MODEL}", "messages": [{"role": "user", "content": "hi"}]}, **extra)
        client = await connect(reactor, gateway.port, chat_request(body, headers={"Connection": "close"}))
        await with_timeout(reactor, client.lost, 10)
        assert bytes(client.received).startswith(b"HTTP/1.1 200 OK"), bytes(client.received)[:200]

    raised = []

    background = f"{os.sep}gomodel{os.sep}store{os.sep}sweeps.py"

    def ours(frame):
        """The innermost gomodel frame on the stack (where the gateway called what raised), or None; None
        too for the gateway's work at intervals, which may fall in the window but is no request's: a
        LoopingCall (the usage ledger's flush) or the store's sweeper (its first discard of unfinished
        uploads starts the blob store's thread)."""
        innermost = None
        while frame is not None:
            if innermost is None and f"{os.sep}gomodel{os.sep}" in frame.f_code.co_filename:
                innermost = f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_qualname}"
            if frame.f_code.co_qualname == "LoopingCall.__call__" or frame.f_code.co_filename.endswith(background):
                return None
            frame = frame.f_back
        return innermost

    def trace(frame, event, arg):
        frame.f_trace_lines = False
        if event == "exception" and arg[0] not in (StopIteration, GeneratorExit, BlockingIOError):
            caller = ours(frame)
            if caller is not None:
                raised.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_qualname} "
                              f"{arg[0].__name__} (from {caller})")
        return trace

    await chat()
    await chat(stream=True)  # warm: first calls (imports, caches) are not the request path
    await gateway.service.store.started()  # and the store's start (its writer process spawned) is done
    sys.settrace(trace)
    try:
        await chat()
        await chat(stream=True)
    finally:
        sys.settrace(None)
    assert raised == [], raised


def test_a_lazy_api_whose_maker_raises_attribute_error_raises_it():
    """An C{AttributeError} out of the maker (a module without the name it imports) is that request's error,
    made once, not a recursion through C{__getattr__} (its name asked anew for the API it could not make)."""
    from gomodel.api.lazy import LazyAPI
    calls = []

    def make():
        calls.append(1)
        raise AttributeError("module 'gomodel.api.files' has no attribute 'FilesAPI'")

    api = LazyAPI(make)
    with pytest.raises(AttributeError, match="has no attribute 'FilesAPI'"):
        api.upload_sink
    assert calls == [1]
    with pytest.raises(AttributeError, match="has no attribute 'FilesAPI'"):
        api.app
    assert calls == [1, 1]  # (not kept: the next request makes it again)
    with pytest.raises(AttributeError):  # (read as the property: Python's own fallback, which ends here)
        api.api
    assert calls == [1, 1, 1]


_ZLIB_AFTER = """
loaded = "zlib" in sys.modules
import shutil
from twisted.web import client, server
from gomodel.proxy.exchange import uncoded
import zlib  # (the next import: the real module)
compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
gzipped = compressor.compress(b"hello") + compressor.flush()
print(json.dumps({"loaded": loaded, "archives": shutil._ZLIB_SUPPORTED, "decoded": uncoded(gzipped, [b"gzip"], 100).decode(),
                  "server": server.zlib.MAX_WBITS, "client": client.zlib.decompressobj(31).decompress(gzipped).decode(),
                  "real": type(zlib).__name__}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_gomodel_command_leaves_zlib_out_until_it_is_used(tmp_path, eager):
    """C{shutil} (its archives), Twisted's web server (gzip'd answers) and client (its decoding agent) import
    C{zlib} for what the gateway never does: the C{gomodel} command gives them a stand-in whose any name read is the
    real module's, and the gateway's own decoding of a compressed upstream answer imports it there, so a built
    gateway has no C{zlib} (nor libz); used, it is the real one. C{GOMODEL_EAGER_IMPORTS=1}: the real one at once."""
    before = ("from gomodel.lean import leave_tls_out, leave_zipfile_out, leave_zlib_out, load_rare_modules_on_use\n"
              "leave_tls_out()\n"
              "load_rare_modules_on_use()\n"
              "leave_zipfile_out()  # (zipfile imports it: the gomodel command leaves it out too)\n"
              "assert leave_zlib_out() is " + str(not eager) + "\n")
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), before, _ZLIB_AFTER))
    assert found == {"loaded": eager, "archives": True, "decoded": "hello", "server": 15, "client": "hello",
                     "real": "module"}


_UNICODEDATA_AFTER = """
loaded = "unicodedata" in sys.modules
import attr
from twisted.internet import endpoints
host = "gateway.example:8080".encode("idna")  # (werkzeug's routing, at each request for Klein's routes)
loaded = [loaded, "unicodedata" in sys.modules or type(sys.modules.get("stringprep")).__name__ == "module"]
made = attr.make_class("Caf\\u0065\\u0301", ["a"]).__name__  # (attrs normalizes the name: NFKC)
print(json.dumps({"loaded": loaded, "made": made, "host": endpoints.normalize("NFC", "e\\u0301"),
                  "idna": [host.decode(), "b\\u00fccher.example".encode("idna").decode()],
                  "real": "unicodedata" in sys.modules}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_gomodel_command_leaves_unicodedata_out_until_it_is_used(tmp_path, eager):
    """attrs, Twisted's endpoints and the C{idna} codec (werkzeug's routing encodes each request's host with it)
    import C{unicodedata} for a name or host that is not ASCII: the C{gomodel} command gives them a stand-in that
    loads the real one at its first use, so a built gateway has no C{unicodedata}, nor after an ASCII host is
    encoded; used, it normalizes and encodes as before. C{GOMODEL_EAGER_IMPORTS=1}: the real one at once."""
    before = ("from gomodel.lean import leave_tls_out, leave_unicodedata_out, load_rare_modules_on_use\n"
              "leave_tls_out()\n"
              "load_rare_modules_on_use()\n"
              "assert leave_unicodedata_out() is " + str(not eager) + "\n")
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), before, _UNICODEDATA_AFTER))
    assert found == {"loaded": [eager, eager], "made": "Caf\u00e9", "host": "\u00e9", "real": True,
                     "idna": ["gateway.example:8080", "xn--bcher-kva.example"]}


_EMAIL_AFTER = """
loaded = sorted(name for name in sys.modules if name == "email" or name.startswith("email."))
from twisted.web import http
from gomodel.routing.pool import retry_after_seconds
form = (b"--b\\r\\nContent-Disposition: form-data; name=\\"a\\"\\r\\n\\r\\n1\\r\\n--b--\\r\\n")
print(json.dumps({"loaded": loaded, "type": http._parseContentType(b"text/plain; charset=utf-8").decode(),
                  "form": {k.decode(): [v.decode() for v in vs] for k, vs in http._getMultiPartArgs(
                      form, b"multipart/form-data; boundary=b").items()},
                  "wait": retry_after_seconds(b"Thu, 01 Jan 1970 00:01:40 GMT", 40.0),
                  "real": type(http.EmailMessage()).__module__}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_gomodel_command_imports_twisteds_http_without_the_email_package(tmp_path, eager):
    """Twisted's HTTP imports the C{email} package to decode a form's body, which the gateway turns off, and the
    gateway's replica pool for a C{Retry-After} date (rare): the C{gomodel} command gives Twisted stand-ins that
    load the real ones at their first use, and the pool imports it there, so a built gateway has no C{email}
    package; used, it is the real one. C{GOMODEL_EAGER_IMPORTS=1}: Twisted's at once."""
    before = ("from gomodel.lean import leave_cookiejar_out, leave_email_out, leave_tls_out, load_rare_modules_on_use\n"
              "leave_tls_out()\n"
              "load_rare_modules_on_use()\n"
              "leave_cookiejar_out()  # (urllib.request imports it: the gomodel command leaves it out too)\n"
              "assert leave_email_out() is " + str(not eager) + "\n")
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), before, _EMAIL_AFTER))
    assert (found.pop("loaded") != []) is eager
    assert found == {"type": "text/plain", "form": {"a": ["1"]}, "wait": 60.0, "real": "email.message"}


_WERKZEUG_HTTP_AFTER = """
import gc
from gomodel.api.lazy import LazyRoutes
next(o for o in gc.get_objects() if type(o) is LazyRoutes).app  # (what the first admin request builds)
loaded = sorted(name for name in ("werkzeug.http", "werkzeug.sansio.http") if name in sys.modules)
from werkzeug.datastructures.headers import Headers
from werkzeug.datastructures.structures import HeaderSet
from werkzeug.sansio.utils import get_content_length
headers = Headers()
headers.add("Content-Disposition", "attachment", filename="a b.txt")  # (the headers' http.dump_options_header)
import werkzeug.http
print(json.dumps({"loaded": loaded, "header": headers["Content-Disposition"], "set": HeaderSet(["a b", "c"]).to_header(),
                  "chunked": get_content_length("12", "gzip, chunked"), "length": get_content_length("12"),
                  "real": type(werkzeug.http).__name__, "date": werkzeug.http.parse_date("Thu, 01 Jan 1970 00:00:00 GMT").year}))
"""


@pytest.mark.parametrize("eager", [False, True])
def test_the_admin_routes_import_werkzeug_without_its_http_module(tmp_path, eager):
    """werkzeug's data structures and sans-IO utils (Klein's routing) call its C{http} module to quote, dump and parse
    header values only, which the routing never does: Klein's routes, built at the first request for one, import them
    with a stand-in that loads the real one at its first use, so neither it nor its sans-IO C{http} is loaded (nor
    the C{email} package's C{utils}, where nothing else imports it); used, they answer as before. C{GOMODEL_EAGER_IMPORTS=1}: at import."""
    found = json.loads(_built_in_child(
        tmp_path, dict(PLAIN_UPSTREAM, GOMODEL_EAGER_IMPORTS="1" if eager else "0"), "", _WERKZEUG_HTTP_AFTER))
    assert found == {"loaded": ["werkzeug.http", "werkzeug.sansio.http"] if eager else [],
                     "header": 'attachment; filename="a b.txt"', "set": '"a b", c', "chunked": None, "length": 12,
                     "real": "module", "date": 1970}


def test_the_request_paths_functions_read_no_attribute_of_a_type_or_of_io():
    """CPython 3.11 specializes no read of a type's attribute (C{bytes.join}, C{chain.from_iterable}: the generic path,
    some 400 instructions each) nor, here, of the io module's: the functions every relayed request runs take a built-in
    type's such names looked up once, at import (a class of Python's read on a rare branch, an error's, is left be)."""
    import builtins
    import dis
    import types

    from gomodel._twistedcompat import keep_headers
    from gomodel.http.channel import GatewayChannel
    from gomodel.http.headers import copy_response_headers, media_type
    from gomodel.http.site import GatewayRequest

    hot = [GatewayChannel.on_headers_complete, GatewayChannel.writeHeaders, GatewayChannel.write, keep_headers,
           copy_response_headers, media_type, GatewayRequest.gotLength, GatewayRequest.write,
           GatewayRequest.handleContentChunk, GatewayRequest.process]
    HEAPTYPE = 1 << 9  # (Py_TPFLAGS_HEAPTYPE: a class made in Python; a built-in type has it not)
    found = []
    for f in hot:
        instructions = list(dis.get_instructions(f))
        for load, read in zip(instructions, instructions[1:]):
            if load.opname == "LOAD_GLOBAL" and read.opname == "LOAD_ATTR":
                owner = f.__globals__.get(load.argval, getattr(builtins, load.argval, None))
                built_in = isinstance(owner, type) and not owner.__flags__ & HEAPTYPE
                if built_in or (isinstance(owner, types.ModuleType) and owner.__name__ == "io"):
                    found.append(f"{f.__qualname__}: {load.argval}.{read.argval}")
    assert found == []
