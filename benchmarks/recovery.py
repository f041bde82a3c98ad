"""Recovery benchmark: MiniLM fidelity one-shot and after each stage of the shipped staged recipes.

For each config, fidelity (min / mean embedding cosine vs the fp32 model) on held-out Shakespeare
lines that no calibration set or training run sees: one-shot (every pass of the recipe applied at
once, no training), then during and after each stage of `fxcook.stages.run_stages`, against the
training steps and seconds spent; the ONNX Runtime export of the final model is scored too. The
curve is drawn into a PNG (matplotlib, the `bench` extra).

    python benchmarks/recovery.py [--configs int8,int8_24_staged,combo] [--held-out 256] [--eval-every 50]
        [--steps N (every stage, overriding the recipes)] [--out benchmarks/results/recovery.md]
        [--plot docs/img/recovery.png]
    python benchmarks/recovery.py --plot-from benchmarks/results/recovery.md benchmarks/results/recovery_combo.md
        (redraw the plot from the JSON rows of earlier results files)
    python benchmarks/recovery.py --ablate --steps 100 --out benchmarks/results/recovery_ablation.md
        (the 2:4 stage alone on the fp32 model, one recovery choice changed at a time: ABLATIONS)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from fxcook.data import lines_from, token_batches
from fxcook.evaluate import embed, fidelity
from fxcook.models import load_model
from fxcook.pipeline import compile
from fxcook.recipe import SHIPPED, Recipe, load_recipe, parse_recipe
from fxcook.report import activated_size, block_weights
from fxcook.stages import run_stages

LOSS = {"hidden_mse": 1.0, "hidden_cos": 1.0}
SPARSEGPT = {"pattern": "2:4", "method": "sparsegpt", "sequential": True}
# one change at a time against the first row: (sparsify options, train keys, calibration keys)
ABLATIONS = {
    "wanda": ({"pattern": "2:4", "method": "wanda"}, {}, {}),
    "sparsegpt": (SPARSEGPT, {}, {}),
    "sparsegpt, lr 5e-4": (SPARSEGPT, {"lr": 5.0e-4}, {}),
    "sparsegpt, lr 1e-3": (SPARSEGPT, {"lr": 1.0e-3}, {}),
    "sparsegpt, + attention + relation": (SPARSEGPT, {"loss": {**LOSS, "attention": 1.0, "relation": 1.0}}, {}),
}


def ablation_recipes() -> dict[str, Recipe]:
    """One-stage 2:4 recipes, each differing from the first by one recovery choice."""
    out = {}
    for label, (sparsify, train, calibration) in ABLATIONS.items():
        stage_train = {"batch_size": 16, "lr": 2.0e-4, "warmup": 10, "max_length": 64, "loss": LOSS, **train}
        data = {
            "calibration": {"data": "shakespeare", "samples": 512, "batch_size": 32, "max_length": 64, **calibration},
            "stages": [{"name": "sparse", "passes": [{"sparsify": sparsify}], "train": stage_train}],
        }
        out[label] = parse_recipe(data, f"ablation {label!r}")
    return out


def _calibration_lines(recipe: Recipe) -> set[str]:
    sections = [recipe.stage_calibration(i) for i in range(len(recipe.stages))] if recipe.staged else []
    return {line for cal in [recipe.calibration, *sections] for line in lines_from(cal.data, cal.samples, cal.seed)}


def _split(recipes: list[Recipe], held: int) -> tuple[list[str], list[str]]:
    """Held-out lines (seed-1 shuffle minus every calibration line of `recipes` and of every shipped
    recipe, so runs of different configs score the same lines) and training lines (the rest)."""
    shipped = [load_recipe(p.stem) for p in sorted(SHIPPED.glob("*.yaml"))]
    seen = set().union(*(_calibration_lines(r) for r in [*recipes, *shipped]))
    lines = [line for line in lines_from("shakespeare", seed=1) if line not in seen]
    return lines[:held], lines[held : held + 20000]


def _score(model, tok, held, ref) -> dict:
    was = model.training
    model.eval()
    try:
        return fidelity(ref, embed(model, tok, held))
    finally:
        model.train(was)


def _ort(cooked, tok, held, ref) -> dict:
    from fxcook.runtime import onnx as fxonnx

    batch = dict(tok(held[:8], padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
    with tempfile.TemporaryDirectory() as d:
        ort = fxonnx.OrtModel(fxonnx.export(cooked, Path(d) / "model.onnx", example_inputs=batch), threads=2)
        return fidelity(ref, embed(ort, tok, held))


def run_config(name: str, recipe: Recipe, model, tok, held, train_lines, ref, args, base: int) -> dict:
    """One config's row; `base`: the uncompressed model's block weights, the activated size's reference."""
    example = dict(tok(held[:2], padding=True, return_tensors="pt"))
    cal = lambda c: token_batches(tok, lines_from(c.data, c.samples, c.seed), c.batch_size, c.max_length)  # noqa: E731
    oneshot = compile(model, recipe.build(calibration=cal(recipe.calibration)), example_inputs=example)
    row = {"config": name, "oneshot": _score(oneshot, tok, held, ref), "stages": [], "curve": []}
    row["activated"], row["block_weights"] = activated_size(oneshot), base
    if not recipe.staged:
        row["ort"] = _ort(oneshot, tok, held, ref)
        return row
    clock = {"steps": 0, "sec": 0.0, "t0": time.perf_counter()}

    def on_step(i, step, m):
        if step == 0:
            clock["t0"] = time.perf_counter()  # the stage's passes and calibration are not training time
            return None
        spent, t = clock["sec"] + _since(clock), time.perf_counter()
        fid = _score(m, tok, held, ref)
        clock["t0"] += time.perf_counter() - t  # evaluation is not training time
        row["curve"].append({"stage": i, "step": clock["steps"] + step, "train_s": spent, **fid})
        print(f"{name}: stage {i} step {clock['steps'] + step}, {spent:.0f} s: {fid}", file=sys.stderr, flush=True)
        return fid

    def after(i, m):
        clock["sec"] += _since(clock)
        clock["steps"] += (args.steps or recipe.stages[i].train.steps) if recipe.stages[i].train else 0
        fid = _score(m, tok, held, ref)
        row["curve"].append({"stage": i, "step": clock["steps"], "train_s": clock["sec"], **fid})
        return fid

    t0 = time.perf_counter()
    overrides = {"steps": args.steps} if args.steps else None
    run = run_stages(
        model, recipe, tok, train_lines, example_inputs=example, calibration_for=cal, overrides=overrides,
        after_stage=after, callback=on_step, eval_every=args.eval_every, progress=False,
    )  # fmt: skip
    row["wall_s"] = time.perf_counter() - t0
    row["stages"] = [{"name": s.name, "steps": s.steps, "seconds": s.seconds, **s.info} for s in run.stages]
    row["ort"] = _ort(run.model, tok, held, ref)
    return row


def _since(clock: dict) -> float:
    return time.perf_counter() - clock["t0"]


def _markdown(rows: list[dict], args, held: int, started: float) -> str:
    load = os.getloadavg()[0]
    out = [
        "# Recovery benchmark: staged recipes on MiniLM",
        "",
        f"Command: `python benchmarks/recovery.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} torch thread(s) of a {os.cpu_count()}-core "
        f"machine shared with other work (load average {load:.1f} at the end); torch {torch.__version__}. "
        "Train seconds leave out calibration and the fidelity evaluations. Total wall time "
        f"{(time.perf_counter() - started) / 60:.1f} min. Fidelity: embedding cosine vs fp32 on {held} "
        "held-out Shakespeare lines (no calibration set or training run contains them).",
        "",
        *_table(rows),
    ]
    out += ["", "Raw rows (JSON):", "", "```json", json.dumps(rows, indent=1, default=float), "```", ""]
    return "\n".join(out)


def _table(rows: list[dict]) -> list[str]:
    """Markdown rows: one-shot, after each stage, ONNX Runtime; wall minutes of the staged run."""
    out = [
        "| config | activated size | wall min | stage | steps (cum.) | train s (cum.) | mean cos | min cos |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = f"{r['activated'] / 1e6:.2f}M ({r['block_weights'] / r['activated']:.1f}x)"
        wall = f"{r['wall_s'] / 60:.1f}" if "wall_s" in r else "-"
        o = r["oneshot"]
        out.append(f"| {r['config']} | {size} | {wall} | one-shot | 0 | 0 | {o['mean_cos']:.4f} | {o['min_cos']:.4f} |")
        steps = secs = 0
        for s in r["stages"]:
            steps, secs = steps + s["steps"], secs + s["seconds"]
            fid = f"{s['mean_cos']:.4f} | {s['min_cos']:.4f}"
            out.append(f"| | | | after {s['name']} | {steps} | {secs:.0f} | {fid} |")
        ort = r["ort"]
        out.append(f"| | | | ONNX Runtime (final) | | | {ort['mean_cos']:.4f} | {ort['min_cos']:.4f} |")
    return out


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in (r for r in rows if r["curve"]):
        xs = [0.0] + [p["train_s"] / 60 for p in r["curve"]]
        (line,) = ax.plot(
            xs, [r["oneshot"]["mean_cos"]] + [p["mean_cos"] for p in r["curve"]], label=f"{r['config']} mean"
        )
        ax.plot(
            xs,
            [r["oneshot"]["min_cos"]] + [p["min_cos"] for p in r["curve"]],
            "--",
            color=line.get_color(),
            label=f"{r['config']} min",
        )
        stages = sorted({p["stage"] for p in r["curve"]})
        for k in stages[:-1]:  # a stage ends at its last curve point (the same clock as the x axis)
            ax.axvline(max(p["train_s"] for p in r["curve"] if p["stage"] == k) / 60, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(f"training time, minutes ({torch.get_num_threads()} torch thread(s), shared CPU)")
    ax.set_ylabel("cosine vs fp32 (held-out)")
    ax.set_title("MiniLM recovery, stage by stage (faint lines: stage boundaries)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _rows_from(path: Path) -> list[dict]:
    """The raw rows a results file holds (its JSON block)."""
    return json.loads(path.read_text().split("```json\n", 1)[1].split("\n```", 1)[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="int8,int8_24_staged,combo")
    p.add_argument("--held-out", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--steps", type=int, default=None, help="steps of every stage (default: the recipe's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/recovery.md")
    p.add_argument("--plot", default="docs/img/recovery.png")
    p.add_argument("--plot-from", nargs="+", type=Path, help="only redraw --plot from these results files")
    p.add_argument("--ablate", action="store_true", help="run ABLATIONS (the 2:4 stage) instead of --configs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.plot_from:
        _plot([row for path in args.plot_from for row in _rows_from(path)], Path(args.plot))
        return
    if args.plot:
        import matplotlib  # noqa: F401  (the bench extra: missing, it fails now rather than after the runs)
    started = time.perf_counter()
    model, tok = load_model("minilm")
    recipes = ablation_recipes() if args.ablate else {n: load_recipe(n) for n in args.configs.split(",")}
    held, train_lines = _split(list(recipes.values()), args.held_out)
    ref = embed(model, tok, held)
    # sizes are against the uncompressed model's block weights (a sliced or routed model stores fewer or more)
    base = block_weights(compile(model, [], example_inputs=dict(tok(held[:2], padding=True, return_tensors="pt"))))
    rows = []
    for name, recipe in recipes.items():
        rows.append(run_config(name, recipe, model, tok, held, train_lines, ref, args, base))
        Path(args.out).write_text(_markdown(rows, args, len(held), started))  # partial results survive a kill
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}, default=float), flush=True)
    if args.plot:
        _plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()
