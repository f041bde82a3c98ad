"""Routed-expert FFNs (MoEfication): expert weights and the routed module.

A dense FFN ``down(act(up(x)))`` (or gated ``down(act(gate(x)) * up(x))``) is split into E
experts by partitioning its intermediate neurons into E equal groups (`partition`) and permuting
the weights into an expert-major layout ``[E, m, d]`` / ``[E, d, m]``. Every parameter value is
kept, so with all experts active the module computes the original FFN; with top-k of E experts it
computes only the chosen experts per token (tokens grouped per expert, one GEMM per expert), which
is where the real compute saving comes from. Routers live in `router`.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fxcook.nn import HookedWeight
from fxcook.passes.moefy.router import MLPRouter

__all__ = ["ACTIVATIONS", "ExpertLinear", "MoEFFN", "masked_ffn", "routed_ffn"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
}


# --------------------------------------------------------------------------------------------
# Expert weights with inherited compression hooks
# --------------------------------------------------------------------------------------------


def _check_labels(labels: torch.Tensor, experts: int) -> torch.Tensor:
    """Expert-major neuron order from equal-size labels."""
    counts = torch.bincount(labels, minlength=experts)
    if counts.numel() != experts or not bool((counts == counts[0]).all()):
        raise ValueError(f"expert labels must form {experts} equal groups, got sizes {counts.tolist()}")
    return torch.argsort(labels, stable=True)


class ExpertLinear(HookedWeight, nn.Module):
    """One FFN projection in expert-major layout, keeping the source linear's hooks.

    `split="out"` (up/gate): weight [E, m, in] = rows of the [F, in] weight in expert order.
    `split="in"` (down): weight [E, out, m] = columns of the [out, F] weight in expert order.
    `weight_quant` is applied to the weight rebuilt in its original neuron order, so any
    per-channel state it holds still lines up; masks are permuted with the weight.
    """

    def __init__(self, linear: nn.Module, perm: torch.Tensor, experts: int, split: Literal["out", "in"]):
        super().__init__()
        w = linear.weight.detach()
        out_f, in_f = w.shape
        self.split = split
        self.experts = experts
        # persistent: the expert layout comes from calibration, so a saved model must carry it
        self.register_buffer("perm", perm.clone())
        self.register_buffer("inv_perm", torch.argsort(perm))
        self.weight = nn.Parameter(self._to_experts(w).clone())
        bias = getattr(linear, "bias", None)
        if bias is not None and split == "out":
            self.bias = nn.Parameter(bias.detach()[perm].reshape(experts, -1).clone())
        elif bias is not None:
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.bias = None
        mask = getattr(linear, "weight_mask", None)
        self.register_buffer("weight_mask", None if mask is None else self._to_experts(mask.detach()).clone())
        self.weight_quant = getattr(linear, "weight_quant", None)
        self.input_quant = getattr(linear, "input_quant", None)
        self.mask_note = getattr(linear, "mask_note", None)
        self.shape_2d = (out_f, in_f)

    def _to_experts(self, w: torch.Tensor) -> torch.Tensor:
        if self.split == "out":
            return w[self.perm].reshape(self.experts, -1, w.shape[1])
        return w[:, self.perm].reshape(w.shape[0], self.experts, -1).permute(1, 0, 2).contiguous()

    def _from_experts(self, w: torch.Tensor) -> torch.Tensor:
        """The [out, in] matrix in the original neuron order."""
        if self.split == "out":
            return w.reshape(-1, w.shape[-1])[self.inv_perm]
        return w.permute(1, 0, 2).reshape(w.shape[1], -1)[:, self.inv_perm]

    def effective_weight(self) -> torch.Tensor:
        """quant(weight * mask) in expert layout, matching CookedLinear.effective_weight()."""
        w = self.weight if self.weight_mask is None else self.weight * self.weight_mask
        if self.weight_quant is None:
            return w
        if self._order_free():  # the same values without the two gathers (a training step does this per call)
            if self.split == "out":
                return self.weight_quant(w.reshape(-1, w.shape[-1])).reshape(w.shape)
            rows = self.weight_quant(w.permute(1, 0, 2).reshape(w.shape[1], -1))
            return rows.reshape(w.shape[1], self.experts, -1).permute(1, 0, 2)
        return self._to_experts(self.weight_quant(self._from_experts(w)))

    def _order_free(self) -> bool:
        """Whether `weight_quant` gives every value the same in expert order as in the original: scales per
        output channel (absmax over a whole row is order-free), not per input group, and not learned per
        neuron row in the original order."""
        q = self.weight_quant
        return getattr(q, "group_size", 0) is None and (self.split == "in" or not getattr(q, "learnable", True))

    def dense_weight(self) -> torch.Tensor:
        """Effective weight as one [out, in] matrix in expert-major neuron order (all experts)."""
        w = self.effective_weight()
        if self.split == "out":
            return w.reshape(-1, w.shape[-1])
        return w.permute(1, 0, 2).reshape(w.shape[1], -1)


def _route(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, list[int]]:
    """Group (token, expert) slots by expert: the token of each slot, slots per expert."""
    experts = scores.shape[-1]
    chosen = scores.topk(k, dim=-1).indices.reshape(-1)
    order = torch.argsort(chosen, stable=True)
    counts = torch.bincount(chosen, minlength=experts).tolist()
    return order // k, counts


def routed_ffn(
    x: torch.Tensor,
    scores: torch.Tensor,
    up: torch.Tensor,
    up_bias: torch.Tensor | None,
    gate: torch.Tensor | None,
    gate_bias: torch.Tensor | None,
    down: torch.Tensor,
    down_bias: torch.Tensor | None,
    k: int,
    act: str,
) -> torch.Tensor:
    """Top-k routed FFN over tokens x [T, d]; weights in expert-major layout.

    up/gate [E, m, d], down [E, d, m]; the activation applies to gate (gated) or up (plain).
    Only the chosen experts run: tokens are grouped per expert and each expert does one GEMM
    (torch._grouped_mm on CUDA, a loop of GEMMs elsewhere).
    """
    fn = ACTIVATIONS[act]
    token, counts = _route(scores, k)
    xs = x.index_select(0, token)
    # CUDA grouped GEMM (bf16, 16-byte aligned rows); elsewhere one GEMM per expert.
    use_grouped = (
        x.is_cuda
        and hasattr(torch, "_grouped_mm")
        and x.dtype == torch.bfloat16
        and x.shape[-1] % 8 == 0
        and up.shape[1] % 8 == 0
    )
    # Inference writes each expert's GEMM straight into one buffer (no concatenation copies).
    inplace = not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (x, scores, up, up_bias, gate, gate_bias, down, down_bias)
    )

    def gemm(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        # a: [slots, in] grouped by expert, w: [E, out, in], b: [E, out] or None.
        if use_grouped:
            sizes = torch.tensor(counts, device=a.device)
            y = torch._grouped_mm(a, w.transpose(1, 2), offs=sizes.cumsum(0).to(torch.int32))
            return y if b is None else y + b.repeat_interleave(sizes, dim=0, output_size=a.shape[0])
        if inplace:
            y = a.new_empty(a.shape[0], w.shape[1])
            start = 0
            for e, c in enumerate(counts):
                if c:
                    seg = a[start : start + c]
                    if b is None:
                        torch.mm(seg, w[e].T, out=y[start : start + c])
                    else:
                        torch.addmm(b[e], seg, w[e].T, out=y[start : start + c])
                start += c
            return y
        parts, start = [], 0
        for e, c in enumerate(counts):
            if c:
                seg = a[start : start + c]
                parts.append(seg @ w[e].T if b is None else torch.addmm(b[e], seg, w[e].T))
            start += c
        return torch.cat(parts) if parts else a.new_zeros(0, w.shape[1])

    pre = gemm(xs, gate if gate is not None else up, gate_bias if gate is not None else up_bias)
    h = pre.relu_() if inplace and act == "relu" else fn(pre)
    if gate is not None:
        h = h.mul_(gemm(xs, up, up_bias)) if inplace else h * gemm(xs, up, up_bias)
    y = gemm(h, down, None)
    out = (
        x.new_zeros(x.shape[0], down.shape[1]).index_add_(0, token, y)
        if inplace
        else x.new_zeros(x.shape[0], down.shape[1]).index_add(0, token, y)
    )
    if down_bias is not None:
        out = out.add_(down_bias) if inplace else out + down_bias
    return out


def masked_ffn(
    x: torch.Tensor,
    scores: torch.Tensor,
    up: torch.Tensor,
    up_bias: torch.Tensor | None,
    gate: torch.Tensor | None,
    gate_bias: torch.Tensor | None,
    down: torch.Tensor,
    down_bias: torch.Tensor | None,
    k: int,
    act: str,
) -> torch.Tensor:
    """`routed_ffn`'s values and gradients, computed densely: every expert runs and the neurons of the
    experts a token did not choose are zeroed before the down projection.

    Training is where this form pays: at top-16 of 32 it does twice the routed multiply-adds, but in
    two or three large GEMMs instead of a gather, a GEMM per expert and a scatter each way (a MiniLM
    distillation step with the routed form took 1.3-1.7x as long on a CPU thread). Zeroed neurons pass no
    gradient, so the same weights train.
    """
    experts, m, d = up.shape
    chosen = torch.zeros_like(scores, dtype=x.dtype).scatter_(1, scores.topk(k, dim=-1).indices, 1.0)
    flat = lambda w, b: F.linear(x, w.reshape(experts * m, d), None if b is None else b.reshape(-1))  # noqa: E731
    h = ACTIVATIONS[act](flat(gate, gate_bias) if gate is not None else flat(up, up_bias))
    if gate is not None:
        h = h * flat(up, up_bias)
    h = h * chosen.repeat_interleave(m, dim=1)
    return F.linear(h, down.permute(1, 0, 2).reshape(down.shape[1], experts * m), down_bias)


class MoEFFN(nn.Module):
    """A whole FFN as E routed experts (expert-major weights), computing the top-k per token.

    `router="oracle"` scores each expert by its true activation mass (needs the dense up
    projection: a quality reference, not a speedup); `router="mlp"` uses a trained `MLPRouter`.
    With `top_k == experts` the module computes the original FFN (dense GEMMs, same values; the
    down projection's input stays float, see `__init__`).
    """

    def __init__(
        self,
        up: nn.Module,
        down: nn.Module,
        act: str,
        labels: torch.Tensor,
        experts: int,
        top_k: int,
        gate: nn.Module | None = None,
        router: Literal["oracle", "mlp"] = "mlp",
    ):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"MoEFFN: activation {act!r} not supported (known: {sorted(ACTIVATIONS)})")
        width = up.weight.shape[0]
        if experts <= 0 or width % experts:
            raise ValueError(f"MoEFFN: {experts} experts do not divide the FFN width {width}")
        if not 1 <= top_k <= experts:
            raise ValueError(f"MoEFFN: top_k={top_k} must be in 1..experts={experts}")
        perm = _check_labels(labels, experts)
        self.experts, self.top_k, self.act, self.router_kind = experts, top_k, act, router
        self.hidden_size = up.weight.shape[1]
        self.register_buffer("labels", labels.clone())  # persistent, like the experts' `perm`
        self.up = ExpertLinear(up, perm, experts, "out")
        self.gate = None if gate is None else ExpertLinear(gate, perm, experts, "out")
        self.down = ExpertLinear(down, perm, experts, "in")
        # The expert hidden states stay float: every runtime that routes (ONNX Runtime's MoE and
        # weight-only QMoE, the grouped GEMM) keeps them float between the expert GEMMs, so a
        # fake-quantized hidden state here would make this module differ from each lowered form.
        self.down.input_quant = None
        self.router = None
        if router == "mlp":
            self.router = MLPRouter(self.hidden_size, experts, self.centroids())
        elif router != "oracle":
            raise ValueError(f"MoEFFN: router must be 'oracle' or 'mlp', got {router!r}")

    @property
    def activated(self) -> ExpertLinear:
        """The projection the activation applies to (gate if gated, else up)."""
        return self.gate if self.gate is not None else self.up

    def centroids(self) -> torch.Tensor:
        """Mean L2-normalised activated-projection row per expert: the router's initial weights."""
        w = F.normalize(self.activated.weight.detach().float(), dim=-1)
        return w.mean(1)

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """Dense intermediate activations [T, E, m] (all experts): for oracle scores and calibration."""
        a = self.activated
        h = ACTIVATIONS[self.act](F.linear(x, a.dense_weight(), None if a.bias is None else a.bias.reshape(-1)))
        if self.gate is not None:
            h = h * F.linear(x, self.up.dense_weight(), None if self.up.bias is None else self.up.bias.reshape(-1))
        return h.reshape(*h.shape[:-1], self.experts, -1)

    def expert_mass(self, x: torch.Tensor) -> torch.Tensor:
        """True activation mass per expert [T, E]: the oracle's scores and the router's target."""
        return self.intermediate(self.quant_in(x)).abs().sum(-1)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            return self.expert_mass(x)
        return self.router(x)

    def quant_in(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.up.input_quant is None else self.up.input_quant(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        scores = self.scores(x2)
        xq = self.quant_in(x2)
        up_b = self.up.bias
        gate_w = None if self.gate is None else self.gate.effective_weight()
        gate_b = None if self.gate is None else self.gate.bias
        if self.top_k == self.experts:
            out = F.linear(self.intermediate(xq).reshape(x2.shape[0], -1), self.down.dense_weight(), self.down.bias)
        else:
            ffn = masked_ffn if torch.is_grad_enabled() and self.training else routed_ffn
            out = ffn(
                xq,
                scores,
                self.up.effective_weight(),
                up_b,
                gate_w,
                gate_b,
                self.down.effective_weight(),
                self.down.bias,
                self.top_k,
                self.act,
            )
        return out.reshape(*shape[:-1], out.shape[-1])

    @property
    def weight_bits(self) -> int:
        """8 when every projection's weights are int8 per output channel with absmax scales (lowered
        to QMoE, whose int8 codes are recovered exactly from the fake-quant weights), else 32
        (lowered to the float MoE with the fake-quantized weights)."""
        projs = [self.up, self.down] + ([self.gate] if self.gate is not None else [])

        def int8_channel(p: ExpertLinear) -> bool:
            q = p.weight_quant
            return p.bits == 8 and getattr(q, "group_size", None) is None and not getattr(q, "learnable", False)

        return 8 if all(int8_channel(p) for p in projs) else 32

    def activated_params(self) -> float:
        """Weight params run per token: bits/32 x density x active-expert fraction (+ router)."""
        frac = self.top_k / self.experts
        total = 0.0
        for p in (self.up, self.gate, self.down):
            if p is not None:
                total += p.weight.numel() * p.bits / 32 * p.density * frac
        if self.router is not None:
            total += sum(q.numel() for q in self.router.parameters())
        return total

    def stored_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> str:
        """`MoE 2/4 experts, mlp router` and what passes did to each projection's weights."""
        projs = [("up", self.up), ("gate", self.gate), ("down", self.down)]
        done = [f"{name} {', '.join(p.compression())}" for name, p in projs if p is not None and p.compression()]
        return "; ".join([f"MoE {self.top_k}/{self.experts} experts, {self.router_kind} router", *done])

    def extra_repr(self) -> str:
        gated = ", gated" if self.gate is not None else ""
        return f"experts={self.experts}, top_k={self.top_k}, act={self.act}{gated}, router={self.router_kind}"
