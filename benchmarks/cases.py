"""The command line, worker processes and loading that autoattack.py, oracle.py and square_gap.py
share: the first two compare advmnist with torchattacks on given training runs
(`--case NAME=RUN_DIR:EPS`), every side in a fresh
Python process (advmnist/memory.py changes a process-wide allocator setting, which a side run after
it in the same process would get for free)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def arguments(description: str, n: int) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--case", action="append", default=[], help="NAME=RUN_DIR:EPS")
    ap.add_argument("--n", type=int, default=n, help="the first N test images")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave results.md alone")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap


def load(run: str, n: int):
    """(model in eval mode, its checkpoint record, the first n test images, their labels)."""
    from advmnist.data import load_mnist
    from advmnist.runs import load_checkpoint

    model, ckpt = load_checkpoint(run)
    model.eval()
    data = load_mnist()
    return model, ckpt, data.test_x[:n], data.test_y[:n]


def split(case: str) -> tuple[str, str, float]:
    name, rest = case.split("=", 1)
    run, eps = rest.rsplit(":", 1)
    return name, run, float(eps)


def worker(script: str, **kw) -> dict:
    """Run `script --worker JSON` in a fresh process; its last stdout line is the JSON result."""
    out = subprocess.run([sys.executable, script, "--worker", json.dumps(kw)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"worker {kw} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def publish(text: str, begin: str, end: str, write: bool) -> None:
    print(text)
    if write:
        from bench import write_section  # this folder's bench.py (imports torch)

        write_section(text, begin, end)
