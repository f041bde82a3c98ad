"""TensorRT lowering: the exported static-int8 ONNX obeys TensorRT's explicit-quantization rules, and the
torch-tensorrt path lowers a copy that computes what the CookedModel computes."""

import importlib.util

import onnx
import pytest
import torch

import fxcook
from fxcook.passes import Quantize, Sparsify
from fxcook.runtime import onnx as fxonnx
from fxcook.runtime.tensorrt import build_engine, check_explicit_quantization, trt_lowered
from fxcook.testing import tiny_inputs, tiny_model

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def static_onnx(tmp_path_factory):
    model, x = tiny_model("bert", seed=5), tiny_inputs("bert", seed=5)
    calib = [tiny_inputs("bert", seed=s) for s in range(2)]
    cooked = fxcook.compile(model, [Quantize(acts="int8/tensor", calibration=calib)], example_inputs=x)
    return fxonnx.export(cooked, tmp_path_factory.mktemp("trt") / "static.onnx", example_inputs=x), x


def test_static_export_follows_explicit_quantization_rules(static_onnx):
    path, _ = static_onnx
    assert check_explicit_quantization(path) == []


def test_validator_flags_nonzero_zero_point_and_dynamic_ops(static_onnx, tmp_path):
    path, x = static_onnx
    m = onnx.load(str(path))
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear")
    zp = onnx.helper.make_tensor("bad_zp", onnx.TensorProto.INT8, [], [3])
    m.graph.initializer.append(zp)
    q.input[2] = "bad_zp"
    onnx.save(m, str(tmp_path / "bad.onnx"))
    assert any("zero point" in p for p in check_explicit_quantization(tmp_path / "bad.onnx"))
    cooked = fxcook.compile(tiny_model("bert"), [Quantize()], example_inputs=x)
    dyn = fxonnx.export(cooked, tmp_path / "dyn.onnx", example_inputs=x)
    assert any("not a standard ONNX op" in p for p in check_explicit_quantization(dyn))


@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT")
def test_build_engine(static_onnx, tmp_path):
    path, _ = static_onnx
    assert build_engine(path, tmp_path / "m.plan").stat().st_size > 0


def _fake_quantize_op(x, amax, num_bits, exponent_bits, unsigned, narrow_range):
    """CPU stand-in for torch.ops.tensorrt.quantize_op (symmetric int8 fake quant from an amax)."""
    scale = amax / 127
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def test_trt_lowering_is_a_copy_that_matches_a_masked_smoothquant_model():
    calib = [tiny_inputs("bert", seed=s) for s in range(2)]
    model = tiny_model("bert", seed=4)
    cooked = fxcook.compile(
        model, [Sparsify(), Quantize(acts="int8/tensor", smoothquant=0.8, calibration=calib)], example_inputs=calib[0]
    )
    before = {k: v.clone() for k, v in cooked.state_dict().items()}
    types = {p: type(m) for p, m in cooked.named_modules()}
    low = trt_lowered(cooked, _fake_quantize_op)
    assert {p: type(m) for p, m in cooked.named_modules()} == types
    assert all(torch.equal(v, cooked.state_dict()[k]) for k, v in before.items())
    swapped = [m for m in low.modules() if type(m).__name__ == "_TrtQuantLinear"]
    smoothed = sum(1 for m in cooked.modules() if getattr(getattr(m, "input_quant", None), "smooth", None) is not None)
    assert swapped and 0 < smoothed == sum(1 for m in swapped if m.inv_smooth is not None)
    x = calib[1]
    with torch.no_grad():
        ref, got = cooked(**x).last_hidden_state, low(**x).last_hidden_state
    assert float((got - ref).norm() / ref.norm()) < 1e-4
