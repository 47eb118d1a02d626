"""What every fitted detector does once it has a score: thresholds, verdicts and the Prediction it returns.

Shared, torch-free, by the torch estimator (`spade_ad.estimators.spade.Spade`) and the torch-free runtime
(`spade_ad.estimators.runtime.Runtime`): both hold a `calibration_` (`spade_ad.core.calibration.Calibration`), a
`score_scale_` and an `image_score` setting, and inherit from `Detector` how scores are combined, how thresholds move
and how a Prediction is made, so the two paths cannot give different verdicts for the same score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import numpy as np

from .. import settings as settings_table
from ..core import calibration, score_parts
from ..core.calibration import Calibration, normalized_scores, p_values
from ..errors import SettingError
from .prediction import Prediction


class ScoredImage(NamedTuple):
    """One image through an estimator's predict loop: the parts of its image score (the map's, per `image_score`,
    the global kNN distance and, last, the coarsest level's own part and the nearest training images the density
    normalisation divides by) and its anomaly map at the network input size; with the full loop also what its
    `Prediction` is made of. Calibration reads the parts and the map; `_prediction` all of them."""

    map_part: float
    knn_part: float
    anomaly_map: np.ndarray
    item: Any = None  # the ImageItem (name, path)
    geometry: Any = None
    image: Any = None  # the decoded input, with keep_images
    original_map: np.ndarray | None = None
    neighbours: list[tuple[str, float]] | None = None
    explanation: Any = None
    #: The third part of the fused score: the coarsest level's own map's top 1% (0 when the model has none).
    coarse_part: float = 0.0
    #: The image's nearest training images by global feature (stored indices, nearest first; for a training
    #: image's leave-one-out parts, without itself): what the density normalisation divides by.
    near: Any = None


@runtime_checkable
class FittedModel(Protocol):
    """What the front doors (command line, watch, service, Ray, the record) may use of a fitted model, whichever
    estimator it is: `spade_ad.Spade` (torch) or `spade_ad.estimators.runtime.Runtime` (a bundle, no torch). Both
    satisfy it, and a test holds each of them to it, signatures included (an interface nobody checks drifts)."""

    uses_torch: ClassVar[bool]  # a torch model (a GPU may run it) rather than a bundle
    image_score: str
    calibration_: Calibration
    image_threshold_: float | None
    pixel_threshold_: float | None
    train_names_: list[str]
    thumbnails_: Any  # the training images' thumbnails ("why" pictures), or None

    def get_params(self, deep: bool = True) -> dict[str, Any]: ...

    def set_params(self, **params: Any) -> Any: ...

    def iter_predict(self, images: Any, *, original_size: bool = False, keep_images: bool = False,
                     skip_bad: bool = False, on_skip: Callable[..., None] | None = None,
                     explain: bool = False) -> Iterator[Prediction]: ...

    def predict(self, images: Any, *, original_size: bool = False, skip_bad: bool = False,
                on_skip: Callable[..., None] | None = None, explain: bool = False) -> list[Prediction]: ...

    def score(self, images: Any, *, skip_bad: bool = False,
              on_skip: Callable[..., None] | None = None) -> np.ndarray: ...

    def set_thresholds(self, *, image: float | None = None, false_alarm_rate: float | None = None,
                       pixel: float | None = None, pixel_false_alarm_rate: float | None = None) -> Any: ...

    def judged(self, prediction: Prediction, threshold: float | None = None) -> Prediction: ...

    def add(self, images: Any, **options: Any) -> Any: ...


class Detector:
    """Thresholds and verdicts of a fitted detector (a mixin: subclasses set `calibration_`, `score_scale_`,
    `image_score` and define `_check_fitted`)."""

    uses_torch: ClassVar[bool] = False
    calibration_: Calibration
    score_scale_: dict[str, tuple[float, float]]
    image_score: str
    map_weight: float
    coarse_weight: float
    max_share: float
    density_k: int
    tile_size: int | None
    train_names_: list[str]
    thumbnails_: Any = None

    def _check_fitted(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _apply_calibration(self) -> None:
        self.image_threshold_ = self.calibration_.image_threshold
        self.pixel_threshold_ = self.calibration_.pixel_threshold
        self.calibration_scores_ = list(self.calibration_.scores)
        self._train_parts = np.asarray(self.calibration_.train_parts, dtype=np.float64).reshape(-1, 3)

    def _normalised(self, parts: np.ndarray, near: Any) -> np.ndarray:
        """Score parts (n, 3) [map, coarse, knn] divided by their local density (`score_parts.density_normalised`
        over the images' nearest training images `near` (n, >= density_k)) when the model normalises them."""
        k = settings_table.density_k(self)
        train = getattr(self, "_train_parts", None)
        if not k or train is None or not len(train) or near is None:
            return np.asarray(parts, dtype=np.float64)
        return score_parts.density_normalised(parts, near, train, k)

    def _combine(self, map_part: np.ndarray, knn: np.ndarray, coarse: np.ndarray | None = None,
                 near: Any = None) -> np.ndarray:
        """Image scores from their parts, per the `image_score` setting: the map part, the kNN part and (fused,
        coarse_weight > 0) the coarse part, each divided by its local density first when density_k > 0."""
        map_part = np.asarray(map_part, dtype=np.float64)
        coarse = np.zeros_like(map_part) if coarse is None else np.asarray(coarse, dtype=np.float64)
        return self._combined(self._normalised(np.stack([map_part, coarse, np.asarray(knn, dtype=np.float64)], 1),
                                               near))

    def _combined(self, parts: np.ndarray, scale: dict[str, tuple[float, float]] | None = None) -> np.ndarray:
        """Image scores from parts (n, 3) [map, coarse, knn] already density-normalised, at the model's score
        scales (or at `scale`), part weights and share of the strongest part (`score_parts.combine_scores`)."""
        weight = float(self.coarse_weight) if settings_table.uses_coarse(self) else 0.0
        return score_parts.combine_scores(self.image_score, self.score_scale_ if scale is None else scale,
                                          parts[:, 0], parts[:, 2], self.map_weight, parts[:, 1], weight,
                                          float(self.max_share))

    def set_thresholds(
        self, *, image: float | None = None, false_alarm_rate: float | None = None, pixel: float | None = None,
        pixel_false_alarm_rate: float | None = None,
    ) -> Any:
        """Move the thresholds of a fitted model: to a score (`image`, `pixel`) or to a false-alarm rate, computed
        from the good calibration scores kept at fit time. Returns self."""
        self._check_fitted()
        for name, first, second in (("threshold", image, false_alarm_rate),
                                    ("pixel_threshold", pixel, pixel_false_alarm_rate)):
            if first is not None and second is not None:
                raise SettingError(name, "and its false-alarm rate cannot both be given", first, "one of them")
        rates = {name: settings_table.BY_NAME[name].validate(value) for name, value in
                 (("false_alarm_rate", false_alarm_rate), ("pixel_false_alarm_rate", pixel_false_alarm_rate))
                 if value is not None}
        try:
            self.calibration_ = calibration.moved(self.calibration_, image=image, pixel=pixel, **rates)
        except ValueError as exc:
            raise SettingError(next(iter(rates)), str(exc), None, "a model fitted with calibration") from exc
        self._apply_calibration()
        return self

    def _verdict(self, score: float, threshold: float | None) -> dict[str, Any]:
        """The verdict fields of a score at an image threshold: the one place a verdict is made."""
        cal = self.calibration_
        return {
            "image_threshold": threshold, "is_anomalous": None if threshold is None else bool(score > threshold),
            "normalized_score": None if threshold is None or cal.median is None
            else float(normalized_scores([score], cal.median, threshold)[0]),
        }

    def _prediction(self, map_part: float, knn_part: float, *, coarse_part: float = 0.0, near: Any = None,
                    **fields: Any) -> Prediction:
        """The Prediction of one image from its score parts (and its nearest training images `near`, for the
        density normalisation): score, verdict, normalised score and p-value at the current thresholds; `fields`
        are the rest (name, path, maps, geometry, image, neighbours, explanation)."""
        cal = self.calibration_
        score = float(self._combine(np.array([map_part]), np.array([knn_part]), np.array([coarse_part]),
                                    None if near is None else np.asarray(near)[None])[0])
        return Prediction(
            score=score, pixel_threshold=cal.pixel_threshold, **self._verdict(score, cal.image_threshold),
            p_value=float(p_values([score], cal.scores)[0]) if cal.scores else None, **fields,
        )

    def judged(self, prediction: Prediction, threshold: float | None = None) -> Prediction:
        """`prediction` judged at another image `threshold` (a request's own; None: the model's): a new Prediction
        with its verdict, threshold and normalised score made as `predict` makes them."""
        if threshold is None:
            threshold = self.calibration_.image_threshold
        return prediction.with_(**self._verdict(prediction.score, threshold))
