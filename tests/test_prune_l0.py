"""Prune(method="l0"): hard-concrete sources on the gates, an L0 regulariser fxcook.train optimises, task
gradients reaching log_alpha, deterministic test-time gates, Slice refusing stochastic gates, and the
sliced model computing what the gated model computes at its test-time gates."""

import copy

import pytest
import torch

import fxcook
from fxcook.passes.prune import Gate, HardConcrete, Prune, Slice, fix_gates
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import main_output
from fxcook.training.loop import train
from fxcook.training.losses import DistillLoss

DATA = {
    "input_ids": torch.randint(1, 128, (16, 8), generator=torch.Generator().manual_seed(0)),
    "attention_mask": torch.ones(16, 8, dtype=torch.long),
}
ALL = ("heads", "ffn", "mha", "ffn_layer")


def l0_model(fam="llama", **cfg):
    return fxcook.compile(tiny_model(fam), [Prune(method="l0", granularity=ALL, **cfg)], tiny_inputs(fam))


def sources(cooked):
    return {p: g.source for p, g in cooked.named_modules() if isinstance(g, Gate)}


def test_task_gradients_reach_every_log_alpha():
    cooked = l0_model().train()
    for source in sources(cooked).values():  # inside the stretch (a gate clamped at 1 has zero gradient)
        with torch.no_grad():
            source.log_alpha.zero_()
    torch.manual_seed(0)
    for _ in range(8):  # samples: any one may clamp a gate (zero gradient there)
        loss = main_output(cooked(**tiny_inputs("llama"))).float().pow(2).mean()  # no regulariser in it
        loss.backward()
    for path, source in sources(cooked).items():
        assert isinstance(source, HardConcrete)
        assert source.log_alpha.grad is not None and source.log_alpha.grad.abs().sum() > 0, path


def test_fxcook_train_optimises_the_lagrangian_and_moves_the_gates():
    cooked = l0_model(target=0.5, lambda_lr=0.05)
    before = {p: s.log_alpha.detach().clone() for p, s in sources(cooked).items()}
    result = train(cooked, None, DATA, DistillLoss(lm=1.0), steps=3, batch_size=4, lr=1e-3, progress=False)
    assert {"l0.expected_sparsity", "l0.lambda1"} <= set(result.log[-1])
    assert result.log[0]["l0.expected_sparsity"] < 0.5  # gates start (mostly) open
    moved = [p for p, s in sources(cooked).items() if not torch.equal(s.log_alpha.detach(), before[p])]
    assert len(moved) == len(before)


def test_slice_refuses_stochastic_gates_and_takes_the_deterministic_ones_when_told():
    cooked = l0_model("bert")
    for source in sources(cooked).values():
        with torch.no_grad():
            source.log_alpha.normal_(0.5, 3.0, generator=torch.Generator().manual_seed(1))
    with pytest.raises(fxcook.PassError, match="still stochastic.*Slice\\(deterministic=True\\)"):
        fxcook.apply(copy.deepcopy(cooked), [Slice()])
    x = tiny_inputs("bert", seed=5)
    cooked.eval()
    with torch.no_grad():
        want = main_output(cooked(**x))
    for deterministic, model in ((True, copy.deepcopy(cooked)), (False, copy.deepcopy(cooked))):
        if not deterministic:
            assert fix_gates(model) == len(sources(model))
        sliced = fxcook.apply(model, [Slice(deterministic=deterministic)])
        with torch.no_grad():
            torch.testing.assert_close(main_output(sliced(**x)), want, rtol=1e-5, atol=1e-5)
        assert not sliced.regularisers
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in cooked.parameters())


def test_test_time_gates_are_deterministic():
    cooked = l0_model("bert").eval()
    x = tiny_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(main_output(cooked(**x)), main_output(cooked(**x)), rtol=0, atol=0)
    assert "hard-concrete" in cooked.graph_text()
