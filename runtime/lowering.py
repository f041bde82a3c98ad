"""Every lowering of a cooked model to its export form, in one table read by the ONNX and TensorRT exports.

Training-time modules compute compression in float (fake quantization, masks, routed experts in torch);
their export forms compute the same values with fxcook's ops (`passes/*/ops.py`), which the ONNX
translations map 1:1 to integer kernels:

- a quantized `CookedLinear` -> `QuantLinearExport` (int8 weight codes + scales, integer GEMM ops);
- a quantized `CookedEmbedding` -> `EmbeddingInt8Export` (Gather on int8 rows and their scales);
- a quantized HF expert weight / its GEMM's token operand -> `ExpertWeightExport` / `ExpertInputExport`;
- a `MoEFFN` -> `MoEFFNExport` (the routed FFN as one `fxcook::moe_ffn` op).

No model module asks whether it is being exported: `lowered` swaps the modules for the block's duration.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from fxcook.errors import FxcookError, NotSupportedYet, PassError
from fxcook.nn import CookedEmbedding, CookedLinear, param_quants
from fxcook.passes.moefy import ops as _moe_ops  # noqa: F401  (registers fxcook::moe_ffn, called below)
from fxcook.passes.moefy.routed import MoEFFN
from fxcook.passes.quantize.experts import ExpertInputQuant, ExpertWeightQuant, safe_name
from fxcook.passes.quantize.ops import TOKEN_ZERO_POINT
from fxcook.passes.quantize.quantizers import DynamicTensorQuant, TensorQuant, TokenQuant
from fxcook.qview import quant_view
from fxcook.tracing import parent_of

__all__ = [
    "EmbeddingInt8Export",
    "ExpertInputExport",
    "ExpertWeightExport",
    "Flat",
    "MoEFFNExport",
    "QuantLinearExport",
    "lowered",
]


class QuantLinearExport(nn.Module):
    """The integer form of one quantized CookedLinear: int8 weight codes + scales as buffers."""

    def __init__(self, lin: CookedLinear):
        super().__init__()
        try:
            view = quant_view(lin)
        except FxcookError as e:
            raise type(e)(f"export: {e}") from None
        self.register_buffer("qweight", view.codes)
        self.register_buffer("wscale", view.scale)
        self.register_buffer("bias", view.bias)
        self.group, self.mode, self.act_bits = view.group, view.act, view.act_bits
        self.register_buffer("inv_smooth", view.inv_smooth)
        self.register_buffer("ascale", view.act_scale)
        self.register_buffer("qweight_t", view.codes.t().contiguous() if view.act in ("tensor", "dynamic") else None)
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


class EmbeddingInt8Export(nn.Module):
    """The ONNX form of a quantized CookedEmbedding: Gather on the int8 table and on the row scales."""

    def __init__(self, emb: CookedEmbedding):
        super().__init__()
        view = quant_view(emb)
        self.register_buffer("qweight", view.codes)
        self.register_buffer("scale", view.scale.reshape(-1).contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        scale = F.embedding(ids, self.scale.unsqueeze(-1))
        return F.embedding(ids, self.qweight).to(torch.float32) * scale


class ExpertWeightExport(nn.Module):
    """A quantized expert weight as int8 `[E*out, in]` codes + per-row scales (DequantizeLinear, axis
    0 in ONNX, or per group); returns the dequantized weight in the parameter's own layout."""

    def __init__(self, quant: ExpertWeightQuant, weight: torch.Tensor):
        super().__init__()
        codes, scale = quant.quantize(weight.detach().float())
        self.shape = tuple(codes.shape)  # [E, out, in]
        self.reduce_dim, self.group = quant.reduce_dim, quant.group_size
        self.register_buffer("qweight", codes.reshape(-1, self.shape[-1]).contiguous())
        self.register_buffer(
            "wscale",
            scale.reshape(self.qweight.shape[0], -1).squeeze(-1).contiguous()
            if self.group is None
            else scale.reshape(self.qweight.shape[0], -1).contiguous(),
        )

    def forward(self, w: torch.Tensor) -> torch.Tensor:  # the float parameter is not read
        if self.group is not None:
            rows = torch.ops.fxcook.dequantize_groups(self.qweight, self.wscale, self.group)
        else:
            rows = torch.ops.fxcook.dequantize(self.qweight, self.wscale, 0)
        canon = rows.reshape(self.shape)
        return canon if self.reduce_dim == 2 else canon.transpose(1, 2)


class ExpertInputExport(nn.Module):
    """An expert GEMM's token operand quantized to integer codes (fxcook's ops) and rescaled in float."""

    def __init__(self, quant: nn.Module):
        super().__init__()
        if isinstance(quant, TensorQuant):
            if not quant.calibrated:
                raise PassError(
                    "export: a static expert activation quantizer was never calibrated "
                    "(run fxcook.passes.quantize.quantizers.calibrate first)"
                )
            self.register_buffer("ascale", quant.scale.detach().abs().float().reshape(()).clone())
        elif not isinstance(quant, (TokenQuant, DynamicTensorQuant)):
            raise NotSupportedYet(f"export: expert input quantizer {type(quant).__name__} has no ONNX lowering")
        self.quant = quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.quant, TokenQuant):
            codes, s = torch.ops.fxcook.quantize_per_token(x, self.quant.bits)
            return (codes.to(torch.float32) - TOKEN_ZERO_POINT) * s
        if isinstance(self.quant, TensorQuant):
            # int8 codes times the scale as a float Mul, not DequantizeLinear: ORT's QDQ fusions around
            # the expert GEMM changed the results (3% off); no Q -> DQ pair means none applies
            return torch.ops.fxcook.quantize(x, self.ascale, 0, self.quant.bits).to(torch.float32) * self.ascale
        return self.quant(x)  # DynamicQuantizeLinear's arithmetic as plain float ops


@contextlib.contextmanager
def lowered_experts(model: nn.Module):
    """`model` with its expert quantizers swapped for their export forms for the block's duration."""
    swapped = []
    try:
        for path, quant in param_quants(model).items():
            owner, attr = parent_of(model, path)
            for name, mod in list(owner.named_children()):
                if mod is quant:
                    setattr(owner, name, ExpertWeightExport(quant, getattr(owner, attr)))
                    swapped.append((owner, name, mod))
                elif isinstance(mod, ExpertInputQuant) and name == f"{safe_name(attr)}_input_quant":
                    setattr(owner, name, ExpertInputExport(mod.quant))
                    swapped.append((owner, name, mod))
        yield model
    finally:
        for owner, name, mod in swapped:
            setattr(owner, name, mod)


class MoEFFNExport(nn.Module):
    """A `MoEFFN` as one `fxcook::moe_ffn` op (ONNX Runtime's MoE / QMoE), the same routed computation."""

    def __init__(self, moe: MoEFFN):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.moe
        x2 = x.reshape(-1, x.shape[-1])
        gate = m.gate
        out = torch.ops.fxcook.moe_ffn(
            m.quant_in(x2),
            m.scores(x2),
            m.up.effective_weight(),
            m.up.bias,
            None if gate is None else gate.effective_weight(),
            None if gate is None else gate.bias,
            m.down.effective_weight(),
            m.down.bias,
            m.top_k,
            m.act,
            m.weight_bits,
        )
        return out.reshape(*x.shape[:-1], out.shape[-1])


EXPORT_FORMS = (  # (module type, is it lowered, export form)
    (CookedLinear, lambda m: m.weight_quant is not None, QuantLinearExport),
    (CookedEmbedding, lambda m: m.weight_quant is not None, EmbeddingInt8Export),
    (MoEFFN, lambda m: True, MoEFFNExport),
)


def _export_form(mod: nn.Module) -> nn.Module | None:
    for kind, applies, form in EXPORT_FORMS:
        if isinstance(mod, kind) and applies(mod):
            return form(mod)
    return None


@contextlib.contextmanager
def lowered(cooked: nn.Module):
    """`cooked` with every module of `EXPORT_FORMS` (and its expert quantizers) swapped for its export
    form, in eval mode, for the duration of the block; everything is put back afterwards (no copy of
    the weights). A root that is itself lowered (a bare MoEFFN) is yielded in its export form."""
    from fxcook.runtime.onnx.translations.quant import add_grouped_mm_translation

    add_grouped_mm_translation()
    swapped = []
    modes = [(m, m.training) for m in cooked.modules()]
    try:
        for path, mod in list(cooked.named_modules()):
            form = _export_form(mod) if path else None  # the root itself: below
            if form is not None:
                owner, name = parent_of(cooked, path)
                setattr(owner, name, form)
                swapped.append((owner, name, mod))
        cooked.eval()
        with lowered_experts(cooked):
            yield _export_form(cooked) or cooked
    finally:
        for owner, name, mod in reversed(swapped):
            setattr(owner, name, mod)
        for m, training in modes:
            m.training = training


class Flat(nn.Module):
    """Positional tensors in, a flat tuple of tensors out: the signature ONNX inputs/outputs need
    (re-exporting an unflattened module directly trips over its own pytree specs)."""

    def __init__(self, model: nn.Module, n_args: int, keys: list[str]):
        super().__init__()
        self.model, self.n_args, self.keys = model, n_args, keys
        self.training = model.training  # the wrapper adds no mode of its own

    def forward(self, *inputs):
        out = self.model(*inputs[: self.n_args], **dict(zip(self.keys, inputs[self.n_args :])))
        if isinstance(out, torch.Tensor):
            return (out,)
        if hasattr(out, "keys"):
            return tuple(out[k] for k in out.keys() if isinstance(out[k], torch.Tensor))
        return tuple(out)
