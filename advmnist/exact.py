"""Exact robustness of small ReLU nets by mixed-integer linear programming (Tjeng et al., ICLR 2019).

For one example, the smallest margin logit_y - logit_j over the Linf ball (clipped to [0, 1]) is a
MILP: each unstable ReLU a = max(0, z) with pre-activation bounds l < 0 < u becomes
a >= 0, a >= z, a <= z - l (1 - d), a <= u d with a binary d; stable ReLUs are linear. The bounds
l, u come from `bounds.preactivation_bounds` (CROWN where it runs, else IBP): the tighter they
are, the fewer binaries and the faster HiGHS (scipy.optimize.milp) proves the answer.

The verdict per example is "robust" (every margin's minimum is positive), "not robust" (a point
in the ball is misclassified: the solver's point is checked on the model itself), or "unknown"
(the time limit ran out first). Affine layers between ReLUs are composed into dense matrices, so
this is for small nets: the `mlp`, small CNNs, test-sized models. Max pooling is not handled, and
the net must be a chain of layers (an nn.Sequential or a forward without branches).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .bounds import BoundError, Layer, input_box, preactivation_bounds

MAX_DENSE = 4_000_000  # entries of one composed affine matrix above which the net is "not small"


@dataclass(frozen=True)
class Verdict:
    status: str  # "robust", "not robust" or "unknown"
    min_margin: float | None  # a lower bound on the smallest margin: exact for the classes a program was solved
    #                           for, the certified bound for the classes the bounds already settled
    seconds: float


def _segments(layers: list[Layer]) -> list[tuple[int, int]]:
    """(start, stop) index ranges of the affine stretches between ReLUs (the last ends at the logits)."""
    cuts, start = [], 0
    for i, layer in enumerate(layers):
        if layer.inputs not in ((), (i - 1,)):
            raise BoundError(f"exact verification needs an nn.Sequential (a chain of layers): '{layer.name}' "
                             f"does not just read the layer before it")
        if isinstance(layer.module, nn.MaxPool2d):
            raise BoundError(f"exact verification does not handle max pooling (layer '{layer.name}')")
        if isinstance(layer.module, nn.ReLU):
            cuts.append((start, i))
            start = i + 1
    cuts.append((start, len(layers)))
    return cuts


def _dense(layers: list[Layer], start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """The composed affine map of layers[start:stop] as (W, b) on flattened tensors."""
    in_shape = layers[start].in_shape if start < len(layers) else layers[-1].out_shape
    n_in = math.prod(in_shape)
    n_out = math.prod(layers[stop - 1].out_shape) if stop > start else n_in
    if n_in * n_out > MAX_DENSE:
        raise BoundError(f"exact verification is for small nets: layers {layers[start].name}..{layers[stop - 1].name} "
                         f"form a {n_out}x{n_in} matrix")

    segment = copy.deepcopy(nn.Sequential(*[layer.module for layer in layers[start:stop]])).double()
    with torch.no_grad():  # composed in float64 on a copy: the caller's model keeps its dtype
        basis = torch.eye(n_in, dtype=torch.float64).view(n_in, *in_shape)
        b = segment(torch.zeros(1, *in_shape, dtype=torch.float64)).flatten(1)[0]
        w = (segment(basis).flatten(1) - b).T
    return w.numpy(), b.numpy()


def verify(model: nn.Module, x: torch.Tensor, y: int, eps: float, *, time_limit: float = 30.0,
           bounds: str = "crown") -> Verdict:
    """The exact verdict for one example x (1, ...) with label y at Linf radius eps."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix, csr_matrix, hstack, vstack

    start = time.perf_counter()
    try:
        layers, pre = preactivation_bounds(model, x, eps, intermediate=bounds)
    except BoundError:
        if bounds == "ibp":
            raise
        layers, pre = preactivation_bounds(model, x, eps, intermediate="ibp")
    segments = _segments(layers)
    from .bounds import TOLERANCE, crown_margins, ibp_margins

    with torch.no_grad():
        try:
            known = crown_margins(model, x, torch.tensor([y]), eps, intermediate=bounds)[0]
        except BoundError:
            known = ibp_margins(model, x, torch.tensor([y]), eps)[0]
    lo0, hi0 = (t.flatten().double().numpy() for t in input_box(x, eps))
    # variables: the input, then for each ReLU layer its outputs a, then the binaries of unstable neurons
    var_lo, var_hi, integrality = [lo0], [hi0], [np.zeros_like(lo0)]
    rows, lbs, ubs = [], [], []
    offsets, n_vars = [0], len(lo0)
    relu_ids = sorted(pre)
    for k, (s, e) in enumerate(segments[:-1]):
        w, b = _dense(layers, s, e)
        l, u = (t.flatten().double().numpy() for t in pre[relu_ids[k]])
        slack = 1e-5 * (1.0 + np.maximum(np.abs(l), np.abs(u)))  # float32 bounds, float64 program
        l, u = l - slack, u + slack
        n = len(b)
        prev_off, prev_n = offsets[-1], w.shape[1]
        a_off = n_vars
        unstable = np.flatnonzero((l < 0) & (u > 0))
        d_off = a_off + n
        n_vars = d_off + len(unstable)
        var_lo += [np.zeros(n), np.zeros(len(unstable))]
        var_hi += [np.maximum(u, 0.0), np.ones(len(unstable))]
        integrality += [np.zeros(n), np.ones(len(unstable))]

        def block(coef_prev, a_coef, d_cols=None, d_coef=None, which=None):
            """Rows over all variables: -coef_prev . prev + a_coef * a + d_coef * d (for neurons `which`)."""
            m = len(which)
            parts = coo_matrix((m, prev_off)), csr_matrix(coef_prev), coo_matrix((m, a_off - prev_off - prev_n))
            a_part = coo_matrix((a_coef, (np.arange(m), which)), shape=(m, n))
            d_part = coo_matrix((m, len(unstable))) if d_cols is None else \
                coo_matrix((d_coef, (np.arange(m), d_cols)), shape=(m, len(unstable)))
            return hstack([*parts, a_part, d_part, coo_matrix((m, 0))])

        active = np.flatnonzero(l >= 0)
        inactive = np.flatnonzero(u <= 0)
        if len(active):  # a = z
            rows.append(block(-w[active], np.ones(len(active)), which=active))
            lbs.append(b[active]), ubs.append(b[active])
        if len(inactive):  # a = 0
            var_hi[-2][inactive] = 0.0
        if len(unstable):
            idx = np.arange(len(unstable))
            wu, bu, lu, uu = w[unstable], b[unstable], l[unstable], u[unstable]
            rows.append(block(-wu, np.ones(len(unstable)), which=unstable))  # a - z >= 0
            lbs.append(bu), ubs.append(np.full(len(unstable), np.inf))
            rows.append(block(-wu, np.ones(len(unstable)), idx, -lu, which=unstable))  # a - z - l d <= -l
            lbs.append(np.full(len(unstable), -np.inf)), ubs.append(bu - lu)
            rows.append(block(np.zeros_like(wu), np.ones(len(unstable)), idx, -uu, which=unstable))  # a - u d <= 0
            lbs.append(np.full(len(unstable), -np.inf)), ubs.append(np.zeros(len(unstable)))
        offsets.append(a_off)
    w_last, b_last = _dense(layers, *segments[-1])
    last_off, last_n = offsets[-1], w_last.shape[1]
    constraints = []
    if rows:
        width = n_vars
        matrix = vstack([r.tocsr()[:, :width] if r.shape[1] >= width else
                         hstack([r, coo_matrix((r.shape[0], width - r.shape[1]))]).tocsr() for r in rows])
        constraints.append(LinearConstraint(matrix, np.concatenate(lbs), np.concatenate(ubs)))
    bounds_ = Bounds(np.concatenate(var_lo), np.concatenate(var_hi))
    integ = np.concatenate(integrality)
    worst, status = math.inf, "robust"
    others = [j for j in range(len(b_last)) if j != y]
    for k, j in enumerate(others):
        if known[k] > TOLERANCE:  # the bound already proves this margin positive: no program needed
            worst = min(worst, float(known[k]))
            continue
        c = np.zeros(n_vars)
        c[last_off:last_off + last_n] = w_last[y] - w_last[j]
        const = b_last[y] - b_last[j]
        left = time_limit - (time.perf_counter() - start)
        if left <= 0:
            return Verdict("unknown", None, time.perf_counter() - start)
        res = milp(c, constraints=constraints, integrality=integ, bounds=bounds_,
                   options={"time_limit": left, "presolve": True})
        if res.x is not None and res.fun + const <= 0:
            point = torch.tensor(res.x[:len(lo0)], dtype=x.dtype).view_as(x)
            with torch.no_grad():
                if model(point).argmax(1).item() != y:
                    return Verdict("not robust", float(res.fun + const), time.perf_counter() - start)
        if res.status != 0:  # time limit or numerical trouble: no proof
            return Verdict("unknown", None, time.perf_counter() - start)
        worst = min(worst, float(res.fun + const))
        if worst <= 0:
            status = "unknown"  # optimum at or below 0 but the model disagrees by rounding: no verdict
            break
    return Verdict(status, worst, time.perf_counter() - start)
