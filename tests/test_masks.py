"""Properties of the mask methods and the 2:4 checkers (pure tensor code, no model needed)."""

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from fxcook.passes.sparsify import masks as M
from fxcook.runtime.onnx.checks import validate_onnx_24

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def weights(draw, mult_out=1, zeros=True):
    """A random [out, in] weight with in % 4 == 0 (out % 4 == 0 for 2-D methods), with some zeros and ties."""
    out_f = draw(st.integers(1, 6)) * (4 if mult_out == 4 else 1) + (0 if mult_out == 4 else draw(st.integers(0, 3)))
    in_f = 4 * draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    if zeros and draw(st.booleans()):
        w = w * (torch.rand(out_f, in_f, generator=g) > draw(st.sampled_from([0.3, 0.6, 0.9])))
    if draw(st.booleans()):  # ties
        w = w.round()
    return w


def _nnz_per_group(t, dim=-1):
    return (t.movedim(dim, -1).reshape(-1, 4) != 0).sum(1)


@SETTINGS
@given(weights())
def test_m4n2_1d_keeps_exactly_two_unless_already_zero(w):
    before = w.clone()
    mask = M.m4n2_1d(w)
    assert torch.equal(w, before)  # input untouched
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(mask.reshape(-1, 4).sum(1), torch.full((w.numel() // 4,), 2))
    kept = _nnz_per_group(w * mask)
    assert torch.equal(kept, _nnz_per_group(w).clamp(max=2))
    # the kept pair is a top-2 of |w| in its group
    a = w.abs().reshape(-1, 4)
    kept_min = torch.where(mask.reshape(-1, 4), a, torch.inf).min(1).values
    dropped_max = torch.where(~mask.reshape(-1, 4), a, -torch.inf).max(1).values
    assert (kept_min >= dropped_max).all()
    assert M.is_24(w * mask) and M.is_24(mask)


@SETTINGS
@given(weights(mult_out=4))
def test_m4n2_2d_is_24_in_rows_and_columns_and_optimal(w):
    mask = M.m4n2_2d(w)
    assert M.is_24(mask, dim=1) and M.is_24(mask, dim=0)
    o, i = w.shape
    blocks = mask.reshape(o // 4, 4, i // 4, 4)
    assert (blocks.sum(3) == 2).all() and (blocks.sum(1) == 2).all()  # exactly 2 per row and column
    # no 2:4-transposable block pattern keeps more magnitude (brute force on the first block)
    a = w.abs()[:4, :4].double().reshape(16)
    best = (a @ M._patterns_4x4()).max()
    assert torch.isclose((a * mask[:4, :4].reshape(16)).sum(), best)
    # the 1-D mask keeps at least as much magnitude (it has fewer constraints)
    assert (w.abs() * M.m4n2_1d(w)).sum() >= (w.abs() * mask).sum() - 1e-4


def test_patterns_are_all_doubly_2_of_4():
    pats = M._patterns_4x4().t().reshape(-1, 4, 4)
    assert pats.shape[0] == 90 and len({tuple(p.flatten().tolist()) for p in pats}) == 90
    assert (pats.sum(1) == 2).all() and (pats.sum(2) == 2).all()


@SETTINGS
@given(weights(), st.sampled_from([0.25, 0.5, 0.75]))
def test_magnitude_hits_the_target_ratio(w, sparsity):
    mask = M.magnitude(w, sparsity)
    assert mask.sum() == w.numel() - round(w.numel() * sparsity)
    a = w.abs()
    assert a[mask].min() >= a[~mask].max() if (~mask).any() and mask.any() else True


@SETTINGS
@given(weights(), st.integers(0, 2**31 - 1))
def test_wanda_24_and_unstructured(w, seed):
    norm = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(seed)) + 0.01
    m24 = M.wanda(w, norm, "2:4")
    assert M.is_24(m24) and (m24.reshape(-1, 4).sum(1) == 2).all()
    # with equal norms Wanda is the magnitude method
    assert torch.equal(M.wanda(w, torch.ones(w.shape[1]), "2:4"), M.m4n2_1d(w))
    mu = M.wanda(w, norm, "unstructured", 0.5)
    assert (mu.sum(1) == w.shape[1] - round(w.shape[1] * 0.5)).all()  # per output row


def _top2_by_sorting(score):
    """Reference 2:4 keep-mask: per group of 4, the positions of the two largest scores (by a full sort)."""
    groups = score.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    for i, g in enumerate(groups.tolist()):
        for j in sorted(range(4), key=lambda j: -g[j])[:2]:
            keep[i, j] = True
    return keep.reshape(score.shape)


def _untied(groups):
    return torch.tensor([len(set(g)) == 4 for g in groups.tolist()], dtype=torch.bool)


@SETTINGS
@given(weights(), st.integers(0, 2**31 - 1))
def test_wanda_keeps_the_top_two_of_weight_times_activation_norm(w, seed):
    norm = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(seed)) * 10 + 0.01
    mask = M.wanda(w, norm, "2:4")
    score = (w.abs() * norm).reshape(-1, 4)
    kept_min = torch.where(mask.reshape(-1, 4), score, torch.inf).min(1).values
    dropped_max = torch.where(~mask.reshape(-1, 4), score, -torch.inf).max(1).values
    assert (kept_min >= dropped_max).all()
    distinct = _untied(score)  # groups without ties have one right answer
    ref = _top2_by_sorting(score)
    assert torch.equal(mask.reshape(-1, 4)[distinct], ref[distinct])
    magnitude = M.m4n2_1d(w).reshape(-1, 4)
    a = w.abs().reshape(-1, 4)
    differ = distinct & _untied(a) & (ref != _top2_by_sorting(a)).any(1)
    assert (mask.reshape(-1, 4)[differ] != magnitude[differ]).any(1).all()  # the norms changed the choice there


def test_wanda_follows_the_norms_where_magnitude_would_not():
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0]])
    norm = torch.tensor([1.0, 1.0, 10.0, 10.0, 1.0, 1.0, 1.0, 1.0])
    assert M.wanda(w, norm, "2:4").tolist() == [[False, False, True, True, False, False, True, True]]
    assert M.m4n2_1d(w).tolist() == [[True, True, False, False, False, False, True, True]]
    # unstructured, per output row: scores 4 3 20 10 1 2 3 4 -> the 4 largest of the row
    assert M.wanda(w, norm, "unstructured", 0.5).tolist() == [[True, False, True, True, False, False, False, True]]
    assert M.make_mask(w, "wanda", "2:4", act_norm=norm).tolist() == M.wanda(w, norm, "2:4").tolist()


def test_mask_errors_name_the_problem():
    with pytest.raises(ValueError, match="multiple of 4"):
        M.m4n2_1d(torch.randn(4, 6))
    with pytest.raises(ValueError, match="multiples of 4"):
        M.m4n2_2d(torch.randn(6, 8))
    with pytest.raises(ValueError, match="act_norm"):
        M.make_mask(torch.randn(4, 8), "wanda")
    with pytest.raises(ValueError, match="unknown mask method"):
        M.make_mask(torch.randn(4, 8), "random")
    with pytest.raises(ValueError, match="2:4 only"):
        M.make_mask(torch.randn(4, 8), "m4n2_2d", pattern="unstructured")


def test_is_24_checker():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3]])
    assert M.is_24(w)
    w[0, 1] = 5
    assert not M.is_24(w)
    assert M.count_24_violations(w) == (1, 2)
    assert not M.is_24(torch.ones(2, 6))  # not a multiple of 4


# ---------------------------------------------------------------- ONNX validator


def _model(nodes, inits, inputs):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_validator_reads_matmul_gemm_and_qdq_layouts(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)  # [out, in]
    w24 = (w * M.m4n2_1d(w)).numpy()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])
    scale = np.full((32,), 0.05, np.float32)
    q = np.clip(np.round(w24 / scale[:, None]), -127, 127).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(w24.T), "mm_w"),  # MatMul: [K, N]
        numpy_helper.from_array(w24, "gemm_w"),  # Gemm transB=1: [N, K]
        numpy_helper.from_array(np.ascontiguousarray(w24.T), "gemm0_w"),  # Gemm transB=0: [K, N]
        numpy_helper.from_array(q, "q_w"),
        numpy_helper.from_array(scale, "q_s"),
        numpy_helper.from_array(np.zeros(32, np.int8), "q_z"),
        numpy_helper.from_array(w.numpy(), "dense_w"),  # dense [N, K], used through Transpose
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "mm_w"], ["a"], name="mm"),
        helper.make_node("Gemm", ["x", "gemm_w"], ["b"], name="gemm_t", transB=1),
        helper.make_node("Gemm", ["x", "gemm0_w"], ["c"], name="gemm_n"),
        helper.make_node("DequantizeLinear", ["q_w", "q_s", "q_z"], ["dq"], axis=0),
        helper.make_node("Transpose", ["dq"], ["dq_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "dq_t"], ["d"], name="qdq"),
        helper.make_node("Transpose", ["dense_w"], ["dense_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "dense_t"], ["e"], name="dense"),
        helper.make_node("Sum", ["a", "b", "c", "d", "e"], ["y"]),
    ]
    path = tmp_path / "m.onnx"
    onnx.save(_model(nodes, inits, [x]), path)
    rep = validate_onnx_24(path)
    by = {r.node: r for r in rep.weights}
    assert set(by) == {"mm", "gemm_t", "gemm_n", "qdq", "dense"}
    for name in ("mm", "gemm_t", "gemm_n", "qdq"):
        assert by[name].is_24 and by[name].eligible, name
        assert (by[name].k, by[name].n) == (64, 32)
    assert not by["dense"].is_24 and "groups of 4" in by["dense"].reason
    assert [r.node for r in rep.eligible] == ["mm", "gemm_t", "gemm_n", "qdq"]
    with pytest.raises(ValueError, match="dense"):
        rep.check()
    rep.check(expect=4)
    assert "| mm | MatMul |" in rep.table()


def test_onnx_validator_catches_a_wrong_axis():
    """A weight 2:4 along N (the wrong axis) is not 2:4 along K."""
    w = torch.randn(64, 32)  # pretend [out=64, in=32]
    bad = (w * M.m4n2_1d(w.t().contiguous()).t()).numpy()  # 2:4 along dim 0 = out
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])
    model = _model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="g", transB=1)], [numpy_helper.from_array(bad, "w")], [x]
    )
    rep = validate_onnx_24(model)
    assert len(rep.weights) == 1 and not rep.weights[0].is_24
