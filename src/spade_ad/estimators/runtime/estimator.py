"""`Runtime`: predicts from a bundle with numpy, scipy, Pillow and ONNX Runtime (or OpenVINO) only.

The predict loop mirrors `spade_ad.estimators.spade.Spade` step by step, with the same shared code wherever it is not
the network or the search: decoding and checks (`spade_ad.data.inputs`, `spade_ad.data.images`), geometry
(`spade_ad.core.geometry`), galleries (`spade_ad.core.gallery`), per-position scores, fusion, smoothing and map scores
(`spade_ad.core.maps_numpy`), thresholds and verdicts (`spade_ad.estimators.detector`), explanations
(`spade_ad.core.explain`). The search is `spade_ad.core.search_numpy` (the torch search's method in numpy). Bundles of
models with `fusion="concat"` or a `search_radius` are refused at export: those paths exist in torch only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ...core.calibration import Calibration
from ...core.explain import explain as explain_region
from ...core.explain import strongest_region
from ...core.gallery import (
    all_row_indices,
    gallery_fraction,
    gallery_row_indices,
    gallery_rows,
    image_map,
    image_offsets,
)
from ...core.geometry import global_view_geometry, image_to_array, plan_geometry
from ...core.maps_numpy import apply_roi, coarse_map, fuse, map_score, original_with_roi, position_scores, smooth
from ...core.search_numpy import ranking_bank, topk_squared_distances
from ...data.inputs import ImageItem, collect_images, iter_loaded
from ...errors import ImageReadError, SettingError
from ...settings import SearchSettings, density_k
from ..detector import Detector
from ..prediction import Prediction
from .bundle import Bundle, read_bundle
from .engines import ENGINES, open_engine

#: Largest size of the stored levels, widened to float32 ranking rows ([b, |b|^2]), that is kept in memory after
#: the first prediction: the float16 -> float32 widening of every gallery was a tenth of the runtime's predict time
#: on bottle (44 MB widened). Larger models widen each gallery as it is gathered, as the torch path does.
RANKING_CACHE_BYTES = 128 * 2**20

SkipCallback = Callable[[ImageItem, ImageReadError], None]

__all__ = ["ENGINES", "Runtime", "load_bundle"]


class Runtime(Detector):
    """A fitted model from a bundle, scored without torch. Settings are attributes, as on `Spade`
    (`runtime.k_gallery`, ...; `get_params()` gives them all); thresholds move with `set_thresholds`."""

    def __init__(self, bundle: Bundle, *, engine: str = "onnxruntime", threads: int | None = None) -> None:
        contents = bundle.contents
        self.bundle = bundle
        self.engine = engine
        self._settings = dict(contents.settings)
        if self._settings.get("tile_size") is not None:  # the tiled loop (spade_ad.core.tiled) runs on torch only
            raise SettingError("tile_size", "is not supported by the torch-free runtime yet",
                               self._settings["tile_size"], "score tiled models with spade_ad.load (torch)")
        self.search = SearchSettings.of(self)
        self.network = open_engine(engine, bundle.openvino_path if engine == "openvino" and bundle.openvino_path
                                   else bundle.graph_path, threads)
        self.strides = tuple(int(s) for s in contents.backbone["strides"])
        stored = contents.store
        self.global_features = stored.global_features
        self.levels, self.shapes, self.orders = stored.levels, stored.shapes, stored.orders
        self._offsets = image_offsets(self.shapes)
        self._global_ranking = ranking_bank(self.global_features)
        widened = sum(level.shape[0] * (level.shape[1] + 1) * 4 for level in self.levels)
        self._rankings: list[np.ndarray | None] | None = [None] * len(self.levels) \
            if widened <= RANKING_CACHE_BYTES else None
        self.train_names_ = contents.train_names
        self.thumbnails_ = contents.thumbnails
        self.roi_ = contents.roi
        self.metrics_ = contents.metrics
        self.skipped_: list[tuple[str, str]] = []
        self.score_scale_ = {k: (float(v[0]), float(v[1])) for k, v in contents.calibration["score_scale"].items()}
        self.calibration_ = Calibration.from_json(contents.calibration)
        self._apply_calibration()

    def __getattr__(self, name: str) -> Any:
        """The stored settings read as attributes, as on `Spade` (`runtime.k_gallery`); only looked up when no
        real attribute has the name."""
        settings = self.__dict__.get("_settings", {})
        if name in settings:
            return settings[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The model's settings (as stored in the bundle's model file)."""
        return dict(self._settings)

    def set_params(self, **params: Any) -> Runtime:
        """Only `progress` can change on a bundle (the rest is fixed by the fit it was exported from)."""
        for name, value in params.items():
            if name != "progress":
                raise SettingError(name, "cannot change on an exported bundle", value, "progress only")
            self._settings[name] = value
        return self

    def _check_fitted(self) -> None:
        """A bundle is always fitted."""

    def add(self, images: Any, **_: Any) -> Any:
        raise SettingError("model", "is an exported bundle: adding good images needs the torch path",
                           str(self.bundle.path), "add to the model file (spade-ad add), then export again")

    # -- inference ------------------------------------------------------------------------------------------------
    def predict(self, images: Any, *, original_size: bool = False, skip_bad: bool = False,
                on_skip: SkipCallback | None = None, explain: bool = False) -> list[Prediction]:
        """Score images and compute their anomaly maps (also at the original image size if `original_size`)."""
        return list(self.iter_predict(images, original_size=original_size, skip_bad=skip_bad, on_skip=on_skip,
                                      explain=explain))

    def score(self, images: Any, *, skip_bad: bool = False, on_skip: SkipCallback | None = None) -> np.ndarray:
        """Image scores only."""
        return np.array([p.score for p in self.iter_predict(images, skip_bad=skip_bad, on_skip=on_skip)],
                        dtype=np.float64)

    def iter_predict(
        self, images: Any, *, original_size: bool = False, keep_images: bool = False, skip_bad: bool = False,
        on_skip: SkipCallback | None = None, explain: bool = False,
    ) -> Iterator[Prediction]:
        """Like `Spade.iter_predict`: results one by one, in input order."""
        def prepare(item: ImageItem, image: Any) -> tuple[Any, np.ndarray, Any, np.ndarray | None]:
            name = item.path if item.path is not None else item.name
            geometry = plan_geometry((image.height, image.width), self.image_size, self.resize, name=name)
            view = global_view_geometry(geometry, self.image_size, self.global_view)
            return ((image if keep_images else None), image_to_array(image, geometry), geometry,
                    None if view is None else image_to_array(image, view))

        loaded = iter_loaded(collect_images(images), skip_bad=skip_bad, on_skip=on_skip, prepare=prepare)
        for batch in self._batches(loaded):
            pyramid, global_features = self.network(np.stack([array for _, _, array, _, _ in batch]))
            if batch[0][4] is not None:  # one input size per batch: all of its images have a separate global view
                _, global_features = self.network(np.stack([view for *_, view in batch]))
            k = max(self.k_gallery, self.k_image, density_k(self))
            distances, neighbours = topk_squared_distances(global_features, self.global_features, k,
                                                           ranking=self._global_ranking)
            for i, (item, image, _, geometry, _) in enumerate(batch):
                yield self._predict_one([level[i] for level in pyramid], distances[i], neighbours[i], item, image,
                                        geometry, original_size, explain)

    def _batches(self, loaded: Iterator[tuple[ImageItem, Any]]) -> Iterator[list[tuple[Any, ...]]]:
        """Images of one input size, `batch_size` at a time, for one network call each; on an unreadable image the
        batch read before it is scored first (nothing computed before the fault is lost)."""
        pending: list[tuple[Any, ...]] = []
        try:
            for item, (image, array, geometry, view) in loaded:
                if pending and (len(pending) == self.batch_size or pending[0][3].input_size != geometry.input_size):
                    yield pending
                    pending = []
                pending.append((item, image, array, geometry, view))
        except ImageReadError:
            if pending:
                yield pending
            raise
        if pending:
            yield pending

    def _predict_one(self, levels: list[np.ndarray], distances: np.ndarray, neighbours: np.ndarray, item: ImageItem,
                     image: Any, geometry: Any, original_size: bool, explain: bool) -> Prediction:
        """One image's Prediction from its pyramid and its nearest training images (squared distances, indices)."""
        raw, coarse = self._pixel_map(levels, neighbours[:self.k_gallery], geometry.input_size)
        anomaly_map = apply_roi(smooth(raw, self.search.sigma), self.roi_, geometry)  # NaN outside the ROI
        coarse_part = 0.0 if coarse is None else map_score(
            apply_roi(coarse_map(coarse, geometry.input_size, self.search.sigma), self.roi_, geometry), "map_top")
        k_density = density_k(self)
        nearest = [(self.train_names_[int(n)], float(d))
                   for n, d in zip(neighbours[:self.k_image], distances[:self.k_image])]
        why = None
        if explain:
            first = int(neighbours[0])
            region = strongest_region(anomaly_map, self.pixel_threshold_, self.strides[-1])
            normal = [image_map(self.levels[lv], self._offsets, self.shapes, lv, first) for lv in range(len(levels))]
            why = explain_region(levels, self.strides, normal, first, self.train_names_[first], region)
        return self._prediction(
            map_score(anomaly_map, self.image_score), float(distances[:self.k_image].mean()),
            coarse_part=coarse_part, near=np.asarray(neighbours[:k_density], dtype=np.int64) if k_density else None,
            name=item.name, path=item.path, anomaly_map=anomaly_map, geometry=geometry,
            original_map=original_with_roi(anomaly_map, self.roi_, geometry) if original_size else None, image=image,
            neighbours=nearest, explanation=why,
        )

    def _pixel_map(self, levels: list[np.ndarray], gallery: np.ndarray, input_size: tuple[int, int]
                   ) -> tuple[np.ndarray, np.ndarray | None]:
        """Unsmoothed map at the input size: per level, each position's distance to its kappa nearest gallery
        vectors (a reduced gallery beyond `max_search_pairs`), fused by the shared `spade_ad.core.maps_numpy.fuse`; and
        the coarsest level's own grid when the score has a coarse part (else None), as `scoring.pixel_maps`."""
        level_maps = []
        for level, fmap in enumerate(levels):
            positions = fmap.shape[1] * fmap.shape[2]
            fraction = gallery_fraction(positions, self.shapes[gallery, level], self.search.max_pairs)
            if self._rankings is None:  # widen this gallery only
                ranking = ranking_bank(gallery_rows(self.levels[level], self._offsets, self.orders[level], level,
                                                    gallery, fraction))
            else:  # gather the gallery from the level widened once
                if self._rankings[level] is None:
                    self._rankings[level] = ranking_bank(self.levels[level])
                rows = gallery_row_indices(self._offsets, self.orders[level], level, gallery, fraction)
                ranking = self._rankings[level][all_row_indices(self._offsets, level, gallery) if rows is None
                                                else rows]
            queries = fmap.reshape(fmap.shape[0], -1).T
            squared, _ = topk_squared_distances(queries, ranking[:, :-1], self.search.kappa, self.search.memory_budget,
                                                ranking=ranking)
            level_maps.append(position_scores(squared, self.search.distance).reshape(fmap.shape[1:]))
        return fuse(level_maps, input_size), (level_maps[-1] if self.search.coarse else None)

def load_bundle(path: str | Path, *, engine: str = "onnxruntime", threads: int | None = None) -> Runtime:
    """Read and verify a bundle (`spade-ad export`) and open its graph: a `Runtime` ready to predict."""
    return Runtime(read_bundle(path), engine=engine, threads=threads)
