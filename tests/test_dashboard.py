"""/dashboard in a real headless browser (Debian's chromium + chromium-driver through selenium)
against `afdserve serve --afd 1A1F` on the tiny preset: the page loads without console errors,
its numbers match /metrics, and the AFD pipeline timeline appears under load. Skipped when no
browser or driver is installed (`make test` installs them where apt-get is available)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from afdserve.afd.executor import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium / chromedriver not installed")]

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1500")


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("dash") / "server.log"
    cmd = [sys.executable, "-m", "afdserve", "serve", "--model", str(tiny_ckpt), "--afd", "1A1F",
           "--micro-batches", "2", "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
           "--log-level", "warning", "--num-kv-blocks", "64", "--max-model-len", "128"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()




def _metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value        # summed over labels
    return out


def _text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def _complete(url: str, i: int) -> dict:
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": None, "prompt": [5 + i, 6, 7, 8, 9], "max_tokens": 24, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_dashboard_live_in_a_browser(server, browser):
    browser.get(server + "/dashboard")
    assert browser.title == "afdserve dashboard"
    _wait(lambda: int(browser.find_element("tag name", "body").get_attribute("data-updates") or 0) >= 1,
          30, "the first refresh")
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(_complete, server, i) for i in range(6)]
        # under load, the AFD pipeline of the latest step is drawn
        _wait(lambda: browser.find_element("id", "pipeline-card").get_attribute("data-step"), 60,
              "the pipeline timeline")
        results = [f.result() for f in futures]
    assert all(r["usage"]["completion_tokens"] == 24 for r in results)
    canvas = browser.find_element("id", "c-pipeline")
    assert canvas.is_displayed() and canvas.size["height"] > 40
    rows = browser.find_elements("css selector", "#stage-table tr")
    assert [r.find_elements("tag name", "td")[0].text for r in rows[1:]] == ["attention 0", "ffn 0"]

    # the numbers on the page are the ones /metrics exports (once the load is over they hold still)
    def matches():
        m = _metrics(server)
        want = {"gen-total": str(int(m["afdserve_generation_tokens_total"])),
                "ttft-count": str(int(m["afdserve_time_to_first_token_seconds_count"])),
                "finished": str(int(m["afdserve_request_success_total"])),
                "running": str(int(m["afdserve_num_requests_running"])),
                "waiting": str(int(m["afdserve_num_requests_waiting"]))}
        got = {k: _text(browser, k) for k in want}
        return got if got == want and want["finished"] == "6" else None
    got = _wait(matches, 20, "the page to show the /metrics numbers")
    assert int(got["gen-total"]) >= 6 * 24
    assert _text(browser, "ttft-p50") != "-" and float(_text(browser, "tpot-p99")) > 0
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
    shot = os.environ.get("AFDSERVE_DASHBOARD_SCREENSHOT")
    if shot:
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(shot)
