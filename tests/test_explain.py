"""The "why" of a prediction: where the strongest region sits in the nearest normal image, checked where the
answer is known (a defect pasted on a copy of a training image)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from spade_ad import Spade
from spade_ad.data.images import list_images


def test_pasted_defect_matches_the_same_place_in_its_source_image(fitted_model: Spade, synthetic_root: Path,
                                                                  tmp_path: Path) -> None:
    source = list_images(synthetic_root / "train" / "good")[3]
    pixels = np.asarray(Image.open(source).convert("RGB")).copy()
    top, left = 60, 120  # the synthetic images are 160 x 224
    pixels[top:top + 14, left:left + 14] = (250, 30, 200)  # a magenta patch: nothing like it in the good images
    pasted = tmp_path / "pasted.png"
    Image.fromarray(pixels).save(pasted)
    [prediction] = fitted_model.predict([pasted], original_size=True, explain=True)
    why = prediction.explanation
    assert prediction.is_anomalous and why is not None
    assert why.normal_name == fitted_model.train_names_[why.normal_index] == source.name  # its own source image
    scale = prediction.geometry.input_size[1] / prediction.geometry.original_size[1]
    x0, y0, x1, y1 = why.region_box
    assert x0 <= (left + 7) * scale <= x1 and y0 <= (top + 7) * scale <= y1  # the region holds the patch
    for match in why.matches:
        assert match.test_box == why.region_box
        shift = np.subtract(match.normal_box[:2], match.test_box[:2])
        assert np.abs(shift).max() <= match.stride  # the same place, within one feature cell
    assert len(why.matches) == len(fitted_model.layers)
    assert set(why.to_json()) == {"normal", "normal_input_size", "region_box", "matches"}


def test_no_explanation_unless_asked(fitted_model: Spade, synthetic_root: Path) -> None:
    [prediction] = fitted_model.predict(list_images(synthetic_root / "test")[:1])
    assert prediction.explanation is None


def test_predict_explain_writes_the_why_pictures(fitted_model: Spade, synthetic_root: Path, tmp_path: Path) -> None:
    import json

    from cli_run import run_cli

    model_file = fitted_model.save(tmp_path / "model.safetensors")
    from spade_ad import load

    assert len(load(model_file).thumbnails_) == fitted_model.store_.n_images  # kept in the model file
    out = tmp_path / "out"
    assert run_cli(["predict", model_file, synthetic_root / "test", "-o", out, "--explain"]) == 0
    lines = [json.loads(line) for line in (out / "regions.jsonl").read_text().splitlines()]
    flagged = [line for line in lines if line["regions"]]
    assert flagged and all("explanation" in line for line in flagged)
    for line in flagged:
        picture = out / "explain" / Path(line["path"]).with_suffix(".png")
        with Image.open(picture) as image:
            assert image.width > image.height  # two panels side by side
