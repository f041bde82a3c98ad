"""How a CookedModel is called: like the original model's forward.

The captured graph takes exactly the tensor inputs it was captured with, by keyword. `Interface`,
recorded at capture from the original forward's signature, binds each call's positional and keyword
arguments by name, fills an optional input the call omits with the value the original treats as
"not given", and turns `return_dict=False` into the original's tuple output. Which constant stands
for "not given" is found by running the original on the example batch at capture (zeros for BERT's
`token_type_ids`, ones for an `attention_mask`): no model-specific table. Tokenizer outputs the
example lacks but the forward accepts are captured too when such a constant exists, so a call may
give them. A call the graph cannot serve is a FxcookError naming the input.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxcook.errors import CaptureError, FxcookError
from fxcook.tracing import capture_mode, split_inputs

TOKENIZER_INPUTS = ("input_ids", "token_type_ids", "attention_mask")  # what HF tokenizers emit
NEUTRAL = (0, 1)  # candidate constants for "input not given"
NO_EFFECT = {"return_dict": (True, None), "use_cache": (False, None)}  # flags the graph serves as captured
EMPTY = inspect.Parameter.empty


@dataclass(frozen=True)
class Fill:
    """An omitted input is `value` everywhere, shaped like the captured input `like`."""

    like: str
    value: int
    dtype: torch.dtype


@dataclass(frozen=True)
class Interface:
    """The original forward's signature and how each call maps onto the captured graph's inputs."""

    owner: str
    signature: inspect.Signature
    inputs: tuple[str, ...]
    fills: dict[str, Fill] = field(default_factory=dict)
    ignored: frozenset[str] = frozenset()

    def __deepcopy__(self, memo: dict) -> Interface:
        return self  # immutable

    def bind(self, args: tuple, kwargs: dict) -> tuple[dict[str, Any], bool]:
        """(graph keyword inputs, whether to return a tuple) for a call made like the original's."""
        try:
            given = dict(self.signature.bind(*args, **kwargs).arguments)
        except TypeError as e:
            raise FxcookError(
                f"{self.owner} called with arguments its forward{self.signature} does not take: {e}"
            ) from e
        given.update(given.pop(_var_keyword(self.signature) or "", {}))
        out = {name: given.pop(name) for name in self.inputs if given.get(name) is not None}
        for name in self.inputs:
            if name not in out:
                out[name] = self._fill(name, out)
        return out, self._flags(given)

    def _fill(self, name: str, provided: dict[str, Any]) -> torch.Tensor:
        fill = self.fills.get(name)
        if fill is None or not isinstance(provided.get(fill.like), torch.Tensor):
            raise FxcookError(
                f"{self.owner} was captured with input {name!r}, and this call omits it: the original's behaviour "
                f"without {name!r} is not a constant the captured graph can be given; pass {name}=..."
            )
        return torch.full_like(provided[fill.like], fill.value, dtype=fill.dtype)

    def _flags(self, rest: dict[str, Any]) -> bool:
        """Check the arguments the graph does not take; True when the call asks for a tuple output."""
        as_tuple = False
        for name, value in rest.items():
            if name in self.ignored or value is None or _is_default(self.signature, name, value):
                continue
            if name == "return_dict" and value is False:
                as_tuple = True
            elif isinstance(value, torch.Tensor):
                raise FxcookError(
                    f"{self.owner}: input {name}={_show(value)} was not in the example inputs at capture, so the "
                    f"captured graph cannot take it; capture with {name} in example_inputs, or leave it out"
                )
            elif value not in NO_EFFECT.get(name, ()):
                raise FxcookError(
                    f"{self.owner}: option {name}={value!r} changes what the model computes, and a captured graph "
                    f"takes tensor inputs only; leave {name} out (fxcook captures the model's default behaviour)"
                )
        return as_tuple

    @staticmethod
    def finish(out: Any, as_tuple: bool) -> Any:
        """The original's tuple form of `out` (what `return_dict=False` returns)."""
        if not as_tuple:
            return out
        if not hasattr(out, "to_tuple"):
            raise FxcookError(f"return_dict=False: the model returns {type(out).__name__}, which has no tuple form")
        return out.to_tuple()


def _var_keyword(sig: inspect.Signature) -> str | None:
    return next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)


def _is_default(sig: inspect.Signature, name: str, value: Any) -> bool:
    p = sig.parameters.get(name)
    return p is not None and p.default is not EMPTY and not isinstance(value, torch.Tensor) and value == p.default


def _has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


def _show(value: Any) -> str:
    return f"<tensor {tuple(value.shape)}>" if isinstance(value, torch.Tensor) else repr(value)


def _plain(sig: inspect.Signature) -> inspect.Signature:
    """The signature without annotations (HF's `Unpack[...]` annotations do not pickle)."""
    return sig.replace(
        parameters=[p.replace(annotation=EMPTY) for p in sig.parameters.values()], return_annotation=EMPTY
    )


def _bindable(sig: inspect.Signature) -> bool:
    """True when every input can be passed by keyword (what the captured graph needs)."""
    return not any(p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL) for p in sig.parameters.values())


@torch.no_grad()
def _run(model: nn.Module, kwargs: dict[str, Any]) -> Any:
    """The original's output on `kwargs`, or None when it refuses them."""
    try:
        return model(**kwargs)
    except Exception:  # noqa: BLE001 -- a refused input combination is an answer here, not an error
        return None


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return False
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and (
            x.shape != y.shape or not torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-5)
        ):
            return False
    return True


def _neutral(model: nn.Module, base: dict, name: str, like: torch.Tensor, want: Any) -> list[int]:
    """The constants c for which the original gives `want` with `name` = c (shaped like `like`)."""
    return [c for c in NEUTRAL if _same(_run(model, {**base, name: torch.full_like(like, c)}), want)]


@dataclass
class Plan:
    """What capture records before export: the example as keyword tensors and the fill constants."""

    signature: inspect.Signature
    example: dict[str, torch.Tensor]
    values: dict[str, int] = field(default_factory=dict)
    ignored: set[str] = field(default_factory=set)


def plan(model: nn.Module, example_inputs: Any) -> Plan | None:
    """Bind the example to the original forward and probe the original for its "not given" constants.

    None when the forward takes positional-only or variadic positional inputs (the graph is then
    called exactly as captured).
    """
    sig = inspect.signature(model.forward)
    if not _bindable(sig):
        return None
    args, kwargs = split_inputs(example_inputs)
    try:
        given = dict(sig.bind(*args, **kwargs).arguments)
    except TypeError as e:
        raise CaptureError(f"example_inputs do not fit {type(model).__name__}.forward: {e}") from e
    extra = given.pop(_var_keyword(sig) or "", {})
    flags = {k: v for k, v in {**given, **extra}.items() if not _has_tensor(v)}
    Interface(type(model).__name__, sig, ())._flags(flags)  # the same rules as at call time
    named = {k: v for k, v in given.items() if _has_tensor(v)}
    extra = {k: v for k, v in extra.items() if _has_tensor(v)}
    with capture_mode(model):
        return _probe(model, Plan(_plain(sig), named), extra)


def _probe(model: nn.Module, p: Plan, extra: dict[str, torch.Tensor]) -> Plan:
    """Fill `p` from runs of the original in capture mode (eval, no cache)."""
    name = type(model).__name__
    want = _run(model, p.example)
    if extra:
        if not _same(_run(model, {**p.example, **extra}), want):
            raise CaptureError(
                f"{name} takes {sorted(extra)} through **kwargs and they change its output; "
                "capture records named inputs only: pass them through a named argument"
            )
        warnings.warn(
            f"{name}: {sorted(extra)} reach forward through **kwargs and do not change its output; "
            "the captured graph leaves them out",
            stacklevel=4,
        )
        p.ignored |= set(extra)
    params = p.signature.parameters
    for key in [k for k, v in p.example.items() if isinstance(v, torch.Tensor) and params[k].default is None]:
        rest = {k: v for k, v in p.example.items() if k != key}
        without = _run(model, rest)
        found = without is not None and _neutral(model, rest, key, p.example[key], without)
        if found:
            p.values[key] = found[0]
    _add_tokenizer_inputs(model, p, want)
    return p


def _add_tokenizer_inputs(model: nn.Module, p: Plan, want: Any) -> None:
    """Capture the tokenizer outputs the example lacks when the original has a "not given" constant for them."""
    like = p.example.get(TOKENIZER_INPUTS[0])
    if like is None:
        return
    var_kw = _var_keyword(p.signature)
    for key in TOKENIZER_INPUTS:
        param = p.signature.parameters.get(key)
        if key in p.example or key in p.ignored or (param is None and var_kw is None):
            continue
        found = _neutral(model, p.example, key, like, want)
        if param is None and found == list(NEUTRAL):  # taken through **kwargs and without effect
            p.ignored.add(key)
        elif param is not None and param.default is None and found:
            p.example[key] = torch.full_like(like, found[0])
            p.values[key] = found[0]


def _input_shapes(ep: torch.export.ExportedProgram) -> dict[str, tuple[str, ...]]:
    """Each keyword tensor input's symbolic shape in the exported graph."""
    users = set(ep.graph_signature.user_inputs)
    return {
        n.name: tuple(str(d) for d in n.meta["val"].shape)
        for n in ep.graph.nodes
        if n.op == "placeholder" and n.name in users and isinstance(n.meta.get("val"), torch.Tensor)
    }


def _fits(p: Plan, shapes: dict[str, tuple[str, ...]], key: str, like: str) -> bool:
    """True when an input of `like`'s shape fits `key` in the graph: the same shape in the example, and each
    dim of `key` is `like`'s dim or one the graph leaves free (a broadcast dim no other input has)."""
    if like == key or like not in shapes or key not in shapes or p.example[like].shape != p.example[key].shape:
        return False
    others = [d for k, dims in shapes.items() if k != key for d in dims]
    return all(a == b or a not in others for a, b in zip(shapes[key], shapes[like]))


def interface(model: nn.Module, p: Plan, ep: torch.export.ExportedProgram) -> Interface:
    """The Interface of the graph `ep` captured from `p.example`; a fill takes the shape of an input it fits."""
    shapes = _input_shapes(ep)
    fills = {}
    for key, value in p.values.items():
        like = next((k for k in p.example if _fits(p, shapes, key, k)), None)
        if like is not None:
            fills[key] = Fill(like, value, p.example[key].dtype)
    return Interface(type(model).__name__, p.signature, tuple(p.example), fills, frozenset(p.ignored))
