"""Training never loses or mixes runs: one run per out directory, fingerprinted checkpoints, Ctrl-C saves."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import fxcook
from fxcook import passes as P
from fxcook.cli import main
from fxcook.data import shakespeare_lines
from fxcook.errors import FxcookError
from fxcook.manifest import sha256_file
from fxcook.testing import save_tiny_pretrained, tiny_inputs, tiny_model
from fxcook.training.checkpoints import CheckpointError, latest_checkpoint, save_checkpoint
from fxcook.training.loop import train
from fxcook.training.losses import DistillLoss

DATA = {
    "input_ids": torch.randint(1, 128, (16, 8), generator=torch.Generator().manual_seed(0)),
    "attention_mask": torch.ones(16, 8, dtype=torch.long),
}


def _student(passes=()):
    return fxcook.compile(tiny_model("llama"), list(passes), tiny_inputs("llama"))


def _train(out, steps, **kw):
    return train(
        _student(kw.pop("passes", ())),
        None,
        DATA,
        DistillLoss(lm=1.0),
        steps=steps,
        batch_size=4,
        lr=1e-2,
        out=out,
        save_every=2,
        keep=2,
        progress=False,
        **kw,
    )


def _files(folder):
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_no_resume_into_an_earlier_run_is_refused_then_overwrite_moves_it_aside(tmp_path):
    out = tmp_path / "run"
    _train(out, 6)
    before = _files(out)
    with pytest.raises(FxcookError, match=f"{out} holds an earlier run .*overwrite=True"):
        _train(out, 2, resume=False)
    assert _files(out) == before  # nothing mixed in, nothing deleted
    res = _train(out, 2, resume=False, overwrite=True)
    assert res.resumed_from is None and res.step == 2
    (aside,) = [p for p in out.iterdir() if p.name.startswith("old-run-")]
    assert _files(aside) == before  # the earlier run, complete
    assert latest_checkpoint(out).name == "step_0000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000002"]


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (4, 6):  # later steps already on disk: they must not push out the new one
        (root / f"step_{step:07d}").mkdir(parents=True)
    model = nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 2, model, opt, rank=0, keep=2)
    assert latest_checkpoint(tmp_path).name == "step_0000002"
    save_checkpoint(tmp_path, 3, model, opt, rank=0, keep=2)
    save_checkpoint(tmp_path, 5, model, opt, rank=0, keep=2)
    names = sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))
    assert names == ["step_0000004", "step_0000005", "step_0000006"]  # the newest 2 up to step 5, and step 6


def test_resume_with_another_recipe_is_an_error(tmp_path):
    out = tmp_path / "run"
    _train(out, 2, passes=[P.Sparsify(method="magnitude")])
    with pytest.raises(CheckpointError, match="step_0000002 was made for another recipe or model shape"):
        _train(out, 4)  # the same model without its masks


@pytest.mark.parametrize("manifest", ["[]", "{}"])
def test_empty_manifest_is_an_error_naming_it(tmp_path, manifest):
    out = tmp_path / "run"
    _train(out, 2)
    (latest_checkpoint(out) / "manifest.json").write_text(manifest)
    with pytest.raises(CheckpointError, match="manifest.json lists no files"):
        _train(out, 4)


def test_unlisted_shard_is_an_error_naming_it(tmp_path):
    out = tmp_path / "run"
    _train(out, 2)
    ckpt = latest_checkpoint(out)
    shard = next(ckpt.glob("*.distcp"))
    (ckpt / "__1_0.distcp").write_bytes(shard.read_bytes())
    with pytest.raises(CheckpointError, match="not listed in its manifest: __1_0.distcp"):
        _train(out, 4)


# ---- the command line -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    lines = shakespeare_lines(n=80, seed=3)
    data = tmp / "lines.txt"
    data.write_text("\n".join(lines))
    return save_tiny_pretrained(tmp / "m", lines), data


def _cli_args(cli_setup, out):
    model, data = cli_setup
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--max-length",
        "32",
        "--eval-lines",
        "8",
        "--lr",
        "1e-2",
    ]


def test_cli_train_writes_the_trained_model_and_its_onnx(tmp_path, cli_setup):
    from fxcook.checkpoint import load_quantized
    from fxcook.models import load_model
    from fxcook.runtime.onnx import OrtModel

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "passes:\n  - sparsify: {pattern: '2:4', method: magnitude}\n"
        "calibration: {data: shakespeare, samples: 8, batch_size: 4, max_length: 32}\n"
    )
    out = tmp_path / "o"
    assert main([*_cli_args(cli_setup, out), "--recipe", str(recipe), "--steps", "3", "--onnx"]) == 0
    assert {"model.safetensors", "report.txt", "r.yaml"} <= {p.name for p in (out / "model").iterdir()}
    teacher, tok = load_model(str(cli_setup[0]))
    batch = dict(tok(["Now is the winter of our discontent", "a horse"], padding=True, return_tensors="pt"))
    fresh = fxcook.compile(teacher, [P.Sparsify(pattern="2:4", method="magnitude")], batch)
    with torch.no_grad():
        untrained = fresh(**batch).last_hidden_state
        load_quantized(fresh, out / "model" / "model.safetensors")
        trained = fresh(**batch).last_hidden_state
    assert (trained - untrained).abs().max() > 1e-3  # the saved model is the trained one
    assert (OrtModel(out / "model.onnx")(**batch) - trained).abs().max() < 1e-4


def _logged(log) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_ctrl_c_saves_the_last_finished_step_and_exits_130(tmp_path, cli_setup):
    out = tmp_path / "o"
    args = [*_cli_args(cli_setup, out), "--steps", "100000", "--save-every", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fxcook", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    log = out / "log.jsonl"
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline and _logged(log) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err = proc.stderr.read()
    last = json.loads(log.read_text().splitlines()[-1])["step"]
    assert f"interrupted after step {last}" in err and "Traceback" not in err
    assert latest_checkpoint(out).name == f"step_{last:07d}"
    assert main([*_cli_args(cli_setup, out), "--steps", str(last + 1)]) == 0
    assert json.loads((out / "results.json").read_text())["resumed_from"] == last


def _two_rank_worker(rank, port, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        HF_HUB_OFFLINE="1",
    )
    torch.set_num_threads(1)
    assert main(args) == 0


def test_two_rank_cli_train_saves_the_whole_model(tmp_path, cli_setup):
    """Under FSDP2 the sharded student is gathered whole: the saved model is the last checkpoint's."""
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    mp.spawn(_two_rank_worker, args=(port, [*_cli_args(cli_setup, out), "--steps", "2", "--eval-lines", "0"]), nprocs=2)
    assert json.loads((out / "results.json").read_text())["world"] == 2
    dcp_to_torch_save(latest_checkpoint(out), tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt")["model"]
    saved = load_file(out / "model" / "model.safetensors")
    assert {f"student.{k}" for k in saved} == {k for k in checkpoint if k.startswith("student.")}
    for k, v in saved.items():
        assert torch.equal(v, checkpoint[f"student.{k}"]), k
