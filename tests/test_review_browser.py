"""The review view in headless Chromium (`serve MODEL --allow-add --record DB`): a flagged image shows up in the
queue with its overlay and why; labelling it "good" takes it out of the queue and adds it to the model, and the next
prediction of the same image passes; the history view draws its charts and the drift line. Needs Debian's chromium
and chromium-driver (scripts/install-browser-deps.sh): skipped without them, except in CI, where it fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from child_server import serve_in_subprocess
from spade_ad import Spade
from spade_ad.data.synthetic import make_synthetic_dataset
from spade_ad.record import open_record
from test_browser import browser  # noqa: F401  (the fixture: a headless Chromium)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    root = make_synthetic_dataset(tmp_path_factory.mktemp("review-page") / "disc", n_train=12, n_test_good=1,
                                  n_test_defect=1, size=(128, 128), seed=0)
    Spade(k_gallery=4, device="cpu", progress=False).fit(root / "train" / "good").save(root / "model.safetensors")
    db = root / "inspections.db"
    with serve_in_subprocess(root / "model.safetensors", "--allow-add", "--record", str(db)) as child:
        yield child.url, root, db


def _upload(driver, path: Path, count: int) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, "file-input").send_keys(str(path))
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result .verdict")) == count)
    return driver.find_elements(By.CSS_SELECTOR, "#results .result .verdict")[-1].text


def test_label_a_flagged_image_good_then_it_passes(browser, served) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, root, db = served
    spot = root / "test" / "spot" / "000.png"
    browser.get(url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "threshold").is_enabled())
    assert browser.find_element(By.ID, "view-tabs").is_displayed()  # the service keeps a record
    assert _upload(browser, spot, 1) == "Anomalous"

    browser.find_element(By.CSS_SELECTOR, '#view-tabs [data-view="review"]').click()
    item = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#review-list .review-item"))
    assert item.find_element(By.CSS_SELECTOR, ".name").text == "000.png"
    assert item.find_element(By.CSS_SELECTOR, ".verdict").text == "Anomalous"
    overlay = item.find_element(By.CSS_SELECTOR, "img.overlay")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay))
    assert browser.execute_script("return arguments[0].naturalWidth", overlay) == 128
    item.find_element(By.CSS_SELECTOR, "details.why summary").click()
    assert item.find_element(By.CSS_SELECTOR, "img.why-picture").is_displayed()

    item.find_element(By.CSS_SELECTOR, "button.label-good").click()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#review-list .review-item"))
    status = browser.find_element(By.ID, "review-status").text
    assert "Labelled 000.png good" in status and "Added to the model" in status
    assert browser.find_element(By.ID, "review-empty").is_displayed()

    browser.find_element(By.CSS_SELECTOR, '#view-tabs [data-view="inspect"]').click()
    assert _upload(browser, spot, 2) == "Normal"  # the next prediction of the same image passes

    browser.find_element(By.CSS_SELECTOR, '#view-tabs [data-view="history"]').click()
    wait.until(lambda d: d.find_element(By.ID, "drift-line").text)
    assert browser.find_element(By.ID, "drift-line").text.startswith("not enough inspections")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#score-chart circle.point")) >= 1
    assert len(browser.find_elements(By.CSS_SELECTOR, "#rate-chart rect.bar")) >= 1
    with open_record(db) as record:
        rows = record.inspections()
    assert [r["label"] for r in rows] == ["good", None] and [r["verdict"] for r in rows] == ["defect", "good"]


def test_the_page_serves_the_product_chosen(browser, tmp_path_factory: pytest.TempPathFactory) -> None:  # noqa: F811
    """`serve --models DIR`: the page lists the products, and a prediction goes to the one chosen. Two models of one
    part, the second with its threshold out of reach: the same defective image is flagged by the first and passes
    the second, so the verdict shows which model answered."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    root = make_synthetic_dataset(tmp_path_factory.mktemp("products") / "disc", n_train=12, n_test_good=1,
                                  n_test_defect=1, size=(128, 128), seed=0)
    models = root / "models"
    models.mkdir()
    model = Spade(k_gallery=4, device="cpu", progress=False).fit(root / "train" / "good")
    model.save(models / "disc.safetensors")
    model.set_thresholds(image=1e9).save(models / "lenient.safetensors")
    spot = root / "test" / "spot" / "000.png"
    with serve_in_subprocess(f"--models={models}") as child:  # in place of MODEL
        browser.get(child.url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.ID, "product-choice").is_displayed())
        chooser = Select(browser.find_element(By.ID, "product"))
        assert sorted(option.get_attribute("value") for option in chooser.options) == ["disc", "lenient"]
        chooser.select_by_value("disc")
        wait.until(lambda d: d.find_element(By.ID, "threshold").is_enabled())
        assert _upload(browser, spot, 1) == "Anomalous"
        before = browser.find_element(By.ID, "model-info").text
        chooser.select_by_value("lenient")
        wait.until(lambda d: d.find_element(By.ID, "model-info").text not in ("", before))  # its own threshold
        wait.until(lambda d: d.find_element(By.ID, "threshold").is_enabled())
        assert _upload(browser, spot, 1) == "Normal"  # the results were cleared when the product changed


def test_more_pages_on_then_hides_and_error_rows_have_their_own_filter(
        browser, tmp_path_factory: pytest.TempPathFactory) -> None:  # noqa: F811
    """25 flagged inspections and an unreadable file in the record: the queue shows 20 with "More"; "More" adds the
    last 5 and hides; clicking it again (it is only hidden) loads nothing twice; the unreadable file is not in the
    queue but under "not readable", without label buttons."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    root = make_synthetic_dataset(tmp_path_factory.mktemp("review-more") / "disc", n_train=8, n_test_good=1,
                                  n_test_defect=1, size=(96, 96), seed=0)
    Spade(k_gallery=4, device="cpu", progress=False).fit(root / "train" / "good").save(root / "model.safetensors")
    db = root / "inspections.db"
    with open_record(db) as record:
        record.add([{"origin": "watch", "source": f"cam/{i:02d}.png", "verdict": "defect", "score": 5.0,
                     "normalized_score": 2.0, "at_ms": 1_000 + i} for i in range(25)]
                   + [{"origin": "watch", "source": "cam/notes.txt", "verdict": "error", "at_ms": 2_000,
                       "error": "not an image file"}])
    cards = "#review-list .review-item"
    with serve_in_subprocess(root / "model.safetensors", "--record", str(db)) as child:
        browser.get(child.url)
        # the list is drawn anew when a page arrives: an element read while it is redrawn is stale, and read again
        wait = WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,))
        wait.until(lambda d: d.find_element(By.ID, "view-tabs").is_displayed())
        browser.find_element(By.CSS_SELECTOR, '#view-tabs [data-view="review"]').click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, cards)) == 20)
        more = browser.find_element(By.ID, "review-more")
        assert more.is_displayed()
        assert "cam/notes.txt" not in [e.text for e in browser.find_elements(By.CSS_SELECTOR, f"{cards} .name")]
        more.click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, cards)) == 25)
        wait.until(lambda d: not d.find_element(By.ID, "review-more").is_displayed())  # nothing more: hidden
        browser.execute_script("document.getElementById('review-more').click()")  # hidden, but clicked anyway
        browser.execute_script("return fetch('/healthz').then(() => true)")  # let a request (if any) come back
        names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, f"{cards} .name")]
        assert len(names) == 25 and len(set(names)) == 25  # the same queue was not loaded again

        Select(browser.find_element(By.ID, "review-verdict")).select_by_value("error")
        browser.find_element(By.CSS_SELECTOR, '#review-filters button[type="submit"]').click()
        wait.until(lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, f"{cards} .name")] == ["cam/notes.txt"])
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"{cards} .verdict").text == "Not readable")
        assert wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, cards)) == 1 and not d.find_elements(
            By.CSS_SELECTOR, f"{cards} button"))  # no Good / Defect: nothing to label
        assert not browser.find_element(By.ID, "review-more").is_displayed()
