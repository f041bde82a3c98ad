"""int8 MiniLM on CPU, side by side in one process: torch fp32 eager, ONNX Runtime fp32, ORT's own
`quantize_dynamic` (per-channel and per-tensor weights), and fxcook's int8 ONNX models: per-token
activations (MatMulIntegerToFloat), per-tensor dynamic activations (DynamicQuantizeMatMul), and the
mixed scheme (per-token only on the layers measured most sensitive, per-tensor dynamic elsewhere).
With --qat-steps, also the per-tensor dynamic model after a short quantization-aware distillation from
fp32 (fxcook.trainer.train, DistillLoss hidden_mse + hidden_cos) on Shakespeare lines disjoint from both
the calibration and the held-out lines, one variant per (steps, lr) pair.

Latency: batch 8 x sequence 128 (padded), 2 threads, rounds interleaved across the variants so
machine load hits all of them alike; the median per variant is reported with its ratio to torch.
Fidelity: min/mean cosine of mean-pooled sentence embeddings vs fp32 torch over held-out
Shakespeare lines (calibration uses other lines).

    python benchmarks/quantize_minilm.py [--rounds 20] [--samples 256] [--smoothquant 0.5]
        [--dynamic-smoothquant 0.8] [--sensitive-layers 12] [--out benchmarks/results/quantize_minilm.md]
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
from fxcook.data import shakespeare_lines, token_batches  # noqa: E402
from fxcook.evaluate import embed, fidelity  # noqa: E402
from fxcook.models import load_model  # noqa: E402
from fxcook.passes import Quantize  # noqa: E402
from fxcook.runtime import onnx as fxonnx  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--samples", type=int, default=256, help="held-out lines for fidelity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoothquant", type=float, default=0.5, help="SmoothQuant alpha for per-token acts")
    ap.add_argument("--dynamic-smoothquant", type=float, default=0.8, help="SmoothQuant alpha for per-tensor dynamic acts")
    ap.add_argument("--sensitive-layers", type=int, default=12, help="per-token layers in the mixed scheme")
    ap.add_argument("--qat-steps", type=int, nargs="*", default=[],
                    help="QAT-distill the a/tensor/dynamic model for these step counts (one variant each)")
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

    fp32 = fxcook.compile(model, [], example_inputs=calib[0])
    fxonnx.export(fp32, tmp / "fp32.onnx", example_inputs=calib[0])
    quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / "ort_pc.onnx"), per_channel=True, weight_type=QuantType.QInt8)
    quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / "ort_pt.onnx"), per_channel=False, weight_type=QuantType.QInt8)
    recipes = {"fxcook int8 (w/channel, a/token)": dict(),
               f"fxcook int8 a/token + SmoothQuant {args.smoothquant}": dict(smoothquant=args.smoothquant),
               f"fxcook int8 a/tensor/dynamic + SmoothQuant {args.dynamic_smoothquant}":
                   dict(acts="int8/tensor/dynamic", smoothquant=args.dynamic_smoothquant),
               f"fxcook int8 mixed ({args.sensitive_layers} sensitive a/token) + SmoothQuant {args.dynamic_smoothquant}":
                   dict(acts="int8/tensor/dynamic", smoothquant=args.dynamic_smoothquant,
                        sensitive_layers=args.sensitive_layers)}
    qat = {}
    for steps in args.qat_steps:
        for lr in args.qat_lr:
            name = (f"fxcook int8 a/tensor/dynamic + SmoothQuant {args.dynamic_smoothquant} "
                    f"+ QAT distill {steps} steps lr {lr:g}")
            recipes[name] = dict(acts="int8/tensor/dynamic", smoothquant=args.dynamic_smoothquant)
            qat[name] = dict(steps=steps, lr=lr)
    for i, (name, kw) in enumerate(recipes.items()):
        cooked = fxcook.compile(model, [Quantize(calibration=calib, **kw)], example_inputs=calib[0])
        if name in qat:
            from fxcook.distill import DistillLoss
            from fxcook.trainer import train

            t0 = time.perf_counter()
            train(cooked, teacher=model, data=train_lines, tokenizer=tok, batch_size=args.qat_batch_size,
                  max_length=128, loss=DistillLoss(hidden_mse=1.0, hidden_cos=1.0), progress=False, **qat[name])
            cooked.eval()
            print(f"{name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
        fxonnx.export(cooked, tmp / f"fx{i}.onnx", example_inputs=calib[0])

    files = {"ORT fp32": tmp / "fp32.onnx", "ORT quantize_dynamic per-channel": tmp / "ort_pc.onnx",
             "ORT quantize_dynamic per-tensor": tmp / "ort_pt.onnx",
             **{name: tmp / f"fx{i}.onnx" for i, name in enumerate(recipes)}}
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
    ref_pc = statistics.median(times["ORT quantize_dynamic per-channel"])
    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    out = [f"# int8 MiniLM on CPU (batch 8 x seq 128, {args.threads} threads)", "",
           f"Command: `{cmd}`", "",
           f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, "
           f"{args.rounds} interleaved rounds (median), fidelity over {len(held)} held-out Shakespeare lines."
           + (f" QAT: batch {args.qat_batch_size}, cosine schedule, DistillLoss(hidden_mse=1, hidden_cos=1), "
              f"{len(train_lines)} training lines disjoint from calibration and held-out." if qat else ""), "",
           "| variant | median ms | speedup vs torch | time vs ORT per-channel | min cos | mean cos | integer GEMMs | file MB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in runners:
        med = statistics.median(times[name])
        size = f"{files[name].stat().st_size / 1e6:.1f}" if name in files else "-"
        gemms = rows[name].get("gemms", "-")
        out.append(f"| {name} | {med:.1f} | {base / med:.2f}x | {med / ref_pc:.2f} | {rows[name]['min_cos']:.4f} | "
                   f"{rows[name]['mean_cos']:.4f} | {gemms} | {size} |")
    text = "\n".join(out) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
