"""Fake quantizers: the modules `Quantize` puts on each CookedLinear's `weight_quant`/`input_quant`.

Weights: signed integers, symmetric, zero-point 0 (the scheme every runtime accepts), per output
channel (axis 0 of the `[out, in]` weight) or per group of `group_size` input columns for low-bit
weight-only. Activations: per token (symmetric, scales recomputed each call, BMCook's scheme), per
tensor with a static scale from calibration (min-max, percentile or MSE observers), or per tensor
dynamic (ONNX DynamicQuantizeLinear: uint8 over [min(x, 0), max(x, 0)], the form ONNX Runtime
runs as one `DynamicQuantizeMatMul` kernel).

Training uses a straight-through estimator on the rounding, so gradients reach the weights; with
learnable scales (LSQ) they reach the scales too. The same modules expose the integer form
(`WeightQuant.quantize`) that the ONNX exporter and checkpoints store.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from fxcook.errors import FxcookError
from fxcook.qview import EPS, absmax_scale
from fxcook.tracing import run_batches

__all__ = [
    "qmax",
    "fake_quant",
    "parse_weights",
    "parse_acts",
    "WeightQuant",
    "TokenQuant",
    "TensorQuant",
    "DynamicTensorQuant",
    "act_quantizer",
    "calibrate",
    "smooth_factors",
    "EPS",
]

OBSERVERS = ("minmax", "percentile", "mse")


def qmax(bits: int) -> int:
    """Largest code of a symmetric signed `bits`-bit integer (127 for int8); codes are [-qmax, qmax]."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise FxcookError(f"unsupported bit width {bits!r}: fxcook quantizes to 2..8 bits")
    return 2 ** (bits - 1) - 1


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """`clamp(round(x / scale), -q, q) * scale` with STE rounding; differentiable in x and scale (LSQ)."""
    q = qmax(bits)
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return _FakeQuant.apply(x, scale, q)
    return _quant_dequant(x, scale, q)


def _quant_dequant(x: torch.Tensor, scale: torch.Tensor, q: int) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), -q, q) * scale


class _FakeQuant(torch.autograd.Function):
    """The gradients autograd takes through `clamp(round_ste(x / s), -q, q) * s`, in a third of its
    passes over x (QAT's elementwise work outweighed the GEMMs of a small-batch CPU step): d/dx is 1
    where the code is not clamped, else 0; d/ds is `code - x / s` where not clamped, else the code +-q."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, q: int) -> torch.Tensor:
        ctx.save_for_backward(x, scale)
        ctx.q = q
        return _quant_dequant(x, scale, q)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scale = ctx.saved_tensors
        ratio = x / scale
        codes = torch.round(ratio)
        kept = codes.abs() <= ctx.q
        grad_x = grad * kept if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            codes = codes.clamp_(-ctx.q, ctx.q)
            grad_s = (grad * torch.where(kept, codes - ratio, codes)).sum_to_size(scale.shape)
        return grad_x, grad_s, None


def _grad_scaled(scale: torch.Tensor, factor: float) -> torch.Tensor:
    """Same value, gradient multiplied by `factor` (LSQ's step-size gradient scale)."""
    return (scale - scale * factor).detach() + scale * factor


@dataclass(frozen=True)
class WeightSpec:
    bits: int
    group_size: int | None  # None: one scale per output channel


@dataclass(frozen=True)
class ActSpec:
    bits: int
    granularity: str  # "token" or "tensor"
    dynamic: bool  # token: always; tensor: scale from each call (True) or from calibration (False)


def _check_bits(bits: int, key: str, spec: str) -> None:
    try:
        qmax(bits)
    except FxcookError as e:
        raise FxcookError(f"{key}: {spec!r}: {e}") from None


_WEIGHTS = re.compile(r"^int(\d)/(channel|group(\d+))$")
_ACTS = re.compile(r"^int(\d)/(token|tensor)(/dynamic)?$")


def parse_weights(spec: str) -> WeightSpec:
    """`int8/channel`, `int4/group128`, ... -> WeightSpec; errors name the accepted forms."""
    m = _WEIGHTS.match(spec.strip()) if isinstance(spec, str) else None
    if not m:
        raise FxcookError(
            f"weights: {spec!r} is not a weight scheme; use 'int<bits>/channel' or "
            f"'int<bits>/group<size>' with bits 2..8 (e.g. 'int8/channel', 'int4/group128')"
        )
    bits, group = int(m.group(1)), (int(m.group(3)) if m.group(3) else None)
    _check_bits(bits, "weights", spec)
    if group is not None and group < 2:
        raise FxcookError(f"weights: group size must be >= 2, got {group} in {spec!r}")
    return WeightSpec(bits, group)


def parse_acts(spec: str) -> ActSpec:
    """`int8/token` (dynamic per token), `int8/tensor` (static per tensor) or `int8/tensor/dynamic`
    (per tensor, scale from each call) -> ActSpec."""
    m = _ACTS.match(spec.strip()) if isinstance(spec, str) else None
    if not m or (m.group(2) == "token" and m.group(3)):
        raise FxcookError(
            f"acts: {spec!r} is not an activation scheme; use 'int<bits>/token' (dynamic), "
            f"'int<bits>/tensor' (static, calibrated), bits 2..8, 'int8/tensor/dynamic', "
            f"or null for weight-only"
        )
    bits, dynamic = int(m.group(1)), m.group(2) == "token" or bool(m.group(3))
    _check_bits(bits, "acts", spec)
    if m.group(2) == "tensor" and dynamic and bits != 8:
        raise FxcookError(
            f"acts: {spec!r}: dynamic per-tensor activations are 8-bit only "
            f"(ONNX DynamicQuantizeLinear is uint8); use 'int8/tensor/dynamic'"
        )
    return ActSpec(bits, m.group(2), dynamic)


class WeightQuant(nn.Module):
    """Fake-quantizes a `[out, in]` weight per output channel or per input-column group.

    Scales are absmax / qmax of each row (or group), recomputed from the weight each call, unless
    `learnable` (LSQ): then they are a Parameter initialised from the weight given at construction.
    """

    def __init__(
        self, bits: int = 8, group_size: int | None = None, learnable: bool = False, weight: torch.Tensor | None = None
    ):
        super().__init__()
        self.q = qmax(bits)
        self.bits = bits
        self.group_size = group_size
        self.learnable = learnable
        if learnable:
            if weight is None:
                raise FxcookError("WeightQuant(learnable=True) needs the weight to initialise its scales")
            self.scale = nn.Parameter(self.absmax_scale(weight.detach()))

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        if self.group_size is None:
            return w
        out, inp = w.shape
        if inp % self.group_size:
            raise FxcookError(f"group size {self.group_size} does not divide the input width {inp}")
        return w.reshape(out, inp // self.group_size, self.group_size)

    def absmax_scale(self, w: torch.Tensor) -> torch.Tensor:
        """Scales shaped to broadcast against the (grouped) weight: [out, 1] or [out, in/g, 1]."""
        return absmax_scale(self._grouped(w), self.q)

    def current_scale(self, w: torch.Tensor) -> torch.Tensor:
        if self.learnable:
            return _grad_scaled(self.scale.abs().clamp(min=EPS), (w.numel() * self.q) ** -0.5)
        return self.absmax_scale(w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant(self._grouped(w), self.current_scale(w), self.bits).reshape(w.shape)

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes (int8 tensor shaped like `w`) and scales ([out] or [out, in/g]) of `w`."""
        scale = self.current_scale(w).detach().float()
        codes = torch.clamp(torch.round(self._grouped(w.float()) / scale), -self.q, self.q)
        return codes.to(torch.int8).reshape(w.shape), scale.squeeze(-1)

    def scheme(self) -> str:
        return f"int{self.bits}/" + ("channel" if self.group_size is None else f"group{self.group_size}")

    def describe(self) -> str:
        """The scheme as `CookedModel.print_graph` shows it: `int8/channel`, `int4/group128 lsq`."""
        return self.scheme() + (" lsq" if self.learnable else "")

    def extra_repr(self) -> str:
        return self.scheme() + (", lsq" if self.learnable else "")


class _ActQuant(nn.Module):
    """Shared by activation quantizers: an optional SmoothQuant divisor applied before quantizing."""

    bits: int

    def __init__(self, bits: int):
        super().__init__()
        self.q = qmax(bits)
        self.bits = bits
        self.register_buffer("smooth", None)

    def set_smooth(self, factors: torch.Tensor | None) -> None:
        """Divide inputs by `factors` (per input channel) before quantizing; the weight absorbs them."""
        self.smooth = None if factors is None else factors.detach().clone()

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.smooth is None else x / self.smooth

    def describe(self) -> str:
        """The scheme (each subclass's `scheme()`) as `CookedModel.print_graph` shows it: `int8/token`,
        `int8/tensor minmax smoothquant`."""
        return self.scheme() + (" smoothquant" if self.smooth is not None else "")

    def extra_repr(self) -> str:
        return self.scheme() + (", smooth" if self.smooth is not None else "")


class TokenQuant(_ActQuant):
    """Dynamic per-token fake quantization: one absmax scale per row of the last dimension."""

    kind = "token"  # the activation scheme `fxcook.qview.quant_view` reports

    def token_scale(self, x: torch.Tensor) -> torch.Tensor:
        return absmax_scale(x.detach(), self.q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pre(x)
        return fake_quant(x, self.token_scale(x), self.bits)

    def scheme(self) -> str:
        return f"int{self.bits}/token"


class DynamicTensorQuant(_ActQuant):
    """Dynamic per-tensor fake quantization with ONNX DynamicQuantizeLinear's arithmetic.

    uint8 codes over [min(x, 0), max(x, 0)]: scale = range / 255, zero point round(-min / scale);
    no calibration, and ONNX Runtime computes the same scale inside its fused integer GEMM. The
    asymmetric range gives one-sided inputs (after GELU) twice the resolution of a symmetric one.
    """

    kind = "dynamic"

    def __init__(self, bits: int = 8):
        if bits != 8:
            raise FxcookError(f"DynamicTensorQuant is 8-bit only (ONNX DynamicQuantizeLinear), got {bits}")
        super().__init__(bits)

    @staticmethod
    def params(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) of `x` as DynamicQuantizeLinear computes them (0-d float tensors)."""
        x = x.detach()
        lo, hi = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
        scale = ((hi - lo) / 255.0).clamp(min=EPS)
        return scale, torch.clamp(torch.round(-lo / scale), 0, 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pre(x)
        scale, zp = self.params(x)
        return (torch.clamp(_round_ste(x / scale) + zp, 0, 255) - zp) * scale

    def scheme(self) -> str:
        return "int8/tensor/dynamic"


def act_quantizer(
    spec: ActSpec, observer: str = "minmax", percentile: float = 99.99, learnable: bool = False
) -> _ActQuant:
    """The fake quantizer for an activation scheme."""
    if spec.granularity == "token":
        return TokenQuant(spec.bits)
    if spec.dynamic:
        return DynamicTensorQuant(spec.bits)
    return TensorQuant(spec.bits, observer, percentile, learnable)


class TensorQuant(_ActQuant):
    """Static per-tensor fake quantization with a scale set by calibration (or learned, LSQ).

    While `observing`, forward returns its input unchanged and records statistics; `finish()`
    turns them into the scale. Using it before calibration is an error, never a silent identity.
    """

    kind = "tensor"
    SAMPLE = 4096  # values kept per observed batch for the percentile and MSE searches

    def __init__(self, bits: int = 8, observer: str = "minmax", percentile: float = 99.99, learnable: bool = False):
        super().__init__(bits)
        if observer not in OBSERVERS:
            raise FxcookError(f"observer: unknown {observer!r}; choose one of {', '.join(OBSERVERS)}")
        self.observer, self.percentile, self.learnable = observer, percentile, learnable
        self.scale = nn.Parameter(torch.zeros(1), requires_grad=learnable)  # 1-D: FSDP2 shards dim 0
        self.observing = False
        self._amax = 0.0
        self._samples: list[torch.Tensor] = []

    @property
    def calibrated(self) -> bool:
        return bool(self.scale.detach() != 0)  # LSQ may learn a negative scale; forward uses |scale|

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pre(x)
        if self.observing:
            self._observe(x.detach())
            return x
        if not self.calibrated:
            raise FxcookError(
                "a static (int/tensor) activation quantizer has no scale: run "
                "fxcook.passes.quantize.quantizers.calibrate(cooked, batches) or pass calibration data to Quantize"
            )
        scale = self.scale.abs().clamp(min=EPS)
        if self.learnable:
            scale = _grad_scaled(scale, (x.numel() * self.q) ** -0.5)
        return fake_quant(x, scale, self.bits)

    def _observe(self, x: torch.Tensor) -> None:
        flat = x.float().reshape(-1)
        self._amax = max(self._amax, float(flat.abs().max()))
        if self.observer != "minmax":
            idx = torch.randint(0, flat.numel(), (min(self.SAMPLE, flat.numel()),), generator=_gen(len(self._samples)))
            self._samples.append(flat[idx])

    @torch.no_grad()
    def finish(self) -> float:
        """Set the scale from what was observed; returns it."""
        if self._amax == 0.0 and not self._samples:
            raise FxcookError("calibration observed no activations (empty calibration data?)")
        amax = self._amax
        if self.observer == "percentile":
            sample = torch.cat(self._samples).abs()
            amax = float(torch.quantile(sample, self.percentile / 100))
        elif self.observer == "mse":
            sample = torch.cat(self._samples)
            best = None
            for frac in torch.linspace(0.2, 1.0, 41):
                s = torch.tensor(max(amax * float(frac), EPS) / self.q)
                err = float(((torch.clamp(torch.round(sample / s), -self.q, self.q) * s - sample) ** 2).mean())
                if best is None or err < best[0]:
                    best = (err, float(s) * self.q)
            amax = best[1]
        self.scale.fill_(max(amax, EPS) / self.q)
        self.observing, self._amax, self._samples = False, 0.0, []
        return float(self.scale)

    def scheme(self) -> str:
        return f"int{self.bits}/tensor {self.observer}" + (" lsq" if self.learnable else "")

    def extra_repr(self) -> str:
        s = f"{float(self.scale):.4g}" if self.calibrated else "uncalibrated"
        return f"int{self.bits}/tensor, {self.observer}, scale={s}" + (", lsq" if self.learnable else "")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, desc: str = "calibration") -> int:
    """Run `batches` through `model` with every TensorQuant observing, then fix their scales.

    Returns the number of batches seen; no batches (or quantizers never reached) is an error.
    """
    observers = [m for m in model.modules() if isinstance(m, TensorQuant)]
    if not observers:
        return 0
    for m in observers:
        m.observing, m._amax, m._samples = True, 0.0, []
    try:
        seen = run_batches(model, batches, desc)
    finally:
        for m in observers:
            m.observing = False
    if seen == 0:
        raise FxcookError("calibration got no data: the calibration batches are empty")
    for m in observers:
        m.finish()
    return seen


def smooth_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant migration strength per input channel: max|X_j|^a / max|W_:,j|^(1-a).

    Dividing the input by these and multiplying the weight columns by them leaves the product exact
    while flattening activation outliers into the (per-channel quantized) weights.
    """
    if not 0.0 <= alpha <= 1.0:
        raise FxcookError(f"smoothquant alpha must be in [0, 1], got {alpha}")
    w_absmax = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = act_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)
