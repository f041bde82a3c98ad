"""Capture + compile (no passes) at scale: a ~1.1B-parameter Llama config and the real MiniLM.

Each case runs in a fresh subprocess so peak RSS (ru_maxrss) belongs to that case alone.
Usage: python benchmarks/compile_scale.py [--layers 24] [--hidden 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case(kind: str, inplace: bool, layers: int, hidden: int) -> dict:
    import torch
    import transformers as tf

    import fxcook
    from fxcook.models import example_batch, load_model

    torch.set_num_threads(2)
    if kind == "minilm":
        model, tok = load_model("minilm")
        x = example_batch(tok, ["a short sentence", "another, somewhat longer sentence of text"])
    else:
        cfg = tf.LlamaConfig(
            hidden_size=hidden,
            intermediate_size=int(hidden * 2.75),
            num_hidden_layers=layers,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
            use_cache=False,
        )
        with torch.device("cpu"):
            model = tf.LlamaForCausalLM(cfg).eval()
        x = {"input_ids": torch.randint(0, 32000, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    params = sum(p.numel() for p in model.parameters())
    base = rss_mb()
    t0 = time.perf_counter()
    cooked = fxcook.compile(model, [], example_inputs=x, inplace=inplace)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        ref = model(**x)[0]
        out = cooked(**x)[0]
    return {
        "model": kind,
        "inplace": inplace,
        "params": params,
        "weight_mb": params * 4 / 2**20,
        "compile_s": round(seconds, 2),
        "rss_before_mb": round(base),
        "peak_rss_mb": round(rss_mb()),
        "max_abs_diff": float((ref - out).abs().max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        kind, inplace = args.case.split(":")
        print(json.dumps(case(kind, inplace == "1", args.layers, args.hidden)))
        return
    rows = []
    for c in ("minilm:0", "llama:0", "llama:1"):
        proc = subprocess.run(
            [sys.executable, __file__, "--case", c, "--layers", str(args.layers), "--hidden", str(args.hidden)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"case {c} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(
        f"{'model':8} {'inplace':8} {'params':>14} {'compile s':>10} {'peak RSS MB':>12} {'RSS / fp32 weights':>19} {'max|diff|':>10}"
    )
    for r in rows:
        print(
            f"{r['model']:8} {str(r['inplace']):8} {r['params']:>14,} {r['compile_s']:>10} {r['peak_rss_mb']:>12,} "
            f"{r['peak_rss_mb'] / r['weight_mb']:>19.2f} {r['max_abs_diff']:>10.2e}"
        )


if __name__ == "__main__":
    main()
