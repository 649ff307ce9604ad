// Building the page: every text goes in with textContent (a name is never HTML), no inline styles.

// h("div", {class: "card", onclick: fn, title: "x"}, child, "text", [more]) -> an element.
// Attributes are set with setAttribute, except: class, text (textContent), on<event> (listeners),
// hidden/disabled/checked/value/selected (properties). "style" and "innerHTML" are refused.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "style" || name === "innerHTML" || name === "outerHTML") {
      throw new Error(`h(): '${name}' is not allowed`);
    } else if (name === "class") {
      el.className = value;
    } else if (name === "text") {
      el.textContent = String(value);
    } else if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (["hidden", "disabled", "checked", "value", "selected", "open"].includes(name)) {
      el[name] = value;
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export function replace(el, ...children) {
  return append(clear(el), children);
}

// A message box: kind "error" | "info" | "ok" | "empty".
export function note(kind, ...children) {
  return h("div", {class: `note note-${kind}`, role: kind === "error" ? "alert" : "status"}, ...children);
}

export function errorNote(error) {
  return note("error", error && error.message ? error.message : String(error));
}

// What a refreshed page says while its last read is unanswered at the next one's time (the gateway hung, say).
export const WAITING = "Not updated: waiting for the gateway's answer";

// Show why an action failed in `box` (a page's messages), scrolled into sight: the action's button may be far below.
export function showError(box, error) {
  replace(box, errorNote(error));
  box.scrollIntoView({block: "nearest"});
  return box;
}

// Give a focus a redraw took away (it is on the page's body: its button went away) to the button named `text` in
// `box` (or to box's first, `text` being gone or disabled), else to `fallback`; a focus the user moved elsewhere
// meanwhile stays.
export function focusAgain(box, text, fallback) {
  if (document.activeElement && document.activeElement !== document.body) return;
  const buttons = box ? [...box.querySelectorAll("button")].filter((e) => !e.disabled) : [];
  const found = buttons.find((e) => e.textContent === text) || buttons[0] || fallback;
  if (found) found.focus();
}

// A table: columns [{title, cell: row -> Node|string, class}], rows -> a scrollable table.
export function table(columns, rows, {empty = "Nothing yet.", rowClass} = {}) {
  const head = h("tr", {}, columns.map((c) => h("th", {class: c.class, scope: "col", text: c.title})));
  const body = rows.length
    ? rows.map((row) => h("tr", {class: rowClass ? rowClass(row) : null},
        columns.map((c) => h("td", {class: c.class, "data-label": c.title}, c.cell(row)))))
    : [h("tr", {}, h("td", {class: "empty-cell", colspan: columns.length, text: empty}))];
  return h("div", {class: "table-wrap"}, h("table", {}, h("thead", {}, head), h("tbody", {}, body)));
}

// A bar showing value / total (a <progress>: no inline style needed).
export function meter(value, total, label) {
  const max = total > 0 ? total : 1;
  const level = value / max >= 1 ? "full" : value / max >= 0.8 ? "high" : "ok";
  return h("span", {class: "meter"},
    h("progress", {class: `meter-bar meter-${level}`, max: String(max), value: String(Math.min(value, max))}),
    h("span", {class: "meter-label", text: label}));
}

export function badge(text, kind = text) {
  return h("span", {class: `badge badge-${String(kind).replace(/[^a-z0-9_-]/gi, "")}`, text});
}

export function button(text, onclick, {kind = "secondary", title, disabled} = {}) {
  return h("button", {type: "button", class: `btn btn-${kind}`, onclick, title, disabled, text});
}

// -- formatting ------------------------------------------------------------------------------

const integer = new Intl.NumberFormat("en-US");

export function int(value) {
  return value === null || value === undefined ? "–" : integer.format(value);
}

// `n` `word`s, as a count reads: "1 failure", "2 failures" (the plural by an s).
// What the errors of a summary or bucket were, each kind it had: the answers of 5xx (and errors told inside a 200
// stream), of 400 to 499 (a bad request, an upstream's 429), the clients that left (499), the streams that broke,
// the requests the gateway's own limits and budgets refused (429).
export function errorKinds(s) {
  return [[s.server_errors, "server (5xx)"], [s.client_errors, "refused (4xx)"], [s.client_gone, "client left (499)"],
    [s.stream_broken, s.stream_broken === 1 ? "stream broken" : "streams broken"],
    [s.refused, "over the gateway's limits (429)"]]
    .filter(([n]) => n).map(([n, what]) => `${int(n)} ${what}`);
}

export function counted(n, word) {
  return `${int(n)} ${word}${n === 1 ? "" : "s"}`;
}

export function ms(value) {
  if (value === null || value === undefined) return "–";
  return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${Math.round(value)} ms`;
}

// "8 / 33 ms" (or each in its own unit when either is a second or more).
export function msPair(a, b) {
  if (a !== null && a !== undefined && b !== null && b !== undefined && a < 1000 && b < 1000) {
    return `${Math.round(a)} / ${Math.round(b)} ms`;
  }
  return `${ms(a)} / ${ms(b)}`;
}

const money = new Intl.NumberFormat("en-US", {minimumFractionDigits: 2, maximumFractionDigits: 2});

// 12,345,678.50 (grouped as int()'s counts are); below a cent, six places: 0.001200.
export function cost(value) {
  if (value === null || value === undefined) return "–";
  return value < 0.01 && value > 0 ? value.toFixed(6) : money.format(value);
}

export function percent(value) {
  return value === null || value === undefined ? "–" : `${Math.round(value * 100)}%`;
}

export function when(value) {
  if (value === null || value === undefined) return "–";
  const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  return date.toISOString().replace("T", " ").replace(/\.\d+Z$|Z$/, " UTC");
}

// A time in the browser's time zone, its offset named: "2026-12-06 21:50:03 UTC+05:30" (when() is UTC's).
export function localWhen(value) {
  if (value === null || value === undefined) return "–";
  const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  const pad = (n) => String(n).padStart(2, "0");
  const east = -date.getTimezoneOffset();
  const size = Math.abs(east);
  const offset = east === 0 ? "" : `${east > 0 ? "+" : "-"}${pad(Math.floor(size / 60))}:${pad(size % 60)}`;
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ${pad(date.getHours())}:`
    + `${pad(date.getMinutes())}:${pad(date.getSeconds())} UTC${offset}`;
}

// 12.3k, 4.5M, 6.7B: a value that would round to 1000.0 of a unit is 1.0 of the next (999,960: 1.0M).
export function compact(value) {
  if (value === null || value === undefined) return "–";
  const size = Math.abs(value);
  if (size >= 999.95e6) return `${(value / 1e9).toFixed(1)}B`;
  if (size >= 999.95e3) return `${(value / 1e6).toFixed(1)}M`;
  if (size >= 1e4) return `${(value / 1e3).toFixed(1)}k`;
  return integer.format(value);
}
