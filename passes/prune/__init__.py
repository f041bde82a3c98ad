"""Structured pruning: gates over heads, FFN units and whole sublayers (`Prune`, by importance or L0),
then physical slicing (`Slice`)."""

from __future__ import annotations

from fxcook.passes.prune.gates import Gate
from fxcook.passes.prune.importance import head_importance
from fxcook.passes.prune.l0 import ExpectedSize, HardConcrete, L0Regulariser, Lagrangian, SizeTerm
from fxcook.passes.prune.prune import Prune, fix_gates
from fxcook.passes.prune.slicing import Slice

__all__ = [
    "ExpectedSize",
    "Gate",
    "HardConcrete",
    "L0Regulariser",
    "Lagrangian",
    "Prune",
    "SizeTerm",
    "Slice",
    "fix_gates",
    "head_importance",
]
