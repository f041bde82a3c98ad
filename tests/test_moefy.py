"""Moefy: exact with all experts, routed compute equals the masked-FFN semantics, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import fxcook
from fxcook.errors import PassError, PreconditionError
from fxcook.nn import CookedLinear
from fxcook.passes import Moefy, Quantize, Relufy, Sparsify
from fxcook.passes.moefy.partition import balanced_kmeans, coactivation_partition
from fxcook.passes.moefy.routed import ExpertLinear, MoEFFN, masked_ffn, routed_ffn
from fxcook.passes.moefy.router import router_recall, train_router
from fxcook.passes.quantize.quantizers import TokenQuant, WeightQuant
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import main_output


@settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    family=st.sampled_from(["bert", "gpt2", "t5", "llama"]),
    experts=st.sampled_from([2, 4, 8, 16]),
    router=st.sampled_from(["oracle", "mlp"]),
    method=st.sampled_from(["kmeans", "coactivation"]),
    seed=st.integers(0, 3),
)
def test_all_experts_reproduce_the_model(family, experts, router, method, seed):
    model, inputs = tiny_model(family, seed=seed), tiny_inputs(family, seed=seed)
    other = tiny_inputs(family, batch=3, seq=5, seed=seed + 1)  # dynamic shapes still work
    relu = fxcook.compile(model, [Relufy()], example_inputs=inputs)
    refs = [main_output(relu(**inputs)), main_output(relu(**other))]
    moefy = Moefy(calibration=[inputs], experts=experts, top_k=experts, router=router, method=method, epochs=2)
    cooked = fxcook.compile(model, [Relufy(), moefy], example_inputs=inputs)
    for batch, ref in zip((inputs, other), refs):
        torch.testing.assert_close(main_output(cooked(**batch)), ref, rtol=1e-4, atol=1e-5)
    moes = [m for m in cooked.modules() if isinstance(m, MoEFFN)]
    assert len(moes) == len(cooked.sites.find("ffn")) > 0
    assert all(0.0 <= s["recall"] <= 1.0 for s in moefy.stats.values())
    ffn_linears = {s.info[k] for s in cooked.sites.find("ffn") for k in ("up", "gate", "down") if s.info.get(k)}
    assert not any(isinstance(m, CookedLinear) for p, m in cooked.named_modules() if p in ffn_linears)


def _ffn(d=16, width=32, gated=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = lambda o, i: CookedLinear(torch.randn(o, i, generator=g) / i**0.5, torch.randn(o, generator=g) * 0.1)
    return lin(width, d), lin(d, width), (lin(width, d) if gated else None)


@settings(max_examples=20, deadline=None)
@given(
    experts=st.sampled_from([2, 4, 8]),
    k=st.integers(1, 8),
    gated=st.booleans(),
    act=st.sampled_from(["relu", "silu", "gelu"]),
    seed=st.integers(0, 100),
)
def test_routed_topk_equals_masked_dense_ffn(experts, k, gated, act, seed):
    """Only the chosen experts run, and the result is the dense FFN with the others' neurons zeroed."""
    k = min(k, experts)
    up, down, gate = _ffn(gated=gated, seed=seed)
    labels = balanced_kmeans(F.normalize(up.weight.detach(), dim=1), experts, seed=seed)
    moe = MoEFFN(up, down, act, labels, experts, k, gate=gate, router="mlp")
    x = torch.randn(11, 16, generator=torch.Generator().manual_seed(seed))
    keep = torch.zeros(11, experts).scatter(1, moe.scores(x).topk(k, -1).indices, 1.0)
    h = (moe.intermediate(x) * keep[..., None]).reshape(11, -1)
    want = F.linear(h, moe.down.dense_weight(), moe.down.bias)
    torch.testing.assert_close(moe.eval()(x), want, rtol=1e-4, atol=1e-5)  # routed: chosen experts only
    torch.testing.assert_close(moe.train()(x), want, rtol=1e-4, atol=1e-5)  # training: masked dense


@settings(max_examples=25, deadline=None)
@given(
    experts=st.sampled_from([2, 4, 8]),
    k=st.integers(1, 8),
    gated=st.booleans(),
    act=st.sampled_from(["relu", "silu"]),
    seed=st.integers(0, 100),
)
def test_training_form_has_the_routed_values_and_gradients(experts, k, gated, act, seed):
    """masked_ffn (what training runs) computes routed_ffn's output and the same gradients for the
    input and every weight."""
    k, m, d, t = min(k, experts), 3, 8, 13
    g = torch.Generator().manual_seed(seed)
    leaf = lambda *shape: torch.randn(*shape, generator=g).requires_grad_()  # noqa: E731
    weights = [leaf(experts, m, d), leaf(experts, m), leaf(experts, m, d) if gated else None]
    weights += [leaf(experts, m) if gated else None, leaf(experts, d, m), leaf(d)]
    x, scores = leaf(t, d), torch.randn(t, experts, generator=g)
    probe = torch.randn(t, d, generator=g)
    got = []
    for ffn in (routed_ffn, masked_ffn):
        y = ffn(x, scores, *weights[:4], weights[4], weights[5], k, act)
        leaves = [x, *(w for w in weights if w is not None)]
        got.append((y, torch.autograd.grad((y * probe).sum(), leaves)))
    (y_routed, g_routed), (y_masked, g_masked) = got
    torch.testing.assert_close(y_masked, y_routed, rtol=1e-4, atol=1e-4)
    for a, b in zip(g_masked, g_routed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(
    split=st.sampled_from(["out", "in"]),
    quant=st.sampled_from([{}, {"group_size": 4}, {"learnable": True}]),
    experts=st.sampled_from([2, 4, 8]),
    seed=st.integers(0, 100),
)
def test_expert_weights_quantize_as_in_the_original_order(split, quant, experts, seed):
    """An expert projection's int8 weights (masked, per channel, per group or LSQ) are the original
    linear's fake-quantized weights permuted: equal values, gradients to float tolerance."""
    g = torch.Generator().manual_seed(seed)
    shape = (8 * experts, 12) if split == "out" else (12, 8 * experts)
    lin = CookedLinear(torch.randn(*shape, generator=g))
    lin.weight_mask = (torch.rand(*shape, generator=g) > 0.5).float()
    lin.weight_quant = WeightQuant(8, weight=lin.weight.detach(), **quant) if quant else WeightQuant(8)
    expert = ExpertLinear(lin, torch.randperm(8 * experts, generator=g), experts, split)
    want = expert._to_experts(lin.weight_quant(lin.weight * lin.weight_mask))
    got = expert.effective_weight()
    assert torch.equal(got, want)
    probe = torch.randn(got.shape, generator=g)
    (grad,) = torch.autograd.grad((got * probe).sum(), expert.weight)
    (ref,) = torch.autograd.grad((want * probe).sum(), lin.weight)
    torch.testing.assert_close(grad, expert._to_experts(ref), rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(experts=st.sampled_from([2, 4, 8]), k=st.integers(1, 8), seed=st.integers(0, 100), gated=st.booleans())
def test_permuting_experts_changes_nothing(experts, k, seed, gated):
    k = min(k, experts)
    up, down, gate = _ffn(gated=gated, seed=seed)
    labels = balanced_kmeans(F.normalize(up.weight.detach(), dim=1), experts, seed=seed)
    relabel = torch.randperm(experts, generator=torch.Generator().manual_seed(seed))
    a = MoEFFN(up, down, "relu", labels, experts, k, gate=gate, router="oracle")
    b = MoEFFN(up, down, "relu", relabel[labels], experts, k, gate=gate, router="oracle")
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(seed + 1))
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(experts=st.sampled_from([2, 3, 4, 6, 8]), per=st.integers(1, 8), dim=st.integers(2, 8), seed=st.integers(0, 50))
def test_partitions_have_equal_sizes(experts, per, dim, seed):
    g = torch.Generator().manual_seed(seed)
    labels = balanced_kmeans(torch.randn(experts * per, dim, generator=g), experts, seed=seed)
    assert torch.bincount(labels, minlength=experts).tolist() == [per] * experts
    acts = torch.relu(torch.randn(40, experts * per, generator=g))
    labels = coactivation_partition(acts, experts, seed=seed)
    assert torch.bincount(labels, minlength=experts).tolist() == [per] * experts


def test_router_recall_is_share_of_mass():
    mass = torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0]])
    assert router_recall(mass, mass, 1) == pytest.approx(5 / 8)
    assert router_recall(mass, mass, 4) == pytest.approx(1.0)
    assert router_recall(-mass, mass, 2) == pytest.approx(0.0)


def test_mlp_router_training_raises_recall():
    """From a scrambled router, BCE training on the experts' activation mass lifts held-out recall
    well above chance (k/E); the recall is reported with the split sizes."""
    up, down, _ = _ffn(d=16, width=64, seed=3)
    labels = balanced_kmeans(F.normalize(up.weight.detach(), dim=1), 8)
    moe = MoEFFN(up, down, "relu", labels, 8, 2, router="mlp")
    torch.nn.init.normal_(moe.router.proj.weight, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3000, 16, generator=torch.Generator().manual_seed(0))
    mass = moe.expert_mass(x).detach()
    before = router_recall(moe.router(x).detach(), mass, 2)
    stats = train_router(moe.router, x, mass, 2, epochs=15, progress=False)
    assert stats["recall"] > before + 0.1 and stats["recall"] > 2 / 8 + 0.1
    assert stats["val_tokens"] == 300 and stats["train_tokens"] == 2700


def test_gradients_reach_experts_and_router():
    up, down, gate = _ffn(gated=True)
    moe = MoEFFN(up, down, "relu", torch.arange(32) % 4, 4, 2, gate=gate, router="mlp")
    x = torch.randn(7, 16)
    moe(x).pow(2).sum().backward()
    assert moe.up.weight.grad.abs().sum() > 0 and moe.down.weight.grad.abs().sum() > 0
    assert moe.gate.weight.grad.abs().sum() > 0
    assert moe.router.proj.weight.grad is None  # top-k indices carry no gradient: the router learns by BCE


def test_composes_with_quantize_and_sparsify():
    """Experts inherit int8 fake-quant and 2:4 masks, all but the hidden states' activation quantizer
    (they stay float, as in every routed runtime): with all experts active the model is the dense
    one with float FFN hidden states."""
    model, inputs = tiny_model("bert", seed=1), tiny_inputs("bert", seed=1)
    base = [Relufy(), Sparsify(pattern="2:4", method="magnitude"), Quantize(weights="int8/channel", acts="int8/token")]
    ref = fxcook.compile(model, base, example_inputs=inputs)
    full = fxcook.compile(model, [*base, Moefy(experts=4, top_k=4, router="oracle")], example_inputs=inputs)
    downs = [m for p, m in ref.named_modules() if p.endswith("output.dense") and ".attention." not in p]
    assert downs and all(isinstance(m.input_quant, TokenQuant) for m in downs)
    with torch.no_grad():
        quantized_hidden = ref(**inputs).last_hidden_state
        for m in downs:
            m.input_quant = None
        torch.testing.assert_close(
            full(**inputs).last_hidden_state, ref(**inputs).last_hidden_state, rtol=1e-4, atol=1e-4
        )
    assert not torch.allclose(quantized_hidden, ref(**inputs).last_hidden_state, atol=1e-4)  # the difference is real
    half = fxcook.compile(model, [*base, Moefy(experts=4, top_k=2, router="oracle")], example_inputs=inputs)
    moe = next(m for m in half.modules() if isinstance(m, MoEFFN))
    assert moe.up.bits == 8 and moe.weight_bits == 8 and moe.down.density == pytest.approx(0.5)
    assert isinstance(moe.up.input_quant, TokenQuant) and moe.down.input_quant is None
    # int8 (1/4) x 2:4 (1/2) x 2 of 4 experts (1/2) = 1/16 of the dense fp32 FFN weights
    assert moe.activated_params() == pytest.approx(moe.up.weight.numel() * 2 / 16)
    assert half.history[-1].activated < ref.history[-1].activated


def test_errors_are_clear():
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    with pytest.raises(PassError, match="Relufy"):
        fxcook.compile(model, [Moefy(experts=4, top_k=2, router="oracle")], example_inputs=inputs)
    with pytest.raises(PassError, match="does not divide"):
        fxcook.compile(model, [Relufy(), Moefy(experts=5, top_k=2, router="oracle")], example_inputs=inputs)
    with pytest.raises(Exception, match="top_k=5 is larger than experts=4"):
        Moefy(experts=4, top_k=5)
    with pytest.raises(PassError, match="calibration"):
        fxcook.compile(model, [Relufy(), Moefy(experts=4, top_k=2)], example_inputs=inputs)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(PassError, match="no FFN found"):
        fxcook.compile(plain, [Moefy(experts=2, top_k=1, router="oracle")], example_inputs=(torch.randn(2, 8),))
    with pytest.raises(ValueError, match="do not divide"):
        up, down, _ = _ffn()
        MoEFFN(up, down, "relu", torch.arange(32) % 4, 3, 1)
    with pytest.raises(PreconditionError):
        Moefy(experts=2, top_k=1, router="oracle").requires(fxcook.capture(model, inputs))
