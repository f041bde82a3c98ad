"""`fxcook train` with a staged recipe: runs every stage, saves them in the artifact, resumes, refuses
a changed recipe or a saved model as the start."""

import json

import pytest
import torch

RECIPE = """
calibration: {data: shakespeare, samples: 8, batch_size: 4, max_length: 32}
stages:
  - name: sparse
    passes: [{sparsify: {pattern: "2:4", method: magnitude}}]
    train: {steps: 2, lr: 0.001}
  - name: quant
    passes: [{quantize: {weights: int8/channel, acts: int8/token}}]
    train: {steps: 2, lr: LR, teacher: previous}
"""


@pytest.fixture
def cli(tmp_path):
    from fxcook.data import shakespeare_lines
    from fxcook.testing import save_tiny_pretrained

    torch.set_num_threads(1)
    lines = shakespeare_lines(n=80, seed=3)
    model = save_tiny_pretrained(tmp_path / "m", lines)
    (tmp_path / "lines.txt").write_text("\n".join(lines))

    def args(lr="0.001", model=model):
        recipe = tmp_path / f"staged_{lr}.yaml"
        recipe.write_text(RECIPE.replace("LR", lr))
        return [
            *("train", "--model", str(model), "--recipe", str(recipe), "--data", str(tmp_path / "lines.txt")),
            *("--out", str(tmp_path / "o"), "--batch-size", "4", "--max-length", "32", "--eval-lines", "8"),
        ]

    return tmp_path, args


def test_cli_trains_every_stage_and_resumes(cli, capsys):
    from fxcook.cli import main

    tmp, args = cli
    assert main(args()) == 0
    res = json.loads((tmp / "o" / "results.json").read_text())
    assert [(s["name"], s["steps"]) for s in res["stages"]] == [("sparse", 2), ("quant", 2)]
    assert all(0 < s["mean_cos"] <= 1 + 1e-6 for s in res["stages"])
    record = json.loads((tmp / "o" / "model" / "stages.json").read_text())
    assert [s["entries"] for s in record] == [[0], [1]]
    assert "stages[1] ('quant'): min cos" in capsys.readouterr().out

    assert main(args()) == 0  # the same command finds both stages finished and rebuilds them
    assert json.loads((tmp / "o" / "results.json").read_text())["stages"] == res["stages"]

    assert main(args(lr="0.002")) != 0
    assert "stages[1] ('quant') key 'train.lr' changed since the run in" in capsys.readouterr().err


def test_cli_refuses_a_saved_model_as_the_start_of_a_staged_recipe(cli, capsys):
    from fxcook.cli import main

    tmp, args = cli
    assert main(args()) == 0
    again = args(model=tmp / "o" / "model")
    again[again.index("--out") + 1] = str(tmp / "o2")
    assert main(again) != 0
    assert "is a saved fxcook model; a staged recipe" in capsys.readouterr().err


def test_demo_runs_the_shipped_staged_recipe():
    from fxcook import demo
    from fxcook.recipe import load_recipe

    recipe = load_recipe(demo.RECIPES / demo.STAGED.recipe)
    assert recipe.staged and [s.name for s in recipe.stages] == ["relu", "sparse", "int8", "moe"]
    assert [next(iter(p)) for p in recipe.all_passes] == ["relufy", "sparsify", "quantize", "moefy"]
