"""One integer view of a quantized weight, read by every consumer of it (checkpoints, ONNX, TensorRT,
torch CUDA), so none re-derives codes, scales, SmoothQuant divisor or mask on its own.

The quantizers are duck-typed (core never imports a technique): a weight quantizer has
`quantize(w) -> (codes, scale)`, `bits`, `group_size` and `q`; an activation quantizer says its
scheme in `kind` ("token", "tensor" static or "dynamic" per tensor), with `bits`, an optional
`smooth` divisor, and, when static, `scale` and `calibrated`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fxcook.errors import FxcookError, NotSupportedYet

__all__ = ["EPS", "ACT_SCHEMES", "QuantView", "absmax_scale", "quant_view"]

EPS = 1e-8  # smallest scale: an all-zero row quantizes to zeros instead of dividing by zero
ACT_SCHEMES = ("token", "tensor", "dynamic")


def absmax_scale(x: torch.Tensor, qmax: int) -> torch.Tensor:
    """Symmetric scale of each row of the last dimension (a token, an output channel, a group): max|x| / qmax."""
    return (x.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=EPS)


@dataclass(frozen=True)
class QuantView:
    """A quantized weight as integers: `weight = codes * scale` (per row, or per `group` columns)."""

    masked: torch.Tensor  # the float weight with its mask applied, as the quantizer saw it
    codes: torch.Tensor  # int8, shaped like the weight
    scale: torch.Tensor  # float32 [out] or [out, in/group]
    group: int | None
    bits: int
    bias: torch.Tensor | None  # float32
    act: str | None  # one of ACT_SCHEMES, or None (weight-only)
    act_bits: int
    act_scale: torch.Tensor | None  # 0-d float32, static per-tensor activations only
    inv_smooth: torch.Tensor | None  # float32 [in]: multiplies the input before it is quantized

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


def _act(iq: nn.Module | None) -> tuple[str | None, torch.Tensor | None]:
    if iq is None:
        return None, None
    kind = getattr(iq, "kind", None)
    if kind not in ACT_SCHEMES:
        raise NotSupportedYet(f"input quantizer {type(iq).__name__} has no integer form")
    if kind != "tensor":
        return kind, None
    if not iq.calibrated:
        raise FxcookError(
            "a static activation quantizer was never calibrated (run fxcook.passes.quantize.quantizers.calibrate first)"
        )
    return kind, iq.scale.detach().abs().float().reshape(()).clone()


@torch.no_grad()
def quant_view(module: nn.Module, acts: bool = True) -> QuantView:
    """The integer view of a quantized CookedLinear or CookedEmbedding (`weight_quant` set); `acts=False`
    leaves the activation scheme out (a checkpoint stores weights only, calibrated or not)."""
    wq, iq = module.weight_quant, getattr(module, "input_quant", None)
    if wq is None:
        raise FxcookError(f"quant_view: {type(module).__name__} has no weight quantizer")
    mask = getattr(module, "weight_mask", None)
    masked = (module.weight if mask is None else module.weight * mask).detach()
    codes, scale = wq.quantize(masked.float())
    act, act_scale = _act(iq) if acts else (None, None)
    bias = getattr(module, "bias", None)
    smooth = getattr(iq, "smooth", None)
    return QuantView(
        masked,
        codes,
        scale.contiguous(),
        wq.group_size,
        int(wq.bits),
        None if bias is None else bias.detach().float().clone(),
        act,
        int(getattr(iq, "bits", 8)),
        act_scale,
        None if smooth is None or not acts else 1.0 / smooth.detach().float(),
    )
