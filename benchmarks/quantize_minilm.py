"""int8 MiniLM on CPU, side by side in one process: torch fp32 eager, ONNX Runtime fp32, ORT's own
`quantize_dynamic` (per-channel and per-tensor weights) of the model as `torch.onnx.export` writes it
(the reference: ORT per-channel = 1.00), the same tool applied to fxcook's fp32 export (whose attention
translation drops a NaN guard, fxcook.runtime.onnx.translations.attention), and fxcook's int8 ONNX models: per-token
activations (MatMulIntegerToFloat), per-tensor dynamic activations (DynamicQuantizeMatMul) with
SmoothQuant off and on the FFN down-projections, and the model `fxcook compress --recipe
fxcook/recipes/int8.yaml` builds (per-token only on the inputs measured most sensitive).
With --qat-steps, also the per-tensor dynamic model after a short quantization-aware distillation from
fp32 (fxcook.training.loop.train, DistillLoss hidden_mse + hidden_cos) on Shakespeare lines disjoint from both
the calibration and the held-out lines, one variant per (steps, lr) pair.

Latency: batch 8 x sequence 128 (padded), 2 threads, rounds interleaved across the variants so
machine load hits all of them alike; the median per variant is reported with its ratio to torch, and
the time relative to ORT per-channel as the median (and quartiles) of the per-round ratios.
Fidelity: min/mean cosine of mean-pooled sentence embeddings vs fp32 torch over held-out
Shakespeare lines (calibration uses other lines).

    python benchmarks/quantize_minilm.py [--rounds 20] [--samples 256] [--smoothquant 0.5]
        [--dynamic-smoothquant 0.8] [--recipe fxcook/recipes/int8.yaml] [--out benchmarks/results/quantize_minilm.md]
        [--qat-steps 50 100] [--qat-lr 1e-5 3e-5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import fxcook  # noqa: E402
from fxcook.data import (  # noqa: E402
    calibration_for,  # noqa: E402
    shakespeare_lines,
    token_batches,
)
from fxcook.evaluate import embed, fidelity  # noqa: E402
from fxcook.models import load_model  # noqa: E402
from fxcook.passes import Quantize  # noqa: E402
from fxcook.recipe import load_recipe  # noqa: E402
from fxcook.runtime import onnx as fxonnx  # noqa: E402


def standard_export(model, batch: dict, path: Path) -> None:
    """The ONNX Runtime user's path: `torch.onnx.export` of the HF model itself (stock translations),
    batch and sequence dynamic; the peers quantize this file."""
    from torch.export import Dim

    torch.onnx.export(
        model,
        (),
        str(path),
        kwargs=dict(batch),
        dynamo=True,
        opset_version=20,
        dynamic_shapes={k: {0: Dim.AUTO, 1: Dim.AUTO} for k in batch},
        optimize=True,
    )


def _onnx_bytes(path: Path) -> int:
    """The model's bytes on disk, external weight data (`<name>.data`) included."""
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--samples", type=int, default=256, help="held-out lines for fidelity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoothquant", type=float, default=0.5, help="SmoothQuant alpha for per-token acts")
    ap.add_argument(
        "--dynamic-smoothquant", type=float, default=0.8, help="SmoothQuant alpha for per-tensor dynamic acts"
    )
    ap.add_argument("--recipe", default="fxcook/recipes/int8.yaml", help="the recipe `fxcook compress` applies")
    ap.add_argument(
        "--qat-steps",
        type=int,
        nargs="*",
        default=[],
        help="QAT-distill the a/tensor/dynamic model for these step counts (one variant each)",
    )
    ap.add_argument("--qat-lr", type=float, nargs="+", default=[3e-5], help="peak learning rates for --qat-steps")
    ap.add_argument("--qat-batch-size", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/quantize_minilm.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, tok = load_model("minilm")
    n_eval = 64 + args.samples
    n_train = max(args.qat_steps, default=0) * args.qat_batch_size
    lines = shakespeare_lines(n_eval + n_train, seed=0)
    lines, train_lines = lines[:n_eval], lines[n_eval:]  # training lines: disjoint from calibration and held-out
    calib, held = token_batches(tok, lines[:64], 16), lines[64:]
    timing = dict(tok(lines[64:72], padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
    tmp = Path(tempfile.mkdtemp(prefix="fxcook-bench-"))

    standard_export(model, calib[0], tmp / "fp32.onnx")
    fxonnx.export(fxcook.compile(model, [], example_inputs=calib[0]), tmp / "fx_fp32.onnx", example_inputs=calib[0])
    for src, dst, per_channel in [("fp32", "ort_pc", True), ("fp32", "ort_pt", False), ("fx_fp32", "fx_ort_pc", True)]:
        quantize_dynamic(
            str(tmp / f"{src}.onnx"), str(tmp / f"{dst}.onnx"), per_channel=per_channel, weight_type=QuantType.QInt8
        )
    dyn = dict(acts="int8/tensor/dynamic", smoothquant=args.dynamic_smoothquant)
    recipes = {
        "fxcook int8 (w/channel, a/token)": dict(),
        f"fxcook int8 a/token + SmoothQuant {args.smoothquant}": dict(smoothquant=args.smoothquant),
        f"fxcook int8 a/tensor/dynamic + SmoothQuant {args.dynamic_smoothquant} (down-projections too)": dict(
            dyn, smooth_down_proj=True
        ),
        f"fxcook int8 a/tensor/dynamic + SmoothQuant {args.dynamic_smoothquant}": dyn,
    }
    recipe = load_recipe(args.recipe)
    recipe_name = f"fxcook compress {args.recipe}"
    recipes[recipe_name] = recipe
    qat = {}
    for steps in args.qat_steps:
        for lr in args.qat_lr:
            name = (
                f"fxcook int8 a/tensor/dynamic + SmoothQuant {args.dynamic_smoothquant} "
                f"+ QAT distill {steps} steps lr {lr:g}"
            )
            recipes[name] = dict(dyn, smooth_down_proj=True)  # as fxcook/recipes/int8_qat.yaml
            qat[name] = dict(steps=steps, lr=lr)
    for i, (name, kw) in enumerate(recipes.items()):
        passes = (
            kw.build(calibration=calibration_for(kw, tok))
            if name == recipe_name
            else [Quantize(calibration=calib, **kw)]
        )
        cooked = fxcook.compile(model, passes, example_inputs=calib[0])
        if name in qat:
            from fxcook.training.loop import train
            from fxcook.training.losses import DistillLoss

            t0 = time.perf_counter()
            train(
                cooked,
                teacher=model,
                data=train_lines,
                tokenizer=tok,
                batch_size=args.qat_batch_size,
                max_length=128,
                loss=DistillLoss(hidden_mse=1.0, hidden_cos=1.0),
                progress=False,
                **qat[name],
            )
            cooked.eval()
            print(f"{name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
        fxonnx.export(cooked, tmp / f"fx{i}.onnx", example_inputs=calib[0])

    files = {
        "ORT fp32": tmp / "fp32.onnx",
        "ORT quantize_dynamic per-channel": tmp / "ort_pc.onnx",
        "ORT quantize_dynamic per-tensor": tmp / "ort_pt.onnx",
        "ORT fp32, fxcook's export": tmp / "fx_fp32.onnx",
        "ORT quantize_dynamic per-channel of fxcook's fp32 export": tmp / "fx_ort_pc.onnx",
        **{name: tmp / f"fx{i}.onnx" for i, name in enumerate(recipes)},
    }
    runners = {"torch fp32 eager": model, **{k: fxonnx.OrtModel(p, args.threads) for k, p in files.items()}}
    ref = embed(model, tok, held)
    rows = {}
    for name, run in runners.items():
        rows[name] = fidelity(ref, embed(run, tok, held))
        if name in files:
            rows[name]["gemms"] = fxonnx.integer_gemms(files[name])
        print(f"{name}: {rows[name]}", flush=True)

    times = {k: [] for k in runners}
    with torch.inference_mode():
        for r in range(args.rounds + 1):
            for name, run in runners.items():
                t0 = time.perf_counter()
                if isinstance(run, fxonnx.OrtModel):
                    run.session.run(None, run.feeds(**timing))
                else:
                    run(**timing)
                if r:  # round 0 warms up
                    times[name].append((time.perf_counter() - t0) * 1e3)
    base = statistics.median(times["torch fp32 eager"])
    ref_pc = times["ORT quantize_dynamic per-channel"]
    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    out = [
        f"# int8 MiniLM on CPU (batch 8 x seq 128, {args.threads} threads)",
        "",
        f"Command: `{cmd}`",
        "",
        f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, "
        f"{args.rounds} interleaved rounds (median), fidelity over {len(held)} held-out Shakespeare lines."
        + (
            f" QAT: batch {args.qat_batch_size}, cosine schedule, DistillLoss(hidden_mse=1, hidden_cos=1), "
            f"{len(train_lines)} training lines disjoint from calibration and held-out."
            if qat
            else ""
        ),
        "",
        "| variant | median ms | speedup vs torch | time vs ORT per-channel (quartiles) | min cos | mean cos "
        "| integer GEMMs | file MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in runners:
        med = statistics.median(times[name])
        size = f"{_onnx_bytes(files[name]) / 1e6:.1f}" if name in files else "-"
        gemms = rows[name].get("gemms", "-")
        q1, ratio, q3 = statistics.quantiles([t / r for t, r in zip(times[name], ref_pc)], n=4)
        out.append(
            f"| {name} | {med:.1f} | {base / med:.2f}x | {ratio:.3f} ({q1:.2f}-{q3:.2f}) | "
            f"{rows[name]['min_cos']:.4f} | {rows[name]['mean_cos']:.4f} | {gemms} | {size} |"
        )
    text = "\n".join(out) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
