"""Has the line drifted? Two tests on a model's last `window` inspections in the record, against what the model was
calibrated on (its good images' leave-one-out or validation scores, kept in the record's model row):

- the flag rate: the share of the window flagged against the calibrated false-alarm rate (the conformal rate
  `(k + 1) / (n + 1)`, k of the n good calibration scores above the threshold), one-sided. The test is the binomial
  test with the calibrated rate's own uncertainty: with k of n calibration scores above the threshold, the share of
  good parts above it is Beta(k + 1, n - k) distributed, so the flagged count of a window of good parts is
  beta-binomial (`scipy.stats.betabinom`), exact under exchangeability. A plain binomial test at the rate
  (`scipy.stats.binomtest`, also reported) takes the rate as known and, with a few hundred calibration images,
  reports drift on an unchanged line far more often than `alpha` (a test here shows it). Real defects raise the
  flag rate too: on a line with a known defect rate, read it with that in mind;
- the good-looking scores: the window's images that passed against the calibration scores at or below the same
  threshold (both sides conditioned alike), two-sided Mann-Whitney U test (`scipy.stats.mannwhitneyu`): new lighting
  or a new batch of material moves the scores of good parts before it makes them flagged.

Inspections labelled "defect" on the review page (real defects) are left out of both tests: the calibrated rate is
a false-alarm rate, the rate of good parts flagged, and a real defect is not a false alarm (the report says how many
were left out). Those labelled "good" stay in (a flagged one is a false alarm indeed).

The line has drifted when either p-value is below `alpha`. With fewer than `min_n` inspections in the window (or
fewer than `min_n` good-looking ones for the second test) a test is not made, and the report says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from . import Record

__all__ = ["DriftReport", "check_drift"]


@dataclass
class DriftReport:
    """The figures of one drift check (see the module's description) and its one-line `verdict`."""

    model_id: str
    model_name: str
    window: int
    n: int
    flagged: int
    flag_rate: float | None
    calibrated_rate: float | None
    flag_p_value: float | None
    binomial_p_value: float | None
    n_good: int
    n_calibration: int
    labelled_defects: int
    median_good_score: float | None
    median_calibration_score: float | None
    score_p_value: float | None
    alpha: float
    drifted: bool
    reasons: list[str] = field(default_factory=list)
    verdict: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def check_drift(record: Record, model: str | None = None, *, window: int = 500, alpha: float = 0.01,
                min_n: int = 20) -> DriftReport:
    """The drift report of `model` (id, id prefix or name; default the newest model with inspections) over its last
    `window` inspections in `record` (less those labelled "defect": real defects are not false alarms)."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    row = record.model(model)
    window_rows = record.recent(row["id"], window)
    recent = [r for r in window_rows if r.get("label") != "defect"]
    labelled_defects = len(window_rows) - len(recent)
    threshold = row["image_threshold"]
    calibration = [float(s) for s in row["calibration_scores"]]
    n = len(recent)
    flagged = sum(1 for r in recent if r["verdict"] == "defect")
    good = [float(r["score"]) for r in recent if r["verdict"] == "good" and r["score"] is not None]
    cal_good = [s for s in calibration if threshold is None or s <= threshold]
    calibrated_rate = None
    above = 0  # calibration scores above the threshold
    if threshold is not None and calibration:
        above = sum(1 for s in calibration if s > threshold)
        calibrated_rate = (1 + above) / (len(calibration) + 1)
    reasons: list[str] = []
    notes: list[str] = []
    flag_p = score_p = binomial_p = None
    if calibrated_rate is not None and n >= min_n:
        flag_p = float(stats.betabinom.sf(flagged - 1, n, above + 1, len(calibration) - above))
        binomial_p = float(stats.binomtest(flagged, n, calibrated_rate, alternative="greater").pvalue)
        if flag_p < alpha:
            reasons.append(f"flag rate {flagged}/{n} = {flagged / n:.1%} against the calibrated "
                           f"{calibrated_rate:.1%} (p = {flag_p:.2g})")
    elif calibrated_rate is None:
        notes.append("no threshold or calibration scores: flag rate not tested")
    if len(good) >= min_n and len(cal_good) >= min_n:
        score_p = float(stats.mannwhitneyu(good, cal_good, alternative="two-sided").pvalue)
        if score_p < alpha:
            reasons.append(f"good-looking scores moved: median {np.median(good):.4g} against the calibration's "
                           f"{np.median(cal_good):.4g} (Mann-Whitney p = {score_p:.2g})")
    name = f"{row['name']} ({row['id'][:12]})"
    left_out = f" ({_count(labelled_defects, 'labelled defect')} left out)" if labelled_defects else ""
    last = f"last {_count(n, 'inspection')}{left_out}"
    if n < min_n:
        verdict = f"not enough inspections to tell for {name}: {n} in the window, {min_n} needed{left_out}"
    elif reasons:
        verdict = f"DRIFTED: {name}, {last}: " + "; ".join(reasons)
    else:
        tested = []
        if flag_p is not None:
            tested.append(f"flag rate {flagged}/{n} = {flagged / n:.1%} against {calibrated_rate:.1%} "
                          f"(p = {flag_p:.2g})")
        if score_p is not None:
            tested.append(f"good-looking scores like the calibration's (p = {score_p:.2g})")
        else:
            notes.append(f"{len(good)} good-looking scores: too few to compare ({min_n} needed)")
        verdict = f"no drift: {name}, {last}: " + "; ".join(tested + notes)
    return DriftReport(
        model_id=row["id"], model_name=row["name"], window=window, n=n, flagged=flagged,
        flag_rate=flagged / n if n else None, calibrated_rate=calibrated_rate, flag_p_value=flag_p,
        binomial_p_value=binomial_p, n_good=len(good), n_calibration=len(cal_good),
        labelled_defects=labelled_defects, median_good_score=_median(good),
        median_calibration_score=_median(cal_good), score_p_value=score_p, alpha=alpha, drifted=bool(reasons),
        reasons=reasons, verdict=verdict,
    )
