"""`fxcook::` quantization ops with fake kernels (their ONNX translations: `fxcook.runtime.onnx.translations.quant`).

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

"""

from __future__ import annotations

from typing import Optional

import torch

from fxcook.qview import EPS, absmax_scale

__all__ = [
    "quantize",
    "dequantize",
    "quantize_per_token",
    "matmul_integer_to_float",
    "dynamic_quantize_matmul",
    "dequantize_groups",
    "TOKEN_ZERO_POINT",
]

TOKEN_ZERO_POINT = 128  # per-token codes are stored as uint8 = int8 + 128


def code_range(bits: int) -> tuple[int, int]:
    """Symmetric saturation bounds (+-127 at 8 bits), as `fxcook.passes.quantize.quantizers.fake_quant` clamps."""
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
    lo, hi = code_range(bits)
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
    s = absmax_scale(x, qm)
    codes = torch.clamp(torch.round(x * (1.0 / s)), -qm, qm) + TOKEN_ZERO_POINT
    return codes.to(torch.uint8), s


@quantize_per_token.register_fake
def _(x, bits):
    return torch.empty_like(x, dtype=torch.uint8), x.new_empty(*x.shape[:-1], 1)


@torch.library.custom_op("fxcook::matmul_integer_to_float", mutates_args=())
def matmul_integer_to_float(
    codes: torch.Tensor,
    row_scale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
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
def dynamic_quantize_matmul(
    x: torch.Tensor, qweight_t: torch.Tensor, wscale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """(q(x) - zp) @ qweight_t * (s * wscale) + bias with q, s, zp of DynamicQuantizeLinear over all of x.

    x: float [..., K]; qweight_t: int8 [K, N]; wscale [N]; bias [N] or None; exact int32 accumulation.
    """
    lo, hi = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
    s = ((hi - lo) / 255.0).clamp(min=EPS)
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
