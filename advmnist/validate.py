"""One validation layer for numbers and settings, wherever they come from.

Command-line options (through the click types in `advmnist/cli_types.py`), training recipes and
adversarial settings (`advmnist/train.py`), attack parameters (`advmnist/attacking.py`) and
experiment specs (`advmnist/experiments.py`) are all checked here. A value is refused when it is
not finite (NaN and infinity parse as floats, so `--eps nan` would otherwise run), out of its range,
or of the wrong type, with one line that names the option, or the file, table and key, and says
what was expected.

Torch-free and click-free, so the CLI can use it before torch is imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from .errors import InvalidValue, SpecError
from .names import BOUNDS


def _plain_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Range:
    """A finite number in [lo, hi] (either end open where asked); an integer when `integer`."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    text: str = ""  # how to say what is expected; built from the bounds when empty

    def describe(self) -> str:
        if self.text:
            return self.text
        kind = "an integer" if self.integer else "a finite number"
        if self.lo is not None and self.hi is not None:
            return (f"{kind} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                    f"{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{kind} {'<' if self.hi_open else '<='} {self.hi:g}"
        return kind

    def accepts(self, value: Any) -> bool:
        if not _plain_number(value) or (self.integer and not isinstance(value, int)):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True

    def check(self, value: Any, label: str) -> Any:
        """`value` if it is in range, else InvalidValue('<label> must be <range>, got <value>')."""
        if not self.accepts(value):
            raise InvalidValue(f"{label} must be {self.describe()}, got {value!r}")
        return value


POSITIVE = Range(lo=0, lo_open=True, text="positive (a finite number > 0)")
NONNEG = Range(lo=0, text=">= 0 (a finite number)")
PROBABILITY = Range(lo=0, hi=1, hi_open=True, text="in [0, 1) (a finite number)")
PERCENT = Range(lo=0, hi=100, text="a percentage in [0, 100]")
COUNT = Range(lo=1, integer=True)  # "an integer >= 1"
COUNT0 = Range(lo=0, integer=True)  # "an integer >= 0"; where 0 means "all"
SEED = Range(lo=0, hi=2**63 - 1, integer=True)
DIGIT = Range(lo=0, hi=9, integer=True)

#: Recipe fields (advmnist.models.Recipe) with their ranges and their names in messages.
RECIPE: dict[str, tuple[str, Range]] = {
    "lr": ("learning rate", POSITIVE), "momentum": ("momentum", NONNEG), "batch_size": ("batch size", COUNT),
    "epochs": ("epochs", COUNT), "dropout": ("dropout", PROBABILITY), "weight_decay": ("weight decay", NONNEG),
    "ema": ("weight-average decay", PROBABILITY),
}

#: Adversarial-training fields (advmnist.train.Adversarial).
ADVERSARIAL: dict[str, tuple[str, Range]] = {
    "eps": ("eps", NONNEG), "steps": ("steps", COUNT), "alpha": ("alpha", POSITIVE), "beta": ("beta", NONNEG),
    "ramp_epochs": ("eps ramp", NONNEG), "monitor": ("monitor images", COUNT),
    "monitor_steps": ("monitor steps", COUNT), "monitor_eps": ("monitor eps", NONNEG),
    "kappa": ("kappa", Range(lo=0, hi=1, text="in [0, 1]")), "restarts": ("inner restarts", COUNT),
}

#: Attack keyword arguments shared by the attack registry (advmnist/attacks/*); others are only
#: checked to be finite. The `attack` command's options take their ranges from here.
ATTACK_PARAMS: dict[str, tuple[str, Range]] = {
    "eps": ("eps", NONNEG), "alpha": ("alpha", POSITIVE), "steps": ("steps", COUNT),
    "restarts": ("restarts", COUNT), "queries": ("queries", COUNT), "targets": ("targets", Range(lo=1, hi=9, integer=True)),
    "eta": ("eta", POSITIVE), "lam": ("lam", NONNEG), "lr": ("lr", POSITIVE),
    "rho": ("rho", Range(lo=0, hi=1)), "p_init": ("p_init", Range(lo=0, hi=1, lo_open=True)),
    "start_std": ("start_std", NONNEG), "alpha_max": ("alpha_max", Range(lo=0, hi=1)),
    "beta": ("beta", Range(lo=0, hi=1, lo_open=True, hi_open=True)),
    "c": ("c", POSITIVE), "kappa": ("kappa", NONNEG), "search_steps": ("search_steps", COUNT),
    "overshoot": ("overshoot", NONNEG), "candidates": ("candidates", Range(lo=2, hi=10, integer=True)),
    "alpha_init": ("alpha_init", POSITIVE), "alpha_final": ("alpha_final", POSITIVE),
    "gamma_init": ("gamma_init", Range(lo=0, hi=1, lo_open=True, hi_open=True)),
    "gamma_final": ("gamma_final", Range(lo=0, hi=1, lo_open=True, hi_open=True)),
    "theta": ("theta", Range(lo=0, hi=1, lo_open=True)), "gamma": ("gamma", Range(lo=0, hi=1, lo_open=True)),
}


def check_fields(values: Mapping[str, Any], ranges: Mapping[str, tuple[str, Range]], where: str = "") -> None:
    """Check every value whose key has a range; None means "not set" and passes; any other float
    must be finite even without a range."""
    prefix = f"{where}: " if where else ""
    for key, value in values.items():
        if value is None:
            continue
        if key in ranges:
            label, rng = ranges[key]
            if not rng.accepts(value):
                raise InvalidValue(f"{prefix}{label} must be {rng.describe()}, got {value!r}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidValue(f"{prefix}{key} must be a finite number, got {value!r}")


# ---- target maps ---------------------------------------------------------------------------

TARGET_KEYWORDS = ("next", "prev", "all")


def parse_target_map(spec: str) -> str | dict[int, list[int]]:
    """'next', 'prev', 'all', or pairs '0:3,1:7' as {source: [targets]}; a digit never targets itself."""
    text = spec.strip().lower()
    if text in TARGET_KEYWORDS:
        return text
    usage = "use next, prev, all or pairs like 0:3,1:7"
    pairs: dict[int, list[int]] = {}
    for item in text.split(","):
        parts = item.split(":")
        try:
            s, t = (int(v) for v in parts)
        except ValueError:
            raise InvalidValue(f"target map {spec!r}: {usage}") from None
        if not (DIGIT.accepts(s) and DIGIT.accepts(t)):
            raise InvalidValue(f"target map {spec!r}: digits are 0 to 9; {usage}")
        if s == t:
            raise InvalidValue(f"target map {spec!r}: {s}:{t} asks digit {s} to be read as itself; "
                               f"a target must differ from the true digit")
        if t in pairs.setdefault(s, []):
            raise InvalidValue(f"target map {spec!r}: pair {s}:{t} given twice")
        pairs[s].append(t)
    return pairs


def parse_eps_list(text: str) -> list[float]:
    """'0.1,0.3' -> [0.1, 0.3]: at least one value, no empty items, each finite and >= 0."""
    items = [v.strip() for v in str(text).split(",")]
    if not any(items):
        raise InvalidValue(f"expected one or more numbers separated by commas, got {text!r}")
    values = []
    for item in items:
        if not item:
            raise InvalidValue(f"empty item in {text!r}; expected numbers separated by commas")
        try:
            value = float(item)
        except ValueError:
            raise InvalidValue(f"expected numbers separated by commas, got {text!r}") from None
        values.append(NONNEG.check(value, "eps"))
    return values


# ---- experiment specs ----------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    """One key of a spec table: what it must be (in words) and the test."""

    expect: str
    ok: Callable[[Any], bool]
    required: bool = False


def _number(rng: Range, required: bool = False) -> Field:
    return Field(rng.describe(), rng.accepts, required)


def _string(required: bool = False, expect: str = "a string") -> Field:
    return Field(expect, lambda v: isinstance(v, str) and (not required or bool(v.strip())), required)


def _choice(options: Iterable[str]) -> Field:
    options = tuple(options)
    return Field("one of " + ", ".join(repr(o) for o in options), lambda v: isinstance(v, str) and v in options)


def _list(noun: str, item: Callable[[Any], bool], distinct: bool = False) -> Field:
    def ok(v: Any) -> bool:
        if not isinstance(v, list) or not v or not all(item(x) for x in v):
            return False
        return not distinct or len(set(v)) == len(v)
    return Field(f"a non-empty list of {'distinct ' if distinct else ''}{noun}", ok)


def _table(required: bool = False) -> Field:
    return Field("a table (key = value pairs)", lambda v: isinstance(v, dict), required)


def _tables(required: bool = False) -> Field:
    return Field("an array of tables ([[...]] sections)",
                 lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v) and (bool(v) or not required),
                 required)


def _scalar(v: Any) -> bool:
    return isinstance(v, (str, bool)) or (_plain_number(v) and math.isfinite(v))


BOOL = Field("true or false", lambda v: isinstance(v, bool))
_PARAMS = Field("a table of attack parameters", lambda v: isinstance(v, dict))

#: The keys the schema types; keys of a table that the schema does not type only need to be finite.
SPEC_SCHEMA: dict[str, dict[str, Field]] = {
    "spec": {
        "name": _string(),
        "title": _string(required=True, expect="a non-empty string (the page's heading)"),
        "report": _string(required=True, expect="a non-empty string (which report the table comes from)"),
        "description": _string(),
        "seeds": _list("integers >= 0", SEED.accepts, distinct=True),
        "train_limit": _number(COUNT),
        "per_class": BOOL,
        "variant": _tables(required=True),
        "attack": _tables(),
        "transfer": _table(),
        "robust": _table(),
    },
    "variant": {
        "label": _string(required=True, expect="a non-empty string (the row's name)"),
        "model": _string(required=True, expect="a zoo model name (see `advmnist models`)"),
        "overrides": _table(),
        "reported": _number(PERCENT),
        "note": _string(),
        "adversarial": _table(),
    },
    "attack": {
        "method": _string(required=True, expect="an attack name (see `advmnist attack --help`)"),
        "params": _PARAMS,
        "limit": _number(COUNT),
        "label": _string(),
        "target_map": _string(expect='"all" (the source-target grid) or a target map such as next or 0:3,1:7'),
    },
    "transfer": {"method": _string(), "params": _PARAMS, "limit": _number(COUNT)},
    "robust": {
        "eps": _number(NONNEG), "ensemble": _string(), "attacks": _list("attack names", lambda v: isinstance(v, str)),
        "steps": _number(COUNT), "restarts": _number(COUNT), "queries": _number(COUNT),
        "norm": _choice(("linf", "l2")), "alone": BOOL, "limit": _number(COUNT0), "check_n": _number(COUNT),
        "certify": BOOL, "bound": _choice(BOUNDS), "curve": _list("eps values >= 0", NONNEG.accepts, distinct=True),
        "curve_limit": _number(COUNT0),
    },
}


def _check_table(table: dict, schema: Mapping[str, Field], known: Iterable[str], where: str) -> None:
    known = sorted(set(known))
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}; "
                        f"expected {', '.join(known)}")
    for key, field in schema.items():
        if key not in known:
            continue
        if key not in table:
            if field.required:
                raise SpecError(f"{where}: missing key {key!r}: expected {field.expect}")
            continue
        if not field.ok(table[key]):
            raise SpecError(f"{where}: key {key!r}: expected {field.expect}, got {table[key]!r}")
    for key, value in table.items():
        if key not in schema and not (_scalar(value) or isinstance(value, (dict, list))):
            raise SpecError(f"{where}: key {key!r}: expected a finite value, got {value!r}")


def _check_ranged(table: dict, ranges: Mapping[str, tuple[str, Range]], known: Iterable[str], where: str,
                  lists: bool = False) -> None:
    """A table of values with ranges (recipe overrides, adversarial settings, attack parameters)."""
    known = sorted(set(known))
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}; "
                        f"expected {', '.join(known)}")
    for key, value in table.items():
        values = value if lists and isinstance(value, list) else [value]
        if lists and isinstance(value, list) and not value:
            raise SpecError(f"{where}: key {key!r}: expected a value or a non-empty list, got []")
        for v in values:
            if key in ranges:
                _, rng = ranges[key]
                if not rng.accepts(v):
                    raise SpecError(f"{where}: key {key!r}: expected {rng.describe()}, got {v!r}")
            elif not _scalar(v):
                raise SpecError(f"{where}: key {key!r}: expected a string, true/false or a finite number, got {v!r}")


def check_spec(raw: dict, where: str, fields: Mapping[str, Iterable[str]], *, recipe: Iterable[str],
               adversarial: Iterable[str]) -> None:
    """Check a parsed TOML spec against SPEC_SCHEMA before any dataclass is built.

    `fields`: the keys each table may hold ({"spec": ..., "variant": ..., "attack": ...,
    "transfer": ..., "robust": ...}, from the spec dataclasses, with "variant" and "attack" for the
    arrays of tables); `recipe` and `adversarial`: the keys of `overrides` and `adversarial`;
    which parameters an attack takes is the attack registry's to say (`load_spec` asks it). Raises
    SpecError naming `where` (the file), the table and the key, and what was expected.
    """
    _check_table(raw, SPEC_SCHEMA["spec"], fields["spec"], where)
    for i, v in enumerate(raw.get("variant", [])):
        at = f"{where} [[variant]] #{i + 1}" + (f" ({v['label']!r})" if isinstance(v.get("label"), str) else "")
        _check_table(v, SPEC_SCHEMA["variant"], fields["variant"], at)
        _check_ranged(v.get("overrides", {}), RECIPE, recipe, f"{at} overrides")
        _check_ranged(v.get("adversarial", {}), ADVERSARIAL, adversarial, f"{at} adversarial")
    for i, a in enumerate(raw.get("attack", [])):
        at = f"{where} [[attack]] #{i + 1}"
        _check_table(a, SPEC_SCHEMA["attack"], fields["attack"], at)
        params = a.get("params", {})
        _check_ranged(params, ATTACK_PARAMS, params, f"{at} ({a['method']}) params", lists=True)
    if "transfer" in raw:
        t = raw["transfer"]
        _check_table(t, SPEC_SCHEMA["transfer"], fields["transfer"], f"{where} [transfer]")
        params = t.get("params", {})
        _check_ranged(params, ATTACK_PARAMS, params, f"{where} [transfer] params")
    if "robust" in raw:
        _check_table(raw["robust"], SPEC_SCHEMA["robust"], fields["robust"], f"{where} [robust]")
