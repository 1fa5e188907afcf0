"""Pictures drawn from records and tensors: curves, confusion matrices, galleries, feature maps.

Nothing here computes a measure; it draws what it is given. Every file is written atomically.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .runs import atomic_path  # noqa: E402


def _save(fig: "plt.Figure", path: str | os.PathLike, dpi: int = 100) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def _img(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().reshape(28, 28).numpy()


def plot_curves(history: Sequence[dict], path: str | os.PathLike, title: str = "") -> None:
    """Loss and accuracy per epoch, train against test."""
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
    ax1.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax2.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    ax2.plot(epochs, [h["test_accuracy"] for h in history], "s-", label="test")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_confusion(confusion: Sequence[Sequence[int]], path: str | os.PathLike, title: str = "") -> None:
    """Confusion matrix with counts; the diagonal dominates, so colours use a log scale."""
    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(np.log1p(cm), cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 4 else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=title or "confusion matrix")
    fig.colorbar(im, ax=ax, label="log(1 + count)")
    _save(fig, path)


def prediction_gallery(images: torch.Tensor, labels: Sequence[int], preds: Sequence[int],
                       confidences: Sequence[float], path: str | os.PathLike, title: str = "",
                       columns: int = 8) -> None:
    """A grid of images titled 'true -> predicted (confidence)'; wrong ones in red."""
    n = len(images)
    if n == 0:
        return
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.85 * rows + 0.4), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(_img(images[k]), cmap="gray", vmin=0, vmax=1)
        ok = labels[k] == preds[k]
        ax.set_title(f"{labels[k]} -> {preds[k]} ({confidences[k]:.0%})", fontsize=8,
                     color="black" if ok else "crimson")
    if title:
        fig.suptitle(title)
    _save(fig, path)


def feature_maps(maps: dict[str, torch.Tensor], image: torch.Tensor, path: str | os.PathLike,
                 title: str = "", max_maps: int = 32) -> None:
    """The input image and, per conv layer, up to `max_maps` of its output channels."""
    rows = 1 + len(maps)
    cols = min(max_maps, max([m.shape[0] for m in maps.values()] + [1]))
    cols = max(cols, 1)
    fig, axes = plt.subplots(rows, cols, figsize=(0.9 * cols + 1.5, 1.05 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(_img(image), cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title("input", fontsize=8)
    for r, (name, fm) in enumerate(maps.items(), start=1):
        for c in range(min(cols, fm.shape[0])):
            axes[r, c].imshow(fm[c].detach().cpu().numpy(), cmap="viridis")
        axes[r, 0].set_title(f"{name} {tuple(fm.shape)}", fontsize=8, loc="left")
    if title:
        fig.suptitle(title)
    _save(fig, path)


def write_html(path: str | os.PathLike, title: str, body: str) -> None:
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; font-size: 14px; }}
th {{ background: #f3f3f3; }}
td.l, th.l {{ text-align: left; }}
section {{ border-top: 2px solid #ddd; padding-top: 0.5em; margin-top: 1.5em; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
.thumbs img {{ width: 84px; image-rendering: pixelated; margin: 2px; }}
code {{ background: #f6f6f6; padding: 1px 4px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{body}
</body></html>
"""
    with atomic_path(path) as tmp:
        tmp.write_text(page)
