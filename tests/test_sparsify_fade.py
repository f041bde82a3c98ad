"""Sparsify with a fading 2:4 mask: exact at the start, a linear fade of the pruned weights, exact 2:4 at
the end, under fxcook.train (resume mid-fade, a run that ends early) and the errors."""

import copy

import pytest
import torch
from captured import captured, masked_linears
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import fxcook
from fxcook.passes.sparsify import Sparsify, update_masks
from fxcook.passes.sparsify.masks import is_24
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import main_output
from fxcook.training.loop import train
from fxcook.training.losses import DistillLoss


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 3), st.integers(1, 6), st.integers(1, 3))
def test_fade_starts_exact_then_falls_linearly_to_exact_24(start, length, every):
    end = start + length
    dense = captured("bert")
    model = fxcook.apply(
        copy.deepcopy(dense), [Sparsify(schedule={"start": start, "end": end, "every": every, "fade": True})]
    )
    x = tiny_inputs("bert", seed=3)
    torch.testing.assert_close(main_output(model(**x)), main_output(dense(**x)), rtol=0, atol=0)
    state = model.mask_schedules[0]
    last = start
    for step in range(1, end + every + 1):
        changed = update_masks(model, step)
        due = last < end and step >= start and (step - last >= every or step >= end)
        assert bool(changed) == due, step
        last = step if due else last
        alpha = torch.tensor(max(0.0, 1.0 - (last - start) / length), dtype=torch.float32).item()
        for path, m in masked_linears(model).items():
            kept = m.weight_mask == 1
            assert set(m.weight_mask.unique().tolist()) <= {1.0, alpha}, path
            if alpha < 1.0:  # the kept part is 2:4 as soon as the pruned part is scaled down
                assert is_24(kept.float()) and kept.float().mean() == 0.5, path
    assert state.final and not state.fading
    for m in masked_linears(model).values():  # the end: exact 2:4, pruned raw weights zero
        assert is_24(m.weight) and set(m.weight_mask.unique().tolist()) == {0.0, 1.0}
        assert (m.weight.detach()[m.weight_mask == 0] == 0).all()


def test_pruned_weights_keep_a_gradient_scaled_by_the_fade():
    model = fxcook.apply(captured("bert"), [Sparsify(schedule={"start": 0, "end": 4, "every": 1, "fade": True})])
    update_masks(model, 1)  # pruned weights now count 0.75
    path, m = next(iter(masked_linears(model).items()))
    main_output(model(**tiny_inputs("bert"))).square().sum().backward()
    pruned = m.weight_mask == 0.75
    w_eff_grad = m.weight.grad / m.weight_mask  # d loss / d (w * mask)
    assert pruned.any() and (m.weight.grad[pruned] != 0).any()
    torch.testing.assert_close(m.weight.grad[pruned], 0.75 * w_eff_grad[pruned])


DATA = {
    "input_ids": torch.randint(1, 128, (16, 8), generator=torch.Generator().manual_seed(0)),
    "attention_mask": torch.ones(16, 8, dtype=torch.long),
}


class Stop(Exception):
    pass


def _train(steps, schedule, out=None, stop_at=None):
    model = fxcook.compile(tiny_model("llama"), [Sparsify(schedule=schedule)], tiny_inputs("llama"))

    def stop(step, m):
        if step == stop_at:
            raise Stop

    res = train(
        model, None, DATA, DistillLoss(lm=1.0), steps=steps, batch_size=4, lr=1e-2, progress=False,
        callback=stop, eval_every=1, out=out, save_every=1,
    )  # fmt: skip
    return model, res


def test_resume_in_the_middle_of_the_fade_is_exact(tmp_path):
    schedule = {"start": 0, "end": 6, "every": 2, "fade": True}
    whole, ref = _train(8, schedule)
    with pytest.raises(Stop):  # a crash in step 4: the checkpoint of step 3 (mask factor 2/3) is the latest
        _train(8, schedule, out=tmp_path, stop_at=4)
    resumed, res = _train(8, schedule, out=tmp_path)
    assert res.resumed_from == 3 and resumed.mask_schedules[0].final
    assert res.losses == pytest.approx(ref.losses[3:], rel=1e-5)
    for path, m in masked_linears(whole).items():
        assert torch.equal(m.weight_mask, masked_linears(resumed)[path].weight_mask), path
        assert is_24(masked_linears(resumed)[path].weight), path


def test_a_run_that_ends_before_the_fade_does_cuts_to_exact_24():
    model, _ = _train(3, {"start": 0, "end": 10, "every": 1, "fade": True})
    assert not model.mask_schedules[0].fading
    for path, m in masked_linears(model).items():
        assert is_24(m.weight) and set(m.weight_mask.unique().tolist()) == {0.0, 1.0}, path


def test_fade_is_for_24_masks():
    with pytest.raises(ValidationError, match="fade"):
        Sparsify(pattern="unstructured", method="magnitude", schedule={"end": 4, "fade": True})
