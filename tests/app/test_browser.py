"""The search page in a real headless Chromium (Debian's chromium and chromium-driver, driven
by selenium; the README's test set-up installs them): upload a query, wait for the grid,
check its hits are the REST API's, draw a box, see the grid follow, search with a hit, and
save a screenshot that is checked not to be blank (SCVNET_SCREENSHOT=path keeps a copy, e.g.
for the README; the other tests keep theirs next to it: path-viewer.png, ...). Then the
thumbnails, the viewer, a 420-px-wide window, bad numbers, a failed upload, repeated file
names, a TIFF and a re-indexed collection."""
import os
import shutil
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

import scvnet_jax as sj
from scvnet_jax.app import server

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
    first.find_element("css selector", "button.use").click()
    clicked = _wait_for_results(driver, previous=boxed)
    with httpx.Client(base_url=live_server, timeout=120) as c:
        ids = {p: i for i, p in enumerate(searcher.index.paths)}
        by_id = c.post("/api/search", params={"id": ids[path], "k": 10}).json()["hits"]
    assert [p for p, _ in clicked] == [hit["path"] for hit in by_id]


def _wait(driver, script, timeout=60):
    """Waits until `script` (a JavaScript expression) is truthy; its value."""
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: d.execute_script("return " + script))


def _loaded(selector):
    """JavaScript: every image `selector` finds has loaded (and there is one)."""
    return (f"(() => {{ const a = Array.from(document.querySelectorAll('{selector}'));"
            " return a.length > 0 && a.every(i => i.complete && i.naturalWidth > 0); })()")


def _status(driver):
    return driver.execute_script("const s = document.getElementById('status');"
                                 "return [s.className, s.textContent];")


def _check_screenshot(driver, path: Path, suffix: str):
    driver.save_screenshot(str(path))
    image = cv2.imread(str(path))
    assert image is not None and image.std() > 20
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 1000
    if os.environ.get("SCVNET_SCREENSHOT"):
        shutil.copy(path, os.environ["SCVNET_SCREENSHOT"].replace(".png", suffix + ".png"))


def test_thumbnails_viewer_and_search_with_this(browser, live_server, searcher, tmp_path):
    """The grid shows thumbnails (no original is downloaded for it) and says what its
    scores are; a click opens the viewer (full image, path, score, the original file),
    Esc closes it, and "search with this" (in the viewer and on a tile) searches by id."""
    driver = browser
    driver.get(live_server + "/")
    query = sj.search.list_images(searcher.index.root)[4]
    driver.find_element("id", "file").send_keys(str(query))
    hits = _wait_for_results(driver)
    _wait(driver, _loaded("#grid .hit img"))
    srcs = driver.execute_script("return Array.from(document.querySelectorAll("
                                 "'#grid .hit img')).map(i => i.getAttribute('src'));")
    ids = {p: i for i, p in enumerate(searcher.index.paths)}
    v = server.index_version(searcher.index)           # the ids' index version goes along
    assert srcs == [f"/api/thumb/{ids[p]}?v={v}" for p, _ in hits]
    fetched = driver.execute_script("return performance.getEntriesByType('resource')"
                                    ".map(e => e.name);")
    assert not [u for u in fetched if "/api/image/" in u or "/api/original/" in u], fetched
    kind = driver.find_element("id", "scorekind").text
    assert "cosine similarity" in kind and "not a probability" in kind
    tile = driver.find_elements("css selector", "#grid .hit")[2]
    assert "cosine similarity" in tile.get_attribute("title")
    _check_screenshot(driver, tmp_path / "results.png", "")

    path, hit = tile.get_attribute("data-path"), int(tile.get_attribute("data-id"))
    tile.find_element("css selector", "img").click()           # the viewer
    viewer = driver.find_element("id", "viewer")
    assert viewer.is_displayed()
    _wait(driver, _loaded("#viewer-image"))
    width = driver.execute_script("return document.getElementById('viewer-image')"
                                  ".naturalWidth;")
    assert width == cv2.imread(path).shape[1]
    assert driver.find_element("id", "viewer-path").text == path
    assert driver.find_element("id", "viewer-score").text == f"score {hits[2][1]:.4f}"
    original = driver.find_element("id", "viewer-original").get_attribute("href")
    assert original == f"{live_server}/api/original/{hit}?v={v}"
    assert httpx.get(original).content == Path(path).read_bytes()
    _check_screenshot(driver, tmp_path / "viewer.png", "-viewer")
    from selenium.webdriver.common.keys import Keys
    driver.find_element("tag name", "body").send_keys(Keys.ESCAPE)
    _wait(driver, "document.getElementById('viewer').hidden")

    def by_id(i):
        with httpx.Client(base_url=live_server, timeout=120) as c:
            return [h["path"] for h in c.post("/api/search", params={"id": i, "k": 10})
                    .json()["hits"]]
    tile.click()                                     # the viewer's "search with this"
    driver.find_element("id", "viewer-search").click()
    assert not viewer.is_displayed()
    clicked = _wait_for_results(driver, previous=hits)
    assert [p for p, _ in clicked] == by_id(hit)
    other = driver.find_elements("css selector", "#grid .hit")[3]   # the tile's button
    other_id = int(other.get_attribute("data-id"))
    other.find_element("css selector", "button.use").click()
    assert not viewer.is_displayed()
    assert [p for p, _ in _wait_for_results(driver, previous=clicked)] == by_id(other_id)


def test_narrow_window_bad_numbers_and_failed_upload(browser, live_server, searcher,
                                                     tmp_path):
    """At 420 px nothing overflows (the page nor the viewer); an invalid k or rerank k is
    said, not silently blocked; rerank_k is sent only with a reranker; a failed upload
    empties the grid and says why."""
    driver = browser
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 420, "height": 860, "deviceScaleFactor": 1, "mobile": False})
    try:
        driver.get(live_server + "/")
        driver.execute_script("window._urls = []; const f = window.fetch; window.fetch ="
                              " (u, o) => { window._urls.push(String(u)); return f(u, o); };")
        query = sj.search.list_images(searcher.index.root)[9]
        driver.find_element("id", "file").send_keys(str(query))
        hits = _wait_for_results(driver)
        _wait(driver, _loaded("#grid .hit img"))
        assert driver.execute_script("return window.innerWidth;") == 420
        width = "return document.documentElement.scrollWidth;"
        assert driver.execute_script(width) <= 420
        _check_screenshot(driver, tmp_path / "narrow.png", "-narrow")
        driver.find_elements("css selector", "#grid .hit img")[0].click()
        _wait(driver, _loaded("#viewer-image"))
        assert driver.execute_script(width) <= 420
        _check_screenshot(driver, tmp_path / "narrow-viewer.png", "-narrow-viewer")
        driver.find_element("id", "viewer-close").click()
        assert not driver.find_element("id", "viewer").is_displayed()
        assert "rerank_k" not in driver.execute_script("return window._urls;")[-1]

        def set_value(id, value):
            driver.execute_script(f"document.getElementById('{id}').value = '{value}';")
            driver.find_element("id", "search").click()
        set_value("k", "0")                              # said, and nothing stale shown
        _wait(driver, "document.getElementById('status').className === 'error'")
        assert _status(driver)[1] == ("not searched: k must be a whole number from 1 to 1000"
                                      ' (got "0")')
        assert _grid(driver) == []
        set_value("k", "5")
        assert len(_wait_for_results(driver)) == 5
        from selenium.webdriver.support.ui import Select
        Select(driver.find_element("id", "rerank")).select_by_value("superglobal")
        set_value("rerank_k", "2000")
        _wait(driver, "document.getElementById('status').className === 'error'")
        assert "rerank k must be a whole number from 1 to 1000" in _status(driver)[1]
        set_value("rerank_k", "50")
        assert len(_wait_for_results(driver)) == 5
        assert "rerank_k=50" in driver.execute_script("return window._urls;")[-1]
        Select(driver.find_element("id", "rerank")).select_by_value("none")
        set_value("k", "10")
        assert [p for p, _ in _wait_for_results(driver)] == [p for p, _ in hits]

        broken = tmp_path / "broken.jpg"                 # a failed upload
        broken.write_bytes(b"this is not a photo")
        driver.find_element("id", "file").send_keys(str(broken))
        _wait(driver, "document.getElementById('status').className === 'error'")
        assert "broken.jpg: cannot read the image" in _status(driver)[1]
        assert _grid(driver) == [] and driver.find_element("id", "scorekind").text == ""
        assert not driver.find_element("id", "stage").is_displayed()
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_the_duplicates_view(browser, live_server, searcher, tmp_path):
    """Find duplicates: the page shows the REST API's groups, one row of loaded thumbnails
    each; a thumbnail opens the viewer; a bad threshold is said, not sent."""
    driver = browser
    driver.get(live_server + "/")
    field = driver.find_element("id", "dup_threshold")
    field.clear()
    field.send_keys("0.97")
    driver.find_element("id", "dupsearch").click()
    _wait(driver, "document.getElementById('dupstatus').textContent.includes('group(s)')")
    want = httpx.get(live_server + "/api/duplicates",
                     params={"threshold": 0.97, "k": 10}).json()["groups"]
    shown = driver.execute_script(
        "return Array.from(document.querySelectorAll('#dupgroups .dupgroup')).map("
        "g => Array.from(g.querySelectorAll('.hit')).map(h => Number(h.dataset.id)));")
    assert want and shown == [[im["id"] for im in g["images"]] for g in want]
    _wait(driver, _loaded("#dupgroups .hit img"))
    driver.execute_script("document.getElementById('dupes').scrollIntoView();")
    _check_screenshot(driver, tmp_path / "duplicates.png", "-duplicates")
    tile = driver.find_elements("css selector", "#dupgroups .hit")[0]
    tile.click()
    assert driver.find_element("id", "viewer").is_displayed()
    assert driver.find_element("id", "viewer-path").text == want[0]["images"][0]["path"]
    from selenium.webdriver.common.keys import Keys
    driver.find_element("tag name", "body").send_keys(Keys.ESCAPE)
    field.clear()
    field.send_keys("7")
    driver.find_element("id", "dupsearch").click()
    _wait(driver, "document.getElementById('dupstatus').className === 'error'")
    assert "from -1 to 1" in driver.find_element("id", "dupstatus").text


def test_the_page_asks_for_the_token_once(browser, searcher, serve):
    """A server with a token: the page shows no fact of the collection and asks for the
    token; a wrong one is said and asked again; the right one is kept (a cookie), so the
    facts appear, a search's thumbnails load, and after a reload nothing is asked."""
    driver = browser
    with serve(searcher, token="page-token") as url:
        driver.get(url + "/")
        driver.delete_all_cookies()
        driver.refresh()
        _wait(driver, "!document.getElementById('tokenform').hidden")
        assert driver.find_element("id", "facts").text == "\u2026"
        field = driver.find_element("id", "token")
        field.send_keys("not-it")
        driver.find_element("css selector", "#tokenform button").click()
        _wait(driver, "document.getElementById('tokenstatus').textContent.includes("
                      "'not accepted')")
        field.send_keys("page-token")
        driver.find_element("css selector", "#tokenform button").click()
        _wait(driver, "document.getElementById('tokenform').hidden")
        facts = _wait(driver, "document.getElementById('facts').textContent.includes("
                              "'images') && document.getElementById('facts').textContent")
        assert facts.startswith(f"{len(searcher.index)} images")
        query = sj.search.list_images(searcher.index.root)[2]
        driver.find_element("id", "file").send_keys(str(query))
        hits = _wait_for_results(driver)
        _wait(driver, _loaded("#grid .hit img"))       # thumbnails: the cookie goes with them
        assert [p for p, _ in hits] == [h["path"] for h in httpx.post(
            url + "/api/search", params={"k": 10},
            headers={"Authorization": "Bearer page-token"},
            files={"image": (query.name, query.read_bytes(), "image/jpeg")}).json()["hits"]]
        driver.refresh()                                 # asked once: kept
        _wait(driver, "document.getElementById('facts').textContent.includes('images')")
        assert not driver.find_element("id", "tokenform").is_displayed()
        driver.delete_all_cookies()


def test_repeated_names_tiff_and_a_reindex_in_the_page(browser, collection, serve, tmp_path):
    """Two hits named x.jpg show their folders; a TIFF shows (thumbnail and viewer, served
    as JPEG); re-indexing the collection into the served file is seen by the next search
    without restarting the server."""
    folder = tmp_path / "photos"
    mixed = collection(folder)
    driver = browser
    with serve(mixed) as base:
        driver.get(base + "/")
        driver.find_element("id", "file").send_keys(str(collection.spare))
        hits = _wait_for_results(driver)
        assert len(hits) == 3
        names = driver.execute_script("return Array.from(document.querySelectorAll("
                                      "'#grid .hit .name')).map(e => e.textContent);")
        assert sorted(names) == ["a/x.jpg", "b/x.jpg", "c.tif"]
        _wait(driver, _loaded("#grid .hit img"))        # the TIFF's thumbnail too
        tif = [e for e in driver.find_elements("css selector", "#grid .hit")
               if e.get_attribute("data-path").endswith("c.tif")][0]
        tif.click()
        _wait(driver, _loaded("#viewer-image"))
        assert driver.execute_script("return document.getElementById('viewer-image')"
                                     ".naturalWidth;") == cv2.imread(str(folder / "c.tif"))\
            .shape[1]
        driver.find_element("id", "viewer-close").click()

        shutil.copy(collection.spare, folder / "new.jpg")     # re-indexed meanwhile
        sj.search.update_index(mixed.model, folder, folder / "photos.index", weights="demo")
        driver.find_element("id", "search").click()
        again = _wait_for_results(driver, previous=hits)
        assert len(again) == 4 and again[0][0] == str(folder / "new.jpg")


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


def test_a_reranker_registered_at_run_time_is_in_the_menu(browser, live_server, searcher,
                                                          toy):
    """The page's reranker menu is the registry's as it is now: a reranker registered
    after the server started is offered, and a search with it shows its ranking."""
    from selenium.webdriver.support.ui import Select
    driver = browser
    driver.get(live_server + "/")
    menu = Select(driver.find_element("id", "rerank"))
    assert toy in [o.get_attribute("value") for o in menu.options]
    query = sj.search.list_images(searcher.index.root)[4]
    driver.find_element("id", "file").send_keys(str(query))
    plain = _wait_for_results(driver)
    menu.select_by_value(toy)
    driver.execute_script("document.getElementById('k').value = '4';"
                          "document.getElementById('rerank_k').value = '3';")
    driver.find_element("id", "search").click()
    hits = _wait_for_results(driver, previous=plain)
    assert [p for p, _ in hits] == [p for p, _ in plain[:4]][::-1]
    assert [s for _, s in hits] == [4.0, 3.0, 2.0, 1.0]



def test_why_a_hit_matched_in_the_viewer(browser, live_server, searcher, tmp_path):
    """Opening a hit draws why it matched: the query and the hit side by side on a canvas,
    with as many pairs and inliers as POST /api/explain answers, green lines over the
    photos (the screenshot is not blank and has green in it); "photo only" shows the
    photo."""
    driver = browser
    driver.get(live_server + "/")
    query = sj.search.list_images(searcher.index.root)[2]
    driver.find_element("id", "file").send_keys(str(query))
    _wait_for_results(driver)
    tile = driver.find_elements("css selector", "#grid .hit")[1]
    hit = int(tile.get_attribute("data-id"))
    tile.find_element("css selector", "img").click()
    _wait(driver, "!document.getElementById('viewer-match').hidden", timeout=180)
    with httpx.Client(base_url=live_server, timeout=120) as c:
        want = c.post("/api/explain", params={"hit": hit},
                      files={"image": (query.name, query.read_bytes(), "image/jpeg")}).json()
    match = driver.find_element("id", "viewer-match")
    assert int(match.get_attribute("data-inliers")) == want["inliers"] > 0
    assert int(match.get_attribute("data-pairs")) == want["correspondences"]
    assert match.is_displayed() and not driver.find_element("id", "viewer-image").is_displayed()
    assert f"{want['inliers']} of {want['correspondences']}" in driver.find_element(
        "id", "viewer-why").text
    shot = tmp_path / "why.png"
    _check_screenshot(driver, shot, "-why")
    rect = match.rect
    im = cv2.imread(str(shot))
    s = im.shape[1] / driver.execute_script("return window.innerWidth")
    im = im[int(rect["y"] * s):int((rect["y"] + rect["height"]) * s),
            int(rect["x"] * s):int((rect["x"] + rect["width"]) * s)]
    assert im.size and im.std() > 20
    green = (im[..., 1] > 150) & (im[..., 0] < 110) & (im[..., 2] < 110)   # #00c853 lines
    assert green.sum() > 100
    driver.find_element("id", "viewer-toggle").click()           # the photo alone
    assert driver.find_element("id", "viewer-image").is_displayed() and not match.is_displayed()
    assert driver.find_element("id", "viewer-toggle").text == "why it matched"
    driver.find_element("id", "viewer-close").click()
