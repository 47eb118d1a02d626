"""Image geometry and feature extraction: how an image of any size becomes a network input, and how a map at the
network's resolution goes back onto the whole original image.

Resize modes:
- "keep_aspect" (default): the short side is scaled to `image_size` and the long side in proportion (rounded to a
  multiple of 32 so every pyramid level tiles the input exactly). Nothing is cropped: the map covers the whole image.
- "squash": both sides scaled to `image_size` (aspect ratio lost; simple, and what many re-implementations do).
- "paper_crop": the paper's protocol: squash to round(image_size * 8 / 7) (256 for 224), then centre-crop
  `image_size`. Pixels outside the crop are not scored: their value in a map at the original size is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ResizeMode = Literal["keep_aspect", "squash", "paper_crop"]
RESIZE_MODES: tuple[str, ...] = ("keep_aspect", "squash", "paper_crop")
_MULTIPLE = 32


@dataclass(frozen=True)
class Geometry:
    """Where the network input sits in the original image.

    `crop_box` is (left, top, right, bottom) of the region that was scored, in original-image pixels.
    """

    original_size: tuple[int, int]  # (height, width)
    input_size: tuple[int, int]  # (height, width) of the tensor fed to the backbone
    crop_box: tuple[float, float, float, float]


def plan_geometry(original_size: tuple[int, int], image_size: int, mode: ResizeMode) -> Geometry:
    """Decide the network input size for an image of `original_size` (height, width)."""
    height, width = original_size
    if mode == "keep_aspect":
        scale = image_size / min(height, width)
        input_size = (_round_multiple(height * scale), _round_multiple(width * scale))
        return Geometry(original_size, input_size, (0.0, 0.0, float(width), float(height)))
    if mode == "squash":
        return Geometry(original_size, (image_size, image_size), (0.0, 0.0, float(width), float(height)))
    if mode == "paper_crop":
        resized = round(image_size * 8 / 7)
        margin = (resized - image_size) / 2 / resized  # fraction of each side cut away
        box = (margin * width, margin * height, (1 - margin) * width, (1 - margin) * height)
        return Geometry(original_size, (image_size, image_size), box)
    raise ValueError(f"unknown resize mode {mode!r}: use one of {RESIZE_MODES}")


def _round_multiple(value: float) -> int:
    return max(_MULTIPLE, int(round(value / _MULTIPLE)) * _MULTIPLE)


def image_to_tensor(image: Image.Image, geometry: Geometry) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, h, w) in [0, 1] at the geometry's input size (antialiased resize)."""
    left, top, right, bottom = geometry.crop_box
    height, width = geometry.input_size
    resized = image.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, right, bottom),
                           reducing_gap=None)
    array = np.asarray(resized, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def map_to_original(anomaly_map: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Resize a map at input resolution onto the whole original image; pixels outside the scored box are NaN."""
    height, width = geometry.original_size
    left, top, right, bottom = geometry.crop_box
    box = (int(round(left)), int(round(top)), int(round(right)), int(round(bottom)))
    inner = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))[None, None],
        size=(box[3] - box[1], box[2] - box[0]),
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    if box == (0, 0, width, height):
        return inner
    full = np.full((height, width), np.nan, dtype=np.float32)
    full[box[1]:box[3], box[0]:box[2]] = inner
    return full
