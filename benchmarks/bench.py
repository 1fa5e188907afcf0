"""advmnist's speed against the reports' loops, torchattacks and bare loops, side by side in one run.

    python benchmarks/bench.py                 # everything, about 15 minutes on 2 cores
    python benchmarks/bench.py --only train    # or pgd, zoo, penalty; --quick for a smoke run

Writes benchmarks/results.md (and prints it). Every ratio compares two loops timed in one run of
this command on the same model, data and batch size, each loop in a fresh worker process of its
own: advmnist raises glibc's malloc thresholds (advmnist/memory.py), a process-wide setting, and
a reference timed in the same process after it would get that for free. The PGD table also times
torchattacks with the same setting, so the gain splits into allocator and kernels.
Needs the bench extra: pip install -e ".[bench]".

  train    improved-bn, one epoch at batch 64 with the report's SGD recipe:
           reference = torchvision MNIST + ToTensor/Normalize + DataLoader(shuffle=True) and the
           model as the report wrote it (plain nn.Conv2d); advmnist = advmnist.train.train_epoch;
           bare = forward + backward + step on one fixed batch, no data handling (the floor).
  pgd      PGD-40 (Linf, eps 0.3, alpha 0.01, random start) on the 10,000 test images, batch 1000:
           advmnist.attacks.pgd against torchattacks 3.5 PGD, and against a bare loop of 40
           forward + input-gradient passes per batch (autograd, weights frozen, nothing else).
  zoo      the same PGD-40 ratio for every registry model on 1,000 images.
  penalty  report 001's attack, 10 digits x 10,000 steps: batched (advmnist) against the same
           update written plainly and run one digit at a time, as the report did.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from advmnist.attacks import frozen, penalty, pgd
from advmnist.data import BUNDLED_DIR, FILES, load_mnist
from advmnist.memory import keep_freed_memory
from advmnist.models import WholeMapConv2d, create_model, list_models
from advmnist.train import train_epoch

CEILING = 120e9  # fp32 FLOP/s of a 256x256 matmul on this machine's 2 cores (shared/notes/performance.md)
RESULTS = Path(__file__).parent / "results.md"
KEEP = "<!-- kept by bench.py: written by hand -->"


def flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, *args, **kw) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - start, out


def report_model(normalise_inside: bool) -> nn.Module:
    """improved-bn as report 001 wrote it: plain convolutions, normalisation in the transform."""
    torch.manual_seed(0)
    model = create_model("improved-bn")
    for m in model.modules():
        if isinstance(m, WholeMapConv2d):
            m.__class__ = nn.Conv2d
    if not normalise_inside:
        model.norm = nn.Identity()
    return model


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)


def train_reference(data, n: int) -> float:
    """The reports' loop: torchvision MNIST + ToTensor/Normalize + DataLoader(shuffle=True)."""
    from torchvision import datasets, transforms

    bs = 64
    with tempfile.TemporaryDirectory() as root:
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for stem in FILES:
            (raw / stem).write_bytes(gzip.decompress((BUNDLED_DIR / f"{stem}.gz").read_bytes()))
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        loader = torch.utils.data.DataLoader(datasets.MNIST(root, train=True, transform=tf), batch_size=bs,
                                             shuffle=True)
        model = report_model(normalise_inside=False).train()
        opt = sgd(model)
        start = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            if i * bs >= n:
                break
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - start


def train_ours(data, n: int) -> float:
    torch.manual_seed(0)
    model = create_model("improved-bn")
    t, _ = timed(train_epoch, model, sgd(model), data.train_x[:n], data.train_y[:n], 64,
                 torch.Generator().manual_seed(0))
    return t


def train_bare(data, n: int) -> float:
    """Forward + backward + step on one fixed batch, no data handling: the floor of the step."""
    bs = 64
    torch.manual_seed(0)
    model = create_model("improved-bn").train()
    opt = sgd(model)
    x, y = data.train_x[:bs].clone(), data.train_y[:bs].clone()
    start = time.perf_counter()
    for _ in range((n + bs - 1) // bs):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def bench_train(data, batches: int | None) -> list[dict]:
    bs = 64
    n = len(data.train_x) if batches is None else batches * bs
    t_ref = worker("train_reference", n=n)
    t_ours = worker("train_ours", n=n)
    t_bare = worker("train_bare", n=n)
    model = create_model("improved-bn").train()
    x, y = data.train_x[:bs], data.train_y[:bs]
    total_flops = flops(lambda: F.cross_entropy(model(x), y).backward()) / bs * n
    what = f"improved-bn training, {'one epoch' if batches is None else f'{batches} batches'} at batch 64"
    return [
        {"workload": what, "ours": t_ours, "reference": t_ref, "ref_name": "reports' DataLoader loop",
         "target": ">= 3.7x; >= 1.6x", "flops": total_flops},
        {"workload": what, "ours": t_ours, "reference": t_bare,
         "ref_name": "bare forward+backward+step on one fixed batch", "target": "within 5%",
         "flops": total_flops},
    ]


def attack_flops(model, x, y) -> float:
    """FLOPs of one forward + input-gradient pass, per image."""
    xb = x.clone().requires_grad_(True)
    with frozen(model):
        return flops(lambda: F.cross_entropy(model(xb), y, reduction="sum").backward()) / len(x)


def pgd_ours(model, x, y, bs):
    return torch.cat([pgd(model, x[i:i + bs], y[i:i + bs], eps=0.3, alpha=0.01, steps=40,
                          generator=torch.Generator().manual_seed(0)) for i in range(0, len(x), bs)])


def pgd_torchattacks(model, x, y, bs):
    import torchattacks

    attack = torchattacks.PGD(model, eps=0.3, alpha=0.01, steps=40, random_start=True)
    return torch.cat([attack(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)])


def pgd_bare(model, x, y, bs):
    with frozen(model):
        for i in range(0, len(x), bs):
            xb = x[i:i + bs].clone().requires_grad_(True)
            for _ in range(40):
                torch.autograd.grad(F.cross_entropy(model(xb), y[i:i + bs], reduction="sum"), xb)


def robust_accuracy(model, adv, y) -> float:
    with torch.no_grad():
        return (model(adv).argmax(1) == y).float().mean().item() * 100


def pgd_worker(data, model, n: int, bs: int, impl: str) -> dict:
    x, y = data.test_x[:n], data.test_y[:n]
    if impl == "torchattacks_kept":
        keep_freed_memory()
    fn = {"ours": pgd_ours, "torchattacks": pgd_torchattacks, "torchattacks_kept": pgd_torchattacks,
          "bare": pgd_bare}[impl]
    t, adv = timed(fn, model, x, y, bs)
    return {"time": t, "accuracy": None if adv is None else robust_accuracy(model, adv, y)}


def bench_pgd(model_file: str, data, n: int, bs: int = 1000) -> list[dict]:
    runs = {impl: worker("pgd_worker", model_file=model_file, n=n, bs=bs, impl=impl)
            for impl in ("ours", "torchattacks", "torchattacks_kept", "bare")}
    model = load_model(model_file)
    total_flops = attack_flops(model, data.test_x[:bs], data.test_y[:bs]) * 40 * n
    t_ours = runs["ours"]["time"]
    what = f"PGD-40 eps 0.3, improved-bn, {n} test images, batch {bs}"
    return [
        {"workload": what, "ours": t_ours, "reference": runs["torchattacks"]["time"],
         "ref_name": "torchattacks 3.5.1 PGD", "target": ">= 3x", "flops": total_flops,
         "note": f"robust accuracy {runs['ours']['accuracy']:.1f}% (torchattacks {runs['torchattacks']['accuracy']:.1f}%)"},
        {"workload": what, "ours": t_ours, "reference": runs["torchattacks_kept"]["time"],
         "ref_name": "torchattacks 3.5.1 PGD, with advmnist's malloc setting", "target": "", "flops": total_flops,
         "note": "the part of the speed-up that is not the allocator"},
        {"workload": what, "ours": t_ours, "reference": runs["bare"]["time"],
         "ref_name": "bare loop: 40 forward + input-gradient passes", "target": "within 10%",
         "flops": total_flops},
    ]


def zoo_worker(data, name: str, n: int, impl: str) -> float:
    torch.manual_seed(0)
    model = create_model(name).eval()
    x, y = data.test_x[:n], data.test_y[:n]
    return timed(pgd_ours if impl == "ours" else pgd_torchattacks, model, x, y, n)[0]


def bench_zoo(data, n: int) -> list[dict]:
    rows = []
    x, y = data.test_x[:n], data.test_y[:n]
    for name in list_models():
        t_ours = worker("zoo_worker", name=name, n=n, impl="ours")
        t_ta = worker("zoo_worker", name=name, n=n, impl="torchattacks")
        torch.manual_seed(0)
        model = create_model(name).eval()
        rows.append({"workload": f"PGD-40 eps 0.3, {name}, {n} images", "ours": t_ours, "reference": t_ta,
                     "ref_name": "torchattacks 3.5.1 PGD", "target": "", "flops": attack_flops(model, x, y) * 40 * n})
    return rows


def plain_penalty(model, x_target, target, steps, generator):
    """Report 001's loop for one image, backward through the whole net (weights included)."""
    x = (0.5 + 0.3 * torch.randn(x_target.shape, generator=generator)).clamp(0, 1)
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x), target)
        model.zero_grad()
        loss.backward()
        x = (x - 0.1 * (x.grad + 0.05 * (x - x_target))).clamp(0, 1)
    return x.detach()


def penalty_digits(data):
    idx = torch.stack([(data.test_y == d).nonzero()[0, 0] for d in range(10)])
    return data.test_x[idx], (data.test_y[idx] + 1) % 10


def penalty_worker(data, model, steps: int, impl: str) -> dict:
    x_t, target = penalty_digits(data)
    if impl == "ours":
        t, adv = timed(penalty, model, x_t, target, eta=0.1, lam=0.05, steps=steps,
                       generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return {"time": t, "reached": (model(adv).argmax(1) == target).sum().item()}
    start = time.perf_counter()
    for d in range(10):
        plain_penalty(model, x_t[d:d + 1], target[d:d + 1], steps, torch.Generator().manual_seed(d))
    return {"time": time.perf_counter() - start}


def bench_penalty(model_file: str, data, steps: int, ref_steps: int) -> list[dict]:
    ours = worker("penalty_worker", model_file=model_file, steps=steps, impl="ours")
    t_ref = worker("penalty_worker", model_file=model_file, steps=ref_steps, impl="plain")["time"] * steps / ref_steps
    x_t, target = penalty_digits(data)
    scaled = "" if ref_steps == steps else f"; reference timed for {ref_steps} steps a digit, scaled"
    return [{"workload": f"penalty attack, 10 digits x {steps} steps", "ours": ours["time"], "reference": t_ref,
             "ref_name": "the same update, one digit at a time", "target": "<= 15 s, >= 20x; >= 10x",
             "flops": attack_flops(load_model(model_file), x_t, target) * 10 * steps,
             "note": f"{ours['reached']}/10 digits reach their target{scaled}"}]


def train_for_bench(data, path: str) -> str:
    """A briefly trained improved-bn, saved for the PGD and penalty workers (speed does not depend
    on accuracy; the attacks must still work). Run as a worker: this process's allocator stays default."""
    torch.manual_seed(0)
    model = create_model("improved-bn")
    train_epoch(model, sgd(model), data.train_x[:20000], data.train_y[:20000], 64, torch.Generator().manual_seed(0))
    torch.save(model.state_dict(), path)
    return path


def load_model(path: str) -> nn.Module:
    model = create_model("improved-bn")
    model.load_state_dict(torch.load(path))
    return model.eval()


WORKERS = {f.__name__: f for f in (train_reference, train_ours, train_bare, pgd_worker, zoo_worker, penalty_worker,
                                   train_for_bench)}


def worker(job: str, **kw):
    """Run one timed job in a fresh Python process; its JSON result comes back on stdout."""
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps({"job": job, **kw})],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"worker {job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_worker(spec: str) -> None:
    kw = json.loads(spec)
    fn = WORKERS[kw.pop("job")]
    data = load_mnist()
    if "model_file" in kw:
        kw["model"] = load_model(kw.pop("model_file"))
    print(json.dumps(fn(data, **kw)))


def cpu_name() -> str:
    if Path("/proc/cpuinfo").exists():
        return next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), platform.processor())
    return platform.processor()


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def machine_line(script: str, argv: list[str], seconds: float) -> str:
    """The header every results section starts with: machine, threads, torch, commit, command, time."""
    import torch

    return (f"Machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; commit "
            f"`{git_commit()}`. Command: `python benchmarks/{script} {shlex.join(argv)}` ({seconds:.0f} s in all).")


def write_section(text: str, begin: str, end: str, results: Path = Path(__file__).parent / "results.md") -> None:
    """Replace the part of results.md between a script's begin/end markers with `text`, in place (the
    hand-written notes around it stay where they are); append it when the markers are not there yet."""
    old = results.read_text()
    if begin in old:
        before, after = old[:old.index(begin)], old[old.index(end) + len(end):].lstrip("\n")
        results.write_text(before + text.rstrip("\n") + "\n" + ("\n" + after if after else ""))
    else:
        results.write_text(old.rstrip("\n") + "\n\n" + text)


def render(rows: list[dict], argv: list[str], started: float) -> str:
    cpu, commit = cpu_name(), git_commit()
    lines = ["# advmnist benchmarks", "",
             f"Machine: {cpu}, {torch.get_num_threads()} threads; torch {torch.__version__}; commit `{commit}`.",
             f"Command: `python benchmarks/bench.py {' '.join(argv)}` ({time.perf_counter() - started:.0f} s in all).",
             "Share of ceiling: the workload's FLOPs (torch.utils.flop_counter) per second of advmnist's time, "
             f"against {CEILING / 1e9:.0f} GFLOP/s (fp32 matmul on these 2 cores).", "",
             "| workload | advmnist (s) | reference | reference (s) | speed-up | target | advmnist GFLOP/s (share of ceiling) | note |",
             "| --- | ---: | --- | ---: | ---: | --- | ---: | --- |"]
    for r in rows:
        rate = r["flops"] / r["ours"]
        lines.append(f"| {r['workload']} | {r['ours']:.1f} | {r['ref_name']} | {r['reference']:.1f} | "
                     f"{r['reference'] / r['ours']:.2f}x | {r['target']} | {rate / 1e9:.0f} ({100 * rate / CEILING:.0f}%) | "
                     f"{r.get('note', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["train", "pgd", "zoo", "penalty"], action="append")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run, nothing written")
    ap.add_argument("--penalty-ref-steps", type=int, default=None,
                    help="time the one-digit-at-a-time reference for fewer steps and scale (default: all)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return run_worker(args.worker)
    started = time.perf_counter()
    parts = args.only or ["train", "pgd", "zoo", "penalty"]
    data = load_mnist()
    steps = 200 if args.quick else 10000
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_file = os.path.join(tmp, "improved-bn.pt")
        if {"pgd", "penalty"} & set(parts):
            worker("train_for_bench", path=model_file)
        if "train" in parts:
            rows += bench_train(data, 50 if args.quick else None)
        if "pgd" in parts:
            rows += bench_pgd(model_file, data, 1000 if args.quick else 10000)
        if "zoo" in parts:
            rows += bench_zoo(data, 200 if args.quick else 1000)
        if "penalty" in parts:
            rows += bench_penalty(model_file, data, steps, args.penalty_ref_steps or steps)
    text = render(rows, sys.argv[1:], started)
    print(text)
    if not args.quick:
        out = Path(args.out)
        old = out.read_text() if out.exists() else ""
        tail = old[old.index(KEEP):] if KEEP in old else ""  # the hand-written analysis stays
        out.write_text(text + ("\n" + tail if tail else ""))


if __name__ == "__main__":
    main()
