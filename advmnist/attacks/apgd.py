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
         norm: str, rho: float, generator, group: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One APGD run on every example of x; returns (x_adv, fooled).

    Examples drop out of the working set at a checkpoint once they are misclassified: their result
    is fixed, and a robust-accuracy evaluation gains nothing from pushing them further. With `group`
    (an id per example: copies of one image run side by side), every example of a group drops out
    once one of them is misclassified, since the image is then broken whatever the others find.
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
        if done.any():  # shrink the working set to the examples still to be decided
            if group is not None:  # ids are below n: they index the rows of x
                done = torch.zeros(n, dtype=torch.bool, device=x.device).index_fill_(0, group[done], True)[group]
            out[idx[done]] = torch.where(ok[done].view(-1, 1, 1, 1), x_best[done], x_fool[done])
            fooled[idx[done]] = ~ok[done]
            keep = ~done
            if not keep.any():
                return out, fooled
            idx, x0, y0, lab = idx[keep], x0[keep], y0[keep], lab[keep]
            adv, adv_old, grad, x_best, grad_best = adv[keep], adv_old[keep], grad[keep], x_best[keep], grad_best[keep]
            loss_best, best_at_check, reduced, step = loss_best[keep], best_at_check[keep], reduced[keep], step[keep]
            prev_loss, rises, x_fool, ok = prev_loss[keep], rises[keep], x_fool[keep], ok[keep]
            group = None if group is None else group[keep]
            if norm == "linf":
                lo, hi = lo[keep], hi[keep]
    out[idx] = torch.where(ok.view(-1, 1, 1, 1), x_best, x_fool)
    fooled[idx] = ~ok
    return out, fooled


def _side_by_side(run, x: torch.Tensor, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`run(sel, group)` -> (x_adv, fooled) on x[sel], with sel = group = `copies` stacked copies of
    x's indices, as independent runs in one batch (a pass over a batch C times larger costs far less
    than C passes over a small one, and a few images are all such a run is for). An image's copies
    stop together once one fools the model; the first copy that did gives its point."""
    n = len(x)
    group = torch.arange(n, device=x.device).repeat(copies)
    adv, hit = run(group, group)
    adv, hit = adv.view(copies, *x.shape), hit.view(copies, n)
    first = hit.int().argmax(0)  # the first copy that fooled the model, else copy 0
    return adv[first, torch.arange(n, device=x.device)], hit.any(0)


@register_attack()
def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.3, steps: int = 100,
         norm: Literal["linf", "l2"] = "linf", loss: Literal["ce", "dlr"] = "ce", restarts: int = 1, rho: float = 0.75,
         generator: torch.Generator | None = None, fast: bool = True, side_by_side: bool = False) -> torch.Tensor:
    """Auto-PGD (Croce & Hein 2020), untargeted: step-size free PGD with momentum, CE or DLR loss.

    y are the true labels. Each restart starts at a new random point in the eps-ball and runs on
    the examples no earlier restart fooled, or with `side_by_side` all restarts at once as copies in
    one batch (faster on a few images; `restarts` times the memory). Returns, per example, the first
    misclassified iterate found, else the point of highest loss; images in [0, 1].
    """
    check_inputs(x, y)
    _check(eps, steps, norm, restarts)
    if loss not in LOSSES:
        raise AttackError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    loss_fn = LOSSES[loss]
    with frozen(model):
        grad_fn = gradient_fn(model, x[:1], fast, loss=None if loss == "ce" else loss_fn)
        def run(sel, group=None):
            return _run(grad_fn, loss_fn, x[sel], y[sel], y[sel], eps=eps, steps=steps, norm=norm, rho=rho,
                        generator=generator, group=group)

        if side_by_side and restarts > 1:
            return _side_by_side(run, x, restarts)[0].detach()
        return over_restarts(run, x, restarts)[0].detach()


@register_attack(name="apgd-t")
def apgd_t(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.3, steps: int = 100,
           norm: Literal["linf", "l2"] = "linf", targets: int = 9, restarts: int = 1, rho: float = 0.75,
           generator: torch.Generator | None = None, fast: bool = True, side_by_side: bool = False) -> torch.Tensor:
    """Targeted Auto-PGD (Croce & Hein 2020): APGD on the targeted DLR loss towards each of the
    `targets` classes ranked highest by the model after the true one, each on the examples no
    earlier target broke, with `restarts` per target; or with `side_by_side` every target and
    restart at once as copies in one batch, an image's copies stopping once one breaks it (for a few
    images: targets x restarts times the memory).

    y are the true labels (the goal is any misclassification). Returns images in [0, 1].
    """
    check_inputs(x, y)
    _check(eps, steps, norm, restarts)
    if not 1 <= targets <= 9:
        raise AttackError(f"targets must be in [1, 9], got {targets}")
    with frozen(model):
        grad_fn = gradient_fn(model, x[:1], fast, loss=targeted_dlr_loss)
        logits = clean_logits(model, x)

        if side_by_side:
            return _all_targets_at_once(grad_fn, x, y, logits, targets, restarts, eps=eps, steps=steps, norm=norm,
                                        rho=rho, generator=generator).detach()

        def one_target(xs, ys, pair):
            return over_restarts(lambda s: _run(grad_fn, targeted_dlr_loss, xs[s], pair[s], ys[s], eps=eps,
                                                steps=steps, norm=norm, rho=rho, generator=generator), xs, restarts)

        return over_targets(one_target, x, y, logits, targets).detach()


def _all_targets_at_once(grad_fn, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, targets: int, restarts: int,
                         **how) -> torch.Tensor:
    """APGD-T's targets and restarts side by side: copy r * k + j of each correctly classified image
    runs restart r towards the class ranked j + 1 by its clean logits. As `over_targets`, an image
    no copy breaks comes back unchanged."""
    result = x.clone()
    todo = (logits.argmax(1) == y).nonzero().flatten()
    if not len(todo):
        return result
    xs, ys, ranked = x[todo], y[todo], logits[todo].argsort(1, descending=True)[:, 1:targets + 1]
    target = ranked.t().repeat(restarts, 1).reshape(-1)

    def run(sel, group):
        return _run(grad_fn, targeted_dlr_loss, xs[sel], torch.stack([ys[sel], target], 1), ys[sel], group=group,
                    **how)

    adv, hit = _side_by_side(run, xs, ranked.shape[1] * restarts)
    result[todo] = torch.where(hit.view(-1, 1, 1, 1), adv, xs)
    return result


__all__ = ["apgd", "apgd_t"]
