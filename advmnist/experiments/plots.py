"""The experiment page's figures, drawn from an `Outcome`: test accuracy per epoch, robust accuracy
against eps, the certified / attacked interval, and the transfer matrix. Nothing here computes a
measure."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from .. import pictures
from ..measures import robust_at
from .outcome import Outcome


def draw(o: Outcome, folder: Path) -> dict[str, str]:
    """Draw every figure the outcome has data for into `folder`; returns their file names by kind
    (curves always; robustness where an attack has an eps; interval with a robust curve; transfer)."""
    name = o.spec.name
    figures = {"curves": f"{name}_curves.png"}
    _plot_histories(o, folder / figures["curves"])
    if _plot_robustness(o, folder / f"{name}_robustness.png"):
        figures["robustness"] = f"{name}_robustness.png"
    if _plot_distances(o, folder / f"{name}_distances.png"):
        figures["distances"] = f"{name}_distances.png"
    grids = _draw_grids(o, folder)
    if grids:
        figures["grids"] = grids
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
    panels = [cols for cols in groups.values() if all(c.eps is not None and c.norm is None for c in cols)]
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


def _plot_distances(o: Outcome, path: Path) -> bool:
    """One panel per norm: the robust accuracy each untargeted minimum-norm column's distances imply, per
    variant (first seed), with the standard ensemble's fixed-eps points where the robust section is in
    that norm. Returns whether a figure was written."""
    cols = [c for c in o.columns if c.norm is not None and not _targeted(c)]
    if not cols:
        return False
    import math

    import matplotlib.pyplot as plt

    norms = list(dict.fromkeys(c.norm for c in cols))
    ncols = min(2, len(norms))
    nrows = math.ceil(len(norms) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.4 * nrows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(norms):]:
        ax.set_visible(False)
    for ax, norm in zip(axes.flat, norms):
        k = 0
        for c in (c for c in cols if c.norm == norm):
            for i, row in enumerate(o.rows):
                prof = dataclasses.asdict(c.records[i][0].distance)
                xs = [0.0] + prof["sorted"]
                ys = [robust_at(prof, x) for x in xs]
                who = c.label if len(o.rows) == 1 else f"{row.variant.label}, {c.label}"
                ax.step(xs, ys, where="post", label=f"{who} (median {_median(prof)})", **_line_style(k), ms=0)
                k += 1
        if o.curve and o.spec.robust is not None and o.spec.robust.norm == norm:
            for i, (row, recs) in enumerate(zip(o.rows, o.curve)):
                who = "standard ensemble" if len(o.rows) == 1 else f"{row.variant.label}, standard ensemble"
                ax.plot([r.eps for r in recs], [r.robust_accuracy for r in recs], "o", ms=8, color="black",
                        label=f"{who} at fixed eps")
        ax.set(xlabel=f"eps ({norm}{', pixels changed' if norm == 'l0' else ''})", ylabel="robust accuracy (%)",
               title=f"{norm.upper()}: robust accuracy implied by each image's nearest adversarial", ylim=(-2, 102))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    pictures._save(fig, path)
    return True


def _median(prof: dict) -> str:
    return "none" if prof["median"] is None else f"{prof['median']:.3g}"


def _targeted(c) -> bool:
    from ..attacks import get_attack

    return bool(c.attack.target_map) or get_attack(c.attack.method).always_targeted


def _draw_grids(o: Outcome, folder: Path) -> list[tuple[str, str]]:
    """The source-target grid of every column with target_map "all", per variant (first seed)."""
    import torch

    drawn = []
    for j, c in enumerate(o.columns):
        for i, (row, path) in enumerate(zip(o.rows, c.grids)):
            if path is None or not path.is_file():
                continue
            grid = c.records[i][0].grid
            saved = torch.load(path, weights_only=True)
            cells = {}
            for k, (s, t) in enumerate(zip(grid["true"], grid["target"])):
                cells.setdefault((s, s), {"image": saved["x"][k], "pred": grid["clean_pred"][k], "size": None})
                cells[(s, t)] = {"image": saved["x_adv"][k], "pred": grid["adv_pred"][k],
                                 "unchanged": grid["size"][k] == 0,
                                 "size": pictures.size_text(grid["norm"], grid["size"][k])}
            name = f"{o.spec.name}_grid_{j + 1}_{i + 1}.png"
            title = f"{row.variant.label} / {c.label}: each row's digit sent to every column's target"
            pictures.target_grid(cells, folder / name, title=title)
            hit = sum(p == t for p, t in zip(grid["adv_pred"], grid["target"]))
            sizes = sorted(grid["size"][k] for k in range(len(grid["size"])) if grid["adv_pred"][k] == grid["target"][k])
            median = pictures.size_text(grid["norm"], sizes[(len(sizes) - 1) // 2]) if sizes else "none"
            drawn.append((name, f"{row.variant.label}, {c.label}: the first test image of each digit (rows) sent to "
                                f"every other digit (columns), the diagonal clean; {hit} of {len(grid['target'])} "
                                f"pairs reach their target, median size of those {median}."))
    return drawn


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
