"""`fxcook demo`: compress the embedded MiniLM with each technique and report size and fidelity.

Each stage is a recipe shipped in `fxcook/recipes/` (the same files `fxcook compress` takes). Fidelity is
the cosine between each compressed sentence embedding and the fp32 one over held-out Shakespeare
lines; calibration and distillation use other lines. Stages with `distill_steps` are then trained
briefly against the fp32 teacher (hidden-state MSE + cosine) and scored again; with `staged=True` the
staged combination recipe (combo.yaml) is run too, each of its stages recovered before the next
(`fxcook.stages`, about half an hour on 2 CPU cores), and scored one-shot and after its last stage.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fxcook.errors import FxcookError

RECIPES = Path(__file__).resolve().parent / "recipes"  # package data: also there in an installed wheel


@dataclass(frozen=True)
class Stage:
    label: str
    recipe: str | None  # file in fxcook/recipes, None = capture only
    distill_steps: int = 0
    onnx: bool = False  # also export to ONNX and run it in ONNX Runtime


STAGES = (
    Stage("fp32 (captured)", None, onnx=True),
    Stage("int8 (int8.yaml)", "int8.yaml", onnx=True),
    Stage("2:4 Wanda + int8 (int8_24.yaml)", "int8_24.yaml", distill_steps=60),
    Stage("ReLU + 2:4 + int8 + MoE 16/32 (moe.yaml)", "moe.yaml", distill_steps=60, onnx=True),
)
STAGED = Stage("ReLU + 2:4 + int8 + MoE 16/32, staged (combo.yaml)", "combo.yaml", onnx=True)


def _recipe(stage: Stage):
    from fxcook.recipe import load_recipe, parse_recipe

    if stage.recipe is None:
        return parse_recipe({"passes": []}, source="capture only")
    path = RECIPES / stage.recipe
    if not path.is_file():
        raise FxcookError(f"demo stage {stage.label!r} needs {path}, which is missing: reinstall fxcook")
    return load_recipe(path)


def _median_ms(fn, inputs: dict, reps: int = 5) -> float:
    fn(**inputs)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(**inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _onnx_row(cooked, tok, held_out: list[str], ref) -> dict:
    """Export `cooked`, run it in ONNX Runtime: fidelity and batch 8 x 128 latency (2 threads)."""
    from fxcook.evaluate import embed, fidelity
    from fxcook.runtime import onnx as fxonnx

    batch = dict(tok(held_out[:8], padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
    with tempfile.TemporaryDirectory() as d:
        ort_model = fxonnx.OrtModel(fxonnx.export(cooked, Path(d) / "model.onnx", example_inputs=batch), threads=2)
        fid = fidelity(ref, embed(ort_model, tok, held_out))
        return {"ort_ms": _median_ms(ort_model, batch), "ort_min_cos": fid["min_cos"]}


def run(
    samples: int = 256, distill: bool = True, onnx: bool = True, console: Console | None = None, staged: bool = False
) -> list[dict]:
    from fxcook import compile
    from fxcook.data import calibration_for, shakespeare_lines
    from fxcook.evaluate import embed, fidelity
    from fxcook.models import load_model
    from fxcook.report import activated_size, block_weights
    from fxcook.training.loop import train
    from fxcook.training.losses import DistillLoss

    console = console or Console(width=150)
    model, tok = load_model("minilm")
    lines = shakespeare_lines(seed=1)  # recipes calibrate on seed-0 lines; these are others
    held_out, train_lines = lines[:samples], lines[samples : samples + 4000]
    ref = embed(model, tok, held_out)
    eager_batch = dict(tok(held_out[:8], padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
    with torch.no_grad():
        eager_ms = _median_ms(model, eager_batch)
    rows = []
    for stage in (*STAGES, STAGED) if staged else STAGES:
        recipe = _recipe(stage)
        t0 = time.perf_counter()
        cooked = compile(
            model,
            recipe.build(calibration=calibration_for(recipe, tok)) if recipe.passes else [],
            example_inputs=dict(tok(held_out[:2], padding=True, return_tensors="pt")),
        )
        row = {
            "stage": stage.label,
            "compile_s": time.perf_counter() - t0,
            **fidelity(ref, embed(cooked, tok, held_out)),
        }
        row["activated"], row["ratio"] = activated_size(cooked), block_weights(cooked) / activated_size(cooked)
        console.rule(f"[bold]{stage.label}")
        console.print(cooked.report())
        if distill and stage.distill_steps:
            train(
                cooked,
                teacher=model,
                data=train_lines,
                tokenizer=tok,
                steps=stage.distill_steps,
                batch_size=16,
                lr=2e-4,
                max_length=64,
                loss=DistillLoss(hidden_mse=1.0, hidden_cos=1.0),
                progress=True,
            )
            cooked.eval()
            after = fidelity(ref, embed(cooked, tok, held_out))
            row.update(distilled=stage.distill_steps, min_after=after["min_cos"], mean_after=after["mean_cos"])
        if distill and recipe.staged:
            cooked, steps = _run_staged(model, tok, recipe, train_lines, held_out)
            after = fidelity(ref, embed(cooked, tok, held_out))
            row.update(distilled=steps, min_after=after["min_cos"], mean_after=after["mean_cos"])
        if onnx and stage.onnx:
            row.update(_onnx_row(cooked, tok, held_out, ref))
        rows.append(row)
    console.print(_table(rows, len(held_out), eager_ms))
    return rows


def _run_staged(model, tok, recipe, train_lines: list[str], held_out: list[str]):
    """The recipe's stages run in turn on `model`; returns the final model and the steps trained."""
    from fxcook.stages import run_stages

    example = dict(tok(held_out[:2], padding=True, return_tensors="pt"))
    run = run_stages(model, recipe, tok, train_lines, example_inputs=example)
    return run.model, sum(s.steps for s in run.stages)


def _table(rows: list[dict], n: int, eager_ms: float) -> Table:
    table = Table(
        title=f"fxcook demo: all-MiniLM-L6-v2, fidelity vs fp32 on {n} held-out Shakespeare lines; "
        f"ORT speed-up vs torch fp32 eager ({eager_ms:.0f} ms) at batch 8 x 128, 2 threads"
    )
    for col in (
        "stage",
        "activated size",
        "smaller",
        "min cos",
        "mean cos",
        "distilled",
        "min cos after",
        "mean cos after",
        "ORT min cos",
        "ORT speed-up",
        "compile s",
    ):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for r in rows:
        d = "distilled" in r
        table.add_row(
            r["stage"],
            f"{r['activated'] / 1e6:.2f}M",
            f"{r['ratio']:.1f}x",
            f"{r['min_cos']:.4f}",
            f"{r['mean_cos']:.4f}",
            f"{r['distilled']} steps" if d else "-",
            f"{r['min_after']:.4f}" if d else "-",
            f"{r['mean_after']:.4f}" if d else "-",
            f"{r['ort_min_cos']:.4f}" if "ort_ms" in r else "-",
            f"{eager_ms / r['ort_ms']:.2f}x" if "ort_ms" in r else "-",
            f"{r['compile_s']:.1f}",
        )
    return table
