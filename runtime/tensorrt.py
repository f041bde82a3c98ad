"""TensorRT backend: engines from fxcook's ONNX export, the torch-tensorrt dynamo path, and a
validator of TensorRT's explicit-quantization rules that needs no TensorRT.

TensorRT runs int8 only from explicit Q/DQ: symmetric int8, zero-point 0, per-tensor activation
scales, weight scales per output channel, and Q/DQ on *both* GEMM inputs. Export with static
activations (`Quantize(acts="int8/tensor")`): per-token dynamic quantization has no TensorRT int8
form. `check_explicit_quantization` checks an ONNX file against these rules so CI can verify the
artifact; `build_engine` (needs `tensorrt`) builds a strongly typed engine with an optimization
profile for the dynamic batch/sequence axes and, optionally, 2:4 sparse weights.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from fxcook.errors import FxcookError
from fxcook.nn import CookedLinear
from fxcook.qview import quant_view
from fxcook.runtime.lowering import Flat
from fxcook.tracing import split_inputs

__all__ = ["check_explicit_quantization", "build_engine", "trt_lowered", "compile_torch_tensorrt"]

GEMMS = ("MatMul", "Gemm")
PASS_THROUGH = ("Transpose", "Reshape", "Cast")  # layout ops TensorRT looks through to find the DQ


def check_explicit_quantization(path: str | os.PathLike) -> list[str]:
    """Violations of TensorRT's explicit-quantization rules in the ONNX model at `path` ([] = ok).

    Every GEMM with a DequantizeLinear input must have DQ on both inputs; every Q/DQ must be int8
    with zero-point 0; activation scales per tensor; weight (initializer) scales per tensor or per
    output channel.
    """
    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    const = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    producer = {o: n for n in g.node for o in n.output}
    problems = []

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in const:
            return numpy_helper.to_array(const[name].attribute[0].t)
        return None

    def source_dq(name):
        node = producer.get(name)
        while node is not None and node.op_type in PASS_THROUGH:
            node = producer.get(node.input[0])
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    for n in g.node:
        if n.domain not in ("", "ai.onnx"):
            problems.append(
                f"{n.domain}.{n.op_type} {n.name or n.output[0]}: not a standard ONNX op "
                f"(per-token dynamic activations have no TensorRT int8 form; export with acts int8/tensor)"
            )
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            where = f"{n.op_type} {n.name or n.output[0]}"
            zp = value(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if zp is not None and (zp.dtype.name != "int8" or zp.any()):
                problems.append(f"{where}: zero point must be int8 0, got {zp.dtype.name} {zp.ravel()[:4]}")
            if n.op_type == "DequantizeLinear" and len(n.input) <= 2:
                x = value(n.input[0])
                if x is None and producer.get(n.input[0]) is None:
                    continue
                if x is not None and x.dtype.name != "int8":
                    problems.append(f"{where}: weights must be int8, got {x.dtype.name}")
            scale = value(n.input[1])
            if scale is None:
                problems.append(f"{where}: scale must be a constant")
            elif scale.size > 1:
                x = value(n.input[0])
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                if x is None:
                    problems.append(f"{where}: activation scales must be per tensor, got {scale.size} values")
                elif scale.size != x.shape[axis]:
                    problems.append(f"{where}: {scale.size} scales do not match axis {axis} of {x.shape}")
        if n.op_type in GEMMS:
            dqs = [source_dq(i) for i in n.input[:2]]
            if any(dqs) and not all(dqs):
                problems.append(f"{n.op_type} {n.name or n.output[0]}: Q/DQ on one input only; TensorRT needs both")
            if all(dqs):
                w = dqs[1]
                wv = value(w.input[0])
                if wv is not None and value(w.input[1]).size > 1:
                    axis = next((a.i for a in w.attribute if a.name == "axis"), 1)
                    out_axis = wv.ndim - 1 if n.op_type == "MatMul" else (0 if _trans_b(n) else 1)
                    if _transposed_between(producer, n.input[1]):
                        out_axis = 0
                    if axis % wv.ndim != out_axis:
                        problems.append(
                            f"{n.op_type} {n.name or n.output[0]}: weight scales on axis {axis}, "
                            f"not the output-channel axis {out_axis}"
                        )
    return problems


def _trans_b(node) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)


def _transposed_between(producer, name) -> bool:
    node = producer.get(name)
    return node is not None and node.op_type == "Transpose"


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    sparse: bool = False,
    min_shape=(1, 1),
    opt_shape=(8, 128),
    max_shape=(32, 512),
    workspace_gb: float = 4.0,
) -> Path:
    """Build and serialize a TensorRT engine from an fxcook ONNX export (needs `tensorrt`).

    Strongly typed network (precisions come from the Q/DQ in the graph), one optimization profile
    over the (batch, sequence) axes of every input, `SPARSE_WEIGHTS` when `sparse` (2:4 weights).
    """
    problems = check_explicit_quantization(onnx_path)
    if problems:
        raise FxcookError(f"{onnx_path} breaks TensorRT's explicit-quantization rules: " + "; ".join(problems[:5]))
    try:
        import tensorrt as trt
    except ImportError as e:
        raise FxcookError("build_engine needs the `tensorrt` package (pip install fxcook[tensorrt])") from e
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FxcookError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        rest = tuple(inp.shape)[2:]
        profile.set_shape(inp.name, (*min_shape, *rest), (*opt_shape, *rest), (*max_shape, *rest))
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise FxcookError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path = Path(engine_path)
    tmp = engine_path.with_name(f".{engine_path.name}.tmp")
    tmp.write_bytes(bytes(blob))
    os.replace(tmp, engine_path)
    return engine_path


class _TrtQuantLinear(nn.Module):
    """A static-int8 CookedLinear as TensorRT's explicit quantization: `quantize_op` (fake quant with
    an amax) on the SmoothQuant-scaled input and on the masked weight, then a float linear."""

    def __init__(self, lin: CookedLinear, quantize_op):
        super().__init__()
        view = quant_view(lin)
        if view.act != "tensor":
            raise FxcookError("TensorRT int8 needs static per-tensor activations (acts: int8/tensor)")
        if view.group is not None:
            raise FxcookError("TensorRT int8 needs per-channel weights (weights: int8/channel)")
        self.quantize_op = quantize_op
        self.register_buffer("weight", view.masked.clone())
        self.register_buffer("amax_w", view.scale.unsqueeze(-1) * view.qmax)
        dtype = view.masked.dtype  # the model's own: the view's bias and divisor are float32
        self.register_buffer("bias", None if view.bias is None else view.bias.to(dtype))
        self.register_buffer("amax_x", view.act_scale * (2 ** (view.act_bits - 1) - 1))
        self.register_buffer("inv_smooth", None if view.inv_smooth is None else view.inv_smooth.to(dtype))

    def forward(self, x):
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        q = self.quantize_op
        return nn.functional.linear(
            q(x, self.amax_x, 8, 0, False, False), q(self.weight, self.amax_w, 8, 0, False, False), self.bias
        )


def trt_lowered(cooked, quantize_op):
    """A copy of `cooked` (eval mode) whose quantized linears call `quantize_op` as TensorRT's
    Q/DQ (`torch.ops.tensorrt.quantize_op` for a real build); `cooked` itself is left untouched."""
    low = copy.deepcopy(cooked).eval()
    for path, mod in list(low.named_modules()):
        if isinstance(mod, CookedLinear) and mod.weight_quant is not None:
            low.swap(path, _TrtQuantLinear(mod, quantize_op))
    return low


def compile_torch_tensorrt(cooked, example_inputs, **options):
    """torch-tensorrt dynamo path on a lowered copy of `cooked` (see `trt_lowered`); returns the
    compiled module, called with the example inputs' tensors positionally (positional inputs, then
    keyword values in order) and returning a tuple of output tensors, like the ONNX export."""
    try:
        import torch_tensorrt
    except ImportError as e:
        raise FxcookError("compile_torch_tensorrt needs `torch_tensorrt` (pip install fxcook[tensorrt])") from e
    if not hasattr(torch.ops.tensorrt, "quantize_op"):
        raise FxcookError("torch.ops.tensorrt.quantize_op is not registered (install nvidia-modelopt)")
    args, kwargs = split_inputs(example_inputs)
    flat = (*args, *kwargs.values())
    low = Flat(trt_lowered(cooked, torch.ops.tensorrt.quantize_op), len(args), list(kwargs))
    with torch.no_grad():
        ep = torch.export.export(low, flat, strict=False)
    return torch_tensorrt.dynamo.compile(
        ep, arg_inputs=flat, enabled_precisions={torch.int8, torch.float16, torch.float32}, **options
    )
