"""Plain synchronous helpers for the real-vLLM integration suite (no Twisted here)."""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

CHAT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
EMBED_MODEL = "BAAI/bge-small-en-v1.5"
RERANK_MODEL = "BAAI/bge-reranker-base"

# Provider names the gateway derives from the variables the suite sets.
PROVIDERS = {
    "vllm": CHAT_MODEL,            # VLLM_BASE_URL
    "vllm-test": CHAT_MODEL,       # VLLM_TEST_BASE_URL + VLLM_TEST_API_KEY
    "vllm-embed": EMBED_MODEL,     # VLLM_EMBED_BASE_URL
    "vllm-rerank": RERANK_MODEL,   # VLLM_RERANK_BASE_URL
}
EXPECTED_MODEL_IDS = {f"{provider}/{model}" for provider, model in PROVIDERS.items()}

HTTP_TIMEOUT = 30.0


def read_env_file(path):
    """KEY=VALUE lines of vllm_server.sh's env file, as a dict."""
    out = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                out[key.strip()] = value.strip()
    return out


def root_of(v1_url):
    """http://127.0.0.1:PORT/v1 -> http://127.0.0.1:PORT"""
    return v1_url[: -len("/v1")] if v1_url.endswith("/v1") else v1_url.rstrip("/")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.body[:300]!r}>"


def request(method, url, body=None, headers=None, timeout=HTTP_TIMEOUT):
    """One HTTP/1.1 request on a fresh connection; the whole body is read.

    C{body} may be bytes, or anything JSON-serialisable (then sent as JSON).
    """
    parts = urllib.parse.urlsplit(url)
    hdrs = dict(headers or {})
    if body is not None and not isinstance(body, (bytes, bytearray)):
        body = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path or "/", body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def sse_events(raw):
    """The C{data:} payloads of an SSE body, in order (bytes -> list of str)."""
    events = []
    for block in raw.decode("utf-8").replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:")]
        if data:
            events.append("\n".join(data))
    return events


def stream_chunks(raw):
    """SSE body -> (list of decoded JSON chunks, saw_done)."""
    events = sse_events(raw)
    done = bool(events) and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    return chunks, done


def assert_openai_error(resp, status, code=None):
    """The gateway's error envelope: {"error": {"message", "type", "param", "code"}}."""
    assert resp.status == status, resp
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


def metrics(root_url, timeout=5.0):
    """vLLM's Prometheus text as {name: summed value} (labels dropped) plus raw text."""
    resp = request("GET", root_url + "/metrics", timeout=timeout)
    assert resp.status == 200, resp
    text = resp.body.decode()
    sums = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            sums[name] = sums.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return sums, text


def metric_with_label(text, name, label):
    """Sum of a metric's samples whose label set contains C{label} (e.g. 'finished_reason="abort"')."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            total += float(line.rpartition(" ")[2])
    return total


def wait_for(predicate, timeout, interval=0.1, what="condition"):
    """Poll C{predicate} until it returns a truthy value or C{timeout} seconds pass."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def usage_record(gateway, request_id):
    """The usage record of C{request_id} in C{gateway}'s log, once written (flushed every few seconds)."""
    def found():
        page = request("GET", gateway.root + f"/admin/api/v1/usage/log?search={request_id}", headers=gateway.auth)
        data = json.loads(page.body)["data"]
        return data[0] if data else None

    return wait_for(found, 30, what=f"the usage record of {request_id}")


def tail(path, lines=60):
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError as e:
        return f"(cannot read {path}: {e})"


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def gateway_env(settings):
    """This process's environment for a gateway of its own: without its C{VLLM_*} and C{OPENAI_*} variables and
    C{GOMODEL_CONFIG} (a developer's own setup would change what the suite talks to), with C{settings}."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "OPENAI_")) and k != "GOMODEL_CONFIG"}
    env.update(settings, PYTHONUNBUFFERED="1")
    return env


LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def start_twistd(workdir, env, timeout=60.0):
    """gomodel started as a user would, C{twistd -n --pidfile= gomodel --listen tcp:0:interface=127.0.0.1}, in
    C{workdir} with C{env} (L{gateway_env}), its output in C{workdir/gateway.log}: C{(argv, process, log's path,
    port)} once it listens (the port it logs: one chosen here and then bound by the process could be taken in
    between). Fails with its log if it exits first or does not listen within C{timeout} seconds."""
    argv = [TWISTD, "-n", "--pidfile=", "gomodel", "--listen", "tcp:0:interface=127.0.0.1"]
    log_path = str(workdir / "gateway.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=str(workdir), env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        return argv, proc, log_path, listening_port(proc, log_path, timeout)
    except BaseException:
        stop(proc)
        raise


def listening_port(proc, log_path, timeout=60.0):
    """The port the gateway C{proc} logs to C{log_path} that it listens on, once it does."""
    def port():
        found = LISTENING.search(tail(log_path, 10_000))
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            raise AssertionError(f"the gateway exited with status {proc.returncode} before it listened\n"
                                 f"--- {log_path} ---\n{tail(log_path)}")
        return None

    return wait_for(port, timeout, interval=0.05, what=f"the gateway logging to {log_path} to listen")


def stop(proc, grace=10.0):
    """SIGTERM to C{proc} where it still runs; SIGKILL after C{grace} seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
