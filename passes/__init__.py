"""Compression passes, one folder per technique; `REGISTRY` maps recipe names to pass classes.

A new pass is added here by name, so the recipe keys and the CLI are listed in one place.
"""

from __future__ import annotations

from fxcook.passbase import Pass
from fxcook.passes.droplayers import DropLayers
from fxcook.passes.lora import Lora, MergeLora
from fxcook.passes.moefy import Moefy, Relufy
from fxcook.passes.prune import Prune, Slice
from fxcook.passes.quantize import Quantize
from fxcook.passes.sparsify import Sparsify
from fxcook.passes.tap import Tap

REGISTRY: dict[str, type[Pass]] = {
    cls.name: cls for cls in (Quantize, Sparsify, Relufy, Moefy, Tap, Prune, Slice, Lora, MergeLora, DropLayers)
}

__all__ = [
    "REGISTRY",
    "DropLayers",
    "Lora",
    "MergeLora",
    "Moefy",
    "Prune",
    "Quantize",
    "Relufy",
    "Slice",
    "Sparsify",
    "Tap",
]
