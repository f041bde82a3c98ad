"""Every selector pattern must match a site: a mistyped exclude is an error, never a rewrite of what it meant."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcook
from fxcook import passes as P
from fxcook.errors import PassError, SelectorError
from fxcook.select import Select, nearest
from fxcook.testing import tiny_inputs, tiny_model

LAYER0_FFN = "encoder.layer.0.intermediate.dense"


@pytest.fixture(scope="module")
def bert():
    model = tiny_model("bert")
    return model, fxcook.capture(model, tiny_inputs("bert"))


def test_mistyped_exclude_is_refused_naming_the_pattern(bert):
    model, _ = bert
    with pytest.raises(PassError) as err:
        fxcook.compile(model, [P.Sparsify(select={"exclude": [LAYER0_FFN[:-1]]})], example_inputs=tiny_inputs("bert"))
    assert isinstance(err.value.__cause__, SelectorError)
    msg = str(err.value)
    assert f"exclude pattern {LAYER0_FFN[:-1]!r} matches no site of the model" in msg
    assert f"nearest paths: {LAYER0_FFN}" in msg


def test_right_exclude_keeps_the_layer(bert):
    model, _ = bert
    cooked = fxcook.compile(model, [P.Sparsify(select={"exclude": [LAYER0_FFN]})], example_inputs=tiny_inputs("bert"))
    assert getattr(cooked.get_submodule(LAYER0_FFN), "weight_mask", None) is None
    assert cooked.get_submodule("encoder.layer.1.intermediate.dense").weight_mask is not None
    torch.testing.assert_close(cooked.get_submodule(LAYER0_FFN).weight, model.get_submodule(LAYER0_FFN).weight)


@pytest.mark.parametrize("key", ["include", "exclude"])
def test_each_pattern_must_match_even_when_others_do(bert, key):
    _, cooked = bert
    with pytest.raises(SelectorError, match=f"{key} pattern 'attention.self.qeury' matches no site"):
        Select(**{key: ["attention.self.key", "attention.self.qeury"]}).resolve(cooked)


def test_pattern_matching_another_kind_or_scope_is_valid(bert):
    _, cooked = bert
    assert Select(exclude=["pooler.dense"]).resolve(cooked) == Select().resolve(cooked)  # out of scope, not a typo
    assert len(Select(kind="ffn", include=["intermediate.dense"]).resolve(cooked)) == 2


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_nearest_ranks_the_intended_path_first(bert, data):
    _, cooked = bert
    paths = [s.path for s in cooked.sites.find("linear")]
    path = data.draw(st.sampled_from(paths))
    parts = path.split(".")
    suffix = ".".join(parts[data.draw(st.integers(0, len(parts) - 1)) :])
    # drop one character that is not a layer number (dropping the "1" of "layer.1" names no layer at all)
    i = data.draw(st.sampled_from([j for j, c in enumerate(suffix) if not c.isdigit()]))
    typo = suffix[:i] + suffix[i + 1 :]
    best = nearest(typo, paths)[0]
    # the intended path, or, when the suffix names no layer, one of the paths it ends every layer with
    assert best.endswith(suffix)
