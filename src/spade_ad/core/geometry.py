"""Image geometry and feature extraction: how an image of any size becomes a network input, and how a map at the
network's resolution goes back onto the whole original image.

Resize modes:
- "keep_aspect" (default): the short side is scaled to `image_size` and the long side in proportion (rounded to a
  multiple of 32 so every pyramid level tiles the input exactly). Nothing is cropped: the map covers the whole image.
- "squash": both sides scaled to `image_size` (aspect ratio lost; simple, and what many re-implementations do).
- "paper_crop": the paper's protocol: squash to round(image_size * 8 / 7) (256 for 224), then centre-crop
  `image_size`. Pixels outside the crop are not scored: their value in a map at the original size is NaN.

The global view (setting `global_view`) is the image whose pooled last-stage feature picks the gallery and gives the
kNN image score: with "square" (default) the scored region squashed to `image_size` x `image_size`, so a long strip
is summarised at once at a coarser scale along its length (as PatchCore and PaDiM see every image); for a square
input it is the input itself and costs nothing. With "input" it is the network input.

The network input is bounded whatever the file's size: an image whose planned input would hold more than
`MAX_INPUT_PIXELS` pixels or be more elongated than `MAX_ASPECT_RATIO`:1 (a 2000 x 8 strip kept to scale becomes
224 x 56,000) is refused with an `ImageTooLargeError`, and is then skipped or reported like an unreadable image.
Both limits are module constants (assign new values to raise them); "squash" and "paper_crop" inputs are square.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from ..errors import ImageTooLargeError

ResizeMode = Literal["keep_aspect", "squash", "paper_crop"]
GlobalView = Literal["square", "input"]
RESIZE_MODES: tuple[str, ...] = ("keep_aspect", "squash", "paper_crop")
_MULTIPLE = 32
#: Most pixels of one network input: 224 x 4096 x 2 (a 4096 x 256 fabric image at image_size 224 is 224 x 3584).
MAX_INPUT_PIXELS = 224 * 4096 * 2
#: Most elongated network input (long side : short side).
MAX_ASPECT_RATIO = 64


@dataclass(frozen=True)
class Geometry:
    """Where the network input sits in the original image.

    `crop_box` is (left, top, right, bottom) of the region that was scored, in original-image pixels.
    """

    original_size: tuple[int, int]  # (height, width)
    input_size: tuple[int, int]  # (height, width) of the tensor fed to the backbone
    crop_box: tuple[float, float, float, float]


def plan_geometry(original_size: tuple[int, int], image_size: int, mode: ResizeMode, *,
                  name: object = "image") -> Geometry:
    """Decide the network input size for an image of `original_size` (height, width). An input over the limits
    (`MAX_INPUT_PIXELS`, `MAX_ASPECT_RATIO`) raises ImageTooLargeError naming `name`."""
    height, width = original_size
    if mode == "keep_aspect":
        scale = image_size / min(height, width)
        input_size = (_round_multiple(height * scale), _round_multiple(width * scale))
        _check_input_size(input_size, original_size, name)
        return Geometry(original_size, input_size, (0.0, 0.0, float(width), float(height)))
    if mode == "squash":
        return Geometry(original_size, (image_size, image_size), (0.0, 0.0, float(width), float(height)))
    if mode == "paper_crop":
        resized = round(image_size * 8 / 7)
        margin = (resized - image_size) / 2 / resized  # fraction of each side cut away
        box = (margin * width, margin * height, (1 - margin) * width, (1 - margin) * height)
        return Geometry(original_size, (image_size, image_size), box)
    raise ValueError(f"unknown resize mode {mode!r}: use one of {RESIZE_MODES}")


def global_view_geometry(geometry: Geometry, image_size: int, view: GlobalView) -> Geometry | None:
    """The geometry of the image's global view, or None when that view is the network input itself (view "input",
    or a square input): "square" squashes the scored region to `image_size` x `image_size`."""
    height, width = geometry.input_size
    if view == "input" or height == width:
        return None
    return Geometry(geometry.original_size, (image_size, image_size), geometry.crop_box)


def _check_input_size(input_size: tuple[int, int], original_size: tuple[int, int], name: object) -> None:
    """Refuse a network input over MAX_INPUT_PIXELS pixels or more elongated than MAX_ASPECT_RATIO:1."""
    height, width = input_size
    ratio = max(height, width) / min(height, width)
    if height * width <= MAX_INPUT_PIXELS and ratio <= MAX_ASPECT_RATIO:
        return
    raise ImageTooLargeError(
        name,
        f"a {original_size[1]} x {original_size[0]} image kept to scale needs a {width} x {height} network input "
        f"({height * width:,} pixels, {ratio:.0f}:1); the limits are {MAX_INPUT_PIXELS:,} pixels and "
        f"{MAX_ASPECT_RATIO}:1 (spade_ad.core.geometry.MAX_INPUT_PIXELS, MAX_ASPECT_RATIO). Crop or tile the image, or "
        f"fit the model with resize=\"squash\" or a smaller image_size",
    )


def _round_multiple(value: float) -> int:
    return max(_MULTIPLE, int(round(value / _MULTIPLE)) * _MULTIPLE)


def image_to_array(image: Image.Image, geometry: Geometry) -> np.ndarray:
    """RGB PIL image -> float32 array (3, h, w) in [0, 1] at the geometry's input size (antialiased resize): the
    network input of both the torch path and the runtime."""
    left, top, right, bottom = geometry.crop_box
    height, width = geometry.input_size
    resized = image.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, right, bottom),
                           reducing_gap=None)
    array = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1)
    return np.ascontiguousarray(array) / np.float32(255.0)
