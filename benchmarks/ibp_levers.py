"""What moves an IBP-trained net's clean accuracy, measured cheaply on one core.

`finetune`: continue a finished IBP run for a few epochs at another training eps and final kappa
(full eps from the first step, a fresh one-cycle learning rate), optionally on images shifted by up
to S pixels, then print its clean and IBP-certified accuracy on all 10,000 test images. From one
set of weights this maps the local trade between clean and certified accuracy in about 2.5 minutes
a point, where a training from scratch takes an hour.

    python benchmarks/ibp_levers.py finetune RUN --eps 0.3 --kappa 0.75 [--lr 2e-4] [--epochs 3] [--shift 0] [--precision bf16]
    python benchmarks/ibp_levers.py measure RUN      # the same two numbers for the weights as trained

It prints one JSON line. Screening numbers, not a page's.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

import advmnist.train as train_mod
from advmnist.data import load_mnist
from advmnist.evaluation import certify_examples
from advmnist.foreign import load_run_model
from advmnist.measures import evaluate
from advmnist.models import Recipe
from advmnist.names import PRECISIONS
from advmnist.train import Adversarial, fit


def shifted(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random whole-pixel shift of up to k in each direction, zeros filled in."""
    n, _, h, w = x.shape
    pad = F.pad(x, (k, k, k, k))
    rows = torch.arange(h)[None] + torch.randint(0, 2 * k + 1, (n,), generator=generator)[:, None]
    pad = pad.gather(2, rows[:, None, :, None].expand(n, 1, h, w + 2 * k))
    cols = torch.arange(w)[None] + torch.randint(0, 2 * k + 1, (n,), generator=generator)[:, None]
    return pad.gather(3, cols[:, None, None, :].expand(n, 1, h, w))


def with_shifts(k: int) -> None:
    """Make IBP training see shifted batches (the loss is where a batch enters the bounds)."""
    make = train_mod.adversarial_loss
    generator = torch.Generator().manual_seed(5)

    def patched(adv, gen):
        loss_fn = make(adv, gen)
        return lambda model, xb, yb, eps: loss_fn(model, shifted(xb, k, generator), yb, eps)

    train_mod.adversarial_loss = patched


def measure(model: nn.Module, data) -> dict:
    clean = evaluate(model, data.test_x, data.test_y)["accuracy"]
    proved = certify_examples(model, data.test_x, data.test_y, 0.3, method="ibp")[0]["certified_accuracy"]
    return {"clean": round(clean, 2), "ibp_certified_0.3": round(proved, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="job", required=True)
    ft = sub.add_parser("finetune")
    ft.add_argument("run")
    ft.add_argument("--eps", type=float, required=True)
    ft.add_argument("--kappa", type=float, required=True)
    ft.add_argument("--lr", type=float, default=2e-4)
    ft.add_argument("--epochs", type=int, default=3)
    ft.add_argument("--shift", type=int, default=0)
    ft.add_argument("--precision", choices=PRECISIONS, default="fp32")
    sub.add_parser("measure").add_argument("run")
    args = parser.parse_args()
    data, start = load_mnist(), time.time()
    if args.job == "measure":
        print(json.dumps({**vars(args), **measure(load_run_model(args.run)[0], data)}))
        return
    if args.shift:
        with_shifts(args.shift)
    model, _ = load_run_model(args.run)
    recipe = Recipe(optimizer="adam", lr=args.lr, batch_size=100, epochs=args.epochs, schedule="onecycle",
                    precision=args.precision)
    adv = Adversarial("ibp", eps=args.eps, kappa=args.kappa, ramp_epochs=0, warmup_epochs=0, keep_last=True,
                      monitor_eps=0.3)
    history = fit(model, data, recipe, adversarial=adv)
    print(json.dumps({**vars(args), **measure(model, data), "seconds_per_epoch":
                      round(sum(h["seconds"] for h in history) / len(history), 1),
                      "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
