"""Memory-bank augmentation study (issue 27, item 3): fit once per product with the default settings, then add
augmented copies of every training image to the gallery (small rotations, brightness changes), each copy grouped
with its original so that leave-one-out never scores an image against its own copy, and compare the default image
score with and without them on the test images: image AUROC, recall at 1% / 5% false alarms, and the verdict at
the calibrated 1% threshold. The same code without copies reproduces the default's figures (the first row).

    .venv/bin/python benchmarks/augment_study.py                       # every dev product
    .venv/bin/python benchmarks/augment_study.py --category synthetic_line

Writes benchmarks/results/augment_study.{md,json}.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from image_score_study import evaluate, study_main  # noqa: E402

from spade_ad import Spade  # noqa: E402
from spade_ad.core import score_parts  # noqa: E402
from spade_ad.core.feature_store import FeatureStore, FeatureStoreWriter  # noqa: E402
from spade_ad.core.features import extract  # noqa: E402
from spade_ad.core.maps_numpy import coarse_map, map_score, smooth  # noqa: E402
from spade_ad.core.scoring import pixel_maps, training_input_size  # noqa: E402
from spade_ad.data.inputs import collect_images  # noqa: E402
from spade_ad.settings import SearchSettings  # noqa: E402

Augment = Callable[[torch.Tensor], torch.Tensor]


def rotate(degrees: float) -> Augment:
    def apply(x: torch.Tensor) -> torch.Tensor:  # about the centre, borders reflected
        a = math.radians(degrees)
        b, _, h, w = x.shape
        theta = torch.tensor([[math.cos(a), -math.sin(a) * h / w, 0.0], [math.sin(a) * w / h, math.cos(a), 0.0]],
                             dtype=x.dtype, device=x.device)
        grid = F.affine_grid(theta[None].expand(b, 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return apply


def brightness(factor: float) -> Augment:
    return lambda x: (x * factor).clamp(0, 1)


AUGMENTS: dict[str, Augment] = {"rot-5": rotate(-5), "rot+5": rotate(5), "dim": brightness(0.9),
                                "bright": brightness(1.1)}
CONFIGS: dict[str, list[str]] = {"none": [], "rotate +-5": ["rot-5", "rot+5"], "brightness +-10%": ["dim", "bright"],
                                 "both": ["rot-5", "rot+5", "dim", "bright"]}


def copies(model: Spade, items: list[Any], augment: Augment, directory: str) -> FeatureStore:
    writer = FeatureStoreWriter(directory, model.feature_dtype)
    try:
        for batch in model._batches(items, False, None, "fit"):
            changed = dataclasses.replace(batch, inputs=augment(batch.inputs), global_inputs=None
                                          if batch.global_inputs is None else augment(batch.global_inputs))
            pyramid, global_features = extract(model.backbone_, changed, model.patch_size)
            writer.add(pyramid, global_features)
    finally:
        writer.close()
    return writer.build()


def merged(stores: list[FeatureStore], directory: str) -> FeatureStore:
    writer = FeatureStoreWriter(directory, str(stores[0].dtype))
    writer.extend(stores[0])
    for extra in stores[1:]:  # appended as they are (orders and all)
        for level, rows in enumerate(extra.levels):
            writer._files[level].write(np.asarray(rows).tobytes())
            writer._rows[level] += int(rows.shape[0])
            writer._order_files[level].write(np.asarray(extra.orders[level], dtype="<i4").tobytes())
        writer._globals.append(extra.global_features.float().cpu())
        writer._shapes.extend([[tuple(int(v) for v in s) for s in image] for image in extra.shapes])
    return writer.build()


def loo_parts(model: Spade, store: FeatureStore, groups: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw parts (n, 3) of the n originals scored without their group, and their 3 nearest store indices."""
    search = SearchSettings.of(model)
    copies_per = len(groups) // n
    want = min(store.n_images, (max(model.k_gallery, model.k_image, 3) + 1) * copies_per)
    parts, nears = [], []
    for index in range(n):
        d, nb = store.nearest_images(store.global_features[index:index + 1], want)
        d, nb = d[0], nb[0]
        keep = torch.from_numpy(groups[nb.numpy()] != groups[index])
        d, nb = d[keep], nb[keep]
        maps = [store.image_map(level, index) for level in range(len(store.levels))]
        size = training_input_size(store, index, model.backbone_.strides[0])
        raw, coarse = pixel_maps(maps, store, nb[:model.k_gallery], size, search)
        parts.append((map_score(smooth(raw, search.sigma), "map_top"),
                      map_score(coarse_map(coarse, size, search.sigma), "map_top"), float(d[:model.k_image].mean())))
        nears.append(nb[:3].numpy())
    return np.array(parts), np.array(nears)


def scores(parts: np.ndarray, near: np.ndarray, train_full: np.ndarray,
           scale: dict[str, tuple[float, float]] | None) -> tuple[np.ndarray, dict[str, tuple[float, float]]]:
    normalised = score_parts.density_normalised(parts, near, train_full, near.shape[1])
    if scale is None:
        scale = {name: score_parts.robust_scale(normalised[:, i]) for i, name in enumerate(score_parts.PARTS)}
    return score_parts.combine_scores("fused", scale, normalised[:, 0], normalised[:, 2], 1 / 3, normalised[:, 1],
                                      1 / 3), scale


def study(category: Any) -> dict[str, Any]:
    model = Spade(progress=False).fit(category.train)
    items = collect_images(category.train)
    base, n = model.store_, model.store_.n_images
    test_paths = [s.path for s in category.test]
    labels = np.array([s.is_anomalous for s in category.test], bool)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        extra = {name: copies(model, items, fn, f"{tmp}/{name}") for name, fn in AUGMENTS.items()}
        for config, names in CONFIGS.items():
            store = merged([base] + [extra[name] for name in names], f"{tmp}/m-{config}") if names else base
            groups = np.tile(np.arange(n), 1 + len(names))
            loo, loo_near = loo_parts(model, store, groups, n)
            train_full = loo[groups]
            loo_scores, scale = scores(loo, loo_near, train_full, None)
            model.store_ = store
            parts, near = [], []
            for p in model._predict_parts(test_paths):
                parts.append((p.map_part, p.coarse_part, p.knn_part))
                near.append(p.near[:3])
            model.store_ = base
            test_scores, _ = scores(np.array(parts), np.array(near), train_full, scale)
            out[config] = evaluate(loo_scores, test_scores, labels)
            print(category.name, config, {k: round(v, 3) for k, v in out[config].items()}, file=sys.stderr,
                  flush=True)
    return out


def main() -> None:
    study_main(__doc__ or "", study, "gallery", "augment_study")

if __name__ == "__main__":
    main()
