"""Named hidden-state taps: spec syntax, the `TapPoint` module the Tap pass inserts, and the collector.

Spec syntax (BMCook's): `[pre]` or `[post]` (default `[post]`) + a module path; `*` matches one path
segment, `**` any number; `student:teacher` pairs record the teacher tap each student tap is
distilled against (globs on both sides pair up in order). Values are collected per forward by an
explicit collector, never by global state:

    with collect_taps(cooked) as taps:     # a fresh dict, filled during this forward only
        out = cooked(**batch)
    taps["[post]encoder.layer.3"]          # the tensor that flowed through the tap

`collect_taps` also works on any eager module (e.g. an HF teacher) through scoped forward hooks
removed on exit. Training and losses use these; inserting TapPoints is the Tap pass (`fxcook.passes.tap`).
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fxcook.errors import SelectorError

__all__ = [
    "TapPoint",
    "TapSpec",
    "collect_taps",
    "parse_spec",
    "resolve",
    "run_with_taps",
    "tap_points",
    "teacher_pairs",
]

_SPEC = re.compile(r"^\s*(?:\[(pre|post)\])?\s*([^\[\]:\s]+)\s*$")


@dataclass(frozen=True)
class TapSpec:
    """One tap: where (`pre` = the module's hidden-state input, `post` = its output) and which module."""

    where: str
    path: str

    def __str__(self) -> str:
        return f"[{self.where}]{self.path}"


def parse_spec(text: str) -> tuple[TapSpec, TapSpec | None]:
    """`"[post]a.*"` -> (student spec, None); `"[post]a.3:[post]b.6"` -> (student, teacher)."""
    parts = text.split(":")
    if len(parts) > 2:
        raise SelectorError(f"tap spec {text!r}: at most one ':' (student:teacher)")
    specs = []
    for part in parts:
        m = _SPEC.match(part)
        if m is None:
            raise SelectorError(f"tap spec {text!r}: {part!r} is not '[pre]path' or '[post]path'")
        specs.append(TapSpec(m.group(1) or "post", m.group(2)))
    return specs[0], (specs[1] if len(specs) == 2 else None)


def _glob(pattern: str) -> re.Pattern:
    """Segment-aware glob: `*` stays within one dotted segment, `**` spans segments."""
    out = re.escape(pattern).replace(r"\*\*", "\0").replace(r"\*", r"[^.]*").replace("\0", ".*")
    return re.compile(out.replace(r"\?", "[^.]") + r"\Z")


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in path.split(".")]


def resolve(pattern: str, paths: Sequence[str], what: str = "module") -> list[str]:
    """Paths matching `pattern`, in natural order; no match is an error naming the nearest paths."""
    rx = _glob(pattern)
    hits = sorted((p for p in paths if rx.match(p)), key=_natural)
    if not hits:
        near = difflib.get_close_matches(pattern.replace("*", "0"), list(paths), n=5, cutoff=0.3)
        raise SelectorError(f"tap path {pattern!r} matches no {what}; nearest paths: {near or sorted(paths)[:5]}")
    return hits


class TapPoint(nn.Module):
    """Identity on the data path; hands its value to the collector active for this forward, if any."""

    def __init__(self, tap: str, pair: str | None = None, rank: int = 0):
        super().__init__()
        self.tap = tap  # canonical spec, e.g. "[post]encoder.layer.3"
        self.pair = pair  # teacher spec (may be a glob) this tap is distilled against, or None
        self.rank = rank  # position among the taps its spec expanded to (pairs globs in order)
        self._sink: dict | None = None

    def forward(self, x):
        if self._sink is not None:
            self._sink[self.tap] = x
        return x

    def describe(self) -> str:
        """`tap [post]encoder.layer.1 <- teacher [post]encoder.layer.3`, as `CookedModel.print_graph` shows it."""
        return "tap " + self.extra_repr()

    def extra_repr(self) -> str:
        return self.tap + (f" <- teacher {self.pair}" if self.pair else "")


def tap_points(model: nn.Module) -> dict[str, TapPoint]:
    """The TapPoints in `model` by tap name (several call sites of one tap share a name)."""
    return {m.tap: m for m in model.modules() if isinstance(m, TapPoint)}


def teacher_pairs(student: nn.Module, teacher_paths: Sequence[str]) -> list[tuple[str, str]]:
    """(student tap, concrete teacher tap) for every paired TapPoint; teacher globs pair in order."""
    out = []
    for tp in tap_points(student).values():
        if tp.pair is None:
            continue
        spec, _ = parse_spec(tp.pair)
        hits = resolve(spec.path, teacher_paths, "teacher module")
        if tp.rank >= len(hits):
            raise SelectorError(
                f"tap {tp.tap}: teacher pattern {tp.pair!r} matches {len(hits)} modules, "
                f"fewer than the student taps it must pair with"
            )
        out.append((tp.tap, str(TapSpec(spec.where, hits[tp.rank]))))
    return out


@contextlib.contextmanager
def collect_taps(model: nn.Module, specs: Sequence[str] = ()) -> Iterator[dict[str, torch.Tensor]]:
    """A fresh dict filled with tap values during the forwards run inside the block.

    Every TapPoint of `model` reports; `specs` (concrete or globbed `[pre]/[post]path`) not covered by
    TapPoints are collected with forward hooks on `model`'s modules (for eager models such as an HF
    teacher), registered here and removed on exit.
    """
    sink: dict[str, torch.Tensor] = {}
    points = [m for m in model.modules() if isinstance(m, TapPoint)]
    have = {p.tap for p in points}
    modules = dict(model.named_modules())
    handles = []
    for text in specs:
        spec, _ = parse_spec(text)
        for path in resolve(spec.path, [p for p in modules if p], "module"):
            if str(TapSpec(spec.where, path)) in have:
                continue
            handles.append(
                modules[path].register_forward_hook(_hook(sink, TapSpec(spec.where, path)), with_kwargs=True)
            )
    for p in points:
        if p._sink is not None:
            raise RuntimeError(f"tap {p.tap} is already being collected (nested collect_taps on one model)")
        p._sink = sink
    try:
        yield sink
    finally:
        for p in points:
            p._sink = None
        for h in handles:
            h.remove()


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict) or hasattr(value, "to_tuple"):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _hook(sink: dict, spec: TapSpec):
    key = str(spec)

    def hook(module, args, kwargs, output):
        ins = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        outs = _tensors(output)
        if spec.where == "post":
            shapes = {a.shape for a in ins if a.is_floating_point()}
            sink[key] = ([t for t in outs if t.shape in shapes] or outs or [None])[0]
        else:
            same = [a for a in ins if outs and a.shape == outs[0].shape]
            sink[key] = (same or [a for a in ins if a.is_floating_point()] or ins or [None])[0]

    return hook


def run_with_taps(model: nn.Module, *args, specs: Sequence[str] = (), **kwargs):
    """`(model(*args, **kwargs), {tap name: tensor})` for one forward."""
    with collect_taps(model, specs) as taps:
        out = model(*args, **kwargs)
    return out, dict(taps)
