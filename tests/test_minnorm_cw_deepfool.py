"""Carlini & Wagner L2 and DeepFool on improved-bn trained one epoch on 4,000 images (`trained_small`).

Both are minimum-norm attacks: each example comes back as the smallest adversarial point found, or
unchanged where none was found (distance 0, still correctly classified). Settings are cut down so
the file runs in seconds on one core.
"""

import pytest
import torch

from advmnist.attacks import AttackError, cw, deepfool, get_attack
from advmnist.measures import predict_logits

# c = 10: the one-epoch model's logits are small, so c = 1 wastes the first search step of a short search
CW_QUICK = {"steps": 50, "search_steps": 3, "c": 10.0}


def l2(adv, x):
    return (adv - x).flatten(1).norm(dim=1)


def check_minimum_norm_convention(model, x, y, adv, targeted=False):
    """In [0, 1]; every changed example is adversarial; every other one is x itself, bit for bit."""
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    pred = predict_logits(model, adv).argmax(1)
    fooled = pred == y if targeted else pred != y
    changed = (adv != x).flatten(1).any(1)
    assert bool(fooled[changed].all()), "a changed example is not adversarial"
    assert torch.equal(adv[~changed], x[~changed])
    return fooled


@pytest.fixture(scope="module")
def few(batch):
    return batch[0][:16], batch[1][:16]


@pytest.fixture(scope="module")
def cw_plain(model, few):
    return cw(model, *few, **CW_QUICK)


def test_registered_with_their_summaries():
    assert get_attack("cw").summary.startswith("Carlini & Wagner")
    assert get_attack("deepfool").summary.startswith("DeepFool")
    assert not get_attack("cw").always_targeted and "targeted" in get_attack("cw").defaults()


def test_cw_fools_nearly_everything_and_follows_the_convention(model, few, cw_plain):
    x, y = few
    adv = cw_plain
    fooled = check_minimum_norm_convention(model, x, y, adv)
    assert fooled.float().mean() >= 0.85
    assert l2(adv, x)[fooled].median() < 2.5  # a minimum-norm attack: well inside PGD-L2's usual eps


def test_cw_search_only_shrinks_what_its_first_step_found(model, few, cw_plain):
    """The first search step is the same run with or without the search, and the best point is kept
    over the whole search: so the distance can only go down, and it does on average."""
    x, y = few
    one = cw(model, x, y, **{**CW_QUICK, "search_steps": 1})
    more = cw_plain
    hit_one = predict_logits(model, one).argmax(1) != y
    hit_more = predict_logits(model, more).argmax(1) != y
    assert bool(hit_more[hit_one].all())
    d_one, d_more = l2(one, x)[hit_one], l2(more, x)[hit_one]
    assert bool((d_more <= d_one + 1e-5).all())
    assert d_more.mean() < d_one.mean() and hit_more.sum() >= hit_one.sum()


def test_cw_kappa_buys_a_margin(model, few, cw_plain):
    x, y = few
    plain, sure = cw_plain, cw(model, x, y, kappa=5.0, **CW_QUICK)
    fooled = check_minimum_norm_convention(model, x, y, sure)
    logits = predict_logits(model, sure)
    assert fooled.sum() >= 4  # a margin of 5 is far on this model: not every image gets one in 3 x 50 steps
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    margin = logits.scatter(1, y[:, None], float("-inf")).amax(1) - z_y
    assert bool((margin[fooled] >= 5.0 - 1e-3).all())
    both = fooled & (predict_logits(model, plain).argmax(1) != y)
    assert l2(sure, x)[both].mean() > l2(plain, x)[both].mean()  # confidence costs distance


def test_targeted_cw_reaches_its_targets(model, few):
    x, y = few
    target = (y + 1) % 10
    adv = cw(model, x, target, targeted=True, **CW_QUICK)
    reached = check_minimum_norm_convention(model, x, target, adv, targeted=True)
    assert reached.float().mean() >= 0.75


def test_misclassified_examples_come_back_unchanged(model, few):
    """Labels the model already gets wrong: nothing to do, distance 0 (as fab-t does)."""
    x, y = few[0][:8], few[1][:8]
    wrong = (y + 1) % 10
    assert torch.equal(cw(model, x, wrong, steps=5, search_steps=1), x)
    assert torch.equal(deepfool(model, x, wrong, steps=5), x)


@pytest.fixture(scope="module")
def deepfooled(model, batch):
    x, y = batch[0][:32], batch[1][:32]
    return x, y, {norm: deepfool(model, x, y, norm=norm) for norm in ("l2", "linf")}


def test_deepfool_fools_everything_and_follows_the_convention(model, deepfooled):
    x, y, adv = deepfooled
    for norm in ("l2", "linf"):
        fooled = check_minimum_norm_convention(model, x, y, adv[norm])
        assert fooled.float().mean() >= 0.95, norm


def test_deepfool_norms_each_win_in_their_own_norm(model, deepfooled):
    x, y, adv = deepfooled
    a2, ai = adv["l2"], adv["linf"]
    both = (predict_logits(model, a2).argmax(1) != y) & (predict_logits(model, ai).argmax(1) != y)
    linf = lambda a: (a - x).flatten(1).abs().amax(1)[both].median()  # noqa: E731
    assert l2(a2, x)[both].median() < l2(ai, x)[both].median()
    assert linf(ai) < linf(a2)


def test_deepfool_few_steps_or_candidates(model, deepfooled):
    """Cut short, fewer examples are fooled and the rest come back unchanged; two candidates (the
    runner-up class alone) still fool most."""
    x, y, adv = deepfooled
    short = deepfool(model, x, y, steps=2)
    fooled = check_minimum_norm_convention(model, x, y, short)
    assert fooled.sum() < (predict_logits(model, adv["l2"]).argmax(1) != y).sum()
    two = deepfool(model, x, y, candidates=2)
    assert check_minimum_norm_convention(model, x, y, two).float().mean() >= 0.9


def test_same_call_same_bytes(model, few):
    """Neither attack draws a random number: the same call gives the same bytes."""
    x, y = few[0][:8], few[1][:8]
    assert torch.equal(cw(model, x, y, steps=10, search_steps=2), cw(model, x, y, steps=10, search_steps=2))
    assert torch.equal(deepfool(model, x, y, norm="linf", steps=5), deepfool(model, x, y, norm="linf", steps=5))


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y: cw(m, x, y, c=0.0), "c must be positive"),
    (lambda m, x, y: cw(m, x, y, search_steps=0), "search_steps must be positive"),
    (lambda m, x, y: cw(m, x, y, kappa=-1.0), "kappa must be >= 0"),
    (lambda m, x, y: deepfool(m, x, y, norm="l1"), "norm must be"),
    (lambda m, x, y: deepfool(m, x, y, candidates=1), "candidates must be"),
    (lambda m, x, y: deepfool(m, x, y, overshoot=-0.1), "overshoot must be >= 0"),
])
def test_bad_parameters_are_refused(model, few, call, message):
    with pytest.raises(AttackError, match=message):
        call(model, few[0][:4], few[1][:4])
