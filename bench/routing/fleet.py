#!/usr/bin/env python3
"""A simulated fleet of vLLM 0.32 replicas for the routing benchmark: real HTTP servers on 127.0.0.1.

Stdlib only (asyncio). One process runs every replica, each on its own port
(the kernel picks it); the process prints one line ``LISTENING p1,p2,...``
when all listen, and runs until SIGTERM / SIGINT.

The engine of each replica, in simulated time (asyncio timers):

- ``slots`` requests run at once (vLLM's running batch); the others wait in a
  FIFO queue (``vllm:num_requests_waiting``), without bound, as vLLM does.
- A request that gets a slot looks its prompt up in the replica's **prefix
  cache**: an LRU of ``BLOCK_CHARS``-character blocks, each keyed by the hash
  of the whole text up to its end (vLLM's chained block hashes), so a block
  hits only when everything before it hit too. Prefill then takes
  ``speed * (prefill_base + prefill_per_token * uncached_tokens)``: a request
  whose long shared prefix (system prompt + history) is cached gets its first
  token much sooner. Prompt blocks enter the cache when the request starts,
  the generated text's blocks when it ends; the cache keeps ``cache_tokens``
  tokens (least recently used blocks are evicted). ``vllm:kv_cache_usage_perc``
  is the running requests' tokens over a KV pool of ``kv_tokens``, sized so
  that every slot fits (vLLM admits no more than its KV pool holds).
- Decode: ``max_tokens`` tokens, one step of ``speed * tpot * (1 + batch_cost
  * (running - 1))`` each: the more requests run, the slower every one of
  them (service time grows with load). Tokens are streamed ``chunk_tokens``
  to an SSE event.
- ``speed`` is 1.0 for a normal replica; ``--slow I:F`` makes replica I F
  times slower in everything (a heterogeneous fleet: an older GPU).

HTTP: ``GET /health``, ``GET /v1/models``, ``GET /metrics`` (vLLM's names and
label layout: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc``, ``vllm:prefix_cache_queries_total``,
``vllm:prefix_cache_hits_total``, ``vllm:generation_tokens_total``,
``vllm:prompt_tokens_total``, ``process_start_time_seconds``), ``POST
/v1/chat/completions`` (JSON or SSE in vLLM's format, ``usage`` with
``prompt_tokens_details.cached_tokens``; the ORCA header
``endpoint-load-metrics`` on JSON answers when asked, as vLLM 0.32 does).
``GET /bench/log``: one record per finished request (the ``[rq:ID]`` marker
the load generator puts in each prompt's last message, replica, prompt and
cached tokens, queue time, prefill time, first token and end times).

Tokens are counted as 4 characters, as a rough tokenizer would.
"""

import argparse
import asyncio
import hashlib
import json
import math
import re
import signal
import sys
import time
from collections import OrderedDict, deque

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
BLOCK_CHARS = 64  # 16 tokens, vLLM's default block size
CHARS_PER_TOKEN = 4
MARKER = re.compile(r"\[rq:([A-Za-z0-9_.-]+)\]")
WORDS = ("the ", "and ", "for ", "with", "that", "this", "from", "they", "will", "have", "each", "more",
         "what", "when", "into", "over", "such", "time", "only", "also", "most", "data", "some", "just")


def chat_text(messages):
    """The prompt a chat template would build: role markers and contents, in order."""
    parts = []
    for m in messages or ():
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append("<|%s|>\n%s\n" % (m.get("role", "user"), content if isinstance(content, str) else ""))
    return "".join(parts) + "<|assistant|>\n"


def block_hashes(text):
    """Chained hashes of the text's full blocks: the i-th covers text[:(i+1)*BLOCK_CHARS]."""
    out = []
    h = hashlib.blake2b(digest_size=12)
    for i in range(len(text) // BLOCK_CHARS):
        h.update(text[i * BLOCK_CHARS:(i + 1) * BLOCK_CHARS].encode("utf-8", "surrogatepass"))
        out.append(h.copy().digest())
    return out


def answer_text(seed, n_tokens):
    """Deterministic generated text of n_tokens 4-character words, different per request."""
    h = int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=8).digest(), "big")
    words = []
    for _ in range(n_tokens):
        h = (h * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        words.append(WORDS[(h >> 33) % len(WORDS)])
    return "".join(words)


class Job:
    __slots__ = ("rid", "prompt", "blocks", "prompt_tokens", "max_tokens", "stream", "usage", "seed", "arrived",
                 "started", "first", "ended", "cached_tokens", "out", "writer", "gone", "waiter", "prefill_s",
                 "load_fmt")

    def __init__(self, rid, prompt, max_tokens, stream, usage, seed):
        self.rid = rid
        self.prompt = prompt
        self.blocks = block_hashes(prompt)
        self.prompt_tokens = max(1, math.ceil(len(prompt) / CHARS_PER_TOKEN))
        self.max_tokens = max_tokens
        self.stream = stream
        self.usage = usage
        self.seed = seed
        self.arrived = time.monotonic()
        self.started = self.first = self.ended = None
        self.cached_tokens = 0
        self.prefill_s = 0.0
        self.out = ""
        self.gone = False
        self.waiter = None
        self.load_fmt = None


class Replica:
    """One simulated vLLM server: slots, queue, prefix cache, metrics."""

    def __init__(self, index, args, speed):
        self.index = index
        self.a = args
        self.speed = speed
        self.running = []
        self.waiting = deque()
        self.cache = OrderedDict()  # block hash -> None, LRU order
        self.cache_blocks = max(1, args.cache_tokens * CHARS_PER_TOKEN // BLOCK_CHARS)
        self.queries = 0
        self.hits = 0
        self.prompt_total = 0
        self.gen_total = 0
        self.success = 0
        self.start_time = round(time.time(), 2)
        self.log = []
        self.port = None

    # -- engine ------------------------------------------------------------------

    def kv_usage(self):
        """KV blocks held by running requests over the KV pool (``kv_tokens``): vLLM's gauge. The
        prefix cache lives in the pool's free blocks, so it does not count (as in vLLM)."""
        used = sum(j.prompt_tokens + len(j.out) // CHARS_PER_TOKEN for j in self.running)
        return min(1.0, used / self.a.kv_tokens)

    def submit(self, job):
        """Queue or start a job; its waiter fires when it has a slot."""
        job.waiter = asyncio.get_running_loop().create_future()
        if len(self.running) < self.a.slots:
            self._start(job)
        else:
            self.waiting.append(job)
        return job.waiter

    def _start(self, job):
        job.started = time.monotonic()
        self.running.append(job)
        hit = 0
        for b in job.blocks:
            if b in self.cache:
                hit += 1
            else:
                break
        job.cached_tokens = min(job.prompt_tokens, hit * BLOCK_CHARS // CHARS_PER_TOKEN)
        self.queries += job.prompt_tokens
        self.hits += job.cached_tokens
        self.prompt_total += job.prompt_tokens
        self._insert(job.blocks)
        uncached = job.prompt_tokens - job.cached_tokens
        job.prefill_s = self.speed * (self.a.prefill_base + self.a.prefill_per_token * uncached)
        if not job.waiter.done():
            job.waiter.set_result(None)

    def _insert(self, blocks):
        cache = self.cache
        for b in blocks:
            if b in cache:
                cache.move_to_end(b)
            else:
                cache[b] = None
        while len(cache) > self.cache_blocks:
            cache.popitem(last=False)

    def step_s(self):
        return self.speed * self.a.tpot * (1 + self.a.batch_cost * (len(self.running) - 1))

    def done(self, job):
        """A job ended (finished or its client left): free its slot, start the next."""
        if job in self.running:
            self.running.remove(job)
            if not job.gone:
                self._insert(block_hashes(job.prompt + job.out))
        elif job in self.waiting:
            self.waiting.remove(job)
        while self.waiting and len(self.running) < self.a.slots:
            nxt = self.waiting.popleft()
            if not nxt.gone:
                self._start(nxt)

    # -- /metrics ----------------------------------------------------------------

    def metrics(self):
        lab = '{engine="0",model_name="%s"}' % MODEL
        rows = [
            ("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.",
             "", self.start_time),
            ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", lab,
             float(len(self.running))),
            ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", lab,
             float(len(self.waiting))),
            ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", lab, self.kv_usage()),
            ("vllm:prefix_cache_queries_total", "counter",
             "Prefix cache queries, in terms of number of queried tokens.", lab, float(self.queries)),
            ("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens.",
             lab, float(self.hits)),
            ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", lab,
             float(self.prompt_total)),
            ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.", lab,
             float(self.gen_total)),
            ("vllm:request_success_total", "counter", "Count of successfully processed requests.",
             '{engine="0",finished_reason="length",model_name="%s"}' % MODEL, float(self.success)),
        ]
        out = []
        for name, kind, help_, labels, value in rows:
            out.append("# HELP %s %s\n# TYPE %s %s\n%s%s %r\n" % (name, help_, name, kind, name, labels, value))
        return "".join(out).encode()

    def orca(self, fmt):
        """vLLM 0.32's endpoint-load-metrics value for fmt ('json' or 'text'), or None."""
        items = [("num_requests_waiting", float(len(self.waiting))), ("kv_cache_usage_perc", self.kv_usage())]
        fmt = (fmt or "").lower()
        if fmt == "json":
            return "JSON " + json.dumps({"named_metrics": dict(items)})
        if fmt == "text":
            return "TEXT " + ", ".join("named_metrics.%s=%s" % kv for kv in items)
        return None


# -- HTTP ------------------------------------------------------------------------

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


def head(status, headers):
    lines = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "OK"))]
    lines += ["%s: %s" % kv for kv in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def json_response(status, value, extra=()):
    body = json.dumps(value, separators=(",", ":")).encode()
    return head(status, [("content-type", "application/json"), ("content-length", str(len(body)))] + list(extra)) + body


def sse_chunk(writer, data):
    payload = b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
    writer.write(b"%x\r\n%s\r\n" % (len(payload), payload))


async def read_request(reader, writer):
    """(method, path, headers dict lower-case, body bytes), or None at EOF."""
    line = await reader.readline()
    if not line:
        return None
    try:
        method, target, _ = line.decode("latin-1").split(" ", 2)
    except ValueError:
        return None
    headers = {}
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    body = b""
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                break
            parts.append(await reader.readexactly(size))
            await reader.readline()
        body = b"".join(parts)
    elif headers.get("content-length"):
        body = await reader.readexactly(int(headers["content-length"]))
    return method, target.split("?", 1)[0], headers, body


class Server:
    def __init__(self, replica):
        self.r = replica

    async def handle(self, reader, writer):
        try:
            while True:
                req = await read_request(reader, writer)
                if req is None:
                    break
                method, path, headers, body = req
                keep = headers.get("connection", "").lower() != "close"
                if method == "POST" and path in ("/v1/chat/completions", "/chat/completions"):
                    ok = await self.chat(headers, body, writer)
                    if not ok:
                        break
                else:
                    writer.write(self.simple(method, path))
                await writer.drain()
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    def simple(self, method, path):
        r = self.r
        if path == "/health":
            return head(200, [("content-length", "0")])
        if path == "/metrics":
            page = r.metrics()
            return head(200, [("content-type", "text/plain; version=0.0.4; charset=utf-8"),
                              ("content-length", str(len(page)))]) + page
        if path in ("/v1/models", "/models"):
            return json_response(200, {"object": "list", "data": [{
                "id": MODEL, "object": "model", "created": int(r.start_time), "owned_by": "vllm", "root": MODEL,
                "parent": None, "max_model_len": 131072, "permission": []}]})
        if path == "/bench/log":
            return json_response(200, {"replica": r.index, "speed": r.speed, "records": r.log})
        if path == "/version":
            return json_response(200, {"version": "0.32.0"})
        return json_response(404, {"error": {"message": "Not Found", "type": "NotFoundError", "param": None,
                                             "code": 404}})

    async def chat(self, headers, raw, writer):
        r = self.r
        try:
            body = json.loads(raw)
        except ValueError:
            writer.write(json_response(400, {"error": {"message": "JSON decode error", "type": "BadRequestError",
                                                       "param": None, "code": 400}}))
            return True
        if body.get("model") != MODEL:
            writer.write(json_response(404, {"error": {"message": "The model `%s` does not exist." % body.get("model"),
                                                       "type": "NotFoundError", "param": "model", "code": 404}}))
            return True
        messages = body.get("messages") or []
        prompt = chat_text(messages)
        last = messages[-1].get("content") if messages and isinstance(messages[-1], dict) else ""
        m = MARKER.search(last if isinstance(last, str) else "")
        rid = m.group(1) if m else None
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        stream = bool(body.get("stream"))
        usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        job = Job(rid, prompt, max_tokens, stream, usage, rid or prompt[-256:])
        job.load_fmt = headers.get("endpoint-load-metrics-format")
        created = int(time.time())
        cid = "chatcmpl-%s" % (rid or "x")
        try:
            await r.submit(job)
            await asyncio.sleep(job.prefill_s)
            if writer.is_closing():
                raise ConnectionError
            job.first = time.monotonic()
            text = answer_text(job.seed, max_tokens)
            if stream:
                writer.write(head(200, [("content-type", "text/event-stream; charset=utf-8"),
                                        ("transfer-encoding", "chunked")]))
                sse_chunk(writer, {"id": cid, "object": "chat.completion.chunk", "created": created, "model": MODEL,
                                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            sent = 0
            while sent < max_tokens:
                n = min(r.a.chunk_tokens, max_tokens - sent)
                piece = text[sent * CHARS_PER_TOKEN:(sent + n) * CHARS_PER_TOKEN]
                if stream:
                    sse_chunk(writer, {"id": cid, "object": "chat.completion.chunk", "created": created,
                                       "model": MODEL, "choices": [{"index": 0, "delta": {"content": piece},
                                                                    "logprobs": None, "finish_reason": None}]})
                    await writer.drain()
                sent += n
                job.out += piece
                r.gen_total += n
                await asyncio.sleep(r.step_s() * n)
                if writer.is_closing():
                    raise ConnectionError
            u = {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens + max_tokens,
                 "completion_tokens": max_tokens, "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}
            if stream:
                sse_chunk(writer, {"id": cid, "object": "chat.completion.chunk", "created": created, "model": MODEL,
                                   "choices": [{"index": 0, "delta": {"content": ""}, "logprobs": None,
                                                "finish_reason": "length", "stop_reason": None}]})
                if usage:
                    sse_chunk(writer, {"id": cid, "object": "chat.completion.chunk", "created": created,
                                       "model": MODEL, "choices": [], "usage": u})
                payload = b"data: [DONE]\n\n"
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
            else:
                extra = []
                orca = r.orca(job.load_fmt)
                if orca:
                    extra.append(("endpoint-load-metrics", orca))
                writer.write(json_response(200, {
                    "id": cid, "object": "chat.completion", "created": created, "model": MODEL,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None,
                                                         "tool_calls": []}, "logprobs": None,
                                 "finish_reason": "length", "stop_reason": None}],
                    "usage": u, "prompt_logprobs": None}, extra))
            await writer.drain()
            job.ended = time.monotonic()
            r.success += 1
            return True
        except (ConnectionError, asyncio.CancelledError):
            job.gone = True
            return False
        finally:
            r.done(job)
            r.log.append({"rid": job.rid, "replica": r.index, "prompt_tokens": job.prompt_tokens,
                          "cached_tokens": job.cached_tokens, "arrived": job.arrived,
                          "queue_s": None if job.started is None else round(job.started - job.arrived, 4),
                          "prefill_s": round(job.prefill_s, 4),
                          "ttft_s": None if job.first is None else round(job.first - job.arrived, 4),
                          "e2e_s": None if job.ended is None else round(job.ended - job.arrived, 4),
                          "gone": job.gone})


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--slow", action="append", default=[], metavar="I:F",
                   help="replica I is F times slower (repeatable; default 3:3)")
    p.add_argument("--slots", type=int, default=8, help="requests running at once per replica")
    p.add_argument("--tpot", type=float, default=0.020, help="s per output token with one request running")
    p.add_argument("--batch-cost", type=float, default=0.05, help="step time grows by this per extra running request")
    p.add_argument("--prefill-base", type=float, default=0.010, help="s per prefill")
    p.add_argument("--prefill-per-token", type=float, default=0.00015, help="s per uncached prompt token")
    p.add_argument("--cache-tokens", type=int, default=12000, help="prefix cache size per replica, tokens")
    p.add_argument("--kv-tokens", type=int, default=48000,
                   help="KV pool per replica, tokens: room for every slot's context (8 x 6000)")
    p.add_argument("--chunk-tokens", type=int, default=4, help="tokens per SSE event")
    a = p.parse_args(argv)
    a.speeds = [1.0] * a.replicas
    for spec in a.slow or ["3:3"]:
        i, _, f = spec.partition(":")
        if int(i) < a.replicas:
            a.speeds[int(i)] = float(f)
    return a


async def main(argv):
    a = parse_args(argv)
    servers = []
    for i, speed in enumerate(a.speeds):
        rep = Replica(i, a, speed)
        srv = await asyncio.start_server(Server(rep).handle, "127.0.0.1", 0, backlog=1024)
        rep.port = srv.sockets[0].getsockname()[1]
        servers.append(srv)
        rep.server = srv
    print("LISTENING " + ",".join(str(s.sockets[0].getsockname()[1]) for s in servers), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
