"""Structured pruning of MiniLM on CPU, side by side in one process: the dense fxcook fp32 ONNX export
against `Prune(method="importance")` + `Slice()` at several targets (fraction of block weights removed),
one-shot and after a short distillation from the fp32 model, the baseline of removing whole sublayers
(`granularity=("mha", "ffn_layer")`) to the same size, and int8 (`fxcook/recipes/int8.yaml`) on top of
the pruned model vs int8 alone. int8 here is the quantization of `fxcook/recipes/int8.yaml` without its
sensitivity search (weights int8/channel, activations int8/tensor/dynamic, SmoothQuant 0.8, int8
embeddings), which costs minutes per model on a busy CPU; `--int8-recipe` runs the full recipe instead.

Latency: ONNX Runtime at batch 8 x 128 and batch 1 x 32, rounds interleaved across the variants; the
ratio to the dense fp32 export is the median of the per-round ratios. Fidelity: min/mean cosine of
mean-pooled sentence embeddings vs fp32 torch over held-out Shakespeare lines (calibration and
distillation use other lines).

    python benchmarks/prune_minilm.py [--targets 0.3 0.5 0.7] [--distill-steps 100]
        [--rounds 20]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import fxcook  # noqa: E402
from fxcook.data import calibration_for, shakespeare_lines, token_batches  # noqa: E402
from fxcook.evaluate import embed, fidelity  # noqa: E402
from fxcook.models import load_model  # noqa: E402
from fxcook.passes import Prune, Quantize, Slice  # noqa: E402
from fxcook.recipe import load_recipe  # noqa: E402
from fxcook.report import block_weights, parameter_count  # noqa: E402
from fxcook.runtime import onnx as fxonnx  # noqa: E402
from fxcook.training.loop import train  # noqa: E402
from fxcook.training.losses import DistillLoss  # noqa: E402

SHAPES = {"b8x128": (8, 128), "b1x32": (1, 32)}
INT8 = dict(weights="int8/channel", acts="int8/tensor/dynamic", smoothquant=0.8, embeddings=True)


def distill(cooked, teacher, tok, lines, steps, lr, batch_size):
    t0 = time.perf_counter()
    train(
        cooked,
        teacher=teacher,
        data=lines,
        tokenizer=tok,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        max_length=128,
        loss=DistillLoss(hidden_mse=1.0, hidden_cos=1.0),
        progress=False,
    )
    print(f"  distilled {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    return cooked.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--distill-steps", type=int, default=100)
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--calib", type=int, default=64, help="calibration lines for the importance scores")
    ap.add_argument("--samples", type=int, default=256, help="held-out lines for fidelity")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--int8-recipe", default=None, help="a recipe for the int8 step (default: see the docstring)")
    ap.add_argument("--out", default="benchmarks/results/prune_minilm.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model("minilm")
    n_train = args.distill_steps * args.batch_size
    lines = shakespeare_lines(args.calib + args.samples + n_train, seed=0)
    calib = token_batches(tok, lines[: args.calib], 16)
    held = lines[args.calib : args.calib + args.samples]
    train_lines = lines[args.calib + args.samples :]
    example = calib[0]
    tmp = Path(tempfile.mkdtemp(prefix="fxcook-prune-"))
    dense = fxcook.compile(model, [], example_inputs=example)
    dense_weights = block_weights(dense)
    if args.int8_recipe:
        recipe = load_recipe(args.int8_recipe)
        int8_passes = lambda: recipe.build(calibration=calibration_for(recipe, tok))  # noqa: E731
    else:
        int8_passes = lambda: [Quantize(calibration=calib, **INT8)]  # noqa: E731
    int8 = lambda cooked: fxcook.apply(cooked, int8_passes())  # noqa: E731

    variants = {"dense fp32": dense, "dense int8": int8(copy.deepcopy(dense))}
    for t in args.targets:
        t0 = time.perf_counter()
        pruned = fxcook.compile(model, [Prune(target=t, calibration=calib), Slice()], example_inputs=example)
        print(f"prune {t}: {time.perf_counter() - t0:.0f} s", flush=True)
        variants[f"heads+ffn {t:.0%} one-shot"] = pruned
        if args.distill_steps:
            tuned = distill(
                copy.deepcopy(pruned), model, tok, train_lines, args.distill_steps, args.distill_lr, args.batch_size
            )
            variants[f"heads+ffn {t:.0%} + distill {args.distill_steps}"] = tuned
            if t == 0.5:
                variants[f"heads+ffn {t:.0%} + distill {args.distill_steps} + int8"] = int8(copy.deepcopy(tuned))
        if t == 0.5:
            layers = fxcook.compile(
                model, [Prune(target=t, granularity=("mha", "ffn_layer"), calibration=calib), Slice()], example
            )
            variants[f"whole sublayers {t:.0%} one-shot"] = layers
            if args.distill_steps:
                tuned = distill(
                    copy.deepcopy(layers), model, tok, train_lines, args.distill_steps, args.distill_lr, args.batch_size
                )
                variants[f"whole sublayers {t:.0%} + distill {args.distill_steps}"] = tuned

    files, rows = {}, {}
    ref = embed(model, tok, held)
    for i, (name, cooked) in enumerate(variants.items()):
        files[name] = fxonnx.export(cooked, tmp / f"v{i}.onnx", example_inputs=example)
        rows[name] = {
            **fidelity(ref, embed(fxonnx.OrtModel(files[name], args.threads), tok, held)),
            "removed": 1 - block_weights(cooked) / dense_weights,
            "params": parameter_count(cooked),
            "mb": sum(f.stat().st_size for f in files[name].parent.glob(files[name].name + "*")) / 1e6,
        }
        print(f"{name}: {rows[name]}", flush=True)

    runners = {name: fxonnx.OrtModel(path, args.threads) for name, path in files.items()}
    timing = {
        shape: dict(tok(held[:b], padding="max_length", truncation=True, max_length=s, return_tensors="pt"))
        for shape, (b, s) in SHAPES.items()
    }
    times = {shape: {name: [] for name in runners} for shape in SHAPES}
    for r in range(args.rounds + 1):
        for shape, batch in timing.items():
            for name, run in runners.items():
                feeds = run.feeds(**batch)
                t0 = time.perf_counter()
                run.session.run(None, feeds)
                if r:  # round 0 warms up
                    times[shape][name].append((time.perf_counter() - t0) * 1e3)

    def speedup(shape, name, base="dense fp32"):
        return statistics.median(b / t for b, t in zip(times[shape][base], times[shape][name]))

    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    out = [
        f"# Structured pruning of MiniLM on CPU (ONNX Runtime, {args.threads} threads)",
        "",
        f"Command: `{cmd}`",
        "",
        f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}; a shared machine "
        f"(other jobs running), so speed is the median of per-round ratios over {args.rounds} interleaved rounds. "
        f"Importance from {args.calib} calibration lines (loss 'output'); distillation: DistillLoss(hidden_mse=1, "
        f"hidden_cos=1) from the fp32 model, batch {args.batch_size}, lr {args.distill_lr:g}, cosine schedule, "
        f"{len(train_lines)} training lines; fidelity over {len(held)} held-out lines (all three sets disjoint).",
        "",
        "| variant | block weights removed | params | file MB | min cos | mean cos | b8x128 ms | speed-up b8x128 "
        "| b1x32 ms | speed-up b1x32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        ms = {s: statistics.median(times[s][name]) for s in SHAPES}
        out.append(
            f"| {name} | {row['removed']:.2f} | {row['params'] / 1e6:.2f}M | {row['mb']:.1f} | {row['min_cos']:.4f} "
            f"| {row['mean_cos']:.4f} | {ms['b8x128']:.1f} | {speedup('b8x128', name):.2f}x | {ms['b1x32']:.2f} "
            f"| {speedup('b1x32', name):.2f}x |"
        )
    int8_rows = [n for n in rows if n.endswith("+ int8")]
    for name in int8_rows:
        out.append("")
        out.append(
            f"{name} vs int8 alone: {speedup('b8x128', name, 'dense int8'):.2f}x at b8x128, "
            f"{speedup('b1x32', name, 'dense int8'):.2f}x at b1x32."
        )
    text = "\n".join(out) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
