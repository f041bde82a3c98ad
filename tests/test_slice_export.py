"""A sliced model ships smaller: fxcook.save/load rebuilds it (restore mode: the kept structures come from
the record, the values from the file) and its ONNX export has the smaller shapes and computes the same."""

import copy

import numpy as np
import onnx
import pytest
import torch

import fxcook
from fxcook.passes.prune import Prune, Slice
from fxcook.runtime.onnx import export
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import main_output


def pruned(fam, passes_after=()):
    x = tiny_inputs(fam)
    calib = [tiny_inputs(fam, seed=s) for s in range(2)]
    return fxcook.compile(tiny_model(fam), [Prune(target=0.4, calibration=calib), *passes_after], example_inputs=x)


@pytest.mark.parametrize("fam, sliced", [("bert", True), ("llama", True), ("bert", False)])
def test_load_of_save_rebuilds_the_pruned_model(fam, sliced, tmp_path):
    model = pruned(fam, [Slice()] if sliced else [])
    loaded = fxcook.load(fxcook.save(model, tmp_path / "art"))
    x = tiny_inputs(fam, batch=3, seq=5, seed=9, pad=2)
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(**x)), main_output(model(**x)), rtol=0, atol=1e-6)
    shapes = {k: v.shape for k, v in loaded.state_dict().items()}
    assert shapes == {k: v.shape for k, v in model.state_dict().items()}
    assert [r.spec for r in loaded.history] == [r.spec for r in model.history]


def test_onnx_export_of_a_sliced_model_has_the_smaller_shapes(tmp_path):
    model = pruned("bert", [Slice()])
    x = tiny_inputs("bert")
    path = export(model, tmp_path / "m.onnx", x, optimize=False)
    dims = {tuple(i.dims) for i in onnx.load(str(path)).graph.initializer}
    q = model.get_submodule("encoder.layer.0.attention.self.query").weight
    up = model.get_submodule("encoder.layer.0.intermediate.dense").weight
    assert q.shape[0] < 32 and up.shape[0] < 64
    assert any(d in dims for d in (tuple(q.shape), tuple(q.shape[::-1])))
    assert any(d in dims for d in (tuple(up.shape), tuple(up.shape[::-1])))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = tiny_inputs("bert", batch=2, seq=6, seed=4)
    feeds = {i.name: y[i.name].numpy() for i in sess.get_inputs()}
    with torch.no_grad():
        want = main_output(model(**y)).numpy()
    np.testing.assert_allclose(sess.run(None, feeds)[0], want, rtol=1e-4, atol=1e-5)


def test_save_before_and_after_slice_differ_in_size(tmp_path):
    gated = pruned("bert")
    sliced = fxcook.apply(copy.deepcopy(gated), [Slice()])
    a, b = fxcook.save(gated, tmp_path / "g"), fxcook.save(sliced, tmp_path / "s")
    assert (b / "model.safetensors").stat().st_size < (a / "model.safetensors").stat().st_size
