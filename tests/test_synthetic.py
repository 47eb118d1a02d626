"""The synthetic dataset: exact MVTec layout, valid masks, determinism, speed and visible defects."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade_ad.data.synthetic import make_line_dataset, make_synthetic_dataset, read_variants
from spade_ad.data.synthetic_drawing import DEFECT_TYPES, LINE_DEFECT_TYPES, OBJECT_DEFECT_TYPES, SUBTLE_DEFECT_TYPES

SMALL = {"n_train": 3, "n_test_good": 2, "n_test_defect": 2, "size": (64, 80)}


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The default dataset, and the CPU seconds it took (CPU, not wall: robust to a busy test machine)."""
    root = tmp_path_factory.mktemp("synthetic") / "product"
    start = time.process_time()
    returned = make_synthetic_dataset(root)
    elapsed = time.process_time() - start
    assert returned == root
    return root, elapsed


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img, dtype=np.float32)


def test_default_dataset_is_fast(default_dataset: tuple[Path, float]) -> None:
    _, elapsed = default_dataset
    assert elapsed < 5.0, f"make_synthetic_dataset took {elapsed:.2f} s of CPU"


def test_layout_is_exact(default_dataset: tuple[Path, float]) -> None:
    root, _ = default_dataset
    numbered = [f"{i:03d}.png" for i in range(10)]
    assert DEFECT_TYPES == ("scratch", "spot")
    assert _names(root) == ["ground_truth", "test", "train"]
    assert _names(root / "train") == ["good"]
    assert _names(root / "train" / "good") == [f"{i:03d}.png" for i in range(40)]
    assert _names(root / "test") == sorted(["good", *DEFECT_TYPES])
    assert _names(root / "test" / "good") == numbered
    assert _names(root / "ground_truth") == sorted(DEFECT_TYPES)  # no masks for good images
    for defect in DEFECT_TYPES:
        assert _names(root / "test" / defect) == numbered
        assert _names(root / "ground_truth" / defect) == [f"{i:03d}_mask.png" for i in range(10)]


def test_images_are_rgb_and_masks_binary_nonempty(default_dataset: tuple[Path, float]) -> None:
    root, _ = default_dataset
    for path in root.glob("t*/*/*.png"):
        with Image.open(path) as img:
            assert (img.mode, img.size) == ("RGB", (256, 256)), path
    for defect in DEFECT_TYPES:
        for image_path in (root / "test" / defect).iterdir():
            mask_path = root / "ground_truth" / defect / f"{image_path.stem}_mask.png"
            with Image.open(mask_path) as mask_img:
                assert (mask_img.mode, mask_img.size) == ("L", (256, 256))
                mask = np.asarray(mask_img)
            assert set(np.unique(mask)) == {0, 255}
            assert 20 <= (mask > 0).sum() <= 0.1 * mask.size  # visible but small


def test_defects_stand_out_from_nearest_good_image(default_dataset: tuple[Path, float]) -> None:
    """Quality floor without a CNN: against the closest good image, the defect region differs far more
    than the rest of the image (which differs only by normal variation)."""
    root, _ = default_dataset
    train = np.stack([_load(p).mean(axis=-1) for p in sorted((root / "train" / "good").iterdir())])
    ratios = []
    for defect in DEFECT_TYPES:
        for image_path in sorted((root / "test" / defect).iterdir()):
            image = _load(image_path).mean(axis=-1)
            inside = _load(root / "ground_truth" / defect / f"{image_path.stem}_mask.png") > 0
            diff = np.abs(train - image)  # (n_train, H, W), grey levels
            nearest = diff[np.argmin(diff.mean(axis=(1, 2)))]
            ratios.append(nearest[inside].mean() / nearest[~inside].mean())
            assert ratios[-1] > 1.5, f"{image_path}: in/out difference ratio {ratios[-1]:.2f}"
    assert np.median(ratios) > 3.0


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    first = _files(make_synthetic_dataset(tmp_path / "a", seed=7, **SMALL))
    second = _files(make_synthetic_dataset(tmp_path / "b", seed=7, **SMALL))
    assert len(first) == 3 + 2 + 2 * 2 * 2
    assert first == second


def test_different_seed_differs(tmp_path: Path) -> None:
    first = _files(make_synthetic_dataset(tmp_path / "a", seed=0, **SMALL))
    second = _files(make_synthetic_dataset(tmp_path / "b", seed=1, **SMALL))
    assert first.keys() == second.keys()
    assert all(first[name] != second[name] for name in first)


def test_non_square_size(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path, n_train=2, n_test_good=1, n_test_defect=2, size=(96, 160))
    for path in root.rglob("*.png"):
        with Image.open(path) as img:
            assert img.size == (160, 96), path  # PIL sizes are (width, height)
    for defect in DEFECT_TYPES:
        assert (_load(root / "ground_truth" / defect / "001_mask.png") > 0).any()


def test_rerun_with_fewer_images_leaves_exact_layout(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path, n_train=5, n_test_good=3, n_test_defect=3, size=(64, 64))
    (tmp_path / "train" / "good" / "notes.txt").write_text("keep me")
    make_synthetic_dataset(tmp_path, n_train=2, n_test_good=1, n_test_defect=1, size=(64, 64))
    assert _names(tmp_path / "train" / "good") == ["000.png", "001.png", "notes.txt"]
    assert _names(tmp_path / "test" / "good") == ["000.png"]
    assert _names(tmp_path / "ground_truth" / "spot") == ["000_mask.png"]


@pytest.mark.parametrize(
    "kwargs",
    [{"n_train": 0}, {"n_test_good": -1}, {"n_test_defect": -1}, {"size": (16, 256)}],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_synthetic_dataset(tmp_path, **kwargs)


def test_object_defects_change_the_part_where_the_mask_says(tmp_path: Path) -> None:
    """A missing hole, an extra hole and a washer: each image differs from the good part in the same pose exactly
    where its mask is (small, visible), and the good images are the very same as in a surface-defect set."""
    root = make_synthetic_dataset(tmp_path / "objects", n_train=3, n_test_good=2, n_test_defect=3, seed=5,
                                  defect_types=OBJECT_DEFECT_TYPES)
    plain = make_synthetic_dataset(tmp_path / "plain", n_train=3, n_test_good=2, n_test_defect=1, seed=5)
    assert _names(root / "test") == sorted(["good", *OBJECT_DEFECT_TYPES])
    assert _files(root / "train") == _files(plain / "train")
    for defect in OBJECT_DEFECT_TYPES:
        for image_path in sorted((root / "test" / defect).iterdir()):
            mask = _load(root / "ground_truth" / defect / f"{image_path.stem}_mask.png") > 0
            assert 20 <= mask.sum() <= 0.02 * mask.size, (image_path, mask.sum())
    with pytest.raises(ValueError, match="defect_types"):
        make_synthetic_dataset(tmp_path / "bad", defect_types=("scratch", "crack"))


def test_line_product_has_rare_goods_slipped_defects_and_a_second_session(tmp_path: Path) -> None:
    """The third product: the same good parts as the plain set except where variants.json says (rare variants,
    defective parts in the training folder), and every test image from a dimmer, warmer second session."""
    small = {"n_train": 80, "n_test_good": 40, "n_test_defect": 1, "size": (64, 64), "seed": 3}
    line = make_line_dataset(tmp_path / "line", **small)
    plain = make_synthetic_dataset(tmp_path / "plain", **{**small, "n_test_defect": 0})
    variants = read_variants(line)
    assert read_variants(plain) == {} and not (plain / "variants.json").exists()
    assert sorted(variants["train"].values()) == sorted(
        ["defect:foreign_part", "defect:spot"] + [f"rare:{k}" for k in ("colour", "pose", "print") for _ in range(2)])
    assert sorted(variants["test"].values()) == ["rare:colour", "rare:pose", "rare:print"]
    assert variants["session"] == {"train": "first", "test": "second"}
    assert _names(line / "test") == sorted(["good", *LINE_DEFECT_TYPES])
    line_files, plain_files = _files(line / "train"), _files(plain / "train")
    assert line_files.keys() == plain_files.keys()
    changed = {f"train/{name}" for name in line_files if line_files[name] != plain_files[name]}
    assert changed == set(variants["train"])  # 6 rare (2.5% per kind) and 2 defective of 80, nothing else
    # the second session: every good test image darker than the same part captured in the first
    for name in _names(line / "test" / "good"):
        if f"test/good/{name}" in variants["test"]:
            continue
        second, first = _load(line / "test" / "good" / name), _load(plain / "test" / "good" / name)
        assert 0.85 < second.mean() / first.mean() < 0.99, name
        assert second[..., 2].mean() / second[..., 0].mean() < first[..., 2].mean() / first[..., 0].mean()


def test_subtle_defects_are_small_and_fainter_than_the_plain_ones(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path, n_train=1, n_test_good=0, n_test_defect=4, seed=2,
                                  defect_types=(*SUBTLE_DEFECT_TYPES, "scratch"))
    contrast = {}
    for defect in (*SUBTLE_DEFECT_TYPES, "scratch"):
        values = []
        for image_path in sorted((root / "test" / defect).iterdir()):
            mask = _load(root / "ground_truth" / defect / f"{image_path.stem}_mask.png") > 0
            assert 5 <= mask.sum() <= 0.05 * mask.size, (image_path, mask.sum())
            grey = _load(image_path).mean(axis=-1)
            ring = (np.abs(np.gradient(mask.astype(np.float32))[0]) + np.abs(np.gradient(mask.astype(np.float32))[1])
                    ) > 0
            values.append(abs(grey[mask].mean() - grey[ring & ~mask].mean()))
        contrast[defect] = float(np.median(values))
    assert contrast["faint_scratch"] < contrast["scratch"], contrast
