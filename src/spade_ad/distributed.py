"""Past one machine: batch predict and fit on Ray Data, with the same answers as one process.

`predict(model, inputs, out)`: the inputs are listed once, on the driver (`spade_ad.inputs.collect_images` for
local paths, so names and order are a plain predict's; `pyarrow.fs` for URIs such as s3://, gs://, hdfs:// or
file://, or for paths inside a given pyarrow or fsspec filesystem). Ray Data's own reader
(`ray.data.read_binary_files`) reads their bytes, Ray tasks decode them with `spade_ad.images.decode_bytes` (the
checks and errors of `read_image`), and a pool of actors, each opening the model once (a model file or an exported
bundle, `spade_ad.loading.open_model`), scores them with the model's own `iter_predict`. The driver writes the
results as they arrive, in input order, with `spade_ad.writers.PredictionWriter` (the files of a plain predict:
scores.csv, regions.jsonl, heat maps, overlays, masks, maps, skipped.csv) and adds `scores.parquet` (typed scores,
written when the run completes).

Exactly once: results are keyed by file. The driver keeps the first result of each file and drops a repeat (a
batch run again after its actor died: Ray restarts the actor and retries the batch), and a file without a result
at the end of the run is an error, never a silent gap. A file listed twice is scored once and written under both
names, as a plain predict writes it twice.

`fit(images, out)`: the backbone features of the training images are extracted by the actor pool and handed, in
input order, to `Spade._fit`, which stores them and calibrates with the single-process code. The model file is
byte-identical to a single-process fit's when the actors' torch computes the same floats as the single process:
same device and the same number of torch threads (each actor uses `cpus_per_worker` threads; CPU convolutions
reduce in a thread-count-dependent order, about 1e-5 apart, which float16 storage sometimes keeps). The
leave-one-out calibration, the coreset orders and the file itself are computed on the driver, as before.

Cluster: with no address (or "local"), Ray starts in this process with `workers + 1` CPUs (one actor per worker,
one CPU for reading and decoding) and is shut down at the end; with an address ("host:port", "ray://host:port" or
"auto"), the run connects to that cluster, which must see the model file (and local inputs) at the same paths.
Actors get a GPU each (a share of one when there are fewer GPUs than workers) when the cluster has GPUs and the
model can use them. Ray is imported inside functions only: `import spade_ad` and every command without `--ray`
work without Ray installed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import re
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from .errors import ImageReadError, NoImagesError, SettingError, SpadeError
from .images import IMAGE_EXTENSIONS, decode_bytes
from .inputs import ImageItem, collect_images

__all__ = ["PARQUET_FILE", "ClusterError", "PredictRun", "fit", "predict", "ray_session"]

PARQUET_FILE = "scores.parquet"
#: Rows per Parquet row group (the file is written in groups as results arrive).
PARQUET_ROW_GROUP = 4096
#: Seconds to wait for a cluster's address to answer before saying it does not (Ray itself waits minutes).
CONNECT_TIMEOUT_S = 5.0
#: CPUs a read-and-decode task asks for (two run on the spare CPU of a local cluster).
READ_CPUS = 0.5
SkipCallback = Callable[[ImageItem, ImageReadError], None]


class ClusterError(SpadeError):
    """A distributed run cannot start or finish: Ray is not installed, the cluster's address is wrong or does not
    answer, or the cluster lost work it could not redo."""


# ---------------------------------------------------------------- the Ray session


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (the `ray[data]` part)
    except ImportError as exc:
        raise ClusterError("distributed runs need Ray, which is not installed: pip install 'spade-ad[ray]'") from exc
    return ray


def _check_address(address: str) -> None:
    """Refuse an address that is not host:port, ray://host:port or auto, and one where nothing answers (Ray would
    retry for minutes, then exit the process)."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"bad Ray address {address!r}: expected host:port, ray://host:port or auto (on the "
                           f"command line write --ray=ADDRESS, or put --ray last to run on this machine)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ClusterError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                           f"`ray start --head` there, or leave out the address to run on this machine") from exc


@contextlib.contextmanager
def _quiet_ray_logs() -> Iterator[None]:
    """Ray's C++ log lines off the console while the session starts: RAY_BACKEND_LOG_LEVEL=fatal (unless the user
    set it) for this process and the ones Ray starts (without it, every actor start logs a note on restarts), and
    the process's stderr sent to /dev/null meanwhile (Ray announces the level it read there). Ray's own log files
    in its session folder are unaffected; a failure to start is raised with its message."""
    before = os.environ.get("RAY_BACKEND_LOG_LEVEL")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as sink:
            os.dup2(sink.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        if before is None:
            os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)


@contextlib.contextmanager
def ray_session(address: str | None = None, *, workers: int = 2) -> Iterator[Any]:
    """The `ray` module, connected for one run: to the cluster at `address`, or (None or "local") to one started in
    this process with `workers + 1` CPUs and shut down at the end. A session the caller already opened
    (`ray.is_initialized()`) is used as it is and left open (then give no address). Ray's own logs and progress
    bars are kept off the console for the run (its logs stay in its session folder). Raises ClusterError when Ray
    is missing or the cluster cannot be reached."""
    ray = _import_ray()
    local = address in (None, "local")
    if ray.is_initialized():
        if not local:
            raise ClusterError(f"this process is already connected to a Ray cluster, so it cannot connect to "
                               f"{address}: leave out the address to run on that session, or end it first")
        with _quiet_data(ray):
            yield ray
        return
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    if not local:
        _check_address(address)
    with _quiet_ray_logs():
        try:
            if local:
                ray.init(num_cpus=workers + 1, include_dashboard=False, **options)
            else:
                ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError, SystemExit) as exc:
            where = "start Ray on this machine" if local else f"connect to the Ray cluster at {address}"
            cause = exc.__cause__  # e.g. the cluster asks for an authentication token
            why = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:300]})" if cause and str(cause) else ""
            raise ClusterError(f"cannot {where}: {exc or type(exc).__name__}{why}") from exc
    try:
        with _quiet_data(ray):
            yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _quiet_data(ray: Any) -> Iterator[None]:
    """Ray Data's progress bars and logging off, and results in input order, for this run only."""
    context = ray.data.DataContext.get_current()
    options = context.execution_options
    saved = (context.enable_progress_bars, context.print_on_execution_start, context.enable_auto_log_stats,
             options.verbose_progress, options.preserve_order)
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]
    levels = [logger.level for logger in loggers]
    context.enable_progress_bars = context.print_on_execution_start = context.enable_auto_log_stats = False
    options.verbose_progress = False
    options.preserve_order = True  # results arrive in input order: the driver's reorder buffer stays small
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)  # a failure is raised to the caller, in one message
    try:
        yield
    finally:
        (context.enable_progress_bars, context.print_on_execution_start, context.enable_auto_log_stats,
         options.verbose_progress, options.preserve_order) = saved
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# ---------------------------------------------------------------- listing the inputs


@dataclass
class _Listing:
    """The inputs, listed once: items named as a plain run names them, each with `keys[i]`, the path Ray reads
    (absolute for local files, a path inside `filesystem` otherwise), and `shown[i]`, how errors name it (the path
    as a plain run has it, or the URI)."""

    items: list[ImageItem]
    keys: list[str]
    filesystem: Any
    local: bool
    shown: list[str]

    def subset(self, items: list[ImageItem]) -> _Listing:
        """The listing of some of its items (the same objects), in their order."""
        position = {id(item): index for index, item in enumerate(self.items)}
        chosen = [position[id(item)] for item in items]
        return _Listing(items, [self.keys[i] for i in chosen], self.filesystem, self.local,
                        [self.shown[i] for i in chosen])


def _is_uri(value: object) -> bool:
    return isinstance(value, str) and "://" in value


def _list_inputs(inputs: Any, filesystem: Any = None) -> _Listing:
    """List `inputs` (a path, a URI, or a list of them) once. Local paths: `collect_images`, exactly as a plain run
    lists them (one input as given, several as a list). URIs, or paths inside `filesystem` (a pyarrow FileSystem
    or an fsspec one): listed with pyarrow.fs, by the rules of `spade_ad.images.list_images` (image extensions,
    hidden files and folders skipped, sorted by relative path)."""
    many = isinstance(inputs, (list, tuple))
    given = list(inputs) if many else [inputs]
    if filesystem is None and not any(_is_uri(x) for x in given):
        items = collect_images(given if many else given[0])
        if any(item.path is None for item in items):
            raise TypeError("distributed runs read image files: give folders, files or URIs, not images in memory")
        return _Listing(items, [os.path.abspath(item.path) for item in items], _local_filesystem(), True,
                        [str(item.path) for item in items])
    if not given:
        raise NoImagesError("no images given: the list is empty")
    items, keys, shown = [], [], []
    chosen = _pyarrow_filesystem(filesystem) if filesystem is not None else None
    for value in given:
        fs, path = (chosen, str(value)) if filesystem is not None else _from_uri(str(value))
        if chosen is not None and fs.type_name != chosen.type_name:
            raise ClusterError(f"inputs on different filesystems ({chosen.type_name}, {fs.type_name}): give the "
                               f"inputs of one run on one filesystem")
        chosen = fs
        for name, key, where in _remote_files(fs, path, str(value), prefixed=many):
            items.append(ImageItem(name, path=PurePosixPath(key)))  # a path inside `fs`, read by Ray only
            keys.append(key)
            shown.append(where)
    return _Listing(items, keys, chosen, False, shown)


def _local_filesystem() -> Any:
    from pyarrow import fs

    return fs.LocalFileSystem()


def _pyarrow_filesystem(filesystem: Any) -> Any:
    """A pyarrow FileSystem as is; an fsspec filesystem wrapped in one."""
    from pyarrow import fs

    if isinstance(filesystem, fs.FileSystem):
        return filesystem
    return fs.PyFileSystem(fs.FSSpecHandler(filesystem))


def _from_uri(uri: str) -> tuple[Any, str]:
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except (ValueError, OSError, ImportError) as exc:
        raise ClusterError(f"cannot open {uri}: {exc}") from exc


def _remote_files(fs: Any, path: str, shown: str, *, prefixed: bool) -> list[tuple[str, str, str]]:
    """(name, path, shown) of the image at `path`, or of every image under the folder `path`, named relative to it
    (under the folder's own name when it is one input among several, as `collect_images` names them); `shown` is
    the input as given (`shown`), followed by the path relative to it."""
    from pyarrow.fs import FileSelector, FileType

    info = fs.get_file_info(path)
    if info.type == FileType.NotFound:
        raise ImageReadError(shown, "file not found")
    if info.type != FileType.Directory:
        return [(shown, path, shown)]
    root = PurePosixPath(path.rstrip("/") or "/")
    found = []
    for entry in fs.get_file_info(FileSelector(path, recursive=True)):
        relative = PurePosixPath(entry.path).relative_to(root)
        if (entry.type == FileType.File and not any(part.startswith(".") for part in relative.parts)
                and os.path.splitext(relative.name)[1].lower() in IMAGE_EXTENSIONS):
            found.append((relative, entry.path))
    if not found:
        raise NoImagesError(f"no images found in {shown} or its subfolders; accepted extensions: "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))} (hidden files and folders are skipped)")
    found.sort(key=lambda pair: pair[0].parts)
    prefix = PurePosixPath(root.name or "root") if prefixed else PurePosixPath()
    return [((prefix / relative).as_posix(), key, f"{shown.rstrip('/')}/{relative.as_posix()}")
            for relative, key in found]


# ---------------------------------------------------------------- what runs on the cluster


def _decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """A Ray task: one file's bytes -> its RGB pixels, or the reason it cannot be read (as `read_image` says it)."""
    path = row["path"]
    try:
        image = decode_bytes(row["bytes"], path, max_pixels=None, formats=None)
    except ImageReadError as err:
        return {"path": path, "pixels": b"", "height": 0, "width": 0, "error_kind": err.kind,
                "error_reason": err.reason}
    pixels = np.asarray(image, dtype=np.uint8)
    return {"path": path, "pixels": pixels.tobytes(), "height": pixels.shape[0], "width": pixels.shape[1],
            "error_kind": "", "error_reason": ""}


def _batch_items(batch: dict[str, np.ndarray]) -> tuple[list[ImageItem], dict[str, tuple[str, str]]]:
    """A decoded batch as in-memory items named by path, and {path: (kind, reason)} of the unreadable ones."""
    items, failed = [], {}
    for path, pixels, height, width, kind, reason in zip(batch["path"], batch["pixels"], batch["height"],
                                                         batch["width"], batch["error_kind"], batch["error_reason"]):
        if kind:
            failed[str(path)] = (str(kind), str(reason))
        else:
            array = np.frombuffer(pixels, dtype=np.uint8).reshape(int(height), int(width), 3)
            items.append(ImageItem(str(path), image=Image.fromarray(array)))
    return items, failed


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
    not exist yet (it is created first, so the actor Ray restarts does not exit again): a worker dying mid-run."""

    def __init__(self, spec: tuple[str, int] | None) -> None:
        self.marker, self.after = (Path(spec[0]), int(spec[1])) if spec else (None, 0)
        self.count = 0

    def __call__(self, handled: int) -> None:
        self.count += handled
        if self.marker is not None and self.count >= self.after and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)


class _Scorer:
    """A Ray actor: opens the model once and scores decoded batches with its own `iter_predict`. Each result is
    the pickled Prediction (its regions computed here; without `images`, its image and original-size map left
    out)."""

    def __init__(self, model_path: str, *, weights: str | None, device: str | None, engine: str | None,
                 thresholds: dict[str, float], explain: bool, images: bool, threads: int,
                 crash: tuple[str, int] | None = None) -> None:
        from .loading import open_model

        self.model = open_model(model_path, weights=weights, device=device, engine=engine)
        _set_threads(threads)
        if thresholds:
            self.model.set_thresholds(**thresholds)
        self.explain, self.images, self.crash = explain, images, _CrashOnce(crash)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        items, failed = _batch_items(batch)
        results: dict[str, bytes] = {}

        def on_skip(item: ImageItem, error: ImageReadError) -> None:
            failed[item.name] = (error.kind, error.reason)

        for prediction in self.model.iter_predict(items, original_size=True, keep_images=self.images,
                                                  skip_bad=True, on_skip=on_skip, explain=self.explain):
            _ = prediction.regions  # cached on the Prediction, so the driver does not redo it
            if not self.images:
                prediction.original_map = prediction.image = None
            results[prediction.name] = pickle.dumps(prediction, protocol=5)
        self.crash(len(batch["path"]))
        return _result_batch(batch["path"], results, failed)


class _Extractor:
    """A Ray actor: builds the backbone once and extracts training features with `Spade`'s own extraction. Each
    result is the pickled (pyramid levels [(C_l, h_l, w_l)], global features (D,), thumbnail or None) of one
    image."""

    def __init__(self, settings: dict[str, Any], threads: int, crash: tuple[str, int] | None = None) -> None:
        from .model import Spade
        from .pyramid import resolve_device

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


def _spade_error(exc: BaseException) -> SpadeError | None:
    """The SpadeError behind a failure raised on the cluster, if any: Ray wraps one raised in a batch (kept as its
    cause), and reports one raised while an actor starts (opening the model) as text only."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, SpadeError):
            return exc
        found = re.findall(r"spade_ad\.errors\.(\w+): (.+)", str(getattr(exc, "error_msg", "")))
        if found:
            name, message = found[-1]
            return ClusterError(f"the Ray workers could not start: {name}: {message.strip()} (every machine of "
                                f"the cluster must see the model and weights files at the same paths)")
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def _in_input_order(ds: Any, listing: _Listing) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, result row) for every input, in input order, each exactly once: rows are keyed by file, a repeat
    of a file (a batch the cluster ran again) is dropped, results that arrive early wait for the ones before them,
    and a file without a result at the end is a ClusterError."""
    indices: dict[str, list[int]] = {}
    for index, key in enumerate(listing.keys):
        indices.setdefault(key, []).append(index)
    done: set[str] = set()
    waiting: dict[int, dict[str, Any]] = {}
    following = 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, key in enumerate(batch["path"]):
                key = str(key)
                if key in done or key not in indices:
                    continue
                done.add(key)
                row = {column: values[i] for column, values in batch.items()}
                waiting.update((index, row) for index in indices[key])
            while following in waiting:
                yield following, waiting.pop(following)
                following += 1
    except Exception as exc:
        cause = _spade_error(exc)
        if cause is not None:
            raise cause from exc
        raise ClusterError(f"the Ray run failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                           ) from exc
    missing = [key for key in indices if key not in done]
    if missing:
        raise ClusterError(f"{len(missing)} of {len(indices)} inputs got no result from the cluster (first: "
                           f"{missing[0]}); nothing was written for them")


def _read_error(listing: _Listing, index: int, row: dict[str, Any]) -> ImageReadError | None:
    kind = str(row["error_kind"])
    return ImageReadError(listing.shown[index], str(row["error_reason"]), kind=kind) if kind else None


# ---------------------------------------------------------------- predict


@dataclass
class PredictRun:
    """What a distributed predict did: images scored, inputs skipped, where the results are."""

    count: int
    skipped: list[tuple[str, str]]
    scores: Path
    parquet: Path
    workers: int
    gpus_per_worker: float = 0.0


class _ParquetScores:
    """scores.parquet: one typed row per scored image (path, score, normalized_score, p_value, is_anomalous,
    regions, largest_region_area; null where the model has no such value), in scores.csv order. Written under a
    temporary name and renamed when the run completes, so a file by that name is always a whole run's."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa, self.path = pa, path
        self.partial = path.with_name(path.name + ".partial")
        self.schema = pa.schema([("path", pa.string()), ("score", pa.float64()), ("normalized_score", pa.float64()),
                                 ("p_value", pa.float64()), ("is_anomalous", pa.bool_()), ("regions", pa.int32()),
                                 ("largest_region_area", pa.int64())])
        path.unlink(missing_ok=True)  # an earlier run's file would read as this run's
        self.writer = pq.ParquetWriter(self.partial, self.schema)
        self.rows: list[dict[str, Any]] = []

    def add(self, prediction: Any) -> None:
        regions = prediction.regions
        self.rows.append({"path": prediction.name, "score": prediction.score,
                          "normalized_score": prediction.normalized_score, "p_value": prediction.p_value,
                          "is_anomalous": prediction.is_anomalous, "regions": len(regions),
                          "largest_region_area": max((r.area for r in regions), default=0)})
        if len(self.rows) >= PARQUET_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_table(self.pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self, complete: bool) -> None:
        try:
            if complete:
                self._flush()
        finally:
            self.writer.close()
        if complete:
            self.partial.replace(self.path)
        else:
            self.partial.unlink(missing_ok=True)


def predict(
    model_path: str | Path, inputs: Any, output: str | Path, *, address: str | None = None, workers: int = 2,
    cpus_per_worker: float = 1, save_maps: bool = False, weights: str | Path | None = None,
    device: str | None = None, engine: str | None = None, threshold: float | None = None,
    false_alarm_rate: float | None = None, pixel_threshold: float | None = None,
    pixel_false_alarm_rate: float | None = None, overwrite: bool = False, explain: bool = False,
    skip_bad: bool = False, on_skip: SkipCallback | None = None, images: bool = True, filesystem: Any = None,
    progress: bool | None = None, _crash_once: tuple[str, int] | None = None,
) -> PredictRun:
    """Score `inputs` on a Ray cluster into the folder `output`: the files of `spade-ad predict` (scores.csv in
    input order, regions.jsonl, heat maps, overlays, masks, with `save_maps` maps/*.tiff, with `explain`
    explain/*.png, skipped.csv) plus scores.parquet.

    `inputs`: a folder, file or URI (s3://, gs://, hdfs://, file://, ...) or a list of them; with `filesystem` (a
    pyarrow or fsspec filesystem), paths inside it. `address`: None or "local" (Ray in this process, `workers` + 1
    CPUs, shut down at the end), "host:port", "ray://host:port" or "auto". `workers`: actors, each holding the
    model once, with `cpus_per_worker` CPUs (its torch threads) and a GPU (share) when the cluster has GPUs.
    The thresholds, `weights`, `device` and `engine` are those of a plain predict, applied in every actor.
    `images=False` writes the scores and regions only (no per-image files: the driver then only writes rows, for
    runs of millions of images). An unreadable image stops the run (after every row before it was written), or
    with `skip_bad` is listed in skipped.csv and passed to `on_skip`. Progress shows on a terminal (`progress`
    None) or when True. A dead actor is started again and its batches retried (Ray Data's fault tolerance); no
    row is lost or written twice. `_crash_once=(marker, n)` is the fault test's hook (see `_CrashOnce`)."""
    from tqdm.auto import tqdm

    from .loading import open_model
    from .writers import PredictionWriter, check_output_dir

    _check_counts(workers, cpus_per_worker)
    if not images and (save_maps or explain):
        raise SettingError("images", "is off, so no maps or explanations can be written", False,
                           "images=True with save_maps or explain")
    _import_ray()  # a missing Ray is said before anything is read
    output = check_output_dir(output, overwrite=overwrite)  # before anything is read: a refusal costs nothing
    listing = _list_inputs(inputs, filesystem)
    thresholds = {k: v for k, v in (("image", threshold), ("false_alarm_rate", false_alarm_rate),
                                    ("pixel", pixel_threshold), ("pixel_false_alarm_rate", pixel_false_alarm_rate))
                  if v is not None}
    model = open_model(model_path, weights=weights, device="cpu", engine=engine)  # the writer's settings; checks
    if thresholds:
        model.set_thresholds(**thresholds)
    writer = PredictionWriter.for_model(model, output, save_maps=save_maps, overwrite=overwrite, explain=explain)
    gpu_capable = hasattr(model, "backbone_")  # a torch model file; bundles run on the CPU
    batch_size = int(getattr(model, "batch_size", None) or model.get_params()["batch_size"])
    del model
    constructor = {"model_path": str(Path(model_path).resolve()), "weights": None if weights is None else
                   str(Path(weights).resolve()), "device": device, "engine": engine, "thresholds": thresholds,
                   "explain": explain, "images": images, "threads": _threads(cpus_per_worker), "crash": _crash_once}
    keys = list(dict.fromkeys(listing.keys))
    with ray_session(address, workers=workers) as ray:
        pool = _pool(ray, workers=workers, cpus_per_worker=cpus_per_worker, batch_size=batch_size,
                     device=device, gpu_capable=gpu_capable)
        ds = _dataset(ray, listing, keys, pool, _Scorer, constructor)
        bar = tqdm(total=len(listing.items), desc="predict (ray)", unit="img",
                   disable=None if progress is None else not progress)
        complete = False
        with writer:
            table = _ParquetScores(output / PARQUET_FILE)
            try:
                for index, row in _in_input_order(ds, listing):
                    item = listing.items[index]
                    error = _read_error(listing, index, row)
                    if error is not None:
                        if not skip_bad:
                            raise error
                        writer.skip(item.name, error)
                        if on_skip is not None:
                            on_skip(item, error)
                    else:
                        prediction = pickle.loads(row["result"])
                        prediction.name, prediction.path = item.name, item.path if listing.local else None
                        writer.write(prediction)
                        table.add(prediction)
                    bar.update(1)
                complete = True
            finally:
                table.close(complete)
                bar.close()
    return PredictRun(writer.count, list(writer.skipped), output / "scores.csv", output / PARQUET_FILE, workers,
                      pool.gpus_per_worker)


def _threads(cpus_per_worker: float) -> int:
    return max(1, int(cpus_per_worker))


def _check_counts(workers: int, cpus_per_worker: float) -> None:
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if not cpus_per_worker > 0:
        raise ValueError(f"cpus_per_worker must be > 0, got {cpus_per_worker!r}")


# ---------------------------------------------------------------- fit


def fit(
    images: Any, output: str | Path | None = None, *, address: str | None = None, workers: int = 2,
    cpus_per_worker: float = 1, validation: Any = None, skip_bad: bool = False,
    on_skip: SkipCallback | None = None, filesystem: Any = None, _crash_once: tuple[str, int] | None = None,
    **settings: Any,
) -> Any:
    """Fit a `Spade` model with `settings` on the good `images`, extracting their backbone features on a Ray
    cluster (`address`, `workers`, `cpus_per_worker`, `filesystem`: as in `predict`); save it to
    `output` when given; return it. Storage, calibration (leave-one-out by default: on the driver, like the
    single-process fit) and the file are the single-process code, fed the same features in the same order (see
    the module docstring for when the file is byte-identical). `validation` (calibration on other good images)
    and calibration="holdout" read those images on the driver, so they need them on this machine."""
    from tqdm.auto import tqdm

    from .model import Spade

    _check_counts(workers, cpus_per_worker)
    _import_ray()
    model = Spade(**settings)
    listing = _list_inputs(images, filesystem)
    if not listing.local and (validation is not None or model.calibration == "holdout"):
        raise SettingError("calibration", "scores held-out images on this machine, and the training images are "
                           "not here", "holdout" if validation is None else "validation",
                           "leave_one_out or none with images elsewhere")
    actor_settings = {**model.get_params(), "weights": None if model.weights is None else
                      os.path.abspath(model.weights)}  # the actors' working folder may not be this one

    def features(items: list[ImageItem], skip: bool, report: SkipCallback | None) -> Iterator[Any]:
        """`Spade._fit`'s feature source: the items' features from the actor pool, one image at a time, in order."""
        import torch

        subset = listing.subset(items)
        keys = list(dict.fromkeys(subset.keys))
        with ray_session(address, workers=workers) as ray:
            pool = _pool(ray, workers=workers, cpus_per_worker=cpus_per_worker, batch_size=model.batch_size,
                         device=model.device, gpu_capable=True)
            constructor = {"settings": actor_settings, "threads": _threads(cpus_per_worker), "crash": _crash_once}
            ds = _dataset(ray, subset, keys, pool, _Extractor, constructor)
            with tqdm(total=len(items), desc="fit (ray)", unit="img",
                      disable=None if model.progress is None else not model.progress) as bar:
                for index, row in _in_input_order(ds, subset):
                    bar.update(1)
                    error = _read_error(subset, index, row)
                    if error is not None:
                        if not skip:
                            raise error
                        if report is not None:
                            report(items[index], error)
                        continue
                    levels, global_features, thumbnail = pickle.loads(row["result"])
                    yield ([items[index].name], [torch.from_numpy(level)[None] for level in levels],
                           torch.from_numpy(global_features)[None], [] if thumbnail is None else [thumbnail])

    model._fit(listing.items, validation=validation, skip_bad=skip_bad, on_skip=on_skip, features=features)
    if output is not None:
        model.save(output)
    return model
