"""fxcook.train advances scheduled masks: a gradual Sparsify ramps while training, and resumes in place."""

import pytest
import torch
from captured import masked_linears

import fxcook
from fxcook import passes as P
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.training.loop import train
from fxcook.training.losses import DistillLoss

DATA = {
    "input_ids": torch.randint(1, 128, (16, 8), generator=torch.Generator().manual_seed(0)),
    "attention_mask": torch.ones(16, 8, dtype=torch.long),
}
SCHEDULE = {"start": 0, "end": 4, "every": 2}


def _student(schedule):
    sparsify = P.Sparsify(pattern="unstructured", method="magnitude", sparsity=0.75, schedule=schedule)
    return fxcook.compile(tiny_model("llama"), [sparsify], tiny_inputs("llama")), sparsify


class Stop(Exception):
    pass


def _run(steps, out=None, stop_at=None, schedule=SCHEDULE):
    model, sparsify = _student(schedule)
    densities = []

    def record(step, m):
        if step == stop_at:
            raise Stop
        densities.append(sum(x.density for x in masked_linears(m).values()) / len(masked_linears(m)))

    res = train(
        model,
        None,
        DATA,
        DistillLoss(lm=1.0),
        steps=steps,
        batch_size=4,
        lr=1e-2,
        progress=False,
        callback=record,
        eval_every=1,
        out=out,
        save_every=1,
    )
    return model, sparsify, densities, res


def test_density_ramps_on_the_schedule_during_train():
    model, sparsify, densities, _ = _run(6)
    expected = [1 - sparsify.state.sparsity_at(s) for s in (0, 0, 2, 2, 4, 4, 4)]  # recomputed at steps 2, 4
    assert densities == pytest.approx(expected, abs=0.02)
    assert densities[-1] == pytest.approx(0.25, abs=0.02) and sparsify.state.final
    for m in masked_linears(model).values():  # final: pruned raw weights are exactly zero
        assert (m.weight.detach()[m.weight_mask == 0] == 0).all()


def test_resumed_ramp_matches_an_uninterrupted_one(tmp_path):
    schedule = {"start": 0, "end": 6, "every": 3}  # recomputed at steps 3 and 6 only
    whole, _, _, ref = _run(8, schedule=schedule)
    with pytest.raises(Stop):  # a crash in step 5: the checkpoint of step 4 is the latest
        _run(8, out=tmp_path, stop_at=5, schedule=schedule)
    resumed, sparsify, _, res = _run(8, out=tmp_path, schedule=schedule)
    assert res.resumed_from == 4 and sparsify.state.final
    assert res.losses == pytest.approx(ref.losses[4:], rel=1e-5)
    for path, m in masked_linears(whole).items():
        assert torch.equal(m.weight_mask, masked_linears(resumed)[path].weight_mask), path
