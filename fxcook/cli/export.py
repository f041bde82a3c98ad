"""`fxcook export`: a saved model to ONNX, OpenVINO IR (model.xml + model.bin), a TensorRT engine or a plain
HF model directory."""

from __future__ import annotations

from pathlib import Path

from fxcook.errors import FxcookError
from fxcook.paths import check_out_file


def cmd_export(args) -> int:
    source = Path(args.dir)
    if not source.is_dir():
        raise FxcookError(f"export: {source} is not a directory holding a saved fxcook model")
    if args.to == "hf":
        return _export_hf(source, args.out)
    suffix = {"onnx": ".onnx", "openvino": ".xml", "tensorrt": ".engine"}[args.to]
    target = check_out_file(Path(args.out) if args.out else source.with_name(source.name + suffix))
    if args.to == "openvino":
        return _export_openvino(source, target)
    if args.to == "tensorrt" and target.suffix == ".onnx":
        raise FxcookError(
            f"--out {target}: a TensorRT engine needs another suffix than .onnx (e.g. .engine), "
            f"since the ONNX it is built from is written beside it"
        )
    onnx_path = target if args.to == "onnx" else check_out_file(target.with_suffix(".onnx"), "ONNX file")
    from fxcook import load
    from fxcook.runtime import onnx as onnx_rt

    cooked = load(source)
    # traced on the inputs it was captured on, so the ONNX takes what the original model was called with
    print(f"wrote {onnx_rt.export(cooked, onnx_path, example_inputs=cooked.origin.inputs)}")
    if args.to == "tensorrt":
        from fxcook.runtime import tensorrt as trt_rt

        print(f"wrote {trt_rt.build_engine(onnx_path, target, sparse=args.sparse)}")
    return 0


def _export_openvino(source: Path, target: Path) -> int:
    from fxcook import load
    from fxcook.runtime import openvino as ov_rt

    cooked = load(source)
    print(
        f"wrote {ov_rt.export(cooked, target, example_inputs=cooked.origin.inputs)} (+ {target.with_suffix('.bin').name})"
    )
    return 0


def _export_hf(source: Path, out: str | None) -> int:
    """A plain transformers model directory, verified against the saved model before it lands."""
    from fxcook.paths import check_out_dir

    target = check_out_dir(Path(out) if out else source.with_name(source.name + "-hf"), source=source)
    from fxcook import load
    from fxcook.runtime.hf import save_pretrained

    print(f"wrote {save_pretrained(load(source), target)}")
    return 0
