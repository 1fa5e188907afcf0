"""Screen training recipes side by side: each candidate trains in its own process (all at once, on
one device), then meets the standard ensemble on the first N test images, and IBP candidates the
certified bound. A quick way to rank recipes before a full 2-core run: the numbers it prints are
screening numbers (another device, a subset), not the ones a page quotes.

    python benchmarks/screen.py --device cuda --out screen --deadline 450 [--only NAME ...]

Writes OUT/NAME.json per finished candidate, OUT/NAME.log, OUT/runs/ and prints a table. Candidates
still running at the deadline are stopped; their logs keep the epochs they finished.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from torch import nn

TRADES = dict(method="trades", eps=0.3, steps=10, alpha=0.04, beta=3.0, ramp_epochs=3)
ONECYCLE = dict(lr=5e-3, epochs=25, schedule="onecycle", batch_size=100)
IBP = dict(method="ibp", eps=0.4, ramp_epochs=20, kappa=0.5, monitor_eps=0.3)
IBP_SCHEDULE = dict(lr=1e-3, epochs=50, schedule="onecycle", batch_size=100)

CANDIDATES = {
    "wide-trades-b3": ("strided-wide", TRADES, ONECYCLE),  # adversarial.toml's third row, as a calibration
    "wide-trades-b3-20x0.02": ("strided-wide", {**TRADES, "steps": 20, "alpha": 0.02}, ONECYCLE),
    "wide-silu-trades-b3": ("strided-wide-silu", TRADES, ONECYCLE),
    "wide-elu-trades-b3": ("strided-wide-elu", TRADES, ONECYCLE),
    "wide-silu-trades-b6": ("strided-wide-silu", {**TRADES, "beta": 6.0}, ONECYCLE),
    "wide-ibp-k0.7": ("strided-wide", {**IBP, "kappa": 0.7}, IBP_SCHEDULE),
    "wide-ibp-70ep": ("strided-wide", {**IBP, "ramp_epochs": 28}, {**IBP_SCHEDULE, "epochs": 70}),
    "wide-ibp-eps0.35-k0.6": ("strided-wide", {**IBP, "eps": 0.35, "kappa": 0.6}, IBP_SCHEDULE),
}


def _strided_wide(act: type[nn.Module]) -> nn.Module:
    from advmnist.models import create_model

    model = create_model("strided-wide")
    for name, module in list(model.named_children()):
        if isinstance(module, nn.ReLU):
            setattr(model, name, act())
    return model


def register_smooth() -> None:
    """`strided-wide` with smooth activations (Xie et al. 2020, "Smooth Adversarial Training")."""
    from advmnist.models import get_spec, register_model

    base = get_spec("strided-wide")
    for name, act in (("silu", nn.SiLU), ("elu", nn.ELU)):
        def build(act=act) -> nn.Module:
            return _strided_wide(act)
        build.__name__ = f"strided_wide_{name}"
        build.__doc__ = f"strided-wide with {act.__name__}"
        register_model(report=base.report, recipe=base.recipe, accuracy=base.reported_accuracy)(build)


def one(name: str, out: Path, device: str, n: int) -> dict:
    import torch

    from advmnist.data import load_mnist
    from advmnist.evaluation import certify_examples
    from advmnist.robustness import ensemble_stages, run_ensemble
    from advmnist.runs import load_checkpoint
    from advmnist.train import Adversarial, train_run

    torch.set_num_threads(1)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    register_smooth()
    model_name, adv, overrides = CANDIDATES[name]
    data = load_mnist()
    start = time.perf_counter()
    run = train_run(model_name, out=out / "runs", device=device, data=data, adversarial=Adversarial(**adv),
                    on_epoch=lambda s: print(json.dumps(s), flush=True), **overrides)
    train_s = time.perf_counter() - start
    model, _ = load_checkpoint(run)
    model = model.to(device).eval()
    x, y = data.test_x[:n].to(device), data.test_y[:n].to(device)
    start = time.perf_counter()
    result = run_ensemble(model, x, y, eps=0.3, stages=ensemble_stages("standard"),
                          batch_size=n if device != "cpu" else 1000)
    result.pop("robust_mask")
    rows = result["per_attack"]
    cert = certify_examples(model, x, y, 0.3)[0] if adv["method"] == "ibp" else None
    return {"candidate": name, "model": model_name, "adversarial": adv, "overrides": overrides, "run": str(run),
            "device": device, "n": n, "clean": result["clean_accuracy"], "robust": result["robust_accuracy"],
            "gradient_only": rows[-2]["robust_accuracy_after"], "square_pp": rows[-1]["broke_pp"],
            "certified": cert and cert.get("certified_accuracy"), "per_attack": rows,
            "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("screen"))
    ap.add_argument("--n", type=int, default=10000, help="the first N test images")
    ap.add_argument("--deadline", type=float, default=3600.0, help="seconds before unfinished candidates stop")
    ap.add_argument("--only", action="append", default=[], choices=sorted(CANDIDATES))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        rec = one(args.one, args.out, args.device, args.n)
        (args.out / f"{args.one}.json").write_text(json.dumps(rec, indent=1))
        return
    names = args.only or list(CANDIDATES)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for name in names:
        log = open(args.out / f"{name}.log", "w")
        procs[name] = subprocess.Popen([sys.executable, __file__, "--one", name, "--device", args.device,
                                        "--out", str(args.out), "--n", str(args.n)],
                                       stdout=log, stderr=subprocess.STDOUT, env=env)
    end = time.time() + args.deadline
    while time.time() < end and any(p.poll() is None for p in procs.values()):
        time.sleep(2)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
    print("| candidate | clean | gradient attacks | + Square | Square pp | certified | train s | eval s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        f = args.out / f"{name}.json"
        if not f.is_file():
            print(f"| {name} | unfinished (rc {procs[name].returncode}) | | | | | | |")
            continue
        r = json.loads(f.read_text())
        cert = "" if r["certified"] is None else f"{r['certified']:.2f}"
        print(f"| {name} | {r['clean']:.2f} | {r['gradient_only']:.2f} | {r['robust']:.2f} | {r['square_pp']:.2f} "
              f"| {cert} | {r['train_s']:.0f} | {r['eval_s']:.0f} |")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
