"""The `fxcook` command: inspect, compress, train, export, demo.

Output paths are checked before any long work (capture, calibration, training), so a bad `--out`
is an error naming it at once, not a traceback after minutes of compile.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .data import calibration_for
from .errors import FxcookError
from .paths import check_out_dir, check_out_file, model_dir

INSPECT_SENTENCES = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be: that is the question."]


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("fxcook")
    except PackageNotFoundError:
        return "unknown (not installed)"


def at_least(least: int):
    """An argparse type: an integer >= `least` (so `--steps 0` is a usage error, not a traceback)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}")
        return value
    return parse


# ---- commands -------------------------------------------------------------------------------------
def _load(name: str):
    from .models import example_batch, load_model

    model, tok = load_model(name)
    return model, tok, example_batch(tok, INSPECT_SENTENCES)


def cmd_inspect(args) -> int:
    from . import capture
    from .report import render

    model, _, batch = _load(args.model)
    cooked = capture(model, batch)
    print(f"model {args.model}: {type(model).__name__}")
    linears = cooked.sites.find("linear")
    print(f"linear layers: {len(linears)} ({sum(1 for s in linears if cooked.sites.block_of(s.path))} in "
          f"{len(cooked.sites.blocks)} blocks)")
    for s in linears:
        w = cooked.get_submodule(s.path).weight
        print(f"  {s.path:56} {tuple(w.shape)!s:14} {w.numel():>10,}")
    ffns = cooked.sites.find("ffn")
    print(f"FFN blocks: {len(ffns)}")
    for s in ffns:
        gate = f" * {s.info['gate']}" if s.info["gate"] else ""
        print(f"  {s.path}: {s.info['up']}{gate} -> {s.info['act_op']} -> {s.info['down']}")
    print(f"transformer blocks: {len(cooked.sites.blocks)}: {', '.join(cooked.sites.blocks)}")
    for kind in ("norm", "activation", "attention_matmul", "expert_bmm"):
        print(f"{kind} sites: {len(cooked.sites.find(kind))}")
    print(render(cooked, per_layer=args.per_layer))
    return 0


def cmd_compress(args) -> int:
    from . import compile
    from .artifact import tokenizer_extra
    from .checkpoint import save_compressed
    from .recipe import load_recipe

    out = check_out_dir(Path(args.out), "--out", source=model_dir(args.model))
    recipe = load_recipe(args.recipe)
    model, tok, batch = _load(args.model)
    calibration = calibration_for(recipe, tok, args.model)
    cooked = compile(model, recipe.build(calibration=calibration), example_inputs=calibration[0])
    extras = tokenizer_extra(tok)
    if args.onnx:  # inside the artifact, so its manifest covers it
        from fxcook.runtime import onnx as onnx_rt

        extras["model.onnx"] = lambda path: onnx_rt.export(cooked, path, example_inputs=batch)
    save_compressed(cooked, out, recipe=Path(args.recipe), extras=extras)
    print(cooked.report(per_layer=args.per_layer))
    print(f"wrote {out}" + (f" (with {out / 'model.onnx'})" if args.onnx else ""))
    return 0


def placeholder_batch(cooked) -> dict:
    """A batch shaped like the one `cooked` was captured on, from its graph's input metadata
    (ones for masks, zeros for other integer inputs): enough to trace an export."""
    import torch

    batch = {}
    for node in cooked.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            shape = [d.node.hint if isinstance(d, torch.SymInt) else d for d in val.shape]
            if any(d is None for d in shape):
                raise FxcookError(f"export: input {node.name} of the saved model has no example size")
            fill = torch.ones if "mask" in node.name else torch.zeros
            batch[node.name] = fill(shape, dtype=val.dtype)
    if not batch:
        raise FxcookError("export: the saved model's graph records no tensor inputs to trace it with")
    return batch


def cmd_export(args) -> int:
    source = Path(args.dir)
    if not source.is_dir():
        raise FxcookError(f"export: {source} is not a directory holding a saved fxcook model")
    suffix = ".onnx" if args.to == "onnx" else ".engine"
    target = check_out_file(Path(args.out) if args.out else source.with_name(source.name + suffix))
    if args.to == "tensorrt" and target.suffix == ".onnx":
        raise FxcookError(f"--out {target}: a TensorRT engine needs another suffix than .onnx (e.g. .engine), "
                          f"since the ONNX it is built from is written beside it")
    onnx_path = target if args.to == "onnx" else check_out_file(target.with_suffix(".onnx"), "ONNX file")
    from fxcook import load
    from fxcook.runtime import onnx as onnx_rt

    cooked = load(source)
    print(f"wrote {onnx_rt.export(cooked, onnx_path, example_inputs=placeholder_batch(cooked))}")
    if args.to == "tensorrt":
        from fxcook.runtime import tensorrt as trt_rt

        print(f"wrote {trt_rt.build_engine(onnx_path, target, sparse=args.sparse)}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run

    run(samples=args.samples, distill=not args.no_distill, onnx=not args.no_onnx)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxcook", description="Compress transformer models with FX graph passes.")
    p.add_argument("--version", action="version", version=f"fxcook {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    model_help = "'minilm' (embedded), a local HF directory, or a hub id (where a hub is reachable)"
    ins = sub.add_parser("inspect", help="list compressible sites, parameter counts and activated size")
    ins.add_argument("model", help=model_help)
    ins.add_argument("--per-layer", action="store_true", help="also list every layer's size")
    ins.set_defaults(func=cmd_inspect)
    com = sub.add_parser("compress", help="apply a recipe and save the compressed model")
    com.add_argument("--model", default="minilm", help=f"the model to compress: {model_help} (default minilm)")
    com.add_argument("--recipe", required=True, help="recipe YAML/JSON: the passes and their calibration data")
    com.add_argument("--out", required=True,
                     help="output directory (model.safetensors, report.txt, the recipe); not the model's own")
    com.add_argument("--onnx", action="store_true", help="also export --out/model.onnx (ONNX Runtime, integer GEMMs)")
    com.add_argument("--per-layer", action="store_true", help="report every layer, not only the totals")
    com.set_defaults(func=cmd_compress)
    exp = sub.add_parser("export", help="export a saved compressed model to ONNX or a TensorRT engine")
    exp.add_argument("dir", help="a directory written by compress, train (its model/) or fxcook.save")
    exp.add_argument("--to", required=True, choices=("onnx", "tensorrt"), help="target runtime")
    exp.add_argument("--out", help="output file (default: DIR.onnx or DIR.engine beside DIR; "
                                   "tensorrt also writes the ONNX it builds from, with suffix .onnx)")
    exp.add_argument("--sparse", action="store_true", help="tensorrt: let TensorRT use 2:4 sparse weights")
    exp.set_defaults(func=cmd_export)
    demo = sub.add_parser("demo", help="compress the embedded MiniLM with every technique and report")
    demo.add_argument("--samples", type=at_least(1), default=256, help="held-out Shakespeare lines for fidelity")
    demo.add_argument("--no-distill", action="store_true", help="skip the short recovery distillation")
    demo.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime export and timing")
    demo.set_defaults(func=cmd_demo)
    from . import trainer

    tr = sub.add_parser("train", help="train a compressed model (QAT, masks, distillation) on FSDP2")
    trainer.add_arguments(tr)
    tr.set_defaults(func=trainer.main)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FxcookError as e:
        print(f"fxcook: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"fxcook: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
