"""L0 machinery: hard-concrete gates, the expected size they imply, and the Lagrangian that meets a target.

Properties: the sampled gate's P(z != 0) and P(z = 1) match their closed forms (Monte Carlo, over
log_alpha), z lies in [0, 1], the test-time gate is deterministic with round(E[#zeros]) zeros, task
gradients reach log_alpha through z, ExpectedSize equals brute-force enumeration (nested and repeated
gates), and training against the Lagrangian holds the expected sparsity at the target against a task
loss that wants every gate open.
"""

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxcook.errors import FxcookError
from fxcook.passes.prune.l0 import (
    BETA,
    LEFT,
    LOG_ALPHA_MAX,
    LOG_ALPHA_MIN,
    RIGHT,
    ExpectedSize,
    HardConcrete,
    L0Regulariser,
    Lagrangian,
    SizeTerm,
)

DRAWS = 40_000
log_alphas = st.floats(LOG_ALPHA_MIN, LOG_ALPHA_MAX)


def _gate(values) -> HardConcrete:
    gate = HardConcrete(len(values))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(values, dtype=torch.float32))
    return gate


@given(log_alphas, st.integers(0, 2**31 - 1))
def test_sampled_gate_matches_closed_form_probabilities(log_alpha, seed):
    torch.manual_seed(seed)
    gate = _gate([log_alpha] * DRAWS).train()
    z = gate()
    assert bool(((z >= 0) & (z <= 1)).all())
    p_open = float(gate.prob_nonzero().detach()[0])
    # z = 1 exactly when s >= (1 - l) / (r - l): the same logistic argument with another threshold
    p_one = 1 / (1 + math.exp(-(log_alpha - BETA * math.log((1 - LEFT) / (RIGHT - 1)))))
    for observed, p in ((float((z != 0).float().mean()), p_open), (float((z == 1).float().mean()), p_one)):
        assert abs(observed - p) <= 5 * math.sqrt(p * (1 - p) / DRAWS) + 1e-3, (log_alpha, observed, p)


@given(st.lists(log_alphas, min_size=1, max_size=12))
def test_test_time_gate_is_deterministic_with_expected_zero_count(values):
    gate = _gate(values).eval()
    z = gate()
    assert torch.equal(z, gate())
    zeros = round(float(gate.expected_zeros().detach()))
    assert int((z == 0).sum()) >= zeros  # a soft value may underflow to 0 too
    soft = torch.sigmoid(gate.log_alpha.detach() / BETA * 0.8)
    kept = z != 0
    torch.testing.assert_close(z[kept], soft[kept])
    if zeros and bool(kept.any()):
        assert float(soft[~kept].max()) <= float(soft[kept].min())


def test_task_gradients_reach_log_alpha_through_z():
    torch.manual_seed(0)
    gate = _gate([0.0] * 64).train()
    z = gate()
    (z * torch.arange(1.0, 65.0)).sum().backward()
    inside = (z > 0) & (z < 1)
    assert bool(inside.any())
    grad = gate.log_alpha.grad
    assert grad is not None and bool((grad[inside] > 0).all()), "z is detached from log_alpha"
    assert bool((grad[~inside] == 0).all())  # clamped samples carry no gradient


def test_fixed_gate_is_final_and_survives_the_state_dict():
    gate = _gate([4.0, -4.0, 0.5, -0.5])
    z = gate.fix()
    assert gate.final and not gate.log_alpha.requires_grad
    assert torch.equal(gate.train()(), z) and torch.equal(gate.eval()(), z)
    assert gate.describe() == "hard-concrete gates (fixed): 3/4 open at test time"
    again = HardConcrete(4)
    again.load_state_dict(gate.state_dict())
    assert again.final and torch.equal(again(), z)


def test_constrain_clamps_log_alpha_into_range():
    gate = _gate([10.0, -10.0, 1.0])
    gate.constrain()
    assert gate.log_alpha.detach().tolist() == pytest.approx([LOG_ALPHA_MAX, LOG_ALPHA_MIN, 1.0])


def _brute_force(terms, gates) -> float:
    """E[size] by enumerating every open/closed pattern of every gate entry."""
    probs = [g.prob_nonzero().detach().double().tolist() for g in gates]
    flat = [p for ps in probs for p in ps]
    total = 0.0
    for bits in itertools.product((0, 1), repeat=len(flat)):
        weight = math.prod(p if b else 1 - p for p, b in zip(flat, bits))
        open_count, at = {}, 0
        for g, ps in zip(gates, probs):
            open_count[id(g)] = sum(bits[at : at + len(ps)])
            at += len(ps)
        total += weight * sum(t.weights * math.prod(open_count[id(g)] for g in t.gates) for t in terms)
    return total


@given(
    st.lists(st.lists(log_alphas, min_size=1, max_size=3), min_size=1, max_size=3),
    st.lists(
        st.tuples(st.floats(0.5, 100.0), st.lists(st.integers(0, 2), max_size=3)),
        min_size=1,
        max_size=4,
    ),
)
def test_expected_size_equals_brute_force_enumeration(gate_values, term_specs):
    gates = [_gate(v) for v in gate_values]
    terms = []
    for weights, picks in term_specs:
        chosen = [gates[i % len(gates)] for i in picks]
        if any(chosen.count(g) > 2 for g in chosen):
            continue
        terms.append(SizeTerm(weights, tuple(chosen)))
    if not terms:
        return
    size = ExpectedSize(terms)
    assert float(size.expected()) == pytest.approx(_brute_force(terms, gates), rel=1e-5)
    assert size.dense == pytest.approx(sum(t.weights * math.prod(g.n for g in t.gates) for t in terms))


def test_nested_head_inside_layer_multiplies_probabilities():
    heads, layer = _gate([2.0, -1.0, 0.0]), _gate([1.0])
    size = ExpectedSize([SizeTerm(64.0, (heads, layer))])
    expected = 64 * float(heads.prob_nonzero().sum()) * float(layer.prob_nonzero()[0])
    assert float(size.expected()) == pytest.approx(expected, rel=1e-6)
    assert float(size.sparsity()) == pytest.approx(1 - expected / (64 * 3), rel=1e-6)
    size.sparsity().backward()
    assert bool((heads.log_alpha.grad < 0).all()) and float(layer.log_alpha.grad[0]) < 0
    open_heads = int((heads.deterministic() != 0).sum())
    assert size.kept() == 64 * open_heads * int(layer.deterministic()[0] != 0)


def test_bad_sizes_and_targets_name_the_culprit():
    gate = _gate([0.0])
    with pytest.raises(FxcookError, match="term 0 lists one gate 3 times"):
        ExpectedSize([SizeTerm(1.0, (gate, gate, gate))]).expected()
    with pytest.raises(FxcookError, match="no terms"):
        ExpectedSize([])
    with pytest.raises(FxcookError, match=r"target must lie in \(0, 1\).*got 1.5"):
        Lagrangian(1.5, 10)
    with pytest.raises(FxcookError, match="warmup_steps must be an integer >= 0, got -1"):
        Lagrangian(0.5, -1)
    with pytest.raises(FxcookError, match="n must be a positive integer"):
        HardConcrete(0)


def test_target_ramps_linearly_over_warmup():
    lag = Lagrangian(0.6, warmup_steps=10)
    assert [lag.target_at(s) for s in (0, 5, 10, 20)] == pytest.approx([0.0, 0.3, 0.6, 0.6])
    with torch.no_grad():
        lag.lambda1.fill_(2.0)
        lag.lambda2.fill_(3.0)
    assert float(lag.loss(torch.tensor(0.5), 10)) == pytest.approx(2 * -0.1 + 3 * 0.01)


def test_lagrangian_holds_expected_sparsity_at_target_against_the_task():
    """Gradient descent on the gates, ascent on the lambdas (as fxcook.train does): s_hat ends within 0.02
    of the target although the task loss rewards every open gate."""
    torch.manual_seed(0)
    heads, units, layer = HardConcrete(8), HardConcrete(16, init_mean=0.0), HardConcrete(1)
    size = ExpectedSize([SizeTerm(10.0, (heads, layer)), SizeTerm(3.0, (units,)), SizeTerm(5.0)])
    reg = L0Regulariser(size, Lagrangian(0.6, warmup_steps=50, lr=0.1), gate_lr=0.05)
    descent = torch.optim.AdamW([g.log_alpha for g in size.gates()], lr=reg.descent_lr, weight_decay=0.0)
    ascent = torch.optim.Adam(reg.ascent_parameters(), lr=reg.ascent_lr, maximize=True)
    late = []
    for step in range(600):
        task = -torch.cat([heads(), units()]).mean()
        (task + reg.loss(None, step)).backward()
        for opt in (descent, ascent):
            opt.step()
            opt.zero_grad()
        reg.after_step(None, step + 1)
        if step >= 550:
            late.append(reg.log_terms()["l0.expected_sparsity"])
    assert abs(sum(late) / len(late) - 0.6) < 0.02, late[-5:]
    assert all(LOG_ALPHA_MIN - 1e-6 <= v <= LOG_ALPHA_MAX + 1e-6 for g in size.gates() for v in g.log_alpha.tolist())
