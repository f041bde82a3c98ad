"""Layer pairs for distilling a layer-dropped student from the model it was cut from.

A dropped model keeps each surviving block's original module path (`DropLayers` removes blocks and
renumbers only on HF export), so `layer_map="origin"` pairs every student block with the teacher
block at the same path: the teacher layer it came from. The embedding term compares what enters the
first block (the embeddings' output, positions and norm included) in both models.
"""

from __future__ import annotations

from torch import nn

from fxcook.errors import FxcookError


def origin_pairs(student_blocks: list[str], teacher: nn.Module) -> list[tuple[str, str]]:
    """`[post]` tap pairs of each student block and the teacher block of the same path."""
    have = {p for p, _ in teacher.named_modules()}
    missing = [p for p in student_blocks if p not in have]
    if missing:
        raise FxcookError(
            f"layer_map='origin': the teacher has no module {missing[0]} (a dropped student keeps its blocks' "
            f"original paths: is the teacher the model it was dropped from?)"
        )
    return [(f"[post]{p}", f"[post]{p}") for p in student_blocks]


def embedding_pair(student_blocks: list[str], teacher_blocks: list[str]) -> tuple[str, str]:
    """The hidden-state inputs of both models' first blocks: their embedding outputs."""
    if not student_blocks or not teacher_blocks:
        raise FxcookError("the embedding term found no transformer blocks to read the embedding output from")
    return f"[pre]{student_blocks[0]}", f"[pre]{teacher_blocks[0]}"
