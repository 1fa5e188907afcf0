"""Declarative experiments: a TOML spec per table of the reports, run into a Markdown results page.

One module per job:

- `spec.py`: the spec dataclasses, `load_spec` (checked against `advmnist.validate.SPEC_SCHEMA`
  and the registries before any work) and `list_experiments`;
- `runner.py`: `run_experiment`, which finds or trains the runs, attacks and evaluates them
  (cached in each run directory) and collects every value into an `Outcome` (`outcome.py`);
- `plots.py`: the page's figures, drawn from the outcome;
- `page.py`: the Markdown page, rendered from the outcome once everything is computed;
- `executors.py`: where the training runs and attacks run: in this process (the default) or as
  Ray tasks on a Ray cluster (`make_executor("ray")`, with the `ray` extra installed).

    from advmnist.experiments import run_experiment
    run_experiment("experiments/report001.toml")  # writes experiments/results/report001.md
"""

from .executors import EXECUTORS, LocalExecutor, RayExecutor, TasksFailed, make_executor
from .outcome import AttackColumn, Outcome, TransferMatrix, VariantRuns
from .page import MISS_MARGIN, robust_command
from .runner import find_run, run_experiment
from .spec import AttackEval, Robust, Spec, Transfer, Variant, list_experiments, load_spec

__all__ = ["AttackColumn", "AttackEval", "EXECUTORS", "LocalExecutor", "MISS_MARGIN", "Outcome", "RayExecutor", "Robust",
           "Spec", "TasksFailed", "Transfer", "TransferMatrix", "Variant", "VariantRuns", "find_run", "list_experiments",
           "load_spec", "make_executor", "robust_command", "run_experiment"]
