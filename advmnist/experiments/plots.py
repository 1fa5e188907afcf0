"""The experiment page's figures, drawn from an `Outcome`: test accuracy per epoch, robust accuracy
against eps, the certified / attacked interval, and the transfer matrix. Nothing here computes a
measure."""

from __future__ import annotations

import statistics
from pathlib import Path

from .. import pictures
from .outcome import Outcome


def draw(o: Outcome, folder: Path) -> dict[str, str]:
    """Draw every figure the outcome has data for into `folder`; returns their file names by kind
    (curves always; robustness where an attack has an eps; interval with a robust curve; transfer)."""
    name = o.spec.name
    figures = {"curves": f"{name}_curves.png"}
    _plot_histories(o, folder / figures["curves"])
    if _plot_robustness(o, folder / f"{name}_robustness.png"):
        figures["robustness"] = f"{name}_robustness.png"
    if o.curve:
        figures["interval"] = f"{name}_interval.png"
        _plot_interval(o, folder / figures["interval"])
    if o.transfer is not None:
        figures["transfer"] = f"{name}_transfer.png"
        params = ", ".join(f"{k}={v}" for k, v in o.transfer.transfer.params.items())
        _plot_matrix(o.transfer.fooling, o.transfer.labels, folder / figures["transfer"],
                     f"{o.transfer.transfer.method} ({params}): fooling rate (%)")
    return figures


def _line_style(i: int) -> dict:
    """Ten colours, then the same colours dashed with square markers: no two lines look alike."""
    return {"color": f"C{i % 10}", "linestyle": "-" if i < 10 else "--", "marker": "o" if i < 10 else "s"}


def _legend(ax, below: bool) -> None:
    """Below the axes where it would cover the data (a long legend, or a band that fills the plot)."""
    ax.legend(fontsize=8, **({"loc": "upper center", "bbox_to_anchor": (0.5, -0.14)} if below else {}))


def _plot_histories(o: Outcome, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, row in enumerate(o.rows):
        recs = row.records
        epochs = [h.epoch for h in recs[0].history]
        acc = [statistics.fmean(r.history[i].test_accuracy for r in recs) for i in range(len(epochs))]
        line, = ax.plot(epochs, acc, ms=3, label=row.variant.label, **_line_style(k))
        if all(h.robust_accuracy is not None for r in recs for h in r.history):
            robust = [statistics.fmean(r.history[i].robust_accuracy for r in recs) for i in range(len(epochs))]
            ax.plot(epochs, robust, ":", marker="x", ms=4, color=line.get_color(),
                    label=f"{row.variant.label}: PGD accuracy on the monitor images")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=o.spec.title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    _legend(ax, below=len(ax.get_lines()) > 4)
    pictures._save(fig, path)


def _plot_robustness(o: Outcome, path: Path) -> bool:
    """Robust accuracy against eps, one panel per attack with an eps, clean accuracy at eps 0.
    Returns whether a figure was written (False: no attack has an eps)."""
    groups: dict[int, list] = {}
    for c in o.columns:
        groups.setdefault(c.group, []).append(c)
    panels = [cols for cols in groups.values() if all(c.eps is not None for c in cols)]
    if not panels:
        return False
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, cols in zip(axes[0], panels):
        a = cols[0].attack
        for i, row in enumerate(o.rows):
            clean = statistics.fmean(r.test_accuracy for r in row.records)
            ax.plot([0.0] + [c.eps for c in cols],
                    [clean] + [statistics.fmean(m.robust_accuracy for m in c.cells[i]) for c in cols],
                    ms=3, label=row.variant.label, **_line_style(i))
        others = ", ".join(f"{k}={val}" for k, val in a.params.items() if k != "eps")
        norm = "L2" if a.params.get("norm") == "l2" else "Linf"
        ax.set(xlabel=f"epsilon ({norm})", ylabel="robust accuracy (%)",
               title=f"{a.label or a.method}{f' ({others})' if others else ''}", ylim=(-2, 102))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    pictures._save(fig, path)
    return True


def _plot_interval(o: Outcome, path: Path) -> None:
    """Attacked (upper) and certified (lower) robust accuracy against eps, the band between shaded."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4))
    lowest = 100.0
    for i, (row, recs) in enumerate(zip(o.rows, o.curve)):
        label, style = row.variant.label, _line_style(i)
        eps = [0.0] + [x.eps for x in recs]
        attacked = [recs[0].clean_accuracy] + [x.robust_accuracy for x in recs]
        cert = [x.certified.certified_accuracy if x.certified is not None else None for x in recs]
        ax.plot(eps, attacked, ms=3, label=f"{label}: attacked", **style)
        lowest = min([lowest] + attacked)
        if all(c is not None for c in cert):
            lower = [recs[0].clean_accuracy] + cert
            lowest = min([lowest] + lower)
            ax.plot(eps, lower, ms=3, alpha=0.8, label=f"{label}: certified", **{**style, "linestyle": "--"})
            ax.fill_between(eps, lower, attacked, color=style.get("color"), alpha=0.15)
    # a band of a few points is invisible on 0-100: zoom in when every value is high
    bottom = -2.0 if lowest < 50 else max(-2.0, lowest - max(2.0, 0.15 * (100 - lowest)))
    ax.set(xlabel="epsilon (Linf)", ylabel="accuracy (%)", ylim=(bottom, 100.5),
           title="Robust accuracy: the truth lies in the shaded band")
    ax.grid(alpha=0.3)
    _legend(ax, below=True)
    pictures._save(fig, path)


def _plot_matrix(matrix, labels, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.0 * len(labels) + 2.5, 0.8 * len(labels) + 2))
    im = ax.imshow(m, cmap="magma", vmin=0, vmax=100)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if m[i, j] < 60 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="fed to", ylabel="crafted on", title=title)
    fig.colorbar(im, ax=ax, label="fooling rate (%)")
    pictures._save(fig, path)
