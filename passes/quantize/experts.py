"""Fake quantization of HF MoE expert GEMMs (`expert_bmm` sites) as an explicit graph rewrite.

transformers 5.x keeps a MoE layer's experts as 3-D parameters (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]) that a grouped GEMM (`transformers::grouped_mm_fallback`, `aten._grouped_mm`
on CUDA) multiplies with the routed tokens sorted by expert. These weights never pass through a
CookedLinear, so their quantizers are inserted as `call_module` nodes into the graph of the module
that owns the parameter (the experts module):

    get_attr gate_up_proj -> gate_up_proj_quant (ExpertWeightQuant) -> transpose -> grouped GEMM
    x [slots, H] -> gate_up_proj_input_quant (ExpertInputQuant) --------------------^

`ExpertWeightQuant` is a `WeightQuant` over the `[E*N, K]` rows of the weight: one scale per
(expert, output channel), STE rounding, so QAT gradients reach the 3-D parameter. `ExpertInputQuant`
applies the pass's activation quantizer to the GEMM's activation operand, whose rows are routed
tokens (per-token scales are per routed token, as each expert's GEMM sees them). Static per-tensor
quantizers are ordinary `TensorQuant`s, calibrated by `fxcook.passes.quantize.quantizers.calibrate` with the linears'.
Running the rewrite again replaces the quantizers in place, so quantizing twice equals once.

For ONNX export, `fxcook.runtime.lowering` swaps the quantizers for their export forms.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fxcook.errors import NotSupportedYet, PassError, SelectorError
from fxcook.nn import ParamQuant, describe_quant
from fxcook.passes.quantize.quantizers import (
    ActSpec,
    WeightQuant,
    WeightSpec,
    act_quantizer,
)
from fxcook.select import Select
from fxcook.tracing import finalize, parent_of

__all__ = [
    "ExpertInputQuant",
    "ExpertWeightQuant",
    "grouped_gemm_ops",
    "quantize_experts",
    "select_experts",
]

aten = torch.ops.aten
_TRANSPOSES = (aten.transpose.int, aten.permute.default)


def grouped_gemm_ops() -> tuple:
    """The grouped GEMMs over expert weights: `(x [S, K], w [E, K, N], offsets [E]) -> [S, N]`."""
    ops = [aten._grouped_mm.default]
    transformers_ns = getattr(torch.ops, "transformers", None)
    if transformers_ns is not None and hasattr(transformers_ns, "grouped_mm_fallback"):
        ops.append(transformers_ns.grouped_mm_fallback.default)
    return tuple(ops)


class ExpertWeightQuant(WeightQuant, ParamQuant):
    """Fake-quantizes a 3-D expert weight per (expert, output channel), or per input-column group.

    `reduce_dim` is the parameter's contracted axis (2 for HF's `[E, out, in]`, 1 for a transposed
    `[E, in, out]` layout); the weight is quantized as the `[E*out, in]` matrix of its rows.
    """

    def __init__(self, bits: int, group_size: int | None, learnable: bool, weight: torch.Tensor, reduce_dim: int):
        if weight.dim() != 3 or reduce_dim not in (1, 2):
            raise PassError(
                f"ExpertWeightQuant needs a 3-D [E, out, in] or [E, in, out] weight, "
                f"got shape {tuple(weight.shape)} reducing axis {reduce_dim}"
            )
        super().__init__(bits, group_size, learnable, weight=_rows(weight.detach(), reduce_dim))
        self.reduce_dim = reduce_dim

    def _canonical(self, w: torch.Tensor) -> torch.Tensor:
        """`w` as [E, out, in]: contracted axis last."""
        return w if self.reduce_dim == 2 else w.transpose(1, 2)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        canon = self._canonical(w)
        q = super().forward(canon.reshape(-1, canon.shape[-1])).reshape(canon.shape)
        return self._canonical(q)

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 codes `[E, out, in]` (contracted axis last, whatever the parameter's layout) and
        scales `[E, out]` (or `[E, out, in/g]`)."""
        canon = self._canonical(w)
        codes, scale = super().quantize(canon.reshape(-1, canon.shape[-1]))
        return codes.reshape(canon.shape), scale.reshape(*canon.shape[:2], *scale.shape[1:])

    def describe(self) -> str:
        return f"quant {super().describe()} (expert weight)"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", expert rows, reduce_dim={self.reduce_dim}"


def _rows(w: torch.Tensor, reduce_dim: int) -> torch.Tensor:
    canon = w if reduce_dim == 2 else w.transpose(1, 2)
    return canon.reshape(-1, canon.shape[-1])


class ExpertInputQuant(nn.Module):
    """The activation quantizer of one expert GEMM's token operand (wraps TokenQuant, TensorQuant or
    DynamicTensorQuant, so calibration finds static ones like any linear's)."""

    def __init__(self, quant: nn.Module):
        super().__init__()
        self.quant = quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(x)

    def describe(self) -> str:
        return f"quant {describe_quant(self.quant)} (expert input)"


def _trace_gemms(start: torch.fx.Node, path: str) -> list[tuple[torch.fx.Node, int]]:
    """(grouped GEMM node, contracted axis of the parameter) for every GEMM `start` feeds.

    Only transposes/permutes may sit between the parameter and the GEMM's weight operand; any other
    use (e.g. `batched_mm`'s per-token weight gather) has no lowering here and is an error.
    """
    gemms, out = grouped_gemm_ops(), []
    stack = [(start, [0, 1, 2])]
    while stack:
        node, perm = stack.pop()
        for user in node.users:
            if user.op == "call_function" and user.target in _TRANSPOSES and user.args[0] is node:
                if user.target == aten.permute.default:
                    new = [perm[d % 3] for d in user.args[1]]
                else:
                    a, b = (d % 3 for d in user.args[1:3])
                    new = list(perm)
                    new[a], new[b] = new[b], new[a]
                stack.append((user, new))
            elif user.op == "call_function" and user.target in gemms and len(user.args) > 1 and user.args[1] is node:
                if perm[0] != 0:
                    raise NotSupportedYet(
                        f"quantize: expert weight {path} reaches {user.target} with its expert "
                        f"axis moved (layout {perm}); only [E, ., .] weights are supported"
                    )
                out.append((user, perm[1]))
            else:
                what = user.target if user.op == "call_function" else f"{user.op} {user.target}"
                raise NotSupportedYet(
                    f"quantize: expert weight {path} is read by {what}, not by a grouped expert GEMM "
                    f"(transformers 'grouped_mm' experts implementation); capture the model with "
                    f"config._experts_implementation = 'grouped_mm', or set experts: false"
                )
    if not out:
        raise PassError(f"quantize: expert weight {path} feeds no grouped GEMM in its module's graph")
    if len({dim for _, dim in out}) != 1:
        raise NotSupportedYet(f"quantize: expert weight {path} is contracted along different axes by its GEMMs")
    return out


def safe_name(name: str) -> str:
    return re.sub(r"\W", "_", name)


def quantize_experts(
    cooked: nn.Module,
    paths: list[str],
    weights: WeightSpec,
    acts: ActSpec | None,
    observer: str = "minmax",
    percentile: float = 99.99,
    learnable: bool = False,
) -> list[str]:
    """Insert (or replace) the weight and input quantizers of the expert parameters at `paths`;
    returns `paths`. `acts=None` is weight-only: an input quantizer left by an earlier run is removed.
    """
    touched = set()
    for path in paths:
        owner, attr = parent_of(cooked, path)
        graph = getattr(owner, "graph", None)
        param = getattr(owner, attr, None)
        if not isinstance(graph, torch.fx.Graph) or not isinstance(param, torch.Tensor) or param.dim() != 3:
            raise PassError(f"quantize: {path} is not a 3-D expert parameter read in its module's graph")
        reads = [n for n in graph.nodes if n.op == "get_attr" and n.target == attr]
        if len(reads) != 1:
            raise PassError(
                f"quantize: expert weight {path} is read {len(reads)} times in {path.rpartition('.')[0]}'s graph, expected once"
            )
        read = reads[0]
        wname, xname = f"{safe_name(attr)}_quant", f"{safe_name(attr)}_input_quant"
        existing = [u for u in read.users if u.op == "call_module" and u.target == wname]
        src = existing[0] if existing else read
        gemms = _trace_gemms(src, path)
        reduce_dim = gemms[0][1]
        if weights.group_size is not None and param.shape[reduce_dim] % weights.group_size:
            raise PassError(
                f"quantize: group size {weights.group_size} does not divide the input width "
                f"{param.shape[reduce_dim]} of expert weight {path}"
            )
        owner.add_module(wname, ExpertWeightQuant(weights.bits, weights.group_size, learnable, param, reduce_dim))
        if not existing:
            with graph.inserting_after(read):
                node = graph.create_node("call_module", wname, (read,))
            for user in [u for u in read.users if u is not node]:
                user.replace_input_with(read, node)
            node.meta["val"] = read.meta.get("val")
        for gemm, _ in gemms:
            _set_input_quant(owner, graph, gemm, xname, acts, observer, percentile, learnable)
        touched.add(owner)
    if touched:
        finalize(cooked)
    return list(paths)


def select_experts(cooked: nn.Module, select: Select) -> list[str]:
    """Parameter paths of the `expert_bmm` sites that `select`'s patterns and scope pick. Matching
    none is not an error: patterns written for linears (`*.q_proj`) select no expert."""
    if not cooked.sites.find("expert_bmm"):
        return []
    try:
        return [s.path for s in select.model_copy(update={"kind": "expert_bmm"}).resolve(cooked)]
    except SelectorError:
        return []


def _set_input_quant(
    owner: nn.Module,
    graph: torch.fx.Graph,
    gemm: torch.fx.Node,
    name: str,
    acts: ActSpec | None,
    observer: str,
    percentile: float,
    learnable: bool,
) -> None:
    """Make the GEMM's token operand pass through a fresh `name` quantizer (or through none)."""
    x = gemm.args[0]
    present = isinstance(x, torch.fx.Node) and x.op == "call_module" and x.target == name
    if acts is None:
        if present:
            gemm.replace_input_with(x, x.args[0])
            if not x.users:
                graph.erase_node(x)
            if not any(n.op == "call_module" and n.target == name for n in graph.nodes):
                delattr(owner, name)
        return
    owner.add_module(name, ExpertInputQuant(act_quantizer(acts, observer, percentile, learnable)))
    if not present:
        with graph.inserting_before(gemm):
            node = graph.create_node("call_module", name, (x,))
        node.meta["val"] = x.meta.get("val")
        gemm.replace_input_with(x, node)
