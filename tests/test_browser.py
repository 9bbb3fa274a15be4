"""The search page in a real headless Chromium: type a query, see result images.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them) and selenium; skipped
with the reason where they are missing.
"""

from __future__ import annotations

import shutil

import pytest

from mmtune.serve import Backend, ServeConfig, create_app
from tests.test_serve import LiveServer, make_images, make_run

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM and DRIVER),
        reason="no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)",
    ),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from mmtune.embed import embed_items, image_items
    from mmtune.retrieval import IndexConfig, build_index, read_embeddings, save_index
    from mmtune.runs import load_run

    root = tmp_path_factory.mktemp("browser")
    run = make_run(root / "run")
    make_images(root / "imgs", 12)
    model, proc = load_run(run)
    embed_items(model, proc, image_items(root / "imgs"), root / "e.parquet", progress=False)
    emb = read_embeddings(root / "e.parquet")
    save_index(root / "idx", build_index(emb.vectors, IndexConfig()), emb, IndexConfig())
    with LiveServer(create_app(Backend.from_run(run, root / "idx"), ServeConfig())) as s:
        s.root = root
        yield s


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_typing_a_query_shows_result_images(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(site.url + "/")
    box = browser.find_element(By.ID, "query")
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys("5")
    box.send_keys("a photo of the digit three", Keys.ENTER)

    def loaded_images(driver):
        imgs = driver.find_elements(By.CSS_SELECTOR, "#results figure img")
        done = [
            im for im in imgs if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im)
        ]
        return done if len(done) == 5 else False

    imgs = WebDriverWait(browser, 30).until(loaded_images)
    assert all(im.get_attribute("src").startswith("blob:") for im in imgs)
    # the images are the decoded result files: 24×24 digit PNGs
    sizes = {browser.execute_script("return arguments[0].naturalWidth", im) for im in imgs}
    assert sizes == {24}
    assert "5 results" in browser.find_element(By.ID, "status").text
    captions = [f.text for f in browser.find_elements(By.CSS_SELECTOR, "#results figcaption")]
    assert all(c.startswith("a photo of the digit") for c in captions)


def test_an_error_is_shown_to_the_person(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(site.url + "/")
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys("1000")  # over max_k
    browser.find_element(By.ID, "query").send_keys("seven", Keys.ENTER)
    WebDriverWait(browser, 30).until(lambda d: "limit" in d.find_element(By.ID, "status").text)
    assert browser.find_element(By.ID, "status").get_attribute("class") == "error"
    assert browser.find_elements(By.CSS_SELECTOR, "#results figure") == []


def _wait_for_results(browser, n: int):
    """The result figures once n of them show a decoded image."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def loaded(driver):
        imgs = driver.find_elements(By.CSS_SELECTOR, "#results figure img")
        done = [
            im for im in imgs if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im)
        ]
        return len(done) == n

    WebDriverWait(browser, 30).until(loaded)
    return [f.text for f in browser.find_elements(By.CSS_SELECTOR, "#results figcaption")]


def test_q_in_the_address_runs_that_search_on_load(site, browser):
    """/?q=…&k=… searches when the page opens (before: the page ignored its address)."""
    from selenium.webdriver.common.by import By

    browser.get(site.url + "/?q=a%20photo%20of%20the%20digit%20three&k=4")
    captions = _wait_for_results(browser, 4)
    assert len(captions) == 4
    assert browser.find_element(By.ID, "query").get_attribute("value") == "a photo of the digit three"
    assert "4 results for “a photo of the digit three”" in browser.find_element(By.ID, "status").text


def test_a_search_puts_its_query_in_the_address(site, browser):
    """Searching rewrites the address (history.replaceState): reloading it repeats the search."""
    from urllib.parse import parse_qs, urlparse

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(site.url + "/")
    entries = browser.execute_script("return history.length")
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys("3")
    browser.find_element(By.ID, "query").send_keys("seven & eight?", Keys.ENTER)
    _wait_for_results(browser, 3)
    url = urlparse(browser.current_url)
    assert url.path == "/" and parse_qs(url.query) == {"q": ["seven & eight?"], "k": ["3"]}
    assert browser.execute_script("return history.length") == entries  # replaced, not pushed
    browser.refresh()
    assert len(_wait_for_results(browser, 3)) == 3


def test_uploading_a_png_searches_by_image(site, browser):
    """The file input sends the image to /v1/search: an indexed image finds itself first (exact
    index, cosine 1), and an image search clears ?q= from the address."""
    from selenium.webdriver.common.by import By

    browser.get(site.url + "/?q=zero&k=3")
    _wait_for_results(browser, 3)
    png = site.root / "imgs" / "d005.png"
    browser.find_element(By.ID, "image-file").send_keys(str(png))
    _wait_for_results(browser, 3)
    first = browser.find_elements(By.CSS_SELECTOR, "#results figcaption")[0].text
    caption = png.with_suffix(".txt").read_text().strip()
    assert first.startswith(caption) and first.endswith("1.000")
    assert "3 results for image d005.png" in browser.find_element(By.ID, "status").text
    assert "q=" not in browser.current_url


def test_dropping_an_image_searches_by_it(site, browser):
    """Drag-and-drop: a drop event carrying a PNG file runs the same image search."""
    import base64

    from selenium.webdriver.common.by import By

    browser.get(site.url + "/?k=2")
    png = site.root / "imgs" / "d007.png"
    browser.execute_script(
        """const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true }));""",
        base64.b64encode(png.read_bytes()).decode(),
    )
    captions = _wait_for_results(browser, 2)
    assert captions[0].startswith(png.with_suffix(".txt").read_text().strip()) and captions[0].endswith("1.000")
    assert "image dropped.png" in browser.find_element(By.ID, "status").text


def test_a_corrupt_upload_shows_a_clear_error(site, browser, tmp_path):
    """A truncated PNG: the server's 422 reason is shown on the page, as an error, and no results."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    good = (site.root / "imgs" / "d001.png").read_bytes()
    bad = tmp_path / "broken.png"
    bad.write_bytes(good[: len(good) // 2])
    browser.get(site.url + "/")
    browser.find_element(By.ID, "image-file").send_keys(str(bad))
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 30).until(lambda d: "cannot search with broken.png" in status.text)
    assert "damaged" in status.text and status.get_attribute("class") == "error"
    assert browser.find_elements(By.CSS_SELECTOR, "#results figure") == []
