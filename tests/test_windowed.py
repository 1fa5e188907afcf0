"""Windowed logits (`advmnist/attacks/windowed.py`): equal to whole forward passes, and Square with
them finds what Square without them finds."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from advmnist.attacks import square
from advmnist.attacks.windowed import WindowedLogits
from advmnist.models import create_model, list_models

square_module = importlib.import_module("advmnist.attacks.square")
windowed_module = importlib.import_module("advmnist.attacks.windowed")


def _odd_geometry() -> nn.Module:
    """Convs whose kernel is smaller than their stride, that leave border rows unread, that pad
    more than usual, and a pooling layer between them."""
    return nn.Sequential(nn.Conv2d(1, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 8, 1, stride=2), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=2), nn.MaxPool2d(2), nn.Conv2d(8, 5, 2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(5 * 3 * 3, 10))


@pytest.mark.parametrize("name", list_models() + ["odd-geometry"])
def test_windowed_logits_equal_whole_forward_passes(name, monkeypatch):
    """A random walk of windowed changes, accepts on random examples and drops, against the model;
    long enough that the cached activations are recomputed from the images on the way."""
    monkeypatch.setattr(windowed_module, "REFRESH", 30)
    torch.manual_seed(0)
    model = (_odd_geometry() if name == "odd-geometry" else create_model(name)).eval()
    x = torch.rand(12, 1, 28, 28)
    windowed = WindowedLogits.build(model, x)
    assert windowed is not None, f"{name}: every zoo model should be followed"
    with torch.no_grad():
        assert torch.allclose(windowed.start(x), model(x), atol=1e-5, rtol=1e-4)
        current = x.clone()
        for it in range(120):
            s = (28, 9, 3, 2, 1, 2)[it % 6]
            r, c = torch.randint(28 - s + 1, (2,)).tolist()
            patch = torch.rand(len(current), 1, s, s)
            logits, proposal = windowed.propose(patch, r, c)
            candidate = current.clone()
            candidate[:, :, r:r + s, c:c + s] = patch
            want = model(candidate)
            assert torch.allclose(logits, want, atol=1e-4 * want.abs().max().item()), (name, it, s)
            accept = torch.rand(len(current)) < 0.5
            windowed.accept(proposal, accept)
            current = torch.where(accept.view(-1, 1, 1, 1), candidate, current)
            if it == 50:
                keep = torch.arange(len(current)) % 3 != 0
                windowed.keep(keep)
                current = current[keep]
        assert windowed.accepted >= 2 * windowed_module.REFRESH


def test_layers_it_cannot_follow_give_none():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Upsample(scale_factor=2), nn.Flatten(), nn.Linear(4 * 52 * 52, 10))
    assert WindowedLogits.build(model.eval(), torch.rand(1, 1, 28, 28)) is None
    assert WindowedLogits.build(create_model("strided").train(), torch.rand(1, 1, 28, 28)) is None


def test_square_finds_the_same_with_and_without_windows(model, batch, monkeypatch):
    """Same seed, same draws: the windowed evaluation changes the cost, not the examples broken."""
    x, y = batch[0][:60], batch[1][:60]
    runs = []
    for share in (square_module.WINDOWED_SHARE, 10 ** 9):
        monkeypatch.setattr(square_module, "WINDOWED_SHARE", share)
        adv = square(model, x, y, eps=0.15, queries=400, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            runs.append(model(adv).argmax(1) != y)
        assert (adv - x).abs().max() <= 0.15 + 1e-6
    assert runs[0].any() and torch.equal(runs[0], runs[1])
