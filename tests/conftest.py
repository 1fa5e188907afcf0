"""Shared fixtures: MNIST loaded once, and small models trained once per session on slices."""

from __future__ import annotations

import pytest
import torch

from advmnist.data import load_mnist
from advmnist.models import create_model
from advmnist.train import fit, resolve_recipe

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mnist():
    return load_mnist()


@pytest.fixture(scope="session")
def small(mnist):
    """4,000 training and 1,000 test images: enough for one epoch well above chance in seconds."""
    return mnist.subset(4000, 1000)


@pytest.fixture(scope="session")
def trained_small(small):
    """improved-bn after one epoch of its recipe on 4,000 images (about 95% test accuracy)."""
    torch.manual_seed(0)
    model = create_model("improved-bn")
    history = fit(model, small, resolve_recipe("improved-bn", epochs=1), seed=0)
    model.eval()
    return model, history


@pytest.fixture(scope="module")
def model(trained_small):
    return trained_small[0]


@pytest.fixture(scope="module")
def batch(small, model):
    """200 test images the small model classifies correctly, with their labels."""
    from advmnist.measures import predict_logits

    x, y = small.test_x[:300], small.test_y[:300]
    ok = predict_logits(model, x).argmax(1) == y
    return x[ok][:200], y[ok][:200]
