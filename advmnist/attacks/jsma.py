"""Jacobian-based saliency map attack, JSMA (Papernot, McDaniel, Jha, Fredrikson, Celik & Swami, "The
Limitations of Deep Learning in Adversarial Settings", EuroS&P 2016), targeted, L0.

JSMA changes few pixels, each by a lot. Every step takes the gradients of the target's logit (a)
and of the sum of the other logits (b), and over all pairs (p, q) of pixels still in the search
domain picks the one that most raises the target while lowering the others: the largest
(a_p + a_q) |b_p + b_q| among pairs with a_p + a_q > 0 and b_p + b_q < 0 (the paper's pairwise
saliency map, increasing variant). Both pixels go up by theta (clipped to 1) and leave the domain.
An example stops when the model predicts its target, when no pair qualifies, or when it has
changed floor(gamma * D / 2) pairs, so never more than gamma * D pixels.

The pairs are scored with tensors, (chunk, D, D) at a time, for the whole batch at once; the two
gradients come from one gradient pass on the batch stacked twice.
"""

from __future__ import annotations

import torch
from torch import nn

from .core import AttackError, check_inputs, frozen, gradient_fn, logits_fn, register_attack

PAIR_ELEMENTS = 2 ** 24  # pairs scored at once: 16 examples of 784 x 784 (64 MB a float tensor)


def _target_or_others(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Rows with y >= 0: the logit of target y; rows with y = -1 - target: the sum of the other logits."""
    own = logits.gather(1, torch.where(y < 0, -1 - y, y).unsqueeze(1)).squeeze(1)
    return torch.where(y < 0, logits.sum(1) - own, own)


def best_pairs(a: torch.Tensor, b: torch.Tensor, domain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of a, b, domain (N, D): the pair p != q in the domain maximising (a_p + a_q) |b_p + b_q|
    with a_p + a_q > 0 and b_p + b_q < 0; returns (p, q, found)."""
    n, dim = a.shape
    a = torch.where(domain, a, -torch.inf)  # a pixel outside the domain makes every pair with it fail
    b = torch.where(domain, b, torch.inf)
    p = torch.zeros(n, dtype=torch.long, device=a.device)
    q, found = torch.zeros_like(p), torch.zeros(n, dtype=torch.bool, device=a.device)
    chunk = max(1, PAIR_ELEMENTS // (dim * dim))
    for s in range(0, n, chunk):
        ac, bc = a[s:s + chunk], b[s:s + chunk]
        alpha = ac.unsqueeze(2) + ac.unsqueeze(1)  # (chunk, D, D)
        beta = bc.unsqueeze(2) + bc.unsqueeze(1)
        score = torch.where((alpha > 0) & (beta < 0), alpha * beta.neg(), 0.0)
        score.diagonal(dim1=1, dim2=2).zero_()
        value, index = score.flatten(1).max(1)
        p[s:s + chunk], q[s:s + chunk], found[s:s + chunk] = index // dim, index % dim, value > 0
    return p, q, found


@register_attack(always_targeted=True, minimum_norm="l0")
def jsma(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, theta: float = 1.0, gamma: float = 0.1,
         fast: bool = True) -> torch.Tensor:
    """Jacobian saliency map attack (Papernot et al. 2016): raise the most salient pixel pair until the target wins.

    y are target labels. theta: how much each chosen pixel goes up (increasing variant only, so
    0 < theta <= 1). gamma: the largest fraction of pixels changed; 0.1 as in torchattacks and
    CleverHans (the paper used 14.5% on MNIST). Pixels within 0.01 of 1 are saturated and never
    chosen. Returns, per example, the first image the model assigns to the target, else x
    unchanged. Deterministic.
    """
    check_inputs(x, y)
    if not (0 < theta <= 1 and 0 < gamma <= 1):
        raise AttackError(f"need 0 < theta <= 1 and 0 < gamma <= 1, got theta {theta}, gamma {gamma}")
    flat = x.detach().flatten(1)
    n, dim = flat.shape
    out = flat.clone()
    with frozen(model):
        grad_fn = gradient_fn(model, x[:1], fast, loss=_target_or_others)
        forward = logits_fn(model, x[:1], fast)
        idx, cur, t = torch.arange(n, device=x.device), flat.clone(), y
        domain = cur < 0.99
        for _ in range(int(gamma * dim) // 2):
            if not len(idx):
                break
            m = len(idx)
            grad, logits = grad_fn(torch.cat([cur, cur]).view(2 * m, *x.shape[1:]), torch.cat([t, -1 - t]))
            reached = logits[:m].argmax(1) == t
            out[idx[reached]] = cur[reached]
            g = grad.flatten(1)
            p, q, found = best_pairs(g[:m], g[m:], domain)
            keep = ~reached & found  # no qualifying pair: the attack has failed on that example
            idx, cur, t, domain, p, q = idx[keep], cur[keep], t[keep], domain[keep], p[keep], q[keep]
            rows = torch.arange(len(idx), device=x.device)
            for pix in (p, q):
                cur[rows, pix] = (cur[rows, pix] + theta).clamp(max=1)
                domain[rows, pix] = False
        if len(idx):
            reached = forward(cur.view(len(idx), *x.shape[1:])).argmax(1) == t
            out[idx[reached]] = cur[reached]
    return out.view_as(x).detach()


__all__ = ["jsma", "best_pairs"]
