"""Lora / MergeLora: identity at init, exact merge, adapters over 2:4 and int8 bases, errors, save/load."""

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import nn

import fxcook
from fxcook.errors import PassError
from fxcook.passes import Lora, MergeLora, Quantize, Sparsify
from fxcook.passes.lora import adapters
from fxcook.testing import tiny_inputs, tiny_model

FAMILIES = ("bert", "gpt2", "llama")


@functools.cache
def _captured(family: str):
    model = tiny_model(family)
    return model, fxcook.compile(model, [], tiny_inputs(family))


def _out(model, x):
    out = model(**x)
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits).detach()


def _randomize(cooked, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cooked.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@settings(max_examples=8)
@given(family=st.sampled_from(FAMILIES), rank=st.integers(1, 16), alpha=st.floats(0.5, 64))
def test_adapters_leave_the_model_unchanged_at_init(family, rank, alpha):
    _, base = _captured(family)
    x = tiny_inputs(family, seed=rank)
    cooked = fxcook.apply(copy.deepcopy(base), [Lora(rank=rank, alpha=alpha)])
    assert torch.equal(_out(cooked, x), _out(base, x))
    branches = adapters(cooked)
    assert branches and all(b.rank == rank for b in branches.values())
    for path, b in branches.items():
        linear = cooked.get_submodule(path)
        assert b.lora_A.shape == (rank, linear.in_features) and b.lora_B.shape == (linear.out_features, rank)
        assert not linear.weight.requires_grad and b.lora_A.requires_grad


@settings(max_examples=6)
@given(family=st.sampled_from(FAMILIES), rank=st.integers(1, 8), seed=st.integers(0, 100))
def test_merge_is_exact_and_removes_the_branches(family, rank, seed):
    _, base = _captured(family)
    x = tiny_inputs(family, seed=seed)
    cooked = fxcook.apply(copy.deepcopy(base), [Lora(rank=rank)])
    _randomize(cooked, seed)
    before = _out(cooked, x)
    assert not torch.allclose(before, _out(base, x), atol=1e-3)  # the adapters do act
    fxcook.apply(cooked, [MergeLora()])
    torch.testing.assert_close(_out(cooked, x), before, atol=1e-5, rtol=1e-5)
    assert not adapters(cooked) and "_lora" not in cooked.graph_text()
    assert set(cooked.state_dict()) == set(base.state_dict())


def test_print_graph_shows_the_adapters():
    _, base = _captured("bert")
    cooked = fxcook.apply(copy.deepcopy(base), [Lora(rank=4, select={"include": ["query", "value"]})])
    text = cooked.graph_text()
    assert text.count("# LoRA rank 4, alpha 16") == 2 * 2  # query and value of both blocks
    assert "query_lora" in text and "key_lora" not in text


def test_lora_over_24_mask_trains_only_adapters_and_merge_remasks():
    _, base = _captured("bert")
    x = tiny_inputs("bert")
    cooked = fxcook.apply(copy.deepcopy(base), [Sparsify(pattern="2:4"), Lora(rank=4)])
    masked = fxcook.apply(copy.deepcopy(base), [Sparsify(pattern="2:4")])
    assert torch.equal(_out(cooked, x), _out(masked, x))  # the mask keeps acting under the adapter
    _out_grad = cooked(**x).last_hidden_state.square().sum()
    _out_grad.backward()
    q = cooked.get_submodule("encoder.layer.0.attention.self.query")
    assert q.weight.grad is None and adapters(cooked)["encoder.layer.0.attention.self.query"].lora_A.grad is not None
    _randomize(cooked)
    fxcook.apply(cooked, [MergeLora()])
    note = next(c.what for c in cooked.history[-1].changes if c.path == q_path(q, cooked))
    dropped = float(note.split("mask dropped ")[1].split("%")[0])
    assert 30 < dropped < 70, note  # a dense B A loses about half its norm to a 2:4 mask
    assert bool(((q.weight * q.weight_mask) == q.effective_weight()).all())


def q_path(mod, cooked):
    return next(p for p, m in cooked.named_modules() if m is mod)


def test_lora_over_int8_merges_and_requantizes():
    _, base = _captured("bert")
    x = tiny_inputs("bert")
    cooked = fxcook.apply(copy.deepcopy(base), [Quantize(learnable_scales=True), Lora(rank=4)])
    _randomize(cooked)
    before = _out(cooked, x)
    fxcook.apply(cooked, [MergeLora()])
    note = cooked.history[-1].changes[0].what
    assert "re-quantized int8/channel lsq" in note
    q = cooked.get_submodule("encoder.layer.0.attention.self.query")
    torch.testing.assert_close(q.weight_quant.scale, q.weight_quant.absmax_scale(q.weight.detach()))
    after = _out(cooked, x)
    assert float((after - before).norm() / before.norm()) < 0.05  # int8 rounding of the merged weight only


def test_ranks_per_pattern_and_by_importance_are_recorded_and_restored(tmp_path):
    _, base = _captured("bert")
    x = tiny_inputs("bert")
    cooked = fxcook.apply(copy.deepcopy(base), [Lora(rank=2, ranks={"query": 6, "layer.1.*value": 3})])
    ranks = {p: b.rank for p, b in adapters(cooked).items()}
    assert ranks["encoder.layer.0.attention.self.query"] == 6 and ranks["encoder.layer.1.attention.self.value"] == 3
    assert ranks["encoder.layer.0.attention.self.value"] == 2
    importance = {"encoder.layer.0": torch.tensor([0.1, 0.2, 0.0, 0.1]), "encoder.layer.1": torch.tensor([1.0, 0.0])}
    spec = {"by": "importance", "high": 8, "low": 4, "top_blocks": 1}
    cooked = fxcook.apply(copy.deepcopy(base), [Lora(ranks=spec, importance=importance)])
    ranks = {p: b.rank for p, b in adapters(cooked).items()}
    assert {r for p, r in ranks.items() if ".layer.1." in p} == {8} and {
        r for p, r in ranks.items() if ".layer.0." in p
    } == {4}
    _randomize(cooked, 3)
    loaded = fxcook.load(fxcook.save(cooked, tmp_path / "lora"))  # no importance data at load
    assert {p: b.rank for p, b in adapters(loaded).items()} == ranks
    torch.testing.assert_close(_out(loaded, x), _out(cooked, x))
    fxcook.apply(cooked, [MergeLora()])
    merged = fxcook.load(fxcook.save(cooked, tmp_path / "merged"))
    assert not adapters(merged)
    torch.testing.assert_close(_out(merged, x), _out(cooked, x))


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))])

    def forward(self, x):
        return self.layers[0](x)


def test_adapters_follow_a_sliced_layer():
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    cooked = fxcook.compile(_Mlp(), [], (x,))
    up, down = cooked.get_submodule("layers.0.0"), cooked.get_submodule("layers.0.2")
    keep = torch.arange(0, 32, 2)  # slice the hidden width to 16 (what a structured prune leaves)
    up.weight, up.bias = nn.Parameter(up.weight[keep].detach()), nn.Parameter(up.bias[keep].detach())
    down.weight = nn.Parameter(down.weight[:, keep].detach())
    ref = cooked(x).detach()
    fxcook.apply(cooked, [Lora(rank=16)])
    branches = adapters(cooked)
    assert branches["layers.0.0"].lora_B.shape == (16, 16) and branches["layers.0.2"].lora_A.shape == (16, 16)
    assert torch.equal(cooked(x), ref)
    _randomize(cooked)
    cooked(x).sum().backward()
    assert branches["layers.0.2"].lora_B.grad.shape == (16, 16)


def test_bad_input_is_refused_by_name():
    _, base = _captured("bert")
    with pytest.raises(ValidationError, match="rank"):
        Lora(rank=0)
    with pytest.raises(
        PassError, match=r"rank 40 for encoder\.layer\.0\.attention\.self\.query exceeds min\(in, out\)"
    ):
        fxcook.apply(copy.deepcopy(base), [Lora(rank=40)])
    with pytest.raises(PassError, match=r"is a .*not a CookedLinear; LoRA adapts linear sites only"):
        fxcook.apply(copy.deepcopy(base), [Lora(select={"kind": "ffn"})])
    with pytest.raises(PassError, match="merge_lora: the model has no LoRA adapters to merge"):
        fxcook.apply(copy.deepcopy(base), [MergeLora()])
    with pytest.raises(PassError, match="ranks pattern 'qurey' matches none"):
        fxcook.apply(copy.deepcopy(base), [Lora(ranks={"qurey": 4})])
    with pytest.raises(PassError, match="ranks by importance need importance="):
        fxcook.apply(copy.deepcopy(base), [Lora(ranks={"by": "importance"})])
    twice = fxcook.apply(copy.deepcopy(base), [Lora(rank=2)])
    with pytest.raises(PassError, match="already has an adapter"):
        fxcook.apply(twice, [Lora(rank=2)])
