"""advmnist's `cw` and `deepfool` against torchattacks' CW and DeepFool, side by side, on the same weights.

    pip install -e ".[bench]"
    python benchmarks/oracle_cw_deepfool.py [--run RUN_DIR] [--n 1000] [--epochs 3] [--json out.json]

Without --run it first trains improved-bn with its recipe for --epochs epochs on the full training set
(3 epochs: about 98.9% test accuracy) into a temporary folder. Then, on the first N test images, in
one process, one after the other:

  cw         advmnist cw(search_steps=1, abort_early=False)  torchattacks.CW    same c, kappa, steps, lr
             (torchattacks has no binary search and stops the whole batch when its summed loss rises)
  cw         advmnist cw() at its defaults (5 x 100 steps, lr 0.1, binary search over c)
  deepfool   advmnist deepfool(norm="l2")                    torchattacks.DeepFool  same steps, overshoot
  deepfool   advmnist deepfool(norm="linf")  (torchattacks has no Linf DeepFool)

Per attack: the success rate over the clean-correct images (the returned image misclassified), the
median and mean L2 (and Linf) of the successful perturbations, the median L2 over the images both
sides of a pair broke (so that one side's extra, harder successes do not move its median), wall time.
Prints a Markdown table and writes a JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def _model(run: str | None, epochs: int):
    from advmnist.runs import load_checkpoint
    from advmnist.train import train_run

    if run is None:
        run = str(train_run("improved-bn", out=tempfile.mkdtemp(prefix="oracle-cw-df-"), epochs=epochs, device="cpu"))
    model, ckpt = load_checkpoint(run)
    return model.eval(), ckpt, run


def _measure(model, x, y, adv, seconds):
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        broken = clean & (model(adv).argmax(1) != y)
    d = (adv - x).flatten(1)
    l2, linf = d.norm(dim=1), d.abs().amax(1)
    ok = l2[broken]
    return {"success": 100.0 * broken.sum().item() / max(clean.sum().item(), 1),
            "median_l2": ok.median().item() if len(ok) else float("nan"),
            "mean_l2": ok.mean().item() if len(ok) else float("nan"),
            "median_linf": linf[broken].median().item() if len(ok) else float("nan"),
            "seconds": seconds, "broken": broken.tolist(), "l2": l2.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=None, help="a training run of improved-bn (default: train one)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs when training (the recipe's own number)")
    ap.add_argument("--n", type=int, default=1000, help="the first N test images")
    ap.add_argument("--ta-cw-steps", type=int, default=50, help="steps of the same-settings CW pairs (torchattacks' default)")
    ap.add_argument("--json", default="oracle_cw_deepfool.json")
    args = ap.parse_args()

    import torchattacks as ta

    from advmnist.attacks import cw, deepfool
    from advmnist.data import load_mnist

    started = time.perf_counter()
    model, ckpt, run = _model(args.run, args.epochs)
    data = load_mnist()
    x, y = data.test_x[:args.n], data.test_y[:args.n]
    s = args.ta_cw_steps
    pairs = [  # (label, advmnist, torchattacks or None)
        (f"cw c=1 kappa=0 lr=0.01 1x{s} steps",
         lambda: cw(model, x, y, c=1.0, kappa=0.0, steps=s, lr=0.01, search_steps=1, abort_early=False),
         lambda: ta.CW(model, c=1, kappa=0, steps=s, lr=0.01)(x, y)),
        ("cw c=1 kappa=0 lr=0.1 1x100 steps",
         lambda: cw(model, x, y, c=1.0, kappa=0.0, steps=100, lr=0.1, search_steps=1, abort_early=False),
         lambda: ta.CW(model, c=1, kappa=0, steps=100, lr=0.1)(x, y)),
        ("cw defaults (advmnist: 5x100 lr=0.1, search over c)", lambda: cw(model, x, y), None),
        ("deepfool l2 steps=50 overshoot=0.02", lambda: deepfool(model, x, y, norm="l2", steps=50, overshoot=0.02),
         lambda: ta.DeepFool(model, steps=50, overshoot=0.02)(x, y)),
        ("deepfool linf steps=50 overshoot=0.02",
         lambda: deepfool(model, x, y, norm="linf", steps=50, overshoot=0.02), None),
    ]
    rows = []
    for label, ours, theirs in pairs:
        row = {"attack": label}
        for side, fn in (("advmnist", ours), ("torchattacks", theirs)):
            if fn is None:
                continue
            t = time.perf_counter()
            adv = fn().detach()
            row[side] = _measure(model, x, y, adv, time.perf_counter() - t)
            print(f"{label} {side}: {row[side]['success']:.1f}% {row[side]['median_l2']:.4f} "
                  f"{row[side]['seconds']:.1f}s", flush=True)
        if "torchattacks" in row:  # the median L2 on the images both broke
            a, b = row["advmnist"], row["torchattacks"]
            both = torch.tensor(a["broken"]) & torch.tensor(b["broken"])
            for side in (a, b):
                side["both_n"] = int(both.sum())
                side["both_median_l2"] = torch.tensor(side["l2"])[both].median().item() if both.any() else float("nan")
        rows.append(row)

    lines = ["| attack | side | success % | median L2 | mean L2 | median Linf | median L2 where both broke (n) | seconds |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        for side in ("advmnist", "torchattacks"):
            if side not in row:
                continue
            r = row[side]
            both = f"{r['both_median_l2']:.4f} ({r['both_n']})" if "both_n" in r else "-"
            lines.append(f"| {row['attack']} | {side} | {r['success']:.1f} | {r['median_l2']:.4f} | {r['mean_l2']:.4f} | "
                         f"{r['median_linf']:.4f} | {both} | {r['seconds']:.1f} |")
    table = "\n".join(lines)
    print(f"\nimproved-bn {ckpt['model']} sha256 {ckpt['sha256'][:12]} ({run}); first {args.n} test images; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {time.perf_counter() - started:.0f} s in all\n")
    print(table)
    for row in rows:
        for side in ("advmnist", "torchattacks"):
            if side in row:
                del row[side]["broken"], row[side]["l2"]
    with open(args.json, "w") as f:
        json.dump({"run": run, "sha256": ckpt["sha256"], "n": args.n, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "rows": rows, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
