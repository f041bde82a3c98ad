"""Properties of the fake quantizers (fxcook.passes.quantize.quantizers) and the fxcook:: quant ops."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcook.passes.quantize.ops  # noqa: F401  (registers torch.ops.fxcook.*)
from fxcook.errors import FxcookError
from fxcook.passes.quantize.quantizers import (
    ActSpec,
    DynamicTensorQuant,
    TensorQuant,
    TokenQuant,
    WeightQuant,
    act_quantizer,
    calibrate,
    fake_quant,
    parse_acts,
    parse_weights,
    qmax,
)

bits = st.integers(2, 8)
shapes = st.tuples(st.integers(1, 8), st.integers(2, 24))


def tensor(seed, shape, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), shapes, bits, st.floats(1e-3, 1e3))
def test_weight_error_within_half_step_and_codes_in_range(seed, shape, b, mag):
    w = tensor(seed, shape, mag)
    wq = WeightQuant(b)
    scale = wq.absmax_scale(w)
    assert ((wq(w) - w).abs() <= scale / 2 + 1e-6 * mag).all()
    codes, s = wq.quantize(w)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= qmax(b)
    torch.testing.assert_close(codes.float() * s[:, None], wq(w))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), shapes, bits, st.sampled_from([None, 2, 4]))
def test_quantizing_twice_changes_nothing(seed, shape, b, group):
    w = tensor(seed, (shape[0], 8))
    wq = WeightQuant(b, group_size=group)
    once = wq(w)
    torch.testing.assert_close(wq(once), once, rtol=0, atol=1e-6)
    tq = TokenQuant(b)
    x = tensor(seed + 1, shape)
    torch.testing.assert_close(tq(tq(x)), tq(x), rtol=0, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), shapes, bits)
def test_token_error_within_half_step(seed, shape, b):
    x = tensor(seed, shape, 5.0)
    tq = TokenQuant(b)
    assert ((tq(x) - x).abs() <= tq.token_scale(x) / 2 + 1e-5).all()


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["minmax", "percentile", "mse"]))
def test_static_observers_calibrate_and_bound_error_inside_range(seed, observer):
    tq = TensorQuant(8, observer=observer)
    batches = [tensor(seed + i, (4, 16)) for i in range(3)]
    assert calibrate(tq, batches) == 3
    s = float(tq.scale)
    x = batches[0].clamp(-127 * s, 127 * s)
    assert ((tq(x) - x).abs() <= s / 2 + 1e-6).all()
    amax = max(float(b.abs().max()) for b in batches)
    assert s <= amax / 127 + 1e-9  # percentile / MSE never widen the min-max range


def test_qat_gradients_reach_weights_and_lsq_scales():
    w = torch.nn.Parameter(tensor(0, (6, 16)))
    wq = WeightQuant(8, learnable=True, weight=w.detach())
    x = tensor(1, (5, 16))
    tq = TokenQuant(8)
    y = torch.nn.functional.linear(tq(x.requires_grad_()), wq(w))
    y.square().sum().backward()
    assert torch.isfinite(w.grad).all() and (w.grad != 0).all()
    assert torch.isfinite(wq.scale.grad).all() and (wq.scale.grad != 0).any()
    assert torch.isfinite(x.grad).all()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shape=shapes,
    b=bits,
    how=st.sampled_from(["token", "channel", "learned", "clipping"]),
)
def test_fake_quant_gradients_are_the_straight_through_graphs(seed, shape, b, how):
    """fake_quant's own backward gives what autograd gives through clamp(round_ste(x / s), -q, q) * s,
    for x and for the scale: absmax per token or channel (the scale a function of x), a learned scale
    leaf, and a static scale small enough that codes clip."""
    q = qmax(b)

    def scale_of(x):
        if how in ("token", "channel"):
            return x.abs().amax(dim=-1 if how == "token" else 0, keepdim=True).clamp(min=1e-8) / q
        return leaf_scale

    g = torch.Generator().manual_seed(seed)
    probe = torch.randn(*shape, generator=g)
    x0 = torch.randn(*shape, generator=g)
    leaf_scale = (torch.rand(shape[0], 1, generator=g) * (0.05 if how == "clipping" else 1) + 1e-3).requires_grad_()
    reference = lambda x, s: torch.clamp(x / s + (torch.round(x / s) - x / s).detach(), -q, q) * s  # noqa: E731
    results = []
    for fn in (fake_quant, reference):
        x = x0.clone().requires_grad_()
        s = scale_of(x)
        y = fn(x, s, b) if fn is fake_quant else fn(x, s)
        grads = torch.autograd.grad((y * probe).sum(), [x] + ([leaf_scale] if how in ("learned", "clipping") else []))
        results.append((y, grads))
    (y, grads), (y_ref, grads_ref) = results
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(grads[0], grads_ref[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(grads[1:], grads_ref[1:], strict=True):  # a scale's gradient sums terms up to |probe| q:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * q * x0.numel())  # float32 summation noise


def test_bad_input_errors_name_the_problem():
    with pytest.raises(FxcookError, match="bit width"):
        qmax(9)
    with pytest.raises(FxcookError, match="weights: 'int9/channel'"):
        parse_weights("int9/channel")
    with pytest.raises(FxcookError, match="acts: 'int8/row'"):
        parse_acts("int8/row")
    with pytest.raises(FxcookError, match="no data"):
        calibrate(TensorQuant(8), [])
    with pytest.raises(FxcookError, match="calibrate"):
        TensorQuant(8)(torch.ones(2, 2))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(2, 16), st.integers(1, 9))
def test_integer_ops_match_fake_quant_within_one_step(seed, m, k, n):
    x, w, b = tensor(seed, (2, m, k), 3.0), tensor(seed + 1, (n, k)), tensor(seed + 2, (n,))
    wq, tq = WeightQuant(8), TokenQuant(8)
    ref = torch.nn.functional.linear(tq(x), wq(w), b)
    codes, s = torch.ops.fxcook.quantize_per_token(x, 8)
    qw, ws = wq.quantize(w)
    y = torch.ops.fxcook.matmul_integer_to_float(codes, s, qw, ws, b)
    # one int8 step of the input per element, through the weight row: |w_q| . s
    step = s * (qw.abs().float() * ws[:, None]).sum(1)
    assert ((y - ref).abs() <= step + 1e-5).all()
    q = torch.ops.fxcook.quantize(x, torch.tensor([0.05]), 0, 8)
    assert q.dtype == torch.int8
    torch.testing.assert_close(
        torch.ops.fxcook.dequantize(q, torch.tensor([0.05]), 0),
        fake_quant(x, torch.tensor(0.05), 8),
        atol=0.05 + 1e-6,
        rtol=0,
    )


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), shapes, st.floats(1e-3, 1e3), st.floats(-1.0, 1.0))
def test_dynamic_tensor_error_within_half_step(seed, shape, mag, shift):
    x = tensor(seed, shape, mag) + shift * mag  # one-sided and two-sided ranges
    dq = DynamicTensorQuant(8)
    scale, zp = dq.params(x)
    assert 0 <= float(zp) <= 255
    assert ((dq(x) - x).abs() <= scale / 2 + 1e-5 * mag).all()
    assert (dq(torch.zeros(3)) == 0).all()  # zero is exact (DynamicQuantizeLinear's range holds 0)


def test_dynamic_tensor_spec():
    assert parse_acts("int8/tensor/dynamic") == ActSpec(8, "tensor", True)
    assert parse_acts("int8/tensor") == ActSpec(8, "tensor", False)
    assert isinstance(act_quantizer(parse_acts("int8/tensor/dynamic")), DynamicTensorQuant)
    with pytest.raises(FxcookError, match="8-bit only"):
        parse_acts("int4/tensor/dynamic")
    with pytest.raises(FxcookError, match="not an activation scheme"):
        parse_acts("int8/token/dynamic")


def _ort_dynamic_quantize_matmul(x, qw_t, ws, b):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = qw_t.shape
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s", "", "b"], ["y"], domain="com.microsoft")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [
            numpy_helper.from_array(qw_t.numpy(), "w"),
            numpy_helper.from_array(ws.numpy(), "s"),
            numpy_helper.from_array(b.numpy(), "b"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(2, 32), st.integers(1, 9), st.floats(-1.0, 1.0))
def test_dynamic_tensor_op_and_ort_match_fake_quant_within_one_step(seed, m, k, n, shift):
    x, w, b = tensor(seed, (m, k), 3.0) + 3.0 * shift, tensor(seed + 1, (n, k)), tensor(seed + 2, (n,))
    wq, dq = WeightQuant(8), DynamicTensorQuant(8)
    ref = torch.nn.functional.linear(dq(x), wq(w), b)
    qw, ws = wq.quantize(w)
    scale, _ = dq.params(x)
    step = scale * (qw.abs().float() * ws[:, None]).sum(1)  # one activation step through each weight row
    y = torch.ops.fxcook.dynamic_quantize_matmul(x, qw.t().contiguous(), ws, b)
    assert ((y - ref).abs() <= step + 1e-4).all()
    got = _ort_dynamic_quantize_matmul(x, qw.t().contiguous(), ws, b)
    assert ((got - ref).abs() <= step + 1e-4).all()


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), bits)
def test_quantize_op_saturates_symmetrically_like_fake_quant(seed, b):
    x = tensor(seed, (4, 16), scale=300.0)  # far outside the range: both saturate at +-qmax
    s = torch.tensor([1.0])
    codes = torch.ops.fxcook.quantize(x, s, 0, b)
    assert int(codes.min()) >= -qmax(b) and int(codes.max()) <= qmax(b)
    assert torch.equal(torch.ops.fxcook.dequantize(codes, s, 0), fake_quant(x, s, b))


def test_a_negative_learned_scale_still_counts_as_calibrated():
    tq = TensorQuant(8, learnable=True)
    assert not tq.calibrated
    with torch.no_grad():
        tq.scale.fill_(-0.05)  # LSQ can step the scale past zero; forward uses |scale|
    x = tensor(0, (4, 16))
    assert tq.calibrated and torch.equal(tq(x), fake_quant(x, torch.tensor(0.05), 8))


# ---------------------------------------------------------------- edge values, exact results
# A row whose absmax is 127 has scale exactly 1, so x / scale is x itself and every tie below is an exact .5;
# scaling the row by a power of two scales the scale alike and keeps every quotient exact.
EDGE_ROW = [127.0, -127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 63.5, 64.5, 126.5, -126.5, 0.0, -0.0, 3.0, 0.25]
EDGE_CODES = [127, -127, 0, 2, 2, 0, -2, -2, 64, 64, 126, -126, 0, 0, 3, 0]  # round half to even, like torch.round


@settings(max_examples=20, deadline=None)
@given(st.integers(-20, 100))
def test_weight_ties_round_half_to_even_at_any_magnitude(exp):
    mag = 2.0**exp
    w = torch.tensor([EDGE_ROW, [0.0] * len(EDGE_ROW)]) * mag  # and an all-zero row
    wq = WeightQuant(8)
    codes, scale = wq.quantize(w)
    assert codes.dtype == torch.int8
    assert codes[0].tolist() == EDGE_CODES and codes[1].tolist() == [0] * len(EDGE_ROW)
    assert scale.tolist() == [mag, torch.tensor(1e-8).item()]  # a zero row gets the smallest scale, not 0
    assert torch.equal(
        wq(w), torch.stack([torch.tensor(EDGE_CODES, dtype=torch.float32) * mag, torch.zeros(len(EDGE_ROW))])
    )
    assert torch.equal(torch.ops.fxcook.quantize(w, scale, 0, 8), codes)


def test_saturation_is_symmetric_at_127():
    s = torch.tensor(1.0)
    x = torch.tensor([127.5, -127.5, 128.0, -128.0, 1e30, -1e30, 3.4e38, -3.4e38])
    want = torch.tensor([127.0, -127.0] * 4)
    assert torch.equal(fake_quant(x, s, 8), want)  # -128 is never used: the range is symmetric
    assert torch.equal(torch.ops.fxcook.quantize(x, s.reshape(1), 0, 8), want.to(torch.int8))
    assert torch.equal(fake_quant(torch.tensor([7.5, -7.5, 6.5, -100.0]), s, 4), torch.tensor([7.0, -7.0, 6.0, -7.0]))
    tq = TensorQuant(8)
    assert calibrate(tq, [torch.tensor([[-2.54, 2.54]])]) == 1
    assert float(tq.scale) == pytest.approx(0.02)
    torch.testing.assert_close(tq(torch.tensor([10.0, -10.0, 0.01, 0.03])), torch.tensor([2.54, -2.54, 0.0, 0.04]))


def test_zero_rows_quantize_to_exact_zeros_with_the_smallest_scale():
    eps = torch.tensor(1e-8).item()
    zeros = torch.zeros(3, 8)
    tq = TokenQuant(8)
    assert torch.equal(tq(zeros), zeros) and tq.token_scale(zeros).flatten().tolist() == [eps] * 3
    codes, s = torch.ops.fxcook.quantize_per_token(zeros, 8)
    assert codes.dtype == torch.uint8 and (codes == 128).all() and s.flatten().tolist() == [eps] * 3
    scale, zp = DynamicTensorQuant.params(zeros)
    assert (scale.item(), zp.item()) == (eps, 0.0)
    w = torch.zeros(2, 8, requires_grad=True)
    out = WeightQuant(8, group_size=4)(w)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(2, 8)) and torch.equal(w.grad, torch.ones(2, 8))  # finite STE gradient


def test_token_and_dynamic_ties_round_half_to_even():
    row = torch.tensor([EDGE_ROW])
    codes, s = torch.ops.fxcook.quantize_per_token(row, 8)
    assert s.item() == 1.0 and (codes.int() - 128).tolist() == [EDGE_CODES]
    assert TokenQuant(8)(row).tolist() == [[float(c) for c in EDGE_CODES]]
    # dynamic per tensor: the range [-51, 204] of x gives scale 1 and zero point 51 (uint8 codes 0..255)
    x = torch.tensor([-51.0, 204.0, 0.5, 1.5, -0.5, -1.5, 2.5, 203.5, -50.5, 0.0])
    scale, zp = DynamicTensorQuant.params(x)
    assert (scale.item(), zp.item()) == (1.0, 51.0)
    assert DynamicTensorQuant(8)(x).tolist() == [-51.0, 204.0, 0.0, 2.0, 0.0, -2.0, 2.0, 204.0, -50.0, 0.0]
