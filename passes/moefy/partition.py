"""Neuron partitioning for MoEfication: split an FFN's intermediate neurons into E equal groups.

`balanced_kmeans` clusters weight vectors into exactly equal clusters; `coactivation_partition`
groups neurons that fire together on calibration data.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

__all__ = ["balanced_kmeans", "coactivation_partition"]


def _balanced_assign(dist: torch.Tensor, size: int) -> torch.Tensor:
    """Exact size-constrained assignment: each cluster gets `size` points, total distance minimal.

    Solved as a linear assignment of points to `size` copies of every centroid.
    """
    cost = np.repeat(dist.double().cpu().numpy(), size, axis=1)
    rows, cols = linear_sum_assignment(cost)
    labels = np.empty(dist.shape[0], dtype=np.int64)
    labels[rows] = cols // size
    return torch.from_numpy(labels)


def balanced_kmeans(points: torch.Tensor, clusters: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Balanced k-means: labels [n] with every cluster holding exactly n / clusters points.

    MoEfication's parameter clustering runs this on the L2-normalised rows of the input projection
    (one row per intermediate neuron), so neurons with similar input directions share an expert.
    """
    n = points.shape[0]
    if clusters <= 0 or n % clusters:
        raise ValueError(f"balanced_kmeans: {n} points cannot be split into {clusters} equal clusters")
    size = n // clusters
    points = points.detach().float().cpu()
    gen = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(n, generator=gen)[:clusters]].clone()
    labels = None
    for _ in range(iters):
        new = _balanced_assign(torch.cdist(points, centroids), size)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centroids = torch.zeros_like(centroids).index_add_(0, labels, points) / size
    return labels


def coactivation_partition(active: torch.Tensor, clusters: int, seed: int = 0) -> torch.Tensor:
    """Partition neurons into equal groups that fire together, from calibration activations.

    `active` is [tokens, neurons] (bool or activation values; > 0 counts as firing). The
    co-activation graph has edge weight = how often two neurons fire on the same token; a spectral
    embedding of its normalised adjacency followed by balanced k-means gives a balanced graph
    partition (few strong edges cut) without a METIS dependency.
    """
    a = (active.detach().reshape(-1, active.shape[-1]) > 0).float().cpu()
    n = a.shape[1]
    if clusters <= 0 or n % clusters:
        raise ValueError(f"coactivation_partition: {n} neurons cannot be split into {clusters} equal groups")
    co = a.T @ a
    co.fill_diagonal_(0)
    deg = co.sum(1).clamp_min(1e-6)
    norm = co / deg.sqrt()[:, None] / deg.sqrt()[None, :]
    _, vecs = torch.linalg.eigh(norm.double())
    emb = vecs[:, -clusters:].float()
    emb = F.normalize(emb, dim=1)
    return balanced_kmeans(emb, clusters, seed=seed)
