"""The routing benchmark's workload and its open-loop load generator (stdlib asyncio, raw HTTP/1.1).

Workload (every random choice from one seed, so every router gets the same one):

- ``apps`` applications, each with its own long system prompt
  (``system_tokens``); every session and one-shot request picks one.
- Sessions start as a Poisson process (``session_rate`` per s). A session is
  ``turns_min``..``turns_max`` turns of a chat: each turn sends the system
  prompt, the whole history (every earlier user message and the answer the
  router returned) and a new user message; the next turn follows the answer
  after an exponential think time (mean ``think_s``). Prompts of one session
  therefore share a long, growing prefix.
- One-shot requests arrive as a second Poisson process (``oneshot_rate``):
  an app's system prompt and a long unique question.
- Every request streams (``stream_options.include_usage``) and carries a
  marker ``[rq:ID]`` at the end of its last message, by which the fleet's log
  says which replica served it and how many prompt tokens its prefix cache
  held.

Arrivals are open loop: a session or one-shot starts at its scheduled time
whatever the state of earlier requests. Requests are sent for ``duration``
seconds; the figures count those sent from ``warmup`` on (the fleet's caches
start cold).
"""

import asyncio
import json
import math
import random
import time

from fleet import BLOCK_CHARS, CHARS_PER_TOKEN, WORDS, chat_text

VOCAB = tuple(w.strip() for w in WORDS) + ("model", "route", "cache", "token", "server", "replica", "prompt",
                                           "answer", "question", "system", "gateway", "session", "history")


def words(rng, n_tokens):
    """About n_tokens tokens (4 characters each) of random words."""
    out, size = [], 0
    target = n_tokens * CHARS_PER_TOKEN
    while size < target:
        w = rng.choice(VOCAB)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


class Workload:
    """The schedule: session starts and one-shot times, each with its texts, from one seed."""

    def __init__(self, *, seed=1, duration=45.0, warmup=8.0, session_rate=2.0, oneshot_rate=2.0, apps=4,
                 system_tokens=1500, turns_min=3, turns_max=8, user_min=40, user_max=160, oneshot_min=200,
                 oneshot_max=600, out_min=32, out_max=96, think_s=1.0, session_id="none"):
        self.__dict__.update(dict(seed=seed, duration=duration, warmup=warmup, session_rate=session_rate,
                                  oneshot_rate=oneshot_rate, apps=apps, system_tokens=system_tokens,
                                  turns_min=turns_min, turns_max=turns_max, user_min=user_min, user_max=user_max,
                                  oneshot_min=oneshot_min, oneshot_max=oneshot_max, out_min=out_min,
                                  out_max=out_max, think_s=think_s, session_id=session_id))
        rng = random.Random(seed)
        self.systems = ["You are assistant #%d of the bench. %s" % (i, words(rng, system_tokens))
                        for i in range(apps)]
        self.sessions = []
        t = 0.0
        while True:
            t += rng.expovariate(session_rate) if session_rate > 0 else duration + 1
            if t >= duration:
                break
            n = rng.randint(turns_min, turns_max)
            srng = random.Random("%s-s%d" % (seed, len(self.sessions)))
            self.sessions.append({
                "id": "s%04d" % len(self.sessions), "start": t, "app": srng.randrange(apps),
                "users": [words(srng, srng.randint(user_min, user_max)) for _ in range(n)],
                "max_tokens": [srng.randint(out_min, out_max) for _ in range(n)],
                "think": [srng.expovariate(1.0 / think_s) for _ in range(n)]})
        self.oneshots = []
        t = 0.0
        while True:
            t += rng.expovariate(oneshot_rate) if oneshot_rate > 0 else duration + 1
            if t >= duration:
                break
            orng = random.Random("%s-o%d" % (seed, len(self.oneshots)))
            self.oneshots.append({"id": "o%04d" % len(self.oneshots), "start": t, "app": orng.randrange(apps),
                                  "user": words(orng, orng.randint(oneshot_min, oneshot_max)),
                                  "max_tokens": orng.randint(out_min, out_max)})

    def describe(self):
        turns = sum(len(s["users"]) for s in self.sessions)
        return {k: getattr(self, k) for k in (
            "seed", "duration", "warmup", "session_rate", "oneshot_rate", "apps", "system_tokens", "turns_min",
            "turns_max", "user_min", "user_max", "oneshot_min", "oneshot_max", "out_min", "out_max", "think_s",
            "session_id")} | {"sessions": len(self.sessions), "session_turns_max": turns,
                              "oneshots": len(self.oneshots)}


# -- a minimal HTTP/1.1 client: keep-alive pool, chunked or sized bodies ---------------

class Conn:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer


class Pool:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.idle = []
        self.opened = 0

    async def get(self):
        while self.idle:
            c = self.idle.pop()
            if not c.writer.is_closing() and not c.reader.at_eof():
                return c
        self.opened += 1
        r, w = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        return Conn(r, w)

    def put(self, c):
        self.idle.append(c)

    def close(self):
        for c in self.idle:
            c.writer.close()
        self.idle = []


async def _body_chunks(reader, headers):
    """Yield the response body's pieces as they arrive."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("connection closed in a chunked body")
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            data = await reader.read(min(left, 65536))
            if not data:
                raise ConnectionError("connection closed in a sized body")
            left -= len(data)
            yield data
    else:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            yield data


async def stream_chat(pool, path, headers, body, timeout):
    """POST a streaming chat request; return (status, ttft_s, total_s, text, usage, error)."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    hdr = "".join("%s: %s\r\n" % kv for kv in headers.items())
    req = ("POST %s HTTP/1.1\r\nHost: %s:%d\r\ncontent-type: application/json\r\naccept: text/event-stream\r\n"
           "content-length: %d\r\n%s\r\n" % (path, pool.host, pool.port, len(payload), hdr)).encode() + payload
    t0 = time.monotonic()
    conn = None
    ttft = None
    text = []
    usage = None
    finished = False
    done = False
    try:
        async with asyncio.timeout(timeout):
            conn = await pool.get()
            conn.writer.write(req)
            await conn.writer.drain()
            status_line = await conn.reader.readline()
            if not status_line:
                raise ConnectionError("connection closed before the status line")
            status = int(status_line.split()[1])
            rh = {}
            while True:
                h = await conn.reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                rh[k.strip().lower()] = v.strip()
            buf = b""
            raw = []
            async for piece in _body_chunks(conn.reader, rh):
                if status != 200:
                    raw.append(piece)
                    continue
                buf += piece
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    for line in event.split(b"\n"):
                        line = line.rstrip(b"\r")
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            done = True
                            continue
                        obj = json.loads(data)
                        if obj.get("usage"):
                            usage = obj["usage"]
                        for ch in obj.get("choices") or ():
                            c = (ch.get("delta") or {}).get("content")
                            if c:
                                if ttft is None:
                                    ttft = time.monotonic() - t0
                                text.append(c)
                            if ch.get("finish_reason"):
                                finished = True
            total = time.monotonic() - t0
            if rh.get("connection", "").lower() == "close":
                conn.writer.close()
            else:
                pool.put(conn)
            conn = None
            if status != 200:
                return status, None, total, "", None, "HTTP %d: %s" % (status, b"".join(raw)[:200].decode("utf-8",
                                                                                                          "replace"))
            err = None if (done and finished and text) else "incomplete stream (done=%s finish=%s text=%d)" % (
                done, finished, len(text))
            return status, ttft, total, "".join(text), usage, err
    except (Exception, asyncio.TimeoutError) as e:  # noqa: B014 - every failure is a result here
        if conn is not None:
            conn.writer.close()
        return None, ttft, time.monotonic() - t0, "".join(text), usage, "%s: %s" % (type(e).__name__, e)


class Runner:
    """Plays a Workload against one router; collects one record per request."""

    def __init__(self, wl, host, port, path, model, headers, timeout=120.0):
        self.wl = wl
        self.pool = Pool(host, port)
        self.path, self.model, self.headers, self.timeout = path, model, headers, timeout
        self.records = []
        self.t0 = None

    async def _one(self, rid, kind, session, turn, messages, max_tokens, reusable, extra):
        sent = time.monotonic() - self.t0
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": 0}
        body.update(extra.get("body", {}))
        headers = dict(self.headers, **extra.get("headers", {}))
        status, ttft, total, text, usage, err = await stream_chat(self.pool, self.path, headers, body, self.timeout)
        self.records.append({"rid": rid, "kind": kind, "session": session, "turn": turn, "sent": round(sent, 4),
                             "status": status, "ttft_s": None if ttft is None else round(ttft, 4),
                             "latency_s": round(total, 4), "error": err, "chars": len(text),
                             "reusable_tokens": reusable,
                             "usage_cached": ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")})
        return text, err

    def _ids(self, sid):
        mode = self.wl.session_id
        if mode == "user":
            return {"body": {"user": sid}}
        if mode == "header":
            return {"headers": {"X-Session-Id": sid}}
        return {}

    async def _session(self, s):
        await asyncio.sleep(max(0.0, s["start"] - (time.monotonic() - self.t0)))
        system = self.wl.systems[s["app"]]
        messages = [{"role": "system", "content": system}]
        reusable = 0
        for turn, user in enumerate(s["users"]):
            if time.monotonic() - self.t0 >= self.wl.duration:
                return
            rid = "%s-%d" % (s["id"], turn)
            messages.append({"role": "user", "content": "%s [rq:%s]" % (user, rid)})
            prompt = chat_text(messages)
            text, err = await self._one(rid, "turn", s["id"], turn, list(messages), s["max_tokens"][turn],
                                        reusable, self._ids(s["id"]))
            if err:
                return  # a session whose turn failed ends there
            # what the next prompt shares with this one plus its answer, in whole cache blocks
            reusable = (len(prompt) + len(text)) // BLOCK_CHARS * BLOCK_CHARS // CHARS_PER_TOKEN
            messages.append({"role": "assistant", "content": text})
            await asyncio.sleep(s["think"][turn])

    async def _oneshot(self, o):
        await asyncio.sleep(max(0.0, o["start"] - (time.monotonic() - self.t0)))
        messages = [{"role": "system", "content": self.wl.systems[o["app"]]},
                    {"role": "user", "content": "%s [rq:%s]" % (o["user"], o["id"])}]
        await self._one(o["id"], "oneshot", None, 0, messages, o["max_tokens"], 0, {})

    async def run(self):
        """Play the whole workload; return the records (requests still open after `timeout` failed)."""
        self.t0 = time.monotonic()
        tasks = [asyncio.create_task(self._session(s)) for s in self.wl.sessions]
        tasks += [asyncio.create_task(self._oneshot(o)) for o in self.wl.oneshots]
        await asyncio.gather(*tasks)
        self.pool.close()
        return self.records


def pct(xs, p):
    """The p-th percentile (nearest rank) of xs, or None."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = max(0, min(len(xs) - 1, math.ceil(p / 100.0 * len(xs)) - 1))
    return xs[k]
