#!/usr/bin/env node
// Self-test of bench/streamload.mjs: do its checks still catch a bad stream?
//
//   node bench/streamload_selftest.mjs
//
// A tiny local server (127.0.0.1, a free port) answers each case's path with
// fixed bytes: good streams of each kind (chat, responses, messages) framed in
// every way the client must read (chunked, Content-Length, read to close, CR
// LF line ends, a chunk per byte, a 100 Continue first), and broken ones
// (truncated, wrong text, missing usage, missing [DONE], an error event, a 500,
// ...). streamload runs 3 streams of each case, 2 at a time, with its checks at
// each stream's end and again deferred to the window's end (`defer_checks`); a
// good case must give 3 streams and no error, a broken one 3 errors (each with
// the expected message) and no stream. Prints one line per case; exits 1 if any is not as
// expected.

import net from 'node:net';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

// STREAMLOAD=path tests another copy of the client
const STREAMLOAD = process.env.STREAMLOAD || fileURLToPath(new URL('./streamload.mjs', import.meta.url));
const tokens = (tag) => [tag, ...Array.from({ length: 19 }, (_, i) => ' t' + String(i + 1).padStart(2, '0'))];
const TOKENS = { chat: tokens('mockchat'), responses: tokens('mockresp'), messages: tokens('mockmsgs') };
const TEXT = { chat: TOKENS.chat.join(''), responses: TOKENS.responses.join(''), messages: TOKENS.messages.join('') };
const J = JSON.stringify;

// The events of a good stream of each kind (as vLLM writes them: bench/mock/mock.mjs),
// as a list of SSE event strings; `o` changes one thing.
function chatEvents(o = {}) {
  const toks = o.tokens || TOKENS.chat;
  const chunk = (delta, finish) => 'data: ' + J({ id: 'chatcmpl-1', object: 'chat.completion.chunk', choices: [{ index: 0, delta, finish_reason: finish }] }) + '\n\n';
  const ev = [chunk({ role: 'assistant', content: '' }, null)];
  for (const t of toks) ev.push(chunk({ content: t }, null));
  ev.push(chunk({ content: '' }, o.noFinish ? null : 'length'));
  if (!o.noUsage) ev.push('data: ' + J({ id: 'chatcmpl-1', choices: [], usage: { prompt_tokens: 18, completion_tokens: 20, total_tokens: 38 } }) + '\n\n');
  if (!o.noDone) ev.push('data: [DONE]\n\n');
  return ev;
}
function respEvents(o = {}) {
  const toks = o.tokens || TOKENS.responses;
  const ev = (type, data) => 'event: ' + type + '\ndata: ' + J(Object.assign({ type }, data)) + '\n\n';
  const text = o.finalText ?? toks.join('');
  const response = (status, usage) => ({ id: 'resp_1', object: 'response', status, output: status === 'completed' ? [{ type: 'message', role: 'assistant', content: [{ type: 'output_text', text }] }] : [], usage });
  const out = [ev('response.created', { response: response('in_progress', null) })];
  for (const t of toks) out.push(ev('response.output_text.delta', { delta: t }));
  if (o.failed) out.push(ev('response.failed', { response: response('failed', null) }));
  else if (!o.noCompleted) out.push(ev('response.completed', { response: response('completed', o.noUsage ? null : { input_tokens: 18, output_tokens: 20 }) }));
  return out;
}
function msgEvents(o = {}) {
  const toks = o.tokens || TOKENS.messages;
  const ev = (type, data) => 'event: ' + type + '\ndata: ' + J(Object.assign({ type }, data)) + '\n\n';
  const out = [ev('message_start', { message: { id: 'msg_1', type: 'message', role: 'assistant', content: [], usage: { input_tokens: 18, output_tokens: 0 } } }),
    ev('content_block_start', { index: 0, content_block: { type: 'text', text: '' } })];
  for (const t of toks) out.push(ev('content_block_delta', { index: 0, delta: { type: 'text_delta', text: t } }));
  if (o.error) out.push(ev('error', { error: { type: 'overloaded_error', message: 'Overloaded' } }));
  out.push(ev('content_block_stop', { index: 0 }));
  out.push(ev('message_delta', { delta: { stop_reason: o.noStop ? null : 'max_tokens' }, usage: { output_tokens: 20 } }));
  if (!o.noMessageStop) out.push(ev('message_stop', {}));
  return out;
}

// HTTP framings of an event list (a string or a list of strings).
const SSE = 'content-type: text/event-stream; charset=utf-8\r\n';
const bytes = (x) => Buffer.from(Array.isArray(x) ? x.join('') : x);
const chunk = (b) => Buffer.concat([Buffer.from(b.length.toString(16) + '\r\n'), b, Buffer.from('\r\n')]);
function chunked(evs, { last = true, head = 'HTTP/1.1 200 OK\r\n' + SSE } = {}) {
  return [Buffer.from(head + 'transfer-encoding: chunked\r\n\r\n'), ...evs.map((e) => chunk(Buffer.from(e))), last ? Buffer.from('0\r\n\r\n') : Buffer.alloc(0)];
}
const withLength = (evs, status = '200 OK', type = SSE) => { const b = bytes(evs); return [Buffer.from('HTTP/1.1 ' + status + '\r\n' + type + 'content-length: ' + b.length + '\r\n\r\n'), b]; };
// each byte of the body its own chunk, each written apart (every read boundary the client can meet)
const perByte = (evs) => { const b = bytes(evs); return [Buffer.from('HTTP/1.1 200 OK\r\n' + SSE + 'transfer-encoding: chunked\r\n\r\n'), ...Array.from(b, (x) => chunk(Buffer.from([x]))), Buffer.from('0\r\n\r\n')]; };

// name, kind, what streamload must report ('ok', or a pattern every error matches), the answer's
// parts (written in turn), and `close` to close the connection after the answer
const cases = [
  ['chat ok', 'chat', 'ok', chunked(chatEvents())],
  ['chat ok: Content-Length', 'chat', 'ok', withLength(chatEvents())],
  ['chat ok: read to close', 'chat', 'ok', [Buffer.from('HTTP/1.1 200 OK\r\n' + SSE + 'connection: close\r\n\r\n'), bytes(chatEvents())], { close: true }],
  ['chat ok: CR LF line ends', 'chat', 'ok', chunked(chatEvents().map((e) => e.replace(/\n/g, '\r\n')))],
  ['chat ok: a chunk per byte', 'chat', 'ok', perByte(chatEvents().map((e) => e.replace(/\n/g, '\r\n')))],
  ['chat ok: 100 Continue first', 'chat', 'ok', [Buffer.from('HTTP/1.1 100 Continue\r\n\r\n'), ...chunked(chatEvents())]],
  ['chat ok: multi-byte text split across chunks', 'chat', 'ok', perByte(chatEvents({ tokens: ['h\u00e9', 'llo \u{1F600}'] })), { text: 'h\u00e9llo \u{1F600}' }],
  ['chat: status 500', 'chat', /^status 500: \{"error"/, withLength('{"error":{"message":"boom"}}', '500 Internal Server Error', 'content-type: application/json\r\n')],
  ['chat: truncated (closed mid-stream)', 'chat', /^connection closed mid-stream/, chunked(chatEvents().slice(0, 8), { last: false }), { close: true }],
  ['chat: truncated (Content-Length short)', 'chat', /^connection closed mid-stream/, [withLength(chatEvents())[0], bytes(chatEvents().slice(0, 8))], { close: true }],
  ['chat: closed before the response', 'chat', /^connection closed before the response/, [], { close: true }],
  ['chat: wrong text', 'chat', /^text mismatch/, chunked(chatEvents({ tokens: TOKENS.responses }))],
  ['chat: a token missing', 'chat', /^text mismatch/, chunked(chatEvents({ tokens: TOKENS.chat.slice(1) }))],
  ['chat: no finish_reason', 'chat', /^no finish_reason/, chunked(chatEvents({ noFinish: true }))],
  ['chat: no usage chunk', 'chat', /^no usage chunk/, chunked(chatEvents({ noUsage: true }))],
  ['chat: no [DONE]', 'chat', /^no \[DONE\]/, chunked(chatEvents({ noDone: true }))],
  ['chat: error event', 'chat', /^error event/, chunked([...chatEvents().slice(0, 5), 'data: {"error":{"message":"upstream went away"}}\n\n'])],
  ['chat: error event first', 'chat', /^error event/, chunked(['data: {"error":{"message":"no"}}\n\n', ...chatEvents()])],
  ['chat: bad JSON in an event', 'chat', /^bad JSON in event/, chunked([...chatEvents().slice(0, 12), 'data: {"choices":[\n\n', ...chatEvents().slice(12)])],
  ['chat: event after [DONE]', 'chat', /^event after the end of the stream/, chunked([...chatEvents(), 'data: {"choices":[]}\n\n'])],
  ['chat: bytes after the response', 'chat', /bytes after the end of the response/, [...chunked(chatEvents()), Buffer.from('HTTP/1.1 200 OK\r\n')]],
  ['chat: bad chunk size', 'chat', /^bad chunk size line/, [Buffer.from('HTTP/1.1 200 OK\r\n' + SSE + 'transfer-encoding: chunked\r\n\r\nzz\r\n')]],
  ['chat: bad status line', 'chat', /^bad status line/, [Buffer.from('HTTP/9 200 OK\r\n\r\n')], { close: true }],
  ['chat: no answer (timeout)', 'chat', /^timeout after/, [], { stall: true }],
  ['responses ok', 'responses', 'ok', chunked(respEvents())],
  ['responses: wrong text', 'responses', /^delta text mismatch/, chunked(respEvents({ tokens: TOKENS.chat }))],
  ['responses: completed text differs', 'responses', /^response.completed text mismatch/, chunked(respEvents({ finalText: 'other' }))],
  ['responses: no response.completed', 'responses', /^no response.completed/, chunked(respEvents({ noCompleted: true }))],
  ['responses: no usage', 'responses', /^no usage in response.completed/, chunked(respEvents({ noUsage: true }))],
  ['responses: response.failed', 'responses', /^response.failed/, chunked(respEvents({ failed: true }))],
  ['responses: error event', 'responses', /^error:/, chunked([...respEvents().slice(0, 3), 'event: error\ndata: {"type":"error","message":"boom"}\n\n'])],
  ['responses: truncated', 'responses', /^connection closed mid-stream/, chunked(respEvents().slice(0, 10), { last: false }), { close: true }],
  ['messages ok', 'messages', 'ok', chunked(msgEvents())],
  ['messages: wrong text', 'messages', /^text mismatch/, chunked(msgEvents({ tokens: TOKENS.messages.slice(0, 10) }))],
  ['messages: no message_stop', 'messages', /^no message_stop/, chunked(msgEvents({ noMessageStop: true }))],
  ['messages: no stop_reason', 'messages', /^no stop_reason/, chunked(msgEvents({ noStop: true }))],
  ['messages: error event', 'messages', /^error event/, chunked(msgEvents({ error: true }))],
  ['messages: status 500', 'messages', /^status 500/, withLength('{"type":"error"}', '500 Internal Server Error', 'content-type: application/json\r\n')],
  ['messages: truncated', 'messages', /^connection closed mid-stream/, chunked(msgEvents().slice(0, 6), { last: false }), { close: true }],
];

// The server: reads one request (head and Content-Length body) at a time, answers the case its path names.
const server = net.createServer((sock) => {
  let buf = Buffer.alloc(0);
  sock.on('error', () => {});
  sock.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    for (;;) {
      const he = buf.indexOf('\r\n\r\n');
      if (he < 0) return;
      const head = buf.toString('latin1', 0, he);
      const len = +(/\r\ncontent-length: *(\d+)/i.exec(head) || [0, 0])[1];
      if (buf.length < he + 4 + len) return;
      buf = buf.subarray(he + 4 + len);
      const c = cases[+head.split(' ')[1].split('/')[1]];
      const opts = c[4] || {};
      if (opts.stall) return;
      // in one write, or (a chunk per byte) each part apart, a turn of the event loop between them
      const parts = c[3].length > 50 ? c[3] : [Buffer.concat(c[3])];
      let i = 0;
      const next = () => {
        if (i < parts.length) { sock.write(parts[i++]); setImmediate(next); } else if (opts.close) sock.end();
      };
      next();
    }
  });
});

function runCase(port, idx, defer) {
  const [, kind, want, , opts = {}] = cases[idx];
  const cfg = { url: 'http://127.0.0.1:' + port + '/' + idx + '/v1/x', body: '{"stream":true}', kind, expect_text: opts.text || TEXT[kind],
    expect_usage: true, concurrency: 2, count: 3, max_wall_s: 60, timeout_s: opts.stall ? 0.3 : 30, defer_checks: defer };
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [STREAMLOAD, JSON.stringify(cfg)], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    p.stdout.on('data', (d) => { out += d; });
    p.on('close', () => {
      const line = out.split('\n').find((l) => l.startsWith('STREAMJSON '));
      if (!line) return resolve('no STREAMJSON line: ' + out.slice(-200));
      const r = JSON.parse(line.slice(11));
      if (want === 'ok') return resolve(r.requests === 3 && r.errors === 0 ? null : 'want 3 good streams, got ' + J(r));
      if (r.requests !== 0 || r.errors !== 3) return resolve('want 3 errors, got ' + r.requests + ' good and ' + r.errors + ' errors: ' + J(r.error_samples));
      const bad = r.error_samples.find((s) => !want.test(s));
      resolve(bad === undefined ? null : 'error ' + J(bad) + ' does not match ' + want);
    });
  });
}

server.listen(0, '127.0.0.1', async () => {
  const port = server.address().port;
  // each case with the checks at each stream's end, then deferred to the window's end
  const runs = [false, true].flatMap((defer) => cases.map((c, i) => [i, defer]));
  const results = new Array(runs.length);
  let next = 0, failed = 0;
  const worker = async () => { while (next < runs.length) { const r = next++; results[r] = await runCase(port, ...runs[r]); } };
  await Promise.all([worker(), worker(), worker(), worker()]);
  runs.forEach(([i, defer], r) => {
    const [name, , want] = cases[i];
    if (results[r]) failed++;
    console.log((results[r] ? 'FAIL ' : 'ok   ') + name + (want === 'ok' ? '' : ' -> error') + (defer ? ' (checks deferred)' : '') + (results[r] ? ': ' + results[r] : ''));
  });
  console.log(failed ? failed + ' of ' + runs.length + ' runs failed' : 'all ' + runs.length + ' runs as expected');
  server.close();
  process.exit(failed ? 1 : 0);
});
