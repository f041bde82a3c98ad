"""Structured pruning: gates over heads, FFN units and sublayers (`Prune`), then physical slicing (`Slice`)."""

from fxcook.passes.prune.gates import Gate
from fxcook.passes.prune.importance import head_importance
from fxcook.passes.prune.prune import Prune
from fxcook.passes.prune.slicing import Slice

__all__ = ["Gate", "Prune", "Slice", "head_importance"]
