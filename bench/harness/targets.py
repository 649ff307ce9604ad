"""The targets of the matrix: direct (no gateway), gomodel (bare, with a pool of
replicas, with everything on), LiteLLM, Portkey, vllm-router.

Each target knows how to install itself (idempotently, outside the repo for
the peers), start pinned to the gateway CPUs, say when it is ready, which
model names and headers a client uses through it, and its version.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

from . import proc

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(BENCH_DIR)

CHAT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PACED_MODEL = "paced"
EMBED_MODEL = "BAAI/bge-m3"
MODELS = (CHAT_MODEL, PACED_MODEL, EMBED_MODEL)

# Environment variables that would make a gateway register more upstreams or
# pick up someone else's keys: none of them reach a gateway under test.
_SCRUB = re.compile(r"^(VLLM_.*|GOMODEL_.*|LITELLM_.*|PORTKEY_.*|OPENAI_.*|ANTHROPIC_.*|.*_BASE_URL|.*_API_KEY)$")


def clean_env(extra):
    env = {k: v for k, v in os.environ.items() if not _SCRUB.match(k)}
    env.update(extra)
    return env


def http_get(url, headers=None, timeout=2.0):
    """(status, body bytes) or (None, error text)."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except Exception as e:  # connection refused while starting, etc.
        return None, str(e).encode()


def run_quiet(cmd, log, **kw):
    """Run an install step, appending its output to log; raise on failure."""
    with open(log, "ab") as f:
        f.write(("\n$ %s\n" % " ".join(shlex.quote(c) for c in cmd)).encode())
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
    if r.returncode != 0:
        raise RuntimeError("install step failed (%s): %s; see %s" % (r.returncode, " ".join(cmd), log))


class Target:
    name = "?"
    model_prefix = ""
    start_timeout = 120.0

    def __init__(self, ctx):
        self.ctx = ctx
        self.proc = None
        self.port = None
        self.log = os.path.join(ctx.run_dir, "%s.log" % self.name)
        self.unavailable = None  # reason text when the target cannot run

    # -- overridden
    def install(self):
        pass

    def version(self):
        return "?"

    def command(self):
        raise NotImplementedError

    def env(self):
        return clean_env({})

    def ready(self):
        raise NotImplementedError

    def headers(self):
        return {"Authorization": "Bearer " + self.ctx.api_key}

    # -- common
    def model(self, name):
        return self.model_prefix + name

    @property
    def base_url(self):
        return "http://127.0.0.1:%d" % self.port

    @property
    def root_pid(self):
        return self.proc.pid if self.proc else None

    def expected_listeners(self):
        """Processes that take connections once all are up (gomodel's --workers)."""
        return 1

    def serving(self):
        """Processes taking connections now (of expected_listeners())."""
        return 1 if self.proc is not None and self.proc.poll() is None else 0

    def after_ready(self):
        """What a started target needs once ready, before it is measured (a managed key)."""

    def start(self):
        self.launch()
        self.wait_ready()
        self.after_ready()

    def launch(self):
        """Spawn the target on a fresh port; returns at once (start() waits until it is ready)."""
        self.port = proc.free_port()
        cmd = self.command()
        with open(self.log, "ab") as f:
            f.write(("\n# %s  %s\n" % (time.strftime("%H:%M:%S"), " ".join(shlex.quote(c) for c in cmd))).encode())
            self.log_offset = f.tell()  # where this start's lines begin
        self.proc = proc.spawn(cmd, self.log, env=self.env(), cpus=self.ctx.gateway_cpus, cwd=self.ctx.run_dir)

    def wait_ready(self):
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with %s while starting; last lines of %s:\n%s"
                                   % (self.name, self.proc.returncode, self.log, tail(self.log)))
            ok, last = self.ready()
            if ok:
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError("%s not ready after %.0f s (%s); last lines of %s:\n%s"
                           % (self.name, self.start_timeout, last, self.log, tail(self.log)))

    def stop(self):
        proc.stop_tree(self.proc)
        self.proc = None

    def models_listed(self, path="/v1/models"):
        st, body = http_get(self.base_url + path, self.headers())
        if st != 200:
            return False, "GET %s -> %s %s" % (path, st, body[:120])
        try:
            ids = {m.get("id") for m in json.loads(body).get("data", [])}
        except ValueError:
            return False, "GET %s: not JSON" % path
        missing = [m for m in MODELS if self.model(m) not in ids]
        if missing:
            return False, "models not listed yet: %s" % missing
        return True, ""


def made_from_this_python(venv) -> bool:
    """Whether the venv at C{venv} was made from the interpreter this harness runs on (its base), so that
    the Python targets of one run share one CPython build (bench/run.sh picks it)."""
    try:
        with open(os.path.join(venv, "pyvenv.cfg")) as f:
            cfg = {k.strip(): v.strip() for k, v in (line.split("=", 1) for line in f if "=" in line)}
    except OSError:
        return False
    made_from = cfg.get("executable") or os.path.join(cfg.get("home", ""), "python3")
    return os.path.realpath(made_from) == os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def tail(path, n=15):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(re.sub(r"\x1b\[[0-9;]*m", "", l) for l in lines[-n:])
    except OSError:
        return ""


def wait_workers(target, n, timeout=60.0):
    """Target.start() returns when the primary answers; its workers start after
    it and take connections a second or more later. Wait until N processes take
    connections, then until 10*N readiness checks in a row succeed, each on a new
    connection (dealt to each of the N in turn, so each process answers 10 of
    them: a worker that has not loaded its models yet fails one). Returns the
    number of processes taking connections."""
    deadline = time.monotonic() + timeout
    good, last = 0, ""
    while time.monotonic() < deadline:
        if target.proc is None or target.proc.poll() is not None:
            raise RuntimeError("%s exited while its workers started" % target.name)
        serving = target.serving()
        if serving < n:
            good, last = 0, "%d of %d processes taking connections" % (serving, n)
            time.sleep(0.1)
            continue
        ok, last = target.ready()
        good = good + 1 if ok else 0
        if good >= 10 * n:
            return serving
        time.sleep(0.02 if ok else 0.25)
    raise RuntimeError("%d workers not ready after %.0f s (%s)" % (n, timeout, last))


class Direct(Target):
    """Client straight to the mock: the baseline every gateway is compared with."""
    name = "direct"

    def start(self):
        self.port = self.ctx.mock_port

    def stop(self):
        pass

    def version(self):
        return "mock (bench/mock/mock.mjs)"

    @property
    def root_pid(self):
        return None


class GoModel(Target):
    """This project's gateway, as its Docker image starts it: the C{gomodel} command (twistd's runner with
    gomodel's plugin alone; C{GOMODEL_CMD='{twistd} -n --pidfile= gomodel ...'} for the twistd plugin)."""
    name = "gomodel"
    model_prefix = "vllm/"
    DEFAULT_CMD = "{gomodel} --listen tcp:{port}:interface=127.0.0.1"

    def python(self):
        return self.ctx.args.gomodel_python or os.environ.get("GOMODEL_PYTHON") or sys.executable

    def _importable(self):
        r = subprocess.run([self.python(), "-c", "import gomodel.tap"], capture_output=True, text=True)
        return r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1]

    def install(self):
        self._install()
        if not self.unavailable:
            # As the Docker image does at build: a stale dropin.cache makes the first
            # twistd start import every Twisted plugin (OpenSSL included, +12 MiB RSS).
            subprocess.run([self.python(), "-c", "from twisted.plugin import IPlugin, getPlugins; "
                            "list(getPlugins(IPlugin))"], capture_output=True)
            # As pip does for an installed package: the checkout's bytecode, compiled once. Without
            # it (PYTHONDONTWRITEBYTECODE, set on these machines and in the image) every start
            # compiles gomodel again: about 0.15 s of each cold start.
            env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
            subprocess.run([self.python(), "-m", "compileall", "-q", "gomodel", "twisted/plugins"],
                           cwd=REPO_DIR, env=env, capture_output=True)
            # It runs as the image runs it (L{env}: PYTHONOPTIMIZE=2), whose bytecode without docstrings the
            # image compiles at build for the standard library and every package: so here, once (then up to
            # date), into a cache of the bench's own (PYTHONPYCACHEPREFIX: the system's stdlib is left as it is).
            paths = subprocess.run([self.python(), "-c", "import sysconfig; p = sysconfig.get_paths(); "
                                    "print(p['stdlib']); print(p['purelib'])"], capture_output=True, text=True)
            subprocess.run([self.python(), "-m", "compileall", "-q", "-o", "2", "-x", "/(test|tests|idle_test)/",
                            *paths.stdout.split(), "gomodel", "twisted/plugins"],
                           cwd=REPO_DIR, env=dict(env, PYTHONPYCACHEPREFIX=self.bytecode()), capture_output=True)

    def bytecode(self):
        """Where its optimised bytecode is kept (L{install}), beside its interpreter's venv."""
        return os.path.join(os.path.dirname(os.path.dirname(self.python())), "gomodel-bytecode-opt2")

    def _install(self):
        ok, err = self._importable()
        stamp = os.path.join(os.path.dirname(os.path.dirname(self.python())), ".bench-gomodel-installed")
        setup = os.path.join(REPO_DIR, "setup.py")
        stale = (os.path.exists(setup) and os.path.exists(stamp)
                 and os.path.getmtime(setup) > os.path.getmtime(stamp))
        if ok and not stale and not self.ctx.args.reinstall_gomodel:
            return
        if not os.path.exists(setup) and not os.path.exists(os.path.join(REPO_DIR, "pyproject.toml")):
            self.unavailable = "gomodel is not importable (%s) and %s has no setup.py yet" % (err, REPO_DIR)
            return
        if self.ctx.args.no_install:
            self.unavailable = "gomodel is not importable (%s) and --no-install was given" % err
            return
        log = os.path.join(self.ctx.run_dir, "install-gomodel.log")
        run_quiet([self.python(), "-m", "pip", "install", "-q", "-e", REPO_DIR,
                   "--config-settings", "editable_mode=compat"], log)
        with open(stamp, "w") as f:
            f.write(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        ok, err = self._importable()
        if not ok:
            self.unavailable = "gomodel still not importable after pip install -e: %s" % err

    def version(self):
        r = subprocess.run([self.python(), "-c", "import importlib.metadata as m; print(m.version('gomodel'))"],
                           capture_output=True, text=True)
        v = r.stdout.strip() or "?"
        g = subprocess.run(["git", "-C", REPO_DIR, "describe", "--always", "--dirty"], capture_output=True, text=True)
        rev = g.stdout.strip() or "no commit"
        return "%s (git %s)" % (v, rev)

    @property
    def workers(self):
        # --scaling sets ctx.gomodel_workers per measurement, --protocol for the run
        return getattr(self.ctx, "gomodel_workers", None) or self.ctx.args.gomodel_workers

    def expected_listeners(self):
        return self.workers

    def serving(self):
        return proc.serving_processes(self.log, self.log_offset)

    def command(self):
        tmpl = self.ctx.args.gomodel_cmd or os.environ.get("GOMODEL_CMD") or self.DEFAULT_CMD
        workers = self.workers
        if workers > 1 and "{workers}" not in tmpl:
            tmpl += " --workers {workers}"
        return shlex.split(tmpl.format(twistd=self._script("twistd"), gomodel=self._script("gomodel"),
                                       python=self.python(), port=self.port, workers=workers, mock=self.ctx.mock_url))

    def _script(self, name):
        """The console script C{name} of the gateway's interpreter (beside it), else the one on C{PATH}."""
        path = os.path.join(os.path.dirname(self.python()), name)
        return path if os.path.exists(path) else shutil.which(name) or name

    def env(self):
        # Access log off, as LiteLLM's logging is: the same footing for every gateway. Optimised, as the
        # image runs it (Dockerfile: 2.6 MiB less per process, no docstrings).
        extra = {"VLLM_BASE_URL": self.ctx.mock_url + "/v1", "GOMODEL_ACCESS_LOG": "false", "PYTHONOPTIMIZE": "2",
                 "PYTHONPYCACHEPREFIX": self.bytecode()}
        if self.ctx.api_key:
            extra["GOMODEL_MASTER_KEY"] = self.ctx.api_key
        return clean_env(extra)

    def ready(self):
        st, body = http_get(self.base_url + "/health")
        if st != 200:
            return False, "GET /health -> %s" % st
        return self.models_listed()


class GoModelPool(GoModel):
    """gomodel with one provider of N replicas (N mocks, `--pool-replicas`, default 4): what
    routing over a replica pool costs on top of the `gomodel` target's single upstream."""
    name = "gomodel-pool"

    def env(self):
        env = super().env()
        env["VLLM_BASE_URL"] = ",".join(u + "/v1" for u in self.ctx.mock_urls)
        return env

    def ready(self):
        ok, why = super().ready()
        if not ok:
            return ok, why
        st, body = http_get(self.base_url + "/admin/api/v1/providers/status", self.headers())
        if st != 200:
            return False, "GET /admin/api/v1/providers/status -> %s" % st
        states = [r.get("state") for p in json.loads(body).get("providers", []) for r in p.get("replicas", [])]
        if states.count("ready") != len(self.ctx.mock_urls):
            return False, "replicas: %s" % states
        return True, ""


class _ManagedKey:
    """A gomodel target whose requests are made with a managed key (`KEY_FIELDS`, made through the
    admin API with the master key once the gateway is ready), on a fresh data directory."""
    KEY_FIELDS = {}

    def __init__(self, ctx):
        super().__init__(ctx)
        self.key = None
        self.key_id = None

    def env(self):
        env = super().env()
        # a fresh store per start: keys, usage records and the ledger's SQLite file
        data = os.path.join(self.ctx.run_dir, "%s-data-%s" % (self.name, time.strftime("%H%M%S")))
        env.update({"RATE_LIMITS_ENABLED": "true", "BUDGETS_ENABLED": "true", "GOMODEL_DATA_DIR": data})
        return env

    def master_headers(self):
        return {"Authorization": "Bearer " + self.ctx.api_key}

    def headers(self):
        return {"Authorization": "Bearer " + self.key} if self.key else self.master_headers()

    def ready(self):
        # readiness is the gateway's (master key); the managed key comes after
        key, self.key = self.key, None
        try:
            return super().ready()
        finally:
            self.key = key

    def after_ready(self):
        """Create the managed key (admin API, master key), then wait until a
        request made with it is answered (every process sees a new key within
        about a second)."""
        if not self.ctx.api_key:
            raise RuntimeError("%s needs a master key (it makes a managed key with it); drop --no-auth" % self.name)
        body = json.dumps(dict(self.KEY_FIELDS, name="bench-%s-%d" % (self.name, self.port))).encode()
        req = urllib.request.Request(self.base_url + "/admin/api/v1/auth-keys", data=body, method="POST",
                                     headers=dict(self.master_headers(), **{"Content-Type": "application/json"}))
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                made = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError("POST /admin/api/v1/auth-keys -> %s %s" % (e.code, e.read()[:200]))
        self.key, self.key_id = made["value"], made["id"]
        deadline = time.monotonic() + 15
        good = 0
        while good < 10 * self.expected_listeners():
            ok, why = self.models_listed()
            good = good + 1 if ok else 0
            if time.monotonic() > deadline:
                raise RuntimeError("the managed key is not accepted: %s" % why)
            time.sleep(0.02 if ok else 0.2)

    def stop(self):
        super().stop()
        self.key = None


class GoModelKey(_ManagedKey, GoModel):
    """The bare `gomodel` target (one upstream, access log off), its requests made with a managed
    key that has a rate limit (requests and tokens a minute) and a daily token budget, all far
    above the load: what a managed key costs against the master key (issue: within 10 %)."""
    name = "gomodel-key"
    KEY_FIELDS = {"user_path": "/bench/key", "rpm": 1_000_000_000, "tpm": 1_000_000_000_000,
                  "budgets": [{"period": "daily", "max_tokens": 10_000_000_000_000}]}


class GoModelFeatures(_ManagedKey, GoModelPool):
    """gomodel with everything a production deployment turns on: one provider of
    `--pool-replicas` replicas, requests made with a managed key that has a rate
    limit, a concurrency limit, a model allowlist and a budget (all far above
    the load), the usage ledger, Prometheus metrics and the access log on.
    Compared with the bare `gomodel` target (master key, one upstream, access
    log off)."""
    name = "gomodel-features"
    # limits that the load never reaches: the gate checks them on every request
    KEY_FIELDS = {"user_path": "/bench/features", "models": ["vllm/"], "rpm": 1_000_000_000,
                  "tpm": 1_000_000_000_000, "max_concurrency": 100_000,
                  "budgets": [{"period": "daily", "max_tokens": 10_000_000_000_000}]}

    def env(self):
        env = super().env()
        env.update({"GOMODEL_ACCESS_LOG": "true", "METRICS_ENABLED": "true", "USAGE_ENABLED": "true"})
        return env

    def check_features(self):
        """What shows that every feature was on, read before the target stops:
        usage records for the managed key, the request counter on /metrics, and
        access log lines. Returns a dict for the report."""
        out = {"key_id": self.key_id}
        st, body = http_get(self.base_url + "/admin/api/v1/usage/keys?days=1", self.master_headers(), timeout=10)
        try:
            rows = json.loads(body).get("data", []) if st == 200 else []
            out["usage_records"] = sum(r.get("requests", 0) for r in rows if r.get("auth_key_id") == self.key_id)
        except ValueError:
            out["usage_records"] = None
        st, body = http_get(self.base_url + "/metrics", self.master_headers(), timeout=10)
        total = 0.0
        for line in body.decode("utf-8", "replace").splitlines() if st == 200 else ():
            if line.startswith("gomodel_requests_total{"):
                try:
                    total += float(line.rsplit(" ", 1)[1])
                except ValueError:
                    pass
        out["metrics_requests_total"] = total if st == 200 else None
        try:
            with open(self.log, "rb") as f:
                out["access_log_lines"] = sum(1 for line in f if b"gomodel.access" in line)
        except OSError:
            out["access_log_lines"] = None
        return out


class LiteLLM(Target):
    """LiteLLM proxy: own venv, one worker (`--litellm-workers`), no DB, no retries, logging off."""
    name = "litellm"
    start_timeout = 180.0

    @property
    def venv(self):
        return self.ctx.args.litellm_venv

    def install(self):
        exe = os.path.join(self.venv, "bin", "litellm")
        if os.path.exists(exe) and made_from_this_python(self.venv):
            return
        if self.ctx.args.no_install:
            self.unavailable = "%s missing and --no-install was given" % exe
            return
        log = os.path.join(self.ctx.run_dir, "install-litellm.log")
        run_quiet([sys.executable, "-m", "venv", "--clear", self.venv], log)
        run_quiet([os.path.join(self.venv, "bin", "pip"), "install", "-q", "-U", "pip"], log)
        run_quiet([os.path.join(self.venv, "bin", "pip"), "install", "-q", self.ctx.args.litellm_spec], log)

    def version(self):
        r = subprocess.run([os.path.join(self.venv, "bin", "python"), "-c",
                            "import importlib.metadata as m; print(m.version('litellm'))"], capture_output=True, text=True)
        return r.stdout.strip() or "?"

    def config_path(self):
        path = os.path.join(self.ctx.run_dir, "litellm.yaml")
        prov = self.ctx.args.litellm_provider
        lines = ["model_list:"]
        for m in MODELS:
            lines += ["  - model_name: %s" % json.dumps(m),
                      "    litellm_params:",
                      "      model: %s" % json.dumps("%s/%s" % (prov, m)),
                      "      api_base: %s" % json.dumps(self.ctx.mock_url + "/v1"),
                      "      api_key: sk-upstream-unused"]
        lines += [
            "litellm_settings:",
            "  num_retries: 0",
            "  request_timeout: 600",
            "  set_verbose: false",
            "  json_logs: false",
            "  turn_off_message_logging: true",
            "  telemetry: false",
            "  drop_params: false",
            "router_settings:",
            "  num_retries: 0",
            "  disable_cooldowns: true",
            "general_settings:",
            "  disable_spend_logs: true",
            "  disable_error_logs: true",
            "  background_health_checks: false",
        ]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def command(self):
        return [os.path.join(self.venv, "bin", "litellm"), "--config", self.config_path(),
                "--host", "127.0.0.1", "--port", str(self.port),
                "--num_workers", str(getattr(self.ctx, "litellm_workers", None) or self.ctx.args.litellm_workers or 1)] + \
            shlex.split(self.ctx.args.litellm_args)

    def env(self):
        extra = {
            "LITELLM_LOG": "ERROR",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list at start
            "HF_HUB_OFFLINE": "1",                   # no tokenizer download (stalls 23 s per call offline)
            "TRANSFORMERS_OFFLINE": "1",
            "DISABLE_ADMIN_UI": "True",
            "NO_DOCS": "True",
        }
        if self.ctx.api_key:
            extra["LITELLM_MASTER_KEY"] = self.ctx.api_key
        else:
            extra["LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY"] = "true"
        return clean_env(extra)

    def ready(self):
        st, _ = http_get(self.base_url + "/health/liveliness")
        if st != 200:
            return False, "GET /health/liveliness -> %s" % st
        return self.models_listed()


class Portkey(Target):
    """Portkey's open-source gateway (Node), provider `openai` with a custom host."""
    name = "portkey"

    @property
    def dir(self):
        return self.ctx.args.portkey_dir

    def _package_json(self):
        a = self.ctx.args
        # @hono/node-server >= 1.14 makes Portkey fail every streamed and
        # passed-through answer with "TypeError: immutable"
        # (Portkey-AI/gateway#1389, #1550); 1.13.8 is the last version that works.
        return {"name": "bench-portkey", "private": True,
                "dependencies": {"@portkey-ai/gateway": a.portkey_version, "@hono/node-server": a.hono_node_server},
                "overrides": {"@hono/node-server": a.hono_node_server}}

    @property
    def start_js(self):
        return os.path.join(self.dir, "node_modules", "@portkey-ai", "gateway", "build", "start-server.js")

    def install(self):
        pj = os.path.join(self.dir, "package.json")
        want = self._package_json()
        try:
            with open(pj) as f:
                have = json.load(f)
        except (OSError, ValueError):
            have = None
        if have == want and os.path.exists(self.start_js):
            return
        if self.ctx.args.no_install:
            self.unavailable = "%s missing and --no-install was given" % self.start_js
            return
        os.makedirs(self.dir, exist_ok=True)
        with open(pj, "w") as f:
            json.dump(want, f, indent=2)
        log = os.path.join(self.ctx.run_dir, "install-portkey.log")
        run_quiet(["npm", "install", "--no-audit", "--no-fund", "--prefix", self.dir], log, cwd=self.dir)

    def version(self):
        def v(p):
            try:
                with open(os.path.join(self.dir, "node_modules", p, "package.json")) as f:
                    return json.load(f).get("version", "?")
            except (OSError, ValueError):
                return "?"
        return "%s (@hono/node-server %s)" % (v("@portkey-ai/gateway"), v("@hono/node-server"))

    def command(self):
        return ["node", "-r", os.path.join(BENCH_DIR, "targets", "portkey_loopback.cjs"),
                self.start_js, "--port=%d" % self.port, "--headless"]

    def env(self):
        return clean_env({"NODE_ENV": "production"})

    def headers(self):
        h = super().headers()
        h["x-portkey-provider"] = "openai"
        h["x-portkey-custom-host"] = self.ctx.mock_url + "/v1"
        return h

    def ready(self):
        st, _ = http_get(self.base_url + "/")
        return st == 200, "GET / -> %s" % st


class VllmRouter(Target):
    """The vLLM project's Rust router (`pip install vllm-router`, own venv),
    `--policy round_robin` (`--vllm-router-policy`) over every mock of the run:
    a proxy with no keys and no usage, the floor of what a hop in front of vLLM
    costs. Its Prometheus exporter listens on loopback on a free port."""
    name = "vllm-router"
    start_timeout = 60.0

    @property
    def venv(self):
        return self.ctx.args.vllm_router_venv

    @property
    def exe(self):
        return os.path.join(self.venv, "bin", "vllm-router")

    def install(self):
        if os.path.exists(self.exe):
            return
        if self.ctx.args.no_install:
            self.unavailable = "%s missing and --no-install was given" % self.exe
            return
        log = os.path.join(self.ctx.run_dir, "install-vllm-router.log")
        try:
            run_quiet([sys.executable, "-m", "venv", self.venv], log)
            run_quiet([os.path.join(self.venv, "bin", "pip"), "install", "-q", "vllm-router"], log)
        except RuntimeError:
            self.unavailable = "pip install vllm-router failed: %s" % _last_line(log)
            return
        if not os.path.exists(self.exe):
            self.unavailable = "pip install vllm-router installed no %s" % self.exe

    def version(self):
        r = subprocess.run([os.path.join(self.venv, "bin", "python"), "-c",
                            "import importlib.metadata as m; print(m.version('vllm-router'))"],
                           capture_output=True, text=True)
        return "%s, --policy %s over %d mock(s)" % (r.stdout.strip() or "?", self.ctx.args.vllm_router_policy,
                                                   len(self.ctx.mock_urls))

    def command(self):
        return [self.exe, "--host", "127.0.0.1", "--port", str(self.port), "--worker-urls", *self.ctx.mock_urls,
                "--policy", self.ctx.args.vllm_router_policy, "--log-level", "warning",
                # its Prometheus exporter listens on 0.0.0.0:29000 by default
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(proc.free_port())] + \
            shlex.split(self.ctx.args.vllm_router_args)

    def headers(self):
        return {}  # no keys: it checks none and would pass ours on to vLLM

    def ready(self):
        st, _ = http_get(self.base_url + "/health")
        if st != 200:
            return False, "GET /health -> %s" % st
        return self.models_listed()


def _last_line(path):
    lines = [line for line in tail(path, 40).splitlines() if line.strip()]
    return lines[-1][:300] if lines else "?"


TARGETS = {"direct": Direct, "gomodel": GoModel, "gomodel-key": GoModelKey, "gomodel-pool": GoModelPool,
           "gomodel-features": GoModelFeatures,
           "litellm": LiteLLM, "portkey": Portkey, "vllm-router": VllmRouter}
# targets in front of --pool-replicas mocks
POOL_TARGETS = ("gomodel-pool", "gomodel-features")
