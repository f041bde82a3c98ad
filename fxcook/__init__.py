"""fxcook: model compression as explicit, composable, verifiable FX graph passes."""
from .errors import (CaptureError, FxcookError, NotSupportedYet, PassError, PreconditionError,
                     RecipeError, SelectorError)
from .cooked import CookedModel
from .nn import CookedLinear
from .artifact import load, save
from .pipeline import apply, capture, compile
from .select import Select

__all__ = [
    "CaptureError", "CookedLinear", "CookedModel", "FxcookError", "NotSupportedYet", "PassError",
    "PreconditionError", "RecipeError", "Select", "SelectorError", "apply", "capture", "compile",
    "load", "load_recipe", "save",
]


def load_recipe(path):
    """Load and validate a YAML/JSON recipe (see `fxcook.recipe`)."""
    from .recipe import load_recipe as _load

    return _load(path)


def __getattr__(name):
    # Training and losses pull in torch.distributed; load them on first use.
    if name == "train":
        from .trainer import train
        return train
    if name == "DistillLoss":
        from .distill import DistillLoss
        return DistillLoss
    raise AttributeError(f"module 'fxcook' has no attribute {name!r}")
