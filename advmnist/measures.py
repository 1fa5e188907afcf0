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


def _stats(values: torch.Tensor) -> dict:
    if values.numel() == 0:
        return {"mean": None, "median": None, "max": None}
    v = values.float()
    return {"mean": v.mean().item(), "median": v.median().item(), "max": v.max().item()}


def _rate(num: torch.Tensor, den: torch.Tensor) -> float | None:
    d = int(den.sum())
    return 100.0 * int(num.sum()) / d if d else None


def attack_measures(model: nn.Module, x_ref: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
                    target: torch.Tensor | None = None, batch_size: int = 1000) -> dict:
    """Everything a record says about an attack, recomputed from the final images.

    x_ref: the clean images (or each example's x_target), y: their true labels, target: the target
    labels of a targeted attack. Fooling rate: among the examples the model classified correctly,
    the share the attack changed (untargeted) or sent to the target (targeted). Robust accuracy:
    the share still classified as y. `success_8bit`: of the successful images, the share that still
    succeed after rounding to 8-bit pixels, i.e. once saved as PNG. Distances are from x_ref.
    """
    clean_pred = predict_logits(model, x_ref, batch_size).argmax(1)
    probs = predict_logits(model, x_adv, batch_size).softmax(1)
    conf, adv_pred = probs.max(1)
    quantised = torch.round(x_adv.clamp(0, 1) * 255) / 255
    pred_8bit = predict_logits(model, quantised, batch_size).argmax(1)
    correct = clean_pred == y
    if target is None:
        success, success_8bit = adv_pred != y, pred_8bit != y
    else:
        success, success_8bit = adv_pred == target, pred_8bit == target
    delta = (x_adv - x_ref).flatten(1)
    l2, linf = delta.norm(dim=1), delta.abs().amax(dim=1)
    l1, l0 = delta.abs().sum(dim=1), (delta != 0).sum(dim=1)

    def summary(mask: torch.Tensor) -> dict:
        out = {
            "n": int(mask.sum()),
            "clean_accuracy": _rate(correct & mask, mask),
            "fooling_rate": _rate(success & correct & mask, correct & mask),
            "robust_accuracy": _rate((adv_pred == y) & mask, mask),
            "success_8bit": _rate(success_8bit & success & mask, success & mask),
            "confidence": _stats(conf[mask]),
            "l2": _stats(l2[mask]),
            "linf": _stats(linf[mask]),
            "l1": _stats(l1[mask]),
            "l0": _stats(l0[mask]),
        }
        if target is not None:
            out["target_success_rate"] = _rate(success & mask, mask)
        return out

    return {
        "overall": summary(torch.ones_like(y, dtype=torch.bool)),
        "per_digit": {str(d): summary(y == d) for d in range(10) if (y == d).any()},
        "per_example": {"clean_pred": clean_pred.tolist(), "adv_pred": adv_pred.tolist(),
                        "confidence": conf.tolist(), "success": success.tolist(),
                        "success_8bit": success_8bit.tolist(), "l2": l2.tolist(), "linf": linf.tolist(),
                        "l1": l1.tolist(), "l0": l0.tolist()},
    }


NORMS = ("l0", "l1", "l2", "linf")


def distance_profile(per_example: dict, y: list[int], norm: str, targeted: bool = False) -> dict:
    """What a minimum-norm attack says about a model: each example's distance to the nearest adversarial
    point it found (0 for an example the model already gets wrong; none if it was never fooled), the
    median, and the robust accuracy at every eps it implies, robust(eps) = share with distance > eps.

    `sorted` holds the finite distances in increasing order, so the whole curve is redrawn from the
    record. The (lower) median counts never-fooled examples as infinitely far: None when more than half are.
    `median_fooled`: the median over the examples it fooled only (how the papers quote a targeted attack's
    size, beside its success rate). Targeted: the distance to reach each example's target, and no example
    counts as 0 for being wrong.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}")
    n = len(per_example["success"])
    dist = []
    for i in range(n):
        if not targeted and per_example["clean_pred"][i] != y[i]:
            dist.append(0.0)
        elif per_example["success"][i]:
            dist.append(float(per_example[norm][i]))
        else:
            dist.append(None)
    finite = sorted(d for d in dist if d is not None)
    never = n - len(finite)
    ranked = finite + [float("inf")] * never
    median = ranked[(n - 1) // 2] if n else None
    return {"norm": norm, "n": n, "never_fooled": never, "median": None if median == float("inf") else median,
            "median_fooled": finite[(len(finite) - 1) // 2] if finite else None,
            "sorted": [round(d, 6) for d in finite]}


def robust_at(profile: dict, eps: float) -> float:
    """Robust accuracy (%) at `eps` implied by a distance profile: examples farther than eps, or never fooled."""
    import bisect

    farther = len(profile["sorted"]) - bisect.bisect_right(profile["sorted"], eps)
    return 100.0 * (farther + profile["never_fooled"]) / profile["n"] if profile["n"] else float("nan")
