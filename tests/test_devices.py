"""Where the work runs: the batch an attack takes on each device, Square's GPU path (checked here on the
CPU), and the same evaluation on every device there is (CUDA where present, skipped in CI)."""

from __future__ import annotations

import importlib

import pytest
import torch

import advmnist
from advmnist.attacks.square import square
from advmnist.execution import batch_size_for
from advmnist.measures import predict_logits

square_module = importlib.import_module("advmnist.attacks.square")  # the package exports the function by that name
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_attacks_take_the_test_set_in_one_batch_on_a_gpu():
    assert batch_size_for(torch.device("cpu")) == 1000
    assert batch_size_for(torch.device("cuda")) == 10000


def test_square_without_per_query_looks_breaks_what_it_reports_and_stays_in_the_ball(model, batch, monkeypatch):
    x, y = batch[0][:60], batch[1][:60]
    per_query = square(model, x, y, eps=0.15, queries=200, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(square_module, "_per_query", lambda device: False)  # the path a GPU takes
    monkeypatch.setattr(square_module, "CHECK_EVERY", 7)
    lazy = square(model, x, y, eps=0.15, queries=200, generator=torch.Generator().manual_seed(0))
    assert (lazy - x).abs().max() <= 0.15 + 1e-6 and lazy.min() >= 0 and lazy.max() <= 1
    fooled = predict_logits(model, lazy).argmax(1) != y
    fooled_per_query = predict_logits(model, per_query).argmax(1) != y
    assert fooled.sum() >= 10  # eps 0.15 breaks a good share of a 1-epoch net
    assert abs(int(fooled.sum()) - int(fooled_per_query.sum())) <= 6  # the same search, other random draws


@pytest.mark.parametrize("device", DEVICES)
def test_the_evaluation_runs_on_each_device(model, batch, device):
    x, y = batch[0][:40], batch[1][:40]
    rr = advmnist.robust_accuracy(model, x, y, eps=0.1, ensemble="quick", steps=5, queries=40, check_n=20,
                                  device=device)
    assert rr.settings["device"].startswith(device) and rr.clean_accuracy == 100.0
    assert rr.certified.method and rr.interval[0] <= rr.interval[1]
    assert next(model.parameters()).device.type == "cpu"
    if device != "cpu":
        on_cpu = advmnist.robust_accuracy(model, x, y, eps=0.1, ensemble="quick", steps=5, queries=40, check_n=20,
                                          device="cpu")
        assert abs(rr.robust_accuracy - on_cpu.robust_accuracy) <= 10.0  # float rounding, other batches
        assert rr.certified.certified_count == on_cpu.certified.certified_count
