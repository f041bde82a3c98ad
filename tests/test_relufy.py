"""Relufy: GELU/SiLU FFN activations become ReLU, exactly as if the model had been built with ReLU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import fxcook
from fxcook.passes import Relufy
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import main_output

RELU_CONFIG = {"bert": {"hidden_act": "relu"}, "gpt2": {"activation_function": "relu"}, "llama": {"hidden_act": "relu"}}


@settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(family=st.sampled_from(sorted(RELU_CONFIG)), seed=st.integers(0, 5))
def test_relufy_equals_model_built_with_relu(family, seed):
    model, inputs = tiny_model(family, seed=seed), tiny_inputs(family, seed=seed)
    relu_model = tiny_model(family, seed=seed, **RELU_CONFIG[family])
    relu_model.load_state_dict(model.state_dict())
    cooked = fxcook.compile(model, [Relufy()], example_inputs=inputs)
    torch.testing.assert_close(main_output(cooked(**inputs)), main_output(relu_model(**inputs)), rtol=1e-5, atol=1e-5)
    ffns = cooked.sites.find("ffn")
    assert ffns and all(s.info["act_op"] == "relu" for s in ffns)
    assert all(isinstance(cooked.get_submodule(s.info["act"]), nn.ReLU) for s in ffns)
    assert len(cooked.history[-1].changes) == len(ffns)
    assert type(model.get_submodule(ffns[0].info["act"])).__name__ != "ReLU"  # the user's model is untouched


def test_already_relu_is_left_alone():
    model, inputs = tiny_model("t5"), tiny_inputs("t5")
    cooked = fxcook.compile(model, [Relufy()], example_inputs=inputs)
    assert cooked.history[-1].changes == []


def test_selector_limits_the_sites():
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    cooked = fxcook.compile(
        model, [Relufy(select={"kind": "ffn", "include": ["encoder.layer.0"]})], example_inputs=inputs
    )
    acts = {s.path: s.info["act_op"] for s in cooked.sites.find("ffn")}
    assert acts == {"encoder.layer.0": "relu", "encoder.layer.1": "gelu"}
    with pytest.raises(fxcook.PassError, match="matched no ffn site"):
        fxcook.compile(model, [Relufy(select={"kind": "ffn", "include": ["decoder.*"]})], example_inputs=inputs)
