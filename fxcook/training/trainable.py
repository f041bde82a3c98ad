"""Which parameters train: `trainable="lora+norm" | "all" | [globs]`, applied as requires_grad flags.

Items (a list, or one string joined by `+`) are either a role or a glob over parameter names:

- `all`: every parameter;
- `norm`: the parameters of the model's norm sites (LayerNorm, RMSNorm; by class name off a CookedModel);
- any other bare word names a role: the parameters of modules whose `trainable_role` is that word
  (`lora` for LoRA branches); the pass that adds such modules sets the attribute, so core code knows
  no technique (capture does not keep a wrapper's own modules, so a task head is named by a glob,
  `classifier.*`);
- anything else (with `*`, `?`, `[` or a dot) is an `fnmatch` glob over parameter names.

Every item must select at least one parameter: a mistyped glob would otherwise freeze the model
silently. Parameters not selected are frozen (requires_grad False), so the optimizer holds state for
the trainable ones only and FSDP2 shards the frozen ones like any other.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn

from fxcook.errors import FxcookError

__all__ = ["apply_trainable", "parse_trainable"]

_GLOB = re.compile(r"[*?\[.]")


def parse_trainable(spec: str | Sequence[str]) -> list[str]:
    """The items of a `trainable` spec: `"lora+norm"` -> `["lora", "norm"]`; lists may mix roles and globs."""
    items = spec.split("+") if isinstance(spec, str) else [part for s in spec for part in str(s).split("+")]
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise FxcookError(f"train: trainable={spec!r} names nothing; use 'all', 'lora+norm' or parameter globs")
    return items


def _norm_modules(model: nn.Module) -> list[str]:
    sites = getattr(model, "sites", None)
    if sites is not None:
        return [s.path for s in sites.find("norm")]
    return [p for p, m in model.named_modules() if "Norm" in type(m).__name__]


def _selected(model: nn.Module, item: str, names: list[str]) -> set[str]:
    if item == "all":
        return set(names)
    if item == "norm":
        prefixes = [p + "." for p in _norm_modules(model)]
    elif not _GLOB.search(item):
        prefixes = [p + "." for p, m in model.named_modules() if getattr(m, "trainable_role", None) == item]
    else:
        return {n for n in names if fnmatch.fnmatchcase(n, item)}
    return {n for n in names if any(n.startswith(pre) for pre in prefixes)}


def apply_trainable(model: nn.Module, spec: str | Sequence[str]) -> list[str]:
    """Set requires_grad on `model`'s parameters per `spec`; the names that train, in model order.

    Raises FxcookError naming the first item that selects no parameter.
    """
    names = [n for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    for item in parse_trainable(spec):
        hit = _selected(model, item, names)
        if not hit:
            kind = "role" if not _GLOB.search(item) and item not in ("all", "norm") else "item"
            raise FxcookError(
                f"train: trainable {kind} {item!r} matches no parameter of the model ({len(names)} parameters, "
                f"e.g. {', '.join(names[:3])}); roles are all, norm, lora (LoRA adapters) "
                f"or any module's trainable_role; anything with * ? [ or . is a glob over parameter names"
            )
        chosen |= hit
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return [n for n in names if n in chosen]
