"""The admin dashboard in a real browser: headless Chromium (Debian's package) driven by Selenium.

One gateway, started as a user would (C{twistd -n --pidfile= gomodel --listen ...}), in front of a
fleet of two fake vLLM replicas, and one browser session for the whole module. The tests run in
file order and build on each other (sign in, then traffic, keys, batches, usage). Each browser
step runs in a thread (L{in_thread}) so that the reactor keeps serving the fakes meanwhile.

Screenshots of every page are taken on every run (a page that cannot render fails); they replace
docs/screenshots/ (shown in the README) when GOMODEL_UPDATE_SCREENSHOTS=1, else they go to a
temporary folder, so that a test run leaves the checkout as it was.
"""

import atexit
import csv
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from tests.fakes.fleet import FakeFleet
from tests.fakes.vllm import CHAT_MODEL
from tests.integration.support import LISTENING
from tests.support import in_thread, within_one_day

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("GOMODEL_UPDATE_SCREENSHOTS") == "1":
    SCREENSHOTS = os.path.join(ROOT, "docs", "screenshots")
else:
    SCREENSHOTS = tempfile.mkdtemp(prefix="gomodel-screenshots-")
    atexit.register(shutil.rmtree, SCREENSHOTS, True)
MODEL = f"vllm/{CHAT_MODEL}"
XSS = "<img src=x onerror=alert(1)>"
# A second model the replicas serve: a long id with no place to break a line at, and HTML in it.
LONG_MODEL = "org-" + "x" * 120 + "/" + XSS
VIRTUAL = "dash-" + XSS  # a virtual model of both
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,800", "--lang=en-US")
WAIT = 20.0
# What a refreshed page says while its last read is unanswered at the next one's time (dom.js WAITING).
WAITING = "Not updated: waiting for the gateway's answer"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason=f"the dashboard's browser test needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
           "apt-get install -y chromium chromium-driver")

# Collects what the browser logs; entries the tests expect (a wrong key's 401) are taken out by them.
_CSP_PROBE = ("window.__csp = []; document.addEventListener('securitypolicyviolation', "
              "(e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")


# Every fetch the page makes from now on held unanswered (a hung gateway) in window.__pending, and then let through.
_HOLD_FETCHES = ("window.__fetch = window.fetch; window.__pending = [];"
                 "window.fetch = (url, options) => new Promise((resolve) => window.__pending.push("
                 "() => resolve(window.__fetch(url, options))))")
_ANSWER_FETCHES = "window.fetch = window.__fetch; window.__pending.forEach((answer) => answer())"


class Browser:
    """The Selenium driver and what the tests ask of it (blocking: call it from a thread)."""

    def __init__(self, root, master, downloads, flags=()):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS + tuple(flags):
            options.add_argument(flag)
        self.profile = tempfile.mkdtemp(prefix="gomodel-chromium-")
        options.add_argument(f"--user-data-dir={self.profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        options.add_experimental_option("prefs", {"download.default_directory": downloads,
                                                  "download.prompt_for_download": False})
        self.driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _CSP_PROBE})
        self.driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": downloads})
        self.root = root
        self.master = master
        self.downloads = downloads
        self.console = []

    def close(self):
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    # -- finding and waiting ---------------------------------------------------------------

    def wait(self, condition, what, timeout=WAIT):
        """Until C{condition(driver)} is truthy; its value."""
        from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1,
                                 ignored_exceptions=(StaleElementReferenceException,)).until(condition)
        except TimeoutException:
            entries, _ = self.logs()  # (what the page said meanwhile: a failed call, a script error)
            raise AssertionError(f"waited {timeout}s for {what}; the page ({self.driver.current_url}) shows: "
                                 f"{(self.text_of('body') or '')[:2000]!r}; its console: {entries}") from None

    def one(self, css):
        return self.driver.find_element("css selector", css)

    def all(self, css):
        return self.driver.find_elements("css selector", css)

    def text_of(self, css):
        """The rendered text of the first match, or None (read in one step: pages re-render as they refresh)."""
        return self.js("const e = document.querySelector(arguments[0]); return e ? e.innerText : null", css)

    def texts(self, css):
        return self.js("return [...document.querySelectorAll(arguments[0])].map((e) => e.innerText)", css)

    def wait_text(self, css, predicate, what):
        return self.wait(lambda d: (lambda t: t if t is not None and predicate(t) else None)(self.text_of(css)), what)

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def go(self, page):
        self.driver.get(f"{self.root}/admin/dashboard#/{page}")
        self.wait(lambda d: self.all(f"#page-{page}"), f"the {page} page")

    def reload_holding(self, key):
        """The page loaded again, C{key} kept as the one signed in with from before its own scripts run (kept in the
        page shown, a request that page sends on its own with C{key} could be refused first and sign out)."""
        script = f"sessionStorage.setItem('gomodel.dashboard.key', {json.dumps(key)});"
        added = self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": script})
        try:
            self.driver.refresh()
        finally:
            self.driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", added)

    def click(self, css):
        """Click the first match; again if the page re-rendered it in between."""
        from selenium.common.exceptions import StaleElementReferenceException

        for _ in range(20):
            try:
                element = self.one(css)
                self.js("arguments[0].scrollIntoView({block: 'center'})", element)  # not under the sticky bar
                element.click()
                return
            except StaleElementReferenceException:
                time.sleep(0.05)
        raise AssertionError(f"{css} kept being re-rendered")

    def fill(self, css, text):
        element = self.one(css)
        element.clear()
        element.send_keys(text)

    def shot(self, name):
        os.makedirs(SCREENSHOTS, exist_ok=True)
        self.driver.save_screenshot(os.path.join(SCREENSHOTS, name))

    def downloaded(self, name):
        path = os.path.join(self.downloads, name)
        self.wait(lambda d: os.path.exists(path) and not os.path.exists(path + ".crdownload"), f"download {name}")
        with open(path, encoding="utf-8") as f:
            return f.read()

    def no_alert(self):
        from selenium.common.exceptions import NoAlertPresentException

        try:
            alert = self.driver.switch_to.alert
        except NoAlertPresentException:
            return
        text = alert.text
        alert.dismiss()
        raise AssertionError(f"an alert opened: {text!r}")

    # -- what the browser said -------------------------------------------------------------

    def logs(self):
        """Console entries since the last call (warnings and errors), and CSP violations on this page."""
        entries = [e for e in self.driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        self.console.extend(entries)
        return entries, self.js("return window.__csp || []")

    def assert_clean(self):
        entries, violations = self.logs()
        assert not entries, f"the browser logged: {entries}"
        assert not violations, f"Content-Security-Policy violations: {violations}"

    def sign_in(self):
        from selenium.common.exceptions import WebDriverException

        try:
            if self.js("return sessionStorage.getItem('gomodel.dashboard.key')") == self.master:
                return
        except WebDriverException:  # not on the dashboard yet (no storage on the first blank page)
            pass
        self.driver.get(f"{self.root}/admin/dashboard")
        self.wait(lambda d: self.one("#signin-key").is_displayed(), "the sign-in form")
        self.fill("#signin-key", self.master)
        self.click("#signin-submit")
        self.wait(lambda d: self.all("#page-overview"), "the overview after signing in")


def _sdk(env, key=None):
    import openai

    return openai.OpenAI(base_url=env.root + "/v1", api_key=key or env.master, max_retries=0, timeout=20)


async def _made_key(env, **fields):
    """A key made through the admin API with C{fields}: what the API answered (its C{id}, its C{value}, ...)."""
    answer = await treq.post(env.root + "/admin/api/v1/auth-keys", headers={"authorization": f"Bearer {env.master}"},
                             json=fields)
    key = await answer.json()
    assert answer.code == 201, key
    return key


def _key_row(b, key):
    """The keys page read again (a key made through the API since it was drawn): the selector of C{key}'s row."""
    b.go("keys")
    b.driver.refresh()
    return f"tr.key-row:has([data-key-id='{key['id']}'])"


async def _until(reactor, check, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"waited {timeout}s for {what}"
        await deferLater(reactor, 0.1, lambda: None)


@pytest_twisted.async_yield_fixture(scope="module")
async def env(reactor, tmp_path_factory):
    """The fleet, the gateway (a twistd process) and the browser, for every test here."""
    work = tmp_path_factory.mktemp("dashboard")
    fleet = await FakeFleet(reactor, 2, models=(CHAT_MODEL, LONG_MODEL)).start()
    master = "gm-dash-" + secrets.token_urlsafe(16)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "GOMODEL_", "OPENAI_"))}
    environ.update({
        "PYTHONPATH": ROOT + os.pathsep + environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1",
        "VLLM_BASE_URL": fleet.env_value, "GOMODEL_MASTER_KEY": master, "GOMODEL_DATA_DIR": str(work / "data"),
        "USAGE_FLUSH_INTERVAL": "200ms", "REPLICA_HEALTH_INTERVAL": "300ms", "REPLICA_METRICS_INTERVAL": "300ms",
        "REPLICA_FAILURE_THRESHOLD": "1", "BATCH_CONCURRENCY_PER_PROVIDER": "1",
        "VIRTUAL_MODELS": json.dumps([{"source": VIRTUAL, "targets": [
            {"model": MODEL, "weight": 3}, {"model": f"vllm/{LONG_MODEL}", "weight": 1}]}]),
    })
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    log = open(work / "gateway.log", "wb")
    proc = subprocess.Popen([twistd, "-n", "--pidfile=", "gomodel", "--listen", "tcp:0:interface=127.0.0.1"],
                            cwd=str(work), env=environ, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    downloads = str(work / "downloads")
    os.makedirs(downloads)
    browser = None
    try:
        async def listening():  # (the port it chose and logs: one chosen here could be taken before it bound it)
            assert proc.poll() is None, (work / "gateway.log").read_text()
            return LISTENING.search((work / "gateway.log").read_text())

        await _until(reactor, listening, "the gateway to listen", 60)
        root = f"http://127.0.0.1:{LISTENING.search((work / 'gateway.log').read_text()).group(1)}"

        async def ready():
            assert proc.poll() is None, (work / "gateway.log").read_text()
            try:
                response = await treq.get(root + "/health/ready")
                await treq.content(response)
                return response.code == 200
            except Exception:
                return False

        await _until(reactor, ready, "the gateway to be ready", 60)
        browser = await in_thread(Browser, root, master, downloads)
        yield types.SimpleNamespace(root=root, master=master, fleet=fleet, browser=browser, proc=proc,
                                    log=work / "gateway.log")
    finally:
        if browser is not None:
            await in_thread(browser.close)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            await _until(reactor, lambda: _done(proc), "the gateway to stop", 30)
        log.close()
        await fleet.stop()


async def _done(proc):
    return proc.poll() is not None


# -- the tests, in order -----------------------------------------------------------------------

# (a script run before the page's own: how many of its fetches are waiting for their answer, in window.__fetching)
FETCHES_IN_FLIGHT = """window.__fetching = 0;
const fetchOfThePage = window.fetch;
window.fetch = function (...args) {
  window.__fetching += 1;
  return fetchOfThePage.apply(this, args).finally(() => { window.__fetching -= 1; });
};"""



@pytest_twisted.ensureDeferred
async def test_sign_in_keeps_the_key_in_session_storage_and_a_401_signs_out(env):
    b = env.browser

    def wrong_key_then_the_right_one():
        b.driver.get(f"{env.root}/admin/dashboard")
        b.wait(lambda d: b.one("#signin-key").is_displayed(), "the sign-in form")
        b.fill("#signin-key", "not-the-key")
        b.click("#signin-submit")
        b.wait_text("#signin-message", lambda t: "That is not the master key" in t, "the wrong key's message")
        entries, violations = b.logs()  # the refused check is the one expected error
        assert violations == [] and entries and all("401" in e["message"] for e in entries), entries
        assert b.js("return sessionStorage.length") == 0
        b.fill("#signin-key", env.master)
        b.click("#signin-submit")
        b.wait(lambda d: b.all("#page-overview"), "the overview")
        assert b.js("return sessionStorage.getItem('gomodel.dashboard.key')") == env.master
        assert b.js("return localStorage.length") == 0
        assert env.master not in b.driver.current_url
        assert b.js("return document.querySelector('#open-gateway').offsetParent") is None  # (a master key is set)
        b.wait_text("#overview-messages", lambda t: "No requests in this window yet" in t, "the empty state")
        b.assert_clean()

        # A key the gateway refuses later (changed, say) signs out with a message. The page's requests with it are
        # refused one by one: the first signs out, and the others' 401s may be logged after that (counted here,
        # and awaited, so that none is logged after the browser's log is read).
        counting = b.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": FETCHES_IN_FLIGHT})
        try:
            b.reload_holding("stale")
            b.wait_text("#signin-message", lambda t: "Signed out" in t and "Invalid API key" in t, "the sign-out")
            b.wait(lambda d: b.js("return window.__fetching") == 0, "the stale key's requests all answered")
        finally:
            b.driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", counting)
        assert b.js("return sessionStorage.getItem('gomodel.dashboard.key')") is None
        entries, violations = b.logs()
        assert violations == [] and all("401" in e["message"] for e in entries), entries
        b.sign_in()
        b.assert_clean()

    await in_thread(wrong_key_then_the_right_one)
    with open(env.log, encoding="utf-8", errors="replace") as f:
        assert env.master not in f.read()  # the key is never logged


# (a script run before the page's own: how many of its fetches went without a key, in window.__keyless)
KEYLESS_FETCHES = """window.__keyless = 0;
const fetchOfThePage = window.fetch;
window.fetch = function (url, options) {
  if (!options || !options.headers || !options.headers.Authorization) window.__keyless += 1;
  return fetchOfThePage.call(this, url, options);
};"""


@pytest_twisted.ensureDeferred
async def test_a_page_signed_out_by_a_401_asks_nothing_more_and_keeps_the_401s_reason(env):
    """The usage page, whose key the gateway refuses, signs out with the gateway's reason ("Invalid API key"), and
    its reads that were to follow are not sent (before, they went without a key once signed out, and their 401
    replaced the reason with "Missing API key")."""
    b = env.browser

    def refused():
        b.sign_in()
        b.go("usage")
        counting = b.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": KEYLESS_FETCHES})
        try:
            b.reload_holding("stale")
            b.wait_text("#signin-message", lambda t: "Signed out" in t, "the sign-out")
            assert b.js("return window.__keyless") == 0
            assert "Invalid API key" in b.text_of("#signin-message")
        finally:
            b.driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", counting)
        entries, violations = b.logs()
        assert violations == [] and len(entries) == 1 and "401" in entries[0]["message"], entries
        b.sign_in()
        b.assert_clean()

    await in_thread(refused)


# (a script run before the page's own: the answers of its fetches sent with the key "stale" held in window.__held,
# each given to the page when the test calls it; window.__read counts those whose body the page has read)
HOLD_STALE_ANSWERS = """window.__held = [];
window.__read = 0;
const fetchOfThePage = window.fetch;
window.fetch = function (url, options) {
  const answer = fetchOfThePage.call(this, url, options);
  if (!options || !options.headers || options.headers.Authorization !== 'Bearer stale') return answer;
  return new Promise((resolve, reject) => window.__held.push(() => answer.then((response) => {
    const read = response.json.bind(response);
    response.json = () => read().finally(() => { window.__read += 1; });
    resolve(response);
  }, reject)));
};"""


@pytest_twisted.ensureDeferred
async def test_a_late_401_for_a_key_signed_out_of_does_not_sign_out_the_key_signed_in_since(env):
    """The overview's requests sent with a stale key are answered 401 one at a time: the first signs out, the
    operator signs in with the right key, and the later 401s (for the stale key) leave that sign-in alone; their
    requests are asked again with the right key (before, any 401 signed out, the new key too)."""
    b = env.browser

    def race():
        b.sign_in()
        holding = b.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": HOLD_STALE_ANSWERS})
        try:
            b.reload_holding("stale")
            b.wait(lambda d: b.js("return window.__held.length") >= 2, "the overview's two stale requests")
            b.js("window.__held.shift()()")  # the first 401: signed out
            b.wait_text("#signin-message", lambda t: "Signed out" in t, "the sign-out")
            b.fill("#signin-key", env.master)
            b.click("#signin-submit")
            b.wait(lambda d: b.all("#page-overview"), "the overview, signed in again")
            later = b.js("const later = window.__held.splice(0); later.forEach((answer) => answer());"
                         "return later.length")  # the later 401s, for the stale key
            b.wait(lambda d: b.js("return window.__read") == 1 + later, "the later 401s read by the page")
            b.wait_text("#card-replicas .card-value", lambda t: t == "2 / 2", "the overview read with the key")
            assert b.js("return sessionStorage.getItem('gomodel.dashboard.key')") == env.master
            assert b.one("#app").is_displayed() and not b.one("#signin").is_displayed()
        finally:
            b.driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", holding)
        entries, violations = b.logs()
        assert violations == [] and all("401" in e["message"] for e in entries), entries

    await in_thread(race)


@pytest_twisted.ensureDeferred
async def test_gomodels_page_paths_open_that_page(env):
    """A bookmark of GoModel's C{/admin/dashboard/usage} opens the usage page (before, a 404), signed in or after
    signing in; the navigation goes on from there, and an unknown page's path is the gateway's 404."""
    b = env.browser

    def bookmarks():
        b.sign_in()
        for page in ("usage", "keys", "providers"):
            b.driver.get(f"{env.root}/admin/dashboard/{page}")
            b.wait(lambda d: b.all(f"#page-{page}"), f"the {page} page at its path")
            assert b.one(f"#nav a[data-page='{page}']").get_attribute("aria-current") == "page"
        b.click("#nav a[data-page='budgets']")
        b.wait(lambda d: b.all("#page-budgets"), "the budgets page from the navigation")
        b.js("sessionStorage.clear()")
        b.driver.get(f"{env.root}/admin/dashboard/batches")
        b.wait(lambda d: b.one("#signin-key").is_displayed(), "the sign-in form")
        b.fill("#signin-key", env.master)
        b.click("#signin-submit")
        b.wait(lambda d: b.all("#page-batches"), "the batches page after signing in")
        b.assert_clean()

    await in_thread(bookmarks)
    answer = await treq.get(env.root + "/admin/dashboard/nope", headers={"authorization": f"Bearer {env.master}"})
    assert answer.code == 404 and (await answer.json())["error"]["code"] == "not_found"


@pytest_twisted.ensureDeferred
async def test_overview_charts_real_traffic_live(env):
    b = env.browser
    await in_thread(b.sign_in)
    await in_thread(b.go, "overview")
    await in_thread(b.js, "window.__notReloaded = true")
    client = _sdk(env)

    def traffic():
        for i in range(6):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}],
                                           max_tokens=8, extra_headers={"X-Request-Id": f"dash-find-me-{i}"})
        for _ in range(3):
            for _ in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "s"}],
                                                    stream=True, stream_options={"include_usage": True}):
                pass

    try:
        await in_thread(traffic)
    finally:
        client.close()

    def charts():
        # the cards count the requests, refreshed in place (no reload)
        b.wait_text("#card-requests .card-value", lambda t: t == "9", "9 requests on the overview")
        assert b.js("return window.__notReloaded") is True
        for box in ("#chart-traffic", "#chart-tokens", "#chart-latency"):
            assert b.one(f"{box} canvas").size["height"] > 100
        drawn = b.js("const c = Chart.getChart(document.querySelector('#chart-traffic canvas'));"
                     "return c.data.datasets[0].data.reduce((a, v) => a + v, 0)")
        assert drawn == 9
        tokens = b.js("return Chart.getChart(document.querySelector('#chart-tokens canvas'))"
                      ".data.datasets[1].data.reduce((a, v) => a + v, 0)")
        assert tokens > 0
        assert "–" not in b.text_of("#card-latency .card-value")
        assert b.text_of("#card-replicas .card-value") == "2 / 2"
        labels = "return Chart.getChart(document.querySelector('#chart-traffic canvas')).data.labels.length"
        assert b.js(labels) == 60  # a minute each
        b.click("button[data-window='day']")
        b.wait(lambda d: b.js(labels) == 24, "the day window, an hour each")
        assert b.text_of("#card-requests .card-value") == "9"
        b.click("button[data-window='month']")
        b.click("button[data-window='hour']")  # at once: the last one asked for wins
        b.wait(lambda d: b.js(labels) == 60, "the hour window again")
        assert b.text_of("#card-requests .card-value") == "9"
        b.shot("overview.png")
        b.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                 {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
        try:
            # Chart.js resizes each chart from its own ResizeObserver, one after another: until the
            # last one has, the page may still be wider than the phone
            fits = ("return [...document.querySelectorAll('.chart-box canvas')].every(c => c.clientWidth < 390)"
                    " && document.documentElement.scrollWidth <= 390")
            b.wait(lambda d: b.js(fits), "the charts and the page to fit a phone")
            b.shot("overview-phone.png")
        finally:
            b.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        b.assert_clean()

    await in_thread(charts)


@pytest_twisted.ensureDeferred
async def test_the_overview_says_it_is_not_updated_while_the_gateway_does_not_answer(env):
    """A refresh that gets no answer (the gateway hung, or a network between) by the next one's time turns the
    overview's "Live" into "Not updated" (before, it kept saying "Live · updated" with the last answer's time, as long
    as the TCP connection took to give up: minutes); the next answer makes it live again."""
    b = env.browser

    def hung():
        b.go("overview")
        b.wait(lambda d: (b.text_of("#overview-live") or "").startswith("Live"), "the overview live")
        b.js(_HOLD_FETCHES)
        b.wait(lambda d: b.js("return document.querySelector('#overview-live').classList.contains('stale')"),
               "the overview said to be not updated")
        assert b.text_of("#overview-live").startswith("Not updated")
        b.js(_ANSWER_FETCHES)
        b.wait(lambda d: (b.text_of("#overview-live") or "").startswith("Live"), "the overview live again")
        b.assert_clean()

    await in_thread(hung)


@pytest_twisted.ensureDeferred
async def test_overview_month_labels_are_the_browsers_days_west_of_utc(env):
    """The dashboard tells the admin API the browser's time zone (GoModel's X-GoModel-Timezone): the 30-day
    window's buckets are New York's days, each bar labelled with its date there (before, the buckets were UTC
    days, labelled with their UTC dates: 19:00 to 19:00 in New York)."""
    b = env.browser
    answer = await treq.get(env.root + "/admin/api/v1/usage/timeseries?window=month",
                            headers={"authorization": f"Bearer {env.master}", "x-gomodel-timezone": "America/New_York"})
    periods = [item["period"] for item in (await answer.json())["data"]]
    assert all(p.endswith(("T00:00:00.000-05:00", "T00:00:00.000-04:00")) for p in periods), periods

    def labels():
        b.sign_in()  # (as every test here may be run alone)
        b.driver.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": "America/New_York"})
        try:
            b.go("overview")
            b.driver.refresh()
            b.wait(lambda d: b.all("#page-overview #chart-traffic canvas"), "the overview in New York")
            assert b.js("return new Date(0).getTimezoneOffset()") == 300
            b.click("button[data-window='month']")
            shown = "return Chart.getChart(document.querySelector('#chart-traffic canvas')).data.labels"
            b.wait(lambda d: len(b.js(shown)) == 30, "the month window, a day each")
            assert b.js(shown) == [p[5:10] for p in periods]
            b.click("button[data-window='hour']")
            b.wait(lambda d: len(b.js(shown)) == 60, "the hour window again")
            b.assert_clean()
        finally:
            b.driver.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": ""})

    await in_thread(labels)


@pytest_twisted.ensureDeferred
async def test_providers_page_shows_a_replica_going_down(env):
    b = env.browser

    def states():
        return b.texts("tr.replica .replica-state")

    await in_thread(b.go, "providers")
    await in_thread(b.wait, lambda d: states() == ["ready", "ready"], "two ready replicas")
    assert env.fleet.replicas[0].base_url in await in_thread(b.text_of, "[data-provider='vllm']")
    # the models, as text, each within its column (before, a long id ran over the next column's)
    models = "[data-provider='vllm'] .model-list li"
    assert sorted(await in_thread(b.texts, models)) == sorted([CHAT_MODEL, LONG_MODEL])
    assert await in_thread(b.js, "return document.querySelectorAll('img[src=\"x\"]').length") == 0
    overflowing = ("return [...document.querySelectorAll(arguments[0])].filter((li) => li.scrollWidth > li.clientWidth)"
                   ".length")
    assert await in_thread(b.js, overflowing, models) == 0
    # the virtual model and its weighted targets (before, shown nowhere)
    await in_thread(b.wait, lambda d: b.texts("tr.virtual-model .virtual-name") == [VIRTUAL], "the virtual model")
    assert await in_thread(b.texts, "tr.virtual-model .targets li") == [
        f"{MODEL} · weight 3", f"vllm/{LONG_MODEL} · weight 1"]
    # a replica's load, then the same numbers once it is down, said to be its last report's (before, shown as now's)
    queues = "tr.replica td[data-label='Queue (vLLM)']"
    env.fleet[1].metrics = {"waiting": 7, "running": 5}
    await in_thread(b.wait, lambda d: b.texts(queues)[1:] == ["7 waiting · 5 running"], "replica 1's queue")
    await env.fleet[1].refuse()
    try:
        await in_thread(b.wait, lambda d: states() == ["ready", "down"], "replica 1 down")
        assert "1 / 2 replicas ready" in await in_thread(b.text_of, "[data-provider='vllm'] .ready")
        queue = await in_thread(b.wait, lambda d: b.texts(queues)[1].startswith("7 waiting · 5 running · last report ")
                                and b.texts(queues)[1], "replica 1's queue, said to be old")
        assert queue.endswith(" UTC") and "last report" not in (await in_thread(b.texts, queues))[0]
        # its error with its failures in a row, "1 failure" but "2 failures" (before, "1 failures")
        errors = "tr.replica td[data-label='Last error']"
        said = await in_thread(b.wait, lambda d: b.texts(errors)[1] != "–" and b.texts(errors)[1], "replica 1's error")
        count, word = re.search(r"\((\d+) (failures?)\)$", said).groups()
        assert word == ("failure" if count == "1" else "failures"), said
        await in_thread(b.shot, "providers.png")
    finally:
        env.fleet[1].metrics = {}
        await env.fleet[1].accept()
    await in_thread(b.click, "#refresh-models")
    await in_thread(b.wait_text, "#providers-messages", lambda t: "Re-reading" in t, "the refresh")
    await in_thread(b.wait, lambda d: states() == ["ready", "ready"], "replica 1 back")
    await in_thread(b.assert_clean)


@pytest_twisted.ensureDeferred
async def test_a_providers_model_list_stays_as_the_operator_left_it_while_traffic_redraws_the_page(env):
    """The models list the operator closed (or opened) stays so when the page is drawn again for new figures (before,
    each redraw, every 3 s under traffic, opened it again: one of more than 8 models could not be kept open)."""
    b = env.browser
    served = "[data-provider='vllm'] td[data-label='Served']"
    details = "[data-provider='vllm'] details.models"

    def closed():
        b.go("providers")
        b.wait(lambda d: b.js("const e = document.querySelector(arguments[0]); return e && e.open", details),
               "the open models list")
        b.click(f"{details} summary")
        assert b.js("return document.querySelector(arguments[0]).open", details) is False
        return b.texts(served)

    before = await in_thread(closed)
    client = _sdk(env)
    try:
        await in_thread(client.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "p"}],
                        max_tokens=2)
    finally:
        client.close()
    await in_thread(b.wait, lambda d: b.texts(served) != before, "the page drawn again with the new request")
    assert await in_thread(b.js, "return document.querySelector(arguments[0]).open", details) is False
    await in_thread(b.click, f"{details} summary")  # opened again, it stays open
    await in_thread(b.go, "overview")
    await in_thread(b.assert_clean)


@pytest_twisted.ensureDeferred
async def test_the_providers_page_says_it_is_not_updated_while_the_gateway_does_not_answer(env):
    """A read of the replicas still unanswered at the next one's time says that the page is not updated (before, the
    replicas' states stayed as last read, with nothing saying so, and a read more went out every 3 s); it goes with
    the next answer."""
    b = env.browser

    def hung():
        b.go("providers")
        b.wait(lambda d: b.all("tr.replica"), "the replicas")
        b.js(_HOLD_FETCHES)
        b.wait_text("#providers-messages", lambda t: "Not updated" in t, "the page said to be not updated")
        assert b.js("return window.__pending.length") == 1  # (one read at a time)
        b.js(_ANSWER_FETCHES)
        b.wait(lambda d: "Not updated" not in b.text_of("#providers-messages"), "the note gone")
        b.assert_clean()

    await in_thread(hung)


@pytest_twisted.ensureDeferred
async def test_keys_create_show_once_use_and_deactivate(env):
    import openai

    b = env.browser

    def create():
        b.go("keys")
        b.click("#new-key")
        b.fill("#key-form [name=name]", XSS)
        b.fill("#key-form [name=user_path]", "/team/alpha")
        b.fill("#key-form [name=rpm]", "600")
        b.fill("#key-form [name=metadata]", json.dumps({"owner": "<b>bob</b>"}))
        b.click("#key-form .budgets button")
        b.fill("#key-form .budget-row [name=amount]", "100000")
        b.click("#key-submit")
        secret = b.wait_text("#key-secret-value", lambda t: t.startswith("sk_gom_"), "the new secret")
        b.click("#key-secret .btn-primary")  # copy
        b.wait_text("#key-secret .secret-row", lambda t: "Copied" in t or "Selected" in t, "the copy")
        b.no_alert()
        # the name and metadata are text, never HTML
        assert b.js("return document.querySelectorAll('img[src=\"x\"], b').length") == 0
        names = b.texts("#keys-list .key-name")
        assert XSS in names, names
        assert "owner=<b>bob</b>" in b.texts("#keys-list .metadata")
        return secret

    secret = await in_thread(create)
    client = _sdk(env, secret)
    try:
        answer = await in_thread(client.chat.completions.create, model=MODEL,
                                 messages=[{"role": "user", "content": "from a managed key"}], max_tokens=8)
        used = answer.usage.total_tokens

        def spent_then_deactivate():
            b.one("#key-secret").find_element("xpath", ".//button[text()='Done']").click()  # the secret leaves
            b.wait(lambda d: not b.all("#key-secret-value"), "the secret to go")
            assert secret not in b.driver.page_source
            b.go("overview")
            b.go("keys")  # read again: the budget shows what it spent
            label = b.wait_text("#keys-list .budget .meter-label", lambda t: "/ 100,000 tokens" in t, "the budget")
            assert label == f"daily: {used} / 100,000 tokens", label
            b.no_alert()
            # its budgets reset, once confirmed (before, one click reset them): what they spent counts from now
            row = [r for r in b.all("#keys-list tr.key-row") if XSS in r.text][0]
            row.find_element("xpath", ".//button[text()='Reset budgets']").click()
            row.find_element("xpath", ".//button[text()='Cancel']").click()
            row.find_element("xpath", ".//button[text()='Reset budgets']").click()
            assert b.text_of("#keys-list .budget .meter-label") == label and b.text_of("#keys-messages") == ""
            row.find_element("xpath", ".//button[text()='Confirm reset']").click()
            b.wait_text("#keys-messages", lambda t: "Budgets reset" in t, "the reset")
            b.wait_text("#keys-list .budget .meter-label", lambda t: t == "daily: 0 / 100,000 tokens",
                        "the reset budget")
            # edit: a bad user path is the API's 400, shown; a good edit is saved
            row = [r for r in b.all("#keys-list tr.key-row") if XSS in r.text][0]
            row.find_element("xpath", ".//button[text()='Edit']").click()
            b.fill("#key-form [name=user_path]", "/bad/../path")
            b.click("#key-submit")
            b.wait_text("#key-form .messages", lambda t: "'user_path' must be" in t, "the API's message")
            entries, violations = b.logs()
            assert not violations and [("400" in e["message"]) for e in entries] == [True], entries
            b.console.remove(entries[0])  # expected
            b.fill("#key-form [name=user_path]", "/team/alpha")
            b.fill("#key-form [name=rpm]", "1200")
            b.click("#key-submit")
            b.wait_text("#keys-messages", lambda t: "Saved" in t, "the edit")
            b.wait(lambda d: any("1,200 rpm" in t for t in b.texts("#keys-list tr.key-row")), "the new limit")
            b.shot("keys.png")
            row = [r for r in b.all("#keys-list tr.key-row") if XSS in r.text][0]
            row.find_element("xpath", ".//button[text()='Deactivate']").click()
            row.find_element("xpath", ".//button[text()='Cancel']").click()  # (the row's buttons back, all three)
            assert [e.text for e in row.find_elements("css selector", ".row-actions button")] == [
                "Edit", "Reset budgets", "Rotate secret", "Deactivate"]
            row.find_element("xpath", ".//button[text()='Deactivate']").click()
            row.find_element("xpath", ".//button[text()='Confirm deactivate']").click()
            b.wait_text("#keys-messages", lambda t: "Key deactivated" in t, "the deactivation")
            b.wait(lambda d: "deactivated" in b.texts("#keys-list .badge"), "the deactivated badge")
            b.assert_clean()

        await in_thread(spent_then_deactivate)
        with pytest.raises(openai.AuthenticationError):
            await in_thread(client.chat.completions.create, model=MODEL,
                            messages=[{"role": "user", "content": "again"}], max_tokens=8)
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_keys_expiry_is_shown_in_the_list(env):
    """A key that expires says when in its row (before, only its edit form did)."""
    b = env.browser
    key = await _made_key(env, name="expiring", expires_at="2099-01-31T12:30:00Z")

    def expiry():
        row = _key_row(b, key)
        b.wait_text(f"{row} .key-expires", lambda t: t == "expires 2099-01-31 12:30:00 UTC", "the key's expiry")
        b.assert_clean()

    await in_thread(expiry)


@pytest_twisted.ensureDeferred
async def test_a_deactivated_key_past_its_expiry_says_it_expired(env, reactor):
    """A key deactivated and then past its expiry reads "expired <when>" under its badge, as an active one past it
    does (before, "expires <a time gone>"); the API says so too (C{expired})."""
    b = env.browser
    headers = {"authorization": f"Bearer {env.master}"}
    expiry = int(time.time()) + 2
    key = await _made_key(env, name="deactivated, then expired", expires_at=expiry)
    if time.time() < expiry:  # (made before its expiry; on a loaded host the making may have taken longer)
        assert key["expired"] is False, key
    assert (await treq.post(env.root + f"/admin/api/v1/auth-keys/{key['id']}/deactivate", headers=headers)).code == 200

    async def gone():
        return time.time() > expiry + 0.5

    await _until(reactor, gone, "the key's expiry to pass")
    answer = await treq.get(env.root + f"/admin/api/v1/auth-keys/{key['id']}", headers=headers)
    view = await answer.json()
    assert (view["active"], view["enabled"], view["expired"]) == (False, False, True), view

    def shown():
        row = _key_row(b, key)
        b.wait_text(f"{row} .key-expires", lambda t: t.startswith("expired "), "the key said to have expired")
        assert b.text_of(f"{row} .badge") == "deactivated"
        b.assert_clean()

    await in_thread(shown)


@pytest_twisted.ensureDeferred
async def test_a_key_of_every_model_says_all_with_an_empty_list_too(env):
    """A key made through the API with C{models: []} (every model, as null) reads "all" in its row (before, an empty
    cell, as if it could use none)."""
    b = env.browser
    key = await _made_key(env, name="every-model", models=[])
    assert key["models"] == [], key

    def shown():
        row = _key_row(b, key)
        b.wait_text(f"{row} td[data-label='Models']", lambda t: t == "all", "the key's models")
        b.assert_clean()

    await in_thread(shown)


@pytest_twisted.ensureDeferred
async def test_keys_are_made_and_reset_from_the_keyboard(env):
    """Enter on a row's Reset budgets puts the focus on its Confirm (before, the button pressed went away and the focus
    with it, to the top of the page); Cancel gives it back; a new key's secret has its Copy button focused."""
    from selenium.webdriver.common.keys import Keys

    b = env.browser
    key = await _made_key(env, name="keyboard", budgets=[{"period": "daily", "max_tokens": 1000}])

    def focused():
        return b.js("return document.activeElement.textContent")

    def press(key_name):
        b.driver.switch_to.active_element.send_keys(key_name)

    def keyboard():
        b.go("keys")
        b.driver.refresh()
        buttons = f".row-actions[data-key-id='{key['id']}'] button"
        b.wait(lambda d: b.all(buttons), "the key's buttons")
        b.js("[...document.querySelectorAll(arguments[0])].find((e) => e.textContent === 'Reset budgets').focus()",
             buttons)
        press(Keys.ENTER)
        assert focused() == "Confirm reset"
        press(Keys.TAB)
        assert focused() == "Cancel"
        press(Keys.ENTER)
        assert focused() == "Reset budgets"
        press(Keys.ENTER)
        press(Keys.ENTER)
        b.wait_text("#keys-messages", lambda t: "Budgets reset" in t, "the reset")

        b.js("document.querySelector('#new-key').focus()")
        press(Keys.ENTER)
        assert b.js("return document.activeElement.name") == "name"
        press("typed")
        press(Keys.ENTER)
        b.wait_text("#key-secret-value", lambda t: t.startswith("sk_gom_"), "the new secret")
        assert focused() == "Copy"
        b.assert_clean()

    await in_thread(keyboard)


@pytest_twisted.ensureDeferred
async def test_the_keyboards_focus_stays_on_the_keys_row_after_its_action_or_form(env):
    """After a confirmed reset or deactivation, and after an edit form's Save or Cancel, the focus is on the key's row
    again (its button), as after Cancel; a secret's Done gives it to New key (before, the list or form was drawn again
    and the focus fell to the page's top: a keyboard's user started over from the bar)."""
    from selenium.webdriver.common.keys import Keys

    b = env.browser
    key = await _made_key(env, name="focus kept", budgets=[{"period": "daily", "max_tokens": 1000}])
    box = f".row-actions[data-key-id='{key['id']}']"

    def focused():
        return b.js("const e = document.activeElement;"
                    "return [e.closest('[data-key-id]') && e.closest('[data-key-id]').dataset.keyId, e.textContent]")

    def press(*keys):
        for key_name in keys:
            b.driver.switch_to.active_element.send_keys(key_name)

    def on(button):
        b.js("[...document.querySelectorAll(arguments[0])].find((e) => e.textContent === arguments[1]).focus()",
             f"{box} button", button)

    def keyboard():
        b.go("keys")
        b.driver.refresh()
        b.wait(lambda d: b.all(f"{box} button"), "the key's buttons")
        on("Reset budgets")
        press(Keys.ENTER, Keys.ENTER)  # Reset budgets, Confirm reset
        b.wait_text("#keys-messages", lambda t: "Budgets reset" in t, "the reset")
        b.wait(lambda d: focused() == [key["id"], "Reset budgets"], "the focus back on Reset budgets")
        on("Edit")
        press(Keys.ENTER)
        assert b.js("return document.activeElement.name") == "name"
        b.fill("#key-form [name=rpm]", "321")
        press(Keys.ENTER)  # Save
        b.wait_text("#keys-messages", lambda t: "Saved" in t, "the edit")
        b.wait(lambda d: focused() == [key["id"], "Edit"], "the focus back on Edit after Save")
        press(Keys.ENTER)
        b.js("[...document.querySelectorAll('#key-form button')].find((e) => e.textContent === 'Cancel').focus()")
        press(Keys.ENTER)
        b.wait(lambda d: focused() == [key["id"], "Edit"], "the focus back on Edit after Cancel")
        on("Deactivate")
        press(Keys.ENTER, Keys.ENTER)  # Deactivate, Confirm deactivate
        b.wait_text("#keys-messages", lambda t: "Key deactivated" in t, "the deactivation")
        b.wait(lambda d: focused() == [key["id"], "Edit"], "the focus on the deactivated key's Edit")
        b.js("document.querySelector('#new-key').focus()")
        press(Keys.ENTER, "focus secret", Keys.ENTER)
        b.wait_text("#key-secret-value", lambda t: t.startswith("sk_gom_"), "the new secret")
        b.js("[...document.querySelectorAll('#key-secret button')].find((e) => e.textContent === 'Done').focus()")
        press(Keys.ENTER)
        b.wait(lambda d: b.js("return document.activeElement.id") == "new-key", "the focus on New key after Done")
        b.assert_clean()

    await in_thread(keyboard)


@pytest_twisted.ensureDeferred
async def test_a_keys_budget_rows_are_added_and_removed_from_the_keyboard(env):
    """Enter on Add budget puts the focus on the new row's period; Enter on a row's Remove gives it to Add budget
    (before, Add budget left it behind the row, and Remove dropped it to the page's top)."""
    from selenium.webdriver.common.keys import Keys

    b = env.browser

    def press(key_name):
        b.driver.switch_to.active_element.send_keys(key_name)

    def budgets():
        b.go("keys")
        b.click("#new-key")
        b.js("[...document.querySelectorAll('#key-form button')].find((e) => e.textContent === 'Add budget').focus()")
        press(Keys.ENTER)
        assert b.js("return document.activeElement.name") == "period"
        b.js("document.querySelector('#key-form .budget-row button').focus()")  # Remove
        press(Keys.ENTER)
        assert not b.all("#key-form .budget-row")
        assert b.js("return document.activeElement.textContent") == "Add budget"
        b.js("[...document.querySelectorAll('#key-form button')].find((e) => e.textContent === 'Cancel').click()")
        b.assert_clean()

    await in_thread(budgets)


@pytest_twisted.ensureDeferred
async def test_a_double_click_on_create_key_makes_one_key(env):
    """The key form sends once per submission in flight (before, a double click on Create key made two keys: the
    secret of the first was replaced by the second's before anyone saw it, and the first stayed active)."""
    b = env.browser

    def twice():
        b.go("keys")
        b.click("#new-key")
        b.fill("#key-form [name=name]", "double-clicked")
        shown = b.text_of("#key-secret-value")  # (another test's, not Done)
        b.js("const submit = document.querySelector('#key-submit'); submit.click(); submit.click();")
        return b.wait_text("#key-secret-value", lambda t: t.startswith("sk_gom_") and t != shown, "the new secret")

    secret = await in_thread(twice)
    answer = await treq.get(env.root + "/admin/api/v1/auth-keys", headers={"authorization": f"Bearer {env.master}"})
    made = [k for k in (await answer.json())["data"] if k["name"] == "double-clicked"]
    assert [k["redacted_value"][-4:] for k in made] == [secret[-4:]]
    await in_thread(b.assert_clean)


@pytest_twisted.ensureDeferred
async def test_a_keys_secret_is_rotated_once_confirmed_and_shown_once(env):
    """Rotate secret (asked twice) gives the key a new secret, shown once as a new key's is; the old one is
    refused, the new one works, the key stays the one it was."""
    import openai

    b = env.browser
    key = await _made_key(env, name="to rotate")

    def rotate():
        b.go("keys")
        b.driver.refresh()
        row = f".row-actions[data-key-id='{key['id']}']"
        b.wait(lambda d: b.all(f"{row} button"), "the key's buttons")
        b.one(row).find_element("xpath", ".//button[text()='Rotate secret']").click()
        b.one(row).find_element("xpath", ".//button[text()='Confirm rotate']").click()
        secret = b.wait_text("#key-secret-value", lambda t: t.startswith("sk_gom_") and t != key["value"],
                             "the new secret")
        assert "to rotate given a new secret" in b.text_of("#key-secret .secret-box p")
        b.assert_clean()
        return secret

    secret = await in_thread(rotate)
    for value, works in ((key["value"], False), (secret, True)):
        client = _sdk(env, value)
        try:
            if works:
                await in_thread(client.models.list)
            else:
                with pytest.raises(openai.AuthenticationError):
                    await in_thread(client.models.list)
        finally:
            client.close()


@pytest_twisted.ensureDeferred
async def test_a_key_deactivated_elsewhere_while_the_page_is_open_is_not_given_a_secret_shown_as_usable(env):
    """Rotate secret on a key deactivated meanwhile (another tab, the API) says that it was deactivated and shows no
    new secret (before, "given a new secret" with a secret the gateway refuses), and the list shows it deactivated."""
    b = env.browser
    key = await _made_key(env, name="deactivated elsewhere")

    def opened():
        row = f".row-actions[data-key-id='{key['id']}']"
        b.sign_in()
        b.go("keys")
        b.driver.refresh()
        b.wait(lambda d: b.all(f"{row} button"), "the key's buttons")
        b.one(row).find_element("xpath", ".//button[text()='Rotate secret']").click()
        return row

    row = await in_thread(opened)
    answer = await treq.post(f"{env.root}/admin/api/v1/auth-keys/{key['id']}/deactivate",
                             headers={"authorization": f"Bearer {env.master}"})
    assert answer.code == 200, await answer.text()

    def rotated():
        b.one(row).find_element("xpath", ".//button[text()='Confirm rotate']").click()
        b.wait_text("#keys-messages", lambda t: "deactivated meanwhile" in t, "the key said deactivated")
        assert not b.all("#key-secret-value")
        b.wait(lambda d: b.texts(f"tr.key-row:has({row}) .badge") == ["deactivated"], "the key shown deactivated")
        entries, violations = b.logs()  # (the API's 409 key_deactivated: no secret made)
        assert not violations and [("409" in e["message"]) for e in entries] == [True], entries
        b.console.remove(entries[0])  # expected

    await in_thread(rotated)


@pytest_twisted.ensureDeferred
async def test_a_failed_read_of_the_keys_is_no_longer_shown_once_they_are_read(env):
    """The keys page's error for a read of the list that failed (the gateway gone a moment) goes once a later read
    answers (before, it stayed over the list read since, until another page was opened)."""
    b = env.browser
    key = await _made_key(env, name="read again")
    fail = ("window.__fetch = window.__fetch || window.fetch; window.fetch = (url, options) => "
            "String(url).endsWith('/auth-keys') ? Promise.reject(new TypeError('Failed to fetch')) "
            ": window.__fetch(url, options)")

    def page():
        row = f".row-actions[data-key-id='{key['id']}']"
        b.sign_in()
        b.go("keys")
        b.driver.refresh()
        b.wait(lambda d: b.all(f"{row} button"), "the key's buttons")
        b.js(fail)
        b.one(row).find_element("xpath", ".//button[text()='Edit']").click()
        b.click("#key-submit")
        b.wait_text("#keys-messages", lambda t: "did not answer" in t, "the list's error")
        b.js("window.fetch = window.__fetch")
        b.one(row).find_element("xpath", ".//button[text()='Rotate secret']").click()
        b.one(row).find_element("xpath", ".//button[text()='Confirm rotate']").click()
        b.wait(lambda d: b.all("#key-secret-value"), "the new secret")
        b.wait(lambda d: b.text_of("#keys-messages") == "", "the list's error gone")
        b.one("#key-secret .secret-box").find_element("xpath", ".//button[text()='Done']").click()
        b.assert_clean()

    await in_thread(page)


@pytest_twisted.ensureDeferred
async def test_a_new_secret_stays_until_done_while_another_key_is_made(env):
    """A new key's secret, shown once, stays on the page while the operator opens New key or Edit for another (before,
    either wiped it: a secret not yet copied was lost for good); Done takes it away."""
    b = env.browser

    def two():
        b.go("keys")
        before = b.texts("#key-secret .secret")  # (another test's, not Done)
        b.click("#new-key")
        b.fill("#key-form [name=name]", "first of two")
        b.click("#key-submit")
        first = b.wait_text("#key-secret-value", lambda t: t.startswith("sk_gom_") and t not in before,
                            "the first secret")
        b.click("#new-key")
        assert b.text_of("#key-secret-value") == first
        b.wait(lambda d: b.all("tr.key-row"), "the list")
        b.click("tr.key-row .row-actions button")  # a row's Edit
        assert b.text_of("#key-secret-value") == first
        b.click("#new-key")
        b.fill("#key-form [name=name]", "second of two")
        b.click("#key-submit")
        second = b.wait_text("#key-secret-value", lambda t: t.startswith("sk_gom_") and t != first, "the second secret")
        assert b.texts("#key-secret .secret") == [second, first] + before  # the newest on top, the first kept
        for left in ([first] + before, before):
            b.one("#key-secret").find_element("xpath", ".//button[text()='Done']").click()
            b.wait(lambda d: b.texts("#key-secret .secret") == left, "a secret to go")
        b.assert_clean()

    await in_thread(two)


@pytest_twisted.ensureDeferred
async def test_a_refused_action_low_in_the_keys_list_is_shown_where_the_operator_is(env):
    """The API's error for a row's action is scrolled into view, below the sticky bar (before, it went to the top of
    the page, out of sight of a row further down: Confirm reset seemed to do nothing)."""
    b = env.browser
    headers = {"authorization": f"Bearer {env.master}"}
    for i in range(30):  # a list longer than the window
        await _made_key(env, name=f"filler {i}")
    answer = await treq.get(env.root + "/admin/api/v1/auth-keys", headers=headers)
    keys = [k for k in (await answer.json())["data"] if k["enabled"]]

    def lowest():
        b.go("keys")
        b.driver.refresh()
        b.wait(lambda d: len(b.all("tr.key-row")) >= len(keys), "every key")
        return b.js("const rows = [...document.querySelectorAll('tr.key-row:has(button.btn-danger-ghost)')];"
                    "return rows[rows.length - 1].querySelector('[data-key-id]').dataset.keyId")

    key_id = await in_thread(lowest)
    path = f"{env.root}/admin/api/v1/auth-keys/{key_id}"
    answer = await treq.patch(path, headers=headers, json={"budgets": [{"period": "daily", "max_tokens": 10}]})
    assert answer.code == 200, await answer.text()
    original = [{k: v for k, v in item.items() if k in ("period", "max_tokens", "max_cost")}
                for item in next(k for k in keys if k["id"] == key_id)["budgets"]]

    def confirm():
        b.driver.refresh()
        row = f"[data-key-id='{key_id}']"
        b.wait(lambda d: b.all(f"{row} button"), "the key's buttons")
        b.js("[...document.querySelectorAll(arguments[0])].find((e) => e.textContent === 'Reset budgets').click()",
             f"{row} button")
        confirm = b.one(f"{row} .btn-danger")
        b.js("arguments[0].scrollIntoView({block: 'center'})", confirm)
        # (the row is far enough down that the top of the page is out of sight)
        assert b.js("return document.querySelector('#page-keys h1').getBoundingClientRect().bottom") < 0
        return confirm

    confirm_button = await in_thread(confirm)
    answer = await treq.patch(path, headers=headers, json={"budgets": []})  # meanwhile, elsewhere
    assert answer.code == 200, await answer.text()
    try:
        def refused():
            confirm_button.click()
            b.wait_text("#keys-messages", lambda t: "has no budgets" in t, "the API's 404")
            top, bottom, bar = b.js("const r = document.querySelector('#keys-messages').getBoundingClientRect();"
                                    "return [r.top, r.bottom, document.querySelector('.topbar').offsetHeight]")
            assert bar <= top and bottom <= b.js("return innerHeight"), (top, bottom, bar)
            entries, violations = b.logs()
            assert not violations and [("404" in e["message"]) for e in entries] == [True], entries
            b.console.remove(entries[0])  # expected

        await in_thread(refused)
    finally:
        await treq.patch(path, headers=headers, json={"budgets": original})


@pytest_twisted.ensureDeferred
async def test_budgets_by_user_path_show_what_they_spent_and_reset_once_confirmed(env, reactor):
    """The budgets page lists the budgets by user path with what each spent, as the API says, and resets one after a
    second click (before, no page showed them: a team's budget ran out unseen)."""
    b = env.browser
    headers = {"authorization": f"Bearer {env.master}"}
    path = "/team/" + XSS
    for period in ("daily", "total"):
        answer = await treq.put(env.root + "/admin/api/v1/budgets", headers=headers,
                                json={"user_path": path, "period": period, "max_tokens": 100000})
        assert answer.code == 200, await answer.text()
    key = await _made_key(env, name="on a budget", user_path=path)
    client = _sdk(env, key["value"])
    try:
        await in_thread(client.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "b"}],
                        max_tokens=8)
    finally:
        client.close()

    async def listed():
        answer = await treq.get(env.root + "/admin/api/v1/budgets", headers=headers)
        return [r for r in (await answer.json())["data"] if r["user_path"] == path and r["period"] == "daily"]

    async def spent():
        return (await listed())[0]["spent_tokens"] > 0

    await _until(reactor, spent, "the budget's spend")
    [budget] = await listed()
    row = "tr.budget-row"

    def page():
        b.go("budgets")
        b.wait(lambda d: b.texts(f"{row} .budget-path") == [path, path], "the budgets' rows")
        assert b.js("return document.querySelectorAll('img[src=\"x\"]').length") == 0
        # a total budget never reset counts always (not "from 1970-01-01 00:00:00 UTC"); the daily one from today
        assert b.texts(f"{row} .budget-start") == [f"{budget['period_start'][:10]} 00:00:00 UTC", "always"]
        mine = f"{row}:nth-child(1)"
        assert b.text_of(f"{mine} .meter-label") == f"{budget['spent_tokens']:,} / 100,000 tokens"
        b.click(f"{mine} .row-actions button")
        assert b.js("return document.activeElement.textContent") == "Confirm reset"
        assert b.text_of("#budgets-messages") == ""
        b.click(f"{mine} .row-actions .btn-danger")
        b.wait_text("#budgets-messages", lambda t: "counts from now" in t, "the reset")
        b.wait_text(f"{mine} .meter-label", lambda t: t == "0 / 100,000 tokens", "the budget reset")
        # the focus back on the budget's Reset (before, the list drawn again took it to the page's top)
        b.wait(lambda d: b.js("const e = document.activeElement; return e.textContent === 'Reset' && "
                              "e.closest('[data-budget]').dataset.budget") == f"{path} daily", "the focus on Reset")
        b.assert_clean()

    await in_thread(page)
    assert (await listed())[0]["spent_tokens"] == 0


@pytest_twisted.ensureDeferred
async def test_batches_progress_to_100_percent_download_and_cancel(env):
    b = env.browser
    client = _sdk(env)
    lines = [json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": MODEL, "messages": [{"role": "user", "content": f"q{i}"}],
                                  "max_tokens": 4}}) for i in range(8)]
    env.fleet.set(latency=0.15)
    try:
        uploaded = await in_thread(client.files.create, file=("in.jsonl", io.BytesIO("\n".join(lines).encode())),
                                   purpose="batch")
        batch = await in_thread(client.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                completion_window="24h", metadata={"team": XSS})

        def progress():
            b.go("batches")
            row = f"tr.batch-row:has([data-batch-id='{batch.id}'])"
            b.wait(lambda d: b.all(f"{row} [role=progressbar][aria-valuenow='100']"), "the batch at 100%")
            b.wait_text(f"{row} .batch-status", lambda t: t == "completed", "the batch completed")
            assert "8 completed · 0 failed · 8 total" in b.text_of(f"{row} .progress-label")
            assert b.text_of(f"{row} .metadata") == f"team={XSS}"
            b.click(f"{row} [data-download='output']")
            return b.downloaded(f"{batch.id}-output.jsonl")

        output = await in_thread(progress)
        assert sorted(json.loads(line)["custom_id"] for line in output.splitlines()) == sorted(
            f"line-{i}" for i in range(8))

        env.fleet.set(latency=0.0, fail_status=400)  # every line of the next batch is refused upstream
        refused = await in_thread(client.batches.create, input_file_id=uploaded.id,
                                  endpoint="/v1/chat/completions", completion_window="24h")

        def errors():
            row = f"tr.batch-row:has([data-batch-id='{refused.id}'])"
            b.wait(lambda d: b.all(f"{row} [role=progressbar][aria-valuenow='100']"), "the refused batch at 100%")
            b.wait(lambda d: b.all(f"{row} [data-download='errors']"), "its error file")
            assert "0 completed · 8 failed · 8 total" in b.text_of(f"{row} .progress-label")
            b.click(f"{row} [data-download='errors']")
            return b.downloaded(f"{refused.id}-errors.jsonl")

        failed = [json.loads(line) for line in (await in_thread(errors)).splitlines()]
        assert len(failed) == 8 and all(line["response"]["status_code"] == 400 for line in failed)

        env.fleet.set(latency=30.0, fail_status=None)  # the next batch waits on its first line: cancel it
        slow = await in_thread(client.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                               completion_window="24h")

        def cancel():
            row = f"tr.batch-row:has([data-batch-id='{slow.id}'])"
            b.wait(lambda d: b.all(f"{row} .row-actions button"), "the cancel button")
            # asked twice (before, one click cancelled it): Keep leaves it running, Confirm cancel cancels it
            b.click(f"{row} [data-action='cancel']")
            b.click(f"{row} [data-action='keep']")
            b.click(f"{row} [data-action='cancel']")
            assert b.js("return document.activeElement.textContent") == "Confirm cancel"
            assert b.text_of(f"{row} .batch-status") == "in_progress"
            b.click(f"{row} [data-action='confirm']")
            b.wait_text(f"{row} .batch-status", lambda t: t in ("cancelling", "cancelled"), "the cancel")
            b.shot("batches.png")
            b.assert_clean()

        await in_thread(cancel)
    finally:
        env.fleet.set(latency=0.0, fail_status=None)
        client.close()


@pytest_twisted.ensureDeferred
async def test_the_batches_page_says_it_is_not_updated_while_the_gateway_does_not_answer(env):
    """A read of the batches still unanswered at the next one's time says that the page is not updated, and no read
    more goes out meanwhile (before, nothing said so, and two list calls more went out every 2 s); the note goes with
    the answer."""
    b = env.browser

    def hung():
        b.go("batches")
        b.wait(lambda d: b.all("tr.batch-row"), "the batches")
        b.js(_HOLD_FETCHES)
        b.wait_text("#batches-messages", lambda t: "Not updated" in t, "the page said to be not updated")
        assert b.js("return window.__pending.length") == 2  # (one read: OpenAI's list and Anthropic's)
        b.js(_ANSWER_FETCHES)
        b.wait(lambda d: "Not updated" not in b.text_of("#batches-messages"), "the note gone")
        b.assert_clean()

    await in_thread(hung)


# Holds the answers of the batch list that come while window.__hold is set (window.__held: their releases); counts
# those answered (window.__answered); and records each status the row of window.__watched shows (window.__statuses).
_HOLD_LISTS = """
const real = window.fetch;
Object.assign(window, {__hold: false, __held: [], __answered: 0, __statuses: []});
window.fetch = (url, options) => {
  const answer = real(url, options);
  if (!String(url).startsWith("/v1/batches?")) return answer;
  return answer.then((response) => new Promise((resolve) => {
    const release = () => { window.__answered += 1; resolve(response); };
    if (window.__hold) window.__held.push(release); else release();
  }));
};
const observer = new MutationObserver(() => {
  const box = document.querySelector(`[data-batch-id='${window.__watched}']`);
  const status = box && box.closest("tr").querySelector(".batch-status").textContent;
  if (status && status !== window.__statuses[window.__statuses.length - 1]) window.__statuses.push(status);
});
observer.observe(document.querySelector("#main"), {childList: true, subtree: true});
window.__unhold = () => { observer.disconnect(); window.fetch = real; };
"""


@pytest_twisted.ensureDeferred
async def test_a_list_read_before_a_cancel_is_not_drawn_over_the_one_read_after_it(env):
    """A read of the batches that was on its way when a batch was cancelled, answered after the read that followed
    the cancel, is not drawn over it (before, the batch went back to in_progress, its Cancel button again, until the
    next read)."""
    b = env.browser
    client = _sdk(env)
    line = json.dumps({"custom_id": "slow", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": MODEL, "messages": [{"role": "user", "content": "q"}], "max_tokens": 4}})
    env.fleet.set(latency=30.0)  # its line waits: it stays in progress until cancelled
    try:
        uploaded = await in_thread(client.files.create, file=("slow.jsonl", io.BytesIO(line.encode())),
                                   purpose="batch")
        slow = await in_thread(client.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                               completion_window="24h")

        def cancel():
            b.go("batches")
            row = f"tr.batch-row:has([data-batch-id='{slow.id}'])"
            b.wait(lambda d: b.all(f"{row} [data-action='cancel']"), "the cancel button")
            b.js(_HOLD_LISTS + "window.__watched = arguments[0]; window.__hold = true", slow.id)
            b.wait(lambda d: b.js("return window.__held.length") >= 1, "a read of the list held")
            b.js("window.__hold = false")
            b.click(f"{row} [data-action='cancel']")
            b.click(f"{row} [data-action='confirm']")
            b.wait_text(f"{row} .batch-status", lambda t: t in ("cancelling", "cancelled"), "the cancel")
            answered = b.js("window.__held.forEach((release) => release()); return window.__answered")
            b.wait(lambda d: b.js("return window.__answered") >= answered + 2, "two reads after the held one")
            statuses = b.js("return window.__statuses")
            b.js("window.__unhold()")
            assert "in_progress" not in statuses[statuses.index(next(s for s in statuses if s != "in_progress")):], \
                statuses
            b.assert_clean()

        await in_thread(cancel)
    finally:
        env.fleet.set(latency=0.0)
        client.close()


# Counts the page's calls of the batch list (window.__lists), to wait for its redraws.
_COUNT_LISTS = """
const real = window.fetch;
window.__lists = 0;
window.fetch = (url, options) => {
  if (String(url).startsWith("/v1/batches?")) window.__lists += 1;
  return real(url, options);
};
"""


@pytest_twisted.ensureDeferred
async def test_a_failed_download_stays_shown_while_the_batches_are_read_again(env, reactor):
    """A download the API refuses (its file deleted meanwhile) says why until the operator's next action (before,
    the list's next read, 2 s later, took the message away)."""
    b = env.browser
    client = _sdk(env)
    line = {"custom_id": "one", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "q"}], "max_tokens": 4}}
    try:
        uploaded = await in_thread(client.files.create, file=("one.jsonl", io.BytesIO(json.dumps(line).encode())),
                                   purpose="batch")
        batch = await in_thread(client.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                completion_window="24h")

        async def completed():
            return (await in_thread(client.batches.retrieve, batch.id)).status == "completed"

        await _until(reactor, completed, "the batch to complete")
        output = (await in_thread(client.batches.retrieve, batch.id)).output_file_id
        row = f"tr.batch-row:has([data-batch-id='{batch.id}'])"

        def shown():
            b.go("batches")
            b.wait(lambda d: b.all(f"{row} [data-download='output']"), "the output's button")

        await in_thread(shown)
        await in_thread(client.files.delete, output)

        def refused():
            b.js(_COUNT_LISTS)
            b.click(f"{row} [data-download='output']")
            b.wait_text("#batches-messages", lambda t: output in t, "the API's 404")
            b.wait(lambda d: b.js("return window.__lists") >= 2, "two reads of the list since")
            assert output in b.text_of("#batches-messages")
            entries, violations = b.logs()
            assert not violations and [("404" in e["message"]) for e in entries] == [True], entries
            b.console.remove(entries[0])  # expected

        await in_thread(refused)
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_message_batches_are_shown_with_their_results_and_cancel(env):
    """A message batch (Anthropic's SDK, C{/v1/messages/batches}, which C{/v1/batches} does not list) has its row
    on the batches page: its lines' progress, its results for download, its cancel (before: not shown at all once
    each API showed only its own batches)."""
    import anthropic

    b = env.browser
    client = anthropic.Anthropic(base_url=env.root, api_key=env.master, max_retries=0, timeout=20)
    requests = [{"custom_id": f"m-{i}", "params": {"model": MODEL, "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": f"q{i}"}]}}
                for i in range(3)]
    try:
        batch = await in_thread(client.messages.batches.create, requests=requests)

        def ended():
            b.go("batches")
            row = f"tr.batch-row:has([data-batch-id='{batch.id}'])"
            b.wait(lambda d: b.all(f"{row} [role=progressbar][aria-valuenow='100']"), "the message batch at 100%")
            b.wait_text(f"{row} .batch-status", lambda t: t == "completed", "the message batch ended")
            assert "3 completed · 0 failed · 3 total" in b.text_of(f"{row} .progress-label")
            assert b.text_of(f"{row} td:nth-child(2)") == "/v1/messages"
            b.click(f"{row} [data-download='results']")
            return b.downloaded(f"{batch.id}-results.jsonl")

        results = [json.loads(line) for line in (await in_thread(ended)).splitlines()]
        assert sorted((r["custom_id"], r["result"]["type"]) for r in results) == [
            (f"m-{i}", "succeeded") for i in range(3)]

        env.fleet.set(latency=30.0)  # the next one waits on its first line: cancel it from the page
        slow = await in_thread(client.messages.batches.create, requests=requests)

        def cancel():
            row = f"tr.batch-row:has([data-batch-id='{slow.id}'])"
            b.wait(lambda d: b.all(f"{row} .row-actions button"), "the cancel button")
            b.click(f"{row} [data-action='cancel']")
            b.click(f"{row} [data-action='confirm']")
            b.wait_text(f"{row} .batch-status", lambda t: t in ("cancelling", "cancelled"), "the cancel")
            b.assert_clean()

        await in_thread(cancel)
        assert (await in_thread(client.messages.batches.retrieve, slow.id)).processing_status in ("canceling", "ended")
    finally:
        env.fleet.set(latency=0.0)
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_batch_failed_at_validation_says_why(env, reactor):
    """A batch whose lines fail validation has no file to download: its row names each bad line (the API's
    errors.data), as text (a line's own text may be HTML)."""
    b = env.browser
    client = _sdk(env)
    good = {"custom_id": "ok", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "q"}], "max_tokens": 4}}
    lines = [json.dumps(good), XSS] + [json.dumps(dict(good, custom_id=f"c{i}", url="/v1/embeddings"))
                                       for i in range(4)]
    try:
        uploaded = await in_thread(client.files.create, file=("bad.jsonl", io.BytesIO("\n".join(lines).encode())),
                                   purpose="batch")
        batch = await in_thread(client.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                completion_window="24h")

        async def failed():
            return (await in_thread(client.batches.retrieve, batch.id)).status == "failed"

        await _until(reactor, failed, "the batch to fail its validation")
        answer = await in_thread(client.batches.retrieve, batch.id)
        assert answer.status == "failed" and len(answer.errors.data) == 5

        def why():
            b.go("batches")
            row = f"tr.batch-row:has([data-batch-id='{batch.id}'])"
            b.wait_text(f"{row} .batch-status", lambda t: t == "failed", "the batch failed")
            shown = b.wait(lambda d: b.texts(f"{row} .batch-errors li"), "the batch's errors")
            assert shown == [f"line {e.line}: {e.message}" for e in answer.errors.data[:3]] + ["and 2 more"]
            b.no_alert()
            b.assert_clean()

        await in_thread(why)
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_usage_tables_csv_and_the_request_log(env):
    b = env.browser

    def usage():
        b.go("usage")
        b.wait(lambda d: any(MODEL in t for t in b.texts("#usage-table td")), "the model's row")
        b.wait(lambda d: b.js("const c = Chart.getChart(document.querySelector('#chart-usage canvas'));"
                              "return c && c.data.labels.length > 0"), "the usage chart")
        b.click("#usage-csv")
        rows = list(csv.DictReader(io.StringIO(b.downloaded("usage-model.csv"))))
        (row,) = [r for r in rows if r["model"] == MODEL]
        assert row["provider_name"] == "vllm" and int(row["requests"]) >= 10  # 9 + the key's (+ batch lines)
        # by provider: its own totals and CSV (before, the per-model CSV under the provider's tab)
        b.click("button[data-group='provider']")
        b.wait(lambda d: "Provider" in b.texts("#usage-table th"), "the provider's table")
        b.click("#usage-csv")
        (row,) = list(csv.DictReader(io.StringIO(b.downloaded("usage-provider.csv"))))
        assert (row["provider"], row["provider_name"]) == ("vllm", "vllm") and "model" not in row

        b.click("button[data-group='key']")
        b.wait(lambda d: XSS in b.texts("#usage-table .key-name"), "the key's row, named as text")
        b.no_alert()

        b.fill("#log-search", "dash-find-me-3")
        b.one("#log-search").submit()
        b.wait(lambda d: b.texts("#log-table .request-id") == ["dash-find-me-3"], "one record")
        b.fill("#log-search", "dash-find-me")
        b.one("#log-search").submit()
        b.wait(lambda d: len(b.texts("#log-table .request-id")) == 6, "six records")
        b.click("#log-csv")
        found = sorted(row["request_id"] for row in csv.DictReader(io.StringIO(b.downloaded("usage-log.csv"))))
        assert len(found) == 6 and all(r.startswith("dash-find-me") for r in found)
        # Every page of the log, followed by its X-Next: the same records, one header.
        b.js("import('/admin/static/api.js').then((api) => api.downloadPages("
             "'/admin/api/v1/usage/log?search=dash-find-me&limit=4&format=csv', 'usage-log-paged.csv'))")
        paged = b.downloaded("usage-log-paged.csv")
        assert sorted(row["request_id"] for row in csv.DictReader(io.StringIO(paged))) == found
        b.click("button[data-group='model']")
        b.wait(lambda d: any(MODEL in t for t in b.texts("#usage-table td")), "the model's row again")
        b.shot("usage.png")
        b.assert_clean()

    await in_thread(usage)


@pytest_twisted.ensureDeferred
async def test_the_request_log_filters_the_master_keys_requests(env):
    """The log names the master key's requests "master key"; its key filter offers it (the API's key=master)."""
    b = env.browser
    answer = await treq.get(env.root + "/admin/api/v1/usage/log?key=master&days=1&limit=50",
                            headers={"authorization": f"Bearer {env.master}"})
    expected = [record["request_id"] for record in (await answer.json())["data"]]
    assert expected

    def filtered():
        b.go("usage")
        b.wait(lambda d: b.all("#log-key option[value='master']"), "the master key in the key filter")
        b.js("document.querySelector('#usage-days').value = '1';"
             "document.querySelector('#usage-days').dispatchEvent(new Event('change'))")
        b.fill("#log-search", "")  # (the filters a test before left)
        b.js("document.querySelector('#log-key').value = 'master'")
        b.click("#log-filters button[type=submit]")
        b.wait(lambda d: b.texts("#log-table .request-id") == expected, "the master key's requests")
        assert set(b.texts("#log-table .key-name")) == {"master key"}
        b.click("#log-filters button[type=button]")  # Clear
        b.wait(lambda d: len(b.texts("#log-table .request-id")) > len(expected), "every key's requests again")
        b.assert_clean()

    await in_thread(filtered)


@pytest_twisted.ensureDeferred
async def test_the_usage_pages_keys_follow_the_keys_made_while_it_is_open(env, reactor):
    """A key made while the usage page is open is offered by its key filter once the filter is opened, and a key
    first seen in the log is named there (before, the filter offered only the keys of the page's opening, and the
    log showed a later key's id, until a reload)."""
    b = env.browser

    def opened():
        b.sign_in()
        b.go("usage")
        b.wait(lambda d: b.all("#log-key option[value='master']"), "the key filter")

    await in_thread(opened)
    offered = await _made_key(env, name="made while the usage page is open")
    used = await _made_key(env, name="first used while the usage page is open")
    await in_thread(_sdk(env, used["value"]).chat.completions.create, model=MODEL, max_tokens=4,
                    messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Request-Id": "dash-later-key"})

    async def recorded():
        answer = await treq.get(env.root + "/admin/api/v1/usage/log?search=dash-later-key&days=1",
                                headers={"authorization": f"Bearer {env.master}"})
        return (await answer.json())["data"]

    await _until(reactor, recorded, "the later key's request in the ledger")

    def followed():
        from selenium.webdriver.common.keys import Keys

        assert not b.all(f"#log-key option[value='{offered['id']}']")
        b.click("#log-key")  # (opened: read again)
        b.wait(lambda d: b.all(f"#log-key option[value='{offered['id']}']"), "the key made since in the filter")
        b.one("#log-key").send_keys(Keys.ESCAPE)
        b.fill("#log-search", "dash-later-key")
        b.one("#log-search").submit()
        b.wait(lambda d: b.texts("#log-table .request-id") == ["dash-later-key"], "the later key's request")
        b.wait(lambda d: b.texts("#log-table .key-name") == [used["name"]], "the later key named")
        b.fill("#log-search", "")
        b.one("#log-search").submit()
        b.assert_clean()

    await in_thread(followed)


@pytest_twisted.ensureDeferred
async def test_the_request_log_pages_once_per_click_even_a_double_click(env, reactor):
    """The log's Older and Newer go one page each, as the API pages it; a double click on Older (both clicks before
    its answer) goes one page (before, it said "page 3" over page 2's records, and Newer then went nowhere)."""
    b = env.browser
    client = _sdk(env)

    def traffic():
        for i in range(60):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "p"}], max_tokens=2,
                                           extra_headers={"X-Request-Id": f"pager-{i:03}"})

    try:
        await in_thread(traffic)
    finally:
        client.close()
    expected = [f"pager-{i:03}" for i in reversed(range(60))]

    async def recorded():
        answer = await treq.get(env.root + "/admin/api/v1/usage/log?search=pager-&days=1&limit=100",
                                headers={"authorization": f"Bearer {env.master}"})
        return [r["request_id"] for r in (await answer.json())["data"]] == expected

    await _until(reactor, recorded, "the 60 records")

    def pages():
        b.go("usage")
        b.fill("#log-search", "pager-")
        b.one("#log-search").submit()
        b.wait(lambda d: b.texts("#log-table .request-id") == expected[:50], "the first page")
        b.js("const older = [...document.querySelectorAll('.pager button')].find((e) => e.textContent === 'Older →');"
             "older.click(); older.click();")
        b.wait(lambda d: b.texts("#log-table .request-id") == expected[50:], "the second page")
        assert "page 2" in b.text_of(".pager")
        assert b.js("return [...document.querySelectorAll('.pager button')].find("
                    "(e) => e.textContent === 'Older →').disabled") is True
        b.click(".pager button:nth-child(2)")  # Newer
        b.wait(lambda d: b.texts("#log-table .request-id") == expected[:50], "the first page again")
        assert "page 1" in b.text_of(".pager")
        b.fill("#log-search", "")
        b.one("#log-search").submit()
        b.assert_clean()

    await in_thread(pages)


@pytest_twisted.ensureDeferred
async def test_the_request_logs_pages_are_turned_from_the_keyboard(env):
    """Enter on Older or Newer keeps the focus on the log's pager (on the same button, or the first that can still be
    pressed), so that Enter again turns the next page (before, the pager drawn again dropped it to the page's top).
    (The 60 records of the test before: two pages.)"""
    from selenium.webdriver.common.keys import Keys

    b = env.browser

    def focus(text):
        b.js("[...document.querySelectorAll('.pager button')].find((e) => e.textContent === arguments[0]).focus()", text)

    def focused():
        return b.js("const e = document.activeElement; return e.closest('.pager') ? e.textContent : e.tagName")

    def press_enter_on(text):
        """Focus the pager's button C{text} and press Enter on it; again where the pager was drawn anew between the
        two (the log's refresh, on a loaded machine: the focused element gone)."""
        from selenium.common.exceptions import StaleElementReferenceException

        for _ in range(5):
            focus(text)
            try:
                b.driver.switch_to.active_element.send_keys(Keys.ENTER)
                return
            except StaleElementReferenceException:
                continue
        raise AssertionError(f"the pager's {text} was drawn anew five times in a row")

    def pages():
        b.go("usage")
        b.fill("#log-search", "pager-")
        b.one("#log-search").submit()
        b.wait(lambda d: "page 1" in b.text_of(".pager") and len(b.texts("#log-table .request-id")) == 50, "page 1")
        press_enter_on("Older →")
        b.wait(lambda d: "page 2" in b.text_of(".pager"), "page 2")
        assert focused() == "Newest"  # (Older: disabled on the last page)
        press_enter_on("← Newer")
        b.wait(lambda d: "page 1" in b.text_of(".pager"), "page 1 again")
        assert focused() == "Older →"
        b.driver.switch_to.active_element.send_keys(Keys.ENTER)
        b.wait(lambda d: "page 2" in b.text_of(".pager"), "page 2 again")
        assert focused() == "Newest"
        b.fill("#log-search", "")
        b.one("#log-search").submit()
        b.assert_clean()

    await in_thread(pages)


@pytest_twisted.ensureDeferred
async def test_a_failed_read_of_the_log_is_no_longer_shown_once_it_is_read(env):
    """The usage page's error for a read that failed (the gateway gone a moment) goes once that part is read again;
    another part's error stays (before, it stayed over the log read since, until another window was picked)."""
    b = env.browser
    fail = ("window.__fetch = window.__fetch || window.fetch; window.fetch = (url, options) => "
            "String(url).includes(arguments[0]) ? Promise.reject(new TypeError('Failed to fetch')) "
            ": window.__fetch(url, options)")

    def page():
        b.go("usage")
        b.wait(lambda d: b.all("#log-table tbody tr"), "the log")
        b.js(fail, "usage/log")
        b.click("#log-filters button[type=submit]")
        b.wait_text("#usage-messages", lambda t: "The gateway did not answer" in t, "the log's error")
        b.js(fail, "usage/user-paths")
        b.click("button[data-group='path']")
        b.wait(lambda d: len(b.all("#usage-messages .note-error")) == 2, "the groups' error too")
        b.js("window.fetch = window.__fetch")
        b.click("#log-filters button[type=submit]")
        b.wait(lambda d: len(b.all("#usage-messages .note-error")) == 1, "the log's error gone")
        b.click("button[data-group='model']")
        b.wait(lambda d: b.text_of("#usage-messages") == "", "the groups' error gone")
        b.assert_clean()

    await in_thread(page)


@pytest_twisted.ensureDeferred
async def test_the_request_log_marks_estimated_tokens(env, reactor):
    """A record whose tokens were estimated (a raw stream without a usage chunk: the API's estimated) reads "≈" in
    the log (before, as exact as any upstream's count)."""
    b = env.browser
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    response = await treq.post(env.root + "/p/vllm/v1/chat/completions", json=body,
                               headers={"authorization": f"Bearer {env.master}", "x-request-id": "dash-estimated"})
    assert response.code == 200 and b'"usage"' not in await treq.content(response)

    async def log(search):
        answer = await treq.get(env.root + f"/admin/api/v1/usage/log?search={search}&days=1",
                                headers={"authorization": f"Bearer {env.master}"})
        return (await answer.json())["data"]

    async def recorded():
        return bool(await log("dash-estimated"))

    await _until(reactor, recorded, "the estimated record")
    [estimated] = await log("dash-estimated")
    [exact] = await log("dash-find-me-0")
    assert estimated["estimated"] is True and exact["estimated"] is False

    def shown():
        b.go("usage")
        tokens = "#log-table td[data-label='Tokens in / out']"
        for search, record, mark in (("dash-estimated", estimated, "≈ "), ("dash-find-me-0", exact, "")):
            b.fill("#log-search", search)
            b.one("#log-search").submit()
            b.wait(lambda d: b.texts("#log-table .request-id") == [record["request_id"]], search)
            assert b.texts(tokens) == [f"{mark}{record['input_tokens']:,} / {record['output_tokens']:,}"]
        b.fill("#log-search", "")
        b.one("#log-search").submit()
        b.assert_clean()

    await in_thread(shown)


# Holds the page's calls of a 90-day window until window.__release(); the answer of one so released sets
# window.__stale_done once the page has taken it (a task after its JSON: the page's awaits run before it).
_HOLD_90_DAYS = """
const real = window.fetch;
window.__held = [];
window.__release = () => window.__held.splice(0).forEach((go) => go());
window.fetch = (url, options) => {
  if (!String(url).includes("days=90")) return real(url, options);
  return new Promise((resolve, reject) => window.__held.push(() => real(url, options).then((response) => {
    const json = response.json.bind(response);
    response.json = () => json().then((value) => {
      setTimeout(() => { window.__stale_done = true; });
      return value;
    });
    resolve(response);
  }, reject)));
};
"""


@pytest_twisted.ensureDeferred
async def test_an_answer_for_a_window_left_meanwhile_is_not_shown(env):
    """The usage page shows the window last chosen: the answer for one chosen before it, coming after the
    newer one's, is dropped (it replaced the newer window's totals, range and tables)."""
    b = env.browser

    def switch():
        b.go("usage")
        b.wait_text("#usage-range", lambda t: "UTC days" in t, "the window's range")
        b.js(_HOLD_90_DAYS)
        b.js("const s = document.querySelector('#usage-days'); s.value = '90'; s.dispatchEvent(new Event('change'))")
        b.wait(lambda d: b.js("return window.__held.length") == 1, "the 90-day totals, held")
        b.js("const s = document.querySelector('#usage-days'); s.value = '1'; s.dispatchEvent(new Event('change'))")
        today = b.wait_text("#usage-range", lambda t: t.split(" (")[0].split(" – ")[0] == t.split(" (")[0]
                            .split(" – ")[-1], "today's range")
        b.js("window.__release()")
        b.wait(lambda d: b.js("return window.__stale_done === true"), "the 90-day totals, taken by the page")
        assert b.text_of("#usage-range") == today
        b.js("window.__release()")  # (the tables of the 90 days, where the page still asked for them)
        assert b.js("return document.querySelector('#usage-days').value") == "1"
        b.assert_clean()

    await in_thread(switch)


@pytest_twisted.ensureDeferred
async def test_compact_numbers_round_up_into_the_next_unit(env):
    """The overview's token cards (dom.js compact()): 999,960 is 1.0M, never "1000.0k"."""
    b = env.browser
    expected = {"9999": "9,999", "10000": "10.0k", "999949": "999.9k", "999960": "1.0M", "999999": "1.0M",
                "1000000": "1.0M", "999960000": "1.0B", "-999960": "-1.0M", "2500000000": "2.5B"}

    def shown():
        b.go("overview")
        return b.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "import('/admin/static/dom.js').then((dom) => done(Object.fromEntries("
            "arguments[0].map((n) => [n, dom.compact(Number(n))]))))", list(expected))

    assert await in_thread(shown) == expected


@pytest_twisted.ensureDeferred
async def test_a_count_is_plural_only_where_it_is(env):
    """A replica's failures in a row (dom.js counted()): "1 failure", "2 failures" (before, "(1 failures)")."""
    b = env.browser
    expected = {"0": "0 failures", "1": "1 failure", "2": "2 failures", "1000": "1,000 failures"}

    def shown():
        b.go("overview")
        return b.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "import('/admin/static/dom.js').then((dom) => done(Object.fromEntries("
            "arguments[0].map((n) => [n, dom.counted(Number(n), 'failure')]))))", list(expected))

    assert await in_thread(shown) == expected


@pytest_twisted.ensureDeferred
async def test_a_long_name_cut_on_a_bar_chart_keeps_its_characters_whole(env):
    """A name past 28 characters on the usage chart (charts.js) keeps its end whole, an emoji (two UTF-16 units)
    included (before, its cut could fall inside one, drawn as a broken character)."""
    b = env.browser
    name = "team-🔑" + "🔑" * 30

    def labels():
        b.go("overview")
        return b.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "import('/admin/static/charts.js').then((charts) => {"
            "  const box = document.createElement('div'); box.className = 'chart-box'; document.body.append(box);"
            "  const c = charts.chart(box, {type: 'bar', horizontal: true, series: [{label: 'requests', color: '#000'}]});"
            "  charts.update(c, [arguments[0], 'short'], [[1, 2]]);"
            "  const shown = c.scales.y.ticks.map((t) => [t.label.isWellFormed(), t.label.toWellFormed()]);"
            "  c.destroy(); box.remove(); done(shown);"
            "})", name)

    shown = await in_thread(labels)
    assert shown == [[True, "…" + "🔑" * 27], [True, "short"]], shown


@pytest_twisted.ensureDeferred
async def test_a_latency_line_stops_where_no_request_was_served(env):
    """The overview's latency and time to first token are null in a minute (hour, day) with no request: the line
    stops there and takes up again after it, and a busy minute alone is a dot (charts.js isolated()); before, the
    line was drawn across the idle minutes as if requests had been timed there (spanGaps)."""
    b = env.browser

    def segments():
        b.go("overview")
        return b.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "import('/admin/static/charts.js').then((charts) => {"
            "  const box = document.createElement('div'); box.className = 'chart-box'; document.body.append(box);"
            "  const c = charts.chart(box, {type: 'line', series: [{label: 'latency p50', color: '#000000'}]});"
            "  charts.update(c, ['a', 'b', 'c', 'd', 'e', 'f'], [[5, 6, null, null, 7, 8]]);"
            "  const shown = c.getDatasetMeta(0).dataset.segments.map((s) => [s.start, s.end]);"
            "  c.destroy(); box.remove(); done(shown);"
            "})")

    assert await in_thread(segments) == [[0, 1], [4, 5]]


@pytest_twisted.ensureDeferred
async def test_costs_are_grouped_in_thousands_as_counts_are(env):
    """A cost (dom.js cost(): the usage page's, a cost budget's) reads as the token counts beside it do: 12,345,678.50,
    never "12345678.50"; below a cent, six places."""
    b = env.browser
    expected = {"12345678.5": "12,345,678.50", "999.999": "1,000.00", "0.5": "0.50", "0": "0.00",
                "0.0012": "0.001200", "-1234.5": "-1,234.50"}

    def shown():
        b.go("overview")
        return b.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "import('/admin/static/dom.js').then((dom) => done(Object.fromEntries("
            "arguments[0].map((n) => [n, dom.cost(Number(n))]))))", list(expected))

    assert await in_thread(shown) == expected


@pytest_twisted.ensureDeferred
async def test_a_keyboards_focus_is_drawn_where_it_can_be_seen(env):
    """Tab's focus has a 2 px ring on the dark bar's links (white) and inside the segmented buttons (blue; white on the
    pressed one), which clip what is drawn outside them (before, Chromium's own dark ring: lost on the dark bar, cut
    off around the window's buttons)."""
    from selenium.webdriver.common.keys import Keys

    b = env.browser
    ring = ("const s = getComputedStyle(document.activeElement);"
            "return [document.activeElement.textContent, s.outlineStyle, s.outlineWidth, s.outlineColor,"
            " s.outlineOffset]")
    white, blue = "rgb(255, 255, 255)", "rgb(31, 111, 235)"

    def tabbing():
        b.go("overview")
        b.js("document.querySelector('.topbar .brand').focus()")
        seen = []
        for _ in range(10):
            b.driver.switch_to.active_element.send_keys(Keys.TAB)
            seen.append(b.js(ring))
        assert seen[:7] == [[name, "solid", "2px", white, "1px"] for name in (
            "Overview", "Providers", "Usage", "Keys", "Budgets", "Batches", "Sign out")], seen
        assert seen[7:] == [["Last hour", "solid", "2px", white, "-4px"], ["Last 24 hours", "solid", "2px", blue, "-4px"],
                            ["Last 30 days", "solid", "2px", blue, "-4px"]], seen
        b.assert_clean()

    await in_thread(tabbing)


@pytest_twisted.ensureDeferred
async def test_every_page_fits_a_phone(env):
    b = env.browser
    # a name, user path and metadata with no place to break a line at (before, the keys page was 763 px wide)
    await _made_key(env, name="n" * 80, user_path="/" + "p" * 90, metadata={"m" * 40: "v" * 120})

    def pages():
        b.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                 {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
        try:
            for page, ready in (("overview", "#overview-cards .card"), ("providers", "tr.replica"),
                                ("usage", "#log-table tbody tr"), ("keys", "tr.key-row"), ("budgets", "tr.budget-row"),
                                ("batches", "tr.batch-row")):
                b.go(page)
                b.wait(lambda d: b.all(ready), f"the {page} page's content")
                width = b.js("return document.documentElement.scrollWidth")
                assert width <= 390, f"the {page} page is {width}px wide on a 390px screen"
        finally:
            b.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        b.assert_clean()

    await in_thread(pages)


@pytest_twisted.ensureDeferred
async def test_the_whole_session_logged_no_errors_and_kept_no_key_in_local_storage(env):
    b = env.browser

    def check():
        b.assert_clean()
        assert b.js("return localStorage.length") == 0
        # everything after the sign-in test's expected 401s: nothing
        return b.console

    console = await in_thread(check)
    assert all("401" in e["message"] for e in console), console


@pytest_twisted.ensureDeferred
async def test_the_copy_button_copies_a_new_secret_over_plain_http(env, tmp_path):
    """A gateway reached by its name over http (no secure context: no navigator.clipboard) still copies the
    new secret with the Copy button (before, it only selected it and asked for Ctrl+C, which a phone has not)."""
    port = env.root.rsplit(":", 1)[1]
    downloads = str(tmp_path)
    browser = await in_thread(Browser, f"http://gomodel.test:{port}", env.master, downloads,
                              ("--host-resolver-rules=MAP gomodel.test 127.0.0.1",))
    try:
        def copy():
            browser.sign_in()
            assert browser.js("return window.isSecureContext") is False
            browser.go("keys")
            browser.click("#new-key")
            browser.fill("#key-form [name=name]", "copied over http")
            browser.click("#key-submit")
            secret = browser.wait_text("#key-secret-value", lambda t: t.startswith("sk_gom_"), "the new secret")
            browser.js("window.__copied = null; document.addEventListener('copy', "
                       "() => { window.__copied = getSelection().toString(); })")
            browser.click("#key-secret .btn-primary")
            browser.wait_text("#key-secret .secret-row", lambda t: "Copied" in t, "the copy")
            assert browser.js("return window.__copied") == secret
            entries, violations = browser.logs()  # (Chromium ignores, and says so, COOP on an http origin)
            assert not violations and all("Cross-Origin-Opener-Policy" in e["message"] for e in entries), entries

        await in_thread(copy)
    finally:
        await in_thread(browser.close)


@asynccontextmanager
async def _own_gateway(reactor, tmp_path, key, env=None, fleet=None):
    """A gateway of its own (C{env} added to its settings) in front of C{fleet} (a started L{FakeFleet} the caller
    stops), else of one fake replica, and a browser for it presenting C{key}: C{(gw, browser)}; both closed after."""
    from tests.support import start_gateway

    own = fleet is None
    if own:
        fleet = await FakeFleet(reactor, 1).start()
    gw = browser = None
    try:
        gw = await start_gateway(reactor, {"VLLM_BASE_URL": fleet.env_value, "GOMODEL_DATA_DIR": str(tmp_path),
                                           **(env or {})})
        browser = await in_thread(Browser, gw.url, key, str(tmp_path))
        yield gw, browser
    finally:
        if browser is not None:
            await in_thread(browser.close)
        if gw is not None:
            await gw.service.stopService()
        if own:
            await fleet.stop()


@pytest_twisted.ensureDeferred
async def test_a_gateway_without_a_master_key_says_how_to_sign_in_and_that_it_is_open(reactor, tmp_path):
    """On a gateway started without GOMODEL_MASTER_KEY the sign-in form says to leave the field empty, and every page
    then says that the admin API is open (before, the form asked for a key that does not exist, and nothing said
    that anyone can use the dashboard)."""
    async with _own_gateway(reactor, tmp_path, "") as (gw, browser):

        def open_gateway():
            browser.driver.get(f"{gw.url}/admin/dashboard")
            browser.wait(lambda d: browser.one("#signin-key").is_displayed(), "the sign-in form")
            assert "without one is open: leave the field empty" in browser.text_of("#signin-form")
            browser.click("#signin-submit")
            browser.wait(lambda d: browser.all("#page-overview"), "the overview")
            for page in ("overview", "keys"):
                browser.go(page)
                assert "GOMODEL_MASTER_KEY is unset" in browser.text_of("#open-gateway")
                assert browser.js("return document.querySelector('#open-gateway').offsetParent") is not None
            browser.click("#signout")
            browser.wait(lambda d: browser.one("#signin-key").is_displayed(), "the sign-in form again")
            assert browser.js("return document.querySelector('#open-gateway').offsetParent") is None
            # a key typed all the same (the one the operator meant to set, which never reached the gateway) is let
            # in as no key is: the page says so still (before, it said nothing, as if the key guarded the gateway)
            browser.fill("#signin-key", "the-key-meant-to-be-set")
            browser.click("#signin-submit")
            browser.wait(lambda d: browser.all("#page-keys"), "the keys page (left at) with a key typed")
            assert browser.js("return document.querySelector('#open-gateway').offsetParent") is not None
            browser.assert_clean()

        await in_thread(open_gateway)


@pytest_twisted.ensureDeferred
async def test_a_master_key_beyond_ascii_signs_in(reactor, tmp_path):
    """A master key the configuration takes with characters beyond ASCII (é, к, 🔑) signs in: the page sends it as its
    UTF-8 bytes, as the gateway compares it and a client such as curl sends it (before, fetch sent é as one Latin-1
    byte, a 401 "not the master key", and refused to send к at all: "the gateway did not answer")."""
    master = "clé-ключ-🔑"
    async with _own_gateway(reactor, tmp_path, master, {"GOMODEL_MASTER_KEY": master}) as (_, browser):

        def sign_in():
            browser.sign_in()
            browser.go("keys")
            browser.wait(lambda d: browser.all("#keys-list .note-empty"), "the keys page, read with the key")
            browser.assert_clean()

        await in_thread(sign_in)


# -- days of the browser's time zone (a gateway and a browser of their own) ---------------------------


async def _across_midnight(gw, zone):
    """Usage records at the start of today in C{zone} and a minute before it (UTC's today holds both or neither of
    them, whatever the time: the zone's and UTC's totals of today differ): its start (an aware datetime). (At the
    start itself, not after it: a record never in the future, the test need not wait for the day's first minute.)
    A test of them runs under L{within_one_day}: the zone's day may end while it runs."""
    tz = ZoneInfo(zone)
    midnight = datetime.combine(datetime.now(tz).date(), datetime.min.time(), tz)
    await _add_usage(gw, [("yesterday-there", midnight.timestamp() - 60, 1000),
                          ("today-there", midnight.timestamp(), 20000)])
    return midnight


async def _add_usage(gw, rows):
    """Write a usage record of C{MODEL} for each C{(request_id, timestamp, input_tokens)} of C{rows} in C{gw}'s
    ledger (one output token each)."""
    from gomodel.store.records import USAGE_FIELDS

    base = dict.fromkeys(USAGE_FIELDS)
    base.update(provider="vllm", provider_name="vllm", replica=0, model=MODEL, endpoint="/v1/chat/completions",
                status_code=200, stream=False, output_tokens=1, client_gone=False, estimated=False, outcome="ok",
                duration_ms=40, ttft_ms=None)
    await gw.service.store.usage.add([tuple(dict(base, request_id=request_id, timestamp=at, input_tokens=tokens,
                                                 total_tokens=tokens + 1)[name] for name in USAGE_FIELDS)
                                      for request_id, at, tokens in rows])



@pytest_twisted.ensureDeferred
async def test_the_overviews_errors_say_what_kind_they_were(reactor, tmp_path):
    """The overview's (and the Usage page's) Errors card counts every request that did not end well and says what they were: answers of
    5xx (a 504 too), refused ones of 400 to 499 (an upstream's 429), clients that left (499), broken streams and
    the gateway's own limits' refusals (before, one red count of them all, a client's cancel read as the gateway's failure)."""
    from gomodel.store.records import USAGE_FIELDS

    master = "gm-dash-" + secrets.token_urlsafe(16)
    async with _own_gateway(reactor, tmp_path, master, {"GOMODEL_MASTER_KEY": master}) as (gw, b):
        base = dict.fromkeys(USAGE_FIELDS)
        base.update(timestamp=time.time(), provider="vllm", provider_name="vllm", replica=0, model=MODEL,
                    endpoint="/v1/chat/completions", status_code=200, stream=False, input_tokens=3, output_tokens=1,
                    total_tokens=4, client_gone=False, estimated=False, outcome="ok", duration_ms=40)
        kinds = [("ok-1", 200, "ok"), ("ok-2", 200, "ok"), ("ok-3", 200, "ok"), ("bad", 400, "error"),
                 ("limited", 429, "error"), ("timeout", 504, "error"), ("gone", 499, "client_gone"),
                 ("over", 429, "refused")]
        await gw.service.store.usage.add([tuple(dict(base, request_id=rid, status_code=status, outcome=outcome,
                                                     client_gone=outcome == "client_gone")[name]
                                                for name in USAGE_FIELDS) for rid, status, outcome in kinds])

        def overview():
            b.sign_in()
            b.go("overview")
            b.wait_text("#card-requests .card-value", lambda t: t == "8", "the 8 requests")
            assert b.text_of("#card-errors .card-value") == "5"
            assert b.text_of("#card-errors .card-detail") == (
                "62.5% of requests · 1 server (5xx) · 2 refused (4xx) · 1 client left (499) · "
                "1 over the gateway's limits (429)")
            b.go("usage")  # (its Errors card says the same, of its window: before, one count of them all)
            b.wait_text("#usage-totals .card-detail", lambda t: t == "1 server (5xx) · 2 refused (4xx) · "
                        "1 client left (499) · 1 over the gateway's limits (429)", "the usage page's errors by kind")
            # Its group table (by model) says the refused among each row's errors, as the API's rows have them
            # (before, no column: usage/keys counted a key's refusals, its table never showed them).
            b.wait(lambda d: b.texts("#usage-table td[data-label='Refused']") == ["1"], "the model's refused")
            assert (b.texts("#usage-table td[data-label='Requests']"), b.texts(
                "#usage-table td[data-label='Errors']")) == (["8"], ["5"])
            b.click("button[data-group='key']")
            b.wait(lambda d: "Key" in b.texts("#usage-table th"), "the keys' table")
            assert b.texts("#usage-table td[data-label='Refused']") == ["1"]
            b.assert_clean()

        await in_thread(overview)

async def _summary_today(gw, key, zone=None):
    headers = {"authorization": f"Bearer {key}"}
    if zone:
        headers["x-gomodel-timezone"] = zone
    return await (await treq.get(gw.url + "/admin/api/v1/usage/summary?days=1", headers=headers)).json()


async def _usage_in_the_browsers_zone(reactor, tmp_path, zone, offset):
    """The usage page's "Today", its dates and the request log's times, and the overview's days and hours, in a
    browser in C{zone} (UTC C{offset}, as "+05:30"): those of the API asked for that zone (again, on a gateway and
    in a folder of their own, when the zone's day ended under it)."""
    attempts = iter(("first", "again"))
    await within_one_day(ZoneInfo(zone), lambda: _usage_in_the_zone_today(reactor, tmp_path / next(attempts), zone,
                                                                          offset))


async def _usage_in_the_zone_today(reactor, tmp_path, zone, offset):
    tmp_path.mkdir()
    master = "gm-dash-" + secrets.token_urlsafe(16)
    async with _own_gateway(reactor, tmp_path, master, {"GOMODEL_MASTER_KEY": master}) as (gw, b):
        midnight = await _across_midnight(gw, zone)
        there, utc = await _summary_today(gw, master, zone), await _summary_today(gw, master)
        assert (there["requests"], there["input_tokens"]) == (1, 20000)
        assert utc["input_tokens"] in (0, 21000)  # (UTC's today holds both records or neither)
        answer = await treq.get(gw.url + "/admin/api/v1/usage/timeseries?window=month",
                                headers={"authorization": f"Bearer {master}", "x-gomodel-timezone": zone})
        month = (await answer.json())["data"]

        def page():
            b.driver.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": zone})
            b.sign_in()
            named = b.js("return Intl.DateTimeFormat().resolvedOptions().timeZone")
            b.go("usage")
            b.wait(lambda d: b.one("#usage-days").get_attribute("value") == "7", "the 7-day window")
            from selenium.webdriver.support.ui import Select

            Select(b.one("#usage-days")).select_by_value("1")
            assert Select(b.one("#usage-days")).first_selected_option.text == "Today"
            b.wait_text("#usage-range", lambda t: t.startswith(there["start"]), "today's date there")
            assert b.text_of("#usage-range") == f"{there['start']} – {there['end']} (days in {named})"
            cards = dict(zip(b.texts("#usage-totals .card-title"), b.texts("#usage-totals .card-value")))
            assert (cards["Requests"], cards["Input tokens"]) == ("1", "20,000")
            b.wait(lambda d: b.texts("#log-table .request-id") == ["today-there"], "today's record there")
            shown = midnight.strftime("%Y-%m-%d 00:00:00") + f" UTC{offset}"
            assert b.texts("#log-table td[data-label='Time']") == [shown]
            # dates picked are the zone's: yesterday there holds the record a minute before its midnight
            Select(b.one("#usage-days")).select_by_value("custom")
            yesterday = (midnight.date() - timedelta(days=1)).isoformat()
            for field in ("#usage-start", "#usage-end"):
                b.js("arguments[0].value = arguments[1]", b.one(field), yesterday)
            b.click("#usage-days ~ .dates button")
            b.wait_text("#usage-range", lambda t: t == f"{yesterday} – {yesterday} (days in {named})", "yesterday")
            b.wait(lambda d: b.texts("#log-table .request-id") == ["yesterday-there"], "yesterday's record there")
            cards = dict(zip(b.texts("#usage-totals .card-title"), b.texts("#usage-totals .card-value")))
            assert (cards["Requests"], cards["Input tokens"]) == ("1", "1,000")
            Select(b.one("#usage-days")).select_by_value("7")

            b.go("overview")
            b.click("button[data-window='month']")
            chart = "return Chart.getChart(document.querySelector('#chart-traffic canvas')).data"
            b.wait(lambda d: len(b.js(chart)["labels"]) == 30, "the month window, a day each")
            data = b.js(chart)
            assert data["labels"] == [p["period"][5:10] for p in month]
            assert data["labels"][-1] == midnight.strftime("%m-%d")
            assert data["datasets"][0]["data"][-2:] == [1, 1]  # (each record in its own day there)
            hour = "const d = new Date(); return String(d.getHours()).padStart(2, '0') + ':00'"  # (the page's)
            before = b.js(hour)
            b.click("button[data-window='day']")  # the zone's hours: on the hour there, in Kolkata too
            b.wait(lambda d: len(b.js(chart)["labels"]) == 24, "the day window, an hour each")
            hours = b.js(chart)["labels"]
            assert all(h.endswith(":00") for h in hours), hours
            assert hours[-1] in (before, b.js(hour)), (hours, before)  # (drawn in between: an hour may have begun)
            b.assert_clean()

        await in_thread(page)


@pytest_twisted.ensureDeferred
async def test_today_is_the_browsers_day_east_of_utc_by_a_half_hour(reactor, tmp_path):
    """In Asia/Kolkata (+05:30) the usage page's "Today" is Kolkata's day (its totals are the API's for that zone,
    which UTC's are not), its range names the zone, the log shows Kolkata's time, and the overview's days and hours
    are Kolkata's (before: "Today (UTC)", "(UTC days)", UTC times, and hour bars labelled half past)."""
    await _usage_in_the_browsers_zone(reactor, tmp_path, "Asia/Kolkata", "+05:30")


@pytest_twisted.ensureDeferred
async def test_today_is_the_browsers_day_west_of_utc(reactor, tmp_path):
    """The same in America/New_York (-05:00 in December, -04:00 in summer)."""
    offset = datetime.now(ZoneInfo("America/New_York")).strftime("%z")
    await _usage_in_the_browsers_zone(reactor, tmp_path, "America/New_York", f"{offset[:3]}:{offset[3:]}")


@pytest_twisted.ensureDeferred
async def test_a_time_zone_the_gateway_does_not_know_shows_utc_days(reactor, tmp_path):
    """A browser's zone name the gateway's time zone database lacks (one newer than its tzdata, say) is refused with
    a 400 naming X-GoModel-Timezone: the dashboard asks again without it and says the days are UTC's, rather than
    showing the error on every usage view."""
    attempts = iter(("first", "again"))
    await within_one_day(ZoneInfo("UTC"), lambda: _an_unknown_zone_today(reactor, tmp_path / next(attempts)))


async def _an_unknown_zone_today(reactor, tmp_path):
    tmp_path.mkdir()
    master = "gm-dash-" + secrets.token_urlsafe(16)
    async with _own_gateway(reactor, tmp_path, master, {"GOMODEL_MASTER_KEY": master}) as (gw, b):
        await _across_midnight(gw, "UTC")
        utc = await _summary_today(gw, master)

        def page():
            b.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
                "const resolved = Intl.DateTimeFormat.prototype.resolvedOptions;"
                "Intl.DateTimeFormat.prototype.resolvedOptions = function () {"
                "  return Object.assign(resolved.call(this), {timeZone: 'Mars/Olympus'}); };")})
            b.sign_in()
            b.go("usage")
            from selenium.webdriver.support.ui import Select

            Select(b.one("#usage-days")).select_by_value("1")
            b.wait_text("#usage-range", lambda t: t == f"{utc['start']} – {utc['end']} (UTC days)", "UTC's today")
            cards = dict(zip(b.texts("#usage-totals .card-title"), b.texts("#usage-totals .card-value")))
            assert (cards["Requests"], cards["Input tokens"]) == ("1", "20,000")
            b.wait(lambda d: b.texts("#log-table .request-id") == ["today-there"], "today's record")
            assert not b.all("#usage-messages .note-error")
            entries, violations = b.logs()  # (the refused zone's 400)
            assert not violations and entries and all("400" in e["message"] for e in entries), entries

        await in_thread(page)


@pytest_twisted.ensureDeferred
async def test_dates_picked_but_not_applied_leave_every_view_on_the_window_shown(reactor, tmp_path):
    """Picking "Dates…" only opens the date fields: until Apply, the tables, the log and their CSVs stay of the
    window the range and the totals show (before, a tab or a filter then read the API's default 30 days: a table of
    a record three weeks old under a range and totals of the last 7 days)."""
    master = "gm-dash-" + secrets.token_urlsafe(16)
    async with _own_gateway(reactor, tmp_path, master, {"GOMODEL_MASTER_KEY": master}) as (gw, b):
        now = time.time()
        await _add_usage(gw, [("this-week", now, 10), ("weeks-ago", now - 20 * 86400, 20)])

        def page():
            from selenium.webdriver.support.ui import Select

            b.driver.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": "UTC"})
            b.sign_in()
            b.go("usage")
            b.wait(lambda d: b.texts("#log-table .request-id") == ["this-week"], "the last 7 days' record")
            shown = b.text_of("#usage-range")
            Select(b.one("#usage-days")).select_by_value("custom")
            b.click("button[data-group='provider']")
            b.wait(lambda d: "Provider" in b.texts("#usage-table th"), "the providers' table")
            assert b.texts("#usage-table td[data-label='Requests']") == ["1"]
            b.js("document.querySelector('#log-table').replaceChildren()")
            b.click("#log-filters button[type=submit]")
            b.wait(lambda d: b.texts("#log-table .request-id"), "the log read again")
            assert b.texts("#log-table .request-id") == ["this-week"]
            assert b.text_of("#usage-range") == shown
            # applied, the dates are the window of every view
            today = datetime.now(ZoneInfo("UTC")).date()
            for field, value in (("#usage-start", today - timedelta(days=25)), ("#usage-end", today)):
                b.js("arguments[0].value = arguments[1]", b.one(field), value.isoformat())
            b.click("#usage-days ~ .dates button")
            b.wait(lambda d: sorted(b.texts("#log-table .request-id")) == ["this-week", "weeks-ago"], "both records")
            b.wait(lambda d: b.texts("#usage-table td[data-label='Requests']") == ["2"], "both in the table")
            # reversed dates, or none (the API's default 30 days), are refused: the window and its figures stay,
            # said to be (before, an error over the last window's totals, or 30 days without a word)
            applied = b.wait_text("#usage-range", lambda t: t.startswith((today - timedelta(days=25)).isoformat()),
                                  "the dates' range")
            for field, value in (("#usage-start", today), ("#usage-end", today - timedelta(days=1))):
                b.js("arguments[0].value = arguments[1]", b.one(field), value.isoformat())
            b.click("#usage-days ~ .dates button")
            said = b.wait_text("#usage-messages", lambda t: "not applied" in t, "the dates refused")
            assert "the start date is after the end date" in said and applied in said, said
            for field in ("#usage-start", "#usage-end"):
                b.js("arguments[0].value = ''", b.one(field))
            b.click("#usage-days ~ .dates button")
            said = b.wait_text("#usage-messages", lambda t: "pick a start date" in t, "no dates refused")
            assert len(b.all("#usage-messages .note-error")) == 1 and applied in said, said
            assert b.text_of("#usage-range") == applied
            assert b.texts("#usage-table td[data-label='Requests']") == ["2"]
            b.assert_clean()

        await in_thread(page)


@pytest_twisted.ensureDeferred
async def test_a_message_batch_older_than_a_batch_not_yet_loaded_waits_for_load_more(reactor, tmp_path):
    """The batches page reads 100 of each list (OpenAI's, Anthropic's) at a time: a message batch older than
    OpenAI's 101st batch is shown after Load more, with it, not at the end of the first 100 as if nothing came
    between them (before, it was, and the OpenAI batch newer than it was missing from the list)."""
    import anthropic

    from tests.stores import batch

    master = "gm-dash-" + secrets.token_urlsafe(16)
    async with _own_gateway(reactor, tmp_path, master, {"GOMODEL_MASTER_KEY": master}) as (gw, b):
        client = anthropic.Anthropic(base_url=gw.url, api_key=master, max_retries=0)
        message = await in_thread(client.messages.batches.create, requests=[{"custom_id": "a", "params": {
            "model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}}])
        now = int(time.time())
        await gw.service.store.batches.update(message.id, {"created_at": now - 1000})
        for i in range(101):  # (finished: never run)
            await gw.service.store.batches.add(batch(f"batch_old_{i:03}", "completed", created_at=now - 900 + i))

        def page():
            b.sign_in()
            b.go("batches")
            b.wait(lambda d: b.all("#batches-list .batch-row") and b.all(".pager button"), "the first 100 batches")
            ids = b.texts("#batches-list .batch-id")
            assert message.id not in ids and len(ids) == 100 and ids[-1] == "batch_old_001"
            b.click(".pager button")
            b.wait(lambda d: len(b.texts("#batches-list .batch-id")) == 102, "every batch")
            assert b.texts("#batches-list .batch-id")[-2:] == ["batch_old_000", message.id]
            assert not b.all(".pager button")
            b.assert_clean()

        await in_thread(page)


# (a script run before the page's own: the page's timers 25 times as fast, and how many times it fetched each path,
# in window.__asked)
FAST_TIMERS_AND_FETCHES_ASKED = """window.__asked = {};
const timerOfThePage = window.setInterval;
window.setInterval = (f, ms, ...args) => timerOfThePage(f, ms / 25, ...args);
const askOfThePage = window.fetch;
window.fetch = function (url, ...args) {
  const path = String(url).split("?")[0];
  window.__asked[path] = (window.__asked[path] || 0) + 1;
  return askOfThePage.call(this, url, ...args);
};"""


# -- on a PostgreSQL store that goes away (a gateway and a browser of their own) -----------------


async def _replica_down_shown(browser, fleet):
    """The overview's replicas card (2 / 2 shown) follows C{fleet}'s second replica going down; it is up again after."""
    await fleet[1].refuse()
    try:
        await in_thread(browser.wait_text, "#card-replicas .card-value", lambda t: t == "1 / 2",
                        "the replicas card following a replica down")
    finally:
        await fleet[1].accept()


@pytest_twisted.ensureDeferred
async def test_the_overview_shows_the_replicas_live_while_the_database_is_down(reactor, tmp_path, logged_errors):
    """Without the database the overview says why its usage is missing and still shows the replicas, live
    (before, one failed usage call left the replicas card out, or frozen at what it last showed)."""
    from gomodel.errors import StorageUnavailable
    from tests import postgres
    from tests.support import start_gateway

    postgres.require()
    database = postgres.create_database()
    fleet = await FakeFleet(reactor, 2).start()
    master = "gm-dash-" + secrets.token_urlsafe(16)
    gw = browser = None
    try:
        gw = await start_gateway(reactor, {
            "VLLM_BASE_URL": fleet.env_value, "GOMODEL_MASTER_KEY": master, "STORAGE_TYPE": "postgresql",
            "POSTGRES_URL": postgres.url(database), "GOMODEL_DATA_DIR": str(tmp_path),
            "REPLICA_HEALTH_INTERVAL": "300ms", "REPLICA_FAILURE_THRESHOLD": "1"})
        browser = await in_thread(Browser, gw.url, master, str(tmp_path))
        await in_thread(browser.sign_in)
        postgres.admin(f"ALTER DATABASE {database} ALLOW_CONNECTIONS false")
        postgres.kill_connections(database)

        def opened():
            browser.driver.refresh()  # the overview, opened afresh while the database is away
            browser.wait_text("#overview-messages", lambda t: "storage is unavailable" in t, "the store's error")
            browser.wait_text("#card-replicas .card-value", lambda t: t == "2 / 2", "the replicas card")

        await in_thread(opened)
        await _replica_down_shown(browser, fleet)
        entries, violations = await in_thread(browser.logs)
        assert not violations and all("503" in e["message"] for e in entries), entries
    finally:
        postgres.admin(f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")
        if browser is not None:
            await in_thread(browser.close)
        if gw is not None:
            await gw.service.stopService()
        await fleet.stop()
        postgres.drop_database(database)
        logged_errors.flush(StorageUnavailable)


# -- with a usage call the store holds (a gateway and a browser of their own) -------------------


class _HeldTimeseries:
    """A gateway's usage store whose C{timeseries} waits until L{release} (a database slow to answer: up to the
    PostgreSQL pool's 5 s timeout, say); the rest is the store's own."""

    def __init__(self, usage):
        self._usage = usage
        self.waiting = []  # a Deferred for each call held; None once released

    def __getattr__(self, name):
        return getattr(self._usage, name)

    def timeseries(self, *args):
        if self.waiting is None:
            return self._usage.timeseries(*args)
        held = Deferred()
        self.waiting.append(held)
        return held.addCallback(lambda _: self._usage.timeseries(*args))

    def release(self):
        """Let the calls held go on, and every call from now on at once."""
        waiting, self.waiting = self.waiting, None
        for held in waiting:
            held.callback(None)


@pytest_twisted.ensureDeferred
async def test_the_overview_draws_the_replicas_while_its_usage_call_is_on_its_way(reactor, tmp_path):
    """Each of the overview's calls is drawn as it answers: while its usage call waits on the store, the replicas
    card is drawn and follows a replica going down, the page says it waits for an answer, and no second usage call
    is sent; once the store answers, the usage cards are drawn and the page is live (before, the two calls were
    awaited together: with the database away, the replicas card waited up to the pool's 5 s every refresh)."""
    master = "gm-dash-" + secrets.token_urlsafe(16)
    fleet = await FakeFleet(reactor, 2).start()
    settings = {"GOMODEL_MASTER_KEY": master, "REPLICA_HEALTH_INTERVAL": "300ms", "REPLICA_FAILURE_THRESHOLD": "1"}
    try:
        async with _own_gateway(reactor, tmp_path, master, settings, fleet) as (gw, browser):
            store = gw.service.store
            store.usage = held = _HeldTimeseries(store.usage)  # (before the admin API is made, at its first call)

            def opened():
                browser.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                               {"source": FAST_TIMERS_AND_FETCHES_ASKED})
                browser.sign_in()
                browser.wait_text("#card-replicas .card-value", lambda t: t == "2 / 2", "the replicas card")

            await in_thread(opened)
            await _replica_down_shown(browser, fleet)
            assert len(held.waiting) == 1
            assert await in_thread(browser.js, "return window.__asked['/admin/api/v1/usage/timeseries']") == 1
            assert await in_thread(browser.all, "#card-requests") == []
            assert await in_thread(browser.text_of, "#overview-live") == WAITING
            held.release()

            def answered():
                browser.wait_text("#card-requests .card-value", lambda t: t == "0", "the usage cards")
                browser.wait_text("#overview-live", lambda t: t.startswith("Live"), "the overview live")
                browser.assert_clean()

            await in_thread(answered)
    finally:
        await fleet.stop()


# -- with the usage ledger off (a gateway and a browser of their own) -----------------------------

# (a script run before the page's own: the answers of its usage/timeseries fetches held in window.__usageHeld, each
# given to the page when the test calls it)
HOLD_USAGE_ANSWERS = """window.__usageHeld = [];
const fetchUnheld = window.fetch;
window.fetch = function (url, ...args) {
  const answer = fetchUnheld.call(this, url, ...args);
  if (!String(url).includes("/usage/timeseries")) return answer;
  return new Promise((resolve, reject) => window.__usageHeld.push(() => answer.then(resolve, reject)));
};"""


@pytest_twisted.ensureDeferred
async def test_with_usage_off_the_overview_says_so_once_and_stops_asking(reactor, tmp_path):
    """With C{USAGE_ENABLED=false} the overview learns from the first 404 C{usage_disabled} that the ledger is off,
    says so plainly (no usage cards, no empty charts) and asks only for the replicas from then on (before, it asked
    for the usage every refresh, a 404 in the console each time, and showed the 404's message as an error), also
    when that 404 comes after a refresh or two (asked for again meanwhile, the usage is not asked again once off)."""
    master = "gm-dash-" + secrets.token_urlsafe(16)
    async with _own_gateway(reactor, tmp_path, master, {"GOMODEL_MASTER_KEY": master, "USAGE_ENABLED": "false"}) \
            as (_, browser):
        asked = "return window.__asked['/admin/api/v1/providers/status'] || 0"

        def overview():
            browser.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                           {"source": FAST_TIMERS_AND_FETCHES_ASKED})
            browser.sign_in()
            browser.wait_text("#overview-messages", lambda t: "usage ledger is off" in t, "the overview's first read")
            browser.logs()  # (its 404)
            browser.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": HOLD_USAGE_ANSWERS})
            browser.driver.refresh()  # the overview again, counted from its start, its usage call's answer held
            browser.wait(lambda d: browser.js(asked) >= 3, "two refreshes while the usage call is on its way")
            released = browser.js(f"window.__usageHeld.forEach((answer) => answer()); {asked}")
            browser.wait_text("#overview-messages", lambda t: "usage ledger is off" in t, "the ledger said off")
            browser.wait(lambda d: browser.js(asked) >= released + 3, "three refreshes after its answer")
            assert browser.js("return window.__asked['/admin/api/v1/usage/timeseries']") == 1
            assert browser.texts("#overview-messages .note-error") == []
            assert browser.text_of("#card-replicas .card-value") == "1 / 1"
            assert browser.texts("#overview-cards .card-title") == ["Replicas ready"]
            assert browser.js("return document.querySelector('#page-overview .charts').offsetParent") is None
            assert "Live" in browser.text_of("#overview-live")
            entries, violations = browser.logs()  # the one 404 it learnt from
            assert not violations and len(entries) == 1 and "404" in entries[0]["message"], entries

        await in_thread(overview)


# -- on a phone, in each state the overview goes through (a gateway and a browser of their own) ---------------

# (a script run before the page's own: what each ResizeObserver sees held in window.__resizesHeld, each given to it when
# the test calls it: the charts stay at the size they were drawn at, as for the frame or two after a screen's width
# changed in which Chart.js has not yet resized them)
HOLD_RESIZES = """window.__resizesHeld = [];
const ResizeObserverOfThePage = window.ResizeObserver;
window.ResizeObserver = class extends ResizeObserverOfThePage {
  constructor(seen) {
    super((...args) => window.__resizesHeld.push(() => seen(...args)));
  }
};"""


@pytest_twisted.ensureDeferred
async def test_the_overview_fits_a_phone_in_each_state_before_its_charts_are_resized(reactor, tmp_path):
    """The overview opened wide and then shown on a 390 px screen fits it before its charts are resized to it (Chart.js
    does so a frame or two later), with the replicas card alone while the usage call is on its way, then said late
    ("Not updated"), and with every card (before, a chart drawn at the wide page's 3-column width made the page 401 px
    wide: test_every_page_fits_a_phone failed when it measured the page in those frames)."""
    master = "gm-dash-" + secrets.token_urlsafe(16)
    async with _own_gateway(reactor, tmp_path, master, {"GOMODEL_MASTER_KEY": master}) as (_, browser):
        width = "return document.documentElement.scrollWidth"
        # the charts still at the wide page's size: each wider than its box
        unresized = ("return [...document.querySelectorAll('.chart-box')]"
                     ".every((box) => box.querySelector('canvas').offsetWidth > box.clientWidth)")

        def overview():
            for script in (FAST_TIMERS_AND_FETCHES_ASKED, HOLD_USAGE_ANSWERS, HOLD_RESIZES):
                browser.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": script})
            browser.sign_in()  # (the overview, at the browser's 1280 px)
            browser.wait_text("#card-replicas .card-value", lambda t: t == "1 / 1", "the replicas card")
            browser.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                           {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
            try:
                assert browser.js("return window.__usageHeld.length") == 1
                assert browser.js(unresized)
                assert browser.js(width) <= 390, "the replicas card alone"
                browser.wait_text("#overview-live", lambda t: t == WAITING, "the usage call said late")
                assert browser.js(width) <= 390, "the usage call said late"
                browser.js("window.__usageHeld.forEach((answer) => answer())")  # (the next usage call is held again)
                browser.wait(lambda d: browser.all("#card-requests"), "the usage cards")
                assert browser.js(unresized)
                assert browser.js(width) <= 390, "every card"
                browser.js("window.__resizesHeld.forEach((seen) => seen())")
                browser.wait(lambda d: not browser.js("return [...document.querySelectorAll('.chart-box')]"
                                                      ".some((box) => box.querySelector('canvas').offsetWidth"
                                                      " > box.clientWidth)"), "the charts resized")
                assert browser.js(width) <= 390, "the charts resized"
            finally:
                browser.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
            browser.assert_clean()

        await in_thread(overview)


@pytest_twisted.ensureDeferred
async def test_with_usage_off_the_usage_page_says_so_instead_of_empty_tables(reactor, tmp_path):
    """With C{USAGE_ENABLED=false} the usage page says plainly that the ledger is off and how to turn it on, with no
    tables, filters or CSV buttons that cannot work (before, the 404's message as an error above empty panels)."""
    master = "gm-dash-" + secrets.token_urlsafe(16)
    async with _own_gateway(reactor, tmp_path, master, {"GOMODEL_MASTER_KEY": master, "USAGE_ENABLED": "false"}) \
            as (_, browser):

        def usage():
            browser.sign_in()
            browser.wait_text("#overview-messages", lambda t: "usage ledger is off" in t, "the overview's read")
            browser.logs()  # (the overview's 404)
            browser.go("usage")
            browser.wait_text("#usage-messages .note-info", lambda t: "usage ledger is off" in t, "the ledger off")
            assert "USAGE_ENABLED=true" in browser.text_of("#usage-messages")
            assert browser.texts("#usage-messages .note-error") == []
            assert not browser.all("#log-filters") and not browser.all("#usage-csv")
            entries, violations = browser.logs()  # the one 404 it learnt from
            assert not violations and len(entries) == 1 and "404" in entries[0]["message"], entries

        await in_thread(usage)


@pytest_twisted.ensureDeferred
async def test_with_budgets_off_the_budgets_page_says_so_and_how_to_turn_them_on(reactor, tmp_path):
    """With C{BUDGETS_ENABLED=false} the budgets page says plainly that budgets are off and how to turn them on
    (before, the 404's message as an error, as if the page had failed)."""
    master = "gm-dash-" + secrets.token_urlsafe(16)
    async with _own_gateway(reactor, tmp_path, master, {"GOMODEL_MASTER_KEY": master, "BUDGETS_ENABLED": "false"}) \
            as (_, browser):

        def budgets():
            browser.sign_in()
            browser.wait_text("#overview-messages", lambda t: "No requests" in t, "the overview's read")
            browser.go("budgets")
            browser.wait_text("#budgets-messages .note-info", lambda t: "Budgets are off" in t, "budgets off")
            assert "BUDGETS_ENABLED=true" in browser.text_of("#budgets-messages")
            assert browser.texts("#budgets-messages .note-error") == []
            entries, violations = browser.logs()  # the one 404 it learnt from
            assert not violations and len(entries) == 1 and "404" in entries[0]["message"], entries

        await in_thread(budgets)



@pytest_twisted.ensureDeferred
async def test_with_budgets_off_a_keys_budgets_are_said_not_to_be_enforced(reactor, tmp_path):
    """With C{BUDGETS_ENABLED=false} a key's budgets are listed with their caps, said not to be enforced (before, an
    empty bar, as if the key had spent nothing of a budget the gateway enforces)."""
    master = "gm-dash-" + secrets.token_urlsafe(16)
    async with _own_gateway(reactor, tmp_path, master, {"GOMODEL_MASTER_KEY": master, "BUDGETS_ENABLED": "false"}) \
            as (gw, browser):
        answer = await treq.post(gw.url + "/admin/api/v1/auth-keys", headers={"authorization": f"Bearer {master}"},
                                 json={"name": "capped", "budgets": [{"period": "daily", "max_tokens": 1000}]})
        assert answer.code == 201, await answer.text()

        def keys():
            browser.sign_in()
            browser.go("keys")
            budget = browser.wait_text("tr.key-row .budget", lambda t: "daily" in t, "the key's budget")
            assert budget == "daily: 1,000 tokens · not enforced (BUDGETS_ENABLED=false)"
            assert not browser.all("tr.key-row .budget progress")
            # a reset is said to count once budgets are on (before, "counts from now", as if enforced)
            browser.one("tr.key-row").find_element("xpath", ".//button[text()='Reset budgets']").click()
            browser.one("tr.key-row").find_element("xpath", ".//button[text()='Confirm reset']").click()
            said = browser.wait_text("#keys-messages", lambda t: "reset" in t, "the reset")
            assert "not enforced (BUDGETS_ENABLED=false)" in said and "counts from now" not in said, said
            browser.assert_clean()

        await in_thread(keys)
