"""Thresholds from good images only, with a stated false-alarm rate, and scores in units a person can read.

Image threshold (conformal, Bates et al. 2023): given n calibration scores of good images exchangeable with the
good images to come, the p-value of a score s is p(s) = (1 + #{calibration scores >= s}) / (n + 1), and flagging
p(s) <= alpha keeps the false-alarm rate on good images at or below alpha. Flagging p <= alpha is the same as
s > t with t the (n - m)-th smallest calibration score, m = floor(alpha (n + 1)) - 1. The smallest reachable alpha
is 1 / (n + 1): below it no score can be flagged at that rate, so the threshold falls back to the largest good score
and `Calibration.note` says so.

Calibration scores come from every training image by leave-one-out (each scored against the model without itself:
its own global feature is dropped from the kNN and its own maps from the gallery), so n is the number of good
images, not a tenth of it; or from a separate set of good images (`fit(..., validation=...)`).

Pixel threshold: the (1 - pixel_false_alarm_rate) quantile of the good images' leave-one-out map values, i.e. the
share of good pixels flagged. A small table of quantiles is kept so the rate can be changed without refitting.

Normalised score: 0 = the median good image, 1 = the image threshold (anything above 1 is flagged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import SettingError

#: Rates at which the good pixels' quantiles are kept (log-spaced from 1e-6 to 0.5), for `pixel_threshold_at`.
PIXEL_RATES = np.geomspace(1e-6, 0.5, 121)


@dataclass
class Calibration:
    """What the thresholds were computed from, kept in the model file."""

    source: str  # "leave_one_out", "validation" or "none"
    scores: list[float]  # image scores of the good calibration images (sorted)
    false_alarm_rate: float  # the image-level rate asked for
    image_threshold: float | None
    pixel_false_alarm_rate: float
    pixel_threshold: float | None
    pixel_quantiles: list[float] = field(default_factory=list)  # good-pixel quantiles at 1 - PIXEL_RATES
    median: float | None = None
    threshold_source: str = "false_alarm_rate"  # or "user", "best_f1"
    note: str = ""

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def guaranteed_rate(self) -> float | None:
        """The false-alarm rate the image threshold guarantees on good images (conformal bound), if any."""
        if self.image_threshold is None or not self.scores:
            return None
        exceed = sum(1 for s in self.scores if s > self.image_threshold)
        return (1 + exceed) / (self.n + 1)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def conformal_threshold(scores: Sequence[float], alpha: float) -> tuple[float, str]:
    """The threshold t such that flagging s > t keeps the false-alarm rate at most `alpha` on good images
    exchangeable with `scores`; and a note when n is too small for `alpha` (then t = the largest score)."""
    values = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(values)
    if n == 0:
        raise ValueError("no calibration scores")
    allowed = math.floor(alpha * (n + 1) + 1e-9) - 1  # calibration scores that may lie at or above a flagged score
    if allowed < 0:
        note = (f"{n} good images can only guarantee a false-alarm rate of 1/{n + 1} = {1 / (n + 1):.3g}, above the "
                f"{alpha:g} asked for; the threshold is the largest good score (add good images for a lower rate)")
        return float(values[-1]), note
    return float(values[n - 1 - allowed]), ""


def p_values(scores: np.ndarray | Sequence[float], calibration_scores: Sequence[float]) -> np.ndarray:
    """Conformal p-values: (1 + #{calibration scores >= s}) / (n + 1) for each s (small = unlike the good images)."""
    reference = np.sort(np.asarray(calibration_scores, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    at_or_above = len(reference) - np.searchsorted(reference, s, side="left")
    return (1 + at_or_above) / (len(reference) + 1)


def normalized_scores(scores: np.ndarray | Sequence[float], median: float, threshold: float) -> np.ndarray:
    """0 at the median good score, 1 at the threshold (scale-free, comparable between products): above 1 is flagged.

    A threshold set at or below the median good score (by hand) has no such scale; the scores are then measured
    from the threshold in units of |median| (or 1), so that above 1 still means flagged."""
    s = np.asarray(scores, dtype=np.float64)
    spread = threshold - median
    if spread > 0:
        return (s - median) / spread
    return 1.0 + (s - threshold) / (abs(median) or 1.0)


def pixel_quantiles(values: np.ndarray) -> list[float]:
    """Quantiles of good pixels' map values at 1 - PIXEL_RATES (what `pixel_threshold_at` interpolates)."""
    return np.quantile(values.astype(np.float64), 1 - PIXEL_RATES).tolist()


def pixel_threshold_at(quantiles: Sequence[float], rate: float) -> float:
    """The map value above which a share `rate` of good pixels lies (log-interpolated in the kept quantiles)."""
    rate = float(np.clip(rate, PIXEL_RATES[0], PIXEL_RATES[-1]))
    return float(np.interp(np.log(rate), np.log(PIXEL_RATES), np.asarray(quantiles, dtype=np.float64)))


def robust_scale(values: np.ndarray | Sequence[float]) -> tuple[float, float]:
    """(median, spread) of good scores: the spread is the interquartile range over 1.349 (a standard deviation for
    normal data), or the standard deviation, or 1, whichever is first positive. Used to put scores of different units
    on one scale before they are fused."""
    array = np.asarray(values, dtype=np.float64)
    median = float(np.median(array))
    q75, q25 = np.percentile(array, [75, 25])
    for spread in ((q75 - q25) / 1.349, float(array.std())):
        if spread > 1e-12:
            return median, float(spread)
    return median, 1.0


def combine_scores(image_score: str, scale: dict[str, tuple[float, float]], map_part: np.ndarray,
                   knn: np.ndarray) -> np.ndarray:
    """The image score from its two parts: the map's part (the mean of its top values, or with "map_max" its
    maximum: `spade_ad.maps.map_score`), the global kNN score, or ("fused") their average after each is scaled by
    its (median, spread) on good images."""
    map_part, knn = np.asarray(map_part, dtype=np.float64), np.asarray(knn, dtype=np.float64)
    if image_score in ("map_max", "map_top"):
        return map_part
    if image_score == "knn":
        return knn
    if "map" not in scale or "knn" not in scale:
        raise SettingError("image_score", "needs a calibrated model to scale its parts", image_score,
                           "calibrate the model on good images (spade-ad calibrate --good DIR), or map_top")
    (m1, s1), (m2, s2) = scale["map"], scale["knn"]
    return 0.5 * ((map_part - m1) / s1 + (knn - m2) / s2)


def calibrate(
    map_parts: Sequence[float], knn_scores: Sequence[float], pixel_samples: np.ndarray, *, image_score: str,
    false_alarm_rate: float, pixel_false_alarm_rate: float, source: str,
) -> tuple[Calibration, dict[str, tuple[float, float]]]:
    """Thresholds and score scales from good images' score parts and a sample of their map values."""
    if len(map_parts) == 0:
        return Calibration("none", [], false_alarm_rate, None, pixel_false_alarm_rate, None,
                           note="no thresholds: no good images to calibrate on"), {}
    scale = {"map": robust_scale(map_parts), "knn": robust_scale(knn_scores)}
    scores = sorted(combine_scores(image_score, scale, np.asarray(map_parts), np.asarray(knn_scores)).tolist())
    threshold, note = conformal_threshold(scores, false_alarm_rate)
    quantiles = pixel_quantiles(pixel_samples)
    return Calibration(
        source, scores, false_alarm_rate, threshold, pixel_false_alarm_rate,
        pixel_threshold_at(quantiles, pixel_false_alarm_rate), quantiles, float(np.median(scores)), note=note,
    ), scale


def best_f1_threshold(good_scores: Sequence[float], defect_scores: Sequence[float]) -> float:
    """The threshold t (flag s > t) with the best F1 on labelled good and defective scores: midway between the
    last score left unflagged and the next one, so that it is not tied to a sample."""
    scores = np.concatenate([np.asarray(good_scores, float), np.asarray(defect_scores, float)])
    labels = np.concatenate([np.zeros(len(good_scores), bool), np.ones(len(defect_scores), bool)])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    true_pos = np.cumsum(labels)
    flagged = np.arange(1, len(scores) + 1)
    f1 = 2 * true_pos / (flagged + labels.sum())
    distinct = np.r_[scores[:-1] != scores[1:], True]  # a threshold can only fall between distinct scores
    best = int(np.argmax(np.where(distinct, f1, -1)))
    below = scores[best + 1] if best + 1 < len(scores) else scores[best] - 1.0
    return float((scores[best] + below) / 2)


def moved(calibration: Calibration, *, image: float | None = None, false_alarm_rate: float | None = None,
          pixel: float | None = None, pixel_false_alarm_rate: float | None = None,
          source: str = "user") -> Calibration:
    """A copy of `calibration` with thresholds moved to a score or to a false-alarm rate (from the kept scores)."""
    cal = Calibration.from_json(calibration.to_json())
    if false_alarm_rate is not None:
        if not cal.scores:
            raise ValueError("a false-alarm rate needs a calibrated model")
        cal.image_threshold, cal.note = conformal_threshold(cal.scores, false_alarm_rate)
        cal.false_alarm_rate, cal.threshold_source = false_alarm_rate, "false_alarm_rate"
    if image is not None:
        cal.image_threshold, cal.threshold_source, cal.note = float(image), source, ""
        if cal.median is None:
            cal.median = 0.0
    if pixel_false_alarm_rate is not None:
        if not cal.pixel_quantiles:
            raise ValueError("a pixel false-alarm rate needs a calibrated model")
        cal.pixel_threshold = pixel_threshold_at(cal.pixel_quantiles, pixel_false_alarm_rate)
        cal.pixel_false_alarm_rate = pixel_false_alarm_rate
    if pixel is not None:
        cal.pixel_threshold = float(pixel)
    return cal
