"""Graph surgery on one block call: bypass it (the residual stream passes through) or gate it.

A block's call in its parent graph returns either its hidden state or a tuple (T5's first block also
returns the position bias the later blocks read). The hidden state is the output shaped like the
block's hidden-state input, which is the last float argument of that shape. Bypassing rewires every
user of that output to the input; any other output still in use means the block computes something
the rest of the model needs, and it cannot be dropped.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn

from fxcook.errors import PreconditionError
from fxcook.sites import SiteIndex
from fxcook.tracing import call_sites

GATE_PREFIX = "fxcook_drop_gate_"


def _shape(node) -> str | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return str(tuple(val.shape)) if isinstance(val, torch.Tensor) and val.is_floating_point() else None


@dataclass
class BlockCall:
    """The one call of a block: its graph's owner, the call node, its hidden output and input nodes."""

    owner: nn.Module
    call: torch.fx.Node
    out: torch.fx.Node
    hidden: torch.fx.Node
    others: list[torch.fx.Node]  # the call's other outputs (getitem nodes)


def block_call(cooked, path: str) -> BlockCall:
    """Find the single call of block `path` and its hidden-state output and input."""
    calls = call_sites(cooked).get(path, [])
    if len(calls) != 1:
        raise PreconditionError(
            f"droplayers: block {path} is called {len(calls)} times in the graph (a shared, ALBERT-style block?); "
            f"only a block called once can be dropped"
        )
    _, owner, call = calls[0]
    if isinstance(call.meta.get("val"), torch.Tensor):
        leaves = [call]
    else:
        leaves = [u for u in call.users if u.op == "call_function" and u.target is operator.getitem]
        if len(leaves) != len(call.users):
            raise PreconditionError(
                f"droplayers: the output of block {path} is used whole; cannot tell its hidden state"
            )
    args = [a for a in call.all_input_nodes if _shape(a) is not None]
    for leaf in leaves:
        same = [a for a in args if _shape(a) == _shape(leaf)]
        if same:
            return BlockCall(owner, call, leaf, same[-1], [u for u in leaves if u is not leaf])
    raise PreconditionError(f"droplayers: no output of block {path} is shaped like one of its inputs")


def check_bypassable(cooked, path: str) -> BlockCall:
    site = block_call(cooked, path)
    used = [o.name for o in site.others if o.users]
    if used:
        raise PreconditionError(
            f"droplayers: block {path} also returns {used} which the rest of the model reads (e.g. T5's first "
            f"block computes the position bias of the whole stack); keep it (keep_first_last=True) or drop others"
        )
    return site


def bypass(cooked, path: str) -> None:
    """Remove block `path`: its hidden output becomes its input; its module and parameters go."""
    site = check_bypassable(cooked, path)
    graph = site.call.graph
    site.out.replace_all_uses_with(site.hidden)
    for node in [*site.others, *([site.out] if site.out is not site.call else []), site.call]:
        graph.erase_node(node)
    parent, name = cooked.parent(path)
    delattr(parent, name)
    cooked.sites = SiteIndex(s for s in cooked.sites.sites if not _under(s.path, path))
    cooked.module_types = {p: t for p, t in cooked.module_types.items() if not _under(p, path)}


def _under(p: str, block: str) -> bool:
    return p == block or p.startswith(block + ".")


class BlockGate(nn.Module):
    """Passes a block's output while `on`, its input once off: a block dropped during training keeps its
    place (the state's shapes stay fixed for checkpoints) until the run settles."""

    def __init__(self, block: str):
        super().__init__()
        self.block = block
        self.register_buffer("on", torch.ones(()))

    def forward(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.on > 0, out, x)

    def describe(self) -> str:
        return f"BlockGate({self.block}: {'on' if self.on > 0 else 'dropped'})"


def gate_name(path: str) -> str:
    return GATE_PREFIX + path.replace(".", "_")


def add_gate(cooked, path: str) -> BlockGate:
    """Route block `path`'s hidden output through a BlockGate in its parent graph."""
    site = check_bypassable(cooked, path)
    gate, name = BlockGate(path), gate_name(path)
    site.owner.add_module(name, gate)
    graph = site.call.graph
    with graph.inserting_after(site.out):
        node = graph.create_node("call_module", name, (site.out, site.hidden))
    node.meta["val"] = site.out.meta.get("val")
    site.out.replace_all_uses_with(node, delete_user_cb=lambda u: u is not node)
    return gate


def remove_gate(cooked, path: str) -> None:
    """Take block `path`'s gate out of the graph again (the block's output flows as before)."""
    calls, name = call_sites(cooked), gate_name(path)
    owner_path = calls[path][0].owner
    for _, owner, node in calls.get(f"{owner_path}.{name}" if owner_path else name, []):
        node.replace_all_uses_with(node.args[0])
        node.graph.erase_node(node)
        delattr(owner, name)
