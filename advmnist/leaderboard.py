"""`advmnist leaderboard`: every robust evaluation under a runs folder in one table per threat model and eps.

The rows are read from the records `evaluate --robust` writes (`RUN/eval/robust.json`) and the experiment
runner caches (`RUN/attack-cache/robust-*.json`), for zoo runs and for models evaluated with `--module` or
`--model-file` alike; nothing is measured here. Each row gives the model, clean accuracy, robust
accuracy under its ensemble (worst case per image, the checks' attacks included), the certified lower
bound, the masking verdict, the ensemble and budget, how many images, when and at which commit, and links
to its record. Rows are sorted by robust accuracy; a row evaluated on fewer images than another says so
in its `images` column, so a subset is never read as the full test set.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from . import runs
from .pictures import write_html

PAGE = "leaderboard"  # <out>/attacks/leaderboard.html and .md, beside the attack gallery's index.html


@dataclass(frozen=True)
class Row:
    model: str
    run: str
    norm: str
    eps: float
    n: int
    clean: float
    robust: float
    certified: float | None
    flagged: bool
    ensemble: str
    budget: str
    date: str
    commit: str
    record: Path  # the robust record this row was read from


def _row(path: Path, rec: dict) -> Row | None:
    settings = rec.get("settings") or {}
    if rec.get("robust_accuracy") is None or rec.get("clean_accuracy") is None:
        return None
    cert = rec.get("certified") or {}
    steps = settings.get("steps")
    queries = settings.get("queries")
    budget = ", ".join(part for part in (f"{steps} steps" if steps else "", f"{queries} queries" if queries else "",
                                         f"restarts {settings['restarts']}" if settings.get("restarts") else "")
                       if part) or "defaults"
    prov = rec.get("provenance") or {}
    return Row(model=str(rec.get("model") or "?"), run=path.parent.parent.name if path.parent.name in
               ("eval", "attack-cache") else path.parent.name, norm=str(rec.get("norm", settings.get("norm", "linf"))),
               eps=float(rec.get("eps", settings.get("eps", 0.0))), n=int(rec.get("n") or settings.get("n") or 0),
               clean=float(rec["clean_accuracy"]), robust=float(rec["robust_accuracy"]),
               certified=cert.get("certified_accuracy"), flagged=bool((rec.get("masking") or {}).get("flagged")),
               ensemble=str(settings.get("ensemble", "?")), budget=budget, date=str(prov.get("time", ""))[:10],
               commit=str(prov.get("commit") or ""), record=path)


def collect(root: str | Path) -> list[Row]:
    """Every robust evaluation record under `root` (one folder down: the run directories)."""
    root = Path(root)
    found = []
    if not root.is_dir():
        return found
    for run in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in [run / "eval" / "robust.json", *sorted((run / "attack-cache").glob("robust-*.json"))]:
            if path.is_file():
                rec = runs.read_record(path, kind="robust-evaluate")
                row = _row(path, rec) if rec is not None else None
                if row is not None:
                    found.append(row)
    return found


def tables(rows: list[Row]) -> dict[tuple[str, float], list[Row]]:
    """Rows by (norm, eps), most robust first."""
    grouped: dict[tuple[str, float], list[Row]] = {}
    for r in rows:
        grouped.setdefault((r.norm, r.eps), []).append(r)
    return {k: sorted(v, key=lambda r: (-r.robust, -r.clean, r.model)) for k, v in sorted(grouped.items())}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


COLUMNS = ("model", "clean %", "robust %", "certified %", "masking", "ensemble", "budget", "images", "date",
           "commit", "run")


def _cells(r: Row) -> tuple[str, ...]:
    return (r.model, _pct(r.clean), _pct(r.robust), _pct(r.certified), "FLAGGED" if r.flagged else "ok",
            r.ensemble, r.budget, str(r.n), r.date, r.commit, r.run)


def markdown(rows: list[Row]) -> str:
    """One Markdown table per threat model and eps."""
    out = ["# Robust accuracy leaderboard", "",
           "Read from every robust evaluation under the runs folder (`advmnist leaderboard`). Robust: worst case "
           "per image over the ensemble and the masking checks' attacks; certified: IBP/CROWN lower bound; "
           "`images`: how many test images (the first N) the row was evaluated on.", ""]
    for (norm, eps), group in tables(rows).items():
        out += [f"## {norm} eps {eps:g}", "", "| " + " | ".join(COLUMNS) + " |",
                "| " + " | ".join("---" if c in ("model", "masking", "ensemble", "budget", "date", "commit", "run")
                                  else "---:" for c in COLUMNS) + " |"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in group]
        out.append("")
    if not rows:
        out.append("No robust evaluation yet: run `advmnist evaluate --robust` first.")
    return "\n".join(out).rstrip("\n") + "\n"


def html_page(rows: list[Row], base: Path) -> str:
    """The same tables as HTML, every field escaped, each run linked to its record (relative to `base`)."""
    parts = ["<p>Robust: worst case per image over the ensemble and the masking checks' attacks; certified: "
             "IBP/CROWN lower bound; images: how many test images (the first N) the row was evaluated on.</p>"]
    for (norm, eps), group in tables(rows).items():
        parts.append(f"<h2>{html.escape(norm)} eps {eps:g}</h2><table><tr>"
                     + "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS) + "</tr>")
        for r in group:
            cells = [html.escape(c) for c in _cells(r)]
            try:
                link = Path("..") / r.record.relative_to(base.parent)
                cells[-1] = f'<a href="{html.escape(link.as_posix(), quote=True)}">{cells[-1]}</a>'
            except ValueError:
                pass
            parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    if not rows:
        parts.append("<p>No robust evaluation yet: run <code>advmnist evaluate --robust</code> first.</p>")
    return "".join(parts)


def write_leaderboard(root: str | Path) -> tuple[Path, Path, list[Row]]:
    """Write `<root>/attacks/leaderboard.md` and `.html` from every robust record under `root`."""
    root = Path(root)
    rows = collect(root)
    folder = root / "attacks"
    runs.check_output_dir(folder)
    md = folder / f"{PAGE}.md"
    with runs.atomic_path(md) as tmp:
        tmp.write_text(markdown(rows))
    page = folder / f"{PAGE}.html"
    write_html(page, "advmnist robust accuracy leaderboard", html_page(rows, folder))
    return md, page, rows
