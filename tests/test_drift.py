"""Drift (spade_ad.drift, `spade-ad drift`): the flag rate against the calibrated rate (binomial test) and the
good-looking scores against the model's calibration scores (Mann-Whitney), on records with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_run import run_cli
from spade_ad.drift import check_drift
from spade_ad.record import open_record

CALIBRATION = np.random.default_rng(0).normal(1.0, 0.2, 209)
THRESHOLD = float(np.quantile(CALIBRATION, 0.99))


def _model_row(model_id: str = "a" * 64) -> dict[str, object]:
    return {"id": model_id, "name": "bottle.safetensors", "kind": "model file", "settings_digest": "d" * 64,
            "image_threshold": THRESHOLD, "pixel_threshold": 1.0, "false_alarm_rate": 0.01,
            "calibration_source": "leave_one_out", "calibration_scores": json.dumps(sorted(CALIBRATION.tolist()))}


def _fill(target: Path | str, scores: np.ndarray, model_id: str = "a" * 64) -> None:
    with open_record(target) as record:
        record.register_model(_model_row(model_id))
        record.add([{"origin": "test", "source": f"{i}.png", "model_id": model_id, "score": float(s),
                     "verdict": "defect" if s > THRESHOLD else "good", "at_ms": 1_000 + i}
                    for i, s in enumerate(scores)])


@pytest.mark.parametrize("case", ["unchanged", "shifted", "flagging", "too_few"])
def test_drift_cases(record_target: str, case: str) -> None:
    rng = np.random.default_rng(1)
    scores = {"unchanged": rng.normal(1.0, 0.2, 400), "shifted": rng.normal(1.2, 0.2, 400),
              "flagging": np.where(rng.random(400) < 0.1, THRESHOLD + 1, rng.normal(1.0, 0.2, 400)),
              "too_few": rng.normal(3.0, 0.2, 10)}[case]
    _fill(record_target, scores)
    with open_record(record_target) as record:
        report = check_drift(record, window=300)
    assert report.n == min(300, len(scores)) and report.model_name == "bottle.safetensors"
    assert report.drifted == (case in ("shifted", "flagging")), report.verdict
    if case == "unchanged":
        assert report.verdict.startswith("no drift") and report.flag_p_value > 0.01 and report.score_p_value > 0.01
    elif case == "shifted":
        assert "good-looking scores moved" in report.verdict and report.score_p_value < 1e-6
    elif case == "flagging":
        assert "flag rate" in report.verdict and report.flag_p_value < 1e-4
    else:
        assert report.verdict.startswith("not enough inspections")
    assert report.calibrated_rate == pytest.approx((1 + int((CALIBRATION > THRESHOLD).sum())) / 210)


def test_window_takes_the_latest_inspections(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    _fill(tmp_path / "r.db", np.concatenate([rng.normal(1.6, 0.2, 300), rng.normal(1.0, 0.2, 200)]))
    with open_record(tmp_path / "r.db") as record:
        assert not check_drift(record, window=200).drifted  # the drifted start is out of the window
        assert check_drift(record, window=500).drifted


def test_flag_rate_test_holds_its_level_where_a_plain_binomial_test_does_not() -> None:
    """On unchanged lines (calibration and window drawn alike), the beta-binomial test reports drift at about
    alpha; the binomial test at the calibrated rate, which ignores that the rate was estimated, far more often."""
    from scipy import stats

    rng = np.random.default_rng(4)
    alpha, ours, plain, trials = 0.01, 0, 0, 400
    for _ in range(trials):
        calibration = rng.normal(0, 1, 209)
        threshold = np.sort(calibration)[-2]  # the conformal threshold at 1%: one calibration score above it
        flagged = int((rng.normal(0, 1, 500) > threshold).sum())
        ours += stats.betabinom.sf(flagged - 1, 500, 2, 208) < alpha
        plain += stats.binomtest(flagged, 500, 2 / 210, alternative="greater").pvalue < alpha
    assert ours / trials <= 2 * alpha
    assert plain / trials > 5 * alpha


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(3)
    _fill(tmp_path / "good.db", rng.normal(1.0, 0.2, 300))
    _fill(tmp_path / "bad.db", rng.normal(1.3, 0.2, 300))
    assert run_cli(["drift", tmp_path / "good.db"]) == 0
    assert capsys.readouterr().out.startswith("no drift: bottle.safetensors (aaaaaaaaaaaa)")
    assert run_cli(["drift", tmp_path / "bad.db", "--window", "100", "--json"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("DRIFTED: ") and json.loads(out.split("\n", 1)[1])["drifted"] is True
    assert run_cli(["drift", tmp_path / "good.db", "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "has no model 'nope'; known: bottle.safetensors (aaaaaaaaaaaa)" in err and len(err.splitlines()) == 1
    assert run_cli(["drift", tmp_path / "good.db", "--window", "0"]) == 2
