"""`spade-ad export --single-graph`: the whole SPADE pipeline as one ONNX model, for any ONNX Runtime binding.

One graph holds the network, the global kNN search and the choice of the K nearest training images, the pixel
search in their stored features (initializers: float16 as stored), the fusion of the levels, the Gaussian smoothing,
the map's score, the image score (fused with the calibrated spreads, as `score_parts.combine_scores`) and the
verdict at the model's image threshold. The contract (docs/single-graph.md):

    inputs   image         uint8 (N, H, W, 3)  RGB at the network input size, resized as spade-ad resizes
                                                (Pillow's bilinear with antialiasing over the scored box)
             global_image  uint8 (N, S, S, 3)  only for non-square inputs with global_view="square": the scored
                                                box squashed to image_size x image_size
    outputs  score         float64 (N,)        the image score, as `Prediction.score`
             is_anomalous  bool (N,)           score > image threshold (always false without a threshold)
             normalized_score float64 (N,)     0 = median good, 1 = threshold (NaN without a threshold)
             anomaly_map   float32 (N, H, W)   the smoothed map at the input size, as `Prediction.anomaly_map`
                                                (NaN outside the model's region of interest, if it has one)
             map_score, knn_score float32 (N,) two parts of the score (before the density normalisation)
             coarse_score  float32 (N,)        the third: the coarsest level's own map's top 1% (0 without it)

H and W are fixed (the training images' network input size); N is dynamic. The model's settings, thresholds and
this contract are in the model's metadata (key "spade_ad", JSON). Settings the graph cannot express are refused
with a SettingError naming them: fusion="concat", a search_radius, the tiled mode (tile_size), and a
max_search_pairs the exact search would exceed at this input size.

The distance computation follows the numpy search: neighbours ranked by |b|^2 - 2 q.b, the chosen neighbours'
squared distances recomputed directly, so that the graph's scores are the runtime's to float rounding. The torch
module traced into the graph is `spade_ad.export.graph_module.SingleGraph`; this module exports it (size, refusals,
contract, metadata) and checks the graph against the torch path on a probe image.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..errors import OutputError, SettingError
from ..estimators.spade import Spade
from ..estimators.spade_file import load
from ..settings import uses_coarse
from .bundle import OPSET, exportable
from .graph_module import SingleGraph

#: Key of the graph's metadata entry (ONNX `metadata_props`) that holds the contract and the settings as JSON.
METADATA_KEY = "spade_ad"
SINGLE_GRAPH_FORMAT = "spade-ad-single-graph"
SINGLE_GRAPH_VERSION = 1
#: Bars of the export's own check (a probe image scored by the graph and by the torch path).
SCORE_TOLERANCE = 1e-4
MAP_TOLERANCE = 1e-3


def graph_input_size(model: Spade) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """The network input size (height, width) the graph takes and its pyramid levels' map shapes: the training
    images' (the most common when they differ). "squash" and "paper_crop" inputs are image_size x image_size;
    "keep_aspect" inputs are multiples of 32, so the first level's shape times its stride."""
    shapes = Counter(tuple(tuple(int(v) for v in level) for level in image) for image in model.store_.shapes)
    levels = [tuple(level) for level in shapes.most_common(1)[0][0]]
    if model.resize != "keep_aspect":
        return (model.image_size, model.image_size), levels
    stride = int(model.backbone_.strides[0])
    return (levels[0][0] * stride, levels[0][1] * stride), levels


def check_expressible(model: Spade, input_size: tuple[int, int], level_shapes: list[tuple[int, int]]) -> None:
    """Refuse what one graph cannot compute as the Python path does (SettingError naming the setting)."""
    exportable(model)
    if getattr(model, "tile_size", None) is not None:
        raise SettingError("tile_size", "is not exported as one graph (the tiled loop runs in torch only)",
                           model.tile_size, "score tiled models with the model file (spade-ad predict MODEL)")
    if model.image_score == "fused" and not ({"map", "knn"} | ({"coarse"} if uses_coarse(model) else set())
                                             ) <= set(model.score_scale_):
        raise SettingError("image_score", "fused needs a calibrated model to scale its parts", model.image_score,
                           "calibrate the model (spade-ad calibrate MODEL --good DIR), or refit with map_top")
    if model.max_search_pairs is not None:
        sizes = model.store_.shapes[..., 0] * model.store_.shapes[..., 1]
        k = min(model.k_gallery, model.store_.n_images)
        for level, (h, w) in enumerate(level_shapes):
            queries = h * w
            largest = np.sort(sizes[:, level])[::-1][:k].sum()
            if queries * int(largest) > model.max_search_pairs:
                raise SettingError(
                    "max_search_pairs", f"would reduce the gallery at a {input_size[1]} x {input_size[0]} input "
                    f"({queries * int(largest):,} pairs at level {level}); the single graph searches exactly",
                    model.max_search_pairs, "refit with max_search_pairs=none or a larger value, or use a bundle")


def contract(model: Spade, input_size: tuple[int, int], needs_global_image: bool) -> dict[str, Any]:
    """What the graph's metadata says: how to make its inputs, what its outputs mean, thresholds and settings."""
    height, width = input_size
    cal = model.calibration_
    inputs = [{"name": "image", "dtype": "uint8", "shape": ["N", height, width, 3],
               "meaning": "RGB image resized to the network input (Pillow BILINEAR with antialiasing over the "
                          "scored box, as spade_ad.core.geometry.image_to_array)"}]
    if needs_global_image:
        inputs.append({"name": "global_image", "dtype": "uint8",
                       "shape": ["N", model.image_size, model.image_size, 3],
                       "meaning": "the scored box squashed to image_size x image_size (global_view=square)"})
    return {
        "format": SINGLE_GRAPH_FORMAT, "format_version": SINGLE_GRAPH_VERSION, "spade_ad": __version__,
        "input_size": [height, width], "image_size": model.image_size, "resize": model.resize,
        "global_view": model.global_view, "inputs": inputs,
        "outputs": [
            {"name": "score", "dtype": "float64", "shape": ["N"]},
            {"name": "is_anomalous", "dtype": "bool", "shape": ["N"]},
            {"name": "normalized_score", "dtype": "float64", "shape": ["N"]},
            {"name": "anomaly_map", "dtype": "float32", "shape": ["N", height, width]},
            {"name": "map_score", "dtype": "float32", "shape": ["N"]},
            {"name": "knn_score", "dtype": "float32", "shape": ["N"]},
            {"name": "coarse_score", "dtype": "float32", "shape": ["N"]},
        ],
        "region_of_interest": getattr(model, "roi_", None) is not None,
        "image_threshold": cal.image_threshold, "pixel_threshold": cal.pixel_threshold,
        "false_alarm_rate": cal.false_alarm_rate, "median_good_score": cal.median,
        "train_images": model.store_.n_images,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.get_params().items()
                     if k not in ("progress", "feature_dir")},
    }


OUTPUT_NAMES = ("score", "is_anomalous", "normalized_score", "anomaly_map", "map_score", "knn_score",
                "coarse_score")


def export_single_graph(model: str | Path | Spade, output: str | Path, *, overwrite: bool = False,
                        weights: str | Path | None = None) -> Path:
    """Write the whole pipeline of a model file (or a fitted `Spade`) as one ONNX model at `output`; the graph is
    checked against the torch path on a probe image before it is moved into place. Returns `output`."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputError(f"{output} already exists: choose another file or pass --overwrite to replace it")
    with tempfile.TemporaryDirectory(prefix=".spade-ad-graph.") as scratch:
        if isinstance(model, Spade) and model.device_.type != "cpu":  # traced on the CPU: a CPU copy of the model
            model = model.save(Path(scratch) / "model.safetensors")
        fitted = load(model, weights=weights, device="cpu") if not isinstance(model, Spade) else model
        return _export(fitted, output)


def _export(fitted: Spade, output: Path) -> Path:
    input_size, level_shapes = graph_input_size(fitted)
    check_expressible(fitted, input_size, level_shapes)
    needs_global_image = fitted.global_view == "square" and input_size[0] != input_size[1]
    module = SingleGraph(fitted, input_size, level_shapes, needs_global_image).eval()
    original, probe, global_probe = _probe(fitted, input_size, needs_global_image)
    args = (torch.from_numpy(probe[None]),) + ((torch.from_numpy(global_probe[None]),) if needs_global_image else ())
    input_names = ["image"] + (["global_image"] if needs_global_image else [])
    dynamic = {**{name: {0: "batch"} for name in input_names}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as tmp:
        path = Path(tmp) / output.name
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter, chosen on purpose (see spade_ad.export.bundle)
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=list(OUTPUT_NAMES),
                              dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
        _add_metadata(path, contract(fitted, input_size, needs_global_image))
        check_graph(path, fitted, original, probe, global_probe)
        path.replace(output)
    return output


def _probe(model: Spade, input_size: tuple[int, int], needs_global_image: bool,
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A deterministic image (smooth shapes and noise) whose network input is the graph's input size: the image
    itself, the graph's `image` input and its `global_image` input (both made as the runtime makes them)."""
    from PIL import Image

    from ..core.geometry import global_view_geometry, image_to_array, plan_geometry

    height, width = input_size
    candidates = [input_size]
    if model.resize == "paper_crop":
        candidates.insert(0, (round(model.image_size * 8 / 7),) * 2)
    elif min(input_size) != model.image_size:
        scale = model.image_size / min(input_size)
        candidates.append((round(height * scale), round(width * scale)))
    for size in candidates:
        geometry = plan_geometry(size, model.image_size, model.resize)
        if geometry.input_size == tuple(input_size):
            break
    else:
        raise RuntimeError(f"no probe image maps onto the {width} x {height} input: the graph cannot be checked")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size[0], 0:size[1]] / max(size)
    base = np.stack([np.sin(6 * xx + 1), np.cos(5 * yy), np.sin(4 * (xx + yy))], -1) * 80 + 128
    original = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    picture = Image.fromarray(original)

    def as_uint8(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.round(array.transpose(1, 2, 0) * 255).astype(np.uint8))

    image = as_uint8(image_to_array(picture, geometry))
    view = global_view_geometry(geometry, model.image_size, model.global_view) if needs_global_image else None
    return original, image, (image if view is None else as_uint8(image_to_array(picture, view)))


def _add_metadata(path: Path, data: dict[str, Any]) -> None:
    import onnx

    graph = onnx.load(str(path))
    graph.doc_string = "spade-ad single graph: see the metadata entry 'spade_ad' and docs/single-graph.md"
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(data)
    onnx.save(graph, str(path))


def read_contract(path: str | Path) -> dict[str, Any]:
    """The contract stored in a single graph's metadata."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])


def check_graph(path: Path, model: Spade, original: np.ndarray, probe: np.ndarray, global_probe: np.ndarray,
                ) -> dict[str, float]:
    """Score a probe image with the graph (ONNX Runtime, from its inputs `probe` and `global_probe`) and with the
    model's own path (from the image `original`); a graph whose score differs by
    more than SCORE_TOLERANCE (relative) or whose map differs by more than MAP_TOLERANCE of the map's range is
    refused (RuntimeError). Returns the differences."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"image": probe[None]}
    if len(session.get_inputs()) > 1:
        feeds["global_image"] = global_probe[None]
    score, _, _, anomaly_map, *_ = session.run(None, feeds)
    expected = model.predict(original)[0]
    scored = ~np.isnan(expected.anomaly_map)  # outside a region of interest both maps must be NaN
    span = float(np.nanmax(expected.anomaly_map) - np.nanmin(expected.anomaly_map)) if scored.any() else 1.0
    differences = {
        "score": abs(float(score[0]) - expected.score) / max(abs(expected.score), 1e-12),
        "map": float(np.abs(anomaly_map[0] - expected.anomaly_map)[scored].max(initial=0.0)) / (span or 1.0),
    }
    if differences["score"] > SCORE_TOLERANCE or not differences["map"] <= MAP_TOLERANCE or not math.isfinite(
            float(score[0])) or not np.array_equal(np.isnan(anomaly_map[0]), ~scored):
        raise RuntimeError(f"the single graph's score differs from the torch path's by {differences['score']:.2e} "
                           f"(relative) and its map by {differences['map']:.2e} of the range on a probe image: "
                           f"the graph is not written")
    return differences
