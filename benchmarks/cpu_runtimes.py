"""MiniLM on CPU runtimes, side by side in one process: torch fp32 eager, ONNX Runtime fp32 and its
`quantize_dynamic`, OpenVINO (its default bf16 and f32) of the model as `torch.onnx.export` writes it,
NNCF post-training quantization -> OpenVINO int8 (the path sentence-transformers ships as
"openvino-qint8"), and fxcook's models: int8 per-token (dynamic) activations in ONNX Runtime and
in OpenVINO (fxcook.runtime.openvino), int8 with static per-tensor activations (FakeQuantize) in
OpenVINO, the int8 + 2:4 and MoE recipes in OpenVINO, and fxcook's int8 weights with OpenVINO's own
dynamic activation quantization. (fxcook's int8.yaml recipe uses per-tensor dynamic activations,
which have no exact OpenVINO lowering; its ONNX Runtime numbers: benchmarks/quantize_minilm.py.)

Speed: per shape (batch x sequence, padded), rounds interleaved across the variants so machine load
hits all of them alike; reported: median ms, and the median of per-round time ratios to torch fp32
and to NNCF's model (quartiles in brackets). Fidelity: min / mean cosine of mean-pooled sentence
embeddings vs fp32 torch over held-out Shakespeare lines (calibration uses other lines).
Per-layer profile (OpenVINO's PERF_COUNT) of NNCF's model, fxcook's fastest and fxcook's per-token model, 8 x 128.

    python benchmarks/cpu_runtimes.py [--rounds 10] [--samples 256] [--calibration 300] [--fx-calibration 64]
        [--threads 2] [--shapes 8x128 1x32 32x128] [--sensitive 0] [--skip-moe]
        [--out benchmarks/results/cpu_runtimes.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from quantize_minilm import _onnx_bytes, standard_export  # noqa: E402

import fxcook  # noqa: E402
from fxcook.data import calibration_for, shakespeare_lines, token_batches  # noqa: E402
from fxcook.evaluate import embed, fidelity  # noqa: E402
from fxcook.models import load_model  # noqa: E402
from fxcook.passes import Quantize  # noqa: E402
from fxcook.recipe import load_recipe  # noqa: E402
from fxcook.runtime import onnx as fxonnx  # noqa: E402
from fxcook.runtime import openvino as fxov  # noqa: E402

STATIC = dict(acts="int8/tensor", smoothquant=0.5, observer="mse")
TOKEN = dict(acts="int8/token", smoothquant=0.5)
NNCF = "NNCF PTQ (TRANSFORMER) -> OpenVINO int8"


def nncf_model(fp32_onnx: Path, lines: list[str], tok, subset: int):
    """NNCF's post-training quantization of the OpenVINO model, calibrated on `lines` one sentence each."""
    import nncf
    import openvino as ov

    items = [
        {k: v.numpy() for k, v in tok([s], truncation=True, max_length=128, return_tensors="pt").items()} for s in lines
    ]
    return nncf.quantize(
        ov.convert_model(str(fp32_onnx)), nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=subset
    )


def ir_bytes(model, path: Path) -> int:
    """The IR's size on disk (.xml + .bin)."""
    fxov.save(model, path)
    return path.stat().st_size + path.with_suffix(".bin").stat().st_size


def fxcook_models(model, tok, calib: list[dict], sensitive: int, skip_moe: bool) -> dict:
    """fxcook's compressed models by row name: (cooked, runtime), runtime 'ort' or an OpenVINO plugin config."""
    compile_ = lambda passes: fxcook.compile(model, passes, example_inputs=calib[0])
    token = compile_([Quantize(calibration=calib, **TOKEN)])
    out = {
        "fxcook int8 a/token + SmoothQuant 0.5 in ONNX Runtime": (token, "ort"),
        "fxcook int8 a/token + SmoothQuant 0.5 in OpenVINO": (token, {}),
        "fxcook int8 a/tensor static (SmoothQuant 0.5, MSE ranges) in OpenVINO": (
            compile_([Quantize(calibration=calib, **STATIC)]),
            {},
        ),
    }
    if sensitive:
        out[f"fxcook int8 a/tensor static, {sensitive} most sensitive inputs per token, in OpenVINO"] = (
            compile_([Quantize(calibration=calib, sensitive_inputs=sensitive, sensitive_acts="int8/token", **STATIC)]),
            {},
        )
    out["fxcook int8 weights + OpenVINO's own dynamic activations (group 32)"] = (
        compile_([Quantize(acts=None)]),
        {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 32},
    )
    for name in ("int8_24",) + (() if skip_moe else ("moe",)):
        r = load_recipe(name)
        out[f"fxcook {name}.yaml in OpenVINO"] = (compile_(r.build(calibration=calibration_for(r, tok))), {})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--samples", type=int, default=256, help="held-out lines for fidelity")
    ap.add_argument("--calibration", type=int, default=300, help="NNCF's calibration lines")
    ap.add_argument("--fx-calibration", type=int, default=64, help="fxcook's calibration lines (its recipes' 64)")
    ap.add_argument("--sensitive", type=int, default=0, help="also a static row with N per-token inputs (slow search)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=["8x128", "1x32", "32x128"])
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/cpu_runtimes.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, tok = load_model("minilm")
    lines = shakespeare_lines(args.calibration + args.samples + 64, seed=0)
    calib_lines, held, timing_lines = (
        lines[: args.calibration],
        lines[args.calibration : args.calibration + args.samples],
        lines[-64:],
    )
    calib = token_batches(tok, calib_lines[: args.fx_calibration], 16)
    tmp = Path(tempfile.mkdtemp(prefix="fxcook-cpu-"))
    standard_export(model, calib[0], tmp / "fp32.onnx")
    quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / "ort_pc.onnx"), per_channel=True, weight_type=QuantType.QInt8)

    import openvino as ov

    runners = {"torch fp32 eager": model}
    sizes = {
        "ORT fp32": _onnx_bytes(tmp / "fp32.onnx"),
        "ORT quantize_dynamic per-channel": _onnx_bytes(tmp / "ort_pc.onnx"),
    }
    runners["ORT fp32"] = fxonnx.OrtModel(tmp / "fp32.onnx", args.threads)
    runners["ORT quantize_dynamic per-channel"] = fxonnx.OrtModel(tmp / "ort_pc.onnx", args.threads)
    fp32_ov = ov.convert_model(str(tmp / "fp32.onnx"))
    sizes["OpenVINO default (bf16)"] = sizes["OpenVINO f32"] = ir_bytes(fp32_ov, tmp / "ov_fp32.xml")
    sources = {}  # OpenVINO rows: (model, plugin config), for the profile
    runners["OpenVINO default (bf16)"] = fxov.OvModel(fp32_ov, threads=args.threads)
    runners["OpenVINO f32"] = fxov.OvModel(fp32_ov, precision="f32", threads=args.threads)
    t0 = time.perf_counter()
    nncf_ov = nncf_model(tmp / "fp32.onnx", calib_lines, tok, args.calibration)
    print(f"NNCF PTQ: {time.perf_counter() - t0:.0f} s", flush=True)
    sizes[NNCF] = ir_bytes(nncf_ov, tmp / "nncf.xml")
    runners[NNCF], sources[NNCF] = fxov.OvModel(nncf_ov, threads=args.threads), (nncf_ov, {})
    for i, (name, (cooked, where)) in enumerate(
        fxcook_models(model, tok, calib, args.sensitive, args.skip_moe).items()
    ):
        if where == "ort":
            path = fxonnx.export(cooked, tmp / f"fx{i}.onnx", example_inputs=calib[0])
            sizes[name], runners[name] = _onnx_bytes(path), fxonnx.OrtModel(path, args.threads)
        else:
            ov_model = fxov.convert(cooked, calib[0])
            sizes[name] = ir_bytes(ov_model, tmp / f"fx{i}.xml")
            runners[name] = fxov.OvModel(ov_model, threads=args.threads, config=where)
            sources[name] = (ov_model, where)
        print(f"built {name}", flush=True)

    ref = embed(model, tok, held)
    rows = {}
    for name, run in runners.items():
        rows[name] = fidelity(ref, embed(run, tok, held))
        rows[name]["int8"] = run.int8_gemms() if isinstance(run, fxov.OvModel) else "-"
        print(f"{name}: {rows[name]}", flush=True)

    times = {}
    for shape in args.shapes:
        b, s = (int(v) for v in shape.split("x"))
        enc = dict(
            tok((timing_lines * 2)[:b], padding="max_length", truncation=True, max_length=s, return_tensors="pt")
        )
        calls = {name: _timed_call(run, enc) for name, run in runners.items()}
        times[shape] = _interleaved(calls, args.rounds)
        print(f"timed {shape}", flush=True)

    profile = _profiles(sources, times.get("8x128"), tok, timing_lines, args.threads)
    text = _report(args, argv, rows, sizes, times, profile, len(held))
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


def _timed_call(run, enc: dict):
    """A no-argument call of `run` on `enc` with the inputs prepared once (no conversion inside the timing)."""
    if isinstance(run, fxonnx.OrtModel):
        feeds = run.feeds(**enc)
        return lambda: run.session.run(None, feeds)
    if isinstance(run, fxov.OvModel):
        feeds = run.feeds(**enc)
        return lambda: run.request.infer(feeds)
    return lambda: run(**enc)


def _interleaved(calls: dict, rounds: int) -> dict[str, list[float]]:
    """Milliseconds per call, `rounds` rounds each running every variant once (round 0 warms up)."""
    out = defaultdict(list)
    with torch.inference_mode():
        for r in range(rounds + 1):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                if r:
                    out[name].append((time.perf_counter() - t0) * 1e3)
    return out


def _ratio(times: list[float], ref: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios ref / times (a speedup: > 1 is faster than ref)."""
    q1, med, q3 = statistics.quantiles([r / t for t, r in zip(times, ref)], n=4)
    return med, q1, q3


def _profiles(sources: dict, times: dict | None, tok, lines: list[str], threads: int) -> dict[str, list]:
    """Per layer type and kernel, total ms of one 8 x 128 inference: NNCF's model, fxcook's fastest and
    fxcook's per-token model (where the dynamic quantization's time goes)."""
    fx = [n for n in sources if n != NNCF]
    if times is None or not fx:
        return {}
    fastest = min(fx, key=lambda n: statistics.median(times[n]))
    enc = dict(tok((lines * 2)[:8], padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
    out = {}
    token = "fxcook int8 a/token + SmoothQuant 0.5 in OpenVINO"
    for name in dict.fromkeys((NNCF, fastest, token)):
        model, config = sources[name]
        run = fxov.OvModel(model, threads=threads, config=config, profile=True)
        feeds = run.feeds(**enc)
        for _ in range(3):
            run.request.infer(feeds)
        totals = defaultdict(float)
        for kind, exec_type, _, ms in fxov.layer_profile(run.request, top=10_000):
            totals[(kind, exec_type)] += ms
        out[name] = sorted(totals.items(), key=lambda kv: -kv[1])[:8]
    return out


def _report(args, argv, rows, sizes, times, profile, n_held) -> str:
    import openvino as ov

    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    out = [
        f"# MiniLM on CPU runtimes ({args.threads} threads)",
        "",
        f"Command: `{cmd}`",
        "",
        f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, openvino "
        f"{ov.__version__.split('-')[0]}, nncf {__import__('nncf').__version__}; {args.rounds} interleaved rounds per "
        f"shape; fidelity over {n_held} held-out Shakespeare lines; {args.calibration} calibration lines for NNCF, "
        f"{args.fx_calibration} for fxcook's models (the recipes calibrate as they say). The machine (AMD EPYC, AVX-512 VNNI + "
        "BF16, 2 cores) was shared with other work while this ran: absolute ms are noisy, the per-round ratios "
        "less so.",
        "",
        "| variant | min cos | mean cos | int8 GEMMs | size MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        size = f"{sizes[name] / 1e6:.1f}" if name in sizes else "-"
        out.append(f"| {name} | {row['min_cos']:.4f} | {row['mean_cos']:.4f} | {row['int8']} | {size} |")
    for shape, t in times.items():
        out += [
            "",
            f"## batch x sequence {shape}",
            "",
            "| variant | median ms | speedup vs torch (quartiles) | speed vs NNCF (quartiles) |",
            "|---|---:|---:|---:|",
        ]
        for name in rows:
            m, q1, q3 = _ratio(t[name], t["torch fp32 eager"])
            n, n1, n3 = _ratio(t[name], t[NNCF])
            out.append(
                f"| {name} | {statistics.median(t[name]):.1f} | {m:.2f}x ({q1:.2f}-{q3:.2f}) | "
                f"{n:.2f} ({n1:.2f}-{n3:.2f}) |"
            )
    for name, layers in profile.items():
        out += [
            "",
            f"## OpenVINO per-layer profile, 8 x 128: {name}",
            "",
            "| layer type | kernel | ms |",
            "|---|---|---:|",
        ]
        out += [f"| {kind} | {exec_type} | {ms:.1f} |" for (kind, exec_type), ms in layers]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
