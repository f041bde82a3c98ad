"""Staged recipes: each stage's passes applied to the model the previous stage produced, then trained.

Compression applied all at once and recovered in one run loses more than compression applied and
recovered step by step (BMCook, MoEfication and CoFi all recover in stages). `run_stages` runs a
recipe's `stages:` in order. With `out`, each stage trains in `out/stages/NN-name/` (its own
checkpoints and log) and, once finished, leaves `finished/`: the model's state and the stage's pass
entries, hashed by `fxcook.manifest`. A killed run resumes exactly: finished stages are rebuilt in
restore mode (no calibration) and their saved state loaded; the stage that was running re-applies
its passes (seeded, so identically) and resumes its training from its latest checkpoint. The
settings a run began with are kept in `out/stages/plan.json`; resuming with other ones is an error
naming the stage and key.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxcook import manifest
from fxcook.checkpoint import write_atomic
from fxcook.data import calibration_for as recipe_calibration
from fxcook.data import lines_from
from fxcook.errors import FxcookError, PassError, RecipeError
from fxcook.passbase import ENTRIES
from fxcook.pipeline import apply, capture
from fxcook.recipe import Recipe, build_passes
from fxcook.training.checkpoints import claim_out
from fxcook.training.loop import train
from fxcook.training.losses import DistillLoss
from fxcook.training.trainable import apply_trainable

STAGES_DIR, PLAN, FINISHED = "stages", "plan.json", "finished"
STATE, SUMMARY = "state.pt", "stage.json"
LOSS_DEFAULT = {"hidden_mse": 1.0, "hidden_cos": 1.0}
TRAIN_DEFAULTS = {
    "steps": 100,
    "batch_size": 16,
    "grad_accum": 1,
    "lr": 1e-4,
    "warmup": 0,
    "schedule": "cosine",
    "max_length": 128,
    "save_every": 50,
    "seed": 0,
}


@dataclass
class StageResult:
    name: str
    passes: list[str]
    steps: int = 0
    seconds: float = 0.0
    restored: bool = False  # finished in an earlier run and rebuilt from out/stages
    info: dict = field(default_factory=dict)  # what `after_stage` returned
    log: list[dict] = field(default_factory=list)
    first: int = 0  # index of the stage's first pass entry on the model


@dataclass
class StagedRun:
    model: nn.Module
    stages: list[StageResult]

    def record(self) -> list[dict]:
        """Per stage: name, the indices of its passes in the model's pass entries, steps, seconds and
        what `after_stage` returned (JSON)."""
        rows, start = [], 0
        for s in self.stages:
            rows.append(
                {
                    "name": s.name,
                    "passes": s.passes,
                    "entries": list(range(start, start + len(s.passes))),
                    "steps": s.steps,
                    "seconds": s.seconds,
                    **s.info,
                }
            )
            start += len(s.passes)
        return rows


def stages_extra(run: StagedRun) -> dict[str, Callable[[Path], object]]:
    """`fxcook.save(..., extras=stages_extra(run))` records every stage in the artifact (stages.json);
    its `entries` index the passes in fxcook.json, which `fxcook.load` replays in order."""
    return {"stages.json": lambda path: path.write_text(json.dumps(run.record(), indent=1, default=float) + "\n")}


def stage_name(recipe: Recipe, i: int) -> str:
    return recipe.stages[i].name or f"stage{i}"


def stage_settings(recipe: Recipe, i: int, defaults: dict | None = None, overrides: dict | None = None) -> dict:
    """The train settings of stage `i`: `defaults` < the stage's `train:` < `overrides` (CLI flags),
    with `loss`, `data` and `teacher`; None for a stage without training."""
    section = recipe.stages[i].train
    if section is None:
        return None
    settings = {**TRAIN_DEFAULTS, **(defaults or {}), **section.settings(), **(overrides or {})}
    settings.setdefault("loss", LOSS_DEFAULT)
    return {**settings, "data": section.data, "teacher": section.teacher}


def plan_of(recipe: Recipe, defaults: dict | None = None, overrides: dict | None = None) -> list[dict]:
    """What a staged run depends on, per stage (JSON): passes, calibration, effective train settings."""
    return [
        {
            "name": stage_name(recipe, i),
            "passes": stage.passes,
            "calibration": recipe.stage_calibration(i).model_dump(mode="json"),
            "train": stage_settings(recipe, i, defaults, overrides),
        }
        for i, stage in enumerate(recipe.stages)
    ]


def _first_difference(old: Any, new: Any, key: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in [*old, *(k for k in new if k not in old)]:
            found = _first_difference(old.get(k), new.get(k), f"{key}.{k}" if key else k)
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for j, (a, b) in enumerate(zip(old, new)):
            found = _first_difference(a, b, f"{key}[{j}]")
            if found:
                return found
        return None
    return None if old == new else (key, old, new)


def check_plan(path: Path, plan: list[dict], recipe: Recipe) -> None:
    """Refuse to resume the run in `path` with a recipe (or flags) other than the one it began with."""
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FxcookError(f"{path} cannot be read ({e}); start afresh with --overwrite / overwrite=True") from e
    fix = "resume with the recipe and flags the run began with, or start afresh with --overwrite / overwrite=True"
    for i in range(max(len(old), len(plan))):
        if i >= len(old) or i >= len(plan):
            what = "is new" if i >= len(old) else "was removed"
            raise RecipeError(
                f"{recipe.source}: stages[{i}] {what} since the run in {path.parent.parent} began "
                f"({len(old)} stages then, {len(plan)} now); {fix}"
            )
        diff = _first_difference(old[i], plan[i])
        if diff:
            key, was, now = diff
            raise RecipeError(
                f"{recipe.source}: {_label(recipe, i)} key {key!r} changed since the run in "
                f"{path.parent.parent} began ({json.dumps(was)} then, {json.dumps(now)} now); {fix}"
            )


def _label(recipe: Recipe, i: int) -> str:
    return recipe.stage_label(i) if i < len(recipe.stages) else f"stages[{i}]"


def check_conflicts(cooked: nn.Module, recipe: Recipe) -> None:
    """Apply every stage's passes in restore mode (no data, placeholder values) to a copy of `cooked`,
    so a pass that cannot follow an earlier stage's (Moefy twice) fails, by its own `requires`, before
    any calibration or training."""
    probe = copy.deepcopy(cooked)
    for i in range(len(recipe.stages)):
        passes = recipe.build_stage(i)
        for p in passes:
            p.restore = {}
        try:
            apply(probe, passes)
        except PassError as e:
            raise RecipeError(f"{recipe.source}: {recipe.stage_label(i)}: {e}") from e


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def _write_finished(folder: Path, cooked: nn.Module, entries: list[dict], result: StageResult) -> None:
    """The finished stage's state and pass entries, built aside and renamed into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FINISHED}.", dir=folder.parent))
    try:
        torch.save(cooked.state_dict(), tmp / STATE)
        summary = {
            "entries": entries,
            "steps": result.steps,
            "seconds": result.seconds,
            "info": result.info,
            "log": result.log,
        }
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=1, default=float) + "\n")
        manifest.write(tmp)
        tmp.chmod(0o755)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _restore_finished(cooked: nn.Module, folder: Path, result: StageResult, load_state: bool) -> None:
    """Re-apply a finished stage's passes in restore mode (their saved records), then, for the last
    finished stage, load the model state it ended with."""
    try:
        manifest.verify(folder)
    except manifest.ManifestError as e:
        raise FxcookError(
            f"finished stage {e}; start afresh with --overwrite / overwrite=True or use another out directory"
        ) from e
    summary = json.loads((folder / SUMMARY).read_text())
    entries = summary["entries"]
    passes = build_passes([{e["pass"]: e["config"]} for e in entries], None, str(folder / SUMMARY), "entries")
    for p, entry in zip(passes, entries, strict=True):
        p.restore = dict(entry.get("record") or {})
    first = len(getattr(cooked, ENTRIES, None) or [])
    apply(cooked, passes)
    getattr(cooked, ENTRIES)[first:] = entries  # the records the data chose, not the placeholders'
    if load_state:
        cooked.load_state_dict(torch.load(folder / STATE, weights_only=True))
    result.steps, result.seconds = summary["steps"], summary["seconds"]
    result.info, result.log, result.restored = summary["info"], summary["log"], True


def run_stages(
    model: nn.Module,
    recipe: Recipe,
    tokenizer,
    data: list[str],
    *,
    example_inputs: Any,
    calibration_for: Callable[[Any], list] | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = True,
    overwrite: bool = False,
    defaults: dict | None = None,
    overrides: dict | None = None,
    after_stage: Callable[[int, nn.Module], dict | None] | None = None,
    callback: Callable[[int, int, nn.Module], dict | None] | None = None,
    eval_every: int = 0,
    progress: bool = True,
) -> StagedRun:
    """Run the stages of `recipe` on `model` (never mutated) and return the final CookedModel.

    `data`: training lines for stages whose `train:` names no `data`. `calibration_for(calibration)`
    turns a stage's calibration section into batches (default: `fxcook.data.calibration_for` with
    `tokenizer`). `defaults` / `overrides` sit under / over each stage's `train:` settings.
    `after_stage(i, model)` runs when stage `i` has finished; its dict is kept with the stage (and
    in `out`, so a resumed run reports it too). `callback(i, step, model)` runs every `eval_every`
    training steps of stage `i` (see `fxcook.training.loop.train`).
    """
    if not recipe.staged:
        raise RecipeError(f"{recipe.source}: run_stages needs a recipe with stages:; this one has passes: only")
    if calibration_for is None:
        calibration_for = lambda cal: recipe_calibration(Recipe(calibration=cal), tokenizer)  # noqa: E731
    root = None
    plan = plan_of(recipe, defaults, overrides)
    if out is not None:
        claim_out(Path(out), resume, overwrite)
        if (Path(out) / "checkpoints").exists():
            raise FxcookError(
                f"{out} holds a single-stage training run (checkpoints/), not one of {recipe.source}'s stages: "
                f"move it aside with --overwrite / overwrite=True or choose another out directory"
            )
        root = Path(out) / STAGES_DIR
        check_plan(root / PLAN, plan, recipe)
        write_atomic(root / PLAN, lambda tmp: Path(tmp).write_text(json.dumps(plan, indent=1) + "\n"))
    cooked = capture(model, example_inputs)
    check_conflicts(cooked, recipe)
    folders = [root / f"{i:02d}-{stage_name(recipe, i)}" if root else None for i in range(len(recipe.stages))]
    finished = [f is not None and (f / FINISHED).is_dir() for f in folders]
    last_done = max((i for i, done in enumerate(finished) if done and all(finished[: i + 1])), default=-1)
    results = []
    for i, stage in enumerate(recipe.stages):
        result = StageResult(stage_name(recipe, i), [next(iter(item)) for item in stage.passes])
        results.append(result)
        if i <= last_done:
            _restore_finished(cooked, folders[i] / FINISHED, result, load_state=i == last_done)
            trainable = (stage_settings(recipe, i, defaults, overrides) or {}).get("trainable")
            if trainable is not None:  # what the stage froze stays frozen for the stages after it
                apply_trainable(cooked, trainable)
            continue
        stage_cb = None if callback is None else lambda step, m, i=i: callback(i, step, m)
        _fresh_stage(cooked, model, recipe, i, result, calibration_for, defaults, overrides, tokenizer, data,
                     folders[i], resume, progress, stage_cb, eval_every)  # fmt: skip
        if after_stage is not None:
            cooked.eval()
            result.info = dict(after_stage(i, cooked) or {})
        if folders[i] is not None:
            _write_finished(folders[i] / FINISHED, cooked, getattr(cooked, ENTRIES, [])[result.first :], result)
    return StagedRun(cooked.eval(), results)


def _fresh_stage(cooked, model, recipe, i, result, calibration_for, defaults, overrides, tokenizer, data,
                 folder, resume, progress, cb, eval_every) -> None:  # fmt: skip
    """Stage `i` from its start: seeded, its passes calibrated on `cooked` as it stands, then trained."""
    t0 = time.perf_counter()
    settings = stage_settings(recipe, i, defaults, overrides)
    _seed((settings or {}).get("seed", 0) + i)  # a resumed stage re-applies its passes identically
    teacher = copy.deepcopy(cooked).eval() if settings and settings["teacher"] == "previous" else model
    result.first = len(getattr(cooked, ENTRIES, None) or [])
    passes = recipe.stages[i].passes
    calibration = calibration_for(recipe.stage_calibration(i)) if passes else None
    try:
        apply(cooked, recipe.build_stage(i, calibration))
    except PassError as e:
        raise RecipeError(f"{recipe.source}: {recipe.stage_label(i)}: {e}") from e
    if settings:
        result.log = _train_stage(cooked, teacher, settings, tokenizer, data, folder, resume, progress, cb, eval_every)
        result.steps = settings["steps"]
    result.seconds = time.perf_counter() - t0


def _train_stage(cooked, teacher, settings, tokenizer, data, folder, resume, progress, cb, eval_every) -> list[dict]:
    """One stage's training run; its checkpoints and log go to the stage's folder."""
    kwargs = {k: v for k, v in settings.items() if k not in ("loss", "data", "teacher", "steps")}
    lines = lines_from(settings["data"], seed=settings["seed"]) if settings["data"] else data
    result = train(
        cooked,
        teacher,
        lines,
        DistillLoss(**settings["loss"]),
        tokenizer=tokenizer,
        steps=settings["steps"],
        out=folder,
        resume=resume,
        progress=progress,
        callback=cb,
        eval_every=eval_every if cb else 0,
        **kwargs,
    )
    return result.log
