"""The SPADE estimator (scikit-learn contract): `fit` on good images, `predict` scores and anomaly maps.

Orchestration only: settings come from `spade_ad.settings`, features from `spade_ad.core.features`, the stored features
and search from `spade_ad.core.feature_store` / `spade_ad.core.search_torch`, maps and scores from
`spade_ad.core.scoring`, thresholds from `spade_ad.core.calibration`, model files from `spade_ad.data.modelfile`.

Image stage: the k_image nearest training images by global feature (mean squared distance: the paper's score).
Pixel stage: the gallery is every spatial feature of the k_gallery nearest training images; see `spade_ad.core.scoring`.

Longer than 300 lines because scikit-learn needs every setting spelled out in `__init__` (twice: ~50 lines, checked
against the settings table by a test) and the estimator's public methods (fit, add, set_roi, predict, score, save)
belong together. Its calibration steps (`calibrate` among them) and predict steps are mixins in `spade_calibration`
and `spade_predict`; `load` is in `spade_file`; the maths they call lives in the modules above.
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator

from .. import settings as settings_table
from ..core.backbones import Backbone, build_backbone
from ..core.device import resolve_device
from ..core.feature_store import FeatureStoreWriter
from ..core.features import SkipCallback, extract, global_view_features, iter_batches, thumbnails
from ..core.maps_numpy import as_roi
from ..core.scoring import knn_image_scores
from ..core.tiled import TileSettings
from ..core.tiled import training_features as tiled_training_features
from ..core.tiles import check_tiling
from ..data.inputs import ImageItem, collect_images
from ..data.modelfile import write_model
from ..data.sessions import Sessions, capture_sessions, sessions_of
from ..errors import ImageReadError, NoImagesError, NotFittedError, SettingError
from .detector import Detector, ScoredImage
from .prediction import Prediction, Region
from .spade_calibration import CalibrationSteps, _unscaled_fused
from .spade_predict import PredictSteps

D = settings_table.DEFAULTS

#: What `fit` stores per batch of training images: their names, pyramid [(B, C_l, h_l, w_l)], global features
#: (B, D) and thumbnails; a FeatureSource yields them for a list of items (see `Spade._fit`).
TrainingFeatures = tuple[list[str], list[torch.Tensor], torch.Tensor, list[np.ndarray]]
FeatureSource = Callable[[list[ImageItem], bool, SkipCallback | None], Iterator[TrainingFeatures]]


__all__ = ["Prediction", "Region", "Spade"]


class Spade(CalibrationSteps, PredictSteps, Detector, BaseEstimator):
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
        max_share: float = D["max_share"],
        density_k: int = D["density_k"],
        k_image: int = D["k_image"],
        sigma: float = D["sigma"],
        calibration: str = D["calibration"],
        calibration_fraction: float = D["calibration_fraction"],
        session_gap: float = D["session_gap"],
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
        self.max_share = max_share
        self.density_k = density_k
        self.k_image = k_image
        self.sigma = sigma
        self.calibration = calibration
        self.calibration_fraction = calibration_fraction
        self.session_gap = session_gap
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
        on_skip: SkipCallback | None = None, defect: Any = None,
    ) -> Spade:
        """Store the features of good images and calibrate thresholds on normal data.

        `images` (and `validation`): a folder, paths, PIL images, an array or a tensor batch. The thresholds come
        from `validation` when given, else per the `calibration` setting: leave-one-out scores of every training
        image (default), a held-out `calibration_fraction` of them, or none. Sets `backbone_`, `store_`,
        `train_names_`, `thumbnails_`, `skipped_`, `device_`, `calibration_`, `score_scale_`, `image_threshold_`
        and `pixel_threshold_` (None when not calibrated), `calibration_scores_`, `metrics_` and `sessions_` (the
        training images' capture sessions, `spade_ad.data.sessions`: with two or more, leave-one-out scores each
        image without its whole session; None otherwise). Returns self.

        `roi`: the region of interest (a mask file, PIL image or array in the images' original pixels, white or
        True = inspect; fixtured parts only), kept as `roi_` (a bool array) and saved with the model: the maps are
        NaN outside it, so the map's image score, the regions and both thresholds see only the pixels inside.

        `defect`: a few labelled defective images (same forms as `images`). With the fused score they choose the part
        weights (`map_weight`, `coarse_weight`) as `calibrate` does (`labelled_defects.choose_weights`), against
        the good scores the thresholds come from; unlike `calibrate`'s, the thresholds stay at the false-alarm
        rates (they are recomputed at the chosen weights). `calibration_.check["weights"]` keeps the figures and
        the note starts with the choice.
        """
        defects = None if defect is None else self._check_defect_weights(validation, defect, skip_bad)
        self._fit(images, validation=validation, skip_bad=skip_bad, on_skip=on_skip, roi=roi,
                  keep_good=defects is not None)
        if defects is not None:
            self._fit_weights(defects, skip_bad, on_skip)
        return self

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
        features: FeatureSource | None = None, roi: Any = None, keep_good: bool = False,
    ) -> Spade:
        """`fit`, with the training features from `features(items, skip_bad, on_skip)` when given instead of this
        process's backbone (`spade_ad.apps.distributed`: Ray actors). It must yield, in the items' order, (names,
        pyramid [(B, C_l, h_l, w_l)], global features (B, D), thumbnails) per batch of images of one size, reporting an
        unreadable item to `on_skip` with `skip_bad` (else raising its ImageReadError once everything before it was
        yielded): everything after extraction (store, calibration) is this same code. `keep_good`: keep the good
        calibration images' parts and pixel samples (`_good_parts`) for `_fit_weights`."""
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
        self._good_parts: list[ScoredImage] | None = [] if keep_good else None  # for `_fit_weights`

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
        self.sessions_ = self._training_sessions(items, settings["session_gap"])
        if validation is not None or settings["calibration"] == "holdout":
            # the training images' leave-one-out parts: what the density normalisation divides by, and what the
            # held-out good scores are compared with (parts only: the maps are not kept)
            loo = [part._replace(anomaly_map=None) for part in self._leave_one_out_scores()]
            self._calibrate(self._kept(self._held_out_scores(held_out, skip_bad, record_skip), self._good_parts),
                            "validation" if validation is not None else "holdout", train_parts=self._parts_array(loo))
            if self.calibration_.scores and loo:
                self._check_calibration(self._scores_of(loo), self.calibration_.scores,
                                        "training images' leave-one-out scores", "held-out good images",
                                        "the thresholds come from the held-out images; refit with good images "
                                        "like them")
        elif settings["calibration"] == "leave_one_out":
            if settings["image_score"] == "fused" and self.store_.n_images < 2:  # the rest were unreadable
                raise _unscaled_fused()
            self._calibrate(self._kept(self._leave_one_out_scores(), self._good_parts), "leave_one_out")
        else:
            self._calibrate(iter(()), "none")
        return self

    def _training_sessions(self, items: list[ImageItem], gap_minutes: float) -> Sessions | None:
        """The capture sessions of the training images that were read (`spade_ad.data.sessions`), or None."""
        skipped = {name for name, _ in self.skipped_}
        read = [item for item in items if item.name not in skipped] if skipped else items
        if len(read) != len(self.train_names_):  # names not unique among skipped ones: no sessions rather than wrong
            return None
        return capture_sessions(read, gap_minutes)

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
        if self.sessions_ is not None:  # the added images are one more session
            labels = np.concatenate([self.sessions_.labels, np.full(len(added), int(self.sessions_.labels.max()) + 1)])
            self.sessions_ = sessions_of(labels, self.sessions_.gap_minutes)
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
