"""Pruning-Adapter on MiniLM, per offline Shakespeare task: full fine-tuning, LoRA (uniform rank),
Prune-LoRA (task-importance-pruned heads + rank-varied LoRA) and Prune-LoRA over an int8 base.

Each variant runs `fxcook.cli.adapt.adapt` in a fresh process (so its peak-RSS rise is its own),
then every exported ONNX model is timed in this process in paired rounds (median of per-round
ratios to full fine-tuning). Writes benchmarks/results/prune_lora.md and docs/img/head_importance_<task>.png.

    python benchmarks/prune_lora.py --steps 120 --probe-steps 30 --per-class 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # name -> adapt() options
    "full fine-tuning": dict(mode="full", lr=5e-5),
    "LoRA (rank 8)": dict(mode="lora", rank=8, lr=1e-3),
    "Prune-LoRA (8/4)": dict(mode="prune_lora", lr=1e-3),
    "Prune-LoRA + int8": dict(mode="prune_lora", int8=True, lr=1e-3),
}


def run_variant(task: str, options: dict, out: Path, budget: dict) -> dict:
    """`adapt` in a child process; its results.json."""
    kw = {**budget, **options, "task": task, "out": str(out), "onnx": True, "progress": False}
    code = f"from fxcook.cli.adapt import adapt; adapt(**{kw!r})"
    subprocess.run([sys.executable, "-c", code], check=True)
    return json.loads((out / "results.json").read_text())


def latencies(paths: dict[str, Path], batch: dict, rounds: int, calls: int) -> dict[str, float]:
    """Median per-round ratio of each model's time to the first's, and the first's ms per call."""
    from fxcook.runtime.onnx.session import OrtModel

    models = {k: OrtModel(p, threads=1) for k, p in paths.items()}
    for m in models.values():
        m(**batch)
    per_round = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                m(**batch)
            per_round[k].append((time.perf_counter() - t0) / calls)
    base = next(iter(models))
    out = {k: statistics.median(a / b for a, b in zip(v, per_round[base])) for k, v in per_round.items()}
    out["_ms"] = statistics.median(per_round[base]) * 1e3
    return out


def heat_map(importance: dict[str, list[float]], task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = sorted(importance, key=lambda b: int(b.rsplit(".", 1)[1]))
    fig, ax = plt.subplots(figsize=(6, 3))
    im = ax.imshow([importance[b] for b in blocks], cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(blocks)), [b.rsplit(".", 1)[1] for b in blocks])
    ax.set_xlabel("head")
    ax.set_ylabel("block")
    ax.set_title(f"MiniLM head importance, task '{task}' (task loss)")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", nargs="+", default=["genre", "play"])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--probe-steps", type=int, default=30)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--importance-batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "prune_lora.md"))
    args = p.parse_args()
    budget = dict(
        steps=args.steps,
        probe_steps=args.probe_steps,
        per_class=args.per_class,
        test_per_class=args.test_per_class,
        importance_batches=args.importance_batches,
        batch_size=args.batch_size,
    )
    from fxcook.models import load_model
    from fxcook.training.task import model_inputs
    from fxcook.training.taskdata import shakespeare_task

    _, tokenizer = load_model("minilm")
    lines = [
        "# Pruning-Adapter on MiniLM (offline Shakespeare tasks)",
        "",
        f"Command: `python benchmarks/prune_lora.py --steps {args.steps} --probe-steps {args.probe_steps} "
        f"--per-class {args.per_class} --test-per-class {args.test_per_class} --importance-batches "
        f"{args.importance_batches} --batch-size {args.batch_size} --rounds {args.rounds} --tasks {' '.join(args.tasks)}`",
        "",
        "Machine: 2 CPU cores shared with other jobs (no GPU). Budget per variant: "
        f"{args.probe_steps} head-only steps, then {args.steps} training steps of batch {args.batch_size} "
        f"(a few epochs of {4 * args.per_class} training passages); lr 5e-5 full, 1e-3 adapters, weight decay 0.01.",
        "Peak training memory: rise of the process RSS over its value at training start (sampled every 5 ms), "
        "each variant in a fresh process. ONNX Runtime latency: 1 thread, batch of 8 test passages, "
        f"median of {args.rounds} paired rounds, as a ratio to full fine-tuning.",
        "",
    ]
    for task in args.tasks:
        results, paths = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, options in VARIANTS.items():
                out = Path(tmp) / name.replace(" ", "_").replace("(", "").replace(")", "").replace("/", "_")
                results[name] = run_variant(task, options, out, budget)
                paths[name] = Path(results[name]["onnx"])
            data = shakespeare_task(task, tokenizer, 8, 8)
            lat = latencies(paths, model_inputs(data.test.batch(range(8))), args.rounds, 10)
        first = results["Prune-LoRA (8/4)"]
        heat_map(first["importance"], task, ROOT / "docs" / "img" / f"head_importance_{task}.png")
        lines += [
            f"## Task `{task}` (classes {', '.join(first['classes'])}; test {first['balance']['test']})",
            "",
            "| variant | accuracy | trainable params | peak training memory | inference params | heads pruned | ORT latency |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in results.items():
            lines.append(
                f"| {name} | {r['accuracy']:.3f} | {r['trainable_params']:,} ({r['trainable_params'] / r['total_params']:.2%}) "
                f"| {r['peak_memory_bytes'] / 2**20:.0f} MiB | {r['inference_params']:,} | {r['heads_pruned']} "
                f"| {lat[name]:.2f}x |"
            )
        lines += ["", f"Full fine-tuning ONNX latency: {lat['_ms']:.1f} ms per batch.", ""]
        scores = {b: sum(v) for b, v in first["importance"].items()}
        lines += ["Block importance (sum of normalised head importance) and the LoRA rank it got:", ""]
        lines += ["| block | importance | rank |", "|---|---|---|"]
        for b, s in scores.items():
            rank = next(r for path, r in first["ranks"].items() if path.startswith(b + "."))
            lines.append(f"| {b} | {s:.2f} | {rank} |")
        lines += ["", f"![head importance, {task}](../../docs/img/head_importance_{task}.png)", ""]
        Path(args.results).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
