"""advmnist's `evaluate --robust` ensemble against torchattacks' AutoAttack: agreement and speed.

    pip install -e ".[bench]"
    python benchmarks/autoattack.py --case plain=RUN_DIR:0.1 --case adversarial=RUN_DIR:0.3 [--n 1000] [--only standard]

For each case (a training run and a Linf eps), on the first N test images and the same weights:
  torchattacks  torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard",
                n_classes=10, seed=0) on the whole selection (APGD-CE, APGD-T, FAB-T, Square-5000;
                note its APGD, APGD-T and FAB default to 10 steps, not the paper's 100);
  advmnist      advmnist.robustness.run_ensemble, batch 1000, three ways: the "standard" ensemble
                (APGD-CE 100 steps, APGD-T 100 steps x 9 targets, Square 5000 queries), the
                "autoattack" one (the same with FAB-T 100 steps x 9 targets: AutoAttack's standard
                version in full), and "autoattack" at torchattacks' budget (10 steps), like for like.
Each runs in a fresh worker process (advmnist raises glibc's malloc thresholds process-wide), one
after the other, on the same machine. Robust accuracy is recomputed from the returned images.
Writes the table into benchmarks/results.md between this script's markers (kept by bench.py).
"""

from __future__ import annotations

import json
import sys
import time

import cases

BEGIN, END = "<!-- autoattack.py: begin -->", "<!-- autoattack.py: end -->"


def work_torchattacks(run: str, eps: float, n: int) -> dict:
    import torchattacks

    import torch

    model, ckpt, x, y = cases.load(run, n)
    start = time.perf_counter()
    adv = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)(x, y)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        robust = (model(adv).argmax(1) == y).float().mean().item() * 100
        linf = (adv - x).abs().max().item()
    return {"robust": robust, "seconds": seconds, "linf": linf, "torchattacks": torchattacks.__version__}


def work_advmnist(run: str, eps: float, n: int, ensemble: str = "standard", steps: int | None = None) -> dict:
    from advmnist.robustness import ensemble_stages, run_ensemble

    model, ckpt, x, y = cases.load(run, n)
    start = time.perf_counter()
    res = run_ensemble(model, x, y, eps=eps, stages=ensemble_stages(ensemble, steps=steps))
    seconds = time.perf_counter() - start
    return {"robust": res["robust_accuracy"], "clean": res["clean_accuracy"], "seconds": seconds,
            "model": ckpt["model"], "sha256": ckpt["sha256"][:12],
            "per_attack": [(r["attack"], r["robust_accuracy_after"], r["seconds"]) for r in res["per_attack"]]}


WORKERS = {"torchattacks": work_torchattacks, "advmnist": work_advmnist}


# (label, ensemble, steps) of each advmnist evaluation measured against torchattacks
VARIANTS = (("advmnist standard: APGD-CE, APGD-T, Square (100 steps)", "standard", None),
            ("advmnist autoattack: APGD-CE, APGD-T, FAB-T, Square (100 steps)", "autoattack", None),
            ("advmnist autoattack at torchattacks' budget (10 steps)", "autoattack", 10))


def render(rows: list[dict], argv: list[str], seconds: float) -> str:
    from bench import machine_line  # this folder's bench.py: the same machine line

    lines = [BEGIN, "## The robust evaluation against torchattacks' AutoAttack (agreement and speed)", "",
             machine_line("autoattack.py", argv, seconds) + f" torchattacks {rows[0]['ta']['torchattacks']}. "
             "Same weights, the first N test images, Linf. "
             "torchattacks: `AutoAttack(model, norm=\"Linf\", eps=eps, version=\"standard\", n_classes=10, seed=0)` "
             "(APGD-CE, APGD-T, FAB-T, Square 5000 queries; its APGD, APGD-T and FAB run 10 steps by default, "
             "not the paper's 100). advmnist: `evaluate --robust` with `--ensemble standard` (the default), "
             "`--ensemble autoattack`, and `--ensemble autoattack --steps 10`. Each in a fresh process, one "
             "after the other.", "",
             "| case | model (sha256) | eps | N | clean (%) | evaluation | robust (%) | minus torchattacks (pp) | "
             "seconds | torchattacks' time / this |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        t, first = r["ta"], r["ours"][0][1]
        head = f"| {r['case']} | {first['model']} ({first['sha256']}) | {r['eps']:g} | {r['n']} | {first['clean']:.1f} |"
        lines.append(f"{head} torchattacks AutoAttack | {t['robust']:.1f} | | {t['seconds']:.1f} | 1.00x |")
        for label, a in r["ours"]:
            lines.append(f"| | | | | | {label} | {a['robust']:.1f} | {a['robust'] - t['robust']:+.1f} | "
                         f"{a['seconds']:.1f} | {t['seconds'] / a['seconds']:.2f}x |")
    lines += ["", "Cumulative robust accuracy after each attack of advmnist's ensembles (seconds):", ""]
    for r in rows:
        for label, a in r["ours"]:
            steps = "; ".join(f"{name} {acc:.1f}% ({s:.0f} s)" for name, acc, s in a["per_attack"])
            lines.append(f"- {r['case']}, {label.removeprefix('advmnist ')}: {steps}")
    return "\n".join(lines + ["", END]) + "\n"


def main() -> None:
    ap = cases.arguments(__doc__.split("\n")[0], n=1000)
    ap.add_argument("--only", choices=sorted({v[1] for v in VARIANTS}),
                    help="only the advmnist evaluations with this ensemble (a quicker check of new weights)")
    args = ap.parse_args()
    if args.worker:
        kw = json.loads(args.worker)
        print(json.dumps(WORKERS[kw.pop("job")](**kw)))
        return
    started = time.perf_counter()
    rows = []
    for case in args.case:
        name, run, eps = cases.split(case)
        ta = cases.worker(__file__, job="torchattacks", run=run, eps=eps, n=args.n)
        print(f"{name}: torchattacks {ta['robust']:.1f}% in {ta['seconds']:.1f} s", flush=True)
        ours = []
        for label, ensemble, steps in VARIANTS:
            if args.only in (None, ensemble):
                ours.append((label, cases.worker(__file__, job="advmnist", run=run, eps=eps, n=args.n,
                                                 ensemble=ensemble, steps=steps)))
                print(f"{name}: {label} {ours[-1][1]['robust']:.1f}% in {ours[-1][1]['seconds']:.1f} s", flush=True)
        rows.append({"case": name, "eps": eps, "n": args.n, "ours": ours, "ta": ta})
    cases.publish(render(rows, sys.argv[1:], time.perf_counter() - started), BEGIN, END, not args.no_write)


if __name__ == "__main__":
    main()
