"""Token datasets for training: text lines tokenized on the fly, or pre-tokenized tensors.

Batches are a pure function of (seed, step): `StepSampler` walks an endless stream of seeded epoch
permutations, so a resumed run sees exactly the batches the interrupted one would have, and a
global batch splits the same way into micro-batches and ranks whatever the world size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fxcook.errors import FxcookError


class TextDataset:
    """Lines of text, tokenized per batch (padding to the longest line, truncation at max_length)."""

    def __init__(self, lines: Sequence[str], tokenizer, max_length: int = 128, name: str = "text"):
        lines = [s for s in lines if s and s.strip()]
        if not lines:
            raise FxcookError(f"dataset {name!r} is empty: no non-blank lines to train on")
        if tokenizer is None:
            raise FxcookError(f"dataset {name!r} holds text, so it needs the model's tokenizer")
        self.lines, self.tokenizer, self.max_length, self.name = list(lines), tokenizer, max_length, name

    def __len__(self) -> int:
        return len(self.lines)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            [self.lines[i] for i in indices],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


class TensorDataset:
    """Pre-tokenized rows: a mapping of equal-length tensors such as input_ids and attention_mask."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "tensors"):
        if "input_ids" not in tensors:
            raise FxcookError(f"dataset {name!r} needs an 'input_ids' tensor, has {sorted(tensors)}")
        n = len(tensors["input_ids"])
        if n == 0:
            raise FxcookError(f"dataset {name!r} is empty")
        bad = [k for k, v in tensors.items() if len(v) != n]
        if bad:
            raise FxcookError(f"dataset {name!r}: tensors {bad} do not have {n} rows like input_ids")
        self.tensors, self.name = dict(tensors), name

    def __len__(self) -> int:
        return len(self.tensors["input_ids"])

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {k: v[idx] for k, v in self.tensors.items()}


def as_dataset(data, tokenizer=None, max_length: int = 128):
    """A TextDataset/TensorDataset from lines, a mapping of tensors, or a dataset already built."""
    if isinstance(data, (TextDataset, TensorDataset)):
        return data
    if isinstance(data, Mapping):
        return TensorDataset(data)
    if isinstance(data, Sequence) and not isinstance(data, str):
        return TextDataset(data, tokenizer, max_length)
    raise FxcookError(
        f"training data must be lines of text, a mapping of token tensors or a dataset, got {type(data).__name__}"
    )


class StepSampler:
    """The example indices of global batch `step`, as a pure function of (seed, step)."""

    def __init__(self, size: int, global_batch: int, seed: int = 0):
        if size <= 0:
            raise FxcookError("cannot sample from an empty dataset")
        self.size, self.global_batch, self.seed = size, global_batch, seed

    def _epoch(self, e: int) -> torch.Tensor:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + e))

    def indices(self, step: int) -> list[int]:
        start = step * self.global_batch
        out: list[int] = []
        while len(out) < self.global_batch:
            e, off = divmod(start + len(out), self.size)
            out += self._epoch(e)[off : off + self.global_batch - len(out)].tolist()
        return out

    def split(self, step: int, accum: int, world: int, rank: int) -> list[list[int]]:
        """This rank's share of each of the `accum` micro-batches of global batch `step`."""
        idx = self.indices(step)
        if self.global_batch % (accum * world):
            raise FxcookError(
                f"batch size {self.global_batch} is not divisible by grad_accum x world = {accum} x {world}"
            )
        per = self.global_batch // (accum * world)
        return [idx[(a * world + rank) * per : (a * world + rank + 1) * per] for a in range(accum)]
