"""Token datasets for training: text lines tokenized on the fly, or pre-tokenized tensors.

Batches are a pure function of (seed, step): `StepSampler` walks an endless stream of seeded epoch
permutations, so a resumed run sees exactly the batches the interrupted one would have, and a
global batch splits the same way into micro-batches and ranks whatever the world size. With
`lengths`, each epoch's batches are grouped by length (lines of like length share a batch), so a
batch padded to its longest line wastes little compute on padding.
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

    def lengths(self) -> torch.Tensor:
        """Tokens per line after truncation, as the batches will hold them."""
        ids = self.tokenizer(self.lines, truncation=True, max_length=self.max_length)["input_ids"]
        return torch.tensor([len(row) for row in ids])


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

    def lengths(self) -> torch.Tensor:
        """Real tokens per row (the attention mask's count; the row length without one)."""
        mask = self.tensors.get("attention_mask")
        ids = self.tensors["input_ids"]
        return mask.sum(-1) if mask is not None else torch.full((len(ids),), ids.shape[-1])


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
    """The example indices of global batch `step`, as a pure function of (seed, step).

    With `lengths` (one per example), every `GROUP` global batches of an epoch's permutation are sorted
    by length, cut into batches and those batches shuffled: each batch holds lines of like length. (When
    the dataset is not a multiple of the batch, later epochs start mid-batch, so a batch at an epoch's
    seam may join two length runs.)
    """

    GROUP = 64

    def __init__(self, size: int, global_batch: int, seed: int = 0, lengths: torch.Tensor | None = None):
        if size <= 0:
            raise FxcookError("cannot sample from an empty dataset")
        if lengths is not None and len(lengths) != size:
            raise FxcookError(f"length grouping needs one length per example: {len(lengths)} for {size} examples")
        self.size, self.global_batch, self.seed, self.lengths = size, global_batch, seed, lengths
        self._cached: tuple[int, torch.Tensor] | None = None

    def _epoch(self, e: int) -> torch.Tensor:
        if self._cached is not None and self._cached[0] == e:
            return self._cached[1]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
        perm = torch.randperm(self.size, generator=gen)
        if self.lengths is not None:
            batches = []
            for part in perm.split(self.global_batch * self.GROUP):
                part = part[torch.argsort(self.lengths[part], stable=True)]
                cut = part.split(self.global_batch)
                full = len(part) // self.global_batch  # a short last batch stays last, keeping the rest aligned
                batches += [cut[i] for i in torch.randperm(full, generator=gen).tolist()] + list(cut[full:])
            perm = torch.cat(batches)
        self._cached = (e, perm)
        return perm

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
