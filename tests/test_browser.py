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
