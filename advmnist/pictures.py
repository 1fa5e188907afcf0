"""Pictures drawn from records and tensors: curves, confusion matrices, galleries, feature maps.

Nothing here computes a measure; it draws what it is given. Every file is written atomically.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .measures import robust_at
from .runs import atomic_path, skip_file  # noqa: E402


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


def _tiles(maps: Sequence[np.ndarray], columns: int, gap: int, band: int = 0) -> tuple[np.ndarray, int, int]:
    """Equal-sized maps on one canvas, `columns` a row, `gap` pixels apart and `band` pixels of room
    above each for its caption; NaN (drawn blank) in between. One image on one axes draws in a
    fraction of the time of a grid of axes (81 of them took 2.4 s)."""
    h, w = maps[0].shape
    rows = (len(maps) + columns - 1) // columns
    cell_h, cell_w = h + gap + band, w + gap
    canvas = np.full((rows * cell_h, columns * cell_w - gap), np.nan)
    for k, m in enumerate(maps):
        r, c = divmod(k, columns)
        canvas[r * cell_h + band:r * cell_h + band + h, c * cell_w:c * cell_w + w] = m
    return canvas, cell_h, cell_w


def prediction_gallery(images: torch.Tensor, labels: Sequence[int], preds: Sequence[int],
                       confidences: Sequence[float], path: str | os.PathLike, title: str = "",
                       columns: int = 8) -> None:
    """A grid of images captioned 'true -> predicted (confidence)'; wrong ones in red."""
    n = len(images)
    if n == 0:
        return
    columns = min(columns, n)
    band = 9
    canvas, cell_h, cell_w = _tiles([_img(t) for t in images], columns, gap=6, band=band)
    width = 1.6 * columns
    fig = plt.figure(figsize=(width, width * canvas.shape[0] / canvas.shape[1]))
    ax = fig.add_axes((0, 0, 1, 1))
    cmap = plt.get_cmap("gray").with_extremes(bad="white")
    ax.imshow(canvas, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    for k in range(n):
        r, c = divmod(k, columns)
        ok = labels[k] == preds[k]
        ax.text(c * cell_w + 13.5, r * cell_h + band - 1.5, f"{labels[k]} -> {preds[k]} ({confidences[k]:.0%})",
                ha="center", va="bottom", fontsize=8, color="black" if ok else "crimson")
    if title:
        ax.set_title(title, fontsize=12, pad=4)
    _save(fig, path)


def feature_maps(maps: dict[str, torch.Tensor], image: torch.Tensor, path: str | os.PathLike,
                 title: str = "", max_maps: int = 32) -> None:
    """The input image and, per conv layer, up to `max_maps` of its output channels, each channel
    scaled to its own range."""
    rows = 1 + len(maps)
    cols = min(max_maps, max([m.shape[0] for m in maps.values()] + [1]))
    cols = max(cols, 1)
    fig, axes = plt.subplots(rows, 1, figsize=(0.9 * cols + 1.5, 1.05 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    first = axes[0, 0]
    first.imshow(_img(image), cmap="gray", vmin=0, vmax=1, extent=(-0.5, 27.5, 27.5, -0.5))
    first.set_xlim(-0.5, cols * 28 * 1.15 - 0.5)  # the input at the size of one map below
    first.set_title("input", fontsize=8, loc="left")
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    for r, (name, fm) in enumerate(maps.items(), start=1):
        chosen = fm[:cols].detach().float().cpu().numpy()
        low = chosen.min(axis=(1, 2), keepdims=True)
        span = chosen.max(axis=(1, 2), keepdims=True) - low
        scaled = np.where(span > 0, (chosen - low) / np.where(span > 0, span, 1), 0.0)
        canvas, _, _ = _tiles(list(scaled), cols, gap=max(1, round(fm.shape[-1] * 0.15)))
        axes[r, 0].imshow(canvas, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        axes[r, 0].set_title(f"{name} {tuple(fm.shape)}", fontsize=8, loc="left")
    if title:
        fig.suptitle(title)
    _save(fig, path)


def write_html(path: str | os.PathLike, title: str, body: str) -> None:
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1500px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; font-size: 14px; }}
th {{ background: #f3f3f3; }}
td.l, th.l {{ text-align: left; }}
section {{ border-top: 2px solid #ddd; padding-top: 0.5em; margin-top: 1.5em; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
.pics img {{ width: auto; height: auto; }}
.thumbs {{ display: flex; flex-wrap: wrap; gap: 6px; max-width: 760px; }}
.thumbs img {{ width: 112px; height: 112px; image-rendering: pixelated; }}
.thumbs figcaption {{ font-weight: normal; font-size: 13px; text-align: center; }}
.pics {{ display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }}
.run {{ display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }}
figure {{ margin: 0; }}
figcaption {{ font-weight: bold; font-size: 14px; }}
code {{ background: #f6f6f6; padding: 1px 4px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{body}
</body></html>
"""
    with atomic_path(path) as tmp:
        tmp.write_text(page)


def digit_png(image: torch.Tensor, path: str | os.PathLike, scale: int = 10) -> None:
    """One image as a grey PNG, each pixel a scale x scale block so a person can see it."""
    arr = np.kron(np.clip(_img(image), 0, 1), np.ones((scale, scale)))
    with atomic_path(path) as tmp:
        plt.imsave(tmp, arr, cmap="gray", vmin=0, vmax=1, format="png")


def _from_noise(params: dict) -> bool:
    """An attack that starts from noise (the penalty attack's default): its images were never the clean
    ones, so the share "still classified correctly" is no robust accuracy."""
    return params.get("init") == "noise"


def attack_gallery(rows: Sequence[dict], path: str | os.PathLike, title: str = "",
                   columns: Sequence[str] = ("clean image", "adversarial image", "perturbation")) -> None:
    """Rows of (reference image, adversarial image, perturbation on a diverging map), under column headers.

    Each row dict: ref, adv (tensors), ref_title, adv_title, delta_title. 750 px wide with 10-point
    labels: the attack index shows it at this natural size, where every label reads.
    """
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.4 * len(rows) + 1.2), squeeze=False,
                             layout="constrained")
    bound = max(float((r["adv"] - r["ref"]).abs().max()) for r in rows) or 1.0
    for ax_row, r in zip(axes, rows):
        delta = _img(r["adv"]) - _img(r["ref"])
        ax_row[0].imshow(_img(r["ref"]), cmap="gray", vmin=0, vmax=1)
        ax_row[1].imshow(_img(r["adv"]), cmap="gray", vmin=0, vmax=1)
        im = ax_row[2].imshow(delta, cmap="RdBu_r", vmin=-bound, vmax=bound)
        for ax, key in zip(ax_row, ("ref_title", "adv_title", "delta_title")):
            ax.set_title(r[key], fontsize=10, color=r.get(key + "_color", "black"))
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, header in zip(axes[0], columns):
        ax.annotate(header, xy=(0.5, 1.0), xycoords="axes fraction", xytext=(0, 20), textcoords="offset points",
                    ha="center", va="bottom", fontsize=11, fontweight="bold")
    fig.colorbar(im, ax=axes, location="bottom", shrink=0.6, aspect=35, label="perturbation: adversarial - reference")
    if title:
        fig.suptitle(title, fontsize=12)
    _save(fig, path)


def size_text(norm: str, value: float) -> str:
    """A perturbation size as the papers print it: pixels changed for L0, else the norm's value."""
    return f"{int(round(value))} px" if norm == "l0" else f"{norm.upper()} {value:.2f}"


def target_grid(cells: dict[tuple[int, int], dict], path: str | os.PathLike, title: str = "") -> None:
    """Source digit rows x target digit columns, as in Papernot et al. 2016 and Carlini & Wagner 2017.

    cells[(s, t)]: {"image", "pred", "size"} (size: text, or None on the diagonal, which holds the
    clean image; "unchanged": the attack gave the image back untouched, having found nothing). Each
    cell is labelled with the model's prediction and the perturbation size; a cell whose prediction is
    not its column's target is labelled in red.
    """
    fig, axes = plt.subplots(10, 10, figsize=(11, 12.4), layout="constrained")
    for s in range(10):
        for t in range(10):
            ax = axes[s, t]
            ax.set_xticks([])
            ax.set_yticks([])
            cell = cells.get((s, t))
            if cell is not None:
                ax.imshow(_img(cell["image"]), cmap="gray", vmin=0, vmax=1)
                missed = s != t and cell["pred"] != t
                size = "not reached" if missed and cell.get("unchanged") else cell.get("size")
                label = f"pred {cell['pred']}" + (f"\n{size}" if size else "\n(clean)")
                ax.set_xlabel(label, fontsize=8, color="crimson" if missed else "black", labelpad=2)
            if s == 0:
                ax.set_title(f"target {t}", fontsize=10)
            if t == 0:
                ax.set_ylabel(f"digit {s}", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=12)
    _save(fig, path)


def plot_distance_curve(curves: dict[str, dict], path: str | os.PathLike, title: str = "",
                        points: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                        norm: str | None = None) -> None:
    """Robust accuracy against eps implied by minimum-norm distance profiles (step curves, median
    marked), with fixed-eps evaluations drawn as points on the same axes where given."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    top = 0.0
    for label, prof in curves.items():
        xs = [0.0] + list(prof["sorted"])
        ys = [robust_at(prof, x) for x in xs]
        end = (max(xs) if xs else 1.0) * 1.1 or 1.0
        top = max(top, end)
        line, = ax.step(xs + [end], ys + [ys[-1]], where="post", label=label)
        if prof.get("median") is not None:
            ax.axvline(prof["median"], color=line.get_color(), ls=":", lw=1)
            ax.annotate(f"median {prof['median']:.3g}", (prof["median"], 50), textcoords="offset points",
                        xytext=(4, 4), fontsize=8, color=line.get_color())
    for label, (eps, acc) in (points or {}).items():
        ax.plot(eps, acc, "o", ms=7, label=label)
        top = max([top, *eps])
    norms = {p["norm"] for p in curves.values()} | ({norm} if norm else set())
    ax.set(xlabel=f"eps ({', '.join(sorted(norms))})", ylabel="robust accuracy (%)", title=title,
           ylim=(-2, 102), xlim=(0, top or 1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    _save(fig, path)


def plot_sweep(eps: Sequence[float], series: dict[str, Sequence[float]], path: str | os.PathLike,
               title: str = "", ylabel: str = "robust accuracy (%)") -> None:
    """Accuracy against epsilon, one line per series."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        ax.plot(eps, values, "o-", label=label)
    ax.set(xlabel="epsilon", ylabel=ylabel, title=title, ylim=(-2, 102))
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def _fmt(v, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def _cell(v, spec: str = ".1f") -> str:
    """A number formatted, anything else (a tampered record) as escaped text."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, spec)
    return "–" if v is None else html.escape(str(v))


def _link(base: Path, rel: str, name) -> str | None:
    """A relative URL ("./...") to base/rel/name if that is a file inside `base`, else None: a record
    cannot point the page at `../`, at an absolute path or at a `javascript:` URL."""
    if not isinstance(name, str) or not name:
        return None
    root = base.resolve()
    try:
        target = (base / rel / name).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if not target.is_relative_to(root) or not target.is_file():
        return None
    return "./" + quote(target.relative_to(root).as_posix())


_DIGIT_FILE = re.compile(r"digit_(\d)_as_(\d)\.png$")


def _params_table(rec: dict) -> str:
    """The run's parameters as a two-column table: the attack's keywords (those of the first point; a
    sweep's values listed), the image selection and the seed. Every value is escaped."""
    e = html.escape
    results = rec["results"]
    swept = {k: [r["sweep_params"].get(k) for r in results] for k in results[0]["sweep_params"]}
    rows = [("method", rec["method"])]
    rows += [(k, ", ".join(map(str, swept[k])) if k in swept else v)
             for k, v in results[0]["params"].items() if v is not None]
    sel = rec.get("selection") if isinstance(rec.get("selection"), dict) else {}
    given = {k for k, _ in rows}
    rows += [(k, sel[k]) for k in ("n", "per_digit", "limit", "targeted", "target_map")
             if sel.get(k) is not None and k not in given]
    rows += [("seed", rec["seed"])]
    body = "".join(f"<tr><td class=l>{e(str(k))}</td><td class=l><code>{e(str(v))}</code></td></tr>" for k, v in rows)
    return f"<table><tr><th class=l>parameter</th><th class=l>value</th></tr>{body}</table>"


def _index_entry(base: Path, rel: str, rec: dict, anchor: str) -> tuple[list[str], str]:
    """One attack run's summary rows and section. Every field is escaped and every link checked."""
    e = html.escape

    def a_img(name, style: str = "", title: bool = False) -> str:
        url = _link(base, rel, name)
        if url is None:
            return ""
        attrs = (f" title='{e(name)}'" if title else "") + (f" style='{style}'" if style else "")
        return f"<a href='{e(url)}'><img src='{e(url)}' alt='{e(str(name))}'{attrs}></a>"

    model = rec["model"]
    rows = []
    for res in rec["results"]:
        o = res["overall"]
        params = ", ".join(f"{k}={v}" for k, v in res["params"].items() if v is not None)
        robust = "-" if _from_noise(res["params"]) else _cell(o["robust_accuracy"])
        rows.append(
            f"<tr><td class=l><a href='#{anchor}'>{e(rel)}</a></td><td class=l>{e(str(model['name']))}</td>"
            f"<td class=l>{e(str(rec['method']))}</td><td class=l><code>{e(params)}</code></td>"
            f"<td>{_cell(o['n'], 'd')}</td>"
            f"<td>{_cell(model['clean_test_accuracy'], '.2f')}</td><td>{_cell(o['fooling_rate'])}</td>"
            f"<td>{robust}</td><td>{_cell(o['l2']['mean'], '.2f')}</td>"
            f"<td>{_cell(o['linf']['mean'], '.3f')}</td><td>{_cell(o['success_8bit'])}</td></tr>")
    pics = []
    for res in rec["results"]:
        files = res["files"]
        label = ", ".join(f"{k}={v}" for k, v in res["sweep_params"].items())
        gallery = a_img(files.get("gallery"))  # natural size: the labels drawn in it read
        curve = a_img(files.get("distance_curve"))
        if curve:
            prof = res.get("distance") or {}
            median = prof.get("median") if prof.get("median") is not None else prof.get("median_fooled")
            gallery = (f"<p>median {e(str(prof.get('norm', '')).upper())} distance to the nearest adversarial "
                       f"image found: {_cell(median, '.3f')}</p>{curve}" + gallery)
        thumbs = []
        for p in list(files.get("digits", []))[:30]:
            img = a_img(p, title=True)
            if img:
                m = _DIGIT_FILE.search(p)
                caption = f"{m.group(1)} as {m.group(2)}" if m else p
                thumbs.append(f"<figure>{img}<figcaption>{e(caption)}</figcaption></figure>")
        pics.append(f"<figure><figcaption>{e(label or 'gallery')}</figcaption>{gallery}"
                    f"<div class=thumbs>{''.join(thumbs)}</div></figure>")
    for key in ("sweep_plot", "matrix", "grid"):
        img = a_img((rec.get("files") or {}).get(key))
        if img:
            pics.insert(0, f"<figure>{img}</figure>")
    digits = rec["results"][-1]["per_digit"]
    noise = _from_noise(rec["results"][-1]["params"])
    digit_rows = "".join(
        f"<tr><td>{e(str(d))}</td><td>{_cell(s['n'], 'd')}</td><td>{_cell(s['fooling_rate'])}</td>"
        f"<td>{'-' if noise else _cell(s['robust_accuracy'])}</td><td>{_cell(s['l2']['mean'], '.2f')}</td>"
        f"<td>{_cell(s['confidence']['mean'], '.2f')}</td></tr>"
        for d, s in digits.items())
    last = ", ".join(f"{k}={v}" for k, v in rec["results"][-1]["sweep_params"].items()) or "all"
    record_url = _link(base, rel, "record.json")
    record_link = f" <a href='{e(record_url)}'>record.json</a>" if record_url else ""
    section = (
        f"<section id='{anchor}'><h2>{e(rel)}</h2><p>{e(str(model['name']))} "
        f"(checkpoint <code>{e(str(model['checkpoint_sha256'])[:12])}</code>), {e(str(rec['method']))}, "
        f"seed {_cell(rec['seed'], 'd')}, {_cell(rec['wall_time_s'])} s.{record_link}</p>"
        f"<div class=run><div>{_params_table(rec)}<h3>per digit ({e(last)})</h3>"
        f"<table><tr><th>digit</th><th>n</th><th>fooling rate</th><th>robust acc.</th><th>mean L2</th>"
        f"<th>mean confidence</th></tr>{digit_rows}</table></div>"
        f"<div class=pics>{''.join(pics)}</div></div></section>")
    return rows, section


def attack_index(records: Sequence[tuple[str, dict]], path: str | os.PathLike) -> None:
    """index.html over every attack run: a summary table, then each run's galleries and plots.

    records: (directory name relative to the index, record) pairs, newest first. Every record field
    and directory name is HTML-escaped, links go only to files that exist inside the index's folder,
    and a record that cannot be drawn is left out with a SkippedFileWarning naming it.
    """
    base = Path(path).parent
    head = ("<tr><th class=l>run</th><th class=l>model</th><th class=l>attack</th><th class=l>parameters</th>"
            "<th>n</th><th>clean acc. (test set)</th><th>fooling rate</th><th>robust acc.</th>"
            "<th>mean L2</th><th>mean Linf</th><th>still fools as PNG</th></tr>")
    rows, sections = [], []
    for rel, rec in records:
        try:
            entry_rows, section = _index_entry(base, rel, rec, anchor=f"run-{len(sections) + 1}")
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            skip_file(base / rel / "record.json", f"left out of {Path(path).name} "
                                                  f"(not a complete attack record: {exc.__class__.__name__} {exc})")
            continue
        rows += entry_rows
        sections.append(section)
    body = (f"<p>{len(sections)} attack run(s), newest first. Rates in %. Fooling rate: of the examples the "
            f"model classified correctly, the share the attack fooled (targeted attacks: sent to the target). "
            f"Still fools as PNG: of the successful images, the share that still succeed rounded to 8-bit "
            f"pixels. Robust acc.: the share still classified correctly, shown as - for an attack that starts "
            f"from noise (there it means nothing). Each run below lists its parameters and shows its gallery at "
            f"full size (clean or "
            f"reference image, adversarial image and perturbation per digit, with the predictions).</p>"
            f"<table>{head}{''.join(rows)}</table>{''.join(sections)}")
    write_html(path, "advmnist attack runs", body)
