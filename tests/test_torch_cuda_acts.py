"""The CUDA backend lowers activations as the model was trained: per token, static per tensor with its
calibrated scale, or dynamic per tensor; the int8 kernels run on CPU too (torch._int_mm), so this runs anywhere."""

import pytest
import torch

import fxcook
import fxcook.passes.quantize.ops  # noqa: F401  (registers torch.ops.fxcook)
from fxcook.nn import CookedLinear
from fxcook.passes import Quantize
from fxcook.runtime import torch_cuda as TC
from fxcook.testing import tiny_inputs, tiny_model


def _cooked(acts: str):
    calib = [tiny_inputs("bert", seed=s) for s in range(2)]
    model = tiny_model("bert", seed=3, hidden_size=64, intermediate_size=128)
    return fxcook.compile(model, [Quantize(acts=acts, calibration=calib)], example_inputs=tiny_inputs("bert"))


@pytest.mark.parametrize(
    "acts, kind", [("int8/token", "token"), ("int8/tensor", "tensor"), ("int8/tensor/dynamic", "dynamic")]
)
def test_lowered_kernels_follow_the_models_activation_scheme(acts, kind):
    cooked = _cooked(acts)
    low = TC.lower(cooked, dtype=torch.float32, device="cpu", int8="auto")
    paths = [p for p, m in cooked.named_modules() if isinstance(m, CookedLinear) and m.weight_quant is not None]
    int8 = [p for p in paths if isinstance(low.model.get_submodule(p), TC.Int8Linear)]
    assert int8 and all(low.model.get_submodule(p).acts.kind == kind for p in int8)
    for p in int8:
        new, old = low.model.get_submodule(p), cooked.get_submodule(p)
        assert torch.equal(new.wq, old.weight_quant.quantize(old.weight.detach())[0]), p  # the model's own codes
        if kind == "tensor":
            assert torch.equal(new.acts.scale, old.input_quant.scale.detach().abs().reshape(())), p
    x = tiny_inputs("bert", seed=9)
    with torch.no_grad():
        ref, out = cooked(**x).last_hidden_state, low.model(**x).last_hidden_state
    assert float((out - ref).norm() / ref.norm()) < 1e-4  # the fake quantizers' arithmetic, in integers


def test_dynamic_per_tensor_kernel_equals_dynamic_quantize_matmul():
    g = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(5, 32, generator=g).relu() + 0.1,
        torch.randn(16, 32, generator=g),
        torch.randn(16, generator=g),
    )
    wq, ws = TC.quantize_rows(w)
    want = torch.ops.fxcook.dynamic_quantize_matmul(x, wq.t().contiguous(), ws.reshape(-1), b)
    got = TC.int8_linear(x, wq, ws.reshape(-1), b, acts=TC.ActScheme("dynamic"))
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-5)
