"""Error types: every message names the module, key, pass or file at fault."""


class FxcookError(Exception):
    """Base class of all fxcook errors."""


class CaptureError(FxcookError):
    """A model could not be captured to a graph."""


class SelectorError(FxcookError):
    """A selector matched nothing or was malformed."""


class RecipeError(FxcookError):
    """A recipe file is invalid."""


class PassError(FxcookError):
    """A pass failed inside the pipeline."""


class PreconditionError(FxcookError):
    """A pass cannot apply to the model as it stands."""


class NotSupportedYet(FxcookError):
    """A technique that fxcook maps but has not built yet."""
