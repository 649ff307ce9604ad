// The dashboard's entry: sign-in, the navigation, and the page shown for the URL's #fragment (or path).

import {onSignOut, openGateway, signIn, signOut, signedIn, tryKey} from "./api.js";
import {errorNote, h, replace} from "./dom.js";
import * as overview from "./pages/overview.js";
import * as providers from "./pages/providers.js";
import * as usage from "./pages/usage.js";
import * as keys from "./pages/keys.js";
import * as budgets from "./pages/budgets.js";
import * as batches from "./pages/batches.js";

const PAGES = {overview, providers, usage, keys, budgets, batches};
const main = document.getElementById("main");
let current = null; // {name, stop}

// The page of the URL's #fragment, else of its path (GoModel's /admin/dashboard/usage), else the overview.
function route() {
  const name = (location.hash.match(/^#\/([a-z]+)/) || location.pathname.match(/^\/admin\/dashboard\/([a-z]+)$/)
    || [])[1];
  return PAGES[name] ? name : "overview";
}

function show() {
  if (!signedIn()) {
    showSignIn();
    return;
  }
  document.getElementById("signin").hidden = true;
  document.getElementById("app").hidden = false;
  document.getElementById("open-gateway").hidden = !openGateway();
  const name = route();
  if (current) current.stop();
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.page === name);
    if (link.dataset.page === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${PAGES[name].title} · gomodel`;
  const container = h("div", {class: "page", id: `page-${name}`});
  replace(main, container);
  let stop = () => {};
  try {
    stop = PAGES[name].mount(container) || stop;
  } catch (error) {
    replace(container, errorNote(error));
  }
  current = {name, stop};
}

function showSignIn(message) {
  if (current) {
    current.stop();
    current = null;
  }
  replace(main);
  document.getElementById("app").hidden = true;
  document.getElementById("signin").hidden = false;
  const box = document.getElementById("signin-message");
  replace(box, message ? errorNote(message) : []);
  document.getElementById("signin-key").focus();
}

document.getElementById("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("signin-key");
  const submit = document.getElementById("signin-submit");
  const box = document.getElementById("signin-message");
  const key = input.value.trim();
  submit.disabled = true;
  replace(box);
  try {
    await tryKey(key);
    input.value = "";
    signIn(key);
    show();
  } catch (error) {
    const reason = error.status === 401 ? `That is not the master key: ${error.message}`
      : error.status === 403 ? `A managed key cannot use the dashboard; use the master key. (${error.message})`
      : error.message;
    replace(box, errorNote(reason));
  } finally {
    submit.disabled = false;
  }
});

document.getElementById("signout").addEventListener("click", () => signOut(null));
onSignOut((reason) => showSignIn(reason));
window.addEventListener("hashchange", show);
show();
