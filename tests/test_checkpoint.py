"""Quantized safetensors checkpoints: int8 codes + scales, round trip, BMCook names."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fxcook
from fxcook.checkpoint import load_quantized, save_quantized
from fxcook.passes import Quantize
from fxcook.testing import tiny_inputs, tiny_model


def quantized(seed):
    model, x = tiny_model("bert", seed=seed), tiny_inputs("bert", seed=seed)
    return fxcook.compile(model, [Quantize()], example_inputs=x), x


def test_round_trip_is_exact_and_stores_int8(tmp_path):
    a, x = quantized(0)
    path = save_quantized(a, tmp_path / "q.safetensors")
    with safe_open(str(path), framework="pt") as f:
        key = "encoder.layer.0.attention.self.query.qweight"
        assert f.get_tensor(key).dtype == torch.int8
        assert "encoder.layer.0.attention.self.query.weight" not in f.keys()
    b, _ = quantized(1)  # other weights, same architecture
    load_quantized(b, path)
    with torch.no_grad():
        torch.testing.assert_close(b(**x).last_hidden_state, a(**x).last_hidden_state)


def test_bmcook_names_and_bad_keys(tmp_path):
    a, x = quantized(0)
    path = save_quantized(a, tmp_path / "q.safetensors")
    t = load_file(str(path))
    t = {k.replace(".qweight", ".weight_quant"): v for k, v in t.items()}
    save_file(t, str(tmp_path / "bm.safetensors"))
    b, _ = quantized(2)
    load_quantized(b, tmp_path / "bm.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(b(**x).last_hidden_state, a(**x).last_hidden_state)
    t["nope.weight"] = torch.zeros(1)
    save_file(t, str(tmp_path / "bad.safetensors"))
    with pytest.raises(fxcook.FxcookError, match="nope.weight"):
        load_quantized(b, tmp_path / "bad.safetensors")
