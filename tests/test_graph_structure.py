"""Before/Expected structural tests of the graph rewrites: the expected graph is built by hand from
the graph before the pass and compared node by node (op, target, arguments, users) with the result;
outputs are checked numerically as well."""

from __future__ import annotations

import copy

import pytest
import torch
from graphs import DROP, assert_same_graph, rebuilt
from torch import nn

import fxcook
from fxcook.passes import Moefy, Quantize, Relufy, Tap
from fxcook.passes.moefy.routed import MoEFFN
from fxcook.passes.quantize.experts import grouped_gemm_ops
from fxcook.testing import tiny_inputs, tiny_model


def before_after(family: str, passes: list, **inputs):
    x = tiny_inputs(family, **inputs)
    model = tiny_model(family, seed=1)
    before = fxcook.capture(model, x)
    return before, fxcook.apply(copy.deepcopy(before), passes), x


def only(graph: torch.fx.Graph, op: str, target) -> torch.fx.Node:
    (node,) = [n for n in graph.nodes if n.op == op and n.target == target]
    return node


def test_tap_inserts_post_and_pre_nodes():
    before, after, x = before_after("bert", [Tap("[post]encoder.layer.0", "[pre]encoder.layer.1")])
    graph = before.get_submodule("encoder").graph
    layer0, layer1 = only(graph, "call_module", "layer.0"), only(graph, "call_module", "layer.1")
    hidden = layer1.args[3]  # layer 1's hidden-state input: layer 0's output

    def edit(g, node, env):
        if node is layer0:
            return g.call_module("fxcook_tap_post_layer_0", (g.node_copy(node, lambda m: env[m]),))
        if node is layer1:
            tap = g.call_module("fxcook_tap_pre_layer_1", (env[hidden],))
            return g.node_copy(node, lambda n: tap if n is hidden else env[n])
        return None

    assert_same_graph(after.get_submodule("encoder").graph, rebuilt(graph, edit))
    for (path, mod, g), (_, _, g0) in zip(after.graphs(), before.graphs(), strict=True):
        if path != "encoder":
            assert_same_graph(g, g0)
    torch.testing.assert_close(after(**x).last_hidden_state, before(**x).last_hidden_state)


def test_moefy_local_form_replaces_the_ffn_by_one_call():
    before, after, x = before_after("llama", [Relufy(), Moefy(experts=4, top_k=4, router="oracle")])
    for layer in ("model.layers.0.mlp", "model.layers.1.mlp"):
        graph = before.get_submodule(layer).graph
        down = only(graph, "call_module", "down_proj")
        body = {only(graph, "call_module", t) for t in ("gate_proj", "act_fn", "up_proj")} | {down.args[0]}
        x_in = down.args[0].args[1].args[0]  # up_proj's input

        def edit(g, node, env, down=down, body=body, x_in=x_in):
            if node in body:
                return DROP
            if node is down:
                return g.call_module("moe", (env[x_in],))
            return None

        assert_same_graph(after.get_submodule(layer).graph, rebuilt(graph, edit))
        assert isinstance(after.get_submodule(f"{layer}.moe"), MoEFFN)
        assert not hasattr(after.get_submodule(layer), "down_proj")
    relu = fxcook.apply(copy.deepcopy(before), [Relufy()])
    torch.testing.assert_close(after(**x).logits, relu(**x).logits, rtol=1e-4, atol=1e-4)


def test_moefy_split_form_keeps_every_graph_and_swaps_modules():
    before, after, x = before_after("bert", [Relufy(), Moefy(experts=4, top_k=4, router="oracle")])
    relu = fxcook.apply(copy.deepcopy(before), [Relufy()])
    graphs, graphs0 = ({path: g for path, _, g in m.graphs()} for m in (after, before))
    acts = {f"encoder.layer.{i}.intermediate.intermediate_act_fn" for i in (0, 1)}
    assert set(graphs) == set(graphs0) - acts  # the activations' own graphs went with them
    for path, g in graphs.items():
        assert_same_graph(g, graphs0[path])  # split form: the calls stay, the modules they reach change
    for i in (0, 1):
        layer = f"encoder.layer.{i}"
        assert isinstance(after.get_submodule(f"{layer}.intermediate.dense"), MoEFFN)
        for path in (f"{layer}.intermediate.intermediate_act_fn", f"{layer}.output.dense"):
            assert type(after.get_submodule(path)) is nn.Identity, path
    torch.testing.assert_close(after(**x).last_hidden_state, relu(**x).last_hidden_state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_expert_quantization_inserts_weight_and_input_quantizers(family):
    before, after, x = before_after(family, [Quantize(weights="int8/channel", acts="int8/token")], seed=1)
    owners = sorted({s.path.rpartition(".")[0] for s in before.sites.find("expert_bmm")})
    assert owners
    for owner in owners:
        graph = before.get_submodule(owner).graph
        gemms = [n for n in graph.nodes if n.op == "call_function" and n.target in grouped_gemm_ops()]
        weight_of = {g: g.args[1].args[0].target for g in gemms}  # gemm <- transpose <- get_attr <param>
        assert sorted(weight_of.values()) == ["down_proj", "gate_up_proj"]

        def edit(g, node, env, weight_of=weight_of):
            if node.op == "get_attr" and node.target in weight_of.values():
                return g.call_module(f"{node.target}_quant", (g.node_copy(node, lambda m: env[m]),))
            if node in weight_of:
                tokens = node.args[0]
                quant = g.call_module(f"{weight_of[node]}_input_quant", (env[tokens],))
                return g.node_copy(node, lambda m: quant if m is tokens else env[m])
            return None

        assert_same_graph(after.get_submodule(owner).graph, rebuilt(graph, edit))
    torch.testing.assert_close(after(**x).logits, before(**x).logits, rtol=0.1, atol=0.1)
