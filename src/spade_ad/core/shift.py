"""Is the line like the good images the threshold came from? `check_shift` compares new inspections' scores with the
calibration's (Mann-Whitney on the good-looking ones, the flag count against the rate otherwise) and says in words
what the shift implies for the false-alarm rate; `ShiftMonitor` runs it at checkpoints for the front doors that
score a line (`watch`, `serve`, `predict`), so that a new session shows in the log before it shows in the reject bin.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .calibration import Calibration

__all__ = ["ShiftMonitor", "check_shift"]


def check_shift(calibration: Calibration, scores: Sequence[float], *, alpha: float = 0.05,
                min_n: int = 20) -> str | None:
    """Do new inspections' scores sit above the good scores the threshold came from? A warning in words, or None.

    For a front door that watches a line (`watch`, `serve`): the first inspections' good-looking scores (at or
    below the image threshold) against the calibration scores at or below it (both sides conditioned alike), the
    drift test's two-sided Mann-Whitney U (`spade_ad.record.drift`). When p < `alpha` and the new scores are higher, the
    warning gives the share of the inspections flagged and the false-alarm rate the shift implies: the
    calibration scores moved by the median shift (Hodges-Lehmann) against the threshold, (1 + #above) / (n + 1).
    None when there is no threshold, fewer than `min_n` good-looking scores on either side, or no shift upward
    that would raise the rate past twice the one asked. `alpha` is 0.05 as in `compare_good_scores`: the rate
    condition guards against a warning for a shift that does not matter. On the generated line product's 40 good
    test images (second session): p = 0.036, shift 0.35, implied rate 11%, measured 10% (4 of 40)."""
    from scipy.stats import mannwhitneyu

    threshold = calibration.image_threshold
    if threshold is None or not calibration.scores:
        return None
    new = np.asarray(scores, dtype=np.float64)
    reference = np.asarray(calibration.scores, dtype=np.float64)
    good, cal_good = new[new <= threshold], reference[reference <= threshold]
    rate = calibration.false_alarm_rate
    n_flagged = int((new > threshold).sum())
    if len(new) >= min_n and n_flagged > (2 * rate) * len(new) + 1:
        # so many flagged that too few good-looking ones remain to compare: the flag count alone, against the rate
        # the threshold guarantees (binomial: with a run of real defects it is high too, and the words say so)
        from scipy.stats import binom

        p_flag = float(binom.sf(n_flagged - 1, len(new), max(rate, 1 / (len(reference) + 1))))
        if p_flag < alpha and len(good) < min_n:
            return (f"{n_flagged} of the last {len(new)} inspections are flagged ({100 * n_flagged / len(new):.0f}%) "
                    f"against the {100 * rate:g}% false-alarm rate the threshold was set for (binomial p = "
                    f"{p_flag:.2g}): a new session (lighting, material, camera) or a run of real defects; look at a "
                    f"few flagged parts, and if they are good recalibrate on good images from the line (spade-ad "
                    f"calibrate MODEL --good DIR) or refit")
    if len(good) < min_n or len(cal_good) < min_n:
        return None
    p_value = float(mannwhitneyu(good, cal_good, alternative="two-sided").pvalue)
    shift = float(np.median(good[:, None] - cal_good[None, :]))
    if p_value >= alpha or shift <= 0:
        return None
    implied = (1 + int((reference + shift > threshold).sum())) / (len(reference) + 1)
    flagged = float((new > threshold).mean())
    if implied <= 2 * rate and flagged <= 2 * rate + 1 / len(new):
        return None
    return (f"the last {len(new)} inspections score above the good images the threshold came from (Mann-Whitney "
            f"p = {p_value:.2g}, median shift {shift:.3g}): {100 * flagged:.0f}% of them flagged, and good parts "
            f"shifted so would be flagged at about {100 * implied:.0f}% against {100 * rate:g}% asked; recalibrate "
            f"on good images from the line (spade-ad calibrate MODEL --good DIR) or refit")


class ShiftMonitor:
    """`check_shift` for a front door that scores a line (`watch`, `serve`, `predict`): fed each score with `add`, it
    checks after the first 30, 100 and 300 scores, then every 1000, on the last 1000, and returns the warning then
    (None otherwise), so that a new session shows in the log before it shows in the reject bin; `finish` checks the
    rest at the end of a batch. Thread-safe."""

    CHECKS = (30, 100, 300)
    EVERY = 1000

    def __init__(self) -> None:
        import threading

        self.scores: list[float] = []  # the last EVERY scores
        self.warnings: list[str] = []
        self._count = 0
        self._lock = threading.Lock()

    def add(self, calibration: Calibration, score: float) -> str | None:
        with self._lock:
            self.scores.append(float(score))
            del self.scores[:-self.EVERY]
            self._count += 1
            if self._count not in self.CHECKS and self._count % self.EVERY:
                return None
            recent = list(self.scores)
        return self._check(calibration, recent)

    def finish(self, calibration: Calibration) -> str | None:
        """At the end of a batch (`predict`): the check on the last scores, unless `add` has just checked them
        (the warning then, or None)."""
        with self._lock:
            if self._count in self.CHECKS or not self._count % self.EVERY:
                return None
            recent = list(self.scores)
        return self._check(calibration, recent)

    def _check(self, calibration: Calibration, recent: list[float]) -> str | None:
        warning = check_shift(calibration, recent)
        if warning is not None:
            with self._lock:
                self.warnings.append(warning)
        return warning
