"""Exactness of the fast attack path: same logits and input gradients as the model with autograd."""

import pytest
import torch
from torch import nn

from advmnist.attacks import fgsm, gradient_fn, input_grad, penalty, pgd
from advmnist.attacks.fast import compile_grad
from advmnist.models import create_model, list_models


def randomised(name):
    """A registry model with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    model = create_model(name)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("name", list_models())
def test_fast_path_matches_autograd_for_every_registry_model(name, small):
    model = randomised(name)
    x, y = small.test_x[:64], small.test_y[:64]
    fast = compile_grad(model, x)
    assert fast is not None, f"{name} should compile"
    g_fast, logits_fast = fast(x, y)
    g_ref, logits_ref = input_grad(model, x, y)
    assert torch.allclose(logits_fast, logits_ref, atol=1e-4, rtol=0)
    top2 = logits_ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert torch.equal(logits_fast.argmax(1)[clear], logits_ref.argmax(1)[clear])
    scale = g_ref.abs().max()
    assert (g_fast - g_ref).abs().max() <= 1e-4 * scale + 1e-6
    assert torch.equal(g_fast.sign()[g_ref.abs() > 1e-4 * scale], g_ref.sign()[g_ref.abs() > 1e-4 * scale])


def test_train_mode_and_unknown_layers_fall_back_to_autograd(small):
    x = small.test_x[:4]
    assert compile_grad(create_model("improved-bn").train(), x) is None
    odd = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Softmax(dim=1)).eval()
    assert compile_grad(odd, x) is None
    custom = nn.Module()
    assert compile_grad(custom, x) is None
    g, _ = gradient_fn(odd, x)(x, small.test_y[:4])
    assert g.shape == x.shape


@pytest.mark.parametrize("name", ["improved-bn", "lenet-bn", "mlp"])
def test_attacks_give_the_same_images_fast_or_not(name, small):
    model = randomised(name)
    x, y = small.test_x[:32], small.test_y[:32]
    a = fgsm(model, x, y, eps=0.1, fast=True)
    b = fgsm(model, x, y, eps=0.1, fast=False)
    assert (a != b).float().mean() < 0.01  # only where a gradient is ~0 can the sign flip
    pa = pgd(model, x, y, eps=0.1, steps=5, generator=torch.Generator().manual_seed(0), fast=True)
    pb = pgd(model, x, y, eps=0.1, steps=5, generator=torch.Generator().manual_seed(0), fast=False)
    assert (pa - pb).abs().max() <= 0.1 * 2 + 1e-6
    agree = (model(pa).argmax(1) == model(pb).argmax(1)).float().mean()
    assert agree > 0.9
    t = (y + 1) % 10
    qa = penalty(model, x, t, steps=20, generator=torch.Generator().manual_seed(0), fast=True)
    qb = penalty(model, x, t, steps=20, generator=torch.Generator().manual_seed(0), fast=False)
    assert (qa - qb).abs().max() < 1e-3
