"""Experiment specs: the TOML schema as frozen dataclasses, `load_spec` that checks a spec before
any work, and `list_experiments`.

A spec names variants (a zoo model plus recipe overrides, with the report's number beside it),
the seeds, and optionally attack evaluations, a transfer matrix and the robust evaluation. The
tables are checked against `advmnist.validate.SPEC_SCHEMA` first, then every model, recipe,
adversarial setting and attack parameter against the registries, so a bad spec is one SpecError
naming the file and key, never a traceback halfway through a run.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .. import validate
from ..errors import AdvmnistError, SpecError
from ..attacks import get_attack
from ..models import Recipe
from ..train import Adversarial, resolve_recipe


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
    method: str  # registry name: fgsm, pgd, penalty, gd, ...
    params: dict = field(default_factory=dict)  # attack keyword arguments (eps may be a list: a sweep)
    limit: int = 1000  # untargeted attacks: the first `limit` test images
    label: str = ""  # column name on the page; default from method and parameters
    target_map: str = ""  # "all": targeted, the first image of each digit sent to every other digit (the grid)


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
    bound: str = "auto"  # the certified bound (advmnist.evaluation.BOUNDS); alpha-crown refines what attacks leave
    curve: tuple[float, ...] = ()  # more eps values for an accuracy-vs-eps table and plot (first seed)
    curve_limit: int = 0  # images for the curve's points; 0: as `limit`


#: Robust fields that do not change the attacked number: left out of its cache key.
NOT_IN_KEY = ("certify", "curve", "curve_limit")


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
        from ..robustness import ensemble_stages

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
                adversarial_of(v, path).check()
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
        if a.target_map:
            from ..validate import parse_target_map

            try:
                parse_target_map(a.target_map)
            except AdvmnistError as exc:
                raise SpecError(f"{path} [[attack]] {a.method!r}: target_map: {exc}") from None
            if "targeted" not in accepted and not get_attack(a.method).always_targeted:
                raise SpecError(f"{path} [[attack]] {a.method!r}: an untargeted attack takes no target_map")
        lists = {k: len(v) for k, v in a.params.items() if isinstance(v, list)}
        if lists and (set(lists.values()) != {lists.get("eps", -1)}):
            raise AdvmnistError(f"{path}: attack {a.method!r}: a list parameter needs an eps list of the same "
                                f"length, got lengths {lists}")
    return spec


def adversarial_of(v: Variant, where: str | Path = "spec") -> Adversarial | None:
    """The variant's adversarial training settings; None for standard training."""
    if not v.adversarial:
        return None
    try:
        return Adversarial(**v.adversarial)
    except TypeError as exc:
        raise AdvmnistError(f"{where}: variant {v.label!r}: bad adversarial settings ({exc})") from None


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
