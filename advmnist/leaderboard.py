"""`advmnist leaderboard`: every robust evaluation under a runs folder in one table per threat model and eps.

The rows are read from the records `evaluate --robust` writes (`RUN/eval/robust.json`) and the experiment
runner caches (`RUN/attack-cache/robust-*.json`), for zoo runs and for models evaluated with `--module` or
`--model-file` alike; nothing is measured here. Each row gives the model, clean accuracy, robust
accuracy under its ensemble (worst case per image, the checks' attacks included), the certified lower
bound, the masking verdict, the ensemble and budget, how many images, when and at which commit, and links
to its record. Rows are sorted by robust accuracy; a row evaluated on fewer images than another says so
in its `images` column, so a subset is never read as the full test set. On request it adds the pretrained
models shipped with advmnist (their records' full-test-set evaluations) and the literature's reported
numbers, each marked as reported with its source and how it was evaluated.
"""

from __future__ import annotations

import dataclasses
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
    record: Path | None  # the robust record this row was read from; None for a reported number
    source: str = ""  # for a number reported in a paper: the paper
    note: str = ""  # what a reader should know beside the number (e.g. an independent attack's check)
    score: str = ""  # the score-based check's counts: found after the gradient attacks, recovered, left


#: Reported numbers, MNIST, Linf eps 0.3, full test set: attacked ones as AutoAttack (Croce & Hein 2020,
#: "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks")
#: measured them; certified ones as their papers verified them.
LITERATURE = (
    ("Gowal et al. 2020 (adversarial training at scale)", 99.26, 96.34, None, "AutoAttack, Croce & Hein 2020"),
    ("Zhang et al. 2019 (TRADES, SmallCNN)", 99.48, 92.81, None, "AutoAttack, Croce & Hein 2020"),
    ("Madry et al. 2018 (MNIST challenge, PGD-40)", 98.53, 88.50, None, "AutoAttack, Croce & Hein 2020"),
    ("Wong et al. 2020 (FGSM with random start)", 98.50, 82.93, None, "AutoAttack, Croce & Hein 2020"),
    ("Gowal et al. 2018 (IBP, large CNN)", 98.34, None, 91.95, "IBP-verified, Gowal et al. 2018"),
    ("Zhang et al. 2020 (CROWN-IBP)", None, None, 93.32, "verified, Zhang et al. 2020 (ICLR)"),
)


def literature_rows() -> list[Row]:
    return [Row(model=model, run="", norm="linf", eps=0.3, n=10000, clean=clean, robust=robust, certified=cert,
                flagged=False, ensemble="reported", budget=how, date="", commit="", record=None, source=model)
            for model, clean, robust, cert, how in LITERATURE]


def shipped_rows() -> list[Row]:
    """The pretrained models' own evaluations, as their records hold them."""
    from .shipped import WEIGHTS, list_pretrained, pretrained_record

    found = []
    for name in list_pretrained():
        rec = pretrained_record(name)
        row = _row(WEIGHTS / f"{name}.json", rec["evaluation"])
        if row is not None:
            found.append(dataclasses.replace(row, model=f"{name} ({rec['model']}, pretrained)",
                                             run=f"pretrained {name}",
                                             commit=row.commit or str((rec.get("commit") or {}).get("evaluation") or ""),
                                             note=str(rec.get("note") or "")))
    return found


def _score(rec: dict) -> str:
    """How many images only the score-based attack broke, and of those how many gradient attacks from
    more starts broke too (a gradient attack one start short) and how many stayed its alone."""
    for check in rec.get("checks") or []:
        counts = check.get("counts") or {}
        if "score_based_only" in counts:
            if counts.get("recovered_by_restarts") is None:
                return f"score-based only: {counts['score_based_only']}"
            return (f"score-based only: {counts['score_based_only']}, {counts['recovered_by_restarts']} recovered by "
                    f"restarts, {counts['square_only']} left")
    return ""


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
               commit=str(prov.get("commit") or ""), record=path, score=_score(rec))


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
    def key(r: Row):
        best = r.robust if r.robust is not None else r.certified
        return (-(best or 0.0), -(r.clean or 0.0), r.model)

    return {k: sorted(v, key=key) for k, v in sorted(grouped.items())}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


COLUMNS = ("model", "clean %", "robust %", "certified %", "masking", "ensemble", "budget", "images", "date",
           "commit", "run")


def _cells(r: Row) -> tuple[str, ...]:
    if r.source:
        return (f"{r.model}: reported", _pct(r.clean), _pct(r.robust), _pct(r.certified), "-", r.ensemble, r.budget,
                str(r.n), "", "", "")
    verdict = "FLAGGED" if r.flagged else "ok"
    return (r.model, _pct(r.clean), _pct(r.robust), _pct(r.certified), f"{verdict} ({r.score})" if r.score else verdict,
            r.ensemble, r.budget, str(r.n), r.date, r.commit, r.run)


def _linked(r: Row, cells: tuple[str, ...], base: Path | None) -> tuple[str, ...]:
    """The run cell as a link to the row's record, relative to `base` (where the page is written)."""
    if base is None or r.record is None:
        return cells
    import os

    target = os.path.relpath(Path(r.record).resolve(), Path(base).resolve())
    return (*cells[:-1], f"[{cells[-1]}]({Path(target).as_posix()})")


def markdown(rows: list[Row], command: str | None = None, base: Path | None = None) -> str:
    """One Markdown table per threat model and eps; `command`: the command line that wrote it; `base`:
    the page's folder, to link each row to its record."""
    out = ["# Robust accuracy leaderboard", "",
           "Read from robust evaluation records (`advmnist leaderboard`). Robust: worst case "
           "per image over the ensemble and the masking checks' attacks; certified: IBP/CROWN lower bound; "
           "`images`: how many test images (the first N) the row was evaluated on. A row marked `reported` "
           "is a paper's number, not measured here: its `budget` column says who evaluated it and how.", ""]
    if command:
        out[2:2] = [f"Command: `{command}`.", ""]
    for (norm, eps), group in tables(rows).items():
        out += [f"## {norm} eps {eps:g}", "", "| " + " | ".join(COLUMNS) + " |",
                "| " + " | ".join("---" if c in ("model", "masking", "ensemble", "budget", "date", "commit", "run")
                                  else "---:" for c in COLUMNS) + " |"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in _linked(r, _cells(r), base)) + " |" for r in group]
        out.append("")
    notes = [f"- {r.model}: {r.note}" for r in rows if r.note]
    if notes:
        out += ["Notes:", "", *notes, ""]
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
                if r.record is None:
                    raise ValueError
                link = Path("..") / r.record.relative_to(base.parent)
                cells[-1] = f'<a href="{html.escape(link.as_posix(), quote=True)}">{cells[-1]}</a>'
            except ValueError:
                pass
            parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    if not rows:
        parts.append("<p>No robust evaluation yet: run <code>advmnist evaluate --robust</code> first.</p>")
    return "".join(parts)


def gather(root: str | Path, *, from_runs: bool = True, shipped: bool = False, literature: bool = False
           ) -> list[Row]:
    """The rows: robust records under `root`, the shipped models' and the literature's, as asked."""
    rows = collect(root) if from_runs else []
    return rows + (shipped_rows() if shipped else []) + (literature_rows() if literature else [])


def write_markdown(path: str | Path, rows: list[Row], command: str | None = None) -> Path:
    path = Path(path)
    runs.check_output_dir(path.parent)
    with runs.atomic_path(path) as tmp:
        tmp.write_text(markdown(rows, command, base=path.parent))
    return path


def write_leaderboard(root: str | Path, rows: list[Row] | None = None) -> tuple[Path, Path, list[Row]]:
    """Write `<root>/attacks/leaderboard.md` and `.html` from `rows` (default: every robust record under
    `root`)."""
    root = Path(root)
    rows = collect(root) if rows is None else rows
    folder = root / "attacks"
    runs.check_output_dir(folder)
    md = folder / f"{PAGE}.md"
    with runs.atomic_path(md) as tmp:
        tmp.write_text(markdown(rows))
    page = folder / f"{PAGE}.html"
    write_html(page, "advmnist robust accuracy leaderboard", html_page(rows, folder))
    return md, page, rows
