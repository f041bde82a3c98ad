"""One-shot structure importance: gradients through the gates on a few calibration batches.

Heads: `I_h = E_x |dL/d xi_h|` with `xi_h` the head gate (Michel et al.; Pruning-Adapter), FFN units:
first-order Taylor `sum |w * dL/dw|` over the unit's weights, or the mean |activation| of the unit.
Scores are L2-normalised per layer, then min-max scaled over the model, so layers compare.

`loss="output"` needs no labels. A distance to the unpruned output has zero gradient at the unpruned
model, so it cannot rank anything; `<f(x), r>` with a fresh Gaussian `r` per batch has gradient
`<r, df/dxi>`, whose expected magnitude is proportional to `||df/dxi||`: how far the output moves
when the structure is scaled, the first-order effect of removing it. `loss="task"`: cross-entropy of
the main output (logits [batch, classes]) against the batches' `labels` (popped before the call).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

from fxcook.errors import PreconditionError
from fxcook.passes.prune import gates as G
from fxcook.passes.prune.structure import FFN, Attention, attentions
from fxcook.tracing import call_batch, main_output


def _split_labels(batch, loss: str, index: int):
    if loss != "task":
        return batch, None
    if not isinstance(batch, Mapping) or "labels" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise PreconditionError(
            f"prune: loss='task' needs calibration batches with 'labels' (LongTensor [batch]); batch {index} has {keys}"
        )
    rest = {k: v for k, v in batch.items() if k != "labels"}
    return rest, batch["labels"]


def batch_loss(cooked, batch, loss: str, index: int, generator: torch.Generator) -> torch.Tensor:
    """The scalar whose gradients rank structures (see the module docstring)."""
    inputs, labels = _split_labels(batch, loss, index)
    out = call_batch(cooked, inputs)
    if loss == "task":
        logits = main_output(out, ("logits",))
        return F.cross_entropy(logits.float(), labels.to(logits.device))
    y = main_output(out).float()
    r = torch.randn(y.shape, generator=generator).to(y.device)
    return (y * r).sum()


def normalise(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """L2-normalise each layer's scores, then min-max scale over all layers (to [0, 1])."""
    scaled = {k: s / s.norm().clamp_min(1e-12) for k, s in scores.items()}
    if not scaled:
        return scaled
    flat = torch.cat(list(scaled.values()))
    lo, hi = flat.min(), flat.max()
    return {k: (s - lo) / (hi - lo).clamp_min(1e-12) for k, s in scaled.items()}


@contextlib.contextmanager
def _probes(gate_list: list[G.Gate]):
    """Gates whose values are leaf tensors requiring grad (the xi of I_h); masks restored on exit."""
    saved = [(g, g.mask) for g in gate_list]
    try:
        for g in gate_list:
            g.mask = g.mask.detach().clone().requires_grad_(True)
        yield [g.mask for g in gate_list]
    finally:
        for g, mask in saved:
            g.mask = mask


def gradient_scores(
    cooked,
    head_gates: dict[str, G.Gate],
    ffns: dict[str, tuple[FFN, G.Gate | None]],
    batches: Iterable,
    loss: str,
    ffn_score: str,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Raw (unnormalised) scores: head gate path -> [units]; FFN path -> [width]."""
    from tqdm.auto import tqdm

    heads = {k: torch.zeros(g.count) for k, g in head_gates.items()}
    units = {k: torch.zeros(f.width) for k, (f, _) in ffns.items()}
    weights = {k: _unit_weights(cooked, f) for k, (f, _) in ffns.items()} if ffn_score == "taylor" else {}
    hooks = [] if ffn_score == "taylor" else _activation_hooks(ffns, units)
    generator, seen = torch.Generator().manual_seed(seed), 0
    try:
        with _probes(list(head_gates.values())) as probes, torch.enable_grad():
            for i, batch in enumerate(tqdm(batches, desc="prune importance", leave=False)):
                flat_w = [w for ws in weights.values() for w, _ in ws]
                grads = torch.autograd.grad(
                    batch_loss(cooked, batch, loss, i, generator), probes + flat_w, allow_unused=True
                )
                for (k, _), g in zip(head_gates.items(), grads[: len(probes)]):
                    heads[k] += 0 if g is None else g.detach().abs().cpu()
                rest = iter(grads[len(probes) :])
                for k, ws in weights.items():
                    for w, axis in ws:
                        g = next(rest)
                        if g is not None:
                            units[k] += (w.detach() * g).abs().sum(axis).cpu()
                seen += 1
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise PreconditionError("prune: the calibration data is empty; pass calibration=[batch, ...]")
    return {k: v / seen for k, v in heads.items()}, {k: v / seen for k, v in units.items()}


def _unit_weights(cooked, ffn: FFN) -> list[tuple[torch.Tensor, int]]:
    """(weight, axis to sum over) whose other axis indexes the FFN's units: up/gate rows, down columns."""
    out = [(cooked.get_submodule(ffn.up).weight, 1), (cooked.get_submodule(ffn.down).weight, 0)]
    if ffn.gate:
        out.append((cooked.get_submodule(ffn.gate).weight, 1))
    return out


def _activation_hooks(ffns, units):
    def hook_for(key):
        def hook(_mod, args):
            x = args[0].detach().float()
            units[key] += x.abs().reshape(-1, x.shape[-1]).mean(0).cpu()

        return hook

    return [gate.register_forward_pre_hook(hook_for(k)) for k, (_, gate) in ffns.items() if gate is not None]


def head_importance(cooked, batches: Iterable, loss: str = "output", seed: int = 0) -> dict[str, torch.Tensor]:
    """Normalised head importance per attention, for reports and heat maps: block path -> [kv groups]
    (the attention's own path where a block holds several, as T5's decoder does). `cooked` is not changed."""
    work = copy.deepcopy(cooked)
    atts: list[Attention] = attentions(work)
    probe = {a.path: G.Gate("heads", a.units, a.group * a.head_dim) for a in atts}
    head_gates = {a.path: probe[a.path] for a in atts}
    for a in atts:
        G.install(work, "heads", a.o, probe[a.path], on_output=False)
    work.recompile()
    raw, _ = gradient_scores(work, head_gates, {}, batches, loss, "taylor", seed)
    per_block: dict[str, int] = {}
    for a in atts:
        per_block[a.block] = per_block.get(a.block, 0) + 1
    scores = normalise(raw)
    return {(a.block if per_block[a.block] == 1 else a.path): scores[a.path] for a in atts}
