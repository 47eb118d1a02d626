"""Past one machine: batch predict and fit on Ray Data, with the same answers as one process.

`predict(model, inputs, out)`: the inputs are listed once, on the driver (`spade_ad.data.inputs.collect_images` for
local paths, so names and order are a plain predict's; `pyarrow.fs` for URIs such as s3://, gs://, hdfs:// or
file://, or for paths inside a given pyarrow or fsspec filesystem). Ray Data's own reader
(`ray.data.read_binary_files`) reads their bytes, Ray tasks decode them with `spade_ad.data.images.decode_bytes` (the
checks and errors of `read_image`), and a pool of actors, each opening the model once (a model file or an exported
bundle, `spade_ad.estimators.opening.open_model`), scores them with the model's own `iter_predict`. Each actor writes
the per-image files of the images it scored (heat maps, overlays, masks, maps, explanations:
`spade_ad.outputs.image_files. ImageFiles`, each file whole, under the names the driver planned); the driver writes the
rows as they arrive, in input order, with `spade_ad.outputs.writers.PredictionWriter` (scores.csv, regions.jsonl,
skipped.csv), and adds `scores.parquet` (typed scores, written when the run completes). Together: the files of a plain
predict. The driver writes the pictures itself when two inputs share an output name, and on a remote cluster unless the
output folder is said to be shared (`predict(..., write_in_workers=True)`).

Modules: `session` (Ray, the cluster, quiet logs), `listing` (listing and decoding the inputs), `actors` (what runs
on the cluster and the dataset feeding it), `driver` (predict: results in input order, once each, the rows),
`fit`.

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
model can use them (an actor on a GPU scores with the batched device pipeline, `spade_ad.core.device_maps`, as any
model on a GPU does). Ray is imported inside functions only: `import spade_ad` and every command without `--ray`
work without Ray installed.
"""

from __future__ import annotations

from .driver import PARQUET_FILE, PredictRun, predict
from .fit import fit
from .session import ClusterError, ray_session

__all__ = ["PARQUET_FILE", "ClusterError", "PredictRun", "fit", "predict", "ray_session"]
