"""LoraBranch: the low-rank module a `Lora` pass calls beside a CookedLinear, `B(A(x)) * alpha/rank`.

It is a sibling of the adapted linear (`query` -> `query_lora`), called from the same graph on the
same input, and its output is added to the linear's: the base linear keeps its mask and quantizers,
and `print_graph` shows the branch as its own node. `trainable_role = "lora"` is what
`fxcook.train(trainable="lora")` looks for (core code never imports this module).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SUFFIX = "_lora"


class LoraBranch(nn.Module):
    """`dropout(x) @ A^T @ B^T * alpha / rank`; A Kaiming-uniform, B zero, so it adds 0 at init."""

    trainable_role = "lora"

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The `[out, in]` weight update the branch computes: `B A * alpha / rank`."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def describe(self) -> str:
        """`LoRA rank 8, alpha 16` (what `CookedModel.print_graph` writes beside the node)."""
        return f"LoRA rank {self.rank}, alpha {self.alpha:g}" + (f", dropout {self.dropout:g}" if self.dropout else "")

    def extra_repr(self) -> str:
        return f"in={self.lora_A.shape[1]}, out={self.lora_B.shape[0]}, rank={self.rank}, alpha={self.alpha:g}"


def branch_path(linear_path: str) -> str:
    return linear_path + SUFFIX
