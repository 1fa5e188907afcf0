"""advmnist on whatever GPU this machine has: training, attacks, certification and the robust evaluation,
timed side by side with torchattacks' AutoAttack in one run.

    python benchmarks/gpu.py --out DIR                 # on a GPU machine; writes DIR/gpu.json step by step
    python benchmarks/gpu.py --render DIR/gpu.json     # here: the table into benchmarks/results.md
    python benchmarks/gpu.py --smoke --out DIR         # the same code paths on tiny sizes (any device)

Steps, in order (each one's result is written to gpu.json as soon as it is known, so a run cut short
keeps what it measured):
1. `advmnist train --model improved-bn --epochs 2` (its report's batch 64): seconds per epoch;
2. PGD-40 (Linf eps 0.1) on all 10,000 test images of that net;
3. the penalty attack of report 001 (eta 0.1, lam 0.05, 10,000 steps) on the first test image of each digit;
4. the TRADES recipe of experiments/adversarial.toml's fourth row (`strided-wide`, beta 3, 10 x 0.04, eps 0.3,
   one-cycle 5e-3, 25 epochs, EMA 0.9995, last epoch kept): seconds per epoch, and the model it trains;
5. certification (IBP and CROWN-IBP, `advmnist.bounds`) of that model on all 10,000 test images at eps 0.3;
6. the standard ensemble (APGD-CE, APGD-T, Square 5000) on all 10,000 at eps 0.3;
7. the autoattack ensemble at torchattacks' budget (`--ensemble autoattack --steps 10`) and
8. torchattacks' `AutoAttack(model, norm="Linf", eps=0.3, version="standard", n_classes=10, seed=0)` (its
   APGD, APGD-T and FAB run 10 steps by default), same weights, images and GPU.
Nothing in the test suite needs a GPU; this script is run by hand when one is available.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BEGIN, END = "<!-- gpu.py: begin -->", "<!-- gpu.py: end -->"
ROOT = Path(__file__).resolve().parents[1]
TRADES = ["--model", "strided-wide", "--adv", "trades", "--beta", "3", "--adv-steps", "10", "--adv-alpha", "0.04",
          "--eps", "0.3", "--eps-ramp", "3", "--lr", "5e-3", "--schedule", "onecycle", "--batch-size", "100",
          "--ema", "0.9995", "--keep-last"]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn):
    _sync(device)
    start = time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.perf_counter() - start


def train(args, out: Path, model_args: list[str], epochs: int) -> tuple[Path, list[float], dict]:
    """`advmnist train` as a user runs it; the run directory and each epoch's training seconds."""
    runs = out / "runs"
    cmd = [sys.executable, "-m", "advmnist.cli", "train", *model_args, "--epochs", str(epochs), "--device",
           args.device, "--out", str(runs), "--quiet"]
    if args.smoke:
        cmd += ["--limit", "600"]
    before = set(runs.glob("*")) if runs.is_dir() else set()
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    (run,) = [p for p in runs.glob("*") if p not in before and not p.name.startswith(".")]
    record = json.loads((run / "record.json").read_text())
    return run, [h["seconds"] for h in record["history"]], {"wall_s": round(wall, 1),
                                                           "test_accuracy": record["test_accuracy"],
                                                           "command": "advmnist train " + " ".join(model_args)
                                                           + f" --epochs {epochs}"}


def measure(args) -> None:
    import torch

    from advmnist.data import load_mnist
    from advmnist.devices import pick_device
    from advmnist.evaluation import certify_examples
    from advmnist.execution import execute_attack, select
    from advmnist.robustness import ensemble_stages, run_ensemble
    from advmnist.runs import load_checkpoint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(args.device)
    n = 50 if args.smoke else 10000
    scale = 100 if args.smoke else 1
    result = {"gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"no GPU ({dev.type})",
              "torch": torch.__version__, "device": str(dev), "n": n, "smoke": args.smoke, "steps": []}

    def note(step: str, **values) -> None:
        result["steps"].append({"step": step, **values})
        (out / "gpu.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result["steps"][-1]), flush=True)

    data = load_mnist().to(dev)
    x, y = data.test_x[:n], data.test_y[:n]

    run, epochs, info = train(args, out, ["--model", "improved-bn"], 2)
    note("train improved-bn, batch 64", seconds_per_epoch=epochs, **info)
    model, _ = load_checkpoint(run, map_location=dev)
    adv, s = timed(dev, lambda: execute_attack(model, "pgd", x, y, params={"eps": 0.1, "steps": 40 // scale or 1},
                                                measure=False).x_adv)
    acc = (model(adv).argmax(1) == y).float().mean().item() * 100
    note(f"PGD-40, Linf eps 0.1, {n} test images (improved-bn)", seconds=round(s, 2), robust_accuracy=round(acc, 2))
    chosen = select(data, per_digit=1, targeted=True)
    _, s = timed(dev, lambda: execute_attack(model, "penalty", data.test_x[chosen.indices], data.test_y[chosen.indices],
                                             target=chosen.target, measure=False,
                                             params={"eta": 0.1, "lam": 0.05, "steps": 10000 // scale}))
    note("penalty attack, 10 digits x 10,000 steps (improved-bn)", seconds=round(s, 2))

    run, epochs, info = train(args, out, TRADES, 2 if args.smoke else 25)
    note("train strided-wide, TRADES (adversarial.toml row 4)", seconds_per_epoch=epochs, **info)
    model, ckpt = load_checkpoint(run, map_location=dev)
    (out / "trades-strided-wide.pt").write_bytes((run / "model.pt").read_bytes())
    (out / "trades-strided-wide.json").write_bytes((run / "record.json").read_bytes())
    cert, s = timed(dev, lambda: certify_examples(model, x, y, 0.3)[0])
    note(f"certification at Linf eps 0.3, {n} test images (strided-wide TRADES)", seconds=round(s, 2),
         method=cert.get("method"), certified_accuracy=cert.get("certified_accuracy"), skipped=cert.get("skipped"))

    def ensemble(name: str, steps: int | None):
        stages = ensemble_stages(name, steps=steps, queries=50 if args.smoke else None)
        res, s = timed(dev, lambda: run_ensemble(model, x, y, eps=0.3, stages=stages))
        note(f"advmnist {name} ensemble{f' at {steps} steps' if steps else ''}, Linf eps 0.3, {n} test images "
             f"(strided-wide TRADES)", seconds=round(s, 2), clean_accuracy=round(res["clean_accuracy"], 2),
             robust_accuracy=round(res["robust_accuracy"], 2),
             per_attack=[(r["attack"], round(r["robust_accuracy_after"], 2), r["seconds"]) for r in res["per_attack"]],
             sha256=ckpt["sha256"][:12])

    ensemble("standard", 5 if args.smoke else None)
    ensemble("autoattack", 10)
    try:
        import torchattacks
    except ImportError:
        note("torchattacks AutoAttack", skipped="torchattacks is not installed (pip install -e '.[bench]')")
        return
    attack = torchattacks.AutoAttack(model, norm="Linf", eps=0.3, version="standard", n_classes=10, seed=0)
    adv, s = timed(dev, lambda: attack(x, y))
    with torch.no_grad():
        acc = (model(adv).argmax(1) == y).float().mean().item() * 100
    note(f"torchattacks {torchattacks.__version__} AutoAttack (10 steps, Square 5000), Linf eps 0.3, {n} test images "
         f"(strided-wide TRADES)", seconds=round(s, 2), robust_accuracy=round(acc, 2),
         linf=round((adv - x).abs().max().item(), 4))


def render(path: Path, write: bool) -> None:
    result = json.loads(path.read_text())
    steps = result["steps"]
    lines = [BEGIN, "## On a GPU: training, attacks, certification and the robust evaluation", "",
             f"GPU: {result['gpu']}; torch {result['torch']}; {result['n']} test images; commit "
             f"`{result.get('commit', '?')}`. Command: `python "
             f"benchmarks/gpu.py --out DIR` on that machine, then `python benchmarks/gpu.py --render DIR/gpu.json` "
             f"here. One process, one step after another; times from `torch.cuda.synchronize()` to "
             f"`torch.cuda.synchronize()`. Absolute times hold for this GPU only.", "",
             "| step | seconds | result |", "| --- | ---: | --- |"]
    for st in steps:
        if "seconds_per_epoch" in st:
            per = st["seconds_per_epoch"]
            secs = f"{min(per):.1f}-{max(per):.1f} an epoch ({sum(per):.0f} in all)"
            what = f"test accuracy {st['test_accuracy']:.2f}%; `{st['command']}`"
        elif "skipped" in st and "seconds" not in st:
            secs, what = "-", st["skipped"]
        else:
            secs = f"{st['seconds']:.1f}"
            what = "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in st.items()
                             if k not in ("step", "seconds", "per_attack") and v is not None)
        lines.append(f"| {st['step']} | {secs} | {what} |")
    ours = next((s for s in steps if s["step"].startswith("advmnist autoattack")), None)
    theirs = next((s for s in steps if s["step"].startswith("torchattacks")), None)
    standard = next((s for s in steps if s["step"].startswith("advmnist standard")), None)
    if ours and theirs and "seconds" in theirs:
        lines += ["", f"At torchattacks' budget, advmnist's evaluation took {ours['seconds']:.1f} s against "
                      f"torchattacks' {theirs['seconds']:.1f} s: **{theirs['seconds'] / ours['seconds']:.1f}x** "
                      f"(robust accuracy {ours['robust_accuracy']:.2f}% against {theirs['robust_accuracy']:.2f}%); "
                      f"advmnist's standard ensemble at its full budget (100 steps) took {standard['seconds']:.1f} s "
                      f"({theirs['seconds'] / standard['seconds']:.1f}x faster than torchattacks at 10 steps), "
                      f"robust accuracy {standard['robust_accuracy']:.2f}%."]
    if result.get("note"):
        lines += ["", result["note"]]
    for st in steps:
        if "per_attack" in st:
            lines.append(f"- {st['step']}: " + "; ".join(f"{a} {acc:.2f}% ({s:.1f} s)" for a, acc, s in st["per_attack"]))
    text = "\n".join(lines + ["", END]) + "\n"
    print(text)
    if write:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench import write_section

        write_section(text, BEGIN, END)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu-bench", help="where gpu.json, the runs and the trained weights go")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu/auto for a smoke run")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: check the code paths, measure nothing")
    ap.add_argument("--render", type=Path, help="write the table of this gpu.json into benchmarks/results.md")
    ap.add_argument("--no-write", action="store_true", help="with --render: print the table only")
    args = ap.parse_args()
    if args.render:
        render(args.render, not args.no_write)
    else:
        measure(args)


if __name__ == "__main__":
    main()
