"""What an experiment measured, as the runner hands it to the page and the plots: every value is
computed before anything is drawn or written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..records import CachedAttack, Measures, RobustRecord, RunRecord
from .spec import AttackEval, Spec, Transfer, Variant


@dataclass(frozen=True)
class VariantRuns:
    """A variant with a finished run for every seed of the spec."""

    variant: Variant
    runs: tuple[Path, ...]  # one per seed, in the spec's seed order
    records: tuple[RunRecord, ...]  # their training records


@dataclass(frozen=True)
class AttackColumn:
    """One column of the robustness table: an attack of the spec at one point of its eps list."""

    attack: AttackEval
    group: int  # index of the attack in spec.attacks (the columns of one attack share a plot panel)
    label: str  # the column's name
    eps: float | None  # this column's eps (the attack's default where the spec gives none); None: no eps
    cells: tuple[tuple[Measures, ...], ...]  # per variant (rows' order), per seed
    records: tuple[tuple[CachedAttack, ...], ...] = ()  # the same cells' whole records (distances, grid)
    grids: tuple[Path | None, ...] = ()  # per variant: the first seed's adversarial images of the grid

    @property
    def norm(self) -> str | None:
        """The norm of a minimum-norm attack's distances; None for a fixed-budget attack."""
        first = self.records[0][0] if self.records and self.records[0] else None
        return first.distance.norm if first is not None and first.distance is not None else None


@dataclass(frozen=True)
class TransferMatrix:
    transfer: Transfer
    labels: tuple[str, ...]  # the variants, as rows (crafted on) and columns (fed to)
    fooling: tuple[tuple[float, ...], ...]  # fooling rate (%) [crafted on][fed to]


@dataclass(frozen=True)
class Outcome:
    spec: Spec
    spec_path: Path
    n_train: int  # training images of the runs
    n_test: int  # test images
    rows: tuple[VariantRuns, ...]  # the variants with finished runs
    pending: tuple[Variant, ...]  # variants without (train=False)
    columns: tuple[AttackColumn, ...]
    robust: tuple[tuple[RobustRecord, ...], ...]  # per variant, per seed; empty without [robust]
    curve: tuple[tuple[RobustRecord, ...], ...]  # per variant (first seed), per eps of the curve
    transfer: TransferMatrix | None
    trained: int  # runs trained by this invocation
    reused: int  # runs found finished
    wall_s: float  # this invocation's time, figures included
    executor: str = ""  # what the page says beside the wall time about where the work ran ("": here)
