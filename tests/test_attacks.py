"""Attacks on improved-bn trained one epoch on 4,000 images (the session fixture `trained_small`)."""

import pytest
import torch
from torch import nn

from advmnist.attacks import AttackError, fgsm, gd, get_attack, list_attacks, penalty, pgd
from advmnist.measures import attack_measures, predict_logits

QUICK = {"penalty": {"steps": 30}, "gd": {"steps": 30}, "fgsm": {"eps": 0.1}, "pgd": {"eps": 0.1, "steps": 5},
         "apgd": {"eps": 0.1, "steps": 5}, "apgd-t": {"eps": 0.1, "steps": 5, "targets": 2},
         "square": {"eps": 0.1, "queries": 30}, "fab-t": {"eps": 0.1, "steps": 5, "targets": 2}}
QUICK.update({"cw": {"steps": 10, "search_steps": 2}, "deepfool": {"steps": 10}, "fmn": {"steps": 10},
              "jsma": {"gamma": 0.05}})


def acc(model, x, y):
    return (predict_logits(model, x).argmax(1) == y).float().mean().item()


def test_registry_holds_the_four_methods():
    assert {"penalty", "gd", "fgsm", "pgd"} <= set(list_attacks())
    with pytest.raises(AttackError, match="unknown attack"):
        get_attack("no-such-attack")


@pytest.mark.parametrize("name", list_attacks())
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_attack_returns_pixels_and_leaves_model_and_input_untouched(name, mode, model, batch):
    x, y = batch[0][:16], batch[1][:16]
    x_before = x.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train(mode == "train")
    try:
        flags = [p.requires_grad for p in model.parameters()]
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        out = get_attack(name).fn(model, x, (y + 1) % 10 if get_attack(name).always_targeted else y,
                                  **QUICK[name])
        assert model.training == (mode == "train")
        assert [p.requires_grad for p in model.parameters()] == flags
        for p, g in zip(model.parameters(), grads):
            assert (p.grad is None and g is None) or torch.equal(p.grad, g)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), f"{k} changed (BatchNorm statistics?)"
    finally:
        model.eval()
    assert torch.equal(x, x_before)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not out.requires_grad


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
def test_linf_attacks_stay_in_the_ball_and_pgd_beats_fgsm(model, batch, eps):
    x, y = batch
    adv_f = fgsm(model, x, y, eps=eps)
    adv_p = pgd(model, x, y, eps=eps, steps=10, generator=torch.Generator().manual_seed(0))
    for adv in (adv_f, adv_p):
        assert (adv - x).abs().max() <= eps + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
    assert acc(model, adv_p, y) <= acc(model, adv_f, y)
    assert acc(model, adv_f, y) < 1.0


def test_attacks_actually_fool(model, batch):
    x, y = batch
    assert acc(model, fgsm(model, x, y, eps=0.3), y) < 0.5
    assert acc(model, pgd(model, x, y, eps=0.3, steps=20), y) < 0.05


def test_l2_pgd_stays_in_its_ball(model, batch):
    x, y = batch
    adv = pgd(model, x, y, eps=1.5, steps=10, norm="l2", generator=torch.Generator().manual_seed(0))
    assert (adv - x).flatten(1).norm(dim=1).max() <= 1.5 + 1e-4
    assert adv.min() >= 0 and adv.max() <= 1
    assert acc(model, adv, y) < acc(model, x, y)


def test_eps_zero_changes_nothing(model, batch):
    x, y = batch
    assert torch.equal(fgsm(model, x, y, eps=0.0), x)
    assert torch.equal(pgd(model, x, y, eps=0.0, steps=5), x)
    assert acc(model, pgd(model, x, y, eps=0.0, steps=5), y) == acc(model, x, y) == 1.0


def test_same_seed_same_images(model, batch):
    x, y = batch[0][:32], batch[1][:32]

    def run(seed):
        return pgd(model, x, y, eps=0.2, steps=3, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    t = (y + 1) % 10
    a = penalty(model, x, t, steps=5, generator=torch.Generator().manual_seed(3))
    b = penalty(model, x, t, steps=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_restarts_keep_the_worst_case_per_example(model, batch):
    x, y = batch
    one = pgd(model, x, y, eps=0.1, steps=3, restarts=1, generator=torch.Generator().manual_seed(0))
    three = pgd(model, x, y, eps=0.1, steps=3, restarts=3, generator=torch.Generator().manual_seed(0))
    fooled_one = predict_logits(model, one).argmax(1) != y
    fooled_three = predict_logits(model, three).argmax(1) != y
    assert bool((fooled_three | ~fooled_one).all()), "an example fooled by restart 1 was lost"
    assert (three - x).abs().max() <= 0.1 + 1e-6


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_targeted_attacks_reach_their_target(model, batch, method):
    x, y = batch
    target = (y + 1) % 10
    kwargs = {"eps": 0.3, "targeted": True}
    if method == "pgd":
        kwargs.update(steps=40, alpha=0.02)
    adv = get_attack(method).fn(model, x, target, **kwargs)
    reached = (predict_logits(model, adv).argmax(1) == target).float().mean().item()
    assert reached > (0.8 if method == "pgd" else 0.1)


def test_gd_reaches_targets_and_stops_early(model, batch):
    x, y = batch[0][:50], batch[1][:50]
    target = (y + 3) % 10
    adv = gd(model, x, target, lr=0.1, steps=300)
    probs = predict_logits(model, adv).softmax(1)
    reached = probs.argmax(1) == target
    assert reached.float().mean() > 0.9
    # early stopping: each success is the first iterate past the boundary, not a confident one
    assert probs[reached].max(1).values.median() < 0.9


def digits_batch(small):
    idx = torch.stack([(small.test_y == d).nonzero()[0, 0] for d in range(10)])
    return small.test_x[idx], small.test_y[idx]


def test_penalty_with_the_reports_defaults_turns_digits_into_their_targets(model, small):
    x_target, src = digits_batch(small)
    target = (src + 1) % 10
    adv = penalty(model, x_target, target, eta=0.1, lam=0.05, steps=300,
                  generator=torch.Generator().manual_seed(0))
    reached = (predict_logits(model, adv).argmax(1) == target).sum().item()
    assert reached >= 8
    assert adv.min() >= 0 and adv.max() <= 1


def test_penalty_stays_closer_to_x_target_as_lam_grows(model, small):
    x_target, src = digits_batch(small)
    target = (src + 1) % 10

    def distance(lam):
        adv = penalty(model, x_target, target, lam=lam, steps=200, generator=torch.Generator().manual_seed(0))
        return (adv - x_target).flatten(1).norm(dim=1).mean().item()

    d = [distance(lam) for lam in (0.0, 0.05, 0.5)]
    assert d[0] > d[1] > d[2]


def test_penalty_without_clamp_is_the_reports_unconstrained_update(model, small):
    x_target, src = digits_batch(small)
    adv = penalty(model, x_target, (src + 1) % 10, steps=20, clamp=False,
                  generator=torch.Generator().manual_seed(0))
    assert adv.min() < 0 or adv.max() > 1  # N(0.5, 0.3) noise leaves [0, 1] at once


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y: fgsm(m, x, y, eps=-0.1), "eps must be >= 0"),
    (lambda m, x, y: pgd(m, x, y, eps=-1.0), "eps must be >= 0"),
    (lambda m, x, y: pgd(m, x, y, norm="l1"), "norm must be"),
    (lambda m, x, y: pgd(m, x, y, restarts=0), "restarts must be"),
    (lambda m, x, y: penalty(m, x, y, eta=0.0), "eta must be positive"),
    (lambda m, x, y: penalty(m, x, y, init="zeros"), "init must be"),
    (lambda m, x, y: fgsm(m, x * 2 - 0.5, y), "pixels in \\[0, 1\\]"),
])
def test_bad_parameters_are_refused(model, batch, call, message):
    with pytest.raises(AttackError, match=message):
        call(model, batch[0][:4], batch[1][:4])


def test_a_users_own_module_works_with_every_attack(batch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x, y = batch[0][:8], batch[1][:8]
    for name in list_attacks():
        spec = get_attack(name)
        out = spec.fn(net, x, (y + 1) % 10 if spec.always_targeted else y, **QUICK[name])
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_measures_are_recomputed_from_the_final_images(model, batch):
    x, y = batch[0][:100], batch[1][:100]
    adv = fgsm(model, x, y, eps=0.15)
    m = attack_measures(model, x, y, adv)
    pred = predict_logits(model, adv).argmax(1)
    assert m["overall"]["robust_accuracy"] == pytest.approx(100 * (pred == y).float().mean().item())
    assert m["overall"]["fooling_rate"] == pytest.approx(100 - m["overall"]["robust_accuracy"])
    assert m["overall"]["linf"]["max"] <= 0.15 + 1e-6
    assert sum(s["n"] for s in m["per_digit"].values()) == 100
    assert m["per_example"]["success"] == (pred != y).tolist()


def test_default_pgd_is_as_strong_as_the_usual_pgd40(model, batch):
    """At its defaults PGD leaves no more robust accuracy than PGD-40 with alpha 0.01 and a random start."""
    x, y = batch
    usual = acc(model, pgd(model, x, y, eps=0.1, steps=40, alpha=0.01, generator=torch.Generator().manual_seed(0)), y)
    default = acc(model, pgd(model, x, y, eps=0.1, steps=40, generator=torch.Generator().manual_seed(0)), y)
    assert default <= usual + 0.01  # within 2 of these 200 images


def test_pgd_start_std_and_loss(model, batch):
    """`start_std`: a Gaussian start close to x instead of uniform in the ball; `loss`: a name or a
    per-example function of (logits, y) that the steps ascend."""
    x, y = batch[0][:32], batch[1][:32]
    gen = torch.Generator
    near = pgd(model, x, y, eps=0.3, steps=0, start_std=0.001, generator=gen().manual_seed(0))
    far = pgd(model, x, y, eps=0.3, steps=0, generator=gen().manual_seed(0))
    assert (near - x).abs().max() < 0.01 < (far - x).abs().max() <= 0.3 + 1e-6
    dlr = pgd(model, x, y, eps=0.3, steps=10, loss="dlr", generator=gen().manual_seed(0))
    margin = pgd(model, x, y, eps=0.3, steps=10, generator=gen().manual_seed(0),
                 loss=lambda logits, t: -logits.gather(1, t[:, None]).squeeze(1))
    for adv in (dlr, margin):
        assert (adv - x).abs().max() <= 0.3 + 1e-6 and acc(model, adv, y) < 0.2
    with pytest.raises(AttackError, match="loss must be one of"):
        pgd(model, x, y, loss="hinge")
