"""Relufy: replace the GELU/SiLU activation of FFN sites with ReLU.

MoEfication needs ReLU: its expert scores and parameter clustering rely on exactly-zero,
non-negative activations (and on positive homogeneity of ReLU). Models trained with GELU or SiLU,
such as the embedded MiniLM, become MoEfiable after this pass; the accuracy it costs is recovered
by distillation against the original model. The activation module of each FFN site is swapped for
`nn.ReLU`, so every call site keeps calling it; the FFN site's `act_op` becomes "relu".
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from fxcook.errors import PassError, PreconditionError
from fxcook.passbase import Change, Pass, PassConfig, PassResult
from fxcook.select import Select

__all__ = ["Relufy"]

REPLACEABLE = ("gelu", "gelu_tanh", "silu")


class RelufyConfig(PassConfig):
    select: Select = Field(default_factory=lambda: Select(kind="ffn"))


class Relufy(Pass):
    """FFN activations (GELU, tanh-GELU, SiLU; gated FFNs' gate activation too) -> ReLU."""

    name = "relufy"
    Config = RelufyConfig

    def _sites(self, cooked):
        if self.config.select.kind != "ffn":
            raise PreconditionError(f"relufy: select.kind must be 'ffn', got {self.config.select.kind!r}")
        return [s for s in self.config.select.resolve(cooked) if s.info.get("act_op") in REPLACEABLE]

    def requires(self, cooked) -> None:
        for site in self._sites(cooked):  # FFNs that are already ReLU are left as they are
            if site.info.get("act") is None:
                raise PreconditionError(
                    f"relufy: the activation of FFN {site.path} is not a module of its own (inline "
                    f"{site.info['act_op']}), so it cannot be swapped"
                )

    def call(self, cooked) -> PassResult:
        changes = []
        self._swapped = []
        for site in self._sites(cooked):
            act = site.info["act"]
            cooked.swap(act, nn.ReLU())
            cooked.sites.update(site.path, "ffn", act_op="relu")
            if any(s.path == act for s in cooked.sites.find("activation")):
                cooked.sites.update(act, "activation", type="ReLU")
            self._swapped.append(act)
            changes.append(Change(act, f"{site.info['act_op']} -> relu"))
        return self.finish(cooked, changes)

    def ensures(self, cooked) -> None:
        for path in self._swapped:
            if not isinstance(cooked.get_submodule(path), nn.ReLU):
                raise PassError(f"relufy: {path} is not ReLU after the pass")
