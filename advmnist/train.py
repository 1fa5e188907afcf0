"""The training loop: whole-tensor batches sliced by index, the report's recipe, seeded.

The dataset lives on the device as tensors; each epoch draws one permutation from a seeded
generator and slices batches from it, so there is no DataLoader, no per-sample transform and no
worker process, and the same seed gives the same weights.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import runs
from .data import MNIST, load_mnist
from .errors import AdvmnistError
from .measures import evaluate
from .models import Recipe, create_model, get_spec


def pick_device(name: str = "auto") -> torch.device:
    """'auto' means cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AdvmnistError(f"unknown device {name!r}; use auto, cpu, cuda or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AdvmnistError("device 'cuda' asked for, but no CUDA GPU is available")
    return device


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                               weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    raise AdvmnistError(f"unknown optimizer {recipe.optimizer!r}; use sgd or adam")


def check_recipe(recipe: Recipe) -> None:
    if recipe.lr <= 0:
        raise AdvmnistError(f"learning rate must be positive, got {recipe.lr}")
    if recipe.batch_size < 1 or recipe.epochs < 1:
        raise AdvmnistError("batch size and epochs must be at least 1")
    if recipe.dropout is not None and not 0.0 <= recipe.dropout < 1.0:
        raise AdvmnistError(f"dropout must be in [0, 1), got {recipe.dropout}")
    if recipe.momentum < 0:
        raise AdvmnistError(f"momentum must be >= 0, got {recipe.momentum}")
    if recipe.optimizer not in ("sgd", "adam"):
        raise AdvmnistError(f"unknown optimizer {recipe.optimizer!r}; use sgd or adam")


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                batch_size: int, generator: torch.Generator, progress: tqdm | None = None) -> dict:
    """One pass over (x, y) in a seeded random order; returns mean loss and accuracy (%)."""
    model.train()
    n = len(x)
    order = torch.randperm(n, generator=generator).to(x.device)
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        xb, yb = x[idx], y[idx]
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.detach().argmax(1) == yb).sum()
        if progress is not None:
            progress.update(len(idx))
    return {"train_loss": loss_sum.item() / n, "train_accuracy": 100.0 * correct.item() / n}


def fit(model: nn.Module, data: MNIST, recipe: Recipe, *, seed: int = 0, progress: bool = False,
        on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `model` on data.train with `recipe`, testing after every epoch; returns the history."""
    check_recipe(recipe)
    torch.manual_seed(seed)  # dropout draws from the global generator
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, recipe)
    history = []
    for epoch in range(1, recipe.epochs + 1):
        start = time.perf_counter()
        with tqdm(total=len(data.train_x), desc=f"epoch {epoch}/{recipe.epochs}", unit="img",
                  disable=not progress, leave=False) as bar:
            stats = train_epoch(model, optimizer, data.train_x, data.train_y, recipe.batch_size,
                                generator, bar)
        train_seconds = time.perf_counter() - start
        test = evaluate(model, data.test_x, data.test_y)
        stats = {"epoch": epoch, **stats, "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                 "seconds": round(train_seconds, 3)}
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    return history


def resolve_recipe(name: str, **overrides) -> Recipe:
    """The model's recipe with every non-None override applied."""
    recipe = get_spec(name).recipe
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "dropout" in changes and recipe.dropout is None and changes["dropout"] != 0:
        raise AdvmnistError(f"model {name!r} has no dropout option")
    recipe = dataclasses.replace(recipe, **changes)
    check_recipe(recipe)
    return recipe


def train_run(name: str, *, out: str | Path = "runs", seed: int = 0, device: str = "auto",
              data: MNIST | None = None, data_dir: str | None = None, progress: bool = False,
              on_epoch: Callable[[dict], None] | None = None, **overrides) -> Path:
    """Train a zoo model with its recipe (plus overrides) and write a finished run directory.

    The directory holds `model.pt` (weights, `torch.load(weights_only=True)`), `record.json`
    (model, recipe, seed, history, accuracy, data checksum, versions, wall time) and `curves.png`.
    """
    from .pictures import plot_curves

    recipe = resolve_recipe(name, **overrides)
    options = {"dropout": recipe.dropout} if recipe.dropout is not None else {}
    dev = pick_device(device)
    if data is None:
        data = load_mnist(data_dir)
    data = data.to(dev)
    wall = time.perf_counter()
    torch.manual_seed(seed)
    model = create_model(name, **options).to(dev)  # initial weights drawn from the seeded generator
    history = fit(model, data, recipe, seed=seed, progress=progress, on_epoch=on_epoch)
    final = evaluate(model, data.test_x, data.test_y)
    run_name = runs.new_run_name(name, seed)
    with runs.run_directory(out, run_name) as tmp:
        sha = runs.save_checkpoint(tmp / runs.CHECKPOINT, model.cpu(), name, options)
        record = {
            "kind": "train", "model": name, "options": options, "recipe": dataclasses.asdict(recipe),
            "seed": seed, "device": str(dev), "n_train": len(data.train_x), "n_test": len(data.test_x),
            "data_checksum": data.checksum, "history": history,
            "test_accuracy": final["accuracy"], "test_loss": final["loss"],
            "per_class_accuracy": final["per_class_accuracy"], "checkpoint_sha256": sha,
            "reported_accuracy": get_spec(name).reported_accuracy,
            "wall_time_s": round(time.perf_counter() - wall, 2), "provenance": runs.provenance(),
            "finished": runs.provenance()["time"], "run": run_name,
        }
        plot_curves(history, tmp / "curves.png", title=f"{name} (seed {seed})")
        runs.write_json(tmp / runs.RECORD, record)
    return Path(out) / run_name
