"""Cost of the certified bounds: IBP, CROWN-IBP and CROWN against one forward pass, per zoo model.

    python benchmarks/bounds.py [--n 10000] [--crown-n 200]

For every model of the zoo (its weights do not change the cost: freshly built, eval mode) on the
first N test images at Linf eps 0.1: one plain forward pass, IBP (`bounds.ibp_margins`), CROWN-IBP
(`crown_margins(..., intermediate="ibp")`) and full CROWN (CROWN intermediate bounds), each timed
side by side in this one process, batch 500. Full CROWN builds one coefficient row per hidden
neuron of every earlier layer, so it runs on the first `--crown-n` images only and its time is
scaled to N (the cost is linear in the images). Models with max pooling get IBP only.
Writes its table into benchmarks/results.md between this script's markers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

BEGIN, END = "<!-- bounds.py: begin -->", "<!-- bounds.py: end -->"


def timed(fn, x, y, batch: int = 500) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            fn(x[i:i + batch], y[i:i + batch])
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--crown-n", type=int, default=200)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from advmnist.bounds import BoundError, crown_cost, bound_layers, crown_margins, ibp_margins
    from advmnist.data import load_mnist
    from advmnist.models import create_model, list_models

    from bench import machine_line, write_section  # this folder's bench.py

    data = load_mnist()
    x, y = data.test_x[:args.n], data.test_y[:args.n]
    started = time.perf_counter()
    rows = []
    for name in list_models():
        torch.manual_seed(0)
        model = create_model(name).eval()
        row = {"model": name, "forward": timed(lambda a, b: model(a), x, y),
               "ibp": timed(lambda a, b: ibp_margins(model, a, b, args.eps), x, y)}
        try:
            row["crown_ibp"] = timed(lambda a, b: crown_margins(model, a, b, args.eps, intermediate="ibp"), x, y)
            m = args.crown_n
            row["crown"] = timed(lambda a, b: crown_margins(model, a, b, args.eps), x[:m], y[:m], batch=100) * len(x) / m
            row["crown_cost"] = crown_cost(bound_layers(model, x[:1]))
        except BoundError:
            pass
        rows.append(row)
        print(name, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    def cell(r, key):
        return f"{r[key]:.2f} ({r[key] / r['forward']:.0f}x)" if key in r else "max pooling: –"

    lines = [BEGIN, "## Certified bounds: cost against a forward pass", "",
             machine_line("bounds.py", sys.argv[1:], time.perf_counter() - started) + " "
             f"Seconds for the first {len(x)} test images at Linf eps "
             f"{args.eps:g}, batch 500, in one process (in brackets: times a plain forward pass). Full CROWN ran "
             f"on the first {args.crown_n} images, scaled to {len(x)}.", "",
             "| model | forward (s) | IBP (s) | CROWN-IBP (s) | CROWN (s) | CROWN coefficients per image |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['forward']:.2f} | {cell(r, 'ibp')} | {cell(r, 'crown_ibp')} | "
                     f"{cell(r, 'crown')} | {r.get('crown_cost', '–'):,} |" if "crown_cost" in r else
                     f"| `{r['model']}` | {r['forward']:.2f} | {cell(r, 'ibp')} | {cell(r, 'crown_ibp')} | "
                     f"{cell(r, 'crown')} | – |")
    lines += ["", "`evaluate --robust` certifies with IBP and, for nets without max pooling, CROWN-IBP: a few "
              "forward passes' worth. Full CROWN (`--bound crown`) is tighter (it certified every one of 20 test "
              "images of the PGD-trained strided net at eps 0.05, where CROWN-IBP certified none) but costs "
              "thousands of forward passes here; `auto` uses it only below 10^6 coefficients per image "
              "(`bounds.crown_cost`: test-sized nets).", END]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(text, BEGIN, END)


if __name__ == "__main__":
    main()
