"""ShortGPT block influence: BI = 1 - mean over tokens of cos(block input, block output).

A block whose output is nearly its input changes the residual stream least, so it is the first to
go. Measured with forward hooks on the cooked blocks over the calibration batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from fxcook.errors import PassError
from fxcook.tracing import calibration_batches, run_batches

CALIBRATION_BATCHES = 32


def _hidden_pair(args: tuple, output) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(input, output) hidden states of one block call: the output leaf shaped like a float input."""
    ins = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    for out in pytree.tree_leaves(output):
        if not isinstance(out, torch.Tensor):
            continue
        same = [a for a in ins if a.shape == out.shape]
        if same:
            return same[-1], out
    return None


@torch.no_grad()
def block_influence(cooked, paths: list[str], calibration, limit: int = CALIBRATION_BATCHES) -> dict[str, float]:
    """BI of each block in `paths` over the first `limit` calibration batches."""
    sums = {p: [0.0, 0] for p in paths}

    def hook_for(path):
        def hook(_mod, args, output):
            pair = _hidden_pair(args, output)
            if pair is not None:
                cos = F.cosine_similarity(pair[0].float(), pair[1].float(), dim=-1)
                sums[path][0] += float(cos.sum())
                sums[path][1] += cos.numel()

        return hook

    hooks = [cooked.get_submodule(p).register_forward_hook(hook_for(p)) for p in paths]
    was = cooked.training
    cooked.eval()
    try:
        run_batches(cooked, calibration_batches(calibration, "droplayers"), "block influence", limit)
    finally:
        cooked.train(was)
        for h in hooks:
            h.remove()
    missing = [p for p, (_, n) in sums.items() if n == 0]
    if missing:
        raise PassError(f"droplayers: block influence never saw {missing[:3]} run (is the calibration data empty?)")
    return {p: 1.0 - s / n for p, (s, n) in sums.items()}
