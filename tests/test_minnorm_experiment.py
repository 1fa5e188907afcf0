"""Minimum-norm attacks through the experiment runner and the attack command: each column's median
distance, the curve it implies beside the ensemble's fixed-eps points, and the source-target grid."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from advmnist import runs
from advmnist.cli import main
from advmnist.experiments import run_experiment

SPEC = """
title = "Miniature minimum-norm"
report = "test"
seeds = [0]
train_limit = 1000

[[variant]]
label = "mlp"
model = "mlp"
overrides = { epochs = 1 }

[[attack]]
method = "fmn"
params = { norm = "l2", steps = 10 }
limit = 40
label = "FMN-L2"

[[attack]]
method = "fgsm"
params = { eps = 0.1 }
limit = 40

[[attack]]
method = "fmn"
params = { norm = "l0", steps = 10 }
target_map = "all"
label = "FMN-L0 grid"

[robust]
eps = 1.0
norm = "l2"
ensemble = "quick"
steps = 3
queries = 20
limit = 40
check_n = 20
certify = false
curve = [0.5]
"""


@pytest.fixture(scope="module")
def page(tmp_path_factory, small):
    root = tmp_path_factory.mktemp("minnorm")
    spec = root / "experiments" / "mn.toml"
    spec.parent.mkdir()
    spec.write_text(SPEC)
    data = small.subset(None, 1000)
    path = run_experiment(spec, out=root / "runs", data=data)
    return root, path


def test_a_minimum_norm_column_shows_the_median_distance_and_its_curve(page):
    root, path = page
    text = path.read_text()
    (run,) = (root / "runs").glob("mlp-*")
    cached = [json.loads(p.read_text()) for p in (run / "attack-cache").glob("fmn-*.json")]
    untargeted = next(c for c in cached if "target_map" not in c)
    prof = untargeted["distance"]
    assert prof["norm"] == "l2" and prof["n"] == 40 and prof["sorted"] == sorted(prof["sorted"])
    assert "| FMN-L2: median L2 |" in text
    assert f"{prof['median']:.3g}" in text
    assert "mn_distances.png" in text and (path.parent / "mn_distances.png").is_file()
    assert "standard ensemble's points at fixed eps" in text


def test_the_grid_has_every_pair_and_is_on_the_page(page):
    root, path = page
    text = path.read_text()
    (run,) = (root / "runs").glob("mlp-*")
    grid_rec = next(json.loads(p.read_text()) for p in (run / "attack-cache").glob("fmn-*.json")
                    if json.loads(p.read_text()).get("target_map") == "all")
    grid = grid_rec["grid"]
    assert len(grid["target"]) == 90 and all(s != t for s, t in zip(grid["true"], grid["target"]))
    assert grid["norm"] == "l0" and (run / "attack-cache" / grid["images"]).is_file()
    assert "mn_grid_3_1.png" in text and (path.parent / "mn_grid_3_1.png").is_file()
    assert "pairs reach their target" in text


def test_attack_command_records_distances_and_evaluate_draws_them_with_the_ensemble(tmp_path, small):
    out = tmp_path / "runs"
    runner = CliRunner()
    trained = runner.invoke(main, ["train", "--model", "mlp", "--epochs", "1", "--limit", "1000", "--out", str(out),
                                   "--quiet"])
    assert trained.exit_code == 0, trained.output
    run = runs.latest_run(out, "mlp")
    result = runner.invoke(main, ["attack", "--run", str(run), "--method", "fmn", "--norm", "l2", "--steps", "10",
                                  "--limit", "30", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "median L2 distance to the nearest adversarial image found" in result.output
    assert "robust accuracy these distances imply at L2 eps" in result.output
    (attack_dir,) = (out / "attacks").glob("mlp-fmn-*")
    rec = json.loads((attack_dir / "record.json").read_text())
    assert rec["results"][0]["distance"]["n"] == 30 and (attack_dir / "distance_curve.png").is_file()
    assert "distance_curve.png" in (out / "attacks" / "index.html").read_text()
    curve = runner.invoke(main, ["evaluate", "--run", str(run), "--robust", "--norm", "l2", "--eps", "1.0",
                                 "--curve", "0.5", "--ensemble", "quick", "--steps", "3", "--queries", "20",
                                 "--limit", "30", "--check-n", "10", "--no-certify", "--out", str(out)])
    assert curve.exit_code == 0, curve.output
    assert "robust accuracy against l2 eps on the first 30 test images" in curve.output
    assert "fmn (" in curve.output and (run / "eval" / "robust_curve.png").is_file()
    rc = json.loads((run / "eval" / "robust_curve.json").read_text())
    assert [p["eps"] for p in rc["points"]] == [0.5, 1.0] and len(rc["minimum_norm"]) == 1
    no_robust = runner.invoke(main, ["evaluate", "--run", str(run), "--curve", "0.5", "--out", str(out)])
    assert no_robust.exit_code == 2 and "--curve goes with --robust" in no_robust.output


def test_a_targeted_grid_from_the_attack_command(tmp_path):
    out = tmp_path / "runs"
    runner = CliRunner()
    assert runner.invoke(main, ["train", "--model", "mlp", "--epochs", "1", "--limit", "500", "--out", str(out),
                                "--quiet"]).exit_code == 0
    result = runner.invoke(main, ["attack", "--method", "jsma", "--target-map", "all", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    (attack_dir,) = (out / "attacks").glob("mlp-jsma-*")
    rec = json.loads((attack_dir / "record.json").read_text())
    assert rec["files"]["grid"] == "grid.png" and (attack_dir / "grid.png").is_file()
    assert rec["results"][0]["distance"]["norm"] == "l0"
    assert "median L0 distance to its target" in result.output
