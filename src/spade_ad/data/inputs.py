"""What the user passes, as a list of images to read: folders, paths, PIL images, arrays and tensors become
`ImageItem`s (`collect_images`), read ahead in loader threads (`iter_loaded`). Decoding itself is
`spade_ad.data.images`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
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
from PIL import Image, ImageOps

from ..errors import ImageReadError, NoImagesError, SpadeError
from .images import NonFinitePixelsError, array_to_rgb, list_images, read_image, to_rgb

if TYPE_CHECKING:
    import torch

__all__ = ["ImageItem", "ImageLike", "collect_images", "iter_loaded"]

ImageLike = Union[str, "os.PathLike[str]", Image.Image, np.ndarray, "torch.Tensor"]
"""One image or folder: a path, a PIL image, an array or a tensor."""

_ACCEPTED_TYPES = (
    "a folder or image file path (str or pathlib.Path), a PIL image, a numpy array "
    "(N,H,W,3), (N,H,W), (H,W,3) or (H,W), a torch tensor (N,3,H,W) or (3,H,W), "
    "or a list/tuple of paths and images"
)


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
                raise ImageReadError(self.name, "image has zero size", kind="empty")
            return to_rgb(img)
        except ImageReadError:
            raise
        except NonFinitePixelsError as exc:
            raise ImageReadError(self.name, str(exc), kind="corrupt") from exc
        except Exception as exc:
            raise ImageReadError(
                self.name, f"cannot convert image of mode {self.image.mode} to RGB", kind="unsupported"
            ) from exc

    def sha256(self) -> str | None:
        """SHA-256 of the file's bytes, or of an in-memory image's mode, size and pixels: what `Spade.calibrate`
        knows a good image by, so that one given again is not counted twice. None when the file cannot be read
        (the predict loop reports it)."""
        if self.path is None:
            assert self.image is not None
            digest = hashlib.sha256(f"{self.image.mode} {self.image.size}".encode())
            digest.update(self.image.tobytes())
            return digest.hexdigest()
        try:
            return file_sha256(self.path)
        except OSError:
            return None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (hex), read in chunks by `hashlib.file_digest`."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


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
        ImageItem(f"image_{start + i:04d}", image=array_to_rgb(frame, from_file=False))
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


def exclude_images(items: Sequence[ImageItem], patterns: Sequence[str]) -> tuple[list[ImageItem], list[ImageItem]]:
    """(kept, excluded): the items whose name or file name matches none of the shell `patterns` (fnmatch, `*`, `?`,
    `[...]`), and those that match one, each in the order given. For `fit --exclude`: the training images `fit`
    names as suspects, left out without moving files. A pattern that matches no item is refused (a typo would
    otherwise keep the image it meant), and so is leaving no image."""
    kept: list[ImageItem] = []
    excluded: list[ImageItem] = []
    used: set[str] = set()
    for item in items:
        names = {item.name, item.name.replace("\\", "/").rsplit("/", 1)[-1]}
        hits = [pattern for pattern in patterns if any(fnmatch.fnmatchcase(name, pattern) for name in names)]
        used.update(hits)
        (excluded if hits else kept).append(item)
    unused = [pattern for pattern in patterns if pattern not in used]
    if unused:
        example = items[0].name if items else "none"
        raise SpadeError(f"--exclude {unused[0]!r} matches none of the {len(items)} training images (names look "
                         f"like {example!r}); check the pattern")
    if not kept:
        raise NoImagesError(f"--exclude leaves none of the {len(items)} training images")
    return kept, excluded


# ---------------------------------------------------------------- loading


def iter_loaded(
    items: Iterable[ImageItem],
    skip_bad: bool = False,
    on_skip: Callable[[ImageItem, ImageReadError], None] | None = None,
    workers: int | None = None,
    prefetch: int | None = None,
    prepare: Callable[[ImageItem, Image.Image], Any] | None = None,
) -> Iterator[tuple[ImageItem, Any]]:
    """Yield (item, RGB image) in input order, decoding in a thread pool ahead of the consumer.

    With `prepare`, the workers also apply it to each decoded image (e.g. resizing to a tensor) and the value
    yielded is `prepare(item, image)` instead of the image; an ImageReadError it raises (e.g. an image too large for
    the network) is handled like a file that cannot be read.

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
        return prepare(item, image) if prepare is not None else image

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
