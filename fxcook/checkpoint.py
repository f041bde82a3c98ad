"""Quantized checkpoints: safetensors with int8 weight codes plus per-channel scales.

Each quantized CookedLinear (and CookedEmbedding table) is stored as `<path>.qweight` (int8, `[out, in]`) and
`<path>.weight_scale` (float32, `[out]` or `[out, in/group]`); BMCook's `<path>.weight_quant`
name for the codes is accepted on load. A parameter quantized in the graph (`fxcook.nn.ParamQuant`: HF MoE experts) is
stored the same way under its parameter's path: `<param>.qweight` (int8 `[E, out, in]`, contracted
axis last) and `<param>.weight_scale` (`[E, out]` or `[E, out, in/group]`); parameters kept as
`[E, in, out]` are listed in the `transposed` metadata entry. A tensor the model shares under several
names (a tied embedding and head) is stored once, in float, under its first name; the others are
listed in the `tied` metadata entry. Everything else is stored as is.

Loading is strict and atomic: every key, shape and dtype of the file is checked against the model
(headers only) before any tensor is copied, so a checkpoint with missing or unexpected keys, of
another shape or another recipe is an error naming the keys and leaves the model untouched. Then
one tensor at a time is read into the model's own parameters, so no second fp32 copy of the
weights is ever held. Writes go to a temporary file renamed into place (atomic).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fxcook.errors import FxcookError
from fxcook.nn import CookedEmbedding, CookedLinear, param_quants
from fxcook.qview import quant_view

__all__ = ["CheckpointError", "load_quantized", "save_quantized", "write_atomic"]

CODE_NAMES = ("qweight", "weight_quant")  # fxcook's, BMCook's
SCALE = "weight_scale"
SHOWN = 40  # keys named in one error


class CheckpointError(FxcookError):
    """A checkpoint does not fit the model it is loaded into."""


def write_atomic(path: Path, write: Callable[[str], None]) -> Path:
    """Write `path` through `write(temporary name)`, then rename it into place: a reader never sees
    half a file and an interrupted write leaves the old one intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _quantized(model) -> dict[str, CookedLinear | CookedEmbedding]:
    return {
        p: m
        for p, m in model.named_modules()
        if isinstance(m, (CookedLinear, CookedEmbedding)) and m.weight_quant is not None
    }


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Key -> first key of the same tensor, for every state key the model shares under another name."""
    first: dict[int, str] = {}
    out = {}
    for key, t in state.items():
        if id(t) in first:
            out[key] = first[id(t)]
        else:
            first[id(t)] = key
    return out


def _coded(model, state: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, tuple[str, object]]:
    """State key -> (name its codes are stored under, quantizer) for every weight stored as int8 codes.

    A tied tensor stays in float: its owners may quantize it differently, and one of them may not at all.
    """
    shared = set(aliases) | set(aliases.values())
    out = {f"{p}.weight": (p, m.weight_quant) for p, m in _quantized(model).items()}
    out.update({p: (p, q) for p, q in param_quants(model).items()})
    return {k: v for k, v in out.items() if k in state and k not in shared}


@torch.no_grad()
def save_quantized(model, path: str | os.PathLike) -> Path:
    """Write `model`'s state with int8 codes + scales for its quantized weights (atomically)."""
    state = model.state_dict(keep_vars=True)
    aliases = _aliases(state)
    coded = _coded(model, state, aliases)
    owners = dict(_quantized(model))
    tensors = {}
    for key, t in state.items():
        if key in aliases:
            continue
        if key in coded:
            name, quant = coded[key]
            owner = owners.get(name)
            if owner is None:  # a parameter quantized in the graph
                codes, scale = quant.quantize(t.detach().float())
            else:
                view = quant_view(owner, acts=False)
                codes, scale = view.codes, view.scale
            tensors[f"{name}.qweight"], tensors[f"{name}.{SCALE}"] = codes.contiguous(), scale.contiguous()
        else:
            tensors[key] = t.detach().contiguous()
    transposed = [name for name, q in coded.values() if getattr(q, "reduce_dim", 2) == 1]
    metadata = {
        "fxcook": "quantized",
        "quantized": ",".join(name for name, _ in coded.values()),
        "transposed": ",".join(transposed),
        "tied": ",".join(f"{a}={k}" for a, k in aliases.items()),
    }
    return write_atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


@dataclass
class _Plan:
    """What loading a checkpoint would do, and everything wrong with it, found from headers only."""

    copies: list[tuple[str, Callable[[], torch.Tensor]]] = field(default_factory=list)  # state key, reader
    problems: list[str] = field(default_factory=list)
    covered: dict[str, str] = field(default_factory=dict)  # state key -> checkpoint key that fills it


def _kind(dtype: str | torch.dtype) -> str:
    """'float', 'int' or 'bool' of a torch or safetensors dtype: loading converts within a kind, never across."""
    if isinstance(dtype, torch.dtype):
        return "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else "int"
    return "bool" if dtype == "BOOL" else "float" if dtype[0] in "FB" else "int"


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, transposed: bool) -> torch.Tensor:
    k = codes.shape[-1]
    n = codes.numel() // k
    groups = scale.reshape(n, -1).shape[1]
    w = (codes.float().reshape(n, groups, k // groups) * scale.float().reshape(n, groups, 1)).reshape(codes.shape)
    return w.transpose(1, 2) if transposed else w


def _cover(plan: _Plan, target: str, key: str, read: Callable[[], torch.Tensor]) -> None:
    if target in plan.covered:
        plan.problems.append(f"{target} is given twice ({plan.covered[target]} and {key})")
    plan.covered[target] = key
    plan.copies.append((target, read))


def _plan_codes(plan: _Plan, f, key: str, keys: set[str], state, coded, transposed: set[str]) -> None:
    owner = key.rpartition(".")[0]
    target = f"{owner}.weight" if f"{owner}.weight" in state else owner
    if target not in state:
        plan.problems.append(f"unexpected key {key} (the model has no {owner}.weight)")
        return
    if f"{owner}.{SCALE}" not in keys:
        plan.problems.append(f"{key} has no {owner}.{SCALE}")
        return
    if target not in coded:
        plan.problems.append(f"{key}: {target} is quantized in the checkpoint but not in the model (another recipe?)")
    shape = list(f.get_slice(key).get_shape())
    if owner in transposed:
        shape[1], shape[2] = shape[2], shape[1]
    if tuple(shape) != tuple(state[target].shape):
        plan.problems.append(f"{key} is {tuple(shape)}, the model's {target} is {tuple(state[target].shape)}")
        return
    _cover(
        plan, target, key, lambda: _dequantize(f.get_tensor(key), f.get_tensor(f"{owner}.{SCALE}"), owner in transposed)
    )


def _plan_tensor(plan: _Plan, f, key: str, state, aliases: dict[str, str], coded) -> None:
    if key not in state:
        plan.problems.append(f"unexpected key {key} (not in the model)")
        return
    if key in aliases:
        plan.problems.append(f"unexpected key {key}: the model ties it to {aliases[key]}, stored once")
        return
    sl, target = f.get_slice(key), state[key]
    if tuple(sl.get_shape()) != tuple(target.shape):
        plan.problems.append(f"{key} is {tuple(sl.get_shape())}, the model has {tuple(target.shape)}")
    elif _kind(sl.get_dtype()) != _kind(target.dtype):
        plan.problems.append(f"{key} is {sl.get_dtype()}, the model has {target.dtype}")
    elif key in coded:
        plan.problems.append(f"{key} is stored in float, but the model quantizes it (another recipe?)")
    else:
        _cover(plan, key, key, lambda: f.get_tensor(key))


def _plan(model, f) -> _Plan:
    state = model.state_dict(keep_vars=True)
    aliases = _aliases(state)
    coded = _coded(model, state, aliases)
    meta = f.metadata() or {}
    transposed = set(filter(None, meta.get("transposed", "").split(",")))
    plan = _Plan()
    keys = set(f.keys())
    for key in sorted(keys):
        owner, _, name = key.rpartition(".")
        if name in CODE_NAMES:
            _plan_codes(plan, f, key, keys, state, coded, transposed)
        elif name == SCALE and any(f"{owner}.{c}" in keys for c in CODE_NAMES):
            continue
        else:
            _plan_tensor(plan, f, key, state, aliases, coded)
    missing = [k for k in state if k not in aliases and k not in plan.covered]
    if missing:
        plan.problems.append(
            f"{len(missing)} missing key(s): {', '.join(missing[:SHOWN])}"
            + (f" ... {len(missing) - SHOWN} more" if len(missing) > SHOWN else "")
        )
    return plan


@torch.no_grad()
def load_quantized(model, path: str | os.PathLike) -> None:
    """Load a checkpoint written by `save_quantized` (or BMCook's int8 export) into `model` in place.

    Strict and atomic: any missing, unexpected, misshapen or differently quantized key is an error
    listing them all, raised before anything is copied. int8 codes are dequantized straight into
    each weight (or expert parameter).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    state = model.state_dict(keep_vars=True)
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {e}") from e
    with handle as f:
        plan = _plan(model, f)
        if plan.problems:
            more = len(plan.problems) - 20
            shown = "; ".join(plan.problems[:20]) + (f"; ... {more} more" if more > 0 else "")
            raise CheckpointError(f"checkpoint {path} does not fit the model (nothing was loaded): {shown}")
        for key, read in plan.copies:
            state[key].data.copy_(read())
