"""The `fxcook` command: inspect, compress, train, demo."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

INSPECT_SENTENCES = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be: that is the question."]


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
        print(f"  {s.path:56} {str(tuple(w.shape)):14} {w.numel():>10,}")
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


def calibration_for(recipe, tokenizer):
    from .data import lines_from, token_batches

    cal = recipe.calibration
    return token_batches(tokenizer, lines_from(cal.data, cal.samples, cal.seed), cal.batch_size, cal.max_length)


def cmd_compress(args) -> int:
    from . import compile
    from .checkpoint import save_compressed
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    model, tok, batch = _load(args.model)
    calibration = calibration_for(recipe, tok)
    cooked = compile(model, recipe.build(calibration=calibration), example_inputs=calibration[0])
    out = Path(args.out)
    save_compressed(cooked, out, recipe=Path(args.recipe))
    print(cooked.report(per_layer=args.per_layer))
    if args.onnx:
        from fxcook.runtime import onnx as onnx_rt

        onnx_rt.export(cooked, out / "model.onnx", example_inputs=batch)
        print(f"wrote {out / 'model.onnx'}")
    print(f"wrote {out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run

    run(samples=args.samples, distill=not args.no_distill, onnx=not args.no_onnx)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxcook", description="Compress transformer models with FX graph passes.")
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="list compressible sites, parameter counts and activated size")
    ins.add_argument("model", help="'minilm', a local HF directory, or a hub id (where a hub is reachable)")
    ins.add_argument("--per-layer", action="store_true")
    ins.set_defaults(func=cmd_inspect)
    com = sub.add_parser("compress", help="apply a recipe and save the compressed model")
    com.add_argument("--model", default="minilm")
    com.add_argument("--recipe", required=True)
    com.add_argument("--out", required=True)
    com.add_argument("--onnx", action="store_true", help="also export model.onnx")
    com.add_argument("--per-layer", action="store_true")
    com.set_defaults(func=cmd_compress)
    demo = sub.add_parser("demo", help="compress the embedded MiniLM with every technique and report")
    demo.add_argument("--samples", type=int, default=256, help="held-out Shakespeare lines for fidelity")
    demo.add_argument("--no-distill", action="store_true", help="skip the short recovery distillation")
    demo.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime export and timing")
    demo.set_defaults(func=cmd_demo)
    from . import trainer

    tr = sub.add_parser("train", help="train a compressed model (QAT, masks, distillation) on FSDP2")
    trainer.add_arguments(tr)
    tr.set_defaults(func=trainer.main)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import FxcookError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FxcookError as e:
        print(f"fxcook: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
