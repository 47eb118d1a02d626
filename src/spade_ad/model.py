"""The SPADE estimator (scikit-learn contract): `fit` on good images, `predict` scores and anomaly maps.

Image stage: the k_image nearest training images by global feature (mean squared distance: the paper's score).
Pixel stage: the gallery is every spatial feature of the k_gallery nearest training images; each test position
scores the mean distance to its kappa nearest gallery vectors, per pyramid level ("mean" fusion: per-level maps
upsampled to the input size and averaged) or over the channel-concatenated pyramid ("concat" fusion, the paper's
text). The map is smoothed with a Gaussian (sigma in input pixels).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .backbones import Backbone, build_backbone
from .data import ImageItem, collect_images, iter_loaded
from .errors import ImageReadError, NoImagesError, NotFittedError
from .features import RESIZE_MODES, Geometry, ResizeMode, image_to_tensor, map_to_original, plan_geometry
from .search import FeatureStore, FeatureStoreWriter, topk_squared_distances, window_topk_squared_distances

Fusion = Literal["mean", "concat"]
Distance = Literal["euclidean", "squared"]
ImageScore = Literal["map_max", "knn"]
SkipCallback = Callable[[ImageItem, ImageReadError], None]

#: Pyramid levels of the default model: strides 8 and 16 (the paper uses 4/8/16). Measured on MVTec AD bottle at the
#: original resolution: the same pixel AUROC (98.4) and image AUROC (100) as with the stride-4 level, AU-PRO 95.5 vs
#: 95.8, at a quarter of the predict time (the stride-4 search is 16x larger than the stride-8 one). PatchCore, the
#: strongest method of this family on MVTec AD, also uses only these two levels. `layers=(1, 2, 3)` is the paper's.
DEFAULT_MODEL_LAYERS = (2, 3)


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


class Spade:
    """SPADE anomaly detector, fitted on good images only.

    Settings (stored as given; see the README for the defaults' rationale):
        backbone, weights: backbone name and optional local weights file.
        layers: pyramid levels as backbone stage indices (1, 2, 3 = strides 4, 8, 16; default 2, 3).
        k_image: neighbours of the paper's image score (mean squared distance of global features).
        k_gallery: number of nearest training images whose feature maps form the pixel gallery (paper: K=50).
        kappa: gallery neighbours averaged per test position (paper: 1).
        patch_size: odd size of the neighbourhood each feature is averaged over before the search (PatchCore's
            "locally aware" features); 1 = plain SPADE features.
        fusion: "mean" (per-level distance maps averaged) or "concat" (one search over concatenated features).
        search_radius: None (SPADE: each position searches every gallery vector) or r: only gallery vectors within
            r feature cells of the same position (for aligned products; faster with r = 1 or 2, and answers change
            where the nearest normal feature lies further away). Needs training and test images of one size.
        distance: "euclidean" or "squared" (the paper's) distances in the pixel stage, before fusing levels.
        image_score: "map_max" (maximum of the smoothed anomaly map) or "knn" (the paper's global kNN score).
        sigma: Gaussian smoothing of the map, in input pixels (0 disables).
        image_size: short side (keep_aspect) or side (squash, paper_crop) of the network input.
        resize: "keep_aspect", "squash" or "paper_crop" (see `spade_ad.features`).
        device: "auto", "cpu" or "cuda[:N]".
        batch_size: images per backbone forward pass.
        memory_budget: bytes of working memory for one tile of distances; None picks per device (4 MiB on CPU,
            to stay in cache; 1 GiB on a GPU, where few large tiles are fastest).
        feature_dtype: "float16" (half the disk and memory traffic) or "float32" for stored pyramid features;
            distances are always accumulated in float32.
        feature_dir: folder for the pyramid features written during `fit` (a temporary folder by default, removed
            with the model); a saved model keeps them in its file.
        calibration_fraction: share of the good images set aside (chosen with `seed`) to calibrate the image and
            pixel thresholds when `fit` gets no `validation` images; 0 disables thresholds. Needs >= 10 images.
        threshold_margin: threshold = max + margin * (max - median) of the normal calibration values (see
            `calibrate_threshold`).
        seed: seed for anything random (kept explicit so results are reproducible).
        progress: progress bars; None shows them only when stderr is a terminal.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        *,
        weights: str | Path | None = None,
        layers: tuple[int, ...] = DEFAULT_MODEL_LAYERS,
        k_image: int = 3,
        k_gallery: int = 50,
        kappa: int = 1,
        patch_size: int = 1,
        fusion: Fusion = "mean",
        search_radius: int | None = None,
        distance: Distance = "euclidean",
        image_score: ImageScore = "map_max",
        sigma: float = 4.0,
        image_size: int = 224,
        resize: ResizeMode = "keep_aspect",
        device: str = "auto",
        batch_size: int = 8,
        memory_budget: int | None = None,
        feature_dtype: str = "float16",
        feature_dir: str | Path | None = None,
        calibration_fraction: float = 0.1,
        threshold_margin: float = 0.1,
        seed: int = 0,
        progress: bool | None = None,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.layers = layers
        self.k_image = k_image
        self.k_gallery = k_gallery
        self.kappa = kappa
        self.patch_size = patch_size
        self.fusion = fusion
        self.search_radius = search_radius
        self.distance = distance
        self.image_score = image_score
        self.sigma = sigma
        self.image_size = image_size
        self.resize = resize
        self.device = device
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.feature_dtype = feature_dtype
        self.feature_dir = feature_dir
        self.calibration_fraction = calibration_fraction
        self.threshold_margin = threshold_margin
        self.seed = seed
        self.progress = progress

    # -- settings -------------------------------------------------------------------------------------------------
    SETTING_NAMES = (
        "backbone", "weights", "layers", "k_image", "k_gallery", "kappa", "patch_size", "fusion", "search_radius",
        "distance", "image_score", "sigma", "image_size", "resize", "device", "batch_size", "memory_budget",
        "feature_dtype", "feature_dir", "calibration_fraction", "threshold_margin", "seed", "progress",
    )

    def get_params(self) -> dict[str, Any]:
        """Settings as passed to `__init__` (scikit-learn style)."""
        return {name: getattr(self, name) for name in self.SETTING_NAMES}

    def set_params(self, **params: Any) -> Spade:
        for name, value in params.items():
            if name not in self.SETTING_NAMES:
                raise ValueError(f"unknown setting {name!r}; settings are {', '.join(self.SETTING_NAMES)}")
            setattr(self, name, value)
        return self

    def _validate(self) -> None:
        checks = {
            "fusion": (self.fusion, ("mean", "concat")),
            "distance": (self.distance, ("euclidean", "squared")),
            "image_score": (self.image_score, ("map_max", "knn")),
            "resize": (self.resize, RESIZE_MODES),
            "feature_dtype": (self.feature_dtype, ("float16", "float32")),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ValueError(f"patch_size must be an odd number >= 1, got {self.patch_size}")
        for name in ("k_image", "k_gallery", "kappa", "image_size", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.calibration_fraction < 1:
            raise ValueError(f"calibration_fraction must be in [0, 1), got {self.calibration_fraction}")
        if self.search_radius is not None and int(self.search_radius) < 0:
            raise ValueError(f"search_radius must be None or >= 0, got {self.search_radius}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if not self.layers:
            raise ValueError("layers must name at least one pyramid level")

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
        self._validate()
        torch.manual_seed(self.seed)
        self.device_ = _resolve_device(self.device)
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
            for batch_items, batch, _, _ in self._batches(items, skip_bad, record_skip, "fit"):
                pyramid, global_features = self._features(batch)
                writer.add(pyramid, global_features)
                self.train_names_.extend(item.name for item in batch_items)
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

    def _features(self, batch: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Backbone pyramid (optionally averaged over `patch_size` x `patch_size` neighbourhoods) and globals."""
        pyramid, global_features = self.backbone_(batch)
        if self.patch_size > 1:
            pyramid = [
                F.avg_pool2d(m, self.patch_size, stride=1, padding=self.patch_size // 2, count_include_pad=False)
                for m in pyramid
            ]
        return pyramid, global_features

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
        batches = self._batches(collect_images(images), skip_bad, on_skip, "predict", keep_images)
        for batch_items, batch, geometries, originals in batches:
            pyramid, global_features = self._features(batch)
            # One image-level search serves both the gallery (K nearest) and the paper's kNN score (k nearest).
            distances, neighbours = self.store_.nearest_images(global_features, max(self.k_gallery, self.k_image))
            for i, (item, geometry) in enumerate(zip(batch_items, geometries)):
                maps = [level[i] for level in pyramid]
                anomaly_map = self._anomaly_map(maps, neighbours[i, :self.k_gallery], geometry.input_size)
                score = (
                    float(distances[i, :self.k_image].mean())
                    if self.image_score == "knn" else float(anomaly_map.max())
                )
                array = anomaly_map.cpu().numpy()
                yield Prediction(
                    name=item.name, path=item.path, score=float(score), anomaly_map=array, geometry=geometry,
                    original_map=map_to_original(array, geometry) if original_size else None,
                    image=originals[i] if keep_images else None,
                    is_anomalous=None if self.image_threshold_ is None else bool(score >= self.image_threshold_),
                    pixel_threshold=self.pixel_threshold_,
                )

    def score(self, images: Any, *, skip_bad: bool = False, on_skip: SkipCallback | None = None) -> np.ndarray:
        """Image scores only. With image_score="knn" the pixel stage is skipped entirely (the fast path)."""
        self._check_fitted()
        if self.image_score != "knn":
            return np.array([p.score for p in self.iter_predict(images, skip_bad=skip_bad, on_skip=on_skip)])
        scores: list[float] = []
        for _, batch, _, _ in self._batches(collect_images(images), skip_bad, on_skip, "score"):
            _, global_features = self.backbone_(batch)
            scores.extend(self._knn_scores(global_features))
        return np.asarray(scores, dtype=np.float64)

    def _knn_scores(self, global_features: torch.Tensor) -> list[float]:
        distances, _ = self.store_.nearest_images(global_features, self.k_image)
        return distances.mean(1).tolist()

    def _anomaly_map(
        self, maps: list[torch.Tensor], neighbours: torch.Tensor, input_size: tuple[int, int]
    ) -> torch.Tensor:
        """Smoothed anomaly map (h, w) at the input resolution for one image, against its gallery `neighbours`."""
        raw = pixel_anomaly_map(
            maps, self.store_, neighbours.cpu(), input_size, kappa=self.kappa, fusion=self.fusion,
            distance=self.distance, memory_budget=self.memory_budget, search_radius=self.search_radius,
        )
        return smooth_map(raw, self.sigma)

    def _batches(
        self, items: list[ImageItem], skip_bad: bool, on_skip: SkipCallback | None, desc: str,
        keep_images: bool = False,
    ) -> Iterator[tuple[list[ImageItem], torch.Tensor, list[Geometry], list[Image.Image | None]]]:
        """Decode (in worker threads), resize and batch images; a batch only holds images of one input size.

        Yields (items, input batch, geometries, decoded images if `keep_images` else Nones)."""
        pending: list[tuple[ImageItem, torch.Tensor, Geometry, Image.Image | None]] = []
        quiet = None if self.progress is None else not self.progress  # None: bars only on a terminal
        bar = tqdm(total=len(items), desc=desc, unit="img", disable=quiet)

        def prepare(image: Image.Image) -> tuple[Image.Image | None, torch.Tensor, Geometry]:
            """Runs in the loader threads: resizing overlaps the backbone's compute."""
            geometry = plan_geometry((image.height, image.width), self.image_size, self.resize)
            return (image if keep_images else None), image_to_tensor(image, geometry), geometry

        loaded = iter_loaded(items, skip_bad=skip_bad, on_skip=on_skip, prepare=prepare)
        try:
            while True:
                try:
                    item, (image, tensor, geometry) = next(loaded)
                except StopIteration:
                    break
                except ImageReadError:
                    if pending:  # finish what was already read before reporting the bad file
                        yield _stack(pending, self.device_)
                    raise
                if pending and (len(pending) == self.batch_size or pending[0][2].input_size != geometry.input_size):
                    yield _stack(pending, self.device_)
                    bar.update(len(pending))
                    pending = []
                pending.append((item, tensor, geometry, image))
            if pending:
                yield _stack(pending, self.device_)
                bar.update(len(pending))
        finally:
            loaded.close()
            bar.close()

    def _check_fitted(self) -> None:
        if not hasattr(self, "store_"):
            raise NotFittedError("this Spade model is not fitted yet: call fit(good_images) or spade_ad.load(path)")

    def __repr__(self) -> str:
        defaults = Spade().get_params() if type(self) is Spade else {}
        changed = [f"{k}={v!r}" for k, v in self.get_params().items() if defaults.get(k, object()) != v]
        return f"Spade({', '.join(changed)})"

    # -- persistence ----------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the fitted model to one safetensors file (no pickle). See `spade_ad.load`."""
        from .persistence import save_model

        self._check_fitted()
        return save_model(self, Path(path))


def calibrate_threshold(normal_values: list[float], margin: float) -> float:
    """A threshold from normal values alone: their maximum plus `margin` times their spread above the median.

    Scale-free (works for any score unit) and never below anything seen on normal data; the margin absorbs the
    underestimate of the true normal maximum from a few calibration images.
    """
    values = np.asarray(normal_values, dtype=np.float64)
    top = float(values.max())
    return top + margin * (top - float(np.median(values)))


def _stack(pending: list[tuple[ImageItem, torch.Tensor, Geometry, Image.Image | None]], device: torch.device):
    items, tensors, geometries, images = zip(*pending)
    return list(items), torch.stack(tensors).to(device), list(geometries), list(images)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available here: use device='cpu'")
    return resolved


def pixel_anomaly_map(
    maps: list[torch.Tensor],
    store: FeatureStore,
    neighbours: torch.Tensor,
    input_size: tuple[int, int],
    *,
    kappa: int = 1,
    fusion: Fusion = "mean",
    distance: Distance = "euclidean",
    memory_budget: int | None = None,
    search_radius: int | None = None,
) -> torch.Tensor:
    """Unsmoothed pixel anomaly map (H, W) of one test image against the gallery of training images `neighbours`.

    `maps`: the test image's pyramid [(C_l, h_l, w_l)]. Each test position's score is the mean distance to its kappa
    nearest gallery vectors (only those within `search_radius` cells of the same position, if given); "mean" fusion
    averages the per-level maps after bilinear upsampling to `input_size`.
    """
    def score(query_map: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """(h, w) scores of a query map (C, h, w) against gallery maps (K, C, h, w), or rows (M, C) if unwindowed."""
        if search_radius is None:
            squared, _ = topk_squared_distances(query_map.flatten(1).T, gallery, kappa, memory_budget)
        else:
            squared = window_topk_squared_distances(query_map, gallery, kappa, search_radius)
        per_position = (squared.clamp_min(0).sqrt() if distance == "euclidean" else squared).mean(1)
        return per_position.reshape(1, *query_map.shape[1:])

    def upsample(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(grid[None], size=size, mode="bilinear", align_corners=False)[0]

    device = maps[0].device
    if fusion == "mean":
        levels = []
        for level, fmap in enumerate(maps):
            gallery = store.gallery(level, neighbours, device)
            if search_radius is not None:
                gallery = _rows_to_maps(gallery, store.shapes[neighbours.cpu().numpy(), level], tuple(fmap.shape))
            levels.append(upsample(score(fmap, gallery), input_size)[0])
        return torch.stack(levels).mean(0)
    size = tuple(maps[0].shape[1:])
    query = torch.cat([upsample(m.float(), size) for m in maps], 0)
    gallery = torch.stack([
        torch.cat([upsample(store.image_map(level, int(n)).to(device).float(), size) for level in range(len(maps))], 0)
        for n in neighbours
    ])  # (K, C, h, w): every training map resampled onto the test image's grid
    if search_radius is None:
        gallery = gallery.permute(0, 2, 3, 1).reshape(-1, query.shape[0])
    return upsample(score(query, gallery), input_size)[0]


def _rows_to_maps(rows: torch.Tensor, shapes: np.ndarray, query_shape: tuple[int, int, int]) -> torch.Tensor:
    """Gallery rows (K * h * w, C) back to maps (K, C, h, w); a windowed search needs every map at the query's size."""
    channels, height, width = query_shape
    if not (shapes == (height, width)).all():
        sizes = sorted({tuple(int(v) for v in shape) for shape in shapes})
        raise ValueError(
            f"search_radius needs training and test images of one size: the test feature map is {height}x{width}, "
            f"training maps are {', '.join(f'{h}x{w}' for h, w in sizes)}; resize the images or use search_radius=None"
        )
    return rows.view(len(shapes), height, width, channels).permute(0, 3, 1, 2)


def smooth_map(anomaly_map: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing (kernel radius 4 sigma, reflected borders); sigma <= 0 returns the map unchanged.

    Two 1-D passes (the Gaussian is separable): the same result as the 2-D kernel of torchvision's `gaussian_blur`
    at 2 x 33 instead of 33 x 33 multiply-adds per pixel for sigma 4.
    """
    if sigma <= 0:
        return anomaly_map
    radius = int(4 * sigma + 0.5)
    radius = min(radius, min(anomaly_map.shape) - 1)  # reflection padding needs the map to be larger than the radius
    if radius < 1:
        return anomaly_map
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=anomaly_map.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    smoothed = anomaly_map.float()[None, None]
    smoothed = F.conv2d(F.pad(smoothed, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    smoothed = F.conv2d(F.pad(smoothed, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return smoothed[0, 0]
