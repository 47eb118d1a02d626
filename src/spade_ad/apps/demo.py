"""The built-in main job: a synthetic product dataset, a fitted model, scored test images and overlays.

Nothing is downloaded: the data is generated with a fixed seed and the backbone's weights ship in a pip package.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..data.datasets import load_mvtec_category
from ..data.inputs import ImageItem
from ..data.synthetic import make_synthetic_dataset
from ..estimators.spade import Spade
from ..outputs.writers import PredictionWriter
from .evaluation.metrics import image_auroc, pixel_auroc


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
    data = load_mvtec_category(root)
    model = Spade(device=device, seed=seed).fit(data.train)
    cal = model.calibration_
    log(f"fitted on {len(model.train_names_)} good images; image threshold at a {cal.false_alarm_rate:g} false-alarm "
        f"rate from their leave-one-out scores (guaranteed <= {cal.guaranteed_rate:.3g})")
    model.save(output / "model.safetensors")
    scores, maps, masks = [], [], []
    with PredictionWriter.for_model(model, output / "predictions") as writer:
        items = [ImageItem(s.path.relative_to(root / "test").as_posix(), path=s.path) for s in data.test]
        predictions = model.iter_predict(items, original_size=True, keep_images=True)
        for sample, prediction in zip(data.test, predictions):
            writer.write(prediction)
            scores.append(prediction.score)
            maps.append(prediction.original_map)
            masks.append(sample.load_mask(prediction.original_map.shape))
    return {
        "image_auroc": image_auroc(scores, data.labels),
        "pixel_auroc": pixel_auroc(maps, masks),
        "n_train": float(len(model.train_names_)),
        "n_test": float(len(data.test)),
    }
