"""The backbone graph of a bundle, run by ONNX Runtime (default) or OpenVINO: (N, 3, H, W) float32 RGB in [0, 1]
in, the pyramid levels [(N, C_l, h_l, w_l)] and the global features (N, D) out, as numpy arrays."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...errors import SettingError

ENGINES = ("onnxruntime", "openvino")


class OnnxRuntimeBackbone:
    """The graph in an ONNX Runtime session on the CPU (threads: `threads`, default one per core)."""

    def __init__(self, graph: Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise SettingError("engine", "needs ONNX Runtime, which is not installed", "onnxruntime",
                               "pip install 'spade-ad[runtime]'") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # No busy-waiting between runs: the search (numpy's BLAS threads) runs right after the network on the same
        # cores, and spinning ONNX Runtime threads would take their CPU.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        *levels, global_features = self.session.run(None, {self.input_name: np.ascontiguousarray(images)})
        return levels, global_features


class OpenVinoBackbone:
    """The same graph compiled by OpenVINO for the CPU (an option where it is faster: see docs/deployment.md)."""

    def __init__(self, graph: Path, threads: int | None = None) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise SettingError("engine", "needs OpenVINO, which is not installed", "openvino",
                               "pip install 'spade-ad[openvino]', or engine onnxruntime") from exc
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": int(threads)} if threads else {}
        config["INFERENCE_PRECISION_HINT"] = "f32"  # same answers as the other paths (no bf16 on capable CPUs)
        self.compiled = core.compile_model(core.read_model(str(graph)), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, images: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        self.request.infer([np.ascontiguousarray(images)])
        outputs = [np.array(self.request.get_output_tensor(i).data) for i in range(len(self.compiled.outputs))]
        return outputs[:-1], outputs[-1]


def open_engine(engine: str, graph: Path, threads: int | None = None) -> OnnxRuntimeBackbone | OpenVinoBackbone:
    if engine == "onnxruntime":
        return OnnxRuntimeBackbone(graph, threads)
    if engine == "openvino":
        return OpenVinoBackbone(graph, threads)
    raise SettingError("engine", "is not a known inference engine", engine, " or ".join(ENGINES))
