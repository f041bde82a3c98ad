"""Trainer: resume after a real kill gives identical losses; corrupt checkpoints; data; CLI."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxcook.errors import FxcookError
from fxcook.training.textdata import StepSampler, TensorDataset, TextDataset

SCRIPT = textwrap.dedent("""
    import sys, torch
    from fxcook.training.losses import DistillLoss
    from fxcook.testing import tiny_inputs, tiny_model
    from fxcook.pipeline import compile
    from fxcook.training.loop import train
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = {"input_ids": torch.randint(1, 128, (40, 10), generator=g),
            "attention_mask": torch.ones(40, 10, dtype=torch.long)}
    student = compile(tiny_model("llama", seed=0), [], tiny_inputs("llama"))
    train(student, tiny_model("llama", seed=1), data, DistillLoss(kl=1.0, hidden_mse=1.0),
          steps=int(sys.argv[2]), batch_size=4, lr=1e-2, out=sys.argv[1], save_every=2, keep=3, progress=False)
""")


def _run(script: Path, out: Path, steps: int, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), str(out), str(steps)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **kw,
    )


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}  # the last record of a step wins


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    script = tmp / "run.py"
    script.write_text(SCRIPT)
    steps = 20  # the kill lands right after the first checkpoint (step 2), far from the end
    ref = _run(script, tmp / "ref", steps)
    victim = _run(script, tmp / "victim", steps)
    latest = tmp / "victim" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # a real kill, mid-run
    victim.wait()
    killed_at = int(latest.read_text().split("_")[1])
    resumed = _run(script, tmp / "victim", steps)
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-2000:]
    assert ref.wait() == 0, ref.stderr.read().decode()[-2000:]
    return tmp, killed_at, steps


def test_resume_after_kill_gives_identical_losses(killed_and_resumed):
    tmp, killed_at, steps = killed_and_resumed
    assert killed_at < steps
    ref, got = _losses(tmp / "ref"), _losses(tmp / "victim")
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert got[step] == pytest.approx(ref[step], rel=1e-6), step


def test_corrupt_checkpoint_is_a_clear_error_and_others_stay_intact(killed_and_resumed):
    from fxcook.manifest import sha256_file as _sha256
    from fxcook.training.checkpoints import CheckpointError, latest_checkpoint, verify_checkpoint

    tmp, _, _ = killed_and_resumed
    out = tmp / "victim"
    ckpts = sorted(p for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert len(ckpts) == 3 and not any(p.name.startswith(".tmp") for p in (out / "checkpoints").iterdir())
    before = {f: _sha256(f) for c in ckpts[:-1] for f in c.iterdir()}
    target = next(f for f in latest_checkpoint(out).iterdir() if f.suffix == ".distcp")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=target.name):
        verify_checkpoint(latest_checkpoint(out))
    script = tmp / "run.py"
    proc = _run(script, out, 40)
    assert proc.wait() != 0
    assert f"{target.name} is corrupt" in proc.stderr.read().decode()
    assert {f: _sha256(f) for c in ckpts[:-1] for f in c.iterdir()} == before
    (latest_checkpoint(out) / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(latest_checkpoint(out))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 50), st.sampled_from([1, 2, 4]), st.sampled_from([1, 2]), st.integers(0, 20), st.integers(0, 99))
def test_sampler_splits_each_global_batch_exactly(size, accum, world, step, seed):
    global_batch = accum * world * 2
    s = StepSampler(size, global_batch, seed)
    parts = [s.split(step, accum, world, r) for r in range(world)]
    flat = sorted(i for rank in parts for micro in rank for i in micro)
    assert flat == sorted(s.indices(step))
    assert all(0 <= i < size for i in flat)
    assert s.indices(step) == StepSampler(size, global_batch, seed).indices(step)  # pure in (seed, step)


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=300),
    global_batch=st.sampled_from([1, 2, 4, 8]),
    seed=st.integers(0, 99),
)
def test_length_grouped_batches_cover_each_epoch_and_hold_like_lengths(lengths, global_batch, seed):
    """Grouping reorders an epoch, never drops or repeats a line; within each group of GROUP batches the
    batches are runs of the group sorted by length (no two overlap in length); pure in (seed, step)."""
    size, lens = len(lengths), torch.tensor(lengths)
    s = StepSampler(size, global_batch, seed, lens)
    epoch = s._epoch(3)
    assert sorted(epoch.tolist()) == list(range(size))
    span = global_batch * StepSampler.GROUP
    for group in epoch.split(span):
        runs = sorted((int(lens[b].min()), int(lens[b].max())) for b in group.split(global_batch))
        assert all(hi <= lo for (_, hi), (lo, _) in zip(runs, runs[1:]))
    steps = range(0, 2 * size // global_batch + 2)
    again = StepSampler(size, global_batch, seed, lens)
    assert [s.indices(i) for i in steps] == [again.indices(i) for i in reversed(steps)][::-1]


def test_dataset_lengths_count_the_tokens_batches_hold(minilm):
    _, tok = minilm
    lines = ["To be, or not to be", "a", "Now is the winter of our discontent made glorious summer " * 4]
    data = TextDataset(lines, tok, max_length=16)
    assert data.lengths().tolist() == data.batch([0, 1, 2])["attention_mask"].sum(-1).tolist()
    tensors = TensorDataset(
        {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])}
    )
    assert tensors.lengths().tolist() == [5, 2]
    with pytest.raises(FxcookError, match="one length per example"):
        StepSampler(3, 2, 0, torch.tensor([1, 2]))


def test_bad_data_gives_clear_errors(minilm):
    _, tok = minilm
    with pytest.raises(FxcookError, match="empty"):
        TextDataset(["", "   "], tok)
    with pytest.raises(FxcookError, match="empty"):
        TensorDataset({"input_ids": torch.zeros(0, 4, dtype=torch.long)})
    with pytest.raises(FxcookError, match="tokenizer"):
        TextDataset(["a line"], None)
    with pytest.raises(FxcookError, match="not divisible"):
        StepSampler(10, 6, 0).split(0, 4, 1, 0)


def test_cli_train_distills_a_compressed_model(tmp_path, minilm):
    from fxcook.cli import main
    from fxcook.data import shakespeare_lines
    from fxcook.testing import tiny_model

    _, tok = minilm  # a tiny random BERT saved as a local HF directory with MiniLM's tokenizer
    tiny_model("bert", vocab_size=tok.vocab_size, max_position_embeddings=64).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = tmp_path / "lines.txt"
    data.write_text("\n".join(shakespeare_lines(n=80, seed=3)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "passes:\n  - sparsify: {pattern: '2:4', method: magnitude}\n"
        "calibration: {data: shakespeare, samples: 8, batch_size: 4, max_length: 32}\n"
        "train:\n  loss: {hidden_mse: 1.0, hidden_cos: 1.0}\n  lr: 0.001\n"
    )
    args = [
        "train",
        "--model",
        str(tmp_path / "m"),
        "--recipe",
        str(recipe),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o"),
        "--batch-size",
        "4",
        "--max-length",
        "32",
        "--eval-lines",
        "8",
    ]
    assert main([*args, "--steps", "2"]) == 0
    assert (tmp_path / "o" / "checkpoints" / "latest").read_text() == "step_0000002"
    assert main([*args, "--steps", "4"]) == 0  # the same command resumes
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["steps"] == 4 and res["resumed_from"] == 2
    assert res["before"]["mean_cos"] < 1.0 and 0 < res["after"]["mean_cos"] <= 1.0 + 1e-6
    rows = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("hidden_mse" in r for r in rows)


def test_cli_train_with_no_held_out_lines_trains_on_all_lines(tmp_path, minilm):
    from fxcook.cli import main
    from fxcook.data import shakespeare_lines
    from fxcook.testing import tiny_model

    _, tok = minilm
    tiny_model("bert", vocab_size=tok.vocab_size, max_position_embeddings=64).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = tmp_path / "lines.txt"
    data.write_text("\n".join(shakespeare_lines(n=8, seed=3)))
    assert (
        main(
            [
                "train",
                "--model",
                str(tmp_path / "m"),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "o"),
                "--batch-size",
                "4",
                "--max-length",
                "32",
                "--eval-lines",
                "0",
                "--steps",
                "1",
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["steps"] == 1 and res["before"] is None and res["final_loss"] is not None


def test_fxcook_train_is_callable_and_lm_mode_learns():
    import fxcook
    from fxcook.testing import tiny_inputs, tiny_model
    from fxcook.training.losses import DistillLoss

    model = tiny_model("llama")
    cooked = fxcook.compile(model, [], tiny_inputs("llama"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.arange(8).repeat(16, 2) + 1  # a repeating pattern an LM can learn
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    res = fxcook.train(cooked, None, data, DistillLoss(lm=1.0), steps=8, batch_size=4, lr=3e-2, progress=False)
    assert res.losses[-1] < res.losses[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model is untouched
