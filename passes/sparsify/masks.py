"""Sparsity masks for `[out, in]` weights, and checks that a weight is 2:4 (ONNX files: `fxcook.runtime.onnx.checks`).

2:4 groups run along the reduction (input) dimension, the one sparse tensor cores compress. Every
mask function returns a bool tensor shaped like the weight (True = kept) and never changes its
input. `m4n2_2d` solves each 4x4 block exactly over the 90 patterns with two kept per row and per
column (a greedy walk by |w| can end with only 7 kept), so the transposed weight, used by the
weight-gradient GEMM, is 2:4 as well.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch

__all__ = [
    "METHODS",
    "nm_mask",
    "m4n2_1d",
    "m4n2_2d",
    "wanda",
    "magnitude",
    "make_mask",
    "is_24",
    "count_24_violations",
]

METHODS = ("m4n2_1d", "m4n2_2d", "wanda", "magnitude")


def _check_2d(weight: torch.Tensor, what: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")


def nm_mask(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the `n` highest scores in every group of `m` consecutive entries of the last dim."""
    if score.shape[-1] % m:
        raise ValueError(f"{n}:{m} sparsity needs the input dim ({score.shape[-1]}) to be a multiple of {m}")
    groups = score.detach().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.reshape(score.shape)


def m4n2_1d(weight: torch.Tensor) -> torch.Tensor:
    """2:4 along the input dim: the two largest |w| of each group of 4."""
    _check_2d(weight, "m4n2_1d")
    return nm_mask(weight.detach().abs(), 2, 4)


@lru_cache(maxsize=None)
def _patterns_4x4() -> torch.Tensor:
    """The 90 4x4 0/1 patterns with exactly two ones in every row and every column, as [16, 90]."""
    rows = [r for r in itertools.product((0, 1), repeat=4) if sum(r) == 2]
    pats = [p for p in itertools.product(rows, repeat=4) if all(sum(c) == 2 for c in zip(*p))]
    return torch.tensor(pats, dtype=torch.float64).reshape(len(pats), 16).t().contiguous()


def m4n2_2d(weight: torch.Tensor) -> torch.Tensor:
    """Transposable 2:4: per 4x4 block, the pattern (2 per row and column) maximising sum |w|."""
    _check_2d(weight, "m4n2_2d")
    out_f, in_f = weight.shape
    if out_f % 4 or in_f % 4:
        raise ValueError(f"m4n2_2d needs both weight dims to be multiples of 4, got {tuple(weight.shape)}")
    a = weight.detach().abs().to(torch.float64)
    blocks = a.reshape(out_f // 4, 4, in_f // 4, 4).permute(0, 2, 1, 3).reshape(-1, 16)
    pats = _patterns_4x4().to(a.device)
    best = (blocks @ pats).argmax(dim=1)
    keep = pats.t()[best].bool()
    return keep.reshape(out_f // 4, in_f // 4, 4, 4).permute(0, 2, 1, 3).reshape(out_f, in_f)


def _keep_top(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep the (1 - sparsity) share of highest scores, per output row or over the whole tensor."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    s = score.detach()
    flat = s.reshape(s.shape[0], -1) if per_row else s.reshape(1, -1)
    n_prune = int(round(flat.shape[1] * sparsity))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune:
        keep.scatter_(1, flat.topk(n_prune, dim=1, largest=False).indices, False)
    return keep.reshape(s.shape)


def wanda(weight: torch.Tensor, act_norm: torch.Tensor, pattern: str = "2:4", sparsity: float = 0.5) -> torch.Tensor:
    """Wanda: score |W_ij| * ||X_j||_2 (input-feature norm from calibration); 2:4 or per-row unstructured."""
    _check_2d(weight, "wanda")
    if act_norm.shape != (weight.shape[1],):
        raise ValueError(f"wanda: act_norm shape {tuple(act_norm.shape)} != ({weight.shape[1]},) (the input dim)")
    score = weight.detach().abs().float() * act_norm.detach().float().to(weight.device)[None, :]
    if pattern == "2:4":
        return nm_mask(score, 2, 4)
    return _keep_top(score, sparsity, per_row=True)


def magnitude(weight: torch.Tensor, sparsity: float = 0.5) -> torch.Tensor:
    """Unstructured magnitude pruning: drop the `sparsity` share of smallest |w| in the layer."""
    _check_2d(weight, "magnitude")
    return _keep_top(weight.detach().abs(), sparsity, per_row=False)


def make_mask(
    weight: torch.Tensor,
    method: str,
    pattern: str = "2:4",
    sparsity: float = 0.5,
    act_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch by method name; `pattern` is "2:4" or "unstructured"."""
    if pattern not in ("2:4", "unstructured"):
        raise ValueError(f"pattern must be '2:4' or 'unstructured', got {pattern!r}")
    if method == "wanda":
        if act_norm is None:
            raise ValueError("method 'wanda' needs act_norm (input-activation norms from calibration)")
        return wanda(weight, act_norm, pattern, sparsity)
    if pattern == "unstructured":
        if method != "magnitude":
            raise ValueError(f"method {method!r} is 2:4 only; use 'magnitude' or 'wanda' for unstructured")
        return magnitude(weight, sparsity)
    if method in ("m4n2_1d", "magnitude"):
        return m4n2_1d(weight)
    if method == "m4n2_2d":
        return m4n2_2d(weight)
    raise ValueError(f"unknown mask method {method!r}; choose one of {METHODS}")


def count_24_violations(t: torch.Tensor, dim: int = -1) -> tuple[int, int]:
    """(groups of 4 along `dim` holding more than two nonzeros, total groups)."""
    x = t.detach().movedim(dim, -1)
    if x.shape[-1] % 4:
        raise ValueError(f"2:4 check needs the size of dim {dim} ({x.shape[-1]}) to be a multiple of 4")
    nnz = (x.reshape(-1, 4) != 0).sum(dim=1)
    return int((nnz > 2).sum()), int(nnz.numel())


def is_24(weight_or_mask: torch.Tensor, dim: int = -1) -> bool:
    """True when every group of 4 along `dim` (default: the input dim) has at most two nonzeros."""
    if weight_or_mask.shape[dim] % 4:
        return False
    return count_24_violations(weight_or_mask, dim)[0] == 0
