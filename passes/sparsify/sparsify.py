"""Sparsify: masked GEMMs on selected linear sites (2:4 or unstructured), masks as graph state.

BMCook zeroed weights after each optimizer step, which hid the order of operations and forced it to
write masks into ZeRO's flat storage. Here each selected `CookedLinear` gets a persistent
`weight_mask` buffer (state_dict key `<path>.weight_mask`) and computes `linear(x, weight * mask)`:
the mask is applied in the forward pass, so gradients at pruned positions are exactly zero under any
optimizer or sharding (FSDP2 shards the buffer with its block), and the mask is saved with the model.

Masks are computed from the raw weights (never the quantized ones) and Wanda's calibration runs with
quantizers switched off, so `Sparsify` and `Quantize` give the same model in either order.
With a `schedule`, masks are recomputed during training by `update_masks(cooked, step)`: a cubic
ramp of sparsity for unstructured pruning (Zhu & Gupta), periodic 2:4 mask search for 2:4; pruned
raw weights are kept (dormant, zero-gradient) until the mask is final, then zeroed. With `fade`
(2:4), pruned weights are not cut at once: the mask holds a factor at pruned positions that falls
linearly from 1 at `start` to 0 at `end` (a decaying mask, Kao et al. 2022), so the model starts
exact and training follows the cut; they keep a scaled gradient and can win their place back at the
next recompute.
`method="sparsegpt"` also updates the kept weights (`sparsegpt`); they live in the state dict, so a
saved model keeps them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fxcook.errors import PassError, PreconditionError
from fxcook.nn import CookedLinear, swapped_quantizers
from fxcook.passbase import Change, DataPass, PassConfig, PassResult
from fxcook.passes.sparsify.masks import count_24_violations, make_mask
from fxcook.passes.sparsify.sparsegpt import input_hessians, sparsegpt
from fxcook.select import Select
from fxcook.tracing import calibration_batches, record_inputs

__all__ = ["MaskState", "Schedule", "Sparsify", "activation_norms", "update_masks"]


class Schedule(BaseModel):
    """When masks are recomputed during training (steps are optimizer steps)."""

    model_config = ConfigDict(extra="forbid")
    start: int = Field(0, ge=0)
    end: int = Field(..., gt=0)  # sparsity reaches its target here; with freeze the mask is final from here
    every: int = Field(100, gt=0)
    initial: float = Field(0.0, ge=0.0, lt=1.0)  # unstructured: sparsity at `start`
    fade: bool = False  # 2:4: pruned weights scaled by 1 -> 0 over [start, end] instead of cut at `start`

    @model_validator(mode="after")
    def _order(self):
        if self.end <= self.start:
            raise ValueError(f"schedule: end ({self.end}) must be after start ({self.start})")
        return self


class SparsifyConfig(PassConfig):
    pattern: Literal["2:4", "unstructured"] = "2:4"
    method: Literal["m4n2_1d", "m4n2_2d", "wanda", "magnitude", "sparsegpt"] = "m4n2_1d"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    select: Select = Select()
    schedule: Schedule | None = None
    freeze: bool = True  # after the last scheduled recompute (or at once without a schedule) the mask is final
    calib_batches: int = Field(16, gt=0)  # Wanda / SparseGPT: at most this many calibration batches
    sequential: bool = False  # Wanda / SparseGPT: calibrate block by block on the already-pruned earlier blocks
    block: int = Field(128, gt=0, multiple_of=4)  # SparseGPT: columns per lazy-update block
    damp: float = Field(0.01, gt=0.0)  # SparseGPT: share of mean(diag X^T X) added to its diagonal

    @model_validator(mode="after")
    def _consistent(self):
        if self.pattern == "2:4" and self.sparsity != 0.5:
            raise ValueError(
                f"sparsity: 2:4 keeps exactly half; got sparsity={self.sparsity} (use pattern='unstructured')"
            )
        if self.pattern == "unstructured" and self.method in ("m4n2_1d", "m4n2_2d"):
            raise ValueError(f"method: {self.method!r} is a 2:4 method; use 'magnitude' or 'wanda' for unstructured")
        if self.schedule is not None and self.schedule.fade and self.pattern != "2:4":
            raise ValueError("schedule: fade is for 2:4 masks (an unstructured schedule already ramps sparsity)")
        if self.method == "sparsegpt" and self.schedule is not None:
            raise ValueError(
                "schedule: method 'sparsegpt' prunes once (it updates the kept weights); drop the schedule"
            )
        return self

    @property
    def calibrated(self) -> bool:
        return self.method in ("wanda", "sparsegpt")


@contextlib.contextmanager
def _quantizers_off(cooked):
    """Run the float model: every CookedLinear's quantizers off, restored on exit."""
    linears = [mod for mod in cooked.modules() if isinstance(mod, CookedLinear)]
    with swapped_quantizers(linears, lambda m: (None, None)):
        yield


def activation_norms(cooked, paths: list[str], calibration: Iterable, max_batches: int) -> dict[str, torch.Tensor]:
    """L2 norm over all calibration tokens of each input feature of the CookedLinears at `paths`."""
    sums: dict[str, torch.Tensor] = {}

    def record(path, x):
        x = x.float().reshape(-1, x.shape[-1])
        sums[path] = (x * x).sum(0) + sums.get(path, 0)

    with _quantizers_off(cooked):
        mods = {p: cooked.get_submodule(p) for p in paths}
        record_inputs(cooked, mods, record, calibration, "wanda calibration", max_batches, skip_padding=True)
    return {p: sums[p].sqrt() for p in paths}


def _full(weight: torch.Tensor) -> torch.Tensor:
    """The whole weight, also under FSDP2 (a sharded DTensor; collective: call on every rank)."""
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def _like(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`mask` laid out like `weight`: sharded the same way when the weight is a DTensor."""
    if hasattr(weight, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(mask.to(weight.dtype), weight.device_mesh, weight.placements)
    return mask


class MaskState:
    """The masks one Sparsify put on a model, and how to recompute them on its schedule.

    Kept on the model (a `MaskSchedule` in `CookedModel.mask_schedules`) when a schedule is set, so a
    training loop can advance it without the pass object; it holds no calibration data, only the
    activation norms.
    """

    def __init__(
        self, config: SparsifyConfig, paths: list[str], norms: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
    ):
        self.config, self.paths, self.norms, self.base = config, paths, norms, base
        self.final = config.schedule is None and config.freeze
        self.last_update: int | None = None
        self.fade = 0.0  # the factor the masks hold at pruned positions (`Schedule.fade`)

    @property
    def method(self) -> str:
        """The mask rule `apply` uses: restored SparseGPT masks are Wanda placeholders the saved state replaces."""
        return "wanda" if self.config.method == "sparsegpt" else self.config.method

    def sparsegpt(self, cooked, paths: list[str], batches: list) -> list[Change]:
        """Prune `paths` with SparseGPT on `batches` (quantizers off): new masks and updated kept weights."""
        cfg, mods = self.config, {p: cooked.get_submodule(p) for p in paths}
        hess, record = input_hessians({p: m.in_features for p, m in mods.items()})
        with _quantizers_off(cooked):
            record_inputs(cooked, mods, record, batches, "sparsegpt calibration", cfg.calib_batches, skip_padding=True)
        changes = []
        for path, mod in mods.items():
            w, base = _full(mod.weight.detach()), self.base.get(path)
            forced = None if base is None else ~base.bool().cpu()
            new, keep = sparsegpt(w.float().cpu(), hess[path], cfg.pattern, cfg.sparsity, cfg.block, cfg.damp, forced)
            mod.set_mask(keep.to(w.device), f"{cfg.pattern} mask (sparsegpt)")
            with torch.no_grad():
                mod.weight.copy_(_like(new.to(w.device, w.dtype), mod.weight))
            changes.append(
                Change(path, f"{cfg.pattern} mask (sparsegpt), density {mod.density:.3f}, kept weights updated")
            )
        return changes

    def sparsity_at(self, step: int) -> float:
        """Target sparsity at `step`: cubic ramp from `initial` to `sparsity` over [start, end] (unstructured)."""
        s, cfg = self.config.schedule, self.config
        if s is None or cfg.pattern == "2:4":
            return cfg.sparsity
        return cfg.sparsity + (s.initial - cfg.sparsity) * (1.0 - self._progress(step)) ** 3

    def fade_at(self, step: int) -> float:
        """The factor on pruned weights at `step` with `fade`: 1 at `start`, 0 from `end` on (else 0)."""
        s = self.config.schedule
        return 0.0 if s is None or not s.fade else 1.0 - self._progress(step)

    def _progress(self, step: int) -> float:
        """How far `step` is through the schedule's [start, end], clipped to [0, 1]."""
        s = self.config.schedule
        return min(max((step - s.start) / (s.end - s.start), 0.0), 1.0)

    @property
    def fading(self) -> bool:
        """True while the masks hold a nonzero factor at pruned positions (not yet 2:4)."""
        return self.fade > 0.0

    def apply(self, cooked, step: int, final: bool) -> list[Change]:
        """Masks for `step` of the schedule (sparsity, fade) from the current raw weights."""
        cfg, changes, sparsity = self.config, [], self.sparsity_at(step)
        self.fade = 0.0 if final else self.fade_at(step)
        for path in self.paths:
            mod = cooked.get_submodule(path)
            base = self.base.get(path)
            w = _full(mod.weight.detach())
            if base is not None:
                w = w * base
            mask = make_mask(w, self.method, cfg.pattern, sparsity, self.norms.get(path))
            if base is not None:  # an earlier Sparsify's mask stays: this one only prunes further
                mask &= base.bool()
            soft = mask.float() + self.fade * (~mask).float() if self.fading else mask
            mod.set_mask(soft.to(w.device), f"{cfg.pattern} mask ({cfg.method})")
            if final:
                with torch.no_grad():
                    mod.weight.mul_(_like(mod.weight_mask, mod.weight))
            what = f"{cfg.pattern} mask ({cfg.method}), density {mod.density:.3f}"
            what += f", pruned weights x{self.fade:.2f}" if self.fading else ""
            changes.append(Change(path, what + ("" if final else ", recomputed on schedule")))
        return changes

    @torch.no_grad()
    def _rezero(self, cooked) -> None:
        """Zero pruned raw weights again: optimizer momentum from before a mask change can move them."""
        for path in self.paths:
            mod = cooked.get_submodule(path)
            mod.weight.mul_(_like(mod.weight_mask, mod.weight))

    def update(self, cooked, step: int) -> list[Change]:
        """Recompute the masks if the schedule calls for it at `step`; once final, keep pruned raw weights 0."""
        s = self.config.schedule
        if self.final:
            self._rezero(cooked)
            return []
        if s is None or step < s.start:
            return []
        last = self.last_update
        due = last is None or step - last >= s.every or (step >= s.end and last < s.end)
        if not due:
            return []
        self.last_update = step
        self.final = step >= s.end and self.config.freeze
        return self.apply(cooked, step, self.final)

    def settle(self, cooked) -> list[Change]:
        """After training: a mask still fading (the run ended before `end`) is cut to exact 2:4 now."""
        if not self.fading:
            return []
        self.final = self.config.freeze
        return self.apply(cooked, self.config.schedule.end, self.final)


class Sparsify(DataPass):
    """Add a `weight_mask` buffer to each selected linear; pruned raw weights become exactly zero.

    `calibration` (Wanda only): an iterable of model inputs (dicts of keyword tensors, tuples, or
    tensors); it is runtime data, not recipe config, so it is a constructor argument. Restored
    (`fxcook.load`), Wanda scores with unit activation norms: the masks are placeholders of the
    right pattern that the saved state replaces.
    """

    name = "sparsify"
    Config = SparsifyConfig
    state: MaskState | None = None

    def _linears(self, cooked) -> list[tuple[str, CookedLinear]]:
        out = []
        for site in self.config.select.resolve(cooked):
            mod = cooked.get_submodule(site.path)
            if not isinstance(mod, CookedLinear):
                raise PreconditionError(f"sparsify: site {site.path} is a {type(mod).__name__}, not a CookedLinear")
            out.append((site.path, mod))
        return out

    def requires(self, cooked) -> None:
        cfg = self.config
        if cfg.calibrated and self.calibration is None and not self.restoring:
            raise PreconditionError(f"sparsify: method {cfg.method!r} needs calibration=<iterable of model inputs>")
        for path, mod in self._linears(cooked):
            out_f, in_f = mod.weight.shape
            if cfg.pattern == "2:4" and in_f % 4:
                raise PreconditionError(
                    f"sparsify: {path} has in_features={in_f}, not a multiple of 4 (2:4); exclude it"
                )
            if cfg.method == "m4n2_2d" and out_f % 4:
                raise PreconditionError(
                    f"sparsify: {path} has out_features={out_f}, not a multiple of 4 (m4n2_2d); exclude it"
                )

    def call(self, cooked) -> PassResult:
        cfg = self.config
        linears = self._linears(cooked)
        paths = [p for p, _ in linears]
        base = {p: m.weight_mask.detach().clone() for p, m in linears if m.weight_mask is not None}
        self.state = state = MaskState(cfg, paths, {}, base)
        start = 0 if cfg.schedule is None else cfg.schedule.start
        if cfg.schedule is not None:
            state.last_update = start
            cooked.mask_schedules.append(state)
        if cfg.calibrated and self.restoring:
            state.norms = {p: torch.ones(m.in_features) for p, m in linears}
            return self.finish(cooked, state.apply(cooked, start, state.final))
        # read the calibration iterable once: sequential calibration uses it per block, and a generator would run dry
        batches = list(calibration_batches(self.calibration, self.name, cfg.calib_batches)) if cfg.calibrated else []
        groups: dict[str | None, list[str]] = {}
        for p in paths:
            groups.setdefault(cooked.sites.block_of(p) if cfg.sequential else None, []).append(p)
        if cfg.method == "sparsegpt":
            # each group is calibrated on inputs produced by the already-pruned (and updated) groups before it
            return self.finish(
                cooked, [c for group in groups.values() for c in state.sparsegpt(cooked, group, batches)]
            )
        if cfg.method == "wanda" and cfg.sequential:
            changes = []
            for group in groups.values():
                state.norms.update(activation_norms(cooked, group, batches, cfg.calib_batches))
                state.paths = group
                changes += state.apply(cooked, start, state.final)
            state.paths = paths
            return self.finish(cooked, changes)
        if cfg.method == "wanda":
            state.norms = activation_norms(cooked, paths, batches, cfg.calib_batches)
        return self.finish(cooked, state.apply(cooked, start, state.final))

    def ensures(self, cooked) -> None:
        state = self.state
        for path in state.paths:
            mod = cooked.get_submodule(path)
            if mod.weight_mask is None:
                raise PassError(f"sparsify: {path} has no weight_mask after the pass")
            if self.config.pattern == "2:4" and not state.fading:  # a fading mask is 2:4 once it reaches 0
                bad, groups = count_24_violations(mod.weight_mask)
                if bad:
                    raise PassError(f"sparsify: {path} mask has {bad}/{groups} groups of 4 with more than 2 kept")
            if state.final and bool((mod.weight.detach()[mod.weight_mask == 0] != 0).any()):
                raise PassError(f"sparsify: {path} has nonzero raw weights under its final mask")


def update_masks(cooked, step: int) -> list[Change]:
    """Advance every scheduled Sparsify on `cooked` to optimizer step `step` (call after `optimizer.step()`)."""
    changes = []
    for state in getattr(cooked, "mask_schedules", None) or []:
        changes += state.update(cooked, step)
    return changes
