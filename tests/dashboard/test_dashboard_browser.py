"""The dashboard in a real browser (headless Chromium through chromedriver, selenium): the grid shows the students'
states, follows a change in the state store without a reload, and shows a hostile student id as text.

Runs wherever Chromium and chromedriver are installed (CI installs them: .ci/run); skipped, saying so, elsewhere.
Waits are WebDriverWait on a condition of the page (it polls every 0.2 s here), never fixed sleeps.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from tests.dashboard.conftest import HOSTILE_ERROR, HOSTILE_ID, add_student

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)",
)
WAIT = 20  # seconds at most for the page to show a change; it polls every 0.2 s


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-extensions", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# Read in one script: the page re-renders on every poll, so reading element by element through WebDriver could
# mix two renders (or hold an element the next render replaced); one script runs between two renders.
READ_PAGE = """
const all = (sel) => Array.from(document.querySelectorAll(sel));
const text = (e) => e.innerText;
return {
  tiles: Object.fromEntries(all("#grid .tile").map((t) => [text(t.querySelector(".sid")),
    {state: t.dataset.state, classes: t.className.split(" "), shown: text(t.querySelector(".state"))}])),
  failures: all("#failures tr").map((r) => Array.from(r.cells).map(text)),
  timeline: all("#timeline .tl-id").map(text),
  sites: Object.fromEntries(all("#sites tr").map((r) => [text(r.cells[0]), text(r)])),
  foreign: all("img, script, b, i, iframe, svg").length,
  summary: text(document.getElementById("summary")),
  conn: document.getElementById("conn").className,
  noFailures: document.getElementById("no-failures").hidden,
  updates: Number(document.body.dataset.updates || 0),
  title: document.title,
  marker: window.__not_reloaded,
};
"""


def page(driver: Any) -> dict[str, Any]:
    return driver.execute_script(READ_PAGE)


def test_grid_updates_live_and_shows_hostile_ids_as_text(browser: Any, served: Any, ctx: Any) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    store = ctx.store
    add_student(store, "alice", "sim", "up", lease_end="2030-01-01T00:00:00Z")
    bob = add_student(store, "bob", "aws:us-east-1", "applying", node_types=("t3.micro",))
    add_student(store, HOSTILE_ID, "sim", "failed", error=HOSTILE_ERROR)

    browser.get(served.url)
    WebDriverWait(browser, WAIT).until(lambda d: len(page(d)["tiles"]) == 3)
    seen = page(browser)
    assert {sid: t["state"] for sid, t in seen["tiles"].items()} == {
        "alice": "up", "bob": "applying", HOSTILE_ID: "failed"}
    assert "st-up" in seen["tiles"]["alice"]["classes"] and "st-applying" in seen["tiles"]["bob"]["classes"]
    assert "st-failed" in seen["tiles"][HOSTILE_ID]["classes"] and seen["tiles"]["alice"]["shown"] == "up"

    # The hostile id and error are shown as text: the only script is the page's own, no element of theirs exists,
    # their handler did not run.
    assert seen["foreign"] == 1
    assert seen["title"].startswith("labctl class dashboard") and "pwned" not in seen["title"]
    assert seen["failures"] == [[HOSTILE_ID, "sim", HOSTILE_ERROR]] and seen["noFailures"] is True
    # The lease timeline has alice's end; the site table has bob's price per hour.
    assert seen["timeline"] == ["alice"]
    assert set(seen["sites"]) == {"aws:us-east-1", "sim"} and "USD/h" in seen["sites"]["aws:us-east-1"]

    # The store changes (as `class up` writes it); the same page, not reloaded, follows.
    browser.execute_script("window.__not_reloaded = 42;")
    store.set_deployment_status(bob, "failed", error="NoCapacity: no t3.micro in us-east-1a")
    WebDriverWait(browser, WAIT).until(lambda d: page(d)["tiles"]["bob"]["state"] == "failed")
    seen = page(browser)
    assert "st-failed" in seen["tiles"]["bob"]["classes"]
    assert ["bob", "aws:us-east-1", "NoCapacity: no t3.micro in us-east-1a"] in seen["failures"]
    assert "failed: 2" in seen["summary"] and seen["conn"] == "ok"
    assert seen["marker"] == 42 and seen["updates"] >= 2

    # No console errors (a CSP refusal of the page's own script or style would show here).
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
