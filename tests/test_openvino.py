"""OpenVINO backend: fxcook's compression runs on the CPU plugin's int8 kernels with the cooked model's values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import assert_ort_matches_int8

import fxcook
from fxcook.errors import FxcookError, NotSupportedYet
from fxcook.nn import CookedLinear
from fxcook.passes import Moefy, Quantize, Relufy
from fxcook.passes.sparsify import Sparsify
from fxcook.runtime import openvino as fxov
from fxcook.testing import tiny_inputs, tiny_model

# acts scheme -> its lowering in OpenVINO: FakeQuantize (static), u8 codes into an int8 GEMM (per token),
# int8 weight constants with float activations (weight-only)
SCHEMES = {"static": {"acts": "int8/tensor"}, "token": {}, "token+sq": {"smoothquant": 0.5}, "weights": {"acts": None}}


def quantized_linears(cooked) -> int:
    return sum(1 for m in cooked.modules() if isinstance(m, CookedLinear) and m.weight_quant is not None)


def cooked_bert(cfg: dict, seed: int):
    model = tiny_model("bert", seed=seed)
    x = tiny_inputs("bert", batch=2, seq=8, seed=seed)
    calib = [tiny_inputs("bert", batch=2, seq=8, seed=seed + i) for i in range(2)]
    return model, x, fxcook.compile(model, [Quantize(calibration=calib, **cfg)], example_inputs=x)


@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=1, deadline=None)
@given(seed=st.integers(0, 1000))
def test_int8_gemms_run_in_int8_and_match_the_cooked_model(scheme, seed):
    model, x, cooked = cooked_bert(SCHEMES[scheme], seed)
    ov_model = fxov.OvModel(fxov.convert(cooked, x), precision="f32")
    # every quantized linear executes as an int8 FullyConnected layer (the pooler stays float)
    assert ov_model.int8_gemms() == quantized_linears(cooked), fxov.gemm_precisions(ov_model.compiled)
    x2 = tiny_inputs("bert", batch=3, seq=5, seed=seed + 7, pad=2)  # other shapes: dynamic axes
    with torch.no_grad():
        ref, unquantized = cooked(**x2).last_hidden_state, model(**x2).last_hidden_state
    # in f32, OpenVINO's int8 kernels compute fxcook's fake-quant values to float reassociation error
    assert_ort_matches_int8(ov_model(**x2), ref, unquantized)


def test_default_precision_is_bf16_with_its_error_bound():
    model, x, cooked = cooked_bert(SCHEMES["static"], 3)
    ov_model = fxov.OvModel(fxov.convert(cooked, x))
    precisions = fxov.gemm_precisions(ov_model.compiled)
    assert precisions[("FullyConnected", "bf16" if fxov.has_bf16() else "f32")] == 1, precisions  # the pooler
    with torch.no_grad():
        ref = cooked(**x).last_hidden_state
    # bf16 float layers (attention, the pooler): 8 mantissa bits, |error| <= 2^-8 of the output's scale
    err = (ov_model(**x) - ref).abs().max() / ref.abs().max()
    assert err < 2**-8, float(err)


def test_minilm_int8_static_runs_every_block_gemm_in_int8(minilm):
    from fxcook.models import example_batch

    model, tok = minilm
    x = example_batch(tok, ["Now is the winter of our discontent", "made glorious summer by this sun of York"])
    cooked = fxcook.compile(model, [Quantize(acts="int8/tensor", smoothquant=0.5, calibration=[x])], example_inputs=x)
    ov_model = fxov.OvModel(fxov.convert(cooked, x), precision="f32")
    assert ov_model.int8_gemms() == 36 == quantized_linears(cooked), fxov.gemm_precisions(ov_model.compiled)
    with torch.no_grad():
        ref = cooked(**x).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(ov_model(**x).flatten(1), ref.flatten(1)).min()
    # 6 layers amplify rare rounding flips from reassociation (as in ONNX Runtime): no tighter bound holds
    assert cos > 0.999, float(cos)


def test_sparse24_weights_are_exact_zeros():
    model, x = tiny_model("bert", seed=5), tiny_inputs("bert", seed=5)
    cooked = fxcook.compile(model, [Sparsify(pattern="2:4", sparsity=0.5)], example_inputs=x)
    ov_model = fxov.OvModel(fxov.convert(cooked, x), precision="f32")
    with torch.no_grad():
        ref = cooked(**x).last_hidden_state
    np.testing.assert_allclose(ov_model(**x), ref, rtol=1e-5, atol=1e-5)


def test_moefied_model_runs_its_dense_equivalent_exactly():
    """Routed experts lower to every expert's GEMMs masked to each token's top-k: the routed values."""
    model, x = tiny_model("bert", seed=2), tiny_inputs("bert", seed=2)
    cooked = fxcook.compile(model, [Relufy(), Moefy(calibration=[x], experts=4, top_k=2, epochs=3)], example_inputs=x)
    ov_model = fxov.OvModel(fxov.convert(cooked, x), precision="f32")
    x2 = tiny_inputs("bert", batch=3, seq=6, seed=9, pad=1)
    with torch.no_grad():
        ref = cooked(**x2).last_hidden_state
    np.testing.assert_allclose(ov_model(**x2), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_export_writes_ir_atomically_and_reloads(tmp_path):
    _, x, cooked = cooked_bert(SCHEMES["static"], 1)
    path = fxov.export(cooked, tmp_path / "ir" / "model.xml", x)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.bin", "model.xml"]
    loaded = fxov.OvModel(path, precision="f32")
    assert loaded.int8_gemms() == quantized_linears(cooked)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(**x), cooked(**x).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_per_tensor_dynamic_acts_are_refused_naming_the_linears():
    _, x, cooked = cooked_bert({"acts": "int8/tensor/dynamic"}, 0)
    with pytest.raises(NotSupportedYet, match=r"int8/tensor/dynamic\) at encoder\.layer\.0\..*no exact OpenVINO"):
        fxov.convert(cooked, x)


def test_bf16_on_a_cpu_without_it_is_an_error(monkeypatch):
    from fxcook.runtime.openvino import compiled

    monkeypatch.setattr(compiled, "has_bf16", lambda: False)
    with pytest.raises(FxcookError, match="this CPU has no bf16 support.*use precision='f32'"):
        fxov.compile_model("unused.xml", precision="bf16")
    with pytest.raises(FxcookError, match="inference_precision 'fp16': use one of bf16, f32"):
        fxov.compile_model("unused.xml", precision="fp16")


def test_missing_openvino_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(FxcookError, match=r"pip install 'fxcook\[openvino\]'"):
        fxov.require_openvino()


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(FxcookError, match="missing.xml: no such file"):
        fxov.OvModel(tmp_path / "missing.xml")
    with pytest.raises(FxcookError, match=r"model.onnx: needs the .xml suffix"):
        fxov.save(None, tmp_path / "model.onnx")


def test_cli_export_to_openvino_writes_xml_and_bin(tmp_path):
    from fxcook.cli import main

    _, x, cooked = cooked_bert(SCHEMES["token+sq"], 4)
    saved = fxcook.save(cooked, tmp_path / "saved")
    assert main(["export", str(saved), "--to", "openvino"]) == 0
    xml = tmp_path / "saved.xml"
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    ov_model = fxov.OvModel(xml, precision="f32")
    assert ov_model.int8_gemms() == quantized_linears(cooked)
    with torch.no_grad():
        np.testing.assert_allclose(ov_model(**x), cooked(**x).last_hidden_state, rtol=1e-4, atol=1e-4)


def test_an_op_openvino_cannot_read_is_named_with_the_passes(monkeypatch):
    import openvino

    def refuse(path, **_):
        raise RuntimeError("Check failed\nOpConversionFailure: com.microsoft.Frobnicate is not supported\nmore")

    monkeypatch.setattr(openvino, "convert_model", refuse)
    _, x, cooked = cooked_bert(SCHEMES["token"], 0)
    with pytest.raises(FxcookError, match=r"\(passes: quantize\).*Frobnicate is not supported.*no\s+OpenVINO lowering"):
        fxov.convert(cooked, x)
