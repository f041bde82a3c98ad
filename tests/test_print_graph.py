"""Every compression is visible in the printed graph: each changed node carries what was done to it."""

from __future__ import annotations

import pytest

import fxcook
from fxcook.cli import main
from fxcook.nn import CookedLinear
from fxcook.passes import Moefy, Quantize, Relufy, Sparsify, Tap
from fxcook.taps import TapPoint
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import call_sites

QUANT_24 = "QuantLinear int8/channel x int8/token, 2:4 mask (wanda), density 0.50"


def notes_of(cooked, cls) -> dict[str, list[str | None]]:
    """Module path -> the notes of its call nodes, for every module of type `cls` a graph calls."""
    notes = cooked.graph_notes()
    return {
        path: [notes.get(f"{c.owner}/{c.node.name}") for c in calls]
        for path, calls in call_sites(cooked).items()
        if isinstance(cooked.get_submodule(path), cls)
    }


def compile_bert(passes):
    x = tiny_inputs("bert")
    return fxcook.compile(tiny_model("bert"), passes(x), x)


@pytest.fixture(scope="module")
def sparse_quant():
    return compile_bert(lambda x: [Sparsify(method="wanda", calibration=[x]), Quantize()])


def test_plain_capture_has_no_annotation():
    x = tiny_inputs("bert")
    cooked = fxcook.capture(tiny_model("bert"), x)
    assert cooked.graph_notes() == {}
    assert "  # " not in cooked.graph_text()


def test_every_quantized_linear_node_is_annotated(sparse_quant):
    linears = notes_of(sparse_quant, CookedLinear)
    quantized = {p for p in linears if sparse_quant.get_submodule(p).weight_quant is not None}
    assert len(quantized) == 12
    assert {p: linears[p] for p in quantized} == {p: [QUANT_24] for p in quantized}
    assert {p: linears[p] for p in set(linears) - quantized} == {"pooler.dense": [None]}  # left alone by default
    text = sparse_quant.graph_text()
    for path in quantized:
        owner, _, name = path.rpartition(".")
        assert any(
            line.endswith(f"  # {QUANT_24}") and f"call_module[target={name}]" in line
            for line in text.split(f"graph {owner}:")[1].split("\ngraph ")[0].splitlines()
        ), path


def test_print_graph_prints_graph_text(sparse_quant, capsys):
    sparse_quant.print_graph()
    assert capsys.readouterr().out == sparse_quant.graph_text() + "\n"


def test_moefy_annotates_each_ffn():
    cooked = compile_bert(lambda x: [Quantize(), Relufy(), Moefy(experts=4, top_k=2, router="oracle")])
    notes = cooked.graph_notes()
    ffns = cooked.sites.find("ffn")
    assert len(ffns) == 2
    for site in ffns:
        (call,) = call_sites(cooked)[site.info["moe"]]
        assert notes[f"{call.owner}/{call.node.name}"] == (
            "MoE 2/4 experts, oracle router; up int8/channel x int8/token; down int8/channel"  # float hidden states
        )
        for key in ("act", "down"):  # split form: the calls left behind compute nothing
            (left,) = call_sites(cooked)[site.info[key]]
            assert notes[f"{left.owner}/{left.node.name}"] == "Identity (computed elsewhere since a pass)"


def test_relufy_names_the_replaced_activation():
    cooked = compile_bert(lambda x: [Relufy()])
    acts = {site.info["act"] for site in cooked.sites.find("ffn")}
    notes = cooked.graph_notes()
    got = {path: notes.get(f"{c.owner}/{c.node.name}") for path in acts for c in call_sites(cooked)[path]}
    assert got == dict.fromkeys(acts, "ReLU (gelu -> relu)")


def test_tap_nodes_are_annotated():
    cooked = compile_bert(lambda x: [Tap("[post]encoder.layer.*", "[pre]pooler")])
    taps = notes_of(cooked, TapPoint)
    assert len(taps) == 3
    for path, notes in taps.items():
        assert notes == [f"tap {cooked.get_submodule(path).tap}"]
    assert {n for ns in taps.values() for n in ns} == {
        "tap [post]encoder.layer.0",
        "tap [post]encoder.layer.1",
        "tap [pre]pooler",
    }


def test_inspect_graph_of_a_saved_model(sparse_quant, tmp_path, capsys):
    fxcook.save(sparse_quant, tmp_path / "m")
    assert main(["inspect", str(tmp_path / "m"), "--graph"]) == 0
    out = capsys.readouterr().out
    assert out == sparse_quant.graph_text() + "\n"
    assert out.count(f"  # {QUANT_24}") == 12
