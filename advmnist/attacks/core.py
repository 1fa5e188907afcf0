"""What every attack shares: the registry, input gradients, projections, argument checks.

An attack is a pure function `attack(model, x, y, *, hyperparameters...) -> x_adv` on pixels in
[0, 1]. It never changes `x`, the model's mode, parameters, gradients or buffers, never reseeds a
global random generator, and takes its device from `x`. Whoever needs eval mode sets it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdvmnistError
from ..memory import keep_freed_memory


#: A per-example loss on logits: (logits (N, classes), y (N,)) -> (N,); attacks ascend its sum.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class AttackError(AdvmnistError, ValueError):
    """An invalid attack parameter or an unknown attack name (bad input, so an AdvmnistError: the
    CLI prints it as one line)."""


@dataclass(frozen=True)
class AttackSpec:
    name: str
    fn: Callable[..., torch.Tensor]
    always_targeted: bool  # True: `y` holds target labels (penalty, gd)
    summary: str
    #: For a minimum-norm attack (the smallest adversarial point it finds per example): the norm its
    #: distances are measured in when it takes no `norm` parameter; None for a fixed-budget attack.
    minimum_norm: str | None = None

    def distance_norm(self, params: dict) -> str | None:
        """The norm a minimum-norm attack minimised with these parameters; None for a fixed-budget one."""
        if self.minimum_norm is None:
            return None
        return str(params.get("norm") or self.defaults().get("norm") or self.minimum_norm)

    def defaults(self) -> dict:
        """Keyword-only hyperparameters and their defaults, read from the signature."""
        return {p.name: p.default for p in inspect.signature(self.fn).parameters.values()
                if p.kind is p.KEYWORD_ONLY}


_ATTACKS: "OrderedDict[str, AttackSpec]" = OrderedDict()


def register_attack(*, always_targeted: bool = False, name: str | None = None, minimum_norm: str | None = None):
    """Add an attack function to the registry under `name` (default: its own name, so `apgd_t`
    can be listed as "apgd-t"); a duplicate is an error. `minimum_norm` ("l0", "l1", "l2", "linf") marks
    an attack that returns the smallest adversarial point it finds: its runs record each example's
    distance and the robust-accuracy curve it implies."""

    def decorator(fn):
        key = name or fn.__name__
        if key in _ATTACKS:
            raise ValueError(f"attack {key!r} is registered twice")
        summary = (inspect.getdoc(fn) or "").split("\n")[0]
        _ATTACKS[key] = AttackSpec(key, fn, always_targeted, summary, minimum_norm)
        return fn

    return decorator


def list_attacks() -> list[str]:
    return list(_ATTACKS)


def get_attack(name: str) -> AttackSpec:
    try:
        return _ATTACKS[name]
    except KeyError:
        raise AttackError(f"unknown attack {name!r}; choose one of: {', '.join(_ATTACKS)}") from None


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Freeze the model for the duration of an attack, and give it back exactly as it was.

    Weights stop requiring gradients (backward then skips weight gradients, about a third of the
    work). Buffers are restored afterwards: a model handed over in train mode would otherwise have
    its BatchNorm statistics moved by every forward pass of the attack.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    buffers = [(b, b.clone()) for b in model.buffers()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: LossFn | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the summed loss (default cross-entropy) w.r.t. the input, and the logits.

    The sum makes each example's gradient its own (no 1/N), whatever the batch size.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        total = F.cross_entropy(logits, y, reduction="sum") if loss is None else loss(logits, y).sum()
        (grad,) = torch.autograd.grad(total, x)
    return grad, logits.detach()


def gradient_fn(model: nn.Module, example: torch.Tensor, fast: bool = True, loss: LossFn | None = None):
    """The input-gradient function an attack uses: (x, y) -> (d sum loss / d x, logits), on the
    folded fast path where the model allows it (see `fast.py`), else autograd. `loss(logits, y)`
    gives one value per example (default cross-entropy). Call once per attack, inside `frozen(model)`."""
    if fast:
        keep_freed_memory()
        from .fast import compile_grad

        compiled = compile_grad(model, example, loss=loss)
        if compiled is not None:
            return compiled
    return lambda x, y: input_grad(model, x, y, loss)


def logits_fn(model: nn.Module, example: torch.Tensor, fast: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> logits without any gradient: the folded forward pass where the model allows it, else
    the model itself under no_grad. For score-based attacks, which never look at a gradient."""
    if fast:
        keep_freed_memory()
        from .fast import compile_logits

        compiled = compile_logits(model, example)
        if compiled is not None:
            return compiled

    def plain(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return plain


def over_restarts(run_once: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
                  restarts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `run_once(sel)` -> (x_adv, fooled) up to `restarts` times, each on the examples no earlier
    run fooled; returns (x_adv, fooled) for all of x."""
    result = x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        sel = (~fooled).nonzero().flatten()
        if not len(sel):
            break
        adv, hit = run_once(sel)
        result[sel] = adv
        fooled[sel] = hit
    return result, fooled


def clean_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x) if len(x) else torch.zeros(0, 10, device=x.device)


def over_targets(run_target, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, targets: int) -> torch.Tensor:
    """The targeted attacks' outer loop (AutoAttack's APGD-T and FAB-T): for k = 1..targets, attack
    the examples no earlier target broke towards the class the clean logits rank k-th (0-th: the
    top one); `run_target(xs, ys, pair)` -> (x_adv, fooled), pair = (label, target) per row."""
    ranked = logits.argsort(1, descending=True)
    result = x.clone()
    fooled = logits.argmax(1) != y
    for k in range(1, min(targets, logits.shape[1] - 1) + 1):
        sel = (~fooled).nonzero().flatten()
        if not len(sel):
            break
        xs, ys = x[sel], y[sel]
        adv, hit = run_target(xs, ys, torch.stack([ys, ranked[sel, k]], 1))
        result[sel] = torch.where(hit.view(-1, 1, 1, 1), adv, result[sel])
        fooled[sel] = hit
    return result


def per_example_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(x)
        return F.cross_entropy(logits, y, reduction="none"), logits


def default_alpha(eps: float, steps: int) -> float:
    """PGD's default step: 2.5 eps / steps (Madry et al.), never below eps / 8.

    Why the floor: with many steps 2.5 eps / steps is too timid to escape flat regions (measured on
    improved-bn at eps 0.1, PGD-40: 33.6% robust with 2.5 eps / 40 against 31.7% with the usual
    alpha 0.01 and 31.2% with eps / 8; on the PGD-trained strided net at eps 0.3: 93.5% with eps / 8
    against 94.3% with 0.01).
    """
    return eps * max(2.5 / max(int(steps), 1), 1 / 8)


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps)


def l2_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm, shaped to broadcast against images."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project_l2(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    delta = x_adv - x
    norm = l2_norm(delta)
    return x + delta * torch.clamp(eps / norm.clamp_min(1e-12), max=1.0)


def check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 4 or y.dim() != 1 or len(x) != len(y):
        raise AttackError(f"expected images (N, C, H, W) and labels (N,), got {tuple(x.shape)} and "
                          f"{tuple(y.shape)}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise AttackError("images must be pixels in [0, 1]; normalisation belongs inside the model")


def check_norm(norm: str) -> None:
    if norm not in ("linf", "l2"):
        raise AttackError(f"norm must be 'linf' or 'l2', got {norm!r}")


def check_positive(**values: float) -> None:
    for name, value in values.items():
        if value is None or not value > 0:
            raise AttackError(f"{name} must be positive, got {value}")


def check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if value is None or value < 0:
            raise AttackError(f"{name} must be >= 0, got {value}")


def sphere_start(x: torch.Tensor, radius: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """A random start at Linf or L2 distance `radius` from x (uniform, resp. Gaussian, direction),
    clipped to [0, 1]: APGD's start at eps, FAB's restarts at eps / 2 (as in AutoAttack)."""
    if norm == "linf":
        t = 2 * rand_like(x, generator) - 1
        return (x + radius * t / t.flatten(1).abs().amax(1).view(-1, 1, 1, 1)).clamp(0, 1)
    t = randn_like(x, generator)
    return (x + radius * t / l2_norm(t).clamp_min(1e-12)).clamp(0, 1)


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Normal noise drawn on the CPU, so a seed gives the same noise on every device."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def rand_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
