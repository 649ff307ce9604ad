// Keys: managed keys (create with the secret shown once, edit limits, models and budgets, reset what the budgets
// spent, rotate the secret, deactivate).

import {admin} from "../api.js";
import {badge, button, cost, errorNote, focusAgain, h, int, meter, note, replace, showError, table, when}
  from "../dom.js";

export const title = "Keys";
const PERIODS = ["hourly", "daily", "weekly", "monthly", "total"];

export function mount(el) {
  let stopped = false;
  const messages = h("div", {class: "messages", id: "keys-messages"});
  const secretBox = h("div", {id: "key-secret"});
  const formBox = h("div", {id: "key-form-box"});
  const list = h("div", {id: "keys-list"});
  const create = button("New key", () => showForm(null), {kind: "primary"});
  create.id = "new-key";
  replace(el, h("div", {class: "page-head"}, h("h1", {text: "Keys"}), create), messages, secretBox, formBox, list);

  // Read the list and draw it; `focus` ({id, text}: a key's button, after an action on it) is where a focus the
  // redraw took away goes back to. A read that failed says so until one answers.
  let loadError = null;
  async function load(focus) {
    try {
      const answer = await admin("auth-keys");
      if (stopped) return;
      if (loadError) loadError.remove();
      loadError = null;
      replace(list, answer.data.length ? keysTable(answer.data)
        : note("empty", "No managed keys yet. Create one for each team or app with New key: it gets its own ",
          "limits, budgets and models, and its secret is shown once."));
      if (focus) refocus(focus);
    } catch (error) {
      if (!stopped) replace(messages, loadError = errorNote(error));
    }
  }

  // A focus the redraw took away goes to the key's button named `text`, or to New key (`id` null).
  function refocus({id, text}) {
    focusAgain([...list.querySelectorAll("[data-key-id]")].find((e) => e.dataset.keyId === id), text, create);
  }

  function keysTable(keys) {
    return table([
      {title: "Name", cell: (k) => h("div", {},
        h("div", {class: "key-name", text: k.name}),
        k.description ? h("div", {class: "muted", text: k.description}) : null,
        k.metadata ? h("div", {class: "muted metadata", text: Object.entries(k.metadata)
          .map(([name, value]) => `${name}=${typeof value === "string" ? value : JSON.stringify(value)}`)
          .join(" · ")}) : null)},
      {title: "Key", cell: (k) => h("code", {text: k.redacted_value})},
      {title: "User path", cell: (k) => k.user_path ? h("code", {text: k.user_path}) : "–"},
      {title: "Models", cell: (k) => k.models && k.models.length  // (null or []: every model, as the API reads them)
        ? h("span", {class: "wrap", text: k.models.join(", ")}) : "all"},
      {title: "Limits", cell: (k) => limits(k)},
      {title: "Budgets", cell: (k) => budgets(k.budgets)},
      {title: "Status", cell: (k) => h("div", {},
        badge(k.active ? "active" : k.enabled ? "expired" : "deactivated"),
        k.expires_at ? h("div", {class: "muted key-expires",
          text: `${k.expired ? "expired" : "expires"} ${when(k.expires_at)}`}) : null)},
      {title: "Created", cell: (k) => when(k.created_at)},
      {title: "", cell: (k) => actions(k), class: "actions"},
    ], keys, {rowClass: (k) => `key-row key-${k.active ? "active" : "inactive"}`});
  }

  function actions(k) {
    const box = h("div", {class: "row-actions", "data-key-id": k.id});
    const shown = [button("Edit", () => showForm(k))];
    if (!k.enabled) return replace(box, shown);
    // An action that cannot be undone, asked twice: its button, then Confirm and Cancel in its place (the focus
    // on Confirm, and back on the button after Cancel: a keyboard's user stays where they were).
    const twice = (text, kind, confirmText, act) => {
      const first = button(text, () => {
        const confirm = button(confirmText, async () => {
          try {
            await act();
            load({id: k.id, text});
          } catch (error) {
            showError(messages, error);
          }
        }, {kind: "danger"});
        replace(box, confirm, button("Cancel", () => {
          replace(box, shown);
          first.focus();
        }));
        confirm.focus();
      }, {kind});
      return first;
    };
    if ((k.budgets || []).length) {
      shown.push(twice("Reset budgets", "ghost", "Confirm reset", async () => {
        await admin(`auth-keys/${encodeURIComponent(k.id)}/budgets/reset`, {method: "POST"});
        // (no spend read: the gateway's budgets are off, BUDGETS_ENABLED=false, and nothing is enforced)
        replace(messages, k.budgets.every((b) => b.spent_tokens === undefined)
          ? note("ok", "Budgets of ", h("strong", {text: k.name}), " reset. They are not enforced ",
            "(BUDGETS_ENABLED=false): once they are, what it spent in each budget's current period counts from ",
            "this reset.")
          : note("ok", "Budgets reset: what ", h("strong", {text: k.name}),
            " spent in each budget's period counts from now, on every process within about a second."));
      }));
    }
    // (a key deactivated meanwhile, elsewhere, is refused a new secret: 409 key_deactivated; the list is read again)
    shown.push(twice("Rotate secret", "ghost", "Confirm rotate", async () => {
      let rotated;
      try {
        rotated = await admin(`auth-keys/${encodeURIComponent(k.id)}/rotate`, {method: "POST"});
      } catch (error) {
        if (error.code !== "key_deactivated") throw error;
        showError(messages, `The key ${k.name} was deactivated meanwhile: a new secret would be refused too, `
          + "so none was made. Make a new key instead.");
        return;
      }
      showSecret(rotated, "given a new secret (the old one is refused on every process within about a second)"
        + (rotated.expired ? "; it has expired: the new one is refused too until its expiry is moved (Edit)" : ""));
    }));
    shown.push(twice("Deactivate", "danger-ghost", "Confirm deactivate", async () => {
      await admin(`auth-keys/${encodeURIComponent(k.id)}/deactivate`, {method: "POST"});
      replace(messages, note("ok", "Key deactivated: ", h("strong", {text: k.name}),
        " is refused (401) on every process within about a second."));
    }));
    return replace(box, shown);
  }

  function showForm(k) {
    const v = k || {};
    const field = (label, input, hint) => h("label", {class: "field"}, h("span", {text: label}), input,
      hint ? h("small", {class: "muted", text: hint}) : null);
    const name = h("input", {name: "name", required: true, maxlength: "200", value: v.name || ""});
    const description = h("input", {name: "description", value: v.description || ""});
    const userPath = h("input", {name: "user_path", placeholder: "/team/alpha", value: v.user_path || ""});
    const models = h("input", {name: "models", placeholder: "vllm/, embed/BAAI/bge-small-en-v1.5",
      value: (v.models || []).join(", ")});
    const number = (fieldName, value) => h("input", {name: fieldName, type: "number", min: "1", step: "1",
      value: value ?? ""});
    const rpm = number("rpm", v.rpm);
    const tpm = number("tpm", v.tpm);
    const concurrency = number("max_concurrency", v.max_concurrency);
    const priority = h("input", {name: "priority", type: "number", step: "1", value: v.priority ?? ""});
    const expires = h("input", {name: "expires_at", type: "date",
      value: v.expires_at ? v.expires_at.slice(0, 10) : ""});
    const metadata = h("textarea", {name: "metadata", rows: "2", placeholder: '{"owner": "alice"}',
      value: v.metadata ? JSON.stringify(v.metadata) : ""});
    const budgetRows = h("div", {class: "budget-rows"});
    const addBudget = (b = {}) => {
      const row = h("div", {class: "budget-row"},
        h("select", {name: "period", "aria-label": "Period"},
          PERIODS.map((p) => h("option", {value: p, text: p, selected: p === (b.period || "daily")}))),
        h("select", {name: "kind", "aria-label": "Kind"},
          h("option", {value: "max_tokens", text: "tokens", selected: b.max_cost === undefined}),
          h("option", {value: "max_cost", text: "cost", selected: b.max_cost !== undefined && b.max_cost !== null})),
        h("input", {name: "amount", type: "number", min: "0", step: "any", "aria-label": "Amount",
          value: b.max_tokens ?? b.max_cost ?? ""}),
        button("Remove", () => {
          row.remove();
          add.focus(); // (a keyboard's focus stays in the form)
        }, {kind: "ghost"}));
      budgetRows.append(row);
      return row;
    };
    (v.budgets || []).forEach((b) => addBudget(b));
    // (a keyboard's focus goes to the new row)
    const add = button("Add budget", () => addBudget().querySelector("select").focus(), {kind: "ghost"});
    const formMessages = h("div", {class: "messages"});
    const submit = h("button", {type: "submit", class: "btn btn-primary", id: "key-submit",
      text: k ? "Save" : "Create key"});
    const form = h("form", {class: "panel key-form", id: "key-form", onsubmit: async (event) => {
      event.preventDefault();
      if (submit.disabled) return; // sent already, its answer to come (a double click makes one key)
      let body;
      try {
        body = {
          name: name.value.trim(), description: description.value.trim() || null,
          user_path: userPath.value.trim() || null,
          models: models.value.trim() ? models.value.split(",").map((s) => s.trim()).filter(Boolean) : null,
          rpm: whole(rpm.value), tpm: whole(tpm.value), max_concurrency: whole(concurrency.value),
          priority: whole(priority.value),
          expires_at: expires.value ? `${expires.value}T00:00:00Z` : null,
          metadata: metadata.value.trim() ? JSON.parse(metadata.value) : null,
          budgets: [...budgetRows.children].map((row) => {
            const amount = Number(row.querySelector("[name=amount]").value);
            return {period: row.querySelector("[name=period]").value,
              [row.querySelector("[name=kind]").value]: amount};
          }),
        };
      } catch (error) {
        replace(formMessages, errorNote(`Metadata must be a JSON object: ${error.message}`));
        return;
      }
      if (k && k.expires_at && body.expires_at && body.expires_at.slice(0, 10) === k.expires_at.slice(0, 10)) {
        delete body.expires_at; // unchanged (the date input drops the time of day)
      }
      submit.disabled = true;
      try {
        if (k) {
          await admin(`auth-keys/${encodeURIComponent(k.id)}`, {method: "PATCH", body});
          replace(messages, note("ok", "Saved ", h("strong", {text: body.name}), "."));
        } else {
          const created = await admin("auth-keys", {method: "POST", body});
          showSecret(created);
          replace(messages);
        }
        replace(formBox);
        load(k ? {id: k.id, text: "Edit"} : null);
      } catch (error) {
        replace(formMessages, errorNote(error));
      } finally {
        submit.disabled = false;
      }
    }},
    h("h2", {text: k ? `Edit ${k.name}` : "New key"}),
    h("div", {class: "form-grid"},
      field("Name", name), field("Description", description),
      field("User path", userPath, "the team it belongs to; path limits and budgets apply"),
      field("Models", models, "comma-separated selectors; empty: every model"),
      field("Requests / minute", rpm), field("Tokens / minute", tpm), field("Max concurrency", concurrency),
      field("Priority", priority, "vLLM priority, lower is sooner (providers with priority scheduling); empty: 0, which its clients may lower but not raise"),
      field("Expires", expires, "UTC midnight; empty: never"), field("Metadata (JSON)", metadata)),
    h("fieldset", {class: "budgets"}, h("legend", {text: "Budgets"}), budgetRows,
      add),
    formMessages,
    h("div", {class: "form-actions"},
      submit,
      button("Cancel", () => {
        replace(formBox);
        refocus({id: k ? k.id : null, text: "Edit"});
      })));
    replace(formBox, form);
    name.focus();
  }

  // A new key's secret, on top of any not yet Done (each shown once: none is wiped by another form or key); the
  // newest is #key-secret-value.
  function showSecret(created, done = "created") {
    for (const older of secretBox.querySelectorAll("#key-secret-value")) older.removeAttribute("id");
    const value = h("code", {class: "secret", id: "key-secret-value", text: created.value});
    const status = h("span", {class: "muted", "aria-live": "polite"});
    const box = h("div", {class: "note note-ok secret-box"},
      h("p", {}, "Key ", h("strong", {text: created.name}), ` ${done}. Copy its secret now: it is shown once `,
        "and cannot be read again."),
      h("div", {class: "secret-row"}, value,
        button("Copy", async () => {
          status.textContent = await copy(created.value, value) ? "Copied."
            : "Selected: press Ctrl+C (the browser refused clipboard access).";
        }, {kind: "primary"}),
        button("Done", () => {
          box.remove();
          create.focus();
        }), status));
    secretBox.prepend(box);
    box.querySelector(".btn-primary").focus(); // (the form, and the focus in it, went away)
  }

  load();
  return () => {
    stopped = true;
  };
}

// Copy text to the clipboard: with the Clipboard API where the page may use it (https, localhost), else (a
// gateway reached over plain http) by selecting `node` and the copy command. False: only selected.
async function copy(text, node) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch (_) {
    const range = document.createRange();
    range.selectNodeContents(node);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    try {
      return document.execCommand("copy");
    } catch (__) {
      return false;
    }
  }
}

function whole(text) {
  return text.trim() === "" ? null : Math.trunc(Number(text));
}

function limits(k) {
  const parts = [];
  if (k.rpm) parts.push(`${int(k.rpm)} rpm`);
  if (k.tpm) parts.push(`${int(k.tpm)} tpm`);
  if (k.max_concurrency) parts.push(`${int(k.max_concurrency)} concurrent`);
  return parts.length ? parts.join(" · ") : "none";
}

// Each budget's spend this period as a bar; without one (the gateway's budgets are off, BUDGETS_ENABLED=false: the
// API reads no spend) the cap alone, said not to be enforced.
function budgets(items) {
  if (!items || !items.length) return "none";
  return h("div", {class: "budget-list"}, items.map((b) => {
    const tokens = b.max_tokens !== undefined && b.max_tokens !== null;
    const limit = tokens ? b.max_tokens : b.max_cost;
    const spent = tokens ? b.spent_tokens : b.spent_cost;
    if (spent === undefined) {
      return h("div", {class: "budget muted", "data-period": b.period,
        text: `${b.period}: ${tokens ? `${int(limit)} tokens` : cost(limit)} · not enforced (BUDGETS_ENABLED=false)`});
    }
    const label = `${b.period}: ${tokens ? `${int(spent)} / ${int(limit)} tokens` : `${cost(spent)} / ${cost(limit)}`}`;
    return h("div", {class: "budget", "data-period": b.period}, meter(spent || 0, limit, label));
  }));
}
