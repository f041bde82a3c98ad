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
- regularisers (`cooked.regularisers`, e.g. Prune's L0 Lagrangian) added to each step's loss, their
  ascent parameters maximised by a second optimizer and checkpointed with it, their terms logged;
- checkpoints with torch.distributed.checkpoint (model, optimizer incl. projections, masks as
  buffers, step, per-rank RNG) written to a temporary directory, listed in a `fxcook.manifest`
  (sha256 of every file, fingerprint of the passes and state shapes) and renamed into place, so a
  kill at any moment leaves every earlier checkpoint intact; a corrupt checkpoint, or one of
  another recipe, is an error naming it. One `out` directory holds one run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict

from fxcook import manifest
from fxcook.errors import FxcookError
from fxcook.taps import collect_taps
from fxcook.training.checkpoints import claim_out, latest_checkpoint, load_checkpoint, save_checkpoint
from fxcook.training.distributed import (
    all_sum,
    any_rank,
    barrier,
    init_distributed,
    local_param_bytes,
    optimizer_state_bytes,
    shard,
    sync_from_rank0,
)
from fxcook.training.losses import DistillLoss, block_paths
from fxcook.training.memory import PeakMemory
from fxcook.training.regularise import (
    FIXED_LR,
    after_step,
    ascent_optimizer,
    ascent_parameters,
    model_optimizer,
    regularise,
    regularisers,
)
from fxcook.training.task import model_inputs
from fxcook.training.textdata import StepSampler, as_dataset
from fxcook.training.trainable import apply_trainable


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)
    log: list[dict] = field(default_factory=list)
    resumed_from: int | None = None
    param_bytes: int = 0  # this rank's parameter bytes (student + loss projections), shards under FSDP2
    optim_bytes: int = 0  # this rank's optimizer state bytes
    trainable_params: int = 0  # parameters of the student that train (whole model, not this rank's shard)
    total_params: int = 0
    peak_memory_bytes: int = 0  # peak memory training added on this rank; `memory_measure` says how
    memory_measure: str = ""


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


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after a finished step (whose checkpoint is saved when `out` is given)."""


class _State(nn.Module):
    """Groups the student, the loss (its projections) and the regularisers' ascent parameters, so one
    state dict covers them all."""

    def __init__(self, student: nn.Module, loss: nn.Module, ascent: list[nn.Parameter]):
        super().__init__()
        self.student, self.loss, self.ascent = student, loss, nn.ParameterList(ascent)


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


def train(
    cooked: nn.Module,
    teacher: nn.Module | None = None,
    data=None,
    loss: DistillLoss | None = None,
    *,
    tokenizer=None,
    steps: int = 100,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup: int = 0,
    schedule: str = "cosine",
    max_grad_norm: float | None = 1.0,
    max_length: int = 128,
    out: str | os.PathLike | None = None,
    save_every: int = 0,
    keep: int = 2,
    resume: bool = True,
    overwrite: bool = False,
    seed: int = 0,
    fsdp: bool | None = None,
    shard_teacher: bool = False,
    progress: bool = True,
    callback=None,
    eval_every: int = 0,
    trainable=None,
    group_by_length: bool = False,
) -> TrainResult:
    """Train `cooked` (QAT/masks included) against `loss`, distilling from `teacher` if given.

    `data`: lines of text (with `tokenizer`), a mapping of token tensors, or a fxcook.training.textdata dataset.
    `batch_size` is the global batch (all ranks and micro-batches). With `out`, checkpoints go to
    `out/checkpoints` every `save_every` steps and at the end, losses to `out/log.jsonl`; a run with
    `resume=True` continues from the latest checkpoint, which must come from the same passes and model
    shapes. An earlier run in `out` is never mixed with a new one: `resume=False` refuses it unless
    `overwrite=True`, which moves it aside to `out/old-run-<time>` and starts afresh. Scheduled masks
    (`Sparsify(schedule=...)`) advance after every optimizer step; regularisers (`cooked.regularisers`)
    join every step's loss once, and their terms its log row. Ctrl-C stops after the current
    step, saves its checkpoint and raises TrainInterrupted. Under torchrun the student is FSDP2-sharded
    per block (`fsdp=None` means: when the world is larger than one). `callback(step, model)` runs on
    every rank every `eval_every` steps (and at step 0); a dict it returns joins that step's log row.
    `trainable` ("all", "lora+norm", or parameter globs; see fxcook.training.trainable) freezes the
    rest of the student; None trains what already requires grad (a Lora pass froze its base weights).
    `group_by_length` fills each batch with lines of like length (`StepSampler`), so little of a step's
    compute goes to padding (on Shakespeare lines, batch 16: about half as many tokens per step).
    """
    if data is None:
        raise FxcookError("train needs data=")
    _check_counts(
        steps=(steps, 1),
        batch_size=(batch_size, 1),
        grad_accum=(grad_accum, 1),
        max_length=(max_length, 2),
        save_every=(save_every, 0),
        keep=(keep, 0),
        eval_every=(eval_every, 0),
    )
    outdir = Path(out) if out is not None else None
    if outdir is not None:
        from fxcook.paths import check_out_dir

        check_out_dir(outdir, "train out")
    loss = loss if loss is not None else DistillLoss(lm=1.0) if teacher is None else DistillLoss(hidden_mse=1.0)
    rank, world, device = init_distributed()
    if outdir is not None:
        claim_out(outdir, resume, overwrite, move=False)  # every rank raises alike
        if rank == 0:
            claim_out(outdir, resume, overwrite)
        barrier()
    fsdp = world > 1 if fsdp is None else fsdp
    torch.manual_seed(seed)  # identical projection init on every rank
    random.seed(seed)
    dataset = as_dataset(data, tokenizer, max_length)
    sampler = StepSampler(len(dataset), batch_size, seed, dataset.lengths() if group_by_length else None)
    sampler.split(0, grad_accum, world, rank)  # checks divisibility up front

    probe = dataset.batch(sampler.indices(0)[:2])
    if not loss.bound:
        loss.bind(cooked, teacher, probe)
    s_specs, t_specs = loss.student_taps(), loss.teacher_taps()
    student_mode = cooked.training
    cooked.to(device).train()
    loss.to(device)
    regs = regularisers(cooked)
    state = _State(cooked, loss, ascent_parameters(regs))
    fingerprint, schedules = run_fingerprint(state, cooked), _schedules(cooked)
    teacher_mode = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.to(device).eval()  # restored on exit; its parameters are never updated (no_grad)
    if trainable is not None:
        apply_trainable(cooked, trainable)
    counts = [(p.numel(), p.requires_grad) for p in cooked.parameters()]
    if fsdp:
        sync_from_rank0([cooked, loss])
        shard(cooked, block_paths(cooked))
        if any(True for _ in loss.parameters()):
            from torch.distributed.fsdp import fully_shard

            fully_shard(loss)
        if teacher is not None and shard_teacher:
            shard(teacher, block_paths(teacher))
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    ascending = {id(p) for p in state.ascent.parameters()}
    params = [p for p in state.parameters() if p.requires_grad and id(p) not in ascending]
    if not params:
        raise FxcookError("the model has no trainable parameters")
    opt, ascent_opt = model_optimizer(params, regs, lr, weight_decay), ascent_optimizer(regs)
    opts = [opt] if ascent_opt is None else [opt, ascent_opt]
    get_state_dict(state, opts)  # creates optimizer state for every parameter (a zero-lr step), so
    # checkpoints hold the same keys whether or not a parameter got a gradient (e.g. an unused pooler)

    start, resumed = 0, None
    if outdir is not None and resume and not overwrite:
        ckpt = latest_checkpoint(outdir)
        if ckpt is not None:
            start = resumed = load_checkpoint(ckpt, state, opts, rank, fingerprint, schedules)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    result = TrainResult(step=start, resumed_from=resumed)
    result.trainable_params, result.total_params = sum(n for n, g in counts if g), sum(n for n, _ in counts)
    if outdir is not None and rank == 0:
        outdir.mkdir(parents=True, exist_ok=True)
    log_file = open(outdir / "log.jsonl", "a") if outdir is not None and rank == 0 else None
    saved = start

    def checkpoint(step: int) -> None:
        nonlocal saved
        if outdir is not None and step > saved:
            save_checkpoint(outdir, step, state, opts, rank, keep, fingerprint, schedules)
            saved = step

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="train", unit="step")
    try:
        with _deferred_sigint() as interrupt, PeakMemory(device) as peak:
            if callback is not None and eval_every and start == 0:
                row = {"step": 0, **(callback(0, cooked) or {})}
                result.log.append(row)
                if log_file is not None:
                    log_file.write(json.dumps(row) + "\n")
            for step in range(start, steps):
                t0 = time.perf_counter()
                for g in opt.param_groups:
                    g["lr"] = g.get(FIXED_LR) or lr * lr_factor(step, steps, warmup, schedule)
                micro = [_to(dataset.batch(ix), device) for ix in sampler.split(step, grad_accum, world, rank)]
                local = {k: sum(loss.counts(b)[k] for b in micro) for k in ("tok", "lm", "ex")}
                glob = dict(zip(local, all_sum(list(local.values()), device)))
                denom = {k: v / world for k, v in glob.items()}
                step_loss, terms = 0.0, {}
                for batch in micro:
                    with autocast:
                        t_out, t_taps = None, {}
                        if teacher is not None:
                            with torch.no_grad(), collect_taps(teacher, t_specs) as t_taps:
                                t_out = teacher(**model_inputs(batch))
                        with collect_taps(cooked, s_specs) as s_taps:
                            s_out = cooked(**model_inputs(batch))
                        total, parts = state.loss(batch, s_out, s_taps, t_out, t_taps, denom)
                    total.backward()
                    step_loss += float(total.detach())
                    for k, v in parts.items():
                        terms[k] = terms.get(k, 0.0) + v
                reg_loss, reg_terms = regularise(regs, cooked, step)
                if reg_loss is not None:  # the same on every rank: its gradient is whole on each
                    reg_loss.backward()
                    step_loss += float(reg_loss.detach())
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                for o in opts:
                    o.step()
                    o.zero_grad(set_to_none=True)
                after_step(regs, cooked, step + 1)
                for sched in schedules:
                    sched.update(cooked, step + 1)
                sums = all_sum([step_loss, *terms.values()], device)
                row = {
                    "step": step + 1,
                    "loss": sums[0] / world,
                    **{k: v / world for k, v in zip(terms, sums[1:])},
                    **reg_terms,
                    "lr": opt.param_groups[0]["lr"],
                    "sec": time.perf_counter() - t0,
                }
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
                    bar.set_postfix(loss=f"{row['loss']:.4g}", **{k: f"{v:.3g}" for k, v in reg_terms.items()})
                if (save_every and (step + 1) % save_every == 0) or step + 1 == steps:
                    checkpoint(step + 1)
                if any_rank(interrupt["hit"], device):
                    checkpoint(step + 1)
                    where = (
                        (
                            f"; its checkpoint is in {outdir / 'checkpoints'} (train again with this out "
                            f"directory to resume)"
                        )
                        if outdir is not None
                        else ""
                    )
                    raise TrainInterrupted(f"interrupted after step {step + 1}{where}")
        for sched in schedules:  # e.g. DropLayers(every=K): blocks gated off during the run leave the model
            getattr(sched, "settle", lambda _cooked: None)(cooked)
        result.param_bytes, result.optim_bytes = local_param_bytes(state), sum(map(optimizer_state_bytes, opts))
        result.peak_memory_bytes, result.memory_measure = peak.bytes, peak.how
    finally:
        cooked.train(student_mode)
        if teacher is not None:
            teacher.train(teacher_mode)
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    return result
