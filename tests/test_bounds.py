"""Certified bounds (advmnist.bounds) and exact verification (advmnist.exact): sound, tight where
they must be, and honest errors for what they cannot handle."""

import pytest
import torch
from torch import nn

from advmnist.bounds import (BoundError, certified, certified_margins, crown_margins, ibp_margins, input_box,
                             margin_spec)
from advmnist.evaluation import check_soundness
from advmnist.errors import AdvmnistError
from advmnist.models import Normalize


def _random_net(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        net = nn.Sequential(Normalize(0.1307, 0.3081), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3),
                            nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10))
    elif kind == "conv":
        net = nn.Sequential(Normalize(0.5, 0.5), nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                            nn.Linear(24, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    else:  # max pooling: IBP only
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                            nn.Linear(64, 10))
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def _sampled_min_margins(net, x, y, eps, samples=300, pgd_steps=30):
    """Smallest margins seen at random points, box corners and PGD points inside the ball."""
    lo, hi = input_box(x, eps)
    spec = margin_spec(y)
    worst = torch.full((len(x), 9), float("inf"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in range(samples):
            u = torch.rand(x.shape, generator=gen)
            if i % 2:
                u = (u > 0.5).float()
            worst = torch.minimum(worst, (spec @ net(lo + (hi - lo) * u).unsqueeze(2)).squeeze(2))
    for j in range(9):
        z = ((lo + hi) / 2).clone()
        for _ in range(pgd_steps):
            z.requires_grad_(True)
            m = (spec[:, j] * net(z)).sum()
            (g,) = torch.autograd.grad(m, z)
            z = torch.clamp(z.detach() - (eps / 8) * g.sign(), lo, hi)
        with torch.no_grad():
            worst = torch.minimum(worst, (spec @ net(z).unsqueeze(2)).squeeze(2))
    return worst


@pytest.mark.parametrize("kind", ["mlp", "conv", "pool"])
@pytest.mark.parametrize("eps", [0.02, 0.1])
def test_bounds_never_exceed_any_point_in_the_ball(kind, eps):
    net = _random_net(kind, seed=3)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % 10
    seen = _sampled_min_margins(net, x, y, eps)
    methods = {"ibp": lambda: ibp_margins(net, x, y, eps)}
    if kind != "pool":
        methods["crown"] = lambda: crown_margins(net, x, y, eps)
        methods["crown-ibp"] = lambda: crown_margins(net, x, y, eps, intermediate="ibp")
    for name, fn in methods.items():
        bound = fn()
        assert bound.shape == (6, 9)
        assert (bound <= seen + 1e-4).all(), f"{name} bound above a reached margin"
    if kind != "pool":  # CROWN with CROWN intermediates is the tightest of the three on these nets
        assert methods["crown"]().mean() >= methods["ibp"]().mean()


@pytest.mark.parametrize("kind", ["mlp", "conv", "pool"])
def test_bounds_at_eps_zero_are_the_margins(kind):
    net = _random_net(kind, seed=5)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 3, 5, 7])
    with torch.no_grad():
        exact = (margin_spec(y) @ net(x).unsqueeze(2)).squeeze(2)
    assert torch.allclose(ibp_margins(net, x, y, 0.0), exact, atol=1e-4)
    if kind != "pool":
        assert torch.allclose(crown_margins(net, x, y, 0.0), exact, atol=1e-4)


def test_bounds_leave_the_model_untouched():
    net = _random_net("conv", seed=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    certified_margins(net, torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2]), 0.05, method="crown")
    assert not net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_unsupported_layers_are_named():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Sigmoid())
    with pytest.raises(BoundError, match=r"layer '2' \(Sigmoid\)"):
        ibp_margins(net, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), 0.1)
    with pytest.raises(BoundError, match=r"max pooling \(layer '2'\)"):
        crown_margins(_random_net("pool", 0), torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), 0.1)
    train_mode = _random_net("conv", 0).train()
    with pytest.raises(BoundError, match="training mode"):
        ibp_margins(train_mode, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), 0.1)
    with pytest.raises(BoundError, match="finite"):
        ibp_margins(_random_net("mlp", 0), torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), float("nan"))


def test_auto_picks_the_best_bound_the_model_allows():
    x, y = torch.rand(5, 1, 8, 8), torch.arange(5)
    margins, method = certified_margins(_random_net("pool", 0), x, y, 0.01)
    assert method == "ibp"
    net = _random_net("mlp", 0)
    margins, method = certified_margins(net, x, y, 0.01)
    assert method == "ibp+crown"
    assert torch.equal(margins, torch.maximum(ibp_margins(net, x, y, 0.01), crown_margins(net, x, y, 0.01)))


def test_a_certified_example_broken_by_an_attack_stops_the_evaluation():
    check_soundness(torch.tensor([True, False, False]), torch.tensor([True, True, False]), 0.1)  # fine
    with pytest.raises(AdvmnistError, match=r"soundness violation at eps 0.1: test images \[1\]"):
        check_soundness(torch.tensor([False, True]), torch.tensor([False, False]), 0.1)


def _tiny_net() -> nn.Module:
    torch.manual_seed(13)  # a net whose three classes all show up in [0, 1]^2
    return nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


def _points(net) -> tuple[torch.Tensor, torch.Tensor]:
    """Two points of [0, 1]^2: the one deepest inside its class, and one next to where the tiny
    net's prediction changes."""
    g = torch.linspace(0.1, 0.9, 81)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1)
    with torch.no_grad():
        logits = net(grid.view(-1, 2))
    top2 = logits.topk(2, 1).values
    deepest = grid.view(-1, 2)[(top2[:, 0] - top2[:, 1]).argmax()]
    pred = logits.argmax(1).view(81, 81)
    i, j = (pred[:, 1:] != pred[:, :-1]).nonzero()[0].tolist()
    return deepest.view(1, 2), grid[i, j].view(1, 2)


@pytest.mark.parametrize("where", ["centre", "boundary"])
def test_tiny_net_bounds_against_grid_search_and_exact_milp(where):
    """On a 2-input net a 301x301 grid gives the true minimum margin up to its spacing; the bounds
    stay below it and the MILP finds it (robust at the centre, not robust next to a boundary)."""
    pytest.importorskip("scipy")
    from advmnist.exact import verify

    net = _tiny_net()
    x, eps = _points(net)[0 if where == "centre" else 1], 0.05
    with torch.no_grad():
        y = int(net(x).argmax())
        g = torch.linspace(-eps, eps, 301)
        grid = (x + torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).view(-1, 2)).clamp(0, 1)
        logits = net(grid)
        margins = logits[:, y:y + 1] - logits
        margins[:, y] = float("inf")
        grid_min = margins.min().item()
    spec_y = torch.tensor([y])
    for bound in (ibp_margins(net, x, spec_y, eps), crown_margins(net, x, spec_y, eps)):
        assert bound.min().item() <= grid_min + 1e-5
    verdict = verify(net, x, y, eps, time_limit=30)
    assert verdict.status == ("robust" if where == "centre" else "not robust")
    lipschitz_slack = 0.05  # the grid spacing is 2 eps / 300 per axis
    assert verdict.min_margin <= grid_min + 1e-5 or verdict.status == "not robust"
    assert verdict.min_margin >= grid_min - lipschitz_slack
    assert (verdict.status == "robust") == (grid_min > 0) or abs(grid_min) < lipschitz_slack
    assert crown_margins(net, x, spec_y, eps).min().item() <= verdict.min_margin + 1e-5


def test_exact_verdicts_agree_with_bounds_and_attacks(model, batch):
    """On a trained test model (fixture): certified => exact robust, exact not robust => the
    solver's point fools the model; certified <= exact <= attacked in counts."""
    pytest.importorskip("scipy")
    from advmnist.attacks import pgd
    from advmnist.exact import verify

    x, y = batch
    x, y = x[:6], y[:6]
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 24), nn.ReLU(), nn.Linear(24, 10))
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xs, ys = batch
    for _ in range(150):
        loss = nn.functional.cross_entropy(net(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    eps = 0.02
    cert = certified(certified_margins(net, x, y, eps)[0])
    verdicts = [verify(net, x[i:i + 1], int(y[i]), eps, time_limit=20) for i in range(len(y))]
    adv = pgd(net, x, y, eps=eps, steps=40, alpha=eps / 10)
    with torch.no_grad():
        attacked_ok = net(adv).argmax(1) == y
    for i, v in enumerate(verdicts):
        if cert[i]:
            assert v.status == "robust"
        if v.status == "robust":
            assert attacked_ok[i]
    exact_robust = sum(v.status == "robust" for v in verdicts)
    assert int(cert.sum()) <= exact_robust <= int(attacked_ok.sum())
    assert any(v.status != "unknown" for v in verdicts)
