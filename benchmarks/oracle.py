"""Each attack of the robust evaluation against its torchattacks counterpart, alone: the oracle check.

    pip install -e ".[bench]"
    python benchmarks/oracle.py --case plain=RUN_DIR:0.1 --attack fab-t:100 --attack apgd-t:10 [--n 1000]

For each case (a training run and a Linf eps) and each attack (NAME:STEPS; for square, STEPS is the
query budget), on the first N test images and the same weights, one restart, seed 0:

  apgd-ce   advmnist.attacks.apgd(loss="ce")      torchattacks.APGD(loss="ce")
  apgd-dlr  advmnist.attacks.apgd(loss="dlr")     torchattacks.APGD(loss="dlr")
  apgd-t    advmnist.attacks.apgd_t(targets=9)    torchattacks.APGDT(n_classes=10)
  fab-t     advmnist.attacks.fab_t(targets=9)     torchattacks.FAB(multi_targeted=True, n_classes=10)
  square    advmnist.attacks.square(queries=S)    torchattacks.Square(n_queries=S, p_init=0.8)

An example counts as broken where the returned image is misclassified within eps. Each side runs
in a fresh process (see cases.py), one after the other. Writes its table into
benchmarks/results.md between this script's markers.
"""

from __future__ import annotations

import json
import sys
import time

import cases

BEGIN, END = "<!-- oracle.py: begin -->", "<!-- oracle.py: end -->"
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")


def _torchattacks(name: str, model, eps: float, steps: int):
    import torchattacks as ta

    common = {"norm": "Linf", "eps": eps, "seed": 0}
    return {"apgd-ce": lambda: ta.APGD(model, steps=steps, n_restarts=1, loss="ce", **common),
            "apgd-dlr": lambda: ta.APGD(model, steps=steps, n_restarts=1, loss="dlr", **common),
            "apgd-t": lambda: ta.APGDT(model, steps=steps, n_restarts=1, n_classes=10, **common),
            "fab-t": lambda: ta.FAB(model, steps=steps, n_restarts=1, multi_targeted=True, n_classes=10, **common),
            "square": lambda: ta.Square(model, n_queries=steps, n_restarts=1, p_init=0.8, **common)}[name]()


def _advmnist(name: str, eps: float, steps: int):
    import torch

    from advmnist import attacks

    g = torch.Generator().manual_seed(0)
    return {"apgd-ce": lambda m, x, y: attacks.apgd(m, x, y, eps=eps, steps=steps, loss="ce", generator=g),
            "apgd-dlr": lambda m, x, y: attacks.apgd(m, x, y, eps=eps, steps=steps, loss="dlr", generator=g),
            "apgd-t": lambda m, x, y: attacks.apgd_t(m, x, y, eps=eps, steps=steps, targets=9, generator=g),
            "fab-t": lambda m, x, y: attacks.fab_t(m, x, y, eps=eps, steps=steps, targets=9, generator=g),
            "square": lambda m, x, y: attacks.square(m, x, y, eps=eps, queries=steps, generator=g)}[name]


def work(side: str, attack: str, run: str, eps: float, n: int, steps: int) -> dict:
    import torch

    model, ckpt, x, y = cases.load(run, n)
    start = time.perf_counter()
    if side == "torchattacks":
        adv = _torchattacks(attack, model, eps, steps)(x, y)
    else:
        fn = _advmnist(attack, eps, steps)
        adv = torch.cat([fn(model, x[i:i + 1000], y[i:i + 1000]) for i in range(0, n, 1000)])
    seconds = time.perf_counter() - start
    with torch.no_grad():
        size = (adv - x).flatten(1).abs().amax(1)
        broken = (model(adv).argmax(1) != y) & (size <= eps + 1e-6)
        clean = model(x).argmax(1) == y
    return {"robust": 100.0 * (clean & ~broken).float().mean().item(), "clean": 100.0 * clean.float().mean().item(),
            "seconds": seconds, "median_size": size[broken & clean].median().item() if (broken & clean).any() else 0.0,
            "broken": (broken & clean).tolist(), "model": ckpt["model"], "sha256": ckpt["sha256"][:12]}


def render(rows: list[dict], argv: list[str], seconds: float) -> str:
    from bench import machine_line  # this folder's bench.py: the same machine line

    lines = [BEGIN, "## Each attack alone against torchattacks (the oracle check)", "",
             machine_line("oracle.py", argv, seconds) + " Same weights, the first N test images, Linf, one restart, seed 0; the counterparts are listed in "
             "the script's docstring. Robust accuracy counts an example broken only within eps.", "",
             "| case | model (sha256) | eps | N | attack | steps / queries | torchattacks (%) | advmnist (%) | "
             "broken by one side only | median Linf of the broken (torchattacks / advmnist) | torchattacks (s) | "
             "advmnist (s) | speed-up |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        t, a = r["ta"], r["ours"]
        only = sum(p != q for p, q in zip(t["broken"], a["broken"]))
        lines.append(f"| {r['case']} | {a['model']} ({a['sha256']}) | {r['eps']:g} | {r['n']} | {r['attack']} | "
                     f"{r['steps']} | {t['robust']:.1f} | {a['robust']:.1f} | {only} | "
                     f"{t['median_size']:.3f} / {a['median_size']:.3f} | {t['seconds']:.1f} | {a['seconds']:.1f} | "
                     f"{t['seconds'] / a['seconds']:.2f}x |")
    return "\n".join(lines + ["", END]) + "\n"


def main() -> None:
    ap = cases.arguments(__doc__.split("\n")[0], n=1000)
    ap.add_argument("--attack", action="append", default=[], help="NAME:STEPS, NAME one of " + ", ".join(ATTACKS))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(work(**json.loads(args.worker))))
        return
    started = time.perf_counter()
    rows = []
    for case in args.case:
        name, run, eps = cases.split(case)
        for spec in args.attack:
            attack, steps = spec.split(":")
            if attack not in ATTACKS:
                sys.exit(f"unknown attack {attack!r}; choose one of: {', '.join(ATTACKS)}")
            kw = {"attack": attack, "run": run, "eps": eps, "n": args.n, "steps": int(steps)}
            ta, ours = cases.worker(__file__, side="torchattacks", **kw), cases.worker(__file__, side="advmnist", **kw)
            print(f"{name}, {attack}:{steps}: torchattacks {ta['robust']:.1f}% in {ta['seconds']:.1f} s; advmnist "
                  f"{ours['robust']:.1f}% in {ours['seconds']:.1f} s", flush=True)
            rows.append({"case": name, "eps": eps, "n": args.n, "attack": attack, "steps": int(steps), "ta": ta,
                         "ours": ours})
    cases.publish(render(rows, sys.argv[1:], time.perf_counter() - started), BEGIN, END, not args.no_write)


if __name__ == "__main__":
    main()
