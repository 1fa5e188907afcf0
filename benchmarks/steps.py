"""One attack step (forward + input gradient) per zoo model: the fast path with and without the
fused first conv + pool (`_ConvPool`), and autograd, side by side in one process.

    python benchmarks/steps.py [--batch 1000] [--threads 2]

Each figure is the best of three timings of a few steps on random weights and images (speed does
not depend on them). The allocator setting (advmnist/memory.py) is on for all three columns.
"""

import argparse
import time

import torch

from advmnist.attacks import fast, input_grad
from advmnist.memory import keep_freed_memory
from advmnist.models import create_model, list_models


def best_ms(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps * 1000)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    n = args.batch
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    reps = max(3, 3000 // n)
    print(f"batch {n}, {args.threads} thread(s), ms per step (best of 3)")
    print(f"{'model':<12} {'fused':>8} {'unfused':>8} {'autograd':>9} {'fused/unfused':>14}")
    for name in list_models():
        model = create_model(name).eval()
        for q in model.parameters():
            q.requires_grad_(False)
        fused, unfused = fast.compile_grad(model, x[:1]), fast.compile_grad(model, x[:1], fuse=False)
        t_f, t_u = best_ms(lambda: fused(x, y), reps), best_ms(lambda: unfused(x, y), reps)
        t_a = best_ms(lambda: input_grad(model, x, y), reps)
        print(f"{name:<12} {t_f:8.1f} {t_u:8.1f} {t_a:9.1f} {t_u / t_f:13.2f}x", flush=True)


if __name__ == "__main__":
    main()
