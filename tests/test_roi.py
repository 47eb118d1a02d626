"""Regions of interest (issue 29): a mask stored in the model, the maps NaN outside it, the image score, regions and
both thresholds computed inside it; on a generated product whose good parts carry a printed code that changes from
part to part outside the inspected area."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_run import run_cli
from spade_ad import Spade, load
from spade_ad.core.geometry import Geometry
from spade_ad.core.maps_numpy import apply_roi, as_roi, map_score, original_with_roi, roi_grid
from spade_ad.data.synthetic import make_printed_dataset
from spade_ad.errors import SettingError

RATE = 0.01


def test_roi_grid_is_a_nearest_resize_of_the_scored_box() -> None:
    roi = np.zeros((100, 200), dtype=bool)
    roi[:, 100:] = True  # right half inspected
    grid = roi_grid(roi, (0.0, 0.0, 200.0, 100.0), (100, 200), (10, 20))
    assert grid[:, 10:].all() and not grid[:, :10].any()
    # a crop box (paper_crop) sees only its part of the ROI; an image twice the ROI's size scales it
    assert roi_grid(roi, (100.0, 0.0, 200.0, 100.0), (100, 200), (4, 4)).all()
    assert roi_grid(roi, (0.0, 0.0, 400.0, 200.0), (200, 400), (10, 20))[:, 10:].all()


def test_masked_map_scores_only_inside() -> None:
    roi = np.zeros((8, 8), dtype=bool)
    roi[2:6, 2:6] = True
    geometry = Geometry((8, 8), (8, 8), (0.0, 0.0, 8.0, 8.0))
    anomaly_map = np.ones((8, 8), dtype=np.float32)
    anomaly_map[0, 0] = 100.0  # outside: must not count
    masked = apply_roi(anomaly_map, roi, geometry)
    assert np.isnan(masked[0, 0]) and np.isfinite(masked[2:6, 2:6]).all()
    assert map_score(masked, "map_max") == 1.0 and map_score(masked, "map_top") == 1.0
    original = original_with_roi(masked, roi, Geometry((16, 16), (8, 8), (0.0, 0.0, 16.0, 16.0)))
    assert original.shape == (16, 16) and np.isfinite(original[4:12, 4:12]).all() and np.isnan(original[:4]).all()


def test_roi_inputs_and_refusals(tmp_path: Path) -> None:
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[3:7, 4:9] = 255
    Image.fromarray(mask).save(tmp_path / "roi.png")
    assert as_roi(tmp_path / "roi.png").sum() == 20 and as_roi(mask > 0).sum() == 20 and as_roi(None) is None
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(SettingError, match="roi has no white"):
        as_roi(tmp_path / "black.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(SettingError, match="roi cannot be read"):
        as_roi(tmp_path / "text.png")


@pytest.fixture(scope="module")
def printed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_printed_dataset(tmp_path_factory.mktemp("printed") / "plate", n_train=20, n_test_good=20,
                                n_test_defect=5, size=(160, 160), seed=1)


def _verdicts(model: Spade, folders: list[Path]) -> list[bool]:
    files = [f for folder in folders for f in sorted(folder.glob("*.png"))]
    return [bool(p.is_anomalous) for p in model.predict(files)]


def test_roi_removes_the_false_alarms_of_a_varying_print_and_keeps_the_defects(printed: Path, tmp_path: Path) -> None:
    settings = {"k_gallery": 10, "device": "cpu", "progress": False, "false_alarm_rate": RATE}
    goods, defects = [printed / "test" / "good"], [printed / "test" / "scratch", printed / "test" / "spot"]
    plain = Spade(**settings).fit(printed / "train" / "good")
    masked = Spade(**settings).fit(printed / "train" / "good", roi=printed / "roi.png")
    alarms_plain, alarms_roi = sum(_verdicts(plain, goods)), sum(_verdicts(masked, goods))
    n_good = len(list(goods[0].glob("*.png")))
    # the rate 20 calibration images can guarantee is 1/21, not the 1% asked: the bar of issue 29 at that rate
    bar = 2 * masked.calibration_.guaranteed_rate * n_good + 1
    assert alarms_plain > bar  # the new codes are flagged without the ROI
    assert alarms_roi <= bar
    recall_plain, recall_roi = np.mean(_verdicts(plain, defects)), np.mean(_verdicts(masked, defects))
    assert recall_roi >= recall_plain and recall_roi >= 0.75
    # the maps are NaN over the label, and the pixel threshold came from inside the ROI only
    prediction = masked.predict([sorted(goods[0].glob("*.png"))[0]], original_size=True)[0]
    assert np.isnan(prediction.anomaly_map[0, 0]) and np.isnan(prediction.original_map[0, 0])
    assert np.isfinite(prediction.anomaly_map[112, 112])
    # stored in the model file; a file without one inspects everything
    masked.save(tmp_path / "roi.safetensors")
    plain.save(tmp_path / "plain.safetensors")
    again = load(tmp_path / "roi.safetensors", device="cpu")
    assert np.array_equal(again.roi_, masked.roi_) and load(tmp_path / "plain.safetensors", device="cpu").roi_ is None
    assert np.allclose(again.score(goods[0]), masked.score(goods[0]), rtol=1e-5)
    # calibrate --roi sets an ROI on a model fitted without one, its thresholds recomputed inside it
    assert run_cli(["calibrate", tmp_path / "plain.safetensors", "--good", printed / "train" / "good", "--roi",
                    printed / "roi.png", "-o", tmp_path / "recal.safetensors"]) == 0
    recalibrated = load(tmp_path / "recal.safetensors", device="cpu")
    assert np.array_equal(recalibrated.roi_, masked.roi_)


def test_cli_fit_roi_refuses_a_blank_mask_in_one_line(printed: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "black.png")
    assert run_cli(["fit", printed / "train" / "good", "-o", tmp_path / "m.safetensors", "--roi",
                    tmp_path / "black.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "roi" in err[0] and "Traceback" not in err[0]


def test_the_runtime_masks_like_the_torch_path_and_refuses_tiled_models(fitted_model: Spade, synthetic_root: Path,
                                                                         tmp_path: Path) -> None:
    from spade_ad.estimators.runtime import load_bundle
    from spade_ad.export.bundle import export_bundle

    fitted_model.save(tmp_path / "plain.safetensors")
    model = load(tmp_path / "plain.safetensors", device="cpu")
    roi = np.ones((160, 224), dtype=bool)
    roi[:, :80] = False  # the left of the image is not inspected
    model.set_roi(roi)
    runtime = load_bundle(export_bundle(model, tmp_path / "roi.bundle"))
    images = sorted((synthetic_root / "test").glob("*/*.png"))[:3]
    for a, b in zip(model.predict(images, original_size=True), runtime.predict(images, original_size=True)):
        assert np.array_equal(np.isnan(a.anomaly_map), np.isnan(b.anomaly_map)) and np.isnan(a.anomaly_map[:, 0]).all()
        assert np.array_equal(np.isnan(a.original_map), np.isnan(b.original_map))
        assert b.score == pytest.approx(a.score, rel=1e-4)
    model.set_params(tile_size=64, tile_overlap=32)  # a tiled model's file: the runtime refuses it in one line
    with pytest.raises(SettingError, match="tile_size is not supported by the torch-free runtime"):
        load_bundle(export_bundle(model, tmp_path / "tiled.bundle"))
