"""Reading images robustly, and turning whatever the user passes into a list of images.

Every image leaves this module as an 8-bit PIL image in mode "RGB", whatever the file held:
grayscale is replicated to three channels, alpha is dropped, 16-bit data is scaled by its full
range (65535 -> 255) rather than clipped, and float data from files is stretched from its own
min..max to 0..255. Every failure to read a file becomes an `ImageReadError` naming the file.
"""

from __future__ import annotations

import os
import stat
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from spade_ad.errors import ImageReadError, NoImagesError

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageItem",
    "ImageLike",
    "collect_images",
    "iter_loaded",
    "list_images",
    "read_image",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

ImageLike = Union[str, "os.PathLike[str]", Image.Image, np.ndarray, "torch.Tensor"]
"""One image or folder: a path, a PIL image, an array or a tensor."""

_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_ACCEPTED_TYPES = (
    "a folder or image file path (str or pathlib.Path), a PIL image, a numpy array "
    "(N,H,W,3), (N,H,W), (H,W,3) or (H,W), a torch tensor (N,3,H,W) or (3,H,W), "
    "or a list/tuple of paths and images"
)


# ---------------------------------------------------------------- pixel conversion


def _minmax_to_uint8(a: np.ndarray) -> np.ndarray:
    """Stretch the finite values of `a` from their own min..max to 0..255 (constant images become 0)."""
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = a[finite].min(), a[finite].max()
    scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.round(np.clip(np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0), 0, 255)).astype(
        np.uint8
    )


def _to_uint8(a: np.ndarray, *, from_file: bool) -> np.ndarray:
    """Turn pixel data of any usual dtype into uint8.

    uint8 is kept, bool becomes 0/255 and uint16 is scaled by its full range (>> 8, so 65535 -> 255).
    Data read from a file has no declared range, so floats are stretched min..max and other integers
    are treated as 16-bit when they fit, else stretched min..max. Arrays handed over in memory follow
    the usual convention instead: floats are in [0, 1] (clipped), other integers must be in 0..255.
    """
    kind, size = a.dtype.kind, a.dtype.itemsize
    if kind == "u" and size == 1:
        return a
    if kind == "b":
        return a.astype(np.uint8) * 255
    if kind == "u" and size == 2:
        return (a >> 8).astype(np.uint8)
    if kind == "f":
        if from_file:
            return _minmax_to_uint8(a)
        return np.round(np.clip(np.nan_to_num(a, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
    if kind in "iu":
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if not from_file:
            if lo < 0 or hi > 255:
                raise ValueError(
                    f"integer arrays of dtype {a.dtype} must hold values in 0..255 (got {lo}..{hi}); "
                    "pass uint8, uint16, or floats in [0, 1]"
                )
            return a.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return (a >> 8).astype(np.uint8)
        return _minmax_to_uint8(a)
    raise TypeError(f"unsupported pixel dtype {a.dtype}; pass uint8, uint16, or floats")


def _array_to_rgb(a: np.ndarray, *, from_file: bool) -> Image.Image:
    """Make an RGB image from (H,W), (H,W,1), (H,W,2: gray+alpha), (H,W,3) or (H,W,4: RGBA) data."""
    if a.ndim == 3 and a.shape[-1] in (1, 2):
        a = a[..., 0]
    elif a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)):
        raise ValueError(f"an image array must have shape (H,W) or (H,W,3), got {a.shape}")
    return Image.fromarray(np.ascontiguousarray(_to_uint8(a, from_file=from_file))).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded PIL image of any mode to "RGB" (returns `img` itself if it already is)."""
    if img.mode == "RGB":
        return img
    if img.mode in _UINT16_MODES or img.mode in ("I", "F"):
        # Pillow's own convert() clips these to 0..255 instead of scaling them.
        return _array_to_rgb(np.asarray(img), from_file=True)
    if "transparency" in img.info:
        # Going through RGBA avoids Pillow's warning about palette transparency given as bytes.
        img = img.convert("RGBA")
    return img.convert("RGB")


# ---------------------------------------------------------------- reading files


def _check_pixels(path: Path, width: int, height: int) -> None:
    """Refuse empty images and images over Pillow's decompression-bomb limit, before decoding them."""
    if width <= 0 or height <= 0:
        raise ImageReadError(path, "image has zero size")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageReadError(
            path,
            f"image too large: {width} x {height} pixels (the limit is {limit} pixels; "
            "raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file)",
        )


def _read_tiff(path: Path) -> Image.Image:
    """Read the first page of a TIFF that Pillow cannot handle (float RGB, unusual bit depths) with tifffile."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        _check_pixels(path, page.imagewidth, page.imagelength)
        a = page.asarray()
        if a.ndim == 3 and page.axes.startswith("S"):  # planar storage: channels first
            a = np.moveaxis(a, 0, -1)
    return _array_to_rgb(a, from_file=True)


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file fully and return it as an 8-bit "RGB" PIL image.

    The file is decoded completely here, so a truncated or corrupt file fails now rather than halfway
    through a fit. EXIF orientation is applied. TIFFs that Pillow cannot read are read with tifffile.
    Pillow's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS) is enforced. See `_to_uint8`
    for how 16-bit and float data are scaled. Raises ImageReadError on any failure.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ImageReadError(p, "file not found") from None
    except OSError as exc:
        raise ImageReadError(p, f"cannot access file ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(p, "is a folder, not an image file")
    if st.st_size == 0:
        raise ImageReadError(p, "file is empty")

    try:
        with Image.open(p) as img:
            _check_pixels(p, *img.size)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Raised by Image.open before any pixel is decoded (the warning only when warnings are errors).
        raise ImageReadError(
            p,
            f"image too large: over {Image.MAX_IMAGE_PIXELS} pixels "
            "(raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file)",
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's decoders raise many types on bad data
        reason = (
            "not an image file" if isinstance(exc, UnidentifiedImageError) else "file is truncated or corrupt"
        )
        if not _has_tiff_header(p):
            raise ImageReadError(p, reason) from exc
        try:
            return _read_tiff(p)
        except ImageReadError:
            raise
        except Exception as tiff_exc:  # tifffile cannot read it either: report what Pillow said
            raise ImageReadError(p, reason) from tiff_exc

    try:
        return _to_rgb(img)
    except Exception as exc:
        raise ImageReadError(p, f"unsupported image mode {img.mode}") from exc


def _has_tiff_header(path: Path) -> bool:
    """Whether the file starts with a TIFF or BigTIFF signature."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def list_images(folder: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Image files under `folder`, by extension (case-insensitive), sorted by relative path.

    Hidden files and folders (name starting with ".") are skipped, so .git, .ipynb_checkpoints and
    macOS "._" files never sneak in. Symlinked folders are not followed (no cycles).
    """
    root = Path(folder)
    if not root.exists():
        raise NoImagesError(f"folder not found: {root}")
    if not root.is_dir():
        raise NoImagesError(f"not a folder: {root} (expected a folder of images)")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(
            Path(dirpath, name)
            for name in filenames
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        )
        if not recursive:
            break
    if not found:
        where = f"{root} or its subfolders" if recursive else str(root)
        raise NoImagesError(
            f"no images found in {where}; accepted extensions: {', '.join(sorted(IMAGE_EXTENSIONS))} "
            "(hidden files and folders are skipped)"
        )
    found.sort(key=lambda f: f.relative_to(root).parts)
    return found


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ImageItem:
    """One input image: a file to read, or an image already in memory, with a name for reports."""

    name: str
    """Display name: path relative to the folder given, the path given, or "image_0000" for in-memory images."""
    path: Path | None = None
    image: Image.Image | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.image is None):
            raise ValueError("ImageItem needs exactly one of path and image")

    def load(self) -> Image.Image:
        """Return the image as a new "RGB" PIL image (reading the file if there is one)."""
        if self.path is not None:
            return read_image(self.path)
        assert self.image is not None
        try:
            img = ImageOps.exif_transpose(self.image)  # a copy: the caller's image is never modified
            if img.width == 0 or img.height == 0:
                raise ImageReadError(self.name, "image has zero size")
            return _to_rgb(img)
        except ImageReadError:
            raise
        except Exception as exc:
            raise ImageReadError(self.name, f"cannot convert image of mode {self.image.mode} to RGB") from exc


def _is_tensor(x: object) -> bool:
    """Whether `x` is a torch tensor, without importing torch (a tensor implies torch is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _tensor_to_array(t: torch.Tensor) -> np.ndarray:
    """(N,C,H,W) or (C,H,W) tensor with C in (1, 3) -> (N,H,W[,3]) or (H,W[,3]) numpy array."""
    if t.ndim not in (3, 4) or t.shape[-3] not in (1, 3):
        raise ValueError(
            f"a tensor must have shape (N,3,H,W), (3,H,W), (N,1,H,W) or (1,H,W); got {tuple(t.shape)}"
        )
    t = t.detach().cpu()
    if t.is_floating_point():
        t = t.float()  # numpy has no bfloat16
    a = np.moveaxis(t.numpy(), -3, -1)
    return a[..., 0] if a.shape[-1] == 1 else a


def _array_items(a: np.ndarray, start: int, allow_batch: bool) -> list[ImageItem]:
    """Items for one image array, or for a batch of them when `allow_batch`, named from `start` on."""
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3):
        frames = [a]
    elif allow_batch and (a.ndim == 3 or (a.ndim == 4 and a.shape[-1] in (1, 3))):
        frames = list(a)
        if not frames:
            raise NoImagesError("no images given: the batch is empty")
    else:
        shapes = "(N,H,W,3), (N,H,W), (H,W,3) or (H,W)" if allow_batch else "(H,W,3) or (H,W) inside a list"
        raise ValueError(f"an image array must have shape {shapes}; got {a.shape}")
    return [
        ImageItem(f"image_{start + i:04d}", image=_array_to_rgb(frame, from_file=False))
        for i, frame in enumerate(frames)
    ]


def _path_items(path: Path, name_prefix: str | None) -> list[ImageItem]:
    """Items for a file, or for every image in a folder (named relative to it, under `name_prefix`)."""
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if not path.is_dir():
        return [ImageItem(path.as_posix(), path=path)]
    prefix = PurePosixPath(name_prefix) if name_prefix is not None else PurePosixPath()
    return [
        ImageItem((prefix / f.relative_to(path).as_posix()).as_posix(), path=f) for f in list_images(path)
    ]


def _one_input(x: object, index: int, in_list: bool) -> list[ImageItem]:
    """Items for one input (a path, PIL image, array, tensor or an ImageItem already); `index` numbers in-memory
    images."""
    if isinstance(x, ImageItem):
        return [x]
    if isinstance(x, (str, os.PathLike)):
        path = Path(x)
        return _path_items(path, (path.resolve().name or "root") if in_list else None)
    if isinstance(x, Image.Image):
        return [ImageItem(f"image_{index:04d}", image=x)]
    if isinstance(x, np.ndarray):
        return _array_items(x, index, allow_batch=not in_list)
    if _is_tensor(x):
        return _array_items(_tensor_to_array(x), index, allow_batch=not in_list)
    what = "list element" if in_list else "images"
    raise TypeError(f"unsupported {what} of type {type(x).__name__}: expected {_ACCEPTED_TYPES}")


def collect_images(images: ImageLike | Sequence[ImageLike]) -> list[ImageItem]:
    """Turn what the user passed into a list of ImageItem, in a stable order.

    Accepts a folder or image file path (str or Path), a PIL image, a numpy array (N,H,W,3), (N,H,W),
    (H,W,3) or (H,W) (so an (N,H,3) gray batch reads as one RGB image), a torch tensor (N,3,H,W) or
    (3,H,W), or a list/tuple mixing paths, PIL images and single arrays/tensors. Folders are searched
    recursively (see `list_images`); their items are named by path relative to the folder
    (prefixed by the folder's own name when it sits in a list). Files are named by the path as given,
    in-memory images "image_0000", "image_0001", ... by position in the batch or list.
    Arrays and tensors are converted now: uint8 as is, uint16 scaled by 65535 -> 255, floats taken
    to be in [0, 1]. Paths are only checked for existence here; files are decoded by `ImageItem.load`.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise NoImagesError("no images given: the list is empty")
        items: list[ImageItem] = []
        for i, x in enumerate(images):
            items.extend(_one_input(x, i, in_list=True))
        return items
    return _one_input(images, 0, in_list=False)


# ---------------------------------------------------------------- loading


def iter_loaded(
    items: Iterable[ImageItem],
    skip_bad: bool = False,
    on_skip: Callable[[ImageItem, ImageReadError], None] | None = None,
    workers: int | None = None,
    prefetch: int | None = None,
    prepare: Callable[[Image.Image], Any] | None = None,
) -> Iterator[tuple[ImageItem, Any]]:
    """Yield (item, RGB image) in input order, decoding in a thread pool ahead of the consumer.

    With `prepare`, the workers also apply it to each decoded image (e.g. resizing to a tensor) and the value
    yielded is `prepare(image)` instead of the image.

    Decoding overlaps the caller's compute, in `workers` threads (default: one per CPU core, at most 8: decoding a
    large PNG takes about as long as the default backbone's forward pass, so a GPU needs several decoders to stay
    busy); at most `prefetch` (default 2 x workers) images are in flight or waiting
    beyond the one the caller holds, so memory stays bounded however many items there are (`items`
    may be a lazy iterable). A failed image raises its ImageReadError, or with `skip_bad` is reported
    to `on_skip(item, error)` (a warning if None) and skipped. The pool is shut down when the
    iteration ends, fails, or is abandoned (break / close), so no threads are left behind.
    """
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    prefetch = 2 * workers if prefetch is None else prefetch
    if workers < 1 or prefetch < 1:
        raise ValueError(f"workers and prefetch must be at least 1, got {workers} and {prefetch}")
    source = iter(items)
    pending: deque[tuple[ImageItem, Future[Any]]] = deque()

    def work(item: ImageItem) -> Any:
        image = item.load()
        return prepare(image) if prepare is not None else image

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spade-ad-load")
    try:
        while True:
            pending.extend((item, pool.submit(work, item)) for item in islice(source, prefetch - len(pending)))
            if not pending:
                return
            item, future = pending.popleft()
            try:
                image = future.result()
            except ImageReadError as err:
                if not skip_bad:
                    raise
                if on_skip is None:
                    warnings.warn(f"skipped: {err}", stacklevel=2)
                else:
                    on_skip(item, err)
                continue
            yield item, image
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
