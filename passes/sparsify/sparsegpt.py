"""SparseGPT (Frantar & Alistarh 2023): prune a linear and update its kept weights to keep X W^T.

Magnitude and Wanda only choose which weights to drop; SparseGPT also moves the kept ones so the
layer's output on calibration inputs X changes as little as possible. With H = X^T X (dampened),
columns are pruned left to right; each pruned column's error is spread over the columns not yet
visited through the upper Cholesky factor of H^-1 (the Optimal Brain Surgeon update, shared by all
rows). The 2:4 choice in each group of 4 columns is made on the already-updated weights, by
w^2 / [H^-1]_jj^2, the OBS saliency. Columns are processed in blocks so the update of the far
columns is one matrix product per block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["sparsegpt", "input_hessians"]


def input_hessians(shapes: dict[str, int]) -> tuple[dict[str, torch.Tensor], Callable[[str, torch.Tensor], None]]:
    """Empty X^T X accumulators (float64, in_features square) and the `record(path, x)` that fills them."""
    hess = {p: torch.zeros(n, n, dtype=torch.float64) for p, n in shapes.items()}

    def record(path: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64).cpu()
        hess[path] += x.t() @ x

    return hess, record


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, and the columns no input reached."""
    h = hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True), dead


def _prune_block(w: torch.Tensor, u: torch.Tensor, pattern: str, sparsity: float, forced: torch.Tensor):
    """Prune one column block in place; returns (pruned mask, per-column scaled errors) for the far update."""
    rows, cols = w.shape
    diag = torch.diagonal(u)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    if pattern == "unstructured":  # mask for the whole block at once, on the weights as they arrive
        pruned |= forced
        k = int(round(w.numel() * sparsity)) - int(forced.sum())
        if k > 0:
            score = (w * w / diag[None, :] ** 2).masked_fill(forced, float("inf"))
            pruned.view(-1)[score.reshape(-1).topk(k, largest=False).indices] = True
    err = torch.zeros_like(w)
    for j in range(cols):
        if pattern == "2:4" and j % 4 == 0:
            score = (w[:, j : j + 4] ** 2 / diag[None, j : j + 4] ** 2).masked_fill(forced[:, j : j + 4], -1.0)
            pruned[:, j : j + 4].scatter_(1, score.topk(2, dim=1, largest=False).indices, True)
        col = w[:, j]
        e = torch.where(pruned[:, j], col, torch.zeros_like(col)) / u[j, j]
        w[:, j:] -= e[:, None] * u[j, j:][None, :]
        w[:, j] = torch.where(pruned[:, j], torch.zeros_like(col), w[:, j])
        err[:, j] = e
    return pruned, err


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: str = "2:4",
    sparsity: float = 0.5,
    block: int = 128,
    damp: float = 0.01,
    forced: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(updated weight, keep mask) for an `[out, in]` weight given H = X^T X over calibration inputs.

    `forced` (bool, like the weight): positions that must be pruned (an earlier mask); `block`:
    columns per lazy-update block; `damp`: share of mean(diag H) added to the diagonal.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"sparsegpt: weight {tuple(weight.shape)} and hessian {tuple(hessian.shape)} do not match")
    if pattern == "2:4" and (weight.shape[1] % 4 or block % 4):
        raise ValueError(f"sparsegpt: 2:4 needs in_features ({weight.shape[1]}) and block ({block}) divisible by 4")
    u, dead = _inverse_cholesky(hessian.to(torch.float64), damp)
    w = weight.detach().to(torch.float64).clone()
    forced = torch.zeros_like(w, dtype=torch.bool) if forced is None else forced.to(w.device).bool()
    w[:, dead] = 0.0
    keep = torch.ones_like(w, dtype=torch.bool)
    for a in range(0, w.shape[1], block):
        b = min(a + block, w.shape[1])
        pruned, err = _prune_block(w[:, a:b], u[a:b, a:b], pattern, sparsity, forced[:, a:b])
        keep[:, a:b] = ~pruned
        w[:, b:] -= err @ u[a:b, b:]
    return (w * keep).to(weight.dtype), keep
