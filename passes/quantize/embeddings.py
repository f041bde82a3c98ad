"""Embedding tables as int8: find captured embedding submodules and make them quantizable.

Capture leaves each `nn.Embedding` as a submodule whose graph is one `aten.embedding` on its own
weight. `cook_embeddings` swaps those for `CookedEmbedding` (same Parameter, same call signature),
so the Quantize pass can give them a per-row int8 `weight_quant` (weight-only: a lookup has no input
to quantize). Their ONNX form is `fxcook.runtime.lowering.EmbeddingInt8Export`.
"""

from __future__ import annotations

import torch
from torch import nn

from fxcook.nn import CookedEmbedding
from fxcook.tracing import parent_of

__all__ = ["cook_embeddings"]

aten = torch.ops.aten


def _table_lookup(mod: nn.Module) -> tuple[nn.Parameter, int] | None:
    """(weight, padding_idx) when `mod`'s graph is exactly `embedding(self.weight, ids)`, else None."""
    graph = getattr(mod, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return None
    ops = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1 or len(ops) != 2 or ops[0].op != "get_attr" or ops[1].target != aten.embedding.default:
        return None
    emb = ops[1]
    if emb.args[0] is not ops[0] or emb.args[1] is not inputs[0] or any(emb.args[3:]):
        return None  # scale_grad_by_freq / sparse lookups stay as captured
    weight = getattr(mod, ops[0].target)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
        return None
    return weight, (emb.args[2] if len(emb.args) > 2 else -1)


def cook_embeddings(cooked: nn.Module) -> dict[str, CookedEmbedding]:
    """Every embedding table of `cooked` as a CookedEmbedding, swapped in place; path -> module."""
    found = {}
    for path, mod in list(cooked.named_modules()):
        if isinstance(mod, CookedEmbedding):
            found[path] = mod
            continue
        lookup = _table_lookup(mod)
        if lookup is None or not path:
            continue
        found[path] = CookedEmbedding(*lookup)
        owner, name = parent_of(cooked, path)
        setattr(owner, name, found[path])
    return found
