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


def test_attack_without_a_trained_model_says_what_to_run(tmp_path):
    result = CliRunner().invoke(main, ["attack", "--method", "penalty", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "run `advmnist train --model improved-bn` first" in result.output


def test_penalty_attack_writes_record_pngs_gallery_and_index(trained_run):
    out, _ = trained_run
    result = CliRunner().invoke(main, ["attack", "--method", "penalty", "--eta", "0.1", "--lam", "0.05",
                                       "--steps", "300", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "fooled %" in result.output and "all" in result.output
    attacks = out / "attacks"
    (run,) = [d for d in attacks.iterdir() if d.is_dir() and "-penalty-" in d.name]
    record = json.loads((run / "record.json").read_text())
    assert record["method"] == "penalty" and record["selection"]["n"] == 10
    assert record["model"]["checkpoint_sha256"] == runs.file_sha256(runs.latest_run(out) / "model.pt")
    res = record["results"][0]
    assert res["params"] == {"eta": 0.1, "lam": 0.05, "steps": 300, "init": "noise", "clamp": True, "fast": True}
    assert res["overall"]["target_success_rate"] >= 70
    for d in range(10):
        assert (run / f"digit_{d}_as_{(d + 1) % 10}.png").stat().st_size > 500
    assert (run / "gallery.png").stat().st_size > 5000
    page = (attacks / "index.html").read_text()
    assert run.name in page and "gallery.png" in page and "penalty" in page


def test_pgd_sweep_draws_robust_accuracy_against_eps(trained_run):
    out, _ = trained_run
    result = CliRunner().invoke(main, ["attack", "--method", "pgd", "--eps", "0.05,0.3", "--steps", "10",
                                       "--limit", "100", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    (run,) = [d for d in (out / "attacks").iterdir() if d.is_dir() and "-pgd-" in d.name]
    record = json.loads((run / "record.json").read_text())
    low, high = record["results"]
    assert low["sweep_params"] == {"eps": 0.05} and high["sweep_params"] == {"eps": 0.3}
    assert high["overall"]["robust_accuracy"] < low["overall"]["robust_accuracy"]
    assert high["overall"]["linf"]["max"] <= 0.3 + 1e-6
    assert (run / "robust_vs_eps.png").is_file() and (run / "eps0.3" / "gallery.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["attack", "--method", "fgsm", "--eps", "-0.1"], "eps must be >= 0"),
    (["attack", "--method", "pgd", "--eps", "0.1,-0.2"], "eps must be >= 0"),
    (["attack", "--method", "pgd", "--lam", "0.1"], "attack 'pgd' takes no option 'lam'"),
    (["attack", "--method", "penalty", "--target-map", "3-4"], "target map"),
])
def test_attack_error_paths(trained_run, args, message):
    out, _ = trained_run
    result = CliRunner().invoke(main, args + ["--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not [p for p in (out / "attacks").glob(".partial-*")]


def test_no_fast_attacks_with_plain_autograd_and_records_it(trained_run):
    out, _ = trained_run
    args = ["attack", "--method", "pgd", "--eps", "0.2", "--steps", "10", "--limit", "100", "--out", str(out), "--quiet"]
    fast, plain = CliRunner().invoke(main, args), CliRunner().invoke(main, args + ["--no-fast"])
    assert fast.exit_code == 0 and plain.exit_code == 0, plain.output
    records = sorted((out / "attacks").glob("*-pgd-*/record.json"), key=lambda p: p.stat().st_mtime)[-2:]
    (a,), (b,) = [json.loads(p.read_text())["results"] for p in records]
    assert a["params"]["fast"] is True and b["params"]["fast"] is False
    # same attack strength either way (max-pool ties may route single gradients differently)
    assert abs(a["overall"]["fooling_rate"] - b["overall"]["fooling_rate"]) <= 5


def test_train_names_a_weight_average_whose_warm_up_outlasts_the_training(tmp_path):
    result = CliRunner().invoke(main, ["train", "--model", "mlp", "--epochs", "1", "--limit", "300", "--ema", "0.99",
                                       "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert ("warning: the weight average's decay 0.99 is reached only at optimizer step 891 and this training "
            "has 1 step:") in result.output
    record = json.loads((runs.latest_run(tmp_path, "mlp") / "record.json").read_text())
    assert any("decay 0.99 is reached only" in w for w in record["warnings"])
