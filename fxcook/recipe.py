"""Recipes: a YAML or JSON file naming passes and their configs, validated before anything runs.

    passes:
      - quantize: {weights: int8/channel, acts: int8/token}
      - sparsify: {pattern: "2:4", method: wanda}
    calibration: {data: shakespeare, samples: 64, batch_size: 16, max_length: 128}
    train: {...}            # options of `fxcook train`

Errors name the key at fault (`passes[1].quantize.method: ...`). `from_bmcook` imports BMCook's JSON
config; a technique fxcook maps but has not built yet raises NotSupportedYet, never a silent skip.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import NotSupportedYet, RecipeError
from .passbase import Pass


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str = "shakespeare"
    samples: int = Field(64, gt=0)
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(128, gt=1)
    seed: int = 0


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    passes: list[dict[str, dict[str, Any] | None]] = []
    calibration: Calibration = Calibration()
    train: dict[str, Any] | None = None
    source: str = Field("<memory>", exclude=True)

    def build(self, calibration=None) -> list[Pass]:
        """Pass objects for `passes`; data-aware passes receive `calibration` (an iterable of inputs)."""
        from fxcook.passes import REGISTRY

        out = []
        for i, item in enumerate(self.passes):
            if len(item) != 1:
                raise RecipeError(f"{self.source}: passes[{i}] must have exactly one key (the pass name), got {sorted(item)}")
            (name, cfg), = item.items()
            if name not in REGISTRY:
                raise RecipeError(f"{self.source}: passes[{i}]: unknown pass {name!r}; known passes: {', '.join(sorted(REGISTRY))}")
            cls = REGISTRY[name]
            kwargs = dict(cfg or {})
            if "calibration" in inspect.signature(cls.__init__).parameters:
                kwargs["calibration"] = calibration
            try:
                out.append(cls(**kwargs))
            except ValidationError as e:
                raise RecipeError(f"{self.source}: {_explain(e, f'passes[{i}].{name}')}") from e
        return out


def _explain(err: ValidationError, prefix: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        parts.append(f"{prefix}.{loc}: {e['msg']}" if loc else f"{prefix}: {e['msg']}")
    return "; ".join(parts)


def parse_recipe(data: dict, source: str = "<memory>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping with a 'passes' list, got {type(data).__name__}")
    try:
        recipe = Recipe(**data)
    except ValidationError as e:
        raise RecipeError(f"{source}: {_explain(e, 'recipe')}") from e
    recipe.source = source
    recipe.build()  # validate every pass config now, before any work
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read a .yaml/.yml/.json recipe (or a BMCook JSON config) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise RecipeError(f"recipe {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from e
    if isinstance(data, dict) and set(data) & set(BMCOOK_KEYS) and "passes" not in data:
        data = from_bmcook(data, str(path))
    return parse_recipe(data, str(path))


# BMCook config key -> (fxcook pass, flag that switches it on)
BMCOOK_KEYS = {"quantization": ("quantize", "is_quant"), "pruning": ("sparsify", "is_pruning"),
               "MoEfication": ("moefy", "is_moefy"), "distillation": ("tap", None)}


def from_bmcook(config: dict, source: str = "<bmcook>") -> dict:
    """Translate BMCook's JSON config into an fxcook recipe mapping."""
    from fxcook.passes import REGISTRY

    unknown = set(config) - set(BMCOOK_KEYS)
    if unknown:
        raise RecipeError(f"{source}: unknown BMCook key(s) {sorted(unknown)}; known: {sorted(BMCOOK_KEYS)}")
    passes, train = [], None
    for key in ("pruning", "quantization", "MoEfication"):
        section = config.get(key) or {}
        name, flag = BMCOOK_KEYS[key]
        if not section.get(flag):
            continue
        if name not in REGISTRY:
            raise NotSupportedYet(f"{source}: BMCook key {key!r} maps to fxcook pass {name!r}, which is not supported yet")
        passes.append({name: _bmcook_pass(key, section)})
    distill = config.get("distillation") or {}
    pairs = list(distill.get("mse_hidn_module") or [])
    if distill.get("ce_scale") or distill.get("mse_hidn_scale"):
        if "tap" not in REGISTRY:
            raise NotSupportedYet(f"{source}: BMCook key 'distillation' maps to fxcook pass 'tap', which is not supported yet")
        if pairs:
            passes.append({"tap": {"taps": pairs}})
        train = {"loss": {"kl": float(distill.get("ce_scale", 0)), "hidden_mse": float(distill.get("mse_hidn_scale", 0)),
                          "temperature": float(distill.get("ce_temp", 1.0))}}
    return {"passes": passes, "train": train}


def _bmcook_pass(key: str, section: dict) -> dict:
    modules = section.get("quantized_module") or section.get("pruned_module") or section.get("first_FFN_module")
    cfg: dict[str, Any] = {"include": modules} if modules else {}
    if key == "pruning":
        cfg.update(pattern="2:4", method=section.get("mask_method", "m4n2_1d"))
    elif key == "MoEfication":
        cfg.update({k: section[k] for k in ("experts", "top_k") if k in section})
    return cfg
