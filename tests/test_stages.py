"""Staged recipes: stages equal the recipes run by hand, resume is exact across and within stages,
the artifact records every stage, bad recipes are refused naming the stage and key."""

import json

import pytest
import torch

from fxcook.data import shakespeare_lines, token_batches
from fxcook.errors import FxcookError, RecipeError
from fxcook.recipe import parse_recipe
from fxcook.stages import run_stages

CAL = {"samples": 16, "batch_size": 8, "max_length": 16}
TRAIN = {"steps": 4, "batch_size": 4, "max_length": 16, "save_every": 2, "lr": 1e-3, "group_by_length": True}
FROZEN = ["encoder.*", "embeddings.LayerNorm.*"]  # the word, position and type embeddings do not train
SPARSE = [{"sparsify": {"pattern": "2:4", "method": "wanda"}}]
QUANT = [{"quantize": {"weights": "int8/channel", "acts": "int8/token"}}]


def staged(**second) -> dict:
    return {
        "calibration": CAL,
        "stages": [
            {"name": "sparse", "passes": SPARSE, "train": {**TRAIN, "trainable": FROZEN}},
            {"name": "quant", "passes": QUANT, "train": {**TRAIN, **second}},
        ],
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModel, AutoTokenizer

    from fxcook.testing import save_tiny_pretrained

    torch.set_num_threads(1)
    lines = shakespeare_lines(200, seed=3)
    path = save_tiny_pretrained(tmp_path_factory.mktemp("tiny") / "bert", lines)
    tok = AutoTokenizer.from_pretrained(path)
    return AutoModel.from_pretrained(path).eval(), tok, lines, path


def _cal(tok):
    return lambda c: token_batches(tok, shakespeare_lines(c.samples, c.seed), c.batch_size, c.max_length)


def _run(tiny, recipe, **kw):
    model, tok, lines, _ = tiny
    example = dict(tok(lines[:2], padding=True, return_tensors="pt"))
    return run_stages(
        model, recipe, tok, lines, example_inputs=example, calibration_for=_cal(tok), progress=False, **kw
    )


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not bad, bad[:5]


def test_two_stages_equal_the_two_recipes_by_hand(tiny):
    from fxcook.pipeline import apply, compile
    from fxcook.training.loop import train
    from fxcook.training.losses import DistillLoss

    model, tok, lines, _ = tiny
    recipe = parse_recipe(staged(teacher="previous"))
    run = _run(tiny, recipe)

    first = parse_recipe({"passes": SPARSE, "calibration": CAL})
    second = parse_recipe({"passes": QUANT, "calibration": CAL})
    cal = _cal(tok)(first.calibration)
    settings = {k: v for k, v in TRAIN.items() if k != "steps"}
    hand = compile(model, first.build(calibration=cal), dict(tok(lines[:2], padding=True, return_tensors="pt")))
    loss = {"hidden_mse": 1.0, "hidden_cos": 1.0}
    train(hand, model, lines, DistillLoss(**loss), tokenizer=tok, steps=4, progress=False, trainable=FROZEN, **settings)
    previous = __import__("copy").deepcopy(hand).eval()
    apply(hand, second.build(calibration=cal))
    train(hand, previous, lines, DistillLoss(**loss), tokenizer=tok, steps=4, progress=False, **settings)

    _same_state(run.model, hand)
    assert torch.equal(run.model.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)
    trained = run.model.get_submodule("encoder.layer.0.output.dense").weight
    assert not torch.equal(trained, model.encoder.layer[0].output.dense.weight)
    assert [e["pass"] for e in run.model.pass_entries] == ["sparsify", "quantize"]
    assert [s.steps for s in run.stages] == [4, 4]


class Killed(Exception):
    pass


def _kill_at(stage, step):
    def callback(i, s, model):
        if (i, s) == (stage, step):
            raise Killed(f"stage {i} step {s}")

    return callback


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    return _run(tiny, parse_recipe(staged()), out=out), out


@pytest.mark.parametrize("where", [(1, 0), (1, 3), (0, 3)], ids=["at-boundary", "mid-second", "mid-first"])
def test_killed_staged_run_resumes_exactly(tiny, reference, tmp_path, where):
    recipe = parse_recipe(staged())
    ref, ref_out = reference
    with pytest.raises(Killed):
        _run(tiny, recipe, out=tmp_path / "run", callback=_kill_at(*where), eval_every=1)
    resumed = _run(tiny, recipe, out=tmp_path / "run")
    _same_state(resumed.model, ref.model)
    assert [s.restored for s in resumed.stages] == [where[0] > 0, False]
    assert resumed.model.pass_entries == ref.model.pass_entries
    log = [json.loads(r) for r in (tmp_path / "run" / "stages" / "01-quant" / "log.jsonl").read_text().splitlines()]
    ref_log = [json.loads(r) for r in (ref_out / "stages" / "01-quant" / "log.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in log if "loss" in r}
    assert losses == {r["step"]: r["loss"] for r in ref_log if "loss" in r}


def test_artifact_records_every_stage_and_load_rebuilds_it(tiny, reference, tmp_path):
    import fxcook
    from fxcook.stages import stages_extra

    model, tok, lines, _ = tiny
    run, _ = reference
    out = fxcook.save(run.model, tmp_path / "model", extras=stages_extra(run))
    back = fxcook.load(out)
    batch = dict(tok(lines[:4], padding=True, return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(back(**batch)[0], run.model(**batch)[0], rtol=0, atol=1e-6)
    record = json.loads((out / "stages.json").read_text())
    assert [(s["name"], s["passes"], s["entries"]) for s in record] == [
        ("sparse", ["sparsify"], [0]),
        ("quant", ["quantize"], [1]),
    ]
    passes = json.loads((out / "fxcook.json").read_text())["passes"]
    assert [p["pass"] for p in passes] == ["sparsify", "quantize"]


def test_resuming_with_a_changed_recipe_names_stage_and_key(tiny, tmp_path):
    _run(tiny, parse_recipe(staged()), out=tmp_path / "run")
    with pytest.raises(RecipeError, match=r"stages\[1\] \('quant'\) key 'train.lr' changed .*0.001 then, 0.002 now"):
        _run(tiny, parse_recipe(staged(lr=2e-3)), out=tmp_path / "run")
    more = staged()
    more["stages"].append({"name": "more", "train": TRAIN})
    with pytest.raises(RecipeError, match=r"stages\[2\] is new since the run"):
        _run(tiny, parse_recipe(more), out=tmp_path / "run")


def test_a_pass_that_conflicts_with_an_earlier_stage_fails_before_training(tiny):
    moe = {"moefy": {"experts": 4, "top_k": 2, "router": "oracle"}}
    recipe = parse_recipe(
        {
            "calibration": CAL,
            "stages": [
                {"name": "moe", "passes": [{"relufy": {}}, moe], "train": TRAIN},
                {"name": "again", "passes": [moe]},
            ],
        }
    )
    calls = []
    with pytest.raises(RecipeError, match=r"stages\[1\] \('again'\): .*already routed \(Moefy ran before\)"):
        _run(tiny, recipe, callback=lambda *a: calls.append(a), eval_every=1)
    assert calls == []  # refused before any stage trained


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{"name": "a", "passes": SPARSE}, {"name": "idle"}], r"stages\[1\] \('idle'\) has no passes and no train"),
        ([{"passes": SPARSE, "train": {"stepz": 3}}], r"recipe.stages\[0\].train.stepz: Extra inputs"),
        ([{"passes": SPARSE, "train": {"loss": {"kll": 1}}}], r"recipe.stages\[0\].train.loss.kll: Extra inputs"),
        ([{"passes": SPARSE, "train": {"teacher": "fp32"}}], r"recipe.stages\[0\].train.teacher: Input should be"),
        ([{"passes": [{"moefy": {"experts": 0}}]}], r"stages\[0\].passes\[0\].moefy.experts"),
        ([{"passes": QUANT}, {"name": "late", "passes": SPARSE}], r"'quantize' must run after 'sparsify', which comes"),
    ],
    ids=["idle-stage", "train-key", "loss-key", "teacher", "pass-option", "order"],
)
def test_bad_staged_recipes_name_the_stage_and_key(stages, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"stages": stages})


def test_stages_and_top_level_passes_do_not_mix():
    with pytest.raises(RecipeError, match="either stages: or top-level passes"):
        parse_recipe({"passes": SPARSE, "stages": [{"passes": QUANT}]})


def test_a_single_stage_run_in_out_is_not_mixed_with_a_staged_one(tiny, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FxcookError, match="holds a single-stage training run"):
        _run(tiny, parse_recipe(staged()), out=tmp_path)
