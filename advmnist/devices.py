"""Which torch device to run on: one place that training, attacks and the CLI all read."""

from __future__ import annotations

import torch

from .errors import AdvmnistError


def pick_device(name: str = "auto") -> torch.device:
    """'auto' means cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AdvmnistError(f"unknown device {name!r}; use auto, cpu, cuda or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AdvmnistError("device 'cuda' asked for, but no CUDA GPU is available")
    return device
