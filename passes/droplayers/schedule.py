"""DropSchedule: blocks dropped one at a time during training (the incremental arm of the paper).

A sibling of Sparsify's mask schedule on `CookedModel.mask_schedules` (`paths`, `last_update`,
`final`, `update(cooked, step)`), with one more method the trainer calls when a run ends:
`settle(cooked)`, which removes the blocks for good once every one of them has been gated off.
Until then the gates' `on` buffers are part of the state, so a checkpoint taken between two drops
resumes exactly.
"""

from __future__ import annotations

from fxcook.passbase import Change
from fxcook.passes.droplayers.hfedit import hf_edit
from fxcook.passes.droplayers.surgery import BlockGate, bypass, remove_gate


class DropSchedule:
    """Gate off block `order[i]` once `every * (i + 1)` optimizer steps have run."""

    def __init__(self, order: list[str], every: int, gates: dict[str, BlockGate], stacks: list[str]):
        self.paths = list(order)
        self.every = every
        self.gates = gates
        self.last_update: int | None = None
        self.final = False
        self.entry: dict | None = None  # the pass's recipe entry, whose record says when the blocks are gone
        self.stacks = stacks  # the stacks the blocks come from (their HF depth changes on settling)

    def dropped_at(self, step: int) -> int:
        return min(step // self.every, len(self.paths))

    def update(self, cooked, step: int) -> list[Change]:
        changes = []
        for i, path in enumerate(self.paths):
            on = 0.0 if i < self.dropped_at(step) else 1.0
            gate = self.gates[path]
            if float(gate.on) != on:
                gate.on.fill_(on)
                changes.append(Change(path, f"gated off at step {step}"))
        self.last_update = step
        self.final = self.dropped_at(step) == len(self.paths)
        return changes

    def settle(self, cooked) -> list[Change]:
        """After training: once every block is gated off, remove them (and their gates) from the model."""
        if not self.final or self not in cooked.mask_schedules:
            return []
        for path in self.paths:
            remove_gate(cooked, path)
            bypass(cooked, path)
        cooked.__dict__.setdefault("hf_edits", []).append(hf_edit(cooked, self.stacks))
        cooked.mask_schedules.remove(self)
        if self.entry is not None:
            self.entry["record"]["settled"] = True
        cooked.recompile()
        return [Change(p, "dropped") for p in self.paths]
