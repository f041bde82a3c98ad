"""LR schedules: warmup, cosine, linear and constant against their closed forms, and as the trainer applies them."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxcook.errors import FxcookError
from fxcook.training.loop import lr_factor

HALF_COS = 0.5 * (1 + math.cos(math.pi / 4))  # cosine a quarter of the way down


@pytest.mark.parametrize(
    "schedule,step,steps,warmup,want",
    [
        ("cosine", 0, 10, 0, 1.0),
        ("cosine", 5, 10, 0, 0.5),
        ("cosine", 10, 10, 0, 0.0),
        ("cosine", 14, 10, 0, 0.0),  # past the end it stays at the floor
        ("cosine", 3, 10, 2, 0.5 * (1 + math.cos(math.pi / 8))),  # (3 - 2) / (10 - 2) = 1/8 of the way
        ("cosine", 4, 10, 2, HALF_COS),  # (4 - 2) / (10 - 2) = 1/4 of the way
        ("cosine", 8, 10, 2, 1 - HALF_COS),
        ("linear", 0, 10, 0, 1.0),
        ("linear", 3, 10, 0, 0.7),
        ("linear", 6, 10, 2, 0.5),
        ("linear", 12, 10, 2, 0.0),
        ("constant", 7, 10, 0, 1.0),
        ("constant", 7, 10, 2, 1.0),
        ("cosine", 0, 10, 4, 0.25),  # warmup: (step + 1) / warmup
        ("linear", 1, 10, 4, 0.5),
        ("constant", 3, 10, 4, 1.0),
    ],
)
def test_lr_factor_closed_form(schedule, step, steps, warmup, want):
    assert lr_factor(step, steps, warmup, schedule) == pytest.approx(want, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 200), st.integers(0, 50), st.data())
def test_decays_are_symmetric_and_monotone_after_warmup(steps, warmup, data):
    warmup = min(warmup, steps - 1)
    span = steps - warmup
    k = data.draw(st.integers(0, span))
    for schedule in ("cosine", "linear"):
        f = [lr_factor(s, steps, warmup, schedule) for s in range(warmup, steps + 1)]
        assert f[0] == 1.0 and f[-1] == pytest.approx(0.0, abs=1e-12)
        assert all(a >= b for a, b in itertools.pairwise(f)), schedule
        assert f[k] + f[span - k] == pytest.approx(1.0), schedule  # point-symmetric about the midpoint
        assert [lr_factor(s, steps, warmup, schedule) for s in range(warmup)] == [
            (s + 1) / warmup for s in range(warmup)
        ]


def test_unknown_schedule_is_named():
    with pytest.raises(FxcookError, match="'cosin'.*cosine, linear or constant"):
        lr_factor(0, 10, 0, "cosin")


@pytest.mark.parametrize(
    "schedule,want",
    [
        ("cosine", [0.5, 1.0, 1.0, HALF_COS, 0.5, 1 - HALF_COS]),
        ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_trainer_sets_the_scheduled_lr_each_step(schedule, want):
    from fxcook.pipeline import compile
    from fxcook.testing import tiny_inputs, tiny_model
    from fxcook.training.loop import train

    g = torch.Generator().manual_seed(0)
    data = {
        "input_ids": torch.randint(1, 128, (8, 6), generator=g),
        "attention_mask": torch.ones(8, 6, dtype=torch.long),
    }
    student = compile(tiny_model("llama"), [], tiny_inputs("llama"))
    result = train(student, data=data, steps=6, batch_size=2, lr=1e-2, warmup=2, schedule=schedule, progress=False)
    assert [row["lr"] for row in result.log] == pytest.approx([1e-2 * w for w in want], abs=1e-12)
