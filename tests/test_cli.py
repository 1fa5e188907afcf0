import json

import pytest
from click.testing import CliRunner

from advmnist import runs
from advmnist.cli import main
from advmnist.models import create_model, list_models


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real `advmnist train` through the CLI on 3,000 images, one epoch."""
    out = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(main, ["train", "--model", "improved-bn", "--epochs", "1",
                                       "--limit", "3000", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_models_lists_the_zoo():
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0
    for name in list_models():
        assert name in result.output


def test_train_prints_epochs_and_writes_a_run(trained_run):
    out, output = trained_run
    assert "epoch  1" in output and "test accuracy" in output
    run = runs.latest_run(out, "improved-bn")
    record = json.loads((run / "record.json").read_text())
    assert record["n_train"] == 3000 and record["test_accuracy"] > 80


def test_evaluate_writes_pictures_and_record(trained_run):
    out, _ = trained_run
    result = CliRunner().invoke(main, ["evaluate", "--out", str(out), "--image", "3"])
    assert result.exit_code == 0, result.output
    eval_dir = runs.latest_run(out) / "eval"
    for name in ["confusion.png", "samples.png", "wrong.png", "feature_maps.png", "record.json"]:
        assert (eval_dir / name).stat().st_size > 1000
    record = json.loads((eval_dir / "record.json").read_text())
    assert len(record["per_class_accuracy"]) == 10 and record["accuracy"] > 80


@pytest.mark.parametrize("args, message", [
    (["train", "--model", "resnet"], "unknown model 'resnet'"),
    (["train", "--model", "lenet", "--data-dir", "/nonexistent"], "does not exist"),
    (["train", "--model", "lenet", "--lr", "-0.1"], "learning rate must be positive"),
    (["evaluate", "--out", "/nonexistent-runs"], "run `advmnist train --model improved-bn` first"),
])
def test_error_paths_are_one_line_and_exit_2(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_mismatched_checkpoint_exit_2(tmp_path):
    runs.save_checkpoint(tmp_path / "model.pt", create_model("tutorial"), "lenet", {})
    result = CliRunner().invoke(main, ["evaluate", "--run", str(tmp_path)])
    assert result.exit_code == 2 and "weights do not fit a 'lenet' model" in result.output


def test_corrupt_data_dir_exit_2(tmp_path):
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"]:
        (tmp_path / name).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
    result = CliRunner().invoke(main, ["train", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "checksum mismatch" in result.output
