"""Sparsity: the Sparsify pass and its mask schedule (`sparsify`) and the mask methods, 2:4 / m4n2 /
Wanda / magnitude (`masks`)."""

from fxcook.passes.sparsify.sparsify import MaskState, Schedule, Sparsify, activation_norms, update_masks

__all__ = ["MaskState", "Schedule", "Sparsify", "activation_norms", "update_masks"]
