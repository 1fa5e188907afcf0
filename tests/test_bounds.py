"""Certified bounds (advmnist.bounds) and exact verification (advmnist.exact): sound, tight where
they must be, and honest errors for what they cannot handle."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advmnist
from advmnist.bounds import (BoundError, alpha_crown_margins, certified, certified_margins, crown_margins, ibp_margins,
                             input_box, margin_spec)
from advmnist.evaluation import check_soundness, robust_evaluate_model
from advmnist.errors import AdvmnistError
from advmnist.models import Normalize, create_model
from advmnist.train import fit, resolve_recipe


class _Residual(nn.Module):
    """A user's CNN with a functional forward: inline normalisation, a residual conv block with
    BatchNorm, pooling, `view(x.size(0), -1)`, a residual linear block."""

    def __init__(self, pool: str = "avg", buffers: bool = False):
        super().__init__()
        self.pool, self.use_buffers = pool, buffers
        self.register_buffer("mean", torch.full((1, 1, 1), 0.1307))
        self.std = nn.Parameter(torch.tensor(0.3081))  # a learned input scale: gradients must reach it
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 10)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        x = (x - self.mean) / self.std if self.use_buffers else (x - 0.1307) / 0.3081
        h = F.relu(self.conv1(x))
        h = torch.relu(self.bn(self.conv2(h)) + h)
        h = F.max_pool2d(h, 2) if self.pool == "max" else F.avg_pool2d(h, 2)
        h = h.view(h.size(0), -1)
        z = self.drop(self.fc1(h)).relu()
        r = F.relu(self.fc2(z)) + z
        return self.fc3(torch.add(r, 2 * z) - torch.tensor(0.5))


def _random_net(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind in ("res", "res-buffers", "res-pool"):
        net = _Residual(pool="max" if kind == "res-pool" else "avg", buffers=kind == "res-buffers")
    elif kind == "mlp":
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
    """Smallest margins seen at random points, box corners and PGD points inside the ball (all the
    points in one batch per forward pass: small ops are slow when the cores are shared)."""
    lo, hi = input_box(x, eps)
    spec = margin_spec(y)
    u = torch.rand(samples, *x.shape, generator=torch.Generator().manual_seed(1))
    u[1::2] = (u[1::2] > 0.5).float()
    with torch.no_grad():
        logits = net((lo + (hi - lo) * u).flatten(0, 1)).view(samples, len(x), -1, 1)
        worst = (spec @ logits).squeeze(3).min(0).values
    z = ((lo + hi) / 2).expand(9, *x.shape)  # one PGD run per margin j, side by side
    for _ in range(pgd_steps):
        z.requires_grad_(True)
        m = (spec.transpose(0, 1) * net(z.flatten(0, 1)).view(9, len(x), -1)).sum()
        (g,) = torch.autograd.grad(m, z)
        z = torch.minimum(torch.maximum(z.detach() - (eps / 8) * g.sign(), lo), hi)
    with torch.no_grad():
        logits = net(z.flatten(0, 1)).view(9, len(x), -1, 1)
        return torch.minimum(worst, (spec @ logits).squeeze(3).min(0).values)


KINDS = ["mlp", "conv", "pool", "res", "res-buffers", "res-pool"]  # *pool: max pooling, IBP only


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eps", [0.02, 0.1])
def test_bounds_never_exceed_any_point_in_the_ball(kind, eps):
    net = _random_net(kind, seed=3)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % 10
    seen = _sampled_min_margins(net, x, y, eps)
    methods = {"ibp": lambda: ibp_margins(net, x, y, eps)}
    if not kind.endswith("pool"):
        methods["crown"] = lambda: crown_margins(net, x, y, eps)
        methods["crown-ibp"] = lambda: crown_margins(net, x, y, eps, intermediate="ibp")
    for name, fn in methods.items():
        bound = fn()
        assert bound.shape == (6, 9)
        assert (bound <= seen + 1e-4).all(), f"{name} bound above a reached margin"
    if not kind.endswith("pool"):  # CROWN with CROWN intermediates is the tightest of the three on these nets
        assert methods["crown"]().mean() >= methods["ibp"]().mean()


@pytest.mark.parametrize("kind", KINDS)
def test_bounds_at_eps_zero_are_the_margins(kind):
    net = _random_net(kind, seed=5)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 3, 5, 7])
    with torch.no_grad():
        exact = (margin_spec(y) @ net(x).unsqueeze(2)).squeeze(2)
    assert torch.allclose(ibp_margins(net, x, y, 0.0), exact, atol=1e-4)
    if not kind.endswith("pool"):
        assert torch.allclose(crown_margins(net, x, y, 0.0), exact, atol=1e-4)


@pytest.mark.parametrize("kind", ["conv", "res"])
def test_bounds_leave_the_model_untouched(kind):
    net = _random_net(kind, seed=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    attributes = set(vars(net))
    certified_margins(net, torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2]), 0.05, method="crown")
    assert not net.training
    assert set(vars(net)) == attributes and before.keys() == net.state_dict().keys()
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


class _Unsupported(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.op, self.fc, self.fc32 = op, nn.Linear(64, 10), nn.Linear(32, 10)

    def forward(self, x):
        h = x.flatten(1)
        if self.op == "sigmoid":
            h = torch.sigmoid(h)
        elif self.op == "slice":
            h = torch.cat([h[:, 32:], h[:, :32]], 1)
        elif self.op == "product":
            h = h * h
        elif self.op == "batch":
            return self.fc32(h.view(-1, 32))  # two rows per image: the batch is mixed
        elif self.op == "control":
            if h.sum() > 0:  # data-dependent control flow: fx cannot trace it
                h = -h
        return self.fc(h)


@pytest.mark.parametrize("op, message", [
    ("sigmoid", r"^cannot bound 'torch.sigmoid' at node 'sigmoid'; supported: Linear"),
    ("slice", r"^cannot bound 'operator.getitem' at node 'getitem'"),
    ("product", r"^cannot bound 'operator.mul' at node 'mul'"),
    ("control", r"^cannot trace _Unsupported with torch.fx: TraceError: symbolically traced variables cannot"),
])
def test_unsupported_operations_are_named_with_their_node(op, message):
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    for fn in (lambda: ibp_margins(_Unsupported(op).eval(), x, y, 0.1),
               lambda: certified_margins(_Unsupported(op).eval(), x, y, 0.1)):
        with pytest.raises(BoundError, match=message) as err:
            fn()
        assert "\n" not in str(err.value)


def test_unsupported_details_are_named():
    class Cat(nn.Module):
        def forward(self, x):
            return torch.cat([x.flatten(1), x.flatten(1)], 1)

    class Tuple(nn.Module):
        def forward(self, x):
            return x.flatten(1), x

    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(BoundError, match=r"cannot bound 'torch.cat' at node 'cat'"):
        ibp_margins(Cat(), x, y, 0.1)
    with pytest.raises(BoundError, match=r"must return one tensor"):
        ibp_margins(Tuple(), x, y, 0.1)
    with pytest.raises(BoundError, match=r"'Tensor.view' at node 'view': it does not keep the batch"):
        ibp_margins(_Unsupported("batch"), x, y, 0.1)
    with pytest.raises(BoundError, match=r"max pooling \(layer 'max_pool2d'\)"):
        crown_margins(_random_net("res-pool", 0), x, y, 0.1)
    with pytest.raises(BoundError, match=r"layer 'bn' \(BatchNorm2d\) is in training mode"):
        ibp_margins(_random_net("res", 0).train(), x, y, 0.1)
    net = _random_net("res", 0)
    net.drop.train()
    with pytest.raises(BoundError, match=r"layer 'drop' \(Dropout\) is in training mode"):
        ibp_margins(net, x, y, 0.1)


def test_auto_picks_the_best_bound_the_model_allows():
    x, y = torch.rand(5, 1, 8, 8), torch.arange(5)
    margins, method = certified_margins(_random_net("pool", 0), x, y, 0.01)
    assert method == "ibp"
    net = _random_net("mlp", 0)
    margins, method = certified_margins(net, x, y, 0.01)
    assert method == "ibp+crown"
    assert torch.equal(margins, torch.maximum(ibp_margins(net, x, y, 0.01), crown_margins(net, x, y, 0.01)))


class _Functional(nn.Module):
    """The "conv" Sequential net written out with functions and methods: the same bounds."""

    def __init__(self, seq: nn.Sequential):
        super().__init__()
        self.seq = seq

    def forward(self, x):
        s = self.seq
        h = F.conv2d((x - 0.5) / 0.5, s[1].weight, s[1].bias, stride=2, padding=1)
        h = F.relu(s[2](h))
        h = F.conv2d(h, s[4].weight, s[4].bias, padding=1).relu()
        h = torch.flatten(F.avg_pool2d(h, 2), 1)
        h = torch.relu(s[9](F.linear(h, s[8].weight, s[8].bias)))
        return F.linear(h, s[11].weight, s[11].bias)


def test_a_functional_forward_gets_the_bounds_of_its_sequential():
    seq = _random_net("conv", seed=2)
    fun = _Functional(seq).eval()
    x, y = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([0, 2, 4, 6, 8])
    for method in ("ibp", "crown-ibp", "crown"):
        a, b = (certified_margins(net, x, y, 0.05, method=method)[0] for net in (seq, fun))
        assert torch.allclose(a, b, atol=1e-5), method
    ibp_margins(fun, x, y, 0.05).sum().backward()
    assert seq[1].weight.grad is not None and seq[8].weight.grad.abs().sum() > 0


def test_residual_ibp_margins_are_differentiable_in_the_weights():
    net = _random_net("res-buffers", seed=0)
    x, y = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2, 3, 4])
    ibp_margins(net, x, y, 0.05).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_the_traced_graph_follows_the_model():
    """The graph is traced once per model; replaced layers and buffers and a new dtype still count."""
    net = _random_net("res-buffers", seed=1)
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])

    def exact(net, x):
        with torch.no_grad():
            return (margin_spec(y) @ net(x).unsqueeze(2).to(torch.float32)).squeeze(2)

    ibp_margins(net, x, y, 0.05)
    net.fc3 = nn.Linear(16, 10)
    net.mean = torch.full((1, 1, 1), 0.4)
    assert torch.allclose(ibp_margins(net, x, y, 0.0), exact(net, x), atol=1e-4)
    net.double()
    assert ibp_margins(net, x.double(), y, 0.0).dtype == torch.float64
    assert torch.allclose(ibp_margins(net, x.double(), y, 0.0).float(), exact(net, x.double()), atol=1e-4)


def test_a_certified_residual_example_survives_attacks():
    from advmnist.attacks import pgd

    net = _random_net("res", seed=7)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = net(x).argmax(1)
    eps = 0.01
    margins, method = certified_margins(net, x, y, eps)
    assert method == "ibp+crown"
    cert = certified(margins)
    assert cert.any() and not cert.all()
    adv = pgd(net, x, y, eps=eps, steps=20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        robust = net(adv).argmax(1) == y
    check_soundness(cert, robust, eps)
    assert certified_margins(_random_net("res-pool", 7), x, y, eps)[1] == "ibp"


def test_exact_verification_names_a_graph_it_cannot_compose():
    pytest.importorskip("scipy")
    from advmnist.exact import verify

    with pytest.raises(BoundError, match=r"exact verification needs an nn.Sequential"):
        verify(_random_net("res", 0), torch.rand(1, 1, 8, 8), 3, 0.01, time_limit=5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_bounds_follow_the_device(device):
    """Same bounds on the device as on the CPU (TF32 off: its rounding is not float32's), computed there."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
        y = torch.tensor([0, 3, 6, 9])
        for kind in ("res-buffers", "conv", "res-pool"):
            net = _random_net(kind, seed=4)
            moved = copy.deepcopy(net).to(device)
            xd, yd = x.to(device), y.to(device)
            for method in ("ibp",) if kind.endswith("pool") else ("ibp", "crown-ibp", "crown"):
                ref = certified_margins(net, x, y, 0.05, method=method)[0]
                out = certified_margins(moved, xd, yd, 0.05, method=method)[0]
                assert out.device.type == device
                assert torch.allclose(out.cpu(), ref, atol=1e-3, rtol=1e-3), (kind, method)
            ibp_margins(moved, xd, yd, 0.05).sum().backward()
            assert moved.get_submodule("1" if kind == "conv" else "conv1").weight.grad.device.type == device
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


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


class _FunctionalTiny(nn.Module):
    """The tiny net with functions, a scaling by one and a ReLU applied twice: still a chain."""

    def __init__(self, seq: nn.Sequential):
        super().__init__()
        self.seq = seq

    def forward(self, x):
        h = F.relu(F.linear(x * 1.0, self.seq[0].weight, self.seq[0].bias))
        return self.seq[4](F.relu(self.seq[3](self.seq[2](h))))


def test_a_functional_chain_gets_the_same_bounds_and_exact_verdicts():
    pytest.importorskip("scipy")
    from advmnist.exact import verify

    net = _tiny_net()
    fun = _FunctionalTiny(net).eval()
    for x in _points(net):
        y = int(net(x).argmax())
        for intermediate in ("crown", "ibp"):
            assert torch.allclose(crown_margins(fun, x, torch.tensor([y]), 0.05, intermediate=intermediate),
                                  crown_margins(net, x, torch.tensor([y]), 0.05, intermediate=intermediate), atol=1e-6)
        a, b = verify(net, x, y, 0.05), verify(fun, x, y, 0.05)
        assert a.status == b.status and a.min_margin == pytest.approx(b.min_margin, abs=1e-5)


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


@pytest.mark.parametrize("name", ["improved-bn", "lenet-bn"])
def test_training_mode_batchnorm_is_bounded_with_the_batch_statistics(name):
    """Certified training of a BatchNorm net (Shi et al. 2021): inside `batch_statistics` the bounds
    normalise by the statistics of the batch the forward pass saw and take dropout (lenet-bn's) as the
    identity, so at eps 0 they are the margins of the net normalised that way in eval mode (for
    improved-bn, the pass's own), above eps 0 they hold for inputs normalised the same way, and the
    running statistics move once per batch (the bounds' shape probe does not move them)."""
    from advmnist.bounds import _TRAINING, batch_statistics
    from advmnist.models import create_model

    torch.manual_seed(0)
    net = create_model(name).train()
    norms = [m for m in net.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    with batch_statistics(net):
        logits = net(x)
        at_zero, at_eps = ibp_margins(net, x, y, 0.0), ibp_margins(net, x, y, 0.1)
        stats = [tuple(t.detach() for t in _TRAINING[m]) for m in norms]
    frozen = copy.deepcopy(net).eval()
    for m, (mean, var) in zip([m for m in frozen.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))], stats):
        m.running_mean.copy_(mean), m.running_var.copy_(var)
    assert all(m.num_batches_tracked.item() == 1 for m in norms)
    with torch.no_grad():
        assert torch.allclose(at_zero, _margins(frozen(x), y), atol=1e-4)
        if name == "improved-bn":
            assert torch.allclose(at_zero, _margins(logits, y), atol=1e-4)
        worst = torch.full_like(at_eps, float("inf"))
        g = torch.Generator().manual_seed(1)
        for _ in range(20):
            noise = 0.1 * (2 * torch.rand(x.shape, generator=g) - 1)
            worst = torch.minimum(worst, _margins(frozen((x + noise).clamp(0, 1)), y))
    assert (at_eps <= worst + 1e-4).all() and (at_eps < at_zero).any()
    with pytest.raises(BoundError, match="training mode"):  # outside the context: refused as before
        ibp_margins(net, x, y, 0.1)


def _margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    diff = logits.gather(1, y[:, None]) - logits
    keep = torch.ones_like(diff, dtype=torch.bool).scatter_(1, y[:, None], False)
    return diff[keep].view(len(y), -1)


# ---------------------------------------------------------------- alpha-CROWN

@pytest.mark.parametrize("kind", ["mlp", "conv", "res"])
def test_alpha_crown_is_sound_and_never_looser_than_crown(kind):
    net = _random_net(kind, seed=3)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % 10
    eps = 0.1
    seen = _sampled_min_margins(net, x, y, eps)
    crown = crown_margins(net, x, y, eps)
    alpha = alpha_crown_margins(net, x, y, eps, steps=20)
    assert alpha.shape == (6, 9)
    assert (alpha <= seen + 1e-4).all(), "alpha-CROWN bound above a margin reached in the ball"
    assert (alpha >= crown - 1e-5).all()
    assert (alpha - crown).mean() > 1e-3, "optimising the slopes tightened nothing"
    assert all(p.grad is None for p in net.parameters()) and not net.training


def test_alpha_crown_lies_between_crown_and_the_exact_minimum():
    pytest.importorskip("scipy")
    from advmnist.exact import verify

    net = _tiny_net()
    for x in _points(net):
        y = int(net(x).argmax())
        exact = verify(net, x, y, 0.05)
        alpha = alpha_crown_margins(net, x, torch.tensor([y]), 0.05).min().item()
        assert crown_margins(net, x, torch.tensor([y]), 0.05).min().item() <= alpha + 1e-6
        if exact.status == "robust":
            assert alpha <= exact.min_margin + 1e-5


def test_alpha_crown_at_eps_zero_is_the_margin_and_refuses_what_crown_refuses():
    net = _random_net("conv", seed=5)
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([1, 4, 7])
    with torch.no_grad():
        logits = net(x)
    exact = logits.gather(1, y[:, None]) - logits
    exact = exact[torch.arange(10)[None] != y[:, None]].view(3, 9)
    assert torch.allclose(alpha_crown_margins(net, x, y, 0.0, steps=3), exact, atol=1e-4)
    with pytest.raises(BoundError, match="max pooling"):
        alpha_crown_margins(_random_net("pool", 0), x, y, 0.1)
    with pytest.raises(BoundError, match="steps"):
        alpha_crown_margins(net, x, y, 0.1, steps=-1)


COMMON = dict(eps=0.02, ensemble="quick", steps=5, queries=40, check_n=10)


@pytest.fixture(scope="module")
def plain_mlp(mnist):
    """A perceptron after one plain epoch on 2,000 images, 40 test images and its default evaluation."""
    torch.manual_seed(0)
    data = mnist.subset(2000, 200)
    net = create_model("mlp")
    fit(net, data, resolve_recipe("mlp", epochs=1), seed=0)
    net.eval()
    x, y = data.test_x[:40], data.test_y[:40]
    return net, x, y, advmnist.robust_accuracy(net, x, y, **COMMON)


@pytest.mark.parametrize("bound", ["alpha-crown", "bab"])
def test_the_evaluation_refines_only_open_images_and_keeps_certified_below_attacked(plain_mlp, bound, monkeypatch):
    """On a plainly trained perceptron CROWN-IBP certifies little at eps 0.02; alpha-CROWN (then
    branch and bound) on the images no attack broke certifies more, counted in the interval, and
    never an image an attack broke."""
    import advmnist.evaluation as evaluation

    monkeypatch.setattr(evaluation, "BAB_DOMAINS", 16)
    net, x, y, auto = plain_mlp
    common = COMMON
    alpha = advmnist.robust_accuracy(net, x, y, bound=bound, **common)
    assert alpha.robust_accuracy == auto.robust_accuracy  # the attacks are the same; only the bound changed
    refined = alpha.certified.refined
    broken = len(alpha.not_robust)
    assert refined["open"] == 40 - broken - auto.certified.certified_count
    assert refined["certified"] >= 1
    assert alpha.certified.certified_count == auto.certified.certified_count + refined["certified"]
    assert alpha.certified.method == auto.certified.method + ("+alpha-crown" if bound == "alpha-crown" else
                                                             "+alpha-crown+bab")
    if bound == "bab":
        assert refined["by_alpha_crown"] + refined["by_bab"] == refined["certified"]
        assert refined["branched"] == refined["open"] - refined["by_alpha_crown"]
    assert alpha.certified.certified_accuracy <= alpha.robust_accuracy
    assert alpha.interval == [alpha.certified.certified_accuracy, alpha.robust_accuracy]
    assert auto.certified.refined is None


def test_a_model_alpha_crown_cannot_bound_keeps_its_first_certificate(mnist):
    """Max pooling: IBP certified what it could, alpha-CROWN says why it did not run, nothing is lost."""
    from advmnist.evaluation import refine_open

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 13 * 13, 10)).eval()
    x, y = mnist.test_x[:6], mnist.test_y[:6]
    certificate = {"method": "ibp", "certified_accuracy": 50.0, "certified_count": 3, "seconds": 0.1}
    mask = torch.tensor([True, True, True, False, False, False])
    refine_open(net, x, y, 0.01, certificate, mask, torch.ones(6, dtype=torch.bool))
    assert certificate["method"] == "ibp" and certificate["certified_count"] == 3 and mask.sum() == 3
    assert "max pooling" in certificate["refined"]["skipped"]


def test_nothing_open_leaves_the_certificate_as_it_was():
    from advmnist.evaluation import refine_open

    net = _random_net("conv", seed=0)
    certificate = {"method": "ibp+crown-ibp", "certified_accuracy": 50.0, "certified_count": 1, "seconds": 0.1}
    refine_open(net, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), 0.1, certificate, torch.tensor([True, False]),
                torch.tensor([True, False]), method="bab")
    assert certificate["method"] == "ibp+crown-ibp"
    assert certificate["refined"] == {"method": "alpha-crown+bab", "open": 0, "certified": 0}


def test_an_unknown_bound_is_refused_in_one_line():
    net = _random_net("mlp", seed=0)
    with pytest.raises(AdvmnistError, match="unknown bound 'alpha'"):
        robust_evaluate_model(net, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), eps=0.1,
                                                  bound="alpha")


# ---------------------------------------------------------------- branch and bound


def _grid_points(net, n: int = 9):
    g = torch.linspace(0.1, 0.9, n)
    xs = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).view(-1, 2)
    with torch.no_grad():
        return xs, net(xs).argmax(1)


def test_branch_and_bound_proves_more_than_alpha_crown_and_only_what_is_true():
    """On a 9x9 grid of the tiny net at eps 0.1, every point branch and bound proves is robust by the
    exact MILP, and it proves points alpha-CROWN alone cannot."""
    pytest.importorskip("scipy")
    from advmnist.branching import branch_margins
    from advmnist.exact import verify

    net = _tiny_net()
    xs, ys = _grid_points(net)
    eps = 0.1
    alpha = certified(alpha_crown_margins(net, xs, ys, eps))
    bab = branch_margins(net, xs, ys, eps, time_limit=60)
    exact = torch.tensor([verify(net, xs[i:i + 1], int(ys[i]), eps).status == "robust" for i in range(len(xs))])
    assert not (bab & ~exact).any(), "branch and bound proved a point the MILP finds not robust"
    assert (bab | ~alpha).all(), "branch and bound lost a proof alpha-CROWN had"
    assert (bab & ~alpha).sum() >= 1


@pytest.mark.parametrize("kind", ["mlp", "conv", "res"])
def test_branch_and_bound_never_proves_a_margin_an_attack_breaks(kind):
    from advmnist.branching import branch_margins

    net = _random_net(kind, seed=3)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % 10
    for eps in (0.005, 0.02):
        seen = _sampled_min_margins(net, x, y, eps).min(1).values
        proven = branch_margins(net, x, y, eps, domains=64, time_limit=20)
        assert not (proven & (seen <= 0)).any()
        assert (proven | ~certified(crown_margins(net, x, y, eps))).all()


def test_branch_and_bound_refuses_bad_limits():
    from advmnist.branching import branch_margins

    with pytest.raises(BoundError, match="domains >= 1"):
        branch_margins(_tiny_net(), torch.rand(1, 2), torch.tensor([0]), 0.1, domains=0)
