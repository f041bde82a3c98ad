"""HF export: a cooked model as a plain transformers model directory (`save_pretrained`).

Passes whose result a plain HF model can express say how on the model, in `cooked.hf_edits`: a list
of dicts appended in the order the passes ran,

    {"config": {key: value, ...}, "rename": {cooked module path: HF module path, ...}}

`config` entries overwrite the base model's config (later edits win: DropLayers sets
`num_hidden_layers` / `n_layer` / `num_layers` / `num_decoder_layers` and per-layer lists; structured
pruning sets widths). `rename` maps a module path of the cooked model's state (which keeps the
original names) to the name a freshly built HF model gives it (DropLayers renumbers the kept blocks);
when two edits rename one path the later wins. Core never reads the list; only this exporter does.

The model is rebuilt from its class and the edited config, given the renamed state strictly, written
with `save_pretrained` into a directory beside the target, loaded back with `from_pretrained` and run
on the example inputs the model was captured on: only when it reproduces the cooked model's output
is the directory renamed into place. A model holding state a plain HF model has no place for
(quantizers, masks, experts, gates) is refused with the keys at fault; ship the fxcook artifact.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fxcook.errors import FxcookError
from fxcook.tracing import call_batch, main_output

__all__ = ["HFExportError", "edited_config", "renamed_state", "save_pretrained"]


class HFExportError(FxcookError):
    """A cooked model cannot be written as a plain HF model directory."""


def _base_class(cooked) -> type:
    origin = getattr(cooked, "origin", None)
    if origin is None or origin.config is None or not origin.cls.startswith("transformers."):
        what = origin.cls if origin is not None else "an unknown class"
        raise HFExportError(
            f"HF export: the model was captured from {what}, not a transformers model; ship the fxcook artifact (fxcook.save)"
        )
    module, _, qualname = origin.cls.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def edited_config(cooked) -> dict:
    """The base model's config dict with every `hf_edits` config entry applied in order."""
    config = dict(cooked.origin.config)
    for edit in getattr(cooked, "hf_edits", []):
        config.update(edit.get("config", {}))
    return config


def renamed_state(cooked) -> dict[str, torch.Tensor]:
    """The cooked model's state under the names (and layouts) a model built from `edited_config` uses."""
    rename: dict[str, str] = {}
    for edit in getattr(cooked, "hf_edits", []):
        rename.update(edit.get("rename", {}))

    def name(key: str) -> str:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # the longest renamed module path holding the key
            prefix = ".".join(parts[:cut])
            if prefix in rename:
                return ".".join([rename[prefix], *parts[cut:]])
        return key

    return {name(k): _hf_layout(cooked, k, v) for k, v in cooked.state_dict().items()}


def _hf_layout(cooked, key: str, value: torch.Tensor) -> torch.Tensor:
    """HF `Conv1D` (GPT-2) keeps `[in, out]` weights; capture made them `[out, in]`."""
    module, _, leaf = key.rpartition(".")
    conv1d = leaf == "weight" and getattr(cooked, "module_types", {}).get(module) == "Conv1D"
    return value.t().contiguous() if conv1d else value


def _build(cooked):
    cls = _base_class(cooked)
    config = cls.config_class.from_dict(edited_config(cooked))
    with torch.random.fork_rng(devices=[]):
        model = cls(config)
    model = model.to(getattr(torch, cooked.origin.dtype)).eval()
    result = model.load_state_dict(renamed_state(cooked), strict=False)
    tied = {k for k in result.missing_keys if k in _tied_keys(model)}
    missing, unexpected = sorted(set(result.missing_keys) - tied), sorted(result.unexpected_keys)
    if missing or unexpected:
        raise HFExportError(
            f"HF export: a plain {cls.__name__} has no place for state {unexpected[:3]} and lacks {missing[:3]} "
            f"(the passes {[r.name for r in cooked.history]} left structure a plain HF model cannot express, "
            f"e.g. quantizers, masks, experts); ship the fxcook artifact (fxcook.save) instead"
        )
    return model


def _tied_keys(model) -> set[str]:
    """State keys sharing storage with another key (tied embeddings and heads)."""
    seen, tied = {}, set()
    for key, value in model.state_dict(keep_vars=True).items():
        if value.data_ptr() in seen:
            tied.add(key)
        seen.setdefault(value.data_ptr(), key)
    return tied


def _check_same(cooked, reloaded, where: Path, rtol: float, atol: float) -> None:
    inputs = cooked.origin.inputs
    with torch.no_grad():
        want, got = main_output(call_batch(cooked, inputs)), main_output(call_batch(reloaded, inputs))
    if want is None or got is None or want.shape != got.shape or not torch.allclose(got, want, rtol=rtol, atol=atol):
        diff = (
            float((got - want).abs().max())
            if got is not None and want is not None and got.shape == want.shape
            else None
        )
        raise HFExportError(
            f"HF export: the model written to {where} does not reproduce the cooked model's output on its example "
            f"inputs (max abs difference {diff}); it was deleted: ship the fxcook artifact (fxcook.save) instead"
        )


def save_pretrained(cooked, directory: str | os.PathLike, *, rtol: float = 1e-4, atol: float = 1e-5) -> Path:
    """Write `cooked` as an HF model directory `from_pretrained` of its base class loads; returns it.

    Verified before it lands: the directory is built aside, reloaded and compared with `cooked` on the
    inputs it was captured on; on any failure nothing is left at `directory`.
    """
    out = Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HFExportError(f"HF export: {out} exists and is not an empty directory; choose another path or remove it")
    model = _build(cooked)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        reloaded = type(model).from_pretrained(tmp).to(model.dtype).eval()
        _check_same(cooked, reloaded, out, rtol, atol)
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
