"""Thresholds from the command line: what `fit` says about them, `predict --threshold / --false-alarm-rate`, and
`spade-ad calibrate` with good and defective images."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from cli_run import run_cli
from spade_ad import load


@pytest.fixture(scope="module")
def model_file(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("thresholds") / "model.safetensors"
    assert run_cli(["fit", str(synthetic_root / "train" / "good"), "-o", str(out), "--k-gallery", "4",
                    "--device", "cpu", "--false-alarm-rate", "0.2"]) == 0
    return out


def _verdicts(folder: Path) -> list[int]:
    with open(folder / "scores.csv", newline="") as handle:
        return [int(row["is_anomalous"]) for row in csv.DictReader(handle)]


def test_fit_states_the_rate_and_its_guarantee(synthetic_root: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["fit", str(synthetic_root / "train" / "good"), "-o", str(tmp_path / "m.safetensors"),
                    "--k-gallery", "4", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "leave-one-out scores of 12 good images" in captured.out and "asked 0.01" in captured.out
    assert "1/13" in captured.err  # 12 images cannot guarantee 1%: said, not hidden


def test_predict_thresholds_for_one_run(model_file: Path, synthetic_root: Path, tmp_path: Path) -> None:
    test = synthetic_root / "test"
    assert run_cli(["predict", str(model_file), str(test), "-o", str(tmp_path / "low"), "--threshold", "-1e9"]) == 0
    assert set(_verdicts(tmp_path / "low")) == {1}
    assert run_cli(["predict", str(model_file), str(test), "-o", str(tmp_path / "high"), "--threshold", "1e9"]) == 0
    assert set(_verdicts(tmp_path / "high")) == {0}
    assert run_cli(["predict", str(model_file), str(test), "-o", str(tmp_path / "rate"),
                    "--false-alarm-rate", "0.5"]) == 0
    assert sum(_verdicts(tmp_path / "rate")) >= sum(_verdicts(tmp_path / "high"))
    assert load(model_file).calibration_.false_alarm_rate == 0.2  # the file is not changed by a run's threshold
    assert run_cli(["predict", str(model_file), str(test), "-o", str(tmp_path / "bad"),
                    "--false-alarm-rate", "3"]) == 2


def test_calibrate_rewrites_thresholds(model_file: Path, synthetic_root: Path, tmp_path: Path) -> None:
    good, defect = tmp_path / "good", tmp_path / "defect"
    shutil.copytree(synthetic_root / "test" / "good", good)
    defect.mkdir()
    for path in sorted((synthetic_root / "test").glob("*/*.png")):
        if path.parent.name != "good":
            shutil.copy(path, defect / f"{path.parent.name}_{path.name}")
    out = tmp_path / "recalibrated.safetensors"
    assert run_cli(["calibrate", str(model_file), "--good", str(good), "-o", str(out)]) == 0
    cal = load(out).calibration_
    assert cal.source == "validation" and cal.n == 4 and cal.threshold_source == "false_alarm_rate"
    assert run_cli(["calibrate", str(model_file), "--good", str(good), "--defect", str(defect), "-o", str(out)]) == 0
    model = load(out)
    assert model.calibration_.threshold_source == "best_f1" and "best F1" in model.calibration_.note
    goods = model.score(sorted(good.glob("*.png")))
    defects = model.score(sorted(defect.glob("*.png")))
    flagged_good = (goods > model.image_threshold_).sum()
    caught = (defects > model.image_threshold_).sum()
    assert 2 * caught / (caught + flagged_good + len(defects)) >= 0.8  # the best F1 on these images
    # the part weights these defects support, kept in the file with the figures behind them (or --keep-weights)
    chosen = model.calibration_.check["weights"]
    assert [model.map_weight, model.coarse_weight] == pytest.approx(chosen["weights"][:2])
    assert model.calibration_.note.startswith("part weights ") and chosen["n_defect"] == len(defects)
    assert run_cli(["calibrate", str(model_file), "--good", str(good), "--defect", str(defect), "--keep-weights",
                    "-o", str(out)]) == 0
    kept = load(out)
    assert "weights" not in kept.calibration_.check and kept.map_weight == load(model_file).map_weight


def test_calibrate_keep_rate_lets_defects_choose_the_weights_only(model_file: Path, synthetic_root: Path,
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`--keep-rate`: the labelled defects choose the part weights, the image threshold stays at the false-alarm
    rate (the one the same good images give without defects), and the note says what it catches of them."""
    test = synthetic_root / "test"
    plain, kept, weighed = (tmp_path / f"{name}.safetensors" for name in ("plain", "kept", "weighed"))
    assert run_cli(["calibrate", str(model_file), "--good", str(test / "good"), "-o", str(plain)]) == 0
    assert run_cli(["calibrate", str(model_file), "--good", str(test / "good"), "--defect", str(test / "spot"),
                    "--keep-rate", "--keep-weights", "-o", str(kept)]) == 0
    assert "image threshold kept at the false-alarm rate 0.2: it flags" in capsys.readouterr().err
    assert load(kept).image_threshold_ == load(plain).image_threshold_
    assert load(kept).calibration_.threshold_source == "false_alarm_rate"
    assert run_cli(["calibrate", str(model_file), "--good", str(test / "good"), "--defect", str(test / "spot"),
                    "--keep-rate", "-o", str(weighed)]) == 0
    model = load(weighed)
    assert model.calibration_.threshold_source == "false_alarm_rate" and "weights" in model.calibration_.check
    assert run_cli(["calibrate", str(model_file), "--good", str(test / "good"), "--defect", str(test / "spot"),
                    "--keep-rate", "--recall", "0.9", "-o", str(weighed)]) == 2
    broken = tmp_path / "defects"  # an unreadable defect image is named before the good images are scored
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"not a png")
    capsys.readouterr()
    assert run_cli(["calibrate", str(model_file), "--good", str(test / "good"), "--defect", str(broken), "-o",
                    str(tmp_path / "never.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "bad.png" in err and "Traceback" not in err and not (tmp_path / "never.safetensors").exists()


def test_add_a_good_image_from_the_command_line(model_file: Path, synthetic_root: Path, tmp_path: Path) -> None:
    test = sorted((synthetic_root / "test").glob("*/*.png"))
    model = load(model_file)
    flagged = next(p for p, s in zip(test, model.score(test)) if s > model.image_threshold_)
    out = tmp_path / "added.safetensors"
    assert run_cli(["add", str(model_file), str(flagged), "-o", str(out)]) == 0
    added = load(out)
    assert added.store_.n_images == model.store_.n_images + 1
    assert added.score([flagged])[0] <= added.image_threshold_
    assert run_cli(["add", str(model_file), str(tmp_path / "missing.png"), "-o", str(out)]) == 2


def test_calibrate_for_a_recall_says_what_it_measured(model_file: Path, synthetic_root: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "recall.safetensors"
    test = synthetic_root / "test"
    assert run_cli(["calibrate", str(model_file), "--good", str(test / "good"), "--defect", str(test / "spot"),
                    "--recall", "0.75", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "for a recall of 0.75" in captured.err and "measured, not guaranteed" in captured.err
    assert load(out).calibration_.threshold_source == "recall"
    assert run_cli(["calibrate", str(model_file), "--good", str(test / "good"), "--recall", "0.9"]) == 2
    assert "--recall needs --defect" in capsys.readouterr().err


def test_fit_with_holdout_good_images_checks_them(synthetic_root: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "held.safetensors"
    assert run_cli(["fit", str(synthetic_root / "train" / "good"), "-o", str(out), "--k-gallery", "4",
                    "--device", "cpu", "--holdout-good", str(synthetic_root / "test" / "good")]) == 0
    assert "from 4 good images" in capsys.readouterr().out
    model = load(out)
    assert model.calibration_.source == "validation" and model.calibration_.check["n_reference"] == 12


def test_fit_with_labelled_defects_chooses_the_weights_and_keeps_the_rate(
        synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`fit --defect`: a few labelled defects choose the part weights against the training images' leave-one-out
    scores, and the thresholds stay at the false-alarm rate (unlike `calibrate --defect`'s best F1): the calibration
    is the leave-one-out one at the chosen weights."""
    from spade_ad.core import labelled_defects

    train, spots = synthetic_root / "train" / "good", synthetic_root / "test" / "spot"
    out = tmp_path / "weighed.safetensors"
    assert run_cli(["fit", str(train), "-o", str(out), "--k-gallery", "4", "--device", "cpu", "--defect",
                    str(spots)]) == 0
    assert "note: part weights " in capsys.readouterr().err
    model = load(out)
    cal = model.calibration_
    assert cal.source == "leave_one_out" and cal.threshold_source == "false_alarm_rate"
    assert cal.check["weights"]["n_defect"] == len(list(spots.glob("*.png")))
    # weights that move: the scores and the threshold are the leave-one-out ones at the new weights
    monkeypatch.setattr(labelled_defects, "choose_weights", lambda good, defect, current, rate, coarse=True, **_: (
        (0.5, 0.0, 0.5), {"weights": [0.5, 0.0, 0.5], "caught": 2, "caught_before": 0, "n_defect": len(defect)}))
    from spade_ad import Spade
    from spade_ad.core.calibration import conformal_threshold

    moved = Spade(k_gallery=4, device="cpu", progress=False).fit(train, defect=spots)
    assert (moved.map_weight, moved.coarse_weight) == (0.5, 0.0)
    assert moved.calibration_.note.startswith("part weights chosen from these defects: map 1/2, coarse 0, kNN 1/2")
    loo = moved._scores_of(list(moved._leave_one_out_scores()))
    assert moved.calibration_.scores == pytest.approx(sorted(loo), abs=1e-12)
    assert moved.image_threshold_ == pytest.approx(conformal_threshold(sorted(loo), moved.false_alarm_rate)[0])


def test_fit_with_defects_refuses_a_score_without_parts_before_fitting(synthetic_root: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["fit", str(synthetic_root / "train" / "good"), "-o", str(tmp_path / "m.safetensors"),
                    "--image-score", "knn", "--defect", str(synthetic_root / "test" / "spot")]) == 2
    assert "image_score" in capsys.readouterr().err and not (tmp_path / "m.safetensors").exists()
    broken = tmp_path / "defects"  # an unreadable defect image is named before the fit, not after it
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"not a png")
    assert run_cli(["fit", str(synthetic_root / "train" / "good"), "-o", str(tmp_path / "m.safetensors"),
                    "--defect", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "bad.png" in err and "Traceback" not in err and not (tmp_path / "m.safetensors").exists()
