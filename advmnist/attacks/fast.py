"""A fast input gradient for plain sequential nets: folded weights, hand-written backward.

An attack step needs only d CE / d x with frozen weights. For an `nn.Sequential` of the layers the
MNIST zoo uses (Normalize, Conv2d, BatchNorm in eval mode, MaxPool2d, ReLU, Flatten, Linear,
Dropout in eval mode), `compile_grad` folds normalisation and BatchNorm into the neighbouring
conv/linear weights, turns convolutions that cover their whole input map into matrix products,
drops eval-mode dropout, fuses a leading one-channel conv + 2x2 max-pool into one banded matrix
product whose output the later layers read channels-last (`_ConvPool`) or else runs the convolutions
channels-last from the input on (on a CPU), and returns a function that
runs the forward pass and the backward pass to the input directly: about a dozen kernels per step
instead of autograd's graph. The result
equals autograd's to float rounding (tested for every registry model). Anything else, a layer it
does not know or a module in train mode, returns None, and the caller uses autograd.

A caveat that holds for autograd too: on MNIST's flat background, max-pool windows hold values
that are equal up to float rounding, so which maximum carries the gradient depends on how the
convolution backend rounds. Logits agree to 1e-6; input gradients agree exactly only under the
same backend (the tests compare them so).
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

GradFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> one loss per example

SMALL_BATCH = 16  # below this, convolutions run without oneDNN
MIN_CHANNELS = 10  # fewest output channels for which a first conv + pool is fused (`_ConvPool`)


@functools.cache
def _quiet_onednn() -> None:
    """Toggling oneDNN also touches its TF32 setting, which warns on every CPU build: silence that one
    warning, once, when the first fast function is compiled (not at import: importing advmnist
    changes no process-wide setting)."""
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
    __slots__ = ("kind", "w", "b", "pad", "k", "shape", "a", "stride", "cl", "fused", "relu")

    def __init__(self, kind: str, w=None, b=None, pad=0, k=0, shape=None, a=None, stride=(1, 1)):
        self.kind, self.w, self.b, self.pad, self.k, self.shape, self.a = kind, w, b, pad, k, shape, a
        self.stride = stride
        self.cl = False  # flatten / whole-map linear reading a channels-last map
        self.fused: _ConvPool | None = None
        self.relu = False  # a conv with the ReLU after it folded in (`_fuse_relu`)


class _ConvPool:
    """A one-channel k x k convolution followed by 2x2 max-pool, as one matrix product.

    Why: a convolution with one input channel is the slowest kernel of every zoo net (oneDNN runs
    it at a tenth of the matmul rate; its input gradient is worse), and the NCHW max-pool after it
    costs as much again. Here each pooled output's four conv outputs, for W neighbouring pooled
    columns, come from one (k+1) x (2W+k-1) input window: the image is cut into such windows
    (one copy) and multiplied by a banded weight matrix T, giving the conv map laid out as
    (window, dy, j, dx, channel). Max-pool then runs on that layout as a channels-last pool of
    tiny images (fast), and the pooled map comes out channels-last, which the layers after it
    keep. The input gradient is the transpose: one product with T^T and a few shifted adds.
    T holds zeros where a window column is out of a filter's reach: (2W+k-1)/(2W) more FLOPs than
    the direct convolution, on a kernel that runs near the matmul rate.
    """

    def __init__(self, w: torch.Tensor, b: torch.Tensor, pad: tuple[int, int], in_hw: tuple[int, int]):
        c, _, k, _ = w.shape
        self.k, self.c, self.pad, self.b = k, c, pad, b
        self.h, self.w_in = in_hw
        self.ph = (self.h + 2 * pad[0] - k + 1) // 2
        self.pw = (self.w_in + 2 * pad[1] - k + 1) // 2
        # smallest block giving a product at least ~200 wide (narrower ones run far below the
        # matmul rate), then the one that wastes fewest padded columns
        w_min = min(self.pw, max(1, -(-200 // (4 * c))))
        self.W = min(range(w_min, min(self.pw, 2 * w_min) + 1), key=lambda v: (-(-self.pw // v) * v, v))
        self.nb = -(-self.pw // self.W)
        self.win = 2 * self.W + k - 1
        t = w.new_zeros(k + 1, self.win, 2, self.W, 2, c)
        taps = w[:, 0].permute(1, 2, 0)  # (k, k, c)
        for dy in range(2):
            for j in range(self.W):
                for dx in range(2):
                    t[dy:dy + k, 2 * j + dx:2 * j + dx + k, dy, j, dx] = taps
        self.t = t.reshape((k + 1) * self.win, 4 * self.W * c)
        self.tt = self.t.t().contiguous()
        self.hp = 2 * self.ph + k - 1  # input rows read (padding included)
        self.wp = max(2 * self.nb * self.W + k - 1, self.w_in + 2 * pad[1])  # columns, right-padded

    @staticmethod
    def match(ops: list[_Op]) -> int:
        """How many ops from ops[0] this layer replaces: conv, pool (3 with a ReLU before or after
        the pool: the two commute); 0 if they do not fit."""
        conv = ops[0]
        kinds = [o.kind for o in ops[1:3]]
        n = 3 if kinds in (["relu", "pool"], ["pool", "relu"]) else 2 if kinds[:1] == ["pool"] else 0
        # with few output channels the product is too narrow or too sparse to beat oneDNN (lenet's
        # 6 channels: measured 0.9x)
        fits = (conv.kind == "conv" and conv.w.shape[1] == 1 and conv.w.shape[0] >= MIN_CHANNELS
                and conv.stride == (1, 1) and conv.w.shape[2] == conv.w.shape[3] and conv.w.shape[2] % 2 == 1)
        pool = next((o for o in ops[1:n] if o.kind == "pool"), None)
        return n if fits and pool is not None and pool.k == 2 else 0

    def forward(self, h: torch.Tensor):
        n = len(h)
        ph, pw = self.pad
        x = h.reshape(n, self.h, self.w_in)
        pads = (pw, self.wp - self.w_in - pw, ph, max(0, self.hp - self.h - ph))
        x = F.pad(x, pads) if any(pads) else x.contiguous()
        rows, cols = x.shape[1:]
        m = n * self.ph * self.nb
        win = x.as_strided((n, self.ph, self.nb, self.k + 1, self.win), (rows * cols, 2 * cols, 2 * self.W, cols, 1))
        y = (win.reshape(m, -1) @ self.t).view(m, 2, 2 * self.W, self.c).permute(0, 3, 1, 2)
        pooled, idx = F.max_pool2d(y, 2, return_indices=True)  # (m, c, 1, W), channels-last
        out = pooled.permute(0, 2, 3, 1).reshape(n, self.ph, self.nb * self.W, self.c)[:, :, :self.pw] + self.b
        return out.permute(0, 3, 1, 2), (y, idx, n)

    def backward(self, g: torch.Tensor, saved) -> torch.Tensor:
        y, idx, n = saved
        g = g.permute(0, 2, 3, 1)
        if self.nb * self.W != self.pw:
            g = F.pad(g, (0, 0, 0, self.nb * self.W - self.pw))
        g = g.reshape(len(y), 1, self.W, self.c).permute(0, 3, 1, 2)
        gy = torch.ops.aten.max_pool2d_with_indices_backward(g, y, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
        cols = (gy.permute(0, 2, 3, 1).reshape(len(y), -1) @ self.tt).view(
            n, self.ph, self.nb, (self.k + 1) // 2, 2, self.win)
        step = 2 * self.W
        chunks = -(-self.win // step)
        ph, pw = self.pad
        pairs = max(self.ph + (self.k + 1) // 2 - 1, -(-(ph + self.h) // 2))
        gx = cols.new_zeros(n, pairs, 2, max(step * (self.nb + chunks - 1), pw + self.w_in))
        for q in range((self.k + 1) // 2):  # window rows 2q, 2q+1 land on input row pair I + q
            for s in range(chunks):  # window columns [step*s, step*(s+1)) land on block bi + s
                width = min(step, self.win - step * s)
                dst = gx[:, q:q + self.ph, :, step * s:step * (s + self.nb)].unflatten(-1, (self.nb, step))
                dst[..., :width] += cols[:, :, :, q, :, step * s:step * s + width].transpose(2, 3)
        gx = gx.flatten(1, 2)[:, ph:ph + self.h, pw:pw + self.w_in]
        return gx.reshape(n, 1, self.h, self.w_in)


def _plan(model: nn.Module, example: torch.Tensor, fuse: bool = True) -> list[_Op] | None:
    """Fold the layers into conv/linear/pool/relu/reshape ops; None if a layer is not supported.
    `fuse=False` leaves a leading conv + pool unfused (to measure what fusing gains)."""
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
    ops = _simplify(ops)
    return _fuse_relu(_channels_last(ops, tuple(example.shape[-2:]))) if fuse else ops


def _fuse_relu(ops: list[_Op]) -> list[_Op]:
    """A conv followed by a ReLU becomes one op: on a CPU, oneDNN applies the ReLU as the conv writes
    its output, sparing a pass over the largest maps (900 images, 2 threads: `strided`'s conv1 + ReLU
    5.4 -> 4.2 ms, conv2 + ReLU 9.8 -> 8.8 ms, equal to the bit)."""
    out: list[_Op] = []
    for op in ops:
        if op.kind == "relu" and out and out[-1].kind == "conv" and not out[-1].relu:
            out[-1].relu = True
            continue
        out.append(op)
    return out


@functools.cache
def _pointwise_conv_available() -> bool:
    """Whether this build has oneDNN's conv with a fused ReLU (an internal op of torch's CPU compiler)."""
    try:
        torch.ops.mkldnn._convolution_pointwise(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 2, 2), torch.zeros(1),
                                                [0, 0], [1, 1], [1, 1], 1, "relu", [], "")
    except (AttributeError, RuntimeError):
        return False
    return True


def _conv(h: torch.Tensor, op: _Op) -> torch.Tensor:
    if op.relu and h.device.type == "cpu" and len(h) >= SMALL_BATCH and _pointwise_conv_available():
        return torch.ops.mkldnn._convolution_pointwise(h, op.w, op.b, list(_pads(op.pad)), list(op.stride), [1, 1],
                                                       1, "relu", [], "")
    h = F.conv2d(h, op.w, op.b, stride=op.stride, padding=op.pad)
    return torch.relu(h) if op.relu else h


def _channels_last(ops: list[_Op], in_hw: tuple[int, int]) -> list[_Op]:
    """Run the convolutions channels-last: fuse a leading one-channel conv + 2x2 pool (see
    `_ConvPool`), whose output is laid out so, or else turn the input channels-last before the first
    conv (a `cl` step). oneDNN's convolutions then read and write channels-last maps: on 2 CPU threads
    and 900 images, `strided`'s forward pass 22.1 -> 16.0 ms and its input gradient 54.1 -> 42.4 ms;
    `lenet`, the other `strided` widths and `trades-cnn` gain 15-50% alike. The first flatten then
    reads the map in (h, w, c) order, its next linear layer's columns permuted to match. Plans that
    do not fit stay as they are."""
    i = 0
    while i < len(ops) and ops[i].kind == "affine":
        i += 1
    replaced = _ConvPool.match(ops[i:]) if i < len(ops) else 0
    if replaced:
        conv = ops[i]
        fused = _Op("convpool")
        fused.fused = _ConvPool(conv.w, conv.b, _pads(conv.pad), in_hw)
        out = ops[:i] + [fused] + ([_Op("relu")] if replaced == 3 else [])  # ReLU after the pool
        rest = ops[i + replaced:]
    elif i < len(ops) and ops[i].kind == "conv":
        out, rest = ops[:i] + [_Op("cl")], ops[i:]
    else:
        return ops
    for j, op in enumerate(rest):
        if op.kind in ("conv", "relu", "pool"):
            continue
        if op.kind == "flatten" and j + 1 < len(rest) and rest[j + 1].kind == "linear":
            op.cl, lin, shape = True, rest[j + 1], op.shape
        elif op.kind == "linear" and op.shape is not None:
            op.cl, lin, shape = True, op, op.shape
        else:
            return ops  # something else reads the map: keep the plain plan
        c, h, w = shape
        lin.w = lin.w.view(-1, c, h, w).permute(0, 2, 3, 1).reshape(lin.w.shape[0], -1).contiguous()
        return out + rest
    return ops


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


def compile_grad(model: nn.Module, example: torch.Tensor, fuse: bool = True,
                 loss: LossFn | None = None) -> GradFn | None:
    """A function (x, y) -> (d sum loss / d x, logits) for `model`, or None where unsupported.

    `loss(logits, y)` gives one value per example (default: cross-entropy, whose logit gradient is
    written out; any other loss is differentiated on the (N, classes) logits alone, which costs
    nothing next to the network). `example` is one input (1, C, H, W) used to trace shapes.
    Weights are copied now: compile again after the model changes. `fuse=False` skips `_ConvPool`.
    """
    ops = _compile(model, example, fuse)
    if ops is None:
        return None

    def grad_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # oneDNN's convolutions cost more than they save on the smallest batches (batch 10, improved-bn:
        # 3.4 -> 2.9 ms a step), but PyTorch's own convolutions split work over threads from batch 16
        # up and then cost 3-5x oneDNN's (2 threads, batch 20: strided 7.6 against 2.6 ms, strided-wide
        # 11.5 against 2.8, improved-bn 5.3 against 3.7), so oneDNN is used from 16 up.
        with torch.backends.mkldnn.flags(enabled=len(x) >= SMALL_BATCH):
            saved: list = []
            logits = _forward(ops, x, saved)
            return _backward(ops, saved, logit_grad(logits, y, loss)), logits.detach()

    return grad_fn


def compile_logits(model: nn.Module, example: torch.Tensor, fuse: bool = True):
    """A function x -> logits running the folded plan with nothing kept for a backward pass (for
    score-based attacks), or None where unsupported."""
    ops = _compile(model, example, fuse)
    if ops is None:
        return None

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        with torch.backends.mkldnn.flags(enabled=len(x) >= SMALL_BATCH):
            return _forward(ops, x, None)

    return logits_fn


def logit_grad(logits: torch.Tensor, y: torch.Tensor, loss: LossFn | None = None) -> torch.Tensor:
    """d sum(loss(logits, y)) / d logits; cross-entropy's (softmax - one-hot) written out."""
    if loss is None:
        g = torch.softmax(logits, dim=1)
        g[torch.arange(len(y), device=y.device), y] -= 1.0
        return g
    with torch.enable_grad():
        z = logits.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(z, y).sum(), z)
    return g


def _compile(model: nn.Module, example: torch.Tensor, fuse: bool) -> list[_Op] | None:
    _quiet_onednn()
    try:
        ops = _plan(model, example[:1], fuse)
    except (RuntimeError, ValueError):
        return None
    return ops or None


def _forward(ops: list[_Op], x: torch.Tensor, saved: list | None) -> torch.Tensor:
    """The plan's forward pass; with a `saved` list, what the backward pass needs is appended to it."""
    keep = saved.append if saved is not None else (lambda _: None)
    h = x
    for op in ops:
        if op.kind == "affine":
            h = h * op.a + op.b
        elif op.kind == "convpool":
            h, s = op.fused.forward(h)
            keep(s)
            continue
        elif op.kind == "conv":
            inp, h = h, _conv(h, op)
            keep((inp, h) if op.relu else inp)  # convolution_backward wants the input (shape, layout)
            continue
        elif op.kind == "linear":
            if op.shape is not None:
                h = _flatten(h, op.cl)
            h = F.linear(h, op.w, op.b)
        elif op.kind == "cl":
            if h.device.type == "cpu":  # measured on CPUs only; GPUs keep the layout they are given
                h = _to_channels_last(h)
        elif op.kind == "unflat":
            h = h.view(h.shape[0], *op.shape)
        elif op.kind == "flatten":
            h = _flatten(h, op.cl)
        elif op.kind == "relu":
            h = torch.relu(h)
            keep(h)
            continue
        elif op.kind == "pool":
            inp = h
            if saved is None:
                h = F.max_pool2d(h, op.k)
                continue
            h, idx = F.max_pool2d(h, op.k, return_indices=True)
            keep((idx, inp))
            continue
        keep(None)
    return h


def _backward(ops: list[_Op], saved: list, g: torch.Tensor) -> torch.Tensor:
    for op, s in zip(reversed(ops), reversed(saved)):
        if op.kind == "affine":
            g = g * op.a
        elif op.kind == "convpool":
            g = op.fused.backward(g, s)
        elif op.kind == "conv":
            if op.relu:
                s, out = s
                g = torch.ops.aten.threshold_backward(g, out, 0)
            g = _conv_input_grad(op, g, s)
        elif op.kind == "linear":
            g = g @ op.w
            if op.shape is not None:
                g = _unflatten(g, op.shape, op.cl)
        elif op.kind == "unflat":
            g = g.flatten(1)
        elif op.kind == "flatten":
            g = _unflatten(g, op.shape, op.cl)
        elif op.kind == "relu":
            g = torch.ops.aten.threshold_backward(g, s, 0)
        elif op.kind == "pool":
            idx, inp = s
            g = torch.ops.aten.max_pool2d_with_indices_backward(g, inp, [op.k, op.k], [op.k, op.k], [0, 0],
                                                                [1, 1], False, idx)
    return g


def _conv_input_grad(op: _Op, g: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    if op.w.shape[1] == 1 and g.device.type == "cpu":
        # a one-channel input's gradient as a matrix product and col2im: on a CPU about 3x faster
        # than convolution_backward's (900 images, strided's first conv: 18.3 -> 6.0 ms, 2 threads;
        # not measured on a GPU, which keeps its convolution kernels)
        cols = torch.matmul(op.w.flatten(1).t(), g.flatten(2))
        return F.fold(cols, tuple(inp.shape[-2:]), tuple(op.w.shape[-2:]), padding=_pads(op.pad), stride=op.stride)
    # the kernel autograd uses (oneDNN where enabled); conv_transpose2d takes a slower path
    return torch.ops.aten.convolution_backward(g, inp, op.w, None, list(op.stride), list(_pads(op.pad)), [1, 1],
                                               False, [0, 0], 1, [True, False, False])[0]


def _to_channels_last(h: torch.Tensor) -> torch.Tensor:
    """Channels-last, so that oneDNN's convolutions write their outputs so too. A one-channel map
    is laid out so already, but oneDNN sees it only with strides that give the channel a unit step."""
    if h.shape[1] == 1:
        rows, cols = h.shape[-2:]
        return h.contiguous().as_strided(h.shape, (rows * cols, 1, cols, 1))
    return h.contiguous(memory_format=torch.channels_last)


def _flatten(h: torch.Tensor, cl: bool) -> torch.Tensor:
    return h.permute(0, 2, 3, 1).reshape(len(h), -1) if cl else h.flatten(1)


def _unflatten(g: torch.Tensor, shape: tuple[int, int, int], cl: bool) -> torch.Tensor:
    c, h, w = shape
    return g.view(len(g), h, w, c).permute(0, 3, 1, 2) if cl else g.view(len(g), c, h, w)


def _pads(pad) -> tuple[int, int]:
    return tuple(pad) if isinstance(pad, tuple) else (int(pad), int(pad))

