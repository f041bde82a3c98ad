"""`fxcook adapt` end to end on a tiny BERT: importance-ranked ranks, pruned heads, merged, saved, ONNX
computing the accuracy that was reported."""

import json

import pytest

from fxcook.cli import main
from fxcook.data import shakespeare_lines
from fxcook.testing import save_tiny_pretrained


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapt")
    model = save_tiny_pretrained(tmp / "tiny", shakespeare_lines(3000), max_position_embeddings=128)
    out = tmp / "out"
    argv = ["adapt", "--model", str(model), "--task", "play", "--out", str(out), "--steps", "4", "--probe-steps", "2"]
    argv += ["--per-class", "16", "--test-per-class", "4", "--importance-batches", "2", "--batch-size", "8"]
    argv += ["--top-blocks", "1", "--high", "4", "--low", "2", "--target", "0.05", "--onnx"]
    assert main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_ranks_follow_the_task_importance(run):
    _, r = run
    scores = {b: sum(v) for b, v in r["importance"].items()}
    top = max(scores, key=scores.get)
    assert r["ranks"] and all(rank == (4 if path.startswith(top + ".") else 2) for path, rank in r["ranks"].items())
    assert {p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1] for p in r["ranks"]} >= {"self.query", "output.dense"}


def test_heads_pruned_adapters_merged_and_only_adapters_trained(run):
    out, r = run
    assert r["heads_pruned"] >= 1
    assert r["trainable_params"] < 0.2 * r["total_params"]
    assert r["inference_params"] < r["total_params"]  # adapters merged away, heads sliced off
    assert (out / "model" / "manifest.json").is_file() and (out / "model" / "tokenizer").is_dir()


def test_the_onnx_model_scores_the_reported_accuracy(run):
    from fxcook.models import load_model
    from fxcook.runtime.onnx.session import OrtModel
    from fxcook.training.taskdata import shakespeare_task

    out, r = run
    _, tokenizer = load_model(str(out.parent / "tiny"))
    data = shakespeare_task("play", tokenizer, 16, 4, 2, 64, 0)
    ort = OrtModel(out / "model.onnx")
    right = sum(int((ort(**b).argmax(-1) == b["labels"]).sum()) for b in data.test.batches(64))
    assert right / len(data.test) == pytest.approx(r["accuracy"])
