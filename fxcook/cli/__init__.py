"""The `fxcook` command: inspect, compress, train, export, demo.

Output paths are checked before any long work (capture, calibration, training), so a bad `--out`
is an error naming it at once, not a traceback after minutes of compile.
"""

from __future__ import annotations

import argparse
import sys

from fxcook.cli import adapt, compress, export, inspect, train
from fxcook.cli import demo as demo_cmd
from fxcook.cli.args import at_least, version
from fxcook.errors import FxcookError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxcook", description="Compress transformer models with FX graph passes.")
    p.add_argument("--version", action="version", version=f"fxcook {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    model_help = "'minilm' (embedded), a local HF directory, or a hub id (where a hub is reachable)"
    ins = sub.add_parser("inspect", help="list compressible sites, parameter counts and activated size")
    ins.add_argument("model", help=f"{model_help}, or a directory written by compress/train/fxcook.save")
    ins.add_argument("--per-layer", action="store_true", help="also list every layer's size")
    ins.add_argument(
        "--graph",
        action="store_true",
        help="print every graph, each compressed node annotated (MODEL may be a compressed directory)",
    )
    ins.set_defaults(func=inspect.cmd_inspect)
    com = sub.add_parser("compress", help="apply a recipe and save the compressed model")
    com.add_argument("--model", default="minilm", help=f"the model to compress: {model_help} (default minilm)")
    com.add_argument("--recipe", required=True, help="recipe YAML/JSON: the passes and their calibration data")
    com.add_argument(
        "--out", required=True, help="output directory (model.safetensors, report.txt, the recipe); not the model's own"
    )
    com.add_argument("--onnx", action="store_true", help="also export --out/model.onnx (ONNX Runtime, integer GEMMs)")
    com.add_argument("--per-layer", action="store_true", help="report every layer, not only the totals")
    com.set_defaults(func=compress.cmd_compress)
    exp = sub.add_parser("export", help="export a saved compressed model to ONNX, OpenVINO IR or a TensorRT engine")
    exp.add_argument("dir", help="a directory written by compress, train (its model/) or fxcook.save")
    exp.add_argument(
        "--to",
        required=True,
        choices=("onnx", "openvino", "tensorrt", "hf"),
        help="target runtime (hf: a plain transformers model directory)",
    )
    exp.add_argument(
        "--out",
        help="output file (default: DIR.onnx, DIR.xml or DIR.engine beside DIR; openvino writes its weights "
        "to the .bin beside the .xml; tensorrt also writes the ONNX it builds from, with suffix .onnx)",
    )
    exp.add_argument("--sparse", action="store_true", help="tensorrt: let TensorRT use 2:4 sparse weights")
    exp.set_defaults(func=export.cmd_export)
    demo = sub.add_parser("demo", help="compress the embedded MiniLM with every technique and report")
    demo.add_argument("--samples", type=at_least(1), default=256, help="held-out Shakespeare lines for fidelity")
    demo.add_argument("--no-distill", action="store_true", help="skip the short recovery distillation")
    demo.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime export and timing")
    demo.add_argument(
        "--staged", action="store_true", help="also run the staged combination recipe combo.yaml (~30 min on 2 cores)"
    )
    demo.set_defaults(func=demo_cmd.cmd_demo)
    tr = sub.add_parser("train", help="train a compressed model (QAT, masks, distillation) on FSDP2")
    train.add_arguments(tr)
    tr.set_defaults(func=train.main)
    ad = sub.add_parser(
        "adapt", help="task-oriented head pruning + rank-varied LoRA (Pruning-Adapter), merged and saved"
    )
    adapt.add_arguments(ad)
    ad.set_defaults(func=adapt.main)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; a rank of a torchrun group leaves through `exit_distributed` (see there why)."""
    from fxcook.training.distributed import exit_distributed

    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
    except FxcookError as e:
        print(f"fxcook: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt as e:
        print(f"fxcook: {str(e) or 'interrupted'}", file=sys.stderr)
        code = 130
    return exit_distributed(code)


if __name__ == "__main__":
    sys.exit(main())
