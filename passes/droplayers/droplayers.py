"""DropLayers: remove whole transformer blocks (layer pruning, Jha et al. 2023; ShortGPT).

Each dropped block's call is replaced by the residual stream passing through (its hidden output is
its hidden input), and its module and parameters leave the model. The blocks of every stack the
site index found (BERT's `encoder.layer`, GPT-2's `transformer.h`, T5's encoder and decoder
`block`, Llama's `model.layers`) are counted per stack: `count` drops that many from each stack,
`keep` keeps that many, an explicit `placement=[i, ...]` drops those positions. The kept blocks keep
their module paths (so taps, selectors and `layer_map="origin"` still name the layer a block came
from); the HF export renumbers them (`cooked.hf_edits`, see `fxcook.runtime.hf`).

With `every=K` the blocks are dropped during `fxcook.train` instead, one every K optimizer steps in
placement order; which ones is decided up front and their parameters are frozen from the start (as
in the paper). Until the run ends a dropped block sits behind a `BlockGate` (the state keeps its
shapes, so checkpoints resume exactly across a drop); when the last one has gone and training ends,
the schedule removes them as the one-shot pass would.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fxcook.errors import PassError, PreconditionError
from fxcook.passbase import ENTRIES, Change, DataPass, PassConfig, PassResult
from fxcook.passes.droplayers.hfedit import hf_edit
from fxcook.passes.droplayers.influence import block_influence
from fxcook.passes.droplayers.placement import candidates, choose
from fxcook.passes.droplayers.schedule import DropSchedule
from fxcook.passes.droplayers.surgery import add_gate, bypass, check_bypassable
from fxcook.tracing import call_sites

__all__ = ["DropLayers", "stacks"]


def stacks(cooked) -> dict[str, list[str]]:
    """Stack path (the ModuleList) -> its block paths, in order."""
    out: dict[str, list[str]] = {}
    for block in cooked.sites.blocks:
        out.setdefault(block.rpartition(".")[0], []).append(block)
    return out


def _check_unshared(cooked, blocks: list[str]) -> None:
    """A block called several times, or blocks sharing parameter tensors, are one set of weights run as
    many layers (ALBERT): none of those layers can go alone."""
    calls = call_sites(cooked)
    owner: dict[int, str] = {}
    for block in blocks:
        n = len(calls.get(block, []))
        if n > 1:
            raise PreconditionError(
                f"droplayers: block {block} is called {n} times (one set of parameters shared by {n} layers, "
                f"ALBERT-style); dropping it would remove every one of them; layer dropping needs unshared blocks"
            )
        for _, p in cooked.get_submodule(block).named_parameters(remove_duplicate=False):
            if id(p) in owner and owner[id(p)] != block:
                raise PreconditionError(
                    f"droplayers: blocks {owner[id(p)]} and {block} share parameter tensors (ALBERT-style weight "
                    f"sharing); dropping one would not shrink the model; layer dropping needs unshared blocks"
                )
            owner[id(p)] = block


class DropLayers(DataPass):
    """Drop `count` (or all but `keep`) blocks of each stack by `placement`, or the listed positions."""

    name = "droplayers"

    class Config(PassConfig):
        count: int | None = Field(None, ge=0)
        keep: int | None = Field(None, ge=1)
        placement: Literal["max-gap", "input", "output", "middle", "both", "block-influence"] | list[int] = "max-gap"
        keep_first_last: bool = True
        stack: str | None = None  # only this stack (e.g. "decoder.block"); None: every stack
        every: int = Field(0, ge=0)  # > 0: drop one block every `every` training steps instead of now

    # ---- planning -------------------------------------------------------------------------------
    def _stacks(self, cooked) -> dict[str, list[str]]:
        found = stacks(cooked)
        if not found:
            raise PreconditionError("droplayers: the site index found no transformer blocks in this model")
        if self.config.stack is None:
            return found
        if self.config.stack not in found:
            raise PreconditionError(
                f"droplayers: stack={self.config.stack!r} is not a block stack; stacks are {sorted(found)}"
            )
        return {self.config.stack: found[self.config.stack]}

    def _drop_count(self, stack: str, n: int) -> int:
        c = self.config
        if c.count is not None and c.keep is not None:
            raise PreconditionError("droplayers: give count= (blocks to drop) or keep= (blocks to keep), not both")
        if c.count is None and c.keep is None:
            raise PreconditionError(
                "droplayers: give count= (blocks to drop per stack), keep= (blocks to keep) or placement=[indices]"
            )
        drop = c.count if c.count is not None else n - c.keep
        if drop < 0:
            raise PreconditionError(f"droplayers: keep={c.keep} but stack {stack} has only {n} blocks")
        if drop >= n:
            raise PreconditionError(
                f"droplayers: stack {stack} has {n} blocks; dropping {drop} would leave none (keep at least one)"
            )
        return drop

    def _check_indices(self, stack: str, n: int, indices: list[int]) -> None:
        c = self.config
        if c.count is not None or c.keep is not None:
            raise PreconditionError("droplayers: placement=[indices] names the blocks to drop; leave count/keep unset")
        seen = set()
        for i in indices:
            if not 0 <= i < n:
                raise PreconditionError(
                    f"droplayers: index {i} is out of range for stack {stack} of {n} blocks (0..{n - 1})"
                )
            if i in seen:
                raise PreconditionError(f"droplayers: index {i} is repeated in placement={indices}")
            seen.add(i)
            if c.keep_first_last and i in (0, n - 1):
                raise PreconditionError(
                    f"droplayers: index {i} is the {'first' if i == 0 else 'last'} block of {stack} and "
                    f"keep_first_last=True; pass keep_first_last=False to drop it"
                )
        if len(indices) >= n:
            raise PreconditionError(f"droplayers: placement={indices} would drop every block of {stack}")

    def _plan(self, cooked) -> dict[str, list[str]]:
        """Stack -> the block paths to drop, in the order they go."""
        c, plan = self.config, {}
        found = self._stacks(cooked)
        for stack, blocks in found.items():
            n = len(blocks)
            if isinstance(c.placement, list):
                self._check_indices(stack, n, c.placement)
                plan[stack] = [blocks[i] for i in c.placement]
                continue
            drop = self._drop_count(stack, n)
            if c.keep_first_last and drop and n < 3:
                raise PreconditionError(
                    f"droplayers: stack {stack} has {n} blocks and keep_first_last=True keeps the first and the "
                    f"last, so none can be dropped; pass keep_first_last=False"
                )
            if drop > len(candidates(n, c.keep_first_last)):
                raise PreconditionError(
                    f"droplayers: cannot drop {drop} of the {n} blocks of {stack} with keep_first_last=True "
                    f"(at most {n - 2})"
                )
            plan[stack] = [blocks[i] for i in self._choose(cooked, stack, blocks, drop)]
        return plan

    def _choose(self, cooked, stack: str, blocks: list[str], drop: int) -> list[int]:
        c, influence = self.config, None
        if c.placement == "block-influence" and drop:
            if self.calibration is None:
                raise PreconditionError(
                    "droplayers: placement='block-influence' scores blocks on calibration data; "
                    "pass calibration=[batch, ...]"
                )
            scores = (
                self._scores
                if self._scores is not None
                else block_influence(cooked, cooked.sites.blocks, self.calibration)
            )
            self._scores = scores
            influence = [scores[b] for b in blocks]
        return choose(len(blocks), drop, c.placement, c.keep_first_last, influence)

    # ---- the pass -------------------------------------------------------------------------------
    def __init__(self, *args, calibration=None, **kwargs):
        super().__init__(*args, calibration=calibration, **kwargs)
        self._scores: dict[str, float] | None = None
        self._dropped: list[str] = []

    def requires(self, cooked) -> None:
        if self.restoring:
            return
        found = self._stacks(cooked)
        for blocks in found.values():
            _check_unshared(cooked, blocks)
        plan = self._plan(cooked)
        scheduled = {p for s in getattr(cooked, "mask_schedules", []) for p in getattr(s, "paths", [])}
        for path in (p for paths in plan.values() for p in paths):
            check_bypassable(cooked, path)
            hit = sorted(p for p in scheduled if p == path or p.startswith(path + "."))
            if hit:
                raise PreconditionError(f"droplayers: block {path} holds {hit[0]}, which a training schedule updates")

    def _gated(self) -> bool:
        """Dropped during training (gates now), not at once: `every` is set and no settled record says otherwise."""
        return bool(self.config.every) and not (self.restore or {}).get("settled", False)

    def call(self, cooked) -> PassResult:
        plan = self.restore["dropped"] if self.restoring else [p for ps in self._plan(cooked).values() for p in ps]
        self._dropped = list(plan)
        touched = list(dict.fromkeys(p.rpartition(".")[0] for p in self._dropped))
        if self._gated():
            schedule = self._schedule(cooked, self._dropped, touched)
            changes = [Change(p, f"frozen; dropped at step {schedule.every * (i + 1)}") for i, p in enumerate(plan)]
        else:
            sizes = {stack: len(blocks) for stack, blocks in stacks(cooked).items()}
            changes = [
                Change(p, f"dropped (block {p.rpartition('.')[2]} of {sizes[p.rpartition('.')[0]]})") for p in plan
            ]
            for path in self._dropped:
                bypass(cooked, path)
            if self._dropped:
                cooked.__dict__.setdefault("hf_edits", []).append(hf_edit(cooked, touched))
        cooked.recompile()
        result = self.finish(cooked, changes)
        if self._gated():  # the schedule marks this record settled when it removes the blocks
            schedule.entry = cooked.__dict__[ENTRIES][-1]
        return result

    def _schedule(self, cooked, order: list[str], touched: list[str]) -> DropSchedule:
        gates = {path: add_gate(cooked, path) for path in order}
        for path in order:
            cooked.get_submodule(path).requires_grad_(False)
        schedule = DropSchedule(order, self.config.every, gates, touched)
        cooked.mask_schedules.append(schedule)
        return schedule

    def record(self) -> dict:
        if self.restoring:
            return dict(self.restore)
        return {"dropped": list(self._dropped), **({"settled": False} if self.config.every else {})}

    def ensures(self, cooked) -> None:
        left = [p for p in self._dropped if p in dict(cooked.named_modules())]
        if left and not self._gated():
            raise PassError(f"droplayers: blocks {left} are still in the model after dropping")
