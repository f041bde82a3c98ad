"""The shipped pruning recipes load by name, build, and make a smaller model (int8 on top for prune50_int8)."""

import pytest
import torch

import fxcook
from fxcook.recipe import load_recipe
from fxcook.report import block_weights
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import main_output


@pytest.mark.parametrize("name, quantized", [("prune50", False), ("prune50_int8", True)])
def test_shipped_pruning_recipes(name, quantized):
    recipe = load_recipe(name)
    calib = [tiny_inputs("bert", seed=s) for s in range(2)]
    dense = fxcook.compile(tiny_model("bert"), [], example_inputs=calib[0])
    cooked = fxcook.apply(fxcook.compile(tiny_model("bert"), [], example_inputs=calib[0]), recipe.build(calib))
    assert [r.name for r in cooked.history] == ["prune", "slice"] + (["quantize"] if quantized else [])
    assert block_weights(cooked) <= 0.5 * block_weights(dense)  # at least half removed
    with torch.no_grad():
        assert torch.isfinite(main_output(cooked(**calib[1]))).all()
