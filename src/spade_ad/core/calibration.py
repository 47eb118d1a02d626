"""Thresholds from good images only, with a stated false-alarm rate, and scores in units a person can read.

Image threshold (conformal, Bates et al. 2023): given n calibration scores of good images exchangeable with the
good images to come, the p-value of a score s is p(s) = (1 + #{calibration scores >= s}) / (n + 1), and flagging
p(s) <= alpha keeps the false-alarm rate on good images at or below alpha. Flagging p <= alpha is the same as
s > t with t the (n - m)-th smallest calibration score, m = floor(alpha (n + 1)) - 1. The smallest reachable alpha
is 1 / (n + 1): below it no score can be flagged at that rate, so the threshold falls back to the largest good score
and `Calibration.note` says so.

Where the rate is within a few multiples of 1/(n + 1) (alpha (n + 1) < TAIL_MULTIPLE), the conformal quantile is
one of the few largest scores, so one or two unusual images set it (a rare good part, or a defective part in the
training folder). There the threshold is the alpha point of an exponential tail fitted to the upper quarter of the
scores (`tail_threshold`; its scale from the median excess, and fitted without the `suspects`, so robust to a few
extreme scores) when that lies below the conformal quantile, but never
below the conformal quantile at twice the rate: the rate is then an estimate, and the guarantee it does hold,
(1 + #{calibration scores above it}) / (n + 1) <= 2 alpha, is what `Calibration.guaranteed_rate` reports and the
note states. `suspects` names the calibration images whose scores lie beyond anything the tail allows ("these
score like defects"), which `fit` prints and the model file keeps.

How the score parts are put on one scale and combined is `spade_ad.core.score_parts`; thresholds and part weights
from a few labelled defects are `spade_ad.core.labelled_defects`; new inspections against the calibration scores
(a shift) are `spade_ad.core.shift`.

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

from .score_parts import PARTS, combine_scores, robust_scale

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
    threshold_source: str = "false_alarm_rate"  # or "user", "best_f1", "recall"
    note: str = ""
    #: Held-out good scores against the training images' leave-one-out ones (`compare_good_scores`), when both
    #: exist; `warning` says in words when the two differ enough that the threshold would not hold.
    check: dict[str, Any] = field(default_factory=dict)
    warning: str = ""
    #: Training images whose leave-one-out scores lie far above the rest (`suspects`): defective parts slipped into
    #: the training folder, or rare good ones; and their scores, in the same order.
    suspects: list[str] = field(default_factory=list)
    suspect_scores: list[float] = field(default_factory=list)
    #: With the density normalisation the suspects are sought before it (`calibrate`): their scores there, in the
    #: same order, and where the other training images' scores end there (empty / None without it).
    suspect_raw_scores: list[float] = field(default_factory=list)
    suspect_raw_end: float | None = None
    #: Each training image's leave-one-out score parts [map, coarse, knn] (N x 3), in stored order: what the
    #: density normalisation divides by (`density_normalised`); empty when it is off (files from before: off).
    train_parts: list[list[float]] = field(default_factory=list)
    #: Each training image's capture session (`spade_ad.data.sessions`), in stored order, when leave-one-out scored
    #: every image without its whole session; empty otherwise (files from before: empty).
    sessions: list[int] = field(default_factory=list)
    #: Each calibration score's parts [map, coarse, knn] after the density normalisation and before scaling (n x 3,
    #: in the order of `scores`): what `Spade.calibrate` re-weighs every good score from when labelled defects move
    #: the part weights; empty in files from before.
    parts: list[list[float]] = field(default_factory=list)
    #: SHA-256 of each good image `Spade.calibrate` scored into `scores` (`ImageItem.sha256`; the training images'
    #: leave-one-out scores have none): an image given again is not counted twice.
    added_images: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def session_sizes(self) -> list[int]:
        """How many training images each capture session holds, in session order; [] without sessions."""
        return [int(c) for c in np.bincount(np.asarray(self.sessions, dtype=np.int64)) if c] if self.sessions else []

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


#: Fewest good scores an upper tail is fitted to (below, a too-small n keeps the largest good score).
TAIL_MIN_SCORES = 8
#: The tail is fitted to the good scores above this quantile.
TAIL_QUANTILE = 0.75
#: Below this many calibration scores at or above the rate's point (alpha (n + 1)), the tail model may set the
#: threshold: the conformal quantile is then one of the few largest scores.
TAIL_MULTIPLE = 5.0
#: A score is a suspect when the fitted tail expects fewer than this many good scores at or above it.
SUSPECT_EXPECTED = 0.001


def tail_threshold(values: np.ndarray, alpha: float) -> float | None:
    """The score exceeded by a share `alpha` of good parts, extrapolated from the upper tail of `values` (sorted):
    an exponential tail fitted to the scores above their 75th percentile (peaks over a threshold, as in
    extreme-value statistics), its scale from the median excess (median / ln 2) so that one unusual good image
    does not stretch it as it would the mean. None when there are too few scores or no spread above it."""
    if len(values) < TAIL_MIN_SCORES:
        return None
    start = float(np.quantile(values, TAIL_QUANTILE))
    excess = values[values > start] - start
    if excess.size == 0 or np.median(excess) <= 0:
        return None
    scale = float(np.median(excess)) / math.log(2)
    return start + scale * math.log(excess.size / len(values) / alpha)


def conformal_threshold(scores: Sequence[float], alpha: float) -> tuple[float, str]:
    """The threshold t (flag s > t) at false-alarm rate `alpha` on good images exchangeable with `scores`, and a
    note whenever the rate is estimated rather than guaranteed.

    - alpha (n + 1) >= TAIL_MULTIPLE: the conformal quantile; flagging s > t keeps the rate at most `alpha`.
    - 1 <= alpha (n + 1) < TAIL_MULTIPLE: the conformal quantile is one of the few largest scores, so one or two
      unusual images set it (the commutators' 1% point was their second-largest of a few hundred scores, 4.55,
      where every other ended at 2.63). The threshold is the fitted tail's `alpha` point (`tail_threshold`) where
      that is lower, but never below the conformal quantile at 2 alpha: the guarantee is then
      (1 + #{scores above t}) / (n + 1), at most 2 alpha, and the note says so.
    - alpha (n + 1) < 1 (too few scores for `alpha`): no threshold guarantees it. The largest good score would
      guarantee 1 / (n + 1), but one unusual good image then sets it, and with it the recall (on a 54-image metal
      plate, 30% of the defects against 77% at the next good score). The threshold is the tail's point, never
      above the largest score; the note gives the guarantee it does hold."""
    values = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(values)
    if n == 0:
        raise ValueError("no calibration scores")
    allowed = math.floor(alpha * (n + 1) + 1e-9) - 1  # calibration scores that may lie at or above a flagged score
    if allowed >= 0:
        conformal = float(values[n - 1 - allowed])
        if alpha * (n + 1) >= TAIL_MULTIPLE:
            return conformal, ""
        tail = tail_threshold(_without_suspects(values), alpha)
        if tail is None or tail >= conformal:
            return conformal, ""
        twice = math.floor(2 * alpha * (n + 1) + 1e-9) - 1
        threshold = max(tail, float(values[max(0, n - 1 - twice)]))
        if threshold >= conformal:
            return conformal, ""
        above = int((values > threshold).sum())
        note = (f"the conformal {alpha:g} point of {n} good scores is their {_ordinal(allowed + 1)}largest "
                f"({conformal:.4g}), which one or two unusual images can set: the threshold is the {alpha:g} "
                f"point of a tail fitted to the upper quarter of the scores instead, so {alpha:g} is an estimate "
                f"({above} of the {n} lie above it; guaranteed: {1 + above}/{n + 1} = {(1 + above) / (n + 1):.3g})")
        return threshold, note
    tail = tail_threshold(_without_suspects(values), alpha)
    if tail is None or tail >= values[-1]:
        note = (f"{n} good images can only guarantee a false-alarm rate of 1/{n + 1} = {1 / (n + 1):.3g}, above the "
                f"{alpha:g} asked for; the threshold is the largest good score (add good images for a lower rate)")
        return float(values[-1]), note
    above = int((values > tail).sum())
    note = (f"{n} good images can guarantee a false-alarm rate of 1/{n + 1} at best, above the {alpha:g} asked for: "
            f"the threshold is extrapolated from the upper tail of their scores, so {alpha:g} is an estimate "
            f"({above} of the {n} lie above it; guaranteed: {1 + above}/{n + 1} = {(1 + above) / (n + 1):.3g}); add "
            f"good images, or calibrate on good images from the line")
    return tail, note


def _without_suspects(values: np.ndarray) -> np.ndarray:
    """The scores without those `suspects` names: the tail a threshold is fitted to is the good parts', not that
    of a defective part slipped into the training folder."""
    odd = suspects(values)
    return np.delete(values, odd) if odd else values


def _ordinal(k: int) -> str:
    """"" for 1, "second " for 2, ...: the k-th largest in words."""
    return {1: "", 2: "second ", 3: "third ", 4: "fourth ", 5: "fifth "}.get(k, f"{k}th ")


def suspects(scores: Sequence[float]) -> list[int]:
    """Indices of the scores that lie beyond anything the other good scores' tail allows, largest first.

    For leave-one-out scores of training images these are parts that score like defects: defective parts slipped
    into the training folder, or good parts unlike every other (a rare pose); either way a person should look at
    them. The test is a generalised extreme-studentised-deviate procedure with an exponential tail instead of a
    normal: for k = 1 .. max(2, n // 20), the exponential tail of `tail_threshold` is fitted to the scores without
    the k largest, and the k-th largest is beyond it when the tail expects fewer than SUSPECT_EXPECTED of the n
    good scores at or above it; the suspects are the k largest for the largest such k (so that two outliers do not
    hide each other by stretching the tail). Measured on clean draws (gamma, normal, log-normal scores): none
    named in 98-100% of draws of 200 scores, 92-99% of 24. Empty below TAIL_MIN_SCORES scores."""
    values = np.asarray(scores, dtype=np.float64)
    n = len(values)
    if n < TAIL_MIN_SCORES:
        return []
    order = np.argsort(-values, kind="stable")
    found = 0
    for k in range(1, max(2, n // 20) + 1):
        rest = values[order[k:]]
        start = float(np.quantile(rest, TAIL_QUANTILE))
        excess = rest[rest > start] - start
        if excess.size == 0 or np.median(excess) <= 0:
            break
        scale = float(np.median(excess)) / math.log(2)
        expected = excess.size / len(rest) * n * math.exp(-(values[order[k - 1]] - start) / scale)
        if expected < SUSPECT_EXPECTED:
            found = k
    return [int(i) for i in order[:found]]


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


def calibrate(
    map_parts: Sequence[float], knn_scores: Sequence[float], pixel_samples: np.ndarray, *, image_score: str,
    false_alarm_rate: float, pixel_false_alarm_rate: float, source: str, map_weight: float = 0.5,
    names: Sequence[str] | None = None, coarse_parts: Sequence[float] | None = None, coarse_weight: float = 0.0,
    train_parts: np.ndarray | Sequence[Sequence[float]] | None = None, raw_parts: np.ndarray | None = None,
    max_share: float = 0.0,
) -> tuple[Calibration, dict[str, tuple[float, float]]]:
    """Thresholds and score scales from good images' score parts (density-normalised already, when the model normalises
    them) and a sample of their map values; with `names` (the images', in the order of the parts), the `suspects` among
    them are kept by name. `coarse_parts` with `coarse_weight` > 0: the third part, scaled as "coarse"; `max_share`: the
    share of the largest scaled part (`combine_scores`). `train_parts` (the training images' leave-one-out parts, N x 3)
    are kept in the calibration. `raw_parts` (n, 3): the same parts before the density normalisation, when they were
    normalised: the `suspects` are sought in the score they give (scaled and weighted alike), because the normalisation
    measures each image against its neighbours, which hides the very unusualness a suspect is (a defective training part
    whose neighbours include the other one scored like a good part); their scores reported are the calibration ones."""
    kept = [] if train_parts is None else np.asarray(train_parts, dtype=np.float64).reshape(-1, 3).tolist()
    if len(map_parts) == 0:
        return Calibration("none", [], false_alarm_rate, None, pixel_false_alarm_rate, None,
                           note="no thresholds: no good images to calibrate on", train_parts=kept), {}
    scale = {"map": robust_scale(map_parts), "knn": robust_scale(knn_scores)}
    if coarse_weight > 0 and coarse_parts is not None:
        scale["coarse"] = robust_scale(coarse_parts)
    combined = combine_scores(image_score, scale, np.asarray(map_parts), np.asarray(knn_scores), map_weight,
                              None if coarse_parts is None else np.asarray(coarse_parts), coarse_weight, max_share)
    order = np.argsort(combined, kind="stable")
    scores = combined[order].tolist()
    parts = np.stack([np.asarray(map_parts, dtype=np.float64),
                      np.zeros(len(combined)) if coarse_parts is None else np.asarray(coarse_parts, dtype=np.float64),
                      np.asarray(knn_scores, dtype=np.float64)], axis=1)[order]
    threshold, note = conformal_threshold(scores, false_alarm_rate)
    quantiles = pixel_quantiles(pixel_samples)
    basis = combined
    if raw_parts is not None and image_score == "fused" and len(raw_parts) == len(combined):
        raw = np.asarray(raw_parts, dtype=np.float64).reshape(-1, 3)
        raw_scale = {name: robust_scale(raw[:, j]) for j, name in enumerate(PARTS)}
        basis = combine_scores(image_score, raw_scale, raw[:, 0], raw[:, 2], map_weight, raw[:, 1], coarse_weight,
                               max_share)
    odd = suspects(basis) if names is not None and len(names) == len(combined) else []
    raw_found = basis is not combined and bool(odd) and len(odd) < len(basis)
    return Calibration(
        source, scores, false_alarm_rate, threshold, pixel_false_alarm_rate,
        pixel_threshold_at(quantiles, pixel_false_alarm_rate), quantiles, float(np.median(scores)), note=note,
        suspects=[str(names[i]) for i in odd] if names is not None else [],
        suspect_scores=[float(combined[i]) for i in odd], train_parts=kept,
        suspect_raw_scores=[float(basis[i]) for i in odd] if raw_found else [],
        suspect_raw_end=float(np.delete(basis, odd).max()) if raw_found else None, parts=parts.tolist(),
    ), scale


def rescored(calibration: Calibration, scores: Sequence[float]) -> Calibration:
    """A copy of `calibration` with new `scores` for the same good images (in the order of its `parts`, e.g. the
    parts at other weights): the scores sorted with their parts, the median and the image threshold at the
    calibration's false-alarm rate recomputed; the pixel threshold kept."""
    values = np.asarray(scores, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    cal = Calibration.from_json(calibration.to_json())
    cal.scores = values[order].tolist()
    if len(cal.parts) == len(values):
        cal.parts = np.asarray(cal.parts, dtype=np.float64).reshape(-1, 3)[order].tolist()
    cal.median = float(np.median(values)) if len(values) else None
    return moved(cal, false_alarm_rate=cal.false_alarm_rate) if len(values) else cal


def suspects_warning(calibration: Calibration) -> str:
    """`fit`'s line about the training images that score like defects ("" when there are none)."""
    if not calibration.suspects:
        return ""
    count = len(calibration.suspects)
    if calibration.suspect_raw_end is not None and len(calibration.suspect_raw_scores) == count:
        # sought before the density normalisation (which measures them against each other): shown there too
        shown, end = calibration.suspect_raw_scores, calibration.suspect_raw_end
        basis = "leave-one-out score before the density normalisation"
    else:
        rest = [s for s in calibration.scores if s not in set(calibration.suspect_scores)]
        shown, end, basis = calibration.suspect_scores, max(rest) if rest else float("nan"), "leave-one-out score"
    listed = ", ".join(f"{name} ({score:.3g})" for name, score in zip(calibration.suspects, shown))
    return (f"{'this training image scores' if count == 1 else f'these {count} training images score'} like "
            f"{'a defect' if count == 1 else 'defects'} ({basis}; the other good images end at {end:.3g}): "
            f"{listed}; check "
            f"{'it' if count == 1 else 'them'}: a defective part in the training folder raises every threshold; "
            f"refit without {'it' if count == 1 else 'them'} (spade-ad fit ... --exclude NAME), or keep a rare good "
            f"part")


def compare_good_scores(reference: Sequence[float], new: Sequence[float], *, threshold: float, rate: float,
                        reference_name: str, new_name: str, advice: str) -> dict[str, Any]:
    """Do `new` good scores sit above the `reference` good scores a threshold came from? A one-sided Mann-Whitney
    test (scipy) and the share of `new` above `threshold`. `warning` is set, in words, when the test says so
    (p < 0.05) and that share exceeds twice the `rate` plus one image (what a threshold at `rate` can miss by
    chance on len(new) images); `advice` says what to do about it."""
    from scipy.stats import mannwhitneyu

    ref, fresh = np.asarray(reference, dtype=np.float64), np.asarray(new, dtype=np.float64)
    if len(ref) < 2 or len(fresh) < 2:
        return {}
    p_value = float(mannwhitneyu(fresh, ref, alternative="greater").pvalue)
    flagged = float((fresh > threshold).mean())
    shifted = p_value < 0.05 and flagged > 2 * rate + 1 / len(fresh)
    result = {"test": "mann-whitney u, one-sided", "p_value": p_value, "n_reference": len(ref),
              "n_new": len(fresh), "flagged": flagged, "rate": rate, "shifted": shifted, "warning": ""}
    if shifted:
        result["warning"] = (f"the {new_name} score above the {reference_name} (Mann-Whitney p = {p_value:.2g}): "
                             f"{100 * flagged:.0f}% of them lie above the threshold, against "
                             f"{100 * rate:g}% asked; {advice}")
    return result


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
