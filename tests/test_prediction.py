"""One verdict path and one interface: predictions cannot change under what is derived from them, a prediction
judged at another threshold is made as `predict` makes it, and both estimators (`Spade` on torch, `Runtime` on a
bundle) satisfy the `FittedModel` protocol the front doors receive, signatures included."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest

from spade_ad import Spade
from spade_ad.estimators.detector import FittedModel
from spade_ad.estimators.runtime import Runtime


def test_a_prediction_cannot_change_and_its_copies_derive_their_regions_anew(fitted_model, synthetic_root: Path
                                                                             ) -> None:
    defects = sorted(p for p in (synthetic_root / "test").rglob("*.png") if p.parent.name != "good")
    [flagged] = [p for p in fitted_model.predict(defects, original_size=True) if p.regions][:1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        flagged.is_anomalous = False  # type: ignore[misc]
    renamed = flagged.with_(name="renamed.png")
    assert renamed.name == "renamed.png" and renamed.regions == flagged.regions
    passed = fitted_model.judged(flagged, threshold=flagged.score + 1.0)
    assert passed.is_anomalous is False and passed.regions == [] and flagged.regions  # derived anew, not stale
    assert passed.image_threshold == flagged.score + 1.0 and passed.normalized_score < 1
    assert fitted_model.judged(passed) == fitted_model.judged(flagged)  # back at the model's threshold: as predicted
    assert fitted_model.judged(flagged).is_anomalous == flagged.is_anomalous
    light = flagged.without_pixels()
    assert light.original_map is None and light.image is None and light.regions == flagged.regions


def test_both_estimators_satisfy_the_fitted_model_protocol(fitted_model, synthetic_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from spade_ad.export.bundle import export_bundle

    model_file = tmp_path / "m.safetensors"
    fitted_model.save(model_file)
    export_bundle(model_file, tmp_path / "bundle")
    from spade_ad.estimators.runtime import load_bundle

    runtime = load_bundle(tmp_path / "bundle")
    assert isinstance(fitted_model, FittedModel) and isinstance(runtime, FittedModel)
    assert Spade.uses_torch and not Runtime.uses_torch
    for name, member in inspect.getmembers(FittedModel, inspect.isfunction):
        if name.startswith("_"):
            continue
        wanted = inspect.signature(member).parameters
        for estimator in (Spade, Runtime):
            have = inspect.signature(getattr(estimator, name)).parameters
            takes_any = any(p.kind is p.VAR_KEYWORD for p in have.values())
            for parameter in wanted.values():
                if parameter.kind is parameter.VAR_KEYWORD:
                    continue
                assert parameter.name in have or takes_any, f"{estimator.__name__}.{name} lacks {parameter.name}"
                if parameter.name in have and parameter.default is not inspect.Parameter.empty:
                    assert have[parameter.name].default == parameter.default, f"{estimator.__name__}.{name}"
    image = sorted((synthetic_root / "test").rglob("*.png"))[0]
    assert np.isclose(float(runtime.score([image])[0]), float(fitted_model.score([image])[0]), rtol=1e-3)
