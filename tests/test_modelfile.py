"""Model files: identical results after a round trip; truncated, tampered, foreign or mismatched files refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import spade_ad
from spade_ad import ModelFileError, Spade
from spade_ad.backbones import _lite_package_state_dict
from spade_ad.images import list_images
from spade_ad.settings import SETTINGS


@pytest.fixture(scope="module")
def saved_model(fitted_model: Spade, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fitted_model.save(tmp_path_factory.mktemp("model") / "model.safetensors")


def test_save_load_predict_identical(fitted_model: Spade, saved_model: Path, synthetic_root: Path) -> None:
    loaded = spade_ad.load(saved_model)
    # Every stored setting comes back; runtime-only ones (progress bars, the temporary feature folder) are not kept.
    kept = [s.name for s in SETTINGS if s.stored]
    assert {k: loaded.get_params()[k] for k in kept} == {k: fitted_model.get_params()[k] for k in kept}
    assert loaded.progress is None and loaded.feature_dir is None
    assert loaded.train_names_ == fitted_model.train_names_
    paths = list_images(synthetic_root / "test")[:3]
    for a, b in zip(fitted_model.predict(paths), loaded.predict(paths)):
        assert a.score == b.score
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def test_file_holds_no_pickle_and_records_identity(saved_model: Path) -> None:
    with safe_open(str(saved_model), framework="pt") as handle:
        metadata = handle.metadata()
    header = json.loads(metadata["header"])
    assert header["backbone"]["name"] == "efficientnet_lite0"
    assert len(header["backbone"]["weights_sha256"]) == 64
    assert header["versions"]["spade_ad"] == spade_ad.__version__
    assert b"\x80\x04\x95" not in saved_model.read_bytes()[:64]  # not a pickle stream


def test_truncated_file_is_refused(saved_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "truncated.safetensors"
    broken.write_bytes(saved_model.read_bytes()[: saved_model.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated.safetensors"):
        spade_ad.load(broken)


def test_tampered_features_are_refused(saved_model: Path, tmp_path: Path) -> None:
    data = bytearray(saved_model.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the last tensor
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        spade_ad.load(tampered)


def test_tampered_settings_are_refused(saved_model: Path, tmp_path: Path) -> None:
    with safe_open(str(saved_model), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    metadata["header"] = metadata["header"].replace('"k_gallery": 5', '"k_gallery": 9')
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata=metadata)
    with pytest.raises(ModelFileError, match="checksum"):
        spade_ad.load(edited)


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ModelFileError, match="not a spade-ad model"):
        spade_ad.load(other)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelFileError, match="notes.txt"):
        spade_ad.load(text)
    with pytest.raises(ModelFileError, match="not found"):
        spade_ad.load(tmp_path / "missing.safetensors")


def test_model_refuses_other_backbone_weights(synthetic_root: Path, tmp_path: Path) -> None:
    original = _lite_package_state_dict("efficientnet_lite0")
    original_file = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(original_file))
    changed = dict(original)
    changed["conv_stem.weight"] = changed["conv_stem.weight"] * 1.01
    changed_file = tmp_path / "lite0_changed.safetensors"
    save_file({k: v.contiguous() for k, v in changed.items()}, str(changed_file))

    model = Spade(weights=changed_file, k_gallery=2, progress=False).fit(synthetic_root / "train" / "good")
    path = model.save(tmp_path / "m.safetensors")
    assert spade_ad.load(path).backbone_.weights_sha256 == model.backbone_.weights_sha256
    with pytest.raises(ModelFileError, match="other weights"):
        spade_ad.load(path, weights=original_file)
