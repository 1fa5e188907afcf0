"""The training loop: whole-tensor batches sliced by index, the report's recipe, seeded.

The dataset lives on the device as tensors; each epoch draws one permutation from a seeded
generator and slices batches from it, so there is no DataLoader, no per-sample transform and no
worker process, and the same seed gives the same weights.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import runs
from .attacks import get_attack, list_attacks
from .data import MNIST, load_mnist
from .devices import pick_device
from .errors import AdvmnistError, TrainingCollapsed, TrainingDiverged
from .memory import keep_freed_memory
from .measures import eval_mode, evaluate
from .models import PRECISIONS, SCHEDULES, Recipe, create_model, get_spec
from .robustness import pgd_accuracy

#: Training methods with a recipe of their own; any other registered attack that is untargeted and
#: takes an eps trains as the inner maximiser under its own name (`Adversarial.inner_attack`).
#: `advmnist.names.ADVERSARIAL_METHODS` is the CLI's torch-free copy (tests/test_cli_fast.py).
TRAINING_METHODS: tuple[str, ...] = ("pgd", "fgsm-rs", "fgsm", "trades", "ibp")
ADVERSARIAL_METHODS: tuple[str, ...] = TRAINING_METHODS + tuple(
    a for a in list_attacks() if a not in TRAINING_METHODS and not get_attack(a).always_targeted
    and "eps" in get_attack(a).defaults())


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                               weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    raise AdvmnistError(f"unknown optimizer {recipe.optimizer!r}; use sgd or adam")


def check_recipe(recipe: Recipe) -> None:
    from .validate import RECIPE, check_fields

    check_fields(dataclasses.asdict(recipe), RECIPE)  # finite, in range and numbers: NaN and inf are refused
    if recipe.lr <= 0:
        raise AdvmnistError(f"learning rate must be positive, got {recipe.lr}")
    if recipe.batch_size < 1 or recipe.epochs < 1:
        raise AdvmnistError("batch size and epochs must be at least 1")
    if recipe.dropout is not None and not 0.0 <= recipe.dropout < 1.0:
        raise AdvmnistError(f"dropout must be in [0, 1), got {recipe.dropout}")
    if recipe.momentum < 0:
        raise AdvmnistError(f"momentum must be >= 0, got {recipe.momentum}")
    if recipe.optimizer not in ("sgd", "adam"):
        raise AdvmnistError(f"unknown optimizer {recipe.optimizer!r}; use sgd or adam")
    if recipe.schedule not in SCHEDULES:
        raise AdvmnistError(f"unknown learning-rate schedule {recipe.schedule!r}; use {' or '.join(SCHEDULES)}")
    if recipe.precision not in PRECISIONS:
        raise AdvmnistError(f"unknown precision {recipe.precision!r}; use {' or '.join(PRECISIONS)}")


def learning_rate(recipe: Recipe, progress: float) -> float:
    """The learning rate at `progress` (epochs done, fractional). "onecycle" rises linearly from 0
    to lr over the first 40% of training and falls back to 0 (the cyclic schedule of Wong et al.,
    "Fast is better than free")."""
    if recipe.schedule == "constant":
        return recipe.lr
    t = min(max(progress / recipe.epochs, 0.0), 1.0)
    return recipe.lr * (t / 0.4 if t < 0.4 else (1.0 - t) / 0.6)


#: The adversarial schedule left to `Adversarial.resolved`: a clean warm-up over this share of the
#: epochs, then eps ramped up over the next RAMP of them (measured in `tests/test_collapse.py`).
WARMUP, RAMP = 0.1, 0.4


@dataclass(frozen=True)
class Adversarial:
    """Adversarial training: the inner attack, its budget, and how eps is ramped up."""

    method: str  # "pgd" (Madry et al.), "fgsm-rs" (Wong et al.), "trades" (Zhang et al.), "ibp" (Gowal
    #              et al.: certified training on interval bounds, no inner attack), "fgsm" (no random
    #              start: known to overfit catastrophically; kept to show the detector firing), or any
    #              other registered untargeted attack with an eps (apgd, apgd-t, square) as the inner
    #              maximiser, with its own defaults for what is not set here
    eps: float = 0.3  # Linf bound during training (and for the per-epoch monitor)
    steps: int = 40  # inner steps for pgd, trades and attacks that take steps; fgsm and fgsm-rs take one
    alpha: float | None = None  # inner step size; None: pgd 2.5 eps/steps, fgsm-rs 1.25 eps, trades 2 eps/steps
    beta: float = 6.0  # trades: weight of the KL term
    ramp_epochs: float | None = None  # eps grows linearly from 0 to eps over this many epochs, after the
    #                                   warm-up; None: sized from the epochs (`resolved`)
    kappa: float = 0.5  # ibp: weight of the clean loss at the end of the ramp (1 at its start)
    monitor: int = 500  # first test images whose PGD accuracy is recorded after each epoch
    monitor_steps: int = 20  # PGD steps of that monitor
    monitor_eps: float | None = None  # eps of the monitor; None: the training eps
    uniform_start: bool = False  # trades: start uniformly in the eps ball, as PGD does, not 0.001 away
    keep_last: bool = False  # keep the last epoch's weights, not those of the monitor's most robust epoch
    restarts: int = 1  # pgd, trades: inner attacks from this many starts, the worst kept per example
    warmup_epochs: float | None = None  # clean epochs before eps starts rising; None: sized from the epochs
    #                                     when ramp_epochs is too, else 0

    def check(self) -> None:
        if self.method not in ADVERSARIAL_METHODS:
            raise AdvmnistError(f"unknown adversarial training {self.method!r}; use {', '.join(ADVERSARIAL_METHODS)}")
        if self.eps < 0 or self.steps < 1 or (self.alpha is not None and self.alpha <= 0):
            raise AdvmnistError("adversarial training needs eps >= 0, steps >= 1 and a positive alpha")
        if self.restarts > 1 and self.method not in ("pgd", "trades"):
            raise AdvmnistError(f"inner restarts are for pgd and trades training, not {self.method}")
        if self.warmup_epochs is not None:
            from .validate import NONNEG

            NONNEG.check(self.warmup_epochs, "warm-up epochs")
        for flag in ("uniform_start", "keep_last"):
            if not isinstance(getattr(self, flag), bool):
                raise AdvmnistError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        from .validate import ADVERSARIAL, check_fields

        check_fields(dataclasses.asdict(self), ADVERSARIAL, "adversarial training")  # also NaN and inf

    def step_size(self) -> float | None:
        """The inner step: `alpha`, else the training rule of the method's paper (None: the attack's own
        default, for registered attacks trained by name).

        PGD training keeps Madry et al.'s 2.5 eps / steps, not the evaluation default
        `advmnist.attacks.core.default_alpha`, which floors the step at eps / 8: the floor was
        measured for attacking at 40+ steps (see its docstring), and with it every PGD-trained run
        (40 steps: eps / 16) would train on twice the step, so neither the recorded recipes nor the
        numbers of existing runs would hold. FGSM-RS takes Wong et al.'s 1.25 eps, TRADES 2 eps / steps.
        """
        if self.alpha is not None:
            return self.alpha
        rule = {"pgd": 2.5 * self.eps / self.steps, "fgsm-rs": 1.25 * self.eps, "fgsm": self.eps,
                "trades": 2.0 * self.eps / self.steps, "ibp": 0.0}
        return rule.get(self.method)

    def inner_attack(self) -> tuple[str, dict]:
        """The registered attack that crafts the training examples, and its keywords (eps and the
        generator are added batch by batch): PGD for pgd, fgsm-rs and fgsm (one step, with and
        without a random start) and for TRADES (with the KL loss to the clean prediction, added in
        `adversarial_loss`, and TRADES' start: Gaussian noise of std 0.001, or with
        `uniform_start` a uniform point of the ball); any other method is a
        registered attack run under its own name, given steps and alpha where it takes them."""
        alpha = self.step_size()
        if self.method in ("pgd", "fgsm-rs", "fgsm"):
            steps = 1 if self.method in ("fgsm", "fgsm-rs") else self.steps
            return "pgd", {"alpha": alpha, "steps": steps, "random_start": self.method != "fgsm",
                           "restarts": self.restarts}
        if self.method == "trades":
            start = {} if self.uniform_start else {"start_std": 0.001}
            return "pgd", {"alpha": alpha, "steps": self.steps, "random_start": True, "restarts": self.restarts,
                           **start}
        accepted = get_attack(self.method).defaults()
        params = {"steps": self.steps} if "steps" in accepted else {}
        if alpha is not None and "alpha" in accepted:
            params["alpha"] = alpha
        return self.method, params

    def kappa_at(self, eps: float) -> float:
        """ibp: the clean loss's weight, from 1 down to `kappa` as eps ramps up (Gowal et al. 2018)."""
        return 1.0 - (1.0 - self.kappa) * (eps / self.eps if self.eps > 0 else 1.0)

    def resolved(self, epochs: int) -> Adversarial:
        """The settings with the schedule sized from `epochs` where it was left unset (None): a clean
        warm-up over the first WARMUP of the training, then eps (and IBP's kappa) ramped linearly over
        the next RAMP, full eps for the rest. Gowal et al. 2018 and Shi et al. 2021 schedule IBP this
        way; without it the full eps from the first step kills every ReLU of IBP- and PGD-trained
        nets and leaves FGSM-RS at chance for epochs, and a fixed number of epochs would not fit a
        short training. An explicit ramp_epochs keeps its old meaning: no warm-up unless one is given."""
        ramp, warmup = self.ramp_epochs, self.warmup_epochs
        if ramp is None:
            ramp = round(RAMP * epochs, 6)
            warmup = round(WARMUP * epochs, 6) if warmup is None else warmup
        return dataclasses.replace(self, ramp_epochs=ramp, warmup_epochs=warmup or 0.0)

    def schedule_note(self, epochs: int) -> str:
        """How eps rises over `epochs`, in one line (on the resolved settings)."""
        warmup, ramp, end = self.warmup_epochs or 0.0, self.ramp_epochs or 0.0, self.ramp_end()
        kappa = f" (kappa 1 -> {self.kappa:g})" if self.method == "ibp" else ""
        parts = [f"clean warm-up {warmup:g} epoch{'s' * (warmup != 1)}"] if warmup else []
        if ramp:
            parts.append(f"eps 0 -> {self.eps:g}{kappa} over " + (f"the next {ramp:g}" if warmup else
                                                                   f"{ramp:g} epoch{'s' * (ramp != 1)}"))
        if end == 0:
            parts.append(f"full eps {self.eps:g}{kappa} from the first step")
        elif end < epochs:
            parts.append(f"full eps for the last {epochs - end:g}")
        else:
            parts.append(f"eps reaches only {self.eps_at(epochs) or 0:g} by the end")
        return f"over {epochs} epoch{'s' * (epochs != 1)}: " + ", ".join(parts)

    def ramp_end(self) -> float:
        """Epochs (fractional) after which eps is at its full value (on the resolved settings)."""
        return (self.warmup_epochs or 0.0) + (self.ramp_epochs or 0.0)

    def eps_at(self, progress: float) -> float | None:
        """Training eps after `progress` epochs (fractional): None (clean training) during the warm-up,
        then linear from 0 over ramp_epochs, then eps. On the resolved settings."""
        progress -= self.warmup_epochs or 0.0
        if progress < 0:
            return None
        return self.eps * (min(1.0, progress / self.ramp_epochs) if self.ramp_epochs else 1.0)

    def __str__(self) -> str:
        if self.method == "ibp":
            text = f"ibp training eps={self.eps:g} kappa=1->{self.kappa:g}"
        else:
            alpha = self.step_size()
            text = (f"{self.method} training eps={self.eps:g} steps={self.steps}"
                    + ("" if alpha is None else f" alpha={alpha:g}")
                    + (" uniform start" if self.uniform_start and self.method == "trades" else "")
                    + (f" restarts={self.restarts}" if self.restarts > 1 else ""))
        warmup = f" warm-up={self.warmup_epochs:g} epochs" if self.warmup_epochs else ""
        if self.ramp_epochs is None:
            schedule = f"{warmup} ramp sized from the epochs" if warmup else " schedule sized from the epochs"
        else:
            schedule = warmup + (f" ramp={self.ramp_epochs:g} epochs" if self.ramp_epochs else "")
        return text + schedule + (", last epoch kept" if self.keep_last else "")


def _kl_from(p_nat: torch.Tensor):
    """TRADES' inner objective (Zhang et al. 2019): per example, KL(p_nat || softmax(logits)), the
    distance from the clean prediction p_nat; a loss for `pgd(loss=...)` that ignores the labels."""
    def kl(logits: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return (p_nat * (p_nat.clamp_min(1e-12).log() - F.log_softmax(logits, dim=1))).sum(1)
    return kl


def ibp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, kappa: float):
    """kappa CE(clean) + (1 - kappa) CE(worst-case logits): the worst case puts every other logit at
    its IBP upper bound relative to the label's (the margin lower bounds, Gowal et al. 2018)."""
    from .bounds import batch_statistics, ibp_margins

    with batch_statistics(model):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if kappa < 1.0:
            margins = ibp_margins(model, x, y, eps)  # (N, 9) lower bounds of logit_y - logit_j
            worst = torch.cat([torch.zeros_like(margins[:, :1]), -margins], dim=1)  # the label first
            loss = kappa * loss + (1.0 - kappa) * F.cross_entropy(worst, torch.zeros_like(y))
    return loss, logits


def adversarial_loss(adv: Adversarial, generator: torch.Generator):
    """A loss_fn for train_epoch: craft the inner attack (`Adversarial.inner_attack`) in eval mode,
    then train on it; eps None (the warm-up) trains on the clean batch."""
    if adv.method != "ibp":
        method, params = adv.inner_attack()
        attack = get_attack(method)
        if "generator" in attack.defaults():
            params["generator"] = generator

    def loss_fn(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, eps: float | None):
        if eps is None:  # the clean warm-up
            logits = model(xb)
            return F.cross_entropy(logits, yb), logits
        if adv.method == "ibp":
            return ibp_loss(model, xb, yb, eps, adv.kappa_at(eps))
        model.eval()
        extra = {}
        if adv.method == "trades":  # ascend the KL to the clean prediction instead of the labels' loss
            with torch.no_grad():
                extra["loss"] = _kl_from(F.softmax(model(xb), dim=1))
        x_adv = attack.fn(model, xb, yb, eps=eps, **params, **extra)
        model.train()
        if adv.method == "trades":
            logits = model(xb)
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
            return F.cross_entropy(logits, yb) + adv.beta * kl, logits
        logits = model(x_adv)
        return F.cross_entropy(logits, yb), logits

    return loss_fn


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging; Gowal et al. 2020,
    "Uncovering the Limits of Adversarial Training", keep one for their robust models).

    The decay rises as min(decay, (1 + t) / (10 + t)) over the first steps t, as TensorFlow's
    ExponentialMovingAverage does, so the average does not start weighted toward the initial
    weights. Buffers (BatchNorm statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval()
        self.decay, self.steps = decay, 0
        self._params = list(zip(self.model.parameters(), model.parameters()))
        self._buffers = list(zip(self.model.buffers(), model.buffers()))

    @staticmethod
    def decay_at(decay: float, t: int) -> float:
        """The decay of the update after t earlier ones."""
        return min(decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self) -> None:
        d = self.decay_at(self.decay, self.steps)
        self.steps += 1
        for averaged, live in self._params:
            averaged.lerp_(live, 1.0 - d)
        for copied, live in self._buffers:
            copied.copy_(live)


def ema_warmup_steps(decay: float) -> int:
    """The optimizer step (counted from 1) at which the warmed-up decay (1 + t) / (10 + t) reaches `decay`."""
    t = max(0, math.ceil((10 * decay - 1) / (1 - decay)) - 1)  # the closed form, one below for float rounding
    while WeightAverage.decay_at(decay, t) < decay:
        t += 1
    return t + 1


def recipe_warnings(recipe: Recipe, n_train: int) -> list[str]:
    """What a recipe will not do as asked: a weight average whose warm-up outlasts the training
    (the decay then never reaches the value given, and the average spans fewer steps than meant)."""
    if not recipe.ema:
        return []
    steps = recipe.epochs * math.ceil(n_train / recipe.batch_size)
    reached = ema_warmup_steps(recipe.ema)
    if reached <= steps:
        return []
    return [f"the weight average's decay {recipe.ema:g} is reached only at optimizer step {reached:,} and this "
            f"training has {steps:,} step{'s' * (steps != 1)}: the decay ends at "
            f"{WeightAverage.decay_at(recipe.ema, steps - 1):.5f} (the warm-up min(decay, (1 + t) / (10 + t)))"]


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                batch_size: int, generator: torch.Generator, progress: tqdm | None = None,
                loss_fn=None, eps_schedule: Callable[[float], float | None] | None = None,
                lr_schedule: Callable[[float], float] | None = None,
                after_step: Callable[[], None] | None = None, precision: str = "fp32") -> dict:
    """One pass over (x, y) in a seeded random order; returns mean loss and accuracy (%).

    `loss_fn(model, xb, yb, eps) -> (loss, logits)` replaces plain cross-entropy (adversarial
    training); `eps_schedule(fraction of the epoch done)` gives its eps batch by batch (None: a clean
    batch, the warm-up), and `lr_schedule(fraction)` the optimizer's learning rate; `after_step()`
    runs after every optimizer step (the weight average). `precision` "bf16" runs the forward passes
    and the loss (bounds included) under bfloat16 autocast, the backward pass and the weights in fp32.
    """
    keep_freed_memory()
    model.train()
    n = len(x)
    order = torch.randperm(n, generator=generator).to(x.device)
    x, y = x[order], y[order]  # one gather an epoch; each batch is then a contiguous slice
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for start in range(0, n, batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        if lr_schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule(start / n)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            if loss_fn is None:
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
            else:
                loss, logits = loss_fn(model, xb, yb, eps_schedule(start / n) if eps_schedule else 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        loss_sum += loss.detach() * len(yb)
        correct += (logits.detach().argmax(1) == yb).sum()
        if progress is not None:
            progress.update(len(yb))
    return {"train_loss": loss_sum.item() / n, "train_accuracy": 100.0 * correct.item() / n}


def monitor_robustness(model: nn.Module, data: MNIST, adv: Adversarial) -> float:
    """PGD accuracy (%) on the first `adv.monitor` test images at the monitor's eps (default: the
    full training eps)."""
    eps = adv.eps if adv.monitor_eps is None else adv.monitor_eps
    with eval_mode(model):
        return pgd_accuracy(model, data.test_x[:adv.monitor], data.test_y[:adv.monitor], eps, adv.monitor_steps)


def monitor_certified(model: nn.Module, data: MNIST, adv: Adversarial) -> float:
    """IBP-certified accuracy (%) on the first `adv.monitor` test images at the monitor's eps."""
    from .bounds import certified, certified_margins

    with eval_mode(model):
        x, y = data.test_x[:adv.monitor], data.test_y[:adv.monitor]
        eps = adv.eps if adv.monitor_eps is None else adv.monitor_eps
        return 100.0 * certified(certified_margins(model, x, y, eps, method="ibp")[0]).float().mean().item()


def detect_overfitting(history: list[dict], drop: float = 20.0) -> list[str]:
    """Catastrophic overfitting: robust accuracy collapsing while clean accuracy holds up.

    Fires when an epoch's monitored PGD accuracy falls `drop` points below the best before it, or
    under 10% while clean test accuracy is over 80% (after the first epoch, and not while eps is
    still ramping up: the monitor attacks at the full eps, which the net has not been trained for yet).
    """
    warnings, best = [], None
    for h in history:
        if h.get("robust_accuracy") is None:
            continue
        warnings += _epoch_warnings(h, best, drop)
        best = h["robust_accuracy"] if best is None else max(best, h["robust_accuracy"])
    return warnings


def _epoch_warnings(h: dict, best: float | None, drop: float = 20.0) -> list[str]:
    """detect_overfitting for one epoch, given the best monitored PGD accuracy before it."""
    r = h["robust_accuracy"]
    if best is not None and r < best - drop:
        return [f"epoch {h['epoch']}: PGD accuracy fell to {r:.1f}% from {best:.1f}% (catastrophic overfitting)"]
    if h["epoch"] > 1 and not h.get("ramping") and r < 10.0 and h["test_accuracy"] > 80.0:
        return [f"epoch {h['epoch']}: PGD accuracy {r:.1f}% at {h['test_accuracy']:.1f}% clean "
                f"accuracy (robustness collapsed or never came)"]
    return []


#: Test accuracy (%) at or below which an epoch is at chance: never the monitor's pick, and a
#: collapse when the network is dead too, or fell there from above `LEARNED` with its loss at ln 10.
CHANCE, LEARNED = 20.0, 50.0
LN10 = math.log(10)


def collapse_signals(model: nn.Module, x: torch.Tensor) -> dict:
    """Whether the output still depends on the input, and the class predicted most, with its share.

    The input gradient of a fixed random projection of the logits is zero for every image only when
    every path from the input is cut (dead ReLUs): such a network outputs its last biases whatever
    the image and no gradient reaches its earlier weights again. A network slow to start on a small
    slice (lenet at its recipe sits at chance, every image one class, for its first epochs) still
    has nonzero gradients, so this, not the accuracy or the loss, tells the two apart."""
    with eval_mode(model), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        logits = model(x)
        direction = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)).to(logits.device)
        (grad,) = torch.autograd.grad((logits * direction).sum(), x)
    counts = logits.detach().argmax(1).bincount(minlength=logits.shape[1])
    return {"dead": not bool(grad.any()), "top_class": int(counts.argmax()),
            "top_share": counts.max().item() / len(x)}


def collapse_cause(h: dict, signals: dict, best_accuracy: float) -> str | None:
    """Why epoch `h` (at chance) is a collapse, or None: a dead network, or one that had learned
    (`best_accuracy`, the best test accuracy before) and fell back to a loss of ln 10."""
    if h["test_accuracy"] > CHANCE:
        return None
    if signals["dead"]:
        return "every input gradient is zero (dead ReLUs)"
    if best_accuracy >= LEARNED and h["train_loss"] >= LN10 - 0.05:
        return f"it fell from {best_accuracy:.2f}% test accuracy"
    return None


def _collapse_message(h: dict, signals: dict, cause: str, recipe: Recipe, given: Adversarial | None,
                      adv: Adversarial | None, steps_per_epoch: int) -> str:
    """One line: the epoch, what was measured, and the flags that would have avoided it."""
    share, label = signals["top_share"], signals["top_class"]
    called = f"every image called {label}" if share == 1 else f"{share:.0%} of the images called {label}"
    loss = h["train_loss"]
    fixes = []
    if adv is not None and given is not None:
        auto = dataclasses.replace(given, ramp_epochs=None, warmup_epochs=None).resolved(recipe.epochs)
        if adv.ramp_end() < auto.ramp_end():
            fixes.append(f"ramp eps with --warmup {auto.warmup_epochs:g} --eps-ramp {auto.ramp_epochs:g} "
                         f"(the default when --eps-ramp is not given)")
        else:
            steps = math.ceil(adv.ramp_end() * steps_per_epoch)
            fixes.append(f"ramp eps over more optimizer steps than {steps} (more --epochs, a smaller "
                         f"--batch-size or a longer --eps-ramp)")
    fixes.append(f"lower --lr (now {recipe.lr:g})")
    return (f"training collapsed in epoch {h['epoch']}: test accuracy {h['test_accuracy']:.2f}% ({called}), "
            f"train loss {loss:.4f}{' = ln 10' if abs(loss - LN10) < 0.05 else ''}, {cause}; {', or '.join(fixes)}")


def fit(model: nn.Module, data: MNIST, recipe: Recipe, *, seed: int = 0, progress: bool = False,
        on_epoch: Callable[[dict], None] | None = None, adversarial: Adversarial | None = None) -> list[dict]:
    """Train `model` on data.train with `recipe`, testing after every epoch; returns the history.

    With `adversarial`, every batch is replaced by its adversarial version (TRADES: adds a KL
    term), eps rising as `Adversarial.resolved` schedules it, each epoch also records PGD accuracy on
    a fixed test batch, and the weights of the epoch with the best monitored robustness are kept
    (early stopping on robust accuracy; with `adversarial.keep_last`, the last epoch's: the
    monitor's 500 images pick among epochs within its noise, and the one-cycle schedule ends on its
    best clean accuracy). With `recipe.ema`, the moving average of the weights is what is tested,
    monitored and kept. An epoch at chance is never the one kept; a collapsed one (`collapse_cause`)
    stops the training with TrainingCollapsed, the weights of the last epoch above chance restored.
    """
    check_recipe(recipe)
    torch.manual_seed(seed)  # dropout draws from the global generator
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, recipe)
    loss_fn, given = None, adversarial
    if adversarial is not None:
        adversarial.check()
        adversarial = adversarial.resolved(recipe.epochs)
        loss_fn = adversarial_loss(adversarial, torch.Generator().manual_seed(seed + 1))
    average = WeightAverage(model, recipe.ema) if recipe.ema else None
    judged = average.model if average else model  # the weights that are tested, monitored and kept
    probe = data.test_x[:adversarial.monitor if adversarial else 500]
    history: list[dict] = []
    best: tuple[float, int, dict] | None = None
    good = (0, copy.deepcopy(model.state_dict()))  # the last weights with finite losses: (epoch, state)
    learned = (0, None, 0.0)  # the last epoch above chance: (epoch, judged state, best test accuracy so far)
    for epoch in range(1, recipe.epochs + 1):
        start = time.perf_counter()
        with tqdm(total=len(data.train_x), desc=f"epoch {epoch}/{recipe.epochs}", unit="img",
                  disable=not progress, leave=False) as bar:
            stats = train_epoch(model, optimizer, data.train_x, data.train_y, recipe.batch_size,
                                generator, bar, loss_fn=loss_fn,
                                eps_schedule=None if adversarial is None
                                else lambda frac, e=epoch: adversarial.eps_at(e - 1 + frac),
                                lr_schedule=None if recipe.schedule == "constant"
                                else lambda frac, e=epoch: learning_rate(recipe, e - 1 + frac),
                                after_step=average.update if average else None, precision=recipe.precision)
        train_seconds = time.perf_counter() - start
        test = evaluate(judged, data.test_x, data.test_y)
        if _diverged(model, stats["train_loss"], test["loss"]):
            model.load_state_dict(good[1])
            kept = (f"the weights of epoch {good[0]}, the last with finite losses, are restored" if good[0]
                    else "no epoch ended with finite losses")
            err = TrainingDiverged(f"training diverged in epoch {epoch}: train loss {stats['train_loss']:g}, "
                                   f"test loss {test['loss']:g} (learning rate {recipe.lr:g} too large?); {kept}")
            err.good_epoch, err.history = good[0], history
            raise err
        good = (epoch, copy.deepcopy(model.state_dict()))
        stats = {"epoch": epoch, **stats, "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                 "seconds": round(train_seconds, 3)}
        if adversarial is not None and adversarial.ramp_end() > epoch:
            stats["ramping"] = True
        if test["accuracy"] <= CHANCE:
            stats["at_chance"] = True
            signals = collapse_signals(model, probe)
            cause = collapse_cause(stats, signals, learned[2])
            if cause is not None:
                history.append(stats)
                if on_epoch is not None:
                    on_epoch(stats)
                if learned[1] is not None:
                    model.load_state_dict(learned[1])
                err = TrainingCollapsed(_collapse_message(stats, signals, cause, recipe, given, adversarial,
                                                          math.ceil(len(data.train_x) / recipe.batch_size)))
                err.good_epoch, err.history, err.cause = learned[0], history, cause
                raise err
        else:
            learned = (epoch, copy.deepcopy(judged.state_dict()), max(learned[2], test["accuracy"]))
        if adversarial is not None:
            stats["robust_accuracy"] = monitor_robustness(judged, data, adversarial)
            if adversarial.method == "ibp":
                stats["certified_accuracy"] = monitor_certified(judged, data, adversarial)
            stats["warnings"] = _epoch_warnings(stats, best[0] if best else None)
            score = stats.get("certified_accuracy", stats["robust_accuracy"])
            if not stats.get("at_chance") and (best is None or score > best[0]):
                best = (score, epoch, copy.deepcopy(judged.state_dict()))
        kept_earlier = best is not None and adversarial is not None and not adversarial.keep_last
        if stats.get("at_chance") and epoch == recipe.epochs and not kept_earlier:
            stats.setdefault("warnings", []).append(
                f"epoch {epoch}: test accuracy {test['accuracy']:.2f}% is at chance after the last epoch "
                f"(a slow start or a recipe that does not train: more epochs, or another --lr)")
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    if best is not None and best[1] != len(history) and not adversarial.keep_last:
        model.load_state_dict(best[2])
        history[-1]["restored_epoch"] = best[1]
    elif average is not None:
        model.load_state_dict(average.model.state_dict())
    return history


def _diverged(model: nn.Module, *losses: float) -> bool:
    """A non-finite loss or weight: training cannot recover from it."""
    return not all(math.isfinite(v) for v in losses) or not all(bool(torch.isfinite(p).all())
                                                                for p in model.parameters())


def resolve_recipe(name: str, **overrides) -> Recipe:
    """The model's recipe with every non-None override applied."""
    recipe = get_spec(name).recipe
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "dropout" in changes and recipe.dropout is None and changes["dropout"] != 0:
        raise AdvmnistError(f"model {name!r} has no dropout option")
    recipe = dataclasses.replace(recipe, **changes)
    check_recipe(recipe)
    return recipe


def train_run(name: str, *, out: str | Path = "runs", seed: int = 0, device: str = "auto",
              data: MNIST | None = None, data_dir: str | None = None, progress: bool = False,
              on_epoch: Callable[[dict], None] | None = None, adversarial: Adversarial | None = None,
              **overrides) -> Path:
    """Train a zoo model with its recipe (plus overrides) and write a finished run directory.

    The directory holds `model.pt` (weights, `torch.load(weights_only=True)`), `record.json`
    (model, recipe, seed, history, accuracy, data checksum, versions, wall time) and `curves.png`.
    """
    from .pictures import plot_curves

    recipe = resolve_recipe(name, **overrides)
    options = {"dropout": recipe.dropout} if recipe.dropout is not None else {}
    dev = pick_device(device)
    runs.check_output_dir(out)  # before the training, not after it
    if data is None:
        data = load_mnist(data_dir, download=False)
    data = data.to(dev)
    wall = time.perf_counter()
    torch.manual_seed(seed)
    model = create_model(name, **options).to(dev)  # initial weights drawn from the seeded generator
    try:
        history = fit(model, data, recipe, seed=seed, progress=progress, on_epoch=on_epoch, adversarial=adversarial)
    except TrainingDiverged as exc:
        if not exc.good_epoch:
            raise
        kept = _keep_diverged(model, name, options, out, seed, recipe, exc)
        raise TrainingDiverged(f"{exc} and kept in {kept / runs.CHECKPOINT} (a run of kind 'train-diverged', "
                               f"which attack and evaluate do not pick up)") from None
    except TrainingCollapsed as exc:
        kept = _keep_collapsed(model, name, options, out, seed, recipe, adversarial, data, exc)
        where = (f"the weights of epoch {exc.good_epoch}, the last above chance, are kept in {kept}"
                 if exc.good_epoch else f"recorded in {kept}")
        raise TrainingCollapsed(f"{exc}; {where} (a run of kind 'train-collapsed', which attack and evaluate "
                                f"do not pick up)") from None
    final = evaluate(model, data.test_x, data.test_y)
    run_name = runs.new_run_name(name, seed, tag=f"-adv-{adversarial.method}" if adversarial else "")
    with runs.run_directory(out, run_name) as tmp:
        run_name = runs.final_path(tmp).name  # with a suffix if another run took the name
        sha = runs.save_checkpoint(tmp / runs.CHECKPOINT, model.cpu(), name, options)
        prov = runs.provenance()
        record = {
            "kind": "train", "model": name, "options": options, "recipe": dataclasses.asdict(recipe),
            "seed": seed, "device": str(dev), "n_train": len(data.train_x), "n_test": len(data.test_x),
            "data_checksum": data.checksum, "history": history,
            "test_accuracy": final["accuracy"], "test_loss": final["loss"],
            "per_class_accuracy": final["per_class_accuracy"], "checkpoint_sha256": sha,
            "reported_accuracy": get_spec(name).reported_accuracy,
            "adversarial": dataclasses.asdict(adversarial) if adversarial else None,
            "schedule": _schedule(adversarial, recipe),
            "warnings": (recipe_warnings(recipe, len(data.train_x))
                         + [w for h in history for w in h.get("warnings", [])]),
            "wall_time_s": round(time.perf_counter() - wall, 2), "provenance": prov,
            "finished": prov["time"], "run": run_name,
        }
        plot_curves(history, tmp / "curves.png", title=f"{name} (seed {seed})")
        runs.write_json(tmp / runs.RECORD, record)
    return Path(out) / run_name


def _schedule(adversarial: Adversarial | None, recipe: Recipe) -> dict | None:
    """The eps schedule as trained: `adversarial` keeps what was asked for (None: sized from the
    epochs), so that an experiment finds the run again; this says what that became."""
    if adversarial is None:
        return None
    done = adversarial.resolved(recipe.epochs)
    return {"warmup_epochs": done.warmup_epochs, "ramp_epochs": done.ramp_epochs,
            "sized_from_epochs": adversarial.ramp_epochs is None, "note": done.schedule_note(recipe.epochs)}


def _keep_collapsed(model: nn.Module, name: str, options: dict, out: str | Path, seed: int, recipe: Recipe,
                    adversarial: Adversarial | None, data: MNIST, exc: TrainingCollapsed) -> Path:
    """Record a collapsed training as a run of kind 'train-collapsed', with the weights of its last
    epoch above chance if it had one (never the collapsed ones)."""
    tag = (f"-adv-{adversarial.method}" if adversarial else "") + "-collapsed"
    with runs.run_directory(out, runs.new_run_name(name, seed, tag=tag)) as tmp:
        kept = runs.final_path(tmp)
        record = {"kind": "train-collapsed", "model": name, "options": options, "recipe": dataclasses.asdict(recipe),
                  "seed": seed, "n_train": len(data.train_x), "data_checksum": data.checksum,
                  "adversarial": dataclasses.asdict(adversarial) if adversarial else None,
                  "schedule": _schedule(adversarial, recipe), "epoch": exc.good_epoch, "cause": exc.cause,
                  "error": str(exc), "history": exc.history, "provenance": runs.provenance(), "run": kept.name}
        if exc.good_epoch:
            record["checkpoint_sha256"] = runs.save_checkpoint(tmp / runs.CHECKPOINT, model.cpu(), name, options)
        runs.write_json(tmp / runs.RECORD, record)
    return kept


def _keep_diverged(model: nn.Module, name: str, options: dict, out: str | Path, seed: int, recipe: Recipe,
                   exc: TrainingDiverged) -> Path:
    """Write the last good weights of a diverged training into a run of kind 'train-diverged'."""
    with runs.run_directory(out, runs.new_run_name(name, seed, tag="-diverged")) as tmp:
        kept = runs.final_path(tmp)
        sha = runs.save_checkpoint(tmp / runs.CHECKPOINT, model.cpu(), name, options)
        runs.write_json(tmp / runs.RECORD, {
            "kind": "train-diverged", "model": name, "options": options, "recipe": dataclasses.asdict(recipe),
            "seed": seed, "epoch": exc.good_epoch, "error": str(exc), "history": exc.history,
            "checkpoint_sha256": sha, "provenance": runs.provenance(), "run": kept.name})
    return kept
