"""Click option types over `advmnist/validate.py`: every number an option takes is finite and in range.

`float("nan")` and `float("inf")` parse, so click's FLOAT lets `--eps nan` through; these types refuse
it (and a negative count, an empty eps list, a digit targeting itself) while the command line is
parsed, before any data is loaded (eps lists: `parse_eps_list`, through the CLI's `_floats`).
Torch-free, like the CLI's import.
"""

from __future__ import annotations

import click

from .errors import InvalidValue
from .validate import COUNT, COUNT0, NONNEG, POSITIVE, PROBABILITY, SEED, Range, parse_target_map


class Number(click.ParamType):
    """A finite float (or an integer, when the range says so) within `rng`."""

    def __init__(self, rng: Range, label: str = "") -> None:
        self.rng, self.label = rng, label
        self.name = "integer" if rng.integer else "number"

    def convert(self, value, param, ctx):
        label = self.label or (param.name if param is not None else "value")
        if isinstance(value, str):
            try:
                value = int(value) if self.rng.integer else float(value)
            except ValueError:
                self.fail(f"{value!r} is not {'an integer' if self.rng.integer else 'a number'}", param, ctx)
        try:
            return self.rng.check(value, label)
        except InvalidValue as exc:
            self.fail(str(exc), param, ctx)


class TargetMap(click.ParamType):
    """next, prev, all, or pairs like 0:3,1:7 (digits 0-9, never a digit to itself); kept as text."""

    name = "map"

    def convert(self, value, param, ctx):
        try:
            parse_target_map(value)
        except InvalidValue as exc:
            self.fail(str(exc), param, ctx)
        return value


LEARNING_RATE = Number(POSITIVE, "learning rate")
MOMENTUM = Number(NONNEG, "momentum")
DROPOUT = Number(PROBABILITY, "dropout")
EMA_DECAY = Number(PROBABILITY, "weight-average decay")
EPS = Number(NONNEG, "eps")
STEP_SIZE = Number(POSITIVE, "step size")
WEIGHT = Number(NONNEG, "weight")
EPOCHS = Number(NONNEG, "epochs")  # fractional epochs (the eps ramp)
POSITIVE_INT = Number(COUNT)
LIMIT = Number(COUNT0)  # 0 means "all"
SEED_INT = Number(SEED, "seed")
