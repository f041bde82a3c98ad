"""Quantized checkpoints: safetensors with int8 weight codes plus per-channel scales.

Each quantized CookedLinear (and CookedEmbedding table) is stored as `<path>.qweight` (int8, `[out, in]`) and
`<path>.weight_scale` (float32, `[out]` or `[out, in/group]`); BMCook's `<path>.weight_quant`
name for the codes is accepted on load. A quantized HF MoE expert weight (`fxcook.quant_experts`) is
stored the same way under its parameter's path: `<param>.qweight` (int8 `[E, out, in]`, contracted
axis last) and `<param>.weight_scale` (`[E, out]` or `[E, out, in/group]`); parameters kept as
`[E, in, out]` are listed in the `transposed` metadata entry. Everything else is stored as is. Loading streams one tensor
at a time into the model's own parameters, so no second fp32 copy of the weights is ever held.
Writes go to a temporary file renamed into place (atomic).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import FxcookError
from .nn import CookedEmbedding, CookedLinear
from .quant_experts import expert_weight_quants

__all__ = ["save_quantized", "load_quantized", "save_compressed"]

CODE_NAMES = ("qweight", "weight_quant")  # fxcook's, BMCook's


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
    return {p: m for p, m in model.named_modules()
            if isinstance(m, (CookedLinear, CookedEmbedding)) and m.weight_quant is not None}


@torch.no_grad()
def save_quantized(model, path: str | os.PathLike) -> Path:
    """Write `model`'s state with int8 codes + scales for its quantized linears (atomically)."""
    path = Path(path)
    quant = _quantized(model)
    experts = expert_weight_quants(model)
    tensors = {}
    for key, t in model.state_dict().items():
        owner, _, name = key.rpartition(".")
        if owner in quant and name == "weight":
            lin = quant[owner]
            w = t if lin.weight_mask is None else t * lin.weight_mask
            codes, scale = lin.weight_quant.quantize(w.float())
            tensors[f"{owner}.qweight"], tensors[f"{owner}.weight_scale"] = codes.contiguous(), scale.contiguous()
        elif key in experts:
            codes, scale = experts[key].quantize(t.float())
            tensors[f"{key}.qweight"], tensors[f"{key}.weight_scale"] = codes.contiguous(), scale.contiguous()
        else:
            tensors[key] = t.detach().contiguous()
    transposed = [p for p, q in experts.items() if q.reduce_dim == 1]
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={
        "fxcook": "quantized", "quantized": ",".join([*quant, *experts]), "transposed": ",".join(transposed)}))


@torch.no_grad()
def load_quantized(model, path: str | os.PathLike) -> None:
    """Load a checkpoint written by `save_quantized` (or BMCook's int8 export) into `model` in place.

    int8 codes are dequantized straight into each linear's weight (or expert parameter); unknown keys
    are errors.
    """
    path = Path(path)
    if not path.is_file():
        raise FxcookError(f"checkpoint {path} does not exist")
    state = model.state_dict(keep_vars=True)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        transposed = set(filter(None, (f.metadata() or {}).get("transposed", "").split(",")))
        for key in sorted(keys):
            owner, _, name = key.rpartition(".")
            if name == "weight_scale":
                continue
            if name in CODE_NAMES:
                # a linear's codes replace `<owner>.weight`; an expert weight's replace `<owner>` itself
                expert = f"{owner}.weight" not in state and owner in state and state[owner].dim() == 3
                target = state[owner] if expert else state.get(f"{owner}.weight")
                if target is None or f"{owner}.weight_scale" not in keys:
                    raise FxcookError(f"checkpoint {path}: {key} has no matching weight/scale in the model")
                codes, scale = f.get_tensor(key), f.get_tensor(f"{owner}.weight_scale").float()
                shape = (codes.shape[0], codes.shape[2], codes.shape[1]) if owner in transposed else codes.shape
                if shape != target.shape:
                    raise FxcookError(f"checkpoint {path}: {key} is {tuple(shape)}, model has {tuple(target.shape)}")
                k = codes.shape[-1]
                n = codes.numel() // k
                groups = scale.reshape(n, -1).shape[1]
                w = (codes.float().reshape(n, groups, k // groups) * scale.reshape(n, groups, 1)).reshape(codes.shape)
                target.copy_(w.transpose(1, 2) if owner in transposed else w)
            elif key in state:
                state[key].data.copy_(f.get_tensor(key))
            else:
                raise FxcookError(f"checkpoint {path}: unexpected key {key} (not in the model)")


def save_compressed(cooked, out: str | os.PathLike, recipe: Path | None = None) -> Path:
    """Write a compressed model directory: `model.safetensors` (int8 codes + scales where quantized),
    `report.txt` and the recipe. The directory is built aside and moved into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; it becomes the output directory
    try:
        save_quantized(cooked, tmp / "model.safetensors")
        (tmp / "report.txt").write_text(cooked.report(per_layer=True) + "\n")
        if recipe is not None:
            shutil.copyfile(recipe, tmp / Path(recipe).name)
        if out.exists():
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
