"""Issue 27's item 2 candidate "L2-normalised features": every feature vector divided by its length before any
search, so that distances are between directions (cosine-like) and each pyramid level weighs alike in the fused map.

Measured, not built: the backbone's output is normalised by wrapping `Backbone.forward` for this process only, and
`bench_accuracy.py` then runs through the library as usual on every dev product. Modes:

- `pyramid`: the pyramid levels (the pixel search, hence the map and its two image-score parts);
- `coarse`: the coarsest level only (the image score's coarse part, and that level's share of the fused map);
- `global`: the global features only (the kNN part, the gallery's nearest images and the density neighbours);
- `both`.

    .venv/bin/python benchmarks/feature_norm_study.py --mode pyramid
    .venv/bin/python benchmarks/feature_norm_study.py --mode global
    .venv/bin/python benchmarks/feature_norm_study.py --mode coarse
    .venv/bin/python benchmarks/feature_norm_study.py --mode coarse --collect    # then combine_study.py --aggregated
    .venv/bin/python benchmarks/feature_norm_study.py --mode pyramid --patch-size 3 --category bottle \
        --category mpdd_metal_plate --category synthetic_objects --category synthetic_line   # with the objects preset

Results: benchmarks/results/feature_norm_<mode>.{json,md}; docs/detection.md quotes them against
benchmarks/results/accuracy_max_share.md (the default, same settings otherwise).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_accuracy  # noqa: E402

from spade_ad.core import backbones  # noqa: E402


def normalising(mode: str):  # noqa: ANN201 - a replacement for Backbone.forward
    forward = backbones.Backbone.forward

    @torch.inference_mode()
    def normalised(self: backbones.Backbone, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        pyramid, global_features = forward(self, images)
        if mode in ("pyramid", "both"):
            pyramid = [F.normalize(level.float(), dim=1).to(level.dtype) for level in pyramid]
        if mode == "coarse":
            pyramid = [*pyramid[:-1], F.normalize(pyramid[-1].float(), dim=1).to(pyramid[-1].dtype)]
        if mode in ("global", "both"):
            global_features = F.normalize(global_features.float(), dim=1).to(global_features.dtype)
        return pyramid, global_features

    return normalised


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("pyramid", "coarse", "global", "both"), required=True)
    parser.add_argument("--category", action="append", help="only these categories (repeatable)")
    parser.add_argument("--patch-size", type=int, default=1, help="with the objects preset's 3: normalised before "
                        "the 3 x 3 averaging")
    parser.add_argument("--collect", action="store_true", help="instead: the image-score study's cache of these "
                        "features (tag l2_MODE), whose parts combine_study.py --aggregated recombines")
    args = parser.parse_args()
    backbones.Backbone.forward = normalising(args.mode)
    if args.collect:
        import image_score_study

        image_score_study.main(["collect", "--tag", f"l2_{args.mode}"])
        return
    name = f"l2_{args.mode}" + (f"_p{args.patch_size}" if args.patch_size > 1 else "")
    bench_accuracy.main(["--config", f"{name}=patch_size:{args.patch_size}",
                         "--out", str(bench_accuracy.RESULTS / name.replace("l2_", "feature_norm_")),
                         *(f"--category={category}" for category in args.category or [])])


if __name__ == "__main__":
    main()
