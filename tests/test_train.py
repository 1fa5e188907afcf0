import json

import pytest
import torch

from advmnist import runs
from advmnist.errors import AdvmnistError, CheckpointError
from advmnist.measures import evaluate
from advmnist.models import create_model
from advmnist.train import (ADVERSARIAL_METHODS, WeightAverage, ema_warmup_steps, fit, recipe_warnings,
                            resolve_recipe, train_run)


def test_one_epoch_on_a_slice_is_far_above_chance(trained_small, small):
    model, history = trained_small
    assert history[0]["test_accuracy"] > 90.0
    assert evaluate(model, small.test_x, small.test_y)["accuracy"] == pytest.approx(history[0]["test_accuracy"])


def test_same_seed_same_weights_other_seed_other_weights(small):
    data = small.subset(1000, 200)
    recipe = resolve_recipe("improved-bn", epochs=1)

    def weights(seed):
        torch.manual_seed(seed)
        model = create_model("improved-bn")
        hist = fit(model, data, recipe, seed=seed)
        return torch.cat([p.flatten() for p in model.state_dict().values() if p.is_floating_point()]), hist

    a, ha = weights(3)
    b, hb = weights(3)
    c, _ = weights(4)
    assert torch.equal(a, b) and ha[0]["train_loss"] == hb[0]["train_loss"]
    assert not torch.equal(a, c)


def test_weight_average_follows_the_warmed_up_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(1.0)
    average = WeightAverage(model, decay=0.99)
    model.weight.data.fill_(3.0)
    average.update()  # decay min(0.99, 1/10)
    assert average.model.weight.item() == pytest.approx(0.1 * 1.0 + 0.9 * 3.0)
    model.weight.data.fill_(5.0)
    average.update()  # decay 2/11
    assert average.model.weight.item() == pytest.approx(2 / 11 * 2.8 + 9 / 11 * 5.0)
    assert model.weight.item() == 5.0  # the live weights are not touched


def test_ema_warmup_outlasting_the_training_is_named():
    model = torch.nn.Linear(1, 1, bias=False)
    average = WeightAverage(model, decay=0.9)
    for _ in range(ema_warmup_steps(0.9) - 1):
        assert min(average.decay, (1 + average.steps) / (10 + average.steps)) < 0.9
        average.update()
    assert (1 + average.steps) / (10 + average.steps) >= 0.9  # the step named is the first at the full decay
    assert ema_warmup_steps(0.999) == 8991  # (1 + t) / (10 + t) = 0.999 at t = 8990, the 8,991st step
    # 25 epochs of 600 steps: 0.999 is reached, 0.9995 (step 17,991) never is
    assert recipe_warnings(resolve_recipe("strided", epochs=25, batch_size=100, ema=0.999), 60000) == []
    [warning] = recipe_warnings(resolve_recipe("strided", epochs=25, batch_size=100, ema=0.9995), 60000)
    assert "17,991" in warning and "15,000" in warning and "0.99940" in warning


def test_ema_training_keeps_and_tests_the_averaged_weights(small):
    data = small

    def train(**overrides):
        torch.manual_seed(0)
        model = create_model("strided")
        history = fit(model, data, resolve_recipe("strided", epochs=2, **overrides), seed=0)
        return model, history

    averaged, history = train(ema=0.99)
    last, _ = train()
    accuracy = evaluate(averaged, data.test_x, data.test_y)["accuracy"]
    assert accuracy == pytest.approx(history[-1]["test_accuracy"])  # what was tested is what is kept
    assert accuracy > 85.0
    assert not torch.equal(averaged.fc1.weight, last.fc1.weight)


def test_an_unknown_precision_is_refused_in_one_line():
    with pytest.raises(AdvmnistError, match="unknown precision 'fp16'; use fp32 or bf16"):
        resolve_recipe("strided", precision="fp16")
    assert str(resolve_recipe("strided", precision="bf16")).endswith("precision=bf16")
    assert "precision" not in str(resolve_recipe("strided"))


def test_train_run_writes_a_complete_run_and_checkpoint_round_trips(tmp_path, small):
    run = train_run("lenet", out=tmp_path, seed=1, data=small.subset(2000, 500), epochs=1, batch_size=64)
    assert sorted(p.name for p in run.iterdir()) == ["curves.png", "model.pt", "record.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    record = json.loads((run / "record.json").read_text())
    assert record["model"] == "lenet" and record["seed"] == 1 and record["recipe"]["batch_size"] == 64
    assert record["checkpoint_sha256"] == runs.file_sha256(run / "model.pt")
    assert len(record["history"]) == 1 and record["data_checksum"]
    raw = torch.load(run / "model.pt", weights_only=True)
    assert raw["model"] == "lenet"
    model, meta = runs.load_checkpoint(run)
    assert evaluate(model, small.test_x[:500], small.test_y[:500])["accuracy"] == pytest.approx(
        record["test_accuracy"])
    assert runs.latest_run(tmp_path) == run and runs.latest_run(tmp_path, "mlp") is None


def test_mismatched_checkpoint_is_refused(tmp_path):
    model = create_model("lenet")
    runs.save_checkpoint(tmp_path / "model.pt", model, "lenet", {})
    with pytest.raises(CheckpointError, match="holds a 'lenet' model, not 'mlp'"):
        runs.load_checkpoint(tmp_path / "model.pt", expect="mlp")
    runs.save_checkpoint(tmp_path / "bad.pt", create_model("tutorial"), "lenet", {})
    with pytest.raises(CheckpointError, match="weights do not fit a 'lenet' model"):
        runs.load_checkpoint(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        runs.load_checkpoint(tmp_path / "junk.pt")


def test_interrupted_run_leaves_nothing(tmp_path, small, monkeypatch):
    import advmnist.train as train_mod

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.runs, "write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        train_run("lenet", out=tmp_path, data=small.subset(500, 100), epochs=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("keep_last", [False, True])
def test_keep_last_overrides_the_monitors_pick(keep_last, small, monkeypatch):
    import advmnist.train as train_mod
    from advmnist.train import Adversarial

    scores = iter([50.0, 40.0])  # the monitor calls epoch 1 the most robust
    monkeypatch.setattr(train_mod, "monitor_robustness", lambda *a: next(scores))
    states = []
    torch.manual_seed(0)
    model = create_model("strided")
    history = fit(model, small.subset(1000, 200), resolve_recipe("strided", epochs=2), seed=0,
                  adversarial=Adversarial("fgsm-rs", eps=0.1, keep_last=keep_last),
                  on_epoch=lambda s: states.append({k: v.clone() for k, v in model.state_dict().items()}))
    kept = states[1] if keep_last else states[0]
    assert all(torch.equal(kept[k], v) for k, v in model.state_dict().items())
    assert history[-1].get("restored_epoch") == (None if keep_last else 1)


def test_bad_recipe_values_are_refused():
    with pytest.raises(AdvmnistError, match="learning rate must be positive"):
        resolve_recipe("lenet", lr=-1.0)
    with pytest.raises(AdvmnistError, match="has no dropout option"):
        resolve_recipe("lenet", dropout=0.3)
    with pytest.raises(AdvmnistError, match="unknown learning-rate schedule 'cosine'"):
        resolve_recipe("lenet", schedule="cosine")


def test_onecycle_schedule_rises_then_falls_to_zero():
    from advmnist.train import learning_rate

    recipe = resolve_recipe("strided", lr=0.01, epochs=5, schedule="onecycle")
    lrs = [learning_rate(recipe, e / 10) for e in range(51)]
    peak = lrs.index(max(lrs))
    assert lrs[0] == 0.0 and lrs[-1] == 0.0 and max(lrs) == pytest.approx(0.01) and peak == 20
    assert lrs[:peak + 1] == sorted(lrs[:peak + 1]) and lrs[peak:] == sorted(lrs[peak:], reverse=True)
    assert learning_rate(resolve_recipe("strided", lr=0.01), 2.5) == 0.01  # the default stays constant


@pytest.mark.parametrize("method", ADVERSARIAL_METHODS)
def test_every_adversarial_method_trains_through_its_inner_attack(method, small):
    """Every training method, and every registered attack it may name as the inner maximiser, gives a
    finite loss whose gradient reaches every weight, and leaves the model in train mode."""
    from advmnist.train import Adversarial, adversarial_loss

    torch.manual_seed(0)
    model = create_model("strided").train()
    x, y = small.train_x[:16], small.train_y[:16]
    adv = Adversarial(method, eps=0.1, steps=2)
    adv.check()
    loss, logits = adversarial_loss(adv, torch.Generator().manual_seed(0))(model, x, y, 0.1)
    assert torch.isfinite(loss) and logits.shape == (16, 10) and model.training
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_trades_inner_step_is_pgd_on_the_kl_to_the_clean_prediction(small):
    """TRADES' inner maximisation is `pgd` with the KL loss and a Gaussian start of std 0.001."""
    import torch.nn.functional as F

    from advmnist.attacks import pgd
    from advmnist.train import Adversarial, _kl_from

    adv = Adversarial("trades", eps=0.1, steps=3)
    method, params = adv.inner_attack()
    assert method == "pgd" and params == {"alpha": 2 * 0.1 / 3, "steps": 3, "random_start": True, "start_std": 0.001,
                                          "restarts": 1}
    torch.manual_seed(0)
    model = create_model("strided").eval()
    x, y = small.test_x[:16], small.test_y[:16]
    kl = _kl_from(F.softmax(model(x), dim=1).detach())
    out = pgd(model, x, y, eps=0.1, loss=kl, generator=torch.Generator().manual_seed(0), **params)
    assert (out - x).abs().max() <= 0.1 + 1e-6 and kl(model(out), y).mean() > kl(model(x), y).mean()


def test_inner_restarts_keep_the_worst_start_per_example(small):
    """`restarts`: the inner attack runs from that many starts and keeps, per example, the one with
    the higher KL; its first start is the single-start attack's, so no example ends with less."""
    import torch.nn.functional as F

    from advmnist.attacks import pgd
    from advmnist.train import Adversarial, _kl_from

    adv = Adversarial("trades", eps=0.3, steps=2, restarts=3, uniform_start=True)
    adv.check()
    assert adv.inner_attack()[1]["restarts"] == 3 and "restarts=3" in str(adv)
    assert "restarts" not in str(Adversarial("trades"))
    torch.manual_seed(0)
    model = create_model("strided").eval()
    x, y = small.test_x[:64], small.test_y[:64]
    kl = _kl_from(F.softmax(model(x), dim=1).detach())
    found = {}
    for r in (1, 3):
        params = Adversarial("trades", eps=0.3, steps=2, restarts=r, uniform_start=True).inner_attack()[1]
        out = pgd(model, x, y, eps=0.3, loss=kl, generator=torch.Generator().manual_seed(0), **params)
        with torch.no_grad():
            found[r] = (kl(model(out), y), model(out).argmax(1) != y)
    (kl1, fooled1), (kl3, fooled3) = found[1], found[3]
    assert (fooled3 | ~fooled1).all()  # a fooled example stays fooled
    assert (kl3[fooled3 == fooled1] >= kl1[fooled3 == fooled1] - 1e-6).all() and (kl3 > kl1 + 1e-4).any()
    for method in ("ibp", "fgsm-rs"):
        with pytest.raises(AdvmnistError, match=f"inner restarts are for pgd and trades training, not {method}"):
            Adversarial(method, restarts=2).check()


def test_trades_uniform_start_begins_anywhere_in_the_ball(small):
    """`uniform_start` gives TRADES' inner attack PGD's start (uniform in the ball) instead of one
    0.001 away: with no steps taken, the start is far from x yet inside the ball."""
    from advmnist.attacks import pgd
    from advmnist.train import Adversarial

    adv = Adversarial("trades", eps=0.1, steps=3, uniform_start=True)
    adv.check()
    method, params = adv.inner_attack()
    assert method == "pgd" and "start_std" not in params and params["random_start"]
    assert "uniform start" in str(adv) and "uniform start" not in str(Adversarial("trades"))
    torch.manual_seed(0)
    model = create_model("strided").eval()
    x, y = small.test_x[:16], small.test_y[:16]
    starts = {}
    for uniform in (False, True):
        p = Adversarial("trades", eps=0.1, steps=3, uniform_start=uniform).inner_attack()[1]
        starts[uniform] = pgd(model, x, y, eps=0.1, generator=torch.Generator().manual_seed(0), **{**p, "steps": 0})
    far, near = ((starts[u] - x).abs().amax(dim=(1, 2, 3)) for u in (True, False))
    assert (near < 0.01).all() and (far > 0.05).all() and (far <= 0.1 + 1e-6).all()
