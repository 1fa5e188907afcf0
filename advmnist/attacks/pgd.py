"""Projected Gradient Descent (Madry et al., 2018) in Linf or L2, with restarts."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .core import (AttackError, LossFn, check_inputs, check_non_negative, check_norm, check_positive, default_alpha,
                   frozen, gradient_fn, l2_norm, per_example_loss, project_l2, project_linf, rand_like, randn_like,
                   register_attack)
from .losses import LOSSES


def _loss(loss) -> LossFn | None:
    """The per-example loss the steps ascend; None: cross-entropy on the gradient path's written-out form."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise AttackError(f"loss must be one of {', '.join(LOSSES)} or a function (logits, y) -> losses, got {loss!r}")
    return None if loss == "ce" else LOSSES[loss]


def _random_start(x: torch.Tensor, eps: float, norm: str, generator, std: float | None = None) -> torch.Tensor:
    if std is not None:
        return x + std * randn_like(x, generator)
    if norm == "linf":
        return x + eps * (2 * rand_like(x, generator) - 1)
    direction = randn_like(x, generator)
    direction = direction / l2_norm(direction).clamp_min(1e-12)
    radius = eps * rand_like(x[:, :1, :1, :1], generator) ** (1.0 / x[0].numel())
    return x + radius * direction


@register_attack()
def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.3, alpha: float | None = None,
        steps: int = 40, norm: Literal["linf", "l2"] = "linf", random_start: bool = True, restarts: int = 1,
        loss: Literal["ce", "dlr"] | LossFn = "ce", start_std: float | None = None, targeted: bool = False,
        generator: torch.Generator | None = None, fast: bool = True, callback=None) -> torch.Tensor:
    """Iterated gradient steps, each projected onto the eps-ball around x and clipped to [0, 1].

    Linf steps by alpha * sign(grad); L2 by alpha * grad / ||grad||. alpha defaults to
    2.5 * eps / steps (Madry et al.) but at least eps / 8 (`default_alpha`). With `restarts` > 1
    each restart begins at a new random point
    and the worst case is kept per example: a successful example beats an unsuccessful one, and
    among equals the higher loss (untargeted) or lower target loss (targeted) wins.
    Untargeted: y are true labels; targeted: y are target labels.

    `loss` is what the steps ascend: "ce" (cross-entropy, the default), "dlr" (Croce & Hein 2020) or
    any function (logits, y) -> one loss per example, e.g. TRADES' KL divergence to the clean
    prediction (Zhang et al. 2019; `advmnist.train`). The random start is uniform in the ball, or,
    with `start_std`, Gaussian noise of that standard deviation (TRADES' start: 0.001), projected
    onto the ball and clipped to [0, 1].
    """
    check_inputs(x, y)
    check_non_negative(eps=eps, steps=steps)
    check_norm(norm)
    if restarts < 1:
        raise AttackError(f"restarts must be >= 1, got {restarts}")
    if start_std is not None:
        check_non_negative(start_std=start_std)
    loss_fn = _loss(loss)
    if alpha is None:
        alpha = default_alpha(eps, steps)
    if eps > 0:
        check_positive(alpha=alpha)
    project = project_linf if norm == "linf" else project_l2
    sign = -1.0 if targeted else 1.0
    best = x.clone()
    best_success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    best_score = torch.full((len(x),), -float("inf"), device=x.device)
    if norm == "linf":
        lo, hi = (x - eps).clamp_(min=0), (x + eps).clamp_(max=1)  # the ball within [0, 1]
    with frozen(model):
        grad_fn = gradient_fn(model, x, fast, loss=loss_fn)
        for _ in range(restarts):
            adv = (project(_random_start(x, eps, norm, generator, start_std), x, eps).clamp(0, 1) if random_start
                   else x.clone())
            for step in range(int(steps)):
                grad, _ = grad_fn(adv, y)
                if norm == "linf":
                    # project-then-clip in one clamp: equal to project_linf(...).clamp(0, 1)
                    adv = torch.clamp(adv + (sign * alpha) * grad.sign_(), lo, hi)
                else:
                    adv = project(adv + sign * alpha * grad / l2_norm(grad).clamp_min(1e-12), x, eps).clamp(0, 1)
                if callback is not None:
                    callback(step, adv)
            if restarts == 1:  # nothing to compare: spare the scoring forward pass (adversarial training)
                return adv.detach()
            if loss_fn is None:
                value, logits = per_example_loss(model, adv, y)
            else:  # the restarts compare the loss the steps ascended
                with torch.no_grad():
                    logits = model(adv)
                    value = loss_fn(logits, y)
            pred = logits.argmax(1)
            success = pred == y if targeted else pred != y
            score = sign * value
            better = (success & ~best_success) | ((success == best_success) & (score > best_score))
            best = torch.where(better.view(-1, 1, 1, 1), adv, best)
            best_success |= success
            best_score = torch.where(better, score, best_score)
    return best.detach()
