"""APGD, APGD-T, Square, the attack ensemble of `evaluate --robust` and its masking detector."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from advmnist.attacks import AttackError, apgd, apgd_t, pgd, square
from advmnist.attacks.losses import dlr_loss, margin, targeted_dlr_loss
from advmnist.cli import main
from advmnist.errors import AdvmnistError
from advmnist.evaluation import train_adversarial_accuracy
from advmnist.measures import predict_logits
from advmnist.robustness import ensemble_stages, image_limit, masking_checks, run_ensemble


def acc(model, x, y):
    return 100.0 * (predict_logits(model, x).argmax(1) == y).float().mean().item()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_dlr_losses_ignore_shift_and_scale_of_the_logits():
    z = torch.randn(50, 10)
    y = torch.randint(0, 10, (50,))
    pair = torch.stack([y, (y + 1) % 10], 1)
    for loss, arg in ((dlr_loss, y), (targeted_dlr_loss, pair)):
        assert torch.allclose(loss(z, arg), loss(3.0 * z + 7.0, arg), atol=1e-5)
    assert ((margin(z, y) > 0) == (z.argmax(1) == y)).all()


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.5)])
def test_apgd_beats_pgd_of_the_same_budget_and_stays_in_the_ball(model, batch, norm, eps):
    x, y = batch
    adv = apgd(model, x, y, eps=eps, steps=20, norm=norm, generator=gen())
    ref = pgd(model, x, y, eps=eps, steps=20, norm=norm, generator=gen())
    dist = (adv - x).abs().flatten(1).amax(1) if norm == "linf" else (adv - x).flatten(1).norm(dim=1)
    assert dist.max() <= eps + 1e-5 and adv.min() >= 0 and adv.max() <= 1
    assert acc(model, adv, y) <= acc(model, ref, y) + 1.0
    assert acc(model, adv, y) < 60


def test_apgd_dlr_and_targeted_fool_and_are_seeded(model, batch):
    x, y = batch
    dlr = apgd(model, x, y, eps=0.1, steps=20, loss="dlr", generator=gen())
    assert acc(model, dlr, y) < 60
    t1 = apgd_t(model, x[:64], y[:64], eps=0.1, steps=10, targets=3, generator=gen(1))
    t2 = apgd_t(model, x[:64], y[:64], eps=0.1, steps=10, targets=3, generator=gen(1))
    assert torch.equal(t1, t2) and (t1 - x[:64]).abs().max() <= 0.1 + 1e-6
    assert acc(model, t1, y[:64]) < 60


@pytest.mark.parametrize("attack, kw", [(apgd, {}), (apgd_t, {"targets": 1})])
def test_side_by_side_restarts_break_what_the_copies_break(model, batch, attack, kw):
    """Side by side, an image's copies stop together once one breaks it: the verdict per image is
    the one of the same copies run to the end, and each point found stays in the ball."""
    x, y = batch[0][:64], batch[1][:64]
    eps, restarts = 0.06, 3
    adv = attack(model, x, y, eps=eps, steps=10, restarts=restarts, side_by_side=True, generator=gen(3), **kw)
    copies = attack(model, x.repeat(restarts, 1, 1, 1), y.repeat(restarts), eps=eps, steps=10, generator=gen(3), **kw)
    broken_copies = (predict_logits(model, copies).argmax(1) != y.repeat(restarts)).view(restarts, -1).any(0)
    broken = predict_logits(model, adv).argmax(1) != y
    assert 0 < int(broken.sum()) < len(y)
    assert torch.equal(broken, broken_copies)
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.shape == x.shape


def test_apgd_t_with_every_target_side_by_side_matches_one_after_another(model, batch):
    x, y = batch[0][:64], batch[1][:64]
    kw = {"eps": 0.06, "steps": 10, "targets": 9, "restarts": 2}
    together = apgd_t(model, x, y, side_by_side=True, generator=gen(4), **kw)
    assert torch.equal(together, apgd_t(model, x, y, side_by_side=True, generator=gen(4), **kw))
    in_turn = apgd_t(model, x, y, generator=gen(4), **kw)
    broken = [int((predict_logits(model, a).argmax(1) != y).sum()) for a in (together, in_turn)]
    assert broken[0] > 0 and abs(broken[0] - broken[1]) <= 2  # other random starts, the same attack
    assert (together - x).abs().max() <= 0.06 + 1e-6


def test_apgd_eps_zero_and_bad_parameters(model, batch):
    x, y = batch[0][:8], batch[1][:8]
    assert torch.equal(apgd(model, x, y, eps=0.0, steps=5), x)
    assert issubclass(AttackError, AdvmnistError)  # bad attack input takes the CLI's one-line error path
    with pytest.raises(AttackError, match="loss must be"):
        apgd(model, x, y, loss="hinge")
    with pytest.raises(AttackError, match="targets must be"):
        apgd_t(model, x, y, targets=12)
    with pytest.raises(AttackError, match="norm must be"):
        square(model, x, y, norm="l1")


class NoGradients(nn.Module):
    """A model that fails the test on any use of autograd: score-based attacks must not need it."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        self.calls += 1
        assert not torch.is_grad_enabled() and not x.requires_grad, "Square asked for a gradient"
        return self.net(x)


@pytest.mark.parametrize("norm, eps", [("linf", 0.2), ("l2", 2.0)])
def test_square_reads_only_outputs_and_fools(model, batch, norm, eps, monkeypatch):
    x, y = batch[0][:100], batch[1][:100]
    wrapped = NoGradients(model).eval()

    def forbidden(*args, **kwargs):
        raise AssertionError("Square called autograd")

    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    adv = square(wrapped, x, y, eps=eps, norm=norm, queries=300, generator=gen())
    monkeypatch.undo()
    assert wrapped.calls >= 300 or acc(model, adv, y) == 0
    dist = (adv - x).abs().flatten(1).amax(1) if norm == "linf" else (adv - x).flatten(1).norm(dim=1)
    assert dist.max() <= eps + 1e-5 and adv.min() >= 0 and adv.max() <= 1
    assert acc(model, adv, y) < 70
    again = [square(model, x, y, eps=eps, norm=norm, queries=300, generator=gen()) for _ in range(2)]
    assert torch.equal(*again)  # seeded


def test_ensemble_is_a_worst_case_per_example(model, batch):
    x, y = batch[0][:120], batch[1][:120]
    stages = ensemble_stages("quick", steps=10, queries=100)
    res = run_ensemble(model, x, y, eps=0.1, stages=stages, alone=True)
    after = [r["robust_accuracy_after"] for r in res["per_attack"]]
    assert after == sorted(after, reverse=True) and res["robust_accuracy"] == after[-1]
    assert all(r["robust_accuracy_alone"] >= res["robust_accuracy"] for r in res["per_attack"])
    assert res["robust_accuracy"] <= acc(model, pgd(model, x, y, eps=0.1, steps=10, generator=gen()), y)
    assert [r["key"] for r in res["per_attack"]] == ["apgd-ce", "apgd-t", "square"]
    cascaded = run_ensemble(model, x, y, eps=0.1, stages=stages)
    assert cascaded["per_attack"][1]["robust_accuracy_alone"] is None
    assert cascaded["per_attack"][1]["attacked"] < 120


def test_ensemble_choices_are_checked():
    assert [s.key for s in ensemble_stages("standard", ["apgd-ce", "square"])] == ["apgd-ce", "square"]
    assert ensemble_stages("standard")[0].params["steps"] == 100
    with pytest.raises(AdvmnistError, match="no attack 'fab'"):
        ensemble_stages("standard", ["fab"])
    with pytest.raises(AdvmnistError, match="unknown ensemble"):
        ensemble_stages("strongest")


class Quantise(nn.Module):
    """Rounds pixels to {0, 0.5, 1}: input gradients are zero almost everywhere (gradient masking)."""

    def forward(self, x):
        return torch.round(x * 2) / 2


def _checks(model, x, y, ensemble, steps):
    stages = ensemble_stages(ensemble, steps=steps, queries=300)
    res = run_ensemble(model, x, y, eps=0.1, stages=stages)
    return res, {c["check"]: c["passed"] for c in masking_checks(model, x, y, res, res["robust_mask"], eps=0.1,
                                                                 steps=steps)}


def test_masking_detector_fires_on_a_masked_model_and_stays_silent_on_a_plain_one(model, batch):
    x, y = batch[0][:150], batch[1][:150]
    res, plain = _checks(model, x, y, "standard", 100)
    assert 5 < res["robust_accuracy"] < 95  # a set where the attacks have work to do
    assert all(plain.values()), plain
    masked = nn.Sequential(Quantise(), model).eval()
    res_m, flags = _checks(masked, x, y, "quick", 10)
    assert not flags["a score-based attack finds nothing the gradient attacks missed"]
    assert not flags["input gradients are not zero"]
    assert not flags["a gradient attack at an eps that reaches any image wins"]
    (square_row,) = [r for r in res_m["per_attack"] if r["key"] == "square"]
    assert square_row["gradient_free"] and square_row["broke_pp"] > 0.5


def test_training_accuracy_far_above_test_robustness_is_flagged(model, batch):
    x, y = batch[0][:50], batch[1][:50]
    stages = ensemble_stages("quick", attacks=["apgd-ce"], steps=5)
    res = run_ensemble(model, x, y, eps=0.1, stages=stages)
    checks = masking_checks(model, x, y, res, res["robust_mask"], eps=0.1, steps=5,
                            train_adv_accuracy=res["robust_accuracy"] + 10)
    (gap,) = [c for c in checks if c["check"].startswith("training-time")]
    assert not gap["passed"]
    record = {"adversarial": {"method": "pgd", "eps": 0.3},
              "history": [{"train_accuracy": 90.0}, {"train_accuracy": 97.0, "restored_epoch": 1}]}
    assert train_adversarial_accuracy(record, 0.3) == 90.0
    assert train_adversarial_accuracy(record, 0.1) is None
    assert train_adversarial_accuracy({**record, "adversarial": {"method": "trades", "eps": 0.3}}, 0.3) is None
    assert train_adversarial_accuracy({**record, "adversarial": {"method": "ibp", "eps": 0.3}}, 0.3) is None


def test_cli_attack_with_the_new_methods(tmp_path):
    runner = CliRunner()
    out = str(tmp_path)
    result = runner.invoke(main, ["train", "--model", "lenet", "--epochs", "1", "--limit", "2000", "--out", out,
                                  "--quiet"])
    assert result.exit_code == 0, result.output
    for args in (["--method", "apgd", "--steps", "10", "--loss", "dlr"],
                 ["--method", "apgd-t", "--steps", "5", "--targets", "2"],
                 ["--method", "square", "--queries", "50", "--norm", "l2", "--eps", "2"],
                 ["--method", "fab-t", "--steps", "5", "--targets", "2", "--alpha-max", "0.05"]):
        result = runner.invoke(main, ["attack", *args, "--limit", "50", "--out", out, "--quiet"])
        assert result.exit_code == 0, result.output
        assert "fooled %" in result.output
    result = runner.invoke(main, ["attack", "--method", "square", "--targeted", "--limit", "5", "--out", out])
    assert result.exit_code == 2 and "untargeted" in result.output
    result = runner.invoke(main, ["evaluate", "--robust", "--eps", "0.1", "--ensemble", "quick", "--steps", "5",
                                  "--queries", "50", "--limit", "60", "--check-n", "30", "--out", out])
    assert result.exit_code == 0, result.output
    assert "APGD-T (5 steps x 3 targets)" in result.output and "robust % after it" in result.output
    (run,) = [d for d in tmp_path.iterdir() if d.name.startswith("lenet-")]
    rec = json.loads((run / "eval" / "robust.json").read_text())
    assert rec["settings"]["attacks"] == ["apgd-ce", "apgd-t", "square"] and rec["n"] == 60
    assert isinstance(rec["masking"]["flagged"], bool) and len(rec["checks"]) == 4


def test_a_flag_is_a_count_of_images_never_fewer_than_two():
    assert image_limit(200, 0.5) == 2 and image_limit(1000, 0.5) == 5 and image_limit(10000, 0.5) == 50


def _fake_result(n: int, square_broke: int, device) -> tuple[dict, torch.Tensor]:
    """An ensemble result claiming every image survived the gradient attack and Square broke the first few."""
    broken_by = torch.full((n,), -1, dtype=torch.long, device=device)
    broken_by[:square_broke] = 1
    robust = broken_by < 0
    rows = [{"attack": "APGD-CE", "key": "apgd-ce", "gradient_free": False, "broke_pp": 0.0},
            {"attack": "Square", "key": "square", "gradient_free": True, "broke_pp": 100.0 * square_broke / n}]
    return {"per_attack": rows, "broken_by": broken_by,
            "robust_accuracy": 100.0 * robust.float().mean().item()}, robust


def test_square_only_images_that_restarts_break_are_an_unconverged_start_not_masking(model, batch):
    x, y = batch[0][:20], batch[1][:20]
    result, robust = _fake_result(20, 8, x.device)
    (score,) = [c for c in masking_checks(model, x, y, result, robust, eps=0.3, steps=5, check_n=4)
                if c["check"].startswith("a score-based")]
    counts = score["counts"]
    assert counts["score_based_only"] == 8 and counts["limit"] == 2 and counts["escalation"]
    assert counts["recovered_by_restarts"] + counts["square_only"] == 8
    assert counts["recovered_by_restarts"] >= 7  # eps 0.3 breaks a 1-epoch net from any start
    assert score["passed"] and "8 image(s)" in score["detail"] and "attacked again" in score["detail"]


def test_every_image_a_check_breaks_counts_in_the_robust_accuracy(model, batch):
    x, y = batch[0][:30], batch[1][:30]
    result, robust = _fake_result(30, 0, x.device)  # claims all 30 robust at eps 0.3: not so
    checks = masking_checks(model, x, y, result, robust, eps=0.3, steps=5, check_n=20)
    rows = {r["key"]: r for r in result["per_attack"]}
    assert rows["check-restarts"]["broke_pp"] > 40
    assert result["robust_accuracy"] == result["per_attack"][-1]["robust_accuracy_after"]
    assert result["robust_accuracy"] == 100.0 * robust.float().mean().item()
    assert robust[20:].all()  # only the first check_n were attacked again
    (more,) = [c for c in checks if c["check"].startswith("more restarts")]
    assert more["counts"]["broken"] > 2 and more["counts"]["confirm_broken"] is not None  # a second round ran
    assert "check-confirm" in rows and more["passed"] == (more["counts"]["confirm_broken"] <= 2)
