"""fxcook.train with `cooked.regularisers` (an L0 Lagrangian over a hard-concrete gate in a tiny Llama).

The gate sits on the input of block 0's down projection (as a pruning gate would), so task gradients
and the Lagrangian both reach its log_alpha. Checked: the loss and log carry the regulariser, the
lambdas ascend, the gates train at their own constant lr, a resumed run equals an uninterrupted one
(lambdas, their Adam state, gates), copies and artifacts tolerate the list, and 2 FSDP2 ranks (gloo)
match one process.
"""

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

import fxcook
from fxcook.errors import FxcookError
from fxcook.passes.prune.l0 import ExpectedSize, HardConcrete, L0Regulariser, Lagrangian, SizeTerm
from fxcook.testing import on_two_ranks, tiny_inputs, tiny_model
from fxcook.training.loop import train
from fxcook.training.losses import DistillLoss

DATA = {
    "input_ids": torch.randint(1, 128, (16, 8), generator=torch.Generator().manual_seed(0)),
    "attention_mask": torch.ones(16, 8, dtype=torch.long),
}
GATED = "model.layers.0.mlp.down_proj"
GATE_LR, LR = 0.1, 1e-3


class GatedInput(nn.Module):
    """`linear(x * z)`: the input features of a linear behind hard-concrete gates."""

    def __init__(self, linear: nn.Module, gate: HardConcrete):
        super().__init__()
        self.linear, self.gate = linear, gate

    def forward(self, x):
        return self.linear(x * self.gate())


class ExpectedGate(HardConcrete):
    """A gate whose forward is P(z != 0): deterministic, so 2 ranks can be compared with one process."""

    def forward(self):
        return self.prob_nonzero()


def _student(in_forward: bool = True, gate_type: type[HardConcrete] = HardConcrete):
    """A tiny Llama with an L0-regularised gate over block 0's FFN units (in its forward, or only registered)."""
    cooked = fxcook.compile(tiny_model("llama"), [], tiny_inputs("llama"))
    linear = cooked.get_submodule(GATED)
    gate = gate_type(linear.in_features, init_mean=0.0)
    if in_forward:
        cooked.swap(GATED, GatedInput(linear, gate))
    else:
        cooked.get_submodule("model.layers.0").add_module("l0_gate", gate)
    size = ExpectedSize([SizeTerm(3.0 * linear.out_features, (gate,))])
    cooked.regularisers.append(L0Regulariser(size, Lagrangian(0.5, warmup_steps=0, lr=0.05), gate_lr=GATE_LR))
    return cooked, gate


def _train(cooked, steps, **kw):
    kw = {"batch_size": 4, "lr": LR, "progress": False, **kw}
    return train(cooked, None, DATA, DistillLoss(lm=1.0), steps=steps, **kw)


def _lambdas(cooked) -> list[float]:
    return [float(p.detach()) for p in cooked.regularisers[0].ascent_parameters()]


def test_loss_and_log_carry_the_regulariser_and_the_lambdas_ascend():
    cooked, gate = _student()
    result = _train(cooked, 4)
    for row in result.log:
        assert {"l0.expected_sparsity", "l0.target", "l0.lambda1", "l0.lambda2", "l0.lagrangian"} <= set(row)
        assert row["loss"] == pytest.approx(row["lm"] + row["l0.lagrangian"], rel=1e-5)
    assert result.log[-1]["l0.expected_sparsity"] < 0.5  # below target: lambda1 descends, lambda2 ascends
    lambda1, lambda2 = _lambdas(cooked)
    assert lambda1 < 0 < lambda2
    assert result.log[-1]["l0.lambda1"] != 0.0


def test_gates_train_at_their_own_constant_lr():
    cooked, gate = _student()
    before, weight = gate.log_alpha.detach().clone(), cooked.get_submodule(GATED).linear.weight.detach().clone()
    _train(cooked, 1)
    moved = (gate.log_alpha.detach() - before).abs()
    assert float(moved.max()) > 0.5 * GATE_LR  # Adam's first step moves each parameter by about its lr
    assert float(moved.max()) <= GATE_LR * 1.001
    assert float((cooked.get_submodule(GATED).linear.weight.detach() - weight).abs().max()) <= LR * 1.001


class Stop(Exception):
    pass


def _stop_at(step_to_stop):
    def callback(step, model):
        if step == step_to_stop:
            raise Stop

    return callback


def test_resume_equals_an_uninterrupted_run(tmp_path):
    whole, whole_gate = _student()
    ref = _train(whole, 5)
    cooked, _ = _student()
    with pytest.raises(Stop):  # dies in step 3: the checkpoint of step 2 is the latest
        _train(cooked, 5, out=tmp_path, save_every=1, callback=_stop_at(3), eval_every=1)
    resumed, gate = _student()
    res = _train(resumed, 5, out=tmp_path, save_every=1)
    assert res.resumed_from == 2
    assert res.losses == pytest.approx(ref.losses[2:], rel=1e-6)
    for a, b in zip(res.log, ref.log[2:]):
        assert a["l0.lambda1"] == pytest.approx(b["l0.lambda1"], rel=1e-6, abs=1e-9)
        assert a["l0.expected_sparsity"] == pytest.approx(b["l0.expected_sparsity"], rel=1e-6)
    assert _lambdas(resumed) == pytest.approx(_lambdas(whole), rel=1e-6)
    torch.testing.assert_close(gate.log_alpha, whole_gate.log_alpha)


def test_copies_and_artifacts_tolerate_the_regulariser_list(tmp_path):
    cooked, gate = _student(in_forward=False)
    twin = copy.deepcopy(cooked)
    (reg,) = twin.regularisers
    assert reg.size.gates()[0] is twin.get_submodule("model.layers.0.l0_gate")
    assert reg.lagrangian is not cooked.regularisers[0].lagrangian
    out = fxcook.save(cooked, tmp_path / "artifact")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.l0_gate.log_alpha" in keys
    assert not any("lambda" in k for k in keys)  # training-only: the Lagrangian is not in the model


def test_descent_parameters_outside_the_model_are_an_error():
    cooked = fxcook.compile(tiny_model("llama"), [], tiny_inputs("llama"))
    size = ExpectedSize([SizeTerm(1.0, (HardConcrete(3),))])  # a gate the model does not hold
    cooked.regularisers.append(L0Regulariser(size, Lagrangian(0.5)))
    with pytest.raises(FxcookError, match=r"regulariser l0: 1 descent parameter\(s\) are not trainable parameters"):
        _train(cooked, 1)


def _fsdp_worker(rank: int, tmp: str) -> dict:
    cooked, gate = _student(in_forward=False)
    try:  # dies in step 3 on both ranks: the checkpoint of step 2 is the latest
        _train(cooked, 4, out=f"{tmp}/run", save_every=1, callback=_stop_at(3), eval_every=1)
    except Stop:
        pass
    again, _ = _student(in_forward=False)
    resumed = _train(again, 4, out=f"{tmp}/run")
    gated, _ = _student(in_forward=True, gate_type=ExpectedGate)
    in_forward = _train(gated, 2)
    rows = {"resumed": resumed.log, "resumed_from": resumed.resumed_from, "gated": in_forward.log}
    return {**rows, "lambdas": _lambdas(again)}


def test_two_fsdp_ranks_match_one_process(tmp_path):
    """Sharded gates and replicated lambdas: 2 ranks, interrupted and resumed, log what one process does."""
    ranks = on_two_ranks(_fsdp_worker, tmp_path)
    cooked, _ = _student(in_forward=False)
    single = _train(cooked, 4, fsdp=False)
    terms = ("loss", "l0.expected_sparsity", "l0.lambda1", "l0.lambda2")
    for r in ranks:
        assert r["resumed_from"] == 2
        for a, b in zip(r["resumed"], single.log[2:], strict=True):
            assert [a[k] for k in terms] == pytest.approx([b[k] for k in terms], rel=1e-5, abs=1e-8)
        assert r["lambdas"] == pytest.approx(_lambdas(cooked), rel=1e-5)
    # gates inside a sharded block's forward: task and Lagrangian gradients add up as in one process
    gated, _ = _student(in_forward=True, gate_type=ExpectedGate)
    gated_single = _train(gated, 2, fsdp=False).log
    for r in ranks:
        for a, b in zip(r["gated"], gated_single, strict=True):
            assert [a[k] for k in terms] == pytest.approx([b[k] for k in terms], rel=1e-5, abs=1e-8)
