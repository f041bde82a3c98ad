"""The Quantize pass on captured models: what it selects, errors, QAT gradients, SmoothQuant."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcook
from fxcook.errors import PassError, RecipeError
from fxcook.nn import CookedLinear
from fxcook.passes import Quantize
from fxcook.passes.quantize.quantizers import TensorQuant, TokenQuant, WeightQuant
from fxcook.recipe import parse_recipe
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import main_output


def bert(seed=0):
    return tiny_model("bert", seed=seed), tiny_inputs("bert", batch=2, seq=8, seed=seed)


def linears(cooked):
    return {p: m for p, m in cooked.named_modules() if isinstance(m, CookedLinear)}


def test_default_quantizes_block_linears_only():
    model, x = bert()
    cooked = fxcook.compile(model, [Quantize()], example_inputs=x)
    for path, m in linears(cooked).items():
        inside = cooked.sites.block_of(path) is not None
        assert isinstance(m.weight_quant, WeightQuant) == inside, path
        assert isinstance(m.input_quant, TokenQuant) == inside, path
    assert any(cooked.sites.block_of(p) is None for p in linears(cooked))  # the pooler stays float


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 1000), st.sampled_from(["bert", "gpt2", "llama"]))
def test_qat_gradients_reach_every_quantized_weight(seed, family):
    model = tiny_model(family, seed=seed)
    x = tiny_inputs(family, batch=2, seq=6, seed=seed)
    cooked = fxcook.compile(model, [Quantize()], example_inputs=x)
    cooked.train()
    out = cooked(**x)
    main_output(out).square().mean().backward()
    quantized = {p: m for p, m in linears(cooked).items() if m.weight_quant is not None}
    assert quantized
    for p, m in quantized.items():
        assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all(), p
        assert m.weight.grad.abs().sum() > 0, p


def test_smoothquant_is_exact_in_float_and_shares_factors():
    model, x = bert(1)
    calib = [tiny_inputs("bert", batch=2, seq=8, seed=s) for s in range(3)]
    ref = fxcook.compile(model, [], example_inputs=x)(**x).last_hidden_state
    cooked = fxcook.compile(model, [Quantize(calibration=calib, smoothquant=0.5)], example_inputs=x)
    att = "encoder.layer.0.attention.self."
    q, k = cooked.get_submodule(att + "query"), cooked.get_submodule(att + "key")
    torch.testing.assert_close(q.input_quant.smooth, k.input_quant.smooth)
    down = {s.info["down"] for s in cooked.sites.find("ffn")}
    assert down and all(cooked.get_submodule(p).input_quant.smooth is None for p in down)  # off by default
    for m in linears(cooked).values():  # rounding off: the smoothing alone must be exact
        if m.weight_quant is not None:
            m.weight_quant, m.input_quant = None, Divide(m.input_quant.smooth)
    torch.testing.assert_close(cooked(**x).last_hidden_state, ref, atol=1e-4, rtol=1e-4)


class Divide(torch.nn.Module):
    def __init__(self, by):
        super().__init__()
        self.by = by

    def forward(self, x):
        return x if self.by is None else x / self.by


def test_smooth_down_proj_smooths_ffn_down_projections():
    model, x = bert(2)
    calib = [tiny_inputs("bert", batch=2, seq=8, seed=s) for s in range(2)]
    cooked = fxcook.compile(
        model, [Quantize(calibration=calib, smoothquant=0.5, smooth_down_proj=True)], example_inputs=x
    )
    assert all(m.input_quant.smooth is not None for m in linears(cooked).values() if m.input_quant is not None)


def _masked_error(cooked, ref_model, batches):
    err = 0.0
    for b in batches:
        diff = cooked(**b).last_hidden_state - ref_model(**b).last_hidden_state
        err += float((diff.square() * b["attention_mask"][..., None]).sum())
    return err


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 1000))
def test_sensitive_inputs_switch_whole_input_groups_and_lower_the_error(seed):
    model, x = bert(seed)
    calib = [tiny_inputs("bert", batch=2, seq=8, seed=seed + s, pad=3) for s in range(2)]
    base = fxcook.compile(
        model, [Quantize(calibration=calib, acts="int8/tensor/dynamic", smoothquant=0.5)], example_inputs=x
    )
    mixed = fxcook.compile(
        model,
        [Quantize(calibration=calib, acts="int8/tensor/dynamic", smoothquant=0.5, sensitive_inputs=1)],
        example_inputs=x,
    )
    token = {p for p, m in linears(mixed).items() if isinstance(m.input_quant, TokenQuant)}
    assert token, "one input group switches to per-token"
    att = [f"encoder.layer.{i}.attention.self." for i in range(2)]
    for prefix in att:  # q, k and v read one tensor: all or none of them switch
        assert len({prefix + n in token for n in ("query", "key", "value")}) == 1
    assert len(token) in (1, 3)
    with torch.no_grad():
        assert _masked_error(mixed, model, calib) < _masked_error(base, model, calib)


def test_static_activations_calibrate():
    model, x = bert(2)
    calib = [tiny_inputs("bert", batch=2, seq=8, seed=s) for s in range(2)]
    cooked = fxcook.compile(model, [Quantize(calibration=calib, acts="int8/tensor", observer="mse")], example_inputs=x)
    quants = [m.input_quant for m in linears(cooked).values() if m.input_quant is not None]
    assert quants and all(isinstance(q, TensorQuant) and q.calibrated for q in quants)
    assert torch.isfinite(cooked(**x).last_hidden_state).all()


def test_errors_name_the_key_or_pattern():
    model, x = bert()
    with pytest.raises(PassError, match="selector include=\\['nothing.here'\\]"):
        fxcook.compile(model, [Quantize(select={"include": "nothing.here"})], example_inputs=x)
    with pytest.raises(PassError, match="calibration"):
        fxcook.compile(model, [Quantize(acts="int8/tensor")], example_inputs=x)
    with pytest.raises(PassError, match="no data"):
        fxcook.compile(model, [Quantize(acts="int8/tensor", calibration=[])], example_inputs=x)
    with pytest.raises(RecipeError, match=r"passes\[0\].quantize.weights"):
        parse_recipe({"passes": [{"quantize": {"weights": "int12/channel"}}]})
    with pytest.raises(RecipeError, match="group-wise"):
        parse_recipe({"passes": [{"quantize": {"weights": "int4/group16"}}]})


def test_bmcook_style_include_and_weight_only_groups():
    model, x = bert()
    cooked = fxcook.compile(
        model, [Quantize(include=["intermediate.dense"], weights="int4/group16", acts=None)], example_inputs=x
    )
    got = {p for p, m in linears(cooked).items() if m.weight_quant is not None}
    assert got == {f"encoder.layer.{i}.intermediate.dense" for i in range(2)}
    assert all(linears(cooked)[p].bits == 4 for p in got)
