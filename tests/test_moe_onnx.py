"""ONNX lowering of routed FFNs: com.microsoft.MoE / QMoE in ONNX Runtime match the torch module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from strategies import assert_ort_matches_int8

import fxcook
from fxcook.errors import NotSupportedYet
from fxcook.nn import CookedLinear
from fxcook.passes import Moefy, Quantize, Relufy
from fxcook.passes.moefy.partition import balanced_kmeans
from fxcook.passes.moefy.routed import MoEFFN
from fxcook.passes.quantize.quantizers import TokenQuant, WeightQuant
from fxcook.runtime.onnx import export, session
from fxcook.runtime.onnx.translations import load_all
from fxcook.testing import tiny_inputs, tiny_model


def _moe(d, width, experts, k, gated, act, int8, seed, acts=False):
    g = torch.Generator().manual_seed(seed)
    lin = lambda o, i: CookedLinear(torch.randn(o, i, generator=g) / i**0.5, torch.randn(o, generator=g) * 0.1)
    up, down, gate = lin(width, d), lin(d, width), (lin(width, d) if gated else None)
    for m in (up, down, gate):
        if m is not None:
            m.weight_quant = WeightQuant(bits=8) if int8 else None
            m.input_quant = TokenQuant(bits=8) if acts else None
    labels = balanced_kmeans(F.normalize(up.weight.detach(), dim=1), experts, seed=seed)
    return MoEFFN(up, down, act, labels, experts, k, gate=gate, router="mlp").eval()


@settings(max_examples=8, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@example(experts=4, k=2, gated=False, int8=True, acts=True, seed=0)
@given(
    experts=st.sampled_from([2, 4, 8]),
    k=st.integers(1, 8),
    gated=st.booleans(),
    int8=st.booleans(),
    acts=st.booleans(),
    seed=st.integers(0, 50),
)
def test_ort_moe_matches_torch(tmp_path_factory, experts, k, gated, int8, acts, seed):
    """Also with int8/token activation quantizers on the source linears: the expert input is quantized
    in both, the hidden states between the expert GEMMs in neither (ORT's MoE keeps them float)."""
    k = min(k, experts)
    act = "silu" if gated else "relu"
    moe = _moe(32, 64, experts, k, gated, act, int8, seed, acts)
    assert moe.down.input_quant is None and (moe.up.input_quant is not None) == acts
    path = export(moe, tmp_path_factory.mktemp("moe") / "moe.onnx", torch.randn(2, 6, 32))
    ops = [n.op_type for n in __import__("onnx").load(str(path)).graph.node]
    assert ("QMoE" if int8 else "MoE") in ops
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(seed))  # other shape: dynamic axes
    with torch.no_grad():
        want = moe(x).numpy()
    sess = session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def test_moefied_model_exports_and_runs_in_ort(tmp_path):
    """A whole tiny BERT after Relufy + Quantize(weights) + Moefy runs routed experts (QMoE) in ORT."""
    model, inputs = tiny_model("bert", seed=2), tiny_inputs("bert", seed=2)
    cooked = fxcook.compile(
        model,
        [
            Relufy(),
            Quantize(weights="int8/channel", acts=None),
            Moefy(calibration=[inputs], experts=4, top_k=2, epochs=3),
        ],
        example_inputs=inputs,
    )
    path = export(cooked, tmp_path / "bert_moe.onnx", inputs)
    ops = [n.op_type for n in __import__("onnx").load(str(path)).graph.node]
    assert ops.count("QMoE") == 2
    sess = session(path)
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, {n: inputs[n].numpy() for n in names})[0]
    unquantized = fxcook.compile(
        model, [Relufy(), Moefy(calibration=[inputs], experts=4, top_k=2, epochs=3)], example_inputs=inputs
    )
    with torch.no_grad():
        assert_ort_matches_int8(got, cooked(**inputs).last_hidden_state, unquantized(**inputs).last_hidden_state)


@pytest.mark.parametrize(
    "gated, act, words", [(True, "relu", "only has SwiGLU"), (False, "gelu", "tanh approximation")]
)
def test_unsupported_activation_is_a_clear_error(tmp_path, gated, act, words):
    moe = _moe(16, 32, 4, 2, gated, act, False, 0)  # ReLU-gated / exact-erf GELU have no ORT MoE form
    with pytest.raises(NotSupportedYet, match=words):
        export(moe, tmp_path / "m.onnx", torch.randn(2, 4, 16))


def test_translation_is_registered():
    table = load_all()
    assert torch.ops.fxcook.moe_ffn.default in table
