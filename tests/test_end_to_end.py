"""End to end on real data: fit on MVTec AD bottle train/good with default settings, predict its whole test set,
and check the bar on maps at the original image size against the original masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade_ad import Spade
from spade_ad.data import list_images
from spade_ad.metrics import image_auroc, pixel_auroc


@pytest.mark.slow
def test_bottle_default_settings_reach_the_bar(bottle_root: Path) -> None:
    model = Spade(progress=False).fit(bottle_root / "train" / "good")
    assert model.store_.n_images == 209
    paths = list_images(bottle_root / "test")
    labels, scores, maps, masks = [], [], [], []
    for prediction in model.iter_predict(paths, original_size=True):
        path = Path(prediction.path)
        defect = path.parent.name
        labels.append(defect != "good")
        scores.append(prediction.score)
        maps.append(prediction.original_map)
        mask_path = bottle_root / "ground_truth" / defect / f"{path.stem}_mask.png"
        masks.append(np.asarray(Image.open(mask_path)) > 0 if defect != "good" else np.zeros((900, 900), bool))
    assert len(scores) == 83 and maps[0].shape == (900, 900)
    assert image_auroc(scores, labels) >= 0.99
    assert pixel_auroc(maps, masks) >= 0.975
