"""Certified lower bounds on robust accuracy: interval bound propagation (IBP) and CROWN.

An attack that fails proves nothing; a bound does. For an input x, a label y and the Linf ball of
radius eps around x (clipped to the pixel box [0, 1]) these functions bound, from below, the margins
logit_y - logit_j for every j != y over the whole ball. When all nine lower bounds are positive, no
perturbation in the ball changes the prediction: the example is certified, whatever attack comes.

- IBP (Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for Training
  Verifiably Robust Models") pushes a box through every layer. The margins are folded into the last
  affine segment (the layers after the last ReLU), as they do, so the box is never taken around
  the logits themselves.
- CROWN (Zhang et al. 2018, "Efficient Neural Network Robustness Certification with General
  Activation Functions") propagates the margins backwards as linear functions, relaxing each
  unstable ReLU by two lines (upper: the chord; lower: slope 0 or 1, whichever is closer). Its
  pre-activation bounds are the tighter of IBP's and CROWN's own (backward from that layer), except
  where a single affine map precedes the ReLU: there IBP is already exact.

Layers: the model's `Normalize`, Linear, Conv2d (zero padding, any stride), BatchNorm in eval mode,
ReLU, Flatten, Dropout and Identity in eval mode, average pooling; max pooling in IBP only. Anything
else is a `BoundError` naming the layer. The functions never change the model or its mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdvmnistError
from .models import Normalize

TOLERANCE = 1e-4  # float32 slack: a margin bound must exceed this to certify


class BoundError(AdvmnistError):
    """A model or setting the bounds cannot handle (unsupported layer, train mode, bad eps)."""


_PASS = (nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_AFFINE = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, Normalize, nn.AvgPool2d) + _PASS
_WEIGHTED = (nn.Linear, nn.Conv2d, nn.AvgPool2d)


@dataclass(frozen=True)
class Layer:
    name: str
    module: nn.Module
    in_shape: tuple[int, ...]  # per example
    out_shape: tuple[int, ...]


def bound_layers(model: nn.Module, example: torch.Tensor | None = None) -> list[Layer]:
    """The model as a flat list of supported layers with their shapes; BoundError for anything else."""
    flat: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        if not isinstance(module, nn.Sequential):
            raise BoundError(f"bounds need an nn.Sequential, got {type(module).__name__} at '{prefix or 'model'}'")
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.Sequential):
                walk(child, full)
            else:
                flat.append((full, child))

    walk(model, "")
    for name, m in flat:
        if not isinstance(m, _AFFINE + (nn.ReLU, nn.MaxPool2d)):
            raise BoundError(f"cannot bound layer '{name}' ({type(m).__name__}); supported: Normalize, Linear, "
                             f"Conv2d, BatchNorm, ReLU, MaxPool2d, AvgPool2d, Flatten, Dropout")
        if m.training and isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d) + _PASS[2:]):
            raise BoundError(f"layer '{name}' ({type(m).__name__}) is in training mode; call model.eval() first")
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise BoundError(f"cannot bound layer '{name}': padding mode {m.padding_mode!r} (only zeros)")
        if isinstance(m, nn.MaxPool2d) and (m.dilation not in (1, (1, 1)) or m.return_indices):
            raise BoundError(f"cannot bound layer '{name}': dilated max pooling or return_indices")
    if example is None:
        example = torch.zeros(1, 1, 28, 28)
    layers, h = [], example[:1].detach()
    with torch.no_grad():
        for name, m in flat:
            out = m(h)
            layers.append(Layer(name, m, tuple(h.shape[1:]), tuple(out.shape[1:])))
            h = out
    return layers


def input_box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Linf ball around x intersected with the pixel box [0, 1]."""
    if not math.isfinite(eps) or eps < 0:
        raise BoundError(f"eps must be a finite number >= 0, got {eps}")
    return (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)


def _scale_shift(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An elementwise affine layer as per-channel (scale, shift)."""
    if isinstance(m, Normalize):
        return 1.0 / m.std, -m.mean / m.std
    scale = torch.rsqrt(m.running_var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight
    shift = -m.running_mean * scale
    if m.bias is not None:
        shift = shift + m.bias
    return scale, shift


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view(-1, *([1] * (ndim - 2))) if t.dim() == 1 and ndim > 2 else t


def interval(layer: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise bounds of layer(z) over lo <= z <= hi (one IBP step)."""
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        mid, rad = (hi + lo) / 2, (hi - lo) / 2
        if isinstance(layer, nn.Linear):
            m, r = F.linear(mid, layer.weight, layer.bias), F.linear(rad, layer.weight.abs())
        else:
            kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
            m, r = F.conv2d(mid, layer.weight, layer.bias, **kw), F.conv2d(rad, layer.weight.abs(), None, **kw)
        return m - r, m + r
    if isinstance(layer, (Normalize, nn.BatchNorm1d, nn.BatchNorm2d)):
        scale, shift = _scale_shift(layer)
        scale, shift = _channel_view(scale, lo.dim()), _channel_view(shift, lo.dim())
        a, b = lo * scale + shift, hi * scale + shift
        return torch.minimum(a, b), torch.maximum(a, b)
    # ReLU, max and average pooling, flatten, eval-mode dropout: monotone, so the ends map to the ends
    return layer(lo), layer(hi)


def margin_spec(y: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """C (N, classes-1, classes) with rows e_y - e_j for j != y: C @ logits are the margins."""
    eye = torch.eye(classes, device=y.device)
    rows = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (N, classes, classes); row j is e_y - e_j
    others = torch.arange(classes, device=y.device).unsqueeze(0) != y.unsqueeze(1)
    return rows[others].view(len(y), classes - 1, classes)


def _transpose(layer: Layer, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam A, lam . c) for the affine layer f(z) = A z + c and coefficients lam (B, S, *out_shape)."""
    m, (b, s) = layer.module, lam.shape[:2]
    if isinstance(m, _PASS):
        return lam.reshape(b, s, *layer.in_shape), lam.new_zeros(b, s)
    if isinstance(m, nn.Linear):
        const = lam @ m.bias if m.bias is not None else lam.new_zeros(b, s)
        return lam @ m.weight, const
    if isinstance(m, nn.Conv2d):
        flat = lam.reshape(b * s, *layer.out_shape)
        back = torch.nn.grad.conv2d_input((b * s, *layer.in_shape), m.weight, flat, stride=m.stride,
                                          padding=m.padding, dilation=m.dilation, groups=m.groups)
        const = (lam.sum((3, 4)) @ m.bias) if m.bias is not None else lam.new_zeros(b, s)
        return back.view(b, s, *layer.in_shape), const
    if isinstance(m, (Normalize, nn.BatchNorm1d, nn.BatchNorm2d)):
        scale, shift = _scale_shift(m)
        if scale.dim() == 0:  # Normalize: one mean and std
            return lam * scale, lam.flatten(2).sum(-1) * shift
        per_channel = lam.flatten(3).sum(-1) if lam.dim() > 3 else lam
        return lam * scale.view(-1, *([1] * (lam.dim() - 3))), per_channel @ shift
    # average pooling: linear, no constant; its transpose by autograd
    z = torch.zeros(b * s, *layer.in_shape, dtype=lam.dtype, device=lam.device, requires_grad=True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(m(z), z, grad_outputs=lam.reshape(b * s, *layer.out_shape))
    return g.view(b, s, *layer.in_shape), lam.new_zeros(b, s)


def _relu_lines(lo: torch.Tensor, hi: torch.Tensor):
    """CROWN's relaxation of relu on [lo, hi]: lower slope, upper slope, upper intercept."""
    active, unstable = lo >= 0, (lo < 0) & (hi > 0)
    width = (hi - lo).clamp_min(1e-12)
    upper = torch.where(unstable, hi / width, active.to(lo.dtype))
    intercept = torch.where(unstable, -upper * lo, torch.zeros_like(lo))
    lower = torch.where(unstable, (hi > -lo).to(lo.dtype), active.to(lo.dtype))
    return lower, upper, intercept


def _concretize(lam: torch.Tensor, const: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """min of lam . z + const over the box lo <= z <= hi, per (example, spec)."""
    mid, rad = ((hi + lo) / 2).flatten(1).unsqueeze(2), ((hi - lo) / 2).flatten(1).unsqueeze(2)
    flat = lam.flatten(2)
    return (flat @ mid).squeeze(2) - (flat.abs() @ rad).squeeze(2) + const


def _backward(layers: list[Layer], top: int, lam: torch.Tensor, relus: dict, box,
              const: torch.Tensor | None = None) -> torch.Tensor:
    """Lower bound of lam . (output of layers[:top]) + const over the input box, going backwards."""
    if const is None:
        const = lam.new_zeros(lam.shape[:2])
    for i in range(top - 1, -1, -1):
        layer = layers[i]
        if isinstance(layer.module, nn.ReLU):
            lower, upper, intercept = relus[i]
            pos, neg = lam.clamp(min=0), lam.clamp(max=0)
            const = const + (neg * intercept.unsqueeze(1)).flatten(2).sum(-1)
            lam = pos * lower.unsqueeze(1) + neg * upper.unsqueeze(1)
        elif isinstance(layer.module, nn.MaxPool2d):
            raise BoundError(f"CROWN does not handle max pooling (layer '{layer.name}'); use IBP for this model")
        else:
            lam, c = _transpose(layer, lam)
            const = const + c
    return _concretize(lam, const, *box)


def _affine_tail(layers: list[Layer]) -> int:
    """Index where the final purely affine segment (after the last ReLU or max-pool) starts."""
    start = 0
    for i, layer in enumerate(layers):
        if isinstance(layer.module, (nn.ReLU, nn.MaxPool2d)):
            start = i + 1
    return start


def ibp_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """IBP lower bounds (N, classes-1) on logit_y - logit_j over the eps-ball, margins folded into the tail.

    Differentiable in the weights (certified training, `train --adv ibp`); wrap in no_grad to evaluate.
    """
    layers = bound_layers(model, x)
    tail = _affine_tail(layers)
    lo, hi = input_box(x, eps)
    for layer in layers[:tail]:
        lo, hi = interval(layer.module, lo, hi)
    spec = margin_spec(y, layers[-1].out_shape[0]).to(x.dtype)
    return _backward(layers[tail:], len(layers) - tail, spec, {}, (lo, hi))


def _single_affine(layers: list[Layer], upto: int) -> bool:
    """True when layers[:upto] are affine with at most one weighted layer: IBP is exact there."""
    mods = [l.module for l in layers[:upto]]
    return all(isinstance(m, _AFFINE) for m in mods) and sum(isinstance(m, _WEIGHTED) for m in mods) <= 1


def crown_cost(layers: list[Layer]) -> int:
    """Elements of coefficient tensors, per example, that full CROWN builds (its memory and time)."""
    total = 0
    for i, layer in enumerate(layers):
        if isinstance(layer.module, nn.ReLU) and not _single_affine(layers, i):
            total += math.prod(layer.in_shape) * sum(math.prod(l.in_shape) for l in layers[:i])
    return total


def crown_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                  intermediate: str = "crown", memory: int = 2 ** 27) -> torch.Tensor:
    """CROWN lower bounds (N, classes-1) on logit_y - logit_j over the eps-ball.

    `intermediate="crown"` bounds every pre-activation by CROWN too (tighter, costs `crown_cost`
    coefficient elements per example, built in chunks of at most `memory` elements);
    `"ibp"` takes IBP's pre-activation bounds (CROWN-IBP's bound, Zhang et al. 2020: one backward pass).
    """
    layers = bound_layers(model, x)
    with torch.no_grad():
        box = input_box(x, eps)
        pre = _preactivations(layers, box, intermediate, memory)
        relus = {i: _relu_lines(lo, hi) for i, (lo, hi) in pre.items()}
        spec = margin_spec(y, layers[-1].out_shape[0]).to(x.dtype)
        return _backward(layers, len(layers), spec, relus, box)


def preactivation_bounds(model: nn.Module, x: torch.Tensor, eps: float, *, intermediate: str = "crown",
                         memory: int = 2 ** 27) -> tuple[list[Layer], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """The layers and, for every ReLU (by layer index), elementwise bounds of its input over the ball."""
    layers = bound_layers(model, x)
    with torch.no_grad():
        return layers, _preactivations(layers, input_box(x, eps), intermediate, memory)


def _preactivations(layers: list[Layer], box, intermediate: str, memory: int) -> dict:
    if intermediate not in ("crown", "ibp"):
        raise BoundError(f"intermediate bounds are 'crown' or 'ibp', not {intermediate!r}")
    for layer in layers:
        if isinstance(layer.module, nn.MaxPool2d):
            raise BoundError(f"CROWN does not handle max pooling (layer '{layer.name}'); use IBP for this model")
    pre: dict = {}
    relus: dict = {}
    lo, hi = box
    for i, layer in enumerate(layers):
        if isinstance(layer.module, nn.ReLU):
            if intermediate == "crown" and not _single_affine(layers, i):
                c_lo, c_hi = _neuron_bounds(layers, i, relus, box, memory)
                lo, hi = torch.maximum(lo, c_lo), torch.minimum(hi, c_hi)
            pre[i] = (lo, hi)
            relus[i] = _relu_lines(lo, hi)
        lo, hi = interval(layer.module, lo, hi)
    return pre


def _neuron_bounds(layers: list[Layer], top: int, relus: dict, box, memory: int):
    """CROWN bounds of every neuron of the output of layers[:top], in chunks of neurons.

    The coefficients start as the identity and stay the same for every example until the first
    ReLU below: that stretch (usually the costliest transpose) is computed once and shared.
    """
    shape = layers[top].in_shape
    n, width = box[0].shape[0], math.prod(shape)
    below = top
    while below > 0 and not isinstance(layers[below - 1].module, (nn.ReLU, nn.MaxPool2d)):
        below -= 1
    widest = max(math.prod(l.in_shape) for l in layers[:top + 1])
    chunk = max(1, memory // max(1, n * widest))
    eye = torch.eye(width, dtype=box[0].dtype, device=box[0].device)
    lows, highs = [], []
    for start in range(0, width, chunk):
        lam = eye[start:start + chunk].view(1, -1, *shape)
        const = lam.new_zeros(lam.shape[:2])
        for i in range(top - 1, below - 1, -1):
            lam, c = _transpose(layers[i], lam)
            const = const + c
        lam, const = lam.expand(n, *lam.shape[1:]), const.expand(n, -1)
        lows.append(_backward(layers, below, lam, relus, box, const))
        highs.append(-_backward(layers, below, -lam, relus, box, -const))
    return torch.cat(lows, 1).view(n, *shape), torch.cat(highs, 1).view(n, *shape)


def certified_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                      method: str = "auto", batch_size: int = 500, budget: int = 10 ** 6) -> tuple[torch.Tensor, str]:
    """The best available lower margin bounds (N, 9) and the method that gave them.

    `method`: "ibp", "crown", "crown-ibp" or "auto" (IBP, and CROWN where the model has no max
    pooling, with CROWN intermediate bounds when `crown_cost` is below `budget` per example (only
    tiny nets: full CROWN costs hundreds of forward passes on the zoo's, see benchmarks/results.md), else
    IBP's; the elementwise best of the bounds computed).
    """
    layers = bound_layers(model, x)
    has_pool = any(isinstance(l.module, nn.MaxPool2d) for l in layers)
    if method == "auto":
        methods = ["ibp"] if has_pool else ["ibp", "crown" if crown_cost(layers) <= budget else "crown-ibp"]
    elif method in ("ibp", "crown", "crown-ibp"):
        methods = [method]
    else:
        raise BoundError(f"unknown bound method {method!r}; use auto, ibp, crown or crown-ibp")
    out = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        with torch.no_grad():
            bounds = [ibp_margins(model, xb, yb, eps) if m == "ibp" else
                      crown_margins(model, xb, yb, eps, intermediate="crown" if m == "crown" else "ibp")
                      for m in methods]
        out.append(torch.stack(bounds).max(0).values)
    return torch.cat(out), "+".join(methods)


def certified(margins: torch.Tensor, tolerance: float = TOLERANCE) -> torch.Tensor:
    """Which examples the margin bounds certify (every lower bound above the float tolerance)."""
    return margins.min(1).values > tolerance
