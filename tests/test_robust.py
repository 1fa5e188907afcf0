"""Adversarial training, the overfitting detector, worst-case evaluation and its sanity checks."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from advmnist.attacks import pgd
from advmnist.cli import main
from advmnist.errors import AdvmnistError
from advmnist.models import create_model
from advmnist.robustness import checks_scope, sanity_checks, worst_case
from advmnist.train import Adversarial, detect_overfitting, fit, resolve_recipe


def pgd_accuracy(model, x, y, eps):
    adv = pgd(model, x, y, eps=eps, steps=10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model(adv).argmax(1) == y).float().mean().item() * 100


def test_adversarial_training_beats_standard_training_under_attack(trained_small, small):
    torch.manual_seed(0)
    robust = create_model("improved-bn")
    history = fit(robust, small.subset(3000, 1000), resolve_recipe("improved-bn", epochs=1), seed=0,
                  adversarial=Adversarial("pgd", eps=0.1, steps=5, monitor=200, monitor_steps=5))
    robust.eval()
    x, y = small.test_x[:500], small.test_y[:500]
    standard_acc = pgd_accuracy(trained_small[0], x, y, 0.1)
    robust_acc = pgd_accuracy(robust, x, y, 0.1)
    assert robust_acc > standard_acc + 15
    assert "robust_accuracy" in history[0] and history[0]["test_accuracy"] > 70


def test_detector_on_histories():
    healthy = [{"epoch": e, "test_accuracy": 95, "robust_accuracy": r} for e, r in [(1, 40), (2, 55), (3, 60)]]
    collapsed = [{"epoch": e, "test_accuracy": 97, "robust_accuracy": r} for e, r in [(1, 40), (2, 55), (3, 2)]]
    assert detect_overfitting(healthy) == []
    (warning,) = detect_overfitting(collapsed)
    assert warning.startswith("epoch 3:") and "catastrophic overfitting" in warning


def test_detector_waits_for_the_eps_ramp():
    """The monitor attacks at the full eps; while training eps still ramps up, a low number is expected."""
    ramp = [{"epoch": 1, "test_accuracy": 94, "robust_accuracy": 0.0, "ramping": True},
            {"epoch": 2, "test_accuracy": 97, "robust_accuracy": 5.4, "ramping": True},
            {"epoch": 3, "test_accuracy": 97, "robust_accuracy": 79.2}]
    assert detect_overfitting(ramp) == []
    unramped = [{k: v for k, v in h.items() if k != "ramping"} for h in ramp]
    (warning,) = detect_overfitting(unramped)
    assert warning.startswith("epoch 2:") and "never came" in warning


def test_detector_fires_on_a_deliberately_broken_recipe(small):
    """FGSM training whose step (0.001) is far below its eps (0.3): the net learns no robustness."""
    torch.manual_seed(0)
    model = create_model("improved-bn")
    history = fit(model, small.subset(3000, 1000), resolve_recipe("improved-bn", epochs=2), seed=0,
                  adversarial=Adversarial("fgsm", eps=0.3, alpha=0.001, monitor=200, monitor_steps=5))
    assert history[-1]["test_accuracy"] > 80
    assert any("robustness collapsed or never came" in w for w in history[-1]["warnings"])


def test_bad_adversarial_settings():
    with pytest.raises(AdvmnistError, match="unknown adversarial training"):
        Adversarial("mart").check()
    with pytest.raises(AdvmnistError, match="eps >= 0"):
        Adversarial("pgd", eps=-0.1).check()


def test_worst_case_is_no_better_than_any_single_attack(trained_small, small):
    model, _ = trained_small
    x, y = small.test_x[:200], small.test_y[:200]
    result = worst_case(model, x, y, eps=0.05, steps=5, restarts=2)
    after = [a["robust_accuracy_after"] for a in result["per_attack"]]
    assert after == sorted(after, reverse=True)
    assert result["robust_accuracy"] == after[-1] <= pgd_accuracy(model, x, y, 0.05)
    assert result["clean_accuracy"] >= after[0] and len(result["per_attack"]) == 1 + 2 + 9  # FGSM, restarts, targets


class Quantise(nn.Module):
    """A non-differentiable input quantiser: zero gradient almost everywhere (gradient masking)."""

    def forward(self, x):
        return torch.round(x * 2) / 2


def test_sanity_checks_flag_masked_gradients_and_pass_a_plain_model(trained_small, small):
    model, _ = trained_small
    x, y = small.test_x[:100], small.test_y[:100]
    plain = {c["check"]: c["passed"] for c in sanity_checks(model, x, y, eps=0.3, steps=10, more_steps=30)}
    assert plain["accuracy reaches ~0 at eps = 1"] and plain["input gradients are not zero"]
    assert plain["multi-step beats single-step"]
    masked = nn.Sequential(Quantise(), model).eval()
    flags = {c["check"]: c["passed"] for c in sanity_checks(masked, x, y, eps=0.3, steps=10, more_steps=30)}
    assert not flags["input gradients are not zero"]
    assert not flags["accuracy reaches ~0 at eps = 1"]


def test_cli_robust_evaluation_and_adversarial_training(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--model", "lenet", "--epochs", "1", "--lr", "0.05", "--limit", "1000",
                                  "--adv", "fgsm-rs", "--eps", "0.1", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "PGD acc" in result.output
    (run,) = [d for d in tmp_path.iterdir() if d.name.startswith("lenet-adv-fgsm-rs")]
    record = json.loads((run / "record.json").read_text())
    assert record["adversarial"]["method"] == "fgsm-rs" and "robust_accuracy" in record["history"][0]
    result = runner.invoke(main, ["evaluate", "--run", str(run), "--robust", "--eps", "0.1", "--steps", "5",
                                  "--restarts", "1", "--queries", "100", "--limit", "100"])
    assert result.exit_code == 0, result.output
    robust = json.loads((run / "eval" / "robust.json").read_text())
    # the standard ensemble; five masking checks, one of them comparing with the training's adversarial accuracy
    assert robust["settings"]["n"] == 100 and len(robust["checks"]) == 5
    assert robust["settings"]["attacks"] == ["apgd-ce", "apgd-t", "square"]
    assert any(c["check"].startswith("training-time") for c in robust["checks"])
    assert "robust accuracy" in result.output
    result = runner.invoke(main, ["evaluate", "--run", str(run), "--robust", "--ensemble", "pgd", "--eps", "0.1",
                                  "--steps", "5", "--restarts", "1", "--limit", "100"])
    assert result.exit_code == 0, result.output
    robust = json.loads((run / "eval" / "robust.json").read_text())
    assert robust["settings"]["attacks"][:2] == ["fgsm", "pgd-1"] and len(robust["per_attack"]) == 1 + 1 + 9 + 1
    assert robust["per_attack"][-1]["key"] == "check-restarts"  # the check's attack counts too


def test_checks_scope_names_the_images_each_check_ran_on():
    # the score-based check reads the whole evaluation; the others re-attack only the first check_n
    assert checks_scope(10000, 1000, True) == ("the score-based one on all 10000 evaluated images, "
                                               "the others on the first 1000")
    assert checks_scope(10000, 1000, False) == "on the first 1000 images"
    assert checks_scope(500, 500, True) == "on all 500 images"
