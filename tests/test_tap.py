"""Tap pass: output-identical insertion, values equal to eager hooks, spec syntax and errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import model_and_inputs

from fxcook.errors import PassError, SelectorError
from fxcook.passes.tap import Tap
from fxcook.pipeline import apply, compile
from fxcook.taps import TapPoint, collect_taps, parse_spec, run_with_taps, tap_points, teacher_pairs
from fxcook.tracing import main_output


@settings(max_examples=6, deadline=None)
@given(
    st.sampled_from(["bert", "gpt2", "llama", "t5", "mixtral"]).flatmap(lambda f: model_and_inputs(family=f)),
    st.booleans(),
)
def test_taps_never_change_outputs_and_match_eager(case, pre):
    fam, model, x, x2 = case
    cooked = compile(model, [], x)
    blocks = [s.path for s in cooked.sites.find("block")]
    before = main_output(cooked(**x2))
    specs = [f"[{'pre' if pre else 'post'}]{b}" for b in blocks]
    apply(cooked, [Tap(*specs)])
    out, taps = run_with_taps(cooked, **x2)
    assert torch.equal(main_output(out), before)
    assert set(taps) == set(specs)
    _, eager = run_with_taps(model, **x2, specs=specs)
    for name in specs:
        assert torch.allclose(taps[name], eager[name], atol=1e-5), name


def test_globs_pairs_and_collection_scope():
    from fxcook.testing import tiny_inputs, tiny_model

    x = tiny_inputs("bert")
    cooked = compile(
        tiny_model("bert"),
        [Tap("[post]encoder.layer.*:[post]encoder.layer.*", "[pre]encoder.layer.1.attention.self.query")],
        x,
    )
    names = set(tap_points(cooked))
    assert names == {"[post]encoder.layer.0", "[post]encoder.layer.1", "[pre]encoder.layer.1.attention.self.query"}
    teacher = tiny_model("bert", num_hidden_layers=2)
    assert teacher_pairs(cooked, [p for p, _ in teacher.named_modules() if p]) == [
        ("[post]encoder.layer.0", "[post]encoder.layer.0"),
        ("[post]encoder.layer.1", "[post]encoder.layer.1"),
    ]
    with collect_taps(cooked) as taps:
        cooked(**x)
    assert taps["[pre]encoder.layer.1.attention.self.query"].shape[-1] == 32
    cooked(**x)  # outside a collection the taps record nothing and hold no state
    assert all(tp._sink is None for tp in cooked.modules() if isinstance(tp, TapPoint))
    assert set(cooked.state_dict()) == set(compile(tiny_model("bert"), [], x).state_dict())
    before = len(tap_points(cooked))
    apply(cooked, [Tap("[post]encoder.layer.0")])  # idempotent
    assert len(tap_points(cooked)) == before


def test_spec_syntax():
    assert str(parse_spec("encoder.layer.3")[0]) == "[post]encoder.layer.3"
    s, t = parse_spec("[pre]encoder.layer.3:[post]encoder.layer.6")
    assert (s.where, s.path, t.where, t.path) == ("pre", "encoder.layer.3", "post", "encoder.layer.6")
    for bad in ("[mid]x", "a:b:c", "[post]"):
        with pytest.raises(SelectorError):
            parse_spec(bad)


def test_path_matching_nothing_names_nearest():
    from fxcook.testing import tiny_inputs, tiny_model

    x = tiny_inputs("bert")
    cooked = compile(tiny_model("bert"), [], x)
    with pytest.raises(PassError, match=r"encoder\.layers\.\*.*nearest paths.*encoder\.layer"):
        apply(cooked, [Tap("[post]encoder.layers.*")])
    with pytest.raises(PassError, match="teacher side"):
        apply(cooked, [Tap("[post]encoder.layer.*:[post]encoder.layer.0")])


@settings(max_examples=4, deadline=None)
@given(st.sampled_from(["bert", "llama"]).flatmap(lambda f: model_and_inputs(family=f)), st.booleans())
def test_taps_pass_gradients_through_unchanged(case, pre):
    """Distillation trains through taps: every parameter gets the gradient of the untapped model."""
    _, model, x, x2 = case
    plain = compile(model, [], x)
    tapped = compile(model, [], x)
    apply(tapped, [Tap(*(f"[{'pre' if pre else 'post'}]{s.path}" for s in tapped.sites.find("block")))])
    grads = []
    for cooked in (plain, tapped):
        with collect_taps(cooked):
            main_output(cooked(**x2)).square().mean().backward()
        grads.append({n: p.grad for n, p in cooked.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        if g is None:
            assert grads[1][name] is None, name
        else:
            assert grads[1][name] is not None and torch.allclose(grads[1][name], g, atol=1e-6), name
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads[1].values()) > len(grads[1]) // 2
