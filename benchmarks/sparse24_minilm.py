"""One-shot 2:4 on MiniLM (CPU): embedding fidelity of each mask method vs the fp32 model, no retraining.

Calibration (Wanda) and evaluation use disjoint Shakespeare lines. On CPU this measures accuracy only:
no CPU 2:4 kernel exists, so the sparse model runs dense GEMMs with zeros (see sparse24_gpu.py for speed).

    python benchmarks/sparse24_minilm.py [--eval 256] [--calib 64] [--out benchmarks/results/sparse24_minilm.md]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

import fxcook
from fxcook.data import shakespeare_lines, token_batches
from fxcook.evaluate import embed, fidelity
from fxcook.models import example_batch, load_model
from fxcook.passes.quantize import Quantize
from fxcook.passes.sparsify import Sparsify

VARIANTS = [
    ("2:4 m4n2_1d (magnitude)", dict(pattern="2:4", method="m4n2_1d"), False),
    ("2:4 m4n2_2d (transposable)", dict(pattern="2:4", method="m4n2_2d"), False),
    ("2:4 wanda (one calibration pass)", dict(pattern="2:4", method="wanda"), False),
    ("2:4 wanda (block-sequential calibration)", dict(pattern="2:4", method="wanda", sequential=True), False),
    (
        "2:4 wanda, FFN linears only",
        dict(
            pattern="2:4",
            method="wanda",
            select={"include": ["intermediate.dense", "output.dense"], "exclude": ["attention.output.dense"]},
        ),
        False,
    ),
    ("unstructured 50% magnitude", dict(pattern="unstructured", method="magnitude", sparsity=0.5), False),
    ("unstructured 50% wanda", dict(pattern="unstructured", method="wanda", sparsity=0.5), False),
    ("2:4 wanda + int8 (channel w, token acts)", dict(pattern="2:4", method="wanda"), True),
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=int, default=256, help="held-out Shakespeare lines scored")
    ap.add_argument("--calib", type=int, default=64, help="Shakespeare lines for Wanda calibration")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/sparse24_minilm.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tok = load_model("minilm")
    lines = shakespeare_lines(args.eval + args.calib, seed=0)
    eval_lines, calib_lines = lines[: args.eval], lines[args.eval :]
    calibration = token_batches(tok, calib_lines, batch_size=16)
    ref = embed(model, tok, eval_lines)
    example = example_batch(tok, eval_lines[:4])

    rows = []
    for name, cfg, int8 in VARIANTS:
        t0 = time.perf_counter()
        passes = [Sparsify(calibration=calibration, **cfg)]
        if int8:
            passes.append(Quantize(weights="int8/channel", acts="int8/token"))
        cooked = fxcook.compile(model, passes, example_inputs=example).eval()
        fid = fidelity(ref, embed(cooked, tok, eval_lines))
        act = cooked.history[-1].activated
        rows.append((name, fid["min_cos"], fid["mean_cos"], act, time.perf_counter() - t0))
        print(
            f"{name:45s} min cos {fid['min_cos']:.4f}  mean cos {fid['mean_cos']:.4f}  activated {act:,.0f}", flush=True
        )

    cmd = "python benchmarks/sparse24_minilm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = [
        "# One-shot 2:4 on MiniLM (all-MiniLM-L6-v2): embedding fidelity vs fp32",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}.  ",
        f"Data: {args.eval} held-out Shakespeare lines scored, {args.calib} other lines for Wanda calibration.  ",
        "Sparsity applies to the 36 linears inside the 6 transformer blocks unless the variant says otherwise "
        "(pooler and embeddings stay dense). "
        "No retraining. CPU runs are correctness/fidelity only: no CPU 2:4 kernel exists.",
        "",
        "| variant | min cos | mean cos | activated block weights (fp32-equivalent) |",
        "|---|---|---|---|",
    ]
    text += [f"| {n} | {mn:.4f} | {me:.4f} | {a:,.0f} |" for n, mn, me, a, _ in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
