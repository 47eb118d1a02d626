"""Deployment: `spade-ad export` bundles and the torch-free runtime give the torch path's answers, never import
torch, refuse damaged bundles, and install alone (`pip install spade-ad[runtime]`, no torch)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import requests

from child_server import serve_in_subprocess
from cli_run import run_cli
from spade_ad import Spade
from spade_ad.errors import ModelFileError, OutputError, SettingError
from spade_ad.estimators.runtime import Runtime, load_bundle, read_bundle
from spade_ad.export.bundle import export_bundle

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(fitted_model: Spade, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "widget.safetensors"
    fitted_model.save(path)
    return path


@pytest.fixture(scope="module")
def bundle(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(model_file, tmp_path_factory.mktemp("bundle") / "widget.bundle")


@pytest.fixture()
def torch_blocked(tmp_path: Path) -> dict[str, str]:
    """Environment for a child process in which `import torch` fails (so using it anywhere would crash)."""
    site = tmp_path / "block_torch"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class _NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None
        sys.meta_path.insert(0, _NoTorch())
    """))
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_runtime_gives_the_torch_answers(fitted_model: Spade, bundle: Path, synthetic_root: Path) -> None:
    """Image scores within 1e-4 relative, maps within 1e-3 of the map's range, identical verdicts, neighbours and
    explanations, on every test image of the synthetic set (the same bar as the bottle benchmark)."""
    images = sorted((synthetic_root / "test").rglob("*.png"))
    runtime = load_bundle(bundle)
    assert isinstance(runtime, Runtime) and runtime.k_gallery == fitted_model.k_gallery
    # the default score has all three parts, density-normalised: the runtime computes each as the torch path does
    assert "coarse" in runtime.score_scale_ and len(runtime.calibration_.train_parts) == fitted_model.store_.n_images
    expected = fitted_model.predict(images, original_size=True, explain=True)
    got = runtime.predict(images, original_size=True, explain=True)
    assert len(got) == len(expected) == len(images)
    flagged = 0
    for a, b in zip(expected, got):
        assert b.name == a.name
        assert b.score == pytest.approx(a.score, rel=1e-4)
        span = float(a.anomaly_map.max() - a.anomaly_map.min())
        assert float(np.abs(a.anomaly_map - b.anomaly_map).max()) <= 1e-3 * span
        assert float(np.nanmax(np.abs(a.original_map - b.original_map))) <= 1e-3 * span
        assert b.is_anomalous == a.is_anomalous and b.normalized_score == pytest.approx(a.normalized_score, rel=1e-4)
        assert [n for n, _ in b.neighbours] == [n for n, _ in a.neighbours]
        assert b.explanation.normal_name == a.explanation.normal_name
        assert b.explanation.region_box == a.explanation.region_box
        assert [m.normal_box for m in b.explanation.matches] == [m.normal_box for m in a.explanation.matches]
        flagged += bool(a.is_anomalous)
    assert 0 < flagged < len(images)  # the comparison covers both verdicts


def test_runtime_thresholds_move_like_the_model(fitted_model: Spade, bundle: Path, synthetic_root: Path) -> None:
    runtime = load_bundle(bundle)
    runtime.set_thresholds(false_alarm_rate=0.5)
    moved = Spade.__new__(Spade)  # the same move on a copy of the torch model's calibration
    moved.calibration_, moved.score_scale_, moved.image_score = (fitted_model.calibration_,
                                                                 fitted_model.score_scale_, fitted_model.image_score)
    moved.store_ = fitted_model.store_
    moved.set_thresholds(false_alarm_rate=0.5)
    assert runtime.image_threshold_ == moved.image_threshold_
    with pytest.raises(SettingError, match="k_gallery"):
        runtime.set_params(k_gallery=3)
    with pytest.raises(SettingError, match="add to the model file"):
        runtime.add(synthetic_root / "train" / "good")


def test_bundle_layout_and_checks(bundle: Path, model_file: Path, tmp_path: Path) -> None:
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["format"] == "spade-ad-bundle" and manifest["graph"]["dynamic_size"] is True
    assert (bundle / "model.safetensors").read_bytes() == model_file.read_bytes()  # the model file, byte for byte
    assert not list(bundle.rglob("*.pkl")) and not list(bundle.rglob("*.pt"))
    damaged = shutil.copytree(bundle, tmp_path / "damaged")
    graph = damaged / "backbone.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="backbone.onnx fails its checksum"):
        read_bundle(damaged)
    shutil.copyfile(bundle / "backbone.onnx", graph)
    (damaged / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="lacks model.safetensors"):
        read_bundle(damaged)
    with pytest.raises(ModelFileError, match="not a spade-ad bundle"):
        read_bundle(tmp_path)
    with pytest.raises(OutputError, match="--overwrite"):
        export_bundle(model_file, bundle)


def test_export_refuses_what_the_runtime_does_not_implement(synthetic_root: Path, tmp_path: Path) -> None:
    model = Spade(k_gallery=3, fusion="concat", progress=False, calibration="none", image_score="map_top",
                  thumbnail_size=0)
    model.fit(sorted((synthetic_root / "train" / "good").glob("*.png"))[:3])
    with pytest.raises(SettingError, match="fusion"):
        export_bundle(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_cli_export_predict_and_serve_a_bundle_without_torch(
    model_file: Path, synthetic_root: Path, tmp_path: Path, torch_blocked: dict[str, str]
) -> None:
    """`spade-ad export`, then `spade-ad predict BUNDLE` and `spade-ad serve BUNDLE` in processes where torch
    cannot be imported: the same scores.csv rows as predict on the model file, and the same score over HTTP."""
    bundle = tmp_path / "widget.bundle"
    assert run_cli(["export", model_file, "-o", bundle]) == 0
    assert run_cli(["export", model_file, "-o", bundle]) == 2  # an existing bundle is never replaced silently
    test_dir = synthetic_root / "test"
    assert run_cli(["predict", model_file, test_dir, "-o", tmp_path / "torch"]) == 0
    env = {**os.environ, **torch_blocked}
    done = subprocess.run([sys.executable, "-m", "spade_ad", "predict", str(bundle), str(test_dir), "-o",
                           str(tmp_path / "light")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [list(csv.DictReader(open(tmp_path / run / "scores.csv"))) for run in ("torch", "light")]
    assert [r["path"] for r in rows[0]] == [r["path"] for r in rows[1]] and len(rows[0]) == 12
    for a, b in zip(*rows):
        assert float(b["score"]) == pytest.approx(float(a["score"]), rel=1e-4)
        assert b["is_anomalous"] == a["is_anomalous"]
    refused = subprocess.run([sys.executable, "-m", "spade_ad", "predict", str(bundle), str(test_dir), "-o",
                              str(tmp_path / "gpu"), "--device", "cuda"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "does not apply to a bundle" in refused.stderr
    assert "Traceback" not in refused.stderr
    image = sorted(test_dir.rglob("*.png"))[0]
    with serve_in_subprocess(bundle, env=torch_blocked) as server:
        with open(image, "rb") as handle:
            answer = requests.post(f"{server.url}/v1/predict", files={"files": (image.name, handle, "image/png")},
                                   timeout=60)
        assert answer.status_code == 200, answer.text
        expected = next(r for r in rows[0] if r["path"].endswith(f"{image.parent.name}/{image.name}"))
        assert answer.json()["results"][0]["score"] == pytest.approx(float(expected["score"]), rel=1e-4)
        info = requests.get(f"{server.url}/v1/model", timeout=10).json()
        assert info["backbone"] == "efficientnet_lite0" and info["n_train_images"] == 12


def test_import_runtime_never_imports_torch(bundle: Path, synthetic_root: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        from spade_ad.estimators.runtime import load_bundle
        predictions = load_bundle({str(bundle)!r}).predict({str(synthetic_root / "test")!r}, original_size=True)
        assert len(predictions) == 12
        heavy = sorted(m for m in ("torch", "torchvision", "timm", "sklearn") if m in sys.modules)
        print(",".join(heavy) or "none")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "none"


@pytest.mark.slow
def test_runtime_extra_installs_and_predicts_without_torch(bundle: Path, synthetic_root: Path,
                                                           tmp_path: Path) -> None:
    """A fresh venv with `pip install spade-ad[runtime]` only: torch is not installed, the venv stays under 400 MB,
    and `spade-ad predict BUNDLE` scores the synthetic test set."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    source = tmp_path / "source"  # a copy without the repository's build outputs and venv
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "build", "demo_out",
                                                                 "__pycache__", "benchmarks", "tests"))
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", f"{source}[runtime]"],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-2000:]
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
    installed = {line.split("==")[0].lower() for line in listed.stdout.splitlines()}
    assert "onnxruntime" in installed and not installed & {"torch", "torchvision", "timm", "scikit-learn"}
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    assert size < 400 * 2**20, f"the runtime venv takes {size / 2**20:.0f} MB"
    done = subprocess.run([str(venv / "bin" / "spade-ad"), "predict", str(bundle), str(synthetic_root / "test"),
                           "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))) == 12


def test_runtime_scores_the_batch_read_before_a_bad_file(bundle: Path, synthetic_root: Path, tmp_path: Path) -> None:
    """An unreadable image: skipped and reported with skip_bad, else ImageReadError after every image read before
    it has been yielded (the runtime batches images like the torch path)."""
    from spade_ad.errors import ImageReadError

    good = sorted((synthetic_root / "test" / "good").glob("*.png"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    inputs = [*good[:3], tmp_path / "broken.png", good[3]]
    runtime = load_bundle(bundle)
    skipped: list[str] = []
    names = [p.name for p in runtime.iter_predict(inputs, skip_bad=True, on_skip=lambda item, e: skipped.append(
        item.name))]
    assert len(names) == 4 and [Path(name).name for name in skipped] == ["broken.png"]
    seen = []
    with pytest.raises(ImageReadError, match="broken.png"):
        for prediction in runtime.iter_predict(inputs):
            seen.append(prediction.name)
    assert len(seen) == 3
