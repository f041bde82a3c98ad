"""fxcook: model compression as explicit, composable, verifiable FX graph passes."""

import importlib

from fxcook.artifact import load, save
from fxcook.cooked import CookedModel
from fxcook.errors import (
    CaptureError,
    FxcookError,
    NotSupportedYet,
    PassError,
    PreconditionError,
    RecipeError,
    SelectorError,
)
from fxcook.nn import CookedLinear
from fxcook.pipeline import apply, capture, compile
from fxcook.select import Select

__all__ = [
    "CaptureError",
    "CookedLinear",
    "CookedModel",
    "FxcookError",
    "NotSupportedYet",
    "PassError",
    "PreconditionError",
    "RecipeError",
    "Select",
    "SelectorError",
    "apply",
    "capture",
    "compile",
    "load",
    "load_recipe",
    "save",
]


def load_recipe(path):
    """Load and validate a YAML/JSON recipe (see `fxcook.recipe`)."""
    from fxcook.recipe import load_recipe as _load

    return _load(path)


SUBMODULES = ("passes", "runtime")  # heavy (every pass; ONNX/TensorRT backends): imported on first use


def __getattr__(name):
    # Submodules, training and losses pull in much more than capture needs; load them on first use.
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "train":
        from fxcook.training.loop import train

        return train
    if name == "DistillLoss":
        from fxcook.training.losses import DistillLoss

        return DistillLoss
    raise AttributeError(f"module 'fxcook' has no attribute {name!r}")
