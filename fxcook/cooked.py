"""CookedModel: the captured module hierarchy plus its site index and pass history.

It *is* the unflattened module (its class is extended in place at capture), so its parameter names
and state_dict keys are the original model's, FSDP2 can shard its blocks, and it is called like the
original model and returns the same output type.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.export.unflatten import UnflattenedModule
from torch.fx import Graph
from torch.utils import _pytree as pytree

from fxcook.calling import Interface
from fxcook.passbase import Change
from fxcook.sites import SiteIndex
from fxcook.tracing import finalize, parent_of


def class_path(obj: Any) -> str:
    return f"{type(obj).__module__}:{type(obj).__qualname__}"


@dataclass
class Origin:
    """What a cooked model was captured from, enough to capture it again: the base model's class,
    its transformers config (None for other models), its dtype and (a copy of) the example inputs."""

    cls: str
    config: dict | None
    dtype: str
    inputs: Any

    @classmethod
    def of(cls, model: nn.Module, example_inputs: Any) -> Origin:
        config = getattr(model, "config", None)
        hf = type(model).__module__.startswith("transformers.") and hasattr(config, "to_dict")
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        inputs = pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, example_inputs)
        return cls(
            class_path(model),
            config.to_dict() if hf else None,
            str(floats[0] if floats else torch.float32).removeprefix("torch."),
            inputs,
        )


@dataclass
class PassRecord:
    """One pass as run: what it was, what it changed, and the model's size afterwards."""

    name: str
    spec: str
    changes: list[Change] = field(default_factory=list)
    params: int = 0
    activated: float = 0.0


class MaskSchedule(Protocol):
    """Masks a pass keeps changing during training (Sparsify with a `schedule`).

    The pass that appends one to `CookedModel.mask_schedules` owns it; the training loop advances it
    after each optimizer step and checkpoints its position (`last_update`, `final`); a pass that
    removes linears (Moefy) refuses to run on its `paths`.
    """

    paths: list[str]
    last_update: int | None
    final: bool

    def update(self, cooked: nn.Module, step: int) -> list[Change]: ...


class Regulariser(Protocol):
    """A training-only term a pass adds to the loss (Prune's L0 Lagrangian), kept in `CookedModel.regularisers`.

    `fxcook.train` adds `loss(cooked, step)` to every optimizer step's loss, once per step; trains
    `ascent_parameters()` (not the model's: e.g. Lagrange multipliers) by gradient *ascent* with a
    separate maximising optimizer at `ascent_lr`; trains `descent_parameters()` (the model's, e.g. gate
    logits) at the constant `descent_lr` instead of the model's scheduled lr (None: the model's lr);
    logs `log_terms()` (what the last `loss` computed) with the step; calls `after_step(cooked, step)`
    after each optimizer step (to keep parameters in range); and checkpoints the ascent parameters with
    their optimizer state, in list order. Nothing of it is saved with the model: after training, the
    state of the model's own parameters (the gates) is what counts.
    """

    ascent_lr: float
    descent_lr: float | None

    def loss(self, cooked: nn.Module, step: int) -> torch.Tensor: ...

    def ascent_parameters(self) -> list[nn.Parameter]: ...

    def descent_parameters(self) -> list[nn.Parameter]: ...

    def log_terms(self) -> dict[str, float]: ...

    def after_step(self, cooked: nn.Module, step: int) -> None: ...


class CookedModel(UnflattenedModule):
    """A compiled model: call it like the original; inspect `.sites`, `.history`, `.report()`."""

    sites: SiteIndex
    history: list[PassRecord]
    module_types: dict[str, str]
    interface: Interface | None  # None: the original forward takes positional-only inputs; call as captured
    mask_schedules: list[MaskSchedule]  # in the order the passes added them (checkpoints rely on it)
    regularisers: list[Regulariser]  # training-only loss terms, in the order the passes added them

    @classmethod
    def adopt(
        cls, root: UnflattenedModule, sites: SiteIndex, module_types: dict[str, str], interface: Interface | None = None
    ) -> CookedModel:
        root.__class__ = cls
        root.sites = sites
        root.history = []
        root.module_types = module_types
        root.interface = interface
        root.mask_schedules = []
        root.regularisers = []
        return root

    def forward(self, *args, **kwargs):
        """Called like the original model's forward (see `fxcook.calling`)."""
        if self.interface is None:
            return super().forward(*args, **kwargs)
        inputs, as_tuple = self.interface.bind(args, kwargs)
        return self.interface.finish(super().forward(**inputs), as_tuple)

    def __deepcopy__(self, memo: dict) -> CookedModel:
        """A full copy; export's graph metadata (fake tensors, which cannot be copied) is shared.

        Graphs are copied first (fx's Graph.__deepcopy__ shares each node's metadata values), and each old
        node is memoized as its copy: references from outside a graph (`input_placeholders`) then point into
        the copied graph instead of dragging along a stray node copy whose metadata a later copy would miss.
        """
        for mod in self.modules():
            if isinstance(mod.__dict__.get("meta"), dict):
                memo.setdefault(id(mod.__dict__["meta"]), mod.__dict__["meta"])
            graph = getattr(mod, "graph", None)
            if isinstance(graph, Graph) and id(graph) not in memo:
                for old, new_node in zip(graph.nodes, copy.deepcopy(graph, memo).nodes, strict=True):
                    memo[id(old)] = new_node
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        new.recompile()
        return new

    def parent(self, path: str) -> tuple[nn.Module, str]:
        """The module holding the submodule (or parameter) at `path`, and its name there."""
        return parent_of(self, path)

    def swap(self, path: str, module: nn.Module) -> nn.Module:
        """Replace the submodule at `path` (every call site keeps calling it); returns the old one."""
        parent, name = self.parent(path)
        old = getattr(parent, name)
        setattr(parent, name, module)
        return old

    def graphs(self):
        """(module path, module, graph) for every module of the hierarchy that has a graph."""
        for path, mod in self.named_modules():
            graph = getattr(mod, "graph", None)
            if isinstance(graph, Graph):
                yield path, mod, graph

    def named_nodes(self):
        """(`module.path/node`, node) for every node of every graph: names qualified by module path."""
        for path, _, graph in self.graphs():
            for node in graph.nodes:
                yield f"{path}/{node.name}", node

    def graph_notes(self) -> dict[str, str]:
        """`module.path/node` -> what the passes did there, for each call_module node they changed.

        The called module says it itself (a duck-typed `describe()`: CookedLinear, quantizers, MoEFFN,
        TapPoint; "" when untouched), so core knows no technique; a leaf module without one that a
        pass swapped in (Relufy's ReLU) is described by its class and that pass's last change, and an
        `nn.Identity` a pass left behind (Moefy's split form) as computed elsewhere.
        """
        changed = {c.path: c.what for record in self.history for c in record.changes}
        notes = {}
        for path, mod, graph in self.graphs():
            for node in graph.nodes:
                if node.op != "call_module":
                    continue
                callee, target = mod.get_submodule(node.target), f"{path}.{node.target}" if path else node.target
                if callable(getattr(callee, "describe", None)):
                    note = callee.describe()
                elif target in changed and isinstance(callee, nn.Identity):
                    note = "Identity (computed elsewhere since a pass)"
                elif target in changed and not isinstance(getattr(callee, "graph", None), Graph):
                    note = f"{type(callee).__name__} ({changed[target]})"
                else:
                    note = ""
                if note:
                    notes[f"{path}/{node.name}"] = note
        return notes

    def graph_text(self) -> str:
        """Every graph of the hierarchy, one node a line, each changed node followed by `# what was done`."""
        notes, lines = self.graph_notes(), []
        for path, _, graph in self.graphs():
            lines.append(f"graph {path or '(root)'}:")
            for node in graph.nodes:
                note = notes.get(f"{path}/{node.name}")
                lines.append(f"    {node.format_node()}" + (f"  # {note}" if note else ""))
        return "\n".join(lines)

    def print_graph(self, file=None) -> None:
        """Print `graph_text()`: the graphs with each compression written beside its node."""
        print(self.graph_text(), file=file)

    def recompile(self) -> None:
        """Lint and regenerate the code of every graph after an edit."""
        finalize(self)

    def report(self, per_layer: bool = False) -> str:
        from fxcook.report import render

        return render(self, per_layer=per_layer)
