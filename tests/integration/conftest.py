"""The real-vLLM integration suite: gomodel started with twistd in front of four vLLM servers.

Bring the servers up first (tests/integration/vllm_server.sh up); it writes the env file
read here (path: $GOMODEL_IT_ENV, default /tmp/gomodel-vllm-run/vllm.env).

- Every test in this folder carries the C{integration} marker.
- Without the env file, or when a vLLM server does not answer /health, every test here is
  SKIPPED with the reason: a plain C{pytest} on a machine without vLLM never fails.
- With GOMODEL_REQUIRE_VLLM=1 (CI), any skipped integration test fails the session (tests/integration/required.py).
- Under pytest-xdist they all run on one worker, in order (tests/scheduling.py): they share the four servers,
  and the last ones restart them.
"""

import os
import secrets
import time
import types

import pytest

from tests.integration.support import (
    EXPECTED_MODEL_IDS,
    TWISTD,
    bearer,
    gateway_env,
    read_env_file,
    request,
    root_of,
    start_twistd,
    stop,
    tail,
)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ENV_FILE = "/tmp/gomodel-vllm-run/vllm.env"
ENV_KEYS = ("GOMODEL_IT_CHAT_URL", "GOMODEL_IT_CHAT_KEY_URL", "GOMODEL_IT_CHAT_KEY",
            "GOMODEL_IT_EMBED_URL", "GOMODEL_IT_RERANK_URL")
GATEWAY_START_TIMEOUT = 60.0

_state = {"probe": None, "gateway": None}


def _ours(path):
    return str(path).startswith(HERE + os.sep)


def _probe():
    """(vllm namespace, None) when all four servers answer /health, else (None, reason)."""
    if _state["probe"] is None:
        _state["probe"] = _probe_now()
    return _state["probe"]


def _probe_now():
    path = os.environ.get("GOMODEL_IT_ENV", DEFAULT_ENV_FILE)
    if not os.path.isfile(path):
        return None, (f"vLLM env file {path} not found: run `bash tests/integration/vllm_server.sh up` "
                      "(or set GOMODEL_IT_ENV)")
    env = read_env_file(path)
    missing = [k for k in ENV_KEYS if not env.get(k)]
    if missing:
        return None, f"vLLM env file {path} lacks {', '.join(missing)}"
    for key in ("GOMODEL_IT_CHAT_URL", "GOMODEL_IT_CHAT_KEY_URL", "GOMODEL_IT_EMBED_URL", "GOMODEL_IT_RERANK_URL"):
        url = root_of(env[key]) + "/health"
        try:
            status = request("GET", url, timeout=3).status
        except OSError as e:
            return None, f"vLLM server {key}={env[key]} does not answer {url}: {e}"
        if status != 200:
            return None, f"vLLM server {key}={env[key]}: GET /health -> {status}"
    return types.SimpleNamespace(
        env_file=path,
        chat_url=env["GOMODEL_IT_CHAT_URL"],
        chat_root=root_of(env["GOMODEL_IT_CHAT_URL"]),
        chat_key_url=env["GOMODEL_IT_CHAT_KEY_URL"],
        chat_key_root=root_of(env["GOMODEL_IT_CHAT_KEY_URL"]),
        chat_key=env["GOMODEL_IT_CHAT_KEY"],
        embed_url=env["GOMODEL_IT_EMBED_URL"],
        rerank_url=env["GOMODEL_IT_RERANK_URL"],
    ), None


# --------------------------------------------------------------------------- hooks

def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "integration: needs the real vLLM servers of tests/integration/vllm_server.sh "
        "(skipped without them; GOMODEL_REQUIRE_VLLM=1 turns a skip into a failed session)")


def pytest_collection_modifyitems(config, items):
    ours = [item for item in items if _ours(item.path)]
    if not ours:
        return
    for item in ours:
        item.add_marker(pytest.mark.integration)
    vllm, reason = _probe()
    if vllm is None:
        skip = pytest.mark.skip(reason=f"integration: {reason}")
        for item in ours:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    gw = _state["gateway"]
    if report.failed and gw is not None and _ours(item.path):
        report.sections.append(("gateway log (last 40 lines)", tail(gw.log_path, 40)))
    return report


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def vllm():
    """Where the four real vLLM servers listen (from the env file)."""
    ns, reason = _probe()
    if ns is None:
        pytest.skip(f"integration: {reason}")
    return ns


@pytest.fixture(scope="session")
def gateway(vllm, tmp_path_factory):
    """gomodel started as a user would: C{twistd -n --pidfile= gomodel --listen tcp:PORT:interface=127.0.0.1}."""
    if not os.path.exists(TWISTD):
        pytest.fail(f"{TWISTD} not found: install the gateway into this Python "
                    "(pip install -e '.[test]' --config-settings editable_mode=compat)")
    workdir = tmp_path_factory.mktemp("gateway")
    master = "gm-it-" + secrets.token_urlsafe(24)
    # Only the four providers below: an inherited VLLM_* variable (say VLLM_API_KEY of a developer's own setup)
    # would change what the suite talks to.
    env = gateway_env({
        "VLLM_BASE_URL": vllm.chat_url,
        "VLLM_TEST_BASE_URL": vllm.chat_key_url,
        "VLLM_TEST_API_KEY": vllm.chat_key,
        "VLLM_TEST_PRIORITY_SCHEDULING": "true",  # (that server runs with --scheduling-policy priority)
        "VLLM_EMBED_BASE_URL": vllm.embed_url,
        "VLLM_RERANK_BASE_URL": vllm.rerank_url,
        # The two chat servers as two replicas of one provider (the keyless one ignores the key).
        "VLLM_POOL_BASE_URL": f"{vllm.chat_url},{vllm.chat_key_url}",
        "VLLM_POOL_API_KEY": vllm.chat_key,
        "GOMODEL_MASTER_KEY": master,
    })
    argv, proc, log_path, port = start_twistd(workdir, env, GATEWAY_START_TIMEOUT)
    gw = types.SimpleNamespace(
        proc=proc, port=port, root=f"http://127.0.0.1:{port}", url=f"http://127.0.0.1:{port}/v1",
        master_key=master, auth=bearer(master), log_path=log_path, argv=argv)
    _state["gateway"] = gw
    try:
        _wait_ready(gw)
        yield gw
    finally:
        _state["gateway"] = None
        stop(proc)


def _wait_ready(gw):
    """Until GET /health is 200 and /v1/models lists every provider's model (discovery is async)."""
    deadline = time.monotonic() + GATEWAY_START_TIMEOUT
    last = "no answer yet"
    while time.monotonic() < deadline:
        if gw.proc.poll() is not None:
            pytest.fail(f"gateway exited with status {gw.proc.returncode} before it was ready: "
                        f"{' '.join(gw.argv)}\n--- {gw.log_path} ---\n{tail(gw.log_path)}")
        try:
            health = request("GET", gw.root + "/health", timeout=2)
            if health.status == 200:
                models = request("GET", gw.url + "/models", headers=gw.auth, timeout=5)
                if models.status == 200:
                    ids = {m.get("id") for m in models.json().get("data", [])}
                    missing = EXPECTED_MODEL_IDS - ids
                    if not missing:
                        return
                    last = f"/v1/models lacks {sorted(missing)} (has {sorted(ids)})"
                else:
                    last = f"/v1/models -> {models.status} {models.body[:200]!r}"
            else:
                last = f"/health -> {health.status}"
        except (OSError, ValueError) as e:
            last = repr(e)
        time.sleep(0.2)
    pytest.fail(f"gateway not ready after {GATEWAY_START_TIMEOUT}s ({last})\n"
                f"--- {gw.log_path} ---\n{tail(gw.log_path)}")


@pytest.fixture(scope="session")
def client(gateway):
    """The official OpenAI SDK pointed at the gateway, holding only the master key."""
    import openai

    return openai.OpenAI(base_url=gateway.url, api_key=gateway.master_key, timeout=60, max_retries=0)


@pytest.fixture(scope="session")
def direct(vllm):
    """The OpenAI SDK pointed straight at the keyless chat vLLM, for comparisons."""
    import openai

    return openai.OpenAI(base_url=vllm.chat_url, api_key="unused", timeout=60, max_retries=0)
