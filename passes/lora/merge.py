"""MergeLora: fold each adapter's `B A * alpha/rank` into its linear's weight and drop the branch.

Without a mask or quantizer the merge is exact up to float rounding. A masked base is re-masked (its
mask is applied to the merged weight in the forward as before): the change says which share of
`B A` (by Frobenius norm) fell under the mask. A quantized base is re-quantized: its scales follow
the merged weight (learnable scales restart from it), and the change says the relative error of the
quantized merged weight against the float one. The merged weight trains again (requires_grad).
"""

from __future__ import annotations

import torch

from fxcook.errors import PassError, PreconditionError
from fxcook.nn import CookedLinear
from fxcook.passbase import Change, Pass, PassResult
from fxcook.passes.lora.branch import SUFFIX, LoraBranch
from fxcook.tracing import call_sites

__all__ = ["MergeLora", "adapters"]


def adapters(cooked) -> dict[str, LoraBranch]:
    """Linear path -> the LoraBranch beside it, for every adapter on `cooked`."""
    out = {}
    for path, mod in cooked.named_modules():
        if isinstance(mod, LoraBranch):
            out[path.removesuffix(SUFFIX)] = mod
    return out


def _share(part: torch.Tensor, whole: torch.Tensor) -> float:
    norm = float(whole.norm())
    return float(part.norm()) / norm if norm else 0.0


@torch.no_grad()
def _fold(linear: CookedLinear, branch: LoraBranch) -> str:
    """Add the branch's update to the weight; what the mask dropped or quantization changed, in words."""
    delta = branch.delta().to(linear.weight.dtype)
    notes = []
    if linear.weight_mask is not None:
        notes.append(f"mask dropped {_share(delta * (1 - linear.weight_mask), delta):.1%} of B A")
    linear.weight.add_(delta)
    linear.weight.requires_grad_(True)
    quant = linear.weight_quant
    if quant is not None:
        w = linear.weight if linear.weight_mask is None else linear.weight * linear.weight_mask
        if getattr(quant, "learnable", False):
            quant.scale.copy_(quant.absmax_scale(w))
        notes.append(f"re-quantized {quant.describe()}, rel. error {_share(quant(w) - w, w):.2e}")
    return ", ".join(["merged B A"] + notes)


def _unhook(cooked, linear_path: str) -> None:
    """Remove the branch nodes calling `linear_path`'s adapter; the linear's users read it directly again."""
    for site in call_sites(cooked).get(linear_path + SUFFIX, []):
        graph, node = site.module.graph, site.node
        (total,) = node.users
        total.replace_all_uses_with(next(a for a in total.args if a is not node))
        graph.erase_node(total)
        graph.erase_node(node)
    parent, name = cooked.parent(linear_path + SUFFIX)
    delattr(parent, name)


class MergeLora(Pass):
    """Fold every adapter into its base weight (see module docstring); the graph loses the branches."""

    name = "merge_lora"
    after = ("lora",)

    def requires(self, cooked) -> None:
        if not adapters(cooked):
            raise PreconditionError("merge_lora: the model has no LoRA adapters to merge; run Lora (and train) first")

    def call(self, cooked) -> PassResult:
        changes = []
        for path, branch in adapters(cooked).items():
            linear = cooked.get_submodule(path)
            if not isinstance(linear, CookedLinear):
                raise PassError(f"merge_lora: {path} carries an adapter but is a {type(linear).__name__}")
            changes.append(Change(path, _fold(linear, branch)))
            _unhook(cooked, path)
        return self.finish(cooked, changes)

    def ensures(self, cooked) -> None:
        if left := list(adapters(cooked)):
            raise PassError(f"merge_lora: adapters left after the merge: {left[:3]}")
