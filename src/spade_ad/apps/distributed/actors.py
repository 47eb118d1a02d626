"""What runs on the cluster: the actors that score (`_Scorer`) or extract training features (`_Extractor`), how
their pool is laid out (`_Pool`), and the dataset that feeds them (`_dataset`: read, decode, actor pool)."""

from __future__ import annotations

import math
import os
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...data.inputs import ImageItem
from ...errors import ImageReadError, SettingError
from .listing import _batch_items, _decode_row, _Listing

#: CPUs a read-and-decode task asks for (two run on the spare CPU of a local cluster).
READ_CPUS = 0.5


def _result_batch(paths: Sequence[Any], results: dict[str, bytes], failed: dict[str, tuple[str, str]]) -> dict:
    paths = [str(p) for p in paths]
    return {
        "path": paths,
        "result": np.array([results.get(p, b"") for p in paths], dtype=object),
        "error_kind": [failed[p][0] if p in failed else "" for p in paths],
        "error_reason": [failed[p][1] if p in failed else "" for p in paths],
    }


def _set_threads(threads: int) -> None:
    """An actor's torch threads: its CPUs (what the floats depend on: see the module docstring)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


class _CrashOnce:
    """Test hook: the actor process exits (os._exit) once it has handled `after` images in all, if `marker` does
    not exist yet (it is created first, so the actor Ray restarts does not exit again): a worker dying mid-run.
    With a third item "write" in the spec, it exits instead while writing the first file after that point: with
    half of the file in its temporary name, before the rename (`while_writing`)."""

    def __init__(self, spec: tuple[Any, ...] | None) -> None:
        self.marker, self.after = (Path(spec[0]), int(spec[1])) if spec else (None, 0)
        self.in_write = bool(spec and len(spec) > 2 and spec[2] == "write")
        self.count = 0

    def _due(self) -> bool:
        return self.marker is not None and self.count >= self.after and not self.marker.exists()

    def _exit(self) -> None:
        assert self.marker is not None
        self.marker.write_text(str(os.getpid()))
        os._exit(1)

    def __call__(self, handled: int) -> None:
        self.count += handled
        if not self.in_write and self._due():
            self._exit()

    def while_writing(self, save: Any) -> Any:
        """`save(path)`, or, when due, half of what it writes left at `path` and the process gone."""
        if not (self.in_write and self._due()):
            return save

        def half_then_exit(path: Path) -> None:
            save(path)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[:len(data) // 2])
            self._exit()

        return half_then_exit


class _Scorer:
    """A Ray actor: opens the model once and scores decoded batches with its own `iter_predict`. Each result is
    the pickled Prediction (its regions computed here; without `images`, its image and original-size map left
    out).

    With `files` ({"out_dir", "save_maps", "stems": {path: [stem, ...]}}), the actor writes the per-image files of
    the images it scored itself (`spade_ad.outputs.image_files.ImageFiles`, each file whole: a retried batch replaces
    them whole) under the stems the driver planned, and returns the Prediction without its maps and image: the driver
    then only writes rows."""

    def __init__(self, model_path: str, *, weights: str | None, device: str | None, engine: str | None,
                 thresholds: dict[str, float], explain: bool, images: bool, threads: int,
                 files: dict[str, Any] | None = None, crash: tuple[Any, ...] | None = None) -> None:
        from ...estimators.opening import open_model
        from ...outputs.image_files import ImageFiles

        self.model = open_model(model_path, weights=weights, device=device, engine=engine)
        _set_threads(threads)
        if thresholds:
            self.model.set_thresholds(**thresholds)
        self.explain, self.images, self.crash = explain, images, _CrashOnce(crash)
        self.files = self.stems = None
        if files is not None:
            self.files = ImageFiles.for_model(self.model, files["out_dir"], save_maps=files["save_maps"],
                                              explain=explain)
            self.stems = files["stems"]

    def _save(self, save: Any, folder: str, stem: str, suffix: str = ".png") -> None:
        assert self.files is not None
        self.files._save(self.crash.while_writing(save), folder, stem, suffix)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        items, failed = _batch_items(batch)
        results: dict[str, bytes] = {}

        def on_skip(item: ImageItem, error: ImageReadError) -> None:
            failed[item.name] = (error.kind, error.reason)

        for prediction in self.model.iter_predict(items, original_size=True, keep_images=self.images,
                                                  skip_bad=True, on_skip=on_skip, explain=self.explain):
            if self.files is not None:
                for stem in self.stems[prediction.name]:
                    self.files.write(prediction, stem, saver=self._save)
            if not self.images or self.files is not None:
                prediction = prediction.without_pixels()  # its regions found here, in the original-size map
            results[prediction.name] = pickle.dumps(prediction, protocol=5)
        self.crash(len(batch["path"]))
        return _result_batch(batch["path"], results, failed)


class _Extractor:
    """A Ray actor: builds the backbone once and extracts training features with `Spade`'s own extraction. Each
    result is the pickled (pyramid levels [(C_l, h_l, w_l)], global features (D,), thumbnail or None) of one
    image."""

    def __init__(self, settings: dict[str, Any], threads: int, crash: tuple[str, int] | None = None) -> None:
        from ...core.device import resolve_device
        from ...estimators.spade import Spade

        _set_threads(threads)
        self.model = Spade(**{**settings, "progress": False})
        self.model.device_ = resolve_device(self.model.device)
        self.model.backbone_ = self.model._build_backbone()
        self.crash = _CrashOnce(crash)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        items, failed = _batch_items(batch)
        results: dict[str, bytes] = {}

        def on_skip(item: ImageItem, error: ImageReadError) -> None:
            failed[item.name] = (error.kind, error.reason)

        for names, pyramid, global_features, thumbnails in self.model._training_features(items, True, on_skip):
            for i, name in enumerate(names):
                parts = ([level[i].detach().cpu().numpy() for level in pyramid],
                         global_features[i].detach().float().cpu().numpy(), thumbnails[i] if thumbnails else None)
                results[name] = pickle.dumps(parts, protocol=5)
        self.crash(len(batch["path"]))
        return _result_batch(batch["path"], results, failed)


@dataclass
class _Pool:
    """How the actor pool is laid out on the cluster."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    batch_size: int

    def map_args(self) -> dict[str, Any]:
        # Fault tolerance is Ray Data's default for actor pools: a dead actor is started again and the batches it
        # held are retried on the pool (`_in_input_order` keeps one result per file whatever is retried).
        args: dict[str, Any] = {"batch_size": self.batch_size, "concurrency": self.workers,
                                "num_cpus": self.cpus_per_worker}
        if self.gpus_per_worker:
            args["num_gpus"] = self.gpus_per_worker
        return args


def _pool(ray: Any, *, workers: int, cpus_per_worker: float, batch_size: int, device: str | None,
          gpu_capable: bool) -> _Pool:
    """One actor per worker; a GPU each (or a share of the cluster's GPUs) when there are GPUs, the model can use
    them and `device` does not say cpu."""
    gpus = float(ray.cluster_resources().get("GPU", 0))
    wants_gpu = gpu_capable and (device is None or device == "auto" or device.startswith("cuda"))
    if device is not None and device.startswith("cuda") and gpus == 0:
        raise SettingError("device", "asks for CUDA, which the Ray cluster does not have", device, "cpu or auto")
    share = min(1.0, gpus / workers) if wants_gpu and gpus > 0 else 0.0
    return _Pool(workers, cpus_per_worker, share, batch_size)


def _dataset(ray: Any, listing: _Listing, keys: list[str], pool: _Pool, actor: type, constructor: dict) -> Any:
    """read + decode (Ray Data's reader, then `_decode_row`, fused into one task per batch of files) -> actor pool.

    Reading and decoding ask for READ_CPUS each: not the actors' CPU count, so Ray Data fuses the decoding into
    the read tasks rather than into the actors (which would then decode and score in turn)."""
    blocks = max(1, math.ceil(len(keys) / pool.batch_size))
    return (
        ray.data.read_binary_files(keys, include_paths=True, filesystem=listing.filesystem,
                                   override_num_blocks=blocks, num_cpus=READ_CPUS)
        .map(_decode_row, num_cpus=READ_CPUS)
        .map_batches(actor, fn_constructor_kwargs=constructor, batch_format="numpy", **pool.map_args())
    )
