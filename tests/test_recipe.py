"""Recipes: validation errors name the key; BMCook configs import or refuse clearly."""

import json
from pathlib import Path

import pytest
import torch

from fxcook import load_recipe
from fxcook.errors import NotSupportedYet, RecipeError
from fxcook.passes import REGISTRY


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(RecipeError, match="recipe.passess"):
        load_recipe(write(tmp_path, "r.yaml", "passess: []\n"))
    with pytest.raises(RecipeError, match=r"passes\[0\]: unknown pass 'quantise'"):
        load_recipe(write(tmp_path, "r.yaml", "passes:\n  - quantise: {}\n"))
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe(write(tmp_path, "r.json", "{passes: "))
    with pytest.raises(RecipeError, match="calibration.samples"):
        load_recipe(write(tmp_path, "r.yaml", "calibration: {samples: 0}\n"))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_unknown_pass_option_is_named(tmp_path, name):
    with pytest.raises(RecipeError, match=rf"passes\[0\]\.{name}\.no_such_option"):
        load_recipe(write(tmp_path, "r.yaml", f"passes:\n  - {name}: {{no_such_option: 1}}\n"))


def test_bmcook_unknown_key_and_empty(tmp_path):
    with pytest.raises(RecipeError, match="unknown BMCook key"):
        load_recipe(write(tmp_path, "b.json", json.dumps({"quantization": {"is_quant": False}, "prune": {}})))
    assert load_recipe(write(tmp_path, "b.json", json.dumps({"quantization": {"is_quant": False}}))).passes == []


def test_bmcook_maps_or_says_not_supported(tmp_path):
    cfg = {
        "quantization": {"is_quant": True},
        "pruning": {"is_pruning": True, "mask_method": "m4n2_1d"},
        "MoEfication": {"is_moefy": False},
        "distillation": {"ce_scale": 0, "mse_hidn_scale": 0},
    }
    path = write(tmp_path, "bmcook.json", json.dumps(cfg))
    missing = {"quantize", "sparsify"} - set(REGISTRY)
    if missing:
        with pytest.raises(NotSupportedYet, match="not supported yet"):
            load_recipe(path)
    else:
        names = [next(iter(p)) for p in load_recipe(path).passes]
        assert names == ["sparsify", "quantize"]


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).resolve().parents[1].glob("fxcook/recipes/*.yaml")), ids=lambda p: p.name
)
def test_example_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.all_passes and all(type(p).name in REGISTRY for p in recipe.build())


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).resolve().parents[1].glob("fxcook/recipes/*.yaml")), ids=lambda p: p.name
)
def test_example_recipes_hand_calibration_to_every_data_pass(path):
    from fxcook.passbase import DataPass

    batches = [{"input_ids": torch.ones(1, 4, dtype=torch.long)}]
    built = load_recipe(path).build(calibration=batches)
    data_passes = [p for p in built if isinstance(p, DataPass)]
    assert data_passes and all(p.calibration is batches for p in data_passes)


def test_shipped_recipes_load_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file named int8 here: the shipped recipe is meant
    assert load_recipe("int8").source.endswith("fxcook/recipes/int8.yaml")
    with pytest.raises(
        RecipeError, match=r"recipe int9 does not exist \(shipped recipes, usable by name: (\w+, )*int8, "
    ):
        load_recipe("int9")
