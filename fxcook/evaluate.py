"""Sentence-embedding fidelity: how close a compressed encoder stays to the fp32 original."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fxcook.tracing import main_output


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states under the attention mask, L2-normalised (sentence-transformers)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


@torch.no_grad()
def embed(
    model: Callable, tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 128
) -> torch.Tensor:
    """Sentence embeddings of `sentences` from any callable returning token states."""
    outs = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(
            sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        outs.append(mean_pool(main_output(model(**dict(enc))), enc["attention_mask"]))
    return torch.cat(outs)


def fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Min and mean cosine similarity between matching rows of two embedding matrices."""
    cos = F.cosine_similarity(reference.float(), candidate.float(), dim=-1)
    return {"min_cos": float(cos.min()), "mean_cos": float(cos.mean())}
