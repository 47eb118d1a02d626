"""`spade-ad export`: a fitted model as a deployment bundle (see `spade_ad.estimators.runtime.bundle` for the layout).

The backbone becomes an ONNX graph that outputs exactly what the model uses: the pyramid levels (after the
`patch_size` averaging) and the global feature, with the normalisation inside, and dynamic batch, height and width
(images keep their aspect ratio, so sizes vary). torch's TorchScript-based exporter (`dynamo=False`) is used: on
torch 2.14 the `torch.export` path specialises the timm EfficientNets' dynamic sizes. After writing, the graph is
run once by ONNX Runtime on a probe image and compared with torch; a bundle whose graph disagrees is not written.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._version import __version__
from ..errors import OutputError, SettingError
from ..estimators.runtime.bundle import GRAPH, MODEL, OPENVINO_IR, OPENVINO_WEIGHTS, write_manifest
from ..estimators.spade import Spade
from ..estimators.spade_file import load

FORMATS = ("onnx", "openvino")
#: ONNX opset of the graph (ONNX Runtime >= 1.14 and OpenVINO >= 2023 read it).
OPSET = 17
#: Largest relative difference allowed between the graph's outputs and torch's on the probe image.
PROBE_TOLERANCE = 1e-4


class _ExportedBackbone(nn.Module):
    """The model's backbone as the graph computes it: normalise, run the body, keep the model's levels (averaged
    over `patch_size` neighbourhoods when > 1), and average-pool the last stage as the global feature."""

    def __init__(self, model: Spade) -> None:
        super().__init__()
        self.backbone = model.backbone_
        self.patch_size = int(model.patch_size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        backbone = self.backbone
        outputs = backbone.body((images - backbone.mean) / backbone.std)
        pyramid = [outputs[p] for p in backbone._positions]
        if self.patch_size > 1:
            pyramid = [F.avg_pool2d(m, self.patch_size, stride=1, padding=self.patch_size // 2,
                                    count_include_pad=False) for m in pyramid]
        return (*pyramid, outputs[-1].mean(dim=(2, 3)))


def exportable(model: Spade) -> None:
    """Refuse settings the runtime does not implement (SettingError naming the setting and the way out)."""
    if model.fusion != "mean":
        raise SettingError("fusion", "is exported only as \"mean\" (concat runs in torch only)", model.fusion,
                           "refit with fusion=mean, or serve the model file")
    if model.search_radius is not None:
        raise SettingError("search_radius", "is not exported (the windowed search runs in torch only)",
                           model.search_radius, "refit with search_radius=None, or serve the model file")


def export_bundle(model: str | Path | Spade, output: str | Path, *, format: str = "onnx",
                  overwrite: bool = False, weights: str | Path | None = None) -> Path:
    """Write the bundle folder `output` from a model file (copied byte for byte) or a fitted `Spade` (saved).
    An existing `output` is refused unless `overwrite`; the folder is assembled beside it and renamed into place,
    so a failed export leaves nothing half-written. Returns the bundle's path."""
    if format not in FORMATS:
        raise SettingError("format", "is not an export format", format, " or ".join(FORMATS))
    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputError(f"{output} already exists: choose another folder or pass --overwrite to replace it")
    fitted = load(model, weights=weights, device="cpu") if not isinstance(model, Spade) else model
    exportable(fitted)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as tmp:
        folder = Path(tmp) / "bundle"
        folder.mkdir()
        if isinstance(model, Spade):
            model.save(folder / MODEL)
        else:
            shutil.copyfile(model, folder / MODEL)
        names = _write_graph(fitted, folder / GRAPH)
        extra: tuple[str, ...] = ()
        if format == "openvino":
            _write_openvino(folder)
            extra = (OPENVINO_IR, OPENVINO_WEIGHTS)
        write_manifest(folder, outputs=names, spade_ad_version=__version__, dynamic=True,
                       exporter={"torch": torch.__version__, "opset": str(OPSET)},
                       settings=fitted.get_params(), extra_files=extra)
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        folder.rename(output)
    return output


def _write_graph(model: Spade, path: Path) -> list[str]:
    """Export the backbone to ONNX with dynamic batch, height and width, then check it on a probe image."""
    module = _ExportedBackbone(model).eval().to("cpu")
    names = [f"level_{i}" for i in range(len(model.layers))] + ["global"]
    probe = torch.rand(1, 3, model.image_size, model.image_size * 2, generator=torch.Generator().manual_seed(0))
    dynamic = {"images": {0: "batch", 2: "height", 3: "width"}, **{n: {0: "batch"} for n in names}}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, chosen on purpose (above)
        torch.onnx.export(module, (probe,), str(path), input_names=["images"], output_names=names,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
        expected = [t.numpy() for t in module(probe)]
    _check_graph(path, probe.numpy(), expected)
    return names


def _check_graph(path: Path, probe: np.ndarray, expected: list[np.ndarray]) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": probe})
    for name, a, b in zip([o.name for o in session.get_outputs()], got, expected):
        difference = float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))
        if a.shape != b.shape or difference > PROBE_TOLERANCE:
            raise RuntimeError(f"the exported graph's {name} differs from torch's by {difference:.2e} "
                               f"(relative): the bundle is not written")


def _write_openvino(folder: Path) -> None:
    """The ONNX graph converted to OpenVINO's IR (backbone.xml + backbone.bin), full precision."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise SettingError("format", "needs OpenVINO, which is not installed", "openvino",
                           "pip install 'spade-ad[openvino]', or --format onnx") from exc
    ov.save_model(ov.convert_model(str(folder / GRAPH)), str(folder / OPENVINO_IR), compress_to_fp16=False)


def describe(bundle: Path) -> dict[str, Any]:
    """Sizes of a bundle's files in bytes (for the CLI's summary)."""
    return {p.name: p.stat().st_size for p in sorted(bundle.iterdir())}
