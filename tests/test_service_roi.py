"""`PUT /v1/model/roi` (issue 29): a mask uploaded to the service becomes the served model's region of interest, its
leave-one-out thresholds recomputed inside it, and is saved to the model file; the guards of `POST /v1/good` (off
without --allow-add, cross-origin refused, uploads checked)."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from child_server import serve_in_thread
from spade_ad import Spade, load
from spade_ad.apps.service import ServiceSettings, create_app
from spade_ad.apps.service.server import load_private_copy
from spade_ad.data.synthetic import make_printed_dataset


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_printed_dataset(tmp_path_factory.mktemp("roi") / "plate", n_train=8, n_test_good=1, n_test_defect=1,
                                size=(96, 96), seed=2)
    Spade(k_gallery=4, device="cpu", progress=False).fit(root / "train" / "good").save(root / "model.safetensors")
    return root


def _serve(model_file: Path, allow_add: bool) -> Iterator[str]:
    model = load_private_copy(model_file, device="cpu")
    app = create_app(model, ServiceSettings(allow_add=allow_add), model_file=model_file.name, save_to=model_file)
    return serve_in_thread(app)


def _put(url: str, name: str, data: bytes, **headers: str) -> requests.Response:
    return requests.put(f"{url}/v1/model/roi", files=[("files", (name, data))], headers=headers, timeout=120)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_uploaded_mask_becomes_the_saved_roi(fitted: Path, tmp_path: Path) -> None:
    model_file = Path(shutil.copy(fitted / "model.safetensors", tmp_path / "model.safetensors"))
    mask = (fitted / "roi.png").read_bytes()
    with _serve(model_file, allow_add=True) as url:
        answer = _put(url, "roi.png", mask)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert 0 < body["inspected_share"] < 1 and body["warning"] == ""
        assert body["image_threshold"] is not None and body["pixel_threshold"] is not None
        blank = _put(url, "black.png", _png(np.zeros((8, 8), np.uint8)))
        assert blank.status_code == 400 and "roi has no white" in blank.json()["error"]
        notes = _put(url, "notes.png", b"not pixels")
        assert notes.status_code == 415
        foreign = _put(url, "roi.png", mask, Origin="https://evil.example")
        assert foreign.status_code == 403
    saved = load(model_file, device="cpu")
    expected = np.asarray(Image.open(fitted / "roi.png")) > 127
    assert np.array_equal(saved.roi_, expected)
    assert saved.image_threshold_ == pytest.approx(body["image_threshold"])


def test_setting_the_roi_is_off_without_allow_add(fitted: Path, tmp_path: Path) -> None:
    model_file = Path(shutil.copy(fitted / "model.safetensors", tmp_path / "model.safetensors"))
    size = model_file.stat().st_size
    with _serve(model_file, allow_add=False) as url:
        refused = _put(url, "roi.png", (fitted / "roi.png").read_bytes())
        assert refused.status_code == 403 and "--allow-add" in refused.json()["error"]
    assert model_file.stat().st_size == size and load(model_file, device="cpu").roi_ is None
