"""fp32 against bf16 autocast (`train --precision bf16`) for IBP training steps, side by side.

Times `train_epoch` itself (clean pass, IBP bounds at eps 0.3 with kappa 0.75, backward, Adam) over
`--steps` batches of 100 test images, in alternating blocks of fp32 and bf16 within one process,
and prints the median time a step of each and their ratio. bfloat16 matrix products are fast only
where the CPU has them (AVX512-BF16 or AMX); elsewhere the ratio can fall below 1.

    python benchmarks/precision.py [--model strided-large] [--blocks 7] [--steps 20]

It prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from advmnist.data import load_mnist
from advmnist.models import create_model
from advmnist.names import PRECISIONS
from advmnist.runs import provenance
from advmnist.train import ibp_loss, train_epoch

BATCH = 100


def block(model, optimizer, x, y, precision: str) -> float:
    """Seconds a step over one pass of `train_epoch` through (x, y)."""
    start = time.perf_counter()
    train_epoch(model, optimizer, x, y, BATCH, torch.Generator().manual_seed(0), precision=precision,
                loss_fn=lambda m, xb, yb, eps: ibp_loss(m, xb, yb, eps, 0.75), eps_schedule=lambda done: 0.3)
    return (time.perf_counter() - start) / (len(y) // BATCH)


def bf16_in_hardware() -> bool | None:
    info = Path("/proc/cpuinfo")
    return (" avx512_bf16" in (text := info.read_text()) or " amx_bf16" in text) if info.exists() else None


def main() -> None:
    from bench import cpu_name  # this folder's bench.py: the same machine name

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="strided-large")
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    data = load_mnist()
    x, y = data.test_x[:BATCH * args.steps], data.test_y[:BATCH * args.steps]
    torch.manual_seed(0)
    model = create_model(args.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = {p: [] for p in PRECISIONS}
    for precision in times:  # warm-up: oneDNN picks its kernels on the first calls
        block(model, optimizer, x[:3 * BATCH], y[:3 * BATCH], precision)
    for _ in range(args.blocks):
        for precision in times:
            times[precision].append(block(model, optimizer, x, y, precision))
    fp32, bf16 = (statistics.median(times[p]) for p in ("fp32", "bf16"))
    print(json.dumps({**vars(args), "cpu": cpu_name(), "bf16_in_hardware": bf16_in_hardware(),
                      **{k: provenance()[k] for k in ("threads", "torch", "commit")},
                      "fp32_ms_per_step": round(1000 * fp32, 1), "bf16_ms_per_step": round(1000 * bf16, 1),
                      "speed_up": round(fp32 / bf16, 2)}))


if __name__ == "__main__":
    main()
