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
        refresh();
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

  let busy = false;
  let again = false; // asked for while a refresh was on its way (another window, say)
  let stopped = false;
  let usageCards = []; // the cards last drawn from each answer, kept while its call fails
  let fleetCard = null;
  let usageOff = false; // the gateway said its usage ledger is off (USAGE_ENABLED=false): asked for no more
  // Usage and the replicas are asked for apart: without the database the replicas stay live. With the ledger off
  // (its 404 usage_disabled, once) only the replicas are asked for.
  // (timed: the timer's, every REFRESH_MS)
  async function refresh(timed = false) {
    if (stopped) return;
    if (busy) {
      again = true;
      if (!timed) return;
      // the last refresh has no answer yet, a refresh's time later (the gateway hung, say): what is shown is not now's
      status.textContent = WAITING;
      status.classList.add("stale");
      return;
    }
    busy = true;
    const shown = state.window;
    try {
      const [series, fleet] = await Promise.allSettled([
        usageOff ? null : admin(`usage/timeseries?window=${shown}`), admin("providers/status")]);
      if (stopped || shown !== state.window) return;
      if (series.status === "rejected" && series.reason.code === "usage_disabled") ledgerOff();
      const failed = [series, fleet].filter((r) => r.status === "rejected" && r.reason.code !== "usage_disabled")
        .map((r) => r.reason);
      draw(series.value, fleet.value, failed);
      status.textContent = failed.length ? "Not updated: see the message"
        : `Live · updated ${new Date().toLocaleTimeString("en-GB")}`;
      status.classList.toggle("stale", failed.length > 0);
    } catch (error) {
      if (stopped) return;
      replace(messages, errorNote(error));
      status.textContent = "Not updated: see the message";
      status.classList.add("stale");
    } finally {
      busy = false;
      if (again) {
        again = false;
        refresh();
      }
    }
  }

  // Draw what came (series or fleet undefined: its call failed, in failed, and its cards stay as they were).
  function draw(series, fleet, failed) {
    if (series) {
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
    if (fleet) {
      const replicas = fleet.providers.flatMap((p) => p.replicas);
      const ready = fleet.providers.reduce((n, p) => n + p.ready_replicas, 0);
      fleetCard = card("Replicas ready", `${ready} / ${replicas.length}`, "replicas",
        counted(fleet.providers.length, "provider"),
        replicas.length && ready < replicas.length ? "bad" : null);
    }
    replace(cards, usageCards, fleetCard);
    const notes = [...new Set(failed.map((error) => (error && error.message) || String(error)))].map(errorNote);
    if (fleet && !fleet.providers.length) notes.push(providerHint());
    if (usageOff) {
      notes.push(note("info", "The usage ledger is off (", h("code", {text: "USAGE_ENABLED=false"}),
        "): the gateway records no requests, so there is no traffic to chart. The replicas stay live."));
    }
    if (series && !series.summary.requests) {
      notes.push(note("empty", "No requests in this window yet. Point an OpenAI client at ",
        h("code", {text: `${location.origin}/v1`}), " with a gateway key, and the charts fill in within seconds ",
        "(the usage ledger is written every USAGE_FLUSH_INTERVAL)."));
    }
    replace(messages, notes);
  }

  // The ledger is off: its window, cards and charts go (only the replicas are asked for from now on).
  function ledgerOff() {
    usageOff = true;
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
