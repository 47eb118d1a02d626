"""Deployment bundles: a folder holding the backbone as an ONNX graph and the fitted model file, with a manifest.

    BUNDLE/
      bundle.json        format, versions, the graph's inputs and outputs, and a SHA-256 of every file
      backbone.onnx      images (N, 3, H, W) RGB in [0, 1] -> one output per pyramid level, then the global feature;
                         normalisation (and patch_size averaging) inside the graph; N, H and W dynamic
      model.safetensors  the model file itself (`spade_ad.data.modelfile`: settings, stored features, calibration)
      backbone.xml/.bin  (with --format openvino) the same graph in OpenVINO's format

No pickle anywhere: JSON, ONNX (protobuf) and safetensors. Every file's checksum is checked when a bundle is read,
and the model file checks its own contents as it always does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...data.modelfile import ModelContents, read_model
from ...errors import ModelFileError

BUNDLE_FORMAT = "spade-ad-bundle"
BUNDLE_VERSION = 1
MANIFEST = "bundle.json"
GRAPH = "backbone.onnx"
MODEL = "model.safetensors"
#: The graph converted to OpenVINO's own format (`spade-ad export --format openvino`), beside its weights file.
OPENVINO_IR = "backbone.xml"
OPENVINO_WEIGHTS = "backbone.bin"


@dataclass
class Bundle:
    """A read and verified bundle: its folder, manifest and model contents (features memory-mapped)."""

    path: Path
    manifest: dict[str, Any]
    contents: ModelContents

    @property
    def graph_path(self) -> Path:
        return self.path / GRAPH

    @property
    def openvino_path(self) -> Path | None:
        """The OpenVINO IR of the graph, when the bundle was exported with it."""
        return self.path / OPENVINO_IR if self.manifest.get("openvino_ir") == OPENVINO_IR else None


def is_bundle(path: str | Path) -> bool:
    """Whether `path` is a bundle folder (holds a bundle.json), as opposed to a model file."""
    return (Path(path) / MANIFEST).is_file()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, *, outputs: list[str], spade_ad_version: str, exporter: dict[str, str],
                   dynamic: bool, settings: dict[str, Any], extra_files: tuple[str, ...] = ()) -> Path:
    """Write bundle.json for a folder that already holds backbone.onnx and model.safetensors (and `extra_files`,
    e.g. an OpenVINO IR of the graph), with the checksum of each."""
    manifest = {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "spade_ad": spade_ad_version,
        "exporter": exporter,
        "graph": {"file": GRAPH, "input": "images", "outputs": outputs, "dynamic_size": dynamic,
                  "input_range": "RGB in [0, 1], (N, 3, H, W) float32", "multiple_of": 32},
        "model": {"file": MODEL},
        "settings": settings,
        "openvino_ir": OPENVINO_IR if OPENVINO_IR in extra_files else None,
        "sha256": {name: file_sha256(folder / name) for name in (GRAPH, MODEL, *extra_files)},
    }
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle folder; ModelFileError naming the file and the fix on any problem."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ModelFileError(f"{folder} is not a spade-ad bundle (no {MANIFEST}); create one with "
                             f"`spade-ad export MODEL -o {folder}`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{manifest_path} is damaged ({exc}); export the bundle again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise ModelFileError(f"{manifest_path} is not a spade-ad bundle manifest; export the bundle again")
    version = manifest.get("format_version")
    if version != BUNDLE_VERSION:
        raise ModelFileError(f"{folder} is a bundle of format {version!r}; this spade-ad reads format "
                             f"{BUNDLE_VERSION}: export it again with this version")
    sums = manifest.get("sha256")
    if not isinstance(sums, dict) or not {GRAPH, MODEL} <= set(sums) or not all(
            isinstance(k, str) and "/" not in k and isinstance(v, str) for k, v in sums.items()):
        raise ModelFileError(f"{manifest_path} lists no checksums for {GRAPH} and {MODEL}; export the bundle again")
    for name, expected in sums.items():
        file = folder / name
        if not file.is_file():
            raise ModelFileError(f"bundle {folder} lacks {name}; export the bundle again")
        if file_sha256(file) != expected:
            raise ModelFileError(f"{file} fails its checksum in {MANIFEST} (damaged or modified); export the "
                                 f"bundle again")
    return Bundle(folder, manifest, read_model(folder / MODEL))
