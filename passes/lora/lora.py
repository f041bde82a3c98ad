"""Lora: a low-rank adapter branch beside each selected CookedLinear, the base weight frozen.

The branch is a graph node of its own (`LoraBranch`, see `branch`), added to the linear's output, so
the base keeps whatever a pass put on it: a 2:4 mask or int8 fake quantization go on acting on the
frozen weight while the adapter trains in float (LoRA over a compressed base, as QLoRA does). Shapes
are read from each linear as it stands, so adapters follow a layer another pass has sliced.

Ranks: one `rank` for all, `{pattern: rank}` per layer (glob patterns over linear paths, first match
wins), or `{"by": "importance", "high": 8, "low": 4, "top_blocks": k}`: the `k` blocks with the largest
summed importance (from `importance=`, a `{block path: tensor}` such as head importance, or the
model's `head_importance` attribute) get `high`, the others `low`. The chosen ranks are recorded, so
`fxcook.load` rebuilds the same adapters without the importance data.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fxcook.errors import PassError, PreconditionError
from fxcook.nn import CookedLinear
from fxcook.passbase import Change, DataPass, PassConfig, PassResult
from fxcook.passes.lora.branch import SUFFIX, LoraBranch, branch_path
from fxcook.select import Select, match
from fxcook.tracing import call_sites

__all__ = ["ImportanceRanks", "Lora", "LoraConfig", "block_scores"]

aten = torch.ops.aten


class ImportanceRanks(BaseModel):
    """Rank by block importance: the `top_blocks` most important blocks get `high`, the rest `low`."""

    model_config = ConfigDict(extra="forbid")
    by: Literal["importance"]
    high: int = Field(8, gt=0)
    low: int = Field(4, gt=0)
    top_blocks: int = Field(4, ge=0)


class LoraConfig(PassConfig):
    select: Select = Select()
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    ranks: ImportanceRanks | dict[str, int] | None = None


def block_scores(importance: dict) -> dict[str, float]:
    """One number per block: the sum of its importance values (e.g. over its heads)."""
    return {path: float(torch.as_tensor(v, dtype=torch.float64).sum()) for path, v in importance.items()}


class Lora(DataPass):
    """Add a `LoraBranch` beside each selected linear and freeze the linear's weight and bias.

    `importance`: `{block path: tensor or float}`, runtime data (like calibration) for
    `ranks={"by": "importance", ...}`; without it the model's `head_importance` attribute is used.
    """

    name = "lora"
    Config = LoraConfig
    after = ("sparsify", "quantize", "prune", "slice")

    def __init__(self, *args, importance: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.importance = importance
        self.chosen: dict[str, int] = {}

    def _linears(self, cooked) -> list[tuple[str, CookedLinear]]:
        out = []
        for site in self.config.select.resolve(cooked):
            mod = cooked.get_submodule(site.path)
            if not isinstance(mod, CookedLinear):
                raise PreconditionError(
                    f"lora: site {site.path} ({site.kind}) is a {type(mod).__name__}, not a CookedLinear; "
                    f"LoRA adapts linear sites only (select kind: linear)"
                )
            out.append((site.path, mod))
        return out

    def _importance(self, cooked) -> dict:
        imp = self.importance if self.importance is not None else getattr(cooked, "head_importance", None)
        if not imp:
            raise PreconditionError(
                "lora: ranks by importance need importance={block path: scores} (e.g. from head_importance) "
                "or a model carrying head_importance; pass one or give ranks as {pattern: rank}"
            )
        return imp

    def _ranks(self, cooked, paths: list[str]) -> dict[str, int]:
        cfg = self.config
        if self.restoring:
            return {p: int(r) for p, r in self.restore["ranks"].items()}
        if cfg.ranks is None:
            return {p: cfg.rank for p in paths}
        if isinstance(cfg.ranks, dict):
            for pattern in cfg.ranks:
                if not any(match(pattern, p) for p in paths):
                    raise PreconditionError(
                        f"lora: ranks pattern {pattern!r} matches none of the {len(paths)} selected linears "
                        f"(e.g. {', '.join(paths[:3])}); fix or remove it"
                    )
            return {p: next((r for pat, r in cfg.ranks.items() if match(pat, p)), cfg.rank) for p in paths}
        scores = block_scores(self._importance(cooked))
        blocks = {p: cooked.sites.block_of(p) for p in paths}
        if unknown := sorted({b for b in blocks.values() if b is not None and b not in scores}):
            raise PreconditionError(
                f"lora: importance has no score for block(s) {unknown[:3]}; it covers {sorted(scores)[:3]}..."
            )
        top = set(sorted(scores, key=scores.__getitem__, reverse=True)[: cfg.ranks.top_blocks])
        return {p: cfg.ranks.high if blocks[p] in top else cfg.ranks.low for p in paths}

    def requires(self, cooked) -> None:
        linears = self._linears(cooked)
        for path, _ in linears:
            if isinstance(_maybe(cooked, branch_path(path)), LoraBranch):
                raise PreconditionError(f"lora: {path} already has an adapter ({branch_path(path)}); merge it first")
        self.chosen = self._ranks(cooked, [p for p, _ in linears])
        for path, mod in linears:
            r = self.chosen[path]
            if r > min(mod.in_features, mod.out_features):
                raise PreconditionError(
                    f"lora: rank {r} for {path} exceeds min(in, out) = min({mod.in_features}, {mod.out_features}); "
                    f"use a rank <= {min(mod.in_features, mod.out_features)}"
                )

    def call(self, cooked) -> PassResult:
        cfg, calls, changes = self.config, call_sites(cooked), []
        if not self.chosen:
            self.chosen = self._ranks(cooked, [p for p, _ in self._linears(cooked)])
        for path, mod in self._linears(cooked):
            if path not in calls:
                raise PassError(f"lora: no graph calls {path}, so an adapter there would never run")
            rank = self.chosen[path]
            branch = LoraBranch(mod.in_features, mod.out_features, rank, cfg.alpha, cfg.dropout)
            branch.to(device=mod.weight.device, dtype=mod.weight.dtype)
            parent, name = cooked.parent(path)
            parent.add_module(name + SUFFIX, branch)
            for site in calls[path]:
                _insert(site.module.graph, site.node)
            for p in (mod.weight, mod.bias):
                if p is not None:
                    p.requires_grad_(False)
            changes.append(Change(path, f"LoRA rank {rank}, alpha {cfg.alpha:g} ({branch_path(path)}); base frozen"))
        return self.finish(cooked, changes)

    def record(self) -> dict:
        return {"ranks": dict(self.chosen)}

    def ensures(self, cooked) -> None:
        for path in self.chosen:
            if not isinstance(_maybe(cooked, branch_path(path)), LoraBranch):
                raise PassError(f"lora: {path} has no adapter after the pass")


def _maybe(cooked, path: str):
    try:
        return cooked.get_submodule(path)
    except AttributeError:
        return None


def _insert(graph: torch.fx.Graph, call: torch.fx.Node) -> None:
    """`y = linear(x)` becomes `y = add(linear(x), linear_lora(x))` in `graph`; later users read the sum."""
    with graph.inserting_after(call):
        branch = graph.create_node("call_module", call.target + SUFFIX, (call.args[0],))
    with graph.inserting_after(branch):
        total = graph.call_function(aten.add.Tensor, (call, branch))
    call.replace_all_uses_with(total, delete_user_cb=lambda u: u is not total)
    for node in (branch, total):
        node.meta["val"] = call.meta.get("val")
