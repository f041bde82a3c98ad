"""Tap: named hidden-state taps as explicit nodes of the cooked graph, for distillation.

BMCook recorded hidden states by patching forwards into a global dictionary (names collided, state
leaked between models). Here a tap is a `TapPoint` call_module node inserted on the data path in the
graph of the module that calls the tapped one: `[post]encoder.layer.3` routes the block's output
through `TapPoint` before its users see it, `[pre]...` routes the block's hidden-state input. A
TapPoint returns its input object unchanged, so taps never change the model's outputs or gradients.

Values are collected per forward by an explicit collector, never by global state:

    with collect_taps(cooked) as taps:     # a fresh dict, filled during this forward only
        out = cooked(**batch)
    taps["[post]encoder.layer.3"]          # the tensor that flowed through the tap

Spec syntax (BMCook's): `[pre]` or `[post]` (default `[post]`) + a module path; `*` matches one path
segment, `**` any number; `student:teacher` pairs record the teacher tap each student tap is
distilled against (globs on both sides pair up in order). `collect_taps` also works on any eager
module (e.g. an HF teacher) through scoped forward hooks removed on exit.
"""

from __future__ import annotations

import operator
import re

import torch
from torch import nn

from fxcook.errors import PassError, PreconditionError, SelectorError
from fxcook.passbase import Change, Pass, PassConfig, PassResult
from fxcook.taps import TapPoint, TapSpec, parse_spec, resolve, tap_points
from fxcook.tracing import CallSite, call_sites

__all__ = ["Tap"]


def _called(model: nn.Module) -> dict[str, list[CallSite]]:
    """Module path -> the CallSites calling it, over every graph; TapPoints themselves are left out."""
    return {
        path: calls for path, calls in call_sites(model).items() if not isinstance(model.get_submodule(path), TapPoint)
    }


def _val(node) -> object:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _leaves(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Nodes carrying the tensors a module call returns, in output order (through getitem/flatten)."""
    if isinstance(_val(node), torch.Tensor):
        return [node]
    unpack = [
        u
        for u in node.users
        if u.op == "call_function"
        and (u.target is operator.getitem or getattr(u.target, "__name__", "") == "tree_flatten_spec")
    ]
    unpack.sort(key=lambda u: u.args[1] if u.target is operator.getitem else -1)
    return [leaf for u in unpack for leaf in _leaves(u)] if unpack else [node]


def _output_leaf(call: torch.fx.Node) -> torch.fx.Node:
    """The call's hidden-state output: the first output shaped like a float input, else the first."""
    leaves = _leaves(call)
    shapes = {
        str(tuple(_val(a).shape))
        for a in call.all_input_nodes
        if isinstance(_val(a), torch.Tensor) and _val(a).is_floating_point()
    }
    same = [n for n in leaves if isinstance(_val(n), torch.Tensor) and str(tuple(_val(n).shape)) in shapes]
    return (same or leaves)[0]


def _input_leaf(call: torch.fx.Node, out: torch.fx.Node) -> torch.fx.Node | None:
    """The call's hidden-state input: the tensor argument shaped like its output, else the first float one."""
    args = [a for a in call.all_input_nodes if isinstance(_val(a), torch.Tensor)]
    shape = str(tuple(_val(out).shape)) if isinstance(_val(out), torch.Tensor) else None
    same = [a for a in args if str(tuple(_val(a).shape)) == shape]
    floats = [a for a in args if _val(a).is_floating_point()]
    return (same or floats or args or [None])[0]


def _attr_name(owner: nn.Module, spec: TapSpec, target: str) -> str:
    base = f"fxcook_tap_{spec.where}_" + re.sub(r"\W", "_", target)
    name, i = base, 1
    while hasattr(owner, name):
        name, i = f"{base}_{i}", i + 1
    return name


class Tap(Pass):
    """Insert TapPoint nodes at `[pre]`/`[post]` module paths (globs, `student:teacher` pairs)."""

    name = "tap"
    after = ("moefy", "relufy")  # structural rewrites first, so taps sit on the final call sites

    class Config(PassConfig):
        taps: list[str]

    def __init__(self, *taps: str, **kwargs):
        if taps:
            kwargs["taps"] = [*taps, *kwargs.get("taps", [])]
        super().__init__(**kwargs)

    def _plan(self, cooked) -> list[tuple[TapSpec, str | None, int]]:
        called = _called(cooked)
        plan = []
        for text in self.config.taps:
            student, teacher = parse_spec(text)
            hits = resolve(student.path, list(called), "called module")
            if teacher is not None and len(hits) > 1 and "*" not in teacher.path:
                raise SelectorError(
                    f"tap spec {text!r}: student side matches {len(hits)} modules but the "
                    f"teacher side {str(teacher)!r} names one; use a glob on both sides"
                )
            plan += [
                (TapSpec(student.where, p), None if teacher is None else str(teacher), i) for i, p in enumerate(hits)
            ]
        return plan

    def requires(self, cooked) -> None:
        if not self.config.taps:
            raise PreconditionError("tap: no tap specs given")
        self._plan(cooked)

    def call(self, cooked) -> PassResult:
        called, existing = _called(cooked), tap_points(cooked)
        changes = []
        for spec, pair, rank in self._plan(cooked):
            if str(spec) in existing:
                continue
            for _, owner, call in called[spec.path]:
                graph = owner.graph
                out = _output_leaf(call)
                value = out if spec.where == "post" else _input_leaf(call, out)
                if value is None:
                    raise PreconditionError(f"tap {spec}: the call of {spec.path} has no tensor input")
                attr = _attr_name(owner, spec, call.target)
                owner.add_module(attr, TapPoint(str(spec), pair, rank))
                if spec.where == "post":
                    with graph.inserting_after(value):
                        node = graph.create_node("call_module", attr, (value,))
                    value.replace_all_uses_with(node, delete_user_cb=lambda u: u is not node)
                else:
                    with graph.inserting_before(call):
                        node = graph.create_node("call_module", attr, (value,))
                    call.replace_input_with(value, node)
                node.meta["val"] = _val(value)
            changes.append(Change(spec.path, f"tap {spec}" + (f" (teacher {pair})" if pair else "")))
        return self.finish(cooked, changes)

    def ensures(self, cooked) -> None:
        have = tap_points(cooked)
        missing = [str(s) for s, _, _ in self._plan(cooked) if str(s) not in have]
        if missing:
            raise PassError(f"tap: taps not inserted: {missing}")
