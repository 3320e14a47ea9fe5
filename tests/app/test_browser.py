"""The search page in a real headless Chromium (Debian's chromium and chromium-driver, driven
by selenium; the README's test set-up installs them): upload a query, wait for the grid,
check its hits are the REST API's, draw a box, see the grid follow, click a hit, and save a
screenshot that is checked not to be blank (SCVNET_SCREENSHOT=path keeps a copy, e.g. for
the README)."""
import os
import shutil
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

import scvnet_jax as sj

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), (
        "the browser test needs Debian's chromium and chromium-driver: apt-get install "
        "chromium chromium-driver (see the README's test set-up)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _grid(driver):
    """[(path, score)] of the hits shown, read in one script (the grid may be replaced
    between two element lookups)."""
    return [(p, float(v)) for p, v in driver.execute_script(
        "return Array.from(document.querySelectorAll('#grid .hit')).map("
        "e => [e.dataset.path, e.querySelector('.score').textContent]);")]


def _wait_for_results(driver, previous=None, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        cls, text = d.execute_script("const s = document.getElementById('status');"
                                     "return [s.className, s.textContent];")
        assert cls != "error", text
        hits = _grid(d)
        return hits if " hits in " in text and hits and hits != previous else False
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(ready)


def _rest(base, query: Path, **params):
    with httpx.Client(base_url=base, timeout=120) as c:
        r = c.post("/api/search", params=params,
                   files={"image": (query.name, query.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    return [(h["path"], round(h["score"], 4)) for h in r.json()["hits"]]


def test_upload_box_click_and_screenshot(browser, live_server, searcher, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    driver = browser
    driver.get(live_server + "/")
    assert driver.title == "scvnet-search"
    query = sj.search.list_images(searcher.index.root)[6]
    driver.find_element("id", "file").send_keys(str(query))
    hits = _wait_for_results(driver)
    want = _rest(live_server, query, k=10)
    assert [p for p, _ in hits] == [p for p, _ in want]
    np.testing.assert_allclose([s for _, s in hits], [s for _, s in want], atol=1e-4)

    canvas = driver.find_element("id", "canvas")     # drag over the image's left half
    w, h = canvas.size["width"], canvas.size["height"]
    ActionChains(driver).move_to_element_with_offset(canvas, -w // 2 + 2, -h // 2 + 2) \
        .click_and_hold().move_by_offset(w // 2, h - 4).release().perform()
    boxed = _wait_for_results(driver, previous=hits)
    box = canvas.get_attribute("data-box")
    x1, y1, x2, y2 = map(int, box.split(","))
    assert x1 <= 4 and y1 <= 4 and x2 > 8 and y2 > 8, box
    want = _rest(live_server, query, k=10, box=box)
    assert [p for p, _ in boxed] == [p for p, _ in want]

    shot = tmp_path / "page.png"
    driver.save_screenshot(str(shot))
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[0] > 400 and image.shape[1] > 800
    assert image.std() > 20 and len(np.unique(image.reshape(-1, 3), axis=0)) > 1000
    if os.environ.get("SCVNET_SCREENSHOT"):
        shutil.copy(shot, os.environ["SCVNET_SCREENSHOT"])

    first = driver.find_elements("css selector", "#grid .hit")[1]   # search with a hit
    path = first.get_attribute("data-path")
    first.click()
    clicked = _wait_for_results(driver, previous=boxed)
    with httpx.Client(base_url=live_server, timeout=120) as c:
        ids = {p: i for i, p in enumerate(searcher.index.paths)}
        by_id = c.post("/api/search", params={"id": ids[path], "k": 10}).json()["hits"]
    assert [p for p, _ in clicked] == [hit["path"] for hit in by_id]


def test_page_and_docs_work_with_no_other_host(live_server, searcher):
    """Offline means offline: in a browser that cannot resolve any host but this one, the
    page searches and /docs shows the API, and nothing was requested from another host
    (the resource timing entries and the DevTools network log)."""
    import json

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        requested = []

        def requests_made():
            requested.extend(driver.execute_script(
                "return performance.getEntriesByType('resource').map(e => e.name);"))
            for entry in driver.get_log("performance"):
                message = entry["message"]
                if '"Network.requestWillBeSent"' in message:
                    requested.append(json.loads(message)["message"]["params"]["request"]
                                     ["url"])
        driver.get(live_server + "/")
        query = sj.search.list_images(searcher.index.root)[4]
        driver.find_element("id", "file").send_keys(str(query))
        assert _wait_for_results(driver)
        requests_made()
        driver.get(live_server + "/docs")
        requests_made()
        assert any(u.endswith("/static/app.js") for u in requested), requested
        elsewhere = [u for u in requested if not u.startswith((live_server, "data:", "blob:"))]
        assert not elsewhere, f"requested from another host: {elsewhere}"
        assert "API" in driver.find_element("tag name", "h1").text
        routes = [e.text for e in driver.find_elements("css selector", "section h2")]
        assert "POST /api/search" in routes and "GET /api/image/{id}" in routes, routes
    finally:
        driver.quit()
