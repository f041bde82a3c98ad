"""The pass protocol: requires -> call -> ensures, returning a readable change log.

Each technique is one `Pass` subclass in `fxcook.passes`, configured by a pydantic model (so recipe
errors name the key), declaring which passes must come before it (`after`). Passes rewrite the
`CookedModel` they are given and nothing else.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class PassConfig(BaseModel):
    """Base of every pass config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


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

    def __init__(self, **kwargs):
        self.config = self.Config(**kwargs)

    def requires(self, cooked) -> None:
        """Raise PreconditionError when the pass cannot apply to `cooked` as it stands."""

    @abc.abstractmethod
    def call(self, cooked) -> PassResult:
        """Rewrite `cooked` and say what changed."""

    def ensures(self, cooked) -> None:
        """Raise PassError when the pass's guarantee does not hold after `call`."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump(exclude_defaults=True).items())
        return f"{type(self).__name__}({args})"
