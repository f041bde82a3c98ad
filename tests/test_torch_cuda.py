"""The CUDA backend: int8 GEMM correctness (runs on CPU too), planning reasons, and 2:4 kernels on a GPU."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxcook
from fxcook.nn import CookedLinear
from fxcook.passes import Quantize, Sparsify
from fxcook.passes.sparsify.masks import m4n2_1d
from fxcook.runtime import torch_cuda as TC
from fxcook.testing import tiny_inputs, tiny_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _int8_bound(x, w):
    """Per-element error bound of per-token x / per-channel w symmetric int8 with round-to-nearest."""
    xs = x.abs().amax(-1, keepdim=True) / 127
    ws = w.abs().amax(-1, keepdim=True) / 127
    # |x w - xq wq| <= sum_k |x_k| ws/2 + |w_k| xs/2 + xs ws/4
    return (
        (x.abs() @ (ws / 2).expand_as(w).t())
        + (xs / 2) @ w.abs().sum(1, keepdim=True).t()
        + xs * ws.t() * w.shape[1] / 4
    )


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(1, 40),
    k=st.sampled_from([8, 16, 64]),
    n=st.sampled_from([8, 24, 32]),
    seed=st.integers(0, 2**31 - 1),
    bias=st.booleans(),
)
def test_int8_linear_matches_fp32_within_quantization_bound(m, k, n, seed, bias):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(2, m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    x0 = x.clone()
    lin = TC.Int8Linear(w, b)
    y = lin(x)
    assert torch.equal(x, x0)
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == ref.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    bound = _int8_bound(x.reshape(-1, k).double(), w.double()).reshape(ref.shape)
    assert ((y.double() - ref).abs() <= bound + 1e-4).all()


def test_int8_weight_codes_are_exact():
    w = torch.randn(16, 32)
    lin = TC.Int8Linear(w)
    assert lin.wq.dtype == torch.int8 and lin.wq.abs().max() <= 127
    assert (lin.wq.abs().amax(1) == 127).all()  # absmax maps to +-127 per channel
    assert (lin.wq.float() * lin.w_scale[:, None] - w).abs().max() <= lin.w_scale.max() / 2 + 1e-7


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b, self.c = (
            nn.Linear(64, 64),
            nn.Linear(64, 32, bias=False),
            nn.Linear(32, 5, bias=False),
        )  # c: too small
        for lin in (self.a, self.b, self.c):
            for p in lin.parameters():
                p.data = torch.randn(p.shape, generator=g)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _toy(masked: bool):
    cooked = fxcook.compile(_Toy(), [], example_inputs=(torch.randn(2, 3, 64),))
    if masked:
        for lin in (cooked.a, cooked.b):
            lin.set_mask(m4n2_1d(lin.weight))
    return cooked


def test_lower_on_cpu_keeps_2_4_dense_with_a_reason_and_runs_int8():
    toy = _toy(masked=True)
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    low = TC.lower(toy, dtype=torch.float32, device="cpu", int8=True)
    assert all(torch.equal(v, toy.state_dict()[k]) for k, v in before.items())  # input not mutated
    plans = {p.path: p for p in low.layers}
    assert plans["a"].kernel == "int8" and plans["b"].kernel == "int8" and plans["c"].kernel == "dense"
    reason_24 = "needs a CUDA GPU" if not torch.cuda.is_available() else "not CUDA"
    assert reason_24 in plans["a"].reason
    assert "multiples of 8" in plans["c"].reason and "no 2:4 mask" in plans["c"].reason
    assert isinstance(low.model.a, TC.Int8Linear) and isinstance(low.model.c, CookedLinear)
    x = torch.randn(3, 7, 64)
    assert _rel(low.model(x), toy(x)) < 0.05
    assert "| a | int8 |" in low.table()


def test_lower_plans_name_why_a_layer_stays_dense():
    toy = _toy(masked=False)
    low = TC.lower(toy, dtype=torch.float32, device="cpu", int8="auto")
    assert low.count("dense") == 3  # nothing quantized, nothing masked
    assert all("no 2:4 mask" in p.reason for p in low.layers)
    assert TC.sparse24_reason(torch.randn(32, 64), torch.bfloat16).startswith("not 2:4")
    assert "multiple of 4" in TC.sparse24_reason(torch.randn(32, 6), torch.bfloat16)
    with pytest.raises(ValueError, match="backend"):
        TC.lower(toy, backend="nope")


def test_lower_applies_smoothquant_divisor_and_mask_on_cpu():
    calib = [tiny_inputs("bert", seed=s) for s in range(2)]
    model = tiny_model("bert", seed=3, hidden_size=64, intermediate_size=128)
    cooked = fxcook.compile(
        model, [Sparsify(), Quantize(smoothquant=0.8, calibration=calib)], example_inputs=tiny_inputs("bert")
    )
    smoothed = [
        p
        for p, m in cooked.named_modules()
        if isinstance(m, CookedLinear) and m.input_quant is not None and m.input_quant.smooth is not None
    ]
    assert smoothed
    before = {k: v.clone() for k, v in cooked.state_dict().items()}
    low = TC.lower(cooked, dtype=torch.float32, device="cpu", int8="auto")
    assert all(torch.equal(v, cooked.state_dict()[k]) for k, v in before.items())
    for path in smoothed:
        new = low.model.get_submodule(path)
        assert isinstance(new, TC.Int8Linear) and new.inv_smooth is not None, path
        assert (new.wq[cooked.get_submodule(path).weight_mask == 0] == 0).all(), path  # 2:4 zeros kept
    x = tiny_inputs("bert", seed=9)
    with torch.no_grad():
        ref, out = cooked(**x).last_hidden_state, low.model(**x).last_hidden_state
    assert _rel(out, ref) < 1e-3  # same int8 arithmetic as the fake quantizers (4% off without the divisor)


# ---------------------------------------------------------------- GPU only


def _w24(n, k, dtype, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return (w * m4n2_1d(w)).to("cuda", dtype)


@needs_cuda
@pytest.mark.parametrize("backend", TC.SPARSE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 17, 256])
def test_sparse24_linear_matches_dense(backend, dtype, m):
    w = _w24(256, 512, dtype)
    b = torch.randn(256, device="cuda", dtype=dtype)
    reason = TC.sparse24_reason(w, dtype, backend)
    if reason:
        pytest.skip(f"needs a CUDA GPU with 2:4 support ({reason})")
    x = torch.randn(3, m, 512, device="cuda", dtype=dtype)
    y = TC.Sparse24Linear(w, b, backend)(x)
    torch.cuda.synchronize()
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert torch.isfinite(y).all() and _rel(y, ref) < 1e-2


@needs_cuda
@pytest.mark.parametrize("backend", TC.SPARSE_BACKENDS)
@pytest.mark.parametrize("m", [1, 17, 300])
def test_int8_sparse24_linear_matches_int8_dense(backend, m):
    w = _w24(256, 512, torch.float32)
    b = torch.randn(256, device="cuda")
    reason = TC.sparse24_reason(w, torch.int8, backend)
    if reason:
        pytest.skip(f"needs a CUDA GPU with int8 2:4 support ({reason})")
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    y = TC.Int8Sparse24Linear(w, b, backend)(x)
    dense = TC.Int8Linear(w, b)(x)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert y.shape == (m, 256) and torch.isfinite(y).all()
    assert _rel(y, dense) < 1e-2 and _rel(y, ref) < 3e-2


@needs_cuda
def test_int8_linear_cuda_matches_cpu():
    w, x = torch.randn(64, 128), torch.randn(5, 128)
    cpu = TC.Int8Linear(w)(x)
    gpu = TC.Int8Linear(w.cuda())(x.cuda()).cpu()
    assert _rel(gpu, cpu) < 1e-5


@needs_cuda
def test_lower_on_gpu_uses_sparse_kernels():
    toy = _toy(masked=True)
    low = TC.lower(toy, dtype=torch.bfloat16, device="cuda", int8=False)
    plans = {p.path: p for p in low.layers}
    if plans["a"].kernel != "2:4":
        pytest.skip(f"needs a CUDA GPU with 2:4 support ({plans['a'].reason})")
    assert isinstance(low.model.a, TC.Sparse24Linear)
    x = torch.randn(64, 64)
    assert _rel(low.model(x.cuda().bfloat16()).float().cpu(), toy(x)) < 2e-2
