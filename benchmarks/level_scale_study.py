"""Issue 27's item 2 candidate "per-level distances divided by the level's channel count before fusion": each
pyramid level's distances scaled before the levels' maps are averaged, so that the level with more channels (the
stride-16 level: 112 against 40 for EfficientNet-Lite0's stride-8 one) does not weigh more in the fused map only
because its distances are longer.

Measured, not built. For Euclidean distances (the default) scaling a level's features by c scales its distances by
c, so the backbone's pyramid output is scaled by wrapping `Backbone.forward` for this process only, and
`bench_accuracy.py` then runs through the library as usual on every dev product. The image score's coarse part
does not change (a constant factor cancels in its density division and its robust scale); the fused map does,
and with it the map part of the image score and every pixel figure. Modes:

- `channels`: each level divided by its channel count (the issue's wording);
- `sqrt_channels`: divided by the square root of its channel count (the root-mean-square difference per channel,
  the Euclidean form of "squared distance over channels");
- `median`: each level divided by the median of its own good (leave-one-out) distances on this product (read from
  the image-score study's default cache: run `image_score_study.py collect` first), so that both levels of every
  product have the same typical good distance: a per-product adaptation a fit could compute for free.

    .venv/bin/python benchmarks/level_scale_study.py --mode sqrt_channels
    .venv/bin/python benchmarks/level_scale_study.py --mode channels
    .venv/bin/python benchmarks/level_scale_study.py --mode median

Results: benchmarks/results/level_scale_<mode>.{json,md}; docs/detection.md quotes them against
benchmarks/results/accuracy_max_share.md (the default, same settings otherwise). The image-score effect alone
(every mode, offline from the cache) is `--offline`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_accuracy  # noqa: E402
from image_score_study import CACHE  # noqa: E402

from spade_ad.core import backbones  # noqa: E402

MODES = ("channels", "sqrt_channels", "median")
_current: dict[str, Any] = {"category": None}


def good_medians(product: str) -> list[float]:
    """Each level's median leave-one-out distance on `product`, from the image-score study's default cache."""
    path = CACHE / "default" / f"{product}.npz"
    if not path.is_file():
        sys.exit(f"{path} is missing: run benchmarks/image_score_study.py collect first")
    z = np.load(path)
    n, levels = int(z["n_loo"]), int(z["n_levels"])
    return [float(np.median(np.concatenate([z[f"loo_{i}_{lv}"].ravel() for i in range(n)]))) for lv in range(levels)]


def factors(mode: str, channels: list[int], product: str | None) -> list[float]:
    """The factor each level's distances are multiplied by."""
    if mode == "channels":
        return [1.0 / c for c in channels]
    if mode == "sqrt_channels":
        return [1.0 / math.sqrt(c) for c in channels]
    return [1.0 / m for m in good_medians(str(product))]


def scaling(mode: str):  # noqa: ANN201 - a replacement for Backbone.forward
    forward = backbones.Backbone.forward

    @torch.inference_mode()
    def scaled(self: backbones.Backbone, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        pyramid, global_features = forward(self, images)
        f = factors(mode, [level.shape[1] for level in pyramid], _current["category"])
        return [level * factor for level, factor in zip(pyramid, f)], global_features

    return scaled


def offline() -> None:
    """The image score alone under every mode, recomputed from the study's cache (no fit): the map part's fused map
    rebuilt from the cached per-level maps, the other two parts as cached, a quarter the strongest part."""
    from combine_study import _blend, judged
    from image_score_study import Product, fuse, smooth

    def rebuild(product: Product, mode: str) -> None:
        channels = [40, 112]  # EfficientNet-Lite0, layers 2, 3: what the cache was collected with
        f = factors(mode, channels, product.name) if mode != "plain" else [1.0, 1.0]

        def build(levels: list[list[np.ndarray]], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
            return [smooth(fuse([g * x for g, x in zip(grids, f)], size), product.sigma)
                    for grids, size in zip(levels, sizes)]

        product._maps[mode] = (build(product.loo_levels, product.train_sizes),
                               build(product.test_levels, product.test_sizes))

    products = [Product(p) for p in sorted((CACHE / "default").glob("*.npz"))]
    print("| mode | mean image AUROC | worst | recall at 1% / 5% | at the threshold (good flagged) |")
    print("|---|---|---|---|---|")
    for mode in ("plain", *MODES):
        for product in products:
            rebuild(product, mode)
        rows = [judged(p, _blend(0.25), (f"lof3:{mode}:0.01", "lof3:level1:0.01", "lof3:knn1")) for p in products]
        mean = {k: 100 * float(np.mean([r[k] for r in rows])) for k in ("auroc", "r1", "r5", "thr", "fa")}
        print(f"| {mode} | {mean['auroc']:.2f} | {100 * min(r['auroc'] for r in rows):.1f} | {mean['r1']:.1f} / "
              f"{mean['r5']:.1f} | {mean['thr']:.1f}% ({mean['fa']:.2f}%) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--category", action="append", help="only these categories (repeatable)")
    parser.add_argument("--offline", action="store_true", help="the image score alone, every mode, from the cache")
    args = parser.parse_args()
    if args.offline:
        offline()
        return
    if not args.mode:
        parser.error("--mode is needed (or --offline)")
    backbones.Backbone.forward = scaling(args.mode)
    run = bench_accuracy.run

    def tracked(category: Any, settings: dict[str, Any]) -> dict[str, Any]:
        _current["category"] = category.name
        return run(category, settings)

    bench_accuracy.run = tracked
    name = f"level_scale_{args.mode}"
    bench_accuracy.main(["--config", f"{name}=patch_size:1", "--out", str(bench_accuracy.RESULTS / name),
                         *(f"--category={category}" for category in args.category or [])])


if __name__ == "__main__":
    main()
