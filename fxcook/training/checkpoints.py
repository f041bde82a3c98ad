"""Training checkpoints with torch.distributed.checkpoint: model, optimizers, masks, step and per-rank RNG,
written aside, listed in a `fxcook.manifest` and renamed into place; one `out` directory holds one run.

`opt` is one optimizer or a list (the model's and the regularisers' maximising one), keyed by parameter
name, so the ascent parameters and their Adam state resume exactly."""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from fxcook import manifest
from fxcook.errors import FxcookError
from fxcook.training.distributed import barrier


class CheckpointError(FxcookError):
    """A checkpoint is missing, incomplete or corrupt."""


RUN_ENTRIES = ("checkpoints", "log.jsonl", "results.json", "model", "model.onnx")  # what one run writes in `out`
STEP_DIR = re.compile(r"step_(\d+)")


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
        raise FxcookError(
            f"{out} holds an earlier run ({names}); resume it (resume=True, no --no-resume), "
            f"move it aside with overwrite=True (--overwrite), or choose another out directory"
        )
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
    for s in older[: max(len(older) - (keep - 1), 0)] if keep > 0 else []:
        shutil.rmtree(root / f"step_{s:07d}", ignore_errors=True)


def save_checkpoint(
    out: Path,
    step: int,
    state: nn.Module,
    opt,
    rank: int,
    keep: int = 2,
    fingerprint: str | None = None,
    schedules: list | None = None,
) -> Path:
    """Write checkpoint `step` atomically: tmp dir -> manifest (hashes, fingerprint, step, mask
    schedule positions) -> rename -> latest pointer -> prune older checkpoints."""
    root = out / "checkpoints"
    final, tmp = root / f"step_{step:07d}", root / f".tmp_step_{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    msd, osd = get_state_dict(state, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    torch.save(
        {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        },
        tmp / f"rng_rank{rank}.pt",
    )
    barrier()
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
    barrier()
    return final


def verify_checkpoint(path: Path, fingerprint: str | None = None) -> dict:
    """Check every file (missing, unlisted, altered) and the fingerprint; returns the manifest."""
    try:
        return manifest.verify(path, fingerprint)
    except manifest.ManifestError as e:
        raise CheckpointError(
            f"checkpoint {e}; start afresh with overwrite=True (--overwrite) or use another out directory"
        ) from e


def load_checkpoint(
    path: Path, state: nn.Module, opt, rank: int, fingerprint: str | None = None, schedules: list | None = None
) -> int:
    """Restore model, optimizer(s), masks, mask schedules and RNG from `path`; returns its step."""
    meta = verify_checkpoint(path, fingerprint)
    positions = meta.get("schedules", [])
    if len(positions) != len(schedules or []):
        raise CheckpointError(
            f"checkpoint {path} holds {len(positions)} mask schedules, the model "
            f"{len(schedules or [])}: it was written for another recipe"
        )
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
