"""Capture is exact: every family, any shape, the original untouched, state round-trips."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import model_and_inputs
from torch import nn

import fxcook
from fxcook.errors import CaptureError
from fxcook.nn import CookedLinear
from fxcook.testing import FAMILIES, tiny_inputs, tiny_model
from fxcook.tracing import main_output

SETTINGS = settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("family", FAMILIES)
@SETTINGS
@given(data=st.data())
def test_capture_is_exact_for_every_family(family, data):
    _, model, x, x2 = data.draw(model_and_inputs(family=family))
    before = copy.deepcopy(model.state_dict())
    cooked = fxcook.capture(model, x)
    for inp in (x, x2):  # the capture shape and a different batch/sequence with padding
        with torch.no_grad():
            ref, out = main_output(model(**inp)), main_output(cooked(**inp))
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= 1e-6 * max(1.0, ref.abs().max().item())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "capture mutated the original model"
    assert not any(p is q for p in cooked.parameters() for q in model.parameters())


def test_minilm_capture_exact_and_sites(minilm, minilm_cooked):
    model, tok = minilm
    enc = dict(
        tok(
            ["One short line.", "A rather longer line of real text, with more tokens in it than the first."],
            padding=True,
            return_tensors="pt",
        )
    )
    with torch.no_grad():
        ref, out = model(**enc).last_hidden_state, minilm_cooked(**enc).last_hidden_state
    assert (ref - out).abs().max().item() <= 1e-6
    linears = minilm_cooked.sites.find("linear")
    assert len(linears) == 37
    assert sum(1 for s in linears if minilm_cooked.sites.block_of(s.path)) == 36
    assert len(minilm_cooked.sites.find("ffn")) == 6 and len(minilm_cooked.sites.blocks) == 6
    from fxcook.report import activated_size

    names = dict(minilm_cooked.named_nodes())
    assert "encoder.layer.3.intermediate.dense/" not in names  # a CookedLinear leaf has no graph
    assert "encoder.layer.3.intermediate/dense" in names  # its call site, named from the module path
    assert len(names) == len(set(names))

    assert activated_size(minilm_cooked) == 10_616_832


def test_gpt2_conv1d_becomes_canonical_linear():
    model = tiny_model("gpt2")
    cooked = fxcook.capture(model, tiny_inputs("gpt2"))
    c_fc = cooked.get_submodule("transformer.h.0.mlp.c_fc")
    assert isinstance(c_fc, CookedLinear)
    assert torch.equal(c_fc.weight, model.transformer.h[0].mlp.c_fc.weight.t())


def test_tied_weights_stay_tied():
    cooked = fxcook.capture(tiny_model("gpt2"), tiny_inputs("gpt2"))
    assert cooked.get_submodule("lm_head").weight is cooked.get_submodule("transformer.wte").weight


@pytest.mark.parametrize("inplace", [False, True])
def test_state_dict_round_trip(inplace):
    model = tiny_model("llama")
    x = tiny_inputs("llama")
    cooked = fxcook.capture(model, x, inplace=inplace)
    state = {k: v.clone() for k, v in cooked.state_dict().items()}
    assert set(state) == set(model.state_dict())
    other = fxcook.capture(tiny_model("llama", seed=7), x)
    with torch.no_grad():
        assert not torch.allclose(other(**x).logits, cooked(**x).logits)
        other.load_state_dict(state)
        assert torch.equal(other(**x).logits, cooked(**x).logits)


def test_dynamic_shapes_and_training_gradients():
    model = tiny_model("bert")
    cooked = fxcook.capture(model, tiny_inputs("bert", batch=2, seq=8))
    cooked.train()
    out = cooked(**tiny_inputs("bert", batch=5, seq=3)).last_hidden_state
    out.square().mean().backward()
    grads = [p.grad for p in cooked.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads[:-2])


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()

    def forward(self, x):
        return self.inner(x) + 1


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not capturable
            return x * 2
        return x


def test_untraceable_module_error_names_module_and_construct():
    with pytest.raises(CaptureError) as err:
        fxcook.capture(DataDependent(), torch.randn(2, 4))
    msg = str(err.value)
    assert "inner (Branchy" in msg
    assert "data-dependent" in msg.lower() or "guard" in msg.lower()


def test_plain_module_and_bad_inputs():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    cooked = fxcook.capture(mlp, x)
    assert torch.allclose(cooked(torch.randn(3, 8) * 0 + x), mlp(x))
    assert len(cooked.sites.find("linear")) == 2 and len(cooked.sites.find("ffn")) == 1
    with pytest.raises(CaptureError, match="example_inputs"):
        fxcook.capture(mlp, "not a tensor")
    with pytest.raises(CaptureError, match="nn.Module"):
        fxcook.capture(lambda t: t, x)


def test_ffn_act_op_tells_plain_tanh_from_tanh_gelu():
    tanh_mlp = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    (ffn,) = fxcook.capture(tanh_mlp, torch.randn(3, 8)).sites.find("ffn")
    assert ffn.info["act_op"] == "tanh"
    gpt2 = fxcook.capture(tiny_model("gpt2"), tiny_inputs("gpt2"))
    assert {s.info["act_op"] for s in gpt2.sites.find("ffn")} == {"gelu_tanh"}


def test_deepcopy_is_independent_and_mode_follows_original():
    model = tiny_model("bert")
    x = tiny_inputs("bert")
    cooked = fxcook.capture(model, x)
    assert not cooked.training  # captured from an eval model
    twin = copy.deepcopy(cooked)
    with torch.no_grad():
        assert torch.equal(twin(**x).last_hidden_state, cooked(**x).last_hidden_state)
        twin.get_submodule("encoder.layer.0.intermediate.dense").weight.zero_()
        assert not torch.equal(twin(**x).last_hidden_state, cooked(**x).last_hidden_state)
    node = next(n for n in twin.get_submodule("encoder.layer.0").graph.nodes if n.op == "call_module")
    assert (
        node.graph
        is not next(n for n in cooked.get_submodule("encoder.layer.0").graph.nodes if n.op == "call_module").graph
    )


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "mixtral"])
def test_deepcopy_of_a_copy_is_exact_and_independent(family):
    cooked = fxcook.compile(tiny_model(family), [], example_inputs=(x := tiny_inputs(family)))
    copies = [cooked]
    for _ in range(3):  # a copy of a copy used to fail: its input_placeholders dragged stray nodes along
        copies.append(copy.deepcopy(copies[-1]))
    for c in copies[1:]:
        assert all(p in c.graph.nodes for p in c.input_placeholders)
    with torch.no_grad():
        ref = main_output(cooked(**x))
        for c in copies[1:]:
            assert torch.equal(main_output(c(**x)), ref)
        for p in copies[3].parameters():
            p.add_(1.0)
        assert not torch.equal(main_output(copies[3](**x)), ref)
        for c in copies[:3]:
            assert torch.equal(main_output(c(**x)), ref)
    main_output(copies[3](**x)).float().sum().backward()  # the copy trains, on its own parameters only
    assert all(p.grad is None for c in copies[:3] for p in c.parameters())
    assert any(p.grad is not None for p in copies[3].parameters())
    copies[3].recompile()


def test_a_dropped_compiled_model_is_freed():
    """Nothing global keeps the last compiled model alive (torch.export's leftover node map did, and
    under FSDP2 with it the process group)."""
    import gc
    import weakref

    cooked = fxcook.compile(tiny_model("llama"), [], tiny_inputs("llama"))
    ref = weakref.ref(cooked)
    del cooked
    gc.collect()
    assert ref() is None
