"""Tests for spade_ad.data.datasets: the MVTec AD and folder layouts, layout errors, and reading masks."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade_ad.data import datasets as ds
from spade_ad.data.images import read_image
from spade_ad.data.synthetic import make_synthetic_dataset
from spade_ad.errors import DatasetLayoutError, ImageReadError

SIZE = (64, 96)  # height, width


def _synthetic(root: Path, **counts: int) -> Path:
    """A small generated category in the MVTec layout (defects: scratch, spot)."""
    kwargs = {"n_train": 3, "n_test_good": 2, "n_test_defect": 2, **counts}
    return make_synthetic_dataset(root, size=SIZE, seed=1, **kwargs)


def _image(path: Path, size: tuple[int, int] = SIZE, mode: str = "RGB", value: int = 128) -> Path:
    """Write a flat image of (height, width) `size`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size[1], size[0]), value).save(path)
    return path


def _layout_error(root: Path) -> str:
    with pytest.raises(DatasetLayoutError) as info:
        ds.load_dataset(root)
    return str(info.value)


# ---------------------------------------------------------------- MVTec AD layout


def test_mvtec_category_parsed(tmp_path: Path) -> None:
    root = _synthetic(tmp_path / "widget", n_train=4, n_test_good=3, n_test_defect=2)
    data = ds.load_mvtec_category(root)
    assert data.name == "widget" and data.root == root and data.has_masks
    assert data.train == sorted((root / "train" / "good").glob("*.png")) and len(data.train) == 4
    assert [(s.defect, s.path.name) for s in data.test] == [
        ("good", "000.png"), ("good", "001.png"), ("good", "002.png"),
        ("scratch", "000.png"), ("scratch", "001.png"), ("spot", "000.png"), ("spot", "001.png"),
    ]
    assert data.labels.dtype == bool and data.labels.tolist() == [False] * 3 + [True] * 4
    assert data.defect_types == ["scratch", "spot"]
    for sample in data.test:
        expected = root / "ground_truth" / sample.defect / f"{sample.path.stem}_mask.png"
        assert sample.mask_path == (expected if sample.is_anomalous else None)
    assert ds.load_mvtec_category(root, name="other").name == "other"


def test_root_with_several_categories(tmp_path: Path) -> None:
    for name in ("b_part", "a_part"):
        _synthetic(tmp_path / name)
    (tmp_path / "notes").mkdir()  # neither train/ nor test/: not a category
    (tmp_path / "license.txt").write_text("x")
    assert ds.find_categories(tmp_path) == ["a_part", "b_part"]
    data = ds.load_dataset(tmp_path)
    assert [d.name for d in data] == ["a_part", "b_part"]
    assert all(len(d.train) == 3 and len(d.test) == 6 for d in data)


def test_category_selection_and_unknown_category(tmp_path: Path) -> None:
    for name in ("a_part", "b_part", "c_part"):
        _synthetic(tmp_path / name)
    assert [d.name for d in ds.load_dataset(tmp_path, ["c_part", "a_part", "c_part"])] == ["c_part", "a_part"]
    assert len(ds.load_dataset(tmp_path, [])) == 3
    with pytest.raises(DatasetLayoutError, match="unknown category 'zz'.*available: a_part, b_part, c_part"):
        ds.load_dataset(tmp_path, ["a_part", "zz"])


def test_root_that_is_one_category(tmp_path: Path) -> None:
    root = _synthetic(tmp_path / "widget")
    assert ds.find_categories(root) == ["widget"]
    assert [d.name for d in ds.load_dataset(root, ["widget"])] == ["widget"]
    with pytest.raises(DatasetLayoutError, match="available: widget"):
        ds.load_dataset(root, ["bottle"])


def test_no_category_explains_layout(tmp_path: Path) -> None:
    _image(tmp_path / "photos" / "a.png")
    with pytest.raises(DatasetLayoutError, match=r"no dataset category found .*train/good/"):
        ds.find_categories(tmp_path)
    with pytest.raises(DatasetLayoutError, match="not found"):
        ds.load_dataset(tmp_path / "missing")


def test_masks_absent_is_not_an_error(tmp_path: Path) -> None:
    root = _synthetic(tmp_path / "widget")
    shutil.rmtree(root / "ground_truth")
    (root / "ground_truth").mkdir()  # an empty mask folder counts as no masks
    data = ds.load_mvtec_category(root)
    assert not data.has_masks and all(s.mask_path is None for s in data.test)
    assert data.labels.sum() == 4
    with pytest.raises(DatasetLayoutError, match="no mask for the defective test image .*scratch"):
        next(s for s in data.test if s.is_anomalous).load_mask()


# ---------------------------------------------------------------- layout errors


def test_defect_image_without_mask(tmp_path: Path) -> None:
    root = _synthetic(tmp_path / "widget")
    (root / "ground_truth" / "spot" / "001_mask.png").unlink()
    message = _layout_error(root)
    assert f"{root / 'test' / 'spot' / '001.png'}: no mask" in message and "1 problem\n" in message


def test_mask_without_image(tmp_path: Path) -> None:
    root = _synthetic(tmp_path / "widget")
    (root / "test" / "scratch" / "000.png").unlink()
    stray = _image(root / "ground_truth" / "dent" / "007_mask.png", mode="L", value=0)
    message = _layout_error(root)
    assert f"{root / 'ground_truth' / 'scratch' / '000_mask.png'}: mask without a defective test image" in message
    assert f"{stray}: mask without" in message and str(root / "test" / "dent" / "007") in message


def test_missing_train_folder(tmp_path: Path) -> None:
    root = _synthetic(tmp_path / "widget")
    shutil.rmtree(root / "train")
    assert f"{root / 'train' / 'good'}: folder missing" in _layout_error(root)


def test_no_training_images(tmp_path: Path) -> None:
    root = _synthetic(tmp_path / "widget")
    for path in (root / "train" / "good").iterdir():
        path.unlink()
    assert f"{root / 'train' / 'good'}: no training images" in _layout_error(root)


def test_stray_images_are_reported(tmp_path: Path) -> None:
    root = _synthetic(tmp_path / "widget")
    in_train, in_test = _image(root / "train" / "x.png"), _image(root / "test" / "y.png")
    message = _layout_error(root)
    assert f"{in_train}: not read" in message and f"{in_test}: not read" in message


def test_missing_test_folder(tmp_path: Path) -> None:
    root = _synthetic(tmp_path / "widget")
    shutil.rmtree(root / "test")
    message = _layout_error(root)
    assert f"{root / 'test'}: folder missing" in message
    assert "mask without a defective test image" in message  # the masks are orphans now, reported too


def test_no_defective_or_no_normal_test_images(tmp_path: Path) -> None:
    root = _synthetic(tmp_path / "widget", n_test_defect=0)
    message = _layout_error(root)
    assert f"{root / 'test'}: no defective test images" in message and "needs both" in message
    root = _synthetic(tmp_path / "other", n_test_good=0)
    assert f"{root / 'test' / 'good'}: no normal test images" in _layout_error(root)


def test_two_mask_folders(tmp_path: Path) -> None:
    root = _synthetic(tmp_path / "widget")
    shutil.copytree(root / "ground_truth", root / "masks")
    assert f"{root / 'masks'}: a second mask folder" in _layout_error(root)


def test_all_problems_in_one_error_truncated(tmp_path: Path) -> None:
    root = _synthetic(tmp_path / "widget", n_test_defect=15)
    shutil.rmtree(root / "train")
    for mask in (root / "ground_truth").rglob("*.png"):
        mask.rename(mask.with_name("x" + mask.name))  # 30 images without mask + 30 masks without image
    message = _layout_error(root)
    assert "61 problems" in message and message.count("\n  - ") == 20 and "... and 41 more" in message
    assert f"{root / 'train' / 'good'}: folder missing" in message  # the first problem listed


def test_problems_of_several_categories_in_one_error(tmp_path: Path) -> None:
    a, b = _synthetic(tmp_path / "a_part"), _synthetic(tmp_path / "b_part")
    shutil.rmtree(a / "test")
    shutil.rmtree(b / "train")
    message = _layout_error(tmp_path)
    assert str(a / "test") in message and str(b / "train" / "good") in message


# ---------------------------------------------------------------- folder layout


def test_folder_layout(tmp_path: Path) -> None:
    root = tmp_path / "my_part"
    for i in range(3):
        _image(root / "train" / f"ok_{i}.jpg", size=(40, 50), mode="L")
    _image(root / "test" / "good" / "g1.png", size=(40, 50), mode="L")
    _image(root / "test" / "dent" / "d1.bmp", size=(40, 50), mode="L")
    _image(root / "test" / "dent" / "d2.tif", size=(40, 50), mode="L")
    _image(root / "masks" / "dent" / "d1.png", size=(40, 50), mode="L", value=255)
    _image(root / "masks" / "dent" / "d2_mask.png", size=(40, 50), mode="1", value=1)
    (root / "masks" / "good").mkdir()
    _image(root / "masks" / "good" / "g1.png", size=(40, 50), mode="L", value=0)  # masks of good images: ignored

    [data] = ds.load_dataset(root)
    assert data.name == "my_part" and data.has_masks and [p.name for p in data.train] == [
        "ok_0.jpg", "ok_1.jpg", "ok_2.jpg"]
    assert [(s.defect, s.path.name, s.mask_path and s.mask_path.name) for s in data.test] == [
        ("dent", "d1.bmp", "d1.png"), ("dent", "d2.tif", "d2_mask.png"), ("good", "g1.png", None)]
    assert all(s.load_mask().all() for s in data.test if s.is_anomalous)

    _image(root / "masks" / "dent" / "d1_mask.png", size=(40, 50), mode="L")
    assert "several masks match" in _layout_error(root)
    shutil.rmtree(root / "masks")
    assert not ds.load_mvtec_category(root).has_masks


# ---------------------------------------------------------------- load_mask


def test_load_mask_shapes_and_values(tmp_path: Path) -> None:
    data = ds.load_mvtec_category(_synthetic(tmp_path / "widget"))
    good = next(s for s in data.test if not s.is_anomalous)
    mask = good.load_mask()
    assert mask.dtype == bool and mask.shape == SIZE and not mask.any()
    assert good.load_mask((5, 7)).shape == (5, 7)
    bad = next(s for s in data.test if s.is_anomalous)
    expected = np.asarray(Image.open(bad.mask_path)) > 0
    assert expected.any() and np.array_equal(bad.load_mask(), expected)
    assert np.array_equal(bad.load_mask(SIZE), expected)
    mismatch = f"mask {bad.mask_path} is 96 x 64 pixels but its image {bad.path} is 64 x 64"
    with pytest.raises(DatasetLayoutError, match=re.escape(mismatch)):
        bad.load_mask((64, 64))
    _image(bad.mask_path, size=(32, 32), mode="L")
    with pytest.raises(DatasetLayoutError, match=re.escape(f"mask {bad.mask_path} is 32 x 32 pixels but its image")):
        bad.load_mask()


@pytest.mark.parametrize("kind", ["uint16_01", "uint16_full", "rgb", "rgba", "bool", "palette", "float_tiff"])
def test_mask_formats(tmp_path: Path, kind: str) -> None:
    truth = np.zeros((6, 9), bool)
    truth[1:4, 2:7] = True
    if kind.startswith("uint16"):
        img = Image.fromarray((truth * (1 if kind == "uint16_01" else 65535)).astype(np.uint16))
    elif kind == "rgb":
        img = Image.fromarray(np.stack([np.zeros_like(truth), truth, np.zeros_like(truth)], -1).astype(np.uint8) * 200)
    elif kind == "rgba":  # opaque everywhere: alpha must not count
        img = Image.fromarray(np.dstack([truth * 255] * 3 + [np.full(truth.shape, 255)]).astype(np.uint8))
    elif kind == "bool":
        img = Image.fromarray(truth)
    elif kind == "palette":
        img = Image.fromarray(truth.astype(np.uint8)).convert("P")
        img.putpalette([0, 0, 0, 255, 255, 255])
    else:
        img = Image.fromarray(truth.astype(np.float32))
    mask_path = tmp_path / ("mask.tif" if kind == "float_tiff" else "mask.png")
    img.save(mask_path)
    sample = ds.TestSample(_image(tmp_path / "img.png", size=(6, 9)), "dent", mask_path)
    assert np.array_equal(sample.load_mask(), truth)


def test_unreadable_files(tmp_path: Path) -> None:
    image = _image(tmp_path / "img.png", size=(6, 9))
    bad_mask = tmp_path / "mask.png"
    bad_mask.write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="mask.png"):
        ds.TestSample(image, "dent", bad_mask).load_mask()
    with pytest.raises(ImageReadError, match="gone.png: file not found"):
        ds.TestSample(tmp_path / "gone.png", "good").load_mask()


def test_good_mask_follows_exif_rotation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 6 wide and 9 high, shown rotated by 90 degrees: 9 wide and 6 high
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (6, 9)).save(path, exif=exif)
    assert read_image(path).size == (9, 6)
    assert ds.TestSample(path, "good").load_mask().shape == (6, 9)


# ---------------------------------------------------------------- real data


def test_real_bottle_counts(bottle_root: Path) -> None:
    [data] = ds.load_dataset(bottle_root)
    assert data.name == "bottle" and data.has_masks
    assert len(data.train) == 209 and len(data.test) == 83
    assert sum(s.mask_path is not None for s in data.test) == 63 == data.labels.sum()
    assert data.defect_types == ["broken_large", "broken_small", "contamination"]
    sample = next(s for s in data.test if s.is_anomalous)
    assert sample.load_mask().shape == (900, 900) and sample.load_mask().any()
