"""`fit` on a Ray cluster: the training features extracted by the actor pool, stored and calibrated by the
single-process code."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...data.inputs import ImageItem
from ...errors import SettingError
from .actors import _dataset, _Extractor, _pool
from .driver import SkipCallback, _check_counts, _in_input_order, _read_error, _threads
from .listing import _list_inputs
from .session import _import_ray, ray_session


def fit(
    images: Any, output: str | Path | None = None, *, address: str | None = None, workers: int = 2,
    cpus_per_worker: float = 1, validation: Any = None, skip_bad: bool = False,
    on_skip: SkipCallback | None = None, filesystem: Any = None, _crash_once: tuple[str, int] | None = None,
    defect: Any = None, **settings: Any,
) -> Any:
    """Fit a `Spade` model with `settings` on the good `images`, extracting their backbone features on a Ray
    cluster (`address`, `workers`, `cpus_per_worker`, `filesystem`: as in `predict`); save it to
    `output` when given; return it. Storage, calibration (leave-one-out by default: on the driver, like the
    single-process fit) and the file are the single-process code, fed the same features in the same order (see
    the module docstring for when the file is byte-identical). `validation` (calibration on other good images)
    and calibration="holdout" read those images on the driver, so they need them on this machine; so do the
    labelled `defect` images (`Spade.fit`'s: they choose the part weights)."""
    from tqdm.auto import tqdm

    from ...estimators.spade import Spade

    _check_counts(workers, cpus_per_worker)
    _import_ray()
    model = Spade(**settings)
    defects = None if defect is None else model._check_defect_weights(validation, defect, skip_bad)
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

    model._fit(listing.items, validation=validation, skip_bad=skip_bad, on_skip=on_skip, features=features,
               keep_good=defects is not None)
    if defects is not None:
        model._fit_weights(defects, skip_bad, on_skip)
    if output is not None:
        model.save(output)
    return model
