"""Core helpers every pass shares: the calibration recorder, the model's main output, parent lookups,
explicit site updates, declared mask schedules and the recipes shipped with the package."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

import fxcook
from fxcook import demo
from fxcook.errors import PassError
from fxcook.passes import Relufy, Sparsify
from fxcook.sites import Site, SiteIndex
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import main_output, parent_of, record_inputs


class TwoBranch(nn.Module):
    """`b` runs only when the input sums to more than zero."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x)) if float(x.sum()) > 0 else self.a(x)


def test_record_inputs_sees_every_call_and_removes_its_hooks():
    model, seen = TwoBranch(), {}
    batches = [torch.ones(2, 4), torch.ones(3, 4)]
    record_inputs(
        model,
        {"a": model.a, "b": model.b},
        lambda k, x: seen.setdefault(k, []).append(x.shape[0]),
        batches,
        "test calibration",
    )
    assert seen == {"a": [2, 3], "b": [2, 3]}
    assert not model.a._forward_pre_hooks and not model.b._forward_pre_hooks


def test_record_inputs_names_the_modules_never_reached_and_respects_the_limit():
    model = TwoBranch()
    batches = [-torch.ones(1, 4), torch.ones(1, 4)]  # the second batch would reach b: past the limit
    with pytest.raises(
        PassError, match=r"^test calibration never reached \['b'\] \(is the calibration data empty\?\)$"
    ):
        record_inputs(model, {"a": model.a, "b": model.b}, lambda k, x: None, batches, "test calibration", limit=1)
    assert not model.b._forward_pre_hooks


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_record_inputs_leaves_padding_out(family):
    """With skip_padding, a batch with padding appended records the rows of the unpadded batch only."""
    model = fxcook.compile(tiny_model(family), [], example_inputs=tiny_inputs(family))
    path = next(s.path for s in model.sites.find("linear") if model.sites.block_of(s.path) is not None)
    plain = tiny_inputs(family, seq=6)
    padded = {k: torch.cat([v, torch.zeros(2, 4, dtype=v.dtype)], 1) for k, v in plain.items()}
    padded["input_ids"][:, 6:] = 7  # tokens a padding-blind recorder would see
    rows, rec_to = {}, lambda rec: lambda k, x: rec.append(x)
    for name, batch in (("plain", plain), ("padded", padded)):
        rec = rows.setdefault(name, [])
        record_inputs(model, {path: model.get_submodule(path)}, rec_to(rec), [batch], "cal", skip_padding=True)
    assert rows["plain"][0].shape == (12, rows["plain"][0].shape[-1])  # [batch * seq, features]
    assert rows["padded"][0].shape == rows["plain"][0].shape
    torch.testing.assert_close(rows["padded"][0], rows["plain"][0], rtol=1e-5, atol=1e-5)
    kept = []  # by default (activation ranges) padded positions are recorded, laid out as the input
    record_inputs(model, {path: model.get_submodule(path)}, rec_to(kept), [padded], "cal")
    assert kept[0].shape[:2] == (2, 10)


@settings(max_examples=20, deadline=None)
@given(st.booleans(), st.integers(1, 3))
def test_main_output(with_loss, n):
    t = torch.randn(n, 3)
    loss = torch.tensor(1.0) if with_loss else None
    assert main_output(t) is t
    assert main_output(BaseModelOutput(last_hidden_state=t)) is t
    assert main_output(CausalLMOutput(loss=loss, logits=t)) is t  # never the loss
    assert main_output(BaseModelOutput(last_hidden_state=t), ("logits",)) is None
    assert main_output(("x", t, loss)) is t and main_output({"y": t}) is t
    assert main_output("no tensor") is None


def test_parent_of_and_cooked_parent():
    model = tiny_model("bert", num_hidden_layers=1)
    cooked = fxcook.compile(model, [], example_inputs=tiny_inputs("bert"))
    path = "encoder.layer.0.output.dense"
    owner, name = cooked.parent(path)
    assert owner is cooked.get_submodule("encoder.layer.0.output") and name == "dense"
    assert parent_of(model, path + ".weight") == (model.get_submodule(path), "weight")


def test_site_update_replaces_instead_of_editing():
    site = Site("ffn.0", "ffn", {"act_op": "gelu"})
    index = SiteIndex([site])
    new = index.update("ffn.0", "ffn", act_op="relu", moe="x")
    assert site.info == {"act_op": "gelu"} and new.info == {"act_op": "relu", "moe": "x"}
    assert index.find("ffn") == [new]
    with pytest.raises(KeyError, match="no ffn site at 'ffn.1'"):
        index.update("ffn.1", "ffn", act_op="relu")


def test_relufy_leaves_sites_taken_before_it_alone():
    cooked = fxcook.compile(tiny_model("bert", num_hidden_layers=1), [], example_inputs=tiny_inputs("bert"))
    before = cooked.sites.find("ffn")
    fxcook.apply(cooked, [Relufy()])
    assert {s.info["act_op"] for s in before} == {"gelu"}
    assert {s.info["act_op"] for s in cooked.sites.find("ffn")} == {"relu"}


def test_mask_schedules_is_a_declared_attribute():
    cooked = fxcook.compile(tiny_model("bert", num_hidden_layers=1), [], example_inputs=tiny_inputs("bert"))
    assert cooked.mask_schedules == []
    p = Sparsify(method="magnitude", schedule={"end": 4, "every": 2})
    fxcook.apply(cooked, [p])
    assert cooked.mask_schedules == [p.state]


def test_demo_recipes_ship_inside_the_package():
    package = Path(fxcook.__file__).resolve().parent
    assert demo.RECIPES.is_relative_to(package)
    assert all((demo.RECIPES / s.recipe).is_file() for s in demo.STAGES if s.recipe)
