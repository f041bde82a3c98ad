"""DropLayers: placements, exactness against hand-built HF models, graph structure, artifacts, ONNX, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from graphs import DROP, assert_same_graph, rebuilt
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcook
from fxcook.errors import FxcookError
from fxcook.passes import DropLayers
from fxcook.passes.droplayers.influence import block_influence
from fxcook.passes.droplayers.placement import PLACEMENTS, candidates, choose
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import main_output

DEPTH = {"bert": "num_hidden_layers", "gpt2": "n_layer", "t5": "num_layers", "llama": "num_hidden_layers"}


def _model(family: str, n: int, seed: int = 0):
    extra = {"num_decoder_layers": n} if family == "t5" else {}
    return tiny_model(family, seed=seed, **{DEPTH[family]: n}, **extra)


def _stacks(model, family: str) -> list[torch.nn.ModuleList]:
    if family == "bert":
        return [model.encoder.layer]
    if family == "gpt2":
        return [model.transformer.h]
    if family == "t5":
        return [model.encoder.block, model.decoder.block]
    return [model.model.layers]


def _hand_dropped(model, family: str, drop: list[int]):
    """The HF model with those layers deleted from its ModuleLists and its config's depth edited."""
    ref = copy.deepcopy(model)
    for stack in _stacks(ref, family):
        for i in sorted(drop, reverse=True):
            del stack[i]
    kept = getattr(model.config, DEPTH[family]) - len(drop)
    setattr(ref.config, DEPTH[family], kept)
    if family == "t5":
        ref.config.num_decoder_layers = kept
    return ref


def _run(model, x, family: str):
    with torch.no_grad():
        return main_output(model(**x, **({} if family == "bert" else {"use_cache": False})))


# ---- placements ---------------------------------------------------------------------------------
TABLE = {  # docs/layer_dropping.md lists these
    (12, 6): {
        "max-gap": [1, 3, 5, 6, 8, 10],
        "input": [1, 2, 3, 4, 5, 6],
        "output": [5, 6, 7, 8, 9, 10],
        "middle": [3, 4, 5, 6, 7, 8],
        "both": [1, 2, 3, 8, 9, 10],
    },
    (6, 3): {"max-gap": [1, 2, 4], "input": [1, 2, 3], "output": [2, 3, 4], "middle": [2, 3, 4], "both": [1, 2, 4]},
}


@pytest.mark.parametrize("n,drop", list(TABLE))
def test_placement_table(n, drop):
    for placement, want in TABLE[n, drop].items():
        assert choose(n, drop, placement, True) == want, placement


@given(st.integers(3, 40), st.data(), st.booleans())
def test_placement_rules(n, data, keep_first_last):
    cand = candidates(n, keep_first_last)
    drop = data.draw(st.integers(0, len(cand) - (0 if keep_first_last else 1)))
    influence = data.draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    for placement in PLACEMENTS:
        got = choose(n, drop, placement, keep_first_last, influence)
        assert len(got) == len(set(got)) == drop and set(got) <= set(cand), placement
        if placement == "input":
            assert got == cand[:drop]
        if placement == "output":
            assert got == cand[len(cand) - drop :]
        if placement in ("middle",) and drop:
            assert got == list(range(got[0], got[0] + drop))
            assert abs((got[0] - cand[0]) - (cand[-1] - got[-1])) <= 1
        if placement == "both":
            head = [i for i in got if i - cand[0] < (drop + 1) // 2]
            assert head == cand[: (drop + 1) // 2] and got[len(head) :] == cand[len(cand) - drop + len(head) :]
        if placement == "max-gap" and n - drop > 1:
            kept = [i for i in range(n) if i not in got]
            gaps = [b - a for a, b in zip(kept, kept[1:])]
            assert kept[0] == 0 and kept[-1] == n - 1 and max(gaps) - min(gaps) <= 1
        if placement == "block-influence":
            rest = [i for i in cand if i not in got]
            assert all(influence[i] <= influence[j] for i in got for j in rest)


# ---- exactness ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_count_zero_is_identity(family):
    model, x = _model(family, 3), tiny_inputs(family)
    cooked = fxcook.capture(model, x)
    before = {p: copy.deepcopy(g) for p, _, g in cooked.graphs()}
    after = fxcook.apply(copy.deepcopy(cooked), [DropLayers(count=0)])
    for path, _, graph in after.graphs():
        assert_same_graph(graph, before[path])
    assert after.state_dict().keys() == cooked.state_dict().keys()
    torch.testing.assert_close(_run(after, x, "bert"), _run(cooked, x, "bert"), rtol=0, atol=0)


@settings(max_examples=5)
@given(st.sampled_from(["bert", "gpt2", "t5", "llama"]), st.integers(3, 5), st.data())
def test_matches_hand_built_hf_model(family, n, data):
    seed = data.draw(st.integers(0, 1000))
    # T5's first block computes the stack's position bias: it stays (test_t5_first_block_is_refused)
    pool = list(range(1, n)) if family == "t5" else list(range(n))
    drop = sorted(data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=min(len(pool), n - 1), unique=True)))
    model, x = _model(family, n, seed), tiny_inputs(family, seed=seed, pad=1)
    cooked = fxcook.apply(fxcook.capture(model, x), [DropLayers(placement=drop, keep_first_last=False)])
    ref = _hand_dropped(model, family, drop)
    torch.testing.assert_close(_run(cooked, x, "bert"), _run(ref, x, family), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in cooked.parameters()) == sum(p.numel() for p in ref.parameters())
    x2 = tiny_inputs(family, batch=3, seq=5, seed=seed + 1)  # dynamic shapes survive the rewrite
    torch.testing.assert_close(_run(cooked, x2, "bert"), _run(ref, x2, family), rtol=1e-5, atol=1e-5)


def test_graph_structure_bert():
    """Before: layer_0 -> layer_1 -> layer_2. Expected: layer_1's call gone, layer_2 reads layer_0."""
    cooked = fxcook.capture(_model("bert", 3), tiny_inputs("bert"))
    before = copy.deepcopy(cooked.get_submodule("encoder").graph)

    def edit(graph, node, env):
        if node.op == "call_module" and node.target == "layer.1":
            env[node] = env[node.args[-1]]  # its users see its hidden-state input
            return DROP
        return None

    after = fxcook.apply(cooked, [DropLayers(placement=[1])])
    assert_same_graph(after.get_submodule("encoder").graph, rebuilt(before, edit))
    assert "encoder.layer.1" not in dict(after.named_modules())
    assert not any(k.startswith("encoder.layer.1.") for k in after.state_dict())
    assert after.sites.blocks == ["encoder.layer.0", "encoder.layer.2"]
    assert not [s for s in after.sites.sites if s.path.startswith("encoder.layer.1.")]
    assert after.hf_edits == [{"config": {"num_hidden_layers": 2}, "rename": {"encoder.layer.2": "encoder.layer.1"}}]


def test_user_model_is_not_mutated():
    model, x = _model("llama", 4), tiny_inputs("llama")
    cooked = fxcook.capture(model, x)
    fxcook.apply(cooked, [DropLayers(count=2)])
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4


# ---- block influence ----------------------------------------------------------------------------
def test_block_influence_is_shortgpt_bi():
    model = _model("bert", 4, seed=3)
    batches = [tiny_inputs("bert", seed=s) for s in range(3)]
    cooked = fxcook.capture(model, batches[0])
    got = block_influence(cooked, cooked.sites.blocks, batches)
    sums = [0.0] * 4
    with torch.no_grad():
        for b in batches:
            hs = model(**b, output_hidden_states=True).hidden_states
            for i in range(4):
                sums[i] += float(torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean())
    want = [1 - s / len(batches) for s in sums]
    assert [got[p] for p in cooked.sites.blocks] == pytest.approx(want, abs=1e-5)
    dropped = fxcook.apply(cooked, [DropLayers(count=1, placement="block-influence", calibration=batches)])
    lowest = min((1, 2), key=lambda i: want[i])
    assert [p for p in cooked.sites.blocks] == [f"encoder.layer.{i}" for i in range(4) if i != lowest]
    assert dropped.pass_entries[-1]["record"] == {"dropped": [f"encoder.layer.{lowest}"]}


# ---- artifacts and ONNX -------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    model = _model("bert", 4, seed=1)
    batches = [tiny_inputs("bert", seed=s) for s in range(2)]
    cooked = fxcook.apply(
        fxcook.capture(model, batches[0]), [DropLayers(count=2, placement="block-influence", calibration=batches)]
    )
    back = fxcook.load(fxcook.save(cooked, tmp_path / "art"))  # restore mode: no calibration data needed
    assert back.sites.blocks == cooked.sites.blocks
    x = tiny_inputs("bert", batch=3, seq=6, seed=9)
    torch.testing.assert_close(_run(back, x, "bert"), _run(cooked, x, "bert"), rtol=0, atol=0)
    assert back.hf_edits == cooked.hf_edits


def test_onnx_export_is_smaller(tmp_path):
    from fxcook.runtime.onnx import export, session

    model, x = _model("bert", 4), tiny_inputs("bert")
    full = fxcook.capture(model, x)
    half = fxcook.apply(copy.deepcopy(full), [DropLayers(count=2)])
    a, b = export(full, tmp_path / "full.onnx", x), export(half, tmp_path / "half.onnx", x)
    assert b.stat().st_size < 0.75 * a.stat().st_size
    sess = session(b)
    got = sess.run(None, {k: v.numpy() for k, v in x.items()})[0]
    torch.testing.assert_close(torch.from_numpy(got), _run(half, x, "bert"), rtol=1e-4, atol=1e-4)


# ---- bad input ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert4():
    return fxcook.capture(_model("bert", 4), tiny_inputs("bert"))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"count": 4, "keep_first_last": False}, "stack encoder.layer has 4 blocks; dropping 4 would leave none"),
        ({"count": 5, "keep_first_last": False}, "dropping 5 would leave none"),
        ({"count": 3}, "cannot drop 3 of the 4 blocks of encoder.layer with keep_first_last=True (at most 2)"),
        ({"keep": 5}, "keep=5 but stack encoder.layer has only 4 blocks"),
        ({"count": 1, "keep": 3}, "give count= (blocks to drop) or keep= (blocks to keep), not both"),
        ({}, "give count= (blocks to drop per stack), keep= (blocks to keep) or placement=[indices]"),
        ({"placement": [1, 4]}, "index 4 is out of range for stack encoder.layer of 4 blocks (0..3)"),
        ({"placement": [1, 1]}, "index 1 is repeated in placement=[1, 1]"),
        ({"placement": [0]}, "index 0 is the first block of encoder.layer and keep_first_last=True"),
        ({"placement": [0, 1, 2, 3], "keep_first_last": False}, "would drop every block of encoder.layer"),
        ({"placement": [1], "count": 1}, "placement=[indices] names the blocks to drop; leave count/keep unset"),
        ({"count": 1, "placement": "block-influence"}, "pass calibration=[batch, ...]"),
        ({"count": 1, "stack": "decoder.block"}, "stack='decoder.block' is not a block stack; stacks are"),
    ],
)
def test_bad_input(bert4, kwargs, message):
    with pytest.raises(FxcookError) as err:
        fxcook.apply(copy.deepcopy(bert4), [DropLayers(**kwargs)])
    assert message in str(err.value)


def test_keep_first_last_needs_three_layers():
    cooked = fxcook.capture(_model("gpt2", 2), tiny_inputs("gpt2"))
    with pytest.raises(FxcookError, match="stack transformer.h has 2 blocks and keep_first_last=True keeps the first"):
        fxcook.apply(cooked, [DropLayers(count=1)])


def test_t5_first_block_is_refused():
    cooked = fxcook.capture(_model("t5", 3), tiny_inputs("t5"))
    with pytest.raises(FxcookError, match="block encoder.block.0 also returns .* position bias"):
        fxcook.apply(cooked, [DropLayers(placement=[0], keep_first_last=False, stack="encoder.block")])


def test_albert_shared_blocks_are_refused():
    cfg = tf.AlbertConfig(
        vocab_size=128, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    cooked = fxcook.capture(tf.AlbertModel(cfg).eval(), tiny_inputs("bert"))
    with pytest.raises(FxcookError, match=r"encoder.albert_layer_groups.0 is called 3 times .*ALBERT-style"):
        fxcook.apply(cooked, [DropLayers(count=1, keep_first_last=False)])
