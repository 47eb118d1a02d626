"""The SPADE estimator (scikit-learn contract): `fit` on good images, `predict` scores and anomaly maps.

Orchestration only: settings come from `spade_ad.settings`, features from `spade_ad.pyramid`, the stored features
and search from `spade_ad.store` / `spade_ad.search`, maps and scores from `spade_ad.scoring`, thresholds from
`spade_ad.calibration`, model files from `spade_ad.modelfile`.

Image stage: the k_image nearest training images by global feature (mean squared distance: the paper's score).
Pixel stage: the gallery is every spatial feature of the k_gallery nearest training images; see `spade_ad.scoring`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.base import BaseEstimator

from . import settings as settings_table
from .backbones import Backbone, build_backbone
from .calibration import calibrate_threshold
from .errors import ImageReadError, ModelFileError, NoImagesError, NotFittedError, WeightsError
from .geometry import Geometry, map_to_original
from .inputs import ImageItem, collect_images
from .modelfile import read_model, write_model
from .pyramid import SkipCallback, extract, iter_batches, resolve_device
from .scoring import knn_image_scores, pixel_anomaly_map, smooth_map
from .store import FeatureStoreWriter

D = settings_table.DEFAULTS


@dataclass
class Prediction:
    """One image's result. `anomaly_map` is at the network input resolution; `original_map` (on request) covers
    the whole original image, NaN where a pixel was not scored (outside the paper-crop box); `image` (on request)
    is the decoded input, so writers need not read it again. `is_anomalous` compares the score with the calibrated
    image threshold (None when the model has none)."""

    name: str
    path: Path | None
    score: float
    anomaly_map: np.ndarray
    geometry: Geometry
    original_map: np.ndarray | None = None
    image: Image.Image | None = None
    is_anomalous: bool | None = None
    pixel_threshold: float | None = None

    @property
    def defect_mask(self) -> np.ndarray | None:
        """Pixels at or above the calibrated pixel threshold (original size when available); None if uncalibrated."""
        if self.pixel_threshold is None:
            return None
        values = self.original_map if self.original_map is not None else self.anomaly_map
        return np.nan_to_num(values, nan=-np.inf) >= self.pixel_threshold


class Spade(BaseEstimator):
    """SPADE anomaly detector, fitted on good images only.

    Every setting, its allowed values and its meaning is declared once in `spade_ad.settings.SETTINGS` (also the
    README's settings table); `__init__` only stores them, `fit` validates them. Fitted attributes end in `_`.
    """

    def __init__(
        self,
        backbone: str = D["backbone"],
        *,
        weights: str | Path | None = D["weights"],
        image_size: int = D["image_size"],
        resize: str = D["resize"],
        layers: tuple[int, ...] = D["layers"],
        patch_size: int = D["patch_size"],
        k_gallery: int = D["k_gallery"],
        kappa: int = D["kappa"],
        search_radius: int | None = D["search_radius"],
        feature_dtype: str = D["feature_dtype"],
        memory_budget: int | None = D["memory_budget"],
        fusion: str = D["fusion"],
        distance: str = D["distance"],
        image_score: str = D["image_score"],
        k_image: int = D["k_image"],
        sigma: float = D["sigma"],
        calibration_fraction: float = D["calibration_fraction"],
        threshold_margin: float = D["threshold_margin"],
        device: str = D["device"],
        batch_size: int = D["batch_size"],
        seed: int = D["seed"],
        feature_dir: str | Path | None = D["feature_dir"],
        progress: bool | None = D["progress"],
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.resize = resize
        self.layers = layers
        self.patch_size = patch_size
        self.k_gallery = k_gallery
        self.kappa = kappa
        self.search_radius = search_radius
        self.feature_dtype = feature_dtype
        self.memory_budget = memory_budget
        self.fusion = fusion
        self.distance = distance
        self.image_score = image_score
        self.k_image = k_image
        self.sigma = sigma
        self.calibration_fraction = calibration_fraction
        self.threshold_margin = threshold_margin
        self.device = device
        self.batch_size = batch_size
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
        self, images: Any, *, validation: Any = None, skip_bad: bool = False, on_skip: SkipCallback | None = None
    ) -> Spade:
        """Store the features of good images and calibrate thresholds on normal data.

        `images` (and `validation`): a folder, paths, PIL images, an array or a tensor batch. Without `validation`,
        `calibration_fraction` of `images` is set aside for calibration. Sets `backbone_`, `store_`,
        `train_names_`, `skipped_`, `device_`, `image_threshold_` and `pixel_threshold_` (None when not
        calibrated), `calibration_scores_` and `metrics_`. Returns self.
        """
        settings = self._settings()
        torch.manual_seed(self.seed)
        self.device_ = resolve_device(settings["device"])
        self.backbone_ = self._build_backbone()
        items = collect_images(images)
        if validation is not None:
            held_out = collect_images(validation)
        else:
            items, held_out = self._split_calibration(items)
        self._feature_tmp = tempfile.TemporaryDirectory(prefix="spade-ad-features-", dir=self.feature_dir)
        writer = FeatureStoreWriter(self._feature_tmp.name, self.feature_dtype)
        self.train_names_: list[str] = []
        self.skipped_: list[tuple[str, str]] = []
        self.metrics_: dict[str, Any] = {}

        def record_skip(item: ImageItem, error: ImageReadError) -> None:
            self.skipped_.append((item.name, error.reason))
            if on_skip is not None:
                on_skip(item, error)

        try:
            for batch in self._batches(items, skip_bad, record_skip, "fit"):
                writer.add(*extract(self.backbone_, batch.inputs, self.patch_size))
                self.train_names_.extend(item.name for item in batch.items)
        finally:
            writer.close()
        if not self.train_names_:
            raise NoImagesError("no training image could be read: every input was skipped")
        self.store_ = writer.build()
        self._calibrate(held_out, skip_bad, record_skip)
        return self

    def _split_calibration(self, items: list[ImageItem]) -> tuple[list[ImageItem], list[ImageItem]]:
        """Set aside `calibration_fraction` of the items (at least 1, and only with >= 10 items), by `seed`."""
        n_held = round(self.calibration_fraction * len(items))
        if self.calibration_fraction == 0 or len(items) < 10:
            return items, []
        held = set(np.random.default_rng(self.seed).choice(len(items), size=max(1, n_held), replace=False).tolist())
        return [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held]

    def _calibrate(self, held_out: list[ImageItem], skip_bad: bool, on_skip: SkipCallback | None) -> None:
        """Thresholds from normal images only: the image score and the map maximum of each calibration image."""
        self.calibration_scores_: list[float] = []
        self.image_threshold_: float | None = None
        self.pixel_threshold_: float | None = None
        if not held_out:
            return
        map_maxima = []
        for prediction in self.iter_predict(held_out, skip_bad=skip_bad, on_skip=on_skip):
            self.calibration_scores_.append(prediction.score)
            map_maxima.append(float(prediction.anomaly_map.max()))
        if map_maxima:
            self.image_threshold_ = calibrate_threshold(self.calibration_scores_, self.threshold_margin)
            self.pixel_threshold_ = calibrate_threshold(map_maxima, self.threshold_margin)

    def _build_backbone(self) -> Backbone:
        return build_backbone(self.backbone, self.weights, tuple(self.layers)).to(self.device_)

    # -- inference ------------------------------------------------------------------------------------------------
    def predict(
        self, images: Any, *, original_size: bool = False, skip_bad: bool = False,
        on_skip: SkipCallback | None = None,
    ) -> list[Prediction]:
        """Score images and compute their anomaly maps (also at the original image size if `original_size`)."""
        return list(self.iter_predict(images, original_size=original_size, skip_bad=skip_bad, on_skip=on_skip))

    def iter_predict(
        self, images: Any, *, original_size: bool = False, keep_images: bool = False, skip_bad: bool = False,
        on_skip: SkipCallback | None = None,
    ) -> Iterator[Prediction]:
        """Like `predict`, yielding results one by one as they are ready (for streaming to files).

        `keep_images` attaches each decoded input image to its Prediction (for overlays)."""
        self._check_fitted()
        for batch in self._batches(collect_images(images), skip_bad, on_skip, "predict", keep_images):
            pyramid, global_features = extract(self.backbone_, batch.inputs, self.patch_size)
            # One image-level search serves both the gallery (K nearest) and the paper's kNN score (k nearest).
            distances, neighbours = self.store_.nearest_images(global_features, max(self.k_gallery, self.k_image))
            knn_scores = knn_image_scores(distances, self.k_image)
            for i, (item, geometry) in enumerate(zip(batch.items, batch.geometries)):
                raw = pixel_anomaly_map(
                    [level[i] for level in pyramid], self.store_, neighbours[i, :self.k_gallery].cpu(),
                    geometry.input_size, kappa=self.kappa, fusion=self.fusion, distance=self.distance,
                    memory_budget=self.memory_budget, search_radius=self.search_radius,
                )
                anomaly_map = smooth_map(raw, self.sigma)
                score = float(knn_scores[i]) if self.image_score == "knn" else float(anomaly_map.max())
                array = anomaly_map.cpu().numpy()
                yield Prediction(
                    name=item.name, path=item.path, score=score, anomaly_map=array, geometry=geometry,
                    original_map=map_to_original(array, geometry) if original_size else None,
                    image=batch.originals[i] if keep_images else None,
                    is_anomalous=None if self.image_threshold_ is None else bool(score >= self.image_threshold_),
                    pixel_threshold=self.pixel_threshold_,
                )

    def score(self, images: Any, *, skip_bad: bool = False, on_skip: SkipCallback | None = None) -> np.ndarray:
        """Image scores only. With image_score="knn" the pixel stage is skipped entirely (the fast path)."""
        self._check_fitted()
        if self.image_score != "knn":
            return np.array([p.score for p in self.iter_predict(images, skip_bad=skip_bad, on_skip=on_skip)])
        scores: list[float] = []
        for batch in self._batches(collect_images(images), skip_bad, on_skip, "score"):
            _, global_features = self.backbone_(batch.inputs)
            distances, _ = self.store_.nearest_images(global_features, self.k_image)
            scores.extend(knn_image_scores(distances, self.k_image).tolist())
        return np.asarray(scores, dtype=np.float64)

    def _batches(
        self, items: list[ImageItem], skip_bad: bool, on_skip: SkipCallback | None, desc: str,
        keep_images: bool = False,
    ) -> Iterator[Any]:
        return iter_batches(
            items, image_size=self.image_size, resize=self.resize, batch_size=self.batch_size, device=self.device_,
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
            calibration={
                "image_threshold": self.image_threshold_, "pixel_threshold": self.pixel_threshold_,
                "scores": self.calibration_scores_,
            },
            metrics=self.metrics_,
        )


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
    expected = contents.backbone["weights_sha256"]
    if model.backbone_.weights_sha256 != expected:
        raise ModelFileError(
            f"model {path} was fitted with other weights for backbone {model.backbone!r} "
            f"(checksum {expected[:12]}, these are {model.backbone_.weights_sha256[:12]}): pass the original "
            f"weights file with weights=PATH (CLI: --weights PATH) or fit a new model"
        )
    model.store_ = contents.store
    model.train_names_ = contents.train_names
    model.skipped_ = []
    model.image_threshold_ = contents.calibration.get("image_threshold")
    model.pixel_threshold_ = contents.calibration.get("pixel_threshold")
    model.calibration_scores_ = list(contents.calibration.get("scores", []))
    model.metrics_ = contents.metrics
    return model
