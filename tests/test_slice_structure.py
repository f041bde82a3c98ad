"""Slice's structure: what is kept (KV groups, fused qkv parts), the graph constants it rewrites, the
per-layer position bias cut, removed sublayers as the exact residual passthrough, and its order errors."""

import copy

import pytest
import torch
from test_slice_exact import gated

import fxcook
from fxcook.nn import CookedLinear
from fxcook.passes.prune import Prune, Slice
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import main_output


def test_llama_gqa_slices_whole_kv_groups_and_rewrites_the_repeat():
    cooked = gated("llama", dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48, head_dim=8), 0)
    gate = cooked.get_submodule("model.layers.0.self_attn.head_gate")
    assert (gate.count, gate.width) == (3, 16)  # one gate per KV group of 2 query heads x 8 dims
    gate.mask = torch.tensor([1.0, 0.0, 1.0])
    sliced = fxcook.apply(copy.deepcopy(cooked), [Slice()])
    attn = sliced.get_submodule("model.layers.0.self_attn")
    assert attn.q_proj.weight.shape == (32, 48) and attn.k_proj.weight.shape == (16, 48)
    assert attn.v_proj.weight.shape == (16, 48) and attn.o_proj.weight.shape == (48, 32)
    shapes = [
        n.args[1]
        for n in attn.graph.nodes
        if n.target in (torch.ops.aten.expand.default, torch.ops.aten.reshape.default)
    ]
    consts = [[s for s in shape if isinstance(s, int)] for shape in shapes]
    assert [2, 2, 8] in consts  # expand [B, kv=2, group=2, S, 8] (was kv=3)
    assert [4, 8] in consts  # reshape [B, heads=4, S, 8] (was 6)
    q = cooked.get_submodule("model.layers.0.self_attn.q_proj").weight
    torch.testing.assert_close(attn.q_proj.weight, torch.cat([q[:16], q[32:]]))  # groups 0 and 2


def test_gpt2_fused_qkv_keeps_rows_of_each_part_and_rewrites_the_split():
    cooked = gated("gpt2", {}, 0)
    cooked.get_submodule("transformer.h.0.attn.head_gate").mask = torch.tensor([0.0, 1.0, 1.0, 0.0])
    sliced = fxcook.apply(copy.deepcopy(cooked), [Slice()])
    attn = sliced.get_submodule("transformer.h.0.attn")
    assert attn.c_attn.weight.shape == (48, 32) and attn.c_proj.weight.shape == (32, 16)
    w = cooked.get_submodule("transformer.h.0.attn.c_attn").weight
    torch.testing.assert_close(attn.c_attn.weight, torch.cat([w[8:24], w[40:56], w[72:88]]))
    (split,) = [n for n in attn.graph.nodes if n.target is torch.ops.aten.split_with_sizes.default]
    assert split.args[1] == [16, 16, 16]


def test_t5_position_bias_is_cut_to_each_layers_heads():
    cooked = gated("t5", {}, 0)
    cooked.get_submodule("encoder.block.0.layer.0.SelfAttention.head_gate").mask = torch.tensor([1.0, 0, 1, 1])
    cooked.get_submodule("encoder.block.1.layer.0.SelfAttention.head_gate").mask = torch.tensor([0.0, 1, 0, 0])
    sliced = fxcook.apply(copy.deepcopy(cooked), [Slice()])
    selects = {p: m.kept.tolist() for p, m in sliced.named_modules() if type(m).__name__ == "HeadSelect"}
    assert selects["encoder.block.0.layer.0.SelfAttention.head_select"] == [0, 2, 3]
    assert selects["encoder.block.1.layer.0.SelfAttention.head_select"] == [1]
    assert "HeadSelect [1]" in sliced.graph_text()


def test_removed_sublayer_is_the_residual_passthrough_post_ln_bert():
    """All heads and FFN units of a post-LN layer off: the layer computes LayerNorm(LayerNorm(x + b_o) + b_down)
    with zero-width projections, exactly as the gated model does."""
    cooked = gated("bert", {}, 0)
    for name in ("attention.output.mha_gate", "output.ffn_gate"):
        cooked.get_submodule(f"encoder.layer.1.{name}").mask.zero_()
    sliced = fxcook.apply(copy.deepcopy(cooked), [Slice()])
    layer = sliced.get_submodule("encoder.layer.1")
    assert layer.attention.self.query.weight.shape == (0, 32) and layer.output.dense.weight.shape == (32, 0)
    x, seen = tiny_inputs("bert", seed=3), {}
    hook = sliced.get_submodule("encoder.layer.0").register_forward_hook(lambda m, a, out: seen.update(h=out))
    with torch.no_grad():
        got, want = main_output(sliced(**x)), main_output(cooked(**x))
        hook.remove()
        by_hand = layer.output.LayerNorm(layer.attention.output.LayerNorm(seen["h"]) + layer.output.dense.bias)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, by_hand)
    assert not layer.attention.output.dense.bias.detach().any()  # the mha gate (0) folded into o's bias


def test_slice_needs_prune_and_runs_after_it():
    model, x = tiny_model("bert"), tiny_inputs("bert")
    with pytest.raises(fxcook.PassError, match="no prune gates; run Prune before Slice"):
        fxcook.compile(model, [Slice()], example_inputs=x)
    with pytest.raises(fxcook.PassError, match="'slice' must run after 'prune'"):
        fxcook.compile(model, [Slice(), Prune(calibration=[x])], example_inputs=x)


def test_sliced_linears_are_smaller_and_report_counts_them():
    cooked = gated("bert", {}, 0)
    before = sum(m.weight.numel() for m in cooked.modules() if isinstance(m, CookedLinear))
    sliced = fxcook.apply(copy.deepcopy(cooked), [Slice()])
    after = sum(m.weight.numel() for m in sliced.modules() if isinstance(m, CookedLinear))
    assert after < before
    assert "heads kept" in sliced.report() and "FFN width" in sliced.report()
