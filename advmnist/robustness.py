"""Robust accuracy measured without fooling ourselves: worst case per example, and sanity checks.

`worst_case` runs the strongest attacks the project has, one after another, each only on the
examples every earlier attack failed to break; an example counts as robust only if it is classified
correctly under all of them. `sanity_checks` runs the tests the literature on evaluating defences
asks for (Carlini et al. 2019, "On Evaluating Adversarial Robustness"; AutoAttack's checks): a
failed check is a sign of gradient masking or a broken evaluation, not of robustness.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from .attacks import fgsm, frozen, gradient_fn, pgd
from .measures import eval_mode, predict_logits


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return predict_logits(model, x).argmax(1) == y


def default_alpha(eps: float, steps: int) -> float:
    """PGD's step for an evaluation: 2.5 eps / steps (Madry et al.), never below eps / 40."""
    return max(2.5 * eps / steps, eps / 40)


def _batched(attack: Callable, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([attack(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]) \
        if len(x) else x


def worst_case(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100,
               restarts: int = 5, alpha: float | None = None, targeted: bool = True, seed: int = 0,
               log: Callable[[str], None] = lambda s: None) -> dict:
    """Robust accuracy (%) under FGSM, PGD-`steps` with `restarts`, and targeted PGD to every other
    class, worst case per example. Each attack runs only on the examples still robust."""
    alpha = alpha if alpha is not None else default_alpha(eps, steps)
    start = time.perf_counter()
    with eval_mode(model):
        robust = _correct(model, x, y)
        clean = 100.0 * robust.float().mean().item()
        stages = [("FGSM", lambda xb, yb: fgsm(model, xb, yb, eps=eps))]
        for r in range(restarts):  # one stage a restart: a restart only runs where the earlier ones failed
            stages.append((f"PGD-{steps}, restart {r + 1}/{restarts}", lambda xb, yb, r=r: pgd(
                model, xb, yb, eps=eps, alpha=alpha, steps=steps,
                generator=torch.Generator().manual_seed(seed + 100 * r))))
        if targeted:
            for k in range(1, 10):
                stages.append((f"targeted PGD-{steps}, target = label + {k}", lambda xb, yb, k=k: pgd(
                    model, xb, (yb + k) % 10, eps=eps, alpha=alpha, steps=steps, targeted=True,
                    generator=torch.Generator().manual_seed(seed + k))))
        per_attack = []
        for name, attack in stages:
            idx = robust.nonzero().flatten()
            if len(idx):
                adv = _batched(attack, x[idx], y[idx])
                robust[idx] = _correct(model, adv, y[idx])
            per_attack.append({"attack": name, "robust_accuracy_after": 100.0 * robust.float().mean().item()})
            log(f"{name}: {per_attack[-1]['robust_accuracy_after']:.2f}%")
    return {"eps": eps, "n": len(y), "clean_accuracy": clean, "robust_accuracy": 100.0 * robust.float().mean().item(),
            "per_attack": per_attack, "seconds": round(time.perf_counter() - start, 1)}


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, restarts: int = 1,
                 seed: int = 0) -> float:
    """Accuracy (%) under untargeted Linf PGD from a seeded random start."""
    adv = _batched(lambda xb, yb: pgd(model, xb, yb, eps=eps, steps=steps, restarts=restarts,
                                      alpha=default_alpha(eps, steps),
                                      generator=torch.Generator().manual_seed(seed)), x, y)
    return 100.0 * _correct(model, adv, y).float().mean().item()


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
        single = 100.0 * _correct(model, _batched(lambda xb, yb: fgsm(model, xb, yb, eps=eps), x, y), y).float().mean().item()
        checks.append({"check": "multi-step beats single-step", "passed": accs[2] <= single + tolerance,
                       "detail": f"PGD-{steps} {accs[2]:.1f}% vs FGSM {single:.1f}%"})
        more = pgd_accuracy(model, x, y, eps, more_steps, restarts=2, seed=seed + 1)
        checks.append({"check": "more steps and restarts do not raise accuracy", "passed": more <= accs[2] + tolerance,
                       "detail": f"PGD-{more_steps} x 2 restarts {more:.1f}% vs PGD-{steps} {accs[2]:.1f}%"})
        with frozen(model):
            g, _ = gradient_fn(model, x[:500])(x[:500], y[:500])
        zero = (g.flatten(1).abs().amax(1) == 0).float().mean().item() * 100
        checks.append({"check": "input gradients are not zero", "passed": zero < 1.0,
                       "detail": f"{zero:.1f}% of examples have an all-zero input gradient"})
    return checks
