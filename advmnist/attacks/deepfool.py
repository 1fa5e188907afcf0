"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, "DeepFool: a simple and accurate method to fool
deep neural networks", CVPR 2016), L2 and Linf.

Each step linearises the logit gaps z_k - z_y of the candidate classes k at the current point and
steps onto the nearest of the linearised boundaries: for class k at distance |f_k| / ||w_k||_q
(q = 2 for L2, q = 1 for Linf, the dual norm), with f_k = z_k - z_y and w_k its input gradient. The
step is (d + 1e-4) w / ||w||_2 (L2) or (d + 1e-4) sign(w) (Linf), scaled by 1 + overshoot so that
the point lands past the boundary, not on it. An example stops at the first adversarial point.

Batched: one gradient call per candidate class, each for the whole batch. Unlike the paper, which
clips nothing, each step is clipped to [0, 1] (as torchattacks does), so later steps see the point
that is actually there.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .core import (AttackError, check_inputs, check_norm, check_non_negative, check_positive, clean_logits, frozen,
                   gradient_fn, logits_fn, register_attack)


def _gap(logits: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """z_k - z_y for pair = (y, k) per row: negative while y still beats k."""
    return logits.gather(1, pair[:, 1:]).squeeze(1) - logits.gather(1, pair[:, :1]).squeeze(1)


@register_attack(minimum_norm="l2")
def deepfool(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: Literal["l2", "linf"] = "l2",
             steps: int = 50, overshoot: float = 0.02, candidates: int = 10, fast: bool = True) -> torch.Tensor:
    """DeepFool (Moosavi-Dezfooli et al. 2016): steps onto the nearest linearised class boundary.

    The candidate classes are the `candidates` the clean logits rank highest (the true one among
    them); 10 on MNIST is every class. `overshoot` pushes each step 2% past the boundary, as in the
    paper. y are the true labels. Returns, per example, the first adversarial image found within
    `steps` (DeepFool's answer: it never shrinks one), else x unchanged; images in [0, 1].
    """
    check_inputs(x, y)
    check_norm(norm)
    check_positive(steps=steps)
    check_non_negative(overshoot=overshoot)
    with frozen(model):
        logits = clean_logits(model, x)
        if not 2 <= candidates <= logits.shape[1]:
            raise AttackError(f"candidates must be in [2, {logits.shape[1]}], got {candidates}")
        out = x.clone()
        # the candidates besides y: the classes the clean logits rank highest after it
        others = logits.scatter(1, y[:, None], float("-inf")).topk(candidates - 1, dim=1).indices
        idx = (logits.argmax(1) == y).nonzero().flatten()  # misclassified ones: x itself, at distance 0
        grad_fn, forward = gradient_fn(model, x[:1], fast, loss=_gap), logits_fn(model, x[:1], fast)
        xa, ys, ks = x[idx], y[idx], others[idx]
        for _ in range(int(steps)):
            if not len(idx):
                break
            dist, step = None, None
            for j in range(candidates - 1):  # one gradient call per candidate, for the whole batch
                w, z = grad_fn(xa, torch.stack([ys, ks[:, j]], 1))
                f = _gap(z, torch.stack([ys, ks[:, j]], 1)).abs()
                flat = w.flatten(1)
                size = (flat.norm(dim=1) if norm == "l2" else flat.abs().sum(1)).clamp_min(1e-12)
                d = f / size
                r = (d + 1e-4).view(-1, 1, 1, 1) * (w / size.view(-1, 1, 1, 1) if norm == "l2" else w.sign())
                if dist is None:
                    dist, step = d, r
                else:
                    nearer = d < dist
                    dist = torch.where(nearer, d, dist)
                    step = torch.where(nearer.view(-1, 1, 1, 1), r, step)
            xa = (xa + (1 + overshoot) * step).clamp(0, 1)
            fooled = forward(xa).argmax(1) != ys
            out[idx[fooled]] = xa[fooled]
            keep = ~fooled
            idx, xa, ys, ks = idx[keep], xa[keep], ys[keep], ks[keep]
        # the fast path's logits agree with the model's to float rounding; the model has the last word
        missed = clean_logits(model, out).argmax(1) == y
        out[missed] = x[missed]
    return out.detach()


__all__ = ["deepfool"]
