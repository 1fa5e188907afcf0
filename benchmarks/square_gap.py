"""Why a score-based attack beats the gradient attacks on a run: the images only Square breaks (after
APGD-CE and APGD-T, as in the standard ensemble), where its perturbation sits, whether the input
gradient there is zero, and how many of them more restarts of the gradient attacks recover.

    python benchmarks/square_gap.py RUN_DIR [--eps 0.3] [--n 1000]

Zero input gradients would point to saturation (gradients that carry no signal); gradient attacks
that recover the images with more restarts point to a loss surface with many local maxima that one
start misses.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--n", type=int, default=1000, help="the first N test images")
    args = ap.parse_args()

    from advmnist.attacks import get_attack
    import cases  # this folder's cases.py

    model, _, x, y = cases.load(args.run, args.n)
    start = time.perf_counter()

    def attack(name: str, xs, ys, seed: int = 0, **kw):
        return get_attack(name).fn(model, xs, ys, eps=args.eps, generator=torch.Generator().manual_seed(seed), **kw)

    def fooled(adv, ys) -> torch.Tensor:
        with torch.no_grad():
            return model(adv).argmax(1) != ys

    with torch.no_grad():
        idx = (model(x).argmax(1) == y).nonzero().flatten()
    for name in ("apgd", "apgd-t"):
        idx = idx[~fooled(attack(name, x[idx], y[idx]), y[idx])]
    sq = attack("square", x[idx], y[idx])
    broke = fooled(sq, y[idx])
    only = idx[broke]
    xs, ys, delta = x[only], y[only], sq[broke] - x[only]
    print(f"{args.run}, eps {args.eps:g}, first {args.n} test images")
    print(f"standing after APGD-CE and APGD-T: {len(idx)}; Square breaks {len(only)} of them "
          f"({100 * len(only) / args.n:.2f} pp): test images {only.tolist()}")
    if not len(only):
        return
    at_eps = delta.abs() > 0.95 * args.eps
    print(f"Square's perturbation: {100 * at_eps.float().mean():.1f}% of pixels moved by about eps, "
          f"{100 * (at_eps & (xs < 0.1)).sum() / at_eps.sum().clamp(min=1):.1f}% of those on the background "
          f"(pixel < 0.1)")
    xg = xs.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(xg), ys, reduction="sum"), xg)
    print(f"input gradient at the clean images: {100 * (grad == 0).float().mean():.2f}% of pixels exactly 0, "
          f"{int((grad.flatten(1).abs().sum(1) == 0).sum())} images with an all-zero gradient")
    for label, name, kw in (("APGD-CE, 10 restarts", "apgd", {"restarts": 10}),
                            ("APGD-DLR, 5 restarts", "apgd", {"loss": "dlr", "restarts": 5}),
                            ("APGD-T, 3 restarts", "apgd-t", {"restarts": 3})):
        n = int(fooled(attack(name, xs, ys, seed=5, **kw), ys).sum())
        print(f"{label} (seed 5) breaks {n} of these {len(only)}")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
