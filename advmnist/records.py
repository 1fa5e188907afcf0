"""Typed records: the run, attack and robust-evaluation records read back as frozen dataclasses.

The code that makes a record writes it as plain JSON (`advmnist.runs.write_json`); readers get it
back through one function, `from_dict` (or `read`, from a file), which tolerates older files: a key
the file lacks takes the field's default, so a field added later reads as its default in a record
written before it existed, and a key the dataclass does not know is ignored. Nested records
(`history`, `per_attack`, `overall`, ...) are converted by their annotations.

    rec = read(run / "record.json", RunRecord)
    rec.test_accuracy, rec.history[-1].epoch, rec.recipe["lr"]

Torch-free: the CLI can read records without importing torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """`cls` (a record dataclass) from a JSON object: missing keys take their defaults, unknown
    keys are ignored, nested records are built from their own dicts."""
    hints = typing.get_type_hints(cls)
    values = {f.name: _convert(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data}
    return cls(**values)


def read(path: str | os.PathLike, cls: type[T]) -> T:
    """The record at `path` as `cls` (JSON errors propagate; `runs.read_record` is the forgiving
    discovery reader)."""
    return from_dict(cls, json.loads(Path(path).read_text()))


def _convert(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is not type(None) and (dataclasses.is_dataclass(arg) or typing.get_origin(arg) in (list, dict)):
                return _convert(arg, value)
        return value
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return from_dict(hint, value)
    if origin is list and args and isinstance(value, list):
        return [_convert(args[0], v) for v in value]
    if origin is dict and len(args) == 2 and isinstance(value, Mapping):
        return {k: _convert(args[1], v) for k, v in value.items()}
    return value


# ---- training runs (advmnist.train.train_run) -------------------------------------------------------

@dataclass(frozen=True)
class Epoch:
    """One line of a training history."""

    epoch: int = 0
    train_loss: float | None = None
    train_accuracy: float | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    seconds: float = 0.0
    robust_accuracy: float | None = None  # adversarial training: PGD accuracy on the monitor images
    certified_accuracy: float | None = None  # IBP training: certified accuracy on the monitor images
    ramping: bool = False  # eps was still ramping up
    at_chance: bool = False  # test accuracy at chance (advmnist.train.CHANCE): never the epoch kept
    warnings: list[str] = field(default_factory=list)
    restored_epoch: int | None = None  # last epoch only: the weights kept were this epoch's


@dataclass(frozen=True)
class RunRecord:
    """A training run's record.json."""

    kind: str = "train"
    model: str = ""
    options: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)  # advmnist.models.Recipe fields (older records may lack some)
    seed: int = 0
    device: str = ""
    n_train: int = 0
    n_test: int = 0
    data_checksum: str = ""
    history: list[Epoch] = field(default_factory=list)
    test_accuracy: float | None = None
    test_loss: float | None = None
    per_class_accuracy: list[float | None] = field(default_factory=list)
    checkpoint_sha256: str = ""
    reported_accuracy: float | None = None
    adversarial: dict | None = None  # advmnist.train.Adversarial fields; None: standard training
    schedule: dict | None = None  # the eps schedule as trained (warm-up and ramp resolved from the epochs)
    warnings: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0
    provenance: dict = field(default_factory=dict)
    finished: str = ""
    run: str = ""


# ---- attacks (advmnist.measures.attack_measures, advmnist/attacking.py) -----------------------------

@dataclass(frozen=True)
class Stats:
    mean: float | None = None
    median: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Measures:
    """`attack_measures`' summary of a set of examples; rates in %, None where nothing was counted."""

    n: int = 0
    clean_accuracy: float | None = None
    fooling_rate: float | None = None
    robust_accuracy: float | None = None
    success_8bit: float | None = None
    target_success_rate: float | None = None  # targeted attacks only
    confidence: Stats = field(default_factory=Stats)
    l2: Stats = field(default_factory=Stats)
    linf: Stats = field(default_factory=Stats)
    l1: Stats = field(default_factory=Stats)
    l0: Stats = field(default_factory=Stats)  # pixels changed


@dataclass(frozen=True)
class DistanceProfile:
    """A minimum-norm attack's distances (`measures.distance_profile`): the sorted finite ones, how many
    examples it never fooled, the median; the robust-accuracy curve is drawn from them."""

    norm: str = ""
    n: int = 0
    never_fooled: int = 0
    median: float | None = None
    median_fooled: float | None = None  # over the fooled examples only
    sorted: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class AttackResult:
    """One point of an attack run (one eps of a sweep)."""

    params: dict = field(default_factory=dict)  # every keyword the attack ran with
    sweep_params: dict = field(default_factory=dict)  # this point's values of the swept parameters
    overall: Measures = field(default_factory=Measures)
    per_digit: dict[str, Measures] = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    seconds: float = 0.0
    examples: dict | None = None  # per-example results of small selections
    distance: DistanceProfile | None = None  # minimum-norm attacks only


@dataclass(frozen=True)
class AttackedModel:
    name: str = ""
    options: dict = field(default_factory=dict)
    run: str = ""
    checkpoint_sha256: str = ""
    clean_test_accuracy: float | None = None


@dataclass(frozen=True)
class AttackSelection:
    per_digit: int | None = None
    limit: int | None = None
    targeted: bool = False
    target_map: str | None = None
    n: int = 0


@dataclass(frozen=True)
class AttackRecord:
    """An `advmnist attack` run's record.json."""

    kind: str = "attack"
    method: str = ""
    name: str = ""
    model: AttackedModel = field(default_factory=AttackedModel)
    seed: int = 0
    data_checksum: str = ""
    selection: AttackSelection = field(default_factory=AttackSelection)
    results: list[AttackResult] = field(default_factory=list)
    files: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    provenance: dict = field(default_factory=dict)


def read_attack_record(path: str | os.PathLike) -> AttackRecord:
    return read(path, AttackRecord)


@dataclass(frozen=True)
class CachedAttack:
    """The experiment runner's cached attack evaluation of one run (attack-cache/<method>-<key>.json)."""

    method: str = ""
    params: dict = field(default_factory=dict)
    limit: int = 0
    seed: int = 0
    data: str = ""  # the data checksum
    overall: Measures = field(default_factory=Measures)
    seconds: float = 0.0
    distance: DistanceProfile | None = None  # minimum-norm attacks only
    grid: dict | None = None  # target_map "all": per pair test_index, true, target, clean_pred, adv_pred, size


# ---- robust evaluation (advmnist.evaluation.robust_evaluate_run) ------------------------------------

@dataclass(frozen=True)
class StageResult:
    """One attack of the ensemble: robust accuracy (%) after it, cumulatively and alone."""

    attack: str = ""
    key: str = ""
    gradient_free: bool = False
    robust_accuracy_alone: float | None = None
    robust_accuracy_after: float | None = None
    broke_pp: float = 0.0
    attacked: int | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class Check:
    check: str = ""
    passed: bool = True
    detail: str = ""
    counts: dict | None = None  # images the check found, its limit, and what more restarts recovered


@dataclass(frozen=True)
class Certificate:
    """Certified accuracy by IBP/CROWN (advmnist.bounds), or why there is none (`skipped`)."""

    method: str | None = None
    certified_accuracy: float | None = None
    certified_count: int | None = None
    seconds: float | None = None
    attacked_certified: int | None = None
    soundness_checked: bool | None = None
    skipped: str | None = None
    refined: dict | None = None  # --bound alpha-crown: the images left open, how many it certified, its time


@dataclass(frozen=True)
class RobustRecord:
    """`evaluate --robust`'s record (run/eval/robust.json and the experiment runner's cache)."""

    kind: str = "robust-evaluate"
    run: str = ""
    model: str = ""
    checkpoint_sha256: str = ""
    data_checksum: str = ""
    seed: int = 0
    settings: dict = field(default_factory=dict)
    eps: float = 0.0
    norm: str = "linf"
    n: int = 0
    clean_accuracy: float | None = None
    robust_accuracy: float | None = None
    per_attack: list[StageResult] = field(default_factory=list)
    seconds: float | None = None
    not_robust: list[int] | None = None  # absent in records older than per-image results
    certified: Certificate | None = None  # None: not computed (older records, --no-certify)
    interval: list[float | None] | None = None
    checks: list[Check] = field(default_factory=list)
    masking: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The record as plain JSON values, as `robust.json` holds it."""
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)
