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
    except (RuntimeError, TypeError):
        raise AdvmnistError(f"unknown device {name!r}; use auto, cpu, cuda or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise AdvmnistError(f"device {name!r} cannot train or attack (no data lives there); use auto, cpu, cuda or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AdvmnistError("device 'cuda' asked for, but no CUDA GPU is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise AdvmnistError(f"device {name!r} asked for, but there are only {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise AdvmnistError("device 'mps' asked for, but Apple's Metal (MPS) backend is not available here")
    return device
