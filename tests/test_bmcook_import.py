"""BMCook's own configs import; a key fxcook cannot honour is a RecipeError naming it."""

import copy
import json

import pytest
import torch

import fxcook
from fxcook import load_recipe
from fxcook.errors import RecipeError
from fxcook.nn import CookedLinear
from fxcook.testing import tiny_inputs, tiny_model

# BMCook's examples/gpt/configs/gpt2-prune.json, key for key
PRUNE = {
    "distillation": {
        "ce_scale": 0,
        "mse_hidn_scale": 0,
        "mse_hidn_module": [
            "[post]encoder.output_layernorm:[post]encoder.output_layernorm",
            "[pre]encoder.layers.9.ffn.layernorm_before_ffn:[pre]encoder.layers.9.ffn.layernorm_before_ffn",
        ],
        "mse_hidn_proj": False,
    },
    "pruning": {
        "is_pruning": True,
        "pruning_mask_path": "prune_example.bin",
        "pruned_module": ["encoder.layers.0"],
        "mask_method": "m4n2_1d",
    },
    "quantization": {"is_quant": False},
    "MoEfication": {"is_moefy": False, "first_FFN_module": ["ffn.layernorm_before_ffn"]},
}
# BMCook's examples/gpt/configs/gpt2-moe.json: pruning off, with an sprune section BMCook then ignores
MOE = copy.deepcopy(PRUNE)
MOE["pruning"] = {
    "is_pruning": False,
    "pruning_mask_path": "prune_example.bin",
    "pruned_module": ["input_embedding"],
    "mask_method": "sprune",
    "sprune": {
        "criterion": "l0",
        "training_mask": ["transformer", "num_heads"],
        "fixed_mask_path": "",
        "mask_mode": "train_mask",
        "target_mode": "sparsity",
        "target_sparsity": 0.5,
    },
}
MOE["MoEfication"].update(is_moefy=True, experts=4, top_k=2)  # fxcook's additions (BMCook's command line)


def write(tmp_path, cfg):
    path = tmp_path / "bmcook.json"
    path.write_text(json.dumps(cfg, indent=4))
    return path


def test_quick_start_pruning_config_imports(tmp_path):
    with pytest.warns(UserWarning, match="pruning_mask_path' = 'prune_example.bin' is neither read nor written"):
        recipe = load_recipe(write(tmp_path, PRUNE))
    assert recipe.passes == [
        {
            "sparsify": {
                "pattern": "2:4",
                "method": "m4n2_1d",
                "select": {"include": [r"re:encoder\.layers\.0"], "kind": "linear", "scope": "all"},
            }
        }
    ]
    assert recipe.train is None


def test_moefication_config_imports_and_ignores_a_switched_off_section(tmp_path):
    recipe = load_recipe(write(tmp_path, MOE))
    select = {"include": [r"re:ffn\.layernorm_before_ffn"], "kind": "ffn", "scope": "all"}
    assert recipe.passes == [{"moefy": {"experts": 4, "top_k": 2, "select": select}}]
    del MOE["MoEfication"]["experts"]
    with pytest.raises(RecipeError, match="BMCook key 'MoEfication' needs experts for fxcook"):
        load_recipe(write(tmp_path, MOE))


def test_combined_config_maps_every_section(tmp_path):
    cfg = copy.deepcopy(PRUNE)
    cfg["quantization"] = {"is_quant": True, "quantized_module": ["attention.self.query"]}
    cfg["distillation"].update(ce_scale=0.5, ce_temp=2, mse_hidn_scale=1)
    with pytest.warns(UserWarning):
        recipe = load_recipe(write(tmp_path, cfg))
    assert [next(iter(p)) for p in recipe.passes] == ["sparsify", "quantize", "tap"]
    assert recipe.passes[2]["tap"]["taps"] == cfg["distillation"]["mse_hidn_module"]
    assert recipe.train.settings() == {"loss": {"kl": 0.5, "hidden_mse": 1.0, "temperature": 2.0}}


@pytest.mark.parametrize(
    "section, key, value, named",
    [
        ("quantization", "bits", 4, "unknown BMCook key 'quantization.bits'"),
        ("pruning", "sparsity", 0.75, "unknown BMCook key 'pruning.sparsity'"),
        ("pruning", "pruned_modules", ["x"], "unknown BMCook key 'pruning.pruned_modules'"),
        ("pruning", "mask_method", "sprune", "BMCook key 'pruning.mask_method' = 'sprune' is not mapped"),
        ("distillation", "mse_hidn_proj", True, "BMCook key 'distillation.mse_hidn_proj' = true is not mapped"),
        ("distillation", "mse_att_scale", 1.0, "BMCook key 'distillation.mse_att_scale' = 1.0 is not mapped"),
        (
            "MoEfication",
            "first_FFN_module",
            "ffn",
            "BMCook key 'MoEfication.first_FFN_module': Input should be a valid list",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:.*pruning_mask_path")
def test_keys_fxcook_does_not_map_are_named(tmp_path, section, key, value, named):
    cfg = copy.deepcopy(PRUNE)
    cfg["distillation"]["mse_hidn_scale"] = 1  # distillation on, so its keys count
    cfg["MoEfication"].update(is_moefy=True, experts=4, top_k=2)
    cfg[section][key] = value
    with pytest.raises(RecipeError, match=named):
        load_recipe(write(tmp_path, cfg))


def test_imported_pruning_prunes_exactly_the_named_parameters(tmp_path):
    cfg = copy.deepcopy(PRUNE)
    cfg["pruning"].update(pruned_module=["intermediate.dense.weight"], pruning_mask_path=None)
    recipe = load_recipe(write(tmp_path, cfg))
    model = tiny_model("bert")
    cooked = fxcook.compile(model, recipe.build(), example_inputs=tiny_inputs("bert"))
    masked = {p for p, m in cooked.named_modules() if isinstance(m, CookedLinear) and m.weight_mask is not None}
    assert masked == {f"encoder.layer.{i}.intermediate.dense" for i in range(2)}
    dense = cooked.get_submodule("encoder.layer.0.intermediate.dense").weight.detach()
    assert torch.equal((dense.reshape(-1, 4) != 0).sum(1), torch.full((dense.numel() // 4,), 2))
