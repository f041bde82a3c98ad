"""MoEfication benchmark: routed-expert FFN latency vs the dense FFN, and MiniLM fidelity.

Part 1 (speed): an FFN-heavy random layer (hidden 1024, inter 4096, ReLU), dense vs MoEFFN with
50% and 25% of the experts active (learned MLP router), timed side by side in one process in
torch on CPU and in ONNX Runtime (dense MatMul graph vs com.microsoft.MoE).
Part 2 (quality): MiniLM + Relufy + Moefy (50% experts, MLP router) + a short distillation against
the fp32 original; mean/min embedding cosine vs fp32 and router recall, before and after.

    python benchmarks/moefy.py [--threads 2,1] [--steps 300] [--skip-minilm] [--out benchmarks/results/moefy.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from fxcook.nn import CookedLinear
from fxcook.passes.moefy.partition import balanced_kmeans
from fxcook.passes.moefy.routed import MoEFFN


class DenseFFN(nn.Module):
    def __init__(self, up: CookedLinear, down: CookedLinear):
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


def _interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Best-of-`reps` seconds per callable, calling them round-robin so that load from other
    processes hits every config alike (min, not median: contention only ever adds time)."""
    for fn in fns.values():
        fn(), fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}


def _export(module: nn.Module, x: torch.Tensor, path: Path) -> Path:
    from fxcook.runtime.onnx import export

    return export(module, path, x)


def speed(hidden: int, inter: int, tokens: int, experts: int, reps: int, threads: int) -> list[dict]:
    from fxcook.runtime.onnx import session

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    up = CookedLinear(torch.randn(inter, hidden) / hidden**0.5, torch.randn(inter) * 0.1)
    down = CookedLinear(torch.randn(hidden, inter) / inter**0.5, torch.randn(hidden) * 0.1)
    dense = DenseFFN(up, down).eval()
    labels = balanced_kmeans(F.normalize(up.weight.detach(), dim=1), experts, iters=3)
    x = torch.randn(tokens, hidden)
    fns = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        dense_sess = session(_export(dense, x, Path(tmp) / "dense.onnx"), threads=threads)
        feed = {dense_sess.get_inputs()[0].name: x.numpy()}
        fns["torch dense"] = lambda: dense(x)
        fns["ort dense"] = lambda: dense_sess.run(None, feed)
        configs = [("dense FFN", 1.0, "dense")]
        for frac in (0.5, 0.25):
            k = max(1, int(experts * frac))
            moe = MoEFFN(up, down, "relu", labels, experts, k, router="mlp").eval()
            path = _export(moe, x, Path(tmp) / f"moe{k}.onnx")
            ops = {n.op_type for n in onnx.load(str(path)).graph.node}
            if "MoE" not in ops:
                raise RuntimeError(f"exported MoE graph has no com.microsoft.MoE node: {sorted(ops)}")
            sess = session(path, threads=threads)
            fns[f"torch {k}"] = lambda moe=moe: moe(x)
            fns[f"ort {k}"] = lambda sess=sess: sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
            configs.append((f"MoE {experts} experts, top-{k}", k / experts, str(k)))
        best = _interleaved(fns, reps)
    rows = []
    for label, active, key in configs:
        t, o = best[f"torch {key}"], best[f"ort {key}"]
        rows.append(
            {
                "threads": threads,
                "config": label,
                "active": active,
                "torch_ms": t * 1e3,
                "ort_ms": o * 1e3,
                "torch_x": best["torch dense"] / t,
                "ort_x": best["ort dense"] / o,
            }
        )
    return rows


def minilm(experts: int, top_k: int, steps: int, sentences: int, lr: float) -> dict:
    """Relufy + Moefy on MiniLM; fidelity and recall before and after a short distillation."""
    import fxcook
    from fxcook.data import shakespeare_lines
    from fxcook.evaluate import embed, fidelity
    from fxcook.models import example_batch, load_model
    from fxcook.passes import Moefy, Relufy

    model, tok = load_model("minilm")
    lines = shakespeare_lines(sentences * 3, seed=0)
    calib_lines, train_lines, eval_lines = lines[:sentences], lines[sentences : 2 * sentences], lines[2 * sentences :]
    calib = [example_batch(tok, calib_lines[i : i + 32], max_length=64) for i in range(0, len(calib_lines), 32)]
    ref = embed(model, tok, eval_lines)
    out: dict = {"experts": experts, "top_k": top_k}
    relu = fxcook.compile(model, [Relufy()], example_inputs=calib[0])
    out["relufy"] = fidelity(ref, embed(relu, tok, eval_lines))
    oracle = fxcook.compile(
        model, [Relufy(), Moefy(experts=experts, top_k=top_k, router="oracle")], example_inputs=calib[0]
    )
    out["oracle"] = fidelity(ref, embed(oracle, tok, eval_lines))
    moefy = Moefy(calibration=calib, experts=experts, top_k=top_k, router="mlp")
    cooked = fxcook.compile(model, [Relufy(), moefy], example_inputs=calib[0])
    out["recall"] = statistics.mean(s["recall"] for s in moefy.stats.values())
    out["moefy"] = fidelity(ref, embed(cooked, tok, eval_lines))
    out["report"] = cooked.report()
    out["distilled"] = None
    if steps:
        fxcook.train(
            cooked,
            teacher=model,
            data=train_lines,
            tokenizer=tok,
            steps=steps,
            batch_size=16,
            lr=lr,
            warmup=steps // 10,
            max_length=64,
            loss=fxcook.DistillLoss(hidden_mse=1.0),
            progress=True,
        )
        cooked.eval()
        out["distilled"] = fidelity(ref, embed(cooked, tok, eval_lines))
        out["steps"], out["lr"] = steps, lr
    return out


def render(rows: list[dict], mini: dict | None, args, device: str) -> str:
    lines = [
        "# MoEfication benchmark",
        "",
        f"Command: `python benchmarks/moefy.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Machine: {device}; torch {torch.__version__}; the same thread count for torch and ORT.",
        "",
    ]
    if rows:
        lines += [
            f"## FFN latency (hidden {args.hidden}, inter {args.inter}, {args.tokens} tokens, ReLU, MLP router)",
            "",
            "Best of the interleaved timed calls; speed-up vs the dense FFN in the same runtime. The MoE time includes "
            "the router.",
            "",
            "| threads | config | active experts | torch CPU ms | torch speed-up | ORT ms | ORT speed-up |",
            "|---|---|---|---|---|---|---|",
        ]
    for r in rows:
        lines.append(
            f"| {r['threads']} | {r['config']} | {r['active']:.0%} | {r['torch_ms']:.2f} | {r['torch_x']:.2f}x | "
            f"{r['ort_ms']:.2f} | {r['ort_x']:.2f}x |"
        )
    if mini is not None:
        lines += [
            "",
            f"## MiniLM: Relufy + Moefy ({mini['experts']} experts, top-{mini['top_k']}, MLP router)",
            "",
            "Embedding cosine vs the fp32 original on held-out Shakespeare lines.",
            "",
            "| stage | mean cos | min cos |",
            "|---|---|---|",
        ]
        for name in ("relufy", "oracle", "moefy", "distilled"):
            if mini.get(name):
                label = {
                    "relufy": "Relufy only (no training)",
                    "oracle": "Relufy + Moefy, oracle router (no training)",
                    "moefy": "Relufy + Moefy, MLP router (no training)",
                    "distilled": f"Relufy + Moefy, MLP router + distillation ({mini.get('steps')} steps, "
                    f"batch 16, lr {mini.get('lr')}, hidden MSE)",
                }[name]
                lines.append(f"| {label} | {mini[name]['mean_cos']:.4f} | {mini[name]['min_cos']:.4f} |")
        lines += [
            "",
            f"Mean held-out router recall (share of true activation mass in the chosen experts): {mini['recall']:.3f}",
            "",
            "```",
            mini["report"],
            "```",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", default="2,1", help="comma-separated thread counts for the latency table")
    ap.add_argument("--minilm-experts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/moefy.md")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    threads = [int(t) for t in args.threads.split(",")]
    import platform

    device = f"{platform.machine()} CPU ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start)"
    rows = (
        []
        if args.skip_speed
        else [r for t in threads for r in speed(args.hidden, args.inter, args.tokens, args.experts, args.reps, t)]
    )
    for r in rows:
        print(r)
    mini = None
    if not args.skip_minilm:
        e = args.minilm_experts
        torch.set_num_threads(threads[0])
        mini = minilm(e, e // 2, args.steps, args.sentences, args.lr)
        print({k: v for k, v in mini.items() if k != "report"})
    text = render(rows, mini, args, device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
