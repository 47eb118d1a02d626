"""Feature extraction: images -> batches of network inputs -> feature pyramids and global features.

`iter_batches` decodes (in loader threads, via `spade_ad.data.images`), resizes (via `spade_ad.core.geometry`) and
batches images of one input size, with each image's square global view where that is not the input itself; `extract`
runs the backbone and the optional local aggregation (`patch_size`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..data.inputs import ImageItem, iter_loaded
from ..errors import ImageReadError
from .backbones import Backbone
from .geometry import Geometry, GlobalView, ResizeMode, global_view_geometry, image_to_array, plan_geometry

SkipCallback = Callable[[ImageItem, ImageReadError], None]


@dataclass
class Batch:
    """Images of one input size, ready for the backbone. `originals` holds the decoded images when asked for;
    `global_inputs` their global views (`spade_ad.core.geometry.global_view_geometry`), None when those are the
    inputs."""

    items: list[ImageItem]
    inputs: torch.Tensor  # (B, 3, h, w) on the model's device
    geometries: list[Geometry]
    originals: list[Image.Image | None]
    global_inputs: torch.Tensor | None = None  # (B, 3, s, s)


def image_to_tensor(image: Image.Image, geometry: Geometry) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, h, w) in [0, 1] at the geometry's input size (see `image_to_array`)."""
    return torch.from_numpy(image_to_array(image, geometry))


def extract(backbone: Backbone, batch: Batch, patch_size: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Backbone pyramid [(B, C_l, h_l, w_l)] of the batch's inputs (averaged over `patch_size` x `patch_size`
    neighbourhoods when > 1: PatchCore's locally aware features) and global features (B, D) of its global views."""
    pyramid, global_features = backbone(batch.inputs)
    if batch.global_inputs is not None:
        global_features = global_view_features(backbone, batch)
    if patch_size > 1:
        pyramid = [
            F.avg_pool2d(m, patch_size, stride=1, padding=patch_size // 2, count_include_pad=False) for m in pyramid
        ]
    return pyramid, global_features


def global_view_features(backbone: Backbone, batch: Batch) -> torch.Tensor:
    """Global features (B, D) of the batch's global views (its inputs where those are the views)."""
    return backbone(batch.inputs if batch.global_inputs is None else batch.global_inputs)[1]


def iter_batches(
    items: list[ImageItem],
    *,
    image_size: int,
    resize: ResizeMode,
    global_view: GlobalView = "input",
    batch_size: int,
    device: torch.device,
    skip_bad: bool = False,
    on_skip: SkipCallback | None = None,
    desc: str = "",
    keep_images: bool = False,
    progress: bool | None = None,
) -> Iterator[Batch]:
    """Decode (in worker threads), resize and batch images; a batch only holds images of one input size.

    An unreadable image, or one too large for the network (ImageTooLargeError, see `spade_ad.core.geometry`), raises
    ImageReadError after the batch read before it has been yielded (nothing computed before the fault is lost),
    unless `skip_bad`. Progress bars show when `progress` is True, or on a terminal when
    None."""
    pending: list[tuple[ImageItem, torch.Tensor, Geometry, Image.Image | None, torch.Tensor | None]] = []
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=None if progress is None else not progress)

    def prepare(item: ImageItem, image: Image.Image) -> tuple[Image.Image | None, torch.Tensor, Geometry,
                                                               torch.Tensor | None]:
        """Runs in the loader threads: resizing overlaps the backbone's compute. An image whose network input would
        be over the geometry's limits raises ImageTooLargeError here, before any memory is spent on it."""
        name = item.path if item.path is not None else item.name
        geometry = plan_geometry((image.height, image.width), image_size, resize, name=name)
        view = global_view_geometry(geometry, image_size, global_view)
        return ((image if keep_images else None), image_to_tensor(image, geometry), geometry,
                None if view is None else image_to_tensor(image, view))

    loaded = iter_loaded(items, skip_bad=skip_bad, on_skip=on_skip, prepare=prepare)
    try:
        while True:
            try:
                item, (image, tensor, geometry, view) = next(loaded)
            except StopIteration:
                break
            except ImageReadError:
                if pending:  # finish what was already read before reporting the bad file
                    yield _stack(pending, device)
                raise
            if pending and (len(pending) == batch_size or pending[0][2].input_size != geometry.input_size):
                yield _stack(pending, device)
                bar.update(len(pending))
                pending = []
            pending.append((item, tensor, geometry, image, view))
        if pending:
            yield _stack(pending, device)
            bar.update(len(pending))
    finally:
        loaded.close()
        bar.close()


def _stack(pending: list[tuple[ImageItem, torch.Tensor, Geometry, Image.Image | None, torch.Tensor | None]],
           device: torch.device) -> Batch:
    """One batch; its images share an input size, so either all of them have a separate global view or none."""
    items, tensors, geometries, images, views = zip(*pending)
    global_inputs = None if views[0] is None else torch.stack(views).to(device)
    return Batch(list(items), torch.stack(tensors).to(device), list(geometries), list(images), global_inputs)


def thumbnails(inputs: torch.Tensor, short_side: int) -> list[np.ndarray]:
    """Small uint8 RGB copies (h, w, 3) of a batch of network inputs (B, 3, H, W) in [0, 1], short side
    `short_side` (long side at most 8x that); [] when `short_side` is 0. Kept in the model for explanations."""
    if short_side <= 0:
        return []
    height, width = inputs.shape[2:]
    scale = min(short_side / min(height, width), 8 * short_side / max(height, width), 1.0)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    small = F.interpolate(inputs.float(), size=size, mode="area") if size != (height, width) else inputs.float()
    pixels = (small.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(pixels)
