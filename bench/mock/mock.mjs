#!/usr/bin/env node
// A vLLM-shaped mock upstream for the overhead benchmark.
//
// One Node process, one thread, every answer precomputed at start-up, so the
// mock costs a few microseconds per request and is never the bottleneck
// (bench/README.md has the measured capacity). It looks at the request body
// only with cheap byte searches:
//   "stream": true           -> SSE instead of JSON
//   "include_usage": true    -> a usage chunk before [DONE] (vLLM sends it only then)
//   "paced"                  -> the paced model: 25 ms between chunks (~0.5 s/stream)
//
// Routes (vLLM 0.32 wire format, see shared/docs/VLLM.md):
//   GET  /health, /version, /v1/models
//   POST /v1/chat/completions   JSON | SSE (role + 20 content + finish + [usage] + [DONE])
//   POST /v1/embeddings         1024 floats
//   POST /v1/responses          JSON | typed SSE (response.created ... response.completed)
//   POST /v1/messages           Anthropic Messages as vLLM's anthropic router writes them: JSON |
//                               typed SSE (message_start, content_block_start, 20 x content_block_delta,
//                               content_block_stop, message_delta, message_stop)
//   GET  /mock/stats            requests counted per route (the harness reads it)
//   POST /mock/reset            zero the counters
//
// Ids are shaped as vLLM makes them: a prefix and 32 hex digits (uuid4().hex), fixed here.
//
// Usage: node mock.mjs [--port N] [--host 127.0.0.1] [--pace-ms 25] [--keepalive-timeout-s 5]
// Prints "LISTENING <port>" on stdout once it accepts connections.

import net from 'node:net';

const args = process.argv.slice(2);
function opt(name, dflt) {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt;
}
const HOST = opt('--host', '127.0.0.1');
const PORT = parseInt(opt('--port', '0'), 10);
const PACE_MS = parseInt(opt('--pace-ms', '25'), 10);
const KEEPALIVE_MS = Math.round(parseFloat(opt('--keepalive-timeout-s', '5')) * 1000);

const CHAT_MODEL = 'meta-llama/Llama-3.1-8B-Instruct';
const PACED_MODEL = 'paced';
const EMBED_MODEL = 'BAAI/bge-m3';
const CREATED = 1763790000;
const N_TOKENS = 20;
const PROMPT_TOKENS = 18;
const EMBED_DIM = 1024;

// 20 tokens; the first names the endpoint so that a bridged answer (e.g. a
// gateway turning /v1/responses into /v1/chat/completions) fails the check.
function tokens(tag) {
  const t = [tag];
  for (let i = 1; i < N_TOKENS; i++) t.push(' t' + String(i).padStart(2, '0'));
  return t;
}
const CHAT_TOKENS = tokens('mockchat');
const RESP_TOKENS = tokens('mockresp');
const MSG_TOKENS = tokens('mockmsgs');
const usageChat = { prompt_tokens: PROMPT_TOKENS, total_tokens: PROMPT_TOKENS + N_TOKENS, completion_tokens: N_TOKENS, prompt_tokens_details: null };

const J = (o) => JSON.stringify(o);
const B = (s) => Buffer.from(s, 'latin1');

// ---------------------------------------------------------------- chat
function chatJson(model) {
  return B(J({
    id: 'chatcmpl-9f86d081884c4d659a2feaa0c55ad015', object: 'chat.completion', created: CREATED, model,
    choices: [{ index: 0, message: { role: 'assistant', content: CHAT_TOKENS.join(''), refusal: null, annotations: null, audio: null, function_call: null, tool_calls: [], reasoning: null }, logprobs: null, finish_reason: 'length', stop_reason: null, token_ids: null }],
    service_tier: null, system_fingerprint: 'vllm-0.32.0-mock', prompt_logprobs: null, prompt_token_ids: null, kv_transfer_params: null,
    usage: usageChat,
  }));
}

// Returns the list of SSE events (Buffers); the usage event is kept apart.
function chatStream(model) {
  const base = { id: 'chatcmpl-9f86d081884c4d659a2feaa0c55ad015', object: 'chat.completion.chunk', created: CREATED, model };
  const ev = (o) => B('data: ' + J(Object.assign({}, base, o)) + '\n\n');
  const events = [ev({ choices: [{ index: 0, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }], prompt_token_ids: null })];
  for (const tok of CHAT_TOKENS) events.push(ev({ choices: [{ index: 0, delta: { content: tok }, logprobs: null, finish_reason: null, token_ids: null }] }));
  events.push(ev({ choices: [{ index: 0, delta: { content: '' }, logprobs: null, finish_reason: 'length', stop_reason: null, token_ids: null }] }));
  const usage = ev({ choices: [], usage: { prompt_tokens: PROMPT_TOKENS, total_tokens: PROMPT_TOKENS + N_TOKENS, completion_tokens: N_TOKENS } });
  const done = B('data: [DONE]\n\n');
  return { events, usage, done, nHead: 1 };
}

// ---------------------------------------------------------------- responses
function respObject(model, status, withOutput) {
  const text = RESP_TOKENS.join('');
  return {
    id: 'resp_a3c65c2974a24b4fa8f3e2c1d7b90e6f', created_at: CREATED, incomplete_details: null, instructions: null, metadata: null, model,
    object: 'response',
    output: withOutput ? [{ id: 'msg_5d41402abc4b4a76b9719d911017c592', content: [{ annotations: [], text, type: 'output_text', logprobs: null }], role: 'assistant', status: 'completed', type: 'message' }] : [],
    parallel_tool_calls: true, temperature: 1.0, tool_choice: 'auto', tools: [], top_p: 1.0, background: false, max_output_tokens: N_TOKENS,
    max_tool_calls: null, previous_response_id: null, prompt: null, reasoning: null, service_tier: 'auto', status, text: null, top_logprobs: null,
    truncation: 'disabled',
    usage: withOutput ? { input_tokens: PROMPT_TOKENS, input_tokens_details: { cached_tokens: 0 }, output_tokens: N_TOKENS, output_tokens_details: { reasoning_tokens: 0 }, total_tokens: PROMPT_TOKENS + N_TOKENS } : null,
    user: null,
  };
}
function respJson(model) { return B(J(respObject(model, 'completed', true))); }
function respStream(model) {
  let seq = 0;
  const ev = (type, o) => B('event: ' + type + '\ndata: ' + J(Object.assign(o, { sequence_number: seq++, type })) + '\n\n');
  const itemId = 'msg_5d41402abc4b4a76b9719d911017c592';
  const text = RESP_TOKENS.join('');
  const part = (t) => ({ annotations: [], text: t, type: 'output_text', logprobs: null });
  const events = [
    ev('response.created', { response: respObject(model, 'in_progress', false) }),
    ev('response.in_progress', { response: respObject(model, 'in_progress', false) }),
    ev('response.output_item.added', { item: { id: itemId, content: [], role: 'assistant', status: 'in_progress', type: 'message' }, output_index: 0 }),
    ev('response.content_part.added', { content_index: 0, item_id: itemId, output_index: 0, part: part('') }),
  ];
  for (const tok of RESP_TOKENS) events.push(ev('response.output_text.delta', { content_index: 0, delta: tok, item_id: itemId, logprobs: [], output_index: 0 }));
  events.push(ev('response.output_text.done', { content_index: 0, item_id: itemId, logprobs: [], output_index: 0, text }));
  events.push(ev('response.content_part.done', { content_index: 0, item_id: itemId, output_index: 0, part: part(text) }));
  events.push(ev('response.output_item.done', { item: { id: itemId, content: [part(text)], role: 'assistant', status: 'completed', type: 'message' }, output_index: 0 }));
  events.push(ev('response.completed', { response: respObject(model, 'completed', true) }));
  return { events, usage: null, done: null, nHead: 4 };
}

// ---------------------------------------------------------------- messages (Anthropic)
// vLLM 0.32 (vllm/entrypoints/anthropic) answers Messages itself: a whole
// message with the None fields dropped, or `event: <type>\ndata: <json>` events
// (message_start with the prompt's usage, one text block, message_delta with the
// stop reason and usage, message_stop; no [DONE]). tests/fakes/vllm.py writes
// the same shapes.
const MSG_ID = 'chatcmpl-9f86d081884c4d659a2feaa0c55ad015';
function msgJson(model) {
  return B(J({
    id: MSG_ID, type: 'message', role: 'assistant', content: [{ type: 'text', text: MSG_TOKENS.join('') }], model,
    stop_reason: 'max_tokens', usage: { input_tokens: PROMPT_TOKENS, output_tokens: N_TOKENS },
  }));
}
function msgStream(model) {
  const ev = (o) => B('event: ' + o.type + '\ndata: ' + J(o) + '\n\n');
  const events = [
    ev({ type: 'message_start', message: { id: MSG_ID, type: 'message', role: 'assistant', content: [], model, stop_reason: null, stop_sequence: null, usage: { input_tokens: PROMPT_TOKENS, output_tokens: 0 } } }),
    ev({ type: 'content_block_start', index: 0, content_block: { type: 'text', text: '' } }),
  ];
  for (const tok of MSG_TOKENS) events.push(ev({ type: 'content_block_delta', index: 0, delta: { type: 'text_delta', text: tok } }));
  events.push(ev({ type: 'content_block_stop', index: 0 }));
  events.push(ev({ type: 'message_delta', delta: { stop_reason: 'max_tokens' }, usage: { input_tokens: PROMPT_TOKENS, output_tokens: N_TOKENS } }));
  events.push(ev({ type: 'message_stop' }));
  return { events, usage: null, done: null, nHead: 2 };
}

// ---------------------------------------------------------------- embeddings
// Values with at most 4 decimals and never integral, so that a gateway that
// re-serialises floats (Python repr or JS) writes them exactly as we did.
function embedValue(i) {
  let v = (((i * 7919) % 1999) - 999) / 10000;
  if (Math.abs(v) < 0.001) v = 0.0123;
  return v;
}
const EMBEDDING = Array.from({ length: EMBED_DIM }, (_, i) => embedValue(i));
const embedJson = B(J({
  id: 'embd-7d793037a0764186a5a8f2b5c1e4d3f9', object: 'list', created: CREATED, model: EMBED_MODEL,
  data: [{ index: 0, object: 'embedding', embedding: EMBEDDING }],
  usage: { prompt_tokens: 10, total_tokens: 10, completion_tokens: 0, prompt_tokens_details: null },
}));

const modelsJson = B(J({
  object: 'list',
  data: [CHAT_MODEL, PACED_MODEL, EMBED_MODEL].map((id) => ({
    id, object: 'model', created: CREATED, owned_by: 'vllm', root: '/models/' + id, parent: null,
    max_model_len: id === EMBED_MODEL ? 8192 : 131072,
    permission: [{ id: 'modelperm-bench', object: 'model_permission', created: CREATED, allow_create_engine: false, allow_sampling: true, allow_logprobs: true, allow_search_indices: false, allow_view: true, allow_fine_tuning: false, organization: '*', group: null, is_blocking: false }],
  })),
}));

const BODIES = {
  chat: chatJson(CHAT_MODEL), chatPaced: chatJson(PACED_MODEL),
  chatStream: chatStream(CHAT_MODEL), chatStreamPaced: chatStream(PACED_MODEL),
  resp: respJson(CHAT_MODEL), respPaced: respJson(PACED_MODEL),
  respStream: respStream(CHAT_MODEL), respStreamPaced: respStream(PACED_MODEL),
  msg: msgJson(CHAT_MODEL), msgPaced: msgJson(PACED_MODEL),
  msgStream: msgStream(CHAT_MODEL), msgStreamPaced: msgStream(PACED_MODEL),
};

// ---------------------------------------------------------------- wire
// A minimal HTTP/1.1 server on raw sockets: Node's `http` module costs about
// three times as much per request, and the mock must stay far below any
// gateway. It handles keep-alive, Content-Length and chunked request bodies,
// `Expect: 100-continue` and `Connection: close`; responses are precomputed
// byte strings (JSON with Content-Length, SSE with chunked framing, one HTTP
// chunk per event, as uvicorn sends them).

const REASON = { 200: 'OK', 404: 'Not Found', 400: 'Bad Request' };
function httpResponse(status, ctype, body) {
  const head = 'HTTP/1.1 ' + status + ' ' + REASON[status] + '\r\ncontent-type: ' + ctype +
    '\r\ncontent-length: ' + body.length + '\r\nserver: uvicorn\r\n\r\n';
  return Buffer.concat([B(head), body]);
}
const json = (body, status = 200) => httpResponse(status, 'application/json', body);
const SSE_HEAD = B('HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\ncache-control: no-cache\r\nserver: uvicorn\r\n\r\n');
const LAST_CHUNK = B('0\r\n\r\n');
const frame = (b) => Buffer.concat([B(b.length.toString(16) + '\r\n'), b, B('\r\n')]);
const CONTINUE = B('HTTP/1.1 100 Continue\r\n\r\n');

// For a stream: the framed event list (with and without the usage event), and
// the whole unpaced answer as one buffer.
function wireStream(s) {
  const mk = (withUsage) => {
    const list = s.events.slice();
    if (withUsage && s.usage) list.push(s.usage);
    if (s.done) list.push(s.done);
    const framed = list.map(frame);
    return { framed, whole: Buffer.concat([SSE_HEAD, ...framed, LAST_CHUNK]) };
  };
  return { nHead: s.nHead, plain: mk(false), usage: mk(true) };
}

const R = {
  models: json(modelsJson),
  health: B('HTTP/1.1 200 OK\r\ncontent-length: 0\r\nserver: uvicorn\r\n\r\n'),
  version: json(B('{"version":"0.32.0"}')),
  notFound: json(B('{"detail":"Not Found"}'), 404),
  badRequest: json(B('{"error":{"message":"bad request","type":"BadRequestError","param":null,"code":400}}'), 400),
  empty: json(B('{}')),
  chat: json(BODIES.chat), chatPaced: json(BODIES.chatPaced),
  resp: json(BODIES.resp), respPaced: json(BODIES.respPaced),
  embed: json(embedJson),
  chatStream: wireStream(BODIES.chatStream), chatStreamPaced: wireStream(BODIES.chatStreamPaced),
  respStream: wireStream(BODIES.respStream), respStreamPaced: wireStream(BODIES.respStreamPaced),
  msg: json(BODIES.msg), msgPaced: json(BODIES.msgPaced),
  msgStream: wireStream(BODIES.msgStream), msgStreamPaced: wireStream(BODIES.msgStreamPaced),
};

const stats = Object.create(null);
function count(k) { stats[k] = (stats[k] || 0) + 1; }

// true when `key` is followed (after optional blanks and a colon) by `true`.
function flagTrue(body, key) {
  let i = body.indexOf(key);
  while (i >= 0) {
    let j = i + key.length;
    while (j < body.length && (body[j] === 0x20 || body[j] === 0x3a || body[j] === 0x09 || body[j] === 0x0a || body[j] === 0x0d)) j++;
    if (body[j] === 0x74) return true; // 't'
    i = body.indexOf(key, j);
  }
  return false;
}

let now = Date.now();
setInterval(() => { now = Date.now(); }, 250).unref();

// Decode a chunked body starting at `off`. Returns [body, endOffset] or null if incomplete.
function dechunk(buf, off) {
  const parts = [];
  for (;;) {
    const le = buf.indexOf('\r\n', off);
    if (le < 0) return null;
    const size = parseInt(buf.toString('latin1', off, le), 16);
    if (Number.isNaN(size)) return [null, buf.length];
    if (size === 0) {
      // skip trailers up to the empty line
      const end = buf.indexOf('\r\n\r\n', le);
      if (buf.indexOf('\r\n', le + 2) === le + 2) return [Buffer.concat(parts), le + 4];
      if (end < 0) return null;
      return [Buffer.concat(parts), end + 4];
    }
    if (buf.length < le + 2 + size + 2) return null;
    parts.push(buf.subarray(le + 2, le + 2 + size));
    off = le + 2 + size + 2;
  }
}

const sockets = new Set();

function onConnection(sock) {
  sock.setNoDelay(true);
  sockets.add(sock);
  const st = { buf: null, busy: false, last: now, sentContinue: false, timer: null };
  sock.st = st;
  sock.on('data', (d) => {
    st.last = now;
    st.buf = st.buf ? Buffer.concat([st.buf, d]) : d;
    if (!st.busy) parse();
  });
  sock.on('error', () => {});
  sock.on('close', () => { sockets.delete(sock); if (st.timer) clearTimeout(st.timer); st.timer = null; st.closed = true; });

  function finish(close) {
    st.busy = false;
    st.last = now;
    if (close) sock.end();
    else if (st.buf) parse();
  }

  function parse() {
    while (st.buf && !st.busy && !st.closed) {
      const buf = st.buf;
      const he = buf.indexOf('\r\n\r\n');
      if (he < 0) { if (buf.length > 1 << 20) sock.destroy(); return; }
      const head = buf.toString('latin1', 0, he);
      const le = head.indexOf('\r\n');
      const line = le < 0 ? head : head.slice(0, le);
      const sp1 = line.indexOf(' ');
      const sp2 = line.indexOf(' ', sp1 + 1);
      const method = line.slice(0, sp1);
      let url = line.slice(sp1 + 1, sp2 < 0 ? undefined : sp2);
      const q = url.indexOf('?');
      if (q >= 0) url = url.slice(0, q);
      let clen = 0, chunked = false, close = false, expect = false;
      if (le >= 0) {
        const h = head.slice(le).toLowerCase();
        const ci = h.indexOf('\r\ncontent-length:');
        if (ci >= 0) { const e = h.indexOf('\r\n', ci + 2); clen = parseInt(h.slice(ci + 17, e < 0 ? undefined : e), 10) || 0; }
        const ti = h.indexOf('\r\ntransfer-encoding:');
        if (ti >= 0) { const e = h.indexOf('\r\n', ti + 2); chunked = h.slice(ti, e < 0 ? undefined : e).indexOf('chunked') >= 0; }
        const ki = h.indexOf('\r\nconnection:');
        if (ki >= 0) { const e = h.indexOf('\r\n', ki + 2); close = h.slice(ki, e < 0 ? undefined : e).indexOf('close') >= 0; }
        expect = h.indexOf('\r\nexpect:') >= 0 && h.indexOf('100-continue') >= 0;
      }
      if (line.endsWith('HTTP/1.0')) close = true;
      let body, consumed;
      if (chunked) {
        const r = dechunk(buf, he + 4);
        if (r === null) { if (expect && !st.sentContinue) { st.sentContinue = true; sock.write(CONTINUE); } return; }
        [body, consumed] = r;
      } else {
        if (buf.length < he + 4 + clen) { if (expect && !st.sentContinue) { st.sentContinue = true; sock.write(CONTINUE); } return; }
        body = buf.subarray(he + 4, he + 4 + clen);
        consumed = he + 4 + clen;
      }
      st.sentContinue = false;
      st.buf = consumed >= buf.length ? null : buf.subarray(consumed);
      if (body === null) { sock.write(R.badRequest); sock.end(); return; }
      handle(method, url, body, close);
    }
  }

  function send(buf, close) {
    sock.write(buf);
    if (close) sock.end();
  }

  function later(buf, close) {
    st.busy = true;
    st.timer = setTimeout(() => { st.timer = null; if (st.closed) return; sock.write(buf); finish(close); }, PACE_MS * (N_TOKENS + 1));
  }

  // Paced stream: head events at once, then one token event every PACE_MS (the
  // first one PACE_MS after the head: a stand-in for prefill), then the tail
  // right after the last token. 20 tokens x 25 ms = 0.5 s per stream.
  function paced(w, withUsage, close) {
    const v = withUsage ? w.usage : w.plain;
    const list = v.framed;
    const lastToken = w.nHead + N_TOKENS;
    let i = 0;
    st.busy = true;
    sock.cork();
    sock.write(SSE_HEAD);
    while (i < w.nHead) sock.write(list[i++]);
    sock.uncork();
    const step = () => {
      st.timer = null;
      if (st.closed) return;
      if (i + 1 < lastToken) {
        sock.write(list[i++]);
        st.timer = setTimeout(step, PACE_MS);
        return;
      }
      sock.cork();
      while (i < list.length) sock.write(list[i++]);
      sock.write(LAST_CHUNK);
      sock.uncork();
      finish(close);
    };
    st.timer = setTimeout(step, PACE_MS);
  }

  function handle(method, url, body, close) {
    if (method === 'GET') {
      if (url === '/v1/models') { count('models'); return send(R.models, close); }
      if (url === '/health' || url === '/ping') return send(R.health, close);
      if (url === '/version') return send(R.version, close);
      if (url === '/mock/stats') return send(json(B(J(stats))), close);
      count('not_found');
      return send(R.notFound, close);
    }
    if (method !== 'POST') { count('not_found'); return send(R.notFound, close); }
    const stream = flagTrue(body, '"stream"');
    const isPaced = body.indexOf('"paced"') >= 0;
    if (url === '/v1/chat/completions') {
      if (stream) {
        count(isPaced ? 'chat_stream_paced' : 'chat_stream');
        const usage = flagTrue(body, '"include_usage"');
        if (isPaced) return paced(R.chatStreamPaced, usage, close);
        return send((usage ? R.chatStream.usage : R.chatStream.plain).whole, close);
      }
      count(isPaced ? 'chat_paced' : 'chat');
      return isPaced ? later(R.chatPaced, close) : send(R.chat, close);
    }
    if (url === '/v1/responses') {
      if (stream) {
        count(isPaced ? 'responses_stream_paced' : 'responses_stream');
        if (isPaced) return paced(R.respStreamPaced, false, close);
        return send(R.respStream.plain.whole, close);
      }
      count(isPaced ? 'responses_paced' : 'responses');
      return isPaced ? later(R.respPaced, close) : send(R.resp, close);
    }
    if (url === '/v1/messages') {
      if (stream) {
        count(isPaced ? 'messages_stream_paced' : 'messages_stream');
        if (isPaced) return paced(R.msgStreamPaced, false, close);
        return send(R.msgStream.plain.whole, close);
      }
      count(isPaced ? 'messages_paced' : 'messages');
      return isPaced ? later(R.msgPaced, close) : send(R.msg, close);
    }
    if (url === '/v1/embeddings') { count('embeddings'); return send(R.embed, close); }
    if (url === '/mock/reset') { for (const k in stats) delete stats[k]; return send(R.empty, close); }
    count('not_found');
    return send(R.notFound, close);
  }
}

const server = net.createServer({ noDelay: true }, onConnection);
if (KEEPALIVE_MS > 0) {
  // uvicorn (vLLM's server) closes a keep-alive connection idle for 5 s; so do we.
  setInterval(() => {
    for (const s of sockets) if (!s.st.busy && !s.st.buf && now - s.st.last > KEEPALIVE_MS) s.end();
  }, 500).unref();
}
server.listen(PORT, HOST, () => {
  process.stdout.write('LISTENING ' + server.address().port + '\n');
});
const stop = () => { server.close(); process.exit(0); };
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
