"""Artifacts: one directory holding a compressed model and how to rebuild it (`save`, `load`).

    model.safetensors   the state: int8 codes + scales where quantized (`fxcook.checkpoint`)
    inputs.safetensors  the example inputs the model was captured on
    config.json         the base model's transformers config (transformers models only)
    fxcook.json         format and fxcook versions, the base model's class, the example inputs' layout,
                        the passes as recipe entries (name + config, no calibration data) and what each
                        pass decided from data that the state does not show (`Pass.record`)
    report.txt          the pass history and per-layer sizes
    <recipe file>       the recipe, when given
    manifest.json       sha256 of every file + a fingerprint of the passes and the state's shapes

`load` checks the manifest first, rebuilds the base model (from its class and config, random init:
the weights come from the file), captures it on the saved inputs, re-applies the passes in restore
mode (no calibration, mask search or router training: placeholders of the right structure), checks
the fingerprint and then loads the state strictly. `load(save(m))` computes what `m` computes.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fxcook import manifest
from fxcook.checkpoint import load_quantized, save_quantized
from fxcook.cooked import Origin, class_path
from fxcook.errors import FxcookError
from fxcook.passbase import ENTRIES
from fxcook.tracing import split_inputs

__all__ = ["FORMAT", "ArtifactError", "Origin", "load", "save"]

FORMAT = 1
DESCRIPTION = "fxcook.json"
WEIGHTS, INPUTS, CONFIG, REPORT = "model.safetensors", "inputs.safetensors", "config.json", "report.txt"
TOKENIZER = "tokenizer"  # a folder: the tokenizer the model was compressed with, when the caller gives one


class ArtifactError(FxcookError):
    """A model cannot be saved as an artifact, or a directory cannot be loaded as one."""


def _version() -> str:
    try:
        return version("fxcook")
    except PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------ example inputs


def _pack_inputs(inputs: Any) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON layout, tensors) of example inputs: tensors go to safetensors, plain values stay in JSON."""
    args, kwargs = split_inputs(inputs)
    tensors: dict[str, torch.Tensor] = {}

    def one(name: str, value: Any) -> dict:
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu().contiguous()
            return {"tensor": name}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise ArtifactError(
            f"example input {name!r} is a {type(value).__name__}: an artifact stores tensors and "
            f"plain values only; capture on a batch of tensors"
        )

    layout = {
        "args": [one(f"args.{i}", v) for i, v in enumerate(args)],
        "kwargs": {k: one(f"kwargs.{k}", v) for k, v in kwargs.items()},
    }
    return layout, tensors


def _unpack_inputs(layout: dict, tensors: dict[str, torch.Tensor]) -> Any:
    def one(item: dict) -> Any:
        return tensors[item["tensor"]] if "tensor" in item else item["value"]

    if layout["kwargs"]:
        return {k: one(v) for k, v in layout["kwargs"].items()}
    return tuple(one(v) for v in layout["args"])


# ------------------------------------------------------------------------------ passes


def _entries(cooked) -> list[dict]:
    """The recipe entries of every pass in `cooked.history`; a pass that left none cannot be saved."""
    entries = list(getattr(cooked, ENTRIES, None) or [])
    ran = [r.name for r in cooked.history]
    recorded = [e["pass"] for e in entries]
    if recorded != ran:
        first = next(i for i, (a, b) in enumerate(zip([*ran, None], [*recorded, None])) if a != b)
        raise ArtifactError(
            f"pass {ran[first] if first < len(ran) else recorded[first]!r} has no recipe entry "
            f"matching the history (it does not end with Pass.finish), so an artifact could not "
            f"rebuild it; passes run: {ran}"
        )
    return entries


def _passes(entries: list[dict], source: str) -> list:
    """Pass objects in restore mode for recipe entries (built by the recipe, which knows every pass)."""
    from fxcook.recipe import Recipe

    built = Recipe(passes=[{e["pass"]: e["config"]} for e in entries], source=source).build()
    for p, entry in zip(built, entries, strict=True):
        p.restore = dict(entry.get("record") or {})
    return built


# ------------------------------------------------------------------------------ save


@contextmanager
def _aside(out: Path) -> Iterator[Path]:
    """A fresh directory next to `out`; on success it replaces `out` (an older artifact there is
    moved away first and deleted last), on failure it is removed and `out` stays as it was."""
    if out.is_file():
        raise ArtifactError(f"{out} is a file; an artifact is a directory: choose another path")
    if out.is_dir() and any(out.iterdir()) and not (out / manifest.MANIFEST).is_file():
        raise ArtifactError(
            f"{out} exists and is not a fxcook artifact (no {manifest.MANIFEST}); it is not "
            f"replaced: choose another directory or remove it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = None
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; it becomes the output directory
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save(
    cooked,
    out_dir: str | os.PathLike,
    recipe: str | os.PathLike | None = None,
    *,
    extras: Mapping[str, Callable[[Path], object]] | None = None,
) -> Path:
    """Write `cooked` as an artifact directory (see the module docstring); returns its path.

    `extras`: file name -> function writing that file (e.g. an ONNX export), run inside the new
    directory so the manifest covers it. The directory is built aside and renamed into place, so a
    reader never sees half an artifact.
    """
    out = Path(out_dir)
    origin = getattr(cooked, "origin", None)
    if not isinstance(origin, Origin):
        raise ArtifactError(
            "this model was not made by fxcook.capture/compile (it has no origin), so an artifact could not rebuild it"
        )
    if recipe is not None and not Path(recipe).is_file():
        raise ArtifactError(f"recipe {recipe} does not exist")
    entries = _entries(cooked)
    _passes(entries, "<saved passes>")  # refuse to write what load could not rebuild
    layout, tensors = _pack_inputs(origin.inputs)
    description = {
        "format": FORMAT,
        "fxcook": _version(),
        "training": cooked.training,
        "model": {"class": origin.cls, "dtype": origin.dtype, "config": CONFIG if origin.config else None},
        "inputs": layout,
        "passes": entries,
    }
    with _aside(out) as tmp:
        save_quantized(cooked, tmp / WEIGHTS)
        save_file(tensors, str(tmp / INPUTS))
        if origin.config is not None:
            (tmp / CONFIG).write_text(json.dumps(origin.config, indent=2, sort_keys=True) + "\n")
        (tmp / DESCRIPTION).write_text(json.dumps(description, indent=1) + "\n")
        (tmp / REPORT).write_text(cooked.report(per_layer=True) + "\n")
        if recipe is not None:
            shutil.copyfile(recipe, tmp / Path(recipe).name)
        for name, write in (extras or {}).items():
            write(tmp / name)
        manifest.write(tmp, fingerprint=manifest.fingerprint(cooked, entries))
    return out


# ------------------------------------------------------------------------------ load


def is_artifact(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory written by `save` (rather than, say, a HuggingFace model)."""
    return (Path(path) / DESCRIPTION).is_file()


def tokenizer_extra(tokenizer) -> dict[str, Callable[[Path], object]]:
    """`save(..., extras=tokenizer_extra(tok))` stores `tok` in the artifact, so training or
    evaluating the saved model needs nothing but its directory."""
    return {TOKENIZER: lambda path: tokenizer.save_pretrained(str(path))}


def load_tokenizer(directory: str | os.PathLike):
    """The tokenizer stored by `tokenizer_extra` in artifact `directory`."""
    from transformers import AutoTokenizer

    folder = Path(directory) / TOKENIZER
    if not folder.is_dir():
        raise ArtifactError(
            f"{directory} holds no {TOKENIZER}/ folder (it was saved without a tokenizer); "
            f"save it with extras=tokenizer_extra(tok), as fxcook compress and train do"
        )
    return AutoTokenizer.from_pretrained(str(folder))


def _description(directory: Path) -> dict:
    try:
        desc = json.loads((directory / DESCRIPTION).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{directory / DESCRIPTION} cannot be read: {e}") from e
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        got = desc.get("format") if isinstance(desc, dict) else desc
        raise ArtifactError(
            f"{directory / DESCRIPTION}: artifact format {got!r}; this fxcook ({_version()}) reads format {FORMAT}"
        )
    return desc


def _import_class(path: str) -> type:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _rebuild(directory: Path, desc: dict) -> nn.Module:
    """The base model from its transformers class and config, randomly initialised (the file has the
    weights), without touching the caller's random number generators."""
    spec = desc["model"]
    if not spec["class"].startswith("transformers.") or not spec.get("config"):
        raise ArtifactError(
            f"{directory} was made from {spec['class']}, which is not a transformers model: "
            f"pass its base architecture, fxcook.load({str(directory)!r}, model=<a {spec['class']}>)"
        )
    cls = _import_class(spec["class"])
    config = cls.config_class.from_dict(json.loads((directory / spec["config"]).read_text()))
    with torch.random.fork_rng(devices=[]):
        model = cls(config)
    return model.to(getattr(torch, spec["dtype"])).eval()


def load(directory: str | os.PathLike, model: nn.Module | None = None):
    """The CookedModel saved in `directory` by `save`, rebuilt without calibration data.

    `model`: the base architecture to capture (needed when it is not a transformers model); it is
    not mutated. Every file is checked against the manifest before anything is read.
    """
    from fxcook.pipeline import apply, capture

    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory: fxcook.load reads an artifact written by fxcook.save")
    saved = manifest.verify(directory)
    desc = _description(directory)
    if model is not None and class_path(model) != desc["model"]["class"]:
        raise ArtifactError(
            f"{directory} was made from {desc['model']['class']}, the model given is {class_path(model)}"
        )
    base = _rebuild(directory, desc) if model is None else model
    inputs = _unpack_inputs(desc["inputs"], load_file(str(directory / INPUTS)))
    cooked = apply(capture(base, inputs, inplace=model is None), _passes(desc["passes"], str(directory / DESCRIPTION)))
    if manifest.fingerprint(cooked, _entries(cooked)) != saved.get("fingerprint"):
        raise manifest.ManifestError(
            f"{directory}: the rebuilt model does not match the artifact's fingerprint "
            f"(its passes or state shapes differ from the saved ones)"
        )
    load_quantized(cooked, directory / WEIGHTS)
    return cooked.train(bool(desc.get("training", False)))
