"""Targeted gradient descent on the input, from the clean image, with early stopping."""

from __future__ import annotations

import torch
from torch import nn

from .core import check_inputs, check_non_negative, check_positive, frozen, gradient_fn, register_attack


@register_attack(always_targeted=True)
def gd(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, lr: float = 0.1, steps: int = 1000,
       early_stop: bool = True, fast: bool = True, callback=None) -> torch.Tensor:
    """Descend the cross-entropy of class `target` on the image itself: x <- clip(x - lr * grad).

    No norm bound: the step count and early stopping keep the change small. With `early_stop`,
    an example stops moving as soon as the model predicts its target, so each result is the first
    iterate that fools the model. Shapes: x (N, C, H, W) in [0, 1], target (N,); returns x_adv.
    """
    check_inputs(x, target)
    check_positive(lr=lr)
    check_non_negative(steps=steps)
    adv = x.clone()
    with frozen(model):
        grad_fn = gradient_fn(model, x, fast)
        for step in range(int(steps)):
            grad, logits = grad_fn(adv, target)
            moving = logits.argmax(1) != target if early_stop else torch.ones_like(target, dtype=torch.bool)
            if early_stop and not moving.any():
                break
            update = (adv - lr * grad).clamp(0, 1)
            adv = torch.where(moving.view(-1, 1, 1, 1), update, adv)
            if callback is not None:
                callback(step, adv)
    return adv.detach()
