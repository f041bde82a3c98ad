"""Structured pruning: gates over heads, FFN units, hidden dims and whole sublayers."""

from __future__ import annotations

from fxcook.passes.prune.l0 import ExpectedSize, HardConcrete, L0Regulariser, Lagrangian, SizeTerm

__all__ = ["ExpectedSize", "HardConcrete", "L0Regulariser", "Lagrangian", "SizeTerm"]
