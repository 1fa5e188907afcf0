"""Robust accuracy measured without fooling ourselves: worst case per example, and sanity checks.

`worst_case` runs the strongest attacks the project has, one after another, each only on the
examples every earlier attack failed to break; an example counts as robust only if it is classified
correctly under all of them. `sanity_checks` runs the tests the literature on evaluating defences
asks for (Carlini et al. 2019, "On Evaluating Adversarial Robustness"; AutoAttack's checks): a
failed check is a sign of gradient masking or a broken evaluation, not of robustness.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .attacks import frozen, get_attack, gradient_fn
from .attacks.core import default_alpha
from .errors import AdvmnistError
from .execution import execute_attack
from .measures import eval_mode, predict_logits


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return predict_logits(model, x).argmax(1) == y


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str, params: dict, **how) -> float:
    """Accuracy (%) on the images `method` makes of x (advmnist.execution.execute_attack, unmeasured)."""
    adv = execute_attack(model, method, x, y, params=params, measure=False, **how).x_adv
    return 100.0 * _correct(model, adv, y).float().mean().item()


def worst_case(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100,
               restarts: int = 5, alpha: float | None = None, targeted: bool = True, seed: int = 0,
               log: Callable[[str], None] = lambda s: None) -> dict:
    """Robust accuracy (%) under FGSM, PGD-`steps` with `restarts`, and targeted PGD to every other
    class, worst case per example: `run_ensemble` over the "pgd" ensemble."""
    stages = tuple(s for s in _pgd_stages(steps, restarts) if targeted or not s.params.get("targeted"))
    if alpha is not None:
        stages = tuple(dataclasses.replace(s, params={**s.params, "alpha": alpha}) if s.attack == "pgd" else s
                       for s in stages)
    result = run_ensemble(model, x, y, eps=eps, stages=stages, seed=seed, log=log)
    result.pop("robust_mask")
    result.pop("broken_by")
    return result


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, restarts: int = 1,
                 seed: int = 0) -> float:
    """Accuracy (%) under untargeted Linf PGD from a seeded random start (each batch of 1000 from the
    same seed)."""
    return _accuracy(model, x, y, "pgd", {"eps": eps, "steps": steps, "restarts": restarts,
                                          "alpha": default_alpha(eps, steps)}, seed=seed, reseed_each_batch=True)


def zero_gradient_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int = 500) -> dict:
    """Input gradients that are all zero (a quantised or saturated model) hide it from gradient attacks."""
    with frozen(model):
        g, _ = gradient_fn(model, x[:n])(x[:n], y[:n])
    zero = (g.flatten(1).abs().amax(1) == 0).float().mean().item() * 100
    return {"check": "input gradients are not zero", "passed": zero < 1.0,
            "detail": f"{zero:.1f}% of examples have an all-zero input gradient"}


def sanity_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, tolerance: float = 1.0,
                  seed: int = 0, steps: int = 20, more_steps: int = 100) -> list[dict]:
    """Checks that robust accuracy is real: each is {check, passed, detail}.

    1. accuracy falls (does not rise) as eps grows;  2. at eps = 1 (any image) accuracy is ~0;
    3. a multi-step attack is at least as strong as a single step;  4. more steps and restarts
    do not raise accuracy;  5. input gradients are not zero (a sign of masking or saturation).
    """
    checks = []
    with eval_mode(model):
        epsilons = [eps / 4, eps / 2, eps, 1.0]
        accs = [pgd_accuracy(model, x, y, e, steps, seed=seed) for e in epsilons]
        falling = all(b <= a + tolerance for a, b in zip(accs, accs[1:]))
        checks.append({"check": "accuracy falls as eps grows", "passed": falling,
                       "detail": ", ".join(f"eps {e:g}: {a:.1f}%" for e, a in zip(epsilons, accs))})
        checks.append({"check": "accuracy reaches ~0 at eps = 1", "passed": accs[-1] <= 5.0,
                       "detail": f"PGD-{steps} at eps 1: {accs[-1]:.1f}% (an unbounded attack must win)"})
        single = _accuracy(model, x, y, "fgsm", {"eps": eps})
        checks.append({"check": "multi-step beats single-step", "passed": accs[2] <= single + tolerance,
                       "detail": f"PGD-{steps} {accs[2]:.1f}% vs FGSM {single:.1f}%"})
        more = pgd_accuracy(model, x, y, eps, more_steps, restarts=2, seed=seed + 1)
        checks.append({"check": "more steps and restarts do not raise accuracy", "passed": more <= accs[2] + tolerance,
                       "detail": f"PGD-{more_steps} x 2 restarts {more:.1f}% vs PGD-{steps} {accs[2]:.1f}%"})
        checks.append(zero_gradient_check(model, x, y))
    return checks


# --- The standard evaluation: an AutoAttack-style ensemble and a masking detector -------------------

@dataclass(frozen=True)
class Stage:
    """One attack of an ensemble: a registry attack with fixed parameters (eps is added per run)."""

    key: str  # what `--attacks` names: apgd-ce, apgd-t, square, ...
    label: str  # what tables print
    attack: str  # the attack registry's name
    params: dict = field(default_factory=dict)
    gradient_free: bool = False


def _standard(steps: int, targets: int, queries: int, fab: bool = False) -> tuple[Stage, ...]:
    stages = [Stage("apgd-ce", f"APGD-CE ({steps} steps)", "apgd", {"steps": steps, "loss": "ce"}),
              Stage("apgd-t", f"APGD-T ({steps} steps x {targets} targets)", "apgd-t", {"steps": steps, "targets": targets})]
    if fab:
        stages.append(Stage("fab-t", f"FAB-T ({steps} steps x {targets} targets)", "fab-t",
                            {"steps": steps, "targets": targets}))
    stages.append(Stage("square", f"Square ({queries} queries)", "square", {"queries": queries}, gradient_free=True))
    return tuple(stages)


def _pgd_stages(steps: int = 100, restarts: int = 5) -> tuple[Stage, ...]:
    stages = [Stage("fgsm", "FGSM", "fgsm")]
    stages += [Stage(f"pgd-{r + 1}", f"PGD-{steps}, restart {r + 1}/{restarts}", "pgd", {"steps": steps, "seed_offset": 100 * r})
               for r in range(restarts)]
    stages += [Stage(f"pgd-t{k}", f"targeted PGD-{steps}, target = label + {k}", "pgd",
                     {"steps": steps, "targeted": True, "target_shift": k, "seed_offset": k}) for k in range(1, 10)]
    return tuple(stages)


# `autoattack` is Croce & Hein 2020's standard AutoAttack: APGD-CE, APGD-T, FAB-T, Square at the
# paper's budgets. `standard`, the default, leaves FAB-T out: it costs more than APGD-T, and on the
# models of benchmarks/results.md the final number with it stayed within Square's seed-to-seed spread
# of the number without it. `quick` is for tests and sweeps; `pgd` is the PGD-based evaluation
# (FGSM, PGD restarts, targeted PGD) this project used before, kept to compare.
ENSEMBLES: dict[str, Callable[..., tuple[Stage, ...]]] = {
    "standard": lambda steps=None, restarts=None, queries=None: _standard(steps or 100, 9, queries or 5000),
    "autoattack": lambda steps=None, restarts=None, queries=None: _standard(steps or 100, 9, queries or 5000, fab=True),
    "quick": lambda steps=None, restarts=None, queries=None: _standard(steps or 20, 3, queries or 500),
    "pgd": lambda steps=None, restarts=None, queries=None: _pgd_stages(steps or 100, restarts or 5),
}


def ensemble_stages(ensemble: str = "standard", attacks: tuple[str, ...] | list[str] | None = None, *,
                    steps: int | None = None, restarts: int | None = None,
                    queries: int | None = None) -> tuple[Stage, ...]:
    """The stages of a named ensemble, optionally only those whose key is in `attacks`."""
    if ensemble not in ENSEMBLES:
        raise AdvmnistError(f"unknown ensemble {ensemble!r}; choose one of: {', '.join(ENSEMBLES)}")
    for name, value in (("steps", steps), ("restarts", restarts), ("queries", queries)):
        if value is not None and value < 1:
            raise AdvmnistError(f"{name} must be >= 1, got {value}")
    stages = ENSEMBLES[ensemble](steps=steps, restarts=restarts, queries=queries)
    if ensemble != "pgd" and restarts:
        stages = tuple(dataclasses.replace(s, params={**s.params, "restarts": restarts})
                       if "restarts" in get_attack(s.attack).defaults() else s for s in stages)
    if attacks:
        keys = [s.key for s in stages]
        unknown = [a for a in attacks if a not in keys]
        if unknown:
            raise AdvmnistError(f"ensemble {ensemble!r} has no attack {', '.join(map(repr, unknown))}; "
                                f"it has: {', '.join(keys)}")
        stages = tuple(s for s in stages if s.key in attacks)
    return stages


def _run_stage(model: nn.Module, stage: Stage, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str,
               seed: int, batch_size: int | None) -> torch.Tensor:
    """Whether each example is still classified correctly after the stage's attack."""
    params = dict(stage.params)
    offset = params.pop("seed_offset", 0)
    shift = params.pop("target_shift", 0)
    kw = {"eps": eps, **params}
    if "norm" in get_attack(stage.attack).defaults():
        kw["norm"] = norm
    goal = (y + shift) % 10 if shift else y  # targeted stages: y for the attack holds the targets
    adv = execute_attack(model, stage.attack, x, goal, params=kw, seed=seed + offset, batch_size=batch_size,
                         measure=False).x_adv
    return _correct(model, adv, y)


def run_ensemble(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, stages: tuple[Stage, ...],
                 norm: str = "linf", seed: int = 0, alone: bool = False, batch_size: int | None = None,
                 proven: torch.Tensor | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Robust accuracy (%) under an ensemble, worst case per example.

    Each stage attacks the examples every earlier stage left robust (as AutoAttack does); the
    table gives robust accuracy after each stage cumulatively and, with `alone`, under each attack
    by itself (then every stage attacks every clean-correct example, which costs more). Examples in
    `proven` (certified robust by `advmnist.bounds`) count as robust and are not attacked.
    """
    start = time.perf_counter()
    with eval_mode(model):
        clean_ok = _correct(model, x, y)
        robust = clean_ok.clone()
        broken_by = torch.full((len(y),), -1, dtype=torch.long, device=y.device)  # stage index, -1: none
        rows = []
        for i, stage in enumerate(stages):
            t0 = time.perf_counter()
            todo = clean_ok if alone or i == 0 else robust
            idx = (todo if proven is None else todo & ~proven).nonzero().flatten()
            survived = clean_ok.clone()
            if len(idx):
                survived[idx] = _run_stage(model, stage, x[idx], y[idx], eps=eps, norm=norm, seed=seed + i,
                                           batch_size=batch_size)
            before = 100.0 * robust.float().mean().item()
            broken_by[robust & ~survived] = i
            robust &= survived
            row = {"attack": stage.label, "key": stage.key, "gradient_free": stage.gradient_free,
                   "robust_accuracy_alone": 100.0 * survived.float().mean().item() if todo is clean_ok else None,
                   "robust_accuracy_after": 100.0 * robust.float().mean().item(),
                   "broke_pp": before - 100.0 * robust.float().mean().item(),
                   "attacked": len(idx), "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            log(f"{stage.label}: {row['robust_accuracy_after']:.2f}% ({row['seconds']:.0f} s)")
    return {"eps": eps, "norm": norm, "n": len(y), "clean_accuracy": 100.0 * clean_ok.float().mean().item(),
            "robust_accuracy": 100.0 * robust.float().mean().item(), "per_attack": rows,
            "robust_mask": robust, "broken_by": broken_by, "seconds": round(time.perf_counter() - start, 1)}


LARGE_EPS = {"linf": 1.0, "l2": 28.0}  # either reaches every image in [0, 1]^784 from any other


def checks_scope(n: int, check_n: int, score_based: bool) -> str:
    """Which images the masking checks ran on: the score-based check reads the whole evaluation's
    per-attack table, the others attack the first check_n images again."""
    if check_n >= n:
        return f"on all {n} images"
    if score_based:
        return f"the score-based one on all {n} evaluated images, the others on the first {check_n}"
    return f"on the first {check_n} images"


# Square-only images are attacked again from more starts before a masking verdict (AutoAttack's "plus"
# version answers an unconverged start with restarts): APGD-CE x 5 and APGD-T x 3 per target.
ESCALATION = (Stage("apgd-ce", "APGD-CE", "apgd", {"steps": 100, "restarts": 5, "side_by_side": True}),
              Stage("apgd-t", "APGD-T", "apgd-t", {"steps": 100, "targets": 9, "restarts": 3, "side_by_side": True}))


def image_limit(n: int, threshold_pp: float, floor: int = 2) -> int:
    """How many images a check may find on n before it flags: threshold_pp of them, and never fewer
    than `floor` (on 200 images 0.5 pp is one image, which says nothing)."""
    return max(int(threshold_pp * n / 100), floor)


def _escalate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str, seed: int,
              batch_size: int | None) -> torch.Tensor:
    """Which of x, y (each broken only by a score-based attack) gradient attacks from more random
    starts break too.

    The images are few (the score-based attack's finds), so each stage runs its restarts side by
    side (`apgd(..., side_by_side=True)`) instead of one after another on a batch of a few dozen: APGD
    keeps its step sizes and checkpoints per example, so each copy is an independent run from its own
    random start, and an image is broken when any copy is."""
    held = torch.ones(len(y), dtype=torch.bool, device=y.device)
    for i, stage in enumerate(ESCALATION):
        idx = held.nonzero().flatten()
        if len(idx):
            held[idx] = _run_stage(model, stage, x[idx], y[idx], eps=eps, norm=norm, seed=seed + 11 + i,
                                   batch_size=batch_size)
    return ~held


def _check_attack(model, stage: Stage, x, y, robust: torch.Tensor, result: dict, *, eps: float, norm: str,
                  seed: int, batch_size: int | None) -> int:
    """Attack the images of x (the first len(x) of the evaluation) that `robust` still holds, with
    `stage`; clear what breaks from `robust`, add
    the stage's row to result["per_attack"] and the new worst case to result["robust_accuracy"].
    Returns how many images it broke."""
    t0 = time.perf_counter()
    m = len(y)
    idx = robust[:m].nonzero().flatten()
    held = robust[:m].clone()
    if len(idx):
        held[idx] = _run_stage(model, stage, x[idx], y[idx], eps=eps, norm=norm, seed=seed, batch_size=batch_size)
    newly = int((robust[:m] & ~held).sum())
    before = 100.0 * robust.float().mean().item()
    robust[:m] &= held
    after = 100.0 * robust.float().mean().item()
    result["per_attack"].append({"attack": stage.label, "key": stage.key, "gradient_free": False,
                                 "robust_accuracy_alone": None, "robust_accuracy_after": after,
                                 "broke_pp": before - after, "attacked": len(idx),
                                 "seconds": round(time.perf_counter() - t0, 1)})
    result["robust_accuracy"] = after
    return newly


def _score_based_check(model, x, y, result: dict, *, eps: float, norm: str, seed: int, threshold_pp: float,
                       batch_size: int | None) -> dict | None:
    """Images broken only by a score-based attack after every gradient attack: under a limit, fine;
    over it, attacked again from more starts, and flagged only for those the restarts do not break."""
    rows = result["per_attack"]
    grad = [i for i, r in enumerate(rows) if not r["gradient_free"]]
    free = [i for i, r in enumerate(rows) if r["gradient_free"] and grad and i > grad[-1]]
    if not grad or not free:
        return None
    names = ", ".join(rows[i]["attack"] for i in free)
    n = len(y)
    limit = image_limit(n, threshold_pp)
    only = torch.zeros(n, dtype=torch.bool, device=y.device)
    for i in free:
        only |= result["broken_by"] == i
    found = int(only.sum())
    counts = {"score_based_only": found, "limit": limit, "recovered_by_restarts": None, "square_only": found,
              "escalation": None}
    detail = f"{names} broke {found} image(s) ({100.0 * found / n:.2f} pp of {n}) after every gradient attack"
    if found > limit:
        idx = only.nonzero().flatten()
        t0 = time.perf_counter()
        recovered = int(_escalate(model, x[idx], y[idx], eps=eps, norm=norm, seed=seed, batch_size=batch_size).sum())
        counts["escalation_seconds"] = round(time.perf_counter() - t0, 1)
        budget = "; ".join(f"{s.label} {s.params['steps']} steps x {s.params['restarts']} restarts" +
                           (f" x {s.params['targets']} targets" if "targets" in s.params else "") for s in ESCALATION)
        counts.update(recovered_by_restarts=recovered, square_only=found - recovered, escalation=budget)
        detail += (f"; attacked again from more starts ({budget}): {recovered} broken (the gradient attack had "
                   f"not converged from one start; they count as broken either way), {found - recovered} "
                   f"broken by the score-based attack alone")
    return {"check": "a score-based attack finds nothing the gradient attacks missed",
            "passed": counts["square_only"] <= limit,
            "detail": f"{detail} (limit {limit} images)", "counts": counts}


def masking_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, result: dict, robust: torch.Tensor, *,
                   eps: float, norm: str = "linf", steps: int = 100, seed: int = 0,
                   train_adv_accuracy: float | None = None, threshold_pp: float = 0.5,
                   batch_size: int | None = None, check_n: int | None = None) -> list[dict]:
    """Signs of gradient masking (Athalye et al. 2018; Carlini et al. 2019; Croce & Hein 2020).

    Each check is {check, passed, detail}; a failed one means the robust accuracy is not to be
    trusted. `result` and `robust` (its per-example mask) are `run_ensemble`'s on x, y; checks 2, 3
    and 5 attack the first `check_n` images again (default: all).
    1. a score-based attack broke more images than the limit (`image_limit`: `threshold_pp`, at least
       two images) after every gradient attack, and APGD-CE and APGD-T from more random starts
       (`ESCALATION`) leave more than the limit of those to it alone (what restarts break is a gradient
       attack one start short, not masking);
    2. a gradient attack at an eps that reaches any image leaves accuracy above 5%;
    3. APGD-CE with twice the steps and 3 restarts, run after the ensemble, breaks more than the limit,
       and the same attack from 3 other starts then breaks more than the limit again (the evaluation
       keeps not converging; a first round that finds a few more and a second that finds none is an
       ensemble one round short, whose finds now count);
    4. adversarial accuracy in training exceeds test robust accuracy by more than 3 pp;
    5. input gradients are zero on more than 1% of examples.
    Every image the checks' attacks break at eps counts as broken: it is cleared from `robust`, its
    attack is added to result["per_attack"], and result["robust_accuracy"] is the worst case of all.
    """
    checks = []
    n = len(y)
    m = n if check_n is None else min(check_n, n)
    xc, yc = x[:m], y[:m]
    with eval_mode(model):
        score = _score_based_check(model, x, y, result, eps=eps, norm=norm, seed=seed, threshold_pp=threshold_pp,
                                   batch_size=batch_size)
        if score is not None:
            checks.append(score)
        large = LARGE_EPS[norm]
        probe = Stage("apgd-ce", "APGD-CE", "apgd", {"steps": min(steps, 20)})
        acc_large = 100.0 * _run_stage(model, probe, xc, yc, eps=large, norm=norm, seed=seed,
                                       batch_size=batch_size).float().mean().item()
        checks.append({"check": "a gradient attack at an eps that reaches any image wins",
                       "passed": acc_large <= 5.0,
                       "detail": f"APGD-CE-{probe.params['steps']} at eps {large:g}: {acc_large:.1f}% accuracy (must be ~0)"})
        limit = image_limit(m, threshold_pp)
        more = Stage("check-restarts", f"check: APGD-CE ({2 * steps} steps x 3 restarts, first {m})", "apgd",
                     {"steps": 2 * steps, "restarts": 3})
        newly = _check_attack(model, more, xc, yc, robust, result, eps=eps, norm=norm, seed=seed + 7,
                              batch_size=batch_size)
        detail = (f"APGD-CE with {2 * steps} steps x 3 restarts after the ensemble broke {newly} more of the first "
                  f"{m} images")
        counts = {"broken": newly, "limit": limit, "confirm_broken": None}
        if newly > limit:  # converged once the same attack from other starts finds no more than the limit
            confirm = Stage("check-confirm", f"check: APGD-CE ({2 * steps} steps x 3 other restarts, first {m})",
                            "apgd", {"steps": 2 * steps, "restarts": 3})
            again = _check_attack(model, confirm, xc, yc, robust, result, eps=eps, norm=norm, seed=seed + 9,
                                  batch_size=batch_size)
            counts["confirm_broken"] = again
            newly = again
            detail += (f"; the same attack from 3 other starts then broke {again} more (the evaluation "
                       f"{'has converged' if again <= limit else 'keeps finding more'})")
        checks.append({"check": "more restarts and steps do not lower accuracy", "passed": newly <= limit,
                       "detail": f"{detail} (limit {limit}); every one counts as broken", "counts": counts})
        if train_adv_accuracy is not None:
            gap = train_adv_accuracy - result["robust_accuracy"]
            checks.append({"check": "training-time adversarial accuracy is not far above test robust accuracy",
                           "passed": gap <= 3.0,
                           "detail": f"training {train_adv_accuracy:.1f}% vs test {result['robust_accuracy']:.1f}% "
                                     f"(limit 3 pp)"})
        checks.append(zero_gradient_check(model, xc, yc))
    return checks
