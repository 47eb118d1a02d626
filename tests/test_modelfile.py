"""Model files: identical results after a round trip; truncated, tampered, foreign or mismatched files refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import spade_ad
from spade_ad import ModelFileError, Spade
from spade_ad.core.backbones import _lite_package_state_dict
from spade_ad.data import modelfile
from spade_ad.data.images import list_images
from spade_ad.data.modelfile import partial_path
from spade_ad.data.synthetic import make_synthetic_dataset
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


# ---------------------------------------------------------------- a save or fit killed half way


def test_stale_partial_files_do_not_trip_the_next_save(fitted_model: Spade, tmp_path: Path) -> None:
    """Partial files of killed saves (this pid's, a dead pid's, the old `.partial` name) never stop a save; a dead
    process's partial of this host is removed, a running process's one (a concurrent save) is left alone."""
    target = tmp_path / "model.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = {
        "own": partial_path(target), "dead": tmp_path / f"model.safetensors.{host}.{dead.stdout.strip()}.partial",
        "running": tmp_path / f"model.safetensors.{host}.1.partial", "old_name": tmp_path / "model.safetensors.partial",
    }
    for path in stale.values():
        path.write_bytes(b"half a model")
    stale["own"].chmod(0o400)
    assert fitted_model.save(target) == target
    assert spade_ad.load(target).train_names_ == fitted_model.train_names_
    assert not stale["own"].exists() and not stale["dead"].exists()
    assert stale["running"].read_bytes() == stale["old_name"].read_bytes() == b"half a model"


def test_partial_name_is_unique_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.safetensors"
    mine = partial_path(target)
    assert str(os.getpid()) in mine.name and mine.name.endswith(".partial") and mine.parent == tmp_path
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    assert partial_path(target) != mine and ".4242.partial" in partial_path(target).name


@pytest.mark.parametrize("fault", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_crash_while_writing_leaves_no_model_and_no_partial(
    fitted_model: Spade, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: BaseException
) -> None:
    """A write that fails half way (the data iterator raises after its first chunk) or is interrupted leaves nothing
    at the final path and no partial file; a model already there is kept whole."""
    real_chunks = modelfile._chunks
    written: list[Path] = []

    def failing_chunks(array: np.ndarray):  # type: ignore[no-untyped-def]
        if written:
            raise fault
        written.extend(tmp_path.glob("*.partial"))  # the partial file exists, half written
        yield from real_chunks(array)

    monkeypatch.setattr(modelfile, "_chunks", failing_chunks)
    with pytest.raises(type(fault)):
        fitted_model.save(tmp_path / "new.safetensors")
    assert written and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    kept = fitted_model.save(tmp_path / "kept.safetensors")
    before = kept.read_bytes()
    written.clear()
    monkeypatch.setattr(modelfile, "_chunks", failing_chunks)
    with pytest.raises(type(fault)):
        fitted_model.save(kept)
    assert kept.read_bytes() == before and list(tmp_path.iterdir()) == [kept]


def test_leftover_feature_folders_do_not_break_a_fit(tmp_path: Path) -> None:
    """A killed fit leaves its `spade-ad-features-*` folder behind: a new fit uses a fresh one and leaves it alone."""
    root = make_synthetic_dataset(tmp_path / "data", n_train=4, n_test_good=1, n_test_defect=1, size=(64, 64), seed=1)
    features = tmp_path / "features"
    leftover = features / "spade-ad-features-leftover"
    leftover.mkdir(parents=True)
    for name in ("level_0.bin", "level_1.bin", "order_0.bin"):
        (leftover / name).write_bytes(b"\x00" * 100)
    (leftover / "level_0.bin").chmod(0o400)
    model = Spade(k_gallery=2, device="cpu", progress=False, image_size=64, feature_dir=features)
    model.fit(root / "train" / "good")
    assert model.store_.n_images == 4
    assert sorted(p.name for p in leftover.iterdir()) == ["level_0.bin", "level_1.bin", "order_0.bin"]
    fresh = [p for p in features.iterdir() if p != leftover]
    assert len(fresh) == 1 and fresh[0].name.startswith("spade-ad-features-")
    assert spade_ad.load(model.save(tmp_path / "m.safetensors")).store_.n_images == 4


def test_format_2_files_are_refused_with_a_refit_message(saved_model: Path, tmp_path: Path) -> None:
    """A format-2 file predates the square global view and the fused score: its scores would change meaning, so it
    is refused in one line that says to refit, never scored differently."""
    with safe_open(str(saved_model), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**metadata, "format_version": "2"})
    with pytest.raises(ModelFileError, match=r"format 2.*re-fit it with `spade-ad fit`") as caught:
        spade_ad.load(old)
    assert "\n" not in str(caught.value)
