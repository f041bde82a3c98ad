"""Save and load of compressed MiniLM artifacts: time, size, and whether load reproduces the model.

For each example recipe: compile (with calibration), `fxcook.save`, `fxcook.load` (rebuild from config,
restore-mode passes, strict state load, manifest check), then the outputs of the loaded model against
the compiled one on held-out lines. Load must cost less than compile (no recalibration) and reproduce it.
Usage: python benchmarks/artifact.py [--recipes int8 int8_24 moe]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import fxcook
from fxcook.data import calibration_for, shakespeare_lines
from fxcook.models import example_batch, load_model

RECIPES = Path(__file__).resolve().parents[1] / "fxcook" / "recipes"


def row(name: str, model, tok, batch) -> dict:
    recipe = fxcook.load_recipe(RECIPES / f"{name}.yaml")
    t0 = time.perf_counter()
    calibration = calibration_for(recipe, tok)
    cooked = fxcook.compile(model, recipe.build(calibration=calibration), example_inputs=calibration[0])
    compiled = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "artifact"
        t0 = time.perf_counter()
        fxcook.save(cooked, out)
        saved = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        t0 = time.perf_counter()
        loaded = fxcook.load(out)
        load_s = time.perf_counter() - t0
    with torch.no_grad():
        diff = (cooked(**batch).last_hidden_state - loaded(**batch).last_hidden_state).abs().max().item()
    return {
        "recipe": name,
        "compile_s": compiled,
        "save_s": saved,
        "load_s": load_s,
        "mb": size / 1e6,
        "max_diff": diff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["int8", "int8_24", "moe"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model("minilm")
    batch = example_batch(tok, shakespeare_lines(n=16, seed=99), max_length=64)
    print(
        f"{'recipe':10} {'compile s':>10} {'save s':>8} {'load s':>8} {'load/compile':>13} {'MB':>7} {'max|diff|':>10}"
    )
    for name in args.recipes:
        r = row(name, model, tok, batch)
        print(
            f"{r['recipe']:10} {r['compile_s']:10.2f} {r['save_s']:8.2f} {r['load_s']:8.2f} "
            f"{r['load_s'] / r['compile_s']:13.2f} {r['mb']:7.1f} {r['max_diff']:10.2e}"
        )


if __name__ == "__main__":
    main()
