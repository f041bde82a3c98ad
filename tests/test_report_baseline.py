"""The report measures size against the model as captured, so removing weights shows as smaller."""

from __future__ import annotations

import fxcook
from fxcook import passes as P
from fxcook.testing import tiny_inputs, tiny_model


def test_dropped_and_sliced_models_report_their_size_against_the_captured_model(tmp_path):
    model, batch = tiny_model("bert"), tiny_inputs("bert")
    dropped = fxcook.compile(model, [P.DropLayers(count=1, keep_first_last=False, placement="output")], batch)
    assert dropped.report().splitlines()[-1] == "activated model size: 8,192 of 16,384 (0.500; 2.0x smaller)"
    sliced = fxcook.compile(
        model, [P.Prune(method="importance", target=0.5, calibration=[batch]), P.Slice()], example_inputs=batch
    )
    kept = sum(
        m.weight.numel()
        for p, m in sliced.named_modules()
        if p.startswith("encoder.layer.") and hasattr(m, "weight") and m.weight.dim() == 2
    )
    report = sliced.report()
    assert f"activated model size: {kept:,} of 16,384" in report
    assert f"block weights {kept:,} of 16,384 as captured" in report.splitlines()[0]
    fxcook.save(sliced, tmp_path / "m")
    assert fxcook.load(tmp_path / "m").report().splitlines()[-1] == report.splitlines()[-1]
