"""Accuracy, per-class accuracy, confusion, loss: computed in eval mode over whole tensors."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits (N, 10) in eval mode, batch by batch; the model's mode is restored."""
    with eval_mode(model):
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def confusion_matrix(pred: torch.Tensor, y: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """counts[true, predicted]."""
    idx = y.long() * classes + pred.long()
    return torch.bincount(idx.cpu(), minlength=classes * classes).reshape(classes, classes)


def per_class_accuracy(pred: torch.Tensor, y: torch.Tensor, classes: int = 10) -> list[float | None]:
    """Accuracy (%) per true class; None for a class with no example."""
    cm = confusion_matrix(pred, y, classes)
    totals = cm.sum(1)
    return [round(100.0 * cm[c, c].item() / totals[c].item(), 4) if totals[c] else None
            for c in range(classes)]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> dict:
    """Loss, accuracy, per-class accuracy and confusion matrix of `model` on (x, y)."""
    logits = predict_logits(model, x, batch_size)
    pred = logits.argmax(1)
    return {
        "loss": F.cross_entropy(logits, y).item(),
        "accuracy": 100.0 * (pred == y).float().mean().item(),
        "per_class_accuracy": per_class_accuracy(pred, y),
        "confusion": confusion_matrix(pred, y).tolist(),
        "n": len(y),
    }
