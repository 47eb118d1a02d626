"""Can `fit` choose its own configuration? (issue 27, item 1.) For each dev product, three candidates that each win
somewhere (`augment_study.py`, `pixel_lof_study.py`): today's default, rotated copies of the training images in the
gallery (+-5 degrees, grouped with their original), and the patch-level density (b = 2, map and coarse parts).
Each is scored twice: on synthetic defects pasted onto the training images (cut-paste of another training image's
patch, a smooth noise blob, a drawn scratch), each scored against the store without its source image, against the
training images' leave-one-out scores as the good side (all a fit has); and on the real test images. The question:
does the candidate the synthetic defects prefer match the one the real defects prefer?

Selector: the highest recall of the synthetic defects at the good leave-one-out scores' 1% threshold (conformal),
then the higher synthetic AUROC, then the default.

    .venv/bin/python benchmarks/selector_study.py

Writes benchmarks/results/selector_study.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from augment_study import AUGMENTS, copies, merged  # noqa: E402
from bench_accuracy import categories  # noqa: E402
from image_score_study import evaluate, write_results  # noqa: E402
from pixel_lof_study import image_levels, parts_of  # noqa: E402

from spade_ad import Spade  # noqa: E402
from spade_ad.apps.evaluation.metrics import image_auroc  # noqa: E402
from spade_ad.core import calibration, score_parts  # noqa: E402
from spade_ad.core.feature_store import FeatureStore  # noqa: E402
from spade_ad.core.features import extract  # noqa: E402
from spade_ad.core.scoring import training_input_size  # noqa: E402
from spade_ad.data.inputs import collect_images  # noqa: E402

SAMPLE = 30  # training images that get synthetic defects (each gets all three kinds)
BETA = 2.0


SUBTLE = False  # --subtle: faint defects (half-blended pastes, light blobs, low-contrast scratches)


def synthetic_defects(inputs: torch.Tensor, donors: torch.Tensor, rng: np.random.Generator) -> list[torch.Tensor]:
    """Three defective copies of each input (B, 3, H, W) in [0, 1]: a patch of a donor image pasted elsewhere, a
    smooth noise blob blended with a random colour, a scratch. Sizes about 4-10% of the shorter side. With
    `SUBTLE`: the patch half-blended, the blob at a quarter of its strength, the scratch 0.12 off the local level."""
    b, _, h, w = inputs.shape
    side = min(h, w)
    out = []
    paste = inputs.clone()
    for i in range(b):
        s = int(rng.integers(int(0.06 * side), int(0.12 * side) + 1))
        y0, x0 = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        y1, x1 = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        mix = 0.5 if SUBTLE else 1.0
        paste[i, :, y1:y1 + s, x1:x1 + s] = (1 - mix) * paste[i, :, y1:y1 + s, x1:x1 + s] + \
            mix * donors[i, :, y0:y0 + s, x0:x0 + s]
    out.append(paste)
    blob = inputs.clone()
    for i in range(b):
        noise = torch.from_numpy(rng.normal(size=(1, 1, max(2, h // 16), max(2, w // 16))).astype(np.float32))
        smooth = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)[0, 0]
        cy, cx = int(rng.integers(h // 8, h - h // 8)), int(rng.integers(w // 8, w - w // 8))
        r = float(rng.uniform(0.04, 0.08)) * side
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        disc = (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r) & (smooth > 0)
        colour = torch.from_numpy(rng.uniform(0, 1, size=3).astype(np.float32))[:, None]
        alpha = float(rng.uniform(0.5, 0.9)) * (0.3 if SUBTLE else 1.0)
        region = blob[i][:, disc]
        blob[i][:, disc] = (1 - alpha) * region + alpha * colour
    out.append(blob)
    scratch = inputs.clone()
    for i in range(b):
        length = float(rng.uniform(0.1, 0.25)) * side
        angle = float(rng.uniform(0, math.pi))
        cy, cx = float(rng.uniform(0.2 * h, 0.8 * h)), float(rng.uniform(0.2 * w, 0.8 * w))
        width = float(rng.uniform(1.0, 2.5))
        yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        along = (yy - cy) * math.sin(angle) + (xx - cx) * math.cos(angle)
        across = (yy - cy) * math.cos(angle) - (xx - cx) * math.sin(angle)
        line = (along.abs() < length / 2) & (across.abs() < width)
        shade = float(rng.choice([0.1, 0.9]))
        if SUBTLE:  # 0.12 darker or lighter than what it crosses
            scratch[i][:, line] = (scratch[i][:, line] + (0.12 if shade > 0.5 else -0.12)).clamp(0, 1)
        else:
            scratch[i][:, line] = shade
    out.append(scratch)
    return out


class Candidate:
    """One configuration's scoring of a query (pyramid maps, global feature) against the store without `exclude`."""

    def __init__(self, model: Spade, store: FeatureStore, groups: np.ndarray, n: int, lof: bool) -> None:
        self.model, self.store, self.groups, self.n, self.lof = model, store, groups, n, lof
        self.density: list[np.ndarray] | None = None
        loo_levels, shapes, sizes, knn, near = [], [], [], [], []
        for i in range(n):
            maps = [store.image_map(level, i).numpy() for level in range(len(store.levels))]
            levels, k, nb = self._search(maps, store.global_features[i:i + 1], i)
            loo_levels.append(levels)
            shapes.append([m.shape[1:] for m in maps])
            sizes.append(training_input_size(store, i, model.backbone_.strides[0]))
            knn.append(k)
            near.append(nb)
        if lof:  # each stored row's own leave-one-out distance (originals; copies keep theirs at 0: not used)
            self.density = [np.zeros(level.shape[0], np.float32) for level in store.levels]
            offsets = store._offsets
            for i, levels in enumerate(loo_levels):
                for level, (d, _) in enumerate(levels):
                    self.density[level][offsets[i, level]:offsets[i + 1, level]] = d
            for level in range(len(store.levels)):  # copies: their original's values
                for j in range(n, store.n_images):
                    o = int(groups[j])
                    self.density[level][offsets[j, level]:offsets[j + 1, level]] = \
                        self.density[level][offsets[o, level]:offsets[o + 1, level]]
        self.loo = np.array([self._parts(lv, sh, sz, kn) for lv, sh, sz, kn in
                             zip(loo_levels, shapes, sizes, knn)])
        self.loo_near = np.array(near)
        self.train_full = self.loo[groups]
        normalised = self._normalise(self.loo, self.loo_near)
        self.scale = {p: score_parts.robust_scale(normalised[:, i]) for i, p in enumerate(score_parts.PARTS)}
        self.good = self._combine(normalised)

    def _search(self, maps: list[np.ndarray], global_feature: torch.Tensor, exclude: int | None
                ) -> tuple[list[Any], float, np.ndarray]:
        want = self.store.n_images if exclude is not None else self.model.k_gallery
        d, nb = self.store.nearest_images(global_feature, want)
        d, nb = d[0].numpy(), nb[0].numpy()
        if exclude is not None:
            keep = self.groups[nb] != self.groups[exclude]
            d, nb = d[keep], nb[keep]
        return image_levels(self.model, maps, nb[:self.model.k_gallery]), float(d[:self.model.k_image].mean()), nb[:3]

    def _parts(self, levels: list[Any], shapes: list[Any], size: tuple[int, int], knn: float) -> tuple[float, ...]:
        return (*parts_of(levels, shapes, size, self.density if self.lof and self.density is not None else None,
                          BETA, self.model.sigma), knn)

    def _normalise(self, parts: np.ndarray, near: np.ndarray) -> np.ndarray:
        return score_parts.density_normalised(parts, near, self.train_full, near.shape[1])

    def _combine(self, normalised: np.ndarray) -> np.ndarray:
        return score_parts.combine_scores("fused", self.scale, normalised[:, 0], normalised[:, 2], 1 / 3,
                                          normalised[:, 1], 1 / 3)

    def scores(self, queries: list[tuple[list[np.ndarray], torch.Tensor, tuple[int, int], int | None]]) -> np.ndarray:
        parts, near = [], []
        for maps, global_feature, size, exclude in queries:
            levels, knn, nb = self._search(maps, global_feature, exclude)
            parts.append(self._parts(levels, [m.shape[1:] for m in maps], size, knn))
            near.append(nb)
        return self._combine(self._normalise(np.array(parts), np.array(near)))


def study(category: Any, seed: int = 0) -> dict[str, Any]:
    model = Spade(progress=False).fit(category.train)
    base, n = model.store_, model.store_.n_images
    items = collect_images(category.train)
    rng = np.random.default_rng(seed)
    sample = set(rng.choice(n, size=min(n, SAMPLE), replace=False).tolist())
    synthetic: list[tuple[list[np.ndarray], torch.Tensor, tuple[int, int], int | None]] = []
    index = 0
    inputs_all = []
    for batch in model._batches(items, False, None, "fit"):
        inputs_all.append((batch, index))
        index += len(batch.items)
    donors_pool = [b.inputs for b, _ in inputs_all]
    for batch, first in inputs_all:
        chosen = [i for i in range(len(batch.items)) if first + i in sample]
        if not chosen:
            continue
        donor_batch = donors_pool[int(rng.integers(len(donors_pool)))]
        donors = donor_batch[torch.from_numpy(rng.integers(0, len(donor_batch), size=len(chosen)))]
        if donors.shape[2:] != batch.inputs.shape[2:]:
            donors = batch.inputs[chosen].flip(0)
        for defective in synthetic_defects(batch.inputs[chosen], donors, rng):
            changed = dataclasses.replace(batch, items=[batch.items[i] for i in chosen], inputs=defective,
                                          geometries=[batch.geometries[i] for i in chosen], global_inputs=None if
                                          batch.global_inputs is None else batch.global_inputs[chosen])
            pyramid, global_features = extract(model.backbone_, changed, model.patch_size)
            for j, source in enumerate(chosen):
                synthetic.append(([level[j].numpy() for level in pyramid], global_features[j:j + 1],
                                  changed.geometries[j].input_size, first + source))
    test: list[tuple[list[np.ndarray], torch.Tensor, tuple[int, int], int | None]] = []
    for batch in model._batches(collect_images([s.path for s in category.test]), False, None, "predict"):
        pyramid, global_features = extract(model.backbone_, batch, model.patch_size)
        for j, geometry in enumerate(batch.geometries):
            test.append(([level[j].numpy() for level in pyramid], global_features[j:j + 1], geometry.input_size,
                         None))
    labels = np.array([s.is_anomalous for s in category.test], bool)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rotated = merged([base] + [copies(model, items, AUGMENTS[name], f"{tmp}/{name}")
                                   for name in ("rot-5", "rot+5")], f"{tmp}/merged")
        candidates = {
            "default": (base, np.arange(n), False),
            "rotated copies": (rotated, np.tile(np.arange(n), 3), False),
            "patch-level density": (base, np.arange(n), True),
        }
        for name, (store, groups, lof) in candidates.items():
            model.store_ = store  # the level searches read the model's store
            candidate = Candidate(model, store, groups, n, lof)
            threshold, _ = calibration.conformal_threshold(candidate.good, 0.01)
            fake = candidate.scores(synthetic)
            real = candidate.scores(test)
            model.store_ = base
            out[name] = {
                "synthetic_recall": float((fake > threshold).mean()),
                "synthetic_auroc": image_auroc(np.concatenate([candidate.good, fake]),
                                               np.r_[np.zeros(len(candidate.good), bool), np.ones(len(fake), bool)]),
                **evaluate(candidate.good, real, labels),
            }
            print(category.name, name, {k: round(v, 3) for k, v in out[name].items()}, file=sys.stderr, flush=True)
    return out


def pick(results: dict[str, Any], key: tuple[str, ...]) -> str:
    return max(results, key=lambda name: (*[round(results[name][k], 6) for k in key], name == "default"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", action="append")
    parser.add_argument("--subtle", action="store_true", help="faint synthetic defects")
    parser.add_argument("--out", default="selector_study")
    args = parser.parse_args()
    global SUBTLE
    SUBTLE = args.subtle
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for category in categories(args.category, Path(tmp)):
            results[category.name] = study(category)
    lines = ["Per candidate: synthetic recall at the 1% threshold / synthetic AUROC || real image AUROC / recall at 1% "
             "/ at 5% FPR / recall at the threshold (false alarms %). Chosen: the selector's pick (synthetic recall, "
             "then synthetic AUROC, then the default); preferred: the best real (AUROC, recall at 1%, at 5%).", "",
             "| product | " + " | ".join(next(iter(results.values()))) + " | chosen | preferred by the real defects |",
             "|---|" + "---|" * (len(next(iter(results.values()))) + 2)]
    for product, by_name in results.items():
        cells = [f"{100 * r['synthetic_recall']:.0f} / {100 * r['synthetic_auroc']:.1f} || {100 * r['auroc']:.1f} / "
                 f"{100 * r['r1']:.0f} / {100 * r['r5']:.0f} / {100 * r['recall_thr']:.0f} ({100 * r['fa_thr']:.0f})"
                 for r in by_name.values()]
        chosen = pick(by_name, ("synthetic_recall", "synthetic_auroc"))
        preferred = pick(by_name, ("auroc", "r1", "r5"))
        lines.append(f"| {product} | " + " | ".join(cells) + f" | {chosen} | {preferred} |")
    chosen_rows = [by_name[pick(by_name, ("synthetic_recall", "synthetic_auroc"))] for by_name in results.values()]
    default_rows = [by_name["default"] for by_name in results.values()]
    for label, rows in (("default everywhere", default_rows), ("the selector's picks", chosen_rows)):
        lines.append(f"\n{label}: mean image AUROC {100 * np.mean([r['auroc'] for r in rows]):.2f}, worst "
                     f"{100 * np.min([r['auroc'] for r in rows]):.1f}; mean recall at 1% / 5% "
                     f"{100 * np.mean([r['r1'] for r in rows]):.0f} / {100 * np.mean([r['r5'] for r in rows]):.0f}; "
                     f"at the threshold {100 * np.mean([r['recall_thr'] for r in rows]):.0f}%")
    write_results("\n".join(lines), results, args.out)


if __name__ == "__main__":
    main()
