"""The pretrained models: their records ship under advmnist/weights/; their checkpoints are build
outputs, installed beside them or in $ADVMNIST_WEIGHTS. Where the checkpoints are installed, each is
still the model its record describes and is usable by name with no training; where they are not
(a fresh clone, CI), each use says so in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import advmnist
from advmnist import shipped
from advmnist.cli import main
from advmnist.errors import CheckpointError
from advmnist.runs import file_sha256

NAMES = shipped.list_pretrained()
ROOT = Path(__file__).resolve().parents[1]
INSTALLED = [n for n in NAMES if shipped.installed(n)]
needs_weights = pytest.mark.skipif(set(INSTALLED) != set(NAMES),
                                   reason="the pretrained checkpoints are not installed (build outputs, not in git)")


def test_the_documented_models_have_records_small_and_licensed():
    assert {"improved-bn", "trades-wide", "ibp-wide"} <= set(NAMES)
    assert sum(shipped.pretrained_record(n)["bytes"] for n in NAMES) <= 10_000_000
    for name in NAMES:
        rec = shipped.pretrained_record(name)
        assert rec["kind"] == "pretrained" and rec["name"] == name and len(rec["sha256"]) == 64
        assert rec["license"] and rec["command"].startswith("advmnist train") and rec["machine"]
        assert rec["evaluation"]["n"] >= 1000  # and every listing says how many
    assert '"weights/*"' in (ROOT / "pyproject.toml").read_text()  # installed with the package


@needs_weights
def test_installed_checkpoints_are_the_recorded_ones():
    for name in NAMES:
        assert file_sha256(shipped.checkpoint_path(name)) == shipped.pretrained_record(name)["sha256"]


def test_missing_weights_are_one_line_naming_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv(shipped.ENV_VAR, str(tmp_path))
    assert not shipped.installed("ibp-wide")
    with pytest.raises(shipped.PretrainedError, match="not installed.*ibp-wide.pt"):
        advmnist.pretrained("ibp-wide")
    result = CliRunner().invoke(main, ["attack", "--pretrained", "ibp-wide", "--method", "fgsm",
                                       "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "not installed" in result.output and "Traceback" not in result.output
    listing = CliRunner().invoke(main, ["pretrained"])
    assert listing.exit_code == 0 and "the checkpoints (build outputs) do not" in listing.output


@needs_weights
@pytest.mark.parametrize("name", NAMES)
def test_each_model_still_gives_its_recorded_numbers(name, mnist):
    rec = shipped.pretrained_record(name)
    model = advmnist.pretrained(name)
    assert not model.training
    clean = shipped.clean_accuracy(model, mnist)
    assert clean == pytest.approx(rec["clean_accuracy"], abs=0.011)
    n = rec["evaluation"]["n"]
    with torch.no_grad():
        first = 100.0 * float((model(mnist.test_x[:n]).argmax(1) == mnist.test_y[:n]).float().mean())
    assert first == pytest.approx(rec["evaluation"]["clean_accuracy"], abs=0.011)
    check = rec["check"]
    robust = shipped.slice_check(model, mnist, eps=check["eps"], norm=check["norm"])
    assert robust == pytest.approx(check["robust_accuracy"], abs=100 / check["n"] + 1e-6)  # one image at most
    cert = (rec["evaluation"].get("certified") or {}).get("certified_accuracy")
    if cert is not None:
        assert cert <= rec["evaluation"]["robust_accuracy"]


def test_listing_and_one_record_on_the_command_line():
    runner = CliRunner()
    listing = runner.invoke(main, ["pretrained"])
    assert listing.exit_code == 0, listing.output
    for name in NAMES:
        assert name in listing.output
    one = runner.invoke(main, ["pretrained", "trades-wide"])
    assert one.exit_code == 0, one.output
    assert "trained by: advmnist train --model strided-wide --adv trades" in one.output
    assert "apgd-t" in one.output and "interval" in one.output or "certified" in one.output
    near = runner.invoke(main, ["pretrained", "trades-wid"])
    assert near.exit_code == 2 and "did you mean 'trades-wide'" in near.output
    assert "Traceback" not in near.output


@needs_weights
def test_attack_and_evaluate_by_name_with_no_training(tmp_path):
    runner = CliRunner()
    out = tmp_path / "runs"
    first = runner.invoke(main, ["attack", "--pretrained", "improved-bn", "--method", "fgsm", "--limit", "50",
                                 "--out", str(out), "--quiet"])
    assert first.exit_code == 0, first.output
    run_dir = out / "pretrained-improved-bn"
    assert file_sha256(run_dir / "model.pt") == shipped.pretrained_record("improved-bn")["sha256"]
    assert json.loads((run_dir / "record.json").read_text())["pretrained"] == "improved-bn"
    second = runner.invoke(main, ["evaluate", "--robust", "--pretrained", "improved-bn", "--limit", "20",
                                  "--ensemble", "quick", "--check-n", "20", "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert "robust accuracy" in second.output
    assert (run_dir / "eval" / "robust.json").is_file()  # the same run directory, reused
    both = runner.invoke(main, ["evaluate", "--pretrained", "improved-bn", "--run", str(run_dir)])
    assert both.exit_code == 2 and "not both" in both.output


@needs_weights
def test_a_changed_checkpoint_is_refused(tmp_path, monkeypatch):
    run_dir = shipped.pretrained_run("improved-bn", tmp_path)
    (run_dir / "model.pt").write_bytes(b"not the shipped weights")
    with pytest.raises(CheckpointError, match="not the shipped"):
        shipped.pretrained_run("improved-bn", tmp_path)
    weights = tmp_path / "weights"
    weights.mkdir()
    for suffix in (".pt", ".json"):
        shutil.copy(shipped.WEIGHTS / f"improved-bn{suffix}", weights)
    blob = bytearray((weights / "improved-bn.pt").read_bytes())
    blob[-100] ^= 1
    (weights / "improved-bn.pt").write_bytes(bytes(blob))
    monkeypatch.setattr(shipped, "WEIGHTS", weights)
    monkeypatch.setenv(shipped.ENV_VAR, str(weights))
    with pytest.raises(shipped.PretrainedError, match="replaced or damaged"):
        advmnist.pretrained("improved-bn")


def test_an_evaluation_on_too_few_images_is_not_shipped(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "a-run"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "record.json").write_text(json.dumps(shipped.pretrained_record("improved-bn")["training"]))
    rec = dict(shipped.pretrained_record("improved-bn")["evaluation"], n=500)
    (run_dir / "eval" / "robust.json").write_text(json.dumps(rec))
    monkeypatch.setattr(shipped, "WEIGHTS", tmp_path / "weights")
    monkeypatch.setenv(shipped.ENV_VAR, str(tmp_path / "weights"))
    with pytest.raises(shipped.PretrainedError, match="on 500 images"):
        shipped.ship("improved-bn", run_dir, summary="", command="", spec="", machine="", license="", eps=0.3)
    assert not (tmp_path / "weights").exists()
