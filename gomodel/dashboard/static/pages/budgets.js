// Budgets: the budgets by user path (the configuration's, SET_BUDGET_* and YAML, and those set through the admin
// API), what each path spent this period, and a reset of what one spent (confirmed). A key's own budgets are on Keys.

import {admin} from "../api.js";
import {button, cost, errorNote, focusAgain, h, int, meter, note, replace, showError, table, when} from "../dom.js";

export const title = "Budgets";

export function mount(el) {
  let stopped = false;
  const messages = h("div", {class: "messages", id: "budgets-messages"});
  const list = h("div", {id: "budgets-list"});
  replace(el, h("div", {class: "page-head"}, h("h1", {text: "Budgets"})), messages, list);

  // Read the list and draw it; a focus the redraw took away goes back to the Reset of the budget `focus` names
  // (its data-budget), after its reset.
  async function load(focus) {
    try {
      const answer = await admin("budgets");
      if (stopped) return;
      replace(list, answer.data.length ? budgetTable(answer.data) : note("empty",
        "No budget by user path. Set one in the gateway's environment (",
        h("code", {text: "SET_BUDGET_TEAM=\"daily=10\""}), ") or YAML, or with ",
        h("code", {text: "PUT /admin/api/v1/budgets"}), "; a key's own budgets are on Keys."));
      if (focus) {
        focusAgain([...list.querySelectorAll("[data-budget]")].find((e) => e.dataset.budget === focus), "Reset");
      }
    } catch (error) {
      if (stopped) return;
      if (error.code === "budgets_disabled") {
        replace(messages, note("info", "Budgets are off (", h("code", {text: "BUDGETS_ENABLED=false"}),
          "): no budget, by user path or a key's own, is enforced. Set ", h("code", {text: "BUDGETS_ENABLED=true"}),
          " in the gateway's environment (or YAML) and restart it to enforce them."));
      } else {
        replace(messages, errorNote(error));
      }
    }
  }

  function budgetTable(rows) {
    return table([
      {title: "User path", cell: (b) => h("code", {class: "wrap budget-path", text: b.user_path})},
      {title: "Period", cell: (b) => b.period},
      {title: "Spent this period", cell: (b) => spent(b), class: "budget-spent"},
      {title: "Counts from", cell: (b) => Date.parse(b.period_start) === 0 ? "always" : when(b.period_start),
        class: "budget-start"},
      {title: "Ends", cell: (b) => b.period_end ? when(b.period_end) : "never"},
      {title: "Set by", cell: (b) => b.source === "config" ? "configuration" : "admin API"},
      {title: "", cell: (b) => actions(b), class: "actions"},
    ], rows, {rowClass: () => "budget-row"});
  }

  // Reset, asked twice (what the path spent is gone once reset), the focus kept as on the keys page.
  function actions(b) {
    const name = `${b.user_path} ${b.period}`;
    const box = h("div", {class: "row-actions", "data-budget": name});
    const reset = button("Reset", () => {
      const confirm = button("Confirm reset", async () => {
        try {
          await admin("budgets/reset-one", {method: "POST", body: {user_path: b.user_path, period: b.period}});
          replace(messages, note("ok", "Reset: what ", h("code", {text: b.user_path}),
            ` spent in its ${b.period} budget counts from now, on every process within about a second.`));
          load(name);
        } catch (error) {
          showError(messages, error);
        }
      }, {kind: "danger"});
      replace(box, confirm, button("Cancel", () => {
        replace(box, reset);
        reset.focus();
      }));
      confirm.focus();
    }, {kind: "ghost"});
    return replace(box, reset);
  }

  load();
  return () => {
    stopped = true;
  };
}

// A bar for each cap the budget has (tokens, cost): spent / cap.
function spent(b) {
  const bars = [];
  if (b.max_tokens !== null && b.max_tokens !== undefined) {
    bars.push(meter(b.spent_tokens || 0, b.max_tokens, `${int(b.spent_tokens)} / ${int(b.max_tokens)} tokens`));
  }
  if (b.max_cost !== null && b.max_cost !== undefined) {
    bars.push(meter(b.spent_cost || 0, b.max_cost, `${cost(b.spent_cost)} / ${cost(b.max_cost)}`));
  }
  return h("div", {class: "budget-list"}, bars.map((bar) => h("div", {class: "budget"}, bar)));
}
