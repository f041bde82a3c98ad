"""`fxcook demo`: compress the embedded MiniLM with each technique and report size and fidelity.

Fidelity is the cosine between each compressed sentence embedding and the fp32 one over held-out
Shakespeare lines (calibration uses different lines).
"""
from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

STAGES: list[tuple[str, list[dict]]] = [
    ("fp32 (captured)", []),
    ("int8 (w/channel, a/token)", [{"quantize": {}}]),
    ("2:4 wanda", [{"sparsify": {"pattern": "2:4", "method": "wanda"}}]),
    ("2:4 wanda + int8", [{"sparsify": {"pattern": "2:4", "method": "wanda"}}, {"quantize": {}}]),
]


def run(samples: int = 256, onnx: bool = True, console: Console | None = None) -> list[dict]:
    from . import compile
    from .data import shakespeare_lines, token_batches
    from .evaluate import embed, fidelity
    from .models import load_model
    from .recipe import parse_recipe

    console = console or Console()
    model, tok = load_model("minilm")
    lines = shakespeare_lines(samples + 64, seed=0)
    calib, held_out = token_batches(tok, lines[:64], 16), lines[64:]
    ref = embed(model, tok, held_out)
    rows = []
    for label, passes in STAGES:
        t0 = time.perf_counter()
        recipe = parse_recipe({"passes": passes}, source=f"demo stage {label!r}")
        cooked = compile(model, recipe.build(calibration=calib), example_inputs=calib[0])
        seconds = time.perf_counter() - t0
        fid = fidelity(ref, embed(cooked, tok, held_out))
        from .report import activated_size, block_weights

        act, base = activated_size(cooked), block_weights(cooked)
        rows.append({"stage": label, "activated": act, "ratio": base / act, "seconds": seconds, **fid})
        console.rule(f"[bold]{label}")
        console.print(cooked.report())
    table = Table(title=f"fxcook demo: all-MiniLM-L6-v2, {len(held_out)} held-out Shakespeare lines")
    for col in ("stage", "activated size", "smaller", "min cos", "mean cos", "compile s"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for r in rows:
        table.add_row(r["stage"], f"{r['activated'] / 1e6:.2f}M", f"{r['ratio']:.1f}x", f"{r['min_cos']:.4f}",
                      f"{r['mean_cos']:.4f}", f"{r['seconds']:.1f}")
    console.print(table)
    return rows
