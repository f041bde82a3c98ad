"""Quantize on HF MoE expert matmuls (expert_bmm sites): fake-quant math, graph rewrite, QAT,
selection, ONNX lowering and quantized checkpoints, on tiny Mixtral and Qwen2-MoE."""

import copy

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from strategies import assert_ort_matches_int8

import fxcook
from fxcook.checkpoint import load_quantized, save_quantized
from fxcook.errors import NotSupportedYet, PassError
from fxcook.nn import CookedLinear, param_quants
from fxcook.passes import Quantize
from fxcook.passes.quantize.experts import (
    ExpertInputQuant,
    ExpertWeightQuant,
)
from fxcook.passes.quantize.quantizers import TensorQuant, TokenQuant
from fxcook.pipeline import apply
from fxcook.runtime.onnx import export, session
from fxcook.testing import tiny_inputs, tiny_model

FAMILIES = ("mixtral", "qwen2_moe")


@pytest.fixture(scope="module")
def captured():
    """family -> (cooked float model, inputs), captured once; tests quantize deep copies."""
    out = {}
    for fam in FAMILIES:
        x = tiny_inputs(fam, batch=2, seq=8, seed=1)
        out[fam] = (fxcook.capture(tiny_model(fam, seed=1), x), x)
    return out


def quantized(captured, family, **cfg):
    base, x = captured[family]
    return apply(copy.deepcopy(base), [Quantize(**cfg)]), x


def expert_paths(cooked):
    return [s.path for s in cooked.sites.find("expert_bmm")]


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def graph_code(cooked):
    return {p: m.graph.python_code("self").src for p, m in cooked.named_modules() if hasattr(m, "graph")}


@settings(max_examples=25, deadline=None)
@given(
    experts=st.integers(1, 4),
    out=st.integers(1, 6),
    inp=st.sampled_from([4, 8, 12]),
    reduce_dim=st.sampled_from([1, 2]),
    bits=st.sampled_from([4, 8]),
    group=st.sampled_from([None, 4]),
    seed=st.integers(0, 10_000),
)
def test_expert_weight_codes_and_rounding_error(experts, out, inp, reduce_dim, bits, group, seed):
    g = torch.Generator().manual_seed(seed)
    canon = torch.randn(experts, out, inp, generator=g) * torch.rand(experts, out, 1, generator=g) * 3
    canon[0, 0] = 0.0  # an all-zero row quantizes to zeros
    w = canon if reduce_dim == 2 else canon.transpose(1, 2).contiguous()
    q = ExpertWeightQuant(bits, group, False, w, reduce_dim)
    codes, scale = q.quantize(w)
    assert codes.dtype == torch.int8 and codes.shape == canon.shape
    qm = 2 ** (bits - 1) - 1
    assert int(codes.abs().max()) <= qm
    per = scale.unsqueeze(-1) if group is None else scale.repeat_interleave(group, dim=-1)
    torch.testing.assert_close(codes.float() * per, q._canonical(q(w)))  # codes x scales is the fake-quant weight
    err = (q(w) - w).abs()
    assert (q._canonical(err) <= per / 2 + 1e-6).all()  # round to nearest, no clipping: absmax scales
    assert torch.equal(codes[0, 0], torch.zeros_like(codes[0, 0]))
    rows_max = codes.float().abs().reshape(experts, out, -1, group or inp).amax(-1)
    nonzero = canon.abs().reshape(experts, out, -1, group or inp).amax(-1) > 0
    assert (rows_max[nonzero] == qm).all()  # every (expert, channel[, group]) uses its full range


@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_weight_is_quantized_in_the_graph(captured, family):
    cooked, x = quantized(captured, family)
    paths = expert_paths(cooked)
    assert set(param_quants(cooked)) == set(paths) and len(paths) == 4
    changes = {c.path for r in cooked.history for c in r.changes}
    assert set(paths) <= changes
    for path in paths:
        owner, attr = cooked.parent(path)
        calls = {n.target: n for n in owner.graph.nodes if n.op == "call_module"}
        assert calls[f"{attr}_quant"].args[0].op == "get_attr"
        assert isinstance(getattr(owner, f"{attr}_input_quant").quant, TokenQuant)
        codes, _ = param_quants(cooked)[path].quantize(cooked.get_parameter(path))
        assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127 and int(codes.min()) >= -127
    float_out, quant_out = logits(captured[family][0], x), logits(cooked, x)
    assert not torch.equal(float_out, quant_out)
    torch.testing.assert_close(quant_out, float_out, atol=0.05 * float(float_out.abs().max()), rtol=0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_quantizing_twice_equals_once_and_weight_only_removes_input_nodes(captured, family):
    cooked, x = quantized(captured, family)
    code, out = graph_code(cooked), logits(cooked, x)
    apply(cooked, [Quantize()])
    assert graph_code(cooked) == code
    torch.testing.assert_close(logits(cooked, x), out, rtol=0, atol=0)
    apply(cooked, [Quantize(acts=None)])
    fresh, _ = quantized(captured, family, acts=None)
    assert graph_code(cooked) == graph_code(fresh)
    assert not any(isinstance(m, ExpertInputQuant) for m in cooked.modules())
    torch.testing.assert_close(logits(cooked, x), logits(fresh, x), rtol=0, atol=0)


def test_compiled_model_deep_copies_and_trains():
    model, x = tiny_model("qwen2_moe", seed=3), tiny_inputs("qwen2_moe", seed=3)
    cooked = fxcook.compile(model, [Quantize()], example_inputs=x)
    twin = copy.deepcopy(cooked)
    assert set(param_quants(twin)) == set(expert_paths(cooked))
    torch.testing.assert_close(logits(twin, x), logits(cooked, x), rtol=0, atol=0)
    twin.train()
    twin(**x).logits.sum().backward()
    assert all(twin.get_parameter(p).grad is not None for p in expert_paths(twin))
    assert all(cooked.get_parameter(p).grad is None for p in expert_paths(cooked))  # the copy owns its weights


@settings(max_examples=4, deadline=None)
@given(family=st.sampled_from(FAMILIES), acts=st.sampled_from(["int8/token", None]), learnable=st.booleans())
def test_qat_gradients_reach_every_expert_parameter(captured, family, acts, learnable):
    cooked, x = quantized(captured, family, acts=acts, learnable_scales=learnable)
    cooked.train()
    cooked(**x).logits.square().mean().backward()
    for path in expert_paths(cooked):
        grad = cooked.get_parameter(path).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, path
        if learnable:
            scale = param_quants(cooked)[path].scale
            assert scale.grad is not None and torch.isfinite(scale.grad).all(), path


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_false_leaves_experts_alone_and_linears_as_before(captured, family):
    base, _ = captured[family]
    off, _ = quantized(captured, family, experts=False)
    on, _ = quantized(captured, family)
    assert not param_quants(off)
    assert not any(isinstance(m, (ExpertWeightQuant, ExpertInputQuant)) for m in off.modules())
    experts = {p.rpartition(".")[0] for p in expert_paths(base)}
    code_base, code_off = graph_code(base), graph_code(off)
    assert all(code_off[p] == code_base[p] for p in experts)
    assert not {c.path for r in off.history for c in r.changes} & set(expert_paths(base))
    for p, m in on.named_modules():
        if isinstance(m, CookedLinear):
            o = off.get_submodule(p)
            assert repr(m.weight_quant) == repr(o.weight_quant) and repr(m.input_quant) == repr(o.input_quant), p
    torch.testing.assert_close(off.state_dict(), on.state_dict())  # token acts: no state is added


def test_exclude_patterns_select_expert_weights_by_parameter_path(captured):
    cooked, _ = quantized(captured, "mixtral", exclude=["*.layers.1.*"])
    assert sorted(param_quants(cooked)) == [
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.0.mlp.experts.gate_up_proj",
    ]
    cooked, _ = quantized(captured, "mixtral", exclude=["*.experts.down_proj"])
    assert all(p.endswith("gate_up_proj") for p in param_quants(cooked))


def test_include_patterns_may_select_only_expert_weights(captured):
    cooked, _ = quantized(captured, "mixtral", include=["*.experts.*"])
    assert len(param_quants(cooked)) == 4
    assert not any(isinstance(m, CookedLinear) and m.weight_quant is not None for m in cooked.modules())
    with pytest.raises(PassError, match="SelectorError.*no_such_layer"):
        quantized(captured, "mixtral", include=["*.no_such_layer"])


def test_static_activation_scales_are_calibrated(captured):
    calib = [tiny_inputs("qwen2_moe", batch=2, seq=8, seed=s) for s in range(2)]
    cooked, _ = quantized(captured, "qwen2_moe", acts="int8/tensor", calibration=calib)
    statics = [m.quant for m in cooked.modules() if isinstance(m, ExpertInputQuant)]
    assert len(statics) == 4 and all(isinstance(q, TensorQuant) and q.calibrated for q in statics)


def _ort_logits(path, x):
    sess = session(path)
    return torch.from_numpy(sess.run(None, {i.name: x[i.name].numpy() for i in sess.get_inputs()})[0])


@pytest.mark.parametrize(
    "family,acts",
    [
        ("mixtral", "int8/token"),
        ("qwen2_moe", "int8/token"),
        ("mixtral", None),
        ("qwen2_moe", "int8/tensor/dynamic"),
        ("mixtral", "int8/tensor"),
    ],
)
def test_onnx_export_stores_int8_experts_and_matches_torch(captured, tmp_path, family, acts):
    calib = [tiny_inputs(family, batch=2, seq=8, seed=s) for s in range(2)]
    cooked, x = quantized(captured, family, acts=acts, calibration=calib)
    path = export(cooked, tmp_path / "moe.onnx", x)
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    for param, quant in param_quants(cooked).items():
        e, n, k = quant.quantize(cooked.get_parameter(param))[0].shape
        int8 = [i for i in inits.values() if i.data_type == onnx.TensorProto.INT8 and list(i.dims) == [e * n, k]]
        assert int8, f"{param}: no int8 [{e * n}, {k}] initializer"
    assert not [i.name for i in inits.values() if len(i.dims) == 3]  # no float expert weights left
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DequantizeLinear") >= 4
    x2 = tiny_inputs(family, batch=3, seq=5, seed=7)  # other shapes: dynamic axes
    assert_ort_matches_int8(_ort_logits(path, x2), logits(cooked, x2), logits(captured[family][0], x2))


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_round_trip_of_quantized_experts(captured, tmp_path, family):
    cooked, x = quantized(captured, family)
    path = save_quantized(cooked, tmp_path / "q.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for p in expert_paths(cooked):
            assert p not in keys and f.get_tensor(f"{p}.qweight").dtype == torch.int8
            assert f"{p}.weight_scale" in keys
    fresh, _ = quantized(captured, family)
    with torch.no_grad():
        for p in expert_paths(fresh):
            fresh.get_parameter(p).add_(1.0)  # load must overwrite them
    load_quantized(fresh, path)
    quants = param_quants(cooked)
    for p in expert_paths(cooked):
        with torch.no_grad():
            torch.testing.assert_close(fresh.get_parameter(p), quants[p](cooked.get_parameter(p)))
    torch.testing.assert_close(logits(fresh, x), logits(cooked, x))


def test_unsupported_expert_implementation_is_a_clear_error():
    model, x = tiny_model("mixtral", seed=2), tiny_inputs("mixtral", seed=2)
    model.config._experts_implementation = "batched_mm"  # per-token weight gather + bmm: no grouped GEMM
    cooked = fxcook.capture(model, x)
    with pytest.raises(PassError, match="grouped_mm") as info:
        apply(copy.deepcopy(cooked), [Quantize()])
    assert isinstance(info.value.__cause__, NotSupportedYet)
    apply(cooked, [Quantize(experts=False)])  # the linears still quantize


def test_float_experts_export_through_the_grouped_gemm_translation(captured, tmp_path):
    cooked, x = quantized(captured, "qwen2_moe", experts=False)
    path = export(cooked, tmp_path / "float_experts.onnx", x)
    inits = onnx.load(str(path)).graph.initializer
    assert sum(len(i.dims) == 3 and i.data_type == onnx.TensorProto.FLOAT for i in inits) == 4
    x2 = tiny_inputs("qwen2_moe", batch=1, seq=6, seed=9)
    np.testing.assert_allclose(_ort_logits(path, x2).numpy(), logits(cooked, x2).numpy(), rtol=0, atol=1e-4)
