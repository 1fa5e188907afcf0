"""Running an attack over a selection of images: the one path every attack run takes.

`execute_attack` runs any registered attack (`advmnist.attacks`) on the given images in batches,
in eval mode, with a seeded generator, and measures the result (`advmnist.measures.attack_measures`).
`advmnist attack` (`advmnist/attacking.py`), the experiment runner and its transfer matrix
(`advmnist/experiments/runner.py`) and the stages of the robust evaluation (`advmnist/robustness.py`)
all call it. `select` picks test images (and targets) the way `advmnist attack` does, and
`check_params` refuses a parameter the attack does not take, before any work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import validate
from .attacks import AttackError, AttackSpec, get_attack
from .data import MNIST
from .errors import InvalidValue
from .measures import attack_measures, eval_mode

#: Keyword arguments the runner supplies itself; a user's parameters never set them.
SUPPLIED = ("generator", "callback", "targeted")


def parse_target_map(spec: str) -> Callable[[int], list[int]]:
    """'next' (d -> d+1), 'prev' (d -> d-1), 'all' (every other digit) or pairs '0:3,1:7' (checked by
    `advmnist.validate.parse_target_map`: digits 0-9, no digit sent to itself)."""
    try:
        parsed = validate.parse_target_map(spec)
    except InvalidValue as exc:
        raise AttackError(str(exc)) from None
    if parsed == "next":
        return lambda s: [(s + 1) % 10]
    if parsed == "prev":
        return lambda s: [(s - 1) % 10]
    if parsed == "all":
        return lambda s: [t for t in range(10) if t != s]
    return lambda s: parsed.get(s, [])


def select_examples(data: MNIST, *, per_digit: int | None = None, limit: int | None = None) -> torch.Tensor:
    """Indices into the test set: the first `per_digit` images of each digit, or the first `limit`."""
    if per_digit is not None:
        if per_digit < 1:
            raise AttackError(f"--per-digit must be >= 1, got {per_digit}")
        return torch.cat([(data.test_y == d).nonzero().flatten()[:per_digit] for d in range(10)])
    n = len(data.test_y) if not limit else min(limit, len(data.test_y))
    if n < 1:
        raise AttackError("--limit must be >= 1")
    return torch.arange(n, device=data.test_y.device)


@dataclass(frozen=True)
class Selection:
    """Which test images an attack runs on: one row per (image, target) pair."""

    indices: torch.Tensor  # (N,) into the test set; an image appears once per target
    target: torch.Tensor | None  # (N,) target labels of a targeted attack; None: untargeted


def select(data: MNIST, *, per_digit: int | None = None, limit: int | None = None, targeted: bool = False,
           target_map: str = "next") -> Selection:
    """`select_examples`, and for a targeted attack one row per target `target_map` gives each image."""
    idx = select_examples(data, per_digit=per_digit, limit=limit)
    if not targeted:
        return Selection(idx, None)
    mapping = parse_target_map(target_map)
    rows, targets = [], []
    for i, s in zip(idx.tolist(), data.test_y[idx].tolist()):
        for t in mapping(s):
            rows.append(i)
            targets.append(t)
    if not rows:
        raise AttackError("the target map gives no target for the chosen digits")
    return Selection(torch.tensor(rows, device=idx.device), torch.tensor(targets, device=idx.device))


def check_params(method: str, params: dict, *, noun: str = "option") -> AttackSpec:
    """The attack's registry entry, once every key of `params` is one of its keyword-only parameters
    (and none the runner supplies) and every value is finite and in range (`validate.ATTACK_PARAMS`)."""
    spec = get_attack(method)
    accepted = spec.defaults()
    for key in params:
        if key not in accepted or key in SUPPLIED:
            raise AttackError(f"attack {method!r} takes no {noun} {key!r}")
    try:  # finite and in range: an eps of NaN would "fool" every image, 0 steps would do nothing
        validate.check_fields(params, validate.ATTACK_PARAMS)
    except InvalidValue as exc:
        raise AttackError(str(exc)) from None
    return spec


@dataclass(frozen=True)
class AttackRun:
    """What `execute_attack` gives back."""

    x_adv: torch.Tensor  # (N, C, H, W) in [0, 1], on the device of x
    params: dict  # every keyword-only parameter the attack ran with, defaults filled in (no generator, callback)
    seconds: float  # the attack alone, measuring not included
    measures: dict | None  # attack_measures(model, x, y, x_adv, target); None with measure=False


def batch_size_for(device: torch.device) -> int:
    """Images an attack works on at once: 1000 on a CPU, where larger batches gain nothing; 10,000 on a
    CUDA GPU, where a batch of 1000 leaves it waiting on kernel launches (the test set in one batch)."""
    return 10000 if device.type == "cuda" else 1000


def execute_attack(model: nn.Module, method: str, x: torch.Tensor, y: torch.Tensor, *,
                   target: torch.Tensor | None = None, params: dict | None = None, seed: int = 0,
                   batch_size: int | None = None, measure: bool = True, reseed_each_batch: bool = False,
                   progress: bool = False, label: str = "") -> AttackRun:
    """Run the registered attack `method` on (x, y) in batches of `batch_size`, in eval mode.

    x: clean images (or each example's x_target) in [0, 1]; y: their true labels; target: target
    labels for a targeted selection (an always-targeted attack such as penalty needs them). The
    attack receives `target` where given, else `y`, and `targeted=True` with a target if it takes that
    keyword and `params` does not set it. A generator seeded with `seed` is created once and shared
    by the batches (`reseed_each_batch`: a fresh one per batch, as `robustness.pgd_accuracy` has
    always drawn). `batch_size` None: `batch_size_for` the device. Batches of at most `batch_size` leave every result of a selection that size or
    smaller exactly as one call on all of it. `progress` shows a bar over the attack's steps where
    it takes a callback.
    """
    spec = get_attack(method)
    accepted = spec.defaults()
    kwargs = dict(params or {})
    if "targeted" in accepted and "targeted" not in kwargs:
        kwargs["targeted"] = target is not None and not spec.always_targeted
    goal = y if target is None else target
    n = len(x)
    batch_size = batch_size or batch_size_for(x.device)
    batches = [slice(i, i + batch_size) for i in range(0, n, batch_size)]
    total = int(kwargs.get("steps", accepted.get("steps", 0)) or 0) * int(kwargs.get("restarts", 1)) * len(batches)
    used = {k: v for k, v in {**accepted, **kwargs}.items() if k not in ("generator", "callback")}
    generator = torch.Generator().manual_seed(seed) if "generator" in accepted else None
    start = time.perf_counter()
    with eval_mode(model), tqdm(total=total, desc=f"{method} {label}".strip(), unit="step", leave=False,
                                disable=not progress or not total or "callback" not in accepted) as bar:
        if "callback" in accepted and progress:
            kwargs["callback"] = lambda step, _x: bar.update(1)
        parts = []
        for part in batches:
            if generator is not None:
                kwargs["generator"] = torch.Generator().manual_seed(seed) if reseed_each_batch else generator
            parts.append(spec.fn(model, x[part], goal[part], **kwargs))
        x_adv = torch.cat(parts) if parts else x.clone()
        seconds = time.perf_counter() - start
        measures = attack_measures(model, x, y, x_adv, target) if measure and n else None
    return AttackRun(x_adv, used, seconds, measures)
