"""Running an experiment: train what `runs/` lacks, attack and evaluate every run, then draw and write.

The runner trains only what `runs/` does not already hold (a run matches on model, recipe, seed,
training slice and data), so a rerun of a finished experiment trains nothing; attack and robust
results are cached in each run directory (`attack-cache/`) under the attack's parameters. Every
attack runs through `advmnist.execution.execute_attack`. All values are computed first
(`Outcome`), then `plots.draw` draws the figures and `page.render` writes the Markdown page.

Each training run, attack cell, robust evaluation and transfer crafting is handed to an executor
(`executors.py`) as a module-level function of picklable arguments; an attack takes the handle of
the run it attacks. The local executor runs each at once, in this order; the Ray executor runs them
as tasks and `wait` gathers them. The transfer matrix (every crafted batch fed to every model), the
figures and the page are computed here, in this process, from the gathered results.
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
from ..devices import pick_device
from ..errors import AdvmnistError
from ..execution import execute_attack, select
from ..measures import attack_measures, distance_profile
from ..models import Recipe
from ..records import CachedAttack, RobustRecord, RunRecord, from_dict, read
from ..train import Adversarial, resolve_recipe, train_run
from . import page, plots
from .executors import Executor, Handle, LocalExecutor, known
from .outcome import AttackColumn, Outcome, TransferMatrix, VariantRuns
from .spec import NOT_IN_KEY, AttackEval, Robust, Spec, Transfer, Variant, adversarial_of, load_spec

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
                   log: Callable[[str], None] = lambda s: None, executor: Executor | None = None) -> Path:
    """Train what is missing, evaluate, attack, and write `<results>/<name>.md` with its plots.

    With `train=False` nothing is trained: variants without finished runs are listed as pending
    and left out of attacks and transfer, so a partial page can be written now and completed later.
    `executor` (`executors.make_executor`): where the training runs and attacks run; default: in this
    process, one after another. The page is the same whichever runs them, times aside.
    """
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    results = Path(results) if results else spec_path.parent / "results"
    results.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = data if data is not None else load_mnist()
    if spec.train_limit:
        data = data.subset(spec.train_limit, None)
    out = Path(out)
    dev = str(pick_device(device))
    ex = executor if executor is not None else LocalExecutor()
    if isinstance(ex, LocalExecutor):
        data = data.to(dev)  # moved once; Ray workers load and move their own
    plan = _Plan(ex, data, log, dev)
    if not isinstance(plan.ex, LocalExecutor):
        runs.check_output_dir(out)  # before any task is queued
    rows, pending, trained, reused = _find_or_train(spec, out, dev, train, plan)
    if not rows:
        raise AdvmnistError(f"{spec_path}: no variant has finished runs; run without --no-train first")
    columns = _attack_columns(spec, rows, plan)
    robust = tuple(tuple(plan.robust(run, spec.robust, seed, f"{v.label}, seed {seed}")
                         for run, seed in zip(handles, spec.seeds)) for v, handles in rows) if spec.robust else ()
    curve = _robust_curve(spec, rows, plan) if spec.robust and spec.robust.curve else ()
    if spec.transfer:
        for v, handles in rows:
            plan.craft(handles[0], spec.transfer, f"transfer crafting on {v.label}, seed {spec.seeds[0]}", v.label)
    plan.ex.wait()  # every task has finished; TasksFailed names each that failed

    found = []
    for v, handles in rows:
        paths = tuple(out / Path(h.result()).name for h in handles)  # as find_run names them
        found.append(VariantRuns(v, paths, tuple(read(p / runs.RECORD, RunRecord) for p in paths)))
    rows = tuple(found)
    columns = tuple(_gathered(c, rows) for c in columns)
    robust = tuple(tuple(from_dict(RobustRecord, h.result()) for h in per_seed) for per_seed in robust)
    curve = tuple(tuple(from_dict(RobustRecord, h.result()) for h in per_eps) for per_eps in curve)
    transfer = _transfer(spec, rows, data, dev) if spec.transfer else None
    outcome = Outcome(spec, spec_path, len(data.train_x), len(data.test_x), rows, pending, columns, robust, curve,
                      transfer, trained, reused, wall_s=0.0, executor=plan.ex.note())
    figures = plots.draw(outcome, results)
    outcome = dataclasses.replace(outcome, wall_s=time.perf_counter() - start)
    target = results / f"{spec.name}.md"
    with runs.atomic_path(target) as tmp:
        tmp.write_text(page.render(outcome, figures))
    return target


class _Plan:
    """Hands the runner's work to the executor: each cached result is read here when its run is
    finished and its cache holds it, else computed by a task (once, however often it is asked for)."""

    def __init__(self, ex: Executor, data: MNIST, log: Callable[[str], None], device: str = "cpu"):
        self.ex, self.data, self.log, self.device = ex, data, log, device
        self.gpu = device.startswith("cuda")
        self._asked: dict[tuple[int, str], Handle] = {}

    def _cell(self, run: Handle, name: str, usable: Callable[[dict], bool], what: str, fn, *args) -> Handle:
        key = (id(run), name)
        if key not in self._asked:
            path = run.value / "attack-cache" / name if run.done else None
            rec = runs.read_json(path) if path is not None and path.is_file() else None
            self._asked[key] = (known(rec) if rec is not None and usable(rec)
                                else self.ex.submit(fn, run, *args, what=what, gpu=self.gpu))
        return self._asked[key]

    def attack(self, run: Handle, a: AttackEval, point: dict, seed: int, what: str) -> Handle:
        """The cached attack record (`CachedAttack` as a dict) of one cell."""
        _, key = _attack_key(a, point, seed, self.data)
        return self._cell(run, f"{a.method}-{_key(key)}.json", lambda rec: True, what,
                          _attack_record, self.data, a, point, seed, self.device)

    def robust(self, run: Handle, r: Robust, seed: int, what: str) -> Handle:
        """The cached `RobustRecord` (as a dict) of one run."""
        def usable(rec: dict) -> bool:  # else certified first (`_robust_record`)
            return not (r.certify and rec.get("certified") is None)

        return self._cell(run, _robust_name(r, seed, self.data), usable, f"robust evaluation of {what}",
                          _robust_record, self.data, r, seed, self.ex.task_log(self.log), self.device)

    def craft(self, run: Handle, t: Transfer, what: str, label: str) -> Handle:
        """The transfer examples crafted on one run, saved in its `attack-cache/`."""
        key = (id(run), _transfer_path(Path(), t, self.data).name)
        if key not in self._asked:
            if run.done and _transfer_path(run.value, t, self.data).is_file():
                self._asked[key] = known(_transfer_path(run.value, t, self.data))
            else:
                self.log(f"transfer: crafting on {label}")
                self._asked[key] = self.ex.submit(_craft, run, self.data, t, self.device, what=what, gpu=self.gpu)
        return self._asked[key]


def _train(model: str, out: Path, seed: int, device: str, data: MNIST, adversarial: Adversarial | None,
           overrides: dict) -> Path:
    return train_run(model, out=out, seed=seed, device=device, data=data, adversarial=adversarial, **overrides)


def _find_or_train(spec: Spec, out: Path, device: str, train: bool, plan: _Plan
                   ) -> tuple[tuple[tuple[Variant, tuple[Handle, ...]], ...], tuple[Variant, ...], int, int]:
    """Each variant's run per seed, reused when `runs/` holds it, else trained (or pending)."""
    trained = reused = 0
    rows, pending = [], []
    data = plan.data
    queued: dict[str, Handle] = {}  # trainings handed over, not yet finished: another variant may be the same run
    for v in spec.variants:
        recipe = dataclasses.asdict(resolve_recipe(v.model, **v.overrides))
        adv = adversarial_of(v)
        found = []
        for seed in spec.seeds:
            run = find_run(out, v.model, recipe, seed, len(data.train_x), data.checksum,
                           dataclasses.asdict(adv) if adv else None)
            same = _key([v.model, recipe, seed, dataclasses.asdict(adv) if adv else None])
            if run is None and same in queued:  # found by find_run once trained, as the local executor finds it
                found.append(queued[same])
                reused += 1
                continue
            if run is None and not train:
                break
            if run is None:
                plan.log(f"training {v.label} ({v.model}, seed {seed})")
                queued[same] = plan.ex.submit(_train, v.model, out, seed, device, data, adv, dict(v.overrides),
                                              what=f"training {v.label} ({v.model}), seed {seed}",
                                              gpu=device.startswith("cuda"))
                found.append(queued[same])
                trained += 1
            else:
                found.append(known(run))
                reused += 1
        if len(found) < len(spec.seeds):
            pending.append(v)
            continue
        rows.append((v, tuple(found)))
    return tuple(rows), tuple(pending), trained, reused


def _attack_columns(spec: Spec, rows, plan: _Plan) -> tuple[AttackColumn, ...]:
    """A column per attack and point of its eps list (parameters given as lists go with the eps list).
    Its cells hold the handles of the cached records until the runner has gathered them."""
    columns = []
    for group, a in enumerate(spec.attacks):
        given = a.params.get("eps", get_attack(a.method).defaults().get("eps"))
        sweep = given if isinstance(given, list) else [given]
        for i, eps in enumerate(sweep):
            label = a.label or a.method
            if isinstance(given, list):
                label = f"{label} eps {eps:g}"
            plan.log(f"attack {label}")
            point = {k: v[i] for k, v in a.params.items() if isinstance(v, list)}
            cells = tuple(tuple(plan.attack(run, a, point, seed, f"attack {label} on {v.label}, seed {seed}")
                                for run, seed in zip(handles, spec.seeds)) for v, handles in rows)
            columns.append(AttackColumn(a, group, label, None if eps is None else float(eps), cells))
    return tuple(columns)


def _gathered(c: AttackColumn, rows: tuple[VariantRuns, ...]) -> AttackColumn:
    """A column whose cells held task handles, with the records they produced."""
    records = tuple(tuple(from_dict(CachedAttack, h.result()) for h in row) for row in c.cells)
    grids = tuple(row.runs[0] / "attack-cache" / recs[0].grid["images"] if recs[0].grid else None
                  for row, recs in zip(rows, records))
    return dataclasses.replace(c, cells=tuple(tuple(r.overall for r in recs) for recs in records), records=records,
                               grids=grids)


def _attack_key(a: AttackEval, point: dict, seed: int, data: MNIST) -> tuple[dict, dict]:
    """The attack's parameters at this point, and its cache key.
    `point`: this column's values of the parameters given as lists (eps and what goes with it)."""
    params = {**a.params, **point}
    if a.method == "pgd" and "alpha" not in params:  # the key holds the step used, not "the default of the day"
        params["alpha"] = default_alpha(params.get("eps", 0.3), params.get("steps", 40))
    key = {"method": a.method, "params": params, "limit": a.limit, "seed": seed, "data": data.checksum}
    if a.target_map:  # only where given: the keys of caches made before it existed stay as they were
        key["target_map"] = a.target_map
    return params, key


def _attack_record(run: Path, data: MNIST, a: AttackEval, point: dict, seed: int, device: str = "cpu") -> dict:
    """Overall attack measures for one run (a `CachedAttack` record), computed once and cached in the
    run directory."""
    params, key = _attack_key(a, point, seed, data)
    grid = _grid_path(run, a, key) if a.target_map == "all" else None
    return _cached(run / "attack-cache" / f"{a.method}-{_key(key)}.json",
                   lambda: {**key, **_attack(run, data, a, params, seed, device, grid)})


def _grid_path(run: Path, a: AttackEval, key: dict) -> Path:
    return run / "attack-cache" / f"{a.method}-{_key(key)}-grid.pt"


def _attack(run: Path, data: MNIST, a: AttackEval, params: dict, seed: int, device: str = "cpu",
            grid_path: Path | None = None) -> dict:
    """The attack on the first `limit` test images, or, for attacks that always aim at a target, on
    the first image of each digit with target digit + 1 (every other digit with `target_map` "all",
    whose adversarial images are saved at `grid_path` for the page's grid). A minimum-norm attack's
    record holds its distance profile."""
    model, _ = runs.load_checkpoint(run, map_location=device)
    spec = get_attack(a.method)
    targeted = spec.always_targeted or bool(a.target_map)
    chosen = (select(data, per_digit=1, targeted=True, target_map=a.target_map or "next") if targeted
              else select(data, limit=a.limit))
    x, y = data.test_x[chosen.indices].to(device), data.test_y[chosen.indices].to(device)
    target = None if chosen.target is None else chosen.target.to(device)
    done = execute_attack(model, a.method, x, y, target=target, params=params, seed=seed)
    out = {"overall": done.measures["overall"], "seconds": done.seconds}
    ex = done.measures["per_example"]
    norm = spec.distance_norm(done.params)
    if norm is not None:
        out["distance"] = distance_profile(ex, y.tolist(), norm, targeted=target is not None)
    if a.target_map == "all" and grid_path is not None:
        size_norm = norm or "l2"
        out["grid"] = {"test_index": chosen.indices.tolist(), "true": y.tolist(), "target": target.tolist(),
                       "clean_pred": ex["clean_pred"], "adv_pred": ex["adv_pred"], "norm": size_norm,
                       "size": ex[size_norm], "images": grid_path.name}
        torch.save({"x": x.cpu(), "x_adv": done.x_adv.cpu()}, grid_path)
    return out


def _robust_name(r: Robust, seed: int, data: MNIST) -> str:
    key = {k: v for k, v in dataclasses.asdict(r).items()
           if k not in NOT_IN_KEY and not (k == "bound" and v == "auto")}  # auto: the keys cached before --bound
    return f"robust-{_key({**key, 'seed': seed, 'data': data.checksum})}.json"


def _robust_record(run: Path, data: MNIST, r: Robust, seed: int, log, device: str = "cpu") -> dict:
    """`evaluate --robust` for one run (a `RobustRecord` record), computed once and cached in the run
    directory."""
    from ..evaluation import robust_evaluate_run

    def compute() -> dict:
        log(f"robust evaluation of {run.name}")
        return robust_evaluate_run(run, data, eps=r.eps, ensemble=r.ensemble, attacks=list(r.attacks) or None,
                                   steps=r.steps, restarts=r.restarts, queries=r.queries, norm=r.norm,
                                   alone=r.alone, limit=r.limit or None, check_n=r.check_n, certify=r.certify,
                                   bound=r.bound, seed=seed, device=device, log=lambda m: log(f"  {m}"), write=False)

    path = run / "attack-cache" / _robust_name(r, seed, data)
    rec = _cached(path, compute)
    if r.certify and rec.get("certified") is None:  # cached before certification existed: add it now
        rec = _add_certificate(run, data, rec, log, device)
        runs.write_json(path, rec)
    return rec


def _add_certificate(run: Path, data: MNIST, rec: dict, log, device: str = "cpu") -> dict:
    """Certify a cached robust record's images and check them against its per-image result."""
    from ..evaluation import certify_examples, check_soundness

    model, _ = runs.load_checkpoint(run, map_location=device)
    n = rec["n"]
    certificate, mask = certify_examples(model, data.test_x[:n].to(device), data.test_y[:n].to(device), rec["eps"],
                                         rec["norm"], lambda m: log(f"  {run.name}: {m}"))
    mask = mask.cpu() if mask is not None else None
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


def _robust_curve(spec: Spec, rows, plan: _Plan) -> tuple[tuple[Handle, ...], ...]:
    """Per variant (first seed): the robust evaluation at every eps of the curve and the main eps."""
    r = spec.robust
    eps_values = sorted(set(r.curve) | {r.eps})
    return tuple(tuple(plan.robust(handles[0], dataclasses.replace(r, eps=e, limit=r.curve_limit or r.limit),
                                   spec.seeds[0], f"{v.label}, seed {spec.seeds[0]}, eps {e:g}")
                       for e in eps_values) for v, handles in rows)


def _transfer_path(run: Path, t: Transfer, data: MNIST) -> Path:
    key = _key({"transfer": t.method, "params": t.params, "limit": t.limit, "data": data.checksum})
    return run / "attack-cache" / f"transfer-{key}.pt"


def _craft(run: Path, data: MNIST, t: Transfer, device: str = "cpu") -> Path:
    """Adversarial examples crafted on the run's model, cached in its run directory."""
    cache = _transfer_path(run, t, data)
    if not cache.is_file():
        source = runs.load_checkpoint(run, map_location=device)[0]
        x, y = data.test_x[: t.limit].to(device), data.test_y[: t.limit].to(device)
        x_adv = execute_attack(source, t.method, x, y, params=t.params, seed=0, measure=False).x_adv
        cache.parent.mkdir(exist_ok=True)
        with runs.atomic_path(cache) as tmp:
            torch.save(x_adv.cpu(), tmp)
    return cache


def _transfer(spec: Spec, rows, data: MNIST, device: str = "cpu") -> TransferMatrix:
    """The examples crafted on each variant's model (first seed; `_craft`), their fooling rate
    (`attack_measures`) on every model."""
    t = spec.transfer
    models = [(row.variant.label, row.runs[0], runs.load_checkpoint(row.runs[0], map_location=device)[0])
              for row in rows]
    x, y = data.test_x[: t.limit].to(device), data.test_y[: t.limit].to(device)
    matrix = []
    for _, run, _ in models:
        x_adv = torch.load(_transfer_path(run, t, data), map_location=device, weights_only=True)
        matrix.append(tuple(attack_measures(target, x, y, x_adv)["overall"]["fooling_rate"] or 0.0
                            for _, _, target in models))
    return TransferMatrix(t, tuple(label for label, _, _ in models), tuple(matrix))
