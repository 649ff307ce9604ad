// Usage: totals by model, provider, key and user path for a window (table, chart, CSV), and the request log.
// Windows are days of the browser's time zone (the admin API is told it: api.js), custom dates its dates too.

import {admin, download, downloadPages, query, zoneName} from "../api.js";
import {COLORS, chart, update} from "../charts.js";
import {badge, button, cost, errorKinds, errorNote, focusAgain, h, int, localWhen, ms, note, replace, table, when}
  from "../dom.js";

export const title = "Usage";
const GROUPS = {
  model: {label: "Model", route: "usage/models"},
  provider: {label: "Provider", route: "usage/providers"},
  key: {label: "Key", route: "usage/keys"},
  path: {label: "User path", route: "usage/user-paths"},
};
const WINDOWS = [["1", "Today"], ["7", "Last 7 days"], ["30", "Last 30 days"], ["90", "Last 90 days"],
  ["custom", "Dates…"]];
const PAGE_SIZE = 50;
const state = {days: "7", start: "", end: "", group: "model", filters: {status: "", model: "", key: "", search: ""}};

export function mount(el) {
  let stopped = false;
  // How many times each part was asked for: an answer is drawn only if no newer one was asked for since
  // (another window, group, filter or page), whichever comes first.
  const asked = {keys: 0, totals: 0, groups: 0, log: 0};
  const ask = (part) => {
    const mine = ++asked[part];
    return () => !stopped && asked[part] === mine;
  };
  const keyNames = new Map();
  const messages = h("div", {class: "messages", id: "usage-messages"});
  // Each part's error (keys, totals, groups, log, csv, window: dates refused), shown until that part is asked for
  // again and answers.
  const failures = {};
  const failed = (part, error) => {
    if (failures[part]) failures[part].remove();
    messages.append(failures[part] = errorNote(error));
  };
  const answered = (part) => {
    if (failures[part]) failures[part].remove();
    failures[part] = null;
  };

  // -- the window --------------------------------------------------------------------------
  const range = h("span", {class: "muted", id: "usage-range"});
  // "Dates…" only opens the date fields: the window (state.days) changes on Apply, and until then every view (a
  // tab, a filter, a CSV) is of the window the range and totals show.
  const days = h("select", {id: "usage-days", "aria-label": "Window", onchange: () => {
    dates.hidden = days.value !== "custom";
    if (days.value === "custom") return;
    state.days = days.value;
    reload();
  }}, WINDOWS.map(([value, text]) => h("option", {value, text, selected: value === state.days})));
  const start = h("input", {type: "date", id: "usage-start", value: state.start, "aria-label": "Start date"});
  const end = h("input", {type: "date", id: "usage-end", value: state.end, "aria-label": "End date"});
  const dates = h("span", {class: "dates", hidden: state.days !== "custom"}, start, " – ", end,
    button("Apply", () => {
      // (refused here, the window left as it is: the API reads no dates as its default 30 days)
      const problem = !start.value && !end.value ? "pick a start date, an end date or both."
        : start.value && end.value && start.value > end.value ? "the start date is after the end date." : null;
      if (problem) {
        failed("window", `Dates not applied: ${problem} The figures below are still of `
          + `${range.textContent || "the window before"}.`);
        return;
      }
      answered("window");
      state.days = "custom";
      state.start = start.value;
      state.end = end.value;
      reload();
    }));
  function windowParams() {
    if (state.days === "custom") return {start_date: state.start, end_date: state.end};
    return {days: state.days};
  }

  // -- totals by group -----------------------------------------------------------------------
  const totals = h("div", {class: "cards", id: "usage-totals"});
  const tabs = h("div", {class: "segmented", role: "tablist", "aria-label": "Group by"},
    Object.entries(GROUPS).map(([name, g]) => h("button", {
      type: "button", class: "seg", role: "tab", "data-group": name, text: `By ${g.label.toLowerCase()}`,
      "aria-selected": String(name === state.group),
      onclick: () => {
        state.group = name;
        for (const t of tabs.children) t.setAttribute("aria-selected", String(t.dataset.group === name));
        loadGroups();
      },
    })));
  const csv = button("Download CSV", async () => {
    try {
      await download(`/admin/api/v1/${GROUPS[state.group].route}${query({...windowParams(), format: "csv"})}`,
        `usage-${state.group}.csv`);
      answered("csv");
    } catch (error) {
      failed("csv", error);
    }
  });
  csv.id = "usage-csv";
  // Every record of the window and filters, a page of 1,000 at a time.
  const logCsv = button("Log as CSV", async () => {
    try {
      await downloadPages(`/admin/api/v1/usage/log${query({...windowParams(), ...logParams(), limit: 1000,
        format: "csv"})}`, "usage-log.csv");
      answered("csv");
    } catch (error) {
      failed("csv", error);
    }
  });
  logCsv.id = "log-csv";
  const groupTable = h("div", {id: "usage-table"});
  const chartBox = h("div", {class: "chart-box chart-box-tall", id: "chart-usage"});

  // -- the request log -----------------------------------------------------------------------
  const f = state.filters;
  const status = h("input", {id: "log-status", type: "number", min: "100", max: "599", placeholder: "status",
    value: f.status, "aria-label": "Status"});
  const model = h("input", {id: "log-model", type: "text", placeholder: "model (as routed)", value: f.model,
    "aria-label": "Model", list: "usage-model-list"});
  const modelList = h("datalist", {id: "usage-model-list"});
  // "master": the master key's requests (recorded without a key id; the API's key=master)
  const anyKey = (chosen) => [h("option", {value: "", text: "any key"}),
    h("option", {value: "master", text: "master key", selected: chosen === "master"})];
  // (the keys read again as it is opened: a key made since the page opened is offered too)
  const key = h("select", {id: "log-key", "aria-label": "Key", onfocus: () => loadKeys()},
    anyKey(f.key));
  const search = h("input", {id: "log-search", type: "search", placeholder: "request id, model, provider",
    value: f.search, "aria-label": "Search: request id, model or provider"});
  const filters = h("form", {class: "filters", id: "log-filters", onsubmit: (event) => {
    event.preventDefault();
    Object.assign(f, {status: status.value.trim(), model: model.value.trim(), key: key.value,
      search: search.value.trim()});
    loadLog([null]);
  }}, status, model, modelList, key, search, h("button", {type: "submit", class: "btn btn-primary", text: "Filter"}),
  button("Clear", () => {
    status.value = model.value = search.value = key.value = "";
    filters.requestSubmit();
  }));
  const logTable = h("div", {id: "log-table"});
  const pager = h("div", {class: "pager"});
  let cursors = [null]; // the "after" of each page up to the one shown

  replace(el,
    h("div", {class: "page-head"}, h("h1", {text: "Usage"}), range, days, dates),
    messages, totals,
    h("section", {class: "panel"},
      h("div", {class: "panel-head"}, tabs, csv),
      h("div", {class: "split"}, groupTable, chartBox)),
    h("section", {class: "panel"},
      h("div", {class: "panel-head"}, h("h2", {text: "Request log"}), logCsv),
      filters, logTable, pager));
  const groupChart = chart(chartBox, {type: "bar", horizontal: true, series: [
    {label: "requests", color: COLORS.blue}, {label: "errors", color: COLORS.red}]});

  function keyName(id) {
    if (id === null || id === undefined) return "master key";
    return keyNames.get(id) || id;
  }

  // Read the keys: their names (the tables' and the log's) and the key filter's options, redrawn only if they
  // changed (an open filter is left as it is), its choice kept.
  let shownKeys = "";
  async function loadKeys() {
    const current = ask("keys");
    let answer;
    try {
      answer = await admin("auth-keys");
    } catch (error) {
      if (current()) failed("keys", error);
      return;
    }
    for (const k of answer.data) keyNames.set(k.id, k.name); // (names, whichever read is the newest)
    if (!current()) return;
    answered("keys");
    const options = answer.data.map((k) => [k.id, `${k.name} (${k.redacted_value})`]);
    if (JSON.stringify(options) === shownKeys) return;
    const chosen = shownKeys === "" ? f.key : key.value; // (the filter applied, until the options are drawn)
    shownKeys = JSON.stringify(options);
    replace(key, anyKey(chosen),
      options.map(([value, text]) => h("option", {value, text, selected: value === chosen})));
  }

  // The keys read again if `ids` (a table's or the log's auth_key_id) name one not read yet (made since); once for
  // each id (one the list lacks, deleted, is shown as its id).
  const looked = new Set();
  async function knowKeys(ids) {
    const unknown = ids.filter((id) => id !== null && id !== undefined && !keyNames.has(id) && !looked.has(id));
    if (!unknown.length) return;
    unknown.forEach((id) => looked.add(id));
    await loadKeys();
  }

  // Whether the totals were drawn (false: they failed, or a newer window was asked for meanwhile).
  async function loadTotals() {
    const current = ask("totals");
    let s;
    try {
      s = await admin(`usage/summary${query(windowParams())}`);
    } catch (error) {
      if (current() && error.code === "usage_disabled") ledgerOff();
      else if (current()) failed("totals", error);
      return false;
    }
    if (!current()) return false;
    answered("totals");
    replace(totals,
      card("Requests", int(s.requests)), card("Errors", int(s.errors), errorKinds(s).join(" · ")),
      card("Input tokens", int(s.input_tokens)), card("Output tokens", int(s.output_tokens)),
      card("Cached tokens", int(s.cached_tokens)), card("Cost", s.total_cost === null ? "no prices" : cost(s.total_cost)));
    const zone = zoneName();
    range.textContent = `${s.start} – ${s.end} (${zone === "UTC" ? "UTC days" : `days in ${zone}`})`;
    return true;
  }

  async function loadGroups() {
    const group = state.group;
    const current = ask("groups");
    try {
      const answer = await admin(`${GROUPS[group].route}${query(windowParams())}`);
      if (group === "key") await knowKeys(answer.data.map((r) => r.auth_key_id));
      if (!current()) return;
      answered("groups");
      let rows = answer.data;
      if (group === "model") replace(modelList, rows.map((r) => h("option", {value: r.model})));
      const name = {
        model: (r) => h("span", {}, h("code", {class: "wrap", text: r.model ?? "–"}), " ",
          h("span", {class: "muted", text: r.provider_name ?? ""})),
        provider: (r) => h("span", {}, h("strong", {text: r.provider_name ?? "–"}), " ",
          h("span", {class: "muted", text: r.provider ?? ""})),
        key: (r) => h("span", {class: "key-name", text: keyName(r.auth_key_id)}),
        path: (r) => h("code", {text: r.user_path ?? "(none)"}),
      }[group];
      const plain = {model: (r) => r.model ?? "–", provider: (r) => r.provider_name ?? "–",
        key: (r) => keyName(r.auth_key_id), path: (r) => r.user_path ?? "(none)"}[group];
      replace(groupTable, table([
        {title: GROUPS[group].label, cell: name},
        {title: "Requests", cell: (r) => int(r.requests), class: "num"},
        {title: "Errors", cell: (r) => int(r.errors), class: "num"},
        // (those of its errors the gateway's own limits, budgets and busy replicas refused with a 429)
        {title: "Refused", cell: (r) => int(r.refused), class: "num"},
        {title: "Input", cell: (r) => int(r.input_tokens), class: "num"},
        {title: "Output", cell: (r) => int(r.output_tokens), class: "num"},
        {title: "Cost", cell: (r) => cost(r.total_cost), class: "num"},
      ], rows, {empty: "No usage in this window."}));
      const top = [...rows].sort((a, b) => b.requests - a.requests).slice(0, 15);
      update(groupChart, top.map(plain), [top.map((r) => r.requests), top.map((r) => r.errors)]);
    } catch (error) {
      if (current()) failed("groups", error);
    }
  }

  function logParams() {
    return {status: f.status, model: f.model, key: f.key, search: f.search};
  }

  // Show the page whose cursors are `pages` (they are the page shown once it came: a click made again before it
  // came asks for the same page).
  async function loadLog(pages = cursors) {
    const current = ask("log");
    try {
      const after = pages[pages.length - 1];
      const page = await admin(`usage/log${query({...windowParams(), ...logParams(), limit: PAGE_SIZE, after})}`);
      await knowKeys(page.data.map((r) => r.auth_key_id));
      if (!current()) return;
      answered("log");
      cursors = pages;
      replace(logTable, table([
        {title: "Time", cell: (r) => h("span", {title: when(r.timestamp), text: localWhen(r.timestamp)})},
        {title: "Request id", cell: (r) => h("code", {class: "wrap request-id", text: r.request_id})},
        {title: "Model", cell: (r) => h("code", {class: "wrap", text: r.model ?? "–"})},
        {title: "Provider", cell: (r) => `${r.provider_name ?? "–"}${r.replica === null ? "" : ` #${r.replica}`}`},
        {title: "Endpoint", cell: (r) => r.endpoint ?? "–"},
        {title: "Status", cell: (r) => {
          const shown = badge(r.outcome === "stream_broken" || r.outcome === "refused"
            || (r.outcome === "error" && r.status_code < 400)
            ? `${r.status_code} ${r.outcome}` : String(r.status_code), r.outcome === "ok" ? "ok" : "failed");
          return r.client_gone ? h("span", {title: "the client left before its answer ended"}, shown) : shown;
        }},
        // (estimated: the stream ended before its usage came, or a raw one had none; see README's usage ledger)
        {title: "Tokens in / out", cell: (r) => r.estimated
          ? h("span", {title: "estimated: no usage came from the upstream",
            text: `≈ ${int(r.input_tokens)} / ${int(r.output_tokens)}`})
          : `${int(r.input_tokens)} / ${int(r.output_tokens)}`, class: "num"},
        {title: "Duration", cell: (r) => ms(r.duration_ms), class: "num"},
        {title: "TTFT", cell: (r) => ms(r.ttft_ms), class: "num"},
        {title: "Key", cell: (r) => h("span", {class: "key-name", text: keyName(r.auth_key_id)})},
        {title: "User path", cell: (r) => r.user_path ?? "–"},
      ], page.data, {empty: "No requests match: change the window or the filters."}));
      // (a keyboard's focus on the pager stays there: on the button pressed, or the first that can be pressed)
      const pressed = pager.contains(document.activeElement) ? document.activeElement.textContent : null;
      replace(pager,
        button("Newest", () => loadLog([null]), {disabled: cursors.length === 1}),
        button("← Newer", () => loadLog(cursors.slice(0, -1)), {disabled: cursors.length === 1}),
        h("span", {class: "muted", text: `page ${cursors.length}`}),
        button("Older →", () => loadLog([...cursors, page.next]), {disabled: !page.has_more}));
      if (pressed !== null) focusAgain(pager, pressed);
    } catch (error) {
      if (current()) failed("log", error);
    }
  }

  // The gateway's usage ledger is off (USAGE_ENABLED=false): nothing to show or ask for, and the page says why.
  function ledgerOff() {
    replace(el, h("div", {class: "page-head"}, h("h1", {text: "Usage"})),
      h("div", {class: "messages", id: "usage-messages"}, note("info", "The usage ledger is off (",
        h("code", {text: "USAGE_ENABLED=false"}), "): the gateway records no requests, so there are no totals, ",
        "tables or request log to show. Set ", h("code", {text: "USAGE_ENABLED=true"}),
        " in the gateway's environment (or YAML) and restart it to record them.")));
  }

  async function reload() {
    replace(messages);
    if (await loadTotals()) await Promise.all([loadGroups(), loadLog([null])]);
  }

  loadKeys().then(reload);
  return () => {
    stopped = true;
    groupChart.destroy();
  };
}

function card(titleText, value, detail) {
  return h("div", {class: "card"}, h("div", {class: "card-title", text: titleText}),
    h("div", {class: "card-value", text: value}), detail ? h("div", {class: "card-detail", text: detail}) : null);
}

