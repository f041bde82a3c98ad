"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse


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
