"""advmnist's minimum-norm attacks against their reference implementations, side by side in one process.

    pip install -e ".[bench]"
    python benchmarks/oracle_fmn_jsma.py [--run RUN_DIR] [--n 1000] [--epochs 1] [--json out.json]

  fmn (L2, Linf, L1, L0)   advmnist.attacks.fmn(norm=...)   foolbox 3.3.4 L2/LInf/L1/L0FMNAttack
  jsma                     advmnist.attacks.jsma            torchattacks.JSMA (targeted by label)

FMN: the first N test images, untargeted, 100 steps, the same schedule on both sides (step 1.0 ->
0.01, gamma 0.05 -> 0.001, cosine), no initial attack. JSMA: the first test image of each digit sent
to each of the 9 other digits (90 pairs), theta 1.0, gamma 0.1. Per attack: success rate (among
clean-correct images for FMN; target reached for JSMA), the median perturbation of the successful
examples (the attack's own norm; pixels changed for L0 and JSMA), the same median over the examples
both sides broke, and wall time. Without --run, improved-bn is trained for --epochs epochs first.
Prints a Markdown table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch


def _model(run: str | None, epochs: int):
    from advmnist.data import load_mnist

    data = load_mnist()
    if run:
        from advmnist.runs import load_checkpoint

        model, ckpt = load_checkpoint(run)
        what = f"{ckpt['model']} from {run}"
    else:
        from advmnist.models import create_model
        from advmnist.train import fit, resolve_recipe

        torch.manual_seed(0)
        model = create_model("improved-bn")
        fit(model, data, resolve_recipe("improved-bn", epochs=epochs), seed=0)
        what = f"improved-bn trained here for {epochs} epoch(s), seed 0"
    return model.eval(), data, what


def _sizes(adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    from advmnist.attacks.fmn import lp_norm

    return lp_norm((adv - x).flatten(1), norm)


def _median(values: torch.Tensor) -> float:
    return values.median().item() if len(values) else math.nan


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def fmn_rows(model, x, y, steps: int) -> list[dict]:
    import foolbox as fb

    from advmnist.attacks import fmn

    fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    x, y = x[clean], y[clean]
    classes = {"l2": fb.attacks.L2FMNAttack, "linf": fb.attacks.LInfFMNAttack, "l1": fb.attacks.L1FMNAttack,
               "l0": fb.attacks.L0FMNAttack}
    rows = []
    for norm, cls in classes.items():
        ours, t_ours = _timed(lambda: fmn(model, x, y, norm=norm, steps=steps))
        attack = cls(steps=steps, max_stepsize=1.0, min_stepsize=0.01, gamma=0.05)  # gamma ends at 0.001 there
        (_, theirs, _), t_theirs = _timed(lambda: attack(fmodel, x, y, epsilons=None))
        with torch.no_grad():
            hit = {"advmnist": model(ours).argmax(1) != y, "foolbox": model(theirs).argmax(1) != y}
        size = {"advmnist": _sizes(ours, x, norm), "foolbox": _sizes(theirs, x, norm)}
        both = hit["advmnist"] & hit["foolbox"]
        for side, seconds in (("advmnist", t_ours), ("foolbox", t_theirs)):
            rows.append({"attack": f"fmn {norm}", "side": side, "n": len(x), "success": 100 * hit[side].float().mean().item(),
                         "median": _median(size[side][hit[side]]), "median_both": _median(size[side][both]),
                         "seconds": seconds})
        print(rows[-2], rows[-1], flush=True)
    return rows


def jsma_rows(model, data, theta: float, gamma: float) -> list[dict]:
    import torchattacks

    from advmnist.attacks import jsma

    first = torch.stack([(data.test_y == d).nonzero()[0, 0] for d in range(10)])
    pairs = [(s, t) for s in range(10) for t in range(10) if s != t]
    x = data.test_x[first[[s for s, _ in pairs]]]
    target = torch.tensor([t for _, t in pairs])
    ours, t_ours = _timed(lambda: jsma(model, x, target, theta=theta, gamma=gamma))
    # torchattacks runs ceil(gamma D / 2) pair steps, so up to 80 pixels at gamma 0.1 (advmnist: at most
    # gamma D = 78): advmnist again at the budget torchattacks really uses
    budget = 2 * math.ceil(gamma * x[0].numel() / 2) / x[0].numel()
    same, t_same = _timed(lambda: jsma(model, x, target, theta=theta, gamma=budget))
    attack = torchattacks.JSMA(model, theta=theta, gamma=gamma)
    attack.set_mode_targeted_by_label(quiet=True)
    theirs, t_theirs = _timed(lambda: attack(x, target))
    with torch.no_grad():
        hit = {"advmnist": model(ours).argmax(1) == target, "torchattacks": model(theirs).argmax(1) == target,
               "advmnist, torchattacks' budget": model(same).argmax(1) == target}
    size = {"advmnist": _sizes(ours, x, "l0"), "torchattacks": _sizes(theirs, x, "l0"),
            "advmnist, torchattacks' budget": _sizes(same, x, "l0")}
    both = hit["advmnist"] & hit["torchattacks"] & hit["advmnist, torchattacks' budget"]
    rows = [{"attack": "jsma", "side": side, "n": len(x), "success": 100 * hit[side].float().mean().item(),
             "median": _median(size[side][hit[side]]), "median_both": _median(size[side][both]),
             "max_pixels": size[side].max().item(), "seconds": seconds}
            for side, seconds in (("advmnist", t_ours), ("torchattacks", t_theirs),
                                  ("advmnist, torchattacks' budget", t_same))]
    print(rows, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| attack | side | n | success % | median size (successful) | median size (every side broke) | most pixels | seconds |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        digits = 0 if r["attack"] in ("fmn l0", "jsma") else 4
        lines.append(f"| {r['attack']} | {r['side']} | {r['n']} | {r['success']:.1f} | {r['median']:.{digits}f} | "
                     f"{r['median_both']:.{digits}f} | {r.get('max_pixels', '')} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="a training run of improved-bn to load (default: train one here)")
    ap.add_argument("--epochs", type=int, default=1, help="without --run: epochs to train improved-bn")
    ap.add_argument("--n", type=int, default=1000, help="FMN on the first N test images")
    ap.add_argument("--steps", type=int, default=100, help="FMN steps, both sides")
    ap.add_argument("--theta", type=float, default=1.0)
    ap.add_argument("--gamma", type=float, default=0.1, help="JSMA's largest fraction of pixels changed")
    ap.add_argument("--json", default="benchmarks/oracle_fmn_jsma.json")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    model, data, what = _model(args.run, args.epochs)
    for p in model.parameters():
        p.requires_grad_(False)  # foolbox and torchattacks need no weight gradients either
    rows = fmn_rows(model, data.test_x[:args.n], data.test_y[:args.n], args.steps)
    rows += jsma_rows(model, data, args.theta, args.gamma)
    text = table(rows)
    print(f"\nModel: {what}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"{time.perf_counter() - start:.0f} s in all.\n")
    print(text)
    with open(args.json, "w") as f:
        json.dump({"model": what, "args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
