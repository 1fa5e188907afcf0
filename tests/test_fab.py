"""FAB-T: the exact box-constrained projection onto a hyperplane, and the attack itself."""

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize

from advmnist.attacks import AttackError, apgd, fab_t
from advmnist.attacks.fab import project_onto_hyperplane
from advmnist.measures import predict_logits
from advmnist.robustness import ensemble_stages, run_ensemble


def _linf_by_lp(p, w, c):
    """min t s.t. -t <= d_i <= t, w . d = c, -p <= d <= 1 - p: variables (d, t)."""
    n = len(p)
    cost = np.r_[np.zeros(n), 1.0]
    a_ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
    bounds = [(-pi, 1 - pi) for pi in p] + [(0, None)]
    res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * n), A_eq=np.r_[w, 0.0][None], b_eq=[c], bounds=bounds)
    return res.fun if res.status == 0 else None


def test_projection_is_the_least_norm_step_onto_the_hyperplane_in_the_box():
    g = torch.Generator().manual_seed(0)
    rows, dim = 40, 7
    p = torch.rand(rows, dim, generator=g, dtype=torch.float64)
    p[:10] = torch.randint(0, 2, (10, dim), generator=g).double()  # MNIST-like pixels at the bounds
    w = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    w[::7, 0] = 0.0
    c = torch.randn(rows, generator=g, dtype=torch.float64)
    for norm in ("linf", "l2"):
        d = project_onto_hyperplane(p, w, c, norm)
        assert ((p + d) >= -1e-12).all() and ((p + d) <= 1 + 1e-12).all()
        for i in range(rows):
            pi, wi, ci = p[i].numpy(), w[i].numpy(), c[i].item()
            lp = _linf_by_lp(pi, wi, ci)
            if lp is None:  # the box does not reach the hyperplane: the step goes as far as it can
                assert abs(w[i] @ d[i]) < abs(ci) and (w[i] @ d[i]) * ci > 0
                continue
            assert torch.isclose(w[i] @ d[i], c[i], atol=1e-9)
            if norm == "linf":
                assert d[i].abs().max().item() == pytest.approx(lp, abs=1e-7)
            else:
                best = minimize(lambda v: v @ v, np.zeros(dim), jac=lambda v: 2 * v, method="SLSQP",
                                constraints=[{"type": "eq", "fun": lambda v: wi @ v - ci}],
                                bounds=[(-a, 1 - a) for a in pi], options={"ftol": 1e-14, "maxiter": 500})
                assert (d[i] @ d[i]).item() <= best.fun + 1e-7


def test_projection_of_a_point_on_the_hyperplane_does_not_move_it():
    p = torch.rand(5, 10, dtype=torch.float64)
    w = torch.randn(5, 10, dtype=torch.float64)
    assert torch.equal(project_onto_hyperplane(p, w, torch.zeros(5, dtype=torch.float64), "linf"), torch.zeros(5, 10,
                                                                                                       dtype=torch.float64))


def _acc(model, x, y):
    return 100.0 * (predict_logits(model, x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.5)])
def test_fab_t_fools_within_eps_with_smaller_perturbations_than_apgd(model, batch, norm, eps):
    x, y = batch[0][:100], batch[1][:100]
    adv = fab_t(model, x, y, eps=eps, steps=20, targets=3, norm=norm)
    size = (adv - x).flatten(1).abs().amax(1) if norm == "linf" else (adv - x).flatten(1).norm(dim=1)
    assert size.max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    fooled = predict_logits(model, adv).argmax(1) != y
    assert fooled.float().mean() > 0.4
    assert (size[~fooled] == 0).all()  # examples it could not break come back clean
    # FAB aims at the smallest perturbation: on what both break, it needs less than APGD uses
    ref = apgd(model, x, y, eps=eps, steps=20, norm=norm, generator=torch.Generator().manual_seed(0))
    ref_size = (ref - x).flatten(1).abs().amax(1) if norm == "linf" else (ref - x).flatten(1).norm(dim=1)
    both = fooled & (predict_logits(model, ref).argmax(1) != y)
    assert both.sum() > 20 and size[both].mean() < 0.9 * ref_size[both].mean()


def test_fab_t_restarts_are_seeded_and_parameters_checked(model, batch):
    x, y = batch[0][:40], batch[1][:40]
    runs = [fab_t(model, x, y, eps=0.05, steps=5, targets=2, restarts=2, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert torch.equal(*runs)
    assert torch.equal(fab_t(model, x, y, eps=0.0, steps=5, targets=1), x)
    for bad, match in (({"targets": 0}, "targets must be"), ({"beta": 1.0}, "beta"), ({"restarts": 0}, "restarts")):
        with pytest.raises(AttackError, match=match):
            fab_t(model, x, y, **bad)


def test_autoattack_ensemble_runs_fab_t_between_apgd_t_and_square(model, batch):
    stages = ensemble_stages("autoattack", steps=10, queries=100)
    assert [s.key for s in stages] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    x, y = batch[0][:60], batch[1][:60]
    res = run_ensemble(model, x, y, eps=0.1, stages=stages)
    assert res["per_attack"][2]["attack"] == "FAB-T (10 steps x 9 targets)"
    assert res["robust_accuracy"] <= _acc(model, fab_t(model, x, y, eps=0.1, steps=10), y)
