"""ONNX export of a CookedModel as an integer ONNX model.

For the export, the model is lowered (`fxcook.runtime.lowering.lowered`: each quantized CookedLinear is
swapped for a module that calls fxcook's own ops, `fxcook.passes.quantize.ops`, and put back afterwards);
the translations (`fxcook.runtime.onnx.translations`) emit:

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
- quantized HF MoE expert weights (`fxcook.passes.quantize.experts`): int8 `[E*out, in]` initializers with
  DequantizeLinear (axis 0), the GEMM's token operand through Q/DQ, and transformers' grouped expert
  GEMM as a float MatMul over all experts with a per-row select (exact, not fast).

Batch and sequence axes stay dynamic; the IR version is capped at what ONNX Runtime accepts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from fxcook.errors import FxcookError
from fxcook.runtime.lowering import Flat, lowered
from fxcook.runtime.onnx.translations import load_all
from fxcook.tracing import dynamic_spec, split_inputs

__all__ = ["MAX_IR_VERSION", "export"]

MAX_IR_VERSION = 10  # ONNX Runtime 1.20+ loads IR <= 10; onnx 1.23's make_model writes newer


def _output_names(out: Any) -> list[str]:
    if isinstance(out, torch.Tensor):
        return ["output"]
    if hasattr(out, "keys"):
        return [k for k in out.keys() if isinstance(out[k], torch.Tensor)]
    return [f"output_{i}" for i in range(len(out))]


def export(
    cooked: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any = None,
    *,
    opset: int = 20,
    dynamic: bool = True,
    optimize: bool = True,
) -> Path:
    """Write `cooked` as an ONNX model ONNX Runtime runs with integer GEMMs; returns the path.

    `example_inputs`: a batch the model accepts (dict of keyword tensors, tuple or tensor).
    Batch and sequence dims of every input are dynamic unless `dynamic=False`. The file is written
    atomically (a temporary file renamed into place).
    """
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
            program = torch.onnx.export(
                Flat(low, len(args), list(kwargs)),
                flat,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=shapes,
                input_names=input_names,
                output_names=names,
                optimize=optimize,
                custom_translation_table=load_all(),
                verbose=False,
            )
    except FxcookError:
        raise
    except Exception as exc:
        cause = _fxcook_cause(exc)
        if cause is not None:  # e.g. NotSupportedYet from an op translation, wrapped by the exporter
            raise cause from exc
        raise FxcookError(
            f"ONNX export of {type(cooked).__name__} failed: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        ) from exc
    model = program.model_proto
    _share_initializers(model)
    _name_dynamic_axes(model)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    if not any(o.domain == "com.microsoft" for o in model.opset_import) and any(
        n.domain == "com.microsoft" for n in model.graph.node
    ):
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
