"""Capture a PyTorch model as a hierarchy of FX graphs.

`torch.export(strict=False)` captures every HF family tried (symbolic_trace captures none); the flat
graph is then unflattened so every module, transformer blocks included, stays a callable submodule
with its own graph. That keeps FSDP2's per-block sharding hooks working and lets passes address
blocks by path. Linear leaves become `CookedLinear`, the single site type passes rewrite.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import linecache
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.export import Dim
from torch.export.unflatten import InterpreterModule, UnflattenedModule
from torch.utils import _pytree as pytree

from fxcook.errors import CaptureError, FxcookError, PassError
from fxcook.nn import CookedLinear

LINEAR_TYPES = ("Linear", "Conv1D")


def split_inputs(example_inputs: Any, what: str = "example_inputs") -> tuple[tuple, dict]:
    """Normalise example inputs to (args, kwargs): a mapping is kwargs, a tuple/list is args."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise CaptureError(
        f"{what} must be a tensor, a tuple/list of positional inputs or a mapping of keyword "
        f"inputs, got {type(example_inputs).__name__}"
    )


def call_batch(model: Any, batch: Any) -> Any:
    """Call `model` on one batch given like example inputs (mapping, tuple/list or tensor)."""
    args, kwargs = split_inputs(batch, "a calibration/data batch")
    return model(*args, **kwargs)


def check_calibration(calibration: Any, owner: str) -> None:
    """Refuse calibration that is not an iterable of batches (a single batch iterates its keys or rows)."""
    single = isinstance(calibration, (Mapping, torch.Tensor))
    if single or isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        what = "a single batch" if single else "not an iterable of batches"
        raise FxcookError(
            f"{owner}: calibration is {type(calibration).__name__}, {what}; pass a list of batches (each a dict of "
            f"keyword tensors, a tuple or a tensor), e.g. calibration=[batch]"
        )


def calibration_batches(calibration: Any, owner: str, limit: int | None = None) -> Iterator:
    """The first `limit` batches of `calibration`, checked: the one way passes read calibration data.

    Any iterable works (a generator is read once, so it serves one pass)."""
    check_calibration(calibration, owner)
    return itertools.islice(calibration, limit)


def run_batches(
    model: Any, batches: Iterable, desc: str, limit: int | None = None, before: Callable[[Any], None] | None = None
) -> int:
    """Call `model` on each batch (the first `limit`) under a progress bar, `before(batch)` first;
    returns how many ran."""
    from tqdm.auto import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    total = limit if total is None else total if limit is None else min(total, limit)
    seen = 0
    for batch in tqdm(itertools.islice(batches, limit), desc=desc, total=total, leave=False):
        if before is not None:
            before(batch)
        call_batch(model, batch)
        seen += 1
    return seen


def token_mask(batch: Any) -> torch.Tensor | None:
    """The real (not padding) tokens of a keyword batch, `attention_mask != 0` as [batch, seq], if it has one."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask != 0 if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


@torch.no_grad()
def record_inputs(
    model: Any,
    modules: Mapping[str, nn.Module],
    record: Callable[[str, torch.Tensor], None],
    batches: Iterable,
    desc: str,
    limit: int | None = None,
    skip_padding: bool = False,
) -> None:
    """Run calibration `batches` through `model`, calling `record(key, x)` with the (detached) first
    input of every call of `modules[key]`: the one calibration recorder of the passes.

    `skip_padding`: when a batch has an `attention_mask` and an input is laid out [batch, seq, ...]
    like it, `x` holds only the real tokens' rows ([tokens, ...]), so padded positions, whose outputs
    are thrown away, never reach a Hessian, a norm or a router's training set. Activation ranges keep
    them: a dynamic per-tensor scale sees a padded batch's padded positions at inference too.
    A module that no batch reached has nothing recorded, so that is a PassError naming it.
    """
    reached: set[str] = set()
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook_for(key):
        def hook(_mod, args):
            reached.add(key)
            x, mask = args[0].detach(), current["mask"]
            if skip_padding and mask is not None and x.dim() >= 3 and x.shape[:2] == mask.shape:
                x = x[mask.to(x.device)]
            record(key, x)

        return hook

    hooks = [mod.register_forward_pre_hook(hook_for(key)) for key, mod in modules.items()]
    try:
        run_batches(model, batches, desc, limit, before=lambda batch: current.update(mask=token_mask(batch)))
    finally:
        for h in hooks:
            h.remove()
    missing = [key for key in modules if key not in reached]
    if missing:
        raise PassError(f"{desc} never reached {missing[:5]} (is the calibration data empty?)")


MAIN_OUTPUTS = ("logits", "last_hidden_state")


def main_output(out: Any, names: Sequence[str] = MAIN_OUTPUTS) -> torch.Tensor | None:
    """The tensor a model's output is judged by, or None: the tensor itself; for an output that names
    its main tensors (`logits`, `last_hidden_state`: a ModelOutput, dict or object), the first of
    `names` it has; otherwise the first tensor of a tuple, list or dict."""
    if isinstance(out, torch.Tensor):
        return out
    fields = out if isinstance(out, Mapping) else {n: getattr(out, n) for n in MAIN_OUTPUTS if hasattr(out, n)}
    named = {n for n in MAIN_OUTPUTS if isinstance(fields.get(n), torch.Tensor)}
    if named:
        return next((fields[n] for n in names if n in named), None)
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def parent_of(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module holding the submodule (or parameter) at dotted `path`, and its name there."""
    parent_path, _, name = path.rpartition(".")
    return root.get_submodule(parent_path), name


def dynamic_spec(value: Any) -> Any:
    """Let export decide which of the batch and sequence dims are dynamic (Dim.AUTO)."""
    if isinstance(value, torch.Tensor):
        return {i: Dim.AUTO for i in range(min(value.dim(), 2))} or None
    return None


@contextlib.contextmanager
def capture_mode(model: nn.Module):
    """Capture the inference graph (no dropout) without a KV cache (HF cache objects are not
    pytrees); restore every module's mode and the config afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    configs = {id(c): c for m in model.modules() if getattr(c := getattr(m, "config", None), "use_cache", False)}
    model.eval()
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for c in configs.values():
            c.use_cache = True


LIBRARY_DIRS = tuple(str(Path(m.__file__).parent) + os.sep for m in (torch, sys.modules[__package__]))


def _tracebacks(exc: BaseException):
    """Every traceback entry of `exc` and its causes, outermost exception first, innermost frame last."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            yield tb
            tb = tb.tb_next
        e = e.__cause__ or e.__context__


def _blame(exc: BaseException, model: nn.Module) -> str:
    """The innermost module of `model` whose forward raised `exc`, and the innermost line of model code
    (outside torch and fxcook) on the way: the line the user can change."""
    names = {id(m): (n or type(model).__name__) for n, m in model.named_modules()}
    culprit, where = f"{type(model).__name__} ({type(model).__name__})", ""
    for tb in _tracebacks(exc):
        frame, code = tb.tb_frame, tb.tb_frame.f_code
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            culprit = f"{names[id(owner)]} ({type(owner).__name__})"
        if not code.co_filename.startswith(LIBRARY_DIRS) and not code.co_filename.startswith("<"):
            source = linecache.getline(code.co_filename, tb.tb_lineno).strip()
            qualname = getattr(code, "co_qualname", code.co_name)
            where = f" at {code.co_filename}:{tb.tb_lineno} in {qualname} (`{source}`)"
    return culprit + where


def export(model: nn.Module, example_inputs: Any, dynamic: bool = True) -> torch.export.ExportedProgram:
    """`torch.export(strict=False)` with dynamic batch/sequence dims and errors that name the module."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture needs an nn.Module, got {type(model).__name__}")
    args, kwargs = split_inputs(example_inputs)
    shapes = None
    if dynamic:
        try:
            bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
        except TypeError as e:
            raise CaptureError(f"example_inputs do not fit {type(model).__name__}.forward: {e}") from e
        shapes = {
            k: pytree.tree_map(dynamic_spec, v, is_leaf=lambda t: isinstance(t, torch.Tensor)) for k, v in bound.items()
        }
    with capture_mode(model):
        try:
            return torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
        except Exception as exc:  # export raises many types; all become one clear error
            construct = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise CaptureError(
                f"cannot capture module {_blame(exc, model)}: {type(exc).__name__}: {construct}"
            ) from exc
        finally:
            _forget_export_nodes()


def _forget_export_nodes() -> None:
    """torch.export leaves the last capture's graph nodes in a module-level map it only reads during
    that export; left there, they keep the last compiled model (and under FSDP2 its process group's
    threads) alive until the next capture or interpreter exit."""
    from torch.fx.experimental import proxy_tensor

    getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", {}).clear()


def _tensor_placeholders(graph: torch.fx.Graph) -> list[int]:
    """Positions of the placeholders that carry tensors (unflatten also passes SymInts)."""
    out = []
    for i, node in enumerate(n for n in graph.nodes if n.op == "placeholder"):
        val = node.meta.get("val")
        if val is None or isinstance(val, torch.Tensor):
            out.append(i)
    return out


class CallSite(NamedTuple):
    """One call of a module: the calling module (its path and itself) and the call_module node."""

    owner: str
    module: nn.Module
    node: torch.fx.Node


def call_sites(root: nn.Module, remove_duplicate: bool = True) -> dict[str, list[CallSite]]:
    """Map each submodule path to the CallSites that call it, over every graph under `root`.

    `remove_duplicate=False` also walks modules reachable under several paths once per path.
    """
    out: dict[str, list[CallSite]] = {}
    for path, mod in root.named_modules(remove_duplicate=remove_duplicate):
        graph = getattr(mod, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op == "call_module":
                full = f"{path}.{node.target}" if path else node.target
                out.setdefault(full, []).append(CallSite(path, mod, node))
    return out


def finalize(module: nn.Module) -> None:
    """Recompile every graph in the hierarchy and run it as generated code, not the interpreter."""
    for mod in module.modules():
        if isinstance(mod, (InterpreterModule, UnflattenedModule)):
            for node in mod.graph.nodes:
                if node.name == "self":  # a child called `self` (BERT) would shadow the module in generated code
                    node._rename("self_module")
            mod.graph.owning_module = mod  # lint against the module as edited, not the last generated code
            mod.graph.lint()
            mod.finalize()
            mod._run_with_interpreter = False


def _leaf_is_linear(mod: nn.Module) -> bool:
    graph = getattr(mod, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return False
    ops = [n.target for n in graph.nodes if n.op == "call_function"]
    gemms = [t for t in ops if t in (torch.ops.aten.linear.default, torch.ops.aten.addmm.default)]
    return len(gemms) == 1 and not any(n.op == "call_module" for n in graph.nodes)


def _own(p: torch.Tensor | None, memo: dict[int, torch.Tensor], inplace: bool = False):
    """The captured model's copy of `p` (one copy per original tensor, so ties survive)."""
    if p is None or inplace:
        return p
    if id(p) not in memo:
        memo[id(p)] = (
            nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            if isinstance(p, nn.Parameter)
            else p.detach().clone()
        )
    return memo[id(p)]


def _hollow(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Swap `ep`'s weights for meta tensors so unflatten's own copy costs nothing; returns them.

    unflatten clones every parameter; copying (or sharing, with inplace) once ourselves afterwards
    keeps peak memory at the original plus one copy.
    """
    real: dict[str, torch.Tensor] = {}
    metas: dict[int, torch.Tensor] = {}
    for table in (ep.state_dict, ep.constants):
        for name, t in list(table.items()):
            if not isinstance(t, torch.Tensor):
                continue
            real[name] = t
            if id(t) not in metas:
                meta = torch.empty_like(t, device="meta")
                metas[id(t)] = (
                    nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
                )
            table[name] = metas[id(t)]
    return real


def _retie(root: nn.Module, model: nn.Module) -> None:
    """Make parameters the original shares (tied embeddings and heads) one parameter again."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for names in groups.values():
        try:
            shared = root.get_parameter(names[0])
            owners = [parent_of(root, n) for n in names[1:]]
        except AttributeError:
            continue
        for owner, attr in owners:
            if getattr(owner, attr, None) is not None and getattr(owner, attr).shape == shared.shape:
                setattr(owner, attr, shared)


def unflatten(ep: torch.export.ExportedProgram, model: nn.Module, inplace: bool = False) -> nn.Module:
    """Unflatten `ep` into a module hierarchy with CookedLinear leaves and (unless inplace) own state."""
    real = _hollow(ep)
    with warnings.catch_warnings():  # torch's own unflatten uses a deprecated pytree check
        warnings.simplefilter("ignore", FutureWarning)
        root = torch.export.unflatten(ep)
    memo: dict[int, torch.Tensor] = {}
    for name, tensor in real.items():
        owner, attr = parent_of(root, name)
        if attr in owner._parameters:
            owner._parameters[attr] = _own(tensor, memo, inplace)
        elif attr in owner._buffers:
            owner._buffers[attr] = _own(tensor, memo, inplace)
        else:
            setattr(owner, attr, _own(tensor, memo, inplace))
    originals = dict(model.named_modules())
    calls = call_sites(root, remove_duplicate=False)
    for path, orig in originals.items():
        if type(orig).__name__ not in LINEAR_TYPES or path not in calls:
            continue
        parent, name = parent_of(root, path)
        current = getattr(parent, name)
        if not _leaf_is_linear(current):
            continue
        keep = _tensor_placeholders(current.graph)[:1]
        if len(keep) != 1:
            continue
        weight, bias = current.get_parameter("weight"), getattr(current, "bias", None)
        if type(orig).__name__ == "Conv1D":
            cooked = CookedLinear(weight.detach().t().contiguous(), bias)
        else:
            cooked = CookedLinear(weight, bias)
        setattr(parent, name, cooked)
        for _, _, node in calls[path]:
            node.args = (node.args[keep[0]],)
            node.kwargs = {}
    _retie(root, model)
    finalize(root)
    return root
