"""Prune(method="importance"): dead structures score zero and go first, the target is met as the report
measures it, the task loss reads labels, head_importance is normalised per layer and min-max scaled, the
gates show in the graph, and the pass composes with Slice, Sparsify, Quantize and Moefy."""

import pytest
import torch

import fxcook
from fxcook.passes.moefy import Moefy
from fxcook.passes.prune import Prune, Slice, head_importance
from fxcook.passes.quantize import Quantize
from fxcook.passes.sparsify import Sparsify
from fxcook.report import block_weights
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import main_output

CALIB = [tiny_inputs("bert", seed=s) for s in range(3)]
HEAD = "encoder.layer.1.attention.output.head_gate"
UNITS = "encoder.layer.0.output.unit_gate"


def bert_with_dead_structures():
    """Head 2 of layer 1 writes nothing (zero o columns), FFN unit 5 of layer 0 is never active (zero up row)."""
    model = tiny_model("bert")
    with torch.no_grad():
        model.encoder.layer[1].attention.output.dense.weight[:, 16:24] = 0
        model.encoder.layer[0].intermediate.dense.weight[5] = 0
        model.encoder.layer[0].intermediate.dense.bias[5] = -10.0  # gelu(-10) = 0: the unit is dead
    return model


@pytest.mark.parametrize("ffn_score", ["taylor", "activation"])
def test_dead_structures_score_zero_and_are_removed_first(ffn_score):
    cooked = fxcook.compile(
        bert_with_dead_structures(),
        [Prune(target=0.05, calibration=CALIB, ffn_score=ffn_score)],
        example_inputs=CALIB[0],
    )
    heads = cooked.get_submodule(HEAD).mask
    assert heads[2] == 0 and int(heads.count_nonzero()) >= 3
    assert cooked.get_submodule(UNITS).mask[5] == 0


def test_head_importance_is_normalised_per_layer_and_min_max_scaled():
    cooked = fxcook.compile(bert_with_dead_structures(), [], example_inputs=CALIB[0])
    scores = head_importance(cooked, CALIB)
    assert sorted(scores) == ["encoder.layer.0", "encoder.layer.1"]
    flat = torch.cat(list(scores.values()))
    assert float(flat.min()) == 0.0 and float(flat.max()) == pytest.approx(1.0)
    assert float(scores["encoder.layer.1"][2]) == 0.0  # the dead head
    assert not any("gate" in p for p, _ in cooked.named_modules())  # the model itself is left as it was


@pytest.mark.parametrize("target", [0.2, 0.5, 0.7])
def test_target_is_met_as_the_report_measures_it(target):
    cooked = fxcook.compile(tiny_model("bert"), [], example_inputs=CALIB[0])
    dense = block_weights(cooked)
    fxcook.apply(cooked, [Prune(target=target, calibration=CALIB), Slice()])
    removed = 1 - block_weights(cooked) / dense
    assert target <= removed < target + 0.06  # one structure per pool past the goal at most
    assert "heads kept" in cooked.report()


def test_task_loss_reads_labels_and_missing_labels_are_named():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ).eval()
    calib = [{**b, "labels": torch.tensor([0, 1])} for b in CALIB]
    cooked = fxcook.compile(model, [Prune(target=0.3, loss="task", calibration=calib)], example_inputs=CALIB[0])
    assert "bert.encoder.layer.0.attention.self: heads" in cooked.report()
    with pytest.raises(fxcook.PassError, match="loss='task' needs calibration batches with 'labels'.*batch 0"):
        fxcook.compile(model, [Prune(target=0.3, loss="task", calibration=CALIB)], example_inputs=CALIB[0])


def test_gates_are_visible_in_the_graph():
    cooked = fxcook.compile(tiny_model("bert"), [Prune(target=0.3, calibration=CALIB)], example_inputs=CALIB[0])
    text = cooked.graph_text()
    assert "call_module[target=head_gate]" in text and "# HeadGate " in text and "# UnitGate " in text


def test_prune_slice_sparsify_quantize_moefy_compose():
    passes = [
        Prune(target=0.4, calibration=CALIB),
        Slice(),
        Sparsify(pattern="unstructured", method="magnitude", sparsity=0.3),
        Quantize(weights="int8/channel", acts="int8/token"),
        Moefy(experts=2, top_k=2, router="oracle", require_relu=False, calibration=CALIB),
    ]
    cooked = fxcook.compile(tiny_model("bert"), passes, example_inputs=CALIB[0])
    assert [r.name for r in cooked.history] == ["prune", "slice", "sparsify", "quantize", "moefy"]
    ref = fxcook.compile(tiny_model("bert"), passes[:2], example_inputs=CALIB[0])
    with torch.no_grad():
        got, want = main_output(cooked(**CALIB[1])), main_output(ref(**CALIB[1]))
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.95
