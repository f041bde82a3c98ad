"""Task training: a sequence classifier around an encoder, its cross-entropy, and accuracy.

`SequenceClassifier` puts a linear head on the encoder's mean-pooled last hidden state and returns
the logits `[batch, classes]` as its only output, so `fxcook.compile` captures encoder and head as
one model, passes see the head as a linear site outside the blocks (`classifier`), and the task
loss, head importance and accuracy all read the model's main output. Batches carry `labels`
(LongTensor `[batch]`); `model_inputs` drops them before the model is called.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fxcook.errors import FxcookError
from fxcook.evaluate import mean_pool
from fxcook.tracing import main_output

__all__ = ["SequenceClassifier", "accuracy", "check_labels", "model_inputs", "task_loss_sum"]


class SequenceClassifier(nn.Module):
    """`logits = classifier(dropout(mean_pool(encoder(...).last_hidden_state)))`."""

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.1):
        super().__init__()
        if num_classes < 2:
            raise FxcookError(f"SequenceClassifier: num_classes must be >= 2, got {num_classes}")
        hidden = getattr(getattr(encoder, "config", None), "hidden_size", None)
        if hidden is None:
            raise FxcookError("SequenceClassifier: the encoder has no config.hidden_size to size the head")
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)
        self.num_classes = num_classes

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        return self.classifier(self.dropout(mean_pool(hidden, attention_mask)))


def model_inputs(batch: dict) -> dict:
    """The batch without its class labels (1-D `labels`), which the model does not take."""
    labels = batch.get("labels")
    if labels is None or labels.dim() != 1:
        return batch
    return {k: v for k, v in batch.items() if k != "labels"}


def check_labels(labels: torch.Tensor, classes: int) -> None:
    """Labels must be integer class indices in [0, classes): the error names the culprit."""
    if labels.dtype not in (torch.int64, torch.int32) or labels.dim() != 1:
        raise FxcookError(f"task labels must be a 1-D integer tensor [batch], got {labels.dtype} {tuple(labels.shape)}")
    bad = labels[(labels < 0) | (labels >= classes)]
    if bad.numel():
        raise FxcookError(
            f"task label {int(bad[0])} is outside the head's {classes} classes (0..{classes - 1}); "
            f"size the head for every label or fix the data"
        )


def _logits(out) -> torch.Tensor:
    logits = main_output(out, ("logits",))
    if logits is None or logits.dim() != 2:
        raise FxcookError(
            f"the task loss needs logits [batch, classes] as the model's main output, got {type(out).__name__}"
            + ("" if logits is None else f" of shape {tuple(logits.shape)}")
            + "; wrap the encoder in fxcook.training.task.SequenceClassifier"
        )
    return logits.float()


def task_loss_sum(out, batch: dict) -> torch.Tensor:
    """Cross-entropy of the model's logits vs the batch's `labels`, summed over examples."""
    if "labels" not in batch:
        raise FxcookError("the task loss needs batches with 'labels' (LongTensor [batch]); the batch has none")
    logits = _logits(out)
    check_labels(batch["labels"], logits.shape[-1])
    return F.cross_entropy(logits, batch["labels"].to(logits.device), reduction="sum")


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
    """`{"accuracy", "n"}` of the model's argmax over batches with labels (eval mode, restored)."""
    was, right, n = model.training, 0, 0
    model.eval()
    try:
        for batch in batches:
            logits = _logits(model(**model_inputs(batch)))
            check_labels(batch["labels"], logits.shape[-1])
            right += int((logits.argmax(-1).cpu() == batch["labels"].cpu()).sum())
            n += len(batch["labels"])
    finally:
        model.train(was)
    if not n:
        raise FxcookError("accuracy: no labelled examples to evaluate")
    return {"accuracy": right / n, "n": n}
