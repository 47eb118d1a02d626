"""Issue 27's item 1 candidate "aggregated features searched once and the plain map derived": the aggregated
(`patch_size=3`) evidence helps the objects' image score, the plain map is what the textures' localisation needs,
and two searches per level (the aggregated map beside the plain one) cost about 2x at predict. Here each position is
searched once, with its aggregated feature against the aggregated gallery; the matched stored position then gives
both the aggregated distance (the p3 map) and the plain distance between the two positions' plain features (the
derived map: one vector difference per position, no second search). The derived distance is never below the plain
nearest-neighbour distance; the question is whether it localises as well and scores images as well.

Per product: fit with the default settings; the aggregated gallery is the stored plain maps averaged over 3 x 3
(as `patch_size=3` does before storing). Every training image is scored without itself (its `k_gallery` nearest
other images: the leave-one-out side) and every test image with its `k_gallery` nearest images, both searches
(plain, aggregated) exact or on the same reduced gallery as the model's own search (`max_search_pairs`). Then:

- localisation: pixel AUROC and AU-PRO at the original size of the plain (today's), derived and p3 fused maps;
- the image score: the three density-normalised parts (lof3), equal weights, a quarter the strongest part (today's
  rule), for part sets from one search or two.

    .venv/bin/python benchmarks/derived_map_study.py                     # every dev product

Writes benchmarks/results/derived_map_study.{md,json}; docs/detection.md quotes it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_accuracy import categories  # noqa: E402
from image_score_study import evaluate, variant_table, write_results  # noqa: E402
from replayed_search import gallery_rows, leave_one_out, predicted  # noqa: E402

from spade_ad import Spade  # noqa: E402
from spade_ad.apps.evaluation.metrics import au_pro, pixel_auroc  # noqa: E402
from spade_ad.core import score_parts, search_numpy  # noqa: E402
from spade_ad.core.maps_numpy import coarse_map, fuse, map_score, map_to_original, smooth  # noqa: E402

MAPS = ("plain", "derived", "p3")

#: Image-score part sets (map slot, coarse slot; the kNN part is the third): (map kind, level set) pairs, where a
#: map kind's fused map or its coarsest level's own map is taken.
PART_SETS: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "today: plain map, plain coarse (one plain search)": (("plain", "fused"), ("plain", "coarse")),
    "p3 map, plain map (two searches)": (("p3", "fused"), ("plain", "fused")),
    "p3 map, derived map (one p3 search)": (("p3", "fused"), ("derived", "fused")),
    "derived map, p3 coarse (one p3 search)": (("derived", "fused"), ("p3", "coarse")),
    "derived map, derived coarse (one p3 search)": (("derived", "fused"), ("derived", "coarse")),
    "p3 map, p3 coarse (the objects preset's features)": (("p3", "fused"), ("p3", "coarse")),
}


def aggregated(level_map: np.ndarray) -> np.ndarray:
    """A (C, h, w) map averaged over 3 x 3 neighbourhoods (borders: the positions inside), as `patch_size=3`."""
    x = torch.from_numpy(np.asarray(level_map, np.float32))[None]
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)[0].numpy()


class Banks:
    """The store's plain rows per level and the same rows aggregated, in the store's row order (`model`: the
    fitted model they come from)."""

    def __init__(self, model: Spade) -> None:
        store = model.store_
        self.model = model
        self.plain = [np.asarray(level, np.float32) for level in store.levels]
        self.p3 = []
        for level in range(len(store.levels)):
            rows = np.empty_like(self.plain[level])
            for i in range(store.n_images):
                start, stop = store._offsets[i, level], store._offsets[i + 1, level]
                grid = aggregated(store.image_map(level, i).numpy())
                rows[start:stop] = grid.reshape(grid.shape[0], -1).T
            self.p3.append(rows)

    def level_grids(self, plain: np.ndarray, level: int, neighbours: np.ndarray) -> dict[str, np.ndarray]:
        """One level's (h, w) distance grids of one query map (C, h, w): plain, derived and p3."""
        h, w = plain.shape[1:]
        rows = gallery_rows(self.model, level, h * w, neighbours)
        queries = plain.reshape(plain.shape[0], -1).T
        squared, _ = search_numpy.topk_squared_distances(queries, self.plain[level][rows], 1)
        p3_queries = aggregated(plain).reshape(plain.shape[0], -1).T
        p3_squared, index = search_numpy.topk_squared_distances(p3_queries, self.p3[level][rows], 1)
        matched = self.plain[level][rows[index[:, 0]]]
        derived = np.sqrt(((queries - matched) ** 2).sum(1))
        return {"plain": np.sqrt(np.maximum(squared[:, 0], 0)).reshape(h, w), "derived": derived.reshape(h, w),
                "p3": np.sqrt(np.maximum(p3_squared[:, 0], 0)).reshape(h, w)}


def image_maps(banks: Banks, maps: list[np.ndarray], neighbours: np.ndarray, size: tuple[int, int],
               sigma: float) -> dict[str, dict[str, np.ndarray]]:
    """{map kind: {"fused": smoothed fused map, "coarse": the coarsest level's own smoothed map}} of one image."""
    per_level = [banks.level_grids(m, level, neighbours) for level, m in enumerate(maps)]
    return {kind: {"fused": smooth(fuse([grids[kind] for grids in per_level], size), sigma),
                   "coarse": coarse_map(per_level[-1][kind], size, sigma)} for kind in MAPS}


def study(category: Any) -> dict[str, Any]:
    model = Spade(progress=False).fit(category.train)
    sigma, k = model.sigma, model.k_gallery
    banks = Banks(model)
    loo_parts: dict[str, list[tuple[float, float]]] = {name: [] for name in PART_SETS}
    test_parts: dict[str, list[tuple[float, float]]] = {name: [] for name in PART_SETS}
    loo_knn, test_knn, loo_near, test_near = [], [], [], []

    def add(parts: dict[str, list[tuple[float, float]]], maps: dict[str, dict[str, np.ndarray]]) -> None:
        for name, (first, second) in PART_SETS.items():
            parts[name].append((map_score(maps[first[0]][first[1]], "map_top"),
                                map_score(maps[second[0]][second[1]], "map_top")))

    for d, nb, levels, size in leave_one_out(model):
        add(loo_parts, image_maps(banks, levels, nb[:k], size, sigma))
        loo_knn.append(float(d[:model.k_image].mean()))
        loo_near.append(nb[:3])
    pixel: dict[str, list[np.ndarray]] = {kind: [] for kind in MAPS}
    masks: list[np.ndarray] = []
    for sample, (levels, distances, neighbours, geometry) in zip(category.test,
                                                                predicted(model, [s.path for s in category.test])):
        maps = image_maps(banks, levels, neighbours, geometry.input_size, sigma)
        add(test_parts, maps)
        test_knn.append(float(distances[:model.k_image].mean()))
        test_near.append(neighbours[:3])
        if category.has_masks:
            for kind in MAPS:
                pixel[kind].append(map_to_original(maps[kind]["fused"], geometry))
            masks.append(sample.load_mask(pixel["plain"][-1].shape))
    labels = np.array([s.is_anomalous for s in category.test], bool)
    out: dict[str, Any] = {}
    near_loo, near_test = np.array(loo_near), np.array(test_near)
    for name in PART_SETS:
        loo = np.column_stack([np.array(loo_parts[name])[:, 0], np.array(loo_parts[name])[:, 1], loo_knn])
        test = np.column_stack([np.array(test_parts[name])[:, 0], np.array(test_parts[name])[:, 1], test_knn])
        # columns in score_parts.PARTS order: map, coarse, knn
        norm_loo = score_parts.density_normalised(loo, near_loo, loo, 3)
        norm_test = score_parts.density_normalised(test, near_test, loo, 3)
        scale = {"map": score_parts.robust_scale(norm_loo[:, 0]), "coarse": score_parts.robust_scale(norm_loo[:, 1]),
                 "knn": score_parts.robust_scale(norm_loo[:, 2])}

        def combined(x: np.ndarray, scale: dict[str, tuple[float, float]] = scale) -> np.ndarray:
            return score_parts.combine_scores("fused", scale, x[:, 0], x[:, 2], 1 / 3, x[:, 1], 1 / 3, 0.25)

        out[name] = evaluate(combined(norm_loo), combined(norm_test), labels)
        print(category.name, name, {key: round(v, 3) for key, v in out[name].items()}, file=sys.stderr, flush=True)
    if category.has_masks:
        out["pixel"] = {kind: {"pixel_auroc": pixel_auroc(pixel[kind], masks), "au_pro": au_pro(pixel[kind], masks)}
                        for kind in MAPS}
        print(category.name, out["pixel"], file=sys.stderr, flush=True)
    return out


def pixel_table(results: dict[str, dict[str, Any]]) -> str:
    products = [p for p in results if "pixel" in results[p]]
    lines = ["Pixel AUROC / AU-PRO at the original size of each fused map", "",
             "| map | " + " | ".join(products) + " | mean |", "|---|" + "---|" * (len(products) + 1)]
    for kind in MAPS:
        figures = [results[p]["pixel"][kind] for p in products]
        cells = [f"{100 * f['pixel_auroc']:.2f} / {100 * f['au_pro']:.2f}" for f in figures]
        mean = [np.mean([results[p]["pixel"][kind][m] for p in products]) for m in ("pixel_auroc", "au_pro")]
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {100 * mean[0]:.2f} / {100 * mean[1]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", action="append")
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for category in categories(args.category, Path(tmp)):
            results[category.name] = study(category)
    scores = {p: {name: r[name] for name in PART_SETS} for p, r in results.items()}
    write_results(variant_table(scores, "image score parts (map slot, coarse slot; kNN third)") + "\n\n"
                  + pixel_table(results), results, "derived_map_study")


if __name__ == "__main__":
    main()
