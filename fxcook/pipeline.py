"""`compile`: capture, then run passes in order with ordering checks, lint and a change log."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from fxcook import calling, tracing
from fxcook.cooked import CookedModel, Origin, PassRecord
from fxcook.errors import CaptureError, FxcookError, PassError
from fxcook.passbase import Pass
from fxcook.report import activated_size, block_weights, parameter_count
from fxcook.sites import build_sites


def capture(model: nn.Module, example_inputs: Any, inplace: bool = False) -> CookedModel:
    """Capture `model` on `example_inputs` (dynamic batch/sequence dims) into a CookedModel.

    The user's model is never mutated, except with `inplace=True`: then the CookedModel shares the
    original's parameters (halving peak memory for large models), so passes that rewrite weights
    (Sparsify's zeroing, SmoothQuant's scaling) and training change the original too.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture needs an nn.Module, got {type(model).__name__}")
    plan = calling.plan(model, example_inputs)
    ep = tracing.export(model, example_inputs if plan is None else plan.example)
    root = tracing.unflatten(ep, model, inplace=inplace)
    sites = build_sites(ep, root, model)
    types = {path: type(m).__name__ for path, m in model.named_modules()}
    iface = None if plan is None else calling.interface(model, plan, ep)
    cooked = CookedModel.adopt(root, sites, types, iface).train(model.training)
    cooked.origin = Origin.of(model, example_inputs)  # what fxcook.save needs to rebuild it
    return cooked


def pipeline(passes: Iterable[Pass]) -> list[Pass]:
    """`passes` as a checked list: any iterable of passes (a generator is read once, here); a single pass,
    a non-pass item, passes out of order or calibration that is not a list of batches is an error."""
    if isinstance(passes, Pass):
        raise PassError(f"passes must be a list of passes, got the single pass {passes!r}; pass [{passes!r}]")
    if isinstance(passes, (str, bytes, Mapping)) or not isinstance(passes, Iterable):
        raise PassError(f"passes must be a list of fxcook passes, got {type(passes).__name__}")
    passes = list(passes)
    for i, p in enumerate(passes):
        if not isinstance(p, Pass):
            raise PassError(f"pipeline item {i} is {type(p).__name__}, not a fxcook Pass")
        if getattr(p, "calibration", None) is not None:
            tracing.check_calibration(p.calibration, f"pass {p.name!r} (pipeline item {i})")
    check_order(passes)
    return passes


def check_order(passes: Sequence[Pass]) -> None:
    """Each pass's `after` names must not appear later in the list (ordering within one pipeline)."""
    for i, p in enumerate(passes):
        later = [q.name for q in passes[i + 1 :]]
        for name in p.after:
            if name in later:
                raise PassError(
                    f"pass {p.name!r} must run after {name!r}, but {name!r} comes later "
                    f"in the pipeline {[q.name for q in passes]}"
                )


def apply(cooked: CookedModel, passes: Iterable[Pass]) -> CookedModel:
    """Run `passes` on `cooked` in place, in order; each is checked, linted, recompiled and logged.

    A failing pass leaves `cooked` as far as it got (compile's copy, never the user's model).
    """
    passes = pipeline(passes)
    if getattr(cooked, "dense_block_weights", None) is None:  # the baseline of every size ratio in the report
        cooked.dense_block_weights = block_weights(cooked)
    for p in passes:
        ran = [r.spec for r in cooked.history]
        try:
            p.requires(cooked)
            result = p.call(cooked)
            cooked.recompile()
            p.ensures(cooked)
        except Exception as exc:
            raise PassError(
                f"pass {p!r} failed ({type(exc).__name__}: {exc}); passes already run: {ran or 'none'}"
            ) from exc
        cooked.history.append(
            PassRecord(p.name, repr(p), list(result.changes), parameter_count(cooked), activated_size(cooked))
        )
    return cooked


def compile(
    model: nn.Module, passes: Iterable[Pass] = (), example_inputs: Any = None, inplace: bool = False
) -> CookedModel:
    """Capture `model` and apply `passes` (a list, or any iterable of passes); returns a CookedModel called
    like the original."""
    if example_inputs is None:
        raise FxcookError("compile needs example_inputs (a batch the model accepts) to capture the graph")
    passes = pipeline(passes)  # before the capture, which is the slow part
    return apply(capture(model, example_inputs, inplace=inplace), passes)
