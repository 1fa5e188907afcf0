"""A fast input gradient for plain sequential nets: folded weights, hand-written backward.

An attack step needs only d CE / d x with frozen weights. For an `nn.Sequential` of the layers the
MNIST zoo uses (Normalize, Conv2d, BatchNorm in eval mode, MaxPool2d, ReLU, Flatten, Linear,
Dropout in eval mode), `compile_grad` folds normalisation and BatchNorm into the neighbouring
conv/linear weights, turns convolutions that cover their whole input map into matrix products,
drops eval-mode dropout, and returns a function that runs the forward pass and the backward pass
to the input directly: about a dozen kernels per step instead of autograd's graph. The result
equals autograd's to float rounding (tested for every registry model). Anything else, a layer it
does not know or a module in train mode, returns None, and the caller uses autograd.

A caveat that holds for autograd too: on MNIST's flat background, max-pool windows hold values
that are equal up to float rounding, so which maximum carries the gradient depends on how the
convolution backend rounds. Logits agree to 1e-6; input gradients agree exactly only under the
same backend (the tests compare them so).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

GradFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

SMALL_BATCH = 100  # below this, convolutions run without oneDNN

# Toggling oneDNN also touches its TF32 setting, which warns on every CPU build; say it never.
warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")

_DROPOUT = (nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout, nn.Identity)


def _flat_layers(model: nn.Module) -> list[nn.Module] | None:
    if not isinstance(model, nn.Sequential):
        return None
    out = []
    for m in model:
        if isinstance(m, nn.Sequential):
            inner = _flat_layers(m)
            if inner is None:
                return None
            out += inner
        else:
            out.append(m)
    return out


class _Op:
    __slots__ = ("kind", "w", "b", "pad", "k", "shape", "a", "stride")

    def __init__(self, kind: str, w=None, b=None, pad=0, k=0, shape=None, a=None, stride=(1, 1)):
        self.kind, self.w, self.b, self.pad, self.k, self.shape, self.a = kind, w, b, pad, k, shape, a
        self.stride = stride


def _plan(model: nn.Module, example: torch.Tensor) -> list[_Op] | None:
    """Fold the layers into conv/linear/pool/relu/reshape ops; None if a layer is not supported."""
    from ..models import Normalize  # a leaf module with no dependencies

    layers = _flat_layers(model)
    if layers is None or any(m.training for m in model.modules()):
        return None
    ops: list[_Op] = []
    x = example
    with torch.no_grad():
        for m in layers:
            shape_in = x.shape
            if isinstance(m, _DROPOUT):
                continue
            if isinstance(m, Normalize):
                if m.mean.item() == 0.0 and m.std.item() == 1.0:
                    x = m(x)
                    continue
                ops.append(_Op("affine", a=1.0 / m.std.item(), b=-m.mean.item() / m.std.item()))
            elif isinstance(m, nn.Conv2d):
                if m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
                    return None
                b = m.bias if m.bias is not None else torch.zeros(m.out_channels, device=m.weight.device)
                if m.padding == (0, 0) and m.stride == (1, 1) and tuple(shape_in[-2:]) == tuple(m.weight.shape[-2:]):
                    ops.append(_Op("linear", w=m.weight.flatten(1).clone(), b=b.clone(), shape=tuple(shape_in[1:])))
                    ops.append(_Op("unflat", shape=(m.out_channels, 1, 1)))
                else:
                    ops.append(_Op("conv", w=m.weight.clone(), b=b.clone(), pad=m.padding, stride=tuple(m.stride)))
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                if m.running_mean is None:
                    return None
                scale = m.running_var.add(m.eps).rsqrt()
                if m.weight is not None:
                    scale = scale * m.weight
                shift = -m.running_mean * scale + (m.bias if m.bias is not None else 0)
                j = len(ops) - 1
                while j >= 0 and ops[j].kind == "unflat":
                    j -= 1
                if j < 0 or ops[j].kind not in ("conv", "linear"):
                    return None  # BatchNorm not right after a conv or linear layer
                prev = ops[j]
                prev.w = prev.w * scale.view((-1,) + (1,) * (prev.w.dim() - 1))
                prev.b = prev.b * scale + shift
            elif isinstance(m, nn.MaxPool2d):
                k = m.kernel_size if isinstance(m.kernel_size, int) else None
                s = m.stride if isinstance(m.stride, int) else None
                if k is None or (s or k) != k or m.padding not in (0, (0, 0)) or m.dilation not in (1, (1, 1)) \
                        or m.ceil_mode:
                    return None
                ops.append(_Op("pool", k=k))
            elif isinstance(m, nn.ReLU):
                ops.append(_Op("relu"))
            elif isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    return None
                ops.append(_Op("flatten", shape=tuple(shape_in[1:])))
            elif isinstance(m, nn.Linear):
                if len(shape_in) != 2:
                    return None
                b = m.bias if m.bias is not None else torch.zeros(m.out_features, device=m.weight.device)
                ops.append(_Op("linear", w=m.weight.clone(), b=b.clone()))
            else:
                return None
            x = m(x)
    return _simplify(ops)


def _simplify(ops: list[_Op]) -> list[_Op]:
    """Fold a leading affine into the first conv/linear when that is exact (no zero padding)."""
    out: list[_Op] = []
    i = 0
    while i < len(ops):
        op = ops[i]
        nxt = ops[i + 1] if i + 1 < len(ops) else None
        if op.kind == "affine":
            j = i + 1
            while j < len(ops) and ops[j].kind == "flatten":
                j += 1
            target = ops[j] if j < len(ops) else None
            if target is not None and (target.kind == "linear" or (target.kind == "conv" and _pads(target.pad) == (0, 0))):
                target.b = target.b + op.b * target.w.sum(dim=tuple(range(1, target.w.dim())))
                target.w = target.w * op.a
                i += 1
                continue
        if op.kind == "unflat" and nxt is not None and nxt.kind == "flatten":
            i += 2  # (N, C) -> (N, C, 1, 1) -> (N, C): nothing to do
            continue
        if op.kind == "unflat" and nxt is not None and nxt.kind == "linear" and nxt.shape is not None:
            i += 1  # the next whole-map conv flattens again
            continue
        out.append(op)
        i += 1
    return out


def compile_grad(model: nn.Module, example: torch.Tensor) -> GradFn | None:
    """A function (x, y) -> (d sum CE / d x, logits) for `model`, or None where unsupported.

    `example` is one input (1, C, H, W) used to trace shapes. Weights are copied now: compile again
    after the model changes.
    """
    try:
        ops = _plan(model, example[:1])
    except (RuntimeError, ValueError):
        return None
    if ops is None or not ops:
        return None

    def grad_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # oneDNN's convolutions cost more than they save on small batches (measured: batch 10,
        # improved-bn 3.4 -> 2.9 ms a step; batch 1000, 350 -> 400 ms), so they are used from 100 up.
        with torch.backends.mkldnn.flags(enabled=len(x) >= SMALL_BATCH):
            return _run(x, y)

    def _run(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        saved = []
        h = x
        for op in ops:
            if op.kind == "affine":
                h = h * op.a + op.b
            elif op.kind == "conv":
                saved.append(h)  # convolution_backward wants the input (for its shape and layout)
                h = F.conv2d(h, op.w, op.b, stride=op.stride, padding=op.pad)
                continue
            elif op.kind == "linear":
                if op.shape is not None:
                    h = h.flatten(1)
                h = F.linear(h, op.w, op.b)
            elif op.kind == "unflat":
                h = h.view(h.shape[0], *op.shape)
            elif op.kind == "flatten":
                h = h.flatten(1)
            elif op.kind == "relu":
                h = torch.relu(h)
                saved.append(h)
                continue
            elif op.kind == "pool":
                inp = h
                h, idx = F.max_pool2d(h, op.k, return_indices=True)
                saved.append((idx, inp))
                continue
            saved.append(None)
        logits = h
        g = torch.softmax(logits, dim=1)
        g[torch.arange(len(y), device=y.device), y] -= 1.0
        for op, s in zip(reversed(ops), reversed(saved)):
            if op.kind == "affine":
                g = g * op.a
            elif op.kind == "conv":
                # the kernel autograd uses (oneDNN where enabled); conv_transpose2d takes a slower path
                g = torch.ops.aten.convolution_backward(
                    g, s, op.w, None, list(op.stride), list(_pads(op.pad)), [1, 1], False, [0, 0], 1,
                    [True, False, False])[0]
            elif op.kind == "linear":
                g = g @ op.w
                if op.shape is not None:
                    g = g.view(g.shape[0], *op.shape)
            elif op.kind == "unflat":
                g = g.flatten(1)
            elif op.kind == "flatten":
                g = g.view(g.shape[0], *op.shape)
            elif op.kind == "relu":
                g = torch.ops.aten.threshold_backward(g, s, 0)
            elif op.kind == "pool":
                idx, inp = s
                g = torch.ops.aten.max_pool2d_with_indices_backward(g, inp, [op.k, op.k], [op.k, op.k], [0, 0],
                                                                    [1, 1], False, idx)
        return g, logits.detach()

    return grad_fn


def _pads(pad) -> tuple[int, int]:
    return tuple(pad) if isinstance(pad, tuple) else (int(pad), int(pad))

