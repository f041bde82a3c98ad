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
- checkpoints with torch.distributed.checkpoint (model, optimizer incl. projections, masks as
  buffers, step, per-rank RNG) written to a temporary directory, hashed into a manifest and renamed
  into place, so a kill at any moment leaves every earlier checkpoint intact; a corrupt checkpoint
  is an error naming the file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

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
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def save_checkpoint(out: Path, step: int, state: nn.Module, opt, rank: int, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically: tmp dir -> manifest of hashes -> rename -> latest pointer."""
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
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world": world}))
        files = sorted(p for p in tmp.iterdir() if p.name != "manifest.json")
        manifest = {p.name: _sha256(p) for p in files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = root / ".latest.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, root / "latest")
        done = sorted(p for p in root.iterdir() if p.name.startswith("step_"))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def verify_checkpoint(path: Path) -> dict:
    """Check every file against the manifest; returns meta. Raises CheckpointError naming the file."""
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise CheckpointError(f"checkpoint {path} has no manifest.json: it is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is corrupt: {e}") from e
    for name, digest in manifest.items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is corrupt (sha256 does not match its manifest)")
    return json.loads((path / "meta.json").read_text())


def load_checkpoint(path: Path, state: nn.Module, opt, rank: int) -> int:
    """Restore model, optimizer, masks and RNG from `path`; returns the step it was saved after."""
    meta = verify_checkpoint(path)
    msd, osd = get_state_dict(state, opt)
    sd = {"model": msd, "optim": osd}
    try:
        dcp.load(sd, checkpoint_id=str(path))
    except Exception as e:  # DCP raises several types for unreadable data
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e
    set_state_dict(state, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return int(meta["step"])


# ---- the loop -------------------------------------------------------------------------------------
class _State(nn.Module):
    """Groups the student and the loss (its projections) so one state dict covers both."""

    def __init__(self, student: nn.Module, loss: nn.Module):
        super().__init__()
        self.student, self.loss = student, loss


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def train(cooked: nn.Module, teacher: nn.Module | None = None, data=None, loss: DistillLoss | None = None, *,
          tokenizer=None, steps: int = 100, batch_size: int = 8, grad_accum: int = 1, lr: float = 1e-4,
          weight_decay: float = 0.0, warmup: int = 0, schedule: str = "cosine", max_grad_norm: float | None = 1.0,
          max_length: int = 128, out: str | os.PathLike | None = None, save_every: int = 0, keep: int = 2,
          resume: bool = True, seed: int = 0, fsdp: bool | None = None, shard_teacher: bool = False,
          progress: bool = True, callback=None, eval_every: int = 0) -> TrainResult:
    """Train `cooked` (QAT/masks included) against `loss`, distilling from `teacher` if given.

    `data`: lines of text (with `tokenizer`), a mapping of token tensors, or a fxcook.textdata dataset.
    `batch_size` is the global batch (all ranks and micro-batches). With `out`, checkpoints go to
    `out/checkpoints` every `save_every` steps and at the end, losses to `out/log.jsonl`; a run with
    `resume=True` continues from the latest checkpoint. Under torchrun the student is FSDP2-sharded
    per block (`fsdp=None` means: when the world is larger than one). `callback(step, model)` runs on
    every rank every `eval_every` steps (and at step 0); a dict it returns joins that step's log row.
    """
    if data is None:
        raise FxcookError("train needs data=")
    loss = loss if loss is not None else DistillLoss(lm=1.0) if teacher is None else DistillLoss(hidden_mse=1.0)
    rank, world, device = init_distributed()
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

    cooked.to(device).train()
    loss.to(device)
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
    state = _State(cooked, loss)
    params = [p for p in state.parameters() if p.requires_grad]
    if not params:
        raise FxcookError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    get_state_dict(state, opt)  # creates optimizer state for every parameter (a zero-lr step), so
    # checkpoints hold the same keys whether or not a parameter got a gradient (e.g. an unused pooler)

    outdir = Path(out) if out is not None else None
    start, resumed = 0, None
    if outdir is not None and resume:
        ckpt = latest_checkpoint(outdir)
        if ckpt is not None:
            start = resumed = load_checkpoint(ckpt, state, opt, rank)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    result = TrainResult(step=start, resumed_from=resumed)
    if outdir is not None and rank == 0:
        outdir.mkdir(parents=True, exist_ok=True)
    log_file = open(outdir / "log.jsonl", "a") if outdir is not None and rank == 0 else None
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="train", unit="step")
    try:
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
            if outdir is not None and ((save_every and (step + 1) % save_every == 0) or step + 1 == steps):
                save_checkpoint(outdir, step + 1, state, opt, rank, keep)
        result.param_bytes, result.optim_bytes = local_param_bytes(state), optimizer_state_bytes(opt)
    finally:
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
    parser.add_argument("--model", default="minilm", help="'minilm' or a local HF model directory")
    parser.add_argument("--recipe", help="recipe YAML/JSON: passes to apply, plus an optional train: section")
    parser.add_argument("--data", default="shakespeare", help="a text file or directory, or 'shakespeare'")
    parser.add_argument("--out", required=True, help="output directory (checkpoints, log.jsonl, results.json)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: recipe or 100)")
    parser.add_argument("--batch-size", type=int, help="global batch size (default: recipe or 16)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per step (default 1)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    parser.add_argument("--warmup", type=int, help="linear warmup steps (default 0)")
    parser.add_argument("--schedule", choices=("cosine", "linear", "constant"))
    parser.add_argument("--max-length", type=int, help="tokens per line (default 128)")
    parser.add_argument("--save-every", type=int, help="checkpoint every N steps (default 50)")
    parser.add_argument("--seed", type=int, help="seed (default 0)")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --out")
    parser.add_argument("--shard-teacher", action="store_true", help="FSDP2-shard the teacher too")
    parser.add_argument("--lines", type=int, default=None, help="use only the first N lines of --data")
    parser.add_argument("--eval-lines", type=int, default=64, help="held-out lines for the fidelity table")


TRAIN_DEFAULTS = dict(steps=100, batch_size=16, grad_accum=1, lr=1e-4, warmup=0, schedule="cosine",
                      max_length=128, save_every=50, seed=0)


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
    """`fxcook train`: compress --model with --recipe, then distill it from the original on --data."""
    from .models import example_batch, load_model
    from .pipeline import compile as fx_compile
    from .data import lines_from

    recipe, recipe_train = None, {}
    if args.recipe:
        from .recipe import load_recipe

        recipe = load_recipe(args.recipe)
        recipe_train = dict(recipe.train or {})
    settings, loss_cfg = _train_settings(args, recipe_train)
    rank, world, _ = init_distributed()
    teacher, tokenizer = load_model(args.model)
    lines = lines_from(args.data, seed=settings["seed"])
    held_out = []
    if args.eval_lines > 0:  # lines[:-0] would be empty: split only when lines are held out
        held_out, lines = lines[-args.eval_lines:], lines[:-args.eval_lines]  # calibration uses the first lines
    if args.lines:
        lines = lines[:args.lines]
    passes, example = [], example_batch(tokenizer, (held_out or lines)[:4], settings["max_length"])
    if recipe is not None:
        from .cli import calibration_for

        calibration = calibration_for(recipe, tokenizer)
        passes, example = recipe.build(calibration=calibration), calibration[0]
    student = fx_compile(teacher, passes, example)
    before = _fidelity(teacher, student, tokenizer, held_out)
    loss = DistillLoss(**loss_cfg)
    steps = settings.pop("steps")
    result = train(student, teacher, lines, loss, tokenizer=tokenizer, steps=steps, out=args.out,
                   resume=not args.no_resume, shard_teacher=args.shard_teacher, **settings)
    after = _fidelity(teacher, student, tokenizer, held_out)
    if rank == 0:
        summary = {"steps": result.step, "world": world, "resumed_from": result.resumed_from,
                   "final_loss": result.losses[-1] if result.losses else None, "before": before, "after": after}
        Path(args.out, "results.json").write_text(json.dumps(summary, indent=1))
        if before is not None:
            print(f"fidelity vs fp32 on {len(held_out)} held-out lines:")
            print(f"  one-shot : min cos {before['min_cos']:.4f}  mean cos {before['mean_cos']:.4f}")
            print(f"  distilled: min cos {after['min_cos']:.4f}  mean cos {after['mean_cos']:.4f}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


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
