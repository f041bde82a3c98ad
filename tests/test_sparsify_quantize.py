"""Sparsify composed with Quantize: order independence, exact zeros after int8, report, ONNX 2:4."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcook
from fxcook.nn import CookedLinear
from fxcook.passes.quantize import Quantize
from fxcook.passes.sparsify import Sparsify
from fxcook.passes.sparsify.masks import is_24
from fxcook.runtime.onnx.checks import validate_onnx_24
from fxcook.testing import tiny_inputs, tiny_model

RECIPE = "fxcook/recipes/int8_24.yaml"
_BASE = {}


def base():
    if "bert" not in _BASE:
        _BASE["bert"] = fxcook.compile(tiny_model("bert"), [], example_inputs=tiny_inputs("bert"))
    return copy.deepcopy(_BASE["bert"])


def linears(model):
    return {p: m for p, m in model.named_modules() if isinstance(m, CookedLinear) and m.weight_mask is not None}


@settings(max_examples=8, deadline=None)
@given(
    st.sampled_from([("2:4", "m4n2_1d"), ("2:4", "m4n2_2d"), ("2:4", "wanda"), ("unstructured", "magnitude")]),
    st.sampled_from(["int8/token", None]),
)
def test_order_does_not_matter_and_pruned_weights_stay_zero(spec, acts):
    pattern, method = spec
    calib = [tiny_inputs("bert", seed=s) for s in range(2)]
    sp = dict(pattern=pattern, method=method, sparsity=0.5, calibration=calib)
    a = fxcook.apply(fxcook.apply(base(), [Sparsify(**sp)]), [Quantize(acts=acts)])
    b = fxcook.apply(fxcook.apply(base(), [Quantize(acts=acts)]), [Sparsify(**sp)])
    x = tiny_inputs("bert", seed=7)
    assert torch.equal(a(**x).last_hidden_state, b(**x).last_hidden_state)
    la, lb = linears(a), linears(b)
    assert set(la) == set(lb) and la
    for path, m in la.items():
        assert torch.equal(m.weight_mask, lb[path].weight_mask), path
        w = m.effective_weight().detach()
        assert torch.equal(w, lb[path].effective_weight().detach()), path
        assert (w[m.weight_mask == 0] == 0).all()  # exactly 0 after fake int8
        codes, _ = m.weight_quant.quantize(m.weight * m.weight_mask)
        assert (codes[m.weight_mask == 0] == 0).all()  # and as int8 codes
        if pattern == "2:4":
            assert is_24(codes) and is_24(w)
    rep = a.report(per_layer=True)
    assert "0.500" in rep and " 8 " in rep  # density and bits per layer


def test_recipe_compresses_and_exports_onnx_that_passes_the_24_validator(tmp_path):
    from fxcook.runtime import onnx as ort_export

    recipe = fxcook.load_recipe(RECIPE)
    model = tiny_model("bert", hidden_size=64, intermediate_size=128)
    calib = [tiny_inputs("bert", seed=s) for s in range(2)]
    cooked = fxcook.compile(model, recipe.build(calibration=calib), example_inputs=calib[0])
    assert [r.name for r in cooked.history] == ["sparsify", "quantize"]
    assert "activated model size" in cooked.report()
    path = ort_export.export(cooked, tmp_path / "m.onnx", calib[0])
    rep = validate_onnx_24(path)
    n_block = len(linears(cooked))
    rep.check(expect=n_block)  # every block GEMM is 2:4 along K; the pooler stays dense
    assert len(rep.eligible) == n_block
    assert all(w.density <= 0.5 for w in rep.eligible)
    with pytest.raises(ValueError, match="pooler"):
        rep.check()
