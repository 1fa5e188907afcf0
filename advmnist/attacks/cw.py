"""The Carlini & Wagner L2 attack (Carlini & Wagner, "Towards evaluating the robustness of neural
networks", IEEE S&P 2017), with its binary search over the constant c.

CW minimises ||x' - x||_2^2 + c f(x') over x' = (tanh(w) + 1) / 2, a change of variables that keeps
x' in [0, 1] without clipping, with Adam on w. f is the margin loss max(z_y - max_{j != y} z_j,
-kappa) (targeted: max(max_{j != t} z_j - z_t, -kappa)): it reaches -kappa exactly when x' is
adversarial with confidence kappa, after which only the distance pulls. A binary search per example
looks for the smallest c that still succeeds: a large c finds an adversarial point but a far one, a
small c a near one or none. The smallest successful point over the whole search is returned.

What it does not share with the paper's code: the distance is to x itself (not to its tanh
reconstruction), and the early abort (no progress over a tenth of the steps) stops each example on
its own rather than the whole batch, so an example's result does not depend on its batch.
"""

from __future__ import annotations

import torch
from torch import nn

from .core import (check_inputs, check_non_negative, check_positive, clean_logits, frozen, gradient_fn,
                   register_attack)

_BETAS = (0.9, 0.999)  # Adam's defaults, as in the paper's code
_FAR = 1e10  # the binary search's "no upper bound yet"


def _margin(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """CW's f before the clamp: positive while x' is not adversarial, <= -kappa once it is with
    confidence kappa. Untargeted: z_y - max_{j != y} z_j; targeted: max_{j != t} z_j - z_t."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return others - z_y if targeted else z_y - others


def reached(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Per example: misclassified (untargeted), or classified as the target y (targeted)."""
    pred = logits.argmax(1)
    return pred == y if targeted else pred != y


def _search_step(grad_fn, x0: torch.Tensor, y: torch.Tensor, c: torch.Tensor, *, steps: int, lr: float,
                 kappa: float, targeted: bool, abort_early: bool, best: torch.Tensor, best_l2: torch.Tensor
                 ) -> torch.Tensor:
    """One run of Adam on w for each example's own c, from x0; updates `best` and `best_l2` (the
    smallest successful point and its squared L2 distance, per example) in place and returns which
    examples succeeded in this run (for the binary search)."""
    n = len(x0)
    succeeded = torch.zeros(n, dtype=torch.bool, device=x0.device)
    # start at x0: atanh of it, shrunk by 1e-6 so that pixels at 0 or 1 get a finite w
    w = torch.atanh((2 * x0 - 1) * (1 - 1e-6))
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    idx, xs, ys, cs = torch.arange(n, device=x0.device), x0, y, c.view(-1, 1, 1, 1)
    prev = torch.full((n,), float("inf"), device=x0.device)  # the loss at the last check
    check_every = max(steps // 10, 1)
    for step in range(steps):
        t = torch.tanh(w)
        adv = (t + 1) / 2
        grad_f, logits = grad_fn(adv, ys)
        diff = adv - xs
        l2 = diff.flatten(1).pow(2).sum(1)
        margin = _margin(logits, ys, targeted)
        hit = reached(logits, ys, targeted) & (margin <= -kappa)
        better = hit & (l2 < best_l2[idx])
        best[idx[better]], best_l2[idx[better]] = adv[better], l2[better]
        succeeded[idx[hit]] = True
        # d/dw of ||x' - x||^2 + c f(x'), with dx'/dw = (1 - tanh(w)^2) / 2; then one Adam step
        g = (2 * diff + cs * grad_f) * (1 - t * t) / 2
        m.mul_(_BETAS[0]).add_(g, alpha=1 - _BETAS[0])
        v.mul_(_BETAS[1]).addcmul_(g, g, value=1 - _BETAS[1])
        k = step + 1
        denom = (v / (1 - _BETAS[1] ** k)).sqrt_().add_(1e-8)
        w = w - (lr / (1 - _BETAS[0] ** k)) * m / denom
        if abort_early and step % check_every == 0:
            loss = l2 + cs.view(-1) * margin.clamp_min(-kappa)
            keep = prev.isinf() | (loss < prev - 1e-4 * prev.abs())  # the paper's abort unless loss < 0.9999 prev
            prev = loss
            if not keep.all():
                idx, xs, ys, cs, w, m, v, prev = (a[keep] for a in (idx, xs, ys, cs, w, m, v, prev))
                if not len(idx):
                    break
    return succeeded


@register_attack(minimum_norm="l2")
def cw(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, c: float = 1.0, kappa: float = 0.0, steps: int = 100,
       search_steps: int = 5, lr: float = 0.1, abort_early: bool = True, targeted: bool = False,
       fast: bool = True) -> torch.Tensor:
    """Carlini & Wagner's L2 attack (2017): Adam on a tanh-boxed image, binary search over c.

    Minimises ||x' - x||_2^2 + c max(margin, -kappa), `steps` Adam steps of `lr` per value of c,
    starting at c and searching `search_steps` values per example (x10 until one succeeds, then
    bisection). The paper runs 9 x 10,000 steps of lr 0.01; 5 x 100 takes one CPU core about 200 s
    for 500 images (improved-bn). So few steps need lr 0.1: Adam moves each w by about lr a
    step, and MNIST's pixels at 0 or 1 start at |w| = 7.3, where tanh is flat; with lr 0.01 they
    hardly move and 35% of a standard net's test images stay unbroken (measured on improved-bn, 200
    images; lr 0.1: none, median L2 1.08). torchattacks' CW is one search step of 50 at lr 0.01.
    Untargeted: y are true labels; targeted: y are target labels. Returns, per example, the
    smallest adversarial image found (with margin at least kappa), else x unchanged.
    """
    check_inputs(x, y)
    check_positive(c=c, lr=lr, steps=steps, search_steps=search_steps)
    check_non_negative(kappa=kappa)
    best = x.clone()
    best_l2 = torch.full((len(x),), float("inf"), device=x.device)
    with frozen(model):
        grad_fn = gradient_fn(model, x[:1], fast, loss=lambda z, t: _margin(z, t, targeted).clamp_min(-kappa))
        done = reached(clean_logits(model, x), y, targeted)  # already there: x itself, at distance 0
        todo = (~done).nonzero().flatten()
        if len(todo):
            x0, y0, b, b_l2 = x[todo], y[todo], best[todo], best_l2[todo]
            const = torch.full((len(todo),), float(c), device=x.device)
            lo, hi = torch.zeros_like(const), torch.full_like(const, _FAR)
            for _ in range(int(search_steps)):
                ok = _search_step(grad_fn, x0, y0, const, steps=int(steps), lr=lr, kappa=kappa, targeted=targeted,
                                  abort_early=abort_early, best=b, best_l2=b_l2)
                hi = torch.where(ok, torch.minimum(hi, const), hi)
                lo = torch.where(ok, lo, torch.maximum(lo, const))
                const = torch.where(hi < _FAR, (lo + hi) / 2, const * 10)
            # the fast path's logits agree with the model's to float rounding; the model has the last word
            kept = reached(clean_logits(model, b), y0, targeted)
            best[todo] = torch.where(kept.view(-1, 1, 1, 1), b, x0)
    return best.clamp(0, 1).detach()


__all__ = ["cw"]
