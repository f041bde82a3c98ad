"""`fxcook::` quantization ops with fake kernels and their ONNX translations.

The ONNX exporter lowers each quantized CookedLinear to these ops, so the exported graph says
exactly which tensors are integer and with which scales, and each op maps 1:1 to ONNX:

- `quantize(x, scale, axis, bits)` / `dequantize(q, scale, axis)`: QuantizeLinear / DequantizeLinear,
  int8, zero-point 0 (per tensor, or per channel along `axis`). Static activations and weights.
- `quantize_per_token(x, bits)` -> (codes, scale): dynamic per-token symmetric quantization.
  The codes are returned as uint8 = int8 + 128 because ONNX Runtime's u8 x s8 integer GEMM is ~4x
  faster on x86 than s8 x s8 (measured on MiniLM); the values are the symmetric int8 codes.
- `matmul_integer_to_float(codes, row_scale, qweight, wscale, bias)`: integer GEMM with float
  rescale, emitted as ONNX Runtime's `com.microsoft.MatMulIntegerToFloat` followed by the per-token
  scale. ONNX has no per-row dynamic quantization that ORT fuses (its MatMulIntegerToFloat takes a
  scalar A scale), so the per-token scale is applied to the GEMM output instead.
- `dynamic_quantize_matmul(x, qweight_t, wscale, bias)`: dynamic per-tensor activations
  (DynamicQuantizeLinear's uint8 arithmetic) times the int8 `[in, out]` weight with per-column
  scales, emitted as ONNX Runtime's `com.microsoft.DynamicQuantizeMatMul`: one kernel that finds
  the range, quantizes, runs the integer GEMM and rescales with the bias added.
- `dequantize_groups(q, scale, group)`: group-wise weight dequantization for low-bit weight-only.

`add_grouped_mm_translation()` also registers a translation of transformers' grouped expert GEMM
(`transformers::grouped_mm_fallback`), which captured HF MoE models (quantized experts or not) call.
"""
from __future__ import annotations

from typing import Optional

import onnx
import torch
from onnxscript import FLOAT, INT8, INT32, INT64, UINT8, opset20 as op

from . import ONNX_TRANSLATIONS, ort_op

__all__ = ["quantize", "dequantize", "quantize_per_token", "matmul_integer_to_float", "dynamic_quantize_matmul",
           "dequantize_groups", "add_grouped_mm_translation", "TOKEN_ZERO_POINT"]

TOKEN_ZERO_POINT = 128  # per-token codes are stored as uint8 = int8 + 128
_EPS = 1e-8
ORT_MATMUL_INTEGER_TO_FLOAT = ort_op("MatMulIntegerToFloat")
ORT_DYNAMIC_QUANTIZE_MATMUL = ort_op("DynamicQuantizeMatMul")


def _range(bits: int) -> tuple[int, int]:
    """Symmetric saturation bounds (+-127 at 8 bits), as `fxcook.quant.fake_quant` clamps."""
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1


def _bcast(scale: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    if scale.numel() == 1:
        return scale.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


@torch.library.custom_op("fxcook::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor, axis: int, bits: int) -> torch.Tensor:
    """int8 codes round_half_even(x / scale), saturated; scale scalar/[1] or 1-D along `axis`."""
    lo, hi = _range(bits)
    return torch.clamp(torch.round(x / _bcast(scale, x.dim(), axis)), lo, hi).to(torch.int8)


@quantize.register_fake
def _(x, scale, axis, bits):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("fxcook::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """float q * scale; scale scalar/[1] or 1-D along `axis`."""
    return q.to(torch.float32) * _bcast(scale, q.dim(), axis)


@dequantize.register_fake
def _(q, scale, axis):
    return torch.empty_like(q, dtype=torch.float32)


@torch.library.custom_op("fxcook::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes = round(x / s) + 128, s [..., 1]) with s = max|x| / qmax over the last dim."""
    qm = 2 ** (bits - 1) - 1
    s = (x.abs().amax(dim=-1, keepdim=True) / qm).clamp(min=_EPS)
    codes = torch.clamp(torch.round(x * (1.0 / s)), -qm, qm) + TOKEN_ZERO_POINT
    return codes.to(torch.uint8), s


@quantize_per_token.register_fake
def _(x, bits):
    return torch.empty_like(x, dtype=torch.uint8), x.new_empty(*x.shape[:-1], 1)


@torch.library.custom_op("fxcook::matmul_integer_to_float", mutates_args=())
def matmul_integer_to_float(codes: torch.Tensor, row_scale: torch.Tensor, qweight: torch.Tensor,
                            wscale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """((codes - 128) @ qweight^T) * wscale * row_scale + bias, exact int32 accumulation.

    codes: uint8 [..., K]; row_scale [..., 1]; qweight int8 [N, K]; wscale [N]; bias [N] or None.
    """
    a = codes.to(torch.int32) - TOKEN_ZERO_POINT
    acc = (a.reshape(-1, a.shape[-1]).double() @ qweight.to(torch.float64).t()).reshape(*a.shape[:-1], -1)
    y = acc.float() * wscale * row_scale
    return y if bias is None else y + bias


@matmul_integer_to_float.register_fake
def _(codes, row_scale, qweight, wscale, bias):
    return codes.new_empty(*codes.shape[:-1], qweight.shape[0], dtype=torch.float32)


@torch.library.custom_op("fxcook::dynamic_quantize_matmul", mutates_args=())
def dynamic_quantize_matmul(x: torch.Tensor, qweight_t: torch.Tensor, wscale: torch.Tensor,
                            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """(q(x) - zp) @ qweight_t * (s * wscale) + bias with q, s, zp of DynamicQuantizeLinear over all of x.

    x: float [..., K]; qweight_t: int8 [K, N]; wscale [N]; bias [N] or None; exact int32 accumulation.
    """
    lo, hi = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
    s = ((hi - lo) / 255.0).clamp(min=_EPS)
    zp = torch.clamp(torch.round(-lo / s), 0, 255)
    a = torch.clamp(torch.round(x / s) + zp, 0, 255) - zp
    acc = (a.reshape(-1, a.shape[-1]).double() @ qweight_t.to(torch.float64)).reshape(*a.shape[:-1], -1)
    y = acc.float() * (s * wscale)
    return y if bias is None else y + bias


@dynamic_quantize_matmul.register_fake
def _(x, qweight_t, wscale, bias):
    return x.new_empty(*x.shape[:-1], qweight_t.shape[1])


@torch.library.custom_op("fxcook::dequantize_groups", mutates_args=())
def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """float weight [N, K] from int8 codes [N, K] and one scale per `group` columns ([N, K/group])."""
    n, k = q.shape
    return (q.to(torch.float32).reshape(n, k // group, group) * scale.unsqueeze(-1)).reshape(n, k)


@dequantize_groups.register_fake
def _(q, scale, group):
    return torch.empty_like(q, dtype=torch.float32)


# --- ONNX translations -------------------------------------------------------------------------

def quantize_onnx(x: FLOAT, scale: FLOAT, axis: int, bits: int) -> INT8:
    lo, hi = _range(bits)
    if bits == 8:
        # QuantizeLinear saturates to [-128, 127]; raise x to -127 * scale first (a float Max keeps
        # Q -> DQ adjacent, which ORT's GEMM fusion needs; an int8 Clip between them blocks it).
        # Exported activation scales are per tensor, so the bound broadcasts.
        x = op.Max(x, op.Mul(scale, op.Constant(value_float=float(lo))))
    q = op.QuantizeLinear(x, scale, op.Constant(value=_scalar(0, onnx.TensorProto.INT8)), axis=axis)
    if bits == 8:
        return q
    return op.Clip(q, op.Constant(value=_scalar(lo, onnx.TensorProto.INT8)),
                   op.Constant(value=_scalar(hi, onnx.TensorProto.INT8)))


def dequantize_onnx(q: INT8, scale: FLOAT, axis: int) -> FLOAT:
    # No zero-point input: it defaults to 0 of q's type (int8), whatever the scale's shape.
    return op.DequantizeLinear(q, scale, axis=axis)


def quantize_per_token_onnx(x: FLOAT, bits: int):
    # max|x| as max(max x, -min x): two reads of x and no |x| tensor written; x * (1/s) instead of x / s.
    axes = op.Constant(value_ints=[-1])
    amax = op.Max(op.ReduceMax(x, axes, keepdims=1), op.Neg(op.ReduceMin(x, axes, keepdims=1)))
    s = op.Max(op.Mul(amax, op.Constant(value_float=1.0 / (2 ** (bits - 1) - 1))), op.Constant(value_float=_EPS))
    zp = op.Constant(value=_scalar(TOKEN_ZERO_POINT, onnx.TensorProto.UINT8))
    codes = op.QuantizeLinear(op.Mul(x, op.Reciprocal(s)), op.Constant(value_float=1.0), zp)
    return codes, s


def matmul_integer_to_float_onnx(codes: UINT8, row_scale: FLOAT, qweight: INT8, wscale: FLOAT,
                                 bias: Optional[FLOAT]) -> FLOAT:
    zp = op.Constant(value=_scalar(TOKEN_ZERO_POINT, onnx.TensorProto.UINT8))
    y = ORT_MATMUL_INTEGER_TO_FLOAT(codes, op.Transpose(qweight, perm=[1, 0]), op.Constant(value_float=1.0),
                                    wscale, zp)
    y = op.Mul(y, row_scale)
    return y if bias is None else op.Add(y, bias)


def dynamic_quantize_matmul_onnx(x: FLOAT, qweight_t: INT8, wscale: FLOAT, bias: Optional[FLOAT]) -> FLOAT:
    return ORT_DYNAMIC_QUANTIZE_MATMUL(x, qweight_t, wscale, None, bias)


def dequantize_groups_onnx(q: INT8, scale: FLOAT, group: int) -> FLOAT:
    n_k = op.Shape(q)
    grouped = op.Reshape(op.Cast(q, to=FLOAT.dtype), op.Concat(op.Shape(scale), op.Constant(value_ints=[group]), axis=0))
    return op.Reshape(op.Mul(grouped, op.Unsqueeze(scale, op.Constant(value_ints=[-1]))), n_k)


def grouped_mm_onnx(x: FLOAT, w: FLOAT, offs: INT32) -> FLOAT:
    # x [S, K] sorted by expert, w [E, K, N], offs [E] cumulative row counts. Every expert's GEMM over
    # all rows, then each row keeps its own expert's: exact, at E times the routed FLOPs (a correctness
    # lowering; ORT has no grouped GEMM). Row s belongs to expert #{e : offs[e] <= s}.
    y = op.MatMul(op.Unsqueeze(x, op.Constant(value_ints=[0])), w)  # [E, S, N]
    s = op.Squeeze(op.Shape(x, start=0, end=1), op.Constant(value_ints=[0]))
    rows = op.Range(op.Constant(value_int=0), s, op.Constant(value_int=1))
    past = op.GreaterOrEqual(op.Unsqueeze(rows, op.Constant(value_ints=[1])),
                             op.Unsqueeze(op.Cast(offs, to=INT64.dtype), op.Constant(value_ints=[0])))
    last = op.Sub(op.Shape(w, start=0, end=1), op.Constant(value_ints=[1]))
    expert = op.Min(op.ReduceSum(op.Cast(past, to=INT64.dtype), op.Constant(value_ints=[1]), keepdims=0), last)
    index = op.Expand(op.Reshape(expert, op.Constant(value_ints=[1, -1, 1])),
                      op.Concat(op.Constant(value_ints=[1]), op.Shape(y, start=1), axis=0))
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


ONNX_TRANSLATIONS.update({
    torch.ops.fxcook.quantize.default: quantize_onnx,
    torch.ops.fxcook.dequantize.default: dequantize_onnx,
    torch.ops.fxcook.quantize_per_token.default: quantize_per_token_onnx,
    torch.ops.fxcook.matmul_integer_to_float.default: matmul_integer_to_float_onnx,
    torch.ops.fxcook.dynamic_quantize_matmul.default: dynamic_quantize_matmul_onnx,
    torch.ops.fxcook.dequantize_groups.default: dequantize_groups_onnx,
})
