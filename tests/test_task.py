"""Task training: the classifier wrapper, DistillLoss(task=...), accuracy, and the Shakespeare tasks."""

import pytest
import torch
import torch.nn.functional as F

import fxcook
from fxcook.errors import FxcookError
from fxcook.testing import tiny_model
from fxcook.training.losses import DistillLoss
from fxcook.training.task import SequenceClassifier, accuracy
from fxcook.training.taskdata import GENRE_TEST, GENRES, PLAYS, _passages, shakespeare_task


@pytest.fixture(scope="module")
def tokenizer(minilm):
    return minilm[1]


def _classifier(classes=4, seed=0):
    torch.manual_seed(seed)
    return SequenceClassifier(tiny_model("bert", vocab_size=30522), classes, dropout=0.0)


def _example(data):
    b = data.train.batch([0, 1])
    return {k: v for k, v in b.items() if k != "labels"}


def test_genre_split_is_by_play_and_balanced(tokenizer):
    data = shakespeare_task("genre", tokenizer, per_class=50, test_per_class=20)
    assert data.classes == ("comedy", "tragedy", "history", "poem")
    assert data.balance == {"train": dict.fromkeys(data.classes, 50), "test": dict.fromkeys(data.classes, 20)}
    test_works = {w for works in GENRES.values() for w in works if w in GENRE_TEST}
    assert {g for g, works in GENRES.items() if test_works & set(works)} == set(data.classes)  # every genre tested
    unseen = {p for w in test_works for p in _passages(w, 2)}
    assert set(data.test.lines) <= unseen and not set(data.train.lines) & unseen
    assert set(data.test.labels.tolist()) == {0, 1, 2, 3}


def test_play_task_tests_on_the_last_acts(tokenizer):
    data = shakespeare_task("play", tokenizer, per_class=50, test_per_class=20)
    assert data.classes == PLAYS
    for line, label in zip(data.test.lines, data.test.labels.tolist()):
        passages = _passages(PLAYS[label], 2)
        assert passages.index(line) >= int(0.8 * len(passages))
    assert not set(data.train.lines) & set(data.test.lines)


def test_task_term_is_the_mean_cross_entropy(tokenizer):
    data = shakespeare_task("play", tokenizer, per_class=8, test_per_class=2)
    cooked = fxcook.compile(_classifier(), [], _example(data))
    batch = data.train.batch(range(6))
    logits = cooked(**{k: v for k, v in batch.items() if k != "labels"})
    assert logits.shape == (6, 4)
    loss = DistillLoss(task=1.0).bind(cooked, None, batch)
    total, terms = loss(batch, logits, {})
    torch.testing.assert_close(total, F.cross_entropy(logits, batch["labels"]))
    assert terms["task"] == pytest.approx(float(total.detach()))


def test_training_with_labels_fits_the_data(tokenizer):
    data = shakespeare_task("genre", tokenizer, per_class=4, test_per_class=2)
    cooked = fxcook.compile(_classifier(), [], _example(data))
    before = accuracy(cooked, data.train.batches(16))
    result = fxcook.train(
        cooked,
        None,
        data.train,
        DistillLoss(task=1.0),
        steps=40,
        batch_size=16,
        lr=5e-3,
        schedule="constant",
        progress=False,
    )
    after = accuracy(cooked, data.train.batches(16))
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert after["n"] == 16 and after["accuracy"] >= 0.9 > before["accuracy"]


def test_bad_labels_are_refused_by_name(tokenizer):
    data = shakespeare_task("play", tokenizer, per_class=4, test_per_class=2)
    cooked = fxcook.compile(_classifier(classes=3), [], _example(data))
    batch = data.train.batch(range(8))  # labels 0..3, head of 3 classes
    logits = cooked(**{k: v for k, v in batch.items() if k != "labels"})
    loss = DistillLoss(task=1.0).bind(cooked, None, batch)
    with pytest.raises(FxcookError, match=r"task label 3 is outside the head's 3 classes \(0\.\.2\)"):
        loss(batch, logits, {})
    with pytest.raises(FxcookError, match="the task loss needs batches with 'labels'"):
        loss({k: v for k, v in batch.items() if k != "labels"}, logits, {})
    with pytest.raises(FxcookError, match="unknown task 'genres'; tasks are genre, play"):
        shakespeare_task("genres", None)
