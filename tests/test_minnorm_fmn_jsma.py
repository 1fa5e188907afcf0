"""FMN and JSMA on improved-bn trained one epoch on 4,000 images (the session fixture `trained_small`)."""

import pytest
import torch

from advmnist.attacks import AttackError, fmn, jsma, pgd
from advmnist.attacks.fmn import lp_norm, project_l0_ball, project_l1_ball
from advmnist.measures import predict_logits


def pred(model, x):
    return predict_logits(model, x).argmax(1)


@pytest.fixture(scope="module")
def few(batch):
    return batch[0][:24], batch[1][:24]


@pytest.fixture(scope="module")
def fmn_l2(model, few):
    return fmn(model, *few, norm="l2")


@pytest.mark.parametrize("norm", ["linf", "l2", "l1", "l0"])
def test_fmn_fools_nearly_everything_and_returns_x_where_it_fails(model, few, fmn_l2, norm):
    x, y = few
    adv = fmn_l2 if norm == "l2" else fmn(model, x, y, norm=norm)
    assert adv.min() >= 0 and adv.max() <= 1 and adv.shape == x.shape
    fooled = pred(model, adv) != y
    assert fooled.float().mean() >= 0.9
    changed = (adv != x).flatten(1).any(1)
    assert bool((fooled == changed).all()), "a changed image that does not fool, or a fooled one unchanged"
    assert torch.equal(adv[~fooled], x[~fooled])
    size = lp_norm((adv - x).flatten(1)[fooled], norm).median().item()
    assert size < {"linf": 0.3, "l2": 3.0, "l1": 20.0, "l0": 40}[norm]  # minimal norms, far below a blind attack's


def test_fmn_l2_is_close_to_the_smallest_l2_pgd_needs(model, few, fmn_l2):
    """At FMN's median L2 norm, a strong PGD-L2 should break about half, no more: FMN's norms are
    near minimal. Well below it PGD breaks few."""
    x, y = few
    median = lp_norm((fmn_l2 - x).flatten(1), "l2").median().item()

    def pgd_rate(eps):
        adv = pgd(model, x, y, eps=eps, norm="l2", steps=40, alpha=eps / 8, generator=torch.Generator().manual_seed(0))
        return (pred(model, adv) != y).float().mean().item()

    assert 0.3 <= pgd_rate(median) <= 0.7
    assert pgd_rate(0.6 * median) < 0.3


def test_fmn_targeted_reaches_the_targets(model, few):
    x, y = few[0][:16], few[1][:16]
    target = (y + 1) % 10
    adv = fmn(model, x, target, norm="l2", targeted=True)
    assert (pred(model, adv) == target).float().mean() >= 0.9


def test_fmn_l0_changes_few_pixels_and_is_deterministic(model, few):
    x, y = few[0][:16], few[1][:16]
    a, b = fmn(model, x, y, norm="l0", steps=30), fmn(model, x, y, norm="l0", steps=30)
    assert torch.equal(a, b)
    fooled = pred(model, a) != y
    assert fooled.float().mean() >= 0.8
    assert lp_norm((a - x).flatten(1)[fooled], "l0").median() <= 20


def _l1_projection_by_bisection(d: torch.Tensor, eps: float) -> torch.Tensor:
    """The projection of d onto {||v||_1 <= eps} is soft-thresholding at the theta where the L1 norm is
    eps (KKT); found here by bisection, independently of the sort-based formula."""
    if d.abs().sum() <= eps:
        return d
    lo, hi = 0.0, d.abs().max().item()
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (d.abs() - mid).clamp_min(0).sum() > eps else (lo, mid)
    return d.sign() * (d.abs() - hi).clamp_min(0)


def test_l1_projection_is_the_euclidean_projection():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(64, 7, generator=g, dtype=torch.float64) * torch.rand(64, 1, generator=g, dtype=torch.float64) * 3
    eps = torch.rand(64, generator=g, dtype=torch.float64) * 4
    eps[:3] = torch.tensor([0.0, torch.inf, 1e9], dtype=torch.float64)
    out = project_l1_ball(d, eps)
    for row, e, got in zip(d, eps, out):
        assert torch.allclose(got, _l1_projection_by_bisection(row, e.item()), atol=1e-9)
    assert bool((out.abs().sum(1) <= eps + 1e-9).all())
    # nothing in the ball is closer: random points of the ball never beat the projection
    v = torch.randn(64, 500, 7, generator=g, dtype=torch.float64)
    v = v / v.abs().sum(2, keepdim=True) * eps.clamp(max=10).view(-1, 1, 1) * torch.rand(64, 500, 1, generator=g,
                                                                                            dtype=torch.float64)
    assert bool(((v - d[:, None]).norm(dim=2) >= (out - d).norm(dim=1, keepdim=True) - 1e-9).all())


def test_l0_projection_keeps_exactly_the_k_largest():
    d = torch.tensor([[0.1, -0.5, 0.3, 0.3, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    out = project_l0_ball(d, torch.tensor([2.0, 5.0]))
    assert torch.equal(out, torch.tensor([[0.0, -0.5, 0.3, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0]]))


def test_jsma_reaches_targets_with_few_increased_pixels(model, batch):
    """Towards the runner-up class: within 78 pixels JSMA reaches about half of the targets y + 1 on
    this model, most of the runners-up."""
    x = batch[0][:12]
    target = predict_logits(model, x).topk(2, dim=1).indices[:, 1]
    adv = jsma(model, x, target)
    reached = pred(model, adv) == target
    assert reached.float().mean() >= 0.75
    changed = (adv != x).flatten(1).sum(1)
    assert changed.max() <= int(0.1 * 784)
    assert bool((adv >= x).all()), "the increasing variant only raises pixels"
    assert torch.equal(adv[~reached], x[~reached])
    assert adv.min() >= 0 and adv.max() <= 1
    assert torch.equal(jsma(model, x[:4], target[:4]), adv[:4])  # deterministic, and per example


def test_jsma_leaves_examples_already_at_their_target_alone(model, batch):
    x, y = batch[0][:4], batch[1][:4]
    assert torch.equal(jsma(model, x, y), x)


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y: fmn(m, x, y, norm="l3"), "norm must be one of"),
    (lambda m, x, y: fmn(m, x, y, gamma_init=1.5), "gamma_init"),
    (lambda m, x, y: jsma(m, x, y, theta=-1.0), "theta"),
    (lambda m, x, y: jsma(m, x, y, gamma=0.0), "gamma"),
])
def test_bad_parameters_are_refused(model, batch, call, message):
    with pytest.raises(AttackError, match=message):
        call(model, batch[0][:2], batch[1][:2])
