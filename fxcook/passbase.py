"""The pass protocol: requires -> call -> ensures, returning a readable change log.

Each technique is one `Pass` subclass in `fxcook.passes`, configured by a pydantic model (so recipe
errors name the key), declaring which passes must come before it (`after`). Passes rewrite the
`CookedModel` they are given and nothing else. Options are keyword-only: `Sparsify("3:4")` would
otherwise be read as some other argument and build a model nobody asked for.

A pass that finishes with `self.finish(cooked, changes)` leaves its recipe entry (name + config,
no calibration data) and the data-derived structure it chose (`record()`) on the model, so
`fxcook.save` can write how to rebuild it. `fxcook.load` sets `restore` to that record: the pass
then builds the same structure with placeholder values (no calibration, mask search or router
training), and the saved state fills them in.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from fxcook.errors import FxcookError

ENTRIES = "pass_entries"  # attribute of a CookedModel: one {"pass", "config", "record"} per finished pass


class PassConfig(BaseModel):
    """Base of every pass config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class PassOptionError(FxcookError, TypeError):
    """A pass was given an option positionally."""


@dataclass(frozen=True)
class Change:
    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


@dataclass
class PassResult:
    changes: list[Change] = field(default_factory=list)


class Pass(abc.ABC):
    """A graph pass. Subclasses set `name` and `Config` and implement `call`."""

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    after: ClassVar[tuple[str, ...]] = ()
    restore: dict[str, Any] | None = None  # set by fxcook.load: rebuild from this record, not from data

    def __init__(self, *args, **kwargs):
        if args:
            raise PassOptionError(
                f"{type(self).__name__}: pass options are keyword-only, got positional {args!r}; name them, "
                f"e.g. {type(self).__name__}({_first_field(self.Config)}={args[0]!r})"
            )
        self.config = self.Config(**kwargs)

    def requires(self, cooked) -> None:
        """Raise PreconditionError when the pass cannot apply to `cooked` as it stands."""

    @abc.abstractmethod
    def call(self, cooked) -> PassResult:
        """Rewrite `cooked` and say what changed (end with `return self.finish(cooked, changes)`)."""

    def ensures(self, cooked) -> None:
        """Raise PassError when the pass's guarantee does not hold after `call`."""

    @property
    def restoring(self) -> bool:
        return self.restore is not None

    def record(self) -> dict[str, Any]:
        """What the pass decided from data and a rebuild cannot see in the state (JSON-able)."""
        return {}

    def finish(self, cooked, changes: list[Change]) -> PassResult:
        """Leave this pass's recipe entry and record on `cooked`; the result of `call`."""
        entry = {"pass": self.name, "config": self.config.model_dump(mode="json"), "record": self.record()}
        cooked.__dict__.setdefault(ENTRIES, []).append(entry)
        return PassResult(list(changes))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump(exclude_defaults=True).items())
        return f"{type(self).__name__}({args})"


class DataPass(Pass):
    """A pass that may read calibration data: an iterable of model inputs, runtime data rather than
    recipe config, so a keyword of the constructor."""

    def __init__(self, *args, calibration=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.calibration = calibration


def _first_field(config: type[PassConfig]) -> str:
    return next(iter(config.model_fields), "option")
