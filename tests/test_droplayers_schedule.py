"""DropLayers(every=K): blocks gated off one at a time during fxcook.train, removed when the run ends."""

from __future__ import annotations

import torch

import fxcook
from fxcook.passes import DropLayers
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.training.losses import DistillLoss

DROPPED = ["model.layers.1", "model.layers.2"]  # max-gap, 4 -> 2 keeps the first and the last


def _data():
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1, 128, (16, 8), generator=g),
        "attention_mask": torch.ones(16, 8, dtype=torch.long),
    }


def _scheduled():
    model = tiny_model("llama", num_hidden_layers=4)
    return fxcook.apply(fxcook.capture(model, tiny_inputs("llama")), [DropLayers(count=2, every=2)])


def _train(cooked, steps, out=None):
    return fxcook.train(
        cooked, data=_data(), loss=DistillLoss(lm=1.0), steps=steps, batch_size=4, lr=1e-3,
        schedule="constant", out=out, save_every=1, progress=False,
    )  # fmt: skip


def test_blocks_are_frozen_gated_and_then_gone(tmp_path):
    cooked = _scheduled()
    assert not any(p.requires_grad for b in DROPPED for p in cooked.get_submodule(b).parameters())
    assert "BlockGate(model.layers.1: on)" in cooked.graph_text()
    seen = []

    def gates(step, model):
        if model.mask_schedules:
            seen.append((step, [float(g.on) for g in model.mask_schedules[0].gates.values()]))

    fxcook.train(
        cooked, data=_data(), loss=DistillLoss(lm=1.0), steps=5, batch_size=4, lr=1e-3, progress=False,
        callback=gates, eval_every=1,
    )  # fmt: skip
    # gate i goes off after 2 * (i + 1) steps
    assert [s for s in seen if s[0] in (1, 2, 3, 4)] == [
        (1, [1.0, 1.0]),
        (2, [0.0, 1.0]),
        (3, [0.0, 1.0]),
        (4, [0.0, 0.0]),
    ]
    assert cooked.sites.blocks == ["model.layers.0", "model.layers.3"]
    assert not [n for n, _ in cooked.named_modules() if n.startswith(tuple(DROPPED)) or "fxcook_drop_gate" in n]
    assert cooked.mask_schedules == [] and cooked.pass_entries[-1]["record"] == {"dropped": DROPPED, "settled": True}
    assert cooked.hf_edits == [{"config": {"num_hidden_layers": 2}, "rename": {"model.layers.3": "model.layers.1"}}]
    back = fxcook.load(fxcook.save(cooked, tmp_path / "art"))  # restores the settled (removed) form
    x = tiny_inputs("llama", seed=4)
    with torch.no_grad():
        torch.testing.assert_close(back(**x).logits, cooked(**x).logits, rtol=0, atol=0)


def test_resume_across_a_drop_is_exact(tmp_path):
    straight = _scheduled()
    ref = _train(straight, 5, tmp_path / "a")
    first = _scheduled()
    _train(first, 3, tmp_path / "b")  # stops between the two drops
    assert first.mask_schedules and first.mask_schedules[0].dropped_at(3) == 1
    resumed = _scheduled()  # a fresh process: same passes, state from the checkpoint
    res = _train(resumed, 5, tmp_path / "b")
    assert res.resumed_from == 3
    assert res.losses == ref.losses[3:]
    assert resumed.sites.blocks == straight.sites.blocks == ["model.layers.0", "model.layers.3"]
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
