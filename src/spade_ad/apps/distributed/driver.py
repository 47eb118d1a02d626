"""The driver of a distributed predict: results in input order, each exactly once; the rows written as they arrive
(scores.csv, regions.jsonl, skipped.csv, scores.parquet)."""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...data.inputs import ImageItem
from ...errors import ImageReadError, SettingError, SpadeError
from .actors import _dataset, _pool, _Scorer
from .listing import _list_inputs, _Listing
from .session import ClusterError, _import_ray, ray_session

PARQUET_FILE = "scores.parquet"
#: Rows per Parquet row group (the file is written in groups as results arrive).
PARQUET_ROW_GROUP = 4096
SkipCallback = Callable[[ImageItem, ImageReadError], None]


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
    progress: bool | None = None, write_in_workers: bool | None = None,
    _crash_once: tuple[Any, ...] | None = None,
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
    row is lost or written twice.

    Who writes the per-image files: the actors, each for the images it scored (`write_in_workers`; None: when the
    cluster is this machine's, since on a remote cluster the output folder is only shared if you say so), unless
    two inputs would share an output name (the numbered names of a plain run depend on the order they are
    written in; the driver then writes them, as a plain run does). The driver writes the rows either way. Files
    are written whole (a temporary name, then renamed), so a retried batch replaces its files, and the temporary
    files of a killed actor are removed at the end. `_crash_once=(marker, n[, "write"])` is the fault tests' hook
    (see `_CrashOnce`)."""
    from tqdm.auto import tqdm

    from ...estimators.opening import open_model
    from ...outputs.image_files import remove_partials
    from ...outputs.writers import PredictionWriter, check_output_dir, output_stems

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
    gpu_capable = model.uses_torch  # a torch model file; bundles run on the CPU
    batch_size = int(getattr(model, "batch_size", None) or model.get_params()["batch_size"])
    del model
    constructor = {"model_path": str(Path(model_path).resolve()), "weights": None if weights is None else
                   str(Path(weights).resolve()), "device": device, "engine": engine, "thresholds": thresholds,
                   "explain": explain, "images": images, "threads": _threads(cpus_per_worker), "crash": _crash_once}
    if write_in_workers is None:
        write_in_workers = address in (None, "local")
    files = _worker_files(listing, output, save_maps, output_stems) if images and write_in_workers else None
    constructor["files"] = files
    keys = list(dict.fromkeys(listing.keys))
    write = writer.write if files is None else writer.write_row  # rows only when the actors wrote the files
    try:
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
                            prediction = prediction.with_(name=item.name,
                                                          path=item.path if listing.local else None)
                            write(prediction)
                            table.add(prediction)
                        bar.update(1)
                    complete = True
                finally:
                    table.close(complete)
                    bar.close()
    finally:
        if files is not None:
            remove_partials(output)  # what a killed actor was writing (its batch was written again whole)
    return PredictRun(writer.count, list(writer.skipped), output / "scores.csv", output / PARQUET_FILE, workers,
                      pool.gpus_per_worker)


def _worker_files(listing: _Listing, output: Path, save_maps: bool, stems_of: Callable[[list[str]], list[str]]
                  ) -> dict[str, Any] | None:
    """What the actors need to write the per-image files themselves: the output folder and each path's stems
    (a plain run's names); None when two inputs share a name (numbered names: the driver writes those runs)."""
    names = [item.name for item in listing.items]
    stems = stems_of(names)
    if any(stem != stems_of([name])[0] for stem, name in zip(stems, names)):
        return None
    by_key: dict[str, list[str]] = {}
    for key, stem in zip(listing.keys, stems):
        by_key.setdefault(key, []).append(stem)
    return {"out_dir": str(output.resolve()), "save_maps": save_maps, "stems": by_key}


def _threads(cpus_per_worker: float) -> int:
    return max(1, int(cpus_per_worker))


def _check_counts(workers: int, cpus_per_worker: float) -> None:
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if not cpus_per_worker > 0:
        raise ValueError(f"cpus_per_worker must be > 0, got {cpus_per_worker!r}")
