"""End to end in headless Chromium: the web page uploads a real bottle image, shows its overlay, scores and verdict
and why (regions, nearest good images), and the threshold slider (in units of the model's threshold) re-draws the
verdict. Needs Debian's `chromium` and `chromium-driver`
(scripts/install-browser-deps.sh): skipped without them, except in CI (env CI set), where it fails."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from child_server import serve_in_subprocess
from spade_ad import Spade
from spade_ad.data.synthetic import make_synthetic_dataset

pytestmark = pytest.mark.browser

BOTTLE_IMAGE = Path(__file__).resolve().parents[2] / "shared/data/mvtec_ad/bottle/test/broken_large/000.png"
CHROME_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage",
)


def _require(what: str, found: object) -> None:
    if not found:
        message = f"{what} not found: run scripts/install-browser-deps.sh (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A headless Chromium driven by Debian's chromedriver, with a fresh profile."""
    chromium = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    driver_path = shutil.which("chromedriver")
    _require("chromium", chromium)
    _require("chromedriver", driver_path)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(driver_path)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset and a calibrated model fitted on it (model.safetensors in its folder)."""
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("browser") / "disc", n_train=12, n_test_good=1, n_test_defect=1, size=(128, 128), seed=0
    )
    Spade(k_gallery=4, device="cpu", progress=False).fit(root / "train" / "good").save(root / "model.safetensors")
    return root


@pytest.fixture(scope="module")
def page_url(page_data: Path) -> Iterator[str]:
    """A server for the small synthetic model (the verdict only has to appear, not be right), with --allow-add
    (the "This one is good" button; the test that clicks it runs last)."""
    with serve_in_subprocess(page_data / "model.safetensors", "--allow-add") as child:
        yield child.url


@pytest.fixture(scope="module")
def bottle_image() -> Path:
    if not BOTTLE_IMAGE.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"real data missing in CI: {BOTTLE_IMAGE}")
        pytest.skip(f"MVTec AD bottle image not found at {BOTTLE_IMAGE}")
    return BOTTLE_IMAGE


def _set_threshold(driver, value: str) -> None:
    """Move the slider the way a user does: set its value and fire the "input" event."""
    driver.execute_script(
        "const s = document.getElementById('threshold'); s.value = arguments[0];"
        "s.dispatchEvent(new Event('input', {bubbles: true}));",
        value,
    )


def test_upload_shows_overlay_and_verdict_and_slider_redraws(browser, page_url: str, bottle_image: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page_url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "threshold").is_enabled())  # the model's threshold has arrived
    assert "threshold" in browser.find_element(By.ID, "model-info").text

    browser.find_element(By.ID, "file-input").send_keys(str(bottle_image))
    verdict = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".result .verdict"))
    assert verdict.text in ("Anomalous", "Normal")
    overlay = browser.find_element(By.CSS_SELECTOR, ".result img.overlay")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay))
    assert overlay.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].naturalWidth", overlay) == 900  # the bottle image's size
    assert browser.find_element(By.CSS_SELECTOR, ".result .name").text == bottle_image.name
    assert browser.find_element(By.ID, "error").get_attribute("hidden")

    score = browser.find_element(By.CSS_SELECTOR, ".result .score").text
    assert score.startswith("Score ") and " · normalised " in score  # raw and normalised
    assert browser.find_element(By.CSS_SELECTOR, ".result .p-value").text.startswith("p-value ")
    why = browser.find_element(By.CSS_SELECTOR, ".result details.why")
    assert not browser.find_element(By.CSS_SELECTOR, ".result .neighbours li").is_displayed()  # folded away
    why.find_element(By.TAG_NAME, "summary").click()
    neighbours = browser.find_elements(By.CSS_SELECTOR, ".result .neighbours li")
    assert neighbours and neighbours[0].is_displayed() and ".png (" in neighbours[0].text
    regions = browser.find_elements(By.CSS_SELECTOR, ".result .regions li")
    assert all(r.text.startswith("box ") and "area" in r.text and "peak" in r.text for r in regions)

    slider = browser.find_element(By.ID, "threshold")
    assert float(slider.get_attribute("value")) == 1.0  # normalised units: 1 = the model's threshold
    assert browser.find_element(By.ID, "threshold-value").text.startswith("1.00 (score ")
    at_model = verdict.text
    _set_threshold(browser, slider.get_attribute("min"))
    assert verdict.text == "Anomalous"
    _set_threshold(browser, slider.get_attribute("max"))
    assert verdict.text == "Normal"
    assert verdict.get_attribute("class") == "verdict normal"
    browser.find_element(By.ID, "reset-threshold").click()
    assert verdict.text == at_model


def test_bad_file_error_is_shown_in_plain_words(browser, page_url: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not pixels")
    browser.get(page_url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "threshold").is_enabled())
    browser.find_element(By.ID, "file-input").send_keys(str(not_an_image))
    error = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".result .error"))
    assert "not an image" in error.text
    assert browser.find_elements(By.CSS_SELECTOR, ".result .verdict") == []


def test_why_picture_and_this_one_is_good(browser, page_url: str, page_data: Path) -> None:
    """A flagged image shows the "why" picture; "This one is good" adds it to the model and scores it again."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    spot = page_data / "test" / "spot" / "000.png"
    browser.get(page_url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "threshold").is_enabled())
    browser.find_element(By.ID, "file-input").send_keys(str(spot))
    verdict = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".result .verdict"))
    assert verdict.text == "Anomalous"
    browser.find_element(By.CSS_SELECTOR, ".result details.why summary").click()
    picture = browser.find_element(By.CSS_SELECTOR, ".result img.why-picture")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", picture))
    assert picture.is_displayed()
    width, height = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", picture)
    assert width > height  # the image next to the nearest good one

    browser.find_element(By.CSS_SELECTOR, ".result button.good").click()
    added = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result .added"))
    assert added[0].text.startswith("Added to the model as a good image (it now has 13 good images")
    verdict = browser.find_element(By.CSS_SELECTOR, ".result .verdict")
    assert verdict.text == "Normal"
    assert browser.find_elements(By.CSS_SELECTOR, ".result img.why-picture") == []
    assert len(browser.find_elements(By.CSS_SELECTOR, ".result")) == 1  # scored again in the same card
