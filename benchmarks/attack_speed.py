"""Attack speed: advmnist's batched attacks against plain loops, side by side in one process.

1. The penalty attack of report 001 (eta 0.1, lam 0.05) on the first test image of each digit:
   all ten digits in one batch (advmnist.attacks.penalty) against the same update written plainly,
   one digit at a time, as the report ran it (loss.backward() with the weights' gradients too).
2. PGD-40 (Linf, eps 0.3, alpha 0.01, random start) on the test images against a bare loop of the
   same number of forward + backward passes on the same model and batch size.

    python benchmarks/attack_speed.py [--model-run RUN] [--steps 10000] [--pgd-images 10000]

Without --model-run it trains improved-bn for one epoch first (speed does not depend on accuracy).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from advmnist import runs
from advmnist.attacks import penalty, pgd
from advmnist.data import load_mnist
from advmnist.models import create_model
from advmnist.train import fit, resolve_recipe


def plain_penalty(model, x_target, target, eta, lam, steps, generator):
    """Report 001's loop for one image: backward through the whole net, then the update."""
    x = 0.5 + 0.3 * torch.randn(x_target.shape, generator=generator)
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x), target)
        model.zero_grad()
        loss.backward()
        x = (x - eta * (x.grad + lam * (x - x_target))).clamp(0, 1)
    return x.detach()


def bare_pgd_loop(model, x, y, steps, batch_size):
    """steps x (forward + input gradient) per batch and nothing else: no projection, no restarts."""
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].clone().requires_grad_(True)
        for _ in range(steps):
            loss = F.cross_entropy(model(xb), y[i:i + batch_size], reduction="sum")
            (g,) = torch.autograd.grad(loss, xb)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-run", default=None, help="run directory of a trained model")
    ap.add_argument("--steps", type=int, default=10000, help="penalty attack steps")
    ap.add_argument("--pgd-images", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args()
    data = load_mnist()
    if args.model_run:
        model, _ = runs.load_checkpoint(args.model_run)
    else:
        torch.manual_seed(0)
        model = create_model("improved-bn")
        fit(model, data, resolve_recipe("improved-bn", epochs=1), seed=0)
    model.eval()
    name = type(model).__name__
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {name}")

    idx = torch.stack([(data.test_y == d).nonzero()[0, 0] for d in range(10)])
    x_t, target = data.test_x[idx], (data.test_y[idx] + 1) % 10
    t_batched, adv = timed(penalty, model, x_t, target, eta=0.1, lam=0.05, steps=args.steps,
                           generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    plain = [plain_penalty(model, x_t[d:d + 1], target[d:d + 1], 0.1, 0.05, args.steps,
                           torch.Generator().manual_seed(d)) for d in range(10)]
    t_plain = time.perf_counter() - start
    reached = (model(adv).argmax(1) == target).sum().item()
    reached_plain = sum((model(p).argmax(1) == target[d]).item() for d, p in enumerate(plain))
    print(f"penalty, 10 digits x {args.steps} steps: batched {t_batched:.1f} s ({reached}/10 reached), "
          f"one digit at a time {t_plain:.1f} s ({reached_plain}/10); speed-up {t_plain / t_batched:.1f}x")

    x, y = data.test_x[:args.pgd_images], data.test_y[:args.pgd_images]
    bs = args.batch_size
    t_pgd, _ = timed(lambda: torch.cat([pgd(model, x[i:i + bs], y[i:i + bs], eps=0.3, alpha=0.01, steps=40,
                                            generator=torch.Generator().manual_seed(0))
                                        for i in range(0, len(x), bs)]))
    t_bare, _ = timed(bare_pgd_loop, model, x, y, 40, bs)
    print(f"PGD-40 on {len(x)} images, batch {bs}: advmnist {t_pgd:.1f} s, bare forward+backward loop "
          f"{t_bare:.1f} s; advmnist / bare = {t_pgd / t_bare:.2f}")


if __name__ == "__main__":
    main()
