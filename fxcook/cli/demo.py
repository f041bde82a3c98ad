"""`fxcook demo`: compress the embedded MiniLM with every technique and report."""

from __future__ import annotations


def cmd_demo(args) -> int:
    from fxcook.demo import run

    run(samples=args.samples, distill=not args.no_distill, onnx=not args.no_onnx, staged=args.staged)
    return 0
