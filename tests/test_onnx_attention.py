"""fxcook's attention translation: no NaN guard in the graph, outputs identical to the stock one."""

import numpy as np
import onnx
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcook
from fxcook.runtime import onnx as fxonnx
from fxcook.runtime.onnx.translations import ONNX_TRANSLATIONS, load_all
from fxcook.testing import tiny_inputs, tiny_model

SDPA = torch.ops.aten.scaled_dot_product_attention.default


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 1000), family=st.sampled_from(["bert", "llama", "gpt2"]))
def test_attention_export_drops_the_nan_guard_and_matches_stock(tmp_path_factory, seed, family):
    model, x = tiny_model(family, seed=seed), tiny_inputs(family, seed=seed, pad=2)
    cooked = fxcook.compile(model, [], example_inputs=x)
    d = tmp_path_factory.mktemp("attn")
    ours = fxonnx.export(cooked, d / "ours.onnx", example_inputs=x)
    load_all()
    mine = ONNX_TRANSLATIONS.pop(SDPA)
    try:
        stock = fxonnx.export(cooked, d / "stock.onnx", example_inputs=x)
    finally:
        ONNX_TRANSLATIONS[SDPA] = mine
    ops = [n.op_type for n in onnx.load(str(ours)).graph.node]
    assert "IsNaN" not in ops and "Softmax" in ops
    assert "IsNaN" in [n.op_type for n in onnx.load(str(stock)).graph.node]  # what the guard looked like
    x2 = tiny_inputs(family, batch=3, seq=7, seed=seed + 1, pad=4)  # other shapes, heavy padding
    got, ref = (fxonnx.OrtModel(p, threads=1)(**x2).numpy() for p in (ours, stock))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(got, cooked(**x2)[0].numpy(), rtol=1e-4, atol=1e-5)
