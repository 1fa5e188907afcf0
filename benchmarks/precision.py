"""fp32 against bf16 autocast (`train --precision bf16`) for one IBP training step, side by side.

Times the optimizer step of `train_epoch` (clean pass, IBP bounds, backward, Adam) on one fixed
batch of 100 test images, in alternating blocks of fp32 and bf16 steps within one process, and
prints the median step time of each and their ratio. bfloat16 matrix products are fast only where
the CPU has them (AVX512-BF16 or AMX); elsewhere the ratio can fall below 1.

    python benchmarks/precision.py [--model strided-large] [--blocks 7] [--steps 20]

It prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from advmnist.data import load_mnist
from advmnist.models import create_model
from advmnist.train import ibp_loss


def cpu() -> dict:
    """The CPU's name and whether it multiplies bfloat16 in hardware (Linux; elsewhere the platform's name)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return {"cpu": platform.processor() or platform.machine()}
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    return {"cpu": name, "bf16_in_hardware": " avx512_bf16" in info or " amx_bf16" in info}


def block(model, optimizer, x, y, precision: str, steps: int) -> float:
    """Seconds per step over `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = ibp_loss(model, x, y, 0.3, 0.75)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="strided-large")
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    data = load_mnist()
    x, y = data.test_x[:100], data.test_y[:100]
    torch.manual_seed(0)
    model = create_model(args.model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = {"fp32": [], "bf16": []}
    for precision in times:  # warm-up: oneDNN picks its kernels on the first calls
        block(model, optimizer, x, y, precision, 3)
    for _ in range(args.blocks):
        for precision in times:
            times[precision].append(block(model, optimizer, x, y, precision, args.steps))
    fp32, bf16 = (statistics.median(times[p]) for p in ("fp32", "bf16"))
    print(json.dumps({**vars(args), "threads": torch.get_num_threads(), **cpu(),
                      "torch": torch.__version__, "fp32_ms_per_step": round(1000 * fp32, 1),
                      "bf16_ms_per_step": round(1000 * bf16, 1), "speed_up": round(fp32 / bf16, 2)}))


if __name__ == "__main__":
    main()
