"""How close do the bounds and the attacks get to the truth? certified <= exact <= attacked, small nets.

    python benchmarks/exact.py [--n 100] [--eps 0.02] [--time-limit 60]

Trains two small nets on the full training set (seed 0): the zoo's `mlp` (report 000: 784-512-512-512-10,
its recipe cut to 5 epochs) and a small CNN without pooling (conv 4x4/2 8, conv 4x4/2 16, fc 100: Wong
et al.'s small net at half width), then on the first N test images at Linf eps:
  certified  full CROWN (`advmnist.bounds.certified_margins(..., method="crown")`);
  exact      the MILP of `advmnist.exact.verify` (HiGHS, a time limit per image; "unknown" when it
             runs out), only on the images the bounds leave open;
  attacked   robust accuracy under `evaluate --robust`'s standard ensemble (APGD-CE, APGD-T, Square).
Writes the table into benchmarks/results.md between this script's markers. An image certified but
attacked, or exact-robust but attacked, is a bug and stops the script.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

BEGIN, END = "<!-- exact.py: begin -->", "<!-- exact.py: end -->"


def small_cnn() -> nn.Module:
    from advmnist.models import Normalize

    return nn.Sequential(OrderedDict([
        ("norm", Normalize(0.1307, 0.3081)), ("conv1", nn.Conv2d(1, 8, 4, stride=2, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 16, 4, stride=2, padding=1)), ("relu2", nn.ReLU()), ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(7 * 7 * 16, 100)), ("relu3", nn.ReLU()), ("fc2", nn.Linear(100, 10))]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--eps", type=float, default=0.02)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from advmnist.bounds import certified, certified_margins
    from advmnist.data import load_mnist
    from advmnist.exact import verify
    from advmnist.measures import evaluate
    from advmnist.models import Recipe, create_model
    from advmnist.robustness import ensemble_stages, run_ensemble
    from advmnist.train import fit

    from bench import machine_line, write_section  # this folder's bench.py

    data = load_mnist()
    x, y = data.test_x[:args.n], data.test_y[:args.n]
    started = time.perf_counter()
    nets = [("mlp", "zoo `mlp`, Adam 3e-3, batch 1000, 5 epochs", create_model("mlp"),
             Recipe(optimizer="adam", lr=3e-3, batch_size=1000, epochs=5)),
            ("small CNN", "conv 4x4/2 8, conv 4x4/2 16, fc 100; Adam 1e-3, batch 100, 3 epochs", small_cnn(),
             Recipe(optimizer="adam", lr=1e-3, batch_size=100, epochs=3))]
    rows = []
    for name, what, model, recipe in nets:
        torch.manual_seed(0)
        fit(model, data, recipe, seed=0)
        model.eval()
        print(f"{name}: trained ({time.perf_counter() - started:.0f} s)", flush=True)
        clean = evaluate(model, data.test_x, data.test_y)["accuracy"]
        t0 = time.perf_counter()
        margins, method = certified_margins(model, x, y, args.eps, method="crown")
        cert = certified(margins)
        t_cert = time.perf_counter() - t0
        t0 = time.perf_counter()
        verdicts = {}
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        for i in range(len(y)):
            if cert[i]:
                verdicts[i] = "robust"
            elif not ok[i]:
                verdicts[i] = "not robust"
            else:
                verdicts[i] = verify(model, x[i:i + 1], int(y[i]), args.eps, time_limit=args.time_limit).status
                print(f"  {name} image {i}: {verdicts[i]} ({time.perf_counter() - t0:.0f} s so far)", flush=True)
        t_exact = time.perf_counter() - t0
        t0 = time.perf_counter()
        attacked = run_ensemble(model, x, y, eps=args.eps, stages=ensemble_stages("standard", None))
        t_attack = time.perf_counter() - t0
        robust = attacked["robust_mask"]
        for i, v in verdicts.items():
            if v == "robust" and not robust[i]:
                raise SystemExit(f"{name}: image {i} is proven robust but an attack broke it: a bug")
        counts = {s: sum(v == s for v in verdicts.values()) for s in ("robust", "not robust", "unknown")}
        row = {"name": name, "what": what, "clean": clean, "method": method, "cert": int(cert.sum()),
               "t_cert": t_cert, **counts, "t_exact": t_exact, "attacked": int(robust.sum()), "t_attack": t_attack,
               "open": int((~cert & ok).sum())}
        rows.append(row)
        print(row, flush=True)
    lines = [BEGIN, "## Certified, exact and attacked robust accuracy on small nets", "",
             machine_line("exact.py", sys.argv[1:], time.perf_counter() - started) + " "
             f"(Training included.) First {args.n} test images, "
             f"Linf eps {args.eps:g}. Certified: full CROWN; exact: MILP (scipy/HiGHS, "
             f"{args.time_limit:g} s per image) on the images the bounds leave open; attacked: the standard "
             "ensemble (APGD-CE, APGD-T, Square). Counts of images; the true number of robust images lies "
             "between exact-robust and exact-robust + unknown.", "",
             "| net | clean (%, 10k) | certified | exact: robust | exact: not robust | exact: unknown | attacked: robust | "
             "bounds (s) | MILP (s, images left open) | attacks (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['name']} ({r['what']}) | {r['clean']:.2f} | {r['cert']} ({r['method']}) | {r['robust']} | "
                     f"{r['not robust']} | {r['unknown']} | {r['attacked']} | {r['t_cert']:.1f} | "
                     f"{r['t_exact']:.0f} ({r['open']}) | {r['t_attack']:.0f} |")
    lines += ["", "certified <= exact robust <= attacked robust holds row by row (the script stops otherwise); "
              "where exact robust equals attacked robust with no unknowns, the attacks found every "
              "non-robust image and the robust accuracy of these images is known exactly.", END]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(text, BEGIN, END)


if __name__ == "__main__":
    main()
