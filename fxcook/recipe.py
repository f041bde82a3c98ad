"""Recipes: a YAML or JSON file naming passes and their configs, validated before anything runs.

    passes:
      - quantize: {weights: int8/channel, acts: int8/token}
      - sparsify: {pattern: "2:4", method: wanda}
    calibration: {data: shakespeare, samples: 64, batch_size: 16, max_length: 128}
    train: {...}            # options of `fxcook train`

Errors name the key at fault (`passes[1].quantize.method: ...`). `from_bmcook` imports BMCook's JSON
config (its README's keys; a key or value fxcook does not map is a RecipeError naming it); a technique
fxcook maps but has not built yet raises NotSupportedYet, never a silent skip.

A staged recipe holds `stages:` instead of `passes:`/`train:`; each stage applies its passes to the
model the previous stage produced, then trains it (`fxcook.stages.run_stages`, `fxcook train`):

    stages:
      - name: relu
        passes: [{relufy: {}}]
        train: {steps: 300, lr: 1e-4, teacher: original}
      - name: moe
        passes: [{moefy: {experts: 32, top_k: 16}}]
        train: {steps: 300, teacher: previous, loss: {hidden_mse: 1.0, hidden_cos: 1.0}}
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fxcook.errors import NotSupportedYet, RecipeError
from fxcook.passbase import DataPass, Pass
from fxcook.training.losses import DistillConfig

SHIPPED = Path(__file__).resolve().parent / "recipes"  # package data: there in an installed wheel too


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str = "shakespeare"
    samples: int = Field(64, gt=0)
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(128, gt=1)
    seed: int = 0


PassItems = list[dict[str, dict[str, Any] | None]]


class TrainSection(BaseModel):
    """A recipe's (or a stage's) `train:` block; unset keys fall back to `fxcook train`'s flags/defaults."""

    model_config = ConfigDict(extra="forbid")
    steps: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    grad_accum: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    warmup: int | None = Field(None, ge=0)
    schedule: Literal["cosine", "linear", "constant"] | None = None
    max_length: int | None = Field(None, gt=1)
    save_every: int | None = Field(None, ge=0)
    seed: int | None = None
    loss: DistillConfig | None = None
    group_by_length: bool | None = None  # batches of lines of like length: less padding per step
    trainable: str | list[str] | None = None  # 'all', roles, parameter globs (fxcook.training.trainable)
    data: str | None = None  # text for this stage: 'shakespeare' or a file/directory (default: the run's)
    teacher: Literal["original", "previous"] = "original"  # previous: the model the stage started from

    def settings(self) -> dict[str, Any]:
        """The keys the recipe sets, as `train()` keyword values (the loss as its config mapping)."""
        out = self.model_dump(exclude_none=True, exclude={"loss", "data", "teacher"})
        if self.loss is not None:
            out["loss"] = self.loss.model_dump(exclude_defaults=True)
        return out


class Stage(BaseModel):
    """One stage: passes applied to the previous stage's model, then an optional training run."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    passes: PassItems = []
    calibration: Calibration | None = None  # default: the recipe's
    train: TrainSection | None = None


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    passes: PassItems = []
    calibration: Calibration = Calibration()
    train: TrainSection | None = None
    stages: list[Stage] | None = None
    source: str = Field("<memory>", exclude=True)

    @model_validator(mode="after")
    def _stages_alone(self):
        if self.stages is not None and (self.passes or self.train is not None):
            raise ValueError("a recipe holds either stages: or top-level passes:/train:, not both")
        return self

    @property
    def staged(self) -> bool:
        return self.stages is not None

    @property
    def all_passes(self) -> PassItems:
        """Every pass item in order: the top-level list, or each stage's in turn."""
        return [item for stage in self.stages for item in stage.passes] if self.staged else self.passes

    def stage_label(self, i: int) -> str:
        name = self.stages[i].name
        return f"stages[{i}] ({name!r})" if name else f"stages[{i}]"

    def build(self, calibration=None) -> list[Pass]:
        """Pass objects for `passes` (every stage's, in order, for a staged recipe: the one-shot model);
        data-aware passes receive `calibration` (an iterable of inputs)."""
        if not self.staged:
            return build_passes(self.passes, calibration, self.source, "passes")
        return [p for i in range(len(self.stages)) for p in self.build_stage(i, calibration)]

    def build_stage(self, i: int, calibration=None) -> list[Pass]:
        return build_passes(self.stages[i].passes, calibration, self.source, f"stages[{i}].passes")

    def stage_calibration(self, i: int) -> Calibration:
        return self.stages[i].calibration or self.calibration


def build_passes(items: PassItems, calibration, source: str, where: str) -> list[Pass]:
    """Pass objects for recipe items; errors name `where[i]` and the pass's key."""
    from fxcook.passes import REGISTRY

    out = []
    for i, item in enumerate(items):
        if len(item) != 1:
            raise RecipeError(f"{source}: {where}[{i}] must have exactly one key (the pass name), got {sorted(item)}")
        ((name, cfg),) = item.items()
        if name not in REGISTRY:
            raise RecipeError(
                f"{source}: {where}[{i}]: unknown pass {name!r}; known passes: {', '.join(sorted(REGISTRY))}"
            )
        cls = REGISTRY[name]
        kwargs = dict(cfg or {})
        if issubclass(cls, DataPass):
            kwargs["calibration"] = calibration
        try:
            out.append(cls(**kwargs))
        except ValidationError as e:
            raise RecipeError(f"{source}: {_explain(e, f'{where}[{i}].{name}')}") from e
    return out


def _check_stages(recipe: Recipe) -> None:
    """Each stage does something, and no pass must run after one of a later stage (`Pass.after`)."""
    built = [recipe.build_stage(i) for i in range(len(recipe.stages))]
    for i, (stage, passes) in enumerate(zip(recipe.stages, built)):
        if not passes and stage.train is None:
            raise RecipeError(
                f"{recipe.source}: {recipe.stage_label(i)} has no passes and no train section: "
                f"give it passes to apply or a train: block, or remove it"
            )
        for p in passes:
            for j in range(i + 1, len(built)):
                late = [q.name for q in built[j] if q.name in p.after]
                if late:
                    raise RecipeError(
                        f"{recipe.source}: {recipe.stage_label(i)}.passes: {p.name!r} must run after "
                        f"{late[0]!r}, which comes in the later {recipe.stage_label(j)}; move it to an "
                        f"earlier stage"
                    )


def _explain(err: ValidationError, prefix: str) -> str:
    parts = []
    for e in err.errors():
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in e["loc"]).lstrip(".")
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
    if recipe.staged:
        _check_stages(recipe)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read a .yaml/.yml/.json recipe (or a BMCook JSON config) and validate it. A bare name such as
    `int8` is one of the recipes shipped in fxcook/recipes/, when no such file exists."""
    path = Path(path)
    shipped = SHIPPED / f"{path.name}.yaml"
    if not path.is_file() and path.name == str(path) and shipped.is_file():
        path = shipped
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
        raise RecipeError(f"recipe {path} does not exist (shipped recipes, usable by name: {names})")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise RecipeError(f"recipe {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from e
    if isinstance(data, dict) and set(data) & set(BMCOOK_KEYS) and "passes" not in data:
        data = from_bmcook(data, str(path))
    return parse_recipe(data, str(path))


class _BMCookSection(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BMCookPruning(_BMCookSection):
    is_pruning: bool = False
    pruning_mask_path: str | None = None  # BMCook's mask file; fxcook keeps masks in the saved model
    pruned_module: list[str] = []
    mask_method: str = "m4n2_1d"
    sprune: dict[str, Any] | None = None  # read by BMCook only with mask_method "sprune"


class BMCookQuantization(_BMCookSection):
    is_quant: bool = False
    quantized_module: list[str] = []


class BMCookMoEfication(_BMCookSection):
    is_moefy: bool = False
    first_FFN_module: list[str] = []
    experts: int | None = None  # fxcook's additions: BMCook takes these on its command line
    top_k: int | None = None


class BMCookDistillation(_BMCookSection):
    ce_scale: float = 0.0
    ce_temp: float = 1.0
    mse_hidn_scale: float = 0.0
    mse_hidn_module: list[str] = []
    mse_hidn_proj: bool = False
    mse_att_scale: float = 0.0
    mse_att_module: list[str] = []


class BMCookConfig(_BMCookSection):
    """BMCook's JSON config (its README's schema); a section's switch off means BMCook ignores its values."""

    distillation: BMCookDistillation = BMCookDistillation()
    pruning: BMCookPruning = BMCookPruning()
    quantization: BMCookQuantization = BMCookQuantization()
    MoEfication: BMCookMoEfication = BMCookMoEfication()


BMCOOK_KEYS = tuple(BMCookConfig.model_fields)
BMCOOK_MASK_METHODS = ("m4n2_1d", "m4n2_2d")


def from_bmcook(config: dict, source: str = "<bmcook>") -> dict:
    """Translate BMCook's JSON config into an fxcook recipe mapping.

    Every key is BMCook's; one fxcook cannot honour (a typo, `bits`, `mse_hidn_proj: true`, sprune) is
    a RecipeError naming it. Module lists keep BMCook's meaning (a substring of the parameter name).
    """
    try:
        cfg = BMCookConfig(**config)
    except ValidationError as e:
        raise RecipeError(f"{source}: {_explain_bmcook(e)}") from e
    passes = []
    if cfg.pruning.is_pruning:
        passes.append({"sparsify": _bmcook_pruning(cfg.pruning, source)})
    if cfg.quantization.is_quant:
        passes.append({"quantize": _bmcook_select(cfg.quantization.quantized_module)})
    if cfg.MoEfication.is_moefy:
        passes.append({"moefy": _bmcook_moefication(cfg.MoEfication, source)})
    tap, train = _bmcook_distillation(cfg.distillation, source)
    passes += tap
    _require_passes(passes, source)
    return {"passes": passes, "train": train}


def _explain_bmcook(err: ValidationError) -> str:
    """Each error with its dotted key; an unknown key also lists the keys BMCook has there."""
    parts = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            section = BMCookConfig.model_fields.get(str(e["loc"][0])) if len(e["loc"]) > 1 else None
            known = section.annotation.model_fields if section else BMCookConfig.model_fields
            parts.append(f"unknown BMCook key {key!r} (known here: {', '.join(known)})")
        else:
            parts.append(f"BMCook key {key!r}: {e['msg']}")
    return "; ".join(parts)


def _bmcook_select(modules: list[str], kind: str = "linear") -> dict:
    """BMCook selects parameters whose name contains a listed string: the same as a regex search on the
    module path (a trailing `.weight` / `.bias` names the module's parameter)."""
    if not modules:
        return {}
    names = [m.removesuffix(".weight").removesuffix(".bias") for m in modules]
    return {"select": {"include": [f"re:{re.escape(n)}" for n in names], "kind": kind, "scope": "all"}}


def _bmcook_moefication(section: BMCookMoEfication, source: str) -> dict:
    missing = [k for k in ("experts", "top_k") if getattr(section, k) is None]
    if missing:
        raise RecipeError(
            f"{source}: BMCook key 'MoEfication' needs {' and '.join(missing)} for fxcook (BMCook "
            "takes the expert count and top-k on its command line); add them to the section"
        )
    return {"experts": section.experts, "top_k": section.top_k, **_bmcook_select(section.first_FFN_module, "ffn")}


def _bmcook_pruning(section: BMCookPruning, source: str) -> dict:
    if section.mask_method not in BMCOOK_MASK_METHODS:
        raise RecipeError(
            f"{source}: BMCook key 'pruning.mask_method' = {section.mask_method!r} is not mapped by "
            f"fxcook; use one of {', '.join(BMCOOK_MASK_METHODS)}"
        )
    if section.pruning_mask_path:
        warnings.warn(
            f"{source}: BMCook key 'pruning.pruning_mask_path' = {section.pruning_mask_path!r} is neither "
            "read nor written: fxcook computes the masks and keeps them in the saved model",
            stacklevel=3,
        )
    return {"pattern": "2:4", "method": section.mask_method, **_bmcook_select(section.pruned_module)}


def _bmcook_distillation(section: BMCookDistillation, source: str) -> tuple[list[dict], dict | None]:
    """The tap pass and train losses of BMCook's distillation (on when ce_scale or mse_hidn_scale > 0)."""
    if not (section.ce_scale or section.mse_hidn_scale):
        return [], None
    unmapped = {"mse_hidn_proj": section.mse_hidn_proj, "mse_att_scale": section.mse_att_scale}
    for key, value in unmapped.items():
        if value:
            raise RecipeError(
                f"{source}: BMCook key 'distillation.{key}' = {json.dumps(value)} is not mapped by "
                f"fxcook; set it to {json.dumps(type(value)())} (fxcook distils logits and tapped "
                "hidden states)"
            )
    tap = [{"tap": {"taps": section.mse_hidn_module}}] if section.mse_hidn_module else []
    return tap, {"loss": {"kl": section.ce_scale, "hidden_mse": section.mse_hidn_scale, "temperature": section.ce_temp}}


def _require_passes(passes: list[dict], source: str) -> None:
    from fxcook.passes import REGISTRY

    for item in passes:
        ((name, _),) = item.items()
        if name not in REGISTRY:
            raise NotSupportedYet(
                f"{source}: the BMCook config maps to fxcook pass {name!r}, which is not supported yet"
            )
