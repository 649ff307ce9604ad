// The admin API, with the master key from this tab's sessionStorage (never local storage, never a URL).

const STORAGE_KEY = "gomodel.dashboard.key";
const listeners = new Set();

export class ApiError extends Error {
  constructor(status, message, code, param) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

export function signedIn() {
  return sessionStorage.getItem(STORAGE_KEY) !== null;
}

// The gateway has no master key, as its page says (it lets any key in, the empty one or one typed all the same).
export function openGateway() {
  return document.documentElement.dataset.openGateway === "true";
}

export function signIn(key) {
  sessionStorage.setItem(STORAGE_KEY, key);
}

// Forget the key; listeners (the app) show the sign-in form with the reason.
export function signOut(reason) {
  sessionStorage.removeItem(STORAGE_KEY);
  for (const listener of listeners) listener(reason);
}

export function onSignOut(listener) {
  listeners.add(listener);
}

// The Authorization header of `key`: its UTF-8 bytes, one character each (fetch sends a header's characters as single
// bytes and refuses any past U+00FF; the gateway compares the key's UTF-8, as curl sends it).
function bearer(key) {
  return `Bearer ${String.fromCharCode(...new TextEncoder().encode(key))}`;
}

function headers(key, extra) {
  const out = Object.assign({}, extra);
  if (key) out.Authorization = bearer(key);
  return out;
}

// The browser's time zone (an IANA name, Asia/Kolkata), sent to the admin API as GoModel's X-GoModel-Timezone: the
// usage views count its days and hours. null: the browser names none, or the gateway refused that name (its time
// zone database lacks it: a 400 naming the header), and the views are UTC's.
let refusedZone = null;

export function timeZone() {
  let name = null;
  try {
    name = Intl.DateTimeFormat().resolvedOptions().timeZone;
  } catch (_) {
    // no Intl time zones: UTC's days
  }
  return typeof name === "string" && /^[A-Za-z0-9_+\-/]+$/.test(name) && name !== refusedZone ? name : null;
}

// What the usage views' days are named after: the zone sent, or UTC.
export function zoneName() {
  return timeZone() || "UTC";
}

// Check a key before keeping it: the answer of a cheap admin route, or an ApiError.
export async function tryKey(key) {
  let response;
  try {
    response = await fetch("/admin/api/v1/providers/status", {
      headers: key ? {Authorization: bearer(key)} : {}, cache: "no-store", credentials: "omit",
    });
  } catch (error) {
    throw new ApiError(0, `The gateway did not answer (${error.message}).`);
  }
  if (!response.ok) throw await failure(response);
  return response.json();
}

// Call the admin API (or /v1/ routes): the parsed JSON answer, or the Response itself with raw.
// A 401 signs out, if the key it was sent with is still the one kept (a late 401 for a key signed out of since
// is asked again with the current one: a 401 was not executed); any other error is thrown as an ApiError carrying
// the gateway's message.
// The admin API's calls carry the browser's time zone (timeZone()); one the gateway refuses is asked again in UTC.
// Signed out (a page's call made after a 401 signed it out), nothing is sent: an ApiError (401) is thrown.
export async function api(path, {method = "GET", body, raw = false} = {}) {
  const key = sessionStorage.getItem(STORAGE_KEY);
  if (key === null) throw new ApiError(401, "Signed out.");
  const zone = path.startsWith("/admin/api/") ? timeZone() : null;
  const extra = body === undefined ? {} : {"Content-Type": "application/json"};
  if (zone) extra["X-GoModel-Timezone"] = zone;
  let response;
  try {
    response = await fetch(path, {
      method, cache: "no-store", credentials: "omit", headers: headers(key, extra),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    throw new ApiError(0, `The gateway did not answer (${error.message}).`);
  }
  if (response.status === 401) {
    const error = await failure(response);
    const current = sessionStorage.getItem(STORAGE_KEY);
    if (current === key) signOut(`Signed out: the gateway refused the key (${error.message})`);
    else if (current !== null) return api(path, {method, body, raw});
    throw error;
  }
  if (!response.ok) {
    const error = await failure(response);
    if (zone && response.status === 400 && error.param === "X-GoModel-Timezone") {
      refusedZone = zone;
      return api(path, {method, body, raw});
    }
    throw error;
  }
  return raw ? response : response.json();
}

export function admin(path, options) {
  return api(`/admin/api/v1/${path}`, options);
}

// Download an answer as a file: fetched with the key in a header, saved from a Blob (no key in a URL).
export async function download(path, filename) {
  return save(await (await api(path, {raw: true})).blob(), filename);
}

// Download every page of a paged CSV answer (its X-Next header names the next page's `after`) as one file:
// the first page's header line, then each page's rows.
export async function downloadPages(path, filename) {
  const parts = [];
  let after = null;
  do {
    const separator = path.includes("?") ? "&" : "?";
    const response = await api(after === null ? path : `${path}${separator}after=${encodeURIComponent(after)}`,
      {raw: true});
    const text = await response.text();
    parts.push(parts.length ? text.slice(text.indexOf("\r\n") + 2) : text);
    after = response.headers.get("X-Next");
  } while (after !== null);
  return save(new Blob(parts, {type: "text/csv"}), filename);
}

function save(blob, filename) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 30000);
  return blob.size;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  let code;
  let param;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code;
      param = body.error.param;
    }
  } catch (_) {
    // not JSON: the status line says it
  }
  return new ApiError(response.status, message, code, param);
}

export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(name, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}
