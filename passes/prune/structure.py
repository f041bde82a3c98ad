"""Where the prunable structures of a captured model are: attention heads and FFN units per block.

Attention is found by data flow in the module graphs, not by names: each
`scaled_dot_product_attention` node is walked back through shape ops to the linears producing its
query, key and value (one fused linear and a split for GPT-2's `c_attn`), and forward, across module
boundaries where needed (BERT's `attention.self` -> `attention.output`), to the linear consuming its
output (the o projection). Head counts come from the linears' widths and the head dimension from the
query's shape, so grouped-query attention (fewer key/value heads) is seen as it is. FFNs come from
the site index (`ffn` sites, gated variants included).
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass

import torch
from torch.fx import Node

from fxcook.errors import PreconditionError
from fxcook.nn import CookedLinear
from fxcook.tracing import call_sites

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)
PASS_THROUGH = {  # ops a head's values flow through unchanged in meaning (reshapes, RoPE, GQA repeats)
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.contiguous.default, aten.clone.default, aten.expand.default, aten.unsqueeze.default, aten.slice.Tensor,
    aten.mul.Tensor, aten.add.Tensor, aten.neg.default, aten.cat.default, aten.to.dtype, aten.alias.default,
    aten.dropout.default, operator.getitem, *SPLITS,
}  # fmt: skip


@dataclass(frozen=True)
class Projection:
    """One of q/k/v: the linear computing it and where its rows start (non-zero inside a fused qkv)."""

    path: str
    offset: int = 0


@dataclass(frozen=True)
class Attention:
    """One attention sublayer: q/k/v/o linears, head layout, and the graph holding its core."""

    path: str  # the module holding the core (sdpa) graph
    block: str
    q: Projection
    k: Projection
    v: Projection
    o: str
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per key/value head: a gate unit holds one KV group (all its query heads)."""
        return self.heads // self.kv_heads

    @property
    def units(self) -> int:
        return self.kv_heads

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FFN:
    path: str
    block: str
    up: str
    gate: str | None
    down: str
    width: int

    @property
    def units(self) -> int:
        return self.width

    def as_dict(self) -> dict:
        return asdict(self)


def _qualify(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def _linear_of(cooked, owner: str, node: Node) -> str | None:
    if node.op != "call_module":
        return None
    path = _qualify(owner, node.target)
    return path if isinstance(cooked.get_submodule(path), CookedLinear) else None


def _projection(cooked, owner: str, start: Node, what: str, where: str) -> Projection:
    """Walk back from an sdpa operand to the one linear producing it (and its row offset in a fused qkv)."""
    stack, seen, found, picks = [start], set(), set(), {}
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        linear = _linear_of(cooked, owner, node)
        if linear is not None:
            found.add(linear)
            continue
        if node.op != "call_function" or node.target not in PASS_THROUGH:
            continue
        if node.target is operator.getitem and getattr(node.args[0], "target", None) in SPLITS:
            picks[node.args[0]] = node.args[1]
        stack.extend(a for a in node.all_input_nodes if isinstance(a.meta.get("val"), (torch.Tensor, list, tuple)))
    if len(found) != 1:
        raise PreconditionError(
            f"prune: the {what} of the attention at {where} comes from {sorted(found) or 'no linear'}, not from "
            f"one linear; this attention layout cannot be pruned by heads"
        )
    offset = 0
    for split, index in picks.items():
        sizes = split.args[1]
        sizes = [sizes] * (index + 1) if isinstance(sizes, int) else list(sizes)
        offset += sum(sizes[:index])
    return Projection(found.pop(), offset)


def _forward_to_linear(cooked, owner: str, node: Node, calls) -> str | None:
    """The first linear consuming `node`'s value through shape ops, following it out of its graph
    into the caller and into callee graphs."""
    for user in node.users:
        if user.op == "output":
            for site in calls.get(owner, []):
                found = _forward_to_linear(cooked, site.owner, site.node, calls)
                if found:
                    return found
            continue
        linear = _linear_of(cooked, owner, user)
        if linear is not None:
            return linear
        if user.op == "call_module":
            callee = cooked.get_submodule(_qualify(owner, user.target))
            graph = getattr(callee, "graph", None)
            if graph is None:
                continue
            placeholders = [n for n in graph.nodes if n.op == "placeholder"]
            index = user.args.index(node)
            found = _forward_to_linear(cooked, _qualify(owner, user.target), placeholders[index], calls)
            if found:
                return found
        elif user.op == "call_function" and user.target in PASS_THROUGH - {aten.mul.Tensor, aten.add.Tensor}:
            found = _forward_to_linear(cooked, owner, user, calls)
            if found:
                return found
    return None


def _width(cooked, path: str) -> int:
    return cooked.get_submodule(path).out_features


def attentions(cooked) -> list[Attention]:
    """Every sdpa attention of the model's blocks, in graph order."""
    calls = call_sites(cooked)
    out = []
    for owner, _, graph in cooked.graphs():
        block = cooked.sites.block_of(owner)
        for node in graph.nodes:
            if node.op != "call_function" or node.target is not SDPA or block is None:
                continue
            where = owner or "(root)"
            q, k, v = (
                _projection(cooked, owner, node.args[i], n, where) for i, n in enumerate(("query", "key", "value"))
            )
            o = _forward_to_linear(cooked, owner, node, calls)
            if o is None:
                raise PreconditionError(f"prune: no output projection found after the attention at {where}")
            head_dim = node.args[0].meta["val"].shape[-1]
            heads = cooked.get_submodule(o).in_features // head_dim
            kv_width = _width(cooked, k.path) if k.path != q.path else _width(cooked, k.path) - heads * head_dim
            kv_heads = kv_width // head_dim // (2 if k.path == v.path else 1)
            out.append(Attention(owner, block, q, k, v, o, heads, kv_heads, head_dim))
    return out


def ffns(cooked) -> list[FFN]:
    """The dense FFNs of the blocks (linear -> activation -> linear), from the site index."""
    out = []
    for site in cooked.sites.find("ffn"):
        block = cooked.sites.block_of(site.path)
        if block is None:
            continue
        info = site.info
        out.append(FFN(site.path, block, info["up"], info.get("gate"), info["down"], _width(cooked, info["up"])))
    return out


def structure_from(record: dict) -> tuple[list[Attention], list[FFN]]:
    """The structures a record lists (restore mode: no graph walk)."""
    atts = [
        Attention(**{**a, **{r: Projection(**a[r]) for r in ("q", "k", "v")}}) for a in record.get("attentions", [])
    ]
    return atts, [FFN(**f) for f in record.get("ffns", [])]
