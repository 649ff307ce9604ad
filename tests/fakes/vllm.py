"""A fake vLLM 0.32 OpenAI server: a real Twisted HTTP server on 127.0.0.1, port 0.

It speaks vLLM's wire format as vLLM's OpenAI server writes it: the model
list with C{max_model_len}, chat JSON with vLLM's extra fields, SSE chunks with
the usage chunk and C{data: [DONE]}, errors nested under C{"error"}, and the
bare C{{"error":"Unauthorized"}} that C{--api-key} answers with. Tests steer it through fields of the request body that the
gateway forwards untouched:

  - C{fake_chunks}: number of content chunks in a stream (default 3)
  - C{fake_text}: the content of each chunk (default "hé") — multi-byte UTF-8
  - C{fake_split_utf8}: write each event holding an C{é} in two TCP writes, cut inside it (C{fake_sse}'s too)
  - C{fake_pace}: seconds between stream chunks
  - C{fake_die_after}: abort the connection after that many chunks (0: after the answer's head, as a
    server that dies before its first token does; with C{fake_hang}, the head alone, then silence)
  - C{fake_no_done}: end the stream cleanly but without C{[DONE]}
  - C{fake_first}: these raw bytes (a comment line, blank lines) right after a chat or native Responses stream's head
  - C{fake_after_done}: after C{[DONE]}, C{"hold"} the body's end until the client
    leaves, or C{"abort"}: close the connection instead of ending the body (a Messages
    stream takes C{"hold"} too: after its C{message_stop})
  - C{fake_hang}: never answer (the connection stays open)
  - C{fake_drop}: close the connection without answering (the request read: a server that crashed on it)
  - C{fake_cut}: a whole (non-streamed) chat answer's head and its first bytes, then the connection closed
  - C{fake_hang_after}: a native Responses stream sends that many events, then nothing (held open)
  - C{fake_output}: a native response's output items, as they are (what its C{include} asks a vLLM for: a reasoning
    item's C{encrypted_content}, an output text's C{logprobs})

A background Responses stream's events are kept (vLLM 0.32's C{event_store}) and replayed by
C{GET /v1/responses/{id}?stream=true&starting_after=N} as vLLM replays them: those after the N-th, then those
still to come, the body ending after C{response.completed} alone; a response not streamed in the background
answers the stream's head, then the connection is lost (vLLM's generator raises once the head went out).
  - C{fake_flood}: stream that many bytes of events as fast as the client allows (chat, text completions,
    native Responses and Messages streams, each in its own events)
  - C{fake_status} / C{fake_body}: answer with that status and raw body
  - C{fake_sse}: a chat stream of exactly these C{data:} payloads (strings, C{"[DONE]"} too
    where wanted), then the body's end (or, with C{fake_die_after}, an abort after that many)
  - C{fake_stream_anyway}: stream a chat, completions, Messages or Responses answer though the request did not ask for it
  - C{stream_options.continuous_usage_stats} (with C{include_usage}): usage on every chunk, as vLLM sends it
  - C{fake_headers}: C{{name: value}} headers a chat answer carries (an
    OpenAI-compatible provider's own C{x-ratelimit-*}, say), a C{fake_status} one too

Anthropic's Messages API (C{/v1/messages}, C{/v1/messages/count_tokens}) is
answered as vLLM 0.32's C{vllm/entrypoints/anthropic} writes it (typed events,
C{message_start} usage, a signature closing a thinking block); C{messages=False}
makes it FastAPI's 404 (a server without the router), C{messages="unsupported"}
vLLM's 501 "does not support Messages API", C{messages="no_count"} a server with
Messages but no C{count_tokens} route (FastAPI's 404 there). As vLLM's, its Messages API refuses a content block
of a type it does not know (a C{document}: a 400 in vLLM's OpenAI envelope). Chat and Messages also take:

  - C{fake_reasoning}: reasoning text before the content (a thinking block)
  - C{fake_tool}: C{{"name", "arguments"}}: the answer is that tool call
  - C{fake_cached}: prompt tokens read from the prefix cache (in the usage)
  - C{fake_deltas}: a stream is these chat C{delta} objects, one chunk each (after
    the role's), the last with C{finish_reason} C{fake_finish} (default "stop")
  - C{fake_finish}: a chat answer's C{finish_reason} (default "length"; a stream's last content chunk's too, and a
    text completion stream's last chunk's: null for none)
  - C{n} (a text completion's C{prompt} list too: C{n} choices of each prompt, indexed as vLLM does, prompt by
    prompt): a stream of more than one choice has each one's chunks, with its C{index}, interleaved as vLLM streams
    them, each choice's last chunk saying why it ended; C{fake_finishes}: those reasons, one per choice (null for
    none), where they are not C{fake_finish}

Messages also take C{fake_events}: a stream of exactly these C{[event, data]} pairs (data a raw
string; a native Responses stream takes them too); C{fake_stream_anyway} answers a Messages request that did
not ask to stream with its events, and C{fake_whole} one that did with the whole message (JSON).

C{steer} holds fields applied to every request the body does not set itself
(for requests the gateway rewrites, e.g. Messages translated to chat).

Embeddings take vLLM's C{encoding_format} C{"base64"}, C{"bytes"} (the vectors as float32 bytes, their
places and the usage in the C{metadata} header) and C{"bytes_only"} (the vectors alone) besides floats.

Batch tests steer it per request with a C{fake_marker} (any string; the fake
counts requests and finished answers per marker in C{marker_counts} and
C{marker_answers}) and, on any route:

  - C{fake_delay}: answer after that many seconds
  - C{fake_raw}: answer with exactly these bytes (a string: status line, head and body), then close the
    connection (with C{fake_raw_latin1}, each character as one byte: a compressed body): a body without a length or
    chunks ends with it, as an HTTP/1.0 server's or a proxy's does
    (with C{fake_raw_path}, only a request on that path: the others are answered as they would be; with
    C{fake_raw_hold}, the connection is held open after them, silent)
  - C{fake_hold}: hold the request unanswered while C{fake.holding} is true
    (until L{FakeVLLM.release_holds}: held requests still connected are then
    answered, later ones are answered at once)
  - C{fake_fail_times} / C{fake_fail_status}: answer that status (default 503)
    to the first N requests carrying the marker, then answer normally (with C{fake_fail_headers}: those
    failures carry these C{{name: value}} headers, a C{Retry-After} say)
"""

import base64
import time

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

from gomodel import jsonutil

CHAT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
# What the gateway asks each replica on its own clock (its model list, vLLM's health and Prometheus page): a test's
# request is never one of these GETs
CHECKS = (b"/v1/models", b"/health", b"/metrics")
SPEECH = b"ID3\x04\x00\xff\xfb\x90\x00\r\n\x00\x80"  # what its /v1/audio/speech says (binary: an MP3's head)


class Recorded:
    """One request the fake received."""

    def __init__(self, request, body):
        self.method = request.method
        self.path = request.path
        self.uri = request.uri
        self.headers = request.requestHeaders
        self.raw_body = body
        try:
            self.body = jsonutil.loads(body) if body else None
        except jsonutil.JSONError:
            self.body = None
        self.form = None  # a multipart form's fields (an audio request's)
        self.closed = Deferred()  # fires with (how, time): "finished" or "lost"
        self.pauses = 0
        self.bytes_written = 0
        self.paused = Deferred()  # fires on the first pause of a flood

    def header(self, name):
        values = self.headers.getRawHeaders(name)
        return values[0].decode("latin-1") if values else None

    @property
    def is_check(self):
        """Whether this is one of the gateway's own checks of the replica (a GET of one of L{CHECKS}), which come
        on the gateway's clock, between a test's requests, not one a client sent through it."""
        return self.method == b"GET" and self.path in CHECKS

    def sent(self, path):
        """Whether a test meant this request: no check, and on C{path} (bytes; None: any)."""
        return not self.is_check and (path is None or self.path == path)


@implementer(IPushProducer)
class _Flood:
    """Writes C{total} bytes of SSE content as fast as the client lets it."""

    def __init__(self, request, record, total, finish, event=None):
        self._request = request
        self._record = record
        self._total = total
        self._finish = finish
        self._paused = False
        self._stopped = False
        payload = "x" * 4000
        self._event = event or b"data: " + jsonutil.dumps(_chunk({"content": payload})) + b"\n\n"

    def resumeProducing(self):
        self._paused = False
        while not self._paused and not self._stopped:
            if self._record.bytes_written >= self._total:
                self._stopped = True
                self._request.unregisterProducer()
                self._finish()
                return
            self._record.bytes_written += len(self._event)
            self._request.write(self._event)

    def pauseProducing(self):
        self._paused = True
        self._record.pauses += 1
        if not self._record.paused.called:
            self._record.paused.callback(self._record.bytes_written)

    def stopProducing(self):
        self._stopped = True


def _not_found(response_id):
    """vLLM's answer for a response id its store does not hold."""
    return {"error": {"message": f"Response with id '{response_id}' not found.", "type": "invalid_request_error",
                      "param": "response_id", "code": 404}}


# A Responses answer's usage (a background one, queued, has none yet, as vLLM answers).
_RESPONSE_USAGE = {"input_tokens": 19, "output_tokens": 3, "total_tokens": 22, "input_tokens_details": {"cached_tokens": 0},
                   "output_tokens_details": {"reasoning_tokens": 0}}


def _chunk(delta, finish_reason=None, model=CHAT_MODEL):
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    if finish_reason is not None:
        choice["stop_reason"] = None
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
            "model": model, "choices": [choice]}


class FakeVLLM(Resource):
    isLeaf = True

    def __init__(self, reactor, *, api_key=None, models=(CHAT_MODEL,), max_model_len=2048, responses=True,
                 messages=True, interface="127.0.0.1"):
        super().__init__()
        self.interface = interface  # an IPv6 address ("::1") listens on IPv6
        self.native_messages = messages  # False: FastAPI's 404; "unsupported": vLLM's 501; "no_count"
        self.steer = {}  # fields every request gets unless its body sets them
        self.native_responses = responses  # False: /v1/responses is FastAPI's 404, as on an older server
        self.stored_responses = {}  # vLLM's in-memory Responses store; clear() it to play a restart
        self._reactor = reactor
        self.api_key = api_key
        self.models = list(models)
        self.loras = {}  # a LoRA adapter's name -> (its path, its base model), listed as vLLM lists one
        self.max_model_len = max_model_len
        self.requests = []
        self._waiting = []
        self.marker_counts = {}  # fake_marker -> requests received
        self.marker_answers = {}  # fake_marker -> answers finished (fully written)
        self.holding = True
        self._held = []
        self._held_waits = []  # (count, Deferred) of each L{when_held} waiting
        self.hung = []  # (request, its events not sent) of each Responses stream fake_hang_after stopped
        self.event_store = {}  # a background stream's response id -> its events written so far (whole SSE events)
        self._streaming = {}  # a background stream's request -> its response id (its events are kept)
        self.replaying = {}  # response id -> the replays (requests) waiting for its events still to come
        self.port = None
        self.models_status = 200  # set to 503 to make /v1/models fail
        # True: every answer gzip'd unless the request's Accept-Encoding rules gzip out, as RFC 9110 12.5.3
        # lets a server do for a request that has none (any coding is then acceptable)
        self.compress = False
        # False: /v1/audio/* are FastAPI's 404, as on a server whose model is no ASR one; "openai": streamed as
        # OpenAI streams them; a status (503): answered with that error
        self.audio = True
        self.transcript = "hé there"  # what its audio routes hear ("": a silent recording)
        self.audio_seconds = 1  # how long the recordings its audio routes hear are (their usage, as whisper's)
        self.speaking = []  # the speech answers held after their first bytes (fake_hold_speech), until release_speech
        # path -> (bytes, hold): a request on that path (a form's too) is answered with exactly these bytes (as
        # C{fake_raw}), then the connection closed, or held open (silent) with C{hold}; each answer's transport is
        # kept in C{raw_transports}
        self.raw = {}
        self.raw_transports = []

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> Deferred:
        """Listen on a free port of its interface (127.0.0.1); fires with self."""
        site = server.Site(self)
        site.noisy = False
        endpoint = TCP6ServerEndpoint if ":" in self.interface else TCP4ServerEndpoint
        d = endpoint(self._reactor, 0, interface=self.interface).listen(site)

        def listening(port):
            self.port = port
            return self

        return d.addCallback(listening)

    def stop(self) -> Deferred:
        port, self.port = self.port, None
        return port.stopListening()

    @property
    def root_url(self):
        host = f"[{self.interface}]" if ":" in self.interface else self.interface
        return f"http://{host}:{self.port.getHost().port}"

    @property
    def base_url(self):
        return self.root_url + "/v1"

    def forwarded(self, path=None) -> list:
        """The requests received but for the gateway's own checks (L{Recorded.is_check}), oldest first; with
        C{path} (bytes), those on that path alone."""
        return [r for r in self.requests if r.sent(path)]

    def last_request(self, path=None) -> Recorded:
        """The last of L{forwarded}: the request a test sent last (on C{path}), though a check came since.

        @raise IndexError: none came.
        """
        for record in reversed(self.requests):
            if record.sent(path):
                return record
        raise IndexError(f"no request on {path or 'any path'} reached the fake")

    def next_request(self, path=None) -> Deferred:
        """Fires with the next request to come but for the gateway's own checks (on C{path}, bytes, where given)."""
        d = Deferred()
        self._waiting.append((path, d))
        return d

    def _arrived(self, record):
        """Keep C{record} and fire the L{next_request} Deferreds waiting for it."""
        self.requests.append(record)
        waiting, self._waiting = self._waiting, []
        for path, d in waiting:
            if record.sent(path):
                d.callback(record)
            else:
                self._waiting.append((path, d))

    # -- serving ----------------------------------------------------------------

    def render(self, request):
        if self.compress and _takes_gzip(request):
            request.setHeader(b"content-encoding", b"gzip")
            request._encoder = server._GzipEncoder(6, request)  # (Twisted's, as its EncodingResourceWrapper sets)
        request.content.seek(0)
        record = Recorded(request, request.content.read())
        if self.steer and isinstance(record.body, dict):
            record.body = dict(self.steer, **record.body)
        request.notifyFinish().addCallbacks(
            lambda _: record.closed.callback(("finished", time.monotonic())),
            lambda _: record.closed.callback(("lost", time.monotonic())))
        self._arrived(record)
        if request.path in self.raw:
            data, hold = self.raw[request.path]
            self.raw_transports.append(request.transport)
            request.transport.write(data)
            if not hold:
                request.transport.loseConnection()
            return server.NOT_DONE_YET
        steered = self._steer(request, record)
        if steered is not None:
            return steered
        return self._route(request, record)

    # -- per-request steering for batch tests (fake_marker, fake_delay, ...) ----

    def _steer(self, request, record):
        body = record.body if isinstance(record.body, dict) else {}
        marker = body.get("fake_marker")
        if marker is not None:
            count = self.marker_counts[marker] = self.marker_counts.get(marker, 0) + 1
            record.closed.addCallback(self._count_answer, marker)
            if count <= int(body.get("fake_fail_times", 0)):
                status = int(body.get("fake_fail_status", 503))
                for name, value in body.get("fake_fail_headers", {}).items():
                    request.setHeader(name, value)
                return self._json(request, status, {"error": {"message": f"fake failure {count}",
                                                              "type": "ServiceUnavailableError",
                                                              "param": None, "code": status}})
        if "fake_raw" in body and body.get("fake_raw_path", request.path.decode()) == request.path.decode():
            raw = body["fake_raw"]  # (with C{fake_raw_latin1}: each character one byte, a gzip'd body's say)
            request.transport.write(raw.encode("latin-1") if body.get("fake_raw_latin1") else raw.encode())
            if not body.get("fake_raw_hold"):
                request.transport.loseConnection()
            return server.NOT_DONE_YET
        if body.get("fake_hold") and self.holding:
            self._held.append((request, record))
            waits, self._held_waits = self._held_waits, []
            for count, d in waits:
                self.when_held(count).chainDeferred(d)
            return server.NOT_DONE_YET
        if body.get("fake_delay"):
            call = self._reactor.callLater(float(body["fake_delay"]), self._answer_late, request, record)
            request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)
            return server.NOT_DONE_YET
        return None

    def _count_answer(self, closed, marker):
        if closed[0] == "finished":
            self.marker_answers[marker] = self.marker_answers.get(marker, 0) + 1
        return closed

    def _answer_late(self, request, record):
        if request._disconnected:
            return
        result = self._route(request, record)
        if result is not server.NOT_DONE_YET:
            request.write(result)
            request.finish()

    def finish_hung(self):
        """Send the rest of each Responses stream stopped by C{fake_hang_after}, and end it."""
        hung, self.hung = self.hung, []
        for request, rest in hung:
            response_id = self._streaming.pop(request, None)
            for kind, payload in rest:
                event = b"event: " + kind.encode() + b"\ndata: " + jsonutil.dumps(payload) + b"\n\n"
                if response_id is not None:  # (its instance made it on, though its stream's client left)
                    self._produced(response_id, event)
                if not request._disconnected:
                    request.write(event)
            if not request._disconnected:
                request.finish()

    def _produced(self, response_id, event):
        """Keep C{event} of a background stream's response, and send it to the replays waiting for it."""
        self.event_store[response_id].append(event)
        for replay in self.replaying.get(response_id, ()):
            if not replay._disconnected:
                replay.write(event)
                if b"event: response.completed\n" in event:
                    replay.finish()

    def _replay(self, request, response_id):
        """vLLM 0.32's C{retrieve_responses(stream=True)}: the events of a background stream after
        C{starting_after}, then those still to come; the body ends after C{response.completed}."""
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        events = self.event_store.get(response_id)
        if events is None:  # ("Unknown response_id", raised by its generator once the head went out)
            request.write(b"")
            self._reactor.callLater(0.05, request.transport.abortConnection)
            return server.NOT_DONE_YET
        after = request.args.get(b"starting_after")
        start = 0 if after is None else int(after[0]) + 1
        for event in events[start:]:
            request.write(event)
            if b"event: response.completed\n" in event:
                request.finish()
                return server.NOT_DONE_YET
        self.replaying.setdefault(response_id, []).append(request)
        return server.NOT_DONE_YET

    def when_held(self, count):
        """A Deferred firing with None once C{count} C{fake_hold} requests are held (at once if they are)."""
        if len(self._held) >= count:
            return succeed(None)
        d = Deferred()
        self._held_waits.append((count, d))
        return d

    def release_holds(self):
        """Stop holding C{fake_hold} requests; answer those still waiting."""
        self.holding = False
        held, self._held = self._held, []
        for request, record in held:
            self._answer_late(request, record)

    def _route(self, request, record):
        path = request.path
        if self.api_key is not None and path.startswith(b"/v1"):
            if request.getHeader(b"authorization") != f"Bearer {self.api_key}".encode():
                return self._json(request, 401, {"error": "Unauthorized"})
        if path == b"/health":
            return b""
        if path == b"/v1/models" and request.method == b"GET":
            if self.models_status != 200:
                return self._json(request, self.models_status, {"detail": "unavailable"})
            return self._json(request, 200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "vllm", "root": "/models/" + m,
                 "parent": None, "max_model_len": self.max_model_len, "permission": []} for m in self.models] + [
                {"id": name, "object": "model", "created": 1700000000, "owned_by": "vllm", "root": path,
                 "parent": base, "max_model_len": None, "permission": []}
                for name, (path, base) in self.loras.items()]})
        if path == b"/v1/chat/completions" and request.method == b"POST":
            return self._chat(request, record)
        if path in (b"/v1/messages", b"/v1/messages/count_tokens") and request.method == b"POST":
            return self._messages(request, record, path.endswith(b"count_tokens"))
        if path.startswith(b"/v1/responses/") and self.native_responses:
            return self._response_lifecycle(request, path[len(b"/v1/responses/"):].decode())
        if request.method == b"POST" and path in (b"/v1/audio/transcriptions", b"/v1/audio/translations"):
            if not self.audio:  # (vLLM has its audio routes only where its model does speech recognition)
                return self._json(request, 404, {"detail": "Not Found"})
            if self.audio.__class__ is int:  # (that status: an overloaded server's 503)
                record.form = _form_fields(request.getHeader(b"content-type"), record.raw_body)
                return self._json(request, self.audio, {"error": {"message": "overloaded", "type": "ServiceUnavailable",
                                                                  "param": None, "code": self.audio}})
            return self._audio(request, record)
        if request.method == b"POST" and path == b"/v1/audio/speech":
            if self.audio != "openai":  # (vLLM has no text to speech: vLLM-Omni's, OpenAI's)
                return self._json(request, 404, {"detail": "Not Found"})
            return self._speech(request, record.body)
        if request.method == b"POST" and path in self._POST_ROUTES:
            body = record.body if isinstance(record.body, dict) else {}
            if "fake_status" in body:
                raw = body.get("fake_body", "")
                return self._json(request, body["fake_status"], raw.encode() if isinstance(raw, str) else raw)
            if path == b"/v1/responses" and not self.native_responses:
                return self._json(request, 404, {"detail": "Not Found"})
            if path not in (b"/tokenize", b"/detokenize") and body.get("model") not in self.models:
                return self._json(request, 404, {"error": {
                    "message": f"The model `{body.get('model')}` does not exist.", "type": "NotFoundError",
                    "param": "model", "code": 404}})
            return getattr(self, self._POST_ROUTES[path])(request, record, body)
        if request.method == b"GET" and path == b"/kv_event_sources":
            # vLLM 0.32's KV-event publisher config per DP rank (here, one started with --kv-events-config):
            # where anyone may subscribe to the block hashes of every tenant's prompts.
            return self._json(request, 200, {"0": {"enable_kv_cache_events": True, "publisher": "zmq",
                                                   "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558",
                                                   "buffer_steps": 10000, "hwm": 100000, "topic": "kv-events"}})
        if request.method == b"GET" and path == b"/version":
            return self._json(request, 200, {"version": "0.32.0"})
        if request.method == b"GET" and path == b"/metrics":
            request.setHeader(b"content-type", b"text/plain; version=0.0.4")
            return b"vllm:num_requests_running 0.0\n"
        if path in (b"/sleep", b"/wake_up", b"/collective_rpc", b"/reset_prefix_cache", b"/abort_requests",
                    b"/release_kv_cache_memory", b"/start_weight_update", b"/fault_tolerance/apply"):
            return self._json(request, 200, {"ok": True})
        return self._json(request, 404, {"detail": "Not Found"})

    _POST_ROUTES = {
        b"/v1/completions": "_completions", b"/v1/embeddings": "_embeddings", b"/v1/rerank": "_rerank",
        b"/rerank": "_rerank", b"/v2/rerank": "_rerank", b"/v1/score": "_score", b"/score": "_score",
        b"/classify": "_classify", b"/pooling": "_pooling", b"/v2/embed": "_cohere_embed",
        b"/v1/responses": "_responses", b"/tokenize": "_tokenize", b"/detokenize": "_detokenize",
        b"/v1/chat/completions/batch": "_chat_batch", b"/generative_scoring": "_generative_scoring",
        b"/v1/systemone": "_structured_decision",
    }

    def _completions(self, request, record, body):
        n = int(body.get("fake_chunks", 3))
        text = body.get("fake_text", "hé")
        if not body.get("stream") and not body.get("fake_stream_anyway"):
            return self._json(request, 200, {
                "id": "cmpl-fake", "object": "text_completion", "created": 1700000000, "model": body["model"],
                "choices": [{"index": 0, "text": text * n, "logprobs": None, "finish_reason": "length",
                             "stop_reason": None, "prompt_logprobs": None}],
                "usage": {"prompt_tokens": 5, "total_tokens": 5 + n, "completion_tokens": n}})
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        if "fake_flood" in body:
            event = b"data: " + jsonutil.dumps({"id": "cmpl-fake", "object": "text_completion", "created": 1700000000,
                                                "model": body["model"], "choices": [{"index": 0, "text": "x" * 4000,
                                                "logprobs": None, "finish_reason": None}]}) + b"\n\n"
            last = {"id": "cmpl-fake", "object": "text_completion", "created": 1700000000, "model": body["model"],
                    "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]}
            _flood(request, record, body, event, lambda: self._end_stream(
                request, dict(body, stream_options=None), b"data: " + jsonutil.dumps(last) + b"\n\n"))
            return server.NOT_DONE_YET
        prompt = body.get("prompt")
        prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
        payloads = [b"data: " + jsonutil.dumps(event) + b"\n\n" for event in _choices([{
            "id": "cmpl-fake", "object": "text_completion", "created": 1700000000, "model": body["model"],
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": body.get("fake_finish", "length") if i == n - 1 else None,
                         "stop_reason": None}]} for i in range(n)], body, _choice_count(body, prompts))]
        self._send_events(request, body, payloads, float(body.get("fake_pace", 0)), None, False, 0)
        return server.NOT_DONE_YET

    def _embeddings(self, request, record, body):
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        if body.get("encoding_format") in ("bytes", "bytes_only"):  # vLLM's binary answer: the vectors, the rest
            vector = b"\x00\x00\x80\x3f\x00\x00\x00\x40\x00\x00\x40\x40"  # in a header (bytes_only: none)
            if body["encoding_format"] == "bytes_only":  # float32 [1.0, 2.0, 3.0] each
                request.setHeader(b"content-type", b"application/octet-stream")
                return vector * len(inputs)
            items = [{"index": i, "embed_dtype": "float32", "endianness": "little", "start": i * len(vector),
                      "end": (i + 1) * len(vector), "shape": [3]} for i in range(len(inputs))]
            metadata = {"id": "embd-fake", "created": 1700000000, "model": body["model"], "data": items,
                        "usage": {"prompt_tokens": 4, "total_tokens": 4, "completion_tokens": 0}}
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"metadata", jsonutil.dumps(metadata))
            return vector * len(inputs)
        if body.get("encoding_format") == "base64":
            vector = "AACAPwAAAEAAAEBA"  # float32 [1.0, 2.0, 3.0]
        else:
            vector = [0.1, -0.25, 0.5]
        return self._json(request, 200, {
            "id": "embd-fake", "object": "list", "created": 1700000000, "model": body["model"],
            "data": [{"index": i, "object": "embedding", "embedding": vector} for i in range(len(inputs))],
            "usage": {"prompt_tokens": 4, "total_tokens": 4, "completion_tokens": 0, "prompt_tokens_details": None}})

    def _rerank(self, request, record, body):
        documents = body.get("documents") or []
        results = [{"index": i, "document": {"text": d, "multi_modal": None}, "relevance_score": 1.0 / (i + 1)}
                   for i, d in enumerate(documents)][: body.get("top_n") or len(documents)]
        return self._json(request, 200, {"id": "score-fake", "model": body["model"],
                                         "usage": {"prompt_tokens": 10, "total_tokens": 10}, "results": results})

    def _score(self, request, record, body):
        return self._json(request, 200, {"id": "score-fake", "object": "list", "created": 1700000000,
                                         "model": body["model"], "data": [{"index": 0, "object": "score",
                                                                            "score": 0.75}],
                                         "usage": {"prompt_tokens": 6, "total_tokens": 6}})

    def _classify(self, request, record, body):
        return self._json(request, 200, {"id": "classify-fake", "object": "list", "created": 1700000000,
                                         "model": body["model"], "data": [{"index": 0, "label": "LABEL_0",
                                                                            "probs": [0.47], "num_classes": 1}],
                                         "usage": {"prompt_tokens": 3, "total_tokens": 3}})

    def _chat_batch(self, request, record, body):
        """vLLM 0.32's /v1/chat/completions/batch: one chat completion, a choice per conversation."""
        conversations = body.get("messages") or []
        return self._json(request, 200, {
            "id": "chatcmpl-batch-fake", "object": "chat.completion", "created": 1700000000, "model": body["model"],
            "choices": [{"index": i, "message": {"role": "assistant", "content": "ok"}, "logprobs": None,
                         "finish_reason": "length", "stop_reason": None} for i in range(len(conversations))],
            "usage": {"prompt_tokens": 14 * len(conversations), "completion_tokens": len(conversations),
                      "total_tokens": 15 * len(conversations)}})

    def _generative_scoring(self, request, record, body):
        """vLLM 0.32's /generative_scoring: a score per item, the probability of its label tokens."""
        return self._json(request, 200, {
            "id": "generative-scoring-fake", "object": "list", "created": 1700000000, "model": body["model"],
            "data": [{"index": i, "object": "score", "score": 0.5} for i in range(len(body.get("items") or []))],
            "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}})

    def _structured_decision(self, request, record, body):
        """vLLM 0.32's /v1/systemone (structured decisions; under /v1 alone): an answer per question."""
        questions = body.get("questions") if isinstance(body.get("questions"), dict) else {}
        return self._json(request, 200, {
            "id": "decision-fake", "object": "structured_decision", "created": 1700000000, "model": body["model"],
            "answers": {q: {"label": "yes"} for q in questions},
            "usage": {"input_tokens": 12, "output_tokens": len(questions)},
            "diagnostics": {q: {"label_mass": 0.9, "argmax_is_label": True} for q in questions}})

    def _pooling(self, request, record, body):
        """vLLM's /pooling: a vector per input."""
        return self._json(request, 200, {"id": "pool-fake", "object": "list", "created": 1700000000,
                                         "model": body["model"], "data": [{"index": 0, "object": "pooling",
                                                                            "data": [0.04]}],
                                         "usage": {"prompt_tokens": 4, "total_tokens": 4}})

    def _cohere_embed(self, request, record, body):
        """vLLM's Cohere /v2/embed: a vector per text, no C{usage}: its tokens in C{meta.tokens} (vLLM's CohereMeta;
        Cohere's own API says them in C{meta.billed_units} too), C{None}s left out."""
        texts = body.get("texts") or []
        return self._json(request, 200, {"id": "embd-fake", "embeddings": {"float": [[0.04, -0.5]] * len(texts)},
                                         "texts": texts, "meta": {"api_version": {"version": "2"},
                                                                  "tokens": {"input_tokens": 7}}})

    def _audio(self, request, record):
        """vLLM's /v1/audio/transcriptions and /translations (an ASR model's): a multipart form (its fields, as
        C{record.form}, name -> the first value: bytes of the file, text of the others); the text in the form's
        C{response_format} (json, verbose_json; text, srt, vtt as text/plain), or with C{stream=true} an event
        stream of C{transcription.chunk}s (the usage chunk with C{stream_include_usage}) ending with [DONE]."""
        record.form = form = _form_fields(request.getHeader(b"content-type"), record.raw_body)
        model = form.get("model")
        if model not in self.models:
            return self._json(request, 404, {"error": {"message": f"The model `{model}` does not exist.",
                                                       "type": "NotFoundError", "param": "model", "code": 404}})
        text, kind = self.transcript, form.get("response_format") or "json"
        usage = {"prompt_tokens": 9, "total_tokens": 12, "completion_tokens": 3}
        if form.get("stream") == "true" and self.audio == "openai":  # OpenAI's events: its usage always, no [DONE]
            request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
            events = [{"type": "transcript.text.delta", "delta": word} for word in ("hé", " there")]
            events.append({"type": "transcript.text.done", "text": text, "usage": {
                "type": "tokens", "input_tokens": 9, "output_tokens": 3, "total_tokens": 12}})
            return b"".join(b"data: " + jsonutil.dumps(event) + b"\n\n" for event in events)
        if form.get("stream") == "true":
            request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
            chunk = {"id": "trsc-fake", "object": "transcription.chunk", "created": 1700000000, "model": model}
            events = [dict(chunk, choices=[{"delta": {"content": word}, "finish_reason": None, "stop_reason": None}])
                      for word in ("hé", " there")]
            if form.get("stream_include_usage") == "true":
                events.append(dict(chunk, choices=[], usage=usage))
            return b"".join(b"data: " + jsonutil.dumps(event) + b"\n\n" for event in events) + b"data: [DONE]\n\n"
        if kind in ("text", "srt", "vtt"):
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            shown = {"text": text, "srt": f"1\n00:00:00,000 --> 00:00:01,000\n{text}\n",
                     "vtt": f"WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n{text}\n"}[kind]
            return shown.encode()
        answer = {"text": text, "usage": {"type": "duration", "seconds": self.audio_seconds}}
        if kind == "verbose_json":
            answer.update(task="transcribe", language="en", duration=float(self.audio_seconds),
                          segments=[{"id": 0, "start": 0.0, "end": 1.0, "text": text}])
        return self._json(request, 200, answer)

    def _speech(self, request, body):
        """OpenAI's /v1/audio/speech: the C{input} spoken, C{SPEECH} (as C{audio/mpeg}), or with C{stream_format:
        "sse"} its events (C{speech.audio.delta}s of base64 audio, then C{speech.audio.done} with its usage)."""
        if body.get("stream_format") == "sse":
            request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
            events = [{"type": "speech.audio.delta", "audio": base64.b64encode(half).decode()}
                      for half in (SPEECH[:4], SPEECH[4:])]
            events.append({"type": "speech.audio.done", "usage": {
                "input_tokens": 5, "output_tokens": 40, "total_tokens": 45}})
            return b"".join(b"data: " + jsonutil.dumps(event) + b"\n\n" for event in events)
        if body.get("fake_text_page"):  # (a proxy's page in front of it)
            request.setHeader(b"content-type", b"text/html")
            return b"<html><body>Service is starting</body></html>"
        request.setHeader(b"content-type", b"audio/mpeg")
        if body.get("fake_hold_speech"):  # (its first bytes, the rest held: a long speech being made)
            request.write(SPEECH[:4])
            self.speaking.append(request)
            return server.NOT_DONE_YET
        return SPEECH

    def release_speech(self):
        """Send the rest of each speech held by C{fake_hold_speech}, and end it."""
        speaking, self.speaking = self.speaking, []
        for request in speaking:
            if not request._disconnected:
                request.write(SPEECH[4:])
                request.finish()

    def _tokenize(self, request, record, body):
        count = 3 if "messages" not in body else _count_tokens(None, body["messages"], body.get("tools"))
        return self._json(request, 200, {"count": count, "max_model_len": self.max_model_len,
                                         "tokens": list(range(1, count + 1)), "token_strs": None})

    def _detokenize(self, request, record, body):
        return self._json(request, 200, {"prompt": "hé" * len(body.get("tokens") or [])})

    def _response_lifecycle(self, request, rest):
        response_id, _, action = rest.partition("/")
        stored = self.stored_responses.get(response_id)
        if stored is None:
            return self._json(request, 404, _not_found(response_id))
        if not action and request.method == b"GET" and request.args.get(b"stream", [b"false"])[0] == b"true":
            return self._replay(request, response_id)
        if action == "cancel" and request.method == b"POST":
            if stored["status"] not in ("queued", "in_progress"):  # (vLLM 0.32's, its issue 57999)
                return self._json(request, 400, {"error": {
                    "message": "Cannot cancel a synchronous response.", "type": "invalid_request_error",
                    "param": None, "code": 400}})
            stored["status"] = "cancelled"
        return self._json(request, 200, stored)

    def _responses(self, request, record, body):
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self.stored_responses:
            return self._json(request, 404, _not_found(previous))
        text = body.get("fake_text", "hé") * int(body.get("fake_chunks", 3))
        # (vLLM makes a response's id of its request_id, which a client may choose)
        response_id = body.get("request_id") or f"resp_fake{len(self.stored_responses) + 1}_{id(record)}"
        status = "queued" if body.get("background") else "completed"
        response = {"id": response_id, "object": "response", "created_at": 1700000000, "status": status,
                    "model": body["model"], "output": [{
                        "id": "msg_fake", "type": "message", "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": None}]}],
                    "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                    "background": bool(body.get("background")),
                    "previous_response_id": body.get("previous_response_id"),
                    "usage": None if status == "queued" else _RESPONSE_USAGE}
        if "fake_output" in body:
            response["output"] = body["fake_output"]
        if body.get("store") is not False:
            self.stored_responses[response_id] = response
        if not body.get("stream") and not body.get("fake_stream_anyway"):
            return self._json(request, 200, response)
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        events = [("response.created", {"response": dict(response, status="in_progress", output=[])}),
                  ("response.output_item.added", {"output_index": 0, "item": dict(response["output"][0], content=[],
                                                                                  status="in_progress")}),
                  ("response.content_part.added", {"item_id": "msg_fake", "output_index": 0, "content_index": 0,
                                                   "part": {"type": "output_text", "text": "", "annotations": []}}),
                  ("response.output_text.delta", {"item_id": "msg_fake", "output_index": 0, "content_index": 0,
                                                  "delta": text, "logprobs": []}),
                  ("response.output_item.done", {"output_index": 0, "item": response["output"][0]}),
                  # (a background response's too: its stream runs it to its end)
                  ("response.completed", {"response": dict(response, status="completed", usage=_RESPONSE_USAGE)})]
        kept = body.get("background") and body.get("store") is not False  # (its events kept: L{_replay})
        if kept:
            self.event_store[response_id] = []
        if "fake_events" in body:  # exactly these (event, data) pairs, data as a raw string
            for kind, data in body["fake_events"]:
                event = b"event: " + kind.encode() + b"\ndata: " + data.encode() + b"\n\n"
                if kept:
                    self._produced(response_id, event)
                request.write(event)
            request.finish()
            return server.NOT_DONE_YET
        if "fake_flood" in body:
            def sent(*numbered):
                return b"".join(b"event: " + kind.encode() + b"\ndata: " + jsonutil.dumps(
                    {"type": kind, "sequence_number": n, **fields}) + b"\n\n" for n, (kind, fields) in numbered)

            request.write(sent(*enumerate(events[:3])))
            delta = sent((3, ("response.output_text.delta", dict(events[3][1], delta="x" * 4000))))
            _flood(request, record, body, delta, lambda: (request.write(sent(*enumerate(events[4:], 4))),
                                                          request.finish()))
            return server.NOT_DONE_YET
        if "fake_first" in body:
            request.write(body["fake_first"].encode())
        die_after, hang_after = body.get("fake_die_after"), body.get("fake_hang_after")
        for number, (kind, fields) in enumerate(events):
            if hang_after is not None and number >= hang_after:  # (its events so far, then silence: see
                self.hung.append((request, [(kind, dict(fields, type=kind, sequence_number=n))  # finish_hung)
                                            for n, (kind, fields) in enumerate(events) if n >= number]))
                if kept:
                    self._streaming[request] = response_id
                return server.NOT_DONE_YET
            if die_after is not None and number >= die_after:
                # Let what was written reach the gateway before the connection dies.
                self._reactor.callLater(0.05, request.transport.abortConnection)
                return server.NOT_DONE_YET
            payload = {"type": kind, "sequence_number": number, **fields}
            event = b"event: " + kind.encode() + b"\ndata: " + jsonutil.dumps(payload) + b"\n\n"
            if kept:
                self._produced(response_id, event)
            request.write(event)
        request.finish()
        return server.NOT_DONE_YET

    def _messages(self, request, record, count):
        """vLLM's Anthropic Messages routes (create, streamed or not, and count_tokens)."""
        if self.native_messages is False:
            return self._json(request, 404, {"detail": "Not Found"})
        if self.native_messages == "unsupported":
            return self._json(request, 501, _anthropic_error("NotImplementedError",
                                                             "The model does not support Messages API"))
        if count and self.native_messages == "no_count":
            return self._json(request, 404, {"detail": "Not Found"})
        body = record.body
        if not isinstance(body, dict):
            return self._json(request, 400, _anthropic_error("BadRequestError", "JSON decode error"))
        if "fake_status" in body:
            raw = body.get("fake_body", "")
            return self._json(request, body["fake_status"], raw.encode() if isinstance(raw, str) else raw)
        model = body.get("model")
        if model not in self.models:
            return self._json(request, 404, _anthropic_error("NotFoundError", f"The model `{model}` does not exist."))
        refused = _unknown_block(body.get("messages"))
        if refused is not None:  # (vLLM's pydantic refusal, in its OpenAI envelope)
            return self._json(request, 400, {"error": {
                "message": f"{refused}: Input should be 'text', 'image', 'tool_use', 'tool_result', 'tool_reference', "
                           "'thinking', 'redacted_thinking', 'tool_addition' or 'tool_removal'",
                "type": "BadRequestError", "param": refused, "code": 400}})
        if count:
            tokens = _count_tokens(body.get("system"), body.get("messages") or [], body.get("tools"))
            return self._json(request, 200, {"input_tokens": tokens,
                                             "context_management": {"original_input_tokens": tokens}})
        if body.get("fake_hang"):
            return server.NOT_DONE_YET
        if body.get("fake_drop"):
            request.transport.abortConnection()
            return server.NOT_DONE_YET
        events = _message_events(body, model)
        if "fake_events" in body:  # exactly these (event, data) pairs, data as a raw string
            events = [(kind, data) for kind, data in body["fake_events"]]
        if (not body.get("stream") or body.get("fake_whole")) and not body.get("fake_stream_anyway"):
            return self._json(request, 200, _message_of(events))
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        if body.get("fake_no_stop"):
            events = events[:-1]
        if "fake_flood" in body:
            def sent(pairs):
                return b"".join(b"event: " + kind.encode() + b"\ndata: " + jsonutil.dumps(data) + b"\n\n"
                                for kind, data in pairs)

            request.write(sent(events[:2]))
            delta = sent([("content_block_delta", dict(events[2][1], delta={"type": "text_delta", "text": "x" * 4000}))])
            _flood(request, record, body, delta, lambda: (request.write(sent(events[-3:])), request.finish()))
            return server.NOT_DONE_YET
        payloads = [b"event: " + kind.encode() + b"\ndata: " + (data.encode() if isinstance(data, str) else jsonutil.dumps(data))
                    + b"\n\n" for kind, data in events]
        self._send_message_events(request, payloads, float(body.get("fake_pace", 0)), body.get("fake_die_after"), 0,
                                  body.get("fake_after_done") == "hold")
        return server.NOT_DONE_YET

    def _send_message_events(self, request, payloads, pace, die_after, index, hold=False):
        if request._disconnected:
            return
        if die_after is not None and index >= die_after:
            if index == 0:
                request.write(b"")  # the head goes out
                self._reactor.callLater(0.05, request.transport.abortConnection)
            else:
                request.transport.abortConnection()
            return
        if index == len(payloads):
            if not hold:
                request.finish()
            return
        request.write(payloads[index])
        self._reactor.callLater(pace, self._send_message_events, request, payloads, pace, die_after, index + 1, hold)

    def _json(self, request, status, value):
        body = value if isinstance(value, bytes) else jsonutil.dumps(value)
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

    def _chat(self, request, record):
        body = record.body
        if not isinstance(body, dict):
            return self._json(request, 400, {"error": {"message": "JSON decode error", "type": "Bad Request",
                                                       "param": "body", "code": 400}})
        for name, value in body.get("fake_headers", {}).items():
            request.setHeader(name, value)
        if "fake_status" in body:
            raw = body.get("fake_body", "")
            return self._json(request, body["fake_status"], raw.encode() if isinstance(raw, str) else raw)
        model = body.get("model")
        if model not in self.models:
            return self._json(request, 404, {"error": {
                "message": f"The model `{model}` does not exist.", "type": "NotFoundError",
                "param": "model", "code": 404}})
        if "fake_context" in body and len(jsonutil.dumps(body["messages"])) > body["fake_context"]:  # (a token a byte)
            return self._json(request, 400, {"error": {  # vLLM's words
                "message": f"This model's maximum context length is {body['fake_context']} tokens. However, your "
                           f"request has {len(jsonutil.dumps(body['messages']))} input tokens. Please reduce the "
                           "length of the input messages.", "type": "BadRequestError", "param": None, "code": 400}})
        if body.get("tool_choice") not in (None, "none") and body.get("tools") is None:
            return self._json(request, 400, {"error": {  # vLLM's own check (its ChatCompletionRequest's)
                "message": "1 validation error:\n  Value error, When using `tool_choice`, `tools` must be set.",
                "type": "BadRequestError", "param": None, "code": 400}})
        if body.get("continue_final_message") and body.get("add_generation_prompt", True):
            return self._json(request, 400, {"error": {  # vLLM's own check
                "message": "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                "type": "BadRequestError", "param": None, "code": 400}})
        if body.get("fake_hang") and body.get("fake_die_after") != 0:
            return server.NOT_DONE_YET
        if body.get("fake_drop"):
            request.transport.abortConnection()
            return server.NOT_DONE_YET
        if body.get("fake_cut") and not body.get("stream"):
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"1000")
            request.write(b'{"id": "chatcmpl-fake", ')
            self._reactor.callLater(0.05, request.transport.abortConnection)
            return server.NOT_DONE_YET
        if body.get("stream") or body.get("fake_stream_anyway"):
            return self._stream(request, record, body)
        text = "".join(body.get("fake_text", "hé") for _ in range(body.get("fake_chunks", 3)))
        tool = body.get("fake_tool")
        tool_calls = [] if tool is None else [{"id": "chatcmpl-tool-fake1", "type": "function", "function": {
            "name": tool["name"], "arguments": tool["arguments"]}}]
        cached = body.get("fake_cached")
        return self._json(request, 200, {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": None if tool else text,
                                                 "refusal": None, "reasoning": body.get("fake_reasoning"),
                                                 "tool_calls": tool_calls},
                         "logprobs": None, "finish_reason": "tool_calls" if tool else body.get("fake_finish", "length"),
                         "stop_reason": None, "token_ids": None}],
            "service_tier": None, "system_fingerprint": "vllm-0.32.0-fake",
            "usage": {"prompt_tokens": 18, "total_tokens": 21, "completion_tokens": 3,
                      "prompt_tokens_details": None if cached is None else {"cached_tokens": cached}},
            "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": {"fake": True}})

    def _stream(self, request, record, body):
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        if "fake_flood" in body:
            flood = _Flood(request, record, int(body["fake_flood"]), lambda: self._end_stream(request, body, b"data: "
                           + jsonutil.dumps(_chunk({}, "length")) + b"\n\n"))
            request.registerProducer(flood, True)
            flood.resumeProducing()
            return server.NOT_DONE_YET
        if "fake_first" in body:
            request.write(body["fake_first"].encode())
        if "fake_sse" in body:
            payloads = [b"data: " + p.encode() + b"\n\n" for p in body["fake_sse"]]
            ended = dict(body, fake_no_done=True, stream_options=None)  # the payloads are the whole stream
            self._send_events(request, ended, payloads, float(body.get("fake_pace", 0)), body.get("fake_die_after"),
                              bool(body.get("fake_split_utf8")), 0)
            return server.NOT_DONE_YET
        events = [_chunk({"role": "assistant", "content": ""})]
        n = int(body.get("fake_chunks", 3))
        text = body.get("fake_text", "hé")
        if body.get("fake_reasoning"):
            events += [_chunk({"reasoning": part}) for part in _halves(body["fake_reasoning"])]
        tool = body.get("fake_tool")
        if tool is not None:
            first, second = _halves(tool["arguments"])
            events += [_chunk({"tool_calls": [{"id": "chatcmpl-tool-fake1", "type": "function", "index": 0,
                                               "function": {"name": tool["name"], "arguments": ""}}]}),
                       _chunk({"tool_calls": [{"index": 0, "function": {"arguments": first}}]}),
                       _chunk({"tool_calls": [{"index": 0, "function": {"arguments": second}}]}, "tool_calls")]
            n = 0
        deltas = body.get("fake_deltas")
        if deltas:
            events += [_chunk(d, body.get("fake_finish", "stop") if i == len(deltas) - 1 else None)
                       for i, d in enumerate(deltas)]
            n = 0
        for i in range(n):
            events.append(_chunk({"content": text}, body.get("fake_finish", "length") if i == n - 1 else None))
        events = _choices(events, body, _choice_count(body, 1))
        options = body.get("stream_options") or {}
        if options.get("include_usage") and options.get("continuous_usage_stats"):
            for generated, event in enumerate(events):  # vLLM's: the prompt's count on every chunk, the first too
                event["usage"] = {"prompt_tokens": 18, "total_tokens": 18 + generated, "completion_tokens": generated}
        if body.get("model") != CHAT_MODEL and body.get("model") in self.models:  # (vLLM's: the id it was sent)
            for event in events:
                event["model"] = body["model"]
        payloads = [b"data: " + jsonutil.dumps(e) + b"\n\n" for e in events]
        pace = float(body.get("fake_pace", 0))
        die_after = body.get("fake_die_after")
        split = bool(body.get("fake_split_utf8"))
        self._send_events(request, body, payloads, pace, die_after, split, 0)
        return server.NOT_DONE_YET

    def _send_events(self, request, body, payloads, pace, die_after, split, index):
        if request._disconnected:
            return
        if die_after is not None and index >= die_after:
            if index == 0:
                request.write(b"")  # the head goes out
                if not body.get("fake_hang"):
                    self._reactor.callLater(0.05, request.transport.abortConnection)
            else:
                request.transport.abortConnection()
            return
        if index == len(payloads):
            self._end_stream(request, body)
            return
        event = payloads[index]
        if split and "é".encode() in event:
            cut = event.index("é".encode()) + 1  # inside the two-byte character
            request.write(event[:cut])
            self._reactor.callLater(0.005, self._write_rest, request, event[cut:], body, payloads, pace,
                                    die_after, split, index)
            return
        request.write(event)
        self._reactor.callLater(pace, self._send_events, request, body, payloads, pace, die_after, split, index + 1)

    def _write_rest(self, request, rest, body, payloads, pace, die_after, split, index):
        if request._disconnected:
            return
        request.write(rest)
        self._reactor.callLater(pace, self._send_events, request, body, payloads, pace, die_after, split, index + 1)

    def _end_stream(self, request, body, last=None):
        """End a stream: C{last} (an event: a flood's last chunk, saying why it ended), its usage chunk where asked
        for, [DONE] (unless C{fake_no_done}), the body's end (C{fake_after_done})."""
        if request._disconnected:
            return
        if last is not None:
            request.write(last)
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            usage = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
                     "model": body.get("model"), "choices": [],
                     "usage": {"prompt_tokens": 18, "total_tokens": 21, "completion_tokens": 3}}
            if body.get("fake_cached") is not None:
                usage["usage"]["prompt_tokens_details"] = {"cached_tokens": body["fake_cached"]}
            request.write(b"data: " + jsonutil.dumps(usage) + b"\n\n")
        if not body.get("fake_no_done"):
            request.write(b"data: [DONE]\n\n")
        after = body.get("fake_after_done")
        if after == "abort":
            request.transport.loseConnection()  # what was written goes out, the body's end never
        elif after != "hold":
            request.finish()


def _choice_count(body, prompts: int) -> int:
    """The choices a stream of C{body} has: its C{n} for each of its C{prompts}."""
    n = body.get("n")
    return (n if isinstance(n, int) and n > 1 else 1) * prompts


def _choices(events, body, count: int):
    """C{events} (a stream's chunks of one choice, each holding it, the last saying why it ended) as C{count}
    choices' (L{_choice_count}), interleaved as vLLM streams them: each its C{index}, its last chunk's
    C{finish_reason} C{body}'s C{fake_finishes}' (where it says them)."""
    if count == 1 and "fake_finishes" not in body:
        return events
    finishes = body.get("fake_finishes")
    streamed = []
    for at, event in enumerate(events):
        for index in range(count):
            choice = dict(event["choices"][0], index=index)
            if at == len(events) - 1 and finishes is not None:
                choice["finish_reason"] = finishes[index]
            streamed.append(dict(event, choices=[choice]))
    return streamed


def _flood(request, record, body, event, finish):
    """Stream C{event} over and over, C{body["fake_flood"]} bytes of them, as fast as the client lets it; then
    C{finish}."""
    flood = _Flood(request, record, int(body["fake_flood"]), finish, event)
    request.registerProducer(flood, True)
    flood.resumeProducing()


def _takes_gzip(request) -> bool:
    """Whether C{request} accepts a gzip'd answer: it has no Accept-Encoding (any coding), or one naming gzip
    (or C{*}) without C{q=0}."""
    value = request.getHeader(b"accept-encoding")
    if value is None:
        return True
    for coding in value.lower().replace(b" ", b"").split(b","):
        name, _, weight = coding.partition(b";")
        if name in (b"gzip", b"*"):
            return not weight.startswith(b"q=") or float(weight[2:]) > 0
    return False


def _form_fields(content_type, body) -> dict:
    """A multipart form's fields, name -> the first value (bytes of a part with a file name, else text)."""
    from multipart import MultipartSegment, PushMultipartParser, parse_options_header

    _, options = parse_options_header((content_type or b"").decode("latin-1"))
    parser, fields, segment, data = PushMultipartParser(options["boundary"]), {}, None, bytearray()
    for event in parser.parse(body):
        if isinstance(event, MultipartSegment):
            segment, data = event, bytearray()
        elif event is None:
            fields.setdefault(segment.name, bytes(data) if segment.filename is not None else data.decode())
        else:
            data += event
    parser.close()
    return fields


def _halves(text):
    """C{text} in two pieces (as a model streams it in several deltas)."""
    cut = len(text) // 2
    return [text[:cut], text[cut:]]


def _text_of(content):
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def _count_tokens(system, messages, tools):
    """The fake tokenizer: one token per character of text, plus four per message and per tool."""
    count = len(_text_of(system)) + (4 if system else 0)
    for message in messages:
        if isinstance(message, dict):
            count += 4 + len(_text_of(message.get("content")))
    return count + 4 * len(tools or [])


# The content block types of vLLM 0.32's Messages API (its AnthropicContentBlock): no document among them.
_VLLM_BLOCK_TYPES = ("text", "image", "tool_use", "tool_result", "tool_reference", "thinking", "redacted_thinking",
                     "tool_addition", "tool_removal")


def _unknown_block(messages):
    """Where in C{messages} a content block is of a type vLLM's Messages API does not know (a C{document}), or None.
    (A tool result's own blocks are not checked: vLLM reads their text and images and drops the rest unread.)"""
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        content = message.get("content") if isinstance(message, dict) else None
        for j, block in enumerate(content if isinstance(content, list) else ()):
            if isinstance(block, dict) and block.get("type") not in _VLLM_BLOCK_TYPES:
                return f"messages.{i}.content.{j}.type"
    return None


def _anthropic_error(kind, message):
    """vLLM's Anthropic-shaped error body (its own error type names)."""
    return {"type": "error", "error": {"type": kind, "message": message}}


def _message_events(body, model):
    """The events of vLLM's Messages stream for C{body}: (event name, data) pairs."""
    cached = body.get("fake_cached")
    usage = {"input_tokens": 18 - (cached or 0), "output_tokens": 0}
    if cached is not None:
        usage["cache_read_input_tokens"] = cached
    events = [("message_start", {"type": "message_start", "message": {
        "id": "chatcmpl-fake", "type": "message", "role": "assistant", "content": [], "model": model,
        "stop_reason": None, "stop_sequence": None, "usage": dict(usage)}})]
    index = 0

    def block(start, deltas):
        nonlocal index
        events.append(("content_block_start", {"type": "content_block_start", "content_block": start, "index": index}))
        events.extend(("content_block_delta", {"type": "content_block_delta", "delta": d, "index": index})
                      for d in deltas)
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1

    if body.get("fake_reasoning"):
        block({"type": "thinking", "thinking": ""},
              [{"type": "thinking_delta", "thinking": part} for part in _halves(body["fake_reasoning"])]
              + [{"type": "signature_delta", "signature": "5f1c0ffee5f1c0ffee5f1c0ffee5f1c0"}])
    tool = body.get("fake_tool")
    if tool is not None:
        block({"type": "tool_use", "id": "chatcmpl-tool-fake1", "name": tool["name"], "input": {}},
              [{"type": "input_json_delta", "partial_json": part} for part in _halves(tool["arguments"])])
    else:
        text = body.get("fake_text", "hé")
        block({"type": "text", "text": ""},
              [{"type": "text_delta", "text": text} for _ in range(int(body.get("fake_chunks", 3)))])
    events.append(("message_delta", {"type": "message_delta", "delta": {
        "stop_reason": "tool_use" if tool is not None else "max_tokens", "stop_sequence": None},
        "usage": dict(usage, output_tokens=3)}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def _message_of(events):
    """The whole (non-streamed) message the events of L{_message_events} make, as vLLM writes it."""
    message = dict(events[0][1]["message"])
    blocks = []
    for kind, data in events[1:]:
        if kind == "content_block_start":
            blocks.append(dict(data["content_block"]))
        elif kind == "content_block_delta":
            delta, current = data["delta"], blocks[-1]
            if delta["type"] == "text_delta":
                current["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                current["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                current["signature"] = delta["signature"]
            else:
                current["partial"] = current.get("partial", "") + delta["partial_json"]
        elif kind == "message_delta":
            message["stop_reason"] = data["delta"]["stop_reason"]
            message["usage"] = data["usage"]
    for current in blocks:
        if "partial" in current:
            current["input"] = jsonutil.loads(current.pop("partial"))
    message["content"] = blocks
    del message["stop_sequence"]  # vLLM drops None fields of a whole answer
    return message
