"""`Spade`'s calibration steps (a mixin of `spade_ad.estimators.spade.Spade`): the good images' scores behind the
thresholds (leave-one-out over the training images, held-out or validation images), the score parts' scales and
density normalisation, `calibrate` on more good (and a few defective) images, and the combination with earlier
calibration scores. The maths is in `spade_ad.core.calibration`; this is the estimator's side of it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Self

import numpy as np

from .. import settings as settings_table
from ..core import calibration, labelled_defects, score_parts
from ..core.features import SkipCallback
from ..core.geometry import plan_geometry
from ..core.maps_numpy import as_roi, roi_grid
from ..core.scoring import leave_one_out
from ..core.tiled import TileSettings
from ..core.tiled import leave_one_out as tiled_leave_one_out
from ..data.inputs import ImageItem, collect_images
from ..errors import SettingError
from ..settings import SearchSettings
from .detector import ScoredImage

PIXEL_SAMPLES_PER_IMAGE = 20_000
"""Map values kept per good image for the pixel threshold's quantiles (a regular subsample of each map)."""


def _unscaled_fused() -> SettingError:
    """Why image_score="fused" cannot be fitted without calibration scores (its parts are scaled by their spread)."""
    return SettingError("image_score", "needs good images' calibration scores to scale its parts: leave-one-out "
                        "over at least 2 training images, held-out images (calibration=holdout, from 10 images) or "
                        "validation images", "fused", "map_top, map_max or knn, or more good images")


def _pixel_sample(anomaly_map: np.ndarray) -> np.ndarray:
    """The regular subsample of a map whose values the pixel threshold's quantiles are taken from (about
    PIXEL_SAMPLES_PER_IMAGE values). A sample of a sample is itself, so the parts `calibrate` keeps to recalibrate
    can hold this instead of the map."""
    step = max(1, int(np.sqrt(anomaly_map.size / PIXEL_SAMPLES_PER_IMAGE)))
    return anomaly_map[::step, ::step]


class CalibrationSteps:
    """What `Spade` does to calibrate; its attributes are `Spade`'s (settings and fitted state)."""

    def _split_calibration(self, items: list[ImageItem]) -> tuple[list[ImageItem], list[ImageItem]]:
        """Set aside `calibration_fraction` of the items (at least 1, and only with >= 10 items), by `seed`."""
        n_held = round(self.calibration_fraction * len(items))
        if self.calibration_fraction == 0 or len(items) < 10:
            return items, []
        held = set(np.random.default_rng(self.seed).choice(len(items), size=max(1, n_held), replace=False).tolist())
        return [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held]

    def _held_out_scores(
        self, held_out: list[ImageItem], skip_bad: bool, on_skip: SkipCallback | None
    ) -> Iterator[ScoredImage]:
        """The score parts and map of each held-out good image; none when nothing was held out."""
        if held_out:
            yield from self._predict_parts(held_out, skip_bad=skip_bad, on_skip=on_skip)

    def _leave_one_out_scores(self) -> Iterator[ScoredImage]:
        """The score parts and map of every training image scored without itself (without its whole capture session
        when fit found sessions: `sessions_`)."""
        if self.store_.n_images < 2:
            return
        sessions = getattr(self, "sessions_", None)
        groups = None if sessions is None else sessions.labels
        k_density = settings_table.density_k(self)
        if self.tile_size is not None:
            parts = tiled_leave_one_out(self.store_, self.backbone_.strides, self.backbone_.channels,
                                        TileSettings.of(self), groups)
        else:
            parts = leave_one_out(self.store_, self.backbone_.strides[0], k_image=self.k_image,
                                  k_gallery=self.k_gallery, search=SearchSettings.of(self), device=self.device_,
                                  density_k=k_density, groups=groups)
        for _, knn, anomaly_map, coarse_map, near in parts:
            anomaly_map = self._inside_roi(anomaly_map)
            coarse_part = 0.0 if coarse_map is None else self._coarse_score(self._inside_roi(coarse_map))
            yield ScoredImage(self._map_score(anomaly_map), knn, anomaly_map, coarse_part=coarse_part,
                              near=near if k_density else None)

    def _inside_roi(self, anomaly_map: np.ndarray) -> np.ndarray:
        """A training image's map with NaN outside the region of interest (its own geometry, planned on the ROI's
        size); the map itself without one."""
        if self.roi_ is None:
            return anomaly_map
        inside = roi_grid(self.roi_, plan_geometry(self.roi_.shape, self.image_size, self.resize).crop_box,
                          self.roi_.shape, anomaly_map.shape)
        return np.where(inside, anomaly_map, np.float32(np.nan))

    def _calibrate(self, parts: Iterable[ScoredImage], source: str, train_parts: np.ndarray | None = None) -> None:
        """Score scales, the image threshold at `false_alarm_rate` (conformal) and the pixel threshold at
        `pixel_false_alarm_rate`, from good images' score parts and maps. With density_k, the parts are divided by
        their local density first: over the training images' leave-one-out parts, which are these parts
        themselves for leave-one-out calibration, else `train_parts` (or those the model keeps)."""
        scored, pixels = [], []
        for part in parts:
            scored.append(part._replace(anomaly_map=None))
            sample = _pixel_sample(part.anomaly_map).ravel()
            pixels.append(sample[~np.isnan(sample)])  # outside the region of interest: not scored
        raw = self._parts_array(scored)
        train = None
        if settings_table.density_k(self):
            train = raw if source == "leave_one_out" else \
                train_parts if train_parts is not None else getattr(self, "_train_parts", None)
            if train is not None and not len(train):
                train = None
        normalised = self._normalised_parts(scored, raw, train)
        self.calibration_, self.score_scale_ = calibration.calibrate(
            normalised[:, 0], normalised[:, 2], np.concatenate(pixels) if pixels else np.zeros(0),
            image_score=self.image_score, false_alarm_rate=self.false_alarm_rate,
            pixel_false_alarm_rate=self.pixel_false_alarm_rate, source=source, map_weight=self.map_weight,
            names=self.train_names_ if source == "leave_one_out" else None, coarse_parts=normalised[:, 1],
            coarse_weight=float(self.coarse_weight) if settings_table.uses_coarse(self) else 0.0,
            train_parts=train, raw_parts=raw if train is not None else None, max_share=float(self.max_share),
        )
        sessions = getattr(self, "sessions_", None)
        self.calibration_.sessions = [] if sessions is None else sessions.labels.tolist()
        self._apply_calibration()

    @staticmethod
    def _parts_array(parts: Sequence[ScoredImage]) -> np.ndarray:
        """The score parts (n, 3) [map, coarse, knn] of `ScoredImage`s (`score_parts.PARTS`)."""
        return np.array([(p.map_part, p.coarse_part, p.knn_part) for p in parts], dtype=np.float64).reshape(-1, 3)

    def _normalised_parts(self, parts: Sequence[ScoredImage], raw: np.ndarray, train: np.ndarray | None
                          ) -> np.ndarray:
        """`raw` parts of `parts` divided by their local density over `train` (None or density_k 0: unchanged)."""
        k = settings_table.density_k(self)
        if not k or train is None or not len(raw) or any(p.near is None for p in parts):
            return raw
        return np.concatenate([score_parts.density_normalised(raw[i:i + 1], np.asarray(p.near)[None], train, k)
                               for i, p in enumerate(parts)])

    def _scores_of(self, parts: Iterable[ScoredImage], scale: dict[str, tuple[float, float]] | None = None
                   ) -> np.ndarray:
        """Image scores of `ScoredImage`s, at the current score scales or at `scale`."""
        parts = list(parts)
        return self._combined(self._normalised_of(parts), scale)

    def _normalised_of(self, parts: Sequence[ScoredImage]) -> np.ndarray:
        """The density-normalised parts (n, 3) of `ScoredImage`s, over the training parts the model keeps."""
        return self._normalised_parts(parts, self._parts_array(parts), getattr(self, "_train_parts", None))

    def _check_calibration(self, reference: Sequence[float] | np.ndarray, new: Sequence[float] | np.ndarray,
                           reference_name: str, new_name: str, advice: str) -> None:
        """Compare `new` good scores with `reference` good scores on the same scale (`calibration.
        compare_good_scores`, at the threshold the reference alone would give) and keep the outcome in
        `calibration_.check` and `calibration_.warning`."""
        if len(reference) < 2:
            return
        cal = self.calibration_
        threshold, _ = calibration.conformal_threshold(reference, cal.false_alarm_rate)
        cal.check = calibration.compare_good_scores(
            reference, new, threshold=threshold, rate=cal.false_alarm_rate, reference_name=reference_name,
            new_name=new_name, advice=advice)
        cal.warning = cal.check.get("warning", "")

    def calibrate(self, good: Any, *, defect: Any = None, recall: float | None = None, skip_bad: bool = False,
                  on_skip: SkipCallback | None = None, combine: bool = False, roi: Any = None,
                  choose_weights: bool = True, keep_rate: bool = False) -> Self:
        """Recalibrate a fitted model on other good images (thresholds at the model's false-alarm rates). With a few
        labelled `defect` images, move the image threshold to the best F1 on good + defect images (as other tools
        do), or with `recall` to the highest threshold that catches that share of them; the false-alarm rate is then
        no longer guaranteed: `calibration_.threshold_source` says "best_f1" or "recall" and `calibration_.note`
        gives the recall and false-alarm rate measured on these images. When the new good images score above the
        previous calibration scores, `calibration_.warning` says so. With `combine`, the new good images' scores
        are added to the calibration scores the model has (at its score scales; its pixel threshold kept) instead of
        replacing them: a few labelled images then refine the threshold rather than set it alone; a good image
        whose content is already in them (`calibration_.added_images`, by SHA-256) is not added again, and
        `calibration_.check["repeated"]` counts those. The stored features are not changed. `roi` sets a new region
        of interest first (see `fit`): the new thresholds are computed inside it (with `combine`, the earlier scores
        came from the earlier region). With `defect`, `choose_weights` and the fused score, the part weights
        (`map_weight`, `coarse_weight`) move to the share these defects support when it catches clearly more of
        them (`labelled_defects.choose_weights`), and every calibration score is re-weighed from its kept parts;
        `calibration_.check["weights"]` keeps the figures. `keep_rate`: the defects choose the weights only, and
        the image threshold stays at the false-alarm rate (guaranteed as before); the note gives the recall it
        has on them."""
        self._check_fitted()
        if roi is not None:
            self.roi_ = as_roi(roi)
        if recall is not None:
            recall = float(recall)
            if defect is None or not 0 < recall <= 1:
                raise SettingError("recall", "needs labelled defect images and a share in (0, 1]", recall,
                                   "e.g. --defect DIR --recall 0.95")
            if keep_rate:
                raise SettingError("recall", "sets the image threshold, which keep_rate keeps at the false-alarm rate",
                                   recall, "one of --recall and --keep-rate")
        if defect is not None:
            defect = _checked_defects(defect, skip_bad)
        before, old_scale, new_parts = list(self.calibration_.scores), self.score_scale_, []
        previous = self.calibration_
        items, keys, repeated = _unseen(collect_images(good), previous.added_images if combine and before else ())
        if items or not (combine and before):
            self._calibrate(self._kept(self._predict_parts(items, skip_bad=skip_bad, on_skip=on_skip), new_parts),
                            "validation")
            self.calibration_.added_images = [key for key in (keys.get(id(p.item)) for p in new_parts) if key]
            self._check_calibration(before, self._scores_of(new_parts, old_scale), "previous calibration scores",
                                    "new good images", "the new thresholds come from the new images")
        if combine and before:
            self._combine_calibration(previous, new_parts, old_scale)
        self.calibration_.check = {**self.calibration_.check, "repeated": repeated} if repeated else \
            self.calibration_.check
        if defect is not None:
            defect_parts = [part._replace(anomaly_map=None)
                            for part in self._predict_parts(defect, skip_bad=skip_bad, on_skip=on_skip)]
            weights = self._choose_weights(defect_parts) \
                if choose_weights and self.image_score == "fused" and defect_parts else ""
            defect_scores = self._scores_of(defect_parts)
            good_scores = self.calibration_.scores
            if keep_rate:
                threshold = self.calibration_.image_threshold
            elif recall is None:
                threshold, source = labelled_defects.best_f1_threshold(good_scores, defect_scores), "best_f1"
            else:
                threshold, source = labelled_defects.recall_threshold(good_scores, defect_scores, recall), "recall"
            if not keep_rate:
                self.calibration_ = calibration.moved(self.calibration_, image=threshold, source=source)
            caught = float(np.mean(np.asarray(defect_scores) > threshold))
            flagged = float(np.mean(np.asarray(good_scores) > threshold))
            self.calibration_.check = {**self.calibration_.check, "recall": caught, "false_alarms": flagged,
                                       "n_defect": len(defect_scores)}
            n_good, n_defect = self.calibration_.n, len(defect_scores)
            if keep_rate:  # the rate's own note (its guarantee) follows
                note = (f"image threshold kept at the false-alarm rate {self.false_alarm_rate:g}: it flags "
                        f"{100 * caught:.1f}% of these {n_defect} defects and {100 * flagged:.1f}% of the {n_good} "
                        f"good images; {self.calibration_.note}")
            else:
                note = (f"image threshold {'at the best F1' if recall is None else f'for a recall of {recall:g}'} on "
                        f"{n_good} good and {n_defect} defective images: it flags {100 * caught:.1f}% of these "
                        f"defects and {100 * flagged:.1f}% of these good images; the false-alarm rate is measured, "
                        f"not guaranteed")
            self.calibration_.note = weights + note
            self._apply_calibration()
        return self

    def _check_defect_weights(self, validation: Any, defect: Any, skip_bad: bool) -> list[ImageItem]:
        """`fit(defect=...)` before anything is computed, so that no fit is lost to it: only a calibrated fused
        score has part weights to choose, and the defect images must be there and (without `skip_bad`) readable.
        Returns their items."""
        if self.image_score != "fused":
            raise SettingError("image_score", "has no part weights for labelled defects to choose (only fused has)",
                               self.image_score, "fit without --defect, or with image_score=fused")
        if self.calibration == "none" and validation is None:
            raise SettingError("calibration", "leaves no good scores to weigh labelled defects against",
                               self.calibration, "leave_one_out or holdout, or fit without --defect")
        return _checked_defects(defect, skip_bad)

    @staticmethod
    def _kept(parts: Iterable[ScoredImage], into: list[ScoredImage] | None) -> Iterator[ScoredImage]:
        """`parts` passed through; with `into`, each one's score parts and pixel sample (not its whole map) are
        also appended to it, to recalibrate from later (`calibrate`, `_fit_weights`)."""
        for part in parts:
            if into is not None:
                into.append(part._replace(anomaly_map=_pixel_sample(part.anomaly_map)))
            yield part

    def _fit_weights(self, defect: Any, skip_bad: bool, on_skip: SkipCallback | None) -> None:
        """`fit(defect=...)`: the part weights from labelled defects (`_choose_weights`) against the good scores
        fit calibrated on; when they move, the calibration is recomputed from the same good images at the new
        weights (thresholds at the false-alarm rates, suspects sought again), the figures kept."""
        good, self._good_parts = self._good_parts or [], None
        parts = [part._replace(anomaly_map=None)
                 for part in self._predict_parts(defect, skip_bad=skip_bad, on_skip=on_skip)]
        weights = (self.map_weight, self.coarse_weight)
        sentence = self._choose_weights(parts) if parts else "no defect image could be read: part weights kept; "
        if (self.map_weight, self.coarse_weight) != weights and self.calibration_.source == "leave_one_out":
            check = self.calibration_.check
            self._calibrate(iter(good), "leave_one_out")  # the same scores; the suspects sought at the new weights
            self.calibration_.check = check
        self.calibration_.note = sentence + self.calibration_.note

    def _choose_weights(self, defect: list[ScoredImage]) -> str:
        """`calibrate`'s part weights from labelled defects (`labelled_defects.choose_weights`) against every good
        score of the calibration, from the parts it keeps: when they move, those scores are re-weighed and the
        thresholds recomputed (the scales, which are per part, stay). Returns the sentence the calibration note
        starts with."""
        cal = self.calibration_
        coarse = settings_table.uses_coarse(self)
        current = (float(self.map_weight), float(self.coarse_weight) if coarse else 0.0,
                   1.0 - float(self.map_weight) - (float(self.coarse_weight) if coarse else 0.0))
        good = np.asarray(cal.parts, dtype=np.float64).reshape(-1, 3)
        if len(good) != cal.n:
            return (f"part weights kept ({_shares(current, coarse)}): the earlier calibration scores' parts are not "
                    f"in this model file (written before they were kept); calibrate with --replace, or refit, to let "
                    f"defects choose them; ")
        weights, figures = labelled_defects.choose_weights(
            score_parts.scaled_parts(good, self.score_scale_),
            score_parts.scaled_parts(self._normalised_of(defect), self.score_scale_), current,
            rate=self.false_alarm_rate, coarse=coarse, max_share=float(self.max_share))
        if weights != current:
            self.map_weight, self.coarse_weight = weights[0], weights[1]
            self.calibration_ = calibration.rescored(cal, self._combined(good))
            self._apply_calibration()
        self.calibration_.check = {**self.calibration_.check, "weights": figures}
        caught = f"{figures['caught']} of these {figures['n_defect']} defects above the good images' threshold"
        if weights == current:
            return (f"part weights kept ({_shares(weights, coarse)}): no other share catches "
                    f"{labelled_defects.WEIGHT_MARGIN} more of these defects ({caught}); ")
        return (f"part weights chosen from these defects: {_shares(weights, coarse)} (it catches {caught}, "
                f"{figures['caught_before']} before); ")

    def _combine_calibration(self, previous: calibration.Calibration, new: list[ScoredImage],
                             scale: dict[str, tuple[float, float]]) -> None:
        """`calibrate(combine=True)`: the previous calibration with the new good images' scores and parts added
        (at its scales; the parts only when the previous calibration kept its own)."""
        merged = calibration.Calibration.from_json(previous.to_json())
        scores = list(map(float, previous.scores))
        if new:
            normalised = self._normalised_of(new)
            scores += list(map(float, self._combined(normalised, scale)))
            # parts unknown for the earlier scores (a file from before): `rescored` then sorts the scores alone
            merged.parts = [*previous.parts, *normalised.tolist()] if len(previous.parts) == previous.n else []
            merged.added_images = [*previous.added_images, *self.calibration_.added_images]
            merged.check, merged.warning = self.calibration_.check, self.calibration_.warning
            merged.source = previous.source if previous.source.endswith("+labelled") else \
                f"{previous.source}+labelled"
        merged.false_alarm_rate = float(self.false_alarm_rate)  # the rates asked now (`set_params`)
        if float(self.pixel_false_alarm_rate) != previous.pixel_false_alarm_rate and merged.pixel_quantiles:
            merged = calibration.moved(merged, pixel_false_alarm_rate=float(self.pixel_false_alarm_rate))
        self.calibration_, self.score_scale_ = calibration.rescored(merged, scores), scale
        self._apply_calibration()


def _checked_defects(defect: Any, skip_bad: bool) -> list[ImageItem]:
    """The labelled defect images' items, checked before any scoring so that nothing computed is lost to them:
    there (`collect_images`) and, without `skip_bad`, readable (an unreadable one raises its ImageReadError, naming
    the file; with `skip_bad` the scoring loop reports and skips it)."""
    items = collect_images(defect)
    if not skip_bad:
        for item in items:
            item.load()
    return items


def _unseen(items: list[ImageItem], known: Sequence[str]) -> tuple[list[ImageItem], dict[int, str], int]:
    """(items, keys, repeated): the items whose content (`ImageItem.sha256`) is neither in `known` nor earlier in
    `items`, their keys by `id(item)`, and how many were left out. An item whose file cannot be read is kept (the
    predict loop reports it)."""
    seen, fresh, keys, repeated = set(known), [], {}, 0
    for item in items:
        key = item.sha256()
        if key is not None and key in seen:
            repeated += 1
            continue
        if key is not None:
            seen.add(key)
            keys[id(item)] = key
        fresh.append(item)
    return fresh, keys, repeated


def _shares(weights: tuple[float, float, float], coarse: bool) -> str:
    """Part weights in words for the calibration note: "map 1/3, coarse 1/3, kNN 1/3" (no coarse without it)."""
    return ", ".join(f"{name} {_share(w)}" for name, w in zip(("map", "coarse", "kNN"), weights)
                     if coarse or name != "coarse")


def _share(weight: float) -> str:
    """A part weight as the fraction `labelled_defects.choose_weights` tries (1/6 steps), else as a number."""
    from fractions import Fraction

    fraction = Fraction(weight).limit_denominator(labelled_defects.WEIGHT_STEPS)
    return str(fraction) if abs(float(fraction) - weight) < 1e-9 else f"{weight:.3g}"
