"""2:4 and int8 on a CUDA GPU: dense vs 2:4 linear throughput, and whole models, the full curve.

Sections (all printed, full tables written to --out):
  1. device and ceilings: device-to-device copy bandwidth, dense bf16 and int8 GEMM rates;
  2. GEMM sweep, M in 16..16384, K, N in 1024..8192: bf16 dense (cuBLAS) vs bf16 2:4 (cuSPARSELt,
     CUTLASS), and the int8 layer (per-token quantize + GEMM + rescale) dense vs 2:4;
  3. whole models at batch 1..256: MiniLM (seq 128) and one Llama-7B-config decoder block
     (seq 1 = decode-shaped and seq 128 = prefill-shaped), dense / 2:4 / int8 / int8+2:4 via
     fxcook.runtime.torch_cuda.lower.

Method: every variant is checked against a float64 reference on fresh random data before it is
timed; times are medians of CUDA-event timings of CUDA-graph replays (Python dispatch excluded) over
input sets rotated so that weights do not sit in L2, after warm-up. Whole models are timed eagerly
(what a caller sees, Python overhead included) and, where the model captures, as graph replays.
Ratios are dense time / 2:4 time (> 1 means 2:4 is faster); slowdowns are kept.

    python benchmarks/sparse24_gpu.py --out benchmarks/results            # full run
    python benchmarks/sparse24_gpu.py --quick                             # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fxcook.tracing import main_output

L2_BYTES = 64 << 20  # rotate input sets until the working set is several times any current L2


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - ref).norm() / ref.norm().clamp(min=1e-30))


def time_graph(fns: list, reps: int = 20, warmup: int = 3) -> tuple[float, str]:
    """Median milliseconds of one call, from CUDA-graph replays of all `fns` in sequence (each once)."""
    for _ in range(warmup):
        for f in fns:
            f()
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for f in fns:
                f()
        run, how = graph.replay, "graph"
    except Exception:  # a callable that cannot be captured is timed eagerly, and says so
        torch.cuda.synchronize()

        def run():
            for f in fns:
                f()

        how = "eager"
    run()
    return _median_ms(run, reps) / len(fns), how


def time_eager(fn, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    return _median_ms(fn, reps)


def _median_ms(run, reps: int) -> float:
    """Median CUDA-event time of `run()` over `reps` calls (the caller has warmed it up)."""
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def device_info() -> dict:
    p = torch.cuda.get_device_properties(0)
    info = {
        "device": p.name,
        "sm": f"{p.major}.{p.minor}",
        "memory_gib": round(p.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,
    }
    return info


def ceilings() -> dict:
    """Measured ceilings: D2D copy GB/s (read + write), bf16 and int8 GEMM rate at 8192^3."""
    src = torch.randn(1 << 28, device="cuda", dtype=torch.float16)  # 512 MiB
    dst = torch.empty_like(src)
    ms, _ = time_graph([lambda: dst.copy_(src)])  # noqa: F821 (ruff misreads the later del)
    out = {"copy_GBps": 2 * src.numel() * 2 / ms / 1e6}
    del src, dst
    n = 8192
    a, b = (
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
    )
    ms, _ = time_graph([lambda: torch.mm(a, b)])
    out["bf16_TFLOPs"] = 2 * n**3 / ms / 1e9
    ai, bi = (
        torch.randint(-127, 128, (n, n), device="cuda", dtype=torch.int8),
        torch.randint(-127, 128, (n, n), device="cuda", dtype=torch.int8),
    )
    ms, _ = time_graph([lambda: torch._int_mm(ai, bi.t())])
    out["int8_TOPs"] = 2 * n**3 / ms / 1e9
    return out


def _w24(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    from fxcook.passes.sparsify.masks import m4n2_1d

    w = torch.randn(n, k, device="cuda", generator=gen) / math.sqrt(k)
    return w * m4n2_1d(w)


def gemm_sweep(ms: list[int], ks: list[int], ns: list[int], backends: list[str], reps: int) -> list[dict]:
    from fxcook.runtime import torch_cuda as TC

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    total = len(ms) * len(ks) * len(ns)
    done = 0
    for k in ks:
        for n in ns:
            for m in ms:
                done += 1
                per_set = (m * k + n * k + m * n) * 2
                sets = max(1, min(32, math.ceil(4 * L2_BYTES / per_set)))
                ws = [_w24(n, k, gen) for _ in range(sets)]
                xs = [torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(sets)]
                wb = [w.to(torch.bfloat16) for w in ws]
                row = {"M": m, "K": k, "N": n, "flop": 2 * m * n * k}
                ref = F.linear(xs[0].double(), wb[0].double())
                # bf16 dense: cuBLAS on the same (2:4-masked) weights
                row["bf16_dense_err"] = _rel(F.linear(xs[0], wb[0]), ref)
                row["bf16_dense_ms"], _ = time_graph([lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, wb)], reps)
                for be in backends:
                    reason = TC.sparse24_reason(wb[0], torch.bfloat16, be)
                    if reason:
                        row[f"bf16_{be}_note"] = reason
                        continue
                    mods = [TC.Sparse24Linear(w, None, be) for w in wb]
                    row[f"bf16_{be}_err"] = _rel(mods[0](xs[0]), ref)
                    row[f"bf16_{be}_ms"], row[f"bf16_{be}_how"] = time_graph(
                        [lambda x=x, mod=mod: mod(x) for x, mod in zip(xs, mods)], reps
                    )
                    del mods
                # int8 layer: per-token quantize + int8 GEMM + rescale, dense vs 2:4
                i8 = [TC.Int8Linear(w) for w in ws]
                ref_i8 = i8[0](xs[0]).double()
                row["int8_dense_err"] = _rel(ref_i8, ref)
                row["int8_dense_ms"], row["int8_dense_how"] = time_graph(
                    [lambda x=x, mod=mod: mod(x) for x, mod in zip(xs, i8)], reps
                )
                del i8
                for be in backends:
                    reason = TC.sparse24_reason(ws[0], torch.int8, be)
                    if reason:
                        row[f"int8_{be}_note"] = reason
                        continue
                    mods = [TC.Int8Sparse24Linear(w, None, be) for w in ws]
                    row[f"int8_{be}_err"] = _rel(mods[0](xs[0]), ref_i8)
                    row[f"int8_{be}_ms"], row[f"int8_{be}_how"] = time_graph(
                        [lambda x=x, mod=mod: mod(x) for x, mod in zip(xs, mods)], reps
                    )
                    del mods
                for key in [c for c in row if c.endswith("_err")]:
                    limit = 2e-2 if key.startswith("bf16") else 6e-2
                    if not row[key] <= limit:
                        raise SystemExit(
                            f"M={m} K={k} N={n}: {key}={row[key]:.3g} exceeds {limit}; stop before timing wrong code"
                        )
                rows.append(row)
                best = {be: row.get(f"bf16_{be}_ms") for be in backends}
                print(
                    f"[{done}/{total}] M={m:5d} K={k:4d} N={n:4d} bf16 dense {row['bf16_dense_ms'] * 1e3:8.1f} us  "
                    + "  ".join(f"{be} {row['bf16_dense_ms'] / v:5.2f}x" for be, v in best.items() if v)
                    + f"  int8 dense {row['int8_dense_ms'] * 1e3:8.1f} us  "
                    + "  ".join(
                        f"int8+{be} {row['int8_dense_ms'] / row[f'int8_{be}_ms']:5.2f}x"
                        for be in backends
                        if f"int8_{be}_ms" in row
                    ),
                    flush=True,
                )
                del ws, xs, wb
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- whole models


def _cooked_variants(model, example):
    """CookedModels: dense, 2:4 (m4n2_1d on every block linear), int8, int8 + 2:4 (CPU capture)."""
    import fxcook
    from fxcook.passes.quantize import Quantize
    from fxcook.passes.sparsify import Sparsify

    return {
        "dense": fxcook.compile(model, [], example_inputs=example),
        "2:4": fxcook.compile(model, [Sparsify(method="m4n2_1d")], example_inputs=example),
        "int8": fxcook.compile(model, [Quantize(weights="int8/channel", acts="int8/token")], example_inputs=example),
        "int8+2:4": fxcook.compile(
            model,
            [Sparsify(method="m4n2_1d"), Quantize(weights="int8/channel", acts="int8/token")],
            example_inputs=example,
        ),
    }


def model_curve(name: str, model, make_inputs, batches: list[int], backend: str, reps: int) -> list[dict]:
    from fxcook.runtime.torch_cuda import lower

    example = make_inputs(2, "cpu")
    cooked = _cooked_variants(model, example)
    lowered, plans = {}, {}
    for key, c in cooked.items():
        low = lower(
            c,
            dtype=torch.bfloat16,
            device="cuda",
            backend=backend,
            sparse=key.endswith("2:4"),
            int8="auto" if key.startswith("int8") else False,
        )
        lowered[key] = low.model.eval()
        plans[key] = {k: low.count(k) for k in ("dense", "2:4", "int8", "int8+2:4")}
        print(f"{name} {key}: kernels {plans[key]}", flush=True)
        if key.endswith("2:4") and low.count(key) == 0:
            print(low.table(), flush=True)
    rows = []
    for b in batches:
        inputs = make_inputs(b, "cuda")
        row = {"model": name, "batch": b}
        with torch.no_grad():
            for key, m in lowered.items():
                if b == batches[0]:  # correctness first: each lowered model vs its own fp32 CookedModel on CPU
                    own = main_output(cooked[key](**{k: v.cpu() for k, v in inputs.items()}))
                    err = _rel(main_output(m(**inputs)).float().cpu(), own)
                    limit = 3e-2 if key == "dense" or key == "2:4" else 6e-2
                    print(f"{name} {key}: relative error vs fp32 {err:.2e}", flush=True)
                    if not err <= limit:
                        raise SystemExit(
                            f"{name} {key}: relative error {err:.3g} vs fp32 exceeds {limit}; not timing it"
                        )
                    row[f"{key}_err"] = err
                row[f"{key}_eager_ms"] = time_eager(lambda m=m: m(**inputs), reps)  # noqa: F821 (later del)
                row[f"{key}_graph_ms"], row[f"{key}_how"] = time_graph([lambda m=m: m(**inputs)], reps)  # noqa: F821
        rows.append(row)
        print(
            f"{name} batch {b:4d}: "
            + "  ".join(
                f"{k} {row[f'{k}_graph_ms']:.3f} ms ({row[f'{k}_how']}, dense/{k} {row['dense_graph_ms'] / row[f'{k}_graph_ms']:.2f}x)"
                for k in lowered
            ),
            flush=True,
        )
        del inputs
        torch.cuda.empty_cache()
    del lowered
    torch.cuda.empty_cache()
    return rows


def minilm_curve(batches, backend, reps, seq=128):
    from fxcook.models import load_model

    model, tok = load_model("minilm")
    vocab = tok.vocab_size

    def make(b, device):
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(1000, vocab, (b, seq), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones(b, seq, dtype=torch.long, device=device)}

    return model_curve("minilm", model, make, batches, backend, reps)


def llama_block_curve(batches, backend, reps, seq):
    """One decoder block with Llama-2-7B's shapes (hidden 4096, FFN 11008, 32 heads), random init."""
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=1024,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = tf.LlamaModel(cfg).eval()

    def make(b, device):
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(0, 1024, (b, seq), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones(b, seq, dtype=torch.long, device=device)}

    return model_curve(f"llama7b-block seq{seq}", model, make, batches, backend, reps)


# ---------------------------------------------------------------- report


def _md_gemm(rows: list[dict], backends: list[str]) -> str:
    head = [
        "M",
        "K",
        "N",
        "bf16 dense us",
        *[f"bf16 2:4 {b} us (x)" for b in backends],
        "int8 dense us",
        *[f"int8+2:4 {b} us (x)" for b in backends],
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["M"]), str(r["K"]), str(r["N"]), f"{r['bf16_dense_ms'] * 1e3:.1f}"]
        for b in backends:
            v = r.get(f"bf16_{b}_ms")
            cells.append(
                f"{v * 1e3:.1f} ({r['bf16_dense_ms'] / v:.2f}x)" if v else f"dense: {r.get(f'bf16_{b}_note', '')}"
            )
        cells.append(f"{r['int8_dense_ms'] * 1e3:.1f}")
        for b in backends:
            v = r.get(f"int8_{b}_ms")
            cells.append(
                f"{v * 1e3:.1f} ({r['int8_dense_ms'] / v:.2f}x)" if v else f"dense: {r.get(f'int8_{b}_note', '')}"
            )
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _md_models(rows: list[dict]) -> str:
    keys = ["dense", "2:4", "int8", "int8+2:4"]
    head = ["model", "batch", *[f"{k} ms graph (eager)" for k in keys], "dense/2:4", "int8/int8+2:4", "dense/int8+2:4"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], str(r["batch"])]
        cells += [
            f"{r[f'{k}_graph_ms']:.3f} ({r[f'{k}_eager_ms']:.3f})" + ("" if r[f"{k}_how"] == "graph" else " eager-only")
            for k in keys
        ]
        cells += [
            f"{r['dense_graph_ms'] / r['2:4_graph_ms']:.2f}x",
            f"{r['int8_graph_ms'] / r['int8+2:4_graph_ms']:.2f}x",
            f"{r['dense_graph_ms'] / r['int8+2:4_graph_ms']:.2f}x",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="dense vs 2:4 (and int8 vs int8+2:4) on a CUDA GPU")
    ap.add_argument("--out", default="benchmarks/results", help="folder for sparse24_gpu.md and .json")
    ap.add_argument("--quick", action="store_true", help="a few shapes and batches (smoke run)")
    ap.add_argument("--backends", nargs="+", default=["cusparselt", "cutlass"])
    ap.add_argument("--model-backend", default="cusparselt")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--skip-models", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sparse24_gpu.py needs a CUDA GPU (none is visible); nothing was measured")
    torch.backends.cuda.matmul.allow_tf32 = False
    ms = [16, 64, 256, 1024, 4096, 16384] if args.quick else [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    dims = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192]
    batches = [1, 16, 256] if args.quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]

    t0 = time.time()
    info = device_info()
    print("device:", json.dumps(info), flush=True)
    ceil = ceilings()
    print("ceilings:", json.dumps({k: round(v, 1) for k, v in ceil.items()}), flush=True)
    gemm = gemm_sweep(ms, dims, dims, args.backends, args.reps)
    models = []
    if not args.skip_models:
        models += minilm_curve(batches, args.model_backend, args.reps)
        for seq in (1, 128):
            models += llama_block_curve(batches, args.model_backend, args.reps, seq)

    cmd = "python benchmarks/sparse24_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = [
        "# 2:4 sparsity and int8 on GPU: dense vs sparse, the full curve",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Device: {info['device']} (sm {info['sm']}, {info['memory_gib']} GiB), torch {info['torch']}, CUDA {info['cuda']}, "
        f"cuSPARSELt {info['cusparselt']}.  ",
        f"Measured ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 GEMM {ceil['bf16_TFLOPs']:.0f} TFLOP/s, "
        f"int8 GEMM {ceil['int8_TOPs']:.0f} TOP/s (8192^3).  ",
        "Times: medians of CUDA-graph replays over rotated input sets (weights not L2-resident). x = dense time / 2:4 time "
        "(> 1: 2:4 faster). bf16 rows are the GEMM alone (`F.linear` without bias; 2:4 through "
        "`to_sparse_semi_structured`); int8 rows are the whole int8 layer (per-token quantize, GEMM, rescale), "
        "dense `torch._int_mm` vs 2:4. Every variant was checked against a float64 reference first.",
        "",
        "## Linear layers",
        "",
        _md_gemm(gemm, args.backends),
        "",
    ]
    if models:
        text += [
            "## Whole models (bf16, seq as named; graph replay ms, eager ms in brackets)",
            "",
            _md_models(models),
            "",
        ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sparse24_gpu.md").write_text("\n".join(text))
    (out / "sparse24_gpu.json").write_text(
        json.dumps({"device": info, "ceilings": ceil, "gemm": gemm, "models": models}, indent=1)
    )
    print("\n".join(text[-12:]))
    print(f"wrote {out / 'sparse24_gpu.md'} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
