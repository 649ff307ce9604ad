#!/usr/bin/env node
// Closed-loop streaming load generator for the overhead benchmark.
//
//   node streamload.mjs '<json config>'
//
// config: {
//   url: "http://127.0.0.1:PORT/v1/chat/completions",
//   headers: {...}, body: "<request JSON>",
//   kind: "chat" | "responses" | "messages",
//   expect_text: "the full text the stream must carry",
//   expect_text_alt: ["another acceptable text", ...],   // optional
//   expect_usage: true,            // chat: a usage chunk must arrive
//   concurrency: 64, warmup_s: 3, duration_s: 10, timeout_s: 30,
//   count: 8000, max_wall_s: 10,   // optional: fixed-count mode (below)
//   defer_checks: true             // fixed-count mode: check after the window (below)
// }
//
// `concurrency` streams run at once, each starting again as soon as it ends,
// over keep-alive connections. Every stream is checked to the end: status 200,
// every event parsed, the concatenated text equal to expect_text (or one of
// expect_text_alt), a finish_reason, the usage chunk (when asked) and
// `data: [DONE]` for chat; response.created, the deltas, and
// response.completed with usage and the same text for Responses;
// message_start, the text deltas, message_delta with a stop_reason and output
// tokens, and message_stop for Anthropic Messages. A stream that fails any
// check is an error.
//
// Time-boxed mode (default): prints "WINDOW_START" and "WINDOW_END" lines when
// the measurement window opens and closes (the harness samples CPU and memory
// at those moments), then one "STREAMJSON {...}" line. Only streams that end
// inside the window are counted.
//
// Fixed-count mode (`count`, GoModel's benchmark method): no warm-up; exactly
// `count` streams are started, `concurrency` at a time, and every one is
// counted. "WINDOW_START" is printed before the first starts and "WINDOW_END"
// once the last has ended, or when `max_wall_s` has passed (then no new stream
// starts, those in flight are cut and counted as `capped`, not as errors).
// There each stream's checks wait until the window has closed (see below), so
// that their CPU stays out of the target's figures; `defer_checks: false`
// checks each stream as it ends, as time-boxed mode does.
//
// TTFT (`ttft_*`) is the time to the first content token; `ttfd_*` the time to
// the first `data:` line of any event (what GoModel's loadgen calls TTFT).
//
// It is lean, as its own CPU and queueing show up in every target's TTFT: raw
// `net` sockets (one keep-alive connection per concurrent stream) read by a
// minimal HTTP/1.1 response reader (status line, Content-Length, chunked or
// read-to-close bodies, 1xx skipped), and a stream's events are parsed as they
// arrive only up to its first content token (the TTFT moment); the rest of the
// body is kept as raw bytes and parsed and checked, event by event and with the
// same checks, once the response has ended (fixed-count mode: once the window
// has closed, while the bytes kept stay under 512 MiB; the streams after that
// are checked as they end).

import net from 'node:net';
import { performance } from 'node:perf_hooks';

const cfg = JSON.parse(process.argv[2]);
const u = new URL(cfg.url);
if (u.protocol !== 'http:') throw new Error('streamload: only http:// URLs, not ' + cfg.url);
const host = u.hostname.replace(/^\[|\]$/g, '');
const port = +u.port || 80;
const conc = cfg.concurrency || 1;
const warmupMs = (cfg.warmup_s ?? 3) * 1000;
const durationMs = (cfg.duration_s ?? 10) * 1000;
const timeoutMs = (cfg.timeout_s ?? 30) * 1000;
const kind = cfg.kind || 'chat';
const expectTexts = [cfg.expect_text].concat(cfg.expect_text_alt || []);
const fixedCount = cfg.count || 0;
const maxWallMs = (cfg.max_wall_s ?? 0) * 1000;
const expectUsage = !!cfg.expect_usage;
const body = Buffer.from(cfg.body);
// The request, as bytes once: header names lower-cased (cfg.headers override the defaults).
const reqHeaders = { host: u.host, 'content-type': 'application/json', accept: 'text/event-stream', connection: 'keep-alive' };
for (const [k, v] of Object.entries(cfg.headers || {})) reqHeaders[k.toLowerCase()] = String(v);
reqHeaders['content-length'] = String(body.length);
const REQUEST = Buffer.concat([
  Buffer.from('POST ' + u.pathname + u.search + ' HTTP/1.1\r\n' +
              Object.entries(reqHeaders).map(([k, v]) => k + ': ' + v + '\r\n').join('') + '\r\n', 'latin1'),
  body]);

let phase = 'warmup';
let ws = 0, we = 0;
let inflight = 0;
const lat = [], ttft = [], ttfd = [];
let ok = 0, errors = 0, errorsOutside = 0, contentEvents = 0, doneMarkers = 0, noEventLines = 0, capped = 0;
let altTexts = 0;
const samples = [];

function fail(st, msg) { if (!st.err) st.err = msg; }

function onEvent(st, ev) {
  let name = '', data = '', hasData = false;
  for (const line of ev.split('\n')) {
    if (line.startsWith('data:')) {
      const v = line.charCodeAt(5) === 32 ? line.slice(6) : line.slice(5);
      data = hasData ? data + '\n' + v : v;
      hasData = true;
    } else if (line.startsWith('event:')) {
      name = line.charCodeAt(6) === 32 ? line.slice(7) : line.slice(6);
    }
  }
  if (!hasData) return;
  st.events++;
  if (st.ttfd < 0) st.ttfd = performance.now() - st.t0;
  if (st.terminal && !(kind !== 'chat' && data === '[DONE]' && !st.doneMarker)) { fail(st, 'event after the end of the stream: ' + data.slice(0, 80)); return; }
  if (kind === 'chat') {
    if (data === '[DONE]') { st.terminal = true; return; }
    let o;
    try { o = JSON.parse(data); } catch (e) { fail(st, 'bad JSON in event: ' + data.slice(0, 80)); return; }
    if (o.error) { fail(st, 'error event: ' + data.slice(0, 160)); return; }
    const ch = o.choices;
    if (ch && ch.length) {
      const c = ch[0];
      const d = c.delta;
      if (d && d.content) {
        if (st.ttft < 0) st.ttft = performance.now() - st.t0;
        st.text += d.content;
        st.content++;
      }
      if (c.finish_reason) st.finish = true;
    }
    if (o.usage && o.usage.completion_tokens > 0) st.usage = true;
    return;
  }
  if (kind === 'messages') {
    // Anthropic Messages: typed events, no [DONE] (a trailing one is tolerated
    // and counted, as for Responses); `ping` events are allowed.
    if (data === '[DONE]') { st.doneMarker = true; st.terminal = true; return; }
    let o;
    try { o = JSON.parse(data); } catch (e) { fail(st, 'bad JSON in event: ' + data.slice(0, 80)); return; }
    const type = name || o.type;
    if (type === 'message_start') {
      if (st.created) { fail(st, 'second message_start'); return; }
      st.created = true;
    } else if (type === 'content_block_delta') {
      const d = o.delta || {};
      if (d.type === 'text_delta') {
        if (st.ttft < 0) st.ttft = performance.now() - st.t0;
        st.text += d.text;
        st.content++;
      }
    } else if (type === 'message_delta') {
      if (o.delta && o.delta.stop_reason) st.finish = true;
      if (o.usage && o.usage.output_tokens > 0) st.usage = true;
    } else if (type === 'message_stop') {
      st.terminal = true;
      st.completed = true;
    } else if (type === 'error') {
      fail(st, 'error event: ' + data.slice(0, 160));
    }
    return;
  }
  // Responses: typed events and no [DONE] (vLLM and OpenAI). A trailing
  // [DONE] or data-only events (no `event:` line) are tolerated, as the
  // OpenAI SDK tolerates them, but counted and reported.
  if (data === '[DONE]') { st.doneMarker = true; st.terminal = true; return; }
  if (!name) st.noEventLine = true;
  let o;
  try { o = JSON.parse(data); } catch (e) { fail(st, 'bad JSON in event: ' + data.slice(0, 80)); return; }
  const type = name || o.type;
  if (type === 'response.output_text.delta') {
    if (st.ttft < 0) st.ttft = performance.now() - st.t0;
    st.text += o.delta;
    st.content++;
  } else if (type === 'response.created') {
    st.created = true;
  } else if (type === 'response.completed') {
    st.terminal = true;
    st.completed = true;
    const r = o.response || {};
    st.usage = !!(r.usage && r.usage.output_tokens > 0);
    st.finish = r.status === 'completed';
    try { st.finalText = r.output[0].content[0].text; } catch (e) { st.finalText = null; }
  } else if (type === 'error' || type === 'response.failed' || type === 'response.incomplete') {
    fail(st, type + ': ' + data.slice(0, 160));
  }
}

// Split decoded text into events (CR LF and CR end lines too, as the SSE spec
// says) and hand each to onEvent; `live` stops once the first content token
// (or an error) has been seen. Returns the text after the last complete event.
function events(st, s, live) {
  if (s.indexOf('\r') >= 0) {
    // a CR at the very end may be the first half of a CR LF: kept for the next piece
    const tail = live && s.endsWith('\r') ? '\r' : '';
    s = (tail ? s.slice(0, -1) : s).replace(/\r\n?/g, '\n') + tail;
  }
  let from = 0, i;
  while ((i = s.indexOf('\n\n', from)) >= 0) {
    if (i > from) onEvent(st, s.slice(from, i));
    from = i + 2;
    if (live && (st.ttft >= 0 || st.err)) { st.live = false; break; }
  }
  return from ? s.slice(from) : s;
}

// Body bytes as they arrive: decoded and parsed at once until the TTFT moment
// (a UTF-8 character cut at the end of a piece waits in `rest` for the next),
// kept raw after.
function take(st, p) {
  if (st.live) {
    if (st.rest.length) { p = Buffer.concat([st.rest.pop(), p]); st.restLen = 0; }
    const n = wholeChars(p);
    if (n < p.length) { st.rest.push(p.subarray(n)); st.restLen = p.length - n; }
    st.pending = events(st, st.pending + p.toString('utf8', 0, n), true);
  } else if (!st.err && (st.status === 200 || st.restLen < 300)) {
    st.rest.push(p);
    st.restLen += p.length;
  }
}

// The length of the longest start of `p` that does not end inside a UTF-8 character.
function wholeChars(p) {
  let i = p.length - 1;
  while (i > p.length - 4 && i > 0 && (p[i] & 0xc0) === 0x80) i--; // continuation bytes
  const b = p[i];
  if (!(b >= 0xc0)) return p.length;
  return p.length - i >= (b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : 2) ? p.length : i;
}

// The rest of the body, as text (once the response has ended).
function restText(st) {
  return st.rest.length ? (st.rest.length === 1 ? st.rest[0] : Buffer.concat(st.rest)).toString() : '';
}

function check(st) {
  if (st.err) return;
  if (st.status !== 200) return fail(st, 'status ' + st.status + ': ' + restText(st).slice(0, 200));
  const tail = events(st, st.pending + restText(st), false).trim();
  if (st.err) return;
  if (tail.length) onEvent(st, tail);
  if (!expectTexts.includes(st.text)) return fail(st, (kind === 'responses' ? 'delta ' : '') + 'text mismatch: got ' + JSON.stringify(st.text.slice(0, 120)));
  if (st.text !== expectTexts[0]) st.altText = true;
  if (kind === 'chat') {
    if (!st.finish) return fail(st, 'no finish_reason');
    if (expectUsage && !st.usage) return fail(st, 'no usage chunk');
    if (!st.terminal) return fail(st, 'no [DONE]');
  } else if (kind === 'messages') {
    if (!st.created) return fail(st, 'no message_start');
    if (!st.finish) return fail(st, 'no stop_reason in message_delta');
    if (!st.usage) return fail(st, 'no output_tokens in message_delta');
    if (!st.completed) return fail(st, 'no message_stop');
  } else {
    if (!st.created) return fail(st, 'no response.created');
    if (!st.completed) return fail(st, 'no response.completed');
    if (!st.finish) return fail(st, 'response.completed status is not completed');
    if (!st.usage) return fail(st, 'no usage in response.completed');
    if (st.finalText !== st.text) return fail(st, 'response.completed text mismatch');
  }
}

// Fixed-count mode parses and checks the rest of each stream once the window
// has closed (its CPU then stays out of the target's measurement), while the
// raw bytes kept stay under DEFER_BYTES; `defer_checks: false` checks at once.
const DEFER_BYTES = 512 << 20;
const deferChecks = fixedCount > 0 && cfg.defer_checks !== false;
const deferred = [];
let deferredBytes = 0;

function done(st) {
  if (st.finished) return;
  st.finished = true;
  inflight--;
  st.t1 = performance.now();
  st.inWindow = phase !== 'warmup' && st.t1 >= ws && (we === 0 || st.t1 <= we);
  if (deferChecks && !st.err && deferredBytes < DEFER_BYTES) { deferred.push(st); deferredBytes += st.restLen; } else tally(st);
  if (phase === 'drain') { if (inflight === 0) finish(); return; }
  if (fixedCount) {
    if (issued < fixedCount) one();
    else if (inflight === 0) endWindow();
    return;
  }
  if (st.err) setTimeout(one, 1); else one();
}

// Check a stream that has ended and count it.
function tally(st) {
  check(st);
  if (st.capped) {
    capped++;
  } else if (st.err) {
    if (st.inWindow) errors++; else errorsOutside++;
    if (samples.length < 5) samples.push(st.err);
  } else if (st.inWindow) {
    ok++;
    lat.push(st.t1 - st.t0);
    ttft.push(st.ttft);
    ttfd.push(st.ttfd);
    contentEvents += st.content;
    if (st.altText) altTexts++;
    if (st.doneMarker) doneMarkers++;
    if (st.noEventLine) noEventLines++;
  }
}

// Connections: one per concurrent stream, kept alive and reused (LIFO) while
// the server keeps them open. `c.st` is the stream in flight, null when idle.
const LENGTH = 1, CHUNKED = 2, CLOSE = 3;        // how the body ends
const SIZE = 0, DATA_END = 1, TRAILER = 2;       // chunked: which line comes next
const HEX = new Int8Array(256).fill(-1);          // a hex digit's value by its byte
for (let k = 0; k < 16; k++) HEX['0123456789abcdef'.charCodeAt(k)] = HEX['0123456789ABCDEF'.charCodeAt(k)] = k;
const conns = new Set();
const idle = [];

function connect() {
  const sock = net.connect({ host, port, noDelay: true });
  const c = { sock, st: null, head: true, hbuf: null, keepAlive: true, mode: CLOSE, left: 0, cs: SIZE, line: '' };
  sock.setTimeout(timeoutMs);
  sock.on('data', (d) => onData(c, d));
  sock.on('end', () => { if (c.st && !c.head && c.mode === CLOSE) ended(c, 0); });
  sock.on('timeout', () => { if (c.st) fail(c.st, 'timeout after ' + timeoutMs + ' ms'); sock.destroy(); });
  sock.on('error', (e) => { if (c.st) fail(c.st, (c.head ? 'request error: ' : 'response error: ') + e.message); });
  sock.on('close', () => {
    conns.delete(c);
    const i = idle.indexOf(c);
    if (i >= 0) idle.splice(i, 1);
    const st = c.st;
    if (st) { c.st = null; fail(st, c.head ? 'connection closed before the response' : 'connection closed mid-stream'); done(st); }
  });
  conns.add(c);
  return c;
}

function onData(c, d) {
  const st = c.st;
  if (!st) { c.sock.destroy(); return; } // bytes while no request is outstanding
  if (c.head) {
    if (c.hbuf) { d = Buffer.concat([c.hbuf, d]); c.hbuf = null; }
    while (c.head) {
      const he = d.indexOf('\r\n\r\n');
      if (he < 0) {
        if (d.length > 65536) { fail(st, 'response head over 64 KiB'); c.sock.destroy(); } else c.hbuf = d;
        return;
      }
      if (!head(c, st, d.toString('latin1', 0, he))) { c.sock.destroy(); return; }
      d = d.subarray(he + 4);
    }
    if (c.mode === LENGTH && c.left === 0) { ended(c, d.length); return; }
    if (!d.length) return;
  }
  if (c.mode === CHUNKED) chunked(c, st, d);
  else if (c.mode === CLOSE) take(st, d);
  else if (d.length < c.left) { c.left -= d.length; take(st, d); }
  else { const n = c.left; c.left = 0; take(st, d.length === n ? d : d.subarray(0, n)); ended(c, d.length - n); }
}

// The response head (status line and headers, without the blank line). A 1xx
// (100 Continue) is skipped: the real head follows. False on a bad status line.
function head(c, st, h) {
  const m = /^HTTP\/1\.([01]) (\d\d\d)/.exec(h);
  if (!m) { fail(st, 'bad status line: ' + JSON.stringify(h.slice(0, 80))); return false; }
  const status = +m[2];
  if (status < 200) return true;
  h = h.toLowerCase();
  c.head = false;
  st.status = status;
  st.live = status === 200;
  c.keepAlive = m[1] === '1' ? !/\r\nconnection:[^\r]*close/.test(h) : /\r\nconnection:[^\r]*keep-alive/.test(h);
  const cl = /\r\ncontent-length: *(\d+)/.exec(h);
  if (/\r\ntransfer-encoding:[^\r]*chunked/.test(h)) { c.mode = CHUNKED; c.cs = SIZE; c.line = ''; c.left = 0; }
  else if (cl || status === 204 || status === 304) { c.mode = LENGTH; c.left = cl ? +cl[1] : 0; }
  else { c.mode = CLOSE; c.keepAlive = false; }
  return true;
}

// A chunked body: chunk data to take(), size lines, the CR LF after each chunk,
// and the trailer up to its blank line (the end of the response).
function chunked(c, st, d) {
  const n = d.length;
  let i = 0;
  while (i < n) {
    if (c.left > 0) {
      const e = Math.min(n, i + c.left);
      take(st, i === 0 && e === n ? d : d.subarray(i, e));
      c.left -= e - i;
      i = e;
      if (c.left === 0) c.cs = DATA_END;
      continue;
    }
    if (c.line === '' && c.cs === DATA_END && d[i] === 13 && d[i + 1] === 10) { i += 2; c.cs = SIZE; continue; }
    if (c.line === '' && c.cs === SIZE) { // the usual size line, whole here: up to 8 hex digits, CR LF
      let v = 0, j = i, h;
      while (j - i < 8 && (h = HEX[d[j]]) >= 0) { v = v * 16 + h; j++; }
      if (j > i && d[j] === 13 && d[j + 1] === 10) { i = j + 2; c.left = v; if (v === 0) c.cs = TRAILER; continue; }
    }
    // any other line (or one cut by the end of `d`), as text
    const nl = d.indexOf(10, i);
    if (nl < 0) { c.line += d.toString('latin1', i, n); if (c.line.length > 4096) { fail(st, 'chunk line too long'); c.sock.destroy(); } return; }
    let line = c.line + d.toString('latin1', i, nl);
    c.line = '';
    i = nl + 1;
    if (line.endsWith('\r')) line = line.slice(0, -1);
    if (c.cs === SIZE) {
      if (!/^[0-9a-fA-F]+(;|[ \t]|$)/.test(line)) { fail(st, 'bad chunk size line: ' + JSON.stringify(line.slice(0, 40))); c.sock.destroy(); return; }
      c.left = parseInt(line, 16);
      if (c.left === 0) c.cs = TRAILER;
    } else if (c.cs === DATA_END) {
      if (line) { fail(st, 'chunk longer than its size'); c.sock.destroy(); return; }
      c.cs = SIZE;
    } else if (!line) {
      ended(c, n - i);
      return;
    }
  }
}

// The response has ended (`extra` bytes came after it: a protocol error).
function ended(c, extra) {
  const st = c.st;
  c.st = null;
  c.head = true;
  if (extra) { fail(st, extra + ' bytes after the end of the response'); c.keepAlive = false; }
  if (c.keepAlive && !st.err && !c.sock.destroyed) idle.push(c); else c.sock.destroy();
  done(st);
}

let issued = 0;
function one() {
  if (phase === 'drain' || (cfg.once && issued > 0)) return;
  issued++;
  inflight++;
  const c = idle.length ? idle.pop() : connect();
  c.st = { t0: performance.now(), ttft: -1, ttfd: -1, capped: false, altText: false, text: '', content: 0, events: 0, finish: false, usage: false, terminal: false, completed: false, doneMarker: false, noEventLine: false, created: false, finalText: null, err: null, pending: '', finished: false, status: 0, live: false, rest: [], restLen: 0 };
  c.sock.write(REQUEST);
}

function pct(a, p) {
  if (!a.length) return null;
  const i = Math.min(a.length - 1, Math.max(0, Math.ceil((p / 100) * a.length) - 1));
  return a[i];
}
const r3 = (x) => (x === null ? null : Math.round(x * 1000) / 1000);

let finished = false;
function finish() {
  if (finished) return;
  finished = true;
  for (const st of deferred) tally(st);
  const L = Float64Array.from(lat).sort();
  const T = Float64Array.from(ttft).sort();
  const D = Float64Array.from(ttfd).sort();
  const dur = (we - ws) / 1000;
  const mean = L.length ? L.reduce((a, b) => a + b, 0) / L.length : null;
  const out = {
    requests: ok, errors, errors_outside_window: errorsOutside, duration_s: r3(dur), rps: r3(ok / dur),
    lat_p50_ms: r3(pct(L, 50)), lat_p95_ms: r3(pct(L, 95)), lat_p99_ms: r3(pct(L, 99)), lat_max_ms: r3(L.length ? L[L.length - 1] : null), lat_mean_ms: r3(mean),
    ttft_p50_ms: r3(pct(T, 50)), ttft_p95_ms: r3(pct(T, 95)), ttft_p99_ms: r3(pct(T, 99)),
    ttfd_p50_ms: r3(pct(D, 50)), ttfd_p95_ms: r3(pct(D, 95)), ttfd_p99_ms: r3(pct(D, 99)),
    capped, issued, alt_texts: altTexts,
    content_events_mean: ok ? r3(contentEvents / ok) : null,
    unfinished_at_end: inflight, error_samples: samples,
    responses_done_marker: doneMarkers, responses_without_event_lines: noEventLines,
  };
  process.stdout.write('STREAMJSON ' + JSON.stringify(out) + '\n', () => process.exit(0));
}

// Fixed-count mode: the window is the whole run; it ends when the last stream
// has ended, or at max_wall_s (then the streams still running are cut and
// counted as capped).
let windowEnded = false;
function endWindow() {
  if (windowEnded) return;
  windowEnded = true;
  we = performance.now();
  phase = 'drain';
  process.stdout.write('WINDOW_END\n');
  if (inflight === 0) { finish(); return; }
  for (const c of conns) if (c.st) { c.st.capped = true; c.sock.destroy(); }
  setTimeout(finish, 1000).unref();
}

if (fixedCount) {
  phase = 'window';
  process.stdout.write('WINDOW_START\n');
  ws = performance.now();
  for (let i = 0; i < Math.min(conc, fixedCount); i++) one();
  if (maxWallMs > 0) setTimeout(endWindow, maxWallMs).unref();
} else if (cfg.once) {
  // one request, checked, reported (the harness's pre-flight)
  phase = 'window';
  ws = performance.now();
  one();
  const poll = setInterval(() => {
    if (inflight === 0) { clearInterval(poll); we = performance.now(); phase = 'drain'; finish(); }
  }, 5);
} else {
for (let i = 0; i < conc; i++) one();
setTimeout(() => {
  phase = 'window';
  ws = performance.now();
  process.stdout.write('WINDOW_START\n');
  setTimeout(() => {
    we = performance.now();
    phase = 'drain';
    process.stdout.write('WINDOW_END\n');
    if (inflight === 0) finish();
    // streams still running after the window are not counted; give them a
    // moment to end cleanly, then stop
    setTimeout(finish, Math.min(timeoutMs, 5000)).unref();
  }, durationMs);
}, warmupMs);
}
