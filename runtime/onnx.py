"""ONNX / ONNX Runtime backend: export a CookedModel as an integer ONNX model and run it.

For the export, each quantized CookedLinear is swapped in place for a module that calls fxcook's own
ops (`fxcook.ops.quant`) and put back afterwards (`lowered`); the translations emit:

- per-token dynamic activations: x -> per-row absmax scale -> uint8 codes (int8 + 128) ->
  `com.microsoft.MatMulIntegerToFloat` with the int8 `[out, in]` weight initializer and its
  per-channel scales, then the per-token scale. ONNX Runtime runs it as one integer GEMM.
- per-tensor dynamic activations: `com.microsoft.DynamicQuantizeMatMul` (range, uint8 codes,
  integer GEMM, rescale and bias in one kernel) with the int8 weight stored `[in, out]`.
- per-tensor static activations (TensorRT's form): QuantizeLinear -> DequantizeLinear on the input,
  DequantizeLinear on the int8 weight stored `[in, out]` (per output channel, axis 1), MatMul;
  ORT fuses each into an integer GEMM.
- weight-only: DequantizeLinear (axis 0, or per group) on the int8 weight, float MatMul.
- quantized embedding tables: Gather on the int8 table and on its row scales, then one multiply.
- quantized HF MoE expert weights (`fxcook.quant_experts`): int8 `[E*out, in]` initializers with
  DequantizeLinear (axis 0), the GEMM's token operand through Q/DQ, and transformers' grouped expert
  GEMM as a float MatMul over all experts with a per-row select (exact, not fast).

Batch and sequence axes stay dynamic; the IR version is capped at what ONNX Runtime accepts.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from fxcook.errors import FxcookError, NotSupportedYet
from fxcook.nn import CookedEmbedding, CookedLinear
from fxcook.quant import DynamicTensorQuant, TensorQuant, TokenQuant
from fxcook.quant_embed import EmbeddingInt8Export
from fxcook.tracing import dynamic_spec, split_inputs

__all__ = ["export", "lowered", "QuantLinearExport", "session", "optimized_ops", "integer_gemms",
           "INTEGER_GEMMS", "MAX_IR_VERSION"]

MAX_IR_VERSION = 10  # ONNX Runtime 1.20+ loads IR <= 10; onnx 1.23's make_model writes newer
INTEGER_GEMMS = ("QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm")


class QuantLinearExport(nn.Module):
    """The integer form of one quantized CookedLinear: int8 weight codes + scales as buffers."""

    def __init__(self, lin: CookedLinear):
        super().__init__()
        wq, iq = lin.weight_quant, lin.input_quant
        with torch.no_grad():
            w = lin.weight if lin.weight_mask is None else lin.weight * lin.weight_mask
            codes, scale = wq.quantize(w.detach().float())
        self.register_buffer("qweight", codes)
        self.register_buffer("wscale", scale.contiguous())
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().float().clone())
        self.group = wq.group_size
        self.mode = (None if iq is None else "token" if isinstance(iq, TokenQuant) else
                     "dynamic" if isinstance(iq, DynamicTensorQuant) else "tensor")
        self.act_bits = getattr(iq, "bits", 8)
        smooth = getattr(iq, "smooth", None)
        self.register_buffer("inv_smooth", None if smooth is None else (1.0 / smooth.detach().float()))
        if isinstance(iq, TensorQuant):
            if not iq.calibrated:
                raise FxcookError("export: a static activation quantizer was never calibrated "
                                  "(run fxcook.quant.calibrate first)")
            self.register_buffer("ascale", iq.scale.detach().abs().float().reshape(()).clone())
            self.register_buffer("qweight_t", codes.t().contiguous())
        elif isinstance(iq, DynamicTensorQuant):
            self.register_buffer("qweight_t", codes.t().contiguous())
        elif iq is not None and not isinstance(iq, TokenQuant):
            raise NotSupportedYet(f"export: input quantizer {type(iq).__name__} has no ONNX lowering")
        if self.mode is not None and self.group is not None:
            raise NotSupportedYet("export: group-wise weights with quantized activations (use weight-only)")

    def weight(self) -> torch.Tensor:
        if self.group is not None:
            return torch.ops.fxcook.dequantize_groups(self.qweight, self.wscale, self.group)
        return torch.ops.fxcook.dequantize(self.qweight, self.wscale, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        if self.mode == "token":
            codes, s = torch.ops.fxcook.quantize_per_token(x, self.act_bits)
            return torch.ops.fxcook.matmul_integer_to_float(codes, s, self.qweight, self.wscale, self.bias)
        if self.mode == "dynamic":
            return torch.ops.fxcook.dynamic_quantize_matmul(x, self.qweight_t, self.wscale, self.bias)
        if self.mode == "tensor":
            # Q/DQ on both GEMM inputs; the weight as a [in, out] int8 initializer quantized per
            # output channel (axis 1), so DequantizeLinear feeds MatMul directly and ORT fuses it.
            q = torch.ops.fxcook.quantize(x, self.ascale, 0, self.act_bits)
            x = torch.ops.fxcook.dequantize(q, self.ascale, 0)
            y = torch.matmul(x, torch.ops.fxcook.dequantize(self.qweight_t, self.wscale, 1))
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight(), self.bias)


@contextlib.contextmanager
def lowered(cooked: nn.Module):
    """`cooked` with its quantized CookedLinears swapped for QuantLinearExport modules (and its expert
    quantizers for their export forms), in eval mode, for the duration of the block; everything is
    put back afterwards (no copy of the weights)."""
    import fxcook.ops.quant  # registers the fxcook:: ops
    from fxcook.quant_experts import lowered_experts

    fxcook.ops.quant.add_grouped_mm_translation()
    swapped = []
    modes = [(m, m.training) for m in cooked.modules()]
    try:
        for path, mod in list(cooked.named_modules()):
            if isinstance(mod, (CookedLinear, CookedEmbedding)) and mod.weight_quant is not None:
                parent, _, name = path.rpartition(".")
                owner = cooked.get_submodule(parent)
                export = QuantLinearExport if isinstance(mod, CookedLinear) else EmbeddingInt8Export
                setattr(owner, name, export(mod))
                swapped.append((owner, name, mod))
        cooked.eval()
        with lowered_experts(cooked):
            yield cooked
    finally:
        for owner, name, mod in swapped:
            setattr(owner, name, mod)
        for m, training in modes:
            m.training = training


def _output_names(out: Any) -> list[str]:
    if isinstance(out, torch.Tensor):
        return ["output"]
    if hasattr(out, "keys"):
        return [k for k in out.keys() if isinstance(out[k], torch.Tensor)]
    return [f"output_{i}" for i in range(len(out))]


class _Flat(nn.Module):
    """Positional tensors in, a flat tuple of tensors out: the signature ONNX inputs/outputs need
    (re-exporting an unflattened module directly trips over its own pytree specs)."""

    def __init__(self, model: nn.Module, n_args: int, keys: list[str]):
        super().__init__()
        self.model, self.n_args, self.keys = model, n_args, keys
        self.training = model.training  # the wrapper adds no mode of its own

    def forward(self, *inputs):
        out = self.model(*inputs[:self.n_args], **dict(zip(self.keys, inputs[self.n_args:])))
        if isinstance(out, torch.Tensor):
            return (out,)
        if hasattr(out, "keys"):
            return tuple(out[k] for k in out.keys() if isinstance(out[k], torch.Tensor))
        return tuple(out)


def export(cooked: nn.Module, path: str | os.PathLike, example_inputs: Any = None, *, opset: int = 20,
           dynamic: bool = True, optimize: bool = True) -> Path:
    """Write `cooked` as an ONNX model ONNX Runtime runs with integer GEMMs; returns the path.

    `example_inputs`: a batch the model accepts (dict of keyword tensors, tuple or tensor).
    Batch and sequence dims of every input are dynamic unless `dynamic=False`. The file is written
    atomically (a temporary file renamed into place).
    """
    from fxcook.ops import load_all

    if example_inputs is None:
        raise FxcookError("export needs example_inputs (a batch the model accepts) to trace the graph")
    path = Path(path)
    args, kwargs = split_inputs(example_inputs)
    try:
        with lowered(cooked) as low, torch.no_grad():
            names = _output_names(low(*args, **kwargs))
            flat = (*args, *kwargs.values())
            shapes = {"inputs": tuple(dynamic_spec(t) for t in flat)} if dynamic else None
            input_names = [f"input_{i}" for i in range(len(args))] + list(kwargs)
            program = torch.onnx.export(_Flat(low, len(args), list(kwargs)), flat, dynamo=True,
                                        opset_version=opset, dynamic_shapes=shapes, input_names=input_names,
                                        output_names=names, optimize=optimize,
                                        custom_translation_table=load_all(), verbose=False)
    except FxcookError:
        raise
    except Exception as exc:
        cause = _fxcook_cause(exc)
        if cause is not None:  # e.g. NotSupportedYet from an op translation, wrapped by the exporter
            raise cause from exc
        raise FxcookError(f"ONNX export of {type(cooked).__name__} failed: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from exc
    model = program.model_proto
    _share_initializers(model)
    _name_dynamic_axes(model)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    if not any(o.domain == "com.microsoft" for o in model.opset_import) and any(
            n.domain == "com.microsoft" for n in model.graph.node):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    _save_atomic(model, path)
    return path


def _fxcook_cause(exc: BaseException) -> FxcookError | None:
    """The first fxcook error in `exc`'s chain of causes, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, FxcookError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _share_initializers(model: onnx.ModelProto) -> None:
    """Point every use of an initializer at the first one with identical contents.

    Linears that read the same input (q, k, v) carry equal SmoothQuant factors as separate buffers;
    once they are one initializer, ONNX Runtime's common-subexpression elimination scales and
    quantizes that input once for all of them.
    """
    graph, first, rename = model.graph, {}, {}
    for init in graph.initializer:
        if not init.dims:  # scalars (static activation scales) stay apart: shared Q/DQ pairs would not fuse
            continue
        key = (init.data_type, tuple(init.dims), init.raw_data or init.SerializeToString())
        rename[init.name] = first.setdefault(key, init.name)
    dupes = {k for k, v in rename.items() if k != v}
    if not dupes:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in dupes:
                node.input[i] = rename[name]
    kept = [i for i in graph.initializer if i.name not in dupes]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _name_dynamic_axes(model: onnx.ModelProto) -> None:
    """Call the symbolic dims of the inputs (and the outputs sharing them) batch and sequence."""
    rename = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        for i, label in zip(range(min(len(dims), 2)), ("batch", "sequence")):
            if dims[i].dim_param:
                rename.setdefault(dims[i].dim_param, label)
    for value in [*model.graph.input, *model.graph.output]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]


def _save_atomic(model: onnx.ModelProto, path: Path) -> None:
    from fxcook.checkpoint import write_atomic

    write_atomic(path, lambda tmp: onnx.save_model(model, tmp))


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
