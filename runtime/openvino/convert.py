"""A CookedModel as an OpenVINO model.

The model is lowered exactly as for ONNX (`fxcook.runtime.lowering`, the one table of lowering
decisions) and exported with fxcook's ONNX translations; OpenVINO's ONNX frontend then reads the file.
The forms it receives are the ones its low-precision transformations (LPT) turn into int8 GEMMs:

- static per-tensor activations: QuantizeLinear -> DequantizeLinear on the GEMM input becomes a
  FakeQuantize, the int8 weight with its per-channel DequantizeLinear a dequantized int8 constant;
  LPT runs the FullyConnected layer on u8/i8 codes (VNNI / AMX kernels).
- per-token activations: ONNX Runtime's `MatMulIntegerToFloat`, which the frontend decomposes into
  the u8 codes feeding an int8 GEMM (the same values as fxcook's).
- weight-only int8: the int8 constant + per-channel scale (OpenVINO's weight compression form).
- per-tensor dynamic activations have no exact lowering: the frontend turns `DynamicQuantizeMatMul`
  into a weight-compressed GEMM whose activations the CPU plugin re-quantizes in its own scheme
  (per token group), so `convert` refuses them, naming the linears.
- routed experts (`MoEFFN`): OpenVINO has no routed-expert op the ONNX frontend reads, so they are
  lowered to their dense equivalent (`fxcook.runtime.openvino.translations`), exact, at E times the
  routed FLOPs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from fxcook.errors import FxcookError, NotSupportedYet
from fxcook.nn import CookedLinear
from fxcook.passes.quantize.experts import ExpertInputQuant
from fxcook.passes.quantize.quantizers import DynamicTensorQuant
from fxcook.runtime.openvino.translations import openvino_translations

__all__ = ["convert", "export", "require_openvino", "save"]

INSTALL_HINT = "pip install 'fxcook[openvino]' (or pip install openvino)"


def require_openvino():
    """The `openvino` module, or an error saying how to install it."""
    try:
        import openvino
    except ImportError as e:
        raise FxcookError(
            f"the OpenVINO backend needs the openvino package, which is not installed: {INSTALL_HINT}"
        ) from e
    return openvino


def convert(cooked: nn.Module, example_inputs: Any):
    """`cooked` as an `openvino.Model` (dynamic batch and sequence axes), the user's model untouched."""
    ov = require_openvino()
    from fxcook.runtime import onnx as fxonnx

    _check_lowerable(cooked)
    with tempfile.TemporaryDirectory(prefix="fxcook-ov-") as d, openvino_translations():
        path = fxonnx.export(cooked, Path(d) / "model.onnx", example_inputs=example_inputs)
        try:
            return ov.convert_model(str(path))
        except Exception as exc:  # OpenVINO raises its own OpConversionFailure / RuntimeError types
            raise _conversion_error(cooked, exc) from exc


def _per_tensor_dynamic(cooked: nn.Module) -> list[str]:
    """Paths of the linears (and expert GEMM inputs) whose activations are quantized per tensor, dynamically."""
    return [
        path
        for path, m in cooked.named_modules()
        if (isinstance(m, CookedLinear) and isinstance(m.input_quant, DynamicTensorQuant))
        or (isinstance(m, ExpertInputQuant) and isinstance(m.quant, DynamicTensorQuant))
    ]


def _check_lowerable(cooked: nn.Module) -> None:
    dynamic = _per_tensor_dynamic(cooked)
    if dynamic:
        shown = ", ".join(dynamic[:4]) + (f" (+{len(dynamic) - 4} more)" if len(dynamic) > 4 else "")
        raise NotSupportedYet(
            f"OpenVINO export: Quantize's per-tensor dynamic activations (acts int8/tensor/dynamic) at {shown} have "
            "no exact OpenVINO lowering (its CPU plugin would re-quantize them per token group); quantize with "
            "acts int8/tensor (static) or int8/token, or run this model in ONNX Runtime (fxcook.runtime.onnx)"
        )


def _conversion_error(cooked: nn.Module, exc: Exception) -> FxcookError:
    """Name the op OpenVINO could not read and the passes that produced the model."""
    passes = ", ".join(r.name for r in getattr(cooked, "history", [])) or "none"
    detail = next((ln.strip() for ln in str(exc).splitlines() if "not supported" in ln or "OpConversion" in ln), "")
    return FxcookError(
        f"OpenVINO could not read the lowered {type(cooked).__name__} (passes: {passes}): "
        f"{detail or str(exc).strip().splitlines()[0][:300]}; a pass whose export form uses this op has no "
        "OpenVINO lowering: run the model in ONNX Runtime (fxcook.runtime.onnx) instead"
    )


def save(model, path: str | os.PathLike) -> Path:
    """Write an `openvino.Model` as `path` (.xml) + its .bin beside it; both are written aside and
    renamed into place (the .bin first, so a reader of the .xml never sees a half-written pair)."""
    ov = require_openvino()
    xml = Path(path)
    if xml.suffix != ".xml":
        raise FxcookError(f"OpenVINO IR path {xml}: needs the .xml suffix (the weights go to {xml.stem}.bin beside it)")
    xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{xml.stem}.", dir=xml.parent) as d:
        tmp = Path(d) / xml.name
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)
    return xml


def export(cooked: nn.Module, path: str | os.PathLike, example_inputs: Any) -> Path:
    """Lower `cooked` and write it as OpenVINO IR (`path` .xml + .bin); returns the .xml path."""
    return save(convert(cooked, example_inputs), path)
