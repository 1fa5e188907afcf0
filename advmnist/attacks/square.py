"""The Square attack (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
black-box adversarial attack via random search", ECCV 2020), Linf and L2.

Score-based: it reads the model's logits and nothing else, so a model that hides or flattens its
input gradients cannot hide from it. When Square breaks an example every gradient attack left
standing, the gradient attacks were fooled: the classic sign of gradient masking.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .core import (AttackError, check_inputs, check_non_negative, check_norm, frozen, l2_norm, logits_fn, rand_like,
                   register_attack)
from .losses import margin
from .windowed import WindowedLogits

WINDOWED_SHARE = 16  # windows of at most 1/16 of the image are evaluated from cached activations
CHECK_EVERY = 50  # off the CPU: queries between looks at which examples are broken (each look waits for the device)


def _p_schedule(it: int, queries: int, p_init: float) -> float:
    """Fraction of pixels a square covers: halved at fixed points of a 10,000-query budget, rescaled."""
    it = int(it / queries * 10000)
    for bound, div in ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32), (500, 16), (200, 8),
                       (50, 4), (10, 2)):
        if it > bound:
            return p_init / div
    return p_init


def _per_query(device: torch.device) -> bool:
    """Whether to use the windows and drop broken examples after every query (on a CPU)."""
    return device.type == "cpu"


def _signs(shape, generator, like: torch.Tensor) -> torch.Tensor:
    return torch.where(rand_like(torch.empty(shape, dtype=like.dtype, device=like.device), generator) < 0.5, -1.0, 1.0)


def _randint(high: int, generator) -> int:
    return int(torch.randint(high, (1,), generator=generator).item())


def _eta(s: int, generator) -> torch.Tensor:
    """L2 square pattern: two stacked rectangles of opposite sign, mass falling off from their centres."""
    def rect(a: int, b: int) -> torch.Tensor:
        d = torch.zeros(a, b)
        ca, cb = a // 2, b // 2
        for r in range(max(ca + 1, cb + 1)):
            d[max(ca - r, 0):min(ca + r + 1, a), max(cb - r, 0):min(cb + r + 1, b)] += 1.0 / (r + 1) ** 2
        return d / d.norm()

    top = s // 2
    d = torch.cat([rect(top, s) if top else torch.zeros(0, s), -rect(s - top, s)])
    d = d / d.norm()
    return d.t() if torch.rand(1, generator=generator).item() > 0.5 else d


@register_attack()
def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.3, queries: int = 5000,
           norm: Literal["linf", "l2"] = "linf", p_init: float = 0.8, generator: torch.Generator | None = None,
           fast: bool = True) -> torch.Tensor:
    """Square attack (Andriushchenko et al. 2020): random search over square patches, gradient-free.

    Starts from vertical stripes of +-eps (Linf) or a grid of L2 squares; each query changes one
    random square window (side sqrt(p * pixels), p halved on a fixed schedule) and keeps the change
    where the margin z_y - max_{i != y} z_i drops. An example stops once misclassified. y are the
    true labels; `queries` counts the iterations after the first evaluation. Only forward passes:
    the model's outputs are all it reads. With `fast`, once the windows are small (at most 1/16 of
    the image, most of the budget) each query recomputes only the activations its window reaches
    (`windowed.py`); an example is declared broken only after a whole forward pass agrees.

    On a CPU, multiplies are what a query costs, so the windows are used and broken examples leave
    the batch at once. On a GPU a query is a few kernel launches over the whole batch, and waiting for
    the device is what costs: whole forward passes, and a look at which examples are broken every
    `CHECK_EVERY` queries; an example broken in between keeps the point that broke it.
    """
    check_inputs(x, y)
    check_non_negative(eps=eps, queries=queries)
    check_norm(norm)
    if not 0 < p_init <= 1:
        raise AttackError(f"p_init must be in (0, 1], got {p_init}")
    if len(x) == 0 or eps == 0:
        return x.clone()
    n, c, h, w = x.shape
    with frozen(model):
        f = logits_fn(model, x[:1], fast)
        if norm == "linf":
            best = (x + eps * _signs((n, c, 1, w), generator, x)).clamp(0, 1)
        else:
            best = _l2_init(x, eps, generator)
        m = margin(f(best), y)
        out = best.clone()
        idx = (m > 0).nonzero().flatten()
        xs, ys, xb, mb = x[idx], y[idx], best[idx], m[idx]
        if norm == "linf":
            lo, hi = (xs - eps).clamp(min=0), (xs + eps).clamp(max=1)
        windowed = None
        on_cpu = _per_query(x.device)
        for it in range(int(queries)):
            if not len(idx):
                break
            p = _p_schedule(it, int(queries), p_init)
            if norm == "linf":
                s = min(max(int(round(math.sqrt(p * h * w))), 1), h - 1)
                vh, vw = _randint(h - s + 1, generator), _randint(w - s + 1, generator)
                win = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
                # every pixel of xb sits at lo or hi, so a move of 2 eps along a sign lands on one of them
                patch = torch.where(_signs((len(xs), c, 1, 1), generator, x) > 0, hi[win], lo[win])
                if windowed is None and fast and on_cpu and s * s * WINDOWED_SHARE <= h * w:
                    windowed = WindowedLogits.build(model, x[:1]) or False
                    if windowed:
                        windowed.start(xb)
                        xb = windowed.images  # accepting a proposal updates the current images too
                if windowed:
                    logits, proposal = windowed.propose(patch, vh, vw)
                else:
                    cand = xb.clone()
                    cand[win] = patch
                    logits = f(cand)
                mc = margin(logits, ys)
                better = (mc < mb) & (mb > 0)
                if windowed:
                    windowed.accept(proposal, better)
                else:
                    xb[win] = torch.where(better.view(-1, 1, 1, 1), patch, xb[win])
            else:
                cand = _l2_step(xs, xb, eps, p, generator)
                mc = margin(f(cand), ys)
                better = (mc < mb) & (mb > 0)
                xb = torch.where(better.view(-1, 1, 1, 1), cand, xb)
            mb = torch.where(better, mc, mb)
            if not on_cpu and (it + 1) % CHECK_EVERY and it + 1 < int(queries):
                continue
            broken = mb <= 0
            if broken.any() and windowed:  # the windowed logits carry rounding: confirm with a whole pass
                exact = margin(f(xb[broken]), ys[broken])
                mb[broken] = exact
                broken = mb <= 0
            if broken.any():
                out[idx[broken]] = xb[broken]
                keep = ~broken
                idx, xs, ys, mb = idx[keep], xs[keep], ys[keep], mb[keep]
                if norm == "linf":
                    lo, hi = lo[keep], hi[keep]
                if windowed:
                    windowed.keep(keep)
                    xb = windowed.images
                else:
                    xb = xb[keep]
        out[idx] = xb
    return out.detach()


def _l2_init(x: torch.Tensor, eps: float, generator) -> torch.Tensor:
    n, c, h, w = x.shape
    s = h // 5
    start = (h - 5 * s) // 2
    delta = torch.zeros_like(x)
    for i in range(h // s):
        for j in range(w // s):
            r, q = start + i * s, start + j * s
            if r + s > h or q + s > w:
                continue
            delta[:, :, r:r + s, q:q + s] += _eta(s, generator).to(x) * _signs((n, c, 1, 1), generator, x)
    return (x + eps * delta / (l2_norm(delta) + 1e-12)).clamp(0, 1)


def _l2_step(xs: torch.Tensor, xb: torch.Tensor, eps: float, p: float, generator) -> torch.Tensor:
    """Move the perturbation's mass from one random square into another (the paper's L2 update)."""
    n, c, h, w = xs.shape
    delta = xb - xs
    s = min(max(int(round(math.sqrt(p * h * w))), 3), h - 1)
    s += s % 2 == 0
    s = min(s, h - 1)
    vh, vw = _randint(h - s + 1, generator), _randint(w - s + 1, generator)
    vh2, vw2 = _randint(h - s + 1, generator), _randint(w - s + 1, generator)
    win1 = delta[:, :, vh:vh + s, vw:vw + s]
    norm_win1 = win1.pow(2).sum((-2, -1), keepdim=True).sqrt()
    mask = torch.zeros_like(xs)
    mask[:, :, vh:vh + s, vw:vw + s] = 1
    mask[:, :, vh2:vh2 + s, vw2:vw2 + s] = 1
    norm_image = l2_norm(delta)
    norm_windows = l2_norm(delta * mask)
    new = _eta(s, generator).to(xs).view(1, 1, s, s) * _signs((n, c, 1, 1), generator, xs)
    new = new + win1 / (norm_win1 + 1e-12)
    budget = (torch.clamp(eps ** 2 - norm_image ** 2, min=0) / c + norm_windows ** 2).sqrt()
    new = new / (new.pow(2).sum((-2, -1), keepdim=True).sqrt() + 1e-12) * budget
    delta = delta.clone()
    delta[:, :, vh2:vh2 + s, vw2:vw2 + s] = 0
    delta[:, :, vh:vh + s, vw:vw + s] = new
    return (xs + eps * delta / (l2_norm(delta) + 1e-12)).clamp(0, 1)
