"""Slice: make the gated model physically smaller, computing exactly what the gated model computes.

Per attention: the kept KV groups' q/k/v rows (inside a fused qkv too) and o columns stay, the head
gate's values are folded into the o columns and the layer gate's into o's weight and bias; the head
counts and widths the graph hard-codes (views, reshapes, GQA expands, qkv split sizes) are rewritten,
and an attention mask or position bias carrying one slice per head (T5's relative bias, shared across
layers) is index-selected to the kept heads in each layer. Per FFN: kept up/gate rows and down
columns, unit gates folded into down, the layer gate into down's weight and bias. A sublayer with
nothing left keeps zero-width projections: its output is o's (or down's) gated bias, which is what the
gated model adds to the residual there (a post-LN block still normalises `x + bias`).
"""

from __future__ import annotations

import torch
from torch import nn

from fxcook.errors import PreconditionError
from fxcook.nn import CookedLinear
from fxcook.passbase import Change, Pass, PassConfig, PassResult
from fxcook.passes.prune import gates as G
from fxcook.passes.prune.prune import PLAN, kept_units
from fxcook.passes.prune.structure import FFN, SDPA, Attention, structure_from

aten = torch.ops.aten
SHAPE_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default)
SPLIT_OPS = (aten.split.Tensor, aten.split_with_sizes.default)


class SliceConfig(PassConfig):
    deterministic: bool = False  # take L0 gates' deterministic test-time values even while they still train


class HeadSelect(nn.Module):
    """`x.index_select(1, kept)`: an attention mask / position bias cut to the heads a layer kept."""

    def __init__(self, kept: list[int]):
        super().__init__()
        self.register_buffer("kept", torch.tensor(kept, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.kept)

    def describe(self) -> str:
        return f"HeadSelect {self.kept.tolist()}"


def _set(linear: CookedLinear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Give `linear` new (smaller) weight and bias tensors; a mask follows the weight's rows/columns."""
    grad = linear.weight.requires_grad
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad=grad)


def keep_rows(linear: CookedLinear, rows: torch.Tensor) -> None:
    mask = linear.weight_mask
    _set(linear, linear.weight.detach()[rows], None if linear.bias is None else linear.bias.detach()[rows])
    if mask is not None:
        linear.weight_mask = mask[rows]


def keep_columns(linear: CookedLinear, cols: torch.Tensor, scale: torch.Tensor, out_scale: float) -> None:
    """Keep input columns `cols`, scaled by `scale` (folded gates), and scale the output by `out_scale`."""
    mask = linear.weight_mask
    w = linear.weight.detach()[:, cols] * scale.to(linear.weight.dtype) * out_scale
    _set(linear, w, None if linear.bias is None else linear.bias.detach() * out_scale)
    if mask is not None:
        linear.weight_mask = mask[:, cols]


def _gate_values(cooked, path: str | None, count: int, deterministic: bool) -> torch.Tensor:
    if path is None:
        return torch.ones(count)
    gate = cooked.get_submodule(path)
    source = gate.source
    if source is not None and not getattr(source, "final", False) and not deterministic:
        raise PreconditionError(
            f"slice: the L0 gate at {path} is still stochastic (training has not fixed it); train to the end, or "
            "Slice(deterministic=True) to take its deterministic test-time values"
        )
    if source is not None:
        source.eval()  # the deterministic test-time gate
    with torch.no_grad():
        return gate.values().detach().float().cpu()


def _rows(offset: int, units: list[int], per_unit: int) -> list[int]:
    return [offset + u * per_unit + i for u in units for i in range(per_unit)]


def _rewrite_shape(shape, old: tuple[int, int], new: tuple[int, int], width: int, empty: bool):
    """A shape list with the head count (first inner constant equal to a head count) and the last-dim
    widths (head count x head dim) replaced by the kept ones; -1 made explicit when nothing is kept."""
    out, done = list(shape), False
    for i, s in enumerate(out):
        if not isinstance(s, int):
            continue
        if s == -1 and empty:
            out[i] = 0
        elif i == len(out) - 1:
            for o, n in zip(old, new):
                if s == o * width:
                    out[i] = n * width
                    break
        elif i > 0 and not done and s in old:
            out[i], done = new[old.index(s)], True
    return out


def _descendants(graph, starts) -> list:
    seen, stack = set(), list(starts)
    while stack:
        node = stack.pop()
        for user in node.users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return [n for n in graph.nodes if n in seen]


def _rewrite_core(cooked, a: Attention, kept_heads: list[int], kept_groups: int) -> None:
    """Rewrite the head counts the core graph hard-codes, and cut per-head masks to the kept heads."""
    core = cooked.get_submodule(a.path)
    graph = core.graph
    names = {p.path.rpartition(".")[2] for p in (a.q, a.k, a.v)}
    starts = [n for n in graph.nodes if n.op == "call_module" and n.target in names]
    old, new, empty = (a.heads, a.kv_heads), (len(kept_heads), kept_groups), not kept_heads
    for node in _descendants(graph, starts):
        if node.op != "call_function":
            continue
        if node.target in SHAPE_OPS:
            node.args = (node.args[0], _rewrite_shape(node.args[1], old, new, a.head_dim, empty), *node.args[2:])
        elif node.target in SPLIT_OPS:
            sizes = node.args[1]
            if isinstance(sizes, int):  # explicit sizes: a split into chunks of 0 would give no chunks at all
                node.target, sizes = aten.split_with_sizes.default, [sizes] * len(node.meta["val"])
            sizes = [_rewrite_shape([0, s], old, new, a.head_dim, empty)[1] for s in sizes]
            node.args = (node.args[0], sizes, *node.args[2:])
        elif node.target is SDPA and len(node.args) > 3 and isinstance(node.args[3], torch.fx.Node):
            mask = node.args[3]
            val = mask.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() == 4 and val.shape[1] == a.heads and a.heads > 1:
                name = G._gate_name(core, "head_select")
                core.add_module(name, HeadSelect(kept_heads))
                with graph.inserting_before(node):
                    cut = graph.create_node("call_module", name, (mask,))
                node.args = (*node.args[:3], cut, *node.args[4:])


def slice_attention(cooked, a: Attention, kept: list[int], z_heads: torch.Tensor, z_layer: float) -> None:
    width, group = a.head_dim, a.group
    heads = [u * group + g for u in kept for g in range(group)]
    q_rows = _rows(a.q.offset, heads, width)
    kv = {role: _rows(p.offset, kept, width) for role, p in (("k", a.k), ("v", a.v))}
    by_linear: dict[str, list[int]] = {}
    for path, rows in ((a.q.path, q_rows), (a.k.path, kv["k"]), (a.v.path, kv["v"])):
        by_linear.setdefault(path, []).extend(rows)
    for path, rows in by_linear.items():
        keep_rows(cooked.get_submodule(path), torch.tensor(sorted(rows), dtype=torch.long))
    cols = torch.tensor(_rows(0, heads, width), dtype=torch.long)
    scale = z_heads[kept].repeat_interleave(group * width) if kept else torch.ones(0)
    keep_columns(cooked.get_submodule(a.o), cols, scale, z_layer)
    _rewrite_core(cooked, a, heads, len(kept))


def slice_ffn(cooked, f: FFN, kept: list[int], z_units: torch.Tensor, z_layer: float) -> None:
    rows = torch.tensor(kept, dtype=torch.long)
    for path in (f.up, f.gate):
        if path:
            keep_rows(cooked.get_submodule(path), rows)
    keep_columns(cooked.get_submodule(f.down), rows, z_units[kept] if kept else torch.ones(0), z_layer)


class Slice(Pass):
    """Remove what Prune's gates switched off, fold the surviving gate values in, drop the gates."""

    name = "slice"
    Config = SliceConfig
    after = ("prune",)

    def record(self) -> dict:
        return {"kept": self.kept}

    def requires(self, cooked) -> None:
        if getattr(cooked, PLAN, None) is None:
            raise PreconditionError("slice: the model has no prune gates; run Prune before Slice")

    def _decide(self, cooked, layer: str, count: int, kinds: tuple[str, str], gate_paths) -> tuple:
        """(kept units, unit values, layer value) of one sublayer, from its gates or (restoring) the record."""
        unit_kind, layer_kind = kinds
        det = self.config.deterministic
        z_units = _gate_values(cooked, gate_paths.get(unit_kind), count, det)
        z_layer = float(_gate_values(cooked, gate_paths.get(layer_kind), 1, det)[0])
        if self.restoring:
            return self.restore["kept"][layer], torch.ones(count), 1.0
        return ([] if z_layer == 0 else kept_units(z_units)), z_units, z_layer

    def call(self, cooked) -> PassResult:
        plan = cooked.__dict__.pop(PLAN)
        atts, fs = structure_from(plan)
        self.kept, changes = {}, []
        for a in atts:
            kept, z, zl = self._decide(cooked, a.path, a.units, ("heads", "mha"), plan["gates"][a.path])
            slice_attention(cooked, a, kept, z, zl)
            self.kept[a.path] = kept
            changes.append(
                Change(a.path, f"{len(kept) * a.group}/{a.heads} heads kept" + ("" if kept else ", sublayer removed"))
            )
        for f in fs:
            kept, z, zl = self._decide(cooked, f.path, f.units, ("ffn", "ffn_layer"), plan["gates"][f.path])
            slice_ffn(cooked, f, kept, z, zl)
            self.kept[f.path] = kept
            changes.append(Change(f.path, f"FFN width {len(kept)}/{f.width}" + ("" if kept else ", sublayer removed")))
        for mine in plan["gates"].values():
            for path in mine.values():
                G.remove(cooked, path)
        cooked.regularisers[:] = [r for r in cooked.regularisers if getattr(r, "name", None) != "l0"]
        return self.finish(cooked, changes)

    def ensures(self, cooked) -> None:
        left = list(G.gates(cooked))
        if left:
            raise PreconditionError(f"slice: gates left on the model after slicing: {left[:5]}")
