"""SparseGPT: the OBS update is the exact least-squares fix where it must be, never worse than masking,
better than Wanda and magnitude on correlated inputs; the pass keeps 2:4 and survives save -> load."""

import copy

import pytest
import torch
from captured import masked_linears
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import fxcook
from fxcook.errors import PassError
from fxcook.passes.sparsify import Sparsify
from fxcook.passes.sparsify.masks import m4n2_1d, magnitude, nm_mask, wanda
from fxcook.passes.sparsify.sparsegpt import sparsegpt
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import main_output


def _layer(seed: int, out_f: int, in_f: int, samples: int, mix: float):
    """A random weight and correlated calibration inputs X (columns mixed by `mix`)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, in_f, generator=g, dtype=torch.float64)
    x = x @ (torch.eye(in_f, dtype=torch.float64) + mix * torch.randn(in_f, in_f, generator=g, dtype=torch.float64))
    return torch.randn(out_f, in_f, generator=g, dtype=torch.float64), x


def _err(x, w, w2) -> float:
    return float(((x @ w.t() - x @ w2.t()) ** 2).sum())


@pytest.mark.parametrize("pattern, in_f", [("2:4", 4), ("unstructured", 8)])
def test_pruning_the_first_columns_gives_the_least_squares_optimum(pattern, in_f):
    """Before: W, X; the left half of the columns pruned. Expected: kept w_k + H_kk^-1 H_kp w_p, the
    exact optimum (errors flow only rightwards, and every kept column is right of every pruned one)."""
    w, x = _layer(0, out_f=3, in_f=in_f, samples=40, mix=0.8)
    h = x.t() @ x
    p, k = list(range(in_f // 2)), list(range(in_f // 2, in_f))
    forced = torch.zeros_like(w, dtype=torch.bool)
    forced[:, p] = True
    got, keep = sparsegpt(w, h, pattern, block=in_f, damp=1e-10, forced=forced)
    assert torch.equal(keep, ~forced)
    expected = torch.zeros_like(w)
    expected[:, k] = w[:, k] + (torch.linalg.solve(h[k][:, k], h[k][:, p]) @ w[:, p].t()).t()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_identity_hessian_is_magnitude_24_without_updates():
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    got, keep = sparsegpt(w, torch.eye(16, dtype=torch.float64), "2:4")
    assert torch.equal(keep, m4n2_1d(w))
    torch.testing.assert_close(got, w * keep)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    out_f=st.integers(1, 8),
    groups=st.integers(1, 12),
    samples=st.integers(2, 60),
    mix=st.floats(0.0, 2.0),
    forced=st.booleans(),
)
def test_lazy_blocks_are_exact(seed, out_f, groups, samples, mix, forced):
    """The far-column update per block reorders the column-by-column OBS updates, it does not change
    them: every block size gives the same 2:4 mask and weights (forced mask or chosen)."""
    w, x = _layer(seed, out_f, 4 * groups, samples, mix)
    keep = nm_mask(torch.rand(w.shape, generator=torch.Generator().manual_seed(seed))) if forced else None
    runs = [sparsegpt(w, x.t() @ x, "2:4", block=b, forced=None if keep is None else ~keep) for b in (4, 8, 128)]
    for got, k in runs:
        assert (k.reshape(-1, 4).sum(1) == 2).all() and (got[~k] == 0).all()
        assert keep is None or torch.equal(k, keep)
        assert torch.equal(k, runs[0][1])
        torch.testing.assert_close(got, runs[0][0], rtol=1e-9, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    out_f=st.integers(16, 32),
    groups=st.integers(8, 16),
    mix=st.floats(0.0, 1.0),
    pattern=st.sampled_from(["2:4", "unstructured"]),
)
def test_layer_error_is_below_wanda_and_magnitude(seed, out_f, groups, mix, pattern):
    w, x = _layer(seed, out_f, 4 * groups, samples=16 * groups, mix=mix)
    got, keep = sparsegpt(w, x.t() @ x, pattern, block=16)
    assert float(keep.double().mean()) == 0.5
    if pattern == "2:4":
        assert (keep.reshape(-1, 4).sum(1) == 2).all()
    by_magnitude = m4n2_1d(w) if pattern == "2:4" else magnitude(w)
    assert _err(x, w, got) < min(_err(x, w, w * wanda(w, x.norm(dim=0), pattern)), _err(x, w, w * by_magnitude))


_CAPTURED = {}


def _cooked():
    if "bert" not in _CAPTURED:
        _CAPTURED["bert"] = fxcook.compile(tiny_model("bert"), [], example_inputs=tiny_inputs("bert"))
    return copy.deepcopy(_CAPTURED["bert"])


def _calib():
    return [tiny_inputs("bert", seed=s) for s in range(3)]


@pytest.mark.parametrize("sequential", [False, True])
def test_pass_prunes_24_and_updates_kept_weights(sequential):
    model, ref = _cooked(), _cooked()
    fxcook.apply(model, [Sparsify(method="sparsegpt", calibration=_calib(), sequential=sequential, block=16)])
    layers = masked_linears(model)
    assert layers and all(m.weight_mask.reshape(-1, 4).sum(1).eq(2).all() for m in layers.values())
    moved = 0
    for path, m in layers.items():
        w0, w = ref.get_submodule(path).weight.detach(), m.weight.detach()
        assert (w[m.weight_mask == 0] == 0).all(), path
        moved += int((w != w0)[m.weight_mask.bool()].any())
    assert moved == len(layers)  # every layer's kept weights were updated, not only masked
    assert any("sparsegpt" in c.what and "updated" in c.what for c in model.history[-1].changes)


def test_pass_output_is_closer_to_fp32_than_wanda():
    ref, sg, wd = _cooked(), _cooked(), _cooked()
    fxcook.apply(sg, [Sparsify(method="sparsegpt", calibration=_calib(), sequential=True, block=16)])
    fxcook.apply(wd, [Sparsify(method="wanda", calibration=_calib(), sequential=True)])
    x = tiny_inputs("bert", seed=7)
    with torch.no_grad():
        want = main_output(ref(**x))
        errs = [float((main_output(m(**x)) - want).pow(2).mean()) for m in (sg, wd)]
    assert errs[0] < errs[1]


def test_save_load_restores_masks_and_updated_weights(tmp_path):
    model = _cooked()
    fxcook.apply(model, [Sparsify(method="sparsegpt", calibration=_calib(), block=16)])
    loaded = fxcook.load(fxcook.save(model, tmp_path / "artifact"))
    for path, m in masked_linears(model).items():
        got = loaded.get_submodule(path)
        assert torch.equal(got.weight_mask, m.weight_mask) and torch.equal(got.weight, m.weight), path
    x = tiny_inputs("bert", seed=5)
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(**x)), main_output(model(**x)), rtol=0, atol=1e-6)


def test_errors_name_the_key():
    with pytest.raises(ValidationError, match="schedule"):
        Sparsify(method="sparsegpt", schedule={"end": 10})
    with pytest.raises(ValidationError, match="block"):
        Sparsify(method="sparsegpt", block=6)
    with pytest.raises(PassError, match="'sparsegpt' needs calibration"):
        fxcook.apply(_cooked(), [Sparsify(method="sparsegpt")])
    with pytest.raises(ValueError, match="do not match"):
        sparsegpt(torch.zeros(2, 8), torch.eye(4))
