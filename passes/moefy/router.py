"""Routers for routed-expert FFNs: MoEfication's `MLPRouter`, its training and its recall."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["MLPRouter", "router_recall", "train_router"]


class MLPRouter(nn.Module):
    """MoEfication's learned router: Linear(d, E) -> tanh -> Linear(E, E) on x / ||x||."""

    def __init__(self, hidden: int, experts: int, centroids: torch.Tensor | None = None):
        super().__init__()
        self.proj = nn.Linear(hidden, experts, bias=False)
        self.mix = nn.Linear(experts, experts, bias=False)
        with torch.no_grad():
            self.mix.weight.copy_(torch.eye(experts))
            if centroids is not None:
                self.proj.weight.copy_(centroids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.tanh(self.proj(F.normalize(x, dim=-1))))


def router_recall(scores: torch.Tensor, mass: torch.Tensor, k: int) -> float:
    """Share of the true activation mass caught by the top-k experts the scores choose."""
    idx = scores.topk(k, dim=-1).indices
    caught = mass.gather(-1, idx).sum(-1)
    total = mass.sum(-1)
    return min(1.0, float(caught.sum() / total.sum().clamp_min(1e-12)))


def train_router(
    router: nn.Module,
    hidden: torch.Tensor,
    mass: torch.Tensor,
    k: int,
    epochs: int = 30,
    lr: float = 1e-2,
    batch_size: int = 512,
    holdout: float = 0.1,
    seed: int = 0,
    desc: str = "router",
    progress: bool = True,
) -> dict[str, float]:
    """Fit `router` to the experts' activation mass with BCE; returns held-out recall.

    Targets are the per-expert activation mass divided by its maximum over the calibration set;
    tokens are split 90/10 (by default) into train and held-out sets.
    """
    hidden = hidden.detach().reshape(-1, hidden.shape[-1]).float()
    mass = mass.detach().reshape(-1, mass.shape[-1]).float()
    n = hidden.shape[0]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    n_val = max(1, int(round(n * holdout))) if n > 1 else 0
    val, tr = order[:n_val], order[n_val:]
    if tr.numel() == 0:
        tr = val
    target = mass / mass.max().clamp_min(1e-12)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    router.train()
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    loss_value = float("nan")
    for _ in bar:
        perm = tr[torch.randperm(tr.numel(), generator=gen)]
        for start in range(0, perm.numel(), batch_size):
            b = perm[start : start + batch_size]
            loss = F.binary_cross_entropy_with_logits(router(hidden[b]), target[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.4f}")
    router.eval()
    with torch.no_grad():
        recall = router_recall(router(hidden[val]), mass[val], k)
    return {"recall": recall, "loss": loss_value, "train_tokens": int(tr.numel()), "val_tokens": int(val.numel())}


# --------------------------------------------------------------------------------------------
# The routed FFN
# --------------------------------------------------------------------------------------------
