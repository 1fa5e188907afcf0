"""Branch and bound over ReLU splits, for the margins alpha-CROWN alone leaves unproven.

An unstable ReLU (pre-activation bounds l < 0 < u) is what makes a linear bound loose. Split the
ball into the part where that neuron's input is >= 0 (there the ReLU is the identity) and the part
where it is <= 0 (there it is zero): each part is bounded with one relaxed ReLU fewer, and a margin
is proven when every part's bound is positive. Each part is bounded with its split ReLUs exact and
each split's constraint carried into the bound by a multiplier (`bounds.slope_bound`: alpha-CROWN's
optimised slopes with beta-CROWN's split multipliers, Wang et al. 2021). The neuron split is the one whose
relaxation costs the bound most (the intercept score of BaBSR, Bunel et al. 2020). Pre-activation
bounds are full CROWN's, computed once per image and not tightened inside a part.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .bounds import TOLERANCE, BoundError, margin_rows, slope_bound


def branch_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, domains: int = 512,
                   batch: int = 128, steps: int = 10, time_limit: float = 120.0,
                   memory: int = 2 ** 27, report: dict | None = None) -> torch.Tensor:
    """Which examples (N,) have every margin logit_y - logit_j proven positive over the eps-ball.

    Each margin alpha-CROWN does not prove is split, breadth first, until every part is proven
    (True), a part has no unstable ReLU left to split, the margin has used `domains` parts, or
    `time_limit` seconds have passed for the whole call (False: unknown, never "not robust").
    `report`, when given, receives the parts bounded and whether the time limit cut the search (the
    one thing that makes the answer depend on the machine's speed)."""
    if domains < 1 or batch < 1 or steps < 0:
        raise BoundError(f"branching needs domains >= 1, batch >= 1 and steps >= 0, got {domains}, {batch}, {steps}")
    start = time.perf_counter()
    layers, rows_all, pre, (box_lo, box_hi) = margin_rows(model, x, y, eps, memory)
    n, k = len(x), len(rows_all) // len(x)
    relu_ids = sorted(pre)
    # the queue: one row per part, its margin (image * k + j) and its pre-activation bounds
    owner = torch.arange(n * k, device=x.device)
    lows = {i: lo for i, (lo, _) in pre.items()}
    highs = {i: hi for i, (_, hi) in pre.items()}
    signs = {i: torch.zeros(lo.shape, dtype=torch.int8, device=x.device) for i, lo in lows.items()}
    open_margin = torch.ones(n * k, dtype=torch.bool, device=x.device)  # not yet proven
    failed = torch.zeros(n * k, dtype=torch.bool, device=x.device)
    used = torch.zeros(n * k, dtype=torch.long, device=x.device)
    while len(owner) and time.perf_counter() - start < time_limit:
        take = slice(0, batch)
        who = owner[take]
        part_pre = {i: (lows[i][take], highs[i][take]) for i in relu_ids}
        bound, cost = slope_bound(layers, part_pre, rows_all[who], (box_lo[who], box_hi[who]), steps=steps,
                                  scores=True, splits={i: signs[i][take] for i in relu_ids})
        part_signs = {i: signs[i][take] for i in relu_ids}
        used.index_add_(0, who, torch.ones_like(who))
        unproven = bound <= TOLERANCE
        flat = torch.cat([cost[i].flatten(1) for i in relu_ids], 1) if cost else bound.new_zeros(len(who), 0)
        best_cost, where = flat.max(1) if flat.shape[1] else (bound.new_zeros(len(who)), None)
        stuck = unproven & ((best_cost <= 0) | (used[who] >= domains))
        failed[who[stuck]] = True
        split = unproven & ~stuck & ~failed[who]
        rest = slice(batch, None)
        owner, lows, highs, signs = owner[rest], *({i: t[i][rest] for i in relu_ids} for t in (lows, highs, signs))
        if failed.any():  # drop every part of a margin that cannot be proven
            keep = ~failed[owner]
            owner, lows, highs, signs = owner[keep], *({i: t[i][keep] for i in relu_ids} for t in (lows, highs, signs))
        if split.any():
            s = split.nonzero().flatten()
            child_owner = who[s].repeat(2)
            neuron = where[s]
            offset = 0
            for i in relu_ids:
                width = cost[i][0].numel()
                lo, hi = part_pre[i][0][s].flatten(1).clone(), part_pre[i][1][s].flatten(1).clone()
                here = (neuron >= offset) & (neuron < offset + width)
                rows_here, cols = here.nonzero().flatten(), (neuron - offset)[here]
                active_lo, inactive_hi = lo.clone(), hi.clone()
                active_lo[rows_here, cols] = 0.0  # this part: the input is >= 0, the ReLU is the identity
                inactive_hi[rows_here, cols] = 0.0  # this part: the input is <= 0, the ReLU is zero
                up, down = part_signs[i][s].flatten(1).clone(), part_signs[i][s].flatten(1).clone()
                up[rows_here, cols], down[rows_here, cols] = 1, -1
                shape = part_pre[i][0].shape[1:]
                lows[i] = torch.cat([lows[i], torch.cat([active_lo, lo]).view(-1, *shape)])
                highs[i] = torch.cat([highs[i], torch.cat([hi, inactive_hi]).view(-1, *shape)])
                signs[i] = torch.cat([signs[i], torch.cat([up, down]).view(-1, *shape)])
                offset += width
            owner = torch.cat([owner, child_owner])
        done = torch.ones(n * k, dtype=torch.bool, device=x.device)
        done[owner] = False
        open_margin &= ~(done & ~failed)
    open_margin |= failed
    open_margin[owner] = True  # time ran out with parts left
    if report is not None:
        report.update(parts=int(used.sum()), timed_out=bool(len(owner)))
    return ~open_margin.view(n, k).any(1)
