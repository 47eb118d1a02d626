"""Stored training features: global vectors in memory, pyramid maps on disk (memory-mapped, float16 by default).

Pyramid levels are kept as one flat (n_vectors, channels) matrix per level plus each image's map shape, so images of
different sizes and aspect ratios live side by side and the gallery of any K images is a cheap gather that reads
only those K images. `FeatureStoreWriter` streams features to disk during `fit`, never holding them all in memory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from .gallery import gallery_row_indices, gallery_rows, image_map, image_offsets
from .search_torch import coreset_order, ranking_bank, topk_squared_distances

#: Largest share of a GPU's free memory the stored pyramid features may take to be kept there (see FeatureStore).
DEVICE_CACHE_FRACTION = 0.25


@dataclass
class FeatureStore:
    """Training features: global vectors (N, D) in memory and, per pyramid level, every spatial vector of every
    image as one (n_vectors, C_l) matrix that may live on disk (a read-only memory map), in float16 or float32.

    `shapes[i, l]` is image i's (h, w) at level l. Only the K images a test image needs are ever read, so predict
    cost and memory do not grow with the number of training images. On a GPU, the levels are copied to the device
    once when they take at most `DEVICE_CACHE_FRACTION` of its free memory (galleries are then gathered there, with
    no disk read or host-to-device copy per image); otherwise they are read from the memory map as on CPU.
    """

    global_features: torch.Tensor
    levels: list[np.ndarray]
    shapes: np.ndarray  # (N, L, 2) int64
    orders: list[np.ndarray] | None = None  # per level, each image's rows in coreset order (int32, within-image)
    _offsets: np.ndarray = field(init=False, repr=False)
    _ranking_on_device: dict[torch.device, torch.Tensor] = field(init=False, repr=False)
    _levels_on_device: dict[torch.device, list[torch.Tensor] | None] = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._offsets = image_offsets(self.shapes)
        # Every prediction searches the global features: their ranking bank (which holds them), on the queries'
        # device, is made once per device rather than once per batch.
        self._ranking_on_device = {}
        self._levels_on_device = {}
        self._lock = threading.Lock()

    @property
    def n_images(self) -> int:
        return int(self.global_features.shape[0])

    @property
    def dtype(self) -> np.dtype:
        return self.levels[0].dtype

    def nearest_images(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest training images by global feature: (squared distances (Q, k), indices (Q, k))."""
        device = queries.device
        if device not in self._ranking_on_device:
            self._ranking_on_device[device] = ranking_bank(self.global_features).to(device)
        ranking = self._ranking_on_device[device]
        return topk_squared_distances(queries, ranking[:, :-1], k, ranking=ranking)

    def gallery(
        self, level: int, image_indices: torch.Tensor, device: torch.device | str = "cpu", fraction: float = 1.0,
    ) -> torch.Tensor:
        """The spatial vectors at `level` of the given training images, stacked, as float32 on `device`: all of
        them, or with `fraction` < 1 the first ceil(fraction * h * w) of each image's coreset order (a reduced
        gallery that still covers every image's features)."""
        indices = image_indices.cpu().numpy()
        order = self.orders[level] if self.orders is not None else None
        resident = self._device_levels(_with_index(torch.device(device)))
        if resident is None:  # moved as stored (float16: half the bytes), then widened
            return torch.from_numpy(gallery_rows(self.levels[level], self._offsets, order, level, indices,
                                                 fraction)).to(device).float()
        rows_np = gallery_row_indices(self._offsets, order, level, indices, fraction)
        if rows_np is not None:
            return resident[level][torch.from_numpy(rows_np).to(device)].float()
        starts, stops = self._offsets[indices, level], self._offsets[indices + 1, level]
        lengths = stops - starts
        firsts = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)  # row index minus output position
        rows = torch.from_numpy(firsts).to(device) + torch.arange(int(lengths.sum()), device=device)
        return resident[level][rows].float()

    def _device_levels(self, device: torch.device) -> list[torch.Tensor] | None:
        """The levels as tensors on a GPU, copied on first use if they fit; None on CPU or if they do not fit."""
        if device.type != "cuda":
            return None
        with self._lock:
            if device not in self._levels_on_device:
                free, _ = torch.cuda.mem_get_info(device)
                fits = sum(level.nbytes for level in self.levels) <= DEVICE_CACHE_FRACTION * free
                self._levels_on_device[device] = [_to_device(level, device) for level in self.levels] if fits else None
            return self._levels_on_device[device]

    def image_map(self, level: int, index: int) -> torch.Tensor:
        """Training image `index`'s feature map at `level` as float32 (C_l, h, w)."""
        return torch.from_numpy(image_map(self.levels[level], self._offsets, self.shapes, level, index))


def _with_index(device: torch.device) -> torch.device:
    """"cuda" as "cuda:N" (the current device), so one GPU gets one cache however it is named."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _to_device(rows: np.ndarray, device: torch.device, chunk_bytes: int = 2**26) -> torch.Tensor:
    """Copy a (possibly memory-mapped) matrix to `device` in chunks, never holding all of it in host memory."""
    out = torch.empty(rows.shape, dtype=torch.from_numpy(rows[:0].copy()).dtype, device=device)
    step = max(1, chunk_bytes // max(1, rows.shape[1] * rows.itemsize))
    for first in range(0, rows.shape[0], step):
        out[first:first + step] = torch.from_numpy(np.array(rows[first:first + step]))
    return out


class FeatureStoreWriter:
    """Streams training features to disk during `fit`: pyramid vectors are appended to one raw file per level as
    each batch arrives (never all in memory); `build` memory-maps them. Global features stay in memory (small)."""

    def __init__(self, directory: str | Path, dtype: str = "float16") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self._globals: list[torch.Tensor] = []
        self._shapes: list[list[tuple[int, int]]] = []
        self._files: list[BinaryIO] = []
        self._order_files: list[BinaryIO] = []
        self._rows: list[int] = []
        self._channels: list[int] = []

    def add(self, pyramid: list[torch.Tensor], global_features: torch.Tensor, *, coreset: bool = True) -> None:
        """Add a batch: pyramid maps [(B, C_l, h_l, w_l)] and global features (B, D). Without `coreset`, each image's
        order is its own row order (tiled mode: its windows are searched exactly, and the coreset of a large image's
        map would take quadratic time)."""
        if not self._files:
            self._files = [open(self.directory / f"level_{i}.bin", "wb") for i in range(len(pyramid))]
            self._order_files = [open(self.directory / f"order_{i}.bin", "wb") for i in range(len(pyramid))]
            self._rows = [0] * len(pyramid)
            self._channels = [int(m.shape[1]) for m in pyramid]
        self._globals.append(global_features.detach().float().cpu())
        shapes = [(int(m.shape[2]), int(m.shape[3])) for m in pyramid]
        self._shapes.extend([shapes] * int(global_features.shape[0]))
        for level, maps in enumerate(pyramid):
            rows = maps.detach().flatten(2).transpose(1, 2).reshape(-1, maps.shape[1])  # (B*h*w, C) image-major
            stored = rows.cpu().numpy().astype(self.dtype, copy=False)
            self._files[level].write(stored.tobytes())
            self._rows[level] += rows.shape[0]
            per_image = maps.shape[2] * maps.shape[3]
            for image in range(maps.shape[0]):  # the order is computed on the stored (rounded) values
                if not coreset:
                    self._order_files[level].write(np.arange(per_image, dtype="<i4").tobytes())
                    continue
                vectors = torch.from_numpy(stored[image * per_image:(image + 1) * per_image])
                order = coreset_order(vectors.to(maps.device)).cpu().numpy().astype("<i4")
                self._order_files[level].write(order.tobytes())

    def extend(self, store: FeatureStore, chunk_rows: int = 1 << 16) -> None:
        """Copy every image of an existing store first (chunk by chunk: never all in memory), so that `add` then
        appends new images after them."""
        if self._files:
            raise ValueError("extend must come before any add")
        self._files = [open(self.directory / f"level_{i}.bin", "wb") for i in range(len(store.levels))]
        self._order_files = [open(self.directory / f"order_{i}.bin", "wb") for i in range(len(store.levels))]
        self._rows = [0] * len(store.levels)
        self._channels = [int(level.shape[1]) for level in store.levels]
        for level, rows in enumerate(store.levels):
            for first in range(0, rows.shape[0], chunk_rows):
                self._files[level].write(np.asarray(rows[first:first + chunk_rows]).astype(self.dtype).tobytes())
            self._rows[level] = int(rows.shape[0])
            order = store.orders[level] if store.orders is not None else _identity_orders(store, level)
            self._order_files[level].write(np.asarray(order, dtype="<i4").tobytes())
        self._globals.append(store.global_features.float().cpu())
        self._shapes.extend([[tuple(int(v) for v in shape) for shape in image] for image in store.shapes])

    def build(self) -> FeatureStore:
        if not self._globals:
            raise ValueError("no training features were added")
        levels, orders = [], []
        for level, (handle, order_handle) in enumerate(zip(self._files, self._order_files)):
            handle.close()
            order_handle.close()
            levels.append(np.memmap(handle.name, dtype=self.dtype, mode="r",
                                    shape=(self._rows[level], self._channels[level])))
            orders.append(np.fromfile(order_handle.name, dtype="<i4"))
        return FeatureStore(torch.cat(self._globals, 0), levels, np.asarray(self._shapes, dtype=np.int64), orders)

    def close(self) -> None:
        for handle in (*self._files, *self._order_files):
            handle.close()


def _identity_orders(store: FeatureStore, level: int) -> np.ndarray:
    """Each image's rows in their own order (for a store without coreset orders)."""
    sizes = store.shapes[:, level, 0] * store.shapes[:, level, 1]
    return np.concatenate([np.arange(int(n), dtype=np.int32) for n in sizes])
