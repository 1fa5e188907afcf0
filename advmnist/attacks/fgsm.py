"""Fast Gradient Sign Method (Goodfellow, Shlens and Szegedy, 2015)."""

from __future__ import annotations

import torch
from torch import nn

from .core import check_inputs, check_non_negative, frozen, gradient_fn, register_attack


@register_attack()
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.3,
         targeted: bool = False, fast: bool = True) -> torch.Tensor:
    """One signed-gradient step of size eps in Linf, clipped to [0, 1].

    Untargeted: y are the true labels and the step raises their loss. Targeted: y are the target
    labels and the step lowers theirs. eps = 0 returns x unchanged.
    """
    check_inputs(x, y)
    check_non_negative(eps=eps)
    with frozen(model):
        grad, _ = gradient_fn(model, x, fast)(x, y)
    step = -grad.sign() if targeted else grad.sign()
    return (x + eps * step).clamp(0, 1).detach()
