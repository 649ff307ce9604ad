// Providers: every provider and replica, its state and load, its models; refresh the models now.

import {admin} from "../api.js";
import {badge, button, counted, errorNote, h, int, meter, note, percent, replace, table, WAITING, when}
  from "../dom.js";

export const title = "Providers";
export const REFRESH_MS = 3000;

export function providerHint() {
  return note("empty", "No provider is configured. Set ", h("code", {text: "VLLM_BASE_URL"}),
    " (e.g. ", h("code", {text: "VLLM_BASE_URL=http://vllm-host:8000/v1"}),
    "; several URLs separated by commas are replicas), or another provider's variable (",
    h("code", {text: "OPENAI_API_KEY"}), ", ", h("code", {text: "OLLAMA_BASE_URL"}),
    ", …), in the gateway's environment, then restart it.");
}

export function mount(el) {
  const messages = h("div", {class: "messages", id: "providers-messages"});
  const list = h("div", {id: "providers-list"});
  const refreshButton = button("Refresh models", async () => {
    refreshButton.disabled = true;
    try {
      await admin("runtime/refresh", {method: "POST"});
      replace(messages, note("ok", "Re-reading every replica's models from this gateway (other gateways re-read theirs every MODELS_REFRESH_INTERVAL); the list updates in a moment."));
      setTimeout(load, 1000);
    } catch (error) {
      replace(messages, errorNote(error));
    } finally {
      refreshButton.disabled = false;
    }
  }, {kind: "primary", title: "POST /admin/api/v1/runtime/refresh"});
  refreshButton.id = "refresh-models";
  const virtualBox = h("div", {id: "virtual-models"});
  replace(el, h("div", {class: "page-head"}, h("h1", {text: "Providers"}), refreshButton), messages, list,
    virtualBox);

  // The virtual models (VIRTUAL_MODELS, YAML virtual_models): each name and its weighted targets (the configuration's:
  // read once).
  async function loadVirtual() {
    try {
      const answer = await admin("models");
      if (stopped) return;
      const virtual = answer.data.filter((m) => m.provider === "virtual");
      replace(virtualBox, virtual.length ? h("section", {class: "panel"}, h("h2", {text: "Virtual models"}), table([
        {title: "Name", cell: (m) => h("code", {class: "wrap virtual-name", text: m.id})},
        {title: "Targets", cell: (m) => h("ul", {class: "targets"}, m.targets.map((t) => h("li", {},
          h("code", {class: "wrap", text: t.model}), ` · weight ${t.weight}`)))},
      ], virtual, {rowClass: () => "virtual-model"})) : []);
    } catch (error) {
      if (!stopped) replace(messages, errorNote(error));
    }
  }

  let stopped = false;
  let shownSignature = null;
  let loadFailed = null; // the note of the list's last read, if it failed (an action's stays)
  const modelsOpen = new Map(); // each provider's models list as the operator left it (open or not), kept over redraws
  let reading = false; // a read on its way: the next waits for it (one at a time, however long the gateway takes)
  // (timed: the timer's, every REFRESH_MS)
  async function load(timed = false) {
    if (stopped) return;
    if (reading) { // (timed: unanswered a refresh's time later, the gateway hung, say: the replicas shown are old)
      if (timed && !loadFailed) {
        replace(messages, loadFailed = note("error", `${WAITING}.`));
      }
      return;
    }
    reading = true;
    try {
      const answer = await admin("providers/status");
      if (stopped) return;
      if (loadFailed) loadFailed.remove(); // (its own error, not an action's: that one stays until the next action)
      loadFailed = null;
      // Re-drawn only when something changed (the age of a load report always does).
      const signature = JSON.stringify(answer, (name, value) => (name === "load_age_s" ? undefined : value));
      if (signature === shownSignature) return;
      shownSignature = signature;
      replace(list, answer.providers.length ? answer.providers.map((p) => provider(p, modelsOpen))
        : providerHint());
    } catch (error) {
      if (!stopped) replace(messages, loadFailed = errorNote(error));
    } finally {
      reading = false;
    }
  }
  load();
  loadVirtual();
  const timer = setInterval(() => load(true), REFRESH_MS);
  return () => {
    stopped = true;
    clearInterval(timer);
  };
}

// A load figure, and when its report came where the router no longer uses it (load_stale: the replica down, or its
// /metrics not answering): not the replica's load now.
function old(r, shown) {
  if (!r.load_stale) return shown;
  const at = when(Date.now() / 1000 - r.load_age_s).slice(11);
  return h("span", {class: "muted load-stale"}, shown, ` · last report ${at}`);
}

// A provider's panel; its models list open as `modelsOpen` says the operator left it, else while it has 8 or fewer.
function provider(p, modelsOpen) {
  const total = p.replicas.length;
  return h("section", {class: "panel provider", "data-provider": p.name},
    h("div", {class: "panel-head"},
      h("h2", {}, h("span", {class: "provider-name", text: p.name}), " ", badge(p.type, "type")),
      h("span", {class: `ready ${p.ready_replicas < total ? "ready-bad" : "ready-ok"}`,
        text: `${p.ready_replicas} / ${total} replicas ready`})),
    table([
      {title: "#", cell: (r) => String(r.index)},
      {title: "Replica", cell: (r) => h("code", {class: "wrap", text: r.base_url})},
      {title: "State", cell: (r) => r.trial ? h("span", {}, badge(r.state), " on trial")
        : r.held_until ? h("span", {}, badge(r.state), " held out until ", when(r.held_until))
        : r.check_failed ? h("span", {}, badge(r.state), " passed over: a check failed")
        : r.unanswered ? h("span", {}, badge(r.state), " passed over: its requests wait unanswered") : badge(r.state),
        class: "replica-state"},
      {title: "In flight", cell: (r) => r.max_concurrency ? `${int(r.in_flight)} / ${int(r.max_concurrency)}`
        : int(r.in_flight)},
      {title: "Queue (vLLM)", cell: (r) => r.waiting === null ? "–"
        : old(r, `${int(r.waiting)} waiting · ${int(r.running)} running`)},
      {title: "KV cache", cell: (r) => r.kv_cache_usage === null ? "–"
        : old(r, meter(r.kv_cache_usage, 1, percent(r.kv_cache_usage)))},
      {title: "Served", cell: (r) => int(r.served)},
      {title: "Models", cell: (r) => r.models === null ? "–" : String(r.models.length)},
      {title: "Last error", cell: (r) => r.last_error ? h("span", {class: "error-text",
        text: `${r.last_error} (${counted(r.consecutive_failures, "failure")})`}) : "–"},
      {title: "Since", cell: (r) => r.last_state_change ? when(r.last_state_change) : "–"},
    ], p.replicas, {rowClass: (r) => `replica replica-${r.state}`}),
    h("details", {class: "models", open: modelsOpen.get(p.name) ?? p.models.length <= 8,
      ontoggle: (event) => modelsOpen.set(p.name, event.target.open)},
      h("summary", {text: counted(p.models.length, "model")}),
      p.models.length ? h("ul", {class: "model-list"}, p.models.map((m) => h("li", {}, h("code", {text: m}))))
        : h("p", {class: "muted", text: "No models discovered yet: is the server up? Refresh models to re-read them."})));
}
