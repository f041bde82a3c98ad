"""ONNX translations of the `fxcook::` quantization ops (`fxcook.passes.quantize.ops`), 1:1 to ONNX and
ONNX Runtime contrib ops; `add_grouped_mm_translation()` also registers a translation of transformers' grouped
expert GEMM (`transformers::grouped_mm_fallback`), which captured HF MoE models (quantized experts or not) call.
"""

from __future__ import annotations

from typing import Optional

import onnx
import torch
from onnxscript import FLOAT, INT8, INT32, INT64, UINT8
from onnxscript import opset20 as op

from fxcook.passes.quantize.ops import TOKEN_ZERO_POINT, code_range
from fxcook.qview import EPS
from fxcook.runtime.onnx.translations import ONNX_TRANSLATIONS, ort_op

ORT_MATMUL_INTEGER_TO_FLOAT = ort_op("MatMulIntegerToFloat")
ORT_DYNAMIC_QUANTIZE_MATMUL = ort_op("DynamicQuantizeMatMul")


def quantize_onnx(x: FLOAT, scale: FLOAT, axis: int, bits: int) -> INT8:
    lo, hi = code_range(bits)
    if bits == 8:
        # QuantizeLinear saturates to [-128, 127]; raise x to -127 * scale first (a float Max keeps
        # Q -> DQ adjacent, which ORT's GEMM fusion needs; an int8 Clip between them blocks it).
        # Exported activation scales are per tensor, so the bound broadcasts.
        x = op.Max(x, op.Mul(scale, op.Constant(value_float=float(lo))))
    q = op.QuantizeLinear(x, scale, op.Constant(value=_scalar(0, onnx.TensorProto.INT8)), axis=axis)
    if bits == 8:
        return q
    return op.Clip(
        q, op.Constant(value=_scalar(lo, onnx.TensorProto.INT8)), op.Constant(value=_scalar(hi, onnx.TensorProto.INT8))
    )


def dequantize_onnx(q: INT8, scale: FLOAT, axis: int) -> FLOAT:
    # No zero-point input: it defaults to 0 of q's type (int8), whatever the scale's shape.
    return op.DequantizeLinear(q, scale, axis=axis)


def quantize_per_token_onnx(x: FLOAT, bits: int):
    # max|x| as max(max x, -min x): two reads of x and no |x| tensor written; x * (1/s) instead of x / s.
    axes = op.Constant(value_ints=[-1])
    amax = op.Max(op.ReduceMax(x, axes, keepdims=1), op.Neg(op.ReduceMin(x, axes, keepdims=1)))
    s = op.Max(op.Mul(amax, op.Constant(value_float=1.0 / (2 ** (bits - 1) - 1))), op.Constant(value_float=EPS))
    zp = op.Constant(value=_scalar(TOKEN_ZERO_POINT, onnx.TensorProto.UINT8))
    codes = op.QuantizeLinear(op.Mul(x, op.Reciprocal(s)), op.Constant(value_float=1.0), zp)
    return codes, s


def matmul_integer_to_float_onnx(
    codes: UINT8, row_scale: FLOAT, qweight: INT8, wscale: FLOAT, bias: Optional[FLOAT]
) -> FLOAT:
    zp = op.Constant(value=_scalar(TOKEN_ZERO_POINT, onnx.TensorProto.UINT8))
    y = ORT_MATMUL_INTEGER_TO_FLOAT(codes, op.Transpose(qweight, perm=[1, 0]), op.Constant(value_float=1.0), wscale, zp)
    y = op.Mul(y, row_scale)
    return y if bias is None else op.Add(y, bias)


def dynamic_quantize_matmul_onnx(x: FLOAT, qweight_t: INT8, wscale: FLOAT, bias: Optional[FLOAT]) -> FLOAT:
    return ORT_DYNAMIC_QUANTIZE_MATMUL(x, qweight_t, wscale, None, bias)


def dequantize_groups_onnx(q: INT8, scale: FLOAT, group: int) -> FLOAT:
    n_k = op.Shape(q)
    grouped = op.Reshape(
        op.Cast(q, to=FLOAT.dtype), op.Concat(op.Shape(scale), op.Constant(value_ints=[group]), axis=0)
    )
    return op.Reshape(op.Mul(grouped, op.Unsqueeze(scale, op.Constant(value_ints=[-1]))), n_k)


def grouped_mm_onnx(x: FLOAT, w: FLOAT, offs: INT32) -> FLOAT:
    # x [S, K] sorted by expert, w [E, K, N], offs [E] cumulative row counts. Every expert's GEMM over
    # all rows, then each row keeps its own expert's: exact, at E times the routed FLOPs (a correctness
    # lowering; ORT has no grouped GEMM). Row s belongs to expert #{e : offs[e] <= s}.
    y = op.MatMul(op.Unsqueeze(x, op.Constant(value_ints=[0])), w)  # [E, S, N]
    s = op.Squeeze(op.Shape(x, start=0, end=1), op.Constant(value_ints=[0]))
    rows = op.Range(op.Constant(value_int=0), s, op.Constant(value_int=1))
    past = op.GreaterOrEqual(
        op.Unsqueeze(rows, op.Constant(value_ints=[1])),
        op.Unsqueeze(op.Cast(offs, to=INT64.dtype), op.Constant(value_ints=[0])),
    )
    last = op.Sub(op.Shape(w, start=0, end=1), op.Constant(value_ints=[1]))
    expert = op.Min(op.ReduceSum(op.Cast(past, to=INT64.dtype), op.Constant(value_ints=[1]), keepdims=0), last)
    index = op.Expand(
        op.Reshape(expert, op.Constant(value_ints=[1, -1, 1])),
        op.Concat(op.Constant(value_ints=[1]), op.Shape(y, start=1), axis=0),
    )
    return op.Squeeze(op.GatherElements(y, index, axis=0), op.Constant(value_ints=[0]))


def add_grouped_mm_translation() -> None:
    """Register `grouped_mm_onnx` for transformers' grouped GEMM once transformers has defined the op
    (importing its MoE integration here would add a second to every import of fxcook's ops)."""
    ns = getattr(torch.ops, "transformers", None)
    if ns is not None and hasattr(ns, "grouped_mm_fallback"):
        ONNX_TRANSLATIONS[ns.grouped_mm_fallback.default] = grouped_mm_onnx


def _scalar(v: int, dtype: int) -> onnx.TensorProto:
    """A scalar integer constant (zero points and clip bounds) of ONNX type `dtype`."""
    return onnx.helper.make_tensor("zp", dtype, [], [v])


ONNX_TRANSLATIONS.update(
    {
        torch.ops.fxcook.quantize.default: quantize_onnx,
        torch.ops.fxcook.dequantize.default: dequantize_onnx,
        torch.ops.fxcook.quantize_per_token.default: quantize_per_token_onnx,
        torch.ops.fxcook.matmul_integer_to_float.default: matmul_integer_to_float_onnx,
        torch.ops.fxcook.dynamic_quantize_matmul.default: dynamic_quantize_matmul_onnx,
        torch.ops.fxcook.dequantize_groups.default: dequantize_groups_onnx,
    }
)
