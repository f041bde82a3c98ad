"""Structural graph comparison for Before/Expected rewrite tests: build the expected graph by hand from
the graph before the pass, then compare it node by node with the pass's result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch.fx import Graph, Node
from torch.fx.node import map_arg

DROP = object()  # returned by an edit: leave the node out of the rebuilt graph


@dataclass(frozen=True)
class Ref:
    """A node argument, as its position in its graph (so two graphs compare by structure, not by name)."""

    index: int


def _shape(node: Node, index: dict[Node, int]) -> tuple:
    ref = lambda n: Ref(index[n])
    return (
        node.op,
        node.target,
        map_arg(node.args, ref),
        map_arg(node.kwargs, ref),
        sorted(index[u] for u in node.users),
    )


def assert_same_graph(actual: Graph, expected: Graph) -> None:
    """`actual` has `expected`'s nodes in order: same op, target, argument structure and users."""
    got, want = list(actual.nodes), list(expected.nodes)
    gi, wi = {n: i for i, n in enumerate(got)}, {n: i for i, n in enumerate(want)}
    for i, (g, w) in enumerate(zip(got, want)):
        got_shape, want_shape = _shape(g, gi), _shape(w, wi)
        assert got_shape == want_shape, (
            f"node {i} differs:\n  got  {g.format_node()}\n  want {w.format_node()}"
            f"\n  got  {got_shape}\n  want {want_shape}"
        )
    assert len(got) == len(want), f"{len(got)} nodes, expected {len(want)}:\n{actual}\nexpected:\n{expected}"


def rebuilt(before: Graph, edit: Callable[[Graph, Node, dict[Node, Node]], object]) -> Graph:
    """A copy of `before` in which `edit(graph, node, env)` may emit other nodes for `node` (env maps
    `before`'s nodes to the new graph's): it returns the value `node`'s users see instead, `DROP` to
    leave `node` out, or None to copy `node` unchanged."""
    graph, env = Graph(), {}
    for node in before.nodes:
        out = edit(graph, node, env)
        if out is None:
            out = graph.node_copy(node, lambda n: env[n])
        if out is not DROP:
            env[node] = out
    return graph
