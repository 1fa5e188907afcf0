"""Running an experiment: train what `runs/` lacks, attack and evaluate every run, then draw and write.

The runner trains only what `runs/` does not already hold (a run matches on model, recipe, seed,
training slice and data), so a rerun of a finished experiment trains nothing; attack and robust
results are cached in each run directory (`attack-cache/`) under the attack's parameters. Every
attack runs through `advmnist.execution.execute_attack`. All values are computed first
(`Outcome`), then `plots.draw` draws the figures and `page.render` writes the Markdown page.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch

from .. import runs
from ..attacks import get_attack
from ..attacks.core import default_alpha
from ..data import MNIST, load_mnist
from ..errors import AdvmnistError
from ..execution import execute_attack, select
from ..measures import attack_measures
from ..models import Recipe
from ..records import CachedAttack, Measures, RobustRecord, RunRecord, from_dict, read
from ..train import Adversarial, resolve_recipe, train_run
from . import page, plots
from .outcome import AttackColumn, Outcome, TransferMatrix, VariantRuns
from .spec import NOT_IN_KEY, AttackEval, Robust, Spec, Variant, adversarial_of, load_spec

_RECIPE_DEFAULTS = dataclasses.asdict(Recipe())  # fields added later read as their defaults in older records
_ADVERSARIAL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Adversarial)
                         if f.default is not dataclasses.MISSING}


def _same_adversarial(recorded: dict | None, wanted: dict | None) -> bool:
    if recorded is None or wanted is None:
        return recorded == wanted
    return {**_ADVERSARIAL_DEFAULTS, **recorded} == wanted


def find_run(out: str | Path, model: str, recipe: dict, seed: int, n_train: int, checksum: str,
             adversarial: dict | None = None) -> Path | None:
    """The newest finished run with exactly this model, recipe, adversarial training, seed,
    training slice and data."""
    for run in reversed(runs.find_runs(out, model)):  # only runs whose records hold runs.TRAIN_RECORD
        rec = read(run / runs.RECORD, RunRecord)
        if ({**_RECIPE_DEFAULTS, **rec.recipe} == recipe and rec.seed == seed and rec.n_train == n_train
                and rec.data_checksum == checksum and _same_adversarial(rec.adversarial, adversarial)):
            return run
    return None


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _cached(path: Path, compute: Callable[[], dict]) -> dict:
    """The JSON record at `path`, computed and written first if it is not there yet."""
    if not path.is_file():
        runs.write_json(path, compute())
    return runs.read_json(path)


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
    rows, pending, trained, reused = _find_or_train(spec, out, data, device, train, log)
    if not rows:
        raise AdvmnistError(f"{spec_path}: no variant has finished runs; run without --no-train first")
    columns = _attack_columns(spec, rows, data, log)
    robust = tuple(tuple(_robust_cached(run, data, spec.robust, seed, log) for run, seed in zip(r.runs, spec.seeds))
                   for r in rows) if spec.robust else ()
    curve = _robust_curve(spec, rows, data, log) if spec.robust and spec.robust.curve else ()
    transfer = _transfer(spec, rows, data, log) if spec.transfer else None
    outcome = Outcome(spec, spec_path, len(data.train_x), len(data.test_x), rows, pending, columns, robust, curve,
                      transfer, trained, reused, wall_s=0.0)
    figures = plots.draw(outcome, results)
    outcome = dataclasses.replace(outcome, wall_s=time.perf_counter() - start)
    target = results / f"{spec.name}.md"
    with runs.atomic_path(target) as tmp:
        tmp.write_text(page.render(outcome, figures))
    return target


def _find_or_train(spec: Spec, out, data: MNIST, device: str, train: bool, log
                   ) -> tuple[tuple[VariantRuns, ...], tuple[Variant, ...], int, int]:
    """Each variant's run per seed, reused when `runs/` holds it, else trained (or pending)."""
    trained = reused = 0
    rows, pending = [], []
    for v in spec.variants:
        recipe = dataclasses.asdict(resolve_recipe(v.model, **v.overrides))
        adv = adversarial_of(v)
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
        rows.append(VariantRuns(v, tuple(found), tuple(read(r / runs.RECORD, RunRecord) for r in found)))
    return tuple(rows), tuple(pending), trained, reused


def _attack_columns(spec: Spec, rows, data: MNIST, log) -> tuple[AttackColumn, ...]:
    """A column per attack and point of its eps list (parameters given as lists go with the eps list)."""
    columns = []
    for group, a in enumerate(spec.attacks):
        given = a.params.get("eps", get_attack(a.method).defaults().get("eps"))
        sweep = given if isinstance(given, list) else [given]
        for i, eps in enumerate(sweep):
            label = a.label or a.method
            if isinstance(given, list):
                label = f"{label} eps {eps:g}"
            log(f"attack {label}")
            point = {k: v[i] for k, v in a.params.items() if isinstance(v, list)}
            cells = tuple(tuple(_attack_cached(run, data, a, point, seed) for run, seed in zip(r.runs, spec.seeds))
                          for r in rows)
            columns.append(AttackColumn(a, group, label, None if eps is None else float(eps), cells))
    return tuple(columns)


def _attack_cached(run: Path, data: MNIST, a: AttackEval, point: dict, seed: int) -> Measures:
    """Overall attack measures for one run, computed once and cached in the run directory.
    `point`: this column's values of the parameters given as lists (eps and what goes with it)."""
    params = {**a.params, **point}
    if a.method == "pgd" and "alpha" not in params:  # the key holds the step used, not "the default of the day"
        params["alpha"] = default_alpha(params.get("eps", 0.3), params.get("steps", 40))
    key = {"method": a.method, "params": params, "limit": a.limit, "seed": seed, "data": data.checksum}
    rec = _cached(run / "attack-cache" / f"{a.method}-{_key(key)}.json",
                  lambda: {**key, **_attack(run, data, a, params, seed)})
    return from_dict(CachedAttack, rec).overall


def _attack(run: Path, data: MNIST, a: AttackEval, params: dict, seed: int) -> dict:
    """The attack on the first `limit` test images, or, for attacks that always aim at a target, on
    the first image of each digit with target digit + 1."""
    model, _ = runs.load_checkpoint(run)
    targeted = get_attack(a.method).always_targeted
    chosen = select(data, per_digit=1, targeted=True) if targeted else select(data, limit=a.limit)
    x, y = data.test_x[chosen.indices], data.test_y[chosen.indices]
    done = execute_attack(model, a.method, x, y, target=chosen.target, params=params, seed=seed)
    return {"overall": done.measures["overall"], "seconds": done.seconds}


def _robust_cached(run: Path, data: MNIST, r: Robust, seed: int, log) -> RobustRecord:
    """`evaluate --robust` for one run, computed once and cached in the run directory."""
    from ..evaluation import robust_evaluate_run

    def compute() -> dict:
        log(f"robust evaluation of {run.name}")
        return robust_evaluate_run(run, data, eps=r.eps, ensemble=r.ensemble, attacks=list(r.attacks) or None,
                                   steps=r.steps, restarts=r.restarts, queries=r.queries, norm=r.norm,
                                   alone=r.alone, limit=r.limit or None, check_n=r.check_n, certify=r.certify,
                                   seed=seed, log=lambda m: log(f"  {m}"))

    key = {k: v for k, v in dataclasses.asdict(r).items() if k not in NOT_IN_KEY}
    path = run / "attack-cache" / f"robust-{_key({**key, 'seed': seed, 'data': data.checksum})}.json"
    rec = _cached(path, compute)
    if r.certify and rec.get("certified") is None:  # cached before certification existed: add it now
        rec = _add_certificate(run, data, rec, log)
        runs.write_json(path, rec)
    return from_dict(RobustRecord, rec)


def _add_certificate(run: Path, data: MNIST, rec: dict, log) -> dict:
    """Certify a cached robust record's images and check them against its per-image result."""
    from ..evaluation import certify_examples, check_soundness

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


def _robust_curve(spec: Spec, rows, data: MNIST, log) -> tuple[tuple[RobustRecord, ...], ...]:
    """Per variant (first seed): the robust evaluation at every eps of the curve and the main eps."""
    r = spec.robust
    eps_values = sorted(set(r.curve) | {r.eps})
    return tuple(tuple(_robust_cached(row.runs[0], data, dataclasses.replace(r, eps=e, limit=r.curve_limit or r.limit),
                                      spec.seeds[0], log) for e in eps_values) for row in rows)


def _transfer(spec: Spec, rows, data: MNIST, log) -> TransferMatrix:
    """Adversarial examples crafted on each variant's model (first seed), cached in its run directory;
    their fooling rate (`attack_measures`) on every model."""
    t = spec.transfer
    models = [(row.variant.label, row.runs[0], runs.load_checkpoint(row.runs[0])[0]) for row in rows]
    x, y = data.test_x[: t.limit], data.test_y[: t.limit]
    matrix = []
    for label, run, source in models:
        key = _key({"transfer": t.method, "params": t.params, "limit": t.limit, "data": data.checksum})
        cache = run / "attack-cache" / f"transfer-{key}.pt"
        if cache.is_file():
            x_adv = torch.load(cache, weights_only=True)
        else:
            log(f"transfer: crafting on {label}")
            x_adv = execute_attack(source, t.method, x, y, params=t.params, seed=0, measure=False).x_adv
            cache.parent.mkdir(exist_ok=True)
            with runs.atomic_path(cache) as tmp:
                torch.save(x_adv, tmp)
        matrix.append(tuple(attack_measures(target, x, y, x_adv)["overall"]["fooling_rate"] or 0.0
                            for _, _, target in models))
    return TransferMatrix(t, tuple(label for label, _, _ in models), tuple(matrix))
