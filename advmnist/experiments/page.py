"""The experiment's Markdown page, rendered from an `Outcome` (every number already computed) and
the names of the figures `plots.draw` wrote.

The page puts the report's number beside ours (mean and spread over seeds) and calls out every
miss larger than the seeds' spread plus MISS_MARGIN percentage points.
"""

from __future__ import annotations

import statistics

from ..models import get_spec
from ..records import RobustRecord
from ..robustness import checks_scope
from ..train import resolve_recipe
from .outcome import Outcome
from .spec import Robust, adversarial_of

MISS_MARGIN = 0.5  # percentage points allowed beyond the seeds' spread


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _per_seed(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def _blank(v) -> str:
    return "" if v is None else str(v)


def render(o: Outcome, figures: dict[str, str]) -> str:
    """The whole page. `figures`: file names by kind (curves, robustness, interval, transfer) of the
    figures drawn; a kind that is absent was not drawn and is not linked."""
    spec, path = o.spec, o.spec_path.as_posix()
    train_s = sum(r.wall_time_s for row in o.rows for r in row.records)
    wall = (f"{o.wall_s:.0f} s this invocation ({o.trained} run(s) trained, {o.reused} reused{o.executor}); "
            f"training time of the runs themselves: {train_s:.0f} s")
    lines = [f"# {spec.title}", "", spec.description.strip(), "",
             f"Spec: `{path}`. Command: `advmnist experiment run {path}`.",
             f"Seeds: {', '.join(map(str, spec.seeds))}; training images: {o.n_train}; "
             f"test images: {o.n_test}. Wall time: {wall}.", "",
             "| variant | model | recipe | report (%) | ours (%) mean ± sd | seeds | Δ (pp) | verdict | train time (s) |",
             "| --- | --- | --- | ---: | ---: | --- | ---: | --- | ---: |"]
    misses = []
    for row in o.rows:
        v, recs = row.variant, row.records
        accs = [r.test_accuracy for r in recs]
        mean, sd = _mean_spread(accs)
        delta = None if v.reported is None else mean - v.reported
        if delta is None:
            verdict = "–"
        elif abs(delta) <= sd + MISS_MARGIN:
            verdict = "reproduced"
        elif delta > 0:
            verdict = "**better**"
            misses.append((v, delta))
        else:
            verdict = "**MISS**"
            misses.append((v, delta))
        recipe = str(resolve_recipe(v.model, **v.overrides))
        if v.adversarial:
            recipe += f"; {adversarial_of(v)}"
        secs = statistics.fmean(r.wall_time_s for r in recs)
        lines.append(f"| {v.label} | `{v.model}` | {recipe} | {_fmt(v.reported)} | {mean:.2f} ± {sd:.2f} | "
                     f"{_per_seed(accs)} | {_fmt(delta, '+.2f')} | {verdict} | {secs:.0f} |")
    if o.pending:
        lines += ["", "**Pending** (not trained yet, left out of every table below; `advmnist experiment run "
                  f"{path}` trains them and reuses everything else): "
                  + ", ".join(f"{v.label} (`{v.model}`, {get_spec(v.model).recipe})" for v in o.pending) + "."]
    if misses:
        lines += ["", "Differences beyond the seeds' spread plus 0.5 pp:", ""]
        for v, delta in misses:
            lines.append(f"- **{v.label}**: {delta:+.2f} pp. {v.note or 'No explanation recorded in the spec.'}")
    warned = [(row.variant, r) for row in o.rows for r in row.records if r.warnings]
    if warned:
        lines += ["", "Warnings recorded during training:", ""]
        for v, r in warned:
            lines += [f"- {v.label} (seed {r.seed}): {w}" for w in r.warnings]
    if spec.per_class:
        lines += ["", "## Per-digit test accuracy (%), mean over seeds", "",
                  "| variant | " + " | ".join(str(d) for d in range(10)) + " |",
                  "| --- |" + " ---: |" * 10]
        for row in o.rows:
            per = [statistics.fmean(r.per_class_accuracy[d] for r in row.records) for d in range(10)]
            lines.append(f"| {row.variant.label} | " + " | ".join(f"{p:.1f}" for p in per) + " |")
    lines += ["", f"![test accuracy per epoch]({figures['curves']})", ""]
    if o.columns:
        lines += ["## Robustness", "",
                  "Robust accuracy (%) on the first test images under each attack (penalty: fooling rate "
                  "of report 001's target-penalized attack on the first test image of each digit, "
                  "target digit + 1); mean over seeds.", "",
                  "| variant | clean | " + " | ".join(_column_header(c) for c in o.columns) + " |",
                  "| --- | ---: |" + " ---: |" * len(o.columns)]
        for i, row in enumerate(o.rows):
            cells = []
            for c in o.columns:
                if c.norm is not None and _targeted_column(c):
                    first = c.records[i][0].distance
                    reached = first.n - first.never_fooled
                    cells.append(f"{_fmt(first.median_fooled, '.3g')} ({reached}/{first.n})")
                    continue
                if c.norm is not None:
                    medians = [r.distance.median for r in c.records[i]]
                    cells.append("–" if None in medians else _fmt(statistics.fmean(medians), ".3g"))
                    continue
                key = "fooling_rate" if c.attack.method == "penalty" else "robust_accuracy"
                cells.append(_fmt(statistics.fmean(getattr(m, key) for m in c.cells[i]), ".1f"))
            clean = statistics.fmean(r.test_accuracy for r in row.records)
            lines.append(f"| {row.variant.label} | {clean:.2f} | " + " | ".join(cells) + " |")
        if any(c.norm is not None for c in o.columns):
            lines += ["", "A column headed *median* is a minimum-norm attack's: the median over the images of "
                      "the distance from each image to the nearest adversarial image the attack found (0 for an "
                      "image the model already gets wrong; an image it never fooled counts as infinitely far; "
                      "L0 in pixels changed). A targeted column gives the median over the pairs that reached their "
                      "target, and how many did (first seed)."]
        if "robustness" in figures:  # drawn only where an attack has an eps
            lines += ["", f"![robust accuracy against eps (eps 0: clean accuracy)]({figures['robustness']})", ""]
        if "distances" in figures:
            lines += ["", "Robust accuracy against eps implied by each minimum-norm attack's distances (first "
                      "seed): the share of images farther than eps from every adversarial image the attack "
                      "found. It is an upper bound: a stronger attack can only lower it. Where the robust "
                      "section's norm matches, the standard ensemble's points at fixed eps are drawn on the same "
                      "axes: where a curve lies above them the minimum-norm attack missed adversarial images the "
                      "ensemble found, and is not to be trusted there.", "",
                      f"![robust accuracy implied by minimum-norm distances]({figures['distances']})", ""]
        for key, caption in figures.get("grids", []):
            lines += ["", caption, "", f"![{caption}]({key})", ""]
    lines += [(_robust_section(o, figures) if o.robust else "") + (_transfer_section(o, figures) if o.transfer else ""),
              ""]
    return "\n".join(lines)


def _targeted_column(c) -> bool:
    from ..attacks import get_attack

    return bool(c.attack.target_map) or get_attack(c.attack.method).always_targeted


def _column_header(c) -> str:
    if c.norm is None:
        return c.label
    unit = "pixels" if c.norm == "l0" else c.norm.upper()
    if _targeted_column(c):
        return f"{c.label}: median {unit} to the target (reached/pairs)"
    return f"{c.label}: median {unit}"


def robust_command(r: Robust) -> str:
    """The `advmnist evaluate` command line that gives this evaluation."""
    parts = [f"advmnist evaluate --robust --eps {r.eps:g}"]
    if r.norm != "linf":
        parts.append(f"--norm {r.norm}")
    if r.ensemble != "standard":
        parts.append(f"--ensemble {r.ensemble}")
    if r.attacks:
        parts.append(f"--attacks {','.join(r.attacks)}")
    for name in ("steps", "restarts", "queries"):
        if getattr(r, name) is not None:
            parts.append(f"--{name} {getattr(r, name)}")
    if r.alone:
        parts.append("--alone")
    parts.append(f"--limit {r.limit}")
    if r.check_n != 1000:
        parts.append(f"--check-n {r.check_n}")
    if not r.certify:
        parts.append("--no-certify")
    elif r.bound != "auto":
        parts.append(f"--bound {r.bound}")
    return " ".join(parts)


def _certified_cell(rec: RobustRecord) -> str:
    return _fmt(rec.certified.certified_accuracy if rec.certified is not None else None)


def _score_counts(rec: RobustRecord) -> str:
    """The score-based check's counts: found, and of those, recovered by restarts and left."""
    counts = next((c.counts for c in rec.checks if c.counts and "score_based_only" in c.counts), None)
    if counts is None:
        return "–"
    found, limit = counts["score_based_only"], counts["limit"]
    if counts.get("recovered_by_restarts") is None:
        return f"{found}: not attacked again, within the limit ({limit})"
    return f"{found}: {counts['recovered_by_restarts']} recovered, {counts['square_only']} left ({limit})"


def _robust_section(o: Outcome, figures: dict[str, str]) -> str:
    spec = o.spec
    first = o.robust[0][0]
    lines = ["## Robust accuracy under the standard evaluation", "",
             f"`{robust_command(spec.robust)}` on {first.n} test images, worst case per example: an image counts as "
             "robust only if every attack below fails on it; each attack runs on the images all earlier ones "
             "left standing (as AutoAttack does). Mean over seeds. A flag means the number is not to be "
             "trusted: a sign of gradient masking or of an evaluation that has not converged.", "",
             "Certified: the share of images that interval bound propagation or CROWN (`advmnist/bounds.py`) "
             "proves robust, a lower bound no attack can break; the true robust accuracy lies between the "
             "certified and the attacked (robust) column. – : the model has a layer the bounds do not handle "
             "or certification was off.", "",
             "Score-based only: images the score-based attack (Square) broke after every gradient attack; "
             "over the check's limit they are attacked again by gradient attacks from more random starts, and "
             "what those break is a gradient attack one start short (recovered), what stays is a sign of "
             "masking (left, flagged over the limit). All of them count as broken.", "",
             "| variant | clean (%) | certified (%) | robust (%) | seeds | score-based only: recovered, left (limit) "
             "| masking checks | evaluation time (s) |",
             "| --- | ---: | ---: | ---: | --- | --- | --- | ---: |"]
    for row, recs in zip(o.rows, o.robust):
        accs = [x.robust_accuracy for x in recs]
        flagged = [c for x in recs for c in x.masking.get("failed", [])]
        badge = f"**FLAGGED** ({len(flagged)})" if flagged else "none fired"
        lines.append(f"| {row.variant.label} | {statistics.fmean(x.clean_accuracy for x in recs):.2f} | "
                     f"{_certified_cell(recs[0])} | {statistics.fmean(accs):.2f} | {_per_seed(accs)} | "
                     f"{_score_counts(recs[0])} | {badge} | "
                     f"{statistics.fmean(x.wall_time_s for x in recs):.0f} |")
    if o.curve:
        lines += _curve_lines(o, figures)
    for row, recs in zip(o.rows, o.robust):
        rec = recs[0]
        lines += ["", f"### {row.variant.label}: robust accuracy after each attack (seed {spec.seeds[0]})", "",
                  "| attack | alone (%) | cumulative (%) | images attacked | seconds |",
                  "| --- | ---: | ---: | ---: | ---: |",
                  f"| none (clean) | {rec.clean_accuracy:.2f} | {rec.clean_accuracy:.2f} | | |"]
        lines += [f"| {a.attack} | {_fmt(a.robust_accuracy_alone)} | {a.robust_accuracy_after:.2f} | "
                  f"{_blank(a.attacked)} | {_blank(a.seconds)} |" for a in rec.per_attack]
        scope = checks_scope(rec.settings["n"], rec.settings["check_n"],
                             any(a.gradient_free for a in rec.per_attack))
        lines += ["", f"Masking checks ({scope}):", ""]
        lines += [f"- {'passed' if c.passed else '**FLAGGED**'}: {c.check} ({c.detail})" for c in rec.checks]
    return "\n".join(lines) + "\n\n"


def _curve_lines(o: Outcome, figures: dict[str, str]) -> list[str]:
    eps_values = [rec.eps for rec in o.curve[0]]
    n = o.curve[0][0].n
    lines = ["", f"### Accuracy against eps: certified / attacked (%), {n} test images"
             + ("" if n == 10000 else " (a subset)") + f", seed {o.spec.seeds[0]}", "",
             "| variant | " + " | ".join(f"eps {e:g}" for e in eps_values) + " |",
             "| --- |" + " ---: |" * len(eps_values)]
    for row, recs in zip(o.rows, o.curve):
        lines.append(f"| {row.variant.label} | " + " | ".join(f"{_certified_cell(x)} / {x.robust_accuracy:.2f}"
                                                             for x in recs) + " |")
    return lines + ["", f"![certified and attacked accuracy against eps]({figures['interval']})"]


def _transfer_section(o: Outcome, figures: dict[str, str]) -> str:
    t, m = o.spec.transfer, o.transfer
    params = ", ".join(f"{k}={v}" for k, v in t.params.items())
    lines = ["## Transfer", "",
             f"{t.method} ({params}) adversarial examples crafted on the row's model (seed {o.spec.seeds[0]}), "
             f"fed to the column's model: fooling rate (%) among the first {t.limit} test images the column's "
             f"model classifies correctly. The diagonal is the white-box attack.", "",
             "| crafted on \\ fed to | " + " | ".join(m.labels) + " |", "| --- |" + " ---: |" * len(m.labels)]
    for label, row in zip(m.labels, m.fooling):
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    lines += ["", f"![transfer matrix]({figures['transfer']})", ""]
    return "\n".join(lines)
