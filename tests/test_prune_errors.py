"""Bad input to Prune and Slice: each a clear error naming the option, site or order at fault."""

import pydantic
import pytest
import torch
from torch import nn

import fxcook
from fxcook.passes.prune import Prune, Slice
from fxcook.passes.quantize import Quantize
from fxcook.testing import tiny_inputs, tiny_model

X = tiny_inputs("bert")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class PlainMLP(nn.Module):
    """Residual FFN blocks and no attention at all."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("target", [0.0, 1.0, -0.2, 1.5])
def test_target_outside_0_1(target):
    with pytest.raises(pydantic.ValidationError, match="target"):
        Prune(target=target)


def test_heads_on_a_model_without_attention():
    x = torch.randn(2, 3, 8)
    with pytest.raises(fxcook.PassError, match=r"granularity \['heads'\]: the model has no attention.*blocks\.0"):
        fxcook.compile(PlainMLP(), [Prune(granularity=("heads",), calibration=[x])], example_inputs=x)
    cooked = fxcook.compile(PlainMLP(), [Prune(granularity=("ffn",), target=0.3, calibration=[x])], example_inputs=x)
    assert cooked.get_submodule("blocks.0.unit_gate").count == 16  # FFNs prune without attention


def test_hidden_is_not_built_yet():
    with pytest.raises(fxcook.PassError, match="granularity 'hidden'.*not built yet"):
        fxcook.compile(tiny_model("bert"), [Prune(granularity=("heads", "hidden"), calibration=[X])], example_inputs=X)


def test_emptying_a_layer_needs_mha_or_ffn_layer():
    with pytest.raises(fxcook.PassError, match="without removing whole attention sublayers.*allow 'mha'"):
        fxcook.compile(
            tiny_model("bert"), [Prune(granularity=("heads",), target=0.45, calibration=[X])], example_inputs=X
        )
    cooked = fxcook.compile(
        tiny_model("bert"), [Prune(granularity=("heads", "mha"), target=0.45, calibration=[X])], example_inputs=X
    )
    assert any(float(g.mask.sum()) == 0 for p, g in cooked.named_modules() if p.endswith("mha_gate"))


def test_prune_after_quantize_names_the_site():
    with pytest.raises(
        fxcook.PassError,
        match="encoder.layer.0.attention.self.query is already quantized; Prune must run before Quantize",
    ):
        fxcook.compile(tiny_model("bert"), [Quantize(), Prune(calibration=[X])], example_inputs=X)


def test_importance_needs_calibration_and_slice_needs_prune():
    with pytest.raises(fxcook.PassError, match="method 'importance' needs calibration"):
        fxcook.compile(tiny_model("bert"), [Prune()], example_inputs=X)
    with pytest.raises(fxcook.PassError, match="run Prune before Slice"):
        fxcook.compile(tiny_model("bert"), [Slice()], example_inputs=X)


def test_options_are_checked():
    with pytest.raises(pydantic.ValidationError, match="granularity"):
        Prune(granularity=("heads", "rows"))
    with pytest.raises(pydantic.ValidationError, match="deterministic|extra"):
        Slice(determinstic=True)


def test_slice_after_quantize_names_the_site():
    with pytest.raises(fxcook.PassError, match="slice: encoder.layer.0.attention.self.query is already quantized"):
        fxcook.compile(tiny_model("bert"), [Prune(calibration=[X]), Quantize(), Slice()], example_inputs=X)
