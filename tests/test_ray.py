"""The Ray executor against the local one: a miniature spec run both ways gives the same records,
cached attack results and page (times aside); a failed task is named with its variant and seed while
the others finish, and a re-run reuses them; without Ray, `--executor ray` is one line of error.

The Ray tests start a local Ray instance with two CPUs (`ray.init(num_cpus=2)`) and shut it down
after; they are skipped where Ray is not installed (`pip install -e '.[ray]'`).
"""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest
import torch
from click.testing import CliRunner

from advmnist.cli import main

pytestmark = pytest.mark.ray

def _spec(title: str, seeds: str, second: str) -> str:
    """A miniature spec: an MLP variant, a second variant, one FGSM attack column."""
    return f"""
title = "{title}"
report = "test"
seeds = {seeds}
train_limit = 600

[[variant]]
label = "MLP"
model = "mlp"
overrides = {{ epochs = 1 }}

[[variant]]
{second}

[[attack]]
method = "fgsm"
params = {{ eps = 0.1 }}
limit = 100
"""


MINI = _spec("Miniature for the executors", "[0, 1]",
             'label = "LeNet"\nmodel = "lenet"\noverrides = { epochs = 1, lr = 0.05 }')
FAILING = _spec("Miniature with a variant whose training fails", "[0]",
                'label = "diverges"\nmodel = "mlp"\noverrides = { epochs = 1, lr = {lr} }')

#: Fields of a training record that differ between any two runs of the same work.
VARYING = ("run", "finished", "wall_time_s")


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """The Ray executor runs every task with torch threads = its CPUs (1): the local run does too, so
    the weights agree to the bit (a different thread count changes the last bits of a sum)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(*args: str) -> str:
    result = CliRunner().invoke(main, ["experiment", "run", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _records(out) -> dict:
    """Each run's training record by (model, seed), without what differs between two runs of it."""
    found = {}
    for path in out.glob("*/record.json"):
        rec = json.loads(path.read_text())
        for key in VARYING:
            rec.pop(key)
        rec["provenance"].pop("time")
        for h in rec["history"]:
            h.pop("seconds")
        found[rec["model"], rec["seed"]] = rec
    return found


def _cached_attacks(out) -> dict:
    found = {}
    for path in out.glob("*/attack-cache/*.json"):
        run = json.loads((path.parent.parent / "record.json").read_text())
        rec = json.loads(path.read_text())
        rec.pop("seconds")
        found[run["model"], run["seed"], path.name] = rec
    return found


def _without_times(page: str) -> str:
    page = re.sub(r"Wall time: [^\n]*", "Wall time: -", page)
    return re.sub(r"\| \d+ \|$", "| - |", page, flags=re.M)  # the train time (s) column


def test_ray_gives_the_local_records_cache_and_page(ray_instance, one_thread, tmp_path):
    spec = tmp_path / "mini.toml"
    spec.write_text(MINI)
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    _run(str(spec), "--out", str(local), "--results", str(local / "results"))
    log = _run(str(spec), "--out", str(ray_out), "--results", str(ray_out / "results"), "--executor", "ray")
    assert "done: training LeNet (lenet), seed 1" in log and "done: attack fgsm on MLP, seed 0" in log

    records = _records(local)
    assert len(records) == 4 and _records(ray_out) == records
    assert {r["provenance"]["threads"] for r in records.values()} == {1}
    attacks = _cached_attacks(local)
    assert len(attacks) == 4 and _cached_attacks(ray_out) == attacks

    page_local = (local / "results" / "mini.md").read_text()
    page_ray = (ray_out / "results" / "mini.md").read_text()
    assert "Ray executor, 1 CPU(s) per task" in page_ray and "Ray executor" not in page_local
    assert _without_times(page_ray) == _without_times(page_local)
    assert "4 run(s) trained, 0 reused" in page_ray

    again = _run(str(spec), "--out", str(ray_out), "--results", str(ray_out / "results"), "--executor", "ray")
    assert "ray: waiting" not in again  # every run and attack result reused, no task started
    assert "0 run(s) trained, 4 reused" in (ray_out / "results" / "mini.md").read_text()


def test_a_failed_task_is_named_and_the_others_finish(ray_instance, tmp_path):
    spec = tmp_path / "failing.toml"
    spec.write_text(FAILING.replace("{lr}", "1e30"))  # the loss is not finite after the first step
    out = tmp_path / "runs"
    result = CliRunner().invoke(main, ["experiment", "run", str(spec), "--out", str(out), "--executor", "ray"])
    assert result.exit_code == 2
    assert "2 of 4 task(s) failed; the other 2 finished" in result.output
    assert "training diverges (mlp), seed 0: training diverged in epoch 1" in result.output
    assert "attack fgsm on diverges, seed 0: not run (training diverges (mlp), seed 0 failed)" in result.output
    (finished,) = out.glob("mlp-*/attack-cache/fgsm-*.json")  # the other variant: trained and attacked

    spec.write_text(FAILING.replace("{lr}", "0.01"))
    _run(str(spec), "--out", str(out), "--executor", "ray")
    assert "1 run(s) trained, 1 reused" in (tmp_path / "results" / "failing.md").read_text()
    assert len(list(out.glob("mlp-*/attack-cache/fgsm-*.json"))) == 2 and finished.is_file()


def test_without_ray_the_ray_executor_is_one_line_of_error(tmp_path, monkeypatch):
    spec = tmp_path / "mini.toml"
    spec.write_text(MINI)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    result = CliRunner().invoke(main, ["experiment", "run", str(spec), "--out", str(tmp_path / "runs"),
                                       "--executor", "ray"])
    assert result.exit_code == 2
    assert result.output.splitlines() == ["error: the Ray executor needs Ray: install with pip install -e '.[ray]'"]
    assert not (tmp_path / "runs").exists()
