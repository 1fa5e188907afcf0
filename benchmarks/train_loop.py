"""Training throughput: advmnist's whole-tensor loop vs the reports' torchvision DataLoader loop.

Trains improved-bn (SGD 0.01, momentum 0.5, batch 64: the report's recipe) for the same number of
batches three ways in one process, and prints images/s and the ratios:
  reference  torchvision MNIST + ToTensor/Normalize transforms + DataLoader(shuffle=True), and the
             model as the report wrote it: plain nn.Conv2d layers (no WholeMapConv2d matmul path)
  advmnist   advmnist.train.train_epoch: tensors on the device, batches sliced from a permutation
  bare       forward + backward + step on one pre-sliced batch, no data handling at all (the floor)

    python benchmarks/train_loop.py [--batches 400] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from advmnist.data import BUNDLED_DIR, FILES, load_mnist
from advmnist.models import WholeMapConv2d, create_model
from advmnist.train import train_epoch


def fresh(normalise_inside: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = create_model("improved-bn")
    if not normalise_inside:  # the report's model: normalised by the transform, plain convolutions
        model.norm = nn.Identity()
        for m in model.modules():
            if isinstance(m, WholeMapConv2d):
                m.__class__ = nn.Conv2d
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)


def reference(batches: int, batch_size: int) -> float:
    from torchvision import datasets, transforms

    with tempfile.TemporaryDirectory() as root:
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for stem in FILES:
            (raw / stem).write_bytes(gzip.decompress((BUNDLED_DIR / f"{stem}.gz").read_bytes()))
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        ds = datasets.MNIST(root, train=True, transform=tf, download=False)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True)
        model, opt = fresh(normalise_inside=False)
        model.train()
        start = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            if i == batches:
                break
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - start


def ours(batches: int, batch_size: int) -> float:
    data = load_mnist()
    x, y = data.train_x[: batches * batch_size], data.train_y[: batches * batch_size]
    model, opt = fresh(normalise_inside=True)
    start = time.perf_counter()
    train_epoch(model, opt, x, y, batch_size, torch.Generator().manual_seed(0))
    return time.perf_counter() - start


def bare(batches: int, batch_size: int) -> float:
    data = load_mnist()
    x, y = data.train_x[:batch_size].clone(), data.train_y[:batch_size].clone()
    model, opt = fresh(normalise_inside=True)
    model.train()
    start = time.perf_counter()
    for _ in range(batches):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median counts")
    args = ap.parse_args()
    n = args.batches * args.batch_size
    ours(20, args.batch_size)  # warm-up: first-call allocations
    loops = {"reference": reference, "advmnist": ours, "bare": bare}
    samples: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.repeats):
        for name, loop in loops.items():
            samples[name].append(loop(args.batches, args.batch_size))
    times = {name: sorted(ts)[len(ts) // 2] for name, ts in samples.items()}
    print(f"improved-bn, {args.batches} batches of {args.batch_size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.repeats} interleaved repeats")
    for name, t in times.items():
        print(f"  {name:<10} {t:7.2f} s  {n / t:8.0f} img/s   (all: {', '.join(f'{s:.2f}' for s in samples[name])})")
    print(f"advmnist / reference speed-up: {times['reference'] / times['advmnist']:.2f}x")
    print(f"advmnist time / bare loop:     {times['advmnist'] / times['bare']:.3f} "
          f"({100 * (times['advmnist'] / times['bare'] - 1):+.1f}%)")


if __name__ == "__main__":
    main()
