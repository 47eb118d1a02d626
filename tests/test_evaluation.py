"""The evaluator on generated data: report files, metrics.json shape, presets, resolution, thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from spade_ad import WeightsError
from spade_ad.apps.evaluation import evaluate
from spade_ad.data.synthetic import make_synthetic_dataset
from spade_ad.settings import PRESETS

FAST = {"k_gallery": 4, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def two_categories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    make_synthetic_dataset(root / "disc", n_train=10, n_test_good=3, n_test_defect=3, size=(96, 128), seed=1)
    make_synthetic_dataset(root / "plate", n_train=10, n_test_good=3, n_test_defect=3, size=(128, 96), seed=2)
    return root


def test_evaluate_writes_report_with_stable_shape(two_categories: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    report = evaluate(two_categories, settings=FAST, out_dir=out, save_models=True)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved) == {"settings", "resolution", "categories", "mean"}
    assert saved["resolution"] == "original image size"
    assert set(saved["categories"]) == {"disc", "plate"}
    for metrics in saved["categories"].values():
        for key in ("image_auroc", "pixel_auroc", "au_pro"):
            assert 0.0 <= metrics[key] <= 1.0
        assert metrics["n_train"] == 10 and metrics["n_calibration"] == 10 and metrics["n_test"] == 9
        assert metrics["fit_seconds"] > 0 and metrics["predict_ms_per_image"] > 0
        assert metrics["image_threshold"] is not None
        assert set(metrics["at_threshold"]) == {"precision", "recall", "f1"}
        assert metrics["best_f1"]["f1"] >= metrics["at_threshold"]["f1"] - 1e-12
        assert 0 <= metrics["recall_at_1_percent"] <= metrics["recall_at_5_percent"] <= 1
        assert metrics["n_good"] == 3 and metrics["good_flagged"] == round(3 * metrics["false_alarm_rate_measured"])
        assert metrics["recall_best_at_measured_rate"] >= metrics["at_threshold"]["recall"]
        assert set(metrics["threshold_check"]) >= {"p_value", "flagged", "shifted", "warning"}
    assert saved["mean"]["pixel_auroc"] == pytest.approx(
        sum(m["pixel_auroc"] for m in saved["categories"].values()) / 2
    )
    assert (out / "metrics.csv").read_text().splitlines()[-1].startswith("mean")
    report_md = (out / "report.md").read_text()
    assert "original image size" in report_md and "disc" in report_md
    assert "recall @ 1% / 5% FPR" in report_md and "low_false_alarm_roc.png" in report_md
    assert "best @ its FPR" in report_md and " of 3 |" in report_md
    for plot in ("image_roc", "low_false_alarm_roc", "pixel_roc", "pro_curve", "score_histogram", "cases"):
        assert (out / "disc" / f"{plot}.png").stat().st_size > 0
    from spade_ad import load

    assert load(out / "disc" / "model.safetensors").metrics_["au_pro"] == saved["categories"]["disc"]["au_pro"]


def test_category_selection_and_eval_size(two_categories: Path) -> None:
    report = evaluate(two_categories, categories=["plate"], settings=FAST, eval_size=64)
    assert list(report["categories"]) == ["plate"]
    assert report["resolution"].startswith("64x64")
    assert 0.0 <= report["categories"]["plate"]["au_pro"] <= 1.0


def test_paper_preset_needs_wrn50_weights_offline(two_categories: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.models as tvm

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(type(tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    assert PRESETS["paper"]["backbone"] == "wide_resnet50_2"
    with pytest.raises(WeightsError, match="--weights"):
        evaluate(two_categories, categories=["disc"], settings={**PRESETS["paper"], "device": "cpu"})


def test_evaluate_command_applies_options_over_the_preset(
    two_categories: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    from spade_ad.apps.cli import main

    out = tmp_path / "cli_report"
    monkeypatch.setattr(sys, "argv", ["spade-ad", "evaluate", str(two_categories), "--category", "disc",
                                      "--k-gallery", "3", "--device", "cpu", "--no-plots", "--out", str(out)])
    try:
        main()
    except SystemExit as exit_info:  # a successful run may return or exit 0
        assert exit_info.code in (0, None)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["settings"]["k_gallery"] == 3 and list(saved["categories"]) == ["disc"]
    printed = capsys.readouterr().out
    assert "disc" in printed and "mean" in printed and "original image size" in printed


def test_save_maps_writes_the_official_mvtec_layout(two_categories: Path, tmp_path: Path) -> None:
    import tifffile
    from PIL import Image

    out = tmp_path / "maps_report"
    evaluate(two_categories, categories=["plate"], settings=FAST, eval_size=64, out_dir=out, plots=False,
             save_maps=True)
    test_dir = two_categories / "plate" / "test"
    images = sorted(p for p in test_dir.rglob("*") if p.is_file())
    maps_root = out / "maps" / "plate" / "test"
    expected = {maps_root / image.parent.name / f"{image.stem}.tiff": image for image in images}
    assert set(maps_root.rglob("*.tiff")) == set(expected)
    defect_types = {p.parent.name for p in expected}
    assert "good" in defect_types and len(defect_types) >= 2
    for tiff, image in expected.items():
        anomaly_map = tifffile.imread(tiff)
        with Image.open(image) as img:
            assert anomaly_map.shape == (img.height, img.width)  # original size, although eval_size=64
        assert anomaly_map.dtype == np.float32
        assert np.isfinite(anomaly_map).all()
    assert not any((out / "maps").glob("disc"))


def test_save_maps_needs_an_out_dir(two_categories: Path) -> None:
    with pytest.raises(ValueError, match="out_dir"):
        evaluate(two_categories, settings=FAST, save_maps=True)
