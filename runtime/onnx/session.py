"""Run an exported ONNX model with ONNX Runtime (CPU), and read which kernels it really runs."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import torch

__all__ = ["INTEGER_GEMMS", "OrtModel", "integer_gemms", "optimized_ops", "session"]

INTEGER_GEMMS = ("QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm")


def session(path: str | os.PathLike, threads: int = 2, optimized_path: str | os.PathLike | None = None):
    """An ONNX Runtime CPU session with `threads` intra-op threads (all graph optimizations on)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OrtModel:
    """An ONNX Runtime session called like the HF model: keyword tensors in, first output out."""

    def __init__(self, path: str | os.PathLike, threads: int = 2):
        self.session = session(path, threads=threads)
        self.names = [i.name for i in self.session.get_inputs()]

    def feeds(self, **inputs) -> dict:
        return {k: inputs[k].numpy() for k in self.names}

    def __call__(self, **inputs) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, self.feeds(**inputs))[0])


def optimized_ops(path: str | os.PathLike) -> Counter:
    """Op types (with counts) of the graph ONNX Runtime actually runs after its fusions."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "optimized.onnx"
        session(path, threads=1, optimized_path=out)
        return Counter(n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node)


def integer_gemms(path: str | os.PathLike) -> int:
    """How many integer GEMM kernels ONNX Runtime runs for the model at `path`."""
    ops = optimized_ops(path)
    return sum(ops[k] for k in INTEGER_GEMMS)
