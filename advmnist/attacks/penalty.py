"""The target-penalized image optimisation of report 001 (Problem 17.2, "adversarial examples")."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .core import (AttackError, check_inputs, check_non_negative, check_positive, frozen, gradient_fn,
                   randn_like, register_attack)


@register_attack(always_targeted=True)
def penalty(model: nn.Module, x_target: torch.Tensor, target: torch.Tensor, *, eta: float = 0.1,
            lam: float = 0.05, steps: int = 10000, init: Literal["noise", "image"] = "noise", clamp: bool = True,
            generator: torch.Generator | None = None, fast: bool = True, callback=None) -> torch.Tensor:
    """Gradient descent on the image towards class `target`, pulled back towards `x_target`.

    x <- x - eta * (grad_x CE(model(x), target) + lam * (x - x_target)), from noise N(0.5, 0.3)
    (`init="noise"`, the report's choice) or from `x_target` itself (`init="image"`). The result
    looks like `x_target` to a person (the penalty) and like `target` to the model (the loss).

    Report 001 ran this in the tutorial's normalised space; here x, x_target and the noise live in
    pixel space [0, 1] with the report's eta and lam. `clamp=True` (the default) keeps every
    iterate in [0, 1]; `clamp=False` is the report's unconstrained update and may leave [0, 1].
    All examples of the batch are optimised at once; each one's gradient is its own.
    Shapes: x_target (N, 1, 28, 28) in [0, 1], target (N,) int64; returns (N, 1, 28, 28).
    `fast=False` forces plain autograd (see attacks/fast.py); `callback(step, x)`, if given, is
    called after every step (progress bars).
    """
    check_inputs(x_target, target)
    check_positive(eta=eta)
    check_non_negative(lam=lam, steps=steps)
    if init == "noise":
        x = 0.5 + 0.3 * randn_like(x_target, generator)
    elif init == "image":
        x = x_target.clone()
    else:
        raise AttackError(f"init must be 'noise' or 'image', got {init!r}")
    if clamp:
        x = x.clamp(0, 1)
    with frozen(model):
        grad_fn = gradient_fn(model, x_target, fast)
        for step in range(int(steps)):
            grad, _ = grad_fn(x, target)
            x = x - eta * (grad + lam * (x - x_target))
            if clamp:
                x = x.clamp(0, 1)
            if callback is not None:
                callback(step, x)
    return x.detach()
