"""The compression trainer: one loop for QAT, sparsity masks and distillation, on FSDP2.

QAT and masks need nothing special here: they live in the cooked model's CookedLinear hooks, so a
forward of the student *is* the fake-quantized, masked forward and gradients flow through the
straight-through estimator. The loop adds what training needs:

- FSDP2 `fully_shard` on every block site, then on the root (torchrun: gloo on CPU, NCCL on GPU);
  the teacher is replicated, or sharded the same way with `shard_teacher=True`;
- the distillation loss module is sharded too when it owns projections, so they are optimized and
  checkpointed with the student;
- exact global-batch losses: each rank's share is normalized by the global token count, so 2 ranks
  reproduce one process's loss on the same global batch;
- bf16 autocast on GPU, gradient accumulation, warmup + cosine/linear/constant LR, grad clipping;
- scheduled masks (`cooked.mask_schedules`, from `Sparsify(schedule=...)`) advanced after every
  optimizer step, their positions saved with each checkpoint;
- checkpoints with torch.distributed.checkpoint (model, optimizer incl. projections, masks as
  buffers, step, per-rank RNG) written to a temporary directory, listed in a `fxcook.manifest`
  (sha256 of every file, fingerprint of the passes and state shapes) and renamed into place, so a
  kill at any moment leaves every earlier checkpoint intact; a corrupt checkpoint, or one of
  another recipe, is an error naming it. One `out` directory holds one run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import manifest
from .distill import DistillLoss, block_paths
from .errors import FxcookError
from .textdata import StepSampler, as_dataset


class CheckpointError(FxcookError):
    """A checkpoint is missing, incomplete or corrupt."""


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)
    log: list[dict] = field(default_factory=list)
    resumed_from: int | None = None
    param_bytes: int = 0   # this rank's parameter bytes (student + loss projections), shards under FSDP2
    optim_bytes: int = 0   # this rank's optimizer state bytes


# ---- distributed setup ---------------------------------------------------------------------------
def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world, device); joins the torchrun process group when launched by torchrun."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def shard(model: nn.Module, blocks: list[str]) -> nn.Module:
    """FSDP2: fully_shard each block (outermost first-level blocks only), then the root."""
    from torch.distributed.fsdp import fully_shard

    top = [b for b in blocks if not any(b != o and b.startswith(o + ".") for o in blocks)]
    for path in top:
        fully_shard(model.get_submodule(path))
    fully_shard(model)
    return model


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (its shards under FSDP2)."""
    total = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
    return total


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                t = v.to_local() if hasattr(v, "to_local") else v
                total += t.numel() * t.element_size()
    return total


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _sync_from_rank0(modules: list[nn.Module]) -> None:
    """Broadcast rank 0's parameters and buffers, so every rank shards the same model."""
    with torch.no_grad():
        for m in modules:
            for t in [*m.parameters(), *m.buffers()]:
                dist.broadcast(t.data, src=0)


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(steps - warmup, 1)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    if schedule == "linear":
        return max(1.0 - frac, 0.0)
    if schedule == "constant":
        return 1.0
    raise FxcookError(f"unknown LR schedule {schedule!r}; use cosine, linear or constant")


# ---- checkpoints ----------------------------------------------------------------------------------
RUN_ENTRIES = ("checkpoints", "log.jsonl", "results.json", "model", "model.onnx")  # what one run writes in `out`
STEP_DIR = re.compile(r"step_(\d+)")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = out / "checkpoints" / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def earlier_run(out: Path) -> list[Path]:
    """The files of an earlier run in `out` (checkpoints, log, results, trained model)."""
    return [out / name for name in RUN_ENTRIES if (out / name).exists()]


def claim_out(out: Path, resume: bool, overwrite: bool, move: bool = True) -> None:
    """Make `out` this run's: an earlier run is resumed, moved aside (`overwrite`), or an error.

    Checkpoints of two runs are never mixed: keep-N pruning would delete the other run's steps.
    With `move=False` only the check is made (the CLI checks before the long compile)."""
    found = earlier_run(out)
    if not found or (resume and not overwrite):
        return
    if not overwrite:
        names = ", ".join(p.name for p in found)
        raise FxcookError(f"{out} holds an earlier run ({names}); resume it (resume=True, no --no-resume), "
                          f"move it aside with overwrite=True (--overwrite), or choose another out directory")
    if move:
        aside = out / f"old-run-{time.strftime('%Y%m%d-%H%M%S')}"
        while aside.exists():
            aside = aside.with_name(aside.name + "-1")
        aside.mkdir()
        for p in found:
            os.replace(p, aside / p.name)


def _steps(root: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()}


def _prune(root: Path, step: int, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints up to `step`; `step` itself and later ones stay."""
    older = sorted(s for s in _steps(root) if s < step)
    for s in older[:max(len(older) - (keep - 1), 0)] if keep > 0 else []:
        shutil.rmtree(root / f"step_{s:07d}", ignore_errors=True)


def save_checkpoint(out: Path, step: int, state: nn.Module, opt, rank: int, keep: int = 2,
                    fingerprint: str | None = None, schedules: list | None = None) -> Path:
    """Write checkpoint `step` atomically: tmp dir -> manifest (hashes, fingerprint, step, mask
    schedule positions) -> rename -> latest pointer -> prune older checkpoints."""
    root = out / "checkpoints"
    final, tmp = root / f"step_{step:07d}", root / f".tmp_step_{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    msd, osd = get_state_dict(state, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               tmp / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        positions = [{"last_update": s.last_update, "final": s.final} for s in schedules or []]
        manifest.write(tmp, fingerprint=fingerprint, step=step, world=world, schedules=positions)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = root / ".latest.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, root / "latest")
        _prune(root, step, keep)
    _barrier()
    return final


def verify_checkpoint(path: Path, fingerprint: str | None = None) -> dict:
    """Check every file (missing, unlisted, altered) and the fingerprint; returns the manifest."""
    try:
        return manifest.verify(path, fingerprint)
    except manifest.ManifestError as e:
        raise CheckpointError(f"checkpoint {e}; start afresh with overwrite=True (--overwrite) "
                              f"or use another out directory") from e


def load_checkpoint(path: Path, state: nn.Module, opt, rank: int, fingerprint: str | None = None,
                    schedules: list | None = None) -> int:
    """Restore model, optimizer, masks, mask schedules and RNG from `path`; returns its step."""
    meta = verify_checkpoint(path, fingerprint)
    positions = meta.get("schedules", [])
    if len(positions) != len(schedules or []):
        raise CheckpointError(f"checkpoint {path} holds {len(positions)} mask schedules, the model "
                              f"{len(schedules or [])}: it was written for another recipe")
    msd, osd = get_state_dict(state, opt)
    sd = {"model": msd, "optim": osd}
    try:
        dcp.load(sd, checkpoint_id=str(path))
    except Exception as e:  # DCP raises several types for unreadable data
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e
    set_state_dict(state, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    for sched, pos in zip(schedules or [], positions):
        sched.last_update, sched.final = pos["last_update"], pos["final"]
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return int(meta["step"])


# ---- the loop -------------------------------------------------------------------------------------
class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after a finished step (whose checkpoint is saved when `out` is given)."""


class _State(nn.Module):
    """Groups the student and the loss (its projections) so one state dict covers both."""

    def __init__(self, student: nn.Module, loss: nn.Module):
        super().__init__()
        self.student, self.loss = student, loss


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _check_counts(**counts: tuple[int, int]) -> None:
    """Each `name=(value, least)` must be an int of at least `least`: the error names the argument."""
    for name, (value, least) in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise FxcookError(f"train: {name} must be an integer >= {least}, got {value!r}")


def run_fingerprint(state: nn.Module, cooked: nn.Module) -> str:
    """What a checkpoint must match to be resumed: state shapes (student and loss) and the passes run."""
    return manifest.fingerprint(state, {"passes": [r.spec for r in getattr(cooked, "history", [])]})


def _schedules(cooked: nn.Module) -> list:
    """The mask schedules passes left on the model; each advances with `update(model, step)`."""
    return list(getattr(cooked, "mask_schedules", None) or [])


@contextlib.contextmanager
def _deferred_sigint():
    """While training, Ctrl-C sets a flag read after each step, so the checkpoint saved on the way
    out is of a whole step; a second Ctrl-C interrupts at once."""
    flag = {"hit": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        flag["hit"] = True
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _any_rank(flag: bool, device: torch.device) -> bool:
    return _all_sum([float(flag)], device)[0] > 0


def train(cooked: nn.Module, teacher: nn.Module | None = None, data=None, loss: DistillLoss | None = None, *,
          tokenizer=None, steps: int = 100, batch_size: int = 8, grad_accum: int = 1, lr: float = 1e-4,
          weight_decay: float = 0.0, warmup: int = 0, schedule: str = "cosine", max_grad_norm: float | None = 1.0,
          max_length: int = 128, out: str | os.PathLike | None = None, save_every: int = 0, keep: int = 2,
          resume: bool = True, overwrite: bool = False, seed: int = 0, fsdp: bool | None = None,
          shard_teacher: bool = False, progress: bool = True, callback=None, eval_every: int = 0) -> TrainResult:
    """Train `cooked` (QAT/masks included) against `loss`, distilling from `teacher` if given.

    `data`: lines of text (with `tokenizer`), a mapping of token tensors, or a fxcook.textdata dataset.
    `batch_size` is the global batch (all ranks and micro-batches). With `out`, checkpoints go to
    `out/checkpoints` every `save_every` steps and at the end, losses to `out/log.jsonl`; a run with
    `resume=True` continues from the latest checkpoint, which must come from the same passes and model
    shapes. An earlier run in `out` is never mixed with a new one: `resume=False` refuses it unless
    `overwrite=True`, which moves it aside to `out/old-run-<time>` and starts afresh. Scheduled masks
    (`Sparsify(schedule=...)`) advance after every optimizer step. Ctrl-C stops after the current
    step, saves its checkpoint and raises TrainInterrupted. Under torchrun the student is FSDP2-sharded
    per block (`fsdp=None` means: when the world is larger than one). `callback(step, model)` runs on
    every rank every `eval_every` steps (and at step 0); a dict it returns joins that step's log row.
    """
    if data is None:
        raise FxcookError("train needs data=")
    _check_counts(steps=(steps, 1), batch_size=(batch_size, 1), grad_accum=(grad_accum, 1),
                  max_length=(max_length, 2), save_every=(save_every, 0), keep=(keep, 0), eval_every=(eval_every, 0))
    outdir = Path(out) if out is not None else None
    if outdir is not None:
        from .paths import check_out_dir

        check_out_dir(outdir, "train out")
    loss = loss if loss is not None else DistillLoss(lm=1.0) if teacher is None else DistillLoss(hidden_mse=1.0)
    rank, world, device = init_distributed()
    if outdir is not None:
        claim_out(outdir, resume, overwrite, move=False)  # every rank raises alike
        if rank == 0:
            claim_out(outdir, resume, overwrite)
        _barrier()
    fsdp = world > 1 if fsdp is None else fsdp
    torch.manual_seed(seed)  # identical projection init on every rank
    random.seed(seed)
    dataset = as_dataset(data, tokenizer, max_length)
    sampler = StepSampler(len(dataset), batch_size, seed)
    sampler.split(0, grad_accum, world, rank)  # checks divisibility up front

    probe = dataset.batch(sampler.indices(0)[:2])
    if not loss.bound:
        loss.bind(cooked, teacher, probe)
    s_specs, t_specs = loss.student_taps(), loss.teacher_taps()
    from fxcook.passes.tap import collect_taps

    student_mode = cooked.training
    cooked.to(device).train()
    loss.to(device)
    state = _State(cooked, loss)
    fingerprint, schedules = run_fingerprint(state, cooked), _schedules(cooked)
    teacher_mode = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.to(device).eval()  # restored on exit; its parameters are never updated (no_grad)
    if fsdp:
        _sync_from_rank0([cooked, loss])
        shard(cooked, block_paths(cooked))
        if any(True for _ in loss.parameters()):
            from torch.distributed.fsdp import fully_shard

            fully_shard(loss)
        if teacher is not None and shard_teacher:
            shard(teacher, block_paths(teacher))
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    params = [p for p in state.parameters() if p.requires_grad]
    if not params:
        raise FxcookError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    get_state_dict(state, opt)  # creates optimizer state for every parameter (a zero-lr step), so
    # checkpoints hold the same keys whether or not a parameter got a gradient (e.g. an unused pooler)

    start, resumed = 0, None
    if outdir is not None and resume and not overwrite:
        ckpt = latest_checkpoint(outdir)
        if ckpt is not None:
            start = resumed = load_checkpoint(ckpt, state, opt, rank, fingerprint, schedules)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    result = TrainResult(step=start, resumed_from=resumed)
    if outdir is not None and rank == 0:
        outdir.mkdir(parents=True, exist_ok=True)
    log_file = open(outdir / "log.jsonl", "a") if outdir is not None and rank == 0 else None
    saved = start

    def checkpoint(step: int) -> None:
        nonlocal saved
        if outdir is not None and step > saved:
            save_checkpoint(outdir, step, state, opt, rank, keep, fingerprint, schedules)
            saved = step

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="train", unit="step")
    try:
        with _deferred_sigint() as interrupt:
            if callback is not None and eval_every and start == 0:
                row = {"step": 0, **(callback(0, cooked) or {})}
                result.log.append(row)
                if log_file is not None:
                    log_file.write(json.dumps(row) + "\n")
            for step in range(start, steps):
                t0 = time.perf_counter()
                for g in opt.param_groups:
                    g["lr"] = lr * lr_factor(step, steps, warmup, schedule)
                micro = [_to(dataset.batch(ix), device) for ix in sampler.split(step, grad_accum, world, rank)]
                local = {k: sum(loss.counts(b)[k] for b in micro) for k in ("tok", "lm", "ex")}
                glob = dict(zip(local, _all_sum(list(local.values()), device)))
                denom = {k: v / world for k, v in glob.items()}
                step_loss, terms = 0.0, {}
                for batch in micro:
                    with autocast:
                        t_out, t_taps = None, {}
                        if teacher is not None:
                            with torch.no_grad(), collect_taps(teacher, t_specs) as t_taps:
                                t_out = teacher(**batch)
                        with collect_taps(cooked, s_specs) as s_taps:
                            s_out = cooked(**batch)
                        total, parts = state.loss(batch, s_out, s_taps, t_out, t_taps, denom)
                    total.backward()
                    step_loss += float(total.detach())
                    for k, v in parts.items():
                        terms[k] = terms.get(k, 0.0) + v
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                for sched in schedules:
                    sched.update(cooked, step + 1)
                sums = _all_sum([step_loss, *terms.values()], device)
                row = {"step": step + 1, "loss": sums[0] / world,
                       **{k: v / world for k, v in zip(terms, sums[1:])},
                       "lr": opt.param_groups[0]["lr"], "sec": time.perf_counter() - t0}
                if callback is not None and eval_every and (step + 1) % eval_every == 0:
                    row.update(callback(step + 1, cooked) or {})
                result.losses.append(row["loss"])
                result.log.append(row)
                result.step = step + 1
                if log_file is not None:
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4g}")
                if (save_every and (step + 1) % save_every == 0) or step + 1 == steps:
                    checkpoint(step + 1)
                if _any_rank(interrupt["hit"], device):
                    checkpoint(step + 1)
                    where = (f"; its checkpoint is in {outdir / 'checkpoints'} (train again with this out "
                             f"directory to resume)") if outdir is not None else ""
                    raise TrainInterrupted(f"interrupted after step {step + 1}{where}")
        result.param_bytes, result.optim_bytes = local_param_bytes(state), optimizer_state_bytes(opt)
    finally:
        cooked.train(student_mode)
        if teacher is not None:
            teacher.train(teacher_mode)
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    return result


# ---- CLI ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fxcook train` (launch with torchrun --nproc_per_node N for FSDP2)."""
    from .cli import at_least

    parser.add_argument("--model", default="minilm",
                        help="'minilm', a local HF model directory, or a directory fxcook saved (then --teacher)")
    parser.add_argument("--teacher", help="the model to distil from (default: --model; required when --model "
                                          "is a saved fxcook model)")
    parser.add_argument("--recipe", help="recipe YAML/JSON: passes to apply, plus an optional train: section")
    parser.add_argument("--data", default="shakespeare", help="a text file or directory, or 'shakespeare'")
    parser.add_argument("--out", required=True,
                        help="output directory: checkpoints/, log.jsonl, results.json, the trained model in model/")
    parser.add_argument("--steps", type=at_least(1), help="optimizer steps (default: recipe or 100)")
    parser.add_argument("--batch-size", type=at_least(1), help="global batch size (default: recipe or 16)")
    parser.add_argument("--grad-accum", type=at_least(1), help="micro-batches per step (default 1)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    parser.add_argument("--warmup", type=at_least(0), help="linear warmup steps (default 0)")
    parser.add_argument("--schedule", choices=("cosine", "linear", "constant"), help="LR decay after warmup (default cosine)")
    parser.add_argument("--max-length", type=at_least(2), help="tokens per line (default 128)")
    parser.add_argument("--save-every", type=at_least(0), help="checkpoint every N steps (default 50; 0: at the end)")
    parser.add_argument("--seed", type=int, help="seed (default 0)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start afresh instead of resuming the run in --out (refused if one is there, "
                             "unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="move an earlier run in --out aside (to --out/old-run-<time>) and start afresh")
    parser.add_argument("--onnx", action="store_true", help="also export the trained model to --out/model.onnx")
    parser.add_argument("--shard-teacher", action="store_true", help="FSDP2-shard the teacher too")
    parser.add_argument("--lines", type=at_least(1), default=None, help="use only the first N lines of --data")
    parser.add_argument("--eval-lines", type=at_least(0), default=64, help="held-out lines for the fidelity table")


TRAIN_DEFAULTS = {"steps": 100, "batch_size": 16, "grad_accum": 1, "lr": 1e-4, "warmup": 0, "schedule": "cosine",
                  "max_length": 128, "save_every": 50, "seed": 0}


def _train_settings(args, recipe_train: dict) -> tuple[dict, dict]:
    """Merge defaults < recipe `train:` section < CLI flags; returns (train kwargs, loss config)."""
    recipe_train = dict(recipe_train or {})
    loss_cfg = recipe_train.pop("loss", None) or {"hidden_mse": 1.0, "hidden_cos": 1.0}
    unknown = set(recipe_train) - set(TRAIN_DEFAULTS)
    if unknown:
        raise FxcookError(f"recipe train section: unknown keys {sorted(unknown)}; known: {sorted(TRAIN_DEFAULTS)} and loss")
    settings = {**TRAIN_DEFAULTS, **recipe_train}
    for key in TRAIN_DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    return settings, loss_cfg


def main(args: argparse.Namespace) -> int:
    """`fxcook train`: compress --model with --recipe, distill it from the original on --data, then
    save the trained model as a compressed artifact in --out/model (and --out/model.onnx with --onnx)."""
    from .artifact import is_artifact, load, load_tokenizer, tokenizer_extra
    from .checkpoint import save_compressed, write_atomic
    from .data import calibration_for, check_known_tokens, lines_from
    from .models import example_batch, load_model
    from .paths import check_out_dir, model_dir
    from .pipeline import apply
    from .pipeline import compile as fx_compile

    out = check_out_dir(Path(args.out), "--out", source=model_dir(args.model))
    claim_out(out, not args.no_resume, args.overwrite, move=False)  # refuse before the long compile
    recipe, recipe_train = None, {}
    if args.recipe:
        from .recipe import load_recipe

        recipe = load_recipe(args.recipe)
        recipe_train = dict(recipe.train or {})
    settings, loss_cfg = _train_settings(args, recipe_train)
    rank, world, _ = init_distributed()
    saved = is_artifact(args.model)  # a model fxcook saved: train it further, distilling from --teacher
    if saved and not args.teacher:
        raise FxcookError(f"--model {args.model} is a saved fxcook model: give --teacher (the original model, "
                          f"e.g. 'minilm' or its HF directory) to distil it from")
    teacher, tokenizer = load_model(args.teacher or args.model)
    if saved:
        tokenizer = load_tokenizer(args.model)
    lines = lines_from(args.data, seed=settings["seed"])
    held_out = []
    if args.eval_lines > 0:  # lines[:-0] would be empty: split only when lines are held out
        held_out, lines = lines[-args.eval_lines:], lines[:-args.eval_lines]  # calibration uses the first lines
    if args.lines:
        lines = lines[:args.lines]
    passes, example = [], example_batch(tokenizer, (held_out or lines)[:4], settings["max_length"])
    check_known_tokens([example], tokenizer, args.model)
    if recipe is not None:
        calibration = calibration_for(recipe, tokenizer, args.model)
        passes, example = recipe.build(calibration=calibration), calibration[0]
    student = apply(load(args.model), passes) if saved else fx_compile(teacher, passes, example)
    spare = copy.deepcopy(student) if world > 1 and rank == 0 else None  # gathers the sharded result
    before = _fidelity(teacher, student, tokenizer, held_out)
    loss = DistillLoss(**loss_cfg)
    steps = settings.pop("steps")
    result = train(student, teacher, lines, loss, tokenizer=tokenizer, steps=steps, out=out,
                   resume=not args.no_resume, overwrite=args.overwrite, shard_teacher=args.shard_teacher, **settings)
    after = _fidelity(teacher, student, tokenizer, held_out)
    trained = _whole(student, spare, world)
    if rank == 0:
        summary = {"steps": result.step, "world": world, "resumed_from": result.resumed_from,
                   "final_loss": result.losses[-1] if result.losses else None, "before": before, "after": after}
        write_atomic(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
        trained.cpu()
        save_compressed(trained, out / "model", recipe=Path(args.recipe) if args.recipe else None,
                        extras=tokenizer_extra(tokenizer))
        print(f"wrote {out / 'model'}")
        if args.onnx:
            from fxcook.runtime import onnx as onnx_rt

            print(f"wrote {onnx_rt.export(trained, out / 'model.onnx', example_inputs=example)}")
        if before is not None:
            print(f"fidelity vs fp32 on {len(held_out)} held-out lines:")
            print(f"  one-shot : min cos {before['min_cos']:.4f}  mean cos {before['mean_cos']:.4f}")
            print(f"  distilled: min cos {after['min_cos']:.4f}  mean cos {after['mean_cos']:.4f}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _whole(student: nn.Module, spare: nn.Module | None, world: int) -> nn.Module | None:
    """The trained student unsharded: itself on one process; under FSDP2 its gathered full state
    loaded into `spare` (a copy made before sharding) on rank 0, None on the other ranks."""
    if world == 1:
        return student
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if spare is not None:
        spare.load_state_dict(full)
    return spare


def _fidelity(teacher, student, tokenizer, lines) -> dict | None:
    """Embedding fidelity of the student vs the teacher (encoders only; None for LMs or no lines)."""
    if not lines:
        return None
    if hasattr(getattr(teacher, "config", None), "vocab_size") and "ForCausalLM" in type(teacher).__name__:
        return None
    from .evaluate import embed, fidelity

    with torch.no_grad():
        ref = embed(teacher, tokenizer, lines)
        emb = embed(student, tokenizer, lines)
    return fidelity(ref, emb)
