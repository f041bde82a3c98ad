"""Compile an OpenVINO model for the CPU plugin, call it like the HF model, and read what it runs.

`gemm_precisions` reads the compiled model's execution graph (its runtime info: `layerType`,
`runtimePrecision` per executed layer), so a test can assert that the GEMMs really run in int8
instead of trusting the IR's FakeQuantize nodes.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch

from fxcook.errors import FxcookError
from fxcook.runtime.openvino.convert import require_openvino

__all__ = ["GEMM_LAYERS", "PRECISIONS", "OvModel", "compile_model", "gemm_precisions", "has_bf16", "int8_gemms"]

GEMM_LAYERS = ("FullyConnected", "MatMul", "Convolution")
PRECISIONS = ("bf16", "f32")  # inference_precision: bf16 (the plugin's default where the CPU has it) or f32
INT8 = ("i8", "u8")


def has_bf16() -> bool:
    """Whether the CPU plugin can compute in bf16 on this machine (AVX-512 BF16 or AMX)."""
    ov = require_openvino()
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_model(
    model, *, precision: str | None = None, threads: int = 2, config: dict | None = None, profile: bool = False
):
    """`model` (an `openvino.Model` or a model.xml path) compiled for the CPU plugin.

    `precision`: the float precision of the layers that are not int8: None (the plugin's default:
    bf16 where the CPU has it), "bf16" (an error on a CPU without it) or "f32". `threads`: inference
    threads. `config`: further CPU plugin properties. `profile`: keep per-layer timings (`layer_profile`).
    """
    ov = require_openvino()
    if precision is not None and precision not in PRECISIONS:
        raise FxcookError(
            f"inference_precision {precision!r}: use one of {', '.join(PRECISIONS)} (or None for the default)"
        )
    if precision == "bf16" and not has_bf16():
        raise FxcookError(
            "inference_precision 'bf16': this CPU has no bf16 support (OpenVINO's CPU plugin lists no BF16 "
            "capability: it needs AVX-512 BF16 or AMX); use precision='f32'"
        )
    # DYNAMIC_QUANTIZATION_GROUP_SIZE 0: int8 weight-only GEMMs keep float activations (the plugin's
    # default would quantize them per group of 32 on the fly, values fxcook's model never computes)
    props = {
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "PERF_COUNT": profile,
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
    }
    if precision is not None:
        props["INFERENCE_PRECISION_HINT"] = precision
    props.update(config or {})
    core = ov.Core()
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise FxcookError(f"OpenVINO model {path}: no such file (export one with fxcook export DIR --to openvino)")
        model = core.read_model(str(path))
    return core.compile_model(model, "CPU", props)


def gemm_precisions(compiled) -> Counter:
    """(layer type, runtime precision) -> count, over the GEMM layers the compiled model executes."""
    out = Counter()
    for node in compiled.get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in GEMM_LAYERS:
            out[(kind, info["runtimePrecision"].astype(str))] += 1
    return out


def int8_gemms(compiled) -> int:
    """How many GEMM layers of the compiled model execute in int8."""
    return sum(n for (_, precision), n in gemm_precisions(compiled).items() if precision in INT8)


def layer_profile(request, top: int = 12) -> list[tuple[str, str, str, float]]:
    """The slowest executed layers of the last inference of `request` (compiled with profile=True):
    (layer type, kernel, layer name, milliseconds), slowest first."""
    rows = [
        (p.node_type, p.exec_type, p.node_name, p.real_time.total_seconds() * 1e3)
        for p in request.profiling_info
        if p.status.name == "EXECUTED"
    ]
    return sorted(rows, key=lambda r: -r[3])[:top]


class OvModel:
    """A compiled OpenVINO model called like the HF model: keyword tensors in, first output out."""

    def __init__(
        self,
        model,
        *,
        precision: str | None = None,
        threads: int = 2,
        config: dict | None = None,
        profile: bool = False,
    ):
        self.compiled = compile_model(model, precision=precision, threads=threads, config=config, profile=profile)
        self.request = self.compiled.create_infer_request()
        self.names = [i.get_any_name() for i in self.compiled.inputs]

    def feeds(self, **inputs) -> dict:
        missing = [n for n in self.names if n not in inputs]
        if missing:
            raise FxcookError(
                f"OvModel: missing input(s) {', '.join(missing)} (the model takes {', '.join(self.names)})"
            )
        return {n: inputs[n].numpy() for n in self.names}

    def __call__(self, **inputs) -> torch.Tensor:
        out = self.request.infer(self.feeds(**inputs))
        return torch.from_numpy(out[self.compiled.outputs[0]].copy())

    def int8_gemms(self) -> int:
        return int8_gemms(self.compiled)
