"""Drift (spade_ad.record.drift, `spade-ad drift`): the flag rate against the calibrated rate (binomial test) and the
good-looking scores against the model's calibration scores (Mann-Whitney), on records with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_run import run_cli
from spade_ad.record import open_record
from spade_ad.record.drift import check_drift

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
    captured = capsys.readouterr()
    figures = json.loads(captured.out)  # stdout is the JSON alone: a script parses it
    assert figures["drifted"] is True and figures["verdict"].startswith("DRIFTED: ")
    assert captured.err.strip() == figures["verdict"]  # the human line on stderr
    assert run_cli(["drift", tmp_path / "good.db", "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "has no model 'nope'; known: bottle.safetensors (aaaaaaaaaaaa)" in err and len(err.splitlines()) == 1
    assert run_cli(["drift", tmp_path / "good.db", "--window", "0"]) == 2


def test_inspections_labelled_defect_are_not_false_alarms(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A line making real defects (10% of 300, labelled defect on the review page) has not drifted: they are left
    out of the false-alarm count, and the report says how many."""
    rng = np.random.default_rng(5)
    defects = rng.random(300) < 0.1
    _fill(tmp_path / "r.db", np.where(defects, THRESHOLD + 1, rng.normal(1.0, 0.2, 300)))
    with open_record(tmp_path / "r.db") as record:
        assert check_drift(record, window=300).drifted  # unlabelled, the defects look like false alarms
        for row in record.inspections():
            if row["verdict"] == "defect" and defects[int(row["source"].split(".")[0])]:
                record.set_label(row["id"], "defect", "ann")
        report = check_drift(record, window=300)
    left_out = int(defects.sum())
    assert not report.drifted, report.verdict
    assert report.labelled_defects == left_out and report.n == 300 - left_out
    assert f"last {300 - left_out} inspections ({left_out} labelled defects left out)" in report.verdict
    assert run_cli(["drift", tmp_path / "r.db", "--window", "300", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labelled_defects"] == left_out


def test_drift_reads_a_read_only_record_and_writes_nothing(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "mount"
    folder.mkdir()
    _fill(folder / "r.db", np.random.default_rng(6).normal(1.0, 0.2, 100))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    (folder / "r.db").chmod(0o444)
    folder.chmod(0o555)
    try:
        assert run_cli(["drift", folder / "r.db", "--window", "100"]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out.startswith("no drift: ")
        after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
        assert {name: after[name] for name in before} == before  # the record itself untouched
    finally:
        folder.chmod(0o755)


def test_drift_refuses_a_record_that_needs_migrating_in_one_line(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import sqlalchemy as sa

    from spade_ad.record import schema

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    with engine.begin() as connection:  # a release-1 record, as the first release wrote it
        schema.MIGRATIONS[0][1](connection)
        connection.execute(schema.versions.insert().values(version=1, applied_ms=0, release="0.1"))
    engine.dispose()
    assert run_cli(["drift", tmp_path / "old.db"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "has schema version 1, older than" in err and "opened read-only, so not migrated" in err
    with engine.connect() as connection:  # nothing migrated
        assert connection.execute(sa.select(schema.versions.c.version)).scalars().all() == [1]
    engine.dispose()
    assert run_cli(["drift", tmp_path / "missing.db"]) == 2
    assert "does not exist" in capsys.readouterr().err
