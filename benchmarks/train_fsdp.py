"""Trainer benchmark: FSDP2 on 2 CPU ranks vs 1 process, and the recovery curve of a 2:4+int8 MiniLM.

1. Scaling: distill the 2:4 + int8 MiniLM student (fxcook/recipes/int8_24.yaml) from the fp32
   teacher at equal global batch, once in one process (2 threads) and once on 2 gloo ranks
   (1 thread each). Reports the median step time and each rank's parameter + AdamW state bytes.
2. Recovery: a short distillation run (hidden-state MSE + cosine on every block) on Shakespeare
   lines, with min/mean cosine vs the fp32 model on held-out lines at intervals; step 0 is the
   one-shot compressed model.

Writes benchmarks/results/train_fsdp.md.

    python benchmarks/train_fsdp.py [--scale-steps 6 --steps 120 --eval-every 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "train_fsdp.md"
RECIPE = ROOT / "fxcook" / "recipes" / "int8_24.yaml"


def _setup(max_length: int):
    from fxcook.data import calibration_for, lines_from
    from fxcook.models import load_model
    from fxcook.pipeline import compile
    from fxcook.recipe import load_recipe
    from fxcook.training.losses import DistillLoss

    teacher, tok = load_model("minilm")
    recipe = load_recipe(str(RECIPE))
    calibration = calibration_for(recipe, tok)
    student = compile(teacher, recipe.build(calibration=calibration), calibration[0])
    lines = lines_from("shakespeare")
    held_out, train_lines = lines[-128:], lines[:-128]
    return student, teacher, tok, train_lines, held_out, DistillLoss(hidden_mse=1.0, hidden_cos=1.0)


def _scale_run(rank: int, world: int, args, tmp: str) -> dict:
    from fxcook.training.loop import train

    student, teacher, tok, lines, _, loss = _setup(args.max_length)
    res = train(
        student,
        teacher,
        lines,
        loss,
        tokenizer=tok,
        steps=args.scale_steps,
        batch_size=args.batch,
        lr=args.lr,
        max_length=args.max_length,
        progress=False,
        fsdp=world > 1,
    )
    secs = [r["sec"] for r in res.log if "sec" in r]
    return {
        "rank": rank,
        "world": world,
        "step_s": statistics.median(secs[1:]),
        "losses": res.losses,
        "param_bytes": res.param_bytes,
        "optim_bytes": res.optim_bytes,
    }


def _worker(rank: int, world: int, args, tmp: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    out = _scale_run(rank, world, args, tmp)
    with open(f"{tmp}/rank{rank}.json", "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def _recovery(args) -> list[dict]:
    from fxcook.evaluate import embed, fidelity
    from fxcook.training.loop import train

    student, teacher, tok, lines, held_out, loss = _setup(args.max_length)
    with torch.no_grad():
        ref = embed(teacher, tok, held_out)

    def evaluate(step, model):
        with torch.no_grad():
            return fidelity(ref, embed(model, tok, held_out))

    res = train(
        student,
        teacher,
        lines,
        loss,
        tokenizer=tok,
        steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        warmup=args.steps // 10,
        max_length=args.max_length,
        callback=evaluate,
        eval_every=args.eval_every,
    )
    return [r for r in res.log if "mean_cos" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale-steps", type=int, default=6)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--skip-recovery", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    single = _scale_run(0, 1, args, "")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, args, tmp), nprocs=2, join=True)
        ranks = [json.load(open(f"{tmp}/rank{r}.json")) for r in range(2)]
    mib = 2**20
    s_mem = single["param_bytes"] + single["optim_bytes"]
    lines = [
        "# Trainer: FSDP2 on 2 CPU ranks vs 1 process; recovery of a 2:4 + int8 MiniLM",
        "",
        f"Command: `python benchmarks/train_fsdp.py --scale-steps {args.scale_steps} --steps {args.steps} "
        f"--eval-every {args.eval_every} --batch {args.batch} --max-length {args.max_length} --lr {args.lr}`",
        "",
        f"## Scaling (global batch {args.batch} x <= {args.max_length} tokens, student = fxcook/recipes/int8_24.yaml, "
        "teacher = fp32 MiniLM, loss = hidden MSE + cosine on all 6 blocks)",
        "",
        "| run | threads/rank | step time (s, median) | params / rank (MiB) | AdamW state / rank (MiB) | params+optimizer vs 1 process |",
        "|---|---|---|---|---|---|",
        f"| 1 process | 2 | {single['step_s']:.3f} | {single['param_bytes'] / mib:.1f} | {single['optim_bytes'] / mib:.1f} | 1.00x |",
    ]
    for r in ranks:
        mem = r["param_bytes"] + r["optim_bytes"]
        lines.append(
            f"| 2 ranks, rank {r['rank']} | 1 | {r['step_s']:.3f} | {r['param_bytes'] / mib:.1f} | "
            f"{r['optim_bytes'] / mib:.1f} | {mem / s_mem:.2f}x |"
        )
    step_ratio = max(r["step_s"] for r in ranks) / single["step_s"]
    diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ranks[0]["losses"], single["losses"])]
    lines += [
        "",
        f"2-rank step time / 1-process step time: **{step_ratio:.2f}x**; relative loss difference "
        f"between the runs per step: {', '.join(f'{d:.1e}' for d in diffs)} (step 1 is before any update; "
        "later steps include fake-quant rounding flips caused by reduction-order differences).",
        "",
    ]
    if not args.skip_recovery:
        curve = _recovery(args)
        lines += [
            f"## Recovery ({args.steps} steps, batch {args.batch}, lr {args.lr}, 1 process; 128 held-out lines)",
            "",
            "| step | min cos vs fp32 | mean cos vs fp32 |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r['step']}{' (one-shot)' if r['step'] == 0 else ''} | {r['min_cos']:.4f} | {r['mean_cos']:.4f} |"
            for r in curve
        ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
