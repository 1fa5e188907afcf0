"""advmnist's speed against the reports' loops, torchattacks and bare loops, side by side in one run.

    python benchmarks/bench.py                 # everything, about 15 minutes on 2 cores
    python benchmarks/bench.py --only train    # or pgd, zoo, penalty; --quick for a smoke run

Writes benchmarks/results.md (and prints it). Every ratio compares two loops timed in this process
on the same model, data and batch size. Needs the bench extra: pip install -e ".[bench]".

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
import platform
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
from advmnist.models import WholeMapConv2d, create_model, list_models
from advmnist.train import train_epoch

CEILING = 120e9  # fp32 FLOP/s of a 256x256 matmul on this machine's 2 cores (shared/notes/performance.md)
RESULTS = Path(__file__).parent / "results.md"


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


def bench_train(data, batches: int | None) -> list[dict]:
    from torchvision import datasets, transforms

    bs = 64
    n = len(data.train_x) if batches is None else batches * bs
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
        t_ref = time.perf_counter() - start

    torch.manual_seed(0)
    model = create_model("improved-bn")
    opt = sgd(model)
    t_ours, _ = timed(train_epoch, model, opt, data.train_x[:n], data.train_y[:n], bs,
                      torch.Generator().manual_seed(0))

    x, y = data.train_x[:bs].clone(), data.train_y[:bs].clone()
    model.train()
    start = time.perf_counter()
    for _ in range((n + bs - 1) // bs):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    t_bare = time.perf_counter() - start

    total_flops = flops(lambda: F.cross_entropy(model(x), y).backward()) / bs * n
    what = f"improved-bn training, {'one epoch' if batches is None else f'{batches} batches'} at batch 64"
    return [
        {"workload": what, "ours": t_ours, "reference": t_ref, "ref_name": "reports' DataLoader loop",
         "target": ">= 3.7x (issue 7); >= 1.6x (issue 2)", "flops": total_flops},
        {"workload": what, "ours": t_ours, "reference": t_bare,
         "ref_name": "bare forward+backward+step on one fixed batch", "target": "within 5% (issue 2)",
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


def bench_pgd(model, data, n: int, bs: int = 1000) -> list[dict]:
    x, y = data.test_x[:n], data.test_y[:n]
    total_flops = attack_flops(model, x[:bs], y[:bs]) * 40 * n
    t_ours, adv = timed(pgd_ours, model, x, y, bs)
    t_ta, adv_ta = timed(pgd_torchattacks, model, x, y, bs)
    t_bare, _ = timed(pgd_bare, model, x, y, bs)
    with torch.no_grad():
        acc = (model(adv).argmax(1) == y).float().mean().item() * 100
        acc_ta = (model(adv_ta).argmax(1) == y).float().mean().item() * 100
    what = f"PGD-40 eps 0.3, improved-bn, {n} test images, batch {bs}"
    return [
        {"workload": what, "ours": t_ours, "reference": t_ta, "ref_name": "torchattacks 3.5.1 PGD",
         "target": ">= 3x (issue 7)", "flops": total_flops,
         "note": f"robust accuracy {acc:.1f}% (torchattacks {acc_ta:.1f}%)"},
        {"workload": what, "ours": t_ours, "reference": t_bare,
         "ref_name": "bare loop: 40 forward + input-gradient passes", "target": "within 10% (issue 3)",
         "flops": total_flops},
    ]


def bench_zoo(data, n: int) -> list[dict]:
    rows = []
    x, y = data.test_x[:n], data.test_y[:n]
    for name in list_models():
        torch.manual_seed(0)
        model = create_model(name).eval()
        t_ours, _ = timed(pgd_ours, model, x, y, n)
        t_ta, _ = timed(pgd_torchattacks, model, x, y, n)
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


def bench_penalty(model, data, steps: int, ref_steps: int) -> list[dict]:
    idx = torch.stack([(data.test_y == d).nonzero()[0, 0] for d in range(10)])
    x_t, target = data.test_x[idx], (data.test_y[idx] + 1) % 10
    t_ours, adv = timed(penalty, model, x_t, target, eta=0.1, lam=0.05, steps=steps,
                        generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for d in range(10):
        plain_penalty(model, x_t[d:d + 1], target[d:d + 1], ref_steps, torch.Generator().manual_seed(d))
    t_ref = (time.perf_counter() - start) * steps / ref_steps
    with torch.no_grad():
        reached = (model(adv).argmax(1) == target).sum().item()
    scaled = "" if ref_steps == steps else f"; reference timed for {ref_steps} steps a digit, scaled"
    return [{"workload": f"penalty attack, 10 digits x {steps} steps", "ours": t_ours, "reference": t_ref,
             "ref_name": "the same update, one digit at a time", "target": "<= 15 s, >= 20x (issue 7); >= 10x (issue 3)",
             "flops": attack_flops(model, x_t, target) * 10 * steps,
             "note": f"{reached}/10 digits reach their target{scaled}"}]


def trained_improved_bn(data) -> nn.Module:
    """A briefly trained improved-bn (speed does not depend on accuracy; attacks must still work)."""
    torch.manual_seed(0)
    model = create_model("improved-bn")
    train_epoch(model, sgd(model), data.train_x[:20000], data.train_y[:20000], 64, torch.Generator().manual_seed(0))
    return model.eval()


def render(rows: list[dict], argv: list[str], started: float) -> str:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
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
    args = ap.parse_args()
    started = time.perf_counter()
    parts = args.only or ["train", "pgd", "zoo", "penalty"]
    data = load_mnist()
    steps = 200 if args.quick else 10000
    model = trained_improved_bn(data) if {"pgd", "penalty"} & set(parts) else None
    rows: list[dict] = []
    if "train" in parts:
        rows += bench_train(data, 50 if args.quick else None)
    if "pgd" in parts:
        rows += bench_pgd(model, data, 1000 if args.quick else 10000)
    if "zoo" in parts:
        rows += bench_zoo(data, 200 if args.quick else 1000)
    if "penalty" in parts:
        rows += bench_penalty(model, data, steps, args.penalty_ref_steps or steps)
    text = render(rows, sys.argv[1:], started)
    print(text)
    if not args.quick:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
