"""Declarative experiments: a TOML spec per table of the reports, run into a Markdown results page.

A spec names variants (a zoo model plus recipe overrides, with the report's number beside it),
the seeds, and optionally attack evaluations and a transfer matrix. The runner trains only what
`runs/` does not already hold (a run matches on model, recipe, seed, training slice and data), so
a rerun of a finished experiment trains nothing; attack results are cached in each run directory
under the attack's parameters. The page puts the report's number beside ours (mean and spread over
seeds) and calls out every miss larger than the seeds' spread plus 0.5 percentage points.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import pictures, runs, validate
from .attacks import get_attack
from .attacks.core import default_alpha
from .data import MNIST, load_mnist
from .errors import AdvmnistError, SpecError
from .measures import attack_measures, eval_mode, predict_logits
from .models import Recipe, get_spec
from .train import Adversarial, resolve_recipe, train_run

MISS_MARGIN = 0.5  # percentage points allowed beyond the seeds' spread


@dataclass(frozen=True)
class Variant:
    label: str  # the row's name in the report's table
    model: str  # zoo model name
    overrides: dict = field(default_factory=dict)  # recipe fields: epochs, lr, momentum, dropout, ...
    reported: float | None = None  # the report's test accuracy (%) for this row
    note: str = ""  # why our number may differ, shown when it misses
    adversarial: dict = field(default_factory=dict)  # advmnist.train.Adversarial fields; empty: standard training


@dataclass(frozen=True)
class AttackEval:
    method: str  # registry name: fgsm, pgd, penalty, gd
    params: dict = field(default_factory=dict)  # attack keyword arguments (eps may be a list: a sweep)
    limit: int = 1000  # untargeted attacks: the first `limit` test images
    label: str = ""  # column name on the page; default from method and parameters


@dataclass(frozen=True)
class Transfer:
    method: str = "pgd"
    params: dict = field(default_factory=lambda: {"eps": 0.2, "steps": 40})
    limit: int = 1000


@dataclass(frozen=True)
class Robust:
    """The evaluation of `advmnist evaluate --robust` (advmnist.robustness) for every run."""

    eps: float = 0.3
    ensemble: str = "standard"  # standard (APGD-CE, APGD-T, Square), quick, or pgd (FGSM, PGD, targeted PGD)
    attacks: tuple[str, ...] = ()  # only these attacks of the ensemble; empty: all
    steps: int | None = None  # steps of the gradient attacks; None: the ensemble's
    restarts: int | None = None  # restarts of the gradient attacks; None: the ensemble's
    queries: int | None = None  # Square's query budget; None: the ensemble's
    norm: str = "linf"
    alone: bool = False  # also each attack on its own
    limit: int = 0  # the first N test images; 0: all of them
    check_n: int = 1000  # images for the masking checks
    certify: bool = True  # also certified accuracy (advmnist.bounds): the true value is then an interval
    curve: tuple[float, ...] = ()  # more eps values for an accuracy-vs-eps table and plot (first seed)
    curve_limit: int = 0  # images for the curve's points; 0: as `limit`


#: Robust fields that do not change the attacked number: left out of its cache key.
_NOT_IN_KEY = ("certify", "curve", "curve_limit")


@dataclass(frozen=True)
class Spec:
    name: str  # file stem; the page is results/<name>.md
    title: str
    report: str  # which report(s) the table comes from
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...] = (0,)
    train_limit: int | None = None  # train on the first N images (miniature specs only)
    description: str = ""
    attacks: tuple[AttackEval, ...] = ()
    transfer: Transfer | None = None
    per_class: bool = False  # add a per-digit accuracy table
    robust: Robust | None = None  # add the worst-case robust accuracy and sanity checks


def _only(table: dict, cls, where: str) -> dict:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(table) - known
    if unknown:
        raise AdvmnistError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(known))}")
    return table


def load_spec(path: str | Path) -> Spec:
    """Parse and check a TOML spec; every model, override and attack is validated before any work.

    The tables are checked against `advmnist.validate.SPEC_SCHEMA` first, so a wrong type, a missing
    title, an unknown key or a non-finite number is a SpecError naming the file, the key and what was
    expected, never a traceback."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"{path}: a directory, not an experiment spec (give a .toml file)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdvmnistError(f"{path}: no such experiment spec") from None
    except tomllib.TOMLDecodeError as exc:
        raise AdvmnistError(f"{path}: not valid TOML ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot be read as a UTF-8 text file ({exc.__class__.__name__})") from None

    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    validate.check_spec(raw, str(path), {
        "spec": [n for n in keys(Spec) if n not in ("variants", "attacks")] + ["variant", "attack"],
        "variant": keys(Variant), "attack": keys(AttackEval), "transfer": keys(Transfer), "robust": keys(Robust),
    }, recipe=keys(Recipe), adversarial=keys(Adversarial))
    raw.setdefault("name", path.stem)
    variants = tuple(Variant(**_only(v, Variant, f"{path} [[variant]]")) for v in raw.pop("variant", []))
    attacks = tuple(AttackEval(**_only(a, AttackEval, f"{path} [[attack]]")) for a in raw.pop("attack", []))
    transfer = raw.pop("transfer", None)
    robust = raw.pop("robust", None)
    raw = _only(raw, Spec, str(path))
    spec = Spec(**{**raw, "variants": variants, "attacks": attacks, "seeds": tuple(raw.get("seeds", (0,))),
                   "transfer": Transfer(**_only(transfer, Transfer, f"{path} [transfer]")) if transfer else None,
                   "robust": Robust(**{**_only(robust, Robust, f"{path} [robust]"),
                                       "attacks": tuple(robust.get("attacks", ())),
                                       "curve": tuple(robust.get("curve", ()))}) if robust is not None else None})
    if spec.robust is not None:
        from .robustness import ensemble_stages

        r = spec.robust
        if not r.eps >= 0 or r.norm not in ("linf", "l2"):
            raise AdvmnistError(f"{path} [robust]: needs eps >= 0 and norm linf or l2")
        try:
            ensemble_stages(r.ensemble, r.attacks, steps=r.steps, restarts=r.restarts, queries=r.queries)
        except AdvmnistError as exc:
            raise AdvmnistError(f"{path} [robust]: {exc}") from None
    if not spec.variants:
        raise AdvmnistError(f"{path}: no [[variant]]")
    for v in spec.variants:
        try:
            resolve_recipe(v.model, **v.overrides)
            if v.adversarial:
                _adversarial(v, path).check()
        except SpecError:
            raise
        except AdvmnistError as exc:
            raise SpecError(f"{path} [[variant]] {v.label!r}: {exc}") from None
    for a in spec.attacks:
        try:
            accepted = get_attack(a.method).defaults()
        except AdvmnistError as exc:
            raise SpecError(f"{path} [[attack]]: {exc}") from None
        for key in a.params:
            if key not in accepted:
                raise AdvmnistError(f"{path}: attack {a.method!r} takes no parameter {key!r}")
        lists = {k: len(v) for k, v in a.params.items() if isinstance(v, list)}
        if lists and (set(lists.values()) != {lists.get("eps", -1)}):
            raise AdvmnistError(f"{path}: attack {a.method!r}: a list parameter needs an eps list of the same "
                                f"length, got lengths {lists}")
    return spec


def _adversarial(v: Variant, where: str | Path = "spec") -> Adversarial | None:
    if not v.adversarial:
        return None
    try:
        return Adversarial(**v.adversarial)
    except TypeError as exc:
        raise AdvmnistError(f"{where}: variant {v.label!r}: bad adversarial settings ({exc})") from None


_RECIPE_DEFAULTS = dataclasses.asdict(Recipe())  # fields added later read as their defaults in older records


def find_run(out: str | Path, model: str, recipe: dict, seed: int, n_train: int, checksum: str,
             adversarial: dict | None = None) -> Path | None:
    """The newest finished run with exactly this model, recipe, adversarial training, seed,
    training slice and data."""
    for run in reversed(runs.find_runs(out, model)):  # only runs whose records hold runs.TRAIN_RECORD
        rec = runs.read_json(run / runs.RECORD)
        if ({**_RECIPE_DEFAULTS, **rec["recipe"]} == recipe and rec["seed"] == seed and rec["n_train"] == n_train
                and rec["data_checksum"] == checksum and rec.get("adversarial") == adversarial):
            return run
    return None


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _cached(path: Path, compute: Callable[[], dict]) -> dict:
    """The JSON record at `path`, computed and written first if it is not there yet."""
    if not path.is_file():
        runs.write_json(path, compute())
    return runs.read_json(path)


def _attack_cached(run: Path, data: MNIST, a: AttackEval, point: dict, seed: int) -> dict:
    """Overall attack measures for one run, computed once and cached in the run directory.
    `point`: this column's values of the parameters given as lists (eps and what goes with it)."""
    params = {**a.params, **point}
    if a.method == "pgd" and "alpha" not in params:  # the key holds the step used, not "the default of the day"
        params["alpha"] = default_alpha(params.get("eps", 0.3), params.get("steps", 40))
    key = {"method": a.method, "params": params, "limit": a.limit, "seed": seed, "data": data.checksum}
    return _cached(run / "attack-cache" / f"{a.method}-{_key(key)}.json",
                   lambda: {**key, **_attack(run, data, a, params, seed)})["overall"]


def _attack(run: Path, data: MNIST, a: AttackEval, params: dict, seed: int) -> dict:
    spec = get_attack(a.method)
    model, _ = runs.load_checkpoint(run)
    if spec.always_targeted:
        idx = torch.stack([(data.test_y == d).nonzero()[0, 0] for d in range(10)])
        x, y = data.test_x[idx], data.test_y[idx]
        target = (y + 1) % 10
        attack_y = target
    else:
        x, y = data.test_x[: a.limit], data.test_y[: a.limit]
        target, attack_y = None, y
    kwargs = dict(params)  # the cache key holds `params`; the generator is no part of it
    if "generator" in spec.defaults():
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with eval_mode(model):
        x_adv = spec.fn(model, x, attack_y, **kwargs)
        result = attack_measures(model, x, y, x_adv, target)
    return {"overall": result["overall"], "seconds": time.perf_counter() - start}


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _per_seed(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def run_experiment(spec_path: str | Path, *, out: str | Path = "runs", results: str | Path | None = None,
                   data: MNIST | None = None, device: str = "cpu", train: bool = True,
                   log: Callable[[str], None] = lambda s: None) -> Path:
    """Train what is missing, evaluate, attack, and write `<results>/<name>.md` with its plots.

    With `train=False` nothing is trained: variants without finished runs are listed as pending
    and left out of attacks and transfer, so a partial page can be written now and completed later.
    """
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    results = Path(results) if results else spec_path.parent / "results"
    results.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = data if data is not None else load_mnist()
    if spec.train_limit:
        data = data.subset(spec.train_limit, None)
    trained = reused = 0
    rows = []  # per variant: label, runs, records
    pending: list[Variant] = []
    for v in spec.variants:
        recipe = dataclasses.asdict(resolve_recipe(v.model, **v.overrides))
        adv = _adversarial(v)
        found = []
        for seed in spec.seeds:
            run = find_run(out, v.model, recipe, seed, len(data.train_x), data.checksum,
                           dataclasses.asdict(adv) if adv else None)
            if run is None and not train:
                break
            if run is None:
                log(f"training {v.label} ({v.model}, seed {seed})")
                run = train_run(v.model, out=out, seed=seed, device=device, data=data, adversarial=adv,
                                **v.overrides)
                trained += 1
            else:
                reused += 1
            found.append(run)
        if len(found) < len(spec.seeds):
            pending.append(v)
            continue
        rows.append((v, found, [runs.read_json(r / runs.RECORD) for r in found]))
    if not rows:
        raise AdvmnistError(f"{spec_path}: no variant has finished runs; run without --no-train first")

    attack_cols: list[tuple[str, list[list[dict]]]] = []
    for a in spec.attacks:
        eps_values = a.params.get("eps")
        sweep = eps_values if isinstance(eps_values, list) else [None]
        for i, eps in enumerate(sweep):
            label = a.label or a.method
            if eps is not None:
                label = f"{label} eps {eps:g}"
            log(f"attack {label}")
            point = {k: v[i] for k, v in a.params.items() if isinstance(v, list)}  # lists go with the eps list
            per_variant = [[_attack_cached(run, data, a, point, seed) for run, seed in zip(found, spec.seeds)]
                           for _, found, _ in rows]
            attack_cols.append((label, per_variant))

    robust = [[_robust_cached(run, data, spec.robust, seed, log) for run, seed in zip(found, spec.seeds)]
              for _, found, _ in rows] if spec.robust else []
    curve = _robust_curve(spec, rows, data, log) if spec.robust and spec.robust.curve else []
    page = _page(spec, spec_path, rows, attack_cols, results, data, pending,
                 _robust_section(spec, rows, robust, curve, results) if robust else "")
    transfer_md = _transfer(spec, rows, data, results, log) if spec.transfer else ""
    wall = time.perf_counter() - start
    text = page.replace("{TRANSFER}", transfer_md).replace(
        "{WALL}", f"{wall:.0f} s this invocation ({trained} run(s) trained, {reused} reused); "
                  f"training time of the runs themselves: "
                  f"{sum(r['wall_time_s'] for _, _, recs in rows for r in recs):.0f} s")
    target = results / f"{spec.name}.md"
    with runs.atomic_path(target) as tmp:
        tmp.write_text(text)
    return target


def _robust_cached(run: Path, data: MNIST, r: Robust, seed: int, log) -> dict:
    """`evaluate --robust` for one run, computed once and cached in the run directory."""
    from .evaluation import robust_evaluate_run

    def compute() -> dict:
        log(f"robust evaluation of {run.name}")
        return robust_evaluate_run(run, data, eps=r.eps, ensemble=r.ensemble, attacks=list(r.attacks) or None,
                                   steps=r.steps, restarts=r.restarts, queries=r.queries, norm=r.norm,
                                   alone=r.alone, limit=r.limit or None, check_n=r.check_n, certify=r.certify,
                                   seed=seed, log=lambda m: log(f"  {m}"))

    key = {k: v for k, v in dataclasses.asdict(r).items() if k not in _NOT_IN_KEY}
    path = run / "attack-cache" / f"robust-{_key({**key, 'seed': seed, 'data': data.checksum})}.json"
    rec = _cached(path, compute)
    if r.certify and rec.get("certified") is None:  # cached before certification existed: add it now
        rec = _add_certificate(run, data, rec, log)
        runs.write_json(path, rec)
    return rec


def _add_certificate(run: Path, data: MNIST, rec: dict, log) -> dict:
    """Certify a cached robust record's images and check them against its per-image result."""
    from .evaluation import certify_examples, check_soundness

    model, _ = runs.load_checkpoint(run)
    n = rec["n"]
    certificate, mask = certify_examples(model, data.test_x[:n], data.test_y[:n], rec["eps"], rec["norm"],
                                         lambda m: log(f"  {run.name}: {m}"))
    if mask is not None:
        if "not_robust" in rec:
            robust = torch.ones(n, dtype=torch.bool)
            robust[rec["not_robust"]] = False
            check_soundness(mask, robust, rec["eps"])
            certificate["soundness_checked"] = True
        else:  # the record predates per-image results: the check needs none when nothing is certified
            certificate["soundness_checked"] = not bool(mask.any())
    return {**rec, "certified": certificate,
            "interval": [certificate.get("certified_accuracy"), rec["robust_accuracy"]]}


def _robust_curve(spec: Spec, rows, data: MNIST, log) -> list[list[dict]]:
    """Per variant (first seed): the robust evaluation at every eps of the curve and the main eps."""
    r = spec.robust
    eps_values = sorted(set(r.curve) | {r.eps})
    return [[_robust_cached(found[0], data, dataclasses.replace(r, eps=e, limit=r.curve_limit or r.limit),
                            spec.seeds[0], log) for e in eps_values] for _, found, _ in rows]


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
    return " ".join(parts)


def _certified_cell(rec: dict) -> str:
    cert = rec.get("certified") or {}
    return _fmt(cert.get("certified_accuracy")) if "certified_accuracy" in cert else "–"


def _robust_section(spec: Spec, rows, robust: list[list[dict]], curve: list[list[dict]] = (),
                    results: Path | None = None) -> str:
    r = spec.robust
    first = robust[0][0]
    lines = ["## Robust accuracy under the standard evaluation", "",
             f"`{robust_command(r)}` on {first['n']} test images, worst case per example: an image counts as "
             "robust only if every attack below fails on it; each attack runs on the images all earlier ones "
             "left standing (as AutoAttack does). Mean over seeds. A flag means the number is not to be "
             "trusted: a sign of gradient masking or of an evaluation that has not converged.", "",
             "Certified: the share of images that interval bound propagation or CROWN (`advmnist/bounds.py`) "
             "proves robust, a lower bound no attack can break; the true robust accuracy lies between the "
             "certified and the attacked (robust) column. – : the model has a layer the bounds do not handle "
             "or certification was off.", "",
             "| variant | clean (%) | certified (%) | robust (%) | seeds | masking checks | evaluation time (s) |",
             "| --- | ---: | ---: | ---: | --- | --- | ---: |"]
    for (v, _, _), recs in zip(rows, robust):
        accs = [x["robust_accuracy"] for x in recs]
        flagged = [c for x in recs for c in x.get("masking", {}).get("failed", [])]
        badge = f"**FLAGGED** ({len(flagged)})" if flagged else "none fired"
        lines.append(f"| {v.label} | {statistics.fmean(x['clean_accuracy'] for x in recs):.2f} | "
                     f"{_certified_cell(recs[0])} | {statistics.fmean(accs):.2f} | {_per_seed(accs)} | {badge} | "
                     f"{statistics.fmean(x['wall_time_s'] for x in recs):.0f} |")
    if curve:
        lines += _curve_lines(spec, rows, curve, results)
    for (v, _, _), recs in zip(rows, robust):
        rec = recs[0]
        lines += ["", f"### {v.label}: robust accuracy after each attack (seed {spec.seeds[0]})", "",
                  "| attack | alone (%) | cumulative (%) | images attacked | seconds |",
                  "| --- | ---: | ---: | ---: | ---: |",
                  f"| none (clean) | {rec['clean_accuracy']:.2f} | {rec['clean_accuracy']:.2f} | | |"]
        lines += [f"| {a['attack']} | {_fmt(a.get('robust_accuracy_alone'))} | {a['robust_accuracy_after']:.2f} | "
                  f"{a.get('attacked', '')} | {a.get('seconds', '')} |" for a in rec["per_attack"]]
        lines += ["", f"Masking checks on the first {rec['settings']['check_n']} images:", ""]
        lines += [f"- {'passed' if c['passed'] else '**FLAGGED**'}: {c['check']} ({c['detail']})"
                  for c in rec["checks"]]
    return "\n".join(lines) + "\n\n"


def _curve_lines(spec: Spec, rows, curve: list[list[dict]], results: Path) -> list[str]:
    eps_values = [rec["eps"] for rec in curve[0]]
    n = curve[0][0]["n"]
    lines = ["", f"### Accuracy against eps: certified / attacked (%), {n} test images"
             + ("" if n == 10000 else " (a subset)") + f", seed {spec.seeds[0]}", "",
             "| variant | " + " | ".join(f"eps {e:g}" for e in eps_values) + " |",
             "| --- |" + " ---: |" * len(eps_values)]
    for (v, _, _), recs in zip(rows, curve):
        lines.append(f"| {v.label} | " + " | ".join(f"{_certified_cell(x)} / {x['robust_accuracy']:.2f}"
                                                    for x in recs) + " |")
    plot = f"{spec.name}_interval.png"
    _plot_interval(rows, curve, results / plot)
    return lines + ["", f"![certified and attacked accuracy against eps]({plot})"]


def _plot_interval(rows, curve: list[list[dict]], path: Path) -> None:
    """Attacked (upper) and certified (lower) robust accuracy against eps, the band between shaded."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4))
    for i, ((v, _, _), recs) in enumerate(zip(rows, curve)):
        style = _line_style(i)
        eps = [0.0] + [x["eps"] for x in recs]
        attacked = [recs[0]["clean_accuracy"]] + [x["robust_accuracy"] for x in recs]
        cert = [(x.get("certified") or {}).get("certified_accuracy") for x in recs]
        ax.plot(eps, attacked, ms=3, label=f"{v.label}: attacked", **style)
        if all(c is not None for c in cert):
            lower = [recs[0]["clean_accuracy"]] + cert
            ax.plot(eps, lower, ms=3, alpha=0.8, label=f"{v.label}: certified",
                    **{**style, "linestyle": "--"})
            ax.fill_between(eps, lower, attacked, color=style.get("color"), alpha=0.15)
    ax.set(xlabel="epsilon (Linf)", ylabel="accuracy (%)", ylim=(-2, 102),
           title="Robust accuracy: the truth lies in the shaded band")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    pictures._save(fig, path)


def _page(spec: Spec, spec_path: Path, rows, attack_cols, results: Path, data: MNIST,
          pending: list[Variant] = (), robust_md: str = "") -> str:
    lines = [f"# {spec.title}", "", spec.description.strip(), "",
             f"Spec: `{spec_path.as_posix()}`. Command: `advmnist experiment run {spec_path.as_posix()}`.",
             f"Seeds: {', '.join(map(str, spec.seeds))}; training images: {len(data.train_x)}; "
             f"test images: {len(data.test_x)}. Wall time: {{WALL}}.", "",
             "| variant | model | recipe | report (%) | ours (%) mean ± sd | seeds | Δ (pp) | verdict | train time (s) |",
             "| --- | --- | --- | ---: | ---: | --- | ---: | --- | ---: |"]
    misses = []
    for v, found, recs in rows:
        accs = [r["test_accuracy"] for r in recs]
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
            recipe += f"; {_adversarial(v)}"
        secs = statistics.fmean(r["wall_time_s"] for r in recs)
        lines.append(f"| {v.label} | `{v.model}` | {recipe} | {_fmt(v.reported)} | {mean:.2f} ± {sd:.2f} | "
                     f"{_per_seed(accs)} | {_fmt(delta, '+.2f')} | {verdict} | {secs:.0f} |")
    if pending:
        lines += ["", "**Pending** (not trained yet, left out of every table below; `advmnist experiment run "
                  f"{spec_path.as_posix()}` trains them and reuses everything else): "
                  + ", ".join(f"{v.label} (`{v.model}`, {get_spec(v.model).recipe})" for v in pending) + "."]
    if misses:
        lines += ["", "Differences beyond the seeds' spread plus 0.5 pp:", ""]
        for v, delta in misses:
            lines.append(f"- **{v.label}**: {delta:+.2f} pp. {v.note or 'No explanation recorded in the spec.'}")
    warned = [(v, r) for v, _, recs in rows for r in recs if r.get("warnings")]
    if warned:
        lines += ["", "Warnings recorded during training:", ""]
        for v, r in warned:
            lines += [f"- {v.label} (seed {r['seed']}): {w}" for w in r["warnings"]]
    if spec.per_class:
        lines += ["", "## Per-digit test accuracy (%), mean over seeds", "",
                  "| variant | " + " | ".join(str(d) for d in range(10)) + " |",
                  "| --- |" + " ---: |" * 10]
        for v, _, recs in rows:
            per = [statistics.fmean(r["per_class_accuracy"][d] for r in recs) for d in range(10)]
            lines.append(f"| {v.label} | " + " | ".join(f"{p:.1f}" for p in per) + " |")
    curves = f"{spec.name}_curves.png"
    _plot_histories(spec, rows, results / curves)
    lines += ["", f"![test accuracy per epoch]({curves})", ""]
    if attack_cols:
        lines += ["## Robustness", "",
                  "Robust accuracy (%) on the first test images under each attack (penalty: fooling rate "
                  "of report 001's target-penalized attack on the first test image of each digit, "
                  "target digit + 1); mean over seeds.", "",
                  "| variant | clean | " + " | ".join(label for label, _ in attack_cols) + " |",
                  "| --- | ---: |" + " ---: |" * len(attack_cols)]
        groups = _attack_groups(spec.attacks, attack_cols)
        for i, (v, _, recs) in enumerate(rows):
            cells = []
            for a, cols in groups:
                key = "fooling_rate" if a.method == "penalty" else "robust_accuracy"
                cells += [_fmt(statistics.fmean(m[key] for m in per_variant[i]), ".1f") for _, per_variant in cols]
            clean = statistics.fmean(r["test_accuracy"] for r in recs)
            lines.append(f"| {v.label} | {clean:.2f} | " + " | ".join(cells) + " |")
        plot = f"{spec.name}_robustness.png"
        if _plot_robustness(rows, groups, results / plot):  # linked only when drawn: no eps, no figure
            lines += ["", f"![robust accuracy against eps (eps 0: clean accuracy)]({plot})", ""]
    lines += [robust_md + "{TRANSFER}", ""]
    return "\n".join(lines)


def _plot_histories(spec: Spec, rows, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, (v, _, recs) in enumerate(rows):
        epochs = [h["epoch"] for h in recs[0]["history"]]
        acc = [statistics.fmean(r["history"][i]["test_accuracy"] for r in recs) for i in range(len(epochs))]
        line, = ax.plot(epochs, acc, ms=3, label=v.label, **_line_style(k))
        if all("robust_accuracy" in h for r in recs for h in r["history"]):
            robust = [statistics.fmean(r["history"][i]["robust_accuracy"] for r in recs) for i in range(len(epochs))]
            ax.plot(epochs, robust, ":", marker="x", ms=4, color=line.get_color(),
                    label=f"{v.label}: PGD accuracy on the monitor images")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=spec.title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    pictures._save(fig, path)


def _line_style(i: int) -> dict:
    """Ten colours, then the same colours dashed with square markers: no two lines look alike."""
    return {"color": f"C{i % 10}", "linestyle": "-" if i < 10 else "--", "marker": "o" if i < 10 else "s"}


def _attack_groups(attacks, attack_cols) -> list[tuple[AttackEval, list[tuple[float | None, list]]]]:
    """Each attack of the spec with its page columns, in the order `run_experiment` made them:
    (attack, [(eps, per_variant), ...]). eps comes from the attack's parameters (its default when the
    spec gives none); None for attacks without one (penalty, gd)."""
    groups, i = [], 0
    for a in attacks:
        given = a.params.get("eps", get_attack(a.method).defaults().get("eps"))
        eps_values = given if isinstance(given, list) else [given]
        cols = attack_cols[i: i + len(eps_values)]
        i += len(eps_values)
        groups.append((a, [(None if e is None else float(e), per_variant)
                           for e, (_, per_variant) in zip(eps_values, cols)]))
    assert i == len(attack_cols), "attack columns out of step with the spec's attacks"
    return groups


def _plot_robustness(rows, groups, path: Path) -> bool:
    """Robust accuracy against eps, one panel per attack with an eps, clean accuracy at eps 0.
    Returns whether a figure was written (False: no attack has an eps)."""
    panels = [(a, cols) for a, cols in groups if cols and all(eps is not None for eps, _ in cols)]
    if not panels:
        return False
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (a, cols) in zip(axes[0], panels):
        for i, (v, _, recs) in enumerate(rows):
            clean = statistics.fmean(r["test_accuracy"] for r in recs)
            ax.plot([0.0] + [eps for eps, _ in cols],
                    [clean] + [statistics.fmean(m["robust_accuracy"] for m in per_variant[i])
                               for _, per_variant in cols],
                    ms=3, label=v.label, **_line_style(i))
        others = ", ".join(f"{k}={val}" for k, val in a.params.items() if k != "eps")
        norm = "L2" if a.params.get("norm") == "l2" else "Linf"
        ax.set(xlabel=f"epsilon ({norm})", ylabel="robust accuracy (%)",
               title=f"{a.label or a.method}{f' ({others})' if others else ''}", ylim=(-2, 102))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    pictures._save(fig, path)
    return True


def _transfer(spec: Spec, rows, data: MNIST, results: Path, log) -> str:
    """Adversarial examples crafted on each model (first seed), fooling rate on every model."""
    t = spec.transfer
    attack = get_attack(t.method)
    models = []
    for v, found, _ in rows:
        model, _ = runs.load_checkpoint(found[0])
        models.append((v.label, found[0], model.eval()))
    x, y = data.test_x[: t.limit], data.test_y[: t.limit]
    correct = [predict_logits(m, x).argmax(1) == y for _, _, m in models]
    matrix = []
    for label, run, source in models:
        key = _key({"transfer": t.method, "params": t.params, "limit": t.limit, "data": data.checksum})
        cache = run / "attack-cache" / f"transfer-{key}.pt"
        if cache.is_file():
            x_adv = torch.load(cache, weights_only=True)
        else:
            log(f"transfer: crafting on {label}")
            params = dict(t.params)
            if "generator" in attack.defaults():
                params["generator"] = torch.Generator().manual_seed(0)
            x_adv = attack.fn(source, x, y, **params)
            cache.parent.mkdir(exist_ok=True)
            with runs.atomic_path(cache) as tmp:
                torch.save(x_adv, tmp)
        row = []
        for (_, _, target_model), ok in zip(models, correct):
            fooled = (predict_logits(target_model, x_adv).argmax(1) != y) & ok
            row.append(100.0 * fooled.sum().item() / max(ok.sum().item(), 1))
        matrix.append(row)
    labels = [m[0] for m in models]
    heat = f"{spec.name}_transfer.png"
    params = ", ".join(f"{k}={v}" for k, v in t.params.items())
    _plot_matrix(matrix, labels, results / heat, f"{t.method} ({params}): fooling rate (%)")
    lines = ["## Transfer", "",
             f"{t.method} ({params}) adversarial examples crafted on the row's model (seed {spec.seeds[0]}), "
             f"fed to the column's model: fooling rate (%) among the first {t.limit} test images the column's "
             f"model classifies correctly. The diagonal is the white-box attack.", "",
             "| crafted on \\ fed to | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
    for label, row in zip(labels, matrix):
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    lines += ["", f"![transfer matrix]({heat})", ""]
    return "\n".join(lines)


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


def list_experiments(directory: str | Path = "experiments") -> list[dict]:
    """Each spec under `directory` with its title and whether its results page exists."""
    directory = Path(directory)
    out = []
    for path in sorted(directory.glob("*.toml")):
        try:
            spec = load_spec(path)
            title, error = spec.title, None
        except AdvmnistError as exc:
            title, error = "", str(exc)
        page = directory / "results" / f"{path.stem}.md"
        out.append({"spec": str(path), "title": title, "results": str(page) if page.is_file() else None,
                    "error": error})
    return out
