"""Dataset readers for evaluation: the MVTec AD layout, and the same idea in a plainer form for your own images.

One *category* is one product, with its own model. A dataset root holds category folders side by side, or is
one category itself. A category folder follows the MVTec AD layout, or the plainer folder layout meant for
data set up by hand (see docs/datasets.md)::

    bottle/                        (MVTec AD)      my_part/                       (folder layout)
    ├── train/good/*.png                           ├── train/*.jpg                 good images for fitting
    ├── test/good/*.png                            ├── test/good/*.jpg             normal test images
    ├── test/broken_large/*.png                    ├── test/scratch/*.jpg          defective test images
    └── ground_truth/broken_large/*_mask.png       └── masks/scratch/*.png         masks (optional)

Both forms are read by the same rules: training images come from ``train/good/`` if it exists, else from
``train/``; masks from ``ground_truth/`` or ``masks/``, one per defective image, named ``<name>_mask.<ext>``
or ``<name>.<ext>`` after the image ``test/<defect>/<name>.<ext>``. Any folder name other than ``good`` under
``test/`` is a defect type. Images sit directly in their folders (subfolders are not read), with any extension
in `spade_ad.data.images.IMAGE_EXTENSIONS`, any size, RGB or grayscale; hidden files are skipped. A mask is True
wherever any of its colour channels is non-zero. A folder is a category when it holds ``train/`` or ``test/``.

Masks are optional for a whole dataset (`CategoryData.has_masks` is then False and only image-level metrics
can be computed), but once there are any, every defective image needs one. All layout problems of a dataset
are reported together in one `DatasetLayoutError`. Image files are not opened here: the model reports
unreadable ones when it loads them.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import DatasetLayoutError, NoImagesError
from .images import list_images, read_image

__all__ = ["CategoryData", "TestSample", "find_categories", "load_dataset", "load_mvtec_category"]

GOOD = "good"
_MASK_FOLDERS = ("ground_truth", "masks")
_MAX_LISTED = 20
_EXIF_ORIENTATION = 0x0112
_RAW_MASK_MODES = frozenset({"1", "L", "LA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N", "RGB", "RGBA", "RGBX"})
_EXPECTED = (
    "Expected per category: good images for fitting in train/good/ (or directly in train/), normal test images "
    "in test/good/, defective ones in test/<defect>/, and optionally one mask per defective image in "
    "ground_truth/<defect>/ (or masks/<defect>/) named <name>_mask.<ext> or <name>.<ext>; see docs/datasets.md."
)


@dataclass(frozen=True)
class TestSample:
    """One test image: its file, its defect type ("good" for normal images) and its mask file, if any."""

    __test__ = False  # not a pytest test class, despite the name

    path: Path
    defect: str
    mask_path: Path | None = None

    @property
    def is_anomalous(self) -> bool:
        """Whether the image shows a defect."""
        return self.defect != GOOD

    def load_mask(self, shape: tuple[int, int] | None = None) -> np.ndarray:
        """The ground-truth mask as a (height, width) bool array, True on the defect.

        `shape` is the image's (height, width); when None it is read from the image file's header. Normal
        images get an all-False mask. Raises DatasetLayoutError when the mask's size differs from the image's
        or a defective image has no mask, and ImageReadError when a file cannot be read.
        """
        if self.mask_path is None:
            if self.is_anomalous:
                raise DatasetLayoutError(f"no mask for the defective test image {self.path}")
            return np.zeros(shape or _image_shape(self.path), dtype=bool)
        mask = _read_mask(self.mask_path)
        height, width = shape or _image_shape(self.path)
        if mask.shape != (height, width):
            raise DatasetLayoutError(
                f"mask {self.mask_path} is {mask.shape[1]} x {mask.shape[0]} pixels but its image {self.path} "
                f"is {width} x {height} (width x height); a mask must have its image's size"
            )
        return mask


@dataclass(frozen=True)
class CategoryData:
    """One category of a dataset: its training images and its labelled test images."""

    name: str
    root: Path
    train: list[Path]
    test: list[TestSample]
    has_masks: bool
    """False when the dataset has no masks at all: then only image-level metrics can be computed."""

    @property
    def labels(self) -> np.ndarray:
        """Per test image, whether it is defective (bool array, in the order of `test`)."""
        return np.array([s.is_anomalous for s in self.test], dtype=bool)

    @property
    def defect_types(self) -> list[str]:
        """The defect types among the test images, sorted."""
        return sorted({s.defect for s in self.test if s.is_anomalous})


def load_mvtec_category(root: str | os.PathLike[str], name: str | None = None) -> CategoryData:
    """Read one category folder in the MVTec AD layout (or the folder layout); `name` defaults to the folder's.

    Raises DatasetLayoutError listing every layout problem found.
    """
    root = Path(root)
    data, problems = _read_category(root, name or _folder_name(root))
    _raise_problems(root, problems)
    return data


def find_categories(root: str | os.PathLike[str]) -> list[str]:
    """The categories under `root`: ``[root's name]`` if `root` is a category, else its category subfolders, sorted.

    A category is a folder holding a ``train/`` or ``test/`` folder. Raises DatasetLayoutError if there is none.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset folder not found: {root}" if not root.exists() else f"not a folder: {root}")
    if _is_category(root):
        return [_folder_name(root)]
    names = [d.name for d in _subfolders(root) if _is_category(d)]
    if not names:
        raise DatasetLayoutError(
            f"no dataset category found in {root}: a category folder holds train/ and test/ folders, and a dataset "
            f"root holds category folders side by side (like MVTec AD: ROOT/bottle/, ROOT/cable/, ...). {_EXPECTED}"
        )
    return names


def load_dataset(root: str | os.PathLike[str], categories: Sequence[str] | None = None) -> list[CategoryData]:
    """Read the chosen categories (None or empty: all) of a dataset root, or the one category folder `root`.

    Raises DatasetLayoutError for unknown category names (listing the available ones), and one
    DatasetLayoutError listing every layout problem of the chosen categories.
    """
    root = Path(root)
    available = find_categories(root)
    chosen = list(dict.fromkeys(categories)) if categories else available
    unknown = [c for c in chosen if c not in available]
    if unknown:
        raise DatasetLayoutError(
            f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))} in {root}; "
            f"available: {', '.join(available)}"
        )
    folders = {name: root if _is_category(root) else root / name for name in chosen}
    loaded, problems = [], []
    for name, folder in folders.items():
        data, found = _read_category(folder, name)
        loaded.append(data)
        problems += found
    _raise_problems(root, problems)
    return loaded


# ---------------------------------------------------------------- reading the layout


def _read_category(root: Path, name: str) -> tuple[CategoryData, list[str]]:
    """Parse one category folder; return its data and the layout problems found (``"path: reason"``)."""
    problems: list[str] = []
    train = _read_train(root, problems)
    found = _read_test(root, problems)

    mask_dirs = [root / folder for folder in _MASK_FOLDERS if (root / folder).is_dir()]
    problems += [f"{extra}: a second mask folder; masks are read from {mask_dirs[0]} only" for extra in mask_dirs[1:]]
    mask_dir = mask_dirs[0] if mask_dirs else None
    masks = [m for m in _images_in(mask_dir, recursive=True) if m.relative_to(mask_dir).parts[0] != GOOD]
    by_name: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for m in masks:
        by_name[(m.relative_to(mask_dir).parent.as_posix(), m.stem)].append(m)

    samples, claimed = [], set()
    for defect, path in found:
        mask_path = None
        if masks and defect != GOOD:
            candidates = by_name.get((defect, f"{path.stem}_mask"), []) + by_name.get((defect, path.stem), [])
            claimed.update(candidates)
            if not candidates:
                expected = mask_dir / defect / f"{path.stem}_mask.png"
                problems.append(f"{path}: no mask (expected e.g. {expected}; once there are masks, every defective "
                                "image needs one)")
            elif len(candidates) > 1:
                problems.append(f"{path}: several masks match it: {', '.join(map(str, candidates))}")
            else:
                mask_path = candidates[0]
        samples.append(TestSample(path, defect, mask_path))
    for m in masks:
        if m not in claimed:
            image = root / "test" / m.relative_to(mask_dir).parent / m.stem.removesuffix("_mask")
            problems.append(f"{m}: mask without a defective test image (expected {image}.<ext>)")
    return CategoryData(name=name, root=root, train=train, test=samples, has_masks=bool(masks)), problems


def _read_train(root: Path, problems: list[str]) -> list[Path]:
    """The training images: in train/good/ if that exists, else directly in train/."""
    train_dir, good_dir = root / "train", root / "train" / GOOD
    if not train_dir.is_dir():
        problems.append(f"{good_dir}: folder missing (the good images for fitting go here, or directly in train/)")
        return []
    if not good_dir.is_dir():
        good_dir = train_dir
    else:
        problems += [f"{p}: not read, training images go in {good_dir}" for p in _images_in(train_dir)]
    train = _images_in(good_dir)
    if not train:
        problems.append(f"{good_dir}: no training images (the good images for fitting go here)")
    return train


def _read_test(root: Path, problems: list[str]) -> list[tuple[str, Path]]:
    """(defect type, path) of every test image, by folder name then file name."""
    test_dir = root / "test"
    if not test_dir.is_dir():
        problems.append(f"{test_dir}: folder missing (normal test images go in test/good/, defective ones in "
                        "test/<defect>/)")
        return []
    problems += [f"{p}: not read, test images go in test/good/ or test/<defect>/" for p in _images_in(test_dir)]
    found = [(d.name, p) for d in _subfolders(test_dir) for p in _images_in(d)]
    auroc = "(image AUROC needs both normal and defective test images)"
    if not any(defect == GOOD for defect, _ in found):
        problems.append(f"{test_dir / GOOD}: no normal test images {auroc}")
    if all(defect == GOOD for defect, _ in found):
        problems.append(f"{test_dir}: no defective test images in test/<defect>/ folders {auroc}")
    return found


def _raise_problems(root: Path, problems: list[str]) -> None:
    """Raise one DatasetLayoutError listing `problems` (the first `_MAX_LISTED` of them), if there are any."""
    if not problems:
        return
    lines = [f"  - {p}" for p in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        lines.append(f"  ... and {len(problems) - _MAX_LISTED} more")
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    raise DatasetLayoutError(f"dataset layout of {root}: {count}\n" + "\n".join(lines) + f"\n{_EXPECTED}")


def _is_category(folder: Path) -> bool:
    return (folder / "train").is_dir() or (folder / "test").is_dir()


def _folder_name(folder: Path) -> str:
    """The folder's own name, also for "." and ".."."""
    return Path(os.path.abspath(folder)).name


def _subfolders(folder: Path) -> list[Path]:
    """Non-hidden subfolders, sorted by name."""
    return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _images_in(folder: Path | None, recursive: bool = False) -> list[Path]:
    """Image files in `folder` as `list_images` finds them; [] when there are none or no folder."""
    if folder is None:
        return []
    try:
        return list_images(folder, recursive=recursive)
    except NoImagesError:
        return []


# ---------------------------------------------------------------- reading masks


def _image_shape(path: Path) -> tuple[int, int]:
    """(height, width) of an image as `read_image` returns it (EXIF rotation applied), from its header only."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            rotated = img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except Exception:  # read_image says why (ImageReadError), or reads the TIFFs Pillow cannot
        width, height = read_image(path).size
        rotated = False
    return (width, height) if rotated else (height, width)


def _read_mask(path: Path) -> np.ndarray:
    """A mask file as a (height, width) bool array: True where any colour channel is non-zero (alpha ignored).

    Pixel values are compared with zero as stored, so 0/1 masks work at any bit depth (1, 8, 16 bit, float).
    """
    try:
        with Image.open(path) as img:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            if img.mode not in _RAW_MASK_MODES:  # palette, CMYK, ...: judge by colour
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            pixels = np.asarray(img)
    except Exception:  # read_image says why (ImageReadError), or reads the TIFFs Pillow cannot
        pixels = np.asarray(read_image(path))
    if pixels.ndim == 3:
        return (pixels[..., : 3 if pixels.shape[-1] >= 3 else 1] > 0).any(axis=-1)
    return pixels > 0
