"""Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020): untargeted with CE or DLR loss, and targeted with the targeted
DLR loss over the top-k other classes. Linf or L2.

PGD with a fixed step size is only as strong as its step size is lucky. APGD needs none: it starts
at 2 eps, adds momentum (0.75), and at checkpoints w_j (p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) halves the step and restarts from the best point
wherever the loss rose in fewer than rho = 0.75 of the steps since the last checkpoint, or neither
the step nor the best loss changed. Every example keeps its best point: the first misclassified
iterate if there is one, else the one of highest loss.

The first window counts its first step as a rise where its loss is above zero, not above the
starting point's, as AutoAttack's reference code does (its history of losses starts at zeros): a
DLR loss is negative until the example breaks, so the step is halved after the first window. At 100
steps that changes nothing measured; at 10 it is what makes APGD-T and APGD-DLR as strong as the
reference's (`benchmarks/results.md`, the oracle table).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .core import (AttackError, check_inputs, check_non_negative, check_norm, clean_logits, frozen, gradient_fn,
                   l2_norm, over_restarts, over_targets, register_attack, sphere_start)
from .losses import LOSSES, targeted_dlr_loss


def _check(eps: float, steps: int, norm: str, restarts: int) -> None:
    check_non_negative(eps=eps, steps=steps)
    check_norm(norm)
    if restarts < 1:
        raise AttackError(f"restarts must be >= 1, got {restarts}")


def _project_l2(z: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    d = z - x
    n = l2_norm(d)
    return (x + d / (n + 1e-12) * torch.clamp(n, max=eps)).clamp(0, 1)


def _run(grad_fn, loss_fn, x: torch.Tensor, y: torch.Tensor, label: torch.Tensor, *, eps: float, steps: int,
         norm: str, rho: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One APGD run on every example of x; returns (x_adv, fooled).

    Examples drop out of the working set at a checkpoint once they are misclassified: their result
    is fixed, and a robust-accuracy evaluation gains nothing from pushing them further.
    """
    n = len(x)
    out = x.clone()
    fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
    if n == 0 or steps == 0 or eps == 0:
        return out, fooled
    idx = torch.arange(n, device=x.device)
    x0, y0, lab = x, y, label
    if norm == "linf":
        lo, hi = (x0 - eps).clamp(min=0), (x0 + eps).clamp(max=1)
    adv = sphere_start(x0, eps, norm, generator)
    grad, logits = grad_fn(adv, y0)
    loss = loss_fn(logits, y0)
    ok = logits.argmax(1) == lab
    x_best, grad_best, loss_best = adv.clone(), grad.clone(), loss.clone()
    x_fool = torch.where(ok.view(-1, 1, 1, 1), x0, adv)
    step = torch.full((n, 1, 1, 1), 2.0 * eps, device=x.device, dtype=x.dtype)
    adv_old = adv.clone()
    k = max(int(0.22 * steps), 1)
    size_decr, k_min = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    since, prev_loss, rises = 0, torch.zeros_like(loss), torch.zeros(n, device=x.device)
    best_at_check, reduced = loss_best.clone(), torch.zeros(n, dtype=torch.bool, device=x.device)
    for i in range(int(steps)):
        momentum = adv - adv_old
        adv_old = adv
        a = 0.75 if i > 0 else 1.0
        if norm == "linf":
            z = torch.clamp(adv + step * grad.sign(), lo, hi)
            adv = torch.clamp(adv + (z - adv) * a + momentum * (1 - a), lo, hi)
        else:
            z = _project_l2(adv + step * grad / (l2_norm(grad) + 1e-12), x0, eps)
            adv = _project_l2(adv + (z - adv) * a + momentum * (1 - a), x0, eps)
        grad, logits = grad_fn(adv, y0)
        loss = loss_fn(logits, y0)
        wrong = logits.argmax(1) != lab
        x_fool = torch.where((wrong & ok).view(-1, 1, 1, 1), adv, x_fool)
        ok &= ~wrong
        rises += loss > prev_loss
        prev_loss = loss
        better = loss > loss_best
        x_best = torch.where(better.view(-1, 1, 1, 1), adv, x_best)
        grad_best = torch.where(better.view(-1, 1, 1, 1), grad, grad_best)
        loss_best = torch.where(better, loss, loss_best)
        since += 1
        if since < k:
            continue
        halve = (rises <= k * rho) | (~reduced & (best_at_check >= loss_best))
        reduced, best_at_check = halve, loss_best.clone()
        step = torch.where(halve.view(-1, 1, 1, 1), step / 2, step)
        adv = torch.where(halve.view(-1, 1, 1, 1), x_best, adv)
        grad = torch.where(halve.view(-1, 1, 1, 1), grad_best, grad)
        k, since, rises = max(k - size_decr, k_min), 0, torch.zeros_like(rises)
        done = ~ok
        if done.any():  # shrink the working set to the examples still classified correctly
            out[idx[done]] = x_fool[done]
            fooled[idx[done]] = True
            keep = ok
            if not keep.any():
                return out, fooled
            idx, x0, y0, lab = idx[keep], x0[keep], y0[keep], lab[keep]
            adv, adv_old, grad, x_best, grad_best = adv[keep], adv_old[keep], grad[keep], x_best[keep], grad_best[keep]
            loss_best, best_at_check, reduced, step = loss_best[keep], best_at_check[keep], reduced[keep], step[keep]
            prev_loss, rises, x_fool, ok = prev_loss[keep], rises[keep], x_fool[keep], ok[keep]
            if norm == "linf":
                lo, hi = lo[keep], hi[keep]
    out[idx] = torch.where(ok.view(-1, 1, 1, 1), x_best, x_fool)
    fooled[idx] = ~ok
    return out, fooled


@register_attack()
def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.3, steps: int = 100,
         norm: Literal["linf", "l2"] = "linf", loss: Literal["ce", "dlr"] = "ce", restarts: int = 1, rho: float = 0.75,
         generator: torch.Generator | None = None, fast: bool = True) -> torch.Tensor:
    """Auto-PGD (Croce & Hein 2020), untargeted: step-size free PGD with momentum, CE or DLR loss.

    y are the true labels. Each restart starts at a new random point in the eps-ball and runs on
    the examples no earlier restart fooled. Returns, per example, the first misclassified iterate
    found, else the point of highest loss; images in [0, 1].
    """
    check_inputs(x, y)
    _check(eps, steps, norm, restarts)
    if loss not in LOSSES:
        raise AttackError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    loss_fn = LOSSES[loss]
    with frozen(model):
        grad_fn = gradient_fn(model, x[:1], fast, loss=None if loss == "ce" else loss_fn)
        return over_restarts(lambda sel: _run(grad_fn, loss_fn, x[sel], y[sel], y[sel], eps=eps, steps=steps,
                                              norm=norm, rho=rho, generator=generator), x, restarts)[0].detach()


@register_attack(name="apgd-t")
def apgd_t(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.3, steps: int = 100,
           norm: Literal["linf", "l2"] = "linf", targets: int = 9, restarts: int = 1, rho: float = 0.75,
           generator: torch.Generator | None = None, fast: bool = True) -> torch.Tensor:
    """Targeted Auto-PGD (Croce & Hein 2020): APGD on the targeted DLR loss towards each of the
    `targets` classes ranked highest by the model after the true one, each on the examples no
    earlier target broke.

    y are the true labels (the goal is any misclassification). Returns images in [0, 1].
    """
    check_inputs(x, y)
    _check(eps, steps, norm, restarts)
    if not 1 <= targets <= 9:
        raise AttackError(f"targets must be in [1, 9], got {targets}")
    with frozen(model):
        grad_fn = gradient_fn(model, x[:1], fast, loss=targeted_dlr_loss)
        logits = clean_logits(model, x)

        def one_target(xs, ys, pair):
            return over_restarts(lambda s: _run(grad_fn, targeted_dlr_loss, xs[s], pair[s], ys[s], eps=eps,
                                                    steps=steps, norm=norm, rho=rho, generator=generator), xs, restarts)

        return over_targets(one_target, x, y, logits, targets).detach()


__all__ = ["apgd", "apgd_t"]
