"""The built-in main job: a synthetic product dataset, a fitted model, scored test images and overlays.

Nothing is downloaded: the data is generated with a fixed seed and the backbone's weights ship in a pip package.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from .data import list_images
from .export import PredictionWriter
from .metrics import image_auroc, pixel_auroc
from .model import Spade
from .synthetic import make_synthetic_dataset


def run_demo(
    output: str | Path = "demo_out",
    *,
    seed: int = 0,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Generate data under `output/data`, fit, predict into `output/predictions`; return the AUROCs."""
    output = Path(output)
    root = make_synthetic_dataset(output / "data", seed=seed)
    log(f"synthetic dataset written to {root}")
    model = Spade(device=device, seed=seed).fit(root / "train" / "good")
    log(f"fitted on {len(model.train_names_)} good images")
    model.save(output / "model.safetensors")
    test_paths = list_images(root / "test")
    labels, scores, maps, masks = [], [], [], []
    with PredictionWriter(output / "predictions") as writer:
        for prediction in model.iter_predict(test_paths, original_size=True, keep_images=True):
            writer.write(prediction)
            path = Path(prediction.path)
            defect = path.parent.name
            labels.append(defect != "good")
            scores.append(prediction.score)
            maps.append(prediction.original_map)
            masks.append(_mask_for(root, path, prediction.original_map.shape))
    return {
        "image_auroc": image_auroc(scores, labels),
        "pixel_auroc": pixel_auroc(maps, masks),
        "n_train": float(len(model.train_names_)),
        "n_test": float(len(test_paths)),
    }


def _mask_for(root: Path, image_path: Path, shape: tuple[int, ...]) -> np.ndarray:
    defect = image_path.parent.name
    if defect == "good":
        return np.zeros(shape, dtype=bool)
    return np.asarray(Image.open(root / "ground_truth" / defect / f"{image_path.stem}_mask.png")) > 0
