"""Where the combination loses fidelity: one-shot probes on MiniLM behind the staged recipes' choices.

`sensitivity`: SparseGPT 2:4 (block by block, 1024 calibration lines) on one group of linears at a
time (all, FFN, FFN in, FFN out, attention q/k/v, q/k, attention out; all with 10x the Hessian
damping), no training: which layers the 2:4 cut hurts. `router`: MoE on the ReLU-adapted model (its
own 150-step stage, as in combo.yaml): the oracle router (true activation mass) against the trained
MLP router at 8/16/24 of 32 experts per token, the MLP router trained on more calibration tokens,
and the partition (k-means on weight rows or MoEfication's co-activation graph; 32 or 64 experts).
Fidelity is embedding cosine vs fp32 on the held-out lines of benchmarks/recovery.py.

    python benchmarks/recovery_probes.py [--probes sensitivity,router] [--held-out 128] [--threads 1]
        [--out benchmarks/results/recovery_probes.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from recovery import _split

import fxcook
from fxcook.data import lines_from, token_batches
from fxcook.evaluate import embed, fidelity
from fxcook.models import load_model
from fxcook.passes.moefy import Moefy
from fxcook.passes.sparsify import Sparsify
from fxcook.recipe import load_recipe, parse_recipe
from fxcook.report import activated_size
from fxcook.stages import run_stages

FFN_OUT = r"re:layer\.\d+\.output\.dense"  # the FFN's down projection, not attention.output.dense
GROUPS = {
    "all linears": {},
    "FFN (in + out)": {"include": ["intermediate.dense", FFN_OUT]},
    "FFN in": {"include": ["intermediate.dense"]},
    "FFN out": {"include": [FFN_OUT]},
    "attention q, k, v": {"include": ["query", "key", "value"]},
    "attention q, k": {"include": ["query", "key"]},
    "attention out": {"include": ["attention.output.dense"]},
    "all linears, damping 0.1 (not 0.01)": {},
}
RELU_STAGE = {
    "name": "relu",
    "passes": [{"relufy": {}}],
    "train": {"steps": 150, "batch_size": 16, "lr": 2.0e-4, "warmup": 15, "max_length": 64,
              "loss": {"hidden_mse": 1.0, "hidden_cos": 1.0}},
}  # fmt: skip
# (router, experts, experts per token, partition, calibration lines, router tokens per FFN, router epochs)
ROUTERS = [
    *(
        (kind, 32, k, "kmeans", 256, tokens, 10)
        for kind, tokens in (("oracle", 16384), ("mlp", 8192))
        for k in (8, 16, 24)
    ),
    ("mlp", 32, 16, "kmeans", 2048, 32768, 10),
    ("mlp", 32, 16, "kmeans", 2048, 32768, 30),
    ("mlp", 32, 16, "coactivation", 2048, 32768, 30),
    ("oracle", 32, 16, "coactivation", 2048, 32768, 30),
    ("mlp", 64, 32, "kmeans", 2048, 32768, 30),
    ("mlp", 64, 32, "coactivation", 2048, 32768, 30),
]


def _batches(tok, lines: int) -> list[dict]:
    return token_batches(tok, lines_from("shakespeare", lines, 0), 32, 64)


def sensitivity(model, tok, held, ref, example) -> list[dict]:
    cal, rows = _batches(tok, 1024), []
    for name, select in GROUPS.items():
        t = time.perf_counter()
        damp = 0.1 if "damping 0.1" in name else 0.01
        p = Sparsify(
            pattern="2:4",
            method="sparsegpt",
            sequential=True,
            calib_batches=32,
            damp=damp,
            select=select,
            calibration=cal,
        )
        m = fxcook.compile(model, [p], example_inputs=example)
        rows.append({"group": name, **fidelity(ref, embed(m, tok, held)), "seconds": time.perf_counter() - t})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def router(model, tok, held, ref, example, train_lines) -> list[dict]:
    recipe = parse_recipe(
        {"calibration": {"data": "shakespeare", "samples": 256, "batch_size": 32, "max_length": 64},
         "stages": [RELU_STAGE]}, "relu stage",
    )  # fmt: skip
    relu = run_stages(model, recipe, tok, train_lines, example_inputs=example, progress=False).model
    rows = [{"router": "(ReLU model, dense FFN)", **fidelity(ref, embed(relu, tok, held))}]
    print(json.dumps(rows[-1]), flush=True)
    for kind, experts, k, method, lines, tokens, epochs in ROUTERS:
        t = time.perf_counter()
        p = Moefy(experts=experts, top_k=k, method=method, router=kind, epochs=epochs, max_tokens=tokens,
                  calib_batches=lines // 32, calibration=_batches(tok, lines))  # fmt: skip
        m = fxcook.apply(copy.deepcopy(relu), [p])
        recall = sum(s["recall"] for s in p.stats.values()) / len(p.stats) if kind == "mlp" else 1.0
        rows.append({"router": kind, "experts": experts, "top_k": k, "method": method, "lines": lines,
                     "tokens": tokens, "epochs": epochs, "recall": recall, "activated": activated_size(m),
                     **fidelity(ref, embed(m, tok, held)), "seconds": time.perf_counter() - t})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _markdown(results: dict, held: int, started: float) -> str:
    out = [
        "# Recovery probes: where the combination loses fidelity (MiniLM, one-shot)",
        "",
        f"Command: `python benchmarks/recovery_probes.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} torch thread(s) of a {os.cpu_count()}-core "
        f"machine shared with other work; torch {torch.__version__}. Total wall time "
        f"{(time.perf_counter() - started) / 60:.1f} min. Fidelity: embedding cosine vs fp32 on {held} held-out "
        "Shakespeare lines (those of benchmarks/recovery.py: no calibration set or training run contains them).",
        "",
    ]
    if "sensitivity" in results:
        out += ["## SparseGPT 2:4 on one group of linears (no training)", "",
                "| group | mean cos | min cos | seconds |", "|---|--:|--:|--:|"]  # fmt: skip
        out += [
            f"| {r['group']} | {r['mean_cos']:.4f} | {r['min_cos']:.4f} | {r['seconds']:.0f} |"
            for r in results["sensitivity"]
        ]
        out.append("")
    if "router" in results:
        out += ["## MoE on the ReLU-adapted model (no training)", "",
                "| router | experts | per token | partition | calibration lines | router tokens per FFN | epochs | "
                "held-out recall | activated (M) | mean cos | min cos |",
                "|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
        for r in results["router"]:
            if "top_k" not in r:
                out.append(f"| {r['router']} | | | | | | | | | {r['mean_cos']:.4f} | {r['min_cos']:.4f} |")
                continue
            out.append(f"| {r['router']} | {r['experts']} | {r['top_k']} | {r['method']} | {r['lines']} | {r['tokens']} | "
                       f"{r['epochs']} | {r['recall']:.3f} | {r['activated'] / 1e6:.3f} | {r['mean_cos']:.4f} | "
                       f"{r['min_cos']:.4f} |")  # fmt: skip
        out.append("")
    out += ["Raw rows (JSON):", "", "```json", json.dumps(results, indent=1, default=float), "```", ""]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--probes", default="sensitivity,router")
    p.add_argument("--held-out", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/recovery_probes.md")
    args = p.parse_args()
    probes = args.probes.split(",")
    if unknown := set(probes) - {"sensitivity", "router"}:
        p.error(f"unknown probes {sorted(unknown)}; choose from sensitivity, router")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tok = load_model("minilm")
    held, train_lines = _split([load_recipe("combo")], args.held_out)
    ref = embed(model, tok, held)
    example = dict(tok(held[:2], padding=True, return_tensors="pt"))
    results = {}
    for probe in probes:
        if probe == "sensitivity":
            results[probe] = sensitivity(model, tok, held, ref, example)
        else:
            results[probe] = router(model, tok, held, ref, example, train_lines)
        Path(args.out).write_text(_markdown(results, len(held), started))


if __name__ == "__main__":
    main()
