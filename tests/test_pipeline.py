"""Selectors, the pass protocol and the pipeline: ordering, errors naming passes, change logs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcook
from fxcook.errors import PassError, SelectorError
from fxcook.passbase import Change, Pass, PassConfig, PassResult
from fxcook.select import Select, match
from fxcook.testing import tiny_inputs, tiny_model


class Scale(Pass):
    """A toy exact pass: multiplies a site's weight by 1 (records a change per site)."""

    name = "scale"

    class Config(PassConfig):
        factor: float = 1.0
        include: list[str] = ["*"]

    def call(self, cooked):
        changes = []
        for site in Select(include=self.config.include).resolve(cooked):
            lin = cooked.get_submodule(site.path)
            with torch.no_grad():
                lin.weight.mul_(self.config.factor)
            changes.append(Change(site.path, f"weight x {self.config.factor}"))
        return PassResult(changes)


class Late(Scale):
    name = "late"
    after = ("scale",)


class Broken(Scale):
    name = "broken"

    def call(self, cooked):
        raise RuntimeError("boom")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama"), tiny_inputs("llama")


def test_compile_no_passes_exact_and_original_untouched(llama):
    model, x = llama
    w = model.model.layers[0].mlp.up_proj.weight.clone()
    cooked = fxcook.compile(model, [Scale(factor=2.0, include=["up_proj"])], example_inputs=x)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, w)
    assert torch.equal(cooked.get_submodule("model.layers.0.mlp.up_proj").weight, 2 * w)
    rec = cooked.history[0]
    assert rec.name == "scale" and len(rec.changes) == 2
    assert "model.layers.0.mlp.up_proj: weight x 2.0" in cooked.report()


def test_order_constraint_and_failure_names_passes(llama):
    model, x = llama
    with pytest.raises(PassError, match="'late' must run after 'scale'"):
        fxcook.compile(model, [Late(), Scale()], example_inputs=x)
    with pytest.raises(PassError) as err:
        fxcook.compile(model, [Scale(), Broken()], example_inputs=x)
    assert "Broken" in str(err.value) and "boom" in str(err.value) and "Scale()" in str(err.value)
    with pytest.raises(PassError, match="not a fxcook Pass"):
        fxcook.compile(model, [object()], example_inputs=x)


def test_selector_nothing_matched_lists_nearest(llama):
    model, x = llama
    cooked = fxcook.capture(model, x)
    with pytest.raises(SelectorError) as err:
        Select(include="mlp.up_prj").resolve(cooked)
    assert "mlp.up_prj" in str(err.value) and "model.layers.0.mlp.up_proj" in str(err.value)
    assert [s.path for s in Select(include="re:layers\\.1\\..*proj$", exclude="*o_proj").resolve(cooked)] == [
        f"model.layers.1.{n}"
        for n in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    assert len(Select(scope="all").resolve(cooked)) == len(Select().resolve(cooked)) + 1  # lm_head
    assert len(Select(kind="ffn", include="mlp.down_proj").resolve(cooked)) == 2
    with pytest.raises(ValueError, match="unknown site kind"):
        Select(kind="conv")


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.sampled_from(["encoder", "layer", "0", "1", "intermediate", "dense", "attention"]), min_size=1, max_size=5
    )
)
def test_suffix_glob_semantics(parts):
    path = ".".join(parts)
    assert match(path, path) and match("*", path)
    assert match(parts[-1], path)  # a dotted suffix matches
    assert match("re:" + parts[0], path)
    if len(parts) > 1:
        assert not match(parts[0][:-1] + "X", path)
