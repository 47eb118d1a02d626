"""The SPADE estimator (scikit-learn contract): `fit` on good images, `predict` scores and anomaly maps.

Orchestration only: settings come from `spade_ad.settings`, features from `spade_ad.core.features`, the stored features
and search from `spade_ad.core.feature_store` / `spade_ad.core.search_torch`, maps and scores from
`spade_ad.core.scoring`, thresholds from `spade_ad.core.calibration`, model files from `spade_ad.data.modelfile`.

Image stage: the k_image nearest training images by global feature (mean squared distance: the paper's score).
Pixel stage: the gallery is every spatial feature of the k_gallery nearest training images; see `spade_ad.core.scoring`.

Longer than 300 lines because scikit-learn needs every setting spelled out in `__init__` (twice: ~50 lines, checked
against the settings table by a test) and the estimator's public methods (fit, add, calibrate, set_thresholds,
predict with explanations, score, save, load) belong together; the maths they call lives in the modules above.
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator

from .. import settings as settings_table
from ..core import calibration, device_maps
from ..core.backbones import Backbone, build_backbone
from ..core.calibration import Calibration
from ..core.device import resolve_device
from ..core.explain import explain as explain_region
from ..core.explain import strongest_region
from ..core.feature_store import FeatureStore, FeatureStoreWriter
from ..core.features import SkipCallback, extract, global_view_features, iter_batches, thumbnails
from ..core.geometry import plan_geometry
from ..core.maps_numpy import apply_roi, as_roi, coarse_map, map_score, original_with_roi, roi_grid, smooth
from ..core.scoring import knn_image_scores, leave_one_out, pixel_maps
from ..core.tiled import TileSettings
from ..core.tiled import leave_one_out as tiled_leave_one_out
from ..core.tiled import predict_parts as tiled_predict_parts
from ..core.tiled import training_features as tiled_training_features
from ..core.tiles import check_tiling, tile_top_count
from ..data.inputs import ImageItem, collect_images
from ..data.modelfile import read_model, write_model
from ..errors import ImageReadError, ModelFileError, NoImagesError, NotFittedError, SettingError, WeightsError
from ..settings import SearchSettings
from .detector import Detector, ScoredImage
from .prediction import Prediction, Region

D = settings_table.DEFAULTS

#: What `fit` stores per batch of training images: their names, pyramid [(B, C_l, h_l, w_l)], global features
#: (B, D) and thumbnails; a FeatureSource yields them for a list of items (see `Spade._fit`).
TrainingFeatures = tuple[list[str], list[torch.Tensor], torch.Tensor, list[np.ndarray]]
FeatureSource = Callable[[list[ImageItem], bool, SkipCallback | None], Iterator[TrainingFeatures]]


def _unscaled_fused() -> SettingError:
    """Why image_score="fused" cannot be fitted without calibration scores (its parts are scaled by their spread)."""
    return SettingError("image_score", "needs good images' calibration scores to scale its parts: leave-one-out "
                        "over at least 2 training images, held-out images (calibration=holdout, from 10 images) or "
                        "validation images", "fused", "map_top, map_max or knn, or more good images")


#: Map values kept per good image for the pixel threshold's quantiles (a regular subsample of each map).
PIXEL_SAMPLES_PER_IMAGE = 20_000

__all__ = ["Prediction", "Region", "Spade", "load"]


class Spade(Detector, BaseEstimator):
    """SPADE anomaly detector, fitted on good images only.

    `fit` stores the good images' features and calibrates thresholds on them; `predict` gives each image a score,
    a verdict against the threshold, a heat map of where the defect is and its regions. A scikit-learn estimator:
    `__init__` only stores the settings, `fit` validates them and returns the model, fitted attributes end in `_`.
    The parameters below are generated from the settings table, `spade_ad.settings.SETTINGS` (docs/settings.md).
    """

    uses_torch: ClassVar[bool] = True

    #: The batched device pipeline for predict (`spade_ad.core.device_maps`): None uses it off the CPU only; True also
    #: on the CPU (what the tests use to run the device code on CPU tensors), False never.
    _device_pipeline: bool | None = None

    def __init__(
        self,
        backbone: str = D["backbone"],
        *,
        weights: str | Path | None = D["weights"],
        image_size: int = D["image_size"],
        resize: str = D["resize"],
        global_view: str = D["global_view"],
        tile_size: int | None = D["tile_size"],
        tile_overlap: int = D["tile_overlap"],
        tile_margin: int = D["tile_margin"],
        layers: tuple[int, ...] = D["layers"],
        patch_size: int = D["patch_size"],
        k_gallery: int = D["k_gallery"],
        kappa: int = D["kappa"],
        search_radius: int | None = D["search_radius"],
        max_search_pairs: int | None = D["max_search_pairs"],
        feature_dtype: str = D["feature_dtype"],
        memory_budget: int | None = D["memory_budget"],
        fusion: str = D["fusion"],
        distance: str = D["distance"],
        image_score: str = D["image_score"],
        map_weight: float = D["map_weight"],
        coarse_weight: float = D["coarse_weight"],
        density_k: int = D["density_k"],
        k_image: int = D["k_image"],
        sigma: float = D["sigma"],
        calibration: str = D["calibration"],
        calibration_fraction: float = D["calibration_fraction"],
        false_alarm_rate: float = D["false_alarm_rate"],
        pixel_false_alarm_rate: float = D["pixel_false_alarm_rate"],
        device: str = D["device"],
        batch_size: int = D["batch_size"],
        thumbnail_size: int = D["thumbnail_size"],
        seed: int = D["seed"],
        feature_dir: str | Path | None = D["feature_dir"],
        progress: bool | None = D["progress"],
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.resize = resize
        self.global_view = global_view
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.tile_margin = tile_margin
        self.layers = layers
        self.patch_size = patch_size
        self.k_gallery = k_gallery
        self.kappa = kappa
        self.search_radius = search_radius
        self.max_search_pairs = max_search_pairs
        self.feature_dtype = feature_dtype
        self.memory_budget = memory_budget
        self.fusion = fusion
        self.distance = distance
        self.image_score = image_score
        self.map_weight = map_weight
        self.coarse_weight = coarse_weight
        self.density_k = density_k
        self.k_image = k_image
        self.sigma = sigma
        self.calibration = calibration
        self.calibration_fraction = calibration_fraction
        self.false_alarm_rate = false_alarm_rate
        self.pixel_false_alarm_rate = pixel_false_alarm_rate
        self.device = device
        self.batch_size = batch_size
        self.thumbnail_size = thumbnail_size
        self.seed = seed
        self.feature_dir = feature_dir
        self.progress = progress

    # -- scikit-learn contract --------------------------------------------------------------------------------------
    def set_params(self, **params: Any) -> Spade:
        """Change settings, validated against the settings table at once (a SettingError names the setting)."""
        for name, value in params.items():
            if name not in settings_table.BY_NAME:
                raise settings_table.SettingError(
                    name, "is not a setting (unknown setting)", None, ", ".join(settings_table.NAMES)
                )
            settings_table.BY_NAME[name].validate(value)
        return super().set_params(**params)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.non_deterministic = False
        tags.input_tags.two_d_array = False
        return tags

    def _settings(self) -> dict[str, Any]:
        """The validated settings (canonical types); raises SettingError naming the first bad one."""
        return settings_table.validate(self.get_params())

    # -- fitting --------------------------------------------------------------------------------------------------
    def fit(
        self, images: Any, *, validation: Any = None, roi: Any = None, skip_bad: bool = False,
        on_skip: SkipCallback | None = None,
    ) -> Spade:
        """Store the features of good images and calibrate thresholds on normal data.

        `images` (and `validation`): a folder, paths, PIL images, an array or a tensor batch. The thresholds come
        from `validation` when given, else per the `calibration` setting: leave-one-out scores of every training
        image (default), a held-out `calibration_fraction` of them, or none. Sets `backbone_`, `store_`,
        `train_names_`, `thumbnails_`, `skipped_`, `device_`, `calibration_`, `score_scale_`, `image_threshold_`
        and `pixel_threshold_` (None when not calibrated), `calibration_scores_` and `metrics_`. Returns self.

        `roi`: the region of interest (a mask file, PIL image or array in the images' original pixels, white or
        True = inspect; fixtured parts only), kept as `roi_` (a bool array) and saved with the model: the maps are
        NaN outside it, so the map's image score, the regions and both thresholds see only the pixels inside.
        """
        return self._fit(images, validation=validation, skip_bad=skip_bad, on_skip=on_skip, roi=roi)

    def _training_features(self, items: list[ImageItem], skip_bad: bool,
                           on_skip: SkipCallback | None) -> Iterator[TrainingFeatures]:
        """This process's feature extraction for `fit`: (names, pyramid, global features, thumbnails) per batch."""
        if self.tile_size is not None:  # tiled mode (spade_ad.core.tiled): one image at a time, stitched from its tiles
            yield from tiled_training_features(self.backbone_, items, TileSettings.of(self), skip_bad=skip_bad,
                                               on_skip=on_skip, thumbnail_size=self.thumbnail_size,
                                               progress=self.progress)
            return
        for batch in self._batches(items, skip_bad, on_skip, "fit"):
            pyramid, global_features = extract(self.backbone_, batch, self.patch_size)
            yield [item.name for item in batch.items], pyramid, global_features, thumbnails(
                batch.inputs, self.thumbnail_size)

    def _fit(
        self, images: Any, *, validation: Any = None, skip_bad: bool = False, on_skip: SkipCallback | None = None,
        features: FeatureSource | None = None, roi: Any = None,
    ) -> Spade:
        """`fit`, with the training features from `features(items, skip_bad, on_skip)` when given instead of this
        process's backbone (`spade_ad.apps.distributed`: Ray actors). It must yield, in the items' order, (names,
        pyramid [(B, C_l, h_l, w_l)], global features (B, D), thumbnails) per batch of images of one size, reporting an
        unreadable item to `on_skip` with `skip_bad` (else raising its ImageReadError once everything before it was
        yielded): everything after extraction (store, calibration) is this same code."""
        settings = self._settings()
        if settings["tile_size"] is not None:
            check_tiling(settings["tile_size"], settings["tile_overlap"])
            if features is not None:
                raise SettingError("tile_size", "is not available with a distributed fit yet", settings["tile_size"],
                                   "fit tiled models in one process")
        self.roi_ = as_roi(roi)
        torch.manual_seed(self.seed)
        self.device_ = resolve_device(settings["device"])
        self.backbone_ = self._build_backbone()  # first: a bad backbone option is named before any data check
        items = collect_images(images)
        held_out: list[ImageItem] = []
        if validation is not None:
            held_out = collect_images(validation)
        elif settings["calibration"] == "holdout":
            items, held_out = self._split_calibration(items)
        if settings["image_score"] == "fused" and not held_out and (
                settings["calibration"] != "leave_one_out" or len(items) < 2):
            raise _unscaled_fused()
        self._feature_tmp = tempfile.TemporaryDirectory(prefix="spade-ad-features-", dir=self.feature_dir)
        writer = FeatureStoreWriter(self._feature_tmp.name, self.feature_dtype)
        self.train_names_: list[str] = []
        self.thumbnails_: list[np.ndarray] = []
        self.skipped_: list[tuple[str, str]] = []
        self.metrics_: dict[str, Any] = {}

        def record_skip(item: ImageItem, error: ImageReadError) -> None:
            self.skipped_.append((item.name, error.reason))
            if on_skip is not None:
                on_skip(item, error)

        try:
            for names, pyramid, global_features, small in (features or self._training_features)(
                    items, skip_bad, record_skip):
                writer.add(pyramid, global_features, coreset=self.tile_size is None)
                self.train_names_.extend(names)
                self.thumbnails_.extend(small)
        finally:
            writer.close()
        if not self.train_names_:
            raise NoImagesError("no training image could be read: every input was skipped")
        self.store_ = writer.build()
        if validation is not None or settings["calibration"] == "holdout":
            # the training images' leave-one-out parts: what the density normalisation divides by, and what the
            # held-out good scores are compared with (parts only: the maps are not kept)
            loo = [part._replace(anomaly_map=None) for part in self._leave_one_out_scores()]
            self._calibrate(self._held_out_scores(held_out, skip_bad, record_skip), "validation"
                            if validation is not None else "holdout", train_parts=self._parts_array(loo))
            if self.calibration_.scores and loo:
                self._check_calibration(self._scores_of(loo), self.calibration_.scores,
                                        "training images' leave-one-out scores", "held-out good images",
                                        "the thresholds come from the held-out images; refit with good images "
                                        "like them")
        elif settings["calibration"] == "leave_one_out":
            if settings["image_score"] == "fused" and self.store_.n_images < 2:  # the rest were unreadable
                raise _unscaled_fused()
            self._calibrate(self._leave_one_out_scores(), "leave_one_out")
        else:
            self._calibrate(iter(()), "none")
        return self

    def add(self, images: Any, *, skip_bad: bool = False, on_skip: SkipCallback | None = None) -> Spade:
        """Add good images to a fitted model (e.g. a good part it flagged): their features join the store and the
        global kNN, the rest is not refitted. With leave-one-out calibration the thresholds are recomputed over all
        images; otherwise they are kept (the held-out images are not stored). Other images' scores change only
        where an added image becomes one of their nearest normals. Returns self."""
        self._check_fitted()
        items = collect_images(images)
        folder = tempfile.TemporaryDirectory(prefix="spade-ad-features-", dir=self.feature_dir)
        writer = FeatureStoreWriter(folder.name, self.feature_dtype)
        before = self.store_.n_images
        added: list[str] = []
        new_thumbnails: list[np.ndarray] = []
        try:
            writer.extend(self.store_)
            for names, pyramid, global_features, small in self._training_features(items, skip_bad, on_skip):
                writer.add(pyramid, global_features, coreset=self.tile_size is None)
                added.extend(names)
                new_thumbnails.extend(small)
        finally:
            writer.close()
        if not added:
            raise NoImagesError("no image to add could be read: every input was skipped")
        self.store_, self._feature_tmp = writer.build(), folder
        self.train_names_ = [*self.train_names_, *added]
        self.thumbnails_ = [*self.thumbnails_, *new_thumbnails] if len(self.thumbnails_) == before else []
        if self.calibration == "leave_one_out" and self.calibration_.source == "leave_one_out":
            self._calibrate(self._leave_one_out_scores(), "leave_one_out")
        elif settings_table.density_k(self) and self.calibration_.train_parts:
            # the thresholds are kept, but the density normalisation needs every stored image's leave-one-out parts
            loo = [part._replace(anomaly_map=None) for part in self._leave_one_out_scores()]
            self.calibration_.train_parts = self._parts_array(loo).tolist()
            self._apply_calibration()
        return self

    def set_roi(self, roi: Any) -> Spade:
        """Set (or with None remove) the region of interest of a fitted model (see `fit`). With leave-one-out
        calibration the thresholds are recomputed inside it at once (the stored features are not changed);
        otherwise they are kept and `calibration_.warning` says to recalibrate (`calibrate(good, roi=...)`)."""
        self._check_fitted()
        self.roi_ = as_roi(roi)
        if self.calibration_.source == "leave_one_out" and self.store_.n_images >= 2:
            self._calibrate(self._leave_one_out_scores(), "leave_one_out")
        elif self.calibration_.image_threshold is not None:
            self.calibration_.warning = ("the thresholds were computed before the region of interest changed: "
                                         "recalibrate with calibrate(good, roi=...) (CLI: calibrate --good DIR --roi "
                                         "MASK)")
        return self

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
        """The score parts and map of every training image scored without itself."""
        if self.store_.n_images < 2:
            return
        if self.tile_size is not None:
            for _, knn, anomaly_map in tiled_leave_one_out(self.store_, self.backbone_.strides,
                                                           self.backbone_.channels, TileSettings.of(self)):
                anomaly_map = self._inside_roi(anomaly_map)
                yield ScoredImage(self._map_score(anomaly_map), knn, anomaly_map)
            return
        k_density = settings_table.density_k(self)
        for _, knn, anomaly_map, coarse, near in leave_one_out(
            self.store_, self.backbone_.strides[0], k_image=self.k_image, k_gallery=self.k_gallery,
            search=SearchSettings.of(self), device=self.device_, density_k=k_density,
        ):
            anomaly_map = self._inside_roi(anomaly_map)
            coarse_part = 0.0 if coarse is None else map_score(self._inside_roi(coarse), "map_top")
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
            anomaly_map = part.anomaly_map
            step = max(1, int(np.sqrt(anomaly_map.size / PIXEL_SAMPLES_PER_IMAGE)))
            sample = anomaly_map[::step, ::step].ravel()
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
            train_parts=train, raw_parts=raw if train is not None else None,
        )
        self._apply_calibration()

    @staticmethod
    def _parts_array(parts: Sequence[ScoredImage]) -> np.ndarray:
        """The score parts (n, 3) [map, coarse, knn] of `ScoredImage`s (`calibration.PARTS`)."""
        return np.array([(p.map_part, p.coarse_part, p.knn_part) for p in parts], dtype=np.float64).reshape(-1, 3)

    def _normalised_parts(self, parts: Sequence[ScoredImage], raw: np.ndarray, train: np.ndarray | None
                          ) -> np.ndarray:
        """`raw` parts of `parts` divided by their local density over `train` (None or density_k 0: unchanged)."""
        k = settings_table.density_k(self)
        if not k or train is None or not len(raw) or any(p.near is None for p in parts):
            return raw
        return np.concatenate([calibration.density_normalised(raw[i:i + 1], np.asarray(p.near)[None], train, k)
                               for i, p in enumerate(parts)])

    def _scores_of(self, parts: Iterable[ScoredImage], scale: dict[str, tuple[float, float]] | None = None
                   ) -> np.ndarray:
        """Image scores of `ScoredImage`s, at the current score scales or at `scale`."""
        parts = list(parts)
        normalised = self._normalised_parts(parts, self._parts_array(parts), getattr(self, "_train_parts", None))
        return calibration.combine_scores(
            self.image_score, self.score_scale_ if scale is None else scale, normalised[:, 0], normalised[:, 2],
            self.map_weight, normalised[:, 1],
            float(self.coarse_weight) if settings_table.uses_coarse(self) else 0.0)

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
                  on_skip: SkipCallback | None = None, combine: bool = False, roi: Any = None) -> Spade:
        """Recalibrate a fitted model on other good images (thresholds at the model's false-alarm rates). With a few
        labelled `defect` images, move the image threshold to the best F1 on good + defect images (as other tools
        do), or with `recall` to the highest threshold that catches that share of them; the false-alarm rate is then
        no longer guaranteed: `calibration_.threshold_source` says "best_f1" or "recall" and `calibration_.note`
        gives the recall and false-alarm rate measured on these images. When the new good images score above the
        previous calibration scores, `calibration_.warning` says so. With `combine`, the new good images' scores
        are added to the calibration scores the model has (at its score scales; its pixel threshold kept) instead of
        replacing them: a few labelled images then refine the threshold rather than set it alone. The stored
        features are not changed. `roi` sets a new region of interest first (see `fit`): the new thresholds are
        computed inside it (with `combine`, the earlier scores came from the earlier region)."""
        self._check_fitted()
        if roi is not None:
            self.roi_ = as_roi(roi)
        if recall is not None:
            recall = float(recall)
            if defect is None or not 0 < recall <= 1:
                raise SettingError("recall", "needs labelled defect images and a share in (0, 1]", recall,
                                   "e.g. --defect DIR --recall 0.95")
        before, old_scale, new_parts = list(self.calibration_.scores), self.score_scale_, []
        previous = self.calibration_

        def kept(parts: Iterator[ScoredImage]) -> Iterator[ScoredImage]:
            for part in parts:
                new_parts.append(part._replace(anomaly_map=None))  # the score parts only, not the maps
                yield part

        self._calibrate(kept(self._predict_parts(good, skip_bad=skip_bad, on_skip=on_skip)), "validation")
        self._check_calibration(before, self._scores_of(new_parts, old_scale), "previous calibration scores",
                                "new good images", "the new thresholds come from the new images")
        if combine and before:
            self._combine_calibration(previous, before, self._scores_of(new_parts, old_scale), old_scale)
        if defect is not None:
            defect_scores = self._scores_of(self._predict_parts(defect, skip_bad=skip_bad, on_skip=on_skip))
            good_scores = self.calibration_.scores
            if recall is None:
                threshold, source = calibration.best_f1_threshold(good_scores, defect_scores), "best_f1"
            else:
                threshold, source = calibration.recall_threshold(good_scores, defect_scores, recall), "recall"
            self.calibration_ = calibration.moved(self.calibration_, image=threshold, source=source)
            caught = float(np.mean(np.asarray(defect_scores) > threshold))
            flagged = float(np.mean(np.asarray(good_scores) > threshold))
            self.calibration_.check = {**self.calibration_.check, "recall": caught, "false_alarms": flagged,
                                       "n_defect": len(defect_scores)}
            self.calibration_.note = (
                f"image threshold {'at the best F1' if recall is None else f'for a recall of {recall:g}'} on "
                f"{self.calibration_.n} good and {len(defect_scores)} defective images: it flags "
                f"{100 * caught:.1f}% of these defects and {100 * flagged:.1f}% of these good images; the "
                f"false-alarm rate is measured, not guaranteed")
            self._apply_calibration()
        return self

    def _combine_calibration(self, previous: calibration.Calibration, before: Sequence[float],
                             new: np.ndarray, scale: dict[str, tuple[float, float]]) -> None:
        """`calibrate(combine=True)`: the previous calibration with the new good scores added (same scales)."""
        merged = calibration.Calibration.from_json(previous.to_json())
        merged.scores = sorted([*map(float, before), *map(float, new)])
        merged.source = previous.source if previous.source.endswith("+labelled") else f"{previous.source}+labelled"
        merged.check, merged.warning = self.calibration_.check, self.calibration_.warning
        merged = calibration.moved(merged, false_alarm_rate=previous.false_alarm_rate)
        merged.median = float(np.median(merged.scores))
        self.calibration_, self.score_scale_ = merged, scale
        self._apply_calibration()

    def _build_backbone(self) -> Backbone:
        return build_backbone(self.backbone, self.weights, tuple(self.layers)).to(self.device_)

    # -- inference ------------------------------------------------------------------------------------------------
    def predict(
        self, images: Any, *, original_size: bool = False, skip_bad: bool = False,
        on_skip: SkipCallback | None = None, explain: bool = False,
    ) -> list[Prediction]:
        """Score images and compute their anomaly maps (also at the original image size if `original_size`)."""
        return list(self.iter_predict(images, original_size=original_size, skip_bad=skip_bad, on_skip=on_skip,
                                      explain=explain))

    def iter_predict(
        self, images: Any, *, original_size: bool = False, keep_images: bool = False, skip_bad: bool = False,
        on_skip: SkipCallback | None = None, explain: bool = False,
    ) -> Iterator[Prediction]:
        """Like `predict`, yielding results one by one as they are ready (for streaming to files).

        `keep_images` attaches each decoded input image to its Prediction (for overlays); `explain` adds where the
        strongest region matched in the nearest normal image (`Prediction.explanation`)."""
        self._check_fitted()
        for part in self._predict_parts(images, original_size=original_size, keep_images=keep_images,
                                        skip_bad=skip_bad, on_skip=on_skip, full=True, explain=explain):
            yield self._prediction(part.map_part, part.knn_part, coarse_part=part.coarse_part, near=part.near,
                                   name=part.item.name, path=part.item.path,
                                   anomaly_map=part.anomaly_map, geometry=part.geometry, original_map=part.original_map,
                                   image=part.image, neighbours=part.neighbours, explanation=part.explanation)

    def _predict_parts(
        self, images: Any, *, original_size: bool = False, keep_images: bool = False, skip_bad: bool = False,
        on_skip: SkipCallback | None = None, full: bool = False, explain: bool = False,
    ) -> Iterator[ScoredImage]:
        """The predict loop: a `ScoredImage` per image (its map score per `image_score`, see `maps.map_score`; its
        kNN score; its map), and with `full` also its item, geometry, decoded image, original-size map, nearest
        normal images and explanation. Routing only: the maps come from `_tiled_maps` or `_batch_maps`."""
        items = collect_images(images)
        maps = self._tiled_maps(items, skip_bad, on_skip, keep_images) if self.tile_size is not None else \
            self._batch_maps(items, skip_bad, on_skip, keep_images, original_size and full)
        k_density = settings_table.density_k(self)
        for map_part, coarse_part, coarse_grid, knn, array, item, geometry, image, original, nearest, levels in maps:
            if self.roi_ is not None:  # the region of interest: NaN (not scored) outside
                array = apply_roi(array, self.roi_, geometry)
                map_part = self._map_score(array)
                original = None if original is None else original_with_roi(array, self.roi_, geometry)
                if coarse_grid is not None:
                    coarse_part = map_score(apply_roi(coarse_map(coarse_grid, geometry.input_size, self.sigma),
                                                      self.roi_, geometry), "map_top")
            near = np.array([n for n, _ in nearest[:k_density]], dtype=np.int64) if k_density else None
            coarse_part = 0.0 if coarse_part is None else coarse_part
            if not full:
                yield ScoredImage(map_part, knn, array, coarse_part=coarse_part, near=near)
                continue
            if original is None and original_size:
                original = original_with_roi(array, self.roi_, geometry)
            why = self._explain(array, levels, nearest) if explain and levels is not None else None
            yield ScoredImage(map_part, knn, array, item, geometry, image, original,
                              [(self.train_names_[n], d) for n, d in nearest[:self.k_image]], why, coarse_part, near)

    def _map_score(self, array: np.ndarray) -> float:
        """The map's part of the image score (`maps.map_score`); in tiled mode its top share is one tile's (1% of
        tile_size^2 pixels), not 1% of the whole large image."""
        return map_score(array, self.image_score, None if self.tile_size is None else tile_top_count(self.tile_size))

    def _tiled_maps(self, items: list[ImageItem], skip_bad: bool, on_skip: SkipCallback | None,
                    keep_images: bool) -> Iterator[tuple[Any, ...]]:
        """Tiled mode (`spade_ad.core.tiled`), one image at a time stitched from its tiles: (map score, no coarse part
        or grid, kNN, map, item, geometry, image, None, nearest [(index, distance)], None: no pyramid kept, so no
        explanation). The stitched map keeps no per-level map: a tiled model's score has no coarse part."""
        for array, knn, item, geometry, image, neighbours, distances in tiled_predict_parts(
                self.backbone_, self.store_, items, TileSettings.of(self), skip_bad=skip_bad, on_skip=on_skip,
                keep_images=keep_images, progress=self.progress):
            yield (self._map_score(array), None, None, knn, array, item, geometry, image, None,
                   list(zip(neighbours, distances)), None)

    def _batch_maps(self, items: list[ImageItem], skip_bad: bool, on_skip: SkipCallback | None, keep_images: bool,
                    original_size: bool) -> Iterator[tuple[Any, ...]]:
        """The batched loop: (map score, coarse part or None, coarse grid or None, kNN, map, item, geometry, image,
        original-size map or None, nearest [(index, distance)], the image's pyramid). One image-level search serves
        the gallery (K nearest), the paper's kNN score (k nearest) and the density normalisation (density_k
        nearest); off the CPU the whole batch's maps are made on the device (`spade_ad.core.device_maps`), on the CPU
        image by image with the numpy search."""
        search = SearchSettings.of(self)
        wanted = max(self.k_gallery, self.k_image, settings_table.density_k(self))
        for batch in self._batches(items, skip_bad, on_skip, "predict", keep_images):
            pyramid, global_features = extract(self.backbone_, batch, self.patch_size)
            distances, neighbours = self.store_.nearest_images(global_features, wanted)
            knn_scores = knn_image_scores(distances, self.k_image)
            on_device = None
            if (self.device_.type != "cpu" if self._device_pipeline is None else self._device_pipeline) and \
                    device_maps.supports(self.store_, neighbours[:, :self.k_gallery], pyramid, fusion=self.fusion,
                                         search_radius=self.search_radius):
                on_device = device_maps.predict_batch(pyramid, self.store_, neighbours[:, :self.k_gallery],
                                                      batch.geometries, search, original_size=original_size)
                distances, neighbours, knn_scores = distances.cpu(), neighbours.cpu(), knn_scores.cpu()
            for i, (item, geometry) in enumerate(zip(batch.items, batch.geometries)):
                original = coarse_part = None
                if on_device is not None:
                    map_part, array, original = on_device.image(i)
                    coarse_part, coarse_grid = on_device.coarse(i)
                else:
                    raw, coarse_grid = pixel_maps([level[i] for level in pyramid], self.store_,
                                                  neighbours[i, :self.k_gallery].cpu(), geometry.input_size, search)
                    array = smooth(raw, search.sigma)
                    map_part = map_score(array, self.image_score)
                    if coarse_grid is not None:
                        coarse_part = map_score(coarse_map(coarse_grid, geometry.input_size, search.sigma), "map_top")
                nearest = list(zip(neighbours[i, :wanted].tolist(), distances[i, :wanted].tolist()))
                yield (map_part, coarse_part, coarse_grid, float(knn_scores[i]), array, item, geometry,
                       batch.originals[i] if keep_images else None, original, nearest, [level[i] for level in pyramid])

    def _explain(self, array: np.ndarray, levels: list[torch.Tensor], nearest: list[tuple[int, float]]) -> Any:
        """Where the strongest region of `array` matched in the nearest normal image (`spade_ad.core.explain`)."""
        first = int(nearest[0][0])
        region = strongest_region(array, self.pixel_threshold_, self.backbone_.strides[-1])
        normal = [self.store_.image_map(level, first).numpy() for level in range(len(levels))]
        return explain_region([level.cpu().numpy() for level in levels], self.backbone_.strides, normal, first,
                              self.train_names_[first], region)

    def score(self, images: Any, *, skip_bad: bool = False, on_skip: SkipCallback | None = None) -> np.ndarray:
        """Image scores only. With image_score="knn" the pixel stage is skipped entirely (the fast path)."""
        self._check_fitted()
        if self.image_score != "knn":
            return self._scores_of(self._predict_parts(images, skip_bad=skip_bad, on_skip=on_skip))
        scores: list[float] = []
        for batch in self._batches(collect_images(images), skip_bad, on_skip, "score"):
            global_features = global_view_features(self.backbone_, batch)
            distances, _ = self.store_.nearest_images(global_features, self.k_image)
            scores.extend(knn_image_scores(distances, self.k_image).tolist())
        return np.asarray(scores, dtype=np.float64)

    def _batches(
        self, items: list[ImageItem], skip_bad: bool, on_skip: SkipCallback | None, desc: str,
        keep_images: bool = False,
    ) -> Iterator[Any]:
        return iter_batches(
            items, image_size=self.image_size, resize=self.resize, global_view=self.global_view,
            batch_size=self.batch_size, device=self.device_,
            skip_bad=skip_bad, on_skip=on_skip, desc=desc, keep_images=keep_images, progress=self.progress,
        )

    def _check_fitted(self) -> None:
        if not hasattr(self, "store_"):
            raise NotFittedError("this Spade model is not fitted yet: call fit(good_images) or spade_ad.load(path)")

    # -- persistence ----------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the fitted model to one safetensors file (no pickle). See `spade_ad.load`."""
        self._check_fitted()
        settings = self._settings()
        settings["weights"] = None if self.weights is None else str(self.weights)
        return write_model(
            Path(path), settings=settings,
            backbone={
                "name": self.backbone_.name, "weights_sha256": self.backbone_.weights_sha256,
                "channels": list(self.backbone_.channels), "strides": list(self.backbone_.strides),
            },
            store=self.store_, train_names=self.train_names_,
            calibration={**self.calibration_.to_json(), "score_scale": self.score_scale_},
            metrics=self.metrics_, thumbnails=self.thumbnails_, versions={"torch": torch.__version__},
            roi=getattr(self, "roi_", None),
        )


#: `help(Spade)` lists every setting: the Parameters section is generated from the settings table.
Spade.__doc__ = f"{inspect.cleandoc(Spade.__doc__ or '')}\n\n{settings_table.numpydoc_parameters()}\n\n" + \
    """Attributes
----------
image_threshold_, pixel_threshold_ : float
    The calibrated thresholds (a score above image_threshold_ is flagged).
calibration_ : Calibration
    Where the thresholds come from: N good scores, the rate asked and guaranteed, a note or warning.
store_ : FeatureStore
    The good images' stored features (memory-mapped).
train_names_ : list of str
    The training images, in stored order.

Examples
--------
>>> from spade_ad import Spade, load
>>> model = Spade().fit("bottle/train/good")  # doctest: +SKIP
>>> [r.is_anomalous for r in model.predict("bottle/test")]  # doctest: +SKIP
>>> model.save("bottle.safetensors")  # doctest: +SKIP
"""


def load(path: str | Path, *, weights: str | Path | None = None, device: str | None = None) -> Spade:
    """Load a model saved with `Spade.save`. `weights` overrides the backbone weights file recorded at fit time;
    the backbone's weights must be the very ones the model was fitted with (checked by checksum)."""
    overrides: dict[str, Any] = {}
    if weights is not None:
        overrides["weights"] = str(weights)
    if device is not None:
        overrides["device"] = device
    contents = read_model(path, overrides=overrides)
    model = Spade(**contents.settings)
    model.device_ = resolve_device(model.device)
    try:
        model.backbone_ = model._build_backbone()
    except WeightsError as exc:
        raise ModelFileError(f"cannot load the backbone of model {path}: {exc}") from exc
    if list(model.backbone_.channels) != list(contents.backbone["channels"]):
        raise ModelFileError(
            f"model {path} records channels {contents.backbone['channels']} for its pyramid levels, but backbone "
            f"{model.backbone!r} with layers {model.layers} gives {list(model.backbone_.channels)}: the file's "
            f"settings were edited; re-create it with `spade-ad fit`"
        )
    expected = contents.backbone["weights_sha256"]
    if model.backbone_.weights_sha256 != expected:
        raise ModelFileError(
            f"model {path} was fitted with other weights for backbone {model.backbone!r} "
            f"(checksum {expected[:12]}, these are {model.backbone_.weights_sha256[:12]}): pass the original "
            f"weights file with weights=PATH (CLI: --weights PATH) or fit a new model"
        )
    stored = contents.store
    model.store_ = FeatureStore(torch.from_numpy(stored.global_features), stored.levels, stored.shapes, stored.orders)
    model.train_names_ = contents.train_names
    model.thumbnails_ = contents.thumbnails
    model.roi_ = contents.roi
    model.skipped_ = []
    model.score_scale_ = {k: (float(v[0]), float(v[1])) for k, v in contents.calibration["score_scale"].items()}
    model.calibration_ = Calibration.from_json(contents.calibration)
    model._apply_calibration()
    model.metrics_ = contents.metrics
    return model
