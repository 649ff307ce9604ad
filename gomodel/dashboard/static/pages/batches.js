// Batches: each batch with its status and progress (completed / failed / total lines), cancel, downloads.
// OpenAI's batches (/v1/batches) and Anthropic's message batches (/v1/messages/batches), each listed by its
// own API (neither shows the other's), in one table, newest first.

import {api, download, query} from "../api.js";
import {badge, button, errorNote, h, int, note, replace, showError, table, WAITING, when} from "../dom.js";

export const title = "Batches";
export const REFRESH_MS = 2000;
const CANCELLABLE = ["validating", "in_progress"];
const ERRORS_SHOWN = 3; // a failed batch's bad lines named in its row

export function mount(el) {
  let stopped = false;
  let shown = 1; // pages of 100 loaded
  let shownSignature = null;
  let loadFailed = null; // the note of the list's last read, if it failed (an action's stays)
  const confirming = new Set(); // the batches whose Cancel was pressed, asking for its Confirm (kept across redraws)
  let asked = 0; // reads of the list begun (every 2 s, and after an action), each numbered
  let drawn = 0; // the number of the read drawn last: an older one answered after it is not drawn over it
  let reading = 0; // reads on their way: while one is, the timer's next is not sent (the gateway may be hung)
  const messages = h("div", {class: "messages", id: "batches-messages"});
  const list = h("div", {id: "batches-list"});
  const more = h("div", {class: "pager"});
  replace(el, h("div", {class: "page-head"}, h("h1", {text: "Batches"})), messages, list, more);

  // (timed: the timer's, every REFRESH_MS; an action's read goes out whatever is on its way)
  async function load(timed = false) {
    if (stopped) return;
    if (timed && reading) { // unanswered a refresh's time later: the batches shown are not now's
      if (!loadFailed) replace(messages, loadFailed = note("error", `${WAITING}.`));
      return;
    }
    const mine = ++asked;
    reading += 1;
    try {
      const [openai, anthropic] = await Promise.all([pages("/v1/batches", "after"),
        pages("/v1/messages/batches", "after_id")]);
      const lists = [[openai, openai.data.map((b) => Object.assign({route: "/v1/batches"}, b))],
        [anthropic, anthropic.data.map(fromMessageBatch)]];
      // A list with more to read is read down to its oldest batch shown: the other's older than that wait for
      // Load more, with the batches of this one that come between them.
      const from = Math.max(-Infinity, ...lists.filter(([list, data]) => list.hasMore && data.length)
        .map(([, data]) => Math.min(...data.map((b) => b.created_at))));
      const batches = lists.flatMap(([, data]) => data).filter((b) => b.created_at >= from)
        .sort((a, b) => b.created_at - a.created_at);
      const hasMore = openai.hasMore || anthropic.hasMore;
      if (stopped || mine < drawn) return; // (read before the list drawn: a batch cancelled since shows as running)
      drawn = mine;
      if (loadFailed) loadFailed.remove(); // (its own error, not an action's: that one stays until the next action)
      loadFailed = null;
      const signature = JSON.stringify([batches, hasMore]);
      if (signature === shownSignature) return; // unchanged: leave the page (and the pointer) alone
      shownSignature = signature;
      const focused = document.activeElement && document.activeElement.closest("#batches-list [data-action]");
      const again = focused && [focused.closest("[data-batch-id]").dataset.batchId, focused.dataset.action];
      replace(list, batches.length ? batchTable(batches) : note("empty",
        "No batches yet. Upload a JSONL file with purpose \"batch\" and create a batch with the OpenAI SDK: ",
        h("code", {text: "client.batches.create(input_file_id=..., endpoint=\"/v1/chat/completions\", " +
          "completion_window=\"24h\")"}), " against this gateway (or a message batch with Anthropic's SDK)."));
      replace(more, hasMore ? button("Load more", () => { shown += 1; shownSignature = null; load(); }) : null);
      if (again) { // the same button, drawn again, keeps the focus
        const box = [...list.querySelectorAll("[data-batch-id]")].find((e) => e.dataset.batchId === again[0]);
        const same = box && box.querySelector(`[data-action='${again[1]}']`);
        if (same) same.focus();
      }
    } catch (error) {
      if (!stopped && mine > drawn) replace(messages, loadFailed = errorNote(error));
    } finally {
      reading -= 1;
    }
  }

  // The first `shown` pages of 100 of a list route (its cursor parameter named `cursor`).
  async function pages(path, cursor) {
    let data = [];
    let after = null;
    let hasMore = false;
    for (let page = 0; page < shown; page++) {
      const answer = await api(`${path}${query({limit: 100, [cursor]: after})}`);
      data = data.concat(answer.data);
      hasMore = answer.has_more;
      if (!hasMore || !answer.data.length) break;
      after = answer.data[answer.data.length - 1].id;
    }
    return {data, hasMore};
  }

  function batchTable(batches) {
    return table([
      {title: "Batch", cell: (b) => h("div", {},
        h("code", {class: "wrap batch-id", text: b.id}),
        b.metadata ? h("div", {class: "muted metadata", text: Object.entries(b.metadata)
          .map(([name, value]) => `${name}=${value}`).join(" · ")}) : null,
        failures(b.errors))},
      {title: "Endpoint", cell: (b) => h("code", {text: b.endpoint})},
      {title: "Status", cell: (b) => badge(b.status), class: "batch-status"},
      {title: "Progress", cell: (b) => progress(b.request_counts), class: "batch-progress"},
      {title: "Created", cell: (b) => when(b.created_at)},
      {title: "", cell: (b) => actions(b), class: "actions"},
    ], batches, {rowClass: (b) => `batch-row batch-${b.status}`});
  }

  // A batch's buttons: Cancel (asked twice: Confirm cancel or Keep; a cancel cannot be undone) and its downloads,
  // each named by data-action (the button focused when the list is drawn again is focused again).
  function actions(b) {
    const box = h("div", {class: "row-actions", "data-batch-id": b.id});
    const named = (element, name) => {
      element.dataset.action = name;
      return element;
    };
    const files = b.results_url ? [[b.results_url, "Results", "results"]] : [[b.output_file_id, "Output", "output"],
      [b.error_file_id, "Errors", "errors"]].map(([fileId, label, suffix]) =>
      [fileId && `/v1/files/${encodeURIComponent(fileId)}/content`, label, suffix]);
    const downloads = files.filter(([path]) => path).map(([path, label, suffix]) => {
      const get = button(label, async () => {
        try {
          await download(path, `${b.id}-${suffix}.jsonl`);
        } catch (error) {
          showError(messages, error);
        }
      }, {title: `Download ${b.id}'s ${label.toLowerCase()}`});
      get.dataset.download = suffix;
      return named(get, `download-${suffix}`);
    });
    const draw = (focus) => {
      const cancel = !CANCELLABLE.includes(b.status) ? [] : !confirming.has(b.id)
        ? [named(button("Cancel", () => {
          confirming.add(b.id);
          draw("confirm");
        }, {kind: "danger-ghost"}), "cancel")]
        : [named(button("Confirm cancel", async () => {
          confirming.delete(b.id);
          try {
            await api(`${b.route}/${encodeURIComponent(b.id)}/cancel`, {method: "POST"});
          } catch (error) {
            showError(messages, error);
          }
          load();
        }, {kind: "danger"}), "confirm"), named(button("Keep", () => {
          confirming.delete(b.id);
          draw("cancel");
        }), "keep")];
      replace(box, cancel, downloads);
      if (focus) box.querySelector(`[data-action='${focus}']`).focus();
    };
    if (!CANCELLABLE.includes(b.status)) confirming.delete(b.id);
    draw();
    return box;
  }

  load();
  const timer = setInterval(() => load(true), REFRESH_MS);
  return () => {
    stopped = true;
    clearInterval(timer);
  };
}

// A message batch (Anthropic's shape) in an OpenAI batch's: its status (canceling is OpenAI's cancelling,
// ended the batch's end: completed, or cancelled where it was), its lines' counts (succeeded: completed;
// errored, canceled and expired: failed) and its results (one file of Anthropic's result lines).
function fromMessageBatch(m) {
  const c = m.request_counts;
  const status = m.processing_status === "in_progress" ? "in_progress" : m.processing_status === "canceling"
    ? "cancelling" : m.cancel_initiated_at ? "cancelled" : "completed";
  return {
    id: m.id, endpoint: "/v1/messages", status, route: "/v1/messages/batches", results_url: m.results_url,
    created_at: Date.parse(m.created_at) / 1000, metadata: null, errors: null,
    request_counts: {completed: c.succeeded, failed: c.errored + c.canceled + c.expired,
      total: c.processing + c.succeeded + c.errored + c.canceled + c.expired},
  };
}

// Why a batch failed before it ran (its errors.data: the bad lines), the first few of them.
function failures(errors) {
  const data = (errors && errors.data) || [];
  if (!data.length) return null;
  const shown = data.slice(0, ERRORS_SHOWN).map((e) => h("li", {
    text: e.line === null || e.line === undefined ? e.message : `line ${e.line}: ${e.message}`}));
  if (data.length > ERRORS_SHOWN) shown.push(h("li", {class: "muted", text: `and ${data.length - ERRORS_SHOWN} more`}));
  return h("ul", {class: "batch-errors error-text"}, shown);
}

// A bar of completed (green) and failed (red) lines out of the total; widths through the CSSOM.
function progress(counts) {
  const total = counts.total || 0;
  const done = counts.completed + counts.failed;
  const pct = total ? Math.round((100 * done) / total) : 0;
  const completed = h("span", {class: "progress-completed"});
  const failed = h("span", {class: "progress-failed"});
  completed.style.width = total ? `${(100 * counts.completed) / total}%` : "0%";
  failed.style.width = total ? `${(100 * counts.failed) / total}%` : "0%";
  return h("div", {class: "progress-cell"},
    h("div", {class: "progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100",
      "aria-valuenow": String(pct), "aria-label": "lines answered"}, completed, failed),
    h("span", {class: "progress-label",
      text: `${pct}% · ${int(counts.completed)} completed · ${int(counts.failed)} failed · ${int(total)} total`}));
}
