"""`POST /v1/good` ("this one is good"): a flagged image added to the served model is no longer flagged, and the
model file the service was started with is saved with it; off (403) unless the service allows adding. In-process
servers on loopback (uvicorn in a thread), each over its own copy of a small calibrated model."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from child_server import serve_in_thread
from spade_ad import Spade, load
from spade_ad.apps.service import ServiceSettings, create_app
from spade_ad.apps.service.server import load_private_copy
from spade_ad.data.synthetic import make_synthetic_dataset

OFF = "adding good images is off: start the service with --allow-add"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("good") / "disc", n_train=12, n_test_good=1, n_test_defect=1, size=(128, 128), seed=0
    )
    Spade(k_gallery=4, device="cpu", progress=False).fit(root / "train" / "good").save(root / "model.safetensors")
    return root


@pytest.fixture
def model_file(fitted: Path, tmp_path: Path) -> Path:
    """This test's own copy of the model file (the service saves over it)."""
    return Path(shutil.copy(fitted / "model.safetensors", tmp_path / "model.safetensors"))


@pytest.fixture
def defect(fitted: Path) -> tuple[str, bytes]:
    path = fitted / "test" / "spot" / "000.png"  # a clear spot on the synthetic disc
    return path.name, path.read_bytes()


def _serve(model_file: Path, allow_add: bool) -> Iterator[str]:
    """Serve `model_file` as `spade-ad serve` does: the model loaded from a private copy, saved to `model_file`."""
    model = load_private_copy(model_file, device="cpu")
    app = create_app(model, ServiceSettings(allow_add=allow_add), model_file=model_file.name, save_to=model_file)
    return serve_in_thread(app)


def _post(url: str, route: str, *files: tuple[str, bytes]) -> requests.Response:
    return requests.post(f"{url}{route}", files=[("files", file) for file in files], timeout=120)


def test_a_flagged_image_added_as_good_is_no_longer_flagged(model_file: Path, defect: tuple[str, bytes]) -> None:
    n_before = len(load(model_file, device="cpu").train_names_)
    with _serve(model_file, allow_add=True) as url:
        assert requests.get(f"{url}/v1/model", timeout=10).json()["allow_add"] is True
        [before] = _post(url, "/v1/predict", defect).json()["results"]
        assert before["is_anomalous"] is True
        added = _post(url, "/v1/good", defect)
        assert added.status_code == 200, added.text
        body = added.json()
        assert set(body) == {"added", "n_train_images", "image_threshold"}
        assert body["added"] == 1 and body["n_train_images"] == n_before + 1
        [after] = _post(url, "/v1/predict", defect).json()["results"]
        assert after["is_anomalous"] is False and after["why"] is None
        assert after["score"] < before["score"]
        info = requests.get(f"{url}/v1/model", timeout=10).json()
        assert info["n_train_images"] == n_before + 1 and info["image_threshold"] == body["image_threshold"]
    saved = load(model_file, device="cpu")  # the file the service was started with, saved atomically
    assert len(saved.train_names_) == n_before + 1
    assert saved.image_threshold_ == pytest.approx(body["image_threshold"])
    assert not [p for p in model_file.parent.iterdir() if p != model_file]  # no partial file left beside it


def test_adding_is_off_by_default(model_file: Path, defect: tuple[str, bytes]) -> None:
    size = model_file.stat().st_size
    with _serve(model_file, allow_add=False) as url:
        assert requests.get(f"{url}/v1/model", timeout=10).json()["allow_add"] is False
        refused = _post(url, "/v1/good", defect)
        assert refused.status_code == 403
        assert refused.json()["error"] == OFF
        [result] = _post(url, "/v1/predict", defect).json()["results"]
        assert result["is_anomalous"] is True  # the model is unchanged
    assert model_file.stat().st_size == size


def test_adding_checks_uploads_like_predict(model_file: Path, defect: tuple[str, bytes]) -> None:
    size = model_file.stat().st_size
    with _serve(model_file, allow_add=True) as url:
        bad = _post(url, "/v1/good", defect, ("notes.png", b"these are notes, not pixels"))
        assert bad.status_code == 415 and bad.json()["file"] == "notes.png"
        assert requests.post(f"{url}/v1/good", data={"x": "1"}, timeout=10).status_code == 415
        foreign = requests.post(f"{url}/v1/good", files=[("files", defect)], headers={"Origin": "https://evil.example"},
                                timeout=10)
        assert foreign.status_code == 403
        assert requests.get(f"{url}/v1/model", timeout=10).json()["n_train_images"] == len(
            load(model_file, device="cpu").train_names_)
    assert model_file.stat().st_size == size
