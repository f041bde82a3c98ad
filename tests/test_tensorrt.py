"""TensorRT lowering: the exported static-int8 ONNX obeys TensorRT's explicit-quantization rules."""
import importlib.util

import onnx
import pytest

import fxcook
from fxcook.models import tiny_inputs, tiny_model
from fxcook.passes import Quantize
from fxcook.runtime import onnx as fxonnx
from fxcook.runtime.tensorrt import build_engine, check_explicit_quantization

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
