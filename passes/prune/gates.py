"""Structure gates: `x * z` on the activations a structure owns, visible as call_module nodes.

A head gate sits on the input of the o projection (one value per KV group, repeated over the group's
columns), a unit gate on the input of the FFN down projection, and a layer gate on the output of the o
or down projection (the whole sublayer's contribution to the residual). `z` is the `mask` buffer (0/1
after importance pruning, saved with the model) or, with `source` set, a hard-concrete sample (L0).
`Slice` folds `z` into the projections and removes the gates.
"""

from __future__ import annotations

import torch
from torch import nn

from fxcook.errors import PassError
from fxcook.tracing import call_sites

KINDS = {"heads": "HeadGate", "ffn": "UnitGate", "mha": "LayerGate", "ffn_layer": "LayerGate"}
NAMES = {"heads": "head_gate", "ffn": "unit_gate", "mha": "mha_gate", "ffn_layer": "ffn_gate"}


class Gate(nn.Module):
    """`x * repeat_interleave(z, width)`: `count` structures of `width` channels each along x's last dim."""

    def __init__(self, kind: str, count: int, width: int):
        super().__init__()
        self.kind, self.count, self.width = kind, count, width
        self.register_buffer("mask", torch.ones(count))
        self.source: nn.Module | None = None  # a HardConcrete (method="l0"): z comes from its log_alpha

    def values(self) -> torch.Tensor:
        return self.source() if self.source is not None else self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.values().to(x.dtype)
        return x * (z.repeat_interleave(self.width) if self.width > 1 else z)

    def kept(self) -> int:
        return int((self.values().detach() != 0).sum())

    def describe(self) -> str:
        """`HeadGate 3/4 on (hard-concrete)`: what print_graph and the report show beside the node."""
        how = ", hard-concrete" if self.source is not None else ""
        return f"{KINDS[self.kind]} {self.kept()}/{self.count} on{how}"

    def extra_repr(self) -> str:
        return f"kind={self.kind}, count={self.count}, width={self.width}"


def call_of(cooked, path: str):
    """The single CallSite of the module at `path` (a structure's projection is called once)."""
    sites = call_sites(cooked).get(path, [])
    if len(sites) != 1:
        raise PassError(f"prune: {path} is called {len(sites)} times in the graphs, expected once")
    return sites[0]


def _gate_name(owner: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(owner, name):
        name, i = f"{base}_{i}", i + 1
    return name


def install(cooked, kind: str, linear: str, gate: Gate, on_output: bool) -> str:
    """Put `gate` on the input (or output) of the linear at `linear`, in the graph calling it; returns its path."""
    site = call_of(cooked, linear)
    owner, node, graph = site.module, site.node, site.module.graph
    name = _gate_name(owner, NAMES[kind])
    owner.add_module(name, gate)
    if on_output:
        with graph.inserting_after(node):
            gated = graph.create_node("call_module", name, (node,))
        node.replace_all_uses_with(gated, delete_user_cb=lambda user: user is not gated)
    else:
        with graph.inserting_before(node):
            gated = graph.create_node("call_module", name, (node.args[0],))
        node.args = (gated, *node.args[1:])
    return f"{site.owner}.{name}" if site.owner else name


def remove(cooked, path: str) -> None:
    """Take the gate at `path` out of its graph (its input flows on) and off the model."""
    site = call_of(cooked, path)
    site.node.replace_all_uses_with(site.node.args[0])
    site.module.graph.erase_node(site.node)
    delattr(site.module, path.rpartition(".")[2])


def gates(cooked) -> dict[str, Gate]:
    return {p: m for p, m in cooked.named_modules() if isinstance(m, Gate)}
