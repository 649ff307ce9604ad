// Overview: traffic, tokens, errors and latency of the last hour / day / 30 days, refreshed live.

import {admin} from "../api.js";
import {COLORS, chart, update} from "../charts.js";
import {compact, counted, errorKinds, errorNote, h, int, msPair, note, replace, WAITING} from "../dom.js";
import {providerHint} from "./providers.js";

export const title = "Overview";
export const REFRESH_MS = 5000;
const WINDOWS = [["hour", "Last hour"], ["day", "Last 24 hours"], ["month", "Last 30 days"]];
const state = {window: "hour"};

export function mount(el) {
  const status = h("span", {class: "live", id: "overview-live", text: "Loading…"});
  const picker = h("div", {class: "segmented", role: "group", "aria-label": "Window"},
    WINDOWS.map(([value, label]) => h("button", {
      type: "button", class: "seg", "data-window": value, text: label,
      "aria-pressed": String(value === state.window),
      onclick: () => {
        state.window = value;
        for (const b of picker.children) b.setAttribute("aria-pressed", String(b.dataset.window === value));
        usageCall.read();
      },
    })));
  const messages = h("div", {class: "messages", id: "overview-messages"});
  const cards = h("div", {class: "cards", id: "overview-cards"});
  const boxes = {
    traffic: h("div", {class: "chart-box", id: "chart-traffic"}),
    tokens: h("div", {class: "chart-box", id: "chart-tokens"}),
    latency: h("div", {class: "chart-box", id: "chart-latency"}),
  };
  const chartPanels = h("div", {class: "charts"},
    panel("Requests and errors", boxes.traffic), panel("Tokens", boxes.tokens),
    panel("Latency and time to first token", boxes.latency));
  replace(el, h("div", {class: "page-head"}, h("h1", {text: "Overview"}), picker, status), messages, cards,
    chartPanels);

  const charts = {
    traffic: chart(boxes.traffic, {type: "bar", yTitle: "requests", series: [
      {label: "requests", color: COLORS.blue}, {label: "errors", color: COLORS.red}]}),
    tokens: chart(boxes.tokens, {type: "line", yTitle: "tokens", series: [
      {label: "input tokens", color: COLORS.purple, fill: true}, {label: "output tokens", color: COLORS.teal,
        fill: true}]}),
    latency: chart(boxes.latency, {type: "line", yTitle: "ms", series: [
      {label: "latency p50", color: COLORS.blue}, {label: "latency p95", color: COLORS.orange},
      {label: "TTFT p50", color: COLORS.green}, {label: "TTFT p95", color: COLORS.red}]}),
  };

  let stopped = false;
  let series = null; // the answers last drawn
  let fleet = null;
  let usageCards = []; // the cards last drawn from each answer, kept while its call fails
  let fleetCard = null;
  // Usage and the replicas are asked for apart, each drawn as it answers: without the database (the usage call
  // failing at the store's pool timeout) the replicas stay live. With the ledger off (its 404 usage_disabled, once:
  // the usage call is then off) only the replicas are asked for.
  const usageCall = reader(() => {
    const shown = state.window;
    const answer = admin(`usage/timeseries?window=${shown}`).catch((error) => {
      if (error.code === "usage_disabled") return null;
      throw error;
    });
    return {answer, wanted: () => shown === state.window};
  }, drawUsage);
  const fleetCall = reader(() => ({answer: admin("providers/status")}), drawFleet);

  // (timed: the timer's, every REFRESH_MS)
  function refresh(timed = false) {
    usageCall.read(timed);
    fleetCall.read(timed);
  }

  // One of the page's calls: `ask()` sends it ({answer: its promise, wanted: whether that answer is still the one
  // wanted once it came}) and `draw` draws its answer. One on its way at a time: asked for meanwhile (another
  // window, a refresh's time) it is asked again once that one answers, and still unanswered a refresh's time later
  // (the gateway hung, say) it is late: what the page shows is not now's. A call that failed is shown as its error;
  // one that is off is asked for no more.
  function reader(ask, draw) {
    const call = {answered: false, failed: null, late: false, off: false};
    let busy = false;
    let again = false;
    call.read = async (timed = false) => {
      if (stopped || call.off) return;
      if (busy) {
        again = true;
        if (timed) {
          call.late = true;
          showStatus();
        }
        return;
      }
      busy = true;
      try {
        await settle(ask());
      } finally {
        busy = false;
      }
      if (again) {
        again = false;
        call.read();
      }
    };

    // Its answer drawn (or its error kept), if the page is still shown and that answer still wanted.
    async function settle({answer, wanted = () => true}) {
      try {
        const got = await answer;
        if (stopped || !wanted()) return;
        draw(got);
        call.failed = null;
      } catch (error) {
        if (stopped || !wanted()) return;
        call.failed = error;
      }
      call.answered = true;
      call.late = false;
      show();
      showStatus();
    }
    return call;
  }

  // "Live" once each call answered, while none failed or is late.
  function showStatus() {
    const calls = [usageCall, fleetCall];
    const late = calls.some((call) => call.late);
    const failed = calls.some((call) => call.failed);
    if (!late && !failed && !calls.every((call) => call.answered)) return; // (still loading)
    status.textContent = late ? WAITING : failed ? "Not updated: see the message"
      : `Live · updated ${new Date().toLocaleTimeString("en-GB")}`;
    status.classList.toggle("stale", late || failed);
  }

  // The usage series (null: the ledger is off): its cards (shown by show()) and charts.
  function drawUsage(answer) {
    if (answer === null) {
      ledgerOff();
      return;
    }
    series = answer;
    const s = series.summary;
    usageCards = [
      card("Requests", int(s.requests), "requests"),
      card("Errors", int(s.errors), "errors", s.requests
        ? [`${((100 * s.errors) / s.requests).toFixed(1)}% of requests`, ...errorKinds(s)].join(" · ") : null,
        s.errors ? "bad" : null),
      card("Input tokens", compact(s.input_tokens), "input-tokens"),
      card("Output tokens", compact(s.output_tokens), "output-tokens"),
      card("Latency p50 / p95", msPair(s.duration_ms_p50, s.duration_ms_p95), "latency", "whole request"),
      card("TTFT p50 / p95", msPair(s.ttft_ms_p50, s.ttft_ms_p95), "ttft", "time to first byte")];
    const labels = series.data.map((b) => label(b.period, series.window));
    const pick = (name) => series.data.map((b) => b[name]);
    update(charts.traffic, labels, [pick("requests"), pick("errors")]);
    update(charts.tokens, labels, [pick("input_tokens"), pick("output_tokens")]);
    update(charts.latency, labels, [pick("duration_ms_p50"), pick("duration_ms_p95"), pick("ttft_ms_p50"),
      pick("ttft_ms_p95")]);
  }

  // The fleet: its replicas card (shown by show()).
  function drawFleet(answer) {
    fleet = answer;
    const replicas = fleet.providers.flatMap((p) => p.replicas);
    const ready = fleet.providers.reduce((n, p) => n + p.ready_replicas, 0);
    fleetCard = card("Replicas ready", `${ready} / ${replicas.length}`, "replicas",
      counted(fleet.providers.length, "provider"),
      replicas.length && ready < replicas.length ? "bad" : null);
  }

  // The cards last drawn, and the messages: each failed call's error (once: with the gateway away both fail
  // alike), then what the answers say (those of a call that failed are left out until it answers).
  function show() {
    replace(cards, usageCards, fleetCard);
    const failed = [usageCall.failed, fleetCall.failed].filter(Boolean);
    const notes = [...new Set(failed.map((error) => error.message || String(error)))].map(errorNote);
    if (fleet && !fleetCall.failed && !fleet.providers.length) notes.push(providerHint());
    if (usageCall.off) {
      notes.push(note("info", "The usage ledger is off (", h("code", {text: "USAGE_ENABLED=false"}),
        "): the gateway records no requests, so there is no traffic to chart. The replicas stay live."));
    }
    if (series && !usageCall.failed && !series.summary.requests) {
      notes.push(note("empty", "No requests in this window yet. Point an OpenAI client at ",
        h("code", {text: `${location.origin}/v1`}), " with a gateway key, and the charts fill in within seconds ",
        "(the usage ledger is written every USAGE_FLUSH_INTERVAL)."));
    }
    replace(messages, notes);
  }

  // The ledger is off: its window, cards and charts go (only the replicas are asked for from now on).
  function ledgerOff() {
    usageCall.off = true;
    series = null;
    usageCards = [];
    picker.hidden = true;
    chartPanels.hidden = true;
  }

  refresh();
  const timer = setInterval(() => refresh(true), REFRESH_MS);
  return () => {
    stopped = true;
    clearInterval(timer);
    Object.values(charts).forEach((c) => c.destroy());
  };
}

function panel(titleText, box) {
  return h("section", {class: "panel"}, h("h2", {text: titleText}), box);
}

function card(titleText, value, id, detail, kind) {
  return h("div", {class: `card${kind ? ` card-${kind}` : ""}`, id: `card-${id}`},
    h("div", {class: "card-title", text: titleText}),
    h("div", {class: "card-value", text: value}),
    detail ? h("div", {class: "card-detail", text: detail}) : null);
}

// A bucket's label: its date (the month window's days) or its time, as the gateway wrote it: in the zone the
// admin API was told (the browser's, api.js), whose days and hours the buckets are.
function label(period, window) {
  return window === "month" ? period.slice(5, 10) : period.slice(11, 16);
}
