"""Model size and the pass report.

*Activated model size* (BMCook's measure) counts the weights a token runs through inside the
transformer blocks (attention and FFN projections, embeddings excluded), each scaled by bits/32,
its density and, for routed experts, the active-expert fraction.
"""

from __future__ import annotations

from torch import nn


def _counted(root: nn.Module, blocks: list[str]):
    """(path, module) for each size-reporting module, outermost first, inside blocks if any."""
    stack = [("", root)]
    while stack:
        path, mod = stack.pop()
        inside = not blocks or any(path == b or path.startswith(b + ".") for b in blocks)
        if inside and hasattr(mod, "activated_params"):
            yield path, mod
            continue
        stack.extend((f"{path}.{n}" if path else n, m) for n, m in reversed(list(mod.named_children())))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def activated_size(cooked) -> float:
    """Per-token weight parameters in the blocks at fp32-equivalent cost."""
    return sum(m.activated_params() for _, m in _counted(cooked, cooked.sites.blocks))


def block_weights(cooked) -> int:
    """Stored weight parameters of the compressible sites in the blocks."""
    return sum(m.stored_params() for _, m in _counted(cooked, cooked.sites.blocks))


def layer_rows(cooked) -> list[dict]:
    rows = []
    for path, mod in _counted(cooked, cooked.sites.blocks):
        stored = mod.stored_params()
        act = mod.activated_params()
        rows.append(
            {
                "path": path,
                "type": type(mod).__name__,
                "params": stored,
                "bits": getattr(mod, "bits", 32),
                "density": getattr(mod, "density", 1.0),
                "activated": act,
            }
        )
    return rows


def _fmt(n: float) -> str:
    return f"{n / 1e6:.3f}M" if n >= 1e5 else f"{n:,.0f}"


def render(cooked, per_layer: bool = False) -> str:
    """Sizes are ratios to the block weights as captured (`dense_block_weights`, set before the first pass),
    so passes that remove weights (slicing, dropped layers) show up as smaller, not as a new baseline."""
    now = block_weights(cooked)
    base = getattr(cooked, "dense_block_weights", None) or now
    lines = [
        f"model: {parameter_count(cooked):,} parameters; block weights {now:,}"
        + (f" of {base:,} as captured" if now != base else "")
        + f" ({len(cooked.sites.blocks)} blocks, {len(cooked.sites.find('linear'))} linear sites)"
    ]
    if not cooked.history:
        lines.append("passes: none")
    for i, rec in enumerate(cooked.history, 1):
        ratio = rec.activated / base if base else 0.0
        lines.append(
            f"{i}. {rec.spec}: {len(rec.changes)} changes; params {rec.params:,}; "
            f"activated size {_fmt(rec.activated)} ({ratio:.3f} of fp32 dense)"
        )
        for ch in rec.changes[:4]:
            lines.append(f"     {ch}")
        if len(rec.changes) > 4:
            lines.append(f"     ... {len(rec.changes) - 4} more")
    act = activated_size(cooked)
    lines.append(
        f"activated model size: {_fmt(act)} of {_fmt(base)} "
        f"({act / base if base else 0:.3f}; {base / act if act else float('inf'):.1f}x smaller)"
    )
    if per_layer:
        lines.append(f"{'layer':58} {'type':16} {'params':>9} {'bits':>4} {'density':>7} {'activated':>10}")
        for r in layer_rows(cooked):
            lines.append(
                f"{r['path']:58} {r['type']:16} {r['params']:>9,} {r['bits']:>4} "
                f"{r['density']:>7.3f} {r['activated']:>10,.0f}"
            )
    return "\n".join(lines)
