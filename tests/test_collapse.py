"""Training that cannot fail silently: adversarial defaults that train, and the collapse detector.

The user's three reports, scaled to slices: IBP (and PGD) at the full eps from the first step, which
kills every ReLU, and Adam at lr 5. Each must stop with one line naming the cause and the flag,
leave a run of kind 'train-collapsed' that discovery never offers, and no dead weights anywhere.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import advmnist.data
import advmnist.train as train_mod
from advmnist import runs
from advmnist.cli import main
from advmnist.experiments import find_run, load_spec
from advmnist.experiments.spec import adversarial_of
from advmnist.models import create_model
from advmnist.train import (Adversarial, TrainingCollapsed, collapse_signals, fit, resolve_recipe,
                            train_run)


@pytest.fixture(scope="module")
def slice3000(mnist):
    return mnist.subset(3000, 1000)


@pytest.fixture(scope="module")
def loaded(mnist):
    """The CLI's data loading answers from the session's copy."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(advmnist.data, "load_mnist", lambda data_dir=None, **kwargs: mnist)
        yield


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def final_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.output
    return lines[-1]


def only_failed_run(out) -> tuple:
    """The one run under `out`: a 'train-collapsed' record that discovery never offers."""
    (run,) = [p for p in out.iterdir()]
    record = json.loads((run / runs.RECORD).read_text())
    assert record["kind"] == "train-collapsed" and record["history"]
    assert runs.find_runs(out) == [] and runs.latest_run(out) is None
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    return run, record


# ---- defaults that train ------------------------------------------------------------------------------

@pytest.mark.parametrize("method, eps, batch_size, extra", [
    ("pgd", 0.3, 100, {"steps": 5}),
    ("fgsm-rs", 0.3, 100, {}),
    ("fgsm", 0.3, 100, {}),
    ("trades", 0.3, 100, {"steps": 5}),
    ("ibp", 0.1, 32, {}),  # IBP's bounds need ~100+ optimizer steps to follow eps: 60 collapse (below)
])
def test_each_method_trains_at_its_default_schedule_on_a_slice(method, eps, batch_size, extra, slice3000):
    """At the defaults (the schedule sized from the epochs) every method ends far above chance on a
    3,000-image slice in 2 epochs; with the full eps from the first step, PGD and IBP die there (below).
    PGD and TRADES take 5 inner steps instead of 40 and the monitor is smaller, to keep the test short."""
    torch.manual_seed(0)
    model = create_model("strided")
    history = fit(model, slice3000, resolve_recipe("strided", epochs=2, batch_size=batch_size), seed=0,
                  adversarial=Adversarial(method, eps=eps, monitor=200, monitor_steps=5, **extra))
    assert history[-1]["test_accuracy"] > 55.0
    assert not any(h.get("at_chance") for h in history)


def test_bf16_autocast_trains_ibp_as_fp32_does_and_keeps_fp32_weights(slice3000):
    """`train --precision bf16` runs the clean pass and the bounds under bfloat16 autocast (an IBP step
    of strided-large 1.31x faster on both cores of the AVX512-BF16 box, benchmarks/results.md); the weights, the tests and the monitor's certificates
    stay fp32, and the net learns as the fp32 one does."""
    def train(precision):
        torch.manual_seed(0)
        model = create_model("strided")
        history = fit(model, slice3000, resolve_recipe("strided", epochs=2, batch_size=32, precision=precision),
                      seed=0, adversarial=Adversarial("ibp", eps=0.1, monitor=200))
        return model, history[-1]

    (half, h16), (full, h32) = train("bf16"), train("fp32")
    assert all(p.dtype == torch.float32 for p in half.state_dict().values() if p.is_floating_point())
    assert not torch.equal(half.fc1.weight, full.fc1.weight)  # the passes did run in bfloat16
    assert h16["test_accuracy"] > 55.0
    # measured: 77.7% against 77.6% on 1,000 test images, 36.5% against 37.5% certified on the 200 monitored
    assert abs(h16["test_accuracy"] - h32["test_accuracy"]) < 2.0
    assert abs(h16["certified_accuracy"] - h32["certified_accuracy"]) < 5.0


def test_ibp_trains_a_batchnorm_net(slice3000):
    """IBP of a net with BatchNorm (`improved-bn`, `train`'s default model) bounds each BatchNorm with
    the statistics of the batch the clean pass saw (Shi et al. 2021), instead of stopping with "in
    training mode; call model.eval() first", which a user of `train --adv ibp` could not do. On a
    slice it learns in the warm-up and early ramp, then loses much of it as eps grows: BatchNorm nets
    need Shi et al.'s warm-up regularisers, which advmnist does not have, to train well under IBP."""
    torch.manual_seed(0)
    history = fit(create_model("improved-bn"), slice3000,
                  resolve_recipe("improved-bn", epochs=2, optimizer="adam", lr=1e-3), seed=0,
                  adversarial=Adversarial("ibp", eps=0.1, monitor=200))
    assert history[0]["test_accuracy"] > 55.0
    assert all(h["test_accuracy"] > 20.0 and not h.get("at_chance") for h in history)


def test_the_schedule_is_sized_from_the_epochs_and_explicit_values_win():
    auto = Adversarial("ibp", eps=0.1).resolved(2)
    assert (auto.warmup_epochs, auto.ramp_epochs) == (0.2, 0.8)
    assert auto.eps_at(0.1) is None and auto.eps_at(0.6) == pytest.approx(0.05) and auto.eps_at(1.5) == 0.1
    assert auto.kappa_at(auto.eps_at(0.6)) == pytest.approx(0.75)
    assert auto.schedule_note(2) == ("over 2 epochs: clean warm-up 0.2 epochs, eps 0 -> 0.1 (kappa 1 -> 0.5) "
                                     "over the next 0.8, full eps for the last 1")
    assert Adversarial("pgd").resolved(50).ramp_end() == 25
    explicit = Adversarial("pgd", ramp_epochs=3).resolved(25)  # an explicit ramp keeps its meaning: no warm-up
    assert explicit.warmup_epochs == 0 and explicit.ramp_epochs == 3 and explicit.eps_at(0.0) == 0.0
    assert Adversarial("pgd", ramp_epochs=0).resolved(4).schedule_note(4) == (
        "over 4 epochs: full eps 0.3 from the first step")
    assert Adversarial("pgd", warmup_epochs=1).resolved(10).ramp_epochs == 4
    assert Adversarial("pgd", ramp_epochs=10).resolved(4).schedule_note(4).endswith("eps reaches only 0.12 by the end")
    with pytest.raises(Exception, match="warm-up epochs must be >= 0"):
        Adversarial("pgd", warmup_epochs=-1).check()


def test_the_specs_keep_training_what_they_trained(tmp_path):
    """Every adversarial variant under experiments/ sets its ramp: it resolves to no warm-up and the
    old linear ramp, and a run recorded before warmup_epochs existed is still found for it."""
    specs = sorted((Path(__file__).parent.parent / "experiments").glob("*.toml"))
    variants = [v for path in specs for v in load_spec(path).variants if v.adversarial]
    assert variants
    for v in variants:
        adv, epochs = adversarial_of(v), v.overrides.get("epochs", 5)
        done = adv.resolved(epochs)
        assert done.warmup_epochs == 0 and done.ramp_epochs == v.adversarial["ramp_epochs"]
        for p in (0.0, 0.5, 1.0, 2.5, epochs):
            assert done.eps_at(p) == adv.eps * min(1.0, p / adv.ramp_epochs)
    run = tmp_path / "old-run"
    run.mkdir()
    (run / runs.CHECKPOINT).write_bytes(b"")
    adv = adversarial_of(variants[0])
    older = {k: v for k, v in dataclasses.asdict(adv).items() if k != "warmup_epochs"}
    recipe = dataclasses.asdict(resolve_recipe(variants[0].model, **variants[0].overrides))
    runs.write_json(run / runs.RECORD, {"kind": "train", "model": variants[0].model, "finished": "t",
                                        "checkpoint_sha256": "x", "recipe": recipe, "seed": 0, "n_train": 60000,
                                        "data_checksum": "c", "adversarial": older})
    assert find_run(tmp_path, variants[0].model, recipe, 0, 60000, "c", dataclasses.asdict(adv)) == run


# ---- the collapse detector ------------------------------------------------------------------------------

def test_ibp_at_full_eps_from_the_first_step_stops_with_one_line(loaded, tmp_path):
    """`train --adv ibp --eps 0.1` with the old schedule (`--eps-ramp 0`): every ReLU dies in epoch 1."""
    result = cli("train", "--model", "strided", "--adv", "ibp", "--eps", "0.1", "--epochs", "4", "--limit", "3000",
                 "--eps-ramp", "0", "--quiet", "--out", tmp_path)
    assert "full eps 0.1 (kappa 1 -> 0.5) from the first step" in result.output
    line = final_error(result)
    assert line.startswith("error: training collapsed in epoch 1: test accuracy ")
    assert "every image called" in line and "every input gradient is zero" in line
    assert "--warmup 0.4 --eps-ramp 1.6" in line and "lower --lr (now 0.001)" in line
    assert "kept the weights" not in result.output
    run, record = only_failed_run(tmp_path)
    assert str(run) in line and not (run / runs.CHECKPOINT).exists()  # no dead weights kept, anywhere
    assert record["epoch"] == 0 and record["history"][-1]["at_chance"]
    assert record["schedule"]["ramp_epochs"] == 0 and not record["schedule"]["sized_from_epochs"]


def test_pgd_at_full_eps_from_the_first_step_stops(slice3000, tmp_path):
    """`--adv pgd --eps 0.3` as it was (no ramp) dies in its first epoch; the default schedule trains (above)."""
    with pytest.raises(TrainingCollapsed, match=r"collapsed in epoch 1: .*every input gradient is zero.*"
                                                r"--eps-ramp 0\.8") as info:
        train_run("strided", out=tmp_path, data=slice3000, epochs=2,
                  adversarial=Adversarial("pgd", eps=0.3, steps=5, ramp_epochs=0, monitor=200, monitor_steps=5))
    assert "a run of kind 'train-collapsed'" in str(info.value)
    only_failed_run(tmp_path)


def test_a_wild_learning_rate_stops_with_one_line(loaded, tmp_path):
    """Adam at lr 5 leaves finite losses (no divergence) and a network that calls every image one digit."""
    line = final_error(cli("train", "--model", "strided", "--optimizer", "adam", "--lr", "5", "--epochs", "1",
                           "--limit", "3000", "--quiet", "--out", tmp_path))
    assert "training collapsed in epoch 1" in line and "every image called" in line
    assert "lower --lr (now 5)" in line and "--eps-ramp" not in line
    only_failed_run(tmp_path)
    assert "no trained" in cli("evaluate", "--out", tmp_path).output  # nothing for evaluate to pick up


def test_a_collapse_after_learning_keeps_the_last_weights_above_chance(slice3000, tmp_path, monkeypatch):
    """Epoch 2 ends with every ReLU of the first layer dead: training stops there, and the run keeps
    the weights of epoch 1 (the last above chance), loadable, in a run discovery does not offer."""
    original = train_mod.train_epoch
    calls = []

    def train_epoch(model, *args, **kwargs):
        stats = original(model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                model.conv1.weight.zero_()
                model.conv1.bias.fill_(-1.0)
        return stats

    monkeypatch.setattr(train_mod, "train_epoch", train_epoch)
    with pytest.raises(TrainingCollapsed, match=r"collapsed in epoch 2: .*every input gradient is zero.*"
                                                r"the weights of epoch 1, the last above chance, are kept"):
        train_run("strided", out=tmp_path, data=slice3000, epochs=3)
    run, record = only_failed_run(tmp_path)
    assert record["epoch"] == 1 and len(record["history"]) == 2
    model, _ = runs.load_checkpoint(run)  # its hash matches its record
    assert collapse_signals(model, slice3000.test_x[:200])["dead"] is False


def test_a_slow_start_is_not_a_collapse(mnist, tmp_path):
    """lenet at its recipe sits at chance, calling every image one digit, for its first epochs on a
    small slice; its gradients are alive, so it trains to the end, as a normal run with a warning."""
    data = mnist.subset(2000, 500)
    run = train_run("lenet", out=tmp_path, data=data, epochs=2)
    record = json.loads((run / runs.RECORD).read_text())
    assert record["kind"] == "train" and all(h["at_chance"] for h in record["history"])
    assert any("at chance after the last epoch" in w for w in record["warnings"])
    assert runs.latest_run(tmp_path) == run
    torch.manual_seed(0)
    signals = collapse_signals(create_model("lenet"), data.test_x[:200])
    assert signals["dead"] is False and signals["top_share"] > 0.9


def test_the_monitor_never_keeps_an_epoch_at_chance(slice3000, monkeypatch):
    """Epoch 1 scores best on the monitor but is at chance (as a dead net's 'certified' share of one
    class once was): epoch 2's weights are kept."""
    real = train_mod.evaluate
    accuracies = iter([11.35, None])

    def evaluate(model, x, y):
        out = real(model, x, y)
        forced = next(accuracies)
        return out if forced is None else {**out, "accuracy": forced}

    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    scores = iter([90.0, 10.0])
    monkeypatch.setattr(train_mod, "monitor_robustness", lambda *a: next(scores))
    torch.manual_seed(0)
    model = create_model("strided")
    history = fit(model, slice3000, resolve_recipe("strided", epochs=2), seed=0,
                  adversarial=Adversarial("fgsm-rs", eps=0.1, monitor=100))
    assert history[0]["at_chance"] and "at_chance" not in history[1]
    assert "restored_epoch" not in history[-1]

