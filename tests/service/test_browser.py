"""The job pages in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium against a real `bitplan serve`. It opens the job list,
follows a job, submits a re-plan through the page's form and waits for the new job's page to
show its plan. Screenshots are kept in ``test-artifacts/`` (or ``$BITPLAN_TEST_ARTIFACTS``)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from svc_helpers import FAST_HESSIAN, ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
    "chromium-driver)",
)
ARTIFACTS = Path(os.environ.get("BITPLAN_TEST_ARTIFACTS", ROOT / "test-artifacts"))


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1600"):
        options.add_argument(arg)
    os.environ.setdefault("SE_AVOID_STATS", "true")  # no usage report (no network here)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_for(driver, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in driver.page_source:
            return
        time.sleep(0.5)  # the page refreshes itself while the job runs
    raise AssertionError(f"{text!r} not on {driver.current_url} after {timeout} s")


def test_replan_through_the_page(start_server, mlp_pt2, calib_path, browser) -> None:
    from selenium.webdriver.common.by import By

    server = start_server()
    cons = {"hessian": FAST_HESSIAN, "limits": {"size_ratio": 0.8},
            "pin": {"first": None, "last": 8}}
    parent = server.submit(mlp_pt2, calib_path, cons)
    assert server.wait(parent)["status"] == "succeeded"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    browser.get(f"{server.url}/ui")
    assert "Jobs" in browser.title
    browser.find_element(By.LINK_TEXT, parent[:12]).click()
    _wait_for(browser, "Re-plan with other limits")
    assert browser.find_element(By.CSS_SELECTOR, "table.plan")  # the plan table is rendered
    images = browser.find_elements(By.CSS_SELECTOR, "figure img")
    assert images and all(browser.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", img)
        for img in images)  # the plots load (same-origin, through the page's session)
    browser.save_screenshot(str(ARTIFACTS / "ui-job.png"))

    box = browser.find_element(By.NAME, "constraints")
    box.clear()
    box.send_keys(json.dumps({**cons, "limits": {"size_ratio": 0.6}}))
    browser.find_element(By.CSS_SELECTOR, "form.replan button").click()
    _wait_for(browser, "re-plan of")
    child = browser.current_url.rstrip("/").rsplit("/", 1)[1]
    assert child != parent and len(child) == 32
    _wait_for(browser, "succeeded")
    _wait_for(browser, "bits.svg")
    # the worker kept the parent's loaded model, and the sensitivity comes from the cache
    assert "reused: loaded model, sensitivity" in browser.page_source
    browser.save_screenshot(str(ARTIFACTS / "ui-replan.png"))
    job = server.client.get(f"/jobs/{child}").json()
    assert job["parent_id"] == parent and job["status"] == "succeeded"
    assert job["summary"]["limits"]["size_bytes"] < server.client.get(
        f"/jobs/{parent}").json()["summary"]["limits"]["size_bytes"]
